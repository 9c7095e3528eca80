// The value checks of the CUDA kernels (csrc/value_checks.h), without a host synchronisation.
//
// A checked call gets a small device record (ErrorRecord, from the caching allocator,
// zeroed on the call's stream); its kernels flag what they find with atomics, in the
// passes they make anyway (thread 0 of a row group checks the position's token and noise
// levels). After the launch the record is copied to pinned host memory on the same stream
// and an event is recorded: nothing waits. The host reads a record once its event has
// completed: at the start of every later checked call (ValueChecks' constructor, any
// device) and in torch.ops.cdm_kernels._raise_value_errors (cdm_kernels.check_value_errors,
// which synchronises first); the ValueError is raised there, naming the op that found it.
// So on a GPU an error surfaces one call late (or at check_value_errors), never by a
// synchronisation on the hot path. The emulation build runs its kernels synchronously and
// reads the record as the op returns, raising as the CPU kernels do.
#pragma once

#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/cuda_common.cuh"
#include "value_checks.h"

namespace cdm {
namespace gpu {

// What the kernels of one call found (ValueErrorBit) and the range of its tokens.
struct ErrorRecord {
  int bits;
  int unused;
  long long x_min, x_max;
};

// The public names an op's messages use (as the eager checks of cdm_kernels/ops name them).
struct CheckNames {
  const char* op;
  const char* rows;   // "log_score", "student_log_score", "log_p0"
  const char* x;      // "x", "x_t"
  const char* tau;    // "tau", "tau_t"
  const char* tau_s;  // the step's tau_s, else nullptr
};

#ifdef CDM_CUDA_EMULATE
inline void atomic_or(int* p, int v) { __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline void atomic_min(long long* p, long long v) {
  long long cur = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < cur && !__atomic_compare_exchange_n(p, &cur, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}
inline void atomic_max(long long* p, long long v) {
  long long cur = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v > cur && !__atomic_compare_exchange_n(p, &cur, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}
#else
__device__ __forceinline__ void atomic_or(int* p, int v) { atomicOr(p, v); }
__device__ __forceinline__ void atomic_min(long long* p, long long v) { atomicMin(p, v); }
__device__ __forceinline__ void atomic_max(long long* p, long long v) { atomicMax(p, v); }
#endif

CDM_DEV void flag_error(ErrorRecord* r, int bit) { atomic_or(&r->bits, bit); }

// Thread 0 of a row group (r not null): the position's token in [0, n) and its noise levels
// finite and >= 0 (tau_s, where the op has one, also < tau).
CDM_DEV void check_position(ErrorRecord* r, int64_t n, int64_t x, double tau, const double* tau_s) {
  if (x < 0 || x >= n) {
    flag_error(r, kTokenRange);
    atomic_min(&r->x_min, static_cast<long long>(x));
    atomic_max(&r->x_max, static_cast<long long>(x));
  }
  if (!(tau - tau == 0.0)) flag_error(r, kTauNotFinite);
  if (tau < 0.0) flag_error(r, kTauNegative);
  if (tau_s != nullptr) {
    if (!(*tau_s - *tau_s == 0.0)) flag_error(r, kTauSNotFinite);
    if (*tau_s < 0.0) flag_error(r, kTauSNegative);
    if (*tau_s >= tau) flag_error(r, kTauOrder);
  }
}

// 1 when v is NaN or +-inf (allow_minus_inf: NaN or +inf)
template <class C>
CDM_DEV int not_finite(C v, bool allow_minus_inf) {
  return allow_minus_inf ? (v != v || v == pos_inf<C>()) : !(v - v == C(0));
}

// The message of the first error of `r` in the order the eager checks raise them.
inline std::string describe(const ErrorRecord& r, const CheckNames& names, int64_t n) {
  std::ostringstream m;
  if (r.bits & kRowsNotFinite) {
    m << names.rows << " contains NaN or inf";
  } else if (r.bits & kTokenRange) {
    m << names.x << " holds token ids outside [0, " << n << "): min " << r.x_min << ", max " << r.x_max;
  } else if (r.bits & kTauNotFinite) {
    m << names.tau << " must be finite, got NaN or inf";
  } else if (r.bits & kTauNegative) {
    m << names.tau << " must be >= 0 (total noise), got a negative value";
  } else if (r.bits & kTauSNotFinite) {
    m << names.tau_s << " must be finite, got NaN or inf";
  } else if (r.bits & kTauSNegative) {
    m << names.tau_s << " must be >= 0 (total noise), got a negative value";
  } else if (r.bits & kTauOrder) {
    m << "tau_s must be < tau_t (a reverse step goes from more noise to less)";
  } else if (r.bits & kSecondNotFinite) {
    m << "target contains NaN or inf";
  } else if (r.bits & kSecondNegative) {
    m << "target must be probabilities (non-negative)";
  } else {
    m << "target rows must sum to 1 (probabilities, not logits)";
  }
  return m.str();
}

// The checks of a target row of probabilities, accumulated by each thread over the
// segments it reads (add), then combined over the row group (flag: every thread calls it).
template <class C>
struct TargetChecks {
  int bad = 0, negative = 0;
  C sum = C(0);
  template <class S>
  CDM_DEV void add(const S* raw) {
    bad |= raw_not_finite(raw, false);
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {  // slots past n hold 0
      const C t = to_compute<C>(raw[k]);
      negative |= t < C(0);
      sum += t;
    }
  }
  template <int W>
  CDM_DEV void flag(const Group<W>& g, ErrorRecord* r) const {
    const double total = g.sum(static_cast<double>(sum));
    if (bad) flag_error(r, kSecondNotFinite);
    if (negative) flag_error(r, kSecondNegative);
    if (g.tid == 0 && !(fabs(total - 1.0) <= kTargetSumTolerance)) flag_error(r, kSecondRowSum);
  }
};

// ----------------------------------------------------------------------------- host side

// A checked call whose record is on its way to the host (GPU only).
struct PendingRecord {
  CheckNames names;
  int64_t n;
  at::Tensor host;  // the record, copied into pinned memory on the call's stream
#ifndef CDM_CUDA_EMULATE
  cudaEvent_t copied;
#endif
};

inline std::mutex& pending_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<PendingRecord>& pending_records() {
  static std::vector<PendingRecord> records;
  return records;
}

inline void raise_if_flagged(const ErrorRecord& r, const CheckNames& names, int64_t n, bool deferred) {
  if (r.bits == 0) return;
  const std::string message = describe(r, names, n);
  if (deferred) TORCH_CHECK_VALUE(false, message, " (cdm_kernels, CUDA: found by an earlier ", names.op, " call)");
  TORCH_CHECK_VALUE(false, message);
}

// Raises the first error among the records that have arrived (all of them when `wait`:
// waits for each copy); a record still on its way stays queued.
inline void raise_arrived_records(bool wait) {
  std::vector<PendingRecord> arrived;
  {
    std::lock_guard<std::mutex> lock(pending_mutex());
    std::vector<PendingRecord>& queue = pending_records();
    std::vector<PendingRecord> still;
    for (PendingRecord& r : queue) {
#ifndef CDM_CUDA_EMULATE
      if (wait) C10_CUDA_CHECK(cudaEventSynchronize(r.copied));
      if (cudaEventQuery(r.copied) != cudaSuccess) {
        still.push_back(std::move(r));
        continue;
      }
      C10_CUDA_CHECK(cudaEventDestroy(r.copied));
#endif
      arrived.push_back(std::move(r));
    }
    queue = std::move(still);
  }
  for (const PendingRecord& r : arrived) {
    raise_if_flagged(*static_cast<const ErrorRecord*>(r.host.data_ptr()), r.names, r.n, true);
  }
}

#ifndef CDM_CUDA_EMULATE
// op _raise_value_errors (cdm_kernels.check_value_errors) raises through this
inline const bool kDeferredHookSet = (deferred_value_errors() = [] { raise_arrived_records(true); }, true);
#endif

// The checks of one call around its launch.
class ValueChecks {
 public:
  // Raises the errors of earlier calls whose records have arrived; sets up this call's
  // record when the checks are on (record() is null otherwise).
  ValueChecks(const at::Tensor& like, CheckNames names, int64_t n) : names_(names), n_(n) {
    if (!value_checks_on()) return;
    raise_arrived_records(false);
    const auto pinned = at::TensorOptions().dtype(at::kLong).pinned_memory(like.is_cuda());
    at::Tensor init = at::empty({3}, pinned);
    int64_t* w = init.data_ptr<int64_t>();
    w[0] = 0;
    w[1] = std::numeric_limits<int64_t>::max();  // x_min
    w[2] = std::numeric_limits<int64_t>::min();  // x_max
    device_ = init.to(like.device(), /*non_blocking=*/true);
    record_ = static_cast<ErrorRecord*>(device_.data_ptr());
  }
  ErrorRecord* record() const { return record_; }

  // After the launch: reads the record (emulation: the kernels have run) or queues its
  // copy to the host.
  void finish() {
    if (record_ == nullptr) return;
#ifdef CDM_CUDA_EMULATE
    raise_if_flagged(*record_, names_, n_, false);
#else
    PendingRecord r{names_, n_, at::empty({3}, at::TensorOptions().dtype(at::kLong).pinned_memory(true)), nullptr};
    r.host.copy_(device_, /*non_blocking=*/true);
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&r.copied, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(r.copied, at::cuda::getCurrentCUDAStream().stream()));
    std::lock_guard<std::mutex> lock(pending_mutex());
    pending_records().push_back(std::move(r));
#endif
  }

 private:
  CheckNames names_;
  int64_t n_;
  at::Tensor device_;  // the record: 3 int64 words (bits, x_min, x_max)
  ErrorRecord* record_ = nullptr;
};

}  // namespace gpu
}  // namespace cdm
