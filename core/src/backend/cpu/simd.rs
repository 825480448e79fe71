//! Runtime ISA detection (one chokepoint) and the few vector primitives shared by kernels.
//!
//! `RLX_ISA=scalar|avx2|avx512` caps the level used (`RLX_FORCE_SCALAR=1` is `RLX_ISA=scalar`), so
//! tests and benchmarks can exercise every path on one machine. A process always uses one path, so
//! results are reproducible within a machine.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
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
            Ok("avx2") => Isa::Avx2Fma,
            _ => Isa::Avx512,
        }
    };
    detect_hardware().min(cap)
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
        _ => dot_scalar(a, b),
    }
}

/// `y += alpha * x` elementwise (fused multiply-adds on the AVX2 path).
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() returns Avx2Fma or above only after detecting AVX2 and FMA.
        Isa::Avx2Fma | Isa::Avx512 => unsafe { x86::axpy(y, alpha, x) },
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
}
