//! `resnet train`: pick the recipe (named, or recognised from `--data`), lay the flags over it, and run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Args;

use crate::error::{Error, Result};
use crate::target::TargetArgs;
use crate::train::defaults;
use crate::train::recipe::{DatasetKind, Recipe, RecipeFlags};
use crate::train::steps::train_job;
use crate::train::trainer::{self, TrainArgs};

#[derive(Args)]
pub struct TrainCmd {
    /// A bundled recipe (digits, cifar10, imagenet, folder) or a TOML file. Default: recognised from --data
    /// (an ImageFolder gets `folder` adapted to its images and to --weights; CIFAR batches get cifar10), else digits.
    #[arg(long)]
    recipe: Option<String>,
    /// Run folder for checkpoints and metrics.jsonl (default: runs/<recipe>, numbered if taken).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint, exactly where it stopped, with the recipe stored
    /// there (only --epochs, --max-steps, --device, --dtype and --json may be given with it).
    #[arg(long, conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// Fetch CIFAR-10/100 into --data (checksum verified) if it is not there yet.
    #[arg(long)]
    download: bool,
    /// Skip (and count) steps whose gradients are not finite instead of stopping.
    #[arg(long)]
    skip_nonfinite: bool,
    /// Data-parallel over MPI ranks: launch with `mpirun -n N resnet train --distributed ...` (builds with the
    /// `mpi` feature). --batch-size is per rank; rank 0 writes the checkpoints, metrics and report.
    #[arg(long)]
    distributed: bool,
    /// Stop after this many optimiser steps in total, writing a checkpoint.
    #[arg(long)]
    max_steps: Option<u64>,
    /// One JSON object per epoch on stdout; progress goes to stderr.
    #[arg(long)]
    json: bool,
    /// Where the steps run and in what arithmetic (on a GPU, bf16 is mixed precision as PyTorch's autocast: bf16
    /// activations and convolutions, fp32 master weights, optimiser state and BN statistics). Checkpoints are the
    /// same either way: a run resumes on any device.
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    fields: RecipeFlags,
}

fn free_run_dir(name: &str) -> PathBuf {
    let base = Path::new("runs").join(name);
    (1..)
        .map(|i| if i == 1 { base.clone() } else { PathBuf::from(format!("{}-{i}", base.display())) })
        .find(|p| !p.exists())
        .unwrap_or(base)
}

/// The recipe a fresh run trains with, for `world` data-parallel ranks (1: one process), its name (for the run
/// folder), and what the start-up line should add.
fn choose_recipe(a: &TrainCmd, world: usize) -> Result<(Recipe, String, Vec<String>)> {
    let f = &a.fields;
    let data = f.data.clone().flatten();
    let mut notes = Vec::new();
    let kind = match (&a.recipe, f.dataset, &data) {
        (Some(_), _, _) => None,
        (None, Some(kind), _) => Some(kind),
        (None, None, Some(path)) if a.download && !path.exists() => Some(DatasetKind::Cifar10),
        (None, None, Some(path)) => Some(defaults::detect(path)?),
        (None, None, None) => None,
    };
    let (mut r, name) = match (&a.recipe, kind) {
        (Some(name), _) => {
            let stem = Path::new(name).file_stem().and_then(|s| s.to_str()).unwrap_or("run").to_string();
            (Recipe::load(name)?, stem)
        }
        (None, kind) => {
            let kind = kind.unwrap_or(DatasetKind::Digits);
            (defaults::recipe_for(kind)?, kind.to_string())
        }
    };
    let folder_defaults = a.recipe.is_none() && r.dataset == DatasetKind::Folder;
    if let (true, None, Some(root)) = (folder_defaults, f.image_size, &data)
        && f.weights.clone().flatten().is_none()
    {
        let short = defaults::median_short_side(root)?;
        defaults::adapt_to_images(&mut r, short);
        notes.push(format!("images of median shorter side {short} px"));
    }
    if let Some(w) = f.weights.clone().flatten() {
        defaults::adapt_to_weights(&mut r, &w, folder_defaults)?;
    }
    let (base_lr, base_batch) = (r.lr, r.batch_size);
    f.apply(&mut r);
    // An RGB normalisation on a run for another channel count: its average, applied to every channel.
    for (given, values, flag) in [(f.mean.is_some(), &mut r.mean, "mean"), (f.std.is_some(), &mut r.std, "std")] {
        if !given && values.len() > 1 && values.len() != r.in_channels {
            let avg = crate::infer::card::channel_average(values);
            notes.push(format!("{flag} {avg} on each of the {} channels (--{flag} sets them)", r.in_channels));
            *values = vec![avg];
        }
    }
    // Linear scaling by the effective batch: the per-rank --batch-size times the data-parallel ranks.
    let effective = f.batch_size.unwrap_or(base_batch) * world;
    if f.lr.is_none() && effective != base_batch {
        r.lr = base_lr * effective as f32 / base_batch as f32;
        let why = if world > 1 {
            format!("an effective batch of {world} ranks x {}", r.batch_size)
        } else {
            format!("--batch-size {effective}")
        };
        notes.push(format!(
            "lr {} = {base_lr} x {effective}/{base_batch} (linear scaling for {why}; --lr sets it)",
            r.lr
        ));
    }
    r.validate()?;
    Ok((r, name, notes))
}

pub fn run(a: TrainCmd) -> Result<()> {
    let device = a.target.target();
    let comm = if a.distributed { Some(crate::train::distributed::world()?) } else { None };
    let lead = comm.as_ref().is_none_or(|c| c.rank() == 0);
    let resume = a.resume.is_some();
    let (recipe, run_dir, announce) = match &a.resume {
        Some(dir) => {
            let mut given = a.fields.given();
            given.retain(|flag| flag != "--epochs");
            if a.recipe.is_some() {
                given.push("--recipe".into());
            }
            if a.download {
                given.push("--download".into());
            }
            if a.skip_nonfinite {
                given.push("--skip-nonfinite".into());
            }
            if !given.is_empty() {
                return Err(Error::invalid(format!(
                    "--resume continues {} with the recipe stored in it, so {} cannot apply; only --epochs, --max-steps, --device, --dtype and --json can be given with --resume",
                    dir.display(),
                    given.join(", ")
                )));
            }
            (Recipe::default(), dir.clone(), None)
        }
        None => {
            let (r, name, notes) = choose_recipe(&a, comm.as_ref().map_or(1, |c| c.size()))?;
            // Before any download; the run checks it again.
            device.resolve(train_job(&r))?;
            if a.download {
                download(&r)?;
            }
            let dir = a.out.clone().unwrap_or_else(|| free_run_dir(&name));
            let extra = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) };
            (r.clone(), dir, Some(format!("training {}{extra}", r.summary())))
        }
    };
    let args = TrainArgs {
        recipe,
        run_dir: run_dir.clone(),
        resume,
        resume_epochs: if resume { a.fields.epochs } else { None },
        skip_nonfinite: a.skip_nonfinite,
        announce,
        max_steps: a.max_steps,
        json: a.json,
        interrupt: Some(interrupt_flag()?),
        comm,
    };
    let reports = trainer::run_on(args, device)?;
    if !lead {
        return Ok(());
    }
    if let (false, Some(last)) = (a.json, reports.last()) {
        let best = crate::train::checkpoint::load(&run_dir.join("best.safetensors"))?.position;
        eprintln!(
            "best held-out top-1 {:.2} % at epoch {} in {} (last epoch {}: {:.2} %; resume or extend with --resume {})",
            best.best_top1 * 100.0,
            best.best_epoch,
            run_dir.join("best.safetensors").display(),
            last.epoch,
            last.val_top1 * 100.0,
            run_dir.display()
        );
    }
    let report = run_dir.join(crate::report::FILE);
    if !a.json && report.exists() {
        eprintln!("report: {}", report.display());
    }
    Ok(())
}

/// A flag that Ctrl-C (or SIGTERM from a scheduler) sets: the loop then finishes its step, checkpoints and
/// stops. A second signal quits at once; the atomic checkpoint writes make even that lose only the current
/// step's work.
fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    ctrlc::set_handler(move || {
        if seen.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (press Ctrl-C again to quit at once)");
    })
    .map_err(|e| Error::invalid(format!("cannot install the Ctrl-C handler: {e}")))?;
    Ok(flag)
}

fn download(r: &crate::train::recipe::Recipe) -> Result<()> {
    use crate::data::cifar::CifarKind;
    let kind = match r.dataset {
        DatasetKind::Cifar10 => CifarKind::Cifar10,
        DatasetKind::Cifar100 => CifarKind::Cifar100,
        other => {
            return Err(Error::invalid(format!("--download fetches cifar10 or cifar100, not '{other}'")));
        }
    };
    let dest = r.data.clone().ok_or_else(|| Error::invalid("--download needs --data DIR to download into"))?;
    let (url, md5) = crate::data::download::cifar_url(kind);
    crate::data::download::download_and_unpack(url, md5, &dest)?;
    Ok(())
}
