//! What a weight's declaration says besides its name: its shape,
//! initialisation and weight-decay class, and how tensor parallelism cuts it.

/// How a parameter is initialised and whether it is decayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Normal(0, std) weight of a linear layer.
    Linear,
    /// Normal(0, std / sqrt(2 * num_layers)): projections that write into the residual stream.
    ResidualOut,
    Embedding,
    /// RMSNorm gain, initialised to 1.
    Norm,
}

/// How tensor parallelism cuts a weight (the plan that acts on it:
/// `parallel/tp.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Column-parallel: the output rows split evenly.
    Rows,
    /// Row-parallel: the input columns split evenly.
    Cols,
    /// Rows by key head: split when tp <= n_k, a head replicated on tp / n_k
    /// ranks when tp > n_k.
    KeyHeads,
    /// Rows by value head, as `KeyHeads`.
    ValueHeads,
    /// Rows by vocabulary entry (embedding, output head).
    Vocab,
    /// A copy on every rank, computed from the rank's tokens (a norm gain).
    Replicated,
    /// A copy on every rank, each contributing a part of its gradient (K
    /// compression's up-projection, read by every rank's query heads).
    ReplicatedPartialGrad,
}

/// A declared weight: its whole shape, initialisation and decay class, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decl {
    pub shape: Vec<i64>,
    pub kind: ParamKind,
    pub split: Split,
}

impl Decl {
    pub fn new(shape: Vec<i64>, kind: ParamKind, split: Split) -> Decl {
        Decl { shape, kind, split }
    }
}
