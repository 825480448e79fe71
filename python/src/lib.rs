//! `rlx._rlx`: the compiled half of the `rlx` Python package (the Python half, `python/rlx/`,
//! re-exports it and defines the exception classes in `rlx/errors.py`).
//!
//! Layout: `model.rs` (the classes), `convert.rs` (Python inputs → Rust), `errors.rs` (core
//! errors → exceptions). Expected failures are exceptions of `rlx.errors` or `OSError`s, never
//! a `PanicException`.

mod convert;
mod distributed;
mod errors;
mod handle;
mod model;
mod train;

use pyo3::prelude::*;

/// rlx: run decoder language models on the CPU.
// Free-threaded Python is fine: models are immutable and every class is `Sync`.
#[pymodule(gil_used = false)]
mod _rlx {
    use super::*;

    #[pymodule_export]
    use crate::distributed::{run_on_policy, PyWorkerModels};
    #[pymodule_export]
    use crate::model::{PyGeneration, PyModel, PySamplingParams, PyTokenStream};
    #[pymodule_export]
    use crate::train::{group_advantages, ppo_advantages, PyLoraConfig, PyRewardModel, PyTrainer};

    /// Caps the bytes one request (a generation's KV caches, a training step's activations)
    /// may plan to allocate; ``None`` removes the cap. A request over it — or over the memory
    /// the system reports available — raises ``MemoryError`` before allocating anything.
    /// Process-wide; ``RLX_MEMORY_LIMIT`` in the environment sets a cap too.
    #[pyfunction]
    #[pyo3(signature = (limit_bytes))]
    fn set_memory_limit(limit_bytes: Option<u64>) {
        rlx::set_memory_limit(limit_bytes.filter(|&b| b > 0));
    }

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", rlx::VERSION)
    }
}
