// few-bit activation codes on raw pointers (Few-Bit Backward, Novikov et al. 2023). torch-free;
// the binding checks every size before these run.
//
// layout of the codes: elements are taken in groups of 32; group g owns the `bits` 32-bit words
// codes[g*bits .. g*bits+bits), and bit i of word j is bit j of the code of element 32*g+i. that is
// b bits an element (8 elements in b bytes), a group decodes with one broadcast and one shift per
// bit plane, and the unused bits of the last group are zero.
#pragma once

#include <cstdint>

namespace sparseops {

// the element type of x / grad / out
enum class FewbitDtype { f32 = 0, bf16 = 1, f16 = 2 };

// codes = pack(code(x)), code(x) = number of borders b[k] with x > b[k] (nan -> 0). borders holds
// 2^bits - 1 floats, sorted; bits in 1..4.
void fewbit_pack(const void* x, FewbitDtype dt, int64_t n, const float* borders, int bits, uint32_t* codes,
                 int nthreads);

// the fused forward of an activation: pack as above (skipped when codes is null: the forward alone),
// and in the same pass y[i] = f(x[i]), rounded once to the element type:
//   clamp:     min(max(x, a), b) (relu, relu6, hardtanh), computed in float;
//   leaky:     x > 0 ? x : x * a, in float;
//   hardswish: x * min(max(x + 3, 0), 6) / 6, in float, in torch's order;
//   hardsigmoid: min(max(x + 3, 0), 6) / 6, likewise;
//   tanh:      computed in float (fmath.h, within 0.77 ulp), then rounded to the element type;
//   sigmoid:   computed in float (fmath.h, within 2.41 ulp), then rounded to the element type.
//   silu:      x * sigmoid(x), computed in float by the same steps (fmath.h silu_f32, within its
//              documented bound), then rounded to the element type; no constants.
//   elu:       x >= 0 ? x * b : a * (e^x - 1) (elu: a = alpha, b = 1; selu: a = alpha * scale, b = scale),
//   celu:      x >= 0 ? x : a * (e^(x / a) - 1), a > 0,
//   softplus:  x * a > b ? x : log(1 + e^(x a)) / a (a = beta > 0, b = threshold),
//              these three computed in double and rounded once to float (fmath.h: correctly rounded but
//              for inputs whose value lies within ~1e-15 of a midpoint, always within 1 ulp), then to
//              the element type; softplus with a = 1 in float (fmath.h, within 0.85 ulp);
//   logsigmoid: no constants, in float (fmath.h, within 0.85 ulp).
// clamp, leaky, hardswish and hardsigmoid are torch's forward bit for bit, nan and -0 included; the
// float ones are within their bound of the exact value on every path, with the same bits on each.
enum class FewbitFused {
  clamp = 1, leaky = 2, hardswish = 3, tanh = 4, hardsigmoid = 5, sigmoid = 6,
  elu = 7, celu = 8, softplus = 9, logsigmoid = 10, silu = 11
};
void fewbit_pack_fused(const void* x, FewbitDtype dt, int64_t n, const float* borders, int bits, uint32_t* codes,
                       FewbitFused kind, double a, double b, void* y, int nthreads);

// out[i] = grad[i] * levels[code(i)], the product rounded once to the element type. levels holds
// 2^bits floats. out may be grad itself (each element is read before it is written), no other overlap.
void fewbit_unpack(const void* grad, FewbitDtype dt, const uint32_t* codes, int64_t n, const float* levels, int bits,
                   void* out, int nthreads);

// per-isa entry points (fewbit_avx2.cpp, fewbit_portable.cpp)
void fewbit_pack_portable(const void*, FewbitDtype, int64_t, const float*, int, uint32_t*, int);
void fewbit_pack_fused_portable(const void*, FewbitDtype, int64_t, const float*, int, uint32_t*, FewbitFused, double,
                                double, void*, int);
void fewbit_unpack_portable(const void*, FewbitDtype, const uint32_t*, int64_t, const float*, int, void*, int);
#if defined(SPARSEOPS_HAVE_AVX2)
void fewbit_pack_avx2(const void*, FewbitDtype, int64_t, const float*, int, uint32_t*, int);
void fewbit_pack_fused_avx2(const void*, FewbitDtype, int64_t, const float*, int, uint32_t*, FewbitFused, double,
                            double, void*, int);
void fewbit_unpack_avx2(const void*, FewbitDtype, const uint32_t*, int64_t, const float*, int, void*, int);
#endif
#if defined(SPARSEOPS_HAVE_AVX512)
void fewbit_pack_avx512(const void*, FewbitDtype, int64_t, const float*, int, uint32_t*, int);
void fewbit_pack_fused_avx512(const void*, FewbitDtype, int64_t, const float*, int, uint32_t*, FewbitFused, double,
                            double, void*, int);
void fewbit_unpack_avx512(const void*, FewbitDtype, const uint32_t*, int64_t, const float*, int, void*, int);
#endif

}  // namespace sparseops
