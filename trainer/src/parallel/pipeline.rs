//! Pipeline parallelism: the model's layers cut into `pp x v` virtual
//! stages (`v` chunks per rank, interleaved), a schedule of forward and
//! backward passes per rank (schedule.rs), and its execution with
//! activations and gradients crossing stages by send/recv (exec.rs).
//!
//! Virtual stage `s` runs on pipeline rank `s % pp` as its chunk `s / pp`.
//! The first stage also runs the embedding, the last the final norm, the
//! output head and the loss. With tied embeddings both hold the embedding
//! matrix, and its gradient is summed over the two before the optimizer step.

use std::ops::Range;

use crate::config::ModelConfig;
use crate::error::{Result, TrainError};
use crate::model::key::ParamKey;
use crate::model::summary::summarize;

/// This rank's share of the layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelinePlan {
    pub pp: usize,
    /// Chunks per rank (virtual stages per rank).
    pub v: usize,
    /// This rank's position in the pipeline.
    pub rank: usize,
    /// Layers of every virtual stage, in order.
    pub layers: Vec<Range<usize>>,
}

/// The output head's cost in layers: its matmul parameters (vocabulary x
/// width) over one layer's; the embedding lookup costs next to nothing (it
/// adds memory, not time).
pub fn head_cost(c: &ModelConfig) -> f64 {
    // matmul_params counts the output projection once, tied or not.
    let s = summarize(c, 1);
    let head = (c.vocab_size * c.d_model) as f64;
    let per_layer = (s.matmul_params as f64 - head) / c.num_layers as f64;
    head / per_layer.max(1.0)
}

/// Contiguous layer counts for `stages` stages (each at least one layer)
/// minimising the largest stage cost, the last stage also paying `head`.
///
/// The dynamic programme over (stages, layers) that defines the split
/// takes, for each cell, the first cut with the smallest largest cost. Its
/// value for the first `s < stages` stages over `l` layers is `ceil(l / s)`
/// (each layer costs one; the head is only in the last stage), so only the
/// cells of the answer's path are searched: O(stages x layers), not
/// O(stages x layers^2) (`sigma plan` splits every layout's pipeline). A
/// test holds it to the whole programme.
pub fn balanced_split(num_layers: usize, stages: usize, head: f64) -> Vec<usize> {
    let mut counts = vec![0; stages];
    let mut l = num_layers;
    for s in (1..=stages).rev() {
        let k = best_cut(s, l, stages, head);
        counts[s - 1] = l - k;
        l = k;
    }
    counts
}

/// The programme's smallest largest cost of `l` layers over the first `s`
/// stages, for `s` short of the last stage: `ceil(l / s)`, infinite where a
/// stage would be empty (no stages: zero for no layers).
fn first_stages_cost(s: usize, l: usize) -> f64 {
    match s {
        0 if l == 0 => 0.0,
        0 => f64::INFINITY,
        _ if l < s => f64::INFINITY,
        _ => l.div_ceil(s) as f64,
    }
}

/// Where the programme cuts `l` layers over the first `s` of `stages`
/// stages: the first `k` (layers before stage `s`) whose largest cost is
/// below every earlier one's by more than 1e-12 (0 where none is finite).
fn best_cut(s: usize, l: usize, stages: usize, head: f64) -> usize {
    let (mut best, mut cut) = (f64::INFINITY, 0);
    for k in s.saturating_sub(1)..l {
        let mut cost = (l - k) as f64;
        if s == stages {
            cost += head;
        }
        let m = first_stages_cost(s - 1, k).max(cost);
        if m < best - 1e-12 {
            best = m;
            cut = k;
        }
    }
    cut
}

impl PipelinePlan {
    /// Check the layout; `explicit`: `parallel.pp_layers`.
    pub fn check(c: &ModelConfig, pp: usize, v: usize, explicit: Option<&[usize]>) -> Result<()> {
        let stages = pp * v;
        if let Some(e) = explicit {
            if e.len() != stages {
                return Err(TrainError::config(
                    "parallel.pp_layers",
                    format!(
                        "has {} entries but the pipeline has pp x pp_virtual_stages = {pp} x {v} = {stages} stages",
                        e.len()
                    ),
                ));
            }
            let sum: usize = e.iter().sum();
            if sum != c.num_layers {
                return Err(TrainError::config(
                    "parallel.pp_layers",
                    format!(
                        "{e:?} sums to {sum}, but model.num_layers is {}",
                        c.num_layers
                    ),
                ));
            }
            if e.contains(&0) {
                return Err(TrainError::config(
                    "parallel.pp_layers",
                    format!("{e:?}: every stage needs at least one layer"),
                ));
            }
        } else if c.num_layers < stages {
            return Err(TrainError::config(
                "parallel.pp",
                format!(
                    "model.num_layers ({}) is fewer than the pipeline's stages (pp x pp_virtual_stages = {pp} x {v} = {stages}): every stage needs a layer",
                    c.num_layers
                ),
            ));
        }
        Ok(())
    }

    pub fn new(
        c: &ModelConfig,
        pp: usize,
        v: usize,
        explicit: Option<&[usize]>,
        rank: usize,
    ) -> PipelinePlan {
        let counts = match explicit {
            Some(e) => e.to_vec(),
            None if pp == 1 => vec![c.num_layers],
            None => balanced_split(c.num_layers, pp * v, head_cost(c)),
        };
        let mut layers = Vec::new();
        let mut at = 0;
        for n in counts {
            layers.push(at..at + n);
            at += n;
        }
        PipelinePlan {
            pp,
            v,
            rank,
            layers,
        }
    }

    /// One stage holding everything.
    pub fn single(c: &ModelConfig) -> PipelinePlan {
        PipelinePlan::new(c, 1, 1, None, 0)
    }

    pub fn num_stages(&self) -> usize {
        self.pp * self.v
    }

    /// This rank's chunks: (chunk, virtual stage, its layers).
    pub fn chunks(&self) -> Vec<(usize, usize, Range<usize>)> {
        (0..self.v)
            .map(|c| {
                let s = crate::dist::mesh::stage_of(self.rank, c, self.pp);
                (c, s, self.layers[s].clone())
            })
            .collect()
    }

    /// Runs the embedding (virtual stage 0).
    pub fn first(&self) -> bool {
        self.rank == 0
    }

    /// Runs the head and the loss (the last virtual stage).
    pub fn last(&self) -> bool {
        self.rank == self.pp - 1
    }

    pub fn holds_layer(&self, l: usize) -> bool {
        self.chunks().iter().any(|(_, _, r)| r.contains(&l))
    }

    /// Whether this rank's stages hold parameter `key`: a block's weights on
    /// the stage running it, the embedding on the first stage (and the last
    /// when tied to the head), the final norm and untied head on the last.
    pub fn holds(&self, c: &ModelConfig, key: ParamKey) -> bool {
        match key {
            ParamKey::Embed => self.first() || (self.last() && c.tie_embeddings),
            ParamKey::FinalNorm | ParamKey::LmHead => self.last(),
            ParamKey::Layer(l, _) => self.holds_layer(l),
        }
    }

    /// Whether `key` is the tied embedding held by both ends of the
    /// pipeline (its gradient is summed over the two).
    pub fn tied_across(&self, c: &ModelConfig, key: ParamKey) -> bool {
        key == ParamKey::Embed && self.pp > 1 && c.tie_embeddings
    }

    /// `layers 0-12 | 13-25 (+ head)`: the split, for the start-up log.
    pub fn describe(&self) -> String {
        let n = self.num_stages();
        self.layers
            .iter()
            .enumerate()
            .map(|(s, r)| {
                let mut t = format!("{}-{}", r.start, r.end.saturating_sub(1));
                if s == 0 {
                    t = format!("(embedding +) {t}");
                }
                if s + 1 == n {
                    t.push_str(" (+ head)");
                }
                format!(
                    "stage {s} on rank {}: layers {t}",
                    crate::dist::mesh::stage_place(s, self.pp).0
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split as the whole dynamic programme over (stages, layers)
    /// gives it, O(stages x layers^2): the reference for `balanced_split`.
    fn whole_programme(num_layers: usize, stages: usize, head: f64) -> Vec<usize> {
        let inf = f64::INFINITY;
        let mut best = vec![vec![inf; num_layers + 1]; stages + 1];
        let mut cut = vec![vec![0usize; num_layers + 1]; stages + 1];
        best[0][0] = 0.0;
        for s in 1..=stages {
            for l in s..=num_layers {
                for k in (s - 1)..l {
                    let extra = if s == stages { head } else { 0.0 };
                    let m = best[s - 1][k].max((l - k) as f64 + extra);
                    if m < best[s][l] - 1e-12 {
                        best[s][l] = m;
                        cut[s][l] = k;
                    }
                }
            }
        }
        let mut counts = vec![0; stages];
        let mut l = num_layers;
        for s in (1..=stages).rev() {
            counts[s - 1] = l - cut[s][l];
            l = cut[s][l];
        }
        counts
    }

    /// The split searched along its path equals the whole programme's for
    /// every model of up to 48 layers, every stage count to one past the
    /// layers, and heads that tie with whole layers or miss them by a hair.
    #[test]
    fn the_split_is_the_whole_programmes() {
        let heads = [0.0, 1e-13, 0.5, 1.0, 2.0, 3.9, 7.0 + 1e-12, 10.0, 64.5];
        for layers in 1..=48 {
            for stages in 1..=layers + 1 {
                for &head in &heads {
                    assert_eq!(
                        balanced_split(layers, stages, head),
                        whole_programme(layers, stages, head),
                        "{layers} layers, {stages} stages, head {head}"
                    );
                }
            }
        }
        // A model of 4,096 layers over 512 stages is split at once, its
        // largest stage costing 9 layers, the least possible
        // (ceil((4,096 + 3.9) / 512)): the last holds 5 and the head.
        let split = balanced_split(4096, 512, 3.9);
        assert_eq!(split.iter().sum::<usize>(), 4096);
        assert_eq!(split[511], 5, "{split:?}");
        assert!(split.iter().all(|&n| (1..=9).contains(&n)), "{split:?}");
    }

    #[test]
    fn the_default_split_gives_the_head_stage_fewer_layers() {
        // 26 layers on 2 stages with a head worth 3.9 layers: 15 + (11 + head).
        assert_eq!(balanced_split(26, 2, 3.9), vec![15, 11]);
        assert_eq!(balanced_split(8, 4, 0.0), vec![2, 2, 2, 2]);
        // Never an empty stage, even when the head outweighs the layers.
        assert_eq!(balanced_split(4, 4, 10.0), vec![1, 1, 1, 1]);
    }

    #[test]
    fn bad_splits_name_the_key() {
        let c: ModelConfig = toml::from_str(
            "vocab_size = 64\nd_model = 16\nnum_layers = 4\nffn_dim = 32\nnum_q_heads = 4\n\
             num_k_heads = 2\nnum_v_heads = 4\nqk_head_dim = 4\nv_head_dim = 4\n",
        )
        .expect("config");
        let e = PipelinePlan::check(&c, 2, 1, Some(&[1, 2]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("parallel.pp_layers") && e.contains("sums to 3"),
            "{e}"
        );
        let e = PipelinePlan::check(&c, 2, 1, Some(&[1, 2, 1]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 entries"), "{e}");
        let e = PipelinePlan::check(&c, 4, 2, None).unwrap_err().to_string();
        assert!(e.contains("fewer than the pipeline's stages"), "{e}");
    }
}
