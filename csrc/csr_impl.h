// unstructured CSR kernels, written once over a vector type V (see simd.h) and
// instantiated per ISA in csr_avx2.cpp and csr_portable.cpp.
//
// layout: for batches of 8 or more, activations are packed batch-major in tiles of
// BT = 8*NV lanes, P[t][k][l] = A[t*BT + l][k] (zero padded), so every stored weight
// drives NV contiguous FMAs over the batch (the SparseProp idea, tiled so that one
// tile of the packed input, K*BT floats, stays in L2 while a thread sweeps its rows).
// for batches under 8 the lanes would be mostly padding, so those use gathers instead.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "csr.h"
#include "simd.h"

namespace sparseops {
namespace detail {

// per calling thread, so that concurrent calls from several python threads never share it.
// inside a parallel region every omp thread gets its own, so slots used there (ACC, the
// cursors) must differ from the ones the calling thread shares with its team (P, PX, COPY*).
enum Slot { P = 0, PX = 1, COPY1 = 2, COPY2 = 3, ACC = 4, NSLOTS = 5 };
inline float* scratch(int slot, size_t n) {
  thread_local std::vector<float> bufs[NSLOTS];
  if (bufs[slot].size() < n) bufs[slot].resize(n);
  return bufs[slot].data();
}
inline int32_t* cursors(size_t n) {
  thread_local std::vector<int32_t> cur;
  if (cur.size() < n) cur.resize(n);
  return cur.data();
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int thread_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// contiguous row ranges balanced by cost = nonzeros + ROW_COST per row (the output store).
// no barriers between rows: each thread owns its rows for the whole call.
inline void row_range(const int32_t* ptr, int64_t n, int tid, int nt, int64_t* r0, int64_t* r1) {
  constexpr int64_t ROW_COST = 8;
  auto cost = [&](int64_t r) { return static_cast<int64_t>(ptr[r]) + r * ROW_COST; };
  const int64_t total = cost(n);
  auto first_at = [&](int64_t target) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      int64_t mid = (lo + hi) / 2;
      if (cost(mid) < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  *r0 = tid == 0 ? 0 : first_at(total * tid / nt);
  *r1 = tid == nt - 1 ? n : first_at(total * (tid + 1) / nt);
}

// A [B, K] (strides s0, s1) -> P [T][K][BT], zero padded past B
template <int BT>
void pack(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, float* p, int nthreads) {
  const int64_t T = (B + BT - 1) / BT;
  constexpr int64_t KB = 64;
  const int64_t nkb = (K + KB - 1) / KB;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t k0 = kb * KB, k1 = std::min(K, k0 + KB);
      float* pt = p + t * K * BT;
      const int64_t nb = std::min<int64_t>(BT, B - t * BT);
      for (int64_t l = 0; l < nb; ++l) {
        const float* ar = a + (t * BT + l) * s0;
        for (int64_t k = k0; k < k1; ++k) pt[k * BT + l] = ar[k * s1];
      }
      for (int64_t l = nb; l < BT; ++l)
        for (int64_t k = k0; k < k1; ++k) pt[k * BT + l] = 0.f;
    }
  }
}

// y[b0 + l, i] = sum_k vals[k] * P[idx[k]][l] (+ bias[i]) for rows i in [r0, r1)
template <class V, int NV>
void rows_tile(const float* pt, const float* vals, const int32_t* ptr, const int32_t* idx, int64_t r0, int64_t r1,
               const float* bias, float* y, int64_t ldy, int64_t nb) {
  constexpr int BT = 8 * NV;
  // U independent accumulator sets keep 8 FMA chains in flight (latency 4 x 2 ports)
  constexpr int U = NV >= 8 ? 1 : 8 / NV;
  alignas(32) float tmp[BT];
  for (int64_t i = r0; i < r1; ++i) {
    typename V::reg acc[U][NV];
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < NV; ++v) acc[u][v] = V::zero();
    int64_t k = ptr[i];
    const int64_t e = ptr[i + 1];
    for (; k + U <= e; k += U) {
      for (int u = 0; u < U; ++u) {
        const typename V::reg w = V::bcast(vals[k + u]);
        const float* xr = pt + static_cast<int64_t>(idx[k + u]) * BT;
        for (int v = 0; v < NV; ++v) acc[u][v] = V::fma(w, V::load(xr + 8 * v), acc[u][v]);
      }
    }
    for (; k < e; ++k) {
      const typename V::reg w = V::bcast(vals[k]);
      const float* xr = pt + static_cast<int64_t>(idx[k]) * BT;
      for (int v = 0; v < NV; ++v) acc[0][v] = V::fma(w, V::load(xr + 8 * v), acc[0][v]);
    }
    for (int u = 1; u < U; ++u)
      for (int v = 0; v < NV; ++v) acc[0][v] = V::add(acc[0][v], acc[u][v]);
    for (int v = 0; v < NV; ++v) V::store(tmp + 8 * v, acc[0][v]);
    const float b = bias ? bias[i] : 0.f;
    for (int64_t l = 0; l < nb; ++l) y[l * ldy + i] = tmp[l] + b;
  }
}

// dvals[k] (+)= sum_l DY[row i][l] * X[col k][l] over one tile, for rows [r0, r1)
template <class V, int NV>
void sdd_tile(const float* dyt, const float* xt, const int32_t* ptr, const int32_t* col, int64_t r0, int64_t r1,
              float* dv, bool first) {
  constexpr int BT = 8 * NV;
  alignas(32) float tmp[8];
  for (int64_t i = r0; i < r1; ++i) {
    int64_t k = ptr[i];
    const int64_t e = ptr[i + 1];
    if (k == e) continue;
    typename V::reg d[NV];
    for (int v = 0; v < NV; ++v) d[v] = V::load(dyt + i * BT + 8 * v);
    typename V::reg a[8];
    // 8 nonzeros at a time: 8 independent dot products, reduced together by one hadd tree
    for (; k + 8 <= e; k += 8) {
      for (int m = 0; m < 8; ++m) {
        const float* xr = xt + static_cast<int64_t>(col[k + m]) * BT;
        a[m] = V::fma(d[0], V::load(xr), V::zero());
        for (int v = 1; v < NV; ++v) a[m] = V::fma(d[v], V::load(xr + 8 * v), a[m]);
      }
      typename V::reg s = V::hsum8(a);
      if (!first) s = V::add(s, V::load(dv + k));
      V::store(dv + k, s);
    }
    if (k < e) {
      const int rem = static_cast<int>(e - k);
      for (int m = 0; m < 8; ++m) {
        a[m] = V::zero();
        if (m < rem) {
          const float* xr = xt + static_cast<int64_t>(col[k + m]) * BT;
          for (int v = 0; v < NV; ++v) a[m] = V::fma(d[v], V::load(xr + 8 * v), a[m]);
        }
      }
      V::store(tmp, V::hsum8(a));
      for (int m = 0; m < rem; ++m) dv[k + m] = first ? tmp[m] : dv[k + m] + tmp[m];
    }
  }
}

// small batch: y[b, i] = sum_k vals[k] * a[b, idx[k]] with a contiguous [B, K]
template <class V>
void rows_gather(const float* a, int64_t B, int64_t K, const float* vals, const int32_t* ptr, const int32_t* idx,
                 int64_t n, const float* bias, float* y, int64_t ldy, int nthreads) {
#pragma omp parallel num_threads(nthreads)
  {
    int64_t r0, r1;
    row_range(ptr, n, thread_id(), thread_count(), &r0, &r1);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t s = ptr[i], e = ptr[i + 1];
      for (int64_t b = 0; b < B; ++b) {
        const float* ab = a + b * K;
        typename V::reg acc0 = V::zero(), acc1 = V::zero();
        int64_t k = s;
        for (; k + 16 <= e; k += 16) {
          acc0 = V::fma(V::load(vals + k), V::gather(ab, idx + k), acc0);
          acc1 = V::fma(V::load(vals + k + 8), V::gather(ab, idx + k + 8), acc1);
        }
        for (; k + 8 <= e; k += 8) acc0 = V::fma(V::load(vals + k), V::gather(ab, idx + k), acc0);
        float r = V::sum(V::add(acc0, acc1));
        for (; k < e; ++k) r += vals[k] * ab[idx[k]];
        y[b * ldy + i] = r + (bias ? bias[i] : 0.f);
      }
    }
  }
}

template <class V>
void sdd_gather(const float* dy, const float* x, int64_t B, int64_t out, int64_t in, const int32_t* ptr,
                const int32_t* col, float* dv, int nthreads) {
#pragma omp parallel num_threads(nthreads)
  {
    int64_t r0, r1;
    row_range(ptr, out, thread_id(), thread_count(), &r0, &r1);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t s = ptr[i], e = ptr[i + 1];
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = x + b * in;
        const typename V::reg g = V::bcast(dy[b * out + i]);
        int64_t k = s;
        for (; k + 8 <= e; k += 8) {
          typename V::reg prev = b == 0 ? V::zero() : V::load(dv + k);
          V::store(dv + k, V::fma(g, V::gather(xb, col + k), prev));
        }
        const float gs = dy[b * out + i];
        for (; k < e; ++k) dv[k] = (b == 0 ? 0.f : dv[k]) + gs * xb[col[k]];
      }
    }
  }
}

// contiguous copy of a strided [B, K] matrix (small batches only)
inline const float* contiguous(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, int slot) {
  if (s1 == 1 && s0 == K) return a;
  float* c = scratch(slot, static_cast<size_t>(B * K));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) c[b * K + k] = a[b * s0 + k * s1];
  return c;
}

// the batch-major product shared by dds and dsd: y [B, n] from a [B, K] (strided) and CSR (vals, ptr, idx) [n, K]
template <class V, int NV>
void spmm_packed(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals,
                 const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, float* y, int nthreads) {
  constexpr int BT = 8 * NV;
  const int64_t T = (B + BT - 1) / BT;
  float* p = scratch(0, static_cast<size_t>(T * K * BT));
  pack<BT>(a, B, K, s0, s1, p, nthreads);
#pragma omp parallel num_threads(nthreads)
  {
    int64_t r0, r1;
    row_range(ptr, n, thread_id(), thread_count(), &r0, &r1);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t nb = std::min<int64_t>(BT, B - t * BT);
      rows_tile<V, NV>(p + t * K * BT, vals, ptr, idx, r0, r1, bias, y + t * BT * n, n, nb);
    }
  }
}

template <class V>
void spmm(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals, const int32_t* ptr,
          const int32_t* idx, int64_t n, const float* bias, float* y, int nthreads) {
  if (B < 8) {
    const float* ac = contiguous(a, B, K, s0, s1, 1);
    rows_gather<V>(ac, B, K, vals, ptr, idx, n, bias, y, n, nthreads);
  } else if (B <= 8) {
    spmm_packed<V, 1>(a, B, K, s0, s1, vals, ptr, idx, n, bias, y, nthreads);
  } else if (B <= 16) {
    spmm_packed<V, 2>(a, B, K, s0, s1, vals, ptr, idx, n, bias, y, nthreads);
  } else if (B <= 24) {
    spmm_packed<V, 3>(a, B, K, s0, s1, vals, ptr, idx, n, bias, y, nthreads);
  } else {
    const char* e = std::getenv("SPARSEOPS_NV");
    int nv = e ? std::atoi(e) : 4;
    if (nv == 1) spmm_packed<V, 1>(a, B, K, s0, s1, vals, ptr, idx, n, bias, y, nthreads);
    else if (nv == 2) spmm_packed<V, 2>(a, B, K, s0, s1, vals, ptr, idx, n, bias, y, nthreads);
    else if (nv == 8) spmm_packed<V, 8>(a, B, K, s0, s1, vals, ptr, idx, n, bias, y, nthreads);
    else spmm_packed<V, 4>(a, B, K, s0, s1, vals, ptr, idx, n, bias, y, nthreads);
  }
}

template <class V, int NV>
void sdd_packed(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in,
                int64_t x0, int64_t x1, const int32_t* crow, const int32_t* col, float* dv, int nthreads) {
  constexpr int BT = 8 * NV;
  const int64_t T = (B + BT - 1) / BT;
  float* pd = scratch(0, static_cast<size_t>(T * out * BT));
  float* px = scratch(1, static_cast<size_t>(T * in * BT));
  pack<BT>(dy, B, out, d0, d1, pd, nthreads);
  pack<BT>(x, B, in, x0, x1, px, nthreads);
#pragma omp parallel num_threads(nthreads)
  {
    int64_t r0, r1;
    row_range(crow, out, thread_id(), thread_count(), &r0, &r1);
    for (int64_t t = 0; t < T; ++t)
      sdd_tile<V, NV>(pd + t * out * BT, px + t * in * BT, crow, col, r0, r1, dv, t == 0);
  }
}

template <class V>
void sdd(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in, int64_t x0,
         int64_t x1, const int32_t* crow, const int32_t* col, float* dv, int nthreads) {
  const int64_t nnz = crow[out];
  if (B == 0) {
    std::fill(dv, dv + nnz, 0.f);
  } else if (B < 8) {
    const float* dyc = contiguous(dy, B, out, d0, d1, 1);
    const float* xc = contiguous(x, B, in, x0, x1, 2);
    sdd_gather<V>(dyc, xc, B, out, in, crow, col, dv, nthreads);
  } else if (B <= 8) {
    sdd_packed<V, 1>(dy, B, out, d0, d1, x, in, x0, x1, crow, col, dv, nthreads);
  } else if (B <= 16) {
    sdd_packed<V, 2>(dy, B, out, d0, d1, x, in, x0, x1, crow, col, dv, nthreads);
  } else if (B <= 24) {
    sdd_packed<V, 3>(dy, B, out, d0, d1, x, in, x0, x1, crow, col, dv, nthreads);
  } else {
    sdd_packed<V, 4>(dy, B, out, d0, d1, x, in, x0, x1, crow, col, dv, nthreads);
  }
}

}  // namespace detail

#define SPARSEOPS_CSR_INSTANTIATE(V, SUFFIX)                                                                      \
  void csr_spmm_##SUFFIX(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals,        \
                         const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, float* y,         \
                         int nthreads) {                                                                         \
    detail::spmm<V>(a, B, K, s0, s1, vals, ptr, idx, n, bias, y, nthreads);                                      \
  }                                                                                                              \
  void csr_sdd_##SUFFIX(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x,          \
                        int64_t in, int64_t x0, int64_t x1, const int32_t* crow, const int32_t* col, float* dv,  \
                        int nthreads) {                                                                          \
    detail::sdd<V>(dy, B, out, d0, d1, x, in, x0, x1, crow, col, dv, nthreads);                                  \
  }

}  // namespace sparseops
