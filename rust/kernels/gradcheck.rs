//! Test helpers: seeded random inputs and a central-difference gradient check.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `len` values uniform in [-1, 1), reproducible from `seed`.
pub fn rand_vec(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Compare `analytic` with central differences of `loss` around `x`, over
/// every element, and fail when the relative error of the whole gradient
/// vector (`|num - ana| / max(|num|, |ana|)`) reaches 1e-2.
pub fn check_grad(name: &str, x: &[f32], analytic: &[f32], loss: impl Fn(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let eps = 1e-2f32;
    let mut xp = x.to_vec();
    let (mut diff, mut num_norm, mut ana_norm) = (0.0f64, 0.0f64, 0.0f64);
    for i in 0..x.len() {
        let orig = xp[i];
        xp[i] = orig + eps;
        let lp = loss(&xp);
        xp[i] = orig - eps;
        let lm = loss(&xp);
        xp[i] = orig;
        let num = (lp - lm) / (2.0 * eps as f64);
        let ana = analytic[i] as f64;
        diff += (num - ana).powi(2);
        num_norm += num * num;
        ana_norm += ana * ana;
    }
    let denom = num_norm.sqrt().max(ana_norm.sqrt()).max(1e-12);
    let rel = diff.sqrt() / denom;
    assert!(rel < 1e-2, "{name}: relative gradient error {rel:.3e} (|num|={:.3e}, |ana|={:.3e})", num_norm.sqrt(), ana_norm.sqrt());
    assert!(ana_norm > 0.0, "{name}: analytic gradient is all zero");
}
