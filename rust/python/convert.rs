//! Numpy in and out: borrowing float32 arrays (copying only non-contiguous
//! ones), reading token ids of any integer dtype, shape checks that name the
//! argument, handing results back without a copy, and zero-copy views of the
//! flat buffers.

use crate::model::Layout;
use numpy::ndarray::{ArrayD, ArrayView, IxDyn};
use numpy::{
    IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub type Arr<'py> = Bound<'py, PyArrayDyn<f32>>;

/// A Rust error message as a Python ValueError.
pub fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!("array of dtype {} and shape {:?}", a.dtype(), a.shape()),
        Err(_) => obj.get_type().name().map(|n| n.to_string()).unwrap_or_default(),
    }
}

/// A float32 input: borrowed when C-contiguous, else a C-ordered copy.
pub struct F32In<'py> {
    array: PyReadonlyArrayDyn<'py, f32>,
    copy: Option<Vec<f32>>,
}

impl F32In<'_> {
    pub fn shape(&self) -> &[usize] {
        self.array.shape()
    }

    pub fn as_slice(&self) -> &[f32] {
        match &self.copy {
            Some(v) => v,
            None => self.array.as_slice().expect("checked C-contiguous"),
        }
    }
}

/// Read a float32 array of rank `ndim` (any rank if 0).
pub fn f32_in<'py>(obj: &Bound<'py, PyAny>, name: &str, ndim: usize) -> PyResult<F32In<'py>> {
    let arr = obj
        .cast::<PyArrayDyn<f32>>()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a float32 numpy array, got {}", describe(obj))))?;
    if ndim != 0 && arr.ndim() != ndim {
        return Err(value_error(format!("{name} must have {ndim} dimensions, got shape {:?}", arr.shape())));
    }
    let array = arr.try_readonly().map_err(|e| value_error(format!("{name}: {e}")))?;
    let copy = (!arr.is_c_contiguous()).then(|| array.as_array().iter().copied().collect());
    Ok(F32In { array, copy })
}

/// Mutably borrow a C-contiguous float32 array (for in-place updates, which
/// a copy could not deliver).
pub fn f32_inout<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    let arr = obj
        .cast::<PyArrayDyn<f32>>()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a float32 numpy array, got {}", describe(obj))))?;
    if !arr.is_c_contiguous() {
        return Err(value_error(format!(
            "{name} is updated in place, so it must be C-contiguous (use numpy.ascontiguousarray), got a strided view of shape {:?}",
            arr.shape()
        )));
    }
    arr.try_readwrite()
        .map_err(|e| value_error(format!("{name} cannot be written in place ({e}); pass a writeable array")))
}

/// Token ids of any integer dtype and layout, checked against `vocab` (when
/// given), as u32 in C order, with their shape.
pub fn ids_in(obj: &Bound<'_, PyAny>, name: &str, ndim: usize, vocab: Option<usize>) -> PyResult<(Vec<u32>, Vec<usize>)> {
    fn take<T: numpy::Element + Copy + TryInto<i64>>(obj: &Bound<'_, PyAny>) -> Option<(Vec<i64>, Vec<usize>)> {
        let arr = obj.cast::<PyArrayDyn<T>>().ok()?;
        let ro = arr.try_readonly().ok()?;
        let vals = ro.as_array().iter().map(|&x| x.try_into().unwrap_or(i64::MAX)).collect();
        Some((vals, arr.shape().to_vec()))
    }
    let got = take::<i64>(obj)
        .or_else(|| take::<i32>(obj))
        .or_else(|| take::<u32>(obj))
        .or_else(|| take::<u16>(obj))
        .or_else(|| take::<u8>(obj))
        .or_else(|| take::<u64>(obj))
        .or_else(|| take::<i16>(obj))
        .or_else(|| take::<i8>(obj));
    let Some((vals, shape)) = got else {
        return Err(PyTypeError::new_err(format!("{name} must be an integer numpy array of token ids, got {}", describe(obj))));
    };
    if shape.len() != ndim {
        return Err(value_error(format!("{name} must have {ndim} dimensions, got shape {shape:?}")));
    }
    let limit = vocab.map(|v| v as i64).unwrap_or(u32::MAX as i64);
    let mut out = Vec::with_capacity(vals.len());
    for (i, &x) in vals.iter().enumerate() {
        if x < 0 || x >= limit {
            let at: Vec<usize> = unravel(i, &shape);
            let range = vocab.map(|v| format!("vocab_size {v}")).unwrap_or("u32".into());
            return Err(value_error(format!("{name}{at:?} = {x} is out of range for {range}")));
        }
        out.push(x as u32);
    }
    Ok((out, shape))
}

fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut at = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        at[d] = i % shape[d].max(1);
        i /= shape[d].max(1);
    }
    at
}

pub fn expect_shape(name: &str, got: &[usize], want: &[usize]) -> PyResult<()> {
    if got != want {
        return Err(value_error(format!("{name} has shape {got:?}, expected {want:?}")));
    }
    Ok(())
}

/// Hand a result buffer to numpy without copying it.
pub fn out<'py>(py: Python<'py>, shape: &[usize], data: Vec<f32>) -> Arr<'py> {
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape matches length").into_pyarray(py)
}

/// name -> numpy view of each tensor of `buf`, kept alive by `owner`.
///
/// Safety: `buf` must belong to `owner` and never be reallocated.
pub unsafe fn tensor_views<'py>(owner: &Bound<'py, PyAny>, layout: &Layout, buf: &[f32]) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(owner.py());
    for i in 0..layout.names.len() {
        let slice = &buf[layout.offsets[i]..layout.offsets[i] + layout.len_of(i)];
        let view = ArrayView::from_shape(IxDyn(&layout.shapes[i]), slice).expect("layout shape");
        let arr = unsafe { PyArrayDyn::<f32>::borrow_from_array(&view, owner.clone()) };
        dict.set_item(&layout.names[i], arr)?;
    }
    Ok(dict)
}
