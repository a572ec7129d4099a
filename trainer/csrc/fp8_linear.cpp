// FP8 linear layer y = x w^T (train.precision = "fp8", docs/precision.md) as
// an autograd function: the forward GEMM and the input-gradient GEMM run on
// FP8 operands scaled from their amax, with fp32 accumulation; the
// weight-gradient GEMM in FP8 too or in bf16 (fp8.weight_grad).
//
// Scaling ("current" scaling: from the tensor being cast, every time):
//   scale = fmax * 2^-margin / amax   (1 where amax = 0; at most FLT_MAX)
//   q     = cast(clamp(x * scale, -fmax, fmax))   (round to nearest even)
// with fmax the format's largest finite value (e4m3fn 448, e5m2 57344) and
// amax over the whole tensor (tensorwise) or over each row (rowwise). A
// GEMM takes the dequantisation scales 1 / scale, as `at::_scaled_mm` does:
//   a (x) b = (sum_k a_q[m,k] b_q[k,n]) * (sa * sb)     in fp32.
// Two ways to compute that product, chosen by the caller:
//   kScaledMm: at::_scaled_mm, the FP8 tensor-core GEMM on CUDA (compute
//              capability 8.9 or later). libtorch also runs it on the CPU
//              for tensorwise scales, which is how CI checks this path's
//              operand layouts and scale convention; rowwise needs CUDA.
//   kEmulated: the FP8 operands converted to fp32 (exactly) and multiplied
//              by at::mm in fp32, then the scales applied: the same numbers
//              up to the order of the fp32 sums. For CPUs and tests.
// On a GPU in bf16, the quantisation runs as two kernels of
// csrc/train_kernels.cu (fp8_amax, then fp8_cast, which also writes the
// transposed copy a weight-gradient GEMM reads), computing the same bytes
// as the tensor form below; elsewhere (CPU, fp32, odd widths) the tensor
// form runs. `SIGMA_TRAIN_KERNELS=off` turns the kernels off.
// Operand layouts are those _scaled_mm wants (a row-major, b column-major),
// in both modes, so the emulation also exercises them.
//
// The weight is quantised once per optimizer step by the caller (Rust,
// model/fp8.rs) with `sigma_fp8_quantize`: wq [N, K] for the forward
// (b = wq^T, column-major) and wt [K, N] = W^T quantised for the input
// gradient (b = wt^T); for tensorwise scaling wt is wq transposed with the
// same scale, for rowwise W^T quantised per row (per column of W).
//
// Backward: gx = gy w with gy quantised to the gradient format (scales per
// tensor or per row of gy); the weight gradient gy^T x either in FP8 (gy^T
// and x quantised along the token dimension: for tensorwise the forward's
// quantised x and the quantised gy, transposed; for rowwise requantised per
// row of gy^T and x^T) or in bf16 from the bf16 x; it is added into `main`
// (a view of the fp32 gradient buffer, the gradient sink) when one is given
// (a bf16 one through the queue of put-off GEMMs, as linear_accum.cpp does),
// else returned through `w` (the bf16 working weight) in its dtype.
// No exception crosses into Rust.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "kernel_args.h"
#include "shim_error.h"
#include "wgrad.h"

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kE4m3 = 0;  // formats, as Rust's kernels::fp8::Format
constexpr int64_t kEmulated = 0;  // GEMMs, as Rust's kernels::fp8::Gemm
constexpr int64_t kScaledMm = 1;

at::ScalarType format(int64_t f) {
  return f == kE4m3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2;
}

double fmax_of(at::ScalarType t) { return t == at::kFloat8_e4m3fn ? 448.0 : 57344.0; }

// (q, dequantisation scale) of 2-D `x`: one scale ([]) or one per row
// ([rows, 1]), from x's amax or, when `given` is defined, from that amax
// (of the scale's shape): an amax below x's saturates the values past it.
// The tensor form: the rule as libtorch operations (see `Quantizer` for the
// kernels that training uses where they apply).
std::pair<at::Tensor, at::Tensor> quantize(const at::Tensor& x, at::ScalarType fmt, bool rows,
                                           int64_t margin, const at::Tensor& given = {}) {
  const double top = std::ldexp(fmax_of(fmt), -static_cast<int>(margin));
  const auto xf = x.to(at::kFloat);
  const auto amax = given.defined() ? given.to(at::kFloat)
                    : rows          ? xf.abs().amax({1}, /*keepdim=*/true)
                                    : xf.abs().amax();
  // One correctly rounded division (top is exact in fp32); amax = 0 gives
  // inf there, replaced by 1.
  const auto scale =
      at::where(amax > 0, at::full_like(amax, top) / amax, at::ones_like(amax)).clamp_max(FLT_MAX);
  const double fmax = fmax_of(fmt);
  auto q = (xf * scale).clamp(-fmax, fmax).to(fmt).contiguous();
  return {q, at::reciprocal(scale)};
}

// What one amax (and scale) covers in a `quantize_2d`: the whole tensor, a
// row, or a column (the rowwise scaling of x^T, which is written transposed).
enum Amax : int { kTensor = 0, kRows = 1, kCols = 2 };
// Which way `quantize_2d` computes: the kernels where they take the tensor
// (else the tensor form), the tensor form only, or the kernels only.
enum Path : int { kAuto = 0, kTensorForm = 1, kKernels = 2 };

// x [rows, cols] quantised with scales per `Amax`: q [rows, cols] (kTensor,
// kRows), its transpose qt [cols, rows] (kTensor, kCols: then the rows of
// qt are what one scale covers), and the dequantisation scales: [] for
// kTensor, [rows, 1] for kRows, [cols, 1] for kCols (a scale per row of qt).
struct Quantized {
  at::Tensor q, qt, scale;
};

// The kernels of csrc/train_kernels.cu (fp8_amax, fp8_cast, and their fp32
// forms) take x: a registered launcher, bf16 or fp32 on CUDA, contiguous
// and 16-byte aligned, columns a multiple of 8, and for a transposed output
// rows a multiple of 16; row tiles within the grid's limit.
bool kernels_take(const at::Tensor& x, bool transposed) {
  const auto rows = x.size(0), cols = x.size(1);
  const auto t = x.scalar_type();
  return sigma_kernels::ready() && x.is_cuda() && (t == at::kBFloat16 || t == at::kFloat) &&
         x.is_contiguous() && reinterpret_cast<std::uintptr_t>(x.data_ptr()) % 16 == 0 &&
         rows > 0 && cols > 0 && cols % 8 == 0 && (!transposed || rows % 16 == 0) &&
         (rows + 63) / 64 <= 65535;
}

// The kernels' `quantize_2d`; false (nothing usable) where a launch failed,
// which turns the kernels off for the process (the launcher reported it).
bool quantize_kernels(const at::Tensor& x, at::ScalarType fmt, Amax kind, int64_t margin,
                      bool want_q, bool want_qt, Quantized& out) {
  const auto rows = x.size(0), cols = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t n = kind == kTensor ? 1 : kind == kRows ? rows : cols;
  const at::Tensor amax = at::zeros({n}, f32);
  const bool from_f32 = x.scalar_type() == at::kFloat;  // ops 10, 11: the fp32 kernels
  sigma_kernels::KernelArgs a{};
  a.op = from_f32 ? 10 : 8, a.device = static_cast<int>(x.get_device());
  a.a = x.data_ptr(), a.out = amax.data_ptr(), a.rows = rows, a.cols = cols, a.f = kind;
  if (sigma_kernels::launch(a) != 0) {
    sigma_kernels::disable();
    return false;
  }
  const auto bytes = x.options().dtype(fmt);
  if (want_q) out.q = at::empty({rows, cols}, bytes);
  if (want_qt) out.qt = at::empty({cols, rows}, bytes);
  const at::Tensor inv = at::empty({n}, f32);
  sigma_kernels::KernelArgs c{};
  c.op = from_f32 ? 11 : 9, c.device = a.device, c.a = x.data_ptr(), c.b = amax.data_ptr();
  c.out = want_q ? out.q.data_ptr() : nullptr;
  c.out2 = want_qt ? out.qt.data_ptr() : nullptr;
  c.out3 = inv.data_ptr();
  c.rows = rows, c.cols = cols, c.f = kind, c.t = fmt == at::kFloat8_e5m2 ? 1 : 0;
  c.eps = static_cast<float>(std::ldexp(fmax_of(fmt), -static_cast<int>(margin)));
  if (sigma_kernels::launch(c) != 0) {
    sigma_kernels::disable();
    return false;
  }
  out.scale = kind == kTensor ? inv.squeeze(0) : inv.view({n, 1});
  return true;
}

// x (2-D) quantised as `Quantized` says, by `path`. The kernels compute the
// tensor form's numbers bit for bit (scripts/test-gpu.sh checks it through
// `sigma bench fp8`).
Quantized quantize_2d(const at::Tensor& x, at::ScalarType fmt, Amax kind, int64_t margin,
                      bool want_q, bool want_qt, Path path = kAuto) {
  TORCH_CHECK(x.dim() == 2, "FP8 quantisation of a ", x.dim(), "-D tensor (2-D expected)");
  TORCH_CHECK(!(kind == kRows && want_qt) && !(kind == kCols && want_q),
              "FP8 quantisation: per-row scales give q only, per-column ones qt only");
  Quantized out;
  if (path != kTensorForm && kernels_take(x, want_qt) &&
      quantize_kernels(x, fmt, kind, margin, want_q, want_qt, out)) {
    return out;
  }
  TORCH_CHECK(path != kKernels, "the FP8 quantisation kernels do not take this tensor (",
              x.sizes(), ", ", x.scalar_type(), ", ", x.device(),
              "): they need bf16 or fp32 on a GPU, columns a multiple of 8 and, transposed, "
              "rows a multiple of 16");
  if (kind == kCols) {
    std::tie(out.qt, out.scale) = quantize(x.t().contiguous(), fmt, true, margin);
    return out;
  }
  std::tie(out.q, out.scale) = quantize(x, fmt, kind == kRows, margin);
  if (want_qt) out.qt = out.q.t().contiguous();
  if (!want_q) out.q = at::Tensor();
  return out;
}

// a [M, K] row-major, b [K, N] column-major (FP8), sa [] or [M, 1], sb [] or [1, N].
// `fast`: the tensor cores' fast accumulation (on CUDA; ignored elsewhere).
at::Tensor gemm(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                const at::Tensor& sb, at::ScalarType out, int64_t mode, bool fast = false) {
  if (mode == kScaledMm) {
    return at::_scaled_mm(a, b, sa, sb, std::nullopt, std::nullopt, out,
                          /*use_fast_accum=*/fast && a.is_cuda());
  }
  const auto acc = at::mm(a.to(at::kFloat), b.to(at::kFloat));
  return (acc * (sa * sb)).to(out);
}

struct Opts {
  bool rows;       // rowwise scaling (else tensorwise)
  int64_t grad;    // format of output gradients (kE4m3 or e5m2)
  bool wgrad_fp8;  // the weight-gradient GEMM in FP8 (else bf16)
  int64_t margin;  // amax margin: scales 2^-margin smaller
  int64_t mode;    // kEmulated or kScaledMm
};

Opts opts_of(AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  return {d["rows"].toBool(), d["grad"].toInt(), d["wgrad_fp8"].toBool(), d["margin"].toInt(),
          d["mode"].toInt()};
}

// The weight gradient gy^T x [N, K] by FP8 GEMM: fp32 for tensorwise scales,
// bf16 for rowwise ones (the only output _scaled_mm's rowwise kernels write).
// `g`: gy quantised tensorwise with its transpose (tensorwise only); `xs`,
// `sx`: what forward kept (the quantised x^T [K, M] and its scale, or the
// bf16 x [M, K]).
at::Tensor wgrad_fp8(const Opts& o, const at::Tensor& gy2, const Quantized& g, const at::Tensor& xs,
                     const at::Tensor& sx) {
  if (!o.rows) {
    // gy^T [N, M] row-major; x [M, K] column-major: x^T [K, M] row-major.
    return gemm(g.qt, g.scale, xs.t(), sx, at::kFloat, o.mode);
  }
  // Rowwise along the tokens: a scale per column of gy and of x, each
  // written transposed (gy^T [N, M], x^T [K, M]).
  const auto a = quantize_2d(gy2, format(o.grad), kCols, o.margin, false, true);
  const auto b = quantize_2d(xs, at::kFloat8_e4m3fn, kCols, o.margin, false, true);
  return gemm(a.qt, a.scale, b.qt.t(), b.scale.view({1, -1}), at::kBFloat16, o.mode);
}

// Whether the layer keeps the quantised x for backward: tensorwise FP8
// weight gradients reuse it (half the bytes of bf16), transposed as that
// GEMM reads it; every other case keeps the bf16 x.
bool keeps_quantised_x(bool rows, bool wgrad_fp8) { return !rows && wgrad_fp8; }

// The layer's input x2 [M, K] quantised as its forward does: e4m3, one scale
// or one per row, with the transpose where `keeps_quantised_x`. Layers that
// read one input (q, k and v) take it made once (`sigma_fp8_quantize_input`).
Quantized quantize_input(const at::Tensor& x2, bool rows, bool wgrad_fp8, int64_t margin) {
  return quantize_2d(x2, at::kFloat8_e4m3fn, rows ? kRows : kTensor, margin, true,
                     keeps_quantised_x(rows, wgrad_fp8));
}

// The tensorwise FP8 weight gradient added into `main` by the GEMM itself
// (cuBLASLt with beta = 1: the launcher's operation 13,
// trainer/src/kernels/fp8_wgrad.rs) instead of an fp32 product and an add.
// The first call with a nonzero finite product checks it against that
// product and add (within 1e-3 of the product's largest value: a wrong
// layout or scale is off by far more, fp32 rounding is not) and keeps to
// them from then on where it differs or fails (a warning says so; a
// failure does not turn the training kernels off, as a failed kernel
// launch does). False: not taken for this call, nothing done.
enum LtState : int { kLtUntried = 0, kLtOn = 1, kLtOff = 2 };
std::atomic<int> lt_state{kLtUntried};
constexpr int64_t kLtWorkspace = 32 << 20;

bool lt_launch(at::Tensor& dst, const Quantized& g, const at::Tensor& xs, const at::Tensor& sx) {
  const auto ws = at::empty({kLtWorkspace}, dst.options().dtype(at::kByte));
  sigma_kernels::KernelArgs a{};
  a.op = 13, a.device = static_cast<int>(dst.get_device());
  a.a = xs.data_ptr(), a.b = g.qt.data_ptr(), a.c = sx.data_ptr(), a.d = g.scale.data_ptr();
  a.e = ws.data_ptr(), a.blocks = static_cast<int>(kLtWorkspace), a.out = dst.data_ptr();
  a.rows = xs.size(1), a.cols = xs.size(0), a.ignore = g.qt.size(0);
  a.t = g.qt.scalar_type() == at::kFloat8_e5m2 ? 1 : 0;
  return sigma_kernels::launch(a) == 0;
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

// The first call: the GEMM into `main` itself (the pointer later calls
// use), then held to `before + product`. Undecided where the product is 0
// or not finite (no evidence either way): that call keeps the reference.
void first_wgrad_into_main(const Opts& o, at::Tensor& main, const at::Tensor& gy2,
                           const Quantized& g, const at::Tensor& xs, const at::Tensor& sx) {
  const auto product = wgrad_fp8(o, gy2, g, xs, sx);
  const auto before = main.clone();
  const bool launched = lt_launch(main, g, xs, sx);
  const auto expected = before + product;
  const double top = product.abs().max().item<double>();
  if (!launched) {  // the launcher printed why; nothing was enqueued
    lt_state.store(kLtOff);
    main.copy_(expected);
    return;
  }
  const double err = (main - expected).abs().max().item<double>();
  if (!std::isfinite(top) || top == 0) {
    main.copy_(expected);
  } else if (std::isfinite(err) && err <= 1e-3 * top) {
    int untried = kLtUntried;
    lt_state.compare_exchange_strong(untried, kLtOn);
  } else {
    lt_state.store(kLtOff);
    fprintf(stderr,
            "warning: the FP8 weight gradient's cuBLASLt GEMM differs from _scaled_mm's "
            "(largest difference %g, product up to %g): _scaled_mm and an add from now on\n",
            err, top);
    main.copy_(expected);
  }
}

bool wgrad_into_main(const Opts& o, at::Tensor& main, const at::Tensor& gy2, const Quantized& g,
                     const at::Tensor& xs, const at::Tensor& sx) {
  const int state = lt_state.load();
  if (state == kLtOff || o.rows || o.mode != kScaledMm || !main.is_cuda() ||
      !sigma_kernels::ready() || main.scalar_type() != at::kFloat || !main.is_contiguous() ||
      !g.qt.is_contiguous() || !xs.is_contiguous() || xs.size(1) != g.qt.size(1) ||
      main.size(0) != g.qt.size(0) || main.size(1) != xs.size(0) || !aligned16(main) ||
      !aligned16(xs) || !aligned16(g.qt)) {
    return false;  // this call only (FP8 GEMMs need 16-byte aligned operands)
  }
  if (state == kLtOn) {
    if (lt_launch(main, g, xs, sx)) return true;
    lt_state.store(kLtOff);
    return false;
  }
  first_wgrad_into_main(o, main, gy2, g, xs, sx);
  return true;
}

struct Fp8Linear : public torch::autograd::Function<Fp8Linear> {
  // `pq`, `pqt`, `ps`: x already quantised by `quantize_input` (q, its
  // transpose or undefined, scale), or undefined: quantised here.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& wq, const at::Tensor& wq_scale,
                            const at::Tensor& wt, const at::Tensor& wt_scale,
                            const std::optional<at::Tensor>& main, int64_t queue, bool rows,
                            int64_t grad, bool wgrad_fp8, int64_t margin, bool fast,
                            int64_t mode, const std::optional<at::Tensor>& pq,
                            const std::optional<at::Tensor>& pqt,
                            const std::optional<at::Tensor>& ps) {
    const auto k = x.size(-1);
    const auto x2 = x.reshape({-1, k}).contiguous();
    const bool keep_q = keeps_quantised_x(rows, wgrad_fp8);
    Quantized xq;
    if (pq.has_value() && pq->defined()) {
      xq.q = *pq;
      xq.qt = pqt.has_value() ? *pqt : at::Tensor();
      xq.scale = ps.has_value() ? *ps : at::Tensor();
      // What `quantize_input` makes for this recipe: q [M, K] e4m3, the
      // transpose [K, M] where kept, one scale or one per row.
      const auto m = x2.size(0);
      const bool scale_ok = xq.scale.defined() &&
                            (rows ? xq.scale.sizes() == at::IntArrayRef({m, 1})
                                  : xq.scale.dim() == 0);
      const bool qt_ok = !keep_q || (xq.qt.defined() && xq.qt.size(0) == k && xq.qt.size(1) == m);
      TORCH_CHECK(xq.q.sizes() == x2.sizes() && xq.q.scalar_type() == at::kFloat8_e4m3fn &&
                      scale_ok && qt_ok,
                  "FP8 linear: the input quantised beforehand (", xq.q.sizes(),
                  ", its transpose ", xq.qt.defined() ? "given" : "missing", ", scale ",
                  xq.scale.defined() ? xq.scale.sizes() : at::IntArrayRef({}),
                  ") is not what this recipe quantises the input ", x2.sizes(), " into");
    } else {
      xq = quantize_input(x2, rows, wgrad_fp8, margin);
    }
    const auto sw = rows ? wq_scale.view({1, -1}) : wq_scale;
    auto y = gemm(xq.q, xq.scale, wq.t(), sw, w.scalar_type(), mode, fast);
    ctx->save_for_backward({keep_q ? xq.qt : x2, keep_q ? xq.scale : at::Tensor(), wt, wt_scale});
    // Not a saved variable: the buffer is written in place between uses.
    ctx->saved_data["main"] = main.has_value() ? c10::IValue(*main) : c10::IValue();
    ctx->saved_data["queue"] = queue;
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["grad"] = grad;
    ctx->saved_data["wgrad_fp8"] = wgrad_fp8;
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(w.scalar_type());
    auto sizes = x.sizes().vec();
    sizes.back() = wq.size(0);
    return y.view(sizes);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto o = opts_of(ctx);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& xs = saved[0];  // x2 (bf16) or its FP8 form
    const at::Tensor& sx = saved[1];
    const at::Tensor& wt = saved[2];
    const at::Tensor& wt_scale = saved[3];
    const auto& m = ctx->saved_data["main"];
    at::Tensor main = m.isNone() ? at::Tensor() : m.toTensor();
    const auto n = wt.size(1);
    const auto gy2 = grads[0].reshape({-1, n}).contiguous();
    const bool want_w = main.defined() || ctx->needs_input_grad(1);
    // gy quantised along its rows: the input gradient's operand, and for
    // tensorwise scaling (one scale) the weight gradient's too, transposed.
    const bool want_gx = ctx->needs_input_grad(0);
    const bool want_gt = want_w && o.wgrad_fp8 && !o.rows;
    Quantized g;
    if (want_gx || want_gt) {
      g = quantize_2d(gy2, format(o.grad), o.rows ? kRows : kTensor, o.margin, want_gx, want_gt);
    }
    at::Tensor gx;
    if (want_gx) {
      const auto sw = o.rows ? wt_scale.view({1, -1}) : wt_scale;
      gx = gemm(g.q, g.scale, wt.t(), sw, gy2.scalar_type(), o.mode)
               .view(ctx->saved_data["x_sizes"].toIntVector());
    }
    at::Tensor gw;
    if (want_w) {
      if (o.wgrad_fp8) {
        if (!main.defined() || !wgrad_into_main(o, main, gy2, g, xs, sx)) {
          gw = wgrad_fp8(o, gy2, g, xs, sx);
          if (main.defined()) main.add_(gw);
        }
      } else if (main.defined()) {
        const auto q = ctx->saved_data["queue"].toInt();
        if (!sigma_wgrad::offer(q, main, gy2, xs)) sigma_wgrad::accumulate(main, gy2, xs);
      } else {
        gw = at::mm(gy2.t(), xs);
      }
      if (main.defined()) {
        gw = at::Tensor();
      } else {
        const auto dt = static_cast<at::ScalarType>(ctx->saved_data["w_dtype"].toInt());
        gw = gw.to(dt);
      }
    }
    variable_list out(17);
    out[0] = gx;
    out[1] = gw;
    return out;
  }
};

at::Tensor& handle(void* p) { return *static_cast<at::Tensor*>(p); }
}  // namespace

// Quantise 2-D `x` to format `fmt` (0 e4m3fn, 1 e5m2) with one scale, or one
// per row when `rows`, `margin` powers of two below the amax (x's, or the
// defined tensor `amax`): the FP8 tensor into handle `out_q`, the
// dequantisation scale (fp32, [] or [rows, 1]) into `out_scale`.
extern "C" int sigma_fp8_quantize(void* x, int64_t fmt, int rows, int64_t margin, void* amax,
                                  void* out_q, void* out_scale, char* err, size_t err_len) {
  return sigma_shim::guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;
    auto [q, s] = quantize(handle(x), format(fmt), rows != 0, margin, handle(amax));
    handle(out_q) = q;
    handle(out_scale) = s;
  });
}

// Quantise 2-D `x` as `quantize_2d` does: `kind` 0 one scale, 1 one per row,
// 2 one per column (written transposed); `want_q`, `want_qt` which outputs;
// `path` 0 the kernels where they take x (else the tensor form), 1 the tensor
// form, 2 the kernels or an error. Outputs into the handles `out_q`,
// `out_qt` (undefined where not wanted) and `out_scale`.
extern "C" int sigma_fp8_quantize_2d(void* x, int64_t fmt, int kind, int64_t margin, int want_q,
                                     int want_qt, int path, void* out_q, void* out_qt,
                                     void* out_scale, char* err, size_t err_len) {
  return sigma_shim::guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;
    TORCH_CHECK(kind >= kTensor && kind <= kCols && path >= kAuto && path <= kKernels,
                "FP8 quantisation: amax kind ", kind, ", path ", path);
    auto r = quantize_2d(handle(x), format(fmt), static_cast<Amax>(kind), margin, want_q != 0,
                         want_qt != 0, static_cast<Path>(path));
    handle(out_q) = r.q;
    handle(out_qt) = r.qt;
    handle(out_scale) = r.scale;
  });
}

// The FP8 GEMM of two quantised operands (layouts and scales as `gemm`
// above) into `out` with dtype `out_dtype` (a c10::ScalarType number).
extern "C" int sigma_fp8_gemm(void* a, void* sa, void* b, void* sb, int64_t out_dtype,
                              int64_t mode, void* out, char* err, size_t err_len) {
  return sigma_shim::guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;
    handle(out) = gemm(handle(a), handle(sa), handle(b), handle(sb),
                       static_cast<at::ScalarType>(out_dtype), mode);
  });
}

// How tensorwise FP8 weight gradients reached the gradient buffer so far:
// 0 not yet, 1 by cuBLASLt's GEMM with beta = 1, 2 by _scaled_mm and an add.
extern "C" int sigma_fp8_wgrad_gemm_state() { return lt_state.load(); }

// The input `x` [.., K] of FP8 linear layers quantised once for all of them
// (`quantize_input` of its [M, K] form) into the handles `out_q`, `out_qt`
// (undefined unless the recipe keeps it) and `out_scale`.
extern "C" int sigma_fp8_quantize_input(void* x, int rows, int wgrad_fp8, int64_t margin,
                                        void* out_q, void* out_qt, void* out_scale, char* err,
                                        size_t err_len) {
  return sigma_shim::guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;
    const auto& xt = handle(x);
    auto r = quantize_input(xt.reshape({-1, xt.size(-1)}).contiguous(), rows != 0,
                            wgrad_fp8 != 0, margin);
    handle(out_q) = r.q;
    handle(out_qt) = r.qt;
    handle(out_scale) = r.scale;
  });
}

// y = x w^T through Fp8Linear into handle `out`. `w`: the bf16 working weight
// [N, K] (its gradient when `main` is undefined); `wq`, `wq_scale`, `wt`,
// `wt_scale`: its FP8 forms (see the top); `main`: a view of the fp32
// gradient buffer shaped like `w`, or an undefined tensor; `queue`: a
// WgradQueue or null; `pq`, `pqt`, `ps`: x quantised beforehand by
// `sigma_fp8_quantize_input` with the same recipe, or undefined handles.
extern "C" int sigma_fp8_linear(void* x, void* w, void* wq, void* wq_scale, void* wt,
                                void* wt_scale, void* main, void* queue, int rows, int64_t grad,
                                int wgrad_fp8, int64_t margin, int fast_accum, int64_t mode,
                                void* pq, void* pqt, void* ps, void* out, char* err,
                                size_t err_len) {
  return sigma_shim::guarded(err, err_len, [&] {
    const auto q = static_cast<int64_t>(reinterpret_cast<intptr_t>(queue));
    const auto opt = [](void* p) {
      const auto& t = handle(p);
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    handle(out) = Fp8Linear::apply(handle(x), handle(w), handle(wq), handle(wq_scale), handle(wt),
                                   handle(wt_scale), opt(main), q, rows != 0, grad,
                                   wgrad_fp8 != 0, margin, fast_accum != 0, mode, opt(pq),
                                   opt(pqt), opt(ps));
  });
}
