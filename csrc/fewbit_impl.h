// the few-bit kernels, written once over the vector type V of simd.h and instantiated per isa by
// fewbit_avx2.cpp and fewbit_portable.cpp. both are one streaming pass: pack reads x and writes
// bits/32 of its bytes, unpack reads grad and the codes and writes out.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "fewbit.h"
#include "simd.h"

namespace sparseops {
namespace detail {
// internal linkage for everything below: each ISA's translation unit (*_avx2.cpp built with -mavx2
// -mfma, *_portable.cpp without) keeps its own copy. with external linkage an inline function the
// compiler did not inline (block_store, row_range, scratch, ...) was one weak symbol, and the linker
// could hand the portable path the copy compiled for AVX2 (tests/test_build.py checks the objects).
namespace {

// loads and stores of 8 elements of each element type, and scalar ones for the tail
template <class V, FewbitDtype DT>
struct Io;

template <class V>
struct Io<V, FewbitDtype::f32> {
  using T = float;
  static typename V::reg load(const T* p) { return V::load(p); }
  static void store(T* p, const typename V::reg& a) { V::store(p, a); }
  static float to_float(T v) { return v; }
  static T from_float(float v) { return v; }
};

template <class V>
struct Io<V, FewbitDtype::bf16> {
  using T = uint16_t;
  static typename V::reg load(const T* p) { return V::load_bf16(p); }
  static void store(T* p, const typename V::reg& a) { V::store_bf16(p, a); }
  static float to_float(T v) { return bf16_to_f32(v); }
  static T from_float(float v) { return f32_to_bf16(v); }
};

template <class V>
struct Io<V, FewbitDtype::f16> {
  using T = uint16_t;
  static typename V::reg load(const T* p) { return V::load_f16(p); }
  static void store(T* p, const typename V::reg& a) { V::store_f16(p, a); }
  static float to_float(T v) { return f16_to_f32(v); }
  static T from_float(float v) { return f32_to_f16(v); }
};

// NOTE: a group of 32 elements is 128 bytes of fp32; 1024 groups (128 KiB in, 4 KiB of codes at
// 1 bit) a chunk, split statically over the threads: a [32, 4096] activation (4 chunks) runs on two
// threads (with 4096 a chunk it was one chunk, one thread, 1.6x torch's time)
constexpr int64_t kGroupsPerChunk = 1024;

// the kinds computed on the group's 4 vectors at once (long chains of dependent steps: see simd.h)
template <int KIND>
constexpr bool kWide = KIND == static_cast<int>(FewbitFused::sigmoid) || KIND == static_cast<int>(FewbitFused::silu) ||
                       KIND == static_cast<int>(FewbitFused::tanh) ||
                       KIND == static_cast<int>(FewbitFused::elu) || KIND == static_cast<int>(FewbitFused::celu) ||
                       KIND == static_cast<int>(FewbitFused::softplus) ||
                       KIND == static_cast<int>(FewbitFused::logsigmoid);

// y = f(x) of the fused forward on N vectors, for the kWide kinds. how many go through each step
// together (W) is per kind: the float64 softplus (an exp, a division and a series in float64) gains
// from 4, elu and celu lose (their temporaries no longer fit the 16 registers)
// NOTE: ad hoc, 4M fp32 elements, one thread, ns an element at W = 1 / 2 / 4 (this machine varies by
// 25% between runs): softplus 4.9-3.9 / 3.7-4.4 / 3.4-3.5, elu 1.9-2.8 / 1.9-2.8 / 2.2-2.8 (the float64
// tanh and logsigmoid of then: 2.0 / 2.3-2.7 / 2.3-3.1 and 4.1-5.3 / 3.3-3.8 / 3.2-3.3)
template <class V, int KIND, int N>
inline void fused_n(const typename V::reg* x, typename V::reg* y, double da, double db, double dinv) {
  if constexpr (KIND == static_cast<int>(FewbitFused::sigmoid)) {
    V::template sigmoid_n<N>(x, y);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::silu)) {
    V::template silu_n<N>(x, y);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::tanh)) {
    V::template tanh_n<N>(x, y);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::elu)) {
    for (int q = 0; q < N; ++q) V::template elu_n<1>(x + q, y + q, da, db);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::celu)) {
    for (int q = 0; q < N; ++q) V::template celu_n<1>(x + q, y + q, da, dinv);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::softplus)) {
    if (da == 1.0)  // torch's default beta: the float32 steps
      V::template softplus1_n<N>(x, y, static_cast<float>(db));
    else
      V::template softplus_n<N>(x, y, da, db, dinv);
  } else {
    static_assert(KIND == static_cast<int>(FewbitFused::logsigmoid));
    V::template logsigmoid_n<N>(x, y);
  }
}

// y = f(x) of the fused forward (KIND 0: none; else a FewbitFused but the kWide ones), on a vector
template <class V, int KIND>
inline typename V::reg fused(const typename V::reg& x, const typename V::reg& a, const typename V::reg& b) {
  if constexpr (KIND == static_cast<int>(FewbitFused::clamp)) {
    return V::min2(b, V::max2(a, x));
  } else if constexpr (KIND == static_cast<int>(FewbitFused::leaky)) {
    return V::leaky(x, a);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::hardswish)) {
    // torch's x * min(max(x + 3, 0), 6) / 6 in this order (a nan in x + 3 is the second operand: kept)
    const typename V::reg six = V::bcast(6.0f);
    return V::div(V::mul(x, V::min2(six, V::max2(V::zero(), V::add(x, V::bcast(3.0f))))), six);
  } else {
    static_assert(KIND == static_cast<int>(FewbitFused::hardsigmoid));
    // torch's min(max(x + 3, 0), 6) / 6
    const typename V::reg six = V::bcast(6.0f);
    return V::div(V::min2(six, V::max2(V::zero(), V::add(x, V::bcast(3.0f)))), six);
  }
}

// V only keeps the avx2 and portable instantiations apart (no -mavx2 copy may serve the portable path);
// the float32 kinds go through V's vector steps on one element: no scalar copy of them in an -mfma
// translation unit
template <class V, int KIND>
inline float fused1(float x, float a, float b, double da, double db, double dinv) {
  if constexpr (KIND == static_cast<int>(FewbitFused::elu)) {
    return fmath::elu_f32(x, da, db);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::celu)) {
    return fmath::celu_f32(x, da, dinv);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::softplus)) {
    if (da != 1.0) return fmath::softplus_f32(x, da, db, dinv);
    typename V::reg v = V::bcast(x), r;
    V::template softplus1_n<1>(&v, &r, b);
    return V::lane0(r);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::logsigmoid)) {
    typename V::reg v = V::bcast(x), r;
    V::template logsigmoid_n<1>(&v, &r);
    return V::lane0(r);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::clamp)) {
    const float lo = a > x ? a : x;
    return b < lo ? b : lo;
  } else if constexpr (KIND == static_cast<int>(FewbitFused::leaky)) {
    return x > 0.0f ? x : x * a;
  } else if constexpr (KIND == static_cast<int>(FewbitFused::hardswish)) {
    const float v = x + 3.0f, lo = 0.0f > v ? 0.0f : v, m = 6.0f < lo ? 6.0f : lo;
    return x * m / 6.0f;
  } else if constexpr (KIND == static_cast<int>(FewbitFused::hardsigmoid)) {
    const float v = x + 3.0f, lo = 0.0f > v ? 0.0f : v;
    return (6.0f < lo ? 6.0f : lo) / 6.0f;
  } else if constexpr (KIND == static_cast<int>(FewbitFused::sigmoid)) {
    return V::sigmoid1(x);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::silu)) {
    return V::silu1(x);
  } else {
    static_assert(KIND == static_cast<int>(FewbitFused::tanh));
    typename V::reg v = V::bcast(x), r;
    V::template tanh_n<1>(&v, &r);
    return V::lane0(r);
  }
}

// the wide path (VecAVX512, fp32 elements): a group is two 16-lane vectors, its codes come from compares
// into mask registers (VecAVX512::wplanes) and the float kinds' y from the same operations on 16 lanes
// (fused<V::W16>; the kWide kinds: VecAVX512's w* twins of the 8-lane steps, wfused_n), so the bits
// are the 8-lane path's. other element types (a 16-bit load or store per 8 lanes) and the other paths
// take the 8-lane loop
// NOTE: ad hoc, 4M fp32 elements, 2 threads: relu6 at 2 bits with its codes 0.67 ms on the 8-lane loop,
// 0.62 on this one, 0.57 for y alone and 0.59-0.60 for torch's relu6. 16-lane codes next to 8-lane
// steps lose: sigmoid's pass went from 1.1 to 2.7 ms that way (loading x before or after them alike);
// 512-bit instructions in flight take a vector port from the 256-bit ones (Intel's port 0+1 fusion),
// and those steps are bound by that port. so a kind is wide whole or not at all
template <class V, FewbitDtype DT>
constexpr bool kWidePath = V::wide && DT == FewbitDtype::f32;

// fused_n on 16-lane vectors (VecAVX512's w* twins of the 8-lane steps)
template <class V, int KIND, int N>
inline void wfused_n(const typename V::W16::reg* x, typename V::W16::reg* y, double da, double db, double dinv) {
  if constexpr (KIND == static_cast<int>(FewbitFused::sigmoid)) {
    V::template wsigmoid_n<N>(x, y);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::silu)) {
    V::template wsilu_n<N>(x, y);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::tanh)) {
    V::template wtanh_n<N>(x, y);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::elu)) {
    V::template welu_n<N>(x, y, da, db);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::celu)) {
    V::template wcelu_n<N>(x, y, da, dinv);
  } else if constexpr (KIND == static_cast<int>(FewbitFused::softplus)) {
    if (da == 1.0)
      V::template wsoftplus1_n<N>(x, y, static_cast<float>(db));
    else
      V::template wsoftplus_n<N>(x, y, da, db, dinv);
  } else {
    static_assert(KIND == static_cast<int>(FewbitFused::logsigmoid));
    V::template wlogsigmoid_n<N>(x, y);
  }
}

template <class V, int BITS, bool W = V::wide>
struct WideBorders {
  explicit WideBorders(const float*) {}
};
template <class V, int BITS>
struct WideBorders<V, BITS, true> : V::template WBorders<BITS> {
  explicit WideBorders(const float* f) : V::template WBorders<BITS>(f) {}
};

template <class V, FewbitDtype DT, int BITS, int KIND = 0>
void pack(const void* xv, int64_t n, const float* borders, uint32_t* codes, int nthreads, double da = 0.0,
          double db = 0.0, void* yv = nullptr) {
  // the float kinds take their constants as floats (softplus with beta 1: its threshold); the float64
  // family (elu, celu, softplus) as doubles, with 1 / a for celu and softplus
  const float pa = static_cast<float>(da), pb = static_cast<float>(db);
  const double dinv = da != 0.0 ? 1.0 / da : 0.0;
  using IO = Io<V, DT>;
  using T = typename IO::T;
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  const typename V::reg va = V::bcast(pa), vb = V::bcast(pb);
  const typename V::template Borders<BITS> b(borders);
  const WideBorders<V, BITS> wb(borders);
  const int64_t groups = (n + 31) / 32, full = n / 32;
  const int64_t chunks = (groups + kGroupsPerChunk - 1) / kGroupsPerChunk;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t g1 = std::min(groups, (c + 1) * kGroupsPerChunk);
    for (int64_t g = c * kGroupsPerChunk; g < g1; ++g) {
      uint32_t w[BITS] = {};
      if constexpr (kWidePath<V, DT>) {
        if (g < full) {
          using W = typename V::W16;
          const float* xg = reinterpret_cast<const float*>(x) + g * 32;
          const typename W::reg x0 = W::load(xg), x1 = W::load(xg + 16);
          // (y is null for the pack alone: no offset is taken from it then)
          float* yg = KIND != 0 ? reinterpret_cast<float*>(y) + g * 32 : nullptr;
          if constexpr (kWide<KIND>) {
            const typename W::reg xv[2] = {x0, x1};
            typename W::reg yv[2];
            wfused_n<V, KIND, 2>(xv, yv, da, db, dinv);
            W::store(yg, yv[0]);
            W::store(yg + 16, yv[1]);
          } else if constexpr (KIND != 0) {
            const typename W::reg wa = W::bcast(pa), wbb = W::bcast(pb);
            W::store(yg, fused<W, KIND>(x0, wa, wbb));
            W::store(yg + 16, fused<W, KIND>(x1, wa, wbb));
          }
          if (codes) {
            uint32_t m0[BITS], m1[BITS];
            V::template wplanes<BITS>(x0, wb, m0);
            V::template wplanes<BITS>(x1, wb, m1);
            for (int j = 0; j < BITS; ++j) codes[g * BITS + j] = m0[j] | (m1[j] << 16);
          }
          continue;
        }
      }
      if (g < full) {
        if constexpr (kWide<KIND>) {
          // the group's 4 vectors side by side (see simd.h)
          typename V::reg xr[4], yr[4];
          for (int q = 0; q < 4; ++q) xr[q] = IO::load(x + g * 32 + q * 8);
          fused_n<V, KIND, 4>(xr, yr, da, db, dinv);
          for (int q = 0; q < 4; ++q) IO::store(y + g * 32 + q * 8, yr[q]);
          for (int q = 0; q < 4 && codes; ++q) {
            uint32_t m[BITS];
            V::template planes<BITS>(xr[q], b, m);
            for (int j = 0; j < BITS; ++j) w[j] |= m[j] << (8 * q);
          }
        } else {
          for (int q = 0; q < 4; ++q) {
            const typename V::reg xr = IO::load(x + g * 32 + q * 8);
            if constexpr (KIND != 0) IO::store(y + g * 32 + q * 8, fused<V, KIND>(xr, va, vb));
            if (!codes) continue;
            uint32_t m[BITS];
            V::template planes<BITS>(xr, b, m);
            for (int j = 0; j < BITS; ++j) w[j] |= m[j] << (8 * q);
          }
        }
      } else {
        // the tail: -inf is above no border, so the unused bits stay zero
        alignas(32) float buf[32];
        const int64_t rem = n - g * 32;
        for (int64_t i = 0; i < 32; ++i)
          buf[i] = i < rem ? IO::to_float(x[g * 32 + i]) : -std::numeric_limits<float>::infinity();
        if constexpr (KIND != 0)
          for (int64_t i = 0; i < rem; ++i) y[g * 32 + i] = IO::from_float(fused1<V, KIND>(buf[i], pa, pb, da, db, dinv));
        for (int q = 0; q < 4 && codes; ++q) {
          uint32_t m[BITS];
          V::template planes<BITS>(V::load(buf + q * 8), b, m);
          for (int j = 0; j < BITS; ++j) w[j] |= m[j] << (8 * q);
        }
      }
      if (codes)
        for (int j = 0; j < BITS; ++j) codes[g * BITS + j] = w[j];
    }
  }
}

template <class V, FewbitDtype DT, int BITS>
void unpack(const void* gv, const uint32_t* codes, int64_t n, const float* levels, void* ov, int nthreads) {
  using IO = Io<V, DT>;
  using T = typename IO::T;
  const T* grad = static_cast<const T*>(gv);
  T* out = static_cast<T*>(ov);
  alignas(64) float table[16] = {};
  for (int k = 0; k < (1 << BITS); ++k) table[k] = levels[k];
  typename V::reg lv[2] = {V::load(table), V::load(table + 8)};
  const int64_t groups = (n + 31) / 32, full = n / 32;
  const int64_t chunks = (groups + kGroupsPerChunk - 1) / kGroupsPerChunk;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t g1 = std::min(groups, (c + 1) * kGroupsPerChunk);
    for (int64_t g = c * kGroupsPerChunk; g < g1; ++g) {
      const uint32_t* w = codes + g * BITS;
      if constexpr (kWidePath<V, DT>) {
        if (g < full) {
          using W = typename V::W16;
          const typename W::reg wt = W::load(table);
          const float* gg = reinterpret_cast<const float*>(grad) + g * 32;
          float* og = reinterpret_cast<float*>(out) + g * 32;
          for (int h = 0; h < 2; ++h)
            W::store(og + 16 * h, W::mul(W::load(gg + 16 * h), V::template wlevel<BITS>(w, 16 * h, wt)));
          continue;
        }
      }
      if (g < full) {
        for (int q = 0; q < 4; ++q) {
          const typename V::reg level = V::template lookup<BITS>(lv, V::template decode<BITS>(w, 8 * q));
          IO::store(out + g * 32 + q * 8, V::mul(IO::load(grad + g * 32 + q * 8), level));
        }
      } else {
        const int64_t rem = n - g * 32;
        for (int64_t i = 0; i < rem; ++i) {
          int code = 0;
          for (int j = 0; j < BITS; ++j) code |= static_cast<int>((w[j] >> i) & 1u) << j;
          out[g * 32 + i] = IO::from_float(IO::to_float(grad[g * 32 + i]) * table[code]);
        }
      }
    }
  }
}

// bits and dtype are template parameters, so the inner loops are fully unrolled; this turns the
// run-time pair into one of the 12 instantiations
template <class F>
void with_bits_dtype(int bits, FewbitDtype dt, F&& f) {
  auto by_dt = [&](auto b) {
    switch (dt) {
      case FewbitDtype::f32: return f(b, std::integral_constant<FewbitDtype, FewbitDtype::f32>{});
      case FewbitDtype::bf16: return f(b, std::integral_constant<FewbitDtype, FewbitDtype::bf16>{});
      case FewbitDtype::f16: return f(b, std::integral_constant<FewbitDtype, FewbitDtype::f16>{});
    }
  };
  switch (bits) {
    case 1: return by_dt(std::integral_constant<int, 1>{});
    case 2: return by_dt(std::integral_constant<int, 2>{});
    case 3: return by_dt(std::integral_constant<int, 3>{});
    default: return by_dt(std::integral_constant<int, 4>{});
  }
}

// the fused pack of a run-time kind: a table of the instantiations for kinds 1 .. kKinds (the binding
// turns only those into a FewbitFused)
constexpr int kKinds = static_cast<int>(FewbitFused::silu);
using PackFn = void (*)(const void*, int64_t, const float*, uint32_t*, int, double, double, void*);

template <class V, FewbitDtype DT, int BITS, int... K>
void pack_fused_table(std::integer_sequence<int, K...>, FewbitFused kind, const void* x, int64_t n,
                      const float* borders, uint32_t* codes, int nthreads, double a, double b, void* y) {
  static constexpr PackFn table[] = {&pack<V, DT, BITS, K + 1>...};
  table[static_cast<int>(kind) - 1](x, n, borders, codes, nthreads, a, b, y);
}

template <class V, FewbitDtype DT, int BITS>
void pack_fused(FewbitFused kind, const void* x, int64_t n, const float* borders, uint32_t* codes, int nthreads,
                double a, double b, void* y) {
  pack_fused_table<V, DT, BITS>(std::make_integer_sequence<int, kKinds>{}, kind, x, n, borders, codes, nthreads, a,
                                b, y);
}

}  // namespace
}  // namespace detail

#define SPARSEOPS_FEWBIT_INSTANTIATE(V, SUFFIX)                                                                   \
  void fewbit_pack_##SUFFIX(const void* x, FewbitDtype dt, int64_t n, const float* borders, int bits,            \
                            uint32_t* codes, int nthreads) {                                                     \
    note_isa_call(ISA_OF_##SUFFIX);                                                                              \
    detail::with_bits_dtype(bits, dt, [&](auto b, auto d) {                                                      \
      detail::pack<V, decltype(d)::value, decltype(b)::value>(x, n, borders, codes, nthreads);                   \
    });                                                                                                          \
  }                                                                                                              \
  void fewbit_pack_fused_##SUFFIX(const void* x, FewbitDtype dt, int64_t n, const float* borders, int bits,      \
                                  uint32_t* codes, FewbitFused kind, double a, double b, void* y, int nthreads) {\
    note_isa_call(ISA_OF_##SUFFIX);                                                                              \
    detail::with_bits_dtype(bits, dt, [&](auto bt, auto d) {                                                     \
      constexpr FewbitDtype DT = decltype(d)::value;                                                             \
      constexpr int BITS = decltype(bt)::value;                                                                  \
      detail::pack_fused<V, DT, BITS>(kind, x, n, borders, codes, nthreads, a, b, y);                              \
    });                                                                                                          \
  }                                                                                                              \
  void fewbit_unpack_##SUFFIX(const void* grad, FewbitDtype dt, const uint32_t* codes, int64_t n,                \
                              const float* levels, int bits, void* out, int nthreads) {                          \
    note_isa_call(ISA_OF_##SUFFIX);                                                                              \
    detail::with_bits_dtype(bits, dt, [&](auto b, auto d) {                                                      \
      detail::unpack<V, decltype(d)::value, decltype(b)::value>(grad, codes, n, levels, out, nthreads);          \
    });                                                                                                          \
  }

}  // namespace sparseops
