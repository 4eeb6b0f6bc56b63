//! A trained network out of this tool, in the formats deployments take: ONNX (ONNX Runtime, TensorRT, OpenVINO),
//! a `torch.save` state_dict that torchvision's models load with `strict=True`, and safetensors with the model
//! tensors alone. A training checkpoint mixes `optimizer.*` and `model_ema.*` keys into its file, which
//! torchvision's `load_state_dict(strict=True)` refuses; every format here holds the network only.

pub mod onnx;

use std::path::Path;

use crate::error::{Error, Result};
use crate::infer::card::ModelCard;
use crate::model::ResNet;
use crate::weights;

pub use onnx::OnnxOptions;

/// A file format `resnet export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Onnx,
    Pth,
    Safetensors,
}

impl Format {
    /// The format of a `--format` name.
    fn named(name: &str) -> Option<Format> {
        match name {
            "onnx" => Some(Format::Onnx),
            "pth" => Some(Format::Pth),
            "safetensors" => Some(Format::Safetensors),
            _ => None,
        }
    }

    /// The format a file name's extension asks for (`.pt` is a `.pth`).
    pub fn of_path(path: &Path) -> Result<Format> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        Format::named(if ext == "pt" { "pth" } else { &ext })
            .ok_or_else(|| Error::file(path, "give --format onnx|pth|safetensors (the extension does not say which)"))
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        Format::named(s)
            .ok_or_else(|| Error::invalid(format!("unknown format '{s}' (expected onnx, pth or safetensors)")))
    }
}

/// Write `model` to `out` in `format`, atomically (a temporary file renamed into place). The ONNX file and the
/// safetensors carry the model card (arch, stem, preprocessing, class names) as metadata; a .pth has no place
/// for it, as torchvision's own files have none.
pub fn write(model: &ResNet, card: &ModelCard, format: Format, onnx: OnnxOptions, out: &Path) -> Result<()> {
    match format {
        Format::Onnx => weights::write_atomic(out, &onnx::encode(model, card, onnx)?),
        Format::Pth => weights::pth::save(out, &model.state_dict(), &weights::batch_counts(model)),
        Format::Safetensors => weights::save_model(model, out, &card.to_metadata()?),
    }
}
