#!/usr/bin/env bash
# One device-machine call: build, run the GPU tests, the GPU bench and the profiler. Logs go under $OUT.
#   bash bench/gpu/run.sh [tests|bench|profile|all] [pytest -k expression for the tests]
# Env: TEST_LIMIT / BENCH_LIMIT / PROFILE_LIMIT (seconds), BENCH_K (pytest -k for the bench).
# The tests run with one autotune config per kernel (SPARSEOPS_TRITON_AUTOTUNE=0): autotuning every
# odd test shape costs minutes; the bench autotunes.
set -uo pipefail
what=${1:-all}
kexpr=${2:-}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=${TRITON_PRINT_AUTOTUNING:-1}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if ! python3 -c "import sparseops._C" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
fi
if [[ $what == tests || $what == all ]]; then
  args=(tests/test_kernels_*.py $(ls tests/test_gpu*.py 2>/dev/null) tests/test_properties.py)
  [[ -n $kexpr ]] && args+=(-k "$kexpr")
  # 16 workers where pytest-xdist is installed (the device machines have it; the test extra does not)
  par=(); python3 -c "import xdist" 2>/dev/null && par=(-n 16)
  SPARSEOPS_TRITON_AUTOTUNE=0 timeout "${TEST_LIMIT:-300}" python3 -m pytest "${args[@]}" -v -p no:cacheprovider "${par[@]}" -rf \
    --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -60
fi
if [[ $what == bench || $what == all ]]; then
  export SPARSEOPS_GPU_RESULTS="$OUT/gpu.jsonl"
  timeout "${BENCH_LIMIT:-240}" python3 -m pytest bench/bench_gpu.py --benchmark-only -s -q -p no:cacheprovider -p no:xdist \
    ${BENCH_K:+-k "$BENCH_K"} --benchmark-json "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log" | grep -E "RESULT|Error|FAIL|assert" | tail -60
  [[ -s $OUT/gpu.jsonl ]] && python3 bench/ratio.py --suite gpu --json "$OUT/gpu.jsonl" | tail -${RATIO_TAIL:-40}
fi
if [[ $what == profile || $what == all ]]; then
  # faulthandler prints where the run is every 60 s: a slow profile says what it waits on
  timeout "${PROFILE_LIMIT:-150}" python3 -X faulthandler -c "import faulthandler, sys, runpy
faulthandler.dump_traceback_later(60, repeat=True)
sys.argv = ['sparseops'] + sys.argv[1:]
runpy.run_module('sparseops', run_name='__main__')" --device cuda --out "$OUT/profile" ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.log" | tail -40
fi
