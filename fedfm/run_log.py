"""What a user sees of a `flwr run`: its whole output in the run's log, fedfm's progress lines on screen."""

from __future__ import annotations

import subprocess
from pathlib import Path


def stream_run(command: list[str], env: dict[str, str], log_path: Path, verbose: bool) -> int:
    """Run ``command``, keep its full output in ``log_path``, echo progress lines."""
    done = False
    with open(log_path, "w") as log, subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if verbose or "ERROR" in line or "Traceback" in line:
                print(line.rstrip(), flush=True)
            elif "[fedfm]" in line:  # progress lines, without Flower's log prefix
                print("[fedfm]" + line.split("[fedfm]", 1)[1].rstrip(), flush=True)
            if "[fedfm] done:" in line or "[fedfm] paused after round" in line:
                done = True
        code = proc.wait()
    return 0 if done and code in (0, None) else code
