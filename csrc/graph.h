// Closed-form coefficients of the forward kernels, shared by the CPU and CUDA code.
//
// Row convention (docs: MATH.md section 1): K(tau) = expm(tau Q), K[a, x] = P(x_t = x | x_0 = a).
//   uniform   (family 0): K = alpha I + beta 11^T, alpha = e^-tau, beta = (1 - e^-tau) / N
//   absorbing (family 1): mask m = N - 1; row a != m: alpha on a, 1 - alpha on m; row m: e_m
//   dense     (family 2): K = V diag(e^{tau lambda}) V^-1 (float64 eigen-decomposition)
// `1 - e^-tau` is always computed as -expm1(-tau) in double: exact for tiny tau, where
// 1 - exp(-tau) would lose every digit. A negative tau gives the inverse kernel K(-tau).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CDM_HD __host__ __device__
#else
#define CDM_HD
#endif

namespace cdm {

enum Family : int64_t { UNIFORM = 0, ABSORBING = 1, DENSE = 2 };

// reference.POSTERIOR_FLOOR: the inverted ratios u = K^-T r are clamped at this times r_x (= 1)
constexpr double POSTERIOR_FLOOR = 1e-10;

// e^-tau and 1 - e^-tau, both to full double precision
struct Decay {
  double alpha;            // e^-tau
  double one_minus_alpha;  // 1 - e^-tau
};

CDM_HD inline Decay decay(double tau) {
  Decay d;
  d.alpha = exp(-tau);
  d.one_minus_alpha = -expm1(-tau);
  return d;
}

// Uniform graph: K[a, x] = beta + alpha [a == x].
struct UniformCoeffs {
  double alpha;  // e^-tau
  double beta;   // (1 - e^-tau) / N
  CDM_HD double off() const { return beta; }         // K[a, x], a != x
  CDM_HD double on() const { return alpha + beta; }  // K[x, x]
};

CDM_HD inline UniformCoeffs uniform_coeffs(const Decay& d, int64_t num_states) {
  UniformCoeffs c;
  c.alpha = d.alpha;
  c.beta = d.one_minus_alpha / static_cast<double>(num_states);
  return c;
}

CDM_HD inline UniformCoeffs uniform_coeffs(double tau, int64_t num_states) {
  return uniform_coeffs(decay(tau), num_states);
}

// Absorbing graph: the column K[:, x] for x != mask is alpha e_x; the mask column is
// (1 - alpha) on every real token and 1 on the mask.
CDM_HD inline int64_t absorbing_mask(int64_t num_states) { return num_states - 1; }

CDM_HD inline double absorbing_column(double alpha, double one_minus_alpha, int64_t a, int64_t x, int64_t num_states) {
  const int64_t m = num_states - 1;
  if (x == m) return a == m ? 1.0 : one_minus_alpha;
  return a == x ? alpha : 0.0;
}

CDM_HD inline double uniform_column(const UniformCoeffs& c, int64_t a, int64_t x) {
  return a == x ? c.on() : c.off();
}

}  // namespace cdm
