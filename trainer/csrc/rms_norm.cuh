// RMSNorm of one row into bf16 by one block of NORM_THREADS threads, shared
// by the training kernels (csrc/train_kernels.cu: rms_norm_forward) and the
// decoding matrix-vector kernels (csrc/gemv.cu: the norm before a block's
// products), so that both round alike: y = bf16(a * rstd * w), rstd = 1 /
// sqrt(mean(a^2) + eps), a = x (+ add). Compiled after bf16.cuh.
#define NORM_THREADS 256

// Sum of `v` over the block (every thread gets it); `sh` holds NORM_THREADS / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* sh) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // sh may still be read from the previous call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  float t = 0.0f;
#pragma unroll
  for (int w = 0; w < NORM_THREADS / 32; ++w) t += sh[w];
  return t;
}

// Element c..c+3 of x (+ add, bf16) in fp32.
__device__ __forceinline__ float4 norm_input(const float* xr, const bf16* addr, int c) {
  float4 a = *reinterpret_cast<const float4*>(xr + c);
  if (addr != nullptr) {
    const float4 e = unpack4(*reinterpret_cast<const uint2*>(addr + c));
    a = make_float4(a.x + e.x, a.y + e.y, a.z + e.z, a.w + e.w);
  }
  return a;
}

// Row xr [d] (+ addr [d], bf16, else null) normalised with weight w [d] into
// yr [d] (bf16; global or shared memory); with sumr (else null) the sum
// x + add written there in fp32 (not xr itself: the second pass reads xr
// again). Every thread of the block must call it (d a multiple of 4);
// returns rstd.
__device__ __forceinline__ float rms_norm_row(const float* xr, const bf16* addr, float* sumr,
                                              const float* __restrict__ w, bf16* yr, int d,
                                              float eps, float* sh) {
  float ss = 0.0f;
  for (int c = threadIdx.x * 4; c < d; c += NORM_THREADS * 4) {
    const float4 a = norm_input(xr, addr, c);
    if (sumr != nullptr) *reinterpret_cast<float4*>(sumr + c) = a;
    ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
  }
  const float r = rsqrtf(block_sum(ss, sh) / d + eps);
  for (int c = threadIdx.x * 4; c < d; c += NORM_THREADS * 4) {
    const float4 a = norm_input(xr, addr, c);  // the same fp32 sum, recomputed
    const float4 g = *reinterpret_cast<const float4*>(w + c);
    *reinterpret_cast<uint2*>(yr + c) =
        pack4(make_float4(a.x * r * g.x, a.y * r * g.y, a.z * r * g.z, a.w * r * g.w));
  }
  return r;
}
