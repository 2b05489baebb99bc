//! Causal multi-head self-attention over a fused qkv buffer.
//!
//! Each (batch, head) pair is independent: its score matrix and weighted sum
//! are GEMMs on strided views of `qkv`, so no head is copied out.

use super::matmul::gemm_strided;
use super::vecmath::{self, simd_dispatch};
use rayon::prelude::*;

/// A raw pointer that may cross threads; each (b, h) task touches a disjoint
/// set of elements through it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

fn for_each_head(b: usize, nh: usize, threads: usize, f: impl Fn(usize, usize) + Sync + Send) {
    if threads <= 1 {
        (0..b * nh).for_each(|i| f(i / nh, i % nh));
    } else {
        (0..b * nh).into_par_iter().for_each(|i| f(i / nh, i % nh));
    }
}

simd_dispatch! {
    /// Row-wise softmax of a [T, T] score matrix over columns 0..=row,
    /// zeroing the columns above the diagonal.
    fn causal_softmax(a: &mut [f32], t: usize) => causal_softmax_body
}

#[inline(always)]
fn causal_softmax_body(a: &mut [f32], t: usize) {
    for ti in 0..t {
        let row = &mut a[ti * t..(ti + 1) * t];
        let max = vecmath::max(&row[..=ti]);
        let inv = 1.0 / vecmath::exp_shifted_sum(&mut row[..=ti], max);
        row[..=ti].iter_mut().for_each(|x| *x *= inv);
        row[ti + 1..].fill(0.0);
    }
}

simd_dispatch! {
    /// Softmax backward in place: ds = att * (datt - sum(att * datt)) per
    /// row, causal. ds: [T, T] (in: datt), att: [T, T].
    fn causal_softmax_backward(ds: &mut [f32], att: &[f32], t: usize) => causal_softmax_backward_body
}

#[inline(always)]
fn causal_softmax_backward_body(ds: &mut [f32], att: &[f32], t: usize) {
    for ti in 0..t {
        let arow = &att[ti * t..=ti * t + ti];
        let drow = &mut ds[ti * t..(ti + 1) * t];
        let dot = vecmath::dot(arow, &drow[..=ti]);
        for (dj, &aj) in drow[..=ti].iter_mut().zip(arow) {
            *dj = aj * (*dj - dot);
        }
        drow[ti + 1..].fill(0.0);
    }
}

/// out = softmax(mask(q k^T / sqrt(hs))) v, per head
///
/// out: [B, T, C]        (written; head h fills channels h*hs..(h+1)*hs)
/// att: [B, NH, T, T]    (written: post-softmax probabilities, zero above the diagonal)
/// qkv: [B, T, 3C]       (q, k, v concatenated on the channel axis)
/// hs = C / NH
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, nh: usize, threads: usize) {
    assert_eq!(c % nh, 0, "attention: C={c} not divisible by NH={nh}");
    assert!(out.len() >= b * t * c && att.len() >= b * nh * t * t && qkv.len() >= b * t * 3 * c);
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let (out_p, att_p) = (SendPtr(out.as_mut_ptr()), SendPtr(att.as_mut_ptr()));
    for_each_head(b, nh, threads, |bi, h| {
        let (out_p, att_p) = (out_p, att_p);
        // SAFETY: this task owns att[bi, h] and out[bi, :, h*hs..(h+1)*hs].
        unsafe {
            let a = std::slice::from_raw_parts_mut(att_p.0.add((bi * nh + h) * t * t), t * t);
            let q = qkv.as_ptr().add(bi * t * 3 * c + h * hs);
            let k = q.add(c);
            let v = q.add(2 * c);
            // a[T,T] = scale * q[T,hs] @ k^T[hs,T]
            gemm_strided(t, t, hs, a.as_mut_ptr(), t as isize, false, q, 3 * c as isize, 1, k, 1, 3 * c as isize, scale, 1);
            causal_softmax(a, t);
            // out[T,hs] = a[T,T] @ v[T,hs]
            let o = out_p.0.add(bi * t * c + h * hs);
            gemm_strided(t, hs, t, o, c as isize, false, a.as_ptr(), t as isize, 1, v, 3 * c as isize, 1, 1.0, 1);
        }
    });
}

/// Backward of `attention_forward`.
///
/// dqkv: [B, T, 3C]     (+=)
/// dout: [B, T, C]
/// qkv:  [B, T, 3C]
/// att:  [B, NH, T, T]  (from the forward pass)
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    threads: usize,
) {
    assert_eq!(c % nh, 0, "attention: C={c} not divisible by NH={nh}");
    assert!(dqkv.len() >= b * t * 3 * c && dout.len() >= b * t * c && att.len() >= b * nh * t * t);
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let dqkv_p = SendPtr(dqkv.as_mut_ptr());
    for_each_head(b, nh, threads, |bi, h| {
        let dqkv_p = dqkv_p;
        let a = &att[(bi * nh + h) * t * t..(bi * nh + h + 1) * t * t];
        let mut ds = vec![0.0f32; t * t];
        // SAFETY: this task owns dqkv[bi, :, {q,k,v} channels of head h].
        unsafe {
            let base = bi * t * 3 * c + h * hs;
            let v = qkv.as_ptr().add(base + 2 * c);
            let dv = dqkv_p.0.add(base + 2 * c);
            let d = dout.as_ptr().add(bi * t * c + h * hs);
            let ld = 3 * c as isize;
            // datt[T,T] = dout[T,hs] @ v^T
            gemm_strided(t, t, hs, ds.as_mut_ptr(), t as isize, false, d, c as isize, 1, v, 1, ld, 1.0, 1);
            // dv[T,hs] += att^T[T,T] @ dout[T,hs]
            gemm_strided(t, hs, t, dv, ld, true, a.as_ptr(), 1, t as isize, d, c as isize, 1, 1.0, 1);
        }
        causal_softmax_backward(&mut ds, a, t);
        unsafe {
            let base = bi * t * 3 * c + h * hs;
            let (q, k) = (qkv.as_ptr().add(base), qkv.as_ptr().add(base + c));
            let dq = dqkv_p.0.add(base);
            let dk = dq.add(c);
            let ld = 3 * c as isize;
            // dq[T,hs] += scale * ds[T,T] @ k[T,hs]
            gemm_strided(t, hs, t, dq, ld, true, ds.as_ptr(), t as isize, 1, k, ld, 1, scale, 1);
            // dk[T,hs] += scale * ds^T[T,T] @ q[T,hs]
            gemm_strided(t, hs, t, dk, ld, true, ds.as_ptr(), 1, t as isize, q, ld, 1, scale, 1);
        }
    });
}

simd_dispatch! {
    /// One new row attending to the cached keys and values of its sequence
    /// (KV-cache decoding; the causal mask is implicit: the cache holds only
    /// positions up to the row's own, which comes last).
    ///
    /// out:    [C]       (written; head h fills channels h*hs..(h+1)*hs)
    /// q:      [C]       (the row's query)
    /// k, v:   [len, C]  (cached keys and values of positions 0..len)
    /// scores: [len]     (scratch)
    /// hs = C / NH
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_forward(
        out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], scores: &mut [f32], len: usize, c: usize, nh: usize,
    ) => attention_decode_forward_body
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attention_decode_forward_body(
    out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], scores: &mut [f32], len: usize, c: usize, nh: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let scores = &mut scores[..len];
    for h in 0..nh {
        let head = h * hs..(h + 1) * hs;
        let qh = &q[head.clone()];
        for (j, sc) in scores.iter_mut().enumerate() {
            *sc = vecmath::dot(qh, &k[j * c + h * hs..j * c + (h + 1) * hs]) * scale;
        }
        let max = vecmath::max(scores);
        let inv = 1.0 / vecmath::exp_shifted_sum(scores, max);
        let o = &mut out[head];
        o.fill(0.0);
        for (j, &a) in scores.iter().enumerate() {
            for (oo, vv) in o.iter_mut().zip(&v[j * c + h * hs..j * c + (h + 1) * hs]) {
                *oo += a * inv * vv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::{check_grad, rand_vec};

    #[test]
    fn attention_is_causal_and_rows_sum_to_one() {
        let (b, t, c, nh) = (2, 5, 8, 2);
        let qkv = rand_vec(b * t * 3 * c, 1);
        let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
        attention_forward(&mut out, &mut att, &qkv, b, t, c, nh, 1);
        for row in att.chunks(t).enumerate() {
            let ti = row.0 % t;
            let s: f32 = row.1.iter().sum();
            assert!((s - 1.0).abs() < 1e-5);
            assert!(row.1[ti + 1..].iter().all(|&x| x == 0.0));
        }
        // the first position attends only to itself: its output is its own v
        for h in 0..nh {
            for j in 0..c / nh {
                let v0 = qkv[2 * c + h * (c / nh) + j];
                assert!((out[h * (c / nh) + j] - v0).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn attention_gradients_match_finite_differences_serial_and_parallel() {
        let (b, t, c, nh) = (2, 4, 6, 2);
        let qkv = rand_vec(b * t * 3 * c, 2);
        let w = rand_vec(b * t * c, 3);
        let loss = |qkv: &[f32]| {
            let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
            attention_forward(&mut out, &mut att, qkv, b, t, c, nh, 1);
            out.iter().zip(&w).map(|(o, w)| (*o as f64) * (*w as f64)).sum::<f64>()
        };
        for threads in [1, 4] {
            let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
            attention_forward(&mut out, &mut att, &qkv, b, t, c, nh, threads);
            let mut dqkv = vec![0.0; b * t * 3 * c];
            attention_backward(&mut dqkv, &w, &qkv, &att, b, t, c, nh, threads);
            check_grad("qkv", &qkv, &dqkv, loss);
        }
    }

    #[test]
    fn decoding_one_row_over_its_cache_matches_the_full_attention() {
        let (t, c, nh) = (6, 8, 2);
        let qkv = rand_vec(t * 3 * c, 4);
        let (mut out, mut att) = (vec![0.0; t * c], vec![0.0; nh * t * t]);
        attention_forward(&mut out, &mut att, &qkv, 1, t, c, nh, 1);
        let rows = |part: usize, len: usize| -> Vec<f32> {
            (0..len).flat_map(|j| qkv[j * 3 * c + part * c..j * 3 * c + (part + 1) * c].to_vec()).collect()
        };
        for pos in 0..t {
            let (k, v) = (rows(1, pos + 1), rows(2, pos + 1));
            let (mut o, mut scores) = (vec![0.0; c], vec![0.0; t]);
            attention_decode_forward(&mut o, &qkv[pos * 3 * c..pos * 3 * c + c], &k, &v, &mut scores, pos + 1, c, nh);
            for (a, b) in o.iter().zip(&out[pos * c..(pos + 1) * c]) {
                assert!((a - b).abs() < 1e-5, "position {pos}: {a} vs {b}");
            }
        }
    }
}
