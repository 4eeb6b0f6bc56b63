//! What it takes to run a trained network on a new image, carried in the checkpoint's metadata so that
//! `predict`, `features` and `eval` preprocess exactly as training evaluated: the architecture and stem, the
//! class names, and the evaluation preprocessing (torchvision's `Resize(resize)`, `CenterCrop(size)`,
//! `ToTensor`, `Normalize(mean, std)` over `channels` channels).
//!
//! Keys (safetensors metadata, all strings): `arch`, `stem`, `classes` (a JSON array of names) and
//! `preprocess` (a JSON object: `channels`, `size`, `resize`, `mean`, `std`). A file without `preprocess`
//! (a torchvision export, say) gets torchvision's ImageNet defaults: 256, 224 and ImageNet's mean/std.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::transforms::{Op, Pipeline};
use crate::error::{Error, Result};
use crate::imaging::Decode;
use crate::infer::preprocess::{IMAGENET_MEAN, IMAGENET_STD};
use crate::model::{Arch, MAX_IN_CHANNELS, Stem};

/// The evaluation preprocessing of a network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Input channels (3: RGB; 1: greyscale; any other count for multi-band images).
    pub channels: usize,
    /// Integer pixels are divided by this instead of their type's maximum (absent: the type's maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_scale: Option<f32>,
    /// DICOM window (center, width) instead of each file's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<[f32; 2]>,
    /// Side of the square network input (the centre crop).
    pub size: u32,
    /// Shorter side the image is resized to before the crop; equal to `size` for images that already have
    /// the network's size (digits, CIFAR), where it changes nothing (PIL copies an image resized to its own size).
    pub resize: u32,
    /// Per-channel normalisation after scaling to [0, 1] (one value applies to every channel).
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Preprocess {
    /// torchvision's ImageNet evaluation transform.
    pub fn imagenet() -> Preprocess {
        Preprocess {
            channels: 3,
            pixel_scale: None,
            window: None,
            size: crate::infer::CROP,
            resize: crate::infer::RESIZE,
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
        }
    }

    /// How files are decoded to [0, 1] for this preprocessing.
    pub fn decode(&self) -> Decode {
        Decode { pixel_scale: self.pixel_scale, window: self.window.map(|[c, w]| (c, w)) }
    }

    /// This preprocessing for a stem of `channels`: unchanged for 3; for any other count, the mean and std
    /// averaged over their channels and applied to every channel (timm's choice for a 1-channel model).
    pub fn for_channels(mut self, channels: usize) -> Preprocess {
        if channels != self.channels {
            self.mean = vec![channel_average(&self.mean)];
            self.std = vec![channel_average(&self.std)];
            self.channels = channels;
        }
        self
    }

    /// A new crop side, keeping the resize/crop ratio (256/224 stays 256/224 at any size).
    pub fn set_size(&mut self, size: u32) {
        self.resize = (u64::from(self.resize) * u64::from(size) / u64::from(self.size.max(1))) as u32;
        self.size = size;
    }

    /// Refuse what no image could be preprocessed with (a hand-edited or hostile file).
    pub fn validate(&self) -> Result<()> {
        let fits = |v: &[f32]| v.len() == 1 || v.len() == self.channels;
        if !(1..=MAX_IN_CHANNELS).contains(&self.channels) || !fits(&self.mean) || !fits(&self.std) {
            return Err(Error::invalid(format!(
                "preprocessing for {} channels with mean {:?} and std {:?}: give one value, or one per channel",
                self.channels, self.mean, self.std
            )));
        }
        if !(8..=4096).contains(&self.size) || !(1..=16384).contains(&self.resize) {
            return Err(Error::invalid(format!(
                "preprocessing size {} / resize {} is out of range",
                self.size, self.resize
            )));
        }
        if self.window.is_some_and(|[c, w]| !c.is_finite() || !w.is_finite() || w < 1.0) {
            return Err(Error::invalid(format!("preprocessing window {:?} needs a width of at least 1", self.window)));
        }
        if self.pixel_scale.is_some_and(|s| !s.is_finite() || s <= 0.0) {
            return Err(Error::invalid(format!("preprocessing pixel_scale {:?} must be above 0", self.pixel_scale)));
        }
        if self.std.iter().chain(&self.mean).any(|v| !v.is_finite()) || self.std.iter().any(|&s| s <= 0.0) {
            return Err(Error::invalid("preprocessing mean/std must be finite and the std above 0"));
        }
        Ok(())
    }

    /// The transform as a `Pipeline` (the one evaluation during training runs, so `predict` and `eval` agree
    /// image for image).
    pub fn pipeline(&self) -> Pipeline {
        Pipeline {
            ops: vec![Op::Resize { shorter: self.resize }, Op::CenterCrop { size: self.size }],
            channels: self.channels,
            mean: self.mean.clone(),
            std: self.std.clone(),
            erasing: None,
        }
    }
}

/// Architecture, classes and preprocessing of a network.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelCard {
    pub arch: Arch,
    pub stem: Stem,
    /// Class names in label order, when the file knows them.
    pub classes: Option<Vec<String>>,
    pub preprocess: Preprocess,
}

impl ModelCard {
    /// The card's metadata entries.
    pub fn to_metadata(&self) -> Result<BTreeMap<String, String>> {
        let mut m = BTreeMap::from([
            ("arch".to_string(), self.arch.to_string()),
            ("stem".to_string(), self.stem.to_string()),
            ("preprocess".to_string(), serde_json::to_string(&self.preprocess).map_err(Error::invalid)?),
        ]);
        if let Some(classes) = &self.classes {
            m.insert("classes".to_string(), serde_json::to_string(classes).map_err(Error::invalid)?);
        }
        Ok(m)
    }

    /// The card in a file's metadata; `None` when the file has no `preprocess` entry. Errors are `Invalid`
    /// (attach the file with `in_file`).
    pub fn from_metadata(m: &BTreeMap<String, String>) -> Result<Option<ModelCard>> {
        let Some(pre) = m.get("preprocess") else {
            return Ok(None);
        };
        let preprocess: Preprocess =
            serde_json::from_str(pre).map_err(|e| Error::invalid(format!("bad 'preprocess' metadata: {e}")))?;
        preprocess.validate()?;
        let field = |k: &str| m.get(k).ok_or_else(|| Error::invalid(format!("has 'preprocess' but no '{k}' metadata")));
        let arch: Arch = field("arch")?.parse()?;
        let stem: Stem = field("stem")?.parse()?;
        let classes = match m.get("classes") {
            Some(text) => Some(
                serde_json::from_str::<Vec<String>>(text)
                    .map_err(|e| Error::invalid(format!("bad 'classes' metadata: {e}")))?,
            ),
            None => None,
        };
        Ok(Some(ModelCard { arch, stem, classes, preprocess }))
    }
}

/// The one value a per-channel mean or std becomes for a different channel count: its average (an RGB
/// normalisation applied to a greyscale or multi-band network).
pub fn channel_average(values: &[f32]) -> f32 {
    values.iter().sum::<f32>() / values.len().max(1) as f32
}
