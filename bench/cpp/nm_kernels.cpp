// A standalone timing harness over the N:M kernels (and the CSR walk of a plain N:M input gradient), no
// torch and no Python: it includes csrc/nm_impl.h and calls the AVX2 instantiations directly. The round's
// op-level A/B figures in README.md's N:M section come from it, built twice (the old and the new csrc)
// and alternated by bench/cpp/ab.sh.
//
//   g++ -O3 -fno-math-errno -mavx2 -mfma -mf16c -DSPARSEOPS_AVX2 -fopenmp -Icsrc bench/cpp/nm_kernels.cpp -o nmk
//   ./nmk N M OP [REPS]     OP: fwd (y = x Wᵀ), dw (the weight gradient on the slots), dx (dX through Wᵀ's
//                           CSR), dxt (dX through Wᵀ's N:M index; TR=1). Prints the best of REPS calls.
//   env: BB batch (256), KK in = out (4096), TR=1 a transposable 2:4 mask, CHK=1 a checksum of the outputs
//        (equal between two builds of the same op: both computed the same thing).
// 2 threads, as the Python benches.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "nm_impl.h"

namespace sparseops {
bool scratch_fails() noexcept { return false; }  // dispatch.cpp's tests-only switch, not linked here
}  // namespace sparseops

#include <chrono>
#include <random>
#include <cstdio>
#include <cstring>
using namespace sparseops;
int main(int argc, char** argv) {
  int n = atoi(argv[1]), m = atoi(argv[2]); const char* op = argv[3]; int reps = argc > 4 ? atoi(argv[4]) : 10;
  int nt = 2;
  int64_t B = getenv("BB") ? atoi(getenv("BB")) : 256, K = getenv("KK") ? atoi(getenv("KK")) : 4096, O = K;
  if (getenv("TR") && !(n == 2 && m == 4)) throw std::invalid_argument("TR=1: only 2:4");
  detail::NmShape d(n, m, K);
  std::mt19937 g(0);
  std::vector<float> x(B * K), dy(B * O), vals(O * d.S), y(B * O), dv(O * d.S);
  std::uniform_real_distribution<float> u(-1, 1);
  for (auto& t : x) t = u(g);
  for (auto& t : dy) t = u(g);
  for (auto& t : vals) t = u(g);
  std::vector<uint8_t> idx(O * d.Sb, 0);
  const bool tr = getenv("TR");
  std::vector<int32_t> t_slot; std::vector<uint8_t> t_idx;
  if (tr) {
    // 2:4 in both directions: in each 4x4 block rows i take columns s(i), s(i+1) of a random permutation s
    std::vector<int> colsel(O * K, -1);
    for (int64_t bo = 0; bo < O / 4; ++bo) for (int64_t bk = 0; bk < K / 4; ++bk) {
      int p[4] = {0, 1, 2, 3}; std::shuffle(p, p + 4, g);
      for (int i = 0; i < 4; ++i) { colsel[(bo*4+i)*K + bk*4 + p[i]] = 1; colsel[(bo*4+i)*K + bk*4 + p[(i+1)%4]] = 1; }
    }
    for (int64_t o = 0; o < O; ++o) { int64_t j = 0; for (int64_t k = 0; k < K; ++k) if (colsel[o*K+k] > 0) {
      idx[o * d.Sb + j / 2] |= (k % 4) << (4 * (j & 1)); colsel[o*K+k] = o * d.S + j; ++j; } }
    t_idx.assign(K * d.Sb, 0); t_slot.assign(K * d.S, -1);
    for (int64_t k = 0; k < K; ++k) { int64_t j = 0; for (int64_t o = 0; o < O; ++o) if (colsel[o*K+k] >= 0) {
      t_idx[k * d.Sb + j / 2] |= (o % 4) << (4 * (j & 1)); t_slot[k * d.S + j] = colsel[o*K+k]; ++j; } }
  }
  for (int64_t o = 0; o < O && !tr; ++o)
    for (int64_t gi = 0; gi < d.G; ++gi) {
      int p[16]; for (int i = 0; i < m; ++i) p[i] = i;
      std::shuffle(p, p + m, g); std::sort(p, p + n);
      for (int s = 0; s < n; ++s) { int64_t j = gi * n + s; idx[o * d.Sb + j / 2] |= p[s] << (4 * (j & 1)); }
    }
  // W^T CSR: rows = input columns, entries sorted by output row
  std::vector<int32_t> t_crow(K + 1, 0), t_row, t_perm;
  {
    std::vector<std::vector<std::pair<int32_t,int32_t>>> cols(K);
    for (int64_t o = 0; o < O; ++o) for (int64_t j = 0; j < d.S; ++j) {
      int64_t c = (j / n) * m + ((idx[o * d.Sb + j / 2] >> (4 * (j & 1))) & 15);
      if (c < K) cols[c].push_back({(int32_t)o, (int32_t)(o * d.S + j)});
    }
    for (int64_t c = 0; c < K; ++c) { t_crow[c + 1] = t_crow[c] + cols[c].size(); for (auto& pr : cols[c]) { t_row.push_back(pr.first); t_perm.push_back(pr.second); } }
  }
  std::vector<float> dx(B * K);
  auto run = [&] {
    if (!strcmp(op, "fwd"))
      detail::nm_spmm<VecAVX2>(x.data(), B, K, K, 1, vals.data(), nullptr, idx.data(), n, m, O, nullptr, y.data(), nt);
    else if (!strcmp(op, "dw"))
      detail::nm_sdd<VecAVX2>(dy.data(), B, O, O, 1, x.data(), K, K, 1, idx.data(), n, m, dv.data(), nt);
    else if (!strcmp(op, "dx"))  // through the CSR of Wᵀ, as a plain N:M layer's input gradient
      detail::spmm<VecAVX2>(dy.data(), B, O, O, 1, vals.data(), t_perm.data(), t_crow.data(), t_row.data(), K, nullptr,
                            dx.data(), nt);
    else if (!strcmp(op, "dxt") && tr)  // through Wᵀ's own N:M index, as a transposable layer's
      detail::nm_spmm<VecAVX2>(dy.data(), B, O, O, 1, vals.data(), t_slot.data(), t_idx.data(), n, m, K, nullptr,
                               dx.data(), nt);
    else
      throw std::invalid_argument("op: expected fwd, dw, dx or dxt (dxt with TR=1)");
  };
  run();
  double best = 1e9;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now(); run();
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, ms);
  }
  double gf = 2.0 * B * O * d.S / best / 1e6;
  if (getenv("CHK")) { double cs = 0; for (auto t : dv) cs += t; for (auto t : y) cs += t; for (auto t : dx) cs += t; printf("cs %.6e\n", cs); }
  printf("%s %d:%d best %.2f ms  %.1f GF/s\n", op, n, m, best, gf);
}
