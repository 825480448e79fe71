//! Rotary position embeddings, rotate-half convention (HF Llama): for i < HS/2,
//! `x'[i] = x[i]·cos − x[i+HS/2]·sin`, `x'[i+HS/2] = x[i+HS/2]·cos + x[i]·sin`.

use rayon::prelude::*;

use crate::config::{RopeConfig, RopeScaling};

/// Inverse frequencies (HS/2 of them), after any long-context scaling.
pub fn inv_freq(rope: &RopeConfig, head_dim: usize) -> Vec<f64> {
    let half = head_dim / 2;
    let base: Vec<f64> = (0..half)
        .map(|i| 1.0 / rope.theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    match rope.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// cos/sin tables `(T, HS/2)` for the given positions.
pub fn tables(inv_freq: &[f64], positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = vec![0f32; positions.len() * half];
    let mut sin = vec![0f32; positions.len() * half];
    for (t, &p) in positions.iter().enumerate() {
        for (i, f) in inv_freq.iter().enumerate() {
            let angle = p as f64 * f;
            cos[t * half + i] = angle.cos() as f32;
            sin[t * half + i] = angle.sin() as f32;
        }
    }
    (cos, sin)
}

/// Rotates every head of every row of `x` (`(T, heads·HS)`) in place.
pub fn apply(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, head_dim: usize) {
    rotate(x, cos, sin, heads, head_dim, 1.0);
}

/// Backward of [`apply`]: the rotation's transpose (rotation by −angle), in place on `dx`.
pub fn apply_backward(dx: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, head_dim: usize) {
    rotate(dx, cos, sin, heads, head_dim, -1.0);
}

/// Rotation by `direction` × angle (±1).
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, head_dim: usize, direction: f32) {
    let half = head_dim / 2;
    x.par_chunks_mut(heads * head_dim)
        .enumerate()
        .for_each(|(t, row)| {
            let (c, s) = (
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
            for head in row.chunks_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    let si = direction * s[i];
                    head[i] = a * c[i] - b * si;
                    head[i + half] = b * c[i] + a * si;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_inverts_the_rotation() {
        let rope = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::None,
        };
        let (c, s) = tables(&inv_freq(&rope, 8), &[3, 17]);
        let x: Vec<f32> = (0..32).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut y = x.clone();
        apply(&mut y, &c, &s, 2, 8);
        apply_backward(&mut y, &c, &s, 2, 8);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        let rope = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::None,
        };
        let f = inv_freq(&rope, 4);
        let (c, s) = tables(&f, &[0, 5]);
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
        apply(&mut x, &c, &s, 1, 4);
        assert_eq!(&x[..4], &[1.0, 2.0, 3.0, 4.0]);
        let n: f32 = x[4..].iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-4);
    }
}
