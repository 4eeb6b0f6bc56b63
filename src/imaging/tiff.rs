//! TIFF images (GeoTIFF tiles, microscopy, scanned film) through the `tiff` crate: one or many bands of 8 to
//! 64-bit integers or 16/32/64-bit floats, in strips or tiles, uncompressed, LZW or Deflate. Alpha (grey+alpha,
//! RGBA) is dropped; palette, CMYK and YCbCr images and separate-plane files (PlanarConfiguration 2, which the
//! crate reads only the first plane of) are refused in one line.
//!
//! Scaling to the network's [0, 1]: an integer sample is divided by its type's maximum (2^bits - 1 for
//! unsigned, 2^(bits-1) - 1 for signed) unless `pixel_scale` is given (Sentinel-2 reflectance: 10000); floats
//! are kept as they are (divided by `pixel_scale` when given). 8-bit samples without a scale stay 8-bit.

use std::io::Cursor;
use std::path::Path;

use tiff::ColorType;
use tiff::decoder::{Decoder, DecodingResult, Limits};
use tiff::tags::{PlanarConfiguration, Tag};

use super::{Image, MAX_BANDS, MAX_PIXELS, Samples};
use crate::error::{Error, Result};

/// Whether `bytes` start like a TIFF file (little- or big-endian, classic or BigTIFF).
pub fn is_tiff(bytes: &[u8]) -> bool {
    matches!(bytes.get(..4), Some([b'I', b'I', 42 | 43, 0] | [b'M', b'M', 0, 42 | 43]))
}

/// (width, height) from the first image's header, refusing what `decode` would refuse for its size.
pub fn header(bytes: &[u8], path: &Path) -> Result<(u32, u32)> {
    let mut decoder = open(bytes, path)?;
    size(&mut decoder, path)
}

/// The first image of a TIFF file.
pub fn decode(bytes: &[u8], path: &Path, pixel_scale: Option<f32>) -> Result<Image> {
    crate::error::catch_parser_panic(|| decode_inner(bytes, path, pixel_scale))
        .ok_or_else(|| Error::file(path, "corrupt TIFF (the decoder gave up on it)"))?
}

fn open<'a>(bytes: &'a [u8], path: &Path) -> Result<Decoder<Cursor<&'a [u8]>>> {
    let mut limits = Limits::default();
    // A whole image may take 1 GiB (the same bound as other formats); a header value 1 MiB.
    limits.decoding_buffer_size = 1 << 30;
    let decoder = crate::error::catch_parser_panic(|| Decoder::new(Cursor::new(bytes)))
        .ok_or_else(|| Error::file(path, "corrupt TIFF (the decoder gave up on it)"))?
        .map_err(|e| Error::file(path, format!("not a readable TIFF: {e}")))?;
    Ok(decoder.with_limits(limits))
}

fn size(decoder: &mut Decoder<Cursor<&[u8]>>, path: &Path) -> Result<(u32, u32)> {
    let (w, h) = decoder.dimensions().map_err(|e| Error::file(path, format!("bad TIFF header: {e}")))?;
    if w == 0 || h == 0 {
        return Err(Error::file(path, format!("image has zero size ({w}x{h})")));
    }
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(Error::file(path, format!("image is {w}x{h}, more than the {MAX_PIXELS} pixels we accept")));
    }
    Ok((w, h))
}

fn decode_inner(bytes: &[u8], path: &Path, pixel_scale: Option<f32>) -> Result<Image> {
    let mut decoder = open(bytes, path)?;
    let (w, h) = size(&mut decoder, path)?;
    let colour = decoder.colortype().map_err(|e| Error::file(path, format!("unsupported TIFF: {e}")))?;
    // (samples stored per pixel, bands kept, bits per sample)
    let (stored, kept, bits) = match colour {
        ColorType::Gray(b) => (1, 1, b),
        ColorType::GrayA(b) => (2, 1, b),
        ColorType::RGB(b) => (3, 3, b),
        ColorType::RGBA(b) => (4, 3, b),
        ColorType::Multiband { bit_depth, num_samples } => {
            (usize::from(num_samples), usize::from(num_samples), bit_depth)
        }
        other => {
            return Err(Error::file(path, format!("{other:?} TIFF: only grey, RGB and multi-band images are read")));
        }
    };
    if kept == 0 || kept > MAX_BANDS {
        return Err(Error::file(path, format!("TIFF with {kept} bands: at most {MAX_BANDS} are read")));
    }
    let planar = decoder.get_tag_unsigned::<u16>(Tag::PlanarConfiguration).ok();
    if planar == Some(PlanarConfiguration::Planar.to_u16()) && stored > 1 {
        return Err(Error::file(
            path,
            "TIFF stores its bands in separate planes (PlanarConfiguration 2), which is not read: convert it with `gdal_translate -co INTERLEAVE=PIXEL` or `tiffcp -p contig`",
        ));
    }
    let data = decoder.read_image().map_err(|e| Error::file(path, format!("cannot decode TIFF: {e}")))?;
    let plane = w as usize * h as usize;
    let unsigned_max = |bits: u8| if bits >= 64 { u64::MAX as f64 } else { ((1u128 << bits) - 1) as f64 };
    let signed_max = |bits: u8| ((1u128 << bits.clamp(2, 64).saturating_sub(1)) - 1) as f64;
    let scale = |type_max: f64| pixel_scale.map_or(type_max, f64::from);
    let samples = match data {
        DecodingResult::U8(v) if pixel_scale.is_none() && bits == 8 => Samples::U8(planar_of(&v, stored, kept, plane)),
        DecodingResult::U8(v) => to_f32(&v, stored, kept, plane, scale(unsigned_max(bits)), f64::from),
        DecodingResult::U16(v) => to_f32(&v, stored, kept, plane, scale(unsigned_max(bits)), f64::from),
        DecodingResult::U32(v) => to_f32(&v, stored, kept, plane, scale(unsigned_max(bits)), f64::from),
        DecodingResult::U64(v) => to_f32(&v, stored, kept, plane, scale(unsigned_max(bits)), |x| x as f64),
        DecodingResult::I8(v) => to_f32(&v, stored, kept, plane, scale(signed_max(bits)), f64::from),
        DecodingResult::I16(v) => to_f32(&v, stored, kept, plane, scale(signed_max(bits)), f64::from),
        DecodingResult::I32(v) => to_f32(&v, stored, kept, plane, scale(signed_max(bits)), f64::from),
        DecodingResult::I64(v) => to_f32(&v, stored, kept, plane, scale(signed_max(bits)), |x| x as f64),
        DecodingResult::F16(v) => to_f32(&v, stored, kept, plane, scale(1.0), |x| f64::from(x.to_f32())),
        DecodingResult::F32(v) => to_f32(&v, stored, kept, plane, scale(1.0), f64::from),
        DecodingResult::F64(v) => to_f32(&v, stored, kept, plane, scale(1.0), |x| x),
    };
    Image::new(w, h, kept, samples).map_err(|e| e.in_file(path))
}

/// The first `kept` of `stored` interleaved samples per pixel, planar.
fn planar_of<T: Copy + Default>(v: &[T], stored: usize, kept: usize, plane: usize) -> Vec<T> {
    let mut out = vec![T::default(); plane * kept];
    for (i, px) in v.chunks_exact(stored).take(plane).enumerate() {
        for (b, &s) in px.iter().take(kept).enumerate() {
            out[b * plane + i] = s;
        }
    }
    out
}

fn to_f32<T: Copy>(v: &[T], stored: usize, kept: usize, plane: usize, scale: f64, f: impl Fn(T) -> f64) -> Samples {
    let mut out = vec![0f32; plane * kept];
    for (i, px) in v.chunks_exact(stored).take(plane).enumerate() {
        for (b, &s) in px.iter().take(kept).enumerate() {
            out[b * plane + i] = (f(s) / scale) as f32;
        }
    }
    Samples::F32(out)
}
