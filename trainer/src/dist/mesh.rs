//! The device mesh: the one place that maps a rank to its coordinates and
//! its groups. Layout: tensor parallelism innermost (the ranks of a TP group
//! are consecutive, so they share a node and its NVLink), then data
//! parallelism, then pipeline stages:
//! `rank = (pp_rank * dp + dp_rank) * tp + tp_rank`.

use crate::error::{Result, TrainError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshDims {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
}

/// Where a rank sits in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coords {
    pub pp: usize,
    pub dp: usize,
    pub tp: usize,
}

impl MeshDims {
    /// The product must be the number of processes; the error names every factor.
    pub fn world(&self) -> usize {
        self.dp * self.tp * self.pp
    }

    pub fn check(&self, world: usize) -> Result<()> {
        if self.world() != world {
            return Err(TrainError::config(
                "parallel",
                format!(
                    "parallel.dp ({}) x parallel.tp ({}) x parallel.pp ({}) = {} but the job has {world} process(es) (WORLD_SIZE); start dp x tp x pp processes (e.g. `sigma launch --nproc-per-node {}`) or change parallel.dp / parallel.tp / parallel.pp",
                    self.dp,
                    self.tp,
                    self.pp,
                    self.world(),
                    self.world()
                ),
            ));
        }
        Ok(())
    }

    pub fn coords(&self, rank: usize) -> Coords {
        Coords {
            pp: rank / (self.dp * self.tp),
            dp: (rank / self.tp) % self.dp,
            tp: rank % self.tp,
        }
    }

    pub fn rank(&self, c: Coords) -> usize {
        (c.pp * self.dp + c.dp) * self.tp + c.tp
    }

    /// The global ranks of `rank`'s data-parallel group (same stage and tp rank).
    pub fn dp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.dp)
            .map(|d| self.rank(Coords { dp: d, ..c }))
            .collect()
    }

    /// The global ranks of `rank`'s tensor-parallel group (same stage and dp rank).
    pub fn tp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.tp)
            .map(|t| self.rank(Coords { tp: t, ..c }))
            .collect()
    }

    /// The global ranks of `rank`'s pipeline (same dp and tp rank), by stage.
    pub fn pp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.pp)
            .map(|p| self.rank(Coords { pp: p, ..c }))
            .collect()
    }

    /// One line describing the layout, for the start-up log.
    pub fn describe(&self) -> String {
        let all: Vec<usize> = (0..self.world()).collect();
        let list = |f: &dyn Fn(usize) -> Vec<usize>| {
            let mut seen: Vec<Vec<usize>> = Vec::new();
            for &r in &all {
                let g = f(r);
                if !seen.contains(&g) {
                    seen.push(g);
                }
            }
            seen.iter()
                .map(|g| {
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
        let mut s = format!(
            "mesh: {} rank(s) = pp {} x dp {} x tp {} (tp innermost); tp groups {}; dp groups {}",
            self.world(),
            self.pp,
            self.dp,
            self.tp,
            list(&|r| self.tp_group(r)),
            list(&|r| self.dp_group(r)),
        );
        if self.pp > 1 {
            s.push_str(&format!("; pipelines {}", list(&|r| self.pp_group(r))));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinates_groups_and_a_wrong_product() {
        let m = MeshDims {
            dp: 2,
            tp: 4,
            pp: 1,
        };
        assert_eq!(
            m.coords(5),
            Coords {
                pp: 0,
                dp: 1,
                tp: 1
            }
        );
        assert_eq!(m.tp_group(5), vec![4, 5, 6, 7]);
        assert_eq!(m.dp_group(5), vec![1, 5]);
        let d = m.describe();
        assert!(
            d.contains("tp groups {0,1,2,3} {4,5,6,7}; dp groups {0,4} {1,5} {2,6} {3,7}"),
            "{d}"
        );
        let e = m.check(6).unwrap_err().to_string();
        assert!(
            e.contains("parallel.dp (2) x parallel.tp (4) x parallel.pp (1) = 8")
                && e.contains("6 process"),
            "{e}"
        );
        let m = MeshDims {
            dp: 2,
            tp: 2,
            pp: 2,
        };
        assert_eq!(
            m.coords(6),
            Coords {
                pp: 1,
                dp: 1,
                tp: 0
            }
        );
        assert_eq!(m.pp_group(6), vec![2, 6]);
        assert!(m.describe().contains("pipelines {0,4} {1,5} {2,6} {3,7}"));
    }
}
