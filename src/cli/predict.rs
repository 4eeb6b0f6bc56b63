use std::path::PathBuf;

use clap::Args;

use super::{ModelArgs, Sharded};
use crate::error::Result;
use crate::infer;
use crate::infer::runner::Runner;
use crate::target::TargetArgs;

#[derive(Args)]
pub struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Class names: "imagenet" (torchvision's 1000) or a text file with one name per line (default: the
    /// checkpoint's; ImageNet's for a 1000-class file that names none, as torchvision's; else "class N").
    #[arg(long)]
    labels: Option<String>,
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    top_k: u64,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch_size: u64,
    /// One JSON object per image on stdout.
    #[arg(long)]
    json: bool,
    /// Split the images over MPI ranks (`mpirun -n N resnet predict --distributed ...`, feature `mpi`); rank 0
    /// prints every image's result, in input order.
    #[arg(long)]
    distributed: bool,
    #[command(flatten)]
    target: TargetArgs,
    /// JPEG, PNG, TIFF or DICOM files, or directories of them (.jpg/.jpeg/.png/.tif/.tiff/.dcm).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

pub fn run(a: PredictArgs) -> Result<()> {
    let opened = a.model.open()?;
    let model = opened.model;
    let labels = infer::labels::for_model(a.labels.as_deref(), opened.card.classes, model.config.num_classes)?;
    let files = infer::collect_images(&a.images)?;
    let (batch, side, classes) =
        (a.batch_size as usize, opened.card.preprocess.size as usize, model.config.num_classes);
    let open = || Runner::open(model, a.target.target(), opened.calibration.as_ref(), batch, side, side);
    let sharded = Sharded::new(a.distributed, files.len())?;
    let logits = sharded.rows(&files, &opened.card.preprocess, open, (batch, classes), |r, b| r.forward(b))?;
    let Some(logits) = logits else { return Ok(()) };
    let k = (a.top_k as usize).min(labels.len());
    for (file, top) in files.iter().zip(infer::top_k(&logits, k)) {
        if a.json {
            println!("{}", infer::top_json(&file.display().to_string(), &top, &labels));
        } else {
            println!("{}", file.display());
            for (c, p) in top {
                println!("  {:>7.4}  {} ({c})", p, labels[c]);
            }
        }
    }
    Ok(())
}
