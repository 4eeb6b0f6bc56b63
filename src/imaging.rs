//! Image files to pixels and pixels to tensors, bit-compatible with PIL: what the training data and inference
//! share (`data` reads folders through it, `infer::preprocess` is this module), so neither imports the other.
//!
//! torchvision's ImageNet eval preprocessing:
//! `ResNet*_Weights.IMAGENET1K_V1.transforms()` opens the file with PIL, converts it to RGB, resizes the shorter
//! side to 256 with PIL's antialiased BILINEAR filter, centre-crops 224, scales to [0, 1] and normalises. The
//! resize below is a transcription of Pillow 13's `src/libImaging/Resample.c` (8-bit path): fixed-point
//! coefficients, a uint8 rounding after each of the two separable passes and the same pass order, so that it
//! produces the same bytes as `Image.resize(size, Image.BILINEAR)`.

use std::io::Cursor;
use std::ops::Range;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use rayon::prelude::*;

use crate::engine::Tensor;
use crate::error::{Error, Result};

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Largest image we agree to decode (16384 x 16384); checked on the header, before any pixel buffer exists.
const MAX_PIXELS: u64 = 1 << 28;

/// Decode a JPEG/PNG file into 8-bit RGB (greyscale, palette, 16-bit and alpha images converted the way PIL's
/// convert("RGB") does).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::file(path, format!("{what}: {e}"));
    let bytes = std::fs::read(path).map_err(|e| fail("cannot read image", &e))?;
    let mut reader = ImageReader::new(Cursor::new(&bytes[..]));
    // The content decides the format; the extension is only a fallback (and gives the error for non-images).
    if let Ok(format) = ImageFormat::from_path(path) {
        reader.set_format(format);
    }
    let mut reader = reader.with_guessed_format().map_err(|e| fail("cannot read image", &e))?;
    let format = reader.format();
    let mut limits = Limits::default();
    // The pixel-count check below is the real guard; the allocation cap only has to admit the largest image
    // it lets through (16-bit RGBA, 8 bytes a pixel).
    limits.max_alloc = Some(MAX_PIXELS * 8);
    reader.limits(limits);
    // Building the decoder reads the header (and only the header) of the file.
    let decoder = reader.into_decoder().map_err(|e| fail("not a readable JPEG/PNG image", &e))?;
    check_size(path, &decoder)?;
    // zune-jpeg fills in a truncated JPEG with grey where PIL refuses it ("image file is truncated").
    if format == Some(ImageFormat::Jpeg) && !jpeg_reaches_end(&bytes) {
        return Err(Error::file(path, "JPEG file is truncated (no end-of-image marker after the image data)"));
    }
    let image = crate::error::catch_parser_panic(|| DynamicImage::from_decoder(decoder))
        .ok_or_else(|| Error::file(path, "corrupt image (the decoder gave up on it)"))?
        .map_err(|e| fail("cannot decode image", &e))?;
    Ok(to_rgb_like_pil(image))
}

/// Refuse an image whose header claims no pixels, too many, or more than 1 GiB to decode.
fn check_size(path: &Path, decoder: &impl ImageDecoder) -> Result<(u32, u32)> {
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(Error::file(path, format!("image has zero size ({width}x{height})")));
    }
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(Error::file(
            path,
            format!("image is {width}x{height}, more than the {MAX_PIXELS} pixels we accept"),
        ));
    }
    // `from_decoder` allocates the whole decode buffer up front and does not consult `limits`: bound it here.
    if decoder.total_bytes() > 1 << 30 {
        return Err(Error::file(
            path,
            format!("image is {width}x{height} {:?}, more than 1 GiB to decode", decoder.color_type()),
        ));
    }
    Ok((width, height))
}

/// Read only the header of an image file: (width, height), or the error `load_rgb` would give for a file
/// that is not a JPEG/PNG or claims an unacceptable size. What only a full decode finds (a truncated or
/// corrupt pixel stream) is left to `load_rgb`.
pub fn image_header(path: &Path) -> Result<(u32, u32)> {
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::file(path, format!("{what}: {e}"));
    let file = std::fs::File::open(path).map_err(|e| fail("cannot read image", &e))?;
    let mut reader = ImageReader::new(std::io::BufReader::new(file));
    if let Ok(format) = ImageFormat::from_path(path) {
        reader.set_format(format);
    }
    let reader = reader.with_guessed_format().map_err(|e| fail("cannot read image", &e))?;
    let decoder = crate::error::catch_parser_panic(|| reader.into_decoder())
        .ok_or_else(|| Error::file(path, "corrupt image (the decoder gave up on it)"))?
        .map_err(|e| fail("not a readable JPEG/PNG image", &e))?;
    check_size(path, &decoder)
}

/// Walk a JPEG's markers from SOI to EOI: segments are skipped by their length and entropy-coded data up to
/// the next marker (0xFF followed by anything but a stuffed 0x00 or a restart marker). False when the file
/// ends first, which is when libjpeg would ask PIL for more data than the file has.
fn jpeg_reaches_end(data: &[u8]) -> bool {
    let mut i = 2; // after SOI, which the format guess has seen
    loop {
        if data.get(i) != Some(&0xFF) {
            return false;
        }
        while data.get(i) == Some(&0xFF) {
            i += 1; // fill bytes
        }
        let Some(&marker) = data.get(i) else {
            return false;
        };
        i += 1;
        match marker {
            0xD9 => return true,
            0x01 | 0xD0..=0xD7 => continue, // TEM and RSTn stand alone
            _ => {}
        }
        let Some(len) = data.get(i..i + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else {
            return false;
        };
        i += len;
        if marker == 0xDA {
            // Start of scan: entropy-coded data runs to the next real marker.
            loop {
                let Some(offset) = data.get(i..).and_then(|rest| rest.iter().position(|&b| b == 0xFF)) else {
                    return false;
                };
                i += offset;
                match data.get(i + 1) {
                    None => return false,
                    Some(0x00 | 0xD0..=0xD7) => i += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

/// RGB conversion with PIL's rules. 8-bit greyscale is replicated and alpha is dropped (never composited),
/// which is what `image` does too; 16-bit images are where the two differ.
fn to_rgb_like_pil(image: DynamicImage) -> RgbImage {
    let (width, height) = (image.width(), image.height());
    let from_fn = |f: &dyn Fn(u32, u32) -> [u8; 3]| RgbImage::from_fn(width, height, |x, y| image::Rgb(f(x, y)));
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        // PIL opens a 16-bit greyscale PNG as mode "I;16", whose RGB conversion clips at 255 instead of scaling.
        DynamicImage::ImageLuma16(grey) => from_fn(&|x, y| [grey.get_pixel(x, y).0[0].min(255) as u8; 3]),
        // PIL's unpackers for 16-bit LA, RGB and RGBA PNGs keep the high byte of each sample.
        DynamicImage::ImageLumaA16(grey) => from_fn(&|x, y| [(grey.get_pixel(x, y).0[0] >> 8) as u8; 3]),
        DynamicImage::ImageRgb16(rgb) => from_fn(&|x, y| rgb.get_pixel(x, y).0.map(|v| (v >> 8) as u8)),
        DynamicImage::ImageRgba16(rgba) => from_fn(&|x, y| {
            let [r, g, b, _] = rgba.get_pixel(x, y).0;
            [r, g, b].map(|v| (v >> 8) as u8)
        }),
        other => other.to_rgb8(),
    }
}

/// PIL-compatible antialiased bilinear resize of an 8-bit RGB image (Image.resize(size, Image.BILINEAR)).
pub fn resize_bilinear_pil(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = (width as usize, height as usize);
    let data = resample_window(img, (w, h), 0..w, 0..h);
    // The window is the whole output, so the buffer length is exactly width * height * 3.
    RgbImage::from_raw(width, height, data).unwrap_or_else(|| RgbImage::new(width, height))
}

/// torchvision eval transform: Resize(resize) on the shorter side, CenterCrop(crop), to [0,1], normalise with
/// ImageNet's mean/std. Returns [3, crop, crop].
pub fn eval_transform(img: &RgbImage, resize: u32, crop: u32) -> Tensor {
    to_tensor(&resize_center_crop(img, resize, crop), IMAGENET_MEAN, IMAGENET_STD)
}

/// The bytes of torchvision's `Resize(resize)` + `CenterCrop(crop)`.
///
/// Only the cropped window of the resized image is computed: every output pixel of Pillow's resize depends
/// on its own filter taps alone, so this gives the same bytes while keeping memory bounded by the crop even
/// for extreme aspect ratios. Where the resized image is smaller than the crop, torchvision pads with black,
/// and so do we; an empty image is all padding. An image already of the resized size is not resampled
/// (Pillow's `resize` returns a copy then), so a crop of the image's own size is the image itself.
pub fn resize_center_crop(img: &RgbImage, resize: u32, crop: u32) -> RgbImage {
    let (out_w, out_h) = resized_size(img.width() as usize, img.height() as usize, resize as usize);
    let crop = crop as usize;
    let (x_off, y_off) = (crop_offset(out_w, crop), crop_offset(out_h, crop));
    // The part of the crop that lies inside the resized image, in resized-image coordinates.
    let visible = |off: i64, n: usize| off.max(0) as usize..((off + crop as i64).max(0) as usize).min(n);
    let (xs, ys) = (visible(x_off, out_w), visible(y_off, out_h));
    let same = (out_w, out_h) == (img.width() as usize, img.height() as usize);
    let window = if same {
        let mut w = Vec::with_capacity(xs.len() * ys.len() * 3);
        for y in ys.clone() {
            let row = &img.as_raw()[(y * out_w + xs.start) * 3..(y * out_w + xs.end) * 3];
            w.extend_from_slice(row);
        }
        w
    } else {
        resample_window(img, (out_w, out_h), xs.clone(), ys.clone())
    };
    let mut out = vec![0u8; crop * crop * 3];
    for cy in 0..crop {
        for cx in 0..crop {
            // Position in the resized image; outside it (negative or past the end) is padding.
            let (x, y) = (cx as i64 + x_off, cy as i64 + y_off);
            let inside = x >= 0 && y >= 0 && xs.contains(&(x as usize)) && ys.contains(&(y as usize));
            if inside {
                let i = ((y as usize - ys.start) * xs.len() + (x as usize - xs.start)) * 3;
                out[(cy * crop + cx) * 3..][..3].copy_from_slice(&window[i..i + 3]);
            }
        }
    }
    // The buffer holds exactly crop * crop pixels.
    RgbImage::from_raw(crop as u32, crop as u32, out).unwrap_or_else(|| RgbImage::new(crop as u32, crop as u32))
}

/// torchvision's `ToTensor` + `Normalize`: `(v / 255 - mean[c]) / std[c]` in f32, the operations
/// torchvision runs, as `[3, H, W]`.
pub fn to_tensor(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Tensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let mut t = Tensor::zeros(&[3, h, w]);
    let data = t.data_mut();
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = (f32::from(px.0[c]) / 255.0 - mean[c]) / std[c];
        }
    }
    t
}

/// load_rgb + eval_transform.
pub fn preprocess_file(path: &Path, resize: u32, crop: u32) -> Result<Tensor> {
    Ok(eval_transform(&load_rgb(path)?, resize, crop))
}

/// torchvision's `_compute_resized_output_size` for a single size: the shorter side becomes `size` and the
/// longer side `int(size * long / short)` (Python true division, then truncation). Returns (width, height).
fn resized_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    if short == 0 {
        return (0, 0);
    }
    // Python computes `size * long` exactly as an int and rounds the quotient once, as this does.
    let new_long = ((size as u128 * long as u128) as f64 / short as f64) as usize;
    if width <= height { (size, new_long) } else { (new_long, size) }
}

/// Where a centre crop of `crop` starts along a side of `n`, as torchvision's center_crop does it:
/// `int(round((n - crop) / 2.0))` (Python rounds half to even) or, when the side is too short, minus the
/// padding torchvision puts before the image (`(crop - n) // 2`).
fn crop_offset(n: usize, crop: usize) -> i64 {
    if crop > n { -(((crop - n) / 2) as i64) } else { ((n - crop) as f64 / 2.0).round_ties_even() as i64 }
}

/// Pillow's fixed-point precision for 8-bit images: 32 bits less 8 for the value and 2 for overshoot.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Integer filter taps for a range of output positions along one axis (Pillow's `precompute_coeffs` followed
/// by `normalize_coeffs_8bpc`, for the bilinear filter).
struct Taps {
    /// Output positions covered, and for each its first input index and its weights.
    outputs: Range<usize>,
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

impl Taps {
    fn bilinear(in_size: usize, out_size: usize, outputs: Range<usize>) -> Taps {
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
            let one = f64::from(1u32 << PRECISION_BITS);
            // Round half away from zero, then truncate, as normalize_coeffs_8bpc does.
            let fixed = k.iter().map(|&w| if w < 0.0 { (-0.5 + w * one) as i32 } else { (0.5 + w * one) as i32 });
            first.push(xmin);
            weights.push(fixed.collect());
        }
        Taps { outputs, first, weights }
    }

    /// The input indices that the taps of `outputs` read.
    fn span(&self, outputs: &Range<usize>) -> Range<usize> {
        let taps = outputs.clone().map(|o| o - self.outputs.start);
        let start = taps.clone().map(|t| self.first[t]).min().unwrap_or(0);
        let end = taps.map(|t| self.first[t] + self.weights[t].len()).max().unwrap_or(0);
        start..end.max(start)
    }

    /// (first input index, weights) of output position `o`.
    fn of(&self, o: usize) -> (usize, &[i32]) {
        let t = o - self.outputs.start;
        (self.first[t], &self.weights[t])
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// Pillow's rounding: start from one half, shift the fixed point away and clip to a byte (`clip8`).
/// Sums are kept in i64 so that no input can overflow where Pillow's int would.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i64 = 1 << (PRECISION_BITS - 1);

/// Pixels `xs` x `ys` of the Pillow bilinear resize of `img` to `out` = (width, height), as packed RGB bytes.
fn resample_window(img: &RgbImage, out: (usize, usize), xs: Range<usize>, ys: Range<usize>) -> Vec<u8> {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = out;
    if xs.is_empty() || ys.is_empty() || in_w == 0 || in_h == 0 {
        // Nothing to compute, or nothing to sample (Pillow refuses empty images; we give black).
        return vec![0; xs.len() * ys.len() * 3];
    }
    // Pillow skips the pass along an axis whose size does not change; a one-tap identity filter in its place
    // gives the same bytes (value * 2^22 + 2^21, shifted back) and keeps a single code path.
    let axis = |in_size: usize, out_size: usize, range: &Range<usize>| {
        if in_size == out_size {
            let n = range.len();
            Taps { outputs: range.clone(), first: range.clone().collect(), weights: vec![vec![1 << PRECISION_BITS]; n] }
        } else {
            Taps::bilinear(in_size, out_size, range.clone())
        }
    };
    let (tx, ty) = (axis(in_w, out_w, &xs), axis(in_h, out_h, &ys));
    // Pillow runs the vertical pass first when the height shrinks by more than twice as much as the width;
    // the order matters because each pass rounds to 8 bits.
    let (dh, dw) = (in_h as i64 - out_h as i64, in_w as i64 - out_w as i64);
    let horizontal_first = !(dh > 0 && dh > dw * 2);
    let raw = img.as_raw();
    if horizontal_first {
        // Resample horizontally only the source rows that the vertical pass reads (Pillow's ybox).
        let rows = ty.span(&ys);
        let band = &raw[rows.start * in_w * 3..rows.end * in_w * 3];
        let tmp = horizontal_pass(band, in_w, 0, &tx, &xs);
        vertical_pass(&tmp, xs.len(), rows.start, &ty, &ys, 0..xs.len())
    } else {
        // Resample vertically only the source columns that the horizontal pass reads.
        let cols = tx.span(&xs);
        let tmp = vertical_pass(raw, in_w, 0, &ty, &ys, cols.clone());
        horizontal_pass(&tmp, cols.len(), cols.start, &tx, &xs)
    }
}

/// Resample every row of `src` (RGB, `width` pixels a row, whose first column is input column `x0`) to the
/// output columns `xs`.
fn horizontal_pass(src: &[u8], width: usize, x0: usize, taps: &Taps, xs: &Range<usize>) -> Vec<u8> {
    let mut out = vec![0u8; src.len() / (width * 3) * xs.len() * 3];
    out.par_chunks_mut(xs.len() * 3).zip(src.par_chunks(width * 3)).for_each(|(line_out, line_in)| {
        for (o, px) in xs.clone().zip(line_out.chunks_exact_mut(3)) {
            let (first, k) = taps.of(o);
            let mut acc = [HALF; 3];
            for (&w, p) in k.iter().zip(line_in[(first - x0) * 3..].chunks_exact(3)) {
                for c in 0..3 {
                    acc[c] += i64::from(p[c]) * i64::from(w);
                }
            }
            for c in 0..3 {
                px[c] = clip8(acc[c]);
            }
        }
    });
    out
}

/// Resample the columns `cols` of `src` (RGB, `width` pixels a row, whose first row is input row `y0`) to the
/// output rows `ys`.
fn vertical_pass(src: &[u8], width: usize, y0: usize, taps: &Taps, ys: &Range<usize>, cols: Range<usize>) -> Vec<u8> {
    let row_len = cols.len() * 3;
    let mut out = vec![0u8; ys.len() * row_len];
    out.par_chunks_mut(row_len).zip(ys.clone().into_par_iter()).for_each(|(line_out, o)| {
        let (first, k) = taps.of(o);
        // Accumulate whole input rows, one tap at a time, so that memory is read in order.
        let mut acc = vec![HALF; row_len];
        for (i, &w) in k.iter().enumerate() {
            let row = (first + i - y0) * width * 3;
            for (a, &p) in acc.iter_mut().zip(&src[row + cols.start * 3..row + cols.end * 3]) {
                *a += i64::from(p) * i64::from(w);
            }
        }
        for (px, a) in line_out.iter_mut().zip(acc) {
            *px = clip8(a);
        }
    });
    out
}
