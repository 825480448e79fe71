//! The training commands: `rlx sft`, `rlx rm`, `rlx dpo`, `rlx ppo`, `rlx grpo`.
//!
//! Every setting is a flag or a key of a TOML file given with `--config` (keys are the flag
//! names with `_` for `-`; a flag on the command line wins). Each stage writes
//! `OUT/checkpoint-<step>/`, `OUT/metrics.jsonl` and, when it finishes, `OUT/model/` — the next
//! stage's `--model`. Ctrl-C stops after the current step and saves a checkpoint (a second
//! Ctrl-C quits at once; checkpoints are written atomically, so the last finished one stays
//! loadable); `--resume` continues from the newest checkpoint in OUT.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rlx::pipeline::data::{load, BadLine, Formatter};
use rlx::pipeline::job::{OnPolicyJob, OnPolicyStage};
use rlx::pipeline::supervised::{self, DpoOptions, RmOptions};
use rlx::pipeline::{latest_checkpoint, Observer, Outcome, RunOptions, StageReport};
use rlx::{ComputeDtype, DpoLoss, LoadOptions, LoraConfig, Model, Schedule, TrainConfig, Trainer};
use serde_json::Value;

pub(crate) type CliResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Settings shared by every training command.
#[derive(Args, Clone)]
pub struct Common {
    /// The model to train: an HF folder or a .gguf file (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data (JSONL).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out data (JSONL) evaluated at the end.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Output folder: checkpoints, metrics.jsonl, model/.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A TOML file of settings (keys = flag names with `_`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Leave out malformed dataset lines (reported) instead of stopping.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Do not apply the model's chat template.
    #[arg(long)]
    no_chat_template: bool,
    /// Worker threads (0 = one per core).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    lr: Option<f32>,
    #[arg(long)]
    weight_decay: Option<f32>,
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Cosine decay to 0 over this many steps (0 = constant learning rate).
    #[arg(long)]
    total_steps: Option<u64>,
    #[arg(long)]
    max_grad_norm: Option<f32>,
    /// Train LoRA adapters of this rank instead of every weight.
    #[arg(long)]
    lora_rank: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f32>,
    /// Comma-separated module names (default q_proj,v_proj).
    #[arg(long)]
    lora_targets: Option<String>,
    /// Recompute activations in the backward pass to save memory.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Precision of the training matrix products: f32 (default) or bf16 (bf16 operands, f32
    /// sums and master weights; fast on CPUs with AVX-512-BF16).
    #[arg(long)]
    compute: Option<ComputeDtype>,
    #[arg(long)]
    seed: Option<u64>,
    /// Longest sequence (prompt + answer) in tokens.
    #[arg(long)]
    max_len: Option<usize>,
    /// Save a checkpoint every N steps (PPO/GRPO: iterations); 0 = at the end only.
    #[arg(long)]
    save_every: Option<u64>,
}

/// Supervised stages (SFT, RM, DPO).
#[derive(Args, Clone)]
pub struct SupervisedArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    epochs: Option<usize>,
    /// Examples (or pairs) per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    max_steps: Option<u64>,
    /// RM: margin in −log σ(r_c − r_r − margin).
    #[arg(long)]
    margin: Option<f32>,
    /// DPO: β.
    #[arg(long)]
    beta: Option<f64>,
    /// DPO: sigmoid, ipo or hinge.
    #[arg(long)]
    loss: Option<String>,
}

/// On-policy stages (PPO, GRPO).
#[derive(Args, Clone)]
pub struct OnPolicyArgs {
    #[command(flatten)]
    common: Common,
    /// The reward model (an HF folder with a score head, e.g. `rlx rm`'s OUT/model).
    #[arg(long)]
    reward_model: Option<PathBuf>,
    #[arg(long)]
    iterations: Option<usize>,
    #[arg(long)]
    prompts_per_iteration: Option<usize>,
    #[arg(long)]
    samples_per_prompt: Option<usize>,
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Passes over each rollout.
    #[arg(long)]
    ppo_epochs: Option<usize>,
    #[arg(long)]
    minibatch_size: Option<usize>,
    /// PPO: initial KL coefficient.
    #[arg(long)]
    kl_coef: Option<f64>,
    /// PPO: adapt the KL coefficient towards this KL (nats per response).
    #[arg(long)]
    target_kl: Option<f64>,
    #[arg(long)]
    clip_range: Option<f64>,
    #[arg(long)]
    vf_coef: Option<f64>,
    #[arg(long)]
    entropy_coef: Option<f64>,
    #[arg(long)]
    gamma: Option<f64>,
    #[arg(long)]
    lam: Option<f64>,
    /// GRPO: β of the KL term (0 = no reference model).
    #[arg(long)]
    beta: Option<f64>,
    /// GRPO: grpo, bnpo, dr_grpo or dapo.
    #[arg(long)]
    loss_type: Option<String>,
    /// Run the rollouts on a Ray cluster at this address (`auto`, `HOST:PORT`, or `local` for
    /// a cluster started for this run); needs the Python package with Ray.
    #[arg(long)]
    ray: Option<String>,
    /// Rollout workers on the Ray cluster.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

/// Values from the `--config` TOML file.
struct Config {
    table: toml::Table,
}

impl Config {
    fn read(path: Option<&Path>) -> CliResult<Config> {
        let table = match path {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
                text.parse::<toml::Table>()
                    .map_err(|e| format!("{}: {e}", p.display()))?
            }
            None => toml::Table::new(),
        };
        Ok(Config { table })
    }

    /// The flag's value, else the config's `key`, else `default`.
    fn get<T: FromStr>(&self, flag: Option<T>, key: &str, default: T) -> CliResult<T> {
        Ok(self.optional(flag, key)?.unwrap_or(default))
    }

    /// The flag's value, else the config's `key`, else none.
    fn optional<T: FromStr>(&self, flag: Option<T>, key: &str) -> CliResult<Option<T>> {
        if flag.is_some() {
            return Ok(flag);
        }
        match self.table.get(key) {
            None => Ok(None),
            Some(v) => {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                text.parse::<T>()
                    .map(Some)
                    .map_err(|_| format!("config key `{key}`: cannot use {v}").into())
            }
        }
    }

    fn path(&self, flag: &Option<PathBuf>, key: &str) -> Option<PathBuf> {
        flag.clone().or_else(|| {
            self.table
                .get(key)
                .and_then(|v| v.as_str())
                .map(PathBuf::from)
        })
    }

    fn flag(&self, flag: bool, key: &str) -> bool {
        flag || self.table.get(key).and_then(|v| v.as_bool()) == Some(true)
    }
}

/// Progress bars for each phase, metrics on stderr, and the Ctrl-C flag.
pub(crate) struct Console {
    bar: Option<ProgressBar>,
    stop: Arc<AtomicBool>,
}

impl Observer for Console {
    fn phase(&mut self, name: &str, total: u64) {
        let bar = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix:>18} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(name.to_string());
        self.bar = Some(bar);
    }
    fn advance(&mut self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }
    fn end_phase(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
    fn record(&mut self, m: &Value) {
        let keys = [
            "step",
            "loss",
            "reward_mean",
            "monitor_score",
            "kl",
            "clip_fraction",
            "lr",
        ];
        let parts: Vec<String> = keys
            .iter()
            .filter_map(|k| match &m[*k] {
                Value::Number(n) => n.as_f64().map(|x| format!("{k} {x:.4}")),
                _ => None,
            })
            .collect();
        match &self.bar {
            Some(b) => b.set_message(parts.join("  ")),
            None => eprintln!("{}", parts.join("  ")),
        }
    }
    fn message(&mut self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }
    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// The process's Ctrl-C flag; the handler is installed once.
fn stop_flag() -> CliResult<Arc<AtomicBool>> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    if let Some(f) = FLAG.get() {
        return Ok(f.clone());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let presses = Arc::new(AtomicUsize::new(0));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if presses.fetch_add(1, Ordering::SeqCst) > 0 {
            eprintln!("\nstopped; the last finished checkpoint is intact");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: finishing this step and saving a checkpoint (again to quit now)");
        flag.store(true, Ordering::SeqCst);
    })?;
    Ok(FLAG.get_or_init(|| stop).clone())
}

pub(crate) fn console() -> CliResult<Console> {
    Ok(Console {
        bar: None,
        stop: stop_flag()?,
    })
}

fn report_bad(bad: &[BadLine], path: &Path) {
    for b in bad {
        eprintln!("{}: skipped line {}: {}", path.display(), b.line, b.message);
    }
}

fn required(p: Option<PathBuf>, what: &str) -> CliResult<PathBuf> {
    p.ok_or_else(|| {
        format!(
            "--{what} is required (or `{}` in --config)",
            what.replace('-', "_")
        )
        .into()
    })
}

/// Everything a stage needs from `Common`, resolved against the config file.
struct Setup {
    cfg: Config,
    model_path: PathBuf,
    data: PathBuf,
    out: PathBuf,
    threads: usize,
    train: TrainConfig,
    lora: Option<LoraConfig>,
    checkpointing: bool,
    chat: bool,
    max_len: usize,
    seed: u64,
    save_every: u64,
    skip_bad: bool,
    resume: bool,
    eval: Option<PathBuf>,
}

fn setup(c: &Common, default_lr: f32) -> CliResult<Setup> {
    let cfg = Config::read(c.config.as_deref())?;
    let model_path = match cfg.path(&c.model, "model") {
        Some(p) => p,
        None => crate::default_model()?,
    };
    let total: u64 = cfg.get(c.total_steps, "total_steps", 0)?;
    let warmup: u64 = cfg.get(c.warmup_steps, "warmup_steps", 0)?;
    let train = TrainConfig {
        lr: cfg.get(c.lr, "lr", default_lr)?,
        weight_decay: cfg.get(c.weight_decay, "weight_decay", 0.0)?,
        max_grad_norm: Some(cfg.get(c.max_grad_norm, "max_grad_norm", 1.0)?),
        schedule: Schedule::from_steps(warmup, total),
        compute: cfg.get(c.compute, "compute", ComputeDtype::F32)?,
        ..Default::default()
    };
    let rank: usize = cfg.get(c.lora_rank, "lora_rank", 0)?;
    let lora = if rank > 0 {
        let targets: String = cfg.get(
            c.lora_targets.clone(),
            "lora_targets",
            "q_proj,v_proj".into(),
        )?;
        Some(LoraConfig {
            rank,
            alpha: cfg.get(c.lora_alpha, "lora_alpha", 2.0 * rank as f32)?,
            target_modules: targets.split(',').map(|t| t.trim().to_string()).collect(),
            seed: cfg.get(c.seed, "seed", 0)?,
        })
    } else {
        None
    };
    Ok(Setup {
        model_path,
        data: required(cfg.path(&c.data, "data"), "data")?,
        out: required(cfg.path(&c.out, "out"), "out")?,
        threads: cfg.get(c.threads, "threads", 0)?,
        train,
        lora,
        checkpointing: cfg.flag(c.gradient_checkpointing, "gradient_checkpointing"),
        chat: !cfg.flag(c.no_chat_template, "no_chat_template"),
        max_len: cfg.get(c.max_len, "max_len", 512)?,
        seed: cfg.get(c.seed, "seed", 0)?,
        save_every: cfg.get(c.save_every, "save_every", 0)?,
        skip_bad: cfg.flag(c.skip_bad_lines, "skip_bad_lines"),
        resume: cfg.flag(c.resume, "resume"),
        eval: cfg.path(&c.eval, "eval"),
        cfg,
    })
}

impl Setup {
    fn load(&self, path: &Path) -> CliResult<Model> {
        Ok(Model::load(
            path,
            LoadOptions {
                threads: self.threads,
                ..Default::default()
            },
        )?)
    }

    /// A fresh trainer on `--model` (prepared by `prepare`), or the newest checkpoint with
    /// `--resume`; also the checkpoint's run state.
    fn trainer(
        &self,
        prepare: impl FnOnce(&mut Model) -> CliResult,
    ) -> CliResult<(Trainer, Option<Value>)> {
        if self.resume {
            if let Some(ck) = latest_checkpoint(&self.out) {
                eprintln!("resuming from {}", ck.display());
                let (mut t, extra) = Trainer::resume(
                    &ck,
                    LoadOptions {
                        threads: self.threads,
                        ..Default::default()
                    },
                )?;
                t.model_mut().set_gradient_checkpointing(self.checkpointing);
                t.set_compute(self.train.compute)?;
                return Ok((t, Some(extra)));
            }
            eprintln!("no checkpoint in {}; starting fresh", self.out.display());
        } else if latest_checkpoint(&self.out).is_some() || self.out.join("model").exists() {
            return Err(format!(
                "{} already holds a run: pass --resume to continue it, or choose another --out",
                self.out.display()
            )
            .into());
        }
        let mut model = self.load(&self.model_path)?;
        prepare(&mut model)?;
        if let Some(l) = &self.lora {
            model.attach_lora(l)?;
        }
        model.set_gradient_checkpointing(self.checkpointing);
        Ok((Trainer::new(model, self.train.clone())?, None))
    }
}

/// Writes the run's PNG charts beside its checkpoints (a failure is reported, not fatal).
pub(crate) fn plots(out: &Path) {
    match crate::plot::write_plots(out) {
        Ok(files) if !files.is_empty() => eprintln!(
            "plots: {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Ok(_) => {}
        Err(e) => eprintln!("plots not written: {e}"),
    }
}

fn summary(stage: &str, r: &StageReport, out: &Path) {
    plots(out);
    match r.outcome {
        Outcome::Finished => eprintln!(
            "{stage}: finished after {} steps; model in {}",
            r.steps,
            r.model_dir.as_deref().unwrap_or(out).display()
        ),
        Outcome::Interrupted => eprintln!(
            "{stage}: stopped after {} steps; continue with --resume (checkpoints in {})",
            r.steps,
            out.display()
        ),
    }
    println!("{}", r.last);
}

pub fn sft(a: SupervisedArgs) -> CliResult {
    let s = setup(&a.common, 1e-5)?;
    let (mut trainer, extra) = s.trainer(|_| Ok(()))?;
    let f = Formatter::new(
        trainer.model(),
        s.chat && trainer.model().chat_template().is_some(),
        s.max_len,
    )?;
    let (examples, bad) = load(&s.data, s.skip_bad, |v| f.sft(v))?;
    report_bad(&bad, &s.data);
    let opts = run_options(&a, &s)?;
    let mut obs = console()?;
    let r = supervised::sft(&mut trainer, &examples, &opts, extra.as_ref(), &mut obs)?;
    if let (Some(eval), Outcome::Finished) = (&s.eval, r.outcome) {
        let f = Formatter::new(
            trainer.model(),
            s.chat && trainer.model().chat_template().is_some(),
            s.max_len,
        )?;
        let (held, _) = load(eval, true, |v| f.sft(v))?;
        let seqs: Vec<&[u32]> = held.iter().map(|e| e.tokens.as_slice()).collect();
        let masks: Vec<Vec<bool>> = held.iter().map(|e| e.mask.clone()).collect();
        let sums = trainer.model().masked_logprob_sums(&seqs, &masks, 1.0)?;
        let tokens: usize = masks
            .iter()
            .map(|m| m.iter().skip(1).filter(|&&x| x).count())
            .sum();
        eprintln!(
            "held-out loss: {:.4}",
            -sums.iter().sum::<f64>() / tokens.max(1) as f64
        );
    }
    summary("sft", &r, &s.out);
    Ok(())
}

fn run_options(a: &SupervisedArgs, s: &Setup) -> CliResult<RunOptions> {
    let cfg = &s.cfg;
    Ok(RunOptions {
        out: s.out.clone(),
        epochs: cfg.get(a.epochs, "epochs", 1)?,
        batch_size: cfg.get(a.batch_size, "batch_size", 4)?,
        grad_accum: cfg.get(a.grad_accum, "grad_accum", 1)?,
        save_every: s.save_every,
        seed: s.seed,
        max_steps: match cfg.get(a.max_steps, "max_steps", 0)? {
            0 => None,
            n => Some(n),
        },
    })
}

pub fn rm(a: SupervisedArgs) -> CliResult {
    let s = setup(&a.common, 1e-5)?;
    let seed = s.seed;
    let (mut trainer, extra) = s.trainer(|m| {
        if m.weights().score.is_none() {
            m.add_score_head(seed);
        }
        Ok(())
    })?;
    let chat = s.chat && trainer.model().chat_template().is_some();
    let f = Formatter::new(trainer.model(), chat, s.max_len)?;
    let (groups, bad) = load(&s.data, s.skip_bad, |v| f.pairs(v))?;
    report_bad(&bad, &s.data);
    let pairs: Vec<_> = groups.into_iter().flatten().collect();
    let opts = run_options(&a, &s)?;
    let margin = s.cfg.get(a.margin, "margin", 0.0)?;
    let mut obs = console()?;
    let r = supervised::reward_model(
        &mut trainer,
        &pairs,
        RmOptions { margin },
        &opts,
        extra.as_ref(),
        &mut obs,
    )?;
    if let Some(eval) = &s.eval {
        let f = Formatter::new(trainer.model(), chat, s.max_len)?;
        let (held, _) = load(eval, true, |v| f.pairs(v))?;
        let held: Vec<_> = held.into_iter().flatten().collect();
        let acc = supervised::pairwise_accuracy(trainer.model(), &held)?;
        eprintln!(
            "held-out pairwise accuracy: {acc:.3} ({} pairs)",
            held.len()
        );
    }
    summary("rm", &r, &s.out);
    Ok(())
}

pub fn dpo(a: SupervisedArgs) -> CliResult {
    let s = setup(&a.common, 1e-6)?;
    let (mut trainer, extra) = s.trainer(|_| Ok(()))?;
    let chat = s.chat && trainer.model().chat_template().is_some();
    let f = Formatter::new(trainer.model(), chat, s.max_len)?;
    let (groups, bad) = load(&s.data, s.skip_bad, |v| f.pairs(v))?;
    report_bad(&bad, &s.data);
    let pairs: Vec<_> = groups.into_iter().flatten().collect();
    let loss = match s
        .cfg
        .get(a.loss.clone(), "loss", "sigmoid".to_string())?
        .as_str()
    {
        "sigmoid" => DpoLoss::Sigmoid,
        "ipo" => DpoLoss::Ipo,
        "hinge" => DpoLoss::Hinge,
        other => return Err(format!("unknown DPO loss `{other}` (sigmoid, ipo, hinge)").into()),
    };
    let opts = run_options(&a, &s)?;
    let cfg = DpoOptions {
        beta: s.cfg.get(a.beta, "beta", 0.1)?,
        loss,
    };
    // The reference is the model before training (its weights are shared until written).
    let reference = match &extra {
        Some(_) => None,
        None => Some(trainer.model().without_lora()),
    };
    let reference = match reference {
        Some(r) => r,
        // A resumed run keeps the reference log-probs in its checkpoint.
        None => trainer.model().clone(),
    };
    let mut obs = console()?;
    let r = supervised::dpo(
        &mut trainer,
        &reference,
        &pairs,
        cfg,
        &opts,
        extra.as_ref(),
        &mut obs,
    )?;
    summary("dpo", &r, &s.out);
    Ok(())
}

/// The on-policy run the flags and config file describe.
fn on_policy_job(a: &OnPolicyArgs, stage: OnPolicyStage) -> CliResult<OnPolicyJob> {
    let c = &a.common;
    let cfg = Config::read(c.config.as_deref())?;
    let d = OnPolicyJob::default();
    let model = match cfg.path(&c.model, "model") {
        Some(p) => p,
        None => crate::default_model()?,
    };
    let targets: String = cfg.get(
        c.lora_targets.clone(),
        "lora_targets",
        d.lora_targets.join(","),
    )?;
    Ok(OnPolicyJob {
        stage,
        model,
        data: required(cfg.path(&c.data, "data"), "data")?,
        reward_model: required(cfg.path(&a.reward_model, "reward_model"), "reward-model")?,
        out: required(cfg.path(&c.out, "out"), "out")?,
        threads: cfg.get(c.threads, "threads", d.threads)?,
        resume: cfg.flag(c.resume, "resume"),
        skip_bad_lines: cfg.flag(c.skip_bad_lines, "skip_bad_lines"),
        chat_template: !cfg.flag(c.no_chat_template, "no_chat_template"),
        max_len: cfg.get(c.max_len, "max_len", d.max_len)?,
        gradient_checkpointing: cfg.flag(c.gradient_checkpointing, "gradient_checkpointing"),
        compute: cfg.get(c.compute, "compute", d.compute)?,
        seed: cfg.get(c.seed, "seed", d.seed)?,
        save_every: cfg.get(c.save_every, "save_every", d.save_every)?,
        lr: cfg.get(c.lr, "lr", d.lr)?,
        weight_decay: cfg.get(c.weight_decay, "weight_decay", d.weight_decay)?,
        warmup_steps: cfg.get(c.warmup_steps, "warmup_steps", d.warmup_steps)?,
        total_steps: cfg.get(c.total_steps, "total_steps", d.total_steps)?,
        max_grad_norm: cfg.get(c.max_grad_norm, "max_grad_norm", d.max_grad_norm)?,
        lora_rank: cfg.get(c.lora_rank, "lora_rank", d.lora_rank)?,
        lora_alpha: cfg.optional(c.lora_alpha, "lora_alpha")?,
        lora_targets: targets.split(',').map(|t| t.trim().to_string()).collect(),
        iterations: cfg.get(a.iterations, "iterations", d.iterations)?,
        prompts_per_iteration: cfg.get(
            a.prompts_per_iteration,
            "prompts_per_iteration",
            d.prompts_per_iteration,
        )?,
        samples_per_prompt: cfg.optional(a.samples_per_prompt, "samples_per_prompt")?,
        max_new_tokens: cfg.get(a.max_new_tokens, "max_new_tokens", d.max_new_tokens)?,
        ppo_epochs: cfg.get(a.ppo_epochs, "ppo_epochs", d.ppo_epochs)?,
        minibatch_size: cfg.get(a.minibatch_size, "minibatch_size", d.minibatch_size)?,
        kl_coef: cfg.get(a.kl_coef, "kl_coef", d.kl_coef)?,
        target_kl: cfg.get(a.target_kl, "target_kl", d.target_kl)?,
        clip_range: cfg.get(a.clip_range, "clip_range", d.clip_range)?,
        vf_coef: cfg.get(a.vf_coef, "vf_coef", d.vf_coef)?,
        entropy_coef: cfg.get(a.entropy_coef, "entropy_coef", d.entropy_coef)?,
        gamma: cfg.get(a.gamma, "gamma", d.gamma)?,
        lam: cfg.get(a.lam, "lam", d.lam)?,
        beta: cfg.get(a.beta, "beta", d.beta)?,
        loss_type: cfg.get(a.loss_type.clone(), "loss_type", d.loss_type)?,
    })
}

/// `rlx ppo` / `rlx grpo`: in this process, or with `--ray` on Ray workers through the Python
/// package's driver (`python3 -m rlx.distributed`), which runs the same job.
fn on_policy(a: OnPolicyArgs, stage: OnPolicyStage) -> CliResult {
    let job = on_policy_job(&a, stage)?;
    let name = match stage {
        OnPolicyStage::Ppo => "ppo",
        OnPolicyStage::Grpo => "grpo",
    };
    if let Some(address) = &a.ray {
        return distributed(&job, address, a.workers);
    }
    let mut obs = console()?;
    let r = job.run(None, &mut obs)?;
    summary(name, &r, &job.out);
    Ok(())
}

/// Hands the job to `python3 -m rlx.distributed` (the interpreter is `RLX_PYTHON` or
/// `python3`) and waits for it; Ctrl-C reaches it through the terminal's process group.
fn distributed(job: &OnPolicyJob, address: &str, workers: usize) -> CliResult {
    let python = std::env::var("RLX_PYTHON").unwrap_or_else(|_| "python3".into());
    let status = std::process::Command::new(&python)
        .args(["-m", "rlx.distributed", "--address", address, "--workers"])
        .arg(workers.to_string())
        .arg("--job")
        .arg(job.to_json()?)
        .status()
        .map_err(|e| {
            format!("cannot start `{python} -m rlx.distributed` (install the Python package with `pip install rlx[ray]`, or set RLX_PYTHON): {e}")
        })?;
    if status.success() {
        plots(&job.out);
        Ok(())
    } else {
        Err(format!(
            "the distributed run failed ({status}); `--resume` continues from its last checkpoint"
        )
        .into())
    }
}

pub fn ppo(a: OnPolicyArgs) -> CliResult {
    on_policy(a, OnPolicyStage::Ppo)
}

pub fn grpo(a: OnPolicyArgs) -> CliResult {
    on_policy(a, OnPolicyStage::Grpo)
}
