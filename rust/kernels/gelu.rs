//! GELU with the tanh approximation GPT-2 uses.

use super::vecmath::{self, simd_dispatch};

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF: f32 = 0.044715;

simd_dispatch! {
    /// out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    ///
    /// out: [N]  (written; N is any element count)
    /// inp: [N]
    pub fn gelu_forward(out: &mut [f32], inp: &[f32]) => gelu_forward_body
}

#[inline(always)]
fn gelu_forward_body(out: &mut [f32], inp: &[f32]) {
    for (o, &x) in out.iter_mut().zip(inp) {
        let u = SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x);
        *o = 0.5 * x * (1.0 + vecmath::tanh(u));
    }
}

simd_dispatch! {
    /// Backward of `gelu_forward`.
    ///
    /// dinp: [N]  (+=)
    /// inp:  [N]
    /// dout: [N]
    pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) => gelu_backward_body
}

#[inline(always)]
fn gelu_backward_body(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    for ((di, &x), &d) in dinp.iter_mut().zip(inp).zip(dout) {
        let u = SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x);
        let t = vecmath::tanh(u);
        let sech2 = 1.0 - t * t;
        let grad = 0.5 * (1.0 + t) + 0.5 * x * sech2 * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_COEF * x * x);
        *di += grad * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::{check_grad, rand_vec};

    #[test]
    fn gelu_known_values() {
        let mut out = [0.0; 3];
        gelu_forward(&mut out, &[0.0, 1.0, -3.0]);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 0.841192).abs() < 1e-5);
        assert!((out[2] + 0.003637).abs() < 1e-5);
    }

    #[test]
    fn gelu_gradient_matches_finite_differences() {
        let inp: Vec<f32> = rand_vec(50, 7).iter().map(|x| 3.0 * x).collect();
        let w = rand_vec(50, 8);
        let loss = |x: &[f32]| {
            let mut out = vec![0.0; x.len()];
            gelu_forward(&mut out, x);
            out.iter().zip(&w).map(|(o, w)| (*o as f64) * (*w as f64)).sum::<f64>()
        };
        let mut dinp = vec![0.0; 50];
        gelu_backward(&mut dinp, &inp, &w);
        check_grad("inp", &inp, &dinp, loss);
    }
}
