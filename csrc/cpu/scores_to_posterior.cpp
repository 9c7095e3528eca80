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

struct PosteriorArgs {
  int64_t family, n;
  const void* ls;
  DT dt;
  const int64_t* x;
  const double* tau;
  void* out;
  const void* grad;  // backward only
  DT grad_dt;
};

template <class VV>
CDM_INLINE void uniform_forward_row(const PosteriorArgs& a, int64_t p, typename VV::T* s, const Prefetch& pf,
                                    UniformLogCache& cache) {
  using T = typename VV::T;
  using V = typename VV::V;
  const int64_t n = a.n, np = round_up(n), x = a.x[p];
  load_row<VV>(a.ls, a.dt, p, n, s, -kInf<T>);
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
CDM_INLINE void absorbing_forward_row(const PosteriorArgs& a, int64_t p, typename VV::T* s, const Prefetch& pf) {
  using T = typename VV::T;
  const int64_t n = a.n, np = round_up(n), x = a.x[p], m = n - 1;
  if (x != m) {
    for (int64_t i = 0; i < np; ++i) s[i] = -kInf<T>;
    s[x] = T(0);
    return;
  }
  load_row<VV>(a.ls, a.dt, p, n, s, -kInf<T>);
  s[m] = -kInf<T>;
  const T mx = row_max<VV>(s, np);
  const T lsum = static_cast<T>(std::log(exp_shift_sum<VV>(s, np, mx, pf)));
  for (int64_t i = 0; i < np; i += VV::L) VV::store(s + i, (VV::load(s + i) - mx) - lsum);
}

// ----------------------------------------------------------------------------- lanes layout (short rows)

template <class VV>
CDM_INLINE void uniform_forward_group(const PosteriorArgs& a, const Group<VV>& g, typename VV::T* t,
                                      UniformLogCache& cache) {
  using T = typename VV::T;
  using V = typename VV::V;
  using M = typename VV::M;
  const int64_t n = a.n;
  g.load(a.ls, a.dt, t);
  g.set_at(t, a.x, T(0));  // r_x := 1
  V alpha, beta, loff, lon;
  for (int j = 0; j < VV::L; ++j) {
    const UniformLogCache& c = cache(a.tau[g.row(j)], n);
    alpha[j] = static_cast<T>(c.c.alpha);
    beta[j] = static_cast<T>(c.c.beta);
    loff[j] = static_cast<T>(c.log_off);
    lon[j] = static_cast<T>(c.log_on);
  }
  const M xv = g.lanes_index(a.x);
  V mx = VV::splat(-kInf<T>);
  for (int64_t b = 0; b < n; ++b) {
    const V v = g.at(t, b);
    mx = v > mx ? v : mx;
  }
  V S{};
  for (int64_t b = 0; b < n; ++b) {
    const V r = VV::exp(g.at(t, b) - mx);
    g.put(t, b, r);
    S += r;
  }
  const V cs = beta * S;
  const V floor = posterior_floor_v<VV>(mx, alpha);
  V U{}, ux{};
  for (int64_t b = 0; b < n; ++b) {
    const V d = g.at(t, b) - cs;
    const V u = d < floor ? floor : d;
    U += u;
    ux = Group<VV>::eq(xv, b) ? u : ux;
    g.put(t, b, VV::log_normal(u));
  }
  const V lz = VV::log(beta * U + alpha * ux);
  const V off = loff - lz, on = lon - lz;
  for (int64_t b = 0; b < n; ++b) g.put(t, b, g.at(t, b) + (Group<VV>::eq(xv, b) ? on : off));
  g.store(a.out, a.dt, t);
}

template <class VV>
CDM_INLINE void absorbing_forward_group(const PosteriorArgs& a, const Group<VV>& g, typename VV::T* t) {
  using T = typename VV::T;
  using V = typename VV::V;
  using M = typename VV::M;
  const int64_t n = a.n, m = n - 1;
  g.load(a.ls, a.dt, t);
  const M xv = g.lanes_index(a.x);
  const M real = Group<VV>::ne(xv, m);
  g.put(t, m, VV::splat(-kInf<T>));
  V mx = VV::splat(-kInf<T>);
  for (int64_t b = 0; b < n; ++b) {
    const V v = g.at(t, b);
    mx = v > mx ? v : mx;
  }
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
  using Args = PosteriorArgs;
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
      const Prefetch pf = next_rows(p, e, a.n, a.ls, a.dt);
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
  using Args = PosteriorArgs;
  template <class VV>
  static CDM_INLINE void rows(const Args& a, int64_t b, int64_t e) {
    using T = typename VV::T;
    const int64_t n = a.n, np = round_up(n);
    DecayCache dc;
    if (n <= kLanesMaxN) {
      Scratch<T> tiles(n * VV::L, 3);
      T *t = tiles.row(0), *gt = tiles.row(1), *h = tiles.row(2);
      for (int64_t p0 = b; p0 < e; p0 += VV::L) {
        const Group<VV> grp = make_group<VV>(p0, e, n);
        grp.load(a.ls, a.dt, t);
        grp.load(a.grad, a.grad_dt, gt);
        if (a.family == UNIFORM) {
          typename VV::V alpha, beta;
          for (int j = 0; j < VV::L; ++j) {
            const UniformCoeffs c = uniform_coeffs(dc(a.tau[grp.row(j)]), n);
            alpha[j] = static_cast<T>(c.alpha);
            beta[j] = static_cast<T>(c.beta);
          }
          uniform_backward_group<VV>(grp, a.x, alpha, beta, t, gt, h);
        } else {
          absorbing_backward_group<VV>(grp, a.x, t, gt);
        }
        grp.store(a.out, a.dt, t);
      }
      return;
    }
    Scratch<T> scratch(n, 3);
    T *s = scratch.row(0), *g = scratch.row(1), *h = scratch.row(2);
    for (int64_t p = b; p < e; ++p) {
      const int64_t x = a.x[p];
      if (a.family == ABSORBING && x != n - 1) {
        for (int64_t i = 0; i < np; ++i) s[i] = T(0);
      } else {
        load_row<VV>(a.ls, a.dt, p, n, s, -kInf<T>);
        load_row<VV>(a.grad, a.grad_dt, p, n, g, T(0));
        const Prefetch pf = next_rows(p, e, n, a.ls, a.dt, a.grad, a.grad_dt);
        if (a.family == UNIFORM) {
          uniform_backward_row<VV>(n, x, uniform_coeffs(dc(a.tau[p]), n), s, g, h, pf);
        } else {
          absorbing_backward_row<VV>(n, s, g, pf);
        }
      }
      store_row<VV>(a.out, a.dt, p, n, s);
    }
  }
};

// ----------------------------------------------------------------------------- dense

void dense_forward(const Dense& g, const PosteriorArgs& a, int64_t positions) {
  const int64_t n = a.n;
  dense_blocks(positions, dense_block_rows(n), [&](int64_t b, int64_t e) {
    const int64_t rows = e - b;
    Scratch<double> buf(rows * n + W, 4);
    std::vector<double> mx(rows);
    dense_log_posterior(g, a.ls, a.dt, a.x + b, a.tau + b, b, rows, buf.row(0), buf.row(1), buf.row(2), buf.row(3),
                        mx.data());
    for (int64_t c = 0; c < rows; ++c) store_row<DenseVT>(a.out, a.dt, b + c, n, buf.row(2) + c * n);
  });
}

void dense_backward(const Dense& g, const PosteriorArgs& a, int64_t positions) {
  const int64_t n = a.n;
  dense_blocks(positions, dense_block_rows(n), [&](int64_t b, int64_t e) {
    const int64_t rows = e - b;
    Scratch<double> buf(rows * n + W, 5);
    double *r = buf.row(0), *u = buf.row(1), *l = buf.row(2), *work = buf.row(3), *gr = buf.row(4);
    std::vector<double> mx(rows);
    dense_log_posterior(g, a.ls, a.dt, a.x + b, a.tau + b, b, rows, r, u, l, work, mx.data());
    for (int64_t c = 0; c < rows; ++c) load_row<DenseVT>(a.grad, a.grad_dt, b + c, n, gr + c * n, 0.0);
    for (int64_t c = 0; c < rows; ++c) {
      double* gc = gr + c * n;
      const double* lc = l + c * n;
      const double* uc = u + c * n;
      const double floor = posterior_floor<double>(mx[c]);
      double sum_g = 0.0;
      for (int64_t k = 0; k < n; ++k) sum_g += gc[k];
      for (int64_t k = 0; k < n; ++k) {
        const double dl = gc[k] - std::exp(lc[k]) * sum_g;  // dL/d(log q unnormalised)
        const double w = uc[k] > floor ? 1.0 : (uc[k] == floor ? 0.5 : 0.0);
        const double ub = uc[k] < floor ? floor : uc[k];
        gc[k] = w != 0.0 ? w * dl / ub : 0.0;  // dL/du
      }
    }
    dense_apply(g, gr, a.tau + b, -1.0, rows, /*transpose=*/false, work, l);  // dL/dr = K(-tau) dL/du
    for (int64_t c = 0; c < rows; ++c) {
      double* o = work + c * n;
      const double* rc = r + c * n;
      for (int64_t k = 0; k < n; ++k) o[k] *= rc[k];
      o[a.x[b + c]] = 0.0;
      store_row<DenseVT>(a.out, a.dt, b + c, n, o);
    }
  });
}

// ----------------------------------------------------------------------------- ops

void check_inputs(const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau) {
  check_rows(log_score, "log_score");
  const int64_t positions = log_score.size(0);
  check_positions(x, "x", positions, at::kLong);
  check_token_range(x, log_score.size(1));
  check_positions(tau, "tau", positions, at::kDouble);
}

at::Tensor scores_to_posterior_cpu(int64_t family, const c10::optional<at::Tensor>& evals,
                                   const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                                   const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau) {
  check_inputs(log_score, x, tau);
  const int64_t positions = log_score.size(0), n = log_score.size(1);
  const Dense g = check_graph(family, evals, vecs, vecs_inv, n);
  at::Tensor out = empty_output_like(log_score);
  if (positions == 0) return out;
  const DT dt = dt_of(log_score);
  PosteriorArgs args{family, n, log_score.data_ptr(), dt, x.data_ptr<int64_t>(), tau.data_ptr<double>(),
                     out.data_ptr(), nullptr, dt};
  if (family == DENSE) {
    dense_forward(g, args, positions);
  } else if (dt == DT::F64) {
    run_rows<PosteriorForward, double>(args, positions, row_grain(n));
  } else {
    run_rows<PosteriorForward, float>(args, positions, row_grain(n));
  }
  return out;
}

at::Tensor scores_to_posterior_backward_cpu(int64_t family, const c10::optional<at::Tensor>& evals,
                                            const c10::optional<at::Tensor>& vecs,
                                            const c10::optional<at::Tensor>& vecs_inv, const at::Tensor& grad,
                                            const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau) {
  check_inputs(log_score, x, tau);
  check_rows(grad, "grad");
  check_same_shape(grad, log_score, "grad");
  const int64_t positions = log_score.size(0), n = log_score.size(1);
  const Dense g = check_graph(family, evals, vecs, vecs_inv, n);
  at::Tensor out = empty_output_like(log_score);
  if (positions == 0) return out;
  const DT dt = dt_of(log_score);
  PosteriorArgs args{family, n, log_score.data_ptr(), dt, x.data_ptr<int64_t>(), tau.data_ptr<double>(),
                     out.data_ptr(), grad.data_ptr(), dt_of(grad)};
  if (family == DENSE) {
    dense_backward(g, args, positions);
  } else if (dt == DT::F64) {
    run_rows<PosteriorBackward, double>(args, positions, row_grain(n));
  } else {
    run_rows<PosteriorBackward, float>(args, positions, row_grain(n));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cdm_kernels, CPU, m) {
  m.impl("scores_to_posterior", &scores_to_posterior_cpu);
  m.impl("scores_to_posterior_backward", &scores_to_posterior_backward_cpu);
}

}  // namespace cpu
}  // namespace cdm
