//! `C (+)= A · B` with B's rows contiguous and A read one scalar at a time through two strides —
//! so `A` or `Aᵀ` cost the same. The backward pass's products have exactly this shape:
//! `dx = dout · W` (A = dout, B = W) and `dW += doutᵀ · x` (A = doutᵀ, B = x).
//!
//! Every output `C[i, j]` is one chain of fused multiply-adds over `p = 0, 1, …, depth−1` in
//! order, started from 0 (or from the old `C[i, j]` when accumulating). Blocking only pauses a
//! chain (its partial sum is stored as f32 and reloaded, which changes nothing), and threads split
//! outputs, never a chain — so results do not depend on block sizes or the number of threads.
//!
//! Structure (the classic register-blocked kernel): a tile of `MR` rows × `NR` columns (two
//! vectors on x86, four 4-lane vectors on NEON) keeps its sums in registers while `p` runs over a
//! block of `KC` steps, broadcasting one `A` value per row and loading one `B` row's vectors per
//! step. Ragged column edges use masked loads and stores on x86 and a staging row on NEON, so no
//! read or write leaves the operands. Every level runs the same fused chain per output, so
//! AVX2, AVX-512 and NEON give the same bits.

use rayon::prelude::*;

use super::simd::{isa, Isa};
use super::SendPtr;

/// A matrix read element by element: `A(i, p) = data[i * row_stride + p * col_stride]`.
#[derive(Clone, Copy)]
pub struct Strided<'a, T = f32> {
    pub data: &'a [T],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// Steps of the reduction per block: a block of `B` (KC × 32 columns = 32 KiB) stays in L1/L2
/// while every row tile of a task uses it.
const KC: usize = 256;

/// `c[i*ldc + j] = (accumulate ? c[i*ldc + j] : 0) + Σ_p a(i, p) · b[p*ldb + j]` for `i < m`,
/// `j < n`, `p < depth`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Strided<'_>,
    b: &[f32],
    ldb: usize,
    m: usize,
    n: usize,
    depth: usize,
) {
    gemm_on(isa(), true, c, ldc, accumulate, a, b, ldb, m, n, depth)
}

/// [`gemm`] on the calling thread only (the same values): for callers that are already one of
/// many parallel tasks.
#[allow(clippy::too_many_arguments)]
pub fn gemm_serial(
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Strided<'_>,
    b: &[f32],
    ldb: usize,
    m: usize,
    n: usize,
    depth: usize,
) {
    gemm_on(isa(), false, c, ldc, accumulate, a, b, ldb, m, n, depth)
}

/// [`gemm`] on a given instruction set (which must be available: at most [`isa()`]).
#[allow(clippy::too_many_arguments)]
fn gemm_on(
    isa: Isa,
    parallel: bool,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Strided<'_>,
    b: &[f32],
    ldb: usize,
    m: usize,
    n: usize,
    depth: usize,
) {
    assert!(
        isa <= super::simd::isa(),
        "gemm: {isa:?} is not available here"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ldc >= n && last_index(&[(m - 1, ldc)], n - 1).is_some_and(|e| e < c.len()),
        "gemm: C too short"
    );
    if depth == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        last_index(&[(m - 1, a.row_stride), (depth - 1, a.col_stride)], 0)
            .is_some_and(|e| e < a.data.len()),
        "gemm: A too short"
    );
    assert!(
        last_index(&[(depth - 1, ldb)], n - 1).is_some_and(|e| e < b.len()),
        "gemm: B too short"
    );

    let (mr, nr) = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => (x86::MR512, 32),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => (x86::MR256, 16),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => (neon::MR, 16),
        _ => (4, 16),
    };
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let (mb, nb) = output_blocks(m, n, mr, nr, threads);
    let (row_blocks, col_blocks) = (m.div_ceil(mb), n.div_ceil(nb));
    let dst = SendPtr(c.as_mut_ptr());
    let run_task = |task: usize| {
        let (rb, cb) = (task / col_blocks, task % col_blocks);
        let (r0, r1) = (rb * mb, ((rb + 1) * mb).min(m));
        let (c0, c1) = (cb * nb, ((cb + 1) * nb).min(n));
        PACKS.with_borrow_mut(|(pa, pb)| {
            let mut p0 = 0;
            while p0 < depth {
                let kc = KC.min(depth - p0);
                pack_a(pa, a, r0..r1, p0..p0 + kc, mr, 0.0);
                pack_b(pb, b, ldb, c0..c1, p0..p0 + kc, nr);
                for (si, col) in (c0..c1).step_by(nr).enumerate() {
                    for (ti, row) in (r0..r1).step_by(mr).enumerate() {
                        let tile = Tile {
                            c: dst.get(),
                            c_offset: row * ldc + col,
                            ldc,
                            load: accumulate || p0 > 0,
                            a: pa[ti * kc * mr..].as_ptr(),
                            b: pb[si * kc * nr..].as_ptr(),
                            rows: mr.min(r1 - row),
                            cols: nr.min(c1 - col),
                            depth: kc,
                        };
                        // SAFETY: the packs hold `kc` steps of `mr` rows (`nr` columns) for
                        // this tile; C is bounded by the asserts above (row < m, col < n) and
                        // tasks own disjoint blocks of it.
                        unsafe { tile.run(isa) };
                    }
                }
                p0 += kc;
            }
        });
    };
    if parallel {
        (0..row_blocks * col_blocks)
            .into_par_iter()
            .for_each(run_task);
    } else {
        (0..row_blocks * col_blocks).for_each(run_task);
    }
}

/// `Σ count·stride + extra` — the last index an operand's bounds check covers — or `None` on
/// overflow (strides that large cannot index any slice), so the checks cannot wrap.
pub(crate) fn last_index(terms: &[(usize, usize)], extra: usize) -> Option<usize> {
    terms.iter().try_fold(extra, |acc, &(count, stride)| {
        count.checked_mul(stride).and_then(|x| acc.checked_add(x))
    })
}

thread_local! {
    /// Each thread's packed blocks of A and B, reused across calls.
    static PACKS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// Blocks of outputs per task (`mb` rows × `nb` columns): a task packs its block of A once per
/// step block and reuses it for all its columns, and its block of B for all its rows (the
/// packing of B, a read of B from memory, is what tall blocks amortize); narrower and then
/// shorter blocks only as far as needed to give every thread a few tasks.
pub(crate) fn output_blocks(
    m: usize,
    n: usize,
    mr: usize,
    nr: usize,
    threads: usize,
) -> (usize, usize) {
    let threads = threads.max(1);
    let (mut mb, mut nb) = (32 * mr, n.next_multiple_of(nr));
    while m.div_ceil(mb) * n.div_ceil(nb) < 3 * threads {
        if nb > 8 * nr {
            nb = (nb / 2).next_multiple_of(nr);
        } else if mb > 4 * mr {
            mb = (mb / 2).next_multiple_of(mr);
        } else if nb > nr {
            nb = (nb / 2).next_multiple_of(nr);
        } else if mb > mr {
            mb = (mb / 2).next_multiple_of(mr);
        } else {
            break;
        }
    }
    (mb, nb)
}

/// Copies `A(rows, steps)` as consecutive tiles of `mr` rows, each laid out step-major
/// (`[step][mr]`), padding the last tile with `zero`: the kernel then reads one contiguous
/// run. Also packs the bf16 pairs of `bf16_gemm`.
pub(crate) fn pack_a<T: Copy>(
    dst: &mut Vec<T>,
    a: Strided<'_, T>,
    rows: std::ops::Range<usize>,
    steps: std::ops::Range<usize>,
    mr: usize,
    zero: T,
) {
    let kc = steps.len();
    dst.clear();
    dst.resize(rows.len().next_multiple_of(mr) * kc, zero);
    for (ti, tile) in dst.chunks_exact_mut(mr * kc).enumerate() {
        let first = rows.start + ti * mr;
        let height = mr.min(rows.end - first);
        if a.row_stride == 1 {
            // Aᵀ stored row-major (dW's case): each step's `height` values are contiguous.
            for (p, out) in steps.clone().zip(tile.chunks_exact_mut(mr)) {
                let at = first + p * a.col_stride;
                out[..height].copy_from_slice(&a.data[at..at + height]);
            }
        } else {
            for i in 0..height {
                let row = &a.data[(first + i) * a.row_stride..];
                for (p, v) in steps.clone().zip(tile[i..].iter_mut().step_by(mr)) {
                    *v = row[p * a.col_stride];
                }
            }
        }
    }
}

/// Copies `B(steps, cols)` as consecutive slivers of `nr` columns, each step-major
/// (`[step][nr]`), zero-padding the last sliver.
fn pack_b(
    dst: &mut Vec<f32>,
    b: &[f32],
    ldb: usize,
    cols: std::ops::Range<usize>,
    steps: std::ops::Range<usize>,
    nr: usize,
) {
    match nr {
        32 => pack_b_slivers::<32>(dst, b, ldb, cols, steps),
        _ => pack_b_slivers::<16>(dst, b, ldb, cols, steps),
    }
}

/// [`pack_b`] with the sliver width known at compile time, so full rows copy as fixed-size moves.
fn pack_b_slivers<const NR: usize>(
    dst: &mut Vec<f32>,
    b: &[f32],
    ldb: usize,
    cols: std::ops::Range<usize>,
    steps: std::ops::Range<usize>,
) {
    let kc = steps.len();
    dst.clear();
    dst.resize(cols.len().next_multiple_of(NR) * kc, 0.0);
    for (si, sliver) in dst.chunks_exact_mut(NR * kc).enumerate() {
        let first = cols.start + si * NR;
        let width = NR.min(cols.end - first);
        for (p, out) in steps.clone().zip(sliver.chunks_exact_mut(NR)) {
            let src = &b[p * ldb + first..p * ldb + first + width];
            if width == NR {
                // A constant length, so a fixed-size move rather than a memcpy call.
                out[..NR].copy_from_slice(&src[..NR]);
            } else {
                out[..width].copy_from_slice(src);
            }
        }
    }
}

/// One register tile: `rows` (≤ MR) × `cols` (≤ NR) outputs over `depth` packed steps.
struct Tile {
    c: *mut f32,
    c_offset: usize,
    ldc: usize,
    /// Continue the sums already in C (else start from 0).
    load: bool,
    /// `depth` steps of MR values (rows past `rows` are zero).
    a: *const f32,
    /// `depth` steps of NR values (columns past `cols` are zero).
    b: *const f32,
    rows: usize,
    cols: usize,
    depth: usize,
}

impl Tile {
    /// # Safety
    /// `a` and `b` hold `depth` packed steps for this ISA's tile shape; the tile's outputs are
    /// inside C and no other thread touches them; `isa` was detected on this machine.
    unsafe fn run(&self, isa: Isa) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 F detected; bounds per the caller.
            Isa::Avx512 => unsafe { x86::avx512(self) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and FMA detected; bounds per the caller.
            Isa::Avx2Fma => unsafe { x86::avx2(self) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON is part of the aarch64 baseline; bounds per the caller.
            Isa::Neon => unsafe { neon::tile(self) },
            // SAFETY: bounds per the caller.
            _ => unsafe { self.scalar(4, 16) },
        }
    }

    /// # Safety
    /// As [`Tile::run`], with packs of `mr` rows and `nr` columns.
    unsafe fn scalar(&self, mr: usize, nr: usize) {
        for i in 0..self.rows {
            for j in 0..self.cols {
                // SAFETY (all raw accesses): in bounds per the caller.
                let out = unsafe { self.c.add(self.c_offset + i * self.ldc + j) };
                let mut s = if self.load { unsafe { *out } } else { 0.0 };
                for p in 0..self.depth {
                    let av = unsafe { *self.a.add(p * mr + i) };
                    let bv = unsafe { *self.b.add(p * nr + j) };
                    s += av * bv;
                }
                unsafe { *out = s };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Tile;

    /// Tile heights; `gemm` packs A with these.
    pub(super) const MR512: usize = 12;
    pub(super) const MR256: usize = 6;

    /// Instantiates the kernel for every row count up to the tile height, so each has its sums
    /// in registers.
    macro_rules! by_rows {
        ($kernel:ident, $t:expr, $($r:literal)+) => {
            match $t.rows {
                $($r => unsafe { $kernel::<$r>($t) },)+
                _ => unreachable!("tile rows exceed the kernel height"),
            }
        };
    }

    /// # Safety
    /// AVX-512 F present; bounds as [`Tile::run`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(t: &Tile) {
        by_rows!(avx512_rows, t, 1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// # Safety
    /// As [`avx512`]; `t.rows == R`, `t.cols <= 32`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_rows<const R: usize>(t: &Tile) {
        let lanes = |from: usize| -> __mmask16 {
            let n = t.cols.saturating_sub(from).min(16);
            ((1u32 << n) - 1) as __mmask16
        };
        let (m0, m1) = (lanes(0), lanes(16));
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        // SAFETY (all raw accesses below): indices within the operands per the caller; masked
        // lanes are neither read nor written.
        if t.load {
            for (i, a) in acc.iter_mut().enumerate() {
                let p = unsafe { t.c.add(t.c_offset + i * t.ldc) };
                a[0] = unsafe { _mm512_maskz_loadu_ps(m0, p) };
                a[1] = unsafe { _mm512_maskz_loadu_ps(m1, p.wrapping_add(16)) };
            }
        }
        let (mut ap, mut bp) = (t.a, t.b);
        for _ in 0..t.depth {
            let b0 = unsafe { _mm512_loadu_ps(bp) };
            let b1 = unsafe { _mm512_loadu_ps(bp.add(16)) };
            for (i, a) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(unsafe { *ap.add(i) });
                a[0] = _mm512_fmadd_ps(av, b0, a[0]);
                a[1] = _mm512_fmadd_ps(av, b1, a[1]);
            }
            ap = ap.wrapping_add(MR512);
            bp = bp.wrapping_add(32);
        }
        for (i, a) in acc.iter().enumerate() {
            let p = unsafe { t.c.add(t.c_offset + i * t.ldc) };
            unsafe { _mm512_mask_storeu_ps(p, m0, a[0]) };
            unsafe { _mm512_mask_storeu_ps(p.wrapping_add(16), m1, a[1]) };
        }
    }

    /// # Safety
    /// AVX2 and FMA present; bounds as [`Tile::run`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(t: &Tile) {
        by_rows!(avx2_rows, t, 1 2 3 4 5 6)
    }

    /// # Safety
    /// As [`avx2`]; `t.rows == R`, `t.cols <= 16`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_rows<const R: usize>(t: &Tile) {
        let index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let lanes = |from: usize| -> __m256i {
            let n = t.cols.saturating_sub(from).min(8) as i32;
            _mm256_cmpgt_epi32(_mm256_set1_epi32(n), index)
        };
        let (m0, m1) = (lanes(0), lanes(8));
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        // SAFETY (all raw accesses below): indices within the operands per the caller; masked
        // lanes are neither read nor written.
        if t.load {
            for (i, a) in acc.iter_mut().enumerate() {
                let p = unsafe { t.c.add(t.c_offset + i * t.ldc) };
                a[0] = unsafe { _mm256_maskload_ps(p, m0) };
                a[1] = unsafe { _mm256_maskload_ps(p.wrapping_add(8), m1) };
            }
        }
        let (mut ap, mut bp) = (t.a, t.b);
        for _ in 0..t.depth {
            let b0 = unsafe { _mm256_loadu_ps(bp) };
            let b1 = unsafe { _mm256_loadu_ps(bp.add(8)) };
            for (i, a) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(unsafe { *ap.add(i) });
                a[0] = _mm256_fmadd_ps(av, b0, a[0]);
                a[1] = _mm256_fmadd_ps(av, b1, a[1]);
            }
            ap = ap.wrapping_add(MR256);
            bp = bp.wrapping_add(16);
        }
        for (i, a) in acc.iter().enumerate() {
            let p = unsafe { t.c.add(t.c_offset + i * t.ldc) };
            unsafe { _mm256_maskstore_ps(p, m0, a[0]) };
            unsafe { _mm256_maskstore_ps(p.wrapping_add(8), m1, a[1]) };
        }
    }
}

/// The kernel on aarch64 NEON: 6 rows × 16 columns (24 accumulators in four 4-lane registers
/// per row), the same fused chain per output as the x86 kernels, so the same bits.
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::Tile;

    /// Tile height; `gemm` packs A with it (B in slivers of 16).
    pub(super) const MR: usize = 6;

    /// # Safety
    /// Bounds as [`Tile::run`] with packs of `MR` rows and 16 columns.
    pub(super) unsafe fn tile(t: &Tile) {
        // SAFETY (every arm): `t.rows` is the arm's R (≤ MR, as `gemm` tiles); bounds per
        // `Tile::run`.
        match t.rows {
            1 => unsafe { rows::<1>(t) },
            2 => unsafe { rows::<2>(t) },
            3 => unsafe { rows::<3>(t) },
            4 => unsafe { rows::<4>(t) },
            5 => unsafe { rows::<5>(t) },
            _ => unsafe { rows::<6>(t) },
        }
    }

    /// # Safety
    /// As [`tile`]; `t.rows == R`, `t.cols <= 16`.
    #[inline(always)]
    unsafe fn rows<const R: usize>(t: &Tile) {
        // SAFETY (all raw accesses): the packs hold `depth` steps of MR and 16 values; C is
        // read and written only at the tile's `rows` × `cols` outputs (through a staging row
        // when the tile is narrower than 16).
        unsafe {
            let zero = vdupq_n_f32(0.0);
            let mut acc = [[zero; 4]; R];
            let full = t.cols == 16;
            let mut stage = [0f32; 16];
            if t.load {
                for (i, a) in acc.iter_mut().enumerate() {
                    let p = t.c.add(t.c_offset + i * t.ldc);
                    let src = if full {
                        p.cast_const()
                    } else {
                        std::ptr::copy_nonoverlapping(p, stage.as_mut_ptr(), t.cols);
                        stage.as_ptr()
                    };
                    for (v, lane) in a.iter_mut().enumerate() {
                        *lane = vld1q_f32(src.add(4 * v));
                    }
                }
            }
            let (mut ap, mut bp) = (t.a, t.b);
            for _ in 0..t.depth {
                let b = [
                    vld1q_f32(bp),
                    vld1q_f32(bp.add(4)),
                    vld1q_f32(bp.add(8)),
                    vld1q_f32(bp.add(12)),
                ];
                for (i, a) in acc.iter_mut().enumerate() {
                    let av = vld1q_dup_f32(ap.add(i));
                    for (lane, bv) in a.iter_mut().zip(b) {
                        *lane = vfmaq_f32(*lane, av, bv);
                    }
                }
                ap = ap.add(MR);
                bp = bp.add(16);
            }
            for (i, a) in acc.iter().enumerate() {
                let p = t.c.add(t.c_offset + i * t.ldc);
                if full {
                    for (v, lane) in a.iter().enumerate() {
                        vst1q_f32(p.add(4 * v), *lane);
                    }
                } else {
                    for (v, lane) in a.iter().enumerate() {
                        vst1q_f32(stage.as_mut_ptr().add(4 * v), *lane);
                    }
                    std::ptr::copy_nonoverlapping(stage.as_ptr(), p, t.cols);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_values as values;

    #[test]
    fn matches_f64_on_ragged_shapes_both_orientations() {
        for &(m, n, depth) in &[
            (1, 1, 1),
            (13, 33, 7),
            (12, 32, 300),
            (25, 17, 513),
            (7, 70, 2),
            (100, 5, 40),
            (3, 64, 0),
        ] {
            for transposed in [false, true] {
                let a = values(m * depth, 1);
                let b = values(depth * n + 3, 2);
                let a_op = if transposed {
                    Strided {
                        data: &a,
                        row_stride: 1,
                        col_stride: m,
                    }
                } else {
                    Strided {
                        data: &a,
                        row_stride: depth,
                        col_stride: 1,
                    }
                };
                let ldc = n + 2;
                let old = values(m * ldc, 3);
                for accumulate in [false, true] {
                    let mut c = old.clone();
                    gemm(&mut c, ldc, accumulate, a_op, &b, n, m, n, depth);
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j] as f64;
                            if j >= n {
                                assert_eq!(got, old[i * ldc + j] as f64, "padding written");
                                continue;
                            }
                            let mut want = if accumulate {
                                old[i * ldc + j] as f64
                            } else {
                                0.0
                            };
                            for p in 0..depth {
                                let av = if transposed {
                                    a[p * m + i]
                                } else {
                                    a[i * depth + p]
                                };
                                want += av as f64 * b[p * n + j] as f64;
                            }
                            assert!(
                                (got - want).abs() < 1e-4,
                                "{m}x{n}x{depth} ({i},{j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// An FMA rounds the same in 256- and 512-bit registers, so the AVX2 and AVX-512 kernels
    /// (different tiles, same chain per output) agree bit for bit.
    #[test]
    fn avx2_and_avx512_paths_agree_bitwise() {
        if isa() < Isa::Avx512 {
            println!("skipped: no AVX-512 here (or RLX_ISA caps it)");
            return;
        }
        let (m, n, depth) = (50, 70, 300);
        let a = values(m * depth, 6);
        let b = values(depth * n, 7);
        for a_op in [
            Strided {
                data: &a,
                row_stride: depth,
                col_stride: 1,
            },
            Strided {
                data: &a,
                row_stride: 1,
                col_stride: m,
            },
        ] {
            let run = |isa| {
                let mut c = values(m * n, 8);
                gemm_on(isa, true, &mut c, n, true, a_op, &b, n, m, n, depth);
                c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(run(Isa::Avx2Fma), run(Isa::Avx512));
        }
    }

    /// Every vector kernel (AVX2, AVX-512, NEON) computes each output as one fused chain over
    /// the steps in order, from 0 or from the old value: the same bits on every architecture.
    #[test]
    fn vector_kernels_equal_the_fused_chain_reference() {
        if isa() == Isa::Scalar {
            println!("skipped: no vector path here (or RLX_ISA caps it)");
            return;
        }
        for &(m, n, depth) in &[(13, 33, 7), (25, 17, 513), (7, 70, 2), (50, 16, 300)] {
            let a = values(m * depth, 16);
            let b = values(depth * n, 17);
            let old = values(m * n, 18);
            for accumulate in [false, true] {
                let a_op = Strided {
                    data: &a,
                    row_stride: depth,
                    col_stride: 1,
                };
                let mut c = old.clone();
                gemm(&mut c, n, accumulate, a_op, &b, n, m, n, depth);
                for i in 0..m {
                    for j in 0..n {
                        let mut want = if accumulate { old[i * n + j] } else { 0.0 };
                        for p in 0..depth {
                            want = a[i * depth + p].mul_add(b[p * n + j], want);
                        }
                        assert_eq!(
                            c[i * n + j].to_bits(),
                            want.to_bits(),
                            "{:?} {m}x{n}x{depth} ({i},{j})",
                            isa()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bitwise_independent_of_thread_count() {
        let (m, n, depth) = (77, 90, 600);
        let a = values(m * depth, 4);
        let b = values(depth * n, 5);
        let a_op = Strided {
            data: &a,
            row_stride: depth,
            col_stride: 1,
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut c = vec![0f32; m * n];
            pool.install(|| gemm(&mut c, n, false, a_op, &b, n, m, n, depth));
            c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(5));
    }
}
