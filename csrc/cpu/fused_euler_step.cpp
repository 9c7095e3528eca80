// fused_euler_step on the CPU: one reverse step x_t -> x_s per position, sampled by inverse CDF
// with ONE uniform per position: Philox4x32-10 at counter offset + p (philox.h), the same
// number Triton's tl.rand(seed, offset + p) gives; seed_offset = [seed, offset] (int64).
//
// Step probabilities (reference.step_probabilities), unnormalised:
//   analytic  P(y) = K(Delta)[y, x] (K(tau_s)^T w)_y,  w = q / K(tau_t)[:, x] ∝ u (the clamped
//             inversion at tau_t, where K(tau_t)[a, x] > 0). Uniform:
//               P(y) = beta_D alpha_s u_y + beta_D beta_s U + [y = x] alpha_D (alpha_s u_x + beta_s U)
//             Absorbing, x = mask: P(y < m) ∝ (1 - alpha_D) alpha_s q_y, P(m) ∝ 1 - alpha_s
//             (q the softmax over real tokens); x != mask stays.
//   euler     P(y) = e^{log(Delta Q[y, x]) + log_score_y - scale} on jumps (Q[y, x] > 0),
//             P(x) += max(e^{-scale} - sum, 0), scale = max(0, max logit); tau_s == 0 gives
//             p_0|t (the analytic formula with tau_s = 0).
// Per row: copy, max, one exp per element (written to a scratch row with sums over blocks
// of 256), then a scan of the block sums and of one block: the draw lands on the first
// state whose cumulative mass exceeds u * total. A state with zero mass is never taken:
// if rounding walks past the end of a block or of the row, the last state with mass is.
// A row without any mass (NaN scores, or tau_t = tau_s = 0 on an absorbing mask where
// P is 0/0) falls back to q (absorbing) or stays at x.
// Rows of at most kLanesMaxN states take the lanes layout (lanes.h): one position per
// vector lane, the CDF scanned for all lanes at once (float cumulative sums; a group whose
// positions need different kinds of step, e.g. tau_s = 0 next to tau_s > 0 under "euler",
// goes row by row). Offsets: see philox.h (offset + p as a 64-bit counter, offset >= 0).
#include "cpu/cpu_common.h"
#include "cpu/inversion.h"
#include "cpu/lanes.h"
#include "philox.h"

namespace cdm {
namespace cpu {
namespace {

constexpr int64_t kBlock = 256;  // elements per block sum (16 vectors)

inline int64_t num_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

// First state whose cumulative weight exceeds `target`, scanning block sums then one
// block; weight(i) >= 0 gives the weight of state i (double). -1 if there is no mass.
template <class F>
int64_t pick(const double* bs, int64_t n, double target, const F& weight) {
  const int64_t nb = num_blocks(n);
  double cum = 0.0;
  for (int64_t k = 0; k < nb; ++k) {
    if (cum + bs[k] > target) {
      int64_t last = -1;
      const int64_t hi = std::min(n, (k + 1) * kBlock);
      for (int64_t i = k * kBlock; i < hi; ++i) {
        const double wi = weight(i);
        if (wi > 0.0) {
          last = i;
          if (cum + wi > target) return i;
          cum += wi;
        }
      }
      if (last >= 0) return last;
      break;  // a block sum disagreeing with its elements: fall back below
    }
    cum += bs[k];
  }
  for (int64_t i = n - 1; i >= 0; --i)
    if (weight(i) > 0.0) return i;
  return -1;
}

inline double total_of(const double* bs, int64_t n) {
  double t = 0.0;
  for (int64_t k = 0; k < num_blocks(n); ++k) t += bs[k];
  return t;
}

// rows: the log-scores, tau: tau_t; out and second unused
struct StepArgs : RowArgs {
  const double* tau_s;
  int64_t method;
  int64_t seed, offset;
  int64_t* samples;  // (P,)
};

// s <- exp(s - shift) with per-block sums of the lanes < n into bs
template <class VV>
CDM_INLINE void exp_blocks(typename VV::T* s, int64_t n, typename VV::T shift, double* bs, const Prefetch& pf) {
  using V = typename VV::V;
  const int64_t np = round_up(n);
  for (int64_t i0 = 0, k = 0; i0 < np; i0 += kBlock, ++k) {
    typename VV::Acc acc;
    const int64_t i1 = std::min(np, i0 + kBlock);
    for (int64_t i = i0; i < i1; i += VV::L) {
      pf.at(i);
      const V r = VV::exp(VV::load(s + i) - shift);
      VV::store(s + i, r);
      acc.add(r);  // padding lanes hold -inf: e^-inf = 0
    }
    bs[k] = acc.sum();
  }
}

// uniform analytic step from the ratios r in s (row from uniform_ratios)
template <class VV>
CDM_INLINE int64_t uniform_analytic(typename VV::T* s, double* bs, int64_t n, int64_t x,
                                    const UniformRow<typename VV::T>& row, const Decay& ds_, const Decay& dd_, double draw) {
  using V = typename VV::V;
  const int64_t np = round_up(n);
  double big_u = 0.0;
  for (int64_t i0 = 0, k = 0; i0 < np; i0 += kBlock, ++k) {  // u = max(r - beta S, floor), block sums of u
    typename VV::Acc acc;
    const int64_t i1 = std::min(np, i0 + kBlock);
    for (int64_t i = i0; i < i1; i += VV::L) {
      V u = clamp_floor<VV>(VV::load(s + i) - row.cs, row.floor);
      if (CDM_UNLIKELY(i + VV::L > n)) u = VV::below(n - i) ? u : V{};
      VV::store(s + i, u);
      acc.add(u);
    }
    bs[k] = acc.sum();
    big_u += bs[k];
  }
  const UniformCoeffs cs = uniform_coeffs(ds_, n);
  const UniformCoeffs cd = uniform_coeffs(dd_, n);
  const double ux = static_cast<double>(row.u_x);
  const double A = cd.beta * cs.alpha, B = cd.beta * cs.beta * big_u, C = cd.alpha * (cs.alpha * ux + cs.beta * big_u);
  for (int64_t k = 0; k < num_blocks(n); ++k) {  // block sums of P
    const int64_t len = std::min(n, (k + 1) * kBlock) - k * kBlock;
    bs[k] = A * bs[k] + static_cast<double>(len) * B + (x / kBlock == k ? C : 0.0);
  }
  const double target = draw * total_of(bs, n);
  return pick(bs, n, target, [&](int64_t i) { return A * static_cast<double>(s[i]) + B + (i == x ? C : 0.0); });
}

struct StepKernel {
  using Args = StepArgs;

  // decay of tau_t, tau_s and Delta, memoised on (tau_t, tau_s)
  struct Coeffs {
    double tau_t = std::numeric_limits<double>::quiet_NaN(), tau_s = 0.0;
    Decay dt{}, ds{}, dd{};
    void update(double t, double s) {
      if (t == tau_t && s == tau_s) return;
      tau_t = t;
      tau_s = s;
      dt = decay(t);
      ds = decay(s);
      dd = decay(t - s);
    }
  };

  template <class VV>
  static CDM_INLINE int64_t row_step(const Args& a, int64_t p, typename VV::T* s, double* bs, const Prefetch& pf,
                                     Coeffs& co) {
    using T = typename VV::T;
    const int64_t n = a.n, np = round_up(n), x = a.x[p], m = n - 1;
    const double tau_t = a.tau[p], tau_s = a.tau_s[p];
    const double draw = static_cast<double>(philox_uniform(a.seed, a.offset, p));
    const bool euler = a.method == 1 && tau_s != 0.0;
    const double delta = tau_t - tau_s;
    // an unmasked token stays (both methods); so does x without a jump rate
    if ((a.family == ABSORBING && x != m) || (euler && !(delta > 0.0))) {
      if (a.errors != nullptr) load_row<VV>(a.rows, a.dt, p, n, s, -kInf<T>, a.errors);  // read for the check only
      return x;
    }
    load_row<VV>(a.rows, a.dt, p, n, s, -kInf<T>, a.errors);
    co.update(tau_t, tau_s);

    if (a.family == UNIFORM && !euler) {
      const UniformRow<T> row = uniform_ratios<VV>(s, n, x, uniform_coeffs(co.dt, n), pf);
      const int64_t y = uniform_analytic<VV>(s, bs, n, x, row, co.ds, co.dd, draw);
      return y >= 0 ? y : x;
    }

    // absorbing analytic, or euler (both families): exponentials of the scores over the
    // states that can be reached, plus a constant weight on one state
    int64_t special;    // the state with the extra weight (x for euler, the mask for absorbing)
    double real_scale;  // multiplies e^{log_score - shift}
    double extra;       // weight of `special` on top of its exponential (which is 0)
    T shift;
    if (euler) {
      s[x] = -kInf<T>;  // no jump x -> x
      const double lj = std::log(delta / (a.family == UNIFORM ? static_cast<double>(n) : 1.0));
      const double mx = static_cast<double>(row_max<VV>(s, np));
      const double scale = std::max(0.0, lj + mx);
      shift = static_cast<T>(scale - lj);
      exp_blocks<VV>(s, n, shift, bs, pf);
      special = x;
      real_scale = 1.0;
      extra = std::max(std::exp(-scale) - total_of(bs, n), 0.0);
    } else {  // absorbing analytic, x = mask
      s[m] = -kInf<T>;
      shift = row_max<VV>(s, np);
      exp_blocks<VV>(s, n, shift, bs, pf);
      const double total = total_of(bs, n);
      const Decay &ds = co.ds, &dd = co.dd;
      real_scale = dd.one_minus_alpha * ds.alpha / total;
      extra = ds.one_minus_alpha;
      special = m;
      if (!(real_scale > 0.0) && !(extra > 0.0)) {  // 0/0 (tau_t = tau_s = 0): sample q
        real_scale = 1.0 / total;
        extra = 0.0;
      }
    }
    for (int64_t k = 0; k < num_blocks(n); ++k) bs[k] *= real_scale;
    bs[special / kBlock] += extra;
    const double target = draw * total_of(bs, n);
    const int64_t y = pick(bs, n, target, [&](int64_t i) {
      return real_scale * static_cast<double>(s[i]) + (i == special ? extra : 0.0);
    });
    return y >= 0 ? y : x;
  }

  // ---- lanes layout (short rows): one position per lane

  enum Mode : int { kStay = 0, kUniformAnalytic = 1, kUniformEuler = 2, kAbsorbingAnalytic = 3, kAbsorbingEuler = 4 };

  static Mode mode_of(const Args& a, int64_t p) {
    const bool euler = a.method == 1 && a.tau_s[p] != 0.0;
    if (a.family == ABSORBING && a.x[p] != a.n - 1) return kStay;
    if (euler && !(a.tau[p] - a.tau_s[p] > 0.0)) return kStay;
    if (a.family == UNIFORM) return euler ? kUniformEuler : kUniformAnalytic;
    return euler ? kAbsorbingEuler : kAbsorbingAnalytic;
  }

  // Samples a group whose lanes all share `mode` (or stay); the result per lane into out.
  template <class VV>
  static CDM_INLINE void group_step(const Args& a, const Group<VV>& g, Mode mode, typename VV::T* t, Coeffs& co) {
    using T = typename VV::T;
    using V = typename VV::V;
    using M = typename VV::M;
    using E = typename Group<VV>::E;
    const int64_t n = a.n, m = n - 1;
    const V zero{}, ninf = VV::splat(-kInf<T>);
    g.load(a.rows, a.dt, t, a.errors);
    const M xv = g.lanes_index(a.x);
    V c1, c2, c3, c4, c5;  // per-lane coefficients (meaning depends on the mode)
    for (int j = 0; j < VV::L; ++j) {
      const int64_t p = g.row(j);
      co.update(a.tau[p], a.tau_s[p]);
      const double delta = a.tau[p] - a.tau_s[p];
      if (mode == kUniformAnalytic) {
        const UniformCoeffs ct = uniform_coeffs(co.dt, n), cs = uniform_coeffs(co.ds, n), cd = uniform_coeffs(co.dd, n);
        c1[j] = static_cast<T>(ct.beta);
        c2[j] = static_cast<T>(cs.alpha);
        c3[j] = static_cast<T>(cs.beta);
        c4[j] = static_cast<T>(cd.alpha);
        c5[j] = static_cast<T>(cd.beta);
      } else if (mode == kAbsorbingAnalytic) {
        c1[j] = static_cast<T>(co.dd.one_minus_alpha * co.ds.alpha);  // real tokens (times q)
        c2[j] = static_cast<T>(co.ds.one_minus_alpha);                // the mask
      } else if (mode == kUniformEuler || mode == kAbsorbingEuler) {
        c1[j] = static_cast<T>(std::log(delta / (mode == kUniformEuler ? static_cast<double>(n) : 1.0)));
      }
    }
    // weights P_b = w1 * t_b + (b == special ? w2 : 0), t_b = e^{...} or u_b (uniform analytic: + w3)
    V w1, w2, w3 = zero;
    M special;
    if (mode == kUniformAnalytic) {
      V alpha_t;
      for (int j = 0; j < VV::L; ++j) {
        co.update(a.tau[g.row(j)], a.tau_s[g.row(j)]);
        alpha_t[j] = static_cast<T>(co.dt.alpha);
      }
      const GroupRatios<VV> gr = uniform_group_ratios<VV>(g, a.x, t, alpha_t, c1);
      const V cs = gr.cs, floor = gr.floor;
      V U{}, ux{};
      for (int64_t b = 0; b < n; ++b) {
        const V d = g.at(t, b) - cs;
        const V u = d < floor ? floor : d;
        g.put(t, b, u);
        U += u;
        ux = Group<VV>::eq(xv, b) ? u : ux;
      }
      // P_b = beta_D alpha_s u_b + beta_D beta_s U + [b = x] alpha_D (alpha_s u_x + beta_s U)
      w1 = c5 * c2;
      w3 = c5 * c3 * U;
      w2 = c4 * (c2 * ux + c3 * U);
      special = xv;
    } else {
      const bool euler = mode != kAbsorbingAnalytic;
      if (mode == kUniformEuler) {
        g.set_at(t, a.x, -kInf<T>);  // no jump x -> x
      } else {
        g.put(t, m, ninf);  // the mask has no exponential
      }
      const V mx = group_max<VV>(g, t);
      V shift = mx;
      V scale{};
      if (euler) {  // logits = log(Delta Q) + log_score, scale = max(0, max logit)
        scale = c1 + mx;
        scale = scale > zero ? scale : zero;
        shift = scale - c1;
      }
      const V S = group_exp_store<VV>(g, t, shift);
      if (euler) {
        w1 = VV::splat(T(1));
        const V stay = VV::exp(-scale) - S;
        w2 = stay > zero ? stay : zero;
        special = mode == kUniformEuler ? xv : typename VV::M{} + static_cast<E>(m);
      } else {
        w1 = c1 / S;
        w2 = c2;
        const auto has_mass = (w1 > zero) | (w2 > zero);  // else 0/0 (tau_t = tau_s = 0): sample q
        w1 = has_mass ? w1 : VV::splat(T(1)) / S;
        special = typename VV::M{} + static_cast<E>(m);
      }
    }
    // inverse CDF: total, then the first state whose cumulative weight exceeds u * total
    V total{};
    for (int64_t b = 0; b < n; ++b) total += w1 * g.at(t, b) + w3 + (Group<VV>::eq(special, b) ? w2 : zero);
    V draw{};
    for (int j = 0; j < VV::L; ++j) draw[j] = static_cast<T>(philox_uniform(a.seed, a.offset, g.row(j)));
    const V target = draw * total;
    const M none = typename VV::M{} - 1;
    M pick = none, last = none;
    V cum{};
    for (int64_t b = 0; b < n; ++b) {
      const V w = w1 * g.at(t, b) + w3 + (Group<VV>::eq(special, b) ? w2 : zero);
      cum += w;
      const M bv = typename VV::M{} + static_cast<E>(b);
      pick = ((cum > target) & (pick < 0)) ? bv : pick;
      last = w > zero ? bv : last;
    }
    pick = pick < 0 ? last : pick;
    pick = pick < 0 ? xv : pick;
    for (int j = 0; j < g.cnt; ++j) {
      const int64_t p = g.p0 + j;
      a.samples[p] = mode_of(a, p) == kStay ? a.x[p] : static_cast<int64_t>(pick[j]);
    }
  }

  template <class VV>
  static CDM_INLINE void rows(const Args& a, int64_t b, int64_t e) {
    Scratch<typename VV::T> scratch(a.n, 1);
    std::vector<double> bs(num_blocks(a.n) + 1);
    Coeffs co;
    if (a.n <= kLanesMaxN) {
      Scratch<typename VV::T> tile(a.n * VV::L, 1);
      for (int64_t p0 = b; p0 < e; p0 += VV::L) {
        const Group<VV> g = make_group<VV>(p0, e, a.n);
        Mode mode = kStay;
        bool mixed = false;
        for (int j = 0; j < g.cnt; ++j) {
          const Mode mj = mode_of(a, p0 + j);
          if (mj == kStay) continue;
          if (mode != kStay && mj != mode) mixed = true;
          mode = mj;
        }
        if (mode == kStay) {
          if (a.errors != nullptr) g.load(a.rows, a.dt, tile.row(0), a.errors);  // read for the check only
          for (int j = 0; j < g.cnt; ++j) a.samples[p0 + j] = a.x[p0 + j];
        } else if (!mixed) {
          group_step<VV>(a, g, mode, tile.row(0), co);
        } else {  // positions of a group taking different kinds of step (rare): one by one
          for (int j = 0; j < g.cnt; ++j) a.samples[p0 + j] = row_step<VV>(a, p0 + j, scratch.row(0), bs.data(), {}, co);
        }
      }
      return;
    }
    for (int64_t p = b; p < e; ++p) {
      a.samples[p] = row_step<VV>(a, p, scratch.row(0), bs.data(), next_rows(p, e, a.n, a.rows, a.dt), co);
    }
  }
};

// ----------------------------------------------------------------------------- dense

void dense_step(const Dense& g, const StepArgs& a, int64_t positions) {
  const int64_t n = a.n;
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor rate_t;  // Q^T: rate_t[x, y] = Q[y, x]
  if (a.method == 1) rate_t = dense_rate_matrix(g).t().contiguous();
  const double* qt = a.method == 1 ? rate_t.data_ptr<double>() : nullptr;
  dense_blocks(positions, dense_block_rows(n), [&](int64_t b, int64_t e) {
    const int64_t rows = e - b;
    Scratch<double> buf(rows * n + W, 6);
    double *r = buf.row(0), *u = buf.row(1), *l = buf.row(2), *work = buf.row(3), *w = buf.row(4), *col = buf.row(5);
    std::vector<double> mx(rows), tau_s(a.tau_s + b, a.tau_s + e), delta(rows);
    for (int64_t c = 0; c < rows; ++c) delta[c] = a.tau[b + c] - tau_s[c];
    dense_log_posterior(g, a.rows, a.dt, a.x + b, a.tau + b, b, rows, r, u, l, work, mx.data(), a.errors);
    double* probs = u;
    if (a.method == 0) {
      // w = q / K(tau_t)[:, x] (0 where q = 0), P = K(Delta)[:, x] * (K(tau_s)^T w), clamped at 0
      dense_column(g, a.x + b, a.tau + b, rows, col, work);
      for (int64_t i = 0; i < rows * n; ++i) {
        const double lc = col[i] > 0.0 ? std::max(std::log(col[i]), -1e30) : -1e30;
        w[i] = l[i] > -inf ? std::exp(l[i] - lc) : 0.0;
      }
      dense_apply(g, w, tau_s.data(), 1.0, rows, /*transpose=*/true, r, work);
      dense_column(g, a.x + b, delta.data(), rows, col, work);
      for (int64_t i = 0; i < rows * n; ++i) probs[i] = std::max(col[i] * r[i], 0.0);
    } else {
      for (int64_t c = 0; c < rows; ++c) {
        double* pr = probs + c * n;
        const int64_t x = a.x[b + c];
        if (tau_s[c] == 0.0) {  // p_0|t
          for (int64_t y = 0; y < n; ++y) pr[y] = std::exp(l[c * n + y]);
          continue;
        }
        load_row<DenseVT>(a.rows, a.dt, b + c, n, w, -inf);  // w: one row of scratch (+ padding)
        double lmax = -inf;
        for (int64_t y = 0; y < n; ++y) {
          const double jump = delta[c] * std::max(qt[x * n + y], 0.0);
          const double logit = jump > 0.0 ? std::log(jump) + w[y] : -inf;
          pr[y] = logit;
          lmax = std::max(lmax, logit);
        }
        const double scale = std::max(lmax, 0.0);
        double sum = 0.0;
        for (int64_t y = 0; y < n; ++y) {
          pr[y] = std::exp(pr[y] - scale);
          sum += pr[y];
        }
        pr[x] += std::max(std::exp(-scale) - sum, 0.0);
      }
    }
    std::vector<double> bs(num_blocks(n) + 1);
    for (int64_t c = 0; c < rows; ++c) {
      const double* pr = probs + c * n;
      for (int64_t k = 0; k < num_blocks(n); ++k) {
        double t = 0.0;
        for (int64_t i = k * kBlock; i < std::min(n, (k + 1) * kBlock); ++i) t += pr[i];
        bs[k] = t;
      }
      const int64_t p = b + c;
      const double draw = static_cast<double>(philox_uniform(a.seed, a.offset, p));
      const int64_t y = pick(bs.data(), n, draw * total_of(bs.data(), n), [&](int64_t i) { return pr[i]; });
      a.samples[p] = y >= 0 ? y : a.x[p];
    }
  });
}

// ----------------------------------------------------------------------------- op

at::Tensor fused_euler_step_cpu(int64_t family, const c10::optional<at::Tensor>& evals,
                          const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                          const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau_t,
                          const at::Tensor& tau_s, int64_t method, const at::Tensor& seed_offset) {
  check_row_inputs(log_score, "log_score", x, tau_t, "tau_t");
  const int64_t positions = log_score.size(0), n = log_score.size(1);
  check_positions(tau_s, "tau_s", positions, at::kDouble);
  TORCH_CHECK(method == 0 || method == 1, "cdm_kernels: method must be 0 (analytic) or 1 (euler), got ", method);
  TORCH_CHECK(seed_offset.device().is_cpu() && seed_offset.scalar_type() == at::kLong && seed_offset.numel() == 2,
              "cdm_kernels: seed_offset must be a CPU int64 tensor [seed, offset], got ", seed_offset.scalar_type(),
              " of shape ", seed_offset.sizes(), " on ", seed_offset.device());
  const at::Tensor so = seed_offset.contiguous();
  const int64_t seed = so.data_ptr<int64_t>()[0], offset = so.data_ptr<int64_t>()[1];
  TORCH_CHECK(offset >= 0, "cdm_kernels: the Philox offset must be non-negative, got ", offset);
  const Dense g = check_graph(family, evals, vecs, vecs_inv, n);
  at::Tensor out = at::empty({positions}, x.options());
  if (positions == 0) return out;
  ValueErrors errors;
  StepArgs args{row_args(family, log_score, x, tau_t, nullptr), tau_s.data_ptr<double>(), method, seed, offset,
                out.data_ptr<int64_t>()};
  args.errors = value_checks_on() ? &errors : nullptr;
  if (family == DENSE) {
    dense_step(g, args, positions);
  } else {
    run_rows_of<StepKernel>(args.dt, args, positions, n);
  }
  raise_value_errors(errors, {{kRowsNotFinite, "log_score contains NaN or inf"}});
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cdm_kernels, CPU, m) { m.impl("fused_euler_step", &fused_euler_step_cpu); }

}  // namespace cpu
}  // namespace cdm
