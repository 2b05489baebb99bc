//! Token embedding plus learned position embedding.

/// out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]
///
/// out:    [B, T, C]  (written)
/// tokens: [B, T]     (every id < V; callers validate)
/// wte:    [V, C]
/// wpe:    [T_max, C] (T <= T_max)
pub fn encoder_forward(out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], b: usize, t: usize, c: usize) {
    for bi in 0..b {
        for ti in 0..t {
            let tok = tokens[bi * t + ti] as usize;
            let o = &mut out[(bi * t + ti) * c..(bi * t + ti + 1) * c];
            let e = &wte[tok * c..(tok + 1) * c];
            let p = &wpe[ti * c..(ti + 1) * c];
            for j in 0..c {
                o[j] = e[j] + p[j];
            }
        }
    }
}

/// Backward of `encoder_forward`.
///
/// dwte:   [V, C]     (+=)
/// dwpe:   [T_max, C] (+=, rows 0..T)
/// dout:   [B, T, C]
/// tokens: [B, T]
pub fn encoder_backward(dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], tokens: &[u32], b: usize, t: usize, c: usize) {
    for bi in 0..b {
        for ti in 0..t {
            let tok = tokens[bi * t + ti] as usize;
            let d = &dout[(bi * t + ti) * c..(bi * t + ti + 1) * c];
            for j in 0..c {
                dwte[tok * c + j] += d[j];
                dwpe[ti * c + j] += d[j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::{check_grad, rand_vec};

    #[test]
    fn encoder_gradients_match_finite_differences() {
        let (b, t, c, v) = (2, 3, 4, 5);
        let tokens = [0u32, 4, 4, 1, 2, 0];
        let (wte, wpe, w) = (rand_vec(v * c, 1), rand_vec(t * c, 2), rand_vec(b * t * c, 3));
        let loss = |wte: &[f32], wpe: &[f32]| {
            let mut out = vec![0.0; b * t * c];
            encoder_forward(&mut out, &tokens, wte, wpe, b, t, c);
            out.iter().zip(&w).map(|(o, w)| (*o as f64) * (*w as f64)).sum::<f64>()
        };
        let (mut dwte, mut dwpe) = (vec![0.0; v * c], vec![0.0; t * c]);
        encoder_backward(&mut dwte, &mut dwpe, &w, &tokens, b, t, c);
        check_grad("wte", &wte, &dwte, |x| loss(x, &wpe));
        check_grad("wpe", &wpe, &dwpe, |x| loss(&wte, x));
        // token 3 never appears: its embedding row gets no gradient
        assert!(dwte[3 * c..4 * c].iter().all(|&g| g == 0.0));
    }
}
