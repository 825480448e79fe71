//! Pointwise activations of the two MLP kinds.

use rayon::prelude::*;

const CHUNK: usize = 4096;

/// GPT-2's GELU, tanh approximation (`gelu_new`).
pub fn gelu_tanh(x: &mut [f32]) {
    const S: f32 = 0.797_884_6; // sqrt(2/pi)
    x.par_chunks_mut(CHUNK).for_each(|c| {
        for v in c {
            let u = *v;
            *v = 0.5 * u * (1.0 + (S * (u + 0.044715 * u * u * u)).tanh());
        }
    });
}

/// SwiGLU: `gate = silu(gate) * up`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    gate.par_chunks_mut(CHUNK)
        .zip(up.par_chunks(CHUNK))
        .for_each(|(g, u)| {
            for (g, u) in g.iter_mut().zip(u) {
                let s = *g / (1.0 + (-*g).exp());
                *g = s * u;
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
