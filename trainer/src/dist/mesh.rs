//! The device mesh: the one place that maps a rank to its coordinates and
//! its groups. Layout: tensor parallelism innermost (the ranks of a TP group
//! are consecutive, so they share a node and its NVLink), then context
//! parallelism (its ring exchanges every layer's K and V), then data
//! parallelism, then pipeline stages:
//! `rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank`.
//! The `dp x cp` ranks of a stage and TP rank hold the same parameters: they
//! form the gradient (`Dp`) group; the `cp` ranks of one data-parallel rank
//! form the ring (`Cp`) group.

use crate::error::{Result, TrainError};

/// Where virtual pipeline stage `s` runs among `pp` pipeline ranks: (rank,
/// chunk on that rank). Stages are dealt round-robin (interleaved
/// schedules give each rank `v` chunks): stage `s` on rank `s % pp` as its
/// chunk `s / pp`. The one place this arithmetic is done.
pub fn stage_place(s: usize, pp: usize) -> (usize, usize) {
    (s % pp, s / pp)
}

/// The virtual stage of chunk `chunk` on pipeline rank `rank` (the inverse
/// of [`stage_place`]).
pub fn stage_of(rank: usize, chunk: usize, pp: usize) -> usize {
    chunk * pp + rank
}

/// What a process group is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupKind {
    /// The ranks holding the same parameters (`dp x cp`): gradients, ZeRO-1.
    Dp,
    Tp,
    /// The context-parallel ring (same stage, data-parallel and TP rank).
    Cp,
    /// Tensor-parallel ranks sharing a copy of a K or V head (by group size).
    Replicas(usize),
    /// The stages of a pipeline.
    Pp,
    /// The first and last stage, which both hold a tied embedding.
    Tied,
    /// Activations of virtual edge `s -> s + 1` (member 0 sends).
    EdgeAct(usize),
    /// Gradients of virtual edge `s -> s + 1` (member 0, stage `s + 1`, sends).
    EdgeGrad(usize),
}

/// A process group a rank belongs to: what it is for, its name in the
/// store, the global ranks of its members in group order, and the rank's
/// place among them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSpec {
    pub kind: GroupKind,
    pub name: String,
    pub rank: usize,
    pub members: Vec<usize>,
}

impl GroupSpec {
    pub fn size(&self) -> usize {
        self.members.len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshDims {
    pub dp: usize,
    pub cp: usize,
    pub tp: usize,
    pub pp: usize,
}

/// Where a rank sits in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coords {
    pub pp: usize,
    pub dp: usize,
    pub cp: usize,
    pub tp: usize,
}

impl MeshDims {
    /// The product must be the number of processes; the error names every factor.
    pub fn world(&self) -> usize {
        self.dp * self.cp * self.tp * self.pp
    }

    /// The mesh of a config's `[parallel]` section (`pp x dp x cp x tp` ranks).
    pub fn of(p: &crate::config::ParallelConfig) -> MeshDims {
        MeshDims {
            dp: p.dp,
            cp: p.cp,
            tp: p.tp,
            pp: p.pp,
        }
    }

    /// A layout of `dp x tp x pp` without context parallelism.
    pub fn new(dp: usize, tp: usize, pp: usize) -> MeshDims {
        MeshDims { dp, cp: 1, tp, pp }
    }

    pub fn check(&self, world: usize) -> Result<()> {
        if self.world() != world {
            let cp = if self.cp > 1 {
                format!(" x parallel.cp ({})", self.cp)
            } else {
                String::new()
            };
            return Err(TrainError::config(
                "parallel",
                format!(
                    "parallel.dp ({}){cp} x parallel.tp ({}) x parallel.pp ({}) = {} but the job has {world} process(es) (WORLD_SIZE); start that many processes (e.g. `sigma launch --nproc-per-node {}`) or change parallel.dp / parallel.cp / parallel.tp / parallel.pp",
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
            pp: rank / (self.dp * self.cp * self.tp),
            dp: (rank / (self.cp * self.tp)) % self.dp,
            cp: (rank / self.tp) % self.cp,
            tp: rank % self.tp,
        }
    }

    pub fn rank(&self, c: Coords) -> usize {
        ((c.pp * self.dp + c.dp) * self.cp + c.cp) * self.tp + c.tp
    }

    /// How many ranks hold the same parameters (`dp x cp`): the size of the
    /// gradient group, the ZeRO-1 shards and the checkpoint pieces.
    pub fn replicas(&self) -> usize {
        self.dp * self.cp
    }

    /// The place of a rank among the `dp x cp` ranks holding its parameters.
    pub fn replica_index(&self, c: Coords) -> usize {
        c.dp * self.cp + c.cp
    }

    /// The global ranks of `rank`'s data-parallel (gradient) group: same
    /// stage and tp rank, every data- and context-parallel rank.
    pub fn dp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.dp)
            .flat_map(|d| (0..self.cp).map(move |x| (d, x)))
            .map(|(d, x)| self.rank(Coords { dp: d, cp: x, ..c }))
            .collect()
    }

    /// The global ranks of `rank`'s context-parallel ring (same stage, dp
    /// and tp rank), in ring order.
    pub fn cp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.cp)
            .map(|x| self.rank(Coords { cp: x, ..c }))
            .collect()
    }

    /// The global ranks of `rank`'s tensor-parallel group (same stage, dp and cp rank).
    pub fn tp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.tp)
            .map(|t| self.rank(Coords { tp: t, ..c }))
            .collect()
    }

    /// The global ranks of `rank`'s pipeline (same dp, cp and tp rank), by stage.
    pub fn pp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.pp)
            .map(|p| self.rank(Coords { pp: p, ..c }))
            .collect()
    }

    /// Every process group `rank` belongs to, in the order every rank
    /// creates them (so communicator set-ups never wait on each other in a
    /// cycle): data-parallel, tensor-parallel, the context-parallel ring, the replica groups of K/V
    /// heads shared by `replica_sizes` consecutive tensor-parallel ranks,
    /// then with pipelines the stages, the two ends sharing a tied
    /// embedding, and the two channels of each virtual edge (`v` chunks per
    /// rank) this rank is on. The names are the store's keys for the groups.
    pub fn groups_of(
        &self,
        rank: usize,
        replica_sizes: &[usize],
        v: usize,
        tied: bool,
    ) -> Vec<GroupSpec> {
        let c = self.coords(rank);
        let mut out = Vec::new();
        let mut add = |kind, name: String, members: Vec<usize>| {
            let rank_in = members.iter().position(|&m| m == rank).expect("a member");
            out.push(GroupSpec {
                kind,
                name,
                rank: rank_in,
                members,
            });
        };
        let dp_name = if self.tp == 1 && self.pp == 1 {
            "dp".to_string()
        } else {
            format!("dp.pp{}.tp{}", c.pp, c.tp)
        };
        add(GroupKind::Dp, dp_name, self.dp_group(rank));
        // The data-parallel coordinate in group names, with the cp rank when cp > 1.
        let dpc = self.dp_tag(c);
        if self.tp > 1 {
            let name = format!("tp.pp{}.{dpc}", c.pp);
            add(GroupKind::Tp, name, self.tp_group(rank));
        }
        if self.cp > 1 {
            let name = format!("cp.pp{}.dp{}.tp{}", c.pp, c.dp, c.tp);
            add(GroupKind::Cp, name, self.cp_group(rank));
        }
        let mut sizes: Vec<usize> = Vec::new();
        for &size in replica_sizes {
            if size > 1 && !sizes.contains(&size) {
                sizes.push(size);
                let first = c.tp / size * size;
                let members = (first..first + size)
                    .map(|t| self.rank(Coords { tp: t, ..c }))
                    .collect();
                let name = format!("tp.pp{}.{dpc}.shared{size}.{}", c.pp, c.tp / size);
                add(GroupKind::Replicas(size), name, members);
            }
        }
        if self.pp > 1 {
            let line = format!("{dpc}.tp{}", c.tp);
            let stage = |p: usize| self.rank(Coords { pp: p, ..c });
            add(GroupKind::Pp, format!("pp.{line}"), self.pp_group(rank));
            if tied && (c.pp == 0 || c.pp + 1 == self.pp) {
                let ends = vec![stage(0), stage(self.pp - 1)];
                add(GroupKind::Tied, format!("tied.{line}"), ends);
            }
            for s in 0..self.pp * v - 1 {
                let (from, to) = (stage_place(s, self.pp).0, stage_place(s + 1, self.pp).0);
                if c.pp == from || c.pp == to {
                    // Activations flow from -> to (the sender is member 0),
                    // gradients back (the receiver of activations is member 0).
                    let fwd = vec![stage(from), stage(to)];
                    let bwd = vec![stage(to), stage(from)];
                    add(GroupKind::EdgeAct(s), format!("edge{s}.act.{line}"), fwd);
                    add(GroupKind::EdgeGrad(s), format!("edge{s}.grad.{line}"), bwd);
                }
            }
        }
        out
    }

    /// `dpD` (or `dpD.cpC` with context parallelism): a rank's data-parallel
    /// place in the names of the groups it shares with other axes.
    fn dp_tag(&self, c: Coords) -> String {
        if self.cp > 1 {
            format!("dp{}.cp{}", c.dp, c.cp)
        } else {
            format!("dp{}", c.dp)
        }
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
        let cp = if self.cp > 1 {
            format!(" x cp {}", self.cp)
        } else {
            String::new()
        };
        let mut s = format!(
            "mesh: {} rank(s) = pp {} x dp {}{cp} x tp {} (tp innermost); tp groups {}; dp groups {}",
            self.world(),
            self.pp,
            self.dp,
            self.tp,
            list(&|r| self.tp_group(r)),
            list(&|r| self.dp_group(r)),
        );
        if self.cp > 1 {
            s.push_str(&format!("; cp rings {}", list(&|r| self.cp_group(r))));
        }
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
        let m = MeshDims::new(2, 4, 1);
        assert_eq!(
            m.coords(5),
            Coords {
                pp: 0,
                dp: 1,
                cp: 0,
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
        let m = MeshDims::new(2, 2, 2);
        assert_eq!(
            m.coords(6),
            Coords {
                pp: 1,
                dp: 1,
                cp: 0,
                tp: 0
            }
        );
        assert_eq!(m.pp_group(6), vec![2, 6]);
        assert!(m.describe().contains("pipelines {0,4} {1,5} {2,6} {3,7}"));
    }

    /// cp sits between tp and dp: a ring is `cp` ranks `tp` apart, the
    /// gradient group holds every dp and cp rank of a tp rank, and a product
    /// that is not the world names parallel.cp.
    #[test]
    fn context_parallel_ranks_and_groups() {
        let m = MeshDims {
            dp: 2,
            cp: 2,
            tp: 2,
            pp: 1,
        };
        let c = m.coords(5);
        assert_eq!((c.dp, c.cp, c.tp), (1, 0, 1));
        assert_eq!(m.rank(c), 5);
        assert_eq!(m.cp_group(5), vec![5, 7]);
        assert_eq!(m.tp_group(5), vec![4, 5]);
        assert_eq!(m.dp_group(5), vec![1, 3, 5, 7]);
        assert_eq!(m.replica_index(c), 2);
        let names: Vec<String> = m
            .groups_of(5, &[], 1, false)
            .into_iter()
            .map(|g| g.name)
            .collect();
        assert_eq!(names, ["dp.pp0.tp1", "tp.pp0.dp1.cp0", "cp.pp0.dp1.tp1"]);
        assert!(
            m.describe().contains("cp rings {0,2} {1,3} {4,6} {5,7}"),
            "{}",
            m.describe()
        );
        let e = m.check(4).unwrap_err().to_string();
        assert!(e.contains("parallel.cp (2)") && e.contains("= 8"), "{e}");
    }
}
