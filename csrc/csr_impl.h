// unstructured CSR kernels, written once over a vector type V (see simd.h) and
// instantiated per ISA in csr_avx2.cpp and csr_portable.cpp.
//
// layout: for batches of 8 or more, activations are packed batch-major in tiles of
// BT = 8*NV lanes, P[t][k][l] = A[t*BT + l][k] (zero padded), so every stored weight
// drives NV contiguous FMAs over the batch (the SparseProp idea). a tile of P, K*BT floats,
// is swept in column chunks over row blocks (see CHUNK_BYTES), reading each thread's index
// through a chunk-major copy made once per call (see Blocked), so that the random row reads
// of P hit L2 and the index is streamed. the pack and the output store go through 8x8
// register transposes. each op is one parallel region: a work-shared pack, one barrier,
// then every thread owns a contiguous, nnz-balanced range of rows.
// for batches under 8 the lanes would be mostly padding, so those use gathers instead.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <type_traits>
#include <vector>

#include "scratch.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include "csr.h"
#include "simd.h"

namespace sparseops {
namespace detail {
// internal linkage for everything below: each ISA's translation unit (*_avx2.cpp built with -mavx2
// -mfma, *_portable.cpp without) keeps its own copy. with external linkage an inline function the
// compiler did not inline (block_store, row_range, scratch, ...) was one weak symbol, and the linker
// could hand the portable path the copy compiled for AVX2 (tests/test_build.py checks the objects).
namespace {

// a read prefetch into every cache level (a no-op where the compiler has no builtin)
inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// per calling thread, so that concurrent calls from several python threads never share it.
// inside a parallel region every omp thread gets its own, so slots used there (ACC*, the
// blocked index) must differ from the ones the calling thread shares with its team (P, PX, COPY*).
enum Slot { P = 0, PX = 1, COPY1 = 2, COPY2 = 3, VALS = 4, ACC = 5, ACC2 = 6, YOUT = 7, NSLOTS = 8 };
// a grow-only buffer. 64-byte aligned so that a packed row of 32 lanes (128 bytes) spans two
// cache lines, not three; buffers of 2 MB and more are 2 MB aligned and advised onto
// transparent huge pages, because the kernels read random rows of them.
// NOTE: a standalone loop of the dds inner kernel over one 512 KB packed tile (4096 rows x 410
// nonzeros x 32 lanes, 1 thread) ran at 17-20 GF/s from a std::vector (16 bytes past a page
// boundary), 24-29 GF/s 64-byte aligned and 30 GF/s aligned on huge pages.
class AlignedBuffer {
 public:
  static constexpr size_t kHuge = size_t(2) << 20;
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(ptr_); }
  void* get(size_t bytes) {
    if (bytes > cap_) {
      std::free(ptr_);
      ptr_ = nullptr;
      cap_ = 0;
      const size_t align = bytes >= kHuge ? kHuge : 64;
      const size_t rounded = (bytes + align - 1) / align * align;
      ptr_ = std::aligned_alloc(align, rounded);
      if (!ptr_) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (align == kHuge) madvise(ptr_, rounded, MADV_HUGEPAGE);
#endif
      cap_ = rounded;
    }
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  size_t cap_ = 0;
};

inline float* scratch(int slot, size_t n) {
  thread_local AlignedBuffer bufs[NSLOTS];
  return static_cast<float*>(bufs[slot].get(n * sizeof(float)));
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

// one block of the pack: rows [k0, k1) of tile P_t = A[b0 .. b0+nb)ᵀ, zero padded to BT lanes.
// contiguous rows go through 8x8 register transposes (8 loads + 8 stores of 8 floats)
// instead of one strided scalar store per element.
template <class V, int BT>
void pack_block(const float* a, int64_t s0, int64_t s1, int64_t b0, int64_t nb, int64_t k0, int64_t k1, float* pt) {
  int64_t l = 0;
  if (s1 == 1) {
    for (; l + 8 <= nb; l += 8) {
      const float* ar = a + (b0 + l) * s0;
      int64_t k = k0;
      for (; k + 8 <= k1; k += 8) {
        typename V::reg r[8];
        for (int j = 0; j < 8; ++j) r[j] = V::load(ar + j * s0 + k);
        V::transpose8(r);
        for (int j = 0; j < 8; ++j) V::store(pt + (k + j) * BT + l, r[j]);
      }
      for (; k < k1; ++k)
        for (int j = 0; j < 8; ++j) pt[k * BT + l + j] = ar[j * s0 + k];
    }
  }
  for (; l < nb; ++l) {
    const float* ar = a + (b0 + l) * s0;
    for (int64_t k = k0; k < k1; ++k) pt[k * BT + l] = ar[k * s1];
  }
  for (l = nb; l < BT; ++l)
    for (int64_t k = k0; k < k1; ++k) pt[k * BT + l] = 0.f;
}

// A [B, K] (strides s0, s1) -> P [T][K][BT]; call from inside a parallel region (work-shared)
template <class V, int BT>
void pack(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, float* p) {
  const int64_t T = (B + BT - 1) / BT;
  constexpr int64_t KB = 64;
  const int64_t nkb = (K + KB - 1) / KB;
#pragma omp for schedule(static) collapse(2)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t k0 = kb * KB, k1 = std::min(K, k0 + KB);
      pack_block<V, BT>(a, s0, s1, t * BT, std::min<int64_t>(BT, B - t * BT), k0, k1, p + t * K * BT);
    }
  }
}

// column blocking: a tile of P (K*BT floats, 512 KB at K=4096, BT=32) is swept in chunks of
// CHUNK_BYTES, and rows in blocks of BLOCK_BYTES of accumulators, so that the chunk and the
// block's accumulators stay in L2 together instead of every nonzero reading 4 random lines
// of a tile that spills to L3.
// NOTE: dds 4096x4096 B=256, 1 thread, ms at 90% / 95% (noisy shared machine, +-15%):
// chunk 16K: 55/33, 32K: 47/29, 64K: 47/26, 128K: 51/26 (row blocks of 64K); unblocked 54/31.
// smaller chunks lose at 95% because each (row, chunk) visit then has only a few nonzeros.
constexpr int64_t CHUNK_BYTES = 65536;
constexpr int64_t BLOCK_BYTES = 65536;
// NOTE: 1024x1024 B=64 (tile 128 KB), 1 thread: blocked with 64K chunks 1.32/1.52/1.32 ms
// dds/dsd/sdd vs 1.03/1.18/0.81 unblocked, so tiles up to this size are not blocked.
constexpr int64_t SMALL_TILE_BYTES = 262144;
// NOTE: 4096x4096, 1 thread, 90%, ms dds/dsd/sdd blocked vs unblocked: B=64 (2 tiles) 17.5/21.9/19.1
// vs 13.1/22.2/9.0; B=128 (4 tiles) 26.8/33.3/33.7 vs 26.3/29.4/25.2; B=256 (8 tiles) 36.2/46.0/53.3
// vs 46.1/59.0/55.0, when the copy was a counting sort that cost ~10 ms per call at 1 thread.
// NOTE: with the copy by runs (~3 ms) sdd blocks too (its sums go back by runs): B=256 1 thread
// sdd 35.0 vs 46.8 unblocked. B=128 (4 tiles) blocked vs unblocked, 1 thread, same process:
// 54.8/56.8/71.3 vs 53.4/50.5/65.7 ms for the three ops together, so 8 tiles stays the threshold.
constexpr int64_t MIN_TILES = 8;
// P rows (columns of the activations) a chunk holds: enough that a (row, chunk) visit averages
// CHUNK_NNZ nonzeros, from an L1-sized chunk (CHUNK_MIN_BYTES) up to CHUNK_BYTES. the density is
// the whole matrix's, nnz / (rows * K).
// NOTE: 4096x4096 B=256, 2 threads, ms dds/sdd/dsd(transposed CSR) with 16 KB vs 64 KB chunks (two
// runs each, the dense GEMM 69-83 ms in the same runs): 2:4 mask (50%) 64-67/89-102/92-113 vs
// 104-106/123-130/125-135; 1:4 (25%) 31-35/40-41/52-55 vs 42-44/48-52/58-63, 24 KB in between and
// 8 KB worse (40-42/48-50/62-67); 2:8 likewise. at 90% the 16 KB chunk lost (NOTE above).
constexpr int64_t CHUNK_MIN_BYTES = 16384;
constexpr double CHUNK_NNZ = 40.0;
inline int64_t chunk_rows_for(int BT, int64_t nnz, int64_t rows, int64_t K) {
  const int64_t lo = std::max<int64_t>(8, CHUNK_MIN_BYTES / (4 * BT)), hi = std::max<int64_t>(8, CHUNK_BYTES / (4 * BT));
  if (nnz <= 0 || rows <= 0 || K <= 0) return hi;
  const double want = CHUNK_NNZ * static_cast<double>(rows) * static_cast<double>(K) / static_cast<double>(nnz);
  return want <= static_cast<double>(lo) ? lo : want >= static_cast<double>(hi) ? hi : static_cast<int64_t>(want);
}
inline int64_t block_rows_count(int BT) { return std::max<int64_t>(8, BLOCK_BYTES / (4 * BT)); }
// the lanes of one walk step of the weight gradient, which the column chunk is sized for: on the 16-lane
// path sdd_all_tiles reads up to four batch tiles of each column at once
template <class V, int NV>
inline int sdd_step_lanes(int64_t T) {
  if constexpr (V::wide && NV % 2 == 0) return 8 * NV * static_cast<int>(std::min<int64_t>(T, 4));
  return 8 * NV;
}

// one thread's rows [r0, r1) of a CSR matrix, re-laid block- and chunk-major: local rows are
// grouped in blocks of RB, and for the block starting at local row q (RBs rows), chunk c
// (columns [c*KC, (c+1)*KC)) and local row r the nonzeros are idx/val[off[j] .. off[j + 1])
// with j = q*nch + c*RBs + (r - q).
// walking a chunk then streams idx/val/off sequentially; with the original row-major
// order every (row, chunk) visit jumped to a new line and page of idx and vals.
struct Blocked {
  int64_t nch = 0, R = 0, RB = 0;
  const int32_t* off = nullptr;
  const int32_t* idx = nullptr;
  const float* val = nullptr;   // only when built with vals
  const int32_t* src = nullptr;  // when nch > 1: where run j starts in the original order
};

// the storage behind a Blocked, per omp thread; the fused backward holds two at once
struct BlockStore {
  std::vector<int32_t> off, src, idx;
  std::vector<float> val;
};
inline BlockStore& block_store(int i) {
  thread_local BlockStore stores[2];
  return stores[i];
}

// dst[k - ptr[r0]] = vals[perm[k]] over the entries k of rows [r0, r1) of a transposed index (ptr, idx:
// Wᵀ's CSR, idx sorted within each row and below K, as the bindings check), in blocks of GATHER_ROWS rows by
// GATHER_COLS columns. entry k reads W's row idx[k], a page of W each: in source order every entry of a
// row is on a page of its own, and past the TLB's reach each read missed it. a block reads GATHER_COLS
// rows of W, a short run of each. a cursor per row carries it from one column block to the next.
// NOTE: 2:4 at 4096² (8.4M values), 2 threads, the input gradient through Wᵀ's CSR: 40-50 ms at B = 1 to 64
// in source order, against a forward of 1.6-23 ms; the unstructured 90% one 5-8 ms against 1-2.
constexpr int64_t GATHER_ROWS = 256, GATHER_COLS = 256;
// below a density of 1/4 a (row, column block) visit holds too few entries for its bookkeeping, and the
// source order is kept: unstructured 90% at 4096² (6.7 MB of W), B = 1 to 16, ran 0.65-0.69x as fast blocked.
inline void gather_blocked(const float* vals, const int32_t* perm, const int32_t* ptr, const int32_t* idx, int64_t r0,
                           int64_t r1, int64_t K, float* dst) {
  const int64_t base = ptr[r0];
  if ((ptr[r1] - base) * 4 < (r1 - r0) * K) {
    for (int64_t k = base; k < ptr[r1]; ++k) dst[k - base] = vals[perm[k]];
    return;
  }
  int64_t cur[GATHER_ROWS];
  for (int64_t q = r0; q < r1; q += GATHER_ROWS) {
    const int64_t qe = std::min(r1, q + GATHER_ROWS);
    for (int64_t r = q; r < qe; ++r) cur[r - q] = ptr[r];
    for (int64_t c0 = 0; c0 < K; c0 += GATHER_COLS) {
      const int64_t bound = c0 + GATHER_COLS < K ? c0 + GATHER_COLS : K;
      for (int64_t r = q; r < qe; ++r) {
        int64_t k = cur[r - q];
        const int64_t e = ptr[r + 1];
        for (; k < e && idx[k] < bound; ++k) dst[k - base] = vals[perm[k]];
        cur[r - q] = k;
      }
    }
    // entries past column K (none in a checked index) are still written, in source order
    for (int64_t r = q; r < qe; ++r)
      for (int64_t k = cur[r - q]; k < ptr[r + 1]; ++k) dst[k - base] = vals[perm[k]];
  }
}

inline Blocked block_rows(BlockStore& st, const int32_t* ptr, const int32_t* idx, const float* vals,
                          const int32_t* perm, int64_t r0, int64_t r1, int BT, int64_t T, int64_t KC, int64_t RB,
                          int64_t K) {
  std::vector<int32_t>& off = st.off;
  std::vector<int32_t>& src = st.src;
  std::vector<int32_t>& bidx = st.idx;
  std::vector<float>& bval = st.val;
  Blocked b;
  b.R = r1 - r0;
  b.RB = RB;
  // a tile that fits in half of L2, or too few tiles to pay for the copy: one chunk, the original order
  // a transposed walk (values through perm) splits from 2 tiles and a 32 KB tile: there the split also
  // puts the value gather in chunk order (below), which the unsplit walk does in source order.
  // NOTE: in-process A/B against splitting only at 8 tiles and 256 KB, 2 threads, 10 alternations,
  // median old/new: the N:M input gradient through Wᵀ's CSR 1.55x (2:4, 4096² B=64), 1.11x (1024²
  // B=64); unstructured forward+backward at 4096² B=64 1.03x (90%), 1.02x (95%), 1.18x (75%), 1.00x
  // at 1024² B=64 90%. splitting the other walks there too lost on unstructured layers (0.82-0.87x
  // at 90-95%, 0.93x at 75%).
  // (counted in 32-lane tiles: the 16-lane path's 64-lane tiles split from 4, at the same batch)
  const bool split = (K * 4 * BT > SMALL_TILE_BYTES && T * BT >= MIN_TILES * 32) ||
                     (vals && perm && K * 4 * BT > 2 * CHUNK_MIN_BYTES && T >= 2);
  b.nch = split ? std::max<int64_t>(1, (K + KC - 1) / KC) : 1;
  const int64_t R = b.R, nch = b.nch, base = ptr[r0], nz = ptr[r1] - base;
  off.assign(static_cast<size_t>(nch * R + 1), 0);
  if (nch == 1) {
    // one chunk: the row-major order already is chunk-major
    for (int64_t r = 0; r <= R; ++r) off[r] = ptr[r0 + r] - static_cast<int32_t>(base);
    b.off = off.data();
    b.idx = idx + base;
    b.val = vals ? vals + base : nullptr;
    if (vals && perm) {
      if (bval.size() < static_cast<size_t>(nz)) bval.resize(static_cast<size_t>(nz));
      gather_blocked(vals, perm, ptr, idx, r0, r1, K, bval.data());
      b.val = bval.data();
    }
    return b;
  }
  // every row's indices are sorted, so its nonzeros in chunk c are one contiguous run of the
  // row: the runs' ends come from one compare per nonzero, and then whole runs are copied.
  // NOTE: a counting sort (a division, a histogram increment and a scattered store per
  // nonzero) took 5.0 ms of each thread's 20 ms on dds 4096x4096 B=256 90% at 2 threads (8 ms
  // of dsd's 25, with the value gather); these runs take 1.4-1.5 ms (3.9 ms for dsd).
  if (src.size() < static_cast<size_t>(nch * R)) src.resize(static_cast<size_t>(nch * R));
  for (int64_t q = 0; q < R; q += RB) {
    const int64_t RBs = std::min(RB, R - q);
    for (int64_t r = q; r < q + RBs; ++r) {
      int64_t k = ptr[r0 + r];
      const int64_t e = ptr[r0 + r + 1];
      for (int64_t c = 0; c < nch; ++c) {
        const int64_t j = q * nch + c * RBs + (r - q);
        const int64_t bound = c + 1 == nch ? K : (c + 1) * KC;
        int64_t k1 = k;
        while (k1 < e && idx[k1] < bound) ++k1;
        src[j] = static_cast<int32_t>(k);
        off[j + 1] = static_cast<int32_t>(k1 - k);
        k = k1;
      }
    }
  }
  for (int64_t j = 0; j < nch * R; ++j) off[j + 1] += off[j];
  if (bidx.size() < static_cast<size_t>(nz)) bidx.resize(static_cast<size_t>(nz));
  if (vals && bval.size() < static_cast<size_t>(nz)) bval.resize(static_cast<size_t>(nz));
  // in source order: the reads stream, the writes go to nch sequential streams
  for (int64_t q = 0; q < R; q += RB) {
    const int64_t RBs = std::min(RB, R - q);
    for (int64_t r = q; r < q + RBs; ++r)
      for (int64_t c = 0; c < nch; ++c) {
        const int64_t j = q * nch + c * RBs + (r - q);
        const int64_t d = off[j], len = off[j + 1] - d, s = src[j];
        // an empty run: no copy, since a thread with no nonzeros has no buffer (memcpy from or to null is UB)
        if (len == 0) continue;
        std::memcpy(bidx.data() + d, idx + s, static_cast<size_t>(len) * sizeof(int32_t));
        if (vals && !perm) std::memcpy(bval.data() + d, vals + s, static_cast<size_t>(len) * sizeof(float));
      }
  }
  // values through perm (the transposed index: vals is W in row-major order) are gathered in the
  // walk's order, chunk by chunk: a chunk's runs read W's rows [c*KC, (c+1)*KC) only, a few hundred
  // pages, where the source order above reads every row of W for each row here (a TLB miss a value).
  // NOTE: 4096x4096 B=256, 2 threads, the N:M input gradient through Wᵀ's CSR, in-process A/B (10
  // alternations, median ratio): 1.33x faster at 2:4, 1.25x at 1:4, 1.23x at 2:8; unstructured 90% fwd+bwd 1.04x.
  // the permutation's runs are a row of it apart: prefetch AHEAD runs ahead. NOTE: in-process A/B as
  // above: 1.07x (2:4), 1.07x (1:4), 1.02x (2:8); prefetching the values too (half as far ahead) did
  // not add to it (0.96-0.97x).
  if (vals && perm) {
    constexpr int64_t AHEAD = 8;
    for (int64_t j = 0; j < nch * R; ++j) {
      if (j + AHEAD < nch * R) {
        const int32_t* pa = perm + src[j + AHEAD];
        const int64_t la = off[j + AHEAD + 1] - off[j + AHEAD];
        for (int64_t t = 0; t < la; t += 16) prefetch(pa + t);
      }
      const int64_t d = off[j], len = off[j + 1] - d, s = src[j];
      for (int64_t t = 0; t < len; ++t) bval[d + t] = vals[perm[s + t]];
    }
  }
  b.off = off.data();
  b.idx = bidx.data();
  b.val = vals ? bval.data() : nullptr;
  b.src = src.data();
  return b;
}

// buf[r][l] = sum_k val[k] * P[idx[k]][l] over one packed tile, for the R local rows of m, on NL vectors
// of L (V, or V::W16 on the 16-lane path) a slot
template <class L, int NL>
void rows_tile_lanes(const float* pt, const Blocked& m, float* buf) {
  constexpr int LN = L::lanes;
  constexpr int BT = LN * NL;
  // U independent accumulator sets keep 8 FMA chains in flight (latency 4 x 2 ports)
  constexpr int U = NL >= 8 ? 1 : 8 / NL;
  const int64_t R = m.R;
  const int32_t* idx = m.idx;
  const float* vals = m.val;
  for (int64_t q = 0; q < R; q += m.RB) {
    const int64_t RBs = std::min(m.RB, R - q);
    for (int64_t c = 0; c < m.nch; ++c) {
      const int32_t* oc = m.off + q * m.nch + c * RBs;
      const bool first = c == 0;
      for (int64_t r = 0; r < RBs; ++r) {
        int64_t k = oc[r];
        const int64_t e = oc[r + 1];
        float* bi = buf + (q + r) * BT;
        if (k == e) {
          if (first)
            for (int v = 0; v < NL; ++v) L::store(bi + LN * v, L::zero());
          continue;
        }
        typename L::reg acc[U][NL];
        for (int v = 0; v < NL; ++v) acc[0][v] = first ? L::zero() : L::load(bi + LN * v);
        for (int u = 1; u < U; ++u)
          for (int v = 0; v < NL; ++v) acc[u][v] = L::zero();
        for (; k + U <= e; k += U) {
          for (int u = 0; u < U; ++u) {
            const typename L::reg w = L::bcast(vals[k + u]);
            const float* xr = pt + static_cast<int64_t>(idx[k + u]) * BT;
            for (int v = 0; v < NL; ++v) acc[u][v] = L::fma(w, L::load(xr + LN * v), acc[u][v]);
          }
        }
        for (; k < e; ++k) {
          const typename L::reg w = L::bcast(vals[k]);
          const float* xr = pt + static_cast<int64_t>(idx[k]) * BT;
          for (int v = 0; v < NL; ++v) acc[0][v] = L::fma(w, L::load(xr + LN * v), acc[0][v]);
        }
        for (int u = 1; u < U; ++u)
          for (int v = 0; v < NL; ++v) acc[0][v] = L::add(acc[0][v], acc[u][v]);
        for (int v = 0; v < NL; ++v) L::store(bi + LN * v, acc[0][v]);
      }
    }
  }
}

template <class V, int NV>
void rows_tile(const float* pt, const Blocked& m, float* buf) {
  if constexpr (V::wide && NV % 2 == 0)
    rows_tile_lanes<typename V::W16, NV / 2>(pt, m, buf);  // the same tile as NV / 2 zmm vectors
  else
    rows_tile_lanes<V, NV>(pt, m, buf);
}

// y[l, i] = buf[i - r0][l] + bias[i] for lanes l < nb: 8 rows x 8 lanes at a time through a
// register transpose, so y gets 8-wide stores along its rows instead of scalar strided ones
template <class V, int NV>
void store_tile(const float* buf, int64_t r0, int64_t r1, const float* bias, float* y, int64_t ldy, int64_t nb) {
  constexpr int BT = 8 * NV;
  int64_t i = r0;
  for (; i + 8 <= r1; i += 8) {
    const typename V::reg bv = bias ? V::load(bias + i) : V::zero();
    for (int v = 0; v < NV && 8 * v < nb; ++v) {
      typename V::reg r[8];
      for (int j = 0; j < 8; ++j) r[j] = V::load(buf + (i - r0 + j) * BT + 8 * v);
      V::transpose8(r);
      const int lm = static_cast<int>(std::min<int64_t>(8, nb - 8 * v));
      for (int m = 0; m < lm; ++m) V::store(y + (8 * v + m) * ldy + i, V::add(r[m], bv));
    }
  }
  for (; i < r1; ++i) {
    const float b = bias ? bias[i] : 0.f;
    for (int64_t l = 0; l < nb; ++l) y[l * ldy + i] = buf[(i - r0) * BT + l] + b;
  }
}

// bdv[j] (+)= sum_l DY[row of j][l] * X[idx[j]][l] over G batch tiles (tile g of DY at dyt + g * sd, of X
// at xt + g * sx), in the blocked order of m (rows r0 + r); bdv is indexed like m.idx. NL vectors of L (V,
// or V::W16 on the 16-lane path) a tile. each nonzero's dot product runs over all G tiles before it is
// folded to 8 lanes and reduced with the other seven of its group (V::hsum8), so on the 16-lane path the
// lane sums (on the shuffle port that the zmm FMAs share) are paid once per G tiles
template <class V, class L, int NL, int G>
void sdd_tiles_lanes(const float* dyt, int64_t sd, const float* xt, int64_t sx, const Blocked& m, int64_t r0,
                     float* bdv, bool first) {
  constexpr int LN = L::lanes;
  constexpr int BT = LN * NL;
  alignas(32) float tmp[8];
  const int64_t R = m.R;
  const int32_t* col = m.idx;
  for (int64_t q = 0; q < R; q += m.RB) {
    const int64_t RBs = std::min(m.RB, R - q);
    for (int64_t c = 0; c < m.nch; ++c) {
      const int32_t* oc = m.off + q * m.nch + c * RBs;
      for (int64_t r = 0; r < RBs; ++r) {
        int64_t k = oc[r];
        const int64_t e = oc[r + 1];
        if (k == e) continue;
        typename L::reg d[G][NL];
        for (int g = 0; g < G; ++g)
          for (int v = 0; v < NL; ++v) d[g][v] = L::load(dyt + g * sd + (r0 + q + r) * BT + LN * v);
        typename V::reg a[8];
        // eight nonzeros at a time, unrolled: eight independent FMA chains (latency 4 x 2 ports)
        for (; k + 8 <= e; k += 8) {
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) {
            const float* xr = xt + static_cast<int64_t>(col[k + j]) * BT;
            typename L::reg s = L::fma(d[0][0], L::load(xr), L::zero());
#pragma GCC unroll 16
            for (int i = 1; i < G * NL; ++i) s = L::fma(d[i / NL][i % NL], L::load(xr + (i / NL) * sx + LN * (i % NL)), s);
            a[j] = L::fold(s);
          }
          typename V::reg sum = V::hsum8(a);
          if (!first) sum = V::add(sum, V::load(bdv + k));
          V::store(bdv + k, sum);
        }
        if (k < e) {
          const int rem = static_cast<int>(e - k);
          for (int j = 0; j < 8; ++j) {
            a[j] = V::zero();
            if (j < rem) {
              const float* xr = xt + static_cast<int64_t>(col[k + j]) * BT;
              typename L::reg s = L::zero();
              for (int g = 0; g < G; ++g)
                for (int v = 0; v < NL; ++v) s = L::fma(d[g][v], L::load(xr + g * sx + LN * v), s);
              a[j] = L::fold(s);
            }
          }
          V::store(tmp, V::hsum8(a));
          for (int j = 0; j < rem; ++j) bdv[k + j] = first ? tmp[j] : bdv[k + j] + tmp[j];
        }
      }
    }
  }
}

// every batch tile of the weight gradient: bdv[j] = sum over the T tiles (tile t of DY at
// dyt + t * sd, of X at xt + t * sx). the 16-lane path takes the tiles four (a zmm budget of 16 for
// DY's row) at a time.
template <class V, int NV>
void sdd_all_tiles(const float* dyt, int64_t sd, const float* xt, int64_t sx, int64_t T, const Blocked& m, int64_t r0,
                   float* bdv) {
  if constexpr (V::wide && NV % 2 == 0) {
    constexpr int G = 4;  // NV <= 8: DY's row is at most 16 zmm
    int64_t t = 0;
    for (; t + G <= T; t += G)
      sdd_tiles_lanes<V, typename V::W16, NV / 2, G>(dyt + t * sd, sd, xt + t * sx, sx, m, r0, bdv, t == 0);
    for (; t < T; ++t)
      sdd_tiles_lanes<V, typename V::W16, NV / 2, 1>(dyt + t * sd, sd, xt + t * sx, sx, m, r0, bdv, t == 0);
  } else {
    for (int64_t t = 0; t < T; ++t) sdd_tiles_lanes<V, V, NV, 1>(dyt + t * sd, sd, xt + t * sx, sx, m, r0, bdv, t == 0);
  }
}


// small batch: y[b, i] = sum_k vals[k] * a[b, idx[k]] with a contiguous [B, K].
// with bad (a checked call, see csr_spmm_checked) each row's indices are checked to lie in [0, K) and
// increase strictly before the row is read through them: a row that fails sets *bad and is skipped.
// NOTE: the row's indices come from memory once, for the check, and the gathers then read them from L1;
// a separate check of the whole index before the kernel read it from memory twice (4096->11008 at 90%,
// batch 1: the check alone took 1.2-1.9 ms, cold, next to ~2.5 ms for the product).
// the values of a gather, 8 at a time and one: fp32 as they are, bf16/fp16 widened in registers (exactly,
// so a 16-bit weight gives the bits its fp32 copy would)
template <class V>
struct LoadF32 {
  using T = float;
  static typename V::reg load(const T* p) { return V::load(p); }
  static float one(T v) { return v; }
};
template <class V>
struct LoadBF16 {
  using T = uint16_t;
  static typename V::reg load(const T* p) { return V::load_bf16(p); }
  static float one(T v) { return bf16_to_f32(v); }
};
template <class V>
struct LoadF16 {
  using T = uint16_t;
  static typename V::reg load(const T* p) { return V::load_f16(p); }
  static float one(T v) { return f16_to_f32(v); }
};

template <class V, class L = LoadF32<V>>
void rows_gather(const float* a, int64_t B, int64_t K, const typename L::T* vals, const int32_t* ptr,
                 const int32_t* idx, int64_t n, const float* bias, float* y, int64_t ldy, int nthreads,
                 std::atomic<bool>* bad = nullptr) {
  const uint32_t lim = static_cast<uint32_t>(std::min<int64_t>(K, INT32_MAX));
#pragma omp parallel num_threads(nthreads)
  {
    int64_t r0, r1;
    row_range(ptr, n, thread_id(), thread_count(), &r0, &r1);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t s = ptr[i], e = ptr[i + 1];
      if (bad && !V::sorted_below(idx + s, e - s, lim)) {
        bad->store(true, std::memory_order_relaxed);
        continue;
      }
      for (int64_t b = 0; b < B; ++b) {
        const float* ab = a + b * K;
        typename V::reg acc0 = V::zero(), acc1 = V::zero();
        int64_t k = s;
        for (; k + 16 <= e; k += 16) {
          acc0 = V::fma(L::load(vals + k), V::gather(ab, idx + k), acc0);
          acc1 = V::fma(L::load(vals + k + 8), V::gather(ab, idx + k + 8), acc1);
        }
        for (; k + 8 <= e; k += 8) acc0 = V::fma(L::load(vals + k), V::gather(ab, idx + k), acc0);
        float r = V::sum(V::add(acc0, acc1));
        for (; k < e; ++k) r = V::fma1(L::one(vals[k]), ab[idx[k]], r);
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

// one thread's rows [r0, r1) of y [B, n] (row stride n) from the packed tiles p [T][K][BT]
template <class V, int NV>
void spmm_rows(const float* p, int64_t B, int64_t K, const Blocked& m, int64_t r0, int64_t r1, int64_t n,
               const float* bias, float* y, float* buf) {
  constexpr int BT = 8 * NV;
  const int64_t T = (B + BT - 1) / BT;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t nb = std::min<int64_t>(BT, B - t * BT);
    rows_tile<V, NV>(p + t * K * BT, m, buf);
    store_tile<V, NV>(buf, r0, r1, bias, y + t * BT * n, n, nb);
  }
}

// one thread's rows [r0, r1) of the weight gradient from the packed tiles of dy and x. unblocked,
// m keeps the original order and the sums go straight to dv; blocked, they are summed in m's
// order into bdv and the runs copied back at the end.
template <class V, int NV>
void sdd_rows(const float* pd, const float* px, int64_t B, int64_t out, int64_t in, const Blocked& m, int64_t r0,
              const int32_t* crow, float* dv, float* bdv) {
  constexpr int BT = 8 * NV;
  const int64_t T = (B + BT - 1) / BT;
  float* acc = m.nch == 1 ? dv + crow[r0] : bdv;
  sdd_all_tiles<V, NV>(pd, out * BT, px, in * BT, T, m, r0, acc);
  if (m.nch > 1)
    for (int64_t j = 0; j < m.nch * m.R; ++j)
      if (m.off[j + 1] > m.off[j])  // bdv is null when this thread has no nonzeros
        std::memcpy(dv + m.src[j], bdv + m.off[j], static_cast<size_t>(m.off[j + 1] - m.off[j]) * sizeof(float));
}

// the batch-major product shared by dds and dsd: y [B, n] from a [B, K] (strided) and CSR (vals, ptr, idx) [n, K]
template <class V, int NV>
void spmm_packed(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals, const int32_t* perm,
                 const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, float* y, int nthreads) {
  constexpr int BT = 8 * NV;
  const int64_t T = (B + BT - 1) / BT;
  float* p = scratch(P, static_cast<size_t>(T * K * BT));
  RegionError err;
#pragma omp parallel num_threads(nthreads)
  {
    int64_t r0, r1;
    row_range(ptr, n, thread_id(), thread_count(), &r0, &r1);
    Blocked m;
    float* buf = nullptr;
    err.run([&] {
      m = block_rows(block_store(0), ptr, idx, vals, perm, r0, r1, BT, T, chunk_rows_for(BT, ptr[n], n, K),
                    block_rows_count(BT), K);
      buf = scratch(ACC, static_cast<size_t>((r1 - r0) * BT));
    });
    pack<V, BT>(a, B, K, s0, s1, p);  // ends in a barrier
    if (!err.failed()) spmm_rows<V, NV>(p, B, K, m, r0, r1, n, bias, y, buf);
  }
  err.rethrow();
}

// the tile width for a batch of 8 or more: the fewest 8-lane vectors that hold it, up to 4.
// f is called with std::integral_constant<int, NV>, so each width is its own instantiation.
// NOTE: 64 lanes (NV=8, half the tiles and index passes) measured 49.4/53.8 ms vs 49.2/49.5
// for 32 lanes on dds 4096x4096 B=256 90%, 1 thread (28.9/29.0 vs 27.6/27.5 at 95%): no gain.
// the 16-lane path (V::wide) takes 64 lanes (four zmm a slot) where nm_tile_width does: on a Xeon
// (AVX-512, 2 threads, B=256, 4096², bench/ab_nm_ops.py) the input gradient of a plain 2:4 layer
// through Wᵀ's CSR took 53.7 ms at 32 lanes and 43.2 at 64, 1:4 24.5 and 19.7. 128 lanes (eight zmm)
// moved each op by -7% to +18%, both ways: not kept.
template <class V, class F>
void with_tile_width(int64_t B, F&& f) {
  if constexpr (V::wide) {
    if (B >= 128 && (B % 64 == 0 || B % 64 > 32)) return f(std::integral_constant<int, 8>{});
  }
  if (B <= 8) f(std::integral_constant<int, 1>{});
  else if (B <= 16) f(std::integral_constant<int, 2>{});
  else if (B <= 24) f(std::integral_constant<int, 3>{});
  else f(std::integral_constant<int, 4>{});
}

template <class V>
void spmm(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals, const int32_t* perm,
          const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, float* y, int nthreads) {
  if (B < 8) {
    const float* ac = contiguous(a, B, K, s0, s1, COPY1);
    const float* v = vals;
    if (perm) {
      const int64_t nnz = ptr[n];
      float* g = scratch(VALS, static_cast<size_t>(nnz));
      const int64_t nblk = (n + GATHER_ROWS - 1) / GATHER_ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
      for (int64_t q = 0; q < nblk; ++q)
        gather_blocked(vals, perm, ptr, idx, q * GATHER_ROWS, std::min(n, (q + 1) * GATHER_ROWS), K, g + ptr[q * GATHER_ROWS]);
      v = g;
    }
    rows_gather<V>(ac, B, K, v, ptr, idx, n, bias, y, n, nthreads);
  } else {
    with_tile_width<V>(B, [&](auto nv) {
      spmm_packed<V, decltype(nv)::value>(a, B, K, s0, s1, vals, perm, ptr, idx, n, bias, y, nthreads);
    });
  }
}

// csr_spmm16_checked: spmm_checked's small-batch path over a 16-bit weight read as it is
template <class V>
bool spmm16_checked(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const uint16_t* vals, bool bf16,
                    const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, float* y, int nthreads) {
  std::atomic<bool> bad{false};
  const float* ac = contiguous(a, B, K, s0, s1, COPY1);
  float* yb = scratch(YOUT, static_cast<size_t>(B * n));
  if (bf16)
    rows_gather<V, LoadBF16<V>>(ac, B, K, vals, ptr, idx, n, bias, yb, n, nthreads, &bad);
  else
    rows_gather<V, LoadF16<V>>(ac, B, K, vals, ptr, idx, n, bias, yb, n, nthreads, &bad);
  if (bad.load()) return false;
  if (B * n > 0) std::memcpy(y, yb, static_cast<size_t>(B * n) * sizeof(float));
  return true;
}

// csr_rows_valid: each thread checks its own rows (V::sorted_below)
template <class V>
bool rows_valid(const int32_t* ptr, int64_t n, const int32_t* idx, int64_t limit, int nthreads) {
  const uint32_t lim = static_cast<uint32_t>(std::min<int64_t>(std::max<int64_t>(limit, 0), INT32_MAX));
  std::atomic<bool> bad{false};
#pragma omp parallel num_threads(nthreads)
  {
    int64_t r0, r1;
    row_range(ptr, n, thread_id(), thread_count(), &r0, &r1);
    bool ok = true;
    for (int64_t i = r0; i < r1 && ok; ++i) ok = V::sorted_below(idx + ptr[i], ptr[i + 1] - ptr[i], lim);
    if (!ok) bad.store(true, std::memory_order_relaxed);
  }
  return !bad.load();
}

// indices_below: branch-free, so that the compiler vectorises it; contiguous blocks a thread
template <class V>
bool below(const int32_t* idx, int64_t n, int64_t limit, int nthreads) {
  const uint32_t lim = static_cast<uint32_t>(std::min<int64_t>(std::max<int64_t>(limit, 0), INT32_MAX));
  uint32_t bad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : bad)
  for (int64_t k = 0; k < n; ++k) bad |= static_cast<uint32_t>(static_cast<uint32_t>(idx[k]) >= lim);
  return bad == 0;
}

// csr_spmm_checked: the index check of every row (rows_gather's), then the product; false when a row fails
template <class V>
bool spmm_checked(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals,
                  const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, float* y, int nthreads) {
  std::atomic<bool> bad{false};
  if (B < 8) {
    // into a buffer first, so that y is written only once every row has passed (B * n floats: small)
    const float* ac = contiguous(a, B, K, s0, s1, COPY1);
    float* yb = scratch(YOUT, static_cast<size_t>(B * n));
    rows_gather<V>(ac, B, K, vals, ptr, idx, n, bias, yb, n, nthreads, &bad);
    if (bad.load()) return false;
    if (B * n > 0) std::memcpy(y, yb, static_cast<size_t>(B * n) * sizeof(float));
    return true;
  }
  // the packed walk re-lays the index before reading through it: check it all first, split over the threads
  if (!rows_valid<V>(ptr, n, idx, K, nthreads)) return false;
  spmm<V>(a, B, K, s0, s1, vals, nullptr, ptr, idx, n, bias, y, nthreads);
  return true;
}

template <class V, int NV>
void sdd_packed(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in,
                int64_t x0, int64_t x1, const int32_t* crow, const int32_t* col, float* dv, int nthreads) {
  constexpr int BT = 8 * NV;
  const int64_t T = (B + BT - 1) / BT;
  float* pd = scratch(P, static_cast<size_t>(T * out * BT));
  float* px = scratch(PX, static_cast<size_t>(T * in * BT));
  RegionError err;
#pragma omp parallel num_threads(nthreads)
  {
    int64_t r0, r1;
    row_range(crow, out, thread_id(), thread_count(), &r0, &r1);
    Blocked m;
    float* bdv = nullptr;
    err.run([&] {
      m = block_rows(block_store(0), crow, col, nullptr, nullptr, r0, r1, BT, T,
                     chunk_rows_for(sdd_step_lanes<V, NV>(T), crow[out], out, in),
                     block_rows_count(BT),
                     in);
      bdv = scratch(ACC, static_cast<size_t>(crow[r1] - crow[r0]));
    });
    pack<V, BT>(dy, B, out, d0, d1, pd);  // ends in a barrier
    pack<V, BT>(x, B, in, x0, x1, px);
    if (!err.failed()) sdd_rows<V, NV>(pd, px, B, out, in, m, r0, crow, dv, bdv);
  }
  err.rethrow();
}

template <class V>
void sdd(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in, int64_t x0,
         int64_t x1, const int32_t* crow, const int32_t* col, float* dv, int nthreads) {
  const int64_t nnz = crow[out];
  if (B == 0) {
    std::fill(dv, dv + nnz, 0.f);
  } else if (B < 8) {
    const float* dyc = contiguous(dy, B, out, d0, d1, COPY1);
    const float* xc = contiguous(x, B, in, x0, x1, COPY2);
    sdd_gather<V>(dyc, xc, B, out, in, crow, col, dv, nthreads);
  } else {
    with_tile_width<V>(B, [&](auto nv) {
      sdd_packed<V, decltype(nv)::value>(dy, B, out, d0, d1, x, in, x0, x1, crow, col, dv, nthreads);
    });
  }
}

// dx = dsd and dvals = sdd in one parallel region: dy is packed once for both, and each thread
// runs its transposed rows (balanced over t_crow) and then its rows (balanced over crow)
template <class V, int NV>
void backward_packed(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in,
                     int64_t x0, int64_t x1, const float* vals, const int32_t* crow, const int32_t* col,
                     const int32_t* t_crow, const int32_t* t_row, const int32_t* t_perm, float* dx, float* dv,
                     int nthreads) {
  constexpr int BT = 8 * NV;
  const int64_t T = (B + BT - 1) / BT;
  float* pd = scratch(P, static_cast<size_t>(T * out * BT));
  float* px = scratch(PX, static_cast<size_t>(T * in * BT));
  RegionError err;
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = thread_id(), nt = thread_count();
    int64_t a0, a1, r0, r1;
    row_range(t_crow, in, tid, nt, &a0, &a1);
    row_range(crow, out, tid, nt, &r0, &r1);
    Blocked mt, ms;
    float* buf = nullptr;
    float* bdv = nullptr;
    err.run([&] {
      mt = block_rows(block_store(0), t_crow, t_row, vals, t_perm, a0, a1, BT, T, chunk_rows_for(BT, t_crow[in], in, out),
                      block_rows_count(BT),
                      out);
      ms = block_rows(block_store(1), crow, col, nullptr, nullptr, r0, r1, BT, T,
                      chunk_rows_for(sdd_step_lanes<V, NV>(T), crow[out], out, in),
                      block_rows_count(BT),
                      in);
      buf = scratch(ACC, static_cast<size_t>((a1 - a0) * BT));
      bdv = scratch(ACC2, static_cast<size_t>(crow[r1] - crow[r0]));
    });
    pack<V, BT>(dy, B, out, d0, d1, pd);  // ends in a barrier
    pack<V, BT>(x, B, in, x0, x1, px);
    if (!err.failed()) {
      spmm_rows<V, NV>(pd, B, out, mt, a0, a1, in, nullptr, dx, buf);
      sdd_rows<V, NV>(pd, px, B, out, in, ms, r0, crow, dv, bdv);
    }
  }
  err.rethrow();
}

template <class V>
void backward(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in, int64_t x0,
              int64_t x1, const float* vals, const int32_t* crow, const int32_t* col, const int32_t* t_crow,
              const int32_t* t_row, const int32_t* t_perm, float* dx, float* dv, int nthreads) {
  if (B < 8) {
    spmm<V>(dy, B, out, d0, d1, vals, t_perm, t_crow, t_row, in, nullptr, dx, nthreads);
    sdd<V>(dy, B, out, d0, d1, x, in, x0, x1, crow, col, dv, nthreads);
  } else {
    with_tile_width<V>(B, [&](auto nv) {
      backward_packed<V, decltype(nv)::value>(dy, B, out, d0, d1, x, in, x0, x1, vals, crow, col, t_crow, t_row,
                                              t_perm, dx, dv, nthreads);
    });
  }
}

}  // namespace
}  // namespace detail

#define SPARSEOPS_CSR_INSTANTIATE(V, SUFFIX)                                                                      \
  void csr_spmm_##SUFFIX(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals,        \
                         const int32_t* perm, const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, \
                         float* y, int nthreads) {                                                               \
    note_isa_call(ISA_OF_##SUFFIX);                                                                              \
    detail::spmm<V>(a, B, K, s0, s1, vals, perm, ptr, idx, n, bias, y, nthreads);                                \
  }                                                                                                              \
  bool csr_rows_valid_##SUFFIX(const int32_t* ptr, int64_t n, const int32_t* idx, int64_t limit, int nthreads) {  \
    note_isa_call(ISA_OF_##SUFFIX);                                                                               \
    return detail::rows_valid<V>(ptr, n, idx, limit, nthreads);                                                  \
  }                                                                                                              \
  bool indices_below_##SUFFIX(const int32_t* idx, int64_t n, int64_t limit, int nthreads) {                      \
    note_isa_call(ISA_OF_##SUFFIX);                                                                              \
    return detail::below<V>(idx, n, limit, nthreads);                                                            \
  }                                                                                                              \
  bool csr_spmm16_checked_##SUFFIX(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1,                \
                                   const uint16_t* vals, bool bf16, const int32_t* ptr, const int32_t* idx,     \
                                   int64_t n, const float* bias, float* y, int nthreads) {                      \
    note_isa_call(ISA_OF_##SUFFIX);                                                                             \
    return detail::spmm16_checked<V>(a, B, K, s0, s1, vals, bf16, ptr, idx, n, bias, y, nthreads);              \
  }                                                                                                              \
  bool csr_spmm_checked_##SUFFIX(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals, \
                                 const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, float* y,  \
                                 int nthreads) {                                                                 \
    note_isa_call(ISA_OF_##SUFFIX);                                                                              \
    return detail::spmm_checked<V>(a, B, K, s0, s1, vals, ptr, idx, n, bias, y, nthreads);                       \
  }                                                                                                              \
  void csr_sdd_##SUFFIX(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x,          \
                        int64_t in, int64_t x0, int64_t x1, const int32_t* crow, const int32_t* col, float* dv,  \
                        int nthreads) {                                                                          \
    note_isa_call(ISA_OF_##SUFFIX);                                                                              \
    detail::sdd<V>(dy, B, out, d0, d1, x, in, x0, x1, crow, col, dv, nthreads);                                  \
  }                                                                                                              \
  void csr_backward_##SUFFIX(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x,     \
                             int64_t in, int64_t x0, int64_t x1, const float* vals, const int32_t* crow,          \
                             const int32_t* col, const int32_t* t_crow, const int32_t* t_row,                     \
                             const int32_t* t_perm, float* dx, float* dv, int nthreads) {                         \
    note_isa_call(ISA_OF_##SUFFIX);                                                                               \
    detail::backward<V>(dy, B, out, d0, d1, x, in, x0, x1, vals, crow, col, t_crow, t_row, t_perm, dx, dv,       \
                        nthreads);                                                                               \
  }

}  // namespace sparseops
