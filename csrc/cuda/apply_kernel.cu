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
struct ApplyArgs {
  const S* v;
  const double* tau;
  S* out;
  int64_t positions, n, family;
  int transpose;
  SmemPlan plan;
};

template <class S, bool AL, int W>
CDM_GLOBAL void CDM_BOUNDS(Group<W>::kBlock, min_blocks<S>()) apply_kernel_kernel(const ApplyArgs<S> a) {
  using C = typename Compute<S>::type;
  CDM_DECLARE_SMEM(smem);
  Group<W> g;
  int64_t p;
  unsigned char* gs;
  if (!row_setup<W>(smem, a.plan, a.positions, g, p, gs)) return;
  const int64_t n = a.n, nseg = num_segments(n), m = n - 1;
  const S* row = a.v + p * n;
  S* out = a.out + p * n;
  const Decay d = decay(a.tau[p]);
  const C alpha = static_cast<C>(d.alpha);
  const C vm = to_compute<C>(row[m]);
  if (a.family == ABSORBING && !a.transpose) {  // K v: one pass
    const C shift = static_cast<C>(d.one_minus_alpha) * vm;
    for (int64_t seg = g.warp; seg < nseg; seg += W) {
      alignas(16) S raw[kEPT];
      load_raw<S, AL>(row, n, seg, g.lane, raw);
#pragma unroll
      for (int k = 0; k < kEPT; ++k) {
        const int64_t i = slot_index<AL>(seg, g.lane, k);
        raw[k] = to_storage<S>(i == m ? vm : to_compute<C>(raw[k]) * alpha + shift);
      }
      store_raw<S, AL>(out, n, seg, g.lane, raw);
    }
    return;
  }
  S* cache = cache_row<S>(gs, a.plan, 0);
  C acc = C(0);
  for (int64_t seg = g.warp; seg < nseg; seg += W) {
    alignas(16) S raw[kEPT];
    load_raw<S, AL>(row, n, seg, g.lane, raw);
    if (cache != nullptr) store_raw<S, AL>(cache, n, seg, g.lane, raw);
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t i = slot_index<AL>(seg, g.lane, k);
      if (i < n && (a.family == UNIFORM || i != m)) acc += to_compute<C>(raw[k]);  // slots past n hold 0
    }
  }
  const double sum = g.sum(static_cast<double>(acc));
  const S* src = cache != nullptr ? cache : row;
  const C shift = a.family == UNIFORM ? static_cast<C>(d.one_minus_alpha / static_cast<double>(n) * sum) : C(0);
  const C mask_value = vm + static_cast<C>(d.one_minus_alpha * sum);
  for (int64_t seg = g.warp; seg < nseg; seg += W) {
    alignas(16) S raw[kEPT];
    load_raw<S, AL>(src, n, seg, g.lane, raw);
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t i = slot_index<AL>(seg, g.lane, k);
      const C v = to_compute<C>(raw[k]);
      raw[k] = to_storage<S>(a.family == UNIFORM ? v * alpha + shift : (i == m ? mask_value : v * alpha));
    }
    store_raw<S, AL>(out, n, seg, g.lane, raw);
  }
}

at::Tensor apply_kernel_cuda(int64_t family, const c10::optional<at::Tensor>& evals,
                             const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                             const at::Tensor& v, const at::Tensor& tau_in, bool transpose) {
  CDM_DEVICE_GUARD(v);
  check_family(family);
  check_rows(v, "v");
  const int64_t positions = v.size(0), n = v.size(1);
  check_positions(tau_in, v, "tau", positions, at::kDouble);
  const at::Tensor tau = tau_in.contiguous();
  if (family == DENSE) {
    const dense::Eigen eg = check_dense(evals, vecs, vecs_inv, n, v.device());
    return dense::apply(eg, v.to(at::kDouble), tau, transpose).to(v.scalar_type());
  }
  at::Tensor out = at::empty_like(v);
  if (positions == 0) return out;
  dispatch_rows(v.scalar_type(), is_aligned_rows(v) && is_aligned_rows(out), n,
                [&](auto s_tag, auto al_tag, auto w_tag) {
                  using S = decltype(s_tag);
                  constexpr bool AL = decltype(al_tag)::value;
                  constexpr int W = decltype(w_tag)::value;
                  ApplyArgs<S> a;
                  a.v = static_cast<const S*>(v.data_ptr());
                  a.tau = tau.data_ptr<double>();
                  a.out = static_cast<S*>(out.data_ptr());
                  a.positions = positions;
                  a.n = n;
                  a.family = family;
                  a.transpose = transpose ? 1 : 0;
                  a.plan = plan_smem<S, W>(n, /*stats=*/false, /*cache_rows=*/1);
                  launch_rows<W>(&apply_kernel_kernel<S, AL, W>, a, positions, a.plan);
                });
  return out;
}

}  // namespace

CDM_CUDA_IMPL(m) { m.impl("apply_kernel", &apply_kernel_cuda); }

}  // namespace gpu
}  // namespace cdm
