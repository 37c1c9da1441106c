// the union of a few rows' active inputs, shared by the activation-sparse gemv kernels (act_impl.h,
// act_csr.cpp). in an unnamed namespace, like act_impl.h: the avx2 and portable translation units each
// keep their own copy, so no function compiled with -mavx2 can be merged into the portable path.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "act.h"

namespace sparseops {
namespace {

// input x (threshold thr) is active when |v| > thr, v = relu ? max(x, 0) : x, and, under relu, x > 0:
// exactly where s has derivative 1. a negative threshold makes every input active (every one under
// relu that is positive), zeros included: their gradient is not zero
inline bool act_active(float x, float thr, bool relu) { return relu ? (x > 0.f && x > thr) : std::fabs(x) > thr; }

inline float act_thr(const ActSel& s, int64_t j) { return s.per_channel ? s.thr[j] : s.thr[0]; }

// one serial pass over x [T, K] (row stride ldx): idx gets the inputs at least one row activates, in
// order, and xs their s(x) values, [idx.size()][T] (0 for a row that does not activate the input)
inline void act_union(const float* x, int64_t T, int64_t K, int64_t ldx, const ActSel& sel, std::vector<int32_t>& idx,
                      std::vector<float>& xs) {
  idx.reserve(static_cast<size_t>(K));
  std::vector<float> col(static_cast<size_t>(std::max<int64_t>(1, T)));
  for (int64_t j = 0; j < K; ++j) {
    const float thr = act_thr(sel, j);
    bool any = false;
    for (int64_t t = 0; t < T; ++t) {
      const float v = x[t * ldx + j];
      const bool on = act_active(v, thr, sel.relu);
      col[t] = on ? v : 0.f;
      any |= on;
    }
    if (any) {
      idx.push_back(static_cast<int32_t>(j));
      xs.insert(xs.end(), col.begin(), col.begin() + T);
    }
  }
}

}  // namespace
}  // namespace sparseops
