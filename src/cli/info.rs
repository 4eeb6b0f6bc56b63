use clap::Args;

use super::parse_arch;
use crate::error::Result;
use crate::model::summary::summarize;
use crate::model::{Arch, ResNetConfig, Stem};

#[derive(Args)]
pub struct InfoArgs {
    #[arg(long, default_value = "resnet34", value_parser = parse_arch)]
    arch: Arch,
    /// imagenet (7x7/2 conv + max-pool) or cifar (3x3/1 conv, no pooling).
    #[arg(long, default_value = "imagenet")]
    stem: String,
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    classes: u64,
    /// Image channels the stem takes (3: RGB).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=crate::model::MAX_IN_CHANNELS as u64))]
    in_channels: u64,
    /// Input height and width; defaults to 224 for the ImageNet stem and 32 for the CIFAR stem.
    #[arg(long, value_parser = clap::value_parser!(u64).range(8..=8192))]
    size: Option<u64>,
}

pub fn run(a: InfoArgs) -> Result<()> {
    let stem: Stem = a.stem.parse()?;
    let config =
        ResNetConfig { stem, in_channels: a.in_channels as usize, ..ResNetConfig::new(a.arch, a.classes as usize) };
    let size = a.size.map(|s| s as usize).unwrap_or(if stem == Stem::Cifar { 32 } else { 224 });
    let s = summarize(&config, size);
    println!("{} ({:?} stem, {} classes, input {}x{size}x{size})", a.arch, stem, a.classes, a.in_channels);
    println!("{:<12} {:>6} {:>16} {:>14} {:>10}", "layer", "blocks", "output", "params", "MACs");
    for r in &s.rows {
        let out = format!("{}x{}x{}", r.out.0, r.out.1, r.out.2);
        let blocks = if r.blocks > 0 { r.blocks.to_string() } else { "-".into() };
        println!("{:<12} {:>6} {:>16} {:>14} {:>9.3}G", r.name, blocks, out, group(r.params), r.macs as f64 / 1e9);
    }
    println!("parameters: {}", group(s.params));
    println!("MACs: {:.2} G at {size}x{size}", s.macs as f64 / 1e9);
    println!("fp32 size: {:.1} MiB", s.fp32_mib());
    Ok(())
}

/// 21797672 → "21,797,672".
fn group(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
