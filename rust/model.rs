//! The GPT-2 model: configuration, the flat parameter buffer with its named
//! views, activations, the forward pass and the backward pass.
//!
//! Layout follows GPT-2 exactly (Hugging Face tensor names, Conv1D `[in, out]`
//! weights), so checkpoints export to `GPT2LMHeadModel` as they are:
//! wte -> + wpe -> L x [ln_1 -> attn -> + -> ln_2 -> mlp -> +] -> ln_f -> @ wte^T.

use crate::kernels::attention::{attention_backward, attention_forward};
use crate::kernels::crossentropy::{crossentropy_fused, crossentropy_fused_bf16};
use crate::kernels::encoder::{encoder_backward, encoder_forward};
use crate::kernels::gelu::{gelu_backward, gelu_forward};
use crate::kernels::layernorm::{layernorm_backward, layernorm_forward};
use crate::kernels::bf16::{bf16_gemm, bf16_gemm_packed, bf16_hardware, cast_to_bf16, cast_to_bf16_transposed, Operand, Precision};
use crate::kernels::matmul::{matmul_backward, matmul_forward, product, sgemm, Weight, WeightPanels};
use crate::kernels::residual::residual_matmul_forward;
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

/// The most transformer blocks a model may have (GPT-3 has 96): a bound on
/// the tensors a layout lists, so describing a config never exhausts memory.
pub const MAX_LAYERS: usize = 1 << 16;

/// Rows of logits computed at once by the loss: bounds the memory of the
/// output layer to LOGIT_CHUNK x V floats whatever B*T is.
pub const LOGIT_CHUNK: usize = 512;

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
            return Err(format!(
                "n_embd {} is not divisible by n_head {}; choose a head count that divides it (e.g. {})",
                self.n_embd,
                self.n_head,
                divisor_near(self.n_embd, self.n_head)
            ));
        }
        if self.n_layer > MAX_LAYERS {
            return Err(format!("n_layer {} is more than {MAX_LAYERS}", self.n_layer));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(format!("vocab_size {} does not fit token ids in u32", self.vocab_size));
        }
        if self.checked_num_parameters().is_none() {
            return Err(format!(
                "a model with vocab_size {}, n_embd {}, n_layer {}, block_size {} has more parameters than memory can address",
                self.vocab_size, self.n_embd, self.n_layer, self.block_size
            ));
        }
        Ok(())
    }

    /// The parameter count, or None when it overflows (no shape product wraps).
    pub fn checked_num_parameters(&self) -> Option<usize> {
        let (v, c, t) = (self.vocab_size, self.n_embd, self.block_size);
        // per block: 12 C^2 weights + 13 C biases and LayerNorm parameters
        let block = c.checked_mul(c)?.checked_mul(12)?.checked_add(c.checked_mul(13)?)?;
        v.checked_mul(c)?
            .checked_add(t.checked_mul(c)?)?
            .checked_add(block.checked_mul(self.n_layer)?)?
            .checked_add(c.checked_mul(2)?)
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

    /// The parameter count of a validated config.
    pub fn num_parameters(&self) -> usize {
        self.checked_num_parameters().expect("a validated config's parameter count fits")
    }
}

/// The divisor of `n` nearest to `k` (the smaller on a tie), to suggest a
/// head count; searched outwards from `k` for a bounded number of steps.
fn divisor_near(n: usize, k: usize) -> usize {
    if k >= n {
        return n;
    }
    for step in 0..=k.min(1 << 16) {
        if let Some(d) = [k - step, k + step].into_iter().find(|&d| d >= 1 && n % d == 0) {
            return d;
        }
    }
    1
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

    /// Split a flat buffer (of parameters, or of their bf16 copies) into one slice per tensor.
    pub fn views<'a, T>(&self, buf: &'a [T]) -> Vec<&'a [T]> {
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

impl<S: Copy> Block<S> {
    /// The four weight matrices, in the order of `block_matrix_shapes`.
    fn matrices(&self) -> [S; 4] {
        [self.qkvw, self.attprojw, self.fcw, self.fcprojw]
    }
}

/// The shapes [C, OC] of a block's c_attn, attn c_proj, c_fc and mlp c_proj
/// weights, for n_embd c.
fn block_matrix_shapes(c: usize) -> [(usize, usize); 4] {
    [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)]
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

/// Forward-pass buffers of one block on N rows, kept for the backward pass
/// in training and reused layer after layer when decoding.
pub(crate) struct BlockActs {
    ln1: Vec<f32>,           // [N, C]
    ln1_mean: Vec<f32>,      // [N]
    ln1_rstd: Vec<f32>,      // [N]
    qkv: Vec<f32>,           // [N, 3C]
    atty: Vec<f32>,          // [N, C]   attention output before c_proj
    residual2: Vec<f32>,     // [N, C]   x + c_proj(atty)
    ln2: Vec<f32>,           // [N, C]
    ln2_mean: Vec<f32>,      // [N]
    ln2_rstd: Vec<f32>,      // [N]
    fch: Vec<f32>,           // [N, 4C]
    fch_gelu: Vec<f32>,      // [N, 4C]
    pub(crate) residual3: Vec<f32>, // [N, C]   residual2 + mlp.c_proj(fch_gelu): the block's output
}

impl BlockActs {
    /// Floats of one block's buffers for N rows: 16 N C + 4 N.
    const fn floats(n: usize, c: usize) -> usize {
        16 * n * c + 4 * n
    }

    pub(crate) fn zeros(n: usize, c: usize) -> Self {
        let z = |len: usize| vec![0.0f32; len];
        BlockActs {
            ln1: z(n * c),
            ln1_mean: z(n),
            ln1_rstd: z(n),
            qkv: z(n * 3 * c),
            atty: z(n * c),
            residual2: z(n * c),
            ln2: z(n * c),
            ln2_mean: z(n),
            ln2_rstd: z(n),
            fch: z(n * 4 * c),
            fch_gelu: z(n * 4 * c),
            residual3: z(n * c),
        }
    }
}

/// One transformer block, forward, on N rows: the one recipe that training
/// and KV-cache decoding share.
///
/// x -> ln_1 -> c_attn -> attend -> c_proj (+ x) -> ln_2 -> c_fc -> gelu -> c_proj (+) -> a.residual3
///
/// x:      [N, C]
/// a:      the block's buffers for at least N rows (written)
/// w:      the block's parameters
/// mats:   its four matrices as the matmuls read them
/// attend: fills atty [N, C] from qkv [N, 3C]: over each sequence's causal
///         window in training, over the key/value cache when decoding
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_forward(
    a: &mut BlockActs,
    x: &[f32],
    w: &Block<&[f32]>,
    mats: &Matrices,
    n: usize,
    c: usize,
    threads: usize,
    attend: impl FnOnce(&[f32], &mut [f32]),
) {
    let (nc, n3c, n4c) = (n * c, n * 3 * c, n * 4 * c);
    layernorm_forward(&mut a.ln1[..nc], &mut a.ln1_mean[..n], &mut a.ln1_rstd[..n], &x[..nc], w.ln1w, w.ln1b, n, c);
    matmul_forward(&mut a.qkv[..n3c], &a.ln1[..nc], mats.qkv, Some(w.qkvb), n, c, 3 * c, threads);
    attend(&a.qkv[..n3c], &mut a.atty[..nc]);
    residual_matmul_forward(&mut a.residual2[..nc], &x[..nc], &a.atty[..nc], mats.attproj, w.attprojb, n, c, c, threads);
    layernorm_forward(&mut a.ln2[..nc], &mut a.ln2_mean[..n], &mut a.ln2_rstd[..n], &a.residual2[..nc], w.ln2w, w.ln2b, n, c);
    matmul_forward(&mut a.fch[..n4c], &a.ln2[..nc], mats.fc, Some(w.fcb), n, c, 4 * c, threads);
    gelu_forward(&mut a.fch_gelu[..n4c], &a.fch[..n4c]);
    residual_matmul_forward(&mut a.residual3[..nc], &a.residual2[..nc], &a.fch_gelu[..n4c], mats.fcproj, w.fcprojb, n, 4 * c, c, threads);
}

/// A weight matrix as the matmuls read it: its bf16 copy when there is one.
pub(crate) fn matrix<'a>(f32s: &'a [f32], bf16s: Option<&'a [u16]>) -> Operand<'a> {
    bf16s.map_or(Operand::F32(f32s), Operand::Bf16)
}

/// A block's four weight matrices as its matmuls read them (`Gpt2::matrices`).
pub(crate) struct Matrices<'a> {
    qkv: Weight<'a>,
    attproj: Weight<'a>,
    fc: Weight<'a>,
    fcproj: Weight<'a>,
}

/// The matrices' bf16 values packed for training's products, where the CPU
/// has avx512_bf16, in place of the plain bf16 copy: refreshed once per
/// step, then read by every micro-batch's forward and backward.
pub(crate) struct Panels {
    /// The tied embedding as the output layer reads it, [V, C].
    wte: WeightPanels,
    /// Each block's matrices, in the order of `block_matrix_shapes`.
    blocks: Vec<[WeightPanels; 4]>,
}

impl Panels {
    /// Bytes the bf16 weights of a model in bf16 training take: the panels
    /// where the CPU has avx512_bf16, else the plain copy. None when the
    /// count overflows.
    pub fn training_bytes(config: &Config) -> Option<u64> {
        let params = config.checked_num_parameters()? as u64;
        let copy = if bf16_hardware() { 0 } else { params.checked_mul(std::mem::size_of::<u16>() as u64)? };
        let mut block = 0u64;
        // the parameter count fits, so the shapes' 4 x n_embd does
        for (k, n) in block_matrix_shapes(config.n_embd) {
            block = block.checked_add(WeightPanels::bytes_for(k, n)?)?;
        }
        copy.checked_add(WeightPanels::bytes_for(config.n_embd, config.vocab_size)?)?.checked_add(block.checked_mul(config.n_layer as u64)?)
    }

    fn new(p: &Tensors<&[f32]>, c: usize, v: usize) -> Option<Self> {
        let wte = WeightPanels::new(p.wte, true, c, v)?;
        let shapes = block_matrix_shapes(c);
        let mut blocks = Vec::with_capacity(p.blocks.len());
        for b in &p.blocks {
            let m = b.matrices();
            let [qkv, attproj, fc, fcproj] = [0, 1, 2, 3].map(|i| WeightPanels::new(m[i], false, shapes[i].0, shapes[i].1));
            blocks.push([qkv?, attproj?, fc?, fcproj?]);
        }
        Some(Panels { wte, blocks })
    }

    fn repack(&mut self, p: &Tensors<&[f32]>) {
        self.wte.repack(p.wte);
        for (panels, b) in self.blocks.iter_mut().zip(&p.blocks) {
            for (panel, w) in panels.iter_mut().zip(b.matrices()) {
                panel.repack(w);
            }
        }
    }
}

/// Every buffer one forward and backward pass of a (B, T) batch needs.
/// Allocated once per batch shape and reused step after step.
pub struct Activations {
    pub b: usize,
    pub t: usize,
    capacity_rows: usize, // B*T the buffers were sized for
    encoded: Vec<f32>,    // [N, C]
    blocks: Vec<BlockActs>,
    lses: Vec<Vec<f32>>,  // per block [B, NH, T] log-sum-exp of each attention row
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
        Activations {
            b,
            t,
            capacity_rows: n,
            encoded: z(n * c),
            blocks: (0..config.n_layer).map(|_| BlockActs::zeros(n, c)).collect(),
            lses: (0..config.n_layer).map(|_| z(n * nh)).collect(),
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

    /// Floats `Activations::new(config, b, t)` allocates, or None when the
    /// count overflows: the estimate that memory planning uses.
    pub fn floats(config: &Config, b: usize, t: usize) -> Option<usize> {
        let (c, nh, v) = (config.n_embd, config.n_head, config.vocab_size);
        let n = b.checked_mul(t)?;
        let nc = n.checked_mul(c)?;
        // per block: its BlockActs and the log-sum-exp of each attention row
        let block = BlockActs::floats(n, c).checked_add(n.checked_mul(nh)?)?;
        // encoded, lnf and the backward scratch (1+1+1+1+1+3+4+4 = 16 N C), lnf's statistics
        let rest = nc.checked_mul(16)?.checked_add(2 * n)?;
        let logits = LOGIT_CHUNK.min(n).checked_mul(v)?;
        block.checked_mul(config.n_layer)?.checked_add(rest)?.checked_add(logits)
    }

    /// Reuse these buffers for a (b, t) batch when they are large enough,
    /// else reallocate. Buffers are used from their start, so a smaller
    /// batch runs in the memory of a larger one.
    pub fn fit(&mut self, config: &Config, b: usize, t: usize) {
        if b * t <= self.capacity_rows {
            self.b = b;
            self.t = t;
        } else {
            *self = Activations::new(config, b, t);
        }
    }
}

/// A GPT-2 model: its configuration and its flat parameter buffer.
pub struct Gpt2 {
    pub config: Config,
    pub layout: Layout,
    pub params: Vec<f32>,
    /// How the matmuls multiply.
    precision: Precision,
    /// [P] the parameters rounded to bf16, which the matmuls read in bf16
    /// unless `panels` holds them (None in fp32). Refreshed by `cast_weights`.
    pub bf16: Option<Vec<u16>>,
    /// How `bf16` lays out the blocks' matrices.
    weight_use: WeightUse,
    /// In bf16 training on avx512_bf16, the matrices rounded and packed for
    /// the products, in place of the plain copy. Refreshed by `cast_weights`.
    panels: Option<Panels>,
}

/// What a model's bf16 weights are laid out for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightUse {
    /// Training: refreshed after every step, so cast in the parameters'
    /// layout, and on avx512_bf16 packed for the products (`Panels`)
    /// instead of copied.
    Training,
    /// Generating and evaluating: cast once, with the blocks' matrices
    /// transposed, [OC, C], so that decoding, which reads every weight for
    /// each token, reads each output's weights as one contiguous run
    /// (`few_rows`). On the seed config this made a decode step about 1.5x
    /// as fast as with the training layout.
    Inference,
}

impl Gpt2 {
    /// A freshly initialised model: N(0, 0.02) matrices, residual projections
    /// N(0, 0.02/sqrt(2L)), zero biases, unit LayerNorm weights.
    pub fn new(config: Config, seed: u64) -> Result<Self, String> {
        config.validate()?;
        let layout = Layout::new(&config);
        let mut params = crate::memory::zeros(&[layout.total], "the model's parameters").map_err(|e| e.to_string())?;
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
        Ok(Gpt2 { config, layout, params, precision: Precision::Fp32, bf16: None, weight_use: WeightUse::Training, panels: None })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Run the matmuls in `precision` from now on (weights cast now, laid
    /// out for `weight_use`).
    pub fn set_precision(&mut self, precision: Precision, weight_use: WeightUse) {
        (self.precision, self.weight_use) = (precision, weight_use);
        let (c, v) = (self.config.n_embd, self.config.vocab_size);
        self.panels = match (precision, weight_use) {
            (Precision::Bf16, WeightUse::Training) => Panels::new(&named(self.layout.views(&self.params)), c, v),
            _ => None,
        };
        self.bf16 = match precision {
            Precision::Bf16 if self.panels.is_none() => Some(vec![0; self.layout.total]),
            _ => None,
        };
        self.cast_weights();
    }

    /// Block l's four matrices as its matmuls read them: packed in bf16
    /// training (on avx512_bf16), else the bf16 copy laid out for its use
    /// (`cast_weights`), else the float32 parameters.
    pub(crate) fn matrices(&self, l: usize) -> Matrices<'_> {
        let w = named(self.layout.views(&self.params)).blocks.swap_remove(l).matrices();
        let w16 = self.tensors16().map(|mut h| h.blocks.swap_remove(l).matrices());
        let panels = self.panels.as_ref().map(|p| &p.blocks[l]);
        let transposed = self.weight_use == WeightUse::Inference;
        let pick = |i: usize| match (panels, w16) {
            (Some(p), _) => Weight { values: Operand::F32(w[i]), transposed: false, panels: Some(&p[i]) },
            (None, Some(h)) => Weight { values: Operand::Bf16(h[i]), transposed, panels: None },
            (None, None) => Weight::from(w[i]),
        };
        Matrices { qkv: pick(0), attproj: pick(1), fc: pick(2), fcproj: pick(3) }
    }

    /// Round the parameters into their bf16 copy or panels (after they
    /// change; a no-op in fp32), the blocks' matrices transposed for inference.
    pub fn cast_weights(&mut self) {
        if let Some(panels) = &mut self.panels {
            return panels.repack(&named(self.layout.views(&self.params)));
        }
        let Some(h) = &mut self.bf16 else { return };
        if self.weight_use == WeightUse::Training {
            return cast_to_bf16(h, &self.params);
        }
        let layout = &self.layout;
        for (i, name) in layout.names.iter().enumerate() {
            let range = layout.offsets[i]..layout.offsets[i] + layout.len_of(i);
            match layout.shapes[i][..] {
                [rows, cols] if name.starts_with("h.") => cast_to_bf16_transposed(&mut h[range.clone()], &self.params[range], rows, cols),
                _ => cast_to_bf16(&mut h[range.clone()], &self.params[range]),
            }
        }
    }

    /// The bf16 copies of the tensors, by name, when running in bf16.
    fn tensors16(&self) -> Option<Tensors<&[u16]>> {
        self.bf16.as_deref().map(|h| named(self.layout.views(h)))
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
            let lse = &mut acts.lses[l];
            block_forward(&mut rest[0], x, &p.blocks[l], &self.matrices(l), n, c, threads, |qkv, atty| {
                attention_forward(atty, lse, qkv, b, t, c, nh, threads)
            });
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
        matmul_forward(&mut logits, &acts.lnf, self.head(), None, n, c, v, threads);
        logits
    }

    /// The output layer's weight (the tied embedding, [V, C]) as its
    /// products read it.
    pub(crate) fn head(&self) -> Weight<'_> {
        let vc = self.config.vocab_size * self.config.n_embd;
        let values = matrix(&self.params[..vc], self.bf16.as_ref().map(|h| &h[..vc]));
        Weight { values, transposed: true, panels: self.panels.as_ref().map(|p| &p.wte) }
    }

    /// Mean cross-entropy of a (B, T) batch; with `grads`, also accumulates
    /// the mean loss's gradient into it.
    ///
    /// tokens, targets: [B, T];  grads: [P] (+=)
    pub fn mean_loss(&self, acts: &mut Activations, tokens: &[u32], targets: &[u32], grads: Option<&mut [f32]>, threads: usize) -> f64 {
        let n = acts.b * acts.t;
        self.loss_sum(acts, tokens, targets, grads, 1.0 / n as f32, threads) / n as f64
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
        let head = self.head();
        let mut grads = grads;
        let mut total = 0.0f64;
        for start in (0..n).step_by(LOGIT_CHUNK) {
            let r = LOGIT_CHUNK.min(n - start);
            let x = &acts.lnf[start * c..(start + r) * c];
            let logits = &mut acts.logits[..r * v];
            matmul_forward(logits, x, head, None, r, c, v, threads);
            let targets = &targets[start..start + r];
            let dln = &mut acts.dln[start * c..(start + r) * c];
            // dlnf[r, C] = dlogits @ wte;  dwte[V, C] += dlogits^T @ lnf
            match (grads.as_deref_mut(), self.precision) {
                (None, _) => total += crossentropy_fused(logits, targets, dloss, r, v),
                (Some(g), Precision::Fp32) => {
                    total += crossentropy_fused(logits, targets, dloss, r, v);
                    product(r, c, v, logits, false, head.values, false, dln, false, threads);
                    sgemm(v, c, r, logits, true, x, false, &mut g[..v * c], true, threads);
                }
                (Some(g), Precision::Bf16) => {
                    let (loss, dlogits) = crossentropy_fused_bf16(logits, targets, dloss, r, v);
                    total += loss;
                    match head.panels {
                        Some(p) => bf16_gemm_packed(r, c, v, Operand::Bf16(dlogits), false, &p.backward, dln, false, threads),
                        None => bf16_gemm(r, c, v, Operand::Bf16(dlogits), false, head.values, false, dln, false, threads),
                    }
                    bf16_gemm(v, c, r, Operand::Bf16(dlogits), true, Operand::F32(x), false, &mut g[..v * c], true, threads);
                }
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
            let (a, lse) = (&acts.blocks[l], &acts.lses[l]);
            let (w, gw) = (&p.blocks[l], &mut gblocks[l]);
            let mats = self.matrices(l);
                    // MLP: residual3 = residual2 + fc_proj(gelu(fc(ln2(residual2))))
            acts.dfch_gelu[..n * 4 * c].fill(0.0);
            matmul_backward(&mut acts.dfch_gelu, gw.fcprojw, Some(&mut *gw.fcprojb), &acts.dresidual, &a.fch_gelu, mats.fcproj, n, 4 * c, c, threads);
            acts.dfch[..n * 4 * c].fill(0.0);
            gelu_backward(&mut acts.dfch[..n * 4 * c], &a.fch[..n * 4 * c], &acts.dfch_gelu[..n * 4 * c]);
            acts.dln[..n * c].fill(0.0);
            matmul_backward(&mut acts.dln, gw.fcw, Some(&mut *gw.fcb), &acts.dfch, &a.ln2, mats.fc, n, c, 4 * c, threads);
            layernorm_backward(&mut acts.dresidual, gw.ln2w, gw.ln2b, &acts.dln, &a.residual2, w.ln2w, &a.ln2_mean, &a.ln2_rstd, n, c);
            // attention: residual2 = x + c_proj(attn(c_attn(ln1(x))))
            acts.datty[..n * c].fill(0.0);
            matmul_backward(&mut acts.datty, gw.attprojw, Some(&mut *gw.attprojb), &acts.dresidual, &a.atty, mats.attproj, n, c, c, threads);
            acts.dqkv[..n * 3 * c].fill(0.0);
            attention_backward(&mut acts.dqkv, &acts.datty, &a.qkv, &a.atty, lse, b, t, c, nh, threads);
            acts.dln[..n * c].fill(0.0);
            matmul_backward(&mut acts.dln, gw.qkvw, Some(&mut *gw.qkvb), &acts.dqkv, &a.ln1, mats.qkv, n, c, 3 * c, threads);
            layernorm_backward(&mut acts.dresidual, gw.ln1w, gw.ln1b, &acts.dln, x, w.ln1w, &a.ln1_mean, &a.ln1_rstd, n, c);
        }
        encoder_backward(gwte, gwpe, &acts.dresidual, tokens, b, t, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::adamw::AdamW;
    use crate::kernels::gradcheck::check_grad;
    use crate::optim::Optimizer;
    use std::cell::RefCell;

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

    /// Check the gradient of the mean loss over a [b, t] batch against
    /// central differences, for every tensor whose name `checked` accepts.
    fn check_model_gradients(cfg: Config, b: usize, t: usize, checked: impl Fn(&str) -> bool) {
        let mut m = Gpt2::new(cfg, 7).unwrap();
        // larger-than-init weights so every path carries signal
        for (i, x) in m.params.iter_mut().enumerate() {
            *x += 0.05 * (((i * 2654435761) % 1000) as f32 / 500.0 - 1.0);
        }
        let (x, y) = batch(&cfg, b, t, 5);
        let mut acts = Activations::new(&cfg, b, t);
        let mut grads = vec![0.0f32; m.layout.total];
        m.mean_loss(&mut acts, &x, &y, Some(&mut grads), 1);
        let base = m.params.clone();
        let layout = m.layout.clone();
        let (model, acts) = (RefCell::new(m), RefCell::new(acts));
        for i in (0..layout.names.len()).filter(|&i| checked(&layout.names[i])) {
            let r = layout.offsets[i]..layout.offsets[i] + layout.len_of(i);
            check_grad(&layout.names[i], &base[r.clone()], &grads[r.clone()], |tensor| {
                let mut m = model.borrow_mut();
                m.params[r.clone()].copy_from_slice(tensor);
                let loss = m.mean_loss(&mut acts.borrow_mut(), &x, &y, None, 1);
                m.params[r.clone()].copy_from_slice(&base[r.clone()]);
                loss
            });
        }
    }

    #[test]
    fn gradients_match_finite_differences_for_every_tensor() {
        check_model_gradients(tiny(), 2, 9, |_| true);
    }

    #[test]
    fn gradients_match_finite_differences_across_several_logit_chunks() {
        // 3 x 400 = 1200 rows: two full LOGIT_CHUNKs and a partial one, through the
        // tensors the chunked output layer feeds (wte directly, ln_f through dlnf)
        let cfg = Config { block_size: 400, n_layer: 1, ..tiny() };
        assert!(3 * 400 > 2 * LOGIT_CHUNK && (3 * 400) % LOGIT_CHUNK != 0);
        check_model_gradients(cfg, 3, 400, |name| name == "wte.weight" || name.starts_with("ln_f."));
    }

    #[test]
    fn bf16_loss_and_gradients_stay_near_fp32() {
        // On CPUs without avx512_bf16 this runs the emulated bf16 product.
        let cfg = Config { vocab_size: 300, n_embd: 32, n_layer: 2, n_head: 4, block_size: 16 };
        let mut m = Gpt2::new(cfg, 9).unwrap();
        let (x, y) = batch(&cfg, 4, 16, 2);
        let mut acts = Activations::new(&cfg, 4, 16);
        let mut run = |m: &Gpt2| {
            let mut g = vec![0.0f32; m.layout.total];
            (m.mean_loss(&mut acts, &x, &y, Some(&mut g), 2), g)
        };
        let (l32, g32) = run(&m);
        // both layouts of the bf16 copy: the blocks' matrices as stored, and transposed
        for weight_use in [WeightUse::Training, WeightUse::Inference] {
            m.set_precision(Precision::Bf16, weight_use);
            assert_eq!(m.precision(), Precision::Bf16);
            let (l16, g16) = run(&m);
            assert_ne!(l16, l32, "bf16 must change the rounding");
            assert!((l16 - l32).abs() <= 1e-2 * l32, "{weight_use:?}: loss {l16} vs {l32}");
            let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let diff: Vec<f32> = g16.iter().zip(&g32).map(|(a, b)| a - b).collect();
            assert!(norm(&diff) <= 2e-2 * norm(&g32), "{weight_use:?}: gradient relative error {}", norm(&diff) / norm(&g32));
        }
        m.set_precision(Precision::Fp32, WeightUse::Training);
        assert_eq!(run(&m).0, l32, "fp32 again is the plain float32 pass");
    }

    #[test]
    fn bf16_training_reads_the_weights_as_last_cast() {
        // a step changes the parameters, then casts them (and repacks the
        // panels the products read where the CPU has avx512_bf16)
        let cfg = Config { vocab_size: 300, n_embd: 32, n_layer: 2, n_head: 4, block_size: 16 };
        let (x, y) = batch(&cfg, 4, 16, 3);
        let run = |m: &Gpt2| {
            let (mut acts, mut g) = (Activations::new(&cfg, 4, 16), vec![0.0f32; m.layout.total]);
            (m.mean_loss(&mut acts, &x, &y, Some(&mut g), 2), g)
        };
        let mut stepped = Gpt2::new(cfg, 9).unwrap();
        stepped.set_precision(Precision::Bf16, WeightUse::Training);
        stepped.params.iter_mut().for_each(|p| *p *= 1.5);
        stepped.cast_weights();
        let mut fresh = Gpt2::new(cfg, 9).unwrap();
        fresh.params.clone_from(&stepped.params);
        fresh.set_precision(Precision::Bf16, WeightUse::Training);
        let ((l1, g1), (l2, g2)) = (run(&stepped), run(&fresh));
        assert_eq!(l1.to_bits(), l2.to_bits(), "loss {l1} vs {l2}");
        assert!(g1.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()), "the gradients differ");
    }

    #[test]
    fn bf16_weight_estimate_is_what_is_allocated() {
        // n_embd 40: the packed matrices' widths are not multiples of a panel
        let cfg = Config { vocab_size: 301, n_embd: 40, n_layer: 3, n_head: 4, block_size: 16 };
        let mut m = Gpt2::new(cfg, 1).unwrap();
        m.set_precision(Precision::Bf16, WeightUse::Training);
        let copy = m.bf16.as_ref().map_or(0, |h| h.len() * 2);
        let panels = m.panels.as_ref().map_or(0, |p| p.wte.bytes() + p.blocks.iter().flatten().map(WeightPanels::bytes).sum::<usize>());
        assert_eq!(m.panels.is_some(), crate::kernels::bf16::bf16_hardware());
        assert_eq!(Panels::training_bytes(&cfg), Some((copy + panels) as u64));
        let huge = Config { vocab_size: usize::MAX / 4, ..cfg };
        assert_eq!(Panels::training_bytes(&huge), None);
    }

    #[test]
    fn activation_estimate_is_what_is_allocated() {
        let cfg = Config { vocab_size: 300, n_embd: 24, n_layer: 3, n_head: 4, block_size: 16 };
        for (b, t) in [(1, 1), (2, 16), (40, 5)] {
            let a = Activations::new(&cfg, b, t);
            let blocks: usize = a.blocks.iter().map(|k| {
                [&k.ln1, &k.ln1_mean, &k.ln1_rstd, &k.qkv, &k.atty, &k.residual2, &k.ln2, &k.ln2_mean, &k.ln2_rstd, &k.fch, &k.fch_gelu, &k.residual3]
                    .iter().map(|v| v.len()).sum::<usize>()
            }).sum();
            let rest: usize = [&a.encoded, &a.lnf, &a.lnf_mean, &a.lnf_rstd, &a.logits, &a.dresidual, &a.dln, &a.datty, &a.dqkv, &a.dfch, &a.dfch_gelu]
                .iter().map(|v| v.len()).sum::<usize>() + a.lses.iter().map(|v| v.len()).sum::<usize>();
            assert_eq!(Activations::floats(&cfg, b, t), Some(blocks + rest), "b={b} t={t}");
        }
        assert_eq!(Activations::floats(&cfg, usize::MAX / 2, 16), None);
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
            loss = m.mean_loss(&mut acts, x, y, Some(&mut grads), 1);
            let layout = m.layout.clone();
            opt.update(&layout, &mut m.params, &grads, &hp);
        }
        assert!(loss < 0.05, "final loss {loss}");
    }

    #[test]
    fn bad_batches_are_refused_with_the_reason() {
        let m = Gpt2::new(tiny(), 0).unwrap();
        let err = m.check_batch(&[1, 2, 61], None, 1, 3).unwrap_err();
        assert!(err.contains("tokens[0, 2] = 61") && err.contains("vocab_size 61"), "{err}");
        assert!(m.check_batch(&[0; 10], None, 1, 10).unwrap_err().contains("block_size 9"));
        assert!(Gpt2::new(Config { n_head: 3, ..tiny() }, 0).err().unwrap().contains("e.g. 2"));
        let huge = Config { n_embd: 1 << 33, ..tiny() };
        assert!(huge.validate().unwrap_err().contains("more parameters"));
    }
}
