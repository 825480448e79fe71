//! Core errors → Python exceptions. The classes live in `rlx/errors.py` (real classes with
//! several bases, e.g. `ModelFormatError(RlxError, ValueError)`); I/O errors become the
//! built-in `FileNotFoundError` / `PermissionError` / `OSError` by kind.

use pyo3::exceptions::{
    PyFileNotFoundError, PyMemoryError, PyOSError, PyPermissionError, PyRuntimeError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use rlx::Error;

/// The exception classes of `rlx.errors` that Rust raises, each imported once.
#[derive(Clone, Copy)]
pub(crate) enum Class {
    ModelFormat,
    Unsupported,
    InvalidArgument,
    ContextOverflow,
    Tokenizer,
    Template,
    Closed,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::ModelFormat => "ModelFormatError",
            Class::Unsupported => "UnsupportedError",
            Class::InvalidArgument => "InvalidArgumentError",
            Class::ContextOverflow => "ContextOverflowError",
            Class::Tokenizer => "TokenizerError",
            Class::Template => "TemplateError",
            Class::Closed => "ClosedError",
        }
    }

    fn cell(self) -> &'static PyOnceLock<Py<PyType>> {
        // One slot per variant (the index is the discriminant).
        const COUNT: usize = Class::Closed as usize + 1;
        static CELLS: [PyOnceLock<Py<PyType>>; COUNT] = [const { PyOnceLock::new() }; COUNT];
        &CELLS[self as usize]
    }

    /// An exception of this class. If `rlx.errors` cannot be imported (a broken install), the
    /// import error is raised instead, never a panic.
    pub fn err(self, py: Python<'_>, message: impl Into<String>) -> PyErr {
        match self.cell().import(py, "rlx.errors", self.name()) {
            Ok(ty) => PyErr::from_type(ty.clone(), message.into()),
            Err(import_failed) => import_failed,
        }
    }
}

/// The one mapping from core errors to Python exceptions.
pub(crate) fn to_py_err(py: Python<'_>, e: Error) -> PyErr {
    let class = match &e {
        Error::Io { path, source } => {
            let path = path.display().to_string();
            let args = |errno: i32| (errno, source.to_string(), path.clone());
            return match source.kind() {
                std::io::ErrorKind::NotFound => {
                    PyFileNotFoundError::new_err(args(source.raw_os_error().unwrap_or(2)))
                }
                std::io::ErrorKind::PermissionDenied => {
                    PyPermissionError::new_err(args(source.raw_os_error().unwrap_or(13)))
                }
                _ => match source.raw_os_error() {
                    Some(errno) => PyOSError::new_err(args(errno)),
                    None => PyOSError::new_err(e.to_string()),
                },
            };
        }
        Error::Json { .. }
        | Error::Format { .. }
        | Error::Config(_)
        | Error::TensorMissing { .. }
        | Error::TensorShape { .. } => Class::ModelFormat,
        Error::Unsupported(_) | Error::TensorDtype { .. } | Error::Cuda(_) => Class::Unsupported,
        Error::Tokenizer(_) | Error::NoTokenizer => Class::Tokenizer,
        Error::Template(_) => Class::Template,
        Error::TokenOutOfRange { .. } | Error::InvalidArgument(_) => Class::InvalidArgument,
        Error::ContextOverflow { .. } => Class::ContextOverflow,
        Error::Collector(_) => return PyRuntimeError::new_err(e.to_string()),
        // Estimated before allocating: the interpreter's own out-of-memory exception.
        Error::OutOfMemory { .. } => return PyMemoryError::new_err(e.to_string()),
    };
    class.err(py, e.to_string())
}
