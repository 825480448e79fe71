//! The machine's FMA ceiling, for reading the GEMM numbers: GFLOP per CPU-second of twelve
//! independent fused multiply-add chains on 256-bit and on 512-bit vectors, on one thread and
//! on two at once (two threads that share a core's FMA units each get about half).
//!
//! `cargo run --release -p rlx --example fma_peak`
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::time::Instant;

    const STEPS: usize = 100_000_000;

    /// # Safety
    /// AVX2 and FMA are present.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chains_256() -> f32 {
        let (b, c) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(1e-7));
        let mut a: [__m256; 12] = std::array::from_fn(|i| _mm256_set1_ps(i as f32));
        for _ in 0..STEPS {
            for v in a.iter_mut() {
                *v = _mm256_fmadd_ps(*v, b, c);
            }
        }
        a.iter().map(|v| _mm256_cvtss_f32(*v)).sum()
    }

    /// # Safety
    /// AVX-512F is present.
    #[target_feature(enable = "avx512f")]
    unsafe fn chains_512() -> f32 {
        let (b, c) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(1e-7));
        let mut a: [__m512; 12] = std::array::from_fn(|i| _mm512_set1_ps(i as f32));
        for _ in 0..STEPS {
            for v in a.iter_mut() {
                *v = _mm512_fmadd_ps(*v, b, c);
            }
        }
        a.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
    }

    fn rate(lanes: usize, threads: usize, f: fn() -> f32) -> f64 {
        let start = Instant::now();
        let sink: f32 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads).map(|_| s.spawn(f)).collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(sink);
        (threads * STEPS * 12 * lanes * 2) as f64 / start.elapsed().as_secs_f64() / 1e9
    }

    pub fn main() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            println!("no AVX2+FMA here");
            return;
        }
        // SAFETY: AVX2 and FMA were detected just above.
        let ymm: fn() -> f32 = || unsafe { chains_256() };
        for threads in [1, 2] {
            println!(
                "256-bit, {threads} thread(s): {:.1} GFLOP/s",
                rate(8, threads, ymm)
            );
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected just above.
            let zmm: fn() -> f32 = || unsafe { chains_512() };
            for threads in [1, 2] {
                println!(
                    "512-bit, {threads} thread(s): {:.1} GFLOP/s",
                    rate(16, threads, zmm)
                );
            }
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    x86::main();
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86-64 only");
}
