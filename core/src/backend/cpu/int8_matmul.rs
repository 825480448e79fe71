//! `out[T, N] = x[T, K] · w[N, K]ᵀ + bias` for Q4_0, Q4_1, Q8_0, Q4_K and Q6_K weights with the activations
//! quantized as well: each input row to 8-bit integers in blocks of 32 with one f32 scale per
//! block, so a block's 32 products are one integer dot product (`vpdpbusd` with AVX-512 VNNI,
//! `vpmaddubsw` + `vpmaddwd` with AVX2) and one multiply-add of its scale — llama.cpp's way of
//! running these files, several times less arithmetic per weight than dequantizing each weight
//! to f32 ([`super::quant_matmul`], which stays exact).
//!
//! Opt-in (`LoadOptions::int8_activations`): results differ from the dequantized f32 model by the
//! rounding of the activations (each value within half its block's step, `amax / 254`). They do
//! not depend on the instruction set, the thread count or how many rows a call holds — every
//! path computes, per input row and block `b` of 32 values:
//!
//! - `amax = max |x|`, `d_x = amax / 127`, `q_i = round_half_even(x_i · (127 / amax))` (all 0
//!   when `amax` is 0; a block holding NaN or ±inf gets `d_x = NaN`, so the outputs it feeds are
//!   NaN rather than a silently finite number);
//!
//! and per output, 8 f32 lanes from zero, for each block in order, lane `l` (values
//! `4l .. 4l + 4` of the block):
//!
//! - `p_l = Σ w_i · q_i`, exact in integers (`w_i`: Q4_0 nibble − 8, Q4_1 nibble, Q8_0 byte,
//!   Q4_K nibble, Q6_K 6-bit value − 32);
//! - `acc_l = fma(p_l, d_w · d_x, acc_l)`; Q4_1 and Q4_K also `acc_l = fma(s_l, m_w · d_x,
//!   acc_l)` with `s_l = Σ q_i` (the offset `m_w` times the block's activations);
//!
//! where a K-quant's 32-value sub-block `s` of a 256-value super-block with scales `d`, `dmin`
//! has `d_w = d · sc_s` and `m_w = −(dmin · m_s)` (Q4_K, 6-bit `sc_s`, `m_s`), or per 16 values
//! `d_w = d · sc` (Q6_K: lanes 0–3 take the first 16 values' scale, lanes 4–7 the second's);
//!
//! then the fixed pairwise sum of the 8 lanes ([`super::simd::reduce8`]) and the bias. So
//! `generate` and `logprobs` still agree bit for bit with each other.

use std::cell::RefCell;

use rayon::prelude::*;

use super::quant_matmul::{checked_jobs, for_each_rect, QuantMatrix, QuantProduct, Rect, BLOCK};
#[cfg(target_arch = "x86_64")]
use super::quant_matmul::{for_each_tile, store_tile, PREFETCH};
use super::simd::reduce8;
#[cfg(target_arch = "x86_64")]
use super::simd::{isa, Isa};
use crate::weights::quant::GgmlType;

/// Whether [`int8_matmul`] runs `ty` (other types stay on the exact kernels).
pub fn supports(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q6K
    )
}

/// How the integer dot products run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Int8Path {
    /// Plain Rust, one value at a time.
    Scalar,
    /// `vpmaddubsw` + `vpmaddwd` (AVX2, FMA, F16C).
    Avx2,
    /// `vpdpbusd` (AVX-512 VNNI with VL and BW).
    Vnni,
}

impl Int8Path {
    /// The fastest path this CPU has within the `RLX_ISA` cap.
    pub fn detect() -> Int8Path {
        static PATH: std::sync::OnceLock<Int8Path> = std::sync::OnceLock::new();
        *PATH.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let level = isa();
                if level >= Isa::Avx2Fma && is_x86_feature_detected!("f16c") {
                    if level >= Isa::Avx512
                        && is_x86_feature_detected!("avx512vnni")
                        && is_x86_feature_detected!("avx512bw")
                    {
                        return Int8Path::Vnni;
                    }
                    return Int8Path::Avx2;
                }
            }
            Int8Path::Scalar
        })
    }
}

/// `out[t*n + j] = Σ_i x[t*k + i] · w[j, i] + bias[j]` for `t < rows` with 8-bit activations
/// (see the module notes). Panics when `w.ty` is not [`supports`]ed or the operands do not
/// match (callers check both).
pub fn int8_matmul(
    out: &mut [f32],
    x: &[f32],
    w: QuantMatrix<'_>,
    bias: Option<&[f32]>,
    rows: usize,
) {
    int8_matmul_on(Int8Path::detect(), out, x, w, bias, rows)
}

/// [`int8_matmul`] on a chosen path (capped at what the machine has).
pub fn int8_matmul_on(
    path: Int8Path,
    out: &mut [f32],
    x: &[f32],
    w: QuantMatrix<'_>,
    bias: Option<&[f32]>,
    rows: usize,
) {
    int8_matmuls_on(path, &mut [QuantProduct { out, w, bias }], x, rows)
}

/// Several [`int8_matmul`]s of the same input rows (q/k/v, gate/up): the rows are quantized
/// once and the products run as one parallel step. Each output's bits are [`int8_matmul`]'s.
pub fn int8_matmuls(products: &mut [QuantProduct<'_>], x: &[f32], rows: usize) {
    int8_matmuls_on(Int8Path::detect(), products, x, rows)
}

/// [`int8_matmuls`] on a chosen path (capped at what the machine has).
pub fn int8_matmuls_on(path: Int8Path, products: &mut [QuantProduct<'_>], x: &[f32], rows: usize) {
    let jobs = checked_jobs(products, x, rows, |ty, k| {
        supports(ty) && QuantMatrix::supports(ty, k)
    });
    let Some(k) = jobs[0].map(|j| j.w.k) else {
        return;
    };
    if rows == 0 {
        return;
    }
    let path = path.min(Int8Path::detect());
    thread_local! {
        static ROWS: RefCell<QuantRows> = RefCell::new(QuantRows::default());
    }
    let run = |xs: &mut QuantRows| {
        xs.fill(path, &x[..rows * k], rows, k);
        let xs = &*xs;
        for_each_rect(rows, &jobs, |job, rect| {
            // SAFETY: tasks cover disjoint rectangles of each product's `out` (rows*n values,
            // checked); `xs` holds `rows` quantized rows of k values; `path` is capped at the
            // machine's.
            unsafe { compute_rect(path, job.out.get(), xs, job.w, job.bias, rect) };
        });
    };
    // A call made while this thread's buffer is in use (a task stolen while waiting) gets its
    // own.
    ROWS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut xs) => {
            run(&mut xs);
            // Decode and small batches reuse the buffer; a long prompt's is not kept.
            if xs.held_bytes() > KEEP_BYTES {
                *xs = QuantRows::default();
            }
        }
        Err(_) => run(&mut QuantRows::default()),
    });
}

/// Input rows quantized in blocks of 32.
#[derive(Default)]
struct QuantRows {
    /// `rows × k` values.
    q: Vec<i8>,
    /// One scale per block (`rows × k/32`).
    d: Vec<f32>,
    /// Per block, the 8 lane sums `Σ q` of four values each, as integers and as f32.
    lane_sums: Vec<i32>,
    lane_sums_f32: Vec<f32>,
}

/// Largest quantized-rows buffer a thread keeps between calls.
const KEEP_BYTES: usize = 8 << 20;

/// Values quantized per thread task when a call's rows are quantized in parallel.
const QUANTIZE_TASK_VALUES: usize = 1 << 15;

impl QuantRows {
    fn held_bytes(&self) -> usize {
        self.q.capacity()
            + 4 * (self.d.capacity() + self.lane_sums.capacity() + self.lane_sums_f32.capacity())
    }

    fn fill(&mut self, path: Int8Path, x: &[f32], rows: usize, k: usize) {
        let nb = k / BLOCK;
        self.q.resize(rows * k, 0);
        self.d.resize(rows * nb, 0.0);
        self.lane_sums.resize(rows * nb * 8, 0);
        self.lane_sums_f32.resize(rows * nb * 8, 0.0);
        let row = |((((x, q), d), sums), sums_f32): RowParts<'_>| {
            for (b, d) in d.iter_mut().enumerate() {
                let (v, l) = (b * BLOCK, b * 8);
                *d = quantize_block(
                    path,
                    &x[v..v + BLOCK],
                    &mut q[v..v + BLOCK],
                    &mut sums[l..l + 8],
                    &mut sums_f32[l..l + 8],
                );
            }
        };
        if rows * k >= 2 * QUANTIZE_TASK_VALUES {
            x.par_chunks_exact(k)
                .zip(self.q.par_chunks_exact_mut(k))
                .zip(self.d.par_chunks_exact_mut(nb))
                .zip(self.lane_sums.par_chunks_exact_mut(nb * 8))
                .zip(self.lane_sums_f32.par_chunks_exact_mut(nb * 8))
                .with_min_len(QUANTIZE_TASK_VALUES / k + 1)
                .for_each(row);
        } else {
            x.chunks_exact(k)
                .zip(self.q.chunks_exact_mut(k))
                .zip(self.d.chunks_exact_mut(nb))
                .zip(self.lane_sums.chunks_exact_mut(nb * 8))
                .zip(self.lane_sums_f32.chunks_exact_mut(nb * 8))
                .for_each(row);
        }
    }
}

type RowParts<'a> = (
    (((&'a [f32], &'a mut [i8]), &'a mut [f32]), &'a mut [i32]),
    &'a mut [f32],
);

/// One block of 32 activations: `q`, the lane sums, and the scale returned.
fn quantize_block(
    path: Int8Path,
    x: &[f32],
    q: &mut [i8],
    sums: &mut [i32],
    sums_f32: &mut [f32],
) -> f32 {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX2 and VNNI paths are chosen only where AVX2 and FMA were detected.
        Int8Path::Avx2 | Int8Path::Vnni => unsafe { quantize_block_avx2(x, q, sums, sums_f32) },
        _ => quantize_block_portable(x, q, sums, sums_f32),
    }
}

/// The same operations compiled for AVX2 (the compiler vectorises them; results are equal).
///
/// # Safety
/// AVX2 and FMA present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(
    x: &[f32],
    q: &mut [i8],
    sums: &mut [i32],
    sums_f32: &mut [f32],
) -> f32 {
    quantize_block_portable(x, q, sums, sums_f32)
}

#[inline(always)]
fn quantize_block_portable(x: &[f32], q: &mut [i8], sums: &mut [i32], sums_f32: &mut [f32]) -> f32 {
    let (x, q) = (&x[..BLOCK], &mut q[..BLOCK]);
    let mut amax = 0f32;
    let mut finite = true;
    for &v in x {
        amax = amax.max(v.abs());
        finite &= v.is_finite();
    }
    if !finite {
        q.fill(0);
        sums[..8].fill(0);
        sums_f32[..8].fill(0.0);
        return f32::NAN;
    }
    let d = amax / 127.0;
    // Adding and subtracting 1.5·2^23 rounds |v| < 2^22 to the nearest integer, ties to even —
    // what `vcvtps2dq` does — in plain arithmetic that vectorises on every level.
    const ROUND: f32 = 12_582_912.0;
    let scale = 127.0 / amax;
    if scale.is_finite() {
        for (q, &v) in q.iter_mut().zip(x) {
            *q = ((v * scale + ROUND) - ROUND).clamp(-127.0, 127.0) as i8;
        }
    } else if amax > 0.0 {
        // amax below ~3.7e-37: 127/amax overflows, so divide by the (subnormal) step instead.
        for (q, &v) in q.iter_mut().zip(x) {
            *q = ((v / d + ROUND) - ROUND).clamp(-127.0, 127.0) as i8;
        }
    } else {
        q.fill(0);
    }
    for l in 0..8 {
        let s: i32 = q[4 * l..4 * l + 4].iter().map(|&v| v as i32).sum();
        sums[l] = s;
        sums_f32[l] = s as f32;
    }
    d
}

/// (bytes per unit, 32-value sub-blocks per unit): a block, or a K-quant's super-block.
const fn unit_shape(ty: u8) -> (usize, usize) {
    match ty {
        Q4_0 => (18, 1),
        Q4_1 => (20, 1),
        Q8_0 => (34, 1),
        Q4_K => (144, 8),
        _ => (210, 8),
    }
}

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;
const Q4_K: u8 = 3;
const Q6_K: u8 = 4;

fn type_code(ty: GgmlType) -> u8 {
    match ty {
        GgmlType::Q4_0 => Q4_0,
        GgmlType::Q4_1 => Q4_1,
        GgmlType::Q4K => Q4_K,
        GgmlType::Q6K => Q6_K,
        _ => Q8_0,
    }
}

/// Q6_K sub-block `s` of a 210-byte unit: where its 32 low-nibble bytes are, whether it takes
/// their high nibbles, where its 32 `qh` bytes are, and the shift of its 2 high bits in them
/// (its two scales are the unit's 2s and 2s + 1).
#[inline(always)]
fn q6k_layout(s: usize) -> (usize, bool, usize, u32) {
    let (half, quarter) = (s / 4, s % 4);
    (
        half * 64 + (quarter % 2) * 32,
        quarter >= 2,
        128 + half * 32,
        2 * quarter as u32,
    )
}

/// # Safety
/// `out` valid for `rect.r1 * w.n` writes, the rectangle exclusive to the caller; operands
/// checked by [`int8_matmul_on`]; `path` no higher than the machine supports.
unsafe fn compute_rect(
    path: Int8Path,
    out: *mut f32,
    xs: &QuantRows,
    w: QuantMatrix<'_>,
    bias: Option<&[f32]>,
    rect: Rect,
) {
    #[cfg(target_arch = "x86_64")]
    macro_rules! dispatch {
        ($m:ident) => {
            match type_code(w.ty) {
                Q4_0 => $m::rect::<{ Q4_0 }>(out, xs, w, bias, rect),
                Q4_1 => $m::rect::<{ Q4_1 }>(out, xs, w, bias, rect),
                Q4_K => $m::rect::<{ Q4_K }>(out, xs, w, bias, rect),
                Q6_K => $m::rect::<{ Q6_K }>(out, xs, w, bias, rect),
                _ => $m::rect::<{ Q8_0 }>(out, xs, w, bias, rect),
            }
        };
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 F/VL/BW/VNNI, AVX2, FMA, F16C detected; caller's contract.
        Int8Path::Vnni => unsafe { dispatch!(x86_vnni) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2, FMA, F16C detected; caller's contract.
        Int8Path::Avx2 => unsafe { dispatch!(x86_avx2) },
        // SAFETY: caller's contract.
        _ => unsafe { scalar_rect(out, xs, w, bias, rect) },
    }
}

/// A K-quant unit's scales as the module notes define them: Q4_K `[d·sc_0 … d·sc_7,
/// −(dmin·m_0) … −(dmin·m_7)]`, Q6_K its 16 `d·sc_i` (one per 16 values).
fn unit_scales(ty: u8, unit: &[u8]) -> [f32; 16] {
    let mut out = [0f32; 16];
    if ty == Q4_K {
        let (d, dmin) = (f16_at(unit, 0), f16_at(unit, 2));
        for s in 0..8 {
            let (sc, m) = super::quant_matmul::scale_min_k4(s, &unit[4..16]);
            out[s] = d * sc;
            out[8 + s] = -(dmin * m);
        }
    } else {
        let d = f16_at(unit, 208);
        for (i, v) in out.iter_mut().enumerate() {
            *v = d * (unit[192 + i] as i8) as f32;
        }
    }
    out
}

/// Sub-block `s` of a unit as the module notes read it: its 32 integer weights, `d_w` of lanes
/// 0–3 and 4–7, and `m_w` (a K-quant's from its unit's [`unit_scales`]).
fn sub_block(ty: u8, unit: &[u8], s: usize, scales: &[f32; 16]) -> ([i32; 32], [f32; 2], f32) {
    let mut w = [0i32; 32];
    let d = f16_at(unit, 0);
    let (dw, mw) = match ty {
        Q8_0 => {
            for (i, w) in w.iter_mut().enumerate() {
                *w = unit[2 + i] as i8 as i32;
            }
            ([d, d], 0.0)
        }
        Q4_0 | Q4_1 => {
            let qs = &unit[if ty == Q4_1 { 4 } else { 2 }..];
            for (i, w) in w.iter_mut().enumerate() {
                let nibble = if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 } as i32;
                *w = if ty == Q4_0 { nibble - 8 } else { nibble };
            }
            let m = if ty == Q4_1 { f16_at(unit, 2) } else { 0.0 };
            ([d, d], m)
        }
        Q4_K => {
            let qs = &unit[16 + (s / 2) * 32..][..32];
            for (w, &q) in w.iter_mut().zip(qs) {
                *w = (q >> (4 * (s % 2))) as i32 & 15;
            }
            ([scales[s], scales[s]], scales[8 + s])
        }
        _ => {
            let (ql, high, qh, shift) = q6k_layout(s);
            for (i, w) in w.iter_mut().enumerate() {
                let low = (unit[ql + i] >> if high { 4 } else { 0 }) & 15;
                let top = (unit[qh + i] >> shift) & 3;
                *w = (low | top << 4) as i32 - 32;
            }
            ([scales[2 * s], scales[2 * s + 1]], 0.0)
        }
    };
    (w, dw, mw)
}

fn f16_at(block: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([block[at], block[at + 1]])).to_f32()
}

/// The reference: the module notes' arithmetic, one value at a time.
///
/// # Safety
/// As [`compute_rect`].
unsafe fn scalar_rect(
    out: *mut f32,
    xs: &QuantRows,
    w: QuantMatrix<'_>,
    bias: Option<&[f32]>,
    r: Rect,
) {
    let ty = type_code(w.ty);
    let (n, k, row_bytes) = (w.n, w.k, w.row_bytes());
    let (nb, (unit, subs)) = (k / BLOCK, unit_shape(ty));
    // Each weight sub-block (and a K-quant unit's scales) is decoded once for all the rows.
    let mut acc = vec![[0f32; 8]; r.r1 - r.r0];
    for c in r.c0..r.c1 {
        let wrow = &w.data[c * row_bytes..(c + 1) * row_bytes];
        acc.fill([0.0; 8]);
        let mut scales = [0f32; 16];
        for b in 0..nb {
            let (unit_bytes, s) = (&wrow[b / subs * unit..][..unit], b % subs);
            if subs > 1 && s == 0 {
                scales = unit_scales(ty, unit_bytes);
            }
            let (weights, dw, mw) = sub_block(ty, unit_bytes, s, &scales);
            for (t, acc) in (r.r0..r.r1).zip(acc.iter_mut()) {
                let q = &xs.q[t * k + b * BLOCK..][..BLOCK];
                let dx = xs.d[t * nb + b];
                let sums = &xs.lane_sums_f32[(t * nb + b) * 8..][..8];
                for (l, a) in acc.iter_mut().enumerate() {
                    let p: i32 = (4 * l..4 * l + 4).map(|i| weights[i] * q[i] as i32).sum();
                    *a = (p as f32).mul_add(dw[l / 4] * dx, *a);
                    if matches!(ty, Q4_1 | Q4_K) {
                        *a = sums[l].mul_add(mw * dx, *a);
                    }
                }
            }
        }
        for (t, acc) in (r.r0..r.r1).zip(&acc) {
            let mut v = reduce8(acc);
            if let Some(b) = bias {
                v += b[c];
            }
            // SAFETY: (t, c) lies in the caller's rectangle.
            unsafe { *out.add(t * n + c) = v };
        }
    }
}

/// The x86 kernels: `$vnni` picks `vpdpbusd` over `vpmaddubsw` + `vpmaddwd`.
macro_rules! x86_int8_kernels {
    ($name:ident, $features:literal, $vnni:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            use std::arch::x86_64::*;

            use super::*;

            /// Input rows per tile.
            const MR: usize = 4;

            /// # Safety
            /// As [`compute_rect`], with this module's features present.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn rect<const TY: u8>(
                out: *mut f32,
                xs: &QuantRows,
                w: QuantMatrix<'_>,
                bias: Option<&[f32]>,
                r: Rect,
            ) {
                for_each_tile(r, MR, |t, take, c, cols| {
                    macro_rules! by_cols {
                        ($r:literal) => {
                            if matches!(TY, Q4_K | Q6_K) {
                                match cols {
                                    4 => tile_k::<TY, $r, 4>(out, xs, w, bias, t, c),
                                    3 => tile_k::<TY, $r, 3>(out, xs, w, bias, t, c),
                                    2 => tile_k::<TY, $r, 2>(out, xs, w, bias, t, c),
                                    _ => tile_k::<TY, $r, 1>(out, xs, w, bias, t, c),
                                }
                            } else {
                                match cols {
                                    4 => tile::<TY, $r, 4>(out, xs, w, bias, t, c),
                                    3 => tile::<TY, $r, 3>(out, xs, w, bias, t, c),
                                    2 => tile::<TY, $r, 2>(out, xs, w, bias, t, c),
                                    _ => tile::<TY, $r, 1>(out, xs, w, bias, t, c),
                                }
                            }
                        };
                    }
                    // SAFETY: rows t..t+take and columns c..c+cols lie in the rectangle.
                    unsafe {
                        match take {
                            1 => by_cols!(1),
                            2 => by_cols!(2),
                            3 => by_cols!(3),
                            _ => by_cols!(4),
                        }
                    }
                });
            }

            /// Lane `l`: `init_l + Σ_{i<4} u_{4l+i} · s_{4l+i}` (u unsigned, s signed bytes).
            #[target_feature(enable = $features)]
            #[inline]
            fn dot_lanes(init: __m256i, u: __m256i, s: __m256i) -> __m256i {
                if $vnni {
                    #[allow(unused_unsafe)]
                    // SAFETY: `$vnni` is set only for the VNNI module, whose features
                    // `dpbusd` needs.
                    unsafe {
                        dpbusd(init, u, s)
                    }
                } else {
                    let pairs = _mm256_maddubs_epi16(u, s);
                    _mm256_add_epi32(init, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
                }
            }

            /// One 32-value block of C weight columns, ready for the integer dot products.
            struct BlockWeights<const C: usize> {
                /// Unsigned weight bytes (offset by the type's constant, or |w| for Q8_0 on AVX2).
                wq: [__m256i; C],
                /// Q8_0 on AVX2: the signed bytes, whose signs move to the activations.
                wsigned: [__m256i; C],
                /// `d_w` per lane.
                dw: [__m256; C],
                /// `m_w` (Q4_1, Q4_K).
                mw: [__m256; C],
            }

            /// Block `b` of the weights into the sums of rows `t..t+R`: the module notes'
            /// per-block arithmetic, one place for every type.
            ///
            /// # Safety
            /// Rows `t..t+R` of `xs` were quantized with `k` values; `b < k / BLOCK`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn add_block<const TY: u8, const R: usize, const C: usize>(
                acc: &mut [[__m256; C]; R],
                xs: &QuantRows,
                w: &BlockWeights<C>,
                t: usize,
                k: usize,
                b: usize,
            ) {
                let nb = k / BLOCK;
                for (i, acc_row) in acc.iter_mut().enumerate() {
                    let row_block = (t + i) * nb + b;
                    // SAFETY: row t+i was quantized: k values, nb scales, 8·nb lane sums.
                    let (xq, dx, sums, sums_f32) = unsafe {
                        (
                            _mm256_loadu_si256(
                                xs.q.as_ptr().add((t + i) * k + b * BLOCK).cast::<__m256i>(),
                            ),
                            _mm256_set1_ps(*xs.d.get_unchecked(row_block)),
                            _mm256_loadu_si256(
                                xs.lane_sums.as_ptr().add(row_block * 8).cast::<__m256i>(),
                            ),
                            _mm256_loadu_ps(xs.lane_sums_f32.as_ptr().add(row_block * 8)),
                        )
                    };
                    // The weights' offsets (Q4_0's −8, Q6_K's −32, VNNI Q8_0's +128) taken out
                    // of the integer sums up front.
                    let minus = |scaled: __m256i| _mm256_sub_epi32(_mm256_setzero_si256(), scaled);
                    let init = match TY {
                        Q4_0 => minus(_mm256_slli_epi32::<3>(sums)),
                        Q6_K => minus(_mm256_slli_epi32::<5>(sums)),
                        Q8_0 if $vnni => minus(_mm256_slli_epi32::<7>(sums)),
                        _ => _mm256_setzero_si256(),
                    };
                    for (j, a) in acc_row.iter_mut().enumerate() {
                        let p = if TY == Q8_0 && !$vnni {
                            dot_lanes(init, w.wq[j], _mm256_sign_epi8(xq, w.wsigned[j]))
                        } else {
                            dot_lanes(init, w.wq[j], xq)
                        };
                        let scale = _mm256_mul_ps(w.dw[j], dx);
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, *a);
                        if matches!(TY, Q4_1 | Q4_K) {
                            *a = _mm256_fmadd_ps(sums_f32, _mm256_mul_ps(w.mw[j], dx), *a);
                        }
                    }
                }
            }

            /// Outputs `(t..t+R, c..c+C)` by the module notes' arithmetic.
            ///
            /// # Safety
            /// As [`rect`]; `t + R <= rows`, `c + C <= w.n`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn tile<const TY: u8, const R: usize, const C: usize>(
                out: *mut f32,
                xs: &QuantRows,
                w: QuantMatrix<'_>,
                bias: Option<&[f32]>,
                t: usize,
                c: usize,
            ) {
                let unit = unit_shape(TY).0;
                let (k, n, row_bytes) = (w.k, w.n, w.row_bytes());
                let nb = k / BLOCK;
                let wp = w.data[c * row_bytes..].as_ptr();
                let mut acc = [[_mm256_setzero_ps(); C]; R];
                for b in 0..nb {
                    let mut wq = [_mm256_setzero_si256(); C];
                    // Q8_0 without VNNI: the signed bytes themselves (their signs move to the
                    // activations, so the unsigned operand |w| stays within i16 pair sums).
                    let mut wsigned = [_mm256_setzero_si256(); C];
                    let mut dw = [_mm256_setzero_ps(); C];
                    let mut mw = [_mm256_setzero_ps(); C];
                    for j in 0..C {
                        let block = wp.wrapping_add(j * row_bytes + b * unit);
                        // Into L2 (see PREFETCH). A prefetch never faults, even past the end of
                        // the matrix.
                        _mm_prefetch::<_MM_HINT_T1>(block.wrapping_add(PREFETCH).cast::<i8>());
                        // SAFETY: row c+j exists and block b lies inside it (operands checked).
                        unsafe {
                            dw[j] = _mm256_cvtph_ps(_mm_set1_epi16(
                                block.cast::<i16>().read_unaligned(),
                            ));
                            if TY == Q4_1 {
                                mw[j] = _mm256_cvtph_ps(_mm_set1_epi16(
                                    block.add(2).cast::<i16>().read_unaligned(),
                                ));
                            }
                            wq[j] = if TY == Q8_0 {
                                let raw = _mm256_loadu_si256(block.add(2).cast::<__m256i>());
                                if $vnni {
                                    // w + 128 as unsigned bytes; the lanes start at −128·Σq.
                                    _mm256_xor_si256(raw, _mm256_set1_epi8(-128))
                                } else {
                                    wsigned[j] = raw;
                                    _mm256_abs_epi8(raw)
                                }
                            } else {
                                let qs = block.add(if TY == Q4_1 { 4 } else { 2 });
                                let raw = _mm_loadu_si128(qs.cast::<__m128i>());
                                let high = _mm_srli_epi16(raw, 4);
                                _mm256_and_si256(
                                    _mm256_set_m128i(high, raw),
                                    _mm256_set1_epi8(0x0f),
                                )
                            };
                        }
                    }
                    let weights = BlockWeights {
                        wq,
                        wsigned,
                        dw,
                        mw,
                    };
                    // SAFETY: rows t..t+R were quantized (k values each).
                    unsafe { add_block::<TY, R, C>(&mut acc, xs, &weights, t, k, b) };
                }
                // SAFETY: the tile lies in the caller's rectangle.
                unsafe { store_tile(&acc, out, n, bias, t, c) };
            }

            /// [`tile`] for the K-quants (Q4_K, Q6_K): a column's super-block scales are decoded
            /// once, then its 8 sub-blocks run against every row — the same per-output order.
            ///
            /// # Safety
            /// As [`rect`]; `t + R <= rows`, `c + C <= w.n`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn tile_k<const TY: u8, const R: usize, const C: usize>(
                out: *mut f32,
                xs: &QuantRows,
                w: QuantMatrix<'_>,
                bias: Option<&[f32]>,
                t: usize,
                c: usize,
            ) {
                let unit = unit_shape(TY).0;
                let (k, n, row_bytes) = (w.k, w.n, w.row_bytes());
                let units = k / (8 * BLOCK);
                let wp = w.data[c * row_bytes..].as_ptr();
                let mut acc = [[_mm256_setzero_ps(); C]; R];
                let nibbles = |raw: __m256i| _mm256_and_si256(raw, _mm256_set1_epi8(0x0f));
                for u in 0..units {
                    let mut blocks = [std::ptr::null::<u8>(); C];
                    let mut scales = [[0f32; 16]; C];
                    for j in 0..C {
                        blocks[j] = wp.wrapping_add(j * row_bytes + u * unit);
                        for line in (0..unit).step_by(64) {
                            // Into L2 (see PREFETCH); never faults, even past the end.
                            let ahead = blocks[j].wrapping_add(PREFETCH + line);
                            _mm_prefetch::<_MM_HINT_T1>(ahead.cast::<i8>());
                        }
                        // SAFETY: row c+j exists and unit u lies inside it (operands checked).
                        scales[j] = unsafe { unit_scales_simd::<TY>(blocks[j]) };
                    }
                    for sub in 0..8 {
                        // The columns side by side: independent FMA chains.
                        let mut wq = [_mm256_setzero_si256(); C];
                        let mut dw = [_mm256_setzero_ps(); C];
                        let mut mw = [_mm256_setzero_ps(); C];
                        for j in 0..C {
                            let (block, sc) = (blocks[j], &scales[j]);
                            // SAFETY: the sub-block's bytes lie in unit u of row c+j.
                            unsafe {
                                if TY == Q4_K {
                                    let raw = _mm256_loadu_si256(
                                        block.add(16 + (sub / 2) * 32).cast::<__m256i>(),
                                    );
                                    wq[j] = nibbles(if sub % 2 == 1 {
                                        _mm256_srli_epi16(raw, 4)
                                    } else {
                                        raw
                                    });
                                    dw[j] = _mm256_set1_ps(sc[sub]);
                                    mw[j] = _mm256_set1_ps(sc[8 + sub]);
                                } else {
                                    let (ql, high, qh, shift) = q6k_layout(sub);
                                    let low = _mm256_loadu_si256(block.add(ql).cast::<__m256i>());
                                    let low =
                                        nibbles(if high { _mm256_srli_epi16(low, 4) } else { low });
                                    let top = _mm256_loadu_si256(block.add(qh).cast::<__m256i>());
                                    let top = _mm256_and_si256(
                                        _mm256_srl_epi16(top, _mm_cvtsi32_si128(shift as i32)),
                                        _mm256_set1_epi8(3),
                                    );
                                    // Each byte's 2 high bits are ≤ 3, so the 16-bit shift
                                    // cannot carry into the next byte.
                                    wq[j] = _mm256_or_si256(low, _mm256_slli_epi16(top, 4));
                                    dw[j] = _mm256_set_m128(
                                        _mm_set1_ps(sc[2 * sub + 1]),
                                        _mm_set1_ps(sc[2 * sub]),
                                    );
                                }
                            }
                        }
                        let weights = BlockWeights {
                            wq,
                            wsigned: wq,
                            dw,
                            mw,
                        };
                        // SAFETY: rows t..t+R were quantized (k values each).
                        unsafe { add_block::<TY, R, C>(&mut acc, xs, &weights, t, k, u * 8 + sub) };
                    }
                }
                // SAFETY: the tile lies in the caller's rectangle.
                unsafe { store_tile(&acc, out, n, bias, t, c) };
            }

            /// [`unit_scales`] with F16C and vector conversions (the same values).
            ///
            /// # Safety
            /// `unit` points at a whole Q4_K (144-byte) or Q6_K (210-byte) unit.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn unit_scales_simd<const TY: u8>(unit: *const u8) -> [f32; 16] {
                let f16 = |at: usize| {
                    // SAFETY: two bytes inside the unit.
                    let bits = unsafe { unit.add(at).cast::<u16>().read_unaligned() };
                    _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
                };
                let mut out = [0f32; 16];
                // SAFETY: the reads stay in the unit's scale bytes; `out` holds 16 values.
                unsafe {
                    if TY == Q4_K {
                        // The 12 scale bytes as three words; byte i of the four results is
                        // `scale_min_k4`'s scale i (words 0–1) and min i (words 2–3), decoded
                        // in registers (byte stores feeding a vector load would stall).
                        let word = |i: usize| unit.add(4 + 4 * i).cast::<u32>().read_unaligned();
                        let (q0, q1, q2) = (word(0), word(1), word(2));
                        let (low6, low4, top2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
                        let packed = _mm_setr_epi32(
                            (q0 & low6) as i32,
                            ((q2 & low4) | (((q0 >> 6) & top2) << 4)) as i32,
                            (q1 & low6) as i32,
                            (((q2 >> 4) & low4) | (((q1 >> 6) & top2) << 4)) as i32,
                        );
                        let wide = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                        let mins = _mm256_mul_ps(f16(2), wide(_mm_srli_si128::<8>(packed)));
                        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_mul_ps(f16(0), wide(packed)));
                        _mm256_storeu_ps(
                            out.as_mut_ptr().add(8),
                            // Negation flips the sign bit, as `-(dmin · m)` does.
                            _mm256_xor_ps(mins, _mm256_set1_ps(-0.0)),
                        );
                    } else {
                        let d = f16(208);
                        for half in 0..2 {
                            let sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                unit.add(192 + 8 * half).cast::<__m128i>(),
                            )));
                            _mm256_storeu_ps(out.as_mut_ptr().add(8 * half), _mm256_mul_ps(d, sc));
                        }
                    }
                }
                out
            }
        }
    };
}

/// `vpdpbusd` on 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512vnni")]
#[inline]
fn dpbusd(
    init: std::arch::x86_64::__m256i,
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_dpbusd_epi32(init, u, s)
}

x86_int8_kernels!(x86_avx2, "avx2,fma,f16c", false);
x86_int8_kernels!(
    x86_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni",
    true
);

#[cfg(test)]
mod tests {
    use super::super::quant_matmul::tests::{blocks_for, grouped, matrices, random_blocks};
    use super::*;
    use crate::backend::cpu::test_values;

    const TYPES: [GgmlType; 5] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ];

    fn paths() -> Vec<Int8Path> {
        [Int8Path::Scalar, Int8Path::Avx2, Int8Path::Vnni]
            .into_iter()
            .filter(|&p| p <= Int8Path::detect())
            .collect()
    }

    /// Every path, row count and thread count computes the same bits (the promise that lets
    /// `generate` and `logprobs` agree).
    #[test]
    fn paths_rows_and_threads_agree_bitwise() {
        if Int8Path::detect() < Int8Path::Vnni {
            println!("only {:?} and below run here", Int8Path::detect());
        }
        for (rows, n, k) in [(9, 37, 512), (5, 8, 32), (2, 13, 96), (3, 6, 768)] {
            let mut x = test_values(rows * k, 5);
            // One all-zero block and one tiny one.
            x[..BLOCK].fill(0.0);
            x[BLOCK..2 * BLOCK].iter_mut().for_each(|v| *v *= 1e-30);
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25).collect();
            // K-quants need whole 256-value super-blocks.
            for ty in TYPES.into_iter().filter(|&ty| QuantMatrix::supports(ty, k)) {
                let data = random_blocks(ty, n, k, 7);
                let w = QuantMatrix {
                    ty,
                    data: &data,
                    n,
                    k,
                };
                let mut want = vec![0f32; rows * n];
                int8_matmul_on(Int8Path::Scalar, &mut want, &x, w, Some(&bias), rows);
                for path in paths() {
                    for take in 1..=rows {
                        let mut out = vec![0f32; take * n];
                        int8_matmul_on(path, &mut out, &x, w, Some(&bias), take);
                        assert_eq!(out, want[..take * n], "{ty:?} {path:?} {take} rows");
                    }
                    for t in 0..rows {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(1 + t % 3)
                            .build()
                            .unwrap();
                        let mut out = vec![0f32; n];
                        pool.install(|| {
                            int8_matmul_on(path, &mut out, &x[t * k..], w, Some(&bias), 1)
                        });
                        assert_eq!(out, want[t * n..(t + 1) * n], "{ty:?} {path:?} row {t}");
                    }
                }
            }
        }
    }

    /// Against the exact product on the dequantized weights: each activation moves by at most
    /// half its block's step (amax/254), so |error| ≤ Σ_i |w_i| · step_i / 2, plus f32 rounding.
    #[test]
    fn within_the_activation_rounding_of_the_exact_product() {
        let (rows, n, k) = (4, 16, 256);
        let x: Vec<f32> = test_values(rows * k, 9).iter().map(|v| v * 3.0).collect();
        for ty in TYPES {
            let data = random_blocks(ty, n, k, 3);
            let dense = ty.dequantize(&data, k).unwrap();
            let w = QuantMatrix {
                ty,
                data: &data,
                n,
                k,
            };
            for path in paths() {
                let mut out = vec![0f32; rows * n];
                int8_matmul_on(path, &mut out, &x, w, None, rows);
                let mut worst = 0f64;
                for t in 0..rows {
                    for j in 0..n {
                        let (mut exact, mut bound, mut size) = (0f64, 0f64, 0f64);
                        for b in 0..k / BLOCK {
                            let xb = &x[t * k + b * BLOCK..][..BLOCK];
                            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                            for i in 0..BLOCK {
                                let (xv, wv) = (xb[i] as f64, dense[j * k + b * BLOCK + i] as f64);
                                exact += xv * wv;
                                bound += wv.abs() * amax / 254.0;
                                size += (xv * wv).abs();
                            }
                        }
                        let err = (out[t * n + j] as f64 - exact).abs();
                        assert!(
                            err <= bound * 1.001 + size * 1e-5,
                            "{ty:?} {path:?} ({t},{j}): error {err} above bound {bound}"
                        );
                        worst = worst.max(err / size);
                    }
                }
                // Not the f32 result either (the test would pass trivially on exact kernels
                // only if the bound were loose; it is not zero here).
                assert!(worst > 0.0, "{ty:?} {path:?}");
            }
        }
    }

    /// Products big enough to split into several tasks per product, with rows quantized in
    /// parallel: the same bits on 1 and 3 threads, grouped or alone, and as the scalar path.
    #[test]
    fn split_products_agree_bitwise() {
        let (rows, k) = (40, 2048);
        let x = test_values(rows * k, 12);
        let shapes = [
            (GgmlType::Q4_1, 300),
            (GgmlType::Q4_0, 150),
            (GgmlType::Q4K, 200),
            (GgmlType::Q6K, 90),
        ];
        let data = blocks_for(&shapes, k);
        let ws = matrices(&shapes, &data, k);
        let scalar = |p: &mut [QuantProduct<'_>], x: &[f32], rows: usize| {
            int8_matmuls_on(Int8Path::Scalar, p, x, rows)
        };
        let want = grouped(scalar, &ws, &x, rows, None);
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let outs = pool.install(|| grouped(int8_matmuls, &ws, &x, rows, None));
            assert_eq!(outs, want, "{threads} threads");
        }
    }

    /// Products sharing an input in one call give each product's own bits.
    #[test]
    fn grouped_products_equal_single_calls() {
        let (rows, k) = (3, 128);
        let x = test_values(rows * k, 8);
        let shapes = [
            (GgmlType::Q4_1, 40),
            (GgmlType::Q8_0, 9),
            (GgmlType::Q4_0, 17),
        ];
        let data = blocks_for(&shapes, k);
        let ws = matrices(&shapes, &data, k);
        let bias: Vec<f32> = (0..40).map(|j| j as f32).collect();
        for take in 1..=rows {
            let outs = grouped(int8_matmuls, &ws, &x, take, Some(&bias));
            for (out, &w) in outs.iter().zip(&ws) {
                let mut want = vec![0f32; take * w.n];
                int8_matmul(&mut want, &x, w, Some(&bias), take);
                assert_eq!(out, &want, "{:?}, {take} rows", w.ty);
            }
        }
    }

    #[test]
    fn non_finite_activations_give_nan() {
        let (n, k) = (4, 256);
        for ty in TYPES {
            let data = random_blocks(ty, n, k, 1);
            let w = QuantMatrix {
                ty,
                data: &data,
                n,
                k,
            };
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut x = test_values(k, 4);
                x[40] = bad;
                for path in paths() {
                    let mut out = vec![0f32; n];
                    int8_matmul_on(path, &mut out, &x, w, None, 1);
                    assert!(out.iter().all(|v| v.is_nan()), "{ty:?} {path:?} {bad}");
                }
            }
        }
    }

    #[test]
    fn quantized_activations_round_half_to_even() {
        // amax 127 makes the scale exactly 1: values land on halves.
        let mut x = [0f32; BLOCK];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -3.5;
        x[3] = 0.5;
        x[4] = -126.5;
        let (mut q, mut s, mut sf) = ([0i8; BLOCK], [0i32; 8], [0f32; 8]);
        for path in paths() {
            let d = quantize_block(path, &x, &mut q, &mut s, &mut sf);
            assert_eq!(d, 1.0);
            assert_eq!(&q[..5], &[127, 2, -4, 0, -126], "{path:?}");
            assert_eq!(s[0], 127 + 2 - 4);
            assert_eq!(sf[1], -126.0);
        }
        // A block so small that 127/amax overflows still quantizes within half a step.
        let mut tiny = [0f32; BLOCK];
        tiny[0] = 1e-38;
        tiny[1] = -5e-39;
        for path in paths() {
            let d = quantize_block(path, &tiny, &mut q, &mut s, &mut sf);
            assert!(d > 0.0 && d.is_finite(), "{path:?}");
            assert_eq!(q[0], 127, "{path:?}");
            assert!((-64..=-63).contains(&q[1]), "{path:?}: {}", q[1]);
            assert!(q[2..].iter().all(|&v| v == 0), "{path:?}");
        }
    }
}
