//! The segment engine: execution as a chain of segments joined at boundaries
//! that the engine controls (tch has no custom autograd functions, so this is
//! where communication, pipeline edges and recomputation will live).
//!
//! Forward: run a segment, detach its output, hand a fresh leaf that requires
//! grad to the next segment. With activation checkpointing, a block runs under
//! `no_grad` and only its input is kept. Backward: walk the segments in
//! reverse; backprop `(out * g).sum()` (the gradient of that sum with respect to
//! `out` is exactly `g`), read the gradient of the segment's input leaf and
//! pass it on; a checkpointed block first recomputes its forward from the
//! stored input. Gradients accumulate into the parameters' `.grad`.

use tch::Tensor;

use crate::model::Model;

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

/// Forward and backward of one micro-batch. `tokens` is [b, t + 1]; inputs are
/// `tokens[:, :-1]`, targets `tokens[:, 1:]`. The loss backpropagated is
/// `sum of token losses * loss_scale`. Returns the (unscaled) loss sum, detached.
pub fn forward_backward(model: &Model, tokens: &Tensor, loss_scale: f64, checkpoint: bool) -> Tensor {
    let t = tokens.size()[1] - 1;
    let inputs = tokens.narrow(1, 0, t);
    let targets = tokens.narrow(1, 1, t);
    let nl = model.cfg.num_layers;

    // Forward.
    let embed_out = model.embed(&inputs);
    let mut block_in: Vec<Tensor> = Vec::with_capacity(nl);
    let mut block_out: Vec<Option<Tensor>> = Vec::with_capacity(nl);
    let mut x = leaf(&embed_out);
    for l in 0..nl {
        let out = if checkpoint { tch::no_grad(|| model.block(l, &x)) } else { model.block(l, &x) };
        block_in.push(x);
        x = leaf(&out);
        block_out.push(if checkpoint { None } else { Some(out) });
    }
    let loss_sum = model.head_loss_sum(&x, &targets);

    // Backward, segment by segment in reverse.
    (&loss_sum * loss_scale).backward();
    let mut g = x.grad();
    for l in (0..nl).rev() {
        let out = match block_out[l].take() {
            Some(o) => o,
            None => model.block(l, &block_in[l]),
        };
        (out * &g).sum(out_kind(&g)).backward();
        g = block_in[l].grad();
    }
    (embed_out * &g).sum(out_kind(&g)).backward();
    loss_sum.detach()
}

fn out_kind(g: &Tensor) -> tch::Kind {
    g.kind()
}

/// Sum of token losses without gradients (validation).
pub fn loss_sum(model: &Model, tokens: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let t = tokens.size()[1] - 1;
        let mut x = model.embed(&tokens.narrow(1, 0, t));
        for l in 0..model.cfg.num_layers {
            x = model.block(l, &x);
        }
        model.head_loss_sum(&x, &tokens.narrow(1, 1, t))
    })
}
