"""One round on the deployment runtime (3 local SuperNodes, TLS + authentication), taken apart.

- ``startup_s``: SuperLink up, 3 keys registered, 3 SuperNodes online;
- ``round_s``: the ServerApp's time to the end of round 1 (training and validation);
- ``compute_s``: the slowest site's local training time in that round (sites train in parallel);
- ``clientapp_startup_s``: the slowest site's ClientApp process start-up before its train handler ran
  (Flower 1.42 starts a fresh process per message: FAB install, imports of torch, peft and opacus);
- ``other_s``: round minus compute: that start-up, model building, message transfer over TLS,
  the validation messages (another process per site) and Flower's scheduling.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any


def deployment_round(sites: int = 3, image_size: int = 16) -> dict[str, Any]:
    from fedfm.config import load_config
    from fedfm.deploy.init import init_deployment
    from fedfm.deploy.local import LocalDeployment, site_node_config
    from fedfm.simulate import prepare_run_dir, write_run_config

    config = load_config(None, [f"data.num_sites={sites}", "federation.rounds=1", "data.samples_per_site=120",
                                f"data.image_size={image_size}", "train.batch_size=16", "eval.report=false"])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = prepare_run_dir(config, str(Path(tmp) / "run"))
        dep = init_deployment(run_dir / "deployment", sites=sites)
        started = time.time()
        with LocalDeployment(dep, run_dir / "deployment") as local:
            local.start_superlink()
            for site in range(sites):
                local.register(site)
                local.start_supernode(site, site_node_config(config, site, run_dir / "ledger"))
            local.wait_online(list(range(sites)))
            startup = time.time() - started
            run_started = time.time()
            code = local.run_app(write_run_config(config, run_dir), run_dir / "flwr.log")
            total = time.time() - run_started
        results = json.loads((run_dir / "results.json").read_text())
    if code != 0 or results["status"] != "complete":
        raise RuntimeError(f"deployment benchmark run failed (exit {code}, status {results['status']})")
    first = results["rounds"][0]
    compute = max(m["train-seconds"] for m in first["train"].values())
    clientapp_startup = max(m["process-age-s"] for m in first["train"].values())
    return {"sites": sites, "startup_s": startup, "round_s": first["elapsed_s"], "compute_s": compute,
            "clientapp_startup_s": clientapp_startup,
            "other_s": first["elapsed_s"] - compute, "run_total_s": total,
            "update_bytes": results["communication"]["update_bytes"]}
