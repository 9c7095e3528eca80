// posterior_to_scores (+ backward) on the CPU: the forward map log p_0|t -> log-scores.
//
//   u_a = q_a / K[a, x]  (0 where log q_a = -inf; log K clamped at -1e30 as reference.py)
//   r   = K^T u,  out = log r  (-inf where r <= 0)
// Uniform and absorbing columns take two values per row, so each row is
//   pass 1  u = e^{log q - log K} (scratch), U = sum u          1 exp / element
//   pass 2  out = log(alpha u + beta U)  (absorbing: log(alpha u_a) and, on the mask,
//           log(u_m + (1 - alpha) sum_{a<m} u_a))                  1 log / element
// Backward with G = grad of log r:  h = G / r (0 where r <= 0), dL/du = K h,
// dL/dlog q = u dL/du (0 where log q = -inf): 1 exp and 1 division per element, no log.
// Dense graphs: float64 through the eigenbasis (dense.cpp).
#include "cpu/cpu_common.h"
#include "cpu/inversion.h"
#include "cpu/lanes.h"

namespace cdm {
namespace cpu {
namespace {

// log K[:, x] takes the value `on` at index `k` and `off` elsewhere (both clamped at -1e30)
template <class T>
struct LogColumn {
  int64_t k;
  T on, off;
};

template <class T>
CDM_INLINE T clamp_log(double v) {
  const T t = static_cast<T>(v);
  return t < T(-1e30) ? T(-1e30) : t;
}

template <class T>
CDM_INLINE LogColumn<T> log_column(int64_t family, int64_t n, int64_t x, const Decay& d) {
  LogColumn<T> c;
  if (family == UNIFORM) {
    const double beta = d.one_minus_alpha / static_cast<double>(n);
    c.k = x;
    c.on = clamp_log<T>(std::log(d.alpha + beta));
    c.off = clamp_log<T>(std::log(beta));
  } else if (x == n - 1) {
    c.k = x;
    c.on = T(0);
    c.off = clamp_log<T>(std::log(d.one_minus_alpha));
  } else {
    c.k = x;
    c.on = clamp_log<T>(std::log(d.alpha));
    c.off = T(-1e30);
  }
  return c;
}

// log_column memoised on (tau, kind of column)
template <class T>
struct LogColumnCache {
  double tau = std::numeric_limits<double>::quiet_NaN();
  int kind = -1;
  LogColumn<T> col{};
  Decay d{};
  const LogColumn<T>& operator()(int64_t family, int64_t n, int64_t x, double t) {
    const int k = family == UNIFORM ? 0 : (x == n - 1 ? 1 : 2);
    if (!(t == tau) || k != kind) {
      tau = t;
      kind = k;
      d = decay(t);
      col = log_column<T>(family, n, x, d);
    }
    col.k = x;
    return col;
  }
};

// reference._safe_log: log p where p > 0, -inf elsewhere (NaN included)
template <class VV>
CDM_INLINE typename VV::V safe_log(typename VV::V r) {
  using T = typename VV::T;
  return r > T(0) ? VV::log(r) : VV::splat(-kInf<T>);
}

// u into s (from the log q row in q), returns sum u over the lanes < `upto`
template <class VV>
CDM_INLINE double inverted_row(const typename VV::T* q, typename VV::T* s, int64_t n, int64_t upto,
                               const LogColumn<typename VV::T>& col, const Prefetch& pf) {
  using T = typename VV::T;
  using V = typename VV::V;
  const int64_t np = round_up(n);
  const V zero{};
  typename VV::Acc acc;
  for (int64_t i = 0; i < np; i += VV::L) {
    pf.at(i);
    const V lq = VV::load(q + i);
    V lc = VV::splat(col.off);
    if (CDM_UNLIKELY(col.k >= i && col.k < i + VV::L)) lc = VV::lane(col.k - i) ? VV::splat(col.on) : lc;
    V u = VV::exp(lq - lc);
    u = lq > -kInf<T> ? u : zero;
    VV::store(s + i, u);
    if (CDM_UNLIKELY(i + VV::L > upto)) u = VV::below(upto - i) ? u : zero;
    acc.add(u);
  }
  return acc.sum();
}

// ----------------------------------------------------------------------------- lanes layout (short rows)

// u = e^{log q - log K[:, x]} into tu (from the log q tile tq); returns the per-lane sums
// of u over b < upto; fills the per-lane alpha and 1 - alpha
template <class VV>
CDM_INLINE typename VV::V inverted_group(const RowArgs& a, const Group<VV>& g, const typename VV::T* tq,
                                         typename VV::T* tu, int64_t upto, LogColumnCache<typename VV::T>& cache,
                                         typename VV::V& alpha, typename VV::V& oma) {
  using T = typename VV::T;
  using V = typename VV::V;
  using M = typename VV::M;
  V on, off;
  for (int j = 0; j < VV::L; ++j) {
    const int64_t p = g.row(j);
    const LogColumn<T>& c = cache(a.family, a.n, a.x[p], a.tau[p]);
    on[j] = c.on;
    off[j] = c.off;
    alpha[j] = static_cast<T>(cache.d.alpha);
    oma[j] = static_cast<T>(cache.d.one_minus_alpha);
  }
  const M xv = g.lanes_index(a.x);
  const V zero{};
  V U{};
  for (int64_t b = 0; b < g.n; ++b) {
    const V lq = g.at(tq, b);
    const V lc = Group<VV>::eq(xv, b) ? on : off;
    const V u = lq > -kInf<T> ? VV::exp(lq - lc) : zero;
    g.put(tu, b, u);
    if (b < upto) U += u;
  }
  return U;
}

template <class VV>
CDM_INLINE void posterior_to_scores_group(const RowArgs& a, const Group<VV>& g, typename VV::T* tq,
                                  LogColumnCache<typename VV::T>& cache) {
  using T = typename VV::T;
  using V = typename VV::V;
  const int64_t n = a.n, m = n - 1;
  const bool uniform = a.family == UNIFORM;
  g.load(a.rows, a.dt, tq, a.errors, /*allow_minus_inf=*/true);
  V alpha, oma;
  const V U = inverted_group<VV>(a, g, tq, tq, uniform ? n : m, cache, alpha, oma);
  if (uniform) {
    const V shift = oma * (U / static_cast<T>(n));
    for (int64_t b = 0; b < n; ++b) g.put(tq, b, safe_log<VV>(g.at(tq, b) * alpha + shift));
  } else {
    const V rm = g.at(tq, m) + oma * U;
    for (int64_t b = 0; b < m; ++b) g.put(tq, b, safe_log<VV>(g.at(tq, b) * alpha));
    g.put(tq, m, safe_log<VV>(rm));
  }
  g.store(a.out, a.dt, tq);
}

template <class VV>
CDM_INLINE void posterior_to_scores_backward_group(const RowArgs& a, const Group<VV>& g, typename VV::T* tq,
                                           typename VV::T* tu, typename VV::T* tg, LogColumnCache<typename VV::T>& cache) {
  using T = typename VV::T;
  using V = typename VV::V;
  const int64_t n = a.n, m = n - 1;
  const bool uniform = a.family == UNIFORM;
  const V zero{};
  g.load(a.rows, a.dt, tq);
  g.load(a.second, a.second_dt, tg);
  V alpha, oma;
  const V U = inverted_group<VV>(a, g, tq, tu, uniform ? n : m, cache, alpha, oma);
  V bias;  // dL/du = alpha h + bias
  if (uniform) {
    const V shift = oma * (U / static_cast<T>(n));
    V H{};
    for (int64_t b = 0; b < n; ++b) {  // h = G / r (0 where r <= 0), into tg
      const V r = g.at(tu, b) * alpha + shift;
      const V h = r > zero ? g.at(tg, b) / r : zero;
      g.put(tg, b, h);
      H += h;
    }
    bias = oma * (H / static_cast<T>(n));
  } else {
    for (int64_t b = 0; b < m; ++b) {
      const V r = g.at(tu, b) * alpha;
      g.put(tg, b, r > zero ? g.at(tg, b) / r : zero);
    }
    const V rm = g.at(tu, m) + oma * U;
    const V hm = rm > zero ? g.at(tg, m) / rm : zero;
    g.put(tg, m, hm);
    bias = oma * hm;
  }
  for (int64_t b = 0; b < n; ++b) {
    const V du = (!uniform && b == m) ? g.at(tg, b) : g.at(tg, b) * alpha + bias;
    g.put(tq, b, g.at(tq, b) > -kInf<T> ? g.at(tu, b) * du : zero);
  }
  g.store(a.out, a.dt, tq);
}

struct ForwardMapForward {
  using Args = RowArgs;
  static constexpr const char* kRows = "log_p0";
  static constexpr const char* kRowsNotFinite = "log_p0 contains NaN or inf";
  template <class VV>
  static CDM_INLINE void rows(const Args& a, int64_t b, int64_t e) {
    using T = typename VV::T;
    const int64_t n = a.n, np = round_up(n), m = n - 1;
    LogColumnCache<T> cache;
    if (n <= kLanesMaxN) {
      Scratch<T> tile(n * VV::L, 1);
      for (int64_t p0 = b; p0 < e; p0 += VV::L) posterior_to_scores_group<VV>(a, make_group<VV>(p0, e, n), tile.row(0), cache);
      return;
    }
    Scratch<T> scratch(n, 2);
    T *q = scratch.row(0), *s = scratch.row(1);
    for (int64_t p = b; p < e; ++p) {
      const int64_t x = a.x[p];
      const LogColumn<T> col = cache(a.family, n, x, a.tau[p]);
      const Decay& d = cache.d;
      load_row<VV>(a.rows, a.dt, p, n, q, -kInf<T>, a.errors, /*allow_minus_inf=*/true);
      const T alpha = static_cast<T>(d.alpha);
      if (a.family == UNIFORM) {
        const double sum = inverted_row<VV>(q, s, n, n, col, next_rows(p, e, n, a.rows, a.dt));
        const T shift = static_cast<T>(d.one_minus_alpha / static_cast<double>(n) * sum);
        for (int64_t i = 0; i < np; i += VV::L) VV::store(s + i, safe_log<VV>(VV::load(s + i) * alpha + shift));
      } else {
        const double sum = inverted_row<VV>(q, s, n, m, col, next_rows(p, e, n, a.rows, a.dt));  // over real tokens
        const T um = s[m];
        for (int64_t i = 0; i < np; i += VV::L) VV::store(s + i, safe_log<VV>(VV::load(s + i) * alpha));
        const T rm = um + static_cast<T>(d.one_minus_alpha * sum);
        s[m] = rm > T(0) ? std::log(rm) : -kInf<T>;
      }
      store_row<VV>(a.out, a.dt, p, n, s);
    }
  }
};

struct ForwardMapBackward {
  using Args = RowArgs;
  template <class VV>
  static CDM_INLINE void rows(const Args& a, int64_t b, int64_t e) {
    using T = typename VV::T;
    using V = typename VV::V;
    const int64_t n = a.n, np = round_up(n), m = n - 1;
    LogColumnCache<T> cache;
    if (n <= kLanesMaxN) {
      Scratch<T> tiles(n * VV::L, 3);
      for (int64_t p0 = b; p0 < e; p0 += VV::L) {
        posterior_to_scores_backward_group<VV>(a, make_group<VV>(p0, e, n), tiles.row(0), tiles.row(1), tiles.row(2), cache);
      }
      return;
    }
    Scratch<T> scratch(n, 4);
    T *q = scratch.row(0), *s = scratch.row(1), *g = scratch.row(2), *h = scratch.row(3);
    const V zero{};
    for (int64_t p = b; p < e; ++p) {
      const int64_t x = a.x[p];
      const LogColumn<T> col = cache(a.family, n, x, a.tau[p]);
      const Decay& d = cache.d;
      load_row<VV>(a.rows, a.dt, p, n, q, -kInf<T>);
      load_row<VV>(a.second, a.second_dt, p, n, g, T(0));
      const T alpha = static_cast<T>(d.alpha);
      const bool uniform = a.family == UNIFORM;
      const double sum = inverted_row<VV>(q, s, n, uniform ? n : m, col, next_rows(p, e, n, a.rows, a.dt, a.second, a.second_dt));
      // r and h = G / r (0 where r <= 0)
      const T shift = uniform ? static_cast<T>(d.one_minus_alpha / static_cast<double>(n) * sum) : T(0);
      typename VV::Acc acc;
      for (int64_t i = 0; i < np; i += VV::L) {
        const V r = VV::load(s + i) * alpha + shift;
        V hv = r > zero ? VV::load(g + i) / r : zero;
        VV::store(h + i, hv);
        if (CDM_UNLIKELY(i + VV::L > n)) hv = VV::below(n - i) ? hv : zero;
        acc.add(hv);
      }
      T bias;  // dL/du = alpha h + bias (uniform: beta sum h; absorbing: (1 - alpha) h_m)
      if (uniform) {
        bias = static_cast<T>(d.one_minus_alpha / static_cast<double>(n) * acc.sum());
      } else {
        const T rm = s[m] + static_cast<T>(d.one_minus_alpha * sum);
        const T hm = rm > T(0) ? g[m] / rm : T(0);
        h[m] = hm;
        bias = static_cast<T>(d.one_minus_alpha) * hm;
      }
      const T um = s[m];
      for (int64_t i = 0; i < np; i += VV::L) {
        const V du = VV::load(h + i) * alpha + bias;
        const V out = VV::load(s + i) * du;
        VV::store(s + i, VV::load(q + i) > -kInf<T> ? out : zero);
      }
      if (!uniform) s[m] = q[m] > -kInf<T> ? um * h[m] : T(0);  // dL/du_m = h_m
      store_row<VV>(a.out, a.dt, p, n, s);
    }
  }
};

// ----------------------------------------------------------------------------- dense

void dense_rows(const Dense& g, const RowArgs& a, int64_t positions, bool backward) {
  const int64_t n = a.n;
  const double inf = std::numeric_limits<double>::infinity();
  dense_blocks(positions, dense_block_rows(n), [&](int64_t b, int64_t e) {
    const int64_t rows = e - b;
    Scratch<double> buf(rows * n + W, 5);
    double *q = buf.row(0), *u = buf.row(1), *r = buf.row(2), *work = buf.row(3), *col = buf.row(4);
    for (int64_t c = 0; c < rows; ++c) {
      load_row<DenseVT>(a.rows, a.dt, b + c, n, q + c * n, -inf, a.errors, /*allow_minus_inf=*/true);
    }
    dense_column(g, a.x + b, a.tau + b, rows, col, work);
    for (int64_t i = 0; i < rows * n; ++i) {
      const double lc = col[i] > 0.0 ? std::max(std::log(col[i]), -1e30) : -1e30;
      u[i] = q[i] > -inf ? std::exp(q[i] - lc) : 0.0;
    }
    dense_apply(g, u, a.tau + b, 1.0, rows, /*transpose=*/true, r, work);
    if (!backward) {
      for (int64_t i = 0; i < rows * n; ++i) r[i] = r[i] > 0.0 ? std::log(r[i]) : -inf;
      for (int64_t c = 0; c < rows; ++c) store_row<DenseVT>(a.out, a.dt, b + c, n, r + c * n);
      return;
    }
    double* h = col;
    for (int64_t c = 0; c < rows; ++c) load_row<DenseVT>(a.second, a.second_dt, b + c, n, h + c * n, 0.0);
    for (int64_t i = 0; i < rows * n; ++i) h[i] = r[i] > 0.0 ? h[i] / r[i] : 0.0;
    dense_apply(g, h, a.tau + b, 1.0, rows, /*transpose=*/false, r, work);  // dL/du = K h
    for (int64_t i = 0; i < rows * n; ++i) r[i] = q[i] > -inf ? u[i] * r[i] : 0.0;
    for (int64_t c = 0; c < rows; ++c) store_row<DenseVT>(a.out, a.dt, b + c, n, r + c * n);
  });
}

// ----------------------------------------------------------------------------- op

using Op = RowOp<ForwardMapForward, ForwardMapBackward, dense_rows>;

}  // namespace

TORCH_LIBRARY_IMPL(cdm_kernels, CPU, m) {
  m.impl("posterior_to_scores", &Op::forward);
  m.impl("posterior_to_scores_backward", &Op::backward);
}

}  // namespace cpu
}  // namespace cdm
