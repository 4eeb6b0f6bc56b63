//! Image files to pixels and pixels to tensors, bit-compatible with PIL: what the training data and inference
//! share (`data` reads folders through it, `infer::preprocess` is this module), so neither imports the other.
//!
//! torchvision's ImageNet eval preprocessing:
//! `ResNet*_Weights.IMAGENET1K_V1.transforms()` opens the file with PIL, converts it to RGB, resizes the shorter
//! side to 256 with PIL's antialiased BILINEAR filter, centre-crops 224, scales to [0, 1] and normalises. The
//! resize below is a transcription of Pillow 13's `src/libImaging/Resample.c` (8-bit path): fixed-point
//! coefficients, a uint8 rounding after each of the two separable passes and the same pass order, so that it
//! produces the same bytes as `Image.resize(size, Image.BILINEAR)`.

pub mod dicom;
mod planar;
mod resample;
pub mod tiff;

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

pub use self::planar::{Image, Sample, Samples};
use self::resample::resample_window;
use crate::engine::Tensor;
use crate::error::{Error, Result};

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Largest image we agree to decode (16384 x 16384); checked on the header, before any pixel buffer exists.
pub const MAX_PIXELS: u64 = 1 << 28;

/// Most bands an image may have: `model::MAX_IN_CHANNELS`, the widest stem (a test holds them equal).
pub const MAX_BANDS: usize = 1024;

/// The file extensions read as images (the content decides the format; these pick files out of folders).
pub const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "tif", "tiff", "dcm"];

/// How integer and DICOM pixels become [0, 1]: the model card's `pixel_scale` and `window`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Decode {
    /// Integer samples over this instead of their type's maximum (floats over it too).
    pub pixel_scale: Option<f32>,
    /// A DICOM window (center, width) instead of the file's first.
    pub window: Option<(f32, f32)>,
}

/// Decode a JPEG/PNG file into 8-bit RGB (greyscale, palette, 16-bit and alpha images converted the way PIL's
/// convert("RGB") does).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    Ok(to_rgb_like_pil(decode(path)?))
}

/// Decode a JPEG/PNG file with its own bands: 1 for greyscale (with or without alpha), 3 for colour
/// (RGB, RGBA, palettes); alpha is dropped, as PIL's `convert` drops it. 8-bit images stay 8-bit (exactly
/// `load_rgb`'s pixels); 16-bit ones become f32 scaled by 65535, their type's maximum (torchvision's
/// `ToDtype(float32, scale=True)` on `decode_png`'s uint16; PIL's `convert("RGB")` would instead clip 16-bit
/// grey at 255, whitening most radiographs).
pub fn load_image(path: &Path) -> Result<Image> {
    load_image_with(path, &Decode::default())
}

/// `load_image`, with integer samples divided by `pixel_scale` instead of their type's maximum when it is
/// given (Sentinel-2 reflectance: 10000), floats divided by it too. TIFF files are read by `tiff::decode`,
/// DICOM files (windowed to [0, 1]) by `dicom::decode`, both told apart by content.
pub fn load_image_with(path: &Path, how: &Decode) -> Result<Image> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read image: {e}")))?;
    decode_image(&bytes, path, how)
}

/// `load_image_with` for a file already in memory (an HTTP request's body): `name` stands for it in errors, and
/// its extension, if any, is only a fallback for the content.
pub fn decode_image(bytes: &[u8], name: &Path, how: &Decode) -> Result<Image> {
    if tiff::is_tiff(bytes) {
        return tiff::decode(bytes, name, how.pixel_scale);
    }
    if dicom::is_dicom(bytes) {
        return dicom::decode(bytes, name, how.window);
    }
    let image = own_bands(decode_bytes(name, bytes)?, name)?;
    Ok(rescale(image, how.pixel_scale))
}

/// 8-bit samples over `pixel_scale` instead of 255 (16-bit PNGs were already scaled by 65535: by the ratio).
fn rescale(img: Image, pixel_scale: Option<f32>) -> Image {
    let Some(scale) = pixel_scale else { return img };
    let (w, h, bands) = (img.width(), img.height(), img.bands());
    let samples = match img.samples() {
        Samples::U8(v) => Samples::F32(v.iter().map(|&x| f32::from(x) / scale).collect()),
        Samples::F32(v) => Samples::F32(v.iter().map(|&x| x * 65535.0 / scale).collect()),
    };
    Image::new(w, h, bands, samples).unwrap_or(img)
}

/// A decoded JPEG/PNG as an `Image` of its own bands.
fn own_bands(image: DynamicImage, path: &Path) -> Result<Image> {
    let (w, h) = (image.width(), image.height());
    let planar16 = |bands: usize, channels: usize, raw: &[u16]| {
        let plane = w as usize * h as usize;
        let mut data = vec![0f32; plane * bands];
        for (i, px) in raw.chunks_exact(channels).enumerate() {
            for (b, &v) in px.iter().take(bands).enumerate() {
                data[b * plane + i] = f32::from(v) / 65535.0;
            }
        }
        Image::new(w, h, bands, Samples::F32(data))
    };
    let grey = matches!(image.color(), image::ColorType::L8 | image::ColorType::La8);
    match &image {
        DynamicImage::ImageLuma16(g) => planar16(1, 1, g.as_raw()),
        DynamicImage::ImageLumaA16(g) => planar16(1, 2, g.as_raw()),
        DynamicImage::ImageRgb16(c) => planar16(3, 3, c.as_raw()),
        DynamicImage::ImageRgba16(c) => planar16(3, 4, c.as_raw()),
        _ if grey => {
            let luma = image.to_luma8();
            Image::new(w, h, 1, Samples::U8(luma.into_raw()))
        }
        _ => Ok(Image::from_rgb(&to_rgb_like_pil(image))),
    }
    .map_err(|e| e.in_file(path))
}

/// The decoded JPEG/PNG, its header checked for size first.
fn decode(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read image: {e}")))?;
    decode_bytes(path, &bytes)
}

fn decode_bytes(path: &Path, bytes: &[u8]) -> Result<DynamicImage> {
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::file(path, format!("{what}: {e}"));
    let mut reader = ImageReader::new(Cursor::new(bytes));
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
    if format == Some(ImageFormat::Jpeg) && !jpeg_reaches_end(bytes) {
        return Err(Error::file(path, "JPEG file is truncated (no end-of-image marker after the image data)"));
    }
    crate::error::catch_parser_panic(|| DynamicImage::from_decoder(decoder))
        .ok_or_else(|| Error::file(path, "corrupt image (the decoder gave up on it)"))?
        .map_err(|e| fail("cannot decode image", &e))
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
    let mut file = std::fs::File::open(path).map_err(|e| fail("cannot read image", &e))?;
    let mut magic = [0u8; 4];
    if std::io::Read::read(&mut file, &mut magic).is_ok_and(|n| n == 4) && tiff::is_tiff(&magic) {
        let bytes = std::fs::read(path).map_err(|e| fail("cannot read image", &e))?;
        return tiff::header(&bytes, path);
    }
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
    let out = Image::from_rgb(img).resize(width, height);
    out.to_rgb().unwrap_or_else(|| RgbImage::new(width, height))
}

/// torchvision eval transform: Resize(resize) on the shorter side, CenterCrop(crop), to [0,1], normalise with
/// ImageNet's mean/std. Returns [3, crop, crop].
pub fn eval_transform(img: &RgbImage, resize: u32, crop: u32) -> Tensor {
    Image::from_rgb(img).resize_center_crop(resize, crop).to_tensor(&IMAGENET_MEAN, &IMAGENET_STD)
}

/// torchvision's `ToTensor` + `Normalize` of an 8-bit RGB image: `(v / 255 - mean[c]) / std[c]` in f32, as
/// `[3, H, W]`.
pub fn to_tensor(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Tensor {
    Image::from_rgb(img).to_tensor(&mean, &std)
}

/// load_rgb + eval_transform.
pub fn preprocess_file(path: &Path, resize: u32, crop: u32) -> Result<Tensor> {
    Ok(eval_transform(&load_rgb(path)?, resize, crop))
}

impl Image {
    /// Pillow's antialiased bilinear resize of every band to `width` x `height`.
    pub fn resize(&self, width: u32, height: u32) -> Image {
        let (input, out) = ((self.width() as usize, self.height() as usize), (width as usize, height as usize));
        let (xs, ys) = (0..out.0, 0..out.1);
        self.map_planes(
            (width, height),
            |p| resample_window(p, input, out, xs.clone(), ys.clone()),
            |p| resample_window(p, input, out, xs.clone(), ys.clone()),
        )
    }

    /// torchvision's `Resize(resize)` + `CenterCrop(crop)`.
    ///
    /// Only the cropped window of the resized image is computed: every output pixel of Pillow's resize depends
    /// on its own filter taps alone, so this gives the same values while keeping memory bounded by the crop even
    /// for extreme aspect ratios. Where the resized image is smaller than the crop, torchvision pads with black,
    /// and so do we; an empty image is all padding. An image already of the resized size is not resampled
    /// (Pillow's `resize` returns a copy then), so a crop of the image's own size is the image itself.
    pub fn resize_center_crop(&self, resize: u32, crop: u32) -> Image {
        let (in_w, in_h) = (self.width() as usize, self.height() as usize);
        let (out_w, out_h) = resized_size(in_w, in_h, resize as usize);
        let (x_off, y_off) = (crop_offset(out_w, crop as usize), crop_offset(out_h, crop as usize));
        if (out_w, out_h) == (in_w, in_h) {
            return self.crop_padded(x_off, y_off, crop, crop);
        }
        // The part of the crop that lies inside the resized image, in resized-image coordinates.
        let visible = |off: i64, n: usize| off.max(0) as usize..((off + i64::from(crop)).max(0) as usize).min(n);
        let (xs, ys) = (visible(x_off, out_w), visible(y_off, out_h));
        let window = self.map_planes(
            (xs.len() as u32, ys.len() as u32),
            |p| resample_window(p, (in_w, in_h), (out_w, out_h), xs.clone(), ys.clone()),
            |p| resample_window(p, (in_w, in_h), (out_w, out_h), xs.clone(), ys.clone()),
        );
        // The window starts at (xs.start, ys.start) of the resized image, the crop at (x_off, y_off).
        window.crop_padded(x_off - xs.start as i64, y_off - ys.start as i64, crop, crop)
    }
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
