//! Where the tokens of a pass sit, for RoPE: on the host, or (one decoding
//! step recorded as a CUDA graph) on the device.

use tch::Tensor;

/// Where the tokens that RoPE rotates sit.
#[derive(Clone, Copy)]
pub enum Positions<'a> {
    /// `start..start + t`, known on the host.
    From(i64),
    /// One token per sequence at a position held on the device: the RoPE
    /// table's rows at that position ([1, dim] each, gathered on the device
    /// once per step by [`crate::model::Fwd::rope_rows`] for every layer).
    /// No host value enters, so a CUDA graph that records it serves any
    /// position the table covers.
    Device { cos: &'a Tensor, sin: &'a Tensor },
}
