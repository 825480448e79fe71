//! `rlx.Model` and `rlx.Generation`.
//!
//! Every method copies its Python inputs into Rust values first, then releases the GIL
//! (`py.detach`) for the core call, so other Python threads run meanwhile — including calls on
//! the same model, which is immutable after loading.

use std::path::PathBuf;

use numpy::PyArray1;
use pyo3::prelude::*;
use rlx::{FinishReason, LoadOptions, SamplingParams};

use crate::convert::{count, token_id_lists, token_ids};
use crate::errors::to_py_err;

/// A decoder language model loaded from a Hugging Face folder or a GGUF file.
#[pyclass(module = "rlx", name = "Model", frozen)]
pub struct PyModel {
    inner: rlx::Model,
}

/// One sequence's output of `Model.generate`.
#[pyclass(module = "rlx", name = "Generation", frozen)]
pub struct PyGeneration {
    tokens: Vec<u32>,
    logprobs: Py<PyArray1<f32>>,
    finish_reason: &'static str,
}

fn finish_reason_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

/// f64 → f32 for a sampling knob; out-of-range values become ±inf and the core rejects them.
fn knob(v: f64) -> f32 {
    v as f32
}

#[pymethods]
impl PyGeneration {
    /// New token ids (not the prompt).
    #[getter]
    fn tokens(&self) -> Vec<u32> {
        self.tokens.clone()
    }

    /// Each new token's log-prob (float32), as `Model.logprobs` computes it.
    #[getter]
    fn logprobs<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        self.logprobs.bind(py).clone()
    }

    /// "stop" (a stop token, kept as the last token), "length" (max_new_tokens reached) or
    /// "cancelled".
    #[getter]
    fn finish_reason(&self) -> &'static str {
        self.finish_reason
    }

    fn __len__(&self) -> usize {
        self.tokens.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "Generation(tokens={:?}, finish_reason={:?})",
            self.tokens, self.finish_reason
        )
    }
}

impl PyModel {
    pub(crate) fn from_model(inner: rlx::Model) -> Self {
        PyModel { inner }
    }
}

/// Loads a model with the GIL released; `threads` < 0 is an argument error.
pub(crate) fn load_model(
    py: Python<'_>,
    path: &std::path::Path,
    threads: i64,
) -> PyResult<rlx::Model> {
    let threads = count(py, threads, "threads")?;
    py.detach(|| rlx::Model::load(path, LoadOptions { threads }))
        .map_err(|e| to_py_err(py, e))
}

#[pymethods]
impl PyModel {
    /// Loads a Hugging Face model folder (config.json, model.safetensors, tokenizer.json, ...)
    /// or a GGUF file.
    /// `threads`: worker threads for this model's calls; 0 = one per CPU core.
    #[staticmethod]
    #[pyo3(signature = (path, threads = 0))]
    fn load(py: Python<'_>, path: PathBuf, threads: i64) -> PyResult<Self> {
        Ok(PyModel {
            inner: load_model(py, &path, threads)?,
        })
    }

    /// Generates a continuation of each prompt (a list of token-id lists or 1-D arrays).
    /// temperature 0 is greedy; the same seed gives the same tokens.
    #[pyo3(signature = (
        prompts,
        max_new_tokens = 128,
        temperature = 1.0,
        top_k = 0,
        top_p = 1.0,
        min_p = 0.0,
        repetition_penalty = 1.0,
        stop_token_ids = None,
        seed = 0,
    ))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
    fn generate(
        &self,
        py: Python<'_>,
        prompts: &Bound<'_, PyAny>,
        max_new_tokens: i64,
        temperature: f64,
        top_k: i64,
        top_p: f64,
        min_p: f64,
        repetition_penalty: f64,
        stop_token_ids: Option<&Bound<'_, PyAny>>,
        seed: u64,
    ) -> PyResult<Vec<PyGeneration>> {
        let prompts = token_id_lists(prompts, "prompts")?;
        let params = SamplingParams {
            max_new_tokens: count(py, max_new_tokens, "max_new_tokens")?,
            temperature: knob(temperature),
            top_k: count(py, top_k, "top_k")?,
            top_p: knob(top_p),
            min_p: knob(min_p),
            repetition_penalty: knob(repetition_penalty),
            stop_token_ids: stop_token_ids
                .map(|s| token_ids(s, "stop_token_ids"))
                .transpose()?,
            seed,
        };
        let outs = py
            .detach(|| self.inner.generate(&prompts, &params, None))
            .map_err(|e| to_py_err(py, e))?;
        Ok(outs
            .into_iter()
            .map(|g| PyGeneration {
                tokens: g.tokens,
                logprobs: PyArray1::from_vec(py, g.logprobs).unbind(),
                finish_reason: finish_reason_name(g.finish_reason),
            })
            .collect())
    }

    /// Per-token log-probs of each sequence: `len(seq) - 1` float32 values,
    /// log p(seq[t] | seq[:t]) for t ≥ 1 under softmax(logits / temperature).
    #[pyo3(signature = (sequences, temperature = 1.0))]
    fn logprobs<'py>(
        &self,
        py: Python<'py>,
        sequences: &Bound<'py, PyAny>,
        temperature: f64,
    ) -> PyResult<Vec<Bound<'py, PyArray1<f32>>>> {
        let sequences = token_id_lists(sequences, "sequences")?;
        let lps = py
            .detach(|| self.inner.logprobs(&sequences, knob(temperature)))
            .map_err(|e| to_py_err(py, e))?;
        Ok(lps.into_iter().map(|v| PyArray1::from_vec(py, v)).collect())
    }

    /// Token ids of `text`; `add_special_tokens` adds e.g. a BOS token, as transformers does.
    #[pyo3(signature = (text, add_special_tokens = true))]
    fn encode(&self, py: Python<'_>, text: String, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        py.detach(|| {
            self.inner
                .require_tokenizer()
                .and_then(|t| t.encode(&text, add_special_tokens))
        })
        .map_err(|e| to_py_err(py, e))
    }

    /// Text of token ids (a list or a 1-D array).
    #[pyo3(signature = (ids, skip_special_tokens = true))]
    fn decode(
        &self,
        py: Python<'_>,
        ids: &Bound<'_, PyAny>,
        skip_special_tokens: bool,
    ) -> PyResult<String> {
        let ids = token_ids(ids, "ids")?;
        // Ids the tokenizer does not know would silently vanish from the text; say so instead.
        let vocab = self.inner.config().vocab_size;
        if let Some(&id) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(to_py_err(py, rlx::Error::TokenOutOfRange { id, vocab }));
        }
        py.detach(|| {
            self.inner
                .require_tokenizer()
                .and_then(|t| t.decode(&ids, skip_special_tokens))
        })
        .map_err(|e| to_py_err(py, e))
    }

    /// Number of token ids the model knows; every id must be below it.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.config().vocab_size
    }

    /// The most positions (prompt + new tokens) one sequence may use.
    #[getter]
    fn context_length(&self) -> usize {
        self.inner.config().max_position_embeddings
    }

    /// Tokens that end generation when `stop_token_ids` is None.
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids().to_vec()
    }

    fn __repr__(&self) -> String {
        format!(
            "Model(path={:?}, architecture={:?}, vocab_size={})",
            self.inner.source().display().to_string(),
            self.inner.config().architecture.hf_class(),
            self.inner.config().vocab_size
        )
    }
}
