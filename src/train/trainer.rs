//! The training loop: data → forward → loss → backward → guard → clip → step, with evaluation, metrics,
//! checkpoints and exact resumption.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::checkpoint::{self, Position};
use super::monitor;
use super::optim::{Optimizer, OptimizerKind, clip_grad_norm};
use super::recipe::Recipe;
use super::schedule::Schedule;
use crate::data::Dataset;
use crate::data::loader::{self, LoaderConfig};
use crate::data::transforms::{BatchMix, Op, Pipeline, RandomErasing};
use crate::engine::cpu::Cpu;
use crate::engine::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::model::{Mode, ResNet, ResNetConfig};

pub struct TrainArgs {
    pub recipe: Recipe,
    pub run_dir: PathBuf,
    /// Continue the run in `run_dir` from its last checkpoint (the recipe stored there wins).
    pub resume: bool,
    /// Fine-tune from a torchvision-format checkpoint; the head is replaced when the class count differs.
    pub init: Option<PathBuf>,
    /// Freeze the stem and every stage up to and including this one ("stem", "layer1".."layer4").
    pub freeze_until: Option<String>,
    /// Learning-rate multiplier for the `fc` head.
    pub head_lr_scale: f32,
    pub skip_nonfinite: bool,
    /// Stop (with a checkpoint) after this many optimiser steps in total.
    pub max_steps: Option<u64>,
    /// One JSON object per epoch on stdout.
    pub json: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct EpochReport {
    pub epoch: u64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub val_loss: f64,
    pub val_top1: f64,
    pub val_top5: f64,
    pub images_per_s: f64,
    pub lr: f32,
    pub skipped_steps: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub per_class: Vec<f64>,
    /// confusion[true][predicted]
    pub confusion: Vec<Vec<u64>>,
}

/// Train and validation sets as the recipe names them.
pub fn datasets(r: &Recipe) -> Result<(Arc<dyn Dataset>, Arc<dyn Dataset>)> {
    use crate::data::cifar::{Cifar, CifarKind};
    use crate::data::folder::ImageFolder;
    let need_path = || {
        r.data.clone().ok_or_else(|| Error::invalid(format!("dataset '{}' needs --data PATH", r.dataset)))
    };
    match r.dataset.as_str() {
        "digits" => Ok(crate::data::digits::Digits::load()?.split(r.val_fraction, r.seed)),
        "cifar10" | "cifar100" => {
            let kind = if r.dataset == "cifar10" { CifarKind::Cifar10 } else { CifarKind::Cifar100 };
            let dir = need_path()?;
            Ok((Arc::new(Cifar::open(&dir, kind, true)?), Arc::new(Cifar::open(&dir, kind, false)?)))
        }
        "folder" => {
            let root = need_path()?;
            match ImageFolder::open_train_val(&root)? {
                Some(pair) => Ok(pair),
                None => Ok(ImageFolder::open(&root)?.split(r.val_fraction, r.seed)),
            }
        }
        other => Err(Error::invalid(format!("unknown dataset '{other}' (expected digits, cifar10, cifar100 or folder)"))),
    }
}

/// Training and evaluation preprocessing from the recipe.
pub fn pipelines(r: &Recipe) -> (Pipeline, Pipeline) {
    let size = r.image_size;
    let resize_crop = vec![Op::Resize { shorter: size * 8 / 7 }, Op::CenterCrop { size }];
    let fixed_size = r.dataset == "folder";
    let mut train = Vec::new();
    if r.random_resized_crop {
        train.push(Op::RandomResizedCrop { size, scale: (0.08, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0) });
    } else {
        if fixed_size {
            train.extend(resize_crop.iter().cloned());
        }
        if r.crop_padding > 0 {
            train.push(Op::RandomCrop { size, padding: r.crop_padding });
        }
    }
    if r.hflip {
        train.push(Op::HorizontalFlip { p: 0.5 });
    }
    if r.color_jitter > 0.0 {
        let j = r.color_jitter;
        train.push(Op::ColorJitter { brightness: j, contrast: j, saturation: j, hue: 0.0 });
    }
    let erasing =
        (r.random_erasing > 0.0).then_some(RandomErasing { p: r.random_erasing, scale: (0.02, 0.33), ratio: (0.3, 3.3) });
    let eval_ops = if fixed_size || r.random_resized_crop { resize_crop } else { Vec::new() };
    (
        Pipeline { ops: train, mean: r.mean, std: r.std, erasing },
        Pipeline { ops: eval_ops, mean: r.mean, std: r.std, erasing: None },
    )
}

fn optimizer_kind(r: &Recipe) -> Result<OptimizerKind> {
    let (beta1, beta2) = r.adam_betas;
    Ok(match r.optimizer.as_str() {
        "sgd" => OptimizerKind::Sgd { momentum: r.momentum, nesterov: r.nesterov },
        "adam" => OptimizerKind::Adam { beta1, beta2, eps: r.adam_eps },
        "adamw" => OptimizerKind::AdamW { beta1, beta2, eps: r.adam_eps },
        other => return Err(Error::invalid(format!("unknown optimizer '{other}' (expected sgd, adam or adamw)"))),
    })
}

fn schedule(r: &Recipe) -> Result<Schedule> {
    Ok(match r.schedule.as_str() {
        "constant" => Schedule::Constant,
        "step" => Schedule::Step { step_size: r.step_size.max(1), gamma: r.gamma },
        "multistep" => Schedule::MultiStep { milestones: r.milestones.clone(), gamma: r.gamma },
        "cosine" => Schedule::Cosine {
            warmup_epochs: r.warmup_epochs,
            warmup_start_factor: r.warmup_start_factor,
            min_lr: r.min_lr,
        },
        "onecycle" => Schedule::OneCycle {
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
            max_momentum: 0.95,
            base_momentum: 0.85,
        },
        other => {
            return Err(Error::invalid(format!(
                "unknown schedule '{other}' (expected constant, step, multistep, cosine or onecycle)"
            )));
        }
    })
}

/// The network to train: fresh from the recipe, or a checkpoint with its head replaced for `classes`.
fn build_model(r: &Recipe, classes: usize, init: Option<&Path>) -> Result<ResNet> {
    let arch = r.arch.parse()?;
    let Some(path) = init else {
        let config = ResNetConfig {
            stem: r.stem.parse()?,
            zero_init_residual: r.zero_init_residual,
            ..ResNetConfig::new(arch, classes)
        };
        return Ok(ResNet::new(config, r.seed));
    };
    let mut state = crate::weights::load_state_dict(path)?;
    let found = ResNetConfig::infer_from(arch, &state).map_err(|e| e.in_file(path))?;
    let config = ResNetConfig { num_classes: classes, ..found };
    let mut model = ResNet::new(config, r.seed);
    if found.num_classes != classes {
        // A new head for the new classes keeps its fresh initialisation.
        let fresh = model.state_dict();
        for key in ["fc.weight", "fc.bias"] {
            state.insert(key.to_string(), fresh[key].clone());
        }
    }
    model.load_state_dict(&state).map_err(|e| e.in_file(path))?;
    Ok(model)
}

fn freeze_prefixes(until: &str) -> Result<Vec<&'static str>> {
    const ORDER: [(&str, &[&str]); 5] = [
        ("stem", &["conv1.", "bn1."]),
        ("layer1", &["layer1."]),
        ("layer2", &["layer2."]),
        ("layer3", &["layer3."]),
        ("layer4", &["layer4."]),
    ];
    let last = ORDER
        .iter()
        .position(|(n, _)| *n == until)
        .ok_or_else(|| Error::invalid(format!("unknown --freeze-until '{until}' (expected stem or layer1..layer4)")))?;
    Ok(ORDER[..=last].iter().flat_map(|(_, p)| p.iter().copied()).collect())
}

/// Top-1/top-5 hits of a batch.
fn hits(logits: &Tensor, labels: &[usize]) -> (usize, usize) {
    let c = logits.shape()[1];
    let (mut top1, mut top5) = (0, 0);
    for (row, &l) in logits.data().chunks(c).zip(labels) {
        let better = row.iter().filter(|&&v| v > row[l]).count();
        top1 += (better == 0) as usize;
        top5 += (better < 5) as usize;
    }
    (top1, top5)
}

pub fn evaluate(model: &mut ResNet, be: &dyn Backend, ds: Arc<dyn Dataset>, pipe: Arc<Pipeline>, batch: usize, workers: usize) -> Result<EvalReport> {
    let classes = model.config.num_classes;
    let cfg = LoaderConfig { batch_size: batch, shuffle: false, drop_last: false, workers, seed: 0 };
    let (mut loss_sum, mut top1, mut top5, mut n) = (0.0f64, 0usize, 0usize, 0usize);
    let mut confusion = vec![vec![0u64; classes]; classes];
    for b in loader::batches(ds, pipe, None, &cfg, 0, 0) {
        let b = b?;
        let logits = model.forward(be, &b.images, Mode::Eval);
        let (loss, _) = be.softmax_cross_entropy(&logits, &b.targets);
        let (h1, h5) = hits(&logits, &b.labels);
        loss_sum += loss as f64 * b.labels.len() as f64;
        (top1, top5, n) = (top1 + h1, top5 + h5, n + b.labels.len());
        for (row, &l) in logits.data().chunks(classes).zip(&b.labels) {
            let pred = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0);
            confusion[l][pred] += 1;
        }
    }
    let n = n.max(1) as f64;
    let per_class = confusion.iter().enumerate().map(|(i, r)| r[i] as f64 / r.iter().sum::<u64>().max(1) as f64).collect();
    Ok(EvalReport { loss: loss_sum / n, top1: top1 as f64 / n, top5: top5 as f64 / n, per_class, confusion })
}

struct Metrics {
    file: std::fs::File,
    path: PathBuf,
}

impl Metrics {
    fn open(run_dir: &Path) -> Result<Metrics> {
        let path = run_dir.join("metrics.jsonl");
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::file(&path, e))?;
        Ok(Metrics { file, path })
    }
    fn write(&mut self, kind: &str, value: &impl Serialize) -> Result<()> {
        let mut obj = serde_json::to_value(value).map_err(Error::invalid)?;
        obj["type"] = kind.into();
        writeln!(self.file, "{obj}").map_err(|e| Error::file(&self.path, e))
    }
}

pub fn run(args: TrainArgs) -> Result<Vec<EpochReport>> {
    let be = Cpu;
    let last_path = args.run_dir.join("last.safetensors");
    let resumed = if args.resume { Some(checkpoint::load(&last_path)?) } else { None };
    let recipe = resumed.as_ref().map(|c| c.recipe.clone()).unwrap_or(args.recipe.clone());
    std::fs::create_dir_all(&args.run_dir).map_err(|e| Error::file(&args.run_dir, e))?;
    if !args.resume && last_path.exists() {
        return Err(Error::file(&args.run_dir, "already holds a run; pass --resume to continue it or choose another --out"));
    }

    let (train_ds, val_ds) = datasets(&recipe)?;
    if train_ds.is_empty() {
        return Err(Error::invalid("the training set is empty"));
    }
    let classes = train_ds.num_classes();
    let mut model = build_model(&recipe, classes, if resumed.is_some() { None } else { args.init.as_deref() })?;
    if let Some(until) = &args.freeze_until {
        model.set_trainable(&freeze_prefixes(until)?, false);
    }
    let groups = Optimizer::groups_for(&model.store.params, recipe.weight_decay, recipe.no_decay_bn_bias, args.head_lr_scale);
    let mut opt = Optimizer::new(optimizer_kind(&recipe)?, groups);
    let sched = schedule(&recipe)?;
    let mut pos = Position { best_top1: -1.0, ..Position::default() };
    if let Some(c) = &resumed {
        model.load_state_dict(&c.model).map_err(|e| e.in_file(&last_path))?;
        opt.load_state(&model.store.params, &c.optimizer, c.optimizer_steps).map_err(|e| e.in_file(&last_path))?;
        pos = c.position;
    }

    let (train_pipe, eval_pipe) = pipelines(&recipe);
    let (train_pipe, eval_pipe) = (Arc::new(train_pipe), Arc::new(eval_pipe));
    let mix = (recipe.mixup_alpha > 0.0 || recipe.cutmix_alpha > 0.0 || recipe.label_smoothing > 0.0).then_some(BatchMix {
        mixup_alpha: recipe.mixup_alpha,
        cutmix_alpha: recipe.cutmix_alpha,
        label_smoothing: recipe.label_smoothing,
    });
    let cfg = LoaderConfig { batch_size: recipe.batch_size, shuffle: true, drop_last: true, workers: recipe.workers, seed: recipe.seed };
    let steps_per_epoch = loader::num_batches(train_ds.len(), &cfg) as u64;
    if steps_per_epoch == 0 {
        return Err(Error::invalid(format!("batch size {} exceeds the {} training images", recipe.batch_size, train_ds.len())));
    }
    let mut metrics = Metrics::open(&args.run_dir)?;
    let save = |model: &ResNet, opt: &Optimizer, pos: &Position, path: &Path| -> Result<()> {
        if let Some(layer) = monitor::first_nonfinite_weight(&model.store.params) {
            return Err(Error::invalid(format!("refusing to save a checkpoint: weights of {layer} are not finite")));
        }
        checkpoint::save(path, model, opt, &recipe, pos)
    };

    let mut reports = Vec::new();
    let show = std::io::stderr().is_terminal();
    while pos.epoch < recipe.epochs {
        let bar = ProgressBar::with_draw_target(Some(steps_per_epoch), if show { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .map_err(Error::invalid)?
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{}", pos.epoch + 1, recipe.epochs));
        bar.set_position(pos.batch);
        let started = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        let mut lr = 0.0;
        let batches = loader::batches(train_ds.clone(), train_pipe.clone(), mix.clone(), &cfg, pos.epoch, pos.batch as usize);
        for batch in batches {
            let batch = batch?;
            lr = sched.lr(recipe.lr, pos.global_step, steps_per_epoch, recipe.epochs);
            let momentum = sched.momentum(pos.global_step, steps_per_epoch, recipe.epochs);
            model.store.zero_grad();
            let logits = model.forward(&be, &batch.images, Mode::Train);
            let (loss, dlogits) = be.softmax_cross_entropy(&logits, &batch.targets);
            model.backward(&be, &dlogits, false);
            let bad = monitor::first_nonfinite(&model.store.params).or_else(|| (!loss.is_finite()).then(|| "the loss".into()));
            if let Some(layer) = bad {
                if !args.skip_nonfinite {
                    bar.abandon();
                    return Err(Error::invalid(format!(
                        "step {}: non-finite gradient, first in {layer} (loss {loss}); lower the lr, clip gradients, or pass --skip-nonfinite",
                        pos.global_step
                    )));
                }
                pos.skipped += 1;
            } else {
                if recipe.clip_grad_norm > 0.0 {
                    clip_grad_norm(&mut model.store.params, recipe.clip_grad_norm);
                }
                let monitor_now = recipe.monitor_every > 0 && pos.global_step.is_multiple_of(recipe.monitor_every);
                let before: Vec<Vec<f32>> =
                    if monitor_now { model.store.params.iter().map(|p| p.value.data().to_vec()).collect() } else { Vec::new() };
                let norms = if monitor_now { monitor::grad_norms(&model.store.params) } else { Vec::new() };
                opt.step(&mut model.store.params, lr, momentum);
                if monitor_now {
                    metrics.write("grad", &monitor::report(pos.global_step, &model.store.params, &norms, &before))?;
                }
                let (h1, _) = hits(&logits, &batch.labels);
                loss_sum += loss as f64 * batch.labels.len() as f64;
                (correct, seen) = (correct + h1, seen + batch.labels.len());
            }
            pos.batch += 1;
            pos.global_step += 1;
            let ips = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_position(pos.batch);
            bar.set_message(format!("loss {:.4} acc {:.3} {:.0} img/s", loss_sum / seen.max(1) as f64, correct as f64 / seen.max(1) as f64, ips));
            if recipe.checkpoint_every > 0 && pos.global_step.is_multiple_of(recipe.checkpoint_every) {
                save(&model, &opt, &pos, &last_path)?;
            }
            if args.max_steps.is_some_and(|m| pos.global_step >= m) {
                bar.abandon();
                save(&model, &opt, &pos, &last_path)?;
                return Ok(reports);
            }
        }
        bar.finish_and_clear();
        let images_per_s = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let eval = evaluate(&mut model, &be, val_ds.clone(), eval_pipe.clone(), recipe.batch_size, recipe.workers)?;
        let report = EpochReport {
            epoch: pos.epoch + 1,
            train_loss: loss_sum / seen.max(1) as f64,
            train_top1: correct as f64 / seen.max(1) as f64,
            val_loss: eval.loss,
            val_top1: eval.top1,
            val_top5: eval.top5,
            images_per_s,
            lr,
            skipped_steps: pos.skipped,
        };
        metrics.write("epoch", &report)?;
        if args.json {
            println!("{}", serde_json::to_string(&report).map_err(Error::invalid)?);
        } else {
            eprintln!(
                "epoch {}/{}: train loss {:.4} acc {:.4} | val loss {:.4} top1 {:.4} top5 {:.4} | {:.0} img/s",
                report.epoch, recipe.epochs, report.train_loss, report.train_top1, report.val_loss, report.val_top1, report.val_top5, report.images_per_s
            );
        }
        pos.epoch += 1;
        pos.batch = 0;
        let improved = eval.top1 > pos.best_top1;
        if improved {
            pos.best_top1 = eval.top1;
        }
        save(&model, &opt, &pos, &last_path)?;
        if improved {
            save(&model, &opt, &pos, &args.run_dir.join("best.safetensors"))?;
        }
        reports.push(report);
    }
    Ok(reports)
}
