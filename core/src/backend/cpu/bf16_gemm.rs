//! Matrix products with bf16 operands and f32 sums — the training step's "bf16 compute" mode
//! (what PyTorch's bf16 autocast does to a linear layer, except that the outputs stay f32).
//!
//! Operands are rounded to bf16 (round to nearest even) and stored as *pairs*: one `u32` holds
//! the values of two consecutive reduction steps `2q` (low half) and `2q + 1` (high half). That
//! is the operand format of AVX-512-BF16's `vdpbf16ps`, which adds two products per f32 lane per
//! instruction — twice the multiply-adds of an f32 FMA, and half the bytes to move. An odd
//! reduction length is padded with a zero step on both sides.
//!
//! `C[i, j] (+)= Σ_q A(i, q) · B(q, j)`, where `A(i, q)` and `B(q, j)` are pairs. Every output is
//! one chain over `q = 0, 1, …` in order (blocking only pauses it; threads split outputs), so
//! results do not depend on the thread count or on how many rows a call has. They do depend on
//! the path: CPUs without AVX-512-BF16 (or with `RLX_ISA` below `avx512bf16`) run an emulation
//! that widens each pair to f32 and adds the two products one at a time, which rounds
//! differently from the hardware instruction.
//!
//! Layouts ([`PairsA`], [`PairsB`]): `A(i, q) = data[i·row_stride + q·pair_stride]` — a bf16
//! copy of a row-major matrix ([`to_pair_rows`], `pair_stride` 1) or of the transpose of one
//! ([`interleave_rows`], `row_stride` 1); `B(q, j) = data[(j / 32)·sliver_stride +
//! q·pair_stride + j % 32]` — the interleaved rows of a matrix ([`interleave_rows`]) or a
//! weight pre-packed once into slivers of 32 columns ([`Bf16Panel`]).

use rayon::prelude::*;
use std::sync::OnceLock;

use super::gemm::{last_index, output_blocks, pack_a, Strided};
use super::simd::{isa, Isa};
use super::SendPtr;

/// Columns per sliver of B (two 16-lane vectors).
pub const SLIVER: usize = 32;

/// Pairs of the reduction per block: a block of B (384 pairs × 32 columns = 48 KiB) stays in
/// L2 while every row tile of a task uses it (measured best among 64–768 on SmolLM2's shapes;
/// fewer blocks mean fewer reloads of the sums in C and fewer packings of A).
const KC_PAIRS: usize = 384;

/// The kernels a process uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Path {
    /// `vdpbf16ps` (AVX-512-BF16).
    Hardware,
    /// Widen to f32, two multiply-adds per pair, vectorised for AVX-512 F.
    EmulatedAvx512,
    /// The same operations, vectorised for AVX2.
    EmulatedAvx2,
    /// The same operations, portable.
    EmulatedScalar,
}

impl Bf16Path {
    pub fn name(self) -> &'static str {
        match self {
            Bf16Path::Hardware => "avx512bf16",
            Bf16Path::EmulatedAvx512 => "avx512 (bf16 emulated)",
            Bf16Path::EmulatedAvx2 => "avx2 (bf16 emulated)",
            Bf16Path::EmulatedScalar => "scalar (bf16 emulated)",
        }
    }
}

/// The bf16 path of this process: the hardware instruction when the CPU has AVX-512-BF16, the
/// ISA level is AVX-512 and `RLX_ISA` is unset or `avx512bf16`; otherwise an emulation on the
/// ISA level in use.
pub fn bf16_path() -> Bf16Path {
    static PATH: OnceLock<Bf16Path> = OnceLock::new();
    *PATH.get_or_init(|| {
        let capped = matches!(
            std::env::var("RLX_ISA").as_deref(),
            Ok(v) if v != "avx512bf16"
        ) || std::env::var_os("RLX_FORCE_SCALAR").is_some_and(|v| v == "1");
        match isa() {
            Isa::Avx512 if !capped && hardware_bf16() => Bf16Path::Hardware,
            Isa::Avx512 => Bf16Path::EmulatedAvx512,
            Isa::Avx2Fma => Bf16Path::EmulatedAvx2,
            Isa::Scalar | Isa::Neon => Bf16Path::EmulatedScalar,
        }
    })
}

fn hardware_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to bf16 (nearest, ties to even), as its 16 bits. NaN stays NaN (quietened); values
/// beyond bf16's range round to ±∞ as IEEE rounding says.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16;
    let quiet_nan = (b >> 16) | 0x40;
    // Branch-free so that the conversion loops vectorise.
    if (b & 0x7fff_ffff) > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    }
}

#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// `out[q] = (src[2q], src[2q+1])` for `q < out.len()`, a zero past the end of `src`.
fn convert_pairs(out: &mut [u32], src: &[f32]) {
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if bf16_path() == Bf16Path::Hardware {
        // SAFETY: the hardware path was chosen after detecting AVX-512 F/BW/BF16.
        done = unsafe { x86::convert_pairs(out, src) };
    }
    for (q, o) in out.iter_mut().enumerate().skip(done) {
        let lo = src.get(2 * q).copied().unwrap_or(0.0);
        let hi = src.get(2 * q + 1).copied().unwrap_or(0.0);
        *o = pair(lo, hi);
    }
}

/// `out[j] = (lo[j], hi[j])`, or `(lo[j], 0)` without `hi`.
fn convert_interleaved(out: &mut [u32], lo: &[f32], hi: Option<&[f32]>) {
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if let (Bf16Path::Hardware, Some(hi)) = (bf16_path(), hi) {
        // SAFETY: the hardware path was chosen after detecting AVX-512 F/BW/BF16.
        done = unsafe { x86::convert_interleaved(out, lo, hi) };
    }
    for (j, o) in out.iter_mut().enumerate().skip(done) {
        *o = pair(lo[j], hi.map_or(0.0, |h| h[j]));
    }
}

/// A bf16 copy of a row-major `(rows, cols)` matrix as rows of pairs: `out[r·P + q] = (src[r,
/// 2q], src[r, 2q+1])` with `P = ⌈cols/2⌉` (a zero pads an odd row). As an A operand it is the
/// matrix itself (`row_stride` P, `pair_stride` 1).
pub fn to_pair_rows(out: &mut Vec<u32>, src: &[f32], rows: usize, cols: usize) {
    let p = cols.div_ceil(2);
    out.clear();
    out.resize(rows * p, 0);
    if p == 0 {
        return;
    }
    let src = &src[..rows * cols];
    out.par_chunks_mut(p * 64)
        .enumerate()
        .for_each(|(chunk, dst)| {
            for (r, row_out) in dst.chunks_exact_mut(p).enumerate() {
                let row = chunk * 64 + r;
                convert_pairs(row_out, &src[row * cols..(row + 1) * cols]);
            }
        });
}

/// A bf16 copy of a row-major `(rows, cols)` matrix with consecutive rows interleaved:
/// `out[q·cols + j] = (src[2q, j], src[2q+1, j])`, `⌈rows/2⌉` pair rows (a zero row pads an
/// odd count). As a B operand it is the matrix itself (`pair_stride` cols, `sliver_stride`
/// 32); as an A operand its transpose (`row_stride` 1, `pair_stride` cols).
pub fn interleave_rows(out: &mut Vec<u32>, src: &[f32], rows: usize, cols: usize) {
    let pairs = rows.div_ceil(2);
    out.clear();
    out.resize(pairs * cols, 0);
    if cols == 0 {
        return;
    }
    let src = &src[..rows * cols];
    out.par_chunks_mut(cols * 16)
        .enumerate()
        .for_each(|(chunk, dst)| {
            for (qi, pair_row) in dst.chunks_exact_mut(cols).enumerate() {
                let q = chunk * 16 + qi;
                let lo = &src[2 * q * cols..(2 * q + 1) * cols];
                let hi = (2 * q + 1 < rows).then(|| &src[(2 * q + 1) * cols..(2 * q + 2) * cols]);
                convert_interleaved(pair_row, lo, hi);
            }
        });
}

/// An A operand: `A(i, q) = data[i·row_stride + q·col_stride]` (gemm's strided view, of
/// pairs).
pub type PairsA<'a> = Strided<'a, u32>;

/// A B operand: `B(q, j) = data[(j / 32)·sliver_stride + q·pair_stride + j % 32]`.
#[derive(Clone, Copy)]
pub struct PairsB<'a> {
    pub data: &'a [u32],
    pub sliver_stride: usize,
    pub pair_stride: usize,
}

impl<'a> PairsB<'a> {
    /// The interleaved rows of a matrix with `cols` columns ([`interleave_rows`]).
    pub fn interleaved(data: &'a [u32], cols: usize) -> Self {
        PairsB {
            data,
            sliver_stride: SLIVER,
            pair_stride: cols,
        }
    }
}

/// A weight pre-packed as a B operand: slivers of 32 columns, each `pairs × 32` contiguous
/// (zero-padded past the last column), so a tile streams one contiguous run.
#[derive(Debug, Clone, Default)]
pub struct Bf16Panel {
    data: Vec<u32>,
    pairs: usize,
}

impl Bf16Panel {
    /// `B = wᵀ` for a row-major `w (n, k)`: `B(q, j) = (w[j, 2q], w[j, 2q+1])` — the forward
    /// product `x · wᵀ`.
    pub fn transposed(w: &[f32], n: usize, k: usize) -> Self {
        let mut panel = Bf16Panel::default();
        panel.fill_transposed(w, n, k);
        panel
    }

    /// [`Bf16Panel::transposed`] into this panel's memory (reused when the size allows).
    pub fn fill_transposed(&mut self, w: &[f32], n: usize, k: usize) {
        let pairs = k.div_ceil(2);
        let w = &w[..n * k];
        self.data.clear();
        self.data.resize(n.div_ceil(SLIVER) * pairs * SLIVER, 0);
        if pairs > 0 {
            self.data
                .par_chunks_mut(pairs * SLIVER)
                .enumerate()
                .for_each(|(s, sliver)| {
                    // Each weight row to pairs (a contiguous, vectorised conversion), then the
                    // sliver's rows transposed into pair-major order a block of pairs at a time.
                    let width = SLIVER.min(n - s * SLIVER);
                    let mut rows = vec![0u32; width * pairs];
                    for (jj, out) in rows.chunks_exact_mut(pairs).enumerate() {
                        convert_pairs(out, &w[(s * SLIVER + jj) * k..][..k]);
                    }
                    for q0 in (0..pairs).step_by(16) {
                        let q1 = (q0 + 16).min(pairs);
                        for (jj, row) in rows.chunks_exact(pairs).enumerate() {
                            for q in q0..q1 {
                                sliver[q * SLIVER + jj] = row[q];
                            }
                        }
                    }
                });
        }
        self.pairs = pairs;
    }

    /// `B = w` for a row-major `w (rows, cols)`: `B(q, j) = (w[2q, j], w[2q+1, j])` — the
    /// backward product `dout · w`.
    pub fn direct(w: &[f32], rows: usize, cols: usize) -> Self {
        let mut panel = Bf16Panel::default();
        panel.fill_direct(w, rows, cols);
        panel
    }

    /// [`Bf16Panel::direct`] into this panel's memory (reused when the size allows).
    pub fn fill_direct(&mut self, w: &[f32], rows: usize, cols: usize) {
        let pairs = rows.div_ceil(2);
        let w = &w[..rows * cols];
        self.data.clear();
        self.data.resize(cols.div_ceil(SLIVER) * pairs * SLIVER, 0);
        if pairs > 0 {
            self.data
                .par_chunks_mut(pairs * SLIVER)
                .enumerate()
                .for_each(|(s, sliver)| {
                    let (j0, width) = (s * SLIVER, SLIVER.min(cols - s * SLIVER));
                    for (q, out) in sliver.chunks_exact_mut(SLIVER).enumerate() {
                        let lo = &w[2 * q * cols + j0..][..width];
                        let hi = (2 * q + 1 < rows).then(|| &w[(2 * q + 1) * cols + j0..][..width]);
                        convert_interleaved(&mut out[..width], lo, hi);
                    }
                });
        }
        self.pairs = pairs;
    }

    /// Pairs of the reduction (the padded depth over 2).
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    pub fn as_b(&self) -> PairsB<'_> {
        PairsB {
            data: &self.data,
            sliver_stride: self.pairs * SLIVER,
            pair_stride: SLIVER,
        }
    }
}

/// `c[i·ldc + j] = (accumulate ? c[i·ldc + j] : 0) + Σ_{q < pairs} A(i, q) · B(q, j)` for `i < m`,
/// `j < n`, where each pair contributes its two products.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: PairsA<'_>,
    b: PairsB<'_>,
    m: usize,
    n: usize,
    pairs: usize,
) {
    gemm_bf16_on(bf16_path(), c, ldc, accumulate, a, b, m, n, pairs)
}

/// [`gemm_bf16`] on a given path (which must be available here).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_bf16_on(
    path: Bf16Path,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: PairsA<'_>,
    b: PairsB<'_>,
    m: usize,
    n: usize,
    pairs: usize,
) {
    let available = match bf16_path() {
        Bf16Path::Hardware => true,
        Bf16Path::EmulatedAvx512 => path != Bf16Path::Hardware,
        Bf16Path::EmulatedAvx2 => {
            matches!(path, Bf16Path::EmulatedAvx2 | Bf16Path::EmulatedScalar)
        }
        Bf16Path::EmulatedScalar => path == Bf16Path::EmulatedScalar,
    };
    assert!(available, "gemm_bf16: {path:?} is not available here");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ldc >= n && last_index(&[(m - 1, ldc)], n - 1).is_some_and(|e| e < c.len()),
        "gemm_bf16: C too short"
    );
    if pairs == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        last_index(&[(m - 1, a.row_stride), (pairs - 1, a.col_stride)], 0)
            .is_some_and(|e| e < a.data.len()),
        "gemm_bf16: A too short"
    );
    assert!(
        b.sliver_stride >= SLIVER.min(n)
            && last_index(
                &[
                    ((n - 1) / SLIVER, b.sliver_stride),
                    (pairs - 1, b.pair_stride)
                ],
                (n - 1) % SLIVER
            )
            .is_some_and(|e| e < b.data.len()),
        "gemm_bf16: B too short"
    );

    let mr = match path {
        Bf16Path::Hardware => HARDWARE_ROWS,
        _ => EMULATED_ROWS,
    };
    let (mb, nb) = output_blocks(m, n, mr, SLIVER, rayon::current_num_threads());
    let (row_blocks, col_blocks) = (m.div_ceil(mb), n.div_ceil(nb));
    let dst = SendPtr(c.as_mut_ptr());
    (0..row_blocks * col_blocks)
        .into_par_iter()
        .for_each(|task| {
            let (rb, cb) = (task / col_blocks, task % col_blocks);
            let (r0, r1) = (rb * mb, ((rb + 1) * mb).min(m));
            let (c0, c1) = (cb * nb, ((cb + 1) * nb).min(n));
            PACKED_A.with_borrow_mut(|packed| {
                let mut q0 = 0;
                while q0 < pairs {
                    let kc = KC_PAIRS.min(pairs - q0);
                    pack_a(packed, a, r0..r1, q0..q0 + kc, mr, 0);
                    for col in (c0..c1).step_by(SLIVER) {
                        for (ti, row) in (r0..r1).step_by(mr).enumerate() {
                            let tile = Tile {
                                c: dst.get(),
                                c_offset: row * ldc + col,
                                ldc,
                                load: accumulate || q0 > 0,
                                a: packed[ti * kc * mr..].as_ptr(),
                                b: b.data[col / SLIVER * b.sliver_stride + q0 * b.pair_stride..]
                                    .as_ptr(),
                                b_pair: b.pair_stride,
                                rows: mr.min(r1 - row),
                                cols: SLIVER.min(c1 - col),
                                pairs: kc,
                            };
                            // SAFETY: the pack holds `kc` pairs of `mr` rows for this tile; the
                            // asserts above bound every B index of columns < n over `pairs`
                            // pairs, and the kernels read only those (masked past `cols`);
                            // tasks own disjoint blocks of C.
                            unsafe { tile.run(path) };
                        }
                    }
                    q0 += kc;
                }
            });
        });
}

thread_local! {
    /// Each thread's packed block of A, reused across calls.
    static PACKED_A: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows of the emulated tile.
const EMULATED_ROWS: usize = 4;

/// Rows of the AVX-512-BF16 tile.
const HARDWARE_ROWS: usize = 12;

/// One register tile: `rows` × `cols` (≤ 32) outputs over `pairs` pairs.
struct Tile {
    c: *mut f32,
    c_offset: usize,
    ldc: usize,
    /// Continue the sums already in C (else start from 0).
    load: bool,
    /// `pairs` steps of MR values (rows past `rows` are zero).
    a: *const u32,
    b: *const u32,
    b_pair: usize,
    rows: usize,
    cols: usize,
    pairs: usize,
}

impl Tile {
    /// # Safety
    /// `a` holds `pairs` packed steps of this path's tile height, B `pairs` pair rows of
    /// `cols` columns from `b`; the outputs are inside C and owned by this thread; `path` is
    /// available here.
    unsafe fn run(&self, path: Bf16Path) {
        match path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 F/BW/BF16 detected; bounds per the caller.
            Bf16Path::Hardware => unsafe { x86::hardware(self) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 F detected; bounds per the caller.
            Bf16Path::EmulatedAvx512 => unsafe { x86::emulated_avx512(self) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and FMA detected; bounds per the caller.
            Bf16Path::EmulatedAvx2 => unsafe { x86::emulated_avx2(self) },
            // SAFETY: bounds per the caller.
            _ => unsafe { self.emulated() },
        }
    }

    /// Widens each pair to two f32 values and adds `a_lo·b_lo`, then `a_hi·b_hi` (each
    /// product and sum rounded to f32) — portable code that the callers compile for wider
    /// vectors.
    ///
    /// # Safety
    /// As [`Tile::run`].
    #[inline(always)]
    unsafe fn emulated(&self) {
        let mut row = 0;
        while row < self.rows {
            let rows = EMULATED_ROWS.min(self.rows - row);
            let mut acc = [[0f32; SLIVER]; EMULATED_ROWS];
            // SAFETY (all raw accesses below): indices inside the operands per the caller;
            // columns past `cols` are neither read nor written.
            if self.load {
                for (i, acc) in acc.iter_mut().enumerate().take(rows) {
                    let p = unsafe { self.c.add(self.c_offset + (row + i) * self.ldc) };
                    for (j, v) in acc.iter_mut().enumerate().take(self.cols) {
                        *v = unsafe { *p.add(j) };
                    }
                }
            }
            let mut lo = [0f32; SLIVER];
            let mut hi = [0f32; SLIVER];
            for q in 0..self.pairs {
                let bp = unsafe { self.b.add(q * self.b_pair) };
                for j in 0..SLIVER {
                    let v = if j < self.cols {
                        unsafe { *bp.add(j) }
                    } else {
                        0
                    };
                    lo[j] = f32::from_bits(v << 16);
                    hi[j] = f32::from_bits(v & 0xffff_0000);
                }
                for (i, acc) in acc.iter_mut().enumerate().take(rows) {
                    let av = unsafe { *self.a.add(q * EMULATED_ROWS + row + i) };
                    let (alo, ahi) = (f32::from_bits(av << 16), f32::from_bits(av & 0xffff_0000));
                    for j in 0..SLIVER {
                        acc[j] += alo * lo[j];
                        acc[j] += ahi * hi[j];
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate().take(rows) {
                let p = unsafe { self.c.add(self.c_offset + (row + i) * self.ldc) };
                for (j, v) in acc.iter().enumerate().take(self.cols) {
                    unsafe { *p.add(j) = *v };
                }
            }
            row += rows;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, HARDWARE_ROWS};

    /// # Safety
    /// AVX-512 F present; as [`Tile::run`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn emulated_avx512(t: &Tile) {
        // SAFETY: per the caller.
        unsafe { t.emulated() }
    }

    /// # Safety
    /// AVX2 and FMA present; as [`Tile::run`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn emulated_avx2(t: &Tile) {
        // SAFETY: per the caller.
        unsafe { t.emulated() }
    }

    /// [`super::convert_pairs`] 16 pairs at a time with `vcvtne2ps2bf16` (nearest even; like the
    /// dot products, it treats denormal inputs as zero); returns how many pairs it wrote.
    ///
    /// # Safety
    /// AVX-512 F, BW and BF16 present.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert_pairs(out: &mut [u32], src: &[f32]) -> usize {
        let blocks = (out.len() / 16).min(src.len() / 32);
        for b in 0..blocks {
            // SAFETY: 32 values from 32·b and 16 pairs from 16·b are in bounds (`blocks`).
            unsafe {
                let lo = _mm512_loadu_ps(src.as_ptr().add(32 * b));
                let hi = _mm512_loadu_ps(src.as_ptr().add(32 * b + 16));
                // 16-bit lanes 0..16 of the result are `lo`'s values in order, so each 32-bit
                // lane is the pair (src[2q], src[2q+1]).
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(out.as_mut_ptr().add(16 * b).cast(), v);
            }
        }
        16 * blocks
    }

    /// [`super::convert_interleaved`] 16 values at a time; returns how many it wrote.
    ///
    /// # Safety
    /// AVX-512 F, BW and BF16 present.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert_interleaved(out: &mut [u32], lo: &[f32], hi: &[f32]) -> usize {
        let n = out.len().min(lo.len()).min(hi.len()) / 16;
        // 16-bit lanes 0..16 hold `lo`, 16..32 `hi`: take them alternately.
        let order = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        for b in 0..n {
            // SAFETY: 16 values from 16·b of each input and 16 outputs are in bounds (`n`).
            unsafe {
                let l = _mm512_loadu_ps(lo.as_ptr().add(16 * b));
                let h = _mm512_loadu_ps(hi.as_ptr().add(16 * b));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(h, l));
                let v = _mm512_permutexvar_epi16(order, v);
                _mm512_storeu_si512(out.as_mut_ptr().add(16 * b).cast(), v);
            }
        }
        16 * n
    }

    /// # Safety
    /// AVX-512 F, BW and BF16 present; as [`Tile::run`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn hardware(t: &Tile) {
        macro_rules! by_rows {
            ($($r:literal)+) => {
                match t.rows {
                    $($r => unsafe { hardware_rows::<$r>(t) },)+
                    _ => unreachable!("tile rows exceed the kernel height"),
                }
            };
        }
        by_rows!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// Twelve rows × 32 columns of sums in 24 registers; per pair, two loads of B and one
    /// broadcast of A per row feed two `vdpbf16ps` per row.
    ///
    /// # Safety
    /// As [`hardware`]; `t.rows == R`, `t.cols <= 32`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn hardware_rows<const R: usize>(t: &Tile) {
        let lanes = |from: usize| -> __mmask16 {
            let n = t.cols.saturating_sub(from).min(16);
            ((1u32 << n) - 1) as __mmask16
        };
        let (m0, m1) = (lanes(0), lanes(16));
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        // SAFETY (all raw accesses below): indices inside the operands per the caller; masked
        // lanes are neither read nor written.
        if t.load {
            for (i, a) in acc.iter_mut().enumerate() {
                let p = unsafe { t.c.add(t.c_offset + i * t.ldc) };
                a[0] = unsafe { _mm512_maskz_loadu_ps(m0, p) };
                // `wrapping_add`: with 16 or fewer columns the second half is fully masked,
                // and its address may lie past the end of C.
                a[1] = unsafe { _mm512_maskz_loadu_ps(m1, p.wrapping_add(16)) };
            }
        }
        let (mut ap, mut bp) = (t.a, t.b);
        for _ in 0..t.pairs {
            let b0: __m512bh =
                unsafe { std::mem::transmute(_mm512_maskz_loadu_epi32(m0, bp as *const i32)) };
            let b1: __m512bh = unsafe {
                std::mem::transmute(_mm512_maskz_loadu_epi32(
                    m1,
                    bp.wrapping_add(16) as *const i32,
                ))
            };
            for (i, a) in acc.iter_mut().enumerate() {
                let av = unsafe { *ap.add(i) };
                let av: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(av as i32)) };
                a[0] = _mm512_dpbf16_ps(a[0], av, b0);
                a[1] = _mm512_dpbf16_ps(a[1], av, b1);
            }
            ap = ap.wrapping_add(HARDWARE_ROWS);
            bp = bp.wrapping_add(t.b_pair);
        }
        for (i, a) in acc.iter().enumerate() {
            let p = unsafe { t.c.add(t.c_offset + i * t.ldc) };
            unsafe { _mm512_mask_storeu_ps(p, m0, a[0]) };
            unsafe { _mm512_mask_storeu_ps(p.wrapping_add(16), m1, a[1]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_values as values;

    /// The f32 value of bf16 bits.
    fn bf16_value(bits: u32) -> f32 {
        f32::from_bits(bits << 16)
    }

    fn rounded(x: f32) -> f64 {
        bf16_value(bf16_bits(x)) as f64
    }

    #[test]
    fn rounding_is_nearest_even_and_keeps_specials() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // Just above the halfway point rounds up.
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up to the even.
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(-2.5), 0xc020);
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(bf16_bits(f32::MAX), 0x7f80);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        // A NaN whose payload sits only in the low bits must not turn into ∞.
        assert!(bf16_value(bf16_bits(f32::from_bits(0x7f80_0001))).is_nan());
    }

    /// `Σ_p a(i, p)·b(p, j)` in f64 over the bf16-rounded operands.
    fn reference(
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
        m: usize,
        n: usize,
        depth: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..depth)
                    .map(|p| rounded(a(i, p)) * rounded(b(p, j)))
                    .sum();
            }
        }
        out
    }

    fn paths() -> Vec<Bf16Path> {
        let mut out = vec![Bf16Path::EmulatedScalar];
        match bf16_path() {
            Bf16Path::Hardware => out.extend([
                Bf16Path::EmulatedAvx2,
                Bf16Path::EmulatedAvx512,
                Bf16Path::Hardware,
            ]),
            Bf16Path::EmulatedAvx512 => {
                out.extend([Bf16Path::EmulatedAvx2, Bf16Path::EmulatedAvx512])
            }
            Bf16Path::EmulatedAvx2 => out.push(Bf16Path::EmulatedAvx2),
            Bf16Path::EmulatedScalar => {}
        }
        println!("bf16 paths tested: {out:?}");
        out
    }

    /// The three layouts the training step uses — `x · wᵀ` (rows × panel), `dout · w` (rows ×
    /// panel) and `doutᵀ · x` (interleaved × interleaved) — on ragged shapes and odd depths,
    /// against f64 sums of the rounded operands.
    #[test]
    fn products_match_f64_on_rounded_operands() {
        for path in paths() {
            for &(m, n, k) in &[
                (1, 1, 1),
                (13, 33, 7),
                (12, 32, 300),
                (25, 70, 513),
                (7, 65, 2),
                (40, 5, 257),
            ] {
                let x = values(m * k, 1);
                let w = values(n * k, 2);
                let old = values(m * (n + 3), 3);
                let tol = |want: &[f64], got: &[f32], scale: f64, what: &str| {
                    for (idx, (g, w)) in got.iter().zip(want).enumerate() {
                        assert!(
                            (*g as f64 - w).abs() <= 1e-5 * scale.max(1.0),
                            "{path:?} {what} {m}x{n}x{k} at {idx}: {g} vs {w}"
                        );
                    }
                };
                // Forward: out (m, n) = x (m, k) · wᵀ.
                let mut xa = Vec::new();
                to_pair_rows(&mut xa, &x, m, k);
                let panel = Bf16Panel::transposed(&w, n, k);
                let a = PairsA {
                    data: &xa,
                    row_stride: k.div_ceil(2),
                    col_stride: 1,
                };
                let want = reference(|i, p| x[i * k + p], |p, j| w[j * k + p], m, n, k);
                let ldc = n + 3;
                for accumulate in [false, true] {
                    let mut c = old.clone();
                    gemm_bf16_on(
                        path,
                        &mut c,
                        ldc,
                        accumulate,
                        a,
                        panel.as_b(),
                        m,
                        n,
                        panel.pairs(),
                    );
                    let mut got = Vec::new();
                    let mut full = Vec::new();
                    for i in 0..m {
                        for j in 0..ldc {
                            if j >= n {
                                assert_eq!(c[i * ldc + j], old[i * ldc + j], "padding written");
                                continue;
                            }
                            got.push(c[i * ldc + j]);
                            let base = if accumulate {
                                old[i * ldc + j] as f64
                            } else {
                                0.0
                            };
                            full.push(want[i * n + j] + base);
                        }
                    }
                    tol(&full, &got, k as f64, "x·wᵀ");
                }
                // dx (m, k) = dout (m, n) · w (n, k).
                let dout = values(m * n, 4);
                let mut da = Vec::new();
                to_pair_rows(&mut da, &dout, m, n);
                let panel = Bf16Panel::direct(&w, n, k);
                let a = PairsA {
                    data: &da,
                    row_stride: n.div_ceil(2),
                    col_stride: 1,
                };
                let mut dx = vec![0f32; m * k];
                gemm_bf16_on(
                    path,
                    &mut dx,
                    k,
                    false,
                    a,
                    panel.as_b(),
                    m,
                    k,
                    panel.pairs(),
                );
                let want = reference(|i, p| dout[i * n + p], |p, j| w[p * k + j], m, k, n);
                tol(&want, &dx, n as f64, "dout·w");
                // dw (n, k) += doutᵀ (n, m) · x (m, k).
                let (mut ai, mut bi) = (Vec::new(), Vec::new());
                interleave_rows(&mut ai, &dout, m, n);
                interleave_rows(&mut bi, &x, m, k);
                let a = PairsA {
                    data: &ai,
                    row_stride: 1,
                    col_stride: n,
                };
                let mut dw = values(n * k, 5);
                let before = dw.clone();
                gemm_bf16_on(
                    path,
                    &mut dw,
                    k,
                    true,
                    a,
                    PairsB::interleaved(&bi, k),
                    n,
                    k,
                    m.div_ceil(2),
                );
                let want: Vec<f64> =
                    reference(|i, p| dout[p * n + i], |p, j| x[p * k + j], n, k, m)
                        .iter()
                        .zip(&before)
                        .map(|(w, b)| w + *b as f64)
                        .collect();
                tol(&want, &dw, m as f64, "doutᵀ·x");
            }
        }
    }

    #[test]
    fn bitwise_independent_of_thread_count_and_row_count() {
        let (m, n, k) = (77, 90, 600);
        let x = values(m * k, 4);
        let w = values(n * k, 5);
        let mut xa = Vec::new();
        to_pair_rows(&mut xa, &x, m, k);
        let panel = Bf16Panel::transposed(&w, n, k);
        let run = |threads: usize, rows: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut c = vec![0f32; rows * n];
            let a = PairsA {
                data: &xa,
                row_stride: k / 2,
                col_stride: 1,
            };
            pool.install(|| gemm_bf16(&mut c, n, false, a, panel.as_b(), rows, n, k / 2));
            c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let one = run(1, m);
        assert_eq!(one, run(2, m));
        assert_eq!(one, run(5, m));
        // A row alone (decode-sized call) gets the bits it gets among 77.
        assert_eq!(&one[..n], &run(2, 1)[..]);
    }

    /// The vector conversions (AVX-512-BF16 where present) give the scalar rounding's bits on
    /// normal values, ties included, on lengths with tails.
    #[test]
    fn vector_conversions_round_like_the_scalar_one() {
        if bf16_path() != Bf16Path::Hardware {
            println!(
                "skipped: no AVX-512-BF16 here (or RLX_ISA caps it): the scalar rounding only"
            );
            return;
        }
        let values: Vec<f32> = (0..141)
            .map(|i| match i % 5 {
                // Exactly halfway between two bf16 values: ties to even.
                0 => f32::from_bits(0x3f80_8000 + ((i as u32) << 16)),
                1 => -(i as f32) * 1.37e-3,
                2 => f32::from_bits(0x4120_7fff),
                3 => 1e30 / (i as f32 + 1.0),
                _ => (i as f32).sin(),
            })
            .collect();
        for len in [1usize, 31, 32, 33, 70, 141] {
            let src = &values[..len];
            let mut out = vec![0u32; len.div_ceil(2)];
            convert_pairs(&mut out, src);
            for (q, &o) in out.iter().enumerate() {
                let hi = src.get(2 * q + 1).copied().unwrap_or(0.0);
                assert_eq!(o, pair(src[2 * q], hi), "pairs, len {len}, q {q}");
            }
            let (lo, hi) = (&values[..len], &values[141 - len..]);
            let mut out = vec![0u32; len];
            convert_interleaved(&mut out, lo, Some(hi));
            for (j, &o) in out.iter().enumerate() {
                assert_eq!(o, pair(lo[j], hi[j]), "interleaved, len {len}, j {j}");
            }
        }
    }

    /// Strides whose bounds arithmetic would overflow are refused, not wrapped into a check
    /// that passes.
    #[test]
    fn overflowing_strides_are_refused() {
        let data = [0u32; 4];
        let a = PairsA {
            data: &data,
            row_stride: 1,
            col_stride: 1,
        };
        let b = PairsB::interleaved(&data, 1);
        let mut c = [0f32; 1];
        let huge = std::panic::catch_unwind(move || {
            let mut c = [0f32; 1];
            gemm_bf16(&mut c, usize::MAX / 2 + 1, false, a, b, 3, 1, 1);
        });
        assert!(huge.is_err());
        let wide = std::panic::catch_unwind(move || {
            let wide_a = PairsA {
                data: &[0u32; 4],
                row_stride: usize::MAX / 2 + 1,
                col_stride: 1,
            };
            let mut c = [0f32; 4];
            gemm_bf16(&mut c, 1, false, wide_a, b, 3, 1, 1);
        });
        assert!(wide.is_err());
        gemm_bf16(&mut c, 1, false, a, b, 1, 1, 1);
    }

    #[test]
    fn conversions_lay_out_pairs() {
        let src: Vec<f32> = (0..15).map(|i| i as f32).collect();
        let mut rows = Vec::new();
        to_pair_rows(&mut rows, &src, 3, 5);
        assert_eq!(rows.len(), 9);
        assert_eq!(rows[0], bf16_bits(0.0) | bf16_bits(1.0) << 16);
        assert_eq!(rows[2], bf16_bits(4.0));
        assert_eq!(rows[3], bf16_bits(5.0) | bf16_bits(6.0) << 16);
        let mut il = Vec::new();
        interleave_rows(&mut il, &src, 3, 5);
        assert_eq!(il.len(), 10);
        assert_eq!(il[1], bf16_bits(1.0) | bf16_bits(6.0) << 16);
        assert_eq!(il[5 + 4], bf16_bits(14.0));
    }
}
