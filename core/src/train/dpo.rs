//! Direct Preference Optimization on policy and reference log-probs (as TRL computes it).
//!
//! For a pair, `h = (π_c − ρ_c) − (π_r − ρ_r)`, where π is the policy's and ρ the reference's
//! log-likelihood of the chosen (c) and rejected (r) responses over their masked tokens. Losses,
//! averaged over pairs: `sigmoid` −log σ(βh) (the DPO paper), `hinge` max(0, 1 − βh) (SLiC), and
//! `ipo` (h − 1/(2β))² with π, ρ averaged over tokens instead of summed (as TRL's IPO does).

use crate::error::{Error, Result};
use crate::model::{Gradients, Model};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpoLoss {
    Sigmoid,
    Ipo,
    Hinge,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DpoStats {
    pub loss: f64,
    /// Fraction of pairs whose implicit reward β(π − ρ) is higher for the chosen response.
    pub accuracy: f64,
    /// Mean of h over pairs.
    pub mean_margin: f64,
}

/// The per-pair loss and its derivative in `h`.
pub fn pair_loss(kind: DpoLoss, beta: f64, h: f64) -> (f64, f64) {
    match kind {
        DpoLoss::Sigmoid => {
            let z = beta * h;
            // −log σ(z) = softplus(−z), stably; d/dz = −σ(−z).
            let loss = if z > 0.0 {
                (-z).exp().ln_1p()
            } else {
                -z + z.exp().ln_1p()
            };
            (loss, -beta / (1.0 + z.exp()))
        }
        DpoLoss::Hinge => {
            let z = beta * h;
            if z < 1.0 {
                (1.0 - z, -beta)
            } else {
                (0.0, 0.0)
            }
        }
        DpoLoss::Ipo => {
            let d = h - 1.0 / (2.0 * beta);
            (d * d, 2.0 * d)
        }
    }
}

impl Model {
    /// The DPO loss over pairs and the gradient of every policy parameter. `ref_chosen` and
    /// `ref_rejected` are the reference model's log-likelihoods of the same masked tokens
    /// (summed; per-token averages for `ipo`), e.g. from `masked_logprob_sums` of a frozen copy.
    #[allow(clippy::too_many_arguments)]
    pub fn dpo_gradients<S: AsRef<[u32]> + Sync>(
        &self,
        chosen: &[S],
        chosen_masks: &[Vec<bool>],
        rejected: &[S],
        rejected_masks: &[Vec<bool>],
        ref_chosen: &[f64],
        ref_rejected: &[f64],
        beta: f64,
        kind: DpoLoss,
    ) -> Result<(DpoStats, Gradients)> {
        let pairs = chosen.len();
        if pairs == 0
            || rejected.len() != pairs
            || ref_chosen.len() != pairs
            || ref_rejected.len() != pairs
        {
            return Err(Error::invalid(
                "DPO needs the same non-zero number of chosen, rejected and reference values",
            ));
        }
        if !(beta.is_finite() && beta > 0.0) {
            return Err(Error::invalid(format!("beta must be positive, got {beta}")));
        }
        if ref_chosen
            .iter()
            .chain(ref_rejected)
            .any(|v| !v.is_finite())
        {
            return Err(Error::invalid("reference log-probs must be finite"));
        }
        if chosen_masks.len() != pairs || rejected_masks.len() != pairs {
            return Err(Error::invalid(
                "one mask per chosen and per rejected sequence is required",
            ));
        }
        if let Some(i) = chosen_masks
            .iter()
            .chain(rejected_masks)
            .position(|m| !m.contains(&true))
        {
            return Err(Error::invalid(format!(
                "response mask {i} selects no tokens"
            )));
        }
        let sequences: Vec<&[u32]> = chosen
            .iter()
            .map(AsRef::as_ref)
            .chain(rejected.iter().map(AsRef::as_ref))
            .collect();
        let masks: Vec<Vec<bool>> = chosen_masks.iter().chain(rejected_masks).cloned().collect();
        let mut stats = DpoStats {
            loss: 0.0,
            accuracy: 0.0,
            mean_margin: 0.0,
        };
        let average = kind == DpoLoss::Ipo;
        let mut objective = |logps: &[Vec<f64>]| -> Result<(f64, Vec<Vec<f64>>)> {
            let pi: Vec<f64> = logps
                .iter()
                .map(|l| {
                    let sum: f64 = l.iter().sum();
                    if average {
                        sum / l.len() as f64
                    } else {
                        sum
                    }
                })
                .collect();
            let mut d: Vec<Vec<f64>> = logps.iter().map(|l| vec![0.0; l.len()]).collect();
            let (mut loss, mut correct, mut margin) = (0.0, 0usize, 0.0);
            for p in 0..pairs {
                let h = (pi[p] - ref_chosen[p]) - (pi[pairs + p] - ref_rejected[p]);
                let (l, dh) = pair_loss(kind, beta, h);
                loss += l / pairs as f64;
                margin += h / pairs as f64;
                correct += usize::from(h > 0.0);
                for (seq, sign) in [(p, 1.0), (pairs + p, -1.0)] {
                    let per_token = if average {
                        1.0 / d[seq].len() as f64
                    } else {
                        1.0
                    };
                    d[seq].fill(sign * dh / pairs as f64 * per_token);
                }
            }
            stats = DpoStats {
                loss,
                accuracy: correct as f64 / pairs as f64,
                mean_margin: margin,
            };
            Ok((loss, d))
        };
        let (_, grads) = self.logprob_objective_gradients(&sequences, &masks, &mut objective)?;
        Ok((stats, grads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_losses_and_derivatives() {
        for kind in [DpoLoss::Sigmoid, DpoLoss::Hinge, DpoLoss::Ipo] {
            for h in [-3.0, -0.4, 0.3, 2.5, 40.0] {
                let (_, d) = pair_loss(kind, 0.5, h);
                let eps = 1e-6;
                let fd = (pair_loss(kind, 0.5, h + eps).0 - pair_loss(kind, 0.5, h - eps).0)
                    / (2.0 * eps);
                assert!((fd - d).abs() < 1e-5, "{kind:?} at {h}: {fd} vs {d}");
            }
        }
        // −log σ(0) = ln 2; no overflow far out.
        assert!((pair_loss(DpoLoss::Sigmoid, 1.0, 0.0).0 - std::f64::consts::LN_2).abs() < 1e-12);
        assert!(pair_loss(DpoLoss::Sigmoid, 1.0, -1e4).0.is_finite());
    }
}
