//! Log-softmax over a vocabulary row, with temperature. The sum runs in f64 in index order.

/// `log_softmax(logits / temperature)` written to `out`.
pub fn log_softmax(out: &mut [f32], logits: &[f32], temperature: f32) {
    let (max, log_z) = normalizer(logits, temperature);
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = ((l / temperature) as f64 - max - log_z) as f32;
    }
}

/// `log_softmax(logits / temperature)[token]`.
pub fn log_prob_of(logits: &[f32], temperature: f32, token: usize) -> f32 {
    let (max, log_z) = normalizer(logits, temperature);
    ((logits[token] / temperature) as f64 - max - log_z) as f32
}

/// (max, log Σ exp(x − max)) of `logits / temperature`.
fn normalizer(logits: &[f32], temperature: f32) -> (f64, f64) {
    let max = logits
        .iter()
        .map(|&l| l / temperature)
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits
        .iter()
        .map(|&l| ((l / temperature) as f64 - max).exp())
        .sum();
    (max, sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_sum_to_one() {
        let logits = [1.0f32, 2.0, 3.0, -4.0];
        for t in [0.5f32, 1.0, 2.0] {
            let mut out = [0f32; 4];
            log_softmax(&mut out, &logits, t);
            let total: f32 = out.iter().map(|v| v.exp()).sum();
            assert!((total - 1.0).abs() < 1e-6);
            assert_eq!(out[2], log_prob_of(&logits, t, 2));
        }
    }
}
