// conditional_matching_loss (+ backward) on CUDA: per-position cross-entropy
// -sum_{t > 0} t log q of a target row against the inverted conditional, float32 out.
//
// Uniform: log q = log K[y, x] + log u - log Z, so
//   loss = (sum_{t>0} t) log Z - sum_{t>0} t (log K[y, x] + log u)
//   pass 1  m, s over y != x (log-scores; the row is cached in shared memory when it fits)
//   pass 2  U = sum u, A = sum_{t>0} t (log K + log u), T = sum_{t>0} t   (1 exp + 1 log / state)
// Absorbing: x != mask: 0, or inf when the target has mass off x (one pass over the target);
// x = mask: loss = T log s - sum_{t>0, y != mask} t (ls_y - m), inf with mass on the mask.
// The target is read in the log-scores' dtype (reference.py converts it to log q's dtype).
// Backward: the inversion backward of inversion.cuh with g = -grad_loss * target (t > 0).
// With its gradient (conditional_matching_loss_with_grad): the backward kernel at grad_loss = 1,
// its passes also summing the loss and checking the values (inversion.cuh), so the scores and
// the target are read once for both where the row is cached; dense graphs: the loss, then the
// backward (ATen).
#include "cuda/inversion.cuh"

namespace cdm {
namespace gpu {
namespace {

template <class S>
struct LossArgs : RowArgs {
  const S* ls;
  const S* target;
  float* out;  // (P,)
};

template <class S, bool AL, int W>
CDM_GLOBAL void CDM_BOUNDS(Group<W>::kBlock, min_blocks<S>()) loss_kernel(const LossArgs<S> a) {
  using C = typename Compute<S>::type;
  CDM_ROW_GROUP(a, g, p, gs);
  const int64_t n = a.n, x = a.x[p];
  const S* row = a.ls + p * n;
  const S* trow = a.target + p * n;
  const bool checked = a.errors != nullptr;
  int bad_rows = 0;
  TargetChecks<C> tc;  // the target's value checks, in the pass that reads it
  if (checked && g.tid == 0) check_position(a.errors, n, x, a.tau[p], nullptr);
  if (a.family == ABSORBING && x != n - 1) {  // q = e_x
    real_token_loss<S, AL, W>(g, row, trow, n, x, a.out + p, a.errors);
    return;
  }
  S* cache = cache_row<S>(gs, a.plan, 0);
  prefetch_row(g, row, n * static_cast<int64_t>(sizeof(S)), a.plan.l2_prefetch);
  prefetch_row(g, trow, n * static_cast<int64_t>(sizeof(S)), a.plan.l2_prefetch);  // read by pass 2
  double m, s;
  pass_max_sumexp<S, AL, W>(g, row, cache, n, x, nullptr, nullptr, m, s, NoExtra{}, checked ? &bad_rows : nullptr);
  if (bad_rows) flag_error(a.errors, kRowsNotFinite);
  const S* src = cache != nullptr ? cache : row;
  C acc_a = C(0), acc_t = C(0), acc_u = C(0);
  int bad = 0;
  if (a.family == ABSORBING) {  // x = mask: q = softmax over the real tokens, q(mask) = 0
    const C mc = static_cast<C>(m);
    read_segment_pairs<S, AL, W>(g, src, trow, n, nullptr, [&](int64_t seg, const S* lraw, const S* traw) {
      if (checked) tc.add(traw);
#pragma unroll
      for (int k = 0; k < kEPT; ++k) {
        const int64_t i = slot_index<AL>(seg, g.lane, k);
        const C t = to_compute<C>(traw[k]);
        if (i < n && t > C(0)) {
          if (i == x) {
            bad = 1;
          } else {
            acc_a += t * (to_compute<C>(lraw[k]) - mc);
            acc_t += t;
          }
        }
      }
    });
    const double A = g.sum(static_cast<double>(acc_a));
    const double T = g.sum(static_cast<double>(acc_t));
    bad = g.max(bad);
    if (g.tid == 0) a.out[p] = bad ? INFINITY : static_cast<float>(T * log(s) - A);
    if (checked) tc.flag(g, a.errors);
    return;
  }
  const UniformCoeffs c = uniform_coeffs(a.tau[p], n);
  const Inversion<C> inv = uniform_inversion<C>(m, s, c);
  const C log_off = static_cast<C>(log(c.off())), log_on = static_cast<C>(log(c.on()));
  read_segment_pairs<S, AL, W>(g, src, trow, n, nullptr, [&](int64_t seg, const S* lraw, const S* traw) {
    if (checked) tc.add(traw);
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t i = slot_index<AL>(seg, g.lane, k);
      if (i < n) {
        const C u = inv.u_of(i == x ? C(0) : to_compute<C>(lraw[k]));
        acc_u += u;
        const C t = to_compute<C>(traw[k]);
        if (t > C(0)) {  // 0 log 0 = 0
          acc_a += t * ((i == x ? log_on : log_off) + flog(u));
          acc_t += t;
        }
      }
    }
  });
  const double U = g.sum(static_cast<double>(acc_u));
  const double A = g.sum(static_cast<double>(acc_a));
  const double T = g.sum(static_cast<double>(acc_t));
  const double z = c.beta * U + c.alpha * static_cast<double>(inv.u_of(C(0)));
  if (g.tid == 0) a.out[p] = static_cast<float>(T * log(z) - A);
  if (checked) tc.flag(g, a.errors);
}

struct Inputs : RowInputs {
  at::Tensor target;  // in the log-scores' dtype
};

Inputs check_inputs(int64_t family, const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau,
                    const at::Tensor& target) {
  Inputs in;
  static_cast<RowInputs&>(in) = check_row_inputs(family, log_score, "log_score", x, tau);
  check_rows_like(target, log_score, "target");
  in.target = target.to(log_score.scalar_type()).contiguous();
  return in;
}

at::Tensor conditional_matching_loss_cuda(int64_t family, const c10::optional<at::Tensor>& evals,
                                          const c10::optional<at::Tensor>& vecs,
                                          const c10::optional<at::Tensor>& vecs_inv, const at::Tensor& log_score,
                                          const at::Tensor& x, const at::Tensor& tau, const at::Tensor& target) {
  CDM_DEVICE_GUARD(log_score);
  const Inputs in = check_inputs(family, log_score, x, tau, target);
  if (family == DENSE) {
    const dense::Eigen eg = check_dense(evals, vecs, vecs_inv, in.n, log_score.device());
    return dense::conditional_matching_loss(eg, log_score, in.x, in.tau, in.target);
  }
  at::Tensor out = at::empty({in.positions}, log_score.options().dtype(at::kFloat));
  if (in.positions == 0) return out;
  ValueChecks checks(log_score, {"conditional_matching_loss", "student_log_score", "x_t", "tau_t", nullptr}, in.n);
  const bool aligned = is_aligned_rows(log_score) && is_aligned_rows(in.target);
  dispatch_rows(log_score.scalar_type(), aligned, in.n, [&]<class S, bool AL, int W>() {
    const SmemPlan plan = plan_smem<S, W>(in.n, /*stats=*/false, /*cache_rows=*/1);
    const LossArgs<S> a{row_args(in, family, plan, checks.record()), static_cast<const S*>(log_score.data_ptr()),
                        static_cast<const S*>(in.target.data_ptr()), out.data_ptr<float>()};
    launch_rows<W>(&loss_kernel<S, AL, W>, a);
  });
  checks.finish();
  return out;
}

at::Tensor conditional_matching_loss_backward_cuda(int64_t family, const c10::optional<at::Tensor>& evals,
                                                   const c10::optional<at::Tensor>& vecs,
                                                   const c10::optional<at::Tensor>& vecs_inv,
                                                   const at::Tensor& grad_loss, const at::Tensor& log_score,
                                                   const at::Tensor& x, const at::Tensor& tau,
                                                   const at::Tensor& target) {
  CDM_DEVICE_GUARD(log_score);
  const Inputs in = check_inputs(family, log_score, x, tau, target);
  check_device(grad_loss, "grad_loss");
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == in.positions, "cdm_kernels: grad_loss must be (",
              in.positions, ",), got ", grad_loss.sizes());
  if (family == DENSE) {
    const dense::Eigen eg = check_dense(evals, vecs, vecs_inv, in.n, log_score.device());
    return dense::matching_loss_backward(eg, grad_loss, log_score, in.x, in.tau, in.target)
        .to(log_score.scalar_type());
  }
  at::Tensor out = at::empty_like(log_score);
  if (in.positions == 0) return out;
  const at::Tensor gl = grad_loss.to(at::kFloat).contiguous();
  launch_posterior_backward(family, log_score, in.target, gl.data_ptr<float>(), in, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> conditional_matching_loss_with_grad_cuda(
    int64_t family, const c10::optional<at::Tensor>& evals, const c10::optional<at::Tensor>& vecs,
    const c10::optional<at::Tensor>& vecs_inv, const at::Tensor& log_score, const at::Tensor& x,
    const at::Tensor& tau, const at::Tensor& target) {
  CDM_DEVICE_GUARD(log_score);
  if (family == DENSE) {
    at::Tensor loss = conditional_matching_loss_cuda(family, evals, vecs, vecs_inv, log_score, x, tau, target);
    const at::Tensor ones = at::ones({log_score.size(0)}, log_score.options().dtype(at::kFloat));
    return {loss, conditional_matching_loss_backward_cuda(family, evals, vecs, vecs_inv, ones, log_score, x, tau,
                                                          target)};
  }
  const Inputs in = check_inputs(family, log_score, x, tau, target);
  at::Tensor loss = at::empty({in.positions}, log_score.options().dtype(at::kFloat));
  at::Tensor grad = at::empty_like(log_score);
  if (in.positions == 0) return {loss, grad};
  ValueChecks checks(log_score, {"conditional_matching_loss", "student_log_score", "x_t", "tau_t", nullptr}, in.n);
  const bool aligned = is_aligned_rows(log_score) && is_aligned_rows(in.target) && is_aligned_rows(grad);
  dispatch_rows(log_score.scalar_type(), aligned, in.n, [&]<class S, bool AL, int W>() {
    const SmemPlan plan = plan_smem<S, W>(in.n, /*stats=*/false, /*cache_rows=*/2);
    InversionArgs<S> a{row_args(in, family, plan, checks.record()), static_cast<const S*>(log_score.data_ptr()),
                       static_cast<const S*>(in.target.data_ptr()), nullptr, static_cast<S*>(grad.data_ptr()), 1};
    a.loss = loss.data_ptr<float>();
    launch_rows<W>(&posterior_backward_kernel<S, AL, W>, a);
  });
  checks.finish();
  return {loss, grad};
}

}  // namespace

CDM_CUDA_IMPL(m) {
  m.impl("conditional_matching_loss", &conditional_matching_loss_cuda);
  m.impl("conditional_matching_loss_with_grad", &conditional_matching_loss_with_grad_cuda);
  m.impl("conditional_matching_loss_backward", &conditional_matching_loss_backward_cuda);
}

}  // namespace gpu
}  // namespace cdm
