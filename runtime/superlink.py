"""``python -m runtime.superlink [flower-superlink arguments]``: Flower's SuperLink, whose ServerApp
processes run as ``python -m runtime.serverapp`` (short waits for the sites' reply objects).

The SuperLink starts a SuperExec (``flower-superexec``) that starts one ServerApp process per run.
This launcher puts ``runtime/superexec.py`` first on the PATH as that SuperExec, without the
ClientApp template (a coordinator runs no ClientApp), and then runs the unmodified
``flower-superlink`` command. Only for Flower ``PATCHED_FLWR``; any other release runs as it is,
with a warning.
"""

from __future__ import annotations

import os
import sys
import warnings


def main() -> None:
    import flwr

    from runtime.superexec import PATCHED_FLWR, TEMPLATE_ENV, launcher_first_on_path

    if flwr.__version__ == PATCHED_FLWR:
        os.environ[TEMPLATE_ENV] = "0"
        launcher_first_on_path()
    else:
        warnings.warn(f"flwr {flwr.__version__} is not {PATCHED_FLWR}: the SuperLink's ServerApps keep Flower's own "
                      "waits", stacklevel=2)
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
