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

// out[0 .. cap) = the marked elements of x [n], in order. esize: 2 or 4 bytes. false, with nothing
// written, when the mask marks other than cap elements; never more than cap written, even when the mask
// changes during the call (a race another thread made: the values are then not meaningful)
bool mask_select(const void* x, int esize, int64_t n, const int32_t* mask, void* out, int64_t cap, int nthreads);

// out [n] = the next value of vals [nvals] for each marked element, zero (all bits clear) elsewhere.
// false, with nothing written, when the mask marks other than nvals elements; never a read past nvals
bool mask_expand(const int32_t* mask, const void* vals, int64_t nvals, int esize, int64_t n, void* out,
                 int nthreads);

// out [n] = x where the mask sets a bit, zero (all bits clear) elsewhere; out may be x
void mask_where(const int32_t* mask, const void* x, int esize, int64_t n, void* out, int nthreads);

}  // namespace sparseops
