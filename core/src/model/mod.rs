//! `Model`: a loaded decoder with its tokenizer, and the token-level primitives on it —
//! `logits`, `logprobs` (here) and `generate` (in `generate.rs`).

mod backward;
mod bf16_compute;
mod forward;
pub mod lora;
mod reward;
mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use rayon::ThreadPool;
use serde_json::Value;

use crate::backend::cpu::attention::Slot;
use crate::backend::cpu::int8_matmul::{self, int8_matmul};
use crate::backend::cpu::matmul::matmul;
use crate::backend::cpu::quant_matmul::{quant_matmul, quant_matmuls, QuantMatrix, QuantProduct};
use crate::backend::cpu::rope;
use crate::backend::cpu::softmax::log_prob_of;
use crate::backend::Device;
use crate::chat::{ChatTemplate, Message};
use crate::config::{generation_eos_ids, ModelConfig};
use crate::error::{Error, Result};
use crate::kv_cache::{zeroed, KvCache};
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::tokenizer_gguf::tokenizer_from_gguf;
use crate::weights::{config_from_gguf, GgufFile, GgufSource, SafetensorsCheckpoint};

pub(crate) use backward::TrainingBuffers;
pub use backward::{
    Gradients, LayerGrads, LinearGrad, LogprobObjective, NormGrad, TokenObjective,
    TokenOutputGrads, TokenOutputs,
};
pub(crate) use bf16_compute::Bf16Weights;
pub(crate) use forward::Scratch;
pub use lora::{LoraAdapter, LoraConfig, LoraGrad};
pub use reward::PairStats;
pub use weights::{
    Layer, Linear, Mlp, ModelWeights, Norm, TensorSource, VALUE_HEAD_BIAS, VALUE_HEAD_WEIGHT,
};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Worker threads for this model's calls; 0 = rayon's global pool (one per core).
    pub threads: usize,
    /// GGUF only: keep Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K/F16/BF16 matrices in their blocks and run them on the
    /// quantized kernels, which dequantize in registers: results are bit for bit those of the
    /// dequantized f32 model, with about 5× less weight memory and faster decoding. Off, every
    /// tensor is dequantized to f32 at load. Training works on f32 ([`Trainer::new`]
    /// dequantizes its copy; its log-probs still equal the quantized model's). On by default.
    ///
    /// [`Trainer::new`]: crate::train::Trainer::new
    pub keep_quantized: bool,
    /// Accept weights holding NaN or infinite values (or quantized blocks with such scales).
    /// Off by default: a model file with them is refused at load with an error naming the first
    /// such tensor, instead of producing NaN log-probs later.
    pub allow_non_finite: bool,
    /// Where the model runs (`cpu` by default). With `cuda:N` (crate feature `cuda`) the
    /// driver, device, NVRTC and cuBLAS are checked, the weights are copied to the device
    /// (GGUF blocks are dequantized: `keep_quantized` does not apply; see `device_dtype`), and
    /// `logits`, `logprobs`, `generate`, values and reward scores run there, as do training's
    /// gradients and AdamW (a [`Trainer`](crate::train::Trainer) keeps its optimizer state on
    /// the device), full fine-tuning or LoRA. The CUDA path has not yet been run on a GPU.
    pub device: crate::backend::Device,
    /// On a CUDA device: f32 (default) or bf16 storage of the matrices and the KV cache
    /// ([`DeviceDtype`](crate::backend::DeviceDtype)). Must be f32 on the CPU.
    pub device_dtype: crate::backend::DeviceDtype,
    /// CPU, with `keep_quantized`: run the Q4_0, Q4_1, Q8_0, Q4_K and Q6_K matrices with 8-bit activations
    /// (each input row quantized in blocks of 32, integer dot products), as llama.cpp runs these
    /// files — decode is about 1.5× faster, and results differ from the dequantized f32 model
    /// by the rounding of the activations (see [`int8_matmul`]). Every row count and thread
    /// count still computes the same bits, so `generate` and `logprobs` agree with each other;
    /// training works on f32 and so no longer equals this model's log-probs. Off by default;
    /// other matrix types run as without it.
    ///
    /// [`int8_matmul`]: crate::backend::cpu::int8_matmul
    pub int8_activations: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: crate::backend::Device::Cpu,
            device_dtype: crate::backend::DeviceDtype::F32,
            threads: 0,
            keep_quantized: true,
            allow_non_finite: false,
            int8_activations: false,
        }
    }
}

/// A loaded model. `clone` is cheap: the clone shares every weight, the tokenizer and the thread
/// pool, and a weight is copied only when one side writes it (training), which is how a frozen
/// reference model costs no second copy of the weights.
#[derive(Clone)]
pub struct Model {
    config: ModelConfig,
    weights: ModelWeights,
    tokenizer: Option<Arc<Tokenizer>>,
    chat_template: Option<Arc<ChatTemplate>>,
    /// Sampling defaults from `generation_config.json` (greedy when it does not sample).
    generation_defaults: SamplingParams,
    eos_token_ids: Vec<u32>,
    rope_inv_freq: Option<Vec<f64>>,
    pool: Option<Arc<ThreadPool>>,
    source: PathBuf,
    /// Recompute each layer's activations in the backward pass instead of keeping them.
    gradient_checkpointing: bool,
    /// Q4_0/Q4_1/Q8_0/Q4_K/Q6_K matrices run with 8-bit activations ([`LoadOptions::int8_activations`]).
    int8_activations: bool,
    /// Set by a Trainer with bf16 compute around its own gradient calls: the training
    /// forward/backward's products then run on these bf16 copies of the weights.
    bf16_compute: bf16_compute::LentCopies,
    /// Activation and gradient buffers a Trainer lends for its gradient calls.
    training_buffers: backward::BufferSlot,
    /// The weights on a CUDA device (`LoadOptions::device = cuda:N`); inference dispatches
    /// there when present.
    #[cfg(feature = "cuda")]
    cuda: Option<Arc<crate::backend::cuda::CudaModel>>,
    /// Set once mutable weights were handed out after a CUDA upload: the device copy may be
    /// stale, so CUDA calls refuse to run.
    #[cfg(feature = "cuda")]
    cuda_stale: bool,
    /// Set by a Trainer around its own gradient calls on a CUDA model: the backbone's
    /// gradients then stay on the device (`Gradients::device`) for the device optimizer.
    #[cfg(feature = "cuda")]
    gradients_on_device: bool,
    /// bf16 storage on the CUDA device (`LoadOptions::device_dtype`); a Trainer clears it.
    #[cfg(feature = "cuda")]
    cuda_bf16: bool,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("source", &self.source)
            .field("architecture", &self.config.architecture)
            .field("has_tokenizer", &self.tokenizer.is_some())
            .finish()
    }
}

/// Rows of the LM head computed at once when scoring whole sequences: bounds the logits buffer
/// to `LOGIT_ROWS × V` instead of `T × V`.
const LOGIT_ROWS: usize = 32;
/// Tokens packed into one forward when scoring many sequences.
const PACK_TOKENS: usize = 2048;

impl Model {
    /// Loads an HF model folder: `config.json`, `model.safetensors` (or shards with
    /// `model.safetensors.index.json`), and when present `tokenizer.json`,
    /// `tokenizer_config.json`, `generation_config.json`.
    pub fn load(path: impl AsRef<Path>, options: LoadOptions) -> Result<Model> {
        let dir = path.as_ref();
        if !dir.exists() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        }
        options.device.check_usable()?;
        if options.int8_activations
            && !(dir.is_file() && options.keep_quantized && options.device == Device::Cpu)
        {
            return Err(Error::InvalidArgument(
                "int8_activations applies to a GGUF file's blocks kept in memory on the CPU \
                 (keep_quantized, device cpu)"
                    .into(),
            ));
        }
        let pool = build_pool(options.threads)?;
        if dir.is_file() {
            // The CUDA backend takes f32 weights: dequantize at load.
            let keep_quantized = options.keep_quantized && options.device == Device::Cpu;
            // (The finite-value check runs inside, beside the tokenizer's construction.)
            let mut model = Self::load_gguf(dir, pool, keep_quantized, !options.allow_non_finite)?;
            if options.int8_activations && !model.weights.has_quantized_of(int8_matmul::supports) {
                return Err(Error::InvalidArgument(
                    "int8_activations: this GGUF holds no Q4_0, Q4_1, Q8_0, Q4_K or Q6_K matrix \
                     to run with 8-bit activations"
                        .into(),
                ));
            }
            model.int8_activations = options.int8_activations;
            return model.place(options.device, options.device_dtype);
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let load = || -> Result<ModelWeights> {
            let ck = SafetensorsCheckpoint::open_dir(dir)?;
            ModelWeights::from_source(&ck, &config)
        };
        let weights = match &pool {
            Some(p) => p.install(load)?,
            None => load()?,
        };
        let tokenizer = Tokenizer::from_dir(dir)?;
        let chat_template = match (
            &tokenizer,
            read_json_opt(&dir.join("tokenizer_config.json"))?,
        ) {
            (Some(tok), Some(cfg)) => match hf_chat_template(&cfg) {
                Some(src) => Some(Arc::new(template_for(tok, &src)?)),
                None => None,
            },
            _ => None,
        };
        let generation_defaults = match read_json_opt(&dir.join("generation_config.json"))? {
            Some(g) => generation_defaults(&g),
            None => SamplingParams::greedy(SamplingParams::default().max_new_tokens),
        };
        let eos_token_ids = default_eos_ids(dir, &config, tokenizer.as_ref())?;
        let tokenizer = tokenizer.map(Arc::new);
        let rope_inv_freq = config
            .rope
            .as_ref()
            .map(|r| rope::inv_freq(r, config.head_dim));
        let model = Model {
            config,
            weights,
            tokenizer,
            chat_template,
            generation_defaults,
            eos_token_ids,
            rope_inv_freq,
            pool,
            source: dir.to_path_buf(),
            gradient_checkpointing: false,
            int8_activations: false,
            bf16_compute: Default::default(),
            training_buffers: Default::default(),
            #[cfg(feature = "cuda")]
            cuda: None,
            #[cfg(feature = "cuda")]
            cuda_stale: false,
            #[cfg(feature = "cuda")]
            gradients_on_device: false,
            #[cfg(feature = "cuda")]
            cuda_bf16: false,
        };
        model.check_finite(&options)?;
        model.place(options.device, options.device_dtype)
    }

    /// Copies the weights to `device` when it is a CUDA device (checked by
    /// `Device::check_usable` before loading).
    fn place(self, device: Device, dtype: crate::backend::DeviceDtype) -> Result<Model> {
        let bf16 = dtype == crate::backend::DeviceDtype::Bf16;
        match device {
            Device::Cpu if bf16 => Err(Error::invalid(
                "device_dtype bf16 applies to CUDA devices; on the CPU, bf16 weights are kept \
                 from a BF16 GGUF (keep_quantized)",
            )),
            Device::Cpu => Ok(self),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let gpu = crate::backend::cuda::CudaModel::new(
                    n,
                    &self.config,
                    &self.weights,
                    self.rope_inv_freq.as_deref(),
                    bf16,
                )?;
                Ok(Model {
                    cuda: Some(Arc::new(gpu)),
                    cuda_bf16: bf16,
                    ..self
                })
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::Cuda(
                "this build of rlx has no CUDA support (crate feature `cuda`)".into(),
            )),
        }
    }

    /// Where this model's inference runs.
    pub fn device(&self) -> Device {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.cuda {
            return Device::Cuda(g.ordinal());
        }
        Device::Cpu
    }

    /// The CUDA copy of the model, when it was loaded on a CUDA device; an error when its
    /// weights were changed on the host since.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> Result<Option<&crate::backend::cuda::CudaModel>> {
        match &self.cuda {
            Some(g) if self.cuda_stale => Err(Error::Cuda(format!(
                "the weights of this model were changed on the host after it was loaded on \
                 cuda:{}; call Model::sync_device to copy them to the device (the Trainer does \
                 after each step)",
                g.ordinal()
            ))),
            Some(g) => Ok(Some(g)),
            None => Ok(None),
        }
    }

    /// Copies the host weights to the device after they changed (an optimizer step, any
    /// `weights_mut` use), so CUDA calls run again; nothing to do on the CPU or when nothing
    /// changed. The device copy is overwritten in place when this model alone holds it;
    /// when clones share it (a reference model), this model gets its own device copy (a new
    /// upload, once) and the clones keep the old weights, as they do on the host.
    pub fn sync_device(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if self.cuda_stale {
            if let Some((gpu, fresh)) = Self::unique_cuda(
                &mut self.cuda,
                &self.config,
                &self.weights,
                self.rope_inv_freq.as_deref(),
                self.cuda_bf16,
            )? {
                if !fresh {
                    gpu.refresh(&self.weights)?;
                }
            }
            self.cuda_stale = false;
        }
        Ok(())
    }

    /// Whether gradient calls keep the backbone's gradients on the device (a Trainer's steps).
    #[cfg(feature = "cuda")]
    pub(crate) fn gradients_on_device(&self) -> bool {
        self.gradients_on_device && self.cuda.is_some()
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn set_gradients_on_device(&mut self, on: bool) {
        self.gradients_on_device = on;
    }

    /// The device copy for writing (a sync, the optimizer step): shared with clones (a
    /// reference model), it is first replaced by this model's own upload of `weights`, so the
    /// clones keep theirs. Also says whether that fresh upload happened.
    #[cfg(feature = "cuda")]
    fn unique_cuda<'a>(
        cuda: &'a mut Option<Arc<crate::backend::cuda::CudaModel>>,
        config: &ModelConfig,
        weights: &ModelWeights,
        rope_inv_freq: Option<&[f64]>,
        bf16: bool,
    ) -> Result<Option<(&'a mut crate::backend::cuda::CudaModel, bool)>> {
        let Some(gpu) = cuda.as_mut() else {
            return Ok(None);
        };
        let fresh = Arc::get_mut(gpu).is_none();
        if fresh {
            *gpu = Arc::new(crate::backend::cuda::CudaModel::new(
                gpu.ordinal(),
                config,
                weights,
                rope_inv_freq,
                bf16,
            )?);
        }
        Ok(Arc::get_mut(gpu).map(|g| (g, fresh)))
    }

    /// One AdamW step of the backbone on the device, then the new weights copied to the host
    /// (so both copies agree and nothing is marked stale).
    #[cfg(feature = "cuda")]
    pub(crate) fn device_adamw(
        &mut self,
        moments: &mut crate::backend::cuda::DeviceMoments,
        grads: &crate::backend::cuda::DeviceGrads,
        step: crate::backend::cuda::AdamStep,
    ) -> Result<()> {
        self.sync_device()?;
        let Some((gpu, _)) = Self::unique_cuda(
            &mut self.cuda,
            &self.config,
            &self.weights,
            self.rope_inv_freq.as_deref(),
            self.cuda_bf16,
        )?
        else {
            return Err(Error::Cuda("internal: a device step on a CPU model".into()));
        };
        gpu.adamw(moments, grads, step)?;
        gpu.download_weights(&mut self.weights)
    }

    /// Before training on a CUDA model loaded with bf16 storage: an f32 device copy of the
    /// weights (the trained master weights; the KV cache becomes f32 too). Clones keep theirs.
    #[cfg(feature = "cuda")]
    pub(crate) fn use_f32_device_weights(&mut self) -> Result<()> {
        if !self.cuda_bf16 {
            return Ok(());
        }
        self.cuda_bf16 = false;
        if let Some(gpu) = self.cuda.as_mut() {
            *gpu = Arc::new(crate::backend::cuda::CudaModel::new(
                gpu.ordinal(),
                &self.config,
                &self.weights,
                self.rope_inv_freq.as_deref(),
                false,
            )?);
            self.cuda_stale = false;
        }
        Ok(())
    }

    /// The host tensors the device does not hold (score and value heads) for the Trainer's
    /// host AdamW on a CUDA model: unlike `weights_mut`, this does not mark the device copy
    /// stale. The caller writes only those tensors.
    #[cfg(feature = "cuda")]
    pub(crate) fn head_weights_mut(&mut self) -> &mut ModelWeights {
        &mut self.weights
    }

    /// Refuses weights holding NaN or infinite values unless the options allow them.
    fn check_finite(&self, options: &LoadOptions) -> Result<()> {
        if options.allow_non_finite {
            return Ok(());
        }
        match self.install(|| self.weights.first_non_finite()) {
            Some(name) => Err(non_finite_error(&self.source, &name)),
            None => Ok(()),
        }
    }

    /// A single `.gguf` file: config from its metadata, tensors dequantized to f32 or kept in
    /// blocks (`keep_quantized`).
    fn load_gguf(
        path: &Path,
        pool: Option<Arc<ThreadPool>>,
        keep_quantized: bool,
        check_finite: bool,
    ) -> Result<Model> {
        let file = GgufFile::open(path)?;
        let config = config_from_gguf(&file)?;
        let load = || {
            ModelWeights::from_source(
                &GgufSource {
                    file: &file,
                    config: &config,
                    keep_quantized,
                },
                &config,
            )
        };
        // The tokenizer (tens of milliseconds for a 49k vocabulary, one thread) is built while
        // the weights load and are checked.
        let both = || {
            rayon::join(
                || {
                    file.prefault();
                    let weights = load()?;
                    let bad = check_finite.then(|| weights.first_non_finite()).flatten();
                    Ok((weights, bad))
                },
                || tokenizer_from_gguf(&file),
            )
        };
        let (weights, tokenizer) = match &pool {
            Some(p) => p.install(both),
            None => both(),
        };
        // Errors in the order of a sequential load: the weights, the tokenizer, then NaN/inf.
        let (weights, bad) = weights?;
        let tokenizer = tokenizer?.map(Arc::new);
        if let Some(name) = bad {
            return Err(non_finite_error(path, &name));
        }
        let rope_inv_freq = config
            .rope
            .as_ref()
            .map(|r| rope::inv_freq(r, config.head_dim));
        Ok(Model {
            eos_token_ids: config.eos_token_ids.clone(),
            config,
            weights,
            chat_template: match (tokenizer.as_deref(), file.get("tokenizer.chat_template")) {
                (Some(tok), Some(src)) => {
                    let src = src.as_str().ok_or_else(|| {
                        Error::Template("tokenizer.chat_template must be a string".into())
                    })?;
                    Some(Arc::new(template_for(tok, src)?))
                }
                _ => None,
            },
            tokenizer,
            generation_defaults: SamplingParams::greedy(SamplingParams::default().max_new_tokens),
            rope_inv_freq,
            pool,
            source: path.to_path_buf(),
            gradient_checkpointing: false,
            int8_activations: false,
            bf16_compute: Default::default(),
            training_buffers: Default::default(),
            #[cfg(feature = "cuda")]
            cuda: None,
            #[cfg(feature = "cuda")]
            cuda_stale: false,
            #[cfg(feature = "cuda")]
            gradients_on_device: false,
            #[cfg(feature = "cuda")]
            cuda_bf16: false,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    /// Mutable weights (training). Mapped tensors are copied on first write. On a model loaded
    /// on CUDA the device copy is not updated, so its CUDA calls return an error afterwards.
    pub fn weights_mut(&mut self) -> &mut ModelWeights {
        #[cfg(feature = "cuda")]
        if self.cuda.is_some() {
            self.cuda_stale = true;
        }
        &mut self.weights
    }

    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }

    /// The tokenizer, or an error saying the model has none.
    pub fn require_tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_deref().ok_or(Error::NoTokenizer)
    }

    /// The model's chat template, if it ships one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_deref()
    }

    /// Sampling defaults from `generation_config.json`; greedy when the model has none.
    pub fn generation_defaults(&self) -> &SamplingParams {
        &self.generation_defaults
    }

    /// Token ids of a conversation rendered with the chat template (no extra special tokens,
    /// as transformers' `apply_chat_template(tokenize=True)`).
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::Template("this model has no chat template".into()))?;
        let text = template.render(messages, add_generation_prompt)?;
        self.require_tokenizer()?.encode(&text, false)
    }

    /// Tokens that end generation by default (`generation_config.json`, else `config.json`, else
    /// the tokenizer's `eos_token`).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Gradient checkpointing (per-layer recomputation): training keeps only each layer's
    /// input and recomputes the layer's other activations during the backward pass — about
    /// one more forward of compute for activation memory of one layer instead of all.
    /// Gradients are identical either way.
    /// bf16 copies of the weights' matrices for a Trainer with bf16 compute.
    pub(crate) fn bf16_weights(&self) -> Result<Arc<Bf16Weights>> {
        let has_head = self.require_lm_head().is_ok();
        // Two bf16 copies of every matrix: the f32 weights' size again.
        let bytes: usize = self
            .weights
            .layers
            .iter()
            .flat_map(|l| l.linears())
            .map(|l| l.w.as_slice().len() * 4)
            .sum::<usize>()
            + if has_head {
                self.weights.lm_head().as_slice().len() * 4
            } else {
                0
            };
        crate::memory::ensure_fits(bytes as u64, "the bf16 copies of the weights")?;
        Ok(Arc::new(
            self.install(|| Bf16Weights::new(&self.weights, has_head)),
        ))
    }

    /// Packs the current weights into `w` (copies made by [`Model::bf16_weights`]); false when
    /// the matrices' shapes changed since (then make new copies).
    pub(crate) fn refill_bf16_weights(&self, w: &mut Bf16Weights) -> bool {
        self.install(|| w.refill(&self.weights))
    }

    /// Lends a Trainer's buffers to the next gradient call.
    pub(crate) fn lend_training_buffers(&self, buffers: TrainingBuffers) {
        self.training_buffers.put(buffers);
    }

    /// Takes back the buffers lent (refilled by the call, or untouched).
    pub(crate) fn reclaim_training_buffers(&self) -> Option<TrainingBuffers> {
        self.training_buffers.take()
    }

    /// Makes the training forward/backward use `w` (a Trainer's gradient calls) or f32.
    pub(crate) fn set_bf16_compute(&mut self, w: Option<Arc<Bf16Weights>>) {
        self.bf16_compute = bf16_compute::LentCopies(w);
    }

    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Runs `f` on this model's thread pool.
    pub(crate) fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// An error for a reward model whose untied LM head is gone (its `tok_emb` is not one).
    pub(crate) fn require_lm_head(&self) -> Result<()> {
        if self.weights.lm_head.is_none() && !self.config.tie_word_embeddings {
            return Err(Error::invalid(
                "this reward model has no LM head: it scores sequences but cannot give \
                 token probabilities",
            ));
        }
        Ok(())
    }

    /// Checks that a sequence is non-empty, in the vocabulary, and fits the context with `extra`
    /// more positions (what `generate` checks of each prompt before any work).
    pub fn check_tokens(&self, tokens: &[u32], extra: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::invalid("a sequence needs at least one token"));
        }
        let vocab = self.config.vocab_size;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::TokenOutOfRange { id, vocab });
        }
        let requested = tokens.len().saturating_add(extra);
        let max = self.config.max_position_embeddings;
        if requested > max {
            return Err(Error::ContextOverflow { requested, max });
        }
        if let Some(window) = self.config.sliding_window {
            if requested > window {
                return Err(Error::Unsupported(format!(
                    "sequence of {requested} positions exceeds the model's sliding window \
                     ({window}); rlx does not implement sliding-window attention"
                )));
            }
        }
        Ok(())
    }

    /// Each sequence checked by [`Model::check_tokens`], as slices.
    #[cfg(feature = "cuda")]
    pub(crate) fn checked_sequences<'a, S: AsRef<[u32]>>(
        &self,
        sequences: &'a [S],
    ) -> Result<Vec<&'a [u32]>> {
        sequences
            .iter()
            .map(|s| {
                let s = s.as_ref();
                self.check_tokens(s, 0).map(|_| s)
            })
            .collect()
    }

    /// Full logits `(T, V)` of one sequence, row `t` predicting token `t + 1`.
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.require_lm_head()?;
        self.check_tokens(tokens, 0)?;
        #[cfg(feature = "cuda")]
        if let Some(g) = self.cuda()? {
            return g.logits(tokens);
        }
        self.install(|| {
            let mut cache = [KvCache::new(&self.config, tokens.len())?];
            let slots: Vec<Slot> = (0..tokens.len()).map(|pos| Slot { seq: 0, pos }).collect();
            let mut s = Scratch::default();
            self.forward(tokens, &slots, &mut cache, &mut s)?;
            let v = self.config.vocab_size;
            let mut logits = zeroed(tokens.len() * v)?;
            self.lm_head(&mut logits, &s.h, tokens.len());
            Ok(logits)
        })
    }

    /// Per-token log-probs: for each sequence, `log p(x_t | x_<t)` for `t = 1..len` under
    /// `softmax(logits / temperature)` (`len - 1` values; temperature 0 means 1).
    ///
    /// The values are bitwise identical to those `generate` reports for the same tokens.
    pub fn logprobs<S: AsRef<[u32]> + Sync>(
        &self,
        sequences: &[S],
        temperature: f32,
    ) -> Result<Vec<Vec<f32>>> {
        let temperature = checked_temperature(temperature)?;
        self.require_lm_head()?;
        for seq in sequences {
            self.check_tokens(seq.as_ref(), 0)?;
        }
        #[cfg(feature = "cuda")]
        if let Some(g) = self.cuda()? {
            let seqs: Vec<&[u32]> = sequences.iter().map(|s| s.as_ref()).collect();
            return g.logprobs(&seqs, temperature);
        }
        self.install(|| {
            let mut out: Vec<Vec<f32>> = Vec::with_capacity(sequences.len());
            let mut s = Scratch::default();
            let mut start = 0;
            while start < sequences.len() {
                // Pack whole sequences up to a token budget (at least one sequence).
                let mut end = start + 1;
                let mut tokens = sequences[start].as_ref().len();
                while end < sequences.len() && tokens + sequences[end].as_ref().len() <= PACK_TOKENS
                {
                    tokens += sequences[end].as_ref().len();
                    end += 1;
                }
                out.extend(self.logprobs_packed(&sequences[start..end], temperature, &mut s)?);
                start = end;
            }
            Ok(out)
        })
    }

    /// Sum of log-probs over the tokens selected by `mask` (one flag per token; token 0 has no
    /// log-prob and must not be selected) — the response log-likelihood of RLHF objectives.
    pub fn masked_logprob_sums<S: AsRef<[u32]> + Sync>(
        &self,
        sequences: &[S],
        masks: &[Vec<bool>],
        temperature: f32,
    ) -> Result<Vec<f64>> {
        check_masks(sequences, masks)?;
        let lps = self.logprobs(sequences, temperature)?;
        Ok(lps
            .iter()
            .zip(masks)
            .map(|(lp, mask)| {
                lp.iter()
                    .zip(&mask[1..])
                    .filter(|(_, &m)| m)
                    .map(|(&v, _)| v as f64)
                    .sum()
            })
            .collect())
    }

    fn logprobs_packed<S: AsRef<[u32]>>(
        &self,
        sequences: &[S],
        temperature: f32,
        s: &mut Scratch,
    ) -> Result<Vec<Vec<f32>>> {
        let mut tokens = Vec::new();
        let mut slots = Vec::new();
        let mut caches = Vec::with_capacity(sequences.len());
        for (i, seq) in sequences.iter().enumerate() {
            let seq = seq.as_ref();
            tokens.extend_from_slice(seq);
            slots.extend((0..seq.len()).map(|pos| Slot { seq: i, pos }));
            caches.push(KvCache::new(&self.config, seq.len())?);
        }
        self.forward(&tokens, &slots, &mut caches, s)?;
        let (c, v) = (self.config.hidden_size, self.config.vocab_size);
        // Row r of the packed batch predicts tokens[r + 1] unless r is a sequence's last token.
        let mut rows: Vec<(usize, u32)> = Vec::with_capacity(tokens.len());
        let mut offset = 0;
        for seq in sequences {
            let seq = seq.as_ref();
            for (t, &target) in seq.iter().enumerate().skip(1) {
                rows.push((offset + t - 1, target));
            }
            offset += seq.len();
        }
        let mut lps = vec![0f32; rows.len()];
        let mut hidden = vec![0f32; LOGIT_ROWS * c];
        let mut logits = zeroed(LOGIT_ROWS * v)?;
        for (chunk, lp_chunk) in rows.chunks(LOGIT_ROWS).zip(lps.chunks_mut(LOGIT_ROWS)) {
            for (i, &(r, _)) in chunk.iter().enumerate() {
                hidden[i * c..(i + 1) * c].copy_from_slice(&s.h[r * c..(r + 1) * c]);
            }
            self.lm_head(&mut logits, &hidden, chunk.len());
            // Rows in parallel: each is its own serial log-softmax over the vocabulary.
            lp_chunk
                .par_iter_mut()
                .zip(chunk)
                .zip(logits.par_chunks(v))
                .for_each(|((lp, &(_, target)), row)| {
                    *lp = log_prob_of(row, temperature, target as usize);
                });
        }
        let mut out = Vec::with_capacity(sequences.len());
        let mut taken = 0;
        for seq in sequences {
            let n = seq.as_ref().len() - 1;
            out.push(lps[taken..taken + n].to_vec());
            taken += n;
        }
        Ok(out)
    }

    /// `logits (rows, V) = hidden (rows, C) · headᵀ`.
    pub(crate) fn lm_head(&self, logits: &mut [f32], hidden: &[f32], rows: usize) {
        let (c, v) = (self.config.hidden_size, self.config.vocab_size);
        let head = self.weights.lm_head();
        if let Some(q) = head.quant() {
            let (logits, hidden) = (&mut logits[..rows * v], &hidden[..rows * c]);
            quantized_product(self.int8_activations, logits, hidden, q, None, rows);
            return;
        }
        matmul(
            &mut logits[..rows * v],
            &hidden[..rows * c],
            head.as_slice(),
            None,
            rows,
            v,
            c,
        );
    }

    /// Whether Q4_0/Q4_1/Q8_0/Q4_K/Q6_K matrices run with 8-bit activations
    /// ([`LoadOptions::int8_activations`]).
    pub fn int8_activations(&self) -> bool {
        self.int8_activations
    }

    /// True when some weight matrix is kept in quantized blocks ([`LoadOptions::keep_quantized`]).
    pub fn is_quantized(&self) -> bool {
        self.weights.has_quantized()
    }

    /// Turns every quantized matrix into f32 (what a trainer needs; a no-op on f32 models).
    pub fn dequantize_weights(&mut self) {
        self.weights.dequantize();
        // Nothing is left for 8-bit activations to run on.
        self.int8_activations = false;
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// `chat_template` of a `tokenizer_config.json`: a string, or a list of named templates (the
/// one named `default` is used).
fn hf_chat_template(cfg: &Value) -> Option<String> {
    match cfg.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

fn template_for(tok: &Tokenizer, source: &str) -> Result<ChatTemplate> {
    ChatTemplate::new(source, tok.bos_token(), tok.eos_token())
}

/// Sampling settings a `generation_config.json` asks for (transformers' names).
fn generation_defaults(g: &Value) -> SamplingParams {
    let num = |k: &str| g.get(k).and_then(Value::as_f64);
    let base = SamplingParams::default();
    let max_new_tokens = g
        .get("max_new_tokens")
        .and_then(Value::as_u64)
        .map_or(base.max_new_tokens, |v| v as usize);
    let repetition_penalty = num("repetition_penalty").unwrap_or(1.0) as f32;
    if !g.get("do_sample").and_then(Value::as_bool).unwrap_or(false) {
        return SamplingParams {
            repetition_penalty,
            ..SamplingParams::greedy(max_new_tokens)
        };
    }
    SamplingParams {
        max_new_tokens,
        temperature: num("temperature").unwrap_or(1.0) as f32,
        top_k: num("top_k").unwrap_or(0.0) as usize,
        top_p: num("top_p").unwrap_or(1.0) as f32,
        min_p: num("min_p").unwrap_or(0.0) as f32,
        repetition_penalty,
        ..base
    }
}

/// One mask per sequence, one flag per token, and token 0 (which has no log-prob) unselected.
pub(crate) fn check_masks<S: AsRef<[u32]>>(sequences: &[S], masks: &[Vec<bool>]) -> Result<()> {
    if masks.len() != sequences.len() {
        return Err(Error::invalid(format!(
            "{} masks for {} sequences",
            masks.len(),
            sequences.len()
        )));
    }
    for (i, (seq, mask)) in sequences.iter().zip(masks).enumerate() {
        if mask.len() != seq.as_ref().len() {
            return Err(Error::invalid(format!(
                "mask {i} has {} entries for a sequence of {} tokens",
                mask.len(),
                seq.as_ref().len()
            )));
        }
        if mask.first() == Some(&true) {
            return Err(Error::invalid(format!(
                "mask {i} selects token 0, which has no log-prob"
            )));
        }
    }
    Ok(())
}

pub(crate) fn checked_temperature(t: f32) -> Result<f32> {
    if !(t.is_finite() && t >= 0.0) {
        return Err(Error::invalid(format!(
            "temperature must be a finite number ≥ 0, got {t}"
        )));
    }
    Ok(if t == 0.0 { 1.0 } else { t })
}

fn build_pool(threads: usize) -> Result<Option<Arc<ThreadPool>>> {
    if threads == 0 {
        return Ok(None);
    }
    if threads > 1024 {
        return Err(Error::invalid(format!(
            "{threads} threads requested; at most 1024"
        )));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map(|p| Some(Arc::new(p)))
        .map_err(|e| Error::invalid(format!("cannot start {threads} threads: {e}")))
}

fn default_eos_ids(dir: &Path, cfg: &ModelConfig, tok: Option<&Tokenizer>) -> Result<Vec<u32>> {
    if let Some(value) = read_json_opt(&dir.join("generation_config.json"))? {
        if let Some(ids) = generation_eos_ids(&value)? {
            if let Some(&id) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                return Err(Error::TokenOutOfRange {
                    id,
                    vocab: cfg.vocab_size,
                });
            }
            return Ok(ids);
        }
    }
    if !cfg.eos_token_ids.is_empty() {
        return Ok(cfg.eos_token_ids.clone());
    }
    Ok(tok
        .and_then(Tokenizer::eos_token_id)
        .filter(|&id| (id as usize) < cfg.vocab_size)
        .into_iter()
        .collect())
}

/// Several [`quantized_product`]s of the same input as one parallel step (where every product
/// takes the same kernel; otherwise one call each) — the same bits either way.
pub(crate) fn quantized_products(
    int8_activations: bool,
    products: &mut [QuantProduct<'_>],
    x: &[f32],
    rows: usize,
) {
    let int8 = |p: &QuantProduct<'_>| int8_activations && int8_matmul::supports(p.w.ty);
    if products.iter().all(int8) {
        int8_matmul::int8_matmuls(products, x, rows);
    } else if !products.iter().any(int8) {
        quant_matmuls(products, x, rows);
    } else {
        for p in products {
            quantized_product(int8_activations, p.out, x, p.w, p.bias, rows);
        }
    }
}

/// A product on blocks kept in memory: exact ([`quant_matmul`]), or with 8-bit activations
/// ([`int8_matmul`]) when the model asks for them and the type has that kernel.
pub(crate) fn quantized_product(
    int8_activations: bool,
    out: &mut [f32],
    x: &[f32],
    w: QuantMatrix<'_>,
    bias: Option<&[f32]>,
    rows: usize,
) {
    if int8_activations && int8_matmul::supports(w.ty) {
        int8_matmul(out, x, w, bias, rows);
    } else {
        // Bit for bit the f32 product on the dequantized weights.
        quant_matmul(out, x, w, bias, rows);
    }
}

/// The load error for a tensor holding NaN or infinite values.
fn non_finite_error(source: &Path, name: &str) -> Error {
    Error::format(
        source,
        format!(
            "tensor `{name}` holds NaN or infinite values (load with allow_non_finite to accept \
             them)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_sets_sampling_defaults() {
        let g = serde_json::json!({"do_sample": true, "temperature": 0.2, "top_p": 0.9, "max_new_tokens": 64});
        let p = generation_defaults(&g);
        assert_eq!((p.temperature, p.top_p, p.max_new_tokens), (0.2, 0.9, 64));
        let greedy = generation_defaults(&serde_json::json!({"temperature": 0.7}));
        assert_eq!(
            greedy.temperature, 0.0,
            "without do_sample transformers decodes greedily"
        );
    }

    #[test]
    fn chat_template_may_be_a_named_list() {
        let cfg = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(hf_chat_template(&cfg).as_deref(), Some("D"));
        assert_eq!(hf_chat_template(&serde_json::json!({})), None);
    }
}
