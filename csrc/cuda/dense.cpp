// Dense graphs for the CUDA backend (see dense.h): float64 ATen code, mirroring
// reference.py. Compiled only into CUDA builds (and the CPU emulation of the CUDA
// kernels); a CPU-only build sees an empty file.
#if defined(CDM_WITH_CUDA) || defined(CDM_CUDA_EMULATE)

#include "cuda/dense.h"

#include <limits>

#include "graph.h"

namespace cdm {
namespace gpu {
namespace dense {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

at::Tensor safe_log(const at::Tensor& p) {
  const at::Tensor positive = p > 0;
  return at::where(positive, at::where(positive, p, 1.0).log(), -kInf);
}

at::Tensor decay(const Eigen& g, const at::Tensor& tau) { return at::exp(tau.unsqueeze(-1) * g.evals.unsqueeze(0)); }

// the clamp floor of the inversion: POSTERIOR_FLOOR r_x on the shifted scale, never below the
// smallest normal double (reference.py)
at::Tensor floor_of(const at::Tensor& shift) {
  return (at::exp(-shift) * POSTERIOR_FLOOR).clamp_min(std::numeric_limits<double>::min());
}

at::Tensor one_hot_rows(const at::Tensor& x, int64_t n) {
  return at::zeros({x.size(0), n}, x.options().dtype(at::kDouble)).scatter_(1, x.unsqueeze(-1), 1.0);
}

// Q[y, x_p] for every p, rebuilt from the eigen-decomposition; entries below 1e-12 max|Q|
// are exact zeros of the generator that rounding would otherwise turn into tiny rates.
at::Tensor rate_column(const Eigen& g, const at::Tensor& x) {
  const at::Tensor q = at::matmul(g.vecs * g.evals.unsqueeze(0), g.vecs_inv);
  const at::Tensor scale = q.abs().max();  // a 0-dim device tensor: no host synchronisation
  const at::Tensor clean = at::where(q.abs() < scale * 1e-12, at::zeros_like(q), q);
  return clean.index_select(1, x).t().contiguous();  // (P, N): row p is Q[:, x_p]
}

}  // namespace

at::Tensor column(const Eigen& g, const at::Tensor& x, const at::Tensor& tau) {
  // K[a, x] = sum_k V[a, k] e^{tau lambda_k} V^-1[k, x]
  const at::Tensor w = g.vecs_inv.t().index_select(0, x) * decay(g, tau);
  return at::matmul(w, g.vecs.t()).clamp_min(0);
}

at::Tensor apply(const Eigen& g, const at::Tensor& v, const at::Tensor& tau, bool transpose) {
  if (transpose) return at::matmul(at::matmul(v, g.vecs) * decay(g, tau), g.vecs_inv);  // V^-T diag V^T v
  return at::matmul(at::matmul(v, g.vecs_inv.t()) * decay(g, tau), g.vecs.t());      // V diag V^-1 v
}

Posterior log_posterior(const Eigen& g, const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau) {
  Posterior out;
  const at::Tensor ls = log_score.to(at::kDouble).scatter(1, x.unsqueeze(-1), 0.0);  // r_x := 1
  out.shift = std::get<0>(ls.max(1, /*keepdim=*/true));
  out.ratios = at::exp(ls - out.shift);
  out.inverted = apply(g, out.ratios, -tau, /*transpose=*/true);
  const at::Tensor clamped = at::maximum(out.inverted, floor_of(out.shift));
  const at::Tensor log_q = safe_log(column(g, x, tau)) + clamped.log();
  out.log_q = log_q - at::logsumexp(log_q, {1}, /*keepdim=*/true);
  return out;
}

at::Tensor posterior_backward(const Eigen& g, const at::Tensor& grad, const at::Tensor& log_score, const at::Tensor& x,
                              const at::Tensor& tau) {
  const Posterior post = log_posterior(g, log_score, x, tau);
  const at::Tensor gr = grad.to(at::kDouble);
  // through the normalisation: dL/d(log q before it) = g - q sum(g)
  const at::Tensor dl = gr - at::exp(post.log_q) * gr.sum(1, /*keepdim=*/true);
  // through the clamp (torch.maximum: half the gradient on a tie) and the log
  const at::Tensor floor = floor_of(post.shift);
  const at::Tensor u = post.inverted;
  const at::Tensor w = at::where(u > floor, 1.0, at::where(u == floor, 0.5, 0.0));
  const at::Tensor du = at::where(w != 0, w * dl / at::maximum(u, floor), 0.0);
  // u = K(-tau)^T r, so dL/dr = K(-tau) dL/du; r = exp(log_score' - M) with r_x := 1 no input
  at::Tensor dr = apply(g, du, -tau, /*transpose=*/false) * post.ratios;
  return dr.scatter(1, x.unsqueeze(-1), 0.0);
}

at::Tensor step_probabilities(const Eigen& g, const at::Tensor& log_score, const at::Tensor& x,
                              const at::Tensor& tau_t, const at::Tensor& tau_s, int64_t method) {
  const at::Tensor log_q = log_posterior(g, log_score, x, tau_t).log_q;
  const at::Tensor delta = tau_t - tau_s;
  at::Tensor probs;
  if (method == 0) {  // analytic: K(Delta)[:, x] * K(tau_s)^T (q / K(tau_t)[:, x])
    const at::Tensor log_col = safe_log(column(g, x, tau_t));
    const at::Tensor weights = at::where(log_q > -kInf, at::exp(log_q - log_col.clamp_min(-1e30)), 0.0);
    probs = column(g, x, delta) * apply(g, weights, tau_s, /*transpose=*/true);
  } else {  // euler: Delta Q[y, x] r_y off x, the rest on x; p_0|t where tau_s = 0
    const at::Tensor jump = delta.unsqueeze(-1) * rate_column(g, x).clamp_min(0);
    const at::Tensor logits = at::where(jump > 0, safe_log(jump) + log_score.to(at::kDouble), -kInf);
    const at::Tensor scale = std::get<0>(logits.max(1, /*keepdim=*/true)).clamp_min(0);
    const at::Tensor jumps = at::exp(logits - scale);
    const at::Tensor stay = (at::exp(-scale) - jumps.sum(1, /*keepdim=*/true)).clamp_min(0);
    probs = jumps + stay * one_hot_rows(x, log_score.size(1));
    probs = at::where((tau_s == 0).unsqueeze(-1), at::exp(log_q), probs);
  }
  probs = probs.clamp_min(0);
  return probs / probs.sum(1, /*keepdim=*/true);
}

at::Tensor conditional_matching_loss(const Eigen& g, const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau,
                         const at::Tensor& target) {
  const at::Tensor log_q = log_posterior(g, log_score, x, tau).log_q;
  const at::Tensor t = target.to(log_score.scalar_type()).to(at::kDouble);  // reference: target in log_q's dtype
  return (-at::where(t > 0, t * log_q, 0.0).sum(1)).to(at::kFloat);
}

at::Tensor matching_loss_backward(const Eigen& g, const at::Tensor& grad_loss, const at::Tensor& log_score,
                                  const at::Tensor& x, const at::Tensor& tau, const at::Tensor& target) {
  const at::Tensor t = target.to(log_score.scalar_type()).to(at::kDouble);
  const at::Tensor grad = at::where(t > 0, -t, 0.0) * grad_loss.to(at::kDouble).unsqueeze(-1);
  return posterior_backward(g, grad, log_score, x, tau);
}

at::Tensor posterior_to_scores(const Eigen& g, const at::Tensor& log_p0, const at::Tensor& x, const at::Tensor& tau) {
  const at::Tensor log_col = safe_log(column(g, x, tau));
  const at::Tensor lq = log_p0.to(at::kDouble);
  const at::Tensor u = at::where(lq > -kInf, at::exp(lq - log_col.clamp_min(-1e30)), 0.0);
  return safe_log(apply(g, u, tau, /*transpose=*/true));
}

at::Tensor posterior_to_scores_backward(const Eigen& g, const at::Tensor& grad, const at::Tensor& log_p0,
                                        const at::Tensor& x, const at::Tensor& tau) {
  const at::Tensor log_col = safe_log(column(g, x, tau));
  const at::Tensor lq = log_p0.to(at::kDouble);
  const at::Tensor u = at::where(lq > -kInf, at::exp(lq - log_col.clamp_min(-1e30)), 0.0);
  const at::Tensor r = apply(g, u, tau, /*transpose=*/true);
  const at::Tensor gr = at::where(r > 0, grad.to(at::kDouble) / r, 0.0);  // d log r / d r (0 where log 0)
  const at::Tensor du = apply(g, gr, tau, /*transpose=*/false);           // r = K^T u: dL/du = K dL/dr
  return at::where(lq > -kInf, u * du, 0.0);
}

}  // namespace dense
}  // namespace gpu
}  // namespace cdm

#endif  // CDM_WITH_CUDA || CDM_CUDA_EMULATE
