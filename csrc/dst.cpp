// index work of mask updates: selection by magnitude, sampling of free positions, and the re-pack of
// a CSR weight in both orientations. see dst.h for the contracts.
#include "dst.h"
#include "scratch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace sparseops {
namespace {

// |v| as an order-preserving 31-bit key: the float's bits without the sign (nan above inf)
inline uint32_t mag(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u & 0x7fffffffu;
}

// f(flat position, key) for each entry of s [., cols] in [b, e) that the CSR does not hold (crow null:
// every entry), in ascending order. the stored columns of a row split it into runs with no test inside.
template <class F>
void for_eligible(const float* s, int64_t cols, const int32_t* crow, const int32_t* col, int64_t b, int64_t e,
                  F&& f) {
  if (b >= e) return;
  if (!crow) {
    for (int64_t i = b; i < e; ++i) f(i, mag(s[i]));
    return;
  }
  int64_t i = b;
  for (int64_t r = b / cols; i < e; ++r) {
    const int64_t start = r * cols, stop = std::min(e, start + cols);
    const int32_t* ce = col + crow[r + 1];
    const int32_t* p = std::lower_bound(col + crow[r], ce, static_cast<int32_t>(i - start));
    while (i < stop) {
      const int64_t run = p < ce ? std::min(stop, start + *p) : stop;
      for (; i < run; ++i) f(i, mag(s[i]));
      if (i < stop) {  // i is the stored column *p
        ++i;
        ++p;
      }
    }
  }
}

constexpr int SHIFT = 16;                                // bucket = the key's top 15 bits
constexpr int64_t NB = int64_t(1) << (31 - SHIFT);       // 32768 buckets

int chunks(int64_t work, int nthreads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, work / (int64_t(1) << 16) + 1)));
}

// larger = larger key, then lower column (cols < 2^31)
inline uint64_t pack(uint32_t key, int64_t c) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(c));
}
inline int64_t unpack_col(uint64_t v) { return static_cast<int64_t>(~static_cast<uint32_t>(v)); }

inline uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// uniform in [0, n) without bias. with 128-bit integers: Lemire's multiply-and-reject (no division
// in the common case: the 64-bit modulo was most of sample_off); otherwise redraw past the largest
// multiple of n, then take the remainder
inline uint64_t below(uint64_t& state, uint64_t n) {
#if defined(__SIZEOF_INT128__)
  unsigned __int128 m = static_cast<unsigned __int128>(splitmix64(state)) * n;
  uint64_t low = static_cast<uint64_t>(m);
  if (low < n) {
    const uint64_t threshold = (0 - n) % n;
    while (low < threshold) {
      m = static_cast<unsigned __int128>(splitmix64(state)) * n;
      low = static_cast<uint64_t>(m);
    }
  }
  return static_cast<uint64_t>(m >> 64);
#else
  const uint64_t top = std::numeric_limits<uint64_t>::max();
  const uint64_t limit = top - top % n;
  uint64_t x;
  do x = splitmix64(state);
  while (x >= limit);
  return x % n;
#endif
}

inline int lowest_bit(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctzll(v);
#else
  int i = 0;
  while (!(v & 1)) {
    v >>= 1;
    ++i;
  }
  return i;
#endif
}

// the set bits of v, branch-free (__builtin_popcountll is a library call without -mpopcnt, which a
// portable build does not pass)
inline int64_t popcount(uint64_t v) {
  v = v - ((v >> 1) & 0x5555555555555555ull);
  v = (v & 0x3333333333333333ull) + ((v >> 2) & 0x3333333333333333ull);
  v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0full;
  return static_cast<int64_t>((v * 0x0101010101010101ull) >> 56);
}

}  // namespace

namespace {

// the positions [0, N) that top_abs may not choose, as a bitmap (empty: none): the CSR's stored
// positions (built in parallel over rows; only the first and the last word of a thread's rows can be
// shared with a neighbour, and those take an atomic or) and the entries that eligible flags 0
std::vector<uint64_t> excluded(int64_t rows, int64_t cols, const int32_t* crow, const int32_t* col,
                               const uint8_t* eligible, int nthreads) {
  const int64_t N = rows * cols;
  std::vector<uint64_t> ex;
  if (!crow && !eligible) return ex;
  ex.assign(static_cast<size_t>((N + 63) / 64), 0);
  uint64_t* X = ex.data();
  if (crow) {
    const int T = chunks(crow[rows], nthreads);
#pragma omp parallel for schedule(static, 1) num_threads(T)
    for (int t = 0; t < T; ++t) {
      const int64_t r0 = rows * t / T, r1 = rows * (t + 1) / T;
      if (r0 >= r1) continue;
      const int64_t w0 = r0 * cols >> 6, w1 = (r1 * cols - 1) >> 6;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t p = crow[r]; p < crow[r + 1]; ++p) {
          const int64_t x = r * cols + col[p];
          const int64_t w = x >> 6;
          const uint64_t bit = uint64_t(1) << (x & 63);
          if (w == w0 || w == w1) {
#pragma omp atomic
            X[w] |= bit;
          } else {
            X[w] |= bit;
          }
        }
    }
  }
  if (eligible) {
#pragma omp parallel for schedule(static) num_threads(chunks(N, nthreads))
    for (int64_t w = 0; w < static_cast<int64_t>(ex.size()); ++w) {
      uint64_t bits = 0;
      const int64_t b = w * 64, e = std::min(N, b + 64);
      for (int64_t i = b; i < e; ++i) bits |= static_cast<uint64_t>(eligible[i] == 0) << (i - b);
      X[w] |= bits;
    }
  }
  return ex;
}

// the exact selection in three passes over s: a histogram of the keys' top bits per chunk, the
// candidates of the bucket that holds the n-th largest, then the output. E: the excluded bitmap or null.
void top_abs_exact(const float* s, int64_t N, const uint64_t* E, int64_t n, int64_t* out, int nthreads) {
  const int T = chunks(N, nthreads);
  std::vector<int64_t> bnd(T + 1);
  for (int t = 0; t <= T; ++t) bnd[t] = N / T * t + std::min<int64_t>(t, N % T);
  auto held = [E](int64_t i) -> bool { return E && ((E[i >> 6] >> (i & 63)) & 1); };
  // 1: a histogram of the keys' top bits, one per chunk (branch-free: an excluded entry adds 0)
  std::vector<int64_t> hist(static_cast<size_t>(T) * NB, 0);
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    int64_t* h = hist.data() + static_cast<size_t>(t) * NB;
    if (E) {
      for (int64_t i = bnd[t]; i < bnd[t + 1]; ++i)
        h[mag(s[i]) >> SHIFT] += static_cast<int64_t>(1 - ((E[i >> 6] >> (i & 63)) & 1));
    } else {
      for (int64_t i = bnd[t]; i < bnd[t + 1]; ++i) ++h[mag(s[i]) >> SHIFT];
    }
  }
  // 2: the bucket of the n-th largest: everything above it is taken, `need` of it
  int64_t above = 0, bucket = NB - 1;
  for (; bucket > 0; --bucket) {
    int64_t c = 0;
    for (int t = 0; t < T; ++t) c += hist[static_cast<size_t>(t) * NB + bucket];
    if (above + c >= n) break;
    above += c;
  }
  const int64_t need = n - above;
  const uint32_t B = static_cast<uint32_t>(bucket);
  // 3: the candidates in that bucket, each chunk's in ascending order; the best `need` of them
  struct Cand {
    uint32_t key;
    int64_t pos;
  };
  std::vector<std::vector<Cand>> cand(T);
  RegionError errors;  // the candidates' vectors grow inside the region
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    errors.run([&] {
      std::vector<Cand>& C = cand[t];
      C.reserve(static_cast<size_t>(hist[static_cast<size_t>(t) * NB + B]));
      for (int64_t i = bnd[t]; i < bnd[t + 1]; ++i) {
        const uint32_t k = mag(s[i]);
        if ((k >> SHIFT) == B && !held(i)) C.push_back({k, i});
      }
    });
  }
  errors.rethrow();
  std::vector<Cand> all;
  for (int t = 0; t < T; ++t) all.insert(all.end(), cand[t].begin(), cand[t].end());
  if (static_cast<int64_t>(all.size()) > need) {
    std::nth_element(all.begin(), all.begin() + need, all.end(), [](const Cand& a, const Cand& b) {
      return a.key != b.key ? a.key > b.key : a.pos < b.pos;
    });
    all.resize(static_cast<size_t>(need));
    std::sort(all.begin(), all.end(), [](const Cand& a, const Cand& b) { return a.pos < b.pos; });
  }
  // 4: each chunk writes its share straight into out: its entries above the bucket and its chosen
  // candidates, in ascending order
  std::vector<int64_t> start(T + 1, 0), first(T + 1, 0);
  for (int t = 0; t < T; ++t) {
    int64_t a = 0;
    const int64_t* h = hist.data() + static_cast<size_t>(t) * NB;
    for (int64_t b = bucket + 1; b < NB; ++b) a += h[b];
    first[t + 1] = std::lower_bound(all.begin(), all.end(), bnd[t + 1],
                                    [](const Cand& c, int64_t p) { return c.pos < p; }) - all.begin();
    start[t + 1] = start[t] + a + (first[t + 1] - first[t]);
  }
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    int64_t* o = out + start[t];
    const Cand* c = all.data() + first[t];
    const Cand* ce = all.data() + first[t + 1];
    for (int64_t i = bnd[t]; i < bnd[t + 1]; ++i) {
      const uint32_t b = mag(s[i]) >> SHIFT;
      if (b < B) continue;
      if (b > B) {
        if (!held(i)) *o++ = i;
      } else if (c < ce && c->pos == i) {
        *o++ = i;
        ++c;
      }
    }
  }
}

// the k-th largest of v (1 <= k <= v.size(), values below 2^31), by radix selection on the range
// the values span: a 256-bucket histogram of (x - lo) >> shift, keep the bucket of the k-th, repeat
// (at most 4 rounds). *above: how many values are strictly larger. v is reordered and shrunk. for the
// few hundred keys of a row, where nth_element's and sort's mispredicted branches cost microseconds
uint32_t kth_largest(std::vector<uint32_t>& v, int64_t k, int64_t* above) {
  int64_t over = 0;
  uint32_t lo = v[0], hi = v[0];
  for (const uint32_t x : v) {
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  while (lo != hi) {
    int shift = 0;
    while (((hi - lo) >> shift) > 255u) ++shift;
    int64_t cnt[256] = {0};
    for (const uint32_t x : v) ++cnt[(x - lo) >> shift];
    int b = 255;
    for (; over + cnt[b] < k; --b) over += cnt[b];
    size_t w = 0;
    uint32_t nlo = hi, nhi = lo;
    for (const uint32_t x : v)
      if (((x - lo) >> shift) == static_cast<uint32_t>(b)) {
        v[w++] = x;
        nlo = std::min(nlo, x);
        nhi = std::max(nhi, x);
      }
    v.resize(w);
    lo = nlo;
    hi = nhi;
  }
  *above = over;
  return lo;
}

constexpr int64_t SAMPLE_GROUPS = 4096, SAMPLE_GROUPS_MIN = 256, SAMPLED_FROM = 65536;

// a growable array that leaves new room uninitialized (std::vector's resize wrote zeros over what the
// filter then overwrote: 5 MB and their page faults for a 16.7M-key selection)
template <class T>
struct Buffer {
  std::unique_ptr<T[]> p;
  size_t cap = 0;
  T* data() const { return p.get(); }
  // room for n entries, the first `keep` kept
  void room(size_t n, size_t keep) {
    if (n <= cap) return;
    std::unique_ptr<T[]> q(new T[n]);
    if (keep) std::memcpy(q.get(), p.get(), keep * sizeof(T));
    p = std::move(q);
    cap = n;
  }
};

// the candidates of s[b, e): each position whose (key ^ flip) >= lo and that E does not hold, appended
// with its key to P and K (room for max(cap, FILTER_SPAN) at first, grown as needed) in ascending order; returns their
// count. the filter (keys_past, a path per isa) runs on blocks of FILTER_SPAN positions, each with room
// for all of them past the candidates so far
constexpr int64_t FILTER_SPAN = 4096;

int64_t filter_chunk(const float* s, const uint64_t* E, int64_t b, int64_t e, uint32_t flip, int32_t lo, size_t cap,
                     Buffer<int64_t>& P, Buffer<uint32_t>& K) {
  int64_t m = 0;
  P.room(std::max<size_t>(cap, FILTER_SPAN), 0);
  K.room(P.cap, 0);
  for (int64_t i = b; i < e; i += FILTER_SPAN) {
    const int64_t stop = std::min(e, i + FILTER_SPAN);
    const size_t need = static_cast<size_t>(m + (stop - i));
    if (P.cap < need) {
      P.room(std::max(P.cap * 2, need), static_cast<size_t>(m));
      K.room(P.cap, static_cast<size_t>(m));
    }
    m += keys_past(s, E, i, stop, flip, lo, P.data() + m, K.data() + m);
  }
  return m;
}

// the selection in one pass over s, when a sample of s predicts the cut well: q = d / (eligible
// entries) of them are chosen on one side (top: the d largest; otherwise the d smallest, the ones
// *not* chosen, when n is more than half). a sample of G random aligned runs of 16 bounds
// the side's key with a margin of z standard deviations (a run's share is in [0, 1], so its variance
// is at most q(1 - q) however the runs correlate); one pass gathers every eligible entry past that
// bound (position and key, a chunk's in ascending order), an exact radix selection among them finds the
// cut key and how many of its ties to take, and a last pass over the candidates (top) or over the
// positions (bottom) writes out. returns false, having written nothing, when the bound let through
// fewer than d entries (the caller then runs top_abs_exact) or the sample cannot bound q.
bool top_abs_sampled(const float* s, int64_t N, const uint64_t* E, int64_t eligible_n, int64_t n, int64_t* out,
                     int nthreads, double z) {
  const bool top = n <= eligible_n - n;
  const int64_t d = top ? n : eligible_n - n;  // chosen (top) or left out (bottom)
  if (d <= 0 || N < SAMPLED_FROM) return false;
  auto held = [E](int64_t i) -> bool { return E && ((E[i >> 6] >> (i & 63)) & 1); };
  // flips the comparisons for the bottom side: a key k ranks by k ^ flip, larger first (keys are
  // below 2^31, so both stay non-negative as int32)
  const uint32_t flip = top ? 0u : 0x7fffffffu;
  // the sample: G runs, one per 1024 entries between SAMPLE_GROUPS_MIN and SAMPLE_GROUPS (it cost a
  // millisecond at 4096 runs, half a small layer's selection)
  const int64_t G = std::min<int64_t>(SAMPLE_GROUPS, std::max<int64_t>(SAMPLE_GROUPS_MIN, N / 1024));
  std::vector<uint32_t> sk;
  sk.reserve(static_cast<size_t>(16 * G));
  uint64_t state = 0x5eed5a3b1e5ull ^ static_cast<uint64_t>(n);
  std::vector<int64_t> at(static_cast<size_t>(G));
  for (int64_t& b : at) b = static_cast<int64_t>(below(state, static_cast<uint64_t>(N / 16))) * 16;
  std::sort(at.begin(), at.end());  // read in address order: random order missed the TLB at every run
  for (const int64_t b : at)
    for (int64_t i = b; i < b + 16; ++i)
      if (!held(i)) sk.push_back(mag(s[i]) ^ flip);
  const double q = static_cast<double>(d) / static_cast<double>(eligible_n);
  const double qhi = q + z * std::sqrt(q * (1 - q) / static_cast<double>(G)) + 1.0 / static_cast<double>(G);
  const int64_t S = static_cast<int64_t>(sk.size());
  const int64_t rank = std::max<int64_t>(0, static_cast<int64_t>(std::ceil(qhi * static_cast<double>(S))));
  if (qhi >= 0.5 || S < 16 || rank >= S) return false;
  int64_t unused;
  const int32_t lo = static_cast<int32_t>(kth_largest(sk, rank + 1, &unused));  // candidates: key ^ flip >= lo
  // the pass: each chunk's candidates (filter_chunk). chunks start on a multiple of 64, so that each
  // owns whole words of a bitmap over the positions
  const int T = chunks(N, nthreads);
  std::vector<int64_t> bnd(T + 1);
  for (int t = 0; t < T; ++t) bnd[t] = (N / T * t) & ~int64_t(63);
  bnd[T] = N;
  std::vector<Buffer<int64_t>> cpos(T);
  std::vector<Buffer<uint32_t>> ckey(T);
  std::vector<int64_t> cnt(T, 0), elig(T, 0);
  RegionError errors;  // filter_chunk grows each chunk's lists inside the region
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) errors.run([&] {
    const int64_t len = bnd[t + 1] - bnd[t];
    const double share = std::min(1.0, std::max(0.0, qhi * 1.25));  // the expected candidates, and a margin
    const size_t cap = static_cast<size_t>(static_cast<double>(len) * share) + 64;
    const int64_t m = filter_chunk(s, E, bnd[t], bnd[t + 1], flip, lo, cap, cpos[t], ckey[t]);
    cnt[t] = m;
    int64_t ex = 0;  // the chunk's excluded entries
    if (E && !top) {
      for (int64_t i = bnd[t]; i < bnd[t + 1];) {
        if ((i & 63) == 0 && i + 64 <= bnd[t + 1]) {
          ex += popcount(E[i >> 6]);
          i += 64;
        } else {
          ex += static_cast<int64_t>((E[i >> 6] >> (i & 63)) & 1);
          ++i;
        }
      }
    }
    elig[t] = len - ex;
  });
  errors.rethrow();
  int64_t M = 0;
  for (int t = 0; t < T; ++t) M += cnt[t];
  if (M < d) return false;
  // the exact cut among the candidates: the d-th by (key ^ flip) descending. a histogram of its top
  // 15 bits finds the cut's bucket
  std::vector<int64_t> th(static_cast<size_t>(T) * NB, 0), hist(NB, 0);
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    int64_t* h = th.data() + static_cast<size_t>(t) * NB;
    const uint32_t* K = ckey[t].data();
    const int64_t c = cnt[t];  // a local: h's stores could alias cnt
    for (int64_t j = 0; j < c; ++j) ++h[(K[j] ^ flip) >> SHIFT];
  }
  for (int t = 0; t < T; ++t)
    for (int64_t b = 0; b < NB; ++b) hist[static_cast<size_t>(b)] += th[static_cast<size_t>(t) * NB + b];
  int64_t above = 0, bucket = NB - 1;
  for (; bucket > 0 && above + hist[bucket] < d; --bucket) above += hist[bucket];
  // the cut inside that bucket, by a second histogram over the key's low 16 bits (no sort: ties,
  // e.g. the zeros of weights grown at the last update, fill a bucket with equal keys)
  const int64_t need = d - above;  // 1 <= need <= hist[bucket]
  constexpr int64_t NL = int64_t(1) << SHIFT;
  std::vector<int64_t> tlow(static_cast<size_t>(T) * NL, 0), low(NL, 0);
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    int64_t* h = tlow.data() + static_cast<size_t>(t) * NL;
    const uint32_t* K = ckey[t].data();
    const int64_t c = cnt[t];
    for (int64_t j = 0; j < c; ++j) {
      const uint32_t f = K[j] ^ flip;
      h[f & 0xffffu] += static_cast<int64_t>((f >> SHIFT) == static_cast<uint32_t>(bucket));
    }
  }
  for (int t = 0; t < T; ++t)
    for (int64_t b = 0; b < NL; ++b) low[static_cast<size_t>(b)] += tlow[static_cast<size_t>(t) * NL + b];
  int64_t better = 0, lb = (int64_t(1) << SHIFT) - 1;  // better: the bucket's keys strictly past the cut
  for (; lb > 0 && better + low[static_cast<size_t>(lb)] < need; --lb) better += low[static_cast<size_t>(lb)];
  const uint32_t cut = (static_cast<uint32_t>(bucket) << SHIFT) | static_cast<uint32_t>(lb);
  int64_t ties = need - better;  // how many entries with key ^ flip == cut the side takes
  // per chunk: past the cut, equal to it; the ties go to the lower positions on the top side (which
  // chooses them) and to the higher ones on the bottom side (which leaves them out)
  std::vector<int64_t> gt(T, 0), eq(T, 0), tie(T, 0);
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    int64_t a = 0, e = 0;
    const uint32_t* K = ckey[t].data();
    const int64_t c = cnt[t];
    for (int64_t j = 0; j < c; ++j) {
      const uint32_t f = K[j] ^ flip;
      a += f > cut;
      e += f == cut;
    }
    gt[t] = a;
    eq[t] = e;
  }
  for (int i = 0; i < T; ++i) {
    const int t = top ? i : T - 1 - i;
    tie[t] = std::min(ties, eq[t]);
    ties -= tie[t];
  }
  std::vector<uint64_t> gone(top ? 0 : static_cast<size_t>((N + 63) / 64));  // bottom: the left-out positions
  std::vector<int64_t> start(T + 1, 0);
  for (int t = 0; t < T; ++t) start[t + 1] = start[t] + (top ? gt[t] + tie[t] : elig[t] - gt[t] - tie[t]);
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    int64_t* o = out + start[t];
    const int64_t* P = cpos[t].data();
    const uint32_t* K = ckey[t].data();
    const int64_t c = cnt[t];
    if (top) {
      int64_t take = tie[t];
      for (int64_t j = 0; j < c; ++j) {
        const uint32_t f = K[j] ^ flip;
        if (f > cut || (f == cut && take-- > 0)) *o++ = P[j];
      }
    } else {
      // every eligible position of the chunk but the left-out candidates (past the cut, or among the
      // chunk's last tie[t] equal to it): the left-out ones into a bitmap of the chunk's words, then
      // the positions of its clear bits that E does not hold, a word at a time
      int64_t skip = eq[t] - tie[t];  // equal ones, in order, that are kept before the left-out ties
      const int64_t w0 = bnd[t] >> 6, w1 = (bnd[t + 1] + 63) >> 6;
      uint64_t* D = gone.data();
      std::fill(D + w0, D + w1, uint64_t(0));
      for (int64_t j = 0; j < c; ++j) {
        const uint32_t f = K[j] ^ flip;
        const bool left_out = f > cut || (f == cut && skip-- <= 0);
        D[P[j] >> 6] |= static_cast<uint64_t>(left_out) << (P[j] & 63);
      }
      for (int64_t w = w0; w < w1; ++w) {
        uint64_t bits = ~(D[w] | (E ? E[w] : 0));
        if (w == (N >> 6) && (N & 63)) bits &= (uint64_t(1) << (N & 63)) - 1;
        while (bits) {
          *o++ = w * 64 + lowest_bit(bits);
          bits &= bits - 1;
        }
      }
    }
  }
  return true;
}

}  // namespace

void top_abs(const float* s, int64_t rows, int64_t cols, const int32_t* crow, const int32_t* col,
             const uint8_t* eligible, int64_t n, int64_t* out, int nthreads, double z) {
  if (n <= 0 || rows <= 0 || cols <= 0) return;
  const int64_t N = rows * cols;
  const std::vector<uint64_t> ex = excluded(rows, cols, crow, col, eligible, nthreads);
  const uint64_t* E = ex.empty() ? nullptr : ex.data();
  if (z != 0) {
    int64_t held = 0;
    if (E) {
#pragma omp parallel for schedule(static) num_threads(chunks(N, nthreads)) reduction(+ : held)
      for (int64_t w = 0; w < static_cast<int64_t>(ex.size()); ++w) held += popcount(ex[static_cast<size_t>(w)]);
    }
    if (top_abs_sampled(s, N, E, N - held, n, out, nthreads, z)) return;
  }
  top_abs_exact(s, N, E, n, out, nthreads);
}

void top_abs_rows(const float* s, int64_t rows, int64_t cols, const int32_t* crow, const int32_t* col,
                  const uint8_t* keep, const int64_t* need, int64_t* out, int nthreads) {
  constexpr int RSHIFT = 20;                          // a row's buckets: the key's top 11 bits
  constexpr int64_t RNB = int64_t(1) << (31 - RSHIFT);  // 2048 buckets, 8 KB of counts
  constexpr int64_t ROW_SAMPLE = 256;
  RegionError errors;  // the per-thread buffers grow inside the region
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<uint64_t> buf, dropped, held;
    std::vector<uint32_t> hist, sk, ckeys;
    std::vector<int64_t> cpos;
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < rows; ++r) errors.run([&] {
      if (errors.failed()) return;  // the call fails: the rows left are not worth the work
      if (hist.empty()) hist.resize(RNB);
      const int64_t m = need[r + 1] - need[r];
      if (m <= 0) return;
      const float* sr = s + r * cols;
      const int64_t p0 = crow[r], pe = crow[r + 1];
      const int64_t nfree = cols - (pe - p0);
      buf.clear();
      // for_eligible over this row alone: the free positions, f(position - r * cols, key)
      auto each_free = [&](auto&& f) {
        for_eligible(s, cols, crow, col, r * cols, (r + 1) * cols,
                     [&](int64_t i, uint32_t k) { f(i - r * cols, k); });
      };
      if (nfree <= m) {  // every free position, then the best dropped ones
        each_free([&](int64_t c, uint32_t k) { buf.push_back(pack(k, c)); });
        dropped.clear();
        for (int64_t p = p0; p < pe; ++p)
          if (!keep[p]) dropped.push_back(pack(mag(sr[col[p]]), col[p]));
        const int64_t take = m - static_cast<int64_t>(buf.size());
        std::nth_element(dropped.begin(), dropped.begin() + take, dropped.end(), std::greater<uint64_t>());
        buf.insert(buf.end(), dropped.begin(), dropped.begin() + take);
      } else {
        // the row's stored columns as a bitmap: the passes below test a bit (branch-free in the
        // histogram) instead of breaking the row into runs at every stored column
        held.assign(static_cast<size_t>((cols + 63) / 64), 0);
        for (int64_t p = p0; p < pe; ++p) held[static_cast<size_t>(col[p] >> 6)] |= uint64_t(1) << (col[p] & 63);
        const uint64_t* H = held.data();
        auto is_held = [H](int64_t c) -> bool { return (H[c >> 6] >> (c & 63)) & 1; };
        // first, one pass bounded by a sample of the row (top_abs_sampled's way, per row): ROW_SAMPLE
        // random columns bound the m-th largest free key with a margin of 3 standard deviations, and
        // every free column past the bound is a candidate. (the histogram alone chained its increments
        // on a few hot buckets: 36 ms for a 4096^2 gradient.)
        if (cols >= 4 * ROW_SAMPLE && 4 * m < nfree) {
          // the sample reads at random: have the row's lines on their way first (in order, which the
          // memory system streams), and the next row's, for the pass after this one
#if defined(__GNUC__) || defined(__clang__)
          for (int64_t c = 0; c < cols; c += 16) __builtin_prefetch(sr + c);
          if (r + 1 < rows)
            for (int64_t c = 0; c < cols; c += 16) __builtin_prefetch(sr + cols + c);
#endif
          sk.clear();
          uint64_t st = 0x243f6a8885a308d3ull ^ (static_cast<uint64_t>(r) * 0x9e3779b97f4a7c15ull);
          for (int64_t j = 0; j < ROW_SAMPLE; ++j) {
            const int64_t c = static_cast<int64_t>(below(st, static_cast<uint64_t>(cols)));
            if (!is_held(c)) sk.push_back(mag(sr[c]));
          }
          const double q = static_cast<double>(m) / static_cast<double>(nfree);
          const double qhi = q + 3 * std::sqrt(q * (1 - q) / ROW_SAMPLE) + 1.0 / ROW_SAMPLE;
          const int64_t S = static_cast<int64_t>(sk.size());
          const int64_t rank = static_cast<int64_t>(std::ceil(qhi * static_cast<double>(S)));
          if (S >= ROW_SAMPLE / 4 && rank < S) {
            int64_t unused;
            const uint32_t bound = kth_largest(sk, rank + 1, &unused);
            // room for a whole row (sized once a thread: a resize down and up again would zero it)
            if (cpos.size() < static_cast<size_t>(cols)) {
              cpos.resize(static_cast<size_t>(cols));
              ckeys.resize(static_cast<size_t>(cols));
            }
            const int64_t nc = keys_past(sr, H, 0, cols, 0u, static_cast<int32_t>(bound), cpos.data(), ckeys.data());
            if (nc >= m) {
              // the cut among the candidates, then the candidates past it and the first of its ties,
              // already in column order
              sk.assign(ckeys.begin(), ckeys.begin() + nc);
              int64_t better;
              const uint32_t cut = kth_largest(sk, m, &better);
              int64_t ties = m - better;
              int64_t* o = out + need[r];
              for (int64_t j = 0; j < nc; ++j)
                if (ckeys[j] > cut || (ckeys[j] == cut && ties-- > 0)) *o++ = r * cols + cpos[j];
              return;  // this row is done
            }
          }
        }
        if (buf.empty()) {
          // the exact way: the bucket of the m-th largest free key in a histogram of the top bits,
          // then every free key from that bucket up
          std::fill(hist.begin(), hist.end(), 0u);
          uint32_t* h = hist.data();
          for (int64_t c = 0; c < cols; ++c)
            h[mag(sr[c]) >> RSHIFT] += static_cast<uint32_t>(1 - ((H[c >> 6] >> (c & 63)) & 1));
          int64_t above = 0, b = RNB - 1;
          for (; b > 0 && above + h[b] < m; --b) above += h[b];
          const uint32_t lo = static_cast<uint32_t>(b) << RSHIFT;
          buf.reserve(static_cast<size_t>(above + h[b]));
          for (int64_t c = 0; c < cols; ++c) {
            const uint32_t k = mag(sr[c]);
            if (k >= lo && !is_held(c)) buf.push_back(pack(k, c));
          }
        }
        if (static_cast<int64_t>(buf.size()) > m)
          std::nth_element(buf.begin(), buf.begin() + m, buf.end(), std::greater<uint64_t>());
      }
      int64_t* o = out + need[r];
      for (int64_t j = 0; j < m; ++j) o[j] = unpack_col(buf[j]);
      std::sort(o, o + m);
      for (int64_t j = 0; j < m; ++j) o[j] += r * cols;
    });
  }
  errors.rethrow();
}

int64_t count_off_kept(int64_t rows, int64_t cols, const int32_t* crow, const int32_t* col, const uint8_t* keep,
                       const int64_t* pos, int64_t n, int64_t* counts, int nthreads) {
  // where each row's positions start (pos ascending): a binary search for each thread's first row,
  // then a walk forward (a search per row missed the cache at every step)
  std::vector<int64_t> ps(rows + 1);
  const int T = chunks(n + rows, nthreads);
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    const int64_t r0 = rows * t / T, r1 = rows * (t + 1) / T;
    int64_t j = std::lower_bound(pos, pos + n, r0 * cols) - pos;
    for (int64_t r = r0; r < r1; ++r) {
      ps[r] = j;
      const int64_t end = (r + 1) * cols;
      while (j < n && pos[j] < end) ++j;
    }
  }
  ps[rows] = n;
  // per row: its kept columns as bits of a thread's bitmap (set, tested, cleared again), so that each
  // position is one test (a merge of the position list with the row's columns mispredicted at most steps)
  // NOTE: ad hoc, SRigL's saliency count at 4096^2 90% (503K positions, 1.17M kept), 2 threads: the call
  // took 4.0 ms with the merge, 2.3 with the bitmap (the binding's checks of its inputs ~1 of it)
  const size_t words = static_cast<size_t>((cols + 63) / 64);
  const ThreadScratch<uint64_t> bitmaps(nthreads, words);
  int64_t total = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
  {
#if defined(_OPENMP)
    uint64_t* Bm = bitmaps.zeroed(omp_get_thread_num(), words);
#else
    uint64_t* Bm = bitmaps.zeroed(0, words);
#endif
#pragma omp for schedule(dynamic, 64)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t p0 = crow[r], pe = crow[r + 1];
      if (ps[r] == ps[r + 1]) {  // no positions in the row
        counts[r] = 0;
        continue;
      }
      for (int64_t p = p0; p < pe; ++p) Bm[col[p] >> 6] |= static_cast<uint64_t>(keep[p] != 0) << (col[p] & 63);
      int64_t c = 0;
      for (int64_t j = ps[r]; j < ps[r + 1]; ++j) {
        const int64_t x = pos[j] - r * cols;
        c += 1 - static_cast<int64_t>((Bm[x >> 6] >> (x & 63)) & 1);
      }
      for (int64_t p = p0; p < pe; ++p) Bm[col[p] >> 6] = 0;
      counts[r] = c;
      total += c;
    }
  }
  return total;
}

void gather_or_zero(const int32_t* src, int64_t n, const float* const* xs, float* const* outs, int k, int nthreads) {
  // one pass over src for every tensor: the re-map of values and of each optimizer state
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t i = 0; i < n; ++i) {
    const int32_t j = src[i];
    for (int t = 0; t < k; ++t) outs[t][i] = j >= 0 ? xs[t][j] : 0.0f;
  }
}

void sample_off(int64_t rows, int64_t cols, const int32_t* crow, const int32_t* col, int64_t n, uint64_t seed,
                int64_t* out, int nthreads) {
  if (n <= 0) return;
  const int64_t N = rows * cols, F = N - crow[rows];
  const size_t words = static_cast<size_t>((N + 63) / 64);
  // held: the stored positions; occ: held plus the picked ones, the one bitmap a draw tests
  const std::vector<uint64_t> held = excluded(rows, cols, crow, col, nullptr, nthreads);
  std::vector<uint64_t> occ(held);
  // draw the smaller of the chosen set and its complement among the free positions, by rejection. a
  // batch of draws is made ahead and its words prefetched, then the draws are tested in order: the
  // same sequence, accepted the same way, as one at a time (whose every test missed the cache)
  const bool invert = n > F / 2;
  const int64_t draw = invert ? F - n : n;
  uint64_t state = seed;
  constexpr int BATCH = 32;
  uint64_t x[BATCH];
  uint64_t* O = occ.data();
  for (int64_t got = 0; got < draw;) {
    for (int j = 0; j < BATCH; ++j) {
      x[j] = below(state, static_cast<uint64_t>(N));
#if defined(__GNUC__) || defined(__clang__)
      __builtin_prefetch(O + (x[j] >> 6), 1);
#endif
    }
    for (int j = 0; j < BATCH && got < draw; ++j) {
      const size_t w = static_cast<size_t>(x[j] >> 6);
      const uint64_t bit = uint64_t(1) << (x[j] & 63);
      if (O[w] & bit) continue;
      O[w] |= bit;
      ++got;
    }
  }
  // the output: a chunk of words per thread, each writing after the chunks before it
  const int T = chunks(static_cast<int64_t>(words) * 64, nthreads);
  std::vector<int64_t> wb(T + 1), start(T + 1, 0);
  for (int t = 0; t <= T; ++t) wb[t] = static_cast<int64_t>(words) * t / T;
  const uint64_t* H = held.data();
  auto chosen = [&](size_t w) -> uint64_t {
    uint64_t bits = invert ? ~O[w] : (O[w] & ~H[w]);
    if (w + 1 == words && (N & 63)) bits &= (uint64_t(1) << (N & 63)) - 1;
    return bits;
  };
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    int64_t c = 0;
    for (int64_t w = wb[t]; w < wb[t + 1]; ++w) c += popcount(chosen(static_cast<size_t>(w)));
    start[t + 1] = c;
  }
  for (int t = 0; t < T; ++t) start[t + 1] += start[t];
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    int64_t* o = out + start[t];
    for (int64_t w = wb[t]; w < wb[t + 1]; ++w) {
      uint64_t bits = chosen(static_cast<size_t>(w));
      while (bits) {
        *o++ = w * 64 + lowest_bit(bits);
        bits &= bits - 1;
      }
    }
  }
}

// one row of csr_repack's merge: the row's kept columns and its grown ones (both ascending) into one
// ascending run, with src and the re-map. the row's two lists are copied into buffers with a sentinel
// past each end (INT64_MAX, above every column), so the loop runs once an entry with no tail loops, and
// the heads of both lists for the next step are loaded before this step's compare resolves: the chain
// from one step to the next is a compare, a select and an add. before, each step loaded kept[a], then
// col[kept[a]], then compared: two dependent loads a step
// NOTE: ad hoc, a SET update at 4096^2 90% (1.17M kept, 0.5M grown, Adam's two moments re-mapped), 2
// threads, the merge alone: 5.1 ms before
struct RowMerge {
  std::vector<int64_t> kc, kk, gc;  // kept columns, their old positions, grown columns; each + sentinels
  template <int K>
  int row(int64_t r, int64_t cols, const int32_t* col, const int64_t* kept, const int64_t* grown,
          const std::vector<int64_t>& ks, const std::vector<int64_t>& gs, const int32_t* ncrow, int32_t* ncol,
          int32_t* nrow, int32_t* src, const float* const* xs, float* const* outs, int kr) {
    const int nk_ = K >= 0 ? K : kr;
    const int64_t a0 = ks[r], na = ks[r + 1] - a0, g0 = gs[r], ngr = gs[r + 1] - g0, base = r * cols;
    kc.resize(static_cast<size_t>(na + 2));
    kk.resize(static_cast<size_t>(na + 2));
    gc.resize(static_cast<size_t>(ngr + 2));
    int64_t* KC = kc.data();
    int64_t* KK = kk.data();
    int64_t* GC = gc.data();
    for (int64_t i = 0; i < na; ++i) {
      KK[i] = kept[a0 + i];
      KC[i] = col[KK[i]];
    }
    // past the end: a column above all, and an old position that is safe to read (the last kept one, or
    // 0 when the row keeps none: the layer keeps some somewhere, else k is 0 here)
    KC[na] = KC[na + 1] = std::numeric_limits<int64_t>::max();
    KK[na] = KK[na + 1] = na > 0 ? KK[na - 1] : 0;
    for (int64_t j = 0; j < ngr; ++j) GC[j] = grown[g0 + j] - base;
    GC[ngr] = GC[ngr + 1] = std::numeric_limits<int64_t>::max();
    const int32_t rr = static_cast<int32_t>(r);
    const int64_t o0 = ncrow[r], n = na + ngr;
    const float* X[K > 0 ? K : 1];
    float* O[K > 0 ? K : 1];
    if constexpr (K > 0)
      for (int t = 0; t < K; ++t) {
        X[t] = xs[t];
        O[t] = outs[t] + o0;
      }
    int32_t* NC = ncol + o0;
    int32_t* NR = nrow + o0;
    int32_t* SR = src + o0;
    int64_t a = 0, g = 0, ca = KC[0], cg = GC[0];
    int c = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t nxa = KC[a + 1], nxg = GC[g + 1], ka = KK[a];
      const bool fk = ca < cg;
      c |= ca == cg;
      NC[i] = static_cast<int32_t>(fk ? ca : cg);
      NR[i] = rr;
      SR[i] = fk ? static_cast<int32_t>(ka) : -1;
      if constexpr (K > 0) {
        for (int t = 0; t < K; ++t) {
          const float v = X[t][ka];
          O[t][i] = fk ? v : 0.0f;
        }
      } else if constexpr (K < 0) {
        for (int t = 0; t < nk_; ++t) {
          const float v = xs[t][ka];
          outs[t][o0 + i] = fk ? v : 0.0f;
        }
      }
      ca = fk ? nxa : ca;
      cg = fk ? cg : nxg;
      a += fk;
      g += !fk;
    }
    return c;
  }
};

// columns the transposing scatter of csr_repack writes at once
constexpr int64_t REPACK_COL_BLOCK = 256;

bool csr_repack(int64_t rows, int64_t cols, const int32_t* crow, const int32_t* col, const int64_t* kept,
                int64_t nk, const int64_t* grown, int64_t ng, int32_t* ncrow, int32_t* ncol, int32_t* nrow,
                int32_t* t_crow, int32_t* t_row, int32_t* t_perm, int32_t* src, int nthreads, const float* const* xs,
                float* const* outs, int k) {
  const int k_given = k;
  const int64_t nn = nk + ng;
  const int T = chunks(nn, nthreads);
  // where each row's kept and grown entries start: each thread finds its first row's by a binary
  // search, then walks both lists forward (a binary search a row missed the cache at every step)
  std::vector<int64_t> ks(rows + 1), gs(rows + 1);
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    const int64_t r0 = rows * t / T, r1 = rows * (t + 1) / T;
    int64_t a = std::lower_bound(kept, kept + nk, static_cast<int64_t>(crow[r0])) - kept;
    int64_t g = std::lower_bound(grown, grown + ng, r0 * cols) - grown;
    for (int64_t r = r0; r < r1; ++r) {
      ks[r] = a;
      gs[r] = g;
      const int64_t kend = crow[r + 1], gend = (r + 1) * cols;
      while (a < nk && kept[a] < kend) ++a;
      while (g < ng && grown[g] < gend) ++g;
    }
  }
  ks[rows] = nk;
  gs[rows] = ng;
  ncrow[0] = 0;
  for (int64_t r = 0; r < rows; ++r)
    ncrow[r + 1] = static_cast<int32_t>(ncrow[r] + (ks[r + 1] - ks[r]) + (gs[r + 1] - gs[r]));
  int clash = 0;
  // row-major: merge each row's kept columns with its grown ones (RowMerge::row, above)
  if (nk == 0) k = 0;  // nothing to gather from (xs may be empty): outs are all 0, written below
  RegionError errors;  // RowMerge's buffers grow inside the region
#pragma omp parallel num_threads(T) reduction(| : clash)
  {
    RowMerge m;
#pragma omp for schedule(dynamic, 64)
    for (int64_t r = 0; r < rows; ++r) errors.run([&] {
      if (errors.failed()) return;
      switch (k) {
        case 0: clash |= m.row<0>(r, cols, col, kept, grown, ks, gs, ncrow, ncol, nrow, src, xs, outs, 0); break;
        case 1: clash |= m.row<1>(r, cols, col, kept, grown, ks, gs, ncrow, ncol, nrow, src, xs, outs, 1); break;
        case 2: clash |= m.row<2>(r, cols, col, kept, grown, ks, gs, ncrow, ncol, nrow, src, xs, outs, 2); break;
        case 3: clash |= m.row<3>(r, cols, col, kept, grown, ks, gs, ncrow, ncol, nrow, src, xs, outs, 3); break;
        default: clash |= m.row<-1>(r, cols, col, kept, grown, ks, gs, ncrow, ncol, nrow, src, xs, outs, k);
      }
    });
  }
  errors.rethrow();
  if (nk == 0 && outs)
    for (int t = 0; t < k_given; ++t) std::fill(outs[t], outs[t] + nn, 0.0f);
  if (clash) return false;
  // column-major: a counting sort by column; each chunk of rows scatters after the chunks before it,
  // so rows stay ascending within a column
  std::vector<int64_t> rb(T + 1);
  for (int t = 0; t <= T; ++t)
    rb[t] = std::lower_bound(ncrow, ncrow + rows + 1, static_cast<int32_t>(nn * t / T)) - ncrow;
  rb[0] = 0;
  rb[T] = rows;
  std::vector<int64_t> cnt(static_cast<size_t>(T) * cols, 0);
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    int64_t* h = cnt.data() + static_cast<size_t>(t) * cols;
    const int64_t k0 = ncrow[rb[t]], k1 = ncrow[rb[t + 1]];  // locals: h's stores could alias rb
    for (int64_t k = k0; k < k1; ++k) ++h[ncol[k]];
  }
  int64_t run = 0;
  t_crow[0] = 0;
  for (int64_t c = 0; c < cols; ++c) {
    for (int t = 0; t < T; ++t) {
      const int64_t x = cnt[static_cast<size_t>(t) * cols + c];
      cnt[static_cast<size_t>(t) * cols + c] = run;
      run += x;
    }
    t_crow[c + 1] = static_cast<int32_t>(run);
  }
  // the scatter, a block of REPACK_COL_BLOCK columns at a time: a thread walks its rows once per block,
  // a cursor per row remembering where the row's (ascending) columns left off, so that it writes into
  // REPACK_COL_BLOCK column runs at once instead of all of them (one cache line of t_row and t_perm
  // each: every column at a time missed the cache on most writes). the same order within each column.
  // NOTE: standalone, 2 threads, 10% dense: 2048^2 1.50 -> 1.17 ms, 4096^2 7.7 -> 3.7 ms
  // each thread's row cursors, allocated before the region (a failed allocation inside it would
  // terminate the process)
  const std::unique_ptr<int32_t[]> curs = scratch_array<int32_t>(static_cast<size_t>(rows));
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    int64_t* at = cnt.data() + static_cast<size_t>(t) * cols;
    const int64_t r0 = rb[t], r1 = rb[t + 1];  // locals: the stores through at could alias rb
    int32_t* cu = curs.get() + r0;
    for (int64_t r = r0; r < r1; ++r) cu[r - r0] = ncrow[r];
    for (int64_t c0 = 0; c0 < cols; c0 += REPACK_COL_BLOCK) {
      const int32_t c1 = static_cast<int32_t>(std::min(cols, c0 + REPACK_COL_BLOCK));
      for (int64_t r = r0; r < r1; ++r) {
        int32_t k = cu[r - r0];
        const int32_t e = ncrow[r + 1];
        for (; k < e && ncol[k] < c1; ++k) {
          const int64_t pos = at[ncol[k]]++;
          t_row[pos] = static_cast<int32_t>(r);
          t_perm[pos] = k;
        }
        cu[r - r0] = k;
      }
    }
  }
  return true;
}

}  // namespace sparseops
