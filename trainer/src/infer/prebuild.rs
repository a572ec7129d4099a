//! The kernels a generation on a GPU will use, built while its model
//! loads. sigma's own kernels are compiled by NVRTC at their first use
//! (or loaded from the kernel cache, `SIGMA_KERNEL_CACHE`); on a machine
//! whose cache is empty, compiling them one set after another at their
//! first use cost seconds of the first batch (docs/benchmarks.md). A
//! [`Prebuild`] compiles them all at once, from a thread of its own (its
//! compiles on rayon's pool), while the checkpoint is read and moved to
//! the device: the training kernels (the prefill's norms and RoPE), the
//! matrix-vector kernels of the batches' rows and every DiffQKV decode
//! kernel that a step's search may time. A kernel asked for while it is
//! being built is waited for, not built twice (`kernels::built`).
//! [`Prebuild::wait`] (or drop) joins it before the first batch runs.
//! Still built at first use: the matrix-vector kernels of a one- or
//! two-token prompt's prefill, and a decode kernel that a tuning cache
//! file names with rows no search offers.

use tch::Device;

use crate::config::ModelConfig;
use crate::kernels::decode::DecodeShape;

/// Kernels being built on a thread of their own (none off a GPU).
pub struct Prebuild(Option<std::thread::JoinHandle<()>>);

impl Prebuild {
    /// Start building the kernels that generating with a model of `cfg`
    /// on `device`, in batches of each size in `batches`, will use.
    /// Nothing happens off a CUDA device, and a thread that cannot be
    /// started leaves the kernels to their first use.
    pub fn start(cfg: &ModelConfig, device: Device, batches: &[i64]) -> Prebuild {
        let Device::Cuda(ordinal) = device else {
            return Prebuild(None);
        };
        let shape = attention_shape(cfg);
        let ks = product_widths(cfg);
        let batches = batches.to_vec();
        let spawned = std::thread::Builder::new()
            .name("sigma-kernel-prebuild".into())
            .spawn(move || {
                use crate::kernels::{decode, gemv, training};
                rayon::join(
                    || decode::prebuild(ordinal, shape),
                    || {
                        rayon::join(
                            || training::prebuild(ordinal),
                            || {
                                let widths = (ks.0.as_slice(), ks.1.as_slice());
                                batches
                                    .iter()
                                    .for_each(|&b| gemv::prebuild(ordinal, b, widths))
                            },
                        )
                    },
                );
            });
        Prebuild(spawned.ok())
    }

    /// Wait until every kernel it builds is built (or failed, reported).
    pub fn wait(mut self) {
        self.join();
    }

    fn join(&mut self) {
        if let Some(h) = self.0.take() {
            // Each kernel's build catches its own panic; whatever else
            // failed there leaves its kernels to their first use.
            let _ = h.join();
        }
    }
}

impl Drop for Prebuild {
    /// Joined, so that the process never exits while that thread is inside
    /// NVRTC or the CUDA driver (a command that fails after the model's
    /// configuration was read waits for the builds first).
    fn drop(&mut self) {
        self.join();
    }
}

/// The input widths of a decoding step's matrix-vector products for a
/// model of `cfg`, each once: (plain, gated). Plain: the block's input (q,
/// k, v and the head), AugQ's width (its down product), the heads' outputs
/// (o_proj) and the FFN's width (its down product); gated (SwiGLU): the
/// block's input (the FFN's gate/up) and the projected query (AugQ's).
pub fn product_widths(cfg: &ModelConfig) -> (Vec<i64>, Vec<i64>) {
    let mut plain = vec![
        cfg.d_model as i64,
        (cfg.num_q_heads * cfg.v_head_dim) as i64,
        cfg.ffn_dim as i64,
    ];
    let mut gated = vec![cfg.d_model as i64];
    if cfg.aug_q_dim > 0 {
        plain.push(cfg.aug_q_dim as i64);
        gated.push((cfg.num_q_heads * cfg.dot_dim()) as i64);
    }
    for ks in [&mut plain, &mut gated] {
        ks.sort_unstable();
        ks.dedup();
    }
    (plain, gated)
}

/// The heads and dimensions of a decoding step's attention for a model of
/// `cfg`, as the decode kernel sees them: query heads, the cache's key
/// heads at the dot-product dimension (the keys it reads, expanded where
/// the projected reading caches them compressed) and value heads.
pub fn attention_shape(cfg: &ModelConfig) -> DecodeShape {
    DecodeShape {
        n_q: cfg.num_q_heads as i64,
        n_k: cfg.num_k_heads as i64,
        n_v: cfg.num_v_heads as i64,
        d_k: cfg.dot_dim() as i64,
        d_v: cfg.v_head_dim as i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::cache::{KeyCache, KvCache};
    use crate::infer::generate::STEP_SHAPES;
    use crate::model::{Model, ModelInit};
    use tch::{Kind, Tensor};

    /// SIGMA-1.5B's plain products read inputs of 2048 (the block's input,
    /// the heads' outputs), 3072 (AugQ) and 6144 (the FFN) wide, its gated
    /// ones 2048 (the block's input, the projected query); without AugQ no
    /// 3072.
    #[test]
    fn the_widths_built_ahead_are_the_products_inputs() {
        let text = include_str!("../../../configs/sigma-1.5b.toml");
        let cfg = crate::config::RunConfig::parse("sigma-1.5b.toml", text, &[])
            .expect("the config")
            .model;
        assert_eq!(product_widths(&cfg), (vec![2048, 3072, 6144], vec![2048]));
        let plain = ModelConfig {
            aug_q_dim: 0,
            ..cfg
        };
        assert_eq!(product_widths(&plain), (vec![2048, 6144], vec![2048]));
    }

    /// The shape built ahead is the one every decoding step's attention
    /// asks for: with and without AugQ, K heads fewer or more than V heads,
    /// K compressed by projection (keys cached expanded or compressed) or
    /// natively, K and V of different widths.
    #[test]
    fn the_shape_built_ahead_is_the_one_the_steps_ask_for() {
        for (_, c) in crate::infer::generate::tests::configs() {
            let m = Model::new(&c, &ModelInit::cpu(3));
            for keys in [KeyCache::Expanded, KeyCache::Compressed] {
                let mut cache = KvCache::with_keys(&m, 2, 8, Device::Cpu, keys).expect("cache");
                let prompt = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([2, 3]);
                let valid = Tensor::ones([2, 3], (Kind::Bool, Device::Cpu));
                STEP_SHAPES.with(|s| s.borrow_mut().clear());
                tch::no_grad(|| -> crate::error::Result<()> {
                    let _ = m.plain().prefill(&mut cache, &prompt, &valid)?;
                    let _ = m
                        .plain()
                        .decode_step(&mut cache, &Tensor::from_slice(&[7i64, 8]))?;
                    Ok(())
                })
                .expect("a prefill and a step");
                let seen = STEP_SHAPES.with(|s| s.borrow().clone());
                assert_eq!(
                    seen.len(),
                    c.num_layers,
                    "{c:?} {keys:?}: one attention a layer"
                );
                for s in seen {
                    assert_eq!(s, attention_shape(&c), "{c:?} {keys:?}");
                }
            }
        }
    }
}
