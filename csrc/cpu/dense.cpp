// Dense graphs (family 2) on the CPU: the forward kernel through the float64
// eigen-decomposition Q = V diag(lambda) V^-1, a block of positions at a time.
//
//   K(tau)[a, x]   = sum_k V[a, k] e^{tau lambda_k} V^-1[k, x]
//   K(tau)^T v     = V^-T diag(e^{tau lambda}) V^T v      (row form: ((v V) * d) V^-1)
//   K(tau) v       = V diag(e^{tau lambda}) V^-1 v        (row form: ((v V^-T) * d) V^T)
//
// Each block of rows is two GEMMs (at::mm, MKL) plus an O(rows n) scaling; blocks run
// in parallel (one thread each, at::parallel_for), so the O(N^2) per position costs what
// a GEMM costs. Everything is float64, as in reference.py: the inversion amplifies
// rounding by e^{tau |lambda|}.
#include "cpu/cpu_common.h"
#include "cpu/inversion.h"

namespace cdm {
namespace cpu {

namespace {

at::Tensor view(const double* p, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<double*>(p), {rows, cols}, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

Dense check_graph(int64_t family, const c10::optional<at::Tensor>& evals, const c10::optional<at::Tensor>& vecs,
                  const c10::optional<at::Tensor>& vecs_inv, int64_t num_states) {
  TORCH_CHECK(family == UNIFORM || family == ABSORBING || family == DENSE,
              "cdm_kernels: family must be 0 (uniform), 1 (absorbing) or 2 (dense), got ", family);
  TORCH_CHECK(num_states >= 2, "cdm_kernels: num_states must be >= 2, got ", num_states);
  Dense d;
  d.n = num_states;
  if (family != DENSE) return d;
  TORCH_CHECK(evals.has_value() && vecs.has_value() && vecs_inv.has_value(),
              "cdm_kernels: a dense graph (family 2) needs evals, vecs and vecs_inv");
  const at::Tensor* parts[3] = {&*evals, &*vecs, &*vecs_inv};
  const char* names[3] = {"evals", "vecs", "vecs_inv"};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *parts[i];
    TORCH_CHECK(t.device().is_cpu(), "cdm_kernels (CPU): ", names[i], " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == at::kDouble, "cdm_kernels: ", names[i], " must be float64, got ", t.scalar_type());
    if (i == 0) {
      TORCH_CHECK(t.dim() == 1 && t.size(0) == num_states, "cdm_kernels: evals must be (", num_states, ",), got ",
                  t.sizes());
    } else {
      TORCH_CHECK(t.dim() == 2 && t.size(0) == num_states && t.size(1) == num_states, "cdm_kernels: ", names[i],
                  " must be (", num_states, ", ", num_states, "), got ", t.sizes());
    }
  }
  d.evals = evals->contiguous();
  d.vecs = vecs->contiguous();
  d.vecs_inv = vecs_inv->contiguous();
  d.lam = d.evals.data_ptr<double>();
  d.v = d.vecs.data_ptr<double>();
  d.vinv = d.vecs_inv.data_ptr<double>();
  return d;
}

int64_t dense_block_rows(int64_t n) { return std::max<int64_t>(8, std::min<int64_t>(256, 32768 / std::max<int64_t>(n, 1))); }

void dense_column(const Dense& g, const int64_t* x, const double* tau, int64_t rows, double* out, double* work) {
  const int64_t n = g.n;
  for (int64_t c = 0; c < rows; ++c) {
    const int64_t xc = x[c];
    for (int64_t k = 0; k < n; ++k) work[c * n + k] = std::exp(tau[c] * g.lam[k]) * g.vinv[k * n + xc];
  }
  at::Tensor o = view(out, rows, n);
  at::mm_out(o, view(work, rows, n), g.vecs.t());  // out[c, a] = sum_k work[c, k] V[a, k]
  for (int64_t i = 0; i < rows * n; ++i) out[i] = out[i] < 0.0 ? 0.0 : out[i];
}

void dense_apply(const Dense& g, const double* in, const double* tau, double sign, int64_t rows, bool transpose,
                 double* out, double* work) {
  const int64_t n = g.n;
  at::Tensor w = view(work, rows, n);
  at::Tensor o = view(out, rows, n);
  if (transpose) {
    at::mm_out(w, view(in, rows, n), g.vecs);  // (v V)
  } else {
    at::mm_out(w, view(in, rows, n), g.vecs_inv.t());  // (v V^-T)
  }
  for (int64_t c = 0; c < rows; ++c) {
    const double t = sign * tau[c];
    for (int64_t k = 0; k < n; ++k) work[c * n + k] *= std::exp(t * g.lam[k]);
  }
  if (transpose) {
    at::mm_out(o, w, g.vecs_inv);
  } else {
    at::mm_out(o, w, g.vecs.t());
  }
}

at::Tensor dense_rate_matrix(const Dense& g) {
  const int64_t n = g.n;
  at::Tensor scaled = at::empty({n, n}, g.vecs.options());
  double* sv = scaled.data_ptr<double>();
  for (int64_t a = 0; a < n; ++a)
    for (int64_t k = 0; k < n; ++k) sv[a * n + k] = g.v[a * n + k] * g.lam[k];
  at::Tensor q = at::mm(scaled, g.vecs_inv).contiguous();
  double* qv = q.data_ptr<double>();
  double scale = 0.0;
  for (int64_t i = 0; i < n * n; ++i) scale = std::max(scale, std::abs(qv[i]));
  for (int64_t i = 0; i < n * n; ++i) qv[i] = std::abs(qv[i]) < 1e-12 * scale ? 0.0 : qv[i];
  return q;
}

void dense_log_posterior(const Dense& g, const void* log_score, DT dt, const int64_t* x, const double* tau, int64_t p0,
                         int64_t rows, double* R, double* Uraw, double* L, double* work, double* M,
                         ValueErrors* errors) {
  const int64_t n = g.n;
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < rows; ++c) {  // in order: each row's padding spills into the next, rewritten after
    double* r = R + c * n;
    load_row<DenseVT>(log_score, dt, p0 + c, n, r, -inf, errors);
    r[x[c]] = 0.0;  // r_x := 1
    double m = -inf;
    for (int64_t b = 0; b < n; ++b) m = r[b] > m ? r[b] : m;
    M[c] = m;
    for (int64_t b = 0; b < n; ++b) r[b] = std::exp(r[b] - m);
  }
  dense_apply(g, R, tau, -1.0, rows, /*transpose=*/true, Uraw, work);
  dense_column(g, x, tau, rows, L, work);  // L holds the column until overwritten below
  for (int64_t c = 0; c < rows; ++c) {
    // POSTERIOR_FLOOR e^-M, never below the smallest normal double (reference.py)
    const double floor = std::max(POSTERIOR_FLOOR * std::exp(-M[c]), std::numeric_limits<double>::min());
    double* l = L + c * n;
    const double* u = Uraw + c * n;
    double lmax = -inf;
    for (int64_t b = 0; b < n; ++b) {
      const double ub = u[b] < floor ? floor : u[b];
      const double col = l[b];
      const double v = (col > 0.0 ? std::log(col) : -inf) + std::log(ub);
      l[b] = v;
      lmax = v > lmax ? v : lmax;
    }
    double s = 0.0;
    for (int64_t b = 0; b < n; ++b) s += std::exp(l[b] - lmax);
    const double lse = lmax + std::log(s);
    for (int64_t b = 0; b < n; ++b) l[b] -= lse;
  }
}

void dense_posterior_backward(const Dense& g, const RowArgs& a, const DensePosterior& blk) {
  const int64_t n = g.n;
  // dL/dlog q_unnorm = G - q sum G, dL/du = w (.) / u (w: 1 unclamped, 1/2 on a tie, 0 clamped)
  for (int64_t c = 0; c < blk.rows; ++c) {
    double* gc = blk.second + c * n;
    const double* lc = blk.L + c * n;
    const double* uc = blk.Uraw + c * n;
    const double floor = posterior_floor<double>(blk.M[c]);
    double sum_g = 0.0;
    for (int64_t k = 0; k < n; ++k) sum_g += gc[k];
    for (int64_t k = 0; k < n; ++k) {
      const double dl = gc[k] - std::exp(lc[k]) * sum_g;
      const double w = uc[k] > floor ? 1.0 : (uc[k] == floor ? 0.5 : 0.0);
      const double ub = uc[k] < floor ? floor : uc[k];
      gc[k] = w != 0.0 ? w * dl / ub : 0.0;
    }
  }
  // dL/dr = K(-tau) dL/du
  dense_apply(g, blk.second, a.tau + blk.p0, -1.0, blk.rows, /*transpose=*/false, blk.work, blk.L);
  for (int64_t c = 0; c < blk.rows; ++c) {  // dL/dlog_score = r dL/dr, 0 at x (r_x := 1 is no input)
    double* o = blk.work + c * n;
    const double* rc = blk.R + c * n;
    for (int64_t k = 0; k < n; ++k) o[k] *= rc[k];
    o[a.x[blk.p0 + c]] = 0.0;
    store_row<DenseVT>(a.out, a.dt, blk.p0 + c, n, o);
  }
}

}  // namespace cpu
}  // namespace cdm
