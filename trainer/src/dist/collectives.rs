//! One interface for collectives, per named group. `StoreCollectives` is the
//! CPU backend: tensors travel as bytes through the rendezvous store over TCP,
//! and reductions add contributions in rank order, so every rank gets the
//! bit-identical result and runs are reproducible. It is meant for tests and
//! CPU runs; GPUs use NCCL behind the same trait.

use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::store::StoreClient;
use crate::error::{Result, TrainError};

pub trait Collectives {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// In place: every rank ends with the elementwise sum over ranks.
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()>;
    /// Start an in-place sum all-reduce of `t` and return without waiting for
    /// it; the result may be read only after `wait_pending`. Backends without
    /// asynchronous progress (the CPU store) complete it before returning.
    fn start_all_reduce_sum(&mut self, t: &Tensor) -> Result<()> {
        self.all_reduce_sum(&mut t.shallow_clone())
    }
    /// Order everything after this call behind every started collective.
    fn wait_pending(&mut self) -> Result<()> {
        Ok(())
    }
    /// In place: every rank ends with `root`'s tensor.
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()>;
    /// Every rank's tensor, in rank order.
    fn all_gather(&mut self, t: &Tensor) -> Result<Vec<Tensor>>;
    /// The sum over ranks of `t` (numel divisible by the world size), split in
    /// `world` equal parts; rank `r` gets part `r`.
    fn reduce_scatter_sum(&mut self, t: &Tensor) -> Result<Tensor>;
    /// `all_gather` started without waiting, into one flat tensor (the ranks'
    /// tensors flattened, in rank order); it may be read only after
    /// `wait_pending` (the CPU store completes it before returning).
    fn start_all_gather_flat(&mut self, t: &Tensor) -> Result<Tensor> {
        let parts: Vec<Tensor> = self
            .all_gather(t)?
            .iter()
            .map(|p| p.reshape([-1]))
            .collect();
        Ok(Tensor::cat(&parts, 0))
    }
    /// `reduce_scatter_sum` started without waiting: the part may be read
    /// only after `wait_pending` (the CPU store completes it before returning).
    fn start_reduce_scatter_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        self.reduce_scatter_sum(t)
    }
    fn send(&mut self, t: &Tensor, to: usize) -> Result<()>;
    /// Start sending `t` to `to` without making later compute wait for the
    /// receiver; the buffer is kept until `wait_pending`. Backends whose sends
    /// never wait (the CPU store) just send.
    fn start_send(&mut self, t: &Tensor, to: usize) -> Result<()> {
        self.send(t, to)
    }
    fn recv(&mut self, t: &mut Tensor, from: usize) -> Result<()>;
    /// Send `t` to `to` and receive `into` from `from` as one step (a hop of
    /// a ring, where every rank sends and receives, so neither side may
    /// wait for the other first). Backends whose sends never wait (the CPU
    /// store) send, then receive.
    fn send_recv(&mut self, t: &Tensor, to: usize, into: &mut Tensor, from: usize) -> Result<()> {
        self.start_send(t, to)?;
        self.recv(into, from)
    }
    /// `send_recv` started without waiting: `into` may be read, and `t`
    /// written, only after `wait_pending` (the CPU store completes it
    /// before returning).
    fn start_send_recv(
        &mut self,
        t: &Tensor,
        to: usize,
        into: &mut Tensor,
        from: usize,
    ) -> Result<()> {
        self.send_recv(t, to, into, from)
    }
    fn barrier(&mut self) -> Result<()>;
}

pub struct StoreCollectives {
    store: StoreClient,
    group: String,
    rank: usize,
    world: usize,
    seq: u64,
    /// Point-to-point messages are numbered per (sender, receiver) pair, on
    /// both sides, so they match whatever else each rank does in between.
    sent: std::collections::HashMap<usize, u64>,
    received: std::collections::HashMap<usize, u64>,
    timeout: Duration,
}

fn to_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut v = vec![0u8; n];
    t.copy_data_u8(&mut v, t.numel());
    v
}

fn from_bytes(b: &[u8], like: &Tensor) -> Tensor {
    Tensor::from_data_size(b, &like.size(), like.kind()).to_device(like.device())
}

impl StoreCollectives {
    pub fn new(
        store: StoreClient,
        group: &str,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> StoreCollectives {
        StoreCollectives {
            store,
            group: group.into(),
            rank,
            world,
            seq: 0,
            sent: Default::default(),
            received: Default::default(),
            timeout,
        }
    }

    fn key(&self, op: &str, seq: u64, rank: usize) -> String {
        format!("coll/{}/{op}/{seq}/{rank}", self.group)
    }

    /// Publish this rank's bytes, then fetch every rank's in rank order.
    fn exchange(&mut self, op: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let seq = self.seq;
        let k = self.key(op, seq, self.rank);
        self.store.set(&k, mine)?;
        let keys: Vec<String> = (0..self.world).map(|r| self.key(op, seq, r)).collect();
        if let Err(e) = self.store.wait(&keys, self.timeout) {
            let missing: Vec<String> = (0..self.world)
                .filter(|&r| self.store.get(&keys[r]).is_err())
                .map(|r| r.to_string())
                .collect();
            let message = format!(
                "rank(s) {} did not arrive within {:?} (lost or hung): {e}",
                missing.join(", "),
                self.timeout
            );
            return Err(self.error(op, message));
        }
        let all = keys
            .iter()
            .map(|k| self.store.get(k))
            .collect::<Result<Vec<_>>>()?;
        // Everyone has read everything before the keys go away.
        self.store
            .barrier(&format!("{}/{op}/{seq}", self.group), self.world)
            .map_err(|e| self.timeout_error(op, e))?;
        self.store.delete(&k)?;
        Ok(all)
    }

    fn timeout_error(&self, op: &str, e: TrainError) -> TrainError {
        self.error(op, e.to_string())
    }

    fn error(&self, op: &str, message: String) -> TrainError {
        TrainError::Collective {
            op: op.into(),
            group: self.group.clone(),
            rank: self.rank,
            world: self.world,
            message,
        }
    }
}

impl Collectives for StoreCollectives {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        let parts = self.exchange("all_reduce", &to_bytes(t))?;
        tch::no_grad(|| {
            let mut acc = from_bytes(&parts[0], t);
            for p in &parts[1..] {
                acc += from_bytes(p, t);
            }
            t.copy_(&acc);
        });
        Ok(())
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        let mine = if self.rank == root {
            to_bytes(t)
        } else {
            Vec::new()
        };
        let parts = self.exchange("broadcast", &mine)?;
        tch::no_grad(|| t.copy_(&from_bytes(&parts[root], t)));
        Ok(())
    }

    fn all_gather(&mut self, t: &Tensor) -> Result<Vec<Tensor>> {
        let parts = self.exchange("all_gather", &to_bytes(t))?;
        Ok(parts.iter().map(|p| from_bytes(p, t)).collect())
    }

    fn reduce_scatter_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        let n = t.numel() as i64;
        if n % self.world as i64 != 0 {
            let message = format!("{n} elements do not split over {} ranks", self.world);
            return Err(self.error("reduce_scatter", message));
        }
        let mut full = t.copy();
        self.all_reduce_sum(&mut full)?;
        let part = n / self.world as i64;
        Ok(full
            .view([-1])
            .narrow(0, self.rank as i64 * part, part)
            .copy())
    }

    fn send(&mut self, t: &Tensor, to: usize) -> Result<()> {
        let n = self.sent.entry(to).or_insert(0);
        *n += 1;
        let k = format!("p2p/{}/{}->{to}/{}", self.group, self.rank, n);
        self.store.set(&k, &to_bytes(t))
    }

    fn recv(&mut self, t: &mut Tensor, from: usize) -> Result<()> {
        let n = self.received.entry(from).or_insert(0);
        *n += 1;
        let k = format!("p2p/{}/{from}->{}/{}", self.group, self.rank, n);
        self.store
            .wait(std::slice::from_ref(&k), self.timeout)
            .map_err(|e| self.timeout_error("recv", e))?;
        let b = self.store.get(&k)?;
        self.store.delete(&k)?;
        tch::no_grad(|| t.copy_(&from_bytes(&b, t)));
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.seq += 1;
        let name = format!("{}/barrier/{}", self.group, self.seq);
        self.store
            .barrier(&name, self.world)
            .map_err(|e| self.timeout_error("barrier", e))
    }
}

/// A one-element f64 tensor on `device` (loss sums and norms travel in f64).
pub fn scalar(v: f64, device: Device) -> Tensor {
    Tensor::from_slice(&[v])
        .to_kind(Kind::Double)
        .to_device(device)
}
