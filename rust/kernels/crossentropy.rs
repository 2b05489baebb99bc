//! Softmax + cross-entropy, fused: one sweep over each row of logits gives
//! the row's loss and overwrites the logits with their gradient.

use super::bf16::round_to_bf16;
use super::vecmath::{self, simd_dispatch};

/// Per-row loss, logits untouched.
///
/// losses:  [N]     (written: -log softmax(logits[i])[targets[i]])
/// logits:  [N, V]
/// targets: [N]     (every id < V; callers validate)
pub fn crossentropy_forward(losses: &mut [f32], logits: &[f32], targets: &[u32], n: usize, v: usize) {
    for i in 0..n {
        let row = &logits[i * v..(i + 1) * v];
        let (max, sum) = max_and_sum_exp(row);
        losses[i] = sum.ln() + max - row[targets[i] as usize];
    }
}

/// Backward of `crossentropy_forward`.
///
/// dlogits: [N, V]  (written: (softmax(logits) - onehot(target)) * dlosses[i])
/// logits:  [N, V]
/// targets: [N]
/// dlosses: [N]
pub fn crossentropy_backward(dlogits: &mut [f32], logits: &[f32], targets: &[u32], dlosses: &[f32], n: usize, v: usize) {
    dlogits[..n * v].copy_from_slice(&logits[..n * v]);
    for i in 0..n {
        softmax_xent_row(&mut dlogits[i * v..(i + 1) * v], targets[i] as usize, dlosses[i]);
    }
}

/// Fused forward and backward: returns the summed loss of the N rows and
/// replaces each row of `logits` by its gradient scaled by `dloss`.
///
/// logits:  [N, V]  (in: logits; out: dloss * (softmax - onehot(target)))
/// targets: [N]
pub fn crossentropy_fused(logits: &mut [f32], targets: &[u32], dloss: f32, n: usize, v: usize) -> f64 {
    let mut total = 0.0f64;
    for i in 0..n {
        total += softmax_xent_row(&mut logits[i * v..(i + 1) * v], targets[i] as usize, dloss) as f64;
    }
    total
}

/// `crossentropy_fused` for the bf16 products of the output layer's
/// backward: each row's gradient is rounded to bf16 while the row is in
/// cache, and stored over the first half of `logits`' memory (row i's
/// bf16 lie below its floats, over rows already done). Returns the summed
/// loss and the rounded gradient, so the two products read half the bytes
/// and round nothing.
///
/// logits:  [N, V]  (in: logits; out: overwritten)
/// targets: [N]
/// ->       [N, V]  bf16(dloss * (softmax - onehot(target)))
pub fn crossentropy_fused_bf16<'a>(logits: &'a mut [f32], targets: &[u32], dloss: f32, n: usize, v: usize) -> (f64, &'a [u16]) {
    assert!(logits.len() >= n * v, "crossentropy_fused_bf16: {} logits for {n} x {v}", logits.len());
    let mut total = 0.0f64;
    let mut rounded = vec![0u16; v];
    let base = logits.as_mut_ptr();
    for (i, &target) in targets[..n].iter().enumerate() {
        // SAFETY: row i's floats are in bounds, and no bf16 row written so
        // far reaches them (bf16 row i - 1 ends at byte 2iv <= 4iv).
        let row = unsafe { std::slice::from_raw_parts_mut(base.add(i * v), v) };
        total += softmax_xent_row(row, target as usize, dloss) as f64;
        round_to_bf16(&mut rounded, row);
        // SAFETY: bytes [2iv, 2iv + 2v) are in bounds and hold no float still
        // needed (rows before i, or row i itself, now copied into `rounded`).
        unsafe { std::ptr::copy_nonoverlapping(rounded.as_ptr(), (base as *mut u16).add(i * v), v) };
    }
    // SAFETY: the first n * v u16 were all written above; `logits` stays
    // borrowed for as long as they are.
    (total, unsafe { std::slice::from_raw_parts(base as *const u16, n * v) })
}

/// `crossentropy_fused` of the mean over the N rows: returns the mean loss
/// and leaves d(mean loss)/dlogits in `logits` (nothing to do when N = 0).
///
/// logits:  [N, V]  (in: logits; out: (softmax - onehot(target)) / N)
/// targets: [N]
pub fn crossentropy_fused_mean(logits: &mut [f32], targets: &[u32], n: usize, v: usize) -> f64 {
    let rows = n.max(1);
    crossentropy_fused(logits, targets, 1.0 / rows as f32, n, v) / rows as f64
}

simd_dispatch! {
    /// (max, sum of e^(x - max)) of one row of logits.
    fn max_and_sum_exp(row: &[f32]) -> (f32, f32) => max_and_sum_exp_body
}

#[inline(always)]
fn max_and_sum_exp_body(row: &[f32]) -> (f32, f32) {
    let max = vecmath::max(row);
    (max, vecmath::sum_exp_shifted(row, max))
}

simd_dispatch! {
    /// One row: returns the loss, turns the row into its scaled gradient.
    fn softmax_xent_row(row: &mut [f32], target: usize, dloss: f32) -> f32 => softmax_xent_row_body
}

#[inline(always)]
fn softmax_xent_row_body(row: &mut [f32], target: usize, dloss: f32) -> f32 {
    let max = vecmath::max(row);
    let target_logit = row[target];
    let sum = vecmath::exp_shifted_sum(row, max);
    let scale = dloss / sum;
    row.iter_mut().for_each(|x| *x *= scale);
    row[target] -= dloss;
    sum.ln() + max - target_logit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::{check_grad, rand_vec};

    #[test]
    fn uniform_logits_give_log_v() {
        let (n, v) = (3, 50);
        let mut losses = vec![0.0; n];
        crossentropy_forward(&mut losses, &vec![0.25; n * v], &[0, 7, 49], n, v);
        for l in losses {
            assert!((l - (v as f32).ln()).abs() < 1e-5);
        }
    }

    #[test]
    fn fused_matches_separate_and_finite_differences() {
        let (n, v) = (4, 9);
        let logits: Vec<f32> = rand_vec(n * v, 1).iter().map(|x| 4.0 * x).collect();
        let targets = [3u32, 0, 8, 3];
        let dl = [0.25f32; 4];
        let loss = |x: &[f32]| {
            let mut l = vec![0.0; n];
            crossentropy_forward(&mut l, x, &targets, n, v);
            l.iter().map(|&x| x as f64 * 0.25).sum::<f64>()
        };
        let mut dlogits = vec![0.0; n * v];
        crossentropy_backward(&mut dlogits, &logits, &targets, &dl, n, v);
        check_grad("logits", &logits, &dlogits, loss);
        let mut fused = logits.clone();
        let total = crossentropy_fused(&mut fused, &targets, 0.25, n, v);
        assert!((total * 0.25 - loss(&logits)).abs() < 1e-5);
        for (a, b) in fused.iter().zip(&dlogits) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn bf16_gradient_is_the_rounded_fused_gradient() {
        // several rows, so each bf16 row lands over floats of earlier rows
        let (n, v) = (5, 37);
        let logits: Vec<f32> = rand_vec(n * v, 3).iter().map(|x| 6.0 * x).collect();
        let targets = [4u32, 0, 36, 4, 20];
        let mut fused = logits.clone();
        let want = crossentropy_fused(&mut fused, &targets, 0.2, n, v);
        let mut buf = logits.clone();
        let (total, d16) = crossentropy_fused_bf16(&mut buf, &targets, 0.2, n, v);
        assert_eq!(total, want);
        let rounded: Vec<u16> = fused.iter().map(|&x| crate::kernels::bf16::to_bf16(x)).collect();
        assert_eq!(d16, &rounded[..]);
    }

    #[test]
    fn known_values() {
        // logits ln(1), ln(2), ln(5): probabilities 1/8, 2/8, 5/8
        let logits = [0.0f32, 2f32.ln(), 5f32.ln()];
        let mut losses = [0.0f32; 2];
        crossentropy_forward(&mut losses, &[logits, logits].concat(), &[2, 0], 2, 3);
        assert!((losses[0] - (8.0f32 / 5.0).ln()).abs() < 1e-6 && (losses[1] - 8f32.ln()).abs() < 1e-6, "{losses:?}");
        // fused: the summed loss, and dloss * (softmax - one-hot) in place
        let mut row = logits;
        let total = crossentropy_fused(&mut row, &[1], 0.5, 1, 3);
        assert!((total - 4f64.ln()).abs() < 1e-6, "{total}");
        for (got, want) in row.iter().zip([0.0625f32, -0.375, 0.3125]) {
            assert!((got - want).abs() < 1e-6, "{row:?}");
        }
    }

    #[test]
    fn extreme_logits_give_their_exact_loss_and_gradient() {
        // the softmax is (0, 1, 0): the loss is 1e30 - (-1e30), the gradient softmax - one-hot
        let mut row = vec![-1e30f32, 1e30, 0.0];
        let l = crossentropy_fused(&mut row, &[0], 1.0, 1, 3);
        assert_eq!(l, 2e30f32 as f64);
        for (got, want) in row.iter().zip([-1.0f32, 1.0, 0.0]) {
            assert!((got - want).abs() < 1e-6, "{row:?}");
        }
    }
}
