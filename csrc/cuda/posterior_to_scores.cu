// posterior_to_scores (+ backward) on CUDA: log r from log p_0|t (reference.py):
//   u_a = q_a / K[a, x] = exp(log q_a - log K[a, x])   (0 where q_a = 0; log K clamped at -1e30)
//   r = K^T u   uniform: alpha u + beta sum(u); absorbing: alpha u_a (a < m), u_m + (1 - alpha) sum_{a<m} u_a
//   out = log r (-inf where r = 0)
// Forward: pass 1 sum(u), pass 2 writes (1 exp + 1 log / state).
// Backward (g = dL/dlog r): gr = g / r (0 where r = 0), dL/du = K gr, dL/dlog q = u dL/du:
//   uniform   pass 1 sum(u), pass 2 sum(gr), pass 3 writes u (alpha gr + beta sum(gr))
//   absorbing pass 1 sum_{a<m} u, pass 2 writes u_a (alpha gr_a + (1 - alpha) gr_m), u_m gr_m
// Rows read by several passes are cached in shared memory when they fit. Dense: dense.cpp.
#include "cuda/value_checks.cuh"

namespace cdm {
namespace gpu {
namespace {

template <class S>
struct ToScoresArgs : RowArgs {
  const S* lq;    // (P, N) log p_0|t
  const S* grad;  // backward only
  S* out;
};

// log K[a, x] (clamped at -1e30) and the kernel's coefficients for one row
template <class C>
struct Column {
  int64_t at;    // the state whose log-column is `lon`
  C lon, loff;   // log K[at, x], log K[a, x] for a != at
  C alpha;       // e^-tau
  double oma;    // 1 - e^-tau
  CDM_DEV C lcol(int64_t i) const { return i == at ? lon : loff; }
  CDM_DEV C u_of(C lq, int64_t i) const { return lq > -pos_inf<C>() ? fexp(lq - lcol(i)) : C(0); }
};

template <class C>
CDM_DEV Column<C> make_column(int64_t family, int64_t n, int64_t x, double tau) {
  const Decay d = decay(tau);
  auto clog = [](double v) -> C { return static_cast<C>(tmax(log(v), -1e30)); };
  Column<C> col;
  col.alpha = static_cast<C>(d.alpha);
  col.oma = d.one_minus_alpha;
  if (family == UNIFORM) {
    const UniformCoeffs c = uniform_coeffs(tau, n);
    col.at = x;
    col.lon = clog(c.on());
    col.loff = clog(c.off());
  } else if (x == n - 1) {  // absorbing, mask column: 1 - alpha on real tokens, 1 on the mask
    col.at = n - 1;
    col.lon = C(0);
    col.loff = clog(d.one_minus_alpha);
  } else {  // absorbing, alpha e_x
    col.at = x;
    col.lon = clog(d.alpha);
    col.loff = static_cast<C>(-1e30);
  }
  return col;
}

template <class C>
CDM_DEV C safe_log(C r) {
  return r > C(0) ? flog(r) : -pos_inf<C>();
}

// sum of u over the row (over the real tokens for the absorbing graph); its states go to
// `cache` unless it is null; `errors` (not null): the value checks of log p_0|t (NaN, +inf)
template <class S, bool AL, int W, class C>
CDM_DEV double column_u_sum(const Group<W>& g, const Column<C>& col, const S* row, S* cache, int64_t n, bool uniform,
                            ErrorRecord* errors = nullptr) {
  const int64_t m = n - 1;
  C acc = C(0);
  int bad = 0;
  read_segments<S, AL, W>(g, row, n, cache, [&](int64_t seg, const S* raw) {
    if (errors != nullptr) bad |= raw_not_finite(raw, /*allow_minus_inf=*/true);
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t i = slot_index<AL>(seg, g.lane, k);
      if (i < n && (uniform || i != m)) acc += col.u_of(to_compute<C>(raw[k]), i);
    }
  });
  if (bad) flag_error(errors, kRowsNotFinite);
  return g.sum(static_cast<double>(acc));
}

template <class S, bool AL, int W>
CDM_GLOBAL void CDM_BOUNDS(Group<W>::kBlock, min_blocks<S>()) to_scores_kernel(const ToScoresArgs<S> a) {
  using C = typename Compute<S>::type;
  CDM_ROW_GROUP(a, g, p, gs);
  const int64_t n = a.n, x = a.x[p], m = n - 1;
  const bool uniform = a.family == UNIFORM;
  const S* row = a.lq + p * n;
  S* out = a.out + p * n;
  const Column<C> col = make_column<C>(a.family, n, x, a.tau[p]);
  S* cache = cache_row<S>(gs, a.plan, 0);
  if (a.errors != nullptr && g.tid == 0) check_position(a.errors, n, x, a.tau[p], nullptr);
  const double U = column_u_sum<S, AL, W>(g, col, row, cache, n, uniform, a.errors);
  const S* src = cache != nullptr ? cache : row;
  const C shift = uniform ? static_cast<C>(col.oma / static_cast<double>(n) * U) : C(0);
  const C mask_add = static_cast<C>(col.oma * U);
  map_segments<S, AL, W>(g, src, out, n, [&](int64_t seg, S* raw) {
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t i = slot_index<AL>(seg, g.lane, k);
      const C u = col.u_of(to_compute<C>(raw[k]), i);
      const C r = uniform ? col.alpha * u + shift : (i == m ? u + mask_add : col.alpha * u);
      raw[k] = to_storage<S>(safe_log(r));
    }
  });
}

template <class S, bool AL, int W>
CDM_GLOBAL void CDM_BOUNDS(Group<W>::kBlock, min_blocks<S>()) to_scores_backward_kernel(const ToScoresArgs<S> a) {
  using C = typename Compute<S>::type;
  CDM_ROW_GROUP(a, g, p, gs);
  const int64_t n = a.n, x = a.x[p], m = n - 1;
  const bool uniform = a.family == UNIFORM;
  const S* row = a.lq + p * n;
  const S* grow = a.grad + p * n;
  S* out = a.out + p * n;
  const Column<C> col = make_column<C>(a.family, n, x, a.tau[p]);
  S* cache_l = cache_row<S>(gs, a.plan, 0);
  S* cache_g = cache_row<S>(gs, a.plan, 1);
  const double U = column_u_sum<S, AL, W>(g, col, row, cache_l, n, uniform);  // pass 1
  const S* lsrc = cache_l != nullptr ? cache_l : row;
  if (uniform) {
    const C shift = static_cast<C>(col.oma / static_cast<double>(n) * U);
    C acc_g = C(0);
    read_segment_pairs<S, AL, W>(g, lsrc, grow, n, cache_g, [&](int64_t seg, const S* lraw, const S* graw) {  // pass 2
#pragma unroll
      for (int k = 0; k < kEPT; ++k) {
        const int64_t i = slot_index<AL>(seg, g.lane, k);
        if (i < n) {
          const C r = col.alpha * col.u_of(to_compute<C>(lraw[k]), i) + shift;
          if (r > C(0)) acc_g += to_compute<C>(graw[k]) / r;
        }
      }
    });
    const double SG = g.sum(static_cast<double>(acc_g));
    const C bsg = static_cast<C>(col.oma / static_cast<double>(n) * SG);
    const S* gsrc = cache_g != nullptr ? cache_g : grow;
    map_segment_pairs<S, AL, W>(g, lsrc, gsrc, out, n, [&](int64_t seg, S* lraw, const S* graw) {  // pass 3
#pragma unroll
      for (int k = 0; k < kEPT; ++k) {
        const int64_t i = slot_index<AL>(seg, g.lane, k);
        const C lq = to_compute<C>(lraw[k]);
        const C u = col.u_of(lq, i);
        const C r = col.alpha * u + shift;
        const C gr = r > C(0) ? to_compute<C>(graw[k]) / r : C(0);
        lraw[k] = to_storage<S>(lq > -pos_inf<C>() ? u * (col.alpha * gr + bsg) : C(0));
      }
    });
    return;
  }
  // absorbing: gr_m = g_m / r_m with r_m = u_m + (1 - alpha) sum_{a<m} u_a
  const C lq_m = to_compute<C>(load_for_group(g, row + m));
  const C u_m = col.u_of(lq_m, m);
  const C r_m = u_m + static_cast<C>(col.oma * U);
  const C gr_m = r_m > C(0) ? to_compute<C>(load_for_group(g, grow + m)) / r_m : C(0);
  const C oma = static_cast<C>(col.oma);
  map_segment_pairs<S, AL, W>(g, lsrc, grow, out, n, [&](int64_t seg, S* lraw, const S* graw) {
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t i = slot_index<AL>(seg, g.lane, k);
      const C lq = to_compute<C>(lraw[k]);
      C o = C(0);
      if (lq > -pos_inf<C>()) {
        const C u = col.u_of(lq, i);
        if (i == m) {
          o = u * gr_m;
        } else {
          const C r = col.alpha * u;
          const C gr = r > C(0) ? to_compute<C>(graw[k]) / r : C(0);
          o = u * (col.alpha * gr + oma * gr_m);
        }
      }
      lraw[k] = to_storage<S>(o);
    }
  });
}

// the forward checks the values of log p_0|t (errors), the backward trusts its forward
template <bool kBackward>
void launch(int64_t family, const at::Tensor& log_p0, const at::Tensor* grad, const RowInputs& in, at::Tensor& out,
            ErrorRecord* errors = nullptr) {
  bool aligned = is_aligned_rows(log_p0) && is_aligned_rows(out);
  if (grad != nullptr) aligned = aligned && is_aligned_rows(*grad);
  dispatch_rows(log_p0.scalar_type(), aligned, in.n, [&]<class S, bool AL, int W>() {
    const SmemPlan plan = plan_smem<S, W>(in.n, /*stats=*/false, kBackward ? 2 : 1);
    const ToScoresArgs<S> a{row_args(in, family, plan, errors), static_cast<const S*>(log_p0.data_ptr()),
                            grad != nullptr ? static_cast<const S*>(grad->data_ptr()) : nullptr,
                            static_cast<S*>(out.data_ptr())};
    if (kBackward) {
      launch_rows<W>(&to_scores_backward_kernel<S, AL, W>, a);
    } else {
      launch_rows<W>(&to_scores_kernel<S, AL, W>, a);
    }
  });
}

at::Tensor posterior_to_scores_cuda(int64_t family, const c10::optional<at::Tensor>& evals,
                                    const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                                    const at::Tensor& log_p0, const at::Tensor& x, const at::Tensor& tau) {
  CDM_DEVICE_GUARD(log_p0);
  const RowInputs in = check_row_inputs(family, log_p0, "log_p0", x, tau);
  if (family == DENSE) {
    const dense::Eigen eg = check_dense(evals, vecs, vecs_inv, in.n, log_p0.device());
    return dense::posterior_to_scores(eg, log_p0, in.x, in.tau).to(log_p0.scalar_type());
  }
  at::Tensor out = at::empty_like(log_p0);
  if (in.positions == 0) return out;
  ValueChecks checks(log_p0, {"posterior_to_scores", "log_p0", "x", "tau", nullptr}, in.n);
  launch<false>(family, log_p0, nullptr, in, out, checks.record());
  checks.finish();
  return out;
}

at::Tensor posterior_to_scores_backward_cuda(int64_t family, const c10::optional<at::Tensor>& evals,
                                             const c10::optional<at::Tensor>& vecs,
                                             const c10::optional<at::Tensor>& vecs_inv, const at::Tensor& grad,
                                             const at::Tensor& log_p0, const at::Tensor& x, const at::Tensor& tau) {
  CDM_DEVICE_GUARD(log_p0);
  const RowInputs in = check_row_inputs(family, log_p0, "log_p0", x, tau);
  check_rows_like(grad, log_p0, "grad");
  if (family == DENSE) {
    const dense::Eigen eg = check_dense(evals, vecs, vecs_inv, in.n, log_p0.device());
    return dense::posterior_to_scores_backward(eg, grad, log_p0, in.x, in.tau).to(log_p0.scalar_type());
  }
  at::Tensor out = at::empty_like(log_p0);
  const at::Tensor g = grad.to(log_p0.scalar_type()).contiguous();
  if (in.positions > 0) launch<true>(family, log_p0, &g, in, out);
  return out;
}

}  // namespace

CDM_CUDA_IMPL(m) {
  m.impl("posterior_to_scores", &posterior_to_scores_cuda);
  m.impl("posterior_to_scores_backward", &posterior_to_scores_backward_cuda);
}

}  // namespace gpu
}  // namespace cdm
