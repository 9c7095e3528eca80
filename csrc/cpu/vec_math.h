// Width-generic fast float exp/log and 16-bit float conversions on GCC/Clang vector
// extensions, free of ISA intrinsics.
//
// Every function is a template over the vector types and `always_inline`: a kernel body
// using them is compiled once per ISA by inlining it into a wrapper carrying
// `__attribute__((target(...)))` (cpu_common.h), with the native vector width of that
// ISA (4 floats SSE2, 8 AVX2, 16 AVX-512), so GCC emits plain register code.
//
// exp_ps / log_ps are Cephes-style polynomial approximations (the classic `expf`/`logf`
// of Cephes, as in sse_mathfun): about 1-2 ulp over the whole float range, including
// subnormal results (exp) and subnormal inputs (log); exp(-inf) = 0, exp(+inf) = inf,
// log(0) = -inf, log(x < 0) = NaN, log(inf) = inf, NaN in -> NaN out.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// vectors crossing (inlined) function boundaries under the default ISA
#pragma GCC diagnostic ignored "-Wpsabi"

#define CDM_INLINE inline __attribute__((always_inline))
#define CDM_UNLIKELY(x) __builtin_expect(!!(x), 0)

namespace cdm {
namespace vec {

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

// ----------------------------------------------------------------------------- tree reductions
// (fixed shapes: 2, 4, 8, 16 float lanes; 2, 4, 8 double lanes)

typedef float f2 __attribute__((vector_size(8)));
typedef float f4 __attribute__((vector_size(16)));
typedef float f8 __attribute__((vector_size(32)));
typedef float f16 __attribute__((vector_size(64)));
typedef double d2 __attribute__((vector_size(16)));
typedef double d4 __attribute__((vector_size(32)));
typedef double d8 __attribute__((vector_size(64)));

template <class V>
CDM_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

CDM_INLINE float hmax(f2 v) { return v[0] > v[1] ? v[0] : v[1]; }
CDM_INLINE float hmax(f4 v) { return hmax(vmax(__builtin_shufflevector(v, v, 0, 1), __builtin_shufflevector(v, v, 2, 3))); }
CDM_INLINE float hmax(f8 v) {
  return hmax(vmax(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7)));
}
CDM_INLINE float hmax(f16 v) {
  return hmax(vmax(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)));
}
CDM_INLINE double hmax(d2 v) { return v[0] > v[1] ? v[0] : v[1]; }
CDM_INLINE double hmax(d4 v) { return hmax(vmax(__builtin_shufflevector(v, v, 0, 1), __builtin_shufflevector(v, v, 2, 3))); }
CDM_INLINE double hmax(d8 v) {
  return hmax(vmax(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7)));
}
CDM_INLINE double hsum(d2 v) { return v[0] + v[1]; }
CDM_INLINE double hsum(d4 v) { return hsum(__builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3)); }
CDM_INLINE double hsum(d8 v) {
  return hsum(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
}

CDM_INLINE float hsum(f2 v) { return v[0] + v[1]; }
CDM_INLINE float hsum(f4 v) { return hsum(__builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3)); }
CDM_INLINE float hsum(f8 v) {
  return hsum(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
}
CDM_INLINE float hsum(f16 v) {
  return hsum(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}

// float lanes -> two double vectors (low and high halves)
CDM_INLINE void widen(f4 v, d2& lo, d2& hi) {
  lo = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1), d2);
  hi = __builtin_convertvector(__builtin_shufflevector(v, v, 2, 3), d2);
}
CDM_INLINE void widen(f8 v, d4& lo, d4& hi) {
  lo = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), d4);
  hi = __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), d4);
}
CDM_INLINE void widen(f16 v, d8& lo, d8& hi) {
  lo = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), d8);
  hi = __builtin_convertvector(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15), d8);
}

// e^x: x = k ln2 + r, |r| <= ln2/2; e^r by a degree-6 polynomial; 2^k applied in two
// halves so that subnormal results are rounded once (and k = 128 overflows to inf).
// VF: a float vector, VI: the int32 vector of the same width.
template <class VF, class VI>
CDM_INLINE VF exp_ps(VF x) {
  const VF zero{};
  VF xc = x < -104.0f ? zero - 104.0f : x;
  xc = xc > 89.0f ? zero + 89.0f : xc;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const VF t = xc * 1.44269504088896341f + shifter;
  const VF kf = t - shifter;
  const VI k = (VI)t - (VI)(zero + shifter);
  VF r = xc - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  VF p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  VF y = p * (r * r) + r + 1.0f;
  const VI k1 = k >> 1;
  const VI k2 = k - k1;
  y = y * (VF)((k1 + 127) << 23) * (VF)((k2 + 127) << 23);
  return x != x ? x : y;
}

// log of a normal float from its bits (e: the unbiased exponent + 1): x = m 2^e, m in
// [sqrt(1/2), sqrt(2)); log m = f - f^2/2 + f^3 P(f), f = m - 1. Finite inputs only.
template <class VF, class VI>
CDM_INLINE VF log_from_bits(VI bits, VI e) {
  const VF zero{};
  const VF m = (VF)((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const VI small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  const VF f = (small ? m + m : m) - 1.0f;
  const VF z = f * f;
  VF p = zero + 7.0376836292e-2f;
  p = p * f + -1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f + -1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f + -1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f + -2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const VF ef = __builtin_convertvector(e, VF);
  VF y = p * f * z;
  y = y + ef * -2.12194440e-4f;
  y = y - z * 0.5f;
  const VF res = f + y;
  return res + ef * 0.693359375f;
}

// log x for every float x (subnormals scaled into the normal range first).
template <class VF, class VI>
CDM_INLINE VF log_ps(VF x) {
  const VF zero{};
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const VI subnormal = x < 1.17549435e-38f;
  const VF xs = subnormal ? x * 8388608.0f : x;  // 2^23
  const VI bits = (VI)xs;
  VI e = ((bits >> 23) & 0xff) - 126;
  e = subnormal ? e - 23 : e;
  VF res = log_from_bits<VF, VI>(bits, e);
  res = x == 0.0f ? zero - inf : res;
  res = x == inf ? zero + inf : res;
  res = x < 0.0f ? zero + nan : res;
  return x != x ? x : res;
}

// log x for x >= the smallest normal float, +inf or NaN (no zero, negative or subnormal
// input: e.g. the clamped inversion u >= floor >= FLT_MIN); a few operations cheaper.
template <class VF, class VI>
CDM_INLINE VF log_normal_ps(VF x) {
  const VI bits = (VI)x;
  const VF res = log_from_bits<VF, VI>(bits, ((bits >> 23) & 0xff) - 126);
  return x < std::numeric_limits<float>::infinity() ? res : x;  // +inf -> inf, NaN -> NaN
}

// lane-wise libm (the float64 path serves gradcheck and dense graphs, not speed)
template <class VD, int L>
CDM_INLINE VD exp_pd(VD x) {
  VD y;
  for (int i = 0; i < L; ++i) y[i] = std::exp(x[i]);
  return y;
}
template <class VD, int L>
CDM_INLINE VD log_pd(VD x) {
  VD y;
  for (int i = 0; i < L; ++i) y[i] = std::log(x[i]);
  return y;
}

// ----------------------------------------------------------------------------- 16-bit floats
// VH: uint16 vector of L lanes, VU: uint32 vector of L lanes, VF: float vector of L lanes.

// bfloat16 <-> float (round to nearest even, NaN kept quiet): as c10::BFloat16
template <class VF, class VU, class VH>
CDM_INLINE VF bf16_to_float(VH h) {
  return (VF)(__builtin_convertvector(h, VU) << 16);
}
template <class VF, class VU, class VH>
CDM_INLINE VH float_to_bf16(VF f) {
  const VU u = (VU)f;
  const VU rounded = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
  const VU out = (f != f) ? (VU{} + 0x7fc0u) : rounded;
  return __builtin_convertvector(out, VH);
}

// IEEE half <-> float, branch-free (the FP16 library's algorithm, as c10::Half)
template <class VF, class VU, class VH>
CDM_INLINE VF half_to_float(VH h) {
  const VU w = __builtin_convertvector(h, VU) << 16;
  const VU sign = w & 0x80000000u;
  const VU two_w = w + w;
  const VF normalized = (VF)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const VF denormalized = (VF)((two_w >> 17) | (126u << 23)) - 0.5f;
  const VU result = sign | (two_w < (1u << 27) ? (VU)denormalized : (VU)normalized);
  return (VF)result;
}
template <class VF, class VU, class VH>
CDM_INLINE VH float_to_half(VF f) {
  const VF absf = (VF)((VU)f & 0x7fffffffu);
  VF base = (absf * 0x1.0p+112f) * 0x1.0p-110f;
  const VU w = (VU)f;
  const VU shl1_w = w + w;
  const VU sign = w & 0x80000000u;
  VU bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? (VU{} + 0x71000000u) : bias;
  base = (VF)((bias >> 1) + 0x07800000u) + base;
  const VU bits = (VU)base;
  const VU exp_bits = (bits >> 13) & 0x00007C00u;
  const VU mantissa_bits = bits & 0x00000FFFu;
  const VU nonsign = exp_bits + mantissa_bits;
  const VU out = (sign >> 16) | (shl1_w > 0xFF000000u ? (VU{} + 0x7E00u) : nonsign);
  return __builtin_convertvector(out, VH);
}

}  // namespace vec
}  // namespace cdm
