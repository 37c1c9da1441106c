// Every float32 input, 2^32 of them, through the fused forwards of elu, selu, celu and softplus with
// beta != 1 (float64, rounded once) and of softplus with beta 1, logsigmoid, tanh, silu and sigmoid (float32:
// see their bounds in csrc/fmath.h): the AVX2 kernel and the portable one, each against a long double
// reference (glibc's expm1l / log1pl / expl / tanhl) rounded to float, against each other and, with
// -DSPARSEOPS_HAVE_AVX512, the AVX-512 kernel against the AVX2 one (for tanh against the portable one: those
// two share the table steps, the AVX2 one keeps tanh_g). docs/fewbit.md quotes its counts.
// Build the kernel objects as CMake does (the portable one without -mavx2; all with -ffp-contract=off):
//
//   g++ -O3 -fno-math-errno -ffp-contract=off -fopenmp -Icsrc -c csrc/fewbit_portable.cpp -o fp.o
//   g++ -O3 -fno-math-errno -ffp-contract=off -mavx2 -mfma -mf16c -DSPARSEOPS_AVX2 -DSPARSEOPS_HAVE_AVX2 -fopenmp -Icsrc -c csrc/fewbit_avx2.cpp -o fa.o
//   g++ -O3 -fno-math-errno -ffp-contract=off -mavx2 -mfma -mf16c -mavx512f -mavx512vl -DSPARSEOPS_AVX2 -DSPARSEOPS_AVX512 -DSPARSEOPS_HAVE_AVX2 -DSPARSEOPS_HAVE_AVX512 -fopenmp -Icsrc -c csrc/fewbit_avx512.cpp -o fz.o
//   g++ -O2 -fopenmp -DSPARSEOPS_HAVE_AVX2 -DSPARSEOPS_HAVE_AVX512 -Icsrc bench/cpp/fewbit_exhaustive.cpp fa.o fp.o fz.o -o exh
//   ./exh K        K: 0 elu, 1 selu, 2 celu (alpha 2.5), 3 softplus (beta 1, threshold 20), 4 logsigmoid,
//                  5 silu, 6 sigmoid, 7 tanh, 8 softplus (beta 1.5, threshold 3)
//   (leave out fz.o and -DSPARSEOPS_HAVE_AVX512 on a machine without AVX-512)
//
// the worst error is measured in ulps of the exact value (2^-149 where it rounds to 0).
// about 100-250 s a function on the project's 2 cores. A zero counts as equal to a zero of either sign.
#include "fewbit.h"
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <omp.h>
using namespace sparseops;
namespace sparseops {
void note_isa_call(int) noexcept {}  // dispatch.cpp's call counter, not linked here
}
static inline float bits2f(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t f2bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }
int main(int argc, char** argv) {
  const int which = atoi(argv[1]);
  const double SA = 1.6732632423543772848170429916717, SS = 1.0507009873554804934193349852946;
  double a = 0, b = 0; FewbitFused k;
  switch (which) {
    case 0: k = FewbitFused::elu; a = 1.0; b = 1.0; break;          // elu
    case 1: k = FewbitFused::elu; a = SA * SS; b = SS; break;       // selu
    case 2: k = FewbitFused::celu; a = 2.5; break;                  // celu(2.5)
    case 3: k = FewbitFused::softplus; a = 1.0; b = 20.0; break;    // softplus
    case 5: k = FewbitFused::silu; break;
    case 6: k = FewbitFused::sigmoid; break;
    case 7: k = FewbitFused::tanh; break;
    case 8: k = FewbitFused::softplus; a = 1.5; b = 3.0; break;  // softplus(beta 1.5, threshold 3)
    default: k = FewbitFused::logsigmoid; break;
  }
  auto ref = [&](float xf) -> long double {
    long double x = xf;
    switch (which) {
      case 0: case 1: return x >= 0 ? x * (long double)b : (long double)a * expm1l(x);
      case 2: return x >= 0 ? x : 2.5L * expm1l(x / 2.5L);
      case 3: { if (xf * 1.0f > 20.0f) return x; long double ax = fabsl(x); return (x > 0 ? x : 0) + log1pl(expl(-ax)); }
      case 5: return x > 0 ? x / (1.0L + expl(-x)) : x * expl(x) / (1.0L + expl(x));
      case 6: return x > 0 ? 1.0L / (1.0L + expl(-x)) : expl(x) / (1.0L + expl(x));
      case 7: return tanhl(x);
      case 8: { if (xf * 1.5f > 3.0f) return x; long double xb = x * 1.5L, ax = fabsl(xb); return ((xb > 0 ? xb : 0) + log1pl(expl(-ax))) / 1.5L; }
      default: { long double ax = fabsl(x); return (x < 0 ? x : 0) - log1pl(expl(-ax)); }
    }
  };
  const int64_t CH = 1 << 20, NCH = (int64_t(1) << 32) / CH;
  long long mism_avx = 0, mism_sc = 0, differ = 0, differ512 = 0; double worst = 0, worst_p = 0;
  uint32_t worst_bits = 0, worst_p_bits = 0;
  float bd[1] = {0};
#pragma omp parallel reduction(+ : mism_avx, mism_sc, differ, differ512)
  {
    std::vector<float> x(CH), y(CH), yp(CH), yz(CH);
    double w = 0, wp = 0; uint32_t wb = 0, wpb = 0;
#pragma omp for schedule(dynamic, 4)
    for (int64_t c = 0; c < NCH; ++c) {
      for (int64_t i = 0; i < CH; ++i) x[i] = bits2f(uint32_t(c * CH + i));
      fewbit_pack_fused_avx2(x.data(), FewbitDtype::f32, CH, bd, 1, nullptr, k, a, b, y.data(), 1);
      fewbit_pack_fused_portable(x.data(), FewbitDtype::f32, CH, bd, 1, nullptr, k, a, b, yp.data(), 1);
#ifdef SPARSEOPS_HAVE_AVX512
      fewbit_pack_fused_avx512(x.data(), FewbitDtype::f32, CH, bd, 1, nullptr, k, a, b, yz.data(), 1);
      // tanh: the avx-512 path shares the portable one's table steps (the avx2 one keeps tanh_g)
      for (int64_t i = 0; i < CH; ++i) differ512 += f2bits(yz[i]) != f2bits(which == 7 ? yp[i] : y[i]);
#endif
      for (int64_t i = 0; i < CH; ++i) {
        const float xf = x[i];
        if (xf != xf) {  // nan in, nan out, on both paths
          if (y[i] == y[i]) ++mism_avx;
          if (yp[i] == yp[i]) ++mism_sc;
          continue;
        }
        const float s = yp[i];
        const long double r = ref(xf);
        const float rf = (float)r;
        if (f2bits(y[i]) != f2bits(rf) && !(y[i] == 0 && rf == 0)) ++mism_avx;
        if (f2bits(s) != f2bits(rf) && !(s == 0 && rf == 0)) ++mism_sc;
        if (f2bits(s) != f2bits(y[i])) ++differ;
        if (std::isfinite((double)rf)) {
          int e = -1000; if (r != 0) frexpl(r, &e); if (e - 24 < -149) e = -149 + 24;
          const double ulp = ldexp(1.0, e - 24);
          const double err = (double)fabsl((long double)y[i] - r) / ulp;
          if (err > w) { w = err; wb = f2bits(xf); }
          const double errp = (double)fabsl((long double)s - r) / ulp;
          if (errp > wp) { wp = errp; wpb = f2bits(xf); }
        }
      }
    }
#pragma omp critical
    {
      if (w > worst) { worst = w; worst_bits = wb; }
      if (wp > worst_p) { worst_p = wp; worst_p_bits = wpb; }
    }
  }
  // (tanh: avx2 != portable is expected, the two run different algorithms)
  printf("kind %d: avx2 != rounded reference: %lld, portable != rounded reference: %lld, avx2 != portable: %lld, "
         "avx512 != %s: %lld, worst avx2 error %.4f ulp at x = %.9g, worst portable error %.4f ulp at x = %.9g\n",
         which, mism_avx, mism_sc, differ, which == 7 ? "portable" : "avx2", differ512, worst, bits2f(worst_bits),
         worst_p, bits2f(worst_p_bits));
}
