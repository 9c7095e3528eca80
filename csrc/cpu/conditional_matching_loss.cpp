// conditional_matching_loss (+ backward) on the CPU: per-position cross-entropy
//   loss_p = -sum_a [t_a > 0] t_a log q_a,   q = scores_to_posterior(log_score, x, tau)
// without materialising log q. Uniform graph, with u the clamped inversion (scores_to_posterior.cpp):
//   log q_a = log K[a, x] + log u_a - log Z,  Z = beta U + alpha u_x
//   sum_a t_a log q_a = sum_a t_a log u_a + log(beta) T_off + log(alpha + beta) t_x - T log Z
// (T = sum of the positive targets, T_off the part off x): 1 exp + 1 log per element, in
// float32 (float64 for float64 inputs), sums in float64. Absorbing: the log-softmax over
// real tokens on mask rows (1 exp / element); log e_x on the others (+inf if the target
// puts mass off x). The loss is float32 for every input dtype (the schema's contract; a
// float64 input is computed in float64 and rounded once).
// Backward: G = -grad_loss [t > 0] t is the gradient of log q; the posterior's backward
// (dL/du_a = (T q_a - t_a) grad_loss / u_a on unclamped entries, ...) follows.
// With its gradient (conditional_matching_loss_with_grad, what autograd calls when the
// scores require grad): the posterior's backward at grad_loss = 1, whose pass over the
// row also sums the loss (sum G log q = -sum t log q), so that each row of scores and
// target is read from memory once for the loss and its gradient; the backward then only
// scales that gradient by grad_loss (ops/conditional_matching_loss.py).
#include "cpu/cpu_common.h"
#include "cpu/inversion.h"

namespace cdm {
namespace cpu {

namespace {

// rows: the log-scores, second: the target, out: the (P, N) gradient (backward, or the
// forward with its gradient; null: the loss alone)
struct LossArgs : RowArgs {
  void* loss;  // forward: (P,) float32 or float64
  bool loss_f64;
  const void* grad_loss;  // backward: (P,) float32 or float64
  bool grad_f64;
};

template <class VV>
CDM_INLINE typename VV::V positive_part(typename VV::V t) {
  using T = typename VV::T;
  return t > T(0) ? t : typename VV::V{};  // NaN -> 0, as torch.where(target > 0, ...)
}

// the upstream gradient of position p's loss: 1 in the forward with its gradient
inline double grad_loss_at(const LossArgs& a, int64_t p) {
  if (a.grad_loss == nullptr) return 1.0;
  return a.grad_f64 ? static_cast<const double*>(a.grad_loss)[p]
                    : static_cast<double>(static_cast<const float*>(a.grad_loss)[p]);
}

inline void store_loss(const LossArgs& a, int64_t p, double loss) {
  if (a.loss_f64) {
    static_cast<double*>(a.loss)[p] = loss;
  } else {
    static_cast<float*>(a.loss)[p] = static_cast<float>(loss);
  }
}

template <class VV>
CDM_INLINE double uniform_loss_row(const LossArgs& a, int64_t p, typename VV::T* s, typename VV::T* t,
                                   const Prefetch& pf, DecayCache& dc) {
  using T = typename VV::T;
  using V = typename VV::V;
  const int64_t n = a.n, np = round_up(n), x = a.x[p];
  load_row<VV>(a.rows, a.dt, p, n, s, -kInf<T>, a.errors);
  load_row<VV>(a.second, a.second_dt, p, n, t, T(0));
  if (a.errors != nullptr) check_probability_row<VV>(t, n, a.errors);
  const UniformRow<T> row = uniform_ratios<VV>(s, n, x, uniform_coeffs(dc(a.tau[p]), n), pf);
  const V zero{};
  typename VV::Acc acc_u, acc_t, acc_tl;
  for (int64_t i = 0; i < np; i += VV::L) {
    V u = clamp_floor<VV>(VV::load(s + i) - row.cs, row.floor);
    if (CDM_UNLIKELY(i + VV::L > n)) u = VV::below(n - i) ? u : zero;
    const V tp = positive_part<VV>(VV::load(t + i));
    const V tl = tp > zero ? tp * VV::log_normal(u) : zero;
    acc_u.add(u);
    acc_t.add(tp);
    acc_tl.add(tl);
  }
  const double z = row.c.beta * acc_u.sum() + row.c.alpha * static_cast<double>(row.u_x);
  const double total = acc_t.sum();
  const double t_x = t[x] > T(0) ? static_cast<double>(t[x]) : 0.0;
  const double t_off = total - t_x;
  double sum = acc_tl.sum();
  if (t_off > 0.0) sum += std::log(row.c.off()) * t_off;
  if (t_x > 0.0) sum += std::log(row.c.on()) * t_x;
  if (total > 0.0) sum -= std::log(z) * total;
  return -sum;
}

template <class VV>
CDM_INLINE double absorbing_loss_row(const LossArgs& a, int64_t p, typename VV::T* s, typename VV::T* t,
                                     const Prefetch& pf) {
  using T = typename VV::T;
  using V = typename VV::V;
  const int64_t n = a.n, np = round_up(n), x = a.x[p], m = n - 1;
  const double inf = std::numeric_limits<double>::infinity();
  load_row<VV>(a.second, a.second_dt, p, n, t, T(0));
  if (a.errors != nullptr) {
    check_probability_row<VV>(t, n, a.errors);
    if (x != m || t[m] > T(0)) load_row<VV>(a.rows, a.dt, p, n, s, -kInf<T>, a.errors);  // read for the check only
  }
  if (x != m) {  // log q = log e_x
    for (int64_t b = 0; b < n; ++b)
      if (b != x && t[b] > T(0)) return inf;
    return -0.0;
  }
  if (t[m] > T(0)) return inf;  // the mask has probability 0
  load_row<VV>(a.rows, a.dt, p, n, s, -kInf<T>, a.errors);
  s[m] = -kInf<T>;
  const T mx = row_max<VV>(s, np);
  const T lsum = static_cast<T>(std::log(exp_shift_sum<VV>(s, np, mx, pf)));
  const V zero{};
  typename VV::Acc acc;
  for (int64_t i = 0; i < np; i += VV::L) {
    const V tp = positive_part<VV>(VV::load(t + i));
    const V lq = (VV::load(s + i) - mx) - lsum;
    acc.add(tp > zero ? tp * lq : zero);
  }
  return -acc.sum();
}

// ----------------------------------------------------------------------------- lanes layout (short rows)

template <class VV>
CDM_INLINE typename VV::V uniform_loss_group(const LossArgs& a, const Group<VV>& g, typename VV::T* t,
                                             typename VV::T* tg, UniformLogCache& cache) {
  using V = typename VV::V;
  using M = typename VV::M;
  const int64_t n = a.n;
  g.load(a.rows, a.dt, t, a.errors);
  g.load(a.second, a.second_dt, tg);
  if (a.errors != nullptr) g.check_probabilities(tg, a.errors);
  const LaneCoeffs<VV> lc = uniform_lane_coeffs<VV>(g, a.tau, cache);
  const M xv = g.lanes_index(a.x);
  const V zero{};
  const GroupRatios<VV> gr = uniform_group_ratios<VV>(g, a.x, t, lc.alpha, lc.beta);
  const V cs = gr.cs, floor = gr.floor;
  V U{}, ux{}, total{}, tl{}, tx{};
  for (int64_t b = 0; b < n; ++b) {
    const V d = g.at(t, b) - cs;
    const V u = d < floor ? floor : d;
    const V tv = g.at(tg, b);
    const V tp = tv > zero ? tv : zero;
    U += u;
    total += tp;
    tl += tp > zero ? tp * VV::log_normal(u) : zero;
    const M here = Group<VV>::eq(xv, b);
    ux = here ? u : ux;
    tx = here ? tp : tx;
  }
  const V lz = VV::log(lc.beta * U + lc.alpha * ux);
  const V t_off = total - tx;
  V sum = tl + (t_off > zero ? lc.log_off * t_off : zero) + (tx > zero ? lc.log_on * tx : zero);
  sum = sum - (total > zero ? lz * total : zero);
  return -sum;
}

template <class VV>
CDM_INLINE typename VV::V absorbing_loss_group(const LossArgs& a, const Group<VV>& g, typename VV::T* t,
                                               typename VV::T* tg) {
  using T = typename VV::T;
  using V = typename VV::V;
  using M = typename VV::M;
  const int64_t n = a.n, m = n - 1;
  g.load(a.rows, a.dt, t, a.errors);
  g.load(a.second, a.second_dt, tg);
  if (a.errors != nullptr) g.check_probabilities(tg, a.errors);
  const M xv = g.lanes_index(a.x);
  const M real = Group<VV>::ne(xv, m);
  const V zero{}, inf = VV::splat(kInf<T>);
  g.put(t, m, VV::splat(-kInf<T>));
  const V mx = group_max<VV>(g, t);
  V off_mass{};  // real rows: target mass off x
  for (int64_t b = 0; b < n; ++b) {
    off_mass += (Group<VV>::ne(xv, b) & (g.at(tg, b) > zero)) ? VV::splat(T(1)) : zero;
  }
  V S{};
  for (int64_t b = 0; b < n; ++b) S += VV::exp(g.at(t, b) - mx);
  const V ls = VV::log(S);
  V acc{};
  for (int64_t b = 0; b < m; ++b) {
    const V tv = g.at(tg, b);
    acc += tv > zero ? tv * ((g.at(t, b) - mx) - ls) : zero;
  }
  const V on_mask = g.at(tg, m) > zero ? inf : -acc;
  const V on_real = off_mass > zero ? inf : VV::splat(-T(0));
  return real ? on_real : on_mask;
}

// the gradient of the loss and, with kLoss, the loss (a.loss) in the same pass
template <class VV, bool kLoss>
CDM_INLINE void loss_gradient_rows(const LossArgs& a, int64_t b, int64_t e) {
  using T = typename VV::T;
  posterior_backward_rows<VV, kLoss>(
      a, b, e,
      [&](int64_t p, T* g) {  // G = -grad_loss t+
        load_row<VV>(a.second, a.second_dt, p, a.n, g, T(0));
        if (a.errors != nullptr) check_probability_row<VV>(g, a.n, a.errors);
        const T scale = static_cast<T>(-grad_loss_at(a, p));
        for (int64_t i = 0; i < round_up(a.n); i += VV::L) VV::store(g + i, positive_part<VV>(VV::load(g + i)) * scale);
      },
      [&](const Group<VV>& grp, T* gt) {
        grp.load(a.second, a.second_dt, gt);
        if (a.errors != nullptr) grp.check_probabilities(gt, a.errors);
        const typename VV::V scale = grp.lanes([&](int64_t p) { return -grad_loss_at(a, p); });
        for (int64_t k = 0; k < a.n; ++k) grp.put(gt, k, positive_part<VV>(grp.at(gt, k)) * scale);
      },
      [&](int64_t p, double loss) { store_loss(a, p, loss); },
      [&](const Group<VV>& grp, typename VV::V loss) {
        for (int j = 0; j < grp.cnt; ++j) store_loss(a, grp.p0 + j, static_cast<double>(loss[j]));
      });
}

struct LossForward {
  using Args = LossArgs;
  template <class VV>
  static CDM_INLINE void rows(const Args& a, int64_t b, int64_t e) {
    if (a.out != nullptr) {
      loss_gradient_rows<VV, true>(a, b, e);
      return;
    }
    if (a.n <= kLanesMaxN) {
      Scratch<typename VV::T> tiles(a.n * VV::L, 2);
      UniformLogCache cache;
      for (int64_t p0 = b; p0 < e; p0 += VV::L) {
        const Group<VV> g = make_group<VV>(p0, e, a.n);
        const typename VV::V loss = a.family == UNIFORM
                                        ? uniform_loss_group<VV>(a, g, tiles.row(0), tiles.row(1), cache)
                                        : absorbing_loss_group<VV>(a, g, tiles.row(0), tiles.row(1));
        for (int j = 0; j < g.cnt; ++j) store_loss(a, p0 + j, static_cast<double>(loss[j]));
      }
      return;
    }
    Scratch<typename VV::T> scratch(a.n, 2);
    DecayCache dc;
    for (int64_t p = b; p < e; ++p) {
      const Prefetch pf = next_rows(p, e, a.n, a.rows, a.dt, a.second, a.second_dt);
      const double loss = a.family == UNIFORM ? uniform_loss_row<VV>(a, p, scratch.row(0), scratch.row(1), pf, dc)
                                              : absorbing_loss_row<VV>(a, p, scratch.row(0), scratch.row(1), pf);
      store_loss(a, p, loss);
    }
  }
};

struct LossBackward {
  using Args = LossArgs;
  template <class VV>
  static CDM_INLINE void rows(const Args& a, int64_t b, int64_t e) {
    loss_gradient_rows<VV, false>(a, b, e);
  }
};

// ----------------------------------------------------------------------------- dense

// the loss (a.loss), its gradient (a.out), or both from one posterior per block
void dense_loss(const Dense& g, const LossArgs& a, int64_t positions, bool backward) {
  const int64_t n = a.n;
  dense_posterior_blocks(g, a, positions, [&](const DensePosterior& blk) {
    for (int64_t c = 0; c < blk.rows; ++c) {
      const int64_t p = blk.p0 + c;
      double* t = blk.second + c * n;
      if (!backward) {
        if (a.errors != nullptr) check_probability_row<DenseVT>(t, n, a.errors);
        double sum = 0.0;
        for (int64_t k = 0; k < n; ++k) {
          if (t[k] > 0.0) sum += t[k] * blk.L[c * n + k];
        }
        store_loss(a, p, -sum);
      }
      if (a.out != nullptr) {  // G = -grad_loss t+
        const double gl = grad_loss_at(a, p);
        for (int64_t k = 0; k < n; ++k) t[k] = t[k] > 0.0 ? -gl * t[k] : 0.0;
      }
    }
    if (a.out != nullptr) dense_posterior_backward(g, a, blk);
  });
}

// ----------------------------------------------------------------------------- ops

// The loss (grad_loss null, gradient false), the loss and its gradient for grad_loss = 1
// (gradient true), or the backward given grad_loss: {loss, gradient}, each undefined when
// not asked for.
std::tuple<at::Tensor, at::Tensor> run(int64_t family, const c10::optional<at::Tensor>& evals,
                                       const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                                       const at::Tensor* grad_loss, bool gradient, const at::Tensor& log_score,
                                       const at::Tensor& x, const at::Tensor& tau, const at::Tensor& target) {
  check_row_inputs(log_score, "log_score", x, tau);
  check_rows(target, "target");
  check_same_shape(target, log_score, "target");
  const int64_t positions = log_score.size(0), n = log_score.size(1);
  const Dense g = check_graph(family, evals, vecs, vecs_inv, n);
  if (grad_loss) {
    TORCH_CHECK(grad_loss->dim() == 1 && grad_loss->size(0) == positions && grad_loss->is_contiguous() &&
                    grad_loss->device().is_cpu() &&
                    (grad_loss->scalar_type() == at::kFloat || grad_loss->scalar_type() == at::kDouble),
                "cdm_kernels: grad_loss must be a contiguous (", positions, ",) float32 or float64 CPU tensor, got ",
                grad_loss->sizes(), " ", grad_loss->scalar_type());
  }
  // the loss: (P,) float32 for every input dtype (the schema's contract); the gradient: like log_score
  at::Tensor loss = grad_loss ? at::Tensor() : at::empty({positions}, log_score.options().dtype(at::kFloat));
  at::Tensor grad = grad_loss || gradient ? empty_output_like(log_score) : at::Tensor();
  if (positions == 0) return {loss, grad};
  ValueErrors errors;
  LossArgs a{row_args(family, log_score, x, tau, grad.defined() ? grad.data_ptr() : nullptr, &target)};
  a.errors = grad_loss == nullptr && value_checks_on() ? &errors : nullptr;  // the backward trusts its forward
  a.loss = loss.defined() ? loss.data_ptr() : nullptr;
  a.loss_f64 = false;
  a.grad_loss = grad_loss ? grad_loss->data_ptr() : nullptr;
  a.grad_f64 = grad_loss && grad_loss->scalar_type() == at::kDouble;
  run_forward_or_backward<LossForward, LossBackward>(g, a, positions, grad_loss != nullptr, dense_loss);
  raise_value_errors(errors, {{kRowsNotFinite, "student_log_score contains NaN or inf"},
                              {kSecondNotFinite, "target contains NaN or inf"},
                              {kSecondNegative, "target must be probabilities (non-negative)"},
                              {kSecondRowSum, "target rows must sum to 1 (probabilities, not logits)"}});
  return {loss, grad};
}

at::Tensor loss_cpu(int64_t family, const c10::optional<at::Tensor>& evals, const c10::optional<at::Tensor>& vecs,
                    const c10::optional<at::Tensor>& vecs_inv, const at::Tensor& log_score, const at::Tensor& x,
                    const at::Tensor& tau, const at::Tensor& target) {
  return std::get<0>(run(family, evals, vecs, vecs_inv, nullptr, false, log_score, x, tau, target));
}

std::tuple<at::Tensor, at::Tensor> loss_with_grad_cpu(int64_t family, const c10::optional<at::Tensor>& evals,
                                                      const c10::optional<at::Tensor>& vecs,
                                                      const c10::optional<at::Tensor>& vecs_inv,
                                                      const at::Tensor& log_score, const at::Tensor& x,
                                                      const at::Tensor& tau, const at::Tensor& target) {
  return run(family, evals, vecs, vecs_inv, nullptr, true, log_score, x, tau, target);
}

at::Tensor loss_backward_cpu(int64_t family, const c10::optional<at::Tensor>& evals,
                             const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                             const at::Tensor& grad_loss, const at::Tensor& log_score, const at::Tensor& x,
                             const at::Tensor& tau, const at::Tensor& target) {
  return std::get<1>(run(family, evals, vecs, vecs_inv, &grad_loss, false, log_score, x, tau, target));
}

}  // namespace

TORCH_LIBRARY_IMPL(cdm_kernels, CPU, m) {
  m.impl("conditional_matching_loss", &loss_cpu);
  m.impl("conditional_matching_loss_with_grad", &loss_with_grad_cpu);
  m.impl("conditional_matching_loss_backward", &loss_backward_cpu);
}

}  // namespace cpu
}  // namespace cdm
