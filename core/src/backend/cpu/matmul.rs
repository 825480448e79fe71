//! `out[T, N] = x[T, K] · w[N, K]ᵀ + bias[N]` — every linear layer and the LM head.
//!
//! Weights are `[out, in]` (the `nn.Linear` layout), so each output is a dot product of one row
//! of `x` with one row of `w`. Each output is reduced with one 8-lane accumulator over `K` in
//! chunks of 8, then a fixed horizontal sum, then the scalar tail, then the bias: the same
//! operations whatever the tile it sits in, the number of rows `T`, or the thread that runs it.
//! This is what makes a decode step (T = 1) and a full-sequence forward agree bit for bit. The
//! `gemm` crate reorders reductions by problem size, so it cannot keep that promise.
//!
//! Threads split the output rectangle into disjoint blocks; within a block, tiles of 4 rows × 3
//! columns (AVX2; 6 × 4 on AVX-512; 4 × 2 on NEON, whose 8 lanes take two registers) keep the
//! FMA units busy, the rows left over run as one shorter tile, and a single row uses 1 × 8
//! tiles.

use rayon::prelude::*;

use super::gemm::{gemm, Strided};
use super::simd::{isa, Isa};
use super::SendPtr;

/// `out[t*n + j] = dot(x[t*k..][..k], w[j*k..][..k]) + bias[j]` for all `t < rows`, `j < n`.
pub fn matmul(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    n: usize,
    k: usize,
) {
    assert!(
        x.len() >= rows * k && w.len() >= n * k && out.len() >= rows * n,
        "matmul operands too short for {rows}x{n}x{k}"
    );
    if let Some(b) = bias {
        assert!(b.len() >= n, "matmul bias too short");
    }
    if rows == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let row_block = if rows <= 4 {
        rows
    } else {
        // A multiple of both tile heights (4 and 6).
        48.min(rows.next_multiple_of(4))
    };
    let row_blocks = rows.div_ceil(row_block);
    let col_blocks_wanted = (4 * threads).div_ceil(row_blocks).max(1);
    let col_block = n.div_ceil(col_blocks_wanted).next_multiple_of(24).max(24);
    let col_blocks = n.div_ceil(col_block);
    let dst = SendPtr(out.as_mut_ptr());
    (0..row_blocks * col_blocks)
        .into_par_iter()
        .for_each(|task| {
            let (rb, cb) = (task / col_blocks, task % col_blocks);
            let rect = Rect {
                r0: rb * row_block,
                r1: ((rb + 1) * row_block).min(rows),
                c0: cb * col_block,
                c1: ((cb + 1) * col_block).min(n),
            };
            // SAFETY: tasks cover disjoint rectangles of `out`, which holds rows*n values (asserted).
            unsafe { compute_rect(dst.get(), x, w, bias, n, k, rect) };
        });
}

/// Backward of [`matmul`]. Given `dout (T, N)`: writes `dx (T, K) = dout · w` and accumulates
/// `dw (N, K) += doutᵀ · x` and `db (N) += Σ_t dout`. The products run on [`gemm`], whose results
/// do not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    n: usize,
    k: usize,
) {
    assert!(dout.len() >= rows * n && x.len() >= rows * k && w.len() >= n * k);
    if let Some(dx) = dx {
        let dout_rows = Strided {
            data: dout,
            row_stride: n,
            col_stride: 1,
        };
        gemm(dx, k, false, dout_rows, w, k, rows, k, n);
    }
    if let Some(dw) = dw {
        let dout_columns = Strided {
            data: dout,
            row_stride: 1,
            col_stride: n,
        };
        gemm(dw, k, true, dout_columns, x, k, n, k, rows);
    }
    if let Some(db) = db {
        bias_backward(db, dout, rows, n);
    }
}

/// `db (n) += Σ_t dout (t, n)`: columns in parallel, rows in order within each column, so no
/// reduction is split.
pub fn bias_backward(db: &mut [f32], dout: &[f32], rows: usize, n: usize) {
    let db = &mut db[..n];
    let per_task = n.div_ceil(4 * rayon::current_num_threads().max(1)).max(64);
    db.par_chunks_mut(per_task)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let j0 = ci * per_task;
            for t in 0..rows {
                let src = &dout[t * n + j0..t * n + j0 + chunk.len()];
                for (b, g) in chunk.iter_mut().zip(src) {
                    *b += g;
                }
            }
        });
}

#[derive(Clone, Copy)]
pub(super) struct Rect {
    pub r0: usize,
    pub r1: usize,
    pub c0: usize,
    pub c1: usize,
}

/// Writes the outputs of `rect` (row stride `n`).
///
/// # Safety
/// `out` must be valid for writes of `rect.r1 * n` values and no other thread may touch `rect`.
pub(super) unsafe fn compute_rect(
    out: *mut f32,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    k: usize,
    rect: Rect,
) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2+FMA detected; the caller's contract covers `out`.
        Isa::Avx2Fma => unsafe { avx2::rect(out, x, w, bias, n, k, rect) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 F and VL detected, with AVX2 and FMA; the caller's contract covers `out`.
        Isa::Avx512 => unsafe { avx512::rect(out, x, w, bias, n, k, rect) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: the caller's contract covers `out`; NEON is part of the aarch64 baseline.
        Isa::Neon => unsafe { neon::rect(out, x, w, bias, n, k, rect) },
        _ => {
            for r in rect.r0..rect.r1 {
                for c in rect.c0..rect.c1 {
                    let xs = &x[r * k..(r + 1) * k];
                    let ws = &w[c * k..(c + 1) * k];
                    let mut s = super::simd::dot(xs, ws);
                    if let Some(b) = bias {
                        s += b[c];
                    }
                    // SAFETY: r < rect.r1 and c < n, inside the caller's region.
                    unsafe { *out.add(r * n + c) = s };
                }
            }
        }
    }
}

/// The forward kernels for one instruction-set level: tiles of `MR` rows × `NR` columns, each
/// output an 8-lane (256-bit) FMA chain over `K` — the same operations on every level, so the
/// levels agree bit for bit. AVX-512VL only adds registers (32 instead of 16), which fit a
/// larger tile and so fewer loads per FMA.
macro_rules! forward_kernels {
    ($name:ident, $features:literal, $mr:literal, $nr:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            /// Tile height and width for many rows.
            const MR: usize = $mr;
            const NR: usize = $nr;

            use std::arch::x86_64::*;

            use super::super::simd::x86::hsum;
            use super::Rect;
            /// Floats ahead (64 KB) that the tiles prefetch into L2.
            const F32_PREFETCH: usize = 16384;

            /// # Safety
            /// AVX2+FMA present; `out` valid for `rect.r1 * n` writes, region exclusive to the caller.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn rect(
                out: *mut f32,
                x: &[f32],
                w: &[f32],
                bias: Option<&[f32]>,
                n: usize,
                k: usize,
                r: Rect,
            ) {
                let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
                let rows = r.r1 - r.r0;
                // SAFETY (all tile calls below): every tile reads rows r.r0..r.r1 of x and c0..c1 of w,
                // inside the lengths asserted by `matmul`, and writes only inside `r`.
                if rows >= 2 {
                    // Tiles of MR rows, then one tile of the remaining rows: every row block
                    // reads each weight row once per tile, so a remainder of 4 rows costs one
                    // more pass over the weights, not four (batched decode is memory-bound).
                    let mut c = r.c0;
                    while c < r.c1 {
                        let cols = (r.c1 - c).min(NR);
                        let mut row = r.r0;
                        while row < r.r1 {
                            let take = (r.r1 - row).min(MR);
                            // The first row tile of a column block reads its weights from
                            // memory; every row tile also asks for the next block's, so the
                            // weight stream keeps going while the later tiles compute from
                            // cache (batched decode: weights and FMAs take about equal time;
                            // b=16 decode ~290 → ~350 tok/s over asking in the first tile only).
                            let ahead = c + NR < r.c1;
                            unsafe { tile_rows(take, cols, out, x, w, bias, n, k, row, c, ahead) };
                            row += take;
                        }
                        c += cols;
                    }
                } else {
                    for row in r.r0..r.r1 {
                        let mut c = r.c0;
                        while c + 8 <= r.c1 {
                            unsafe { tile::<1, 8>(out, x, w, bias, n, k, row, c, false) };
                            c += 8;
                        }
                        while c < r.c1 {
                            unsafe { tile::<1, 1>(out, x, w, bias, n, k, row, c, false) };
                            c += 1;
                        }
                    }
                }
            }

            /// [`tile`] with its shape chosen at run time: `rows` ≤ MR, `cols` ≤ 4.
            ///
            /// # Safety
            /// As [`tile`] for a `rows` × `cols` tile.
            #[allow(clippy::too_many_arguments)]
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_rows(
                rows: usize,
                cols: usize,
                out: *mut f32,
                x: &[f32],
                w: &[f32],
                bias: *const f32,
                n: usize,
                k: usize,
                row: usize,
                col: usize,
                ahead: bool,
            ) {
                macro_rules! by_cols {
                    ($r:literal) => {
                        match cols {
                            4 => unsafe { tile::<$r, 4>(out, x, w, bias, n, k, row, col, ahead) },
                            3 => unsafe { tile::<$r, 3>(out, x, w, bias, n, k, row, col, ahead) },
                            2 => unsafe { tile::<$r, 2>(out, x, w, bias, n, k, row, col, ahead) },
                            _ => unsafe { tile::<$r, 1>(out, x, w, bias, n, k, row, col, ahead) },
                        }
                    };
                }
                match rows.min(MR) {
                    1 => by_cols!(1),
                    2 => by_cols!(2),
                    3 => by_cols!(3),
                    4 if MR >= 4 => by_cols!(4),
                    5 if MR >= 5 => by_cols!(5),
                    _ if MR >= 6 => by_cols!(6),
                    _ => by_cols!(4),
                }
            }

            /// MR rows × NR columns of outputs starting at (row, col).
            ///
            /// # Safety
            /// `row + MR` rows of `x` and `col + NR` rows of `w` exist (length `k` each); `out` is valid
            /// at `(row + i) * n + col + j` for the tile, and exclusive to the caller.
            #[allow(clippy::too_many_arguments)]
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile<const MR: usize, const NR: usize>(
                out: *mut f32,
                x: &[f32],
                w: &[f32],
                bias: *const f32,
                n: usize,
                k: usize,
                row: usize,
                col: usize,
                ahead: bool,
            ) {
                let xp = unsafe { x.as_ptr().add(row * k) };
                let wp = unsafe { w.as_ptr().add(col * k) };
                let mut acc = [[_mm256_setzero_ps(); NR]; MR];
                let chunks = k / 8;
                for ch in 0..chunks {
                    let off = ch * 8;
                    if ahead && ch % 2 == 0 {
                        // The same lines of the next NR weight rows (one line per 16 floats).
                        // A prefetch never faults, even past the end of `w`.
                        for j in 0..NR {
                            let next = wp.wrapping_add((NR + j) * k + off);
                            _mm_prefetch::<_MM_HINT_T0>(next.cast::<i8>());
                        }
                    }
                    if ch % 2 == 0 {
                        // Ask L2 for each weight row's line F32_PREFETCH floats ahead in the
                        // row-major stream, so decode (which reads every weight from DRAM once)
                        // keeps enough lines in flight (see quant_matmul::PREFETCH; measured:
                        // decode ~50 → ~54 tok/s, batch-16 decode ~394 → ~441; prefill, whose
                        // weights are in cache, unchanged).
                        for j in 0..NR {
                            let next = wp.wrapping_add(j * k + off + F32_PREFETCH);
                            _mm_prefetch::<_MM_HINT_T1>(next.cast::<i8>());
                        }
                    }
                    let mut wv = [_mm256_setzero_ps(); NR];
                    for (j, v) in wv.iter_mut().enumerate() {
                        *v = unsafe { _mm256_loadu_ps(wp.add(j * k + off)) };
                    }
                    for (i, acc_row) in acc.iter_mut().enumerate() {
                        let xv = unsafe { _mm256_loadu_ps(xp.add(i * k + off)) };
                        for (a, wj) in acc_row.iter_mut().zip(wv.iter()) {
                            *a = _mm256_fmadd_ps(xv, *wj, *a);
                        }
                    }
                }
                for (i, acc_row) in acc.iter().enumerate() {
                    for (j, a) in acc_row.iter().enumerate() {
                        let mut s = hsum(*a);
                        for kk in chunks * 8..k {
                            s += unsafe { *xp.add(i * k + kk) * *wp.add(j * k + kk) };
                        }
                        if !bias.is_null() {
                            s += unsafe { *bias.add(col + j) };
                        }
                        unsafe { *out.add((row + i) * n + col + j) = s };
                    }
                }
            }
        }
    };
}

forward_kernels!(avx2, "avx2,fma", 4, 3);
forward_kernels!(avx512, "avx2,fma,avx512f,avx512vl", 6, 4);

/// The forward kernel on aarch64 NEON: each output's 8 lanes live in two 4-lane registers and
/// take the same fused multiply-add chain, horizontal sum, tail and bias as the x86 kernels, so
/// the results are the same bits. Tiles of 4 rows × 2 columns for many rows (16 accumulators,
/// 4 weight and 2 input registers of the 32), 1 × 8 for one row.
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::super::simd::neon::hsum;
    use super::Rect;

    const MR: usize = 4;
    const NR: usize = 2;

    /// # Safety
    /// `out` valid for `r.r1 * n` writes, the region exclusive to the caller; `x` and `w` hold
    /// the rows the rectangle reads (asserted by `matmul`).
    pub(super) unsafe fn rect(
        out: *mut f32,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        k: usize,
        r: Rect,
    ) {
        let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        // SAFETY (all tile calls below): every tile reads rows inside r.r0..r.r1 of x and
        // r.c0..r.c1 of w and writes only inside `r`.
        if r.r1 - r.r0 >= 2 {
            let mut c = r.c0;
            while c < r.c1 {
                let cols = (r.c1 - c).min(NR);
                let mut row = r.r0;
                while row < r.r1 {
                    let take = (r.r1 - row).min(MR);
                    macro_rules! by_cols {
                        ($r:literal) => {
                            match cols {
                                2 => unsafe { tile::<$r, 2>(out, x, w, bias, n, k, row, c) },
                                _ => unsafe { tile::<$r, 1>(out, x, w, bias, n, k, row, c) },
                            }
                        };
                    }
                    match take {
                        1 => by_cols!(1),
                        2 => by_cols!(2),
                        3 => by_cols!(3),
                        _ => by_cols!(4),
                    }
                    row += take;
                }
                c += cols;
            }
        } else {
            for row in r.r0..r.r1 {
                let mut c = r.c0;
                while c + 8 <= r.c1 {
                    unsafe { tile::<1, 8>(out, x, w, bias, n, k, row, c) };
                    c += 8;
                }
                while c < r.c1 {
                    unsafe { tile::<1, 1>(out, x, w, bias, n, k, row, c) };
                    c += 1;
                }
            }
        }
    }

    /// MR rows × NR columns of outputs starting at (row, col).
    ///
    /// # Safety
    /// `row + MR` rows of `x` and `col + NR` rows of `w` exist (length `k` each); `out` is valid
    /// at `(row + i) * n + col + j` for the tile, and exclusive to the caller.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile<const MR: usize, const NR: usize>(
        out: *mut f32,
        x: &[f32],
        w: &[f32],
        bias: *const f32,
        n: usize,
        k: usize,
        row: usize,
        col: usize,
    ) {
        // SAFETY (all raw accesses): inside the operands per the contract above.
        unsafe {
            let xp = x.as_ptr().add(row * k);
            let wp = w.as_ptr().add(col * k);
            let zero = vdupq_n_f32(0.0);
            let mut acc = [[[zero; 2]; NR]; MR];
            let chunks = k / 8;
            for ch in 0..chunks {
                let off = ch * 8;
                let mut wv = [[zero; 2]; NR];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = [
                        vld1q_f32(wp.add(j * k + off)),
                        vld1q_f32(wp.add(j * k + off + 4)),
                    ];
                }
                for (i, acc_row) in acc.iter_mut().enumerate() {
                    let xl = vld1q_f32(xp.add(i * k + off));
                    let xh = vld1q_f32(xp.add(i * k + off + 4));
                    for (a, wj) in acc_row.iter_mut().zip(wv.iter()) {
                        a[0] = vfmaq_f32(a[0], xl, wj[0]);
                        a[1] = vfmaq_f32(a[1], xh, wj[1]);
                    }
                }
            }
            for (i, acc_row) in acc.iter().enumerate() {
                for (j, a) in acc_row.iter().enumerate() {
                    let mut s = hsum(a[0], a[1]);
                    for kk in chunks * 8..k {
                        s += *xp.add(i * k + kk) * *wp.add(j * k + kk);
                    }
                    if !bias.is_null() {
                        s += *bias.add(col + j);
                    }
                    *out.add((row + i) * n + col + j) = s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_values as values;

    fn naive(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * n];
        for r in 0..rows {
            for c in 0..n {
                let mut s: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                    .sum();
                if let Some(b) = b {
                    s += b[c] as f64;
                }
                out[r * n + c] = s;
            }
        }
        out
    }

    /// Close to the f64 product on awkward shapes; and every vector kernel (AVX2, AVX-512, NEON)
    /// computes each output as the fused 8-lane chain of `dot_fused_reference` plus the bias —
    /// the same bits on every architecture, for one row (decode tiles) and many (prefill tiles,
    /// ragged edges included).
    #[test]
    fn matches_naive_and_the_fused_lane_reference_on_awkward_shapes() {
        use super::super::simd::dot_fused_reference;
        for &(rows, n, k) in &[
            (1, 1, 1),
            (1, 7, 13),
            (3, 5, 8),
            (4, 3, 16),
            (5, 29, 63),
            (17, 50, 64),
            (70, 31, 9),
            (0, 4, 4),
            (4, 0, 4),
            (1, 19, 131),
            (1, 16, 8),
            (7, 13, 77),
            (29, 37, 131),
        ] {
            let x = values(rows * k, 1);
            let w = values(n * k, 2);
            let b = values(n, 3);
            let mut out = vec![0f32; rows * n];
            matmul(&mut out, &x, &w, Some(&b), rows, n, k);
            let want = naive(&x, &w, Some(&b), rows, n, k);
            for (o, e) in out.iter().zip(&want) {
                assert!((*o as f64 - e).abs() < 1e-4, "{rows}x{n}x{k}: {o} vs {e}");
            }
            if isa() == Isa::Scalar {
                continue; // the portable path multiplies and adds unfused
            }
            for r in 0..rows {
                for c in 0..n {
                    let (xr, wc) = (&x[r * k..(r + 1) * k], &w[c * k..(c + 1) * k]);
                    let fused = dot_fused_reference(xr, wc) + b[c];
                    let got = out[r * n + c];
                    assert_eq!(
                        got.to_bits(),
                        fused.to_bits(),
                        "{:?} {rows}x{n}x{k} ({r}, {c})",
                        isa()
                    );
                }
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (rows, n, k) = (3, 4, 5);
        let x = values(rows * k, 7);
        let w = values(n * k, 8);
        let b = values(n, 9);
        let r = values(rows * n, 10); // loss = Σ r ⊙ out
        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            let mut out = vec![0f32; rows * n];
            matmul(&mut out, x, w, Some(b), rows, n, k);
            out.iter().zip(&r).map(|(o, r)| *o as f64 * *r as f64).sum()
        };
        let (mut dx, mut dw, mut db) = (vec![0f32; rows * k], vec![0f32; n * k], vec![0f32; n]);
        matmul_backward(
            Some(&mut dx),
            Some(&mut dw),
            Some(&mut db),
            &r,
            &x,
            &w,
            rows,
            n,
            k,
        );
        let eps = 1e-2f32;
        let fd = |f: &dyn Fn(f32) -> f64| (f(eps) - f(-eps)) / (2.0 * eps as f64);
        for i in 0..x.len() {
            let g = fd(&|e| {
                let mut x2 = x.clone();
                x2[i] += e;
                loss(&x2, &w, &b)
            });
            assert!((g - dx[i] as f64).abs() < 1e-3, "dx[{i}]");
        }
        for i in 0..w.len() {
            let g = fd(&|e| {
                let mut w2 = w.clone();
                w2[i] += e;
                loss(&x, &w2, &b)
            });
            assert!((g - dw[i] as f64).abs() < 1e-3, "dw[{i}]");
        }
        for i in 0..b.len() {
            let g = fd(&|e| {
                let mut b2 = b.clone();
                b2[i] += e;
                loss(&x, &w, &b2)
            });
            assert!((g - db[i] as f64).abs() < 1e-3, "db[{i}]");
        }
    }

    /// The AVX-512VL kernels only use more registers (bigger tiles) for the same 8-lane chains,
    /// so both levels give the same bits.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_and_avx512_kernels_agree_bitwise() {
        if isa() < Isa::Avx512 {
            println!("skipped: no AVX-512 here (or RLX_ISA caps it)");
            return;
        }
        let (rows, n, k) = (29, 37, 131);
        let x = values(rows * k, 11);
        let w = values(n * k, 12);
        let b = values(n, 13);
        let rect = Rect {
            r0: 0,
            r1: rows,
            c0: 0,
            c1: n,
        };
        let run = |wide: bool| {
            let mut out = vec![0f32; rows * n];
            // SAFETY: AVX-512 F/VL, AVX2 and FMA were detected; `out` holds rows*n values and
            // this thread alone writes it.
            unsafe {
                if wide {
                    avx512::rect(out.as_mut_ptr(), &x, &w, Some(&b), n, k, rect)
                } else {
                    avx2::rect(out.as_mut_ptr(), &x, &w, Some(&b), n, k, rect)
                }
            }
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn each_row_is_bitwise_independent_of_batch_and_threads() {
        let (rows, n, k) = (37, 45, 72);
        let x = values(rows * k, 4);
        let w = values(n * k, 5);
        let mut full = vec![0f32; rows * n];
        matmul(&mut full, &x, &w, None, rows, n, k);
        // Every tile height, including the remainder tiles of 2..MR-1 rows.
        for few in 2..=13 {
            let mut part = vec![0f32; few * n];
            matmul(&mut part, &x, &w, None, few, n, k);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&part), bits(&full[..few * n]), "{few} rows");
        }
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for r in 0..rows {
            let mut single = vec![0f32; n];
            one.install(|| matmul(&mut single, &x[r * k..(r + 1) * k], &w, None, 1, n, k));
            assert_eq!(
                single.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                full[r * n..(r + 1) * n]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "row {r}"
            );
        }
    }
}
