#!/usr/bin/env bash
# The CUDA benchmark under a time limit: the sync and swap grid on the GPU, float32 and bfloat16,
# timed with CUDA events. Writes benchmarks/results_cuda.json (--quick: results_cuda_quick.json,
# git-ignored) after each dtype, then re-renders RESULTS.md with its section 5.
#
#   benchmarks/gpu_check.sh [--quick] [other bench_lookahead.py options]
#   BENCH_TIMEOUT=900 benchmarks/gpu_check.sh      # the limit in seconds (default 540)
set -euo pipefail
cd "$(dirname "$0")/.."
limit="${BENCH_TIMEOUT:-540}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lightning_lookahead, not an installed one

python - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda})")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
for name in ("lightning", "pytorch_optimizer", "torch_optimizer", "lightning_lookahead"):
    __import__(name)
PY
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv,noheader 2>/dev/null || true

echo "gpu_check: python benchmarks/bench_lookahead.py --device cuda $* (limit ${limit}s)"
status=0
timeout --signal=INT --kill-after=30 "$limit" python benchmarks/bench_lookahead.py --device cuda "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 130 ]; then
    echo "gpu_check: stopped at the ${limit}s limit; the dtypes finished before it are in benchmarks/results_cuda*.json" >&2
fi
exit "$status"
