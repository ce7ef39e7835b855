#!/usr/bin/env bash
# Quality benchmark, size `medium`: the prepared script for one H200 GPU (target: under 10 minutes, models
# included: the medium demo world and the extra pairs are pretrained on the GPU first and cached).
#   bench/quality/medium.sh            # on the GPU machine
#   bench/quality/medium.sh --dry      # checks the whole plan on CPU with the tiny models (a few minutes)
# Extra arguments go to bench/quality/run.py (e.g. --out DIR, --workers N, --pairs main).
# Budget guard: the run is stopped after 570 s; finished runs are kept (result.json per run) and a rerun resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ "${1:-}" == "--dry" ]]; then
  shift
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  exec "$PY" bench/quality/run.py --size medium --dry --workers 2 "$@"
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'medium needs a CUDA GPU (use --dry on CPU)')"
export DS_ACCELERATOR=cuda
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec timeout --signal=INT 570 "$PY" bench/quality/run.py --size medium "$@"
