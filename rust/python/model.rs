//! `Model`: a GPT-2 model for Python (forward, loss and gradients, KV-cache
//! decoding and sampling), and the checks of model shapes and sampling
//! settings that Python asks before it builds anything.

use super::convert::{expect_shape, f32_in, ids_in, out, tensor_views, value_error, Arr};
use crate::generate::{decode_step, sample, KvCache, Sampling};
use crate::model::{Activations, Config, Gpt2};
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
pub fn validate_model(vocab_size: usize, n_embd: usize, n_layer: usize, n_head: usize, block_size: usize) -> PyResult<()> {
    Config { vocab_size, n_embd, n_layer, n_head, block_size }.validate().map_err(value_error)
}

/// Refuse sampling settings that cannot draw a token.
#[pyfunction]
#[pyo3(signature = (temperature=1.0, top_k=0, top_p=1.0))]
pub fn validate_sampling(temperature: f32, top_k: usize, top_p: f32) -> PyResult<()> {
    Sampling { temperature, top_k, top_p }.validate().map_err(value_error)
}

/// (name, shape) of every parameter tensor of a GPT-2 config, in buffer order.
#[pyfunction]
pub fn parameter_shapes(
    vocab_size: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    block_size: usize,
) -> PyResult<Vec<(String, Vec<usize>)>> {
    let cfg = Config { vocab_size, n_embd, n_layer, n_head, block_size };
    cfg.validate().map_err(value_error)?;
    Ok(cfg.parameter_shapes())
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

    fn acts_for(&mut self, b: usize, t: usize) -> &mut Activations {
        if !matches!(&self.acts, Some(a) if a.b == b && a.t == t) {
            self.acts = Some(Activations::new(&self.model.config, b, t));
        }
        self.acts.as_mut().expect("just set")
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
    #[pyo3(signature = (vocab_size, n_embd, n_layer, n_head, block_size, seed=0))]
    fn new(vocab_size: usize, n_embd: usize, n_layer: usize, n_head: usize, block_size: usize, seed: u64) -> PyResult<Self> {
        let cfg = Config { vocab_size, n_embd, n_layer, n_head, block_size };
        let model = Gpt2::new(cfg, seed).map_err(value_error)?;
        let grads = vec![0.0; model.layout.total];
        Ok(PyModel { model, grads, acts: None, cache: None, rng: ChaCha8Rng::seed_from_u64(seed), pool: None })
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
        self.acts_for(b, t);
        let PyModel { model, acts, pool, .. } = self;
        let acts = acts.as_mut().expect("allocated");
        let logits = py.detach(|| in_pool(pool, |th| model.forward_logits(acts, &ids, th)));
        Ok(out(py, &[b, t, v], logits))
    }

    /// Mean cross-entropy of the model's logits for tokens [B, T] against targets [B, T].
    fn loss(&mut self, py: Python<'_>, tokens: &Bound<'_, PyAny>, targets: &Bound<'_, PyAny>) -> PyResult<f64> {
        let (ids, tg, b, t) = self.batch(tokens, Some(targets))?;
        let tg = tg.expect("targets given");
        self.acts_for(b, t);
        let PyModel { model, acts, pool, .. } = self;
        let acts = acts.as_mut().expect("allocated");
        Ok(py.detach(|| in_pool(pool, |th| model.mean_loss(acts, &ids, &tg, None, th))))
    }

    /// Run this model's work on a private pool of `threads` threads (the
    /// default is rayon's global pool, one thread per core).
    fn set_threads(&mut self, threads: usize) -> PyResult<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| value_error(format!("cannot start {threads} threads: {e}")))?;
        self.pool = Some(pool);
        Ok(())
    }

    /// Start incremental decoding of `batch_size` sequences (an empty key/value
    /// cache for each) and seed the sampler.
    #[pyo3(signature = (batch_size, seed=0))]
    fn reset_cache(&mut self, batch_size: usize, seed: u64) -> PyResult<()> {
        if batch_size == 0 {
            return Err(value_error("batch_size must be at least 1"));
        }
        self.cache = Some(KvCache::new(&self.model, batch_size));
        self.rng = ChaCha8Rng::seed_from_u64(seed);
        Ok(())
    }

    /// Positions held in the cache for each sequence.
    fn cache_lengths(&self) -> PyResult<Vec<usize>> {
        Ok(self.cache_ref()?.lens.clone())
    }

    /// Empty sequence `seq`'s cache (to refill it with a slid window).
    fn clear_sequence(&mut self, seq: usize) -> PyResult<()> {
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
        seqs: Vec<usize>,
        tokens: &Bound<'py, PyAny>,
        want_logits: bool,
    ) -> PyResult<Option<Arr<'py>>> {
        let v = self.model.config.vocab_size;
        let (ids, _) = ids_in(tokens, "tokens", 1, Some(v))?;
        self.cache_ref()?;
        let m = seqs.len();
        let PyModel { model, cache, pool, .. } = self;
        let cache = cache.as_mut().expect("checked");
        let logits = py
            .detach(|| in_pool(pool, |th| decode_step(model, cache, &seqs, &ids, want_logits, th)))
            .map_err(value_error)?;
        Ok(want_logits.then(|| out(py, &[m, v], logits)))
    }

    /// Draw one token per row of logits [M, V] with the model's seeded sampler.
    #[pyo3(signature = (logits, temperature=1.0, top_k=0, top_p=1.0))]
    fn sample(&mut self, logits: &Bound<'_, PyAny>, temperature: f32, top_k: usize, top_p: f32) -> PyResult<Vec<u32>> {
        let sampling = Sampling { temperature, top_k, top_p };
        sampling.validate().map_err(value_error)?;
        let l = f32_in(logits, "logits", 2)?;
        let v = l.shape()[1];
        if v == 0 {
            return Err(value_error("logits has no columns"));
        }
        let x = l.as_slice();
        Ok(x.chunks(v).map(|row| sample(row, &sampling, &mut self.rng)).collect())
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
            this.acts_for(b, t);
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
