//! Crystalline's numeric core: GPT-2 kernels, the model's forward and backward
//! pass, AdamW and the kissing-sphere trainer, in plain Rust.
//!
//! Nothing here knows about Python except the `python` module, which is only
//! compiled when maturin builds the extension (`--features python`).

pub mod kernels;
pub mod generate;
pub mod memory;
pub mod model;
pub mod optim;
pub mod plan;
pub mod train;

#[cfg(feature = "python")]
mod python;
