// Gradients of several outputs, each seeded with its own gradient, with
// respect to a list of inputs: torch::autograd::grad with grad_outputs,
// which tch does not bind (its run_backward seeds scalar roots with 1). The
// engine used to fold each output's gradient in as a root sum(out * g):
// one more multiplication and reduction per segment output in forward, and
// their backward, for the same numbers. No exception crosses into Rust.
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>

#include "shim_error.h"

#include <cstddef>
#include <vector>

// `outputs[i]` seeded with `grads[i]` (same shape and dtype); the gradients
// of `inputs` go into the (allocated, undefined) handles `results`,
// undefined where an input is unused. The graph is freed.
extern "C" int sigma_autograd_grad(void* const* outputs, void* const* grads, size_t n_out,
                                   void* const* inputs, size_t n_in, void* const* results,
                                   char* err, size_t err_len) {
  return sigma_shim::guarded(err, err_len, [&] {
    std::vector<at::Tensor> outs, gs, ins;
    for (size_t i = 0; i < n_out; ++i) {
      outs.push_back(*static_cast<const at::Tensor*>(outputs[i]));
      gs.push_back(*static_cast<const at::Tensor*>(grads[i]));
    }
    for (size_t i = 0; i < n_in; ++i) ins.push_back(*static_cast<const at::Tensor*>(inputs[i]));
    auto r = torch::autograd::grad(outs, ins, gs, /*retain_graph=*/false,
                                   /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0; i < n_in; ++i) *static_cast<at::Tensor*>(results[i]) = r[i];
  });
}

// Whether autograd records operations on this thread now (0 inside no_grad).
extern "C" int sigma_grad_enabled() { return c10::GradMode::is_enabled() ? 1 : 0; }
