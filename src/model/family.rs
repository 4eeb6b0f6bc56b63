//! The ResNet family as data, the way torchvision's `resnet.py` tabulates it: a block kind and four stage depths
//! per architecture. Everything else (widths, stem, classes) is configuration.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::engine::Tensor;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34).
    Basic,
    /// 1x1 reduce, 3x3 (carrying the stride, "v1.5"), 1x1 expand ×4 (ResNet-50/101/152).
    Bottleneck,
}

impl BlockKind {
    /// Output channels of a block relative to its stage width.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arch {
    pub name: &'static str,
    pub block: BlockKind,
    pub layers: [usize; 4],
}

pub const FAMILY: [Arch; 5] = [
    Arch { name: "resnet18", block: BlockKind::Basic, layers: [2, 2, 2, 2] },
    Arch { name: "resnet34", block: BlockKind::Basic, layers: [3, 4, 6, 3] },
    Arch { name: "resnet50", block: BlockKind::Bottleneck, layers: [3, 4, 6, 3] },
    Arch { name: "resnet101", block: BlockKind::Bottleneck, layers: [3, 4, 23, 3] },
    Arch { name: "resnet152", block: BlockKind::Bottleneck, layers: [3, 8, 36, 3] },
];

impl FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Arch> {
        let key = s.to_ascii_lowercase().replace(['-', '_'], "");
        FAMILY
            .iter()
            .find(|a| a.name == key)
            .copied()
            .ok_or_else(|| Error::invalid(format!("unknown arch '{s}' (expected one of {})", Arch::names().join(", "))))
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl Arch {
    /// The names of the family, in table order.
    pub fn names() -> Vec<&'static str> {
        FAMILY.iter().map(|a| a.name).collect()
    }

    /// The family member a state_dict holds, read off its keys: the block kind from `layer1.0.conv3` (only
    /// bottlenecks have one), the depth of each stage from its highest block index. A file that matches none
    /// is named by what it holds.
    pub fn infer_from(state: &BTreeMap<String, Tensor>) -> Result<Arch> {
        let block = if state.contains_key("layer1.0.conv3.weight") { BlockKind::Bottleneck } else { BlockKind::Basic };
        let mut layers = [0usize; 4];
        for key in state.keys() {
            let Some(rest) = key.strip_prefix("layer") else {
                continue;
            };
            let mut parts = rest.split('.');
            let (Some(stage), Some(index)) = (parts.next(), parts.next()) else {
                continue;
            };
            if let (Ok(stage @ 1..=4), Ok(index)) = (stage.parse::<usize>(), index.parse::<usize>()) {
                layers[stage - 1] = layers[stage - 1].max(index.saturating_add(1));
            }
        }
        FAMILY.iter().find(|a| a.block == block && a.layers == layers).copied().ok_or_else(|| {
            Error::invalid(format!(
                "its keys hold a {block:?}-block network with {layers:?} blocks per stage, which is none of {}",
                Arch::names().join(", ")
            ))
        })
    }
}

impl serde::Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name)
    }
}

impl<'de> serde::Deserialize<'de> for Arch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Arch, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stem {
    /// 7x7/2 convolution, BN, ReLU, 3x3/2 max-pool: for 224² inputs.
    ImageNet,
    /// 3x3/1 convolution, BN, ReLU, no pooling: for 32² inputs such as CIFAR.
    Cifar,
}

impl FromStr for Stem {
    type Err = Error;
    fn from_str(s: &str) -> Result<Stem> {
        match s.to_ascii_lowercase().as_str() {
            "imagenet" => Ok(Stem::ImageNet),
            "cifar" => Ok(Stem::Cifar),
            _ => Err(Error::invalid(format!("unknown stem '{s}' (expected imagenet or cifar)"))),
        }
    }
}

impl fmt::Display for Stem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stem::ImageNet => "imagenet",
            Stem::Cifar => "cifar",
        })
    }
}

impl serde::Serialize for Stem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Stem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Stem, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

pub const STANDARD_WIDTHS: [usize; 4] = [64, 128, 256, 512];

/// The most image channels a stem takes: hyperspectral cubes have a few hundred bands; a file claiming more
/// is refused before anything is allocated for it.
pub const MAX_IN_CHANNELS: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResNetConfig {
    pub arch: Arch,
    pub num_classes: usize,
    pub stem: Stem,
    /// Stage widths; torchvision's are 64/128/256/512 (the stem outputs widths[0] channels).
    pub widths: [usize; 4],
    /// Image channels the stem takes (3 for RGB; 1 for grayscale, 13 for Sentinel-2, ...).
    pub in_channels: usize,
    /// Zero the last BN weight of every block so each residual branch starts as the identity.
    pub zero_init_residual: bool,
}

impl ResNetConfig {
    pub fn new(arch: Arch, num_classes: usize) -> Self {
        ResNetConfig {
            arch,
            num_classes,
            stem: Stem::ImageNet,
            widths: STANDARD_WIDTHS,
            in_channels: 3,
            zero_init_residual: false,
        }
    }

    /// Channels entering the classifier.
    pub fn feature_dim(&self) -> usize {
        self.widths[3] * self.arch.block.expansion()
    }

    /// Read classes, stem, input channels and widths off a state_dict's shapes, so a checkpoint of any width,
    /// channel and class count loads with only its architecture named. Shapes are checked in full when the
    /// weights are loaded.
    pub fn infer_from(arch: Arch, state: &BTreeMap<String, Tensor>) -> Result<Self> {
        let shape = |key: &str| -> Result<&[usize]> {
            state.get(key).map(|t| t.shape()).ok_or_else(|| Error::invalid(format!("missing key '{key}'")))
        };
        let fc = shape("fc.weight")?;
        let conv1 = shape("conv1.weight")?;
        let (num_classes, in_channels, stem) = match (fc, conv1) {
            ([classes, _], [_, c @ 1..=MAX_IN_CHANNELS, 7, 7]) => (*classes, *c, Stem::ImageNet),
            ([classes, _], [_, c @ 1..=MAX_IN_CHANNELS, 3, 3]) => (*classes, *c, Stem::Cifar),
            _ => {
                return Err(Error::invalid(format!(
                    "fc.weight {fc:?} / conv1.weight {conv1:?} do not look like a ResNet"
                )));
            }
        };
        let mut widths = [0; 4];
        for (i, w) in widths.iter_mut().enumerate() {
            // conv1 of a stage's first block always has the stage width as its output channels.
            *w = *shape(&format!("layer{}.0.conv1.weight", i + 1))?
                .first()
                .ok_or_else(|| Error::invalid(format!("layer{}.0.conv1.weight has no dimensions", i + 1)))?;
        }
        if num_classes == 0 || widths.contains(&0) {
            return Err(Error::invalid(format!("zero-sized layer: {num_classes} classes, widths {widths:?}")));
        }
        Ok(ResNetConfig { arch, num_classes, stem, widths, in_channels, zero_init_residual: false })
    }
}
