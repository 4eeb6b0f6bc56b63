//! Matrix multiply with the left operand packed once, for weights that stay fixed across calls (inference).
//!
//! The `gemm` crate packs both operands on every call and picks its register block from the product's shape;
//! with the small right operands of batch-1 inference (16..64 columns: one image's 4x4 Winograd tiles) its
//! 16x6 kernel ran at about 100 GFLOP/s here, and packing a 256x256 weight again for 16 columns costs as much
//! as the product. Here the weight is laid out once in panels of 8 rows ([panel][k][8]), the right operand is
//! read in place (row-major, as the Winograd transform and im2col write it), and the vector lanes run along
//! the product's columns: a register block is up to 24 rows x 16 columns or 8 rows x 48, so that 16 columns
//! still fill the machine. Where the columns fill 16-lane vectors badly (49: one 7x7 map) and the rows come in
//! 64s, the weight is laid out "tall" instead, in panels of 16 rows that are the vectors, against 6 broadcast
//! columns at a time (512x4608·4608x49 on one thread: 103 GFLOP/s tall, 87 wide, 82 with `gemm`).
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

use super::bf16::{adjacent_pairs, pair, pairs_of_rows};
pub use super::bf16::{from_bf16, to_bf16};
use super::isa;
use super::matmul::{MatRef, matmul};
use super::scratch::{self, with_buffer};

/// Rows per panel of the packed operand.
const MR: usize = 8;

/// Lanes per vector.
const LANES: usize = 16;

/// Rows per block of the tall kernels: 4 vectors of 16 (24 accumulators with 6 columns).
const TALL_BLOCK: usize = 4 * LANES;

/// Columns per block of the tall kernels.
const TALL_COLS: usize = 6;

/// Depth (in elements, or bf16 pairs) multiplied per pass over the destination.
const DEPTH_CHUNK: usize = 512;

/// [panel][k][8 or 16 rows], zero past the last row.
enum Panels {
    F32(Vec<f32>),
    /// Row-major `rows`×`depth`, for CPUs without the packed kernels: multiplied by `gemm` (`matmul`), which
    /// packs per call but runs its own AVX2 kernels (`PackedLhs::f32_or_plain`).
    Plain(Vec<f32>),
    /// Pairs of bf16 (k even in the low half): [panel][k/2][8 or 16 rows].
    Bf16(Vec<u32>),
    /// Quads of int8 (k ≡ 0 mod 4 in the low byte): [panel][k/4][8 rows].
    Int8(Vec<u32>),
}

/// A `rows`×`depth` left operand laid out for the kernels below. See the module documentation.
pub struct PackedLhs {
    rows: usize,
    depth: usize,
    /// Panels of 16 rows read as vectors (lanes along the rows), else of 8 rows broadcast (lanes along columns).
    tall: bool,
    panels: Panels,
}

/// Whether this CPU runs the f32 kernel: AVX-512 at the level `isa` runs (`RESNET_CPU=avx2|portable` answers no,
/// so that the other paths can be run and tested on a machine that has AVX-512).
pub fn f32_supported() -> bool {
    isa::avx512()
}

/// Whether this CPU runs the bf16 kernel.
pub fn bf16_supported() -> bool {
    isa::avx512_bf16()
}

/// The message of the `expect` where bf16 operands were asked for: whoever chose them checked
/// `bf16_supported` first (`Target::resolve`, `Cpu::bf16`).
pub const BF16_CHECKED: &str = "bf16 operands are chosen only where bf16_supported() said yes";

/// `rows`×`depth` values laid out in panels of `height` rows: [panel][k][height], zero past the last row.
fn pack<T: Copy + Default>(rows: usize, depth: usize, height: usize, value: impl Fn(usize, usize) -> T) -> Vec<T> {
    let mut data = vec![T::default(); rows.div_ceil(height) * depth * height];
    for (p, panel) in data.chunks_mut((depth * height).max(1)).enumerate() {
        for (k, lanes) in panel.chunks_mut(height).enumerate() {
            for (r, v) in lanes.iter_mut().enumerate().filter(|(r, _)| p * height + r < rows) {
                *v = value(p * height + r, k);
            }
        }
    }
    data
}

/// `a` rounded to bf16 pairs in panels of `height` rows ([panel][k/2][height]), as `pack` lays them out but a
/// vector of values at a time where `a` is row-major (a row's pairs are adjacent) or a transposed view (a panel
/// row of pairs is two runs of the matrix viewed).
fn pack_pairs(a: MatRef, height: usize) -> Vec<u32> {
    let (rows, depth, pairs) = (a.rows, a.cols, a.cols.div_ceil(2));
    if a.col_stride != 1 && a.row_stride != 1 {
        return pack(rows, pairs, height, |r, kk| {
            pair(a.at(r, 2 * kk), if 2 * kk + 1 < depth { a.at(r, 2 * kk + 1) } else { 0.0 })
        });
    }
    a.check();
    let mut data = vec![0u32; rows.div_ceil(height) * pairs * height];
    if rows == 0 || pairs == 0 {
        return data;
    }
    if a.col_stride == 1 {
        let mut row_pairs = vec![0u32; pairs];
        for r in 0..rows {
            adjacent_pairs(&a.data[r * a.row_stride..][..depth], &mut row_pairs);
            let panel = &mut data[r / height * pairs * height..][..pairs * height];
            for (lanes, &w) in panel.chunks_mut(height).zip(&row_pairs) {
                lanes[r % height] = w;
            }
        }
    } else {
        let cs = a.col_stride;
        for (p, panel) in data.chunks_mut(pairs * height).enumerate() {
            let (r0, h) = (p * height, height.min(rows - p * height));
            for (kk, lanes) in panel.chunks_mut(height).enumerate() {
                let lo = &a.data[2 * kk * cs + r0..][..h];
                let hi = (2 * kk + 1 < depth).then(|| &a.data[(2 * kk + 1) * cs + r0..][..h]);
                pairs_of_rows(lo, hi, &mut lanes[..h]);
            }
        }
    }
    data
}

/// Whether products with `cols` columns should run with the lanes along the rows (`tall`): where the columns
/// fill the 16-lane vectors badly (49 = one image's 7x7 map fills 77 %) and the rows come in whole 64-row blocks.
fn tall_suits(rows: usize, cols: usize) -> bool {
    rows.is_multiple_of(TALL_BLOCK) && cols > 0 && 100 * cols < 85 * cols.next_multiple_of(LANES)
}

impl PackedLhs {
    /// Packs `a` for the f32 kernels, laid out for products with about `cols` columns, or `None` when this CPU
    /// lacks AVX-512. Any column count works whatever the layout; `cols` only picks the faster one.
    pub fn f32(a: MatRef, cols: usize) -> Option<PackedLhs> {
        if !f32_supported() {
            return None;
        }
        let tall = tall_suits(a.rows, cols);
        let data = pack(a.rows, a.cols, if tall { LANES } else { MR }, |r, k| a.at(r, k));
        Some(PackedLhs { rows: a.rows, depth: a.cols, tall, panels: Panels::F32(data) })
    }

    /// As `f32`, or on a CPU without the packed kernels the operand as it is, multiplied by `gemm`: for
    /// algorithms that pay on every CPU (Winograd F(2x2)'s fewer multiplies), not only for the packing saved.
    pub fn f32_or_plain(a: MatRef, cols: usize) -> PackedLhs {
        PackedLhs::f32(a, cols).unwrap_or_else(|| {
            let data = (0..a.rows).flat_map(|r| (0..a.cols).map(move |k| a.at(r, k))).collect();
            PackedLhs { rows: a.rows, depth: a.cols, tall: false, panels: Panels::Plain(data) }
        })
    }

    /// As `f32`, rounded to bf16 for the bf16 kernels, or `None` when this CPU lacks AVX512-BF16.
    pub fn bf16(a: MatRef, cols: usize) -> Option<PackedLhs> {
        if !bf16_supported() {
            return None;
        }
        let (rows, depth) = (a.rows, a.cols);
        let tall = tall_suits(rows, cols);
        let data = pack_pairs(a, if tall { LANES } else { MR });
        Some(PackedLhs { rows, depth, tall, panels: Panels::Bf16(data) })
    }

    /// A row-major `rows`×`depth` int8 operand packed for `multiply_quads`, or `None` when this CPU lacks
    /// AVX512-VNNI.
    pub fn int8(a: &[i8], rows: usize, depth: usize) -> Option<PackedLhs> {
        if !isa::avx512_vnni() {
            return None;
        }
        assert_eq!(a.len(), rows * depth, "int8 operand has the wrong size");
        let data = pack(rows, depth.div_ceil(4), MR, |r, kq| {
            let byte = |k: usize| if k < depth { a[r * depth + k] as u8 as u32 } else { 0 };
            (0..4).fold(0, |q, i| q | byte(4 * kq + i) << (8 * i))
        });
        Some(PackedLhs { rows, depth, tall: false, panels: Panels::Int8(data) })
    }

    /// dst (row-major `rows`×`cols`, i32) = self · b for an `int8` operand, where b holds the right operand's
    /// unsigned bytes in quads (`[depth/4][cols]`, rows k..k+4 of one column in one word, k in the low byte),
    /// spread over `threads` by bands of rows.
    pub fn multiply_quads(&self, b: &[u32], cols: usize, dst: &mut [i32], threads: usize) {
        let Panels::Int8(a) = &self.panels else { panic!("multiply_quads needs an int8 operand") };
        let depth = self.depth.div_ceil(4);
        assert!(b.len() >= depth * cols, "right operand too short");
        assert_eq!(dst.len(), self.rows * cols, "destination has the wrong size");
        if self.rows == 0 || cols == 0 {
            return;
        }
        let band = if threads > 1 { self.rows.div_ceil(threads).next_multiple_of(MR) } else { self.rows };
        let b = Operand { data: b, ld: cols, depth, cols };
        // SAFETY: f32 and i32 have one size and alignment and every bit pattern is a valid f32; the kernel only
        // moves these words and adds them as integers, and the caller reads them back as i32.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len()) };
        // `int8` built these panels only after checking for AVX512-VNNI.
        banded(a, self.rows, band, MR, b, dst, drive_int8, false)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    /// dst (row-major `rows`×`b.cols`) = self · b, on the calling thread. In f32 `b` must be row-major (unit
    /// column stride); in bf16 it is rounded to bf16 first, and may also be a transposed view (unit row stride).
    pub fn multiply(&self, b: MatRef, dst: &mut [f32]) {
        self.product(b, dst, 1, false)
    }

    /// As `multiply`, spread over `threads` of the rayon pool by bands of rows.
    pub fn multiply_threads(&self, b: MatRef, dst: &mut [f32], threads: usize) {
        self.product(b, dst, threads, false)
    }

    /// dst += self · b, otherwise as `multiply_threads` (gradients summed over groups of images or tiles).
    pub fn multiply_add_threads(&self, b: MatRef, dst: &mut [f32], threads: usize) {
        self.product(b, dst, threads, true)
    }

    fn product(&self, b: MatRef, dst: &mut [f32], threads: usize, add: bool) {
        assert_eq!(b.rows, self.depth, "inner dimensions differ");
        let n = b.cols;
        assert_eq!(dst.len(), self.rows * n, "destination has the wrong size");
        b.check();
        if self.rows == 0 || n == 0 {
            return;
        }
        // whole row blocks per band
        let block = if self.tall { TALL_BLOCK } else { MR };
        let band = if threads > 1 { self.rows.div_ceil(threads).next_multiple_of(block) } else { self.rows };
        let height = if self.tall { LANES } else { MR };
        match &self.panels {
            Panels::F32(a) => {
                assert_eq!(b.col_stride, 1, "the right operand is read row by row");
                let b = Operand { data: b.data, ld: b.row_stride, depth: self.depth, cols: n };
                // `f32` built these panels only after checking for AVX-512F.
                let drive = if self.tall { drive_f32_tall } else { drive_f32 };
                banded(a, self.rows, band, height, b, dst, drive, add)
            }
            Panels::Plain(a) => matmul(dst, MatRef::new(a, self.rows, self.depth), b, add, threads),
            Panels::Int8(_) => panic!("an int8 operand multiplies quads (multiply_quads)"),
            Panels::Bf16(a) => with_pairs(b, |pairs| {
                let b = Operand { data: pairs, ld: n, depth: self.depth.div_ceil(2), cols: n };
                // `bf16` built these panels only after checking for AVX512-BF16.
                let drive = if self.tall { drive_bf16_tall } else { drive_bf16 };
                banded(a, self.rows, band, height, b, dst, drive, add)
            }),
        }
    }
}

/// Runs `drive` on bands of `band` rows in parallel (one band: on this thread); panels are `height` rows. With
/// `add` the products are added onto `dst`.
#[allow(clippy::too_many_arguments)]
fn banded<T: Sync>(
    a: &[T],
    rows: usize,
    band: usize,
    height: usize,
    b: Operand<T>,
    dst: &mut [f32],
    drive: unsafe fn(&[T], usize, Operand<T>, &mut [f32], bool),
    add: bool,
) {
    let panel = b.depth * height;
    let run = |r0: usize, d: &mut [f32]| {
        let used = d.len() / b.cols;
        // SAFETY: the caller picked `drive` for panels of this height, built after checking the CPU's features;
        // each band starts at a whole panel because `band` is a multiple of the row block.
        unsafe { drive(&a[r0 / height * panel..], used, b, d, add) }
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
/// `b` is row-major, or the transposed view of a row-major matrix (a weight gradient's `colsᵀ`, Winograd's
/// `Vᵀ`), whose pairs are then adjacent in memory; any other view is read element by element.
fn with_pairs<R>(b: MatRef, f: impl FnOnce(&[u32]) -> R) -> R {
    let (depth, n) = (b.rows, b.cols);
    let pairs = depth.div_ceil(2);
    with_buffer(&PAIRS, pairs * n, scratch::INFERENCE_KEEP, |buf| {
        if b.col_stride == 1 {
            for (kk, out) in buf.chunks_mut(n).enumerate() {
                let lo = &b.data[2 * kk * b.row_stride..][..n];
                let hi = (2 * kk + 1 < depth).then(|| &b.data[(2 * kk + 1) * b.row_stride..][..n]);
                pairs_of_rows(lo, hi, out);
            }
        } else if b.row_stride == 1 {
            // Column j of b is row j of the matrix viewed, its pairs adjacent: round it, then spread its words
            // down column j of the pairs.
            let mut column = vec![0u32; pairs];
            for j in 0..n {
                adjacent_pairs(&b.data[j * b.col_stride..][..depth], &mut column);
                for (kk, &w) in column.iter().enumerate() {
                    buf[kk * n + j] = w;
                }
            }
        } else {
            for (kk, out) in buf.chunks_mut(n).enumerate() {
                for (j, o) in out.iter_mut().enumerate() {
                    let hi = if 2 * kk + 1 < depth { b.at(2 * kk + 1, j) } else { 0.0 };
                    *o = pair(b.at(2 * kk, j), hi);
                }
            }
        }
        f(buf)
    })
}

/// Elsewhere no `PackedLhs` is ever built (`f32_supported` is false), so the drivers are never called.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn drive_f32(_: &[f32], _: usize, _: Operand<f32>, _: &mut [f32], _: bool) {
    unreachable!("packed operands are built only on x86-64 with AVX-512")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn drive_bf16(_: &[u32], _: usize, _: Operand<u32>, _: &mut [f32], _: bool) {
    unreachable!("packed operands are built only on x86-64 with AVX-512")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn drive_int8(_: &[u32], _: usize, _: Operand<u32>, _: &mut [f32], _: bool) {
    unreachable!("packed operands are built only on x86-64 with AVX-512")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn drive_f32_tall(_: &[f32], _: usize, _: Operand<f32>, _: &mut [f32], _: bool) {
    unreachable!("packed operands are built only on x86-64 with AVX-512")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn drive_bf16_tall(_: &[u32], _: usize, _: Operand<u32>, _: &mut [f32], _: bool) {
    unreachable!("packed operands are built only on x86-64 with AVX-512")
}

/// The bounds every driver relies on before it hands raw pointers to its kernels: the packed operand holds at
/// least `needed` entries, `b` its `depth` rows of `cols`, `dst` `rows`×`cols`; with no depth the product is 0.
#[cfg(target_arch = "x86_64")]
fn check_operands<T>(a_len: usize, needed: usize, b: &Operand<T>, rows: usize, dst: &mut [f32], add: bool) {
    assert!(a_len >= needed, "packed operand too short");
    assert!(b.depth == 0 || b.data.len() >= (b.depth - 1) * b.ld + b.cols, "right operand too short");
    assert!(dst.len() >= rows * b.cols, "destination too short");
    if b.depth == 0 && !add {
        dst[..rows * b.cols].fill(0.0);
    }
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
        unsafe fn $drive(a: &[$elem], rows: usize, b: Operand<$elem>, dst: &mut [f32], add: bool) {
            let panel = b.depth * MR;
            check_operands(a.len(), rows.div_ceil(MR) * panel, &b, rows, dst, add);
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
                                add || k0 > 0,
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
kernels!(
    drive_f32,
    block_f32,
    f32,
    "avx512f",
    |acc, av, bv| _mm512_fmadd_ps(av, _mm512_castsi512_ps(bv), *acc),
    |p| _mm512_set1_ps(*p),
    |mask, p| _mm512_maskz_loadu_epi32(mask, p.cast())
);

// SAFETY (the transmutes): __m512i and __m512bh are both 64 bytes of plain bits, valid for any contents.
#[cfg(target_arch = "x86_64")]
kernels!(
    drive_bf16,
    block_bf16,
    u32,
    "avx512f,avx512bf16",
    |acc, av, bv| _mm512_dpbf16_ps(*acc, av, unsafe { std::mem::transmute::<__m512i, __m512bh>(bv) }),
    |p| std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*p as i32)),
    |mask, p| _mm512_maskz_loadu_epi32(mask, p.cast())
);

// int8: the accumulators hold i32 bits in f32 registers (the driver's loads and stores move them unchanged);
// `vpdpbusd` adds the products of the right operand's unsigned bytes with the weights' signed ones, four per lane.
#[cfg(target_arch = "x86_64")]
kernels!(
    drive_int8,
    block_int8,
    u32,
    "avx512f,avx512vnni",
    |acc, av, bv| _mm512_castsi512_ps(_mm512_dpbusd_epi32(_mm512_castps_si512(*acc), bv, av)),
    |p| _mm512_set1_epi32(*p as i32),
    |mask, p| _mm512_maskz_loadu_epi32(mask, p.cast())
);

/// Generates the tall driver and kernel for one element type: lanes along 16 rows of the packed operand (one
/// vector load per 16 rows and step of depth), each of up to 6 columns of the right operand broadcast. The
/// driver keeps one 64-row block of the left operand (a depth chunk of it: 128 KB) in cache while it walks all
/// the columns, so each weight is read from memory once per call however few the columns.
#[cfg(target_arch = "x86_64")]
macro_rules! tall_kernels {
    ($drive:ident, $block:ident, $elem:ty, $features:literal, |$acc:ident, $av:ident, $bv:ident| $fma:expr,
     |$aptr:ident| $aload:expr, |$bptr:ident| $bcast:expr) => {
        /// # Safety
        /// The CPU must support the target features; `a` must be the 16-row panels of a `rows`×`b.depth` operand
        /// and `rows` a multiple of 64.
        #[target_feature(enable = $features)]
        unsafe fn $drive(a: &[$elem], rows: usize, b: Operand<$elem>, dst: &mut [f32], add: bool) {
            let panel = b.depth * LANES;
            assert!(rows % TALL_BLOCK == 0, "tall panels come in 64-row blocks");
            check_operands(a.len(), rows / LANES * panel, &b, rows, dst, add);
            for k0 in (0..b.depth).step_by(DEPTH_CHUNK) {
                let depth = DEPTH_CHUNK.min(b.depth - k0);
                for i in (0..rows).step_by(TALL_BLOCK) {
                    let mut j = 0;
                    while j < b.cols {
                        let w = (b.cols - j).min(TALL_COLS);
                        let run: unsafe fn(_, _, _, _, _, _, _, _) = match w {
                            6 => $block::<6>,
                            5 => $block::<5>,
                            4 => $block::<4>,
                            3 => $block::<3>,
                            2 => $block::<2>,
                            _ => $block::<1>,
                        };
                        // SAFETY: rows i..i+64 are 4 whole panels from panel i/16, depth k0..k0+depth lies in
                        // each panel and in b, columns j..j+w in b's rows and dst's, all checked above.
                        unsafe {
                            run(
                                a.as_ptr().add(i / LANES * panel + k0 * LANES),
                                panel,
                                depth,
                                b.data.as_ptr().add(k0 * b.ld + j),
                                b.ld,
                                dst.as_mut_ptr().add(i * b.cols + j),
                                b.cols,
                                add || k0 > 0,
                            )
                        };
                        j += w;
                    }
                }
            }
        }

        /// c (64 rows x N columns, row-major with row stride `ldc`) = Σ_k a[..][k] · b[k][n], or += when `add`.
        ///
        /// # Safety
        /// See the call in the driver.
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $block<const N: usize>(
            a: *const $elem,
            panel: usize,
            depth: usize,
            b: *const $elem,
            ldb: usize,
            c: *mut f32,
            ldc: usize,
            add: bool,
        ) {
            const V: usize = TALL_BLOCK / LANES;
            let mut acc = [[_mm512_setzero_ps(); V]; N];
            if add {
                for (n, acc_n) in acc.iter_mut().enumerate() {
                    for (v, x) in acc_n.iter_mut().enumerate() {
                        let lanes: [f32; LANES] = std::array::from_fn(|i| unsafe { *c.add((v * LANES + i) * ldc + n) });
                        *x = unsafe { _mm512_loadu_ps(lanes.as_ptr()) };
                    }
                }
            }
            for k in 0..depth {
                let $av: [_; V] = std::array::from_fn(|v| {
                    let $aptr = unsafe { a.add(v * panel + k * LANES) };
                    unsafe { $aload }
                });
                for (n, acc_n) in acc.iter_mut().enumerate() {
                    let $bptr = unsafe { b.add(k * ldb + n) };
                    let $bv = unsafe { $bcast };
                    for ($acc, &$av) in acc_n.iter_mut().zip(&$av) {
                        *$acc = $fma;
                    }
                }
            }
            for (n, acc_n) in acc.iter().enumerate() {
                for (v, &x) in acc_n.iter().enumerate() {
                    let mut lanes = [0.0f32; LANES];
                    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), x) };
                    for (i, &y) in lanes.iter().enumerate() {
                        unsafe { *c.add((v * LANES + i) * ldc + n) = y };
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
tall_kernels!(
    drive_f32_tall,
    block_f32_tall,
    f32,
    "avx512f",
    |acc, av, bv| _mm512_fmadd_ps(av, bv, *acc),
    |p| _mm512_loadu_ps(p),
    |p| _mm512_set1_ps(*p)
);

// SAFETY (the transmutes): as for `kernels!` above.
#[cfg(target_arch = "x86_64")]
tall_kernels!(
    drive_bf16_tall,
    block_bf16_tall,
    u32,
    "avx512f,avx512bf16",
    |acc, av, bv| _mm512_dpbf16_ps(*acc, av, bv),
    |p| std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())),
    |p| std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*p as i32))
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::test_util::{rel, values};

    /// Every register block and tail, in both layouts where the rows allow the tall one: rows not multiples of
    /// 8 or 24, columns around 6, 16 and 48, odd depth, depth over one chunk (later chunks add onto the first).
    #[test]
    fn packed_products_match_the_reference() {
        if !f32_supported() {
            return;
        }
        let shapes = [
            (1, 1, 1),
            (8, 3, 16),
            (13, 7, 5),
            (24, 64, 16),
            (40, 33, 49),
            (64, 64, 196),
            (70, 9, 97),
            (20, 2100, 37),
            (100, 30, 20),
            (64, 64, 49),
            (128, 33, 7),
            (64, 1100, 5),
            (192, 9, 1),
            (256, 40, 13),
        ];
        for &(m, k, n) in &shapes {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let mut want = vec![0.0; m * n];
            matmul(&mut want, MatRef::new(&a, m, k), MatRef::new(&b, k, n), false, 1);
            // the layout hint: 16 columns picks the wide layout, 49 the tall one where the rows allow it
            for hint in [16, 49] {
                let packed = PackedLhs::f32(MatRef::new(&a, m, k), hint).unwrap();
                assert_eq!(packed.tall, hint == 49 && m % 64 == 0);
                for threads in [1, 3] {
                    let mut got = vec![f32::NAN; m * n];
                    packed.multiply_threads(MatRef::new(&b, k, n), &mut got, threads);
                    let e = rel(&got, &want);
                    assert!(e < 1e-6, "f32 {m}x{k}x{n} tall {} on {threads} threads: {e}", packed.tall);
                }
            }
        }
        if !bf16_supported() {
            return;
        }
        for &(m, k, n) in &shapes {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            // the reference in f32 on operands rounded to bf16: only the summation order differs
            let round = |v: &[f32]| v.iter().map(|&x| from_bf16(to_bf16(x))).collect::<Vec<_>>();
            let (ar, br) = (round(&a), round(&b));
            let mut want = vec![0.0; m * n];
            matmul(&mut want, MatRef::new(&ar, m, k), MatRef::new(&br, k, n), false, 1);
            for hint in [16, 49] {
                let packed = PackedLhs::bf16(MatRef::new(&a, m, k), hint).unwrap();
                let mut got = vec![f32::NAN; m * n];
                packed.multiply_threads(MatRef::new(&b, k, n), &mut got, 2);
                let e = rel(&got, &want);
                assert!(e < 1e-6, "bf16 {m}x{k}x{n} tall {}: {e}", packed.tall);
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
        PackedLhs::f32(MatRef::new(&a, m, k), n).unwrap().multiply(view, &mut got);
        assert!(rel(&got, &want) < 1e-6);
    }

    /// bf16 against transposed right operands (a weight gradient's `colsᵀ`, odd depth, columns beyond one run of
    /// 16) and a general strided view, added onto what the destination holds.
    #[test]
    fn bf16_transposed_right_operand_adds_onto_the_destination() {
        if !bf16_supported() {
            return;
        }
        let round = |v: &[f32]| v.iter().map(|&x| from_bf16(to_bf16(x))).collect::<Vec<_>>();
        for &(m, k, n) in &[(16, 5, 20), (64, 33, 49), (9, 600, 70)] {
            let (a, bt) = (values(m * k, 5), values(n * k, 6));
            let (ar, btr) = (round(&a), round(&bt));
            let start = values(m * n, 7);
            let mut want = start.clone();
            matmul(&mut want, MatRef::new(&ar, m, k), MatRef::new(&btr, n, k).t(), true, 1);
            let packed = PackedLhs::bf16(MatRef::new(&a, m, k), n).unwrap();
            let mut got = start.clone();
            packed.multiply_add_threads(MatRef::new(&bt, n, k).t(), &mut got, 2);
            let e = rel(&got, &want);
            assert!(e < 1e-6, "{m}x{k}x{n} transposed, added: {e}");
            // every other column of a wider matrix: neither stride is 1
            let wide = values(k * 2 * n, 8);
            let view = MatRef { data: &wide, rows: k, cols: n, row_stride: 2 * n, col_stride: 2 };
            let wr = round(&wide);
            let mut want = vec![0.0; m * n];
            let view_r = MatRef { data: &wr, ..view };
            matmul(&mut want, MatRef::new(&ar, m, k), view_r, false, 1);
            let mut got = vec![f32::NAN; m * n];
            packed.multiply(view, &mut got);
            assert!(rel(&got, &want) < 1e-6, "{m}x{k}x{n} strided");
        }
    }
}
