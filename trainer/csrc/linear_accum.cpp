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
//
// A layer may be given a `WgradQueue`: while the queue holds (the engine
// sets it around a segment's backward that a tensor-parallel collective
// follows), backward computes only the input gradient and queues the
// weight-gradient GEMM; the engine starts the collective on the input
// gradient and then drains the queue, so the GEMMs run on the compute
// stream while the collective runs on the communication stream. The same
// GEMMs run in the same order per buffer either way: the numbers do not
// change.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "shim_error.h"
#include "wgrad.h"

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

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

// Weight-gradient GEMMs put off by backward while `hold` is set. Pushed by
// autograd's thread (on CUDA, its device thread), drained by the engine's.
struct WgradQueue {
  std::mutex mu;
  std::vector<std::array<at::Tensor, 3>> items;  // (main, g2, x2)
  std::atomic<bool> hold{false};
  std::atomic<uint64_t> drained{0};

  // Queue (main, g2, x2) if holding; false: the caller computes it now.
  bool offer(const at::Tensor& main, const at::Tensor& g2, const at::Tensor& x2) {
    if (!hold.load()) return false;
    std::lock_guard<std::mutex> lock(mu);
    items.push_back({main, g2, x2});
    return true;
  }
};

struct LinearAccum : public torch::autograd::Function<LinearAccum> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& main, int64_t queue) {
    ctx->save_for_backward({x, w});
    // Not a saved variable: the buffer is written in place between uses.
    ctx->saved_data["main"] = main;
    ctx->saved_data["queue"] = queue;
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
    const auto g2 = gy.reshape({-1, gy.size(-1)});
    const auto x2 = x.reshape({-1, x.size(-1)});
    auto* queue = reinterpret_cast<WgradQueue*>(ctx->saved_data["queue"].toInt());
    if (queue == nullptr || !queue->offer(main, g2, x2)) accumulate(main, g2, x2);
    return {gx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};
}  // namespace

namespace sigma_wgrad {
void accumulate(at::Tensor& main, const at::Tensor& g2, const at::Tensor& x2) {
  ::accumulate(main, g2, x2);
}
bool offer(int64_t queue, const at::Tensor& main, const at::Tensor& g2, const at::Tensor& x2) {
  auto* q = reinterpret_cast<WgradQueue*>(queue);
  return q != nullptr && q->offer(main, g2, x2);
}
}  // namespace sigma_wgrad

// y = x w^T into the (already allocated, undefined) tensor handle `out`;
// `main`: a view of the gradient buffer shaped like `w`; `queue`: a
// WgradQueue that outlives the graph, or null.
extern "C" int sigma_linear_accum(void* x, void* w, void* main, void* queue, void* out,
                                  char* err, size_t err_len) {
  return sigma_shim::guarded(err, err_len, [&] {
    const auto& xt = *static_cast<const at::Tensor*>(x);
    const auto& wt = *static_cast<const at::Tensor*>(w);
    const auto& mt = *static_cast<const at::Tensor*>(main);
    const auto q = static_cast<int64_t>(reinterpret_cast<intptr_t>(queue));
    *static_cast<at::Tensor*>(out) = LinearAccum::apply(xt, wt, mt, q);
  });
}

extern "C" void* sigma_wgrad_queue_new() { return new WgradQueue(); }

extern "C" void sigma_wgrad_queue_free(void* q) { delete static_cast<WgradQueue*>(q); }

extern "C" void sigma_wgrad_queue_hold(void* q, int on) {
  static_cast<WgradQueue*>(q)->hold.store(on != 0);
}

// Run the queued weight-gradient GEMMs in the order they were queued, on the
// calling thread's current stream; the queue is empty afterwards, also on failure.
extern "C" int sigma_wgrad_queue_drain(void* q, char* err, size_t err_len) {
  auto* queue = static_cast<WgradQueue*>(q);
  std::vector<std::array<at::Tensor, 3>> items;
  {
    std::lock_guard<std::mutex> lock(queue->mu);
    items.swap(queue->items);
  }
  return sigma_shim::guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;  // as inside backward, where the GEMMs were put off
    for (auto& it : items) {
      accumulate(it[0], it[1], it[2]);
      queue->drained.fetch_add(1);
    }
  });
}

// Drop the queued GEMMs without running them (after a failed backward).
extern "C" void sigma_wgrad_queue_clear(void* q) {
  auto* queue = static_cast<WgradQueue*>(q);
  std::lock_guard<std::mutex> lock(queue->mu);
  queue->items.clear();
}

extern "C" uint64_t sigma_wgrad_queue_drained(void* q) {
  return static_cast<WgradQueue*>(q)->drained.load();
}

// Whether the fused GEMM is in use (false after libtorch refused it once).
extern "C" int sigma_linear_accum_fused_gemm() { return fused_gemm_ok.load() ? 1 : 0; }
