// The prelude of every NVRTC kernel source (no CUDA headers; put before each
// by trainer/src/kernels/decode/nvrtc.rs): bf16 as its bit pattern, the
// conversions to and from float (round to nearest even, NaN kept quiet) and
// eight values packed in 16 bytes (four in 8); programmatic dependent
// launch; and a prefetch into L2.

typedef unsigned short bf16;

__device__ __forceinline__ float bf2f(bf16 x) {
  return __uint_as_float(((unsigned int)x) << 16);
}

__device__ __forceinline__ bf16 f2bf(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7f800000u) == 0x7f800000u) {  // inf or nan: keep, quiet a nan
    return (bf16)((u >> 16) | ((u & 0xffffu) ? 0x40u : 0u));
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return (bf16)(u >> 16);
}

__device__ __forceinline__ void unpack8(uint4 w, float* f) {
  f[0] = __uint_as_float(w.x << 16); f[1] = __uint_as_float(w.x & 0xffff0000u);
  f[2] = __uint_as_float(w.y << 16); f[3] = __uint_as_float(w.y & 0xffff0000u);
  f[4] = __uint_as_float(w.z << 16); f[5] = __uint_as_float(w.z & 0xffff0000u);
  f[6] = __uint_as_float(w.w << 16); f[7] = __uint_as_float(w.w & 0xffff0000u);
}

// Four values in 8 bytes, as float4 (the fp32 kernels' vector width).
__device__ __forceinline__ float4 unpack4(uint2 w) {
  return make_float4(__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xffff0000u),
                     __uint_as_float(w.y << 16), __uint_as_float(w.y & 0xffff0000u));
}

__device__ __forceinline__ uint2 pack4(float4 f) {
  return make_uint2((unsigned int)f2bf(f.x) | ((unsigned int)f2bf(f.y) << 16),
                    (unsigned int)f2bf(f.z) | ((unsigned int)f2bf(f.w) << 16));
}

__device__ __forceinline__ uint4 pack8(const float* f) {
  uint4 w;
  w.x = (unsigned int)f2bf(f[0]) | ((unsigned int)f2bf(f[1]) << 16);
  w.y = (unsigned int)f2bf(f[2]) | ((unsigned int)f2bf(f[3]) << 16);
  w.z = (unsigned int)f2bf(f[4]) | ((unsigned int)f2bf(f[5]) << 16);
  w.w = (unsigned int)f2bf(f[6]) | ((unsigned int)f2bf(f[7]) << 16);
  return w;
}

// Programmatic dependent launch (sm_90; no-ops before, and where a kernel was
// launched without it: trainer/src/kernels/decode/nvrtc.rs, launch_ex). A
// kernel launched with it may start while the kernel before it drains: it
// must call wait_for_prior_kernels before reading anything earlier kernels
// write (and before writing anything they read); let_next_kernel_start lets
// the kernel after it start (which waits in turn) once every block of this
// one has called it or ended.
__device__ __forceinline__ void wait_for_prior_kernels() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void let_next_kernel_start() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Ask L2 for the 128-byte line that holds p (no register, no L1): safe
// before wait_for_prior_kernels, as L2 is where every SM's writes meet.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}
