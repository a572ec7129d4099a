// DiffQKV decode attention: one new query token per sequence against a KV
// cache of `len` slots, flash-decoding style (split over the sequence, then
// a merge of the chunks' partial results). One launch where it pays: with a
// single split the block normalises and writes the output itself; with
// `fold` set the last block of a sequence to finish (an atomic counter per
// sequence in a workspace that the last block resets, so it never needs a
// memset) merges the sequence's partials and writes the output; otherwise
// the combine kernel does, in a second launch. The split kernel can also
// rotate the query by RoPE (one less launch before it) and ask L2 for its
// chunk of the cache before it waits on the kernels before it (dependent
// launch: the cache is read while they drain), and write the step's new
// keys (after RoPE) and values into the cache itself, the block whose chunk
// holds the new slot before it reads its chunk; a third kernel writes them
// on its own, for callers that do not fold the write in. Compiled at run
// time by NVRTC (trainer/src/kernels), once per shape, with these macros
// defined by the caller:
//   NQ, NK, NV   query, key and value heads (NK and NV divide NQ)
//   DK, DV       key (dot-product) and value head dimensions, multiples of 8
//                whose eighth divides 32
//   THREADS      threads per block of the split kernel (a multiple of 32)
//   UK, UV       rows loaded ahead per lane (tuning; defaults below)
//   HG           head groups per sequence (tuning, default 1; divides NK
//                and NV): a block takes one group's heads, NQ/HG query,
//                NK/HG key and NV/HG value heads, over its chunk
//   WL           1: the warp-local form of the split kernel (tuning,
//                default 0; needs NV a multiple of NK and NQ/NK <= 8):
//                each warp takes a key head and a contiguous part of the
//                chunk through the scores, the softmax and p·V on its own,
//                with no barrier of the block between those phases, and
//                the block merges its warps' pieces at the end
// Query head i reads key head i / (NQ/NK) and value head i / (NQ/NV)
// (contiguous groups), so one block reads each key row of its chunk once for
// the NQ/NK query heads that share it and each value row once for the NQ/NV
// query heads that share it. A head group is a sequence of its own to the
// partial results, the counters and the combine: `seq` = b * HG + group;
// the query and the output [B, NQ, D] are [B * HG, NQ/HG, D] read so.
// bf16 in and out, fp32 accumulation; no headers (bf16 is handled as its
// bit pattern, with the helpers of bf16.cuh, which the caller puts before
// this source).

#ifndef HG
#define HG 1
#endif
#ifndef WL
#define WL 0
#endif
#define NQB (NQ / HG)           // a block's query, key and value heads
#define NKB (NK / HG)
#define NVB (NV / HG)
#define GK (NQ / NK)
#define GV (NQ / NV)
#define WARPS (THREADS / 32)
#define LK (DK / 8)             // lanes per key row: 8 bf16 (16 bytes) each
#define RK (32 / LK)            // key rows per warp step
#define LV (DV / 8)
#define RV (32 / LV)
#define QTK (GK < 8 ? GK : 8)   // query heads per pass over a key chunk
#define QTV (GV < 8 ? GV : 8)
#ifndef UK
#define UK 4                    // key rows a lane loads before using any
#endif
#ifndef UV
#define UV 8                    // value rows likewise
#endif
// Warps per head: a head is streamed by WPH warps together (when there are
// fewer heads than warps), else each warp streams whole heads alone.
#define WPHK (NKB < WARPS ? WARPS / NKB : 1)
#define WPHV (NVB < WARPS ? WARPS / NVB : 1)
// Warp-local form: warps per key head (each a part of the chunk), and the
// value heads of a key head (query head i's V head i / GV lies in its K
// head's query heads when GV divides GK).
#define WPHL (NKB < WARPS ? WARPS / NKB : 1)
#define WSUB (WL ? WPHL : 1)        // the pieces of output a block merges
#define VPK (NV / NK)
#if WL
static_assert(NV % NK == 0 && GK <= 8, "the warp-local form needs NV a multiple of NK and NQ/NK <= 8");
#endif
#define COMBINE_THREADS 256
#define NEG_INF (-__int_as_float(0x7f800000))

// This lane's 16 bytes of rows first, first + STEP, ... (U of them) of a
// head whose rows are D elements apart; zeros past row n. All loads are
// issued before any is used.
template <int U, int STEP, int D>
__device__ __forceinline__ void load_rows(uint4* w, const bf16* p, int first, int n) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int s = first + u * STEP;
    w[u] = s < n ? *reinterpret_cast<const uint4*>(p + (long long)s * D) : make_uint4(0, 0, 0, 0);
  }
}

// Ask L2 for `n` rows of D elements from `first`, in each of `heads` heads
// `head` elements apart (the rows of a head are contiguous): the block's
// threads take the 128-byte lines in turn.
template <int D>
__device__ __forceinline__ void prefetch_rows(const bf16* first, long long head, int heads, int n) {
  // One line more than the bytes need: the rows need not start on a line.
  const long long bytes = (long long)n * D * 2, lines = (bytes + 127) / 128 + 1;
  for (long long i = threadIdx.x; i < heads * lines; i += THREADS) {
    const long long h = i / lines, off = min((i - h * lines) * 128, bytes - 1);
    prefetch_l2(reinterpret_cast<const char*>(first + h * head) + off);
  }
}

// Sum acc[0..C) over the L aligned lanes of a row group so that lane kl
// ends with the totals of elements [kl * C / L, (kl + 1) * C / L) in
// acc[0 .. C / L): recursive halving, C - C / L shuffles instead of the
// C log2(L) of an all-reduce. Needs C a multiple of L.
template <int C, int L>
__device__ __forceinline__ void reduce_scatter(float* acc, int kl) {
#pragma unroll
  for (int r = 0; (L >> (r + 1)) > 0; ++r) {
    const int o = L >> (r + 1), c = C >> r;
    const bool up = (kl & o) != 0;
#pragma unroll
    for (int i = 0; i < c / 2; ++i) {
      const float send = up ? acc[i] : acc[i + c / 2];
      const float keep = up ? acc[i + c / 2] : acc[i];
      acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
    }
  }
}

// The merge of (group) sequence seq's `splits` partial results
// (unnormalised output, max m and sum l per query head, base 2) into its
// output: rescale every chunk to the common max M, l = sum l_i 2^(m_i - M),
// o = sum o_i 2^(m_i - M) / l; a head with no valid slot (every m_i minus
// infinity) gives zeros. Run by one whole block; `ml` is NQB x 2 floats of
// its shared memory. Partials are read with __ldcg (L2): other blocks
// wrote them.
__device__ __forceinline__ void merge_partials(const float* part_o, const float* part_ml,
                                               bf16* out, int seq, int splits, float* ml) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const float* pml = part_ml + (long long)seq * splits * 2 * NQB;
  const float* po = part_o + (long long)seq * splits * NQB * DV;
  for (int qh = warp; qh < NQB; qh += WARPS) {
    float m = NEG_INF;
    for (int i = lane; i < splits; i += 32) m = fmaxf(m, __ldcg(pml + (long long)i * 2 * NQB + 2 * qh));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float l = 0.f;
    for (int i = lane; i < splits; i += 32) {
      const float mi = __ldcg(pml + (long long)i * 2 * NQB + 2 * qh);
      if (mi != NEG_INF) l += __ldcg(pml + (long long)i * 2 * NQB + 2 * qh + 1) * exp2f(mi - m);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
    if (lane == 0) {
      ml[2 * qh] = m;
      ml[2 * qh + 1] = l;
    }
  }
  __syncthreads();
  for (int i = tid; i < NQB * DV; i += THREADS) {
    const int qh = i / DV;
    const float m = ml[2 * qh], l = ml[2 * qh + 1];
    float o = 0.f;
    if (l > 0.f) {
#pragma unroll 4
      for (int s = 0; s < splits; ++s) {
        const float ms = __ldcg(pml + (long long)s * 2 * NQB + 2 * qh);
        if (ms != NEG_INF) o = fmaf(__ldcg(po + (long long)s * NQB * DV + i), exp2f(ms - m), o);
      }
    }
    out[(long long)seq * NQB * DV + i] = f2bf(l > 0.f ? o / l : 0.f);
  }
}

// This lane's 8 elements (kl-th eighth) of QT query heads from q0 on, from
// the block's scaled query in shared memory.
template <int QT>
__device__ __forceinline__ void query_lane(float (&qr)[QT][8], const float* qs, int q0, int kl) {
#pragma unroll
  for (int j = 0; j < QT; ++j)
#pragma unroll
    for (int e = 0; e < 8; ++e) qr[j][e] = qs[(q0 + j) * DK + kl * 8 + e];
}

// The scores of the key rows in w (chunk slot first + u * STEP for u < U;
// from n on skipped) against QT query heads (this lane's elements in qr),
// written to sc[(q0 + j) * chunk + s], minus infinity where vrow masks the
// slot. A row's LK lanes (kl) sum their partial dot products first.
template <int U, int STEP, int QT>
__device__ __forceinline__ void score_rows(const uint4* w, const float (&qr)[QT][8], int first,
                                           int n, int kl, const unsigned char* vrow, float* sc,
                                           int q0, int chunk) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int s = first + u * STEP;
    float kf[8];
    unpack8(w[u], kf);
    float acc[QT];
#pragma unroll
    for (int j = 0; j < QT; ++j) {
      float a = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) a = fmaf(qr[j][e], kf[e], a);
      acc[j] = a;
    }
    const bool masked = s < n && vrow && !vrow[s];
    if constexpr (QT % LK == 0) {
      reduce_scatter<QT, LK>(acc, kl);
      if (s < n) {
#pragma unroll
        for (int i = 0; i < QT / LK; ++i)
          sc[(q0 + kl * (QT / LK) + i) * chunk + s] = masked ? NEG_INF : acc[i];
      }
    } else {
#pragma unroll
      for (int off = LK / 2; off > 0; off >>= 1)
#pragma unroll
        for (int j = 0; j < QT; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
      if (s < n) {
#pragma unroll
        for (int j = 0; j < QT; ++j)
          if (j % LK == kl) sc[(q0 + j) * chunk + s] = masked ? NEG_INF : acc[j];
      }
    }
  }
}

// One query head's softmax pieces over slots [lo, hi) of its score row, by
// one warp: m (the max), p = 2^(s - m) written over the scores, l (the sum
// of p); lane 0 writes m and l to ml2. No valid slot: m minus infinity, l 0.
__device__ __forceinline__ void softmax_piece(float* row, int lo, int hi, int lane, float* ml2) {
  float m = NEG_INF;
  for (int s = lo + lane; s < hi; s += 32) m = fmaxf(m, row[s]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  float l = 0.f;
  for (int s = lo + lane; s < hi; s += 32) {
    const float p = m == NEG_INF ? 0.f : exp2f(row[s] - m);
    row[s] = p;
    l += p;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
  if (lane == 0) {
    ml2[0] = m;
    ml2[1] = l;
  }
}

template <int QT>
__device__ __forceinline__ void zero_acc(float (&acc)[QT][8]) {
#pragma unroll
  for (int j = 0; j < QT; ++j)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[j][e] = 0.f;
}

// p·v over the value rows in w (chunk slot first + u * STEP for u < U; from
// n on skipped) for QT query heads, p from sc[(q0 + j) * chunk + s], added
// into this lane's 8 elements of each head's output.
template <int U, int STEP, int QT>
__device__ __forceinline__ void value_rows(float (&acc)[QT][8], const uint4* w, int first, int n,
                                           const float* sc, int q0, int chunk) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int s = first + u * STEP;
    if (s < n) {
      float vf[8];
      unpack8(w[u], vf);
#pragma unroll
      for (int j = 0; j < QT; ++j) {
        const float p = sc[(q0 + j) * chunk + s];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j][e] = fmaf(p, vf[e], acc[j][e]);
      }
    }
  }
}

// acc summed over the lanes of the warp that hold the same elements (equal lane % LV).
template <int QT>
__device__ __forceinline__ void sum_row_groups(float (&acc)[QT][8]) {
#pragma unroll
  for (int off = LV; off < 32; off <<= 1)
#pragma unroll
    for (int j = 0; j < QT; ++j)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[j][e] += __shfl_xor_sync(0xffffffffu, acc[j][e], off);
}

#if !WL
// This warp's first key rows of the block form's score loop (its first
// head's first rows), loaded right after the wait on the kernels before,
// so that they are on their way while the block loads its query. kc points
// at the chunk's first slot of the group's first key head. (In the
// warp-local form, loaded so, they made its kernel slower on an H100:
// 4c98c02, docs/benchmarks.md.)
__device__ __forceinline__ void first_key_rows(uint4 (&w)[UK], const bf16* kc, long long k_head,
                                               int n) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, kl = lane % LK, kr = lane / LK;
  const int h = warp / WPHK;
  if (h < NKB)
    load_rows<UK, WPHK * RK, DK>(w, kc + (long long)h * k_head + kl * 8, (warp % WPHK) * RK + kr, n);
}
#endif

#if WL
// The warp-local form's phases (WL): warp w takes key head w / WPHL (or,
// where NKB >= WARPS, heads w, w + WARPS, ...) over part w % WPHL of the
// chunk's n slots (contiguous parts, a multiple of 8 slots each), with its
// GK query heads and the VPK value heads they read: the scores into sc, the
// part's softmax pieces into wml[part], p·V into os[part], with no barrier
// of the block between them; the first value rows are loaded before the
// softmax. After one barrier the block merges the parts (rescaled to their
// common max, in part order, so the same bits every time) into os[0 ..
// NQB*DV) and ml. kg and vg point at the chunk's first slot of the group's
// first heads.
__device__ __forceinline__ void warp_local_phases(const bf16* kg, const bf16* vg, long long k_head,
                                                  long long v_head, const unsigned char* vrow,
                                                  int n, int chunk, const float* qs, float* os,
                                                  float* ml, float* sc) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  float* wml = ml + 2 * NQB;  // [WSUB][NQB][2]
  const int part = NKB < WARPS ? warp % WPHL : 0;
  const int per = ((n + WPHL - 1) / WPHL + 7) / 8 * 8;
  const int lo = min(n, part * per), hi = min(n, lo + per);
  const int kl = lane % LK, kr = lane / LK, vl = lane % LV, vr = lane / LV;
  for (int h = NKB < WARPS ? warp / WPHL : warp; h < NKB; h += NKB < WARPS ? NKB : WARPS) {
    const bf16* kh = kg + (long long)h * k_head + kl * 8;
    float qr[GK][8];
    query_lane<GK>(qr, qs, h * GK, kl);
    for (int base = lo; base < hi; base += RK * UK) {
      uint4 w[UK];
      load_rows<UK, RK, DK>(w, kh, base + kr, hi);
      score_rows<UK, RK, GK>(w, qr, base + kr, hi, kl, vrow, sc, h * GK, chunk);
    }
    // The first value rows on their way while the softmax runs.
    const bf16* vh = vg + (long long)(h * VPK) * v_head + vl * 8;
    uint4 w[UV];
    load_rows<UV, RV, DV>(w, vh, lo + vr, hi);
    __syncwarp();
#pragma unroll
    for (int j = 0; j < GK; ++j)
      softmax_piece(sc + (h * GK + j) * chunk, lo, hi, lane, wml + 2 * (part * NQB + h * GK + j));
    __syncwarp();
    for (int t = 0; t < VPK; ++t) {
      const int hv = h * VPK + t;
      const bf16* vp = vh + (long long)t * v_head;
      float acc[GV][8];
      zero_acc<GV>(acc);
      for (int base = lo; base < hi; base += RV * UV) {
        if (t > 0 || base > lo) load_rows<UV, RV, DV>(w, vp, base + vr, hi);
        value_rows<UV, RV, GV>(acc, w, base + vr, hi, sc, hv * GV, chunk);
      }
      sum_row_groups<GV>(acc);
      if (vr == 0) {
#pragma unroll
        for (int j = 0; j < GV; ++j)
#pragma unroll
          for (int e = 0; e < 8; ++e) os[(part * NQB + hv * GV + j) * DV + vl * 8 + e] = acc[j][e];
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < NQB * DV; i += THREADS) {
    const int qh = i / DV;
    float m = NEG_INF;
#pragma unroll
    for (int p = 0; p < WSUB; ++p) m = fmaxf(m, wml[2 * (p * NQB + qh)]);
    float l = 0.f, o = 0.f;
#pragma unroll
    for (int p = 0; p < WSUB; ++p) {
      const float mp = wml[2 * (p * NQB + qh)];
      if (mp != NEG_INF) {
        const float f = exp2f(mp - m);
        l = fmaf(wml[2 * (p * NQB + qh) + 1], f, l);
        o = fmaf(os[p * NQB * DV + i], f, o);
      }
    }
    os[i] = o;  // only this thread reads or writes element i of part 0
    if (i % DV == 0) {
      ml[2 * qh] = m;
      ml[2 * qh + 1] = l;
    }
  }
}
#endif

// A new token's keys rotated by RoPE and its values written at slot p by
// the block's threads: `nk` key heads from kn (DK apart) into kc, whose
// heads are k_head apart (each head's slot 0 at kc + h * k_head), and `nv`
// value heads from vn (DV apart) into vc likewise. cs = [cos, cos] and sn
// = [-sin, sin], DK each: y_j = x_j c_j + x_{j +- DK/2} s_j in fp32, as the
// training RoPE kernel, rounded to bf16. The append kernel and the split
// kernel's folded append share it, so both write the same bits.
__device__ __forceinline__ void write_token(const bf16* kn, const bf16* vn, const bf16* cs,
                                            const bf16* sn, bf16* kc, bf16* vc, long long k_head,
                                            long long v_head, long long p, int nk, int nv) {
  const int half = DK / 2;
  for (int i = threadIdx.x; i < nk * half; i += blockDim.x) {
    const int h = i / half, j = i - (i / half) * half;
    const bf16* kr = kn + (long long)h * DK;
    const float x1 = bf2f(kr[j]), x2 = bf2f(kr[j + half]);
    const float y1 = x1 * bf2f(cs[j]) + x2 * bf2f(sn[j]);
    const float y2 = x2 * bf2f(cs[j + half]) + x1 * bf2f(sn[j + half]);
    bf16* out = kc + h * k_head + p * DK;
    out[j] = f2bf(y1);
    out[j + half] = f2bf(y2);
  }
  for (int i = threadIdx.x; i < nv * DV; i += blockDim.x) {
    const int h = i / DV, j = i - (i / DV) * DV;
    vc[h * v_head + p * DV + j] = vn[i];
  }
}

// Block (split, b, group): slots [split*chunk, min(len, (split+1)*chunk))
// of sequence b for the heads of `group`. Computes the chunk's unnormalised
// output (sum of p·v with p = 2^(score - m)), its max m and its sum l per
// query head; writes the output itself when it is the only split, else the
// partials (and, with `fold`, the last block of the group sequence merges
// them). With k_new set (and the RoPE rows), the step's new token is
// written into the cache at slot *pos first (below len), by the block
// whose chunk holds that slot, for its group's heads, before it reads its
// chunk: no other block reads the slot, so no append kernel runs before.
// Strides are in elements; a key row (DK) and a value row (DV) are contiguous.
// k and v are not __restrict__: the folded append writes through them.
extern "C" __global__ void __launch_bounds__(THREADS, 2)
diffqkv_decode_split(const bf16* __restrict__ q,       // [B, NQ, DK] contiguous
                     const bf16* k,                    // [B, NK, >=len, DK]
                     const bf16* v,                    // [B, NV, >=len, DV]
                     const unsigned char* __restrict__ valid,  // [B, >=len] or null
                     long long k_batch, long long k_head,
                     long long v_batch, long long v_head,
                     long long valid_batch,
                     float* __restrict__ part_o,       // [B * HG, splits, NQB, DV] (splits > 1)
                     float* __restrict__ part_ml,      // [B * HG, splits, NQB, 2] (splits > 1)
                     bf16* __restrict__ out,           // [B, NQ, DV]
                     unsigned int* __restrict__ done,  // [>= B * HG], zero between launches (fold)
                     const bf16* __restrict__ cs,      // [DK] RoPE row [cos, cos], or null
                     const bf16* __restrict__ sn,      // [DK] RoPE row [-sin, sin], or null
                     int len, int chunk, float scale_log2, int fold, int prefetch,
                     const bf16* __restrict__ k_new,   // [B, NK * DK] the new token's keys, or null
                     const bf16* __restrict__ v_new,   // [B, NV * DV] its values (with k_new)
                     const long long* __restrict__ pos) {  // [1] its slot (with k_new)
  extern __shared__ float smem[];
  float* qs = smem;              // [NQB][DK], scaled by scale * log2(e)
  float* os = qs + NQB * DK;     // [WSUB][NQB][DV] output accumulator (WL: each part's, merged into the first)
  float* ml = os + WSUB * NQB * DV;  // [NQB][2] max and sum (WL: then [WSUB][NQB][2], each part's)
  float* sc = ml + 2 * NQB * (WL ? 1 + WSUB : 1);  // [NQB][chunk] scores, then probabilities

  const int b = blockIdx.y, split = blockIdx.x, splits = gridDim.x;
  const int seq = b * HG + blockIdx.z;  // the group sequence
  // The group's first key and value heads of sequence b.
  const bf16* kg = k + (long long)b * k_batch + (long long)blockIdx.z * NKB * k_head;
  const bf16* vg = v + (long long)b * v_batch + (long long)blockIdx.z * NVB * v_head;
  const int s0 = split * chunk;
  const int n = min(chunk, len - s0);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  // The chunk's cached rows asked of L2 while the kernels before drain
  // (the host sets `prefetch` where the launch's K and V fit L2 with room).
  // Only the slot that this step's append writes is being written (by an
  // append kernel before this one, or below by this kernel's block that
  // reads it), and L2 holds whatever write lands: the loads after see it.
  if (prefetch) {
    prefetch_rows<DK>(kg + (long long)s0 * DK, k_head, NKB, n);
    prefetch_rows<DV>(vg + (long long)s0 * DV, v_head, NVB, n);
  }
  // Dependent launch (bf16.cuh): the next kernel may start; nothing is read before the kernels before this one end.
  let_next_kernel_start();
  wait_for_prior_kernels();
  if (k_new != nullptr) {  // the folded append: the same value in every thread of the block
    const long long p = *pos;
    if (p >= s0 && p < s0 + n) {
      const int z = blockIdx.z;
      write_token(k_new + ((long long)b * NK + z * NKB) * DK,
                  v_new + ((long long)b * NV + z * NVB) * DV, cs, sn, const_cast<bf16*>(kg),
                  const_cast<bf16*>(vg), k_head, v_head, p, NKB, NVB);
      __syncthreads();  // the block's loads of the slot below see its writes
    }
  }
#if !WL
  uint4 w0[UK];
  first_key_rows(w0, kg + (long long)s0 * DK, k_head, n);
#endif

  // The query, rotated here when the RoPE rows are given: y_j = x_j c_j +
  // x_{j +- DK/2} s_j in fp32, rounded to bf16 as the training RoPE kernel
  // writes it, so the scores are those of a query rotated before the launch.
  const bf16* qb = q + (long long)seq * NQB * DK;
  for (int i = tid; i < NQB * DK; i += THREADS) {
    float x = bf2f(qb[i]);
    if (cs != nullptr) {
      const int j = i % DK;
      const float other = bf2f(qb[j < DK / 2 ? i + DK / 2 : i - DK / 2]);
      x = bf2f(f2bf(x * bf2f(cs[j]) + other * bf2f(sn[j])));
    }
    qs[i] = x * scale_log2;
  }
  for (int i = tid; i < NQB * DV; i += THREADS) os[i] = 0.f;
  __syncthreads();

#if WL
  warp_local_phases(kg + (long long)s0 * DK, vg + (long long)s0 * DV, k_head, v_head,
                    valid ? valid + (long long)b * valid_batch + s0 : 0, n, chunk, qs, os, ml, sc);
#else
  // Scores: each key row of the chunk is read once for its query group.
  {
    const int kl = lane % LK, kr = lane / LK;
    const int sub = warp % WPHK;
    const unsigned char* vrow = valid ? valid + (long long)b * valid_batch + s0 : 0;
    bool first = true;  // w0 holds the first rows
    for (int h = warp / WPHK; h < NKB; h += WARPS / WPHK) {
      const bf16* kh = kg + (long long)h * k_head + (long long)s0 * DK + kl * 8;
      for (int qt = 0; qt < GK; qt += QTK) {
        float qr[QTK][8];
        query_lane<QTK>(qr, qs, h * GK + qt, kl);
        for (int base = sub * RK; base < n; base += WPHK * RK * UK) {
          uint4 w[UK];
          if (first) {
#pragma unroll
            for (int u = 0; u < UK; ++u) w[u] = w0[u];
            first = false;
          } else {
            load_rows<UK, WPHK * RK, DK>(w, kh, base + kr, n);
          }
          score_rows<UK, WPHK * RK, QTK>(w, qr, base + kr, n, kl, vrow, sc, h * GK + qt, chunk);
        }
      }
    }
  }
  __syncthreads();

  // Softmax pieces per query head over the chunk: m, p = 2^(s - m), l.
  for (int qh = warp; qh < NQB; qh += WARPS)
    softmax_piece(sc + qh * chunk, 0, n, lane, ml + 2 * qh);
  __syncthreads();

  // p·V: each value row of the chunk is read once for its query group.
  {
    const int vl = lane % LV, vr = lane / LV;
    const int sub = warp % WPHV;
    for (int h = warp / WPHV; h < NVB; h += WARPS / WPHV) {
      const bf16* vh = vg + (long long)h * v_head + (long long)s0 * DV + vl * 8;
      for (int qt = 0; qt < GV; qt += QTV) {
        float acc[QTV][8];
        zero_acc<QTV>(acc);
        for (int base = sub * RV; base < n; base += WPHV * RV * UV) {
          uint4 w[UV];
          load_rows<UV, WPHV * RV, DV>(w, vh, base + vr, n);
          value_rows<UV, WPHV * RV, QTV>(acc, w, base + vr, n, sc, h * GV + qt, chunk);
        }
        // Sum over the warp's row groups (lanes of equal vl), then over the
        // warps sharing the head.
        sum_row_groups<QTV>(acc);
        if (vr == 0) {
#pragma unroll
          for (int j = 0; j < QTV; ++j)
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              float* o = &os[(h * GV + qt + j) * DV + vl * 8 + e];
              if constexpr (WPHV == 1) *o = acc[j][e]; else atomicAdd(o, acc[j][e]);
            }
        }
      }
    }
  }
#endif
  __syncthreads();

  if (splits == 1) {  // the whole context in this block: normalise and write
    for (int i = tid; i < NQB * DV; i += THREADS) {
      const float l = ml[2 * (i / DV) + 1];
      out[(long long)seq * NQB * DV + i] = f2bf(l > 0.f ? os[i] / l : 0.f);
    }
    return;
  }
  const long long part = (long long)seq * splits + split;
  for (int i = tid; i < NQB * DV; i += THREADS) part_o[part * NQB * DV + i] = os[i];
  for (int i = tid; i < 2 * NQB; i += THREADS) part_ml[part * 2 * NQB + i] = ml[i];
  if (!fold) return;

  // Folded combine: every thread's partials are made visible device-wide
  // before one thread counts the block in; the block that brings the count
  // to `splits` is the last of its group sequence, resets the counter for the
  // next launch and merges (reading the partials through L2, not L1).
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const unsigned int before = atomicAdd(done + seq, 1u);
    last = before == (unsigned int)(splits - 1);
    if (last) atomicExch(done + seq, 0u);
    __threadfence();
  }
  __syncthreads();
  if (last) merge_partials(part_o, part_ml, out, seq, splits, ml);
}

// Combine kernel: a row of DV partial outputs is read by CL threads, 4
// floats (16 bytes) each; the block's threads form CG groups of CL.
#define CL (DV / 4)
#define CG (COMBINE_THREADS / CL)
#define CU 8                    // splits a thread loads before using any

// Block (query head of the group, b, group), COMBINE_THREADS threads: the
// head's partials merged and normalised. Group g of the block takes splits
// g, g + CG, g + 2 CG, ... (CU at a time: their max and sum and this
// thread's 4 output elements loaded together, then rescaled to the running
// max and added in split order); then the CG groups' pieces are rescaled
// to their common max and added in group order (the same bits every
// time). A head whose every slot is masked gives zeros. Partials are read
// through L2 (__ldcg): the split kernel's blocks wrote them.
extern "C" __global__ void __launch_bounds__(COMBINE_THREADS)
diffqkv_decode_combine(const float* __restrict__ part_o,
                       const float* __restrict__ part_ml,
                       bf16* __restrict__ out,  // [B, NQ, DV]
                       int splits) {
  // Dependent launch (bf16.cuh): the next kernel may start; nothing is read before the kernels before this one end.
  let_next_kernel_start();
  wait_for_prior_kernels();
  __shared__ float gml[CG][2];
  __shared__ float4 go[CG][CL];
  const int qh = blockIdx.x, seq = blockIdx.y * HG + blockIdx.z, tid = threadIdx.x;
  const int g = tid / CL, c = tid % CL;
  const float2* mlb = reinterpret_cast<const float2*>(part_ml) + (long long)seq * splits * NQB + qh;
  const float4* ob = reinterpret_cast<const float4*>(part_o) + ((long long)seq * splits * NQB + qh) * CL + c;
  float m = NEG_INF, l = 0.f;
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int first = g; first < splits; first += CG * CU) {
    float2 pm[CU];
    float4 po[CU];
#pragma unroll
    for (int u = 0; u < CU; ++u) {
      const int i = first + u * CG;
      pm[u] = i < splits ? __ldcg(mlb + (long long)i * NQB) : make_float2(NEG_INF, 0.f);
      po[u] = i < splits ? __ldcg(ob + (long long)i * NQB * CL) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float mb = m;
#pragma unroll
    for (int u = 0; u < CU; ++u) mb = fmaxf(mb, pm[u].x);
    if (mb == NEG_INF) continue;  // nothing valid yet
    const float r = m == NEG_INF ? 0.f : exp2f(m - mb);
    l *= r;
    o.x *= r; o.y *= r; o.z *= r; o.w *= r;
#pragma unroll
    for (int u = 0; u < CU; ++u) {
      if (pm[u].x != NEG_INF) {
        const float w = exp2f(pm[u].x - mb);
        l = fmaf(pm[u].y, w, l);
        o.x = fmaf(po[u].x, w, o.x); o.y = fmaf(po[u].y, w, o.y);
        o.z = fmaf(po[u].z, w, o.z); o.w = fmaf(po[u].w, w, o.w);
      }
    }
    m = mb;
  }
  if (c == 0) {
    gml[g][0] = m;
    gml[g][1] = l;
  }
  go[g][c] = o;
  __syncthreads();
  if (tid < CL) {
    float M = NEG_INF;
#pragma unroll
    for (int j = 0; j < CG; ++j) M = fmaxf(M, gml[j][0]);
    float L = 0.f;
    float4 O = make_float4(0.f, 0.f, 0.f, 0.f);
    if (M != NEG_INF) {
#pragma unroll
      for (int j = 0; j < CG; ++j) {
        if (gml[j][0] != NEG_INF) {
          const float w = exp2f(gml[j][0] - M);
          const float4 x = go[j][tid];
          L = fmaf(gml[j][1], w, L);
          O.x = fmaf(x.x, w, O.x); O.y = fmaf(x.y, w, O.y);
          O.z = fmaf(x.z, w, O.z); O.w = fmaf(x.w, w, O.w);
        }
      }
    }
    const float4 y = L > 0.f ? make_float4(O.x / L, O.y / L, O.z / L, O.w / L)
                             : make_float4(0.f, 0.f, 0.f, 0.f);
    *reinterpret_cast<uint2*>(out + ((long long)seq * NQB + qh) * DV + 4 * tid) = pack4(y);
  }
}

// The new token of each sequence written into the caches at slot `*pos`, a
// device value, so that one launch serves every step of a CUDA graph: its
// keys rotated by RoPE (the table's rows at that position, cs = [cos, cos]
// and sn = [-sin, sin], DK each; fp32 products as the training kernel's
// RoPE), its values as they are. k_new [b, NK * DK] and v_new [b, NV * DV]
// contiguous; the caches [b, heads, slots, D] with rows D apart and the
// given batch and head strides (elements). One block per sequence.
extern "C" __global__ void __launch_bounds__(COMBINE_THREADS)
    diffqkv_decode_append(const bf16* __restrict__ k_new, const bf16* __restrict__ v_new,
                          const bf16* __restrict__ cs, const bf16* __restrict__ sn,
                          const long long* __restrict__ pos, bf16* __restrict__ kc,
                          bf16* __restrict__ vc, long long k_batch, long long k_head,
                          long long v_batch, long long v_head) {
  // Dependent launch (bf16.cuh): the next kernel may start; nothing is read before the kernels before this one end.
  let_next_kernel_start();
  wait_for_prior_kernels();
  const long long b = blockIdx.x;
  write_token(k_new + b * NK * DK, v_new + b * NV * DV, cs, sn, kc + b * k_batch, vc + b * v_batch,
              k_head, v_head, *pos, NK, NV);
}
