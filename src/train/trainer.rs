//! The training loop: data → forward → loss → backward → guard → clip → step (→ weight EMA), with evaluation,
//! metrics, checkpoints, exact resumption and a clean stop on interrupt.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, Position};
use super::distributed::{self, Alone, Comm, DistributedSteps};
use super::ema::ModelEma;
use super::evaluate::{EvalReport, Recorded};
use super::monitor::{self, GradReport, LayerStats};
use super::optim::{Optimizer, clip_coefficient};
use super::recipe::Recipe;
use super::schedule::Schedule;
use super::setup;
use super::steps::{self, CpuSteps, Steps, train_job};
use crate::data::Dataset;
use crate::data::loader::{self, Batch, LoaderConfig, Shard};
use crate::data::transforms::{BatchMix, Pipeline};
use crate::error::{Error, Result};
use crate::model::ResNet;
use crate::target::{Resolved, Target};

pub struct TrainArgs {
    pub recipe: Recipe,
    pub run_dir: PathBuf,
    /// Continue the run in `run_dir` from its last checkpoint (the recipe stored there wins).
    pub resume: bool,
    /// With `resume`: extend (or shorten) the run to this many epochs; the schedule's horizon moves from the
    /// resumed step on, and `metrics.jsonl` gets a note saying so.
    pub resume_epochs: Option<u64>,
    pub skip_nonfinite: bool,
    /// Printed (to stderr) once the data has been checked and the device opened: the start-up line.
    pub announce: Option<String>,
    /// Stop (with a checkpoint) after this many optimiser steps in total.
    pub max_steps: Option<u64>,
    /// One JSON object per epoch on stdout.
    pub json: bool,
    /// Set (by a Ctrl-C handler, say) to stop after the current step with a checkpoint; `run` then fails with
    /// `Error::Interrupted`.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Data-parallel over these ranks (`mpirun -n N resnet train --distributed`: `distributed::world()`); None
    /// for one process.
    pub comm: Option<Arc<dyn Comm>>,
}

/// One epoch's figures: printed with `--json`, written to `metrics.jsonl` and read back by the report (fields
/// added later default when an older run's file lacks them).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochReport {
    pub epoch: u64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub val_loss: f64,
    pub val_top1: f64,
    pub val_top5: f64,
    pub images_per_s: f64,
    pub lr: f32,
    #[serde(default)]
    pub skipped_steps: u64,
    /// Wall time of the epoch: its steps and its evaluation (0: not recorded).
    #[serde(default)]
    pub seconds: f64,
    /// The weight EMA's evaluation on the same split (`--model-ema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_val_top1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_val_top5: Option<f64>,
}

/// What one optimiser step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepOutcome {
    /// The update was applied: the batch's loss and its number of top-1 hits.
    Applied { loss: f32, top1_hits: usize },
    /// Something went non-finite and `--skip-nonfinite` dropped the step: weights, optimiser state and BN
    /// running statistics are as before it.
    Skipped,
}

struct Metrics {
    /// None on the ranks other than 0 of a data-parallel run, which write nothing.
    file: Option<std::fs::File>,
    path: PathBuf,
}

impl Metrics {
    fn open(run_dir: &Path, writer: bool) -> Result<Metrics> {
        let path = run_dir.join("metrics.jsonl");
        if !writer {
            return Ok(Metrics { file: None, path });
        }
        drop_partial_line(&path)?;
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::file(&path, e))?;
        Ok(Metrics { file: Some(file), path })
    }
    fn write(&mut self, kind: &str, value: &impl Serialize) -> Result<()> {
        let Some(file) = &mut self.file else { return Ok(()) };
        let mut obj = serde_json::to_value(value).map_err(Error::invalid)?;
        obj["type"] = kind.into();
        writeln!(file, "{obj}").map_err(|e| Error::file(&self.path, e))
    }
}

/// A run killed mid-write leaves a last line without its newline; cut it so that every line stays JSON.
fn drop_partial_line(path: &Path) -> Result<()> {
    let Ok(text) = std::fs::read(path) else {
        return Ok(());
    };
    if text.is_empty() || text.ends_with(b"\n") {
        return Ok(());
    }
    let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let f = OpenOptions::new().write(true).open(path).map_err(|e| Error::file(path, e))?;
    f.set_len(keep as u64).map_err(|e| Error::file(path, e))
}

/// The network, the optimiser and where the run stands: everything a step changes and a checkpoint holds.
pub struct Trainer {
    pub model: ResNet,
    pub opt: Optimizer,
    pub recipe: Recipe,
    pub pos: Position,
    /// The training set's class names, written into every checkpoint's model card.
    pub class_names: Option<Vec<String>>,
    /// The weight EMA (`--model-ema`), kept on the host.
    pub ema: Option<ModelEma>,
    sched: Schedule,
    steps_per_epoch: u64,
    skip_nonfinite: bool,
    /// Where steps run. On a GPU the device holds the live state and `model`/`opt` are its copy as of the last
    /// `sync_host`; `host_stale` says a step has run since.
    steps: Box<dyn Steps>,
    host_stale: bool,
    /// `RESNET_DDP_CHECK=N`: compare the ranks' networks every N steps.
    check_every: Option<u64>,
    /// The data-parallel ranks (`Alone` for one process); rank 0 alone writes checkpoints.
    comm: Arc<dyn Comm>,
}

impl Trainer {
    /// Build the network and optimiser for `recipe` (from `init` when fine-tuning) over a training set with
    /// `classes` classes and `steps_per_epoch` batches per epoch.
    pub fn new(args: &TrainArgs, recipe: Recipe, classes: usize, steps_per_epoch: u64) -> Result<Trainer> {
        // A resumed run takes its weights from the checkpoint (`restore`), not from `--weights`.
        let init = if args.resume { None } else { recipe.weights.as_deref() };
        let mut model = setup::build_model(&recipe, classes, init)?;
        if let Some(until) = recipe.freeze_until {
            model.set_trainable(&setup::freeze_prefixes(until), false);
        }
        if let Some(path) = init
            && let Some(layer) = nonfinite_state(&model)
        {
            return Err(Error::file(path, format!("weights of {layer} are not finite")));
        }
        let groups = Optimizer::groups_for(
            &model.store.params,
            recipe.weight_decay,
            recipe.no_decay_bn_bias,
            recipe.head_lr_scale,
        );
        let opt = Optimizer::new(setup::optimizer_kind(&recipe), groups);
        let sched = setup::schedule(&recipe);
        let pos = Position { best_top1: -1.0, ranks: ranks(args).size() as u64, ..Position::default() };
        let ema = (recipe.model_ema > 0.0).then(|| ModelEma::new(&model, recipe.model_ema));
        Ok(Trainer {
            model,
            opt,
            recipe,
            pos,
            class_names: None,
            ema,
            sched,
            steps_per_epoch,
            skip_nonfinite: args.skip_nonfinite,
            steps: Box::new(CpuSteps::default()),
            host_stale: false,
            check_every: std::env::var("RESNET_DDP_CHECK").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0),
            comm: ranks(args),
        })
    }

    /// Run the following steps on `device`, starting from the model and optimiser state as they stand. Refuses
    /// (one line naming the flag) what that device cannot run.
    pub fn use_device(&mut self, device: Target) -> Result<()> {
        self.sync_host()?;
        let steps = steps::open(device, &self.model, &self.opt, &self.recipe)?;
        self.steps = if self.comm.size() > 1 {
            if self.recipe.sync_bn {
                self.model.sync_batch_norm(Some(Arc::new(distributed::RanksSum(self.comm.clone()))));
            }
            Box::new(DistributedSteps::new(steps, self.comm.clone(), &mut self.model))
        } else {
            steps
        };
        Ok(())
    }

    /// The device the steps run on (a GPU, the CPU in bf16), or None on the CPU in f32.
    pub fn device_name(&self) -> Option<String> {
        self.steps.device_name()
    }

    /// Bring the GPU's weights, statistics and momentum into `model` and `opt` (a no-op on the CPU).
    pub fn sync_host(&mut self) -> Result<()> {
        if self.host_stale {
            self.steps.sync_host(&mut self.model, &mut self.opt)?;
        }
        self.host_stale = false;
        Ok(())
    }

    /// Evaluate the current network on `ds` where the steps run.
    pub fn evaluate(&mut self, ds: Arc<dyn Dataset>, pipe: Arc<Pipeline>) -> Result<EvalReport> {
        self.sync_host()?;
        let (batch, workers) = (self.recipe.batch_size, self.recipe.workers);
        self.steps.evaluate(&mut self.model, ds, pipe, batch, workers)
    }

    /// Evaluate the weight EMA, if the run keeps one, on `ds` where the steps run.
    pub fn evaluate_ema(&mut self, ds: Arc<dyn Dataset>, pipe: Arc<Pipeline>) -> Result<Option<EvalReport>> {
        let (batch, workers) = (self.recipe.batch_size, self.recipe.workers);
        match &mut self.ema {
            Some(ema) => Ok(Some(self.steps.evaluate(&mut ema.model, ds, pipe, batch, workers)?)),
            None => Ok(None),
        }
    }

    /// Put the network, optimiser state and position of a checkpoint in place.
    fn restore(&mut self, c: &checkpoint::Checkpoint, path: &Path) -> Result<()> {
        self.model.load_state_dict(&c.model).map_err(|e| e.in_file(path))?;
        self.opt.load_state(&self.model.store.params, &c.optimizer, c.optimizer_steps).map_err(|e| e.in_file(path))?;
        self.pos = c.position;
        match (&mut self.ema, &c.ema) {
            (Some(ema), Some((state, n))) => ema.restore(state, *n).map_err(|e| e.in_file(path))?,
            (Some(_), None) => return Err(Error::file(path, "holds no weight EMA, but its recipe keeps one")),
            (None, _) => {}
        }
        Ok(())
    }

    pub fn lr(&self) -> f32 {
        self.sched.lr(self.recipe.lr, self.pos.global_step, self.steps_per_epoch, self.recipe.epochs)
    }

    /// One optimiser step on `batch`, on whichever target runs the steps: forward and backward, the numeric
    /// guard, clipping, the update and the monitor. A non-finite loss, activation, running statistic or gradient
    /// stops the run with an error naming the step and where it started, or with `skip_nonfinite` drops the step
    /// and leaves every weight, optimiser state and running statistic as it was.
    /// Also returns the gradient statistics when the recipe's `monitor_every` asks for them at this step.
    pub fn step(&mut self, batch: &Batch) -> Result<(StepOutcome, Option<GradReport>)> {
        let lr = self.lr();
        let momentum = self.sched.momentum(self.pos.global_step, self.steps_per_epoch, self.recipe.epochs);
        let monitor_now = self.monitor_now();
        self.host_stale = true;
        let (model, steps) = (&mut self.model, &mut self.steps);
        let check = steps.forward_backward(model, batch, self.skip_nonfinite)?;
        let done = if !check.finite() {
            if !self.skip_nonfinite {
                let cause = steps.diagnose(model, batch, &check)?;
                return Err(self.nonfinite_error(&cause, check.loss));
            }
            steps.drop_step(model)?;
            self.pos.skipped += 1;
            (StepOutcome::Skipped, None)
        } else {
            let max = self.recipe.clip_grad_norm;
            let clip = if max > 0.0 { clip_coefficient(check.grad_norm(), max) } else { None };
            if let Some(c) = clip {
                steps.scale_gradients(model, c)?;
            }
            // The monitor reads the gradients after clipping.
            let grads = match (monitor_now, clip) {
                (true, Some(_)) => steps.grad_sumsq(model)?,
                _ => check.grad_sumsq,
            };
            let weights = steps.update(model, &mut self.opt, lr, momentum, monitor_now)?;
            let report = weights.map(|weights| self.report(lr, check.loss, &grads, &weights));
            self.update_ema()?;
            (StepOutcome::Applied { loss: check.loss, top1_hits: check.top1_hits }, report)
        };
        self.pos.batch += 1;
        self.pos.global_step += 1;
        if self.check_every.is_some_and(|n| self.pos.global_step.is_multiple_of(n)) {
            self.sync_host()?;
            distributed::check_identical(self.comm.as_ref(), &self.model, self.pos.global_step)?;
        }
        Ok(done)
    }

    /// After an applied step: the weight EMA's update when this batch of the epoch is due one (`ema.rs`).
    fn update_ema(&mut self) -> Result<()> {
        if self.ema.is_none() || !self.pos.batch.is_multiple_of(self.recipe.model_ema_steps) {
            return Ok(());
        }
        self.sync_host()?;
        let warming_up = self.pos.epoch < self.recipe.warmup_epochs;
        if let Some(ema) = &mut self.ema {
            ema.update(&self.model);
            if warming_up {
                ema.n_averaged = 0;
            }
        }
        Ok(())
    }

    /// The monitor's record of this step: per-parameter gradient sums of squares (store order) and, per
    /// trainable parameter, the updated weight's and the update's sums of squares.
    fn report(&self, lr: f32, loss: f32, grad_sumsq: &[f64], weights: &[(f64, f64)]) -> GradReport {
        let grad_norms: Vec<f64> = grad_sumsq.iter().map(|g| g.sqrt()).collect();
        let layers = self
            .model
            .store
            .params
            .iter()
            .zip(&grad_norms)
            .filter(|(p, _)| p.trainable)
            .zip(weights)
            .map(|((p, &g), &(w, d))| LayerStats::new(p.name.clone(), g, w.sqrt(), d.sqrt()))
            .collect();
        GradReport::new(self.pos.global_step, lr, loss, &grad_norms, layers)
    }

    fn monitor_now(&self) -> bool {
        let every = self.recipe.monitor_every;
        every > 0 && self.pos.global_step.is_multiple_of(every)
    }

    fn nonfinite_error(&self, cause: &str, loss: f32) -> Error {
        Error::invalid(format!(
            "step {}: {cause} (loss {loss}); lower the lr, clip gradients, check the data, or pass --skip-nonfinite",
            self.pos.global_step
        ))
    }

    /// Write a checkpoint (of the GPU's state, on a GPU), refusing one that would carry a NaN or an infinity.
    /// In a data-parallel run rank 0 writes it and the others, which hold the same state, write nothing.
    pub fn save(&mut self, path: &Path) -> Result<()> {
        if self.comm.rank() != 0 {
            return Ok(());
        }
        self.sync_host()?;
        if let Some(layer) = nonfinite_state(&self.model) {
            return Err(Error::file(path, format!("refusing to save a checkpoint: {layer} is not finite")));
        }
        let card = setup::card(&self.recipe, self.class_names.clone());
        checkpoint::save(path, &self.model, &self.opt, self.ema.as_ref(), &self.recipe, &self.pos, &card)
    }
}

/// The first parameter or buffer (in forward order) holding a NaN or an infinity, as a layer name.
fn nonfinite_state(model: &ResNet) -> Option<String> {
    monitor::first_nonfinite_weight(&model.store.params)
        .or_else(|| monitor::first_nonfinite_buffer(&model.store.buffers))
}

fn interrupted(flag: &Option<Arc<AtomicBool>>) -> bool {
    flag.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
}

/// The data-parallel ranks a run trains on: `args.comm`, or this process alone.
fn ranks(args: &TrainArgs) -> Arc<dyn Comm> {
    args.comm.clone().unwrap_or_else(|| Arc::new(Alone))
}

/// Train on the CPU: `run_on(args, Target::CPU)`.
pub fn run(args: TrainArgs) -> Result<Vec<EpochReport>> {
    run_on(args, Target::CPU)
}

/// A run folder this call created: removed again if the run stops before its first checkpoint (a dataset that
/// does not load, a GPU that does not open), so a failed start leaves nothing behind. `remove_dir` only removes
/// an empty folder.
struct FreshDir<'a> {
    path: &'a std::path::Path,
    armed: bool,
}

impl Drop for FreshDir<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_dir(self.path);
        }
    }
}

/// Train with the steps on `device`; checkpoints are the same whichever device wrote them, so a run resumes on
/// any device.
pub fn run_on(args: TrainArgs, device: Target) -> Result<Vec<EpochReport>> {
    let comm = ranks(&args);
    let (rank, world) = (comm.rank(), comm.size());
    if world > 1 && matches!(device.resolve(train_job(&args.recipe)), Ok(Resolved::Gpu { .. })) {
        return Err(Error::invalid(
            "--distributed runs CPU ranks so far; data-parallel on GPUs (NCCL) is not built yet: use --device cpu",
        ));
    }
    let last_path = args.run_dir.join("last.safetensors");
    let resumed = if args.resume { Some(checkpoint::load(&last_path)?) } else { None };
    let mut recipe = resumed.as_ref().map(|c| c.recipe.clone()).unwrap_or(args.recipe.clone());
    let mut notes = Vec::new();
    if let (Some(c), Some(epochs)) = (&resumed, args.resume_epochs) {
        if epochs < c.position.epoch || epochs == 0 {
            return Err(Error::file(
                &args.run_dir,
                format!(
                    "has already trained {} epochs; --epochs {epochs} cannot shorten it below that",
                    c.position.epoch
                ),
            ));
        }
        if epochs != recipe.epochs {
            notes.push(format!(
                "epochs changed from {} to {epochs} at step {} (epoch {}): the schedule's horizon moves from here on",
                recipe.epochs, c.position.global_step, c.position.epoch
            ));
            recipe.epochs = epochs;
        }
    }
    if let Some(c) = &resumed
        && c.position.epoch >= recipe.epochs
    {
        eprintln!(
            "{}: the run is finished ({} of {} epochs, best top-1 {:.2} %); extend it with: resnet train --resume {} --epochs N",
            args.run_dir.display(),
            c.position.epoch,
            recipe.epochs,
            c.position.best_top1.max(0.0) * 100.0,
            args.run_dir.display()
        );
        return Ok(Vec::new());
    }
    recipe.validate()?;
    device.resolve(train_job(&recipe))?;
    if !args.resume && last_path.exists() && rank == 0 {
        return Err(Error::file(
            &args.run_dir,
            "already holds a run; pass --resume to continue it or choose another --out",
        ));
    }
    // Everything about the data is checked before the run folder exists.
    let (train_ds, val_ds) = setup::datasets(&recipe)?;
    setup::check_datasets(&recipe, train_ds.as_ref(), val_ds.as_ref())?;
    // A training set smaller than one batch runs as one partial batch (PyTorch's drop_last=False); otherwise
    // the last incomplete batch is dropped, so every step sees a full batch.
    let drop_last = train_ds.len() >= recipe.batch_size;
    let cfg = LoaderConfig {
        batch_size: recipe.batch_size,
        shuffle: true,
        drop_last,
        workers: recipe.workers,
        seed: recipe.seed,
        shard: Shard { rank, world },
    };
    let steps_per_epoch = loader::num_batches(train_ds.len(), &cfg) as u64;
    let mut t = Trainer::new(&args, recipe.clone(), train_ds.num_classes(), steps_per_epoch)?;
    t.class_names = Some(train_ds.class_names());

    let mut fresh = FreshDir { path: &args.run_dir, armed: !args.run_dir.exists() };
    std::fs::create_dir_all(&args.run_dir).map_err(|e| Error::file(&args.run_dir, e))?;
    if rank == 0 {
        crate::weights::remove_stale_temporaries(&args.run_dir, &["last.safetensors", "best.safetensors"]);
    }
    if let Some(c) = &resumed {
        t.restore(c, &last_path)?;
        notes.extend(t.pos.rescale(world as u64, recipe.batch_size as u64, steps_per_epoch));
    }
    t.use_device(device)?;
    // Everything that can refuse the run has run: say what it trains.
    if let Some(line) = &args.announce
        && rank == 0
    {
        eprintln!("{line}");
    }
    if world > 1 && rank == 0 {
        eprintln!(
            "data-parallel over {world} ranks: batch {} per rank, effective batch {}, lr {}, batch norm over {}",
            recipe.batch_size,
            recipe.batch_size * world,
            recipe.lr,
            if recipe.sync_bn { "the effective batch (--sync-bn)" } else { "each rank's batch" }
        );
    }
    if let Some(name) = t.device_name() {
        eprintln!("training on {name}");
    }
    if resumed.is_none() {
        // A checkpoint before the first step: from here on the folder always holds one to resume from.
        t.save(&last_path)?;
    }
    fresh.armed = false;
    // From here on the folder holds a checkpoint: however the epochs end (done, interrupted, stopped at
    // --max-steps or by an error), the report is brought up to date.
    let outcome = (|| -> Result<Vec<EpochReport>> {
        let (train_pipe, eval_pipe) = setup::pipelines(&recipe);
        let (train_pipe, eval_pipe) = (Arc::new(train_pipe), Arc::new(eval_pipe));
        let mix = (recipe.mixup_alpha > 0.0 || recipe.cutmix_alpha > 0.0 || recipe.label_smoothing > 0.0).then_some(
            BatchMix {
                mixup_alpha: recipe.mixup_alpha,
                cutmix_alpha: recipe.cutmix_alpha,
                label_smoothing: recipe.label_smoothing,
            },
        );
        let mut metrics = Metrics::open(&args.run_dir, rank == 0)?;
        for message in &notes {
            metrics.write("note", &serde_json::json!({ "step": t.pos.global_step, "message": message }))?;
            if rank == 0 {
                eprintln!("{message}");
            }
        }
        let show_top5 = train_ds.num_classes() > 5;
        let stop = |t: &mut Trainer, bar: &ProgressBar| -> Result<Vec<EpochReport>> {
            bar.abandon();
            t.save(&last_path)?;
            Err(Error::Interrupted { step: t.pos.global_step, run_dir: args.run_dir.clone() })
        };

        let mut reports = Vec::new();
        let show = std::io::stderr().is_terminal() && rank == 0;
        while t.pos.epoch < recipe.epochs {
            let bar = ProgressBar::with_draw_target(
                Some(steps_per_epoch),
                if show { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
            );
            bar.set_style(
                ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                    .map_err(Error::invalid)?
                    .progress_chars("=> "),
            );
            bar.set_prefix(format!("{}/{}", t.pos.epoch + 1, recipe.epochs));
            bar.set_position(t.pos.batch);
            let started = Instant::now();
            let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
            let lr = t.lr();
            let batches = loader::batches(
                train_ds.clone(),
                train_pipe.clone(),
                mix.clone(),
                &cfg,
                t.pos.epoch,
                t.pos.batch as usize,
            );
            for batch in batches {
                // Every rank stops after the same step, whichever rank was interrupted.
                if distributed::any(comm.as_ref(), interrupted(&args.interrupt))? {
                    return stop(&mut t, &bar);
                }
                let batch = batch?;
                let (outcome, grad_report) = t.step(&batch).inspect_err(|_| bar.abandon())?;
                if let Some(r) = grad_report {
                    metrics.write("grad", &r)?;
                }
                if let StepOutcome::Applied { loss, top1_hits } = outcome {
                    // Loss and hits are over every rank's batch (`DistributedSteps`), of equal sizes.
                    let images = batch.labels.len() * world;
                    loss_sum += loss as f64 * images as f64;
                    (correct, seen) = (correct + top1_hits, seen + images);
                }
                let ips = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
                bar.set_position(t.pos.batch);
                bar.set_message(format!(
                    "loss {:.4} acc {:.3} {:.0} img/s",
                    loss_sum / seen.max(1) as f64,
                    correct as f64 / seen.max(1) as f64,
                    ips
                ));
                if recipe.checkpoint_every > 0 && t.pos.global_step.is_multiple_of(recipe.checkpoint_every) {
                    t.save(&last_path)?;
                }
                if args.max_steps.is_some_and(|m| t.pos.global_step >= m) {
                    bar.abandon();
                    t.save(&last_path)?;
                    return Ok(reports);
                }
            }
            bar.finish_and_clear();
            let images_per_s = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let eval = t.evaluate(val_ds.clone(), eval_pipe.clone())?;
            let ema_eval = t.evaluate_ema(val_ds.clone(), eval_pipe.clone())?;
            let report = EpochReport {
                epoch: t.pos.epoch + 1,
                train_loss: loss_sum / seen.max(1) as f64,
                train_top1: correct as f64 / seen.max(1) as f64,
                val_loss: eval.loss,
                val_top1: eval.top1,
                val_top5: eval.top5,
                images_per_s,
                lr,
                skipped_steps: t.pos.skipped,
                seconds: started.elapsed().as_secs_f64(),
                ema_val_loss: ema_eval.as_ref().map(|e| e.loss),
                ema_val_top1: ema_eval.as_ref().map(|e| e.top1),
                ema_val_top5: ema_eval.as_ref().map(|e| e.top5),
            };
            metrics.write("epoch", &report)?;
            if rank > 0 {
                // the other ranks print nothing: rank 0 speaks for the run
            } else if args.json {
                println!("{}", serde_json::to_string(&report).map_err(Error::invalid)?);
            } else {
                let top5 = if show_top5 { format!(" top5 {:.4}", report.val_top5) } else { String::new() };
                let ema = match &ema_eval {
                    Some(e) => format!(" | ema loss {:.4} top1 {:.4}", e.loss, e.top1),
                    None => String::new(),
                };
                eprintln!(
                    "epoch {}/{}: train loss {:.4} acc {:.4} | val loss {:.4} top1 {:.4}{top5}{ema} | {:.0} img/s",
                    report.epoch,
                    recipe.epochs,
                    report.train_loss,
                    report.train_top1,
                    report.val_loss,
                    report.val_top1,
                    report.images_per_s
                );
            }
            t.pos.epoch += 1;
            t.pos.batch = 0;
            let improved = eval.top1 > t.pos.best_top1;
            if improved {
                t.pos.best_top1 = eval.top1;
                t.pos.best_epoch = t.pos.epoch;
            }
            t.save(&last_path)?;
            if improved {
                // The state just saved is the best one: a second name for last's file, not a second write of
                // 170 MB (ResNet-34 with its momentum: 0.46 s of each improving epoch's disk time here).
                let best = args.run_dir.join("best.safetensors");
                if rank > 0 || crate::files::link_atomic(&last_path, &best).is_err() {
                    t.save(&best)?;
                }
                if rank == 0 {
                    Recorded::new(t.pos.epoch, train_ds.class_names(), &eval).save(&args.run_dir)?;
                }
            }
            reports.push(report);
            if distributed::any(comm.as_ref(), interrupted(&args.interrupt))? && t.pos.epoch < recipe.epochs {
                return stop(&mut t, &ProgressBar::hidden());
            }
        }
        Ok(reports)
    })();
    if rank == 0
        && let Err(e) = crate::report::write(&args.run_dir)
    {
        eprintln!("the run's report was not written: {e}");
    }
    outcome
}
