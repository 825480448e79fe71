//! rlx: an embeddable engine that runs and fine-tunes decoder language models (GPT-2 and the
//! Llama family) on the CPU, with four primitives — generate, log-prob, reward-score and
//! gradient-step. This crate is the numeric core; the C ABI, the Python package and the `rlx`
//! command are thin layers over it.
//!
//! ```no_run
//! let model = rlx::Model::load("path/to/model", rlx::LoadOptions::default())?;
//! let prompt = model.require_tokenizer()?.encode("Hello", true)?;
//! let outs = model.generate(&[prompt], &rlx::SamplingParams::greedy(16), None)?;
//! let lp = model.logprobs(&[outs[0].tokens.clone()], 1.0)?;
//! # Ok::<(), rlx::Error>(())
//! ```

pub mod backend;
pub mod chat;
pub mod config;
pub mod convert;
pub mod error;
pub mod generate;
pub mod kv_cache;
pub mod memory;
pub mod model;
pub mod pipeline;
pub mod sampling;
pub mod tensor;
pub mod tokenizer;
pub mod tokenizer_gguf;
pub mod train;
pub mod weights;

pub use backend::{Device, DeviceDtype};
pub use chat::{ChatTemplate, Message};
pub use config::{Architecture, Family, ModelConfig};
pub use error::{Error, Result};
pub use generate::{FinishReason, Generation, StreamCallback};
pub use memory::set_memory_limit;
pub use model::{LoadOptions, LoraConfig, Model};
pub use sampling::SamplingParams;
pub use tokenizer::{TextStream, Tokenizer};
pub use train::dpo::{DpoLoss, DpoStats};
pub use train::grpo::{group_advantages, GrpoBatch, GrpoConfig, GrpoLossType, GrpoStats};
pub use train::ppo::{ppo_advantages, Advantages, PpoConfig, PpoMinibatch, PpoStats};
pub use train::{ComputeDtype, Schedule, StepStats, TrainConfig, Trainer};

/// The library version (`CARGO_PKG_VERSION`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
