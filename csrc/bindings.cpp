// sparseops._C: the gatekeeper between python and the torch-free kernels.
//
// every entry point takes numpy arrays (zero-copy views of cpu tensors), checks dtype,
// shape, strides, writability and every index the kernel will follow, and only then
// releases the gil and runs the kernel. arrays are taken as py::array and checked by
// hand: pybind11's forcecast would hand an output to the kernel as a converted copy
// and silently drop the writes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "scratch.h"
#include "csr.h"
#include "fewbit.h"
#include "nm.h"
#include "bsr.h"
#include "act.h"
#include "act_csr.h"
#include "mask.h"
#include "dst.h"

namespace py = pybind11;
using sparseops::Isa;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

template <class T>
void check_dtype(const py::array& a, const char* name, const char* want) {
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + ": expected dtype " + want + ", got " +
                         std::string(py::str(a.dtype())));
}

// the kernels read and write through float* / int32_t*: an array whose data is not aligned to its
// element size (np.frombuffer at an odd offset, a packed record field) would be undefined behaviour
// there (and the compiler's vectorised loops may assume the alignment), so it is refused.
void check_aligned(const py::array& a, const char* name) {
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error(std::string(name) + ": data must be aligned to its dtype (got a misaligned array)");
}

// a float32 matrix [rows, cols] read through element strides
struct Mat {
  const float* p;
  int64_t rows, cols, s0, s1;
};

Mat float_matrix(const py::array& a, const char* name) {
  check_dtype<float>(a, name, "float32");
  if (a.ndim() != 2) throw py::value_error(std::string(name) + ": expected a 2-D array, got shape " + shape_str(a));
  for (int d = 0; d < 2; ++d)
    if (a.strides(d) % static_cast<py::ssize_t>(sizeof(float)) != 0 || a.strides(d) < 0)
      throw py::value_error(std::string(name) + ": strides must be non-negative multiples of 4 bytes");
  check_aligned(a, name);
  return {static_cast<const float*>(a.data()), a.shape(0), a.shape(1),
          static_cast<int64_t>(a.strides(0) / 4), static_cast<int64_t>(a.strides(1) / 4)};
}

float* float_output(py::array& a, const char* name, int64_t n0, int64_t n1, int ndim) {
  check_dtype<float>(a, name, "float32");
  if (a.ndim() != ndim || a.shape(0) != n0 || (ndim == 2 && a.shape(1) != n1))
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(n0) +
                          (ndim == 2 ? ", " + std::to_string(n1) + ")" : ",)") + ", got " + shape_str(a));
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
  if (!a.writeable()) throw py::value_error(std::string(name) + ": must be writeable");
  check_aligned(a, name);
  return static_cast<float*>(a.mutable_data());
}

// advises a large output onto transparent huge pages before a kernel first writes it (only where the system
// leaves THP to madvise or always; the 2 MB-aligned interior of the array, and nothing else, is advised). a
// fresh output, as torch.empty gives, is faulted in and zeroed by the kernel page by page on first write:
// 65536 faults for a 256 MB weight gradient on 4 KB pages, 128 on 2 MB ones (NOTE: act_sdd's dweight_t
// [16384, 4096], 2 threads, Xeon: 102-193 ms with a fresh output, 48 ms advised, 24 ms reusing one)
void advise_huge_pages(py::array& a) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto p = reinterpret_cast<uintptr_t>(a.mutable_data());
  const uintptr_t b = (p + kHuge - 1) & ~(kHuge - 1), e = (p + static_cast<uintptr_t>(a.nbytes())) & ~(kHuge - 1);
  if (e >= b + 4 * kHuge) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);  // advice: a failure is harmless
#else
  (void)a;
#endif
}

template <class T>
const T* vector(const py::array& a, const char* name, const char* dtype, int64_t n) {
  check_dtype<T>(a, name, dtype);
  if (a.ndim() != 1) throw py::value_error(std::string(name) + ": expected a 1-D array, got shape " + shape_str(a));
  if (n >= 0 && a.shape(0) != n)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(n) + " entries, got " +
                          std::to_string(a.shape(0)));
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be contiguous");
  check_aligned(a, name);
  return static_cast<const T*>(a.data());
}

// an optional float32 bias [n]: its data, or nullptr for None. bias.cast<py::array>() may make a new
// array (from a list, or an object with __array__), which keep holds so that the pointer outlives the
// kernel: the caller declares keep before it releases the gil
const float* optional_bias(const py::object& bias, int64_t n, py::object& keep) {
  if (bias.is_none()) return nullptr;
  py::array arr = bias.cast<py::array>();
  const float* p = vector<float>(arr, "bias", "float32", n);
  keep = std::move(arr);
  return p;
}

// ptr [n+1] must run from 0 to nnz without decreasing; idx [nnz] must lie in [0, limit) and increase
// strictly inside each segment: this is all the kernels index through. check_csr runs the kernels' own
// check (csr_rows_valid: 8 indices a step on avx2, split over the threads) and, only when it fails, a slow
// pass that names the first bad entry.
// NOTE: a branching loop was 26% of a batch-1 csr_dds call at 4096x4096 90% (perf), more than the
// kernel. its branch-free successor, one thread, took 1.6-2.0 ms cold over the 4.5M indices of a
// 4096->11008 layer at 90% (standalone); the 8-wide check split over 2 threads 1.2-1.6 ms: the pass is
// bound by memory, so csr_dds now checks inside its kernel instead (csr_spmm_checked). for the input
// gradient of a 2:4 layer (8.4M indices in Wᵀ) and the unstructured backward at 4096² B=256 the threaded
// check measured 1.03x over the single-threaded one (in-process A/B, 6 pairs: within the noise).
bool indices_valid(const int32_t* idx, int64_t n, int64_t limit) {
  if (limit > INT32_MAX) limit = INT32_MAX;
  const uint32_t lim = static_cast<uint32_t>(limit);
  uint32_t bad = 0;
  for (int64_t k = 0; k < n; ++k) bad |= static_cast<uint32_t>(static_cast<uint32_t>(idx[k]) >= lim);
  return bad == 0;
}

// every entry in [-1, limit): branch-free, so the common (valid) case is one vectorised pass
bool indices_or_none_valid(const int32_t* idx, int64_t n, int64_t limit) {
  if (limit > INT32_MAX) limit = INT32_MAX;
  const uint32_t lim = static_cast<uint32_t>(limit);
  uint32_t bad = 0;
  for (int64_t k = 0; k < n; ++k) bad |= static_cast<uint32_t>(static_cast<uint32_t>(idx[k]) + 1u > lim);
  return bad == 0;
}

// ptr [n+1] from 0 to nnz, non-decreasing: then every row [ptr[r], ptr[r+1]) lies inside idx
bool ptr_valid(const int32_t* ptr, int64_t n, int64_t nnz) {
  bool ok = ptr[0] == 0 && ptr[n] == nnz;
  for (int64_t r = 0; r < n && ok; ++r) ok = ptr[r + 1] >= ptr[r];
  return ok;
}

void check_ptr(const int32_t* ptr, int64_t n, int64_t nnz, const char* pname) {
  if (ptr_valid(ptr, n, nnz)) return;
  if (ptr[0] != 0 || ptr[n] != nnz)
    throw py::value_error(std::string(pname) + ": must start at 0 and end at nnz=" + std::to_string(nnz) +
                          ", got " + std::to_string(ptr[0]) + ".." + std::to_string(ptr[n]));
  for (int64_t r = 0; r < n; ++r)
    if (ptr[r + 1] < ptr[r])
      throw py::value_error(std::string(pname) + ": must be non-decreasing (at " + std::to_string(r) + ")");
}

// large indices are checked without the gil, split over nthreads threads (csr_rows_valid, indices_below)
constexpr int64_t kCheckNoGil = 1 << 16;

void check_csr(const int32_t* ptr, int64_t n, const int32_t* idx, int64_t nnz, int64_t limit, const char* pname,
               const char* iname, int nthreads = 1) {
  if (ptr_valid(ptr, n, nnz)) {
    bool ok;
    if (nnz >= kCheckNoGil) {
      py::gil_scoped_release release;
      ok = sparseops::csr_rows_valid(ptr, n, idx, limit, nthreads);
    } else {
      ok = sparseops::csr_rows_valid(ptr, n, idx, limit, 1);
    }
    if (ok) return;
  }
  // the slow path only runs to name the first offending entry: the whole pointer array first (with
  // 0 = ptr[0] <= ... <= ptr[n] = nnz, every segment lies inside idx)
  check_ptr(ptr, n, nnz, pname);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t s = ptr[r], e = ptr[r + 1];
    int64_t prev = -1;
    for (int64_t k = s; k < e; ++k) {
      const int64_t c = idx[k];
      if (c < 0 || c >= limit)
        throw py::value_error(std::string(iname) + ": index " + std::to_string(c) + " at position " +
                              std::to_string(k) + " is outside [0, " + std::to_string(limit) + ")");
      if (c <= prev)
        throw py::value_error(std::string(iname) + ": indices must be sorted and unique within each row (position " +
                              std::to_string(k) + ")");
      prev = c;
    }
  }
}

// t_perm [nnz] maps each transposed position to its value: every entry must lie in [0, limit)
// (limit = nnz for a CSR weight, the size of values for an N:M one)
void check_perm(const int32_t* perm, int64_t nnz, int64_t limit, int nthreads = 1) {
  if (nnz >= kCheckNoGil) {
    bool ok;
    {
      py::gil_scoped_release release;
      ok = sparseops::indices_below(perm, nnz, limit, nthreads);
    }
    if (ok) return;
  } else if (indices_valid(perm, nnz, limit)) {
    return;
  }
  for (int64_t k = 0; k < nnz; ++k)
    if (perm[k] < 0 || perm[k] >= limit)
      throw py::value_error("t_perm: index " + std::to_string(perm[k]) + " at position " + std::to_string(k) +
                            " is outside [0, " + std::to_string(limit) + ")");
}

int threads(int n) { return n < 1 ? 1 : n; }

// a byte range of an array, to refuse outputs that overlap another argument
struct Span {
  const char* p;
  size_t n;
  const char* name;
};

// the bytes an array's elements can occupy: from its lowest to its highest element, through its strides
// (a strided view's elements are not [data, data + nbytes): a gapped view reaches past that, a view with a
// negative stride starts below data)
Span span(const py::array& a, const char* name) {
  const char* p = static_cast<const char*>(a.data());
  if (a.size() == 0) return {p, 0, name};
  ptrdiff_t lo = 0, hi = 0;
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    const ptrdiff_t ext = static_cast<ptrdiff_t>(a.shape(d) - 1) * static_cast<ptrdiff_t>(a.strides(d));
    (ext < 0 ? lo : hi) += ext;
  }
  return {p + lo, static_cast<size_t>(hi - lo) + static_cast<size_t>(a.itemsize()), name};
}

// outputs must not share memory with any other argument: a kernel writing one would change what it
// reads from another (an index it then follows)
void check_disjoint(const std::vector<Span>& outs, const std::vector<Span>& all) {
  for (const Span& o : outs)
    for (const Span& a : all) {
      if (o.p == a.p && o.n == a.n && o.name == a.name) continue;  // itself
      if (o.n && a.n && o.p < a.p + a.n && a.p < o.p + o.n)
        throw py::value_error(std::string(o.name) + ": shares memory with " + a.name);
    }
}

// check_disjoint for one output against every array the kernel reads (and the bias array, when bias_keep
// holds one): a kernel that wrote into an index after the binding checked it would then follow what it wrote
void check_out(const py::array& out, const char* name, std::vector<Span> reads, const py::object& bias_keep = py::object()) {
  reads.insert(reads.begin(), span(out, name));
  if (bias_keep && !bias_keep.is_none()) reads.push_back(span(bias_keep.cast<py::array>(), "bias"));
  check_disjoint({reads[0]}, reads);
}

void csr_dds(const py::array& x, const py::array& values, const py::array& crow, const py::array& col,
             const py::object& bias, py::array& y, int nthreads) {
  const Mat X = float_matrix(x, "x");
  const int64_t out = y.ndim() == 2 ? y.shape(1) : -1;
  const int32_t* ptr = vector<int32_t>(crow, "crow", "int32", -1);
  if (crow.shape(0) < 1) throw py::value_error("crow: expected out_features + 1 >= 1 entries, got 0");
  const int64_t n = crow.shape(0) - 1;
  float* Y = float_output(y, "y", X.rows, n, 2);
  (void)out;
  const int32_t* idx = vector<int32_t>(col, "col", "int32", -1);
  const int64_t nnz = col.shape(0);
  const float* vals = vector<float>(values, "values", "float32", nnz);
  // the array must outlive the kernel: bias.cast<py::array>() converts a non-array (a list of
  // float32 scalars, an object with __array__) into a new array that a temporary would free at
  // the end of the statement, leaving b dangling. declared before the gil release, it is
  // destroyed after the gil is taken back.
  py::object bias_keep;
  const float* b = optional_bias(bias, n, bias_keep);
  check_out(y, "y", {span(x, "x"), span(values, "values"), span(crow, "crow"), span(col, "col")}, bias_keep);
  // the row pointers here (O(rows)); the columns inside the kernel, each row before it is read through
  // (csr_spmm_checked), and only on a failure the full check, which names the first bad entry
  check_ptr(ptr, n, nnz, "crow");
  bool ok;
  {
    py::gil_scoped_release release;
    ok = sparseops::csr_spmm_checked(X.p, X.rows, X.cols, X.s0, X.s1, vals, ptr, idx, n, b, Y, threads(nthreads));
  }
  if (!ok) {
    check_csr(ptr, n, idx, nnz, X.cols, "crow", "col");
    throw py::value_error("col: an index is outside [0, in_features) or out of order within its row");
  }
}

void csr_dsd(const py::array& dy, const py::array& values, const py::array& t_crow, const py::array& t_row,
             const py::array& t_perm, py::array& dx, int nthreads) {
  const Mat D = float_matrix(dy, "dy");
  const int32_t* ptr = vector<int32_t>(t_crow, "t_crow", "int32", -1);
  if (t_crow.shape(0) < 1) throw py::value_error("t_crow: expected in_features + 1 >= 1 entries, got 0");
  const int64_t n = t_crow.shape(0) - 1;
  float* DX = float_output(dx, "dx", D.rows, n, 2);
  const int32_t* idx = vector<int32_t>(t_row, "t_row", "int32", -1);
  const int64_t nnz = t_row.shape(0);
  const float* vals = vector<float>(values, "values", "float32", nnz);
  const int32_t* perm = vector<int32_t>(t_perm, "t_perm", "int32", nnz);
  check_out(dx, "dx", {span(dy, "dy"), span(values, "values"), span(t_crow, "t_crow"), span(t_row, "t_row"),
                       span(t_perm, "t_perm")});
  check_csr(ptr, n, idx, nnz, D.cols, "t_crow", "t_row", threads(nthreads));
  check_perm(perm, nnz, nnz, threads(nthreads));
  py::gil_scoped_release release;
  sparseops::csr_spmm(D.p, D.rows, D.cols, D.s0, D.s1, vals, perm, ptr, idx, n, nullptr, DX, threads(nthreads));
}

// the operands shared by csr_sdd and csr_backward: dy [B, out], x [B, in] and the row-major index
struct SddArgs {
  Mat D, X;
  const int32_t* ptr;
  const int32_t* idx;
  int64_t nnz;
};

SddArgs sdd_args(const py::array& dy, const py::array& x, const py::array& crow, const py::array& col) {
  const Mat D = float_matrix(dy, "dy");
  const Mat X = float_matrix(x, "x");
  if (D.rows != X.rows)
    throw py::value_error("dy: expected " + std::to_string(X.rows) + " rows to match x, got " +
                          std::to_string(D.rows));
  const int32_t* ptr = vector<int32_t>(crow, "crow", "int32", D.cols + 1);
  const int32_t* idx = vector<int32_t>(col, "col", "int32", -1);
  return {D, X, ptr, idx, static_cast<int64_t>(col.shape(0))};
}

void csr_sdd(const py::array& dy, const py::array& x, const py::array& crow, const py::array& col, py::array& dvals,
             int nthreads) {
  const SddArgs a = sdd_args(dy, x, crow, col);
  float* DV = float_output(dvals, "dvalues", a.nnz, 0, 1);
  check_out(dvals, "dvalues", {span(dy, "dy"), span(x, "x"), span(crow, "crow"), span(col, "col")});
  check_csr(a.ptr, a.D.cols, a.idx, a.nnz, a.X.cols, "crow", "col", threads(nthreads));
  py::gil_scoped_release release;
  sparseops::csr_sdd(a.D.p, a.D.rows, a.D.cols, a.D.s0, a.D.s1, a.X.p, a.X.cols, a.X.s0, a.X.s1, a.ptr, a.idx, DV,
                     threads(nthreads));
}

// csr_dsd and csr_sdd in one call, with the checks of both; x [B, in] fixes in_features
void csr_backward(const py::array& dy, const py::array& x, const py::array& values, const py::array& crow,
                  const py::array& col, const py::array& t_crow, const py::array& t_row, const py::array& t_perm,
                  py::array& dx, py::array& dvalues, int nthreads) {
  const SddArgs a = sdd_args(dy, x, crow, col);
  const Mat &D = a.D, &X = a.X;
  const int32_t *ptr = a.ptr, *idx = a.idx;
  const int64_t nnz = a.nnz;
  const float* vals = vector<float>(values, "values", "float32", nnz);
  const int32_t* tptr = vector<int32_t>(t_crow, "t_crow", "int32", X.cols + 1);
  const int32_t* tidx = vector<int32_t>(t_row, "t_row", "int32", nnz);
  const int32_t* perm = vector<int32_t>(t_perm, "t_perm", "int32", nnz);
  float* DX = float_output(dx, "dx", D.rows, X.cols, 2);
  float* DV = float_output(dvalues, "dvalues", nnz, 0, 1);
  check_disjoint({span(dx, "dx"), span(dvalues, "dvalues")},
                 {span(dx, "dx"), span(dvalues, "dvalues"), span(dy, "dy"), span(x, "x"), span(values, "values"),
                  span(crow, "crow"), span(col, "col"), span(t_crow, "t_crow"), span(t_row, "t_row"),
                  span(t_perm, "t_perm")});
  check_csr(ptr, D.cols, idx, nnz, X.cols, "crow", "col", threads(nthreads));
  check_csr(tptr, X.cols, tidx, nnz, D.cols, "t_crow", "t_row", threads(nthreads));
  check_perm(perm, nnz, nnz, threads(nthreads));
  py::gil_scoped_release release;
  sparseops::csr_backward(D.p, D.rows, D.cols, D.s0, D.s1, X.p, X.cols, X.s0, X.s1, vals, ptr, idx, tptr, tidx, perm,
                          DX, DV, threads(nthreads));
}

// ---- few-bit codes ----

sparseops::FewbitDtype fewbit_dtype(const std::string& dtype) {
  if (dtype == "float32") return sparseops::FewbitDtype::f32;
  if (dtype == "bfloat16") return sparseops::FewbitDtype::bf16;
  if (dtype == "float16") return sparseops::FewbitDtype::f16;
  throw py::value_error("dtype: expected 'float32', 'bfloat16' or 'float16', got '" + dtype + "'");
}

// an array of any shape holding elements of `dtype` (16-bit floats arrive as an int16/uint16 view)
int64_t element_array(const py::array& a, const char* name, sparseops::FewbitDtype dt) {
  const bool ok = dt == sparseops::FewbitDtype::f32
                      ? a.dtype().is(py::dtype::of<float>())
                      : a.dtype().is(py::dtype::of<int16_t>()) || a.dtype().is(py::dtype::of<uint16_t>());
  if (!ok)
    throw py::type_error(std::string(name) + ": expected " +
                         (dt == sparseops::FewbitDtype::f32 ? "a float32 array" : "an int16/uint16 view of 16-bit floats") +
                         ", got dtype " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
  check_aligned(a, name);
  return static_cast<int64_t>(a.size());
}

int check_bits(int bits) {
  if (bits < 1 || bits > 4) throw py::value_error("bits: expected 1, 2, 3 or 4, got " + std::to_string(bits));
  return bits;
}

uint32_t* codes_array(py::array& codes, int64_t n, int bits, bool output) {
  const int64_t want = (n + 31) / 32 * bits;
  check_dtype<int32_t>(codes, "codes", "int32");
  if (codes.ndim() != 1 || codes.shape(0) != want)
    throw py::value_error("codes: expected shape (" + std::to_string(want) + ",) for " + std::to_string(n) +
                          " elements at " + std::to_string(bits) + " bits, got " + shape_str(codes));
  if (!(codes.flags() & py::array::c_style)) throw py::value_error("codes: must be contiguous");
  check_aligned(codes, "codes");
  if (output && !codes.writeable()) throw py::value_error("codes: must be writeable");
  return static_cast<uint32_t*>(output ? codes.mutable_data() : const_cast<void*>(codes.data()));
}

const float* border_array(const py::array& borders, int bits) {
  const int64_t nb = (int64_t{1} << bits) - 1;
  const float* b = vector<float>(borders, "borders", "float32", nb);
  for (int64_t k = 0; k < nb; ++k) {
    if (std::isnan(b[k])) throw py::value_error("borders: entry " + std::to_string(k) + " is nan");
    if (k && b[k] < b[k - 1]) throw py::value_error("borders: must be sorted (non-decreasing) at " + std::to_string(k));
  }
  return b;
}

void fewbit_pack(const py::array& x, const std::string& dtype, const py::array& borders, int bits, py::array& codes,
                 int nthreads) {
  const sparseops::FewbitDtype dt = fewbit_dtype(dtype);
  check_bits(bits);
  const int64_t n = element_array(x, "x", dt);
  const float* b = border_array(borders, bits);
  uint32_t* c = codes_array(codes, n, bits, true);
  py::gil_scoped_release release;
  sparseops::fewbit_pack(x.data(), dt, n, b, bits, c, threads(nthreads));
}

void fewbit_pack_fused(const py::array& x, const std::string& dtype, const py::array& borders, int bits,
                       const py::object& codes_arg, const std::string& kind, double a, double b, py::array& y,
                       int nthreads) {
  const sparseops::FewbitDtype dt = fewbit_dtype(dtype);
  check_bits(bits);
  sparseops::FewbitFused k;
  if (kind == "clamp") k = sparseops::FewbitFused::clamp;
  else if (kind == "leaky") k = sparseops::FewbitFused::leaky;
  else if (kind == "hardswish") k = sparseops::FewbitFused::hardswish;
  else if (kind == "tanh") k = sparseops::FewbitFused::tanh;
  else if (kind == "hardsigmoid") k = sparseops::FewbitFused::hardsigmoid;
  else if (kind == "sigmoid") k = sparseops::FewbitFused::sigmoid;
  else if (kind == "elu") k = sparseops::FewbitFused::elu;
  else if (kind == "celu") k = sparseops::FewbitFused::celu;
  else if (kind == "softplus") k = sparseops::FewbitFused::softplus;
  else if (kind == "logsigmoid") k = sparseops::FewbitFused::logsigmoid;
  else if (kind == "silu") k = sparseops::FewbitFused::silu;
  else
    throw py::value_error("kind: expected 'clamp', 'leaky', 'hardswish', 'hardsigmoid', 'tanh', 'sigmoid', 'elu', "
                          "'celu', 'softplus', 'logsigmoid' or 'silu', got '" + kind + "'");
  if (std::isnan(a) || std::isnan(b)) throw py::value_error("a, b: expected numbers, got nan");
  // celu divides by alpha and softplus by beta: both finite and at least the smallest normal double, so
  // that 1 / a is finite (torch's other values run there)
  if ((k == sparseops::FewbitFused::celu || k == sparseops::FewbitFused::softplus) &&
      !(a >= std::numeric_limits<double>::min() && std::isfinite(a)))
    throw py::value_error("a: expected a finite number >= 2.2250738585072014e-308 for '" + kind + "', got " +
                          std::to_string(a));
  const int64_t n = element_array(x, "x", dt);
  const float* bd = border_array(borders, bits);
  uint32_t* c = nullptr;
  std::vector<Span> written;
  py::array codes;
  if (!codes_arg.is_none()) {
    if (!py::isinstance<py::array>(codes_arg)) throw py::type_error("codes: expected a numpy array or None");
    codes = py::reinterpret_borrow<py::array>(codes_arg);
    c = codes_array(codes, n, bits, true);
    written.push_back(span(codes, "codes"));
  }
  if (element_array(y, "y", dt) != n || !y.dtype().is(x.dtype()))
    throw py::value_error("y: expected " + std::to_string(n) + " elements of x's dtype, got " +
                          std::to_string(y.size()) + " of " + std::string(py::str(y.dtype())));
  if (!y.writeable()) throw py::value_error("y: must be writeable");
  written.push_back(span(y, "y"));
  // y may be x itself (each element is read before it is written), but no other overlap is safe
  std::vector<Span> all = written;
  all.push_back(span(borders, "borders"));
  if (x.data() != y.data()) all.push_back(span(x, "x"));
  check_disjoint(written, all);
  py::gil_scoped_release release;
  sparseops::fewbit_pack_fused(x.data(), dt, n, bd, bits, c, k, a, b, y.mutable_data(), threads(nthreads));
}

void fewbit_unpack(const py::array& grad, const std::string& dtype, py::array& codes, const py::array& levels, int bits,
                   py::array& out, int nthreads) {
  const sparseops::FewbitDtype dt = fewbit_dtype(dtype);
  check_bits(bits);
  const int64_t n = element_array(grad, "grad", dt);
  const float* l = vector<float>(levels, "levels", "float32", int64_t{1} << bits);
  const uint32_t* c = codes_array(codes, n, bits, false);
  if (element_array(out, "out", dt) != n || !out.dtype().is(grad.dtype()))
    throw py::value_error("out: expected " + std::to_string(n) + " elements of grad's dtype, got " +
                          std::to_string(out.size()) + " of " + std::string(py::str(out.dtype())));
  if (!out.writeable()) throw py::value_error("out: must be writeable");
  // out may be grad itself (each element is read before it is written), but no other overlap is safe
  std::vector<Span> all = {span(out, "out"), span(codes, "codes"), span(levels, "levels")};
  if (out.data() != grad.data() || out.nbytes() != grad.nbytes()) all.push_back(span(grad, "grad"));
  check_disjoint({span(out, "out")}, all);
  py::gil_scoped_release release;
  sparseops::fewbit_unpack(grad.data(), dt, c, n, l, bits, out.mutable_data(), threads(nthreads));
}

// ---- N:M ----

// the sizes of an N:M weight [rows, K] (see nm.h)
struct NmDims {
  int n, m;
  int64_t rows, K, S, Sb;
};

NmDims nm_dims(int n, int m, int64_t rows, int64_t K) {
  if (n < 1 || m > 16 || n >= m)
    throw py::value_error("n, m: expected 1 <= n < m <= 16, got n=" + std::to_string(n) + ", m=" + std::to_string(m));
  const int64_t S = (K + m - 1) / m * n;
  if ((K + m - 1) / m * m > INT32_MAX) throw py::value_error("in_features: too large for int32 column offsets");
  return {n, m, rows, K, S, (S + 1) / 2};
}

// idx [rows, Sb] uint8: every position a slot reads must be < m (the padding nibble of an odd S is ignored)
// the index's dtype, shape and layout only (the checked kernels check its positions themselves)
const uint8_t* nm_index_shape(const py::array& idx, const char* name, const NmDims& d) {
  check_dtype<uint8_t>(idx, name, "uint8");
  if (idx.ndim() != 2 || idx.shape(0) != d.rows || idx.shape(1) != d.Sb)
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(d.rows) + ", " +
                          std::to_string(d.Sb) + ") for " + std::to_string(d.S) + " slots a row, got " + shape_str(idx));
  if (!(idx.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
  return static_cast<const uint8_t*>(idx.data());
}

const uint8_t* nm_index(const py::array& idx, const char* name, const NmDims& d) {
  const uint8_t* p = nm_index_shape(idx, name, d);
  if (d.m == 16) return p;
  const unsigned m = static_cast<unsigned>(d.m);
  bool bad = false;
  for (int64_t r = 0; r < d.rows; ++r) bad |= !sparseops::nm_row_ok(p + r * d.Sb, d.m, d.S);
  if (bad)
    for (int64_t r = 0; r < d.rows; ++r)
      for (int64_t j = 0; j < d.S; ++j) {
        const unsigned pos = (p[r * d.Sb + j / 2] >> (4 * (j & 1))) & 15u;
        if (pos >= m)
          throw py::value_error(std::string(name) + ": row " + std::to_string(r) + " slot " + std::to_string(j) +
                                " holds position " + std::to_string(pos) + ", outside [0, m=" + std::to_string(d.m) + ")");
      }
  return p;
}

const float* nm_values(const py::array& values, const NmDims& d) {
  check_dtype<float>(values, "values", "float32");
  if (values.ndim() != 2 || values.shape(0) != d.rows || values.shape(1) != d.S)
    throw py::value_error("values: expected shape (" + std::to_string(d.rows) + ", " + std::to_string(d.S) + "), got " +
                          shape_str(values));
  if (!(values.flags() & py::array::c_style)) throw py::value_error("values: must be C-contiguous");
  check_aligned(values, "values");
  return static_cast<const float*>(values.data());
}

void nm_dds(const py::array& x, const py::array& values, const py::array& idx, int n, int m, const py::object& bias,
            py::array& y, int nthreads) {
  const Mat X = float_matrix(x, "x");
  if (idx.ndim() < 1) throw py::value_error("idx: expected a 2-D array, got shape " + shape_str(idx));
  const NmDims d = nm_dims(n, m, idx.shape(0), X.cols);
  const uint8_t* ip = nm_index_shape(idx, "idx", d);
  const float* vals = nm_values(values, d);
  float* Y = float_output(y, "y", X.rows, d.rows, 2);
  py::object bias_keep;  // see csr_dds
  const float* b = optional_bias(bias, d.rows, bias_keep);
  check_out(y, "y", {span(x, "x"), span(values, "values"), span(idx, "idx")}, bias_keep);
  // the positions are checked inside the kernel, each row before it is read through (nm_spmm_checked);
  // only on a failure does the full check run, to name the entry
  bool ok;
  {
    py::gil_scoped_release release;
    ok = sparseops::nm_spmm_checked(X.p, X.rows, X.cols, X.s0, X.s1, vals, ip, n, m, d.rows, b, Y, threads(nthreads));
  }
  if (!ok) {
    nm_index(idx, "idx", d);
    throw py::value_error("idx: a position is not below m");
  }
}

// csr_dds for at most CSR_SPMM16_MAX_B rows with a 16-bit weight read as it is (an int16/uint16 view of
// bf16 or fp16 values); x, bias and y are float32
void csr_dds16(const py::array& x, const py::array& values, const std::string& dtype, const py::array& crow,
               const py::array& col, const py::object& bias, py::array& y, int nthreads) {
  if (dtype != "bfloat16" && dtype != "float16")
    throw py::value_error("dtype: expected 'bfloat16' or 'float16', got '" + dtype + "'");
  const Mat X = float_matrix(x, "x");
  if (X.rows > sparseops::CSR_SPMM16_MAX_B)
    throw py::value_error("x: at most " + std::to_string(sparseops::CSR_SPMM16_MAX_B) + " rows, got " +
                          std::to_string(X.rows));
  const int32_t* ptr = vector<int32_t>(crow, "crow", "int32", -1);
  if (crow.shape(0) < 1) throw py::value_error("crow: expected out_features + 1 >= 1 entries, got 0");
  const int64_t n = crow.shape(0) - 1;
  const int32_t* idx = vector<int32_t>(col, "col", "int32", -1);
  const int64_t nnz = col.shape(0);
  if (!values.dtype().is(py::dtype::of<int16_t>()) && !values.dtype().is(py::dtype::of<uint16_t>()))
    throw py::type_error("values: expected an int16/uint16 view of " + dtype + " data, got dtype " +
                         std::string(py::str(values.dtype())));
  if (values.ndim() != 1 || values.shape(0) != nnz)
    throw py::value_error("values: expected shape (" + std::to_string(nnz) + ",), got " + shape_str(values));
  if (!(values.flags() & py::array::c_style)) throw py::value_error("values: must be C-contiguous");
  check_aligned(values, "values");
  float* Y = float_output(y, "y", X.rows, n, 2);
  py::object bias_keep;  // see csr_dds
  const float* b = optional_bias(bias, n, bias_keep);
  check_out(y, "y", {span(x, "x"), span(values, "values"), span(crow, "crow"), span(col, "col")}, bias_keep);
  check_ptr(ptr, n, nnz, "crow");
  const auto* v = static_cast<const uint16_t*>(values.data());
  bool ok;
  {
    py::gil_scoped_release release;
    ok = sparseops::csr_spmm16_checked(X.p, X.rows, X.cols, X.s0, X.s1, v, dtype == "bfloat16", ptr, idx, n, b, Y,
                                       threads(nthreads));
  }
  if (!ok) {
    check_csr(ptr, n, idx, nnz, X.cols, "crow", "col");
    throw py::value_error("col: an index is outside [0, in_features) or out of order within its row");
  }
}

void nm_dds16(const py::array& x, const py::array& values, const std::string& dtype, const py::array& idx, int n,
              int m, const py::object& bias, py::array& y, int nthreads) {
  if (dtype != "bfloat16" && dtype != "float16")
    throw py::value_error("dtype: expected 'bfloat16' or 'float16', got '" + dtype + "'");
  const Mat X = float_matrix(x, "x");
  if (X.rows > sparseops::NM_SPMM16_MAX_B)
    throw py::value_error("x: at most " + std::to_string(sparseops::NM_SPMM16_MAX_B) + " rows, got " +
                          std::to_string(X.rows));
  if (idx.ndim() < 1) throw py::value_error("idx: expected a 2-D array, got shape " + shape_str(idx));
  const NmDims d = nm_dims(n, m, idx.shape(0), X.cols);
  const uint8_t* ip = nm_index_shape(idx, "idx", d);
  if (!values.dtype().is(py::dtype::of<int16_t>()) && !values.dtype().is(py::dtype::of<uint16_t>()))
    throw py::type_error("values: expected an int16/uint16 view of " + dtype + " data, got dtype " +
                         std::string(py::str(values.dtype())));
  if (values.ndim() != 2 || values.shape(0) != d.rows || values.shape(1) != d.S)
    throw py::value_error("values: expected shape (" + std::to_string(d.rows) + ", " + std::to_string(d.S) + "), got " +
                          shape_str(values));
  if (!(values.flags() & py::array::c_style)) throw py::value_error("values: must be C-contiguous");
  check_aligned(values, "values");
  float* Y = float_output(y, "y", X.rows, d.rows, 2);
  py::object bias_keep;  // see csr_dds
  const float* b = optional_bias(bias, d.rows, bias_keep);
  check_out(y, "y", {span(x, "x"), span(values, "values"), span(idx, "idx")}, bias_keep);
  const auto* v = static_cast<const uint16_t*>(values.data());
  bool ok;
  {
    py::gil_scoped_release release;
    ok = sparseops::nm_spmm16_checked(X.p, X.rows, X.cols, X.s0, X.s1, v, dtype == "bfloat16", ip, n, m, d.rows, b, Y,
                                      threads(nthreads));
  }
  if (!ok) {
    nm_index(idx, "idx", d);
    throw py::value_error("idx: a position is not below m");
  }
}

// dx [B, in] = dy [B, out] @ W for a transposable weight: the N:M product over Wᵀ's index (t_idx [in, Sb_t])
// with Wᵀ's values read as values.flat[t_perm] (t_perm [in, S_t], -1 for an empty slot)
void nm_dsd(const py::array& dy, const py::array& values, const py::array& t_idx, const py::array& t_perm, int n,
            int m, py::array& dx, int nthreads) {
  const Mat D = float_matrix(dy, "dy");
  if (t_idx.ndim() < 1) throw py::value_error("t_idx: expected a 2-D array, got shape " + shape_str(t_idx));
  const NmDims d = nm_dims(n, m, t_idx.shape(0), D.cols);
  const uint8_t* ip = nm_index(t_idx, "t_idx", d);
  check_dtype<float>(values, "values", "float32");
  if (!(values.flags() & py::array::c_style)) throw py::value_error("values: must be C-contiguous");
  check_aligned(values, "values");
  const int64_t nvals = static_cast<int64_t>(values.size());
  check_dtype<int32_t>(t_perm, "t_perm", "int32");
  if (t_perm.ndim() != 2 || t_perm.shape(0) != d.rows || t_perm.shape(1) != d.S)
    throw py::value_error("t_perm: expected shape (" + std::to_string(d.rows) + ", " + std::to_string(d.S) + "), got " +
                          shape_str(t_perm));
  if (!(t_perm.flags() & py::array::c_style)) throw py::value_error("t_perm: must be C-contiguous");
  check_aligned(t_perm, "t_perm");
  const int32_t* perm = static_cast<const int32_t*>(t_perm.data());
  const int64_t np = d.rows * d.S;
  // branch-free first (as check_perm); the branching loop runs only to name the bad entry. NOTE: over the
  // 8.4M slots of a transposable 2:4 4096² layer, one thread, standalone: 10-15 ms branching, 7-8 ms not
  if (!indices_or_none_valid(perm, np, nvals))
    for (int64_t k = 0; k < np; ++k)
      if (perm[k] < -1 || perm[k] >= nvals)
        throw py::value_error("t_perm: index " + std::to_string(perm[k]) + " at position " + std::to_string(k) +
                              " is outside [-1, " + std::to_string(nvals) + ")");
  float* DX = float_output(dx, "dx", D.rows, d.rows, 2);
  check_out(dx, "dx", {span(dy, "dy"), span(values, "values"), span(t_idx, "t_idx"), span(t_perm, "t_perm")});
  py::gil_scoped_release release;
  sparseops::nm_spmm(D.p, D.rows, D.cols, D.s0, D.s1, static_cast<const float*>(values.data()), perm, ip, n, m, d.rows,
                     nullptr, DX, threads(nthreads));
}

// dx [B, in] = dy [B, out] @ W for any N:M weight, through the CSR of Wᵀ (t_crow [in+1], t_row [nnz]) whose
// values are values.flat[t_perm] (t_perm [nnz] in [0, values.size))
void nm_dsd_csr(const py::array& dy, const py::array& values, const py::array& t_crow, const py::array& t_row,
                const py::array& t_perm, py::array& dx, int nthreads) {
  const Mat D = float_matrix(dy, "dy");
  const int32_t* ptr = vector<int32_t>(t_crow, "t_crow", "int32", -1);
  if (t_crow.shape(0) < 1) throw py::value_error("t_crow: expected in_features + 1 >= 1 entries, got 0");
  const int64_t n = t_crow.shape(0) - 1;
  float* DX = float_output(dx, "dx", D.rows, n, 2);
  const int32_t* idx = vector<int32_t>(t_row, "t_row", "int32", -1);
  const int64_t nnz = t_row.shape(0);
  check_dtype<float>(values, "values", "float32");
  if (!(values.flags() & py::array::c_style)) throw py::value_error("values: must be C-contiguous");
  check_aligned(values, "values");
  const int64_t nvals = static_cast<int64_t>(values.size());
  const int32_t* perm = vector<int32_t>(t_perm, "t_perm", "int32", nnz);
  check_out(dx, "dx", {span(dy, "dy"), span(values, "values"), span(t_crow, "t_crow"), span(t_row, "t_row"),
                       span(t_perm, "t_perm")});
  check_csr(ptr, n, idx, nnz, D.cols, "t_crow", "t_row", threads(nthreads));
  check_perm(perm, nnz, nvals, threads(nthreads));
  py::gil_scoped_release release;
  sparseops::csr_spmm(D.p, D.rows, D.cols, D.s0, D.s1, static_cast<const float*>(values.data()), perm, ptr, idx, n,
                      nullptr, DX, threads(nthreads));
}

void nm_sdd(const py::array& dy, const py::array& x, const py::array& idx, int n, int m, py::array& dvalues,
            int nthreads) {
  const Mat D = float_matrix(dy, "dy");
  const Mat X = float_matrix(x, "x");
  if (D.rows != X.rows)
    throw py::value_error("dy: expected " + std::to_string(X.rows) + " rows to match x, got " + std::to_string(D.rows));
  const NmDims d = nm_dims(n, m, D.cols, X.cols);
  const uint8_t* ip = nm_index(idx, "idx", d);
  float* DV = float_output(dvalues, "dvalues", d.rows, d.S, 2);
  check_out(dvalues, "dvalues", {span(dy, "dy"), span(x, "x"), span(idx, "idx")});
  py::gil_scoped_release release;
  sparseops::nm_sdd(D.p, D.rows, D.cols, D.s0, D.s1, X.p, X.cols, X.s0, X.s1, ip, n, m, DV, threads(nthreads));
}

// ---- block-sparse (BSR) ----

int check_block(int b) {
  if (b != 8 && b != 16 && b != 32 && b != 64)
    throw py::value_error("block: expected 8, 16, 32 or 64, got " + std::to_string(b));
  return b;
}

// a float32 activation [B, nb * b] whose rows are contiguous (any row stride); returns nb
int64_t block_activation(const Mat& a, const char* name, int b) {
  if (a.rows > 0 && a.s1 != 1 && a.cols > 1)
    throw py::value_error(std::string(name) + ": its rows must be contiguous (stride 1 along the features)");
  if (a.cols % b != 0)
    throw py::value_error(std::string(name) + ": expected a multiple of block=" + std::to_string(b) +
                          " features (pad to whole blocks), got " + std::to_string(a.cols));
  return a.cols / b;
}

// values / dvalues [nblk, b, b], C-contiguous float32
const float* block_values(const py::array& v, const char* name, int64_t nblk, int b, bool output) {
  check_dtype<float>(v, name, "float32");
  if (v.ndim() != 3 || v.shape(0) != nblk || v.shape(1) != b || v.shape(2) != b)
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(nblk) + ", " + std::to_string(b) +
                          ", " + std::to_string(b) + "), got " + shape_str(v));
  if (!(v.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
  if (output && !v.writeable()) throw py::value_error(std::string(name) + ": must be writeable");
  check_aligned(v, name);
  return static_cast<const float*>(v.data());
}

void bsr_dds(const py::array& x, const py::array& values, const py::array& crow, const py::array& col, int block,
             const py::object& bias, py::array& y, int nthreads) {
  const int b = check_block(block);
  const Mat X = float_matrix(x, "x");
  const int64_t nbc = block_activation(X, "x", b);
  const int32_t* ptr = vector<int32_t>(crow, "crow", "int32", -1);
  if (crow.shape(0) < 1) throw py::value_error("crow: expected block rows + 1 >= 1 entries, got 0");
  const int64_t nbr = crow.shape(0) - 1;
  const int32_t* idx = vector<int32_t>(col, "col", "int32", -1);
  const int64_t nblk = col.shape(0);
  const float* vals = block_values(values, "values", nblk, b, false);
  float* Y = float_output(y, "y", X.rows, nbr * b, 2);
  py::object bias_keep;  // see csr_dds
  const float* bp = optional_bias(bias, nbr * b, bias_keep);
  check_out(y, "y", {span(x, "x"), span(values, "values"), span(crow, "crow"), span(col, "col")}, bias_keep);
  check_csr(ptr, nbr, idx, nblk, nbc, "crow", "col");
  py::gil_scoped_release release;
  sparseops::bsr_dds(X.p, X.rows, X.s0, vals, ptr, idx, nbr, b, bp, Y, nbr * b, threads(nthreads));
}

void bsr_dsd(const py::array& dy, const py::array& values, const py::array& t_crow, const py::array& t_row,
             const py::array& t_perm, int block, py::array& dx, int nthreads) {
  const int b = check_block(block);
  const Mat D = float_matrix(dy, "dy");
  const int64_t nbr = block_activation(D, "dy", b);
  const int32_t* ptr = vector<int32_t>(t_crow, "t_crow", "int32", -1);
  if (t_crow.shape(0) < 1) throw py::value_error("t_crow: expected block columns + 1 >= 1 entries, got 0");
  const int64_t nbc = t_crow.shape(0) - 1;
  const int32_t* idx = vector<int32_t>(t_row, "t_row", "int32", -1);
  const int64_t nblk = t_row.shape(0);
  const float* vals = block_values(values, "values", nblk, b, false);
  const int32_t* perm = vector<int32_t>(t_perm, "t_perm", "int32", nblk);
  float* DX = float_output(dx, "dx", D.rows, nbc * b, 2);
  check_out(dx, "dx", {span(dy, "dy"), span(values, "values"), span(t_crow, "t_crow"), span(t_row, "t_row"),
                       span(t_perm, "t_perm")});
  check_csr(ptr, nbc, idx, nblk, nbr, "t_crow", "t_row");
  check_perm(perm, nblk, nblk);
  py::gil_scoped_release release;
  sparseops::bsr_dsd(D.p, D.rows, D.s0, vals, ptr, idx, perm, nbc, b, DX, nbc * b, threads(nthreads));
}

void bsr_sdd(const py::array& dy, const py::array& x, const py::array& row, const py::array& col, int block,
             py::array& dvalues, int nthreads) {
  const int b = check_block(block);
  const Mat D = float_matrix(dy, "dy");
  const Mat X = float_matrix(x, "x");
  if (D.rows != X.rows)
    throw py::value_error("dy: expected " + std::to_string(X.rows) + " rows to match x, got " + std::to_string(D.rows));
  const int64_t nbr = block_activation(D, "dy", b), nbc = block_activation(X, "x", b);
  const int32_t* r = vector<int32_t>(row, "row", "int32", -1);
  const int64_t nblk = row.shape(0);
  const int32_t* c = vector<int32_t>(col, "col", "int32", nblk);
  if (!indices_valid(r, nblk, nbr)) throw py::value_error("row: block rows must lie in [0, " + std::to_string(nbr) + ")");
  if (!indices_valid(c, nblk, nbc))
    throw py::value_error("col: block columns must lie in [0, " + std::to_string(nbc) + ")");
  float* DV = const_cast<float*>(block_values(dvalues, "dvalues", nblk, b, true));
  float* out = static_cast<float*>(dvalues.mutable_data());
  (void)DV;
  check_out(dvalues, "dvalues", {span(dy, "dy"), span(x, "x"), span(row, "row"), span(col, "col")});
  py::gil_scoped_release release;
  sparseops::bsr_sdd(D.p, D.rows, D.s0, X.p, X.s0, r, c, nblk, b, out, threads(nthreads));
}

// ---- activation-sparse: no index comes from the caller, so shapes, dtypes and strides are all there is ----

// a float32 matrix whose rows are contiguous (column stride 1), rows ld >= cols apart
Mat row_matrix(const py::array& a, const char* name) {
  const Mat m = float_matrix(a, name);
  // an empty matrix has nothing to read (numpy gives a 0-row array strides of 0)
  if (m.rows > 0 && m.cols > 1 && m.s1 != 1)
    throw py::value_error(std::string(name) + ": rows must be contiguous (column stride 1)");
  if (m.rows > 1 && m.s0 < m.cols)
    throw py::value_error(std::string(name) + ": rows must not overlap (row stride >= columns)");
  if (m.cols > INT32_MAX) throw py::value_error(std::string(name) + ": at most 2^31 - 1 columns");
  return m;
}

sparseops::ActSel act_sel(const py::array& threshold, int64_t K, bool relu) {
  const float* t = vector<float>(threshold, "threshold", "float32", -1);
  if (threshold.shape(0) != 1 && threshold.shape(0) != K)
    throw py::value_error("threshold: expected 1 entry (one threshold) or " + std::to_string(K) +
                          " (one per input), got " + std::to_string(threshold.shape(0)));
  return {t, threshold.shape(0) != 1, relu};
}

const float* act_weight(const py::array& wt, int64_t K) {
  const Mat W = row_matrix(wt, "weight_t");
  if (W.rows != K)
    throw py::value_error("weight_t: expected " + std::to_string(K) + " rows (one per input), got " +
                          std::to_string(W.rows));
  if (W.rows > 1 && W.cols > 0 && W.s0 != W.cols) throw py::value_error("weight_t: must be C-contiguous");
  return W.p;
}

template <class F>
int64_t act_forward(F kernel, const py::array& x, const py::array& threshold, bool relu, const py::array& weight_t,
                    const py::object& bias, py::array& y, int nthreads) {
  const Mat X = row_matrix(x, "x");
  const sparseops::ActSel sel = act_sel(threshold, X.cols, relu);
  const float* W = act_weight(weight_t, X.cols);
  const int64_t N = weight_t.shape(1);
  float* Y = float_output(y, "y", X.rows, N, 2);
  py::object bias_keep;  // see csr_dds
  const float* bp = optional_bias(bias, N, bias_keep);
  check_out(y, "y", {span(x, "x"), span(weight_t, "weight_t"), span(threshold, "threshold")}, bias_keep);
  py::gil_scoped_release release;
  return kernel(X.p, X.rows, X.cols, X.s0, sel, W, N, bp, Y, N, threads(nthreads));
}

int64_t act_gemv(const py::array& x, const py::array& threshold, bool relu, const py::array& weight_t,
                 const py::object& bias, py::array& y, int nthreads) {
  return act_forward(sparseops::act_gemv, x, threshold, relu, weight_t, bias, y, nthreads);
}

int64_t act_gemv16(const py::array& x, const py::array& threshold, bool relu, const py::array& weight_t,
                   const std::string& dtype, const py::object& bias, py::array& y, int nthreads) {
  if (dtype != "bfloat16" && dtype != "float16")
    throw py::value_error("dtype: expected 'bfloat16' or 'float16', got '" + dtype + "'");
  const Mat X = row_matrix(x, "x");
  const sparseops::ActSel sel = act_sel(threshold, X.cols, relu);
  if (!weight_t.dtype().is(py::dtype::of<int16_t>()) && !weight_t.dtype().is(py::dtype::of<uint16_t>()))
    throw py::type_error("weight_t: expected an int16/uint16 view of " + dtype + " data, got dtype " +
                         std::string(py::str(weight_t.dtype())));
  if (weight_t.ndim() != 2 || weight_t.shape(0) != X.cols)
    throw py::value_error("weight_t: expected shape (" + std::to_string(X.cols) + ", out), got " + shape_str(weight_t));
  if (!(weight_t.flags() & py::array::c_style)) throw py::value_error("weight_t: must be C-contiguous");
  check_aligned(weight_t, "weight_t");
  const int64_t N = weight_t.shape(1);
  float* Y = float_output(y, "y", X.rows, N, 2);
  py::object bias_keep;  // see csr_dds
  const float* bp = optional_bias(bias, N, bias_keep);
  const auto* W = static_cast<const uint16_t*>(weight_t.data());
  check_out(y, "y", {span(x, "x"), span(weight_t, "weight_t"), span(threshold, "threshold")}, bias_keep);
  py::gil_scoped_release release;
  return sparseops::act_gemv16(X.p, X.rows, X.cols, X.s0, sel, W, dtype == "bfloat16", N, bp, Y, N,
                               threads(nthreads));
}

int64_t act_spmm(const py::array& x, const py::array& threshold, bool relu, const py::array& weight_t,
                 const py::object& bias, py::array& y, int nthreads) {
  return act_forward(sparseops::act_spmm, x, threshold, relu, weight_t, bias, y, nthreads);
}

// the operands every activation-sparse gradient reads: x and dy with as many rows, the sparsifier, and
// (weight_t given) the weight, [in, dy's columns]. transposed: the kernel indexes the rows of x in int32
struct ActGrad {
  Mat X, D;
  sparseops::ActSel sel;
  const float* W;
};

ActGrad act_grad(const py::array& dy, const py::array& x, const py::array& threshold, bool relu,
                 const py::array* weight_t, bool transposed) {
  const Mat X = row_matrix(x, "x");
  const Mat D = row_matrix(dy, "dy");
  if (D.rows != X.rows)
    throw py::value_error("dy: expected " + std::to_string(X.rows) + " rows to match x, got " + std::to_string(D.rows));
  if (transposed && D.rows > INT32_MAX) throw py::value_error("dy: at most 2^31 - 1 rows");
  const sparseops::ActSel sel = act_sel(threshold, X.cols, relu);
  const float* W = nullptr;
  if (weight_t) {
    W = act_weight(*weight_t, X.cols);
    if (weight_t->shape(1) != D.cols)
      throw py::value_error("dy: expected " + std::to_string(weight_t->shape(1)) + " columns (weight_t's), got " +
                            std::to_string(D.cols));
  }
  return {X, D, sel, W};
}

void act_dsd(const py::array& dy, const py::array& x, const py::array& threshold, bool relu,
             const py::array& weight_t, py::array& dx, int nthreads) {
  const ActGrad g = act_grad(dy, x, threshold, relu, &weight_t, false);
  float* DX = float_output(dx, "dx", g.X.rows, g.X.cols, 2);
  check_out(dx, "dx", {span(dy, "dy"), span(x, "x"), span(threshold, "threshold"), span(weight_t, "weight_t")});
  advise_huge_pages(dx);
  py::gil_scoped_release release;
  sparseops::act_dsd(g.D.p, g.D.rows, g.D.cols, g.D.s0, g.X.p, g.X.cols, g.X.s0, g.sel, g.W, DX, g.X.cols,
                     threads(nthreads));
}

void act_sdd(const py::array& dy, const py::array& x, const py::array& threshold, bool relu, py::array& dweight_t,
             int nthreads) {
  const ActGrad g = act_grad(dy, x, threshold, relu, nullptr, true);
  float* DW = float_output(dweight_t, "dweight_t", g.X.cols, g.D.cols, 2);
  check_out(dweight_t, "dweight_t", {span(dy, "dy"), span(x, "x"), span(threshold, "threshold")});
  advise_huge_pages(dweight_t);
  py::gil_scoped_release release;
  sparseops::act_sdd(g.D.p, g.D.rows, g.D.cols, g.D.s0, g.X.p, g.X.cols, g.X.s0, g.sel, DW, threads(nthreads));
}

// both gradients in one call: dx as act_dsd, dweight_t as act_sdd
void act_backward(const py::array& dy, const py::array& x, const py::array& threshold, bool relu,
                  const py::array& weight_t, py::array& dx, py::array& dweight_t, int nthreads) {
  const ActGrad g = act_grad(dy, x, threshold, relu, &weight_t, true);
  float* DX = float_output(dx, "dx", g.X.rows, g.X.cols, 2);
  float* DW = float_output(dweight_t, "dweight_t", g.X.cols, g.D.cols, 2);
  const std::vector<Span> reads = {span(dy, "dy"), span(x, "x"), span(threshold, "threshold"), span(weight_t, "weight_t")};
  std::vector<Span> with_dw = reads;
  with_dw.push_back(span(dweight_t, "dweight_t"));
  check_out(dx, "dx", with_dw);
  check_out(dweight_t, "dweight_t", reads);
  advise_huge_pages(dx);
  advise_huge_pages(dweight_t);
  py::gil_scoped_release release;
  sparseops::act_backward(g.D.p, g.D.rows, g.D.cols, g.D.s0, g.X.p, g.X.cols, g.X.s0, g.sel, g.W, DX, g.X.cols, DW,
                          threads(nthreads));
}

// y = s(x) @ M + bias, M = Wᵀ as CSR [K, N] (ptr, col = output index, val): both sparsities skipped.
// the kernel checks the index rows it follows (the union's) before it writes anything; when that fails,
// check_csr runs over the whole index to name the first bad entry
int64_t act_csr_gemv(const py::array& x, const py::array& threshold, bool relu, const py::array& t_crow,
                     const py::array& t_col, const py::array& t_values, int64_t out_features, const py::object& bias,
                     py::array& y, int nthreads) {
  const Mat X = row_matrix(x, "x");
  const sparseops::ActSel sel = act_sel(threshold, X.cols, relu);
  if (out_features < 0 || out_features > INT32_MAX)
    throw py::value_error("out_features: expected 0 <= out_features < 2^31, got " + std::to_string(out_features));
  const int32_t* ptr = vector<int32_t>(t_crow, "t_crow", "int32", X.cols + 1);
  const int32_t* col = vector<int32_t>(t_col, "t_col", "int32", -1);
  const int64_t nnz = t_col.shape(0);
  const float* vals = vector<float>(t_values, "t_values", "float32", nnz);
  float* Y = float_output(y, "y", X.rows, out_features, 2);
  py::object bias_keep;  // see csr_dds
  const float* bp = optional_bias(bias, out_features, bias_keep);
  check_out(y, "y", {span(x, "x"), span(threshold, "threshold"), span(t_crow, "t_crow"), span(t_col, "t_col"),
                     span(t_values, "t_values")}, bias_keep);
  int64_t u;
  {
    py::gil_scoped_release release;
    u = sparseops::act_csr_gemv(X.p, X.rows, X.cols, X.s0, sel, ptr, col, vals, nnz, out_features, bp, Y,
                                out_features, threads(nthreads));
  }
  if (u < 0) {
    check_csr(ptr, X.cols, col, nnz, out_features, "t_crow", "t_col");
    throw py::value_error("t_col: invalid index in a row the input activates");
  }
  return u;
}

// ---- the elements a packed 1-bit mask marks (mask.h): dtype-agnostic, 2- or 4-byte elements ----

// an array of float32, or of 16-bit floats as an int16/uint16 view: its element size
int element_size(const py::array& a, const char* name) {
  if (a.dtype().is(py::dtype::of<float>())) return 4;
  if (a.dtype().is(py::dtype::of<int16_t>()) || a.dtype().is(py::dtype::of<uint16_t>())) return 2;
  throw py::type_error(std::string(name) + ": expected float32 or an int16/uint16 view of 16-bit floats, got dtype " +
                       std::string(py::str(a.dtype())));
}

const int32_t* packed_mask(const py::array& mask, int64_t n) {
  return vector<int32_t>(mask, "mask", "int32", (n + 31) / 32);
}

py::array mask_select(const py::array& x, const py::array& mask, int nthreads) {
  const int es = element_size(x, "x");
  if (!(x.flags() & py::array::c_style)) throw py::value_error("x: must be C-contiguous");
  check_aligned(x, "x");
  const int64_t n = static_cast<int64_t>(x.size());
  const int32_t* m = packed_mask(mask, n);
  int64_t count;
  {
    py::gil_scoped_release release;
    count = sparseops::mask_count(m, n, threads(nthreads));
  }
  py::array out(x.dtype(), std::vector<py::ssize_t>{static_cast<py::ssize_t>(count)});
  void* o = out.mutable_data();
  const void* xp = x.data();
  bool ok;
  {
    py::gil_scoped_release release;
    ok = sparseops::mask_select(xp, es, n, m, o, count, threads(nthreads));
  }
  if (!ok) throw py::value_error("mask: changed while it was read (another thread wrote it during the call)");
  return out;
}

void mask_expand(const py::array& mask, const py::array& values, py::array& out, int nthreads) {
  const int es = element_size(values, "values");
  if (element_size(out, "out") != es || !out.dtype().is(values.dtype()))
    throw py::type_error("out: expected the dtype of values (" + std::string(py::str(values.dtype())) + "), got " +
                         std::string(py::str(out.dtype())));
  if (!(out.flags() & py::array::c_style)) throw py::value_error("out: must be C-contiguous");
  if (!out.writeable()) throw py::value_error("out: must be writeable");
  check_aligned(out, "out");
  const int64_t n = static_cast<int64_t>(out.size());
  const int32_t* m = packed_mask(mask, n);
  const void* v = values.data();
  if (values.ndim() != 1 || !(values.flags() & py::array::c_style))
    throw py::value_error("values: expected a contiguous 1-D array, got shape " + shape_str(values));
  check_aligned(values, "values");
  check_disjoint({span(out, "out")}, {span(out, "out"), span(mask, "mask"), span(values, "values")});
  // the kernel counts the mask's bits before it writes and refuses (writing nothing) another count
  void* o = out.mutable_data();
  const int64_t nv = static_cast<int64_t>(values.shape(0));
  bool ok;
  {
    py::gil_scoped_release release;
    ok = sparseops::mask_expand(m, v, nv, es, n, o, threads(nthreads));
  }
  if (!ok)
    throw py::value_error("values: expected " + std::to_string(sparseops::mask_count(m, n, threads(nthreads))) +
                          " entries (the bits the mask sets), got " + std::to_string(nv));
}

void mask_where(const py::array& mask, const py::array& x, py::array& out, int nthreads) {
  const int es = element_size(x, "x");
  if (!out.dtype().is(x.dtype()))
    throw py::type_error("out: expected the dtype of x (" + std::string(py::str(x.dtype())) + "), got " +
                         std::string(py::str(out.dtype())));
  if (!(x.flags() & py::array::c_style)) throw py::value_error("x: must be C-contiguous");
  if (!(out.flags() & py::array::c_style)) throw py::value_error("out: must be C-contiguous");
  if (!out.writeable()) throw py::value_error("out: must be writeable");
  check_aligned(x, "x");
  check_aligned(out, "out");
  const int64_t n = static_cast<int64_t>(x.size());
  if (static_cast<int64_t>(out.size()) != n)
    throw py::value_error("out: expected " + std::to_string(n) + " elements (x's), got " + std::to_string(out.size()));
  const int32_t* m = packed_mask(mask, n);
  // out may be x itself (an in-place where), nothing else
  const Span so = span(out, "out"), sx = span(x, "x");
  if (!(so.p == sx.p && so.n == sx.n)) check_disjoint({so}, {so, sx, span(mask, "mask")});
  else check_disjoint({so}, {so, span(mask, "mask")});
  const void* xp = x.data();
  void* o = out.mutable_data();
  py::gil_scoped_release release;
  sparseops::mask_where(m, xp, es, n, o, threads(nthreads));
}

// ---- mask updates (dst.h): index work only, no isa variants ----

struct CsrIn {
  const int32_t* ptr = nullptr;
  const int32_t* idx = nullptr;
  int64_t nnz = 0;
};

void check_dims(int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0 || rows > INT32_MAX || cols > INT32_MAX)
    throw py::value_error("shape: rows and cols must lie in [0, 2^31), got (" + std::to_string(rows) + ", " +
                          std::to_string(cols) + ")");
}

// the CSR (crow [rows+1], col [nnz]) an update starts from, checked as the products check it
CsrIn csr_in(const py::array& crow, const py::array& col, int64_t rows, int64_t cols, int nthreads) {
  CsrIn c;
  c.ptr = vector<int32_t>(crow, "crow", "int32", rows + 1);
  c.idx = vector<int32_t>(col, "col", "int32", -1);
  c.nnz = col.shape(0);
  check_csr(c.ptr, rows, c.idx, c.nnz, cols, "crow", "col", threads(nthreads));
  return c;
}

// a strictly increasing int64 list in [0, limit)
const int64_t* positions(const py::array& a, const char* name, int64_t limit) {
  const int64_t* p = vector<int64_t>(a, name, "int64", -1);
  const int64_t n = a.shape(0);
  // a branch-free pass first (it vectorises); the loop below only runs to name the first bad entry
  uint64_t bad = n > 0 ? static_cast<uint64_t>(p[0]) >= static_cast<uint64_t>(limit) : 0;
  for (int64_t i = 1; i < n; ++i)
    bad |= static_cast<uint64_t>(static_cast<uint64_t>(p[i]) >= static_cast<uint64_t>(limit)) |
           static_cast<uint64_t>(p[i] <= p[i - 1]);
  if (!bad) return p;
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] < 0 || p[i] >= limit)
      throw py::value_error(std::string(name) + ": position " + std::to_string(p[i]) + " at " + std::to_string(i) +
                            " is outside [0, " + std::to_string(limit) + ")");
    if (i && p[i] <= p[i - 1])
      throw py::value_error(std::string(name) + ": positions must be strictly increasing (at " + std::to_string(i) +
                            ")");
  }
  return p;
}

const float* score_matrix(const py::array& s) {
  check_dtype<float>(s, "scores", "float32");
  if (s.ndim() != 2) throw py::value_error("scores: expected a 2-D array, got shape " + shape_str(s));
  if (!(s.flags() & py::array::c_style)) throw py::value_error("scores: must be C-contiguous");
  check_aligned(s, "scores");
  check_dims(s.shape(0), s.shape(1));
  return static_cast<const float*>(s.data());
}

// an output vector of n entries: the caller's array (dtype, 1-D, C-contiguous, writeable, aligned) or,
// given None, a fresh one
template <class T>
py::array out_vector(const py::object& given, const char* name, const char* dtype, int64_t n) {
  if (given.is_none()) return py::array_t<T>(static_cast<py::ssize_t>(n));
  if (!py::isinstance<py::array>(given))
    throw py::type_error(std::string(name) + ": expected a numpy array or None");
  py::array a = py::reinterpret_borrow<py::array>(given);
  check_dtype<T>(a, name, dtype);
  if (a.ndim() != 1 || a.shape(0) != n)
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(n) + ",), got " + shape_str(a));
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
  if (!a.writeable()) throw py::value_error(std::string(name) + ": must be writeable");
  check_aligned(a, name);
  return a;
}

py::array dst_top_abs(const py::array& scores, const py::object& crow, const py::object& col, int64_t n,
                      int nthreads, const py::object& eligible, const py::object& out_arg, double z) {
  if (!std::isfinite(z)) throw py::value_error("z: expected a finite float, got " + std::to_string(z));
  const float* S = score_matrix(scores);
  const int64_t rows = scores.shape(0), cols = scores.shape(1);
  if (crow.is_none() != col.is_none()) throw py::value_error("crow, col: give both or neither");
  CsrIn c;
  py::array crow_a, col_a, elig_a;  // outlive the kernel
  if (!crow.is_none()) {
    crow_a = crow.cast<py::array>();
    col_a = col.cast<py::array>();
    c = csr_in(crow_a, col_a, rows, cols, nthreads);
  }
  // bool arrays are read as bytes, nonzero = true, as the kernels read them: a bool byte other than 0/1 (a
  // uint8 tensor viewed as bool) read through bool* is undefined, and counted 2 where the kernel saw one entry
  const uint8_t* M = nullptr;
  int64_t count = rows * cols - c.nnz;
  if (!eligible.is_none()) {
    elig_a = eligible.cast<py::array>();
    check_dtype<bool>(elig_a, "eligible", "bool");
    if (elig_a.ndim() != 2 || elig_a.shape(0) != rows || elig_a.shape(1) != cols)
      throw py::value_error("eligible: expected shape " + shape_str(scores) + ", got " + shape_str(elig_a));
    if (!(elig_a.flags() & py::array::c_style)) throw py::value_error("eligible: must be C-contiguous");
    M = static_cast<const uint8_t*>(elig_a.data());
    // the eligible entries: flagged and not stored
    count = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* m = M + r * cols;
      int64_t row = 0;
      for (int64_t j = 0; j < cols; ++j) row += m[j] != 0;
      if (c.ptr)
        for (int64_t p = c.ptr[r]; p < c.ptr[r + 1]; ++p) row -= m[c.idx[p]] != 0;
      count += row;
    }
  }
  const int64_t eligible_n = count;
  if (n < 0 || n > eligible_n)
    throw py::value_error("n: expected 0 <= n <= " + std::to_string(eligible_n) + " (the eligible entries), got " +
                          std::to_string(n));
  py::array out = out_vector<int64_t>(out_arg, "out", "int64", n);
  std::vector<Span> all = {span(out, "out"), span(scores, "scores")};
  if (c.ptr) all.push_back(span(crow_a, "crow")), all.push_back(span(col_a, "col"));
  if (M) all.push_back(span(elig_a, "eligible"));
  check_disjoint({all[0]}, all);
  int64_t* O = static_cast<int64_t*>(out.mutable_data());
  {
    py::gil_scoped_release release;
    sparseops::top_abs(S, rows, cols, c.ptr, c.idx, M, n, O, threads(nthreads), z);
  }
  return out;
}

py::array dst_top_abs_rows(const py::array& scores, const py::array& crow, const py::array& col, const py::array& keep,
                           const py::array& need, int nthreads, const py::object& out_arg) {
  const float* S = score_matrix(scores);
  const int64_t rows = scores.shape(0), cols = scores.shape(1);
  const CsrIn c = csr_in(crow, col, rows, cols, nthreads);
  const auto* K = reinterpret_cast<const uint8_t*>(vector<bool>(keep, "keep", "bool", c.nnz));  // bytes: see dst_top_abs
  const int64_t* N = vector<int64_t>(need, "need", "int64", rows + 1);
  if (N[0] != 0) throw py::value_error("need: must start at 0, got " + std::to_string(N[0]));
  for (int64_t r = 0; r < rows; ++r) {
    int64_t kept = 0;
    for (int64_t p = c.ptr[r]; p < c.ptr[r + 1]; ++p) kept += K[p] != 0;
    const int64_t m = N[r + 1] - N[r];
    if (m < 0 || m > cols - kept)
      throw py::value_error("need: row " + std::to_string(r) + " asks for " + std::to_string(m) +
                            " positions, expected 0.." + std::to_string(cols - kept) + " (its columns not kept)");
  }
  py::array out = out_vector<int64_t>(out_arg, "out", "int64", N[rows]);
  const std::vector<Span> all = {span(out, "out"), span(scores, "scores"), span(crow, "crow"), span(col, "col"),
                                 span(keep, "keep"), span(need, "need")};
  check_disjoint({all[0]}, all);
  int64_t* O = static_cast<int64_t*>(out.mutable_data());
  {
    py::gil_scoped_release release;
    sparseops::top_abs_rows(S, rows, cols, c.ptr, c.idx, K, N, O,
                            threads(nthreads));
  }
  return out;
}

py::array dst_sample_off(int64_t rows, int64_t cols, const py::array& crow, const py::array& col, int64_t n,
                         uint64_t seed, const py::object& out_arg, int nthreads) {
  check_dims(rows, cols);
  const CsrIn c = csr_in(crow, col, rows, cols, nthreads);
  const int64_t free = rows * cols - c.nnz;
  if (n < 0 || n > free)
    throw py::value_error("n: expected 0 <= n <= " + std::to_string(free) + " (the free positions), got " +
                          std::to_string(n));
  py::array out = out_vector<int64_t>(out_arg, "out", "int64", n);
  const std::vector<Span> all = {span(out, "out"), span(crow, "crow"), span(col, "col")};
  check_disjoint({all[0]}, all);
  int64_t* O = static_cast<int64_t*>(out.mutable_data());
  {
    py::gil_scoped_release release;
    sparseops::sample_off(rows, cols, c.ptr, c.idx, n, seed, O, threads(nthreads));
  }
  return out;
}

py::array dst_count_off_kept(int64_t rows, int64_t cols, const py::array& crow, const py::array& col,
                             const py::array& keep, const py::array& pos, int nthreads, const py::object& out_arg) {
  check_dims(rows, cols);
  const CsrIn c = csr_in(crow, col, rows, cols, nthreads);
  const bool* K = vector<bool>(keep, "keep", "bool", c.nnz);
  const int64_t* P = positions(pos, "pos", rows * cols);
  py::array out = out_vector<int64_t>(out_arg, "out", "int64", rows);
  const std::vector<Span> all = {span(out, "out"), span(crow, "crow"), span(col, "col"), span(keep, "keep"),
                                 span(pos, "pos")};
  check_disjoint({all[0]}, all);
  int64_t* O = static_cast<int64_t*>(out.mutable_data());
  {
    py::gil_scoped_release release;
    sparseops::count_off_kept(rows, cols, c.ptr, c.idx, reinterpret_cast<const uint8_t*>(K), P, pos.shape(0), O,
                              threads(nthreads));
  }
  return out;
}

py::list dst_gather(const py::array& src, const py::list& xs, int nthreads, const py::object& outs_arg) {
  const int32_t* S = vector<int32_t>(src, "src", "int32", -1);
  const int64_t n = src.shape(0);
  std::vector<py::array> keep;  // the arrays outlive the kernel
  std::vector<const float*> in;
  std::vector<float*> out;
  py::list result;
  std::vector<Span> all = {span(src, "src")}, written;
  if (!outs_arg.is_none() && (!py::isinstance<py::list>(outs_arg) || py::len(outs_arg) != py::len(xs)))
    throw py::value_error("outs: expected None or a list of " + std::to_string(py::len(xs)) + " arrays");
  int64_t m = -1;
  size_t i = 0;
  // "xs[j]", "outs[j]": the spans name them, so that the same array given twice is an overlap (one name for
  // all made it its own "itself" in check_disjoint); reserved, as the spans keep pointers into them
  std::vector<std::string> xn, on;
  xn.reserve(py::len(xs));
  on.reserve(py::len(xs));
  for (const py::handle& h : xs) {
    py::array x = py::reinterpret_borrow<py::object>(h).cast<py::array>();
    const float* X = vector<float>(x, "xs", "float32", m);
    m = x.shape(0);
    py::object given = outs_arg.is_none() ? py::none() : py::reinterpret_borrow<py::object>(outs_arg[py::int_(i)]);
    py::array o = out_vector<float>(given, "outs", "float32", n);
    in.push_back(X);
    out.push_back(static_cast<float*>(o.mutable_data()));
    keep.push_back(x);
    xn.push_back("xs[" + std::to_string(i) + "]");
    on.push_back("outs[" + std::to_string(i) + "]");
    all.push_back(span(x, xn.back().c_str()));
    written.push_back(span(o, on.back().c_str()));
    result.append(o);
    ++i;
  }
  if (m < 0) return result;
  all.insert(all.end(), written.begin(), written.end());
  check_disjoint(written, all);
  if (!indices_or_none_valid(S, n, m)) {
    for (int64_t j = 0; j < n; ++j)
      if (S[j] < -1 || S[j] >= m)
        throw py::value_error("src: index " + std::to_string(S[j]) + " at position " + std::to_string(j) +
                              " is outside [-1, " + std::to_string(m) + ")");
  }
  {
    py::gil_scoped_release release;
    sparseops::gather_or_zero(S, n, in.data(), out.data(), static_cast<int>(in.size()), threads(nthreads));
  }
  return result;
}

// whether a grown position is also a kept one (kept: ascending entries of the CSR; grown: ascending flat
// positions): the clash csr_repack reports after its merge has written the outputs, found here first
bool repack_clashes(int64_t rows, int64_t cols, const int32_t* crow, const int32_t* col, const int64_t* kept,
                    int64_t nk, const int64_t* grown, int64_t ng) {
  int64_t a = 0, g = 0;
  for (int64_t r = 0; r < rows && a < nk && g < ng; ++r) {
    const int64_t kend = crow[r + 1], gend = (r + 1) * cols;
    while (a < nk && kept[a] < kend && g < ng && grown[g] < gend) {
      const int64_t ka = r * cols + col[kept[a]];
      if (ka == grown[g]) return true;
      if (ka < grown[g]) ++a; else ++g;
    }
    while (a < nk && kept[a] < kend) ++a;
    while (g < ng && grown[g] < gend) ++g;
  }
  return false;
}

py::tuple dst_csr_repack(int64_t rows, int64_t cols, const py::array& crow, const py::array& col,
                         const py::array& kept, const py::array& grown, int nthreads, const py::object& out_arg,
                         const py::object& xs_arg, const py::object& outs_arg, bool scratch) {
  check_dims(rows, cols);
  const CsrIn c = csr_in(crow, col, rows, cols, nthreads);
  const int64_t* K = positions(kept, "kept", c.nnz);
  const int64_t* G = positions(grown, "grown", rows * cols);
  const int64_t nk = kept.shape(0), ng = grown.shape(0), nn = nk + ng;
  if (nn > INT32_MAX)
    throw py::value_error("kept, grown: " + std::to_string(nn) + " entries exceed the int32 index limit");
  static const char* names[7] = {"out[0] (crow)", "out[1] (col)", "out[2] (row)", "out[3] (t_crow)",
                                 "out[4] (t_row)", "out[5] (t_perm)", "out[6] (src)"};
  const int64_t sizes[7] = {rows + 1, nn, nn, cols + 1, nn, nn, nn};
  if (!out_arg.is_none() && (!py::isinstance<py::sequence>(out_arg) || py::len(out_arg) != 7))
    throw py::value_error("out: expected None or 7 arrays (crow, col, row, t_crow, t_row, t_perm, src)");
  std::vector<py::array> o;
  std::vector<Span> written, all = {span(crow, "crow"), span(col, "col"), span(kept, "kept"), span(grown, "grown")};
  for (int j = 0; j < 7; ++j) {
    py::object given = out_arg.is_none() ? py::none() : py::reinterpret_borrow<py::object>(out_arg[py::int_(j)]);
    o.push_back(out_vector<int32_t>(given, names[j], "int32", sizes[j]));
    written.push_back(span(o.back(), names[j]));
  }
  // the tensors to re-map in the merge (xs, laid out like the old values) and where (outs): both or neither
  if (xs_arg.is_none() != outs_arg.is_none()) throw py::value_error("xs, outs: give both or neither");
  std::vector<py::array> xa, oa;  // outlive the kernel
  std::vector<const float*> xp;
  std::vector<float*> op;
  std::vector<std::string> xn, on;  // "xs[j]", "outs[j]": the spans name them (the same array twice is an overlap)
  if (!xs_arg.is_none()) {
    if (!py::isinstance<py::list>(xs_arg) || !py::isinstance<py::list>(outs_arg) ||
        py::len(xs_arg) != py::len(outs_arg))
      throw py::value_error("xs, outs: expected two lists of the same length");
    const py::list xl = xs_arg.cast<py::list>(), ol = outs_arg.cast<py::list>();
    const size_t m = py::len(xl);
    xn.reserve(m);
    on.reserve(m);
    for (size_t j = 0; j < m; ++j) {
      xn.push_back("xs[" + std::to_string(j) + "]");
      on.push_back("outs[" + std::to_string(j) + "]");
      py::array x = py::reinterpret_borrow<py::object>(xl[j]).cast<py::array>();
      xp.push_back(vector<float>(x, "xs", "float32", c.nnz));
      xa.push_back(x);
      all.push_back(span(x, xn.back().c_str()));
      py::array w = out_vector<float>(py::reinterpret_borrow<py::object>(ol[j]), "outs", "float32", nn);
      op.push_back(static_cast<float*>(w.mutable_data()));
      oa.push_back(w);
      written.push_back(span(w, on.back().c_str()));
    }
    all.insert(all.end(), written.end() - static_cast<long>(oa.size()), written.end());
  }
  all.insert(all.end(), written.begin(), written.begin() + 7);
  check_disjoint(written, all);
  // the kernel finds a clash in its merge, after writing: with outputs the caller gave, look first (an
  // extra pass; with fresh ones, which the error discards, the kernel's own check is enough). scratch:
  // the caller made the outputs for this call and drops them on an error (sparseops.ops.repack.repack),
  // so they count as fresh
  // NOTE: ad hoc, a SET update at 4096^2 90% (1.17M kept, 0.5M grown), 2 threads: the pass took 6 of
  // the call's 19 ms (one thread, a branch a step that goes either way)
  if (!scratch && (!out_arg.is_none() || !outs_arg.is_none()) &&
      repack_clashes(rows, cols, c.ptr, c.idx, K, nk, G, ng))
    throw py::value_error("grown: a grown position is also a kept one");
  bool ok;
  {
    int32_t* p[7];
    for (int j = 0; j < 7; ++j) p[j] = static_cast<int32_t*>(o[j].mutable_data());
    py::gil_scoped_release release;
    ok = sparseops::csr_repack(rows, cols, c.ptr, c.idx, K, nk, G, ng, p[0], p[1], p[2], p[3], p[4], p[5], p[6],
                               threads(nthreads), xp.data(), op.data(), static_cast<int>(xp.size()));
  }
  if (!ok) throw py::value_error("grown: a grown position is also a kept one");
  return py::make_tuple(o[0], o[1], o[2], o[3], o[4], o[5], o[6]);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparseops CPU kernels (torch-free C++, AVX2/FMA with a portable fallback, OpenMP).";

  m.def("csr_dds16", &csr_dds16, py::arg("x"), py::arg("values"), py::arg("dtype"), py::arg("crow"), py::arg("col"),
        py::arg("bias"), py::arg("y").noconvert(), py::arg("nthreads"),
        R"(csr_dds for at most 7 rows of x with a 16-bit weight: values [nnz] is a C-contiguous int16/uint16 view
of dtype ('bfloat16' or 'float16') data, read as it is and widened to float32 (the sums of its float32
copy, bit for bit); x, bias and y are float32, y written only when every index passed its check.)");
  m.def("csr_dds", &csr_dds, py::arg("x"), py::arg("values"), py::arg("crow"), py::arg("col"), py::arg("bias"),
        py::arg("y").noconvert(), py::arg("nthreads"),
        R"(y[B, out] = x[B, in] @ Wᵀ + bias, W in CSR (values, crow[out+1], col[nnz]).

x is float32 with any non-negative strides; y is a C-contiguous float32 output [B, out]
that is fully overwritten. Raises TypeError/ValueError on a bad dtype, shape or index.)");
  m.def("csr_dsd", &csr_dsd, py::arg("dy"), py::arg("values"), py::arg("t_crow"), py::arg("t_row"),
        py::arg("t_perm"), py::arg("dx").noconvert(), py::arg("nthreads"),
        R"(dx[B, in] = dy[B, out] @ W through the transposed index (t_crow[in+1], t_row[nnz], t_perm[nnz]).)");
  m.def("csr_sdd", &csr_sdd, py::arg("dy"), py::arg("x"), py::arg("crow"), py::arg("col"), py::arg("dvalues").noconvert(),
        py::arg("nthreads"),
        R"(dvalues[k] = sum_b dy[b, i] * x[b, col[k]] for each stored (i, col[k]): the weight gradient on the mask.)");
  m.def("csr_backward", &csr_backward, py::arg("dy"), py::arg("x"), py::arg("values"), py::arg("crow"),
        py::arg("col"), py::arg("t_crow"), py::arg("t_row"), py::arg("t_perm"), py::arg("dx").noconvert(), py::arg("dvalues").noconvert(),
        py::arg("nthreads"),
        R"(csr_dsd and csr_sdd in one call: dx[B, in] = dy @ W and dvalues = the weight gradient on the mask.

dy [B, out] and x [B, in] are float32 with any non-negative strides; dx [B, in] and dvalues [nnz]
are C-contiguous float32 outputs, fully overwritten. dy is packed once for both products.)");
  m.def("fewbit_pack", &fewbit_pack, py::arg("x"), py::arg("dtype"), py::arg("borders"), py::arg("bits"),
        py::arg("codes").noconvert(), py::arg("nthreads"),
        R"(codes = the bit-packed interval index of every element of x (Few-Bit Backward).

x: C-contiguous float32 array, or an int16/uint16 view of bfloat16/float16 data (dtype names which).
The code of an element is the number of borders [2^bits - 1, sorted float32] it exceeds (nan -> 0).
codes: int32 output of ceil(x.size / 32) * bits words; group g of 32 elements owns words
[g*bits, g*bits + bits), and bit i of word j is bit j of element 32g+i's code.)");
  m.def("fewbit_pack_fused", &fewbit_pack_fused, py::arg("x"), py::arg("dtype"), py::arg("borders"),
        py::arg("bits"), py::arg("codes").none(true), py::arg("kind"), py::arg("a"), py::arg("b"),
        py::arg("y").noconvert(), py::arg("nthreads"),
        R"(fewbit_pack (into codes; None: skip it) plus, in the same pass, an activation of x into y (same dtype
and size; y may be x itself, no other overlap is accepted). kind 'clamp': y = min(max(x, a), b) (relu:
a=0, b=inf; relu6; hardtanh); 'leaky': y = x if x > 0 else x * a; 'hardswish': x * min(max(x + 3, 0),
6) / 6; 'hardsigmoid': min(max(x + 3, 0), 6) / 6. These are computed in float32, rounded once to the
dtype, and are torch's bit for bit
(nan and -0 included). 'tanh' is computed in float32 within 0.77 ulp of the exact value (torch's: 1 ulp),
then rounded to the dtype (a, b unused). 'sigmoid' is computed in float32 within 1.56 ulp of the exact
value (torch's: 2.3 ulp), then rounded to the dtype (a, b unused); 'silu' likewise, x * sigmoid(x) within
1.13 ulp (torch's: 2.2). 'elu': x >= 0 ?
x * b : a * (e^x - 1) (elu: a = alpha, b = 1; selu: a = alpha * scale, b = scale); 'celu': x >= 0 ? x :
a * (e^(x/a) - 1), a > 0; 'softplus': x if x * a > b else log(1 + e^(x a)) / a (a = beta > 0, b =
threshold): these three in float64, rounded to float32 (correctly rounded but within ~1e-15 of a
midpoint, always within 1 ulp), then to the dtype, but softplus with a = 1 in float32 within 0.85 ulp
(torch's: 1.5); 'logsigmoid' (a, b unused) in float32 within 0.85 ulp (torch's: 1.5).)");
  m.def("fewbit_unpack", &fewbit_unpack, py::arg("grad"), py::arg("dtype"), py::arg("codes"), py::arg("levels"),
        py::arg("bits"), py::arg("out").noconvert(), py::arg("nthreads"),
        R"(out = grad * levels[code] elementwise, the product rounded once to grad's dtype.

grad and out: C-contiguous arrays of the same dtype and size (see fewbit_pack); codes as made by
fewbit_pack for that size and bits; levels: 2^bits float32.)");
  m.def("nm_dds16", &nm_dds16, py::arg("x"), py::arg("values"), py::arg("dtype"), py::arg("idx"), py::arg("n"),
        py::arg("m"), py::arg("bias"), py::arg("y").noconvert(), py::arg("nthreads"),
        R"(nm_dds for at most 7 rows of x with a 16-bit weight: values [rows, S] is a C-contiguous int16/uint16 view
of dtype ('bfloat16' or 'float16') data, read as it is and widened to float32; x, bias and y are float32.)");
  m.def("nm_dds", &nm_dds, py::arg("x"), py::arg("values"), py::arg("idx"), py::arg("n"), py::arg("m"),
        py::arg("bias"), py::arg("y").noconvert(), py::arg("nthreads"),
        R"(y[B, out] = x[B, in] @ Wᵀ + bias for an N:M weight: values [out, S] float32 and idx [out, ceil(S/2)]
uint8 (4-bit in-group positions, slot j in the low nibble when j is even), S = ceil(in/m) * n.)");
  m.def("nm_dsd", &nm_dsd, py::arg("dy"), py::arg("values"), py::arg("t_idx"), py::arg("t_perm"), py::arg("n"),
        py::arg("m"), py::arg("dx").noconvert(), py::arg("nthreads"),
        R"(dx[B, in] = dy[B, out] @ W for a transposable N:M weight, through Wᵀ's N:M index t_idx [in, ceil(S_t/2)]
and t_perm [in, S_t] (the flat position of each transposed slot in values, -1 for an empty slot).)");
  m.def("nm_dsd_csr", &nm_dsd_csr, py::arg("dy"), py::arg("values"), py::arg("t_crow"), py::arg("t_row"),
        py::arg("t_perm"), py::arg("dx").noconvert(), py::arg("nthreads"),
        R"(dx[B, in] = dy[B, out] @ W for any N:M weight through the CSR of Wᵀ; t_perm indexes values.flat.)");
  m.def("nm_sdd", &nm_sdd, py::arg("dy"), py::arg("x"), py::arg("idx"), py::arg("n"), py::arg("m"),
        py::arg("dvalues").noconvert(), py::arg("nthreads"),
        R"(dvalues[o, j] = sum_b dy[b, o] * x[b, col(o, j)]: the weight gradient on the N:M slots, [out, S].)");
  m.def("bsr_dds", &bsr_dds, py::arg("x"), py::arg("values"), py::arg("crow"), py::arg("col"), py::arg("block"),
        py::arg("bias"), py::arg("y").noconvert(), py::arg("nthreads"),
        R"(y[B, nbr*b] = x[B, nbc*b] @ Wᵀ + bias for a block-sparse W: values [nblk, b, b] float32 on the CSR
index of its block grid (crow [nbr+1], col [nblk]). x's rows must be contiguous and padded to whole blocks.)");
  m.def("bsr_dsd", &bsr_dsd, py::arg("dy"), py::arg("values"), py::arg("t_crow"), py::arg("t_row"), py::arg("t_perm"),
        py::arg("block"), py::arg("dx").noconvert(), py::arg("nthreads"),
        R"(dx[B, nbc*b] = dy[B, nbr*b] @ W through Wᵀ's block index (t_crow [nbc+1], t_row, t_perm [nblk]).)");
  m.def("bsr_sdd", &bsr_sdd, py::arg("dy"), py::arg("x"), py::arg("row"), py::arg("col"), py::arg("block"),
        py::arg("dvalues").noconvert(), py::arg("nthreads"),
        R"(dvalues[k] = dy[:, row[k] block]ᵀ @ x[:, col[k] block]: the weight gradient on the stored blocks.)");
  m.def("act_gemv", &act_gemv, py::arg("x"), py::arg("threshold"), py::arg("relu"), py::arg("weight_t"),
        py::arg("bias"), py::arg("y").noconvert(), py::arg("nthreads"),
        R"(y[T, out] = s(x)[T, in] @ weight_t[in, out] + bias, reading only the rows of weight_t that at least one
row of x activates (their union). s: v = relu ? max(x, 0) : x, kept where |v| > threshold (threshold: 1 or
in float32 entries), else 0. x's rows must be contiguous; weight_t C-contiguous. Returns the union's size.)");
  m.def("act_gemv16", &act_gemv16, py::arg("x"), py::arg("threshold"), py::arg("relu"), py::arg("weight_t"),
        py::arg("dtype"), py::arg("bias"), py::arg("y").noconvert(), py::arg("nthreads"),
        R"(act_gemv with a 16-bit weight: weight_t [in, out] is a C-contiguous int16/uint16 view of dtype
('bfloat16' or 'float16') data, widened to float32 as it is read; x, threshold, bias and y are float32 as in
act_gemv. Reads only the rows of weight_t the union activates. Returns the union's size.)");
  m.def("act_spmm", &act_spmm, py::arg("x"), py::arg("threshold"), py::arg("relu"), py::arg("weight_t"),
        py::arg("bias"), py::arg("y").noconvert(), py::arg("nthreads"),
        R"(The act_gemv product for any batch, each row through its own active inputs (s(x) as CSR). Returns nnz.)");
  m.def("act_dsd", &act_dsd, py::arg("dy"), py::arg("x"), py::arg("threshold"), py::arg("relu"), py::arg("weight_t"),
        py::arg("dx").noconvert(), py::arg("nthreads"),
        R"(dx[B, in] = (dy[B, out] @ weight_tᵀ) masked to s(x)'s active entries, computed on those entries only.)");
  m.def("act_sdd", &act_sdd, py::arg("dy"), py::arg("x"), py::arg("threshold"), py::arg("relu"),
        py::arg("dweight_t").noconvert(), py::arg("nthreads"),
        R"(dweight_t[in, out] = s(x)ᵀ @ dy through s(x)'s nonzeros; rows of inputs no row activates are 0.)");
  m.def("act_backward", &act_backward, py::arg("dy"), py::arg("x"), py::arg("threshold"), py::arg("relu"),
        py::arg("weight_t"), py::arg("dx").noconvert(), py::arg("dweight_t").noconvert(), py::arg("nthreads"),
        R"(act_dsd's dx and act_sdd's dweight_t in one pass over s(x)'s nonzeros.)");
  m.def("act_csr_gemv", &act_csr_gemv, py::arg("x"), py::arg("threshold"), py::arg("relu"), py::arg("t_crow"),
        py::arg("t_col"), py::arg("t_values"), py::arg("out_features"), py::arg("bias"), py::arg("y").noconvert(),
        py::arg("nthreads"));
  m.def("mask_select", &mask_select, py::arg("x"), py::arg("mask"), py::arg("nthreads"),
        "The elements of x (C-contiguous, flattened) whose bit the packed 1-bit mask sets, as a new 1-D array.");
  m.def("mask_expand", &mask_expand, py::arg("mask"), py::arg("values"), py::arg("out").noconvert(),
        py::arg("nthreads"), "out (flattened) = the next of values where the packed 1-bit mask is set, else 0.");
  m.def("mask_where", &mask_where, py::arg("mask"), py::arg("x"), py::arg("out").noconvert(), py::arg("nthreads"),
        "out (flattened) = x where the packed 1-bit mask is set, else 0; out may be x.");
  m.def("dst_top_abs", &dst_top_abs, py::arg("scores"), py::arg("crow"), py::arg("col"), py::arg("n"),
        py::arg("nthreads"), py::arg("eligible") = py::none(), py::arg("out") = py::none(), py::arg("z") = 4.0,
        R"(The flat positions (int64, ascending) of the n largest |scores| [rows, cols] (float32, C-contiguous)
that the CSR (crow, col; both None: none) does not hold and eligible (bool [rows, cols], None: all)
flags; ties to the lower position, nan largest.

z: the margin, in standard deviations, of the sampled bound that lets large inputs be selected in one
pass (0: the exact three-pass selection only; negative: the bound nearly always misses and the exact
passes run after it). The result does not depend on z.)");
  m.def("dst_top_abs_rows", &dst_top_abs_rows, py::arg("scores"), py::arg("crow"), py::arg("col"), py::arg("keep"),
        py::arg("need"), py::arg("nthreads"), py::arg("out") = py::none(),
        R"(Row r gets need[r+1] - need[r] flat positions (ascending): its largest |scores| off the CSR row, then
the largest among its held entries whose keep flag is False; ties to the lower column.)");
  m.def("dst_sample_off", &dst_sample_off, py::arg("rows"), py::arg("cols"), py::arg("crow"), py::arg("col"),
        py::arg("n"), py::arg("seed"), py::arg("out") = py::none(), py::arg("nthreads") = 1,
        R"(n distinct flat positions (ascending) that the CSR does not hold, uniformly at random from seed.
The positions depend on the seed alone, not on nthreads.)");
  m.def("dst_count_off_kept", &dst_count_off_kept, py::arg("rows"), py::arg("cols"), py::arg("crow"), py::arg("col"),
        py::arg("keep"), py::arg("pos"), py::arg("nthreads"), py::arg("out") = py::none(),
        R"(Per row: how many of the flat positions pos (ascending) in it are not a stored entry flagged in keep.)");
  m.def("dst_gather", &dst_gather, py::arg("src"), py::arg("xs"), py::arg("nthreads"), py::arg("outs") = py::none(),
        R"([x[src] for x in xs], with 0 where src[i] == -1, in one pass (float32 arrays of one size m; src int32
in [-1, m)).)");
  m.def("dst_csr_repack", &dst_csr_repack, py::arg("rows"), py::arg("cols"), py::arg("crow"), py::arg("col"),
        py::arg("kept"), py::arg("grown"), py::arg("nthreads"), py::arg("out") = py::none(),
        py::arg("xs") = py::none(), py::arg("outs") = py::none(), py::arg("scratch") = false,
        R"(The CSR of the entries at positions kept (ascending, into col) plus new ones at the flat positions
grown (ascending): (crow, col, row, t_crow, t_row, t_perm, src) int32; src: old position, -1 if grown.

xs, outs: lists of float32 arrays, xs laid out like the old values ([nnz]) and outs [nnz'] written in
the merge: outs[j][i] = xs[j][src[i]], 0 for a grown entry (dst_gather fused into the re-pack).

A grown position that is also a kept one raises ValueError. Outputs given in out/outs are then left as
they were (a pass over kept and grown looks for it first), unless scratch is True: the caller made them
for this call and discards them on an error, and the kernel's own check in its merge is enough (they
may be partly written when it raises).)");
  m.def("isa", []() { return std::string(sparseops::isa_name(sparseops::active_isa())); },
        "The instruction set the kernels use now: 'avx512', 'avx2' or 'portable'.");
  m.def("_fail_scratch", [](bool on) { sparseops::set_scratch_fails(on); }, py::arg("on"),
        "tests only: while on, the kernels' scratch allocations fail (std::bad_alloc, MemoryError here), as "
        "they would out of memory");
  m.def("best_isa", []() { return std::string(sparseops::isa_name(sparseops::best_isa())); },
        "The best instruction set this CPU supports.");
  m.def(
      "isa_calls",
      []() {
        py::dict d;
        d["avx512"] = sparseops::isa_calls(Isa::avx512);
        d["avx2"] = sparseops::isa_calls(Isa::avx2);
        d["portable"] = sparseops::isa_calls(Isa::portable);
        return d;
      },
      "How many calls went into each instruction set's kernels since import: {'avx512': n, 'avx2': m, "
      "'portable': k} (the tests check that a run on one path ran that path's objects).");
  m.def(
      "set_isa",
      [](const std::string& name) {
        if (name == "avx512") sparseops::set_isa(Isa::avx512);
        else if (name == "avx2") sparseops::set_isa(Isa::avx2);
        else if (name == "portable") sparseops::set_isa(Isa::portable);
        else throw py::value_error("isa: expected 'avx512', 'avx2' or 'portable', got '" + name + "'");
        return std::string(sparseops::isa_name(sparseops::active_isa()));
      },
      py::arg("isa"), "Select the kernel path; asking for more than the CPU has selects the best it has below that "
      "(avx512 -> avx2 -> portable).");
#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
}
