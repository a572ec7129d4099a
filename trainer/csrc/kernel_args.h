// One launch of a kernel of csrc/train_kernels.cu, as the shims describe it
// to the launcher that Rust registers (trainer/src/kernels/training.rs,
// `KernelArgs` there, which mirrors this struct field by field). Shared by
// kernel_ops.cpp (which holds the launcher) and fp8_linear.cpp.
#pragma once

namespace sigma_kernels {

struct KernelArgs {
  int op;  // 0 SwiGLU forward (a = gu), 1 its backward (a = dy, b = gu),
           // 2 RoPE (a = x, b = cos table, c = sin table), 3 its backward (a = dy),
           // 4 cross-entropy (a = logits, b = targets; out = row losses, out2 = lse),
           // 5 its backward (a = logits, b = targets, c = lse, d = gradient of the sum),
           // 6 RMSNorm (a = x, b = w; out = bf16 y, out2 = rstd; with e = a bf16
           //   addend of x, out3 = the fp32 sum, which is what is normalised),
           // 7 its backward (a = dy, b = x, c = w, d = rstd; out = dx, out2 = weight
           //   gradient partials [blocks, f]; e = a gradient added to dx or null,
           //   out3 = dx in bf16 or null),
           // 8 FP8 amax (a = x [rows, cols] bf16; out = amax, fp32 zeroed, by f:
           //   0 one, 1 per row, 2 per column),
           // 9 FP8 cast (a = x, b = that amax, f its kind; out = q [rows, cols] or
           //   null, out2 = q transposed [cols, rows] or null, out3 = the
           //   dequantisation scales; t = 1 for e5m2 (else e4m3fn), eps = the
           //   largest value scaled to: the format's largest times 2^-margin),
           // 10, 11 as 8, 9 for an fp32 x (the master weights),
           // 13 the FP8 weight gradient added into out = main [ignore, cols] fp32
           //   by one cuBLASLt GEMM (a = x^T [cols, rows] e4m3, b = gy^T
           //   [ignore, rows], t = 1 where it is e5m2, c and d their scales,
           //   e a workspace of `blocks` bytes; trainer/src/kernels/fp8_wgrad.rs)
  int device;
  const void* a;
  const void* b;
  const void* c;
  const void* d;
  const void* e;
  void* out;
  void* out2;
  void* out3;
  long long rows;
  long long cols;    // cross-entropy: the vocabulary. FP8: the columns
  long long ignore;  // cross-entropy: the target index that counts nothing
  int f;             // SwiGLU: F. RoPE: the head dimension. FP8: the amax's kind
  int t;             // RoPE: positions, heads, first position. FP8 cast: the format
  int heads;
  int start;
  int blocks;  // RMSNorm backward: the blocks, one weight-gradient partial each
  float eps;   // RMSNorm. FP8 cast: the largest scaled value
};
static_assert(sizeof(KernelArgs) == 120, "KernelArgs must match trainer/src/kernels/training.rs");
typedef int (*Launcher)(const KernelArgs*);

// Whether Rust registered the launcher (and no launch has failed since).
bool ready();
// Launch `a`: 0 on success; non-zero where no launcher is registered or the
// launch failed (which the launcher reported).
int launch(const KernelArgs& a);
// Stop using the kernels (after a failed launch): the tensor forms from now on.
void disable();

}  // namespace sigma_kernels
