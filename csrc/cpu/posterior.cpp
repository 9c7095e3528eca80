// scores_to_posterior (+ backward) on the CPU: log p_0|t from log-scores.
//
// Uniform graph, per row (compute type float for 16/32-bit inputs, double for float64):
//   copy      s = log_score (converted), s_x = 0                              read row once
//   pass 1    M = max s
//   pass 2    r = e^{s - M} (in place), S = sum r                             1 exp / element
//   pass 3    u = max(r - beta S, floor), U = sum u, s = log u (in place)     1 log / element
//   pass 4    out = s + (log beta - log Z), out_x = s_x + (log(alpha + beta) - log Z)
//             with Z = sum_b K[b, x] u_b = beta U + alpha u_x (float64)
// q(a) = K[a, x] u(a) / Z is reference.py's "inverted.log() + log column - logsumexp".
// Absorbing: x != mask gives log e_x; x = mask a log-softmax over the real tokens
// (1 exp / element). Dense: float64 through the eigenbasis (dense.cpp).
//
// Backward (G = grad of log q, recomputing the forward; no log at all):
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

template <class T>
CDM_INLINE void uniform_forward_row(const PosteriorArgs& a, int64_t p, T* s) {
  using VV = VT<T>;
  using V = typename VV::V;
  const int64_t n = a.n, np = round_up(n), x = a.x[p];
  load_row<T>(a.ls, a.dt, p, n, s, -kInf<T>);
  const UniformRow<T> row = uniform_ratios(s, n, x, a.tau[p]);
  vec::vd acc{};
  for (int64_t i = 0; i < np; i += W) {
    V u = clamp_floor(VV::load(s + i) - row.cs, row.floor);
    VV::store(s + i, VV::log(u));
    if (CDM_UNLIKELY(i + W > n)) u = VV::below(n - i) ? u : V{};
    acc += VV::wide(u);
  }
  const double z = row.c.beta * vec::hsum(acc) + row.c.alpha * static_cast<double>(row.u_x);
  const double lz = std::log(z);
  const T off = static_cast<T>(std::log(row.c.off()) - lz);
  const T on = static_cast<T>(std::log(row.c.on()) - lz);
  const T lx = s[x];
  for (int64_t i = 0; i < np; i += W) VV::store(s + i, VV::load(s + i) + off);
  s[x] = lx + on;
}

template <class T>
CDM_INLINE void absorbing_forward_row(const PosteriorArgs& a, int64_t p, T* s) {
  using VV = VT<T>;
  const int64_t n = a.n, np = round_up(n), x = a.x[p], m = n - 1;
  if (x != m) {
    for (int64_t i = 0; i < np; ++i) s[i] = -kInf<T>;
    s[x] = T(0);
    return;
  }
  load_row<T>(a.ls, a.dt, p, n, s, -kInf<T>);
  s[m] = -kInf<T>;
  const T mx = row_max(s, np);
  const T lsum = static_cast<T>(std::log(exp_shift_sum(s, np, mx)));
  for (int64_t i = 0; i < np; i += W) VV::store(s + i, (VV::load(s + i) - mx) - lsum);
}

struct PosteriorForward {
  using Args = PosteriorArgs;
  template <class T>
  static CDM_INLINE void rows(const Args& a, int64_t b, int64_t e) {
    Scratch<T> scratch(a.n, 1);
    T* s = scratch.row(0);
    for (int64_t p = b; p < e; ++p) {
      if (a.family == UNIFORM) {
        uniform_forward_row<T>(a, p, s);
      } else {
        absorbing_forward_row<T>(a, p, s);
      }
      store_row<T>(a.out, a.dt, p, a.n, s);
    }
  }
};

// Uniform backward given G already in g (padded with 0). Leaves dL/dlog_score in s.
// s: the log-score row loaded with -inf padding; h: scratch.
template <class T>
CDM_INLINE void uniform_backward_row(int64_t n, int64_t x, double tau, T* s, const T* g, T* h) {
  using VV = VT<T>;
  using V = typename VV::V;
  const int64_t np = round_up(n);
  const double sum_g = row_sum(g, np);
  const UniformRow<T> row = uniform_ratios(s, n, x, tau);
  const V one = VV::splat(T(1)), half = VV::splat(T(0.5)), zero{};
  vec::vd acc_u{}, acc_h{}, acc_w{};
  for (int64_t i = 0; i < np; i += W) {
    const V d = VV::load(s + i) - row.cs;
    V u = clamp_floor(d, row.floor);
    V w = d > row.floor ? one : (d == row.floor ? half : zero);
    if (CDM_UNLIKELY(i + W > n)) {
      const auto valid = VV::below(n - i);
      u = valid ? u : zero;
      w = valid ? w : zero;
    }
    const V hv = w != zero ? w * (VV::load(g + i) / u) : zero;  // w (G / u)
    VV::store(h + i, hv);
    acc_u += VV::wide(u);
    acc_h += VV::wide(hv);
    acc_w += VV::wide(w);
  }
  const double z = row.c.beta * vec::hsum(acc_u) + row.c.alpha * static_cast<double>(row.u_x);
  const double k1 = sum_g / z;  // dL/du_b = h_b - w_b K[b, x] k1
  const T dx = row.r_x - row.cs;
  const double w_x = dx > row.floor ? 1.0 : (dx == row.floor ? 0.5 : 0.0);
  // sum_b dL/du_b = sum h - k1 (beta sum w + alpha w_x)
  const double sum_du = vec::hsum(acc_h) - k1 * (row.c.beta * vec::hsum(acc_w) + row.c.alpha * w_x);
  const T bk = static_cast<T>(row.c.beta * k1);
  const T bs = static_cast<T>(row.c.beta * sum_du);
  for (int64_t i = 0; i < np; i += W) {
    const V r = VV::load(s + i);
    const V d = r - row.cs;
    const V w = d > row.floor ? one : (d == row.floor ? half : zero);
    // b != x: K[b, x] = beta; dL/dr_b = dL/du_b - beta sum dL/du
    VV::store(s + i, r * ((VV::load(h + i) - w * bk) - bs));
  }
  s[x] = T(0);
}

// Absorbing backward (x = mask) given G in g. Leaves the gradient in s.
template <class T>
CDM_INLINE void absorbing_backward_row(int64_t n, T* s, const T* g) {
  using VV = VT<T>;
  const int64_t np = round_up(n), m = n - 1;
  const double sum_g = row_sum(g, np);
  s[m] = -kInf<T>;
  const T mx = row_max(s, np);
  const double total = exp_shift_store(s, np, mx);
  const T k = static_cast<T>(sum_g / total);
  for (int64_t i = 0; i < np; i += W) VV::store(s + i, VV::load(g + i) - VV::load(s + i) * k);
  s[m] = T(0);
}

struct PosteriorBackward {
  using Args = PosteriorArgs;
  template <class T>
  static CDM_INLINE void rows(const Args& a, int64_t b, int64_t e) {
    const int64_t n = a.n, np = round_up(n);
    Scratch<T> scratch(n, 3);
    T *s = scratch.row(0), *g = scratch.row(1), *h = scratch.row(2);
    for (int64_t p = b; p < e; ++p) {
      const int64_t x = a.x[p];
      if (a.family == ABSORBING && x != n - 1) {
        for (int64_t i = 0; i < np; ++i) s[i] = T(0);
      } else {
        load_row<T>(a.ls, a.dt, p, n, s, -kInf<T>);
        load_row<T>(a.grad, a.grad_dt, p, n, g, T(0));
        if (a.family == UNIFORM) {
          uniform_backward_row<T>(n, x, a.tau[p], s, g, h);
        } else {
          absorbing_backward_row<T>(n, s, g);
        }
      }
      store_row<T>(a.out, a.dt, p, n, s);
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
    for (int64_t c = 0; c < rows; ++c) store_row<double>(a.out, a.dt, b + c, n, buf.row(2) + c * n);
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
    for (int64_t c = 0; c < rows; ++c) load_row<double>(a.grad, a.grad_dt, b + c, n, gr + c * n, 0.0);
    for (int64_t c = 0; c < rows; ++c) {
      double* gc = gr + c * n;
      const double* lc = l + c * n;
      const double* uc = u + c * n;
      const double floor = POSTERIOR_FLOOR * std::exp(-mx[c]);
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
      store_row<double>(a.out, a.dt, b + c, n, o);
    }
  });
}

// ----------------------------------------------------------------------------- ops

void check_inputs(const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau) {
  check_rows(log_score, "log_score");
  const int64_t positions = log_score.size(0);
  check_positions(x, "x", positions, at::kLong);
  check_positions(tau, "tau", positions, at::kDouble);
}

at::Tensor scores_to_posterior_cpu(int64_t family, const c10::optional<at::Tensor>& evals,
                                   const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                                   const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& tau) {
  check_inputs(log_score, x, tau);
  const int64_t positions = log_score.size(0), n = log_score.size(1);
  const Dense g = check_graph(family, evals, vecs, vecs_inv, n);
  at::Tensor out = at::empty_like(log_score);
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
  at::Tensor out = at::empty_like(log_score);
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
