// Shared plumbing of the CPU kernels: argument checks, ISA dispatch, row I/O with
// dtype conversion, vector traits, scratch rows and the dense (eigenbasis) helpers.
//
// How a kernel is laid out (every op file follows it):
//   * `struct XxxKernel { using Args = ...; template <class VV> static CDM_INLINE void rows(const Args&, b, e); }`
//     processes positions [b, e) from raw pointers. VV = VT<T, bytes> is the vector
//     traits class: T the compute type (float for float32/bfloat16/float16 inputs,
//     double for float64 inputs), `bytes` the native vector width of the ISA.
//   * `run_rows<XxxKernel, T>(args, P)` parallelises over positions (at::parallel_for) and
//     calls the variant of `rows` compiled for the active ISA: `rows` is always_inline, so
//     it is compiled three times, inside wrappers carrying target("avx2,fma") and
//     target("avx512f,...") attributes (`IsaVariants`), with 16-, 32- and 64-byte vectors.
//     The default variant is portable x86-64 (SSE2).
//   * The ISA is chosen once, at the first call, from CDM_KERNELS_CPU_ISA
//     (auto | default | avx2 | avx512; default auto = the best the CPU supports), and
//     can be changed at run time through torch.ops.cdm_kernels._cpu_isa (isa.cpp).
//     The variants compute the same values up to the order of float64 partial sums and
//     multiply-add contraction (a few ulp).
//   * Rows are first copied (converted to T) into a padded thread-local scratch row (a
//     multiple of 16 elements), so every later pass works on whole vectors in L2.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <vector>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "graph.h"
#include "row_checks.h"
#include "value_checks.h"
#include "cpu/vec_math.h"

#define CDM_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define CDM_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))

namespace cdm {
namespace cpu {

constexpr int64_t W = 16;  // rows are padded to a multiple of W elements (the widest vector)

// ----------------------------------------------------------------------------- ISA selection (isa.cpp)

enum class Isa : int { Default = 0, Avx2 = 1, Avx512 = 2 };

Isa active_isa();            // resolved at the first call (CDM_KERNELS_CPU_ISA)
bool isa_supported(Isa isa);  // can this CPU run the variant?
const char* isa_name(Isa isa);
void set_isa(Isa isa);  // errors when unsupported

// ----------------------------------------------------------------------------- vector traits

// VT<T, B>: B-byte vectors of T (B = 16 SSE2, 32 AVX2, 64 AVX-512).
//   V vector of L = B / sizeof(T) lanes, M the integer vector comparisons give,
//   Acc a float64 accumulator of L lanes, exp/log, masks and loads.
template <class T, int B>
struct VT;

// float sums: 16 vector adds in float lanes, then the block is widened into float64
// lanes (cheap per element, and a float64 total for long rows)
#define CDM_VT_FLOAT(B_, FV, DV)                                                         \
  template <>                                                                            \
  struct VT<float, B_> {                                                                 \
    using T = float;                                                                     \
    static constexpr int L = B_ / 4;                                                     \
    typedef vec::FV V;                                                                   \
    typedef int32_t M __attribute__((vector_size(B_)));                                  \
    typedef uint32_t U __attribute__((vector_size(B_)));                                 \
    typedef uint16_t H __attribute__((vector_size(B_ / 2)));                             \
    typedef vec::DV D;                                                                   \
    struct Acc {                                                                         \
      V f{};                                                                             \
      D lo{}, hi{};                                                                      \
      int k = 0;                                                                         \
      CDM_INLINE void flush() {                                                          \
        D a, b;                                                                          \
        vec::widen(f, a, b);                                                             \
        lo += a;                                                                         \
        hi += b;                                                                         \
        f = V{};                                                                         \
        k = 0;                                                                           \
      }                                                                                  \
      CDM_INLINE void add(V v) {                                                         \
        f += v;                                                                          \
        if (++k == 16) flush();                                                          \
      }                                                                                  \
      CDM_INLINE double sum() {                                                          \
        flush();                                                                         \
        return vec::hsum(lo + hi);                                                       \
      }                                                                                  \
    };                                                                                   \
    static CDM_INLINE V load(const float* p) { return vec::loadu<V>(p); }                \
    static CDM_INLINE void store(float* p, V v) { vec::storeu(p, v); }                   \
    static CDM_INLINE V splat(float a) { return V{} + a; }                               \
    static CDM_INLINE V exp(V v) { return vec::exp_ps<V, M>(v); }                        \
    static CDM_INLINE V log(V v) { return vec::log_ps<V, M>(v); }                        \
    static CDM_INLINE V log_normal(V v) { return vec::log_normal_ps<V, M>(v); }          \
    static CDM_INLINE M iota() {                                                         \
      M m;                                                                               \
      for (int i = 0; i < L; ++i) m[i] = i;                                              \
      return m;                                                                          \
    }                                                                                    \
    static CDM_INLINE M below(int64_t c) { return iota() < static_cast<int32_t>(c); }    \
    static CDM_INLINE M lane(int64_t k) { return iota() == static_cast<int32_t>(k); }    \
    static CDM_INLINE float hmax(V v) { return vec::hmax(v); }                           \
    static CDM_INLINE V load_bf16(const uint16_t* p) {                                   \
      return vec::bf16_to_float<V, U, H>(vec::loadu<H>(p));                              \
    }                                                                                    \
    static CDM_INLINE V load_half(const uint16_t* p) {                                   \
      return vec::half_to_float<V, U, H>(vec::loadu<H>(p));                              \
    }                                                                                    \
    static CDM_INLINE H to_bf16(V v) { return vec::float_to_bf16<V, U, H>(v); }          \
    static CDM_INLINE H to_half(V v) { return vec::float_to_half<V, U, H>(v); }          \
  };

CDM_VT_FLOAT(16, f4, d2)
CDM_VT_FLOAT(32, f8, d4)
CDM_VT_FLOAT(64, f16, d8)
#undef CDM_VT_FLOAT

#define CDM_VT_DOUBLE(B_)                                                   \
  template <>                                                               \
  struct VT<double, B_> {                                                   \
    using T = double;                                                       \
    static constexpr int L = B_ / 8;                                        \
    typedef double V __attribute__((vector_size(B_)));                      \
    typedef int64_t M __attribute__((vector_size(B_)));                     \
    struct Acc {                                                            \
      V a{};                                                                \
      CDM_INLINE void add(V v) { a += v; }                                  \
      CDM_INLINE double sum() const { return vec::hsum(a); }                \
    };                                                                      \
    static CDM_INLINE V load(const double* p) { return vec::loadu<V>(p); }  \
    static CDM_INLINE void store(double* p, V v) { vec::storeu(p, v); }     \
    static CDM_INLINE V splat(double a) { return V{} + a; }                 \
    static CDM_INLINE V exp(V v) { return vec::exp_pd<V, L>(v); }           \
    static CDM_INLINE V log(V v) { return vec::log_pd<V, L>(v); }           \
    static CDM_INLINE V log_normal(V v) { return vec::log_pd<V, L>(v); }    \
    static CDM_INLINE M iota() {                                            \
      M m;                                                                  \
      for (int i = 0; i < L; ++i) m[i] = i;                                 \
      return m;                                                             \
    }                                                                       \
    static CDM_INLINE M below(int64_t c) { return iota() < c; }             \
    static CDM_INLINE M lane(int64_t k) { return iota() == k; }             \
    static CDM_INLINE double hmax(V v) { return vec::hmax(v); }             \
  };

CDM_VT_DOUBLE(16)
CDM_VT_DOUBLE(32)
CDM_VT_DOUBLE(64)
#undef CDM_VT_DOUBLE

template <class T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// ----------------------------------------------------------------------------- dispatch

template <class K, class T>
struct IsaVariants {
  using Args = typename K::Args;
  static void run_default(const Args& a, int64_t b, int64_t e) { K::template rows<VT<T, 16>>(a, b, e); }
  CDM_TARGET_AVX2 static void run_avx2(const Args& a, int64_t b, int64_t e) { K::template rows<VT<T, 32>>(a, b, e); }
  CDM_TARGET_AVX512 static void run_avx512(const Args& a, int64_t b, int64_t e) {
    K::template rows<VT<T, 64>>(a, b, e);
  }
  static void run(Isa isa, const Args& a, int64_t b, int64_t e) {
    switch (isa) {
      case Isa::Avx512:
        run_avx512(a, b, e);
        break;
      case Isa::Avx2:
        run_avx2(a, b, e);
        break;
      default:
        run_default(a, b, e);
    }
  }
};

// positions [0, P) in parallel; `grain` positions at least per task
template <class K, class T>
void run_rows(const typename K::Args& args, int64_t positions, int64_t grain = 1) {
  const Isa isa = active_isa();
  at::parallel_for(0, positions, std::max<int64_t>(grain, 1), [&](int64_t b, int64_t e) {
    IsaVariants<K, T>::run(isa, args, b, e);
  });
}

// a grain giving tasks of at least ~16k elements (cheap rows are not worth a thread each)
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// Memoised decay(tau): positions of a batch usually share tau, and exp + expm1 in
// double cost more than a short row.
struct DecayCache {
  double tau = std::numeric_limits<double>::quiet_NaN();
  Decay d{};
  double beta_ = 0.0;  // (1 - alpha) / N of the last call
  const Decay& operator()(double t) {
    if (!(t == tau)) {
      tau = t;
      d = decay(t);
      beta_ = std::numeric_limits<double>::quiet_NaN();
    }
    return d;
  }
  // the uniform beta of the cached tau (computed once per tau)
  double beta(int64_t n) {
    if (beta_ != beta_) beta_ = d.one_minus_alpha / static_cast<double>(n);
    return beta_;
  }
};

// ----------------------------------------------------------------------------- dtypes

enum class DT : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

inline DT dt_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DT::F32;
    case at::kDouble:
      return DT::F64;
    case at::kBFloat16:
      return DT::BF16;
    case at::kHalf:
      return DT::F16;
    default:
      TORCH_CHECK(false, "cdm_kernels: unsupported dtype ", t.scalar_type());
  }
  return DT::F32;
}

inline int64_t round_up(int64_t n) { return (n + W - 1) / W * W; }

// run_rows over rows of n states in the compute type of their dtype: double for float64
// rows, float for the others
template <class K>
void run_rows_of(DT dt, const typename K::Args& args, int64_t positions, int64_t n) {
  if (dt == DT::F64) {
    run_rows<K, double>(args, positions, row_grain(n));
  } else {
    run_rows<K, float>(args, positions, row_grain(n));
  }
}

// ----------------------------------------------------------------------------- scratch rows

// One thread's scratch: `count` rows of round_up(n) elements of T (64-byte aligned).
template <class T>
struct Scratch {
  T* base = nullptr;
  int64_t stride = 0;
  Scratch(int64_t n, int count) : stride(round_up(n)) {
    const size_t bytes = static_cast<size_t>(stride) * sizeof(T) * count;
    base = static_cast<T*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
    TORCH_CHECK(base != nullptr, "cdm_kernels: out of memory for scratch rows");
  }
  ~Scratch() { std::free(base); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* row(int i) const { return base + static_cast<int64_t>(i) * stride; }
};

// ----------------------------------------------------------------------------- value checks

// The ValueErrorBits (value_checks.h) a call's kernels found in the values they read,
// raised after the pass (raise_value_errors). Kernels get a null pointer when the checks
// are off.
struct ValueErrors {
  std::atomic<int> bits{0};
  void flag(int bit) { bits.fetch_or(bit, std::memory_order_relaxed); }
};

// ValueError with messages[k].second for the first bit found, in the order given
inline void raise_value_errors(const ValueErrors& errors,
                               std::initializer_list<std::pair<int, const char*>> messages) {
  const int bits = errors.bits.load(std::memory_order_relaxed);
  for (const auto& m : messages) TORCH_CHECK_VALUE((bits & m.first) == 0, m.second);
}

// the lanes of v that are NaN or +-inf (allow_minus_inf: NaN or +inf)
template <class VV>
CDM_INLINE typename VV::M not_finite(typename VV::V v, bool allow_minus_inf) {
  return allow_minus_inf ? ((v != v) | (v == kInf<typename VV::T>)) : ((v - v) != typename VV::V{});
}

template <class T>
CDM_INLINE bool finite_value(T v, bool allow_minus_inf) {
  return allow_minus_inf ? (v == v && v != kInf<T>) : (v - v == T(0));
}

template <class VV>
CDM_INLINE bool any_lane(typename VV::M m) {
  bool any = false;
  for (int j = 0; j < VV::L; ++j) any |= m[j] != 0;
  return any;
}

// Whether the n values at s are finite (allow_minus_inf: -inf counts as finite).
template <class VV>
CDM_INLINE bool all_finite(const typename VV::T* s, int64_t n, bool allow_minus_inf) {
  using T = typename VV::T;
  const int64_t full = n / VV::L * VV::L;
  typename VV::M bad{};
  for (int64_t i = 0; i < full; i += VV::L) bad |= not_finite<VV>(VV::load(s + i), allow_minus_inf);
  bool ok = !any_lane<VV>(bad);
  for (int64_t i = full; i < n; ++i) ok &= finite_value<T>(s[i], allow_minus_inf);
  return ok;
}

// dst[0, n) = src[0, n), flagging kRowsNotFinite unless every value is finite
template <class VV>
CDM_INLINE void copy_checked(const typename VV::T* src, int64_t n, typename VV::T* dst, ValueErrors* errors,
                             bool allow_minus_inf) {
  using T = typename VV::T;
  const int64_t full = n / VV::L * VV::L;
  typename VV::M bad{};
  for (int64_t i = 0; i < full; i += VV::L) {
    const typename VV::V v = VV::load(src + i);
    VV::store(dst + i, v);
    bad |= not_finite<VV>(v, allow_minus_inf);
  }
  bool ok = !any_lane<VV>(bad);
  for (int64_t i = full; i < n; ++i) {
    dst[i] = src[i];
    ok &= finite_value<T>(src[i], allow_minus_inf);
  }
  if (!ok) errors->flag(kRowsNotFinite);
}

// The checks of a row of probabilities (the matching loss's target, n values at t):
// finite, non-negative, summing to 1 within kTargetSumTolerance.
template <class VV>
CDM_INLINE void check_probability_row(const typename VV::T* t, int64_t n, ValueErrors* errors) {
  using T = typename VV::T;
  using V = typename VV::V;
  const int64_t full = n / VV::L * VV::L;
  typename VV::M bad{}, negative{};
  typename VV::Acc acc;
  for (int64_t i = 0; i < full; i += VV::L) {
    const V v = VV::load(t + i);
    bad |= not_finite<VV>(v, false);
    negative |= v < T(0);
    acc.add(v);
  }
  bool finite = !any_lane<VV>(bad), nonneg = !any_lane<VV>(negative);
  double sum = acc.sum();
  for (int64_t i = full; i < n; ++i) {
    finite &= finite_value<T>(t[i], false);
    nonneg &= !(t[i] < T(0));
    sum += static_cast<double>(t[i]);
  }
  if (!finite) errors->flag(kSecondNotFinite);
  if (!nonneg) errors->flag(kSecondNegative);
  if (!(std::abs(sum - 1.0) <= kTargetSumTolerance)) errors->flag(kSecondRowSum);
}

// ----------------------------------------------------------------------------- row I/O

inline float scalar_to_float(const void* base, DT dt, int64_t i) {
  switch (dt) {
    case DT::F32:
      return static_cast<const float*>(base)[i];
    case DT::F64:
      return static_cast<float>(static_cast<const double*>(base)[i]);
    case DT::BF16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    default:
      return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
  }
}

template <class T>
inline T scalar_load(const void* base, DT dt, int64_t i) {
  if (dt == DT::F64) return static_cast<T>(static_cast<const double*>(base)[i]);
  return static_cast<T>(scalar_to_float(base, dt, i));
}

template <class T>
inline void scalar_store(void* base, DT dt, int64_t i, T v) {
  switch (dt) {
    case DT::F32:
      static_cast<float*>(base)[i] = static_cast<float>(v);
      break;
    case DT::F64:
      static_cast<double*>(base)[i] = static_cast<double>(v);
      break;
    case DT::BF16:
      static_cast<c10::BFloat16*>(base)[i] = c10::BFloat16(static_cast<float>(v));
      break;
    default:
      static_cast<c10::Half*>(base)[i] = c10::Half(static_cast<float>(v));
  }
}

// Copy row `row` of a (P, n) tensor of dtype `dt` into dst (as VV::T), padding dst to a
// multiple of W elements with `pad`. Vectorised for float32/bfloat16/float16 -> float
// and float64 -> double; other pairs convert element by element. With `errors`, flags
// kRowsNotFinite unless the n values are finite (-inf allowed with allow_minus_inf).
template <class VV>
CDM_INLINE void load_row(const void* base, DT dt, int64_t row, int64_t n, typename VV::T* dst, typename VV::T pad,
                         ValueErrors* errors = nullptr, bool allow_minus_inf = false) {
  using T = typename VV::T;
  constexpr int L = VV::L;
  const bool same = (std::is_same<T, float>::value && dt == DT::F32) || (std::is_same<T, double>::value && dt == DT::F64);
  if (same && errors != nullptr) {  // the copy checks what it moves: no second pass over the row
    copy_checked<VV>(static_cast<const T*>(base) + row * n, n, dst, errors, allow_minus_inf);
    for (int64_t i = n; i < round_up(n); ++i) dst[i] = pad;
    return;
  }
  if (same) {
    std::memcpy(dst, static_cast<const T*>(base) + row * n, n * sizeof(T));
  } else {
    int64_t i = 0;
    if constexpr (std::is_same<T, float>::value) {
      if (dt == DT::BF16 || dt == DT::F16) {
        const uint16_t* src = static_cast<const uint16_t*>(base) + row * n;
        const int64_t full = n / L * L;
        if (dt == DT::BF16) {
          for (; i < full; i += L) VV::store(dst + i, VV::load_bf16(src + i));
        } else {
          for (; i < full; i += L) VV::store(dst + i, VV::load_half(src + i));
        }
      }
    }
    for (; i < n; ++i) dst[i] = scalar_load<T>(base, dt, row * n + i);
  }
  for (int64_t i = n; i < round_up(n); ++i) dst[i] = pad;
  if (errors != nullptr && !all_finite<VV>(dst, n, allow_minus_inf)) errors->flag(kRowsNotFinite);
}

// Write n elements of src (padded to a multiple of W) into row `row` of a (P, n) tensor.
template <class VV>
CDM_INLINE void store_row(void* base, DT dt, int64_t row, int64_t n, const typename VV::T* src) {
  using T = typename VV::T;
  constexpr int L = VV::L;
  if (std::is_same<T, float>::value && dt == DT::F32) {
    std::memcpy(static_cast<float*>(base) + row * n, src, n * sizeof(float));
  } else if (std::is_same<T, double>::value && dt == DT::F64) {
    std::memcpy(static_cast<double*>(base) + row * n, src, n * sizeof(double));
  } else {
    int64_t i = 0;
    if constexpr (std::is_same<T, float>::value) {
      if (dt == DT::BF16 || dt == DT::F16) {
        uint16_t* dst = static_cast<uint16_t*>(base) + row * n;
        const int64_t full = n / L * L;
        if (dt == DT::BF16) {
          for (; i < full; i += L) vec::storeu(dst + i, VV::to_bf16(VV::load(src + i)));
        } else {
          for (; i < full; i += L) vec::storeu(dst + i, VV::to_half(VV::load(src + i)));
        }
      }
    }
    for (; i < n; ++i) scalar_store<T>(base, dt, row * n + i, src[i]);
  }
}

// the traits the (non-ISA) dense code uses for row I/O
using DenseVT = VT<double, 16>;

// ----------------------------------------------------------------------------- outputs

// at::empty, and with CDM_KERNELS_THP=1 (read once) a request for transparent huge pages
// on a large output before anything touches it. First-touch faults on 4 KiB pages cost
// about 1.6 ns per float32 element here, as much as a whole fused kernel; on huge pages
// about 0.4 ns, but only once the kernel has free 2 MiB blocks: in a process that also
// frees much 4 KiB-page memory (eager PyTorch around the kernels) the first huge-page
// faults after each such free cost 5x more than 4 KiB ones (measured). Hence opt-in.
// Linux only; a no-op elsewhere.
inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("CDM_KERNELS_THP");
    return env != nullptr && env[0] == '1';
  }();
  return enabled;
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!huge_pages_enabled()) return out;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + out.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last >= first + 2 * kHuge) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return out;
}

inline at::Tensor empty_output_like(const at::Tensor& t) { return empty_output(t.sizes(), t.options()); }

// ----------------------------------------------------------------------------- checks

inline void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "cdm_kernels (CPU): ", what, " must be a CPU tensor");
  check_row_layout(t, what);
}

inline void check_positions(const at::Tensor& t, const char* what, int64_t positions, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "cdm_kernels (CPU): ", what, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == positions, "cdm_kernels: ", what, " must be (", positions, ",), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "cdm_kernels: ", what, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "cdm_kernels: ", what, " must be contiguous");
}

// tokens index rows in place: one out-of-range x would write outside a scratch row
inline void check_token_range(const at::Tensor& x, int64_t n) {
  const int64_t* p = x.data_ptr<int64_t>();
  bool ok = true;
  for (int64_t i = 0; i < x.numel(); ++i) ok &= (p[i] >= 0) & (p[i] < n);
  TORCH_CHECK(ok, "cdm_kernels: x must hold states in [0, ", n, ")");
}

// (P, N) rows `what` with their tokens x (P,) int64 in [0, N) and noise levels `tau_what` (P,) float64
inline void check_row_inputs(const at::Tensor& rows, const char* what, const at::Tensor& x, const at::Tensor& tau,
                             const char* tau_what = "tau") {
  check_rows(rows, what);
  const int64_t positions = rows.size(0);
  check_positions(x, "x", positions, at::kLong);
  check_token_range(x, rows.size(1));
  check_positions(tau, tau_what, positions, at::kDouble);
}

// ----------------------------------------------------------------------------- kernel arguments

// What a row kernel reads and writes: (P, n) input rows (log-scores, or log p_0|t) of
// dtype dt with a token x and a noise level tau per position, (P, n) output rows in the
// same dtype, and a second (P, n) input where the op has one (a backward's grad, the
// matching loss's target).
struct RowArgs {
  int64_t family, n;
  const void* rows;
  DT dt;
  const int64_t* x;
  const double* tau;
  void* out;
  const void* second;
  DT second_dt;
  ValueErrors* errors = nullptr;  // the value checks of the call (null: off)
};

inline RowArgs row_args(int64_t family, const at::Tensor& rows, const at::Tensor& x, const at::Tensor& tau,
                        void* out, const at::Tensor* second = nullptr) {
  const DT dt = dt_of(rows);
  return {family,
          rows.size(1),
          rows.data_ptr(),
          dt,
          x.data_ptr<int64_t>(),
          tau.data_ptr<double>(),
          out,
          second != nullptr ? second->data_ptr() : nullptr,
          second != nullptr ? dt_of(*second) : dt};
}

// ----------------------------------------------------------------------------- dense graphs (dense.cpp)

// The float64 eigen-decomposition Q = V diag(lambda) V^-1 handed over for family 2.
struct Dense {
  int64_t n = 0;
  at::Tensor evals, vecs, vecs_inv;  // (n,), (n, n), (n, n) float64 contiguous
  const double* lam = nullptr;
  const double* v = nullptr;
  const double* vinv = nullptr;
};

// Validates the graph descriptor; returns the dense decomposition for family 2.
Dense check_graph(int64_t family, const c10::optional<at::Tensor>& evals, const c10::optional<at::Tensor>& vecs,
                  const c10::optional<at::Tensor>& vecs_inv, int64_t num_states);

// Row blocks of dense work: `rows` x n float64 buffers, sized so that a block of every
// buffer stays near L2. The GEMMs run through at::mm (MKL), one thread per block.
int64_t dense_block_rows(int64_t n);

// out[c, a] = K(tau_c)[a, x_c] (clamped at 0: rounding leaves -1e-17 for a true zero), c < rows.
void dense_column(const Dense& g, const int64_t* x, const double* tau, int64_t rows, double* out, double* work);

// out = K(sign * tau_c)^T in_c (transpose) or K(sign * tau_c) in_c, row by row; in and out
// may not alias; `work` is another rows x n buffer.
void dense_apply(const Dense& g, const double* in, const double* tau, double sign, int64_t rows, bool transpose,
                 double* out, double* work);

// Q[y, x] for every y (the forward rate column), rebuilt from the eigen-decomposition;
// entries below 1e-12 max|Q| are set to 0 (rounding would otherwise create tiny rates).
at::Tensor dense_rate_matrix(const Dense& g);

// log p_0|t for a block of rows of a dense graph (scores_to_posterior in float64):
//   R[c] = exp(log_score' - M_c) (log_score' = log_score with 0 at x), Uraw[c] = K(-tau)^T R[c]
//   (before the clamp), L[c] = log q (normalised; -inf at structural zeros), M[c] the row max.
// Rows p0 .. p0+rows of log_score (dtype dt); every buffer holds rows x n doubles (+ W slack).
// `errors` (null: unchecked): kRowsNotFinite for a row with NaN or +-inf.
void dense_log_posterior(const Dense& g, const void* log_score, DT dt, const int64_t* x, const double* tau, int64_t p0,
                         int64_t rows, double* R, double* Uraw, double* L, double* work, double* M,
                         ValueErrors* errors);

// A block of positions p0 .. p0+rows of a dense-graph posterior: dense_log_posterior's
// R, Uraw, L and M for a.rows, `second` the block's rows of a.second (0 padding; unset
// without one), `work` a free buffer (rows x n each).
struct DensePosterior {
  int64_t p0, rows;
  double *R, *Uraw, *L, *work, *second;
  const double* M;
};

// The backward of the block's posterior from G (the gradient of log q) in blk.second:
// dL/dlog_score (0 at x) into a.out. Overwrites second, L and work.
void dense_posterior_backward(const Dense& g, const RowArgs& a, const DensePosterior& blk);

// Runs f(begin, end) over row blocks of `positions` in parallel (one block per task).
template <class F>
void dense_blocks(int64_t positions, int64_t block, F&& f) {
  const int64_t blocks = (positions + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b * block, std::min(positions, (b + 1) * block));
  });
}

// Runs f(const DensePosterior&) over the row blocks of a's positions, in parallel.
template <class F>
void dense_posterior_blocks(const Dense& g, const RowArgs& a, int64_t positions, F&& f) {
  const int64_t n = a.n;
  dense_blocks(positions, dense_block_rows(n), [&](int64_t b, int64_t e) {
    const int64_t rows = e - b;
    Scratch<double> buf(rows * n + W, 5);
    std::vector<double> mx(rows);
    const DensePosterior blk{b, rows, buf.row(0), buf.row(1), buf.row(2), buf.row(3), buf.row(4), mx.data()};
    dense_log_posterior(g, a.rows, a.dt, a.x + b, a.tau + b, b, rows, blk.R, blk.Uraw, blk.L, blk.work, mx.data(),
                        a.errors);
    if (a.second) {
      for (int64_t c = 0; c < rows; ++c) load_row<DenseVT>(a.second, a.second_dt, b + c, n, blk.second + c * n, 0.0);
    }
    f(blk);
  });
}

// ----------------------------------------------------------------------------- op bodies

// Runs the row kernel Forward, or Backward when `backward`; dense graphs go to
// dense(graph, args, positions, backward).
template <class Forward, class Backward, class Args, class DenseFn>
void run_forward_or_backward(const Dense& g, const Args& args, int64_t positions, bool backward, const DenseFn& dense) {
  if (args.family == DENSE) {
    dense(g, args, positions, backward);
  } else if (backward) {
    run_rows_of<Backward>(args.dt, args, positions, args.n);
  } else {
    run_rows_of<Forward>(args.dt, args, positions, args.n);
  }
}

// An op from (P, N) rows (with tokens x and noise levels tau) to (P, N) rows, and its
// backward (args.second: grad): the entry points `forward` and `backward` registered for
// it. Forward::kRows names the rows in errors. The forward's kernels check the values of
// the rows they read (args.errors; Forward::kRowsNotFinite is the message), the backward
// trusts what its forward checked.
template <class Forward, class Backward, void (*dense_rows)(const Dense&, const RowArgs&, int64_t, bool)>
struct RowOp {
  static at::Tensor run(int64_t family, const c10::optional<at::Tensor>& evals, const c10::optional<at::Tensor>& vecs,
                        const c10::optional<at::Tensor>& vecs_inv, const at::Tensor* grad, const at::Tensor& rows,
                        const at::Tensor& x, const at::Tensor& tau) {
    check_row_inputs(rows, Forward::kRows, x, tau);
    if (grad) {
      check_rows(*grad, "grad");
      check_same_shape(*grad, rows, "grad");
    }
    const int64_t positions = rows.size(0);
    const Dense g = check_graph(family, evals, vecs, vecs_inv, rows.size(1));
    at::Tensor out = empty_output_like(rows);
    if (positions == 0) return out;
    ValueErrors errors;
    RowArgs args = row_args(family, rows, x, tau, out.data_ptr(), grad);
    args.errors = grad == nullptr && value_checks_on() ? &errors : nullptr;
    run_forward_or_backward<Forward, Backward>(g, args, positions, grad != nullptr, dense_rows);
    raise_value_errors(errors, {{kRowsNotFinite, Forward::kRowsNotFinite}});
    return out;
  }
  static at::Tensor forward(int64_t family, const c10::optional<at::Tensor>& evals,
                            const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                            const at::Tensor& rows, const at::Tensor& x, const at::Tensor& tau) {
    return run(family, evals, vecs, vecs_inv, nullptr, rows, x, tau);
  }
  static at::Tensor backward(int64_t family, const c10::optional<at::Tensor>& evals,
                             const c10::optional<at::Tensor>& vecs, const c10::optional<at::Tensor>& vecs_inv,
                             const at::Tensor& grad, const at::Tensor& rows, const at::Tensor& x,
                             const at::Tensor& tau) {
    return run(family, evals, vecs, vecs_inv, &grad, rows, x, tau);
  }
};

}  // namespace cpu
}  // namespace cdm
