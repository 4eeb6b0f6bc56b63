//! int8 convolution operands with i32 accumulation: post-training static quantization as ONNX Runtime's QDQ
//! and fbgemm do it. Weights per output channel, symmetric int8 (scale = max|w|/127, no zero point); the
//! convolution's input per tensor, asymmetric uint8 (q = clamp(round(x/s) + z, 0, 255), s and z from
//! calibration). Then Σ w_q·x_q over the depth, less z·Σ w_q, is the product of the dequantized operands over
//! s·s_w, and the output is f32 again (batch norm, residual and ReLU applied as it is written, as in f32):
//! activations stay f32 between convolutions, like our bf16 path, so only the convolutions' operands lose
//! precision. Real zero is exactly z, so zero padding stays exact.
//!
//! Products: `vpdpbusd` (AVX512-VNNI, `packed::PackedLhs::int8`: four u8·s8 products per 32-bit lane, 4x the
//! multiply-adds of an f32 FMA per instruction; ResNet-34 batch 8 at 224² in 118-128 ms against 201-217 ms in
//! f32, AMD EPYC), `vpmaddwd` on the codes and weights widened to i16 pairs (AVX2: exact, where `vpmaddubsw`
//! would saturate; 465 ms against 3.3 s for the portable loop and 217-265 ms in f32 on the same CPU forced to
//! AVX2), or a portable loop over the same integers. All three are bit-identical: integer sums do not depend on
//! their order, and |Σ| ≤ 255·127·depth < 2³¹ for any depth up to 66,000 (ResNet's largest is 4,608). This
//! layer knows tensors and shapes only; `exec::cpu_plan` decides which convolutions run in int8 and with which
//! input scales.

use rayon::prelude::*;

use super::matmul::MatRef;
use super::packed::PackedLhs;
use super::scratch::{self, with_buffer};

/// The affine map of a per-tensor uint8 quantization: x ≈ (q − zero_point)·scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantParams {
    pub scale: f32,
    pub zero_point: u8,
}

impl QuantParams {
    /// The parameters that cover [min, max] (widened to hold 0, so that zero padding is exact), as ONNX
    /// Runtime's `MinMax` calibration computes them: scale = (max − min)/255, zero point = round(−min/scale).
    pub fn covering(min: f32, max: f32) -> QuantParams {
        let (min, max) = (min.min(0.0), max.max(0.0));
        let scale = if max > min && (max - min).is_finite() { (max - min) / 255.0 } else { 1.0 };
        let zero_point = (-min / scale).round_ties_even().clamp(0.0, 255.0) as u8;
        QuantParams { scale, zero_point }
    }

    /// x's uint8 code, given 1/scale (saturating; a NaN becomes code 0). Rounded half to even by the 1.5·2²³
    /// trick, which vectorises, where `round_ties_even` is a libm call per value on baseline x86-64 (measured:
    /// half of an int8 forward's time).
    #[inline(always)]
    fn quantize(&self, inv_scale: f32, x: f32) -> u32 {
        const MAGIC: f32 = 12_582_912.0;
        let z = self.zero_point as f32;
        let v = (x * inv_scale).clamp(-z, 255.0 - z);
        ((v + MAGIC) - MAGIC + z) as u32
    }
}

/// A `rows`×`depth` f32 weight (one row per output channel) quantized per row, kept for every call.
pub struct Int8Weight {
    rows: usize,
    depth: usize,
    /// Row-major int8 values: the portable product's operand.
    plain: Vec<i8>,
    /// The same packed for `vpdpbusd`, on CPUs with AVX512-VNNI.
    packed: Option<PackedLhs>,
    /// Without VNNI, on AVX2: per row and quad, the weights of bytes 0 and 2 and of bytes 1 and 3 as i16 pairs
    /// (`vpmaddwd`'s operands).
    pairs: Option<Vec<[u32; 2]>>,
    /// Per row: the scale (w ≈ w_q·scale) and Σ w_q (for the input's zero point).
    scales: Vec<f32>,
    sums: Vec<i32>,
    /// Whether the depth is in `conv`'s quad-plane order (else the weight's own `[O, C·kh·kw]` order).
    quad_planes: bool,
}

impl Int8Weight {
    /// Quantizes `w` (row-major `rows`×`depth`), each row symmetrically to [−127, 127].
    pub fn new(w: &[f32], rows: usize, depth: usize) -> Int8Weight {
        assert_eq!(w.len(), rows * depth, "weight has the wrong size");
        let mut plain = vec![0i8; rows * depth];
        let (mut scales, mut sums) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for (src, dst) in w.chunks(depth.max(1)).zip(plain.chunks_mut(depth.max(1))) {
            let max = src.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = if max > 0.0 && max.is_finite() { max / 127.0 } else { 1.0 };
            for (q, &v) in dst.iter_mut().zip(src) {
                *q = (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
            scales.push(scale);
            sums.push(dst.iter().map(|&q| q as i32).sum());
        }
        let packed = PackedLhs::int8(&plain, rows, depth);
        let pairs = (packed.is_none() && super::isa::level() >= super::isa::Level::Avx2)
            .then(|| i16_pairs(&plain, rows, depth));
        Int8Weight { rows, depth, plain, packed, pairs, scales, sums, quad_planes: false }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Whether a convolution feeds this weight quad planes (`conv`) rather than f32 columns (`new`).
    pub fn takes_quad_planes(&self) -> bool {
        self.quad_planes
    }

    /// The weight as it is multiplied: w_q·scale.
    #[cfg(test)]
    fn dequantized(&self) -> Vec<f32> {
        let scale = |i: usize| self.scales[i / self.depth.max(1)];
        self.plain.iter().enumerate().map(|(i, &q)| q as f32 * scale(i)).collect()
    }

    /// A convolution weight `[O, C, kh, kw]` (C a multiple of 4) quantized with its depth in the order of
    /// im2col over quad planes (`quantize_quads` of an image's channels, then im2col over its C/4 planes of
    /// 32-bit words): position ((c/4·kh + i)·kw + j)·4 + c%4 holds w[o, c, i, j]. None for other channel counts.
    pub fn conv(w: &[f32], shape: [usize; 4]) -> Option<Int8Weight> {
        let [o, c, kh, kw] = shape;
        if !c.is_multiple_of(4) || w.len() != o * c * kh * kw {
            return None;
        }
        let depth = c * kh * kw;
        let mut order = vec![0.0f32; w.len()];
        for (src, dst) in w.chunks(depth).zip(order.chunks_mut(depth)) {
            for ci in 0..c {
                for t in 0..kh * kw {
                    dst[((ci / 4) * kh * kw + t) * 4 + ci % 4] = src[ci * kh * kw + t];
                }
            }
        }
        Some(Int8Weight { quad_planes: true, ..Int8Weight::new(&order, o, depth) })
    }

    /// dst (`rows`×`b.cols`) = dequantize(self · quantize(b, input)) on `threads` of the pool.
    pub fn multiply(&self, input: QuantParams, b: MatRef, dst: &mut [f32], threads: usize) {
        assert_eq!(b.rows, self.depth, "inner dimensions differ");
        assert_eq!(b.col_stride, 1, "the right operand is read row by row");
        b.check();
        let cols = b.cols;
        with_buffer(&QUADS, self.depth.div_ceil(4) * cols, scratch::INFERENCE_KEEP, |q| {
            quantize_quads(input, b, q, threads);
            self.multiply_codes(input, q, cols, dst, threads)
        })
    }

    /// dst (`rows`×`cols`) = dequantize(self · codes), for codes already quantized with `input`, in quads
    /// `[depth/4][cols]` (`quantize_quads`' layout).
    pub fn multiply_codes(&self, input: QuantParams, q: &[u32], cols: usize, dst: &mut [f32], threads: usize) {
        assert!(q.len() >= self.depth.div_ceil(4) * cols, "codes too short");
        assert_eq!(dst.len(), self.rows * cols, "destination has the wrong size");
        with_buffer(&ACC, self.rows * cols, scratch::INFERENCE_KEEP, |acc| {
            match &self.packed {
                Some(packed) => packed.multiply_quads(q, cols, acc, threads),
                None => match &self.pairs {
                    Some(pairs) => multiply_avx2(pairs, self.depth.div_ceil(4), q, cols, acc, threads),
                    None => self.multiply_portable(q, cols, acc, threads),
                },
            }
            let z = input.zero_point as i32;
            let rows = dst.par_chunks_mut(cols.max(1)).zip(acc.par_chunks(cols.max(1))).enumerate();
            rows.with_min_len(rows_per_task(cols)).for_each(|(r, (d, a))| {
                let (scale, offset) = (input.scale * self.scales[r], z * self.sums[r]);
                d.iter_mut().zip(a).for_each(|(d, &a)| *d = (a - offset) as f32 * scale);
            });
        })
    }

    /// The product on any CPU: per row, the quads' bytes times the row's weights, in i32.
    fn multiply_portable(&self, q: &[u32], cols: usize, acc: &mut [i32], threads: usize) {
        let row = |(r, out): (usize, &mut [i32])| {
            out.fill(0);
            let w = &self.plain[r * self.depth..(r + 1) * self.depth];
            for (kq, quad) in q.chunks(cols).enumerate() {
                for (i, &wk) in w[4 * kq..].iter().take(4).enumerate() {
                    let wk = wk as i32;
                    out.iter_mut().zip(quad).for_each(|(o, &x)| *o += wk * ((x >> (8 * i)) & 0xff) as i32);
                }
            }
        };
        if threads > 1 {
            acc.par_chunks_mut(cols.max(1)).enumerate().for_each(row);
        } else {
            acc.chunks_mut(cols.max(1)).enumerate().for_each(row);
        }
    }
}

/// `Int8Weight::pairs` of row-major int8 weights.
fn i16_pairs(plain: &[i8], rows: usize, depth: usize) -> Vec<[u32; 2]> {
    let quads = depth.div_ceil(4);
    let mut out = vec![[0u32; 2]; rows * quads];
    for (r, row) in out.chunks_mut(quads.max(1)).enumerate() {
        for (kq, p) in row.iter_mut().enumerate() {
            let w = |i: usize| {
                let k = 4 * kq + i;
                if k < depth { plain[r * depth + k] as i16 as u16 as u32 } else { 0 }
            };
            *p = [w(0) | w(2) << 16, w(1) | w(3) << 16];
        }
    }
    out
}

/// acc (rows x cols, i32) = weights · codes on AVX2, in bands of rows over `threads`: each 32-bit word of codes
/// splits into its bytes 0/2 and 1/3 as i16 pairs, and `vpmaddwd` multiplies them with the weights' pairs and
/// adds each pair in i32 (|255·127·2| fits; no saturation, unlike `vpmaddubsw`), 4 rows x 16 columns a block.
fn multiply_avx2(pairs: &[[u32; 2]], quads: usize, q: &[u32], cols: usize, acc: &mut [i32], threads: usize) {
    let rows = acc.len() / cols.max(1);
    assert!(pairs.len() >= rows * quads && q.len() >= quads * cols, "AVX2 int8 operands too short");
    let band = if threads > 1 { rows.div_ceil(threads).next_multiple_of(4) } else { rows.max(1) };
    let run = |(b, out): (usize, &mut [i32])| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `pairs` exist only where `isa` found AVX2; the bounds were checked above and `out` holds whole
        // rows b·band.. of acc.
        unsafe {
            avx2_band(&pairs[b * band * quads..], quads, q, cols, out)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (b, out);
    };
    if band >= rows {
        run((0, acc));
    } else {
        acc.par_chunks_mut(band * cols).enumerate().for_each(run);
    }
}

/// One band of `multiply_avx2`: rows of `out` with their pairs from `pairs[0..]`, in register blocks of up to
/// 4 rows x 2 vectors (the block's shape a compile-time constant, so its accumulators stay in registers), the
/// last `cols % 8` columns one at a time.
///
/// # Safety
/// AVX2 must be present; `pairs` holds every row's quads and `q` `quads` rows of `cols` words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_band(pairs: &[[u32; 2]], quads: usize, q: &[u32], cols: usize, out: &mut [i32]) {
    let rows = out.len() / cols.max(1);
    assert!(pairs.len() >= rows * quads && q.len() >= quads * cols, "AVX2 int8 band operands too short");
    let vectors = cols / 8;
    let mut r = 0;
    while r < rows {
        let height = (rows - r).min(4);
        let mut v = 0;
        while v < vectors {
            let width = (vectors - v).min(2);
            let at = (r, 8 * v);
            // SAFETY: rows r..r+height and columns 8v..8(v+width) lie inside out, pairs and q (checked above).
            unsafe {
                match (height, width) {
                    (4, 2) => avx2_block::<4, 2>(pairs, quads, q, cols, out, at),
                    (4, _) => avx2_block::<4, 1>(pairs, quads, q, cols, out, at),
                    (_, 2) => avx2_block::<1, 2>(pairs, quads, q, cols, out, at),
                    _ => avx2_block::<1, 1>(pairs, quads, q, cols, out, at),
                }
            }
            v += width;
        }
        // Fewer than 4 rows left go one at a time (the 1-row kernels above).
        let step = if height == 4 { 4 } else { 1 };
        for i in 0..step {
            for c in 8 * vectors..cols {
                let mut sum = 0i32;
                for kq in 0..quads {
                    let (x, p) = (q[kq * cols + c], pairs[(r + i) * quads + kq]);
                    for (b, w) in [(0, p[0] & 0xffff), (1, p[1] & 0xffff), (2, p[0] >> 16), (3, p[1] >> 16)] {
                        sum += ((x >> (8 * b)) & 0xff) as i32 * (w as u16 as i16) as i32;
                    }
                }
                out[(r + i) * cols + c] = sum;
            }
        }
        r += step;
    }
}

/// out[r..r+H][c..c+8W] = the products of rows r.. with columns c.. (see `multiply_avx2`).
///
/// # Safety
/// AVX2 must be present and the block must lie inside `pairs`, `q` and `out` (see `avx2_band`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_block<const H: usize, const W: usize>(
    pairs: &[[u32; 2]],
    quads: usize,
    q: &[u32],
    cols: usize,
    out: &mut [i32],
    (r, c): (usize, usize),
) {
    use std::arch::x86_64::*;
    let low = _mm256_set1_epi32(0x00ff_00ff);
    let mut acc = [[_mm256_setzero_si256(); W]; H];
    for kq in 0..quads {
        // SAFETY: columns c..c+8W of quad row kq lie inside q (the caller's bound).
        let x: [__m256i; W] =
            std::array::from_fn(|u| unsafe { _mm256_loadu_si256(q.as_ptr().add(kq * cols + c + 8 * u).cast()) });
        let lo: [__m256i; W] = std::array::from_fn(|u| _mm256_and_si256(x[u], low));
        let hi: [__m256i; W] = std::array::from_fn(|u| _mm256_and_si256(_mm256_srli_epi32::<8>(x[u]), low));
        for (i, acc) in acc.iter_mut().enumerate() {
            let p = pairs[(r + i) * quads + kq];
            let (wlo, whi) = (_mm256_set1_epi32(p[0] as i32), _mm256_set1_epi32(p[1] as i32));
            for u in 0..W {
                let sum = _mm256_add_epi32(_mm256_madd_epi16(lo[u], wlo), _mm256_madd_epi16(hi[u], whi));
                acc[u] = _mm256_add_epi32(acc[u], sum);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        for (u, a) in acc.iter().enumerate() {
            // SAFETY: row r+i, columns c+8u..+8 lie inside out (the caller's bound).
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().add((r + i) * cols + c + 8 * u).cast(), *a) };
        }
    }
}

/// Rows per parallel task of the dequantization: about 16 K values each.
fn rows_per_task(cols: usize) -> usize {
    (16_384 / cols.max(1)).max(1)
}

/// b (f32, `depth`×`cols`) quantized with `input` into quads `[depth/4][cols]` (rows k..k+4 of a column in one
/// word, k in the low byte; rows past the depth are zero, which the zero-padded weights ignore).
pub fn quantize_quads(input: QuantParams, b: MatRef, q: &mut [u32], threads: usize) {
    let (depth, cols) = (b.rows, b.cols);
    let inv = 1.0 / input.scale;
    let fill = |(kq, out): (usize, &mut [u32])| {
        let row = |i: usize| &b.data[(4 * kq + i).min(depth - 1) * b.row_stride..][..cols];
        let q = |x: f32| input.quantize(inv, x);
        if 4 * kq + 4 <= depth && super::isa::avx512() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the AVX-512 level is checked just above; the four rows and `out` are `cols` long.
            unsafe {
                quad_row_avx512([row(0), row(1), row(2), row(3)], out, inv, input.zero_point)
            };
        } else if 4 * kq + 4 <= depth {
            let rows = row(0).iter().zip(row(1)).zip(row(2)).zip(row(3));
            for (o, (((&a, &b), &c), &d)) in out.iter_mut().zip(rows) {
                *o = q(a) | q(b) << 8 | q(c) << 16 | q(d) << 24;
            }
        } else {
            out.fill(0);
            for i in 0..depth - 4 * kq {
                out.iter_mut().zip(row(i)).for_each(|(o, &x)| *o |= q(x) << (8 * i));
            }
        }
    };
    if threads > 1 {
        q.par_chunks_mut(cols.max(1)).enumerate().with_min_len(rows_per_task(cols)).for_each(fill);
    } else {
        q.chunks_mut(cols.max(1)).enumerate().for_each(fill);
    }
}

/// One quad row: out[n] = the codes of rows[0..4][n], as `QuantParams::quantize` computes them (`vcvtps2dq`
/// rounds half to even, as the scalar trick does; a NaN meets `vmaxps`'s second operand, the bottom code 0).
///
/// # Safety
/// The CPU must have AVX-512F; every row must be at least `out.len()` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quad_row_avx512(rows: [&[f32]; 4], out: &mut [u32], inv: f32, zero_point: u8) {
    use std::arch::x86_64::*;
    let n = out.len();
    assert!(rows.iter().all(|r| r.len() >= n), "quad rows shorter than the output");
    let z = zero_point as f32;
    let (scale, lo, hi) = (_mm512_set1_ps(inv), _mm512_set1_ps(-z), _mm512_set1_ps(255.0 - z));
    let zv = _mm512_set1_epi32(zero_point as i32);
    let mut j = 0;
    while j < n {
        let mask: __mmask16 = if n - j >= 16 { 0xffff } else { ((1u32 << (n - j)) - 1) as __mmask16 };
        let mut word = _mm512_setzero_si512();
        for (i, r) in rows.iter().enumerate() {
            // SAFETY: lanes j..j+16 under `mask` lie inside the row (checked above).
            let x = unsafe { _mm512_maskz_loadu_ps(mask, r.as_ptr().add(j)) };
            let v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, scale), lo), hi);
            let code = _mm512_add_epi32(_mm512_cvtps_epi32(v), zv);
            word = _mm512_or_si512(word, _mm512_sllv_epi32(code, _mm512_set1_epi32(8 * i as i32)));
        }
        // SAFETY: as the loads, inside `out`.
        unsafe { _mm512_mask_storeu_epi32(out.as_mut_ptr().add(j).cast(), mask, word) };
        j += 16;
    }
}

/// f32 storage viewed as 32-bit words, to hold codes in a tensor that code which only moves values (im2col's
/// copies and zero fill: code 0 is 0.0) can carry.
pub fn f32_as_words_mut(x: &mut [f32]) -> &mut [u32] {
    // SAFETY: u32 and f32 have one size and alignment and every bit pattern is valid for both; the length is kept.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u32>(), x.len()) }
}

/// What im2col moved, read back as words.
pub fn f32_as_words(x: &[f32]) -> &[u32] {
    // SAFETY: as in `f32_as_words_mut`.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u32>(), x.len()) }
}

thread_local! {
    static QUADS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    static ACC: std::cell::RefCell<Vec<i32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn covering_params_hold_zero_exactly_and_span_the_range() {
        let p = QuantParams::covering(-1.0, 3.0);
        assert_eq!(p.zero_point, 64);
        assert!((p.scale - 4.0 / 255.0).abs() < 1e-9);
        assert_eq!(p.quantize(1.0 / p.scale, 0.0), 64, "real 0 is the zero point");
        assert_eq!(p.quantize(1.0 / p.scale, 100.0), 255, "saturates");
        assert_eq!(QuantParams::covering(0.0, 0.0), QuantParams { scale: 1.0, zero_point: 0 });
        assert_eq!(QuantParams::covering(0.5, 2.0).zero_point, 0, "a positive range still holds 0");
    }

    #[test]
    fn the_product_is_the_dequantized_operands_product_on_every_path() {
        // Depths that are not multiples of 4 or of the driver's chunk, columns that fill no whole vector.
        for (rows, depth, cols) in [(16, 27, 49), (24, 576, 17), (8, 1155, 64), (3, 5, 1)] {
            let w = lcg(rows * depth, 7);
            let x: Vec<f32> = lcg(depth * cols, 9).iter().map(|v| v * 2.0 + 0.5).collect();
            let input = QuantParams::covering(-1.5, 2.5);
            let weight = Int8Weight::new(&w, rows, depth);
            let mut fast = vec![0.0; rows * cols];
            weight.multiply(input, MatRef::new(&x, depth, cols), &mut fast, 2);
            // Reference: the same integers in f64.
            let wq = weight.dequantized();
            let inv = 1.0 / input.scale;
            let xq: Vec<f64> = x
                .iter()
                .map(|&v| (input.quantize(inv, v) as f64 - input.zero_point as f64) * input.scale as f64)
                .collect();
            for r in 0..rows {
                for c in 0..cols {
                    let want: f64 = (0..depth).map(|k| wq[r * depth + k] as f64 * xq[k * cols + c]).sum();
                    let got = fast[r * cols + c] as f64;
                    assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "[{r},{c}] {got} vs {want}");
                }
            }
            // The portable product gives the same integers as the packed one.
            let quads = depth.div_ceil(4);
            let mut q = vec![0u32; quads * cols];
            quantize_quads(input, MatRef::new(&x, depth, cols), &mut q, 1);
            let mut portable = vec![0i32; rows * cols];
            weight.multiply_portable(&q, cols, &mut portable, 1);
            if let Some(packed) = &weight.packed {
                let mut vnni = vec![0i32; rows * cols];
                packed.multiply_quads(&q, cols, &mut vnni, 2);
                assert_eq!(vnni, portable, "vpdpbusd and the portable loop, {rows}x{depth}x{cols}");
            }
            if super::super::isa::detected() >= super::super::isa::Level::Avx2 {
                let mut avx2 = vec![0i32; rows * cols];
                multiply_avx2(&i16_pairs(&weight.plain, rows, depth), quads, &q, cols, &mut avx2, 2);
                assert_eq!(avx2, portable, "vpmaddwd and the portable loop, {rows}x{depth}x{cols}");
            }
        }
    }
}
