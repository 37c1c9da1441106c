// run-time choice of the instruction set, and the isa-independent helpers.
#include <atomic>
#include <cassert>
#include <cstdlib>
#include <cstring>

#include "csr.h"
#include "fewbit.h"
#include "nm.h"
#include "bsr.h"
#include "act.h"
#include "dst.h"
#include "scratch.h"

namespace sparseops {
namespace {

Isa detect() {
#if defined(SPARSEOPS_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // f16c (the fp16 loads and stores of the few-bit kernels) came with avx2 on every x86 cpu, but
  // is checked all the same
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
#if defined(SPARSEOPS_HAVE_AVX512)
    // the avx512 objects are the avx2 code plus 16-lane loops: they need both sets (a cpu with
    // avx512f/vl has avx2, fma and f16c; an os that does not save the zmm state clears the bits)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return Isa::avx512;
#endif
    return Isa::avx2;
  }
#endif
  return Isa::portable;
}

// SPARSEOPS_ISA caps the path: "portable", or "avx2" (no 512-bit code on an avx512 cpu)
Isa initial() {
  const Isa best = detect();
  const char* env = std::getenv("SPARSEOPS_ISA");
  if (env && std::strcmp(env, "portable") == 0) return Isa::portable;
  if (env && std::strcmp(env, "avx2") == 0 && best == Isa::avx512) return Isa::avx2;
  return best;
}

std::atomic<int>& active() {
  static std::atomic<int> isa{static_cast<int>(initial())};
  return isa;
}

}  // namespace

Isa best_isa() {
  static const Isa best = detect();
  return best;
}
Isa active_isa() { return static_cast<Isa>(active().load()); }

namespace {
std::atomic<int64_t> g_isa_calls[3];
}
void note_isa_call(int isa) noexcept {
  if (isa >= 0 && isa < 3) g_isa_calls[isa].fetch_add(1, std::memory_order_relaxed);
}
int64_t isa_calls(Isa isa) { return g_isa_calls[static_cast<int>(isa)].load(std::memory_order_relaxed); }
void set_isa(Isa isa) {
  // asking for more than the cpu has falls back to the best it has below that (the paths are ordered)
  if (static_cast<int>(isa) > static_cast<int>(best_isa())) isa = best_isa();
  active().store(static_cast<int>(isa));
}
namespace {
std::atomic<bool> g_scratch_fails{false};
}
bool scratch_fails() noexcept { return g_scratch_fails.load(std::memory_order_relaxed); }
void set_scratch_fails(bool on) noexcept { g_scratch_fails.store(on, std::memory_order_relaxed); }
const char* isa_name(Isa isa) { return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "portable"; }

int64_t keys_past(const float* s, const uint64_t* E, int64_t b, int64_t e, uint32_t flip, int32_t lo, int64_t* P,
                  uint32_t* K) {
  assert(b % 16 == 0);
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return keys_past_avx512(s, E, b, e, flip, lo, P, K);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return keys_past_avx2(s, E, b, e, flip, lo, P, K);
#endif
  return keys_past_portable(s, E, b, e, flip, lo, P, K);
}

void csr_spmm(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals, const int32_t* perm,
              const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, float* y, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return csr_spmm_avx512(a, B, K, s0, s1, vals, perm, ptr, idx, n, bias, y, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return csr_spmm_avx2(a, B, K, s0, s1, vals, perm, ptr, idx, n, bias, y, nthreads);
#endif
  csr_spmm_portable(a, B, K, s0, s1, vals, perm, ptr, idx, n, bias, y, nthreads);
}

bool csr_rows_valid(const int32_t* ptr, int64_t n, const int32_t* idx, int64_t limit, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return csr_rows_valid_avx512(ptr, n, idx, limit, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return csr_rows_valid_avx2(ptr, n, idx, limit, nthreads);
#endif
  return csr_rows_valid_portable(ptr, n, idx, limit, nthreads);
}

bool indices_below(const int32_t* idx, int64_t n, int64_t limit, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return indices_below_avx512(idx, n, limit, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return indices_below_avx2(idx, n, limit, nthreads);
#endif
  return indices_below_portable(idx, n, limit, nthreads);
}

bool csr_spmm16_checked(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const uint16_t* vals, bool bf16,
                        const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, float* y, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512)
    return csr_spmm16_checked_avx512(a, B, K, s0, s1, vals, bf16, ptr, idx, n, bias, y, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2)
    return csr_spmm16_checked_avx2(a, B, K, s0, s1, vals, bf16, ptr, idx, n, bias, y, nthreads);
#endif
  return csr_spmm16_checked_portable(a, B, K, s0, s1, vals, bf16, ptr, idx, n, bias, y, nthreads);
}

bool csr_spmm_checked(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals,
                      const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, float* y, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return csr_spmm_checked_avx512(a, B, K, s0, s1, vals, ptr, idx, n, bias, y, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return csr_spmm_checked_avx2(a, B, K, s0, s1, vals, ptr, idx, n, bias, y, nthreads);
#endif
  return csr_spmm_checked_portable(a, B, K, s0, s1, vals, ptr, idx, n, bias, y, nthreads);
}

void csr_sdd(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in,
             int64_t x0, int64_t x1, const int32_t* crow, const int32_t* col, float* dvals, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return csr_sdd_avx512(dy, B, out, d0, d1, x, in, x0, x1, crow, col, dvals, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return csr_sdd_avx2(dy, B, out, d0, d1, x, in, x0, x1, crow, col, dvals, nthreads);
#endif
  csr_sdd_portable(dy, B, out, d0, d1, x, in, x0, x1, crow, col, dvals, nthreads);
}

void csr_backward(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in,
                  int64_t x0, int64_t x1, const float* vals, const int32_t* crow, const int32_t* col,
                  const int32_t* t_crow, const int32_t* t_row, const int32_t* t_perm, float* dx, float* dvals,
                  int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512)
    return csr_backward_avx512(dy, B, out, d0, d1, x, in, x0, x1, vals, crow, col, t_crow, t_row, t_perm, dx, dvals,
                             nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2)
    return csr_backward_avx2(dy, B, out, d0, d1, x, in, x0, x1, vals, crow, col, t_crow, t_row, t_perm, dx, dvals,
                             nthreads);
#endif
  csr_backward_portable(dy, B, out, d0, d1, x, in, x0, x1, vals, crow, col, t_crow, t_row, t_perm, dx, dvals,
                        nthreads);
}

void fewbit_pack(const void* x, FewbitDtype dt, int64_t n, const float* borders, int bits, uint32_t* codes,
                 int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return fewbit_pack_avx512(x, dt, n, borders, bits, codes, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return fewbit_pack_avx2(x, dt, n, borders, bits, codes, nthreads);
#endif
  fewbit_pack_portable(x, dt, n, borders, bits, codes, nthreads);
}

void fewbit_pack_fused(const void* x, FewbitDtype dt, int64_t n, const float* borders, int bits, uint32_t* codes,
                       FewbitFused kind, double a, double b, void* y, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512)
    return fewbit_pack_fused_avx512(x, dt, n, borders, bits, codes, kind, a, b, y, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2)
    return fewbit_pack_fused_avx2(x, dt, n, borders, bits, codes, kind, a, b, y, nthreads);
#endif
  fewbit_pack_fused_portable(x, dt, n, borders, bits, codes, kind, a, b, y, nthreads);
}

void fewbit_unpack(const void* grad, FewbitDtype dt, const uint32_t* codes, int64_t n, const float* levels, int bits,
                   void* out, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return fewbit_unpack_avx512(grad, dt, codes, n, levels, bits, out, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return fewbit_unpack_avx2(grad, dt, codes, n, levels, bits, out, nthreads);
#endif
  fewbit_unpack_portable(grad, dt, codes, n, levels, bits, out, nthreads);
}

void nm_spmm(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals, const int32_t* perm,
             const uint8_t* idx, int n, int m, int64_t rows, const float* bias, float* y, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return nm_spmm_avx512(a, B, K, s0, s1, vals, perm, idx, n, m, rows, bias, y, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return nm_spmm_avx2(a, B, K, s0, s1, vals, perm, idx, n, m, rows, bias, y, nthreads);
#endif
  nm_spmm_portable(a, B, K, s0, s1, vals, perm, idx, n, m, rows, bias, y, nthreads);
}

bool nm_spmm_checked(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals,
                     const uint8_t* idx, int n, int m, int64_t rows, const float* bias, float* y, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return nm_spmm_checked_avx512(a, B, K, s0, s1, vals, idx, n, m, rows, bias, y, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return nm_spmm_checked_avx2(a, B, K, s0, s1, vals, idx, n, m, rows, bias, y, nthreads);
#endif
  return nm_spmm_checked_portable(a, B, K, s0, s1, vals, idx, n, m, rows, bias, y, nthreads);
}

bool nm_spmm16_checked(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const uint16_t* vals, bool bf16,
                       const uint8_t* idx, int n, int m, int64_t rows, const float* bias, float* y, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512)
    return nm_spmm16_checked_avx512(a, B, K, s0, s1, vals, bf16, idx, n, m, rows, bias, y, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2)
    return nm_spmm16_checked_avx2(a, B, K, s0, s1, vals, bf16, idx, n, m, rows, bias, y, nthreads);
#endif
  return nm_spmm16_checked_portable(a, B, K, s0, s1, vals, bf16, idx, n, m, rows, bias, y, nthreads);
}

void nm_spmm16(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const uint16_t* vals, bool bf16,
               const uint8_t* idx, int n, int m, int64_t rows, const float* bias, float* y, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512)
    return nm_spmm16_avx512(a, B, K, s0, s1, vals, bf16, idx, n, m, rows, bias, y, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2)
    return nm_spmm16_avx2(a, B, K, s0, s1, vals, bf16, idx, n, m, rows, bias, y, nthreads);
#endif
  nm_spmm16_portable(a, B, K, s0, s1, vals, bf16, idx, n, m, rows, bias, y, nthreads);
}

void nm_sdd(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in, int64_t x0,
            int64_t x1, const uint8_t* idx, int n, int m, float* dvals, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return nm_sdd_avx512(dy, B, out, d0, d1, x, in, x0, x1, idx, n, m, dvals, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return nm_sdd_avx2(dy, B, out, d0, d1, x, in, x0, x1, idx, n, m, dvals, nthreads);
#endif
  nm_sdd_portable(dy, B, out, d0, d1, x, in, x0, x1, idx, n, m, dvals, nthreads);
}

void bsr_dds(const float* x, int64_t B, int64_t ldx, const float* vals, const int32_t* crow, const int32_t* col,
             int64_t nbr, int b, const float* bias, float* y, int64_t ldy, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return bsr_dds_avx512(x, B, ldx, vals, crow, col, nbr, b, bias, y, ldy, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return bsr_dds_avx2(x, B, ldx, vals, crow, col, nbr, b, bias, y, ldy, nthreads);
#endif
  bsr_dds_portable(x, B, ldx, vals, crow, col, nbr, b, bias, y, ldy, nthreads);
}

void bsr_dsd(const float* dy, int64_t B, int64_t ldd, const float* vals, const int32_t* t_crow, const int32_t* t_row,
             const int32_t* t_perm, int64_t nbc, int b, float* dx, int64_t ldx, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512)
    return bsr_dsd_avx512(dy, B, ldd, vals, t_crow, t_row, t_perm, nbc, b, dx, ldx, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2)
    return bsr_dsd_avx2(dy, B, ldd, vals, t_crow, t_row, t_perm, nbc, b, dx, ldx, nthreads);
#endif
  bsr_dsd_portable(dy, B, ldd, vals, t_crow, t_row, t_perm, nbc, b, dx, ldx, nthreads);
}

void bsr_sdd(const float* dy, int64_t B, int64_t ldd, const float* x, int64_t ldx, const int32_t* row,
             const int32_t* col, int64_t nblk, int b, float* dvals, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return bsr_sdd_avx512(dy, B, ldd, x, ldx, row, col, nblk, b, dvals, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return bsr_sdd_avx2(dy, B, ldd, x, ldx, row, col, nblk, b, dvals, nthreads);
#endif
  bsr_sdd_portable(dy, B, ldd, x, ldx, row, col, nblk, b, dvals, nthreads);
}

int64_t act_gemv(const float* x, int64_t T, int64_t K, int64_t ldx, ActSel sel, const float* wt, int64_t N,
                 const float* bias, float* y, int64_t ldy, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return act_gemv_avx512(x, T, K, ldx, sel, wt, N, bias, y, ldy, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return act_gemv_avx2(x, T, K, ldx, sel, wt, N, bias, y, ldy, nthreads);
#endif
  return act_gemv_portable(x, T, K, ldx, sel, wt, N, bias, y, ldy, nthreads);
}

int64_t act_gemv16(const float* x, int64_t T, int64_t K, int64_t ldx, ActSel sel, const uint16_t* wt, bool bf16,
                   int64_t N, const float* bias, float* y, int64_t ldy, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return act_gemv16_avx512(x, T, K, ldx, sel, wt, bf16, N, bias, y, ldy, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return act_gemv16_avx2(x, T, K, ldx, sel, wt, bf16, N, bias, y, ldy, nthreads);
#endif
  return act_gemv16_portable(x, T, K, ldx, sel, wt, bf16, N, bias, y, ldy, nthreads);
}

int64_t act_spmm(const float* x, int64_t B, int64_t K, int64_t ldx, ActSel sel, const float* wt, int64_t N,
                 const float* bias, float* y, int64_t ldy, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return act_spmm_avx512(x, B, K, ldx, sel, wt, N, bias, y, ldy, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return act_spmm_avx2(x, B, K, ldx, sel, wt, N, bias, y, ldy, nthreads);
#endif
  return act_spmm_portable(x, B, K, ldx, sel, wt, N, bias, y, ldy, nthreads);
}

void act_dsd(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K, int64_t ldx, ActSel sel,
             const float* wt, float* dx, int64_t lddx, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return act_dsd_avx512(dy, B, N, ldd, x, K, ldx, sel, wt, dx, lddx, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return act_dsd_avx2(dy, B, N, ldd, x, K, ldx, sel, wt, dx, lddx, nthreads);
#endif
  act_dsd_portable(dy, B, N, ldd, x, K, ldx, sel, wt, dx, lddx, nthreads);
}

void act_sdd(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K, int64_t ldx, ActSel sel,
             float* dwt, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512) return act_sdd_avx512(dy, B, N, ldd, x, K, ldx, sel, dwt, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return act_sdd_avx2(dy, B, N, ldd, x, K, ldx, sel, dwt, nthreads);
#endif
  act_sdd_portable(dy, B, N, ldd, x, K, ldx, sel, dwt, nthreads);
}

void act_backward(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K, int64_t ldx,
                  ActSel sel, const float* wt, float* dx, int64_t lddx, float* dwt, int nthreads) {
#if defined(SPARSEOPS_HAVE_AVX512)
  if (active_isa() == Isa::avx512)
    return act_backward_avx512(dy, B, N, ldd, x, K, ldx, sel, wt, dx, lddx, dwt, nthreads);
#endif
#if defined(SPARSEOPS_HAVE_AVX2)
  if (active_isa() == Isa::avx2) return act_backward_avx2(dy, B, N, ldd, x, K, ldx, sel, wt, dx, lddx, dwt, nthreads);
#endif
  act_backward_portable(dy, B, N, ldd, x, K, ldx, sel, wt, dx, lddx, dwt, nthreads);
}

}  // namespace sparseops
