// Every op signature of cdm_kernels, in one place (TORCH_LIBRARY schemas).
//
// Backends receive flattened, validated inputs (cdm_kernels/ops/*.py does the
// checks and the broadcasting):
//   scores / probabilities / vectors: (P, N) contiguous, float32, bfloat16, float16 or float64
//   x: (P,) int64 contiguous, values in [0, N)
//   tau, tau_t, tau_s: (P,) float64 contiguous
//   graph descriptor: family (0 uniform, 1 absorbing, 2 dense) and, for dense
//   graphs only, the float64 eigen-decomposition Q = V diag(evals) V^-1
//   (evals (N,), vecs V (N, N), vecs_inv V^-1 (N, N)); None otherwise.
// The kernels check the values they read (scores finite, a target of probabilities) in the
// pass they make anyway, and raise ValueError after it, while the switch that
// _set_value_checks sets is on (csrc/value_checks.h; cdm_kernels.set_value_checks).
// The CPU kernels live in csrc/cpu/, the CUDA kernels in csrc/cuda/.
#include <Python.h>
#include <torch/library.h>

#include "value_checks.h"

extern "C" {
// Importing cdm_kernels._C runs the static TORCH_LIBRARY registrations below;
// the module itself holds nothing (the ops live under torch.ops.cdm_kernels).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
void set_value_checks(bool enabled) { cdm::value_checks_switch().store(enabled); }
void raise_value_errors() {
  if (cdm::deferred_value_errors() != nullptr) cdm::deferred_value_errors()();
}
}  // namespace

TORCH_LIBRARY(cdm_kernels, m) {
  // the switch of the value checks inside the kernels (on by default)
  m.def("_set_value_checks(bool enabled) -> ()", &set_value_checks);
  // the errors the CUDA kernels recorded without a synchronisation, raised now (waits for them)
  m.def("_raise_value_errors() -> ()", &raise_value_errors);
  // out[p, a] = K(tau_p)[a, x_p]; (P, N) float32, or float64 when out_float64
  m.def(
      "transition_column(int family, Tensor? evals, Tensor? vecs, Tensor? vecs_inv, "
      "Tensor x, Tensor tau, int num_states, bool out_float64) -> Tensor");
  // K(tau)^T v (transpose) or K(tau) v along the last dim; v's dtype out
  m.def(
      "apply_kernel(int family, Tensor? evals, Tensor? vecs, Tensor? vecs_inv, "
      "Tensor v, Tensor tau, bool transpose) -> Tensor");
  // log p_0|t(. | x) from log-scores; log_score's dtype out
  m.def(
      "scores_to_posterior(int family, Tensor? evals, Tensor? vecs, Tensor? vecs_inv, "
      "Tensor log_score, Tensor x, Tensor tau) -> Tensor");
  // gradient w.r.t. log_score of <grad, scores_to_posterior(...)>, recomputing the forward
  m.def(
      "scores_to_posterior_backward(int family, Tensor? evals, Tensor? vecs, Tensor? vecs_inv, "
      "Tensor grad, Tensor log_score, Tensor x, Tensor tau) -> Tensor");
  // log-scores from log p_0|t (the forward map)
  m.def(
      "posterior_to_scores(int family, Tensor? evals, Tensor? vecs, Tensor? vecs_inv, "
      "Tensor log_p0, Tensor x, Tensor tau) -> Tensor");
  m.def(
      "posterior_to_scores_backward(int family, Tensor? evals, Tensor? vecs, Tensor? vecs_inv, "
      "Tensor grad, Tensor log_p0, Tensor x, Tensor tau) -> Tensor");
  // one reverse step; method 0 = analytic, 1 = euler. seed_offset: a CPU int64 tensor
  // [seed, offset] (a tensor, not ints, so torch.compile can trace its creation);
  // position p draws its uniform from Philox(seed, offset + p), as Triton's tl.rand.
  m.def(
      "fused_euler_step(int family, Tensor? evals, Tensor? vecs, Tensor? vecs_inv, "
      "Tensor log_score, Tensor x, Tensor tau_t, Tensor tau_s, int method, Tensor seed_offset) -> Tensor");
  // per-position cross-entropy of target against the inverted conditional; (P,) float32
  m.def(
      "conditional_matching_loss(int family, Tensor? evals, Tensor? vecs, Tensor? vecs_inv, "
      "Tensor log_score, Tensor x, Tensor tau, Tensor target) -> Tensor");
  // the loss and its gradient w.r.t. log_score for grad_loss = 1 ((P, N), log_score's dtype),
  // from one pass over the rows: what autograd runs when log_score requires grad
  m.def(
      "conditional_matching_loss_with_grad(int family, Tensor? evals, Tensor? vecs, Tensor? vecs_inv, "
      "Tensor log_score, Tensor x, Tensor tau, Tensor target) -> (Tensor, Tensor)");
  // gradient w.r.t. log_score given grad_loss (P,), recomputing the conditional
  m.def(
      "conditional_matching_loss_backward(int family, Tensor? evals, Tensor? vecs, Tensor? vecs_inv, "
      "Tensor grad_loss, Tensor log_score, Tensor x, Tensor tau, Tensor target) -> Tensor");
}
