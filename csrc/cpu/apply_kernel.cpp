// apply_kernel on the CPU: K(tau)^T v (transpose) or K(tau) v, row by row; v's dtype out.
//
//   uniform   (symmetric)  alpha v + beta (sum v) 1
//   absorbing  K^T v:      alpha v_a on real tokens; v_m + (1 - alpha) sum_{a<m} v_a on the mask
//              K v:        alpha v_a + (1 - alpha) v_m on real tokens; v_m on the mask
//   dense                  through the eigenbasis, float64 (dense.cpp)
// A negative tau applies the inverse kernel. Sums accumulate in float64 lanes; 16-bit
// inputs are computed in float32 and rounded once at the end.
#include "cpu/cpu_common.h"

namespace cdm {
namespace cpu {
namespace {

struct ApplyKernel {
  struct Args {
    int64_t family, n;
    const void* v;
    DT dt;
    const double* tau;
    bool transpose;
    void* out;
  };

  template <class T>
  static CDM_INLINE void rows(const Args& a, int64_t b, int64_t e) {
    using VV = VT<T>;
    using V = typename VV::V;
    const int64_t n = a.n, np = round_up(n), m = n - 1;
    Scratch<T> scratch(n, 1);
    T* s = scratch.row(0);
    for (int64_t p = b; p < e; ++p) {
      load_row<T>(a.v, a.dt, p, n, s, T(0));
      const Decay d = decay(a.tau[p]);
      const T alpha = static_cast<T>(d.alpha);
      if (a.family == UNIFORM || a.transpose) {
        const T vm = s[m];
        if (a.family == ABSORBING) s[m] = T(0);  // sum over real tokens only
        vec::vd acc{};
        for (int64_t i = 0; i < np; i += W) acc += VV::wide(VV::load(s + i));
        const double sum = vec::hsum(acc);
        if (a.family == UNIFORM) {
          const T shift = static_cast<T>(d.one_minus_alpha / static_cast<double>(n) * sum);
          for (int64_t i = 0; i < np; i += W) VV::store(s + i, VV::load(s + i) * alpha + shift);
        } else {
          for (int64_t i = 0; i < np; i += W) VV::store(s + i, VV::load(s + i) * alpha);
          s[m] = vm + static_cast<T>(d.one_minus_alpha * sum);
        }
      } else {  // absorbing, K v
        const T vm = s[m];
        const T shift = static_cast<T>(d.one_minus_alpha) * vm;
        for (int64_t i = 0; i < np; i += W) VV::store(s + i, VV::load(s + i) * alpha + shift);
        s[m] = vm;
      }
      store_row<T>(a.out, a.dt, p, n, s);
    }
    (void)sizeof(V);
  }
};

at::Tensor apply_kernel_cpu(int64_t family, const c10::optional<at::Tensor>& evals,
                            const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                            const at::Tensor& v, const at::Tensor& tau, bool transpose) {
  check_rows(v, "v");
  const int64_t positions = v.size(0), n = v.size(1);
  const Dense g = check_graph(family, evals, vecs, vecs_inv, n);
  check_positions(tau, "tau", positions, at::kDouble);
  at::Tensor out = at::empty_like(v);
  if (positions == 0) return out;
  const DT dt = dt_of(v);
  const double* tp = tau.data_ptr<double>();
  if (family != DENSE) {
    ApplyKernel::Args args{family, n, v.data_ptr(), dt, tp, transpose, out.data_ptr()};
    if (dt == DT::F64) {
      run_rows<ApplyKernel, double>(args, positions, row_grain(n));
    } else {
      run_rows<ApplyKernel, float>(args, positions, row_grain(n));
    }
    return out;
  }
  const int64_t block = dense_block_rows(n);
  const void* in = v.data_ptr();
  void* o = out.data_ptr();
  dense_blocks(positions, block, [&](int64_t b, int64_t e) {
    const int64_t rows = e - b;
    Scratch<double> buf(rows * n + W, 3);
    double *src = buf.row(0), *dst = buf.row(1), *work = buf.row(2);
    for (int64_t c = 0; c < rows; ++c) load_row<double>(in, dt, b + c, n, src + c * n, 0.0);
    dense_apply(g, src, tp + b, 1.0, rows, transpose, dst, work);
    for (int64_t c = 0; c < rows; ++c) store_row<double>(o, dt, b + c, n, dst + c * n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cdm_kernels, CPU, m) { m.impl("apply_kernel", &apply_kernel_cpu); }

}  // namespace cpu
}  // namespace cdm
