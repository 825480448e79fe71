//! Runtime ISA detection (one chokepoint) and the few vector primitives shared by kernels.
//!
//! `RLX_ISA=scalar|avx2|avx512` (x86-64) or `RLX_ISA=scalar|neon` (aarch64) caps the level used
//! (`RLX_FORCE_SCALAR=1` is `RLX_ISA=scalar`), so tests and benchmarks can exercise every path on
//! one machine. A process always uses one path, so results are reproducible within a machine.
//!
//! The vector paths of every architecture compute the same operations: 8-lane fused
//! multiply-add chains (NEON holds the 8 lanes in two 4-lane registers) summed by [`reduce8`]'s
//! pairing, so AVX2, AVX-512 and NEON give the same bits (for finite results: the two
//! architectures write different NaN bit patterns). The portable path multiplies and adds
//! separately (a fused multiply-add is a libm call without hardware support), so it agrees with
//! them only to rounding.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// aarch64 Advanced SIMD (NEON): 4 f32 lanes, 32 vector registers, fused multiply-add.
    Neon,
    /// x86-64 with AVX2 and FMA: 8 f32 lanes.
    Avx2Fma,
    /// x86-64 with AVX-512 F and VL (plus AVX2 and FMA): 16 f32 lanes, mask registers and 32
    /// vector registers.
    Avx512,
}

impl Isa {
    /// The name `RLX_ISA` takes and `rlx bench` reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Neon => "neon",
            Isa::Avx2Fma => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(detect)
}

fn detect() -> Isa {
    let cap = if std::env::var_os("RLX_FORCE_SCALAR").is_some_and(|v| v == "1") {
        Isa::Scalar
    } else {
        match std::env::var("RLX_ISA").as_deref() {
            Ok("scalar") => Isa::Scalar,
            Ok("neon") => Isa::Neon,
            Ok("avx2") => Isa::Avx2Fma,
            _ => Isa::Avx512,
        }
    };
    on_this_arch(detect_hardware().min(cap))
}

/// `level` capped at this process's [`isa()`], as one this architecture has: the level a
/// kernel's `_on(level)` variant runs.
pub fn runnable(level: Isa) -> Isa {
    on_this_arch(level.min(isa()))
}

/// NEON asked for on x86-64 (`RLX_ISA=neon`, or `_on(Isa::Neon)`) means the portable path; on
/// aarch64 the x86 levels sit above NEON in the order, so as caps they leave NEON.
fn on_this_arch(level: Isa) -> Isa {
    if level == Isa::Neon && !cfg!(target_arch = "aarch64") {
        Isa::Scalar
    } else {
        level
    }
}

fn detect_hardware() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                return Isa::Avx512;
            }
            return Isa::Avx2Fma;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            return Isa::Neon;
        }
    }
    Isa::Scalar
}

/// Dot product with a fixed summation order for a given length.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() returns Avx2Fma or above only after detecting AVX2 and FMA.
        Isa::Avx2Fma | Isa::Avx512 => unsafe { x86::dot(a, b) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon::dot(a, b),
        _ => dot_scalar(a, b),
    }
}

/// `y += alpha * x` elementwise (fused multiply-adds in chunks of 8 on the vector paths, the
/// rest and the portable path unfused).
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() returns Avx2Fma or above only after detecting AVX2 and FMA.
        Isa::Avx2Fma | Isa::Avx512 => unsafe { x86::axpy(y, alpha, x) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon::axpy(y, alpha, x),
        _ => {
            for (y, x) in y.iter_mut().zip(x) {
                *y += alpha * x;
            }
        }
    }
}

/// `e^x` from plain arithmetic (range reduction by ln 2, a degree-6 polynomial, the exponent
/// written into the bits): within 3e-7 relative of the true value (inputs below −87.3 give
/// e^−87.3 ≈ 1.2e-38), and — unlike
/// libm's `expf`, a call per element — it vectorises, so the loops below run 8 lanes at a time.
/// Every ISA path evaluates these same operations (no fused multiply-adds), so results do not
/// depend on the path.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Below -87.3 the result would be subnormal; above 88.72 it would overflow.
    let x = x.clamp(-87.3, 88.72);
    let k = (x * LOG2E + 0.5).floor();
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.388_079e-3;
    let p = p * r + 8.333_524e-3;
    let p = p * r + 4.166_664_6e-2;
    let p = p * r + 1.666_666_7e-1;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2^k with k in [-126, 128): bits of the exponent field; k = 128 only at the clamp edge,
    // where p·2^127·2 is computed as two steps to stay finite where it should.
    let k = k as i32;
    let half = f32::from_bits(((k / 2 + 127) as u32) << 23);
    let rest = f32::from_bits(((k - k / 2 + 127) as u32) << 23);
    p * half * rest
}

pub(crate) fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            lanes[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s = reduce8(&lanes);
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Sums 8 lanes in the same pairwise order the AVX2 path uses.
pub(crate) fn reduce8(l: &[f32; 8]) -> f32 {
    let q = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let d = [q[0] + q[2], q[1] + q[3]];
    d[0] + d[1]
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Horizontal sum: (lo + hi) pairwise, matching `reduce8`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let s = _mm_add_ss(d, _mm_shuffle_ps(d, d, 0b01));
        _mm_cvtss_f32(s)
    }

    /// `y += alpha * x`, 8 lanes at a time with FMA, then the scalar tail.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let a = _mm256_set1_ps(alpha);
        let chunks = n / 8;
        for c in 0..chunks {
            // SAFETY: c*8 + 8 <= n <= len of both slices.
            unsafe {
                let yp = y.as_mut_ptr().add(c * 8);
                let v = _mm256_fmadd_ps(
                    a,
                    _mm256_loadu_ps(x.as_ptr().add(c * 8)),
                    _mm256_loadu_ps(yp),
                );
                _mm256_storeu_ps(yp, v);
            }
        }
        for i in chunks * 8..n {
            y[i] += alpha * x[i];
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let chunks = n / 8;
        let mut acc = _mm256_setzero_ps();
        for c in 0..chunks {
            // SAFETY: c*8 + 8 <= n <= len of both slices.
            let (va, vb) = unsafe {
                (
                    _mm256_loadu_ps(a.as_ptr().add(c * 8)),
                    _mm256_loadu_ps(b.as_ptr().add(c * 8)),
                )
            };
            acc = _mm256_fmadd_ps(va, vb, acc);
        }
        let mut s = hsum(acc);
        for i in chunks * 8..n {
            s += a[i] * b[i];
        }
        s
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use std::arch::aarch64::*;

    /// The 8 lanes `lo` (0–3) and `hi` (4–7) summed in [`super::reduce8`]'s order — the same
    /// pairing as the x86 `hsum`.
    #[inline(always)]
    pub(crate) fn hsum(lo: float32x4_t, hi: float32x4_t) -> f32 {
        // SAFETY: NEON is part of the aarch64 baseline; these touch registers only.
        unsafe {
            let q = vaddq_f32(lo, hi);
            let d = vadd_f32(vget_low_f32(q), vget_high_f32(q));
            vget_lane_f32::<0>(d) + vget_lane_f32::<1>(d)
        }
    }

    /// `y += alpha * x`, 8 values at a time with fused multiply-adds (as the x86 path), then the
    /// scalar tail.
    pub(crate) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        // Chunks of 8, as the x86 path, so the same elements take the fused and the plain tail.
        let chunks = n / 8;
        for c in 0..chunks * 2 {
            // SAFETY: c*4 + 4 <= chunks*8 <= n <= len of both slices.
            unsafe {
                let yp = y.as_mut_ptr().add(c * 4);
                let v = vfmaq_n_f32(vld1q_f32(yp), vld1q_f32(x.as_ptr().add(c * 4)), alpha);
                vst1q_f32(yp, v);
            }
        }
        for i in chunks * 8..n {
            y[i] += alpha * x[i];
        }
    }

    /// Dot product: one 8-lane fused chain over chunks of 8, [`hsum`], then the scalar tail.
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let chunks = n / 8;
        // SAFETY: every load reads c*8 .. c*8 + 8 <= n values of both slices.
        let (lo, hi) = unsafe {
            let (mut lo, mut hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
            for c in 0..chunks {
                let (pa, pb) = (a.as_ptr().add(c * 8), b.as_ptr().add(c * 8));
                lo = vfmaq_f32(lo, vld1q_f32(pa), vld1q_f32(pb));
                hi = vfmaq_f32(hi, vld1q_f32(pa.add(4)), vld1q_f32(pb.add(4)));
            }
            (lo, hi)
        };
        let mut s = hsum(lo, hi);
        for i in chunks * 8..n {
            s += a[i] * b[i];
        }
        s
    }
}

/// The vector paths' dot product written out with scalar fused multiply-adds: what AVX2,
/// AVX-512 and NEON must each compute bit for bit (tests compare them to it).
#[cfg(test)]
pub(crate) fn dot_fused_reference(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut lanes = [0f32; 8];
    for c in 0..n / 8 {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane = a[c * 8 + l].mul_add(b[c * 8 + l], *lane);
        }
    }
    let mut s = reduce8(&lanes);
    for i in n / 8 * 8..n {
        s += a[i] * b[i];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_f64_reference() {
        for n in [0, 1, 7, 8, 9, 63, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - exact).abs() < 1e-4, "n={n}");
        }
    }

    #[test]
    fn vector_dot_and_axpy_are_the_fused_lane_order_on_every_architecture() {
        if isa() == Isa::Scalar {
            println!("skipped: no vector path here (or RLX_ISA caps it)");
            return;
        }
        for n in [0, 1, 7, 8, 9, 63, 64, 100, 577] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.1).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() / 7.0).collect();
            assert_eq!(
                dot(&a, &b).to_bits(),
                dot_fused_reference(&a, &b).to_bits(),
                "{:?} n={n}",
                isa()
            );
            let mut y = b.clone();
            axpy(&mut y, 0.3, &a);
            let mut expected = b.clone();
            let vector = n / 8 * 8;
            for (i, e) in expected.iter_mut().enumerate() {
                *e = if i < vector {
                    0.3f32.mul_add(a[i], *e)
                } else {
                    *e + 0.3 * a[i]
                };
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&expected), "{:?} n={n}", isa());
        }
    }
}
