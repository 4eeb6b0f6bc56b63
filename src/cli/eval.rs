//! `resnet eval`: a checkpoint's accuracy on a dataset's held-out split, with the preprocessing it carries.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::error::{Error, Result};
use crate::infer::runner::Runner;
use crate::model::Arch;
use crate::target::TargetArgs;
use crate::train::recipe::{DatasetKind, Recipe};
use crate::train::{checkpoint, defaults, evaluate, setup};

#[derive(Args)]
pub struct EvalCmd {
    /// A checkpoint: a training run's last/best.safetensors (its recipe, split and preprocessing are used) or any
    /// torchvision-format file.
    #[arg(long)]
    weights: PathBuf,
    /// Recipe for the dataset, split and preprocessing, instead of the checkpoint's (default for a file without
    /// one: recognised from --data, else digits).
    #[arg(long)]
    recipe: Option<String>,
    /// Dataset location, overriding the recipe's; the dataset kind is recognised from the folder.
    #[arg(long)]
    data: Option<PathBuf>,
    /// digits, cifar10, cifar100 or folder, when recognising it from --data is not wanted.
    #[arg(long, value_parser = <DatasetKind as crate::train::recipe::FlagValue>::parser())]
    dataset: Option<DatasetKind>,
    /// Read off the file; if given, it must agree.
    #[arg(long, value_parser = super::parse_arch)]
    arch: Option<Arch>,
    /// Evaluate the checkpoint's weight EMA (a run trained with --model-ema) instead of its live weights.
    #[arg(long)]
    ema: bool,
    #[command(flatten)]
    target: TargetArgs,
    /// Also list every image with its label and top-1 prediction.
    #[arg(long)]
    per_image: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: EvalCmd) -> Result<()> {
    let opened = checkpoint::open_model(&a.weights, a.arch, super::variant(a.ema))?;
    let detected = match (a.dataset, &a.data) {
        (Some(kind), _) => Some(kind),
        (None, Some(path)) => Some(defaults::detect(path)?),
        (None, None) => None,
    };
    let mut r = match (&a.recipe, &opened.recipe) {
        (Some(name), _) => Recipe::load(name)?,
        (None, Some(r)) => r.clone(),
        (None, None) => defaults::recipe_for(detected.unwrap_or(DatasetKind::Digits))?,
    };
    if let Some(kind) = detected {
        r.dataset = kind;
    }
    if let Some(d) = a.data {
        r.data = Some(d);
    }
    // The network's own preprocessing, unless a recipe was named for this evaluation.
    let pre = match &a.recipe {
        Some(_) => setup::preprocess(&r),
        None => opened.card.preprocess.clone(),
    };
    let model = opened.model;
    let (_, val) = setup::datasets(&r)?;
    let classes = val.num_classes();
    if classes != model.config.num_classes {
        return Err(Error::file(
            &a.weights,
            format!("has {} classes but the dataset has {classes}", model.config.num_classes),
        ));
    }
    let names = val.class_names();
    if let Some(trained) = opened.card.classes.as_ref().filter(|t| **t != names) {
        return Err(Error::file(&a.weights, format!("was trained on classes {trained:?}, the dataset has {names:?}")));
    }
    let size = pre.size as usize;
    let mut runner = Runner::open(model, a.target.target(), opened.calibration.as_ref(), r.batch_size, size, size)?;
    let rep = evaluate::evaluate_with(
        &mut |x| runner.forward(x),
        classes,
        val.clone(),
        Arc::new(pre.pipeline()),
        r.batch_size,
        r.workers,
    )?;
    // (file, label, prediction) of every image, with --per-image.
    let images: Vec<(String, &str, &str)> = if a.per_image {
        rep.predictions.iter().enumerate().map(|(i, &(l, p))| (val.source(i), &*names[l], &*names[p])).collect()
    } else {
        Vec::new()
    };
    let top5 = classes > 5;
    if a.json {
        let mut obj = serde_json::json!({"top1": rep.top1, "loss": rep.loss, "per_class": rep.per_class, "confusion": rep.confusion, "classes": names});
        if top5 {
            obj["top5"] = rep.top5.into();
        }
        if a.per_image {
            let images: Vec<_> = images
                .iter()
                .map(|(file, label, predicted)| serde_json::json!({"file": file, "label": label, "predicted": predicted}))
                .collect();
            obj["images"] = images.into();
        }
        println!("{obj}");
        return Ok(());
    }
    let top5 = if top5 { format!("  top-5 {:.2} %", rep.top5 * 100.0) } else { String::new() };
    println!("top-1 {:.2} %{top5}  loss {:.4}  ({} images)", rep.top1 * 100.0, rep.loss, rep.predictions.len());
    println!("per-class accuracy:");
    for (name, acc) in names.iter().zip(&rep.per_class) {
        println!("  {name:<20} {:.2} %", acc * 100.0);
    }
    println!("confusion matrix (rows: true class, columns: predicted):");
    for row in &rep.confusion {
        println!("  {}", row.iter().map(|v| format!("{v:>5}")).collect::<String>());
    }
    for (file, label, predicted) in &images {
        println!("{file}  label {label}  predicted {predicted}");
    }
    Ok(())
}
