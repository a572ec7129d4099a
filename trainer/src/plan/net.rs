//! How long a collective takes over a group of global ranks: NVLink inside
//! a node (measured bus bandwidths), the network between nodes (a bandwidth
//! per GPU and a latency). A group spanning nodes is modelled as NCCL's
//! rings over one network card per GPU ("rails"): between nodes it moves at
//! the cards' bandwidth times the group's GPUs per node, never faster than
//! inside a node; latency grows with the ring inside a node and as a tree
//! across nodes.

use crate::plan::calib::Calibration;

#[derive(Clone, Copy)]
pub struct Net<'a> {
    pub cal: &'a Calibration,
    pub per_node: usize,
}

/// A group's placement: members, nodes spanned, most members on one node.
struct Span {
    n: usize,
    nodes: usize,
    local: usize,
}

impl Net<'_> {
    fn span(&self, members: &[usize]) -> Span {
        let mut nodes: Vec<usize> = members.iter().map(|r| r / self.per_node).collect();
        nodes.sort();
        let local = nodes
            .chunk_by(|a, b| a == b)
            .map(<[usize]>::len)
            .max()
            .unwrap_or(1);
        nodes.dedup();
        Span {
            n: members.len(),
            nodes: nodes.len(),
            local,
        }
    }

    fn inter_bw(&self, s: &Span) -> f64 {
        self.cal.network.internode_gbps.value * 1e9 * s.local as f64
    }

    fn latency(&self, s: &Span) -> f64 {
        let nv = self.cal.network.nvlink_latency_us.value * 1e-6;
        if s.nodes <= 1 {
            return nv;
        }
        let ib = self.cal.network.internode_latency_us.value * 1e-6;
        nv * (s.local as f64 - 1.0).max(1.0) + ib * 2.0 * (s.nodes as f64).log2().ceil()
    }

    /// Sum of `bytes` on every member.
    pub fn all_reduce(&self, members: &[usize], bytes: f64) -> f64 {
        let s = self.span(members);
        if s.n <= 1 || bytes <= 0.0 {
            return 0.0;
        }
        let moved = 2.0 * (s.n as f64 - 1.0) / s.n as f64 * bytes;
        let nv = self.cal.nvlink_allreduce(s.local.max(2), bytes);
        if s.nodes <= 1 {
            // The measured bus bandwidth includes the latency of its size.
            return moved / nv;
        }
        moved / nv.min(self.inter_bw(&s)) + self.latency(&s)
    }

    /// An all-gather into, or a reduce-scatter of, a tensor of `bytes` in all.
    pub fn gather(&self, members: &[usize], bytes: f64) -> f64 {
        let s = self.span(members);
        if s.n <= 1 || bytes <= 0.0 {
            return 0.0;
        }
        let moved = (s.n as f64 - 1.0) / s.n as f64 * bytes;
        let mut bw = self.cal.network.nvlink_gather_gbps.value * 1e9;
        if s.nodes > 1 {
            bw = bw.min(self.inter_bw(&s));
        }
        moved / bw + self.latency(&s)
    }

    /// A message of `bytes` from rank `a` to rank `b`.
    pub fn p2p(&self, a: usize, b: usize, bytes: f64) -> f64 {
        let n = &self.cal.network;
        if a / self.per_node == b / self.per_node {
            bytes / (n.nvlink_p2p_gbps.value * 1e9) + n.nvlink_latency_us.value * 1e-6
        } else {
            bytes / (n.internode_gbps.value * 1e9) + n.internode_latency_us.value * 1e-6
        }
    }
}
