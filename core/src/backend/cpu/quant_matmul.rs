//! `out[T, N] = x[T, K] · w[N, K]ᵀ + bias` with `w` kept as stored: ggml blocks (Q4_0, Q4_1,
//! Q5_0, Q8_0, Q4_K, Q6_K) or half precision (F16, BF16). Decode reads every weight once per token, so
//! reading 4.5–16 bits per weight instead of 32 is most of the speed on a memory-bound CPU.
//!
//! Each weight is dequantized in registers with exactly the arithmetic of the f32 dequantizer
//! ([`GgmlType::dequantize`]: `q·d + m` as a multiply then an add, never fused), and each output
//! is then reduced exactly as [`super::matmul::matmul`] reduces it (one 8-lane FMA chain over K
//! from zero, the fixed horizontal sum, the bias). So a model whose matrices stay quantized
//! computes bit for bit what the same model dequantized to f32 computes — on every instruction
//! set, for any number of rows or threads: decode, prefill, scoring and the training forward
//! (which works on the f32 values) all agree.
//!
//! Two ways to dequantize: AVX2 converts each nibble to f32 and scales it; AVX-512VL builds the
//! block's 16 possible values once and picks from them with one two-table permute per 8 weights.

use rayon::prelude::*;

use super::simd::{isa, Isa};
use super::SendPtr;
use crate::weights::quant::GgmlType;

/// Values per block (and per Q4_K sub-block).
pub const BLOCK: usize = 32;

/// A `[n, k]` weight matrix stored as whole rows of ggml blocks.
#[derive(Clone, Copy)]
pub struct QuantMatrix<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    pub n: usize,
    pub k: usize,
}

impl QuantMatrix<'_> {
    /// Whether the kernels here read `ty` with rows of `k` values.
    pub fn supports(ty: GgmlType, k: usize) -> bool {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => k > 0 && k.is_multiple_of(BLOCK),
            GgmlType::Q5_0 => k > 0 && k.is_multiple_of(BLOCK),
            GgmlType::Q4K | GgmlType::Q6K => k > 0 && k.is_multiple_of(256),
            GgmlType::F16 | GgmlType::BF16 => k > 0 && k.is_multiple_of(BLOCK),
            _ => false,
        }
    }

    pub(super) fn row_bytes(&self) -> usize {
        self.k / self.ty.block_size() * self.ty.type_size()
    }
}

/// `out[t*n + j] = Σ_i x[t*k + i] · w[j, i] + bias[j]` for `t < rows`, `j < w.n`, equal bit for
/// bit to [`super::matmul::matmul`] on the dequantized `w`.
pub fn quant_matmul(
    out: &mut [f32],
    x: &[f32],
    w: QuantMatrix<'_>,
    bias: Option<&[f32]>,
    rows: usize,
) {
    quant_matmul_on(isa(), out, x, w, bias, rows)
}

/// [`quant_matmul`] on a chosen instruction-set level (capped at what the machine has).
pub fn quant_matmul_on(
    level: Isa,
    out: &mut [f32],
    x: &[f32],
    w: QuantMatrix<'_>,
    bias: Option<&[f32]>,
    rows: usize,
) {
    quant_matmuls_on(level, &mut [QuantProduct { out, w, bias }], x, rows)
}

/// One product of several sharing an input ([`quant_matmuls`]).
pub struct QuantProduct<'a> {
    pub out: &'a mut [f32],
    pub w: QuantMatrix<'a>,
    pub bias: Option<&'a [f32]>,
}

/// Most products one call takes (a layer's q, k and v).
pub const MAX_PRODUCTS: usize = 4;

/// Several [`quant_matmul`]s of the same input rows (q/k/v, gate/up) as one parallel step:
/// one thread hand-off instead of one per product. Each output's bits are those of
/// [`quant_matmul`].
pub fn quant_matmuls(products: &mut [QuantProduct<'_>], x: &[f32], rows: usize) {
    quant_matmuls_on(isa(), products, x, rows)
}

/// [`quant_matmuls`] on a chosen instruction-set level (capped at what the machine has).
pub fn quant_matmuls_on(level: Isa, products: &mut [QuantProduct<'_>], x: &[f32], rows: usize) {
    let jobs = checked_jobs(products, x, rows, QuantMatrix::supports);
    let level = super::simd::runnable(level);
    for_each_rect(rows, &jobs, |job, rect| {
        // SAFETY: tasks cover disjoint rectangles of each product's `out`, which holds
        // rows*n values (checked); operand lengths were checked too.
        unsafe { compute_rect(level, job.out.get(), x, job.w, job.bias, rect) };
    });
}

/// A product ready for the tasks: where its outputs go, its weights and bias.
#[derive(Clone, Copy)]
pub(super) struct Job<'a> {
    pub(super) out: SendPtr,
    pub(super) w: QuantMatrix<'a>,
    pub(super) bias: Option<&'a [f32]>,
}

/// The products as jobs, after checking that each matches the shared input and that the
/// kernel reads its type (`supports`); panics otherwise (callers check).
pub(super) fn checked_jobs<'a>(
    products: &'a mut [QuantProduct<'_>],
    x: &[f32],
    rows: usize,
    supports: impl Fn(GgmlType, usize) -> bool,
) -> [Option<Job<'a>>; MAX_PRODUCTS] {
    assert!(
        products.len() <= MAX_PRODUCTS,
        "too many products in one call"
    );
    let k = products.first().map_or(0, |p| p.w.k);
    let mut jobs = [None; MAX_PRODUCTS];
    for (job, p) in jobs.iter_mut().zip(products.iter_mut()) {
        *job = {
            let (w, n) = (p.w, p.w.n);
            assert!(
                supports(w.ty, k)
                    && w.k == k
                    && x.len() >= rows * k
                    && w.data.len() >= n * w.row_bytes()
                    && p.out.len() >= rows * n
                    && p.bias.is_none_or(|b| b.len() >= n),
                "quantized product operands do not match"
            );
            Some(Job {
                out: SendPtr(p.out.as_mut_ptr()),
                w,
                bias: p.bias,
            })
        };
    }
    jobs
}

/// How one product's outputs are split into tasks: by the sizes only, so each output's
/// arithmetic does not depend on it.
#[derive(Clone, Copy, Default)]
struct Partition {
    rows: usize,
    n: usize,
    row_block: usize,
    col_block: usize,
    col_blocks: usize,
    tasks: usize,
}

impl Partition {
    fn new(rows: usize, n: usize, row_bytes: usize) -> Partition {
        if rows == 0 || n == 0 {
            return Partition::default();
        }
        let threads = rayon::current_num_threads().max(1);
        // Row blocks of activations share each dequantized weight chunk; columns are split so
        // a task's weights stay in L2 while its row groups pass over them. Small products (a
        // decode step's k/v projections) get fewer tasks: each costs a thread hand-off.
        let row_block = if rows <= 6 { rows } else { 48.min(rows) };
        let row_blocks = rows.div_ceil(row_block);
        let work = rows * n * row_bytes;
        // One task, or a multiple of the thread count (3 tasks on 2 threads would idle one).
        let tasks_wanted = if work < 2 * MIN_TASK_BYTES {
            1
        } else {
            threads * (work / (MIN_TASK_BYTES * threads)).clamp(1, 4)
        };
        let col_blocks_wanted = tasks_wanted.div_ceil(row_blocks).max(1);
        let mut col_block = n.div_ceil(col_blocks_wanted).next_multiple_of(NC);
        if rows > 6 {
            col_block = col_block.min((256 * 1024 / row_bytes).next_multiple_of(NC).max(NC));
        }
        let col_blocks = n.div_ceil(col_block);
        Partition {
            rows,
            n,
            row_block,
            col_block,
            col_blocks,
            tasks: row_blocks * col_blocks,
        }
    }

    fn rect(&self, task: usize) -> Rect {
        let (rb, cb) = (task / self.col_blocks, task % self.col_blocks);
        Rect {
            r0: rb * self.row_block,
            r1: ((rb + 1) * self.row_block).min(self.rows),
            c0: cb * self.col_block,
            c1: ((cb + 1) * self.col_block).min(self.n),
        }
    }
}

/// Splits each job's outputs into disjoint rectangles and runs `run` on every (job,
/// rectangle), all in one parallel step when there are several.
pub(super) fn for_each_rect<'a>(
    rows: usize,
    jobs: &[Option<Job<'a>>; MAX_PRODUCTS],
    run: impl Fn(&Job<'a>, Rect) + Sync,
) {
    let mut parts = [Partition::default(); MAX_PRODUCTS];
    for (part, job) in parts.iter_mut().zip(jobs) {
        if let Some(job) = job {
            *part = Partition::new(rows, job.w.n, job.w.row_bytes());
        }
    }
    let total: usize = parts.iter().map(|p| p.tasks).sum();
    let task = |mut t: usize| {
        for (part, job) in parts.iter().zip(jobs) {
            if t < part.tasks {
                if let Some(job) = job {
                    run(job, part.rect(t));
                }
                return;
            }
            t -= part.tasks;
        }
    };
    match total {
        0 => {}
        1 => task(0),
        tasks => (0..tasks).into_par_iter().for_each(task),
    }
}

/// Weight bytes × rows below which a product is not split further.
const MIN_TASK_BYTES: usize = 64 * 1024;
/// Bytes ahead of the current block that the tiles prefetch (in the matrix's row-major byte
/// stream, so mostly rows the next tiles read), into L2. Decode streams every weight from DRAM
/// once; the loads of a tile that also dequantizes cover only ~1 KB per thread in the
/// out-of-order window, and L1-targeted prefetches tie up the few L1 miss buffers, so the
/// stream runs far below the memory's bandwidth. L2-targeted prefetches 8 KB ahead keep more
/// lines in flight (measured on SmolLM2's shapes, 2 threads, `--example quant_speed`: BF16
/// ~13.5 → ~7.5 ms per pass, Q8_0 with int8 activations ~10 → ~4.5 ms; the earlier L1
/// prefetch 3 KB ahead had beaten 0.5, 1.5 and 6 KB).
#[cfg(target_arch = "x86_64")]
pub(super) const PREFETCH: usize = 8192;

/// Weight rows processed side by side (independent FMA chains when there is one input row).
pub(super) const NC: usize = 4;

#[derive(Clone, Copy)]
pub(super) struct Rect {
    pub(super) r0: usize,
    pub(super) r1: usize,
    pub(super) c0: usize,
    pub(super) c1: usize,
}

/// Walks `r` in tiles: up to [`NC`] weight rows at a time and, for each, the input rows in
/// groups of `mr` then one group of the rest (each tile reads its weights once, so a remainder
/// costs one pass, not one per row); `tile(t, take, c, cols)` computes one.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn for_each_tile(r: Rect, mr: usize, mut tile: impl FnMut(usize, usize, usize, usize)) {
    let mut c = r.c0;
    while c < r.c1 {
        let cols = (r.c1 - c).min(NC);
        let mut t = r.r0;
        while t < r.r1 {
            let take = (r.r1 - t).min(mr);
            tile(t, take, c, cols);
            t += take;
        }
        c += cols;
    }
}

/// A tile's outputs: `out[(t+i)*n + c+j] = hsum(acc[i][j]) + bias[c+j]`.
///
/// # Safety
/// AVX2 and FMA present; `out` valid for writes at every `(t+i)*n + c+j`, `i < R`, `j < C`,
/// which the caller owns; `bias`, when given, holds `c + C` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn store_tile<const R: usize, const C: usize>(
    acc: &[[std::arch::x86_64::__m256; C]; R],
    out: *mut f32,
    n: usize,
    bias: Option<&[f32]>,
    t: usize,
    c: usize,
) {
    for (i, acc_row) in acc.iter().enumerate() {
        for (j, a) in acc_row.iter().enumerate() {
            let mut s = super::simd::x86::hsum(*a);
            if let Some(bias) = bias {
                s += bias[c + j];
            }
            // SAFETY: the caller's contract.
            unsafe { *out.add((t + i) * n + c + j) = s };
        }
    }
}

/// Type codes for the kernels' const parameter.
#[cfg(target_arch = "x86_64")]
const Q4_0: u8 = 0;
#[cfg(target_arch = "x86_64")]
const Q4_1: u8 = 1;
#[cfg(target_arch = "x86_64")]
const Q8_0: u8 = 2;
#[cfg(target_arch = "x86_64")]
const Q4_K: u8 = 3;
#[cfg(target_arch = "x86_64")]
const F16: u8 = 4;
#[cfg(target_arch = "x86_64")]
const BF16: u8 = 5;
#[cfg(target_arch = "x86_64")]
const Q5_0: u8 = 6;
#[cfg(target_arch = "x86_64")]
const Q6_K: u8 = 7;

#[cfg(target_arch = "x86_64")]
fn type_code(ty: GgmlType) -> u8 {
    match ty {
        GgmlType::Q4_0 => Q4_0,
        GgmlType::Q4_1 => Q4_1,
        GgmlType::Q8_0 => Q8_0,
        GgmlType::F16 => F16,
        GgmlType::BF16 => BF16,
        GgmlType::Q5_0 => Q5_0,
        GgmlType::Q6K => Q6_K,
        _ => Q4_K,
    }
}

/// # Safety
/// `out` valid for `rect.r1 * w.n` writes, the rectangle exclusive to the caller; operands
/// checked by [`quant_matmul_on`]; `level` no higher than the machine supports.
unsafe fn compute_rect(
    level: Isa,
    out: *mut f32,
    x: &[f32],
    w: QuantMatrix<'_>,
    bias: Option<&[f32]>,
    rect: Rect,
) {
    #[cfg(target_arch = "x86_64")]
    macro_rules! dispatch {
        ($m:ident) => {
            match type_code(w.ty) {
                Q4_0 => $m::rect::<{ Q4_0 }>(out, x, w, bias, rect),
                Q4_1 => $m::rect::<{ Q4_1 }>(out, x, w, bias, rect),
                Q8_0 => $m::rect::<{ Q8_0 }>(out, x, w, bias, rect),
                F16 => $m::rect::<{ F16 }>(out, x, w, bias, rect),
                BF16 => $m::rect::<{ BF16 }>(out, x, w, bias, rect),
                Q5_0 => $m::rect::<{ Q5_0 }>(out, x, w, bias, rect),
                Q6_K => $m::rect::<{ Q6_K }>(out, x, w, bias, rect),
                _ => $m::rect::<{ Q4_K }>(out, x, w, bias, rect),
            }
        };
    }
    if rect.r1 - rect.r0 > PANEL_ROWS && level > Isa::Scalar {
        // Many input rows (prefill, scoring): dequantize the task's weight rows once into an
        // f32 panel and run the f32 kernel's tiles on it — the same per-output operations.
        // SAFETY: caller's contract.
        return unsafe { panel_rect(out, x, w, bias, rect) };
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 F/VL detected (with AVX2, FMA, F16C); caller's contract.
        Isa::Avx512 => unsafe { dispatch!(x86_avx512) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2, FMA and F16C detected; caller's contract.
        Isa::Avx2Fma => unsafe { dispatch!(x86_avx2) },
        // SAFETY: caller's contract.
        _ => unsafe { scalar_rect(level, out, x, w, bias, rect) },
    }
}

/// Input rows above which a task dequantizes its weights into an f32 panel first.
const PANEL_ROWS: usize = 6;

/// Weight rows `rect.c0..rect.c1` dequantized (exactly as [`GgmlType::dequantize`]) into a
/// per-thread panel, then the f32 matmul's own tiles over it.
///
/// # Safety
/// As [`compute_rect`].
unsafe fn panel_rect(out: *mut f32, x: &[f32], w: QuantMatrix<'_>, bias: Option<&[f32]>, r: Rect) {
    thread_local! {
        static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let (k, row_bytes) = (w.k, w.row_bytes());
    let cols = r.c1 - r.c0;
    PANEL.with_borrow_mut(|panel| {
        panel.clear();
        panel.resize(cols * k, 0.0);
        let bytes = &w.data[r.c0 * row_bytes..r.c1 * row_bytes];
        dequantize_panel(bytes, w.ty, panel);
        let rect = super::matmul::Rect {
            r0: r.r0,
            r1: r.r1,
            c0: 0,
            c1: cols,
        };
        // SAFETY: the output base moves to column c0 with the same row stride n, so the panel's
        // columns 0..cols write the caller's columns c0..c1 only; rows r0..r1 as given.
        unsafe {
            super::matmul::compute_rect(
                out.add(r.c0),
                x,
                panel,
                bias.map(|b| &b[r.c0..]),
                w.n,
                k,
                rect,
            )
        };
    });
}

/// Whole rows of blocks into f32, with the vector routes where present (same values).
fn dequantize_panel(bytes: &[u8], ty: GgmlType, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    macro_rules! dispatch {
        ($m:ident) => {
            match type_code(ty) {
                Q4_0 => $m::dequantize::<{ Q4_0 }>(bytes, out),
                Q4_1 => $m::dequantize::<{ Q4_1 }>(bytes, out),
                Q8_0 => $m::dequantize::<{ Q8_0 }>(bytes, out),
                F16 => $m::dequantize::<{ F16 }>(bytes, out),
                BF16 => $m::dequantize::<{ BF16 }>(bytes, out),
                Q5_0 => $m::dequantize::<{ Q5_0 }>(bytes, out),
                Q6_K => $m::dequantize::<{ Q6_K }>(bytes, out),
                _ => $m::dequantize::<{ Q4_K }>(bytes, out),
            }
        };
    }
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 F/VL detected (with AVX2, FMA, F16C).
        Isa::Avx512 => unsafe { dispatch!(x86_avx512) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2, FMA and F16C detected.
        Isa::Avx2Fma => unsafe { dispatch!(x86_avx2) },
        _ => ty.dequantize_into(bytes, out),
    }
}

/// The portable path: each weight row dequantized by the f32 dequantizer, then the scalar dot
/// product the f32 matmul uses on this level.
///
/// # Safety
/// As [`compute_rect`].
unsafe fn scalar_rect(
    level: Isa,
    out: *mut f32,
    x: &[f32],
    w: QuantMatrix<'_>,
    bias: Option<&[f32]>,
    r: Rect,
) {
    // NEON's dot product is the f32 matmul's chain on that level (the x86 levels never get here).
    let dot: fn(&[f32], &[f32]) -> f32 = match level {
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => super::simd::neon::dot,
        _ => super::simd::dot_scalar,
    };
    thread_local! {
        /// One dequantized weight row, reused across rows and calls (decode runs this per token).
        static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let (n, k, row_bytes) = (w.n, w.k, w.row_bytes());
    ROW.with_borrow_mut(|dense| {
        dense.clear();
        dense.resize(k, 0.0);
        for c in r.c0..r.c1 {
            // Checked by `supports`: whole blocks of `k` values per row.
            w.ty.dequantize_into(&w.data[c * row_bytes..(c + 1) * row_bytes], dense);
            for t in r.r0..r.r1 {
                let mut v = dot(&x[t * k..(t + 1) * k], dense);
                if let Some(b) = bias {
                    v += b[c];
                }
                // SAFETY: t < r.r1 and c < n: inside the caller's rectangle.
                unsafe { *out.add(t * n + c) = v };
            }
        }
    });
}

/// (bytes per unit, 32-value sub-blocks per unit).
#[cfg(target_arch = "x86_64")]
const fn unit_shape(ty: u8) -> (usize, usize) {
    match ty {
        Q4_0 => (18, 1),
        Q4_1 => (20, 1),
        Q8_0 => (34, 1),
        // Half-precision rows read in units of 32 values.
        F16 | BF16 => (64, 1),
        Q5_0 => (22, 1),
        Q6_K => (210, 8),
        _ => (144, 8),
    }
}

/// 6-bit scale and min of sub-block `j` of a Q4_K super-block (12 packed bytes), as the f32
/// dequantizer computes them.
#[inline(always)]
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        (
            ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4)) as f32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as f32,
        )
    }
}

/// The x86 kernels. `$table`: dequantize 4-bit values through a 16-entry table and a two-source
/// permute (AVX-512VL) instead of converting each value.
macro_rules! x86_kernels {
    ($name:ident, $features:literal, $mr:literal, $table:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            use std::arch::x86_64::*;

            use super::*;

            /// Input rows per tile.
            const MR: usize = $mr;

            /// # Safety
            /// As [`compute_rect`], with this module's features present.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn rect<const TY: u8>(
                out: *mut f32,
                x: &[f32],
                w: QuantMatrix<'_>,
                bias: Option<&[f32]>,
                r: Rect,
            ) {
                for_each_tile(r, MR, |t, take, c, cols| {
                    macro_rules! by_cols {
                        ($r:literal) => {
                            match cols {
                                4 => tile::<TY, $r, 4>(out, x, w, bias, t, c),
                                3 => tile::<TY, $r, 3>(out, x, w, bias, t, c),
                                2 => tile::<TY, $r, 2>(out, x, w, bias, t, c),
                                _ => tile::<TY, $r, 1>(out, x, w, bias, t, c),
                            }
                        };
                    }
                    // SAFETY: rows t..t+take and columns c..c+cols lie in the rectangle.
                    unsafe {
                        match take {
                            1 => by_cols!(1),
                            2 => by_cols!(2),
                            3 if MR >= 3 => by_cols!(3),
                            _ if MR >= 4 => by_cols!(4),
                            _ => by_cols!(2),
                        }
                    }
                });
            }

            /// Outputs `(t..t+R, c..c+C)`: per output one FMA chain from zero over K in chunks
            /// of 8, then `hsum`, then the bias — the f32 matmul's operations.
            ///
            /// # Safety
            /// As [`rect`]; `t + R <= rows`, `c + C <= w.n`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn tile<const TY: u8, const R: usize, const C: usize>(
                out: *mut f32,
                x: &[f32],
                w: QuantMatrix<'_>,
                bias: Option<&[f32]>,
                t: usize,
                c: usize,
            ) {
                let (unit_bytes, subs) = unit_shape(TY);
                let (k, n, row_bytes) = (w.k, w.n, w.row_bytes());
                let nb = k / BLOCK;
                let xp = x[t * k..].as_ptr();
                let wp = w.data[c * row_bytes..].as_ptr();
                let mut acc = [[_mm256_setzero_ps(); C]; R];
                for b in 0..nb {
                    let mut blocks = [Block::default(); C];
                    for j in 0..C {
                        // Ask for the weights PREFETCH bytes ahead: decode streams every weight
                        // from DRAM once, and a block's first use otherwise waits for it.
                        // A prefetch never faults, even past the end of the matrix.
                        let ahead =
                            wp.wrapping_add(j * row_bytes + b / subs * unit_bytes + PREFETCH);
                        _mm_prefetch::<_MM_HINT_T1>(ahead.cast::<i8>());
                    }
                    for (j, blk) in blocks.iter_mut().enumerate() {
                        // SAFETY: row c+j exists; block b lies inside it.
                        *blk = unsafe {
                            Block::new::<TY>(
                                wp.add(j * row_bytes + b / subs * unit_bytes),
                                b % subs,
                            )
                        };
                    }
                    for ch in 0..BLOCK / 8 {
                        let mut wv = [_mm256_setzero_ps(); C];
                        for (v, blk) in wv.iter_mut().zip(&blocks) {
                            // SAFETY: the block's bytes are readable (as above).
                            *v = unsafe { blk.chunk::<TY>(ch) };
                        }
                        let off = b * BLOCK + ch * 8;
                        for (i, acc_row) in acc.iter_mut().enumerate() {
                            // SAFETY: row t+i has k values; off + 8 <= k.
                            let xv = unsafe { _mm256_loadu_ps(xp.add(i * k + off)) };
                            for (a, wj) in acc_row.iter_mut().zip(&wv) {
                                *a = _mm256_fmadd_ps(xv, *wj, *a);
                            }
                        }
                    }
                }
                // SAFETY: the tile lies in the caller's rectangle.
                unsafe { store_tile(&acc, out, n, bias, t, c) };
            }

            /// Whole units of `bytes` into `out` (as many as both hold).
            ///
            /// # Safety
            /// This module's features present.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn dequantize<const TY: u8>(bytes: &[u8], out: &mut [f32]) {
                let (unit_bytes, subs) = unit_shape(TY);
                let units = (bytes.len() / unit_bytes).min(out.len() / (subs * BLOCK));
                for u in 0..units {
                    for s in 0..subs {
                        // SAFETY: unit u is inside `bytes`; its values fit in `out` (min above).
                        unsafe {
                            let blk = Block::new::<TY>(bytes.as_ptr().add(u * unit_bytes), s);
                            let dst = out.as_mut_ptr().add((u * subs + s) * BLOCK);
                            for ch in 0..BLOCK / 8 {
                                _mm256_storeu_ps(dst.add(ch * 8), blk.chunk::<TY>(ch));
                            }
                        }
                    }
                }
            }

            /// One 32-value (sub-)block being read: where its quantized values are and its
            /// scale and offset (or, with tables, its 16 possible values).
            #[derive(Clone, Copy)]
            struct Block {
                /// Q4: the 16 bytes (Q4_0/Q4_1) or 32 bytes (Q4_K) holding the nibbles;
                /// Q8_0: the 32 signed bytes.
                qs: *const u8,
                /// Q4_K: whether the sub-block is the high nibbles of its 32 bytes (Q6_K: of
                /// its 32 `ql` bytes).
                high: bool,
                /// Q5_0: the 32 fifth bits. Q6_K: where the sub-block's 2-bit high parts sit
                /// in its `qh` bytes.
                qh_bits: u32,
                /// Q6_K: the 32 `qh` bytes of the sub-block's half.
                qh: *const u8,
                d: __m256,
                /// Q6_K: the scale of the sub-block's second 16 values.
                d2: __m256,
                m: __m256,
                /// Values for nibbles 0–7 and 8–15 (table route).
                lo: __m256,
                hi: __m256,
            }

            impl Default for Block {
                fn default() -> Self {
                    // SAFETY: zeroed vectors and a null pointer are valid values of every field;
                    // `Block::new` overwrites them before use.
                    unsafe { std::mem::zeroed() }
                }
            }

            /// f16 at `p` as f32 (F16C; exact, as `half::f16::to_f32`).
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn f16_at(p: *const u8) -> f32 {
                // SAFETY: the caller guarantees two readable bytes at p.
                let bits = unsafe { p.cast::<u16>().read_unaligned() };
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
            }

            impl Block {
                /// # Safety
                /// `unit` points at a whole block unit of type TY; `s` < its sub-block count.
                #[target_feature(enable = $features)]
                #[inline]
                unsafe fn new<const TY: u8>(unit: *const u8, s: usize) -> Block {
                    // SAFETY (all reads): offsets stay inside the unit's layout for TY.
                    let (mut qh_bits, mut qh, mut d2) = (0u32, std::ptr::null(), 0f32);
                    let (qs, high, d, m) = unsafe {
                        match TY {
                            // (((nibble | fifth bit << 4) - 16) as f32) · d.
                            Q5_0 => {
                                qh_bits = unit.add(2).cast::<u32>().read_unaligned();
                                (unit.add(6), false, f16_at(unit), 0.0)
                            }
                            // (d · sc) · ((low 4 bits | 2 high bits << 4) - 32) as f32, a scale
                            // per 16 values.
                            Q6_K => {
                                let (half, quarter) = (s / 4, s % 4);
                                let ql = unit.add(half * 64 + (quarter % 2) * 32);
                                qh = unit.add(128 + half * 32);
                                qh_bits = 2 * quarter as u32;
                                let sc = unit.add(192 + half * 8 + 2 * quarter);
                                let d = f16_at(unit.add(208));
                                d2 = d * (*sc.add(1) as i8) as f32;
                                (ql, quarter >= 2, d * (*sc as i8) as f32, 0.0)
                            }
                            // Dequantizer: ((q - 8) as f32) · d — the offset is folded into q.
                            Q4_0 => (unit.add(2), false, f16_at(unit), 0.0),
                            // q as f32 · d + m.
                            Q4_1 => (unit.add(4), false, f16_at(unit), f16_at(unit.add(2))),
                            // (q as i8) as f32 · d.
                            Q8_0 => (unit.add(2), false, f16_at(unit), 0.0),
                            // Widened exactly.
                            F16 | BF16 => (unit, false, 1.0, 0.0),
                            // (d·sc) · q as f32 − dmin·m.
                            _ => {
                                let (sc, mn) =
                                    scale_min_k4(s, std::slice::from_raw_parts(unit.add(4), 12));
                                let qs = unit.add(16 + (s / 2) * 32);
                                (qs, s % 2 == 1, f16_at(unit) * sc, f16_at(unit.add(2)) * mn)
                            }
                        }
                    };
                    let (dv, mv) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
                    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    if $table && matches!(TY, Q4_0 | Q4_1 | Q4_K) {
                        let first = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
                        let second = _mm256_setr_ps(8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0);
                        (lo, hi) = match TY {
                            Q4_0 => {
                                let eight = _mm256_set1_ps(8.0);
                                (
                                    _mm256_mul_ps(_mm256_sub_ps(first, eight), dv),
                                    _mm256_mul_ps(_mm256_sub_ps(second, eight), dv),
                                )
                            }
                            Q4_1 => (
                                _mm256_add_ps(_mm256_mul_ps(first, dv), mv),
                                _mm256_add_ps(_mm256_mul_ps(second, dv), mv),
                            ),
                            _ => (
                                _mm256_sub_ps(_mm256_mul_ps(dv, first), mv),
                                _mm256_sub_ps(_mm256_mul_ps(dv, second), mv),
                            ),
                        };
                    }
                    Block {
                        qs,
                        high,
                        qh_bits,
                        qh,
                        d2: _mm256_set1_ps(d2),
                        d: dv,
                        m: mv,
                        lo,
                        hi,
                    }
                }

                /// Weights `8·ch .. 8·ch + 8` of the block as f32.
                ///
                /// # Safety
                /// The block's bytes are readable.
                #[target_feature(enable = $features)]
                #[inline]
                unsafe fn chunk<const TY: u8>(&self, ch: usize) -> __m256 {
                    // Q4_0/Q4_1: values 0–15 are the low nibbles of bytes 0–15, values 16–31
                    // the high nibbles. Q4_K: values are byte i's low (or high) nibble.
                    if TY == F16 || TY == BF16 {
                        // SAFETY: 8 halves at 16·ch bytes lie inside the 64-byte unit.
                        let raw =
                            unsafe { _mm_loadu_si128(self.qs.add(ch * 16).cast::<__m128i>()) };
                        return if TY == F16 {
                            _mm256_cvtph_ps(raw)
                        } else {
                            // bf16 is the top half of an f32.
                            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
                        };
                    }
                    if TY == Q6_K {
                        // SAFETY: values 8·ch .. 8·ch + 8 of the sub-block: 8 `ql` and 8 `qh`
                        // bytes inside the super-block.
                        let (ql, qh) = unsafe {
                            (
                                _mm_loadl_epi64(self.qs.add(ch * 8).cast::<__m128i>()),
                                _mm_loadl_epi64(self.qh.add(ch * 8).cast::<__m128i>()),
                            )
                        };
                        let mut low = _mm256_cvtepu8_epi32(ql);
                        if self.high {
                            low = _mm256_srli_epi32(low, 4);
                        }
                        let low = _mm256_and_si256(low, _mm256_set1_epi32(0x0f));
                        let shift = _mm_cvtsi32_si128(self.qh_bits as i32);
                        let top = _mm256_and_si256(
                            _mm256_srl_epi32(_mm256_cvtepu8_epi32(qh), shift),
                            _mm256_set1_epi32(3),
                        );
                        let q = _mm256_sub_epi32(
                            _mm256_or_si256(low, _mm256_slli_epi32(top, 4)),
                            _mm256_set1_epi32(32),
                        );
                        let scale = if ch < 2 { self.d } else { self.d2 };
                        return _mm256_mul_ps(scale, _mm256_cvtepi32_ps(q));
                    }
                    let (byte0, shift) = match TY {
                        Q4_0 | Q4_1 | Q5_0 => ((ch % 2) * 8, ch >= 2),
                        Q8_0 => (ch * 8, false),
                        _ => (ch * 8, self.high),
                    };
                    // SAFETY: byte0 + 8 stays inside the block's quantized bytes.
                    let raw = unsafe { _mm_loadl_epi64(self.qs.add(byte0).cast::<__m128i>()) };
                    if TY == Q8_0 {
                        let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
                        return _mm256_mul_ps(q, self.d);
                    }
                    let mut idx = _mm256_cvtepu8_epi32(raw);
                    if shift {
                        idx = _mm256_srli_epi32(idx, 4);
                    }
                    if $table && matches!(TY, Q4_0 | Q4_1 | Q4_K) {
                        // The permute reads only the low 4 bits of each index.
                        #[allow(unused_unsafe)]
                        // SAFETY: `$table` is set only for the AVX-512VL module, whose features
                        // `table_pick` needs.
                        return unsafe { table_pick(self.lo, idx, self.hi) };
                    }
                    let q = _mm256_and_si256(idx, _mm256_set1_epi32(0x0f));
                    if TY == Q5_0 {
                        // Value e's fifth bit is bit e of qh.
                        let e = _mm256_add_epi32(
                            _mm256_set1_epi32(8 * ch as i32),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                        );
                        let bit = _mm256_and_si256(
                            _mm256_srlv_epi32(_mm256_set1_epi32(self.qh_bits as i32), e),
                            _mm256_set1_epi32(1),
                        );
                        let q = _mm256_or_si256(q, _mm256_slli_epi32(bit, 4));
                        let q = _mm256_sub_epi32(q, _mm256_set1_epi32(16));
                        return _mm256_mul_ps(_mm256_cvtepi32_ps(q), self.d);
                    }
                    match TY {
                        Q4_0 => {
                            let q = _mm256_sub_epi32(q, _mm256_set1_epi32(8));
                            _mm256_mul_ps(_mm256_cvtepi32_ps(q), self.d)
                        }
                        Q4_1 => _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), self.d), self.m),
                        _ => _mm256_sub_ps(_mm256_mul_ps(self.d, _mm256_cvtepi32_ps(q)), self.m),
                    }
                }
            }
        }
    };
}

/// `lo`/`hi` entry `idx & 15` per lane (AVX-512VL two-source permute).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
#[inline]
fn table_pick(
    lo: std::arch::x86_64::__m256,
    idx: std::arch::x86_64::__m256i,
    hi: std::arch::x86_64::__m256,
) -> std::arch::x86_64::__m256 {
    std::arch::x86_64::_mm256_permutex2var_ps(lo, idx, hi)
}

x86_kernels!(x86_avx2, "avx2,fma,f16c", 2, false);
x86_kernels!(x86_avx512, "avx2,fma,f16c,avx512f,avx512vl", 4, true);

#[cfg(test)]
pub(super) mod tests {
    use super::super::matmul::matmul;
    use super::*;
    use crate::backend::cpu::test_values;

    /// Random but valid blocks: bytes from a hash, f16 scales small and finite (negative mins
    /// for Q4_1).
    pub(in super::super) fn random_blocks(ty: GgmlType, n: usize, k: usize, seed: u32) -> Vec<u8> {
        let bytes = n * k / ty.block_size() * ty.type_size();
        let mut v: Vec<u8> = (0..bytes)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
            .collect();
        if ty == GgmlType::F16 || ty == GgmlType::BF16 {
            // Finite values of both signs.
            for (i, h) in v.chunks_exact_mut(2).enumerate() {
                let x = ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1;
                let bits = if ty == GgmlType::F16 {
                    half::f16::from_f32(x).to_le_bytes()
                } else {
                    half::bf16::from_f32(x).to_le_bytes()
                };
                h.copy_from_slice(&bits);
            }
            return v;
        }
        let scale_fields: &[usize] = match ty {
            GgmlType::Q4_1 | GgmlType::Q4K => &[0, 2],
            GgmlType::Q6K => &[208],
            _ => &[0],
        };
        for (u, unit) in v.chunks_exact_mut(ty.type_size()).enumerate() {
            for (j, &at) in scale_fields.iter().enumerate() {
                let s = 0.001 + 0.01 * (((u * 7 + j * 3) % 13) as f32) / 13.0;
                let s = if j == 1 && ty == GgmlType::Q4_1 {
                    -s
                } else {
                    s
                };
                unit[at..at + 2].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
            }
        }
        v
    }

    /// Random blocks for each `(type, rows)` of `shapes`, rows of `k` values.
    pub(in super::super) fn blocks_for(shapes: &[(GgmlType, usize)], k: usize) -> Vec<Vec<u8>> {
        shapes
            .iter()
            .map(|&(ty, n)| random_blocks(ty, n, k, n as u32))
            .collect()
    }

    /// The matrices over `data` (from [`blocks_for`] with the same shapes).
    pub(in super::super) fn matrices<'a>(
        shapes: &[(GgmlType, usize)],
        data: &'a [Vec<u8>],
        k: usize,
    ) -> Vec<QuantMatrix<'a>> {
        shapes
            .iter()
            .zip(data)
            .map(|(&(ty, n), d)| QuantMatrix { ty, data: d, n, k })
            .collect()
    }

    /// Every matrix of `ws` on the same `rows` of `x` in one grouped call of `run`.
    pub(in super::super) fn grouped(
        run: impl Fn(&mut [QuantProduct<'_>], &[f32], usize),
        ws: &[QuantMatrix<'_>],
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
    ) -> Vec<Vec<f32>> {
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; rows * w.n]).collect();
        let mut products: Vec<QuantProduct<'_>> = outs
            .iter_mut()
            .zip(ws)
            .map(|(out, &w)| QuantProduct { out, w, bias })
            .collect();
        run(&mut products, x, rows);
        drop(products);
        outs
    }

    const TYPES: [GgmlType; 8] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
        GgmlType::F16,
        GgmlType::BF16,
    ];

    /// The promise: bit for bit the f32 matmul on the dequantized weights, on every x86 level,
    /// for any row count (decode rows one at a time, prefill all at once) and thread count.
    #[test]
    fn equals_the_f32_matmul_on_dequantized_weights_bitwise() {
        let (rows, n, k) = (9, 37, 512);
        let x = test_values(rows * k, 5);
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25).collect();
        for ty in TYPES {
            let data = random_blocks(ty, n, k, 7);
            let dense = ty.dequantize(&data, k).unwrap();
            let mut want = vec![0f32; rows * n];
            matmul(&mut want, &x, &dense, Some(&bias), rows, n, k);
            let w = QuantMatrix {
                ty,
                data: &data,
                n,
                k,
            };
            let levels: &[Isa] = match isa() {
                Isa::Scalar | Isa::Neon => &[isa()],
                _ => &[Isa::Avx2Fma, Isa::Avx512],
            };
            // Few rows run the in-register tiles, many rows the f32 panel.
            for &level in levels {
                for take in [1, 2, 3, 5, 6, rows] {
                    let mut out = vec![0f32; take * n];
                    quant_matmul_on(level, &mut out, &x, w, Some(&bias), take);
                    assert_eq!(out, want[..take * n], "{ty:?} on {level:?}, {take} rows");
                }
            }
            for t in 0..rows {
                let mut out = vec![0f32; n];
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1 + t % 3)
                    .build()
                    .unwrap();
                pool.install(|| quant_matmul(&mut out, &x[t * k..], w, Some(&bias), 1));
                assert_eq!(out, want[t * n..(t + 1) * n], "{ty:?} row {t}");
            }
        }
    }

    /// Products sharing an input in one call give each product's own bits.
    #[test]
    fn grouped_products_equal_single_calls() {
        let (rows, k) = (8, 256);
        let x = test_values(rows * k, 8);
        let shapes = [
            (GgmlType::Q4K, 24),
            (GgmlType::Q6K, 9),
            (GgmlType::BF16, 17),
        ];
        let data = blocks_for(&shapes, k);
        let ws = matrices(&shapes, &data, k);
        for take in [1, 2, 7, 8] {
            let outs = grouped(quant_matmuls, &ws, &x, take, None);
            for (out, &w) in outs.iter().zip(&ws) {
                let mut want = vec![0f32; take * w.n];
                quant_matmul(&mut want, &x, w, None, take);
                assert_eq!(out, &want, "{:?}, {take} rows", w.ty);
            }
        }
    }

    #[test]
    fn scalar_level_is_close_to_exact() {
        let (rows, n, k) = (3, 5, 256);
        let x = test_values(rows * k, 2);
        for ty in TYPES {
            let data = random_blocks(ty, n, k, 3);
            let dense = ty.dequantize(&data, k).unwrap();
            let w = QuantMatrix {
                ty,
                data: &data,
                n,
                k,
            };
            let mut out = vec![0f32; rows * n];
            quant_matmul_on(Isa::Scalar, &mut out, &x, w, None, rows);
            for t in 0..rows {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|i| x[t * k + i] as f64 * dense[j * k + i] as f64)
                        .sum();
                    assert!((out[t * n + j] as f64 - exact).abs() < 1e-4, "{ty:?}");
                }
            }
        }
    }
}
