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

/// A matrix's base pointer shared by parallel tasks that each write their
/// own disjoint tiles of it (the GEMMs' output).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: users write disjoint elements from each task (see each use).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The element `offset` places past the base (computing it is safe;
    /// writing through it is the caller's to justify).
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
