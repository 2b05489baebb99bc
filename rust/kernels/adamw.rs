//! AdamW: Adam with decoupled weight decay and bias correction.

/// Hyper-parameters of one AdamW update.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { lr: 3e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

impl AdamW {
    /// Refuse settings that cannot train: the one place they are checked.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err(format!("beta1 and beta2 must be in [0, 1), got {}, {}", self.beta1, self.beta2));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(format!("eps must be a finite positive number, got {}", self.eps));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(format!("weight_decay must be a finite number >= 0, got {}", self.weight_decay));
        }
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return Err(format!("lr must be a finite number >= 0, got {}", self.lr));
        }
        Ok(())
    }
}

/// One AdamW step at 1-based step `t`, in place.
///
/// params: [P]  (updated)
/// grads:  [P]
/// m, v:   [P]  (first and second moments, updated)
/// `weight_decay` is taken as given: the caller passes 0 for tensors that
/// are not decayed (biases, LayerNorm).
pub fn adamw_update(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamW, weight_decay: f32, t: u64) {
    assert!(t >= 1, "adamw: step counts from 1");
    let b1c = 1.0 - (hp.beta1 as f64).powf(t as f64);
    let b2c = 1.0 - (hp.beta2 as f64).powf(t as f64);
    let (b1c, b2c) = (b1c as f32, b2c as f32);
    for i in 0..params.len() {
        let g = grads[i];
        let mi = hp.beta1 * m[i] + (1.0 - hp.beta1) * g;
        let vi = hp.beta2 * v[i] + (1.0 - hp.beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        let mhat = mi / b1c;
        let vhat = vi / b2c;
        params[i] -= hp.lr * (mhat / (vhat.sqrt() + hp.eps) + weight_decay * params[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_parameter_by_lr_against_its_gradient_sign() {
        // With bias correction, step 1 gives mhat = g, vhat = g^2: a step of lr.
        let hp = AdamW { lr: 0.1, weight_decay: 0.0, ..Default::default() };
        let mut p = vec![1.0, 1.0, 1.0];
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        adamw_update(&mut p, &[2.0, -0.5, 0.0], &mut m, &mut v, &hp, 0.0, 1);
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] - 1.1).abs() < 1e-6 && p[2] == 1.0);
    }

    #[test]
    fn weight_decay_is_decoupled_from_the_gradient() {
        let hp = AdamW { lr: 0.1, ..Default::default() };
        let mut p = vec![2.0];
        let (mut m, mut v) = (vec![0.0], vec![0.0]);
        adamw_update(&mut p, &[0.0], &mut m, &mut v, &hp, 0.5, 1);
        assert!((p[0] - (2.0 - 0.1 * 0.5 * 2.0)).abs() < 1e-6);
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        assert!(AdamW::default().validate().is_ok());
        for (bad, what) in [
            (AdamW { beta1: 1.0, ..Default::default() }, "beta1"),
            (AdamW { beta2: -0.1, ..Default::default() }, "beta2"),
            (AdamW { eps: 0.0, ..Default::default() }, "eps"),
            (AdamW { weight_decay: f32::NAN, ..Default::default() }, "weight_decay"),
            (AdamW { lr: f32::INFINITY, ..Default::default() }, "lr"),
        ] {
            assert!(bad.validate().unwrap_err().contains(what), "{what}");
        }
    }

    #[test]
    fn minimises_a_quadratic() {
        let hp = AdamW { lr: 0.05, weight_decay: 0.0, ..Default::default() };
        let target = [3.0f32, -2.0, 0.5];
        let mut p = vec![0.0; 3];
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        for t in 1..=2000 {
            let g: Vec<f32> = p.iter().zip(&target).map(|(x, y)| 2.0 * (x - y)).collect();
            adamw_update(&mut p, &g, &mut m, &mut v, &hp, 0.0, t);
        }
        for (x, y) in p.iter().zip(&target) {
            assert!((x - y).abs() < 1e-2, "{x} vs {y}");
        }
    }
}
