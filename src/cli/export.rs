//! `resnet export`: a checkpoint (ours, a training run's best.safetensors, a torchvision .pth) as ONNX, a
//! torch.save state_dict or plain safetensors.

use std::path::PathBuf;

use clap::Args;

use super::{parse_arch, variant};
use crate::error::{Error, Result};
use crate::export::{self, Format, OnnxOptions};
use crate::model::{Arch, Tap};

#[derive(Args)]
pub struct ExportCmd {
    /// The weights: a training checkpoint, our safetensors, a torchvision .pth, or a torchvision: name.
    checkpoint: PathBuf,
    /// onnx, pth or safetensors (default: from the extension of --out).
    #[arg(long, value_parser = parse_format)]
    format: Option<Format>,
    /// The file to write (replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// ONNX: where the graph ends: fc (logits), avgpool (embeddings), or layer1..layer4 (spatially averaged).
    #[arg(long, default_value = "fc")]
    layer: String,
    /// ONNX: keep BatchNormalization nodes instead of folding them into the convolutions.
    #[arg(long)]
    keep_bn: bool,
    /// ONNX: the input side, overriding the checkpoint's crop size.
    #[arg(long, value_parser = clap::value_parser!(u32).range(8..=4096))]
    image_size: Option<u32>,
    /// Export the checkpoint's weight EMA (a run trained with --model-ema) instead of its live weights.
    #[arg(long)]
    ema: bool,
    /// resnet18 … resnet152: read off the file; if given, it must agree.
    #[arg(long, value_parser = parse_arch)]
    arch: Option<Arch>,
}

fn parse_format(s: &str) -> std::result::Result<Format, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

pub fn run(a: ExportCmd) -> Result<()> {
    let format = match a.format {
        Some(f) => f,
        None => Format::of_path(&a.out)?,
    };
    let tap: Tap = a.layer.parse()?;
    if format != Format::Onnx && (tap != Tap::Fc || a.keep_bn || a.image_size.is_some()) {
        return Err(Error::invalid("--layer, --keep-bn and --image-size apply to --format onnx only"));
    }
    let mut opened = crate::train::checkpoint::open_model(&a.checkpoint, a.arch, variant(a.ema))?;
    if let Some(size) = a.image_size {
        opened.card.preprocess.set_size(size);
        opened.card.preprocess.validate().map_err(|e| e.in_file(&a.checkpoint))?;
    }
    export::write(&opened.model, &opened.card, format, OnnxOptions { tap, keep_bn: a.keep_bn }, &a.out)?;
    let what = match format {
        Format::Onnx => format!("ONNX (opset {}, output {})", export::onnx::OPSET, export::onnx::output_name(tap)),
        Format::Pth => "a torch.save state_dict".to_string(),
        Format::Safetensors => "safetensors".to_string(),
    };
    eprintln!("wrote {} ({} stem) as {what} to {}", opened.card.arch, opened.card.stem, a.out.display());
    Ok(())
}
