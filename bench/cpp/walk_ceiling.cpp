// The ceiling of the batch-vector walk's inner step, alone: one thread, 64 lanes (8 accumulators), a
// stream of S stored weights in sorted runs of RUN columns (one (row, chunk) visit each: accumulators
// loaded, RUN slots of broadcast + 8 FMAs against a row of X, stored), the X chunk XR rows of 64 floats.
// README's N:M section quotes it: 70 GF/s with XR=64 (16 KB, in L1), 59 with XR=160 (40 KB, 1:4's chunk,
// in L2), and 40-45 a copy with two copies at once (the two threads of the layer).
//
//   g++ -O3 -mavx2 -mfma bench/cpp/walk_ceiling.cpp -o walk
//   ./walk S XR REPS RUN                   e.g. ./walk 4096 160 8000 40
//   (./walk 4096 160 8000 40 & ./walk 4096 160 8000 40; wait)       two at once
//
// -DPF=D adds a software prefetch of the X row D slots ahead (slower here: 27-37 vs 40-43 GF/s, ad hoc).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s S XR REPS RUN\n", argv[0]);
    return 2;
  }
  const int64_t S = std::atol(argv[1]);
  const int XR = std::atoi(argv[2]), REP = std::atoi(argv[3]), run = std::atoi(argv[4]);
  std::vector<int32_t> idx(S + 64, 0);
  std::vector<float> val(S, 1e-3f);
  std::mt19937 g(1);
  for (int64_t i = 0; i < S; ++i) idx[i] = static_cast<int32_t>(g() % XR);
  for (int64_t i = 0; i + run <= S; i += run) std::sort(idx.begin() + i, idx.begin() + i + run);
  std::vector<float> X(static_cast<size_t>(XR) * 64 + 64, 1.0f);
  float* xp = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(X.data()) + 63) & ~uintptr_t(63));
  alignas(32) float out[64] = {};
  __m256 acc[8];
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < REP; ++r)
    for (int64_t k = 0; k < S; k += run) {
      for (int v = 0; v < 8; ++v) acc[v] = _mm256_load_ps(out + 8 * v);
      for (int64_t j = k, e = std::min<int64_t>(k + run, S); j < e; ++j) {
#ifdef PF
        const char* pp = reinterpret_cast<const char*>(xp + static_cast<int64_t>(idx[j + PF]) * 64);
        for (int l = 0; l < 256; l += 64) _mm_prefetch(pp + l, _MM_HINT_T0);
#endif
        const __m256 w = _mm256_broadcast_ss(&val[j]);
        const float* xr = xp + static_cast<int64_t>(idx[j]) * 64;
        for (int v = 0; v < 8; ++v) acc[v] = _mm256_fmadd_ps(w, _mm256_load_ps(xr + 8 * v), acc[v]);
      }
      for (int v = 0; v < 8; ++v) _mm256_store_ps(out + 8 * v, acc[v]);
    }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("S=%ld XR=%d run=%d: %.1f GF/s, %.2f ns a slot (checksum %g)\n", static_cast<long>(S), XR, run,
              2.0 * 64 * S * REP / s * 1e-9, s * 1e9 / (S * REP), out[3]);
}
