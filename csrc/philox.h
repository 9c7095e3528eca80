// Philox4x32-10 counter-based RNG, bit-identical to Triton's tl.rand / tl.randint.
//
// Host/device agnostic (plain integer arithmetic), so CPU and CUDA kernels draw the
// same numbers. For position p of a call with (seed, offset):
//   key     k0 = low 32 bits of seed, k1 = high 32 bits (seed as uint64, as Triton)
//   counter c0 = low 32 bits of (offset + p), c1 = high 32 bits of (offset + p), c2 = c3 = 0
//   10 rounds; the first output word becomes a float in [0, 1) as
//   triton.language.random.uint_to_uniform_float does.
// This equals Triton's `tl.rand(seed, offset + p)` whenever offset + p < 2^32 (Triton's
// int32 offsets, c1 = 0) and also for int64 offsets >= 2^32 (Triton puts the high word
// in c1 exactly as here). Offsets must be non-negative (a negative int32 offset in
// Triton would have c1 = 0 rather than the sign extension).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CDM_PHILOX_HD __host__ __device__ __forceinline__
#else
#define CDM_PHILOX_HD inline
#endif

namespace cdm {

struct Philox4x32 {
  uint32_t c[4];
};

CDM_PHILOX_HD uint32_t philox_umulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
}

// Philox4x32 with `rounds` rounds on counter (c0..c3) and key (k0, k1); Triton's philox_impl.
CDM_PHILOX_HD Philox4x32 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                                    int rounds = 10) {
  const uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  const uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  for (int i = 0; i < rounds; ++i) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = philox_umulhi(kRoundB, p2) ^ c1 ^ k0;
    c2 = philox_umulhi(kRoundA, p0) ^ c3 ^ k1;
    c1 = kRoundB * p2;
    c3 = kRoundA * p0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  Philox4x32 out;
  out.c[0] = c0;
  out.c[1] = c1;
  out.c[2] = c2;
  out.c[3] = c3;
  return out;
}

// tl.randint(seed, counter): the first word of Philox4x32-10
CDM_PHILOX_HD uint32_t philox_randint(int64_t seed, uint64_t counter) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return philox4x32(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                    static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32))
      .c[0];
}

// triton uint_to_uniform_float for uint32: x as int32, x < 0 -> ~x, times 4.6566127342e-10f
// (float32 arithmetic: the int converts to float with round-to-nearest, then one multiply)
CDM_PHILOX_HD float philox_uint_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// tl.rand(seed, offset + position)
CDM_PHILOX_HD float philox_uniform(int64_t seed, int64_t offset, int64_t position) {
  const uint64_t counter = static_cast<uint64_t>(offset) + static_cast<uint64_t>(position);
  return philox_uint_to_uniform(philox_randint(seed, counter));
}

}  // namespace cdm
