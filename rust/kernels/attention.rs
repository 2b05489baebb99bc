//! Causal multi-head self-attention over a fused qkv buffer, tiled in the
//! manner of FlashAttention (Dao et al., 2022, and its second version).
//!
//! Scores are formed one block of BR queries by BC keys at a time, and an
//! online softmax folds each block into the output, so a head's [T, T]
//! probabilities never exist: the forward pass keeps the output and each
//! row's log-sum-exp, and the backward pass recomputes the probabilities
//! block by block from them. Blocks wholly above the diagonal are never
//! visited, which halves the work. The matmuls inside a block are GEMMs on
//! strided views of `qkv` (no head is copied out), and each task owns the
//! outputs it writes, so results do not depend on the thread count.

use super::matmul::gemm_strided;
use super::vecmath::{self, simd_dispatch};
use rayon::prelude::*;
use std::ops::Range;

/// Query rows per block.
const BR: usize = 128;
/// Keys per block: a BR x BC score block (64 KiB) and the block's keys and
/// values stay in L2.
const BC: usize = 128;

/// A raw pointer that may cross threads; each task touches a disjoint set
/// of elements through it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// One head's rows in a strided buffer: element (r, d) at `ptr + r * rs + d`.
#[derive(Clone, Copy)]
struct Rows {
    ptr: *const f32,
    rs: usize,
}

impl Rows {
    /// The rows from `r` on.
    unsafe fn from(self, r: usize) -> *const f32 {
        self.ptr.add(r * self.rs)
    }
}

/// Run `f(i)` for i in 0..n, on the calling thread or the current rayon
/// pool, with a per-thread scratch value made by `init`.
fn for_each_task<S>(n: usize, threads: usize, init: impl Fn() -> S + Sync + Send, f: impl Fn(&mut S, usize) + Sync + Send) {
    if threads <= 1 {
        let mut s = init();
        (0..n).for_each(|i| f(&mut s, i));
    } else {
        (0..n).into_par_iter().for_each_init(init, f);
    }
}

/// The number of keys of row `r` (counted from a block's first row) that lie
/// inside a block of `nc` keys, when the block's first row may see `lim0`
/// of them (row r sees lim0 + r: causality).
#[inline(always)]
fn visible(lim0: isize, r: usize, nc: usize) -> usize {
    (lim0 + r as isize).clamp(0, nc as isize) as usize
}

simd_dispatch! {
    /// Fold a block of scores into each row's running softmax: the scores
    /// become e^(s - m) (zero where masked), m the running row maximum, l
    /// the running sum of e^(s - m), and acc (the running output) is
    /// rescaled to the new maximum.
    ///
    /// s:   [nr, nc]  (in: scores; out: unnormalised probabilities)
    /// acc: [nr, hs]
    /// m, l: [nr]
    /// lim0: keys of the block the first row sees (see `visible`)
    #[allow(clippy::too_many_arguments)]
    fn online_softmax(s: &mut [f32], acc: &mut [f32], m: &mut [f32], l: &mut [f32], nr: usize, nc: usize, hs: usize, lim0: isize)
        => online_softmax_body
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn online_softmax_body(s: &mut [f32], acc: &mut [f32], m: &mut [f32], l: &mut [f32], nr: usize, nc: usize, hs: usize, lim0: isize) {
    for r in 0..nr {
        let row = &mut s[r * nc..(r + 1) * nc];
        let n = visible(lim0, r, nc);
        let m_new = vecmath::max(&row[..n]).max(m[r]);
        if m_new == f32::NEG_INFINITY {
            row.fill(0.0); // nothing visible yet
            continue;
        }
        let alpha = if m[r] == f32::NEG_INFINITY { 0.0 } else { vecmath::exp(m[r] - m_new) };
        l[r] = l[r] * alpha + vecmath::exp_shifted_sum(&mut row[..n], m_new);
        row[n..].fill(0.0);
        acc[r * hs..(r + 1) * hs].iter_mut().for_each(|x| *x *= alpha);
        m[r] = m_new;
    }
}

simd_dispatch! {
    /// Recompute a block's probabilities from each row's log-sum-exp.
    ///
    /// s:   [nr, nc]  (in: scaled scores; out: probabilities, zero where masked)
    /// lse: [nr]
    fn probabilities(s: &mut [f32], lse: &[f32], nr: usize, nc: usize, lim0: isize) => probabilities_body
}

#[inline(always)]
fn probabilities_body(s: &mut [f32], lse: &[f32], nr: usize, nc: usize, lim0: isize) {
    for r in 0..nr {
        let row = &mut s[r * nc..(r + 1) * nc];
        let n = visible(lim0, r, nc);
        row[..n].iter_mut().for_each(|x| *x = vecmath::exp(*x - lse[r]));
        row[n..].fill(0.0);
    }
}

simd_dispatch! {
    /// Softmax backward on a block: ds = scale * p * (dp - delta) per row,
    /// where delta = sum_j p_j dp_j of the whole row = dot(dout, out).
    ///
    /// dp:    [nr, nc]  (in: dL/dp; out: dL/d(scores before scaling))
    /// p:     [nr, nc]
    /// delta: [nr]
    fn softmax_block_backward(dp: &mut [f32], p: &[f32], delta: &[f32], nr: usize, nc: usize, scale: f32)
        => softmax_block_backward_body
}

#[inline(always)]
fn softmax_block_backward_body(dp: &mut [f32], p: &[f32], delta: &[f32], nr: usize, nc: usize, scale: f32) {
    for r in 0..nr {
        let (d, pr) = (&mut dp[r * nc..(r + 1) * nc], &p[r * nc..(r + 1) * nc]);
        for (x, &pp) in d.iter_mut().zip(pr) {
            *x = scale * pp * (*x - delta[r]);
        }
    }
}

simd_dispatch! {
    /// delta[r] = dot(dout[r], out[r]) for one head's rows.
    ///
    /// delta: [T]; dout, out: [T, hs] with row stride ld
    fn row_dots(delta: &mut [f32], dout: &[f32], out: &[f32], hs: usize, ld: usize) => row_dots_body
}

#[inline(always)]
fn row_dots_body(delta: &mut [f32], dout: &[f32], out: &[f32], hs: usize, ld: usize) {
    for (r, d) in delta.iter_mut().enumerate() {
        *d = vecmath::dot(&dout[r * ld..r * ld + hs], &out[r * ld..r * ld + hs]);
    }
}

/// Per-thread scratch of the forward pass.
struct ForwardScratch {
    s: Vec<f32>,   // [BR, BC] one block of scores
    acc: Vec<f32>, // [BR, hs] the running output
    m: Vec<f32>,   // [BR]
    l: Vec<f32>,   // [BR]
}

impl ForwardScratch {
    fn new(hs: usize) -> Self {
        ForwardScratch { s: vec![0.0; BR * BC], acc: vec![0.0; BR * hs], m: vec![0.0; BR], l: vec![0.0; BR] }
    }
}

/// Attention of one head's query rows `rows` (at positions offset + r) over
/// the keys and values of positions 0..offset + rows.end.
///
/// out: [rows, hs]  (written, row stride ldo)
/// lse: [rows]      (written: log-sum-exp of each row's scaled scores), or none
/// q:   [rows.end, hs];  k, v: [offset + rows.end, hs]
///
/// # Safety
/// Every row the views and `out` reach must be inside live allocations, and
/// `out` must not be read or written by another thread.
#[allow(clippy::too_many_arguments)]
unsafe fn forward_rows(
    out: *mut f32,
    ldo: usize,
    lse: Option<&mut [f32]>,
    q: Rows,
    k: Rows,
    v: Rows,
    rows: Range<usize>,
    offset: usize,
    hs: usize,
    sc: &mut ForwardScratch,
) {
    let scale = 1.0 / (hs as f32).sqrt();
    let (r0, nr) = (rows.start, rows.len());
    let keys = offset + rows.end;
    let acc = &mut sc.acc[..nr * hs];
    acc.fill(0.0);
    sc.m[..nr].fill(f32::NEG_INFINITY);
    sc.l[..nr].fill(0.0);
    for c0 in (0..keys).step_by(BC) {
        let nc = BC.min(keys - c0);
        let s = &mut sc.s[..nr * nc];
        // s[nr, nc] = scale * q[rows] @ k[c0..c0+nc]^T
        gemm_strided(nr, nc, hs, s.as_mut_ptr(), nc as isize, false, q.from(r0), q.rs as isize, 1, k.from(c0), 1, k.rs as isize, scale, 1);
        let lim0 = (offset + r0 + 1) as isize - c0 as isize;
        online_softmax(s, acc, &mut sc.m[..nr], &mut sc.l[..nr], nr, nc, hs, lim0);
        // acc[nr, hs] += p[nr, nc] @ v[c0..c0+nc]
        gemm_strided(nr, hs, nc, acc.as_mut_ptr(), hs as isize, true, s.as_ptr(), nc as isize, 1, v.from(c0), v.rs as isize, 1, 1.0, 1);
    }
    for r in 0..nr {
        // every row sees at least its own key, so l > 0
        let inv = 1.0 / sc.l[r];
        let o = std::slice::from_raw_parts_mut(out.add(r * ldo), hs);
        for (o, a) in o.iter_mut().zip(&acc[r * hs..(r + 1) * hs]) {
            *o = a * inv;
        }
    }
    if let Some(lse) = lse {
        for ((x, m), l) in lse[..nr].iter_mut().zip(&sc.m).zip(&sc.l) {
            *x = m + l.ln();
        }
    }
}

/// out = softmax(mask(q k^T / sqrt(hs))) v, per head, tiled
///
/// out: [B, T, C]    (written; head h fills channels h*hs..(h+1)*hs)
/// lse: [B, NH, T]   (written: log-sum-exp of each row's scaled, masked scores)
/// qkv: [B, T, 3C]   (q, k, v concatenated on the channel axis)
/// hs = C / NH; tasks are (batch, head, query block)
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize, threads: usize) {
    assert_eq!(c % nh, 0, "attention: C={c} not divisible by NH={nh}");
    assert!(out.len() >= b * t * c && lse.len() >= b * nh * t && qkv.len() >= b * t * 3 * c);
    let hs = c / nh;
    let blocks = t.div_ceil(BR);
    let (out_p, lse_p) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    for_each_task(b * nh * blocks, threads, || ForwardScratch::new(hs), |sc, i| {
        let (out_p, lse_p) = (out_p, lse_p);
        let (bh, blk) = (i / blocks, i % blocks);
        let (bi, h) = (bh / nh, bh % nh);
        let rows = blk * BR..t.min((blk + 1) * BR);
        // SAFETY: this task alone writes out[bi, rows, head h] and lse[bi, h, rows];
        // the asserts above keep every view inside its buffer.
        unsafe {
            let base = qkv.as_ptr().add(bi * t * 3 * c + h * hs);
            let (q, k, v) = (Rows { ptr: base, rs: 3 * c }, Rows { ptr: base.add(c), rs: 3 * c }, Rows { ptr: base.add(2 * c), rs: 3 * c });
            let o = out_p.0.add((bi * t + rows.start) * c + h * hs);
            let l = std::slice::from_raw_parts_mut(lse_p.0.add(bh * t + rows.start), rows.len());
            forward_rows(o, c, Some(l), q, k, v, rows, 0, hs, sc);
        }
    });
}

/// Backward of `attention_forward`: recomputes each block's probabilities
/// from `lse`; tasks are (batch, head), each owning its head's gradients.
///
/// dqkv: [B, T, 3C]  (+=)
/// dout: [B, T, C]
/// qkv:  [B, T, 3C]
/// out:  [B, T, C]   (from the forward pass)
/// lse:  [B, NH, T]  (from the forward pass)
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    threads: usize,
) {
    assert_eq!(c % nh, 0, "attention: C={c} not divisible by NH={nh}");
    assert!(dqkv.len() >= b * t * 3 * c && qkv.len() >= b * t * 3 * c);
    assert!(dout.len() >= b * t * c && out.len() >= b * t * c && lse.len() >= b * nh * t);
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let dqkv_p = SendPtr(dqkv.as_mut_ptr());
    // scratch: two score blocks [BR, BC] (p, then dp) and delta [T]
    let init = || (vec![0.0f32; BR * BC], vec![0.0f32; BR * BC], vec![0.0f32; t]);
    for_each_task(b * nh, threads, init, |(p, dp, delta), bh| {
        let dqkv_p = dqkv_p;
        let (bi, h) = (bh / nh, bh % nh);
        let lse = &lse[bh * t..(bh + 1) * t];
        let ob = bi * t * c + h * hs;
        row_dots(delta, &dout[ob..], &out[ob..], hs, c);
        // SAFETY: this task alone writes dqkv[bi, :, {q,k,v} channels of head h];
        // the asserts above keep every view inside its buffer.
        unsafe {
            let base = bi * t * 3 * c + h * hs;
            let ld = 3 * c;
            let (q, k, v) = (qkv.as_ptr().add(base), qkv.as_ptr().add(base + c), qkv.as_ptr().add(base + 2 * c));
            let (dq, dk, dv) = (dqkv_p.0.add(base), dqkv_p.0.add(base + c), dqkv_p.0.add(base + 2 * c));
            let d = dout.as_ptr().add(ob);
            for c0 in (0..t).step_by(BC) {
                let c1 = t.min(c0 + BC);
                // query blocks from the one holding row c0: rows before c0 see none of these keys
                for r0 in ((c0 / BR) * BR..t).step_by(BR) {
                    let r1 = t.min(r0 + BR);
                    let (nr, nc) = (r1 - r0, c1.min(r1) - c0);
                    let lim0 = (r0 + 1) as isize - c0 as isize;
                    let (p, dp) = (&mut p[..nr * nc], &mut dp[..nr * nc]);
                    // p[nr, nc] = softmax rows of scale * q[r0..r1] @ k[c0..c0+nc]^T
                    gemm_strided(nr, nc, hs, p.as_mut_ptr(), nc as isize, false, q.add(r0 * ld), ld as isize, 1, k.add(c0 * ld), 1, ld as isize, scale, 1);
                    probabilities(p, &lse[r0..r1], nr, nc, lim0);
                    // dv[c0.., hs] += p^T @ dout[r0..r1]
                    gemm_strided(nc, hs, nr, dv.add(c0 * ld), ld as isize, true, p.as_ptr(), 1, nc as isize, d.add(r0 * c), c as isize, 1, 1.0, 1);
                    // dp[nr, nc] = dout[r0..r1] @ v[c0..]^T, then the softmax backward
                    gemm_strided(nr, nc, hs, dp.as_mut_ptr(), nc as isize, false, d.add(r0 * c), c as isize, 1, v.add(c0 * ld), 1, ld as isize, 1.0, 1);
                    softmax_block_backward(dp, p, &delta[r0..r1], nr, nc, scale);
                    // dk[c0.., hs] += ds^T @ q[r0..r1];  dq[r0.., hs] += ds @ k[c0..]
                    gemm_strided(nc, hs, nr, dk.add(c0 * ld), ld as isize, true, dp.as_ptr(), 1, nc as isize, q.add(r0 * ld), ld as isize, 1, 1.0, 1);
                    gemm_strided(nr, hs, nc, dq.add(r0 * ld), ld as isize, true, dp.as_ptr(), nc as isize, 1, k.add(c0 * ld), ld as isize, 1, 1.0, 1);
                }
            }
        }
    });
}

/// Causal attention of `tq` new rows of one sequence over its cached keys
/// and values (a prompt's prefill): the rows sit at positions
/// offset..offset+tq, and the cache holds positions 0..offset+tq, theirs
/// included. Tasks are (head, query block).
///
/// out:  [tq, C]           (written)
/// q:    [tq, C]           (row stride ldq: the rows' queries)
/// k, v: [offset + tq, C]  (the cached keys and values)
#[allow(clippy::too_many_arguments)]
pub fn attention_prefill_forward(
    out: &mut [f32],
    q: &[f32],
    ldq: usize,
    k: &[f32],
    v: &[f32],
    offset: usize,
    tq: usize,
    c: usize,
    nh: usize,
    threads: usize,
) {
    assert_eq!(c % nh, 0, "attention: C={c} not divisible by NH={nh}");
    if tq == 0 {
        return;
    }
    let keys = offset + tq;
    assert!(out.len() >= tq * c && ldq >= c && q.len() >= (tq - 1) * ldq + c && k.len() >= keys * c && v.len() >= keys * c);
    let hs = c / nh;
    let blocks = tq.div_ceil(BR);
    let out_p = SendPtr(out.as_mut_ptr());
    for_each_task(nh * blocks, threads, || ForwardScratch::new(hs), |sc, i| {
        let out_p = out_p;
        let (h, blk) = (i / blocks, i % blocks);
        let rows = blk * BR..tq.min((blk + 1) * BR);
        // SAFETY: this task alone writes out[rows, head h]; the assert above
        // keeps every view inside its buffer.
        unsafe {
            let q = Rows { ptr: q.as_ptr().add(h * hs), rs: ldq };
            let (k, v) = (Rows { ptr: k.as_ptr().add(h * hs), rs: c }, Rows { ptr: v.as_ptr().add(h * hs), rs: c });
            forward_rows(out_p.0.add(rows.start * c + h * hs), c, None, q, k, v, rows, offset, hs, sc);
        }
    });
}

simd_dispatch! {
    /// One new row attending to the cached keys and values of its sequence
    /// (KV-cache decoding; the causal mask is implicit: the cache holds only
    /// positions up to the row's own, which comes last), in heads
    /// first_head.. as many as `out` holds (so that one row's heads can be
    /// split across threads). The cache is read position by position, each
    /// position's heads in one contiguous run and a few positions ahead
    /// prefetched, so that it streams from memory.
    ///
    /// out:    [H * hs]  (written; head first_head + i fills i*hs..(i+1)*hs)
    /// q:      [C]       (the row's query)
    /// k, v:   [len, C]  (cached keys and values of positions 0..len)
    /// scores: [H, len]  (scratch)
    /// hs = C / NH
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_forward(
        out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], scores: &mut [f32], len: usize, c: usize, nh: usize,
        first_head: usize,
    ) => attention_decode_forward_body
}

/// How many cached positions ahead decoding's attention prefetches: the
/// cache is evicted by the weights each step streams, and on the seed
/// config 4 ahead made a bf16 decode step about 15% faster (2, 8 and 16
/// less so).
const PREFETCH_ROWS: usize = 4;

/// Ask for xs[at..at + len] to be brought into cache, a line (16 floats) at
/// a time; nothing past the end of xs.
#[inline(always)]
fn prefetch_row(xs: &[f32], at: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for i in (at..(at + len).min(xs.len())).step_by(16) {
        // SAFETY: i < xs.len(); a prefetch changes no memory and cannot fault.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(xs.as_ptr().add(i) as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (xs, at, len);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attention_decode_forward_body(
    out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], scores: &mut [f32], len: usize, c: usize, nh: usize,
    first_head: usize,
) {
    let hs = c / nh;
    let (heads, lo) = (out.len() / hs, first_head * hs);
    let width = heads * hs;
    let scale = 1.0 / (hs as f32).sqrt();
    let (q, scores) = (&q[lo..lo + width], &mut scores[..heads * len]);
    for j in 0..len {
        prefetch_row(k, (j + PREFETCH_ROWS) * c + lo, width);
        let row = &k[j * c + lo..j * c + lo + width];
        for (h, (qh, kh)) in q.chunks_exact(hs).zip(row.chunks_exact(hs)).enumerate() {
            scores[h * len + j] = vecmath::dot(qh, kh) * scale;
        }
    }
    // each head's softmax, as weights
    for s in scores.chunks_exact_mut(len) {
        let max = vecmath::max(s);
        let inv = 1.0 / vecmath::exp_shifted_sum(s, max);
        s.iter_mut().for_each(|a| *a *= inv);
    }
    out.fill(0.0);
    for j in 0..len {
        prefetch_row(v, (j + PREFETCH_ROWS) * c + lo, width);
        let row = &v[j * c + lo..j * c + lo + width];
        for (h, (o, vh)) in out.chunks_exact_mut(hs).zip(row.chunks_exact(hs)).enumerate() {
            let a = scores[h * len + j];
            for (oo, vv) in o.iter_mut().zip(vh) {
                *oo += a * vv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::{check_grad, rand_vec};

    /// Untiled attention in f64, straight from the definition: (out [B, T, C],
    /// lse [B, NH, T], dqkv [B, T, 3C] for the upstream gradient `dout`).
    fn reference(qkv: &[f32], dout: &[f32], b: usize, t: usize, c: usize, nh: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let hs = c / nh;
        let scale = 1.0 / (hs as f64).sqrt();
        let (mut out, mut lse, mut dqkv) = (vec![0.0; b * t * c], vec![0.0; b * nh * t], vec![0.0; b * t * 3 * c]);
        let at = |bi: usize, ti: usize, part: usize, h: usize, d: usize| (bi * t + ti) * 3 * c + part * c + h * hs + d;
        for bi in 0..b {
            for h in 0..nh {
                for i in 0..t {
                    let s: Vec<f64> = (0..=i).map(|j| (0..hs).map(|d| qkv[at(bi, i, 0, h, d)] as f64 * qkv[at(bi, j, 1, h, d)] as f64).sum::<f64>() * scale).collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = s.iter().map(|x| (x - max).exp()).sum();
                    lse[(bi * nh + h) * t + i] = max + sum.ln();
                    let p: Vec<f64> = s.iter().map(|x| (x - max).exp() / sum).collect();
                    let o = (bi * t + i) * c + h * hs;
                    for d in 0..hs {
                        out[o + d] = (0..=i).map(|j| p[j] * qkv[at(bi, j, 2, h, d)] as f64).sum();
                    }
                    // backward of this row: dp_j = dout . v_j, ds_j = p_j (dp_j - sum p dp)
                    let dp: Vec<f64> = (0..=i).map(|j| (0..hs).map(|d| dout[o + d] as f64 * qkv[at(bi, j, 2, h, d)] as f64).sum()).collect();
                    let pdp: f64 = (0..=i).map(|j| p[j] * dp[j]).sum();
                    for j in 0..=i {
                        let ds = p[j] * (dp[j] - pdp) * scale;
                        for d in 0..hs {
                            dqkv[at(bi, j, 2, h, d)] += p[j] * dout[o + d] as f64;
                            dqkv[at(bi, i, 0, h, d)] += ds * qkv[at(bi, j, 1, h, d)] as f64;
                            dqkv[at(bi, j, 1, h, d)] += ds * qkv[at(bi, i, 0, h, d)] as f64;
                        }
                    }
                }
            }
        }
        (out, lse, dqkv)
    }

    fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
        }
    }

    /// Forward and backward at `threads`: (out, lse, dqkv).
    fn tiled(qkv: &[f32], dout: &[f32], b: usize, t: usize, c: usize, nh: usize, threads: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (mut out, mut lse, mut dqkv) = (vec![0.0; b * t * c], vec![0.0; b * nh * t], vec![0.0; b * t * 3 * c]);
        attention_forward(&mut out, &mut lse, qkv, b, t, c, nh, threads);
        attention_backward(&mut dqkv, dout, qkv, &out, &lse, b, t, c, nh, threads);
        (out, lse, dqkv)
    }

    #[test]
    fn tiled_attention_matches_the_untiled_reference_at_block_edges() {
        // T=1, below one block, not a multiple of BR or BC, exactly BC, several blocks; NH=1 and several heads
        for (i, &(b, t, c, nh)) in [(2, 1, 8, 2), (1, 37, 8, 1), (2, BR + 1, 12, 3), (1, BC, 16, 2), (1, 2 * BC + BR + 5, 8, 1)].iter().enumerate() {
            let qkv: Vec<f32> = rand_vec(b * t * 3 * c, 10 + i as u64).iter().map(|x| 3.0 * x).collect();
            let dout = rand_vec(b * t * c, 20 + i as u64);
            let (out, lse, dqkv) = reference(&qkv, &dout, b, t, c, nh);
            let (o, l, d) = tiled(&qkv, &dout, b, t, c, nh, 1);
            assert_close("out", &o, &out, 1e-5);
            assert_close("lse", &l, &lse, 1e-5);
            assert_close("dqkv", &d, &dqkv, 1e-4);
        }
    }

    #[test]
    fn every_thread_count_gives_the_same_bits() {
        // tasks fall to threads differently on every run and thread count; results must not move
        let (b, t, c, nh) = (2, 3 * BR + 7, 16, 4);
        let qkv = rand_vec(b * t * 3 * c, 5);
        let dout = rand_vec(b * t * c, 6);
        let want = tiled(&qkv, &dout, b, t, c, nh, 1);
        for threads in [2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for _ in 0..3 {
                let got = pool.install(|| tiled(&qkv, &dout, b, t, c, nh, threads));
                assert!(got.0.iter().zip(&want.0).all(|(x, y)| x.to_bits() == y.to_bits()), "out at {threads} threads");
                assert!(got.1.iter().zip(&want.1).all(|(x, y)| x.to_bits() == y.to_bits()), "lse at {threads} threads");
                assert!(got.2.iter().zip(&want.2).all(|(x, y)| x.to_bits() == y.to_bits()), "dqkv at {threads} threads");
            }
        }
    }

    #[test]
    fn attention_gradients_match_finite_differences() {
        // T past one query block and one key block, so the gradient crosses blocks
        for (b, t, c, nh, threads) in [(2, 4, 6, 2, 1), (1, 1, 4, 1, 1), (1, BC + 3, 4, 1, 2)] {
            let qkv = rand_vec(b * t * 3 * c, 2);
            let w = rand_vec(b * t * c, 3);
            let loss = |qkv: &[f32]| {
                let (mut out, mut lse) = (vec![0.0; b * t * c], vec![0.0; b * nh * t]);
                attention_forward(&mut out, &mut lse, qkv, b, t, c, nh, 1);
                out.iter().zip(&w).map(|(o, w)| (*o as f64) * (*w as f64)).sum::<f64>()
            };
            let (_, _, dqkv) = tiled(&qkv, &w, b, t, c, nh, threads);
            if t == 1 {
                // one key: out is its v, so q and k have no gradient (to rounding)
                assert!(dqkv.iter().enumerate().all(|(i, &g)| (i % (3 * c) < 2 * c) == (g.abs() < 1e-6)));
            }
            check_grad("qkv", &qkv, &dqkv, loss);
        }
    }

    #[test]
    fn prefill_after_a_cached_prefix_matches_the_full_attention() {
        let (t, c, nh) = (BR + BC + 9, 8, 2);
        let qkv = rand_vec(t * 3 * c, 4);
        let (mut out, mut lse) = (vec![0.0; t * c], vec![0.0; nh * t]);
        attention_forward(&mut out, &mut lse, &qkv, 1, t, c, nh, 1);
        let rows = |part: usize| -> Vec<f32> { (0..t).flat_map(|j| qkv[j * 3 * c + part * c..j * 3 * c + (part + 1) * c].to_vec()).collect() };
        let (k, v) = (rows(1), rows(2));
        for (offset, threads) in [(0, 1), (BR - 1, 2), (t - 1, 1)] {
            let tq = t - offset;
            let mut o = vec![0.0; tq * c];
            attention_prefill_forward(&mut o, &qkv[offset * 3 * c..], 3 * c, &k, &v, offset, tq, c, nh, threads);
            for (a, b) in o.iter().zip(&out[offset * c..]) {
                assert!((a - b).abs() < 1e-5, "offset {offset}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn decoding_one_row_over_its_cache_matches_the_full_attention() {
        let (t, c, nh) = (6, 16, 4);
        let qkv = rand_vec(t * 3 * c, 4);
        let (mut out, mut lse) = (vec![0.0; t * c], vec![0.0; nh * t]);
        attention_forward(&mut out, &mut lse, &qkv, 1, t, c, nh, 1);
        let rows = |part: usize, len: usize| -> Vec<f32> {
            (0..len).flat_map(|j| qkv[j * 3 * c + part * c..j * 3 * c + (part + 1) * c].to_vec()).collect()
        };
        for pos in 0..t {
            let (k, v) = (rows(1, pos + 1), rows(2, pos + 1));
            let (mut o, mut scores) = (vec![0.0; c], vec![0.0; nh * t]);
            attention_decode_forward(&mut o, &qkv[pos * 3 * c..pos * 3 * c + c], &k, &v, &mut scores, pos + 1, c, nh, 0);
            for (a, b) in o.iter().zip(&out[pos * c..(pos + 1) * c]) {
                assert!((a - b).abs() < 1e-5, "position {pos}: {a} vs {b}");
            }
            // a group of heads, or one, as a thread given only them computes them
            let hs = c / nh;
            for (first, heads) in [(1, 1), (2, 2), (3, 1)] {
                let mut group = vec![0.0; heads * hs];
                attention_decode_forward(&mut group, &qkv[pos * 3 * c..pos * 3 * c + c], &k, &v, &mut scores, pos + 1, c, nh, first);
                assert_eq!(group, o[first * hs..(first + heads) * hs], "heads {first}..{}", first + heads);
            }
        }
    }
}
