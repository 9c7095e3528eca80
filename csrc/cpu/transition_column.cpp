// transition_column on the CPU: out[p, a] = K(tau_p)[a, x_p] (graph.h for the closed forms).
//
// Uniform and absorbing columns take two distinct values, written in one pass (memory
// bound). The float32 output is computed exactly as reference.py does in float32
// (alpha and 1 - alpha rounded from double, then (1 - alpha) / N in float32), so the two
// agree bit for bit. Dense graphs: blocks of rows through the eigenbasis (dense.cpp).
#include "cpu/cpu_common.h"

namespace cdm {
namespace cpu {
namespace {

template <class T>
void closed_form_columns(int64_t family, const int64_t* x, const double* tau, int64_t positions, int64_t n, T* out) {
  at::parallel_for(0, positions, row_grain(n), [&](int64_t b, int64_t e) {
    DecayCache dc;
    for (int64_t p = b; p < e; ++p) {
      const Decay d = dc(tau[p]);
      const T alpha = static_cast<T>(d.alpha), oma = static_cast<T>(d.one_minus_alpha);
      const int64_t xp = x[p];
      T* o = out + p * n;
      if (family == UNIFORM) {
        const T off = oma / static_cast<T>(n);
        const T on = alpha + off;
        for (int64_t a = 0; a < n; ++a) o[a] = off;
        o[xp] = on;
      } else if (xp == n - 1) {  // absorbing, the mask column
        for (int64_t a = 0; a < n; ++a) o[a] = oma;
        o[n - 1] = T(1);
      } else {
        for (int64_t a = 0; a < n; ++a) o[a] = T(0);
        o[xp] = alpha;
      }
    }
  });
}

at::Tensor transition_column_cpu(int64_t family, const c10::optional<at::Tensor>& evals,
                                 const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                                 const at::Tensor& x, const at::Tensor& tau, int64_t num_states, bool out_float64) {
  const Dense g = check_graph(family, evals, vecs, vecs_inv, num_states);
  TORCH_CHECK(x.dim() == 1, "cdm_kernels: x must be (P,), got ", x.sizes());
  const int64_t positions = x.size(0), n = num_states;
  check_positions(x, "x", positions, at::kLong);
  check_token_range(x, n);
  check_positions(tau, "tau", positions, at::kDouble);
  const auto dtype = out_float64 ? at::kDouble : at::kFloat;
  at::Tensor out = empty_output({positions, n}, x.options().dtype(dtype));
  if (positions == 0) return out;
  const int64_t* xp = x.data_ptr<int64_t>();
  const double* tp = tau.data_ptr<double>();
  if (family != DENSE) {
    if (out_float64) {
      closed_form_columns<double>(family, xp, tp, positions, n, out.data_ptr<double>());
    } else {
      closed_form_columns<float>(family, xp, tp, positions, n, out.data_ptr<float>());
    }
    return out;
  }
  const int64_t block = dense_block_rows(n);
  dense_blocks(positions, block, [&](int64_t b, int64_t e) {
    const int64_t rows = e - b;
    Scratch<double> buf(rows * n, 2);
    dense_column(g, xp + b, tp + b, rows, buf.row(0), buf.row(1));
    if (out_float64) {
      std::copy(buf.row(0), buf.row(0) + rows * n, out.data_ptr<double>() + b * n);
    } else {
      float* o = out.data_ptr<float>() + b * n;
      for (int64_t i = 0; i < rows * n; ++i) o[i] = static_cast<float>(buf.row(0)[i]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cdm_kernels, CPU, m) { m.impl("transition_column", &transition_column_cpu); }

}  // namespace cpu
}  // namespace cdm
