#!/usr/bin/env bash
# One device round of issue 24 (Kron-Matmul v2): install, check, time.
#
#   bash benchmarks/kron_matmul_round.sh check   # GPU tests: every precision mode, the fused
#                                                # tensor-core variant, the kernel suite (~4 min)
#   bash benchmarks/kron_matmul_round.sh bench   # benchmarks/kron_matmul.py, all cases, every
#                                                # mode, + the fused path on tensor cores (~4 min)
#   bash benchmarks/kron_matmul_round.sh all     # both, in one call
#
# Full logs and JSON go to $OUT (the device tool's output folder; else ./round_out); stdout gets
# the short end: test summaries and the benchmark's summary lines. Kernels compile once into
# $KRONEGP_CACHE_DIR (default /tmp/kronegp-cache), so a second call on a warm machine reuses them.
set -u
stage=${1:-all}
out=${OUT:-./round_out}
mkdir -p "$out"
export KRONEGP_CACHE_DIR=${KRONEGP_CACHE_DIR:-/tmp/kronegp-cache}
pip install --no-deps --no-build-isolation -e . -q > "$out/pip.log" 2>&1 || tail -5 "$out/pip.log"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u
if [[ $stage == check || $stage == all ]]; then
  # the kernel tests' specs (tests/test_cuda_compile.py's recorder) compiled in parallel first
  timeout 150 python - > "$out/precompile_tests.log" 2>&1 <<'PY'
import os, sys, torch
from concurrent.futures import ProcessPoolExecutor
sys.path.insert(0, "tests"); sys.path.insert(0, "benchmarks")
from test_cuda_compile import _used_specs
from kron_matmul import _compile_one
major, minor = torch.cuda.get_device_capability()
specs = _used_specs()
with ProcessPoolExecutor(max(1, (os.cpu_count() or 2) - 1)) as pool:
    print(sum(pool.map(_compile_one, [(s, f"sm_{major}{minor}") for s in specs])), "specs precompiled")
PY
  echo "precompile rc=$?"; tail -n 1 "$out/precompile_tests.log"
  timeout 240 python -m pytest -m cuda -q -x tests/test_precision.py > "$out/test_precision.log" 2>&1
  echo "test_precision rc=$?"; tail -n 12 "$out/test_precision.log"
  timeout 300 python -m pytest -m cuda -q tests/test_cuda_kernel.py tests/test_autotune.py \
    -k "not memcheck and not more_than_2_31" > "$out/test_cuda_kernel.log" 2>&1
  echo "test_cuda_kernel rc=$?"; tail -n 8 "$out/test_cuda_kernel.log"
fi
if [[ $stage == bench || $stage == all ]]; then
  timeout 560 python benchmarks/kron_matmul.py --reps 7 --paths fused_mma \
    --out "$out/kron_matmul_round13.json" > "$out/kron_matmul_round13.log" 2>&1
  echo "kron_matmul rc=$?"
  grep -E "^# (NVIDIA|copy|summary|failed|float|high_)|FAILED" "$out/kron_matmul_round13.log" | cut -c1-1200
  grep -vE "^#" "$out/kron_matmul_round13.log" | awk '{print}' | cut -c1-170 | tail -n 28
fi
