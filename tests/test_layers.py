"""Imports run one way: no fedfm module imports one of a higher layer (at module level or inside
a function), the library imports no Flower, server/ and clients/ import no private Flower name, and
runtime/ (launchers of Flower's own processes) does only under a check of the Flower release."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import its own layer and the layers below it
LAYERS = [
    ["protocol", "config", "transport", "appconfig", "run_log", "packed", "superlink_users"],
    ["data"],
    ["models", "eval"],
    ["privacy"],
    ["training"],
    ["site", "personal", "global_model", "results", "site_calls"],
    ["federation", "baselines", "run_folder"],
    ["audit"],
    ["report"],
    ["export", "predict", "simulate", "study", "tune", "deploy", "bench", "chaos", "cli"],
]
RANK = {name: number for number, names in enumerate(LAYERS) for name in names}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "fedfm" else None


def _library_modules():
    for path in sorted((ROOT / "fedfm").rglob("*.py")):
        unit = path.relative_to(ROOT / "fedfm").parts[0].removesuffix(".py")
        if unit != "__init__":
            yield path, unit


def test_every_library_module_has_a_layer():
    assert sorted({unit for _, unit in _library_modules()} - set(RANK)) == []


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = []
    for path, unit in _library_modules():
        for module, names in _imports(path):
            targets = [f"fedfm.{n}" for n in names] if module == "fedfm" else [module]
            for target in targets:
                other = _unit(target)
                if other in RANK and RANK[other] > RANK[unit]:
                    upward.append(f"{path.relative_to(ROOT)} imports {target}")
    assert upward == []


def test_the_library_imports_no_flower():
    flower = [f"{path.relative_to(ROOT)}: {module}" for path, _ in _library_modules()
              for module, _ in _imports(path) if module.split(".")[0] == "flwr"]
    assert flower == []


def _private_flower_imports(path: Path) -> list[str]:
    private = []
    for module, names in _imports(path):
        if module.split(".")[0] != "flwr":
            continue
        if module.split(".")[1:2] == ["supercore"] or any(p.startswith("_") for p in module.split(".")) \
                or any(n.startswith("_") for n in names):
            private.append(f"{path.relative_to(ROOT)}: {module} {names}")
    return private


def test_the_flower_glue_uses_public_names_only():
    private = [hit for folder in ("server", "clients") for path in sorted((ROOT / folder).rglob("*.py"))
               for hit in _private_flower_imports(path)]
    assert private == []


def test_the_runtime_launchers_reach_into_flower_only_for_the_release_they_were_written_for():
    """runtime/ patches Flower's own processes (short waits, a ClientApp template): each module that
    imports a Flower internal does so only under a check of the exact release."""
    checked = []
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        text = path.read_text()
        if _private_flower_imports(path) or "flwr.supernode import" in text:
            assert "flwr.__version__" in text and "PATCHED_FLWR" in text, f"{path}: no check of the Flower release"
            checked.append(path.name)
    assert checked == ["superexec.py", "supernode.py"]


SITE_NAME_MADE = re.compile(r"""f["']site-\{|["']site-["']\s*\+|\.rsplit\(["']-["']""")


def test_only_the_protocol_builds_or_parses_a_site_name():
    """One spelling of a site's name (site-K), made and read in fedfm/protocol.py alone."""
    found = [f"{path.relative_to(ROOT)}:{number}" for folder in ("fedfm", "server", "clients", "runtime")
             for path in sorted((ROOT / folder).rglob("*.py")) if path != ROOT / "fedfm" / "protocol.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if SITE_NAME_MADE.search(line)]
    assert found == []


def _protocol_keys() -> set[str]:
    """The message and metric keys fedfm/protocol.py defines (hyphenated string constants)."""
    keys = set()
    for node in ast.parse((ROOT / "fedfm" / "protocol.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str) \
                and re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)+", node.value.value):
            keys.add(node.value.value)
    return keys


def test_only_the_protocol_spells_a_message_key():
    """Every other module names a key by its constant. appconfig.py is the node config's home, whose
    keys (site-id, budget-epsilon, ...) an operator types on the SuperNode's command line."""
    keys = _protocol_keys()
    assert {"site-id", "train-loss", "num-examples", "ledger-head"} <= keys
    quoted = re.compile(r"""["'](%s)["']""" % "|".join(map(re.escape, sorted(keys))))
    found = [f"{path.relative_to(ROOT)}:{number}: {match.group(1)}" for folder in ("fedfm", "server", "clients", "runtime")
             for path in sorted((ROOT / folder).rglob("*.py"))
             if path not in (ROOT / "fedfm" / "protocol.py", ROOT / "fedfm" / "appconfig.py")
             for number, line in enumerate(path.read_text().splitlines(), 1) for match in quoted.finditer(line)]
    assert found == []
