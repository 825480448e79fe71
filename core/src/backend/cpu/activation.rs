//! Pointwise activations of the two MLP kinds.

use rayon::prelude::*;

use super::simd::exp;
#[cfg(target_arch = "x86_64")]
use super::simd::{isa, Isa};

const CHUNK: usize = 4096;

/// tanh through `exp`: 1 − 2 / (e^{2y} + 1), exact at both saturations.
#[inline(always)]
fn tanh(y: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * y) + 1.0)
}

const S: f32 = 0.797_884_6; // sqrt(2/pi)

#[inline(always)]
fn gelu_one(u: f32) -> f32 {
    0.5 * u * (1.0 + tanh(S * (u + 0.044715 * u * u * u)))
}

#[inline(always)]
fn gelu_grad(g: f32, u: f32) -> f32 {
    let t = tanh(S * (u + 0.044715 * u * u * u));
    let du = S * (1.0 + 3.0 * 0.044715 * u * u);
    g * (0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * du)
}

#[inline(always)]
fn silu_mul_one(g: f32, u: f32) -> f32 {
    g / (1.0 + exp(-g)) * u
}

/// (dgate, dup) of `silu(g) · u` for upstream `dh`.
#[inline(always)]
fn silu_mul_grad(dh: f32, g: f32, u: f32) -> (f32, f32) {
    let sig = 1.0 / (1.0 + exp(-g));
    (dh * u * sig * (1.0 + g * (1.0 - sig)), dh * g * sig)
}

/// `f` over every element; the loop is instantiated once with AVX2 enabled so it vectorises.
fn map1(x: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn wide(x: &mut [f32], f: &(impl Fn(f32) -> f32 + Sync)) {
        for v in x {
            *v = f(*v);
        }
    }
    x.par_chunks_mut(CHUNK).for_each(|c| {
        #[cfg(target_arch = "x86_64")]
        if isa() >= Isa::Avx2Fma {
            // SAFETY: AVX2 was detected.
            return unsafe { wide(c, &f) };
        }
        for v in c {
            *v = f(*v);
        }
    });
}

/// `x[i] = f(x[i], y[i])`, as [`map1`].
fn map2(x: &mut [f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn wide(x: &mut [f32], y: &[f32], f: &(impl Fn(f32, f32) -> f32 + Sync)) {
        for (a, &b) in x.iter_mut().zip(y) {
            *a = f(*a, b);
        }
    }
    x.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(a, b)| {
            #[cfg(target_arch = "x86_64")]
            if isa() >= Isa::Avx2Fma {
                // SAFETY: AVX2 was detected.
                return unsafe { wide(a, b, &f) };
            }
            for (a, &b) in a.iter_mut().zip(b) {
                *a = f(*a, b);
            }
        });
}

/// GPT-2's GELU, tanh approximation (`gelu_new`).
pub fn gelu_tanh(x: &mut [f32]) {
    map1(x, gelu_one);
}

/// Backward of [`gelu_tanh`]: `dx = dy · gelu'(x)`, from the forward's input `x`.
pub fn gelu_tanh_backward(dx: &mut [f32], dy: &[f32], x: &[f32]) {
    let n = dx.len().min(dy.len()).min(x.len());
    dx[..n].copy_from_slice(&dy[..n]);
    map2(&mut dx[..n], &x[..n], gelu_grad);
}

/// SwiGLU: `gate = silu(gate) * up`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    map2(gate, up, silu_mul_one);
}

/// Backward of [`silu_mul`] from the forward's inputs `gate`, `up`: writes `dgate`, `dup`.
pub fn silu_mul_backward(dgate: &mut [f32], dup: &mut [f32], dh: &[f32], gate: &[f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn wide(dg: &mut [f32], du: &mut [f32], dh: &[f32], g: &[f32], u: &[f32]) {
        for ((((dg, du), &dh), &g), &u) in dg.iter_mut().zip(du).zip(dh).zip(g).zip(u) {
            (*dg, *du) = silu_mul_grad(dh, g, u);
        }
    }
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(
            dh.par_chunks(CHUNK)
                .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))),
        )
        .for_each(|((dg, du), (dh, (g, u)))| {
            #[cfg(target_arch = "x86_64")]
            if isa() >= Isa::Avx2Fma {
                // SAFETY: AVX2 was detected.
                return unsafe { wide(dg, du, dh, g, u) };
            }
            for ((((dg, du), &dh), &g), &u) in dg.iter_mut().zip(du).zip(dh).zip(g).zip(u) {
                (*dg, *du) = silu_mul_grad(dh, g, u);
            }
        });
}

/// `x += y` elementwise (the residual stream).
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(a, b)| {
            for (a, b) in a.iter_mut().zip(b) {
                *a += b;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_matches_finite_differences() {
        let x: Vec<f32> = (0..9).map(|i| (i as f32 - 4.0) * 0.7).collect();
        let up: Vec<f32> = (0..9).map(|i| 1.0 - i as f32 * 0.3).collect();
        let ones = vec![1f32; 9];
        let eps = 1e-3f32;
        let mut dx = vec![0f32; 9];
        gelu_tanh_backward(&mut dx, &ones, &x);
        let (mut dg, mut du) = (vec![0f32; 9], vec![0f32; 9]);
        silu_mul_backward(&mut dg, &mut du, &ones, &x, &up);
        for i in 0..9 {
            let f = |v: f32| {
                let mut a = [v];
                gelu_tanh(&mut a);
                a[0] as f64
            };
            let g = (f(x[i] + eps) - f(x[i] - eps)) / (2.0 * eps as f64);
            assert!((g - dx[i] as f64).abs() < 2e-3, "gelu {i}");
            let s = |g: f32, u: f32| {
                let mut a = [g];
                silu_mul(&mut a, &[u]);
                a[0] as f64
            };
            let gg = (s(x[i] + eps, up[i]) - s(x[i] - eps, up[i])) / (2.0 * eps as f64);
            let gu = (s(x[i], up[i] + eps) - s(x[i], up[i] - eps)) / (2.0 * eps as f64);
            assert!(
                (gg - dg[i] as f64).abs() < 2e-3 && (gu - du[i] as f64).abs() < 2e-3,
                "silu {i}"
            );
        }
    }

    #[test]
    fn exp_and_tanh_are_accurate_everywhere() {
        let mut x = -90.0f32;
        while x < 90.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            // Below e^-87.3 (≈ 1.2e-38) the result is held at e^-87.3.
            let tol = if want < 1.3e-38 { 1.3e-38 } else { 3e-7 * want };
            if want <= f32::MAX as f64 {
                assert!((got - want).abs() <= tol, "exp({x}) = {got}, want {want}");
            }
            let (got, want) = (tanh(x) as f64, (x as f64).tanh());
            assert!((got - want).abs() <= 3e-7, "tanh({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(exp(-1000.0), exp(-87.3));
        assert!(exp(1000.0).is_finite() && tanh(1000.0) == 1.0 && tanh(-1000.0) == -1.0);
    }

    #[test]
    fn known_values() {
        let mut g = [0.0f32, 1.0, -1.0];
        gelu_tanh(&mut g);
        assert!(
            (g[0]).abs() < 1e-7 && (g[1] - 0.841192).abs() < 1e-5 && (g[2] + 0.158808).abs() < 1e-5
        );
        let mut s = [1.0f32];
        silu_mul(&mut s, &[2.0]);
        assert!((s[0] - 2.0 * 0.7310586).abs() < 1e-6);
    }
}
