//! Products of a few rows with a weight, `c[m,n] (+)= a[m,k] @ op(w)` for
//! m <= MAX_ROWS: decoding, where each step multiplies one row per sequence
//! by every weight of the model.
//!
//! Such a product is bound by reading `w` once, not by arithmetic, so
//! nothing is packed: `w` is read in place, its output columns split into
//! contiguous ranges across threads, and its elements widened to f32 in
//! registers (exact for bf16). A register tile of up to 4 rows of `a`
//! reuses each vector of `w` it loads, so even 16 rows stay bound by
//! memory rather than by loads (and beat packing `w` for a GEMM). Each
//! element of `c` is summed in the same order whatever the number of threads.
//!
//! A transposed `w`, `[n, k]`, streams best: each thread reads one
//! contiguous run of it. A `[k, n]` one is read in column stripes, a short
//! run from each row; in bf16 that left half the memory bandwidth unused,
//! so a model cast to bf16 for inference stores its blocks' matrices
//! transposed (`model::WeightUse`).
//!
//! The tiles are AVX-512 (`supported()`); elsewhere `matmul::product` keeps
//! its general path.

#[cfg(target_arch = "x86_64")]
use super::{
    bf16::{from_bf16, to_bf16, Operand},
    SharedOut,
};
#[cfg(target_arch = "x86_64")]
use rayon::prelude::*;

/// Products of at most this many rows take this path (`matmul::product`):
/// on the seed config's decode step it beat the GEMM from 1 to 16 rows.
pub const MAX_ROWS: usize = 16;

/// The most columns of c one task computes. Small tasks balance better and
/// (for a transposed w) each reads w in one contiguous run: on the output
/// layer (30000 columns) a cap of 256 ran 1.5x as fast as 8 tasks.
const SPAN: usize = 256;

/// Whether this CPU runs the few-rows tiles (AVX-512 F, BW and VL).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[m,n] (+)= a[m,k] @ op(w)`, m <= MAX_ROWS, on a CPU where `supported()`.
/// A bf16 `w` multiplies `a` rounded to bf16 (as `bf16_gemm` does); an f32
/// one multiplies in f32.
///
/// a: `[m, k]`
/// w: `[k, n]`, or `[n, k]` when `w_trans`
/// c: `[m, n]`, overwritten unless `accumulate`
/// threads: 1 runs on the calling thread; more use the current rayon pool.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub fn few_rows(m: usize, n: usize, k: usize, a: &[f32], w: Operand, w_trans: bool, c: &mut [f32], accumulate: bool, threads: usize) {
    assert!(m <= MAX_ROWS && supported(), "few_rows: {m} rows, or a CPU without AVX-512");
    assert!(a.len() >= m * k && c.len() >= m * n, "few_rows: operands too short");
    assert!(w.len() >= k * n, "few_rows: w has {} elements, need {}", w.len(), k * n);
    if m == 0 || n == 0 {
        return;
    }
    // a as the tiles read it: for a bf16 w rounded to bf16, and for a
    // transposed one also split like w's loads (`tiles::split`); lda its row stride.
    let copy: Vec<f32>;
    let (a, lda) = match w {
        Operand::F32(_) => (&a[..m * k], k),
        Operand::Bf16(_) if w_trans => {
            copy = tiles::split(&a[..m * k], m, k);
            (&copy[..], copy.len() / m)
        }
        Operand::Bf16(_) => {
            copy = a[..m * k].iter().map(|&x| from_bf16(to_bf16(x))).collect();
            (&copy[..], k)
        }
    };
    // Contiguous column ranges, at least 4 per thread so that uneven ones
    // balance, and at most SPAN columns each.
    let tasks = if threads > 1 { 4 * threads } else { 1 };
    let span = (n.div_ceil(tasks).div_ceil(tiles::COLS) * tiles::COLS).min(SPAN);
    let out = SharedOut(c.as_mut_ptr());
    let run = |task: usize| {
        let j0 = task * span;
        let cols = span.min(n - j0);
        let mut block = vec![0.0f32; m * cols]; // [m, cols]
        // SAFETY: supported() holds (asserted), and the lengths of a, w and
        // block cover every element the tiles read and write.
        unsafe {
            match w {
                Operand::F32(w) => tiles::block(&mut block, a, lda, m, k, n, w, w_trans, j0),
                Operand::Bf16(w) => tiles::block(&mut block, a, lda, m, k, n, w, w_trans, j0),
            }
        }
        for (i, row) in block.chunks_exact(cols).enumerate() {
            // SAFETY: c holds m * n elements (asserted), and this task alone
            // writes columns j0..j0 + cols of each row.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.at(i * n + j0), cols) };
            if accumulate {
                dst.iter_mut().zip(row).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(row);
            }
        }
    };
    if threads > 1 {
        (0..n.div_ceil(span)).into_par_iter().for_each(run);
    } else {
        (0..n.div_ceil(span)).for_each(run);
    }
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    //! The AVX-512 register tiles. Every load past the end of a row is
    //! masked off, so rows and k of any length need no scalar tail.

    use std::arch::x86_64::*;

    /// f32 lanes of a vector.
    const LANES: usize = 16;
    /// Rows of `a` per tile.
    const ROWS: usize = 4;
    /// Rows of a transposed `w` per tile.
    const W_ROWS: usize = 4;
    /// Accumulator registers of a tile when `w` is `[k, n]`.
    const ACCUMULATORS: usize = 16;
    /// How many tiles ahead `dots` prefetches a bf16 w (the line its rows
    /// will load then): on the seed config's output layer at one row this
    /// took 0.63 ms to 0.48. An f32 w ran no faster with it.
    const PREFETCH_TILES: usize = 2;
    /// The granularity of a thread's column range.
    pub const COLS: usize = 4 * LANES;

    /// A stored weight element, loaded 32 at a time as two vectors.
    pub trait Load: Copy {
        /// Whether `load32` splits even and odd elements (bf16), rather than
        /// giving the first and second 16 (f32).
        const SPLIT: bool;

        /// Elements p[0..32] as two vectors of 16 f32: the first `len` of
        /// them (1 to 32) loaded, the rest zero.
        ///
        /// # Safety
        /// p[0..len] readable; AVX-512 F and BW present.
        unsafe fn load32(p: *const Self, len: usize) -> (__m512, __m512);
    }

    impl Load for f32 {
        const SPLIT: bool = false;

        #[inline(always)]
        unsafe fn load32(p: *const f32, len: usize) -> (__m512, __m512) {
            // unmasked where possible: masked loads ran at half speed on Zen 4
            if len >= 2 * LANES {
                (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(LANES)))
            } else {
                let hi = _mm512_maskz_loadu_ps(mask(len.saturating_sub(LANES)), p.wrapping_add(LANES));
                (_mm512_maskz_loadu_ps(mask(len), p), hi)
            }
        }
    }

    impl Load for u16 {
        const SPLIT: bool = true;

        /// Each 32-bit lane holds two bf16 (the even element in its low
        /// half): shifting the lane up 16 bits widens the even one, masking
        /// its low half the odd one. Two cheap operations per 32 elements,
        /// where widening 16 at a time took a shuffle each.
        #[inline(always)]
        unsafe fn load32(p: *const u16, len: usize) -> (__m512, __m512) {
            let v = if len >= 2 * LANES {
                _mm512_loadu_si512(p as *const __m512i)
            } else {
                _mm512_maskz_loadu_epi16(((1u64 << len) - 1) as __mmask32, p as *const i16)
            };
            let even = _mm512_slli_epi32::<16>(v);
            let odd = _mm512_and_si512(v, _mm512_set1_epi32(0xffff_0000u32 as i32));
            (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
        }
    }

    /// a [m, k] rounded to bf16 and laid out as `u16::load32` splits a
    /// transposed w: each row padded with zeros to a multiple of 32, each 32
    /// as its 16 even elements then its 16 odd ones.
    pub fn split(a: &[f32], m: usize, k: usize) -> Vec<f32> {
        let ld = k.div_ceil(2 * LANES) * 2 * LANES;
        let mut out = vec![0.0f32; m * ld];
        for (row, dst) in a.chunks_exact(k).zip(out.chunks_exact_mut(ld)) {
            for (p, &x) in row.iter().enumerate() {
                let (group, at) = (p / (2 * LANES), p % (2 * LANES));
                dst[group * 2 * LANES + (at % 2) * LANES + at / 2] = super::from_bf16(super::to_bf16(x));
            }
        }
        out
    }

    /// The first `len` lanes (all of them from 16 up).
    #[inline(always)]
    fn mask(len: usize) -> __mmask16 {
        if len >= LANES {
            0xffff
        } else {
            ((1u32 << len) - 1) as __mmask16
        }
    }

    /// Call `$tile::<E, $extra, R>` with R = `$rows` (1 to ROWS) a constant,
    /// so each tile size compiles to its own fully unrolled loop.
    macro_rules! by_rows {
        ($tile:ident, $rows:expr, $extra:tt, $($arg:expr),*) => {
            match $rows {
                4 => $tile::<E, $extra, 4>($($arg),*),
                3 => $tile::<E, $extra, 3>($($arg),*),
                2 => $tile::<E, $extra, 2>($($arg),*),
                _ => $tile::<E, $extra, 1>($($arg),*),
            }
        };
    }

    /// block[m, cols] = a[m,k] @ op(w)[:, j0..j0 + cols], tile by tile; a's
    /// rows lda apart (laid out by `split` for a transposed bf16 w).
    ///
    /// # Safety
    /// AVX-512 F, BW and VL present; w holds `k * n` elements, a `m * lda`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn block<E: Load>(block: &mut [f32], a: &[f32], lda: usize, m: usize, k: usize, n: usize, w: &[E], w_trans: bool, j0: usize) {
        let cols = block.len() / m;
        let (a, w, out) = (a.as_ptr(), w.as_ptr(), block.as_mut_ptr());
        for i0 in (0..m).step_by(ROWS) {
            let rows = ROWS.min(m - i0);
            let (a, out) = (a.add(i0 * lda), out.add(i0 * cols));
            if w_trans {
                for j in (0..cols).step_by(W_ROWS) {
                    let (w, out) = (w.add((j0 + j) * k), out.add(j));
                    match (cols - j).min(W_ROWS) {
                        4 => by_rows!(dots, rows, 4, a, lda, w, k, out, cols),
                        3 => by_rows!(dots, rows, 3, a, lda, w, k, out, cols),
                        2 => by_rows!(dots, rows, 2, a, lda, w, k, out, cols),
                        _ => by_rows!(dots, rows, 1, a, lda, w, k, out, cols),
                    }
                }
            } else {
                // As many columns per tile as 16 accumulators hold: long
                // contiguous runs of each row of w stream best.
                let width = LANES * ACCUMULATORS / rows.next_power_of_two();
                for j in (0..cols).step_by(width) {
                    let (w, out, left) = (w.add(j0 + j), out.add(j), cols - j);
                    match rows {
                        4 => axpys::<E, 2, 4>(a, w, k, n, left, out, cols),
                        3 => axpys::<E, 2, 3>(a, w, k, n, left, out, cols),
                        2 => axpys::<E, 4, 2>(a, w, k, n, left, out, cols),
                        _ => axpys::<E, 8, 1>(a, w, k, n, left, out, cols),
                    }
                }
            }
        }
    }

    /// out[i * ld + j] = a_i . w_j for I rows of `a` and J rows of `w`.
    ///
    /// a: [I, lda] (split when E::SPLIT), w: [J, k] (rows k apart)
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn dots<E: Load, const J: usize, const I: usize>(a: *const f32, lda: usize, w: *const E, k: usize, out: *mut f32, ld: usize) {
        let mut acc = [[_mm512_setzero_ps(); I]; J];
        let mut wv = [(_mm512_setzero_ps(), _mm512_setzero_ps()); J];
        for p in (0..k).step_by(2 * LANES) {
            let len = k - p;
            for (j, v) in wv.iter_mut().enumerate() {
                *v = E::load32(w.add(j * k + p), len);
                if E::SPLIT {
                    // a bf16 w
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((j + PREFETCH_TILES * J) * k + p) as *const i8);
                }
            }
            for i in 0..I {
                // a split row is padded: its loads are whole
                let (x0, x1) = f32::load32(a.add(i * lda + p), if E::SPLIT { 2 * LANES } else { len });
                for j in 0..J {
                    acc[j][i] = _mm512_fmadd_ps(wv[j].1, x1, _mm512_fmadd_ps(wv[j].0, x0, acc[j][i]));
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (i, v) in acc.iter().enumerate() {
                *out.add(i * ld + j) = _mm512_reduce_add_ps(*v);
            }
        }
    }

    /// out[i * ld + j] = sum_p a[i][p] * w[p * n + j] for I rows of `a`
    /// and the first `cols` (up to 32 * G) columns of `w`.
    ///
    /// a: [I, k], w: [k, n] from the tile's first column
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn axpys<E: Load, const G: usize, const I: usize>(a: *const f32, w: *const E, k: usize, n: usize, cols: usize, out: *mut f32, ld: usize) {
        let live = cols.div_ceil(2 * LANES).min(G);
        let zero = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut acc = [[zero; G]; I];
        let mut wv = [zero; G];
        for p in 0..k {
            let row = w.wrapping_add(p * n);
            for g in 0..G {
                if g < live {
                    wv[g] = E::load32(row.wrapping_add(2 * LANES * g), cols - 2 * LANES * g);
                }
            }
            for i in 0..I {
                let x = _mm512_set1_ps(*a.add(i * k + p));
                for g in 0..G {
                    if g < live {
                        acc[i][g] = (_mm512_fmadd_ps(x, wv[g].0, acc[i][g].0), _mm512_fmadd_ps(x, wv[g].1, acc[i][g].1));
                    }
                }
            }
        }
        // split sums back to column order: lanes 0..16 take the first 8 even
        // and odd columns in turn, lanes 16..32 the last 8
        let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        for (i, acc) in acc.iter().enumerate() {
            for (g, &(lo, hi)) in acc.iter().enumerate().take(live) {
                let (lo, hi) = if E::SPLIT {
                    (_mm512_permutex2var_ps(lo, first, hi), _mm512_permutex2var_ps(lo, second, hi))
                } else {
                    (lo, hi)
                };
                let (at, left) = (out.wrapping_add(i * ld + 2 * LANES * g), cols - 2 * LANES * g);
                _mm512_mask_storeu_ps(at, mask(left), lo);
                _mm512_mask_storeu_ps(at.wrapping_add(LANES), mask(left.saturating_sub(LANES)), hi);
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::rand_vec;

    /// c = a @ op(w) in f64 from the operands as multiplied (a rounded to
    /// bf16 when w is), and sum |a||w| per element.
    fn reference(m: usize, n: usize, k: usize, a: &[f32], w: &[f32], w_trans: bool, round: bool) -> (Vec<f64>, Vec<f64>) {
        let r = |x: f32| if round { from_bf16(to_bf16(x)) as f64 } else { x as f64 };
        let (mut c, mut mag) = (vec![0.0; m * n], vec![0.0; m * n]);
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let wv = if w_trans { w[j * k + p] } else { w[p * n + j] };
                    c[i * n + j] += r(a[i * k + p]) * r(wv);
                    mag[i * n + j] += (r(a[i * k + p]) * r(wv)).abs();
                }
            }
        }
        (c, mag)
    }

    #[test]
    fn matches_exact_products_for_every_tile_shape() {
        if !supported() {
            eprintln!("skipped: this CPU lacks AVX-512, so matmul::product never takes this path here");
            return;
        }
        // k and n around the 16-lane vectors and the 64-column tiles;
        // m from 1 to MAX_ROWS covers every tile height and remainder
        for &(m, n, k) in &[(1, 1, 1), (1, 300, 17), (2, 65, 16), (3, 17, 33), (4, 64, 15), (5, 129, 100), (7, 1000, 40), (16, 70, 31)] {
            let a = rand_vec(m * k, 1);
            let w = rand_vec(k * n, 2);
            let w16: Vec<u16> = w.iter().map(|&x| to_bf16(x)).collect();
            let w_rounded: Vec<f32> = w16.iter().map(|&h| from_bf16(h)).collect();
            for w_trans in [false, true] {
                for bf16 in [false, true] {
                    let operand = if bf16 { Operand::Bf16(&w16) } else { Operand::F32(&w) };
                    let (want, mag) = reference(m, n, k, &a, if bf16 { &w_rounded } else { &w }, w_trans, bf16);
                    for threads in [1, 3] {
                        let mut c = vec![0.5f32; m * n];
                        few_rows(m, n, k, &a, operand, w_trans, &mut c, false, threads);
                        let mut acc = vec![0.5f32; m * n];
                        few_rows(m, n, k, &a, operand, w_trans, &mut acc, true, threads);
                        for i in 0..m * n {
                            // f32 summation of exact products: k roundings
                            let tol = (k as f64 + 1.0) * 2f64.powi(-24) * mag[i] + 1e-30;
                            assert!((c[i] as f64 - want[i]).abs() <= tol, "[{m},{n},{k}] trans={w_trans} bf16={bf16} {i}: {} vs {}", c[i], want[i]);
                            assert!((acc[i] as f64 - (want[i] + 0.5)).abs() <= tol + 1e-6, "accumulate [{m},{n},{k}] {i}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn threads_do_not_change_the_bits() {
        if !supported() {
            eprintln!("skipped: this CPU lacks AVX-512");
            return;
        }
        let (m, n, k) = (6, 3000, 384);
        let (a, w) = (rand_vec(m * k, 3), rand_vec(k * n, 4));
        for w_trans in [false, true] {
            let run = |threads: usize| {
                let mut c = vec![0.0f32; m * n];
                few_rows(m, n, k, &a, Operand::F32(&w), w_trans, &mut c, false, threads);
                c
            };
            let one = run(1);
            for threads in [2, 5, 12] {
                assert!(one.iter().zip(run(threads)).all(|(x, y)| x.to_bits() == y.to_bits()), "threads={threads} trans={w_trans}");
            }
        }
    }
}
