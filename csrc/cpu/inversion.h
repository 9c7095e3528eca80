// Row passes shared by the kernels that invert scores (posterior, loss, reverse step).
//
// A row of log-scores is first copied into a padded scratch row s (pad lanes -inf). Then
//   row_max             M = max_b s_b                              (1 compare / element)
//   exp_shift_store     s_b <- exp(s_b - M), returns S = sum_b s_b (1 exp / element)
// For the uniform graph `uniform_ratios` does both with the r_x := 1 rule (s_x = 0 before
// the max) and derives the per-row scalars of the clamped inversion (reference.py)
//   u_b = max(r_b - beta S, floor),  floor = max(POSTERIOR_FLOOR e^-M alpha, smallest normal),
// with r = e^{log_score' - M} (every map is homogeneous in r; the scale e^-M cancels, and
// so does the factor 1/alpha of K(-tau)^T r = (r - beta S) / alpha, which is why the floor
// carries alpha).
// All helpers take the vector traits VV = VT<T, bytes> (cpu_common.h) and loop over the
// padded row (a multiple of 16 elements, hence of every VV::L).
#pragma once

#include "cpu/cpu_common.h"
#include "cpu/lanes.h"

namespace cdm {
namespace cpu {

inline int64_t dt_size(DT dt) { return dt == DT::F64 ? 8 : (dt == DT::F32 ? 4 : 2); }

// Software prefetch of the next position's input rows (up to two tensors), issued from
// the compute-heavy pass of the current row so that its copy into scratch finds them in
// cache: one prefetch per vector of the current row, at the same relative position.
struct Prefetch {
  const char* p0 = nullptr;
  int64_t s0 = 0;  // bytes per element
  const char* p1 = nullptr;
  int64_t s1 = 0;
  CDM_INLINE void at(int64_t i) const {
    if (p0) __builtin_prefetch(p0 + i * s0, 0, 3);
    if (p1) __builtin_prefetch(p1 + i * s1, 0, 3);
  }
};

// rows p + 1 of (P, n) tensors a (and b), or nothing at the last row of a task
inline Prefetch next_rows(int64_t p, int64_t end, int64_t n, const void* a, DT da, const void* b = nullptr,
                          DT db = DT::F32) {
  Prefetch pf;
  if (p + 1 >= end) return pf;
  pf.p0 = static_cast<const char*>(a) + (p + 1) * n * dt_size(da);
  pf.s0 = dt_size(da);
  if (b) {
    pf.p1 = static_cast<const char*>(b) + (p + 1) * n * dt_size(db);
    pf.s1 = dt_size(db);
  }
  return pf;
}

template <class VV>
CDM_INLINE typename VV::T row_max(const typename VV::T* s, int64_t np) {
  using V = typename VV::V;
  V m = VV::splat(-kInf<typename VV::T>);
  for (int64_t i = 0; i < np; i += VV::L) {
    const V v = VV::load(s + i);
    m = v > m ? v : m;
  }
  return VV::hmax(m);
}

template <class VV>
CDM_INLINE double exp_shift_store(typename VV::T* s, int64_t np, typename VV::T shift, const Prefetch& pf = {}) {
  typename VV::Acc acc;
  for (int64_t i = 0; i < np; i += VV::L) {
    pf.at(i);
    const typename VV::V r = VV::exp(VV::load(s + i) - shift);
    VV::store(s + i, r);
    acc.add(r);
  }
  return acc.sum();
}

template <class VV>
CDM_INLINE double exp_shift_sum(const typename VV::T* s, int64_t np, typename VV::T shift, const Prefetch& pf = {}) {
  typename VV::Acc acc;
  for (int64_t i = 0; i < np; i += VV::L) {
    pf.at(i);
    acc.add(VV::exp(VV::load(s + i) - shift));
  }
  return acc.sum();
}

template <class VV>
CDM_INLINE double row_sum(const typename VV::T* s, int64_t np) {
  typename VV::Acc acc;
  for (int64_t i = 0; i < np; i += VV::L) acc.add(VV::load(s + i));
  return acc.sum();
}

// u = max(d, floor), propagating NaN from d
template <class VV>
CDM_INLINE typename VV::V clamp_floor(typename VV::V d, typename VV::T floor) {
  return d < floor ? VV::splat(floor) : d;
}
template <class T>
CDM_INLINE T clamp_floor_scalar(T d, T floor) {
  return d < floor ? floor : d;
}

// coefficients and their logs, memoised on tau
struct UniformLogCache {
  double tau = std::numeric_limits<double>::quiet_NaN();
  UniformCoeffs c{};
  double log_off = 0.0, log_on = 0.0;
  const UniformLogCache& operator()(double t, int64_t n) {
    if (!(t == tau)) {
      tau = t;
      c = uniform_coeffs(t, n);
      log_off = std::log(c.off());
      log_on = std::log(c.on());
    }
    return *this;
  }
};

// The clamp of reference.scores_to_posterior, in the work dtype T: POSTERIOR_FLOOR e^-M
// (times alpha = e^-tau for the uniform graph, whose inversion leaves 1/alpha out), never
// below the smallest normal number of T.
template <class T>
CDM_INLINE T posterior_floor(T M, T alpha = T(1)) {
  const T f = (static_cast<T>(POSTERIOR_FLOOR) * std::exp(-M)) * alpha;
  const T tiny = std::numeric_limits<T>::min();
  return f < tiny ? tiny : f;
}
template <class VV>
CDM_INLINE typename VV::V posterior_floor_v(typename VV::V M, typename VV::V alpha) {
  using T = typename VV::T;
  const typename VV::V f = (VV::exp(-M) * static_cast<T>(POSTERIOR_FLOOR)) * alpha;
  const T tiny = std::numeric_limits<T>::min();
  return f < tiny ? VV::splat(tiny) : f;
}

template <class T>
struct UniformRow {
  UniformCoeffs c;
  T M;       // row max of log_score' (>= 0: it includes the 0 at x)
  double S;  // sum of r
  T cs;      // beta S, rounded to T: u_b = max(r_b - cs, floor)
  T floor;   // max(POSTERIOR_FLOOR e^-M alpha, smallest normal)
  T r_x;     // e^-M
  T u_x;     // max(r_x - cs, floor)
};

// s: a log-score row loaded with -inf padding. Leaves r in s.
template <class VV>
CDM_INLINE UniformRow<typename VV::T> uniform_ratios(typename VV::T* s, int64_t n, int64_t x, const UniformCoeffs& c,
                                                     const Prefetch& pf = {}) {
  using T = typename VV::T;
  const int64_t np = round_up(n);
  UniformRow<T> row;
  s[x] = T(0);  // r_x := 1
  row.M = row_max<VV>(s, np);
  row.S = exp_shift_store<VV>(s, np, row.M, pf);
  row.c = c;
  row.cs = static_cast<T>(row.c.beta * row.S);
  row.floor = posterior_floor<T>(row.M, static_cast<T>(c.alpha));
  row.r_x = s[x];
  row.u_x = clamp_floor_scalar<T>(row.r_x - row.cs, row.floor);
  return row;
}

// Uniform backward given G (the gradient of log q) in g, padded with 0. Leaves
// dL/dlog_score in s (s: the log-score row loaded with -inf padding; h: scratch).
//   dL/du_b = w_b (G_b / u_b - K[b, x] sum(G) / Z)   (w: 1 unclamped, 0 clamped, 1/2 on a tie)
//   dL/dlog_score_b = r_b (dL/du_b - beta sum dL/du),  0 at b = x
// kLoss (the matching loss's forward, G = -t+) also returns sum_{G != 0} G_b log q_b, from the
// same pass: sum G_b log u_b + log K[., x] . G - sum(G) log Z (0 without kLoss).
template <class VV, bool kLoss = false>
CDM_INLINE double uniform_backward_row(int64_t n, int64_t x, const UniformCoeffs& c, typename VV::T* s, const typename VV::T* g,
                                     typename VV::T* h, const Prefetch& pf = {}) {
  using T = typename VV::T;
  using V = typename VV::V;
  const int64_t np = round_up(n);
  const double sum_g = row_sum<VV>(g, np);
  const UniformRow<T> row = uniform_ratios<VV>(s, n, x, c, pf);
  const V one = VV::splat(T(1)), half = VV::splat(T(0.5)), zero{};
  typename VV::Acc acc_u, acc_h, acc_w, acc_l;
  for (int64_t i = 0; i < np; i += VV::L) {
    const V d = VV::load(s + i) - row.cs;
    V u = clamp_floor<VV>(d, row.floor);
    V w = (d > row.floor ? one : zero) + (d == row.floor ? half : zero);
    if (CDM_UNLIKELY(i + VV::L > n)) {
      const auto valid = VV::below(n - i);
      u = valid ? u : zero;
      w = valid ? w : zero;
    }
    const V gv = VV::load(g + i);
    const V hv = w != zero ? w * (gv / u) : zero;  // w G / u
    VV::store(h + i, hv);
    acc_u.add(u);
    acc_h.add(hv);
    acc_w.add(w);
    if constexpr (kLoss) acc_l.add(gv != zero ? gv * VV::log_normal(u) : zero);
  }
  const double z = row.c.beta * acc_u.sum() + row.c.alpha * static_cast<double>(row.u_x);
  double loss = 0.0;
  if constexpr (kLoss) {  // 0 log 0 = 0: a term only where G has mass
    const double g_x = g[x], g_off = sum_g - g_x;
    loss = acc_l.sum();
    if (g_off != 0.0) loss += std::log(row.c.off()) * g_off;
    if (g_x != 0.0) loss += std::log(row.c.on()) * g_x;
    if (sum_g != 0.0) loss -= std::log(z) * sum_g;
  }
  const double k1 = sum_g / z;  // dL/du_b = h_b - w_b K[b, x] k1
  const T dx = row.r_x - row.cs;
  const double w_x = dx > row.floor ? 1.0 : (dx == row.floor ? 0.5 : 0.0);
  // sum_b dL/du_b = sum h - k1 (beta sum w + alpha w_x)
  const double sum_du = acc_h.sum() - k1 * (row.c.beta * acc_w.sum() + row.c.alpha * w_x);
  const T bk = static_cast<T>(row.c.beta * k1);
  const T bs = static_cast<T>(row.c.beta * sum_du);
  for (int64_t i = 0; i < np; i += VV::L) {
    const V r = VV::load(s + i);
    const V d = r - row.cs;
    const V w = (d > row.floor ? one : zero) + (d == row.floor ? half : zero);
    // b != x: K[b, x] = beta; dL/dr_b = dL/du_b - beta sum dL/du
    VV::store(s + i, r * ((VV::load(h + i) - w * bk) - bs));
  }
  s[x] = T(0);
  return loss;
}

// Absorbing backward (x = mask) given G in g: G_b - softmax_b sum_all(G) on real tokens
// (sum_all includes the mask entry, as log_softmax's backward), 0 on the mask. Result in s.
// kLoss also returns sum_{G != 0} G_b log q_b (+inf when G has mass on the mask).
template <class VV, bool kLoss = false>
CDM_INLINE double absorbing_backward_row(int64_t n, typename VV::T* s, const typename VV::T* g,
                                         const Prefetch& pf = {}) {
  using T = typename VV::T;
  using V = typename VV::V;
  const int64_t np = round_up(n), m = n - 1;
  const double sum_g = row_sum<VV>(g, np);
  s[m] = -kInf<T>;
  const T mx = row_max<VV>(s, np);
  double loss = 0.0;
  if constexpr (kLoss) {  // sum G (s - mx), before the exponentials overwrite s
    const V zero{};
    typename VV::Acc acc;
    for (int64_t i = 0; i < np; i += VV::L) {
      const V gv = VV::load(g + i);
      acc.add(gv != zero ? gv * (VV::load(s + i) - mx) : zero);
    }
    loss = g[m] != T(0) ? std::numeric_limits<double>::infinity() : acc.sum();
  }
  const double total = exp_shift_store<VV>(s, np, mx, pf);
  if constexpr (kLoss) loss -= sum_g * std::log(total);
  const T k = static_cast<T>(sum_g / total);
  for (int64_t i = 0; i < np; i += VV::L) VV::store(s + i, VV::load(g + i) - VV::load(s + i) * k);
  s[m] = T(0);
  return loss;
}

// The loss of an absorbing row whose token is real (q = e_x): +inf if G has mass off x, else -0
template <class T>
CDM_INLINE double absorbing_real_token_loss(const T* g, int64_t n, int64_t x) {
  for (int64_t b = 0; b < n; ++b)
    if (b != x && g[b] != T(0)) return std::numeric_limits<double>::infinity();
  return -0.0;
}

// ----------------------------------------------------------------------------- lanes layout

// lane-wise max over the states of a tile
template <class VV>
CDM_INLINE typename VV::V group_max(const Group<VV>& g, const typename VV::T* t) {
  using V = typename VV::V;
  V mx = VV::splat(-kInf<typename VV::T>);
  for (int64_t b = 0; b < g.n; ++b) {
    const V v = g.at(t, b);
    mx = v > mx ? v : mx;
  }
  return mx;
}

// lane-wise sum over the states of a tile
template <class VV>
CDM_INLINE typename VV::V group_sum(const Group<VV>& g, const typename VV::T* t) {
  typename VV::V sum{};
  for (int64_t b = 0; b < g.n; ++b) sum += g.at(t, b);
  return sum;
}

// t_b <- exp(t_b - shift); returns the lane-wise sums
template <class VV>
CDM_INLINE typename VV::V group_exp_store(const Group<VV>& g, typename VV::T* t, typename VV::V shift) {
  typename VV::V sum{};
  for (int64_t b = 0; b < g.n; ++b) {
    const typename VV::V r = VV::exp(g.at(t, b) - shift);
    g.put(t, b, r);
    sum += r;
  }
  return sum;
}

// Per-lane coefficients of the uniform kernel at each lane's tau (and their logs).
template <class VV>
struct LaneCoeffs {
  typename VV::V alpha, beta, log_off, log_on;
};
template <class VV>
CDM_INLINE LaneCoeffs<VV> uniform_lane_coeffs(const Group<VV>& g, const double* tau, UniformLogCache& cache) {
  using T = typename VV::T;
  LaneCoeffs<VV> lc;
  for (int j = 0; j < VV::L; ++j) {
    const UniformLogCache& c = cache(tau[g.row(j)], g.n);
    lc.alpha[j] = static_cast<T>(c.c.alpha);
    lc.beta[j] = static_cast<T>(c.c.beta);
    lc.log_off[j] = static_cast<T>(c.log_off);
    lc.log_on[j] = static_cast<T>(c.log_on);
  }
  return lc;
}

// The lanes layout's uniform_ratios: with r_x := 1, leaves r = e^{t - M} in the tile and
// gives per lane M, cs = beta S and the floor (u = max(r - cs, floor)).
template <class VV>
struct GroupRatios {
  typename VV::V M, cs, floor;
};
template <class VV>
CDM_INLINE GroupRatios<VV> uniform_group_ratios(const Group<VV>& g, const int64_t* x, typename VV::T* t,
                                                typename VV::V alpha, typename VV::V beta) {
  g.set_at(t, x, typename VV::T(0));
  GroupRatios<VV> gr;
  gr.M = group_max<VV>(g, t);
  gr.cs = beta * group_exp_store<VV>(g, t, gr.M);
  gr.floor = posterior_floor_v<VV>(gr.M, alpha);
  return gr;
}

// Uniform backward for a group (lanes layout): t the log-score tile, gt the tile of G,
// h a scratch tile; lc the coefficients per lane. Gradient left in t; kLoss: returns the
// lanes' sum_{G != 0} G_b log q_b as uniform_backward_row.
template <class VV, bool kLoss = false>
CDM_INLINE typename VV::V uniform_backward_group(const Group<VV>& g, const int64_t* x, const LaneCoeffs<VV>& lc,
                                                 typename VV::T* t, const typename VV::T* gt, typename VV::T* h) {
  using T = typename VV::T;
  using V = typename VV::V;
  using M = typename VV::M;
  const int64_t n = g.n;
  const V alpha = lc.alpha, beta = lc.beta;
  const V one = VV::splat(T(1)), half = VV::splat(T(0.5)), zero{};
  const M xv = g.lanes_index(x);
  const V sum_g = group_sum<VV>(g, gt);
  const GroupRatios<VV> gr = uniform_group_ratios<VV>(g, x, t, alpha, beta);
  const V cs = gr.cs, floor = gr.floor;
  V U{}, H{}, Wt{}, ux{}, wx{}, GL{}, gx{};
  for (int64_t b = 0; b < n; ++b) {
    const V d = g.at(t, b) - cs;
    const V u = d < floor ? floor : d;
    const V w = (d > floor ? one : zero) + (d == floor ? half : zero);
    const V gv = g.at(gt, b);
    const V hv = w != zero ? w * (gv / u) : zero;
    g.put(h, b, hv);
    U += u;
    H += hv;
    Wt += w;
    const M here = Group<VV>::eq(xv, b);
    ux = here ? u : ux;
    wx = here ? w : wx;
    if constexpr (kLoss) {
      GL += gv != zero ? gv * VV::log_normal(u) : zero;
      gx = here ? gv : gx;
    }
  }
  const V Z = beta * U + alpha * ux;
  V loss{};
  if constexpr (kLoss) {
    const V g_off = sum_g - gx;
    loss = GL + (g_off != zero ? lc.log_off * g_off : zero) + (gx != zero ? lc.log_on * gx : zero);
    loss = loss - (sum_g != zero ? VV::log(Z) * sum_g : zero);
  }
  const V k1 = sum_g / Z;
  const V sum_du = H - k1 * (beta * Wt + alpha * wx);
  const V bk = beta * k1, bs = beta * sum_du;
  for (int64_t b = 0; b < n; ++b) {
    const V r = g.at(t, b);
    const V d = r - cs;
    const V w = (d > floor ? one : zero) + (d == floor ? half : zero);
    const V out = r * ((g.at(h, b) - w * bk) - bs);
    g.put(t, b, Group<VV>::eq(xv, b) ? zero : out);
  }
  return loss;
}

// Absorbing backward for a group: rows with x != mask get 0. Gradient left in t; kLoss:
// returns the lanes' sum_{G != 0} G_b log q_b (+inf for mass on a structural zero of q).
template <class VV, bool kLoss = false>
CDM_INLINE typename VV::V absorbing_backward_group(const Group<VV>& g, const int64_t* x, typename VV::T* t,
                                                   const typename VV::T* gt) {
  using T = typename VV::T;
  using V = typename VV::V;
  using M = typename VV::M;
  const int64_t n = g.n, m = n - 1;
  const V zero{};
  const M xv = g.lanes_index(x);
  const M real = Group<VV>::ne(xv, m);
  g.put(t, m, VV::splat(-kInf<T>));
  const V sum_g = group_sum<VV>(g, gt);
  const V mx = group_max<VV>(g, t);
  V loss{}, off_x{};  // off_x: real tokens: lanes with mass off x
  if constexpr (kLoss) {
    for (int64_t b = 0; b < n; ++b) {
      const V gv = g.at(gt, b);
      loss += gv != zero ? gv * (g.at(t, b) - mx) : zero;
      off_x += (Group<VV>::ne(xv, b) & (gv != zero)) ? VV::splat(T(1)) : zero;
    }
  }
  const V S = group_exp_store<VV>(g, t, mx);
  if constexpr (kLoss) {
    const V inf = VV::splat(kInf<T>);
    const V on_mask = g.at(gt, m) != zero ? inf : loss - sum_g * VV::log(S);
    loss = real ? (off_x != zero ? inf : VV::splat(-T(0))) : on_mask;
  }
  const V k = sum_g / S;
  for (int64_t b = 0; b < m; ++b) g.put(t, b, real ? zero : g.at(gt, b) - g.at(t, b) * k);
  g.put(t, m, zero);
  return loss;
}

// ----------------------------------------------------------------------------- backward rows

// The backward of scores_to_posterior over positions [b, e), both layouts (a.rows: the
// log-scores). G, the gradient of log q, comes from row_g(p, g) (fills a padded row of G
// for position p from a.second) or, for short rows, group_g(grp, gt) (fills the tile of G
// of a group): scores_to_posterior's grad, or the matching loss's target. dL/dlog_score
// goes to a.out. kLoss (the matching loss's forward with its gradient, G = -t+): the same
// pass also gives each position's sum_{G != 0} G log q, handed to row_loss(p, value) or,
// for short rows, group_loss(grp, lanes), and checks the log-scores (a.errors).
template <class VV, bool kLoss = false, class RowG, class GroupG, class RowLoss = std::nullptr_t,
          class GroupLoss = std::nullptr_t>
CDM_INLINE void posterior_backward_rows(const RowArgs& a, int64_t b, int64_t e, const RowG& row_g,
                                        const GroupG& group_g, const RowLoss& row_loss = nullptr,
                                        const GroupLoss& group_loss = nullptr) {
  using T = typename VV::T;
  const int64_t n = a.n, np = round_up(n);
  UniformLogCache cache;
  if (n <= kLanesMaxN) {
    Scratch<T> tiles(n * VV::L, 3);
    T *t = tiles.row(0), *gt = tiles.row(1), *h = tiles.row(2);
    for (int64_t p0 = b; p0 < e; p0 += VV::L) {
      const Group<VV> grp = make_group<VV>(p0, e, n);
      grp.load(a.rows, a.dt, t, a.errors);
      group_g(grp, gt);
      typename VV::V lanes;
      if (a.family == UNIFORM) {
        lanes = uniform_backward_group<VV, kLoss>(grp, a.x, uniform_lane_coeffs<VV>(grp, a.tau, cache), t, gt, h);
      } else {
        lanes = absorbing_backward_group<VV, kLoss>(grp, a.x, t, gt);
      }
      if constexpr (kLoss) group_loss(grp, lanes);
      grp.store(a.out, a.dt, t);
    }
    return;
  }
  Scratch<T> scratch(n, 3);
  T *s = scratch.row(0), *g = scratch.row(1), *h = scratch.row(2);
  for (int64_t p = b; p < e; ++p) {
    const int64_t x = a.x[p];
    double value = 0.0;
    if (a.family == ABSORBING && x != n - 1) {  // q = e_x: no gradient
      if constexpr (kLoss) {
        if (a.errors != nullptr) load_row<VV>(a.rows, a.dt, p, n, s, -kInf<T>, a.errors);  // read for the check only
        row_g(p, g);
        value = absorbing_real_token_loss(g, n, x);
      }
      for (int64_t i = 0; i < np; ++i) s[i] = T(0);
    } else {
      load_row<VV>(a.rows, a.dt, p, n, s, -kInf<T>, a.errors);
      row_g(p, g);
      const Prefetch pf = next_rows(p, e, n, a.rows, a.dt, a.second, a.second_dt);
      if (a.family == UNIFORM) {
        value = uniform_backward_row<VV, kLoss>(n, x, cache(a.tau[p], n).c, s, g, h, pf);
      } else {
        value = absorbing_backward_row<VV, kLoss>(n, s, g, pf);
      }
    }
    if constexpr (kLoss) row_loss(p, value);
    store_row<VV>(a.out, a.dt, p, n, s);
  }
}

}  // namespace cpu
}  // namespace cdm
