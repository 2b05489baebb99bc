//! The GPT-2 model: configuration, the flat parameter buffer with its named
//! views, activations, the forward pass and the backward pass.
//!
//! Layout follows GPT-2 exactly (Hugging Face tensor names, Conv1D `[in, out]`
//! weights), so checkpoints export to `GPT2LMHeadModel` as they are:
//! wte -> + wpe -> L x [ln_1 -> attn -> + -> ln_2 -> mlp -> +] -> ln_f -> @ wte^T.

use crate::kernels::adamw::{adamw_update, AdamW};
use crate::kernels::attention::{attention_backward, attention_forward};
use crate::kernels::crossentropy::crossentropy_fused;
use crate::kernels::encoder::{encoder_backward, encoder_forward};
use crate::kernels::gelu::{gelu_backward, gelu_forward};
use crate::kernels::layernorm::{layernorm_backward, layernorm_forward};
use crate::kernels::matmul::{matmul_backward, matmul_forward, sgemm};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Shape of a GPT-2 model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// V: size of the token vocabulary.
    pub vocab_size: usize,
    /// C: width of the residual stream.
    pub n_embd: usize,
    /// L: number of transformer blocks.
    pub n_layer: usize,
    /// NH: attention heads per block; must divide C.
    pub n_head: usize,
    /// T_max: longest sequence, rows of the position table.
    pub block_size: usize,
}

/// Rows of logits computed at once by the loss: bounds the memory of the
/// output layer to LOGIT_CHUNK x V floats whatever B*T is.
pub const LOGIT_CHUNK: usize = 128;

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("block_size", self.block_size),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive, got 0"));
            }
        }
        if self.n_embd % self.n_head != 0 {
            return Err(format!("n_embd {} is not divisible by n_head {}", self.n_embd, self.n_head));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(format!("vocab_size {} does not fit token ids in u32", self.vocab_size));
        }
        Ok(())
    }

    /// (name, shape) of every parameter tensor, in buffer order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (v, c, t) = (self.vocab_size, self.n_embd, self.block_size);
        let mut shapes = vec![("wte.weight".to_string(), vec![v, c]), ("wpe.weight".to_string(), vec![t, c])];
        for l in 0..self.n_layer {
            for (name, shape) in [
                ("ln_1.weight", vec![c]),
                ("ln_1.bias", vec![c]),
                ("attn.c_attn.weight", vec![c, 3 * c]),
                ("attn.c_attn.bias", vec![3 * c]),
                ("attn.c_proj.weight", vec![c, c]),
                ("attn.c_proj.bias", vec![c]),
                ("ln_2.weight", vec![c]),
                ("ln_2.bias", vec![c]),
                ("mlp.c_fc.weight", vec![c, 4 * c]),
                ("mlp.c_fc.bias", vec![4 * c]),
                ("mlp.c_proj.weight", vec![4 * c, c]),
                ("mlp.c_proj.bias", vec![c]),
            ] {
                shapes.push((format!("h.{l}.{name}"), shape));
            }
        }
        shapes.push(("ln_f.weight".to_string(), vec![c]));
        shapes.push(("ln_f.bias".to_string(), vec![c]));
        shapes
    }

    pub fn num_parameters(&self) -> usize {
        self.parameter_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

/// Where each named tensor lives in the flat buffer.
#[derive(Clone, Debug)]
pub struct Layout {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub offsets: Vec<usize>,
    pub total: usize,
}

/// Tensors per transformer block, in buffer order.
const PER_LAYER: usize = 12;

impl Layout {
    pub fn new(config: &Config) -> Self {
        let (mut names, mut shapes, mut offsets, mut total) = (vec![], vec![], vec![], 0);
        for (name, shape) in config.parameter_shapes() {
            offsets.push(total);
            total += shape.iter().product::<usize>();
            names.push(name);
            shapes.push(shape);
        }
        Layout { names, shapes, offsets, total }
    }

    pub fn len_of(&self, i: usize) -> usize {
        self.shapes[i].iter().product()
    }

    /// Split a flat buffer into one slice per tensor.
    pub fn views<'a>(&self, buf: &'a [f32]) -> Vec<&'a [f32]> {
        (0..self.names.len()).map(|i| &buf[self.offsets[i]..self.offsets[i] + self.len_of(i)]).collect()
    }

    /// Split a flat buffer into one mutable slice per tensor.
    pub fn views_mut<'a>(&self, mut buf: &'a mut [f32]) -> Vec<&'a mut [f32]> {
        let mut out = Vec::with_capacity(self.names.len());
        for i in 0..self.names.len() {
            let (head, tail) = buf.split_at_mut(self.len_of(i));
            out.push(head);
            buf = tail;
        }
        out
    }
}

/// Borrowed views of one block's parameters (or gradients).
pub(crate) struct Block<S> {
    pub(crate) ln1w: S,
    pub(crate) ln1b: S,
    pub(crate) qkvw: S,
    pub(crate) qkvb: S,
    pub(crate) attprojw: S,
    pub(crate) attprojb: S,
    pub(crate) ln2w: S,
    pub(crate) ln2b: S,
    pub(crate) fcw: S,
    pub(crate) fcb: S,
    pub(crate) fcprojw: S,
    pub(crate) fcprojb: S,
}

/// The whole model's tensors as named views.
pub(crate) struct Tensors<S> {
    pub(crate) wte: S,
    pub(crate) wpe: S,
    pub(crate) blocks: Vec<Block<S>>,
    pub(crate) lnfw: S,
    pub(crate) lnfb: S,
}

pub(crate) fn named<S>(views: Vec<S>) -> Tensors<S> {
    assert_eq!((views.len() - 4) % PER_LAYER, 0, "layout has 4 + 12 L tensors");
    let n_layer = (views.len() - 4) / PER_LAYER;
    let mut it = views.into_iter();
    let mut next = move || it.next().expect("layout has every tensor");
    let wte = next();
    let wpe = next();
    let blocks = (0..n_layer)
        .map(|_| Block {
            ln1w: next(),
            ln1b: next(),
            qkvw: next(),
            qkvb: next(),
            attprojw: next(),
            attprojb: next(),
            ln2w: next(),
            ln2b: next(),
            fcw: next(),
            fcb: next(),
            fcprojw: next(),
            fcprojb: next(),
        })
        .collect();
    let lnfw = next();
    let lnfb = next();
    Tensors { wte, wpe, blocks, lnfw, lnfb }
}

/// Forward-pass buffers of one block, kept for the backward pass. N = B*T.
struct BlockActs {
    ln1: Vec<f32>,       // [N, C]
    ln1_mean: Vec<f32>,  // [N]
    ln1_rstd: Vec<f32>,  // [N]
    qkv: Vec<f32>,       // [N, 3C]
    atty: Vec<f32>,      // [N, C]   attention output before c_proj
    att: Vec<f32>,       // [B, NH, T, T]
    residual2: Vec<f32>, // [N, C]   residual + c_proj(atty)
    ln2: Vec<f32>,       // [N, C]
    ln2_mean: Vec<f32>,  // [N]
    ln2_rstd: Vec<f32>,  // [N]
    fch: Vec<f32>,       // [N, 4C]
    fch_gelu: Vec<f32>,  // [N, 4C]
    residual3: Vec<f32>, // [N, C]   residual2 + mlp.c_proj(fch_gelu)
}

/// Every buffer one forward and backward pass of a (B, T) batch needs.
/// Allocated once per batch shape and reused step after step.
pub struct Activations {
    pub b: usize,
    pub t: usize,
    capacity_rows: usize, // B*T the buffers were sized for
    capacity_att: usize,  // B*T*T the attention buffers were sized for
    encoded: Vec<f32>,    // [N, C]
    blocks: Vec<BlockActs>,
    lnf: Vec<f32>,        // [N, C]
    lnf_mean: Vec<f32>,   // [N]
    lnf_rstd: Vec<f32>,   // [N]
    logits: Vec<f32>,     // [LOGIT_CHUNK, V] one chunk of logits, then of dlogits
    // backward scratch, reused by every block
    dresidual: Vec<f32>,  // [N, C]
    dln: Vec<f32>,        // [N, C]   also holds dlnf
    datty: Vec<f32>,      // [N, C]
    dqkv: Vec<f32>,       // [N, 3C]
    dfch: Vec<f32>,       // [N, 4C]
    dfch_gelu: Vec<f32>,  // [N, 4C]
}

impl Activations {
    pub fn new(config: &Config, b: usize, t: usize) -> Self {
        let (c, nh, n) = (config.n_embd, config.n_head, b * t);
        let z = |len: usize| vec![0.0f32; len];
        let blocks = (0..config.n_layer)
            .map(|_| BlockActs {
                ln1: z(n * c),
                ln1_mean: z(n),
                ln1_rstd: z(n),
                qkv: z(n * 3 * c),
                atty: z(n * c),
                att: z(b * nh * t * t),
                residual2: z(n * c),
                ln2: z(n * c),
                ln2_mean: z(n),
                ln2_rstd: z(n),
                fch: z(n * 4 * c),
                fch_gelu: z(n * 4 * c),
                residual3: z(n * c),
            })
            .collect();
        Activations {
            b,
            t,
            capacity_rows: n,
            capacity_att: b * t * t,
            encoded: z(n * c),
            blocks,
            lnf: z(n * c),
            lnf_mean: z(n),
            lnf_rstd: z(n),
            logits: z(LOGIT_CHUNK.min(n) * config.vocab_size),
            dresidual: z(n * c),
            dln: z(n * c),
            datty: z(n * c),
            dqkv: z(n * 3 * c),
            dfch: z(n * 4 * c),
            dfch_gelu: z(n * 4 * c),
        }
    }

    /// Reuse these buffers for a (b, t) batch when they are large enough,
    /// else reallocate. Buffers are used from their start, so a smaller
    /// batch runs in the memory of a larger one.
    pub fn fit(&mut self, config: &Config, b: usize, t: usize) {
        let fits = b * t <= self.capacity_rows && b * t * t <= self.capacity_att;
        if fits {
            self.b = b;
            self.t = t;
        } else {
            *self = Activations::new(config, b, t);
        }
    }
}

/// out = residual + inp @ weight + bias (a projection added onto the stream)
///
/// out:      [N, OC] (written)
/// residual: [N, OC]
/// inp:      [N, IC]
/// weight:   [IC, OC]
/// bias:     [OC]
#[allow(clippy::too_many_arguments)]
pub(crate) fn residual_matmul_forward(
    out: &mut [f32],
    residual: &[f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    n: usize,
    ic: usize,
    oc: usize,
    threads: usize,
) {
    for (o, r) in out.chunks_exact_mut(oc).zip(residual.chunks_exact(oc)) {
        for j in 0..oc {
            o[j] = r[j] + bias[j];
        }
    }
    sgemm(n, oc, ic, inp, false, weight, false, out, true, threads);
}

/// A GPT-2 model: its configuration and its flat parameter buffer.
pub struct Gpt2 {
    pub config: Config,
    pub layout: Layout,
    pub params: Vec<f32>,
}

impl Gpt2 {
    /// A freshly initialised model: N(0, 0.02) matrices, residual projections
    /// N(0, 0.02/sqrt(2L)), zero biases, unit LayerNorm weights.
    pub fn new(config: Config, seed: u64) -> Result<Self, String> {
        config.validate()?;
        let layout = Layout::new(&config);
        let mut params = vec![0.0f32; layout.total];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let std = 0.02f32;
        let proj_std = std / ((2 * config.n_layer) as f32).sqrt();
        for (i, name) in layout.names.iter().enumerate() {
            let view = &mut params[layout.offsets[i]..layout.offsets[i] + layout.len_of(i)];
            if name.ends_with("c_proj.weight") {
                let normal = Normal::new(0.0, proj_std).expect("finite std");
                view.iter_mut().for_each(|x| *x = normal.sample(&mut rng));
            } else if layout.shapes[i].len() == 2 {
                let normal = Normal::new(0.0, std).expect("finite std");
                view.iter_mut().for_each(|x| *x = normal.sample(&mut rng));
            } else if name.contains("ln_") && name.ends_with(".weight") {
                view.fill(1.0);
            }
        }
        Ok(Gpt2 { config, layout, params })
    }

    /// Check a (B, T) batch of token ids (and targets, if given).
    pub fn check_batch(&self, tokens: &[u32], targets: Option<&[u32]>, b: usize, t: usize) -> Result<(), String> {
        if b == 0 || t == 0 {
            return Err(format!("tokens must be a non-empty [B, T] batch, got [{b}, {t}]"));
        }
        if t > self.config.block_size {
            return Err(format!("sequence length T={t} exceeds the model's block_size {}", self.config.block_size));
        }
        if tokens.len() != b * t {
            return Err(format!("tokens has {} ids, expected B*T = {}", tokens.len(), b * t));
        }
        let v = self.config.vocab_size as u32;
        for (what, ids) in [("tokens", Some(tokens)), ("targets", targets)] {
            let Some(ids) = ids else { continue };
            if ids.len() != b * t {
                return Err(format!("{what} has {} ids, expected B*T = {}", ids.len(), b * t));
            }
            if let Some((i, &bad)) = ids.iter().enumerate().find(|(_, &x)| x >= v) {
                return Err(format!("{what}[{}, {}] = {bad} is out of range for vocab_size {v}", i / t, i % t));
            }
        }
        Ok(())
    }

    /// Embedding, blocks and final LayerNorm: fills `acts` up to `lnf`.
    fn forward_body(&self, acts: &mut Activations, tokens: &[u32], threads: usize) {
        let cfg = &self.config;
        let (b, t, c, nh) = (acts.b, acts.t, cfg.n_embd, cfg.n_head);
        let n = b * t;
        let p = named(self.layout.views(&self.params));
        encoder_forward(&mut acts.encoded, tokens, p.wte, p.wpe, b, t, c);
        for l in 0..cfg.n_layer {
            let (prev, rest) = acts.blocks.split_at_mut(l);
            let x: &[f32] = if l == 0 { &acts.encoded } else { &prev[l - 1].residual3 };
            let (a, w) = (&mut rest[0], &p.blocks[l]);
            layernorm_forward(&mut a.ln1, &mut a.ln1_mean, &mut a.ln1_rstd, x, w.ln1w, w.ln1b, n, c);
            matmul_forward(&mut a.qkv, &a.ln1, w.qkvw, Some(w.qkvb), n, c, 3 * c, threads);
            attention_forward(&mut a.atty, &mut a.att, &a.qkv, b, t, c, nh, threads);
            residual_matmul_forward(&mut a.residual2[..n * c], &x[..n * c], &a.atty, w.attprojw, w.attprojb, n, c, c, threads);
            layernorm_forward(&mut a.ln2, &mut a.ln2_mean, &mut a.ln2_rstd, &a.residual2, w.ln2w, w.ln2b, n, c);
            matmul_forward(&mut a.fch, &a.ln2, w.fcw, Some(w.fcb), n, c, 4 * c, threads);
            gelu_forward(&mut a.fch_gelu[..n * 4 * c], &a.fch[..n * 4 * c]);
            residual_matmul_forward(&mut a.residual3[..n * c], &a.residual2[..n * c], &a.fch_gelu, w.fcprojw, w.fcprojb, n, 4 * c, c, threads);
        }
        let last: &[f32] = match acts.blocks.last() {
            Some(a) => &a.residual3,
            None => &acts.encoded,
        };
        layernorm_forward(&mut acts.lnf, &mut acts.lnf_mean, &mut acts.lnf_rstd, last, p.lnfw, p.lnfb, n, c);
    }

    /// Logits for every position.
    ///
    /// tokens: [B, T] -> logits: [B, T, V]
    pub fn forward_logits(&self, acts: &mut Activations, tokens: &[u32], threads: usize) -> Vec<f32> {
        self.forward_body(acts, tokens, threads);
        let (n, c, v) = (acts.b * acts.t, self.config.n_embd, self.config.vocab_size);
        let mut logits = vec![0.0f32; n * v];
        let wte = &self.params[..v * c];
        sgemm(n, v, c, &acts.lnf, false, wte, true, &mut logits, false, threads);
        logits
    }

    /// Summed cross-entropy of the model's logits against `targets`, the
    /// logits computed LOGIT_CHUNK rows at a time. When `grads` is given the
    /// backward pass runs too, accumulating d(dloss * sum of losses)/dparams
    /// into it (pass dloss = 1/N for the gradient of the mean loss).
    ///
    /// tokens, targets: [B, T];  grads: [P] (+=)
    pub fn loss_sum(
        &self,
        acts: &mut Activations,
        tokens: &[u32],
        targets: &[u32],
        grads: Option<&mut [f32]>,
        dloss: f32,
        threads: usize,
    ) -> f64 {
        self.forward_body(acts, tokens, threads);
        let (n, c, v) = (acts.b * acts.t, self.config.n_embd, self.config.vocab_size);
        let wte = &self.params[..v * c];
        let mut grads = grads;
        let mut total = 0.0f64;
        for start in (0..n).step_by(LOGIT_CHUNK) {
            let r = LOGIT_CHUNK.min(n - start);
            let x = &acts.lnf[start * c..(start + r) * c];
            let logits = &mut acts.logits[..r * v];
            sgemm(r, v, c, x, false, wte, true, logits, false, threads);
            total += crossentropy_fused(logits, &targets[start..start + r], dloss, r, v);
            if let Some(g) = grads.as_deref_mut() {
                // dlnf[r, C] = dlogits @ wte;  dwte[V, C] += dlogits^T @ lnf
                sgemm(r, c, v, logits, false, wte, false, &mut acts.dln[start * c..(start + r) * c], false, threads);
                sgemm(v, c, r, logits, true, x, false, &mut g[..v * c], true, threads);
            }
        }
        if let Some(g) = grads {
            self.backward_body(acts, g, tokens, threads);
        }
        total
    }

    /// Backward from dlnf (held in `acts.dln`) to every parameter gradient.
    fn backward_body(&self, acts: &mut Activations, grads: &mut [f32], tokens: &[u32], threads: usize) {
        let cfg = &self.config;
        let (b, t, c, nh) = (acts.b, acts.t, cfg.n_embd, cfg.n_head);
        let n = b * t;
        let p = named(self.layout.views(&self.params));
        let g = named(self.layout.views_mut(grads));
        let Tensors { wte: gwte, wpe: gwpe, blocks: mut gblocks, lnfw: glnfw, lnfb: glnfb } = g;
        let last: &[f32] = match acts.blocks.last() {
            Some(a) => &a.residual3,
            None => &acts.encoded,
        };
        acts.dresidual[..n * c].fill(0.0);
        layernorm_backward(&mut acts.dresidual, glnfw, glnfb, &acts.dln, last, p.lnfw, &acts.lnf_mean, &acts.lnf_rstd, n, c);
        for l in (0..cfg.n_layer).rev() {
            let x: &[f32] = if l == 0 { &acts.encoded } else { &acts.blocks[l - 1].residual3 };
            let a = &acts.blocks[l];
            let (w, gw) = (&p.blocks[l], &mut gblocks[l]);
            // MLP: residual3 = residual2 + fc_proj(gelu(fc(ln2(residual2))))
            acts.dfch_gelu[..n * 4 * c].fill(0.0);
            matmul_backward(&mut acts.dfch_gelu, gw.fcprojw, Some(&mut *gw.fcprojb), &acts.dresidual, &a.fch_gelu, w.fcprojw, n, 4 * c, c, threads);
            acts.dfch[..n * 4 * c].fill(0.0);
            gelu_backward(&mut acts.dfch[..n * 4 * c], &a.fch[..n * 4 * c], &acts.dfch_gelu[..n * 4 * c]);
            acts.dln[..n * c].fill(0.0);
            matmul_backward(&mut acts.dln, gw.fcw, Some(&mut *gw.fcb), &acts.dfch, &a.ln2, w.fcw, n, c, 4 * c, threads);
            layernorm_backward(&mut acts.dresidual, gw.ln2w, gw.ln2b, &acts.dln, &a.residual2, w.ln2w, &a.ln2_mean, &a.ln2_rstd, n, c);
            // attention: residual2 = x + c_proj(attn(c_attn(ln1(x))))
            acts.datty[..n * c].fill(0.0);
            matmul_backward(&mut acts.datty, gw.attprojw, Some(&mut *gw.attprojb), &acts.dresidual, &a.atty, w.attprojw, n, c, c, threads);
            acts.dqkv[..n * 3 * c].fill(0.0);
            attention_backward(&mut acts.dqkv, &acts.datty, &a.qkv, &a.att, b, t, c, nh, threads);
            acts.dln[..n * c].fill(0.0);
            matmul_backward(&mut acts.dln, gw.qkvw, Some(&mut *gw.qkvb), &acts.dqkv, &a.ln1, w.qkvw, n, c, 3 * c, threads);
            layernorm_backward(&mut acts.dresidual, gw.ln1w, gw.ln1b, &acts.dln, x, w.ln1w, &a.ln1_mean, &a.ln1_rstd, n, c);
        }
        encoder_backward(gwte, gwpe, &acts.dresidual, tokens, b, t, c);
    }
}

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
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 15;
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

    fn tiny() -> Config {
        Config { vocab_size: 61, n_embd: 16, n_layer: 2, n_head: 2, block_size: 9 }
    }

    fn batch(cfg: &Config, b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
        let ids: Vec<u32> = (0..b * t + 1).map(|i| ((i as u64 * 7919 + seed * 31) % cfg.vocab_size as u64) as u32).collect();
        (ids[..b * t].to_vec(), ids[1..].to_vec())
    }

    #[test]
    fn parameter_count_matches_the_gpt2_formula() {
        let c = Config { vocab_size: 30000, n_embd: 384, n_layer: 6, n_head: 12, block_size: 128 };
        let (v, e, l, t) = (30000, 384, 6, 128);
        assert_eq!(c.num_parameters(), v * e + t * e + l * (12 * e * e + 13 * e) + 2 * e);
        assert_eq!(Layout::new(&c).total, c.num_parameters());
    }

    #[test]
    fn initial_loss_is_near_log_vocab() {
        let cfg = Config { vocab_size: 500, n_embd: 32, n_layer: 2, n_head: 4, block_size: 16 };
        let m = Gpt2::new(cfg, 1).unwrap();
        let (x, y) = batch(&cfg, 4, 16, 3);
        let mut acts = Activations::new(&cfg, 4, 16);
        let loss = m.loss_sum(&mut acts, &x, &y, None, 0.0, 1) / 64.0;
        assert!((loss - (500f64).ln()).abs() < 0.1, "loss {loss}");
    }

    #[test]
    fn gradients_match_finite_differences_for_every_tensor() {
        let cfg = tiny();
        let mut m = Gpt2::new(cfg, 7).unwrap();
        // larger-than-init weights so every path carries signal
        for (i, x) in m.params.iter_mut().enumerate() {
            *x += 0.05 * (((i * 2654435761) % 1000) as f32 / 500.0 - 1.0);
        }
        let (b, t) = (2, 9);
        let (x, y) = batch(&cfg, b, t, 5);
        let mut acts = Activations::new(&cfg, b, t);
        let mut grads = vec![0.0f32; m.layout.total];
        m.loss_sum(&mut acts, &x, &y, Some(&mut grads), 1.0 / (b * t) as f32, 1);
        let eps = 1e-2f32;
        let layout = m.layout.clone();
        for i in 0..layout.names.len() {
            let (mut diff, mut nn, mut an) = (0.0f64, 0.0f64, 0.0f64);
            for j in layout.offsets[i]..layout.offsets[i] + layout.len_of(i) {
                let orig = m.params[j];
                m.params[j] = orig + eps;
                let lp = m.loss_sum(&mut acts, &x, &y, None, 0.0, 1) / (b * t) as f64;
                m.params[j] = orig - eps;
                let lm = m.loss_sum(&mut acts, &x, &y, None, 0.0, 1) / (b * t) as f64;
                m.params[j] = orig;
                let num = (lp - lm) / (2.0 * eps as f64);
                let ana = grads[j] as f64;
                diff += (num - ana).powi(2);
                nn += num * num;
                an += ana * ana;
            }
            let rel = diff.sqrt() / nn.sqrt().max(an.sqrt()).max(1e-12);
            assert!(rel < 1e-2 && an > 0.0, "{}: relative error {rel:.2e}", layout.names[i]);
        }
    }

    #[test]
    fn threaded_and_serial_passes_agree() {
        let cfg = tiny();
        let m = Gpt2::new(cfg, 3).unwrap();
        let (x, y) = batch(&cfg, 3, 9, 1);
        let mut acts = Activations::new(&cfg, 3, 9);
        let mut g1 = vec![0.0; m.layout.total];
        let mut g4 = vec![0.0; m.layout.total];
        let l1 = m.loss_sum(&mut acts, &x, &y, Some(&mut g1), 1.0, 1);
        let l4 = m.loss_sum(&mut acts, &x, &y, Some(&mut g4), 1.0, 4);
        assert!((l1 - l4).abs() < 1e-4);
        for (a, b) in g1.iter().zip(&g4) {
            assert!((a - b).abs() < 1e-4);
        }
    }

    #[test]
    fn attention_is_causal_through_the_whole_model() {
        let cfg = tiny();
        let m = Gpt2::new(cfg, 2).unwrap();
        let (mut x, _) = batch(&cfg, 1, 9, 4);
        let mut acts = Activations::new(&cfg, 1, 9);
        let before = m.forward_logits(&mut acts, &x, 1);
        x[6] = (x[6] + 1) % 61;
        let after = m.forward_logits(&mut acts, &x, 1);
        let v = cfg.vocab_size;
        assert_eq!(before[..6 * v], after[..6 * v]);
        assert_ne!(before[6 * v..], after[6 * v..]);
    }

    #[test]
    fn adamw_memorises_a_sequence() {
        let cfg = Config { vocab_size: 32, n_embd: 32, n_layer: 2, n_head: 2, block_size: 64 };
        let mut m = Gpt2::new(cfg, 0).unwrap();
        let seq: Vec<u32> = (0..65).map(|i| ((i * 13 + i * i) % 32) as u32).collect();
        let (x, y) = (&seq[..64], &seq[1..]);
        let mut acts = Activations::new(&cfg, 1, 64);
        let mut opt = Optimizer::new(&m.layout);
        let hp = AdamW { lr: 1e-2, weight_decay: 0.0, ..Default::default() };
        let mut loss = f64::INFINITY;
        for _ in 0..300 {
            let mut grads = vec![0.0; m.layout.total];
            loss = m.loss_sum(&mut acts, x, y, Some(&mut grads), 1.0 / 64.0, 1) / 64.0;
            let layout = m.layout.clone();
            opt.update(&layout, &mut m.params, &grads, &hp);
        }
        assert!(loss < 0.05, "final loss {loss}");
    }

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
    fn bad_batches_are_refused_with_the_reason() {
        let m = Gpt2::new(tiny(), 0).unwrap();
        let err = m.check_batch(&[1, 2, 61], None, 1, 3).unwrap_err();
        assert!(err.contains("tokens[0, 2] = 61") && err.contains("vocab_size 61"), "{err}");
        assert!(m.check_batch(&[0; 10], None, 1, 10).unwrap_err().contains("block_size 9"));
        assert!(Gpt2::new(Config { n_head: 3, ..tiny() }, 0).is_err());
    }
}
