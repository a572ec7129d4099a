//! The decode kernel's split-and-merge arithmetic on the CPU, in f64: each
//! chunk of a sequence gives, per query head, its unnormalised output
//! `sum p·v` with `p = 2^(s - m)`, its max score `m` (scores in base 2:
//! the scale times log2(e) folded into q) and its sum `l` ([`chunk_partial`]),
//! padding slots scoring minus infinity; the partials are rescaled to their
//! common max and normalised ([`merge`]), a head with no valid slot giving
//! zeros. The same steps, in the same order, as csrc/decode_attention.cu
//! (the split kernel, and the merge that the last block of a sequence or
//! the combine kernel runs), so tests can hold the arithmetic against full
//! attention without a GPU. In the kernel's warp-local form a chunk is
//! itself cut into parts ([`local_parts`]), whose partials the block
//! merges, unnormalised, into the chunk's ([`combine`]).

/// The sizes of one step: `b` sequences of `len` cached slots.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub b: usize,
    pub n_q: usize,
    pub n_k: usize,
    pub n_v: usize,
    pub d_k: usize,
    pub d_v: usize,
    pub len: usize,
}

/// One chunk's result for one query head.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    /// `sum p·v` over the chunk, `d_v` values.
    pub o: Vec<f64>,
    /// The largest base-2 score (minus infinity when no slot is valid).
    pub m: f64,
    /// `sum p`.
    pub l: f64,
}

/// Chunk `[s0, s1)` of one query head: `q2` its query scaled by scale x
/// log2(e), `key(s)` and `value(s)` the rows of its K and V heads, `valid(s)`
/// whether slot s counts.
pub fn chunk_partial<'a>(
    q2: &[f64],
    key: &dyn Fn(usize) -> &'a [f64],
    value: &dyn Fn(usize) -> &'a [f64],
    valid: &dyn Fn(usize) -> bool,
    (s0, s1): (usize, usize),
) -> Partial {
    let scores: Vec<f64> = (s0..s1)
        .map(|s| match valid(s) {
            true => q2.iter().zip(key(s)).map(|(a, b)| a * b).sum(),
            false => f64::NEG_INFINITY,
        })
        .collect();
    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let d_v = value(s0).len();
    let mut o = vec![0.0; d_v];
    let mut l = 0.0;
    for (s, &x) in (s0..s1).zip(&scores) {
        let p = if m == f64::NEG_INFINITY {
            0.0
        } else {
            (x - m).exp2()
        };
        l += p;
        for (acc, v) in o.iter_mut().zip(value(s)) {
            *acc += p * v;
        }
    }
    Partial { o, m, l }
}

/// Partials rescaled to their common max and summed, not normalised: the
/// partial of their slots together (`d_v` values; none or none valid: max
/// minus infinity, zeros).
pub fn combine(parts: &[Partial], d_v: usize) -> Partial {
    let m = parts.iter().map(|p| p.m).fold(f64::NEG_INFINITY, f64::max);
    let weight = |p: &Partial| {
        if p.m == f64::NEG_INFINITY {
            0.0
        } else {
            (p.m - m).exp2()
        }
    };
    let l: f64 = parts.iter().map(|p| p.l * weight(p)).sum();
    let mut o = vec![0.0; d_v];
    for p in parts {
        let w = weight(p);
        for (acc, x) in o.iter_mut().zip(&p.o) {
            *acc += x * w;
        }
    }
    Partial { o, m, l }
}

/// The merged, normalised output of one query head's partials (`d_v` values).
pub fn merge(parts: &[Partial], d_v: usize) -> Vec<f64> {
    let c = combine(parts, d_v);
    if c.l > 0.0 {
        c.o.iter().map(|x| x / c.l).collect()
    } else {
        vec![0.0; d_v]
    }
}

/// How the chunks' partials are merged. `Folded`: all at once (the folded
/// combine's last block, one head per warp). `Combine`: as the combine
/// kernel does, in `groups` groups of its block's threads (split `i` to
/// group `i % groups`, `COMBINE_THREADS / (d_v / 4)` of them), each adding
/// its splits `batch` at a time to its running piece (rescaled to the
/// batch's max), then the groups' pieces merged in order.
#[derive(Clone, Copy, Debug)]
pub enum Merge {
    Folded,
    Combine { groups: usize, batch: usize },
}

impl Merge {
    /// The combine kernel's merge for head dimension `d_v` (the source's
    /// CG and CU).
    pub fn combine_kernel(d_v: usize) -> Merge {
        Merge::Combine {
            groups: super::launch::COMBINE_THREADS as usize / (d_v / 4),
            batch: 8,
        }
    }

    /// The merged, normalised output of one query head's partials.
    pub fn apply(self, parts: &[Partial], d_v: usize) -> Vec<f64> {
        match self {
            Merge::Folded => merge(parts, d_v),
            Merge::Combine { groups, batch } => {
                let none = Partial {
                    o: vec![0.0; d_v],
                    m: f64::NEG_INFINITY,
                    l: 0.0,
                };
                let pieces: Vec<Partial> = (0..groups)
                    .map(|g| {
                        let mine: Vec<Partial> =
                            parts.iter().skip(g).step_by(groups).cloned().collect();
                        mine.chunks(batch).fold(none.clone(), |acc, b| {
                            let mut all = vec![acc];
                            all.extend_from_slice(b);
                            combine(&all, d_v)
                        })
                    })
                    .collect();
                merge(&pieces, d_v)
            }
        }
    }
}

/// The slots of chunk `[s0, s1)` that the warp-local form's `parts` warps
/// of one K head take: contiguous, `ceil(n / parts)` rounded up to a
/// multiple of 8 each, the last ones shorter or empty (an empty part has
/// no valid slot: it weighs nothing in the merge). One part: the chunk.
pub fn local_parts((s0, s1): (usize, usize), parts: usize) -> Vec<(usize, usize)> {
    let n = s1 - s0;
    let per = n.div_ceil(parts).div_ceil(8) * 8;
    (0..parts)
        .map(|j| {
            let lo = (j * per).min(n);
            (s0 + lo, s0 + (lo + per).min(n))
        })
        .collect()
}

/// Decode attention as the kernel computes it, in chunks of `chunk` slots,
/// each cut into `parts` as the warp-local form cuts it (1: the block
/// form), the chunks' partials merged `by` the folded combine or the
/// combine kernel's grouping: q [b, n_q, d_k], k [b, n_k, len, d_k], v [b,
/// n_v, len, d_v] (row-major), valid [b, len] or None -> [b, n_q, d_v].
/// Query head i reads K head i / (n_q / n_k) and V head i / (n_q / n_v).
pub fn split_merge(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    valid: Option<&[bool]>,
    d: Dims,
    (chunk, parts, by): (usize, usize, Merge),
    scale: f64,
) -> Vec<f64> {
    assert!(chunk > 0 && d.n_q.is_multiple_of(d.n_k) && d.n_q.is_multiple_of(d.n_v));
    let splits = d.len.div_ceil(chunk);
    let mut out = Vec::with_capacity(d.b * d.n_q * d.d_v);
    for b in 0..d.b {
        for h in 0..d.n_q {
            let (kh, vh) = (h / (d.n_q / d.n_k), h / (d.n_q / d.n_v));
            let q2: Vec<f64> = q[(b * d.n_q + h) * d.d_k..][..d.d_k]
                .iter()
                .map(|x| x * scale * std::f64::consts::LOG2_E)
                .collect();
            let kbase = (b * d.n_k + kh) * d.len * d.d_k;
            let vbase = (b * d.n_v + vh) * d.len * d.d_v;
            let key = |s: usize| &k[kbase + s * d.d_k..][..d.d_k];
            let value = |s: usize| &v[vbase + s * d.d_v..][..d.d_v];
            let ok = |s: usize| valid.is_none_or(|m| m[b * d.len + s]);
            let parts: Vec<Partial> = (0..splits)
                .map(|i| {
                    let range = (i * chunk, ((i + 1) * chunk).min(d.len));
                    let pieces: Vec<Partial> = local_parts(range, parts)
                        .into_iter()
                        .filter(|(lo, hi)| lo < hi)
                        .map(|r| chunk_partial(&q2, &key, &value, &ok, r))
                        .collect();
                    combine(&pieces, d.d_v)
                })
                .collect();
            out.extend(by.apply(&parts, d.d_v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::generate::decode_attention_ops;
    use crate::kernels::decode::plan::{candidates, DecodeShape};
    use tch::{Kind, Tensor};

    /// Deterministic values in [-2, 2) (splitmix64).
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
            })
            .collect()
    }

    /// Left padding: sequence i has its first `pad(i)` slots masked.
    fn left_padding(d: Dims, pad: &dyn Fn(usize) -> usize) -> Vec<bool> {
        (0..d.b)
            .flat_map(|i| (0..d.len).map(move |s| s >= pad(i)))
            .collect()
    }

    /// The split-and-merge result and full attention (the tensor path, f64).
    fn both(
        d: Dims,
        valid: Option<&[bool]>,
        cut: (usize, usize, Merge),
        seed: u64,
    ) -> (Vec<f64>, Vec<f64>) {
        let q = values(d.b * d.n_q * d.d_k, seed);
        let k = values(d.b * d.n_k * d.len * d.d_k, seed + 1);
        let v = values(d.b * d.n_v * d.len * d.d_v, seed + 2);
        let scale = 1.0 / (d.d_k as f64).sqrt();
        let ours = split_merge(&q, &k, &v, valid, d, cut, scale);
        let t = |x: &[f64], shape: [usize; 4]| Tensor::from_slice(x).view(shape.map(|n| n as i64));
        let m = valid.map(|m| {
            Tensor::from_slice(&m.iter().map(|&x| u8::from(x)).collect::<Vec<u8>>())
                .to_kind(Kind::Bool)
                .view([d.b as i64, d.len as i64])
        });
        let full = decode_attention_ops(
            &t(&q, [d.b, d.n_q, 1, d.d_k]),
            &t(&k, [d.b, d.n_k, d.len, d.d_k]),
            &t(&v, [d.b, d.n_v, d.len, d.d_v]),
            m.as_ref(),
            scale,
        );
        let full: Vec<f64> = Vec::try_from(full.flatten(0, -1)).expect("f64 values");
        (ours, full)
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    const SIGMA: Dims = Dims {
        b: 2,
        n_q: 8,
        n_k: 1,
        n_v: 4,
        d_k: 16,
        d_v: 8,
        len: 0,
    };

    #[test]
    fn split_and_merge_is_full_attention_for_every_chunking() {
        // Contexts that are and are not multiples of the chunk, one slot,
        // one split, many splits, a last chunk of one slot.
        for (len, chunk) in [
            (1, 32),
            (100, 32),
            (97, 32),
            (64, 64),
            (65, 64),
            (1000, 96),
            (33, 1),
        ] {
            let d = Dims { len, ..SIGMA };
            // The folded merge, the combine kernel's groups, and groups
            // that neither divide the splits nor take them in one batch.
            let merges = [
                Merge::Folded,
                Merge::combine_kernel(d.d_v),
                Merge::Combine {
                    groups: 3,
                    batch: 2,
                },
            ];
            for parts in [1, 2, 3, 8] {
                for by in merges {
                    let (ours, full) = both(d, None, (chunk, parts, by), len as u64);
                    assert!(
                        max_diff(&ours, &full) < 1e-12,
                        "len {len} chunk {chunk} parts {parts} {by:?}"
                    );
                }
            }
        }
        // Every plan the search would time, for SIGMA-1.5B's heads (n_k < n_v)
        // and for n_k > n_v.
        let shape = crate::kernels::decode::plan::tests::sigma_1_5b();
        for (n_k, n_v) in [(4, 16), (16, 4)] {
            let d = Dims {
                b: 1,
                n_q: 32,
                n_k,
                n_v,
                d_k: 16,
                d_v: 16,
                len: 1100,
            };
            let own = DecodeShape {
                n_k: n_k as i64,
                n_v: n_v as i64,
                ..shape
            };
            for p in candidates(&shape, 1100) {
                let parts = own.grouped(p.groups).local_parts(p.rows.local) as usize;
                let by = if p.fold {
                    Merge::Folded
                } else {
                    Merge::combine_kernel(d.d_v)
                };
                let (ours, full) = both(d, None, (p.chunk as usize, parts, by), 7);
                assert!(max_diff(&ours, &full) < 1e-12, "{n_k}/{n_v} {p:?}");
            }
        }
    }

    #[test]
    fn padded_rows_are_left_out_and_a_row_with_no_slot_gives_zeros() {
        let d = Dims {
            b: 4,
            len: 300,
            ..SIGMA
        };
        // Padding that ends inside a chunk, on a chunk boundary, and covers
        // several whole chunks (which then contribute nothing).
        let pad = [0, 37, 64, 250];
        let valid = left_padding(d, &|i| pad[i]);
        // In the warp-local form, parts wholly padded and parts padded in part.
        // In the combine kernel's merge, groups and batches of splits that
        // are wholly padded.
        for chunk in [32, 64, 128, 512] {
            for parts in [1, 4, 8] {
                for by in [
                    Merge::Folded,
                    Merge::Combine {
                        groups: 2,
                        batch: 2,
                    },
                ] {
                    let (ours, full) = both(d, Some(&valid), (chunk, parts, by), 11);
                    assert!(
                        max_diff(&ours, &full) < 1e-12,
                        "chunk {chunk} parts {parts} {by:?}"
                    );
                }
            }
        }
        // The padding changes the result (it is not ignored).
        let (unmasked, _) = both(d, None, (64, 1, Merge::Folded), 11);
        let (masked, _) = both(d, Some(&valid), (64, 1, Merge::Folded), 11);
        assert!(max_diff(&masked, &unmasked) > 1e-3);
        // A sequence whose every slot is padding: zeros (full attention's
        // softmax gives NaN there), and the other sequences are unaffected.
        let valid = left_padding(d, &|i| if i == 1 { d.len } else { pad[i] });
        let (ours, full) = both(d, Some(&valid), (64, 4, Merge::combine_kernel(d.d_v)), 11);
        let row = d.n_q * d.d_v;
        assert!(ours[row..2 * row].iter().all(|&x| x == 0.0));
        assert!(full[row..2 * row].iter().all(|x| x.is_nan()));
        assert!(max_diff(&ours[..row], &full[..row]) < 1e-12);
        assert!(max_diff(&ours[2 * row..], &full[2 * row..]) < 1e-12);
    }

    #[test]
    fn merging_is_rescaling_to_the_common_max() {
        // Two chunks whose maxima differ by 3: the first is weighted by 2^-3.
        let a = Partial {
            o: vec![1.0, 2.0],
            m: 1.0,
            l: 2.0,
        };
        let b = Partial {
            o: vec![4.0, 8.0],
            m: 4.0,
            l: 1.0,
        };
        let want = [(0.125 + 4.0) / 1.25, (0.25 + 8.0) / 1.25];
        assert!(max_diff(&merge(&[a.clone(), b.clone()], 2), &want) < 1e-15);
        assert!(max_diff(&merge(&[b.clone(), a], 2), &want) < 1e-15, "order");
        // A chunk with no valid slot does not count; none at all gives zeros.
        let empty = Partial {
            o: vec![0.0, 0.0],
            m: f64::NEG_INFINITY,
            l: 0.0,
        };
        assert_eq!(merge(&[empty.clone(), b.clone()], 2), merge(&[b], 2));
        assert_eq!(merge(&[empty.clone(), empty], 2), vec![0.0, 0.0]);
    }

    #[test]
    fn the_warp_local_parts_cover_a_chunk_in_order_in_multiples_of_8() {
        assert_eq!(local_parts((0, 100), 1), vec![(0, 100)]);
        // 100 slots in 4 parts: 25 rounded up to 32; the last part short.
        assert_eq!(
            local_parts((200, 300), 4),
            vec![(200, 232), (232, 264), (264, 296), (296, 300)]
        );
        // A chunk shorter than its parts need: the last ones empty.
        assert_eq!(
            local_parts((64, 73), 8),
            vec![
                (64, 72),
                (72, 73),
                (73, 73),
                (73, 73),
                (73, 73),
                (73, 73),
                (73, 73),
                (73, 73)
            ]
        );
    }
}
