use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::error::Result;
use crate::infer::runner::{DeviceSpec, Precision, Runner};
use crate::train::recipe::Recipe;
use crate::train::{checkpoint, evaluate, setup};

#[derive(Args)]
pub struct EvalCmd {
    /// A checkpoint: a training run's last/best.safetensors (its recipe is used) or any torchvision-format file.
    #[arg(long)]
    weights: PathBuf,
    /// Recipe for the dataset and preprocessing when the checkpoint carries none (default: digits).
    #[arg(long)]
    recipe: Option<String>,
    /// Dataset location, overriding the recipe's.
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long)]
    arch: Option<String>,
    /// cpu, cuda, cuda:N or auto (a GPU when this build has the `cuda` feature and finds one).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// f32; bf16 (bf16 convolution operands, fp32 accumulation: on a GPU, or a CPU with AVX512-BF16); on a GPU
    /// also tf32 (TF32 tensor-core convolutions).
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: EvalCmd) -> Result<()> {
    // A training checkpoint carries its recipe and the network; any other weights file holds the network only.
    let checkpoint = checkpoint::load(&a.weights).ok();
    let mut r = match (&a.recipe, &checkpoint) {
        (Some(name), _) => Recipe::load(name)?,
        (None, Some(c)) => c.recipe.clone(),
        (None, None) => Recipe::load("digits")?,
    };
    if let Some(d) = a.data {
        r.data = Some(d);
    }
    if let Some(arch) = a.arch {
        r.arch = arch;
    }
    let arch = r.arch.parse()?;
    let model = match &checkpoint {
        Some(c) => crate::weights::model_from_state(arch, &c.model, &a.weights)?,
        None => crate::weights::load_model(arch, &a.weights)?,
    };
    let (_, val) = setup::datasets(&r)?;
    let classes = val.num_classes();
    if classes != model.config.num_classes {
        return Err(crate::Error::file(
            &a.weights,
            format!("has {} classes but the dataset has {classes}", model.config.num_classes),
        ));
    }
    let names = val.class_names();
    let (_, eval_pipe) = setup::pipelines(&r);
    let size = r.image_size as usize;
    let mut runner = Runner::with_precision(model, a.device, r.batch_size, size, size, a.dtype)?;
    let rep = evaluate::evaluate_with(
        &mut |x| runner.forward(x),
        classes,
        val,
        Arc::new(eval_pipe),
        r.batch_size,
        r.workers,
    )?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"top1": rep.top1, "top5": rep.top5, "loss": rep.loss, "per_class": rep.per_class, "confusion": rep.confusion, "classes": names})
        );
        return Ok(());
    }
    println!("top-1 {:.2} %  top-5 {:.2} %  loss {:.4}", rep.top1 * 100.0, rep.top5 * 100.0, rep.loss);
    println!("per-class accuracy:");
    for (name, acc) in names.iter().zip(&rep.per_class) {
        println!("  {name:<20} {:.2} %", acc * 100.0);
    }
    println!("confusion matrix (rows: true class, columns: predicted):");
    for row in &rep.confusion {
        println!("  {}", row.iter().map(|v| format!("{v:>5}")).collect::<String>());
    }
    Ok(())
}
