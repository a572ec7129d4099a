//! How SIGMA is cut across `tp` tensor-parallel ranks (docs/parallelism.md).
//!
//! Rank `r` holds query heads `[r*nq/tp, (r+1)*nq/tp)`. Key heads: when
//! `tp <= n_k` it holds `n_k/tp` of them, `[r*nk/tp, ...)`; when `tp > n_k`
//! each key head is replicated on the `tp/n_k` consecutive ranks whose query
//! heads read it (rank `r` holds head `r/(tp/n_k)`), and its gradient is summed
//! over exactly those ranks. Value heads the same way with `n_v`. Because the
//! DiffQKV groups are contiguous, a rank's query heads always read only the K
//! and V heads it holds. Column-parallel (split along the output rows):
//! q_proj, k_proj, v_proj, AugQ gate/up (over the AugQ width, from the whole
//! gathered q0), FFN gate/up, the embedding and output head (over the
//! vocabulary). Row-parallel (split along the input columns): o_proj, AugQ
//! down, FFN down. Replicated: the norms (gradients summed over the group
//! under sequence parallelism, identical otherwise) and K compression's k_up
//! (summed: each rank contributes through its own query heads).

use tch::{Kind, Tensor};

use crate::config::ModelConfig;
use crate::dist::Collectives;
use crate::error::{Result, TrainError};
use crate::model::block::Part;
use crate::model::decl::{Decl, Split};
use crate::model::key::{declare, ParamKey};
use crate::model::params::{GradSync, ParamSpec, Params};
use crate::model::{Fwd, Heads};

/// This rank's share of the model under tensor parallelism.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpPlan {
    pub tp: usize,
    pub rank: usize,
    pub sequence_parallel: bool,
    /// The model has AugQ (its input, the whole q0, is gathered first).
    pub aug_q: bool,
    /// Heads this rank computes with.
    pub q_heads: usize,
    pub k_heads: usize,
    pub v_heads: usize,
    /// First (global) K and V head this rank holds.
    pub first_k: usize,
    pub first_v: usize,
}

/// Heads of one kind (`n` of them) on `tp` ranks: (held per rank, first held
/// by `rank`, ranks sharing a copy).
fn split_heads(n: usize, tp: usize, rank: usize) -> (usize, usize, usize) {
    if tp <= n {
        (n / tp, rank * (n / tp), 1)
    } else {
        let share = tp / n;
        (1, rank / share, share)
    }
}

impl TpPlan {
    /// One rank, everything whole.
    pub fn single(c: &ModelConfig) -> TpPlan {
        TpPlan {
            tp: 1,
            rank: 0,
            sequence_parallel: false,
            aug_q: c.aug_q_dim > 0,
            q_heads: c.num_q_heads,
            k_heads: c.num_k_heads,
            v_heads: c.num_v_heads,
            first_k: 0,
            first_v: 0,
        }
    }

    /// Check that `c` can be cut `tp` ways; the error names the counts.
    pub fn check(
        c: &ModelConfig,
        tp: usize,
        seq_len: usize,
        sequence_parallel: bool,
    ) -> Result<()> {
        let bad = |msg: String| Err(TrainError::config("parallel.tp", msg));
        if tp <= 1 {
            return Ok(());
        }
        if !c.num_q_heads.is_multiple_of(tp) {
            return bad(format!(
                "{tp} does not divide model.num_q_heads ({}): every rank needs the same number of query heads",
                c.num_q_heads
            ));
        }
        for (key, n) in [
            ("num_k_heads", c.num_k_heads),
            ("num_v_heads", c.num_v_heads),
        ] {
            if n % tp != 0 && !tp.is_multiple_of(n) {
                return bad(format!(
                    "{tp} and model.{key} ({n}): one must divide the other (tp <= heads: each rank holds heads/tp of them; tp > heads: each head is replicated on tp/heads ranks)"
                ));
            }
        }
        for (key, n) in [
            ("model.ffn_dim", c.ffn_dim),
            ("model.aug_q_dim", c.aug_q_dim),
            ("model.vocab_size", c.vocab_size),
        ] {
            if n % tp != 0 {
                return bad(format!(
                    "{tp} does not divide {key} ({n}), which is split across the ranks"
                ));
            }
        }
        if sequence_parallel && !seq_len.is_multiple_of(tp) {
            return Err(TrainError::config(
                "data.seq_len",
                format!(
                    "{seq_len} is not divisible by parallel.tp ({tp}): sequence parallelism gives every rank a block of micro_batch x seq_len/tp tokens (or set parallel.sequence_parallel = false)"
                ),
            ));
        }
        Ok(())
    }

    /// Rank `rank`'s plan; `check` must have passed.
    pub fn new(c: &ModelConfig, tp: usize, rank: usize, sequence_parallel: bool) -> TpPlan {
        if tp <= 1 {
            return TpPlan::single(c);
        }
        let (k_heads, first_k, _) = split_heads(c.num_k_heads, tp, rank);
        let (v_heads, first_v, _) = split_heads(c.num_v_heads, tp, rank);
        TpPlan {
            tp,
            rank,
            sequence_parallel,
            aug_q: c.aug_q_dim > 0,
            q_heads: c.num_q_heads / tp,
            k_heads,
            v_heads,
            first_k,
            first_v,
        }
    }

    /// Ranks sharing one copy of a K head (1: none shared).
    pub fn k_share(&self, c: &ModelConfig) -> usize {
        split_heads(c.num_k_heads, self.tp, self.rank).2
    }

    pub fn v_share(&self, c: &ModelConfig) -> usize {
        split_heads(c.num_v_heads, self.tp, self.rank).2
    }

    /// Replicated parameters seen by this rank's block of the tokens only
    /// (sequence parallelism) need their gradients summed; otherwise they
    /// are identical on every rank.
    fn replicated(&self) -> GradSync {
        match (self.tp > 1, self.sequence_parallel) {
            (false, _) => GradSync::Own,
            (true, true) => GradSync::SumTp,
            (true, false) => GradSync::Identical,
        }
    }

    /// Mark which rank of the tensor-parallel group writes each copy.
    fn writers(&self, mut specs: Vec<ParamSpec>) -> Vec<ParamSpec> {
        for s in &mut specs {
            s.writer = match s.sync {
                GradSync::Own => true,
                GradSync::Identical | GradSync::SumTp => self.rank == 0,
                GradSync::SumReplicas { size } => self.rank.is_multiple_of(size),
            };
        }
        specs
    }

    /// Every parameter of `c` as this rank holds it, in model order (the
    /// order initialisation draws them in).
    pub fn param_specs(&self, c: &ModelConfig) -> Vec<ParamSpec> {
        let specs = declare(c)
            .into_iter()
            .map(|(key, decl)| self.spec(c, key, decl))
            .collect();
        self.writers(specs)
    }

    /// This rank's block of one declared weight and how its gradient is made
    /// whole: the sharding table of tensor parallelism.
    fn spec(&self, c: &ModelConfig, key: ParamKey, decl: Decl) -> ParamSpec {
        let (tp, r) = (self.tp as i64, self.rank as i64);
        let even = |n: i64| (r * n / tp, n / tp);
        let heads = |n: usize, held: usize, first: usize, share: usize| {
            let per = decl.shape[0] / n as i64;
            let sync = match share {
                1 => GradSync::Own,
                size => GradSync::SumReplicas { size },
            };
            (Some((0, (first as i64 * per, held as i64 * per))), sync)
        };
        let (split, sync) = match decl.split {
            Split::Rows | Split::Vocab => (Some((0, even(decl.shape[0]))), GradSync::Own),
            Split::Cols => (Some((1, even(decl.shape[1]))), GradSync::Own),
            Split::KeyHeads => heads(c.num_k_heads, self.k_heads, self.first_k, self.k_share(c)),
            Split::ValueHeads => heads(c.num_v_heads, self.v_heads, self.first_v, self.v_share(c)),
            Split::Replicated => (None, self.replicated()),
            Split::ReplicatedPartialGrad if self.tp > 1 => (None, GradSync::SumTp),
            Split::ReplicatedPartialGrad => (None, GradSync::Own),
        };
        let mut s = ParamSpec::whole(key, decl.shape, decl.kind);
        if let Some((dim, (off, len))) = split {
            s.block[dim] = (off, len);
            s.shape[dim] = len;
        }
        s.sync = sync;
        s
    }

    /// The heads this rank computes with.
    pub fn heads(&self) -> Heads {
        Heads {
            q: self.q_heads,
            k: self.k_heads,
            v: self.v_heads,
        }
    }

    /// Whether blocks run as parts joined by collectives (tp > 1) rather
    /// than whole.
    pub fn splits_blocks(&self) -> bool {
        self.tp > 1
    }

    /// Where the collectives go: the one after output `out` of `at`, across
    /// the tensor-parallel group (Megatron's f/g operators, with or without
    /// sequence parallelism). Backward applies each one's conjugate.
    pub fn comm_after(&self, at: CommPoint, out: usize) -> Option<Comm> {
        if self.tp == 1 {
            return None;
        }
        // Into a column-parallel region, and out of a row-parallel one.
        let (into, from) = if self.sequence_parallel {
            (Comm::GatherSeq, Comm::ScatterSeq)
        } else {
            (Comm::Copy, Comm::AllReduce)
        };
        match (at, out) {
            // The vocabulary-parallel lookup: each rank's rows, summed.
            (CommPoint::Embed, 0) => Some(from),
            (CommPoint::Part(Part::AttnNorm), 0) => Some(into),
            // AugQ reads the whole projected query of every head.
            (CommPoint::Part(Part::Qkv), 0) if self.aug_q => Some(Comm::GatherFeat),
            (CommPoint::Part(Part::AugQ), 0) => Some(Comm::ScatterFeat),
            (CommPoint::Part(Part::Attend), 0) => Some(from),
            (CommPoint::Part(Part::AddNorm), 1) => Some(into),
            (CommPoint::Part(Part::Ffn), 0) => Some(from),
            // Into the vocabulary-parallel output head.
            (CommPoint::FinalNorm, 0) => Some(into),
            _ => None,
        }
    }

    /// Shape of the activation [micro-batch, tokens, d_model] that crosses
    /// pipeline stages: under sequence parallelism each rank holds
    /// `seq_len / tp` of the tokens.
    pub fn activation_shape(&self, rows: usize, seq_len: usize, d_model: usize) -> Vec<i64> {
        let t = if self.sequence_parallel {
            seq_len / self.tp
        } else {
            seq_len
        };
        vec![rows as i64, t as i64, d_model as i64]
    }

    /// The embedding lookup of this rank: the whole table on one rank; under
    /// tensor parallelism the rows it holds, other tokens giving zeros (the
    /// ranks' outputs sum to the lookup).
    pub fn embed(&self, f: &Fwd<'_>, c: &ModelConfig, tokens: &Tensor) -> Tensor {
        if self.tp == 1 {
            return f.embed(tokens);
        }
        let w = f.p(f.id(ParamKey::Embed));
        let (first, rows) = self.vocab_rows(c);
        let local = tokens - first;
        let mine = local.ge(0).logical_and(&local.lt(rows));
        let e = Tensor::embedding(w, &local.clamp(0, rows - 1), -1, false, false);
        e * mine.unsqueeze(-1).to_kind(w.kind())
    }

    /// First vocabulary row this rank holds, and how many.
    pub fn vocab_rows(&self, c: &ModelConfig) -> (i64, i64) {
        let per = (c.vocab_size / self.tp) as i64;
        (self.rank as i64 * per, per)
    }
}

/// Where in a program a collective can follow a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommPoint {
    /// The embedding lookup.
    Embed,
    /// A part of a block.
    Part(Part),
    /// The final norm, before the output head.
    FinalNorm,
}

/// A collective across the tensor-parallel group between two segments. The
/// backward pass applies the conjugate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comm {
    /// Sum the ranks' partial results (backward: identity).
    AllReduce,
    /// Identity into a column-parallel region (backward: all-reduce).
    Copy,
    /// All-gather along the sequence (backward: reduce-scatter).
    GatherSeq,
    /// Reduce-scatter along the sequence (backward: all-gather).
    ScatterSeq,
    /// All-gather along the features (backward: reduce-scatter).
    GatherFeat,
    /// Reduce-scatter along the features (backward: all-gather).
    ScatterFeat,
}

impl Comm {
    pub fn conjugate(self) -> Comm {
        match self {
            Comm::AllReduce => Comm::Copy,
            Comm::Copy => Comm::AllReduce,
            Comm::GatherSeq => Comm::ScatterSeq,
            Comm::ScatterSeq => Comm::GatherSeq,
            Comm::GatherFeat => Comm::ScatterFeat,
            Comm::ScatterFeat => Comm::GatherFeat,
        }
    }
}

/// Vocabulary-parallel cross-entropy of this rank's logits [b, t, rows]
/// (rows `first..first + rows` of the vocabulary): the max, the sum of
/// exponentials and the target's logit are reduced across the group, the full
/// logits never gathered. Returns the loss summed over positions and, with
/// `scale`, the gradient of `scale * loss` with respect to the local logits
/// (softmax minus one-hot, in closed form).
pub fn vocab_parallel_cross_entropy(
    c: &mut dyn Collectives,
    logits: &Tensor,
    targets: &Tensor,
    first: i64,
    scale: Option<f64>,
) -> Result<(Tensor, Option<Tensor>)> {
    tch::no_grad(|| {
        let rows = logits.size()[2];
        let l = logits.reshape([-1, rows]);
        let (m_local, _) = l.max_dim(-1, false);
        let m = Tensor::stack(&c.all_gather(&m_local.contiguous())?, 0).amax([0].as_slice(), false);
        let e = (&l - m.unsqueeze(1)).exp();
        let t = targets.reshape([-1]) - first;
        let mine = t.ge(0).logical_and(&t.lt(rows));
        let idx = t.clamp(0, rows - 1).unsqueeze(1);
        let t_local = l.gather(1, &idx, false).squeeze_dim(1) * mine.to_kind(l.kind());
        let mut both = Tensor::cat(
            &[e.sum_dim_intlist([1].as_slice(), false, l.kind()), t_local],
            0,
        );
        c.all_reduce_sum(&mut both)?;
        let n = m.size()[0];
        let (z, tl) = (both.narrow(0, 0, n), both.narrow(0, n, n));
        let loss = (z.log() + &m - tl).sum(Kind::Double);
        let grad = scale.map(|s| {
            let g = &e / z.unsqueeze(1);
            let g = g.scatter_add(1, &idx, &(-mine.to_kind(l.kind())).unsqueeze(1));
            (g * s).view(logits.size().as_slice())
        });
        Ok((loss, grad))
    })
}

/// Make whole the gradients of parameters held by several tensor-parallel
/// ranks (in `grad`, laid out like `params.flat`): summed over the group for
/// `SumTp`, over their replica group for `SumReplicas`. One collective per
/// group, on the concatenated ranges.
pub fn sync_shared_grads(
    params: &Params,
    grad: &Tensor,
    tp: &mut dyn Collectives,
    replicas: &mut [(usize, Box<dyn Collectives>)],
) -> Result<()> {
    let ranges = |want: &dyn Fn(GradSync) -> bool| -> Vec<(i64, i64)> {
        params
            .specs
            .iter()
            .zip(&params.offsets)
            .filter(|(s, _)| want(s.sync))
            .map(|(s, &o)| (o, s.numel()))
            .collect()
    };
    let reduce = |c: &mut dyn Collectives, r: Vec<(i64, i64)>| -> Result<()> {
        if r.is_empty() {
            return Ok(());
        }
        tch::no_grad(|| {
            let parts: Vec<Tensor> = r.iter().map(|&(o, n)| grad.narrow(0, o, n)).collect();
            let mut all = Tensor::cat(&parts, 0);
            c.all_reduce_sum(&mut all)?;
            let mut at = 0;
            for &(o, n) in &r {
                grad.narrow(0, o, n).copy_(&all.narrow(0, at, n));
                at += n;
            }
            Ok(())
        })
    };
    reduce(tp, ranges(&|s| s == GradSync::SumTp))?;
    for (size, c) in replicas.iter_mut() {
        let size = *size;
        reduce(c.as_mut(), ranges(&|s| s == GradSync::SumReplicas { size }))?;
    }
    Ok(())
}

/// Sum the gradient of the tied embedding over the first and last pipeline
/// stage (`tied`: their two-rank group), so both apply the same update.
pub fn sync_tied_grads(params: &Params, grad: &Tensor, tied: &mut dyn Collectives) -> Result<()> {
    for (spec, &off) in params.specs.iter().zip(&params.offsets) {
        if spec.pp_tied {
            let mut g = grad.narrow(0, off, spec.numel()).copy();
            tied.all_reduce_sum(&mut g)?;
            tch::no_grad(|| grad.narrow(0, off, spec.numel()).copy_(&g));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(nq: usize, nk: usize, nv: usize) -> ModelConfig {
        toml::from_str(&format!(
            "vocab_size = 64\nd_model = 16\nnum_layers = 1\nffn_dim = 32\nnum_q_heads = {nq}\n\
             num_k_heads = {nk}\nnum_v_heads = {nv}\nqk_head_dim = 4\nv_head_dim = 4\naug_q_dim = 8\n"
        ))
        .expect("config")
    }

    #[test]
    fn every_query_head_reads_only_heads_its_rank_holds() {
        for (nq, nk, nv) in [(8, 2, 4), (8, 4, 2), (8, 8, 8), (8, 1, 8), (32, 4, 16)] {
            let c = cfg(nq, nk, nv);
            for tp in [1usize, 2, 4, 8] {
                if TpPlan::check(&c, tp, 64, true).is_err() {
                    continue;
                }
                for r in 0..tp {
                    let p = TpPlan::new(&c, tp, r, true);
                    for i in r * nq / tp..(r + 1) * nq / tp {
                        let (kh, vh) = (i / (nq / nk), i / (nq / nv));
                        assert!(
                            (p.first_k..p.first_k + p.k_heads).contains(&kh),
                            "{nq}/{nk}/{nv} tp {tp} rank {r} q {i}"
                        );
                        assert!(
                            (p.first_v..p.first_v + p.v_heads).contains(&vh),
                            "{nq}/{nk}/{nv} tp {tp} rank {r} q {i}"
                        );
                    }
                    // Local grouping is contiguous too.
                    assert_eq!(p.q_heads % p.k_heads, 0);
                    assert_eq!(p.q_heads % p.v_heads, 0);
                }
            }
        }
    }

    #[test]
    fn layouts_that_cannot_be_cut_are_refused_naming_the_counts() {
        let e = TpPlan::check(&cfg(8, 2, 4), 3, 64, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("parallel.tp") && e.contains("num_q_heads (8)"),
            "{e}"
        );
        let e = TpPlan::check(&cfg(12, 3, 4), 2, 64, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_k_heads (3)"), "{e}");
        let e = TpPlan::check(&cfg(8, 2, 4), 2, 63, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.seq_len") && e.contains("63"), "{e}");
        assert!(TpPlan::check(&cfg(8, 2, 4), 2, 63, false).is_ok());
    }

    #[test]
    fn blocks_tile_every_split_tensor_exactly_once() {
        let c = cfg(8, 2, 4);
        let tp = 4;
        let plans: Vec<Vec<ParamSpec>> = (0..tp)
            .map(|r| TpPlan::new(&c, tp, r, true).param_specs(&c))
            .collect();
        for i in 0..plans[0].len() {
            let whole = plans[0][i].global_numel();
            let sync = plans[0][i].sync;
            let held: i64 = plans.iter().map(|p| p[i].numel()).sum();
            assert_eq!(
                held,
                whole * sync.copies(tp) as i64,
                "{}",
                plans[0][i].name()
            );
        }
    }
}
