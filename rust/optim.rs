//! The optimizer of a whole model: AdamW's moments over the flat parameter
//! buffer, with weight decay on matrices only, and the gradient's global norm.
//!
//! The per-element update is the `adamw` kernel; this file knows the layout
//! (which tensors are matrices) and runs the update in parallel chunks.

use crate::kernels::adamw::{adamw_update, AdamW};
use crate::model::Layout;
use rayon::prelude::*;

/// Elements per parallel chunk of the update.
const CHUNK: usize = 1 << 15;

/// AdamW state for a whole model: the two moments and the step count.
pub struct Optimizer {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: u64,
}

impl Optimizer {
    pub fn new(layout: &Layout) -> Self {
        Optimizer { m: vec![0.0; layout.total], v: vec![0.0; layout.total], step: 0 }
    }

    /// One AdamW step over every tensor. Matrices (2-D tensors: embeddings
    /// and weights) are decayed; biases and LayerNorm parameters are not.
    pub fn update(&mut self, layout: &Layout, params: &mut [f32], grads: &[f32], hp: &AdamW) {
        self.step += 1;
        let step = self.step;
        // One parallel pass over the flat buffers; each chunk is split at the
        // tensor boundaries it crosses, to give each tensor its own decay.
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(self.m.par_chunks_mut(CHUNK))
            .zip(self.v.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(ci, (((p, g), m), v))| {
                let start = ci * CHUNK;
                let end = start + p.len();
                let first = layout.offsets.partition_point(|&o| o <= start) - 1;
                for i in first..layout.offsets.len() {
                    let (lo, hi) = (layout.offsets[i].max(start), (layout.offsets[i] + layout.len_of(i)).min(end));
                    if lo >= end {
                        break;
                    }
                    let wd = if layout.shapes[i].len() >= 2 { hp.weight_decay } else { 0.0 };
                    let r = lo - start..hi - start;
                    adamw_update(&mut p[r.clone()], &g[r.clone()], &mut m[r.clone()], &mut v[r], hp, wd, step);
                }
            });
    }
}

/// Euclidean norm of a gradient buffer, accumulated in f64.
pub fn global_norm(grads: &[f32]) -> f64 {
    grads.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Config, Gpt2};

    #[test]
    fn optimizer_decays_matrices_but_not_biases_or_layernorms() {
        let cfg = Config { vocab_size: 3000, n_embd: 32, n_layer: 1, n_head: 2, block_size: 8 };
        let mut m = Gpt2::new(cfg, 0).unwrap();
        m.params.fill(1.0);
        let grads = vec![0.0; m.layout.total];
        let mut opt = Optimizer::new(&m.layout);
        let hp = AdamW { lr: 0.1, weight_decay: 0.5, ..Default::default() };
        let layout = m.layout.clone();
        opt.update(&layout, &mut m.params, &grads, &hp);
        for (i, view) in layout.views(&m.params).iter().enumerate() {
            let want = if layout.shapes[i].len() == 2 { 0.95 } else { 1.0 };
            assert!(view.iter().all(|&x| (x - want).abs() < 1e-6), "{}", layout.names[i]);
        }
    }

    #[test]
    fn global_norm_is_the_euclidean_norm() {
        assert_eq!(global_norm(&[3.0, 4.0]), 5.0);
        assert_eq!(global_norm(&[]), 0.0);
    }
}
