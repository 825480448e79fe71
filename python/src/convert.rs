//! Python inputs → owned Rust values, done before the GIL is released.
//!
//! Token ids may come as a list of ints or as a 1-D NumPy array of any integer dtype. Ids that
//! cannot be a `u32` (negative, huge) raise `InvalidArgumentError` like ids past the
//! vocabulary do; non-integers raise `TypeError`.

use numpy::{Element, PyReadonlyArray1, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOverflowError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use crate::errors::Class;

fn out_of_range(py: Python<'_>, id: impl std::fmt::Display, what: &str) -> PyErr {
    Class::InvalidArgument.err(
        py,
        format!("{what}: token id {id} is out of range (ids are 0 ≤ id < vocab_size)"),
    )
}

fn to_u32(py: Python<'_>, v: i128, what: &str) -> PyResult<u32> {
    u32::try_from(v).map_err(|_| out_of_range(py, v, what))
}

/// `Some(ids)` if `obj` is a 1-D array of dtype `T`.
fn typed_array<T>(obj: &Bound<'_, PyAny>, what: &str) -> Option<PyResult<Vec<u32>>>
where
    T: Element + Copy + Into<i128>,
{
    let arr = obj.extract::<PyReadonlyArray1<'_, T>>().ok()?;
    let py = obj.py();
    Some(
        arr.as_array()
            .iter()
            .map(|&v| to_u32(py, v.into(), what))
            .collect(),
    )
}

/// One sequence of token ids.
pub(crate) fn token_ids(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u32>> {
    let py = obj.py();
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        if arr.ndim() != 1 {
            return Err(PyTypeError::new_err(format!(
                "{what}: expected a 1-D array of token ids, got {} dimensions",
                arr.ndim()
            )));
        }
        return typed_array::<i64>(obj, what)
            .or_else(|| typed_array::<i32>(obj, what))
            .or_else(|| typed_array::<u32>(obj, what))
            .or_else(|| typed_array::<u64>(obj, what))
            .or_else(|| typed_array::<i16>(obj, what))
            .or_else(|| typed_array::<u16>(obj, what))
            .or_else(|| typed_array::<i8>(obj, what))
            .or_else(|| typed_array::<u8>(obj, what))
            .unwrap_or_else(|| {
                Err(PyTypeError::new_err(format!(
                    "{what}: token ids must be integers, got an array of dtype {}",
                    arr.dtype()
                )))
            });
    }
    // Strings and bytes are iterable but are not token ids.
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(PyTypeError::new_err(format!(
            "{what}: expected a list of token ids, got {}",
            obj.get_type().name()?
        )));
    }
    let mut ids = Vec::with_capacity(obj.len().unwrap_or(0));
    for item in obj.try_iter()? {
        let item = item?;
        match item.extract::<i64>() {
            Ok(v) => ids.push(to_u32(py, v.into(), what)?),
            Err(e) if e.is_instance_of::<PyOverflowError>(py) => {
                return Err(out_of_range(py, item, what))
            }
            Err(_) => {
                return Err(PyTypeError::new_err(format!(
                    "{what}: token ids must be integers, got {}",
                    item.get_type().name()?
                )))
            }
        }
    }
    Ok(ids)
}

/// A sequence of sequences of token ids (a list of lists, a list of arrays, a 2-D array).
pub(crate) fn token_id_lists(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<Vec<u32>>> {
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(PyTypeError::new_err(format!(
            "{what}: expected a list of token-id lists, got {}",
            obj.get_type().name()?
        )));
    }
    obj.try_iter()?
        .enumerate()
        .map(|(i, seq)| token_ids(&seq?, &format!("{what}[{i}]")))
        .collect()
}

/// A count argument (`max_new_tokens`, `top_k`, `threads`): negative is an argument error,
/// not an OverflowError.
pub(crate) fn count(py: Python<'_>, v: i64, name: &str) -> PyResult<usize> {
    usize::try_from(v)
        .map_err(|_| Class::InvalidArgument.err(py, format!("{name} must be ≥ 0, got {v}")))
}
