//! The layer kernels as numpy functions: each checks its arguments' shapes,
//! runs the `crate::kernels` function with the GIL released on rayon's global
//! pool, and returns new arrays.

use super::convert::{Int, expect_shape, f32_in, f32_inout, ids_in, out, value_error, zeros, Arr, F32In};
use crate::kernels::adamw::AdamW;
use crate::kernels::bf16::{bf16_hardware, cast_to_bf16, Operand};
use crate::kernels::{adamw, attention, crossentropy, encoder, gelu, layernorm, matmul, residual};
use numpy::{PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods, ToPyArray};
use pyo3::prelude::*;

fn threads() -> usize {
    rayon::current_num_threads()
}

/// Whether this CPU has the bf16 instructions (avx512_bf16).
#[pyfunction]
pub fn bf16_supported() -> bool {
    bf16_hardware()
}

/// float32 array -> uint16 array of its bf16 bits (rounded to nearest even), same shape
#[pyfunction]
pub fn to_bf16<'py>(py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArrayDyn<u16>>> {
    let x = f32_in(x, "x", 0)?;
    let src = x.as_slice();
    let mut h = vec![0u16; src.len()];
    py.detach(|| cast_to_bf16(&mut h, src));
    Ok(numpy::ndarray::ArrayViewD::from_shape(numpy::ndarray::IxDyn(x.shape()), &h).expect("shape matches length").to_pyarray(py))
}

/// out = inp @ weight + bias. inp [N, C], weight [C, OC], bias [OC] or None -> out [N, OC].
/// A weight of bf16 bits (uint16, from `to_bf16`) multiplies in bf16.
#[pyfunction]
#[pyo3(signature = (inp, weight, bias=None))]
pub fn matmul_forward<'py>(
    py: Python<'py>,
    inp: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
) -> PyResult<Arr<'py>> {
    let inp = f32_in(inp, "inp", 2)?;
    let (n, c) = (inp.shape()[0], inp.shape()[1]);
    let half = weight.cast::<PyArrayDyn<u16>>().ok().map(|w| w.try_readonly()).transpose().map_err(|e| value_error(format!("weight: {e}")))?;
    let weight32 = if half.is_none() { Some(f32_in(weight, "weight", 2)?) } else { None };
    let (wshape, w): (Vec<usize>, Operand) = match (&half, &weight32) {
        (Some(h), _) => {
            let data = h.as_slice().map_err(|_| value_error("a uint16 (bf16) weight must be C-contiguous"))?;
            (h.shape().to_vec(), Operand::Bf16(data))
        }
        (None, Some(f)) => (f.shape().to_vec(), Operand::F32(f.as_slice())),
        (None, None) => unreachable!("one of the two was read"),
    };
    if wshape.len() != 2 {
        return Err(value_error(format!("weight must have 2 dimensions, got shape {wshape:?}")));
    }
    let oc = wshape[1];
    expect_shape("weight", &wshape, &[c, oc])?;
    let bias = bias.map(|b| f32_in(b, "bias", 1)).transpose()?;
    if let Some(b) = &bias {
        expect_shape("bias", b.shape(), &[oc])?;
    }
    let (x, b) = (inp.as_slice(), bias.as_ref().map(|b| b.as_slice()));
    let mut o = zeros(&[n, oc], "out")?;
    py.detach(|| matmul::matmul_forward(&mut o, x, w, b, n, c, oc, threads()));
    let data = o;
    Ok(out(py, &[n, oc], data))
}

/// Gradients of matmul_forward: dout [N, OC], inp [N, C], weight [C, OC] -> (dinp, dweight, dbias)
#[pyfunction]
pub fn matmul_backward<'py>(
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
    let (d, x, w) = (dout.as_slice(), inp.as_slice(), weight.as_slice());
    let (mut di, mut dw, mut db) = (zeros(&[n, c], "dinp")?, zeros(&[c, oc], "dweight")?, zeros(&[oc], "dbias")?);
    py.detach(|| matmul::matmul_backward(&mut di, &mut dw, Some(&mut db), d, x, w, n, c, oc, threads()));
    Ok((out(py, &[n, c], di), out(py, &[c, oc], dw), out(py, &[oc], db)))
}

/// inp [N, C], weight [C], bias [C] -> (out [N, C], mean [N], rstd [N])
#[pyfunction]
pub fn layernorm_forward<'py>(
    py: Python<'py>,
    inp: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    bias: &Bound<'py, PyAny>,
) -> PyResult<(Arr<'py>, Arr<'py>, Arr<'py>)> {
    let (inp, weight, bias) = (f32_in(inp, "inp", 2)?, f32_in(weight, "weight", 1)?, f32_in(bias, "bias", 1)?);
    let (n, c) = (inp.shape()[0], inp.shape()[1]);
    expect_shape("weight", weight.shape(), &[c])?;
    expect_shape("bias", bias.shape(), &[c])?;
    let (x, w, b) = (inp.as_slice(), weight.as_slice(), bias.as_slice());
    let (mut o, mut m, mut r) = (zeros(&[n, c], "out")?, zeros(&[n], "mean")?, zeros(&[n], "rstd")?);
    py.detach(|| layernorm::layernorm_forward(&mut o, &mut m, &mut r, x, w, b, n, c));
    Ok((out(py, &[n, c], o), out(py, &[n], m), out(py, &[n], r)))
}

/// dout [N, C], inp [N, C], weight [C], mean [N], rstd [N] -> (dinp, dweight, dbias)
#[pyfunction]
pub fn layernorm_backward<'py>(
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
    let (d, x, w, m, r) = (dout.as_slice(), inp.as_slice(), weight.as_slice(), mean.as_slice(), rstd.as_slice());
    let (mut di, mut dw, mut db) = (zeros(&[n, c], "dinp")?, zeros(&[c], "dweight")?, zeros(&[c], "dbias")?);
    py.detach(|| layernorm::layernorm_backward(&mut di, &mut dw, &mut db, d, x, w, m, r, n, c));
    Ok((out(py, &[n, c], di), out(py, &[c], dw), out(py, &[c], db)))
}

/// Tanh-approximate GELU, elementwise on an array of any shape.
#[pyfunction]
pub fn gelu_forward<'py>(py: Python<'py>, inp: &Bound<'py, PyAny>) -> PyResult<Arr<'py>> {
    let inp = f32_in(inp, "inp", 0)?;
    let shape = inp.shape().to_vec();
    let x = inp.as_slice();
    let mut o = zeros(&[x.len()], "out")?;
    py.detach(|| gelu::gelu_forward(&mut o, x));
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
    let (x, y) = (a.as_slice(), b.as_slice());
    let mut o = zeros(&[x.len()], "out")?;
    py.detach(|| f(&mut o, x, y));
    Ok(out(py, &shape, o))
}

/// dout, inp (same shape) -> dinp
#[pyfunction]
pub fn gelu_backward<'py>(py: Python<'py>, dout: &Bound<'py, PyAny>, inp: &Bound<'py, PyAny>) -> PyResult<Arr<'py>> {
    elementwise2(py, (inp, "inp"), (dout, "dout"), gelu::gelu_backward)
}

/// a + b (same shape)
#[pyfunction]
pub fn residual_forward<'py>(py: Python<'py>, a: &Bound<'py, PyAny>, b: &Bound<'py, PyAny>) -> PyResult<Arr<'py>> {
    elementwise2(py, (a, "a"), (b, "b"), residual::residual_forward)
}

/// dout -> (da, db)
#[pyfunction]
pub fn residual_backward<'py>(py: Python<'py>, dout: &Bound<'py, PyAny>) -> PyResult<(Arr<'py>, Arr<'py>)> {
    let dout = f32_in(dout, "dout", 0)?;
    let shape = dout.shape().to_vec();
    let d = dout.as_slice();
    let (mut da, mut db) = (zeros(&[d.len()], "da")?, zeros(&[d.len()], "dbias")?);
    py.detach(|| residual::residual_backward(&mut da, &mut db, d));
    Ok((out(py, &shape, da), out(py, &shape, db)))
}

/// tokens [B, T], wte [V, C], wpe [T_max, C] -> out [B, T, C]
#[pyfunction]
pub fn encoder_forward<'py>(
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
        return Err(value_error(format!(
            "wpe has shape {:?}, expected [T_max >= {t}, {c}] for tokens of shape {shape:?}",
            wpe.shape()
        )));
    }
    let (e, p) = (wte.as_slice(), wpe.as_slice());
    let mut o = zeros(&[b, t, c], "out")?;
    py.detach(|| encoder::encoder_forward(&mut o, &ids, e, p, b, t, c));
    Ok(out(py, &[b, t, c], o))
}

/// dout [B, T, C], tokens [B, T] -> (dwte [V, C], dwpe [block_size, C])
#[pyfunction]
pub fn encoder_backward<'py>(
    py: Python<'py>,
    dout: &Bound<'py, PyAny>,
    tokens: &Bound<'py, PyAny>,
    vocab_size: Int<usize>,
    block_size: Int<usize>,
) -> PyResult<(Arr<'py>, Arr<'py>)> {
    let (vocab_size, block_size) = (vocab_size.0, block_size.0);
    let dout = f32_in(dout, "dout", 3)?;
    let (ids, shape) = ids_in(tokens, "tokens", 2, Some(vocab_size))?;
    let (b, t, c) = (dout.shape()[0], dout.shape()[1], dout.shape()[2]);
    expect_shape("tokens", &shape, &[b, t])?;
    if t > block_size {
        return Err(value_error(format!("T={t} exceeds block_size {block_size}")));
    }
    let d = dout.as_slice();
    let (mut dwte, mut dwpe) = (zeros(&[vocab_size, c], "dwte")?, zeros(&[block_size, c], "dwpe")?);
    py.detach(|| encoder::encoder_backward(&mut dwte, &mut dwpe, d, &ids, b, t, c));
    Ok((out(py, &[vocab_size, c], dwte), out(py, &[block_size, c], dwpe)))
}

fn head_dims(qkv_shape: &[usize], n_head: usize) -> PyResult<(usize, usize, usize)> {
    let (b, t, c3) = (qkv_shape[0], qkv_shape[1], qkv_shape[2]);
    if c3 % 3 != 0 || n_head == 0 || (c3 / 3) % n_head != 0 {
        return Err(value_error(format!(
            "qkv has shape {qkv_shape:?}: its last axis must be 3*C with C divisible by n_head={n_head}"
        )));
    }
    Ok((b, t, c3 / 3))
}

/// qkv [B, T, 3C] -> (out [B, T, C], lse [B, NH, T])
#[pyfunction]
pub fn attention_forward<'py>(py: Python<'py>, qkv: &Bound<'py, PyAny>, n_head: Int<usize>) -> PyResult<(Arr<'py>, Arr<'py>)> {
    let n_head = n_head.0;
    let qkv = f32_in(qkv, "qkv", 3)?;
    let (b, t, c) = head_dims(qkv.shape(), n_head)?;
    let q = qkv.as_slice();
    let (mut o, mut l) = (zeros(&[b, t, c], "out")?, zeros(&[b, n_head, t], "lse")?);
    py.detach(|| attention::attention_forward(&mut o, &mut l, q, b, t, c, n_head, threads()));
    Ok((out(py, &[b, t, c], o), out(py, &[b, n_head, t], l)))
}

/// dout [B, T, C], qkv [B, T, 3C], output [B, T, C] (from the forward), lse [B, NH, T] -> dqkv [B, T, 3C]
#[pyfunction]
pub fn attention_backward<'py>(
    py: Python<'py>,
    dout: &Bound<'py, PyAny>,
    qkv: &Bound<'py, PyAny>,
    output: &Bound<'py, PyAny>,
    lse: &Bound<'py, PyAny>,
    n_head: Int<usize>,
) -> PyResult<Arr<'py>> {
    let n_head = n_head.0;
    let (dout, qkv) = (f32_in(dout, "dout", 3)?, f32_in(qkv, "qkv", 3)?);
    let (o, lse) = (f32_in(output, "output", 3)?, f32_in(lse, "lse", 3)?);
    let (b, t, c) = head_dims(qkv.shape(), n_head)?;
    expect_shape("dout", dout.shape(), &[b, t, c])?;
    expect_shape("output", o.shape(), &[b, t, c])?;
    expect_shape("lse", lse.shape(), &[b, n_head, t])?;
    let (d, q, o, l) = (dout.as_slice(), qkv.as_slice(), o.as_slice(), lse.as_slice());
    let mut dq = zeros(&[b, t, 3, c], "dqkv")?;
    py.detach(|| attention::attention_backward(&mut dq, d, q, o, l, b, t, c, n_head, threads()));
    Ok(out(py, &[b, t, 3 * c], dq))
}

fn logits_and_targets<'py>(
    logits: &Bound<'py, PyAny>,
    targets: &Bound<'py, PyAny>,
) -> PyResult<(F32In<'py>, usize, usize, Vec<u32>)> {
    let l = f32_in(logits, "logits", 2)?;
    let (n, v) = (l.shape()[0], l.shape()[1]);
    let (ids, shape) = ids_in(targets, "targets", 1, Some(v))?;
    expect_shape("targets", &shape, &[n])?;
    Ok((l, n, v, ids))
}

/// logits [N, V], targets [N] -> per-row losses [N]
#[pyfunction]
pub fn crossentropy_forward<'py>(py: Python<'py>, logits: &Bound<'py, PyAny>, targets: &Bound<'py, PyAny>) -> PyResult<Arr<'py>> {
    let (l, n, v, ids) = logits_and_targets(logits, targets)?;
    let x = l.as_slice();
    let mut losses = zeros(&[n], "losses")?;
    py.detach(|| crossentropy::crossentropy_forward(&mut losses, x, &ids, n, v));
    Ok(out(py, &[n], losses))
}

/// logits [N, V], targets [N], dlosses [N] -> dlogits [N, V]
#[pyfunction]
pub fn crossentropy_backward<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    targets: &Bound<'py, PyAny>,
    dlosses: &Bound<'py, PyAny>,
) -> PyResult<Arr<'py>> {
    let (l, n, v, ids) = logits_and_targets(logits, targets)?;
    let dl = f32_in(dlosses, "dlosses", 1)?;
    expect_shape("dlosses", dl.shape(), &[n])?;
    let (x, d) = (l.as_slice(), dl.as_slice());
    let mut g = zeros(&[n, v], "dlogits")?;
    py.detach(|| crossentropy::crossentropy_backward(&mut g, x, &ids, d, n, v));
    Ok(out(py, &[n, v], g))
}

/// Fused: logits [N, V], targets [N] -> (mean loss, dlogits [N, V] of the mean loss)
#[pyfunction]
pub fn softmax_crossentropy<'py>(py: Python<'py>, logits: &Bound<'py, PyAny>, targets: &Bound<'py, PyAny>) -> PyResult<(f64, Arr<'py>)> {
    let (l, n, v, ids) = logits_and_targets(logits, targets)?;
    let x = l.as_slice();
    let mut g = zeros(&[n, v], "dlogits")?;
    let loss = py.detach(|| {
        g.copy_from_slice(x);
        crossentropy::crossentropy_fused_mean(&mut g, &ids, n, v)
    });
    Ok((loss, out(py, &[n, v], g)))
}

/// One AdamW step, in place on params, m and v (all float32, same shape as grads).
#[pyfunction]
#[pyo3(signature = (params, grads, m, v, step, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0))]
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    py: Python<'_>,
    params: &Bound<'_, PyAny>,
    grads: &Bound<'_, PyAny>,
    m: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    step: Int<u64>,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
) -> PyResult<()> {
    let step = step.0;
    if step == 0 {
        return Err(value_error("step counts from 1, got 0"));
    }
    let hp = AdamW { lr, beta1, beta2, eps, weight_decay };
    hp.validate().map_err(value_error)?;
    let g = f32_in(grads, "grads", 0)?;
    let shape = g.shape().to_vec();
    for (name, arr) in [("params", params), ("m", m), ("v", v)] {
        expect_shape(name, f32_in(arr, name, 0)?.shape(), &shape)?;
    }
    if params.is(m) || params.is(v) || m.is(v) || params.is(grads) {
        return Err(value_error("params, grads, m and v must be four distinct arrays"));
    }
    let (mut p, mut mm, mut vv) = (f32_inout(params, "params")?, f32_inout(m, "m")?, f32_inout(v, "v")?);
    let (ps, gs, ms, vs) = (p.as_slice_mut()?, g.as_slice(), mm.as_slice_mut()?, vv.as_slice_mut()?);
    py.detach(|| adamw::adamw_update(ps, gs, ms, vs, &hp, weight_decay, step));
    Ok(())
}
