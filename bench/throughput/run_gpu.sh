#!/usr/bin/env bash
# One prepared GPU benchmark run (issue 6): install DeepSpeed and the dependencies the GPU image lacks from local
# wheels (no network there), then bench/throughput/gpu_bench.py. Fits one 8-minute device call.
#
#   bash bench/throughput/run_gpu.sh WHEEL_DIR [OUT_DIR] [gpu_bench.py options...]
#
# WHEEL_DIR holds deepspeed, hjson, pydantic, pydantic-core (cp312 manylinux), typing-inspection,
# annotated-types and typing-extensions wheels: DEVELOPERS.md, "GPU benchmark", says how to build them.
# OUT_DIR (default $OUT, else ./gpu_bench_out) receives gpu_bench.json and gpu_bench.log.
set -euo pipefail
WHEELS=${1:?usage: run_gpu.sh WHEEL_DIR [OUT_DIR] [gpu_bench.py options...]}
OUT_DIR=${2:-${OUT:-gpu_bench_out}}
shift $(( $# < 2 ? $# : 2 ))
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SITE=${SEMALIGN_SITE:-/tmp/semalign_site}
mkdir -p "$OUT_DIR"

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if (( ${#wheels[@]} )); then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} DS_BUILD_OPS=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

python3 - <<'EOF'
import deepspeed, torch, transformers, accelerate
print(f"deepspeed {deepspeed.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv || true
timeout 450 python3 "$REPO/bench/throughput/gpu_bench.py" --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
