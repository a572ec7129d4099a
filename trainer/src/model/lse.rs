//! Attention in pieces: the attention of query heads to one block of keys
//! and values that also returns its log-sum-exp, the merge of two such
//! partial results, and the backward of one block from the merged output
//! and log-sum-exp (flash attention's backward: nothing of the block's
//! forward is kept). Context parallelism's ring (`engine/ring.rs`) is built
//! on these; they are single-device operations.
//!
//! Shapes: `q` [b, n_q, cq, d_qk], `k` [b, n_k, ck, d_qk], `v` [b, n_v, ck,
//! d_v]; query head `h` reads K head `h / (n_q / n_k)` and V head
//! `h / (n_q / n_v)` (as `Fwd::attend_core`). `causal`: query `i` sees keys
//! `0..=i` (the block is on the diagonal, `cq == ck`); else every key.
//! Outputs and log-sum-exps are float32 (float64 for float64 inputs).
//!
//! On CPU (and for whatever the fused kernel does not take) the operations
//! are explicit tensor operations. On CUDA with equal q·k and v widths in
//! bf16/fp16/fp32 they are libtorch's memory-efficient SDPA entry with the
//! log-sum-exp and its backward op; that path has never run (written
//! without a GPU) and says so once when it is first taken.

use tch::{Device, Kind, Tensor};

/// A partial attention result: output [b, n_q, cq, d_v] and log-sum-exp
/// of the scores [b, n_q, cq], in the accumulation dtype.
pub struct Partial {
    pub o: Tensor,
    pub lse: Tensor,
}

/// float64 stays float64; everything else accumulates in float32.
fn acc_kind(k: Kind) -> Kind {
    if k == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// `x` [b, n, c, d] repeated head by head up to `nq` heads.
fn expand(x: &Tensor, nq: i64) -> Tensor {
    let n = x.size()[1];
    if n == nq {
        x.shallow_clone()
    } else {
        x.repeat_interleave_self_int(nq / n, 1, None)
    }
}

/// The gradient of an expanded `[b, nq, c, d]` folded back to `n` heads.
fn fold(g: &Tensor, n: i64) -> Tensor {
    let s = g.size();
    if s[1] == n {
        return g.shallow_clone();
    }
    g.view([s[0], n, s[1] / n, s[2], s[3]])
        .sum_dim_intlist([2i64].as_slice(), false, g.kind())
}

fn causal_mask(cq: i64, ck: i64, device: Device) -> Tensor {
    Tensor::ones([cq, ck], (Kind::Bool, device)).triu(1)
}

/// Scaled scores of `q` against `k` (expanded), masked when `causal`.
fn scores(q: &Tensor, ke: &Tensor, causal: bool, scale: f64) -> Tensor {
    let s = q.matmul(&ke.transpose(-2, -1)) * scale;
    if causal {
        let m = causal_mask(s.size()[2], s.size()[3], s.device());
        s.masked_fill(&m, f64::NEG_INFINITY)
    } else {
        s
    }
}

/// Attention of `q` to one block `k`, `v` with its log-sum-exp.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, scale: f64) -> Partial {
    if fused_applies(q, k, v) {
        return fused_forward(q, k, v, causal, scale);
    }
    let acc = acc_kind(q.kind());
    let nq = q.size()[1];
    let (qf, ke, ve) = (
        q.to_kind(acc),
        expand(k, nq).to_kind(acc),
        expand(v, nq).to_kind(acc),
    );
    let s = scores(&qf, &ke, causal, scale);
    let lse = s.logsumexp([-1i64].as_slice(), false);
    let p = (s - lse.unsqueeze(-1)).exp();
    Partial {
        o: p.matmul(&ve),
        lse,
    }
}

/// The two partial results of the same queries over disjoint key blocks
/// merged into the result over both.
pub fn merge(a: Option<Partial>, b: Partial) -> Partial {
    let Some(a) = a else {
        return b;
    };
    let lse = a.lse.logaddexp(&b.lse);
    let wa = (&a.lse - &lse).exp().unsqueeze(-1);
    let wb = (&b.lse - &lse).exp().unsqueeze(-1);
    Partial {
        o: a.o * wa + b.o * wb,
        lse,
    }
}

/// Gradients of one block: `g` the gradient of the merged output `o` over
/// all blocks, `lse` its log-sum-exp, `delta` = rowsum(g * o) [b, n_q, cq, 1].
/// Returns (dq [b, n_q, cq, d_qk], dk [b, n_k, ck, d_qk], dv [b, n_v, ck,
/// d_v]) in the accumulation dtype.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    g: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    merged: &Partial,
    delta: &Tensor,
    causal: bool,
    scale: f64,
) -> (Tensor, Tensor, Tensor) {
    if fused_applies(q, k, v) {
        return fused_backward(g, q, k, v, merged, causal, scale);
    }
    let acc = acc_kind(q.kind());
    let nq = q.size()[1];
    let (qf, ke, ve) = (
        q.to_kind(acc),
        expand(k, nq).to_kind(acc),
        expand(v, nq).to_kind(acc),
    );
    let g = g.to_kind(acc);
    let s = scores(&qf, &ke, causal, scale);
    let p = (s - merged.lse.unsqueeze(-1)).exp();
    let dv = p.transpose(-2, -1).matmul(&g);
    let dp = g.matmul(&ve.transpose(-2, -1));
    let ds = p * (dp - delta);
    let dq = ds.matmul(&ke) * scale;
    let dk = ds.transpose(-2, -1).matmul(&qf) * scale;
    (dq, fold(&dk, k.size()[1]), fold(&dv, v.size()[1]))
}

/// rowsum(g * o): the term of the softmax backward shared by every block.
pub fn delta(g: &Tensor, o: &Tensor) -> Tensor {
    let acc = acc_kind(o.kind());
    (g.to_kind(acc) * o.to_kind(acc)).sum_dim_intlist([-1i64].as_slice(), true, acc)
}

/// The fused kernel takes the block: CUDA, half/bf16/fp32, equal q·k and v
/// widths (libtorch's memory-efficient attention), and `SIGMA_TRAIN_KERNELS`
/// not `off` (which forces the tensor operations, as for sigma's kernels).
fn fused_applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    q.device().is_cuda()
        && matches!(q.kind(), Kind::BFloat16 | Kind::Half | Kind::Float)
        && q.kind() == k.kind()
        && q.kind() == v.kind()
        && q.size()[3] == v.size()[3]
        && sigma_data::env::switch(sigma_data::env::TRAIN_KERNELS, true)
}

static FUSED_NOTE: std::sync::Once = std::sync::Once::new();

fn note_fused() {
    FUSED_NOTE.call_once(|| {
        eprintln!(
            "note: context-parallel attention uses libtorch's memory-efficient SDPA with \
             log-sum-exp; this path was written without a GPU and has not been validated"
        );
    });
}

/// Rows of the memory-efficient kernel's log-sum-exp: padded to 32.
fn lse_rows(cq: i64) -> i64 {
    (cq + 31) / 32 * 32
}

fn fused_forward(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, scale: f64) -> Partial {
    note_fused();
    let nq = q.size()[1];
    let (ke, ve) = (expand(k, nq).contiguous(), expand(v, nq).contiguous());
    let (o, lse, _, _) = Tensor::internal_scaled_dot_product_efficient_attention::<&Tensor>(
        &q.contiguous(),
        &ke,
        &ve,
        None,
        true,
        0.0,
        causal,
        scale,
    );
    Partial {
        o: o.to_kind(Kind::Float),
        lse: lse.narrow(2, 0, q.size()[2]),
    }
}

fn fused_backward(
    g: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    merged: &Partial,
    causal: bool,
    scale: f64,
) -> (Tensor, Tensor, Tensor) {
    let (nq, cq, ck) = (q.size()[1], q.size()[2], k.size()[2]);
    let kind = q.kind();
    // The op takes [b, t, heads, d] views and the padded log-sum-exp.
    let bshd = |x: &Tensor| x.to_kind(kind).transpose(1, 2);
    let (ke, ve) = (expand(k, nq), expand(v, nq));
    let lse = merged
        .lse
        .constant_pad_nd([0, lse_rows(cq) - cq])
        .contiguous();
    let seed = Tensor::zeros([], (Kind::Int64, Device::Cpu));
    let (dq, dk, dv, _) = Tensor::internal_efficient_attention_backward::<&Tensor>(
        &bshd(g),
        &bshd(q),
        &bshd(&ke),
        &bshd(&ve),
        None,
        &bshd(&merged.o),
        None,
        None,
        cq,
        ck,
        &lse,
        0.0,
        &seed,
        &seed,
        i64::from(causal),
        false,
        scale,
        None,
        None,
        false,
    );
    let back = |x: Tensor| x.transpose(1, 2).to_kind(Kind::Float);
    (
        back(dq),
        fold(&back(dk), k.size()[1]),
        fold(&back(dv), v.size()[1]),
    )
}
