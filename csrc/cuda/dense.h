// Dense graphs (family 2) for the CUDA backend: float64 ATen code on the rows' device
// (cuBLAS GEMMs through the eigenbasis Q = V diag(lambda) V^-1, elementwise ops), so it
// runs on the current stream with no host synchronisation. It mirrors reference.py
// operation by operation; dense graphs are small-N objects (a few hundred states) whose
// cost is the O(N^2) per position of the GEMMs, which cuBLAS does well.
// Inputs: x (P,) int64, tau (P,) float64 on the same device as the eigen tensors.
#pragma once

#include <ATen/ATen.h>

namespace cdm {
namespace gpu {
namespace dense {

struct Eigen {
  at::Tensor evals, vecs, vecs_inv;  // (N,), (N, N), (N, N) float64, contiguous, on the rows' device
};

// K(tau_p)[:, x_p] for every p: (P, N) float64, clamped at 0 (rounding leaves -1e-17 for a true 0)
at::Tensor column(const Eigen& g, const at::Tensor& x, const at::Tensor& tau);

// K(tau)^T v (transpose) or K(tau) v, row by row; v (P, N) float64
at::Tensor apply(const Eigen& g, const at::Tensor& v, const at::Tensor& tau, bool transpose);

// log p_0|t (float64, (P, N)) and the intermediates its backward needs
struct Posterior {
  at::Tensor log_q;     // normalised log conditional, -inf at structural zeros
  at::Tensor ratios;    // r = exp(log_score' - M), log_score' = log_score with 0 at x
  at::Tensor inverted;  // K(-tau)^T r before the clamp
  at::Tensor shift;     // M, (P, 1)
};
Posterior log_posterior(const Eigen& g, const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau);

// d<grad, log q>/d log_score (float64), grad (P, N) any float dtype
at::Tensor posterior_backward(const Eigen& g, const at::Tensor& grad, const at::Tensor& log_score, const at::Tensor& x,
                              const at::Tensor& tau);

// P(x_s = y | x_t = x) of one reverse step (float64, rows sum to 1); method 0 analytic, 1 euler
at::Tensor step_probabilities(const Eigen& g, const at::Tensor& log_score, const at::Tensor& x,
                              const at::Tensor& tau_t, const at::Tensor& tau_s, int64_t method);

// per-position cross-entropy (float32)
at::Tensor conditional_matching_loss(const Eigen& g, const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau,
                         const at::Tensor& target);
at::Tensor matching_loss_backward(const Eigen& g, const at::Tensor& grad_loss, const at::Tensor& log_score,
                                  const at::Tensor& x, const at::Tensor& tau, const at::Tensor& target);

// log r from log p_0|t (float64) and its backward
at::Tensor posterior_to_scores(const Eigen& g, const at::Tensor& log_p0, const at::Tensor& x, const at::Tensor& tau);
at::Tensor posterior_to_scores_backward(const Eigen& g, const at::Tensor& grad, const at::Tensor& log_p0,
                                        const at::Tensor& x, const at::Tensor& tau);

}  // namespace dense
}  // namespace gpu
}  // namespace cdm
