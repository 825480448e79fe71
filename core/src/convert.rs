//! Writing a loaded model (Llama family or GPT-2) as an HF folder that transformers and rlx both load:
//! `config.json`, `model.safetensors` (f32 or bf16), `tokenizer.json`, `tokenizer_config.json`
//! (with the chat template) and `generation_config.json`.
//!
//! The folder is written under a temporary name beside the target, each file synced, then
//! renamed into place: a failure leaves no partial folder, and an existing folder is never
//! overwritten.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::bf16;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use crate::config::{Architecture, Family, RopeScaling};
use crate::error::{Error, Result};
use crate::model::{Mlp, Model, Norm, VALUE_HEAD_BIAS, VALUE_HEAD_WEIGHT};
use crate::tensor::Tensor;

/// Storage type of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
}

/// Writes `model` as an HF folder at `out` (which must not exist yet).
pub fn save_hf_folder(model: &Model, out: &Path, dtype: SaveDtype) -> Result<()> {
    check_savable(model)?;
    write_folder_atomically(out, |tmp| write_all(model, tmp, dtype))
}

/// Errors for models that cannot be written as an HF folder.
pub(crate) fn check_savable(model: &Model) -> Result<()> {
    let cfg = model.config();
    if model.weights().lora.is_some() {
        return Err(Error::invalid(
            "the model has LoRA adapters: merge them (merge_lora) or save them as a PEFT \
             adapter (save_lora_adapter)",
        ));
    }
    // Qwen2 has q/k/v biases without an output bias; a Llama config can only say "all or none".
    if cfg.architecture != Architecture::Qwen2 && cfg.qkv_bias != cfg.attn_out_bias {
        return Err(Error::Unsupported(
            "q/k/v biases without an output bias cannot be written as a LlamaForCausalLM".into(),
        ));
    }
    Ok(())
}

/// Fills a new folder `out` through `write`, which gets a temporary sibling folder; only a
/// folder whose every file was written and synced is renamed into place. An existing `out`
/// is an error and is never touched; on failure the temporary folder is removed.
pub(crate) fn write_folder_atomically(
    out: &Path,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if out.exists() {
        return Err(Error::io(
            out,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output folder already exists",
            ),
        ));
    }
    let tmp = temp_sibling(out)?;
    if tmp.exists() {
        // Left by an earlier process with our id that was killed mid-save.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = write(&tmp).and_then(|_| {
        sync(&tmp)?;
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        sync_parent(out);
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Writes the HF files of `model` into the existing folder `dir`.
pub(crate) fn write_model_files(model: &Model, dir: &Path, dtype: SaveDtype) -> Result<()> {
    check_savable(model)?;
    write_all(model, dir, dtype)
}

fn temp_sibling(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} is not a folder name", out.display())))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    Ok(out.with_file_name(tmp_name))
}

fn write_all(model: &Model, dir: &Path, dtype: SaveDtype) -> Result<()> {
    let cfg = model.config();
    write_json(&dir.join("config.json"), &config_json(model, dtype))?;
    let mut gen = json!({ "eos_token_id": eos_value(model.eos_token_ids()) });
    if let Some(bos) = cfg.bos_token_id {
        gen["bos_token_id"] = json!(bos);
    }
    write_json(&dir.join("generation_config.json"), &gen)?;
    write_weights(model, &dir.join("model.safetensors"), dtype)?;
    if let Some(tok) = model.tokenizer() {
        let path = dir.join("tokenizer.json");
        tok.inner()
            .save(&path, false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        sync(&path)?;
        let mut tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_position_embeddings,
            "clean_up_tokenization_spaces": false,
        });
        if let Some(b) = tok.bos_token() {
            tc["bos_token"] = json!(b);
        }
        if let Some(e) = tok.eos_token() {
            tc["eos_token"] = json!(e);
        }
        if let Some(t) = model.chat_template() {
            tc["chat_template"] = json!(t.source());
        }
        write_json(&dir.join("tokenizer_config.json"), &tc)?;
    }
    Ok(())
}

fn eos_value(ids: &[u32]) -> Value {
    match ids {
        [one] => json!(one),
        many => json!(many),
    }
}

fn config_json(model: &Model, dtype: SaveDtype) -> Value {
    let mut v = lm_config_json(model, dtype);
    if model.weights().score.is_some() {
        // A reward model: transformers' *ForSequenceClassification with one label.
        let class = model
            .config()
            .architecture
            .hf_class()
            .replace("LMHeadModel", "ForSequenceClassification")
            .replace("ForCausalLM", "ForSequenceClassification");
        v["architectures"] = json!([class]);
        v["num_labels"] = json!(1);
        v["id2label"] = json!({"0": "LABEL_0"});
        v["label2id"] = json!({"LABEL_0": 0});
    }
    v
}

fn lm_config_json(model: &Model, dtype: SaveDtype) -> Value {
    let c = model.config();
    let torch_dtype = match dtype {
        SaveDtype::F32 => "float32",
        SaveDtype::Bf16 => "bfloat16",
    };
    if c.family() == Family::Gpt2 {
        let mut v = json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "vocab_size": c.vocab_size,
            "n_embd": c.hidden_size,
            "n_layer": c.num_layers,
            "n_head": c.num_heads,
            "n_inner": c.intermediate_size,
            "n_positions": c.max_position_embeddings,
            "layer_norm_epsilon": c.norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings,
            "eos_token_id": eos_value(&c.eos_token_ids),
            "torch_dtype": torch_dtype,
        });
        if let Some(bos) = c.bos_token_id {
            v["bos_token_id"] = json!(bos);
        }
        return v;
    }
    let rope = c.rope.as_ref();
    let mut v = json!({
        "architectures": [c.architecture.hf_class()],
        "model_type": match c.architecture {
            Architecture::Qwen2 => "qwen2",
            Architecture::Mistral => "mistral",
            _ => "llama",
        },
        "sliding_window": c.sliding_window,
        "hidden_act": "silu",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": rope.map_or(10000.0, |r| r.theta),
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.qkv_bias,
        "mlp_bias": c.mlp_bias,
        "eos_token_id": eos_value(&c.eos_token_ids),
        "torch_dtype": torch_dtype,
    });
    if let Some(bos) = c.bos_token_id {
        v["bos_token_id"] = json!(bos);
    }
    match rope.map(|r| &r.scaling) {
        Some(RopeScaling::Linear { factor }) => {
            v["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            v["rope_scaling"] = json!({"rope_type": "llama3", "factor": factor,
                "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings});
        }
        _ => {}
    }
    v
}

/// (HF name, shape, values) of every tensor transformers expects for this model.
pub(crate) type Named = Vec<(String, Vec<usize>, Vec<f32>)>;

fn llama_tensors(model: &Model) -> Named {
    let w = model.weights();
    let own = |t: &Tensor| (t.shape().to_vec(), t.as_slice().to_vec());
    let mut named: Named = Vec::new();
    let mut push = |name: String, t: &Tensor| {
        let (shape, values) = own(t);
        named.push((name, shape, values));
    };
    push("model.embed_tokens.weight".into(), &w.tok_emb);
    push("model.norm.weight".into(), norm_parts(&w.final_norm).0);
    if let (Some(head), None) = (&w.lm_head, &w.score) {
        push("lm_head.weight".into(), head);
    }
    for (l, layer) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        push(
            format!("{p}.input_layernorm.weight"),
            norm_parts(&layer.attn_norm).0,
        );
        push(
            format!("{p}.post_attention_layernorm.weight"),
            norm_parts(&layer.mlp_norm).0,
        );
        for (n, lin) in [
            ("q_proj", &layer.q),
            ("k_proj", &layer.k),
            ("v_proj", &layer.v),
            ("o_proj", &layer.o),
        ] {
            push(format!("{p}.self_attn.{n}.weight"), &lin.w);
            if let Some(b) = &lin.b {
                push(format!("{p}.self_attn.{n}.bias"), b);
            }
        }
        if let Mlp::SwiGlu { gate, up, down } = &layer.mlp {
            for (n, lin) in [("gate_proj", gate), ("up_proj", up), ("down_proj", down)] {
                push(format!("{p}.mlp.{n}.weight"), &lin.w);
                if let Some(b) = &lin.b {
                    push(format!("{p}.mlp.{n}.bias"), b);
                }
            }
        }
    }
    named
}

/// GPT-2 in transformers' layout: Conv1D weights `(in, out)` and a fused `c_attn`.
fn gpt2_tensors(model: &Model) -> Named {
    let w = model.weights();
    let mut named: Named = Vec::new();
    let copy = |t: &Tensor| (t.shape().to_vec(), t.as_slice().to_vec());
    let mut push = |name: String, (shape, values): (Vec<usize>, Vec<f32>)| {
        named.push((format!("transformer.{name}"), shape, values));
    };
    push("wte.weight".into(), copy(&w.tok_emb));
    if let Some(p) = &w.pos_emb {
        push("wpe.weight".into(), copy(p));
    }
    let (fw, fb) = norm_parts(&w.final_norm);
    push("ln_f.weight".into(), copy(fw));
    if let Some(b) = fb {
        push("ln_f.bias".into(), copy(b));
    }
    for (l, layer) in w.layers.iter().enumerate() {
        let p = format!("h.{l}");
        for (n, norm) in [("ln_1", &layer.attn_norm), ("ln_2", &layer.mlp_norm)] {
            let (nw, nb) = norm_parts(norm);
            push(format!("{p}.{n}.weight"), copy(nw));
            if let Some(b) = nb {
                push(format!("{p}.{n}.bias"), copy(b));
            }
        }
        let qkv_w: Vec<f32> = [&layer.q, &layer.k, &layer.v]
            .iter()
            .flat_map(|lin| lin.w.as_slice().iter().copied())
            .collect();
        let rows = layer.q.w.shape()[0] + layer.k.w.shape()[0] + layer.v.w.shape()[0];
        push(
            format!("{p}.attn.c_attn.weight"),
            transposed(&qkv_w, rows, layer.q.w.shape()[1]),
        );
        let qkv_b: Vec<f32> = [&layer.q, &layer.k, &layer.v]
            .iter()
            .flat_map(|lin| lin.b.iter().flat_map(|b| b.as_slice().iter().copied()))
            .collect();
        if qkv_b.len() == rows {
            push(format!("{p}.attn.c_attn.bias"), (vec![rows], qkv_b));
        }
        let mut conv = |name: String, lin: &crate::model::Linear| {
            let s = lin.w.shape();
            push(
                format!("{name}.weight"),
                transposed(lin.w.as_slice(), s[0], s[1]),
            );
            if let Some(b) = &lin.b {
                push(format!("{name}.bias"), copy(b));
            }
        };
        conv(format!("{p}.attn.c_proj"), &layer.o);
        if let Mlp::Gelu { fc, proj } = &layer.mlp {
            conv(format!("{p}.mlp.c_fc"), fc);
            conv(format!("{p}.mlp.c_proj"), proj);
        }
    }
    if let (Some(head), None) = (&w.lm_head, &w.score) {
        named.push((
            "lm_head.weight".into(),
            head.shape().to_vec(),
            head.as_slice().to_vec(),
        ));
    }
    named
}

/// `(rows, cols)` values returned as `(cols, rows)`.
fn transposed(values: &[f32], rows: usize, cols: usize) -> (Vec<usize>, Vec<f32>) {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    (vec![cols, rows], out)
}

fn write_weights(model: &Model, path: &Path, dtype: SaveDtype) -> Result<()> {
    let mut named = match model.config().family() {
        Family::Llama => llama_tensors(model),
        Family::Gpt2 => gpt2_tensors(model),
    };
    let w = model.weights();
    if let Some(score) = &w.score {
        named.push((
            "score.weight".into(),
            score.shape().to_vec(),
            score.as_slice().to_vec(),
        ));
    }
    if let Some(v) = &w.value {
        named.push((
            VALUE_HEAD_WEIGHT.into(),
            v.w.shape().to_vec(),
            v.w.as_slice().to_vec(),
        ));
        if let Some(b) = &v.b {
            named.push((
                VALUE_HEAD_BIAS.into(),
                b.shape().to_vec(),
                b.as_slice().to_vec(),
            ));
        }
    }
    write_safetensors(path, named, dtype)
}

/// Serialises named f32 tensors (stored as `dtype`) to `path` and syncs the file.
pub(crate) fn write_safetensors(path: &Path, named: Named, dtype: SaveDtype) -> Result<()> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = named
        .into_iter()
        .map(|(n, shape, values)| {
            let bytes = match dtype {
                SaveDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                SaveDtype::Bf16 => values
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            (n, shape, bytes)
        })
        .collect();
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
    };
    let views = encoded
        .iter()
        .map(|(n, shape, bytes)| {
            TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::format(path, format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::format(path, e.to_string()))?;
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(&bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Runs `write` on a temporary sibling of `path`, then renames it over `path` and syncs the
/// folder: readers see the old file or the new one, never a partial one.
fn replace_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path)?;
    let result = write(&tmp).and_then(|_| {
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        sync_parent(path);
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `named` as an f32 safetensors file.
pub(crate) fn write_safetensors_f32(path: &Path, named: Named) -> Result<()> {
    write_safetensors(path, named, SaveDtype::F32)
}

/// [`write_safetensors`] (f32) through a temporary file and a rename.
pub(crate) fn write_safetensors_atomically(path: &Path, named: Named) -> Result<()> {
    replace_atomically(path, |tmp| write_safetensors(tmp, named, SaveDtype::F32))
}

/// A pretty-printed JSON file written through a temporary file and a rename.
pub(crate) fn write_json_atomically(path: &Path, value: &Value) -> Result<()> {
    replace_atomically(path, |tmp| write_json(tmp, value))
}

/// Makes a rename in `path`'s folder durable; not every platform can open a folder.
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().and_then(|p| File::open(p).ok()) {
        let _ = dir.sync_all();
    }
}

fn norm_parts(n: &Norm) -> (&Tensor, Option<&Tensor>) {
    match n {
        Norm::Rms { w } => (w, None),
        Norm::Layer { w, b } => (w, Some(b)),
    }
}

pub(crate) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}
