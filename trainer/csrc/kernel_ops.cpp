// The training kernels of csrc/train_kernels.cu as autograd functions,
// launched through one launcher that Rust registers (trainer/src/
// train_kernels.rs compiles the kernels with NVRTC and launches them on
// libtorch's current stream). SwiGLU over the merged gate/up activation
// gu [.., 2F] -> [.., F]: the kernels on CUDA in bf16, else (or without a
// launcher) the tensor form silu(gate) * up with autograd's gradients. RoPE,
// the cross-entropy sum and RMSNorm with a bf16 output: kernels only; Rust
// calls them where they apply and uses the tensor forms elsewhere. No exception crosses into Rust (a failure is a non-zero return
// with the message in `err`).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <tuple>
#include <utility>

#include "kernel_args.h"
#include "shim_error.h"

namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using sigma_kernels::KernelArgs;
using sigma_kernels::Launcher;
std::atomic<Launcher> launcher{nullptr};

bool aligned(const at::Tensor& t) {
  return t.is_contiguous() && reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}


bool swiglu_kernel_takes(const at::Tensor& gu, int64_t f) {
  return launcher.load() != nullptr && gu.is_cuda() && gu.scalar_type() == at::kBFloat16 &&
         f % 8 == 0 && aligned(gu);
}

struct SwiGlu : public torch::autograd::Function<SwiGlu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gu) {
    ctx->save_for_backward({gu});
    const int64_t f = gu.size(-1) / 2;
    if (swiglu_kernel_takes(gu, f)) {
      auto sizes = gu.sizes().vec();
      sizes.back() = f;
      at::Tensor y = at::empty(sizes, gu.options());
      const int dev = static_cast<int>(gu.get_device());
      KernelArgs a{};
      a.op = 0, a.device = dev, a.a = gu.data_ptr(), a.out = y.data_ptr();
      a.rows = y.numel() / f, a.f = static_cast<int>(f);
      if (launch(a) == 0)
        return y;
      launcher.store(nullptr);  // reported once; the tensor form from now on
    }
    return at::silu(gu.narrow(-1, 0, f)) * gu.narrow(-1, f, f);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor gu = ctx->get_saved_variables()[0];
    const int64_t f = gu.size(-1) / 2;
    if (swiglu_kernel_takes(gu, f)) {
      const at::Tensor dy = grads[0].contiguous();
      if (aligned(dy)) {
        at::Tensor dgu = at::empty_like(gu);
        const int dev = static_cast<int>(gu.get_device());
        KernelArgs a{};
        a.op = 1, a.device = dev, a.a = dy.data_ptr(), a.b = gu.data_ptr(), a.out = dgu.data_ptr();
        a.rows = dy.numel() / f, a.f = static_cast<int>(f);
        if (launch(a) == 0)
          return {dgu};
        launcher.store(nullptr);
      }
    }
    const at::Tensor& dy = grads[0];
    const at::Tensor g = gu.narrow(-1, 0, f), u = gu.narrow(-1, f, f);
    const at::Tensor du = dy * at::silu(g);
    const at::Tensor dg = at::silu_backward(dy * u, g);
    return {at::cat({dg, du}, -1)};
  }
};

// x [b, t, heads, dim] contiguous bf16 on CUDA, tables [positions, dim].
at::Tensor rope_pass(int op, const at::Tensor& x, const at::Tensor& cs, const at::Tensor& sn,
                     int64_t start) {
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const auto s = xc.sizes();
  KernelArgs a{};
  a.op = op, a.device = static_cast<int>(xc.get_device());
  a.a = xc.data_ptr(), a.b = cs.data_ptr(), a.c = sn.data_ptr(), a.out = y.data_ptr();
  a.rows = s[0] * s[1] * s[2], a.f = static_cast<int>(s[3]);
  a.t = static_cast<int>(s[1]), a.heads = static_cast<int>(s[2]), a.start = static_cast<int>(start);
  if (!aligned(xc) || launch(a) != 0)
    throw std::runtime_error("the RoPE kernel failed (see the warning above)");
  return y;
}

struct Rope : public torch::autograd::Function<Rope> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cs,
                            const at::Tensor& sn, int64_t start) {
    ctx->saved_data["cs"] = cs;
    ctx->saved_data["sn"] = sn;
    ctx->saved_data["start"] = start;
    return rope_pass(2, x, cs, sn, start);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor dx = rope_pass(3, grads[0], ctx->saved_data["cs"].toTensor(),
                                    ctx->saved_data["sn"].toTensor(),
                                    ctx->saved_data["start"].toInt());
    return {dx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};
// Sum over rows of the cross-entropy of bf16 logits [rows, v] (contiguous,
// on CUDA, v a multiple of 8) against int64 targets [rows].
struct CrossEntropySum : public torch::autograd::Function<CrossEntropySum> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& targets, int64_t ignore, bool overwrite) {
    const at::Tensor t = targets.contiguous();
    const auto f32 = logits.options().dtype(at::kFloat);
    at::Tensor loss = at::empty({logits.size(0)}, f32), lse = at::empty({logits.size(0)}, f32);
    KernelArgs a{};
    a.op = 4, a.device = static_cast<int>(logits.get_device());
    a.a = logits.data_ptr(), a.b = t.data_ptr(), a.out = loss.data_ptr(), a.out2 = lse.data_ptr();
    a.rows = logits.size(0), a.cols = logits.size(1), a.ignore = ignore;
    if (launch(a) != 0)
      throw std::runtime_error("the cross-entropy kernel failed (see the warning above)");
    ctx->save_for_backward({logits, t, lse});
    ctx->saved_data["ignore"] = ignore;
    ctx->saved_data["overwrite"] = overwrite;
    return loss.sum();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const at::Tensor g = grads[0].to(at::kFloat).contiguous();
    // Logits made by the graph (not a leaf: the head's matmul) are read by
    // nothing after this, so the gradient overwrites them (each element is
    // read and then written by one thread): the head's backward does not
    // hold a second logits-sized buffer (4.2 GB for 16k tokens of a 128k
    // vocabulary), which is where training peaks. A leaf's storage may be
    // the caller's: it gets a buffer of its own.
    at::Tensor d = ctx->saved_data["overwrite"].toBool() ? logits : at::empty_like(logits);
    KernelArgs a{};
    a.op = 5, a.device = static_cast<int>(logits.get_device());
    a.a = logits.data_ptr(), a.b = saved[1].data_ptr(), a.c = saved[2].data_ptr();
    a.d = g.data_ptr(), a.out = d.data_ptr();
    a.rows = logits.size(0), a.cols = logits.size(1), a.ignore = ctx->saved_data["ignore"].toInt();
    if (launch(a) != 0)
      throw std::runtime_error("the cross-entropy kernel failed (see the warning above)");
    return {d, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The RMSNorm kernels, shared by both autograd functions below. Forward of
// fp32 x (contiguous) with w: {bf16 y, rstd}; with `add` (bf16, defined) the
// row normalised is x + add, written in fp32 to `sum` (allocated by the
// caller).
std::pair<at::Tensor, at::Tensor> norm_forward(const at::Tensor& x, const at::Tensor& w,
                                               double eps, const at::Tensor& add,
                                               const at::Tensor& sum) {
  const int64_t d = w.size(0), rows = x.numel() / d;
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  at::Tensor rstd = at::empty({rows}, x.options());
  KernelArgs a{};
  a.op = 6, a.device = static_cast<int>(x.get_device());
  a.a = x.data_ptr(), a.b = w.data_ptr(), a.out = y.data_ptr(), a.out2 = rstd.data_ptr();
  if (add.defined()) a.e = add.data_ptr(), a.out3 = sum.data_ptr();
  a.rows = rows, a.f = static_cast<int>(d), a.eps = static_cast<float>(eps);
  if (!aligned(x) || !aligned(w) || (add.defined() && !aligned(add)) || launch(a) != 0)
    throw std::runtime_error("the RMSNorm kernel failed (see the warning above)");
  return {y, rstd};
}

// A gradient as the kernels read it: `kind`, contiguous, 16-byte aligned.
at::Tensor kernel_input(const at::Tensor& g, at::ScalarType kind) {
  at::Tensor t = g.to(kind).contiguous();
  return aligned(t) ? t : t.clone();  // a fresh allocation is aligned
}

// Backward from dy (any dtype) at the normalised x: {dx fp32, dx in bf16
// (defined when `bf16_too`), the weight gradient}; `dres` (fp32, or
// undefined) is added to dx.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(const at::Tensor& dy_in,
                                                             const at::Tensor& x,
                                                             const at::Tensor& w,
                                                             const at::Tensor& rstd,
                                                             const at::Tensor& dres,
                                                             bool bf16_too) {
  const at::Tensor dy = kernel_input(dy_in, at::kBFloat16);
  const at::Tensor dr = dres.defined() ? kernel_input(dres, at::kFloat) : at::Tensor();
  const int64_t d = w.size(0), rows = x.numel() / d;
  const int64_t blocks = std::min<int64_t>(rows, 512);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dx16 = bf16_too ? at::empty(x.sizes(), x.options().dtype(at::kBFloat16)) : at::Tensor();
  at::Tensor part = at::empty({blocks, d}, x.options());
  KernelArgs a{};
  a.op = 7, a.device = static_cast<int>(x.get_device());
  a.a = dy.data_ptr(), a.b = x.data_ptr(), a.c = w.data_ptr(), a.d = rstd.data_ptr();
  a.e = dr.defined() ? dr.data_ptr() : nullptr;
  a.out = dx.data_ptr(), a.out2 = part.data_ptr(), a.out3 = bf16_too ? dx16.data_ptr() : nullptr;
  a.rows = rows, a.f = static_cast<int>(d), a.blocks = static_cast<int>(blocks);
  if (launch(a) != 0)
    throw std::runtime_error("the RMSNorm kernel failed (see the warning above)");
  return {dx, dx16, part.sum(0)};
}

// RMSNorm of fp32 x [.., d] with the fp32 weight w [d] into bf16 (x and w
// contiguous, 16-byte aligned, on CUDA; d a multiple of 4, at most 8,192),
// the gradients in fp32.
struct RmsNormBf16 : public torch::autograd::Function<RmsNormBf16> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            double eps) {
    const at::Tensor xc = x.contiguous();
    auto [y, rstd] = norm_forward(xc, w, eps, at::Tensor(), at::Tensor());
    ctx->save_for_backward({xc, w, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, unused, dw] = norm_backward(grads[0], saved[0], saved[1], saved[2], at::Tensor(), false);
    return {dx, dw, at::Tensor()};
  }
};

// The residual add before an RMSNorm and the norm in one kernel each way:
// (x fp32, y bf16, w) -> (s = x + y in fp32, RMSNorm(s) in bf16). Backward
// from (ds, dh): dx = ds + the norm's gradient, in fp32 and in bf16 for y,
// in the norm's backward kernel (no separate add of the two gradients of s
// and no cast for y).
struct AddRmsNormBf16 : public torch::autograd::Function<AddRmsNormBf16> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& y,
                               const at::Tensor& w, double eps) {
    const at::Tensor xc = x.contiguous();
    at::Tensor sum = at::empty_like(xc);
    auto [h, rstd] = norm_forward(xc, w, eps, y.contiguous(), sum);
    ctx->save_for_backward({sum, w, rstd});
    return {sum, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& s = saved[0];
    const at::Tensor dh = grads[1].defined()
                              ? grads[1]
                              : at::zeros(s.sizes(), s.options().dtype(at::kBFloat16));
    auto [dx, dy, dw] = norm_backward(dh, s, saved[1], saved[2], grads[0], true);
    return {dx, dy, dw, at::Tensor()};
  }
};
}  // namespace

extern "C" void sigma_kernel_ops_set_launcher(Launcher l) { launcher.store(l); }

namespace sigma_kernels {
bool ready() { return launcher.load() != nullptr; }
int launch(const KernelArgs& a) {
  Launcher l = launcher.load();
  return l == nullptr ? 1 : l(&a);
}
void disable() { launcher.store(nullptr); }
}  // namespace sigma_kernels

// silu(gu[.., :F]) * gu[.., F:] into the (allocated, undefined) handle `out`.
extern "C" int sigma_swiglu(void* gu, void* out, char* err, size_t err_len) {
  const auto& g = *static_cast<const at::Tensor*>(gu);
  if (g.dim() == 0 || g.size(-1) % 2 != 0) {
    sigma_shim::set_err(err, err_len, "SwiGLU: the last dimension must hold gate and up halves");
    return 1;
  }
  return sigma_shim::guarded(err, err_len,
                             [&] { *static_cast<at::Tensor*>(out) = SwiGlu::apply(g); });
}

// RoPE of x [b, t, heads, dim] at positions start.. with the tables cs, sn
// [positions, dim] (bf16, contiguous, on x's device) into `out`.
extern "C" int sigma_rope(void* x, void* cs, void* sn, long long start, void* out, char* err,
                          size_t err_len) {
  return sigma_shim::guarded(err, err_len, [&] {
    const auto& xt = *static_cast<const at::Tensor*>(x);
    const auto& ct = *static_cast<const at::Tensor*>(cs);
    const auto& st = *static_cast<const at::Tensor*>(sn);
    *static_cast<at::Tensor*>(out) = Rope::apply(xt, ct, st, static_cast<int64_t>(start));
  });
}

// Sum of the cross-entropy of `logits` [rows, v] against `targets` [rows]
// (see CrossEntropySum) into `out`.
extern "C" int sigma_cross_entropy_sum(void* logits, void* targets, long long ignore, void* out,
                                       char* err, size_t err_len) {
  return sigma_shim::guarded(err, err_len, [&] {
    const auto& l = *static_cast<const at::Tensor*>(logits);
    const auto& t = *static_cast<const at::Tensor*>(targets);
    // Made by the graph: not a leaf, nor a view of one (a view's storage is its base's).
    const bool made = !l.is_leaf() && !(l.is_view() && l._base().is_leaf());
    *static_cast<at::Tensor*>(out) =
        CrossEntropySum::apply(l, t, static_cast<int64_t>(ignore), made);
  });
}

// RMSNorm of `x` with the weight `w` and `eps`, in bf16 (see RmsNormBf16), into `out`.
extern "C" int sigma_rms_norm_bf16(void* x, void* w, double eps, void* out, char* err,
                                   size_t err_len) {
  return sigma_shim::guarded(err, err_len, [&] {
    const auto& xt = *static_cast<const at::Tensor*>(x);
    const auto& wt = *static_cast<const at::Tensor*>(w);
    *static_cast<at::Tensor*>(out) = RmsNormBf16::apply(xt, wt, eps);
  });
}

// x + y and RMSNorm of the sum with `w` and `eps` in bf16 (see AddRmsNormBf16),
// into `out_sum` and `out_norm`.
extern "C" int sigma_add_rms_norm_bf16(void* x, void* y, void* w, double eps, void* out_sum,
                                       void* out_norm, char* err, size_t err_len) {
  return sigma_shim::guarded(err, err_len, [&] {
    const auto& xt = *static_cast<const at::Tensor*>(x);
    const auto& yt = *static_cast<const at::Tensor*>(y);
    const auto& wt = *static_cast<const at::Tensor*>(w);
    auto r = AddRmsNormBf16::apply(xt, yt, wt, eps);
    *static_cast<at::Tensor*>(out_sum) = r[0];
    *static_cast<at::Tensor*>(out_norm) = r[1];
  });
}
