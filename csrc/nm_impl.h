// N:M kernels, written once over a vector type V (see simd.h) and instantiated per ISA in
// nm_avx2.cpp and nm_portable.cpp. they reuse the batch-major packing of csr_impl.h.
//
// batches of 8 or more: the activations are packed batch-major, P[t][k][l] = A[t*BT + l][k], with the
// columns zero padded to G*m so that every slot's column is readable, and each thread decodes its rows'
// 4-bit positions to int32 columns once a call, straight into the CSR kernels' chunk-major layout
// (nm_block_rows), and runs their blocked walk (csr_impl.h: rows_tile, sdd_all_tiles): every slot drives
// NV contiguous FMAs over the batch lanes.
// NOTE: this replaced a walk of its own that decoded the positions once a batch tile, in row blocks
// of 16 and column chunks of 16 KB: 4096x4096 B=256, 2 threads, interleaved with the CSR kernels on
// the same mask, it took 1.73x (dds) and 1.75x (sdd) their time at 1:4, 1.56x/1.69x at 2:8.
// batches under 8: 8 slots at a time, the positions decoded into 8 lanes. when an 8-slot block's
// columns span at most 32 (2:4, 1:4, 2:8, 4:8, 3:4, 15:16, ...) x is read from 2 or 4 registers
// loaded at the block's first group and picked by permutes (nm_window; 2:4 has its own in-lane
// kernel, nm_window24); wider spans (1:8, 1:16, ...) use the AVX2 gather (nm_gather).
// measured (bench/bench_nm.py, 2:4, B=1, 4096x11008 fp32, 2 threads): gather 21.3 ms, window 10.9,
// window with the batch as a template argument 8.8, the in-lane 2:4 kernel 8.2, plus a software
// prefetch 2 KB ahead 6.7 to 7.9 (dense 8.4 to 10.2 in the same runs).
#pragma once

#include <stdexcept>

#include "csr_impl.h"
#include "nm.h"

namespace sparseops {
namespace detail {
// internal linkage for everything below: each ISA's translation unit (*_avx2.cpp built with -mavx2
// -mfma, *_portable.cpp without) keeps its own copy. with external linkage an inline function the
// compiler did not inline (block_store, row_range, scratch, ...) was one weak symbol, and the linker
// could hand the portable path the copy compiled for AVX2 (tests/test_build.py checks the objects).
namespace {

// internal linkage, as nm.h's nm_row_ok: one copy per isa's translation unit
namespace {
inline int nib(const uint8_t* ip, int64_t j) { return (ip[j >> 1] >> ((j & 1) << 2)) & 15; }
}  // namespace

struct NmShape {
  int n, m;
  int64_t K, G, S, Sb, Kp;
  NmShape(int n_, int m_, int64_t K_) : n(n_), m(m_), K(K_) {
    G = (K + m - 1) / m;
    S = G * n;
    Sb = (S + 1) / 2;
    Kp = G * m;
  }
};

// nm.h's row check on NmShape's sizes
namespace {
inline bool nm_row_ok(const uint8_t* ir, const NmShape& d) { return sparseops::nm_row_ok(ir, d.m, d.S); }
}  // namespace

// A [B, K] (strides s0, s1) -> P [T][Kp][BT], columns K..Kp zero; call inside a parallel region
template <class V, int BT>
void pack_padded(const float* a, int64_t B, int64_t K, int64_t Kp, int64_t s0, int64_t s1, float* p) {
  const int64_t T = (B + BT - 1) / BT;
  constexpr int64_t KB = 64;
  const int64_t nkb = (Kp + KB - 1) / KB;
#pragma omp for schedule(static) collapse(2)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t k0 = kb * KB, k1 = std::min(Kp, k0 + KB), kr = std::min(K, k1);
      float* pt = p + t * Kp * BT;
      if (k0 < kr) pack_block<V, BT>(a, s0, s1, t * BT, std::min<int64_t>(BT, B - t * BT), k0, kr, pt);
      for (int64_t k = std::max(k0, K); k < k1; ++k) std::memset(pt + k * BT, 0, sizeof(float) * BT);
    }
  }
}

// dst[(r - r0) * S + j] = Wᵀ's value of slot j of row r, vals[perm[r * S + j]] (0 where perm is -1), for
// rows [r0, r1): as gather_blocked (csr_impl.h), in blocks of GATHER_ROWS rows by the slots of about
// GATHER_COLS rows of W (whole groups), so that the reads stay on that many pages of W at a time
inline void nm_gather_blocked(const float* vals, const int32_t* perm, const NmShape& d, int64_t r0, int64_t r1,
                              float* dst) {
  const int64_t GS = std::max<int64_t>(1, GATHER_COLS / d.m) * d.n;
  for (int64_t q = r0; q < r1; q += GATHER_ROWS) {
    const int64_t qe = std::min(r1, q + GATHER_ROWS);
    for (int64_t j0 = 0; j0 < d.S; j0 += GS) {
      const int64_t len = std::min(d.S, j0 + GS) - j0;
      for (int64_t r = q; r < qe; ++r) {
        const int32_t* pr = perm + r * d.S + j0;
        float* o = dst + (r - r0) * d.S + j0;
        for (int64_t u = 0; u < len; ++u) o[u] = pr[u] >= 0 ? vals[pr[u]] : 0.f;
      }
    }
  }
}

// rows [r0, r1) of an N:M index in the CSR kernels' blocked layout (see Blocked, block_rows), for their
// walk (rows_tile, sdd_all_tiles): int32 columns in [0, Kp), and the values copied alongside when given.
// a chunk is GC whole groups, so every row has the same slots in it, [c*GC*n, (c+1)*GC*n): the run
// bounds are arithmetic (block_rows finds them with a compare per nonzero) and the 4-bit positions are
// decoded straight into their chunk-major place, two slots (one byte) at a time. GC*n is even, so a
// run starts on a byte. slots past column K (the padding of the last group) hold zeros and read P's
// zero rows.
// NOTE: 4096x4096 B=256 2:4, 2 threads (perf, RelWithDebInfo): decoding every slot to a row-major
// int32 copy and then block_rows' run scan and copy took ~28% of the forward, the walk the rest.
// against that, in-process A/B (10 alternations, median old/new): forward 1.13x (2:4), 1.13x (1:4),
// 1.19x (2:8); weight gradient 1.06x, 1.12x, 1.12x; transposable 2:4 input gradient 1.11x.
// NOTE: a walk that decodes the positions inline from the row-major index (no copy at all; 2-3 rows
// interleaved, 2:4) ran 10-20% below rows_tile over the chunk-major copy, standalone on one thread
// over 8 tiles of 4096x4096 (36-51 vs 40-58 GF/s): its value reads jump a row's stride per visit.
struct NmBlocks {
  BlockStore store;
  std::vector<int32_t> base;
};
inline NmBlocks& nm_block_store() {
  thread_local NmBlocks s;
  return s;
}
template <class V>
Blocked nm_block_rows(const NmShape& d, const uint8_t* idx, const float* vals, const int32_t* perm, int64_t r0,
                             int64_t r1, int BT, int64_t T, int64_t KC, int64_t RB) {
  NmBlocks& nb = nm_block_store();
  BlockStore& st = nb.store;
  Blocked b;
  b.R = r1 - r0;
  b.RB = RB;
  const int64_t R = b.R, S = d.S;
  // column chunks from 2 batch tiles and a 32 KB tile on, where the CSR kernels wait for 8 tiles and
  // 256 KB (the copy they pay for is dearer: a run scan). NOTE: in-process A/B against those thresholds,
  // 2 threads, 10 alternations, median old/new, forward / weight gradient: 2:4 1.69 / 1.30 at 4096²
  // B=64, 1.81 / 1.51 at B=128, 1.30 / 1.15 at 1024² B=64, 1.49 / 1.31 at 1024² B=256; 1:4 1.05-1.33;
  // 2:8 at 1024² B=64 1.08 / 1.02. with one tile (B <= 32) it lost: 1:4 0.95 / 0.89 at 4096² B=32,
  // 2:4 0.98 / 0.93 at B=16, 0.92 / 0.78 at 2048² B=8.
  const bool split = d.Kp * 4 * BT > 2 * CHUNK_MIN_BYTES && T >= 2;
  int64_t GC = split ? std::max<int64_t>(1, KC / d.m) : d.G;
  if (split && (GC * d.n) % 2) ++GC;
  const int64_t nch = split ? (d.G + GC - 1) / GC : 1, SC = GC * d.n;
  b.nch = nch;
  // base[j] = column of slot j of a chunk before its position: (j / n) * m
  nb.base.resize(static_cast<size_t>(std::max<int64_t>(2, SC + 1)));
  // (counted up: a division a slot cost ~12% of a B = 16 forward that decodes a slice of rows at a time)
  for (int64_t j = 0, g = 0, r = 0; j < SC; ++j) {
    nb.base[j] = static_cast<int32_t>(g * d.m);
    if (++r == d.n) {
      r = 0;
      ++g;
    }
  }
  st.off.resize(static_cast<size_t>(nch * R + 1));
  if (nch > 1 && st.src.size() < static_cast<size_t>(nch * R)) st.src.resize(static_cast<size_t>(nch * R));
  if (st.idx.size() < static_cast<size_t>(std::max<int64_t>(1, R * S))) st.idx.resize(static_cast<size_t>(std::max<int64_t>(1, R * S)));
  const bool copy = vals && (nch > 1 || perm);
  if (copy && st.val.size() < static_cast<size_t>(std::max<int64_t>(1, R * S)))
    st.val.resize(static_cast<size_t>(std::max<int64_t>(1, R * S)));
  // one chunk: the layout is row-major (row r's slots at r * S), so Wᵀ's values are gathered up front, blocked
  const bool gather_first = copy && perm && nch == 1;
  if (gather_first) nm_gather_blocked(vals, perm, d, r0, r1, st.val.data());
  int32_t* off = st.off.data();
  int32_t* bidx = st.idx.data();
  const int32_t* base = nb.base.data();
  int64_t w = 0;
  // rows are visited a row's stride apart (Sb index bytes, S values): prefetch PF_ROWS ahead. not with
  // perm, whose reads are a gather. NOTE: in-process A/B, 4096x4096 B=256, 2 threads (10 alternations,
  // median): forward 1.12-1.19x at 2:4 (two runs), 1.01-1.06x at 1:4 and 2:8, weight gradient 0.97-1.03x.
  const bool pf = !perm;
  constexpr int64_t PF_ROWS = 4;
  for (int64_t q = 0; q < R; q += RB) {
    const int64_t RBs = std::min(RB, R - q);
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t j0 = c * SC, len = std::min(S, j0 + SC) - j0;
      const int32_t c0 = static_cast<int32_t>(c * GC * d.m);
      for (int64_t r = q; r < q + RBs; ++r) {
        const int64_t j = q * nch + c * RBs + (r - q);
        off[j] = static_cast<int32_t>(w);
        if (nch > 1) st.src[j] = static_cast<int32_t>(r * S + j0);
        const uint8_t* ip = idx + (r0 + r) * d.Sb + j0 / 2;
        if (pf && r + PF_ROWS < q + RBs) {
          // the same chunk of a row PF_ROWS ahead: its index bytes and values, a row's stride away
          const uint8_t* ia = ip + PF_ROWS * d.Sb;
          for (int64_t t = 0; t < (len + 1) / 2; t += 64) prefetch(ia + t);
          if (copy) {
            const float* va = vals + (r0 + r + PF_ROWS) * S + j0;
            for (int64_t t = 0; t < len; t += 16) prefetch(va + t);
          }
        }
        int32_t* o = bidx + w;
        int64_t t = 0;
        // 8 slots (4 bytes of positions) a step: nibble + base + c0 in int32 lanes
        const typename V::ireg vc0 = V::ibcast(c0);
        for (; t + 8 <= len; t += 8) {
          uint32_t word;
          std::memcpy(&word, ip + (t >> 1), 4);
          V::istore(o + t, V::nib8(word, V::iadd(V::iload(base + t), vc0)));
        }
        for (; t + 2 <= len; t += 2) {
          const int v = ip[t >> 1];
          o[t] = c0 + base[t] + (v & 15);
          o[t + 1] = c0 + base[t + 1] + (v >> 4);
        }
        if (t < len) o[t] = c0 + base[t] + (ip[t >> 1] & 15);
        if (copy && !gather_first) {
          float* dv = st.val.data() + w;
          const int64_t s0 = (r0 + r) * S + j0;
          if (perm)  // Wᵀ's values, gathered from W in this (chunk-major) order: see block_rows
            for (int64_t u = 0; u < len; ++u) dv[u] = perm[s0 + u] >= 0 ? vals[perm[s0 + u]] : 0.f;
          else
            std::memcpy(dv, vals + s0, static_cast<size_t>(len) * sizeof(float));
        }
        w += len;
      }
    }
  }
  off[nch * R] = static_cast<int32_t>(w);
  b.off = off;
  b.idx = bidx;
  b.val = vals ? (copy ? st.val.data() : vals + r0 * S) : nullptr;
  b.src = nch > 1 ? st.src.data() : nullptr;
  return b;
}

// the batch tile of the N:M walks: 64 lanes (NV=8) from two such tiles on, where the last one is more
// than half full; else the CSR kernels' widths (with_tile_width, up to 32 lanes). twice the lanes halve
// the index passes (a slot's decoded column and value drive 8 FMAs instead of 4) and the weight
// gradient's lane sums (sdd_tiles_lanes: one hsum8 per 8 slots and 64 lanes, not 32).
// NOTE: standalone harness over these kernels, 4096x4096, 2 threads, 10 alternations, median ratio of
// 32-lane to 64-lane time, forward / weight gradient: B=256 2:4 1.09 / 1.17, 1:4 1.09 / 1.16, 2:8
// 1.07 / 1.19; B=128 2:4 1.09 / 1.06, 1:4 1.08 / 1.13. at B=64 (one 64-lane tile, so no column chunks)
// it lost: 0.66 / 0.73. the transposed CSR walk of a plain N:M input gradient did not gain (0.99-1.07).
template <class V, class F>
void nm_tile_width(int64_t B, F&& f) {
  if (B >= 128 && (B % 64 == 0 || B % 64 > 32))
    f(std::integral_constant<int, 8>{});
  else
    with_tile_width<V>(B, static_cast<F&&>(f));
}

// rows a thread decodes at a time, so that the walk's int32 offsets hold their slots. with one batch tile
// (B <= 32) every slot is read once a call: a slice of about SLICE_BYTES of decoded columns is walked
// while it is still in cache, instead of the whole range written out to memory and read back.
// NOTE: standalone harness, 4096x4096, 2 threads, 10 alternations, median old/new, with the 8-slot decode
// and the base table counted up (nm_block_rows): 2:4 B=16 forward 1.45x, weight gradient 1.63x (32 KB
// slices; 128 KB 1.07x more); B=32 weight gradient 1.47x; 1:4 B=8 forward 1.53x; B=256 (slices off, the
// decode alone) 1.04x / 1.06x.
constexpr int64_t SLICE_BYTES = 131072;
// not for a transposed walk (perm): its gather of Wᵀ's values reuses a line of W over GATHER_ROWS rows
// (nm_gather_blocked), and 16-row slices (2:4 at 4096) made the transposable 2:4 input gradient at B=16 slower.
inline int64_t nm_slice_rows(const NmShape& d, int64_t T, bool perm = false) {
  const int64_t S = std::max<int64_t>(1, d.S);
  const int64_t most = std::max<int64_t>(1, (int64_t(1) << 30) / S);  // the int32 offsets' bound, always
  if (T == 1 && !perm) return std::min(most, std::max<int64_t>(8, (SLICE_BYTES / (4 * S)) / 8 * 8));
  return most;
}

template <class V, int NV>
void nm_spmm_csr(const float* a, int64_t B, int64_t s0, int64_t s1, const NmShape& d, const float* vals,
                 const int32_t* perm, const uint8_t* idx, int64_t rows, const float* bias, float* y, int nthreads) {
  constexpr int BT = 8 * NV;
  const int64_t T = (B + BT - 1) / BT;
  float* p = scratch(P, static_cast<size_t>(T * d.Kp * BT));
  RegionError err;
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = thread_id(), nt = thread_count();
    const int64_t r0 = rows * tid / nt, r1 = rows * (tid + 1) / nt;
    pack_padded<V, BT>(a, B, d.K, d.Kp, s0, s1, p);  // ends in a barrier
    const int64_t slice = nm_slice_rows(d, T, perm != nullptr);
    for (int64_t q0 = r0; q0 < r1 && !err.failed(); q0 += slice) {
      const int64_t q1 = std::min(r1, q0 + slice);
      err.run([&] {
        const Blocked m = nm_block_rows<V>(d, idx, vals, perm, q0, q1, BT, T, chunk_rows_for(BT, rows * d.S, rows, d.Kp),
                                        block_rows_count(BT));
        float* buf = scratch(ACC, static_cast<size_t>((q1 - q0) * BT));
        spmm_rows<V, NV>(p, B, d.Kp, m, q0, q1, rows, bias, y, buf);
      });
    }
  }
  err.rethrow();
}

// a [B, K] (strided) -> contiguous [B, Kp], columns K..Kp zero
inline float* padded_copy(const float* a, int64_t B, int64_t K, int64_t Kp, int64_t s0, int64_t s1, int slot) {
  float* c = scratch(slot, static_cast<size_t>(std::max<int64_t>(1, B * Kp)));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) c[b * Kp + k] = a[b * s0 + k * s1];
    for (int64_t k = K; k < Kp; ++k) c[b * Kp + k] = 0.f;
  }
  return c;
}

// the column of slot s of an 8-slot block jb = n*q + r is 8*m*q + tab[r][s] + pos
struct BlockCols {
  int32_t tab[16][8];
  BlockCols(int n, int m) {
    for (int r = 0; r < n; ++r)
      for (int s = 0; s < 8; ++s) tab[r][s] = ((8 * r + s) / n) * m;
  }
  // cols[s] for the 8 slots from j (a multiple of 8) of a row with positions ip
  inline void get(const uint8_t* ip, int64_t j, int64_t q, int r, int m, int32_t* cols) const {
    uint32_t w;
    std::memcpy(&w, ip + j / 2, 4);
    const int32_t cb = static_cast<int32_t>(8 * m * q);
    for (int s = 0; s < 8; ++s) cols[s] = cb + tab[r][s] + static_cast<int32_t>((w >> (4 * s)) & 15u);
  }
};

// small batch: y[b, o] = sum_j v[o, j] * ap[b, col(o, j)] over the padded contiguous copy ap
template <class V, int WD = 0>
void nm_gather(const float* ap, int64_t B, const NmShape& d, const typename WLoad<V, WD>::T* v,
               const uint8_t* idx, int64_t rows, const float* bias, float* y, int nthreads,
               std::atomic<bool>* bad = nullptr) {
  using VL = WLoad<V, WD>;
  const BlockCols bc(d.n, d.m);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t o = 0; o < rows; ++o) {
    if (bad && !nm_row_ok(idx + o * d.Sb, d)) {  // a checked call: never read through a bad row
      bad->store(true, std::memory_order_relaxed);
      continue;
    }
    const auto* vr = v + o * d.S;
    const uint8_t* ir = idx + o * d.Sb;
    typename V::reg acc[8];
    for (int64_t b = 0; b < B; ++b) acc[b] = V::zero();
    alignas(32) int32_t cols[8];
    int64_t j = 0, q = 0;
    int r = 0;
    for (; j + 8 <= d.S; j += 8) {
      bc.get(ir, j, q, r, d.m, cols);
      if (++r == d.n) {
        r = 0;
        ++q;
      }
      const typename V::reg w = VL::load(vr + j);
      for (int64_t b = 0; b < B; ++b) acc[b] = V::fma(w, V::gather(ap + b * d.Kp, cols), acc[b]);
    }
    float res[8];
    for (int64_t b = 0; b < B; ++b) res[b] = V::sum(acc[b]);
    for (; j < d.S; ++j) {
      const int64_t c = (j / d.n) * d.m + nib(ir, j);
      for (int64_t b = 0; b < B; ++b) res[b] += VL::one(vr[j]) * ap[b * d.Kp + c];
    }
    const float bo = bias ? bias[o] : 0.f;
    for (int64_t b = 0; b < B; ++b) y[b * rows + o] = res[b] + bo;
  }
}

// registers of x an 8-slot block's columns span (2 or 4), or 0 when they span more than 32 columns
inline int nm_window_regs(const NmShape& d, const BlockCols& bc) {
  int w = 0;
  for (int r = 0; r < d.n; ++r) w = std::max(w, bc.tab[r][7] - bc.tab[r][0] + d.m);
  return w <= 16 ? 2 : w <= 32 ? 4 : 0;
}

// the end of a row of the window kernels: sum the two accumulators, add the slots [j, S) that
// fill no 8-slot block, the bias, and store y[b, o]
template <class V, int BB, int WD = 0>
inline void window_row_end(const typename V::reg (*acc)[BB], const typename WLoad<V, WD>::T* vr, const uint8_t* ir,
                           int64_t j,
                           const NmShape& d, const float* ap, int64_t lda, const float* bias, int64_t o, int64_t rows,
                           float* y) {
  float res[BB];
  for (int b = 0; b < BB; ++b) res[b] = V::sum(V::add(acc[0][b], acc[1][b]));
  for (; j < d.S; ++j) {
    const int64_t col = (j / d.n) * d.m + nib(ir, j);
    for (int b = 0; b < BB; ++b) res[b] += WLoad<V, WD>::one(vr[j]) * ap[b * lda + col];
  }
  const float bo = bias ? bias[o] : 0.f;
  for (int b = 0; b < BB; ++b) y[b * rows + o] = res[b] + bo;
}

// rows the batch-1 window walks (nm_window, nm_window24) take at once: 2 accumulators each, plus up to 4
// registers of x (32 vector registers with AVX-512, 16 without)
#if defined(SPARSEOPS_AVX512)
constexpr int NM_DECODE_ROWS = 8;
#else
constexpr int NM_DECODE_ROWS = 4;
#endif

// the row groups of the batch-1 window walks, split over the threads: rows_n(o0) for each whole group of
// NR rows, row1(o) for the rest (the rows past the last whole group, and in a checked call the good rows
// of a group that holds a bad one: the bad one is flagged and never read through)
template <int NR, class F1, class FN>
void for_row_groups(int64_t rows, const uint8_t* idx, const NmShape& d, std::atomic<bool>* bad, int nthreads,
                    F1&& row1, FN&& rows_n) {
  const int64_t groups = (rows + NR - 1) / NR;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t o0 = g * NR, o1 = std::min(rows, o0 + NR);
    bool whole = NR > 1 && o1 - o0 == NR;
    if (bad)
      for (int64_t o = o0; o < o1; ++o)
        if (!nm_row_ok(idx + o * d.Sb, d)) {
          bad->store(true, std::memory_order_relaxed);
          whole = false;
        }
    if (whole) {
      rows_n(o0);
      continue;
    }
    for (int64_t o = o0; o < o1; ++o)
      if (!bad || nm_row_ok(idx + o * d.Sb, d)) row1(o);
  }
}

// small batch, narrow windows (2:4, 1:4, 2:8, 4:8, 3:4, ...): the 8 slots of a block read their x
// from NW registers loaded at the block's first group, picked by permutes on the decoded positions
// (no gather). ap is [BB, lda] with lda >= Kp + 8 * NW and zeros past Kp, so a window never leaves it.
// BB (the batch, 1 to 7) is a template argument so that the accumulators stay in registers: with a
// runtime batch they went through the stack, and the FMA chain through store forwarding ran 2:4 at
// B=1 4096x11008 at 10.9 ms (dense: 10.5). two accumulators per row alternate blocks.
template <class V, int NW, int BB, int WD = 0>
void nm_window(const float* ap, int64_t lda, const NmShape& d, const BlockCols& bc,
               const typename WLoad<V, WD>::T* v, const uint8_t* idx, int64_t rows, const float* bias, float* y,
               int nthreads, std::atomic<bool>* bad = nullptr) {
  using VL = WLoad<V, WD>;
  alignas(32) int32_t offs[16][8];
  for (int r = 0; r < d.n; ++r)
    for (int s = 0; s < 8; ++s) offs[r][s] = bc.tab[r][s] - bc.tab[r][0];
  // one row
  auto row1 = [&](int64_t o) {
    const auto* vr = v + o * d.S;
    const uint8_t* ir = idx + o * d.Sb;
    typename V::reg acc[2][BB];
    for (int h = 0; h < 2; ++h)
      for (int b = 0; b < BB; ++b) acc[h][b] = V::zero();
    int64_t j = 0, q = 0;
    int r = 0;
    auto block = [&](int h) {
      uint32_t word;
      std::memcpy(&word, ir + j / 2, 4);
      const typename V::ireg c = V::nib8(word, V::iload(offs[r]));
      const float* xb = ap + 8 * d.m * q + bc.tab[r][0];
      if (++r == d.n) {
        r = 0;
        ++q;
      }
      const typename V::reg w = VL::load(vr + j);
      for (int b = 0; b < BB; ++b) {
        typename V::reg xw[NW];
        for (int k = 0; k < NW; ++k) xw[k] = V::load(xb + b * lda + 8 * k);
        acc[h][b] = V::fma(w, V::template select<NW>(xw, c), acc[h][b]);
      }
      j += 8;
    };
    while (j + 16 <= d.S) {
      block(0);
      block(1);
    }
    if (j + 8 <= d.S) block(0);
    window_row_end<V, BB, WD>(acc, vr, ir, j, d, ap, lda, bias, o, rows, y);
  };
  // NR rows at once (batch 1), as in nm_window24: every row has the same blocks over the same columns, so
  // a block's x registers are loaded once for all of them, and NR streams of values and positions are in
  // flight
  // NOTE: ad hoc, 4096->11008 fp32 B=1, 2 threads, AVX-512 Xeon (bench/ab_nm.py, paired dense/layer, two
  // runs each): one row at a time 1:4 1.85, 2.20 and 2:8 1.71, 2.53; 8 rows 3.49, 3.66 and 3.57, 3.63
  constexpr int NR = BB == 1 ? NM_DECODE_ROWS : 1;
  auto rows_n = [&](int64_t o0) {
    const typename VL::T* vr[NR];
    const uint8_t* ir[NR];
    typename V::reg acc[NR][2][BB];
    for (int t = 0; t < NR; ++t) {
      vr[t] = v + (o0 + t) * d.S;
      ir[t] = idx + (o0 + t) * d.Sb;
      for (int h = 0; h < 2; ++h)
        for (int b = 0; b < BB; ++b) acc[t][h][b] = V::zero();
    }
    int64_t j = 0, q = 0;
    int r = 0;
    auto block = [&](int h) {
      const typename V::ireg off = V::iload(offs[r]);
      const float* xb = ap + 8 * d.m * q + bc.tab[r][0];
      if (++r == d.n) {
        r = 0;
        ++q;
      }
      typename V::reg xw[BB][NW];
      for (int b = 0; b < BB; ++b)
        for (int k = 0; k < NW; ++k) xw[b][k] = V::load(xb + b * lda + 8 * k);
      for (int t = 0; t < NR; ++t) {
        uint32_t word;
        std::memcpy(&word, ir[t] + j / 2, 4);
        const typename V::ireg c = V::nib8(word, off);
        const typename V::reg w = VL::load(vr[t] + j);
        for (int b = 0; b < BB; ++b) acc[t][h][b] = V::fma(w, V::template select<NW>(xw[b], c), acc[t][h][b]);
      }
      j += 8;
    };
    while (j + 16 <= d.S) {
      block(0);
      block(1);
    }
    if (j + 8 <= d.S) block(0);
    for (int t = 0; t < NR; ++t) window_row_end<V, BB, WD>(acc[t], vr[t], ir[t], j, d, ap, lda, bias, o0 + t, rows, y);
  };
  for_row_groups<NR>(rows, idx, d, bad, nthreads, row1, rows_n);
}

// 2:4, small batch: each 8-slot block covers 4 groups (16 columns). x is re-laid out once per call
// as xr = [g0 | g2], [g1 | g3] per 16 columns, so that a block's slots (g0 g0 g1 g1 | g2 g2 g3 g3)
// pick their x with two in-lane permutes (vpermilps, the position's low 2 bits) and a fixed blend:
// no lane-crossing permute and no offset arithmetic. the values stream is prefetched 2 KB ahead:
// without it one thread read about 9.6 GB/s where a plain streaming sum reads 18.
template <class V, int BB, int WD = 0>
void nm_window24(const float* ap, int64_t lda, const NmShape& d, const typename WLoad<V, WD>::T* v,
                 const uint8_t* idx, int64_t rows, const float* bias, float* y, int nthreads,
                 std::atomic<bool>* bad = nullptr) {
  using VL = WLoad<V, WD>;
  const int64_t nb = d.S / 8;  // whole blocks; the rest of the slots go through ap
  float* xr = scratch(COPY2, static_cast<size_t>(std::max<int64_t>(1, BB * nb * 16)));
  for (int b = 0; b < BB; ++b)
    for (int64_t k = 0; k < nb; ++k) {
      const float* src = ap + b * lda + 16 * k;
      float* dst = xr + (b * nb + k) * 16;
      for (int t = 0; t < 4; ++t) {
        dst[t] = src[t];            // g0
        dst[4 + t] = src[8 + t];    // g2
        dst[8 + t] = src[4 + t];    // g1
        dst[12 + t] = src[12 + t];  // g3
      }
    }
  // one row
  auto row1 = [&](int64_t o) {
    const auto* vr = v + o * d.S;
    const uint8_t* ir = idx + o * d.Sb;
    typename V::reg acc[2][BB];
    for (int h = 0; h < 2; ++h)
      for (int b = 0; b < BB; ++b) acc[h][b] = V::zero();
    int64_t k = 0;
    for (; k + 4 <= nb; k += 4) {
      prefetch(vr + 8 * k + 512);
      prefetch(vr + 8 * k + 528);
      if ((k & 15) == 0) prefetch(ir + 4 * k + 256);
      uint64_t wa, wb;
      std::memcpy(&wa, ir + 4 * k, 8);
      std::memcpy(&wb, ir + 4 * k + 8, 8);
      const typename V::ireg c0 = V::shr4x8(static_cast<uint32_t>(wa));
      const typename V::ireg c1 = V::shr4x8(static_cast<uint32_t>(wa >> 32));
      const typename V::ireg c2 = V::shr4x8(static_cast<uint32_t>(wb));
      const typename V::ireg c3 = V::shr4x8(static_cast<uint32_t>(wb >> 32));
      const auto* vk = vr + 8 * k;
      for (int b = 0; b < BB; ++b) {
        const float* xb = xr + (b * nb + k) * 16;
        const typename V::reg s0 = V::blend_cc(V::permil(V::load(xb), c0), V::permil(V::load(xb + 8), c0));
        const typename V::reg s1 = V::blend_cc(V::permil(V::load(xb + 16), c1), V::permil(V::load(xb + 24), c1));
        const typename V::reg s2 = V::blend_cc(V::permil(V::load(xb + 32), c2), V::permil(V::load(xb + 40), c2));
        const typename V::reg s3 = V::blend_cc(V::permil(V::load(xb + 48), c3), V::permil(V::load(xb + 56), c3));
        acc[0][b] = V::fma(VL::load(vk), s0, acc[0][b]);
        acc[1][b] = V::fma(VL::load(vk + 8), s1, acc[1][b]);
        acc[0][b] = V::fma(VL::load(vk + 16), s2, acc[0][b]);
        acc[1][b] = V::fma(VL::load(vk + 24), s3, acc[1][b]);
      }
    }
    for (; k + 2 <= nb; k += 2) {
      prefetch(vr + 8 * k + 512);
      if ((k & 15) == 0) prefetch(ir + 4 * k + 256);
      uint64_t word;
      std::memcpy(&word, ir + 4 * k, 8);
      const typename V::ireg c0 = V::shr4x8(static_cast<uint32_t>(word));
      const typename V::ireg c1 = V::shr4x8(static_cast<uint32_t>(word >> 32));
      const typename V::reg w0 = VL::load(vr + 8 * k), w1 = VL::load(vr + 8 * k + 8);
      for (int b = 0; b < BB; ++b) {
        const float* xb = xr + (b * nb + k) * 16;
        const typename V::reg s0 = V::blend_cc(V::permil(V::load(xb), c0), V::permil(V::load(xb + 8), c0));
        const typename V::reg s1 = V::blend_cc(V::permil(V::load(xb + 16), c1), V::permil(V::load(xb + 24), c1));
        acc[0][b] = V::fma(w0, s0, acc[0][b]);
        acc[1][b] = V::fma(w1, s1, acc[1][b]);
      }
    }
    for (; k < nb; ++k) {
      uint32_t word;
      std::memcpy(&word, ir + 4 * k, 4);
      const typename V::ireg c0 = V::shr4x8(word);
      const typename V::reg w0 = VL::load(vr + 8 * k);
      for (int b = 0; b < BB; ++b) {
        const float* xb = xr + (b * nb + k) * 16;
        acc[0][b] = V::fma(w0, V::blend_cc(V::permil(V::load(xb), c0), V::permil(V::load(xb + 8), c0)), acc[0][b]);
      }
    }
    window_row_end<V, BB, WD>(acc, vr, ir, 8 * nb, d, ap, lda, bias, o, rows, y);
  };
  // NR rows at once (batch 1): NR streams of values and of positions in flight instead of one, and each
  // block's x loaded once for all of them; the rows past the last whole group, and a group with a bad row
  // in a checked call, go one at a time
  // NOTE: ad hoc, 2:4 B=1 4096->11008 fp32, 2 threads, AVX-512 Xeon, each block of 20 calls after a
  // dense layer's (the weights come from memory), paired medians one row / NR rows: 8 rows on the
  // avx512 path 1.09 and 1.12 (4 rows: 1.03-1.09), 4 rows on the avx2 path 1.08 and 1.11. with the weights
  // left in the cache between calls no difference (1.00-1.05)
  constexpr int NR = BB == 1 ? NM_DECODE_ROWS : 1;
  auto rows_n = [&](int64_t o0) {
    const typename VL::T* vr[NR];
    const uint8_t* ir[NR];
    typename V::reg acc[NR][2][BB];
    for (int r = 0; r < NR; ++r) {
      vr[r] = v + (o0 + r) * d.S;
      ir[r] = idx + (o0 + r) * d.Sb;
      for (int h = 0; h < 2; ++h)
        for (int b = 0; b < BB; ++b) acc[r][h][b] = V::zero();
    }
    int64_t k = 0;
    for (; k + 2 <= nb; k += 2) {
      typename V::reg xa[BB][4];
      for (int b = 0; b < BB; ++b) {
        const float* xb = xr + (b * nb + k) * 16;
        for (int t = 0; t < 4; ++t) xa[b][t] = V::load(xb + 8 * t);
      }
      for (int r = 0; r < NR; ++r) {
        uint64_t word;
        std::memcpy(&word, ir[r] + 4 * k, 8);
        const typename V::ireg c0 = V::shr4x8(static_cast<uint32_t>(word));
        const typename V::ireg c1 = V::shr4x8(static_cast<uint32_t>(word >> 32));
        const typename V::reg w0 = VL::load(vr[r] + 8 * k), w1 = VL::load(vr[r] + 8 * k + 8);
        for (int b = 0; b < BB; ++b) {
          const typename V::reg s0 = V::blend_cc(V::permil(xa[b][0], c0), V::permil(xa[b][1], c0));
          const typename V::reg s1 = V::blend_cc(V::permil(xa[b][2], c1), V::permil(xa[b][3], c1));
          acc[r][0][b] = V::fma(w0, s0, acc[r][0][b]);
          acc[r][1][b] = V::fma(w1, s1, acc[r][1][b]);
        }
      }
    }
    for (; k < nb; ++k)
      for (int r = 0; r < NR; ++r) {
        uint32_t word;
        std::memcpy(&word, ir[r] + 4 * k, 4);
        const typename V::ireg c0 = V::shr4x8(word);
        const typename V::reg w0 = VL::load(vr[r] + 8 * k);
        for (int b = 0; b < BB; ++b) {
          const float* xb = xr + (b * nb + k) * 16;
          acc[r][0][b] = V::fma(w0, V::blend_cc(V::permil(V::load(xb), c0), V::permil(V::load(xb + 8), c0)), acc[r][0][b]);
        }
      }
    for (int r = 0; r < NR; ++r)
      window_row_end<V, BB, WD>(acc[r], vr[r], ir[r], 8 * nb, d, ap, lda, bias, o0 + r, rows, y);
  };
  for_row_groups<NR>(rows, idx, d, bad, nthreads, row1, rows_n);
}

template <class V, int NW, int WD = 0>
void nm_window_b(const float* ap, int64_t lda, int64_t B, const NmShape& d, const BlockCols& bc,
                 const typename WLoad<V, WD>::T* v,
                 const uint8_t* idx, int64_t rows, const float* bias, float* y, int nthreads,
                 std::atomic<bool>* bad = nullptr) {
  if (d.n == 2 && d.m == 4) {
    switch (B) {
      case 1: return nm_window24<V, 1, WD>(ap, lda, d, v, idx, rows, bias, y, nthreads, bad);
      case 2: return nm_window24<V, 2, WD>(ap, lda, d, v, idx, rows, bias, y, nthreads, bad);
      case 3: return nm_window24<V, 3, WD>(ap, lda, d, v, idx, rows, bias, y, nthreads, bad);
      case 4: return nm_window24<V, 4, WD>(ap, lda, d, v, idx, rows, bias, y, nthreads, bad);
      case 5: return nm_window24<V, 5, WD>(ap, lda, d, v, idx, rows, bias, y, nthreads, bad);
      case 6: return nm_window24<V, 6, WD>(ap, lda, d, v, idx, rows, bias, y, nthreads, bad);
      default: return nm_window24<V, 7, WD>(ap, lda, d, v, idx, rows, bias, y, nthreads, bad);
    }
  }
  switch (B) {
    case 1: return nm_window<V, NW, 1, WD>(ap, lda, d, bc, v, idx, rows, bias, y, nthreads, bad);
    case 2: return nm_window<V, NW, 2, WD>(ap, lda, d, bc, v, idx, rows, bias, y, nthreads, bad);
    case 3: return nm_window<V, NW, 3, WD>(ap, lda, d, bc, v, idx, rows, bias, y, nthreads, bad);
    case 4: return nm_window<V, NW, 4, WD>(ap, lda, d, bc, v, idx, rows, bias, y, nthreads, bad);
    case 5: return nm_window<V, NW, 5, WD>(ap, lda, d, bc, v, idx, rows, bias, y, nthreads, bad);
    case 6: return nm_window<V, NW, 6, WD>(ap, lda, d, bc, v, idx, rows, bias, y, nthreads, bad);
    default: return nm_window<V, NW, 7, WD>(ap, lda, d, bc, v, idx, rows, bias, y, nthreads, bad);
  }
}

// the small-batch product (B < 8): the window kernels where an 8-slot block's columns fit in 2 or 4
// registers of x, else the gather kernel; WD is the values' element type (see WLoad in simd.h)
template <class V, int WD>
void nm_small(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const NmShape& d,
              const typename WLoad<V, WD>::T* v, const uint8_t* idx, int64_t rows, const float* bias, float* y,
              int nthreads, std::atomic<bool>* bad = nullptr) {
  const BlockCols bc(d.n, d.m);
  const int nw = nm_window_regs(d, bc);
  if (nw) {
    // a padded copy 32 columns wider than Kp: the zeros past Kp are read by the last windows
    const int64_t lda = d.Kp + 32;
    float* ap = scratch(COPY1, static_cast<size_t>(B * lda));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < K; ++k) ap[b * lda + k] = a[b * s0 + k * s1];
      for (int64_t k = K; k < lda; ++k) ap[b * lda + k] = 0.f;
    }
    if (nw == 2)
      nm_window_b<V, 2, WD>(ap, lda, B, d, bc, v, idx, rows, bias, y, nthreads, bad);
    else
      nm_window_b<V, 4, WD>(ap, lda, B, d, bc, v, idx, rows, bias, y, nthreads, bad);
  } else {
    const float* ap = padded_copy(a, B, K, d.Kp, s0, s1, COPY1);
    nm_gather<V, WD>(ap, B, d, v, idx, rows, bias, y, nthreads, bad);
  }
}

template <class V>
void nm_spmm(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals, const int32_t* perm,
             const uint8_t* idx, int n, int m, int64_t rows, const float* bias, float* y, int nthreads) {
  const NmShape d(n, m, K);
  if (rows == 0 || B == 0) return;
  const float* v = vals;
  if (perm && B < 8) {
    const int64_t total = rows * d.S;
    float* g = scratch(VALS, static_cast<size_t>(std::max<int64_t>(1, total)));
    const int64_t nblk = (rows + GATHER_ROWS - 1) / GATHER_ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t q = 0; q < nblk; ++q)
      nm_gather_blocked(vals, perm, d, q * GATHER_ROWS, std::min(rows, (q + 1) * GATHER_ROWS), g + q * GATHER_ROWS * d.S);
    v = g;
  }
  if (B < 8) {
    nm_small<V, 0>(a, B, K, s0, s1, d, v, idx, rows, bias, y, nthreads);
  } else {
    nm_tile_width<V>(B, [&](auto nv) {
      nm_spmm_csr<V, decltype(nv)::value>(a, B, s0, s1, d, vals, perm, idx, rows, bias, y, nthreads);
    });
  }
}

// nm_spmm (no perm) / nm_spmm16 that check the index they read: B < 8 checks each row before the kernel
// reads through it (into a buffer, copied to y once every row passed); a larger B checks the whole index
// first, split over the threads. false, with y untouched, when a position is not below m.
template <class V, int WD>
bool nm_spmm_checked(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const typename WLoad<V, WD>::T* v,
                     const uint8_t* idx, int n, int m, int64_t rows, const float* bias, float* y, int nthreads) {
  const NmShape d(n, m, K);
  std::atomic<bool> bad{false};
  if (B < 8) {
    if (rows == 0 || B == 0) return true;
    float* yb = scratch(YOUT, static_cast<size_t>(B * rows));
    nm_small<V, WD>(a, B, K, s0, s1, d, v, idx, rows, bias, yb, nthreads, &bad);
    if (bad.load()) return false;
    std::memcpy(y, yb, static_cast<size_t>(B * rows) * sizeof(float));
    return true;
  }
  if constexpr (WD != 0) {
    throw std::invalid_argument("x: a 16-bit weight is read as it is for at most 7 rows");  // the binding checks it
  } else {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = 0; o < rows; ++o)
      if (!nm_row_ok(idx + o * d.Sb, d)) bad.store(true, std::memory_order_relaxed);
    if (bad.load()) return false;
    nm_spmm<V>(a, B, K, s0, s1, v, nullptr, idx, n, m, rows, bias, y, nthreads);
    return true;
  }
}

// the small-batch product (B < 8) of a 16-bit weight (WD 1: bf16, 2: fp16), read as it is: nm_spmm's
// B < 8 path without a permutation
template <class V, int WD>
void nm_spmm16(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const uint16_t* v, const uint8_t* idx,
               int n, int m, int64_t rows, const float* bias, float* y, int nthreads) {
  const NmShape d(n, m, K);
  if (rows == 0 || B == 0) return;
  nm_small<V, WD>(a, B, K, s0, s1, d, v, idx, rows, bias, y, nthreads);
}

template <class V>
void nm_sdd_gather(const float* dyc, const float* xp, int64_t B, int64_t out, const NmShape& d, const uint8_t* idx,
                   float* dv, int nthreads) {
  const BlockCols bc(d.n, d.m);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t o = 0; o < out; ++o) {
    const uint8_t* ir = idx + o * d.Sb;
    float* dvo = dv + o * d.S;
    typename V::reg g[8];
    for (int64_t b = 0; b < B; ++b) g[b] = V::bcast(dyc[b * out + o]);
    alignas(32) int32_t cols[8];
    int64_t j = 0, q = 0;
    int r = 0;
    for (; j + 8 <= d.S; j += 8) {
      bc.get(ir, j, q, r, d.m, cols);
      if (++r == d.n) {
        r = 0;
        ++q;
      }
      typename V::reg acc = V::zero();
      for (int64_t b = 0; b < B; ++b) acc = V::fma(g[b], V::gather(xp + b * d.Kp, cols), acc);
      V::store(dvo + j, acc);
    }
    for (; j < d.S; ++j) {
      const int64_t c = (j / d.n) * d.m + nib(ir, j);
      float s = 0.f;
      for (int64_t b = 0; b < B; ++b) s += dyc[b * out + o] * xp[b * d.Kp + c];
      dvo[j] = s;
    }
  }
}

// the weight gradient through the CSR kernels' blocked walk (see nm_spmm_csr)
template <class V, int NV>
void nm_sdd_csr(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t x0,
                int64_t x1, const NmShape& d, const uint8_t* idx, float* dv, int nthreads) {
  constexpr int BT = 8 * NV;
  const int64_t T = (B + BT - 1) / BT;
  float* pd = scratch(P, static_cast<size_t>(T * out * BT));
  float* px = scratch(PX, static_cast<size_t>(T * d.Kp * BT));
  RegionError err;
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = thread_id(), nt = thread_count();
    const int64_t r0 = out * tid / nt, r1 = out * (tid + 1) / nt;
    pack<V, BT>(dy, B, out, d0, d1, pd);  // ends in a barrier
    pack_padded<V, BT>(x, B, d.K, d.Kp, x0, x1, px);
    for (int64_t q0 = r0; q0 < r1 && !err.failed(); q0 += nm_slice_rows(d, T)) {
      const int64_t q1 = std::min(r1, q0 + nm_slice_rows(d, T));
      err.run([&] {
        const Blocked m = nm_block_rows<V>(d, idx, nullptr, nullptr, q0, q1, BT, T,
                                           chunk_rows_for(sdd_step_lanes<V, NV>(T), out * d.S, out, d.Kp),
                                        block_rows_count(BT));
        float* dvr = dv + q0 * d.S;
        // one chunk: the sums go straight to dv; several: into a scratch buffer in the walk's order, copied back by runs
        float* acc = m.nch == 1 ? dvr : scratch(ACC, static_cast<size_t>((q1 - q0) * d.S));
        sdd_all_tiles<V, NV>(pd, out * BT, px, d.Kp * BT, T, m, q0, acc);
        if (m.nch > 1)
          for (int64_t j = 0; j < m.nch * m.R; ++j)
            if (m.off[j + 1] > m.off[j])
              std::memcpy(dvr + m.src[j], acc + m.off[j], static_cast<size_t>(m.off[j + 1] - m.off[j]) * sizeof(float));
      });
    }
  }
  err.rethrow();
}

template <class V>
void nm_sdd(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in, int64_t x0,
            int64_t x1, const uint8_t* idx, int n, int m, float* dv, int nthreads) {
  const NmShape d(n, m, in);
  if (out == 0 || d.S == 0) return;
  if (B == 0) {
    std::fill(dv, dv + out * d.S, 0.f);
  } else if (B < 8) {
    const float* dyc = contiguous(dy, B, out, d0, d1, COPY1);
    const float* xp = padded_copy(x, B, in, d.Kp, x0, x1, COPY2);
    nm_sdd_gather<V>(dyc, xp, B, out, d, idx, dv, nthreads);
  } else {
    nm_tile_width<V>(B, [&](auto nv) {
      nm_sdd_csr<V, decltype(nv)::value>(dy, B, out, d0, d1, x, x0, x1, d, idx, dv, nthreads);
    });
  }
}

}  // namespace
}  // namespace detail

#define SPARSEOPS_NM_INSTANTIATE(V, SUFFIX)                                                                        \
  void nm_spmm_##SUFFIX(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals,            \
                        const int32_t* perm, const uint8_t* idx, int n, int m, int64_t rows, const float* bias,    \
                        float* y, int nthreads) {                                                                  \
    note_isa_call(ISA_OF_##SUFFIX);                                                                                \
    detail::nm_spmm<V>(a, B, K, s0, s1, vals, perm, idx, n, m, rows, bias, y, nthreads);                           \
  }                                                                                                                \
  bool nm_spmm_checked_##SUFFIX(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals,    \
                                const uint8_t* idx, int n, int m, int64_t rows, const float* bias, float* y,       \
                                int nthreads) {                                                                    \
    note_isa_call(ISA_OF_##SUFFIX);                                                                                \
    return detail::nm_spmm_checked<V, 0>(a, B, K, s0, s1, vals, idx, n, m, rows, bias, y, nthreads);               \
  }                                                                                                                \
  bool nm_spmm16_checked_##SUFFIX(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1,                    \
                                  const uint16_t* vals, bool bf16, const uint8_t* idx, int n, int m, int64_t rows, \
                                  const float* bias, float* y, int nthreads) {                                     \
    note_isa_call(ISA_OF_##SUFFIX);                                                                                \
    if (bf16)                                                                                                      \
      return detail::nm_spmm_checked<V, 1>(a, B, K, s0, s1, vals, idx, n, m, rows, bias, y, nthreads);             \
    return detail::nm_spmm_checked<V, 2>(a, B, K, s0, s1, vals, idx, n, m, rows, bias, y, nthreads);               \
  }                                                                                                                \
  void nm_spmm16_##SUFFIX(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const uint16_t* vals,      \
                          bool bf16, const uint8_t* idx, int n, int m, int64_t rows, const float* bias, float* y,  \
                          int nthreads) {                                                                          \
    note_isa_call(ISA_OF_##SUFFIX);                                                                                \
    if (bf16)                                                                                                      \
      detail::nm_spmm16<V, 1>(a, B, K, s0, s1, vals, idx, n, m, rows, bias, y, nthreads);                          \
    else                                                                                                           \
      detail::nm_spmm16<V, 2>(a, B, K, s0, s1, vals, idx, n, m, rows, bias, y, nthreads);                          \
  }                                                                                                                \
  void nm_sdd_##SUFFIX(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in, \
                       int64_t x0, int64_t x1, const uint8_t* idx, int n, int m, float* dv, int nthreads) {         \
    note_isa_call(ISA_OF_##SUFFIX);                                                                                 \
    detail::nm_sdd<V>(dy, B, out, d0, d1, x, in, x0, x1, idx, n, m, dv, nthreads);                                 \
  }

}  // namespace sparseops
