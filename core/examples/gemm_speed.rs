//! Prints GFLOP/s of the CPU matrix kernels on the shapes of SmolLM2-135M training (T = 1024),
//! and the price of the forward kernel's batch invariance: the same product through the `gemm`
//! crate, whose blocking (so its summation order) depends on the problem size, timed
//! alternately with ours in one run.
//!
//! `cargo run --release -p rlx --example gemm_speed` (threads: `RAYON_NUM_THREADS`, default all).
use rlx::backend::cpu::bf16_gemm::{
    bf16_path, gemm_bf16, interleave_rows, to_pair_rows, Bf16Panel, PairsA, PairsB,
};
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
        let threads = rayon::current_num_threads();
        let crate_fwd = time(&mut || {
            // SAFETY: out is t×n (row stride n), x is t×k (row stride k), and wᵀ is read as
            // k×n through w's n×k layout (row stride 1, column stride k): all in bounds.
            unsafe {
                gemm::gemm(
                    t,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                )
            }
        });
        // Alternate once more so a slow phase of the machine hits both.
        let fwd = fwd.max(time(&mut || matmul(&mut out, &x, &w, None, t, n, k)));
        println!(
            "T={t} N={n} K={k}: forward {fwd:.0} GFLOP/s (gemm crate {crate_fwd:.0}: invariant \
             kernel at {:.2}x), backward dx {bdx:.0}, dw {bdw:.0}",
            fwd / crate_fwd
        );
        // bf16 compute (training's `--compute bf16`): weights packed once (per optimizer
        // step in training, so outside the timing); activations converted inside it.
        let fwd_panel = Bf16Panel::transposed(&w, n, k);
        let bwd_panel = Bf16Panel::direct(&w, n, k);
        let (mut xa, mut da, mut di, mut xi) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let bf_fwd = time(&mut || {
            to_pair_rows(&mut xa, &x, t, k);
            let a = PairsA {
                data: &xa,
                row_stride: k.div_ceil(2),
                col_stride: 1,
            };
            gemm_bf16(
                &mut out,
                n,
                false,
                a,
                fwd_panel.as_b(),
                t,
                n,
                fwd_panel.pairs(),
            );
        });
        let bf_dx = time(&mut || {
            to_pair_rows(&mut da, &dout, t, n);
            let a = PairsA {
                data: &da,
                row_stride: n.div_ceil(2),
                col_stride: 1,
            };
            gemm_bf16(
                &mut dx,
                k,
                false,
                a,
                bwd_panel.as_b(),
                t,
                k,
                bwd_panel.pairs(),
            );
        });
        let bf_dw = time(&mut || {
            interleave_rows(&mut di, &dout, t, n);
            interleave_rows(&mut xi, &x, t, k);
            let a = PairsA {
                data: &di,
                row_stride: 1,
                col_stride: n,
            };
            gemm_bf16(
                &mut dw,
                k,
                true,
                a,
                PairsB::interleaved(&xi, k),
                n,
                k,
                t.div_ceil(2),
            );
        });
        println!(
            "    bf16 compute ({}): forward {bf_fwd:.0} GFLOP/s ({:.2}x f32), backward dx \
             {bf_dx:.0} ({:.2}x), dw {bf_dw:.0} ({:.2}x)",
            bf16_path().name(),
            bf_fwd / fwd,
            bf_dx / bdx,
            bf_dw / bdw
        );
    }
}
