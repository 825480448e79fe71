//! Reading checkpoints. HF tensor names are the canonical names everywhere in rlx.

mod safetensors_file;

pub use safetensors_file::SafetensorsCheckpoint;
