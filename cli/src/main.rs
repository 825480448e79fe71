//! `rlx`: the engine from the shell. Output goes to stdout; errors go to stderr with a non-zero
//! exit code.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use rlx::{LoadOptions, Message, Model, SamplingParams, TextStream};

mod demo;
mod plot;
mod train;

#[derive(Parser)]
#[command(
    name = "rlx",
    version,
    about = "Run and fine-tune decoder language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt; streams only the new text to stdout (no chat template).
    Generate(GenerateArgs),
    /// Print per-token log-probs of a text as JSON: {"tokens": [...], "logprobs": [...]}.
    Logprobs(LogprobsArgs),
    /// Chat with an instruct model: one answer for QUESTION, or a conversation on stdin
    /// (/reset clears it, /quit or Ctrl-D ends it).
    Chat(ChatArgs),
    /// Write a GGUF (or any Llama-family model rlx loads) as an HF folder that transformers loads.
    Convert(ConvertArgs),
    /// Time prefill and decode on a model, or (with --train-batch) SFT training steps; prints
    /// one JSON object.
    Bench(BenchArgs),
    /// Supervised fine-tuning on demonstrations: {"prompt","response"} or {"messages"} JSONL.
    Sft(train::SupervisedArgs),
    /// Train a reward model on preferences: {"prompt","chosen","rejected"} or
    /// {"prompt","responses":[best..worst]} JSONL.
    Rm(train::SupervisedArgs),
    /// Direct preference optimisation on the same data as `rm`.
    Dpo(train::SupervisedArgs),
    /// PPO against a reward model with a KL leash to the starting model: {"prompt"} JSONL.
    Ppo(train::OnPolicyArgs),
    /// GRPO: k answers per prompt, group-normalised rewards: {"prompt"} JSONL.
    Grpo(train::OnPolicyArgs),
    /// The whole recipe on a small task with a programmatic labeller: SFT → RM → PPO, then
    /// DPO and GRPO, and a before/after table on held-out prompts.
    Demo(demo::DemoArgs),
    /// Draw PNG charts of a run's metrics.jsonl into its folder (the training commands do this
    /// when they end).
    Plot {
        /// A run's output folder (holding metrics.jsonl).
        out: PathBuf,
    },
}

#[derive(Args)]
struct ConvertArgs {
    /// Input: a .gguf file or an HF folder.
    input: PathBuf,
    /// Output folder (must not exist).
    out_dir: PathBuf,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Default: the model's generation_config.json, else greedy.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    question: Option<String>,
}

#[derive(Args)]
struct ModelArgs {
    /// An HF model folder (config.json, model.safetensors, tokenizer.json) or a .gguf file.
    /// Default: $RLX_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch_model.sh).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Dequantize a GGUF's matrices to f32 at load instead of running its
    /// Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K/F16/BF16 matrices directly. Results are the same bit for
    /// bit; the blocks use several times less memory and decode faster.
    #[arg(long)]
    dequantize: bool,
    /// Run a GGUF's Q4_0/Q4_1/Q8_0/Q4_K/Q6_K matrices with 8-bit activations (integer dot products, as
    /// llama.cpp does): faster decoding, results within the activations' rounding of the exact
    /// ones (training log-probs then no longer equal the model's). CPU only.
    #[arg(long)]
    int8_activations: bool,
    /// Load weights that hold NaN or infinite values (refused by default).
    #[arg(long)]
    allow_non_finite: bool,
    /// Where to run: cpu, cuda or cuda:N. On CUDA, generation, scoring and training
    /// (gradients and AdamW; full or LoRA) run on the device (not yet verified on a GPU).
    #[arg(long, default_value = "cpu")]
    device: rlx::Device,
    /// On CUDA: f32 (default) or bf16 storage of the matrices and the KV cache (sums stay
    /// f32; training uses an f32 copy).
    #[arg(long, default_value = "f32")]
    device_dtype: rlx::DeviceDtype,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not stop at the model's end-of-sequence tokens: generate exactly --max-new-tokens
    /// tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    prompt: String,
}

#[derive(Args)]
struct LogprobsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    text: String,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prefill: usize,
    /// Tokens generated per sequence for the decode measurement.
    #[arg(long, default_value_t = 64)]
    decode: usize,
    /// Sequences decoded together: 1 = greedy from a one-token prompt; more = samples
    /// (temperature 1) of four one-token prompts, reported as total tokens per second.
    #[arg(long, default_value_t = 1)]
    decode_batch: usize,
    /// Also time log-prob scoring of this many sequences of --logprob-len tokens.
    #[arg(long)]
    logprob_batch: Option<usize>,
    #[arg(long, default_value_t = 256)]
    logprob_len: usize,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Time full fine-tune SFT steps (AdamW) on batches of this many sequences instead of
    /// prefill and decode.
    #[arg(long)]
    train_batch: Option<usize>,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    train_len: usize,
    /// Leading tokens of each training sequence left out of the loss (the "prompt").
    #[arg(long, default_value_t = 32)]
    train_prompt: usize,
    /// Timed training steps, after one untimed warm-up step.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// AdamW learning rate for the training steps.
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// Precision of the training steps' matrix products: f32 or bf16.
    #[arg(long, default_value = "f32")]
    train_compute: rlx::ComputeDtype,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate(a),
        Command::Logprobs(a) => logprobs(a),
        Command::Chat(a) => chat(a),
        Command::Convert(a) => convert(a),
        Command::Bench(a) => bench(a),
        Command::Sft(a) => train::sft(a),
        Command::Rm(a) => train::rm(a),
        Command::Dpo(a) => train::dpo(a),
        Command::Ppo(a) => train::ppo(a),
        Command::Grpo(a) => train::grpo(a),
        Command::Demo(a) => demo::demo(a),
        Command::Plot { out } => plot::write_plots(&out).map(|files| {
            for f in files {
                println!("{}", f.display());
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rlx: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

fn load(args: &ModelArgs) -> Result<Model, Box<dyn std::error::Error>> {
    let path = match &args.model {
        Some(p) => p.clone(),
        None => default_model()?,
    };
    let options = LoadOptions {
        threads: args.threads,
        keep_quantized: !args.dequantize,
        allow_non_finite: args.allow_non_finite,
        int8_activations: args.int8_activations,
        device: args.device,
        device_dtype: args.device_dtype,
    };
    Ok(Model::load(&path, options)?)
}

/// $RLX_MODEL, or the default model under the current folder or above the executable
/// (`target/release/rlx` sits two levels below the repository).
fn default_model() -> Result<PathBuf, Box<dyn std::error::Error>> {
    if let Some(p) = std::env::var_os("RLX_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = vec![PathBuf::from(DEFAULT_MODEL)];
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(
            exe.ancestors()
                .skip(1)
                .take(4)
                .map(|d| d.join(DEFAULT_MODEL)),
        );
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        format!("no --model given and the default model {DEFAULT_MODEL} was not found; run scripts/fetch_model.sh").into()
    })
}

/// Generates from `prompt`, streaming the text to stdout; returns the new tokens.
fn stream_generate(
    model: &Model,
    prompt: Vec<u32>,
    params: &SamplingParams,
) -> Result<Vec<u32>, Box<dyn std::error::Error>> {
    let tok = model.require_tokenizer()?;
    let mut stream = TextStream::new();
    let mut stdout = std::io::stdout().lock();
    let mut failure: Option<Box<dyn std::error::Error>> = None;
    let mut on_token = |_seq: usize, id: u32, _lp: f32| -> bool {
        let piece = match stream.push(tok, id) {
            Ok(p) => p,
            Err(e) => {
                failure = Some(e.into());
                return false;
            }
        };
        if let Some(piece) = piece {
            if let Err(e) = stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
            {
                // A closed pipe (e.g. `| head`) ends generation quietly.
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    failure = Some(e.into());
                }
                return false;
            }
        }
        true
    };
    let out = model.generate(&[prompt], params, Some(&mut on_token))?;
    if let Some(e) = failure {
        return Err(e);
    }
    let mut stdout = std::io::stdout().lock();
    if let Some(rest) = stream.finish(tok)? {
        let _ = stdout.write_all(rest.as_bytes());
    }
    let _ = writeln!(stdout);
    let _ = stdout.flush();
    Ok(out.into_iter().next().map(|g| g.tokens).unwrap_or_default())
}

fn chat(a: ChatArgs) -> CliResult {
    let model = load(&a.model)?;
    let defaults = model.generation_defaults();
    let params = SamplingParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature.unwrap_or(defaults.temperature),
        top_p: a.top_p.unwrap_or(defaults.top_p),
        top_k: a.top_k.unwrap_or(defaults.top_k),
        seed: a.seed,
        ..defaults.clone()
    };
    let start: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let mut messages = start.clone();
    let ask = |messages: &mut Vec<Message>, question: String| -> CliResult {
        messages.push(Message::new("user", question));
        let prompt = model.encode_chat(messages, true)?;
        let needed = prompt.len() + params.max_new_tokens;
        let max = model.config().max_position_embeddings;
        if needed > max {
            return Err(format!("the conversation needs {needed} positions but the model has {max}; /reset to start over").into());
        }
        let reply = stream_generate(&model, prompt, &params)?;
        let text = model.require_tokenizer()?.decode(&reply, true)?;
        messages.push(Message::new("assistant", text));
        Ok(())
    };
    if let Some(q) = a.question {
        return ask(&mut messages, q);
    }
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/reset" => {
                messages = start.clone();
                eprintln!("(conversation cleared)");
            }
            q => {
                if let Err(e) = ask(&mut messages, q.to_owned()) {
                    // Keep the session alive; drop the unanswered question.
                    messages.pop();
                    eprintln!("rlx: {e}");
                }
            }
        }
    }
}

fn generate(a: GenerateArgs) -> CliResult {
    let model = load(&a.model)?;
    let tok = model.require_tokenizer()?;
    let prompt = tok.encode(&a.prompt, true)?;
    let params = SamplingParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        // None: the model's own end-of-sequence ids; an empty list: none at all.
        stop_token_ids: a.ignore_eos.then(Vec::new),
        seed: a.seed,
    };
    stream_generate(&model, prompt, &params)?;
    Ok(())
}

fn logprobs(a: LogprobsArgs) -> CliResult {
    let model = load(&a.model)?;
    let ids = model.require_tokenizer()?.encode(&a.text, true)?;
    let lps = model.logprobs(std::slice::from_ref(&ids), a.temperature)?;
    let lps = lps.into_iter().next().unwrap_or_default();
    let json = serde_json::json!({ "tokens": ids, "logprobs": lps });
    println!("{json}");
    Ok(())
}

fn convert(a: ConvertArgs) -> CliResult {
    let model = Model::load(&a.input, LoadOptions::default())?;
    let dtype = match a.dtype {
        DtypeArg::F32 => rlx::convert::SaveDtype::F32,
        DtypeArg::Bf16 => rlx::convert::SaveDtype::Bf16,
    };
    rlx::convert::save_hf_folder(&model, &a.out_dir, dtype)?;
    eprintln!("wrote {}", a.out_dir.display());
    Ok(())
}

fn bench(a: BenchArgs) -> CliResult {
    if let Some(batch) = a.train_batch {
        return bench_train(&a, batch);
    }
    // Load → first token: the load, then one token generated from an 8-token prompt.
    let started = Instant::now();
    let model = load(&a.model)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let v = model.config().vocab_size as u32;
    // Deterministic pseudo-random prompt ids (no tokenizer needed).
    let ids = |n: usize, salt: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_add(salt).wrapping_mul(2_654_435_761) >> 7) % v)
            .collect()
    };
    let prompt = ids(a.prefill.max(8), 0);
    let one = SamplingParams {
        stop_token_ids: Some(Vec::new()),
        ..SamplingParams::greedy(1)
    };
    model.generate(&[&prompt[..8]], &one, None)?;
    let first_token_seconds = started.elapsed().as_secs_f64();
    let repeats = a.repeats.max(1);
    // Prefill as generation runs it: the whole prompt, logits of its last position, one token.
    let mut prefill_best = f64::INFINITY;
    for _ in 0..repeats {
        let t = Instant::now();
        model.generate(&[&prompt[..a.prefill.max(1)]], &one, None)?;
        prefill_best = prefill_best.min(t.elapsed().as_secs_f64());
    }
    // Decode: one-token prompts, then `decode` steps per sequence without stopping at EOS.
    let batch = a.decode_batch.max(1);
    let params = if batch == 1 {
        SamplingParams {
            stop_token_ids: Some(Vec::new()),
            ..SamplingParams::greedy(a.decode)
        }
    } else {
        SamplingParams {
            max_new_tokens: a.decode,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 1,
            stop_token_ids: Some(Vec::new()),
            ..SamplingParams::default()
        }
    };
    let prompts: Vec<&[u32]> = (0..batch).map(|i| &prompt[i % 4..i % 4 + 1]).collect();
    let mut decode_best = f64::INFINITY;
    for _ in 0..repeats {
        let t = Instant::now();
        model.generate(&prompts, &params, None)?;
        decode_best = decode_best.min(t.elapsed().as_secs_f64());
    }
    let mut logprob = serde_json::Value::Null;
    if let Some(lb) = a.logprob_batch {
        let seqs: Vec<Vec<u32>> = (0..lb)
            .map(|i| ids(a.logprob_len, 7919 * i as u32))
            .collect();
        let mut best = f64::INFINITY;
        for _ in 0..repeats {
            let t = Instant::now();
            model.logprobs(&seqs, 1.0)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        logprob = serde_json::json!({
            "sequences": lb,
            "tokens": a.logprob_len,
            "seconds": best,
            "tok_per_s": (lb * a.logprob_len) as f64 / best,
        });
    }
    let json = serde_json::json!({
        "engine": "rlx",
        "threads": a.model.threads,
        "model": model.source().display().to_string(),
        "prefill_tokens": a.prefill,
        "prefill_seconds": prefill_best,
        "prefill_tok_per_s": a.prefill as f64 / prefill_best,
        "decode_tokens": a.decode,
        "decode_batch": batch,
        "decode_seconds": decode_best,
        "decode_tok_per_s": (batch * a.decode) as f64 / decode_best,
        "logprobs": logprob,
        "load_seconds": load_seconds,
        "first_token_seconds": first_token_seconds,
        "quantized": model.is_quantized(),
        "int8_activations": model.int8_activations(),
    });
    println!("{json}");
    Ok(())
}

/// Deterministic pseudo-random token `i` of a benchmark input (no tokenizer needed);
/// benches/train_step.py builds the same ids.
fn bench_token(i: usize, vocab: u32) -> u32 {
    ((i as u32).wrapping_mul(2_654_435_761) >> 7) % vocab
}

/// A `VmHWM:` / `VmRSS:` line of /proc/self/status, in bytes (None off Linux).
fn proc_status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Resets the process's peak RSS (VmHWM) to its current RSS; false where the kernel refuses.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Seconds this process's threads have run on a CPU and waited for one (summed over the
/// live threads from /proc/self/task/*/schedstat); None off Linux. Waiting means another
/// process competed for the cores, which skews a timing.
fn cpu_and_wait_seconds() -> Option<(f64, f64)> {
    let (mut run, mut wait) = (0u64, 0u64);
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        let mut fields = stat.split_whitespace().map(str::parse::<u64>);
        run += fields.next()?.ok()?;
        wait += fields.next()?.ok()?;
    }
    Some((run as f64 * 1e-9, wait as f64 * 1e-9))
}

/// `rlx bench --train-batch B`: one untimed warm-up SFT step, then `steps` timed ones, on
/// `B` sequences of `train_len` pseudo-random tokens whose first `train_prompt` tokens are
/// masked out of the loss. The peak RSS is reset after the model is loaded, so it covers the
/// optimizer state and the steps (with the weights resident) but not load-time buffers.
fn bench_train(a: &BenchArgs, batch: usize) -> CliResult {
    if batch == 0 || a.steps == 0 {
        return Err("--train-batch and --steps must be at least 1".into());
    }
    if a.train_len < 2 || a.train_prompt >= a.train_len {
        return Err(format!(
            "--train-len ({}) must be at least 2 and above --train-prompt ({})",
            a.train_len, a.train_prompt
        )
        .into());
    }
    let model = load(&a.model)?;
    let source = model.source().display().to_string();
    let v = model.config().vocab_size as u32;
    let sequences: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..a.train_len)
                .map(|i| bench_token(b * a.train_len + i, v))
                .collect()
        })
        .collect();
    let prompt = a.train_prompt.max(1);
    let masks: Vec<Vec<bool>> = (0..batch)
        .map(|_| (0..a.train_len).map(|t| t >= prompt).collect())
        .collect();
    let rss_after_load = proc_status_bytes("VmRSS:");
    let peak_after_load = proc_status_bytes("VmHWM:");
    let peak_reset = reset_peak_rss();
    let config = rlx::TrainConfig {
        lr: a.lr as f32,
        compute: a.train_compute,
        ..Default::default()
    };
    let mut trainer = rlx::Trainer::new(model, config)?;
    let mut seconds = Vec::with_capacity(a.steps + 1);
    let mut losses = Vec::with_capacity(a.steps + 1);
    let mut grad_norms = Vec::with_capacity(a.steps + 1);
    let mut cpu_seconds = Vec::with_capacity(a.steps + 1);
    let mut wait_seconds = Vec::with_capacity(a.steps + 1);
    for _ in 0..=a.steps {
        let before = cpu_and_wait_seconds();
        let t = Instant::now();
        let stats = trainer.sft_step(&sequences, &masks)?;
        seconds.push(t.elapsed().as_secs_f64());
        if let (Some((run0, wait0)), Some((run1, wait1))) = (before, cpu_and_wait_seconds()) {
            cpu_seconds.push(run1 - run0);
            wait_seconds.push(wait1 - wait0);
        }
        if stats.skipped {
            return Err(format!(
                "step {} was skipped (non-finite loss or gradient)",
                stats.step
            )
            .into());
        }
        losses.push(stats.loss);
        grad_norms.push(stats.grad_norm);
    }
    let peak = proc_status_bytes("VmHWM:");
    let timed = &seconds[1..];
    let best = timed.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = timed.iter().sum::<f64>() / timed.len() as f64;
    let tokens = batch * a.train_len;
    let json = serde_json::json!({
        "engine": "rlx",
        "mode": "sft_step",
        "threads": a.model.threads,
        "model": source,
        "batch": batch,
        "seq_len": a.train_len,
        "prompt_tokens": a.train_prompt,
        "loss_tokens": batch * (a.train_len - prompt),
        "lr": a.lr,
        "compute": a.train_compute.name(),
        "bf16_path": rlx::backend::cpu::bf16_gemm::bf16_path().name(),
        "warmup_seconds": seconds[0],
        "step_seconds": timed,
        "step_cpu_seconds": cpu_seconds.get(1..),
        "step_runqueue_wait_seconds": wait_seconds.get(1..),
        "step_seconds_best": best,
        "step_seconds_mean": mean,
        "tok_per_s": tokens as f64 / best,
        "losses": losses,
        "grad_norms": grad_norms,
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_load_bytes": peak_after_load,
        "peak_rss_reset_after_load": peak_reset,
        "peak_rss_bytes": peak,
    });
    println!("{json}");
    Ok(())
}
