//! The supervised stages: SFT on demonstrations, the reward model on preference pairs, and DPO
//! on the same pairs. One loop serves all three: epochs over a shuffled dataset, micro-batches
//! accumulated into optimizer steps (weighted by tokens for SFT, by pairs otherwise),
//! checkpoints with the data cursor, and a stop check after every step.

use std::time::Instant;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::{Gradients, Model};
use crate::train::dpo::DpoLoss;
use crate::train::Trainer;

use super::data::{Example, PreferencePair};
use super::{
    save, save_final, shuffled, Cursor, Metrics, Observer, Outcome, RunOptions, StageReport,
};

/// One micro-batch's result: loss, gradients, weight in the step's mean, and metrics.
type Micro = (f64, Gradients, f64, Value);

/// Runs `micro` over `n` items for `opts.epochs` epochs from `start`, stepping `trainer`.
#[allow(clippy::too_many_arguments)]
fn run(
    stage: &str,
    trainer: &mut Trainer,
    n: usize,
    opts: &RunOptions,
    start: Cursor,
    state: &Value,
    observer: &mut dyn Observer,
    mut micro: impl FnMut(&Model, &[usize]) -> Result<Micro>,
) -> Result<StageReport> {
    opts.validate()?;
    if n == 0 {
        return Err(Error::invalid("the dataset is empty"));
    }
    let mut metrics = Metrics::open(
        &opts.out,
        observer,
        // A trainer past step 0 was resumed from a checkpoint.
        (trainer.step_count() > 0).then(|| trainer.step_count()),
    )?;
    let per_epoch = n.div_ceil(opts.batch_size);
    let mut last = Value::Null;
    let mut acc_metrics: Vec<Value> = Vec::new();
    let extra = |c: Cursor| json!({"stage": stage, "cursor": c.to_json(), "state": state});
    let mut since = Instant::now();
    for epoch in start.epoch..opts.epochs {
        let order = shuffled(n, opts.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
        let first = if epoch == start.epoch { start.batch } else { 0 };
        metrics
            .observer()
            .phase(&format!("{stage} epoch {}", epoch + 1), per_epoch as u64);
        metrics.observer().advance(first as u64);
        for b in first..per_epoch {
            let idx = &order[b * opts.batch_size..((b + 1) * opts.batch_size).min(n)];
            let (loss, grads, weight, m) = trainer.gradients_with(|model| micro(model, idx))?;
            trainer.accumulate(loss, grads, weight)?;
            acc_metrics.push(m);
            metrics.observer().advance(1);
            let end_of_epoch = b + 1 == per_epoch;
            if trainer.pending_micro_batches() < opts.grad_accum && !end_of_epoch {
                continue;
            }
            let stats = trainer.step()?;
            let elapsed = since.elapsed().as_secs_f64();
            since = Instant::now();
            last = json!({
                "stage": stage, "step": stats.step, "epoch": epoch + 1,
                "loss": stats.loss, "grad_norm": stats.grad_norm, "lr": stats.lr,
                "skipped": stats.skipped, "seconds": elapsed,
                "micro": std::mem::take(&mut acc_metrics),
            });
            metrics.record(&last)?;
            let cursor = if end_of_epoch {
                Cursor {
                    epoch: epoch + 1,
                    batch: 0,
                }
            } else {
                Cursor {
                    epoch,
                    batch: b + 1,
                }
            };
            let done = opts.max_steps.is_some_and(|m| trainer.step_count() >= m);
            if metrics.observer().stop_requested() {
                save(trainer, &opts.out, &extra(cursor))?;
                metrics.observer().end_phase();
                return Ok(StageReport {
                    outcome: Outcome::Interrupted,
                    steps: trainer.step_count(),
                    last,
                    model_dir: None,
                });
            }
            if done || (opts.save_every > 0 && trainer.step_count().is_multiple_of(opts.save_every))
            {
                save(trainer, &opts.out, &extra(cursor))?;
            }
            if done {
                metrics.observer().end_phase();
                return finish(trainer, opts, last);
            }
        }
        metrics.observer().end_phase();
    }
    save(
        trainer,
        &opts.out,
        &extra(Cursor {
            epoch: opts.epochs,
            batch: 0,
        }),
    )?;
    finish(trainer, opts, last)
}

fn finish(trainer: &Trainer, opts: &RunOptions, last: Value) -> Result<StageReport> {
    Ok(StageReport {
        outcome: Outcome::Finished,
        steps: trainer.step_count(),
        last,
        model_dir: Some(save_final(trainer, &opts.out)?),
    })
}

/// Where a resumed run continues and the state it saved (`None` for a fresh run).
pub fn resume_point(extra: Option<&Value>, stage: &str) -> Result<(Cursor, Value)> {
    match extra {
        None => Ok((Cursor::default(), Value::Null)),
        Some(e) => {
            if e["stage"].as_str() != Some(stage) {
                return Err(Error::invalid(format!(
                    "the checkpoint is from stage `{}`, not `{stage}`",
                    e["stage"].as_str().unwrap_or("?")
                )));
            }
            Ok((Cursor::from_json(&e["cursor"])?, e["state"].clone()))
        }
    }
}

/// The chosen and the rejected sequences of some pairs.
fn sides<'a>(pairs: &[&'a PreferencePair]) -> (Vec<&'a [u32]>, Vec<&'a [u32]>) {
    pairs
        .iter()
        .map(|p| (p.chosen.tokens.as_slice(), p.rejected.tokens.as_slice()))
        .unzip()
}

fn pick<'a, T>(items: &'a [T], idx: &[usize]) -> Vec<&'a T> {
    idx.iter().map(|&i| &items[i]).collect()
}

/// Supervised fine-tuning: mean cross-entropy over response tokens, micro-batches weighted
/// by their token counts (so accumulation equals one large batch).
pub fn sft(
    trainer: &mut Trainer,
    examples: &[Example],
    opts: &RunOptions,
    resume: Option<&Value>,
    observer: &mut dyn Observer,
) -> Result<StageReport> {
    let (start, _) = resume_point(resume, "sft")?;
    run(
        "sft",
        trainer,
        examples.len(),
        opts,
        start,
        &Value::Null,
        observer,
        |model, idx| {
            let batch = pick(examples, idx);
            let seqs: Vec<&[u32]> = batch.iter().map(|e| e.tokens.as_slice()).collect();
            let masks: Vec<Vec<bool>> = batch.iter().map(|e| e.mask.clone()).collect();
            let tokens = masks
                .iter()
                .map(|m| m.iter().skip(1).filter(|&&x| x).count())
                .sum::<usize>();
            let (loss, grads) = model.sft_gradients(&seqs, &masks)?;
            Ok((
                loss,
                grads,
                tokens as f64,
                json!({"loss": loss, "tokens": tokens}),
            ))
        },
    )
}

/// Settings of the reward-model stage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmOptions {
    pub margin: f32,
}

/// The reward model: pairwise `−log σ(r_c − r_r − margin)` over preference pairs. The model
/// needs a score head (`add_score_head` on the SFT model, as InstructGPT initialised it).
pub fn reward_model(
    trainer: &mut Trainer,
    pairs: &[PreferencePair],
    rm: RmOptions,
    opts: &RunOptions,
    resume: Option<&Value>,
    observer: &mut dyn Observer,
) -> Result<StageReport> {
    if trainer.model().weights().score.is_none() {
        return Err(Error::invalid(
            "the reward model needs a score head (add_score_head)",
        ));
    }
    let (start, _) = resume_point(resume, "rm")?;
    run(
        "rm",
        trainer,
        pairs.len(),
        opts,
        start,
        &Value::Null,
        observer,
        |model, idx| {
            let batch = pick(pairs, idx);
            let (chosen, rejected) = sides(&batch);
            let (stats, grads) = model.reward_pair_gradients(&chosen, &rejected, rm.margin)?;
            Ok((
                stats.loss,
                grads,
                batch.len() as f64,
                json!({"loss": stats.loss, "accuracy": stats.accuracy}),
            ))
        },
    )
}

/// Pairwise accuracy of a reward model: the fraction of pairs whose chosen answer scores
/// higher.
pub fn pairwise_accuracy(model: &Model, pairs: &[PreferencePair]) -> Result<f64> {
    if pairs.is_empty() {
        return Err(Error::invalid("no pairs to evaluate"));
    }
    let mut correct = 0usize;
    for chunk in pairs.chunks(16) {
        let chosen: Vec<&[u32]> = chunk.iter().map(|p| p.chosen.tokens.as_slice()).collect();
        let rejected: Vec<&[u32]> = chunk.iter().map(|p| p.rejected.tokens.as_slice()).collect();
        let rc = model.reward_scores(&chosen)?;
        let rr = model.reward_scores(&rejected)?;
        correct += rc.iter().zip(&rr).filter(|(c, r)| c > r).count();
    }
    Ok(correct as f64 / pairs.len() as f64)
}

/// Settings of the DPO stage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoOptions {
    pub beta: f64,
    pub loss: DpoLoss,
}

/// The reference log-likelihoods DPO needs, for every pair: `(chosen, rejected)`, summed over
/// response tokens (averaged for IPO).
pub fn reference_logps(
    reference: &Model,
    pairs: &[PreferencePair],
    loss: DpoLoss,
    observer: &mut dyn Observer,
) -> Result<Vec<(f64, f64)>> {
    observer.phase("reference log-probs", pairs.len() as u64);
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(8) {
        let mut seqs: Vec<&[u32]> = Vec::new();
        let mut masks: Vec<Vec<bool>> = Vec::new();
        for p in chunk {
            for e in [&p.chosen, &p.rejected] {
                seqs.push(&e.tokens);
                masks.push(e.mask.clone());
            }
        }
        let sums = reference.masked_logprob_sums(&seqs, &masks, 1.0)?;
        for (i, _) in chunk.iter().enumerate() {
            let (c, r) = (sums[2 * i], sums[2 * i + 1]);
            let count = |m: &Vec<bool>| m.iter().skip(1).filter(|&&x| x).count() as f64;
            out.push(if loss == DpoLoss::Ipo {
                (c / count(&masks[2 * i]), r / count(&masks[2 * i + 1]))
            } else {
                (c, r)
            });
        }
        observer.advance(chunk.len() as u64);
    }
    observer.end_phase();
    Ok(out)
}

/// DPO on preference pairs against `reference` (the model before training; with LoRA,
/// `model.without_lora()`). Reference log-likelihoods are computed once and kept in the
/// checkpoints, so a resumed run does not need the reference again.
pub fn dpo(
    trainer: &mut Trainer,
    reference: &Model,
    pairs: &[PreferencePair],
    dpo: DpoOptions,
    opts: &RunOptions,
    resume: Option<&Value>,
    observer: &mut dyn Observer,
) -> Result<StageReport> {
    let (start, state) = resume_point(resume, "dpo")?;
    let refs: Vec<(f64, f64)> = match state["reference_logps"].as_array() {
        Some(saved) if saved.len() == pairs.len() => saved
            .iter()
            .map(|p| match (p[0].as_f64(), p[1].as_f64()) {
                (Some(c), Some(r)) => Ok((c, r)),
                _ => Err(Error::invalid("bad reference log-probs in the checkpoint")),
            })
            .collect::<Result<_>>()?,
        Some(_) => {
            return Err(Error::invalid(
                "the checkpoint was made on a dataset of another size",
            ))
        }
        None => reference_logps(reference, pairs, dpo.loss, observer)?,
    };
    let state = json!({"reference_logps": refs.iter().map(|(c, r)| [c, r]).collect::<Vec<_>>()});
    run(
        "dpo",
        trainer,
        pairs.len(),
        opts,
        start,
        &state,
        observer,
        |model, idx| {
            let batch = pick(pairs, idx);
            let (chosen, rejected) = sides(&batch);
            let cm: Vec<Vec<bool>> = batch.iter().map(|p| p.chosen.mask.clone()).collect();
            let rm: Vec<Vec<bool>> = batch.iter().map(|p| p.rejected.mask.clone()).collect();
            let rc: Vec<f64> = idx.iter().map(|&i| refs[i].0).collect();
            let rr: Vec<f64> = idx.iter().map(|&i| refs[i].1).collect();
            let (stats, grads) =
                model.dpo_gradients(&chosen, &cm, &rejected, &rm, &rc, &rr, dpo.beta, dpo.loss)?;
            Ok((
                stats.loss,
                grads,
                batch.len() as f64,
                json!({"loss": stats.loss, "accuracy": stats.accuracy, "margin": stats.mean_margin}),
            ))
        },
    )
}
