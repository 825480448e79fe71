//! The Rust half of `rlx.distributed`: an on-policy run driven from Python with a Python
//! rollout collector (Ray workers), and the rollout worker's models. Everything that decides a
//! number stays in Rust (`rlx::pipeline::job`); Python only moves bytes and JSON between
//! processes.

use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rlx::pipeline::job::{policy_state, OnPolicyJob, WorkerModels};
use rlx::pipeline::rollout::{Collector, RolloutRequest, Sample};
use rlx::pipeline::{Observer, Outcome};
use rlx::{Error, Model};

use crate::errors::to_py_err;

/// Calls `collector.collect(state: bytes, request: str) -> str` (samples as JSON) with the
/// GIL held; a Python exception is kept to be raised once the run returns.
struct PyCollector {
    target: Py<PyAny>,
    raised: Option<PyErr>,
}

impl Collector for PyCollector {
    fn collect(
        &mut self,
        policy: &mut Model,
        request: &RolloutRequest,
    ) -> rlx::Result<Vec<Sample>> {
        let state = policy_state(policy)?;
        let request = serde_json::to_string(request)
            .map_err(|e| Error::Collector(format!("request: {e}")))?;
        let reply = Python::attach(|py| -> PyResult<String> {
            let bytes = PyBytes::new(py, &state);
            self.target
                .bind(py)
                .call_method1("collect", (bytes, request))?
                .extract()
        });
        match reply {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::Collector(format!("the collector's samples: {e}"))),
            Err(e) => {
                let message = e.to_string();
                self.raised = Some(e);
                Err(Error::Collector(message))
            }
        }
    }
}

/// Metrics and messages go to Python callables; Ctrl-C (a pending signal) stops the run after
/// the current step with a checkpoint.
struct PyObserver {
    on_metrics: Option<Py<PyAny>>,
    on_message: Option<Py<PyAny>>,
}

impl PyObserver {
    fn call(target: &Option<Py<PyAny>>, text: String) {
        if let Some(f) = target {
            Python::attach(|py| {
                if let Err(e) = f.bind(py).call1((text,)) {
                    // A failing callback must not end the run; Python shows it.
                    e.print(py);
                }
            });
        }
    }
}

impl Observer for PyObserver {
    fn record(&mut self, metrics: &serde_json::Value) {
        Self::call(&self.on_metrics, metrics.to_string());
    }
    fn message(&mut self, text: &str) {
        match &self.on_message {
            Some(_) => Self::call(&self.on_message, text.to_string()),
            None => eprintln!("{text}"),
        }
    }
    fn stop_requested(&self) -> bool {
        Python::attach(|py| py.check_signals()).is_err()
    }
}

/// Runs an on-policy job (the JSON of ``rlx ppo``/``rlx grpo``'s settings) in this process.
/// With ``collector``, every rollout is asked of ``collector.collect(state, request)``:
/// ``state`` is the policy's trainable tensors as safetensors bytes, ``request`` and the
/// returned samples are JSON. ``on_metrics`` gets each metrics line (JSON), ``on_message``
/// each note. Returns ``(outcome, steps, last_metrics_json, model_dir)``.
#[pyfunction]
#[pyo3(signature = (job, collector=None, on_metrics=None, on_message=None))]
pub fn run_on_policy(
    py: Python<'_>,
    job: &str,
    collector: Option<Py<PyAny>>,
    on_metrics: Option<Py<PyAny>>,
    on_message: Option<Py<PyAny>>,
) -> PyResult<(String, u64, String, Option<String>)> {
    let job = OnPolicyJob::from_json(job).map_err(|e| to_py_err(py, e))?;
    let mut observer = PyObserver {
        on_metrics,
        on_message,
    };
    let mut remote = collector.map(|target| PyCollector {
        target,
        raised: None,
    });
    let result = py.detach(|| {
        job.run(
            remote.as_mut().map(|c| c as &mut dyn Collector),
            &mut observer,
        )
    });
    if let Some(e) = remote.and_then(|c| c.raised) {
        return Err(e);
    }
    let report = result.map_err(|e| to_py_err(py, e))?;
    let outcome = match report.outcome {
        Outcome::Finished => "finished",
        Outcome::Interrupted => "interrupted",
    };
    Ok((
        outcome.into(),
        report.steps,
        report.last.to_string(),
        report.model_dir.map(|p| p.display().to_string()),
    ))
}

/// A rollout worker's models (policy, reference, reward model) built from an on-policy job,
/// exactly as the learner builds its own.
#[pyclass(module = "rlx", name = "_RolloutWorkerModels", frozen)]
pub struct PyWorkerModels {
    models: Mutex<WorkerModels>,
}

#[pymethods]
impl PyWorkerModels {
    #[new]
    fn new(py: Python<'_>, job: &str) -> PyResult<Self> {
        let job = OnPolicyJob::from_json(job).map_err(|e| to_py_err(py, e))?;
        let models = py
            .detach(|| job.worker_models())
            .map_err(|e| to_py_err(py, e))?;
        Ok(PyWorkerModels {
            models: Mutex::new(models),
        })
    }

    /// Replaces the policy's trainable tensors (the learner's ``state`` bytes).
    fn load_policy_state(&self, py: Python<'_>, state: &[u8]) -> PyResult<()> {
        py.detach(|| {
            self.models
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .load_policy_state(state)
        })
        .map_err(|e| to_py_err(py, e))
    }

    /// Samples and scores a rollout request (JSON); returns the samples as JSON.
    fn collect(&self, py: Python<'_>, request: &str) -> PyResult<String> {
        let request: RolloutRequest = serde_json::from_str(request)
            .map_err(|e| to_py_err(py, Error::invalid(format!("rollout request: {e}"))))?;
        let samples = py
            .detach(|| {
                self.models
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .collect(&request)
            })
            .map_err(|e| to_py_err(py, e))?;
        serde_json::to_string(&samples)
            .map_err(|e| to_py_err(py, Error::invalid(format!("samples: {e}"))))
    }
}
