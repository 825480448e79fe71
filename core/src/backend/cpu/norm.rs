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

    #[test]
    fn rmsnorm_scales() {
        let x = [3.0f32, 4.0];
        let mut out = [0f32; 2];
        rmsnorm(&mut out, &x, &[1.0, 2.0], 2, 0.0);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] - 8.0 / r).abs() < 1e-6);
    }
}
