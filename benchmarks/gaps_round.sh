#!/usr/bin/env bash
# One device round of issues 22 and 25 (gaps on the GPU, a billion cells): install, check, time.
#
#   bash benchmarks/gaps_round.sh tests     # GPU tests of the gap paths, the graphed step, the memory plans (~2 min)
#   bash benchmarks/gaps_round.sh holes     # 128³ holes and clouds against as many scattered cells (~2 min)
#   bash benchmarks/gaps_round.sh gpytorch  # 128³ patterns against GPyTorch's fastest setting ($PATTERNS; ~30 s each,
#                                           # cell-noise patterns minutes)
#   bash benchmarks/gaps_round.sh holefit   # 128³ holes' short fits: rebuilds, CUDA-graph recordings, fit time (~4 min)
#   bash benchmarks/gaps_round.sh profile   # torch.profiler tables of the steady 128³ step ($PROFILE_PATTERNS; ~30 s)
#   bash benchmarks/gaps_round.sh scale     # 1024³ with 20 % missing (needs an H200: the plan is 112 GiB; ~3 min
#                                           # with --no-check-lml, ~7 min with the likelihood check: SCALE_CHECK=1)
#   several stages in one call: bash benchmarks/gaps_round.sh tests holes profile
#
# Logs and JSON go to $OUT (the device tool's output folder; else ./round_out); stdout gets the short end. Each stage
# has its own time limit (env: TESTS_T, HOLES_T, HOLEFIT_T, GPYTORCH_T, PROFILE_T, SCALE_T, seconds) so that one call of the
# device tool (600 s at most) can hold several.
set -u
out=${OUT:-./round_out}
mkdir -p "$out"
export KRONEGP_CACHE_DIR=${KRONEGP_CACHE_DIR:-/tmp/kronegp-cache} PYTHONPATH=.:benchmarks NCCL_NVLS_ENABLE=0
pip install --no-deps --no-build-isolation -e . -q > "$out/pip.log" 2>&1 || tail -3 "$out/pip.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
date -u
for stage in "${@:-tests}"; do
  case $stage in
  tests)
    timeout "${TESTS_T:-200}" python -m pytest -m cuda -q tests/test_gaps.py tests/test_frozen_two_level.py \
      tests/test_gridgp_graph.py tests/test_clouds.py tests/test_exact_missing_hole.py tests/test_cell_noise.py \
      tests/test_memory_plan.py > "$out/tests.log" 2>&1
    echo "tests rc=$?"; grep -E "passed|failed|FAILED" "$out/tests.log" | tail -n 12 | cut -c1-300 ;;
  holes)
    timeout "${HOLES_T:-200}" python benchmarks/gaps.py --holes --device cuda --n 128 --dtype float32 --no-jacobi \
      --hole-patterns ${HOLE_PATTERNS:-block-0.1 block-1 block-5 block-10 clouds-20} --out "$out/holes128.json" \
      > "$out/holes.log" 2>&1
    echo "holes rc=$?"; grep -E "hole |scatter " "$out/holes.log" | cut -c1-200 ;;
  gpytorch)
    timeout "${GPYTORCH_T:-300}" python benchmarks/gaps.py --device cuda --n 128 --dtype float32 --no-fit \
      --gpytorch-timeout 15 --patterns ${PATTERNS:-block-0.1 block-1 block-5 block-10 clouds-20} \
      --out "$out/gpytorch128.json" > "$out/gpytorch.log" 2>&1
    echo "gpytorch rc=$?"; grep -vE "^#|compiling" "$out/gpytorch.log" | cut -c1-250 ;;
  holefit)
    timeout "${HOLEFIT_T:-300}" python benchmarks/gaps.py --holes --device cuda --n 128 --dtype float32 --no-jacobi \
      --hole-fit --hole-patterns ${HOLE_PATTERNS:-block-10 clouds-20} --out "$out/holefit128.json" > "$out/holefit.log" 2>&1
    echo "holefit rc=$?"; grep -E "hole |scatter " "$out/holefit.log" | cut -c1-400 ;;
  profile)
    PROFILE_PATTERNS=${PROFILE_PATTERNS:-block-10 scatter-10} timeout "${PROFILE_T:-90}" python - > "$out/profile.log" 2>&1 <<'PY'
import json, os, statistics, time, warnings
import torch
from torch.profiler import ProfilerActivity, profile
import gaps
dev, n = torch.device("cuda"), 128
y, axes = gaps.draw(n, torch.float32, dev)
res = {}
for pat in os.environ["PROFILE_PATTERNS"].split():
    missing, noise = gaps.pattern(pat, n)
    gp = gaps.build(y, axes, missing, noise, path="cg")
    warnings.simplefilter("ignore")
    def step(graph):
        torch.cuda.synchronize(); t = time.perf_counter(); gp.loss_backward(cuda_graph=graph)
        torch.cuda.synchronize(); return time.perf_counter() - t
    for _ in range(2):
        step(False)
    eager = statistics.median(step(False) for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(False)
    step(None)  # records the graph
    graphed = statistics.median(step(None) for _ in range(3))
    extra = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in gp._last_extra.items()
             if isinstance(v, (int, float, str)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}
    res[pat] = dict(eager_s=eager, graphed_s=graphed, iterations=gp.last_solve.iterations, extra=extra)
    print(f"== {pat}: eager {eager * 1e3:.1f} ms graphed {graphed * 1e3:.1f} ms its {gp.last_solve.iterations} {extra}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22), flush=True)
    del gp
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "round_out"), "profile.json"), "w"), default=str)
PY
    echo "profile rc=$?"; grep -E "^==|Self CUDA time total" "$out/profile.log" | cut -c1-300 ;;
  scale)
    check=$([[ ${SCALE_CHECK:-0} == 1 ]] && echo "" || echo "--no-check-lml")
    timeout "${SCALE_T:-400}" python benchmarks/gp_training.py --device cuda --scale --scale-sizes \
      --scale-missing-sizes ${SCALE_SIZES:-1024} --scale-repeats 1 $check --out "$out/scale_missing.json" \
      > "$out/scale.log" 2>&1
    echo "scale rc=$?"; grep -v "^{" "$out/scale.log" | tail -n 12 | cut -c1-300 ;;
  *) echo "unknown stage $stage (tests, holes, holefit, gpytorch, profile, scale)"; exit 2 ;;
  esac
done
date -u
