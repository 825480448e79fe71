//! LoRA: a trainable low-rank update on chosen linear maps, `y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ` with
//! `A (r, in)`, `B (out, r)` and `s = alpha / r` (PEFT's defaults: `A` Kaiming-uniform, `B`
//! zero, so a fresh adapter changes nothing). While adapters are attached the base weights are
//! frozen: no gradient is computed or stored for them and the optimizer holds moments for the
//! adapters only (plus any score or value head, which stay trainable as PEFT's
//! `modules_to_save`). The forward and backward of an adapter live here; attaching, merging and
//! the PEFT adapter files too.
//!
//! [`Model::without_lora`] gives the frozen reference model: a clone that shares every base
//! weight with the policy (no second copy) and has no adapters.

use std::path::Path;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::backend::cpu::matmul::{matmul, matmul_backward};
use crate::config::Family;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::SafetensorsCheckpoint;

use super::backward::add;
use super::weights::Linear;
use super::Model;

/// Which maps get adapters and how large they are.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    /// Module names as PEFT matches them (by suffix): for the Llama family `q_proj`,
    /// `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`; for GPT-2 `c_proj`
    /// (attention and MLP outputs), `attn.c_proj`, `mlp.c_proj`, `c_fc`. `all-linear` takes
    /// every one of them.
    pub target_modules: Vec<String>,
    /// Seed of `A`'s initialisation.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// Rank `rank`, scale numerator `alpha`, on `q_proj` and `v_proj` (PEFT's default for
    /// Llama); set `target_modules` for others.
    pub fn new(rank: usize, alpha: f32) -> Self {
        LoraConfig {
            rank,
            alpha,
            ..Default::default()
        }
    }
}

/// One adapter: `A (r, in)`, `B (out, r)` and the scale `alpha / r`.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f32,
}

impl LoraAdapter {
    pub fn rank(&self) -> usize {
        self.a.shape()[0]
    }

    /// `out += s · (x·Aᵀ)·Bᵀ` for `t` rows.
    pub(crate) fn forward_add(&self, out: &mut [f32], x: &[f32], t: usize) {
        let (r, k) = (self.a.shape()[0], self.a.shape()[1]);
        let n = self.b.shape()[0];
        let mut u = vec![0f32; t * r];
        matmul(&mut u, &x[..t * k], self.a.as_slice(), None, t, r, k);
        let mut z = vec![0f32; t * n];
        matmul(&mut z, &u, self.b.as_slice(), None, t, n, r);
        for (o, z) in out[..t * n].iter_mut().zip(&z) {
            *o += self.scale * z;
        }
    }

    /// Gradients of the adapter given `dout` (t, out) and its input `x` (t, in):
    /// `dB += s·doutᵀ·u`, `dA += (s·dout·B)ᵀ·x`, and `dx += s·dout·B·A` when `dx` is given.
    pub(crate) fn backward(
        &self,
        dx: Option<&mut [f32]>,
        grad: &mut LoraGrad,
        dout: &[f32],
        x: &[f32],
        t: usize,
    ) {
        let (r, k) = (self.a.shape()[0], self.a.shape()[1]);
        let n = self.b.shape()[0];
        let mut u = vec![0f32; t * r];
        matmul(&mut u, &x[..t * k], self.a.as_slice(), None, t, r, k);
        let dz: Vec<f32> = dout[..t * n].iter().map(|d| d * self.scale).collect();
        let mut du = vec![0f32; t * r];
        matmul_backward(
            Some(&mut du),
            Some(&mut grad.b),
            None,
            &dz,
            &u,
            self.b.as_slice(),
            t,
            n,
            r,
        );
        let mut dx_lora = dx.as_ref().map(|_| vec![0f32; t * k]);
        matmul_backward(
            dx_lora.as_deref_mut(),
            Some(&mut grad.a),
            None,
            &du,
            &x[..t * k],
            self.a.as_slice(),
            t,
            r,
            k,
        );
        if let (Some(dx), Some(extra)) = (dx, dx_lora) {
            add(&mut dx[..t * k], &extra);
        }
    }
}

/// Gradient of one adapter, laid out like it.
#[derive(Debug, Clone)]
pub struct LoraGrad {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// Names of a layer's linear maps in [`super::weights::Layer::linears`] order: the short
/// name PEFT targets and the module path under the layer.
fn module_names(family: Family) -> &'static [(&'static str, &'static str)] {
    match family {
        Family::Llama => &[
            ("q_proj", "self_attn.q_proj"),
            ("k_proj", "self_attn.k_proj"),
            ("v_proj", "self_attn.v_proj"),
            ("o_proj", "self_attn.o_proj"),
            ("gate_proj", "mlp.gate_proj"),
            ("up_proj", "mlp.up_proj"),
            ("down_proj", "mlp.down_proj"),
        ],
        // q, k, v are one fused `c_attn` in GPT-2 checkpoints.
        Family::Gpt2 => &[
            ("c_attn", "attn.c_attn"),
            ("c_attn", "attn.c_attn"),
            ("c_attn", "attn.c_attn"),
            ("c_proj", "attn.c_proj"),
            ("c_fc", "mlp.c_fc"),
            ("c_proj", "mlp.c_proj"),
        ],
    }
}

/// Whether PEFT's suffix matching of `target` selects the module at `path`.
fn matches(target: &str, path: &str) -> bool {
    path == target || path.ends_with(&format!(".{target}"))
}

/// Prefix of layer `l` in the HF checkpoint (PEFT names add `base_model.model.`).
fn layer_prefix(family: Family, l: usize) -> String {
    match family {
        Family::Llama => format!("model.layers.{l}"),
        Family::Gpt2 => format!("transformer.h.{l}"),
    }
}

/// Which of a layer's linear maps (by index) the targets select; errors name a target that
/// selects nothing.
fn selected(family: Family, targets: &[String]) -> Result<Vec<bool>> {
    let names = module_names(family);
    let mut chosen = vec![false; names.len()];
    for target in targets {
        let mut hit = false;
        for (i, (_, path)) in names.iter().enumerate() {
            if target == "all-linear" || matches(target, path) {
                chosen[i] = true;
                hit = true;
            }
        }
        if !hit {
            let mut available: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
            available.dedup();
            return Err(Error::invalid(format!(
                "LoRA target `{target}` matches no module of this model (available: {}, \
                 all-linear)",
                available.join(", ")
            )));
        }
    }
    if family == Family::Gpt2 && chosen[0] {
        return Err(Error::Unsupported(
            "LoRA on GPT-2's fused c_attn (rlx splits it into q, k, v); target c_proj or c_fc"
                .into(),
        ));
    }
    Ok(chosen)
}

/// `n` values uniform in `[−bound, bound)` from `rng`.
fn uniform(rng: &mut ChaCha8Rng, n: usize, bound: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * u - 1.0) * bound) as f32
        })
        .collect()
}

impl Model {
    /// Attaches fresh LoRA adapters (`A` Kaiming-uniform as PEFT draws it, `B = 0`) and freezes
    /// the base weights. Errors leave the model unchanged.
    pub fn attach_lora(&mut self, config: &LoraConfig) -> Result<()> {
        if self.weights().lora.is_some() {
            return Err(Error::invalid("this model already has LoRA adapters"));
        }
        if config.rank == 0 || !(config.alpha.is_finite() && config.alpha > 0.0) {
            return Err(Error::invalid(format!(
                "LoRA needs rank ≥ 1 and alpha > 0, got rank {} and alpha {}",
                config.rank, config.alpha
            )));
        }
        if config.target_modules.is_empty() {
            return Err(Error::invalid("LoRA needs at least one target module"));
        }
        let chosen = selected(self.config().family(), &config.target_modules)?;
        let (r, scale) = (config.rank, config.alpha / config.rank as f32);
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        for layer in &mut self.weights_mut().layers {
            for (lin, &on) in layer.linears_mut().into_iter().zip(&chosen) {
                if !on {
                    continue;
                }
                let (n, k) = (lin.w.shape()[0], lin.w.shape()[1]);
                if r > n.min(k) {
                    return Err(Error::invalid(format!(
                        "LoRA rank {r} exceeds the smaller side of a {n}×{k} map"
                    )));
                }
                // kaiming_uniform_(a = √5) on an (r, k) matrix: bound 1/√k.
                let a = Tensor::owned(
                    uniform(&mut rng, r * k, 1.0 / (k as f64).sqrt()),
                    vec![r, k],
                );
                let b = Tensor::owned(vec![0.0; n * r], vec![n, r]);
                if let (Some(a), Some(b)) = (a, b) {
                    lin.lora = Some(LoraAdapter { a, b, scale });
                }
            }
        }
        self.weights_mut().lora = Some(config.clone());
        Ok(())
    }

    /// The model without its adapters: the frozen reference of LoRA training. It shares every
    /// base weight with `self` (no copy is made).
    pub fn without_lora(&self) -> Model {
        let mut reference = self.clone();
        strip(&mut reference);
        // On CUDA the clone gets its own device copy without adapters. Should that upload
        // fail (device memory), the copy stays marked stale: its CUDA calls then return an
        // error saying so (`Model::sync_device` retries), never the adapted weights.
        let _ = reference.sync_device();
        reference
    }

    /// Folds every adapter into its base weight (`W += s·B·A`) and removes the adapters, for
    /// export as a plain model.
    pub fn merge_lora(&mut self) -> Result<()> {
        if self.weights().lora.is_none() {
            return Err(Error::invalid("this model has no LoRA adapters to merge"));
        }
        for layer in &mut self.weights_mut().layers {
            for lin in layer.linears_mut() {
                if let Some(ad) = lin.lora.take() {
                    let (n, k, r) = (lin.w.shape()[0], lin.w.shape()[1], ad.rank());
                    let (a, b) = (ad.a.as_slice(), ad.b.as_slice());
                    let w = lin.w.as_mut_slice();
                    for i in 0..n {
                        for j in 0..r {
                            let bij = ad.scale * b[i * r + j];
                            for (wv, av) in
                                w[i * k..(i + 1) * k].iter_mut().zip(&a[j * k..(j + 1) * k])
                            {
                                *wv += bij * av;
                            }
                        }
                    }
                }
            }
        }
        self.weights_mut().lora = None;
        Ok(())
    }

    /// Writes the adapters as a PEFT LoRA adapter folder: `adapter_model.safetensors` and
    /// `adapter_config.json` (files written to temporary names, synced, then renamed).
    /// `base_model` is recorded as `base_model_name_or_path`.
    pub fn save_lora_adapter(&self, dir: &Path, base_model: &str) -> Result<()> {
        let config = self
            .weights()
            .lora
            .as_ref()
            .ok_or_else(|| Error::invalid("this model has no LoRA adapters to save"))?;
        let family = self.config().family();
        let names = module_names(family);
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for (l, layer) in self.weights().layers.iter().enumerate() {
            for (lin, (_, path)) in layer.linears().into_iter().zip(names) {
                if let Some(ad) = &lin.lora {
                    let p = format!("base_model.model.{}.{path}", layer_prefix(family, l));
                    for (part, t) in [("lora_A", &ad.a), ("lora_B", &ad.b)] {
                        tensors.push((
                            format!("{p}.{part}.weight"),
                            t.shape().to_vec(),
                            t.as_slice().to_vec(),
                        ));
                    }
                }
            }
        }
        let adapter_config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": config.rank,
            "lora_alpha": config.alpha,
            "target_modules": config.target_modules,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": family == Family::Gpt2,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": Value::Null,
        });
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::convert::write_safetensors_atomically(
            &dir.join("adapter_model.safetensors"),
            tensors,
        )?;
        crate::convert::write_json_atomically(&dir.join("adapter_config.json"), &adapter_config)
    }

    /// Attaches the adapters of a PEFT LoRA folder (`adapter_config.json` +
    /// `adapter_model.safetensors`) saved for this architecture. Errors leave the model
    /// unchanged.
    pub fn load_lora_adapter(&mut self, dir: &Path) -> Result<()> {
        if self.weights().lora.is_some() {
            return Err(Error::invalid("this model already has LoRA adapters"));
        }
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: cfg_path.clone(),
            message: e.to_string(),
        })?;
        let bad = |what: &str| Error::Config(format!("{}: {what}", cfg_path.display()));
        if v["peft_type"].as_str() != Some("LORA") {
            return Err(bad("peft_type must be LORA"));
        }
        let non_empty = |key: &str| v[key].as_object().is_some_and(|o| !o.is_empty());
        if v["use_dora"].as_bool() == Some(true)
            || v["use_rslora"].as_bool() == Some(true)
            || v["lora_bias"].as_bool() == Some(true)
            || non_empty("rank_pattern")
            || non_empty("alpha_pattern")
        {
            return Err(Error::Unsupported(
                "DoRA, rsLoRA, LoRA biases and per-module ranks; plain LoRA only".into(),
            ));
        }
        let rank = v["r"]
            .as_u64()
            .filter(|&r| r > 0 && r <= 1 << 16)
            .ok_or_else(|| bad("`r` must be a positive integer"))? as usize;
        let alpha = v["lora_alpha"]
            .as_f64()
            .filter(|a| a.is_finite() && *a > 0.0)
            .ok_or_else(|| bad("`lora_alpha` must be a positive number"))?
            as f32;
        let targets: Vec<String> = match &v["target_modules"] {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .map(|t| t.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("`target_modules` must be strings"))?,
            _ => return Err(bad("`target_modules` is missing")),
        };
        let st_path = dir.join("adapter_model.safetensors");
        let ck = SafetensorsCheckpoint::open_files(std::slice::from_ref(&st_path))?;
        let family = self.config().family();
        let names = module_names(family);
        let scale = alpha / rank as f32;
        let mut staged = self.weights().layers.clone();
        let mut found = 0;
        for (l, layer) in staged.iter_mut().enumerate() {
            for (lin, (_, path)) in layer.linears_mut().into_iter().zip(names) {
                let p = format!("base_model.model.{}.{path}", layer_prefix(family, l));
                let (a_name, b_name) = (format!("{p}.lora_A.weight"), format!("{p}.lora_B.weight"));
                if !ck.contains(&a_name) {
                    continue;
                }
                let (n, k) = (lin.w.shape()[0], lin.w.shape()[1]);
                lin.lora = Some(LoraAdapter {
                    a: ck.tensor(&a_name, &[rank, k])?,
                    b: ck.tensor(&b_name, &[n, rank])?,
                    scale,
                });
                found += 1;
            }
        }
        let lora_tensors = ck.names().filter(|n| n.contains(".lora_")).count();
        if found == 0 || lora_tensors != 2 * found {
            return Err(Error::format(
                &st_path,
                format!(
                    "{lora_tensors} LoRA tensors, of which {} belong to this model's linear \
                     maps (rlx adapts attention and MLP projections only)",
                    2 * found
                ),
            ));
        }
        let w = self.weights_mut();
        w.layers = staged;
        w.lora = Some(LoraConfig {
            rank,
            alpha,
            target_modules: targets,
            seed: 0,
        });
        Ok(())
    }
}

fn strip(model: &mut Model) {
    // Nothing to strip: leave the weights untouched (asking for them mutably would mark a
    // CUDA model's device copy stale).
    let w = model.weights();
    let attached = w.lora.is_some()
        || w.layers
            .iter()
            .any(|l| l.linears().iter().any(|lin| lin.lora.is_some()));
    if !attached {
        return;
    }
    let w = model.weights_mut();
    for layer in &mut w.layers {
        for lin in layer.linears_mut() {
            lin.lora = None;
        }
    }
    w.lora = None;
}

/// Adds the adapter's contribution of `lin` to `out` when it has one.
pub(crate) fn add_adapter(out: &mut [f32], x: &[f32], lin: &Linear, t: usize) {
    if let Some(ad) = &lin.lora {
        ad.forward_add(out, x, t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_by_suffix() {
        assert!(matches("q_proj", "self_attn.q_proj"));
        assert!(matches("self_attn.q_proj", "self_attn.q_proj"));
        assert!(!matches("proj", "self_attn.q_proj"));
        assert_eq!(
            selected(Family::Gpt2, &["c_proj".into()]).unwrap(),
            vec![false, false, false, true, false, true]
        );
        assert!(selected(Family::Llama, &["q".into()]).is_err());
        assert!(selected(Family::Gpt2, &["c_attn".into()]).is_err());
    }
}
