//! Reading checkpoints. HF tensor names are the canonical names everywhere in rlx.

pub mod gguf;
mod gguf_model;
pub mod quant;
mod safetensors_file;

pub use gguf::GgufFile;
pub use gguf_model::{config_from_gguf, GgufSource};
pub use safetensors_file::SafetensorsCheckpoint;
