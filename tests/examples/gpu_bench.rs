//! GPU timings of rlx for `scripts/gpu-check.sh run`, on a SmolLM2-135M-shaped Llama with
//! random weights (30 layers, 576 wide, 9 query / 3 KV heads of 64, MLP 1536, vocabulary
//! 49152, tied head, f32):
//!
//! - decode tokens/s at batch 1 and batch 32 (16-token prompts; greedy; the time of 129 new
//!   tokens minus the time of 1, so prefill is excluded),
//! - prefill tokens/s of one 512-token prompt (first token included),
//! - log-prob tokens/s of 8 sequences × 256 tokens,
//! - the four above again with `device_dtype` bf16 (bf16 matrices and KV cache, f32 sums),
//! - training tokens/s: one SFT step (mean cross-entropy over every next token; gradients,
//!   global-norm clipping and AdamW on the device, the new weights copied to the host) on 4
//!   sequences × 256 tokens; the best of 3 steps after one warm-up step.
//!
//! Writes into OUT (default `/tmp/rlx-gpu-bench`): `model/` (the checkpoint, which
//! `benches/gpu_torch.py` loads into its PyTorch reference), `results.json`, and
//! `logits.bin` (f32 little-endian logits of one 64-token sequence, for the cross-check).
//!
//!     gpu_bench [OUT] [cuda:N]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use rlx::{Device, LoadOptions, Model, SamplingParams, TrainConfig, Trainer};
use serde_json::json;

const HIDDEN: usize = 576;
const MLP: usize = 1536;
const LAYERS: usize = 30;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 49152;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Token `i` of sequence `s`: spread over the vocabulary, deterministic.
fn token(i: usize, s: usize) -> u32 {
    ((i.wrapping_mul(2654435761) >> 7).wrapping_add(s * 7919) % VOCAB) as u32
}

fn tensors() -> Vec<(String, Vec<usize>)> {
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN]),
        ("model.norm.weight".to_string(), vec![HIDDEN]),
    ];
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![HIDDEN]),
            ("post_attention_layernorm.weight", vec![HIDDEN]),
            ("self_attn.q_proj.weight", vec![q, HIDDEN]),
            ("self_attn.k_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.v_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.o_proj.weight", vec![HIDDEN, q]),
            ("mlp.gate_proj.weight", vec![MLP, HIDDEN]),
            ("mlp.up_proj.weight", vec![MLP, HIDDEN]),
            ("mlp.down_proj.weight", vec![HIDDEN, MLP]),
        ] {
            t.push((format!("{p}.{n}"), s));
        }
    }
    t
}

/// config.json + model.safetensors (f32; norms 1 + noise, other weights uniform with standard
/// deviation 0.02, as transformers initialises them), written tensor by tensor.
fn write_checkpoint(dir: &Path) -> Res<()> {
    std::fs::create_dir_all(dir)?;
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "vocab_size": VOCAB, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "tie_word_embeddings": true, "hidden_act": "silu",
        "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    let list = tensors();
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &list {
        let bytes = 4 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = serde_json::Value::Object(header).to_string().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let file = std::fs::File::create(dir.join("model.safetensors"))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    w.write_all(&(head.len() as u64).to_le_bytes())?;
    w.write_all(&head)?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let a = 0.02f32 * 3f32.sqrt();
    for (name, shape) in &list {
        let n: usize = shape.iter().product();
        let norm = name.ends_with("norm.weight");
        let mut buf = Vec::with_capacity(4 * n);
        for _ in 0..n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            let v = if norm { 1.0 + 0.1 * u } else { a * u };
            buf.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&buf)?;
    }
    w.flush()?;
    Ok(())
}

/// The best wall time of `n` runs of `f`, in seconds.
fn best_of<T>(n: usize, mut f: impl FnMut() -> rlx::Result<T>) -> Res<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        stop_token_ids: Some(vec![]),
        ..SamplingParams::greedy(n)
    }
}

/// Decode tokens/s at batch 1 and 32, prefill tokens/s of 512, log-prob tokens/s of 8 × 256.
fn inference(model: &Model, what: &str) -> Res<(f64, f64, f64, f64)> {
    // Decode: time of 129 new tokens minus time of 1 (the prefill and first token).
    let new = 128usize;
    let decode = |batch: usize| -> Res<f64> {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|b| (0..16).map(|i| token(i, b)).collect())
            .collect();
        model.generate(&prompts, &greedy(4), None)?;
        let one = best_of(3, || model.generate(&prompts, &greedy(1), None))?;
        let many = best_of(3, || model.generate(&prompts, &greedy(new + 1), None))?;
        Ok((batch * new) as f64 / (many - one).max(1e-9))
    };
    let decode_b1 = decode(1)?;
    let decode_b32 = decode(32)?;
    eprintln!(
        "gpu_bench {what}: decode {decode_b1:.0} tok/s (batch 1), {decode_b32:.0} tok/s (batch 32)"
    );
    let long: Vec<u32> = (0..512).map(|i| token(i, 2)).collect();
    model.generate(std::slice::from_ref(&long), &greedy(1), None)?;
    let prefill = 512.0
        / best_of(5, || {
            model.generate(std::slice::from_ref(&long), &greedy(1), None)
        })?;
    let seqs: Vec<Vec<u32>> = (0..8)
        .map(|s| (0..256).map(|i| token(i, 10 + s)).collect())
        .collect();
    model.logprobs(&seqs, 1.0)?;
    let logprobs = 2048.0 / best_of(5, || model.logprobs(&seqs, 1.0))?;
    eprintln!(
        "gpu_bench {what}: prefill 512: {prefill:.0} tok/s; log-probs 8×256: {logprobs:.0} tok/s"
    );
    Ok((decode_b1, decode_b32, prefill, logprobs))
}

fn run() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = PathBuf::from(
        args.get(1)
            .cloned()
            .unwrap_or_else(|| "/tmp/rlx-gpu-bench".into()),
    );
    let device: Device = match args.get(2) {
        Some(d) => d.parse()?,
        None => Device::Cuda(0),
    };
    std::fs::create_dir_all(&out)?;
    let model_dir = out.join("model");
    let t = Instant::now();
    write_checkpoint(&model_dir)?;
    eprintln!(
        "gpu_bench: wrote the checkpoint in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let model = Model::load(
        &model_dir,
        LoadOptions {
            device,
            ..Default::default()
        },
    )?;
    let load_s = t.elapsed().as_secs_f64();
    eprintln!("gpu_bench: loaded on {device} in {load_s:.1} s");

    // Cross-check material for the PyTorch side.
    let seq: Vec<u32> = (0..64).map(|i| token(i, 1)).collect();
    let logits = model.logits(&seq)?;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out.join("logits.bin"), bytes)?;
    let prompt: Vec<u32> = (0..16).map(|i| token(i, 0)).collect();
    let greedy_tokens = model.generate(std::slice::from_ref(&prompt), &greedy(32), None)?[0]
        .tokens
        .clone();

    let (decode_b1, decode_b32, prefill, logprobs) = inference(&model, "f32")?;
    // The same with bf16 storage (matrices and KV cache; f32 sums).
    let bf16_model = Model::load(
        &model_dir,
        LoadOptions {
            device,
            device_dtype: rlx::DeviceDtype::Bf16,
            ..Default::default()
        },
    )?;
    let bf16 = inference(&bf16_model, "bf16")?;
    drop(bf16_model);

    // Training: one SFT step over 4 × 256 tokens (the trainer takes the model; last).
    let train_seqs: Vec<Vec<u32>> = (0..4)
        .map(|s| (0..256).map(|i| token(i, 20 + s)).collect())
        .collect();
    let masks: Vec<Vec<bool>> = train_seqs
        .iter()
        .map(|s| (0..s.len()).map(|i| i > 0).collect())
        .collect();
    let config = TrainConfig {
        lr: 1e-5,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, config)?;
    let first = trainer.sft_step(&train_seqs, &masks)?;
    let step_s = best_of(3, || trainer.sft_step(&train_seqs, &masks))?;
    let train = 1024.0 / step_s;
    eprintln!(
        "gpu_bench: SFT step 4×256: {step_s:.3} s ({train:.0} tok/s); first loss {:.5}",
        first.loss
    );

    let results = json!({
        "device": device.to_string(),
        "load_s": load_s,
        "decode_b1_tok_s": decode_b1,
        "decode_b32_tok_s": decode_b32,
        "prefill512_tok_s": prefill,
        "logprobs_8x256_tok_s": logprobs,
        "train_sft_4x256_tok_s": train,
        "train_step_s": step_s,
        "bf16_decode_b1_tok_s": bf16.0,
        "bf16_decode_b32_tok_s": bf16.1,
        "bf16_prefill512_tok_s": bf16.2,
        "bf16_logprobs_8x256_tok_s": bf16.3,
        "train_first_loss": first.loss,
        "train_tokens": train_seqs,
        "logits_tokens": seq,
        "greedy_prompt": prompt,
        "greedy_tokens": greedy_tokens,
    });
    std::fs::write(out.join("results.json"), results.to_string())?;
    println!("{results}");
    Ok(())
}
