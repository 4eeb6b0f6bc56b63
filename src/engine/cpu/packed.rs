//! Matrix multiply with the left operand packed once, for weights that stay fixed across calls (inference).
//!
//! The `gemm` crate packs both operands on every call and picks its register block from the product's shape;
//! with the small right operands of batch-1 inference (16..64 columns: one image's 4x4 Winograd tiles) its
//! 16x6 kernel ran at about 100 GFLOP/s here, and packing a 256x256 weight again for 16 columns costs as much
//! as the product. Here the weight is laid out once in panels of 8 rows ([panel][k][8]), the right operand is
//! read in place (row-major, as the Winograd transform and im2col write it), and the vector lanes run along
//! the product's columns: a register block is up to 24 rows x 16 columns or 8 rows x 48, so that 16 columns
//! still fill the machine.
//!
//! bf16: the same panels hold pairs of bf16 values (rows k and k+1 in one 32-bit word), the right operand is
//! converted to the same pairs per call, and `vdpbf16ps` accumulates in f32 (AVX512-BF16: 1.7x the f32 FMA
//! rate on this machine). Values are rounded to nearest even, as PyTorch's bf16 autocast rounds.
//!
//! Both kernels need AVX-512; `PackedLhs::f32` / `::bf16` return `None` on a CPU without it and the caller
//! keeps its portable path.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

use super::matmul::MatRef;
use super::scratch::with_buffer;

/// Rows per panel of the packed operand.
const MR: usize = 8;

/// Lanes per vector.
const LANES: usize = 16;

/// Depth (in elements, or bf16 pairs) multiplied per pass over the destination.
const DEPTH_CHUNK: usize = 512;

enum Panels {
    F32(Vec<f32>),
    /// Pairs of bf16 (k even in the low half), [panel][k/2][8].
    Bf16(Vec<u32>),
}

/// A `rows`×`depth` left operand laid out for the kernels below. See the module documentation.
pub struct PackedLhs {
    rows: usize,
    depth: usize,
    panels: Panels,
}

/// Whether this CPU runs the f32 kernel.
pub fn f32_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Whether this CPU runs the bf16 kernel.
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    return f32_supported() && std::arch::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// f32 → bf16 bits, rounded to nearest even (NaN stays NaN).
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// bf16 bits → f32 (exact).
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

impl PackedLhs {
    /// Packs `a` for the f32 kernel, or `None` when this CPU lacks AVX-512.
    pub fn f32(a: MatRef) -> Option<PackedLhs> {
        if !f32_supported() {
            return None;
        }
        let (rows, depth) = (a.rows, a.cols);
        let mut data = vec![0.0f32; rows.div_ceil(MR) * depth * MR];
        for (p, panel) in data.chunks_mut((depth * MR).max(1)).enumerate() {
            for (k, lanes) in panel.chunks_mut(MR).enumerate() {
                for (r, v) in lanes.iter_mut().enumerate().filter(|(r, _)| p * MR + r < rows) {
                    *v = a.at(p * MR + r, k);
                }
            }
        }
        Some(PackedLhs { rows, depth, panels: Panels::F32(data) })
    }

    /// Packs `a` rounded to bf16 for the bf16 kernel, or `None` when this CPU lacks AVX512-BF16.
    pub fn bf16(a: MatRef) -> Option<PackedLhs> {
        if !bf16_supported() {
            return None;
        }
        let (rows, depth) = (a.rows, a.cols);
        let pairs = depth.div_ceil(2);
        let mut data = vec![0u32; rows.div_ceil(MR) * pairs * MR];
        for (p, panel) in data.chunks_mut((pairs * MR).max(1)).enumerate() {
            for (kk, lanes) in panel.chunks_mut(MR).enumerate() {
                for (r, v) in lanes.iter_mut().enumerate().filter(|(r, _)| p * MR + r < rows) {
                    let (row, k) = (p * MR + r, 2 * kk);
                    *v = pair(a.at(row, k), if k + 1 < depth { a.at(row, k + 1) } else { 0.0 });
                }
            }
        }
        Some(PackedLhs { rows, depth, panels: Panels::Bf16(data) })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    /// dst (row-major `rows`×`b.cols`) = self · b, on the calling thread. `b` must be row-major (unit column
    /// stride); in bf16 it is rounded to bf16 first.
    pub fn multiply(&self, b: MatRef, dst: &mut [f32]) {
        self.multiply_threads(b, dst, 1)
    }

    /// As `multiply`, spread over `threads` of the rayon pool by bands of rows.
    pub fn multiply_threads(&self, b: MatRef, dst: &mut [f32], threads: usize) {
        assert_eq!(b.rows, self.depth, "inner dimensions differ");
        assert_eq!(b.col_stride, 1, "the right operand is read row by row");
        let n = b.cols;
        assert_eq!(dst.len(), self.rows * n, "destination has the wrong size");
        b.check();
        if self.rows == 0 || n == 0 {
            return;
        }
        // whole panels per band
        let band = if threads > 1 { self.rows.div_ceil(threads).next_multiple_of(MR) } else { self.rows };
        match &self.panels {
            Panels::F32(a) => {
                let b = Operand { data: b.data, ld: b.row_stride, depth: self.depth, cols: n };
                // SAFETY: `f32` built these panels only after checking for AVX-512F.
                banded(a, self.rows, band, b, dst, drive_f32)
            }
            Panels::Bf16(a) => with_pairs(b, |pairs| {
                let b = Operand { data: pairs, ld: n, depth: self.depth.div_ceil(2), cols: n };
                // SAFETY: `bf16` built these panels only after checking for AVX512-BF16.
                banded(a, self.rows, band, b, dst, drive_bf16)
            }),
        }
    }
}

/// Runs `drive` on bands of `band` rows in parallel (one band: on this thread).
fn banded<T: Sync>(
    a: &[T],
    rows: usize,
    band: usize,
    b: Operand<T>,
    dst: &mut [f32],
    drive: unsafe fn(&[T], usize, Operand<T>, &mut [f32]),
) {
    let panel = b.depth * MR;
    let run = |r0: usize, d: &mut [f32]| {
        let used = d.len() / b.cols;
        // SAFETY: the caller picked `drive` for panels built after checking the CPU's features; the band's
        // panels start at whole-panel offsets because `band` is a multiple of 8.
        unsafe { drive(&a[r0 / MR * panel..], used, b, d) }
    };
    if band >= rows {
        run(0, dst);
    } else {
        dst.par_chunks_mut(band * b.cols).enumerate().for_each(|(i, d)| run(i * band, d));
    }
}

/// The right operand as the kernels read it: `depth` rows of `cols` entries, `ld` apart.
struct Operand<'a, T> {
    data: &'a [T],
    ld: usize,
    depth: usize,
    cols: usize,
}

// By hand: derived impls would require `T: Copy`, but only the reference is copied.
impl<T> Clone for Operand<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Operand<'_, T> {}

thread_local! {
    static PAIRS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `b` converted to bf16 pairs ([k/2][cols], rows k and k+1 in one word), in this thread's scratch.
fn with_pairs<R>(b: MatRef, f: impl FnOnce(&[u32]) -> R) -> R {
    let (depth, n) = (b.rows, b.cols);
    with_buffer(&PAIRS, depth.div_ceil(2) * n, |buf| {
    for (kk, out) in buf.chunks_mut(n).enumerate() {
        let lo = &b.data[2 * kk * b.row_stride..][..n];
        if 2 * kk + 1 < depth {
            let hi = &b.data[(2 * kk + 1) * b.row_stride..][..n];
            for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
                *o = pair(l, h);
            }
        } else {
            for (o, &l) in out.iter_mut().zip(lo) {
                *o = pair(l, 0.0);
            }
        }
    }
    f(buf)
    })
}

/// Elsewhere no `PackedLhs` is ever built (`f32_supported` is false), so the drivers are never called.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn drive_f32(_: &[f32], _: usize, _: Operand<f32>, _: &mut [f32]) {
    unreachable!("packed operands are built only on x86-64 with AVX-512")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn drive_bf16(_: &[u32], _: usize, _: Operand<u32>, _: &mut [f32]) {
    unreachable!("packed operands are built only on x86-64 with AVX-512")
}

/// Mask of the first `w` lanes (1 ≤ w ≤ 16).
#[cfg(target_arch = "x86_64")]
fn lane_mask(w: usize) -> __mmask16 {
    (((1u32 << w) - 1) & 0xffff) as __mmask16
}

/// Generates the driver and the register-block kernel for one element type. The driver walks the columns in
/// blocks of 48 (the last block narrower), and for each the rows: 8 at a time with 3 or 2 vectors of columns,
/// 24 at a time (then 16 or 8) with one vector — every block keeps 16..24 accumulators in the 32 registers.
#[cfg(target_arch = "x86_64")]
macro_rules! kernels {
    ($drive:ident, $block:ident, $elem:ty, $features:literal, |$acc:ident, $av:ident, $bv:ident| $fma:expr,
     |$ptr:ident| $bcast:expr, |$mask:ident, $bptr:ident| $load:expr) => {
        /// # Safety
        /// The CPU must support the target features; `a` must be the panels of a `rows`×`b.depth` operand.
        #[target_feature(enable = $features)]
        unsafe fn $drive(a: &[$elem], rows: usize, b: Operand<$elem>, dst: &mut [f32]) {
            let panel = b.depth * MR;
            assert!(a.len() >= rows.div_ceil(MR) * panel, "packed operand too short");
            assert!(b.depth == 0 || b.data.len() >= (b.depth - 1) * b.ld + b.cols, "right operand too short");
            assert!(dst.len() >= rows * b.cols, "destination too short");
            if b.depth == 0 {
                dst[..rows * b.cols].fill(0.0);
            }
            // Depth in chunks, so that one block of the right operand (chunk x 48 columns) stays in L2 while
            // every row of the left one passes over it; later chunks add onto what the earlier ones stored.
            for k0 in (0..b.depth).step_by(DEPTH_CHUNK) {
            let depth = DEPTH_CHUNK.min(b.depth - k0);
            let mut j = 0;
            while j < b.cols {
                let w = (b.cols - j).min(3 * LANES);
                let vecs = w.div_ceil(LANES);
                let mask = lane_mask(w - (vecs - 1) * LANES);
                let mut i = 0;
                while i < rows {
                    let left = rows - i;
                    let (step, run): (usize, unsafe fn(_, _, _, _, _, _, _, _, _, _)) = match vecs {
                        3 => (MR, $block::<8, 3>),
                        2 => (MR, $block::<8, 2>),
                        _ if left > 16 => (24, $block::<24, 1>),
                        _ if left > 8 => (16, $block::<16, 1>),
                        _ => (8, $block::<8, 1>),
                    };
                    let used = step.min(left);
                    // SAFETY: rows i..i+step lie in panels i/8.. (padded to whole panels), depth k0..k0+depth
                    // inside each panel and b, columns j..j+w in b's rows and in dst's rows i..i+used, each
                    // checked above; the kernel touches only unmasked lanes and only `used` rows of dst.
                    unsafe {
                        run(
                            a.as_ptr().add(i / MR * panel + k0 * MR),
                            panel,
                            depth,
                            b.data.as_ptr().add(k0 * b.ld + j),
                            b.ld,
                            mask,
                            dst.as_mut_ptr().add(i * b.cols + j),
                            b.cols,
                            used,
                            k0 > 0,
                        )
                    };
                    i += step;
                }
                j += w;
            }
            }
        }

        /// c (R rows x V vectors) = Σ_k a[r][k] · b[k][..], or c += that when `add`; the last vector covers
        /// the lanes in `mask`; rows beyond `used` are computed (zero panels) but not stored.
        ///
        /// # Safety
        /// See the call in the driver.
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $block<const R: usize, const V: usize>(
            a: *const $elem,
            panel: usize,
            depth: usize,
            b: *const $elem,
            ldb: usize,
            $mask: __mmask16,
            c: *mut f32,
            ldc: usize,
            used: usize,
            add: bool,
        ) {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            if add {
                for (r, acc_r) in acc.iter_mut().enumerate().take(used) {
                    for (v, x) in acc_r.iter_mut().enumerate() {
                        let m = if v + 1 == V { $mask } else { 0xffff };
                        *x = unsafe { _mm512_maskz_loadu_ps(m, c.add(r * ldc + v * LANES)) };
                    }
                }
            }
            for k in 0..depth {
                let row = unsafe { b.add(k * ldb) };
                let $bv: [_; V] = std::array::from_fn(|v| {
                    let $bptr = unsafe { row.add(v * LANES) };
                    if v + 1 == V { unsafe { $load } } else { unsafe { _mm512_loadu_si512($bptr.cast()) } }
                });
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let $ptr = unsafe { a.add(r / MR * panel + k * MR + r % MR) };
                    let $av = unsafe { $bcast };
                    for ($acc, &$bv) in acc_r.iter_mut().zip(&$bv) {
                        *$acc = $fma;
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate().take(used) {
                for (v, &x) in acc_r.iter().enumerate() {
                    let out = unsafe { c.add(r * ldc + v * LANES) };
                    if v + 1 == V {
                        unsafe { _mm512_mask_storeu_ps(out, $mask, x) }
                    } else {
                        unsafe { _mm512_storeu_ps(out, x) }
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
kernels!(drive_f32, block_f32, f32, "avx512f",
    |acc, av, bv| _mm512_fmadd_ps(av, _mm512_castsi512_ps(bv), *acc),
    |p| _mm512_set1_ps(*p),
    |mask, p| _mm512_maskz_loadu_epi32(mask, p.cast()));

// SAFETY (the transmutes): __m512i and __m512bh are both 64 bytes of plain bits, valid for any contents.
#[cfg(target_arch = "x86_64")]
kernels!(drive_bf16, block_bf16, u32, "avx512f,avx512bf16",
    |acc, av, bv| _mm512_dpbf16_ps(*acc, av, unsafe { std::mem::transmute::<__m512i, __m512bh>(bv) }),
    |p| std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*p as i32)),
    |mask, p| _mm512_maskz_loadu_epi32(mask, p.cast()));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::matmul::matmul;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn rel(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den).sqrt()
    }

    /// Every register block and tail: rows not multiples of 8 or 24, columns around 16 and 48, odd depth.
    #[test]
    fn packed_products_match_the_reference() {
        if !f32_supported() {
            return;
        }
        for &(m, k, n) in &[(1, 1, 1), (8, 3, 16), (13, 7, 5), (24, 64, 16), (40, 33, 49), (64, 64, 196), (70, 9, 97), (20, 2100, 37), (100, 30, 20)]
        {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let mut want = vec![0.0; m * n];
            matmul(&mut want, MatRef::new(&a, m, k), MatRef::new(&b, k, n), false, 1);
            let mut got = vec![f32::NAN; m * n];
            PackedLhs::f32(MatRef::new(&a, m, k)).unwrap().multiply(MatRef::new(&b, k, n), &mut got);
            assert!(rel(&got, &want) < 1e-6, "f32 {m}x{k}x{n}: {}", rel(&got, &want));
            got.fill(f32::NAN);
            PackedLhs::f32(MatRef::new(&a, m, k)).unwrap().multiply_threads(MatRef::new(&b, k, n), &mut got, 3);
            assert!(rel(&got, &want) < 1e-6, "f32 {m}x{k}x{n} on 3 threads: {}", rel(&got, &want));
            if bf16_supported() {
                // the reference in f32 on operands rounded to bf16: only the summation order differs
                let round = |v: &[f32]| v.iter().map(|&x| from_bf16(to_bf16(x))).collect::<Vec<_>>();
                let (ar, br) = (round(&a), round(&b));
                matmul(&mut want, MatRef::new(&ar, m, k), MatRef::new(&br, k, n), false, 1);
                PackedLhs::bf16(MatRef::new(&a, m, k)).unwrap().multiply_threads(MatRef::new(&b, k, n), &mut got, 2);
                assert!(rel(&got, &want) < 1e-6, "bf16 {m}x{k}x{n}: {}", rel(&got, &want));
            }
        }
    }

    /// A right operand with rows longer than its columns (a column band of a larger matrix).
    #[test]
    fn strided_right_operand() {
        if !f32_supported() {
            return;
        }
        let (m, k, n, ld) = (16, 5, 20, 31);
        let (a, b) = (values(m * k, 3), values(k * ld, 4));
        let view = MatRef { data: &b, rows: k, cols: n, row_stride: ld, col_stride: 1 };
        let mut want = vec![0.0; m * n];
        matmul(&mut want, MatRef::new(&a, m, k), view, false, 1);
        let mut got = vec![0.0; m * n];
        PackedLhs::f32(MatRef::new(&a, m, k)).unwrap().multiply(view, &mut got);
        assert!(rel(&got, &want) < 1e-6);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0)
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }
}
