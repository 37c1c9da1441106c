// see act_csr.h. one build for every cpu: the scatter is a gather-free scalar loop (avx2 has no
// scatter, and one row of M writes distinct outputs, so a vector gather / fma / scalar store pays
// nothing over it), so there is no isa variant.
#include "act_csr.h"
#include "act_union.h"
#include "scratch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace sparseops {
namespace {

constexpr int64_t PREFETCH_ROWS = 8;  // union rows of M fetched ahead of the scatter

// ptr must run from 0 to nnz without decreasing: then every row's segment lies inside col and val
bool ptr_valid(const int32_t* ptr, int64_t K, int64_t nnz) {
  if (ptr[0] != 0 || ptr[K] != nnz) return false;
  uint32_t bad = 0;
  for (int64_t j = 0; j < K; ++j) bad |= static_cast<uint32_t>(ptr[j + 1] < ptr[j]);
  return bad == 0;
}

// scatter a[t] * v[k] into o[c[k] - o0] for k in [0, n), checking each column on the way: it must lie in
// [o0, o0 + W) and exceed the one before (prev, updated). an entry that fails goes to the spare slot
// o[W] instead (never out of bounds) and sets the returned flag: the caller then writes no output.
// four entries a step, their loads first, so that the four read-modify-writes overlap
inline uint32_t scatter(const int32_t* c, const float* v, int64_t n, float a, float* o, int64_t o0, int64_t W,
                        int64_t& prev) {
  const uint32_t w = static_cast<uint32_t>(W);
  uint32_t bad = 0;
  int64_t k = 0;
  auto slot = [&](int64_t ck) {
    const uint32_t i = static_cast<uint32_t>(ck - o0);
    const uint32_t b = static_cast<uint32_t>(i >= w) | static_cast<uint32_t>(ck <= prev);
    bad |= b;
    prev = ck;
    return b ? w : i;
  };
  for (; k + 4 <= n; k += 4) {
    const uint32_t i0 = slot(c[k]), i1 = slot(c[k + 1]), i2 = slot(c[k + 2]), i3 = slot(c[k + 3]);
    const float v0 = v[k], v1 = v[k + 1], v2 = v[k + 2], v3 = v[k + 3];
    const float y0 = o[i0] + a * v0;
    o[i0] = y0;
    const float y1 = o[i1] + a * v1;
    o[i1] = y1;
    const float y2 = o[i2] + a * v2;
    o[i2] = y2;
    const float y3 = o[i3] + a * v3;
    o[i3] = y3;
  }
  for (; k < n; ++k) {
    const uint32_t i = slot(c[k]);
    o[i] += a * v[k];
  }
  return bad;
}

}  // namespace

int64_t act_csr_gemv(const float* x, int64_t T, int64_t K, int64_t ldx, ActSel sel, const int32_t* ptr,
                     const int32_t* col, const float* val, int64_t nnz, int64_t N, const float* bias, float* y,
                     int64_t ldy, int nthreads) {
  // the union and its values, [u][T]
  std::vector<int32_t> rows;
  std::vector<float> xs;
  act_union(x, T, K, ldx, sel, rows, xs);
  if (!ptr_valid(ptr, K, nnz)) return -1;
  const int64_t U = static_cast<int64_t>(rows.size());
  if (T == 0) return U;
  if (N == 0) {
    // no outputs: a union row must then be empty
    for (const int32_t j : rows)
      if (ptr[j + 1] != ptr[j]) return -1;
    return U;
  }
  int any_bad = 0;
  const int nt_req = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, N / 64 + 1)));
  // the threads' [T][W + 1] accumulators, one buffer allocated here (a failed allocation inside the region
  // would terminate the process): thread tid's at T (o0 + tid), disjoint for any team size up to nt_req
  const std::unique_ptr<float[]> accs = scratch_array<float>(static_cast<size_t>(T * (N + nt_req)));
#pragma omp parallel num_threads(nt_req)
  {
#if defined(_OPENMP)
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int tid = 0, nt = 1;
#endif
    const int64_t o0 = N * tid / nt, o1 = N * (tid + 1) / nt, W = o1 - o0;
    // [T][W + 1] accumulators (the last of each row a spare slot for a bad entry, see scatter): at one
    // row and two threads of a 11008-wide layer, 22 KB of l1
    float* acc = accs.get() + T * (o0 + tid);
    std::memset(acc, 0, sizeof(float) * static_cast<size_t>(T * (W + 1)));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < W; ++c) acc[t * (W + 1) + c] = bias ? bias[o0 + c] : 0.f;
    for (int64_t q = 0; q < U; ++q) {
      if (q + PREFETCH_ROWS < U) {
        // the walk jumps between rows of M, which no hardware prefetcher can guess, and this thread reads
        // a short part of each: fetch the part of the row PREFETCH_ROWS ahead, placed by assuming its
        // columns spread evenly (a guess: it only decides what is fetched early); hint 3, as act_gemv_t's
        const int32_t ja = rows[q + PREFETCH_ROWS];
        const int64_t s = ptr[ja], len = ptr[ja + 1] - s;
        const int64_t b0 = s + len * tid / nt, b1 = s + len * (tid + 1) / nt;
        for (int64_t b = b0; b < b1; b += 16) {
          __builtin_prefetch(col + b, 0, 3);
          __builtin_prefetch(val + b, 0, 3);
        }
      }
      const int32_t j = rows[q];
      const int32_t* cb = col + ptr[j];
      const int32_t* ce = col + ptr[j + 1];
      // this thread's part of the row: its columns ascend, so two binary searches find it. the parts of
      // the threads meet (each ends where the next begins, found by the same search), the first starts
      // at the row's start and the last ends at its end: checking each part's columns in the scatter
      // checks the whole row, in the pass that reads it. an inactive row is never read nor checked: a
      // hand-made index whose bad entries all sit in rows no input activates gives what a clean one gives
      const int32_t* lo = tid == 0 ? cb : std::lower_bound(cb, ce, static_cast<int32_t>(o0));
      // (hi searches the whole row, as the next thread's lo does: the two are equal even when a malformed
      // row is not sorted, so the parts still cover the row; a part that comes out reversed covers
      // nothing, and the entries between fall in both neighbours' parts, whose ranges one of them breaks)
      const int32_t* hi = tid == nt - 1 ? ce : std::lower_bound(cb, ce, static_cast<int32_t>(o1));
      const float* v = val + (lo - col);
      const int64_t n = hi - lo;
      const float* xq = xs.data() + q * T;
      uint32_t bad = 0;
      // every row of x, active or not (s(x) = 0): as the dense product of the union's rows, so that a
      // non-finite weight in a union row gives what the reference gives
      for (int64_t t = 0; t < T; ++t) {
        int64_t prev = o0 - 1;
        bad |= scatter(lo, v, n, xq[t], acc + t * (W + 1), o0, W, prev);
      }
      if (bad) {
        // nothing is scattered from here on, and no thread writes y
#pragma omp atomic write
        any_bad = 1;
        break;
      }
    }
#pragma omp barrier
    int bad;
#pragma omp atomic read
    bad = any_bad;
    if (!bad)
      for (int64_t t = 0; t < T; ++t) std::memcpy(y + t * ldy + o0, acc + t * (W + 1), sizeof(float) * W);
  }
  return any_bad ? -1 : U;
}

}  // namespace sparseops
