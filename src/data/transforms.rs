//! Augmentation with torchvision's semantics.
//!
//! A `Pipeline` is torchvision's PIL-image training or eval transform: a list of `Op`s on the image (any number
//! of bands, 8-bit or f32: `crate::imaging::Image`), then `ToTensor` + `Normalize(mean, std)`, then optionally
//! `RandomErasing` on the normalised tensor.
//! `BatchMix` is torchvision v2's `MixUp` / `CutMix` (with label smoothing folded into the targets) on a
//! whole batch.
//!
//! Every random choice is drawn from the `Xoshiro256PlusPlus` the caller passes, in the order torchvision
//! draws them (so one seed gives one augmentation on every build and platform), but the streams are not
//! PyTorch's: the same seed does not give the same crop as torchvision would.

use std::borrow::Cow;

use image::RgbImage;
use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;
use rand_distr::{Beta, Distribution};

use crate::engine::{Tensor, one_hot};
use crate::error::Result;
pub use crate::imaging::to_tensor;
use crate::imaging::{IMAGENET_MEAN, IMAGENET_STD, Image, Samples};

/// One image-level operation, applied to the image in pipeline order.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `RandomCrop(size, padding, pad_if_needed=True)`: pad every side with `padding` black pixels, then crop
    /// a `size` x `size` window at a uniformly drawn position. An image still smaller than `size` is padded
    /// further on both sides of the short axis, as `pad_if_needed` does (torchvision would otherwise fail).
    RandomCrop { size: u32, padding: u32 },
    /// `RandomHorizontalFlip(p)`: mirror left-right with probability `p` (a uniform draw is always taken).
    HorizontalFlip { p: f32 },
    /// `RandomResizedCrop(size, scale, ratio)`: torchvision's 10 attempts at an area fraction in `scale` and a
    /// log-uniform aspect ratio in `ratio` (then the central-crop fallback), and a `size` x `size` bilinear
    /// resize of that window (Pillow's antialiased bilinear, `resize_bilinear_pil`).
    RandomResizedCrop { size: u32, scale: (f32, f32), ratio: (f32, f32) },
    /// `ColorJitter(brightness, contrast, saturation, hue)`: the four adjustments in a random order, each
    /// with a factor uniform in `[max(0, 1-x), 1+x]` (hue: a shift uniform in `[-hue, hue]` of the colour
    /// wheel, `hue` <= 0.5); a zero strength skips that adjustment. PIL's formulas (blend with black, with
    /// the mean grey level, with the grey image; hue shifted in HSV), each rounded back to 8 bits (PIL
    /// truncates; we round to nearest). RGB only (the recipe refuses it for other channel counts); an f32
    /// RGB image is jittered at 8 bits, as PIL would have to.
    ColorJitter { brightness: f32, contrast: f32, saturation: f32, hue: f32 },
    /// `Resize(shorter)`: the shorter side becomes `shorter` and the other `int(shorter * long / short)`,
    /// with Pillow's antialiased bilinear filter, bit for bit (`crate::imaging`). The longer side
    /// is capped at 16384 pixels (as torchvision's `max_size` would), a guard against extreme aspect ratios.
    Resize { shorter: u32 },
    /// `CenterCrop(size)`: torchvision's centre offsets, black padding where the image is smaller. Directly
    /// after a `Resize` the pair is computed by `crate::imaging::resize_center_crop`, which resamples
    /// only the cropped window (same bytes, bounded memory whatever the aspect ratio).
    CenterCrop { size: u32 },
}

/// `RandomErasing(p, scale, ratio, value=0)` on the normalised tensor: with probability `p`, up to 10
/// attempts at a rectangle of area fraction uniform in `scale` and log-uniform aspect ratio (height / width)
/// in `ratio` that fits strictly inside the image; the first that fits is set to 0 in every channel, and
/// nothing is erased when none fits.
#[derive(Clone, Debug, PartialEq)]
pub struct RandomErasing {
    pub p: f32,
    pub scale: (f32, f32),
    pub ratio: (f32, f32),
}

/// Image ops, then to [0, 1] and `(x - mean) / std` per channel, then optional random erasing.
#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    pub ops: Vec<Op>,
    /// Bands the network takes: a grey image is replicated to 3 for an RGB network, any other mismatch refused.
    pub channels: usize,
    /// Per band (one value applies to every band).
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub erasing: Option<RandomErasing>,
}

/// Mix a batch: torchvision v2 `MixUp(alpha)` and `CutMix(alpha)` (an alpha of 0 disables one; with both
/// enabled one of them is picked with probability 1/2 per batch, as `RandomChoice` does), after label
/// smoothing of the one-hot targets.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchMix {
    pub mixup_alpha: f32,
    pub cutmix_alpha: f32,
    pub label_smoothing: f32,
}

impl Pipeline {
    /// No image ops: to tensor and normalise with `mean`, `std` (as many channels as the longer has).
    pub fn normalize(mean: &[f32], std: &[f32]) -> Pipeline {
        let channels = mean.len().max(std.len()).max(1);
        Pipeline { ops: Vec::new(), channels, mean: mean.to_vec(), std: std.to_vec(), erasing: None }
    }

    /// `img` with the bands the network takes (`Image::with_bands`).
    pub fn fit(&self, img: Image) -> Result<Image> {
        img.with_bands(self.channels)
    }

    /// torchvision's ImageNet training recipe basics: `RandomResizedCrop(size)` (scale (0.08, 1), ratio
    /// (3/4, 4/3)), `RandomHorizontalFlip(0.5)`, ImageNet mean/std.
    pub fn imagenet_train(size: u32) -> Pipeline {
        Pipeline {
            ops: vec![
                Op::RandomResizedCrop { size, scale: (0.08, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0) },
                Op::HorizontalFlip { p: 0.5 },
            ],
            channels: 3,
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
            erasing: None,
        }
    }

    /// torchvision's ImageNet eval transform: `Resize(resize)`, `CenterCrop(crop)`, ImageNet mean/std
    /// (the same output as `crate::imaging::eval_transform`).
    pub fn imagenet_eval(resize: u32, crop: u32) -> Pipeline {
        Pipeline {
            ops: vec![Op::Resize { shorter: resize }, Op::CenterCrop { size: crop }],
            channels: 3,
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
            erasing: None,
        }
    }

    /// The image after the ops (before normalisation and erasing).
    pub fn apply_ops(&self, img: &Image, rng: &mut Xoshiro256PlusPlus) -> Image {
        let mut cur = Cow::Borrowed(img);
        let mut k = 0;
        while let Some(op) = self.ops.get(k) {
            if let (Op::Resize { shorter }, Some(Op::CenterCrop { size })) = (op, self.ops.get(k + 1)) {
                cur = Cow::Owned(resize_center_crop(&cur, *shorter, *size));
                k += 2;
            } else {
                cur = Cow::Owned(op.apply(&cur, rng));
                k += 1;
            }
        }
        cur.into_owned()
    }

    /// A pipeline without random ops (an evaluation transform) applied to one image.
    pub fn evaluate(&self, img: &Image) -> Tensor {
        use rand::SeedableRng;
        self.apply(img, &mut Xoshiro256PlusPlus::seed_from_u64(0))
    }

    /// Augment one image into a normalised `[bands, H, W]` tensor.
    pub fn apply(&self, img: &Image, rng: &mut Xoshiro256PlusPlus) -> Tensor {
        let img = self.apply_ops(img, rng);
        let mut t = img.to_tensor(&self.mean, &self.std);
        if let Some(erasing) = &self.erasing {
            erasing.apply(&mut t, rng);
        }
        t
    }
}

impl Op {
    /// Apply this op to `img`, drawing its randomness from `rng`.
    pub fn apply(&self, img: &Image, rng: &mut Xoshiro256PlusPlus) -> Image {
        match *self {
            Op::RandomCrop { size, padding } => random_crop(img, size, padding, rng),
            Op::HorizontalFlip { p } => {
                if rng.random::<f32>() < p {
                    img.flip_horizontal()
                } else {
                    img.clone()
                }
            }
            Op::RandomResizedCrop { size, scale, ratio } => {
                let (top, left, h, w) = random_resized_crop_params(img.width(), img.height(), scale, ratio, rng);
                resized_crop(img, (top, left, h, w), size)
            }
            Op::ColorJitter { brightness, contrast, saturation, hue } => {
                color_jitter(img, [brightness, contrast, saturation, hue], rng)
            }
            Op::Resize { shorter } => resize(img, shorter),
            Op::CenterCrop { size } => center_crop(img, size),
        }
    }
}

/// `Op::Resize`.
fn resize(img: &Image, shorter: u32) -> Image {
    let (w, h) = resized_size(img.width(), img.height(), shorter);
    if (w, h) == img.dimensions() { img.clone() } else { img.resize(w, h) }
}

/// `Op::CenterCrop`.
fn center_crop(img: &Image, size: u32) -> Image {
    let left = crop_offset(img.width(), size);
    let top = crop_offset(img.height(), size);
    img.crop_padded(left, top, size, size)
}

/// Uniform f64 in [lo, hi) from one f64 draw (never panics, whatever the bounds).
fn uniform(rng: &mut Xoshiro256PlusPlus, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Uniform integer in `0..n` (`torch.randint(0, n)`); 0 when n <= 1.
fn below(rng: &mut Xoshiro256PlusPlus, n: u64) -> u64 {
    if n <= 1 { 0 } else { rng.random_range(0..n) }
}

/// The `size` x `size` window of `img` padded by `padding` (and further if still too small) at a random
/// offset.
fn random_crop(img: &Image, size: u32, padding: u32, rng: &mut Xoshiro256PlusPlus) -> Image {
    let pad = i64::from(padding);
    let (mut w, mut h) = (i64::from(img.width()) + 2 * pad, i64::from(img.height()) + 2 * pad);
    let (mut pad_x, mut pad_y) = (pad, pad);
    let size_i = i64::from(size);
    // pad_if_needed: torchvision pads both sides of a short axis by the shortfall.
    if w < size_i {
        pad_x += size_i - w;
        w += 2 * (size_i - w);
    }
    if h < size_i {
        pad_y += size_i - h;
        h += 2 * (size_i - h);
    }
    let top = below(rng, (h - size_i + 1) as u64) as i64;
    let left = below(rng, (w - size_i + 1) as u64) as i64;
    img.crop_padded(left - pad_x, top - pad_y, size, size)
}

/// torchvision's `RandomResizedCrop.get_params`: (top, left, height, width) of the window to crop.
pub fn random_resized_crop_params(
    width: u32,
    height: u32,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut Xoshiro256PlusPlus,
) -> (u32, u32, u32, u32) {
    let area = f64::from(width) * f64::from(height);
    let (log_lo, log_hi) = (f64::from(ratio.0).ln(), f64::from(ratio.1).ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, f64::from(scale.0), f64::from(scale.1));
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = (target_area * aspect).sqrt().round_ties_even();
        let h = (target_area / aspect).sqrt().round_ties_even();
        if 0.0 < w && w <= f64::from(width) && 0.0 < h && h <= f64::from(height) {
            let (w, h) = (w as u32, h as u32);
            let top = below(rng, u64::from(height - h) + 1) as u32;
            let left = below(rng, u64::from(width - w) + 1) as u32;
            return (top, left, h, w);
        }
    }
    // Fallback: the central crop with the aspect ratio clamped into `ratio`.
    let in_ratio = f64::from(width) / f64::from(height);
    let (min_r, max_r) = (f64::from(ratio.0.min(ratio.1)), f64::from(ratio.0.max(ratio.1)));
    let (w, h) = if in_ratio < min_r {
        (width, ((f64::from(width) / min_r).round_ties_even() as u32).min(height))
    } else if in_ratio > max_r {
        (((f64::from(height) * max_r).round_ties_even() as u32).min(width), height)
    } else {
        (width, height)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// Crop (top, left, height, width) and resize to `size` x `size` (Pillow's antialiased bilinear).
fn resized_crop(img: &Image, window: (u32, u32, u32, u32), size: u32) -> Image {
    let (top, left, h, w) = window;
    if w == 0 || h == 0 {
        return Image::black(size, size, img.bands());
    }
    let crop = img.crop_padded(i64::from(left), i64::from(top), w, h);
    if (w, h) == (size, size) { crop } else { crop.resize(size, size) }
}

/// Longest side `Op::Resize` produces.
const MAX_RESIZE_SIDE: u64 = 16384;

/// torchvision's `_compute_resized_output_size` for one size (the shorter side becomes `size`, the other
/// `int(size * long / short)`), with the longer side capped at `MAX_RESIZE_SIDE`. Returns (width, height).
fn resized_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (short, long) = (width.min(height), width.max(height));
    if short == 0 {
        return (0, 0);
    }
    let mut new_short = u64::from(size);
    let mut new_long = ((u64::from(size) * u64::from(long)) as f64 / f64::from(short)) as u64;
    if new_long > MAX_RESIZE_SIDE {
        // torchvision's max_size rule: shrink both so that the longer side is the cap.
        new_short = ((MAX_RESIZE_SIDE * new_short) as f64 / new_long as f64) as u64;
        new_long = MAX_RESIZE_SIDE;
    }
    let (s, l) = (new_short as u32, new_long as u32);
    if width <= height { (s, l) } else { (l, s) }
}

/// torchvision's centre-crop offset along a side of `n`: `int(round((n - crop) / 2))` (half to even), or
/// minus the leading padding `(crop - n) // 2` when the side is shorter than the crop.
fn crop_offset(n: u32, crop: u32) -> i64 {
    if crop > n { -i64::from((crop - n) / 2) } else { (f64::from(n - crop) / 2.0).round_ties_even() as i64 }
}

/// `Resize(shorter)` then `CenterCrop(crop)` through `crate::imaging::resize_center_crop`, which
/// resamples only the cropped window (the same bytes as the two ops one after the other).
fn resize_center_crop(img: &Image, shorter: u32, crop: u32) -> Image {
    let (w, h) = resized_size(img.width(), img.height(), shorter);
    if u64::from(w.max(h)) >= MAX_RESIZE_SIDE {
        // The cap changed the geometry that the windowed resize would use: go the long way.
        return center_crop(&resize(img, shorter), crop);
    }
    img.resize_center_crop(shorter, crop)
}

/// PIL's greyscale level (ITU-R 601-2 luma, `L = R*299/1000 + G*587/1000 + B*114/1000`), as a float.
fn luma(p: [f32; 3]) -> f32 {
    p[0] * 0.299 + p[1] * 0.587 + p[2] * 0.114
}

fn to_byte(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// `color_jitter_rgb` on an RGB image (8-bit, or f32 taken to 8 bits); other band counts pass unchanged (the
/// recipe refuses colour jitter for them).
fn color_jitter(img: &Image, strength: [f32; 4], rng: &mut Xoshiro256PlusPlus) -> Image {
    let rgb = match (img.to_rgb(), img.samples()) {
        (Some(rgb), _) => rgb,
        (None, Samples::F32(v)) if img.bands() == 3 => {
            let bytes = v.iter().map(|&x| (x * 255.0).round().clamp(0.0, 255.0) as u8).collect();
            let Ok(as_bytes) = Image::new(img.width(), img.height(), 3, Samples::U8(bytes)) else {
                return img.clone();
            };
            let Some(rgb) = as_bytes.to_rgb() else { return img.clone() };
            rgb
        }
        _ => return img.clone(),
    };
    Image::from_rgb(&color_jitter_rgb(&rgb, strength, rng))
}

/// torchvision `ColorJitter` on an 8-bit image. `strength` = [brightness, contrast, saturation, hue].
fn color_jitter_rgb(img: &RgbImage, strength: [f32; 4], rng: &mut Xoshiro256PlusPlus) -> RgbImage {
    // torch.randperm(4) first, then the factors of the enabled adjustments in the fixed order b, c, s, h.
    let mut order = [0usize, 1, 2, 3];
    for i in (1..4).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let factor = |rng: &mut Xoshiro256PlusPlus, x: f32| {
        (x > 0.0).then(|| uniform(rng, f64::from((1.0 - x).max(0.0)), f64::from(1.0 + x)) as f32)
    };
    let b = factor(rng, strength[0]);
    let c = factor(rng, strength[1]);
    let s = factor(rng, strength[2]);
    let hue = strength[3].min(0.5);
    let h = (hue > 0.0).then(|| uniform(rng, f64::from(-hue), f64::from(hue)) as f32);

    let mut out = img.clone();
    for op in order {
        match (op, b, c, s, h) {
            (0, Some(f), ..) => adjust_brightness(&mut out, f),
            (1, _, Some(f), ..) => adjust_contrast(&mut out, f),
            (2, _, _, Some(f), _) => adjust_saturation(&mut out, f),
            (3, .., Some(f)) => adjust_hue(&mut out, f),
            _ => {}
        }
    }
    out
}

/// `ImageEnhance.Brightness`: blend with black, `v * f`.
pub fn adjust_brightness(img: &mut RgbImage, f: f32) {
    for px in img.pixels_mut() {
        px.0 = px.0.map(|v| to_byte(f32::from(v) * f));
    }
}

/// `ImageEnhance.Contrast`: blend with the image's mean grey level (rounded to an integer, as PIL does).
pub fn adjust_contrast(img: &mut RgbImage, f: f32) {
    let n = u64::from(img.width()) * u64::from(img.height());
    if n == 0 {
        return;
    }
    let sum: f64 = img.pixels().map(|px| f64::from(to_byte(luma(px.0.map(f32::from))))).sum();
    let mean = (sum / n as f64 + 0.5).floor() as f32;
    for px in img.pixels_mut() {
        px.0 = px.0.map(|v| to_byte(mean + f * (f32::from(v) - mean)));
    }
}

/// `ImageEnhance.Color`: blend each pixel with its own grey level.
pub fn adjust_saturation(img: &mut RgbImage, f: f32) {
    for px in img.pixels_mut() {
        let grey = f32::from(to_byte(luma(px.0.map(f32::from))));
        px.0 = px.0.map(|v| to_byte(grey + f * (f32::from(v) - grey)));
    }
}

/// `adjust_hue`: rotate the hue by `shift` turns (in [-0.5, 0.5]) in HSV space.
pub fn adjust_hue(img: &mut RgbImage, shift: f32) {
    for px in img.pixels_mut() {
        let [r, g, b] = px.0.map(|v| f32::from(v) / 255.0);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let delta = max - min;
        if delta == 0.0 {
            continue; // grey: no hue to rotate
        }
        let mut hue = if max == r {
            ((g - b) / delta).rem_euclid(6.0)
        } else if max == g {
            (b - r) / delta + 2.0
        } else {
            (r - g) / delta + 4.0
        } / 6.0;
        hue = (hue + shift).rem_euclid(1.0);
        let (s, v) = (delta / max, max);
        let h6 = hue * 6.0;
        let sector = (h6.floor() as i32).rem_euclid(6);
        let frac = h6 - h6.floor();
        let p = v * (1.0 - s);
        let q = v * (1.0 - s * frac);
        let t = v * (1.0 - s * (1.0 - frac));
        let rgb = match sector {
            0 => [v, t, p],
            1 => [q, v, p],
            2 => [p, v, t],
            3 => [p, q, v],
            4 => [t, p, v],
            _ => [v, p, q],
        };
        px.0 = rgb.map(|x| to_byte(x * 255.0));
    }
}

impl RandomErasing {
    /// torchvision's `RandomErasing.get_params` for an `height` x `width` image: Some((top, left, h, w)) of
    /// the rectangle to erase, or None when 10 attempts found none that fits.
    pub fn params(
        &self,
        height: usize,
        width: usize,
        rng: &mut Xoshiro256PlusPlus,
    ) -> Option<(usize, usize, usize, usize)> {
        let area = height as f64 * width as f64;
        let (log_lo, log_hi) = (f64::from(self.ratio.0).ln(), f64::from(self.ratio.1).ln());
        for _ in 0..10 {
            let erase_area = area * uniform(rng, f64::from(self.scale.0), f64::from(self.scale.1));
            let aspect = uniform(rng, log_lo, log_hi).exp();
            let h = (erase_area * aspect).sqrt().round_ties_even();
            let w = (erase_area / aspect).sqrt().round_ties_even();
            // NaN fails these comparisons too, so a nonsensical scale or ratio erases nothing.
            if !(h >= 0.0 && w >= 0.0 && h < height as f64 && w < width as f64) {
                continue;
            }
            let (h, w) = (h as usize, w as usize);
            let top = below(rng, (height - h + 1) as u64) as usize;
            let left = below(rng, (width - w + 1) as u64) as usize;
            return Some((top, left, h, w));
        }
        None
    }

    /// With probability `p`, zero a random rectangle of a `[C, H, W]` tensor in every channel.
    pub fn apply(&self, t: &mut Tensor, rng: &mut Xoshiro256PlusPlus) {
        if rng.random::<f32>() >= self.p {
            return;
        }
        let &[channels, height, width] = t.shape() else {
            return;
        };
        let Some((top, left, h, w)) = self.params(height, width, rng) else {
            return;
        };
        let data = t.data_mut();
        for c in 0..channels {
            for y in top..top + h {
                let row = (c * height + y) * width;
                data[row + left..row + left + w].fill(0.0);
            }
        }
    }
}

/// Which mix a batch got, and its final λ (the weight of each sample's own image and label).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mixed {
    /// Neither enabled (or an empty batch): only label smoothing.
    None,
    MixUp {
        lambda: f32,
    },
    /// The box (x1, y1, x2, y2) pasted from the rolled batch, and λ corrected to the box's area.
    CutMix {
        lambda: f32,
        x1: usize,
        y1: usize,
        x2: usize,
        y2: usize,
    },
}

impl BatchMix {
    /// Mix `images` (`[N, C, H, W]`, in place) with the batch rolled by one (sample `i` with `i - 1`, sample
    /// 0 with `N - 1`) and return the `[N, classes]` target distributions:
    /// `λ * smooth(onehot(y_i)) + (1 - λ) * smooth(onehot(y_{i-1}))`, with `smooth(t) = (1 - ε) t + ε / C`.
    ///
    /// # Panics
    /// When `images` is not `[labels.len(), C, H, W]` or a label is not below `classes` (the loader checks
    /// both before calling).
    pub fn mix(&self, images: &mut Tensor, labels: &[usize], classes: usize, rng: &mut Xoshiro256PlusPlus) -> Tensor {
        self.mix_detailed(images, labels, classes, rng).0
    }

    /// `mix`, also telling which mix was applied and with what λ.
    pub fn mix_detailed(
        &self,
        images: &mut Tensor,
        labels: &[usize],
        classes: usize,
        rng: &mut Xoshiro256PlusPlus,
    ) -> (Tensor, Mixed) {
        let [n, _, height, width] = images.dims4();
        assert_eq!(n, labels.len(), "BatchMix::mix: {n} images but {} labels", labels.len());
        let mut targets = one_hot(labels, classes, self.label_smoothing);
        let beta = |alpha: f32| {
            (alpha > 0.0 && alpha.is_finite()).then(|| Beta::new(f64::from(alpha), f64::from(alpha)).ok()).flatten()
        };
        let (mixup, cutmix) = (beta(self.mixup_alpha), beta(self.cutmix_alpha));
        let use_cutmix = match (&mixup, &cutmix) {
            (None, None) => return (targets, Mixed::None),
            (Some(_), Some(_)) => rng.random::<bool>(),
            (None, Some(_)) => true,
            (Some(_), None) => false,
        };
        if n == 0 {
            return (targets, Mixed::None);
        }
        let per_image = images.numel() / n;
        let original = images.data().to_vec();
        let rolled = |i: usize| (i + n - 1) % n;
        let mixed = if let (true, Some(dist)) = (use_cutmix, &cutmix) {
            let lambda: f64 = dist.sample(rng);
            let rx = below(rng, width as u64) as i64;
            let ry = below(rng, height as u64) as i64;
            let r = 0.5 * (1.0 - lambda).sqrt();
            let (rw, rh) = ((r * width as f64) as i64, (r * height as f64) as i64);
            let x1 = (rx - rw).max(0) as usize;
            let y1 = (ry - rh).max(0) as usize;
            let x2 = ((rx + rw).min(width as i64)).max(0) as usize;
            let y2 = ((ry + rh).min(height as i64)).max(0) as usize;
            let plane_area = (width * height).max(1) as f64;
            let lambda = (1.0 - ((x2 - x1) * (y2 - y1)) as f64 / plane_area) as f32;
            let data = images.data_mut();
            for i in 0..n {
                let (dst, src) = (i * per_image, rolled(i) * per_image);
                for plane in (0..per_image).step_by((height * width).max(1)) {
                    for y in y1..y2 {
                        let row = plane + y * width;
                        data[dst + row + x1..dst + row + x2].copy_from_slice(&original[src + row + x1..src + row + x2]);
                    }
                }
            }
            Mixed::CutMix { lambda, x1, y1, x2, y2 }
        } else if let Some(dist) = &mixup {
            let lambda = dist.sample(rng) as f32;
            let data = images.data_mut();
            for i in 0..n {
                let (dst, src) = (i * per_image, rolled(i) * per_image);
                for k in 0..per_image {
                    data[dst + k] = original[src + k] * (1.0 - lambda) + original[dst + k] * lambda;
                }
            }
            Mixed::MixUp { lambda }
        } else {
            Mixed::None
        };
        let lambda = match mixed {
            Mixed::MixUp { lambda } | Mixed::CutMix { lambda, .. } => lambda,
            Mixed::None => return (targets, mixed),
        };
        let smoothed = targets.data().to_vec();
        for (i, row) in targets.data_mut().chunks_mut(classes.max(1)).enumerate() {
            let (own, other) = (i * classes, rolled(i) * classes);
            for (k, t) in row.iter_mut().enumerate() {
                *t = smoothed[other + k] * (1.0 - lambda) + smoothed[own + k] * lambda;
            }
        }
        (targets, mixed)
    }
}
