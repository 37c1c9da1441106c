// the elements a packed 1-bit mask marks: gather them into a dense list, and scatter a list back.
// torch-free, dtype-agnostic (elements are moved as 2- or 4-byte words, never converted).
//
// the mask is ops.fewbit's 1-bit layout: word g holds the bits of elements 32g .. 32g+31, bit i for
// element 32g+i. bits at or past n are ignored (a hand-made mask may set them).
#pragma once

#include <cstdint>

namespace sparseops {

// the set bits among the first n
int64_t mask_count(const int32_t* mask, int64_t n, int nthreads);

// out[0 .. mask_count) = the marked elements of x [n], in order. esize: 2 or 4 bytes
void mask_select(const void* x, int esize, int64_t n, const int32_t* mask, void* out, int nthreads);

// out [n] = the next value of vals for each marked element, zero (all bits clear) elsewhere
void mask_expand(const int32_t* mask, const void* vals, int esize, int64_t n, void* out, int nthreads);

// out [n] = x where the mask sets a bit, zero (all bits clear) elsewhere; out may be x
void mask_where(const int32_t* mask, const void* x, int esize, int64_t n, void* out, int nthreads);

}  // namespace sparseops
