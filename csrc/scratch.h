// per-thread scratch for OpenMP regions, allocated before the region.
// an exception may not leave a parallel region (std::terminate), so a std::bad_alloc from a buffer a
// thread allocated inside one killed the process; allocated before it, the failure reaches the binding,
// which pybind11 turns into MemoryError. torch-free.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>

namespace sparseops {
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
        buf_(new T[n_ * stride_ + 64 / sizeof(T)]) {}
  // thread tid's slice (tid < nthreads: a num_threads(nthreads) team is never larger)
  T* get(int tid) const {
    const uintptr_t a = reinterpret_cast<uintptr_t>(buf_.get());
    T* base = reinterpret_cast<T*>((a + 63) & ~static_cast<uintptr_t>(63));
    return base + static_cast<size_t>(tid) * stride_;
  }
  // the slice's first n (<= per) elements zeroed
  T* zeroed(int tid, size_t n) const {
    T* p = get(tid);
    std::memset(p, 0, std::min(n, per_) * sizeof(T));
    return p;
  }

 private:
  size_t n_, stride_, per_;
  std::unique_ptr<T[]> buf_;
};

// for loop bodies inside a region that allocate as they go (push_back): run(f) calls f and keeps the
// first exception it throws instead of letting it leave the region; after the region, rethrow() throws
// it. a body that failed has done part of its work, so the caller must not use the results then: it
// rethrows before reading them. only for bodies with no barrier or worksharing construct inside
class RegionErrors {
 public:
  template <class F>
  void run(F&& f) noexcept {
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(m_);
      if (!e_) e_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (e_) std::rethrow_exception(e_);
  }

 private:
  std::mutex m_;
  std::exception_ptr e_;
};

}  // namespace
}  // namespace sparseops
