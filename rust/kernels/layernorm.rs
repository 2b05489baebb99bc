//! Layer normalisation over the channel dimension (eps 1e-5, as GPT-2).

pub const LN_EPS: f32 = 1e-5;

/// out = (inp - mean) * rstd * weight + bias, per row
///
/// out:    [N, C]  (written)
/// mean:   [N]     (written, kept for backward)
/// rstd:   [N]     (written, 1/sqrt(var + eps), kept for backward)
/// inp:    [N, C]
/// weight: [C]
/// bias:   [C]
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    n: usize,
    c: usize,
) {
    for i in 0..n {
        let x = &inp[i * c..(i + 1) * c];
        let m = x.iter().sum::<f32>() / c as f32;
        let v = x.iter().map(|xi| (xi - m) * (xi - m)).sum::<f32>() / c as f32;
        let s = 1.0 / (v + LN_EPS).sqrt();
        let o = &mut out[i * c..(i + 1) * c];
        for j in 0..c {
            o[j] = (x[j] - m) * s * weight[j] + bias[j];
        }
        mean[i] = m;
        rstd[i] = s;
    }
}

/// Backward of `layernorm_forward`.
///
/// dinp:    [N, C]  (+=)
/// dweight: [C]     (+=)
/// dbias:   [C]     (+=)
/// dout:    [N, C]
/// inp:     [N, C]
/// weight:  [C]
/// mean, rstd: [N]  (from the forward pass)
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    for i in 0..n {
        let x = &inp[i * c..(i + 1) * c];
        let d = &dout[i * c..(i + 1) * c];
        let (m, s) = (mean[i], rstd[i]);
        // Two reductions: mean of dnorm and mean of dnorm * norm.
        let (mut dnorm_mean, mut dnorm_norm_mean) = (0.0f32, 0.0f32);
        for j in 0..c {
            let norm = (x[j] - m) * s;
            let dnorm = weight[j] * d[j];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= c as f32;
        dnorm_norm_mean /= c as f32;
        let di = &mut dinp[i * c..(i + 1) * c];
        for j in 0..c {
            let norm = (x[j] - m) * s;
            let dnorm = weight[j] * d[j];
            dbias[j] += d[j];
            dweight[j] += norm * d[j];
            di[j] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::{check_grad, rand_vec};

    #[test]
    fn layernorm_normalises_rows() {
        let (n, c) = (3, 16);
        let inp: Vec<f32> = rand_vec(n * c, 1).iter().map(|x| 5.0 * x + 2.0).collect();
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &vec![1.0; c], &vec![0.0; c], n, c);
        for row in out.chunks(c) {
            let m: f32 = row.iter().sum::<f32>() / c as f32;
            let v: f32 = row.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / c as f32;
            assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-3, "mean {m} var {v}");
        }
    }

    #[test]
    fn layernorm_gradients_match_finite_differences() {
        let (n, c) = (4, 8);
        let inp = rand_vec(n * c, 2);
        let weight = rand_vec(c, 3);
        let bias = rand_vec(c, 4);
        let w_out = rand_vec(n * c, 5);
        let loss = |inp: &[f32], weight: &[f32], bias: &[f32]| {
            let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            layernorm_forward(&mut out, &mut mean, &mut rstd, inp, weight, bias, n, c);
            out.iter().zip(&w_out).map(|(o, w)| (*o as f64) * (*w as f64)).sum::<f64>()
        };
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &bias, n, c);
        let (mut dinp, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        layernorm_backward(&mut dinp, &mut dw, &mut db, &w_out, &inp, &weight, &mean, &rstd, n, c);
        check_grad("inp", &inp, &dinp, |x| loss(x, &weight, &bias));
        check_grad("weight", &weight, &dw, |x| loss(&inp, x, &bias));
        check_grad("bias", &bias, &db, |x| loss(&inp, &weight, x));
    }
}
