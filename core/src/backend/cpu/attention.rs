//! Causal self-attention of packed tokens against their own sequence's KV cache.
//!
//! Token `t` of sequence `s` at position `p` attends to cache positions `0..=p` of `s`; those
//! entries are already written (earlier calls, or earlier in this call for a prefill). Each
//! (token, head) output is computed by one task with an online softmax in position order, so the
//! result for a token does not depend on which other tokens share the call, and no buffer
//! proportional to the cache length is allocated.

use rayon::prelude::*;

use super::gemm::{gemm, gemm_serial, Strided};
#[cfg(target_arch = "x86_64")]
use super::simd::Isa;
use super::simd::{axpy, dot, exp, isa};
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
            Isa::Avx2Fma | Isa::Avx512 => unsafe { x86_heads::head(o, &head) },
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

/// The AVX2+FMA heads. Head sizes that are multiples of 8 (up to 128) take
/// [`head_in_registers`](x86_heads::head_in_registers); others take [`Head::run`] compiled
/// for AVX2. Both compute the same values bit for bit (a test checks it).
#[cfg(target_arch = "x86_64")]
mod x86_heads {
    use std::arch::x86_64::*;

    use super::super::simd::{exp, x86};
    use super::{Head, BLOCK};

    /// # Safety
    /// AVX2 and FMA are present.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn head(o: &mut [f32], head: &Head<'_>) {
        macro_rules! by_chunks {
            ($($ch:literal)*) => {
                match head.q.len() {
                    // SAFETY: AVX2 and FMA are present (the caller's contract).
                    $(n if n == 8 * $ch => unsafe { head_in_registers::<$ch>(o, head) },)*
                    _ => unsafe { head_generic(o, head) },
                }
            };
        }
        by_chunks!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
    }

    /// [`Head::run`] compiled with AVX2 and FMA, so the dot products, the exponentials and the
    /// AXPYs inline as vector code instead of a call (and an ISA check) per position.
    ///
    /// # Safety
    /// AVX2 and FMA are present.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn head_generic(o: &mut [f32], head: &Head<'_>) {
        head.run(o, |a, b| x86::dot(a, b), |y, a, x| x86::axpy(y, a, x));
    }

    /// [`Head::run`] for head size `8·CH`, with its arithmetic unchanged but fewer instructions
    /// around it: the running output stays in registers, and a block's eight scores are
    /// lane-summed together (the additions pair the same values as [`x86::hsum`] does for one)
    /// and exponentiated together ([`exp`]'s operations, lane by lane).
    ///
    /// # Safety
    /// AVX2 and FMA are present; `head.q.len() == 8 * CH == o.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn head_in_registers<const CH: usize>(o: &mut [f32], head: &Head<'_>) {
        let (kv_dim, off) = (head.kv_dim, head.off);
        assert!(head.q.len() == 8 * CH && o.len() == 8 * CH);
        let rows = head.pos + 1;
        assert!(
            head.cache.k.len() >= (rows - 1) * kv_dim + off + 8 * CH
                && head.cache.v.len() >= (rows - 1) * kv_dim + off + 8 * CH,
            "attention: cache shorter than the positions it is asked for"
        );
        let (qp, kp, vp) = (
            head.q.as_ptr(),
            head.cache.k.as_ptr(),
            head.cache.v.as_ptr(),
        );
        let mut acc = [_mm256_setzero_ps(); CH];
        let (mut max, mut denom) = (f32::NEG_INFINITY, 0f32);
        let scale = _mm256_set1_ps(head.scale);
        let mut p0 = 0;
        while p0 < rows {
            let n = BLOCK.min(rows - p0);
            let mut sums = [_mm256_setzero_ps(); BLOCK];
            for c in 0..CH {
                // SAFETY: c < CH, inside q (asserted length 8·CH).
                let qv = unsafe { _mm256_loadu_ps(qp.add(8 * c)) };
                for (j, sum) in sums.iter_mut().enumerate().take(n) {
                    // SAFETY: position p0 + j < rows, inside the cache (asserted).
                    let kv = unsafe { _mm256_loadu_ps(kp.add((p0 + j) * kv_dim + off + 8 * c)) };
                    *sum = _mm256_fmadd_ps(qv, kv, *sum);
                }
            }
            let mut scores = [f32::NEG_INFINITY; BLOCK];
            // SAFETY: `scores` holds 8 values.
            unsafe { _mm256_storeu_ps(scores.as_mut_ptr(), _mm256_mul_ps(hsum8(&sums), scale)) };
            scores[n..].fill(f32::NEG_INFINITY);
            let block_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if block_max > max {
                let rescale = exp(max - block_max);
                denom *= rescale;
                for a in acc.iter_mut() {
                    *a = _mm256_mul_ps(*a, _mm256_set1_ps(rescale));
                }
                max = block_max;
            }
            let mut weights = [0f32; BLOCK];
            // SAFETY: both arrays hold 8 values.
            unsafe {
                let shifted = _mm256_sub_ps(_mm256_loadu_ps(scores.as_ptr()), _mm256_set1_ps(max));
                _mm256_storeu_ps(weights.as_mut_ptr(), exp8(shifted));
            }
            for (j, &e) in weights.iter().enumerate().take(n) {
                denom += e;
                let ev = _mm256_set1_ps(e);
                for (c, a) in acc.iter_mut().enumerate() {
                    // SAFETY: position p0 + j < rows, inside the cache (asserted).
                    let v = unsafe { _mm256_loadu_ps(vp.add((p0 + j) * kv_dim + off + 8 * c)) };
                    *a = _mm256_fmadd_ps(ev, v, *a);
                }
            }
            p0 += BLOCK;
        }
        let inv = _mm256_set1_ps(1.0 / denom);
        for (c, a) in acc.iter().enumerate() {
            // SAFETY: c < CH, inside `o` (asserted length 8·CH).
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * c), _mm256_mul_ps(*a, inv)) };
        }
    }

    /// Lane `j` of the result is `x86::hsum(s[j])`, with the same pairs added in the same
    /// order: halves (`i` + `i+4`), then `0+2` and `1+3`, then those two.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn hsum8(s: &[__m256; 8]) -> __m256 {
        let halves = |a: __m256, b: __m256| {
            _mm256_add_ps(
                _mm256_permute2f128_ps(a, b, 0x20),
                _mm256_permute2f128_ps(a, b, 0x31),
            )
        };
        // Lower 128 bits: vector j's four half-sums; upper: vector j + 4's.
        let (q04, q15, q26, q37) = (
            halves(s[0], s[4]),
            halves(s[1], s[5]),
            halves(s[2], s[6]),
            halves(s[3], s[7]),
        );
        let pairs = |a: __m256, b: __m256| {
            _mm256_add_ps(
                _mm256_shuffle_ps(a, b, 0b01_00_01_00),
                _mm256_shuffle_ps(a, b, 0b11_10_11_10),
            )
        };
        let (d01, d23) = (pairs(q04, q15), pairs(q26, q37));
        _mm256_add_ps(
            _mm256_shuffle_ps(d01, d23, 0b10_00_10_00),
            _mm256_shuffle_ps(d01, d23, 0b11_01_11_01),
        )
    }

    /// [`exp`] on 8 lanes: the same operations in the same order, so the same bits.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp8(x: __m256) -> __m256 {
        let c = _mm256_set1_ps;
        // `clamp` keeps a NaN; max/min return their second operand when either is NaN.
        let x = _mm256_min_ps(c(88.72), _mm256_max_ps(c(-87.3), x));
        let k = _mm256_add_ps(_mm256_mul_ps(x, c(std::f32::consts::LOG2_E)), c(0.5));
        let k = _mm256_round_ps(k, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(k, c(0.693_359_4))),
            _mm256_mul_ps(k, c(-2.121_944_4e-4)),
        );
        let mut p = c(1.388_079e-3);
        for coeff in [8.333_524e-3, 4.166_664_6e-2, 1.666_666_7e-1, 0.5, 1.0, 1.0] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), c(coeff));
        }
        let k = _mm256_cvttps_epi32(k);
        // k / 2 rounded toward zero, as Rust's integer division does.
        let half_k = _mm256_srai_epi32(_mm256_add_epi32(k, _mm256_srli_epi32(k, 31)), 1);
        let bias = _mm256_set1_epi32(127);
        let half = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half_k, bias), 23));
        let rest = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_sub_epi32(k, half_k), bias),
            23,
        ));
        _mm256_mul_ps(_mm256_mul_ps(p, half), rest)
    }
}

/// Gradient buffers of one sequence's keys and values for one layer, laid out like [`KvView`].
pub struct KvGrad<'a> {
    pub dk: &'a mut [f32],
    pub dv: &'a mut [f32],
}

/// Softmax weights of one (token, head) over positions `0..=pos`, recomputed as the forward
/// did (max first, then the normalizer), written to `weights[..=pos]`.
#[inline(always)]
fn softmax_weights(
    weights: &mut [f32],
    qh: &[f32],
    cache: KvView<'_>,
    off: usize,
    kv_dim: usize,
    hs: usize,
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let scale = 1.0 / (hs as f32).sqrt();
    for (p, w) in weights.iter_mut().enumerate() {
        *w = dot(qh, &cache.k[p * kv_dim + off..][..hs]) * scale;
    }
    let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut z = 0f32;
    for w in weights.iter_mut() {
        *w = exp(*w - max);
        z += *w;
    }
    let inv = 1.0 / z;
    for w in weights.iter_mut() {
        *w *= inv;
    }
}

/// One (token, head) of the backward: fills its softmax weights `w` and score gradients `ds`
/// (length pos + 1) and, given `dqh`, writes its query gradient. Generic over the dot product
/// and AXPY so that the AVX2 build ([`x86_backward`]) inlines them — the same operations.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_terms(
    (qh, doh, oh): (&[f32], &[f32], &[f32]),
    cache: KvView<'_>,
    (off, kv_dim, hs): (usize, usize, usize),
    w: &mut [f32],
    ds: &mut [f32],
    dqh: Option<&mut [f32]>,
    dot: impl Fn(&[f32], &[f32]) -> f32 + Copy,
    axpy: impl Fn(&mut [f32], f32, &[f32]),
) {
    softmax_weights(w, qh, cache, off, kv_dim, hs, dot);
    let d_o = dot(doh, oh);
    for (p, (d, wp)) in ds.iter_mut().zip(w.iter()).enumerate() {
        *d = wp * (dot(doh, &cache.v[p * kv_dim + off..][..hs]) - d_o);
    }
    if let Some(dqh) = dqh {
        let scale = 1.0 / (hs as f32).sqrt();
        dqh.fill(0.0);
        for (p, d) in ds.iter().enumerate() {
            axpy(dqh, d * scale, &cache.k[p * kv_dim + off..][..hs]);
        }
    }
}

/// One (token, head)'s share of its KV head's key/value gradients: `dk_p += ds_p·scale·q`,
/// `dv_p += w_p·do` for each position `p` (rows of `kv_dim` values from `dk`/`dv`, columns
/// `off..off + hs`).
///
/// # Safety
/// `dk` and `dv` hold `len` values, nothing else touches these columns meanwhile.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn kv_terms(
    (qh, doh): (&[f32], &[f32]),
    (w, ds): (&[f32], &[f32]),
    (dk, dv, len): (SendPtr, SendPtr, usize),
    (off, kv_dim, hs): (usize, usize, usize),
    axpy: impl Fn(&mut [f32], f32, &[f32]),
) {
    let scale = 1.0 / (hs as f32).sqrt();
    for (p, (&wp, &d)) in w.iter().zip(ds).enumerate() {
        let row = p * kv_dim + off;
        assert!(
            row + hs <= len,
            "attention_backward: gradient rows too short"
        );
        // SAFETY: in bounds (asserted); exclusive per the caller.
        let (dk_row, dv_row) = unsafe {
            (
                std::slice::from_raw_parts_mut(dk.get().add(row), hs),
                std::slice::from_raw_parts_mut(dv.get().add(row), hs),
            )
        };
        axpy(dk_row, d * scale, qh);
        axpy(dv_row, wp, doh);
    }
}

/// [`backward_terms`] and [`kv_terms`] compiled with AVX2 and FMA, so the dot products and
/// AXPYs inline instead of a call (and an ISA check) per position.
#[cfg(target_arch = "x86_64")]
mod x86_backward {
    use super::super::simd::x86;
    use super::{KvView, SendPtr};

    /// # Safety
    /// AVX2 and FMA are present.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn terms(
        vectors: (&[f32], &[f32], &[f32]),
        cache: KvView<'_>,
        shape: (usize, usize, usize),
        w: &mut [f32],
        ds: &mut [f32],
        dqh: Option<&mut [f32]>,
    ) {
        super::backward_terms(
            vectors,
            cache,
            shape,
            w,
            ds,
            dqh,
            |a, b| x86::dot(a, b),
            |y, a, x| x86::axpy(y, a, x),
        )
    }

    /// # Safety
    /// AVX2 and FMA are present.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_rows(
        buffers: (&mut [f32], &mut [f32], usize),
        dout: &[f32],
        out: &[f32],
        at: usize,
        qd: usize,
        hs: usize,
    ) {
        super::softmax_rows(buffers, dout, out, at, qd, hs, |a, b| x86::dot(a, b))
    }

    /// # Safety
    /// AVX2 and FMA are present; as [`super::kv_terms`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kv(
        vectors: (&[f32], &[f32]),
        weights: (&[f32], &[f32]),
        grads: (SendPtr, SendPtr, usize),
        shape: (usize, usize, usize),
    ) {
        // SAFETY: per the caller.
        unsafe { super::kv_terms(vectors, weights, grads, shape, |y, a, x| x86::axpy(y, a, x)) }
    }
}

/// Above this many cached values, [`attention_backward`] recomputes each (token, head)'s
/// softmax weights in its second pass instead of keeping them from the first (long sequences:
/// the cache grows with the square of the length).
const CACHED_WEIGHTS_LIMIT: usize = 1 << 24;

/// Backward of [`attention`]. `out` is the forward's output. Writes `dq (T, NH·HS)`; accumulates
/// into `dkv[seq]` (same layout as the caches). `dq` is computed in parallel per (token, head);
/// key/value gradients in parallel per (sequence, KV head), each accumulated in token order, so
/// nothing depends on the thread count.
///
/// Each (token, head) needs its softmax weights `p_j` and score gradients
/// `dL/ds_j = p_j (do·v_j − do·o)`; the first pass computes them and, while they fit in
/// `CACHED_WEIGHTS_LIMIT`, keeps them for the second (the same values either way).
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
    if let Some(spans) = whole_sequences(slots, dkv.len()) {
        return backward_by_products(dq, dkv, dout, out, q, kv, heads, &spans);
    }
    backward_with_cache_limit(
        dq,
        dkv,
        dout,
        out,
        q,
        slots,
        kv,
        heads,
        CACHED_WEIGHTS_LIMIT,
    )
}

/// Each sequence's key and value gradients as raw pointers with their common length, for
/// tasks that write disjoint columns of them.
fn gradient_pointers(dkv: &mut [KvGrad<'_>]) -> Vec<(SendPtr, SendPtr, usize)> {
    dkv.iter_mut()
        .map(|g| {
            let len = g.dk.len().min(g.dv.len());
            (SendPtr(g.dk.as_mut_ptr()), SendPtr(g.dv.as_mut_ptr()), len)
        })
        .collect()
}

/// `data[at..]` read as a matrix with the given strides.
fn strided(data: &[f32], at: usize, row_stride: usize, col_stride: usize) -> Strided<'_> {
    Strided {
        data: &data[at..],
        row_stride,
        col_stride,
    }
}

/// Longest sequence whose backward runs as matrix products: two `(L, L)` f32 buffers per task
/// (32 MiB at this length).
const PRODUCTS_MAX_LEN: usize = 2048;

/// `(first token, length)` of every sequence when the call holds each one whole — its tokens
/// side by side at positions `0, 1, …` (a training forward from empty caches) — and none is
/// longer than [`PRODUCTS_MAX_LEN`]; otherwise `None`.
fn whole_sequences(slots: &[Slot], n_seq: usize) -> Option<Vec<(usize, usize)>> {
    let mut spans = vec![(0usize, 0usize); n_seq];
    let mut t = 0;
    while t < slots.len() {
        let seq = slots[t].seq;
        let span = spans.get_mut(seq)?;
        if span.1 != 0 || slots[t].pos != 0 {
            return None;
        }
        let mut len = 0;
        while t + len < slots.len() && slots[t + len].seq == seq {
            if slots[t + len].pos != len {
                return None;
            }
            len += 1;
        }
        if len > PRODUCTS_MAX_LEN {
            return None;
        }
        *span = (t, len);
        t += len;
    }
    Some(spans)
}

/// The row-wise part of [`backward_by_products`] for `rows` tokens: `probs` holds `Q·Kᵀ` and
/// becomes the causal softmax of its scaled rows; `dscores` holds `dO·Vᵀ` and becomes `dS/√HS`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn softmax_rows(
    (probs, dscores, rows): (&mut [f32], &mut [f32], usize),
    dout: &[f32],
    out: &[f32],
    at: usize,
    qd: usize,
    hs: usize,
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let scale = 1.0 / (hs as f32).sqrt();
    let l = probs.len().min(dscores.len()) / rows.max(1);
    for i in 0..rows {
        let p = &mut probs[i * l..(i + 1) * l];
        let (live, masked) = p.split_at_mut(i + 1);
        let mut max = f32::NEG_INFINITY;
        for x in live.iter_mut() {
            *x *= scale;
            max = max.max(*x);
        }
        let mut z = 0f32;
        for x in live.iter_mut() {
            *x = exp(*x - max);
            z += *x;
        }
        let inv = 1.0 / z;
        live.iter_mut().for_each(|x| *x *= inv);
        masked.fill(0.0);
        let row = at + i * qd;
        let d_o = dot(&dout[row..row + hs], &out[row..row + hs]);
        let ds = &mut dscores[i * l..(i + 1) * l];
        for (d, &pj) in ds.iter_mut().zip(live.iter()) {
            *d = pj * (*d - d_o) * scale;
        }
        ds[i + 1..].fill(0.0);
    }
}

/// [`attention_backward`] for whole sequences (see [`whole_sequences`]), as matrix products per
/// (sequence, KV head) on [`gemm`], for each of its query heads in order:
/// `S = Q·Kᵀ/√HS`, `P = softmax(S)` over `j ≤ i`, `dP = dO·Vᵀ`,
/// `dS = P ∘ (dP − rowsum(dO ∘ O))/√HS`, `dQ = dS·K`, `dK += dSᵀ·Q`, `dV += Pᵀ·dO`.
/// Each value is a fixed sequence of operations (gemm's chains, rows in order), so nothing
/// depends on the thread count; the numbers differ in rounding from the per-position path.
#[allow(clippy::too_many_arguments)]
fn backward_by_products(
    dq: &mut [f32],
    dkv: &mut [KvGrad<'_>],
    dout: &[f32],
    out: &[f32],
    q: &[f32],
    kv: &[KvView<'_>],
    heads: Heads,
    spans: &[(usize, usize)],
) {
    let Heads { nh, nkv, hs } = heads;
    let (group, kv_dim, qd) = (nh / nkv, nkv * hs, nh * hs);
    let tokens: usize = spans.iter().map(|s| s.1).sum();
    assert!(
        dq.len() >= tokens * qd && dout.len() >= tokens * qd && out.len() >= tokens * qd,
        "attention_backward: buffers too short"
    );
    let dq_ptr = SendPtr(dq.as_mut_ptr());
    let grads = gradient_pointers(dkv);
    // With enough tasks to keep every thread busy, each runs its products on its own thread:
    // a task waiting inside a parallel product could otherwise start further tasks, and so
    // hold more (L, L) buffers than there are threads.
    let serial = spans.len() * nkv >= 2 * rayon::current_num_threads();
    let product = if serial { gemm_serial } else { gemm };
    (0..spans.len() * nkv).into_par_iter().for_each(|task| {
        let (seq, g) = (task / nkv, task % nkv);
        let (t0, l) = spans[seq];
        if l == 0 {
            return;
        }
        let (cache, off) = (kv[seq], g * hs);
        let (dk, dv, len) = grads[seq];
        assert!(
            (l - 1) * kv_dim + off + hs <= len.min(cache.k.len()).min(cache.v.len()),
            "attention_backward: cache rows too short"
        );
        // Kᵀ and Vᵀ of this KV head, (HS, L), as gemm's row-major right operands.
        let (mut kt, mut vt) = (vec![0f32; hs * l], vec![0f32; hs * l]);
        for p in 0..l {
            for c in 0..hs {
                kt[c * l + p] = cache.k[p * kv_dim + off + c];
                vt[c * l + p] = cache.v[p * kv_dim + off + c];
            }
        }
        let (mut probs, mut dscores) = (vec![0f32; l * l], vec![0f32; l * l]);
        let (mut dq_h, mut dk_acc, mut dv_acc) =
            (vec![0f32; l * hs], vec![0f32; l * hs], vec![0f32; l * hs]);
        for h in g * group..(g + 1) * group {
            let at = t0 * qd + h * hs;
            let rows = |data| strided(data, at, qd, 1);
            product(&mut probs, l, false, rows(q), &kt, l, l, l, hs);
            product(&mut dscores, l, false, rows(dout), &vt, l, l, l, hs);
            match isa() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: isa() reports AVX2 and FMA only after detecting them.
                Isa::Avx2Fma | Isa::Avx512 => unsafe {
                    x86_backward::softmax_rows((&mut probs, &mut dscores, l), dout, out, at, qd, hs)
                },
                _ => softmax_rows((&mut probs, &mut dscores, l), dout, out, at, qd, hs, dot),
            }
            let by_rows = |data| strided(data, 0, l, 1);
            let by_columns = |data| strided(data, 0, 1, l);
            product(
                &mut dq_h,
                hs,
                false,
                by_rows(&dscores),
                &cache.k[off..],
                kv_dim,
                l,
                hs,
                l,
            );
            product(
                &mut dk_acc,
                hs,
                true,
                by_columns(&dscores),
                &q[at..],
                qd,
                l,
                hs,
                l,
            );
            product(
                &mut dv_acc,
                hs,
                true,
                by_columns(&probs),
                &dout[at..],
                qd,
                l,
                hs,
                l,
            );
            for (i, src) in dq_h.chunks_exact(hs).enumerate() {
                // SAFETY: row t0 + i < tokens of dq (asserted), columns h·HS.. of it; only this
                // task writes query head h of sequence seq's rows.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), dq_ptr.get().add(at + i * qd), hs)
                };
            }
        }
        for (p, (dks, dvs)) in dk_acc
            .chunks_exact(hs)
            .zip(dv_acc.chunks_exact(hs))
            .enumerate()
        {
            let row = p * kv_dim + off;
            // SAFETY: in bounds (asserted above); only task (seq, g) touches columns
            // off..off + hs of sequence seq's rows, and nothing reads them meanwhile.
            let (dk_row, dv_row) = unsafe {
                (
                    std::slice::from_raw_parts_mut(dk.get().add(row), hs),
                    std::slice::from_raw_parts_mut(dv.get().add(row), hs),
                )
            };
            for (a, b) in dk_row.iter_mut().zip(dks) {
                *a += b;
            }
            for (a, b) in dv_row.iter_mut().zip(dvs) {
                *a += b;
            }
        }
    });
}

/// [`attention_backward`] with the cache limit as a parameter (tests run both ways).
#[allow(clippy::too_many_arguments)]
fn backward_with_cache_limit(
    dq: &mut [f32],
    dkv: &mut [KvGrad<'_>],
    dout: &[f32],
    out: &[f32],
    q: &[f32],
    slots: &[Slot],
    kv: &[KvView<'_>],
    heads: Heads,
    cache_limit: usize,
) {
    let Heads { nh, nkv, hs } = heads;
    let group = nh / nkv;
    let kv_dim = nkv * hs;
    // Fills `w` and `ds` (length pos + 1) for (token, head) `i`, and its query gradient when
    // given `dqh`.
    let terms = |i: usize, w: &mut [f32], ds: &mut [f32], dqh: Option<&mut [f32]>| {
        let (t, h) = (i / nh, i % nh);
        let cache = kv[slots[t].seq];
        let at = t * nh * hs + h * hs;
        let vectors = (&q[at..at + hs], &dout[at..at + hs], &out[at..at + hs]);
        let shape = ((h / group) * hs, kv_dim, hs);
        match isa() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: isa() reports AVX2 and FMA only after detecting them.
            Isa::Avx2Fma | Isa::Avx512 => unsafe {
                x86_backward::terms(vectors, cache, shape, w, ds, dqh)
            },
            _ => backward_terms(vectors, cache, shape, w, ds, dqh, dot, axpy),
        }
    };
    let lens: Vec<usize> = (0..slots.len() * nh)
        .map(|i| slots[i / nh].pos + 1)
        .collect();
    let mut starts = Vec::with_capacity(lens.len() + 1);
    starts.push(0usize);
    for len in &lens {
        starts.push(starts[starts.len() - 1] + len);
    }
    let total = starts[lens.len()];
    let cached = total <= cache_limit;
    let (mut w_all, mut ds_all) = if cached {
        (vec![0f32; total], vec![0f32; total])
    } else {
        (Vec::new(), Vec::new())
    };
    {
        // One disjoint (weights, score gradients) pair per (token, head), or none.
        let mut pieces: Vec<(&mut [f32], &mut [f32])> = Vec::with_capacity(lens.len());
        if cached {
            let (mut w_rest, mut ds_rest) = (&mut w_all[..], &mut ds_all[..]);
            for &len in &lens {
                let (w, w_tail) = std::mem::take(&mut w_rest).split_at_mut(len);
                let (ds, ds_tail) = std::mem::take(&mut ds_rest).split_at_mut(len);
                pieces.push((w, ds));
                (w_rest, ds_rest) = (w_tail, ds_tail);
            }
        }
        let dq_of = |i: usize, dqh: &mut [f32], w: &mut [f32], ds: &mut [f32]| {
            terms(i, w, ds, Some(dqh));
        };
        if cached {
            dq.par_chunks_mut(hs)
                .zip(pieces.into_par_iter())
                .enumerate()
                .for_each(|(i, (dqh, (w, ds)))| dq_of(i, dqh, w, ds));
        } else {
            dq.par_chunks_mut(hs).enumerate().for_each(|(i, dqh)| {
                let (mut w, mut ds) = (vec![0f32; lens[i]], vec![0f32; lens[i]]);
                dq_of(i, dqh, &mut w, &mut ds);
            });
        }
    }
    // Key/value gradients: several tokens write the same cache rows, so each (sequence, KV
    // head) — whose rows' columns no other pair touches — is one task that visits its tokens,
    // and the query heads sharing the KV head, in order. Same sums on any thread count.
    let mut tokens_of: Vec<Vec<usize>> = vec![Vec::new(); dkv.len()];
    for (t, slot) in slots.iter().enumerate() {
        tokens_of[slot.seq].push(t);
    }
    let grads = gradient_pointers(dkv);
    let (w_all, ds_all) = (&w_all, &ds_all);
    (0..dkv.len() * nkv).into_par_iter().for_each(|task| {
        let (seq, kh) = (task / nkv, task % nkv);
        let (dk, dv, len) = grads[seq];
        let off = kh * hs;
        let (mut w_scratch, mut ds_scratch) = (Vec::new(), Vec::new());
        for &t in &tokens_of[seq] {
            for h in kh * group..(kh + 1) * group {
                let i = t * nh + h;
                let at = t * nh * hs + h * hs;
                let (qh, doh) = (&q[at..at + hs], &dout[at..at + hs]);
                let (w, ds): (&[f32], &[f32]) = if cached {
                    (
                        &w_all[starts[i]..starts[i + 1]],
                        &ds_all[starts[i]..starts[i + 1]],
                    )
                } else {
                    w_scratch.resize(lens[i], 0.0);
                    ds_scratch.resize(lens[i], 0.0);
                    terms(i, &mut w_scratch, &mut ds_scratch, None);
                    (&w_scratch, &ds_scratch)
                };
                let shape = (off, kv_dim, hs);
                match isa() {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: isa() reports AVX2 and FMA only after detecting them; only task
                    // (seq, kh) writes columns off..off + hs of sequence seq's rows, and nothing
                    // reads them meanwhile.
                    Isa::Avx2Fma | Isa::Avx512 => unsafe {
                        x86_backward::kv((qh, doh), (w, ds), (dk, dv, len), shape)
                    },
                    // SAFETY: as above.
                    _ => unsafe { kv_terms((qh, doh), (w, ds), (dk, dv, len), shape, axpy) },
                }
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
        // The per-position path (whole sequences here, so `attention_backward` took the
        // products) gives the same gradients up to rounding.
        let mut dq1 = vec![0f32; len * qd];
        let (mut dk1, mut dv1) = (vec![0f32; len * kvd], vec![0f32; len * kvd]);
        backward_with_cache_limit(
            &mut dq1,
            &mut [KvGrad {
                dk: &mut dk1,
                dv: &mut dv1,
            }],
            &r,
            &out,
            &q,
            &slots,
            &[KvView { k: &k, v: &v }],
            heads,
            usize::MAX,
        );
        for (a, b) in [(&dq, &dq1), (&dk, &dk1), (&dv, &dv1)] {
            for (x, y) in a.iter().zip(b.iter()) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
        // Recomputing the weights in the second pass gives the same bits as keeping them.
        let mut dq2 = vec![0f32; len * qd];
        let (mut dk2, mut dv2) = (vec![0f32; len * kvd], vec![0f32; len * kvd]);
        backward_with_cache_limit(
            &mut dq2,
            &mut [KvGrad {
                dk: &mut dk2,
                dv: &mut dv2,
            }],
            &r,
            &out,
            &q,
            &slots,
            &[KvView { k: &k, v: &v }],
            heads,
            0,
        );
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&dq1), bits(&dq2));
        assert_eq!(bits(&dk1), bits(&dk2));
        assert_eq!(bits(&dv1), bits(&dv2));
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

    /// The register-resident heads change the instructions, not the arithmetic: same bits as
    /// the generic loop for every supported head size, at positions that end mid-block and on
    /// block edges, and with scores large enough to move the running maximum.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn register_heads_equal_the_generic_loop_bitwise() {
        if isa() < Isa::Avx2Fma {
            println!("skipped: no AVX2+FMA here (or RLX_ISA caps it)");
            return;
        }
        for ch in [1usize, 2, 3, 8, 16] {
            let hs = 8 * ch;
            let (nkv, len) = (2, 37);
            let kv_dim = nkv * hs;
            let k: Vec<f32> = crate::backend::cpu::test_values(len * kv_dim, ch as u32)
                .iter()
                .map(|x| x * 6.0)
                .collect();
            let v = crate::backend::cpu::test_values(len * kv_dim, 100 + ch as u32);
            let q = crate::backend::cpu::test_values(hs, 200 + ch as u32);
            for pos in [0, 6, 7, 8, 9, 20, len - 1] {
                let head = Head {
                    q: &q,
                    cache: KvView { k: &k, v: &v },
                    off: hs,
                    kv_dim,
                    pos,
                    scale: 1.0 / (hs as f32).sqrt(),
                };
                let (mut fast, mut generic) = (vec![0f32; hs], vec![0f32; hs]);
                // SAFETY: AVX2 and FMA were detected; q and o have 8·ch values.
                unsafe {
                    x86_heads::head(&mut fast, &head);
                    x86_heads::head_generic(&mut generic, &head);
                }
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&generic), "hs {hs} pos {pos}");
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn eight_lane_exp_and_lane_sums_equal_the_scalar_ones_bitwise() {
        use std::arch::x86_64::*;
        if isa() < Isa::Avx2Fma {
            println!("skipped: no AVX2+FMA here (or RLX_ISA caps it)");
            return;
        }
        let mut inputs: Vec<f32> = (0..4000).map(|i| -100.0 + i as f32 * 0.0471).collect();
        inputs.extend([
            -87.3,
            88.72,
            -0.0,
            0.0,
            1e-30,
            -1e-30,
            f32::NEG_INFINITY,
            89.0,
        ]);
        inputs.resize(inputs.len().next_multiple_of(8), 1.0);
        for chunk in inputs.chunks(8) {
            let mut got = [0f32; 8];
            // SAFETY: AVX2 and FMA were detected; both arrays hold 8 values.
            unsafe {
                _mm256_storeu_ps(
                    got.as_mut_ptr(),
                    x86_heads::exp8(_mm256_loadu_ps(chunk.as_ptr())),
                )
            };
            for (x, g) in chunk.iter().zip(got) {
                assert_eq!(exp(*x).to_bits(), g.to_bits(), "exp({x})");
            }
        }
        let values = crate::backend::cpu::test_values(64, 9);
        // SAFETY: AVX2 and FMA were detected; `values` holds 64 values.
        let (vectors, sums) = unsafe {
            let vectors: [__m256; 8] =
                std::array::from_fn(|j| _mm256_loadu_ps(values.as_ptr().add(8 * j)));
            let mut sums = [0f32; 8];
            _mm256_storeu_ps(sums.as_mut_ptr(), x86_heads::hsum8(&vectors));
            (vectors, sums)
        };
        for (v, s) in vectors.iter().zip(sums) {
            // SAFETY: as above.
            assert_eq!(
                unsafe { super::super::simd::x86::hsum(*v) }.to_bits(),
                s.to_bits()
            );
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
