//! The thin PyO3 layer that makes `crystalline._core`.
//!
//! It checks every argument (dtype, rank, shape, contiguity, token range) and
//! turns a mistake into a Python `TypeError`/`ValueError` naming the argument,
//! borrows numpy inputs without copying, hands outputs over without copying,
//! and releases the GIL around the numeric work.

use crate::kernels::{adamw, attention, crossentropy, encoder, gelu, layernorm, matmul, residual};
use crate::kernels::adamw::AdamW;
use crate::generate::{decode_step, sample, KvCache, Sampling};
use crate::model::{Activations, Config, Gpt2, Layout};
use crate::train::{Hyper, StepError, Trainer};
use numpy::ndarray::{ArrayD, ArrayView, IxDyn};
use numpy::{
    IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyFloatingPointError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

type Arr<'py> = Bound<'py, PyArrayDyn<f32>>;

fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!("array of dtype {} and shape {:?}", a.dtype(), a.shape()),
        Err(_) => format!("{}", obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()),
    }
}

/// Borrow a C-contiguous float32 array of rank `ndim` (any rank if 0).
fn f32_in<'py>(obj: &Bound<'py, PyAny>, name: &str, ndim: usize) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    let arr = obj
        .cast::<PyArrayDyn<f32>>()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a float32 numpy array, got {}", describe(obj))))?;
    if ndim != 0 && arr.ndim() != ndim {
        return Err(PyValueError::new_err(format!("{name} must have {ndim} dimensions, got shape {:?}", arr.shape())));
    }
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name} must be C-contiguous (use numpy.ascontiguousarray), got a strided view of shape {:?}",
            arr.shape()
        )));
    }
    arr.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

/// Mutably borrow a C-contiguous float32 array (for in-place updates).
fn f32_inout<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    f32_in(obj, name, 0)?;
    let arr = obj.cast::<PyArrayDyn<f32>>()?;
    arr.try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("{name} cannot be written in place ({e}); pass a writeable array")))
}

/// Token ids of any integer dtype, checked against `vocab` (when given), as u32.
fn ids_in(obj: &Bound<'_, PyAny>, name: &str, ndim: usize, vocab: Option<usize>) -> PyResult<(Vec<u32>, Vec<usize>)> {
    fn take<T: numpy::Element + Copy + TryInto<i64>>(obj: &Bound<'_, PyAny>) -> Option<(Vec<i64>, Vec<usize>, bool)> {
        let arr = obj.cast::<PyArrayDyn<T>>().ok()?;
        let ro = arr.readonly();
        let view = ro.as_array();
        let vals = view.iter().map(|&x| x.try_into().unwrap_or(i64::MAX)).collect();
        Some((vals, arr.shape().to_vec(), arr.is_c_contiguous()))
    }
    let got = take::<i64>(obj)
        .or_else(|| take::<i32>(obj))
        .or_else(|| take::<u32>(obj))
        .or_else(|| take::<u16>(obj))
        .or_else(|| take::<u8>(obj))
        .or_else(|| take::<u64>(obj))
        .or_else(|| take::<i16>(obj));
    let Some((vals, shape, contiguous)) = got else {
        return Err(PyTypeError::new_err(format!("{name} must be an integer numpy array of token ids, got {}", describe(obj))));
    };
    if shape.len() != ndim {
        return Err(PyValueError::new_err(format!("{name} must have {ndim} dimensions, got shape {shape:?}")));
    }
    if !contiguous {
        return Err(PyValueError::new_err(format!("{name} must be C-contiguous, got a strided view of shape {shape:?}")));
    }
    let limit = vocab.map(|v| v as i64).unwrap_or(u32::MAX as i64);
    let mut out = Vec::with_capacity(vals.len());
    for (i, &x) in vals.iter().enumerate() {
        if x < 0 || x >= limit {
            let at: Vec<usize> = unravel(i, &shape);
            let range = vocab.map(|v| format!("vocab_size {v}")).unwrap_or("u32".into());
            return Err(PyValueError::new_err(format!("{name}{at:?} = {x} is out of range for {range}")));
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

fn expect_shape(name: &str, got: &[usize], want: &[usize]) -> PyResult<()> {
    if got != want {
        return Err(PyValueError::new_err(format!("{name} has shape {got:?}, expected {want:?}")));
    }
    Ok(())
}

fn out<'py>(py: Python<'py>, shape: &[usize], data: Vec<f32>) -> Arr<'py> {
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape matches length").into_pyarray(py)
}

/// name -> numpy view of each tensor of `buf`, kept alive by `owner`.
///
/// Safety: `buf` must belong to `owner` and never be reallocated.
unsafe fn tensor_views<'py>(owner: &Bound<'py, PyAny>, layout: &Layout, buf: &[f32]) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(owner.py());
    for i in 0..layout.names.len() {
        let slice = &buf[layout.offsets[i]..layout.offsets[i] + layout.len_of(i)];
        let view = ArrayView::from_shape(IxDyn(&layout.shapes[i]), slice).expect("layout shape");
        let arr = unsafe { PyArrayDyn::<f32>::borrow_from_array(&view, owner.clone()) };
        dict.set_item(&layout.names[i], arr)?;
    }
    Ok(dict)
}

fn threads() -> usize {
    rayon::current_num_threads()
}

/// Run `f(threads)` on `pool` when given, else on rayon's global pool.
fn in_pool<R: Send>(pool: &Option<rayon::ThreadPool>, f: impl FnOnce(usize) -> R + Send) -> R {
    match pool {
        Some(pool) => pool.install(|| f(pool.current_num_threads())),
        None => f(threads()),
    }
}

/// out = inp @ weight + bias. inp [N, C], weight [C, OC], bias [OC] or None -> out [N, OC]
#[pyfunction]
#[pyo3(signature = (inp, weight, bias=None))]
fn matmul_forward<'py>(
    py: Python<'py>,
    inp: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
) -> PyResult<Arr<'py>> {
    let (inp, weight) = (f32_in(inp, "inp", 2)?, f32_in(weight, "weight", 2)?);
    let (n, c) = (inp.shape()[0], inp.shape()[1]);
    let oc = weight.shape()[1];
    expect_shape("weight", weight.shape(), &[c, oc])?;
    let bias = bias.map(|b| f32_in(b, "bias", 1)).transpose()?;
    if let Some(b) = &bias {
        expect_shape("bias", b.shape(), &[oc])?;
    }
    let (x, w, b) = (inp.as_slice()?, weight.as_slice()?, bias.as_ref().map(|b| b.as_slice()).transpose()?);
    let data = py.detach(|| {
        let mut o = vec![0.0; n * oc];
        matmul::matmul_forward(&mut o, x, w, b, n, c, oc, threads());
        o
    });
    Ok(out(py, &[n, oc], data))
}

/// Gradients of matmul_forward: dout [N, OC], inp [N, C], weight [C, OC] -> (dinp, dweight, dbias)
#[pyfunction]
fn matmul_backward<'py>(
    py: Python<'py>,
    dout: &Bound<'py, PyAny>,
    inp: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
) -> PyResult<(Arr<'py>, Arr<'py>, Arr<'py>)> {
    let (dout, inp, weight) = (f32_in(dout, "dout", 2)?, f32_in(inp, "inp", 2)?, f32_in(weight, "weight", 2)?);
    let (n, c) = (inp.shape()[0], inp.shape()[1]);
    let oc = weight.shape()[1];
    expect_shape("weight", weight.shape(), &[c, oc])?;
    expect_shape("dout", dout.shape(), &[n, oc])?;
    let (d, x, w) = (dout.as_slice()?, inp.as_slice()?, weight.as_slice()?);
    let (di, dw, db) = py.detach(|| {
        let (mut di, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c * oc], vec![0.0; oc]);
        matmul::matmul_backward(&mut di, &mut dw, Some(&mut db), d, x, w, n, c, oc, threads());
        (di, dw, db)
    });
    Ok((out(py, &[n, c], di), out(py, &[c, oc], dw), out(py, &[oc], db)))
}

/// inp [N, C], weight [C], bias [C] -> (out [N, C], mean [N], rstd [N])
#[pyfunction]
fn layernorm_forward<'py>(
    py: Python<'py>,
    inp: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    bias: &Bound<'py, PyAny>,
) -> PyResult<(Arr<'py>, Arr<'py>, Arr<'py>)> {
    let (inp, weight, bias) = (f32_in(inp, "inp", 2)?, f32_in(weight, "weight", 1)?, f32_in(bias, "bias", 1)?);
    let (n, c) = (inp.shape()[0], inp.shape()[1]);
    expect_shape("weight", weight.shape(), &[c])?;
    expect_shape("bias", bias.shape(), &[c])?;
    let (x, w, b) = (inp.as_slice()?, weight.as_slice()?, bias.as_slice()?);
    let (o, m, r) = py.detach(|| {
        let (mut o, mut m, mut r) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm::layernorm_forward(&mut o, &mut m, &mut r, x, w, b, n, c);
        (o, m, r)
    });
    Ok((out(py, &[n, c], o), out(py, &[n], m), out(py, &[n], r)))
}

/// dout [N, C], inp [N, C], weight [C], mean [N], rstd [N] -> (dinp, dweight, dbias)
#[pyfunction]
fn layernorm_backward<'py>(
    py: Python<'py>,
    dout: &Bound<'py, PyAny>,
    inp: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    mean: &Bound<'py, PyAny>,
    rstd: &Bound<'py, PyAny>,
) -> PyResult<(Arr<'py>, Arr<'py>, Arr<'py>)> {
    let (dout, inp, weight) = (f32_in(dout, "dout", 2)?, f32_in(inp, "inp", 2)?, f32_in(weight, "weight", 1)?);
    let (mean, rstd) = (f32_in(mean, "mean", 1)?, f32_in(rstd, "rstd", 1)?);
    let (n, c) = (inp.shape()[0], inp.shape()[1]);
    expect_shape("dout", dout.shape(), &[n, c])?;
    expect_shape("weight", weight.shape(), &[c])?;
    expect_shape("mean", mean.shape(), &[n])?;
    expect_shape("rstd", rstd.shape(), &[n])?;
    let (d, x, w, m, r) = (dout.as_slice()?, inp.as_slice()?, weight.as_slice()?, mean.as_slice()?, rstd.as_slice()?);
    let (di, dw, db) = py.detach(|| {
        let (mut di, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        layernorm::layernorm_backward(&mut di, &mut dw, &mut db, d, x, w, m, r, n, c);
        (di, dw, db)
    });
    Ok((out(py, &[n, c], di), out(py, &[c], dw), out(py, &[c], db)))
}

/// Tanh-approximate GELU, elementwise on an array of any shape.
#[pyfunction]
fn gelu_forward<'py>(py: Python<'py>, inp: &Bound<'py, PyAny>) -> PyResult<Arr<'py>> {
    let inp = f32_in(inp, "inp", 0)?;
    let shape = inp.shape().to_vec();
    let x = inp.as_slice()?;
    let o = py.detach(|| {
        let mut o = vec![0.0; x.len()];
        gelu::gelu_forward(&mut o, x);
        o
    });
    Ok(out(py, &shape, o))
}

/// Run an elementwise kernel `f(out, a, b)` over two same-shape arrays.
fn elementwise2<'py>(
    py: Python<'py>,
    (a, a_name): (&Bound<'py, PyAny>, &str),
    (b, b_name): (&Bound<'py, PyAny>, &str),
    f: fn(&mut [f32], &[f32], &[f32]),
) -> PyResult<Arr<'py>> {
    let (a, b) = (f32_in(a, a_name, 0)?, f32_in(b, b_name, 0)?);
    expect_shape(b_name, b.shape(), a.shape())?;
    let shape = a.shape().to_vec();
    let (x, y) = (a.as_slice()?, b.as_slice()?);
    let o = py.detach(|| {
        let mut o = vec![0.0; x.len()];
        f(&mut o, x, y);
        o
    });
    Ok(out(py, &shape, o))
}

/// dout, inp (same shape) -> dinp
#[pyfunction]
fn gelu_backward<'py>(py: Python<'py>, dout: &Bound<'py, PyAny>, inp: &Bound<'py, PyAny>) -> PyResult<Arr<'py>> {
    elementwise2(py, (inp, "inp"), (dout, "dout"), gelu::gelu_backward)
}

/// a + b (same shape)
#[pyfunction]
fn residual_forward<'py>(py: Python<'py>, a: &Bound<'py, PyAny>, b: &Bound<'py, PyAny>) -> PyResult<Arr<'py>> {
    elementwise2(py, (a, "a"), (b, "b"), residual::residual_forward)
}

/// dout -> (da, db)
#[pyfunction]
fn residual_backward<'py>(py: Python<'py>, dout: &Bound<'py, PyAny>) -> PyResult<(Arr<'py>, Arr<'py>)> {
    let dout = f32_in(dout, "dout", 0)?;
    let shape = dout.shape().to_vec();
    let d = dout.as_slice()?;
    let (da, db) = py.detach(|| {
        let (mut da, mut db) = (vec![0.0; d.len()], vec![0.0; d.len()]);
        residual::residual_backward(&mut da, &mut db, d);
        (da, db)
    });
    Ok((out(py, &shape, da), out(py, &shape, db)))
}

/// tokens [B, T], wte [V, C], wpe [T_max, C] -> out [B, T, C]
#[pyfunction]
fn encoder_forward<'py>(
    py: Python<'py>,
    tokens: &Bound<'py, PyAny>,
    wte: &Bound<'py, PyAny>,
    wpe: &Bound<'py, PyAny>,
) -> PyResult<Arr<'py>> {
    let (wte, wpe) = (f32_in(wte, "wte", 2)?, f32_in(wpe, "wpe", 2)?);
    let (v, c) = (wte.shape()[0], wte.shape()[1]);
    let (ids, shape) = ids_in(tokens, "tokens", 2, Some(v))?;
    let (b, t) = (shape[0], shape[1]);
    if wpe.shape()[1] != c || wpe.shape()[0] < t {
        return Err(PyValueError::new_err(format!(
            "wpe has shape {:?}, expected [T_max >= {t}, {c}] for tokens of shape {shape:?}",
            wpe.shape()
        )));
    }
    let (e, p) = (wte.as_slice()?, wpe.as_slice()?);
    let o = py.detach(|| {
        let mut o = vec![0.0; b * t * c];
        encoder::encoder_forward(&mut o, &ids, e, p, b, t, c);
        o
    });
    Ok(out(py, &[b, t, c], o))
}

/// dout [B, T, C], tokens [B, T] -> (dwte [V, C], dwpe [block_size, C])
#[pyfunction]
fn encoder_backward<'py>(
    py: Python<'py>,
    dout: &Bound<'py, PyAny>,
    tokens: &Bound<'py, PyAny>,
    vocab_size: usize,
    block_size: usize,
) -> PyResult<(Arr<'py>, Arr<'py>)> {
    let dout = f32_in(dout, "dout", 3)?;
    let (ids, shape) = ids_in(tokens, "tokens", 2, Some(vocab_size))?;
    let (b, t, c) = (dout.shape()[0], dout.shape()[1], dout.shape()[2]);
    expect_shape("tokens", &shape, &[b, t])?;
    if t > block_size {
        return Err(PyValueError::new_err(format!("T={t} exceeds block_size {block_size}")));
    }
    let d = dout.as_slice()?;
    let (dwte, dwpe) = py.detach(|| {
        let (mut dwte, mut dwpe) = (vec![0.0; vocab_size * c], vec![0.0; block_size * c]);
        encoder::encoder_backward(&mut dwte, &mut dwpe, d, &ids, b, t, c);
        (dwte, dwpe)
    });
    Ok((out(py, &[vocab_size, c], dwte), out(py, &[block_size, c], dwpe)))
}

fn head_dims(qkv_shape: &[usize], n_head: usize) -> PyResult<(usize, usize, usize)> {
    let (b, t, c3) = (qkv_shape[0], qkv_shape[1], qkv_shape[2]);
    if c3 % 3 != 0 || n_head == 0 || (c3 / 3) % n_head != 0 {
        return Err(PyValueError::new_err(format!(
            "qkv has shape {qkv_shape:?}: its last axis must be 3*C with C divisible by n_head={n_head}"
        )));
    }
    Ok((b, t, c3 / 3))
}

/// qkv [B, T, 3C] -> (out [B, T, C], att [B, NH, T, T])
#[pyfunction]
fn attention_forward<'py>(py: Python<'py>, qkv: &Bound<'py, PyAny>, n_head: usize) -> PyResult<(Arr<'py>, Arr<'py>)> {
    let qkv = f32_in(qkv, "qkv", 3)?;
    let (b, t, c) = head_dims(qkv.shape(), n_head)?;
    let q = qkv.as_slice()?;
    let (o, a) = py.detach(|| {
        let (mut o, mut a) = (vec![0.0; b * t * c], vec![0.0; b * n_head * t * t]);
        attention::attention_forward(&mut o, &mut a, q, b, t, c, n_head, threads());
        (o, a)
    });
    Ok((out(py, &[b, t, c], o), out(py, &[b, n_head, t, t], a)))
}

/// dout [B, T, C], qkv [B, T, 3C], att [B, NH, T, T] -> dqkv [B, T, 3C]
#[pyfunction]
fn attention_backward<'py>(
    py: Python<'py>,
    dout: &Bound<'py, PyAny>,
    qkv: &Bound<'py, PyAny>,
    att: &Bound<'py, PyAny>,
    n_head: usize,
) -> PyResult<Arr<'py>> {
    let (dout, qkv, att) = (f32_in(dout, "dout", 3)?, f32_in(qkv, "qkv", 3)?, f32_in(att, "att", 4)?);
    let (b, t, c) = head_dims(qkv.shape(), n_head)?;
    expect_shape("dout", dout.shape(), &[b, t, c])?;
    expect_shape("att", att.shape(), &[b, n_head, t, t])?;
    let (d, q, a) = (dout.as_slice()?, qkv.as_slice()?, att.as_slice()?);
    let dq = py.detach(|| {
        let mut dq = vec![0.0; b * t * 3 * c];
        attention::attention_backward(&mut dq, d, q, a, b, t, c, n_head, threads());
        dq
    });
    Ok(out(py, &[b, t, 3 * c], dq))
}

fn logits_and_targets(
    logits: &Bound<'_, PyAny>,
    targets: &Bound<'_, PyAny>,
) -> PyResult<(usize, usize, Vec<u32>)> {
    let l = f32_in(logits, "logits", 2)?;
    let (n, v) = (l.shape()[0], l.shape()[1]);
    let (ids, shape) = ids_in(targets, "targets", 1, Some(v))?;
    expect_shape("targets", &shape, &[n])?;
    Ok((n, v, ids))
}

/// logits [N, V], targets [N] -> per-row losses [N]
#[pyfunction]
fn crossentropy_forward<'py>(py: Python<'py>, logits: &Bound<'py, PyAny>, targets: &Bound<'py, PyAny>) -> PyResult<Arr<'py>> {
    let (n, v, ids) = logits_and_targets(logits, targets)?;
    let l = f32_in(logits, "logits", 2)?;
    let x = l.as_slice()?;
    let losses = py.detach(|| {
        let mut losses = vec![0.0; n];
        crossentropy::crossentropy_forward(&mut losses, x, &ids, n, v);
        losses
    });
    Ok(out(py, &[n], losses))
}

/// logits [N, V], targets [N], dlosses [N] -> dlogits [N, V]
#[pyfunction]
fn crossentropy_backward<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    targets: &Bound<'py, PyAny>,
    dlosses: &Bound<'py, PyAny>,
) -> PyResult<Arr<'py>> {
    let (n, v, ids) = logits_and_targets(logits, targets)?;
    let (l, dl) = (f32_in(logits, "logits", 2)?, f32_in(dlosses, "dlosses", 1)?);
    expect_shape("dlosses", dl.shape(), &[n])?;
    let (x, d) = (l.as_slice()?, dl.as_slice()?);
    let g = py.detach(|| {
        let mut g = vec![0.0; n * v];
        crossentropy::crossentropy_backward(&mut g, x, &ids, d, n, v);
        g
    });
    Ok(out(py, &[n, v], g))
}

/// Fused: logits [N, V], targets [N] -> (mean loss, dlogits [N, V] of the mean loss)
#[pyfunction]
fn softmax_crossentropy<'py>(py: Python<'py>, logits: &Bound<'py, PyAny>, targets: &Bound<'py, PyAny>) -> PyResult<(f64, Arr<'py>)> {
    let (n, v, ids) = logits_and_targets(logits, targets)?;
    let l = f32_in(logits, "logits", 2)?;
    let x = l.as_slice()?;
    let (loss, g) = py.detach(|| {
        let mut g = x.to_vec();
        let loss = crossentropy::crossentropy_fused(&mut g, &ids, 1.0 / n.max(1) as f32, n, v);
        (loss / n.max(1) as f64, g)
    });
    Ok((loss, out(py, &[n, v], g)))
}

/// One AdamW step, in place on params, m and v (all float32, same shape as grads).
#[pyfunction]
#[pyo3(signature = (params, grads, m, v, step, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0))]
#[allow(clippy::too_many_arguments)]
fn adamw_update(
    py: Python<'_>,
    params: &Bound<'_, PyAny>,
    grads: &Bound<'_, PyAny>,
    m: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    step: u64,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
) -> PyResult<()> {
    if step == 0 {
        return Err(PyValueError::new_err("step counts from 1, got 0"));
    }
    if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
        return Err(PyValueError::new_err(format!("beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")));
    }
    let g = f32_in(grads, "grads", 0)?;
    let shape = g.shape().to_vec();
    for (name, arr) in [("params", params), ("m", m), ("v", v)] {
        expect_shape(name, f32_in(arr, name, 0)?.shape(), &shape)?;
    }
    if params.is(m) || params.is(v) || m.is(v) || params.is(grads) {
        return Err(PyValueError::new_err("params, grads, m and v must be four distinct arrays"));
    }
    let (mut p, mut mm, mut vv) = (f32_inout(params, "params")?, f32_inout(m, "m")?, f32_inout(v, "v")?);
    let hp = adamw::AdamW { lr, beta1, beta2, eps, weight_decay };
    let (ps, gs, ms, vs) = (p.as_slice_mut()?, g.as_slice()?, mm.as_slice_mut()?, vv.as_slice_mut()?);
    py.detach(|| adamw::adamw_update(ps, gs, ms, vs, &hp, weight_decay, step));
    Ok(())
}

/// (name, shape) of every parameter tensor of a GPT-2 config, in buffer order.
#[pyfunction]
fn parameter_shapes(
    vocab_size: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    block_size: usize,
) -> PyResult<Vec<(String, Vec<usize>)>> {
    let cfg = Config { vocab_size, n_embd, n_layer, n_head, block_size };
    cfg.validate().map_err(PyValueError::new_err)?;
    Ok(cfg.parameter_shapes())
}

/// A GPT-2 model whose parameters live in one flat float32 buffer in Rust.
#[pyclass(name = "Model", module = "crystalline._core")]
struct PyModel {
    model: Gpt2,
    grads: Vec<f32>,
    acts: Option<Activations>,
    cache: Option<KvCache>,
    rng: ChaCha8Rng,
    pool: Option<rayon::ThreadPool>,
}

impl PyModel {
    fn cache_ref(&self) -> PyResult<&KvCache> {
        self.cache.as_ref().ok_or_else(|| PyValueError::new_err("call reset_cache(batch_size) before decoding"))
    }

    fn cache_mut(&mut self) -> PyResult<&mut KvCache> {
        self.cache.as_mut().ok_or_else(|| PyValueError::new_err("call reset_cache(batch_size) before decoding"))
    }

    fn acts_for(&mut self, b: usize, t: usize) -> &mut Activations {
        if !matches!(&self.acts, Some(a) if a.b == b && a.t == t) {
            self.acts = Some(Activations::new(&self.model.config, b, t));
        }
        self.acts.as_mut().expect("just set")
    }

    fn batch(&self, tokens: &Bound<'_, PyAny>, targets: Option<&Bound<'_, PyAny>>) -> PyResult<(Vec<u32>, Option<Vec<u32>>, usize, usize)> {
        let v = self.model.config.vocab_size;
        let (ids, shape) = ids_in(tokens, "tokens", 2, Some(v))?;
        let (b, t) = (shape[0], shape[1]);
        let tg = match targets {
            Some(tg) => {
                let (tg, tshape) = ids_in(tg, "targets", 2, Some(v))?;
                expect_shape("targets", &tshape, &shape)?;
                Some(tg)
            }
            None => None,
        };
        self.model.check_batch(&ids, tg.as_deref(), b, t).map_err(PyValueError::new_err)?;
        Ok((ids, tg, b, t))
    }

}

#[pymethods]
impl PyModel {
    #[new]
    #[pyo3(signature = (vocab_size, n_embd, n_layer, n_head, block_size, seed=0))]
    fn new(vocab_size: usize, n_embd: usize, n_layer: usize, n_head: usize, block_size: usize, seed: u64) -> PyResult<Self> {
        let cfg = Config { vocab_size, n_embd, n_layer, n_head, block_size };
        let model = Gpt2::new(cfg, seed).map_err(PyValueError::new_err)?;
        let grads = vec![0.0; model.layout.total];
        Ok(PyModel { model, grads, acts: None, cache: None, rng: ChaCha8Rng::seed_from_u64(seed), pool: None })
    }

    /// The configuration as a dict (vocab_size, n_embd, n_layer, n_head, block_size).
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.model.config;
        let d = PyDict::new(py);
        d.set_item("vocab_size", c.vocab_size)?;
        d.set_item("n_embd", c.n_embd)?;
        d.set_item("n_layer", c.n_layer)?;
        d.set_item("n_head", c.n_head)?;
        d.set_item("block_size", c.block_size)?;
        Ok(d)
    }

    /// name -> writeable numpy view of each parameter tensor (no copy).
    fn parameters<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyDict>> {
        let this = slf.borrow();
        // SAFETY: the parameter buffer is allocated once and never resized.
        unsafe { tensor_views(slf.as_any(), &this.model.layout, &this.model.params) }
    }

    fn num_parameters(&self) -> usize {
        self.model.layout.total
    }

    /// tokens [B, T] -> logits [B, T, V]
    fn forward<'py>(&mut self, py: Python<'py>, tokens: &Bound<'py, PyAny>) -> PyResult<Arr<'py>> {
        let (ids, _, b, t) = self.batch(tokens, None)?;
        let v = self.model.config.vocab_size;
        self.acts_for(b, t);
        let PyModel { model, acts, pool, .. } = self;
        let acts = acts.as_mut().expect("allocated");
        let logits = py.detach(|| in_pool(pool, |th| model.forward_logits(acts, &ids, th)));
        Ok(out(py, &[b, t, v], logits))
    }

    /// Mean cross-entropy of the model's logits for tokens [B, T] against targets [B, T].
    fn loss(&mut self, py: Python<'_>, tokens: &Bound<'_, PyAny>, targets: &Bound<'_, PyAny>) -> PyResult<f64> {
        let (ids, tg, b, t) = self.batch(tokens, Some(targets))?;
        let tg = tg.expect("targets given");
        self.acts_for(b, t);
        let PyModel { model, acts, pool, .. } = self;
        let acts = acts.as_mut().expect("allocated");
        Ok(py.detach(|| in_pool(pool, |th| model.loss_sum(acts, &ids, &tg, None, 0.0, th)) / (b * t) as f64))
    }

    /// Run this model's work on a private pool of `threads` threads (the
    /// default is rayon's global pool, one thread per core).
    fn set_threads(&mut self, threads: usize) -> PyResult<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| PyValueError::new_err(format!("cannot start {threads} threads: {e}")))?;
        self.pool = Some(pool);
        Ok(())
    }

    /// Start incremental decoding of `batch_size` sequences (an empty key/value
    /// cache for each) and seed the sampler.
    #[pyo3(signature = (batch_size, seed=0))]
    fn reset_cache(&mut self, batch_size: usize, seed: u64) -> PyResult<()> {
        if batch_size == 0 {
            return Err(PyValueError::new_err("batch_size must be at least 1"));
        }
        self.cache = Some(KvCache::new(&self.model, batch_size));
        self.rng = ChaCha8Rng::seed_from_u64(seed);
        Ok(())
    }

    /// Positions held in the cache for each sequence.
    fn cache_lengths(&self) -> PyResult<Vec<usize>> {
        Ok(self.cache_ref()?.lens.clone())
    }

    /// Empty sequence `seq`'s cache (to refill it with a slid window).
    fn clear_sequence(&mut self, seq: usize) -> PyResult<()> {
        let cache = self.cache_mut()?;
        if seq >= cache.b {
            return Err(PyValueError::new_err(format!("seq {seq} is outside the cache of {} sequences", cache.b)));
        }
        cache.clear(seq);
        Ok(())
    }

    /// Feed tokens[i] to sequence seqs[i] (a sequence listed k times takes k
    /// consecutive positions) and return each row's next-token logits
    /// [M, V], or None when `want_logits` is false.
    #[pyo3(signature = (seqs, tokens, want_logits=true))]
    fn decode<'py>(
        &mut self,
        py: Python<'py>,
        seqs: Vec<usize>,
        tokens: &Bound<'py, PyAny>,
        want_logits: bool,
    ) -> PyResult<Option<Arr<'py>>> {
        let v = self.model.config.vocab_size;
        let (ids, _) = ids_in(tokens, "tokens", 1, Some(v))?;
        self.cache_ref()?;
        let m = seqs.len();
        let PyModel { model, cache, pool, .. } = self;
        let cache = cache.as_mut().expect("checked");
        let logits = py
            .detach(|| in_pool(pool, |th| decode_step(model, cache, &seqs, &ids, want_logits, th)))
            .map_err(PyValueError::new_err)?;
        Ok(want_logits.then(|| out(py, &[m, v], logits)))
    }

    /// Draw one token per row of logits [M, V] with the model's seeded sampler.
    #[pyo3(signature = (logits, temperature=1.0, top_k=0, top_p=1.0))]
    fn sample(&mut self, logits: &Bound<'_, PyAny>, temperature: f32, top_k: usize, top_p: f32) -> PyResult<Vec<u32>> {
        let sampling = Sampling { temperature, top_k, top_p };
        sampling.validate().map_err(PyValueError::new_err)?;
        let l = f32_in(logits, "logits", 2)?;
        let v = l.shape()[1];
        if v == 0 {
            return Err(PyValueError::new_err("logits has no columns"));
        }
        let x = l.as_slice()?;
        Ok(x.chunks(v).map(|row| sample(row, &sampling, &mut self.rng)).collect())
    }

    /// (mean loss, name -> gradient view). The gradient views alias one
    /// buffer that the next call overwrites; copy them to keep them.
    fn loss_and_grad<'py>(
        slf: &Bound<'py, Self>,
        tokens: &Bound<'py, PyAny>,
        targets: &Bound<'py, PyAny>,
    ) -> PyResult<(f64, Bound<'py, PyDict>)> {
        let py = slf.py();
        let loss = {
            let mut this = slf.borrow_mut();
            let (ids, tg, b, t) = this.batch(tokens, Some(targets))?;
            let tg = tg.expect("targets given");
            let this = &mut *this;
            this.acts_for(b, t);
            let PyModel { model, grads, acts, pool, .. } = this;
            let acts = acts.as_mut().expect("allocated");
            py.detach(|| {
                grads.fill(0.0);
                let sum = in_pool(pool, |th| model.loss_sum(acts, &ids, &tg, Some(grads), 1.0 / (b * t) as f32, th));
                sum / (b * t) as f64
            })
        };
        let this = slf.borrow();
        // SAFETY: the gradient buffer is allocated once and never resized.
        Ok((loss, unsafe { tensor_views(slf.as_any(), &this.model.layout, &this.grads) }?))
    }
}

/// The kissing-sphere trainer: a model, its AdamW state and a pool of
/// `threads` threads (Node Zero plus worker spheres).
#[pyclass(name = "Trainer", module = "crystalline._core")]
struct PyTrainer {
    inner: Trainer,
}

#[pymethods]
impl PyTrainer {
    #[new]
    #[pyo3(signature = (vocab_size, n_embd, n_layer, n_head, block_size, *, threads=12, seed=0,
                        beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        vocab_size: usize,
        n_embd: usize,
        n_layer: usize,
        n_head: usize,
        block_size: usize,
        threads: usize,
        seed: u64,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        grad_clip: f32,
    ) -> PyResult<Self> {
        if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
            return Err(PyValueError::new_err(format!("beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")));
        }
        if !(weight_decay >= 0.0) || !(grad_clip >= 0.0) || !(eps > 0.0) {
            return Err(PyValueError::new_err("weight_decay and grad_clip must be >= 0 and eps > 0"));
        }
        let cfg = Config { vocab_size, n_embd, n_layer, n_head, block_size };
        let model = Gpt2::new(cfg, seed).map_err(PyValueError::new_err)?;
        let hyper = Hyper { adamw: AdamW { lr: 0.0, beta1, beta2, eps, weight_decay }, grad_clip };
        Ok(PyTrainer { inner: Trainer::new(model, hyper, threads).map_err(PyValueError::new_err)? })
    }

    #[getter]
    fn threads(&self) -> usize {
        self.inner.threads()
    }

    /// Optimizer steps taken (AdamW's t).
    #[getter]
    fn step_count(&self) -> u64 {
        self.inner.opt.step
    }

    #[setter]
    fn set_step_count(&mut self, value: u64) {
        self.inner.opt.step = value;
    }

    /// Sequences dealt to symmetry groups so far this epoch.
    #[getter]
    fn dealt(&self) -> u64 {
        self.inner.dealt
    }

    #[setter]
    fn set_dealt(&mut self, value: u64) {
        self.inner.dealt = value;
    }

    fn num_parameters(&self) -> usize {
        self.inner.model.layout.total
    }

    /// name -> writeable zero-copy view of each parameter tensor.
    fn parameters<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyDict>> {
        let this = slf.borrow();
        // SAFETY: the parameter buffer is allocated once and never resized.
        unsafe { tensor_views(slf.as_any(), &this.inner.model.layout, &this.inner.model.params) }
    }

    /// (m, v): name -> writeable zero-copy view of AdamW's moments.
    fn optimizer_state<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyDict>)> {
        let this = slf.borrow();
        let layout = &this.inner.model.layout;
        // SAFETY: the moment buffers are allocated once and never resized.
        unsafe { Ok((tensor_views(slf.as_any(), layout, &this.inner.opt.m)?, tensor_views(slf.as_any(), layout, &this.inner.opt.v)?)) }
    }

    /// One optimizer step on batch [B, T+1] (inputs: first T ids of each
    /// row, targets: last T) at learning rate `lr`. Returns the step's
    /// figures; raises FloatingPointError (parameters unchanged) on a NaN or
    /// infinite loss.
    fn step<'py>(&mut self, py: Python<'py>, batch: &Bound<'py, PyAny>, lr: f32) -> PyResult<Bound<'py, PyDict>> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(PyValueError::new_err(format!("lr must be a finite non-negative number, got {lr}")));
        }
        let (ids, shape) = ids_in(batch, "batch", 2, Some(self.inner.model.config.vocab_size))?;
        if shape[1] < 2 {
            return Err(PyValueError::new_err(format!("batch must be [B, T+1] with T >= 1, got shape {shape:?}")));
        }
        let (b, t) = (shape[0], shape[1] - 1);
        let inner = &mut self.inner;
        let report = py.detach(|| inner.step(&ids, b, t, lr)).map_err(|e| match e {
            StepError::BadBatch(msg) => PyValueError::new_err(msg),
            e @ StepError::NonFinite { .. } => PyFloatingPointError::new_err(e.to_string()),
        })?;
        let d = PyDict::new(py);
        d.set_item("loss", report.loss)?;
        d.set_item("grad_norm", report.grad_norm)?;
        d.set_item("group_sequences", report.group_sequences.to_vec())?;
        d.set_item("compute_s", report.compute_s)?;
        d.set_item("step_s", report.step_s)?;
        let spheres = PyList::empty(py);
        for s in &report.spheres {
            let sd = PyDict::new(py);
            sd.set_item("micro_batches", s.micro_batches)?;
            sd.set_item("sequences", s.sequences)?;
            sd.set_item("tokens", s.tokens)?;
            sd.set_item("loss", if s.tokens > 0 { s.loss_sum / s.tokens as f64 } else { f64::NAN })?;
            sd.set_item("busy_s", s.busy_s)?;
            spheres.append(sd)?;
        }
        d.set_item("spheres", spheres)?;
        Ok(d)
    }

    /// Mean loss of batch [B, T+1], forward only, on the spheres.
    fn eval(&self, py: Python<'_>, batch: &Bound<'_, PyAny>) -> PyResult<f64> {
        let (ids, shape) = ids_in(batch, "batch", 2, Some(self.inner.model.config.vocab_size))?;
        if shape[1] < 2 {
            return Err(PyValueError::new_err(format!("batch must be [B, T+1] with T >= 1, got shape {shape:?}")));
        }
        let inner = &self.inner;
        py.detach(|| inner.eval(&ids, shape[0], shape[1] - 1)).map_err(PyValueError::new_err)
    }
}

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModel>()?;
    m.add_class::<PyTrainer>()?;
    m.add("SYMMETRY_GROUPS", crate::train::SYMMETRY_GROUPS)?;
    m.add_function(wrap_pyfunction!(parameter_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(matmul_forward, m)?)?;
    m.add_function(wrap_pyfunction!(matmul_backward, m)?)?;
    m.add_function(wrap_pyfunction!(layernorm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(layernorm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(gelu_forward, m)?)?;
    m.add_function(wrap_pyfunction!(gelu_backward, m)?)?;
    m.add_function(wrap_pyfunction!(residual_forward, m)?)?;
    m.add_function(wrap_pyfunction!(residual_backward, m)?)?;
    m.add_function(wrap_pyfunction!(encoder_forward, m)?)?;
    m.add_function(wrap_pyfunction!(encoder_backward, m)?)?;
    m.add_function(wrap_pyfunction!(attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(crossentropy_forward, m)?)?;
    m.add_function(wrap_pyfunction!(crossentropy_backward, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_crossentropy, m)?)?;
    m.add_function(wrap_pyfunction!(adamw_update, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
