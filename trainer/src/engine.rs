//! The segment engine: execution as a chain of segments joined at boundaries
//! that the engine controls (tch has no custom autograd functions, so this is
//! where communication, pipeline edges and recomputation will live).
//!
//! Forward: run a segment, detach its output, hand a fresh leaf that requires
//! grad to the next segment. With activation checkpointing, a block runs under
//! `no_grad` and only its input is kept. Backward: walk the segments in
//! reverse; differentiate `(out * g).sum()` (its gradient with respect to `out`
//! is exactly `g`) with respect to the segment's parameters and its input leaf,
//! add the parameter gradients into the flat gradient buffer, pass the input
//! gradient on; a checkpointed block first recomputes its forward from the
//! stored input. Parameters' `.grad` is never used: gradients exist once, in
//! the flat buffer the optimizer reads.

use tch::Tensor;

use crate::error::Result;
use crate::guard::at;
use crate::model::Model;
use crate::params::Params;

/// The segments of a model, in execution order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    Embed,
    Block(usize),
    Head,
}

pub fn segments(model: &Model) -> Vec<Segment> {
    let mut s = vec![Segment::Embed];
    s.extend((0..model.cfg.num_layers).map(Segment::Block));
    s.push(Segment::Head);
    s
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// Differentiate scalar `root` with respect to the parameters `idx` (adding
/// into `grads`, laid out like `params.flat`) and to `input` (returned).
fn backprop(
    root: &Tensor,
    params: &Params,
    idx: &[usize],
    input: Option<&Tensor>,
    grads: &mut Tensor,
) -> Option<Tensor> {
    let mut wrt: Vec<&Tensor> = idx.iter().map(|&i| &params.tensors[i]).collect();
    if let Some(x) = input {
        wrt.push(x);
    }
    let mut g = Tensor::run_backward(&[root], &wrt, false, false);
    let input_grad = if input.is_some() { g.pop() } else { None };
    tch::no_grad(|| {
        for (&i, gi) in idx.iter().zip(&g) {
            if gi.defined() {
                let _ = grads
                    .narrow(0, params.offsets[i], params.specs[i].numel())
                    .g_add_(&gi.reshape([-1]));
            }
        }
    });
    input_grad
}

/// Forward and backward of one micro-batch. `tokens` is [b, t + 1]; inputs are
/// `tokens[:, :-1]`, targets `tokens[:, 1:]`. The gradient of
/// `sum of token losses * loss_scale` is added into `grads` (flat, laid out like
/// the parameters). Returns the (unscaled) loss sum, detached.
/// `on_segment_done(pos)` is called as soon as the segment at backward
/// position `pos` (0: the head, last: the embedding) has added its gradients.
pub fn forward_backward(
    model: &Model,
    tokens: &Tensor,
    loss_scale: f64,
    checkpoint: bool,
    grads: &mut Tensor,
    on_segment_done: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    let t = tokens.size()[1] - 1;
    let inputs = tokens.narrow(1, 0, t);
    let targets = tokens.narrow(1, 1, t);
    let nl = model.cfg.num_layers;

    // Forward.
    at("forward (embedding)", None);
    let embed_out = model.embed(&inputs);
    let mut block_in: Vec<Tensor> = Vec::with_capacity(nl);
    let mut block_out: Vec<Option<Tensor>> = Vec::with_capacity(nl);
    let mut x = leaf(&embed_out);
    for l in 0..nl {
        at("forward", Some(l));
        let out = if checkpoint {
            tch::no_grad(|| model.block(l, &x))
        } else {
            model.block(l, &x)
        };
        block_in.push(x);
        x = leaf(&out);
        block_out.push(if checkpoint { None } else { Some(out) });
    }
    at("forward (output head and loss)", None);
    let loss_sum = model.head_loss_sum(&x, &targets);

    // Backward, segment by segment in reverse.
    let p = &model.params;
    at("backward (output head and loss)", None);
    let mut g = backprop(
        &(&loss_sum * loss_scale),
        p,
        &model.segment_params(Segment::Head),
        Some(&x),
        grads,
    )
    .expect("input grad");
    on_segment_done(0, grads)?;
    for l in (0..nl).rev() {
        let out = match block_out[l].take() {
            Some(o) => o,
            None => {
                at("recompute (activation checkpointing)", Some(l));
                model.block(l, &block_in[l])
            }
        };
        at("backward", Some(l));
        let root = (out * &g).sum(g.kind());
        g = backprop(
            &root,
            p,
            &model.segment_params(Segment::Block(l)),
            Some(&block_in[l]),
            grads,
        )
        .expect("input grad");
        on_segment_done(nl - l, grads)?;
    }
    at("backward (embedding)", None);
    let root = (embed_out * &g).sum(g.kind());
    backprop(&root, p, &model.segment_params(Segment::Embed), None, grads);
    on_segment_done(nl + 1, grads)?;
    Ok(loss_sum.detach())
}

/// Sum of token losses without gradients (validation).
pub fn loss_sum(model: &Model, tokens: &Tensor) -> Tensor {
    at("validation forward", None);
    tch::no_grad(|| {
        let t = tokens.size()[1] - 1;
        let mut x = model.embed(&tokens.narrow(1, 0, t));
        for l in 0..model.cfg.num_layers {
            x = model.block(l, &x);
        }
        model.head_loss_sum(&x, &tokens.narrow(1, 1, t))
    })
}
