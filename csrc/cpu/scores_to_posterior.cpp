// scores_to_posterior (+ backward) on the CPU: log p_0|t from log-scores.
//
// Uniform graph, per row (compute type float for 16/32-bit inputs, double for float64):
//   copy      s = log_score (converted), s_x = 0 (r_x := 1)                   read row once
//   pass 1    M = max s
//   pass 2    r = e^{s - M} (in place), S = sum r                             1 exp / element
//   pass 3    u = max(r - beta S, floor), U = sum u, s = log u (in place)     1 log / element
//   pass 4    out = s + (log beta - log Z), out_x = s_x + (log(alpha + beta) - log Z)
//             with Z = sum_b K[b, x] u_b = beta U + alpha u_x (float64)
// q(a) = K[a, x] u(a) / Z is reference.py's "inverted.log() + log column - logsumexp", and
// floor = max(POSTERIOR_FLOOR e^-M alpha, smallest normal) its clamp (inversion.h).
// Rows of at most kLanesMaxN states take the lanes layout instead (lanes.h: one position
// per vector lane, the same passes without horizontal reductions).
// Absorbing: x != mask gives log e_x; x = mask a log-softmax over the real tokens
// (1 exp / element). Dense: float64 through the eigenbasis (dense.cpp).
//
// Backward (G = grad of log q, recomputing the forward; 1 exp / element, no log):
//   dL/du_b = w_b (G_b / u_b - K[b, x] sum(G) / Z)     w_b = 1 unclamped, 0 clamped (1/2 on a tie,
//                                                       as torch.maximum), the floor being constant
//   dL/dr   = dL/du - beta sum(dL/du)                    (u = r - beta S 1)
//   dL/dlog_score_b = r_b dL/dr_b, 0 at b = x            (r_x := 1 is no input)
// Absorbing (mask rows): G_b - softmax_b sum_all(G) on real tokens (sum_all includes the mask
// entry, as log_softmax's backward does), 0 on the mask and on rows with x != mask.
#include "cpu/cpu_common.h"
#include "cpu/inversion.h"

namespace cdm {
namespace cpu {
namespace {

template <class VV>
CDM_INLINE void uniform_forward_row(const RowArgs& a, int64_t p, typename VV::T* s, const Prefetch& pf,
                                    UniformLogCache& cache) {
  using T = typename VV::T;
  using V = typename VV::V;
  const int64_t n = a.n, np = round_up(n), x = a.x[p];
  load_row<VV>(a.rows, a.dt, p, n, s, -kInf<T>, a.errors);
  const UniformLogCache& c = cache(a.tau[p], n);
  const UniformRow<T> row = uniform_ratios<VV>(s, n, x, c.c, pf);
  typename VV::Acc acc;
  for (int64_t i = 0; i < np; i += VV::L) {
    V u = clamp_floor<VV>(VV::load(s + i) - row.cs, row.floor);
    VV::store(s + i, VV::log_normal(u));  // u >= floor >= FLT_MIN
    if (CDM_UNLIKELY(i + VV::L > n)) u = VV::below(n - i) ? u : V{};
    acc.add(u);
  }
  const double z = row.c.beta * acc.sum() + row.c.alpha * static_cast<double>(row.u_x);
  const double lz = std::log(z);
  const T off = static_cast<T>(c.log_off - lz);
  const T on = static_cast<T>(c.log_on - lz);
  const T lx = s[x];
  for (int64_t i = 0; i < np; i += VV::L) VV::store(s + i, VV::load(s + i) + off);
  s[x] = lx + on;
}

template <class VV>
CDM_INLINE void absorbing_forward_row(const RowArgs& a, int64_t p, typename VV::T* s, const Prefetch& pf) {
  using T = typename VV::T;
  const int64_t n = a.n, np = round_up(n), x = a.x[p], m = n - 1;
  if (x != m) {
    if (a.errors != nullptr) load_row<VV>(a.rows, a.dt, p, n, s, -kInf<T>, a.errors);  // read for the check only
    for (int64_t i = 0; i < np; ++i) s[i] = -kInf<T>;
    s[x] = T(0);
    return;
  }
  load_row<VV>(a.rows, a.dt, p, n, s, -kInf<T>, a.errors);
  s[m] = -kInf<T>;
  const T mx = row_max<VV>(s, np);
  const T lsum = static_cast<T>(std::log(exp_shift_sum<VV>(s, np, mx, pf)));
  for (int64_t i = 0; i < np; i += VV::L) VV::store(s + i, (VV::load(s + i) - mx) - lsum);
}

// ----------------------------------------------------------------------------- lanes layout (short rows)

template <class VV>
CDM_INLINE void uniform_forward_group(const RowArgs& a, const Group<VV>& g, typename VV::T* t,
                                      UniformLogCache& cache) {
  using V = typename VV::V;
  using M = typename VV::M;
  const int64_t n = a.n;
  g.load(a.rows, a.dt, t, a.errors);
  const LaneCoeffs<VV> lc = uniform_lane_coeffs<VV>(g, a.tau, cache);
  const M xv = g.lanes_index(a.x);
  const GroupRatios<VV> gr = uniform_group_ratios<VV>(g, a.x, t, lc.alpha, lc.beta);
  const V cs = gr.cs, floor = gr.floor;
  V U{}, ux{};
  for (int64_t b = 0; b < n; ++b) {
    const V d = g.at(t, b) - cs;
    const V u = d < floor ? floor : d;
    U += u;
    ux = Group<VV>::eq(xv, b) ? u : ux;
    g.put(t, b, VV::log_normal(u));
  }
  const V lz = VV::log(lc.beta * U + lc.alpha * ux);
  const V off = lc.log_off - lz, on = lc.log_on - lz;
  for (int64_t b = 0; b < n; ++b) g.put(t, b, g.at(t, b) + (Group<VV>::eq(xv, b) ? on : off));
  g.store(a.out, a.dt, t);
}

template <class VV>
CDM_INLINE void absorbing_forward_group(const RowArgs& a, const Group<VV>& g, typename VV::T* t) {
  using T = typename VV::T;
  using V = typename VV::V;
  using M = typename VV::M;
  const int64_t n = a.n, m = n - 1;
  g.load(a.rows, a.dt, t, a.errors);
  const M xv = g.lanes_index(a.x);
  const M real = Group<VV>::ne(xv, m);
  g.put(t, m, VV::splat(-kInf<T>));
  const V mx = group_max<VV>(g, t);
  V S{};
  for (int64_t b = 0; b < n; ++b) S += VV::exp(g.at(t, b) - mx);
  const V ls = VV::log(S);
  const V zero{}, ninf = VV::splat(-kInf<T>);
  for (int64_t b = 0; b < n; ++b) {
    const V onehot = Group<VV>::eq(xv, b) ? zero : ninf;
    g.put(t, b, real ? onehot : (g.at(t, b) - mx) - ls);
  }
  g.store(a.out, a.dt, t);
}

struct PosteriorForward {
  using Args = RowArgs;
  static constexpr const char* kRows = "log_score";
  static constexpr const char* kRowsNotFinite = "log_score contains NaN or inf";
  template <class VV>
  static CDM_INLINE void rows(const Args& a, int64_t b, int64_t e) {
    UniformLogCache cache;
    if (a.n <= kLanesMaxN) {
      Scratch<typename VV::T> tile(a.n * VV::L, 1);
      for (int64_t p0 = b; p0 < e; p0 += VV::L) {
        const Group<VV> g = make_group<VV>(p0, e, a.n);
        if (a.family == UNIFORM) {
          uniform_forward_group<VV>(a, g, tile.row(0), cache);
        } else {
          absorbing_forward_group<VV>(a, g, tile.row(0));
        }
      }
      return;
    }
    Scratch<typename VV::T> scratch(a.n, 1);
    auto* s = scratch.row(0);
    for (int64_t p = b; p < e; ++p) {
      const Prefetch pf = next_rows(p, e, a.n, a.rows, a.dt);
      if (a.family == UNIFORM) {
        uniform_forward_row<VV>(a, p, s, pf, cache);
      } else {
        absorbing_forward_row<VV>(a, p, s, pf);
      }
      store_row<VV>(a.out, a.dt, p, a.n, s);
    }
  }
};

struct PosteriorBackward {
  using Args = RowArgs;
  template <class VV>
  static CDM_INLINE void rows(const Args& a, int64_t b, int64_t e) {
    posterior_backward_rows<VV>(
        a, b, e,
        [&](int64_t p, typename VV::T* g) { load_row<VV>(a.second, a.second_dt, p, a.n, g, typename VV::T(0)); },
        [&](const Group<VV>& grp, typename VV::T* gt) { grp.load(a.second, a.second_dt, gt); });
  }
};

// ----------------------------------------------------------------------------- dense

void dense_rows(const Dense& g, const RowArgs& a, int64_t positions, bool backward) {
  dense_posterior_blocks(g, a, positions, [&](const DensePosterior& blk) {
    if (backward) {
      dense_posterior_backward(g, a, blk);
    } else {
      for (int64_t c = 0; c < blk.rows; ++c) store_row<DenseVT>(a.out, a.dt, blk.p0 + c, a.n, blk.L + c * a.n);
    }
  });
}

// ----------------------------------------------------------------------------- op

using Op = RowOp<PosteriorForward, PosteriorBackward, dense_rows>;

}  // namespace

TORCH_LIBRARY_IMPL(cdm_kernels, CPU, m) {
  m.impl("scores_to_posterior", &Op::forward);
  m.impl("scores_to_posterior_backward", &Op::backward);
}

}  // namespace cpu
}  // namespace cdm
