#!/usr/bin/env bash
# Create .venv with semalign_ds and everything it needs. Without a GPU it installs the CPU build of torch
# (never the multi-GB CUDA one); with one (nvidia-smi works) the CUDA build from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${SEMALIGN_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if nvidia-smi >/dev/null 2>&1; then
  .venv/bin/pip install -q "$TORCH_SPEC"
else
  # the CPU wheel index; --retries 0 so a machine that cannot reach it falls back to its own indexes at once
  .venv/bin/pip install -q --retries 0 "$TORCH_SPEC" --extra-index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/pip install -q -e ".[dev]"
# DeepSpeed JIT-compiles its shared-memory comm op on first use (~40 s on 2 cores): do it once, here, into this
# environment's own folder (.venv/torch_extensions/, or TORCH_EXTENSIONS_DIR if you set one), clearing a build
# lock a killed build left. No rendezvous, so no port: several setups on one host do not collide.
DS_ACCELERATOR=$(nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu) \
  .venv/bin/python -m semalign_ds.cluster.extensions
