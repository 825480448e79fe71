//! `rlx demo`: the whole InstructGPT recipe on a small task whose preferences come from a
//! programmatic labeller, then DPO and GRPO on the same data, and a before/after table on
//! held-out prompts.
//!
//! The task: a customer reports a problem; the assistant should answer in one short, polite
//! sentence. The labeller's score (0–4), stated once here and in docs/RESULTS.md:
//! +1 the answer apologises ("sorry" or "apolog…"), +1 it thanks the customer ("thank…"),
//! +1 it has 4 to 25 words, +1 it is on task: none of the rude phrases below. An answer that
//! echoes the customer's message back ("customer writes", or the quoted complaint) is no reply
//! and scores 0.
//!
//! Data (written to OUT/data, deterministic): SFT demonstrations for a third of the training
//! prompts, K = 5 answers ranked by the labeller for another third (the reward model and DPO),
//! all training prompts for PPO and GRPO, and held-out prompts (other products and problems) for the table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use rlx::pipeline::data::{load, Formatter, PreferencePair, Prompt};
use rlx::pipeline::rollout::{self, LocalCollector, OnPolicy, Reward, RolloutOptions};
use rlx::pipeline::supervised::{self, DpoOptions, RmOptions};
use rlx::pipeline::RunOptions;
use rlx::{
    DpoLoss, GrpoConfig, LoadOptions, LoraConfig, Model, PpoConfig, SamplingParams, TrainConfig,
    Trainer,
};
use serde_json::json;

use crate::train::{console, CliResult};

#[derive(Args)]
pub struct DemoArgs {
    /// The starting model (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output folder for data, runs and RESULTS.md (must not hold an earlier demo).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// The short version: the InstructGPT stages only (SFT → RM → PPO, 4 PPO iterations), a few
    /// minutes on 2 cores. Without it DPO and GRPO run too, for comparison.
    #[arg(long)]
    short: bool,
    /// PPO and GRPO iterations (default: 4 with --short, else 6).
    #[arg(long)]
    iterations: Option<usize>,
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

const RUDE: &[&str] = &[
    "stupid",
    "your fault",
    "whatever",
    "not our problem",
    "deal with it",
    "go away",
];

/// The customer's quoted message inside a prompt, lower-cased.
fn complaint(prompt: &str) -> Option<String> {
    let start = prompt.find('"')? + 1;
    let len = prompt[start..].find('"')?;
    let quoted = prompt[start..start + len].trim_end_matches(['.', '!', '?']);
    Some(quoted.to_lowercase())
}

/// The labeller: 0–4 (see the module comment).
pub fn labeller(prompt: &str, answer: &str) -> f64 {
    let a = answer.to_lowercase();
    let words = a.split_whitespace().count();
    let mut score = 0.0;
    if a.contains("sorry") || a.contains("apolog") {
        score += 1.0;
    }
    if a.contains("thank") {
        score += 1.0;
    }
    if (4..=25).contains(&words) {
        score += 1.0;
    }
    let echoes = a.contains("customer writes")
        || complaint(prompt).is_some_and(|c| !c.is_empty() && a.contains(&c));
    if echoes {
        return 0.0;
    }
    if words > 0 && !RUDE.iter().any(|r| a.contains(r)) {
        score += 1.0;
    }
    score
}

const TRAIN_PRODUCTS: &[&str] = &[
    "blender",
    "laptop",
    "kettle",
    "phone case",
    "desk lamp",
    "backpack",
    "coffee grinder",
    "headphones",
    "toaster",
    "water bottle",
    "keyboard",
    "umbrella",
];
const HELD_PRODUCTS: &[&str] = &["vacuum cleaner", "bicycle helmet", "printer", "rice cooker"];
const TRAIN_PROBLEMS: &[&str] = &[
    "arrived broken",
    "stopped working after a day",
    "was the wrong colour",
];
const HELD_PROBLEMS: &[&str] = &["is missing a part", "was delivered two weeks late"];

fn prompt_text(product: &str, problem: &str) -> String {
    format!("A customer writes: \"My {product} {problem}.\" Reply to the customer in one short sentence.")
}

/// Five answers, best first by the labeller (scores 4, 3, 2, 1, 0).
fn ranked_answers(product: &str, problem: &str, variant: usize) -> [String; 5] {
    let polite = [
        format!("We are sorry your {product} {problem}; thank you for telling us, we will make it right."),
        format!("Thank you for letting us know, and we are sorry about your {product}."),
        format!("We apologise that your {product} {problem}, and thank you for your patience."),
    ];
    [
        polite[variant % polite.len()].clone(),
        format!(
            "Thank you so much for writing to us about this, and please accept how sorry we \
             are that your {product} {problem}, because we know how frustrating it is when \
             something you bought does not work the way it should and you have to spend your \
             time contacting support about it."
        ),
        format!("We will look into your {product}."),
        "Deal with it, that is not our problem.".to_string(),
        format!("A customer writes: \"My {product} {problem}.\""),
    ]
}

struct DemoData {
    sft: PathBuf,
    prefs: PathBuf,
    prefs_held: PathBuf,
    prompts: PathBuf,
    held: PathBuf,
}

fn write_lines(path: &Path, lines: &[serde_json::Value]) -> CliResult {
    let mut text = String::new();
    for l in lines {
        writeln!(text, "{l}")?;
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

fn write_data(dir: &Path) -> CliResult<DemoData> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (mut sft, mut prefs, mut prompts, mut held, mut prefs_held) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (i, product) in TRAIN_PRODUCTS.iter().enumerate() {
        for (j, problem) in TRAIN_PROBLEMS.iter().enumerate() {
            let p = prompt_text(product, problem);
            let answers = ranked_answers(product, problem, i + j);
            prompts.push(json!({"prompt": p}));
            // Demonstrations for a third of the prompts (half of them the long polite answer,
            // so the SFT model is good but not the labeller's ideal), preferences for another
            // third.
            match (i + j) % 3 {
                0 => sft.push(json!({"prompt": p, "response": answers[i % 2]})),
                1 => prefs.push(json!({"prompt": p, "responses": answers})),
                _ => {}
            }
        }
    }
    for (i, product) in HELD_PRODUCTS.iter().enumerate() {
        for problem in HELD_PROBLEMS {
            let p = prompt_text(product, problem);
            held.push(json!({"prompt": p}));
            prefs_held.push(json!({"prompt": p, "responses": ranked_answers(product, problem, i)}));
        }
    }
    let d = DemoData {
        sft: dir.join("sft.jsonl"),
        prefs: dir.join("prefs.jsonl"),
        prefs_held: dir.join("prefs_heldout.jsonl"),
        prompts: dir.join("prompts.jsonl"),
        held: dir.join("heldout.jsonl"),
    };
    write_lines(&d.sft, &sft)?;
    write_lines(&d.prefs, &prefs)?;
    write_lines(&d.prefs_held, &prefs_held)?;
    write_lines(&d.prompts, &prompts)?;
    write_lines(&d.held, &held)?;
    Ok(d)
}

/// One row of the table: a model's greedy answers to the held-out prompts, scored.
struct Row {
    name: String,
    labeller: f64,
    reward: f64,
    words: f64,
    kl: f64,
    example: String,
}

fn evaluate(
    name: &str,
    model: &Model,
    sft: &Model,
    rm: &Model,
    prompts: &[Prompt],
    seed: u64,
) -> CliResult<Row> {
    let ids: Vec<&[u32]> = prompts.iter().map(|p| p.tokens.as_slice()).collect();
    let greedy = model.generate(&ids, &SamplingParams::greedy(40), None)?;
    let tok = model.require_tokenizer()?;
    let (mut lab, mut words, mut seqs) = (0.0, 0.0, Vec::new());
    let mut example = String::new();
    for (i, (p, g)) in prompts.iter().zip(&greedy).enumerate() {
        let text = tok.decode(&g.tokens, true)?;
        lab += labeller(&p.text, &text);
        words += text.split_whitespace().count() as f64;
        if i == 0 {
            example = text.trim().replace('\n', " ");
        }
        let mut s = p.tokens.clone();
        s.extend(&g.tokens);
        seqs.push(s);
    }
    let rewards = rm.reward_scores(&seqs)?;
    // KL(policy ‖ SFT) estimated on sampled answers: Σ (log π − log π_sft) over answer tokens.
    let sampled = model.generate(
        &ids,
        &SamplingParams {
            max_new_tokens: 40,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            stop_token_ids: None,
            seed,
            ..SamplingParams::default()
        },
        None,
    )?;
    let (mut seqs, mut masks) = (Vec::new(), Vec::new());
    for (p, g) in prompts.iter().zip(&sampled) {
        let mut s = p.tokens.clone();
        s.extend(&g.tokens);
        masks.push(
            (0..s.len())
                .map(|t| t >= p.tokens.len())
                .collect::<Vec<bool>>(),
        );
        seqs.push(s);
    }
    let ours = model.masked_logprob_sums(&seqs, &masks, 1.0)?;
    let theirs = sft.masked_logprob_sums(&seqs, &masks, 1.0)?;
    let kl: f64 = ours.iter().zip(&theirs).map(|(a, b)| a - b).sum();
    let n = prompts.len() as f64;
    Ok(Row {
        name: name.to_string(),
        labeller: lab / n,
        reward: rewards.iter().map(|&r| r as f64).sum::<f64>() / n,
        words: words / n,
        kl: kl / n,
        example,
    })
}

fn lora() -> LoraConfig {
    LoraConfig {
        rank: 16,
        alpha: 32.0,
        target_modules: vec!["all-linear".into()],
        seed: 0,
    }
}

fn trainer(
    path: &Path,
    threads: usize,
    lr: f32,
    prepare: impl FnOnce(&mut Model),
) -> CliResult<Trainer> {
    let mut m = Model::load(
        path,
        LoadOptions {
            threads,
            ..Default::default()
        },
    )?;
    prepare(&mut m);
    m.attach_lora(&lora())?;
    Ok(Trainer::new(
        m,
        TrainConfig {
            lr,
            ..Default::default()
        },
    )?)
}

fn stage_done(out: &Path, name: &str, started: std::time::Instant) {
    crate::train::plots(&out.join(name));
    eprintln!("== {name} done in {:.0} s", started.elapsed().as_secs_f64());
}

pub fn demo(a: DemoArgs) -> CliResult {
    let model_path = match &a.model {
        Some(p) => p.clone(),
        None => crate::default_model()?,
    };
    if a.out.join("RESULTS.md").exists() {
        return Err(format!(
            "{} already holds a finished demo; choose another --out",
            a.out.display()
        )
        .into());
    }
    let t0 = std::time::Instant::now();
    let data = write_data(&a.out.join("data"))?;
    let base = Model::load(
        &model_path,
        LoadOptions {
            threads: a.threads,
            ..Default::default()
        },
    )?;
    // Room for the longest demo line even with a byte-level tokenizer (the tests run the demo on
    // a tiny model); SmolLM2 needs under 100 positions per line.
    let f = Formatter::new(&base, base.chat_template().is_some(), 512)?;
    let (sft_data, _) = load(&data.sft, false, |v| f.sft(v))?;
    let (pref_groups, _) = load(&data.prefs, false, |v| f.pairs(v))?;
    let pairs: Vec<PreferencePair> = pref_groups.into_iter().flatten().collect();
    let (held_groups, _) = load(&data.prefs_held, false, |v| f.pairs(v))?;
    let held_pairs: Vec<PreferencePair> = held_groups.into_iter().flatten().collect();
    let (prompts, _) = load(&data.prompts, false, |v| f.prompt(v))?;
    let (held, _) = load(&data.held, false, |v| f.prompt(v))?;
    let mut obs = console()?;
    let run = |name: &str| RunOptions {
        out: a.out.join(name),
        epochs: 1,
        batch_size: 4,
        grad_accum: 1,
        save_every: 0,
        seed: a.seed,
        max_steps: None,
    };

    // Stage 1: supervised fine-tuning on the demonstrations.
    let t = std::time::Instant::now();
    let mut sft_trainer = trainer(&model_path, a.threads, 3e-4, |_| {})?;
    let r = supervised::sft(
        &mut sft_trainer,
        &sft_data,
        &RunOptions {
            epochs: 2,
            ..run("sft")
        },
        None,
        &mut obs,
    )?;
    let sft_dir = r.model_dir.ok_or("SFT did not finish")?;
    drop(sft_trainer);
    stage_done(&a.out, "sft", t);

    // Stage 2: the reward model, initialised from the SFT model.
    let t = std::time::Instant::now();
    let seed = a.seed;
    let mut rm_trainer = trainer(&sft_dir, a.threads, 2e-4, |m| m.add_score_head(seed))?;
    let r = supervised::reward_model(
        &mut rm_trainer,
        &pairs,
        RmOptions { margin: 0.0 },
        &RunOptions {
            batch_size: 6,
            ..run("rm")
        },
        None,
        &mut obs,
    )?;
    let rm_dir = r.model_dir.ok_or("RM training did not finish")?;
    let rm = Model::load(
        &rm_dir,
        LoadOptions {
            threads: a.threads,
            ..Default::default()
        },
    )?;
    let rm_accuracy = supervised::pairwise_accuracy(&rm, &held_pairs)?;
    eprintln!("reward model: held-out pairwise accuracy {rm_accuracy:.3}");
    drop(rm_trainer);
    stage_done(&a.out, "rm", t);

    let sft = Model::load(
        &sft_dir,
        LoadOptions {
            threads: a.threads,
            ..Default::default()
        },
    )?;
    let labeller_fn = |p: &str, r: &str| labeller(p, r);
    let iterations = a.iterations.unwrap_or(if a.short { 4 } else { 6 });
    let on_policy = |name: &str, k: usize| RolloutOptions {
        out: a.out.join(name),
        iterations,
        prompts_per_iteration: 4,
        samples_per_prompt: k,
        max_new_tokens: 32,
        epochs: 2,
        minibatch_size: 4,
        save_every: 0,
        seed: a.seed,
    };

    // Stage 3: PPO against the reward model, KL leash to the SFT model.
    let t = std::time::Instant::now();
    let mut ppo_trainer = trainer(&sft_dir, a.threads, 1e-4, |m| m.add_value_head(seed))?;
    let job = OnPolicy {
        prompts: &prompts,
        monitor: Some(&labeller_fn),
        options: on_policy("ppo", 2),
    };
    let mut collector = LocalCollector {
        reference: Some(&sft),
        reward: Reward::Model(&rm),
    };
    let r = rollout::ppo(
        &mut ppo_trainer,
        &mut collector,
        &job,
        &PpoConfig {
            kl_coef: 0.05,
            ..Default::default()
        },
        None,
        None,
        &mut obs,
    )?;
    let ppo_dir = r.model_dir.ok_or("PPO did not finish")?;
    drop(ppo_trainer);
    stage_done(&a.out, "ppo", t);

    // For comparison (the full version): DPO on the preference pairs and GRPO against the
    // reward model, both from the SFT model.
    let mut compared = Vec::new();
    if !a.short {
        // DPO on the preference pairs, from the SFT model.
        let t = std::time::Instant::now();
        let mut dpo_trainer = trainer(&sft_dir, a.threads, 1e-4, |_| {})?;
        let r = supervised::dpo(
            &mut dpo_trainer,
            &sft,
            &pairs,
            DpoOptions {
                beta: 0.1,
                loss: DpoLoss::Sigmoid,
            },
            &RunOptions {
                batch_size: 6,
                ..run("dpo")
            },
            None,
            &mut obs,
        )?;
        let dpo_dir = r.model_dir.ok_or("DPO did not finish")?;
        drop(dpo_trainer);
        stage_done(&a.out, "dpo", t);

        // GRPO against the reward model, 4 answers per prompt.
        let t = std::time::Instant::now();
        let mut grpo_trainer = trainer(&sft_dir, a.threads, 1e-4, |_| {})?;
        let job = OnPolicy {
            prompts: &prompts,
            monitor: Some(&labeller_fn),
            options: RolloutOptions {
                prompts_per_iteration: 2,
                ..on_policy("grpo", 4)
            },
        };
        let r = rollout::grpo(
            &mut grpo_trainer,
            &mut collector,
            &job,
            &GrpoConfig::default(),
            None,
            &mut obs,
        )?;
        let grpo_dir = r.model_dir.ok_or("GRPO did not finish")?;
        drop(grpo_trainer);
        stage_done(&a.out, "grpo", t);
        compared = vec![("DPO", dpo_dir), ("GRPO", grpo_dir)];
    }

    // The table: every model on the held-out prompts.
    let t = std::time::Instant::now();
    let mut rows = vec![evaluate("base", &base, &sft, &rm, &held, a.seed)?];
    drop(base);
    let stages = [("SFT", sft_dir), ("PPO", ppo_dir)]
        .into_iter()
        .chain(compared);
    for (name, dir) in stages {
        let m = Model::load(
            &dir,
            LoadOptions {
                threads: a.threads,
                ..Default::default()
            },
        )?;
        rows.push(evaluate(name, &m, &sft, &rm, &held, a.seed)?);
    }
    eprintln!("== evaluation done in {:.0} s", t.elapsed().as_secs_f64());
    let report = results(
        &rows,
        rm_accuracy,
        &a,
        iterations,
        t0.elapsed().as_secs_f64(),
    );
    std::fs::write(a.out.join("RESULTS.md"), &report)?;
    println!("{report}");
    Ok(())
}

fn results(
    rows: &[Row],
    rm_accuracy: f64,
    a: &DemoArgs,
    iterations: usize,
    seconds: f64,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| model | labeller score (0–4) | reward model | words | KL to SFT (nats) | first held-out answer |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.2} | {:.1} | {:.2} | {} |",
            r.name,
            r.labeller,
            r.reward,
            r.words,
            r.kl,
            r.example.replace('|', "\\|")
        );
    }
    let _ = writeln!(
        s,
        "\nReward model held-out pairwise accuracy: {rm_accuracy:.3}. {} {} iterations, \
         seed {}, {:.0} s in total. Held-out prompts: {} (greedy answers, 40 tokens at most).",
        if a.short { "PPO" } else { "PPO/GRPO" },
        iterations,
        a.seed,
        seconds,
        HELD_PRODUCTS.len() * HELD_PROBLEMS.len()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranked_answers_are_in_labeller_order() {
        for (i, p) in TRAIN_PRODUCTS.iter().chain(HELD_PRODUCTS).enumerate() {
            for q in TRAIN_PROBLEMS.iter().chain(HELD_PROBLEMS) {
                let prompt = prompt_text(p, q);
                let scores: Vec<f64> = ranked_answers(p, q, i)
                    .iter()
                    .map(|a| labeller(&prompt, a))
                    .collect();
                assert_eq!(scores, vec![4.0, 3.0, 2.0, 1.0, 0.0], "{p} {q}");
                assert!(
                    scores.windows(2).all(|w| w[0] > w[1]),
                    "{p} {q}: {scores:?}"
                );
            }
        }
        assert_eq!(labeller("", ""), 0.0);
        let prompt = prompt_text("kettle", "arrived broken");
        // An echo of the complaint scores nothing, however polite.
        assert_eq!(
            labeller(&prompt, "Sorry, my kettle arrived broken, thank you."),
            0.0
        );
    }
}
