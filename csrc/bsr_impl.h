// block-sparse kernels, written once over a vector type V (see simd.h) and instantiated per ISA in
// bsr_avx2.cpp and bsr_portable.cpp.
//
// all three products run the same register tile: acc[MR rows][NV vectors of 8] += A (broadcast) * B
// (8-lane loads) over an inner dimension, the 6 x 16 shape of the classic avx2 gemm kernel (12
// accumulators, 2 loads and 6 broadcasts per 12 fmas). with the activations row-major:
// - dds: rows are batch rows, the inner dimension walks every stored block of a block row (the
//   accumulators stay in registers across blocks), B is the block transposed. each thread transposes
//   the blocks of its block row once into a local buffer, then sweeps the batch over them;
// - dsd: rows are batch rows, the inner dimension walks the blocks of a block column through Wᵀ's
//   index, B is the block as stored (its rows are contiguous);
// - sdd: rows are the block's rows, the inner dimension is the batch: A = dyᵀ, B = x. no dense
//   [out, in] gradient and no transposed copy of the activations.
// everything here sits in an unnamed namespace, so the avx2 and the portable translation units each
// keep their own copy (no inline function compiled with -mavx2 can be merged into the portable path).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "bsr.h"
#include "scratch.h"
#include "simd.h"

namespace sparseops {
namespace {

constexpr int MR = 6;

template <class V, int R, int NV>
inline void bsr_micro(const float* a, int64_t sar, int64_t sak, const float* bm, int64_t sbk, int64_t K,
                      typename V::reg (&acc)[MR][2]) {
  for (int64_t k = 0; k < K; ++k) {
    typename V::reg bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = V::load(bm + k * sbk + 8 * v);
    for (int r = 0; r < R; ++r) {
      const typename V::reg av = V::bcast(a[r * sar + k * sak]);
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
    }
  }
}

template <class V, int NV>
inline void bsr_micro_rows(int R, const float* a, int64_t sar, int64_t sak, const float* bm, int64_t sbk, int64_t K,
                           typename V::reg (&acc)[MR][2]) {
  switch (R) {
    case 6: return bsr_micro<V, 6, NV>(a, sar, sak, bm, sbk, K, acc);
    case 5: return bsr_micro<V, 5, NV>(a, sar, sak, bm, sbk, K, acc);
    case 4: return bsr_micro<V, 4, NV>(a, sar, sak, bm, sbk, K, acc);
    case 3: return bsr_micro<V, 3, NV>(a, sar, sak, bm, sbk, K, acc);
    case 2: return bsr_micro<V, 2, NV>(a, sar, sak, bm, sbk, K, acc);
    default: return bsr_micro<V, 1, NV>(a, sar, sak, bm, sbk, K, acc);
  }
}

template <class V>
inline void bsr_zero(typename V::reg (&acc)[MR][2]) {
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = V::zero();
}

// out[r * ld + 8v ..] = acc[r][v] (+ bias[8v ..]) for r < R
template <class V, int NV>
inline void bsr_store(int R, const typename V::reg (&acc)[MR][2], const float* bias, float* out, int64_t ld) {
  typename V::reg bv[NV];
  for (int v = 0; v < NV; ++v) bv[v] = bias ? V::load(bias + 8 * v) : V::zero();
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) V::store(out + r * ld + 8 * v, bias ? V::add(acc[r][v], bv[v]) : acc[r][v]);
}

template <class V, int NV>
void bsr_dds_t(const float* x, int64_t B, int64_t ldx, const float* vals, const int32_t* crow, const int32_t* col,
               int64_t nbr, int b, const float* bias, float* y, int64_t ldy, int nthreads) {
  constexpr int W = 8 * NV;
  const int64_t bb = static_cast<int64_t>(b) * b;
  // a thread's transposed blocks of one block row, sized for the longest row before the region (a failed
  // allocation inside it would terminate the process)
  int64_t max_nb = 1;
  for (int64_t r = 0; r < nbr; ++r) max_nb = std::max<int64_t>(max_nb, crow[r + 1] - crow[r]);
  const ThreadScratch<float> wts(nthreads, static_cast<size_t>(max_nb * bb));
#pragma omp parallel num_threads(nthreads)
  {
#if defined(_OPENMP)
    float* wt = wts.get(omp_get_thread_num());
#else
    float* wt = wts.get(0);
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < nbr; ++r) {
      const int64_t j0 = crow[r], nb = crow[r + 1] - j0;
      // this block row's blocks, each transposed: wt[j][k][o] = W[o][k]
      for (int64_t j = 0; j < nb; ++j) {
        const float* s = vals + (j0 + j) * bb;
        float* d = wt + j * bb;
        for (int o = 0; o < b; ++o)
          for (int k = 0; k < b; ++k) d[k * b + o] = s[o * b + k];
      }
      for (int64_t i0 = 0; i0 < B; i0 += MR) {
        const int R = static_cast<int>(std::min<int64_t>(MR, B - i0));
        for (int p = 0; p < b; p += W) {
          typename V::reg acc[MR][2];
          bsr_zero<V>(acc);
          for (int64_t j = 0; j < nb; ++j)
            bsr_micro_rows<V, NV>(R, x + i0 * ldx + static_cast<int64_t>(col[j0 + j]) * b, ldx, 1,
                                  wt + j * bb + p, b, b, acc);
          bsr_store<V, NV>(R, acc, bias ? bias + r * b + p : nullptr, y + i0 * ldy + r * b + p, ldy);
        }
      }
    }
  }
}

template <class V, int NV>
void bsr_dsd_t(const float* dy, int64_t B, int64_t ldd, const float* vals, const int32_t* t_crow, const int32_t* t_row,
               const int32_t* t_perm, int64_t nbc, int b, float* dx, int64_t ldx, int nthreads) {
  constexpr int W = 8 * NV;
  const int64_t bb = static_cast<int64_t>(b) * b;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t c = 0; c < nbc; ++c) {
    const int64_t j0 = t_crow[c], j1 = t_crow[c + 1];
    for (int64_t i0 = 0; i0 < B; i0 += MR) {
      const int R = static_cast<int>(std::min<int64_t>(MR, B - i0));
      for (int p = 0; p < b; p += W) {
        typename V::reg acc[MR][2];
        bsr_zero<V>(acc);
        for (int64_t j = j0; j < j1; ++j)
          bsr_micro_rows<V, NV>(R, dy + i0 * ldd + static_cast<int64_t>(t_row[j]) * b, ldd, 1,
                                vals + static_cast<int64_t>(t_perm[j]) * bb + p, b, b, acc);
        bsr_store<V, NV>(R, acc, nullptr, dx + i0 * ldx + c * b + p, ldx);
      }
    }
  }
}

// rows [0, B) x columns [c0, c0 + b) of a (row stride ld) -> p [B][b], contiguous
inline void bsr_pack_panel(const float* a, int64_t B, int64_t ld, int64_t c0, int b, float* p) {
  for (int64_t i = 0; i < B; ++i) std::memcpy(p + i * b, a + i * ld + c0, sizeof(float) * b);
}

template <class V, int NV>
void bsr_sdd_t(const float* dy, int64_t B, int64_t ldd, const float* x, int64_t ldx, const int32_t* row,
               const int32_t* col, int64_t nblk, int b, float* dvals, int nthreads) {
  constexpr int W = 8 * NV;
  const int64_t bb = static_cast<int64_t>(b) * b;
  // the batch is the inner dimension here, so the tile would walk dy and x down their columns: rows
  // ld apart, all in one l1 set when ld is a multiple of 4 KB. each thread copies the block's
  // [B, b] panels of x and dy into contiguous buffers first (dy's once per block row, since blocks
  // come in block-row order), and the tile then streams them.
  // NOTE: 4096x4096 B=256, 10% of 32-blocks, 1 thread: 29 GF/s reading x and dy in place.
  const size_t pn = static_cast<size_t>(std::max<int64_t>(1, B * b));
  const ThreadScratch<float> dps(nthreads, pn), xps(nthreads, pn);
#pragma omp parallel num_threads(nthreads)
  {
#if defined(_OPENMP)
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    float* dp = dps.zeroed(tid, pn);
    float* xp = xps.zeroed(tid, pn);
    int64_t packed_row = -1;
#pragma omp for schedule(dynamic, 4)
    for (int64_t k = 0; k < nblk; ++k) {
      if (row[k] != packed_row) {
        packed_row = row[k];
        bsr_pack_panel(dy, B, ldd, packed_row * b, b, dp);
      }
      bsr_pack_panel(x, B, ldx, static_cast<int64_t>(col[k]) * b, b, xp);
      float* out = dvals + k * bb;
      for (int o0 = 0; o0 < b; o0 += MR) {
        const int R = std::min(MR, b - o0);
        for (int p = 0; p < b; p += W) {
          typename V::reg acc[MR][2];
          bsr_zero<V>(acc);
          bsr_micro_rows<V, NV>(R, dp + o0, 1, b, xp + p, b, B, acc);
          bsr_store<V, NV>(R, acc, nullptr, out + static_cast<int64_t>(o0) * b + p, b);
        }
      }
    }
  }
}

}  // namespace
}  // namespace sparseops

// b = 8 fills one vector per row of the tile, every other size two
#define SPARSEOPS_BSR_INSTANTIATE(V, suffix)                                                                        \
  void bsr_dds_##suffix(const float* x, int64_t B, int64_t ldx, const float* vals, const int32_t* crow,            \
                        const int32_t* col, int64_t nbr, int b, const float* bias, float* y, int64_t ldy, int nt) {  \
    note_isa_call(ISA_OF_##suffix);                                                                                  \
    if (b == 8) return bsr_dds_t<V, 1>(x, B, ldx, vals, crow, col, nbr, b, bias, y, ldy, nt);                     \
    bsr_dds_t<V, 2>(x, B, ldx, vals, crow, col, nbr, b, bias, y, ldy, nt);                                        \
  }                                                                                                                 \
  void bsr_dsd_##suffix(const float* dy, int64_t B, int64_t ldd, const float* vals, const int32_t* t_crow,         \
                        const int32_t* t_row, const int32_t* t_perm, int64_t nbc, int b, float* dx, int64_t ldx,   \
                        int nt) {                                                                                   \
    note_isa_call(ISA_OF_##suffix);                                                                                 \
    if (b == 8) return bsr_dsd_t<V, 1>(dy, B, ldd, vals, t_crow, t_row, t_perm, nbc, b, dx, ldx, nt);             \
    bsr_dsd_t<V, 2>(dy, B, ldd, vals, t_crow, t_row, t_perm, nbc, b, dx, ldx, nt);                                \
  }                                                                                                                 \
  void bsr_sdd_##suffix(const float* dy, int64_t B, int64_t ldd, const float* x, int64_t ldx, const int32_t* row,  \
                        const int32_t* col, int64_t nblk, int b, float* dvals, int nt) {                           \
    note_isa_call(ISA_OF_##suffix);                                                                                \
    if (b == 8) return bsr_sdd_t<V, 1>(dy, B, ldd, x, ldx, row, col, nblk, b, dvals, nt);                         \
    bsr_sdd_t<V, 2>(dy, B, ldd, x, ldx, row, col, nblk, b, dvals, nt);                                            \
  }
