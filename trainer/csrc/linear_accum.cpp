// A linear layer y = x w^T whose weight gradient goes straight into a
// gradient buffer of the master weights' dtype (fp32) in backward, instead
// of returning to autograd in the working weight's dtype (bf16) to be added
// into the buffer afterwards ("gradient-accumulation fusion"). On CUDA with
// bf16/fp16 operands and an fp32 buffer, one cuBLAS GEMM with fp32 output
// adds g^T x into the buffer (beta = 1): no bf16 weight gradient is
// written, read back and added. Elsewhere (CPU; a libtorch whose GEMM
// refuses) the weight gradient is computed in the operands' dtype and added,
// which is what autograd plus the add did. The weight itself gets no
// gradient through autograd. No exception crosses into Rust (a failure is a
// non-zero return with the message in `err`).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "shim_error.h"

#include <atomic>
#include <cstddef>
#include <cstring>
#include <string>

namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether libtorch's GEMM with an fp32 output and an fp32 addend over
// bf16/fp16 operands (`addmm.dtype_out`, torch >= 2.9) works here; cleared at
// its first refusal, after which the unfused form is used.
std::atomic<bool> fused_gemm_ok{true};

void accumulate(at::Tensor& main, const at::Tensor& g2, const at::Tensor& x2) {
  const auto op = g2.scalar_type();
  if (main.is_cuda() && main.scalar_type() == at::kFloat &&
      (op == at::kBFloat16 || op == at::kHalf) && fused_gemm_ok.load()) {
    try {
      at::addmm_out(main, main, g2.t(), x2, at::kFloat, /*beta=*/1, /*alpha=*/1);
      return;
    } catch (const c10::Error&) {
      fused_gemm_ok.store(false);
    }
  }
  main.add_(at::mm(g2.t(), x2));
}

struct LinearAccum : public torch::autograd::Function<LinearAccum> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& main) {
    ctx->save_for_backward({x, w});
    // Not a saved variable: the buffer is written in place between uses.
    ctx->saved_data["main"] = main;
    return at::linear(x, w);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    at::Tensor main = ctx->saved_data["main"].toTensor();
    const at::Tensor& gy = grads[0];
    at::Tensor gx;
    if (ctx->needs_input_grad(0)) gx = at::matmul(gy, w);
    accumulate(main, gy.reshape({-1, gy.size(-1)}), x.reshape({-1, x.size(-1)}));
    return {gx, at::Tensor(), at::Tensor()};
  }
};
}  // namespace

// y = x w^T into the (already allocated, undefined) tensor handle `out`;
// `main`: a view of the gradient buffer shaped like `w`.
extern "C" int sigma_linear_accum(void* x, void* w, void* main, void* out, char* err,
                                  size_t err_len) {
  return sigma_shim::guarded(err, err_len, [&] {
    const auto& xt = *static_cast<const at::Tensor*>(x);
    const auto& wt = *static_cast<const at::Tensor*>(w);
    const auto& mt = *static_cast<const at::Tensor*>(main);
    *static_cast<at::Tensor*>(out) = LinearAccum::apply(xt, wt, mt);
  });
}

// Whether the fused GEMM is in use (false after libtorch refused it once).
extern "C" int sigma_linear_accum_fused_gemm() { return fused_gemm_ok.load() ? 1 : 0; }
