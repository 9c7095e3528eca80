// The inversion kernels shared by scores_to_posterior (scores_to_posterior.cu) and the matching
// loss (conditional_matching_loss.cu): the forward log p_0|t, and its backward (from a gradient
// row, or from a target row and a per-position grad_loss).
//
// Uniform graph, per row (r = exp(log_score' - M), log_score' = log_score with 0 at x,
// M = max(m, 0), m = max_{y != x} log_score_y; S = sum r; u = max(r - beta S, floor),
// floor = max(POSTERIOR_FLOOR e^-M alpha, smallest normal); q = K[:, x] u / Z, Z = beta sum(u) + alpha u_x):
//   forward    pass 1  m, s = sum_{y != x} e^{ls_y - m} (1 exp / state)     -> M, S = s e^{m-M} + e^-M
//              pass 2  U = sum u                           (1 exp / state)     -> Z
//              pass 3  out = log u + log K[y, x] - log Z  (1 exp + 1 log / state)
//   backward   (g = dL/dlog q; as csrc/cpu/scores_to_posterior.cpp)
//              pass 1  m, s and G = sum g
//              pass 2  U, H = sum w g / u, Wt = sum w  (w = 1 unclamped, 1/2 on a tie, 0 clamped)
//              pass 3  out_y = r_y (w_y (g_y / u_y - beta G / Z) - beta (H - G/Z (beta Wt + alpha w_x))), 0 at x
// The matching loss with its gradient (InversionArgs::loss): the backward at grad_loss = 1,
// its passes also summing the loss and checking the values they read.
// Absorbing graph: x != mask: log e_x (forward), 0 (backward). x = mask: a log-softmax over
// the real tokens (pass 1 = m, s over y != mask; pass 2 writes ls - m - log s, or for the
// backward g - softmax sum(g), sum over every entry as log_softmax's backward).
// Rows read by several passes are cached in shared memory when they fit (cuda_common.cuh).
#pragma once

#include "cuda/cuda_common.cuh"
#include "cuda/value_checks.cuh"

namespace cdm {
namespace gpu {

template <class S>
struct InversionArgs : RowArgs {
  const S* ls;      // (P, N) log-scores
  const S* second;  // backward: the gradient rows, or the target rows (from_target)
  const float* gl;  // from_target: grad_loss (P,)
  S* out;           // (P, N)
  int from_target;
  float* loss = nullptr;  // the matching loss with its gradient: (P,) loss out, G = -target (grad_loss 1)
};

// u = max(e^{v - M} - beta S, floor) and its clamp weight (torch.maximum's gradient split).
// Precise: e^{v - M} with the IEEE expf (the backward divides by u; see pexp).
template <class C, bool Precise = false>
struct Inversion {
  C Mc, cs, fl;
  CDM_DEV C r_of(C v) const { return Precise ? pexp(v - Mc) : fexp(v - Mc); }
  CDM_DEV C d_of(C v) const { return r_of(v) - cs; }
  CDM_DEV C u_of(C v) const {
    const C d = d_of(v);
    return d < fl ? fl : d;
  }
  CDM_DEV C w_of(C d) const { return d > fl ? C(1) : (d == fl ? C(0.5) : C(0)); }
};

// Row scalars of the uniform inversion from pass 1's (m, s) over y != x.
template <class C, bool Precise = false>
CDM_DEV Inversion<C, Precise> uniform_inversion(double m, double s, const UniformCoeffs& c) {
  const double M = tmax(m, 0.0);
  const double S_total = s * exp(m - M) + exp(-M);  // r_x = e^-M
  Inversion<C, Precise> inv;
  inv.Mc = static_cast<C>(M);
  inv.cs = static_cast<C>(c.beta * S_total);
  // the inversion leaves out the factor 1/alpha of K(-tau)^T r, so the floor is scaled by
  // alpha alike; never below the smallest normal number (reference.py)
  const C floor = static_cast<C>(POSTERIOR_FLOOR * exp(-M) * c.alpha);
  const C tiny = static_cast<C>(sizeof(C) == 4 ? 1.17549435082228750797e-38 : 2.22507385850720138309e-308);
  inv.fl = floor < tiny ? tiny : floor;
  return inv;
}

// Sum of u over the kEPT slots of (seg, lane) already loaded into `raw` (state x counts
// with log-score 0, slots past n not at all): the inversion's pass 2.
template <class S, bool AL, class Inv>
CDM_DEV auto lane_u_sum(const Inv& inv, const S* raw, int64_t seg, int lane, int64_t n, int64_t x) {
  using C = typename Compute<S>::type;
  C part = C(0);
  with_plain(seg, n, x, [&](auto plain) {
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      if constexpr (decltype(plain)::value) {
        part += inv.u_of(to_compute<C>(raw[k]));
      } else {
        const int64_t i = slot_index<AL>(seg, lane, k);
        if (i < n) part += inv.u_of(i == x ? C(0) : to_compute<C>(raw[k]));
      }
    }
  });
  return part;
}

template <class S, bool AL, int W>
CDM_GLOBAL void CDM_BOUNDS(Group<W>::kBlock, min_blocks<S>()) posterior_forward_kernel(const InversionArgs<S> a) {
  using C = typename Compute<S>::type;
  CDM_ROW_GROUP(a, g, p, gs);
  const int64_t n = a.n, x = a.x[p];
  const S* row = a.ls + p * n;
  S* out = a.out + p * n;
  int bad = 0;
  if (a.errors != nullptr && g.tid == 0) check_position(a.errors, n, x, a.tau[p], nullptr);
  if (a.family == ABSORBING && x != n - 1) {
    if (a.errors != nullptr) {  // a row read for the check only
      read_segments<S, AL, W>(g, row, n, nullptr, [&](int64_t, const S* raw) { bad |= raw_not_finite(raw, false); });
      if (bad) flag_error(a.errors, kRowsNotFinite);
    }
    fill_row<S, AL, W>(g, out, n, x, C(0), -pos_inf<C>());
    return;
  }
  S* cache = cache_row<S>(gs, a.plan, 0);
  prefetch_row(g, row, n * static_cast<int64_t>(sizeof(S)), a.plan.l2_prefetch);
  double m, s;
  pass_max_sumexp<S, AL, W>(g, row, cache, n, x, nullptr, nullptr, m, s, NoExtra{},
                            a.errors != nullptr ? &bad : nullptr);
  if (bad) flag_error(a.errors, kRowsNotFinite);
  const S* src = cache != nullptr ? cache : row;
  if (a.family == ABSORBING) {  // x = mask: log-softmax over the real tokens
    const C mc = static_cast<C>(m), lsum = static_cast<C>(log(s));
    map_segments<S, AL, W>(g, src, out, n, [&](int64_t seg, S* raw) {
#pragma unroll
      for (int k = 0; k < kEPT; ++k) {
        const int64_t i = slot_index<AL>(seg, g.lane, k);
        raw[k] = to_storage<S>(i == x ? -pos_inf<C>() : (to_compute<C>(raw[k]) - mc) - lsum);
      }
    });
    return;
  }
  const UniformCoeffs c = uniform_coeffs(a.tau[p], n);
  const Inversion<C> inv = uniform_inversion<C>(m, s, c);
  C acc = C(0);
  read_segments<S, AL, W>(g, src, n, nullptr,
                          [&](int64_t seg, const S* raw) { acc += lane_u_sum<S, AL>(inv, raw, seg, g.lane, n, x); });
  const double U = g.sum(static_cast<double>(acc));
  const double z = c.beta * U + c.alpha * static_cast<double>(inv.u_of(C(0)));
  const double lz = log(z);
  const C off = static_cast<C>(log(c.off()) - lz), on = static_cast<C>(log(c.on()) - lz);
  map_segments<S, AL, W>(g, src, out, n, [&](int64_t seg, S* raw) {
    with_plain(seg, n, x, [&](auto plain) {
#pragma unroll
      for (int k = 0; k < kEPT; ++k) {
        if constexpr (decltype(plain)::value) {
          raw[k] = to_storage<S>(flog(inv.u_of(to_compute<C>(raw[k]))) + off);
        } else {
          const int64_t i = slot_index<AL>(seg, g.lane, k);
          const C v = i == x ? C(0) : to_compute<C>(raw[k]);
          raw[k] = to_storage<S>(flog(inv.u_of(v)) + (i == x ? on : off));
        }
      }
    });
  });
}

// The matching loss of an absorbing row whose token x is real (q = e_x) into *loss: 0, or inf
// with target mass off x; with `errors`, the target's checks and the log-scores' (read for
// the check only).
template <class S, bool AL, int W>
CDM_DEV void real_token_loss(const Group<W>& g, const S* row, const S* trow, int64_t n, int64_t x, float* loss,
                             ErrorRecord* errors) {
  using C = typename Compute<S>::type;
  TargetChecks<C> tc;
  int bad = 0;
  read_segments<S, AL, W>(g, trow, n, nullptr, [&](int64_t seg, const S* traw) {
    if (errors != nullptr) tc.add(traw);
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t i = slot_index<AL>(seg, g.lane, k);
      if (i < n && i != x && to_compute<C>(traw[k]) > C(0)) bad = 1;
    }
  });
  bad = g.max(bad);
  if (g.tid == 0) *loss = bad ? INFINITY : 0.0f;
  if (errors != nullptr) {
    int bad_rows = 0;
    read_segments<S, AL, W>(g, row, n, nullptr, [&](int64_t, const S* raw) { bad_rows |= raw_not_finite(raw, false); });
    if (bad_rows) flag_error(errors, kRowsNotFinite);
    tc.flag(g, errors);
  }
}

// Gradient w.r.t. log_score of <G, log q>, recomputing the forward. G is the `second`
// row, or (from_target) -grad_loss[p] * target where target > 0 (the matching loss).
// a.loss set (the matching loss with its gradient, grad_loss = 1): the passes also sum
// the loss of conditional_matching_loss.cu's loss_kernel and check what they read, so
// that one read of the row gives both.
template <class S, bool AL, int W>
CDM_GLOBAL void CDM_BOUNDS(Group<W>::kBlock, min_blocks<S>()) posterior_backward_kernel(const InversionArgs<S> a) {
  using C = typename Compute<S>::type;
  CDM_ROW_GROUP(a, g, p, gs);
  const int64_t n = a.n, x = a.x[p];
  S* out = a.out + p * n;
  const S* row = a.ls + p * n;
  const S* grow = a.second + p * n;
  const bool with_loss = a.loss != nullptr, checked = with_loss && a.errors != nullptr;
  TargetChecks<C> tc;  // with the loss: the target's value checks, in the pass that reads it
  int bad_rows = 0;
  if (checked && g.tid == 0) check_position(a.errors, n, x, a.tau[p], nullptr);
  if (a.family == ABSORBING && x != n - 1) {
    fill_row<S, AL, W>(g, out, n, x, C(0), C(0));
    if (with_loss) real_token_loss<S, AL, W>(g, row, grow, n, x, a.loss + p, a.errors);
    return;
  }
  S* cache_l = cache_row<S>(gs, a.plan, 0);
  S* cache_g = cache_row<S>(gs, a.plan, 1);
  const bool from_target = a.from_target != 0 || with_loss;
  const C scale = with_loss ? C(-1) : (from_target ? static_cast<C>(-a.gl[p]) : C(1));
  auto gval = [&](C t) -> C { return from_target ? (t > C(0) ? scale * t : C(0)) : t; };
  C gacc = C(0);
  auto stream_grad = [&](int64_t seg) {
    alignas(16) S raw[kEPT];
    load_raw<S, AL>(grow, n, seg, g.lane, raw);
    if (cache_g != nullptr) store_raw<S, AL>(cache_g, n, seg, g.lane, raw);
    if (checked) tc.add(raw);
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      if (slot_index<AL>(seg, g.lane, k) < n) gacc += gval(to_compute<C>(raw[k]));
    }
  };
  prefetch_row(g, row, n * static_cast<int64_t>(sizeof(S)), a.plan.l2_prefetch);
  prefetch_row(g, grow, n * static_cast<int64_t>(sizeof(S)), a.plan.l2_prefetch);
  double m, s;
  pass_max_sumexp<S, AL, W>(g, row, cache_l, n, x, nullptr, nullptr, m, s, stream_grad,
                            checked ? &bad_rows : nullptr);
  if (bad_rows) flag_error(a.errors, kRowsNotFinite);
  if (checked) tc.flag(g, a.errors);
  const double G = g.sum(static_cast<double>(gacc));
  const S* lsrc = cache_l != nullptr ? cache_l : row;
  const S* gsrc = cache_g != nullptr ? cache_g : grow;
  if (a.family == ABSORBING) {  // x = mask
    const C mc = static_cast<C>(m), k_soft = static_cast<C>(G / s);
    C acc_a = C(0), acc_t = C(0);  // with the loss: sum t (ls - m), sum t over the real tokens
    int bad = 0;                   // with the loss: target mass on the mask
    map_segment_pairs<S, AL, W>(g, lsrc, gsrc, out, n, [&](int64_t seg, S* lraw, const S* graw) {
#pragma unroll
      for (int k = 0; k < kEPT; ++k) {
        const int64_t i = slot_index<AL>(seg, g.lane, k);
        const C t = to_compute<C>(graw[k]);
        const C gv = gval(t);
        if (with_loss && i < n && t > C(0)) {
          if (i == x) {
            bad = 1;
          } else {
            acc_a += t * (to_compute<C>(lraw[k]) - mc);
            acc_t += t;
          }
        }
        lraw[k] = to_storage<S>(i == x ? C(0) : gv - fexp(to_compute<C>(lraw[k]) - mc) * k_soft);
      }
    });
    if (with_loss) {
      const double A = g.sum(static_cast<double>(acc_a));
      const double T = g.sum(static_cast<double>(acc_t));
      bad = g.max(bad);
      if (g.tid == 0) a.loss[p] = bad ? INFINITY : static_cast<float>(T * log(s) - A);
    }
    return;
  }
  const UniformCoeffs c = uniform_coeffs(a.tau[p], n);
  const Inversion<C, true> inv = uniform_inversion<C, true>(m, s, c);
  const C log_off = with_loss ? static_cast<C>(log(c.off())) : C(0);
  const C log_on = with_loss ? static_cast<C>(log(c.on())) : C(0);
  C acc_u = C(0), acc_h = C(0), acc_w = C(0), acc_a = C(0), acc_t = C(0);
  read_segment_pairs<S, AL, W>(g, lsrc, gsrc, n, nullptr, [&](int64_t seg, const S* lraw, const S* graw) {
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t i = slot_index<AL>(seg, g.lane, k);
      if (i < n) {
        const C d = inv.d_of(i == x ? C(0) : to_compute<C>(lraw[k]));
        const C u = d < inv.fl ? inv.fl : d;
        const C w = inv.w_of(d);
        const C t = to_compute<C>(graw[k]);
        acc_u += u;
        acc_w += w;
        if (w != C(0)) acc_h += w * (gval(t) / u);
        if (with_loss && t > C(0)) {  // 0 log 0 = 0
          acc_a += t * ((i == x ? log_on : log_off) + flog(u));
          acc_t += t;
        }
      }
    }
  });
  const double U = g.sum(static_cast<double>(acc_u));
  const double H = g.sum(static_cast<double>(acc_h));
  const double Wt = g.sum(static_cast<double>(acc_w));
  const C dx = inv.d_of(C(0));
  const double ux = static_cast<double>(dx < inv.fl ? inv.fl : dx);
  const double wx = static_cast<double>(inv.w_of(dx));
  const double z = c.beta * U + c.alpha * ux;
  if (with_loss) {
    const double A = g.sum(static_cast<double>(acc_a));
    const double T = g.sum(static_cast<double>(acc_t));
    if (g.tid == 0) a.loss[p] = static_cast<float>(T * log(z) - A);
  }
  const double k1 = G / z;                                     // dL/du_b = w_b (g_b / u_b - K[b, x] k1)
  const double sum_du = H - k1 * (c.beta * Wt + c.alpha * wx);  // sum_b dL/du_b
  const C bk = static_cast<C>(c.beta * k1), bs = static_cast<C>(c.beta * sum_du);
  map_segment_pairs<S, AL, W>(g, lsrc, gsrc, out, n, [&](int64_t seg, S* lraw, const S* graw) {
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t i = slot_index<AL>(seg, g.lane, k);
      C o = C(0);
      if (i != x) {  // b != x: K[b, x] = beta; dL/dr_b = dL/du_b - beta sum dL/du; r_x := 1 is no input
        const C r = inv.r_of(to_compute<C>(lraw[k]));
        const C d = r - inv.cs;
        const C u = d < inv.fl ? inv.fl : d;
        const C w = inv.w_of(d);
        const C h = w != C(0) ? w * (gval(to_compute<C>(graw[k])) / u) : C(0);
        o = r * ((h - w * bk) - bs);
      }
      lraw[k] = to_storage<S>(o);
    }
  });
}

// Host: launch the backward kernel (grad rows, or target rows with grad_loss); scores_to_posterior.cu.
void launch_posterior_backward(int64_t family, const at::Tensor& log_score, const at::Tensor& second,
                               const float* grad_loss, const RowInputs& in, at::Tensor& out);

}  // namespace gpu
}  // namespace cdm
