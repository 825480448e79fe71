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

/// Backward of [`gelu_tanh`]: `dx = dy · gelu'(x)`, from the forward's input `x`.
pub fn gelu_tanh_backward(dx: &mut [f32], dy: &[f32], x: &[f32]) {
    const S: f32 = 0.797_884_6;
    dx.par_chunks_mut(CHUNK)
        .zip(dy.par_chunks(CHUNK).zip(x.par_chunks(CHUNK)))
        .for_each(|(dx, (dy, x))| {
            for ((d, &g), &u) in dx.iter_mut().zip(dy).zip(x) {
                let t = (S * (u + 0.044715 * u * u * u)).tanh();
                let du = S * (1.0 + 3.0 * 0.044715 * u * u);
                *d = g * (0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * du);
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

/// Backward of [`silu_mul`] from the forward's inputs `gate`, `up`: writes `dgate`, `dup`.
pub fn silu_mul_backward(dgate: &mut [f32], dup: &mut [f32], dh: &[f32], gate: &[f32], up: &[f32]) {
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(
            dh.par_chunks(CHUNK)
                .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))),
        )
        .for_each(|((dg, du), (dh, (g, u)))| {
            for i in 0..dg.len() {
                let sig = 1.0 / (1.0 + (-g[i]).exp());
                let silu = g[i] * sig;
                du[i] = dh[i] * silu;
                dg[i] = dh[i] * u[i] * sig * (1.0 + g[i] * (1.0 - sig));
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
