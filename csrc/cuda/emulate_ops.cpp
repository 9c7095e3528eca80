// The op library cdm_emu of the CPU emulation of the CUDA kernels (cuda/emulate.h): the
// schemas of cdm_kernels (csrc/ops.cpp), copied at load time from the dispatcher under
// the namespace cdm_emu, so that the .cu files built with -DCDM_CUDA_EMULATE register
// their kernels (CDM_CUDA_IMPL = TORCH_LIBRARY_IMPL(cdm_emu, CPU, m)) for CPU tensors.
// Load cdm_kernels._C first. Built only by .ci/cuda_emulation_check.sh; an empty file in
// every other build. Besides the ops: _set_value_checks (this library's own switch of the
// kernels' value checks), _row_plan (the shared-memory plan of a row kernel, for tests) and
// _traffic_start / _traffic_stop (the global-memory bytes the kernels move, per tensor).
#ifdef CDM_CUDA_EMULATE

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/cuda_common.cuh"
#include "value_checks.h"

namespace {

constexpr const char* kOps[] = {
    "transition_column",         "apply_kernel",
    "scores_to_posterior",       "scores_to_posterior_backward",
    "posterior_to_scores",       "posterior_to_scores_backward",
    "fused_euler_step",          "conditional_matching_loss",
    "conditional_matching_loss_with_grad", "conditional_matching_loss_backward",
};

// "cdm_kernels::op(args) -> ret" as "op(args) -> ret"
std::string schema_of(const char* op) {
  const auto handle = c10::Dispatcher::singleton().findSchema({std::string("cdm_kernels::") + op, ""});
  TORCH_CHECK(handle.has_value(), "cdm_emu: load cdm_kernels._C first (no schema for cdm_kernels::", op, ")");
  std::ostringstream out;
  out << handle->schema();
  const std::string s = out.str();
  const std::string prefix = "cdm_kernels::";
  return s.compare(0, prefix.size(), prefix) == 0 ? s.substr(prefix.size()) : s;
}

void set_value_checks(bool enabled) { cdm::value_checks_switch().store(enabled); }

// [rows cached, block bytes, blocks per SM] of plan_smem for n states of `dtype`, with
// segment stats or not, asking for cache_rows rows (rows cached < cache_rows: a later
// pass reads the row again from global memory)
std::vector<int64_t> row_plan(int64_t n, at::ScalarType dtype, bool stats, int64_t cache_rows) {
  using namespace cdm::gpu;
  std::vector<int64_t> out;
  dispatch_rows(dtype, true, n, [&]<class S, bool AL, int W>() {
    const SmemPlan plan = plan_smem<S, W>(n, stats, static_cast<int>(cache_rows));
    out = {plan.cache_rows, plan.block_bytes, smem_limits().per_sm / std::max<int64_t>(plan.block_bytes + 1024, 1)};
  });
  return out;
}

// Counts the global-memory bytes the kernels move from here on, per tensor of `tensors`
// (its storage's bytes), until _traffic_stop.
void traffic_start(const std::vector<at::Tensor>& tensors) {
  emu::Traffic& t = emu::traffic();
  t.ranges.clear();
  for (const at::Tensor& x : tensors) {
    auto range = std::make_unique<emu::Traffic::Range>();
    range->lo = static_cast<const unsigned char*>(x.storage().data());
    range->hi = range->lo + x.storage().nbytes();
    t.ranges.push_back(std::move(range));
  }
  t.other_loads = 0;
  t.other_stores = 0;
  t.on = true;
}

// [loads, stores] in bytes of each tensor given to _traffic_start, then of everything else
std::vector<int64_t> traffic_stop() {
  emu::Traffic& t = emu::traffic();
  std::vector<int64_t> out;
  for (const auto& r : t.ranges) {
    out.push_back(r->loads.load());
    out.push_back(r->stores.load());
  }
  out.push_back(t.other_loads.load());
  out.push_back(t.other_stores.load());
  t.on = false;
  t.ranges.clear();
  return out;
}

}  // namespace

TORCH_LIBRARY(cdm_emu, m) {
  for (const char* op : kOps) m.def(schema_of(op).c_str());
  m.def("_set_value_checks(bool enabled) -> ()", &set_value_checks);
  m.def("_row_plan(int n, ScalarType dtype, bool stats, int cache_rows) -> int[]", &row_plan);
  m.def("_traffic_start(Tensor[] tensors) -> ()", &traffic_start);
  m.def("_traffic_stop() -> int[]", &traffic_stop);
}

#endif  // CDM_CUDA_EMULATE
