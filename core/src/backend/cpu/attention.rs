//! Causal self-attention of packed tokens against their own sequence's KV cache.
//!
//! Token `t` of sequence `s` at position `p` attends to cache positions `0..=p` of `s`; those
//! entries are already written (earlier calls, or earlier in this call for a prefill). Each
//! (token, head) output is computed by one task with an online softmax in position order, so the
//! result for a token does not depend on which other tokens share the call, and no buffer
//! proportional to the cache length is allocated.

use rayon::prelude::*;

use super::simd::{axpy, dot};

/// Keys and values of one sequence for one layer: `(capacity, NKV·HS)` each.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// Attention shape: query heads, KV heads, head size.
#[derive(Clone, Copy)]
pub struct Heads {
    pub nh: usize,
    pub nkv: usize,
    pub hs: usize,
}

/// Token placement in a packed batch: which sequence (index into the KV views) and position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub seq: usize,
    pub pos: usize,
}

/// `out (T, NH·HS)` = softmax(q·kᵀ/√HS)·v for every token and head.
pub fn attention(out: &mut [f32], q: &[f32], slots: &[Slot], kv: &[KvView<'_>], heads: Heads) {
    let Heads { nh, nkv, hs } = heads;
    let group = nh / nkv;
    let kv_dim = nkv * hs;
    let scale = 1.0 / (hs as f32).sqrt();
    out.par_chunks_mut(hs).enumerate().for_each(|(i, o)| {
        let (t, h) = (i / nh, i % nh);
        let slot = slots[t];
        let cache = kv[slot.seq];
        let qh = &q[t * nh * hs + h * hs..][..hs];
        let off = (h / group) * hs;
        o.fill(0.0);
        let mut max = f32::NEG_INFINITY;
        let mut denom = 0f32;
        for p in 0..=slot.pos {
            let k = &cache.k[p * kv_dim + off..][..hs];
            let s = dot(qh, k) * scale;
            if s > max {
                let rescale = (max - s).exp();
                denom *= rescale;
                for v in o.iter_mut() {
                    *v *= rescale;
                }
                max = s;
            }
            let e = (s - max).exp();
            denom += e;
            axpy(o, e, &cache.v[p * kv_dim + off..][..hs]);
        }
        let inv = 1.0 / denom;
        for v in o.iter_mut() {
            *v *= inv;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_two_pass_softmax_with_gqa() {
        let heads = Heads {
            nh: 4,
            nkv: 2,
            hs: 3,
        };
        let len = 5;
        let kv_dim = heads.nkv * heads.hs;
        let k: Vec<f32> = (0..len * kv_dim)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let v: Vec<f32> = (0..len * kv_dim)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) / 3.0)
            .collect();
        let q: Vec<f32> = (0..heads.nh * heads.hs)
            .map(|i| (i as f32 - 5.0) / 6.0)
            .collect();
        let mut out = vec![0f32; q.len()];
        let slots = [Slot {
            seq: 0,
            pos: len - 1,
        }];
        attention(&mut out, &q, &slots, &[KvView { k: &k, v: &v }], heads);
        for h in 0..heads.nh {
            let kvh = h / 2;
            let scores: Vec<f64> = (0..len)
                .map(|p| {
                    (0..3)
                        .map(|d| q[h * 3 + d] as f64 * k[p * kv_dim + kvh * 3 + d] as f64)
                        .sum::<f64>()
                        / 3f64.sqrt()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            for d in 0..3 {
                let want: f64 = (0..len)
                    .map(|p| (scores[p] - m).exp() / z * v[p * kv_dim + kvh * 3 + d] as f64)
                    .sum();
                assert!((out[h * 3 + d] as f64 - want).abs() < 1e-5);
            }
        }
    }
}
