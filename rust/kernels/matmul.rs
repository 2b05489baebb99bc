//! Matrix multiply with bias, on the `gemm` crate (runtime SIMD dispatch, so
//! the package is portable and still uses AVX2/AVX-512/NEON where present).
//!
//! Weights use the GPT-2 "Conv1D" layout, `[in, out]`, so `out = inp @ weight`.
//! A weight given as float32 gives float32 products; one given as bf16 makes
//! the layer multiply in bf16 (both operands rounded, f32 sums: see `bf16`),
//! forward and backward.

use super::bf16::{bf16_gemm, bf16_gemm_packed, Operand, PackedB};
#[cfg(target_arch = "x86_64")]
use super::few_rows::{self, MAX_ROWS};
use gemm::Parallelism;

fn parallelism(threads: usize) -> Parallelism {
    if threads <= 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    }
}

/// Row-major single-precision GEMM: `c[m,n] (+)= op(a)[m,k] @ op(b)[k,n]`.
///
/// a: `[m, k]`, or `[k, m]` when `a_trans` (then `op(a)` is its transpose)
/// b: `[k, n]`, or `[n, k]` when `b_trans`
/// c: `[m, n]`, overwritten unless `accumulate`
/// threads: 1 runs on the calling thread; more use the current rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_trans: bool,
    b: &[f32],
    b_trans: bool,
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    assert!(a.len() >= m * k, "sgemm: a has {} elements, need {}", a.len(), m * k);
    assert!(b.len() >= k * n, "sgemm: b has {} elements, need {}", b.len(), k * n);
    assert!(c.len() >= m * n, "sgemm: c has {} elements, need {}", c.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // (row stride, column stride) of each operand as stored.
    let (a_rs, a_cs) = if a_trans { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if b_trans { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the asserts above guarantee every index the strides reach lies
    // inside the slices, and `c` is exclusively borrowed.
    unsafe {
        gemm_strided(
            m, n, k, c.as_mut_ptr(), n as isize, accumulate, a.as_ptr(), a_rs, a_cs, b.as_ptr(), b_rs, b_cs, 1.0, threads,
        )
    }
}

/// `dst[m,n] (+)= scale * lhs[m,k] @ rhs[k,n]` on raw pointers with arbitrary
/// row and column strides (the column stride of `dst` is 1). Used by
/// attention to multiply one head's slice of the fused qkv buffer in place.
///
/// # Safety
/// Every element the strides reach must be inside live allocations, and the
/// `dst` elements must not be aliased by `lhs`, `rhs` or another thread.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    scale: f32,
    threads: usize,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        accumulate,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        if accumulate { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        parallelism(threads),
    );
}

/// c[m,n] (+)= op(a)[m,k] @ op(w)[k,n] in the precision `w` is stored in.
/// Up to MAX_ROWS rows (decoding) read `w` in place (`few_rows`) where the
/// CPU has AVX-512.
#[allow(clippy::too_many_arguments)]
pub fn product(m: usize, n: usize, k: usize, a: &[f32], a_trans: bool, w: Operand, w_trans: bool, c: &mut [f32], accumulate: bool, threads: usize) {
    #[cfg(target_arch = "x86_64")]
    if reads_in_place(m, a_trans) {
        return few_rows::few_rows(m, n, k, a, w, w_trans, c, accumulate, threads);
    }
    match w {
        Operand::F32(w) => sgemm(m, n, k, a, a_trans, w, w_trans, c, accumulate, threads),
        Operand::Bf16(_) => bf16_gemm(m, n, k, Operand::F32(a), a_trans, w, w_trans, c, accumulate, threads),
    }
}

/// Whether `product` multiplies m rows by reading the weight in place
/// (`few_rows`) rather than packing it.
#[cfg(target_arch = "x86_64")]
fn reads_in_place(m: usize, a_trans: bool) -> bool {
    m <= MAX_ROWS && !a_trans && few_rows::supported()
}

/// A layer's weight, [C, OC], as the layer functions below read it: stored
/// so, or as its transpose [OC, C] (the bf16 copies of the model's block
/// matrices, which decoding then reads one output's weights at a time).
#[derive(Clone, Copy)]
pub struct Weight<'a> {
    pub values: Operand<'a>,
    /// Stored [OC, C].
    pub transposed: bool,
    /// The weight rounded to bf16 and packed for the products, which then
    /// read these instead of `values`.
    pub panels: Option<&'a WeightPanels>,
}

impl Weight<'_> {
    /// Whether the products multiply in bf16.
    fn bf16(&self) -> bool {
        self.panels.is_some() || matches!(self.values, Operand::Bf16(_))
    }
}

impl<'a, T: Into<Operand<'a>>> From<T> for Weight<'a> {
    fn from(values: T) -> Self {
        Weight { values: values.into(), transposed: false, panels: None }
    }
}

/// A weight rounded to bf16 and packed once for both products that read
/// it, `inp @ weight` and `dout @ weight^T`, so that a training step's
/// micro-batches do not each pack every matrix twice. (Packing a weight
/// stored with its k contiguous is a scatter: per micro-batch it was about
/// a tenth of the seed config's bf16 step.)
pub struct WeightPanels {
    /// [C, OC] as the forward reads it.
    pub forward: PackedB,
    /// [OC, C] as the backward's dinp product reads it.
    pub backward: PackedB,
    /// The weight is stored [OC, C].
    transposed: bool,
}

impl WeightPanels {
    /// weight: [C, OC], or [OC, C] when `transposed`. None where the CPU
    /// lacks avx512_bf16 (see `PackedB`).
    pub fn new(weight: &[f32], transposed: bool, c: usize, oc: usize) -> Option<Self> {
        let w = Operand::F32(weight);
        Some(WeightPanels { forward: PackedB::new(w, transposed, c, oc)?, backward: PackedB::new(w, !transposed, oc, c)?, transposed })
    }

    /// Pack `weight` again after it changed (same shape and layout).
    pub fn repack(&mut self, weight: &[f32]) {
        self.forward.repack(Operand::F32(weight), self.transposed);
        self.backward.repack(Operand::F32(weight), !self.transposed);
    }

    /// Bytes both packings take.
    pub fn bytes(&self) -> usize {
        self.forward.bytes() + self.backward.bytes()
    }

    /// Bytes `new` allocates for a [C, OC] weight on this CPU; None when
    /// the count overflows.
    pub fn bytes_for(c: usize, oc: usize) -> Option<u64> {
        PackedB::bytes_for(c, oc)?.checked_add(PackedB::bytes_for(oc, c)?)
    }
}

/// c[m,n] (+)= a[m,k] @ w, or @ w^T for the `backward` (dinp) product.
#[allow(clippy::too_many_arguments)]
fn weight_product(m: usize, n: usize, k: usize, a: &[f32], w: Weight, backward: bool, c: &mut [f32], accumulate: bool, threads: usize) {
    match w.panels {
        Some(p) => bf16_gemm_packed(m, n, k, Operand::F32(a), false, if backward { &p.backward } else { &p.forward }, c, accumulate, threads),
        None => product(m, n, k, a, false, w.values, w.transposed != backward, c, accumulate, threads),
    }
}

/// out = inp @ weight + bias
///
/// out:    [N, OC]  (written)
/// inp:    [N, C]
/// weight: [C, OC]
/// bias:   [OC] or none
pub fn matmul_forward<'w>(
    out: &mut [f32],
    inp: &[f32],
    weight: impl Into<Weight<'w>>,
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
    threads: usize,
) {
    match bias {
        Some(bias) => {
            out[..n * oc].fill(0.0);
            matmul_accumulate(out, inp, weight, bias, n, c, oc, threads);
        }
        None => weight_product(n, oc, c, inp, weight.into(), false, out, false, threads),
    }
}

/// out += inp @ weight + bias: a projection added onto what `out` holds
/// (zeros for `matmul_forward`, the residual stream for
/// `residual_matmul_forward`).
///
/// out:    [N, OC]  (+=)
/// inp:    [N, C]
/// weight: [C, OC]
/// bias:   [OC]
#[allow(clippy::too_many_arguments)]
pub fn matmul_accumulate<'w>(
    out: &mut [f32],
    inp: &[f32],
    weight: impl Into<Weight<'w>>,
    bias: &[f32],
    n: usize,
    c: usize,
    oc: usize,
    threads: usize,
) {
    if n == 0 || oc == 0 {
        return;
    }
    for row in out[..n * oc].chunks_exact_mut(oc) {
        for (o, b) in row.iter_mut().zip(&bias[..oc]) {
            *o += b;
        }
    }
    weight_product(n, oc, c, inp, weight.into(), false, out, true, threads);
}

/// Backward of `matmul_forward`, accumulating into every gradient. With a
/// bf16 weight both products multiply in bf16 (dout and inp rounded as
/// they are packed); the gradients are summed in f32.
///
/// dinp:    [N, C]   (+=)
/// dweight: [C, OC]  (+=)
/// dbias:   [OC]     (+=), or none
/// dout:    [N, OC]
/// inp:     [N, C]
/// weight:  [C, OC]
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward<'w>(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: impl Into<Weight<'w>>,
    n: usize,
    c: usize,
    oc: usize,
    threads: usize,
) {
    let w = weight.into();
    // dinp[N,C] += dout[N,OC] @ weight^T
    weight_product(n, c, oc, dout, w, true, dinp, true, threads);
    // dweight[C,OC] += inp^T @ dout
    if w.bf16() {
        bf16_gemm(c, oc, n, Operand::F32(inp), true, Operand::F32(dout), false, dweight, true, threads)
    } else {
        sgemm(c, oc, n, inp, true, dout, false, dweight, true, threads)
    }
    if let (Some(dbias), true) = (dbias, oc > 0) {
        for row in dout[..n * oc].chunks_exact(oc) {
            for (db, d) in dbias[..oc].iter_mut().zip(row) {
                *db += d;
            }
        }
    }
}

impl<'a> From<&'a [f32]> for Operand<'a> {
    fn from(x: &'a [f32]) -> Self {
        Operand::F32(x)
    }
}

impl<'a> From<&'a Vec<f32>> for Operand<'a> {
    fn from(x: &'a Vec<f32>) -> Self {
        Operand::F32(x)
    }
}

impl<'a> From<&'a [u16]> for Operand<'a> {
    fn from(x: &'a [u16]) -> Self {
        Operand::Bf16(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::bf16::to_bf16;
    use crate::kernels::gradcheck::{check_grad, rand_vec};

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    fn transpose(r: usize, c: usize, x: &[f32]) -> Vec<f32> {
        let mut t = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = x[i * c + j];
            }
        }
        t
    }

    #[test]
    fn sgemm_matches_naive_for_every_transpose() {
        let (m, n, k) = (37, 29, 53);
        let a = rand_vec(m * k, 1);
        let b = rand_vec(k * n, 2);
        let want = naive(m, n, k, &a, &b);
        let at = transpose(m, k, &a);
        let bt = transpose(k, n, &b);
        for threads in [1, 3] {
            for (aa, atr) in [(&a, false), (&at, true)] {
                for (bb, btr) in [(&b, false), (&bt, true)] {
                    let mut c = vec![1.0; m * n];
                    sgemm(m, n, k, aa, atr, bb, btr, &mut c, false, threads);
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
                    }
                    let mut c2 = vec![1.0; m * n];
                    sgemm(m, n, k, aa, atr, bb, btr, &mut c2, true, threads);
                    for (x, y) in c2.iter().zip(&want) {
                        assert!((x - (y + 1.0)).abs() < 1e-4);
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_gradients_match_finite_differences() {
        let (n, c, oc) = (7, 5, 6);
        let inp = rand_vec(n * c, 3);
        let weight = rand_vec(c * oc, 4);
        let bias = rand_vec(oc, 5);
        let w_out = rand_vec(n * oc, 6);
        let loss = |inp: &[f32], weight: &[f32], bias: &[f32]| {
            let mut out = vec![0.0; n * oc];
            matmul_forward(&mut out, inp, weight, Some(bias), n, c, oc, 1);
            out.iter().zip(&w_out).map(|(o, w)| (*o as f64) * (*w as f64)).sum::<f64>()
        };
        let mut dinp = vec![0.0; n * c];
        let mut dweight = vec![0.0; c * oc];
        let mut dbias = vec![0.0; oc];
        matmul_backward(&mut dinp, &mut dweight, Some(&mut dbias), &w_out, &inp, &weight, n, c, oc, 1);
        check_grad("inp", &inp, &dinp, |x| loss(x, &weight, &bias));
        check_grad("weight", &weight, &dweight, |x| loss(&inp, x, &bias));
        check_grad("bias", &bias, &dbias, |x| loss(&inp, &weight, x));
    }

    #[test]
    fn transposed_matmul_matches_naive_on_both_paths() {
        let (c, oc) = (24, 1100);
        let w = rand_vec(oc * c, 7);
        let wt = transpose(oc, c, &w);
        for (n, threads) in [(0, 4), (1, 1), (3, 4), (20, 4)] {
            let x = rand_vec(n * c, 8);
            let want = naive(n, oc, c, &x, &wt);
            let mut out = vec![0.0; n * oc];
            let weight = Weight { values: Operand::F32(&w), transposed: true, panels: None };
            matmul_forward(&mut out, &x, weight, None, n, c, oc, threads);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "n={n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_weights_panels_give_the_bits_of_its_bf16_copy() {
        // forward, dinp and dweight, a weight stored either way, few and many rows
        let Some(_) = WeightPanels::new(&[0.0], false, 1, 1) else {
            eprintln!("skipped: this CPU lacks avx512_bf16, so no weight is packed");
            return;
        };
        let (c, oc) = (40, 70);
        let w = rand_vec(c * oc, 9);
        let w16: Vec<u16> = w.iter().map(|&x| to_bf16(x)).collect();
        for transposed in [false, true] {
            let panels = WeightPanels::new(&w, transposed, c, oc).expect("avx512_bf16");
            let copy = Weight { values: Operand::Bf16(&w16), transposed, panels: None };
            let packed = Weight { values: Operand::F32(&w), transposed, panels: Some(&panels) };
            for n in [3, 50] {
                let (x, dout) = (rand_vec(n * c, 10), rand_vec(n * oc, 11));
                let run = |weight: Weight| {
                    let mut out = vec![0.0; n * oc];
                    matmul_forward(&mut out, &x, weight, None, n, c, oc, 2);
                    let (mut dinp, mut dweight) = (vec![0.0; n * c], vec![0.0; c * oc]);
                    matmul_backward(&mut dinp, &mut dweight, None, &dout, &x, weight, n, c, oc, 2);
                    [out, dinp, dweight].map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
                };
                let (want, got) = (run(copy), run(packed));
                assert_eq!(want[2], got[2], "dweight, n={n} transposed={transposed}");
                for (i, what) in [(0, "forward"), (1, "dinp")] {
                    if n > MAX_ROWS {
                        assert_eq!(want[i], got[i], "{what}, n={n} transposed={transposed}");
                    } else {
                        // the copy's few rows are read in place (few_rows), summed in another order
                        let near = want[i].iter().zip(&got[i]).all(|(a, b)| (f32::from_bits(*a) - f32::from_bits(*b)).abs() <= 1e-5);
                        assert!(near, "{what}, n={n} transposed={transposed}");
                    }
                }
            }
        }
    }
}
