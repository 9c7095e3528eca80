// Row passes shared by the kernels that invert scores (posterior, loss, reverse step).
//
// A row of log-scores is first copied into a padded scratch row s (pad lanes -inf). Then
//   row_max             M = max_b s_b                              (1 compare / element)
//   exp_shift_store     s_b <- exp(s_b - M), returns S = sum_b s_b (1 exp / element)
// For the uniform graph `uniform_ratios` does both with the r_x := 1 rule (s_x = 0 before
// the max) and derives the per-row scalars of the clamped inversion
//   u_b = max(r_b - beta S, floor),  floor = POSTERIOR_FLOOR e^-M,
// with r = e^{log_score' - M} (every map is homogeneous in r; the scale e^-M cancels).
#pragma once

#include "cpu/cpu_common.h"

namespace cdm {
namespace cpu {

template <class T>
CDM_INLINE T row_max(const T* s, int64_t np) {
  using VV = VT<T>;
  typename VV::V m = VV::splat(-kInf<T>);
  for (int64_t i = 0; i < np; i += W) {
    typename VV::V v = VV::load(s + i);
    m = v > m ? v : m;
  }
  return VV::hmax(m);
}

template <class T>
CDM_INLINE double exp_shift_store(T* s, int64_t np, T shift) {
  using VV = VT<T>;
  vec::vd acc{};
  for (int64_t i = 0; i < np; i += W) {
    typename VV::V r = VV::exp(VV::load(s + i) - shift);
    VV::store(s + i, r);
    acc += VV::wide(r);
  }
  return vec::hsum(acc);
}

template <class T>
CDM_INLINE double exp_shift_sum(const T* s, int64_t np, T shift) {
  using VV = VT<T>;
  vec::vd acc{};
  for (int64_t i = 0; i < np; i += W) acc += VV::wide(VV::exp(VV::load(s + i) - shift));
  return vec::hsum(acc);
}

template <class T>
CDM_INLINE double row_sum(const T* s, int64_t np) {
  using VV = VT<T>;
  vec::vd acc{};
  for (int64_t i = 0; i < np; i += W) acc += VV::wide(VV::load(s + i));
  return vec::hsum(acc);
}

// u = max(d, floor), propagating NaN from d
template <class V, class S>
CDM_INLINE V clamp_floor(V d, S floor) {
  return d < floor ? V{} + floor : d;
}
template <class T>
CDM_INLINE T clamp_floor_scalar(T d, T floor) {
  return d < floor ? floor : d;
}

template <class T>
struct UniformRow {
  UniformCoeffs c;
  T M;       // row max of log_score' (>= 0: it includes the 0 at x)
  double S;  // sum of r
  T cs;      // beta S, rounded to T: u_b = max(r_b - cs, floor)
  T floor;   // POSTERIOR_FLOOR e^-M
  T r_x;     // e^-M
  T u_x;     // max(r_x - cs, floor)
};

// s: a log-score row loaded with -inf padding. Leaves r in s.
template <class T>
CDM_INLINE UniformRow<T> uniform_ratios(T* s, int64_t n, int64_t x, double tau) {
  const int64_t np = round_up(n);
  UniformRow<T> row;
  s[x] = T(0);  // r_x := 1
  row.M = row_max(s, np);
  row.S = exp_shift_store(s, np, row.M);
  row.c = uniform_coeffs(tau, n);
  row.cs = static_cast<T>(row.c.beta * row.S);
  row.floor = static_cast<T>(POSTERIOR_FLOOR * std::exp(-static_cast<double>(row.M)));
  row.r_x = s[x];
  row.u_x = clamp_floor_scalar<T>(row.r_x - row.cs, row.floor);
  return row;
}

}  // namespace cpu
}  // namespace cdm
