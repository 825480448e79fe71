//! The process-wide memory budget requests are checked against (see `rlx::memory`).

/// Caps the bytes one request (a generation's KV caches, a training step's activations) may
/// plan to allocate; 0 removes the cap. Requests that would exceed it — or the memory the system
/// reports available — fail with `RLX_OUT_OF_MEMORY` before allocating anything.
/// `RLX_MEMORY_LIMIT` in the environment (bytes, or with a K/M/G suffix) sets a cap too; the
/// tightest applies. Thread-safe; applies to every model in the process.
#[no_mangle]
pub extern "C" fn rlx_set_memory_limit(bytes: u64) {
    rlx_core::set_memory_limit((bytes > 0).then_some(bytes));
}
