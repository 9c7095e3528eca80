// Portable 16-lane vectors (GCC/Clang vector extensions) and fast float exp/log.
//
// Everything here is `always_inline` and free of ISA intrinsics: a kernel body
// written with these types is compiled once per ISA by inlining it into a
// wrapper carrying `__attribute__((target(...)))` (see cpu_common.h), and GCC
// lowers the 64-byte vectors to 4 x SSE, 2 x AVX2 or 1 x AVX-512 registers.
// Every lane sees the same sequence of IEEE operations whatever the ISA, so
// the variants agree bit for bit as long as no multiply-add is contracted
// (the op files are compiled with `fp-contract=off`, see cpu_common.h).
//
// exp_ps / log_ps are Cephes-style polynomial approximations (the classic
// `expf`/`logf` of Cephes, as in sse_mathfun): relative error about 1-2 ulp over the
// whole float range, including subnormal results (exp) and subnormal inputs
// (log); exp(-inf) = 0, exp(+inf) = inf, log(0) = -inf, log(x < 0) = NaN,
// log(inf) = inf, NaN in -> NaN out.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>

#define CDM_INLINE inline __attribute__((always_inline))
#define CDM_UNLIKELY(x) __builtin_expect(!!(x), 0)

namespace cdm {
namespace vec {

constexpr int W = 16;  // lanes of every vector type below

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef double vd __attribute__((vector_size(128)));
typedef int64_t vl __attribute__((vector_size(128)));
typedef uint16_t vh __attribute__((vector_size(32)));

// ----------------------------------------------------------------------------- loads and stores

template <class V, class T>
CDM_INLINE V loadu(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class V, class T>
CDM_INLINE void storeu(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

CDM_INLINE vf splat(float a) { return vf{} + a; }
CDM_INLINE vd splat(double a) { return vd{} + a; }
CDM_INLINE vi splati(int32_t a) { return vi{} + a; }
CDM_INLINE vl splatl(int64_t a) { return vl{} + a; }

CDM_INLINE vi iota_i() { return vi{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }
CDM_INLINE vl iota_l() { return vl{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }

CDM_INLINE vd to_double(vf v) { return __builtin_convertvector(v, vd); }
CDM_INLINE vf to_float(vd v) { return __builtin_convertvector(v, vf); }

// bit patterns
CDM_INLINE vi as_int(vf v) { return (vi)v; }
CDM_INLINE vf as_float(vi v) { return (vf)v; }

// fixed-order horizontal sum (identical on every ISA)
CDM_INLINE double hsum(vd v) {
  double s = 0.0;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}
CDM_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
CDM_INLINE double hmax(vd v) {
  double m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// ----------------------------------------------------------------------------- exp / log (float)

// e^x: x = k ln2 + r, |r| <= ln2/2; e^r by a degree-6 polynomial; 2^k applied in two
// halves so that subnormal results are rounded once (and k = 128 overflows to inf).
CDM_INLINE vf exp_ps(vf x) {
  const vf lo = splat(-104.0f), hi = splat(89.0f);
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = xc * 1.44269504088896341f + shifter;
  vf kf = t - shifter;
  vi k = as_int(t) - as_int(shifter);
  vf r = xc - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vf y = p * (r * r) + r + 1.0f;
  vi k1 = k >> 1;
  vi k2 = k - k1;
  vf s1 = as_float((k1 + 127) << 23);
  vf s2 = as_float((k2 + 127) << 23);
  y = y * s1 * s2;
  return x != x ? x : y;
}

// log x: x = m 2^e, m in [sqrt(1/2), sqrt(2)); log m = f - f^2/2 + f^3 P(f), f = m - 1.
CDM_INLINE vf log_ps(vf x) {
  const vf min_normal = splat(1.17549435e-38f);
  vi subnormal = x < min_normal;
  vf xs = subnormal ? x * 8388608.0f : x;  // 2^23
  vi bits = as_int(xs);
  vi e = ((bits >> 23) & 0xff) - 126;
  e = subnormal ? e - 23 : e;
  vf m = as_float((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  vi small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  vf f = (small ? m + m : m) - 1.0f;
  vf z = f * f;
  vf p = splat(7.0376836292e-2f);
  p = p * f + -1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f + -1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f + -1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f + -2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  vf ef = __builtin_convertvector(e, vf);
  vf y = p * f * z;
  y = y + ef * -2.12194440e-4f;
  y = y - z * 0.5f;
  vf res = f + y;
  res = res + ef * 0.693359375f;
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  res = x == 0.0f ? splat(-inf) : res;
  res = x == inf ? splat(inf) : res;
  res = (x < 0.0f) | (x != x) ? splat(nan) : res;
  return res;
}

// double: lane-wise libm (the float64 path serves gradcheck and dense graphs, not speed)
CDM_INLINE vd exp_pd(vd x) {
  vd y;
  for (int i = 0; i < W; ++i) y[i] = std::exp(x[i]);
  return y;
}
CDM_INLINE vd log_pd(vd x) {
  vd y;
  for (int i = 0; i < W; ++i) y[i] = std::log(x[i]);
  return y;
}

// ----------------------------------------------------------------------------- 16-bit floats

// bfloat16 <-> float (round to nearest even, NaN kept quiet): as c10::BFloat16
CDM_INLINE vf bf16_to_float(vh h) { return as_float((vi)(__builtin_convertvector(h, vu) << 16)); }
CDM_INLINE vh float_to_bf16(vf f) {
  vu u = (vu)f;
  vu rounded = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
  vu out = (f != f) ? vu{} + 0x7fc0u : rounded;
  return __builtin_convertvector(out, vh);
}

// IEEE half <-> float, branch-free (the FP16 library's algorithm, as c10::Half)
CDM_INLINE vf half_to_float(vh h) {
  vu w = __builtin_convertvector(h, vu) << 16;
  vu sign = w & 0x80000000u;
  vu two_w = w + w;
  vf normalized = as_float((vi)((two_w >> 4) + (0xE0u << 23))) * 0x1.0p-112f;
  vf denormalized = as_float((vi)((two_w >> 17) | (126u << 23))) - 0.5f;
  vu result = sign | (two_w < (1u << 27) ? (vu)denormalized : (vu)normalized);
  return (vf)result;
}
CDM_INLINE vh float_to_half(vf f) {
  vf absf = as_float(as_int(f) & 0x7fffffff);
  vf base = (absf * 0x1.0p+112f) * 0x1.0p-110f;
  vu w = (vu)f;
  vu shl1_w = w + w;
  vu sign = w & 0x80000000u;
  vu bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? vu{} + 0x71000000u : bias;
  base = as_float((vi)((bias >> 1) + 0x07800000u)) + base;
  vu bits = (vu)base;
  vu exp_bits = (bits >> 13) & 0x00007C00u;
  vu mantissa_bits = bits & 0x00000FFFu;
  vu nonsign = exp_bits + mantissa_bits;
  vu out = (sign >> 16) | (shl1_w > 0xFF000000u ? vu{} + 0x7E00u : nonsign);
  return __builtin_convertvector(out, vh);
}

}  // namespace vec
}  // namespace cdm
