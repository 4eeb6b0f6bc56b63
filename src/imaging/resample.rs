//! Pillow's antialiased bilinear resize (`Image.resize(size, Image.BILINEAR)`), one band at a time, as a
//! transcription of Pillow 13's `src/libImaging/Resample.c`:
//!
//! - 8-bit bands: fixed-point coefficients (`normalize_coeffs_8bpc`), a rounding to 8 bits after each of the two
//!   separable passes and Pillow's pass order, so the bytes equal Pillow's (`tests/preprocess.rs`);
//! - f32 bands: the same double-precision coefficients unrounded, accumulated in double and stored as f32
//!   after each pass, as Pillow's mode "F" (`ImagingResampleHorizontal_32bpc`) does.
//!
//! Only a window of the output may be asked for: every output pixel depends on its own filter taps alone, so
//! `Resize` + `CenterCrop` computes just the crop, bounded by the crop's size whatever the aspect ratio.

use std::ops::Range;

use rayon::prelude::*;

use super::planar::Sample;

/// Pillow's fixed-point precision for 8-bit images: 32 bits less 8 for the value and 2 for overshoot.
const PRECISION_BITS: u32 = 32 - 8 - 2;
const HALF: i64 = 1 << (PRECISION_BITS - 1);

/// A sample type's arithmetic in the two passes.
pub trait Resample: Sample {
    type Tap: Copy + Send + Sync;
    type Acc: Copy + Send;
    /// A normalised coefficient as this type's tap.
    fn tap(w: f64) -> Self::Tap;
    fn start() -> Self::Acc;
    fn mac(acc: Self::Acc, v: Self, w: Self::Tap) -> Self::Acc;
    fn finish(acc: Self::Acc) -> Self;
}

impl Resample for u8 {
    type Tap = i32;
    type Acc = i64;
    fn tap(w: f64) -> i32 {
        let one = f64::from(1u32 << PRECISION_BITS);
        // Round half away from zero, then truncate, as normalize_coeffs_8bpc does.
        if w < 0.0 { (-0.5 + w * one) as i32 } else { (0.5 + w * one) as i32 }
    }
    fn start() -> i64 {
        HALF
    }
    fn mac(acc: i64, v: u8, w: i32) -> i64 {
        // Sums are kept in i64 so that no input can overflow where Pillow's int would.
        acc + i64::from(v) * i64::from(w)
    }
    fn finish(acc: i64) -> u8 {
        // Pillow's clip8: shift the fixed point away and clip to a byte.
        (acc >> PRECISION_BITS).clamp(0, 255) as u8
    }
}

impl Resample for f32 {
    type Tap = f64;
    type Acc = f64;
    fn tap(w: f64) -> f64 {
        w
    }
    fn start() -> f64 {
        0.0
    }
    fn mac(acc: f64, v: f32, w: f64) -> f64 {
        acc + f64::from(v) * w
    }
    fn finish(acc: f64) -> f32 {
        acc as f32
    }
}

/// Filter taps for a range of output positions along one axis (Pillow's `precompute_coeffs` for the
/// bilinear filter, normalised, in the sample type's form).
struct Taps<T> {
    /// Output positions covered, and for each its first input index and its weights.
    outputs: Range<usize>,
    first: Vec<usize>,
    weights: Vec<Vec<T>>,
}

impl<T: Copy> Taps<T> {
    fn bilinear(in_size: usize, out_size: usize, outputs: Range<usize>, tap: impl Fn(f64) -> T) -> Taps<T> {
        // Pillow passes the source box as floats, so the input size goes through f32 on its way to double.
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = scale.max(1.0);
        // Bilinear support is 1, widened by the downscale factor so that the filter antialiases.
        let support = filterscale;
        let inv_filterscale = 1.0 / filterscale;
        let (mut first, mut weights) = (Vec::new(), Vec::new());
        for xx in outputs.clone() {
            let center = (xx as f64 + 0.5) * scale;
            // `(int)(v + 0.5)` in C truncates towards zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
            let mut k: Vec<f64> =
                (xmin..xmax).map(|x| bilinear_filter((x as f64 - center + 0.5) * inv_filterscale)).collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|w| *w /= ww);
            }
            first.push(xmin);
            weights.push(k.into_iter().map(&tap).collect());
        }
        Taps { outputs, first, weights }
    }

    /// Pillow skips the pass along an axis whose size does not change; a one-tap identity filter in its place
    /// gives the same values (8-bit: value * 2^22 + 2^21, shifted back) and keeps a single code path.
    fn axis(in_size: usize, out_size: usize, range: &Range<usize>, tap: impl Fn(f64) -> T) -> Taps<T> {
        if in_size == out_size {
            let n = range.len();
            Taps { outputs: range.clone(), first: range.clone().collect(), weights: vec![vec![tap(1.0)]; n] }
        } else {
            Taps::bilinear(in_size, out_size, range.clone(), tap)
        }
    }

    /// The input indices that the taps of `outputs` read.
    fn span(&self, outputs: &Range<usize>) -> Range<usize> {
        let taps = outputs.clone().map(|o| o - self.outputs.start);
        let start = taps.clone().map(|t| self.first[t]).min().unwrap_or(0);
        let end = taps.map(|t| self.first[t] + self.weights[t].len()).max().unwrap_or(0);
        start..end.max(start)
    }

    /// (first input index, weights) of output position `o`.
    fn of(&self, o: usize) -> (usize, &[T]) {
        let t = o - self.outputs.start;
        (self.first[t], &self.weights[t])
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// Pixels `xs` x `ys` of the Pillow bilinear resize of one band (`input` = (width, height)) to `out` =
/// (width, height), row by row.
pub fn resample_window<S: Resample>(
    plane: &[S],
    input: (usize, usize),
    out: (usize, usize),
    xs: Range<usize>,
    ys: Range<usize>,
) -> Vec<S> {
    let ((in_w, in_h), (out_w, out_h)) = (input, out);
    if xs.is_empty() || ys.is_empty() || in_w == 0 || in_h == 0 {
        // Nothing to compute, or nothing to sample (Pillow refuses empty images; we give black).
        return vec![S::default(); xs.len() * ys.len()];
    }
    let (tx, ty) = (Taps::axis(in_w, out_w, &xs, S::tap), Taps::axis(in_h, out_h, &ys, S::tap));
    // Pillow runs the vertical pass first when the height shrinks by more than twice as much as the width;
    // the order matters because each pass rounds (to 8 bits, or to f32).
    let (dh, dw) = (in_h as i64 - out_h as i64, in_w as i64 - out_w as i64);
    if !(dh > 0 && dh > dw * 2) {
        // Resample horizontally only the source rows that the vertical pass reads (Pillow's ybox).
        let rows = ty.span(&ys);
        let band = &plane[rows.start * in_w..rows.end * in_w];
        let tmp = horizontal_pass(band, in_w, 0, &tx, &xs);
        vertical_pass(&tmp, xs.len(), rows.start, &ty, &ys, 0..xs.len())
    } else {
        // Resample vertically only the source columns that the horizontal pass reads.
        let cols = tx.span(&xs);
        let tmp = vertical_pass(plane, in_w, 0, &ty, &ys, cols.clone());
        horizontal_pass(&tmp, cols.len(), cols.start, &tx, &xs)
    }
}

/// Resample every row of `src` (`width` samples a row, whose first column is input column `x0`) to the output
/// columns `xs`.
fn horizontal_pass<S: Resample>(src: &[S], width: usize, x0: usize, taps: &Taps<S::Tap>, xs: &Range<usize>) -> Vec<S> {
    let mut out = vec![S::default(); src.len() / width.max(1) * xs.len()];
    out.par_chunks_mut(xs.len().max(1)).zip(src.par_chunks(width.max(1))).for_each(|(line_out, line_in)| {
        for (o, px) in xs.clone().zip(line_out.iter_mut()) {
            let (first, k) = taps.of(o);
            let acc = k.iter().zip(&line_in[first - x0..]).fold(S::start(), |a, (&w, &v)| S::mac(a, v, w));
            *px = S::finish(acc);
        }
    });
    out
}

/// Resample the columns `cols` of `src` (`width` samples a row, whose first row is input row `y0`) to the
/// output rows `ys`.
fn vertical_pass<S: Resample>(
    src: &[S],
    width: usize,
    y0: usize,
    taps: &Taps<S::Tap>,
    ys: &Range<usize>,
    cols: Range<usize>,
) -> Vec<S> {
    let row_len = cols.len();
    let mut out = vec![S::default(); ys.len() * row_len];
    out.par_chunks_mut(row_len.max(1)).zip(ys.clone().into_par_iter()).for_each(|(line_out, o)| {
        let (first, k) = taps.of(o);
        // Accumulate whole input rows, one tap at a time, so that memory is read in order.
        let mut acc = vec![S::start(); row_len];
        for (i, &w) in k.iter().enumerate() {
            let row = (first + i - y0) * width;
            for (a, &p) in acc.iter_mut().zip(&src[row + cols.start..row + cols.end]) {
                *a = S::mac(*a, p, w);
            }
        }
        for (px, a) in line_out.iter_mut().zip(acc) {
            *px = S::finish(a);
        }
    });
    out
}
