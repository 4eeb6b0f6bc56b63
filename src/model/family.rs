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
        FAMILY.iter().find(|a| a.name == key).copied().ok_or_else(|| {
            let names: Vec<_> = FAMILY.iter().map(|a| a.name).collect();
            Error::invalid(format!("unknown arch '{s}' (expected one of {})", names.join(", ")))
        })
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
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

pub const STANDARD_WIDTHS: [usize; 4] = [64, 128, 256, 512];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResNetConfig {
    pub arch: Arch,
    pub num_classes: usize,
    pub stem: Stem,
    /// Stage widths; torchvision's are 64/128/256/512 (the stem outputs widths[0] channels).
    pub widths: [usize; 4],
    /// Zero the last BN weight of every block so each residual branch starts as the identity.
    pub zero_init_residual: bool,
}

impl ResNetConfig {
    pub fn new(arch: Arch, num_classes: usize) -> Self {
        ResNetConfig { arch, num_classes, stem: Stem::ImageNet, widths: STANDARD_WIDTHS, zero_init_residual: false }
    }

    /// Channels entering the classifier.
    pub fn feature_dim(&self) -> usize {
        self.widths[3] * self.arch.block.expansion()
    }

    /// Read classes, stem and widths off a state_dict's shapes, so a checkpoint of any width and class count loads
    /// with only its architecture named. Shapes are checked in full when the weights are loaded.
    pub fn infer_from(arch: Arch, state: &BTreeMap<String, Tensor>) -> Result<Self> {
        let shape = |key: &str| -> Result<&[usize]> {
            state.get(key).map(|t| t.shape()).ok_or_else(|| Error::invalid(format!("missing key '{key}'")))
        };
        let fc = shape("fc.weight")?;
        let conv1 = shape("conv1.weight")?;
        let (num_classes, stem) = match (fc, conv1) {
            ([classes, _], [_, 3, 7, 7]) => (*classes, Stem::ImageNet),
            ([classes, _], [_, 3, 3, 3]) => (*classes, Stem::Cifar),
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
        Ok(ResNetConfig { arch, num_classes, stem, widths, zero_init_residual: false })
    }
}
