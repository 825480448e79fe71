//! The on-policy stages: PPO (InstructGPT stage 3) and GRPO. Each iteration samples answers
//! to a batch of prompts with `generate` (k per prompt, sharing the prompt's prefill), scores
//! them, computes the reference log-probs, then updates the policy.
//!
//! Rollouts sample at temperature 1 with no top-k/top-p filter, so the log-probs `generate`
//! records are the policy's own and serve as the "old" log-probs: the first update's
//! importance ratios are exactly 1.
//!
//! Sampling, scoring and reference log-probs go through a [`Collector`]: [`LocalCollector`]
//! does them in this process; `rlx.distributed` spreads them over Ray workers. Every sequence
//! draws from its own random stream — run seed + iteration, stream `(prompt position << 32) |
//! sample index` — and the kernels do not depend on batch composition, so any split of a
//! rollout over workers yields the same samples, scores and log-probs as one process.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampling::SamplingParams;
use crate::train::grpo::{group_advantages, GrpoBatch, GrpoConfig};
use crate::train::ppo::{ppo_advantages, PpoConfig, PpoMinibatch};
use crate::train::Trainer;

use super::data::Prompt;
use super::{save, save_final, shuffled, Metrics, Observer, Outcome, StageReport};

/// A scorer of (prompt text, response text).
pub type ScoreFn<'a> = dyn Fn(&str, &str) -> f64 + Sync + 'a;

/// Where rewards come from.
pub enum Reward<'a> {
    /// A reward model (score head at the last token). When its tokenizer differs from the
    /// policy's, sequences are re-tokenised through their text.
    Model(&'a Model),
    /// A programmatic reward of (prompt, response) texts.
    Function(&'a ScoreFn<'a>),
}

/// Options of the on-policy stages.
#[derive(Debug, Clone)]
pub struct RolloutOptions {
    pub out: std::path::PathBuf,
    pub iterations: usize,
    pub prompts_per_iteration: usize,
    /// Answers sampled per prompt (GRPO's group size k ≥ 2).
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    /// Passes over each rollout (PPO epochs; GRPO's μ).
    pub epochs: usize,
    /// Sequences per minibatch (one optimizer step each).
    pub minibatch_size: usize,
    /// Save a checkpoint every this many iterations (0: at the end or on stop only).
    pub save_every: u64,
    pub seed: u64,
}

impl Default for RolloutOptions {
    fn default() -> Self {
        RolloutOptions {
            out: "out".into(),
            iterations: 10,
            prompts_per_iteration: 4,
            samples_per_prompt: 2,
            max_new_tokens: 32,
            epochs: 2,
            minibatch_size: 4,
            save_every: 0,
            seed: 0,
        }
    }
}

impl RolloutOptions {
    fn validate(&self) -> Result<()> {
        if self.iterations == 0
            || self.prompts_per_iteration == 0
            || self.samples_per_prompt == 0
            || self.max_new_tokens == 0
            || self.epochs == 0
            || self.minibatch_size == 0
        {
            return Err(Error::invalid(
                "iterations, prompts, samples, max_new_tokens, epochs and minibatch size \
                 must all be at least 1",
            ));
        }
        Ok(())
    }
}

/// The adaptive KL controller of Ziegler et al. (2019): the coefficient moves so that the
/// measured KL approaches `target`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveKl {
    pub target: f64,
    pub horizon: f64,
}

impl AdaptiveKl {
    fn update(&self, coef: f64, kl: f64, n_steps: usize) -> f64 {
        let error = (kl / self.target - 1.0).clamp(-0.2, 0.2);
        coef * (1.0 + error * n_steps as f64 / self.horizon)
    }
}

/// One prompt of a rollout request: its position in the iteration and its tokens and text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestPrompt {
    pub position: usize,
    pub tokens: Vec<u32>,
    pub text: String,
}

/// What one iteration asks of a collector: `samples_per_prompt` answers to each prompt, their
/// rewards and (when `reference`) the reference model's log-probs of each answer token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRequest {
    pub iteration: usize,
    /// The run's seed; sequence (position p, sample j) samples from stream `(p << 32) | j` of
    /// `seed + iteration`.
    pub seed: u64,
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    pub reference: bool,
    pub prompts: Vec<RequestPrompt>,
}

impl RolloutRequest {
    /// The request restricted to some of its prompts (a worker's share).
    pub fn subset(&self, prompts: Vec<RequestPrompt>) -> RolloutRequest {
        RolloutRequest {
            prompts,
            ..self.clone()
        }
    }
}

/// One sampled answer, scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The prompt's position in the iteration and the sample's index among its answers.
    pub position: usize,
    pub sample: usize,
    /// Prompt and answer tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// The policy's log-prob of each answer token, recorded while sampling.
    pub logprobs: Vec<f32>,
    pub response_text: String,
    pub score: f64,
    /// The reference model's log-prob of each answer token, when asked for.
    pub reference_logprobs: Option<Vec<f32>>,
}

/// Samples, scores and reference log-probs for a rollout: in this process or elsewhere.
pub trait Collector {
    /// The samples of `request` drawn from `policy` (the learner's current weights; a remote
    /// collector sends them to its workers first). Any order; every (position, sample) once.
    fn collect(&mut self, policy: &mut Model, request: &RolloutRequest) -> Result<Vec<Sample>>;
}

/// The random stream of sample `sample` of the prompt at `position`.
pub fn sample_stream(position: usize, sample: usize) -> u64 {
    ((position as u64) << 32) | sample as u64
}

/// Samples and scores `request` with models in this process.
pub fn collect_samples(
    policy: &Model,
    reference: Option<&Model>,
    reward: &Reward<'_>,
    request: &RolloutRequest,
) -> Result<Vec<Sample>> {
    let k = request.samples_per_prompt;
    if k == 0 || request.max_new_tokens == 0 {
        return Err(Error::invalid(
            "a rollout needs at least one sample per prompt and one new token",
        ));
    }
    if request
        .prompts
        .iter()
        .any(|p| p.position > u32::MAX as usize)
        || k > u32::MAX as usize
    {
        return Err(Error::invalid(
            "prompt position or sample count out of range",
        ));
    }
    let mut inputs: Vec<&[u32]> = Vec::new();
    let mut streams = Vec::new();
    let mut ids = Vec::new();
    for p in &request.prompts {
        for j in 0..k {
            inputs.push(p.tokens.as_slice());
            streams.push(sample_stream(p.position, j));
            ids.push((p, j));
        }
    }
    let params = SamplingParams {
        max_new_tokens: request.max_new_tokens,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        stop_token_ids: None,
        seed: request.seed.wrapping_add(request.iteration as u64),
    };
    let outs = policy.generate_streams(&inputs, &params, &streams, None)?;
    let tok = policy.require_tokenizer()?;
    let mut r = Rollout::default();
    let mut samples = Vec::with_capacity(outs.len());
    for ((p, j), out) in ids.iter().zip(outs) {
        let mut seq = p.tokens.clone();
        seq.extend(&out.tokens);
        r.masks
            .push((0..seq.len()).map(|t| t >= p.tokens.len()).collect());
        r.seqs.push(seq.clone());
        r.prompt_text.push(p.text.clone());
        let text = tok.decode(&out.tokens, true)?;
        r.response_text.push(text.clone());
        samples.push(Sample {
            position: p.position,
            sample: *j,
            tokens: seq,
            prompt_len: p.tokens.len(),
            logprobs: out.logprobs,
            response_text: text,
            score: 0.0,
            reference_logprobs: None,
        });
    }
    if samples.is_empty() {
        return Ok(samples);
    }
    let same = match reward {
        Reward::Model(rm) => same_tokenizer(policy, rm),
        Reward::Function(_) => true,
    };
    for (s, score) in samples.iter_mut().zip(scores(reward, policy, same, &r)?) {
        s.score = score;
    }
    if request.reference {
        let reference = reference.ok_or_else(|| {
            Error::invalid("this rollout needs reference log-probs but no reference model")
        })?;
        for (s, lp) in samples
            .iter_mut()
            .zip(response_logprobs(reference, &r.seqs, &r.masks)?)
        {
            s.reference_logprobs = Some(lp);
        }
    }
    Ok(samples)
}

/// The in-process collector: the policy samples, `reward` scores, `reference` gives the KL
/// baseline.
pub struct LocalCollector<'a> {
    pub reference: Option<&'a Model>,
    pub reward: Reward<'a>,
}

impl Collector for LocalCollector<'_> {
    fn collect(&mut self, policy: &mut Model, request: &RolloutRequest) -> Result<Vec<Sample>> {
        collect_samples(policy, self.reference, &self.reward, request)
    }
}

/// One iteration's samples, in (position, sample) order.
#[derive(Default)]
struct Rollout {
    seqs: Vec<Vec<u32>>,
    masks: Vec<Vec<bool>>,
    /// Log-probs `generate` recorded for each response token.
    old: Vec<Vec<f64>>,
    prompt_text: Vec<String>,
    response_text: Vec<String>,
    score: Vec<f64>,
    reference: Option<Vec<Vec<f64>>>,
    generated: usize,
}

/// Asks `collector` for the samples of `prompts` and puts them in order, checking that each
/// (position, sample) came back exactly once and whole.
fn rollout(
    collector: &mut dyn Collector,
    policy: &mut Model,
    prompts: &[&Prompt],
    it: usize,
    opts: &RolloutOptions,
    reference: bool,
) -> Result<Rollout> {
    let k = opts.samples_per_prompt;
    let request = RolloutRequest {
        iteration: it,
        seed: opts.seed,
        samples_per_prompt: k,
        max_new_tokens: opts.max_new_tokens,
        reference,
        prompts: prompts
            .iter()
            .enumerate()
            .map(|(position, p)| RequestPrompt {
                position,
                tokens: p.tokens.clone(),
                text: p.text.clone(),
            })
            .collect(),
    };
    let mut samples = collector.collect(policy, &request)?;
    samples.sort_by_key(|s| (s.position, s.sample));
    let bad = |what: String| Error::invalid(format!("rollout of iteration {it}: {what}"));
    if samples.len() != prompts.len() * k {
        return Err(bad(format!(
            "{} samples came back, {} expected",
            samples.len(),
            prompts.len() * k
        )));
    }
    let mut r = Rollout {
        reference: reference.then(Vec::new),
        ..Rollout::default()
    };
    for (i, s) in samples.into_iter().enumerate() {
        let (position, j) = (i / k, i % k);
        let prompt = prompts[position];
        let answer = s.tokens.len().saturating_sub(s.prompt_len);
        if s.position != position
            || s.sample != j
            || s.prompt_len != prompt.tokens.len()
            || s.tokens.get(..s.prompt_len) != Some(prompt.tokens.as_slice())
            || s.logprobs.len() != answer
            || answer > opts.max_new_tokens
            || s.reference_logprobs.as_ref().map(Vec::len) != reference.then_some(answer)
        {
            return Err(bad(format!(
                "sample {j} of prompt {position} is missing, repeated or malformed"
            )));
        }
        r.masks
            .push((0..s.tokens.len()).map(|t| t >= s.prompt_len).collect());
        r.old.push(s.logprobs.iter().map(|&x| x as f64).collect());
        if let (Some(all), Some(lp)) = (r.reference.as_mut(), s.reference_logprobs) {
            all.push(lp.iter().map(|&x| x as f64).collect());
        }
        r.generated += answer;
        r.seqs.push(s.tokens);
        r.prompt_text.push(prompt.text.clone());
        r.response_text.push(s.response_text);
        r.score.push(s.score);
    }
    Ok(r)
}

/// The prompts of iteration `it`: consecutive positions of an endless stream of shuffled
/// epochs over the dataset.
fn prompts_of(it: usize, per: usize, n: usize, seed: u64) -> Vec<usize> {
    // One shuffle per epoch the iteration touches (at most a few), not one per prompt.
    let mut order: Option<(usize, Vec<usize>)> = None;
    (it * per..(it + 1) * per)
        .map(|q| {
            let epoch = q / n;
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let o = shuffled(n, seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
                order = Some((epoch, o));
            }
            order.as_ref().map_or(q % n, |(_, o)| o[q % n])
        })
        .collect()
}

/// Log-probs of each response token under `model`.
fn response_logprobs(
    model: &Model,
    seqs: &[Vec<u32>],
    masks: &[Vec<bool>],
) -> Result<Vec<Vec<f32>>> {
    let all = model.logprobs(seqs, 1.0)?;
    Ok(all
        .iter()
        .zip(masks)
        .map(|(lp, m)| {
            lp.iter()
                .zip(&m[1..])
                .filter(|(_, &sel)| sel)
                .map(|(&v, _)| v)
                .collect()
        })
        .collect())
}

/// Whether two models tokenize identically (same tokenizer definition).
fn same_tokenizer(a: &Model, b: &Model) -> bool {
    match (a.tokenizer(), b.tokenizer()) {
        (Some(x), Some(y)) => {
            x.inner().to_string(false).ok() == y.inner().to_string(false).ok()
                && a.config().vocab_size == b.config().vocab_size
        }
        _ => false,
    }
}

fn scores(reward: &Reward<'_>, policy: &Model, same: bool, r: &Rollout) -> Result<Vec<f64>> {
    match reward {
        Reward::Function(f) => Ok(r
            .prompt_text
            .iter()
            .zip(&r.response_text)
            .map(|(p, a)| f(p, a))
            .collect()),
        Reward::Model(rm) if same => Ok(rm
            .reward_scores(&r.seqs)?
            .into_iter()
            .map(f64::from)
            .collect()),
        Reward::Model(rm) => {
            // Different vocabularies: re-tokenise the whole text with the RM's tokenizer.
            let (pt, rt) = (policy.require_tokenizer()?, rm.require_tokenizer()?);
            let seqs = r
                .seqs
                .iter()
                .map(|s| rt.encode(&pt.decode(s, false)?, false))
                .collect::<Result<Vec<_>>>()?;
            Ok(rm
                .reward_scores(&seqs)?
                .into_iter()
                .map(f64::from)
                .collect())
        }
    }
}

fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn rate(tokens: usize, since: Instant) -> f64 {
    tokens as f64 / since.elapsed().as_secs_f64().max(1e-9)
}

/// The mean monitor score of a rollout's answers.
fn monitor_mean(f: &ScoreFn<'_>, r: &Rollout) -> f64 {
    let s: Vec<f64> = r
        .prompt_text
        .iter()
        .zip(&r.response_text)
        .map(|(p, a)| f(p, a))
        .collect();
    mean_std(&s).0
}

/// After an iteration's metrics: a checkpoint when due, and the report if a stop was asked.
fn end_iteration(
    trainer: &Trainer,
    opts: &RolloutOptions,
    metrics: &mut Metrics<'_>,
    it: usize,
    extra: &Value,
    last: &Value,
) -> Result<Option<StageReport>> {
    if metrics.observer().stop_requested() {
        save(trainer, &opts.out, extra)?;
        return Ok(Some(StageReport {
            outcome: Outcome::Interrupted,
            steps: trainer.step_count(),
            last: last.clone(),
            model_dir: None,
        }));
    }
    if it + 1 == opts.iterations
        || (opts.save_every > 0 && (it as u64 + 1).is_multiple_of(opts.save_every))
    {
        save(trainer, &opts.out, extra)?;
    }
    Ok(None)
}

fn finished(trainer: &Trainer, opts: &RolloutOptions, last: Value) -> Result<StageReport> {
    Ok(StageReport {
        outcome: Outcome::Finished,
        steps: trainer.step_count(),
        last,
        model_dir: Some(save_final(trainer, &opts.out)?),
    })
}

/// What the on-policy stages share: prompts, scoring, output, and the iteration cursor.
pub struct OnPolicy<'a> {
    pub prompts: &'a [Prompt],
    /// A second scorer reported beside the reward (e.g. the true labeller), so a policy that
    /// fools the reward model shows.
    pub monitor: Option<&'a ScoreFn<'a>>,
    pub options: RolloutOptions,
}

impl OnPolicy<'_> {
    /// The prompts of iteration `it`.
    fn prompts_for(&self, it: usize) -> Vec<&Prompt> {
        let o = &self.options;
        prompts_of(it, o.prompts_per_iteration, self.prompts.len(), o.seed)
            .into_iter()
            .map(|i| &self.prompts[i])
            .collect()
    }
}

fn start_iteration(resume: Option<&Value>, stage: &str) -> Result<(usize, Value)> {
    match resume {
        None => Ok((0, Value::Null)),
        Some(e) if e["stage"].as_str() == Some(stage) => Ok((
            e["iteration"]
                .as_u64()
                .ok_or_else(|| Error::invalid("checkpoint lacks `iteration`"))?
                as usize,
            e["state"].clone(),
        )),
        Some(e) => Err(Error::invalid(format!(
            "the checkpoint is from stage `{}`, not `{stage}`",
            e["stage"].as_str().unwrap_or("?")
        ))),
    }
}

/// PPO against a reward, with a KL penalty to the reference (the SFT model); `collector`
/// holds both. The policy needs a value head (`add_value_head`).
pub fn ppo(
    trainer: &mut Trainer,
    collector: &mut dyn Collector,
    job: &OnPolicy<'_>,
    config: &PpoConfig,
    adaptive: Option<AdaptiveKl>,
    resume: Option<&Value>,
    observer: &mut dyn Observer,
) -> Result<StageReport> {
    let opts = &job.options;
    opts.validate()?;
    if job.prompts.is_empty() {
        return Err(Error::invalid("no prompts"));
    }
    if trainer.model().weights().value.is_none() {
        return Err(Error::invalid(
            "PPO needs a value head on the policy (add_value_head)",
        ));
    }
    let (first, state) = start_iteration(resume, "ppo")?;
    let mut config = config.clone();
    if let Some(c) = state["kl_coef"].as_f64() {
        config.kl_coef = c;
    }
    let mut metrics = Metrics::open(&opts.out, observer, resume.map(|_| trainer.step_count()))?;
    let mut last = Value::Null;
    for it in first..opts.iterations {
        let picked = job.prompts_for(it);
        let seed = opts.seed.wrapping_add(it as u64);
        let obs = metrics.observer();
        obs.phase(&format!("ppo {}/{} rollout", it + 1, opts.iterations), 4);
        let t = Instant::now();
        let r = rollout(collector, trainer.model_mut(), &picked, it, opts, true)?;
        // Sampling, rewards and reference log-probs (one collector call).
        let rollout_tps = rate(r.generated, t);
        obs.advance(1);
        let total: usize = r.seqs.iter().map(Vec::len).sum();
        let t = Instant::now();
        let values_all = trainer.model().values(&r.seqs)?;
        let old_values: Vec<Vec<f64>> = values_all
            .iter()
            .zip(&r.masks)
            .map(|(v, m)| {
                (1..m.len())
                    .filter(|&t| m[t])
                    .map(|t| v[t - 1] as f64)
                    .collect()
            })
            .collect();
        let value_tps = rate(total, t);
        obs.advance(2);
        let score = &r.score;
        let reference_lp = r.reference.as_deref().unwrap_or_default();
        let adv = ppo_advantages(&r.old, reference_lp, &old_values, score, &config)?;
        let t = Instant::now();
        let n = r.seqs.len();
        let mut sums = [0f64; 4];
        let mut first_approx_kl = None;
        let mut steps = 0usize;
        for epoch in 0..opts.epochs {
            let order = shuffled(n, seed ^ (epoch as u64 + 1).wrapping_mul(0x51_7CC1));
            for mb in order.chunks(opts.minibatch_size) {
                let take = |rows: &[Vec<f64>]| -> Vec<Vec<f64>> {
                    mb.iter().map(|&i| rows[i].clone()).collect()
                };
                let seqs: Vec<Vec<u32>> = mb.iter().map(|&i| r.seqs[i].clone()).collect();
                let masks: Vec<Vec<bool>> = mb.iter().map(|&i| r.masks[i].clone()).collect();
                let (old, ov, a, ret) = (
                    take(&r.old),
                    take(&old_values),
                    take(&adv.advantages),
                    take(&adv.returns),
                );
                let batch = PpoMinibatch {
                    sequences: &seqs,
                    masks: &masks,
                    old_logprobs: &old,
                    old_values: &ov,
                    advantages: &a,
                    returns: &ret,
                };
                let (_, s) = trainer.ppo_step(&batch, &config)?;
                for (acc, v) in
                    sums.iter_mut()
                        .zip([s.entropy, s.clip_fraction, s.approx_kl, s.value_loss])
                {
                    *acc += v;
                }
                // The first minibatch is on-policy: its ratios are exactly 1 (approx-KL 0).
                first_approx_kl.get_or_insert(s.approx_kl);
                steps += 1;
            }
        }
        let update_tps = rate(total * opts.epochs, t);
        obs.advance(1);
        obs.end_phase();
        let (reward_mean, reward_std) = mean_std(score);
        let monitor = job.monitor.map(|f| monitor_mean(f, &r));
        let lengths: Vec<f64> = r.old.iter().map(|o| o.len() as f64).collect();
        let k = steps.max(1) as f64;
        last = json!({
            "stage": "ppo", "iteration": it + 1, "step": trainer.step_count(),
            "reward_mean": reward_mean, "reward_std": reward_std, "monitor_score": monitor,
            "kl": adv.kl, "kl_coef": config.kl_coef,
            "entropy": sums[0] / k, "clip_fraction": sums[1] / k, "approx_kl": sums[2] / k,
            "value_loss": sums[3] / k, "first_approx_kl": first_approx_kl,
            "response_length": mean_std(&lengths).0,
            "tokens_per_second": {"rollout": rollout_tps, "values": value_tps,
                                   "update": update_tps},
            "sample": r.response_text.first(),
        });
        metrics.record(&last)?;
        if let Some(ctl) = adaptive {
            config.kl_coef = ctl.update(config.kl_coef, adv.kl, n);
        }
        let extra = json!({"stage": "ppo", "iteration": it + 1,
                           "state": {"kl_coef": config.kl_coef}});
        if let Some(stopped) = end_iteration(trainer, opts, &mut metrics, it, &extra, &last)? {
            return Ok(stopped);
        }
    }
    finished(trainer, opts, last)
}

/// GRPO: k answers per prompt, group-normalised rewards, clipped ratio and (β > 0) a KL term to
/// the reference (the collector's).
pub fn grpo(
    trainer: &mut Trainer,
    collector: &mut dyn Collector,
    job: &OnPolicy<'_>,
    config: &GrpoConfig,
    resume: Option<&Value>,
    observer: &mut dyn Observer,
) -> Result<StageReport> {
    let opts = &job.options;
    opts.validate()?;
    if job.prompts.is_empty() {
        return Err(Error::invalid("no prompts"));
    }
    let k = opts.samples_per_prompt;
    if k < 2 {
        return Err(Error::invalid(
            "GRPO needs at least 2 samples per prompt (k ≥ 2)",
        ));
    }
    let (first, _) = start_iteration(resume, "grpo")?;
    let mut metrics = Metrics::open(&opts.out, observer, resume.map(|_| trainer.step_count()))?;
    let mut last = Value::Null;
    for it in first..opts.iterations {
        let picked = job.prompts_for(it);
        let seed = opts.seed.wrapping_add(it as u64);
        let obs = metrics.observer();
        obs.phase(&format!("grpo {}/{}", it + 1, opts.iterations), 3);
        let t = Instant::now();
        let r = rollout(
            collector,
            trainer.model_mut(),
            &picked,
            it,
            opts,
            config.beta > 0.0,
        )?;
        let rollout_tps = rate(r.generated, t);
        obs.advance(2);
        let score = &r.score;
        let advantages = group_advantages(score, k, config.scale_rewards)?;
        let reference_lp = r.reference.as_ref();
        let n = r.seqs.len();
        let mut sums = [0f64; 3];
        let mut steps = 0usize;
        let t = Instant::now();
        for epoch in 0..opts.epochs {
            let order = shuffled(n, seed ^ (epoch as u64 + 1).wrapping_mul(0x51_7CC1));
            for mb in order.chunks(opts.minibatch_size) {
                let seqs: Vec<Vec<u32>> = mb.iter().map(|&i| r.seqs[i].clone()).collect();
                let masks: Vec<Vec<bool>> = mb.iter().map(|&i| r.masks[i].clone()).collect();
                let adv: Vec<f64> = mb.iter().map(|&i| advantages[i]).collect();
                let old: Vec<Vec<f64>> = mb.iter().map(|&i| r.old[i].clone()).collect();
                let refs: Option<Vec<Vec<f64>>> = reference_lp
                    .as_ref()
                    .map(|rl| mb.iter().map(|&i| rl[i].clone()).collect());
                let batch = GrpoBatch {
                    sequences: &seqs,
                    masks: &masks,
                    advantages: &adv,
                    old_logprobs: Some(&old),
                    ref_logprobs: refs.as_deref(),
                };
                let (_, s) = trainer.grpo_step(&batch, config)?;
                sums[0] += s.kl;
                sums[1] += s.clip_fraction;
                sums[2] += s.entropy;
                steps += 1;
            }
        }
        let total: usize = r.seqs.iter().map(Vec::len).sum();
        let update_tps = rate(total * opts.epochs, t);
        obs.advance(1);
        obs.end_phase();
        let (reward_mean, reward_std) = mean_std(score);
        let monitor = job.monitor.map(|f| monitor_mean(f, &r));
        let lengths: Vec<f64> = r.old.iter().map(|o| o.len() as f64).collect();
        let kk = steps.max(1) as f64;
        last = json!({
            "stage": "grpo", "iteration": it + 1, "step": trainer.step_count(),
            "reward_mean": reward_mean, "reward_std": reward_std, "monitor_score": monitor,
            "kl": sums[0] / kk, "clip_fraction": sums[1] / kk, "entropy": sums[2] / kk,
            "response_length": mean_std(&lengths).0,
            "tokens_per_second": {"rollout": rollout_tps, "update": update_tps},
            "sample": r.response_text.first(),
        });
        metrics.record(&last)?;
        let extra = json!({"stage": "grpo", "iteration": it + 1, "state": null});
        if let Some(stopped) = end_iteration(trainer, opts, &mut metrics, it, &extra, &last)? {
            return Ok(stopped);
        }
    }
    finished(trainer, opts, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_stream_covers_each_epoch_once() {
        let mut seen: Vec<usize> = (0..5).flat_map(|it| prompts_of(it, 2, 10, 7)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert!(
            (AdaptiveKl {
                target: 6.0,
                horizon: 10000.0
            }
            .update(0.1, 12.0, 100)
                - 0.1002)
                .abs()
                < 1e-12
        );
    }
}
