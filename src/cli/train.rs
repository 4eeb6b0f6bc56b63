use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Args;

use crate::error::{Error, Result};
use crate::train::device::{DeviceSpec, Precision, TrainDevice};
use crate::train::recipe::Recipe;
use crate::train::trainer::{self, TrainArgs};

#[derive(Args)]
pub struct TrainCmd {
    /// A bundled recipe (digits, cifar10, imagenet) or a TOML file; flags below override its fields.
    #[arg(long, default_value = "digits")]
    recipe: String,
    /// Run folder for checkpoints and metrics.jsonl (default: runs/<recipe>, numbered if taken).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint, exactly where it stopped.
    #[arg(long, conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// Dataset location: the CIFAR folder (or where to download it) or an ImageFolder root.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Fetch CIFAR-10/100 into --data (checksum verified) if it is not there yet.
    #[arg(long)]
    download: bool,
    #[arg(long)]
    arch: Option<String>,
    #[arg(long)]
    epochs: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    lr: Option<f32>,
    /// sgd, adam or adamw.
    #[arg(long)]
    optimizer: Option<String>,
    /// constant, step, multistep, cosine or onecycle.
    #[arg(long)]
    schedule: Option<String>,
    #[arg(long)]
    weight_decay: Option<f32>,
    #[arg(long)]
    label_smoothing: Option<f32>,
    #[arg(long)]
    mixup: Option<f32>,
    #[arg(long)]
    cutmix: Option<f32>,
    #[arg(long)]
    clip_grad_norm: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Data loader threads.
    #[arg(long)]
    workers: Option<usize>,
    /// Fine-tune from this torchvision-format checkpoint (.pth or .safetensors); the head is replaced when the
    /// dataset's class count differs.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Freeze the stem and the stages up to this one: stem, layer1, layer2, layer3 or layer4.
    #[arg(long)]
    freeze_until: Option<String>,
    /// Learning rate of the fc head relative to --lr.
    #[arg(long, default_value_t = 1.0)]
    head_lr_scale: f32,
    /// Skip (and count) steps whose gradients are not finite instead of stopping.
    #[arg(long)]
    skip_nonfinite: bool,
    /// Stop after this many optimiser steps in total, writing a checkpoint.
    #[arg(long)]
    max_steps: Option<u64>,
    /// One JSON object per epoch on stdout; progress goes to stderr.
    #[arg(long)]
    json: bool,
    /// Where the steps run: cpu, cuda, cuda:N, or auto (a GPU when this build has the `cuda` feature, finds one
    /// and the optimizer is SGD). Checkpoints are the same either way: a run resumes on any device.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// f32, or on a GPU tf32 (TF32 tensor-core convolutions and matrix products) or bf16 (mixed precision as
    /// PyTorch's autocast: bf16 activations and convolutions, fp32 master weights, optimiser state and BN statistics).
    #[arg(long, default_value = "f32")]
    dtype: Precision,
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

fn free_run_dir(name: &str) -> PathBuf {
    let base = Path::new("runs").join(name);
    (1..)
        .map(|i| if i == 1 { base.clone() } else { PathBuf::from(format!("{}-{i}", base.display())) })
        .find(|p| !p.exists())
        .unwrap_or(base)
}

pub fn run(a: TrainCmd) -> Result<()> {
    let mut r = Recipe::load(&a.recipe)?;
    set(&mut r.data, a.data.map(Some));
    set(&mut r.arch, a.arch);
    set(&mut r.epochs, a.epochs);
    set(&mut r.batch_size, a.batch_size);
    set(&mut r.lr, a.lr);
    set(&mut r.optimizer, a.optimizer);
    set(&mut r.schedule, a.schedule);
    set(&mut r.weight_decay, a.weight_decay);
    set(&mut r.label_smoothing, a.label_smoothing);
    set(&mut r.mixup_alpha, a.mixup);
    set(&mut r.cutmix_alpha, a.cutmix);
    set(&mut r.clip_grad_norm, a.clip_grad_norm);
    set(&mut r.seed, a.seed);
    set(&mut r.workers, a.workers);
    if r.batch_size == 0 || r.epochs == 0 {
        return Err(Error::invalid("--batch-size and --epochs must be at least 1"));
    }
    let device = TrainDevice { device: a.device, precision: a.dtype };
    // Before any download; a resumed run's own recipe is checked again by `run_on`.
    device.check(&r)?;
    if a.download {
        download(&r)?;
    }
    let resume = a.resume.is_some();
    let run_dir = match (a.resume, a.out) {
        (Some(dir), _) => dir,
        (None, Some(dir)) => dir,
        (None, None) => free_run_dir(Path::new(&a.recipe).file_stem().and_then(|s| s.to_str()).unwrap_or("run")),
    };
    let args = TrainArgs {
        recipe: r,
        run_dir: run_dir.clone(),
        resume,
        init: a.weights,
        freeze_until: a.freeze_until,
        head_lr_scale: a.head_lr_scale,
        skip_nonfinite: a.skip_nonfinite,
        max_steps: a.max_steps,
        json: a.json,
        interrupt: Some(interrupt_flag()?),
    };
    let reports = trainer::run_on(args, device)?;
    if let (false, Some(last)) = (a.json, reports.last()) {
        eprintln!(
            "held-out accuracy: top-1 {:.2} %, top-5 {:.2} % (checkpoints in {})",
            last.val_top1 * 100.0,
            last.val_top5 * 100.0,
            run_dir.display()
        );
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
    let kind = match r.dataset.as_str() {
        "cifar10" => CifarKind::Cifar10,
        "cifar100" => CifarKind::Cifar100,
        other => return Err(Error::invalid(format!("--download fetches cifar10 or cifar100, not '{other}'"))),
    };
    let dest = r.data.clone().ok_or_else(|| Error::invalid("--download needs --data DIR to download into"))?;
    let (url, md5) = crate::data::download::cifar_url(kind);
    crate::data::download::download_and_unpack(url, md5, &dest)?;
    Ok(())
}
