// Shared plumbing of the CUDA kernels (csrc/cuda/*.cu): row layout, vectorised row I/O,
// warp / row-group reductions, the inverse-CDF sampler and the host-side launch helpers.
//
// Layout of every row kernel (one "row group" of threads per position p):
//   * W = 1 (N <= kSmallRow): a row group is one warp, 8 rows per 256-thread block;
//     W = 8 (larger N): a row group is the whole 256-thread block, one row per block.
//     Control flow is uniform inside a row group (every branch depends on per-row
//     values only), so group barriers are __syncwarp (W = 1) or __syncthreads (W = 8).
//   * The vocabulary is cut into segments of kSeg = 256 states: warp w of a group owns
//     segments w, w + W, ... and lane l holds kEPT = 8 states of each. When the row
//     start is 16-byte aligned and N * sizeof(S) % 16 == 0 ("aligned") lane l holds the
//     contiguous states [seg*256 + 8l, +8) and moves them with 16-byte loads/stores
//     (one for bf16/fp16, two for fp32, four for fp64); otherwise lane l holds states
//     seg*256 + 32k + l (k < 8), scalar but still coalesced.
//   * Reductions run in the compute type C (float for fp32/bf16/fp16 storage, double for
//     fp64) inside a thread, and in double across threads (per-row scalars in double).
//   * A row that is read by several passes is cached in shared memory (its storage
//     dtype) by the first pass when it fits the budget (kCacheBudget per block, so at
//     least two blocks stay resident per SM); later passes then read shared memory.
//   * Segments holding neither x nor the row's end take a path without per-state index
//     tests (with_plain). Where few blocks fit per SM, a row group first asks L2 for its
//     whole row (prefetch_row, l2_prefetch_bytes).
//   * Offsets are int64 (P * N may exceed 2^31). No host synchronisation anywhere:
//     launches go on the current stream, the Philox seed/offset come from a CPU tensor.
//
// CDM_CUDA_EMULATE compiles these kernels as plain C++ against cuda/emulate.h (one OS
// thread per CUDA thread, barriers for __syncthreads / shuffles): the algorithms can then
// be tested on a machine without a GPU. Nothing below may depend on which one is used.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#ifdef CDM_CUDA_EMULATE
#include "cuda/emulate.h"
#define CDM_DEV inline
#define CDM_GLOBAL
#define CDM_BOUNDS(n, min_blocks)
#define CDM_DECLARE_SMEM(name) unsigned char* name = ::emu::shared_memory()
#define CDM_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(cdm_emu, CPU, m)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#define CDM_DEV __device__ __forceinline__
#define CDM_GLOBAL __global__
#define CDM_BOUNDS(n, min_blocks) __launch_bounds__(n, min_blocks)
#define CDM_DECLARE_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define CDM_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(cdm_kernels, CUDA, m)
#endif

#include "graph.h"
#include "row_checks.h"
#include "philox.h"
#include "cuda/dense.h"

namespace cdm {
namespace gpu {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kEPT = 8;             // states per lane per segment
constexpr int kSeg = 32 * kEPT;     // states per segment (one warp)
constexpr int64_t kSmallRow = 1024;  // up to this N a row group is one warp
// bytes of shared memory per block with a row cache: the most that keeps two blocks
// resident per SM on Hopper (228 KiB per SM, 1 KiB reserved per block), so that a bf16 row
// of 50257 states and its segment stats (fused_euler_step) are read once
constexpr int64_t kCacheBudget = 113 * 1024;
constexpr int kRedSlots = 32;       // doubles of reduction scratch per row group
constexpr int64_t kNone = int64_t(1) << 62;  // "no index" (exact as a double)

// Minimum resident blocks per SM asked of the compiler (__launch_bounds__): 4 blocks of
// 256 threads cap a thread at 64 registers, so a row kernel keeps 32 warps per SM to hide
// HBM latency; float64 rows need more registers (2 blocks, 128).
template <class S>
constexpr int min_blocks() {
  return sizeof(S) == 8 ? 2 : 4;
}

template <class S>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

template <class T>
CDM_DEV T pos_inf() {
  return static_cast<T>(INFINITY);
}

// Fast transcendentals for the forward passes: __expf/__logf are one ex2.approx/lg2.approx
// each (about 2 ulp plus the argument's scaling). pexp is the full-precision expf
// (<= 1 ulp) for the backward's u = e^{v-M} - beta S, whose cancellation turns an exp's
// relative error into a large error of g / u (the build does not use --use_fast_math, so
// expf and `/` stay IEEE). Double is exact-rounded (per-row scalars, float64 storage).
CDM_DEV float fexp(float v) { return __expf(v); }
CDM_DEV double fexp(double v) { return exp(v); }
CDM_DEV float flog(float v) { return __logf(v); }
CDM_DEV double flog(double v) { return log(v); }
CDM_DEV float pexp(float v) { return expf(v); }
CDM_DEV double pexp(double v) { return exp(v); }

template <class T>
CDM_DEV T tmax(T a, T b) {
  return a > b ? a : b;
}
template <class T>
CDM_DEV T tmin(T a, T b) {
  return a < b ? a : b;
}

// ----------------------------------------------------------------------------- warp level

template <class T>
CDM_DEV T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;  // bitwise identical in every lane (each step is a commutative pair sum)
}

template <class T>
CDM_DEV T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = tmax(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

template <class T>
CDM_DEV T warp_min(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = tmin(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// inclusive prefix sum over the lanes of a warp
CDM_DEV double warp_inclusive_scan(double v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += y;
  }
  return v;
}

// ----------------------------------------------------------------------------- row groups

template <int W>
struct Group {
  static constexpr int kThreads = 32 * W;
  static constexpr int kRows = W == 1 ? 8 : 1;  // rows per block
  static constexpr int kBlock = kThreads * kRows;

  int tid;      // thread within the row group
  int lane;     // lane within the warp
  int warp;     // warp within the row group
  int slot;     // row group within the block
  double* red;  // kRedSlots doubles of shared scratch owned by this group

  CDM_DEV void sync() const {
    if (W == 1) {
      __syncwarp();
    } else {
      __syncthreads();
    }
  }

  // Group-wide reductions; every thread gets the identical result.
  template <class T>
  CDM_DEV T sum(T v) const {
    return across_warps(warp_sum(v), 0.0, [](double a, double b) { return a + b; });
  }
  template <class T>
  CDM_DEV T max(T v) const {
    return across_warps(warp_max(v), -pos_inf<double>(), [](double a, double b) { return tmax(a, b); });
  }
  template <class T>
  CDM_DEV T min(T v) const {
    return across_warps(warp_min(v), pos_inf<double>(), [](double a, double b) { return tmin(a, b); });
  }
  // Combines the warps' results (v, already reduced within each warp) in warp order,
  // in double from `init`.
  template <class T, class Op>
  CDM_DEV T across_warps(T v, double init, Op op) const {
    if (W == 1) return v;
    sync();
    if (lane == 0) red[warp] = static_cast<double>(v);
    sync();
    double t = init;
    for (int w = 0; w < W; ++w) t = op(t, red[w]);
    return static_cast<T>(t);
  }
  // exclusive prefix of v over threads in tid order; `total` gets the sum of all
  CDM_DEV double exclusive_scan(double v, double& total) const {
    const double incl = warp_inclusive_scan(v, lane);
    double excl = __shfl_up_sync(kFull, incl, 1);
    if (lane == 0) excl = 0.0;
    const double warp_total = __shfl_sync(kFull, incl, 31);
    if (W == 1) {
      total = warp_total;
      return excl;
    }
    sync();
    if (lane == 0) red[warp] = warp_total;
    sync();
    double before = 0.0, all = 0.0;
    for (int w = 0; w < W; ++w) {
      if (w < warp) before += red[w];
      all += red[w];
    }
    total = all;
    return before + excl;
  }
};

// ----------------------------------------------------------------------------- shared memory plan

// Per row group: [reduction scratch][segment stats (optional)][row caches (optional)].
struct SmemPlan {
  int64_t group_bytes = 0;  // bytes per row group
  int64_t stats_off = 0;    // segment stats: C seg_m[nseg], C seg_s[nseg], double mass[nseg]
  int64_t cache_off = 0;    // `cache_rows` rows of nseg * kSeg storage elements
  int64_t cache_stride = 0;  // bytes between cached rows
  int cache_rows = 0;        // 0: no cache (later passes read global memory)
  int64_t block_bytes = 0;   // dynamic shared memory of a block
  int64_t l2_prefetch = 0;   // bytes of each input row asked of L2 before pass 1 (prefetch_row)
};

// Shared memory of the current device: the most a block may opt in to, and an SM's total.
struct SmemLimits {
  int64_t per_block, per_sm;
};
inline SmemLimits smem_limits() {
#ifdef CDM_CUDA_EMULATE
  return {227 * 1024, 228 * 1024};
#else
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return {static_cast<int64_t>(prop->sharedMemPerBlockOptin), static_cast<int64_t>(prop->sharedMemPerMultiprocessor)};
#endif
}

// The bytes of each row to prefetch into L2 (prefetch_row) for blocks of `block_bytes`
// shared memory. Measured on an H200 (bf16, benchmarks/RESULTS.md): where the row cache
// leaves room for only 2 blocks per SM (N = 50257) the prefetch made scores_to_posterior
// 1.2x faster; with 3-4 blocks per SM (N = 32768) it made it and the Euler step 1.2x
// slower. So by default: 128 KiB when at most 2 blocks fit, else none.
// CDM_KERNELS_CUDA_PREFETCH=<bytes> (read once per process) sets it for every kernel; 0: off.
inline int64_t l2_prefetch_bytes(int64_t block_bytes) {
  static const int64_t forced = [] {
    const char* v = std::getenv("CDM_KERNELS_CUDA_PREFETCH");
    return v != nullptr && *v != '\0' ? std::max<int64_t>(0, std::atoll(v)) : int64_t(-1);
  }();
  if (forced >= 0) return forced;
  return block_bytes > 0 && smem_limits().per_sm / block_bytes <= 2 ? int64_t(128) * 1024 : 0;
}

inline int64_t host_align16(int64_t b) { return (b + 15) / 16 * 16; }
CDM_HD inline int64_t num_segments(int64_t n) { return (n + kSeg - 1) / kSeg; }

template <class S, int W>
SmemPlan plan_smem(int64_t n, bool stats, int cache_rows_wanted) {
  using C = typename Compute<S>::type;
  const int64_t nseg = num_segments(n);
  SmemPlan plan;
  int64_t bytes = kRedSlots * sizeof(double);
  plan.stats_off = bytes;
  if (stats) bytes += host_align16(nseg * 2 * static_cast<int64_t>(sizeof(C))) + host_align16(nseg * 8);
  bytes = host_align16(bytes);
  plan.cache_off = bytes;
  plan.cache_stride = host_align16(nseg * kSeg * static_cast<int64_t>(sizeof(S)));
  const int64_t with_cache = bytes + cache_rows_wanted * plan.cache_stride;
  if (cache_rows_wanted > 0 && with_cache * Group<W>::kRows <= kCacheBudget) {
    plan.cache_rows = cache_rows_wanted;
    bytes = with_cache;
  }
  plan.group_bytes = bytes;
  plan.block_bytes = bytes * Group<W>::kRows;
  plan.l2_prefetch = l2_prefetch_bytes(plan.block_bytes);
  return plan;
}

// Device view of a row group's shared memory (see SmemPlan).
template <class C>
struct SegStats {
  C* m;          // per segment: max of the (non-excluded) log-scores
  C* s;          // per segment: sum of exp(v - m)
  double* mass;  // per segment: probability mass (sampling)
};

template <class C>
CDM_DEV SegStats<C> segment_stats(unsigned char* group_smem, const SmemPlan& plan, int64_t nseg) {
  unsigned char* base = group_smem + plan.stats_off;
  SegStats<C> st;
  st.m = reinterpret_cast<C*>(base);
  st.s = st.m + nseg;
  const int64_t mass_off = (nseg * 2 * static_cast<int64_t>(sizeof(C)) + 15) / 16 * 16;
  st.mass = reinterpret_cast<double*>(base + mass_off);
  return st;
}

template <class S>
CDM_DEV S* cache_row(unsigned char* group_smem, const SmemPlan& plan, int r) {
  return r < plan.cache_rows ? reinterpret_cast<S*>(group_smem + plan.cache_off + r * plan.cache_stride) : nullptr;
}

// ----------------------------------------------------------------------------- row I/O

// Index of slot k of `lane` in segment `seg` (see the layout note at the top).
template <bool AL>
CDM_DEV int64_t slot_index(int64_t seg, int lane, int k) {
  return AL ? seg * kSeg + lane * kEPT + k : seg * kSeg + k * 32 + lane;
}

// The emulation counts the bytes each row load and store moves (emulate.h: count_global);
// on a GPU this is a no-op.
CDM_DEV void count_bytes(const void* p, int64_t bytes, bool store) {
#ifdef CDM_CUDA_EMULATE
  ::emu::count_global(p, bytes, store);
#else
  (void)p, (void)bytes, (void)store;
#endif
}

// One state of a row (global memory or the row cache), read outside the segment loops.
template <class S>
CDM_DEV S load_one(const S* p) {
  count_bytes(p, sizeof(S), false);
  return *p;
}

// One state that every thread of the group reads (the mask's, say): one global read, the
// other threads' copies come from the cache hierarchy, so it is counted once.
template <class S, int W>
CDM_DEV S load_for_group(const Group<W>& g, const S* p) {
  if (g.tid == 0) count_bytes(p, sizeof(S), false);
  return *p;
}

// Load the kEPT storage values of (seg, lane); slots at or past n get S(0).
// `raw` must be 16-byte aligned (declare it `alignas(16) S raw[kEPT]`).
template <class S, bool AL>
CDM_DEV void load_raw(const S* src, int64_t n, int64_t seg, int lane, S* raw) {
  if (AL) {
    const int64_t i0 = seg * kSeg + lane * kEPT;
    if (i0 + kEPT <= n) {
      constexpr int kVec = kEPT * sizeof(S) / 16;
      constexpr int kPer = 16 / sizeof(S);
      const uint4* s4 = reinterpret_cast<const uint4*>(src + i0);
      count_bytes(s4, kVec * 16, false);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const uint4 v = s4[j];
        memcpy(raw + j * kPer, &v, 16);
      }
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < kEPT; ++k) {
    const int64_t i = slot_index<AL>(seg, lane, k);
    raw[k] = i < n ? load_one(src + i) : S(0.0f);
  }
}

// Store the slots of (seg, lane) that lie below n.
template <class S, bool AL>
CDM_DEV void store_raw(S* dst, int64_t n, int64_t seg, int lane, const S* raw) {
  if (AL) {
    const int64_t i0 = seg * kSeg + lane * kEPT;
    if (i0 + kEPT <= n) {
      constexpr int kVec = kEPT * sizeof(S) / 16;
      constexpr int kPer = 16 / sizeof(S);
      uint4* d4 = reinterpret_cast<uint4*>(dst + i0);
      count_bytes(d4, kVec * 16, true);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        uint32_t w[4];
        memcpy(w, raw + j * kPer, 16);
#ifdef CDM_CUDA_EMULATE
        d4[j] = make_uint4(w[0], w[1], w[2], w[3]);
#else
        // one 16-byte store (generic addressing: dst is global memory or the shared row cache);
        // nvcc otherwise splits the uint4 store into four 4-byte stores here
        asm volatile("st.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(d4 + j), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                     : "memory");
#endif
      }
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < kEPT; ++k) {
    const int64_t i = slot_index<AL>(seg, lane, k);
    if (i < n) {
      count_bytes(dst + i, sizeof(S), true);
      dst[i] = raw[k];
    }
  }
}

// True when segment `seg` holds kSeg states, all below n and none of them x: its slots then
// need no per-state index test (warp-uniform). Every other segment takes the checked path.
CDM_DEV bool plain_segment(int64_t seg, int64_t n, int64_t x) {
  const int64_t lo = seg * kSeg;
  return lo + kSeg <= n && (x < lo || x >= lo + kSeg);
}

// f(std::true_type{}) on a plain segment, else f(std::false_type{}): one loop body, and
// the compiler drops the index arithmetic from the plain instantiation.
template <class F>
CDM_DEV void with_plain(int64_t seg, int64_t n, int64_t x, F&& f) {
  if (plain_segment(seg, n, x)) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <class C, class S>
CDM_DEV C to_compute(S v) {
  return static_cast<C>(static_cast<typename std::conditional<std::is_same<S, double>::value, double, float>::type>(v));
}

template <class S, class C>
CDM_DEV S to_storage(C v) {
  return S(v);
}
template <>
CDM_DEV c10::BFloat16 to_storage<c10::BFloat16, double>(double v) {
  return c10::BFloat16(static_cast<float>(v));
}
template <>
CDM_DEV c10::Half to_storage<c10::Half, double>(double v) {
  return c10::Half(static_cast<float>(v));
}

// Write `at_x` at state x and `elsewhere` at every other state of the row.
template <class S, bool AL, int W>
CDM_DEV void fill_row(const Group<W>& g, S* out, int64_t n, int64_t x, typename Compute<S>::type at_x,
                      typename Compute<S>::type elsewhere) {
  const int64_t nseg = num_segments(n);
  for (int64_t seg = g.warp; seg < nseg; seg += W) {
    alignas(16) S o[kEPT];
#pragma unroll
    for (int k = 0; k < kEPT; ++k) o[k] = to_storage<S>(slot_index<AL>(seg, g.lane, k) == x ? at_x : elsewhere);
    store_raw<S, AL>(out, n, seg, g.lane, o);
  }
}

// ----------------------------------------------------------------------------- segment loops

// For each segment of this thread's warp: loads its kEPT states of `src` into raw, copies
// them into `copy` (a row cache) unless it is null, then calls f(seg, raw).
template <class S, bool AL, int W, class F>
CDM_DEV void read_segments(const Group<W>& g, const S* src, int64_t n, S* copy, F&& f) {
  const int64_t nseg = num_segments(n);
  for (int64_t seg = g.warp; seg < nseg; seg += W) {
    alignas(16) S raw[kEPT];
    load_raw<S, AL>(src, n, seg, g.lane, raw);
    if (copy != nullptr) store_raw<S, AL>(copy, n, seg, g.lane, raw);
    f(seg, raw);
  }
}

// The same over two rows side by side: f(seg, a_raw, b_raw); b's states are copied into
// `b_copy` unless it is null.
template <class S, bool AL, int W, class F>
CDM_DEV void read_segment_pairs(const Group<W>& g, const S* a, const S* b, int64_t n, S* b_copy, F&& f) {
  const int64_t nseg = num_segments(n);
  for (int64_t seg = g.warp; seg < nseg; seg += W) {
    alignas(16) S a_raw[kEPT], b_raw[kEPT];
    load_raw<S, AL>(a, n, seg, g.lane, a_raw);
    load_raw<S, AL>(b, n, seg, g.lane, b_raw);
    if (b_copy != nullptr) store_raw<S, AL>(b_copy, n, seg, g.lane, b_raw);
    f(seg, a_raw, b_raw);
  }
}

// For each segment: raw <- its states of `src`, f(seg, raw) rewrites raw, raw -> `out`.
template <class S, bool AL, int W, class F>
CDM_DEV void map_segments(const Group<W>& g, const S* src, S* out, int64_t n, F&& f) {
  read_segments<S, AL, W>(g, src, n, nullptr, [&](int64_t seg, S* raw) {
    f(seg, raw);
    store_raw<S, AL>(out, n, seg, g.lane, raw);
  });
}

// Over two rows: f(seg, a_raw, b_raw) rewrites a_raw, which goes to `out`.
template <class S, bool AL, int W, class F>
CDM_DEV void map_segment_pairs(const Group<W>& g, const S* a, const S* b, S* out, int64_t n, F&& f) {
  read_segment_pairs<S, AL, W>(g, a, b, n, nullptr, [&](int64_t seg, S* a_raw, S* b_raw) {
    f(seg, a_raw, b_raw);
    store_raw<S, AL>(out, n, seg, g.lane, a_raw);
  });
}

// ----------------------------------------------------------------------------- row passes

// Ask L2 for the first min(bytes, cap) bytes of a row, one prefetch per 128-byte line spread
// over the group's threads. A row group's own loads keep only ~64 bytes per thread in
// flight (registers); these hints put the whole row in flight at once, so pass 1 reads
// mostly from L2. No registers, no shared memory, no effect on results.
template <int W>
CDM_DEV void prefetch_row(const Group<W>& g, const void* row, int64_t bytes, int64_t cap) {
#ifndef CDM_CUDA_EMULATE
  const char* base = static_cast<const char*>(row);
  const int64_t lines = (tmin(bytes, cap) + 127) / 128;
  for (int64_t l = g.tid; l < lines; l += Group<W>::kThreads) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(base + l * 128));
  }
#else
  (void)g, (void)row, (void)bytes, (void)cap;
#endif
}

// Running (max, sum exp(v - max)) of one thread, folded segment by segment.
template <class C>
struct RunningMS {
  C m = -pos_inf<C>();
  C s = C(0);
  CDM_DEV void fold(C seg_m, C seg_s) {
    if (!(seg_s > C(0))) return;  // empty segment (every state excluded)
    if (seg_m > m) {
      s = s * fexp(m - seg_m) + seg_s;
      m = seg_m;
    } else {
      s += seg_s * fexp(seg_m - m);
    }
  }
};

// (max, sum exp(v - max)) of a warp's segment: one exp per state (max first, then the
// exps relative to the segment max). v = -inf marks excluded states.
template <class C>
CDM_DEV void segment_ms(const C* v, C& seg_m, C& seg_s) {
  C lm = v[0];
#pragma unroll
  for (int k = 1; k < kEPT; ++k) lm = tmax(lm, v[k]);
  seg_m = warp_max(lm);
  C ls = C(0);
  if (seg_m > -pos_inf<C>()) {
#pragma unroll
    for (int k = 0; k < kEPT; ++k) ls += fexp(v[k] - seg_m);
  }
  seg_s = warp_sum(ls);
}

struct NoExtra {
  CDM_DEV void operator()(int64_t) const {}
};

// 1 when one of the kEPT values of raw is NaN or +-inf (allow_minus_inf: NaN or +inf);
// slots past n hold 0 (load_raw)
template <class S>
CDM_DEV int raw_not_finite(const S* raw, bool allow_minus_inf) {
  using C = typename Compute<S>::type;
  int bad = 0;
#pragma unroll
  for (int k = 0; k < kEPT; ++k) {
    const C v = to_compute<C>(raw[k]);
    bad |= allow_minus_inf ? (v != v || v == pos_inf<C>()) : !(v - v == C(0));
  }
  return bad;
}

// Pass 1 of the inversion kernels: m = max_{y != x} log_score_y and
// s = sum_{y != x} exp(log_score_y - m) (double, group-uniform). Optionally stores the
// segment stats (seg_m, seg_s) and fills the row cache; `extra(seg)` runs once per
// segment in every lane (to stream a second row alongside); `bad` (when not null) gets 1
// where a state of this thread, x's included, is NaN or +-inf (the value checks).
template <class S, bool AL, int W, class Extra>
CDM_DEV void pass_max_sumexp(const Group<W>& g, const S* row, S* cache, int64_t n, int64_t x,
                             typename Compute<S>::type* seg_m, typename Compute<S>::type* seg_s, double& m_out,
                             double& s_out, Extra&& extra, int* bad = nullptr) {
  using C = typename Compute<S>::type;
  const int64_t nseg = num_segments(n);
  // kBatch segments per step: their loads are all issued before any reduction, so each
  // lane keeps ~64 bytes in flight (HBM latency hiding at a few blocks per SM)
  constexpr int kBatch = static_cast<int>(64 / (kEPT * sizeof(S)));  // 4 bf16/fp16, 2 fp32, 1 fp64
  RunningMS<C> run;
  for (int64_t first = g.warp; first < nseg; first += static_cast<int64_t>(W) * kBatch) {
    alignas(16) S raw[kBatch][kEPT];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t seg = first + static_cast<int64_t>(b) * W;
      if (seg < nseg) load_raw<S, AL>(row, n, seg, g.lane, raw[b]);
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t seg = first + static_cast<int64_t>(b) * W;
      if (seg >= nseg) break;  // warp-uniform
      if (cache != nullptr) store_raw<S, AL>(cache, n, seg, g.lane, raw[b]);
      if (bad != nullptr) *bad |= raw_not_finite(raw[b], false);
      C v[kEPT];
      with_plain(seg, n, x, [&](auto plain) {
#pragma unroll
        for (int k = 0; k < kEPT; ++k) {
          if constexpr (decltype(plain)::value) {
            v[k] = to_compute<C>(raw[b][k]);
          } else {
            const int64_t i = slot_index<AL>(seg, g.lane, k);
            v[k] = (i < n && i != x) ? to_compute<C>(raw[b][k]) : -pos_inf<C>();
          }
        }
      });
      C sm, ss;
      segment_ms(v, sm, ss);
      if (seg_m != nullptr && g.lane == 0) {
        seg_m[seg] = sm;
        seg_s[seg] = ss;
      }
      run.fold(sm, ss);
      extra(seg);
    }
  }
  // (run.m, run.s) are warp-uniform: combine one copy per warp
  const double m = g.max(static_cast<double>(run.m));
  double part = 0.0;
  if (g.lane == 0 && run.s > C(0)) part = static_cast<double>(run.s) * exp(static_cast<double>(run.m) - m);
  s_out = g.sum(part);
  m_out = m;
}

// ----------------------------------------------------------------------------- sampling

// Inverse-CDF draw from the masses of a row: mass[seg] (shared, nseg entries, written
// before the call and visible to the group) is the total probability of segment seg;
// seg_probs(seg) returns p_of, with p_of(i) (double) the probability of state i of that
// segment, computed on the same basis (the per-segment constants are set up once). With
// target = u * sum(mass), the pick is the first state whose running CDF exceeds the
// target among states of positive probability (never a zero-probability state); when
// rounding leaves the target past the end, the last state with positive probability.
// Segment level: every thread scans a contiguous run of segments (exclusive scan over
// the group); state level: warp 0 scans the 256 states of the picked segment in index
// order; its kEPT probabilities per lane are computed (and their loads issued) before the
// scan. Returns the state in warp 0 (other warps get -1); x if the row has no mass.
template <int W, class SegProbs>
CDM_DEV int64_t sample_row(const Group<W>& g, const double* mass, int64_t n, int64_t x, float uniform,
                           SegProbs&& seg_probs) {
  const int64_t nseg = num_segments(n);
  const int64_t per = (nseg + Group<W>::kThreads - 1) / Group<W>::kThreads;
  const int64_t b = tmin<int64_t>(nseg, g.tid * per), e = tmin<int64_t>(nseg, b + per);
  double local = 0.0;
  for (int64_t j = b; j < e; ++j) local += mass[j];
  double total;
  const double prefix = g.exclusive_scan(local, total);
  const double target = static_cast<double>(uniform) * total;
  int64_t cand = kNone, last = -1;
  double cand_carry = 0.0, cum = prefix;
  for (int64_t j = b; j < e; ++j) {
    const double mj = mass[j];
    if (mj > 0.0) {
      last = j;
      if (cand == kNone && cum + mj > target) {
        cand = j;
        cand_carry = cum;
      }
    }
    cum += mj;
  }
  const int64_t seg = g.min(cand);
  const int64_t last_seg = g.max(last);
  if (seg != kNone && cand == seg) g.red[kRedSlots - 1] = cand_carry;  // one owner: runs are disjoint
  g.sync();
  int64_t pick_seg;
  double tgt;
  if (seg != kNone) {
    pick_seg = seg;
    tgt = target - g.red[kRedSlots - 1];
  } else if (last_seg >= 0) {
    pick_seg = last_seg;
    tgt = pos_inf<double>();  // no crossing: take the last state with mass
  } else {
    return g.warp == 0 ? x : -1;
  }
  if (g.warp != 0) return -1;
  const auto p_of = seg_probs(pick_seg);
  double pv[kEPT];
#pragma unroll
  for (int k = 0; k < kEPT; ++k) {
    const int64_t i = pick_seg * kSeg + k * 32 + g.lane;
    pv[k] = i < n ? p_of(i) : 0.0;
  }
  double carry = 0.0;
  int64_t found = -1, last_pos = -1;
#pragma unroll
  for (int k = 0; k < kEPT; ++k) {
    const int64_t base = pick_seg * kSeg + k * 32;
    const double incl = warp_inclusive_scan(pv[k], g.lane) + carry;
    const unsigned hit = __ballot_sync(kFull, pv[k] > 0.0 && incl > tgt);
    const unsigned pos = __ballot_sync(kFull, pv[k] > 0.0);
    if (found < 0 && hit != 0u) found = base + (__ffs(static_cast<int>(hit)) - 1);
    if (pos != 0u) last_pos = base + (31 - __clz(static_cast<int>(pos)));
    carry = __shfl_sync(kFull, incl, 31);
  }
  if (found >= 0) return found;
  return last_pos >= 0 ? last_pos : x;
}

// ----------------------------------------------------------------------------- kernel prologue

// Sets up the row group of this thread; false when its row is past the end (the whole
// group leaves together).
template <int W>
CDM_DEV bool row_setup(unsigned char* smem, const SmemPlan& plan, int64_t positions, Group<W>& g, int64_t& p,
                       unsigned char*& group_smem) {
  const int t = static_cast<int>(threadIdx.x);
  g.slot = t / Group<W>::kThreads;
  g.tid = t % Group<W>::kThreads;
  g.lane = t % 32;
  g.warp = g.tid / 32;
  p = static_cast<int64_t>(blockIdx.x) * Group<W>::kRows + g.slot;
  group_smem = smem + g.slot * plan.group_bytes;
  g.red = reinterpret_cast<double*>(group_smem);
  return p < positions;
}

// The first line of every row kernel (template parameter W, arguments `a` with .plan and
// .positions): declares the row group `g`, its position `p` and its shared memory `gs`;
// a group past the last position returns.
#define CDM_ROW_GROUP(a, g, p, gs)                                    \
  CDM_DECLARE_SMEM(cdm_smem);                                         \
  Group<W> g;                                                         \
  int64_t p;                                                          \
  unsigned char* gs;                                                  \
  if (!row_setup<W>(cdm_smem, (a).plan, (a).positions, g, p, gs)) return

// ----------------------------------------------------------------------------- host side

enum class Storage : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

inline bool is_aligned_rows(const at::Tensor& t) {
  const int64_t n = t.size(1);
  const auto addr = reinterpret_cast<uintptr_t>(t.data_ptr());
  return addr % 16 == 0 && (n * static_cast<int64_t>(t.element_size())) % 16 == 0;
}

// Calls f.template operator()<S, AL, W>() (f: a lambda [&]<class S, bool AL, int W>() {...})
// with S the storage type of `dtype`, AL = aligned and W the row group's warps for n states.
template <class F>
void dispatch_rows(at::ScalarType dtype, bool aligned, int64_t n, F&& f) {
  auto with_warps = [&](auto s_tag, auto al_tag) {
    using S = decltype(s_tag);
    constexpr bool AL = decltype(al_tag)::value;
    if (n <= kSmallRow) {
      f.template operator()<S, AL, 1>();
    } else {
      f.template operator()<S, AL, 8>();
    }
  };
  auto with_align = [&](auto s_tag) {
    if (aligned) {
      with_warps(s_tag, std::true_type{});
    } else {
      with_warps(s_tag, std::false_type{});
    }
  };
  switch (dtype) {
    case at::kFloat:
      with_align(float{});
      break;
    case at::kDouble:
      with_align(double{});
      break;
    case at::kBFloat16:
      with_align(c10::BFloat16{});
      break;
    case at::kHalf:
      with_align(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "cdm_kernels (CUDA): unsupported dtype ", dtype);
  }
}


// Launches kernel<<<ceil(positions / rows per block), block>>>(args) on the current stream
// (args: a RowArgs, whose positions and plan size the launch).
template <int W, class Args>
void launch_rows(void (*kernel)(Args), const Args& args) {
  const int64_t positions = args.positions;
  const SmemPlan& plan = args.plan;
  if (positions == 0) return;
  const int64_t blocks = (positions + Group<W>::kRows - 1) / Group<W>::kRows;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "cdm_kernels (CUDA): too many positions (", positions, ")");
  const int64_t smem_max = smem_limits().per_block;
  TORCH_CHECK(plan.block_bytes <= smem_max, "cdm_kernels (CUDA): a row of this many states needs ",
              plan.block_bytes, " bytes of shared memory, more than the device's ", smem_max);
#ifdef CDM_CUDA_EMULATE
  ::emu::launch(static_cast<unsigned>(blocks), Group<W>::kBlock, static_cast<size_t>(plan.block_bytes),
                [&]() { kernel(args); });
#else
  const void* fn = reinterpret_cast<const void*>(kernel);
  if (plan.block_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(plan.block_bytes)));
  }
  Args copy = args;
  void* params[] = {&copy};
  C10_CUDA_CHECK(cudaLaunchKernel(fn, dim3(static_cast<unsigned>(blocks)), dim3(Group<W>::kBlock), params,
                                  static_cast<size_t>(plan.block_bytes), at::cuda::getCurrentCUDAStream().stream()));
#endif
}

// ----------------------------------------------------------------------------- argument checks

#ifdef CDM_CUDA_EMULATE
#define CDM_DEVICE_GUARD(t) (void)(t)
inline void check_device(const at::Tensor&, const char*) {}
#else
#define CDM_DEVICE_GUARD(t) const c10::cuda::CUDAGuard cdm_device_guard((t).device())
inline void check_device(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), "cdm_kernels (CUDA): ", what, " must be a CUDA tensor, got ", t.device());
}
#endif

inline void check_rows(const at::Tensor& t, const char* what) {
  check_device(t, what);
  check_row_layout(t, what);
}

// a second (P, N) input like `rows` (a backward's grad, the loss's target)
inline void check_rows_like(const at::Tensor& t, const at::Tensor& rows, const char* what) {
  check_rows(t, what);
  check_same_shape(t, rows, what);
}

inline void check_positions(const at::Tensor& t, const at::Tensor& like, const char* what, int64_t positions,
                            at::ScalarType dtype) {
  check_device(t, what);
  TORCH_CHECK(t.device() == like.device(), "cdm_kernels: ", what, " is on ", t.device(), " but the rows are on ",
              like.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == positions, "cdm_kernels: ", what, " must be (", positions, ",), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "cdm_kernels: ", what, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_family(int64_t family) {
  TORCH_CHECK(family == UNIFORM || family == ABSORBING || family == DENSE,
              "cdm_kernels: family must be 0 (uniform), 1 (absorbing) or 2 (dense), got ", family);
}

// The rows of an op with their (P,) tokens x (int64; undefined where the op has none) and
// noise levels tau (float64), validated, contiguous, on the rows' device.
struct RowInputs {
  int64_t positions, n;
  at::Tensor x, tau;
};

inline RowInputs check_row_inputs(int64_t family, const at::Tensor& rows, const char* what, const at::Tensor& x,
                                  const at::Tensor& tau, const char* tau_what = "tau") {
  check_family(family);
  check_rows(rows, what);
  const int64_t positions = rows.size(0);
  check_positions(x, rows, "x", positions, at::kLong);
  check_positions(tau, rows, tau_what, positions, at::kDouble);
  return {positions, rows.size(1), x.contiguous(), tau.contiguous()};
}

struct ErrorRecord;  // value_checks.cuh

// The fields every row kernel's arguments share (each kernel's Args derives from it).
struct RowArgs {
  const int64_t* x;   // (P,) tokens
  const double* tau;  // (P,) noise levels
  int64_t positions, n, family;
  SmemPlan plan;
  ErrorRecord* errors = nullptr;  // the call's value checks (value_checks.cuh); null: off
};

// The rows of `in` under graph `family`, launched with `plan`.
inline RowArgs row_args(const RowInputs& in, int64_t family, const SmemPlan& plan, ErrorRecord* errors = nullptr) {
  return {in.x.defined() ? in.x.data_ptr<int64_t>() : nullptr, in.tau.data_ptr<double>(), in.positions, in.n, family,
          plan, errors};
}

// The float64 eigen-decomposition of a dense graph, validated and on the rows' device.
inline dense::Eigen check_dense(const c10::optional<at::Tensor>& evals, const c10::optional<at::Tensor>& vecs,
                              const c10::optional<at::Tensor>& vecs_inv, int64_t n, const at::Device& device) {
  TORCH_CHECK(evals.has_value() && vecs.has_value() && vecs_inv.has_value(),
              "cdm_kernels: a dense graph (family 2) needs evals, vecs and vecs_inv");
  TORCH_CHECK(evals->dim() == 1 && evals->size(0) == n, "cdm_kernels: evals must be (", n, ",), got ", evals->sizes());
  TORCH_CHECK(vecs->dim() == 2 && vecs->size(0) == n && vecs->size(1) == n, "cdm_kernels: vecs must be (", n, ", ", n,
              "), got ", vecs->sizes());
  TORCH_CHECK(vecs_inv->dim() == 2 && vecs_inv->size(0) == n && vecs_inv->size(1) == n,
              "cdm_kernels: vecs_inv must be (", n, ", ", n, "), got ", vecs_inv->sizes());
  const auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
  return {evals->to(opts).contiguous(), vecs->to(opts).contiguous(), vecs_inv->to(opts).contiguous()};
}

}  // namespace gpu
}  // namespace cdm
