//! DICOM images (radiographs, CT and MR slices) through dicom-rs (`dicom-object` + `dicom-pixeldata`, pure
//! Rust codecs: native, RLE, JPEG, deflate): the first frame, as pydicom displays it.
//!
//! Greyscale (MONOCHROME1/2): the modality LUT first (`RescaleSlope`/`RescaleIntercept`: stored values to
//! Hounsfield units, say), then a linear window mapped to [0, 1] — the one given (`--window CENTER,WIDTH`),
//! else the file's first VOI window, else the full range of the stored values after rescaling — with the
//! DICOM standard's linear function (PS3.3 C.11.2.1.2.1, pydicom's `apply_windowing`): below
//! `c - 0.5 - (w - 1)/2` is 0, above `c - 0.5 + (w - 1)/2` is 1, between `((x - (c - 0.5)) / (w - 1) + 0.5)`.
//! MONOCHROME1 (bright is low) is inverted so that bright is high for every file. Colour (3 samples) is
//! converted to 8-bit RGB by dicom-pixeldata. Claimed sizes are checked before any pixel is decoded.

use std::io::Cursor;
use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use dicom_object::file::ReadPreamble;
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PhotometricInterpretation, PixelDecoder, VoiLutOption};

use super::{Image, MAX_PIXELS, Samples};
use crate::error::{Error, Result};

/// Whether `bytes` are a DICOM Part 10 file: a 128-byte preamble, then "DICM".
pub fn is_dicom(bytes: &[u8]) -> bool {
    bytes.get(128..132) == Some(b"DICM")
}

/// The first frame of a DICOM file, windowed by `window` = (center, width) when given.
pub fn decode(bytes: &[u8], path: &Path, window: Option<(f32, f32)>) -> Result<Image> {
    crate::error::catch_parser_panic(|| decode_inner(bytes, path, window))
        .ok_or_else(|| Error::file(path, "corrupt DICOM file (the decoder gave up on it)"))?
}

fn decode_inner(bytes: &[u8], path: &Path, window: Option<(f32, f32)>) -> Result<Image> {
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::file(path, format!("{what}: {e}"));
    check_lengths(bytes).map_err(|e| Error::file(path, format!("corrupt DICOM file: {e}")))?;
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(Cursor::new(bytes))
        .map_err(|e| fail("not a readable DICOM file", &e))?;
    let int = |tag, name: &str| -> Result<u64> {
        let e = obj.element(tag).map_err(|_| Error::file(path, format!("DICOM file has no {name}")))?;
        e.to_int::<u64>().map_err(|e| fail(&format!("bad {name}"), &e))
    };
    let (rows, cols, samples) =
        (int(tags::ROWS, "Rows")?, int(tags::COLUMNS, "Columns")?, int(tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?);
    let frames = obj.element(tags::NUMBER_OF_FRAMES).ok().and_then(|e| e.to_int::<u64>().ok()).unwrap_or(1).max(1);
    if rows == 0 || cols == 0 {
        return Err(Error::file(path, format!("image has zero size ({cols}x{rows})")));
    }
    // The decoder fills every frame at once: all of them must fit the bound one image has.
    let pixels = rows.saturating_mul(cols);
    if pixels > MAX_PIXELS || pixels.saturating_mul(frames.saturating_mul(samples.max(1))) > MAX_PIXELS {
        return Err(Error::file(
            path,
            format!(
                "DICOM image is {cols}x{rows}x{samples} in {frames} frames: more than we decode ({MAX_PIXELS} pixels)"
            ),
        ));
    }
    if samples != 1 && samples != 3 {
        return Err(Error::file(
            path,
            format!("DICOM image has {samples} samples per pixel: 1 (grey) or 3 (colour) are read"),
        ));
    }
    let px = obj.decode_pixel_data_frame(0).map_err(|e| fail("cannot decode DICOM pixel data", &e))?;
    let (w, h) = (px.columns(), px.rows());
    let plane = w as usize * h as usize;
    if samples == 3 {
        let rgb: Vec<u8> = px.to_vec().map_err(|e| fail("cannot convert DICOM colour pixels", &e))?;
        let rgb = image::RgbImage::from_raw(w, h, rgb)
            .ok_or_else(|| Error::file(path, "DICOM colour pixel data is shorter than its rows and columns"))?;
        return Ok(Image::from_rgb(&rgb));
    }
    // Stored values through the modality LUT, no VOI: then our window.
    let options =
        ConvertOptions::new().with_modality_lut(ModalityLutOption::Default).with_voi_lut(VoiLutOption::Identity);
    let values: Vec<f32> = px.to_vec_with_options(&options).map_err(|e| fail("cannot convert DICOM pixels", &e))?;
    let rescale = px.rescale().ok().and_then(|r| r.first().copied());
    let (slope, intercept) = rescale.map_or((1.0, 0.0), |r| (r.slope, r.intercept));
    let (center, width) = match window {
        Some((c, w)) => (f64::from(c), f64::from(w)),
        None => match px.window().ok().flatten().and_then(|w| w.first().copied()).filter(|w| w.width >= 1.0) {
            Some(w) => (w.center, w.width),
            None => {
                // The full range the stored values can take, rescaled.
                let bits = i32::from(px.bits_stored().clamp(1, 32));
                let signed = px.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed;
                let (lo, hi) = if signed {
                    (-(2f64.powi(bits - 1)), 2f64.powi(bits - 1) - 1.0)
                } else {
                    (0.0, 2f64.powi(bits) - 1.0)
                };
                let (a, b) = (lo * slope + intercept, hi * slope + intercept);
                let (lo, hi) = (a.min(b), a.max(b));
                // A window whose linear ramp spans exactly [lo, hi]: width - 1 = hi - lo, center - 0.5 = the middle.
                ((lo + hi) / 2.0 + 0.5, (hi - lo) + 1.0)
            }
        },
    };
    if !(center.is_finite() && width.is_finite() && width >= 1.0) {
        return Err(Error::file(
            path,
            format!("DICOM window center {center} width {width}: the width must be at least 1"),
        ));
    }
    let invert = matches!(px.photometric_interpretation(), PhotometricInterpretation::Monochrome1);
    let data: Vec<f32> = values
        .iter()
        .take(plane)
        .map(|&x| {
            let y = ((f64::from(x) - (center - 0.5)) / (width - 1.0).max(f64::MIN_POSITIVE) + 0.5).clamp(0.0, 1.0);
            (if invert { 1.0 - y } else { y }) as f32
        })
        .collect();
    Image::new(w, h, 1, Samples::F32(data)).map_err(|e| e.in_file(path))
}

/// Transfer syntaxes whose data set is implicit VR little endian, and those whose data set `check_lengths`
/// cannot walk (big endian, deflated): their lengths are left to the parser.
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const UNWALKED: [&str; 2] = ["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"];
/// Sequences nested deeper than this are refused (each level is one recursion here).
const MAX_DEPTH: u32 = 64;

/// Refuse an element whose length claims more bytes than the file has left, before the parser sees it:
/// dicom-parser reserves and zero-fills a value's claimed length (up to 4 GiB) before reading it, so a
/// 200-byte file could make it touch 4 GiB (measured: 238 s of system time over 1,000 mutated inputs).
fn check_lengths(bytes: &[u8]) -> std::result::Result<(), String> {
    let mut pos = 132;
    let mut syntax = String::new();
    // The file meta group: always explicit VR little endian.
    while bytes.get(pos..pos + 2).is_some_and(|g| g == [2, 0]) {
        let (start, len, next) = element(bytes, pos, bytes.len(), true)?;
        if bytes.get(pos + 2..pos + 4) == Some(&[0x10, 0x00]) {
            syntax = String::from_utf8_lossy(bytes.get(start..start + len).unwrap_or_default())
                .trim_end_matches(['\0', ' '])
                .to_string();
        }
        pos = next;
    }
    if UNWALKED.contains(&syntax.as_str()) {
        return Ok(());
    }
    walk(bytes, pos, bytes.len(), syntax != IMPLICIT_LE, 0).map(|_| ())
}

/// Walk the elements in `pos..end`; returns where the walk stopped (after a delimiter, or at `end`).
fn walk(bytes: &[u8], mut pos: usize, end: usize, explicit: bool, depth: u32) -> std::result::Result<usize, String> {
    if depth > MAX_DEPTH {
        return Err(format!("sequences nested more than {MAX_DEPTH} deep"));
    }
    while pos < end {
        let group = u16_at(bytes, pos)?;
        let elem = u16_at(bytes, pos + 2)?;
        if group == 0xFFFE {
            // Items and delimiters: a tag and a 4-byte length, whatever the VR encoding.
            let len = u32_at(bytes, pos + 4)?;
            pos += 8;
            match elem {
                0xE00D | 0xE0DD => return Ok(pos),
                _ if len == u32::MAX => pos = walk(bytes, pos, end, explicit, depth + 1)?,
                _ => {
                    let len = fits(len, pos, end, group, elem)?;
                    // Encapsulated pixel data fragments are items of raw bytes, not elements: not walked.
                    pos += len;
                }
            }
            continue;
        }
        let (start, len, next) = element(bytes, pos, end, explicit)?;
        let vr = if explicit { bytes.get(pos + 4..pos + 6).unwrap_or_default() } else { b"" };
        pos = if len == usize::MAX {
            walk(bytes, start, end, explicit, depth + 1)?
        } else {
            if vr == b"SQ" {
                walk(bytes, start, start + len, explicit, depth + 1)?;
            }
            next
        };
    }
    Ok(pos)
}

/// (value start, value length or usize::MAX for undefined, next element) of the element at `pos`.
fn element(bytes: &[u8], pos: usize, end: usize, explicit: bool) -> std::result::Result<(usize, usize, usize), String> {
    let (group, elem) = (u16_at(bytes, pos)?, u16_at(bytes, pos + 2)?);
    let (len, header) = if explicit {
        let vr = bytes.get(pos + 4..pos + 6).ok_or("the file ends inside an element header")?;
        const LONG: [&[u8; 2]; 13] =
            [b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"];
        if LONG.iter().any(|l| l[..] == *vr) {
            (u32_at(bytes, pos + 8)?, 12)
        } else {
            (u32::from(u16_at(bytes, pos + 6)?), 8)
        }
    } else {
        (u32_at(bytes, pos + 4)?, 8)
    };
    let start = pos + header;
    if len == u32::MAX {
        return Ok((start, usize::MAX, start));
    }
    let len = fits(len, start, end, group, elem)?;
    Ok((start, len, start + len))
}

fn fits(len: u32, at: usize, end: usize, group: u16, elem: u16) -> std::result::Result<usize, String> {
    let left = end.saturating_sub(at);
    let len = len as usize;
    if len > left {
        return Err(format!("element ({group:04X},{elem:04X}) claims {len} bytes, {left} are left"));
    }
    Ok(len)
}

fn u16_at(bytes: &[u8], at: usize) -> std::result::Result<u16, String> {
    let b = bytes.get(at..at + 2).ok_or("the file ends inside an element header")?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(bytes: &[u8], at: usize) -> std::result::Result<u32, String> {
    let b = bytes.get(at..at + 4).ok_or("the file ends inside an element header")?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}
