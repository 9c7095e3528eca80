// The value checks the kernels make in the passes they make anyway (cdm_kernels.set_value_checks):
// the switch, and the bits in which a call collects what it found before it raises.
#pragma once

#include <atomic>

namespace cdm {

// On by default; the op _set_value_checks (cdm_kernels.set_value_checks) sets it. Read at
// every call (one switch per library: _C, and the CUDA emulation's library).
inline std::atomic<bool>& value_checks_switch() {
  static std::atomic<bool> on{true};
  return on;
}
inline bool value_checks_on() { return value_checks_switch().load(std::memory_order_relaxed); }

// What a call found; each op raises ValueError naming its public argument (the messages of
// cdm_kernels/ops/_validation.py). The CPU kernels check the rows (the per-position values
// stay with the fronts there); the CUDA kernels check the positions too.
enum ValueErrorBit : int {
  kRowsNotFinite = 1,     // the input rows: NaN or +-inf (log p_0|t: NaN or +inf; -inf is probability 0)
  kSecondNotFinite = 2,   // the second input (the matching loss's target): NaN or +-inf
  kSecondNegative = 4,    // the target: a negative value
  kSecondRowSum = 8,      // the target: a row whose sum is more than 1e-2 from 1
  kTokenRange = 16,       // a token outside [0, N)
  kTauNotFinite = 32,     // tau (tau_t): NaN or +-inf
  kTauNegative = 64,      // tau < 0
  kTauSNotFinite = 128,   // the step's tau_s: NaN or +-inf
  kTauSNegative = 256,    // tau_s < 0
  kTauOrder = 512,        // tau_s >= tau_t
};

// Raises the errors that the CUDA kernels of earlier calls recorded and that have not been
// raised yet, waiting for them (set by the CUDA code; op _raise_value_errors).
inline void (*&deferred_value_errors())() {
  static void (*raise)() = nullptr;
  return raise;
}

// the target rows' tolerance on their sum (as the reference front checks it)
constexpr double kTargetSumTolerance = 1e-2;

}  // namespace cdm
