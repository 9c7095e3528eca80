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

  // one row; in and out may alias (the scratch path); beta = (1 - alpha) / N
  template <class VV>
  static CDM_INLINE void row(const Args& a, const Decay& d, double beta, const typename VV::T* in,
                             typename VV::T* out) {
    using T = typename VV::T;
    const int64_t n = a.n, m = n - 1, full = n / VV::L * VV::L;
    const T alpha = static_cast<T>(d.alpha);
    const T vm = in[m];
    T shift;
    if (a.family == UNIFORM || a.transpose) {
      const int64_t upto = a.family == UNIFORM ? n : m;  // absorbing K^T: real tokens only
      const int64_t vfull = upto / VV::L * VV::L;
      double sum;
      if (upto <= 4 * VV::L) {  // a short row: one vector register of partial sums
        typename VV::V acc{};
        for (int64_t i = 0; i < vfull; i += VV::L) acc += VV::load(in + i);
        T tail = T(0);
        for (int64_t i = vfull; i < upto; ++i) tail += in[i];
        sum = static_cast<double>(vec::hsum(acc) + tail);
      } else {
        typename VV::Acc acc;
        for (int64_t i = 0; i < vfull; i += VV::L) acc.add(VV::load(in + i));
        sum = acc.sum();
        for (int64_t i = vfull; i < upto; ++i) sum += static_cast<double>(in[i]);
      }
      shift = a.family == UNIFORM ? static_cast<T>(beta * sum) : T(0);
      const T mask_value = vm + static_cast<T>(d.one_minus_alpha * sum);
      for (int64_t i = 0; i < full; i += VV::L) VV::store(out + i, VV::load(in + i) * alpha + shift);
      for (int64_t i = full; i < n; ++i) out[i] = in[i] * alpha + shift;
      if (a.family == ABSORBING) out[m] = mask_value;
    } else {  // absorbing, K v
      shift = static_cast<T>(d.one_minus_alpha) * vm;
      for (int64_t i = 0; i < full; i += VV::L) VV::store(out + i, VV::load(in + i) * alpha + shift);
      for (int64_t i = full; i < n; ++i) out[i] = in[i] * alpha + shift;
      out[m] = vm;
    }
  }

  template <class VV>
  static CDM_INLINE void rows(const Args& a, int64_t b, int64_t e) {
    using T = typename VV::T;
    const int64_t n = a.n;
    DecayCache dc;
    const bool direct = (std::is_same<T, float>::value && a.dt == DT::F32) ||
                        (std::is_same<T, double>::value && a.dt == DT::F64);
    if (direct) {  // straight from the input to the output
      const T* in = static_cast<const T*>(a.v);
      T* out = static_cast<T*>(a.out);
      for (int64_t p = b; p < e; ++p) {
        const Decay& d = dc(a.tau[p]);
        row<VV>(a, d, dc.beta(n), in + p * n, out + p * n);
      }
      return;
    }
    Scratch<T> scratch(n, 1);
    T* s = scratch.row(0);
    for (int64_t p = b; p < e; ++p) {
      load_row<VV>(a.v, a.dt, p, n, s, T(0));
      const Decay& d = dc(a.tau[p]);
      row<VV>(a, d, dc.beta(n), s, s);
      store_row<VV>(a.out, a.dt, p, n, s);
    }
  }
};

at::Tensor apply_kernel_cpu(int64_t family, const c10::optional<at::Tensor>& evals,
                            const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                            const at::Tensor& v, const at::Tensor& tau, bool transpose) {
  check_rows(v, "v");
  const int64_t positions = v.size(0), n = v.size(1);
  const Dense g = check_graph(family, evals, vecs, vecs_inv, n);
  check_positions(tau, "tau", positions, at::kDouble);
  at::Tensor out = empty_output_like(v);
  if (positions == 0) return out;
  const DT dt = dt_of(v);
  const double* tp = tau.data_ptr<double>();
  if (family != DENSE) {
    ApplyKernel::Args args{family, n, v.data_ptr(), dt, tp, transpose, out.data_ptr()};
    run_rows_of<ApplyKernel>(dt, args, positions, n);
    return out;
  }
  const int64_t block = dense_block_rows(n);
  const void* in = v.data_ptr();
  void* o = out.data_ptr();
  dense_blocks(positions, block, [&](int64_t b, int64_t e) {
    const int64_t rows = e - b;
    Scratch<double> buf(rows * n + W, 3);
    double *src = buf.row(0), *dst = buf.row(1), *work = buf.row(2);
    for (int64_t c = 0; c < rows; ++c) load_row<DenseVT>(in, dt, b + c, n, src + c * n, 0.0);
    dense_apply(g, src, tp + b, 1.0, rows, transpose, dst, work);
    for (int64_t c = 0; c < rows; ++c) store_row<DenseVT>(o, dt, b + c, n, dst + c * n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cdm_kernels, CPU, m) { m.impl("apply_kernel", &apply_kernel_cpu); }

}  // namespace cpu
}  // namespace cdm
