//! Prints GFLOP/s of the CPU matrix kernels on the shapes of SmolLM2-135M training (T = 1024).
use rlx::backend::cpu::gemm::{gemm, Strided};
use rlx::backend::cpu::matmul::matmul;
use std::time::Instant;

fn main() {
    let shapes = [
        (1024usize, 576usize, 576usize),
        (1024, 1536, 576),
        (1024, 576, 1536),
        (32, 49152, 576),
    ];
    for &(t, n, k) in &shapes {
        let x = vec![0.5f32; t * k];
        let w = vec![0.25f32; n * k];
        let dout = vec![0.1f32; t * n];
        let mut out = vec![0f32; t * n];
        let mut dx = vec![0f32; t * k];
        let mut dw = vec![0f32; n * k];
        let flops = 2.0 * (t * n * k) as f64;
        let time = |f: &mut dyn FnMut()| {
            f();
            let s = Instant::now();
            for _ in 0..3 {
                f();
            }
            flops * 3.0 / s.elapsed().as_secs_f64() / 1e9
        };
        let fwd = time(&mut || matmul(&mut out, &x, &w, None, t, n, k));
        let bdx = time(&mut || {
            gemm(
                &mut dx,
                k,
                false,
                Strided {
                    data: &dout,
                    row_stride: n,
                    col_stride: 1,
                },
                &w,
                k,
                t,
                k,
                n,
            )
        });
        let bdw = time(&mut || {
            gemm(
                &mut dw,
                k,
                true,
                Strided {
                    data: &dout,
                    row_stride: 1,
                    col_stride: n,
                },
                &x,
                k,
                n,
                k,
                t,
            )
        });
        println!("T={t} N={n} K={k}: forward {fwd:.0} GFLOP/s, dx {bdx:.0}, dw {bdw:.0}");
    }
}
