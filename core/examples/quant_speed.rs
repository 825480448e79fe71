//! Times the quantized products on SmolLM2-135M's decode shapes (one layer's maps repeated to the
//! model's 30 layers, plus the Q8_0 LM head), reporting weight GB/s; and prefill rows; beside
//! them the same blocks with 8-bit activations and the f32 weights. `RLX_QUANT_TYPE=bf16|f16|q8_0|q4_0`
//! times every matrix in that type instead.
//!
//!     cargo run --release -p rlx --example quant_speed [threads]
use rlx::backend::cpu::int8_matmul::int8_matmul;
use rlx::backend::cpu::matmul::matmul;
use rlx::backend::cpu::quant_matmul::{quant_matmul, QuantMatrix};
use rlx::weights::quant::GgmlType;
use std::time::Instant;

fn blocks(ty: GgmlType, n: usize, k: usize) -> Vec<u8> {
    let bytes = n * k / ty.block_size() * ty.type_size();
    let mut v: Vec<u8> = (0..bytes)
        .map(|i| ((i as u32).wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for unit in v.chunks_exact_mut(ty.type_size()) {
        unit[..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
    }
    v
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let layer = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    // `RLX_QUANT_TYPE=bf16|f16|q8_0|q4_0` times every matrix in that type instead of the
    // default model's Q4_1 layers and Q8_0 head.
    let (layer_ty, head_ty) = match std::env::var("RLX_QUANT_TYPE").as_deref() {
        Ok("bf16") => (GgmlType::BF16, GgmlType::BF16),
        Ok("f16") => (GgmlType::F16, GgmlType::F16),
        Ok("q8_0") => (GgmlType::Q8_0, GgmlType::Q8_0),
        Ok("q4_0") => (GgmlType::Q4_0, GgmlType::Q8_0),
        _ => (GgmlType::Q4_1, GgmlType::Q8_0),
    };
    let mut mats: Vec<(GgmlType, usize, usize, Vec<u8>)> = Vec::new();
    for _ in 0..30 {
        for &(n, k) in &layer {
            mats.push((layer_ty, n, k, blocks(layer_ty, n, k)));
        }
    }
    mats.push((head_ty, 49152, 576, blocks(head_ty, 49152, 576)));
    let total: usize = mats.iter().map(|m| m.3.len()).sum();
    for rows in [1usize, 16, 128] {
        let x: Vec<f32> = (0..rows * 1536)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let mut out = vec![0f32; rows * 49152];
        let runs = if rows == 1 { 30 } else { 3 };
        // Best time of `runs` passes over every matrix with `product`.
        type Product = fn(&mut [f32], &[f32], QuantMatrix<'_>, Option<&[f32]>, usize);
        let mut time_blocks = |product: Product, runs: usize| {
            let mut best = f64::MAX;
            for _ in 0..runs {
                let s = Instant::now();
                pool.install(|| {
                    for (ty, n, k, data) in &mats {
                        let w = QuantMatrix {
                            ty: *ty,
                            data,
                            n: *n,
                            k: *k,
                        };
                        product(&mut out[..rows * n], &x[..rows * k], w, None, rows);
                    }
                });
                best = best.min(s.elapsed().as_secs_f64());
            }
            best
        };
        let best = time_blocks(quant_matmul, runs);
        // The same blocks with 8-bit activations (`int8_activations`), where the type has them.
        let int8_runs = if rlx::backend::cpu::int8_matmul::supports(layer_ty) {
            runs
        } else {
            0
        };
        let best_int8 = time_blocks(int8_matmul, int8_runs);
        // The same products on f32 weights, side by side.
        let dense: Vec<Vec<f32>> = mats
            .iter()
            .map(|(ty, _, k, d)| ty.dequantize(d, *k).unwrap())
            .collect();
        let mut best_f32 = f64::MAX;
        for _ in 0..3 {
            let s = Instant::now();
            pool.install(|| {
                for ((_, n, k, _), w) in mats.iter().zip(&dense) {
                    matmul(&mut out[..rows * n], &x[..rows * k], w, None, rows, *n, *k);
                }
            });
            best_f32 = best_f32.min(s.elapsed().as_secs_f64());
        }
        let int8 = if int8_runs == 0 {
            "n/a".to_string()
        } else {
            format!("{:.2} ms", best_int8 * 1e3)
        };
        println!(
            "rows {rows:4}: {:7.2} ms per pass ({:6.1} weight GB/s, {:7.1} rows/s); int8 activations {int8}; f32 weights {:7.2} ms",
            best * 1e3,
            total as f64 / best / 1e9,
            rows as f64 / best,
            best_f32 * 1e3
        );
    }
}
