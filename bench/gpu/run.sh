#!/usr/bin/env bash
# One device-machine call: build, run the GPU tests, run the GPU bench. Writes logs under $OUT.
#   bash bench/gpu/run.sh [tests|bench|all] [pytest -k expression for the tests]
set -uo pipefail
what=${1:-all}
kexpr=${2:-}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if ! python3 -c "import sparseops._C" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5
fi
if [[ $what == tests || $what == all ]]; then
  args=(tests/test_kernels_csr.py tests/test_kernels_nm.py tests/test_kernels_fewbit.py)
  [[ -n $kexpr ]] && args+=(-k "$kexpr")
  timeout 400 python3 -m pytest "${args[@]}" -q -p no:cacheprovider -n 8 --maxfail=30 -rf 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if [[ $what == bench || $what == all ]]; then
  timeout 300 python3 bench/ratio.py --suite gpu --save "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log" | tail -30
fi
