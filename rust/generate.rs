//! Inference: incremental decoding with a key/value cache, and sampling.
//!
//! Each decode step feeds one new token to each of a set of sequences and
//! runs every layer on those rows only, attending to the keys and values
//! cached for the earlier positions, so generating n tokens costs n steps,
//! not n full passes over the context.

use crate::kernels::attention::{attention_decode_forward, attention_prefill_forward};
use crate::kernels::encoder::encoder_forward;
use crate::kernels::layernorm::layernorm_forward;
use crate::kernels::matmul::matmul_forward;
use crate::model::{block_forward, named, BlockActs, Config, Gpt2};
use crate::kernels::vecmath::{self, simd_dispatch};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

simd_dispatch! {
    /// The largest element of a row (-inf when empty or all NaN), 16 lanes at a time.
    fn row_max(xs: &[f32]) -> f32 => vecmath::max
}

/// Keys and values of every layer for B sequences of up to T_max positions.
///
/// k, v: [L, B, T_max, C]  (head h uses channels h*hs..(h+1)*hs)
/// lens: [B]               (positions filled per sequence)
pub struct KvCache {
    pub b: usize,
    pub lens: Vec<usize>,
    k: Vec<f32>,
    v: Vec<f32>,
    t_max: usize,
    c: usize,
}

impl KvCache {
    /// Floats of the keys and values for `b` sequences (None on overflow).
    pub fn floats(config: &Config, b: usize) -> Option<usize> {
        crate::memory::product(&[2, config.n_layer, b, config.block_size, config.n_embd])
    }

    pub fn new(model: &Gpt2, b: usize) -> Self {
        let cfg = &model.config;
        let size = cfg.n_layer * b * cfg.block_size * cfg.n_embd;
        KvCache { b, lens: vec![0; b], k: vec![0.0; size], v: vec![0.0; size], t_max: cfg.block_size, c: cfg.n_embd }
    }

    fn at(&self, layer: usize, seq: usize, pos: usize) -> usize {
        ((layer * self.b + seq) * self.t_max + pos) * self.c
    }

    /// Forget sequence `seq` (to refill it, e.g. with a slid window).
    pub fn clear(&mut self, seq: usize) {
        self.lens[seq] = 0;
    }
}

/// Feed tokens to sequences and return the next-token logits of each row.
///
/// seqs:   [M] sequence indices into the cache; a sequence listed k times
///         receives k consecutive positions in one step (a prompt's prefill)
/// tokens: [M] the token of each row, at the sequence's next free position
/// returns [M, V] logits when `want_logits` (else empty: a prefill step)
pub fn decode_step(
    model: &Gpt2,
    cache: &mut KvCache,
    seqs: &[usize],
    tokens: &[u32],
    want_logits: bool,
    threads: usize,
) -> Result<Vec<f32>, String> {
    let cfg = &model.config;
    let (m, c, v, nh) = (seqs.len(), cfg.n_embd, cfg.vocab_size, cfg.n_head);
    if tokens.len() != m {
        return Err(format!("{} tokens for {m} sequences", tokens.len()));
    }
    // The position of each row: its sequence's length plus the rows of the
    // same sequence before it.
    let mut next = cache.lens.clone();
    let mut positions = Vec::with_capacity(m);
    for (&s, &tok) in seqs.iter().zip(tokens) {
        if s >= cache.b {
            return Err(format!("sequence {s} is outside the cache of {} sequences", cache.b));
        }
        if next[s] >= cache.t_max {
            return Err(format!("sequence {s} has filled the block size {}; slide its window first", cache.t_max));
        }
        if tok as usize >= v {
            return Err(format!("token {tok} is out of range for vocab_size {v}"));
        }
        positions.push(next[s]);
        next[s] += 1;
    }
    let p = named(model.layout.views(&model.params));
    // x[m] = wte[token] + wpe[pos]
    let mut x = vec![0.0f32; m * c];
    for (i, (&pos, &tok)) in positions.iter().zip(tokens).enumerate() {
        encoder_forward(&mut x[i * c..(i + 1) * c], &[tok], p.wte, &p.wpe[pos * c..], 1, 1, c);
    }
    let mut a = BlockActs::zeros(m, c);
    for (l, w) in p.blocks.iter().enumerate() {
        let cache = &mut *cache;
        block_forward(&mut a, &x, w, &model.matrices(l), m, c, threads, |qkv, atty| {
            for (i, (&s, &pos)) in seqs.iter().zip(&positions).enumerate() {
                let at = cache.at(l, s, pos);
                cache.k[at..at + c].copy_from_slice(&qkv[i * 3 * c + c..i * 3 * c + 2 * c]);
                cache.v[at..at + c].copy_from_slice(&qkv[i * 3 * c + 2 * c..(i + 1) * 3 * c]);
            }
            attend(cache, l, seqs, &positions, qkv, atty, nh, threads);
        });
        std::mem::swap(&mut x, &mut a.residual3);
    }
    cache.lens = next;
    if !want_logits {
        return Ok(Vec::new());
    }
    let (mut ln, mut mean, mut rstd) = (vec![0.0; m * c], vec![0.0; m], vec![0.0; m]);
    layernorm_forward(&mut ln, &mut mean, &mut rstd, &x, p.lnfw, p.lnfb, m, c);
    let mut logits = vec![0.0f32; m * v];
    matmul_forward(&mut logits, &ln, model.head(), None, m, c, v, threads);
    Ok(logits)
}

/// Causal attention of each new row over its sequence's cache up to its own
/// position. A run of rows that continues one sequence (a prompt's prefill)
/// goes through the tiled kernel, its heads and query blocks in parallel;
/// lone rows (decoding) run in parallel with each other.
///
/// qkv:       [M, 3C] (the new rows; their k and v are already in the cache)
/// positions: [M]     (each row's position in its sequence)
/// atty:      [M, C]  (written)
#[allow(clippy::too_many_arguments)]
fn attend(
    cache: &KvCache,
    layer: usize,
    seqs: &[usize],
    positions: &[usize],
    qkv: &[f32],
    atty: &mut [f32],
    nh: usize,
    threads: usize,
) {
    let c = cache.c;
    let mut lone = vec![false; seqs.len()];
    let mut start = 0;
    while start < seqs.len() {
        let (s, offset) = (seqs[start], positions[start]);
        let len = (start..seqs.len()).take_while(|&i| seqs[i] == s && positions[i] == offset + (i - start)).count();
        if len == 1 {
            lone[start] = true;
        } else {
            let (lo, hi) = (cache.at(layer, s, 0), cache.at(layer, s, offset + len));
            let out = &mut atty[start * c..(start + len) * c];
            attention_prefill_forward(out, &qkv[start * 3 * c..], 3 * c, &cache.k[lo..hi], &cache.v[lo..hi], offset, len, c, nh, threads);
        }
        start += len;
    }
    // Fewer lone rows than threads (one sequence decoding): the threads
    // share a row's heads, each taking an equal group of them.
    let hs = c / nh;
    let heads = if seqs.len() < threads { (1..=nh.div_ceil(threads)).rev().find(|&g| nh.is_multiple_of(g)).unwrap_or(1) } else { nh };
    let work = |(task, out): (usize, &mut [f32])| {
        let (i, first_head) = (task * heads / nh, task * heads % nh);
        if !lone[i] {
            return;
        }
        let len = positions[i] + 1; // including the row's own position
        let (lo, hi) = (cache.at(layer, seqs[i], 0), cache.at(layer, seqs[i], len));
        let mut scores = vec![0.0f32; heads * len];
        let q = &qkv[i * 3 * c..i * 3 * c + c];
        attention_decode_forward(out, q, &cache.k[lo..hi], &cache.v[lo..hi], &mut scores, len, c, nh, first_head);
    };
    if threads > 1 {
        atty.par_chunks_mut(heads * hs).enumerate().for_each(work);
    } else {
        atty.chunks_mut(c).enumerate().for_each(work);
    }
}

/// How to pick the next token from logits.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the k most probable tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most probable tokens whose probability
    /// reaches top_p (1: all).
    pub top_p: f32,
}

impl Sampling {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// The candidate tokens and their probabilities under `sampling`, most
/// probable first (one token with probability 1 when greedy).
pub fn candidates(logits: &[f32], sampling: &Sampling) -> Vec<(u32, f32)> {
    if sampling.temperature == 0.0 {
        // the first largest logit (0 when none is above -inf, NaN included)
        let max = row_max(logits);
        let argmax = if max > f32::NEG_INFINITY { logits.iter().position(|&x| x == max).unwrap_or(0) } else { 0 };
        return vec![(argmax as u32, 1.0)];
    }
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    // most probable first; ties by token id so the order is deterministic
    let cmp = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if sampling.top_k > 0 && sampling.top_k < order.len() {
        // only the k best need sorting
        order.select_nth_unstable_by(sampling.top_k - 1, cmp);
        order.truncate(sampling.top_k);
    }
    order.sort_unstable_by(cmp);
    let max = logits[order[0] as usize];
    let mut probs: Vec<f32> = order.iter().map(|&t| ((logits[t as usize] - max) / sampling.temperature).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if sampling.top_p < 1.0 {
        let mut cum = 0.0;
        let keep = probs.iter().position(|&p| {
            cum += p;
            cum >= sampling.top_p
        });
        let keep = keep.map_or(probs.len(), |i| i + 1);
        order.truncate(keep);
        probs.truncate(keep);
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    order.into_iter().zip(probs).collect()
}

/// Draw the next token from `logits` [V].
pub fn sample(logits: &[f32], sampling: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let cands = candidates(logits, sampling);
    if cands.len() == 1 {
        return cands[0].0;
    }
    let r: f32 = rng.random();
    let mut cum = 0.0;
    for &(tok, p) in &cands {
        cum += p;
        if r < cum {
            return tok;
        }
    }
    cands.last().expect("at least one candidate").0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Activations;
    use rand::SeedableRng;

    #[test]
    fn cached_decoding_matches_the_full_forward_pass_at_every_position() {
        let cfg = Config { vocab_size: 61, n_embd: 16, n_layer: 2, n_head: 4, block_size: 12 };
        let m = Gpt2::new(cfg, 3).unwrap();
        let seqs: Vec<Vec<u32>> = vec![(0..12).map(|i| (i * 7 + 1) % 61).collect(), (0..9).map(|i| (i * 5 + 3) % 61).collect()];
        let mut cache = KvCache::new(&m, 2);
        for (s, seq) in seqs.iter().enumerate() {
            let mut acts = Activations::new(&cfg, 1, seq.len());
            let full = m.forward_logits(&mut acts, seq, 1);
            for (pos, &tok) in seq.iter().enumerate() {
                // the second sequence on 3 threads: its 4 heads split among them, 2 a task
                let got = decode_step(&m, &mut cache, &[s], &[tok], true, 1 + 2 * s).unwrap();
                let want = &full[pos * 61..(pos + 1) * 61];
                for (a, b) in got.iter().zip(want) {
                    assert!((a - b).abs() < 1e-4, "seq {s} pos {pos}: {a} vs {b}");
                }
            }
        }
        assert!(decode_step(&m, &mut cache, &[0], &[1], true, 1).unwrap_err().contains("block size"));
    }

    #[test]
    fn bf16_decoding_matches_the_bf16_full_pass() {
        // 20 rows: the full pass takes the packed product, decoding the few-rows one
        let cfg = Config { vocab_size: 61, n_embd: 32, n_layer: 2, n_head: 2, block_size: 20 };
        let mut m = Gpt2::new(cfg, 4).unwrap();
        let seq: Vec<u32> = (0..20).map(|i| (i * 7 + 1) % 61).collect();
        let mut acts = Activations::new(&cfg, 1, 20);
        let full32 = m.forward_logits(&mut acts, &seq, 1);
        m.set_precision(crate::kernels::bf16::Precision::Bf16, crate::model::WeightUse::Inference);
        let full = m.forward_logits(&mut acts, &seq, 2);
        assert_ne!(full, full32, "bf16 must change the rounding");
        let mut cache = KvCache::new(&m, 1);
        for (pos, &tok) in seq.iter().enumerate() {
            let got = decode_step(&m, &mut cache, &[0], &[tok], true, 2).unwrap();
            for (a, b) in got.iter().zip(&full[pos * 61..(pos + 1) * 61]) {
                // the same bf16 products, summed in another order
                assert!((a - b).abs() < 1e-4, "pos {pos}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_whole_prompt_in_one_step_matches_token_by_token() {
        let cfg = Config { vocab_size: 61, n_embd: 16, n_layer: 2, n_head: 2, block_size: 12 };
        let m = Gpt2::new(cfg, 5).unwrap();
        let prompt: Vec<u32> = (0..7).map(|i| (i * 11 + 2) % 61).collect();
        let (mut a, mut b) = (KvCache::new(&m, 2), KvCache::new(&m, 2));
        // sequence 1 gets the whole prompt in one call, sequence 0 one token
        let toks: Vec<u32> = std::iter::once(3).chain(prompt.iter().copied()).collect();
        let together = decode_step(&m, &mut a, &[0, 1, 1, 1, 1, 1, 1, 1], &toks, true, 2).unwrap();
        assert_eq!(a.lens, vec![1, 7]);
        let mut last = Vec::new();
        for &tok in &prompt {
            last = decode_step(&m, &mut b, &[1], &[tok], true, 1).unwrap();
        }
        for (x, y) in together[7 * 61..].iter().zip(&last) {
            assert!((x - y).abs() < 1e-4);
        }
        assert!(decode_step(&m, &mut a, &[1; 6], &[1; 6], false, 1).unwrap_err().contains("block size"));
    }

    #[test]
    fn a_long_prompt_after_a_cached_prefix_matches_the_full_forward_pass() {
        // 150 rows in one call: past the tiled kernel's query and key blocks
        let cfg = Config { vocab_size: 61, n_embd: 16, n_layer: 2, n_head: 2, block_size: 200 };
        let m = Gpt2::new(cfg, 6).unwrap();
        let seq: Vec<u32> = (0..160).map(|i| (i * i + 3 * i + 1) % 61).collect();
        let mut acts = Activations::new(&cfg, 1, seq.len());
        let full = m.forward_logits(&mut acts, &seq, 1);
        let mut cache = KvCache::new(&m, 2);
        decode_step(&m, &mut cache, &[1; 10], &seq[..10], false, 1).unwrap();
        // sequence 0 decodes one token alongside sequence 1's 150-token prefill
        let mut seqs = vec![0];
        seqs.extend([1; 150]);
        let toks: Vec<u32> = std::iter::once(5).chain(seq[10..].iter().copied()).collect();
        let got = decode_step(&m, &mut cache, &seqs, &toks, true, 2).unwrap();
        assert_eq!(cache.lens, vec![1, 160]);
        for (pos, row) in (10..160).zip(got[61..].chunks(61)) {
            for (a, b) in row.iter().zip(&full[pos * 61..(pos + 1) * 61]) {
                assert!((a - b).abs() < 1e-4, "position {pos}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn batched_and_threaded_steps_agree_with_single_ones() {
        let cfg = Config { vocab_size: 700, n_embd: 32, n_layer: 2, n_head: 4, block_size: 16 };
        let m = Gpt2::new(cfg, 1).unwrap();
        let (mut a, mut b) = (KvCache::new(&m, 3), KvCache::new(&m, 3));
        for step in 0..5u32 {
            let toks = [step, step * 3 + 1, step * 7 + 2];
            let together = decode_step(&m, &mut a, &[0, 1, 2], &toks, true, 4).unwrap();
            for s in 0..3 {
                let alone = decode_step(&m, &mut b, &[s], &[toks[s]], true, 1).unwrap();
                for (x, y) in together[s * 700..(s + 1) * 700].iter().zip(&alone) {
                    assert!((x - y).abs() < 1e-4);
                }
            }
        }
    }

    #[test]
    fn top_k_and_top_p_never_leave_their_set() {
        // probabilities 0.5, 0.25, 0.125, 0.0625, ... over 8 tokens, shuffled
        let logits: Vec<f32> = [3, 0, 6, 1, 5, 2, 7, 4].iter().map(|&r| -(r as f32) * std::f32::consts::LN_2).collect();
        let top = |k: usize, p: f32| {
            let c = candidates(&logits, &Sampling { temperature: 1.0, top_k: k, top_p: p });
            let mut toks: Vec<u32> = c.iter().map(|x| x.0).collect();
            toks.sort_unstable();
            toks
        };
        assert_eq!(top(2, 1.0), vec![1, 3]);
        assert_eq!(top(0, 0.5), vec![1]);
        assert_eq!(top(0, 0.7), vec![1, 3]);
        assert_eq!(top(0, 0.8), vec![1, 3, 5]);
        assert_eq!(top(3, 0.9), vec![1, 3, 5]);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..2000 {
            let t = sample(&logits, &Sampling { temperature: 1.0, top_k: 0, top_p: 0.8 }, &mut rng);
            assert!([1, 3, 5].contains(&t));
        }
        assert_eq!(sample(&logits, &Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 }, &mut rng), 1);
        assert!(Sampling { temperature: -1.0, top_k: 0, top_p: 1.0 }.validate().is_err());
        assert!(Sampling { temperature: 1.0, top_k: 0, top_p: 0.0 }.validate().is_err());
    }

    #[test]
    fn greedy_takes_the_first_largest_logit() {
        let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 };
        let pick = |logits: &[f32]| candidates(logits, &greedy)[0].0;
        let mut logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 * 0.01).collect();
        logits[517] = 5.0;
        logits[900] = 5.0; // a tie: the first wins
        assert_eq!(pick(&logits), 517);
        logits[3] = f32::NAN; // NaN is never the largest
        assert_eq!(pick(&logits), 517);
        logits[999] = f32::INFINITY;
        assert_eq!(pick(&logits), 999);
        assert_eq!(pick(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(pick(&[f32::NAN, f32::NEG_INFINITY, f32::NAN]), 0);
        assert_eq!(pick(&[f32::NEG_INFINITY, -1e30, 2.0, 2.0]), 2);
    }
}
