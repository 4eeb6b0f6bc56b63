//! The `resnet` command line: thin subcommands over library calls. Every user-facing failure is an `Error`,
//! printed as one line by `main` with exit code 2.

mod bench;
mod eval;
mod export;
mod features;
mod info;
mod predict;
mod quantize;
mod report;
mod serve;
mod train;
mod weights;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::Result;
use crate::model::Arch;
use crate::train::checkpoint::Opened;
use crate::train::recipe::FlagValue;

#[derive(Parser)]
#[command(
    name = "resnet",
    version,
    about = "ResNet-18/34/50/101/152: train, fine-tune, evaluate, predict, extract features, export and serve"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Layer table, parameter count, multiply-accumulates and fp32 size of an architecture.
    Info(info::InfoArgs),
    /// Classify images with one of our checkpoints or a torchvision-format file (.pth or .safetensors).
    Predict(predict::PredictArgs),
    /// Write one feature vector per image (avgpool, fc or a pooled stage) to a .safetensors or .npy file.
    Features(features::FeaturesArgs),
    /// Train or fine-tune (default: ResNet-34 on the bundled 8x8 digits).
    Train(Box<train::TrainCmd>),
    /// Top-1/top-5, per-class accuracy and confusion matrix of a checkpoint on a dataset's held-out split.
    Eval(eval::EvalCmd),
    /// Write a checkpoint as ONNX, a torch.save state_dict (.pth) or safetensors holding the network alone.
    Export(export::ExportCmd),
    /// Calibrate int8 inference on images and write the weights with it (then run them with --dtype int8).
    Quantize(quantize::QuantizeCmd),
    /// Time inference or a training step: median/min/max over runs, images/s, peak RSS.
    Bench(bench::BenchCmd),
    /// Serve a checkpoint over HTTP with dynamic batching (predict, features, health, Prometheus metrics).
    Serve(Box<serve::ServeCmd>),
    /// Write a training run's report.html (curves, gradient statistics, confusion matrix, recipe, timings).
    Report(report::ReportCmd),
    /// torchvision's pretrained weights by name: list them, or download and verify them into the cache.
    Weights(weights::WeightsCmd),
}

/// A comma-separated list as one flag value. The alias keeps clap's derive from reading `Option<Vec<_>>` as a
/// flag given several times.
type Numbers = Vec<f32>;

/// Architecture and checkpoint, shared by the subcommands that run a network.
#[derive(Args)]
struct ModelArgs {
    /// Weights: one of our checkpoints (its arch, stem, class names and preprocessing are used), a torchvision
    /// state_dict (.pth or .safetensors, which gets torchvision's ImageNet preprocessing), a published name
    /// (torchvision:resnet34, torchvision:resnet50:IMAGENET1K_V1; `resnet weights list`) or an
    /// https://…/name-<sha256 prefix>.pth URL, downloaded once into the cache and verified.
    #[arg(long)]
    weights: PathBuf,
    /// resnet18, resnet34, resnet50, resnet101 or resnet152: read off the file; if given, it must agree.
    #[arg(long, value_parser = parse_arch)]
    arch: Option<Arch>,
    /// Network input side (the centre crop), overriding the checkpoint's.
    #[arg(long, value_parser = clap::value_parser!(u32).range(8..=4096))]
    image_size: Option<u32>,
    /// Shorter side the image is resized to before the centre crop, overriding the checkpoint's.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=16384))]
    resize: Option<u32>,
    /// Per-channel mean (R,G,B, one value per channel, or one for all), overriding the checkpoint's.
    #[arg(long, value_parser = <Vec<f32> as FlagValue>::parser())]
    mean: Option<Numbers>,
    /// Per-channel std (R,G,B, one value per channel, or one for all), overriding the checkpoint's.
    #[arg(long, value_parser = <Vec<f32> as FlagValue>::parser())]
    std: Option<Numbers>,
    /// DICOM window CENTER,WIDTH (after the modality LUT), overriding the checkpoint's and each file's.
    #[arg(long, value_parser = <Vec<f32> as FlagValue>::parser())]
    window: Option<Numbers>,
    /// Use the checkpoint's weight EMA (a run trained with --model-ema) instead of its live weights.
    #[arg(long)]
    ema: bool,
}

impl ModelArgs {
    /// The network and its card, with the preprocessing flags laid over the card's.
    fn open(&self) -> Result<Opened> {
        let mut opened = crate::train::checkpoint::open_model(&self.weights, self.arch, variant(self.ema))?;
        let pre = &mut opened.card.preprocess;
        if let Some(size) = self.image_size {
            // A new crop keeps the checkpoint's resize/crop ratio unless --resize is given too.
            pre.set_size(size);
        }
        if let Some(resize) = self.resize {
            pre.resize = resize;
        }
        if let Some(mean) = &self.mean {
            pre.mean = mean.clone();
        }
        if let Some(std) = &self.std {
            pre.std = std.clone();
        }
        if let Some(window) = &self.window {
            let pair = <[f32; 2]>::try_from(window.as_slice())
                .map_err(|_| crate::Error::invalid("--window takes CENTER,WIDTH (two numbers)"))?;
            pre.window = Some(pair);
        }
        pre.validate().map_err(|e| e.in_file(&self.weights))?;
        Ok(opened)
    }
}

/// The network `--ema` asks for.
fn variant(ema: bool) -> crate::weights::Variant {
    if ema { crate::weights::Variant::Ema } else { crate::weights::Variant::Live }
}

fn parse_arch(s: &str) -> std::result::Result<Arch, String> {
    s.parse().map_err(|e: crate::Error| e.to_string())
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Features(a) => features::run(a),
        Command::Train(a) => train::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Export(a) => export::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Report(a) => report::run(a),
        Command::Serve(a) => serve::run(*a),
        Command::Weights(a) => weights::run(a),
    }
}

/// `--distributed` on `predict` and `features` (`mpirun -n N`, feature `mpi`): each rank takes a contiguous part
/// of the inputs, and rank 0 gathers every rank's rows back into input order and alone writes the output.
struct Sharded {
    comm: std::sync::Arc<dyn crate::train::distributed::Comm>,
    /// Inputs in all; each rank's part holds `chunk` of them (the last ones fewer, padded for the gather).
    total: usize,
    chunk: usize,
}

impl Sharded {
    fn new(distributed: bool, total: usize) -> Result<Sharded> {
        use crate::train::distributed::{self, Alone};
        let comm = if distributed { distributed::world()? } else { std::sync::Arc::new(Alone) };
        let chunk = total.div_ceil(comm.size());
        Ok(Sharded { comm, total, chunk })
    }

    /// This rank's inputs, as a range of the whole list.
    fn mine(&self) -> std::ops::Range<usize> {
        let start = (self.comm.rank() * self.chunk).min(self.total);
        start..(start + self.chunk).min(self.total)
    }

    /// `f`'s `[k, width]` rows for this rank's part of `files`, in batches of `batch` (the network opened by
    /// `runner` only when the part holds any), then every rank's rows in input order on rank 0; None on the
    /// others.
    fn rows(
        &self,
        files: &[PathBuf],
        pre: &crate::infer::card::Preprocess,
        runner: impl FnOnce() -> Result<crate::infer::runner::Runner>,
        (batch, width): (usize, usize),
        mut f: impl FnMut(&mut crate::infer::runner::Runner, &crate::Tensor) -> Result<crate::Tensor>,
    ) -> Result<Option<crate::Tensor>> {
        let mine = &files[self.mine()];
        let rows = if mine.is_empty() {
            crate::Tensor::zeros(&[0, width])
        } else {
            let x = crate::infer::load_batch(mine, pre)?;
            let mut runner = runner()?;
            crate::infer::batched(&x, batch, |b| f(&mut runner, b))?
        };
        self.gather(rows, width)
    }

    /// Every rank's `[k, width]` rows, in input order, on rank 0; None on the others.
    fn gather(&self, rows: crate::Tensor, width: usize) -> Result<Option<crate::Tensor>> {
        if self.comm.size() == 1 {
            return Ok(Some(rows));
        }
        let mut local = rows.into_data();
        local.resize(self.chunk * width, 0.0);
        Ok(match self.comm.gather_f32(&local)? {
            Some(mut all) => {
                all.truncate(self.total * width);
                Some(crate::Tensor::new(&[self.total, width], all)?)
            }
            None => None,
        })
    }
}
