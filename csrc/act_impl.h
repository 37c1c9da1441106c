// activation-sparse kernels, written once over a vector type V (see simd.h) and instantiated per ISA in
// act_avx2.cpp and act_portable.cpp.
//
// - gemv (1 to ~32 rows): one serial pass over x builds the union of the rows' active inputs and packs
//   their values [nnz][T]. the output columns are split between the threads (no reduction, no atomics);
//   each thread sweeps its columns in tiles of OT, accumulating [T][OT] in an l1 buffer, and for every
//   input in the union streams the OT contiguous weights of that input's row of wt once, for all rows.
//   rows of wt outside the union are never touched; the next rows are prefetched, since the hardware
//   cannot guess where a sparse walk jumps.
// - spmm (any batch): s(x) in chunks of KC columns (ActChunks: two parallel passes over x, count and fill),
//   then C [R, N] = s(x) @ D. the threads split the 64-column strips of C (else the rows, by nonzeros); each
//   walks its strips a group (up to 8) at a time and the group chunk by chunk: it packs the chunk's [KC, 64 g]
//   block of D once (act_pack_group), then every row of the chunk accumulates its strip of C in registers
//   over the row's nonzeros, gathering rows of the l2-resident panel.
// - dsd: the same walk, but each active (b, j) reduces dy's strip against wt's strip (sampled dense-dense):
//   eight nonzeros at a time, reduced with one horizontal 8x8 sum; with the strips split between threads,
//   each keeps its own partial sums, added at the end.
// - sdd: dwt = s(x)ᵀ @ dy is the spmm above on s(x)'s transpose (by a counting sort). up to a batch of KC
//   it is one panel deep (K is the batch): all of dy is packed once, and C, when 16 MB or more, is written
//   with streaming stores; larger batches take the group walk.
// - backward: dsd and sdd in one pass over s(x)'s transpose, input by input (act_backward_t).
// everything sits in an unnamed namespace, so the avx2 and portable translation units keep their own
// copies (no inline function compiled with -mavx2 can be merged into the portable path).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "act.h"
#include "act_union.h"
#include "scratch.h"
#include "simd.h"

namespace sparseops {
namespace {

constexpr int64_t KC = 256;  // rows of D per panel: a strip's panel is 256 x 64 x 4 B = 64 KB, l2-resident
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


// s(x) [R, K] as CSR regrouped panel by panel: chunk c (columns [c KC, c KC + KC)) of row r is
// [ptr[c R + r], ptr[c R + r + 1]), its columns sorted. a kernel that sweeps the rows once per panel then reads
// idx and val front to back; walking a row-major CSR instead jumps between R far-apart places per panel,
// which no prefetcher follows (NOTE: 256 x 16384 at 10%, 1 thread: a cache miss per row and panel, and about
// twice the time of the inner loop itself). rowptr [R + 1]: the rows' nonzeros, for splitting rows by them
struct ActChunks {
  int64_t R = 0, nch = 1;
  std::vector<int64_t> ptr, rowptr;
  std::vector<int32_t> idx;
  std::vector<float> val;
};

// the prefix sums of ch.ptr (counts in ptr[i + 1]) and rowptr (counts in rowptr[r + 1]); sizes idx and val
inline void act_finish_counts(ActChunks& ch) {
  const int64_t n = ch.nch * ch.R;
  for (int64_t i = 0; i < n; ++i) ch.ptr[i + 1] += ch.ptr[i];
  for (int64_t r = 0; r < ch.R; ++r) ch.rowptr[r + 1] += ch.rowptr[r];
  ch.idx.resize(static_cast<size_t>(std::max<int64_t>(1, ch.ptr[n])));
  ch.val.resize(ch.idx.size());
}

// act_active with the threshold's kind and relu as constants, and no short circuit (a loop of it vectorizes)
template <bool PC, bool RELU>
inline bool act_on(float v, const float* thr, int64_t j) {
  const float t = PC ? thr[j] : thr[0];
  if constexpr (RELU)
    return (v > 0.f) & (v > t);
  else
    return std::fabs(v) > t;
}

// f(pc, relu) with both as std::bool_constant
template <class F>
inline auto act_sel(const ActSel& s, F&& f) {
  using T = std::true_type;
  using U = std::false_type;
  if (s.per_channel) return s.relu ? f(T{}, T{}) : f(T{}, U{});
  return s.relu ? f(U{}, T{}) : f(U{}, U{});
}

// s(x) of x [B, K] (row stride ldx) in chunks, in two parallel passes over x: count, then fill. the fill
// compacts each chunk without a branch into a small buffer (a branch per input mispredicts at every
// active one; NOTE: 256 x 16384 at 10%, 2 threads, Xeon: the row CSR plus its regrouping took 8.7 ms)
void act_chunks(const float* x, int64_t B, int64_t K, int64_t ldx, const ActSel& sel, ActChunks& ch, int nthreads) {
  ch.R = B;
  ch.nch = std::max<int64_t>(1, (K + KC - 1) / KC);
  ch.ptr.assign(static_cast<size_t>(ch.nch * B + 1), 0);
  ch.rowptr.assign(static_cast<size_t>(B + 1), 0);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * ldx;
    int64_t total = 0;
    for (int64_t c = 0; c < ch.nch; ++c) {
      const int64_t k0 = c * KC, k1 = std::min(K, k0 + KC);
      const int64_t n = act_sel(sel, [&](auto pc, auto relu) {
        int32_t m = 0;  // a vectorizable count: no branch, no short circuit
        for (int64_t j = k0; j < k1; ++j) m += act_on<pc, relu>(xr[j], sel.thr, j);
        return m;
      });
      ch.ptr[c * B + b + 1] = n;
      total += n;
    }
    ch.rowptr[b + 1] = total;
  }
  act_finish_counts(ch);
#pragma omp parallel num_threads(nthreads)
  {
    int32_t ti[KC];
    float tv[KC];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const float* xr = x + b * ldx;
      for (int64_t c = 0; c < ch.nch; ++c) {
        const int64_t k0 = c * KC, k1 = std::min(K, k0 + KC);
        const int64_t n = act_sel(sel, [&](auto pc, auto relu) {
          int64_t m = 0;
          for (int64_t j = k0; j < k1; ++j) {
            const float v = xr[j];
            ti[m] = static_cast<int32_t>(j);
            tv[m] = v;
            m += act_on<pc, relu>(v, sel.thr, j);
          }
          return m;
        });
        // the counted size bounds the copy, and a short fill is padded with in-chunk zeros: x is read twice,
        // and a caller changing it in between must not make a kernel read out of bounds
        const int64_t q = ch.ptr[c * B + b], cnt = ch.ptr[c * B + b + 1] - q, m = std::min(n, cnt);
        std::memcpy(ch.idx.data() + q, ti, sizeof(int32_t) * m);
        std::memcpy(ch.val.data() + q, tv, sizeof(float) * m);
        for (int64_t i = m; i < cnt; ++i) {
          ch.idx[q + i] = static_cast<int32_t>(k0);
          ch.val[q + i] = 0.f;
        }
      }
    }
  }
}

// the transpose of a [R, K] in chunks as [K, R] in chunks of rc rows of a (each row of t in one chunk when
// rc >= R), by a counting sort; pos, when given, gets each entry's place in a. the chunks of a cover
// disjoint columns, which are disjoint rows of t: the threads split them
void act_transpose(const ActChunks& a, int64_t K, ActChunks& t, int nthreads, int64_t rc = KC,
                   std::vector<int64_t>* pos = nullptr) {
  const int64_t R = a.R;
  rc = std::max<int64_t>(1, std::min(rc, std::max<int64_t>(1, R)));
  t.R = K;
  t.nch = std::max<int64_t>(1, (R + rc - 1) / rc);
  t.ptr.assign(static_cast<size_t>(t.nch * K + 1), 0);
  t.rowptr.assign(static_cast<size_t>(K + 1), 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t c = 0; c < a.nch; ++c)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t p = a.ptr[c * R + r]; p < a.ptr[c * R + r + 1]; ++p) {
        ++t.ptr[(r / rc) * K + a.idx[p] + 1];
        ++t.rowptr[a.idx[p] + 1];
      }
  act_finish_counts(t);
  if (pos) pos->resize(t.idx.size());
  const ThreadScratch<int64_t> nexts(nthreads, static_cast<size_t>(t.nch * KC));
#pragma omp parallel num_threads(nthreads)
  {
    int64_t* next = nexts.zeroed(act_tid(), static_cast<size_t>(t.nch * KC));
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < a.nch; ++c) {
      // next[(r / rc) KC + j - c KC]: where the next entry of row j of t in chunk r / rc goes
      const int64_t j0 = c * KC, j1 = std::min(K, j0 + KC);
      for (int64_t k = 0; k < t.nch; ++k)
        for (int64_t j = j0; j < j1; ++j) next[k * KC + j - j0] = t.ptr[k * K + j];
      for (int64_t r = 0; r < R; ++r)
        for (int64_t p = a.ptr[c * R + r]; p < a.ptr[c * R + r + 1]; ++p) {
          const int64_t q = next[(r / rc) * KC + a.idx[p] - j0]++;
          t.idx[q] = static_cast<int32_t>(r);
          t.val[q] = a.val[p];
          if (pos) (*pos)[q] = p;
        }
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

// a 64-byte aligned pointer into v (sized n + 16 floats)
inline float* act_aligned(std::vector<float>& v, size_t n) {
  v.resize(n + 16);
  const uintptr_t a = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<float*>((a + 63) & ~static_cast<uintptr_t>(63));
}

// the group panel: rows [k0, k1) of D (row stride ldd) x g strips of 8 STRIP columns from column c0 (the last
// one may be narrower: N8 ends it), strip-major: strip i at pk + i KC 8 STRIP, its rows contiguous at its own
// width. each row of D is read as one run of up to 8 STRIP g floats, which the hardware prefetchers follow
// (NOTE: one 256-byte run a row, 16 KB apart, read Wᵀ [16384, 4096] at about 10 GB/s: 25 ms of the 50 ms
// forward at 256 x 16384 10%, 2 threads, Xeon). packed, because the rows of D are often a multiple of 4 KB
// apart, which puts a panel read in place into a handful of cache sets (NOTE: 256 x 16384 @ 16384 x 4096
// at 10%, 1 thread, Zen3: 315 ms reading the panel in place, 246 ms packed)
inline void act_pack_group(const float* D, int64_t ldd, int64_t k0, int64_t k1, int64_t c0, int64_t N8, int g,
                           float* pk) {
  constexpr int64_t W = 8 * STRIP;
  for (int64_t k = k0; k < k1; ++k)
    for (int i = 0; i < g; ++i) {
      const int64_t cs = c0 + i * W, w = std::min(W, N8 - cs);
      std::memcpy(pk + i * KC * W + (k - k0) * w, D + k * ldd + cs, sizeof(float) * w);
    }
}

// ---- spmm: C[r, c0 : c0 + 8 NV] = bias + sum_p val[p] * D[idx[p], c0 : ...] for r in [r0, r1) ----

// chunk c of rows [r0, r1) on one strip (NL vectors of L: V, or V::W16 on the 16-lane path), out row r at
// o + (r - r0) ldo. panel: the chunk's rows of D at this strip's width, indexed by the column j - k0. init:
// out starts from the bias (bias points at this strip's first column; zero without one) and every row is
// written; else out is added to and rows with no nonzero in the chunk are skipped
template <class L, int NL>
void spmm_chunk_lanes(const ActChunks& a, int64_t c, int64_t r0, int64_t r1, const float* panel, bool init,
                      const float* bias, float* o, int64_t ldo, bool stream) {
  using reg = typename L::reg;
  constexpr int LN = L::lanes;
  constexpr int W = LN * NL;
  const int32_t* idx = a.idx.data();
  const float* val = a.val.data();
  const int64_t* cp = a.ptr.data() + c * a.R;
  const float* pn = panel - c * KC * W;  // indexed by the column j itself
  for (int64_t r = r0; r < r1; ++r) {
    int64_t p = cp[r];
    const int64_t pe = cp[r + 1];
    if (p == pe && !init) continue;
    float* out = o + (r - r0) * ldo;
    reg acc[NL], acc2[NL];
    for (int v = 0; v < NL; ++v) {
      acc[v] = init ? (bias ? L::load(bias + LN * v) : L::zero()) : L::load(out + LN * v);
      acc2[v] = L::zero();
    }
    // two chains per vector: each fma waits on the one two nonzeros back, not on the last one
    // (NOTE: dwt [16384, 4096] from 256 x 16384 at 10%, 2 threads, Xeon: 62 -> 47 ms)
    for (; p + 2 <= pe; p += 2) {
      const reg sv = L::bcast(val[p]), sw = L::bcast(val[p + 1]);
      const float* d = pn + static_cast<int64_t>(idx[p]) * W;
      const float* e = pn + static_cast<int64_t>(idx[p + 1]) * W;
      for (int v = 0; v < NL; ++v) {
        acc[v] = L::fma(sv, L::load(d + LN * v), acc[v]);
        acc2[v] = L::fma(sw, L::load(e + LN * v), acc2[v]);
      }
    }
    if (p < pe) {
      const reg sv = L::bcast(val[p]);
      const float* d = pn + static_cast<int64_t>(idx[p]) * W;
      for (int v = 0; v < NL; ++v) acc[v] = L::fma(sv, L::load(d + LN * v), acc[v]);
    }
    if (stream && reinterpret_cast<uintptr_t>(out) % sizeof(reg) == 0) {
      for (int v = 0; v < NL; ++v) L::stream(out + LN * v, L::add(acc[v], acc2[v]));
    } else {
      for (int v = 0; v < NL; ++v) L::store(out + LN * v, L::add(acc[v], acc2[v]));
    }
  }
}

// ---- dsd: out[p] += <P[r, c0 : c0 + 8 NV], Q[idx[p], c0 : ...]> for the nonzeros of rows [r0, r1) ----

// chunk c of rows [r0, r1) on one strip (NL vectors of L), P at the strip's first column; each partial dot
// product folded to 8 lanes for V::hsum8
template <class V, class L, int NL>
void sddmm_chunk_lanes(const ActChunks& a, int64_t c, int64_t r0, int64_t r1, const float* P, int64_t ldp,
                       const float* panel, float* out) {
  using reg = typename L::reg;
  constexpr int LN = L::lanes;
  constexpr int W = LN * NL;
  const int64_t* cp = a.ptr.data() + c * a.R;
  const float* pn = panel - c * KC * W;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t p = cp[r];
    const int64_t q = cp[r + 1];
    if (p == q) continue;
    reg pv[NL];
    for (int v = 0; v < NL; ++v) pv[v] = L::load(P + r * ldp + LN * v);
    // eight nonzeros at a time: eight partial vectors, one horizontal sum
    for (; p < q; p += 8) {
      const int g = static_cast<int>(std::min<int64_t>(8, q - p));
      typename V::reg part[8];
      for (int i = 0; i < 8; ++i) {
        if (i < g) {
          const float* d = pn + static_cast<int64_t>(a.idx[p + i]) * W;
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

// chunk c of rows [r0, r1) on g whole strips (NL vectors of L each, 8 STRIP columns), strip i's panel at
// pk + i KC 8 STRIP and its columns of P at P + i 8 STRIP: the same dot products as sddmm_chunk_lanes, but
// each group of eight nonzeros sums over all g strips in registers before its one horizontal sum and one
// update of out (NOTE: strip by strip, out, 1.6 MB a thread at 256 x 16384 10%, was read and written once
// per strip: dsd 4096 -> 16384 took 51-57 ms, 2 threads, Xeon)
template <class V, class L, int NL>
void sddmm_group_lanes(const ActChunks& a, int64_t c, int64_t r0, int64_t r1, const float* P, int64_t ldp,
                       const float* pk, int g, float* out) {
  using reg = typename L::reg;
  constexpr int LN = L::lanes;
  constexpr int W = LN * NL;
  static_assert(W == 8 * STRIP, "whole strips");
  const int64_t* cp = a.ptr.data() + c * a.R;
  const int64_t k0 = c * KC;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t p = cp[r];
    const int64_t q = cp[r + 1];
    const float* pr = P + r * ldp;
    for (; p < q; p += 8) {
      const int n = static_cast<int>(std::min<int64_t>(8, q - p));
      int64_t off[8];
      for (int i = 0; i < 8; ++i) off[i] = (static_cast<int64_t>(a.idx[p + std::min(i, n - 1)]) - k0) * W;
      reg part[8];
      for (int i = 0; i < 8; ++i) part[i] = L::zero();
      for (int s = 0; s < g; ++s) {
        const float* panel = pk + s * KC * W;
        reg pv[NL];
        for (int v = 0; v < NL; ++v) pv[v] = L::load(pr + s * W + LN * v);
        for (int i = 0; i < 8; ++i) {
          if (i < n) {
            const float* d = panel + off[i];
            for (int v = 0; v < NL; ++v) part[i] = L::fma(pv[v], L::load(d + LN * v), part[i]);
          }
        }
      }
      typename V::reg h8[8];
      for (int i = 0; i < 8; ++i) h8[i] = L::fold(part[i]);
      alignas(32) float h[8];
      V::store(h, V::hsum8(h8));
      for (int i = 0; i < n; ++i) out[p + i] += h[i];
    }
  }
}

// one strip of nv vectors (1 to STRIP): f(LaneTag<L>, std::integral_constant<int, NL>) with the 16-lane
// loops (L = V::W16, NL = nv / 2) where V has them and nv is even, else L = V, NL = nv
template <class L>
struct LaneTag {
  using type = L;
};

template <class V, int NV, class F>
inline void with_lanes(F&& f) {
  if constexpr (V::wide && NV % 2 == 0)
    f(LaneTag<typename V::W16>{}, std::integral_constant<int, NV / 2>{});
  else
    f(LaneTag<V>{}, std::integral_constant<int, NV>{});
}

// the vectors of the strip from column c0 (N8: the columns the strips cover)
inline int strip_vectors(int64_t N8, int64_t c0) { return static_cast<int>(std::min<int64_t>(STRIP, (N8 - c0) / 8)); }

template <class V, class F>
inline void with_strip(int nv, F&& f) {
  switch (nv) {
    case 8: return with_lanes<V, 8>(f);
    case 7: return with_lanes<V, 7>(f);
    case 6: return with_lanes<V, 6>(f);
    case 5: return with_lanes<V, 5>(f);
    case 4: return with_lanes<V, 4>(f);
    case 3: return with_lanes<V, 3>(f);
    case 2: return with_lanes<V, 2>(f);
    default: return with_lanes<V, 1>(f);
  }
}

// the last N % 8 columns, scalar
inline void spmm_tail(const ActChunks& a, int64_t r0, int64_t r1, const float* D, int64_t ldd, int64_t c0, int64_t N,
                      const float* bias, float* C, int64_t ldc) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = c0; c < N; ++c) {
      float s = bias ? bias[c] : 0.f;
      for (int64_t k = 0; k < a.nch; ++k)
        for (int64_t p = a.ptr[k * a.R + r]; p < a.ptr[k * a.R + r + 1]; ++p)
          s += a.val[p] * D[static_cast<int64_t>(a.idx[p]) * ldd + c];
      C[r * ldc + c] = s;
    }
}

// strips per group for a thread with nr rows: the group's block of C (nr rows x 8 STRIP g floats) stays
// within 512 KB (l2 holds it beside the group's panel, up to another 512 KB); at least one strip
inline int act_group(int64_t nr) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(8, (512 << 10) / (std::max<int64_t>(1, nr) * 8 * STRIP * 4))));
}

// the threads split the strips when D spans several panels, there are enough strips and a group's rows of C
// fit a small buffer (D, the big operand then, is read once in all); else they split the rows by nonzeros,
// and each writes whole rows of C (NOTE: dwt [16384, 4096] split by strips took 3x as long with 2 threads as
// with 1: both threads first-touch every page of the fresh output). either way a thread walks its strips a
// group at a time, chunk by chunk, packing the group's panel (act_pack_group) once for all its strips.
// a product whose D is one panel (the weight gradient: K is the batch) packs all of D once, and walks
// its rows in blocks of RB, every strip of a block before the next: the block's rows of C are written
// front to back, a few pages at a time, not 256 bytes of every row of C per strip
// NOTE: dwt [16384, 4096] from a batch of 256, 2 threads: strip-major 175 ms
template <class V>
void spmm(const ActChunks& ch, int64_t K, const float* D, int64_t N, int64_t ldd, const float* bias, float* C,
          int64_t ldc, int nthreads) {
  const int64_t R = ch.R;
  const int64_t N8 = N / 8 * 8;
  constexpr int64_t W = 8 * STRIP;
  const int64_t nstrips = (N8 + W - 1) / W;
  const bool by_strip = nstrips >= 4 * nthreads && K > KC && R * W * 4 <= (256 << 10);
  const bool single = K <= KC && !by_strip;
  std::vector<float> all;
  float* packed = nullptr;
  if (single && nstrips > 0) {
    // strip s at packed + s K W, rows (8 nv floats) contiguous
    packed = act_aligned(all, static_cast<size_t>(std::max<int64_t>(1, nstrips * K * W)));
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t s = 0; s < nstrips; ++s) act_pack_group(D, ldd, 0, K, s * W, N8, 1, packed + s * K * W);
  }
  constexpr int64_t RB = 256;
  // a large one-panel product (the weight gradient) writes C with streaming stores: C is written once and is
  // far larger than the caches, and a plain store first reads every line it writes (NOTE: dwt [16384, 4096]
  // from 256 x 16384 at 10%, 2 threads, Xeon: 40 -> 27 ms, and 31 -> 8 ms with no nonzero at all)
  const bool stream = single && R * N * static_cast<int64_t>(sizeof(float)) >= (16 << 20);
  // a thread's group panel and C block (cb: max(1, nr) act_group(nr) W floats, nr <= R rows, and
  // nr act_group(nr) <= 2048 where the group is more than one strip)
  const bool blocks = !single;
  const ThreadScratch<float> pks(blocks ? nthreads : 1, blocks ? static_cast<size_t>(8 * KC * W) : 1);
  const ThreadScratch<float> cbs(blocks ? nthreads : 1,
                                 blocks ? static_cast<size_t>(std::max<int64_t>(std::max<int64_t>(1, R), (512 << 10) / (8 * STRIP * 4)) * W) : 1);
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = act_tid(), nt = act_nt();
    int64_t r0 = 0, r1 = R, s0 = 0, s1 = nstrips;
    if (by_strip) {
      s0 = nstrips * tid / nt;
      s1 = nstrips * (tid + 1) / nt;
    } else {
      act_rows(ch.rowptr, R, 8, tid, nt, &r0, &r1);
    }
    if (single) {
      for (int64_t b0 = r0; b0 < r1; b0 += RB) {
        const int64_t b1 = std::min(r1, b0 + RB);
        for (int64_t s = 0; s < nstrips; ++s) {
          const int64_t c0 = s * W;
          with_strip<V>(strip_vectors(N8, c0), [&](auto lt, auto nl) {
            using L = typename decltype(lt)::type;
            spmm_chunk_lanes<L, decltype(nl)::value>(ch, 0, b0, b1, packed + s * K * W, true, bias ? bias + c0 : nullptr,
                                                     C + b0 * ldc + c0, ldc, stream);
          });
        }
        if (N8 < N) spmm_tail(ch, b0, b1, D, ldd, N8, N, bias, C, ldc);
      }
      if (stream) V::stream_fence();
    } else {
      const int64_t nr = r1 - r0;
      const int G = act_group(nr);
      float* pk = pks.zeroed(tid, static_cast<size_t>(G * KC * W));
      float* cb = cbs.zeroed(tid, static_cast<size_t>(std::max<int64_t>(1, nr) * G * W));
      for (int64_t g0 = s0; g0 < s1 && nr > 0; g0 += G) {  // no rows: nothing to pack for
        const int g = static_cast<int>(std::min<int64_t>(G, s1 - g0));
        const int64_t c0 = g0 * W, gw = std::min(N8, c0 + g * W) - c0;  // the group's columns
        for (int64_t i = 0; i < nr; ++i)
          for (int64_t j = 0; j < gw; ++j) cb[i * G * W + j] = bias ? bias[c0 + j] : 0.f;
        for (int64_t c = 0; c < ch.nch; ++c) {
          const int64_t k0 = c * KC, k1 = std::min(K, k0 + KC);
          act_pack_group(D, ldd, k0, k1, c0, N8, g, pk);
          for (int i = 0; i < g; ++i)
            with_strip<V>(strip_vectors(N8, c0 + i * W), [&](auto lt, auto nl) {
              using L = typename decltype(lt)::type;
              spmm_chunk_lanes<L, decltype(nl)::value>(ch, c, r0, r1, pk + i * KC * W, false, nullptr, cb + i * W, G * W,
                                                       false);
            });
        }
        for (int64_t r = r0; r < r1; ++r) std::memcpy(C + r * ldc + c0, cb + (r - r0) * G * W, sizeof(float) * gw);
      }
      if (N8 < N && (!by_strip || tid == nt - 1)) spmm_tail(ch, r0, r1, D, ldd, N8, N, bias, C, ldc);
    }
  }
}

// rows [r0, r1) of dx: zeros, then value(r, p) at each active entry p of row r (p in ch's order)
template <class F>
void act_write_rows(const ActChunks& ch, int64_t r0, int64_t r1, int64_t K, float* dx, int64_t lddx, F&& value) {
  for (int64_t r = r0; r < r1; ++r) {
    float* d = dx + r * lddx;
    std::memset(d, 0, sizeof(float) * K);
    for (int64_t c = 0; c < ch.nch; ++c)
      for (int64_t p = ch.ptr[c * ch.R + r]; p < ch.ptr[c * ch.R + r + 1]; ++p) d[ch.idx[p]] = value(r, p);
  }
}

// ---- backward: dx = (dy @ wtᵀ) ⊙ mask and dwt = s(x)ᵀ @ dy in one pass, input by input ----
//
// row j of dwt sums dy's rows b over the inputs (b, j) that are active, and each such entry of dx is the
// dot product of the same rows of dy with row j of wt: one load of dy feeds both. the columns go in
// blocks of NB (dy's [B, NB] block packed, l2-resident); for every input j of a thread the active rows b
// go eight at a time over the block: dwt's row accumulates in an l1 buffer (the last group writes it out,
// streamed when dwt is large), and eight dot products accumulate in registers. only the rows of wt with an
// active input are read, each once per block in one contiguous run (the next row's run prefetched during
// the first group of this one), not packed.
// NOTE: 256 x 16384 -> 4096 at 10%, 2 threads, Xeon: 62 ms against 51 (dsd) + 27 (sdd, reused output);
// at 0.05% active, 12 ms against 22 + 9.

// the GN active rows at t's entries [q, q + GN) of input j on the vectors [0, nvec) of a column block: w
// the block of wt's row j, o that of dwt's, pdy the packed dy block (row stride NB), row the l1 buffer of
// o's partial sums (first: none yet; last: write o), pf the next row of wt to prefetch (or null)
template <class V, class L, int GN>
void bwd_group(const ActChunks& t, int64_t q, const float* pdy, int64_t NB, const float* w, float* o, float* row,
               int64_t nvec, bool first, bool last, bool stream, const float* pf, float* dvt) {
  using reg = typename L::reg;
  constexpr int LN = L::lanes;
  const float* d[GN];
  reg xb[GN], dot[GN];
  for (int i = 0; i < GN; ++i) {
    d[i] = pdy + static_cast<int64_t>(t.idx[q + i]) * NB;
    xb[i] = L::bcast(t.val[q + i]);
    dot[i] = L::zero();
  }
  const bool nt = last && stream && reinterpret_cast<uintptr_t>(o) % sizeof(reg) == 0;
  float* dst = last ? o : row;
  for (int64_t v = 0; v < nvec; ++v) {
    if (pf) __builtin_prefetch(pf + v * LN, 0, 2);
    const reg wv = L::load(w + v * LN);
    reg s0 = first ? L::zero() : L::load(row + v * LN), s1 = L::zero();
    for (int i = 0; i < GN; ++i) {
      const reg di = L::load(d[i] + v * LN);
      if (i % 2)
        s1 = L::fma(xb[i], di, s1);
      else
        s0 = L::fma(xb[i], di, s0);
      dot[i] = L::fma(wv, di, dot[i]);
    }
    if (nt)
      L::stream(dst + v * LN, L::add(s0, s1));
    else
      L::store(dst + v * LN, L::add(s0, s1));
  }
  typename V::reg h8[8];
  for (int i = 0; i < 8; ++i) h8[i] = i < GN ? L::fold(dot[i]) : V::zero();
  alignas(32) float h[8];
  V::store(h, V::hsum8(h8));
  for (int i = 0; i < GN; ++i) dvt[q + i] += h[i];
}

// the widest lane type V has: V::W16 on the 16-lane path, else V
template <class V, bool = V::wide>
struct WideLanes {
  using type = V;
};
template <class V>
struct WideLanes<V, true> {
  using type = typename V::W16;
};

template <class V>
void act_backward_t(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K, int64_t ldx,
                    ActSel sel, const float* wt, float* dx, int64_t lddx, float* dwt, int nthreads) {
  using L = typename WideLanes<V>::type;
  using reg = typename L::reg;
  constexpr int LN = L::lanes;
  ActChunks a, t;
  std::vector<int64_t> pos;
  act_chunks(x, B, K, ldx, sel, a, nthreads);
  act_transpose(a, K, t, nthreads, std::max<int64_t>(1, B), &pos);  // t: row j = the active (b, j), b ascending
  const int64_t nnz = t.rowptr[K];
  std::vector<float> dvt(static_cast<size_t>(std::max<int64_t>(1, nnz)), 0.f);  // dx's entries, in t's order
  const int64_t NV = N / LN * LN;  // the vector columns; the rest go scalar
  // dy's block [B, NB] within 1 MB of l2 (more when B > 1 MB / (4 LN): NB stops at LN); NB a multiple of LN,
  // from LN to 1024
  const int64_t NB = std::min(std::max<int64_t>(LN, NV),
                              std::max<int64_t>(LN, std::min<int64_t>(1024, (int64_t(1) << 20) / (4 * std::max<int64_t>(1, B)) / LN * LN)));
  const bool stream = K * N * static_cast<int64_t>(sizeof(float)) >= (16 << 20);
  const ThreadScratch<float> pdys(nthreads, static_cast<size_t>(std::max<int64_t>(1, B) * NB)), rows(nthreads, static_cast<size_t>(NB));
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = act_tid(), nt = act_nt();
    int64_t j0, j1;
    act_rows(t.rowptr, K, 1, tid, nt, &j0, &j1);
    float* pdy = pdys.zeroed(tid, static_cast<size_t>(std::max<int64_t>(1, B) * NB));
    float* row = rows.zeroed(tid, static_cast<size_t>(NB));
    for (int64_t n0 = 0; n0 < NV && j0 < j1; n0 += NB) {
      const int64_t nb = std::min(NB, NV - n0), nvec = nb / LN;
      for (int64_t b = 0; b < B; ++b) std::memcpy(pdy + b * NB, dy + b * ldd + n0, sizeof(float) * nb);
      for (int64_t j = j0; j < j1; ++j) {
        const float* w = wt + j * N + n0;
        float* o = dwt + j * N + n0;
        int64_t q = t.ptr[j];
        const int64_t qe = t.ptr[j + 1];
        if (q == qe) {  // no active input: a row of zeros, and no read of wt
          if (stream && reinterpret_cast<uintptr_t>(o) % sizeof(reg) == 0)
            for (int64_t v = 0; v < nvec; ++v) L::stream(o + v * LN, L::zero());
          else
            for (int64_t v = 0; v < nvec; ++v) L::store(o + v * LN, L::zero());
          continue;
        }
        const float* pf = j + 1 < j1 ? w + N : nullptr;
        for (bool first = true; q < qe; q += 8, first = false) {
          const bool last = q + 8 >= qe;
          const float* f = first ? pf : nullptr;
          switch (std::min<int64_t>(8, qe - q)) {
            case 8: bwd_group<V, L, 8>(t, q, pdy, NB, w, o, row, nvec, first, last, stream, f, dvt.data()); break;
            case 7: bwd_group<V, L, 7>(t, q, pdy, NB, w, o, row, nvec, first, last, stream, f, dvt.data()); break;
            case 6: bwd_group<V, L, 6>(t, q, pdy, NB, w, o, row, nvec, first, last, stream, f, dvt.data()); break;
            case 5: bwd_group<V, L, 5>(t, q, pdy, NB, w, o, row, nvec, first, last, stream, f, dvt.data()); break;
            case 4: bwd_group<V, L, 4>(t, q, pdy, NB, w, o, row, nvec, first, last, stream, f, dvt.data()); break;
            case 3: bwd_group<V, L, 3>(t, q, pdy, NB, w, o, row, nvec, first, last, stream, f, dvt.data()); break;
            case 2: bwd_group<V, L, 2>(t, q, pdy, NB, w, o, row, nvec, first, last, stream, f, dvt.data()); break;
            default: bwd_group<V, L, 1>(t, q, pdy, NB, w, o, row, nvec, first, last, stream, f, dvt.data()); break;
          }
        }
      }
    }
    // the last N - NV columns, scalar
    for (int64_t j = j0; j < j1 && NV < N; ++j) {
      for (int64_t c = NV; c < N; ++c) {
        float s = 0.f;
        for (int64_t q = t.ptr[j]; q < t.ptr[j + 1]; ++q) s += t.val[q] * dy[t.idx[q] * ldd + c];
        dwt[j * N + c] = s;
      }
      for (int64_t q = t.ptr[j]; q < t.ptr[j + 1]; ++q) {
        float s = 0.f;
        for (int64_t c = NV; c < N; ++c) s += wt[j * N + c] * dy[t.idx[q] * ldd + c];
        dvt[q] += s;
      }
    }
    if (stream) V::stream_fence();
#pragma omp barrier
    // dx row by row: zeros, then the active entries (t's entry q is a's entry pos[q])
#pragma omp for schedule(static)
    for (int64_t q = 0; q < nnz; ++q) a.val[pos[q]] = dvt[q];
    int64_t r0, r1;
    act_rows(a.rowptr, B, 8, tid, nt, &r0, &r1);
    act_write_rows(a, r0, r1, K, dx, lddx, [&](int64_t, int64_t p) { return a.val[p]; });
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
  const ThreadScratch<float> accs(nthreads, static_cast<size_t>(T * OT + 8));
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = act_tid(), nt = act_nt();
    // whole vectors per thread; the scalar tail goes to the last thread
    const int64_t nvec = N8 / 8;
    const int64_t c_begin = nvec * tid / nt * 8, c_end = tid == nt - 1 ? N : nvec * (tid + 1) / nt * 8;
    float* acc = accs.zeroed(tid, static_cast<size_t>(T * OT + 8));
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
          float* o = acc;
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
          float *o0 = acc + t * OT, *o1 = o0 + OT, *o2 = o1 + OT, *o3 = o2 + OT;
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
          float* o = acc + t * OT;
          for (int64_t c = 0; c < w8; c += 8)
            V::store(o + c, V::fma(b, WL::load(w1 + c), V::fma(a, WL::load(w0 + c), V::load(o + c))));
        }
        for (int64_t c = w8; c < w; ++c)
          for (int64_t u = 0; u < T; ++u)
            acc[u * OT + c] += x0[u] * WL::one(w0[c]) + (two ? x1[u] * WL::one(w1[c]) : 0.f);
      }
      for (int64_t t = 0; t < T; ++t) std::memcpy(y + t * ldy + c0, acc + t * OT, sizeof(float) * w);
    }
  }
  return nnz;
}

template <class V>
int64_t act_spmm_t(const float* x, int64_t B, int64_t K, int64_t ldx, ActSel sel, const float* wt, int64_t N,
                   const float* bias, float* y, int64_t ldy, int nthreads) {
  ActChunks ch;
  act_chunks(x, B, K, ldx, sel, ch, nthreads);
  spmm<V>(ch, K, wt, N, N, bias, y, ldy, nthreads);
  return ch.rowptr[B];
}

template <class V>
void act_dsd_t(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K, int64_t ldx,
               ActSel sel, const float* wt, float* dx, int64_t lddx, int nthreads) {
  ActChunks ch;
  act_chunks(x, B, K, ldx, sel, ch, nthreads);
  const int64_t N8 = N / 8 * 8;
  constexpr int64_t W = 8 * STRIP;
  const int64_t nstrips = (N8 + W - 1) / W;
  // the threads split the strips when there are enough (each then reads its own columns of wt, and sums its
  // own partial dot products, added up at the end), else the rows (each then reads all of wt)
  const int nt_max = std::max(1, nthreads);
  const bool by_strip = nstrips >= 2 * nt_max;
  // the dot products, in ch's order: one partial sum per thread when the threads split the strips
  const int64_t nnz = static_cast<int64_t>(ch.idx.size());
  std::vector<float> dv(static_cast<size_t>(nnz * (by_strip ? nt_max : 1)), 0.f);
  int used = 1;
  const ThreadScratch<float> pks(nthreads, static_cast<size_t>(8 * KC * W));
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = act_tid(), nt = act_nt();
    int64_t r0 = 0, r1 = B, s0 = 0, s1 = nstrips;
    if (by_strip) {
      s0 = nstrips * tid / nt;
      s1 = nstrips * (tid + 1) / nt;
#pragma omp single
      used = nt;
    } else {
      act_rows(ch.rowptr, B, 8, tid, nt, &r0, &r1);
    }
    float* out = dv.data() + (by_strip ? tid * nnz : 0);
    const int G = 8;
    float* pk = pks.zeroed(tid, static_cast<size_t>(G * KC * W));
    for (int64_t g0 = s0; g0 < s1 && r0 < r1; g0 += G) {  // no rows: nothing to pack for
      const int g = static_cast<int>(std::min<int64_t>(G, s1 - g0));
      const int64_t c0 = g0 * W;
      for (int64_t c = 0; c < ch.nch; ++c) {
        const int64_t k0 = c * KC, k1 = std::min(K, k0 + KC);
        act_pack_group(wt, N, k0, k1, c0, N8, g, pk);
        const int whole = static_cast<int>(std::min<int64_t>(g, (N8 - c0) / W));  // the strips 8 STRIP wide
        if (whole > 0)
          with_lanes<V, STRIP>([&](auto lt, auto nl) {
            using L = typename decltype(lt)::type;
            sddmm_group_lanes<V, L, decltype(nl)::value>(ch, c, r0, r1, dy + c0, ldd, pk, whole, out);
          });
        for (int i = whole; i < g; ++i)
          with_strip<V>(strip_vectors(N8, c0 + i * W), [&](auto lt, auto nl) {
            using L = typename decltype(lt)::type;
            sddmm_chunk_lanes<V, L, decltype(nl)::value>(ch, c, r0, r1, dy + c0 + i * W, ldd, pk + i * KC * W, out);
          });
      }
    }
#pragma omp barrier
    // each thread writes its rows of dx: the partial sums added, the scalar tail, zeros elsewhere
    int64_t w0, w1;
    act_rows(ch.rowptr, B, 8, tid, nt, &w0, &w1);
    act_write_rows(ch, w0, w1, K, dx, lddx, [&](int64_t r, int64_t p) {
      float s = dv[p];
      for (int u = 1; u < used; ++u) s += dv[u * nnz + p];
      const float* q = wt + static_cast<int64_t>(ch.idx[p]) * N;
      for (int64_t j = N8; j < N; ++j) s += dy[r * ldd + j] * q[j];
      return s;
    });
  }
}

template <class V>
void act_sdd_t(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K, int64_t ldx,
               ActSel sel, float* dwt, int nthreads) {
  ActChunks a, t;
  act_chunks(x, B, K, ldx, sel, a, nthreads);
  act_transpose(a, K, t, nthreads);
  spmm<V>(t, B, dy, N, ldd, nullptr, dwt, N, nthreads);
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
  } \
  void act_backward_##suffix(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K,       \
                             int64_t ldx, ActSel sel, const float* wt, float* dx, int64_t lddx, float* dwt, int nt) { \
    note_isa_call(ISA_OF_##suffix);                                                                               \
    act_backward_t<V>(dy, B, N, ldd, x, K, ldx, sel, wt, dx, lddx, dwt, nt);                                      \
  }
