//! An image of any number of bands, stored planar (band, row, column) like the tensor it becomes: 8-bit
//! samples (JPEG, 8-bit PNG; resampled with Pillow's fixed-point 8-bit arithmetic, bit for bit) or f32 samples
//! already scaled to [0, 1] or beyond (16-bit PNG, TIFF, DICOM; resampled in floating point as Pillow's mode
//! "F" is). Grayscale is 1 band, RGB 3, a Sentinel-2 tile 13; alpha is never kept.

use image::RgbImage;

use crate::engine::Tensor;
use crate::error::{Error, Result};

/// The samples of every band, band after band.
#[derive(Clone, Debug, PartialEq)]
pub enum Samples {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    width: u32,
    height: u32,
    bands: usize,
    samples: Samples,
}

/// What the geometric ops need of a sample type: a zero for padding.
pub trait Sample: Copy + Default + Send + Sync + 'static {}
impl Sample for u8 {}
impl Sample for f32 {}

impl Image {
    /// An image from planar samples; their count must be width × height × bands.
    pub fn new(width: u32, height: u32, bands: usize, samples: Samples) -> Result<Image> {
        let len = match &samples {
            Samples::U8(v) => v.len(),
            Samples::F32(v) => v.len(),
        };
        let want = (width as usize).checked_mul(height as usize).and_then(|p| p.checked_mul(bands));
        if bands == 0 || want != Some(len) {
            return Err(Error::invalid(format!("{len} samples do not make a {width}x{height} image of {bands} bands")));
        }
        Ok(Image { width, height, bands, samples })
    }

    /// An all-zero (black) 8-bit image.
    pub fn black(width: u32, height: u32, bands: usize) -> Image {
        let n = width as usize * height as usize * bands;
        Image { width, height, bands, samples: Samples::U8(vec![0; n]) }
    }

    /// Planar copy of an interleaved 8-bit RGB image.
    pub fn from_rgb(img: &RgbImage) -> Image {
        let (w, h) = img.dimensions();
        let plane = w as usize * h as usize;
        let mut data = vec![0u8; plane * 3];
        // Three zipped plane slices: no index arithmetic or bounds checks per sample (a 2^28-pixel image
        // took 6 s with them, measured).
        let (r, gb) = data.split_at_mut(plane);
        let (g, b) = gb.split_at_mut(plane);
        for (((px, r), g), b) in img.as_raw().chunks_exact(3).zip(r).zip(g).zip(b) {
            (*r, *g, *b) = (px[0], px[1], px[2]);
        }
        Image { width: w, height: h, bands: 3, samples: Samples::U8(data) }
    }

    /// The interleaved 8-bit RGB image, for an 8-bit image of 3 bands (`None` otherwise).
    pub fn to_rgb(&self) -> Option<RgbImage> {
        let Samples::U8(data) = &self.samples else { return None };
        if self.bands != 3 {
            return None;
        }
        let plane = self.plane_len();
        let (r, gb) = data.split_at(plane);
        let (g, b) = gb.split_at(plane);
        let mut out = vec![0u8; plane * 3];
        for (((px, &r), &g), &b) in out.chunks_exact_mut(3).zip(r).zip(g).zip(b) {
            px.copy_from_slice(&[r, g, b]);
        }
        RgbImage::from_raw(self.width, self.height, out)
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    pub fn dimensions(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    pub fn bands(&self) -> usize {
        self.bands
    }

    pub fn samples(&self) -> &Samples {
        &self.samples
    }

    fn plane_len(&self) -> usize {
        self.width as usize * self.height as usize
    }

    /// The same image with a band count the network takes: unchanged when it matches; a 1-band image
    /// replicated to 3 for an RGB network (PIL's `convert("RGB")` of a grey image); anything else refused,
    /// naming both counts.
    pub fn with_bands(self, bands: usize) -> Result<Image> {
        if self.bands == bands {
            return Ok(self);
        }
        if self.bands == 1 && bands == 3 {
            let samples = match self.samples {
                Samples::U8(v) => Samples::U8(v.repeat(3)),
                Samples::F32(v) => Samples::F32(v.repeat(3)),
            };
            return Ok(Image { bands: 3, samples, ..self });
        }
        Err(Error::invalid(format!(
            "the image has {} band{} but the network takes {bands} channel{}",
            self.bands,
            if self.bands == 1 { "" } else { "s" },
            if bands == 1 { "" } else { "s" }
        )))
    }

    /// Apply `f` to every band (a `&[S]` plane of the input size) and build an image of `(w, h)` from the
    /// planes it returns.
    pub fn map_planes(
        &self,
        (w, h): (u32, u32),
        f8: impl Fn(&[u8]) -> Vec<u8> + Sync,
        f32_: impl Fn(&[f32]) -> Vec<f32> + Sync,
    ) -> Image {
        let plane = self.plane_len();
        // Indexed rather than chunked, so that an empty image still has its (empty) planes.
        let samples = match &self.samples {
            Samples::U8(v) => Samples::U8((0..self.bands).flat_map(|b| f8(&v[b * plane..][..plane])).collect()),
            Samples::F32(v) => Samples::F32((0..self.bands).flat_map(|b| f32_(&v[b * plane..][..plane])).collect()),
        };
        let out = Image { width: w, height: h, bands: self.bands, samples };
        debug_assert!(out.consistent(), "a plane op returned the wrong number of samples");
        out
    }

    fn consistent(&self) -> bool {
        let len = match &self.samples {
            Samples::U8(v) => v.len(),
            Samples::F32(v) => v.len(),
        };
        len == self.plane_len() * self.bands
    }

    /// The `w` x `h` window whose top-left corner is at (`left`, `top`), possibly outside the image, where
    /// it is black.
    pub fn crop_padded(&self, left: i64, top: i64, w: u32, h: u32) -> Image {
        let (iw, ih) = (self.width, self.height);
        self.map_planes(
            (w, h),
            |p| crop_plane(p, (iw, ih), left, top, (w, h)),
            |p| crop_plane(p, (iw, ih), left, top, (w, h)),
        )
    }

    /// Mirrored left to right.
    pub fn flip_horizontal(&self) -> Image {
        let w = self.width as usize;
        self.map_planes(self.dimensions(), |p| flip_plane(p, w), |p| flip_plane(p, w))
    }

    /// torchvision's `ToTensor` + `Normalize`: 8-bit samples divided by 255, f32 samples as they are, then
    /// `(v - mean[c]) / std[c]` (one value applies to every band), as `[bands, H, W]`.
    pub fn to_tensor(&self, mean: &[f32], std: &[f32]) -> Tensor {
        let plane = self.plane_len();
        let pick = |v: &[f32], c: usize, default: f32| v.get(c).or(v.first()).copied().unwrap_or(default);
        let mut data = Vec::with_capacity(plane * self.bands);
        for c in 0..self.bands {
            let (m, s) = (pick(mean, c, 0.0), pick(std, c, 1.0));
            match &self.samples {
                Samples::U8(v) => data.extend(v[c * plane..][..plane].iter().map(|&x| (f32::from(x) / 255.0 - m) / s)),
                Samples::F32(v) => data.extend(v[c * plane..][..plane].iter().map(|&x| (x - m) / s)),
            }
        }
        Tensor::new(&[self.bands, self.height as usize, self.width as usize], data)
            .expect("bands x height x width samples")
    }
}

fn crop_plane<S: Sample>(p: &[S], (iw, ih): (u32, u32), left: i64, top: i64, (w, h): (u32, u32)) -> Vec<S> {
    let (iw, ih) = (i64::from(iw), i64::from(ih));
    let mut out = vec![S::default(); w as usize * h as usize];
    for y in 0..i64::from(h) {
        let sy = top + y;
        if sy < 0 || sy >= ih {
            continue;
        }
        // The columns of this output row that fall inside the image.
        let x0 = (-left).clamp(0, i64::from(w));
        let x1 = (iw - left).clamp(x0, i64::from(w));
        if x1 > x0 {
            let src = (sy * iw + left + x0) as usize;
            let dst = (y * i64::from(w) + x0) as usize;
            let n = (x1 - x0) as usize;
            out[dst..dst + n].copy_from_slice(&p[src..src + n]);
        }
    }
    out
}

fn flip_plane<S: Sample>(p: &[S], w: usize) -> Vec<S> {
    p.chunks(w.max(1)).flat_map(|row| row.iter().rev().copied()).collect()
}
