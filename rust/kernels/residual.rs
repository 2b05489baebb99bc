//! Residual connections.

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
}
