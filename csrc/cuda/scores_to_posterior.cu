// scores_to_posterior (+ backward) on CUDA: log p_0|t from log-scores.
// Kernels and pass structure: inversion.cuh. Dense graphs: float64 ATen (dense.cpp).
#include "cuda/inversion.cuh"

namespace cdm {
namespace gpu {

void launch_posterior_backward(int64_t family, const at::Tensor& log_score, const at::Tensor& second,
                               const float* grad_loss, const at::Tensor& x, const at::Tensor& tau, at::Tensor& out) {
  const int64_t positions = log_score.size(0), n = log_score.size(1);
  const bool aligned = is_aligned_rows(log_score) && is_aligned_rows(second) && is_aligned_rows(out);
  dispatch_rows(log_score.scalar_type(), aligned, n, [&](auto s_tag, auto al_tag, auto w_tag) {
    using S = decltype(s_tag);
    constexpr bool AL = decltype(al_tag)::value;
    constexpr int W = decltype(w_tag)::value;
    InversionArgs<S> a;
    a.ls = static_cast<const S*>(log_score.data_ptr());
    a.second = static_cast<const S*>(second.data_ptr());
    a.gl = grad_loss;
    a.x = x.data_ptr<int64_t>();
    a.tau = tau.data_ptr<double>();
    a.out = static_cast<S*>(out.data_ptr());
    a.positions = positions;
    a.n = n;
    a.family = family;
    a.from_target = grad_loss != nullptr ? 1 : 0;
    a.plan = plan_smem<S, W>(n, /*stats=*/false, /*cache_rows=*/2);
    launch_rows<W>(&posterior_backward_kernel<S, AL, W>, a, positions, a.plan);
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
  const bool aligned = is_aligned_rows(log_score) && is_aligned_rows(out);
  dispatch_rows(log_score.scalar_type(), aligned, in.n, [&](auto s_tag, auto al_tag, auto w_tag) {
    using S = decltype(s_tag);
    constexpr bool AL = decltype(al_tag)::value;
    constexpr int W = decltype(w_tag)::value;
    InversionArgs<S> a;
    a.ls = static_cast<const S*>(log_score.data_ptr());
    a.second = nullptr;
    a.gl = nullptr;
    a.x = in.x.data_ptr<int64_t>();
    a.tau = in.tau.data_ptr<double>();
    a.out = static_cast<S*>(out.data_ptr());
    a.positions = in.positions;
    a.n = in.n;
    a.family = family;
    a.from_target = 0;
    a.plan = plan_smem<S, W>(in.n, /*stats=*/false, /*cache_rows=*/1);
    launch_rows<W>(&posterior_forward_kernel<S, AL, W>, a, in.positions, a.plan);
  });
  return out;
}

at::Tensor scores_to_posterior_backward_cuda(int64_t family, const c10::optional<at::Tensor>& evals,
                                             const c10::optional<at::Tensor>& vecs,
                                             const c10::optional<at::Tensor>& vecs_inv, const at::Tensor& grad,
                                             const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau) {
  CDM_DEVICE_GUARD(log_score);
  const RowInputs in = check_row_inputs(family, log_score, "log_score", x, tau);
  check_rows(grad, "grad");
  TORCH_CHECK(grad.sizes() == log_score.sizes(), "cdm_kernels: grad must have shape ", log_score.sizes(), ", got ",
              grad.sizes());
  if (family == DENSE) {
    const dense::Eigen eg = check_dense(evals, vecs, vecs_inv, in.n, log_score.device());
    return dense::posterior_backward(eg, grad, log_score, in.x, in.tau).to(log_score.scalar_type());
  }
  at::Tensor out = at::empty_like(log_score);
  if (in.positions == 0) return out;
  const at::Tensor g = grad.to(log_score.scalar_type()).contiguous();  // no copy when it already matches
  launch_posterior_backward(family, log_score, g, nullptr, in.x, in.tau, out);
  return out;
}

}  // namespace

CDM_CUDA_IMPL(m) {
  m.impl("scores_to_posterior", &scores_to_posterior_cuda);
  m.impl("scores_to_posterior_backward", &scores_to_posterior_backward_cuda);
}

}  // namespace gpu
}  // namespace cdm
