"""Turn Flower's flat run/node configuration (plain dicts) into an :class:`ExperimentConfig`.

``[tool.flwr.app.config]`` carries ``config`` (a YAML path, relative to the app folder),
``overrides`` (``section.key=value`` items separated by ``;``), ``config-json`` (a fully
resolved config, which wins when non-empty), ``out-dir`` and, in deployment, ``anchor-dir`` (the
coordinator's log of the sites' ledger heads). A site's node config may carry ``site-id``,
``data-path``, ``ledger-dir``, ``budget-epsilon``, ``signing-key`` (the private key that signs its
ledger) and ``heads-dir`` (where it keeps its last signed head); simulation supplies
``partition-id`` instead of ``site-id``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedfm.config import ConfigError, ExperimentConfig, load_config, validate_config

APP_DIR = Path(__file__).resolve().parent.parent

# A site's node config (set by its operator on the SuperNode: --node-config 'site-id=0 ...')
NODE_SITE_ID = "site-id"
NODE_PARTITION_ID = "partition-id"  # what Flower's simulation engine supplies instead
NODE_DATA_PATH = "data-path"
NODE_LEDGER_DIR = "ledger-dir"
NODE_BUDGET_EPSILON = "budget-epsilon"
NODE_SIGNING_KEY = "signing-key"
NODE_HEADS_DIR = "heads-dir"


def split_overrides(text: str) -> list[str]:
    return [item.strip() for item in text.split(";") if item.strip()]


def experiment_from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    resolved = str(run_config.get("config-json", "") or "")
    if resolved:
        return validate_config(json.loads(resolved))
    path = Path(str(run_config.get("config", "configs/quickstart.yaml")))
    if not path.is_absolute():
        path = APP_DIR / path
    return load_config(path, split_overrides(str(run_config.get("overrides", ""))))


def site_id_from_node_config(node_config: Mapping[str, Any]) -> int:
    for key in (NODE_SITE_ID, NODE_PARTITION_ID):
        if key in node_config:
            return int(node_config[key])
    raise ConfigError("node config has neither 'site-id' nor 'partition-id' (start the SuperNode with --node-config 'site-id=0')")


def apply_node_config(config: ExperimentConfig, node_config: Mapping[str, Any]) -> ExperimentConfig:
    """Per-site settings a hospital controls itself: its data path and its privacy budget."""
    raw = config.model_dump()
    if node_config.get(NODE_DATA_PATH):
        raw["data"]["path"] = str(node_config[NODE_DATA_PATH])
    if node_config.get(NODE_BUDGET_EPSILON):
        # the hospital's own budget overrides anything the coordinator's config says for it
        raw["privacy"]["budget"]["epsilon"] = float(node_config[NODE_BUDGET_EPSILON])
        raw["privacy"]["budget"]["sites"] = {}
    return validate_config(raw)


def ledger_dir(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> Path:
    if node_config.get(NODE_LEDGER_DIR):
        return Path(str(node_config[NODE_LEDGER_DIR]))
    if run_config.get("ledger-dir"):  # runs of one search share the sites' ledgers
        return Path(str(run_config["ledger-dir"]))
    return Path(str(run_config.get("out-dir") or "runs/flwr")) / "ledger"
