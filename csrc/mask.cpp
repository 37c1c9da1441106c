// see mask.h. one build for every cpu: a pass over a bitmap and two dense arrays, memory-bound.
#include "mask.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace sparseops {
namespace {

// set bits of v, branch-free (__builtin_popcount is a library call without -mpopcnt, which a portable
// build does not pass)
inline int64_t popcount32(uint32_t v) {
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  return static_cast<int64_t>((((v + (v >> 4)) & 0x0f0f0f0fu) * 0x01010101u) >> 24);
}

inline int lowest_bit(uint32_t v) {  // v != 0
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctz(v);
#else
  int i = 0;
  while (!((v >> i) & 1u)) ++i;
  return i;
#endif
}

// word w of the mask with the bits at or past n cleared
inline uint32_t word(const int32_t* mask, int64_t w, int64_t n) {
  uint32_t v = static_cast<uint32_t>(mask[w]);
  const int64_t rest = n - w * 32;
  if (rest < 32) v &= (uint32_t(1) << rest) - 1;
  return v;
}

constexpr int64_t MIN_WORDS = 1 << 14;  // per thread: below this one thread does it all

int team(int nthreads, int64_t words) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, words / MIN_WORDS)));
}

// start[t]: the set bits before thread t's words (words * t / T ..)
std::vector<int64_t> starts(const int32_t* mask, int64_t n, int64_t words, int T) {
  std::vector<int64_t> start(static_cast<size_t>(T) + 1, 0);
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    int64_t c = 0;
    for (int64_t w = words * t / T; w < words * (t + 1) / T; ++w) c += popcount32(word(mask, w, n));
    start[t + 1] = c;
  }
  for (int t = 0; t < T; ++t) start[t + 1] += start[t];
  return start;
}

// the fills below recount the bits (starts) and hold each thread to its own count, so that a mask that
// changes under them (another thread writing it while the binding has dropped the GIL) can give wrong
// values but never a write or read past the count the caller sized for: they return false, having
// touched nothing, when the total differs from that count
template <class E>
bool select(const E* x, int64_t n, const int32_t* mask, E* out, int64_t cap, int nthreads) {
  const int64_t words = (n + 31) / 32;
  const int T = team(nthreads, words);
  const std::vector<int64_t> start = starts(mask, n, words, T);
  if (start[static_cast<size_t>(T)] != cap) return false;
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    E* o = out + start[t];
    E* const end = out + start[t + 1];
    for (int64_t w = words * t / T; w < words * (t + 1) / T; ++w) {
      uint32_t v = word(mask, w, n);
      const E* xw = x + w * 32;
      while (v && o < end) {
        const int i = lowest_bit(v);
        *o++ = xw[i];
        v &= v - 1;
      }
    }
  }
  return true;
}

template <class E>
bool expand(const int32_t* mask, const E* vals, int64_t nvals, int64_t n, E* out, int nthreads) {
  const int64_t words = (n + 31) / 32;
  const int T = team(nthreads, words);
  const std::vector<int64_t> start = starts(mask, n, words, T);
  if (start[static_cast<size_t>(T)] != nvals) return false;
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    const E* v = vals + start[t];
    const E* const end = vals + start[t + 1];
    for (int64_t w = words * t / T; w < words * (t + 1) / T; ++w) {
      const uint32_t m = word(mask, w, n);
      E* ow = out + w * 32;
      const int64_t len = std::min<int64_t>(32, n - w * 32);
      for (int64_t i = 0; i < len; ++i) {
        const bool on = ((m >> i) & 1u) && v < end;
        ow[i] = on ? *v : E(0);
        v += on;
      }
    }
  }
  return true;
}

template <class E>
void where(const int32_t* mask, const E* x, int64_t n, E* out, int nthreads) {
  const int64_t words = (n + 31) / 32;
#pragma omp parallel for schedule(static) num_threads(team(nthreads, words))
  for (int64_t w = 0; w < words; ++w) {
    const uint32_t m = word(mask, w, n);
    const E* xw = x + w * 32;
    E* ow = out + w * 32;
    const int64_t len = std::min<int64_t>(32, n - w * 32);
    for (int64_t i = 0; i < len; ++i) ow[i] = ((m >> i) & 1u) ? xw[i] : E(0);
  }
}

}  // namespace

int64_t mask_count(const int32_t* mask, int64_t n, int nthreads) {
  const int64_t words = (n + 31) / 32;
  const int T = team(nthreads, words);
  return starts(mask, n, words, T)[static_cast<size_t>(T)];
}

bool mask_select(const void* x, int esize, int64_t n, const int32_t* mask, void* out, int64_t cap, int nthreads) {
  if (esize == 4) return select(static_cast<const uint32_t*>(x), n, mask, static_cast<uint32_t*>(out), cap, nthreads);
  return select(static_cast<const uint16_t*>(x), n, mask, static_cast<uint16_t*>(out), cap, nthreads);
}

bool mask_expand(const int32_t* mask, const void* vals, int64_t nvals, int esize, int64_t n, void* out,
                 int nthreads) {
  if (esize == 4)
    return expand(mask, static_cast<const uint32_t*>(vals), nvals, n, static_cast<uint32_t*>(out), nthreads);
  return expand(mask, static_cast<const uint16_t*>(vals), nvals, n, static_cast<uint16_t*>(out), nthreads);
}

void mask_where(const int32_t* mask, const void* x, int esize, int64_t n, void* out, int nthreads) {
  if (esize == 4)
    where(mask, static_cast<const uint32_t*>(x), n, static_cast<uint32_t*>(out), nthreads);
  else
    where(mask, static_cast<const uint16_t*>(x), n, static_cast<uint16_t*>(out), nthreads);
}

}  // namespace sparseops
