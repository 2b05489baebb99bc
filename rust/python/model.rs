//! `Model`: a GPT-2 model for Python (forward, loss and gradients, KV-cache
//! decoding and sampling), `Sampler` (a seeded sampler of its own), and the checks of model shapes and sampling
//! settings that Python asks before it builds anything.

use crate::kernels::bf16::Precision;
use super::convert::{Int, expect_shape, f32_in, ids_in, out, refusal_error, tensor_views, value_error, zeros, Arr};
use crate::memory;
use crate::train::check_threads;
use crate::generate::{decode_step, sample, KvCache, Sampling};
use crate::model::{Activations, Config, Gpt2, WeightUse};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Run `f(threads)` on `pool` when given, else on rayon's global pool.
fn in_pool<R: Send>(pool: &Option<rayon::ThreadPool>, f: impl FnOnce(usize) -> R + Send) -> R {
    match pool {
        Some(pool) => pool.install(|| f(pool.current_num_threads())),
        None => f(rayon::current_num_threads()),
    }
}

/// Refuse a model shape that cannot be built, saying what to change.
#[pyfunction]
pub fn validate_model(vocab_size: Int<usize>, n_embd: Int<usize>, n_layer: Int<usize>, n_head: Int<usize>, block_size: Int<usize>) -> PyResult<()> {
    let (vocab_size, n_embd, n_layer, n_head, block_size) = (vocab_size.0, n_embd.0, n_layer.0, n_head.0, block_size.0);
    Config { vocab_size, n_embd, n_layer, n_head, block_size }.validate().map_err(value_error)
}

/// Refuse sampling settings that cannot draw a token.
#[pyfunction]
#[pyo3(signature = (temperature=1.0, top_k=Int(0), top_p=1.0), text_signature = "(temperature=1.0, top_k=0, top_p=1.0)")]
pub fn validate_sampling(temperature: f32, top_k: Int<usize>, top_p: f32) -> PyResult<()> {
    let top_k = top_k.0;
    Sampling { temperature, top_k, top_p }.validate().map_err(value_error)
}

/// (name, shape) of every parameter tensor of a GPT-2 config, in buffer order.
#[pyfunction]
pub fn parameter_shapes(
    vocab_size: Int<usize>,
    n_embd: Int<usize>,
    n_layer: Int<usize>,
    n_head: Int<usize>,
    block_size: Int<usize>,
) -> PyResult<Vec<(String, Vec<usize>)>> {
    let (vocab_size, n_embd, n_layer, n_head, block_size) = (vocab_size.0, n_embd.0, n_layer.0, n_head.0, block_size.0);
    let cfg = Config { vocab_size, n_embd, n_layer, n_head, block_size };
    cfg.validate().map_err(value_error)?;
    Ok(cfg.parameter_shapes())
}

/// One token per row of logits [M, V], drawn with `rng`.
fn sample_rows(logits: &Bound<'_, PyAny>, sampling: Sampling, rng: &mut ChaCha8Rng) -> PyResult<Vec<u32>> {
    sampling.validate().map_err(value_error)?;
    let l = f32_in(logits, "logits", 2)?;
    let v = l.shape()[1];
    if v == 0 {
        return Err(value_error("logits has no columns"));
    }
    Ok(l.as_slice().chunks(v).map(|row| sample(row, &sampling, rng)).collect())
}

/// A seeded random stream of its own for drawing tokens: one per generated
/// sequence, so that what a sequence draws depends on its seed and stream
/// alone, not on the other sequences decoded beside it (the server's
/// per-request `seed`).
#[pyclass(name = "Sampler", module = "crystalline._core")]
pub struct PySampler {
    rng: ChaCha8Rng,
}

#[pymethods]
impl PySampler {
    /// Streams of one seed are independent of each other (one per choice of a request).
    #[new]
    #[pyo3(signature = (seed=Int(0), stream=Int(0)), text_signature = "(seed=0, stream=0)")]
    fn new(seed: Int<u64>, stream: Int<u64>) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed.0);
        rng.set_stream(stream.0);
        PySampler { rng }
    }

    /// Draw one token per row of logits [M, V]: greedy at temperature 0, else top-k / nucleus (top-p) sampling.
    #[pyo3(signature = (logits, temperature=1.0, top_k=Int(0), top_p=1.0), text_signature = "($self, logits, temperature=1.0, top_k=0, top_p=1.0)")]
    fn sample(&mut self, logits: &Bound<'_, PyAny>, temperature: f32, top_k: Int<usize>, top_p: f32) -> PyResult<Vec<u32>> {
        sample_rows(logits, Sampling { temperature, top_k: top_k.0, top_p }, &mut self.rng)
    }
}

/// A GPT-2 model whose parameters live in one flat float32 buffer in Rust.
#[pyclass(name = "Model", module = "crystalline._core")]
pub struct PyModel {
    model: Gpt2,
    grads: Vec<f32>,
    acts: Option<Activations>,
    cache: Option<KvCache>,
    rng: ChaCha8Rng,
    pool: Option<rayon::ThreadPool>,
}

impl PyModel {
    fn cache_ref(&self) -> PyResult<&KvCache> {
        self.cache.as_ref().ok_or_else(|| value_error("call reset_cache(batch_size) before decoding"))
    }

    fn cache_mut(&mut self) -> PyResult<&mut KvCache> {
        self.cache.as_mut().ok_or_else(|| value_error("call reset_cache(batch_size) before decoding"))
    }

    /// Activations for a (b, t) batch, reallocated (after a memory check)
    /// when the shape changes.
    fn acts_for(&mut self, b: usize, t: usize) -> PyResult<&mut Activations> {
        if !matches!(&self.acts, Some(a) if a.b == b && a.t == t) {
            self.acts = None;
            let floats = Activations::floats(&self.model.config, b, t);
            memory::ensure(memory::f32_bytes(floats), &format!("the activations of a [{b}, {t}] batch")).map_err(refusal_error)?;
            self.acts = Some(Activations::new(&self.model.config, b, t));
        }
        Ok(self.acts.as_mut().expect("just set"))
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
        self.model.check_batch(&ids, tg.as_deref(), b, t).map_err(value_error)?;
        Ok((ids, tg, b, t))
    }

}

#[pymethods]
impl PyModel {
    #[new]
    #[pyo3(
        signature = (vocab_size, n_embd, n_layer, n_head, block_size, seed=Int(0)),
        text_signature = "(vocab_size, n_embd, n_layer, n_head, block_size, seed=0)"
    )]
    fn new(vocab_size: Int<usize>, n_embd: Int<usize>, n_layer: Int<usize>, n_head: Int<usize>, block_size: Int<usize>, seed: Int<u64>) -> PyResult<Self> {
        let (vocab_size, n_embd, n_layer, n_head, block_size, seed) = (vocab_size.0, n_embd.0, n_layer.0, n_head.0, block_size.0, seed.0);
        let cfg = Config { vocab_size, n_embd, n_layer, n_head, block_size };
        cfg.validate().map_err(value_error)?;
        // the parameters and their gradients
        let floats = cfg.num_parameters().checked_mul(2);
        memory::ensure(memory::f32_bytes(floats), "a model with its gradients").map_err(refusal_error)?;
        let model = Gpt2::new(cfg, seed).map_err(value_error)?;
        let grads = zeros(&[model.layout.total], "the gradients")?;
        Ok(PyModel { model, grads, acts: None, cache: None, rng: ChaCha8Rng::seed_from_u64(seed), pool: None })
    }

    /// Run the matmuls in "fp32" or "bf16" (bf16 operands, f32 sums). The
    /// weights are rounded to bf16 now: call again after changing them.
    fn set_precision(&mut self, py: Python<'_>, precision: &str) -> PyResult<()> {
        let p = Precision::parse(precision).map_err(value_error)?;
        let model = &mut self.model;
        py.detach(|| model.set_precision(p, WeightUse::Inference));
        Ok(())
    }

    /// "fp32" or "bf16".
    #[getter]
    fn precision(&self) -> &'static str {
        self.model.precision().name()
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
        memory::ensure(memory::f32_bytes(memory::product(&[b, t, v])), "the logits").map_err(refusal_error)?;
        self.acts_for(b, t)?;
        let PyModel { model, acts, pool, .. } = self;
        let acts = acts.as_mut().expect("allocated");
        let logits = py.detach(|| in_pool(pool, |th| model.forward_logits(acts, &ids, th)));
        Ok(out(py, &[b, t, v], logits))
    }

    /// Mean cross-entropy of the model's logits for tokens [B, T] against targets [B, T].
    fn loss(&mut self, py: Python<'_>, tokens: &Bound<'_, PyAny>, targets: &Bound<'_, PyAny>) -> PyResult<f64> {
        let (ids, tg, b, t) = self.batch(tokens, Some(targets))?;
        let tg = tg.expect("targets given");
        self.acts_for(b, t)?;
        let PyModel { model, acts, pool, .. } = self;
        let acts = acts.as_mut().expect("allocated");
        Ok(py.detach(|| in_pool(pool, |th| model.mean_loss(acts, &ids, &tg, None, th))))
    }

    /// Run this model's work on a private pool of `threads` threads (the
    /// default is rayon's global pool, one thread per core).
    fn set_threads(&mut self, threads: Int<usize>) -> PyResult<()> {
        let threads = threads.0;
        check_threads(threads).map_err(value_error)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| value_error(format!("cannot start {threads} threads: {e}")))?;
        self.pool = Some(pool);
        Ok(())
    }

    /// Start incremental decoding of `batch_size` sequences (an empty key/value
    /// cache for each) and seed the sampler.
    #[pyo3(signature = (batch_size, seed=Int(0)), text_signature = "($self, batch_size, seed=0)")]
    fn reset_cache(&mut self, batch_size: Int<usize>, seed: Int<u64>) -> PyResult<()> {
        let (batch_size, seed) = (batch_size.0, seed.0);
        if batch_size == 0 {
            return Err(value_error("batch_size must be at least 1"));
        }
        self.cache = None;
        let floats = KvCache::floats(&self.model.config, batch_size);
        memory::ensure(memory::f32_bytes(floats), &format!("a key/value cache for {batch_size} sequences")).map_err(refusal_error)?;
        self.cache = Some(KvCache::new(&self.model, batch_size));
        self.rng = ChaCha8Rng::seed_from_u64(seed);
        Ok(())
    }

    /// Positions held in the cache for each sequence.
    fn cache_lengths(&self) -> PyResult<Vec<usize>> {
        Ok(self.cache_ref()?.lens.clone())
    }

    /// Empty sequence `seq`'s cache (to refill it with a slid window).
    fn clear_sequence(&mut self, seq: Int<usize>) -> PyResult<()> {
        let seq = seq.0;
        let cache = self.cache_mut()?;
        if seq >= cache.b {
            return Err(value_error(format!("seq {seq} is outside the cache of {} sequences", cache.b)));
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
        seqs: Vec<Int<usize>>,
        tokens: &Bound<'py, PyAny>,
        want_logits: bool,
    ) -> PyResult<Option<Arr<'py>>> {
        let seqs: Vec<usize> = seqs.into_iter().map(|s| s.0).collect();
        let v = self.model.config.vocab_size;
        let (ids, _) = ids_in(tokens, "tokens", 1, Some(v))?;
        self.cache_ref()?;
        let m = seqs.len();
        // the rows' logits and one block's buffers
        let c = self.model.config.n_embd;
        let floats = memory::product(&[m, v.saturating_add(c.saturating_mul(20))]);
        memory::ensure(memory::f32_bytes(floats), &format!("decoding {m} rows")).map_err(refusal_error)?;
        let PyModel { model, cache, pool, .. } = self;
        let cache = cache.as_mut().expect("checked");
        let logits = py
            .detach(|| in_pool(pool, |th| decode_step(model, cache, &seqs, &ids, want_logits, th)))
            .map_err(value_error)?;
        Ok(want_logits.then(|| out(py, &[m, v], logits)))
    }

    /// Draw one token per row of logits [M, V] with the model's seeded sampler.
    #[pyo3(signature = (logits, temperature=1.0, top_k=Int(0), top_p=1.0), text_signature = "($self, logits, temperature=1.0, top_k=0, top_p=1.0)")]
    fn sample(&mut self, logits: &Bound<'_, PyAny>, temperature: f32, top_k: Int<usize>, top_p: f32) -> PyResult<Vec<u32>> {
        sample_rows(logits, Sampling { temperature, top_k: top_k.0, top_p }, &mut self.rng)
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
            this.acts_for(b, t)?;
            let PyModel { model, grads, acts, pool, .. } = this;
            let acts = acts.as_mut().expect("allocated");
            py.detach(|| {
                grads.fill(0.0);
                in_pool(pool, |th| model.mean_loss(acts, &ids, &tg, Some(grads), th))
            })
        };
        let this = slf.borrow();
        // SAFETY: the gradient buffer is allocated once and never resized.
        Ok((loss, unsafe { tensor_views(slf.as_any(), &this.model.layout, &this.grads) }?))
    }
}
