//! One error type for the whole engine. Every fallible call returns [`Result`]; variants carry
//! what a caller needs to act on the failure (which file, which tensor, which limit).

use std::path::PathBuf;

/// Result alias used throughout rlx.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // === Files ===
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },

    // === Model format ===
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("tensor `{name}` is missing from the checkpoint")]
    TensorMissing { name: String },
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error(
        "tensor `{name}` has dtype {dtype}, which rlx cannot read (supported: F32, F16, BF16)"
    )]
    TensorDtype { name: String, dtype: String },

    // === Tokenizer ===
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("this model has no tokenizer (no tokenizer.json in its folder, or no tokenizer.ggml.* metadata in its GGUF)")]
    NoTokenizer,

    // === Inputs ===
    #[error("token id {id} is out of range for a vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("sequence needs {requested} positions but the model's context length is {max}")]
    ContextOverflow { requested: usize, max: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The CUDA side: no driver or device, NVRTC missing, a kernel that does not compile, or
    /// a model asked to run on CUDA (not built yet).
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A rollout collector outside this process (e.g. Ray workers) failed.
    #[error("rollout collector: {0}")]
    Collector(String),
    #[error("not enough memory for {what}: needs {} MiB, {} MiB available", needed >> 20, available >> 20)]
    OutOfMemory {
        what: String,
        needed: u64,
        available: u64,
    },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }
}
