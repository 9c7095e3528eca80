// scores_to_posterior (+ backward) on CUDA: log p_0|t from log-scores.
// Kernels and pass structure: inversion.cuh. Dense graphs: float64 ATen (dense.cpp).
#include "cuda/inversion.cuh"

namespace cdm {
namespace gpu {

void launch_posterior_backward(int64_t family, const at::Tensor& log_score, const at::Tensor& second,
                               const float* grad_loss, const RowInputs& in, at::Tensor& out) {
  const bool aligned = is_aligned_rows(log_score) && is_aligned_rows(second) && is_aligned_rows(out);
  dispatch_rows(log_score.scalar_type(), aligned, in.n, [&]<class S, bool AL, int W>() {
    const InversionArgs<S> a{row_args(in, family, plan_smem<S, W>(in.n, /*stats=*/false, /*cache_rows=*/2)),
                             static_cast<const S*>(log_score.data_ptr()), static_cast<const S*>(second.data_ptr()),
                             grad_loss, static_cast<S*>(out.data_ptr()), grad_loss != nullptr ? 1 : 0};
    launch_rows<W>(&posterior_backward_kernel<S, AL, W>, a);
  });
}

namespace {

at::Tensor scores_to_posterior_cuda(int64_t family, const c10::optional<at::Tensor>& evals,
                                    const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                                    const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau) {
  CDM_DEVICE_GUARD(log_score);
  const RowInputs in = check_row_inputs(family, log_score, "log_score", x, tau);
  if (family == DENSE) {
    const dense::Eigen eg = check_dense(evals, vecs, vecs_inv, in.n, log_score.device());
    return dense::log_posterior(eg, log_score, in.x, in.tau).log_q.to(log_score.scalar_type());
  }
  at::Tensor out = at::empty_like(log_score);
  if (in.positions == 0) return out;
  ValueChecks checks(log_score, {"scores_to_posterior", "log_score", "x", "tau", nullptr}, in.n);
  const bool aligned = is_aligned_rows(log_score) && is_aligned_rows(out);
  dispatch_rows(log_score.scalar_type(), aligned, in.n, [&]<class S, bool AL, int W>() {
    const SmemPlan plan = plan_smem<S, W>(in.n, /*stats=*/false, /*cache_rows=*/1);
    const InversionArgs<S> a{row_args(in, family, plan, checks.record()), static_cast<const S*>(log_score.data_ptr()),
                             nullptr, nullptr, static_cast<S*>(out.data_ptr()), 0};
    launch_rows<W>(&posterior_forward_kernel<S, AL, W>, a);
  });
  checks.finish();
  return out;
}

at::Tensor scores_to_posterior_backward_cuda(int64_t family, const c10::optional<at::Tensor>& evals,
                                             const c10::optional<at::Tensor>& vecs,
                                             const c10::optional<at::Tensor>& vecs_inv, const at::Tensor& grad,
                                             const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau) {
  CDM_DEVICE_GUARD(log_score);
  const RowInputs in = check_row_inputs(family, log_score, "log_score", x, tau);
  check_rows_like(grad, log_score, "grad");
  if (family == DENSE) {
    const dense::Eigen eg = check_dense(evals, vecs, vecs_inv, in.n, log_score.device());
    return dense::posterior_backward(eg, grad, log_score, in.x, in.tau).to(log_score.scalar_type());
  }
  at::Tensor out = at::empty_like(log_score);
  if (in.positions == 0) return out;
  const at::Tensor g = grad.to(log_score.scalar_type()).contiguous();  // no copy when it already matches
  launch_posterior_backward(family, log_score, g, nullptr, in, out);
  return out;
}

}  // namespace

CDM_CUDA_IMPL(m) {
  m.impl("scores_to_posterior", &scores_to_posterior_cuda);
  m.impl("scores_to_posterior_backward", &scores_to_posterior_backward_cuda);
}

}  // namespace gpu
}  // namespace cdm
