//! LayerNorm (GPT-2) and RMSNorm (Llama) over rows of width `C`, one row per task.

use rayon::prelude::*;

/// `out = (x - mean) / sqrt(var + eps) * w + b` per row (biased variance, as torch).
pub fn layernorm(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32], c: usize, eps: f32) {
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(o, x)| {
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
            let rstd = (1.0 / (var + eps as f64).sqrt()) as f32;
            let mean = mean as f32;
            for i in 0..c {
                o[i] = (x[i] - mean) * rstd * w[i] + b[i];
            }
        });
}

/// `out = x / sqrt(mean(x²) + eps) * w` per row.
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], c: usize, eps: f32) {
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(o, x)| {
            let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / c as f64;
            let rstd = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for i in 0..c {
                o[i] = w[i] * (x[i] * rstd);
            }
        });
}

/// Per-row mean and 1/σ as the forward computes them.
fn layernorm_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let c = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / c;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

/// Backward of [`layernorm`]: writes `dx`, accumulates `dw`, `db` (statistics recomputed from
/// `x`, which is cheaper to keep than to store them).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    c: usize,
    eps: f32,
) {
    dx.par_chunks_mut(c)
        .zip(dy.par_chunks(c).zip(x.par_chunks(c)))
        .for_each(|(dx, (dy, x))| {
            let (mean, rstd) = layernorm_stats(x, eps);
            let (mut mean_g, mut mean_gx) = (0f64, 0f64);
            for i in 0..c {
                let g = (dy[i] * w[i]) as f64;
                mean_g += g;
                mean_gx += g * ((x[i] - mean) * rstd) as f64;
            }
            let (mean_g, mean_gx) = ((mean_g / c as f64) as f32, (mean_gx / c as f64) as f32);
            for i in 0..c {
                let xhat = (x[i] - mean) * rstd;
                dx[i] = rstd * (dy[i] * w[i] - mean_g - xhat * mean_gx);
            }
        });
    // Parameter gradients sum over rows: one pass in row order.
    for (dy, x) in dy.chunks(c).zip(x.chunks(c)) {
        let (mean, rstd) = layernorm_stats(x, eps);
        for i in 0..c {
            dw[i] += dy[i] * (x[i] - mean) * rstd;
            db[i] += dy[i];
        }
    }
}

/// Backward of [`rmsnorm`]: writes `dx`, accumulates `dw`.
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    c: usize,
    eps: f32,
) {
    let rstd_of = |x: &[f32]| {
        let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / c as f64;
        (1.0 / (ms + eps as f64).sqrt()) as f32
    };
    dx.par_chunks_mut(c)
        .zip(dy.par_chunks(c).zip(x.par_chunks(c)))
        .for_each(|(dx, (dy, x))| {
            let rstd = rstd_of(x);
            let mean_gx = (0..c)
                .map(|i| (dy[i] * w[i]) as f64 * (x[i] * rstd) as f64)
                .sum::<f64>()
                / c as f64;
            for i in 0..c {
                dx[i] = rstd * (dy[i] * w[i] - x[i] * rstd * mean_gx as f32);
            }
        });
    for (dy, x) in dy.chunks(c).zip(x.chunks(c)) {
        let rstd = rstd_of(x);
        for i in 0..c {
            dw[i] += dy[i] * x[i] * rstd;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layernorm_normalizes() {
        let x = [1.0f32, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 2.0];
        let mut out = [0f32; 8];
        layernorm(&mut out, &x, &[1.0; 4], &[0.5; 4], 4, 0.0);
        let row: f32 = out[..4].iter().sum::<f32>() / 4.0;
        assert!((row - 0.5).abs() < 1e-6);
        assert!((out[0] - (0.5 - 1.5 / 1.25f32.sqrt())).abs() < 1e-5);
    }

    /// Central differences of `Σ r ⊙ f(x)` in f64 around f32 inputs.
    fn fd(f: &dyn Fn(&[f32]) -> f64, x: &[f32], i: usize) -> f64 {
        let eps = 1e-3f32;
        let (mut a, mut b) = (x.to_vec(), x.to_vec());
        a[i] += eps;
        b[i] -= eps;
        (f(&a) - f(&b)) / (2.0 * eps as f64)
    }

    #[test]
    #[allow(clippy::needless_range_loop)] // index loops mirror the finite-difference definition
    fn backward_matches_finite_differences() {
        let c = 6;
        let x: Vec<f32> = (0..2 * c)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let w: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.2).collect();
        let b: Vec<f32> = (0..c).map(|i| i as f32 * 0.1).collect();
        let r: Vec<f32> = (0..2 * c)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) / 2.0)
            .collect();
        let dot = |y: &[f32]| {
            y.iter()
                .zip(&r)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
        };
        let ln = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut y = vec![0f32; x.len()];
            layernorm(&mut y, x, w, b, c, 1e-5);
            dot(&y)
        };
        let (mut dx, mut dw, mut db) = (vec![0f32; 2 * c], vec![0f32; c], vec![0f32; c]);
        layernorm_backward(&mut dx, &mut dw, &mut db, &r, &x, &w, c, 1e-5);
        for i in 0..x.len() {
            assert!(
                (fd(&|v| ln(v, &w, &b), &x, i) - dx[i] as f64).abs() < 2e-3,
                "ln dx[{i}]"
            );
        }
        for i in 0..c {
            assert!(
                (fd(&|v| ln(&x, v, &b), &w, i) - dw[i] as f64).abs() < 2e-3,
                "ln dw[{i}]"
            );
            assert!(
                (fd(&|v| ln(&x, &w, v), &b, i) - db[i] as f64).abs() < 2e-3,
                "ln db[{i}]"
            );
        }
        let rms = |x: &[f32], w: &[f32]| {
            let mut y = vec![0f32; x.len()];
            rmsnorm(&mut y, x, w, c, 1e-5);
            dot(&y)
        };
        let (mut dx, mut dw) = (vec![0f32; 2 * c], vec![0f32; c]);
        rmsnorm_backward(&mut dx, &mut dw, &r, &x, &w, c, 1e-5);
        for i in 0..x.len() {
            assert!(
                (fd(&|v| rms(v, &w), &x, i) - dx[i] as f64).abs() < 2e-3,
                "rms dx[{i}]"
            );
        }
        for i in 0..c {
            assert!(
                (fd(&|v| rms(&x, v), &w, i) - dw[i] as f64).abs() < 2e-3,
                "rms dw[{i}]"
            );
        }
    }

    #[test]
    fn rmsnorm_scales() {
        let x = [3.0f32, 4.0];
        let mut out = [0f32; 2];
        rmsnorm(&mut out, &x, &[1.0, 2.0], 2, 0.0);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] - 8.0 / r).abs() < 1e-6);
    }
}
