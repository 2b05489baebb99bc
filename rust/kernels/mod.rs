//! The layer kernels, each a `<name>_forward` / `<name>_backward` pair in the
//! style of llm.c. Shapes use B batch, T time, C channels, V vocab, NH heads,
//! N = B*T rows. Backward functions *accumulate* (`+=`) into parameter
//! gradients and into input gradients unless their comment says otherwise.

pub mod adamw;
pub mod attention;
pub mod bf16;
pub mod crossentropy;
pub mod encoder;
pub mod few_rows;
pub mod gelu;
pub mod layernorm;
pub mod matmul;
pub mod residual;
pub mod vecmath;

#[cfg(test)]
pub(crate) mod gradcheck;
