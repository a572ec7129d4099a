// libtorch's fused AdamW (`_fused_adamw_`: one multi-tensor kernel reads the
// parameter, gradient and both moments once and writes them once), which tch
// does not bind. The tensors come as tch's handles (pointers to at::Tensor);
// no exception crosses into Rust (a failure is a non-zero return).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstddef>
#include <vector>

namespace {
std::vector<at::Tensor> list(void* const* ts, size_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) v.push_back(*static_cast<const at::Tensor*>(ts[i]));
  return v;
}
}  // namespace

// `n` parameter pieces with their gradient and moment pieces; `step` is the
// step count (a float tensor on their device, already incremented), read for
// every piece.
extern "C" int sigma_fused_adamw(void* const* params, void* const* grads, void* const* exp_avgs,
                                 void* const* exp_avg_sqs, size_t n, void* step, double lr,
                                 double beta1, double beta2, double weight_decay, double eps) {
  try {
    if (n == 0) return 0;
    auto p = list(params, n), g = list(grads, n), m = list(exp_avgs, n), v = list(exp_avg_sqs, n);
    std::vector<at::Tensor> steps(n, *static_cast<const at::Tensor*>(step));
    at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (...) {
    return 1;
  }
}
