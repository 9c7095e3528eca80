// apply_kernel on CUDA: K(tau)^T v (transpose) or K(tau) v, row by row; v's dtype out.
//   uniform (symmetric)   alpha v + beta (sum v) 1                          2 passes
//   absorbing K^T v       alpha v_a on real tokens; v_m + (1 - alpha) sum_{a<m} v_a on the mask
//   absorbing K v         alpha v_a + (1 - alpha) v_m on real tokens; v_m   1 pass
//   dense                 float64 through the eigenbasis (dense.cpp)
// A negative tau applies the inverse kernel. Sums in float32 per thread (float64 for
// float64 rows), float64 across threads; the row is cached in shared memory between passes.
#include "cuda/cuda_common.cuh"

namespace cdm {
namespace gpu {
namespace {

template <class S>
struct ApplyArgs : RowArgs {  // x: unused
  const S* v;
  S* out;
  int transpose;
};

template <class S, bool AL, int W>
CDM_GLOBAL void CDM_BOUNDS(Group<W>::kBlock, min_blocks<S>()) apply_kernel_kernel(const ApplyArgs<S> a) {
  using C = typename Compute<S>::type;
  CDM_ROW_GROUP(a, g, p, gs);
  const int64_t n = a.n, m = n - 1;
  const S* row = a.v + p * n;
  S* out = a.out + p * n;
  const Decay d = decay(a.tau[p]);
  const C alpha = static_cast<C>(d.alpha);
  const C vm = to_compute<C>(load_for_group(g, row + m));
  if (a.family == ABSORBING && !a.transpose) {  // K v: one pass
    const C shift = static_cast<C>(d.one_minus_alpha) * vm;
    map_segments<S, AL, W>(g, row, out, n, [&](int64_t seg, S* raw) {
#pragma unroll
      for (int k = 0; k < kEPT; ++k) {
        const int64_t i = slot_index<AL>(seg, g.lane, k);
        raw[k] = to_storage<S>(i == m ? vm : to_compute<C>(raw[k]) * alpha + shift);
      }
    });
    return;
  }
  S* cache = cache_row<S>(gs, a.plan, 0);
  C acc = C(0);
  read_segments<S, AL, W>(g, row, n, cache, [&](int64_t seg, const S* raw) {
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t i = slot_index<AL>(seg, g.lane, k);
      if (i < n && (a.family == UNIFORM || i != m)) acc += to_compute<C>(raw[k]);  // slots past n hold 0
    }
  });
  const double sum = g.sum(static_cast<double>(acc));
  const S* src = cache != nullptr ? cache : row;
  const C shift = a.family == UNIFORM ? static_cast<C>(d.one_minus_alpha / static_cast<double>(n) * sum) : C(0);
  const C mask_value = vm + static_cast<C>(d.one_minus_alpha * sum);
  map_segments<S, AL, W>(g, src, out, n, [&](int64_t seg, S* raw) {
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t i = slot_index<AL>(seg, g.lane, k);
      const C v = to_compute<C>(raw[k]);
      raw[k] = to_storage<S>(a.family == UNIFORM ? v * alpha + shift : (i == m ? mask_value : v * alpha));
    }
  });
}

at::Tensor apply_kernel_cuda(int64_t family, const c10::optional<at::Tensor>& evals,
                             const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                             const at::Tensor& v, const at::Tensor& tau_in, bool transpose) {
  CDM_DEVICE_GUARD(v);
  check_family(family);
  check_rows(v, "v");
  const int64_t positions = v.size(0), n = v.size(1);
  check_positions(tau_in, v, "tau", positions, at::kDouble);
  const RowInputs in{positions, n, at::Tensor(), tau_in.contiguous()};
  if (family == DENSE) {
    const dense::Eigen eg = check_dense(evals, vecs, vecs_inv, n, v.device());
    return dense::apply(eg, v.to(at::kDouble), in.tau, transpose).to(v.scalar_type());
  }
  at::Tensor out = at::empty_like(v);
  if (positions == 0) return out;
  dispatch_rows(v.scalar_type(), is_aligned_rows(v) && is_aligned_rows(out), n, [&]<class S, bool AL, int W>() {
    const ApplyArgs<S> a{row_args(in, family, plan_smem<S, W>(n, /*stats=*/false, /*cache_rows=*/1)),
                         static_cast<const S*>(v.data_ptr()), static_cast<S*>(out.data_ptr()), transpose ? 1 : 0};
    launch_rows<W>(&apply_kernel_kernel<S, AL, W>, a);
  });
  return out;
}

}  // namespace

CDM_CUDA_IMPL(m) { m.impl("apply_kernel", &apply_kernel_cuda); }

}  // namespace gpu
}  // namespace cdm
