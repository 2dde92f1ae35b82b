// Host entry points implemented in the .cu files and called by fbp_binding.cpp
// after it has checked the arguments (shapes, dtypes, devices) and set the device.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fbp {

// Fused forward.  x (rows, m), y (rows, n), weights (K, m)/(K, n) with any strides;
// biases contiguous (K) or undefined.  Writes out (rows, o) and, when normalize,
// norm (rows) = ||t|| unclamped in the accumulation dtype.  rows > 0.
void forward_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight_x,
                  const at::Tensor& weight_y, const at::Tensor& bias_x,
                  const at::Tensor& bias_y, int64_t factor, double dropout,
                  std::optional<int64_t> seed, bool normalize, double eps, at::Tensor& out,
                  at::Tensor& norm);

// dL/ds (rows, o) in the accumulation dtype, from g = dL/dz, z and ||t||.
at::Tensor grad_pooled_cuda(const at::Tensor& grad, const at::Tensor& out,
                            const at::Tensor& norm, double eps);

// da = dp * c and dc = dp * a, (rows, K) each in the input dtype, with the
// projections recomputed tile by tile and dp = ds repeated over each factor group
// (times the dropout keep-mask / (1 - rate)).
void projection_grads_cuda(const at::Tensor& ds, const at::Tensor& x, const at::Tensor& y,
                           const at::Tensor& weight_x, const at::Tensor& weight_y,
                           const at::Tensor& bias_x, const at::Tensor& bias_y,
                           int64_t factor, double dropout, std::optional<int64_t> seed,
                           at::Tensor& da, at::Tensor& dc);

// Keep-mask of the dropout for the linear element indices in `index` (int64).
at::Tensor dropout_keep_cuda(const at::Tensor& index, int64_t seed, double rate);

}  // namespace fbp
