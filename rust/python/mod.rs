//! The PyO3 layer that makes `crystalline._core`; this file only registers.
//!
//! One file per concept: `convert` (numpy in and out, shape and id checks),
//! `kernels` (each layer kernel as a numpy function), `model` (the `Model`
//! and `Sampler` classes and model/sampling checks) and `trainer` (the `Trainer` class and
//! the figures a run is planned with). Every function checks its arguments
//! and raises TypeError/ValueError naming the argument, borrows numpy inputs
//! without copying where their layout allows, and releases the GIL around
//! the numeric work.

mod convert;
mod kernels;
mod model;
mod trainer;

use pyo3::prelude::*;

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("SYMMETRY_GROUPS", crate::train::SYMMETRY_GROUPS)?;
    m.add("LOGIT_CHUNK", crate::model::LOGIT_CHUNK)?;
    m.add("MAX_THREADS", crate::train::MAX_THREADS)?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<model::PySampler>()?;
    m.add_class::<trainer::PyTrainer>()?;
    m.add_function(wrap_pyfunction!(model::parameter_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(model::validate_model, m)?)?;
    m.add_function(wrap_pyfunction!(model::validate_sampling, m)?)?;
    m.add_function(wrap_pyfunction!(trainer::validate_optimizer, m)?)?;
    m.add_function(wrap_pyfunction!(trainer::available_cores, m)?)?;
    m.add_function(wrap_pyfunction!(trainer::lanes, m)?)?;
    m.add_function(wrap_pyfunction!(trainer::plan_teams, m)?)?;
    m.add_function(wrap_pyfunction!(trainer::training_memory_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::bf16_supported, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::to_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::matmul_forward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::matmul_backward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::layernorm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::layernorm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::gelu_forward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::gelu_backward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::residual_forward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::residual_backward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::encoder_forward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::encoder_backward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::crossentropy_forward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::crossentropy_backward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::softmax_crossentropy, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::adamw_update, m)?)?;
    Ok(())
}
