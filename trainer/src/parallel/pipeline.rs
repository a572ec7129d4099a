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
pub fn balanced_split(num_layers: usize, stages: usize, head: f64) -> Vec<usize> {
    // best[s][l]: smallest possible maximum over the first s stages holding l layers.
    let inf = f64::INFINITY;
    let mut best = vec![vec![inf; num_layers + 1]; stages + 1];
    let mut cut = vec![vec![0usize; num_layers + 1]; stages + 1];
    best[0][0] = 0.0;
    for s in 1..=stages {
        for l in s..=num_layers {
            for k in (s - 1)..l {
                let mut cost = (l - k) as f64;
                if s == stages {
                    cost += head;
                }
                let m = best[s - 1][k].max(cost);
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
        let k = cut[s][l];
        counts[s - 1] = l - k;
        l = k;
    }
    counts
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
