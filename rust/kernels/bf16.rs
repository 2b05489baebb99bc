//! bfloat16 matrix multiply: `c[m,n] (+)= bf16(op(a)) @ bf16(op(b))` with
//! float32 products and sums, for the CPUs that have AVX512_BF16.
//!
//! bf16 keeps float32's 8 exponent bits and 7 of its 23 mantissa bits, so
//! rounding an operand to it (nearest, ties to even) changes it by at most
//! 2^-8 of its magnitude. Products of two bf16 values are exact in f32, so
//! each element of the result obeys
//!
//!   |c - c_f32| <= (2^-7 + 2^-16) * sum_p |a_ip| |b_pj|  +  f32 summation error,
//!
//! i.e. a relative error of at most 7.8e-3 where the terms do not cancel
//! (about 2e-3 typically, the rounding errors being independent). The
//! tests check this bound and a relative error of at most 1e-2 on random
//! data.
//!
//! On CPUs with avx512_bf16 the product runs on `vdpbf16ps`, which does two
//! bf16 multiply-adds per f32 lane: twice the multiply-adds of an f32 FMA.
//! Operands are packed (and rounded to bf16 on the way) into panels in the
//! order the register-blocked microkernel reads them; blocks of rows run in
//! parallel on rayon. Elsewhere the same product is computed by rounding the
//! operands to bf16 in f32 buffers and running the float32 `sgemm`, so the
//! numbers mean the same thing everywhere, only slower.
//!
//! Matrices of bf16 values are stored as `u16` bit patterns (the top half of
//! the f32's bits).

use super::matmul::sgemm;
use super::vecmath::simd_dispatch;
use rayon::prelude::*;

/// How a model's matmuls multiply: in float32, or with bf16 operands and
/// float32 sums (everything else stays float32 either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Bf16,
}

impl Precision {
    /// "fp32" or "bf16".
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("precision must be 'fp32' or 'bf16', got {name:?}")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// A matrix operand as stored: float32 (rounded to bf16 when packed) or
/// already bf16.
#[derive(Clone, Copy)]
pub enum Operand<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Operand<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Operand::F32(x) => x.len(),
            Operand::Bf16(x) => x.len(),
        }
    }
}

/// f32 -> bf16 bits, rounded to nearest, ties to even; NaN stays a (quiet) NaN.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((bits >> 16) as u16) | 0x40
    } else {
        rounded
    }
}

/// bf16 bits -> f32 (exact).
#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[inline(always)]
fn round_slice(dst: &mut [u16], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_bf16(s);
    }
}

simd_dispatch! {
    /// dst[i] = bf16(src[i]) on this thread.
    ///
    /// dst, src: [len]
    pub fn round_to_bf16(dst: &mut [u16], src: &[f32]) => round_slice
}

/// dst[i] = bf16(src[i]), in parallel for long slices.
///
/// dst, src: [len]
pub fn cast_to_bf16(dst: &mut [u16], src: &[f32]) {
    /// Elements per parallel task.
    const CHUNK: usize = 1 << 16;
    assert_eq!(dst.len(), src.len(), "cast_to_bf16: {} outputs for {} inputs", dst.len(), src.len());
    if src.len() <= CHUNK {
        round_to_bf16(dst, src);
    } else {
        dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| round_to_bf16(d, s));
    }
}

/// dst[j, i] = bf16(src[i, j]): a matrix rounded and transposed, in
/// parallel over column blocks of src.
///
/// src: [rows, cols]
/// dst: [cols, rows]
pub fn cast_to_bf16_transposed(dst: &mut [u16], src: &[f32], rows: usize, cols: usize) {
    /// Columns of src per task: one cache line of each of its rows.
    const COLS: usize = 16;
    assert!(dst.len() == rows * cols && src.len() == rows * cols, "cast_to_bf16_transposed: {} outputs, {} inputs for {rows} x {cols}", dst.len(), src.len());
    if rows == 0 {
        return;
    }
    dst.par_chunks_mut(COLS * rows).enumerate().for_each(|(block, d)| {
        let j0 = block * COLS;
        for (i, row) in src.chunks_exact(cols).enumerate() {
            for (jj, &x) in row[j0..j0 + d.len() / rows].iter().enumerate() {
                d[jj * rows + i] = to_bf16(x);
            }
        }
    });
}

/// Whether this CPU runs the bf16 instructions (`vdpbf16ps`).
pub fn bf16_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Row-major bf16 GEMM with f32 accumulation:
/// `c[m,n] (+)= bf16(op(a))[m,k] @ bf16(op(b))[k,n]`.
///
/// a: `[m, k]`, or `[k, m]` when `a_trans`
/// b: `[k, n]`, or `[n, k]` when `b_trans`
/// c: `[m, n]`, overwritten unless `accumulate`
/// threads: 1 runs on the calling thread; more use the current rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn bf16_gemm(
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    a_trans: bool,
    b: Operand,
    b_trans: bool,
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    assert!(a.len() >= m * k, "bf16_gemm: a has {} elements, need {}", a.len(), m * k);
    assert!(b.len() >= k * n, "bf16_gemm: b has {} elements, need {}", b.len(), k * n);
    assert!(c.len() >= m * n, "bf16_gemm: c has {} elements, need {}", c.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if bf16_hardware() {
        #[cfg(target_arch = "x86_64")]
        packed::gemm(m, n, k, a, a_trans, packed::Right::Unpacked(b, b_trans), c, accumulate, threads);
    } else {
        bf16_gemm_emulated(m, n, k, a, a_trans, b, b_trans, c, accumulate, threads);
    }
}

/// The same product on any CPU: operands rounded to bf16 values held in
/// f32, then the float32 sgemm.
#[allow(clippy::too_many_arguments)]
pub fn bf16_gemm_emulated(
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    a_trans: bool,
    b: Operand,
    b_trans: bool,
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    let widen = |x: Operand, len: usize| -> Vec<f32> {
        match x {
            Operand::F32(v) => v[..len].iter().map(|&s| from_bf16(to_bf16(s))).collect(),
            Operand::Bf16(v) => v[..len].iter().map(|&h| from_bf16(h)).collect(),
        }
    };
    let (a, b) = (widen(a, m * k), widen(b, k * n));
    sgemm(m, n, k, &a, a_trans, &b, b_trans, c, accumulate, threads);
}

/// A right operand packed once, rounded to bf16, into the panels the
/// AVX512_BF16 product multiplies from: for a weight that many products
/// read between two updates (a training step's micro-batches each read
/// every matrix twice), so that no product packs it again.
pub struct PackedB {
    k: usize,
    n: usize,
    /// [ceil(k / KC)] blocks of [ceil(n / NR)][pairs][NR] (see `packed`).
    panels: Vec<u32>,
}

impl PackedB {
    /// op(b) packed, `[k, n]`, from b: `[k, n]`, or `[n, k]` when `b_trans`;
    /// in parallel on the current rayon pool. None where the CPU lacks
    /// avx512_bf16 (its products read a plain bf16 copy).
    pub fn new(b: Operand, b_trans: bool, k: usize, n: usize) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if bf16_hardware() {
            let mut packed = PackedB { k, n, panels: vec![0; packed::panels_len(k, n)] };
            packed.repack(b, b_trans);
            return Some(packed);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (b, b_trans, k, n);
        None
    }

    /// Pack `b` again (after it changed), in the same shape.
    pub fn repack(&mut self, b: Operand, b_trans: bool) {
        assert!(b.len() >= self.k * self.n, "PackedB: {} elements for {} x {}", b.len(), self.k, self.n);
        #[cfg(target_arch = "x86_64")]
        packed::pack_all(&mut self.panels, b, b_trans, self.k, self.n);
    }

    /// Bytes the panels take.
    pub fn bytes(&self) -> usize {
        self.panels.len() * std::mem::size_of::<u32>()
    }

    /// Bytes `new` allocates for a `[k, n]` operand on this CPU (0 without
    /// avx512_bf16); None when the count overflows.
    pub fn bytes_for(k: usize, n: usize) -> Option<u64> {
        if !bf16_hardware() {
            return Some(0);
        }
        #[cfg(target_arch = "x86_64")]
        return (k.div_ceil(2) as u64).checked_mul(n.checked_next_multiple_of(packed::NR)? as u64)?.checked_mul(std::mem::size_of::<u32>() as u64);
        #[cfg(not(target_arch = "x86_64"))]
        Some(0)
    }
}

/// `bf16_gemm` with a right operand packed beforehand: the same result, bit
/// for bit.
///
/// a: `[m, k]`, or `[k, m]` when `a_trans`
/// b: op(b), `[k, n]`
/// c: `[m, n]`, overwritten unless `accumulate`
#[allow(clippy::too_many_arguments)]
pub fn bf16_gemm_packed(m: usize, n: usize, k: usize, a: Operand, a_trans: bool, b: &PackedB, c: &mut [f32], accumulate: bool, threads: usize) {
    assert!((b.k, b.n) == (k, n), "bf16_gemm_packed: b is {} x {}, need {k} x {n}", b.k, b.n);
    assert!(a.len() >= m * k, "bf16_gemm_packed: a has {} elements, need {}", a.len(), m * k);
    assert!(c.len() >= m * n, "bf16_gemm_packed: c has {} elements, need {}", c.len(), m * n);
    #[cfg(target_arch = "x86_64")]
    packed::gemm(m, n, k, a, a_trans, packed::Right::Packed(&b.panels), c, accumulate, threads);
}

#[cfg(target_arch = "x86_64")]
mod packed {
    //! The AVX512_BF16 path. Packed layouts, with pairs of consecutive k
    //! (the two bf16 of each `vdpbf16ps` lane) held as one u32, low half
    //! first:
    //!
    //!   A block: [ceil(rows / MR)][KC / 2][MR]    pairs of one row, when
    //!            A's rows are contiguous (its transpose is stored);
    //!            [ceil(rows / MR) * MR][KC / 2]    when its k is: each row's
    //!            pairs in order, so packing is a conversion without a scatter
    //!   B block: [ceil(n / NR)][KC / 2][NR]       pairs of one column
    //!
    //! Rows and columns past the matrix and an odd k's last pair are zero.
    //! On one thread the product runs NC columns at a time (see `gemm`).

    use super::{to_bf16, Operand};
    use crate::kernels::SharedOut;
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::cell::Cell;
    use std::thread::LocalKey;

    /// Rows of the microkernel's tile.
    const MR: usize = 6;
    /// 16-lane vectors across the tile; NR columns.
    const NV: usize = 4;
    pub(super) const NR: usize = 16 * NV;
    /// k per block (even): a B micro-panel, KC x NR bf16, is 128 KiB and
    /// stays in L2. Fewer C tile updates pay more than L1 residency: on a
    /// Zen 5 core KC = 1024 ran 2.2x as fast as 128 and 1.15x as fast as 2048.
    const KC: usize = 1024;
    /// Rows per parallel task (a multiple of MR): its A block is 192 KiB.
    const MC: usize = 16 * MR;
    /// Rows per tile of a transposed A on one thread: its pack reads a few
    /// hundred bytes of each of k rows per tile, and longer runs let the
    /// hardware prefetch them (+4% on the seed bf16 training step, where
    /// the weight gradients' products are the transposed ones).
    const MC_TRANSPOSED: usize = 4 * MC;
    /// Columns per parallel task (a multiple of NR).
    const NC: usize = 16 * NR;

    /// An operand indexed (row, k): element (r, p) is `x[p * ld + r]` when
    /// its rows are contiguous, else `x[r * ld + p]` (its k is contiguous).
    #[derive(Clone, Copy)]
    struct Strided<'a> {
        x: Operand<'a>,
        ld: usize,
        rows_contiguous: bool,
    }

    /// f32 -> bf16 bits in the low half of each lane: `to_bf16` on 16 lanes.
    #[inline(always)]
    unsafe fn round16(v: __m512) -> __m512i {
        let bits = _mm512_castps_si512(v);
        let high = _mm512_srli_epi32(bits, 16);
        let bias = _mm512_add_epi32(_mm512_and_si512(high, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
        let rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
        let nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(high, _mm512_set1_epi32(0x40)))
    }

    /// The first `n` (at most 16) elements at `x[at..]` as bf16 bits, one per
    /// lane (low half); lanes past `n` are zero.
    #[inline(always)]
    unsafe fn load16(x: Operand, at: usize, n: usize) -> __m512i {
        match x {
            Operand::F32(x) => {
                let p = x[at..at + n].as_ptr();
                round16(if n == 16 { _mm512_loadu_ps(p) } else { _mm512_maskz_loadu_ps((1u32 << n) as u16 - 1, p) })
            }
            Operand::Bf16(x) => {
                let p = x[at..at + n].as_ptr() as *const __m256i;
                _mm512_cvtepu16_epi32(if n == 16 { _mm256_loadu_si256(p) } else { _mm256_maskz_loadu_epi16((1u32 << n) as u16 - 1, p as *const i16) })
            }
        }
    }

    /// Store the first `n` lanes of `v` at `dst[..n]`.
    #[inline(always)]
    unsafe fn store(dst: &mut [u32], v: __m512i, n: usize) {
        let p = dst[..n].as_mut_ptr();
        if n == 16 {
            _mm512_storeu_si512(p as *mut __m512i, v)
        } else {
            _mm512_mask_storeu_epi32(p as *mut i32, (1u32 << n) as u16 - 1, v)
        }
    }

    /// Pack rows [r0, r0 + rows) and k [k0, k0 + kc) of `src` into `dst` as
    /// panels of `w` rows: [ceil(rows/w)][kc/2][w], rounding to bf16.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BW.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn pack(dst: &mut [u32], src: Strided, r0: usize, rows: usize, k0: usize, kc: usize, w: usize) {
        match src.x {
            _ if src.rows_contiguous && w < 16 => pack_narrow(dst, src, r0, rows, k0, kc, w),
            Operand::F32(x) => pack_as(dst, x, to_bf16, src, r0, rows, k0, kc, w),
            Operand::Bf16(x) => pack_as(dst, x, |h| h, src, r0, rows, k0, kc, w),
        }
    }

    /// `pack` of an operand whose rows are contiguous into panels narrower
    /// than a vector (the A side's MR): each pair of k rows is combined 16
    /// columns at a time, then cut into the panels. Panel by panel, as
    /// `pack_as` does, it ran at half the speed. (The same vector code, or 16
    /// rows transposed in registers, made `pack_as`'s other cases slower.)
    #[inline(always)]
    unsafe fn pack_narrow(dst: &mut [u32], src: Strided, r0: usize, rows: usize, k0: usize, kc: usize, w: usize) {
        let pairs = kc.div_ceil(2);
        // lanes past `rows` stay zero: the last panel's padding
        let mut line = vec![0u32; rows.div_ceil(w) * w];
        for p in 0..pairs {
            let (lo, hi) = ((k0 + 2 * p) * src.ld + r0, (k0 + 2 * p + 1) * src.ld + r0);
            for g in (0..rows).step_by(16) {
                let n = 16.min(rows - g);
                let high = if 2 * p + 1 < kc { load16(src.x, hi + g, n) } else { _mm512_setzero_si512() };
                store(&mut line[g..], _mm512_or_si512(load16(src.x, lo + g, n), _mm512_slli_epi32(high, 16)), n);
            }
            for (panel, part) in line.chunks_exact(w).enumerate() {
                dst[(panel * pairs + p) * w..][..w].copy_from_slice(part);
            }
        }
    }

    /// `pack` for one element type; written as contiguous loops so that
    /// they vectorise.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn pack_as<T: Copy + Default>(
        dst: &mut [u32],
        x: &[T],
        round: impl Fn(T) -> u16,
        src: Strided,
        r0: usize,
        rows: usize,
        k0: usize,
        kc: usize,
        w: usize,
    ) {
        let pairs = kc.div_ceil(2);
        let pair = |lo: T, hi: T| round(lo) as u32 | (round(hi) as u32) << 16;
        // one row's pairs (k-contiguous case), then spread with stride w
        let mut line = vec![0u32; pairs];
        for (panel, out) in dst.chunks_exact_mut(pairs * w).take(rows.div_ceil(w)).enumerate() {
            let (first, valid) = (r0 + panel * w, w.min(rows - panel * w));
            if src.rows_contiguous {
                for p in 0..pairs {
                    let o = &mut out[p * w..(p + 1) * w];
                    let lo = &x[(k0 + 2 * p) * src.ld + first..][..valid];
                    if 2 * p + 1 < kc {
                        let hi = &x[(k0 + 2 * p + 1) * src.ld + first..][..valid];
                        for ((d, &a), &b) in o.iter_mut().zip(lo).zip(hi) {
                            *d = pair(a, b);
                        }
                    } else {
                        for (d, &a) in o.iter_mut().zip(lo) {
                            *d = pair(a, T::default());
                        }
                    }
                    o[valid..].fill(0);
                }
            } else {
                for i in 0..w {
                    if i >= valid {
                        (0..pairs).for_each(|p| out[p * w + i] = 0);
                        continue;
                    }
                    row_pairs(&mut line, &x[(first + i) * src.ld + k0..][..kc], &pair);
                    for (p, &v) in line.iter().enumerate() {
                        out[p * w + i] = v;
                    }
                }
            }
        }
    }

    /// Rows [r0, r0 + rows) and k [k0, k0 + kc) of a k-contiguous `x` with
    /// `ld` elements per row, as rows of bf16 pairs: [ceil(rows/MR) * MR][kc/2],
    /// the rows past `rows` zero.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BW.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn pack_rows(dst: &mut [u32], x: Operand, ld: usize, r0: usize, rows: usize, k0: usize, kc: usize) {
        match x {
            Operand::F32(x) => pack_rows_as(dst, x, to_bf16, ld, r0, rows, k0, kc),
            Operand::Bf16(x) => pack_rows_as(dst, x, |h| h, ld, r0, rows, k0, kc),
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn pack_rows_as<T: Copy + Default>(dst: &mut [u32], x: &[T], round: impl Fn(T) -> u16, ld: usize, r0: usize, rows: usize, k0: usize, kc: usize) {
        let pairs = kc.div_ceil(2);
        let pair = |lo: T, hi: T| round(lo) as u32 | (round(hi) as u32) << 16;
        for (i, out) in dst.chunks_exact_mut(pairs).take(rows.div_ceil(MR) * MR).enumerate() {
            if i >= rows {
                out.fill(0);
                continue;
            }
            row_pairs(out, &x[(r0 + i) * ld + k0..][..kc], &pair);
        }
    }

    /// dst[p] = pair(row[2p], row[2p + 1]), the last pair's high half zero
    /// for a row of odd length; dst: [ceil(row.len() / 2)].
    #[inline(always)]
    fn row_pairs<T: Copy + Default>(dst: &mut [u32], row: &[T], pair: &impl Fn(T, T) -> u32) {
        let (whole, last) = row.split_at(row.len() & !1);
        for (d, ab) in dst.iter_mut().zip(whole.chunks_exact(2)) {
            *d = pair(ab[0], ab[1]);
        }
        if let Some(&a) = last.first() {
            dst[whole.len() / 2] = pair(a, T::default());
        }
    }

    /// c[rows, cols] (+)= the product of an A micro-panel, [pairs][MR] when
    /// `a_rows` is 1 or MR rows of `a_rows` pairs each, and a B micro-panel
    /// [pairs][NR]; `rows <= MR`, `cols <= NR`.
    ///
    /// # Safety
    /// The CPU has avx512_bf16; `a` and `b` hold `pairs` full rows of their
    /// panels; `c` reaches `rows` rows of stride `ldc` and `cols` columns.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    unsafe fn microkernel(pairs: usize, a: *const u32, a_rows: usize, b: *const u32, c: *mut f32, ldc: usize, rows: usize, cols: usize, load_c: bool) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        // The tile of c, read or written after the k loop, is fetched now so
        // that the loop hides its latency: the output layer's weight
        // gradient (46 MB on the seed config) is read from memory tile by
        // tile. That product ran 10% faster alone, the bf16 step about 1%.
        for r in 0..rows {
            for v in 0..cols.div_ceil(16) {
                let line = c.add(r * ldc + 16 * v) as *const i8;
                if load_c {
                    _mm_prefetch::<_MM_HINT_T0>(line);
                } else {
                    _mm_prefetch::<_MM_HINT_ET0>(line);
                }
            }
        }
        // pair p of row r is at a[r * a_rows + p * a_pairs]
        let a_pairs = if a_rows == 1 { MR } else { 1 };
        for p in 0..pairs {
            let bp = b.add(p * NR);
            let mut bv = [_mm512_setzero_si512(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(bp.add(16 * v) as *const __m512i);
            }
            let ap = a.add(p * a_pairs);
            for (r, row) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r * a_rows) as i32));
                for (x, bx) in row.iter_mut().zip(&bv) {
                    *x = _mm512_dpbf16_ps(*x, av, std::mem::transmute::<__m512i, __m512bh>(*bx));
                }
            }
        }
        for (r, row) in acc.iter().enumerate().take(rows) {
            for (v, x) in row.iter().enumerate() {
                let col = 16 * v;
                if col >= cols {
                    break;
                }
                let ptr = c.add(r * ldc + col);
                let mask: __mmask16 = if cols - col >= 16 { 0xffff } else { (1u16 << (cols - col)) - 1 };
                let sum = if load_c { _mm512_add_ps(*x, _mm512_maskz_loadu_ps(mask, ptr)) } else { *x };
                _mm512_mask_storeu_ps(ptr, mask, sum);
            }
        }
    }

    /// The right operand of a product: as stored, packed block by block
    /// as the product goes, or packed beforehand (`PackedB`).
    #[derive(Clone, Copy)]
    pub(super) enum Right<'a> {
        /// b: `[k, n]`, or `[n, k]` when the flag is set.
        Unpacked(Operand<'a>, bool),
        /// Every block's panels, [ceil(k / KC)][ceil(n / NR)][pairs][NR].
        Packed(&'a [u32]),
    }

    /// Elements of a whole packed right operand `[k, n]`: every k block's
    /// panels, all but the last block KC deep.
    pub(super) fn panels_len(k: usize, n: usize) -> usize {
        k.div_ceil(2) * n.div_ceil(NR) * NR
    }

    /// Where k block `k0`'s panels start in a whole packed operand.
    fn block_offset(k0: usize, n: usize) -> usize {
        panels_len(k0, n)
    }

    /// Pack all of op(b) `[k, n]` into `dst` (`panels_len(k, n)` long), in
    /// parallel over panels.
    pub(super) fn pack_all(dst: &mut [u32], b: Operand, b_trans: bool, k: usize, n: usize) {
        let sb = right_strided(b, b_trans, k, n);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let panel = kc.div_ceil(2) * NR;
            let block = &mut dst[block_offset(k0, n)..][..n.div_ceil(NR) * panel];
            // SAFETY: PackedB packs only on a CPU with avx512_bf16.
            block.par_chunks_mut(panel).enumerate().for_each(|(j, d)| unsafe { pack(d, sb, j * NR, NR.min(n - j * NR), k0, kc, NR) });
        }
    }

    /// op(b)^T indexed (column j, k p), for b: `[k, n]`, or `[n, k]` when `b_trans`.
    fn right_strided(b: Operand, b_trans: bool, k: usize, n: usize) -> Strided {
        if b_trans {
            Strided { x: b, ld: k, rows_contiguous: false }
        } else {
            Strided { x: b, ld: n, rows_contiguous: true }
        }
    }

    thread_local! {
        /// Packing buffers kept per thread between calls: a fresh one per
        /// call costs page faults that dwarf the product for few rows.
        static PACK_A: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
        static PACK_B: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    }

    /// Run `f` on `len` elements of this thread's buffer `key` (taken, so a
    /// nested call on the same thread gets a buffer of its own).
    fn with_buffer<R>(key: &'static LocalKey<Cell<Vec<u32>>>, len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
        let mut buf = key.take();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let r = f(&mut buf[..len]);
        key.set(buf);
        r
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(m: usize, n: usize, k: usize, a: Operand, a_trans: bool, b: Right, c: &mut [f32], accumulate: bool, threads: usize) {
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                c[..m * n].fill(0.0);
            }
            return;
        }
        // op(a) indexed (row i, k p); op(b)^T indexed (column j, k p).
        let sa = if a_trans { Strided { x: a, ld: m, rows_contiguous: true } } else { Strided { x: a, ld: k, rows_contiguous: false } };
        let out = SharedOut(c.as_mut_ptr()); // tasks write disjoint tiles
        // On one thread, NC columns at a time: each block's packed B is used
        // by every row tile while it is still in cache, where packing all of
        // B first would send it to memory and back (the output layer's is
        // 23 MB). In parallel the tasks are the tiles of the whole product.
        let block = if threads > 1 { n } else { NC };
        let b_panels = match b {
            Right::Unpacked(..) => block.min(n).div_ceil(NR),
            Right::Packed(_) => 0,
        };
        with_buffer(&PACK_B, b_panels * KC.min(k).div_ceil(2) * NR, |buffer| {
            let mc = if a_trans && threads == 1 { MC_TRANSPOSED } else { MC };
            for j0 in (0..n).step_by(block) {
                let nb = block.min(n - j0);
                let tiles: Vec<(usize, usize)> =
                    (0..m.div_ceil(mc)).flat_map(|i| (0..nb.div_ceil(NC)).map(move |j| (i * mc, j0 + j * NC))).collect();
                for k0 in (0..k).step_by(KC) {
                    let kc = KC.min(k - k0);
                    let pairs = kc.div_ceil(2);
                    let panel = pairs * NR;
                    let bpack: &[u32] = match b {
                        Right::Packed(all) => &all[block_offset(k0, n) + j0 / NR * panel..][..nb.div_ceil(NR) * panel],
                        Right::Unpacked(b, b_trans) => {
                            let sb = right_strided(b, b_trans, k, n);
                            let bpack = &mut buffer[..nb.div_ceil(NR) * panel];
                            // SAFETY (both calls): bf16_gemm only comes here on a CPU with avx512_bf16.
                            let pack_b = |(j, dst): (usize, &mut [u32])| unsafe { pack(dst, sb, j0 + j * NR, NR.min(n - j0 - j * NR), k0, kc, NR) };
                            if threads > 1 {
                                bpack.par_chunks_mut(panel).enumerate().for_each(pack_b);
                            } else {
                                bpack.chunks_mut(panel).enumerate().for_each(pack_b);
                            }
                            bpack
                        }
                    };
                    let load_c = accumulate || k0 > 0;
                    let tile = |&(i0, jt): &(usize, usize)| {
                        let rows = mc.min(m - i0);
                        with_buffer(&PACK_A, rows.div_ceil(MR) * pairs * MR, |apack| {
                            // a k-contiguous A keeps its rows (no scatter into panels)
                            let a_rows = if a_trans {
                                unsafe { pack(apack, sa, i0, rows, k0, kc, MR) };
                                1
                            } else {
                                unsafe { pack_rows(apack, sa.x, k, i0, rows, k0, kc) };
                                pairs
                            };
                            for j in (jt..(j0 + nb).min(jt + NC)).step_by(NR) {
                                let bp = &bpack[((j - j0) / NR) * panel..];
                                for (ip, ap) in apack.chunks_exact(pairs * MR).enumerate() {
                                    let i = i0 + ip * MR;
                                    // SAFETY: the tile [i, i+MR) x [j, j+NR) clipped to
                                    // m x n lies in c and belongs to this task alone.
                                    unsafe {
                                        microkernel(pairs, ap.as_ptr(), a_rows, bp.as_ptr(), out.at(i * n + j), n, MR.min(m - i), NR.min(n - j), load_c)
                                    };
                                }
                            }
                        })
                    };
                    if threads > 1 {
                        tiles.par_iter().for_each(tile);
                    } else {
                        tiles.iter().for_each(tile);
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::rand_vec;

    fn transpose(r: usize, c: usize, x: &[f32]) -> Vec<f32> {
        (0..r * c).map(|i| x[(i % r) * c + i / r]).collect()
    }

    /// (exact product of the bf16-rounded operands, f32 product, sum_p |a||b|), in f64.
    fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let r = |x: f32| from_bf16(to_bf16(x)) as f64;
        let (mut q, mut f, mut s) = (vec![0.0; m * n], vec![0.0; m * n], vec![0.0; m * n]);
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let (x, y) = (a[i * k + p], b[p * n + j]);
                    q[i * n + j] += r(x) * r(y);
                    f[i * n + j] += x as f64 * y as f64;
                    s[i * n + j] += (x as f64 * y as f64).abs();
                }
            }
        }
        (q, f, s)
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1.
        assert_eq!(to_bf16(1.0 + 2f32.powi(-8)), to_bf16(1.0));
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up.
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 * 2f32.powi(-8))), 1.0 + 2f32.powi(-6));
        assert_eq!(from_bf16(to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20))), 1.0 + 2f32.powi(-7));
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
        assert_eq!(from_bf16(to_bf16(f32::NEG_INFINITY)), f32::NEG_INFINITY);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert!(from_bf16(to_bf16(f32::from_bits(0x7f80_0001))).is_nan(), "a NaN whose payload is in the low bits");
        let xs = rand_vec(100_003, 1);
        let mut bulk = vec![0u16; xs.len()];
        cast_to_bf16(&mut bulk, &xs);
        for (x, h) in xs.iter().zip(&bulk) {
            assert_eq!(*h, to_bf16(*x));
            assert!((from_bf16(*h) - x).abs() <= x.abs() * 2f32.powi(-8));
        }
    }

    #[test]
    fn the_transposed_cast_rounds_each_element_into_its_transposed_place() {
        // one column, fewer and more columns than a task's 16, a ragged last task
        for (rows, cols) in [(1, 1), (3, 17), (40, 33), (7, 16), (0, 5)] {
            let xs = rand_vec(rows * cols, (rows * 100 + cols) as u64);
            let mut t = vec![0u16; rows * cols];
            cast_to_bf16_transposed(&mut t, &xs, rows, cols);
            let want: Vec<u16> = transpose(rows, cols, &xs).iter().map(|&x| to_bf16(x)).collect();
            assert_eq!(t, want, "{rows} x {cols}");
        }
    }

    /// Check `gemm` on odd shapes, every transpose, both operand types,
    /// overwrite and accumulate, against the bound in the header.
    fn check(gemm: fn(usize, usize, usize, Operand, bool, Operand, bool, &mut [f32], bool, usize)) {
        // k = 2100 spans three of the packed path's k blocks
        // n = 1300 spans two of its column blocks on one thread, m = 401 two
        // row tiles of a transposed A
        for &(m, n, k) in &[(1, 1, 1), (7, 5, 3), (37, 70, 53), (100, 130, 600), (13, 1, 300), (3, 700, 40), (20, 70, 2100), (9, 1300, 71), (401, 20, 33)] {
            let a = rand_vec(m * k, 2);
            let b = rand_vec(k * n, 3);
            let (exact, f32ref, mag) = reference(m, n, k, &a, &b);
            let (at, bt) = (transpose(m, k, &a), transpose(k, n, &b));
            let a16: Vec<u16> = a.iter().map(|&x| to_bf16(x)).collect();
            let at16: Vec<u16> = at.iter().map(|&x| to_bf16(x)).collect();
            let bt16: Vec<u16> = bt.iter().map(|&x| to_bf16(x)).collect();
            let b16: Vec<u16> = b.iter().map(|&x| to_bf16(x)).collect();
            let cases = [
                (Operand::F32(&a), false, Operand::F32(&b), false),
                (Operand::F32(&at), true, Operand::F32(&b), false),
                (Operand::Bf16(&a16), false, Operand::F32(&bt), true),
                (Operand::F32(&at), true, Operand::Bf16(&bt16), true),
                (Operand::F32(&a), false, Operand::Bf16(&bt16), true),
                (Operand::Bf16(&a16), false, Operand::Bf16(&b16), false),
                (Operand::Bf16(&at16), true, Operand::F32(&b), false),
            ];
            for (ca, ta, cb, tb) in cases {
                for threads in [1, 3] {
                    let mut c = vec![0.5f32; m * n];
                    gemm(m, n, k, ca, ta, cb, tb, &mut c, false, threads);
                    let (mut err, mut norm) = (0.0f64, 0.0f64);
                    let sum_err = k as f64 * 2f64.powi(-24); // f32 summation, relative to mag
                    for i in 0..m * n {
                        let got = c[i] as f64;
                        // the same bf16 products, summed in another order in f32
                        assert!((got - exact[i]).abs() <= sum_err * mag[i], "[{m},{n},{k}] {i}: {got} vs {}", exact[i]);
                        assert!((got - f32ref[i]).abs() <= (2f64.powi(-7) + 2f64.powi(-16) + sum_err) * mag[i]);
                        err += (got - f32ref[i]).powi(2);
                        norm += f32ref[i].powi(2);
                    }
                    assert!((err / norm).sqrt() <= 1e-2, "[{m},{n},{k}] relative error {}", (err / norm).sqrt());
                    let mut acc = vec![0.5f32; m * n];
                    gemm(m, n, k, ca, ta, cb, tb, &mut acc, true, threads);
                    for (x, y) in acc.iter().zip(&c) {
                        assert!((x - (y + 0.5)).abs() <= 1e-5 * (1.0 + y.abs()), "accumulate: {x} vs {y} + 0.5");
                    }
                }
            }
        }
    }

    #[test]
    fn emulated_product_is_within_the_bf16_bound() {
        check(bf16_gemm_emulated);
    }

    #[test]
    fn hardware_product_is_within_the_bf16_bound() {
        if !bf16_hardware() {
            eprintln!("skipped: this CPU lacks avx512_bf16, so only the emulated bf16 product runs here");
            return;
        }
        check(bf16_gemm);
    }

    #[test]
    fn a_right_operand_packed_beforehand_gives_the_same_bits() {
        if !bf16_hardware() {
            assert!(PackedB::new(Operand::F32(&[1.0]), false, 1, 1).is_none());
            eprintln!("skipped: this CPU lacks avx512_bf16, so nothing is packed beforehand");
            return;
        }
        // k = 2100: three k blocks; n = 1300: two column blocks on one thread
        for &(m, n, k) in &[(1, 1, 1), (37, 70, 53), (20, 70, 2100), (9, 1300, 71), (401, 20, 33)] {
            let (a, at) = (rand_vec(m * k, 6), rand_vec(k * m, 7));
            let (b, b16) = (rand_vec(k * n, 8), rand_vec(k * n, 9).iter().map(|&x| to_bf16(x)).collect::<Vec<_>>());
            for (right, b_trans) in [(Operand::F32(&b), false), (Operand::F32(&b), true), (Operand::Bf16(&b16), true)] {
                // packed from other values first: repack must replace them all
                let mut packed = PackedB::new(Operand::F32(&rand_vec(k * n, 10)), b_trans, k, n).expect("avx512_bf16");
                packed.repack(right, b_trans);
                for (left, a_trans) in [(Operand::F32(&a), false), (Operand::F32(&at), true)] {
                    for (threads, accumulate) in [(1, false), (3, true)] {
                        let (mut want, mut got) = (vec![0.5f32; m * n], vec![0.5f32; m * n]);
                        bf16_gemm(m, n, k, left, a_trans, right, b_trans, &mut want, accumulate, threads);
                        bf16_gemm_packed(m, n, k, left, a_trans, &packed, &mut got, accumulate, threads);
                        assert!(want.iter().zip(&got).all(|(x, y)| x.to_bits() == y.to_bits()), "[{m},{n},{k}] b_trans {b_trans} a_trans {a_trans} threads {threads}");
                    }
                }
            }
        }
    }

    #[test]
    fn hardware_and_emulated_products_agree_bit_for_bit_on_exact_sums() {
        // Small integers are exact in bf16 and their sums exact in f32, so
        // any summation order gives the same bits.
        if !bf16_hardware() {
            eprintln!("skipped: this CPU lacks avx512_bf16");
            return;
        }
        let (m, n, k) = (50, 140, 700);
        let ints = |len: usize, s: u64| -> Vec<f32> { rand_vec(len, s).iter().map(|x| (x * 8.0).round()).collect() };
        let (a, b) = (ints(m * k, 4), ints(k * n, 5));
        let (mut x, mut y) = (vec![0.0; m * n], vec![0.0; m * n]);
        bf16_gemm(m, n, k, Operand::F32(&a), false, Operand::F32(&b), false, &mut x, false, 2);
        bf16_gemm_emulated(m, n, k, Operand::F32(&a), false, Operand::F32(&b), false, &mut y, false, 2);
        assert_eq!(x, y);
    }

    #[test]
    fn packed_operands_are_rounded_like_to_bf16() {
        if !bf16_hardware() {
            eprintln!("skipped: this CPU lacks avx512_bf16");
            return;
        }
        // ties both ways, values just off a tie, zeros, across more than one
        // 16-lane block with a remainder (multiplied by an identity: finite)
        let tie = 2f32.powi(-8);
        let mut x = vec![1.0 + tie, 1.0 + 3.0 * tie, -(1.0 + tie + 2f32.powi(-20)), 2.5, -0.0, 0.0, 3.0e38];
        x.extend(rand_vec(30, 9));
        let k = x.len();
        let eye: Vec<f32> = (0..k * k).map(|i| if i / k == i % k { 1.0 } else { 0.0 }).collect();
        let want: Vec<u16> = x.iter().map(|&v| to_bf16(v)).collect();
        let same = |c: &[f32], what: &str| {
            for (i, (&got, &h)) in c.iter().zip(&want).enumerate() {
                let expect = from_bf16(h);
                assert_eq!(got, expect, "{what} {i}");
            }
        };
        for (trans, name) in [(false, "k-contiguous"), (true, "rows-contiguous")] {
            // x as the left operand [1, k] (its transpose is the same vector)
            let mut c = vec![0.0; k];
            bf16_gemm(1, k, k, Operand::F32(&x), trans, Operand::F32(&eye), false, &mut c, false, 1);
            same(&c, &format!("left {name}"));
            // x as the right operand, one column [k, 1] or one row [1, k] transposed
            let mut c = vec![0.0; k];
            bf16_gemm(k, 1, k, Operand::F32(&eye), false, Operand::F32(&x), trans, &mut c, false, 1);
            same(&c, &format!("right {name}"));
        }
        // what overflows or is not a number, one element at a time
        for v in [f32::MAX, f32::NEG_INFINITY, f32::NAN, f32::from_bits(0x7f80_0001), f32::from_bits(0xff80_0001)] {
            let want = from_bf16(to_bf16(v));
            for trans in [false, true] {
                for (a, b) in [(v, 1.0), (1.0, v)] {
                    let mut c = [0.0];
                    bf16_gemm(1, 1, 1, Operand::F32(&[a]), trans, Operand::F32(&[b]), trans, &mut c, false, 1);
                    assert!(c[0] == want || (c[0].is_nan() && want.is_nan()), "{v}: {} vs {want}", c[0]);
                }
            }
        }
    }
}
