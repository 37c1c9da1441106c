#!/bin/bash
# A/B of two builds of bench/cpp/nm_kernels.cpp, alternated 10 times in separate processes:
#   bench/cpp/ab.sh OLD_CSRC NEW_CSRC N M OP     (env as nm_kernels.cpp: BB, KK, TR; REPS per process, 5)
# prints the median old and new best times and the median of the per-pair ratios old/new (> 1: new is faster).
set -euo pipefail
old=$1; new=$2; n=$3; m=$4; op=$5
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
flags="-O3 -fno-math-errno -mavx2 -mfma -mf16c -DSPARSEOPS_AVX2 -fopenmp"
g++ $flags -I"$old" "$here/nm_kernels.cpp" -o "$tmp/old"
g++ $flags -I"$new" "$here/nm_kernels.cpp" -o "$tmp/new"
a=(); b=()
for i in $(seq 1 10); do
  a+=("$("$tmp/old" "$n" "$m" "$op" "${REPS:-5}" | awk '{print $4}')")
  b+=("$("$tmp/new" "$n" "$m" "$op" "${REPS:-5}" | awk '{print $4}')")
done
python3 -c "
import statistics as s, sys
a = [float(x) for x in sys.argv[1].split()]; b = [float(x) for x in sys.argv[2].split()]
r = [x / y for x, y in zip(a, b)]
print('$n:$m $op B=${BB:-256}: old %.2f ms, new %.2f ms, old/new median %.3f (%.3f-%.3f)' % (s.median(a), s.median(b), s.median(r), min(r), max(r)))
" "${a[*]}" "${b[*]}"
rm -rf "$tmp"
