//! Context parallelism's attention ring (docs/context-parallel.md): the
//! engine's own step between a block's query heads and its output
//! projection, with no autograd inside.
//!
//! Each of the `n` ranks of the ring holds pieces `i` and `2n - 1 - i` of
//! every sequence (`model::Pieces`). Forward: in `n` steps each rank attends
//! its two query pieces to the two K/V pieces in hand (a key piece after the
//! query piece gives nothing, the same piece is causal, an earlier one is
//! full), merging the partial results by their log-sum-exp, and passes K and
//! V to the next rank (`i + 1`), receiving from the previous. K and V travel
//! as the model made them (`n_k` and `n_v` heads at their own widths).
//! Backward: K and V go round again; each step adds the gradients of the K/V
//! pieces in hand into accumulators (fp32) that travel with them, and one
//! more hop after the last step brings every accumulator home.

use std::cell::RefCell;

use tch::Tensor;

use crate::dist::Collectives;
use crate::error::Result;
use crate::model::lse::{self, Partial};
use crate::model::Pieces;

/// A rank's place in the ring and the ring's group.
pub struct Ring {
    pub pieces: Pieces,
    comm: RefCell<Box<dyn Collectives>>,
}

/// What the forward keeps for backward: the merged output and log-sum-exp
/// of each of the two local query pieces.
pub struct Saved(Vec<Partial>);

impl Ring {
    /// The ring of `comm`'s ranks, this rank at `comm.rank()`.
    pub fn new(comm: Box<dyn Collectives>) -> Ring {
        let pieces = Pieces {
            n: comm.world(),
            i: comm.rank(),
        };
        Ring {
            pieces,
            comm: RefCell::new(comm),
        }
    }

    /// Start sending every tensor to the next rank and receiving its like
    /// from the previous one; the received tensors may be read only after
    /// [`Ring::land`] (on NCCL the attention of the piece in hand runs
    /// meanwhile; the CPU store completes each hop at once).
    fn hop(&self, ts: &[&Tensor]) -> Result<Vec<Tensor>> {
        let (n, i) = (self.pieces.n, self.pieces.i);
        let mut comm = self.comm.borrow_mut();
        ts.iter()
            .map(|t| {
                let t = t.contiguous();
                let mut into = t.empty_like();
                comm.start_send_recv(&t, (i + 1) % n, &mut into, (i + n - 1) % n)?;
                Ok(into)
            })
            .collect()
    }

    /// Order what follows after every hop started.
    fn land(&self) -> Result<()> {
        self.comm.borrow_mut().wait_pending()
    }

    /// The (local query piece, K/V piece in hand, causal) pairs that attend
    /// at the step where the K/V of ring rank `src` are in hand.
    fn pairs(&self, src: usize) -> Vec<(usize, usize, bool)> {
        let theirs = Pieces {
            i: src,
            ..self.pieces
        }
        .ids();
        let mut out = Vec::new();
        for (a, &ga) in self.pieces.ids().iter().enumerate() {
            for (b, &gb) in theirs.iter().enumerate() {
                if gb <= ga {
                    out.push((a, b, gb == ga));
                }
            }
        }
        out
    }

    /// Attention of the local query heads `q` [b, n_q, 2c, d_qk] to the
    /// whole sequence's keys and values, of which this rank holds `k`
    /// [b, n_k, 2c, d_qk] and `v` [b, n_v, 2c, d_v]: the heads' outputs
    /// `[b, 2c, n_q d_v]` in `q`'s dtype, and what backward needs.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<(Tensor, Saved)> {
        let n = self.pieces.n;
        let c = q.size()[2] / 2;
        let (mut kk, mut vv) = (k.contiguous(), v.contiguous());
        let mut acc: [Option<Partial>; 2] = [None, None];
        for s in 0..n {
            let src = (self.pieces.i + n - s) % n;
            // The next step's K/V travel while this step's pairs are computed.
            let next = if s + 1 < n {
                Some(self.hop(&[&kk, &vv])?)
            } else {
                None
            };
            for (a, b, causal) in self.pairs(src) {
                let part = lse::forward(
                    &q.narrow(2, a as i64 * c, c),
                    &kk.narrow(2, b as i64 * c, c),
                    &vv.narrow(2, b as i64 * c, c),
                    causal,
                    scale,
                );
                acc[a] = Some(lse::merge(acc[a].take(), part));
            }
            if let Some(mut kv) = next {
                self.land()?;
                vv = kv.pop().expect("v");
                kk = kv.pop().expect("k");
            }
        }
        let parts: Vec<Partial> = acc
            .into_iter()
            .map(|p| p.expect("every query piece attends to itself"))
            .collect();
        let o = Tensor::cat(&[&parts[0].o, &parts[1].o], 2);
        let (b, nq, t, dv) = (o.size()[0], o.size()[1], o.size()[2], o.size()[3]);
        let o = o.transpose(1, 2).reshape([b, t, nq * dv]).to_kind(q.kind());
        Ok((o, Saved(parts)))
    }

    /// Gradients of `q`, `k` and `v` (this rank's, in their dtypes) from the
    /// gradient `g` of the heads' outputs `[b, 2c, n_q d_v]`.
    pub fn backward(
        &self,
        g: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        saved: &Saved,
        scale: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let n = self.pieces.n;
        let (b, nq, t) = (q.size()[0], q.size()[1], q.size()[2]);
        let c = t / 2;
        let g = g.view([b, t, nq, -1]).transpose(1, 2);
        let piece = |x: &Tensor, a: usize| x.narrow(2, a as i64 * c, c);
        let gs = [piece(&g, 0), piece(&g, 1)];
        let deltas = [0, 1].map(|a| lse::delta(&gs[a], &saved.0[a].o));
        let acc = saved.0[0].o.kind();
        let dq = Tensor::zeros(q.size(), (acc, q.device()));
        let (mut kk, mut vv) = (k.contiguous(), v.contiguous());
        let mut dk = Tensor::zeros(k.size(), (acc, k.device()));
        let mut dv = Tensor::zeros(v.size(), (acc, v.device()));
        for s in 0..n {
            let src = (self.pieces.i + n - s) % n;
            let next = if s + 1 < n {
                Some(self.hop(&[&kk, &vv])?)
            } else {
                None
            };
            for (a, bp, causal) in self.pairs(src) {
                let (gq, gk, gv) = lse::backward(
                    &gs[a],
                    &piece(q, a),
                    &piece(&kk, bp),
                    &piece(&vv, bp),
                    &saved.0[a],
                    &deltas[a],
                    causal,
                    scale,
                );
                let _ = piece(&dq, a).g_add_(&gq);
                let _ = piece(&dk, bp).g_add_(&gk);
                let _ = piece(&dv, bp).g_add_(&gv);
            }
            // The accumulators follow the K/V they belong to; after the last
            // step this hop takes them home.
            if n > 1 {
                let mut d = self.hop(&[&dk, &dv])?;
                self.land()?;
                dv = d.pop().expect("dv");
                dk = d.pop().expect("dk");
            }
            if let Some(mut kv) = next {
                vv = kv.pop().expect("v");
                kk = kv.pop().expect("k");
            }
        }
        Ok((
            dq.to_kind(q.kind()),
            dk.to_kind(k.kind()),
            dv.to_kind(v.kind()),
        ))
    }
}
