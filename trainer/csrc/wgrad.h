// The weight-gradient accumulation of linear_accum.cpp, for the other
// autograd linear (fp8_linear.cpp) whose bf16 weight gradient goes into the
// same fp32 gradient buffer, through the same queue of put-off GEMMs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace sigma_wgrad {

// main += g2^T x2: on CUDA with bf16/fp16 operands one GEMM with fp32
// output accumulating into `main`; elsewhere computed and added.
void accumulate(at::Tensor& main, const at::Tensor& g2, const at::Tensor& x2);

// Queue (main, g2, x2) on the WgradQueue `queue` (0: none) when it holds;
// false: the caller accumulates now.
bool offer(int64_t queue, const at::Tensor& main, const at::Tensor& g2, const at::Tensor& x2);

}  // namespace sigma_wgrad
