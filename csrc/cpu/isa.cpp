// Run-time choice of the CPU code path, and three internal ops for tests/benchmarks.
//
// CDM_KERNELS_CPU_ISA (read at the first kernel call):
//   auto (default)  the best variant this CPU supports: avx512 > avx2 > default
//   default         portable x86-64 (SSE2) code
//   avx2            AVX2 + FMA
//   avx512          AVX-512 F/DQ/BW/VL
// Asking for a variant the CPU lacks is an error at the first call.
//
// Internal ops (not part of the public API; underscore names):
//   cdm_kernels::_cpu_isa(str isa="") -> str       set the variant ("" keeps it); returns the active one
//   cdm_kernels::_cpu_vec_math(Tensor x, int fn)    the vectorised exp (fn 0), log (fn 1) and log for
//                                                    inputs >= FLT_MIN (fn 2) on float32
//   cdm_kernels::_philox_uniform(int seed, int offset, int n) -> Tensor   the uniforms fused_euler_step draws
#include "cpu/cpu_common.h"
#include "philox.h"

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>

namespace cdm {
namespace cpu {

namespace {

std::atomic<int> g_isa{-1};

Isa parse_isa(std::string s) {
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (s.empty() || s == "auto") {
    if (isa_supported(Isa::Avx512)) return Isa::Avx512;
    if (isa_supported(Isa::Avx2)) return Isa::Avx2;
    return Isa::Default;
  }
  Isa isa;
  if (s == "default" || s == "generic" || s == "sse2") {
    isa = Isa::Default;
  } else if (s == "avx2") {
    isa = Isa::Avx2;
  } else if (s == "avx512") {
    isa = Isa::Avx512;
  } else {
    TORCH_CHECK(false, "cdm_kernels: CPU ISA must be auto, default, avx2 or avx512, got '", s, "'");
  }
  TORCH_CHECK(isa_supported(isa), "cdm_kernels: this CPU does not support the ", isa_name(isa), " code path");
  return isa;
}

}  // namespace

bool isa_supported(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::Default:
      return true;
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  return false;
#else
  return isa == Isa::Default;
#endif
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "default";
  }
}

Isa active_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("CDM_KERNELS_CPU_ISA");
    v = static_cast<int>(parse_isa(env ? env : ""));
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

void set_isa(Isa isa) {
  TORCH_CHECK(isa_supported(isa), "cdm_kernels: this CPU does not support the ", isa_name(isa), " code path");
  g_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
}

namespace {

struct VecMathKernel {
  struct Args {
    const float* in;
    float* out;
    int64_t n;
    int64_t fn;
  };
  template <class VV>
  static CDM_INLINE void rows(const Args& a, int64_t b, int64_t e) {
    // "rows" of W elements: [b, e) indexes blocks of W
    using V = typename VV::V;
    for (int64_t blk = b; blk < e; ++blk) {
      for (int64_t i = blk * W; i < std::min(a.n, (blk + 1) * W); i += VV::L) {
        const int64_t c = std::min<int64_t>(VV::L, a.n - i);
        V in = VV::splat(1.0f);
        for (int64_t j = 0; j < c; ++j) in[j] = a.in[i + j];
        const V out = a.fn == 0 ? VV::exp(in) : (a.fn == 1 ? VV::log(in) : VV::log_normal(in));
        for (int64_t j = 0; j < c; ++j) a.out[i + j] = out[j];
      }
    }
  }
};

std::string cpu_isa_op(std::string requested) {
  if (!requested.empty()) set_isa(parse_isa(requested));
  return isa_name(active_isa());
}

at::Tensor cpu_vec_math_op(const at::Tensor& x, int64_t fn) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "_cpu_vec_math: x must be a float32 CPU tensor");
  TORCH_CHECK(fn >= 0 && fn <= 2, "_cpu_vec_math: fn must be 0 (exp), 1 (log) or 2 (log of normal numbers)");
  at::Tensor in = x.contiguous();
  at::Tensor out = empty_output_like(in);
  VecMathKernel::Args args{in.data_ptr<float>(), out.data_ptr<float>(), in.numel(), fn};
  run_rows<VecMathKernel, float>(args, (in.numel() + W - 1) / W, 256);
  return out;
}

at::Tensor philox_uniform_op(int64_t seed, int64_t offset, int64_t n) {
  TORCH_CHECK(offset >= 0 && n >= 0, "_philox_uniform: offset and n must be non-negative");
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) o[p] = philox_uniform(seed, offset, p);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cdm_kernels, m) {
  m.def("_cpu_isa(str isa=\"\") -> str", &cpu_isa_op);
  m.def("_cpu_vec_math(Tensor x, int fn) -> Tensor");
  m.def("_philox_uniform(int seed, int offset, int n) -> Tensor", &philox_uniform_op);
}

TORCH_LIBRARY_IMPL(cdm_kernels, CPU, m) { m.impl("_cpu_vec_math", &cpu_vec_math_op); }

}  // namespace cpu
}  // namespace cdm
