"""Audit site ledgers: verify the hash chains and recompute every epsilon independently.

For each site the recorded history is recomputed with Opacus (RDP and PRV) and with Google's
``dp-accounting`` (RDP and PLD), a second library that shares no accounting code with Opacus.
The checks and tolerances follow shared practice for DP-SGD accounting:

* Opacus and dp-accounting RDP agree to a relative 1e-6 at the integer orders 2-63 but 11 (both
  libraries' default grids hold them). At fractional orders the two compute RDP differently (on a
  5-round quickstart history 9.1912 vs 9.2118) and dp-accounting drops orders 1.1-1.5 it cannot
  converge for; both are valid upper bounds, so the fractional values are shown, never compared;
* 0 <= eps(Opacus PRV) - eps(dp-accounting PLD) <= 0.011;
* every reported epsilon equals the recomputation with the accountant the ledger names;
* the reported epsilon lies between the independent PLD value and the integer-order RDP bound;
* no entry exceeds the site's budget.

A site's ledger may also hold one release of its noisy label counts (``kind: label-counts``,
for class weights): a Gaussian mechanism without sampling on a sensitivity-1 histogram, which
both libraries recompute as such and compose with the DP-SGD steps.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp
from opacus.accountants import RDPAccountant

from fedfm.privacy.accountant import SiteAccountant
from fedfm.privacy.anchors import ANCHOR_LOG, AnchorLog, check_ledger, verify_log
from fedfm.audit.empirical import replay_with_canaries
from fedfm.config import ConfigError, load_config
from fedfm.privacy.client_level import DP_ACCOUNTING_RDP
from fedfm.privacy.entries import KINDS, LABEL_COUNTS, LedgerEntry
from fedfm.privacy.ledger import LedgerError, SiteLedger, batch_of
from fedfm.protocol import site_id as protocol_site_id
from fedfm.privacy.signing import KEYS_DIR, SigningError, load_public_key, public_key_id, verify_signature

# the integer orders in both Opacus' default grid and dp-accounting's (Opacus has no 11), so the
# integer-order RDP bound is never below either library's default-grid value
INTEGER_ORDERS = [float(a) for a in range(2, 64) if a != 11]
INTEGER_RDP_RELATIVE_GAP = 1e-6
PRV_MINUS_PLD = (0.0, 0.011)
REPORTED_ABS_TOL = 1e-6
# Both libraries bound epsilon over a grid of RDP orders; using Opacus' grid in dp-accounting
# makes the two RDP values comparable (with their own grids they differ by up to ~0.5 %).
RDP_ORDERS = list(RDPAccountant.DEFAULT_ALPHAS)


@dataclass
class SiteAudit:
    site: str
    rounds: list[int] = field(default_factory=list)
    delta: float | None = None
    budget_epsilon: float | None = None
    reported_epsilon: float | None = None
    epsilons: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    label_counts: dict[str, Any] | None = None  # the site's noisy label-count release, if it made one
    signatures: str | None = None  # what the signature check found
    anchors: str | None = None  # what the check against the coordinator's anchor log found
    runs: list[dict[str, Any]] = field(default_factory=list)  # the runs the ledger spans, in order
    empirical: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def is_release(entry: dict[str, Any]) -> bool:
    """A noisy label-count release, not a round of training."""
    return entry.get("kind") == LABEL_COUNTS


def _dp_event(entry: dict[str, Any]) -> Any:
    b = batch_of(entry)
    if is_release(entry):  # the Gaussian mechanism itself, no sampling
        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(b.noise_multiplier), b.steps)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(b.sample_rate, dp_accounting.GaussianDpEvent(b.noise_multiplier)),
        b.steps,
    )


def _dp_events(entries: list[dict[str, Any]]) -> Any:
    return dp_accounting.ComposedDpEvent([_dp_event(e) for e in entries])


def dp_accounting_rdp_default_orders(entries: list[dict[str, Any]], delta: float) -> float:
    """dp-accounting's RDP on its own order grid (what Flower's RdpAccountant reports)."""
    accountant = rdp.RdpAccountant()
    accountant.compose(_dp_events(entries))
    return float(accountant.get_epsilon(delta))


def dp_accounting_epsilons(entries: list[dict[str, Any]], delta: float) -> dict[str, float]:
    """Epsilon of the recorded history with dp-accounting's PLD and RDP accountants."""
    composed = _dp_events(entries)
    # dp-accounting logs a warning for each fractional RDP order its series does not converge
    # for, and leaves that order out; the bound stays valid, so keep the audit output readable.
    logging.getLogger("absl").setLevel(logging.ERROR)
    pld_acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    pld_acc.compose(composed)
    rdp_acc = rdp.RdpAccountant(orders=RDP_ORDERS)
    rdp_acc.compose(composed)
    integer_acc = rdp.RdpAccountant(orders=INTEGER_ORDERS)
    integer_acc.compose(composed)
    return {"dp_accounting_pld": float(pld_acc.get_epsilon(delta)), "dp_accounting_rdp": float(rdp_acc.get_epsilon(delta)),
            "dp_accounting_rdp_integer_orders": float(integer_acc.get_epsilon(delta))}


def opacus_epsilons(entries: list[dict[str, Any]], delta: float) -> dict[str, float]:
    history = [batch_of(e) for e in entries]
    return {**{f"opacus_{m}": SiteAccountant(m, history).epsilon(delta) for m in ("rdp", "prv")},
            "opacus_rdp_integer_orders": opacus_rdp_at(history, INTEGER_ORDERS, delta)}


def opacus_rdp_at(history, orders: list[float], delta: float) -> float:
    """Opacus' RDP epsilon of ``history`` (StepBatch list) over the given orders only."""
    import warnings

    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    total = sum(compute_rdp(q=b.sample_rate, noise_multiplier=b.noise_multiplier, steps=b.steps, orders=orders)
                for b in history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(get_privacy_spent(orders=orders, rdp=total, delta=delta)[0])


def audit_ledger(ledger: SiteLedger, keys_dir: Path | None = None) -> SiteAudit:
    """Verify one ledger (chain, signatures with the site's public key in ``keys_dir``) and recompute it."""
    report = SiteAudit(site=ledger.site)
    try:
        entries = ledger.verify()
    except LedgerError as err:
        report.problems.append(f"ledger broken or tampered with: {err}")
        return report
    if not entries:
        report.problems.append(f"{ledger.path}: the ledger is empty")
        return report
    for number, entry in enumerate(entries, start=1):
        try:
            LedgerEntry.from_record(entry)
        except TypeError as err:  # a field every writer sets is missing
            report.problems.append(f"{ledger.path}: entry {number} is not a ledger entry ({err})")
            return report
    _check_signatures(ledger, entries, keys_dir, report)
    report.rounds = [int(e["round"]) for e in entries if not is_release(e)]
    releases = [e for e in entries if is_release(e)]
    if releases:
        report.label_counts = {k: releases[0].get(k) for k in ("round", "noise_multiplier", "sensitivity", "noisy_label_counts")}
    deltas = {float(e["delta"]) for e in entries}
    if len(deltas) != 1:
        report.problems.append(f"entries use different deltas {sorted(deltas)}: one guarantee needs one delta")
    report.delta = delta = float(entries[-1]["delta"])
    report.budget_epsilon = entries[-1].get("budget_epsilon")
    report.reported_epsilon = float(entries[-1]["epsilon"])
    report.history = [
        {k: e.get(k) for k in ("round", "steps", "noise_multiplier", "sample_rate", "sampling", "max_grad_norm", "epsilon")}
        | ({"kind": LABEL_COUNTS} if is_release(e) else {})
        for e in entries
    ]
    _check_entries(entries, report)
    report.runs = runs_of(entries)
    report.epsilons = {**opacus_epsilons(entries, delta), **dp_accounting_epsilons(entries, delta)}
    _check_agreement(report)
    return report


def _check_signatures(ledger: SiteLedger, entries: list[dict[str, Any]], keys_dir: Path | None,
                      report: SiteAudit) -> None:
    """Every entry must verify under the site's own public key (``keys_dir/<site>.pub``)."""
    signed = [e for e in entries if "signature" in e]
    if not signed:
        report.signatures = "unsigned (written before ledgers were signed)"
        return
    key_path = None if keys_dir is None else keys_dir / f"{ledger.site}.pub"
    if key_path is None or not key_path.is_file():
        report.problems.append(f"{ledger.path}: entries are signed but there is no public key {key_path or ''} for "
                               f"{ledger.site}: pass --keys with the sites' registered public keys")
        return
    try:
        public = load_public_key(key_path)
    except SigningError as err:
        report.problems.append(str(err))
        return
    key_id = public_key_id(public)
    for number, entry in enumerate(entries, start=1):
        where = f"entry {number} (round {entry.get('round')})"
        if "signature" not in entry:
            report.problems.append(f"{ledger.site} {where}: not signed, in a ledger whose other entries are")
        elif entry.get("key_id") != key_id or not verify_signature(public, entry["hash"], entry["signature"]):
            report.problems.append(f"{ledger.site} {where}: the signature does not verify with {key_path} (written or "
                                   "re-signed by someone without the site's private key, or a ledger of another site)")
    if not report.problems:
        report.signatures = f"every entry verifies with {key_path}"


def runs_of(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs a site's ledger spans, in order: run id, config hash, entries, rounds, epsilon after."""
    runs: list[dict[str, Any]] = []
    for number, entry in enumerate(entries, start=1):
        key = (entry.get("run_id"), entry.get("config_hash"))
        if not runs or (runs[-1]["run_id"], runs[-1]["config_hash"]) != key:
            runs.append({"run_id": key[0], "config_hash": key[1], "first_entry": number, "entries": 0, "rounds": 0,
                         "epsilon_after": 0.0})
        runs[-1]["entries"] += 1
        runs[-1]["rounds"] += 0 if is_release(entry) else 1
        runs[-1]["epsilon_after"] = float(entry["epsilon"])
    return runs


def _check_entries(entries: list[dict[str, Any]], report: SiteAudit) -> None:
    accountant_names = {e.get("accountant") for e in entries}
    releases = 0
    for number, entry in enumerate(entries, start=1):
        if entry.get("site", report.site) != report.site:
            report.problems.append(f"{report.site} entry {number} (round {entry.get('round')}) was written by "
                                   f"{entry.get('site')}: a ledger copied from another site")
        unamplified = entry.get("sampling") == "no-amplification" and float(entry["sample_rate"]) == 1.0
        if entry.get("kind") not in KINDS:
            report.problems.append(f"entry {number} (round {entry['round']}): unknown kind {entry.get('kind')!r}")
        if is_release(entry):
            releases += 1
            if not unamplified or float(entry.get("sensitivity", 1.0)) != 1.0:
                report.problems.append(
                    f"entry {number} (round {entry['round']}): a label-count release is accounted as a Gaussian "
                    "mechanism without sampling (sample rate 1) on a sensitivity-1 histogram; this one is not"
                )
            if releases == 2:
                report.problems.append(f"entry {number} (round {entry['round']}): a second label-count release")
        elif entry.get("sampling") != "poisson" and not unamplified:
            report.problems.append(f"entry {number} (round {entry['round']}): sampling {entry.get('sampling')!r} is not Poisson")
        recomputed = recompute_reported(entries[:number], str(entry.get("accountant")), float(entry["delta"]))
        if abs(recomputed - float(entry["epsilon"])) > REPORTED_ABS_TOL:
            report.problems.append(
                f"entry {number} (round {entry['round']}): reported epsilon {entry['epsilon']:.6f} but its history "
                f"gives {recomputed:.6f} with {entry.get('accountant')}"
            )
        budget = entry.get("budget_epsilon")
        if budget is not None and float(entry["epsilon"]) > float(budget):
            report.problems.append(
                f"entry {number} (round {entry['round']}): epsilon {entry['epsilon']:.4f} exceeds the budget {budget}"
            )
    if len(accountant_names) != 1:
        report.problems.append(f"entries name different accountants {sorted(map(str, accountant_names))}")


def recompute_reported(entries: list[dict[str, Any]], accountant: str, delta: float) -> float:
    """Epsilon of ``entries`` with the accountant the ledger names."""
    if accountant == DP_ACCOUNTING_RDP:
        return dp_accounting_rdp_default_orders(entries, delta)
    return SiteAccountant(accountant, [batch_of(e) for e in entries]).epsilon(delta)


def _check_agreement(report: SiteAudit) -> None:
    eps = report.epsilons
    opacus_int, dp_int = eps["opacus_rdp_integer_orders"], eps["dp_accounting_rdp_integer_orders"]
    if abs(dp_int - opacus_int) / max(opacus_int, 1e-12) > INTEGER_RDP_RELATIVE_GAP:
        report.problems.append(
            f"RDP accountants disagree at integer orders 2-63 (but 11): Opacus {opacus_int:.8f} vs dp-accounting {dp_int:.8f}")
    diff = eps["opacus_prv"] - eps["dp_accounting_pld"]
    if not PRV_MINUS_PLD[0] - 1e-9 <= diff <= PRV_MINUS_PLD[1]:
        report.problems.append(
            f"PRV/PLD accountants disagree: Opacus PRV {eps['opacus_prv']:.6f} vs dp-accounting PLD {eps['dp_accounting_pld']:.6f}"
        )
    if report.reported_epsilon is not None and report.reported_epsilon < eps["dp_accounting_pld"] - 1e-9:
        report.problems.append(
            f"reported epsilon {report.reported_epsilon:.6f} is below the independent PLD value {eps['dp_accounting_pld']:.6f}"
        )
    if report.reported_epsilon is not None and report.reported_epsilon > opacus_int + REPORTED_ABS_TOL:
        report.problems.append(
            f"reported epsilon {report.reported_epsilon:.6f} is above the integer-order RDP bound {opacus_int:.6f}: "
            "no accountant fedfm uses gives more"
        )


def find_ledgers(path: str | Path) -> list[SiteLedger]:
    """Site ledgers in a run folder (``RUN_DIR/ledger/*.jsonl``) or in a ledger folder."""
    path = Path(path)
    folder = path / "ledger" if (path / "ledger").is_dir() else path
    return [SiteLedger(folder, p.stem) for p in sorted(folder.glob("*.jsonl"))]


def find_client_level_ledger(path: str | Path) -> SiteLedger | None:
    """The server's client-level DP ledger of a run (``RUN_DIR/ledger-federation/client-level.jsonl``)."""
    folder = Path(path) / "ledger-federation"
    return SiteLedger(folder, "client-level") if (folder / "client-level.jsonl").exists() else None


def audit_run(path: str | Path, canaries: int = 0, seed: int = 0, keys: str | Path | None = None,
              anchors: str | Path | None = None) -> list[SiteAudit]:
    """Audit every ledger under ``path``; with ``canaries`` > 0 also replay each site with canaries.

    ``keys`` is a folder of the sites' public keys (``<site>.pub``, e.g. those registered at the
    coordinator); default: ``keys/`` beside the ledgers (simulation). ``anchors`` is the folder of
    the coordinator's anchor log; default: the run's ``ledger-federation/`` when it has one."""
    if not Path(path).is_dir():
        what = "is a file" if Path(path).exists() else "does not exist"
        raise ConfigError(f"RUN_DIR {path} {what}: pass a run folder (with ledger/) or a folder of <site>.jsonl ledgers")
    ledgers = find_ledgers(path)
    federation = find_client_level_ledger(path)
    if not ledgers and federation is None:
        raise FileNotFoundError(f"no ledgers (*.jsonl) in {path} or {Path(path) / 'ledger'}")
    keys_dir = Path(keys) if keys is not None else default_keys_dir(Path(path), ledgers)
    audits = [audit_ledger(ledger, keys_dir) for ledger in ledgers]
    if canaries > 0:
        config = _run_config(Path(path))
        for audit, ledger in zip(audits, ledgers):
            if audit.reported_epsilon is not None:
                _add_empirical(audit, config, ledger, canaries, seed)
    if federation is not None:
        audits.append(audit_ledger(federation))
    cross_check_results(Path(path), audits)
    anchor_dir = Path(anchors) if anchors is not None else Path(path) / "ledger-federation"
    if anchors is not None or (anchor_dir / f"{ANCHOR_LOG}.jsonl").is_file():
        # a run folder must hold every anchored site's ledger; a site's own ledger folder only its own
        every_site = (Path(path) / "ledger").is_dir()
        cross_check_anchors(AnchorLog(anchor_dir, sign=False), ledgers, audits, keys_dir, every_site)
    return audits


def cross_check_anchors(log: AnchorLog, ledgers: list[SiteLedger], audits: list[SiteAudit],
                        keys_dir: Path | None, every_site: bool = True) -> None:
    """Each site's ledger against the heads the coordinator anchored for it (truncation, rollback,
    deleted, reordered or rewritten entries, a ledger of another site, heads not signed by the site)."""
    if not log.exists():
        missing = SiteAudit(site="coordinator")
        missing.problems.append(f"no anchor log {log.path}: pass --anchors with the coordinator's log folder")
        audits.append(missing)
        return
    heads, problems = verify_log(log)
    by_site = {a.site: a for a in audits}
    if problems:
        broken = SiteAudit(site="coordinator")
        broken.problems.extend(problems)
        audits.append(broken)
    ledger_of = {ledger.site: ledger for ledger in ledgers}
    for site in dict.fromkeys(head.site for _, head in heads):
        count = sum(1 for _, head in heads if head.site == site)
        audit = by_site.get(site)
        if site not in ledger_of and not every_site:
            continue  # another site's heads, in an audit of one site's ledger folder
        if audit is None or site not in ledger_of:
            audit = audit or SiteAudit(site=site)
            audit.problems.append(f"the coordinator anchored {count} heads of {site} ({log.path}), but {site} has no "
                                  "ledger: it was deleted or moved")
            if site not in by_site:
                audits.append(audit)
            continue
        try:
            entries = ledger_of[site].entries()
        except LedgerError as err:
            audit.problems.append(str(err))
            continue
        key_path = None if keys_dir is None else keys_dir / f"{site}.pub"
        public = None
        if key_path is not None and key_path.is_file():
            try:
                public = load_public_key(key_path)
            except SigningError:
                public = None  # already reported by the signature check
        found = check_ledger(site, entries, heads, public)
        audit.problems.extend(found)
        if not found:
            audit.anchors = f"contains all {count} heads the coordinator anchored ({log.path})"


def default_keys_dir(path: Path, ledgers: list[SiteLedger]) -> Path | None:
    """The public keys a run's signatures are checked with when ``--keys`` is not given: the
    simulation keys beside the ledgers, else the keys registered for a local deployment
    (``RUN_DIR/deployment/keys``, fedfm deploy local). A privacy officer passes ``--keys`` with the
    keys registered at the coordinator, not ones found next to the files being audited."""
    beside = ledgers[0].path.parent / KEYS_DIR if ledgers else None
    if beside is not None and beside.is_dir():
        return beside
    registered = path / "deployment" / "keys"
    return registered if registered.is_dir() else beside


def cross_check_results(run_dir: Path, audits: list[SiteAudit]) -> None:
    """Each site's ledger against what the coordinator recorded in ``results.json``: a ledger that
    ends below the epsilon the run reported for that site (or is missing) was truncated, rolled
    back, replaced or deleted. A ledger that ends above it is not flagged: a site may have trained
    a round whose reply never reached the coordinator."""
    path = run_dir / "results.json"
    if not path.is_file():
        return
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        return
    by_site = {a.site: a for a in audits}
    for name, site in (results.get("sites") or {}).items():
        trained, epsilon = int(site.get("rounds_trained") or 0), float(site.get("epsilon") or 0.0)
        if trained == 0 or epsilon == 0.0:
            continue  # never trained, or trained without DP-SGD: nothing to find in a ledger
        audit = by_site.get(name)
        if audit is None:
            missing = SiteAudit(site=name)
            missing.problems.append(f"{path} records {trained} rounds trained by {name} (epsilon {epsilon:.6f}), "
                                    f"but {name} has no ledger: it was deleted or moved")
            audits.append(missing)
            continue
        if audit.reported_epsilon is None:
            continue  # the ledger itself is broken: already reported
        if audit.reported_epsilon < epsilon - REPORTED_ABS_TOL:
            last = f"round {audit.rounds[-1]}" if audit.rounds else "no round"
            audit.problems.append(
                f"{path} records epsilon {epsilon:.6f} for {name} after {trained} rounds, but its ledger ends at "
                f"epsilon {audit.reported_epsilon:.6f} ({last}, {len(audit.rounds)} rounds): the ledger was truncated, "
                "rolled back or replaced")


def _run_config(run_dir: Path):
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"--canaries replays the sites' training: {run_dir / 'config.yaml'} is needed (pass a run folder)")
    return load_config(run_dir / "config.yaml")


def _add_empirical(audit: SiteAudit, config, ledger: SiteLedger, canaries: int, seed: int) -> None:
    site_id = protocol_site_id(ledger.site)
    rounds = [e for e in ledger.verify() if not is_release(e)]  # replay the DP-SGD rounds; the claim keeps the release
    if not rounds:
        return
    result = replay_with_canaries(config, site_id, rounds, canaries, seed=seed)
    audit.empirical = result.to_dict()
    if result.falsified:
        audit.problems.append(
            f"empirical lower bound {result.result.epsilon_lower_bound:.3f} (confidence "
            f"{1 - result.result.significance:.0%}, {canaries} canaries) exceeds the claimed epsilon "
            f"{result.claimed_epsilon:.3f}: the site adds less noise than its ledger accounts for"
        )


def write_audit(audits: list[SiteAudit], out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # --out names a folder; it is created if missing
    libraries = {"opacus": version("opacus"), "dp-accounting": version("dp-accounting")}
    payload = {
        "passed": all(a.passed for a in audits),
        "libraries": libraries,
        "sites": [dict(asdict(a), passed=a.passed) for a in audits],
    }
    json_path, md_path = out_dir / "audit.json", out_dir / "audit.md"
    json_path.write_text(json.dumps(payload, indent=2))
    md_path.write_text(audit_markdown(audits, libraries))
    return json_path, md_path


def audit_markdown(audits: list[SiteAudit], libraries: dict[str, str]) -> str:
    lines = ["# Privacy audit", "", f"Accountants: Opacus {libraries['opacus']}, dp-accounting {libraries['dp-accounting']}.", ""]
    for a in audits:
        lines += [f"## {a.site}: {'PASS' if a.passed else 'FAIL'}", ""]
        if a.reported_epsilon is not None and a.site == "client-level":
            last = a.history[-1]
            lines += [
                f"**Statement.** The global adapters released after rounds {a.rounds[0]}-{a.rounds[-1]} satisfy "
                f"({a.reported_epsilon:.3f}, {a.delta:g})-differential privacy with respect to adding or removing "
                "one whole hospital (all of its images), with the server trusted to clip and add the noise.",
                "",
                "- DP setting: client-level (DP-FedAvg: server-side fixed clipping of each site's update, Gaussian noise); the server is trusted.",
                "- Privacy unit and adjacency: one site; add/remove one.",
                f"- Accounting: Gaussian mechanism per round, noise multiplier {last['noise_multiplier']}, update "
                f"clipping norm {last['max_grad_norm']}, no amplification from site sampling, "
                f"{len(a.rounds)} releases, delta {a.delta:g}. With few hospitals this is expensive: say so.",
                "",
                "| method | epsilon |",
                "|---|---|",
                f"| reported (Flower RdpAccountant) | {a.reported_epsilon:.6f} |",
                *[f"| {name} | {value:.6f} |" for name, value in a.epsilons.items()],
                "",
            ]
        elif a.reported_epsilon is not None and a.rounds:
            last = [h for h in a.history if h.get("kind") != LABEL_COUNTS][-1]
            released = a.label_counts
            lines += [
                f"**Statement.** The adapter updates released by {a.site} over rounds {a.rounds[0]}-{a.rounds[-1]} "
                f"({len(a.rounds)} rounds trained) satisfy ({a.reported_epsilon:.3f}, {a.delta:g})-differential privacy "
                "with respect to adding or removing one training image of this site.",
                "",
                "- DP setting: sample-level DP-SGD run by the site itself; the server is not trusted with raw data.",
                "- Privacy unit and adjacency: one image; add/remove one.",
                "- Covered: every adapter update the site sent (and so the final adapter, by post-processing)"
                + (", and the noisy label counts its class weights come from." if released else "."),
                "- Not covered: metrics the site reports on private data (losses, validation and test metrics, "
                "test-set predictions when shared); a patient with several images is protected only per image.",
                f"- Accounting: Poisson sampling, noise multiplier {last['noise_multiplier']}, clipping norm "
                f"{last['max_grad_norm']}, sample rate {last['sample_rate']:.5f}, "
                f"{sum(h['steps'] for h in a.history if h.get('kind') != LABEL_COUNTS)} steps in {len(a.rounds)} "
                f"rounds, delta {a.delta:g}."
                + (f" Composed with one release of the train label counts (round {released['round']}): Gaussian "
                   f"mechanism, noise multiplier {released['noise_multiplier']} on a sensitivity-1 histogram, "
                   "no sampling." if released else ""),
                f"- Rounds trained: {', '.join(map(str, a.rounds))}; last trained in round {a.rounds[-1]}, "
                f"having spent epsilon {a.reported_epsilon:.3f} of its budget {a.budget_epsilon}.",
                f"- Signatures: {a.signatures or 'not checked'}. A valid signature proves the entry was written by "
                "the holder of the site's private key and not changed since; with the results.json cross-check it "
                "catches truncation, rollback and rewriting by anyone else. It does not prove the site added the "
                "noise it records: that is what the canary audit (--canaries) tests.",
                f"- Anchors: {a.anchors or 'not checked (no coordinator anchor log given)'}. Every head the site sent "
                "with a training reply is in the coordinator's signed log, so a ledger cut back, rolled back, reordered "
                "or rewritten after the fact (even by the site itself, with its own key) no longer contains it. "
                "Anchors cannot show rounds the site trained but never reported.",
                *(["- Runs on this ledger (lifetime budget): "
                   + "; ".join(f"run {r['run_id'] or '?'} (config {str(r['config_hash'] or '?')[:12]}): {r['rounds']} rounds, "
                               f"epsilon {r['epsilon_after']:.3f} after it" for r in a.runs)] if len(a.runs) > 1 else []),
                "",
                "| method | epsilon |",
                "|---|---|",
                f"| reported (ledger) | {a.reported_epsilon:.6f} |",
                *[f"| {name} | {value:.6f} |" for name, value in a.epsilons.items()],
                "",
            ]
        if a.empirical:
            r = a.empirical["result"]
            lines += [
                f"Empirical audit (one run, Steinke et al. 2023; {a.empirical['threat_model']}): "
                f"{r['correct']} of {r['guesses']} guesses right on {r['canaries']} canaries -> epsilon >= "
                f"{r['epsilon_lower_bound']:.3f} at {1 - r['significance']:.0%} confidence, beside the claimed "
                f"{a.empirical['claimed_epsilon']:.3f}. A sanity check of the implementation, not the true epsilon.",
                "",
            ]
        lines += [f"- problem: {p}" for p in a.problems] or ["- all checks passed"]
        lines.append("")
    return "\n".join(lines)
