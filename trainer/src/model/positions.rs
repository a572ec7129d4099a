//! Where the tokens of a pass sit, for RoPE: on the host, or (one decoding
//! step recorded as a CUDA graph) on the device.

use tch::Tensor;

/// Where the tokens that RoPE rotates sit.
#[derive(Clone, Copy)]
pub enum Positions<'a> {
    /// `start..start + t`, known on the host.
    From(i64),
    /// One token per sequence at the position held by `pos` ([1], int64,
    /// on the tensors' device), below `span`: no host value enters, so a
    /// CUDA graph that records it serves any position below `span`.
    Device { pos: &'a Tensor, span: i64 },
}
