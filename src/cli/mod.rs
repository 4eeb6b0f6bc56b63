//! The `resnet` command line: thin subcommands over library calls. Every user-facing failure is an `Error`,
//! printed as one line by `main` with exit code 2.

mod bench;
mod eval;
mod features;
mod info;
mod predict;
mod train;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::Result;
use crate::model::Arch;

#[derive(Parser)]
#[command(
    name = "resnet",
    version,
    about = "ResNet-18/34/50/101/152: train, fine-tune, evaluate, predict and extract features"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Layer table, parameter count, multiply-accumulates and fp32 size of an architecture.
    Info(info::InfoArgs),
    /// Classify images with a torchvision-format checkpoint (.pth or .safetensors).
    Predict(predict::PredictArgs),
    /// Write one feature vector per image (avgpool, fc or a pooled stage) to a safetensors file.
    Features(features::FeaturesArgs),
    /// Train or fine-tune (default: ResNet-34 on the bundled 8x8 digits).
    Train(train::TrainCmd),
    /// Top-1/top-5, per-class accuracy and confusion matrix of a checkpoint on a dataset's held-out split.
    Eval(eval::EvalCmd),
    /// Time inference or a training step: median/min/max over runs, images/s, peak RSS.
    Bench(bench::BenchCmd),
}

/// Architecture and checkpoint, shared by the subcommands that run a network.
#[derive(Args)]
struct ModelArgs {
    /// resnet18, resnet34, resnet50, resnet101 or resnet152.
    #[arg(long, default_value = "resnet34", value_parser = parse_arch)]
    arch: Arch,
    /// Weights: a torchvision state_dict (.pth) or a .safetensors file with torchvision's key names. Classes,
    /// stem and widths are read off the file's shapes.
    #[arg(long)]
    weights: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch_size: u64,
}

fn parse_arch(s: &str) -> std::result::Result<Arch, String> {
    s.parse().map_err(|e: crate::Error| e.to_string())
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Features(a) => features::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
    }
}
