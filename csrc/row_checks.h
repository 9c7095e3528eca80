// Argument checks shared by the CPU and CUDA backends (each adds its device check).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace cdm {

// (P, N) contiguous rows of a floating dtype the kernels take, with at least 2 states
inline void check_row_layout(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2, "cdm_kernels: ", what, " must be (P, N), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "cdm_kernels: ", what, " must be contiguous");
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, "cdm_kernels: ", what,
              " must be float32, float64, bfloat16 or float16, got ", s);
  TORCH_CHECK(t.size(1) >= 2, "cdm_kernels: ", what, " needs at least 2 states, got ", t.size(1));
}

// a second (P, N) input of the same shape as `like`
inline void check_same_shape(const at::Tensor& a, const at::Tensor& like, const char* what) {
  TORCH_CHECK(a.sizes() == like.sizes(), "cdm_kernels: ", what, " must have shape ", like.sizes(), ", got ", a.sizes());
}

}  // namespace cdm
