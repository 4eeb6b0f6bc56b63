use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

use super::parse_arch;
use crate::data::loader::Batch;
use crate::engine::{Tensor, one_hot};
use crate::error::{Error, Result};
use crate::infer::quantize::{self, Method};
use crate::infer::runner::Runner;
use crate::model::{Arch, ResNet, ResNetConfig, Stem};
use crate::target::{Job, Precision, Resolved, Target, TargetArgs};
use crate::train::distributed::{self, Comm, DistributedSteps};
use crate::train::optim::{Optimizer, OptimizerKind};
use crate::train::steps::{CpuSteps, Steps};

#[derive(Args)]
pub struct BenchCmd {
    /// infer (eval-mode forward) or train (one SGD-momentum step: forward, loss, backward, update).
    #[arg(long, default_value = "infer")]
    workload: String,
    /// imagenet (7x7/2 conv + max-pool) or cifar (3x3/1 conv) stem (default: imagenet for infer, cifar for train).
    #[arg(long)]
    stem: Option<Stem>,
    /// Output classes (default: 1000 for infer, 10 for train).
    #[arg(long)]
    classes: Option<usize>,
    #[arg(long, default_value = "resnet34", value_parser = parse_arch)]
    arch: Arch,
    /// Images per batch (default: 8 for infer, 64 for train).
    #[arg(long)]
    batch: Option<usize>,
    /// Input height and width (default: 224 for infer, 32 for train).
    #[arg(long)]
    size: Option<usize>,
    #[command(flatten)]
    target: TargetArgs,
    /// Timed runs (after `--warmup` untimed ones).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// One JSON line: median_ms, min_ms, max_ms, images_per_s, peak_rss_mib.
    #[arg(long)]
    json: bool,
    /// --workload train on MPI ranks (`mpirun -n N resnet bench --workload train --distributed`, feature `mpi`):
    /// each step's gradients averaged over the ranks, as `train --distributed` does; --batch is per rank, and
    /// rank 0 reports the images/s of all ranks and the share of the step spent waiting for the all-reduce
    /// after backward (what overlapping it with backward did not hide).
    #[arg(long)]
    distributed: bool,
}

/// Peak resident memory of this process (VmHWM), in MiB; None where /proc is not available.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn run(a: BenchCmd) -> Result<()> {
    let train = match a.workload.as_str() {
        "infer" => false,
        "train" => true,
        other => return Err(Error::invalid(format!("unknown workload '{other}' (expected infer or train)"))),
    };
    let batch = a.batch.unwrap_or(if train { 64 } else { 8 }).max(1);
    let size = a.size.unwrap_or(if train { 32 } else { 224 }).max(8);
    let runs = a.runs.max(1);
    let mut device = "cpu".to_string();
    let stem = a.stem.unwrap_or(if train { Stem::Cifar } else { Stem::ImageNet });
    let classes = a.classes.unwrap_or(if train { 10 } else { 1000 }).max(1);
    let target = a.target.target();
    if a.distributed && (!train || !matches!(target.resolve(Job::Train { optimizer: "sgd" })?, Resolved::Cpu(_))) {
        return Err(Error::invalid("--distributed times the CPU training step: give --workload train --device cpu"));
    }
    let comm: Arc<dyn Comm> = if a.distributed { distributed::world()? } else { Arc::new(distributed::Alone) };
    let comm_ms = Rc::new(RefCell::new(Vec::new()));
    let mut model = ResNet::new(ResNetConfig { stem, ..ResNetConfig::new(a.arch, classes) }, 0);
    // Deterministic, image-like input; the values do not change the work done.
    let x = Tensor::new(
        &[batch, 3, size, size],
        (0..batch * 3 * size * size).map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0).collect(),
    )?;
    let setup = Instant::now();
    let mut runner = None;
    let targets = one_hot(&(0..batch).map(|i| i % classes).collect::<Vec<_>>(), classes, 0.0);
    let kind = OptimizerKind::Sgd { momentum: 0.9, nesterov: false };
    let groups = Optimizer::groups_for(&model.store.params, 5e-4, false, 1.0);
    let train_on =
        if train { Some(train_on(&model, target, (batch, size), (&x, &targets), kind, &groups)?) } else { None };
    let mut step: Box<dyn FnMut() -> Result<()>> = if let Some(TrainOn::Gpu(name, gpu_step)) = train_on {
        device = name;
        gpu_step
    } else if let Some(TrainOn::Cpu(precision)) = train_on {
        // The training loop's own steps (`CpuSteps`, and over ranks `DistributedSteps` with its bucketed,
        // overlapped all-reduce), so the figure is the one `resnet train` runs at.
        let mut opt = Optimizer::new(kind, groups);
        let data = Batch { images: x.clone(), targets, labels: (0..batch).map(|i| i % classes).collect() };
        let mut ddp = if comm.size() > 1 {
            Some(DistributedSteps::new(Box::new(CpuSteps::new(precision)?), comm.clone(), &mut model))
        } else {
            None
        };
        let mut alone = CpuSteps::new(precision)?;
        let comm_ms = comm_ms.clone();
        Box::new(move || {
            let before = ddp.as_ref().map(|d| d.exposed_communication);
            let steps: &mut dyn Steps = match &mut ddp {
                Some(d) => d,
                None => &mut alone,
            };
            steps.forward_backward(&mut model, &data, false)?;
            steps.update(&mut model, &mut opt, 0.01, None, false)?;
            if let (Some(d), Some(before)) = (&ddp, before) {
                comm_ms.borrow_mut().push((d.exposed_communication - before).as_secs_f64() * 1000.0);
            }
            Ok(())
        })
    } else {
        // int8 with the calibration of the timed batch itself (the weights are random: what is timed is the work).
        let calibration = match target.precision {
            Precision::Int8 => Some(quantize::calibrate(ResNet::new(model.config, 0), Method::Minmax, |see| {
                see(&x);
                Ok(())
            })?),
            _ => None,
        };
        let runner = runner.insert(Runner::open(model, target, calibration.as_ref(), batch, size, size)?);
        device = runner.describe();
        runner.timed_forward(&x)?
    };
    for _ in 0..a.warmup {
        step()?;
    }
    // Construction (uploads, cuDNN's algorithm search) and the warm-up runs: what a user waits before full speed.
    let setup_ms = setup.elapsed().as_secs_f64() * 1000.0;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        step()?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let median = if runs % 2 == 1 { times[runs / 2] } else { (times[runs / 2 - 1] + times[runs / 2]) / 2.0 };
    let world = comm.size();
    let ips = (batch * world) as f64 * 1000.0 / median;
    let rss = peak_rss_mib();
    // The exposed all-reduce's share of the timed steps (the warm-up's are left out), as rank 0 saw it.
    let comm_ms = comm_ms.borrow();
    let comm_share =
        (world > 1).then(|| comm_ms[comm_ms.len() - runs..].iter().sum::<f64>() / times.iter().sum::<f64>());
    if comm.rank() > 0 {
        return Ok(());
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "workload": a.workload, "arch": a.arch.name, "batch": batch, "size": size, "dtype": target.precision.to_string(),
                "threads": rayon::current_num_threads(), "device": device, "median_ms": median, "min_ms": times[0],
                "max_ms": times[runs - 1], "images_per_s": ips, "peak_rss_mib": rss, "setup_ms": setup_ms,
                "ranks": world, "allreduce_share": comm_share,
            })
        );
    } else {
        println!(
            "{} {} batch {batch} at {size}x{size} on {device} ({} threads): median {median:.1} ms, min {:.1}, max {:.1} over {runs} runs; {ips:.1} images/s; peak RSS {}; setup and warm-up {:.1} s",
            a.arch,
            a.workload,
            rayon::current_num_threads(),
            times[0],
            times[runs - 1],
            rss.map(|r| format!("{r:.0} MiB")).unwrap_or_else(|| "n/a".into()),
            setup_ms / 1000.0
        );
        if let Some(share) = comm_share {
            println!(
                "data-parallel over {world} ranks (batch {batch} each): images/s of all ranks; waiting for the all-reduce after backward {:.1} % of the step",
                100.0 * share
            );
        }
    }
    Ok(())
}

/// One timed run of a workload.
type TimedStep = Box<dyn FnMut() -> Result<()>>;

/// Where `--workload train` runs: a device-resident step on a GPU (the batch staged once, each call one whole SGD
/// step on it, waiting for the device), or the CPU in a precision (`--device cpu`, or `auto` without a GPU).
enum TrainOn {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Gpu(String, TimedStep),
    Cpu(Precision),
}

fn train_on(
    model: &ResNet,
    target: Target,
    (batch, size): (usize, usize),
    (x, targets): (&Tensor, &Tensor),
    kind: OptimizerKind,
    groups: &[crate::train::optim::ParamGroup],
) -> Result<TrainOn> {
    let cpu = |(), precision| Ok(TrainOn::Cpu(precision));
    #[cfg(feature = "cuda")]
    let gpu = |&(): &(), index, precision| {
        use crate::exec::cuda::{CudaTrainer, TrainOptimizer};
        let optimizer = TrainOptimizer { kind, groups: groups.to_vec() };
        let mut trainer = CudaTrainer::new(model, index, batch, size, size, precision, optimizer)?;
        let n = trainer.stage(x, targets)?;
        let name = trainer.device_name();
        let step: TimedStep = Box::new(move || trainer.step_staged(n, 0.01).map(drop));
        Ok(TrainOn::Gpu(name, step))
    };
    #[cfg(not(feature = "cuda"))]
    let gpu = |&(): &(), _, _| {
        let _ = (model, batch, size, x, targets, kind, groups);
        Err(Error::invalid(crate::target::NO_GPU_BUILD))
    };
    target.resolve(Job::Train { optimizer: "sgd" })?.open((), cpu, gpu)
}
