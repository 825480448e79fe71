//! The CUDA side. Without a GPU: every kernel compiles through NVRTC for sm_80 and sm_90
//! (skipped with a message when libnvrtc is absent, failed when `RLX_REQUIRE_NVRTC=1`, as CI
//! sets), compile errors come back as errors with NVRTC's log, and asking for `cuda:N` without
//! a driver (or a device that does not exist) is a clear error. With a GPU (each test skipped,
//! with the reason, when no device is present): kernels run and match CPU references, and a
//! model loaded on `cuda:0` gives the CPU model's logits, log-probs and greedy tokens within
//! the tolerances stated at each test, samples valid tokens, trains (gradients on the
//! device, AdamW on the host) as the CPU does, and refuses LoRA and reward/value heads clearly.

use std::sync::Arc;

use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use rlx::backend::cuda;
use rlx::{Device, LoadOptions, Model, SamplingParams, TrainConfig, Trainer};
use rlx_cuda_kernels::{Module, ALL};
use rlx_tests::{fixture, tiny_llama_gguf};

fn nvrtc_or_skip(test: &str) -> bool {
    if cuda::nvrtc_available() {
        return true;
    }
    let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    assert!(
        std::env::var("RLX_REQUIRE_NVRTC").as_deref() != Ok("1"),
        "RLX_REQUIRE_NVRTC=1 but libnvrtc was not found (LD_LIBRARY_PATH={path})"
    );
    eprintln!("{test}: skipped, libnvrtc not found (LD_LIBRARY_PATH={path})");
    false
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip("every_kernel_compiles_for_sm80_and_sm90") {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let all = cuda::compile_all(arch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(all.len(), ALL.len());
        // Cached: the second call hands back the same text.
        let again = cuda::compile(&ALL[0], arch).unwrap();
        assert!(Arc::ptr_eq(&again, &all[0].1));
    }
}

#[test]
fn a_kernel_that_does_not_compile_is_an_error_with_the_log() {
    if !nvrtc_or_skip("a_kernel_that_does_not_compile_is_an_error_with_the_log") {
        return;
    }
    let broken: &'static Module = Box::leak(Box::new(Module {
        name: "broken",
        source: "extern \"C\" __global__ void f(float* x) { x[0] = undefined_name; }",
        kernels: &["f"],
    }));
    let e = cuda::compile(broken, "sm_80").unwrap_err().to_string();
    assert!(e.contains("broken") && e.contains("undefined_name"), "{e}");
    let e = cuda::compile(&ALL[0], "sm_12").unwrap_err().to_string();
    assert!(e.contains("unknown architecture"), "{e}");
}

#[test]
fn devices_parse_and_a_missing_driver_or_device_is_a_clear_error() {
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
    assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
    for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", ""] {
        assert!(bad.parse::<Device>().is_err(), "{bad}");
    }
    let on = |device: Device| -> String {
        match Model::load(
            fixture("llama-f32"),
            LoadOptions {
                device,
                ..Default::default()
            },
        ) {
            Ok(_) => panic!("{device} cannot be usable here"),
            Err(e) => e.to_string(),
        }
    };
    // No machine has 100 devices: without a driver the error names the driver, with one it
    // says the device does not exist.
    let e = on(Device::Cuda(99));
    assert!(e.starts_with("CUDA: "), "{e}");
    if cuda::driver_available() {
        assert!(e.contains("cuda:99 does not exist"), "{e}");
    } else {
        assert!(e.contains("no CUDA driver found"), "{e}");
        let e0 = on(Device::Cuda(0));
        assert!(e0.contains("no CUDA driver found"), "{e0}");
        eprintln!("loading on cuda:0 without a driver: {e0}");
    }
}

/// The first device and its architecture (`sm_XY`), or None with the reason printed.
fn gpu(test: &str) -> Option<(Arc<CudaContext>, String)> {
    match cuda::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) => {
            eprintln!("{test}: skipped, no CUDA device");
            return None;
        }
        Err(e) => {
            eprintln!("{test}: skipped, {e}");
            return None;
        }
    }
    if !nvrtc_or_skip(test) {
        return None;
    }
    let ctx = CudaContext::new(0).expect("device 0");
    let (major, minor) = ctx.compute_capability().expect("compute capability");
    // PTX for the closest architecture rlx knows; the driver JIT-compiles it.
    let arch = match major * 10 + minor {
        cc if cc >= 90 => "sm_90",
        cc if cc >= 80 => "sm_80",
        _ => "sm_75",
    };
    Some((ctx, arch.to_string()))
}

fn function(
    ctx: &Arc<CudaContext>,
    arch: &str,
    module: &str,
    kernel: &str,
) -> cudarc::driver::CudaFunction {
    let m = rlx_cuda_kernels::module(module).expect("module");
    let ptx = cuda::compile(m, arch).unwrap_or_else(|e| panic!("{e}"));
    ctx.load_module(Ptx::from_src(ptx.to_string()))
        .expect("load module")
        .load_function(kernel)
        .expect("function")
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn gpu_norm_activation_rope_optimizer_and_logsoftmax_match_the_cpu() {
    let Some((ctx, arch)) = gpu("gpu_norm_activation_rope_optimizer_and_logsoftmax_match_the_cpu")
    else {
        return;
    };
    let stream = ctx.default_stream();
    let (rows, dim) = (5usize, 300usize);
    let x = random(rows * dim, 1);
    let w = random(dim, 2);

    // RMSNorm.
    let f = function(&ctx, &arch, "norm", "rmsnorm_fwd");
    let (dx, dw) = (
        stream.clone_htod(&x).unwrap(),
        stream.clone_htod(&w).unwrap(),
    );
    let mut dy = stream.alloc_zeros::<f32>(rows * dim).unwrap();
    let mut drstd = stream.alloc_zeros::<f32>(rows).unwrap();
    let (r, d, eps) = (rows as i32, dim as i32, 1e-5f32);
    let mut b = stream.launch_builder(&f);
    b.arg(&dx)
        .arg(&dw)
        .arg(&mut dy)
        .arg(&mut drstd)
        .arg(&r)
        .arg(&d)
        .arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types and count follow rmsnorm_fwd's signature; buffers hold rows×dim.
    unsafe { b.launch(cfg) }.unwrap();
    let got = stream.clone_dtoh(&dy).unwrap();
    let mut want = vec![0f32; rows * dim];
    for i in 0..rows {
        let row = &x[i * dim..(i + 1) * dim];
        let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let s = 1.0 / (ms + eps).sqrt();
        for j in 0..dim {
            want[i * dim + j] = row[j] * s * w[j];
        }
    }
    assert_close(&got, &want, 1e-5, "rmsnorm");

    // SwiGLU.
    let n = (rows * dim) as i64;
    let up = random(rows * dim, 3);
    let f = function(&ctx, &arch, "activation", "swiglu_fwd");
    let dup = stream.clone_htod(&up).unwrap();
    let mut dout = stream.alloc_zeros::<f32>(rows * dim).unwrap();
    let mut b = stream.launch_builder(&f);
    b.arg(&dx).arg(&dup).arg(&mut dout).arg(&n);
    // SAFETY: swiglu_fwd(gate, up, out, n) with n-element buffers.
    unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.unwrap();
    let got = stream.clone_dtoh(&dout).unwrap();
    let want: Vec<f32> = x
        .iter()
        .zip(&up)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    assert_close(&got, &want, 1e-5, "swiglu");

    // AdamW, one step from zero moments.
    let g = random(rows * dim, 4);
    let f = function(&ctx, &arch, "adamw", "adamw_step");
    let mut dp = stream.clone_htod(&x).unwrap();
    let dg = stream.clone_htod(&g).unwrap();
    let mut dm = stream.alloc_zeros::<f32>(rows * dim).unwrap();
    let mut dv = stream.alloc_zeros::<f32>(rows * dim).unwrap();
    let null: u64 = 0;
    let (lr, b1, b2, e, wd, bc1, bc2, gs) = (
        1e-2f32, 0.9f32, 0.999f32, 1e-8f32, 0.1f32, 0.1f32, 0.001f32, 0.5f32,
    );
    let mut b = stream.launch_builder(&f);
    b.arg(&mut dp)
        .arg(&dg)
        .arg(&mut dm)
        .arg(&mut dv)
        .arg(&null)
        .arg(&n)
        .arg(&lr)
        .arg(&b1)
        .arg(&b2)
        .arg(&e)
        .arg(&wd)
        .arg(&bc1)
        .arg(&bc2)
        .arg(&gs);
    // SAFETY: adamw_step's signature; the bf16 output pointer is null (skipped).
    unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.unwrap();
    let got = stream.clone_dtoh(&dp).unwrap();
    let want: Vec<f32> = x
        .iter()
        .zip(&g)
        .map(|(&p, &gi)| {
            let gi = gi * gs;
            let (m, v) = ((1.0 - b1) * gi, (1.0 - b2) * gi * gi);
            let p = p - lr * wd * p;
            p - lr * (m / bc1) / ((v / bc2).sqrt() + e)
        })
        .collect();
    assert_close(&got, &want, 1e-5, "adamw");

    // RoPE: the backward is the transpose of the forward rotation, so fwd then bwd is x.
    let (heads, hd) = (3usize, 20usize);
    let xr = random(rows * heads * hd, 9);
    let positions: Vec<i32> = vec![0, 1, 7, 100, 4095];
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 10000f32.powf(-((2 * i) as f32) / hd as f32))
        .collect();
    let (fwd, bwd) = (
        function(&ctx, &arch, "rope", "rope_fwd"),
        function(&ctx, &arch, "rope", "rope_bwd"),
    );
    let mut dxr = stream.clone_htod(&xr).unwrap();
    let (dpos, dfreq) = (
        stream.clone_htod(&positions).unwrap(),
        stream.clone_htod(&inv_freq).unwrap(),
    );
    let (nt, nh, nd) = (rows as i32, heads as i32, hd as i32);
    for f in [&fwd, &bwd] {
        let mut b = stream.launch_builder(f);
        b.arg(&mut dxr)
            .arg(&dpos)
            .arg(&dfreq)
            .arg(&nt)
            .arg(&nh)
            .arg(&nd);
        // SAFETY: rope_fwd/rope_bwd(x, positions, inv_freq, n_tokens, heads, head_dim).
        unsafe { b.launch(cfg) }.unwrap();
    }
    assert_close(&stream.clone_dtoh(&dxr).unwrap(), &xr, 1e-5, "rope fwd∘bwd");

    // Log-softmax gather at temperature 0.7.
    let vocab = 1000usize;
    let logits = random(rows * vocab, 5);
    let targets: Vec<i32> = vec![3, 999, -1, 0, 500];
    let f = function(&ctx, &arch, "logsoftmax", "logsoftmax_gather_fwd");
    let dl = stream.clone_htod(&logits).unwrap();
    let dt = stream.clone_htod(&targets).unwrap();
    let mut dlp = stream.alloc_zeros::<f32>(rows).unwrap();
    let mut dlse = stream.alloc_zeros::<f32>(rows).unwrap();
    let mut dent = stream.alloc_zeros::<f32>(rows).unwrap();
    let (r, v, t) = (rows as i32, vocab as i32, 0.7f32);
    let mut b = stream.launch_builder(&f);
    b.arg(&dl)
        .arg(&dt)
        .arg(&mut dlp)
        .arg(&mut dlse)
        .arg(&mut dent)
        .arg(&r)
        .arg(&v)
        .arg(&t);
    // SAFETY: logsoftmax_gather_fwd's signature with rows×vocab logits.
    unsafe { b.launch(cfg) }.unwrap();
    let got = stream.clone_dtoh(&dlp).unwrap();
    let want: Vec<f32> = (0..rows)
        .map(|i| {
            let z: Vec<f64> = logits[i * vocab..(i + 1) * vocab]
                .iter()
                .map(|&l| l as f64 / 0.7)
                .collect();
            let mx = z.iter().cloned().fold(f64::MIN, f64::max);
            let lse = mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            match targets[i] {
                t if t >= 0 => (z[t as usize] - lse) as f32,
                _ => 0.0,
            }
        })
        .collect();
    assert_close(&got, &want, 1e-5, "logsoftmax gather");
}

#[test]
fn gpu_prefill_attention_matches_the_cpu() {
    let Some((ctx, arch)) = gpu("gpu_prefill_attention_matches_the_cpu") else {
        return;
    };
    let stream = ctx.default_stream();
    // Two sequences (lengths 21 and 7), 4 query heads over 2 key/value heads, head_dim 64.
    let lens = [21usize, 7];
    let (hq, hkv, d) = (4usize, 2usize, 64usize);
    let total: usize = lens.iter().sum();
    let q = random(total * hq * d, 6);
    let k = random(total * hkv * d, 7);
    let v = random(total * hkv * d, 8);
    let cu: Vec<i32> = vec![0, lens[0] as i32, total as i32];
    let (mut tile_seq, mut tile_start) = (Vec::new(), Vec::new());
    for (s, &len) in lens.iter().enumerate() {
        for start in (0..len).step_by(16) {
            tile_seq.push(s as i32);
            tile_start.push(start as i32);
        }
    }
    let f = function(&ctx, &arch, "attention", "attention_prefill_fwd");
    let (dq, dk, dv) = (
        stream.clone_htod(&q).unwrap(),
        stream.clone_htod(&k).unwrap(),
        stream.clone_htod(&v).unwrap(),
    );
    let (dcu, dts, dtst) = (
        stream.clone_htod(&cu).unwrap(),
        stream.clone_htod(&tile_seq).unwrap(),
        stream.clone_htod(&tile_start).unwrap(),
    );
    let mut dout = stream.alloc_zeros::<f32>(total * hq * d).unwrap();
    let mut dlse = stream.alloc_zeros::<f32>(total * hq).unwrap();
    let (a, b_, c) = (hq as i32, hkv as i32, d as i32);
    let scale = 1.0 / (d as f32).sqrt();
    let mut b = stream.launch_builder(&f);
    b.arg(&dq)
        .arg(&dk)
        .arg(&dv)
        .arg(&dcu)
        .arg(&dts)
        .arg(&dtst)
        .arg(&mut dout)
        .arg(&mut dlse)
        .arg(&a)
        .arg(&b_)
        .arg(&c)
        .arg(&scale);
    let shared = 4 * (4 * 16 * d + 16 * 16 + 3 * 16);
    let cfg = LaunchConfig {
        grid_dim: (tile_seq.len() as u32, hq as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    // SAFETY: attention_prefill_fwd's signature; shared memory as the kernel carves it.
    unsafe { b.launch(cfg) }.unwrap();
    let got = stream.clone_dtoh(&dout).unwrap();
    let mut want = vec![0f32; total * hq * d];
    for (s, &len) in lens.iter().enumerate() {
        let base = cu[s] as usize;
        for h in 0..hq {
            let kvh = h / (hq / hkv);
            for i in 0..len {
                let qi = &q[((base + i) * hq + h) * d..][..d];
                let scores: Vec<f32> = (0..=i)
                    .map(|j| {
                        let kj = &k[((base + j) * hkv + kvh) * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    let vj = &v[((base + j) * hkv + kvh) * d..][..d];
                    for t in 0..d {
                        want[((base + i) * hq + h) * d + t] += ej / z * vj[t];
                    }
                }
            }
        }
    }
    assert_close(&got, &want, 1e-4, "prefill attention");
}

// ---- A model on the GPU against the same model on the CPU. ----

/// Tolerance of the model-level comparisons: weights, activations and products are f32 on
/// both sides, but summation orders differ (cuBLAS vs the CPU's fixed order, f32 vs f64 norm
/// and softmax sums, RoPE angles in f32), so values agree to about 1e-5 relative on these tiny
/// models; 1e-3 (|gpu − cpu| ≤ 1e-3 · (1 + |cpu|)) leaves a wide margin.
const MODEL_TOL: f32 = 1e-3;

/// The model of fixture `name` on the CPU and on cuda:0, or None (printed) without a GPU.
fn cpu_and_gpu(test: &str, path: &std::path::Path) -> Option<(Model, Model)> {
    gpu(test)?;
    let cpu = Model::load(path, LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let gpu = Model::load(
        path,
        LoadOptions {
            device: Device::Cuda(0),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading {} on cuda:0: {e}", path.display()));
    assert_eq!(gpu.device(), Device::Cuda(0));
    assert_eq!(cpu.device(), Device::Cpu);
    Some((cpu, gpu))
}

/// Sequences of several lengths (1, 5, 23, 60) with ids spread over the vocabulary.
fn sequences(vocab: usize) -> Vec<Vec<u32>> {
    [1usize, 5, 23, 60]
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n)
                .map(|i| ((i * 37 + s * 101 + 3) % vocab) as u32)
                .collect()
        })
        .collect()
}

#[test]
fn gpu_model_logits_and_logprobs_match_the_cpu() {
    for name in ["llama-f32", "gpt2-f32", "qwen2-f32", "llama-bf16"] {
        let test = format!("gpu_model_logits_and_logprobs_match_the_cpu ({name})");
        let Some((cpu, gpu)) = cpu_and_gpu(&test, &fixture(name)) else {
            return;
        };
        let seqs = sequences(cpu.config().vocab_size);
        for seq in &seqs {
            let (want, got) = (cpu.logits(seq).unwrap(), gpu.logits(seq).unwrap());
            assert_close(
                &got,
                &want,
                MODEL_TOL,
                &format!("{name} logits (len {})", seq.len()),
            );
        }
        // Several sequences packed into one forward, at temperatures 1 and 0.7.
        for temperature in [1.0f32, 0.7] {
            let want = cpu.logprobs(&seqs, temperature).unwrap();
            let got = gpu.logprobs(&seqs, temperature).unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_close(
                    g,
                    w,
                    MODEL_TOL,
                    &format!("{name} log-probs seq {i} T={temperature}"),
                );
            }
        }
        eprintln!("{name}: logits and log-probs on cuda:0 match the cpu within {MODEL_TOL}");
    }
}

#[test]
fn gpu_model_from_a_quantized_gguf_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, tiny_llama_gguf().build()).unwrap();
    let Some((cpu, gpu)) = cpu_and_gpu("gpu_model_from_a_quantized_gguf_matches_the_cpu", &path)
    else {
        return;
    };
    let ids = [1u32, 5, 9, 30, 2, 7, 7, 11];
    assert_close(
        &gpu.logits(&ids).unwrap(),
        &cpu.logits(&ids).unwrap(),
        MODEL_TOL,
        "gguf logits",
    );
}

#[test]
fn gpu_greedy_generation_gives_the_cpu_tokens() {
    for name in ["llama-f32", "gpt2-f32", "qwen2-f32"] {
        let test = format!("gpu_greedy_generation_gives_the_cpu_tokens ({name})");
        let Some((cpu, gpu)) = cpu_and_gpu(&test, &fixture(name)) else {
            return;
        };
        let prompts: Vec<Vec<u32>> = sequences(cpu.config().vocab_size)[..3].to_vec();
        let params = SamplingParams {
            stop_token_ids: Some(vec![]),
            ..SamplingParams::greedy(8)
        };
        let want = cpu.generate(&prompts, &params, None).unwrap();
        let got = gpu.generate(&prompts, &params, None).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.tokens, w.tokens, "{name} prompt {i}: greedy tokens");
            assert_eq!(g.finish_reason, w.finish_reason, "{name} prompt {i}");
            assert_close(
                &g.logprobs,
                &w.logprobs,
                MODEL_TOL,
                &format!("{name} prompt {i} lp"),
            );
        }
        // With a repetition penalty the logits go to the host and the CPU sampler picks.
        let penalised = SamplingParams {
            repetition_penalty: 1.3,
            ..params.clone()
        };
        let want = cpu.generate(&prompts, &penalised, None).unwrap();
        let got = gpu.generate(&prompts, &penalised, None).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.tokens, w.tokens,
                "{name} prompt {i}: penalised greedy tokens"
            );
        }
        // And the generated log-probs are what `logprobs` computes for the same tokens.
        let plain = gpu.generate(&prompts, &params, None).unwrap();
        let full: Vec<Vec<u32>> = prompts
            .iter()
            .zip(&plain)
            .map(|(p, g)| p.iter().chain(&g.tokens).copied().collect())
            .collect();
        let scored = gpu.logprobs(&full, 1.0).unwrap();
        for ((p, g), s) in prompts.iter().zip(&plain).zip(&scored) {
            assert_close(
                &g.logprobs,
                &s[p.len() - 1..],
                MODEL_TOL,
                "generate vs logprobs",
            );
        }
    }
}

#[test]
fn gpu_sampled_generation_gives_valid_reproducible_tokens() {
    let Some((cpu, gpu)) = cpu_and_gpu(
        "gpu_sampled_generation_gives_valid_reproducible_tokens",
        &fixture("llama-f32"),
    ) else {
        return;
    };
    let vocab = cpu.config().vocab_size;
    let prompts: Vec<Vec<u32>> = sequences(vocab)[..3].to_vec();
    for (top_k, top_p) in [(0usize, 1.0f32), (20, 1.0), (0, 0.8), (50, 0.9)] {
        let params = SamplingParams {
            temperature: 0.9,
            top_k,
            top_p,
            seed: 7,
            stop_token_ids: Some(vec![]),
            ..SamplingParams::greedy(12)
        };
        let a = gpu.generate(&prompts, &params, None).unwrap();
        let b = gpu.generate(&prompts, &params, None).unwrap();
        for (g, h) in a.iter().zip(&b) {
            assert_eq!(g.tokens.len(), 12);
            assert!(
                g.tokens.iter().all(|&t| (t as usize) < vocab),
                "{:?}",
                g.tokens
            );
            assert!(
                g.logprobs.iter().all(|&l| l.is_finite() && l <= 1e-6),
                "{:?}",
                g.logprobs
            );
            assert_eq!(g.tokens, h.tokens, "same seed, same tokens");
        }
        // Each log-prob is the CPU's log-prob of the sampled token (at temperature 0.9).
        let full: Vec<Vec<u32>> = prompts
            .iter()
            .zip(&a)
            .map(|(p, g)| p.iter().chain(&g.tokens).copied().collect())
            .collect();
        let want = cpu.logprobs(&full, 0.9).unwrap();
        for ((p, g), w) in prompts.iter().zip(&a).zip(&want) {
            assert_close(
                &g.logprobs,
                &w[p.len() - 1..],
                MODEL_TOL,
                "sampled log-probs",
            );
        }
    }
    // A streaming callback sees every token and can stop a sequence.
    let mut seen = 0;
    let mut cb = |_seq: usize, _tok: u32, _lp: f32| {
        seen += 1;
        seen < 3
    };
    let params = SamplingParams {
        temperature: 1.0,
        stop_token_ids: Some(vec![]),
        ..SamplingParams::greedy(5)
    };
    let out = gpu.generate(&prompts[..1], &params, Some(&mut cb)).unwrap();
    assert_eq!(out[0].tokens.len(), 3);
    assert_eq!(out[0].finish_reason, rlx::FinishReason::Cancelled);
}

#[test]
fn gpu_model_refuses_stale_weights_clearly() {
    let Some((_cpu, gpu)) = cpu_and_gpu(
        "gpu_model_refuses_stale_weights_clearly",
        &fixture("llama-f32"),
    ) else {
        return;
    };
    // Weights changed on the host: the device copy is stale, so CUDA calls refuse until
    // `sync_device` copies them over.
    let mut m = gpu.clone();
    let _ = m.weights_mut();
    let e = m.logits(&[1, 2, 3]).unwrap_err().to_string();
    assert!(e.contains("changed on the host"), "{e}");
    m.sync_device().unwrap();
    assert!(m.logits(&[1, 2, 3]).is_ok());
    // The original is untouched, and a LoRA-free model's frozen reference still runs there.
    assert!(gpu.logits(&[1, 2, 3]).is_ok());
    assert!(gpu.without_lora().logits(&[1, 2, 3]).is_ok());
}

// ---- Training on the GPU against the CPU. ----

/// Tolerance of the gradient comparisons: per tensor, ‖g_gpu − g_cpu‖ ≤ 1e-3 · ‖g_cpu‖ (+1e-7
/// for all-but-zero tensors). The device sums in other orders (cuBLAS, atomics into dQ/dK/dV,
/// norm weights and embeddings, f32 softmax statistics where the CPU uses f64), which moves
/// gradients by about 1e-5 relative on these tiny models.
const GRAD_TOL: f64 = 1e-3;

fn norm(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt()
}

fn assert_grads_close(got: &rlx::model::Gradients, want: &rlx::model::Gradients, what: &str) {
    let (g, w) = (got.flat(), want.flat());
    assert_eq!(g.len(), w.len(), "{what}: tensor count");
    for (i, (g, w)) in g.iter().zip(&w).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: tensor {i} size");
        let diff: Vec<f32> = g.iter().zip(w.iter()).map(|(a, b)| a - b).collect();
        let (err, scale) = (norm(&diff), norm(w));
        assert!(
            err <= GRAD_TOL * scale + 1e-7,
            "{what}: tensor {i} ({} values): ‖gpu − cpu‖ = {err:e}, ‖cpu‖ = {scale:e}",
            w.len()
        );
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{what}: tensor {i} not finite"
        );
    }
}

/// Weights of two trainers' models after the same steps: AdamW moves each value by at most
/// ~lr per step, and a gradient value near 0 may change sign between the devices (flipping
/// that value's step), so: every |Δ| ≤ 2 steps' worth (4·lr), and all but 1% of values
/// within lr/10.
fn assert_weights_close(gpu: &Model, cpu: &Model, lr: f32, what: &str) {
    let (mut mc, mut mg) = (cpu.clone(), gpu.clone());
    let (pc, pg) = (
        mc.weights_mut().named_params_mut(),
        mg.weights_mut().named_params_mut(),
    );
    assert_eq!(pc.len(), pg.len());
    let (mut total, mut far) = (0usize, 0usize);
    for ((name_c, c, _), (name_g, g, _)) in pc.iter().zip(pg.iter()) {
        assert_eq!(name_c, name_g);
        for (a, b) in g.as_slice().iter().zip(c.as_slice()) {
            let d = (a - b).abs();
            assert!(d <= 4.0 * lr, "{what} {name_c}: {a} vs {b}");
            total += 1;
            far += usize::from(d > lr / 10.0);
        }
    }
    assert!(
        far * 100 <= total,
        "{what}: {far} of {total} weights differ by > lr/10"
    );
}

/// Packed training sequences: lengths 5, 23 and 40 (attention tiles of 16 rows: one partial,
/// several, a sequence ending mid-tile), every third token unselected.
fn training_batch(vocab: usize) -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let seqs: Vec<Vec<u32>> = [5usize, 23, 40]
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n)
                .map(|i| ((i * 53 + s * 71 + 5) % vocab) as u32)
                .collect()
        })
        .collect();
    let masks = seqs
        .iter()
        .map(|s| (0..s.len()).map(|i| i > 0 && i % 3 != 0).collect())
        .collect();
    (seqs, masks)
}

#[test]
fn gpu_gradients_match_the_cpu() {
    for name in ["llama-f32", "gpt2-f32", "qwen2-f32"] {
        let test = format!("gpu_gradients_match_the_cpu ({name})");
        let Some((cpu, gpu)) = cpu_and_gpu(&test, &fixture(name)) else {
            return;
        };
        let (seqs, masks) = training_batch(cpu.config().vocab_size);
        // SFT: mean cross-entropy.
        let (want_loss, want) = cpu.sft_gradients(&seqs, &masks).unwrap();
        let (got_loss, got) = gpu.sft_gradients(&seqs, &masks).unwrap();
        assert!(
            (got_loss - want_loss).abs() <= 1e-4 * (1.0 + want_loss.abs()),
            "{name}: loss {got_loss} vs {want_loss}"
        );
        assert_grads_close(&got, &want, &format!("{name} SFT"));
        // A log-prob objective whose per-token weights differ (DPO/GRPO shapes): the
        // gradient of Σ sin(i + 1) · logp_i, with the log-probs it saw checked too.
        let mut seen: Vec<Vec<Vec<f64>>> = Vec::new();
        let mut objective = |logps: &[Vec<f64>]| {
            seen.push(logps.to_vec());
            let d: Vec<Vec<f64>> = logps
                .iter()
                .map(|l| (0..l.len()).map(|i| ((i + 1) as f64).sin()).collect())
                .collect();
            let loss = logps
                .iter()
                .zip(&d)
                .map(|(l, d)| l.iter().zip(d).map(|(a, b)| a * b).sum::<f64>())
                .sum();
            Ok((loss, d))
        };
        let (_, want) = cpu
            .logprob_objective_gradients(&seqs, &masks, &mut objective)
            .unwrap();
        let (_, got) = gpu
            .logprob_objective_gradients(&seqs, &masks, &mut objective)
            .unwrap();
        assert_grads_close(&got, &want, &format!("{name} weighted log-probs"));
        let (cpu_lp, gpu_lp) = (&seen[0], &seen[1]);
        for (c, g) in cpu_lp.iter().zip(gpu_lp) {
            let (c, g): (Vec<f32>, Vec<f32>) = (
                c.iter().map(|&v| v as f32).collect(),
                g.iter().map(|&v| v as f32).collect(),
            );
            assert_close(&g, &c, MODEL_TOL, &format!("{name} objective log-probs"));
        }
        // Gradient checkpointing on the device (each layer's tape recomputed from its input
        // in the backward) gives the same gradients.
        let mut ckpt = gpu.clone();
        ckpt.set_gradient_checkpointing(true);
        let (ckpt_loss, got) = ckpt.sft_gradients(&seqs, &masks).unwrap();
        let (want_loss, want) = cpu.sft_gradients(&seqs, &masks).unwrap();
        assert!(
            (ckpt_loss - want_loss).abs() <= 1e-4 * (1.0 + want_loss.abs()),
            "{name}: checkpointed loss {ckpt_loss} vs {want_loss}"
        );
        assert_grads_close(&got, &want, &format!("{name} SFT, checkpointed"));
        eprintln!("{name}: gradients on cuda:0 match the cpu within {GRAD_TOL} (relative norm)");
    }
}

#[test]
fn gpu_sft_trainer_steps_match_the_cpu() {
    for name in ["llama-f32", "gpt2-f32"] {
        let test = format!("gpu_sft_trainer_steps_match_the_cpu ({name})");
        let Some((cpu, gpu)) = cpu_and_gpu(&test, &fixture(name)) else {
            return;
        };
        let (seqs, masks) = training_batch(cpu.config().vocab_size);
        let probe: Vec<u32> = seqs[2].clone();
        let before = gpu.logits(&probe).unwrap();
        let lr = 1e-3f32;
        let config = TrainConfig {
            lr,
            weight_decay: 0.01,
            ..Default::default()
        };
        // The GPU trainer's model shares its device copy with `gpu` (a clone): the first sync
        // gives the trainer its own, and `gpu` keeps the old weights.
        let mut on_cpu = Trainer::new(cpu, config.clone()).unwrap();
        let mut on_gpu = Trainer::new(gpu.clone(), config).unwrap();
        for step in 0..2 {
            let want = on_cpu.sft_step(&seqs, &masks).unwrap();
            let got = on_gpu.sft_step(&seqs, &masks).unwrap();
            assert!(!got.skipped && !want.skipped);
            assert!(
                (got.loss - want.loss).abs() <= 1e-4 * (1.0 + want.loss.abs()),
                "{name} step {step}: loss {} vs {}",
                got.loss,
                want.loss
            );
            assert!(
                (got.grad_norm - want.grad_norm).abs() <= GRAD_TOL * want.grad_norm,
                "{name} step {step}: grad norm {} vs {}",
                got.grad_norm,
                want.grad_norm
            );
        }
        assert_weights_close(on_gpu.model(), on_cpu.model(), lr, name);
        // The device copy was refreshed after each step: the GPU model's logits are the
        // trained CPU model's, and they moved.
        let after = on_gpu.model().logits(&probe).unwrap();
        let want = on_cpu.model().logits(&probe).unwrap();
        assert_close(
            &after,
            &want,
            MODEL_TOL,
            &format!("{name} logits after training"),
        );
        assert!(
            after.iter().zip(&before).any(|(a, b)| (a - b).abs() > 1e-4),
            "{name}: the device weights did not change"
        );
        // The clone the trainer started from still has the old weights on the device.
        assert_close(
            &gpu.logits(&probe).unwrap(),
            &before,
            1e-6,
            &format!("{name} untouched clone"),
        );
        eprintln!("{name}: 2 SFT steps on cuda:0 match the cpu");
    }
}

/// An objective of log-probs, entropies and values (PPO's shape): Σ sin(i+1)·logp_i
/// + 0.1·Σ H_i + ½·Σ (v_i − 1)², with the outputs it saw recorded.
fn ppo_like_objective(
    seen: &mut Vec<rlx::model::TokenOutputs>,
) -> impl FnMut(&rlx::model::TokenOutputs) -> rlx::Result<(f64, rlx::model::TokenOutputGrads)> + '_
{
    move |out: &rlx::model::TokenOutputs| {
        seen.push(out.clone());
        let weights =
            |l: &Vec<f64>| -> Vec<f64> { (0..l.len()).map(|i| ((i + 1) as f64).sin()).collect() };
        let values = out.value.clone().unwrap_or_default();
        let mut loss = 0.0;
        for (l, e) in out.logp.iter().zip(&out.entropy) {
            loss += l.iter().zip(weights(l)).map(|(a, b)| a * b).sum::<f64>();
            loss += 0.1 * e.iter().sum::<f64>();
        }
        for v in &values {
            loss += 0.5 * v.iter().map(|x| (x - 1.0) * (x - 1.0)).sum::<f64>();
        }
        Ok((
            loss,
            rlx::model::TokenOutputGrads {
                logp: out.logp.iter().map(weights).collect(),
                entropy: Some(out.entropy.iter().map(|e| vec![0.1; e.len()]).collect()),
                value: out.value.as_ref().map(|vs| {
                    vs.iter()
                        .map(|v| v.iter().map(|x| x - 1.0).collect())
                        .collect()
                }),
            },
        ))
    }
}

#[test]
fn gpu_value_head_entropy_and_reward_model_match_the_cpu() {
    for name in ["llama-f32", "gpt2-f32"] {
        let test = format!("gpu_value_head_entropy_and_reward_model_match_the_cpu ({name})");
        let Some((mut cpu, mut gpu)) = cpu_and_gpu(&test, &fixture(name)) else {
            return;
        };
        let (seqs, masks) = training_batch(cpu.config().vocab_size);
        // PPO's policy: a value head on the trunk, an entropy bonus.
        cpu.add_value_head(7);
        gpu.add_value_head(7);
        gpu.sync_device().unwrap();
        let (want_v, got_v) = (cpu.values(&seqs).unwrap(), gpu.values(&seqs).unwrap());
        for (w, g) in want_v.iter().zip(&got_v) {
            assert_close(g, w, MODEL_TOL, &format!("{name} values"));
        }
        let mut seen = Vec::new();
        let (want_loss, want) = cpu
            .token_objective_gradients(&seqs, &masks, &mut ppo_like_objective(&mut seen))
            .unwrap();
        let (got_loss, got) = gpu
            .token_objective_gradients(&seqs, &masks, &mut ppo_like_objective(&mut seen))
            .unwrap();
        assert!(
            (got_loss - want_loss).abs() <= 1e-4 * (1.0 + want_loss.abs()),
            "{name}: loss {got_loss} vs {want_loss}"
        );
        assert!(got.value.is_some() && want.value.is_some());
        assert_grads_close(&got, &want, &format!("{name} logp + entropy + value"));
        let f32s = |x: &[Vec<f64>]| -> Vec<f32> { x.iter().flatten().map(|&v| v as f32).collect() };
        assert_close(
            &f32s(&seen[1].entropy),
            &f32s(&seen[0].entropy),
            MODEL_TOL,
            &format!("{name} entropies"),
        );
        assert_close(
            &f32s(seen[1].value.as_deref().unwrap()),
            &f32s(seen[0].value.as_deref().unwrap()),
            MODEL_TOL,
            &format!("{name} values seen by the objective"),
        );

        // The reward model: a score head at the last token, the pairwise loss.
        let chosen = seqs.clone();
        let Some((mut cpu, mut gpu)) = cpu_and_gpu(&test, &fixture(name)) else {
            return;
        };
        cpu.add_score_head(3);
        gpu.add_score_head(3);
        gpu.sync_device().unwrap();
        let rejected: Vec<Vec<u32>> = chosen
            .iter()
            .map(|s| s.iter().rev().copied().collect())
            .collect();
        let (want_s, got_s) = (
            cpu.reward_scores(&chosen).unwrap(),
            gpu.reward_scores(&chosen).unwrap(),
        );
        assert_close(&got_s, &want_s, MODEL_TOL, &format!("{name} reward scores"));
        let (want_p, want) = cpu.reward_pair_gradients(&chosen, &rejected, 0.1).unwrap();
        let (got_p, got) = gpu.reward_pair_gradients(&chosen, &rejected, 0.1).unwrap();
        assert!(
            (got_p.loss - want_p.loss).abs() <= 1e-4 * (1.0 + want_p.loss.abs()),
            "{name}: pair loss {} vs {}",
            got_p.loss,
            want_p.loss
        );
        assert_eq!(got_p.accuracy, want_p.accuracy);
        assert!(got.score.is_some());
        assert_grads_close(&got, &want, &format!("{name} reward pairs"));
        // A reward-model trainer runs on the device too.
        let mut rm = Trainer::new(gpu, TrainConfig::default()).unwrap();
        let (step, _) = rm.rm_step(&chosen, &rejected, 0.0).unwrap();
        assert!(!step.skipped && step.loss.is_finite());
        eprintln!("{name}: value head, entropy and reward model on cuda:0 match the cpu");
    }
}

#[test]
fn gpu_trainer_accumulates_checkpoints_and_resumes_like_the_cpu() {
    let name = "llama-f32";
    let test = "gpu_trainer_accumulates_checkpoints_and_resumes_like_the_cpu";
    let Some((cpu, gpu)) = cpu_and_gpu(test, &fixture(name)) else {
        return;
    };
    let (seqs, masks) = training_batch(cpu.config().vocab_size);
    let lr = 1e-3f32;
    let config = TrainConfig {
        lr,
        weight_decay: 0.01,
        max_grad_norm: Some(0.5),
        ..Default::default()
    };
    let mut on_cpu = Trainer::new(cpu, config.clone()).unwrap();
    let mut on_gpu = Trainer::new(gpu, config).unwrap();
    // Two micro-batches weighted by their selected-token counts: the first through
    // `gradients_with` (kept on the device), the second computed on the model outside it
    // (copied to the host, then back to the device by `accumulate`).
    let tokens = |m: &[Vec<bool>]| m.iter().flatten().filter(|&&b| b).count() as f64;
    let (a, b) = ((&seqs[..1], &masks[..1]), (&seqs[1..], &masks[1..]));
    for trainer in [&mut on_cpu, &mut on_gpu] {
        let (loss, grads) = trainer
            .gradients_with(|m| m.sft_gradients(a.0, a.1))
            .unwrap();
        trainer.accumulate(loss, grads, tokens(a.1)).unwrap();
        let (loss, grads) = trainer.model().sft_gradients(b.0, b.1).unwrap();
        trainer.accumulate(loss, grads, tokens(b.1)).unwrap();
    }
    let (want, got) = (on_cpu.step().unwrap(), on_gpu.step().unwrap());
    assert!(
        (got.loss - want.loss).abs() <= 1e-4 * (1.0 + want.loss.abs()),
        "accumulated loss {} vs {}",
        got.loss,
        want.loss
    );
    assert!(
        (got.grad_norm - want.grad_norm).abs() <= GRAD_TOL * want.grad_norm,
        "accumulated grad norm {} vs {}",
        got.grad_norm,
        want.grad_norm
    );
    assert_weights_close(on_gpu.model(), on_cpu.model(), lr, "after accumulation");
    // A checkpoint of the device trainer (moments copied from the device), resumed on the
    // device (moments copied back): the next step still matches the CPU's.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck");
    on_gpu
        .save_checkpoint(&path, &serde_json::json!({"k": 1}))
        .unwrap();
    let (mut resumed, extra) = Trainer::resume(
        &path,
        LoadOptions {
            device: Device::Cuda(0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(extra["k"], 1);
    assert_eq!(resumed.step_count(), 1);
    let want = on_cpu.sft_step(&seqs, &masks).unwrap();
    let got = resumed.sft_step(&seqs, &masks).unwrap();
    assert!(
        (got.grad_norm - want.grad_norm).abs() <= GRAD_TOL * want.grad_norm,
        "resumed grad norm {} vs {}",
        got.grad_norm,
        want.grad_norm
    );
    assert_weights_close(resumed.model(), on_cpu.model(), lr, "after resuming");
    // (`assert_weights_close` reads the host copies, which each device step refreshes.) The
    // device weights give the CPU trainer's logits too.
    let probe = &seqs[2];
    assert_close(
        &resumed.model().logits(probe).unwrap(),
        &on_cpu.model().logits(probe).unwrap(),
        MODEL_TOL,
        "logits after resuming",
    );
    eprintln!("{name}: accumulation, checkpoint and resume on cuda:0 match the cpu");
}

/// bf16 storage against the CPU: per sequence, ‖gpu − cpu‖ ≤ tol · ‖cpu‖ over its logits.
/// Against the f32 model the weights' and KV cache's rounding to bf16 (2⁻⁹ relative each)
/// moves logits by about 1e-2 relative on these models: tolerance 5e-2. Against a CPU model
/// whose matrices were rounded to bf16 the same way, only the KV cache's rounding and the
/// summation order differ: 2e-2.
const BF16_TOL_F32_MODEL: f64 = 5e-2;
const BF16_TOL_ROUNDED_MODEL: f64 = 2e-2;

fn assert_rel_norm(got: &[f32], want: &[f32], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let diff: Vec<f32> = got.iter().zip(want).map(|(a, b)| a - b).collect();
    let (err, scale) = (norm(&diff), norm(want));
    assert!(
        err <= tol * scale && got.iter().all(|v| v.is_finite()),
        "{what}: ‖gpu − cpu‖ = {err:e}, ‖cpu‖ = {scale:e} (tolerance {tol})"
    );
}

#[test]
fn gpu_bf16_storage_matches_the_cpu_within_bf16_tolerance() {
    for name in ["llama-f32", "gpt2-f32"] {
        let test = format!("gpu_bf16_storage_matches_the_cpu_within_bf16_tolerance ({name})");
        if gpu(&test).is_none() {
            return;
        }
        let path = fixture(name);
        let cpu = Model::load(&path, LoadOptions::default()).unwrap();
        let bf16 = Model::load(
            &path,
            LoadOptions {
                device: Device::Cuda(0),
                device_dtype: rlx::DeviceDtype::Bf16,
                ..Default::default()
            },
        )
        .unwrap();
        // The CPU model with the matrices the device stores in bf16 rounded the same way.
        let mut rounded = cpu.clone();
        for (n, t, decay) in rounded.weights_mut().named_params_mut() {
            if decay || n == "tok_emb" || n == "pos_emb" {
                for v in t.as_mut_slice() {
                    *v = half::bf16::from_f32(*v).to_f32();
                }
            }
        }
        for seq in sequences(cpu.config().vocab_size) {
            let got = bf16.logits(&seq).unwrap();
            let what = format!("{name} bf16 logits of {} tokens", seq.len());
            assert_rel_norm(&got, &cpu.logits(&seq).unwrap(), BF16_TOL_F32_MODEL, &what);
            let want = rounded.logits(&seq).unwrap();
            assert_rel_norm(&got, &want, BF16_TOL_ROUNDED_MODEL, &what);
        }
        // Generation on the bf16 model: its log-probs are its own scored log-probs.
        let prompts: Vec<Vec<u32>> = sequences(cpu.config().vocab_size)[1..3].to_vec();
        let out = bf16
            .generate(&prompts, &SamplingParams::greedy(6), None)
            .unwrap();
        for (p, g) in prompts.iter().zip(&out) {
            assert_eq!(g.tokens.len(), 6);
            let full: Vec<u32> = p.iter().chain(&g.tokens).copied().collect();
            let scored = bf16.logprobs(&[full], 1.0).unwrap();
            assert_close(
                &g.logprobs,
                &scored[0][p.len() - 1..],
                BF16_TOL_ROUNDED_MODEL as f32,
                &format!("{name} bf16 generated log-probs"),
            );
        }
        // Gradients need f32 device weights: a clear error; a Trainer trains an f32 copy and
        // leaves the bf16 model as it was.
        let (seqs, masks) = training_batch(cpu.config().vocab_size);
        let e = bf16.sft_gradients(&seqs, &masks).unwrap_err().to_string();
        assert!(e.contains("device_dtype bf16"), "{e}");
        let before = bf16.logits(&seqs[2]).unwrap();
        let mut trainer = Trainer::new(bf16.clone(), TrainConfig::default()).unwrap();
        let step = trainer.sft_step(&seqs, &masks).unwrap();
        assert!(!step.skipped && step.loss.is_finite());
        assert_close(
            &bf16.logits(&seqs[2]).unwrap(),
            &before,
            0.0,
            &format!("{name} bf16 model untouched by training its clone"),
        );
        eprintln!("{name}: bf16 storage on cuda:0 within the stated tolerances");
    }
}

/// Gives every LoRA `B` deterministic non-zero values (a fresh adapter's `B` is 0, which
/// would hide the adapter's forward and most of its backward).
fn perturb_lora_b(model: &mut Model) {
    for (i, layer) in model.weights_mut().layers.iter_mut().enumerate() {
        for (j, lin) in layer.linears_mut().into_iter().enumerate() {
            if let Some(ad) = lin.lora.as_mut() {
                for (k, v) in ad.b.as_mut_slice().iter_mut().enumerate() {
                    *v = 0.02 * ((i * 31 + j * 7 + k) as f32 * 0.37).sin();
                }
            }
        }
    }
}

#[test]
fn gpu_lora_matches_the_cpu() {
    for name in ["llama-f32", "gpt2-f32"] {
        let test = format!("gpu_lora_matches_the_cpu ({name})");
        let Some((mut cpu, mut gpu)) = cpu_and_gpu(&test, &fixture(name)) else {
            return;
        };
        let base = gpu.clone();
        let mut config = rlx::LoraConfig::new(4, 8.0);
        config.target_modules = vec!["all-linear".into()];
        for m in [&mut cpu, &mut gpu] {
            m.attach_lora(&config).unwrap();
            perturb_lora_b(m);
        }
        gpu.sync_device().unwrap();
        let (seqs, masks) = training_batch(cpu.config().vocab_size);
        // Forward with the adapters.
        for seq in &seqs {
            assert_close(
                &gpu.logits(seq).unwrap(),
                &cpu.logits(seq).unwrap(),
                MODEL_TOL,
                &format!("{name} LoRA logits"),
            );
        }
        // Gradients of the adapters only (the base is frozen on both).
        let (_, want) = cpu.sft_gradients(&seqs, &masks).unwrap();
        let (_, got) = gpu.sft_gradients(&seqs, &masks).unwrap();
        assert!(got.base_frozen() && want.base_frozen());
        assert_grads_close(&got, &want, &format!("{name} LoRA gradients"));
        // Trainer steps (adapters' AdamW on the device) against the CPU's.
        let lr = 1e-3;
        let tc = TrainConfig {
            lr,
            ..Default::default()
        };
        let mut on_cpu = Trainer::new(cpu.clone(), tc.clone()).unwrap();
        let mut on_gpu = Trainer::new(gpu.clone(), tc).unwrap();
        for _ in 0..2 {
            let (w, g) = (
                on_cpu.sft_step(&seqs, &masks).unwrap(),
                on_gpu.sft_step(&seqs, &masks).unwrap(),
            );
            assert!(
                (g.grad_norm - w.grad_norm).abs() <= GRAD_TOL * w.grad_norm,
                "{name}: LoRA grad norm {} vs {}",
                g.grad_norm,
                w.grad_norm
            );
        }
        // Adapter gradients computed outside the trainer (copied to the host, then uploaded
        // by `accumulate`) step the same way.
        let (lc, gc) = (
            on_cpu.model().sft_gradients(&seqs, &masks).unwrap(),
            on_gpu.model().sft_gradients(&seqs, &masks).unwrap(),
        );
        on_cpu.accumulate(lc.0, lc.1, 1.0).unwrap();
        on_gpu.accumulate(gc.0, gc.1, 1.0).unwrap();
        let (w, g) = (on_cpu.step().unwrap(), on_gpu.step().unwrap());
        assert!(
            (g.grad_norm - w.grad_norm).abs() <= GRAD_TOL * w.grad_norm,
            "{name}: LoRA host-gradient step norm {} vs {}",
            g.grad_norm,
            w.grad_norm
        );
        assert_weights_close(on_gpu.model(), on_cpu.model(), lr, &format!("{name} LoRA"));
        // The frozen reference is the base model; merging keeps the outputs.
        let probe = &seqs[2];
        assert_close(
            &on_gpu.model().without_lora().logits(probe).unwrap(),
            &base.logits(probe).unwrap(),
            MODEL_TOL,
            &format!("{name} reference without adapters"),
        );
        let mut merged = on_gpu.model().clone();
        let before = merged.logits(probe).unwrap();
        merged.merge_lora().unwrap();
        merged.sync_device().unwrap();
        assert_close(
            &merged.logits(probe).unwrap(),
            &before,
            MODEL_TOL,
            &format!("{name} merged adapters"),
        );
        eprintln!("{name}: LoRA on cuda:0 matches the cpu");
    }
}
