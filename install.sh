#!/usr/bin/env bash
# Install fedfm and everything it needs into ./.venv.
#
# torch is installed first and pinned for every later pip call, so no dependency can swap it
# for another build. On a machine without an NVIDIA GPU, set TORCH_INDEX_URL to a CPU wheel
# index to avoid the large CUDA build (e.g. the PyTorch CPU index); a local CPU wheel that pip
# already knows about is used as is.
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
.venv/bin/pip install -q -c .venv/constraints.txt -e ".[dev]"
echo "fedfm installed in .venv (torch ${installed}); run: .venv/bin/fedfm simulate"
