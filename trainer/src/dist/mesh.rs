//! The device mesh: the one place that maps a rank to its coordinates and
//! owns its process groups. Layout: tensor parallelism innermost (the ranks
//! of a TP group are consecutive, so they share a node and its NVLink), then
//! data parallelism: `rank = dp_rank * tp + tp_rank`.

use crate::error::{Result, TrainError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshDims {
    pub dp: usize,
    pub tp: usize,
}

impl MeshDims {
    /// The product must be the number of processes; the error names every factor.
    pub fn check(&self, world: usize) -> Result<()> {
        if self.dp * self.tp != world {
            return Err(TrainError::config(
                "parallel",
                format!(
                    "parallel.dp ({}) x parallel.tp ({}) = {} but the job has {world} process(es) (WORLD_SIZE); start dp x tp processes (e.g. `sigma launch --nproc-per-node {}`) or change parallel.dp / parallel.tp",
                    self.dp,
                    self.tp,
                    self.dp * self.tp,
                    self.dp * self.tp
                ),
            ));
        }
        Ok(())
    }

    /// (dp rank, tp rank) of global `rank`.
    pub fn coords(&self, rank: usize) -> (usize, usize) {
        (rank / self.tp, rank % self.tp)
    }

    pub fn rank(&self, dp_rank: usize, tp_rank: usize) -> usize {
        dp_rank * self.tp + tp_rank
    }

    /// The global ranks of `rank`'s data-parallel group (same tp rank).
    pub fn dp_group(&self, rank: usize) -> Vec<usize> {
        let (_, t) = self.coords(rank);
        (0..self.dp).map(|d| self.rank(d, t)).collect()
    }

    /// The global ranks of `rank`'s tensor-parallel group (same dp rank).
    pub fn tp_group(&self, rank: usize) -> Vec<usize> {
        let (d, _) = self.coords(rank);
        (0..self.tp).map(|t| self.rank(d, t)).collect()
    }

    /// One line describing the layout, for the start-up log.
    pub fn describe(&self) -> String {
        let groups = |f: &dyn Fn(usize) -> Vec<usize>, n: usize, step: usize| {
            (0..n)
                .map(|i| {
                    let g = f(i * step);
                    format!(
                        "{{{}}}",
                        g.iter()
                            .map(|r| r.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "mesh: {} rank(s) = dp {} x tp {} (tp innermost); tp groups {}; dp groups {}",
            self.dp * self.tp,
            self.dp,
            self.tp,
            groups(&|r| self.tp_group(r), self.dp, self.tp),
            groups(&|r| self.dp_group(r), self.tp, 1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinates_groups_and_a_wrong_product() {
        let m = MeshDims { dp: 2, tp: 4 };
        assert_eq!(m.coords(5), (1, 1));
        assert_eq!(m.tp_group(5), vec![4, 5, 6, 7]);
        assert_eq!(m.dp_group(5), vec![1, 5]);
        assert!(m
            .describe()
            .contains("tp groups {0,1,2,3} {4,5,6,7}; dp groups {0,4} {1,5} {2,6} {3,7}"));
        let e = m.check(6).unwrap_err().to_string();
        assert!(
            e.contains("parallel.dp (2) x parallel.tp (4) = 8") && e.contains("6 process"),
            "{e}"
        );
    }
}
