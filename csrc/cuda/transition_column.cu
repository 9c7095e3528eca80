// transition_column on CUDA: out[p, a] = K(tau_p)[a, x_p], float32 or float64.
// Uniform and absorbing columns take two values (graph.h), written in one pass: memory
// bound. Computed as reference.py does in the output dtype (alpha and 1 - alpha rounded
// from double, then (1 - alpha) / N in that dtype), as the CPU kernel. Dense: dense.cpp.
#include "cuda/cuda_common.cuh"

namespace cdm {
namespace gpu {
namespace {

template <class T>
struct ColumnArgs : RowArgs {
  T* out;
};

template <class T, bool AL, int W>
CDM_GLOBAL void CDM_BOUNDS(Group<W>::kBlock, min_blocks<T>()) column_kernel(const ColumnArgs<T> a) {
  CDM_ROW_GROUP(a, g, p, gs);
  const int64_t n = a.n, x = a.x[p];
  const Decay d = decay(a.tau[p]);
  const T alpha = static_cast<T>(d.alpha), oma = static_cast<T>(d.one_minus_alpha);
  T on, off;
  int64_t at = x;
  if (a.family == UNIFORM) {
    off = oma / static_cast<T>(n);
    on = alpha + off;
  } else if (x == n - 1) {  // absorbing, the mask column
    off = oma;
    on = T(1);
  } else {
    off = T(0);
    on = alpha;
  }
  fill_row<T, AL, W>(g, a.out + p * n, n, at, on, off);
}

at::Tensor transition_column_cuda(int64_t family, const c10::optional<at::Tensor>& evals,
                                  const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                                  const at::Tensor& x_in, const at::Tensor& tau_in, int64_t num_states,
                                  bool out_float64) {
  CDM_DEVICE_GUARD(x_in);
  check_family(family);
  TORCH_CHECK(num_states >= 2, "cdm_kernels: num_states must be >= 2, got ", num_states);
  TORCH_CHECK(x_in.dim() == 1, "cdm_kernels: x must be (P,), got ", x_in.sizes());
  const int64_t positions = x_in.size(0), n = num_states;
  check_positions(x_in, x_in, "x", positions, at::kLong);
  check_positions(tau_in, x_in, "tau", positions, at::kDouble);
  const RowInputs in{positions, n, x_in.contiguous(), tau_in.contiguous()};
  const auto dtype = out_float64 ? at::kDouble : at::kFloat;
  if (family == DENSE) {
    const dense::Eigen eg = check_dense(evals, vecs, vecs_inv, n, x_in.device());
    return dense::column(eg, in.x, in.tau).to(dtype);
  }
  at::Tensor out = at::empty({positions, n}, x_in.options().dtype(dtype));
  if (positions == 0) return out;
  dispatch_rows(dtype, is_aligned_rows(out), n, [&]<class T, bool AL, int W>() {
    if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
      const ColumnArgs<T> a{row_args(in, family, plan_smem<T, W>(n, /*stats=*/false, /*cache_rows=*/0)),
                            out.data_ptr<T>()};
      launch_rows<W>(&column_kernel<T, AL, W>, a);
    }
  });
  return out;
}

}  // namespace

CDM_CUDA_IMPL(m) { m.impl("transition_column", &transition_column_cuda); }

}  // namespace gpu
}  // namespace cdm
