//! What `close()` needs: a value that can be taken away while other Python threads may hold the
//! object. Methods take a cheap clone of the model (its weights are shared, not copied) under a
//! short read lock, so a `close()` never waits for a long call to finish and never frees memory
//! such a call is using; the memory goes when the last user is done.

use std::sync::RwLock;

use pyo3::prelude::*;

use crate::errors::Class;

pub(crate) struct Closable<T: Clone>(RwLock<Option<T>>);

impl<T: Clone> Closable<T> {
    pub(crate) fn new(value: T) -> Self {
        Closable(RwLock::new(Some(value)))
    }

    /// The value, or `ClosedError` naming `what` once `close()` was called.
    pub(crate) fn get(&self, py: Python<'_>, what: &str) -> PyResult<T> {
        let guard = self
            .0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        guard
            .clone()
            .ok_or_else(|| Class::Closed.err(py, format!("this {what} was closed")))
    }

    pub(crate) fn close(&self) {
        let mut guard = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.take();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_none()
    }
}
