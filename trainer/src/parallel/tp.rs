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

use tch::Tensor;

use crate::config::{KCompression, ModelConfig};
use crate::dist::Collectives;
use crate::error::{Result, TrainError};
use crate::model::params::{GradSync, ParamKind, ParamSpec, Params};

/// This rank's share of the model under tensor parallelism.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpPlan {
    pub tp: usize,
    pub rank: usize,
    pub sequence_parallel: bool,
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

    /// The spec of a parameter of global `shape`, split along `dim` into
    /// `parts` equal blocks of which this rank holds block `index` (or whole
    /// when `dim` is None), with gradient synchronisation `sync`.
    fn spec(
        name: String,
        shape: Vec<i64>,
        kind: ParamKind,
        split: Option<(usize, i64, i64)>,
        sync: GradSync,
    ) -> ParamSpec {
        let mut s = ParamSpec::whole(name, shape, kind);
        if let Some((dim, off, len)) = split {
            s.block[dim] = (off, len);
            s.shape[dim] = len;
        }
        s.sync = sync;
        s
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

    /// Every parameter of `c` as this rank holds it, named after the module
    /// tree, in model order (the order initialisation draws them in).
    pub fn param_specs(&self, c: &ModelConfig) -> Vec<ParamSpec> {
        let d = c.d_model as i64;
        let (nq, nk, nv) = (
            c.num_q_heads as i64,
            c.num_k_heads as i64,
            c.num_v_heads as i64,
        );
        let (dd, dk, dv) = (
            c.dot_dim() as i64,
            c.k_cache_dim() as i64,
            c.v_head_dim as i64,
        );
        let (tp, r) = (self.tp as i64, self.rank as i64);
        let rows = |n: i64| Some((0, r * n / tp, n / tp));
        let cols = |n: i64| Some((1, r * n / tp, n / tp));
        let none = None;
        let rep = self.replicated();
        let own = GradSync::Own;
        let k_sync = match self.k_share(c) {
            1 => own,
            size => GradSync::SumReplicas { size },
        };
        let v_sync = match self.v_share(c) {
            1 => own,
            size => GradSync::SumReplicas { size },
        };
        let k_rows = Some((0, self.first_k as i64 * dk, self.k_heads as i64 * dk));
        let v_rows = Some((0, self.first_v as i64 * dv, self.v_heads as i64 * dv));
        let vocab = c.vocab_size as i64;
        let mut s = vec![Self::spec(
            "embed.weight".into(),
            vec![vocab, d],
            ParamKind::Embedding,
            rows(vocab),
            own,
        )];
        let mut p = |name: String, shape: Vec<i64>, kind, split, sync| {
            s.push(Self::spec(name, shape, kind, split, sync))
        };
        let (lin, res, norm) = (ParamKind::Linear, ParamKind::ResidualOut, ParamKind::Norm);
        for l in 0..c.num_layers {
            let pre = format!("layers.{l}");
            p(format!("{pre}.attn_norm.weight"), vec![d], norm, none, rep);
            p(
                format!("{pre}.attn.q_proj.weight"),
                vec![nq * dd, d],
                lin,
                rows(nq * dd),
                own,
            );
            if c.aug_q_dim > 0 {
                let a = c.aug_q_dim as i64;
                p(
                    format!("{pre}.attn.aug_q.gate.weight"),
                    vec![a, nq * dd],
                    lin,
                    rows(a),
                    own,
                );
                p(
                    format!("{pre}.attn.aug_q.up.weight"),
                    vec![a, nq * dd],
                    lin,
                    rows(a),
                    own,
                );
                p(
                    format!("{pre}.attn.aug_q.down.weight"),
                    vec![nq * dd, a],
                    lin,
                    cols(a),
                    own,
                );
            }
            p(
                format!("{pre}.attn.k_proj.weight"),
                vec![nk * dk, d],
                lin,
                k_rows,
                k_sync,
            );
            if c.k_compression == KCompression::Projected {
                let sync = if self.tp > 1 { GradSync::SumTp } else { own };
                p(
                    format!("{pre}.attn.k_up.weight"),
                    vec![dd, dk],
                    lin,
                    none,
                    sync,
                );
            }
            p(
                format!("{pre}.attn.v_proj.weight"),
                vec![nv * dv, d],
                lin,
                v_rows,
                v_sync,
            );
            p(
                format!("{pre}.attn.o_proj.weight"),
                vec![d, nq * dv],
                res,
                cols(nq * dv),
                own,
            );
            p(format!("{pre}.ffn_norm.weight"), vec![d], norm, none, rep);
            let f = c.ffn_dim as i64;
            p(
                format!("{pre}.ffn.gate.weight"),
                vec![f, d],
                lin,
                rows(f),
                own,
            );
            p(
                format!("{pre}.ffn.up.weight"),
                vec![f, d],
                lin,
                rows(f),
                own,
            );
            p(
                format!("{pre}.ffn.down.weight"),
                vec![d, f],
                res,
                cols(f),
                own,
            );
        }
        p("final_norm.weight".into(), vec![d], norm, none, rep);
        if !c.tie_embeddings {
            p(
                "lm_head.weight".into(),
                vec![vocab, d],
                ParamKind::Embedding,
                rows(vocab),
                own,
            );
        }
        self.writers(s)
    }

    /// First vocabulary row this rank holds, and how many.
    pub fn vocab_rows(&self, c: &ModelConfig) -> (i64, i64) {
        let per = (c.vocab_size / self.tp) as i64;
        (self.rank as i64 * per, per)
    }
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
            assert_eq!(held, whole * sync.copies(tp) as i64, "{}", plans[0][i].name);
        }
    }
}
