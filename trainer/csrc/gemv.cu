// Matrix-vector products of decoding (a few rows of activations times a
// weight), compiled by NVRTC after bf16.cuh and rms_norm.cuh
// (trainer/src/kernels/gemv.rs).
//
// y_j[r, n] = sum_k x[r, k] w_j[n, k] for r < rows <= R, up to three weights
// w_j [n_j, k] that read the same x [rows, k] (bf16 in and out, fp32 sums):
// WPC warps per output column (1, 2 or 4; a block of GEMV_WARPS warps holds
// GEMV_WARPS / WPC columns), their lanes striding over k in 16-byte pieces,
// U pieces of the weight loaded before any is used so that enough bytes are
// in flight to keep the memory busy; the warps of a column add their sums
// through shared memory. The weights are streamed (read once, not kept in
// L1); x is small and read through L1. The kernels of row bucket R (1, 2,
// 4, 8), U and WPC are named gemv[_gated]_r{R}_u{U}_w{WPC}; the host picks
// a variant per shape (trainer/src/kernels/gemv.rs).
//
// Gated (SwiGLU): one weight [2n, k], gate rows then up rows; the warp of
// column c reads rows c and n + c and writes silu(gate) * up from the fp32
// sums, so the [rows, 2n] product is never written.
//
// Normed (_norm): x is the fp32 residual stream and the kernel first runs
// the RMSNorm (after a residual add) that makes the products' input, as
// rms_norm_forward does (csrc/rms_norm.cuh, same rounding): every block
// normalises the rows into shared memory and block 0 writes the sum x + add,
// so a decoding step saves the norm's launch. Compiled after rms_norm.cuh.
//
// Programmatic dependent launch (sm_90, bf16.cuh): a kernel may start while
// the kernel before it drains. It loads its first weight pieces and asks L2
// for the next (weights are not written during decoding), lets the kernel
// after it start, then waits for the kernels before it before reading
// anything they write.

#define GEMV_WARPS 8
static_assert(GEMV_WARPS * 32 == NORM_THREADS, "the norm runs on one block of the kernel");

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The U pieces of weight of one lane from piece c0 on (zeros past the end),
// and of the up row where gated.
template <bool GATED, int U, int WPC>
__device__ __forceinline__ void load_pieces(const uint4* __restrict__ wa, const uint4* __restrict__ wb,
                                            int c0, int chunks, uint4* a, uint4* b) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + 32 * WPC * u;
    a[u] = make_uint4(0, 0, 0, 0);
    b[u] = a[u];
    if (c < chunks) {
      a[u] = load_stream(wa + c);
      if (GATED) b[u] = load_stream(wb + c);
    }
  }
}

// One warp's share of a column: the pieces slice, slice + WPC, ... of 32
// (each lane one of them), summed into acc (and, gated, the up row's into
// accb). The first U pieces of each lane are in a and b already (loaded
// before the kernel waited for the ones before it).
template <int R, bool GATED, int U, int WPC, bool SHARED_X>
__device__ __forceinline__ void dot_slice(const uint4* __restrict__ x, const uint4* __restrict__ wa,
                                          const uint4* __restrict__ wb, int rows, int chunks,
                                          int slice, float* acc, float* accb, uint4* a, uint4* b) {
  const int lane = threadIdx.x & 31;
  const int first = slice * 32 + lane;
  for (int c0 = first; c0 < chunks; c0 += 32 * WPC * U) {
    if (c0 != first) load_pieces<GATED, U, WPC>(wa, wb, c0, chunks, a, b);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * WPC * u;
      if (c < chunks) {
        float fa[8], fb[8];
        unpack8(a[u], fa);
        if (GATED) unpack8(b[u], fb);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (r < rows) {
            float fx[8];
            unpack8(SHARED_X ? x[(size_t)r * chunks + c] : __ldg(x + (size_t)r * chunks + c), fx);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              acc[r] = fmaf(fa[i], fx[i], acc[r]);
              if (GATED) accb[r] = fmaf(fb[i], fx[i], accb[r]);
            }
          }
        }
      }
    }
  }
}

// The normed kernels' first inputs (null for the others): the residual
// stream x [rows, k] (fp32), the branch output to add to it (bf16, or
// null), where the sum goes (fp32, with add), the norm's weight [k] and eps.
struct NormIn {
  const float* x;
  const bf16* add;
  float* sum;
  const float* w;
  float eps;
};

// One group of a block's columns: column `group * (GEMV_WARPS / WPC) + warp /
// WPC` of the launch, which `pick` maps to a weight, its output and its
// width; the warp's first weight piece and, gated, the up row's.
struct Group {
  bool active;
  int col, n;
  bf16* y;
  const uint4* wa;
  const uint4* wb;
};

template <bool GATED, int WPC, typename Pick>
__device__ __forceinline__ Group group_of(int group, int chunks, Pick pick) {
  Group g;
  const bf16* w;
  g.col = group * (GEMV_WARPS / WPC) + (threadIdx.x >> 5) / WPC;
  g.active = pick(g.col, w, g.y, g.n);
  g.wa = g.wb = nullptr;
  if (g.active) {
    g.wa = reinterpret_cast<const uint4*>(w) + (size_t)g.col * chunks;
    g.wb = GATED ? reinterpret_cast<const uint4*>(w) + (size_t)(g.col + g.n) * chunks : g.wa;
  }
  return g;
}

// The block's groups of columns: blockIdx.x, then every gridDim.x-th up to
// `groups` (one each, except for the normed kernels, which the host launches
// with fewer blocks so that each normalises its input once for several).
// NORM: x is made from `nx` into shared memory first ([rows, k] bf16).
template <int R, bool GATED, int U, int WPC, bool NORM, typename Pick>
__device__ __forceinline__ void gemv_block(const bf16* x, const NormIn& nx, int rows, int k,
                                           int groups, Pick pick) {
  __shared__ float part[GEMV_WARPS][2 * R];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int chunks = k >> 3;
  const int first = (warp % WPC) * 32 + lane;
  Group g = group_of<GATED, WPC>(blockIdx.x, chunks, pick);
  uint4 a[U], b[U];
  if (g.active) {
    // The weights' first pieces, loaded while the kernel before drains
    // (weights are not written while decoding), the next ones asked of L2.
    load_pieces<GATED, U, WPC>(g.wa, g.wb, first, chunks, a, b);
    for (int u = 0, c = first + 32 * WPC * U; u < U && c < chunks; ++u, c += 32 * WPC) {
      prefetch_l2(g.wa + c);
      if (GATED) prefetch_l2(g.wb + c);
    }
  }
  let_next_kernel_start();
  wait_for_prior_kernels();
  if (NORM) {
    extern __shared__ uint4 xs[];  // [rows, k] bf16
    __shared__ float sh[NORM_THREADS / 32];
    for (int r = 0; r < rows; ++r) {
      const size_t o = (size_t)r * k;
      float* sum = nx.add != nullptr && blockIdx.x == 0 ? nx.sum + o : nullptr;
      rms_norm_row(nx.x + o, nx.add != nullptr ? nx.add + o : nullptr, sum, nx.w,
                   reinterpret_cast<bf16*>(xs) + o, k, nx.eps, sh);
    }
    __syncthreads();
    x = reinterpret_cast<const bf16*>(xs);
  }
  for (int gi = blockIdx.x; gi < groups; gi += gridDim.x) {
    if (gi != (int)blockIdx.x) {
      g = group_of<GATED, WPC>(gi, chunks, pick);
      if (g.active) load_pieces<GATED, U, WPC>(g.wa, g.wb, first, chunks, a, b);
    }
    float acc[R], accb[R];
#pragma unroll
    for (int r = 0; r < R; ++r) { acc[r] = 0.f; accb[r] = 0.f; }
    if (g.active) {
      dot_slice<R, GATED, U, WPC, NORM>(reinterpret_cast<const uint4*>(x), g.wa, g.wb, rows,
                                        chunks, warp % WPC, acc, accb, a, b);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      acc[r] = warp_sum(acc[r]);
      if (GATED) accb[r] = warp_sum(accb[r]);
    }
    if (WPC > 1) {
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) { part[warp][r] = acc[r]; part[warp][R + r] = accb[r]; }
      }
      __syncthreads();
      if (warp % WPC == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int j = 1; j < WPC; ++j) { acc[r] += part[warp + j][r]; accb[r] += part[warp + j][R + r]; }
        }
      }
      __syncthreads();  // part is written again by the next group
    }
    if (g.active && lane == 0 && warp % WPC == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < rows) {
          float out = acc[r];
          if (GATED) out = out / (1.f + __expf(-out)) * accb[r];
          g.y[(size_t)r * g.n + g.col] = f2bf(out);
        }
      }
    }
  }
}

// Every kernel takes the same arguments: x (bf16 [rows, k]; the normed
// ones read the NormIn fields instead and ignore it), the NormIn fields (null
// and 0 for the others), three weight slots (weight, output, columns; the
// gated kernels use the first, its weight [2n, k]; an unused slot has 0
// columns), rows, k and the launch's groups of columns (GEMV_WARPS / WPC
// columns each).
#define GEMV_PARAMS                                                                          \
  const bf16 *x, const float *nx, const bf16 *nadd, float *nsum, const float *nw, float eps, \
      const bf16 *w0, bf16 *y0, int n0, const bf16 *w1, bf16 *y1, int n1, const bf16 *w2,   \
      bf16 *y2, int n2, int rows, int k, int groups

#define GEMV_BODY(GATED, NORM, R, U, WPC)                                                  \
  {                                                                                        \
    const NormIn norm{nx, nadd, nsum, nw, eps};                                            \
    gemv_block<R, GATED, U, WPC, NORM>(x, norm, rows, k, groups,                           \
                                       [&](int& col, const bf16*& w, bf16*& y, int& n) {   \
      w = w0; y = y0; n = n0;                                                              \
      if (col < n0 || GATED) return col < n0;                                              \
      col -= n0; w = w1; y = y1; n = n1;                                                   \
      if (col < n1) return true;                                                           \
      col -= n1; w = w2; y = y2; n = n2;                                                   \
      return col < n2;                                                                     \
    });                                                                                    \
  }

#define GEMV_KERNELS(R, U, WPC)                                                            \
  extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                           \
      gemv_r##R##_u##U##_w##WPC(GEMV_PARAMS) GEMV_BODY(false, false, R, U, WPC)           \
  extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                           \
      gemv_gated_r##R##_u##U##_w##WPC(GEMV_PARAMS) GEMV_BODY(true, false, R, U, WPC)      \
  extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                           \
      gemv_norm_r##R##_u##U##_w##WPC(GEMV_PARAMS) GEMV_BODY(false, true, R, U, WPC)       \
  extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                           \
      gemv_gated_norm_r##R##_u##U##_w##WPC(GEMV_PARAMS) GEMV_BODY(true, true, R, U, WPC)

// One row bucket and variant per compilation: the host compiles those it
// launches (-DGEMV_R=.. -DGEMV_U=.. -DGEMV_WPC=..).
// (through one more macro, so that the numbers, not the macros' names, are pasted)
#define GEMV_EXPAND(R, U, WPC) GEMV_KERNELS(R, U, WPC)
GEMV_EXPAND(GEMV_R, GEMV_U, GEMV_WPC)
