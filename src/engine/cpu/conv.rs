//! 2-d convolution as im2col + GEMM.
//!
//! For a group of m images: col = im2col(x[n..n+m]) is `[C·kh·kw, m·OH·OW]`, and y = W·col with W viewed as
//! `[O, C·kh·kw]` (PyTorch's weight layout flattened). Backward reuses the same matrices: dW += dy·colᵀ and
//! dcol = Wᵀ·dy, scattered back by col2im. Large feature maps make one image per group; small ones (late stages,
//! CIFAR-size or digit-size inputs) batch several images into one GEMM, since a GEMM with a handful of columns
//! runs at memory speed, not compute speed. A lone 1x1 stride-1 unpadded image skips im2col: x[n] already is
//! `[C, H·W]`. Tasks of whole groups are spread across threads when there are enough; otherwise each GEMM uses
//! all threads.
//!
//! Taps that only ever read padding (a 3x3 kernel on a 1x1 map) are cropped away first (`crop`).
//!
//! 3x3 stride-1 padding-1 convolutions with enough tiles go to Winograd F(4x4, 3x3) instead (see `winograd`),
//! all three passes; the choice is `algo::resolve`'s.
//!
//! With `Operands::Bf16` (`train --dtype bf16`) the products run on the packed bf16 kernels: W (forward) and Wᵀ
//! (dcol) rounded and packed once per call, each group's dy (dW = dy·colsᵀ) per group, colsᵀ read as a
//! transposed right operand; the accumulation stays f32.

use rayon::prelude::*;

use super::Operands;
use super::algo::{ConvAlgo, default_algo, resolve};
use super::batch_sum;
use super::crop;
use super::int8::{self, Int8Weight, QuantParams};
use super::lanes::deinterleave2;
use super::matmul::{MatRef, matmul};
use super::norm::Affine;
use super::packed::{BF16_CHECKED, PackedLhs};
use super::scratch::{self, with_buffer};
use super::winograd;
use crate::engine::{ConvGeom, Tensor};

/// Columns a GEMM should have to run near peak; small feature maps are grouped across images to reach it.
const MIN_COLS: usize = 512;

struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    geom: ConvGeom,
}

impl Dims {
    fn new(x: &Tensor, w: &Tensor, geom: ConvGeom) -> Dims {
        Dims::of(x.dims4(), w.dims4(), geom)
    }
    fn of(x: [usize; 4], w: [usize; 4], geom: ConvGeom) -> Dims {
        let [n, c, h, wi] = x;
        let [o, wc, kh, kw] = w;
        assert_eq!(c, wc, "conv2d: input has {c} channels, weight expects {wc}");
        assert!(
            h + 2 * geom.padding.0 >= kh && wi + 2 * geom.padding.1 >= kw,
            "conv2d: kernel larger than padded input"
        );
        let (oh, ow) = geom.output_hw(h, wi, kh, kw);
        Dims { n, c, h, w: wi, o, kh, kw, oh, ow, geom }
    }
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.geom.stride == (1, 1) && self.geom.padding == (0, 0)
    }
    fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }
    fn ohw(&self) -> usize {
        self.oh * self.ow
    }
    fn chw(&self) -> usize {
        self.c * self.h * self.w
    }
    /// Columns of a full group's product (what packed weights are laid out for).
    fn columns(&self) -> usize {
        let (group, _, _) = self.plan();
        group.min(self.n) * self.ohw()
    }
    /// Images per GEMM group, images per parallel task (whole groups), and the threads each GEMM may use.
    fn plan(&self) -> (usize, usize, usize) {
        let group = MIN_COLS.div_ceil(self.ohw().max(1)).clamp(1, self.n.max(1));
        let groups = self.n.div_ceil(group).max(1);
        let threads = rayon::current_num_threads().max(1);
        if groups >= threads { (group, groups.div_ceil(threads) * group, 1) } else { (group, groups * group, threads) }
    }
}

/// The output columns whose input column ox·s + k − p lies inside [0, w): everything outside reads padding.
fn valid_cols(out: usize, s: usize, k: usize, p: usize, w: usize) -> std::ops::Range<usize> {
    let lo = if p > k { (p - k).div_ceil(s) } else { 0 }.min(out);
    let hi = if w + p > k { (w + p - k).div_ceil(s) } else { 0 }.clamp(lo, out);
    lo..hi
}

/// Row (ci, i, j) of col holds x[ci, oh·sh + i − ph, ow·sw + j − pw] for every output position, 0 in the padding.
/// The image's columns start at `offset` in rows of length `ld` (several images share one col matrix).
fn im2col(x: &[f32], d: &Dims, col: &mut [f32], ld: usize, offset: usize) {
    if d.ohw() <= TABLE_MAX_OUTPUTS {
        let taps = tap_sources(d);
        let (kk, ohw, hw) = (d.kh * d.kw, d.ohw(), d.h * d.w);
        for (ci, plane) in x[..d.chw()].chunks(hw.max(1)).enumerate() {
            for (k, src) in taps.chunks(ohw.max(1)).enumerate() {
                let row = &mut col[(ci * kk + k) * ld + offset..][..ohw];
                for (v, &s) in row.iter_mut().zip(src) {
                    *v = plane.get(s as usize).copied().unwrap_or(0.0);
                }
            }
        }
        return;
    }
    for (r, band) in col[..d.ckk() * ld].chunks_mut(d.kw * ld).enumerate() {
        im2col_band(x, d, r / d.kh, r % d.kh, band, ld, offset);
    }
}

/// Output maps up to this many positions (8x8) are gathered through `tap_sources`' table, not copied row by row: a
/// 2x2 or 4x4 map's rows are 2 or 4 values long, and the per-row bookkeeping of `im2col_band` then cost more
/// than the copy (im2col was 9 % of the digits recipe's step, ResNet-34 at 8x8 input, 2x2 maps in layer3).
const TABLE_MAX_OUTPUTS: usize = 64;

/// For kernel tap k = i·kw + j and output position q = oy·ow + ox: the index in the input plane that
/// position reads through that tap, or `u32::MAX` where it reads padding.
fn tap_sources(d: &Dims) -> Vec<u32> {
    let ((sh, sw), (ph, pw)) = (d.geom.stride, d.geom.padding);
    let mut taps = Vec::with_capacity(d.kh * d.kw * d.ohw());
    for i in 0..d.kh {
        for j in 0..d.kw {
            for oy in 0..d.oh {
                for ox in 0..d.ow {
                    let (r, c) = ((oy * sh + i).wrapping_sub(ph), (ox * sw + j).wrapping_sub(pw));
                    taps.push(if r < d.h && c < d.w { (r * d.w + c) as u32 } else { u32::MAX });
                }
            }
        }
    }
    taps
}

/// `im2col` spread over the pool: for a lone image the copy is a third of a stem convolution's time.
fn im2col_parallel(x: &[f32], d: &Dims, col: &mut [f32], ld: usize, offset: usize) {
    col[..d.ckk() * ld]
        .par_chunks_mut(d.kw * ld)
        .enumerate()
        .for_each(|(r, band)| im2col_band(x, d, r / d.kh, r % d.kh, band, ld, offset));
}

/// The kw rows (ci, i, 0..kw) of col.
fn im2col_band(x: &[f32], d: &Dims, ci: usize, i: usize, band: &mut [f32], ld: usize, offset: usize) {
    if d.geom.stride.1 == 2 {
        return im2col_band_s2(x, d, ci, i, band, ld, offset);
    }
    let (sh, sw) = d.geom.stride;
    let (ph, pw) = d.geom.padding;
    let ohw = d.ohw();
    let plane = &x[ci * d.h * d.w..(ci + 1) * d.h * d.w];
    let rows = valid_cols(d.oh, sh, i, ph, d.h);
    for j in 0..d.kw {
        let row = &mut band[j * ld + offset..][..ohw];
        let cols = valid_cols(d.ow, sw, j, pw, d.w);
        for (oy, out) in row.chunks_mut(d.ow).enumerate() {
            if !rows.contains(&oy) || cols.is_empty() {
                out.fill(0.0);
                continue;
            }
            let src = &plane[(oy * sh + i - ph) * d.w..][..d.w];
            out[..cols.start].fill(0.0);
            out[cols.end..].fill(0.0);
            let first = cols.start * sw + j - pw;
            if sw == 1 {
                out[cols.clone()].copy_from_slice(&src[first..first + cols.len()]);
            } else {
                for (v, &x) in out[cols.clone()].iter_mut().zip(src[first..].iter().step_by(sw)) {
                    *v = x;
                }
            }
        }
    }
}

/// `im2col_band` for column stride 2 (the stem, the strided 3x3 and 1x1 convolutions): each input row is split
/// once into its even and odd columns, so every kernel column copies a contiguous run instead of gathering
/// every other value (the gather was a third of the stem's time).
fn im2col_band_s2(x: &[f32], d: &Dims, ci: usize, i: usize, band: &mut [f32], ld: usize, offset: usize) {
    let sh = d.geom.stride.0;
    let (ph, pw) = d.geom.padding;
    let plane = &x[ci * d.h * d.w..(ci + 1) * d.h * d.w];
    let rows = valid_cols(d.oh, sh, i, ph, d.h);
    let half = d.w.div_ceil(2);
    let (mut even, mut odd) = (vec![0.0f32; half], vec![0.0f32; half]);
    for oy in 0..d.oh {
        if !rows.contains(&oy) {
            for j in 0..d.kw {
                band[j * ld + offset + oy * d.ow..][..d.ow].fill(0.0);
            }
            continue;
        }
        deinterleave2(&plane[(oy * sh + i - ph) * d.w..][..d.w], &mut even, &mut odd);
        for j in 0..d.kw {
            let out = &mut band[j * ld + offset + oy * d.ow..][..d.ow];
            let cols = valid_cols(d.ow, 2, j, pw, d.w);
            out[..cols.start].fill(0.0);
            out[cols.end..].fill(0.0);
            if cols.is_empty() {
                continue;
            }
            // output column ox reads input column 2·ox + j − pw
            let first = cols.start * 2 + j - pw;
            let phase = if first.is_multiple_of(2) { &even } else { &odd };
            out[cols.clone()].copy_from_slice(&phase[first / 2..][..cols.len()]);
        }
    }
}

/// The adjoint of im2col: add every col entry back onto the input position it was read from.
fn col2im(col: &[f32], d: &Dims, dx: &mut [f32], ld: usize, offset: usize) {
    if d.ohw() <= TABLE_MAX_OUTPUTS {
        // the same additions in the same order as the row runs below, through `im2col`'s table
        let taps = tap_sources(d);
        let (kk, ohw, hw) = (d.kh * d.kw, d.ohw(), d.h * d.w);
        for (ci, plane) in dx[..d.chw()].chunks_mut(hw.max(1)).enumerate() {
            for (k, src) in taps.chunks(ohw.max(1)).enumerate() {
                let row = &col[(ci * kk + k) * ld + offset..][..ohw];
                for (&v, &s) in row.iter().zip(src) {
                    if let Some(t) = plane.get_mut(s as usize) {
                        *t += v;
                    }
                }
            }
        }
        return;
    }
    let (sh, sw) = d.geom.stride;
    let (ph, pw) = d.geom.padding;
    let ohw = d.ohw();
    for ci in 0..d.c {
        let plane = &mut dx[ci * d.h * d.w..(ci + 1) * d.h * d.w];
        for i in 0..d.kh {
            let rows = valid_cols(d.oh, sh, i, ph, d.h);
            for j in 0..d.kw {
                let row = &col[((ci * d.kh + i) * d.kw + j) * ld + offset..][..ohw];
                let cols = valid_cols(d.ow, sw, j, pw, d.w);
                if cols.is_empty() {
                    continue;
                }
                for oy in rows.clone() {
                    let dst = &mut plane[(oy * sh + i - ph) * d.w..][..d.w];
                    let src = &row[oy * d.ow..][cols.clone()];
                    let first = cols.start * sw + j - pw;
                    for (&v, t) in src.iter().zip(dst[first..].iter_mut().step_by(sw)) {
                        *t += v;
                    }
                }
            }
        }
    }
}

pub fn forward(x: &Tensor, w: &Tensor, geom: ConvGeom, operands: Operands) -> Tensor {
    forward_with(x, w, geom, default_algo(), operands)
}

/// y = conv2d(x, w) by `algo`; with `Operands::Bf16` every product rounds its operands to bf16 and sums in f32.
pub fn forward_with(x: &Tensor, w: &Tensor, geom: ConvGeom, algo: ConvAlgo, operands: Operands) -> Tensor {
    if let Some(win) = crop::window(x.dims4(), w.dims4(), geom) {
        return forward_with(x, &win.crop(w), win.geom, algo, operands);
    }
    let d = Dims::new(x, w, geom);
    if resolve(algo, x.dims4(), w.dims4(), geom) == ConvAlgo::Winograd {
        let y = winograd::forward(x.data(), w.data(), (d.n, d.c, d.h, d.w, d.o), operands);
        return Tensor::new(&[d.n, d.o, d.oh, d.ow], y).expect("conv2d output shape matches its data");
    }
    let wm = MatRef::new(w.data(), d.o, d.ckk());
    match operands {
        Operands::F32 => im2col_forward(x, &d, &|dst, cols, threads| matmul(dst, wm, cols, false, threads), 0, None),
        Operands::Bf16 => {
            let packed = PackedLhs::bf16(wm, d.columns()).expect(BF16_CHECKED);
            im2col_forward(x, &d, &|dst, cols, threads| packed.multiply_threads(cols, dst, threads), 0, None)
        }
    }
}

/// dst (`O`×cols) = W · cols on `threads` threads, however the caller holds W (`O`×`C·kh·kw`).
type Product<'a> = dyn Fn(&mut [f32], MatRef, usize) + Sync + 'a;

/// y = W · im2col(x) for groups of images (see the module documentation), then `affine` on each image's output
/// while it is still in cache. Temporaries up to `keep_bytes` stay with their thread for the next call
/// (`scratch`).
fn im2col_forward(x: &Tensor, d: &Dims, product: &Product, keep_bytes: usize, affine: Option<&Affine>) -> Tensor {
    let (group, per_task, gemm_threads) = d.plan();
    let (ckk, ohw, chw, o) = (d.ckk(), d.ohw(), d.chw(), d.o);
    let mut y = vec![0.0f32; d.n * o * ohw];
    // `affine` over the images of yg, the first being image `first`; spread over the pool like the product
    let finish = |yg: &mut [f32], first: usize| {
        let Some(affine) = affine else { return };
        let plane = |(p, y): (usize, &mut [f32])| affine.apply(p % o, (first * o + p) * ohw, y);
        if gemm_threads > 1 {
            yg.par_chunks_mut(ohw).enumerate().for_each(plane);
        } else {
            yg.chunks_mut(ohw).enumerate().for_each(plane);
        }
    };
    if d.n > 0 && ohw > 0 {
        y.par_chunks_mut(per_task * o * ohw).zip(x.data().par_chunks(per_task * chw)).enumerate().for_each(
            |(t, (ys, xs))| {
                for (i, (yg, xg)) in ys.chunks_mut(group * o * ohw).zip(xs.chunks(group * chw)).enumerate() {
                    let m = xg.len() / chw;
                    let first = t * per_task + i * group;
                    if m == 1 && d.pointwise() {
                        product(yg, MatRef::new(xg, ckk, ohw), gemm_threads);
                        finish(yg, first);
                        continue;
                    }
                    // For inference kept per thread: a stem's col is 7 MB per image, and fresh pages cost more
                    // than the copy.
                    with_buffer(&COL, ckk * m * ohw, keep_bytes, |col| {
                        for (j, x_n) in xg.chunks(chw).enumerate() {
                            if gemm_threads > 1 {
                                im2col_parallel(x_n, d, col, m * ohw, j * ohw);
                            } else {
                                im2col(x_n, d, col, m * ohw, j * ohw);
                            }
                        }
                        let cols = MatRef::new(col, ckk, m * ohw);
                        if m == 1 {
                            product(yg, cols, gemm_threads);
                            finish(yg, first);
                            return;
                        }
                        with_buffer(&OUT, o * m * ohw, keep_bytes, |out| {
                            product(out, cols, gemm_threads);
                            // [O, m·OHW] → m images of [O, OHW]
                            for (j, y_n) in yg.chunks_mut(o * ohw).enumerate() {
                                for (oc, dst) in y_n.chunks_mut(ohw).enumerate() {
                                    dst.copy_from_slice(&out[oc * m * ohw + j * ohw..][..ohw]);
                                }
                            }
                            finish(yg, first);
                        })
                    })
                }
            },
        );
    }
    Tensor::new(&[d.n, o, d.oh, d.ow], y).expect("conv2d output shape matches its data")
}

thread_local! {
    static COL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static OUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Columns of the products `forward_packed` runs for input `[n, c, h, w]` and weight `[o, c, kh, kw]`.
pub fn product_columns(x: [usize; 4], w_shape: [usize; 4], geom: ConvGeom) -> usize {
    Dims::of(x, w_shape, geom).columns()
}

/// The im2col forward with the weight packed once (`PackedLhs` of `[O, C·kh·kw]`, f32 or bf16): for inference.
/// `affine`, if given, is applied to each image's output right after its product.
pub fn forward_packed(
    x: &Tensor,
    w: &PackedLhs,
    w_shape: [usize; 4],
    geom: ConvGeom,
    affine: Option<&Affine>,
) -> Tensor {
    let [o, c, kh, kw] = w_shape;
    assert!(w.rows() == o && w.depth() == c * kh * kw, "the packed weight is [O, C·kh·kw]");
    let d = Dims::of(x.dims4(), w_shape, geom);
    let product = |dst: &mut [f32], cols: MatRef, threads: usize| w.multiply_threads(cols, dst, threads);
    im2col_forward(x, &d, &product, scratch::INFERENCE_KEEP, affine)
}

/// conv2d of `x` with an int8 weight, its input quantized with `input`, then `affine` as the output is written.
/// A weight from `Int8Weight::conv` takes quad planes: the input is quantized once (4 channels' codes per 32-bit
/// word, C/4 planes) and im2col runs over those words, a quarter of the f32 columns' rows with no per-column
/// quantization; padding is word 0, i.e. code 0 = real 0, so the zero point must be 0 (every ResNet convolution
/// after the stem: its input is a ReLU's output) and the channels come in fours. A weight from
/// `Int8Weight::new` (the stem's normalised image: a zero point above 0, 3 or 1 channels) takes im2col's f32
/// columns, quantized as they are multiplied (`Int8Weight::multiply`); their padding 0.0 is exactly the zero
/// point's code.
pub fn forward_int8(
    x: &Tensor,
    w: &Int8Weight,
    input: QuantParams,
    w_shape: [usize; 4],
    geom: ConvGeom,
    affine: Option<&Affine>,
) -> Tensor {
    let [o, c, kh, kw] = w_shape;
    let [n, xc, h, wd] = x.dims4();
    assert!(w.rows() == o && w.depth() == c * kh * kw && xc == c, "the int8 weight is [O, C·kh·kw] for this input");
    if !w.takes_quad_planes() {
        let d = Dims::of(x.dims4(), w_shape, geom);
        let product = |dst: &mut [f32], cols: MatRef, threads: usize| w.multiply(input, cols, dst, threads);
        return im2col_forward(x, &d, &product, scratch::INFERENCE_KEEP, affine);
    }
    assert!(input.zero_point == 0 && c.is_multiple_of(4), "quad planes take inputs ≥ 0 in channels of 4");
    let (planes, hw) = (c / 4, h * wd);
    let mut words = vec![0.0f32; n * planes * hw];
    int8::f32_as_words_mut(&mut words)
        .par_chunks_mut(planes * hw)
        .zip(x.data().par_chunks(c * hw))
        .for_each(|(q, x_n)| int8::quantize_quads(input, MatRef::new(x_n, c, hw), q, 1));
    let words = Tensor::new(&[n, planes, h, wd], words).expect("quad planes");
    let d = Dims::of(words.dims4(), [o, planes, kh, kw], geom);
    let product = |dst: &mut [f32], cols: MatRef, threads: usize| {
        w.multiply_codes(input, int8::f32_as_words(cols.data), cols.cols, dst, threads)
    };
    im2col_forward(&words, &d, &product, scratch::INFERENCE_KEEP, affine)
}

pub fn backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    geom: ConvGeom,
    need: (bool, bool),
    operands: Operands,
) -> (Option<Tensor>, Option<Tensor>) {
    backward_with(x, w, dy, geom, need, default_algo(), operands)
}

/// dx and dw (where `need` = (dx, dw) asks for them) for y = conv2d(x, w) by `algo`, the products in `operands`.
pub fn backward_with(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    geom: ConvGeom,
    need: (bool, bool),
    algo: ConvAlgo,
    operands: Operands,
) -> (Option<Tensor>, Option<Tensor>) {
    let (need_dx, need_dw) = need;
    if let Some(win) = crop::window(x.dims4(), w.dims4(), geom) {
        let (dx, dw) = backward_with(x, &win.crop(w), dy, win.geom, need, algo, operands);
        return (dx, dw.map(|dw| win.uncrop(&dw, w.dims4())));
    }
    let d = Dims::new(x, w, geom);
    assert_eq!(dy.shape(), [d.n, d.o, d.oh, d.ow], "conv2d backward: dy has the wrong shape");
    if resolve(algo, x.dims4(), w.dims4(), geom) == ConvAlgo::Winograd {
        let shape = (d.n, d.c, d.h, d.w, d.o);
        let dx = need_dx.then(|| {
            let dx = winograd::backward_data(dy.data(), w.data(), shape, operands);
            Tensor::new(x.shape(), dx).expect("dx has x's shape")
        });
        let dw = need_dw.then(|| {
            let dw = winograd::backward_filter(x.data(), dy.data(), shape, operands);
            Tensor::new(w.shape(), dw).expect("dw has w's shape")
        });
        return (dx, dw);
    }
    // Tasks of whole groups inside each `batch_sum` chunk, so that the weight gradient adds per chunk.
    let (ckk, ohw, chw, o) = (d.ckk(), d.ohw(), d.chw(), d.o);
    let mut tasks = Vec::new();
    let mut gemm_threads = 1;
    for (c, chunk) in batch_sum::chunks(d.n).enumerate() {
        let (group, per_task, threads) = Dims { n: chunk.len(), ..d }.plan();
        gemm_threads = gemm_threads.max(threads);
        tasks.extend((chunk.start..chunk.end).step_by(per_task).map(|f| (c, f, (f + per_task).min(chunk.end), group)));
    }
    if tasks.len() >= rayon::current_num_threads() {
        gemm_threads = 1;
    }
    let wm = MatRef::new(w.data(), o, ckk);
    // The products in `operands`. dW += dy·colsᵀ: in bf16 each group's dy is rounded and packed as it comes.
    let add_dw = |dw: &mut [f32], dym: MatRef, cols_t: MatRef| match operands {
        Operands::F32 => matmul(dw, dym, cols_t, true, gemm_threads),
        Operands::Bf16 => {
            PackedLhs::bf16(dym, cols_t.cols).expect(BF16_CHECKED).multiply_add_threads(cols_t, dw, gemm_threads)
        }
    };
    // dcol = Wᵀ·dy: in bf16 Wᵀ is rounded and packed once for every group.
    let wt_bf16 = (operands == Operands::Bf16 && need_dx)
        .then(|| PackedLhs::bf16(wm.t(), tasks.first().map_or(1, |t| t.3) * ohw).expect(BF16_CHECKED));
    let dcol = |dst: &mut [f32], dym: MatRef| match &wt_bf16 {
        Some(wt) => wt.multiply_threads(dym, dst, gemm_threads),
        None => matmul(dst, wm.t(), dym, false, gemm_threads),
    };
    let mut dx = vec![0.0f32; if need_dx { d.n * chw } else { 0 }];
    let mut dx_parts: Vec<&mut [f32]> = Vec::with_capacity(tasks.len());
    let mut rest = &mut dx[..];
    for &(_, first, last, _) in &tasks {
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(if need_dx { (last - first) * chw } else { 0 });
        dx_parts.push(part);
        rest = tail;
    }

    let partial_dws: Vec<(usize, Vec<f32>)> = dx_parts
        .into_par_iter()
        .zip(&tasks)
        .map(|(dx_task, &(chunk, first, last, group))| {
            let mut dw = vec![0.0f32; if need_dw { o * ckk } else { 0 }];
            let (mut col, mut dyg) = (Vec::new(), Vec::new());
            for start in (first..last).step_by(group) {
                let m = group.min(last - start);
                let xg = &x.data()[start * chw..(start + m) * chw];
                let dy_src = &dy.data()[start * o * ohw..(start + m) * o * ohw];
                // dy for the group as [O, m·OHW]; a lone image already has that layout.
                let dy_g = if m == 1 {
                    dy_src
                } else {
                    dyg.resize(o * m * ohw, 0.0);
                    for (j, dy_n) in dy_src.chunks(o * ohw).enumerate() {
                        for (oc, src) in dy_n.chunks(ohw).enumerate() {
                            dyg[oc * m * ohw + j * ohw..][..ohw].copy_from_slice(src);
                        }
                    }
                    &dyg
                };
                let dym = MatRef::new(dy_g, o, m * ohw);
                let direct = m == 1 && d.pointwise();
                if need_dw {
                    let cols = if direct {
                        xg
                    } else {
                        col.resize(ckk * m * ohw, 0.0);
                        for (j, x_n) in xg.chunks(chw).enumerate() {
                            im2col(x_n, &d, &mut col, m * ohw, j * ohw);
                        }
                        &col
                    };
                    add_dw(&mut dw, dym, MatRef::new(cols, ckk, m * ohw).t());
                }
                if need_dx {
                    let dx_g = &mut dx_task[(start - first) * chw..(start - first + m) * chw];
                    if direct {
                        dcol(dx_g, dym);
                    } else {
                        col.resize(ckk * m * ohw, 0.0);
                        dcol(&mut col, dym);
                        for (j, dx_n) in dx_g.chunks_mut(chw).enumerate() {
                            col2im(&col, &d, dx_n, m * ohw, j * ohw);
                        }
                    }
                }
            }
            (chunk, dw)
        })
        .collect();

    let dx = need_dx.then(|| Tensor::new(x.shape(), dx).expect("dx has x's shape"));
    let dw = need_dw.then(|| {
        // Each chunk's tasks in order, then the chunks pairwise.
        let mut per_chunk: Vec<Vec<f32>> = Vec::new();
        if partial_dws.is_empty() {
            per_chunk.push(vec![0.0; o * ckk]);
        }
        for (chunk, part) in partial_dws {
            match per_chunk.get_mut(chunk) {
                Some(total) => total.iter_mut().zip(&part).for_each(|(t, p)| *t += p),
                None => per_chunk.push(part),
            }
        }
        Tensor::new(w.shape(), batch_sum::pairwise(per_chunk)).expect("dw has w's shape")
    });
    (dx, dw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::test_util::values;

    /// The gather table of small maps writes what the row runs write, and its col2im adds the same values in
    /// the same order (bit for bit), for strides, paddings and kernels ResNet has and a few it has not.
    #[test]
    fn small_maps_gather_what_the_row_runs_copy() {
        for (c, h, w, k, s, p) in
            [(3, 2, 2, 3, 1, 1), (5, 4, 4, 3, 2, 1), (2, 3, 5, 3, 1, 1), (4, 7, 7, 7, 2, 3), (2, 4, 4, 1, 2, 0)]
        {
            let x = values(c * h * w, 11);
            let d = Dims::of([1, c, h, w], [1, c, k, k], ConvGeom::square(s, p));
            assert!(d.ohw() <= TABLE_MAX_OUTPUTS);
            let (ld, offset) = (d.ohw() + 3, 2);
            let (mut table, mut runs) = (vec![f32::NAN; d.ckk() * ld], vec![f32::NAN; d.ckk() * ld]);
            im2col(&x, &d, &mut table, ld, offset);
            for (r, band) in runs.chunks_mut(d.kw * ld).enumerate() {
                im2col_band(&x, &d, r / d.kh, r % d.kh, band, ld, offset);
            }
            let used =
                |v: &[f32]| v.chunks(ld).flat_map(|row| row[offset..offset + d.ohw()].to_vec()).collect::<Vec<_>>();
            assert_eq!(
                used(&table).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                used(&runs).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "im2col {:?}",
                (c, h, w, k, s, p)
            );

            let col = values(d.ckk() * ld, 12);
            let mut by_table = values(c * h * w, 13);
            let mut by_runs = by_table.clone();
            col2im(&col, &d, &mut by_table, ld, offset);
            // the additions in col2im's order: channel, tap, output position
            for ci in 0..c {
                for i in 0..k {
                    for j in 0..k {
                        let row = &col[((ci * k + i) * k + j) * ld + offset..][..d.ohw()];
                        for oy in 0..d.oh {
                            for ox in 0..d.ow {
                                let (r, q) = ((oy * s + i).wrapping_sub(p), (ox * s + j).wrapping_sub(p));
                                if r < h && q < w {
                                    by_runs[ci * h * w + r * w + q] += row[oy * d.ow + ox];
                                }
                            }
                        }
                    }
                }
            }
            assert_eq!(by_table, by_runs, "col2im {:?}", (c, h, w, k, s, p));
        }
    }
}
