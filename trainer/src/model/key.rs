//! The typed parameter key: which weight of SIGMA a parameter is. Every
//! weight is declared once ([`Decl`]: its shape, initialisation and
//! weight-decay class, and how tensor parallelism splits it): the weights of
//! a block in `block.rs` ([`LayerWeight`]), the embedding, final norm and
//! output head here. Names on disk (checkpoints, exports) are
//! derived from the key (`layers.3.attn.k_proj.weight`); nothing parses them.

use crate::config::ModelConfig;
use crate::model::block::LayerWeight;
use crate::model::decl::{Decl, ParamKind, Split};

/// One parameter of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParamKey {
    /// Token embedding [vocab, d_model] (also the output head when tied).
    Embed,
    /// A weight of block `l`.
    Layer(usize, LayerWeight),
    /// RMSNorm gain after the last block.
    FinalNorm,
    /// Output head [vocab, d_model] when not tied to the embedding.
    LmHead,
}

impl ParamKey {
    /// The name in checkpoints and exports, after the module tree.
    pub fn name(self) -> String {
        match self {
            ParamKey::Embed => "embed.weight".into(),
            ParamKey::Layer(l, w) => format!("layers.{l}.{}.weight", w.path()),
            ParamKey::FinalNorm => "final_norm.weight".into(),
            ParamKey::LmHead => "lm_head.weight".into(),
        }
    }

    /// The block holding it.
    pub fn layer(self) -> Option<usize> {
        match self {
            ParamKey::Layer(l, _) => Some(l),
            _ => None,
        }
    }

    /// The component it counts under in `sigma model summary`.
    pub fn component(self) -> &'static str {
        match self {
            ParamKey::Embed => "embedding",
            ParamKey::Layer(_, w) => w.component(),
            ParamKey::FinalNorm => "norms",
            ParamKey::LmHead => "lm_head (untied)",
        }
    }

    /// Read by a matmul (the embedding is a lookup; the output head is a
    /// matmul, counted as the embedding when tied).
    pub fn is_matmul(self, decl: &Decl) -> bool {
        decl.shape.len() == 2 && self != ParamKey::Embed
    }
}

/// Every parameter of `c` in model order (the order initialisation draws
/// them in): the embedding, each block's weights, the final norm, the
/// untied output head.
pub fn declare(c: &ModelConfig) -> Vec<(ParamKey, Decl)> {
    let (vocab, d) = (c.vocab_size as i64, c.d_model as i64);
    let mut all = vec![(
        ParamKey::Embed,
        Decl::new(vec![vocab, d], ParamKind::Embedding, Split::Vocab),
    )];
    for l in 0..c.num_layers {
        for w in LayerWeight::ALL {
            if let Some(decl) = w.declare(c) {
                all.push((ParamKey::Layer(l, w), decl));
            }
        }
    }
    all.push((
        ParamKey::FinalNorm,
        Decl::new(vec![d], ParamKind::Norm, Split::Replicated),
    ));
    if !c.tie_embeddings {
        all.push((
            ParamKey::LmHead,
            Decl::new(vec![vocab, d], ParamKind::Embedding, Split::Vocab),
        ));
    }
    all
}
