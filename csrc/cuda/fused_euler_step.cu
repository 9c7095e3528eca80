// fused_euler_step on CUDA: one fused reverse step (kernel evaluation, inversion, sampling).
//
// Every closed-form case is one of two shapes (derived from reference.step_probabilities;
// Delta = tau_t - tau_s, e_y = exp(ls_y - m), m / s = max / sum-exp over y != x):
//   A  p_y = K e_y (y != x), p_x = px            ("exclusive": only pass 1 reads the row)
//      uniform euler (tau_s > 0):  log-rate lr = log(Delta / N), scale = max(lr + m, 0),
//                                  K = e^{lr + m - scale}, px = max(e^-scale - K s, 0)
//      absorbing, x = mask:        analytic  K = (1 - e^-Delta) e^-tau_s / s, px = 1 - e^-tau_s
//                                  euler     as uniform with lr = log(Delta); tau_s = 0: K = 1/s, px = 0
//      absorbing, x != mask:       x (no read)
//   B  p_y = c1 u_y + c0 + [y = x] (d1 u_y + d0), u the clamped inversion (inversion.cuh)
//      uniform analytic:           c1 = beta_D alpha_s, c0 = beta_D beta_s U, d1 = alpha_D alpha_s,
//                                  d0 = alpha_D beta_s U (U = sum u); tau_s = 0 gives q itself,
//                                  which is also the euler step's tau_s = 0 rule
// Passes: 1 = per-segment (max, sum-exp) stats (1 exp / state, stored in shared memory);
// B adds pass 2 = per-segment sums of u (1 exp / state; the row is cached in shared memory
// by pass 1 when it fits). Sampling (cuda_common.cuh: sample_row) then needs no pass over
// the row: segment masses come from the stats, one 256-state segment is recomputed.
// One Philox uniform per position: philox_uniform(seed, offset, p), as Triton's tl.rand.
// Dense graphs: float64 step probabilities (dense.cpp), sampled by sample_probs_kernel.
#include "cuda/inversion.cuh"

namespace cdm {
namespace gpu {
namespace {

template <class S>
struct StepArgs : RowArgs {  // tau: tau_t
  const S* ls;
  const double* tau_s;
  int64_t* out;
  int64_t method, seed, offset;
};

template <class S, bool AL, int W>
CDM_GLOBAL void CDM_BOUNDS(Group<W>::kBlock, min_blocks<S>()) fused_euler_step_kernel(const StepArgs<S> a) {
  using C = typename Compute<S>::type;
  CDM_ROW_GROUP(a, g, p, gs);
  const int64_t n = a.n, nseg = num_segments(n), x = a.x[p];
  const double tau_t = a.tau[p], tau_s = a.tau_s[p];
  const S* row = a.ls + p * n;
  int bad = 0;
  if (a.errors != nullptr && g.tid == 0) check_position(a.errors, n, x, tau_t, &a.tau_s[p]);
  if (a.family == ABSORBING && x != n - 1) {  // an unmasked token stays
    if (g.tid == 0) a.out[p] = x;
    if (a.errors != nullptr) {  // a row read for the check only
      read_segments<S, AL, W>(g, row, n, nullptr, [&](int64_t, const S* raw) { bad |= raw_not_finite(raw, false); });
      if (bad) flag_error(a.errors, kRowsNotFinite);
    }
    return;
  }
  const double delta = tau_t - tau_s;
  const bool inversion = a.family == UNIFORM && (a.method == 0 || tau_s == 0.0);
  S* cache = inversion ? cache_row<S>(gs, a.plan, 0) : nullptr;
  const SegStats<C> st = segment_stats<C>(gs, a.plan, nseg);
  prefetch_row(g, row, n * static_cast<int64_t>(sizeof(S)), a.plan.l2_prefetch);
  double m, s;
  pass_max_sumexp<S, AL, W>(g, row, cache, n, x, st.m, st.s, m, s, NoExtra{}, a.errors != nullptr ? &bad : nullptr);
  if (bad) flag_error(a.errors, kRowsNotFinite);
  g.sync();  // the segment stats and the row cache, written per warp, are read by the whole group
  const float uniform = philox_uniform(a.seed, a.offset, p);
  int64_t pick;
  if (!inversion) {  // shape A
    double K, px;
    if (a.family == ABSORBING && a.method == 0) {
      const Decay dd = decay(delta), ds = decay(tau_s);
      K = dd.one_minus_alpha * ds.alpha / s;
      px = ds.one_minus_alpha;
      if (!(K > 0.0) && !(px > 0.0)) {  // 0/0 (tau_t = tau_s = 0): sample q, as the CPU kernel
        K = 1.0 / s;
        px = 0.0;
      }
    } else if (a.family == ABSORBING && tau_s == 0.0) {
      K = 1.0 / s;
      px = 0.0;
    } else {  // euler, tau_s > 0: Delta Q[y, x] r_y, scaled by e^-scale so nothing overflows
      const double lr = log(a.family == UNIFORM ? delta / static_cast<double>(n) : delta);
      const double scale = tmax(lr + m, 0.0);
      K = exp(lr + m - scale);
      px = tmax(exp(-scale) - K * s, 0.0);
    }
    for (int64_t j = g.tid; j < nseg; j += Group<W>::kThreads) {  // segment masses (stats: pass 1)
      double mass = st.s[j] > C(0) ? K * exp(static_cast<double>(st.m[j]) - m) * static_cast<double>(st.s[j]) : 0.0;
      if (x / kSeg == j) mass += px;
      st.mass[j] = mass;
    }
    g.sync();
    pick = sample_row<W>(g, st.mass, n, x, uniform, [&](int64_t j) {
      const bool live = st.s[j] > C(0);
      const C mj = st.m[j];
      const double f = live ? K * exp(static_cast<double>(mj) - m) : 0.0;  // same basis as the segment's mass
      return [=](int64_t i) -> double {
        if (i == x) return px;
        return live ? f * static_cast<double>(fexp(to_compute<C>(load_one(row + i)) - mj)) : 0.0;
      };
    });
  } else {  // shape B
    const UniformCoeffs c = uniform_coeffs(tau_t, n);
    const Inversion<C> inv = uniform_inversion<C>(m, s, c);
    const S* src = cache != nullptr ? cache : row;
    C acc = C(0);
    read_segments<S, AL, W>(g, src, n, nullptr, [&](int64_t seg, const S* raw) {  // pass 2: per-segment sums of u
      C part = lane_u_sum<S, AL>(inv, raw, seg, g.lane, n, x);
      acc += part;
      part = warp_sum(part);
      if (g.lane == 0) st.mass[seg] = static_cast<double>(part);
    });
    const double U = g.sum(static_cast<double>(acc));
    g.sync();  // st.mass (lane 0 of each segment's warp) visible to the group
    const Decay dd = decay(delta), ds = decay(tau_s);
    const double beta_d = dd.one_minus_alpha / static_cast<double>(n), beta_s = ds.one_minus_alpha / static_cast<double>(n);
    const double c1 = beta_d * ds.alpha, c0 = beta_d * beta_s * U;
    const double d1 = dd.alpha * ds.alpha, d0 = dd.alpha * beta_s * U;
    const double ux = static_cast<double>(inv.u_of(C(0)));
    for (int64_t j = g.tid; j < nseg; j += Group<W>::kThreads) {
      const double count = static_cast<double>(tmin<int64_t>(kSeg, n - j * kSeg));
      double mass = c1 * st.mass[j] + c0 * count;
      if (x / kSeg == j) mass += d1 * ux + d0;
      st.mass[j] = mass;
    }
    g.sync();
    pick = sample_row<W>(g, st.mass, n, x, uniform, [&](int64_t) {
      return [&](int64_t i) -> double {
        const double u = static_cast<double>(inv.u_of(i == x ? C(0) : to_compute<C>(load_one(src + i))));
        return c1 * u + c0 + (i == x ? d1 * u + d0 : 0.0);
      };
    });
  }
  if (g.tid == 0) a.out[p] = pick;
}

// Dense graphs: inverse-CDF draw from explicit float64 probabilities (P, N).
struct ProbsArgs : RowArgs {  // tau, family: unused
  const double* probs;
  int64_t* out;
  int64_t seed, offset;
};

template <bool AL, int W>
CDM_GLOBAL void CDM_BOUNDS(Group<W>::kBlock, min_blocks<double>()) sample_probs_kernel(const ProbsArgs a) {
  CDM_ROW_GROUP(a, g, p, gs);
  const int64_t n = a.n, nseg = num_segments(n), x = a.x[p];
  const double* row = a.probs + p * n;
  const SegStats<double> st = segment_stats<double>(gs, a.plan, nseg);
  for (int64_t seg = g.warp; seg < nseg; seg += W) {
    alignas(16) double raw[kEPT];
    load_raw<double, AL>(row, n, seg, g.lane, raw);
    double part = 0.0;
#pragma unroll
    for (int k = 0; k < kEPT; ++k) part += tmax(raw[k], 0.0);  // slots past n hold 0
    part = warp_sum(part);
    if (g.lane == 0) st.mass[seg] = part;
  }
  g.sync();
  const float uniform = philox_uniform(a.seed, a.offset, p);
  const int64_t pick = sample_row<W>(g, st.mass, n, x, uniform, [&](int64_t) {
    return [&](int64_t i) -> double { return tmax(load_one(row + i), 0.0); };
  });
  if (g.tid == 0) a.out[p] = pick;
}

at::Tensor fused_euler_step_cuda(int64_t family, const c10::optional<at::Tensor>& evals,
                           const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                           const at::Tensor& log_score, const at::Tensor& x_in, const at::Tensor& tau_t_in,
                           const at::Tensor& tau_s_in, int64_t method, const at::Tensor& seed_offset) {
  CDM_DEVICE_GUARD(log_score);
  const RowInputs in = check_row_inputs(family, log_score, "log_score", x_in, tau_t_in, "tau_t");
  const int64_t positions = in.positions, n = in.n;
  check_positions(tau_s_in, log_score, "tau_s", positions, at::kDouble);
  TORCH_CHECK(method == 0 || method == 1, "cdm_kernels: method must be 0 (analytic) or 1 (euler), got ", method);
  TORCH_CHECK(seed_offset.device().is_cpu() && seed_offset.scalar_type() == at::kLong && seed_offset.numel() == 2,
              "cdm_kernels: seed_offset must be a CPU int64 tensor [seed, offset]");
  const at::Tensor so = seed_offset.contiguous();
  const int64_t seed = so.data_ptr<int64_t>()[0], offset = so.data_ptr<int64_t>()[1];  // host memory: no sync
  TORCH_CHECK(offset >= 0, "cdm_kernels: the Philox offset must be non-negative, got ", offset);
  const at::Tensor tau_s = tau_s_in.contiguous();
  at::Tensor out = at::empty({positions}, in.x.options());
  if (positions == 0) return out;
  if (family == DENSE) {
    const dense::Eigen eg = check_dense(evals, vecs, vecs_inv, n, log_score.device());
    const at::Tensor probs = dense::step_probabilities(eg, log_score, in.x, in.tau, tau_s, method).contiguous();
    dispatch_rows(at::kDouble, is_aligned_rows(probs), n, [&]<class S, bool AL, int W>() {
      const ProbsArgs a{row_args(in, family, plan_smem<double, W>(n, /*stats=*/true, /*cache_rows=*/0)),
                        probs.data_ptr<double>(), out.data_ptr<int64_t>(), seed, offset};
      launch_rows<W>(&sample_probs_kernel<AL, W>, a);
    });
    return out;
  }
  // the row is re-read only by the inversion (uniform analytic, or tau_s = 0)
  const int cache_rows = (family == UNIFORM && method == 0) ? 1 : 0;
  ValueChecks checks(log_score, {"fused_euler_step", "log_score", "x", "tau_t", "tau_s"}, n);
  dispatch_rows(log_score.scalar_type(), is_aligned_rows(log_score), n, [&]<class S, bool AL, int W>() {
    const SmemPlan plan = plan_smem<S, W>(n, /*stats=*/true, cache_rows);
    const StepArgs<S> a{row_args(in, family, plan, checks.record()), static_cast<const S*>(log_score.data_ptr()),
                        tau_s.data_ptr<double>(), out.data_ptr<int64_t>(), method, seed, offset};
    launch_rows<W>(&fused_euler_step_kernel<S, AL, W>, a);
  });
  checks.finish();
  return out;
}

}  // namespace

CDM_CUDA_IMPL(m) { m.impl("fused_euler_step", &fused_euler_step_cuda); }

}  // namespace gpu
}  // namespace cdm
