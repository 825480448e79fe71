//! The C ABI of rlx: `librlx.so` / `librlx.a` with the header `include/rlx.h`, generated from
//! this crate by cbindgen (regenerate with `ffi/regen-header.sh`; a test fails when the
//! committed header is stale).
//!
//! Conventions, in the spirit of sqlite3.h and llama.h:
//! - every fallible call returns an `rlx_status`; `rlx_last_error()` gives a thread-local message
//!   valid until the next rlx call on that thread (empty after a success);
//! - handles are opaque, created by `*_load` and released by `*_free` (NULL is a no-op);
//! - outputs go to caller-owned `(pointer, capacity, *n_written)` buffers; a buffer that is too
//!   small yields `RLX_BUFFER_TOO_SMALL` with the size needed in `*n_written`;
//! - parameter structs come from `*_default_params()` and are passed by pointer, so fields can
//!   be appended without changing any function's signature;
//! - no Rust panic crosses the boundary (each export runs under `catch_unwind`), and every
//!   pointer is checked for NULL before it is used.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

// Blank lines keep rustfmt from sorting these: cbindgen emits the header in this order.
mod status;

mod version;

mod model;

mod memory;

mod tokenize;

mod generate;

mod train;

mod rl;

mod reward;

mod chat;

mod ptr;

mod handle;

pub use chat::{rlx_apply_chat_template, rlx_chat_message};
pub use generate::{
    rlx_generate, rlx_generate_stream, rlx_logprobs, rlx_sampling_default_params,
    rlx_sampling_params, rlx_token_callback,
};
pub use memory::rlx_set_memory_limit;
pub use model::{
    rlx_model, rlx_model_context_length, rlx_model_default_params, rlx_model_eos_token_ids,
    rlx_model_free, rlx_model_load, rlx_model_params, rlx_model_vocab_size,
};
pub use reward::{
    rlx_reward_model, rlx_reward_model_free, rlx_reward_model_load, rlx_reward_model_score,
};
pub use rl::{
    rlx_dpo_default_params, rlx_dpo_params, rlx_group_advantages, rlx_grpo_default_params,
    rlx_grpo_params, rlx_ppo_advantages, rlx_ppo_default_params, rlx_ppo_params,
    rlx_trainer_dpo_step, rlx_trainer_grpo_step, rlx_trainer_model, rlx_trainer_ppo_step,
    rlx_trainer_values, RLX_DPO_HINGE, RLX_DPO_IPO, RLX_DPO_SIGMOID, RLX_GRPO_LOSS_BNPO,
    RLX_GRPO_LOSS_DAPO, RLX_GRPO_LOSS_DR_GRPO, RLX_GRPO_LOSS_GRPO,
};
pub use status::{rlx_last_error, rlx_status, rlx_status_string};
pub use tokenize::{rlx_detokenize, rlx_tokenize};
pub use train::{
    rlx_reward_score, rlx_step_stats, rlx_trainer, rlx_trainer_create, rlx_trainer_default_params,
    rlx_trainer_free, rlx_trainer_params, rlx_trainer_resume, rlx_trainer_rm_step,
    rlx_trainer_save, rlx_trainer_sft_step, RLX_HEAD_NONE, RLX_HEAD_SCORE, RLX_HEAD_VALUE,
};
pub use version::{
    rlx_version_number, rlx_version_string, RLX_VERSION_MAJOR, RLX_VERSION_MINOR,
    RLX_VERSION_NUMBER, RLX_VERSION_PATCH,
};
