//! Causal self-attention of packed tokens against their own sequence's KV cache.
//!
//! Token `t` of sequence `s` at position `p` attends to cache positions `0..=p` of `s`; those
//! entries are already written (earlier calls, or earlier in this call for a prefill). Each
//! (token, head) output is computed by one task with an online softmax in position order, so the
//! result for a token does not depend on which other tokens share the call, and no buffer
//! proportional to the cache length is allocated.

use rayon::prelude::*;

use super::simd::{axpy, dot, exp, isa, Isa};
use super::SendPtr;

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
        let head = Head {
            q: &q[t * nh * hs + h * hs..][..hs],
            cache: kv[slot.seq],
            off: (h / group) * hs,
            kv_dim,
            pos: slot.pos,
            scale,
        };
        match isa() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and FMA were detected.
            Isa::Avx2Fma | Isa::Avx512 => unsafe { head_avx2(o, &head) },
            _ => head.run(o, dot, axpy),
        }
    });
}

/// One (token, head) of [`attention`]: its query, its sequence's cache, where its KV head's
/// columns start, and the positions it sees.
struct Head<'a> {
    q: &'a [f32],
    cache: KvView<'a>,
    off: usize,
    kv_dim: usize,
    pos: usize,
    scale: f32,
}

impl Head<'_> {
    /// Online softmax over positions `0..=pos`, accumulating `Σ e_p v_p` into `o`. Positions go
    /// in fixed blocks of [`BLOCK`] (`[0, 8)`, `[8, 16)`, … — by absolute position, so a token's
    /// result does not depend on how it was batched): the block's scores are independent dot
    /// products the CPU overlaps, then one max/rescale per block, then the block's weights in
    /// position order.
    #[inline(always)]
    fn run(
        &self,
        o: &mut [f32],
        dot: impl Fn(&[f32], &[f32]) -> f32,
        axpy: impl Fn(&mut [f32], f32, &[f32]),
    ) {
        let (hs, kv_dim, off) = (self.q.len(), self.kv_dim, self.off);
        o.fill(0.0);
        let mut max = f32::NEG_INFINITY;
        let mut denom = 0f32;
        let mut p0 = 0;
        while p0 <= self.pos {
            let n = BLOCK.min(self.pos + 1 - p0);
            let mut scores = [f32::NEG_INFINITY; BLOCK];
            for (j, s) in scores.iter_mut().enumerate().take(n) {
                let k = &self.cache.k[(p0 + j) * kv_dim + off..][..hs];
                *s = dot(self.q, k) * self.scale;
            }
            let block_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if block_max > max {
                let rescale = exp(max - block_max);
                denom *= rescale;
                for v in o.iter_mut() {
                    *v *= rescale;
                }
                max = block_max;
            }
            for (j, &s) in scores.iter().enumerate().take(n) {
                let e = exp(s - max);
                denom += e;
                axpy(o, e, &self.cache.v[(p0 + j) * kv_dim + off..][..hs]);
            }
            p0 += BLOCK;
        }
        let inv = 1.0 / denom;
        for v in o.iter_mut() {
            *v *= inv;
        }
    }
}

/// Positions per block of the online softmax.
const BLOCK: usize = 8;

/// [`Head::run`] compiled with AVX2 and FMA, so the dot products, the exponentials and the
/// AXPYs inline as vector code instead of a call (and an ISA check) per position.
///
/// # Safety
/// AVX2 and FMA are present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(o: &mut [f32], head: &Head<'_>) {
    use super::simd::x86;
    head.run(o, |a, b| x86::dot(a, b), |y, a, x| x86::axpy(y, a, x));
}

/// Gradient buffers of one sequence's keys and values for one layer, laid out like [`KvView`].
pub struct KvGrad<'a> {
    pub dk: &'a mut [f32],
    pub dv: &'a mut [f32],
}

/// Softmax weights of token `t`, head `h` over positions `0..=pos`, recomputed as the forward
/// did (max first, then the normalizer), passed one at a time to `visit(position, weight)`.
fn for_each_weight(
    qh: &[f32],
    cache: KvView<'_>,
    off: usize,
    kv_dim: usize,
    pos: usize,
    hs: usize,
    mut visit: impl FnMut(usize, f32),
) {
    let scale = 1.0 / (hs as f32).sqrt();
    // Each score once; exponentiated in place, then normalised.
    let mut weights: Vec<f32> = (0..=pos)
        .map(|p| dot(qh, &cache.k[p * kv_dim + off..][..hs]) * scale)
        .collect();
    let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut z = 0f32;
    for w in weights.iter_mut() {
        *w = (*w - max).exp();
        z += *w;
    }
    for (p, w) in weights.into_iter().enumerate() {
        visit(p, w / z);
    }
}

/// Backward of [`attention`]. `out` is the forward's output. Writes `dq (T, NH·HS)`; accumulates
/// into `dkv[seq]` (same layout as the caches). `dq` is computed in parallel per (token, head);
/// key/value gradients in parallel per (sequence, KV head), each accumulated in token order, so
/// nothing depends on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dkv: &mut [KvGrad<'_>],
    dout: &[f32],
    out: &[f32],
    q: &[f32],
    slots: &[Slot],
    kv: &[KvView<'_>],
    heads: Heads,
) {
    let Heads { nh, nkv, hs } = heads;
    let group = nh / nkv;
    let kv_dim = nkv * hs;
    let scale = 1.0 / (hs as f32).sqrt();
    // For (token, head) `i`, calls `visit(position, p_j, dL/ds_j)` with
    // dL/ds_j = p_j (do·v_j − do·o).
    let terms = |i: usize, visit: &mut dyn FnMut(usize, f32, f32)| {
        let (t, h) = (i / nh, i % nh);
        let slot = slots[t];
        let cache = kv[slot.seq];
        let at = t * nh * hs + h * hs;
        let (qh, doh, oh) = (&q[at..at + hs], &dout[at..at + hs], &out[at..at + hs]);
        let off = (h / group) * hs;
        let d_o = dot(doh, oh);
        for_each_weight(qh, cache, off, kv_dim, slot.pos, hs, |p, w| {
            let ds = w * (dot(doh, &cache.v[p * kv_dim + off..][..hs]) - d_o);
            visit(p, w, ds);
        });
    };
    dq.par_chunks_mut(hs).enumerate().for_each(|(i, dqh)| {
        let (t, h) = (i / nh, i % nh);
        let cache = kv[slots[t].seq];
        let off = (h / group) * hs;
        dqh.fill(0.0);
        terms(i, &mut |p, _, ds| {
            axpy(dqh, ds * scale, &cache.k[p * kv_dim + off..][..hs])
        });
    });
    // Key/value gradients: several tokens write the same cache rows, so each (sequence, KV
    // head) — whose rows' columns no other pair touches — is one task that visits its tokens,
    // and the query heads sharing the KV head, in order. Same sums on any thread count.
    let mut tokens_of: Vec<Vec<usize>> = vec![Vec::new(); dkv.len()];
    for (t, slot) in slots.iter().enumerate() {
        tokens_of[slot.seq].push(t);
    }
    let grads: Vec<(SendPtr, SendPtr, usize)> = dkv
        .iter_mut()
        .map(|g| {
            let len = g.dk.len().min(g.dv.len());
            (SendPtr(g.dk.as_mut_ptr()), SendPtr(g.dv.as_mut_ptr()), len)
        })
        .collect();
    (0..dkv.len() * nkv).into_par_iter().for_each(|task| {
        let (seq, kh) = (task / nkv, task % nkv);
        let (dk, dv, len) = grads[seq];
        let off = kh * hs;
        for &t in &tokens_of[seq] {
            for h in kh * group..(kh + 1) * group {
                let i = t * nh + h;
                let at = t * nh * hs + h * hs;
                let (qh, doh) = (&q[at..at + hs], &dout[at..at + hs]);
                terms(i, &mut |p, w, ds| {
                    let row = p * kv_dim + off;
                    assert!(
                        row + hs <= len,
                        "attention_backward: gradient rows too short"
                    );
                    // SAFETY: in bounds (asserted); only task (seq, kh) writes columns
                    // off..off + hs of sequence seq's rows, and nothing reads them meanwhile.
                    let (dk_row, dv_row) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(dk.get().add(row), hs),
                            std::slice::from_raw_parts_mut(dv.get().add(row), hs),
                        )
                    };
                    axpy(dk_row, ds * scale, qh);
                    axpy(dv_row, w, doh);
                });
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_matches_finite_differences() {
        let heads = Heads {
            nh: 4,
            nkv: 2,
            hs: 3,
        };
        let len = 4;
        let (qd, kvd) = (heads.nh * heads.hs, heads.nkv * heads.hs);
        let val = |i: usize, s: usize| (((i * 7 + s * 13) % 17) as f32 - 8.0) / 8.0;
        let q: Vec<f32> = (0..len * qd).map(|i| val(i, 1)).collect();
        let k: Vec<f32> = (0..len * kvd).map(|i| val(i, 2)).collect();
        let v: Vec<f32> = (0..len * kvd).map(|i| val(i, 3)).collect();
        let r: Vec<f32> = (0..len * qd).map(|i| val(i, 4)).collect();
        let slots: Vec<Slot> = (0..len).map(|pos| Slot { seq: 0, pos }).collect();
        let run = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut out = vec![0f32; len * qd];
            attention(&mut out, q, &slots, &[KvView { k, v }], heads);
            out
        };
        let loss = |q: &[f32], k: &[f32], v: &[f32]| {
            run(q, k, v)
                .iter()
                .zip(&r)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
        };
        let out = run(&q, &k, &v);
        let mut dq = vec![0f32; len * qd];
        let (mut dk, mut dv) = (vec![0f32; len * kvd], vec![0f32; len * kvd]);
        attention_backward(
            &mut dq,
            &mut [KvGrad {
                dk: &mut dk,
                dv: &mut dv,
            }],
            &r,
            &out,
            &q,
            &slots,
            &[KvView { k: &k, v: &v }],
            heads,
        );
        let eps = 1e-3f32;
        let fd = |f: &dyn Fn(f32) -> f64| (f(eps) - f(-eps)) / (2.0 * eps as f64);
        for (i, g) in dq.iter().enumerate() {
            let want = fd(&|e| {
                let mut a = q.clone();
                a[i] += e;
                loss(&a, &k, &v)
            });
            assert!((want - *g as f64).abs() < 2e-3, "dq[{i}]: {want} vs {g}");
        }
        for (i, g) in dk.iter().enumerate() {
            let want = fd(&|e| {
                let mut a = k.clone();
                a[i] += e;
                loss(&q, &a, &v)
            });
            assert!((want - *g as f64).abs() < 2e-3, "dk[{i}]: {want} vs {g}");
        }
        for (i, g) in dv.iter().enumerate() {
            let want = fd(&|e| {
                let mut a = v.clone();
                a[i] += e;
                loss(&q, &k, &a)
            });
            assert!((want - *g as f64).abs() < 2e-3, "dv[{i}]: {want} vs {g}");
        }
    }

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
