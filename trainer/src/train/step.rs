//! One training step, in phases: gather the micro-batches, forward and
//! backward each through the engine (or the pipeline schedule), make the
//! gradients whole, agree with every rank on the loss and on stop and save
//! requests, and update. And validation, which runs the same engine without
//! gradients.

use std::collections::BTreeMap;
use std::time::Instant;

use sigma_data::Batch;
use tch::{Device, Kind, Tensor};

use crate::dist::Collectives;
use crate::engine::pipeline::StepInput;
use crate::engine::{Program, Runner};
use crate::error::Result;
use crate::guard;
use crate::parallel::schedule::Schedule;
use crate::train::lr::lr_at;
use crate::train::profile::Window;
use crate::train::{StepOutcome, Trainer};

/// Token ids of a batch as an int64 tensor [rows, seq_len + 1] on `device`.
pub fn batch_tensor(b: &Batch, device: Device) -> Tensor {
    let ids: Vec<i64> = b.tokens.iter().map(|&t| t as i64).collect();
    Tensor::from_slice(&ids)
        .view([b.rows as i64, (b.seq_len + 1) as i64])
        .to_device(device)
}

/// The runner of a trainer's model (a macro: it borrows the fields, so the
/// other fields stay free for mutable borrows).
macro_rules! runner {
    ($t:expr) => {
        Runner {
            model: &$t.model,
            plan: &$t.layout.tp,
            opts: $t.opts,
            sink: $t.sink.as_ref(),
            ring: $t.ring.as_ref(),
        }
    };
}

impl Trainer {
    /// One optimizer step: gather the micro-batches, forward/backward each,
    /// agree with every rank on the loss and on stop/save requests, update.
    pub(super) fn train_step(&mut self, step: u64) -> Result<StepOutcome> {
        let t0 = Instant::now();
        guard::at("data loading", None);
        let batches: Vec<Batch> = (0..self.cfg.accum_steps_at(step))
            .map(|_| self.loader.next_batch())
            .collect::<std::result::Result<_, _>>()?;
        let t_data = t0.elapsed().as_secs_f64();
        // Every rank holds the same number of rows: the global batch is dp times this rank's.
        let target_tokens: usize =
            batches.iter().map(|b| b.rows * b.seq_len).sum::<usize>() * self.cfg.parallel.dp;
        let scale = 1.0 / target_tokens as f64;
        if let Some(p) = self.profiler.as_mut() {
            p.begin(Window::ForwardBackward);
        }
        let loss_sum = if self.cfg.parallel.pp > 1 {
            self.pipeline_pass(&batches, scale, step)?
        } else {
            self.micro_batches(&batches, scale)?
        };
        self.reduce_gradients()?;
        let flags = self.agree(loss_sum.double_value(&[]))?;
        self.sync();
        if let Some(p) = self.profiler.as_mut() {
            p.end();
        }
        let t_fwd_bwd = t0.elapsed().as_secs_f64() - t_data;
        let loss = flags[0] / target_tokens as f64;
        let lr = lr_at(&self.cfg.optim, step, self.cfg.train.steps);
        let stats = self.update(lr, loss, t_data)?;
        let dt = t0.elapsed().as_secs_f64();
        Ok(StepOutcome {
            loss,
            lr,
            stats,
            target_tokens,
            dt,
            phases: [t_data, t_fwd_bwd, dt - t_data - t_fwd_bwd],
            stop_signal: flags[1] > 0.0,
            save_timed: flags[2] > 0.0,
            tp_comm_s: self
                .opts
                .time_collectives
                .then(crate::engine::take_comm_seconds),
        })
    }

    /// Loss and the stop / timed-save requests travel together, so every
    /// rank agrees on them: [loss sum, signal received, save time reached
    /// (rank 0's clock)], summed over the job.
    fn agree(&mut self, loss_sum: f64) -> Result<[f64; 3]> {
        let every = self.cfg.checkpoint.every_minutes;
        let timed = self.rank == 0
            && every > 0.0
            && self.saver.last_save.elapsed().as_secs_f64() >= every * 60.0;
        let mut flags = [
            loss_sum,
            f64::from(u8::from(self.signals.requested())),
            f64::from(u8::from(timed)),
        ];
        let Some(job) = &mut self.job else {
            return Ok(flags);
        };
        let mut l = Tensor::from_slice(&flags).to_device(self.device);
        job.dp.all_reduce_sum(&mut l)?;
        // Only the last pipeline stage has the loss; every stage has its requests.
        if let Some(pp) = job.pp.as_mut() {
            pp.all_reduce_sum(&mut l)?;
        }
        flags.copy_from_slice(&Vec::<f64>::try_from(l.to_device(Device::Cpu))?);
        // The tensor-parallel ranks hold the same loss; the requests must reach them all.
        if let Some(tp) = job.tp.as_mut() {
            let mut r = Tensor::from_slice(&flags[1..]).to_device(self.device);
            tp.all_reduce_sum(&mut r)?;
            flags[1..].copy_from_slice(&Vec::<f64>::try_from(r.to_device(Device::Cpu))?);
        }
        Ok(flags)
    }

    /// The optimizer step at learning rate `lr` (skipped when `loss` is not
    /// finite, as for a non-finite gradient): ZeRO-1 reduce-scatters here
    /// (plain data parallelism reduced in buckets already); the gradient
    /// norm is summed over the tensor- and pipeline-parallel groups.
    fn update(&mut self, lr: f64, loss: f64, t_data: f64) -> Result<crate::optim::StepStats> {
        let zero = self.optim.shard.is_some();
        let (comm, spread) = match self.job.as_mut() {
            Some(j) => {
                let mut spread: Vec<&mut dyn Collectives> = Vec::new();
                if let Some(t) = j.tp.as_mut() {
                    spread.push(t.as_mut());
                }
                if let Some(p) = j.pp.as_mut() {
                    spread.push(p.as_mut());
                }
                (zero.then_some(j.dp.as_mut()), spread)
            }
            None => (None, Vec::new()),
        };
        guard::at("optimizer step", None);
        if let Some(p) = self.profiler.as_mut() {
            p.begin(Window::Optimizer);
        }
        let (optim, params) = (&mut self.optim, &self.model.params);
        let update = || optim.step(params, lr, comm, spread, !loss.is_finite());
        let stats = match self.trace.as_mut() {
            Some(tr) => tr.span("optimizer".into(), "optimizer", update)?,
            None => update()?,
        };
        self.sync();
        if let Some(p) = self.profiler.as_mut() {
            p.end();
            p.add_step(t_data);
        }
        Ok(stats)
    }

    /// Make every gradient whole before the optimizer: first the data-parallel
    /// sum (the buckets started during backward must be done before anything
    /// else touches those ranges), then the sums of copies held by several
    /// ranks: tensor-parallel replicas, and the tied embedding of the first
    /// and last pipeline stage.
    fn reduce_gradients(&mut self) -> Result<()> {
        guard::at("gradient reduction", None);
        let Some(j) = &mut self.job else {
            return Ok(());
        };
        if let Some(bk) = &mut self.buckets {
            bk.finish(&self.optim.grad, j.dp.as_mut())?;
        }
        let params = &self.model.params;
        if let Some(tp) = j.tp.as_mut() {
            crate::parallel::tp::sync_shared_grads(
                params,
                &self.optim.grad,
                tp.as_mut(),
                &mut j.replicas,
            )?;
        }
        if let Some(tied) = j.tied.as_mut() {
            crate::parallel::tp::sync_tied_grads(params, &self.optim.grad, tied.as_mut())?;
        }
        Ok(())
    }

    /// Forward and backward of the micro-batches one after another (no
    /// pipeline): returns the sum of their token losses.
    fn micro_batches(&mut self, batches: &[Batch], scale: f64) -> Result<Tensor> {
        let overlap = self.cfg.parallel.overlap_grad_reduce;
        let mut loss_sum = Tensor::zeros([], (Kind::Double, self.device));
        for (i, b) in batches.iter().enumerate() {
            let t = batch_tensor(b, self.device);
            let last_micro = i + 1 == batches.len() && overlap;
            let buckets = &mut self.buckets;
            let (mut dp, tp) = match self.job.as_mut() {
                Some(j) => {
                    let (d, t) = j.groups();
                    (Some(d), t)
                }
                None => (None, None),
            };
            // On the last micro-batch, reduce each bucket as soon as it is final.
            let mut hook =
                |pos: usize, g: &Tensor| match (last_micro, buckets.as_mut(), dp.as_deref_mut()) {
                    (true, Some(bk), Some(d)) => bk.segment_done(pos, g, d),
                    _ => Ok(()),
                };
            let run = runner!(self);
            let l = run.forward_backward(tp, &t, scale, &mut self.optim.grad, &mut hook)?;
            loss_sum += l.to_kind(Kind::Double);
        }
        Ok(loss_sum)
    }

    /// The programs of this rank's pipeline chunks and the shape of the
    /// activations crossing stages (`rows` samples).
    fn chunks(&self, rows: usize) -> (Vec<Program>, Vec<i64>) {
        let (pipe, tp) = (&self.layout.pipe, &self.layout.tp);
        let n = pipe.num_stages();
        let ring = self.ring.is_some();
        let progs = pipe
            .chunks()
            .into_iter()
            .map(|(_, s, layers)| {
                Program::build(&self.model.cfg, tp, layers, s == 0, s + 1 == n, ring)
            })
            .collect();
        let seq = self.layout.local_seq_len(self.cfg.data.seq_len);
        let d = self.cfg.model.d_model;
        (progs, tp.activation_shape(rows, seq, d))
    }

    /// The micro-batches through the pipeline schedule: returns the sum of
    /// their token losses on the last stage (zero on the others).
    fn pipeline_pass(&mut self, batches: &[Batch], scale: f64, step: u64) -> Result<Tensor> {
        let schedule = Schedule::new(self.cfg.parallel.pp, self.layout.pipe.v, batches.len())?;
        let (progs, act_shape) = self.chunks(self.cfg.train.micro_batch_size);
        let tokens: Vec<Tensor> = batches
            .iter()
            .map(|b| batch_tensor(b, self.device))
            .collect();
        let input = StepInput {
            run: runner!(self),
            schedule: &schedule,
            progs: &progs,
            batches: &tokens,
            loss_scale: scale,
            act_shape,
        };
        let job = self
            .job
            .as_mut()
            .expect("pipeline parallelism runs as a job");
        let (rank, tp, links) = job.pipeline_parts();
        if let Some(tr) = self.trace.as_mut() {
            tr.step = step + 1;
        }
        crate::engine::pipeline::run_step(
            &input,
            rank,
            tp,
            links,
            &mut self.optim.grad,
            self.trace.as_mut(),
        )
    }

    /// Mean validation loss per domain (nats per token) over up to
    /// `eval_steps * micro_batch_size` validation samples of each domain.
    pub fn validate(&mut self) -> Result<BTreeMap<String, f64>> {
        let mbs = self.cfg.train.micro_batch_size as u64;
        let dataset = self.dataset.clone();
        let device = self.device;
        // Each data-parallel rank scores every dp-th batch; the sums are added up.
        let dp = self.cfg.parallel.dp as u64;
        let part = match &self.job {
            Some(j) if dp > 1 => (j.coords.dp as u64, dp),
            _ => (0, 1),
        };
        let mut scores = crate::infer::eval::evaluate_part(
            &crate::infer::eval::Validation(&dataset),
            mbs,
            self.cfg.train.eval_steps * mbs,
            device,
            &mut |t| self.eval_loss(t),
            None,
            part,
        )?;
        // The cp ranks of a data-parallel rank score pieces of the same
        // batches: their loss sums add up, their tokens count once.
        let cp = self.layout.mesh.cp;
        if let (Some(job), true) = (self.job.as_mut(), part.1 * cp as u64 > 1) {
            let first = job.coords.cp == 0;
            let mut v: Vec<f64> = scores.iter().map(|s| s.loss_sum).collect();
            v.extend(
                scores
                    .iter()
                    .map(|s| if first { s.tokens as f64 } else { 0.0 }),
            );
            let mut t = Tensor::from_slice(&v).to_device(device);
            job.dp.all_reduce_sum(&mut t)?;
            let v = Vec::<f64>::try_from(t.to_device(Device::Cpu))?;
            let n = scores.len();
            for (i, s) in scores.iter_mut().enumerate() {
                s.loss_sum = v[i];
                s.tokens = v[n + i].round() as u64;
            }
        }
        Ok(scores
            .into_iter()
            .map(|s| (s.domain.clone(), s.loss()))
            .collect())
    }

    /// Sum of token losses of one validation batch, on every rank.
    fn eval_loss(&mut self, t: &Tensor) -> Result<f64> {
        if self.cfg.parallel.pp == 1 {
            let tp = self.job.as_mut().and_then(|j| j.groups().1);
            return Ok(runner!(self).loss_sum(tp, t)?.double_value(&[]));
        }
        let schedule = Schedule::stages_only(self.cfg.parallel.pp, self.layout.pipe.v);
        let (progs, act_shape) = self.chunks(t.size()[0] as usize);
        let input = StepInput {
            run: runner!(self),
            schedule: &schedule,
            progs: &progs,
            batches: &[],
            loss_scale: 1.0,
            act_shape,
        };
        let job = self
            .job
            .as_mut()
            .expect("pipeline parallelism runs as a job");
        let (rank, tp, links) = job.pipeline_parts();
        let mut l = crate::engine::pipeline::eval_step(&input, rank, tp, links, t)?;
        // Only the last stage computed the loss.
        if let Some(pp) = job.pp.as_mut() {
            pp.all_reduce_sum(&mut l)?;
        }
        Ok(l.double_value(&[]))
    }
}
