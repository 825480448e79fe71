//! `rlx.Model` and `rlx.Generation`.
//!
//! Every method copies its Python inputs into Rust values first, then releases the GIL
//! (`py.detach`) for the core call, so other Python threads run meanwhile — including calls on
//! the same model, which is immutable after loading.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use numpy::PyArray1;
use pyo3::prelude::*;
use rlx::{FinishReason, LoadOptions, SamplingParams};

use crate::convert::{count, token_id_lists, token_ids};
use crate::errors::{to_py_err, Class};
use crate::handle::Closable;

/// A decoder language model loaded from a Hugging Face folder or a GGUF file.
#[pyclass(module = "rlx", name = "Model", frozen)]
pub struct PyModel {
    inner: Closable<rlx::Model>,
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

    /// The new token ids as an int32 NumPy array (``tokens`` is the same as a list).
    #[getter]
    fn token_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i32>>> {
        let ids = self
            .tokens
            .iter()
            .map(|&t| i32::try_from(t))
            .collect::<Result<Vec<i32>, _>>()
            .map_err(|_| Class::InvalidArgument.err(py, "a token id does not fit in int32"))?;
        Ok(PyArray1::from_vec(py, ids))
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
        PyModel {
            inner: Closable::new(inner),
        }
    }

    /// The model (a cheap clone sharing the weights), or ClosedError after `close()`.
    fn m(&self, py: Python<'_>) -> PyResult<rlx::Model> {
        self.inner.get(py, "Model")
    }
}

/// Loads a model with the GIL released; `threads` < 0 is an argument error.
pub(crate) fn load_model(
    py: Python<'_>,
    path: &std::path::Path,
    threads: i64,
    allow_non_finite: bool,
    int8_activations: bool,
    device: &str,
    device_dtype: &str,
) -> PyResult<rlx::Model> {
    let threads = count(py, threads, "threads")?;
    let device: rlx::Device = device.parse().map_err(|e| to_py_err(py, e))?;
    let device_dtype: rlx::DeviceDtype = device_dtype.parse().map_err(|e| to_py_err(py, e))?;
    py.detach(|| {
        rlx::Model::load(
            path,
            LoadOptions {
                threads,
                allow_non_finite,
                int8_activations,
                device,
                device_dtype,
                ..Default::default()
            },
        )
    })
    .map_err(|e| to_py_err(py, e))
}

#[pymethods]
impl PyModel {
    /// Loads a Hugging Face model folder (config.json, model.safetensors, tokenizer.json, ...)
    /// or a GGUF file.
    /// `threads`: worker threads for this model's calls; 0 = one per CPU core.
    /// `allow_non_finite`: accept weights holding NaN/inf (refused with ModelFormatError
    /// otherwise).
    /// `device`: "cpu" (default), "cuda" or "cuda:N"; on CUDA, logits, log-probs, generation,
    /// values and training (gradients and AdamW; not LoRA) run on the device (not yet verified
    /// on a GPU); a missing driver, device, NVRTC or cuBLAS raises UnsupportedError.
    /// `device_dtype`: on CUDA, "f32" (default) or "bf16" storage of the matrices and the KV
    /// cache (f32 accumulation; a Trainer trains an f32 copy).
    /// `int8_activations`: a GGUF's Q4_0/Q4_1/Q8_0/Q4_K/Q6_K matrices run with 8-bit activations
    /// (integer dot products, as llama.cpp runs them): faster decoding, log-probs within the
    /// activations' rounding of the exact ones (generate and logprobs still agree exactly;
    /// training log-probs no longer equal the model's). CPU and GGUF only, else
    /// InvalidArgumentError.
    #[staticmethod]
    #[pyo3(signature = (path, threads = 0, allow_non_finite = false, device = "cpu", device_dtype = "f32", int8_activations = false))]
    fn load(
        py: Python<'_>,
        path: PathBuf,
        threads: i64,
        allow_non_finite: bool,
        device: &str,
        device_dtype: &str,
        int8_activations: bool,
    ) -> PyResult<Self> {
        Ok(PyModel::from_model(load_model(
            py,
            &path,
            threads,
            allow_non_finite,
            int8_activations,
            device,
            device_dtype,
        )?))
    }

    /// Generates a continuation of each prompt (a list of token-id lists or 1-D arrays).
    /// temperature 0 is greedy (as is ``do_sample=False``); the same seed gives the same tokens.
    /// Ctrl-C (KeyboardInterrupt) stops it within a token.
    ///
    /// >>> out = model.generate([prompt], max_new_tokens=16, temperature=0.0)[0]
    /// >>> out.tokens, out.logprobs, out.finish_reason
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
        do_sample = true,
        sampling_params = None,
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
        do_sample: bool,
        sampling_params: Option<PyRef<'_, PySamplingParams>>,
    ) -> PyResult<Vec<PyGeneration>> {
        let model = self.m(py)?;
        let prompts = token_id_lists(prompts, "prompts")?;
        let params = match sampling_params {
            Some(sp) => sp.inner.clone(),
            None => build_sampling_params(
                py,
                max_new_tokens,
                if do_sample { temperature } else { 0.0 },
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                stop_token_ids,
                seed,
            )?,
        };
        let interrupt = Interrupt::default();
        let outs = py.detach(|| {
            let mut on_token = |_seq: usize, _tok: u32, _lp: f32| interrupt.poll();
            model.generate(&prompts, &params, Some(&mut on_token))
        });
        interrupt.raise(py)?;
        let outs = outs.map_err(|e| to_py_err(py, e))?;
        Ok(outs
            .into_iter()
            .map(|g| PyGeneration {
                tokens: g.tokens,
                logprobs: PyArray1::from_vec(py, g.logprobs).unbind(),
                finish_reason: finish_reason_name(g.finish_reason),
            })
            .collect())
    }

    /// Generates a continuation of one prompt as an iterator over its new tokens, each as
    /// ``(token_id, logprob, text)``: ``text`` is the new text the token completes ("" while a
    /// multi-byte character is still partial). Generation runs in the background, ahead of the
    /// loop by at most a few tokens; leaving the loop early (``break``, an exception, Ctrl-C)
    /// or calling ``close()`` on the iterator stops it. Same arguments as ``generate``.
    ///
    /// >>> for token, logprob, text in model.stream(prompt, max_new_tokens=32):
    /// ...     print(text, end="", flush=True)
    #[pyo3(signature = (
        prompt,
        max_new_tokens = 128,
        temperature = 1.0,
        top_k = 0,
        top_p = 1.0,
        min_p = 0.0,
        repetition_penalty = 1.0,
        stop_token_ids = None,
        seed = 0,
        do_sample = true,
        sampling_params = None,
    ))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
    fn stream(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        max_new_tokens: i64,
        temperature: f64,
        top_k: i64,
        top_p: f64,
        min_p: f64,
        repetition_penalty: f64,
        stop_token_ids: Option<&Bound<'_, PyAny>>,
        seed: u64,
        do_sample: bool,
        sampling_params: Option<PyRef<'_, PySamplingParams>>,
    ) -> PyResult<PyTokenStream> {
        let model = self.m(py)?;
        let prompt = token_ids(prompt, "prompt")?;
        let params = match sampling_params {
            Some(sp) => sp.inner.clone(),
            None => build_sampling_params(
                py,
                max_new_tokens,
                if do_sample { temperature } else { 0.0 },
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                stop_token_ids,
                seed,
            )?,
        };
        // Argument errors are raised here, not at the first `next()`.
        params
            .validate()
            .and_then(|()| model.check_tokens(&prompt, params.max_new_tokens))
            .map_err(|e| to_py_err(py, e))?;
        Ok(PyTokenStream::start(model, prompt, params))
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
        let model = self.m(py)?;
        let sequences = token_id_lists(sequences, "sequences")?;
        let lps = py
            .detach(|| model.logprobs(&sequences, knob(temperature)))
            .map_err(|e| to_py_err(py, e))?;
        Ok(lps.into_iter().map(|v| PyArray1::from_vec(py, v)).collect())
    }

    /// Token ids of `text`; `add_special_tokens` adds e.g. a BOS token, as transformers does.
    #[pyo3(signature = (text, add_special_tokens = true))]
    fn encode(&self, py: Python<'_>, text: String, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let model = self.m(py)?;
        py.detach(|| {
            model
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
        let model = self.m(py)?;
        let ids = token_ids(ids, "ids")?;
        // Ids the tokenizer does not know would silently vanish from the text; say so instead.
        let vocab = model.config().vocab_size;
        if let Some(&id) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(to_py_err(py, rlx::Error::TokenOutOfRange { id, vocab }));
        }
        py.detach(|| {
            model
                .require_tokenizer()
                .and_then(|t| t.decode(&ids, skip_special_tokens))
        })
        .map_err(|e| to_py_err(py, e))
    }

    /// Renders chat messages (dicts with "role" and "content") with the model's chat template,
    /// as transformers' ``apply_chat_template(..., tokenize=False)`` does. Encode the result
    /// with ``add_special_tokens=False``: the template wrote the special tokens it wants.
    ///
    /// >>> text = model.apply_chat_template([{"role": "user", "content": "Hi"}])
    /// >>> prompt = model.encode(text, add_special_tokens=False)
    #[pyo3(signature = (messages, add_generation_prompt = true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let model = self.m(py)?;
        let mut msgs = Vec::new();
        for (i, m) in messages.try_iter()?.enumerate() {
            let m = m?;
            let field = |key: &str| -> PyResult<String> {
                m.get_item(key)
                    .and_then(|v| v.extract::<String>())
                    .map_err(|_| {
                        Class::InvalidArgument.err(
                            py,
                            format!("message {i} needs a string {key:?} (messages are dicts)"),
                        )
                    })
            };
            msgs.push(rlx::Message::new(field("role")?, field("content")?));
        }
        let template = model.chat_template().ok_or_else(|| {
            to_py_err(
                py,
                rlx::Error::Template("this model has no chat template".into()),
            )
        })?;
        template
            .render(&msgs, add_generation_prompt)
            .map_err(|e| to_py_err(py, e))
    }

    /// Number of token ids the model knows; every id must be below it.
    #[getter]
    fn vocab_size(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.m(py)?.config().vocab_size)
    }

    /// The most positions (prompt + new tokens) one sequence may use.
    #[getter]
    fn context_length(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.m(py)?.config().max_position_embeddings)
    }

    /// Tokens that end generation when `stop_token_ids` is None.
    #[getter]
    fn eos_token_ids(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        Ok(self.m(py)?.eos_token_ids().to_vec())
    }

    /// Releases the model: later calls raise ClosedError. Calls already running finish first
    /// (they hold their own reference); the memory goes when the last one is done.
    fn close(&self) {
        self.inner.close();
    }

    /// True after `close()`.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.inner.close();
        false
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        match self.m(py) {
            Ok(m) => format!(
                "Model(path={:?}, architecture={:?}, vocab_size={})",
                m.source().display().to_string(),
                m.config().architecture.hf_class(),
                m.config().vocab_size
            ),
            Err(_) => "Model(closed)".to_string(),
        }
    }
}

/// Sampling settings kept as one object (as vLLM's `SamplingParams`), for
/// `Model.generate(..., sampling_params=sp)` and `Model.stream`; when given, it replaces the
/// individual keyword arguments.
///
/// >>> sp = rlx.SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=1)
/// >>> model.generate([prompt], sampling_params=sp)
#[pyclass(module = "rlx", name = "SamplingParams", frozen)]
pub struct PySamplingParams {
    inner: SamplingParams,
}

#[pymethods]
impl PySamplingParams {
    #[new]
    #[pyo3(signature = (
        max_new_tokens = 128,
        temperature = 1.0,
        top_k = 0,
        top_p = 1.0,
        min_p = 0.0,
        repetition_penalty = 1.0,
        stop_token_ids = None,
        seed = 0,
        do_sample = true,
    ))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
    fn new(
        py: Python<'_>,
        max_new_tokens: i64,
        temperature: f64,
        top_k: i64,
        top_p: f64,
        min_p: f64,
        repetition_penalty: f64,
        stop_token_ids: Option<&Bound<'_, PyAny>>,
        seed: u64,
        do_sample: bool,
    ) -> PyResult<Self> {
        let inner = build_sampling_params(
            py,
            max_new_tokens,
            if do_sample { temperature } else { 0.0 },
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            stop_token_ids,
            seed,
        )?;
        inner.validate().map_err(|e| to_py_err(py, e))?;
        Ok(PySamplingParams { inner })
    }

    #[getter]
    fn max_new_tokens(&self) -> usize {
        self.inner.max_new_tokens
    }
    #[getter]
    fn temperature(&self) -> f32 {
        self.inner.temperature
    }
    #[getter]
    fn top_k(&self) -> usize {
        self.inner.top_k
    }
    #[getter]
    fn top_p(&self) -> f32 {
        self.inner.top_p
    }
    #[getter]
    fn min_p(&self) -> f32 {
        self.inner.min_p
    }
    #[getter]
    fn repetition_penalty(&self) -> f32 {
        self.inner.repetition_penalty
    }
    #[getter]
    fn stop_token_ids(&self) -> Option<Vec<u32>> {
        self.inner.stop_token_ids.clone()
    }
    #[getter]
    fn seed(&self) -> u64 {
        self.inner.seed
    }

    fn __repr__(&self) -> String {
        let p = &self.inner;
        format!(
            "SamplingParams(max_new_tokens={}, temperature={}, top_k={}, top_p={}, min_p={}, \
             repetition_penalty={}, stop_token_ids={:?}, seed={})",
            p.max_new_tokens,
            p.temperature,
            p.top_k,
            p.top_p,
            p.min_p,
            p.repetition_penalty,
            p.stop_token_ids,
            p.seed
        )
    }
}

/// Sampling arguments → `SamplingParams` (range checks are the core's).
#[allow(clippy::too_many_arguments)]
fn build_sampling_params(
    py: Python<'_>,
    max_new_tokens: i64,
    temperature: f64,
    top_k: i64,
    top_p: f64,
    min_p: f64,
    repetition_penalty: f64,
    stop_token_ids: Option<&Bound<'_, PyAny>>,
    seed: u64,
) -> PyResult<SamplingParams> {
    Ok(SamplingParams {
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
    })
}

/// Ctrl-C while the GIL is released: Python only notices a signal when it runs bytecode, so
/// long calls poll for it from their per-token callback (at most every 50 ms, since taking the
/// GIL may wait for other Python threads) and stop; the caller then raises the
/// KeyboardInterrupt.
#[derive(Default)]
pub(crate) struct Interrupt {
    pending: std::sync::Mutex<Option<PyErr>>,
    last_check: std::sync::Mutex<Option<Instant>>,
}

impl Interrupt {
    /// True to go on; false once a signal handler raised.
    pub(crate) fn poll(&self) -> bool {
        if self
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some()
        {
            return false; // every remaining sequence stops too
        }
        let mut last = self
            .last_check
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_millis(50)) {
            return true;
        }
        *last = Some(Instant::now());
        match Python::attach(|py| py.check_signals()) {
            Ok(()) => true,
            Err(e) => {
                *self
                    .pending
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(e);
                false
            }
        }
    }

    /// Raises what a signal handler raised during the call, if anything.
    pub(crate) fn raise(&self, _py: Python<'_>) -> PyResult<()> {
        match self
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

enum StreamEvent {
    Token(u32, f32),
    Failed(rlx::Error),
}

/// The iterator `Model.stream` returns: ``(token_id, logprob, text)`` per new token.
#[pyclass(module = "rlx", name = "TokenStream")]
pub struct PyTokenStream {
    /// In a mutex only because pyclasses must be `Sync`; `__next__` has `&mut self` anyway.
    events: Option<std::sync::Mutex<Receiver<StreamEvent>>>,
    cancel: Arc<AtomicBool>,
    worker: Option<std::thread::JoinHandle<()>>,
    model: rlx::Model,
    text: rlx::TextStream,
}

impl PyTokenStream {
    fn start(model: rlx::Model, prompt: Vec<u32>, params: SamplingParams) -> Self {
        let (tx, rx) = sync_channel(16);
        let cancel = Arc::new(AtomicBool::new(false));
        let worker = {
            let (model, cancel) = (model.clone(), cancel.clone());
            std::thread::spawn(move || {
                let mut on_token = |_seq: usize, tok: u32, lp: f32| {
                    !cancel.load(Ordering::Relaxed) && tx.send(StreamEvent::Token(tok, lp)).is_ok()
                };
                if let Err(e) = model.generate(&[prompt], &params, Some(&mut on_token)) {
                    let _ = tx.send(StreamEvent::Failed(e));
                }
            })
        };
        PyTokenStream {
            events: Some(std::sync::Mutex::new(rx)),
            cancel,
            worker: Some(worker),
            model,
            text: rlx::TextStream::new(),
        }
    }

    fn stop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        // Dropping the receiver also unblocks a worker waiting to send.
        self.events = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for PyTokenStream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.events = None;
        // The worker notices within a token; it holds only its own clone of the model.
    }
}

#[pymethods]
impl PyTokenStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<(u32, f32, String)>> {
        loop {
            let Some(events) = self.events.as_ref() else {
                return Ok(None);
            };
            let got = py.detach(|| {
                events
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .recv_timeout(Duration::from_millis(50))
            });
            match got {
                Ok(StreamEvent::Token(tok, lp)) => {
                    let text = match self.model.tokenizer() {
                        Some(t) => self
                            .text
                            .push(t, tok)
                            .map_err(|e| to_py_err(py, e))?
                            .unwrap_or_default(),
                        None => String::new(),
                    };
                    return Ok(Some((tok, lp, text)));
                }
                Ok(StreamEvent::Failed(e)) => {
                    self.stop();
                    return Err(to_py_err(py, e));
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        self.stop();
                        return Err(e);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.stop();
                    return Ok(None);
                }
            }
        }
    }

    /// Stops generation; the iterator then ends.
    fn close(&mut self) {
        self.stop();
    }
}
