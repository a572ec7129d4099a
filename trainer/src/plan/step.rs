//! One step of a layout, simulated: each pipeline rank's share of the model
//! (`parallel::Layout::new` and `share`), its chunks' programs
//! (`engine::Program`), their memory and seconds, the pipeline schedule the
//! trainer runs (`parallel::schedule::Schedule::new`) timed pass by pass,
//! then what follows the passes as `train_step` does it: the data-parallel
//! reduction (buckets during the last backward without a pipeline, after
//! the schedule with one; ZeRO-1's reduce-scatter and all-gather), the
//! tied embedding's and replicated parameters' sums, the agreement on the
//! loss, the optimizer.

use crate::config::RunConfig;
use crate::engine::program::Program;
use crate::model::params::GradSync;
use crate::model::summary::summarize;
use crate::parallel::schedule::{simulate_timed, Action, Schedule};
use crate::parallel::Layout;
use crate::plan::acts::{pass_memory, PassMemory, PassOptions, Tokens, FP32};
use crate::plan::calib::Calibration;
use crate::plan::cost::{attention_flops_per_layer, chunk_time, matmul_index, ChunkTime, Ctx};
use crate::plan::layout::Candidate;
use crate::plan::memory::{optimizer_extra, schedule_peak, single_peak, PassPeak, State};
use crate::plan::net::Net;

const MIB: f64 = 1048576.0;

/// The machine a plan is for.
#[derive(Clone, Copy)]
pub struct Machine<'a> {
    pub cal: &'a Calibration,
    pub gpus_per_node: usize,
}

/// One pipeline rank's memory and time (its tensor-parallel and
/// data-parallel peers hold the same amounts).
#[derive(Clone, Debug)]
pub struct RankPlan {
    pub pp_rank: usize,
    pub layers: usize,
    pub state: State,
    /// A micro-batch's pass through each chunk.
    pub passes: Vec<PassMemory>,
    pub peak: PassPeak,
    /// The optimizer step's temporaries (after the passes).
    pub optimizer_extra: f64,
    /// The caching allocator's peak.
    pub allocated: f64,
    /// Outside the allocator or lost in it.
    pub nccl: f64,
    pub fragmentation: f64,
    pub context: f64,
    pub total: f64,
    pub chunks: Vec<ChunkTime>,
    /// Of the step: computing, and the trace's idle share.
    pub busy: f64,
    pub bubble: f64,
    /// After the passes: data-parallel and tied reductions, optimizer.
    pub reduce: f64,
    pub optimizer: f64,
}

/// What a layout is predicted to need and do.
#[derive(Clone, Debug)]
pub struct Prediction {
    pub cand: Candidate,
    pub ranks: Vec<RankPlan>,
    pub capacity: f64,
    pub fits: bool,
    /// Seconds: the whole step, and its forward/backward stretch.
    pub step: f64,
    pub passes: f64,
    pub tokens_per_s: f64,
    pub mfu: f64,
    /// The schedule's closed-form idle share, (p - 1) / (v m + p - 1).
    pub bubble_theory: f64,
}

impl Prediction {
    /// The rank with the highest memory.
    pub fn worst(&self) -> &RankPlan {
        self.ranks
            .iter()
            .max_by(|a, b| a.total.total_cmp(&b.total))
            .expect("at least one rank")
    }
}

/// Predict layout `cand` of `cfg` (already `Candidate::check`ed).
/// `head_logit_buffers`: see `PassOptions` (1 for the code as it is).
pub fn predict(
    cfg: &RunConfig,
    cand: &Candidate,
    m: Machine<'_>,
    head_logit_buffers: usize,
) -> Prediction {
    let o = PassOptions {
        checkpoint: cfg.train.activation_checkpointing,
        loss_chunk_tokens: cfg.train.loss_chunk_tokens,
        head_logit_buffers,
    };
    let net = Net {
        cal: m.cal,
        per_node: m.gpus_per_node,
    };
    let sched = (cand.pp > 1).then(|| Schedule::new(cand.pp, cand.v, cand.accum).expect("checked"));
    let mut ranks: Vec<RankPlan> = (0..cand.pp)
        .map(|r| rank_plan(cfg, cand, r, net, o, sched.as_ref()))
        .collect();
    let passes = match &sched {
        Some(s) => pipeline_time(cfg, cand, s, &mut ranks, net),
        None => {
            let c = &ranks[0].chunks[0];
            let t = cand.accum as f64 * (c.fwd + c.bwd);
            ranks[0].busy = t;
            t
        }
    };
    let after_passes = ranks.iter().map(|r| r.reduce).fold(0.0, f64::max);
    let opt = ranks.iter().map(|r| r.optimizer).fold(0.0, f64::max);
    let step = passes + after_passes + opt + m.cal.compute.host_ms_per_step.value * 1e-3;
    let tokens = cand.step_tokens(cfg.data.seq_len) as f64;
    let flops = summarize(&cfg.model, cfg.data.seq_len).flops_per_token;
    let capacity = m.cal.memory.capacity_mib.value * MIB;
    let peak = m.cal.compute.peak_tflops.value * 1e12;
    Prediction {
        cand: *cand,
        fits: ranks.iter().all(|r| r.total <= capacity),
        capacity,
        step,
        passes,
        tokens_per_s: tokens / step,
        mfu: tokens / step * flops / (cand.gpus() as f64 * peak),
        bubble_theory: sched.as_ref().map_or(0.0, Schedule::bubble),
        ranks,
    }
}

/// Pipeline rank `r`'s share, memory, chunk times and what follows its passes.
fn rank_plan(
    cfg: &RunConfig,
    cand: &Candidate,
    r: usize,
    net: Net<'_>,
    o: PassOptions,
    sched: Option<&Schedule>,
) -> RankPlan {
    let layout = Layout::new(cfg, layout_rank(cand, r));
    let c = &cfg.model;
    let share = layout.share(c);
    let state = State::of(&share, cand.dp, cand.zero, true);
    let tokens = Tokens::new(cand.micro_batch, cfg.data.seq_len, &layout.tp);
    let n = layout.pipe.num_stages();
    let progs: Vec<Program> = layout
        .pipe
        .chunks()
        .into_iter()
        .map(|(_, s, l)| Program::of_config(c, &layout.tp, l, s == 0, s + 1 == n))
        .collect();
    let passes: Vec<PassMemory> = progs
        .iter()
        .map(|p| pass_memory(c, &layout.tp, p, tokens, &o))
        .collect();
    let peak = match sched {
        Some(s) => schedule_peak(s, r, &passes),
        None => single_peak(&passes[0]),
    };
    let ctx = Ctx {
        c,
        plan: &layout.tp,
        share: &share,
        cal: net.cal,
        net,
        tp_group: layout.mesh.tp_group(layout_rank(cand, r)),
        tokens,
        seq_len: cfg.data.seq_len,
        opts: o,
        overlap: cfg.parallel.tp_comm_overlap && cfg.train.fused_weight_grad,
        attn_flops: attention_flops_per_layer(c, cfg.data.seq_len),
        mats: matmul_index(&share),
    };
    let chunks: Vec<ChunkTime> = progs.iter().map(|p| chunk_time(&ctx, p)).collect();
    let tied = tied_numel(cfg, &layout, &share);
    let opt_extra = optimizer_extra(&state, cand.dp, cand.zero, tied);
    let mem = outside_allocator(
        cfg,
        cand,
        &layout,
        net,
        (state.total() + peak.total).max(state.total() + opt_extra),
    );
    RankPlan {
        pp_rank: r,
        layers: layout.num_layers(),
        reduce: reduce_time(cfg, cand, &layout, &share, &state, net),
        optimizer: optimizer_time(&state, net.cal),
        state,
        passes,
        peak,
        optimizer_extra: opt_extra,
        allocated: mem.0,
        nccl: mem.1,
        fragmentation: mem.2,
        context: mem.3,
        total: mem.0 + mem.1 + mem.2 + mem.3,
        chunks,
        busy: 0.0,
        bubble: 0.0,
    }
}

/// The global rank of pipeline rank `r` with data- and tensor-parallel rank 0.
fn layout_rank(cand: &Candidate, r: usize) -> usize {
    r * cand.dp * cand.tp
}

/// Elements of the tied embedding this rank sums with the pipeline's other end.
fn tied_numel(cfg: &RunConfig, layout: &Layout, share: &crate::model::Share) -> i64 {
    share
        .specs
        .iter()
        .zip(&share.held)
        .filter(|(s, &h)| h && s.pp_tied && (layout.pipe.first() || layout.pipe.last()))
        .filter(|_| cfg.model.tie_embeddings)
        .map(|(s, _)| s.numel())
        .sum()
}

/// (allocated, NCCL's buffers, fragmentation, CUDA context) in bytes.
fn outside_allocator(
    cfg: &RunConfig,
    cand: &Candidate,
    layout: &Layout,
    net: Net<'_>,
    allocated: f64,
) -> (f64, f64, f64, f64) {
    let mem = &net.cal.memory;
    let comms = if cand.gpus() > 1 {
        let shared = [layout.tp.k_share(&cfg.model), layout.tp.v_share(&cfg.model)];
        let rank = layout.mesh.rank(layout.coords);
        layout
            .mesh
            .groups_of(rank, &shared, layout.pipe.v, cfg.model.tie_embeddings)
            .iter()
            .filter(|g| g.size() > 1)
            .count()
    } else {
        0
    };
    (
        allocated,
        comms as f64 * mem.nccl_mib_per_communicator.value * MIB,
        allocated * mem.fragmentation.value,
        mem.cuda_context_mib.value * MIB,
    )
}

/// Seconds after the passes, before the optimizer: the data-parallel
/// reduction's exposed part, the tied embedding's and replicated
/// parameters' sums, the agreement on loss and flags, the global norm.
fn reduce_time(
    cfg: &RunConfig,
    cand: &Candidate,
    layout: &Layout,
    share: &crate::model::Share,
    state: &State,
    net: Net<'_>,
) -> f64 {
    let rank = layout.mesh.rank(layout.coords);
    let dp = layout.mesh.dp_group(rank);
    let grads = state.grads;
    let dp_time = if cand.zero {
        // Reduce-scatter of the gradient, all-gather of the updated weights.
        2.0 * net.gather(&dp, grads)
    } else {
        let bucket = cfg.parallel.bucket_mb * 1e6;
        let buckets = (grads / bucket).ceil().max(1.0);
        let t = buckets * net.all_reduce(&dp, grads / buckets);
        let during_backward = cand.pp == 1 && cfg.parallel.overlap_grad_reduce;
        t * if during_backward {
            1.0 - net.cal.network.dp_overlap.value
        } else {
            1.0
        }
    };
    let tp = layout.mesh.tp_group(rank);
    let shared: f64 = share
        .specs
        .iter()
        .zip(&share.held)
        .filter(|(s, &h)| h && s.sync != GradSync::Own && s.sync != GradSync::Identical)
        .map(|(s, _)| FP32 * s.numel() as f64)
        .sum();
    let mut t = dp_time + net.all_reduce(&tp, shared);
    let tied = tied_numel(cfg, layout, share);
    if tied > 0 {
        let ends = [
            layout.mesh.pp_group(rank)[0],
            *layout.mesh.pp_group(rank).last().expect("a stage"),
        ];
        t += net.all_reduce(&ends, FP32 * tied as f64);
    }
    // Loss and flags over dp and pp, the norm's scalars over dp, tp and pp.
    let pp = layout.mesh.pp_group(rank);
    t + 2.0 * (net.all_reduce(&dp, 24.0) + net.all_reduce(&pp, 24.0)) + net.all_reduce(&tp, 8.0)
}

/// The optimizer's seconds: the update of this rank's shard, the refresh of
/// its bf16 copy.
fn optimizer_time(state: &State, cal: &Calibration) -> f64 {
    let c = &cal.compute;
    (state.shard as f64 * c.optimizer_ps_per_param.value
        + state.numel as f64 * c.work_copy_ps_per_param.value)
        * 1e-12
}

/// The schedule's stretch, each pass timed by its rank's chunk times and each
/// message by the link between the two stages' ranks; fills in each rank's
/// busy time and idle share.
fn pipeline_time(
    cfg: &RunConfig,
    cand: &Candidate,
    s: &Schedule,
    ranks: &mut [RankPlan],
    net: Net<'_>,
) -> f64 {
    let dur = |r: usize, a: Action| -> f64 {
        let c = &ranks[r].chunks[a.chunk()];
        match a {
            Action::Forward { .. } => c.fwd,
            Action::Backward { .. } => c.bwd,
        }
    };
    let act = {
        let plan = Layout::new(cfg, 0).tp;
        FP32 * Tokens::new(cand.micro_batch, cfg.data.seq_len, &plan).seq * cfg.model.d_model as f64
    };
    let link = |a: usize, b: usize| -> f64 {
        let (ra, rb) = (s.place(a).0, s.place(b).0);
        net.p2p(layout_rank(cand, ra), layout_rank(cand, rb), act)
    };
    let tl = simulate_timed(s, &dur, &link).expect("the trainer's schedules run");
    for (r, rp) in ranks.iter_mut().enumerate() {
        rp.busy = tl.busy(r);
        rp.bubble = tl.bubble(r);
    }
    tl.end()
}
