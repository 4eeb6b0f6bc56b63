//! Images that are not 8-bit RGB: f32 bands resized as Pillow's mode "F" does, 16-bit PNGs scaled by their
//! type's maximum (torchvision's `decode_png` + `ToDtype(float32, scale=True)`), grey+alpha to grey, and the
//! band count fitted to the network (grey replicated for RGB, anything else refused naming both counts).
//! Reference values: `python/fixtures/bands.py` (PIL 13, torchvision 0.29).

mod common;

use common::{Fixture, rel_err};
use resnet_rs::data::transforms::{Op, Pipeline};
use resnet_rs::imaging::{Decode, load_image, load_image_with};
use resnet_rs::{Image, Samples, Tensor};

fn floats(img: &Image) -> Vec<f32> {
    match img.samples() {
        Samples::F32(v) => v.clone(),
        Samples::U8(v) => v.iter().map(|&b| f32::from(b)).collect(),
    }
}

fn f32_image(t: &Tensor) -> Image {
    let [h, w] = [t.shape()[0], t.shape()[1]];
    Image::new(w as u32, h as u32, 1, Samples::F32(t.data().to_vec())).unwrap()
}

#[track_caller]
fn assert_rel(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

#[test]
fn f32_bands_resize_as_pillow_mode_f() {
    let f = Fixture::load("bands.safetensors");
    let input = f32_image(f.get("f.input"));
    let mut checked = 0;
    for (name, want) in &f.tensors {
        let Some(size) = name.strip_prefix("f.resize_") else { continue };
        let (w, h) = size.split_once('x').unwrap();
        let got = input.resize(w.parse().unwrap(), h.parse().unwrap());
        assert_eq!((got.height() as usize, got.width() as usize), (want.shape()[0], want.shape()[1]));
        // Pillow accumulates in double and stores f32 after each pass, as we do: only the last bits differ.
        assert_rel(name, &floats(&got), want.data(), 1e-6);
        checked += 1;
    }
    for (name, want) in &f.tensors {
        let Some(rc) = name.strip_prefix("f.eval_") else { continue };
        let (r, c) = rc.split_once('_').unwrap();
        let pipe = Pipeline {
            ops: vec![Op::Resize { shorter: r.parse().unwrap() }, Op::CenterCrop { size: c.parse().unwrap() }],
            ..Pipeline::normalize(&[0.0], &[1.0])
        };
        let got = pipe.evaluate(&input);
        assert_rel(name, got.data(), want.data(), 1e-6);
        checked += 1;
    }
    assert!(checked >= 9, "only {checked} references in the fixture");
}

#[test]
fn sixteen_bit_and_grey_alpha_pngs_keep_their_bands_and_range() {
    let f = Fixture::load("bands.safetensors");
    let dir = tempfile::tempdir().unwrap();
    for (stem, bands) in [("png16.grey", 1), ("png16.rgb", 3), ("png8.la", 1)] {
        let path = dir.path().join(format!("{stem}.png"));
        let bytes: Vec<u8> = f.get(&format!("{stem}.png")).data().iter().map(|&v| v as u8).collect();
        std::fs::write(&path, bytes).unwrap();
        let img = load_image(&path).unwrap();
        assert_eq!(img.bands(), bands, "{stem}");
        let want = f.get(&format!("{stem}.values"));
        match img.samples() {
            Samples::F32(v) => assert_rel(stem, v, want.data(), 1e-7),
            Samples::U8(v) => {
                let got: Vec<f32> = v.iter().map(|&b| f32::from(b)).collect();
                assert_eq!(got, want.data(), "{stem}: PIL's convert(\"L\")");
            }
        }
    }
    // The full 16-bit range maps to [0, 1]: black 0 and white 65535 are the fixture's first two pixels.
    let grey = load_image(&dir.path().join("png16.grey.png")).unwrap();
    assert_eq!(&floats(&grey)[..2], &[0.0, 1.0]);
}

#[test]
fn band_counts_are_fitted_to_the_network_or_refused() {
    let grey = Image::new(2, 1, 1, Samples::U8(vec![10, 200])).unwrap();
    let rgb = grey.clone().with_bands(3).unwrap();
    assert_eq!(rgb.to_rgb().unwrap().into_raw(), vec![10, 10, 10, 200, 200, 200], "PIL's convert(\"RGB\")");
    let thirteen = Image::new(1, 1, 13, Samples::F32(vec![0.5; 13])).unwrap();
    assert_eq!(thirteen.clone().with_bands(13).unwrap(), thirteen);
    let err = thirteen.with_bands(3).unwrap_err().to_string();
    assert!(err.contains("13 bands") && err.contains("takes 3 channels"), "{err}");
    let err = Image::from_rgb(&rgb.to_rgb().unwrap()).with_bands(1).unwrap_err().to_string();
    assert!(err.contains("3 bands") && err.contains("takes 1 channel"), "{err}");
    // A 13-band image through a pipeline: mean/std per band, or one value for all.
    let bands: Vec<f32> = (0..13).map(|b| b as f32 / 10.0).collect();
    let img = Image::new(1, 1, 13, Samples::F32(bands.clone())).unwrap();
    let per_band = Pipeline::normalize(&bands, &[2.0; 13]).evaluate(&img);
    assert_eq!(per_band.shape(), &[13, 1, 1]);
    assert!(per_band.data().iter().all(|&v| v == 0.0));
    let one = Pipeline::normalize(&[0.5], &[0.25]).evaluate(&img);
    assert_eq!(one.data()[10], (1.0 - 0.5) / 0.25);
}

#[test]
fn tiffs_decode_as_tifffile_reads_them() {
    let dir = common::fixture("tiff");
    let f = Fixture::load("tiff/expected.safetensors");
    let cases = [
        ("s2_13band_u16_tiled_deflate", 13),
        ("grey_u16_lzw_strips", 1),
        ("grey_i16", 1),
        ("float32_2band", 2),
        ("rgb_u8_deflate", 3),
    ];
    for (name, bands) in cases {
        let img = load_image(&dir.join(format!("{name}.tif"))).unwrap_or_else(|e| panic!("{e}"));
        let want = f.get(name);
        assert_eq!(img.bands(), bands, "{name}");
        assert_eq!([img.bands(), img.height() as usize, img.width() as usize], want.shape(), "{name}");
        let got = match img.samples() {
            Samples::U8(v) => v.iter().map(|&b| f32::from(b) / 255.0).collect(),
            Samples::F32(v) => v.clone(),
        };
        assert_rel(name, &got, want.data(), 1e-7);
    }
    // Sentinel-2 reflectance: pixel_scale 10000 instead of 65535.
    let how = Decode { pixel_scale: Some(10000.0), window: None };
    let scaled = load_image_with(&dir.join("s2_13band_u16_tiled_deflate.tif"), &how).unwrap();
    assert_rel("reflectance", &floats(&scaled), f.get("s2_13band_u16.reflectance").data(), 1e-7);
    // Bands in separate planes: refused in one line with the way out, not read as one band.
    let err = load_image(&dir.join("s2_13band_planar.tif")).unwrap_err().to_string();
    assert!(err.contains("s2_13band_planar.tif") && err.contains("PlanarConfiguration 2"), "{err}");
    assert!(!err.contains('\n'));
    // The folder scan reads TIFF headers too.
    assert_eq!(resnet_rs::imaging::image_header(&dir.join("grey_i16.tif")).unwrap(), (9, 5));
}

#[test]
fn hostile_tiffs_fail_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(common::fixture("tiff/s2_13band_u16_tiled_deflate.tif")).unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("magic only", b"II*\0".to_vec()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("header only", good[..16].to_vec()),
    ];
    // A width of 2^31 pixels in the first IFD: refused on the header, before any allocation.
    let mut huge = good.clone();
    let ifd = u32::from_le_bytes(huge[4..8].try_into().unwrap()) as usize;
    let entries = u16::from_le_bytes(huge[ifd..ifd + 2].try_into().unwrap()) as usize;
    for e in 0..entries {
        let at = ifd + 2 + 12 * e;
        if u16::from_le_bytes(huge[at..at + 2].try_into().unwrap()) == 256 {
            huge[at + 2..at + 4].copy_from_slice(&4u16.to_le_bytes()); // LONG
            huge[at + 8..at + 12].copy_from_slice(&(1u32 << 31).to_le_bytes());
        }
    }
    cases.push(("huge width", huge));
    for (what, bytes) in cases {
        let path = dir.path().join("x.tif");
        std::fs::write(&path, &bytes).unwrap();
        let err = match load_image(&path) {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.starts_with(&path.display().to_string()) && !err.contains('\n'), "{what}: {err}");
    }
}

#[test]
fn dicom_files_display_as_pydicom_shows_them() {
    let dir = common::fixture("dicom");
    let f = Fixture::load("dicom/expected.safetensors");
    // (file, expected key, bands): modality LUT then the file's window, RLE the same, the full rescaled range
    // without a window, MONOCHROME1 inverted, RGB as 8-bit.
    let cases = [
        ("ct_window", "ct_window", 1),
        ("ct_window_rle", "ct_window", 1),
        ("ct_signed", "ct_signed", 1),
        ("xray_mono1", "xray_mono1", 1),
        ("rgb", "rgb", 3),
    ];
    for (file, key, bands) in cases {
        let img = load_image(&dir.join(format!("{file}.dcm"))).unwrap_or_else(|e| panic!("{e}"));
        let want = f.get(key);
        assert_eq!([img.bands(), img.height() as usize, img.width() as usize], want.shape(), "{file}");
        assert_eq!(img.bands(), bands);
        let got = match img.samples() {
            Samples::U8(v) => v.iter().map(|&b| f32::from(b) / 255.0).collect(),
            Samples::F32(v) => v.clone(),
        };
        assert_rel(file, &got, want.data(), 1e-6);
    }
    // --window CENTER,WIDTH replaces the file's.
    let how = Decode { pixel_scale: None, window: Some((300.0, 1500.0)) };
    let custom = load_image_with(&dir.join("ct_window.dcm"), &how).unwrap();
    assert_rel("custom window", &floats(&custom), f.get("ct_window.custom").data(), 1e-6);
}

#[test]
fn hostile_dicoms_fail_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(common::fixture("dicom/ct_window.dcm")).unwrap();
    let mut no_rows = good.clone();
    // Rows (0028,0010) in explicit VR little endian: its tag bytes, then "US", length 2, value.
    let rows_at = good.windows(4).position(|w| w == [0x28, 0x00, 0x10, 0x00]).unwrap();
    no_rows[rows_at + 8..rows_at + 10].copy_from_slice(&0xffffu16.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("preamble only", good[..132].to_vec()),
        ("truncated", good[..good.len() - 20].to_vec()),
        ("rows 65535 for 35 pixels", no_rows),
    ];
    for (what, bytes) in cases {
        let path = dir.path().join("x.dcm");
        std::fs::write(&path, &bytes).unwrap();
        let err = match load_image(&path) {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.starts_with(&path.display().to_string()) && !err.contains('\n'), "{what}: {err}");
    }
}
