// Shared plumbing of the CPU kernels: argument checks, ISA dispatch, row I/O with
// dtype conversion, vector traits, scratch rows and the dense (eigenbasis) helpers.
//
// How a kernel is laid out (every op file follows it):
//   * `struct XxxKernel { struct Args {...}; template <class T> static CDM_INLINE void rows(const Args&, b, e); }`
//     processes positions [b, e) from raw pointers; T is the compute type (float for
//     float32/bfloat16/float16 inputs, double for float64 inputs).
//   * `run_rows<XxxKernel, T>(args, P)` parallelises over positions (at::parallel_for) and
//     calls the variant of `rows` compiled for the active ISA: `rows` is always_inline, so
//     it is compiled three times, inside wrappers carrying target("avx2,fma") and
//     target("avx512f,...") attributes (see `IsaVariants`), and the 16-lane vector types
//     of vec_math.h become AVX2 / AVX-512 code there. The default variant is portable x86-64.
//   * The ISA is chosen once, at the first call, from CDM_KERNELS_CPU_ISA
//     (auto | default | avx2 | avx512; default auto = the best the CPU supports), and
//     can be changed at run time through torch.ops.cdm_kernels._cpu_isa (isa.cpp).
//   * Rows are first copied (converted to T) into a padded, thread-local scratch row, so
//     every later pass works on whole 16-lane vectors in L2.
#pragma once

// No multiply-add contraction in the kernel files: the ISA variants must agree bit for
// bit (an FMA rounds once, a multiply then an add twice).
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>

#include "graph.h"
#include "cpu/vec_math.h"

#define CDM_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define CDM_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))

namespace cdm {
namespace cpu {

using vec::W;

// ----------------------------------------------------------------------------- ISA selection (isa.cpp)

enum class Isa : int { Default = 0, Avx2 = 1, Avx512 = 2 };

Isa active_isa();            // resolved at the first call (CDM_KERNELS_CPU_ISA)
bool isa_supported(Isa isa);  // can this CPU run the variant?
const char* isa_name(Isa isa);
void set_isa(Isa isa);  // errors when unsupported

template <class K, class T>
struct IsaVariants {
  using Args = typename K::Args;
  static void run_default(const Args& a, int64_t b, int64_t e) { K::template rows<T>(a, b, e); }
  CDM_TARGET_AVX2 static void run_avx2(const Args& a, int64_t b, int64_t e) { K::template rows<T>(a, b, e); }
  CDM_TARGET_AVX512 static void run_avx512(const Args& a, int64_t b, int64_t e) { K::template rows<T>(a, b, e); }
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

// ----------------------------------------------------------------------------- vector traits

template <class T>
struct VT;

template <>
struct VT<float> {
  using V = vec::vf;
  using M = vec::vi;
  static CDM_INLINE V load(const float* p) { return vec::loadu<V>(p); }
  static CDM_INLINE void store(float* p, V v) { vec::storeu(p, v); }
  static CDM_INLINE V splat(float a) { return vec::splat(a); }
  static CDM_INLINE V exp(V v) { return vec::exp_ps(v); }
  static CDM_INLINE V log(V v) { return vec::log_ps(v); }
  static CDM_INLINE vec::vd wide(V v) { return vec::to_double(v); }
  static CDM_INLINE M below(int64_t c) { return vec::iota_i() < static_cast<int32_t>(c); }
  static CDM_INLINE M lane(int64_t k) { return vec::iota_i() == static_cast<int32_t>(k); }
  static CDM_INLINE float hmax(V v) { return vec::hmax(v); }
};

template <>
struct VT<double> {
  using V = vec::vd;
  using M = vec::vl;
  static CDM_INLINE V load(const double* p) { return vec::loadu<V>(p); }
  static CDM_INLINE void store(double* p, V v) { vec::storeu(p, v); }
  static CDM_INLINE V splat(double a) { return vec::splat(a); }
  static CDM_INLINE V exp(V v) { return vec::exp_pd(v); }
  static CDM_INLINE V log(V v) { return vec::log_pd(v); }
  static CDM_INLINE vec::vd wide(V v) { return v; }
  static CDM_INLINE M below(int64_t c) { return vec::iota_l() < c; }
  static CDM_INLINE M lane(int64_t k) { return vec::iota_l() == k; }
  static CDM_INLINE double hmax(V v) { return vec::hmax(v); }
};

template <class T>
constexpr T kInf = std::numeric_limits<T>::infinity();

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

// ----------------------------------------------------------------------------- row I/O

// Copy row `row` of a (P, n) tensor of dtype `dt` into dst (as T), padding dst to a whole
// number of vectors with `pad`.
template <class T>
CDM_INLINE void load_row(const void* base, DT dt, int64_t row, int64_t n, T* dst, T pad) {
  using V = typename VT<T>::V;
  const int64_t full = n / W * W;
  switch (dt) {
    case DT::F32: {
      const float* src = static_cast<const float*>(base) + row * n;
      for (int64_t i = 0; i < full; i += W) {
        vec::vf v = vec::loadu<vec::vf>(src + i);
        if constexpr (std::is_same<T, float>::value) {
          VT<T>::store(dst + i, v);
        } else {
          VT<T>::store(dst + i, vec::to_double(v));
        }
      }
      for (int64_t i = full; i < n; ++i) dst[i] = static_cast<T>(src[i]);
      break;
    }
    case DT::F64: {
      const double* src = static_cast<const double*>(base) + row * n;
      for (int64_t i = 0; i < full; i += W) {
        vec::vd v = vec::loadu<vec::vd>(src + i);
        if constexpr (std::is_same<T, double>::value) {
          VT<T>::store(dst + i, v);
        } else {
          VT<T>::store(dst + i, vec::to_float(v));
        }
      }
      for (int64_t i = full; i < n; ++i) dst[i] = static_cast<T>(src[i]);
      break;
    }
    case DT::BF16:
    case DT::F16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + row * n;
      const bool bf = dt == DT::BF16;
      for (int64_t i = 0; i < n; i += W) {
        vec::vh h{};
        const int64_t c = std::min<int64_t>(W, n - i);
        if (c == W) {
          h = vec::loadu<vec::vh>(src + i);
        } else {
          for (int64_t j = 0; j < c; ++j) h[j] = src[i + j];
        }
        vec::vf v = bf ? vec::bf16_to_float(h) : vec::half_to_float(h);
        if constexpr (std::is_same<T, float>::value) {
          VT<T>::store(dst + i, v);
        } else {
          VT<T>::store(dst + i, vec::to_double(v));
        }
      }
      break;
    }
  }
  for (int64_t i = n; i < round_up(n); ++i) dst[i] = pad;
  (void)sizeof(V);
}

// Write n elements of src (T) into row `row` of a (P, n) tensor of dtype `dt`.
template <class T>
CDM_INLINE void store_row(void* base, DT dt, int64_t row, int64_t n, const T* src) {
  const int64_t full = n / W * W;
  switch (dt) {
    case DT::F32: {
      float* dst = static_cast<float*>(base) + row * n;
      for (int64_t i = 0; i < full; i += W) {
        if constexpr (std::is_same<T, float>::value) {
          vec::storeu(dst + i, vec::loadu<vec::vf>(src + i));
        } else {
          vec::storeu(dst + i, vec::to_float(vec::loadu<vec::vd>(src + i)));
        }
      }
      for (int64_t i = full; i < n; ++i) dst[i] = static_cast<float>(src[i]);
      break;
    }
    case DT::F64: {
      double* dst = static_cast<double*>(base) + row * n;
      for (int64_t i = 0; i < full; i += W) {
        if constexpr (std::is_same<T, double>::value) {
          vec::storeu(dst + i, vec::loadu<vec::vd>(src + i));
        } else {
          vec::storeu(dst + i, vec::to_double(vec::loadu<vec::vf>(src + i)));
        }
      }
      for (int64_t i = full; i < n; ++i) dst[i] = static_cast<double>(src[i]);
      break;
    }
    case DT::BF16:
    case DT::F16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + row * n;
      const bool bf = dt == DT::BF16;
      for (int64_t i = 0; i < n; i += W) {
        vec::vf v;
        if constexpr (std::is_same<T, float>::value) {
          v = vec::loadu<vec::vf>(src + i);  // src is padded to whole vectors
        } else {
          v = vec::to_float(vec::loadu<vec::vd>(src + i));
        }
        vec::vh h = bf ? vec::float_to_bf16(v) : vec::float_to_half(v);
        const int64_t c = std::min<int64_t>(W, n - i);
        if (c == W) {
          vec::storeu(dst + i, h);
        } else {
          for (int64_t j = 0; j < c; ++j) dst[i + j] = h[j];
        }
      }
      break;
    }
  }
}

// ----------------------------------------------------------------------------- checks

inline void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "cdm_kernels (CPU): ", what, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2, "cdm_kernels: ", what, " must be (P, N), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "cdm_kernels: ", what, " must be contiguous");
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, "cdm_kernels: ", what,
              " must be float32, float64, bfloat16 or float16, got ", s);
  TORCH_CHECK(t.size(1) >= 2, "cdm_kernels: ", what, " needs at least 2 states, got ", t.size(1));
}

inline void check_positions(const at::Tensor& t, const char* what, int64_t positions, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "cdm_kernels (CPU): ", what, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == positions, "cdm_kernels: ", what, " must be (", positions, ",), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "cdm_kernels: ", what, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "cdm_kernels: ", what, " must be contiguous");
}

inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.sizes() == b.sizes(), "cdm_kernels: ", what, " must have shape ", b.sizes(), ", got ", a.sizes());
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
void dense_log_posterior(const Dense& g, const void* log_score, DT dt, const int64_t* x, const double* tau, int64_t p0,
                         int64_t rows, double* R, double* Uraw, double* L, double* work, double* M);

// Runs f(begin, end) over row blocks of `positions` in parallel (one block per task).
template <class F>
void dense_blocks(int64_t positions, int64_t block, F&& f) {
  const int64_t blocks = (positions + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b * block, std::min(positions, (b + 1) * block));
  });
}

}  // namespace cpu
}  // namespace cdm
