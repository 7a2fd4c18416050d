#!/usr/bin/env bash
# The one prepared GPU check (a lent device machine, one call): environment, tests/gpu, the GPU bench.
# Everything lands under $OUT (or ./gpu-out). Nothing is installed: the machine's own torch is used.
# Usage: bash bench/gpu_device.sh [TEST_SECONDS] [BENCH_SECONDS] [PROFILE_SECONDS]
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
t0=$(date +%s)
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, torch, accelerate; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'accelerate', accelerate.__version__, torch.cuda.get_device_name(0))"
  nproc; free -g | head -2
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout -k 10 "${1:-200}" python3 -m pytest tests/gpu -n 4 -p no:cacheprovider -ra --durations=0 -o addopts= \
  --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
echo "tests rc=$? after $(( $(date +%s) - t0 )) s"; tail -25 "$OUT/tests.log"
timeout -k 10 "${2:-300}" python3 -m bench --gpu >"$OUT/bench.log" 2>&1
echo "bench rc=$? after $(( $(date +%s) - t0 )) s"; tail -30 "$OUT/bench.log"
timeout -k 10 "${3:-90}" python3 -m bench.gpu_profile "$OUT" >"$OUT/profile.log" 2>&1
echo "profile rc=$? after $(( $(date +%s) - t0 )) s"; tail -4 "$OUT/profile.log"
cp bench/RESULTS_GPU.md bench/RESULTS_GPU.json "$OUT/" 2>/dev/null
nvidia-smi --query-gpu=temperature.gpu,clocks.sm --format=csv >>"$OUT/env.txt" 2>&1
true
