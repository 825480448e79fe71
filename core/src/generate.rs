//! Batched generation: one prefill of all prompts (packed), then one decode step per new token
//! for every sequence still running. Each sequence has its own KV cache, sized for the whole
//! request up front, and its own sampler stream.

use crate::backend::cpu::attention::Slot;
use crate::backend::cpu::softmax::log_prob_of;
use crate::error::{Error, Result};
use crate::kv_cache::{zeroed, KvCache};
use crate::model::{Model, Scratch};
use crate::sampling::{Sampler, SamplingParams};

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced a stop token (kept as its last token).
    Stop,
    /// It reached `max_new_tokens`.
    Length,
    /// The streaming callback asked it to stop.
    Cancelled,
}

/// One sequence's output.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens only (not the prompt).
    pub tokens: Vec<u32>,
    /// For each new token, its log-prob under `softmax(logits / T)` (T = 1 when greedy), before
    /// any penalty or top-k/p filter — what a training forward over the same tokens computes.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// Called for every generated token: (sequence index, token id, its log-prob). Returning
/// `false` stops that sequence.
pub type StreamCallback<'a> = dyn FnMut(usize, u32, f32) -> bool + 'a;

/// One sampled token of one sequence, recorded the same way by every backend.
pub(crate) struct TokenStep {
    pub seq: usize,
    pub token: u32,
    pub logprob: f32,
}

impl TokenStep {
    /// Appends the token to the sequence's output and history, tells the stream callback, and
    /// decides how the sequence goes on: a stop token ends it (`Stop`), a callback returning
    /// false cancels it, reaching `max_new_tokens` ends it at `Length` (the default reason).
    /// Returns whether it keeps generating.
    pub fn record(
        self,
        out: &mut Generation,
        history: &mut Vec<u32>,
        stop: &[u32],
        params: &SamplingParams,
        on_token: Option<&mut StreamCallback<'_>>,
    ) -> bool {
        history.push(self.token);
        out.tokens.push(self.token);
        out.logprobs.push(self.logprob);
        let keep_going = match on_token {
            Some(cb) => cb(self.seq, self.token, self.logprob),
            None => true,
        };
        if stop.contains(&self.token) {
            out.finish_reason = FinishReason::Stop;
            false
        } else if !keep_going {
            out.finish_reason = FinishReason::Cancelled;
            false
        } else {
            out.tokens.len() < params.max_new_tokens
        }
    }
}

impl Model {
    /// Generates a continuation for each prompt. Same `seed` ⇒ same tokens, whatever the batch.
    /// Sequence `i` draws from random stream `i` of `seed`.
    pub fn generate<S: AsRef<[u32]> + Sync>(
        &self,
        prompts: &[S],
        params: &SamplingParams,
        on_token: Option<&mut StreamCallback<'_>>,
    ) -> Result<Vec<Generation>> {
        let streams: Vec<u64> = (0..prompts.len() as u64).collect();
        self.generate_streams(prompts, params, &streams, on_token)
    }

    /// [`Model::generate`] with each sequence's random stream given (`streams[i]` of
    /// `params.seed`), so a sequence's tokens depend only on its own stream, not on its place
    /// in the batch: split a batch across processes and the samples stay the same.
    pub fn generate_streams<S: AsRef<[u32]> + Sync>(
        &self,
        prompts: &[S],
        params: &SamplingParams,
        streams: &[u64],
        mut on_token: Option<&mut StreamCallback<'_>>,
    ) -> Result<Vec<Generation>> {
        params.validate()?;
        if streams.len() != prompts.len() {
            return Err(Error::invalid(format!(
                "{} random streams for {} prompts",
                streams.len(),
                prompts.len()
            )));
        }
        self.require_lm_head()?;
        for p in prompts {
            self.check_tokens(p.as_ref(), params.max_new_tokens)?;
        }
        #[cfg(feature = "cuda")]
        if let Some(g) = self.cuda()? {
            let stop: Vec<u32> = params
                .stop_token_ids
                .clone()
                .unwrap_or_else(|| self.eos_token_ids().to_vec());
            let prompts: Vec<&[u32]> = prompts.iter().map(|p| p.as_ref()).collect();
            return g.generate(
                &prompts,
                params,
                streams,
                on_token,
                &stop,
                params.logprob_temperature(),
            );
        }
        let cfg = self.config();
        // KV caches (K and V per layer per position) and one row of logits per sequence.
        let positions: usize = prompts
            .iter()
            .map(|p| p.as_ref().len().saturating_add(params.max_new_tokens))
            .fold(0usize, usize::saturating_add);
        let needed = crate::memory::f32_bytes(&[positions, 2 * cfg.num_layers, cfg.kv_dim()])
            .saturating_add(crate::memory::f32_bytes(&[prompts.len(), cfg.vocab_size]));
        crate::memory::ensure_fits(needed, "the generation's KV caches")?;
        let stop: Vec<u32> = params
            .stop_token_ids
            .clone()
            .unwrap_or_else(|| self.eos_token_ids().to_vec());
        let lp_temperature = params.logprob_temperature();
        let cfg = self.config();
        let v = cfg.vocab_size;
        // Compute runs on the model's pool; sampling and the callback stay on the caller's thread.
        {
            let n = prompts.len();
            let mut caches = prompts
                .iter()
                .map(|p| KvCache::new(cfg, p.as_ref().len() + params.max_new_tokens))
                .collect::<Result<Vec<_>>>()?;
            let mut samplers: Vec<Sampler> = streams
                .iter()
                .map(|&i| Sampler::new(params.seed, i))
                .collect();
            let mut history: Vec<Vec<u32>> = prompts.iter().map(|p| p.as_ref().to_vec()).collect();
            let mut outs: Vec<Generation> = (0..n)
                .map(|_| Generation {
                    tokens: Vec::with_capacity(params.max_new_tokens),
                    logprobs: Vec::with_capacity(params.max_new_tokens),
                    finish_reason: FinishReason::Length,
                })
                .collect();
            if params.max_new_tokens == 0 || n == 0 {
                return Ok(outs);
            }
            let mut s = Scratch::default();
            let c = cfg.hidden_size;

            // Prefill every distinct prompt once, in one packed call; a repeated prompt (k
            // samples of one prompt) forks the first copy's cache instead of recomputing it.
            // Kernels do not depend on batch composition, so the fork is bitwise what a
            // prefill would have written.
            let mut first_copy: std::collections::HashMap<&[u32], usize> =
                std::collections::HashMap::new();
            let source: Vec<usize> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| *first_copy.entry(p.as_ref()).or_insert(i))
                .collect();
            let mut tokens: Vec<u32> = Vec::new();
            let mut slots: Vec<Slot> = Vec::new();
            let mut last_rows = vec![0usize; n];
            for (i, p) in prompts.iter().enumerate() {
                if source[i] != i {
                    continue;
                }
                let p = p.as_ref();
                tokens.extend_from_slice(p);
                slots.extend((0..p.len()).map(|pos| Slot { seq: i, pos }));
                last_rows[i] = tokens.len() - 1;
            }
            self.install(|| self.forward(&tokens, &slots, &mut caches, &mut s))?;
            let mut hidden = vec![0f32; n * c];
            for i in 0..n {
                let r = last_rows[source[i]];
                hidden[i * c..(i + 1) * c].copy_from_slice(&s.h[r * c..(r + 1) * c]);
                if source[i] != i {
                    caches[i] = caches[source[i]].clone();
                }
            }
            let mut logits = zeroed(n * v)?;
            let mut active: Vec<usize> = (0..n).collect();

            while !active.is_empty() {
                self.install(|| self.lm_head(&mut logits, &hidden, active.len()));
                // Each running sequence's token and log-prob, sequences in parallel (each has
                // its own sampler stream, so the picks do not depend on the thread count).
                let picks = self.install(|| {
                    pick_tokens(
                        &mut samplers,
                        &active,
                        &logits,
                        v,
                        &history,
                        params,
                        lp_temperature,
                    )
                });
                let mut still = Vec::with_capacity(active.len());
                for (&seq, &(tok, lp)) in active.iter().zip(&picks) {
                    let step = TokenStep {
                        seq,
                        token: tok,
                        logprob: lp,
                    };
                    let out = &mut outs[seq];
                    if step.record(
                        out,
                        &mut history[seq],
                        &stop,
                        params,
                        on_token.as_deref_mut(),
                    ) {
                        still.push(seq);
                    }
                }
                active = still;
                if active.is_empty() {
                    break;
                }
                // Decode step: the newest token of every running sequence.
                tokens.clear();
                slots.clear();
                for &seq in &active {
                    let h = &history[seq];
                    tokens.push(h[h.len() - 1]);
                    slots.push(Slot {
                        seq,
                        pos: h.len() - 1,
                    });
                }
                self.install(|| self.forward(&tokens, &slots, &mut caches, &mut s))?;
                hidden[..active.len() * c].copy_from_slice(&s.h[..active.len() * c]);
            }
            Ok(outs)
        }
    }

    /// Text in, text out: encodes `prompt` (with the tokenizer's special tokens), generates, and
    /// decodes the new tokens (skipping special tokens).
    pub fn generate_text(&self, prompt: &str, params: &SamplingParams) -> Result<String> {
        let tok = self.require_tokenizer()?;
        let ids = tok.encode(prompt, true)?;
        let out = self.generate(&[ids], params, None)?;
        let new = out.first().map(|g| g.tokens.as_slice()).unwrap_or_default();
        tok.decode(new, true)
    }
}

/// The next token and its log-prob for each running sequence (`active[row]` reads logits row
/// `row`, rows of `v`), in row order.
fn pick_tokens(
    samplers: &mut [Sampler],
    active: &[usize],
    logits: &[f32],
    v: usize,
    history: &[Vec<u32>],
    params: &SamplingParams,
    lp_temperature: f32,
) -> Vec<(u32, f32)> {
    use rayon::prelude::*;
    let mut row_of = vec![usize::MAX; samplers.len()];
    for (row, &seq) in active.iter().enumerate() {
        row_of[seq] = row;
    }
    let mut picked: Vec<(usize, u32, f32)> = samplers
        .par_iter_mut()
        .enumerate()
        .filter(|(seq, _)| row_of[*seq] != usize::MAX)
        .map(|(seq, sampler)| {
            let row = row_of[seq];
            let l = &logits[row * v..(row + 1) * v];
            let tok = sampler.sample(l, &history[seq], params);
            (row, tok, log_prob_of(l, lp_temperature, tok as usize))
        })
        .collect();
    picked.sort_unstable_by_key(|p| p.0);
    picked.into_iter().map(|(_, tok, lp)| (tok, lp)).collect()
}
