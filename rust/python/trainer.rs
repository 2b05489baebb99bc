//! `Trainer`: the kissing-sphere trainer for Python (steps, evaluation, the
//! zero-copy parameter and optimizer views Python saves and restores), and
//! the figures Python plans a run with: optimizer checks, cores, lanes, the
//! teams of a step and memory.

use crate::kernels::bf16::Precision;
use super::convert::{Int, ids_in, refusal_error, tensor_views, value_error};
use crate::memory;
use crate::kernels::adamw::AdamW;
use crate::model::{Config, Gpt2, WeightUse};
use crate::plan;
use crate::train::{self, Hyper, Share, SphereReport, StepError, Trainer};
use pyo3::exceptions::{PyFloatingPointError, PyRuntimeError};
use pyo3::prelude::*;
use numpy::PyArray1;
use pyo3::types::{PyDict, PyList};

/// Refuse optimizer settings that cannot train.
#[pyfunction]
#[pyo3(signature = (beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0))]
pub fn validate_optimizer(beta1: f32, beta2: f32, eps: f32, weight_decay: f32, grad_clip: f32) -> PyResult<()> {
    let adamw = AdamW { beta1, beta2, eps, weight_decay, ..Default::default() };
    Hyper { adamw, grad_clip }.validate().map_err(value_error)
}

/// Cores this process may run on.
#[pyfunction]
pub fn available_cores() -> usize {
    train::available_cores()
}

/// `cores`, or every core this process may use when None; refused unless
/// 1 to MAX_THREADS.
fn cores_or_all(cores: Option<Int<usize>>) -> PyResult<usize> {
    let cores = cores.map_or_else(train::available_cores, |c| c.0);
    train::check_cores(cores).map_err(value_error)?;
    Ok(cores)
}

/// Lanes of working memory a Trainer of `threads` threads keeps on `cores`
/// cores (default: every core this process may use).
#[pyfunction]
#[pyo3(signature = (threads, cores=None))]
pub fn lanes(threads: Int<usize>, cores: Option<Int<usize>>) -> PyResult<usize> {
    Ok(train::lanes_for(threads.0, cores_or_all(cores)?))
}

/// The plan of a step of `batch_size` sequences of `seq_len` tokens for
/// `threads` sphere threads on `cores` cores: per lane, the cores of its
/// team and the sequences it runs.
#[pyfunction]
#[pyo3(signature = (*, threads, cores, batch_size, seq_len))]
pub fn plan_teams<'py>(
    py: Python<'py>,
    threads: Int<usize>,
    cores: Int<usize>,
    batch_size: Int<usize>,
    seq_len: Int<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    train::check_threads(threads.0).map_err(value_error)?;
    let cores = cores_or_all(Some(cores))?;
    if batch_size.0 == 0 || seq_len.0 == 0 {
        return Err(value_error("batch_size and seq_len must be positive"));
    }
    let teams = plan::teams(cores, threads.0, batch_size.0, seq_len.0);
    let d = PyDict::new(py);
    d.set_item("cores", teams.cores.clone())?;
    d.set_item("quota", teams.quota.clone())?;
    Ok(d)
}

/// Bytes a Trainer allocates to train this shape on batches of
/// `batch_size` sequences of `seq_len` tokens with `threads` threads on
/// `cores` cores (default: every core this process may use), its matmuls in
/// `precision` ("fp32" or "bf16").
#[pyfunction]
#[pyo3(signature = (vocab_size, n_embd, n_layer, n_head, block_size, *, batch_size, seq_len, threads, cores=None, precision="fp32"))]
#[allow(clippy::too_many_arguments)]
pub fn training_memory_bytes(
    vocab_size: Int<usize>,
    n_embd: Int<usize>,
    n_layer: Int<usize>,
    n_head: Int<usize>,
    block_size: Int<usize>,
    batch_size: Int<usize>,
    seq_len: Int<usize>,
    threads: Int<usize>,
    cores: Option<Int<usize>>,
    precision: &str,
) -> PyResult<u64> {
    let precision = Precision::parse(precision).map_err(value_error)?;
    let (vocab_size, n_embd, n_layer, n_head, block_size, batch_size, seq_len, threads) = (vocab_size.0, n_embd.0, n_layer.0, n_head.0, block_size.0, batch_size.0, seq_len.0, threads.0);
    let cfg = Config { vocab_size, n_embd, n_layer, n_head, block_size };
    cfg.validate().map_err(value_error)?;
    train::training_bytes(&cfg, batch_size, seq_len, threads, cores_or_all(cores)?, precision)
        .ok_or_else(|| value_error("the training memory of this shape overflows a 64-bit count"))
}

/// The kissing-sphere trainer: a model, its AdamW state and a pool of
/// `threads` threads (Node Zero plus worker spheres) dividing `cores` cores
/// (default: every core this process may use) among them.
#[pyclass(name = "Trainer", module = "crystalline._core")]
pub struct PyTrainer {
    inner: Trainer,
}

#[pymethods]
impl PyTrainer {
    #[new]
    #[pyo3(signature = (vocab_size, n_embd, n_layer, n_head, block_size, *, threads=Int(12), cores=None, seed=Int(0),
                        beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0),
           text_signature = "(vocab_size, n_embd, n_layer, n_head, block_size, *, threads=12, cores=None, seed=0, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        vocab_size: Int<usize>,
        n_embd: Int<usize>,
        n_layer: Int<usize>,
        n_head: Int<usize>,
        block_size: Int<usize>,
        threads: Int<usize>,
        cores: Option<Int<usize>>,
        seed: Int<u64>,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        grad_clip: f32,
    ) -> PyResult<Self> {
        let (vocab_size, n_embd, n_layer, n_head, block_size) = (vocab_size.0, n_embd.0, n_layer.0, n_head.0, block_size.0);
        let (threads, seed) = (threads.0, seed.0);
        let hyper = Hyper { adamw: AdamW { lr: 0.0, beta1, beta2, eps, weight_decay }, grad_clip };
        hyper.validate().map_err(value_error)?;
        let cfg = Config { vocab_size, n_embd, n_layer, n_head, block_size };
        cfg.validate().map_err(value_error)?;
        train::check_threads(threads).map_err(value_error)?;
        let cores = cores_or_all(cores)?;
        // the weights, two AdamW moments and a gradient buffer per lane
        let copies = 3 + train::lanes_for(threads, cores);
        let floats = cfg.num_parameters().checked_mul(copies);
        memory::ensure(memory::f32_bytes(floats), "the model, its optimizer state and gradients").map_err(refusal_error)?;
        let model = Gpt2::new(cfg, seed).map_err(value_error)?;
        Ok(PyTrainer { inner: Trainer::with_cores(model, hyper, threads, cores).map_err(value_error)? })
    }

    /// Run the matmuls in "fp32" or "bf16" (bf16 operands, f32 sums). The
    /// weights are rounded now and after every step: call again after
    /// writing them through `parameters()`.
    fn set_precision(&mut self, precision: &str) -> PyResult<()> {
        self.inner.model.set_precision(Precision::parse(precision).map_err(value_error)?, WeightUse::Training);
        Ok(())
    }

    /// "fp32" or "bf16".
    #[getter]
    fn precision(&self) -> &'static str {
        self.inner.model.precision().name()
    }

    #[getter]
    fn threads(&self) -> usize {
        self.inner.threads()
    }

    /// Cores the spheres divide among them.
    #[getter]
    fn cores(&self) -> usize {
        self.inner.cores()
    }

    /// Optimizer steps taken (AdamW's t).
    #[getter]
    fn step_count(&self) -> u64 {
        self.inner.opt.step
    }

    #[setter]
    fn set_step_count(&mut self, value: Int<u64>) {
        self.inner.opt.step = value.0;
    }

    /// Sequences dealt to symmetry groups so far this epoch.
    #[getter]
    fn dealt(&self) -> u64 {
        self.inner.dealt
    }

    #[setter]
    fn set_dealt(&mut self, value: Int<u64>) {
        self.inner.dealt = value.0;
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
        check_lr(lr)?;
        let (ids, b, t) = self.batch_in(batch)?;
        let inner = &mut self.inner;
        let report = py.detach(|| inner.step(&ids, b, t, lr)).map_err(step_error)?;
        let d = passes_dict(py, report.group_sequences.to_vec(), &report.spheres, report.compute_s)?;
        d.set_item("loss", report.loss)?;
        d.set_item("grad_norm", report.grad_norm)?;
        d.set_item("step_s", report.step_s)?;
        Ok(d)
    }

    /// Forward and backward passes of this process's rows of a step: batch
    /// [B, T+1] is rows `offset..offset+B` of a global batch of `batch_size`
    /// sequences (default: B, the whole batch). Leaves the summed gradient
    /// in `gradient()` for `apply`; returns `loss_sum` (summed token losses
    /// of these rows) and the per-group and per-sphere figures of `step`.
    #[pyo3(signature = (batch, *, batch_size=None, offset=Int(0)), text_signature = "($self, batch, *, batch_size=None, offset=0)")]
    fn gradients<'py>(&mut self, py: Python<'py>, batch: &Bound<'py, PyAny>, batch_size: Option<Int<usize>>,
                      offset: Int<usize>) -> PyResult<Bound<'py, PyDict>> {
        let (ids, b, t) = self.batch_in(batch)?;
        let share = Share { total: batch_size.map_or(b, |n| n.0), offset: offset.0 };
        let inner = &mut self.inner;
        let report = py.detach(|| inner.gradients(&ids, b, t, share)).map_err(step_error)?;
        let d = passes_dict(py, report.group_sequences.to_vec(), &report.spheres, report.compute_s)?;
        d.set_item("loss_sum", report.loss_sum)?;
        Ok(d)
    }

    /// The summed gradient [P] of the last `gradients` call: a writeable
    /// zero-copy view, in the order of the flat parameter buffer, which an
    /// in-place MPI Allreduce sums across processes before `apply`.
    fn gradient<'py>(slf: &Bound<'py, Self>) -> Bound<'py, PyArray1<f32>> {
        let this = slf.borrow();
        let view = numpy::ndarray::ArrayView1::from(this.inner.gradient());
        // SAFETY: the gradient buffer is allocated once and never resized.
        unsafe { PyArray1::borrow_from_array(&view, slf.as_any().clone()) }
    }

    /// Clip `gradient()` to the global norm and apply AdamW at `lr`; `loss`
    /// is the step's mean loss over the global batch. Returns the norm
    /// before clipping; raises FloatingPointError (parameters unchanged) on
    /// a NaN or infinite loss or gradient.
    fn apply(&mut self, py: Python<'_>, lr: f32, loss: f64) -> PyResult<f64> {
        check_lr(lr)?;
        let inner = &mut self.inner;
        py.detach(|| inner.apply(lr, loss)).map_err(step_error)
    }

    /// Mean loss of batch [B, T+1], forward only, on the spheres.
    fn eval(&self, py: Python<'_>, batch: &Bound<'_, PyAny>) -> PyResult<f64> {
        let (ids, b, t) = self.batch_in(batch)?;
        let inner = &self.inner;
        py.detach(|| inner.eval(&ids, b, t)).map_err(value_error)
    }
}

impl PyTrainer {
    /// The ids of a [B, T+1] batch with T >= 1, and B and T.
    fn batch_in(&self, batch: &Bound<'_, PyAny>) -> PyResult<(Vec<u32>, usize, usize)> {
        let (ids, shape) = ids_in(batch, "batch", 2, Some(self.inner.model.config.vocab_size))?;
        if shape[1] < 2 {
            return Err(value_error(format!("batch must be [B, T+1] with T >= 1, got shape {shape:?}")));
        }
        Ok((ids, shape[0], shape[1] - 1))
    }
}

fn check_lr(lr: f32) -> PyResult<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(value_error(format!("lr must be a finite non-negative number, got {lr}")));
    }
    Ok(())
}

fn step_error(e: StepError) -> PyErr {
    match e {
        StepError::BadBatch(msg) => value_error(msg),
        e @ StepError::NonFinite { .. } => PyFloatingPointError::new_err(e.to_string()),
        e @ StepError::SphereFailed(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// The figures of a step's forward and backward passes: sequences per
/// symmetry group, compute seconds and each sphere's report.
fn passes_dict<'py>(py: Python<'py>, groups: Vec<usize>, spheres: &[SphereReport], compute_s: f64) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("group_sequences", groups)?;
    d.set_item("compute_s", compute_s)?;
    let list = PyList::empty(py);
    for s in spheres {
        let sd = PyDict::new(py);
        sd.set_item("micro_batches", s.micro_batches)?;
        sd.set_item("sequences", s.sequences)?;
        sd.set_item("tokens", s.tokens)?;
        sd.set_item("loss_sum", s.loss_sum)?;
        sd.set_item("busy_s", s.busy_s)?;
        list.append(sd)?;
    }
    d.set_item("spheres", list)?;
    Ok(d)
}
