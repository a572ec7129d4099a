// Kernels of bf16 training, each replacing a chain of tensor operations
// with one pass: SwiGLU forward and backward, RoPE forward and backward,
// cross-entropy forward and backward, RMSNorm with a bf16 output and its
// backward. bf16 in and out, fp32 math (one
// rounding per output instead of one per operation). Each thread takes 8
// consecutive columns (16 bytes): the caller (trainer/src/train_kernels.rs
// through csrc/kernel_ops.cpp) checks the widths and 16-byte alignment.
// Compiled by NVRTC after bf16.cuh.

__device__ __forceinline__ float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

__device__ __forceinline__ void load8(const bf16* p, float* f) {
  unpack8(*reinterpret_cast<const uint4*>(p), f);
}

__device__ __forceinline__ void store8(bf16* p, const float* f) {
  *reinterpret_cast<uint4*>(p) = pack8(f);
}

// SwiGLU over the merged output of the gate and up matmuls: gu [rows, 2F]
// holds the gate in columns 0..F and the up projection in F..2F of each row;
// y [rows, F] = silu(gate) * up. Reads gu once and writes y (the tensor form
// runs silu and a product, and keeps silu(gate) for backward).
extern "C" __global__ void swiglu_forward(const bf16* __restrict__ gu, bf16* __restrict__ y,
                                          long long rows, int f) {
  const long long per_row = f / 8;
  const long long n = rows * per_row;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / per_row;
    const int c = (int)(i - r * per_row) * 8;
    const bf16* row = gu + r * 2LL * f;
    float a[8], b[8], o[8];
    load8(row + c, a);
    load8(row + f + c, b);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = a[j] * sigmoid(a[j]) * b[j];
    store8(y + r * f + c, o);
  }
}

// Its backward, one pass writing both halves of dgu [rows, 2F] (the tensor
// form runs two products and silu's backward, then joins the halves):
// d gate = dy * up * silu'(gate), silu'(a) = s(a) (1 + a (1 - s(a))) with s
// the logistic function; d up = dy * silu(gate).
extern "C" __global__ void swiglu_backward(const bf16* __restrict__ dy, const bf16* __restrict__ gu,
                                           bf16* __restrict__ dgu, long long rows, int f) {
  const long long per_row = f / 8;
  const long long n = rows * per_row;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / per_row;
    const int c = (int)(i - r * per_row) * 8;
    const bf16* row = gu + r * 2LL * f;
    float a[8], b[8], g[8], da[8], db[8];
    load8(row + c, a);
    load8(row + f + c, b);
    load8(dy + r * f + c, g);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float s = sigmoid(a[j]);
      db[j] = g[j] * a[j] * s;
      da[j] = g[j] * b[j] * s * (1.0f + a[j] * (1.0f - s));
    }
    bf16* out = dgu + r * 2LL * f;
    store8(out + c, da);
    store8(out + f + c, db);
  }
}

// Rotary embedding of x [rows, dim], rows = (batch, t, heads) token-major so
// that row r is at position start + (r / heads) % t, with the model's tables
// cs = [cos, cos] and sn = [-sin, sin] of [positions, dim]: for the halves
// x1, x2 of a head, y1 = x1 c1 + x2 s1 and y2 = x2 c2 + x1 s2 (the tensor
// form's x * cs + swap_halves(x) * sn: a flip, two products and a sum).
// Backward is the transpose: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 + dy1 s1,
// the same pass with the two halves of sn exchanged (`backward` = 1).
extern "C" __global__ void rope(const bf16* __restrict__ x, const bf16* __restrict__ cs,
                                const bf16* __restrict__ sn, bf16* __restrict__ y, long long rows,
                                int t, int heads, int dim, int start, int backward) {
  const int half = dim / 2;
  const long long per_row = half / 8;
  const long long n = rows * per_row;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / per_row;
    const int c = (int)(i - r * per_row) * 8;
    const long long p = start + (r / heads) % t;
    const bf16* xr = x + r * dim;
    const bf16* cr = cs + p * dim;
    const bf16* sr = sn + p * dim;
    float x1[8], x2[8], c1[8], c2[8], s1[8], s2[8], y1[8], y2[8];
    load8(xr + c, x1);
    load8(xr + half + c, x2);
    load8(cr + c, c1);
    load8(cr + half + c, c2);
    load8(sr + (backward ? half : 0) + c, s1);
    load8(sr + (backward ? 0 : half) + c, s2);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      y1[j] = x1[j] * c1[j] + x2[j] * s1[j];
      y2[j] = x2[j] * c2[j] + x1[j] * s2[j];
    }
    bf16* yr = y + r * dim;
    store8(yr + c, y1);
    store8(yr + half + c, y2);
  }
}

// Cross-entropy of bf16 logits [rows, v] (v a multiple of 8) against int64
// targets, one block per row: the row's log-sum-exp in fp32 (a running
// maximum and sum over 8 values at a time per thread, then combined across
// the block), `lse[row]`, and the row's loss lse - logit[target] in
// `loss[row]` (0 for `ignore`; NaN for a target outside 0..v). The tensor
// form copies the logits to fp32, writes and keeps their log-softmax.
#define CE_THREADS 512

__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -__int_as_float(0x7f800000)) return;  // both empty
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

extern "C" __global__ void cross_entropy_forward(const bf16* __restrict__ logits,
                                                 const long long* __restrict__ targets,
                                                 float* __restrict__ loss, float* __restrict__ lse,
                                                 long long rows, long long v, long long ignore) {
  __shared__ float sm[CE_THREADS / 32], ss[CE_THREADS / 32];
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const bf16* x = logits + row * v;
    float m = -__int_as_float(0x7f800000), s = 0.0f;
    for (long long i = threadIdx.x * 8LL; i < v; i += CE_THREADS * 8LL) {
      float a[8];
      load8(x + i, a);
      float mx = a[0];
#pragma unroll
      for (int j = 1; j < 8; ++j) mx = fmaxf(mx, a[j]);
      float part = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) part += expf(a[j] - mx);
      lse_merge(m, s, mx, part);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      lse_merge(m, s, m2, s2);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      sm[warp] = m;
      ss[warp] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float bm = sm[0], bs = ss[0];
      for (int w = 1; w < CE_THREADS / 32; ++w) lse_merge(bm, bs, sm[w], ss[w]);
      const float l = bm + logf(bs);
      lse[row] = l;
      const long long t = targets[row];
      loss[row] = t == ignore ? 0.0f : (t < 0 || t >= v) ? __int_as_float(0x7fc00000) : l - bf2f(x[t]);
    }
    __syncthreads();
  }
}

// Its backward: d logits = g (softmax - one-hot(target)) in bf16, g the
// gradient of the summed loss (a device scalar); zeros for `ignore`.
// `dlogits` may be `logits` (the caller overwrites them): every element is
// read and then written by the same thread, so neither is `__restrict__`.
extern "C" __global__ void cross_entropy_backward(const bf16* logits,
                                                  const long long* __restrict__ targets,
                                                  const float* __restrict__ lse,
                                                  const float* __restrict__ grad,
                                                  bf16* dlogits, long long rows,
                                                  long long v, long long ignore) {
  const float g = *grad;
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const bf16* x = logits + row * v;
    bf16* d = dlogits + row * v;
    const long long t = targets[row];
    const float l = lse[row];
    const float w = t == ignore ? 0.0f : g;
    for (long long i = threadIdx.x * 8LL; i < v; i += CE_THREADS * 8LL) {
      float a[8];
      load8(x + i, a);
#pragma unroll
      for (int j = 0; j < 8; ++j) a[j] = w * (expf(a[j] - l) - (i + j == t ? 1.0f : 0.0f));
      store8(d + i, a);
    }
  }
}

// RMSNorm of the fp32 residual stream x [rows, d] with the fp32 weight w,
// written in bf16 for the matmuls that read it: y = bf16(x * rstd * w),
// rstd = 1 / sqrt(mean(x^2) + eps), kept per row for backward. One block of
// NORM_THREADS per row, 4 columns per thread and step (d a multiple of 4).
// The tensor form writes an fp32 output and then casts it. With `add` (bf16,
// else null) the residual add before the norm in the same pass: the row
// normalised is x + add, written in fp32 to `sum` (the new residual stream).
// (NORM_THREADS, block_sum and rms_norm_row: csrc/rms_norm.cuh, compiled before this.)
// Columns per thread that backward keeps in registers: d <= 4 * NORM_THREADS * NORM_CHUNKS.
#define NORM_CHUNKS 8

extern "C" __global__ void rms_norm_forward(const float* __restrict__ x, const float* __restrict__ w,
                                           bf16* __restrict__ y, float* __restrict__ rstd,
                                           long long rows, int d, float eps,
                                           const bf16* __restrict__ add, float* __restrict__ sum) {
  __shared__ float sh[NORM_THREADS / 32];
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const float r = rms_norm_row(x + row * d, add != nullptr ? add + row * d : nullptr,
                                 add != nullptr ? sum + row * d : nullptr, w, y + row * d, d, eps, sh);
    if (threadIdx.x == 0) rstd[row] = r;
  }
}

// Its backward from the bf16 dy: dx = rstd (dy w - x rstd^2 mean(dy w x)) in
// fp32, and the weight gradient sum over rows of dy x rstd, one partial row
// per block in dw_part [gridDim.x, d] (the caller sums them). With `dres`
// (fp32, else null) the gradient that reaches x around the norm (the
// residual's) is added to dx; with `dx16` (else null) dx is also written in
// bf16 (the gradient of a bf16 addend of x).
extern "C" __global__ void rms_norm_backward(const bf16* __restrict__ dy, const float* __restrict__ x,
                                            const float* __restrict__ w, const float* __restrict__ rstd,
                                            float* __restrict__ dx, float* __restrict__ dw_part,
                                            long long rows, int d, const float* __restrict__ dres,
                                            bf16* __restrict__ dx16) {
  __shared__ float sh[NORM_THREADS / 32];
  float dw[NORM_CHUNKS][4];
#pragma unroll
  for (int k = 0; k < NORM_CHUNKS; ++k) dw[k][0] = dw[k][1] = dw[k][2] = dw[k][3] = 0.0f;
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const float* xr = x + row * d;
    const bf16* gr = dy + row * d;
    const float r = rstd[row];
    float dot = 0.0f;
    // The residual's gradient is loaded before the block's reduction, so
    // that its reads overlap the others instead of following the barrier.
    float4 q[NORM_CHUNKS];
#pragma unroll
    for (int k = 0; k < NORM_CHUNKS; ++k) {
      const int c = (k * NORM_THREADS + threadIdx.x) * 4;
      if (c >= d) break;
      if (dres != nullptr) q[k] = *reinterpret_cast<const float4*>(dres + row * d + c);
      const float4 a = *reinterpret_cast<const float4*>(xr + c);
      const float4 g = *reinterpret_cast<const float4*>(w + c);
      const float4 e = unpack4(*reinterpret_cast<const uint2*>(gr + c));
      dot += e.x * g.x * a.x + e.y * g.y * a.y + e.z * g.z * a.z + e.w * g.w * a.w;
      dw[k][0] += e.x * a.x * r;
      dw[k][1] += e.y * a.y * r;
      dw[k][2] += e.z * a.z * r;
      dw[k][3] += e.w * a.w * r;
    }
    const float m = block_sum(dot, sh) / d * r * r;
    float* out = dx + row * d;
#pragma unroll
    for (int k = 0; k < NORM_CHUNKS; ++k) {
      const int c = (k * NORM_THREADS + threadIdx.x) * 4;
      if (c >= d) break;
      const float4 a = *reinterpret_cast<const float4*>(xr + c);
      const float4 g = *reinterpret_cast<const float4*>(w + c);
      const float4 e = unpack4(*reinterpret_cast<const uint2*>(gr + c));
      float4 o;
      o.x = r * (e.x * g.x - a.x * m);
      o.y = r * (e.y * g.y - a.y * m);
      o.z = r * (e.z * g.z - a.z * m);
      o.w = r * (e.w * g.w - a.w * m);
      if (dres != nullptr) o = make_float4(o.x + q[k].x, o.y + q[k].y, o.z + q[k].z, o.w + q[k].w);
      *reinterpret_cast<float4*>(out + c) = o;
      if (dx16 != nullptr) *reinterpret_cast<uint2*>(dx16 + row * d + c) = pack4(o);
    }
  }
  float* part = dw_part + (long long)blockIdx.x * d;
#pragma unroll
  for (int k = 0; k < NORM_CHUNKS; ++k) {
    const int c = (k * NORM_THREADS + threadIdx.x) * 4;
    if (c >= d) break;
    *reinterpret_cast<float4*>(part + c) = make_float4(dw[k][0], dw[k][1], dw[k][2], dw[k][3]);
  }
}

// FP8 quantisation with current scaling (train.precision = "fp8"; the rule
// is csrc/fp8_linear.cpp's, which these kernels compute bit for bit): two
// passes over x [rows, cols] instead of the tensor form's chain of fp32
// copies; x in bf16 (activations, gradients: fp8_amax, fp8_cast) or fp32
// (the master weights, once per optimizer step: fp8_amax_f32, fp8_cast_f32). fp8_amax reduces |x| to one amax, one per row or one per
// column; fp8_cast scales, clamps and rounds to e4m3fn or e5m2 and writes
// the FP8 tensor, its transpose, or both (the transpose through a tile in
// shared memory), and the dequantisation scales. A tile is 64 columns (8
// threads of 8) by 32 rows (amax) or 64 rows (cast). The caller checks:
// cols a multiple of 8, 16-byte aligned rows, rows a multiple of 16 for the
// transpose, the amax buffer zeroed.
#define FP8_COLS 64
#define FP8_AMAX_ROWS 32
#define FP8_CAST_ROWS 64

// |v| as bits: ordered as the values for non-negative floats, NaN above
// infinity, so an integer max propagates NaN as the tensor form's amax does.
__device__ __forceinline__ unsigned int abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// 8 consecutive fp32 values (16-byte aligned: the caller checks the base pointer, cols a multiple of 8).
__device__ __forceinline__ void load8(const float* p, float* f) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

// kind 0: amax[0] = max |x|; 1: amax[r] = max over row r; 2: amax[c] over column c.
template <typename T>
__device__ __forceinline__ void fp8_amax_body(const T* __restrict__ x,
                                              unsigned int* __restrict__ amax, long long rows,
                                              long long cols, int kind) {
  __shared__ unsigned int col_max[FP8_AMAX_ROWS][FP8_COLS + 1];
  __shared__ unsigned int warp_max[8];
  const int tx = threadIdx.x & 7, ty = threadIdx.x >> 3;
  const long long c0 = (long long)blockIdx.x * FP8_COLS + tx * 8;
  unsigned int m = 0;
  unsigned int cm[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  // rb is the same for the whole block, so every lane takes each shuffle.
  for (long long rb = (long long)blockIdx.y * FP8_AMAX_ROWS; rb < rows;
       rb += (long long)gridDim.y * FP8_AMAX_ROWS) {
    const long long r = rb + ty;
    unsigned int rm = 0;
    if (r < rows && c0 < cols) {
      float f[8];
      load8(x + r * cols + c0, f);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const unsigned int b = abs_bits(f[j]);
        rm = max(rm, b);
        cm[j] = max(cm[j], b);
      }
    }
    if (kind == 1) {  // the 8 threads of a row are 8 neighbouring lanes
      rm = max(rm, __shfl_xor_sync(0xffffffffu, rm, 1));
      rm = max(rm, __shfl_xor_sync(0xffffffffu, rm, 2));
      rm = max(rm, __shfl_xor_sync(0xffffffffu, rm, 4));
      if (tx == 0 && r < rows && rm != 0) atomicMax(amax + r, rm);
    }
    m = max(m, rm);
  }
  if (kind == 0) {
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned int b = 0;
      for (int w = 0; w < (int)(blockDim.x >> 5); ++w) b = max(b, warp_max[w]);
      if (b != 0) atomicMax(amax, b);
    }
  } else if (kind == 2) {
#pragma unroll
    for (int j = 0; j < 8; ++j) col_max[ty][tx * 8 + j] = cm[j];
    __syncthreads();
    if (threadIdx.x < FP8_COLS) {
      unsigned int b = 0;
      for (int i = 0; i < FP8_AMAX_ROWS; ++i) b = max(b, col_max[i][threadIdx.x]);
      const long long c = (long long)blockIdx.x * FP8_COLS + threadIdx.x;
      if (c < cols && b != 0) atomicMax(amax + c, b);
    }
  }
}

extern "C" __global__ void fp8_amax(const bf16* __restrict__ x, unsigned int* __restrict__ amax,
                                    long long rows, long long cols, int kind) {
  fp8_amax_body(x, amax, rows, cols, kind);
}

extern "C" __global__ void fp8_amax_f32(const float* __restrict__ x,
                                        unsigned int* __restrict__ amax, long long rows,
                                        long long cols, int kind) {
  fp8_amax_body(x, amax, rows, cols, kind);
}

// The scale from an amax: top / amax (top = the format's largest value times
// 2^-margin), 1 where amax is 0 (or NaN), at most FLT_MAX.
__device__ __forceinline__ float fp8_scale(float amax, float top) {
  return amax > 0.0f ? fminf(top / amax, 3.402823466e38f) : 1.0f;
}

// Clamp to [-m, m], NaN kept (as the tensor form's clamp does).
__device__ __forceinline__ float clamp_keep_nan(float v, float m) {
  return v > m ? m : (v < -m ? -m : v);
}

// Two floats rounded to nearest even into FP8 (lo in the low byte): one
// conversion instruction of compute capability 8.9 and later (FP8 refuses
// older GPUs before anything launches).
__device__ __forceinline__ unsigned int fp8x2(float lo, float hi, int e5m2) {
#if __CUDA_ARCH__ >= 890
  unsigned short r;
  if (e5m2) {
    asm("cvt.rn.satfinite.e5m2x2.f32 %0, %2, %1;" : "=h"(r) : "f"(lo), "f"(hi));
  } else {
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %2, %1;" : "=h"(r) : "f"(lo), "f"(hi));
  }
  return r;
#else
  __trap();
  return 0;
#endif
}

// q = fp8(clamp(x * scale, -fmax, fmax)) with scales from amax of `kind`
// (as fp8_amax); q [rows, cols] and/or qt [cols, rows] (either may be null);
// inv (or null) gets the dequantisation scales 1 / scale.
template <typename T>
__device__ __forceinline__ void fp8_cast_body(const T* __restrict__ x,
                                              const float* __restrict__ amax,
                                              unsigned char* __restrict__ q,
                                              unsigned char* __restrict__ qt,
                                              float* __restrict__ inv, long long rows,
                                              long long cols, int kind, int e5m2, float top) {
  __shared__ __align__(16) unsigned char tile[FP8_CAST_ROWS][FP8_COLS + 16];
  const float fmax = e5m2 ? 57344.0f : 448.0f;
  const int tx = threadIdx.x & 7, ty = threadIdx.x >> 3;
  const long long c0 = (long long)blockIdx.x * FP8_COLS + tx * 8;
  const long long r0 = (long long)blockIdx.y * FP8_CAST_ROWS;
  float s[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    s[j] = kind == 2 ? (c0 + j < cols ? fp8_scale(amax[c0 + j], top) : 1.0f)
                     : (kind == 0 ? fp8_scale(amax[0], top) : 1.0f);
  }
  for (int h = 0; h < FP8_CAST_ROWS / 32; ++h) {
    const int lr = ty + 32 * h;
    const long long r = r0 + lr;
    if (r >= rows || c0 >= cols) continue;
    if (kind == 1) {
      const float a = fp8_scale(amax[r], top);
#pragma unroll
      for (int j = 0; j < 8; ++j) s[j] = a;
    }
    float f[8];
    load8(x + r * cols + c0, f);
    unsigned int p[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      p[j] = fp8x2(clamp_keep_nan(f[2 * j] * s[2 * j], fmax),
                   clamp_keep_nan(f[2 * j + 1] * s[2 * j + 1], fmax), e5m2);
    }
    const uint2 w = make_uint2(p[0] | (p[1] << 16), p[2] | (p[3] << 16));
    if (q != nullptr) *reinterpret_cast<uint2*>(q + r * cols + c0) = w;
    if (qt != nullptr) *reinterpret_cast<uint2*>(&tile[lr][tx * 8]) = w;
  }
  if (qt != nullptr) {
    __syncthreads();
    // Column lc of the tile is 64 bytes of row c of qt: 4 threads of 16.
    const int lc = threadIdx.x >> 2, part = threadIdx.x & 3;
    const long long c = (long long)blockIdx.x * FP8_COLS + lc;
    const long long r = r0 + part * 16;
    if (c < cols && r < rows) {
      unsigned int w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int b = part * 16 + 4 * i;
        w[i] = (unsigned int)tile[b][lc] | ((unsigned int)tile[b + 1][lc] << 8) |
               ((unsigned int)tile[b + 2][lc] << 16) | ((unsigned int)tile[b + 3][lc] << 24);
      }
      *reinterpret_cast<uint4*>(qt + c * rows + r) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
  if (inv == nullptr) return;
  if (kind == 0 && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
    inv[0] = 1.0f / fp8_scale(amax[0], top);
  } else if (kind == 1 && blockIdx.x == 0 && threadIdx.x < FP8_CAST_ROWS) {
    const long long r = r0 + threadIdx.x;
    if (r < rows) inv[r] = 1.0f / fp8_scale(amax[r], top);
  } else if (kind == 2 && blockIdx.y == 0 && threadIdx.x < FP8_COLS) {
    const long long c = (long long)blockIdx.x * FP8_COLS + threadIdx.x;
    if (c < cols) inv[c] = 1.0f / fp8_scale(amax[c], top);
  }
}

extern "C" __global__ void fp8_cast(const bf16* __restrict__ x, const float* __restrict__ amax,
                                    unsigned char* __restrict__ q, unsigned char* __restrict__ qt,
                                    float* __restrict__ inv, long long rows, long long cols,
                                    int kind, int e5m2, float top) {
  fp8_cast_body(x, amax, q, qt, inv, rows, cols, kind, e5m2, top);
}

extern "C" __global__ void fp8_cast_f32(const float* __restrict__ x,
                                        const float* __restrict__ amax,
                                        unsigned char* __restrict__ q,
                                        unsigned char* __restrict__ qt, float* __restrict__ inv,
                                        long long rows, long long cols, int kind, int e5m2,
                                        float top) {
  fp8_cast_body(x, amax, q, qt, inv, rows, cols, kind, e5m2, top);
}
