// activation-sparse kernels, written once over a vector type V (see simd.h) and instantiated per ISA in
// act_avx2.cpp and act_portable.cpp.
//
// - gemv (1 to ~32 rows): one serial pass over x builds the union of the rows' active inputs and packs
//   their values [nnz][T]. the output columns are split between the threads (no reduction, no atomics);
//   each thread sweeps its columns in tiles of OT, accumulating [T][OT] in an l1 buffer, and for every
//   input in the union streams the OT contiguous weights of that input's row of wt once, for all rows.
//   rows of wt outside the union are never touched; the next rows are prefetched, since the hardware
//   cannot guess where a sparse walk jumps.
// - spmm (any batch): s(x) as CSR rows (two parallel passes: count, fill), then C [R, N] = A_csr @ D
//   with the rows of A split between the threads by nonzeros. each thread walks its rows in 64-column
//   strips of C held in 8 registers, and within a strip in chunks of KC rows of D, so that the [KC, 64]
//   panel of D the rows gather from stays in l2 while every row of the thread passes over it (a
//   cursor per row remembers where its sorted indices left off).
// - dsd: the same walk, but each active (b, j) reduces dy's strip against wt's strip (sampled dense-dense):
//   eight nonzeros at a time, reduced with one horizontal 8x8 sum, accumulated over the strips.
// - sdd: dwt = s(x)ᵀ @ dy is the spmm above on s(x)'s transpose (CSR of columns, by a counting sort).
// everything sits in an unnamed namespace, so the avx2 and portable translation units keep their own
// copies (no inline function compiled with -mavx2 can be merged into the portable path).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "act.h"
#include "act_union.h"
#include "simd.h"

namespace sparseops {
namespace {

constexpr int64_t KC = 256;  // rows of D per panel: 256 x 64 x 4 B = 64 KB, an l2-resident panel
constexpr int STRIP = 8;     // vectors per strip of C (64 floats)
constexpr int64_t PREFETCH = 4;  // rows of wt the gemv prefetches ahead

inline int act_tid() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int act_nt() {
#if defined(_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}


// s(x) as CSR rows: ptr [B+1], idx, val
struct ActCSR {
  std::vector<int64_t> ptr;
  std::vector<int32_t> idx;
  std::vector<float> val;
};

void act_csr(const float* x, int64_t B, int64_t K, int64_t ldx, const ActSel& sel, ActCSR& c, int nthreads) {
  c.ptr.assign(static_cast<size_t>(B + 1), 0);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * ldx;
    int64_t n = 0;
    for (int64_t j = 0; j < K; ++j) n += act_active(xr[j], act_thr(sel, j), sel.relu);
    c.ptr[b + 1] = n;
  }
  for (int64_t b = 0; b < B; ++b) c.ptr[b + 1] += c.ptr[b];
  c.idx.resize(static_cast<size_t>(std::max<int64_t>(1, c.ptr[B])));
  c.val.resize(c.idx.size());
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * ldx;
    int64_t p = c.ptr[b];
    for (int64_t j = 0; j < K; ++j) {
      if (act_active(xr[j], act_thr(sel, j), sel.relu)) {
        c.idx[p] = static_cast<int32_t>(j);
        c.val[p++] = xr[j];
      }
    }
  }
}

// the transpose of a CSR [R, K] (sorted columns) as CSR [K, R] (sorted rows), by a counting sort
void act_transpose(const ActCSR& a, int64_t R, int64_t K, ActCSR& t) {
  const int64_t nnz = a.ptr[R];
  t.ptr.assign(static_cast<size_t>(K + 1), 0);
  for (int64_t p = 0; p < nnz; ++p) ++t.ptr[a.idx[p] + 1];
  for (int64_t j = 0; j < K; ++j) t.ptr[j + 1] += t.ptr[j];
  t.idx.resize(static_cast<size_t>(std::max<int64_t>(1, nnz)));
  t.val.resize(t.idx.size());
  std::vector<int64_t> next(t.ptr.begin(), t.ptr.end() - 1);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t p = a.ptr[r]; p < a.ptr[r + 1]; ++p) {
      const int64_t q = next[a.idx[p]]++;
      t.idx[q] = static_cast<int32_t>(r);
      t.val[q] = a.val[p];
    }
}

// the same nonzeros regrouped panel by panel: chunk c (columns [c KC, c KC + KC)) of row r is
// [ptr[c R + r], ptr[c R + r + 1]). a kernel that sweeps the rows once per panel then reads idx and val
// front to back; walking the row-major CSR instead jumps between R far-apart places per panel, which
// no prefetcher follows (NOTE: 256 x 16384 at 10%, 1 thread: a cache miss per row and panel, and about
// twice the time of the inner loop itself)
struct ActChunks {
  int64_t R = 0, nch = 1;
  std::vector<int64_t> ptr;
  std::vector<int32_t> idx;
  std::vector<float> val;
};

void act_chunk(const ActCSR& a, int64_t R, int64_t K, ActChunks& ch, int nthreads) {
  ch.R = R;
  ch.nch = std::max<int64_t>(1, (K + KC - 1) / KC);
  const int64_t n = ch.nch * R;
  ch.ptr.assign(static_cast<size_t>(n + 1), 0);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t r = 0; r < R; ++r)
    for (int64_t p = a.ptr[r]; p < a.ptr[r + 1]; ++p) ++ch.ptr[(a.idx[p] / KC) * R + r + 1];
  for (int64_t i = 0; i < n; ++i) ch.ptr[i + 1] += ch.ptr[i];
  ch.idx.resize(a.idx.size());
  ch.val.resize(a.val.size());
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t r = 0; r < R; ++r) {
    int64_t c = -1, q = 0;
    for (int64_t p = a.ptr[r]; p < a.ptr[r + 1]; ++p) {
      if (a.idx[p] / KC != c) {
        c = a.idx[p] / KC;
        q = ch.ptr[c * R + r];
      }
      ch.idx[q] = a.idx[p];
      ch.val[q++] = a.val[p];
    }
  }
}

// rows [r0, r1) of thread tid of nt, balancing nonzeros plus a per-row cost (a row's strip is written
// even when it is empty)
inline void act_rows(const std::vector<int64_t>& ptr, int64_t R, int64_t row_cost, int tid, int nt, int64_t* r0,
                     int64_t* r1) {
  const int64_t total = ptr[R] + row_cost * R;
  auto cut = [&](int k) -> int64_t {
    if (k <= 0) return 0;
    if (k >= nt) return R;
    const int64_t target = total * k / nt;
    int64_t lo = 0, hi = R;  // first r with cost(r) >= target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (ptr[mid] + row_cost * mid < target)
        lo = mid + 1;
      else
        hi = mid;
    }
    return lo;
  };
  *r0 = cut(tid);
  *r1 = cut(tid + 1);
}

// per-thread buffers: the packed panel of D, the strip of C while it accumulates over panels, cursors
struct ActWork {
  std::vector<float> panel, cbuf;
};

// a 64-byte aligned pointer into v (sized n + 16 floats)
inline float* act_aligned(std::vector<float>& v, size_t n) {
  v.resize(n + 16);
  const uintptr_t a = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<float*>((a + 63) & ~static_cast<uintptr_t>(63));
}

// rows [k0, k1) x columns [c0, c0 + w) of D (row stride ldd) -> p [k1 - k0][w], contiguous. the rows of
// D are often a multiple of 4 KB apart, which puts a panel read in place into a handful of cache sets
// (NOTE: 256 x 16384 @ 16384 x 4096 at 10%, 1 thread: 315 ms reading the panel in place, 246 ms packed;
// the panel-major index of ActChunks then took it to 137 ms)
inline void act_pack(const float* D, int64_t ldd, int64_t k0, int64_t k1, int64_t c0, int w, float* p) {
  for (int64_t k = k0; k < k1; ++k) std::memcpy(p + (k - k0) * w, D + k * ldd + c0, sizeof(float) * w);
}

// ---- spmm: C[r, c0 : c0 + 8 NV] = bias + sum_p val[p] * D[idx[p], c0 : ...] for r in [r0, r1) ----

// on NL vectors of L (V, or V::W16 on the 16-lane path) a strip row
template <class L, int NL>
void spmm_strip_lanes(const ActChunks& a, int64_t r0, int64_t r1, int64_t K, const float* D, int64_t ldd, int64_t c0,
                      const float* bias, float* C, int64_t ldc, ActWork& ws, const float* packed) {
  using reg = typename L::reg;
  constexpr int LN = L::lanes;
  constexpr int W = LN * NL;
  const bool single = K <= KC;  // one panel: the accumulators go straight to C
  const int64_t nr = r1 - r0;
  // packed: the whole [K, W] panel, already packed by the caller (single-panel products only)
  float* pbuf = packed ? nullptr : act_aligned(ws.panel, static_cast<size_t>(std::min(K, KC) * W));
  reg bv[NL];
  for (int v = 0; v < NL; ++v) bv[v] = bias ? L::load(bias + c0 + LN * v) : L::zero();
  float* cb = nullptr;
  if (!single) {
    cb = act_aligned(ws.cbuf, static_cast<size_t>(nr * W));
    for (int64_t i = 0; i < nr; ++i)
      for (int v = 0; v < NL; ++v) L::store(cb + i * W + LN * v, bv[v]);
  }
  const int32_t* idx = a.idx.data();
  const float* val = a.val.data();
  for (int64_t c = 0; c < a.nch; ++c) {
    const int64_t k0 = c * KC, k1 = std::min(K, k0 + KC);
    if (!packed) act_pack(D, ldd, k0, k1, c0, W, pbuf);
    const float* panel = packed ? packed : pbuf - k0 * W;
    const int64_t* cp = a.ptr.data() + c * a.R;
    for (int64_t r = r0; r < r1; ++r) {
      int64_t p = cp[r];
      const int64_t pe = cp[r + 1];
      if (p == pe && !single) continue;
      float* out = single ? C + r * ldc + c0 : cb + (r - r0) * W;
      reg acc[NL];
      for (int v = 0; v < NL; ++v) acc[v] = single ? bv[v] : L::load(out + LN * v);
      for (; p < pe; ++p) {
        const reg sv = L::bcast(val[p]);
        const float* d = panel + static_cast<int64_t>(idx[p]) * W;
        for (int v = 0; v < NL; ++v) acc[v] = L::fma(sv, L::load(d + LN * v), acc[v]);
      }
      for (int v = 0; v < NL; ++v) L::store(out + LN * v, acc[v]);
    }
  }
  if (!single)
    for (int64_t r = r0; r < r1; ++r) std::memcpy(C + r * ldc + c0, cb + (r - r0) * W, sizeof(float) * W);
}

template <class V, int NV>
void spmm_strip(const ActChunks& a, int64_t r0, int64_t r1, int64_t K, const float* D, int64_t ldd, int64_t c0,
                const float* bias, float* C, int64_t ldc, ActWork& ws, const float* packed) {
  if constexpr (V::wide && NV % 2 == 0)
    spmm_strip_lanes<typename V::W16, NV / 2>(a, r0, r1, K, D, ldd, c0, bias, C, ldc, ws, packed);
  else
    spmm_strip_lanes<V, NV>(a, r0, r1, K, D, ldd, c0, bias, C, ldc, ws, packed);
}

template <class V>
void spmm_strip_n(int nv, const ActChunks& a, int64_t r0, int64_t r1, int64_t K, const float* D, int64_t ldd,
                  int64_t c0, const float* bias, float* C, int64_t ldc, ActWork& ws, const float* packed) {
  switch (nv) {
    case 8: return spmm_strip<V, 8>(a, r0, r1, K, D, ldd, c0, bias, C, ldc, ws, packed);
    case 7: return spmm_strip<V, 7>(a, r0, r1, K, D, ldd, c0, bias, C, ldc, ws, packed);
    case 6: return spmm_strip<V, 6>(a, r0, r1, K, D, ldd, c0, bias, C, ldc, ws, packed);
    case 5: return spmm_strip<V, 5>(a, r0, r1, K, D, ldd, c0, bias, C, ldc, ws, packed);
    case 4: return spmm_strip<V, 4>(a, r0, r1, K, D, ldd, c0, bias, C, ldc, ws, packed);
    case 3: return spmm_strip<V, 3>(a, r0, r1, K, D, ldd, c0, bias, C, ldc, ws, packed);
    case 2: return spmm_strip<V, 2>(a, r0, r1, K, D, ldd, c0, bias, C, ldc, ws, packed);
    default: return spmm_strip<V, 1>(a, r0, r1, K, D, ldd, c0, bias, C, ldc, ws, packed);
  }
}

// the last N % 8 columns, scalar
inline void spmm_tail(const ActCSR& a, int64_t r0, int64_t r1, const float* D, int64_t ldd, int64_t c0, int64_t N,
                      const float* bias, float* C, int64_t ldc) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = c0; c < N; ++c) {
      float s = bias ? bias[c] : 0.f;
      for (int64_t p = a.ptr[r]; p < a.ptr[r + 1]; ++p) s += a.val[p] * D[static_cast<int64_t>(a.idx[p]) * ldd + c];
      C[r * ldc + c] = s;
    }
}

// the threads split the strips when D spans several panels, there are enough strips and every row's
// strip fits a small buffer (D, the big operand then, is read once in all); else they split the rows
// by nonzeros, and each writes whole rows of C (NOTE: dwt [16384, 4096] split by strips took 3x as
// long with 2 threads as with 1: both threads first-touch every page of the fresh output).
// a product whose D is one panel (the weight gradient: K is the batch) packs all of D once, and walks
// its rows in blocks of RB, every strip of a block before the next: the block's rows of C are written
// front to back, a few pages at a time, not 256 bytes of every row of C per strip
// NOTE: dwt [16384, 4096] from a batch of 256, 2 threads: strip-major 175 ms
template <class V>
void spmm(const ActCSR& a, int64_t R, int64_t K, const float* D, int64_t N, int64_t ldd, const float* bias, float* C,
          int64_t ldc, int nthreads) {
  ActChunks ch;
  act_chunk(a, R, K, ch, nthreads);
  const int64_t N8 = N / 8 * 8;
  const int64_t W = 8 * STRIP, nstrips = (N8 + W - 1) / W;
  const bool by_strip = nstrips >= 4 * nthreads && K > KC && R * W * 4 <= (256 << 10);
  const bool single = K <= KC && !by_strip;
  std::vector<float> all;
  float* packed = nullptr;
  if (single && nstrips > 0) {
    // strip s at packed + s K W, rows (8 nv floats) contiguous
    packed = act_aligned(all, static_cast<size_t>(std::max<int64_t>(1, nstrips * K * W)));
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t s = 0; s < nstrips; ++s) {
      const int64_t c0 = s * W;
      const int w = static_cast<int>(std::min<int64_t>(W, N8 - c0));
      act_pack(D, ldd, 0, K, c0, w, packed + s * K * W);
    }
  }
  constexpr int64_t RB = 256;
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = act_tid(), nt = act_nt();
    int64_t r0 = 0, r1 = R, s0 = 0, s1 = nstrips;
    if (by_strip) {
      s0 = nstrips * tid / nt;
      s1 = nstrips * (tid + 1) / nt;
    } else {
      act_rows(a.ptr, R, 8, tid, nt, &r0, &r1);
    }
    ActWork ws;
    if (single) {
      for (int64_t b0 = r0; b0 < r1; b0 += RB) {
        const int64_t b1 = std::min(r1, b0 + RB);
        for (int64_t s = 0; s < nstrips; ++s) {
          const int64_t c0 = s * W;
          const int nv = static_cast<int>(std::min<int64_t>(STRIP, (N8 - c0) / 8));
          spmm_strip_n<V>(nv, ch, b0, b1, K, D, ldd, c0, bias, C, ldc, ws, packed + s * K * W);
        }
        if (N8 < N) spmm_tail(a, b0, b1, D, ldd, N8, N, bias, C, ldc);
      }
    } else {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t c0 = s * W;
        const int nv = static_cast<int>(std::min<int64_t>(STRIP, (N8 - c0) / 8));
        spmm_strip_n<V>(nv, ch, r0, r1, K, D, ldd, c0, bias, C, ldc, ws, nullptr);
      }
      if (N8 < N && (!by_strip || tid == nt - 1)) spmm_tail(a, r0, r1, D, ldd, N8, N, bias, C, ldc);
    }
  }
}

// ---- dsd: out[p] += <P[r, c0 : c0 + 8 NV], Q[idx[p], c0 : ...]> for the nonzeros of rows [r0, r1) ----

// on NL vectors of L (V, or V::W16 on the 16-lane path) a strip row; each partial dot product folded to
// 8 lanes for V::hsum8
template <class V, class L, int NL>
void sddmm_strip_lanes(const ActChunks& a, int64_t r0, int64_t r1, int64_t K, const float* P, int64_t ldp,
                       const float* Q, int64_t ldq, int64_t c0, float* out, ActWork& ws) {
  using reg = typename L::reg;
  constexpr int LN = L::lanes;
  constexpr int W = LN * NL;
  float* pbuf = act_aligned(ws.panel, static_cast<size_t>(std::min(K, KC) * W));
  for (int64_t c = 0; c < a.nch; ++c) {
    const int64_t k0 = c * KC, k1 = std::min(K, k0 + KC);
    act_pack(Q, ldq, k0, k1, c0, W, pbuf);
    const float* panel = pbuf - k0 * W;
    const int64_t* cp = a.ptr.data() + c * a.R;
    for (int64_t r = r0; r < r1; ++r) {
      int64_t p = cp[r];
      const int64_t q = cp[r + 1];
      if (p == q) continue;
      reg pv[NL];
      for (int v = 0; v < NL; ++v) pv[v] = L::load(P + r * ldp + c0 + LN * v);
      // eight nonzeros at a time: eight partial vectors, one horizontal sum
      for (; p < q; p += 8) {
        const int g = static_cast<int>(std::min<int64_t>(8, q - p));
        typename V::reg part[8];
        for (int i = 0; i < 8; ++i) {
          if (i < g) {
            const float* d = panel + static_cast<int64_t>(a.idx[p + i]) * W;
            reg s0 = L::mul(pv[0], L::load(d));
            reg s1 = NL > 1 ? L::mul(pv[1], L::load(d + LN)) : L::zero();
            for (int v = 2; v + 1 < NL; v += 2) {
              s0 = L::fma(pv[v], L::load(d + LN * v), s0);
              s1 = L::fma(pv[v + 1], L::load(d + LN * v + LN), s1);
            }
            if (NL > 2 && NL % 2) s0 = L::fma(pv[NL - 1], L::load(d + LN * (NL - 1)), s0);
            part[i] = L::fold(L::add(s0, s1));
          } else {
            part[i] = V::zero();
          }
        }
        alignas(32) float h[8];
        V::store(h, V::hsum8(part));
        for (int i = 0; i < g; ++i) out[p + i] += h[i];
      }
    }
  }
}

template <class V, int NV>
void sddmm_strip(const ActChunks& a, int64_t r0, int64_t r1, int64_t K, const float* P, int64_t ldp, const float* Q,
                 int64_t ldq, int64_t c0, float* out, ActWork& ws) {
  if constexpr (V::wide && NV % 2 == 0)
    sddmm_strip_lanes<V, typename V::W16, NV / 2>(a, r0, r1, K, P, ldp, Q, ldq, c0, out, ws);
  else
    sddmm_strip_lanes<V, V, NV>(a, r0, r1, K, P, ldp, Q, ldq, c0, out, ws);
}

template <class V>
void sddmm_strip_n(int nv, const ActChunks& a, int64_t r0, int64_t r1, int64_t K, const float* P, int64_t ldp,
                   const float* Q, int64_t ldq, int64_t c0, float* out, ActWork& ws) {
  switch (nv) {
    case 8: return sddmm_strip<V, 8>(a, r0, r1, K, P, ldp, Q, ldq, c0, out, ws);
    case 7: return sddmm_strip<V, 7>(a, r0, r1, K, P, ldp, Q, ldq, c0, out, ws);
    case 6: return sddmm_strip<V, 6>(a, r0, r1, K, P, ldp, Q, ldq, c0, out, ws);
    case 5: return sddmm_strip<V, 5>(a, r0, r1, K, P, ldp, Q, ldq, c0, out, ws);
    case 4: return sddmm_strip<V, 4>(a, r0, r1, K, P, ldp, Q, ldq, c0, out, ws);
    case 3: return sddmm_strip<V, 3>(a, r0, r1, K, P, ldp, Q, ldq, c0, out, ws);
    case 2: return sddmm_strip<V, 2>(a, r0, r1, K, P, ldp, Q, ldq, c0, out, ws);
    default: return sddmm_strip<V, 1>(a, r0, r1, K, P, ldp, Q, ldq, c0, out, ws);
  }
}

// ---- entry points ----

template <class V, int WD = 0>
int64_t act_gemv_t(const float* x, int64_t T, int64_t K, int64_t ldx, ActSel sel,
                   const typename WLoad<V, WD>::T* wt, int64_t N, const float* bias, float* y, int64_t ldy,
                   int nthreads) {
  using reg = typename V::reg;
  using WL = WLoad<V, WD>;
  using WT = typename WL::T;
  // the union and its values, [nnz][T]
  std::vector<int32_t> idx;
  std::vector<float> xs;
  act_union(x, T, K, ldx, sel, idx, xs);
  const int64_t nnz = static_cast<int64_t>(idx.size());
  // [T][OT] accumulators in 8 KB of l1 (OT = 2048 for one or two rows: 8 KB segments of a row of wt)
  const int64_t OT = std::max<int64_t>(64, std::min<int64_t>(2048, 2048 / std::max<int64_t>(1, T) / 8 * 8));
  const int64_t N8 = N / 8 * 8;
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = act_tid(), nt = act_nt();
    // whole vectors per thread; the scalar tail goes to the last thread
    const int64_t nvec = N8 / 8;
    const int64_t c_begin = nvec * tid / nt * 8, c_end = tid == nt - 1 ? N : nvec * (tid + 1) / nt * 8;
    std::vector<float> acc(static_cast<size_t>(T * OT + 8));
    for (int64_t c0 = c_begin; c0 < c_end; c0 += OT) {
      const int64_t w = std::min(OT, c_end - c0);
      const int64_t w8 = std::min(w, std::max<int64_t>(0, N8 - c0)) / 8 * 8;
      const int64_t lines = (w * static_cast<int64_t>(sizeof(WT)) + 63) / 64;  // 64-byte lines of one tile row of wt
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < w; ++c) acc[t * OT + c] = bias ? bias[c0 + c] : 0.f;
      // one row of x (decode): four rows of wt per pass over the accumulators, so each accumulator load and
      // store serves four fmas, and four streams of wt are in flight
      int64_t q0 = 0;
      if (T == 1) {
        for (; q0 + 8 <= nnz; q0 += 8) {
          // no software prefetch here: eight row segments of 8 KB (fp32; 4 KB in bf16) in flight are streams the hardware
          // prefetchers follow, and a prefetch per line cost more than it hid. Xeon (AVX-512, 2 threads,
          // 4096->11008 and back, bench/ratio.py --suite act): dense/sparse at 50 / 70 / 90% went from
          // 1.39-1.48 / 2.24-2.27 / 5.93-6.17 with prefetches of the next rows to 1.61-1.74 / 2.50-2.83 /
          // 6.35-7.61 without (one run before, three after). The two-row loop below keeps its prefetches: without them
          // 8 rows of x ran 0.82-0.90x dense, against 1.00-1.08x with them
          const WT* wr[8];
          for (int r = 0; r < 8; ++r) wr[r] = wt + static_cast<int64_t>(idx[q0 + r]) * N + c0;
          const float* xq = xs.data() + q0;
          const reg a0 = V::bcast(xq[0]), a1 = V::bcast(xq[1]), a2 = V::bcast(xq[2]), a3 = V::bcast(xq[3]);
          const reg a4 = V::bcast(xq[4]), a5 = V::bcast(xq[5]), a6 = V::bcast(xq[6]), a7 = V::bcast(xq[7]);
          float* o = acc.data();
          for (int64_t c = 0; c < w8; c += 8) {
            reg r = V::fma(a0, WL::load(wr[0] + c), V::load(o + c));
            r = V::fma(a1, WL::load(wr[1] + c), r);
            r = V::fma(a2, WL::load(wr[2] + c), r);
            r = V::fma(a3, WL::load(wr[3] + c), r);
            r = V::fma(a4, WL::load(wr[4] + c), r);
            r = V::fma(a5, WL::load(wr[5] + c), r);
            r = V::fma(a6, WL::load(wr[6] + c), r);
            V::store(o + c, V::fma(a7, WL::load(wr[7] + c), r));
          }
          for (int64_t c = w8; c < w; ++c) {
            float v = o[c];
            for (int r = 0; r < 8; ++r) v += xq[r] * WL::one(wr[r][c]);
            o[c] = v;
          }
        }
      }
      // two rows of wt per pass over the accumulators, so each accumulator load and store serves two fmas
      for (int64_t q = q0; q < nnz; q += 2) {
        const bool two = q + 1 < nnz;
        // the walk jumps between rows, which no hardware prefetcher can guess: fetch the rows
        // PREFETCH ahead (NOTE: 4096->11008, B=1, 2 threads: distance 4 beat 0, 1 and 2)
        // into every level (hint 3): a non-temporal hint (0) left them in L1 only on Intel (Xeon, AVX-512), where
        // they were evicted before use and read from memory again: 3.4x slower at 50% there (2026-11-24)
        for (int64_t u = q + PREFETCH; u < std::min(nnz, q + PREFETCH + 2); ++u) {
          const char* pf = reinterpret_cast<const char*>(wt + static_cast<int64_t>(idx[u]) * N + c0);
          for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(pf + 64 * l, 0, 3);
        }
        const WT* w0 = wt + static_cast<int64_t>(idx[q]) * N + c0;
        const WT* w1 = two ? wt + static_cast<int64_t>(idx[q + 1]) * N + c0 : w0;
        const float* x0 = xs.data() + q * T;
        const float* x1 = two ? x0 + T : nullptr;
        auto xa = [&](int64_t t) { return V::bcast(x0[t]); };
        auto xb = [&](int64_t t) { return V::bcast(two ? x1[t] : 0.f); };
        int64_t t = 0;
        // four rows of x at a time share each load of wt
        for (; t + 4 <= T; t += 4) {
          const reg a0 = xa(t), a1 = xa(t + 1), a2 = xa(t + 2), a3 = xa(t + 3);
          const reg b0 = xb(t), b1 = xb(t + 1), b2 = xb(t + 2), b3 = xb(t + 3);
          float *o0 = acc.data() + t * OT, *o1 = o0 + OT, *o2 = o1 + OT, *o3 = o2 + OT;
          for (int64_t c = 0; c < w8; c += 8) {
            const reg u = WL::load(w0 + c), v = WL::load(w1 + c);
            V::store(o0 + c, V::fma(b0, v, V::fma(a0, u, V::load(o0 + c))));
            V::store(o1 + c, V::fma(b1, v, V::fma(a1, u, V::load(o1 + c))));
            V::store(o2 + c, V::fma(b2, v, V::fma(a2, u, V::load(o2 + c))));
            V::store(o3 + c, V::fma(b3, v, V::fma(a3, u, V::load(o3 + c))));
          }
        }
        for (; t < T; ++t) {
          const reg a = xa(t), b = xb(t);
          float* o = acc.data() + t * OT;
          for (int64_t c = 0; c < w8; c += 8)
            V::store(o + c, V::fma(b, WL::load(w1 + c), V::fma(a, WL::load(w0 + c), V::load(o + c))));
        }
        for (int64_t c = w8; c < w; ++c)
          for (int64_t u = 0; u < T; ++u)
            acc[u * OT + c] += x0[u] * WL::one(w0[c]) + (two ? x1[u] * WL::one(w1[c]) : 0.f);
      }
      for (int64_t t = 0; t < T; ++t) std::memcpy(y + t * ldy + c0, acc.data() + t * OT, sizeof(float) * w);
    }
  }
  return nnz;
}

template <class V>
int64_t act_spmm_t(const float* x, int64_t B, int64_t K, int64_t ldx, ActSel sel, const float* wt, int64_t N,
                   const float* bias, float* y, int64_t ldy, int nthreads) {
  ActCSR a;
  act_csr(x, B, K, ldx, sel, a, nthreads);
  spmm<V>(a, B, K, wt, N, N, bias, y, ldy, nthreads);
  return a.ptr[B];
}

template <class V>
void act_dsd_t(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K, int64_t ldx,
               ActSel sel, const float* wt, float* dx, int64_t lddx, int nthreads) {
  ActCSR a;
  act_csr(x, B, K, ldx, sel, a, nthreads);
  ActChunks ch;
  act_chunk(a, B, K, ch, nthreads);
  // the dot products, in ch's order
  std::vector<float> dv(ch.idx.size(), 0.f);
  const int64_t N8 = N / 8 * 8;
#pragma omp parallel num_threads(nthreads)
  {
    int64_t r0, r1;
    act_rows(a.ptr, B, 8, act_tid(), act_nt(), &r0, &r1);
    ActWork ws;
    for (int64_t c0 = 0; c0 < N8; c0 += 8 * STRIP) {
      const int nv = static_cast<int>(std::min<int64_t>(STRIP, (N8 - c0) / 8));
      sddmm_strip_n<V>(nv, ch, r0, r1, K, dy, ldd, wt, N, c0, dv.data(), ws);
    }
    for (int64_t r = r0; r < r1; ++r) {
      float* d = dx + r * lddx;
      std::memset(d, 0, sizeof(float) * K);
      for (int64_t c = 0; c < ch.nch; ++c)
        for (int64_t p = ch.ptr[c * B + r]; p < ch.ptr[c * B + r + 1]; ++p) {
          float s = dv[p];
          const float* q = wt + static_cast<int64_t>(ch.idx[p]) * N;
          for (int64_t j = N8; j < N; ++j) s += dy[r * ldd + j] * q[j];
          d[ch.idx[p]] = s;
        }
    }
  }
}

template <class V>
void act_sdd_t(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K, int64_t ldx,
               ActSel sel, float* dwt, int nthreads) {
  ActCSR a, t;
  act_csr(x, B, K, ldx, sel, a, nthreads);
  act_transpose(a, B, K, t);
  spmm<V>(t, K, B, dy, N, ldd, nullptr, dwt, N, nthreads);
}

}  // namespace
}  // namespace sparseops

#define SPARSEOPS_ACT_INSTANTIATE(V, suffix)                                                                      \
  int64_t act_gemv_##suffix(const float* x, int64_t T, int64_t K, int64_t ldx, ActSel sel, const float* wt,       \
                            int64_t N, const float* bias, float* y, int64_t ldy, int nt) {                        \
    note_isa_call(ISA_OF_##suffix);                                                                               \
    return act_gemv_t<V>(x, T, K, ldx, sel, wt, N, bias, y, ldy, nt);                                             \
  }                                                                                                               \
  int64_t act_gemv16_##suffix(const float* x, int64_t T, int64_t K, int64_t ldx, ActSel sel, const uint16_t* wt,  \
                              bool bf16, int64_t N, const float* bias, float* y, int64_t ldy, int nt) {          \
    note_isa_call(ISA_OF_##suffix);                                                                              \
    return bf16 ? act_gemv_t<V, 1>(x, T, K, ldx, sel, wt, N, bias, y, ldy, nt)                                  \
                : act_gemv_t<V, 2>(x, T, K, ldx, sel, wt, N, bias, y, ldy, nt);                                 \
  }                                                                                                               \
  int64_t act_spmm_##suffix(const float* x, int64_t B, int64_t K, int64_t ldx, ActSel sel, const float* wt,       \
                            int64_t N, const float* bias, float* y, int64_t ldy, int nt) {                        \
    note_isa_call(ISA_OF_##suffix);                                                                               \
    return act_spmm_t<V>(x, B, K, ldx, sel, wt, N, bias, y, ldy, nt);                                             \
  }                                                                                                               \
  void act_dsd_##suffix(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K,            \
                        int64_t ldx, ActSel sel, const float* wt, float* dx, int64_t lddx, int nt) {              \
    note_isa_call(ISA_OF_##suffix);                                                                               \
    act_dsd_t<V>(dy, B, N, ldd, x, K, ldx, sel, wt, dx, lddx, nt);                                                \
  }                                                                                                               \
  void act_sdd_##suffix(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K,            \
                        int64_t ldx, ActSel sel, float* dwt, int nt) {                                            \
    note_isa_call(ISA_OF_##suffix);                                                                               \
    act_sdd_t<V>(dy, B, N, ldd, x, K, ldx, sel, dwt, nt);                                                         \
  }
