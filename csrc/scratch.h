// per-thread scratch for OpenMP regions, allocated before the region.
// an exception may not leave a parallel region (std::terminate), so a std::bad_alloc from a buffer a
// thread allocated inside one killed the process; allocated before it, the failure reaches the binding,
// which pybind11 turns into MemoryError. torch-free.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <atomic>
#include <cassert>
#include <exception>
#include <memory>
#include <new>

namespace sparseops {

// the tests' allocation-failure switch (dispatch.cpp; sparseops._C._fail_scratch): while it is on, every
// ThreadScratch, scratch_array and RegionError::run throws std::bad_alloc as a failed allocation would, so
// that the tests see the failure reach Python as MemoryError, and nothing changed
bool scratch_fails() noexcept;
void set_scratch_fails(bool on) noexcept;

namespace {

// nthreads slices of `per` elements each, every slice 64-byte aligned; uninitialized (new T[], not
// value-initialized: the pages a thread never touches are never faulted in); zeroed(tid, n) clears what a
// kernel's zero-filled std::vector used to
template <class T>
class ThreadScratch {
 public:
  ThreadScratch(int nthreads, size_t per)
      : n_(static_cast<size_t>(std::max(1, nthreads))),
        stride_((std::max<size_t>(per, 1) * sizeof(T) + 63) / 64 * 64 / sizeof(T)),
        per_(per),
        buf_(new T[n_ * stride_ + 64 / sizeof(T)]) {
    if (scratch_fails()) throw std::bad_alloc();
  }
  // thread tid's slice (tid < nthreads: a num_threads(nthreads) team is never larger)
  T* get(int tid) const {
    const uintptr_t a = reinterpret_cast<uintptr_t>(buf_.get());
    T* base = reinterpret_cast<T*>((a + 63) & ~static_cast<uintptr_t>(63));
    return base + static_cast<size_t>(tid) * stride_;
  }
  // the slice's first n elements zeroed (n <= per: a larger n is a caller's bug; asserted in debug builds)
  T* zeroed(int tid, size_t n) const {
    assert(n <= per_);
    T* p = get(tid);
    std::memset(p, 0, n * sizeof(T));
    return p;
  }

 private:
  size_t n_, stride_, per_;
  std::unique_ptr<T[]> buf_;
};

// n uninitialized elements for a buffer a region's threads share (allocated before the region)
template <class T>
std::unique_ptr<T[]> scratch_array(size_t n) {
  if (scratch_fails()) throw std::bad_alloc();
  return std::unique_ptr<T[]>(new T[std::max<size_t>(n, 1)]);
}

// an exception must not leave an omp parallel region (that is std::terminate). a thread runs what may
// throw through run(): the first exception is kept and failed() turns true; the region's threads then skip
// their work but still meet the same barriers, and the caller rethrows it (std::bad_alloc -> MemoryError)
// once the region has ended. the csr and n:m walks allocate their blocked index and accumulators this
// way, before their first barrier; the dst selection runs each loop body through it (its buffers grow as
// it goes) and reads no result before rethrow()
class RegionError {
 public:
  template <class F>
  void run(F&& f) noexcept {
    try {
      if (scratch_fails()) throw std::bad_alloc();
      f();
    } catch (...) {
#pragma omp critical(sparseops_region_error)
      {
        if (!err_) err_ = std::current_exception();
      }
      failed_.store(true);
    }
  }
  bool failed() const { return failed_.load(); }
  void rethrow() const {
    if (err_) std::rethrow_exception(err_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::exception_ptr err_;
};

}  // namespace
}  // namespace sparseops
