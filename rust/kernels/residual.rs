//! Residual connections: a plain sum, and a projection added onto the stream.

use crate::kernels::matmul::{matmul_accumulate, Weight};

/// out = a + b
///
/// out, a, b: [N]  (any element count)
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

/// Backward of `residual_forward`: the gradient flows unchanged to both inputs.
///
/// da, db: [N]  (+=)
/// dout:   [N]
pub fn residual_backward(da: &mut [f32], db: &mut [f32], dout: &[f32]) {
    for ((x, y), d) in da.iter_mut().zip(db.iter_mut()).zip(dout) {
        *x += d;
        *y += d;
    }
}

/// out = residual + inp @ weight + bias (a projection added onto the stream,
/// fused so the sum costs no extra pass). Its backward is `matmul_backward`
/// plus the residual's gradient passing through unchanged.
///
/// out:      [N, OC] (written)
/// residual: [N, OC]
/// inp:      [N, IC]
/// weight:   [IC, OC]
/// bias:     [OC]
#[allow(clippy::too_many_arguments)]
pub fn residual_matmul_forward<'w>(
    out: &mut [f32],
    residual: &[f32],
    inp: &[f32],
    weight: impl Into<Weight<'w>>,
    bias: &[f32],
    n: usize,
    ic: usize,
    oc: usize,
    threads: usize,
) {
    out[..n * oc].copy_from_slice(&residual[..n * oc]);
    matmul_accumulate(out, inp, weight, bias, n, ic, oc, threads);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::{check_grad, rand_vec};

    #[test]
    fn residual_gradients_match_finite_differences() {
        let (a, b, w) = (rand_vec(20, 1), rand_vec(20, 2), rand_vec(20, 3));
        let loss = |a: &[f32], b: &[f32]| {
            let mut out = vec![0.0; 20];
            residual_forward(&mut out, a, b);
            out.iter().zip(&w).map(|(o, w)| (*o as f64) * (*w as f64)).sum::<f64>()
        };
        let (mut da, mut db) = (vec![0.0; 20], vec![0.0; 20]);
        residual_backward(&mut da, &mut db, &w);
        check_grad("a", &a, &da, |x| loss(x, &b));
        check_grad("b", &b, &db, |x| loss(&a, x));
    }

    #[test]
    fn residual_matmul_equals_the_sum_of_its_parts() {
        use crate::kernels::matmul::matmul_forward;
        let (n, ic, oc) = (5, 7, 3);
        let (r, x, w, b) = (rand_vec(n * oc, 1), rand_vec(n * ic, 2), rand_vec(ic * oc, 3), rand_vec(oc, 4));
        let mut fused = vec![0.0; n * oc];
        residual_matmul_forward(&mut fused, &r, &x, &w, &b, n, ic, oc, 1);
        let mut proj = vec![0.0; n * oc];
        matmul_forward(&mut proj, &x, &w, Some(&b), n, ic, oc, 1);
        for ((f, p), r) in fused.iter().zip(&proj).zip(&r) {
            assert!((f - (p + r)).abs() < 1e-5);
        }
    }
}
