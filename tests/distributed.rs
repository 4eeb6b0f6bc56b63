//! Data-parallel training over MPI (feature `mpi`; `.ci/run` installs Open MPI): 2 ranks on loopback.
//!
//! Without SyncBN, DDP's step is: each rank runs forward and backward on its own shard's batch, normalising with
//! its own batch statistics; the gradients are averaged; every rank applies the update; the BN running
//! statistics are rank 0's (broadcast before each forward). The reference here computes exactly that in one
//! process, with the library's own loader shards, network and optimiser, and must match rank 0's checkpoint after
//! 10 steps; `RESNET_DDP_CHECK=1` makes the run itself compare the two ranks' weights bit for bit after every step.
#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::process::Command;

use common::assert_close;
use resnet_rs::Tensor;
use resnet_rs::data::loader::{self, LoaderConfig, Shard};
use resnet_rs::engine::Backend;
use resnet_rs::engine::cpu::Cpu;
use resnet_rs::model::Mode;
use resnet_rs::train::{checkpoint, setup};
use resnet_rs::{Optimizer, ResNet};

/// `mpirun -n ranks resnet ARGS`, each rank on one thread.
fn mpirun(ranks: usize, args: &[&str]) -> std::process::Output {
    mpirun_with(ranks, args, &[])
}

/// `mpirun` with environment variables passed to every rank.
fn mpirun_with(ranks: usize, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-n", &ranks.to_string(), "-x", "RAYON_NUM_THREADS=1", "-x", "RESNET_DDP_CHECK"]);
    for (k, v) in env {
        cmd.args(["-x", k]).env(k, v);
    }
    cmd.arg(env!("CARGO_BIN_EXE_resnet"))
        .args(args)
        .env("RESNET_DDP_CHECK", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun runs (Open MPI: apt-get install openmpi-bin libopenmpi-dev)")
}

fn train_args(out: &Path, steps: &str) -> Vec<String> {
    [
        "train",
        "--distributed",
        "--batch-size",
        "32",
        "--schedule",
        "constant",
        "--warmup-epochs",
        "0",
        "--max-steps",
        steps,
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.to_str().unwrap().to_string()])
    .collect()
}

fn grads(model: &ResNet) -> Vec<Option<Tensor>> {
    model.store.params.iter().map(|p| p.grad.clone()).collect()
}

/// A 2-rank run of `args` in the background, started once its first checkpoint exists; and its ranks' pids.
fn running(out: &Path, args: &[String], env: &[(&str, &str)]) -> (std::process::Child, Vec<String>) {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-n", "2", "-x", "RAYON_NUM_THREADS=1"]);
    for (k, v) in env {
        cmd.args(["-x", k]).env(k, v);
    }
    let child = cmd
        .arg(env!("CARGO_BIN_EXE_resnet"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first checkpoint (written before the first step), then a few steps more.
    let started = std::time::Instant::now();
    while !out.join("last.safetensors").exists() {
        assert!(started.elapsed().as_secs() < 60, "no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    // The ranks are mpirun's children.
    let ranks = Command::new("pgrep").args(["-P", &child.id().to_string()]).output().unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&ranks.stdout).split_whitespace().map(String::from).collect();
    assert_eq!(pids.len(), 2, "two ranks under mpirun: {pids:?}");
    (child, pids)
}

#[test]
fn two_ranks_train_as_ddp_does_and_end_with_identical_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = train_args(&out, "10");
    let o = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "2-rank run failed:\n{err}");
    assert!(err.contains("data-parallel over 2 ranks: batch 32 per rank, effective batch 64"), "{err}");
    // Rank 0 alone speaks and writes: one start-up line, one metrics file.
    assert_eq!(err.matches("training resnet34").count(), 1, "{err}");

    // The reference: the same recipe, shards, network and optimiser in one process.
    let trained = checkpoint::load(&out.join("last.safetensors")).unwrap();
    assert_eq!(trained.position.global_step, 10);
    let r = trained.recipe;
    let (train_ds, _) = setup::datasets(&r).unwrap();
    let (pipe, _) = setup::pipelines(&r);
    let pipe = std::sync::Arc::new(pipe);
    let cfg = |rank| LoaderConfig {
        batch_size: r.batch_size,
        shuffle: true,
        drop_last: true,
        workers: 0,
        seed: r.seed,
        shard: Shard { rank, world: 2 },
    };
    // One thread, as each rank runs: the gradients' summation order follows the thread count, and 10 steps of
    // this small network amplify a last-bit difference in conv1's gradient to 1e-3.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let want = pool.install(|| {
        let mut model = setup::build_model(&r, train_ds.num_classes(), None).unwrap();
        let groups = Optimizer::groups_for(&model.store.params, r.weight_decay, r.no_decay_bn_bias, r.head_lr_scale);
        let mut opt = Optimizer::new(setup::optimizer_kind(&r), groups);
        let shard0 = loader::batches(train_ds.clone(), pipe.clone(), None, &cfg(0), 0, 0);
        let shard1 = loader::batches(train_ds.clone(), pipe.clone(), None, &cfg(1), 0, 0);
        let be = Cpu::F32;
        for (a, b) in shard0.zip(shard1).take(10) {
            let (a, b) = (a.unwrap(), b.unwrap());
            let start: Vec<Tensor> = model.store.buffers.iter().map(|x| x.value.clone()).collect();
            let half = |batch: &resnet_rs::data::loader::Batch, model: &mut ResNet| {
                model.store.zero_grad();
                let logits = model.forward(&be, &batch.images, Mode::Train);
                let (_, dlogits) = be.softmax_cross_entropy(&logits, &batch.targets);
                model.backward(&be, &dlogits, false);
                grads(model)
            };
            let ga = half(&a, &mut model);
            let after_a: Vec<Tensor> = model.store.buffers.iter().map(|x| x.value.clone()).collect();
            for (x, s) in model.store.buffers.iter_mut().zip(&start) {
                x.value = s.clone();
            }
            let gb = half(&b, &mut model);
            for ((p, ga), gb) in model.store.params.iter_mut().zip(ga).zip(gb) {
                if let (Some(g), Some(ga), Some(gb)) = (p.grad.as_mut(), ga, gb) {
                    for ((d, &x), &y) in g.data_mut().iter_mut().zip(ga.data()).zip(gb.data()) {
                        *d = (x + y) * 0.5;
                    }
                }
            }
            for (x, s) in model.store.buffers.iter_mut().zip(after_a) {
                x.value = s;
            }
            opt.step(&mut model.store.params, r.lr, None);
        }
        model.state_dict()
    });
    for (k, t) in &want {
        assert_close(&format!("{k} after 10 steps"), &trained.model[k], t, 0.0);
    }
}

/// The monitor's per-step records of a run: (loss, global gradient norm) for every step.
fn step_curve(run: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "grad")
        .map(|v| (v["loss"].as_f64().unwrap(), v["global_grad_norm"].as_f64().unwrap()))
        .collect()
}

#[test]
fn with_sync_bn_two_ranks_of_32_train_as_one_process_of_64() {
    // SyncBatchNorm makes the 2 ranks' step the step of one process on their joint batch: a step's shards,
    // rank after rank, are the one process's batch (`loader::Shard`), the BN statistics and gradient sums are
    // over all 64 images, and the averaged gradient is the 64-image batch's. The one process splits its
    // gradient sums where the ranks do (`engine::cpu::batch_sum`), so the two runs are equal bit for bit, the
    // only test that cannot be passed by a near miss: ReLUs flipped by a last-bit difference made 2e-3 of the
    // gradient norm by step 9 when the sums were not split (ResNet-18, AMD EPYC).
    //
    // Both runs use one convolution algorithm: on its own, `auto` takes Winograd for the 4x4 maps at batch 64
    // and im2col at batch 32 (`algo::resolve`), and Winograd's weight gradient is not split by chunks.
    let algo = [("RESNET_CONV_ALGO", "im2col")];
    let stable = ["--sync-bn", "--monitor-every", "1"].map(String::from);
    let dir = tempfile::tempdir().unwrap();
    let (two, one) = (dir.path().join("two"), dir.path().join("one"));
    let mut args = train_args(&two, "10");
    args.extend(stable.clone());
    let o = mpirun_with(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), &algo);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "2-rank run failed:\n{err}");
    assert!(err.contains("batch norm over the effective batch (--sync-bn)"), "{err}");
    let mut alone: Vec<String> = train_args(&one, "10").into_iter().filter(|a| a != "--distributed").collect();
    let at = alone.iter().position(|a| a == "32").unwrap();
    alone[at] = "64".into();
    alone.extend(stable.into_iter().skip(1));
    let o = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args(&alone)
        .env("RAYON_NUM_THREADS", "1")
        .envs(algo)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let (a, b) = (step_curve(&two), step_curve(&one));
    assert_eq!((a.len(), b.len()), (10, 10), "one monitor record per step");
    for (step, ((la, ga), (lb, gb))) in a.iter().zip(&b).enumerate() {
        // The 2 ranks' loss is the mean of their halves' means (rounded apart: 1e-7 here).
        assert!((la - lb).abs() <= 1e-6 * lb.abs(), "step {}: loss {la} (2x32) vs {lb} (1x64)", step + 1);
        assert_eq!(ga, gb, "step {}: gradient norm", step + 1);
    }
    let (a, b) = (
        checkpoint::load(&two.join("last.safetensors")).unwrap(),
        checkpoint::load(&one.join("last.safetensors")).unwrap(),
    );
    for (k, t) in &b.model {
        assert_eq!(a.model[k].data(), t.data(), "{k} after 10 steps, 2x32 --sync-bn vs 1x64");
    }
}

#[test]
fn one_rank_is_a_valid_world() {
    // One rank is a valid world: the run trains alone and says nothing of data parallelism.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("one");
    let args = train_args(&out, "2");
    let o = mpirun(1, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("data-parallel over"), "{err}");
    assert!(out.join("last.safetensors").exists());
}

#[test]
fn sigterm_on_one_rank_stops_every_rank_after_the_same_step_and_resume_takes_any_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = train_args(&out, "100000");
    let (child, pids) = running(&out, &args, &[]);
    Command::new("kill").args(["-TERM", &pids[1]]).status().unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    let line = err.lines().find(|l| l.starts_with("interrupted after step")).unwrap_or_else(|| panic!("{err}"));
    // (each rank reports its own interruption: all name the same step)
    assert!(err.lines().filter(|l| l.starts_with("interrupted after step")).all(|l| l == line), "{err}");
    let step: u64 = line.split_whitespace().nth(3).and_then(|s| s.trim_end_matches(';').parse().ok()).unwrap();
    let saved = checkpoint::load(&out.join("last.safetensors")).unwrap();
    assert_eq!(saved.position.global_step, step, "the checkpoint is the step every rank stopped after");

    // The same run resumed by one process (no mpirun): a data-parallel checkpoint is an ordinary one. Its epoch
    // continues after the samples the 2 ranks consumed, so one rank of 32 is at twice the batch.
    let resumed = |max_steps: u64| {
        let o = Command::new(env!("CARGO_BIN_EXE_resnet"))
            .args(["train", "--resume", out.to_str().unwrap(), "--max-steps", &max_steps.to_string()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let (train, _) = setup::datasets(&saved.recipe).unwrap();
    let one_rank_steps = (train.len() / 32) as u64;
    let here = saved.position.epoch * one_rank_steps + 2 * saved.position.batch;
    let err = resumed(here + 2);
    assert!(err.contains("resumed on 1 rank(s) from a checkpoint written by 2"), "{err}");
    assert!(err.contains(&format!("step {step} of 2 rank(s) is step {here} here")), "{err}");
    let after = checkpoint::load(&out.join("last.safetensors")).unwrap().position;
    assert_eq!((after.global_step, after.ranks), (here + 2, 1));

    // And back on 2 ranks: 2 steps of 1 rank are one step of 2.
    let two_rank_steps = (train.len().div_ceil(2) / 32) as u64;
    let there = after.epoch * two_rank_steps + after.batch / 2;
    let run = out.to_str().unwrap();
    let o = mpirun(2, &["train", "--distributed", "--resume", run, "--max-steps", &(there + 1).to_string()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains(&format!("step {} of 1 rank(s) is step {there} here", here + 2)), "{err}");
    let after = checkpoint::load(&out.join("last.safetensors")).unwrap().position;
    assert_eq!((after.global_step, after.ranks), (there + 1, 2));
}

#[test]
fn the_sharded_evaluation_equals_one_process_evaluating_the_whole_split() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = train_args(&out, "1000");
    args.extend(["--epochs", "1", "--json"].map(String::from));
    let o = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let epoch: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one epoch line from rank 0 alone");
    // The same checkpoint evaluated by one process over the whole held-out split.
    let last = out.join("last.safetensors");
    let e = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args(["eval", "--json", "--weights", last.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let whole: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    assert_eq!(epoch["val_top1"], whole["top1"], "top-1: 2 ranks' shards vs the whole split");
    let (a, b) = (epoch["val_loss"].as_f64().unwrap(), whole["loss"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-5 * b.abs(), "loss {a} vs {b}");
}

#[test]
fn predict_and_features_over_ranks_give_one_output_in_input_order() {
    use resnet_rs::infer::card::{ModelCard, Preprocess};
    use resnet_rs::{Arch, ResNetConfig, Stem};
    let dir = tempfile::tempdir().unwrap();
    let arch: Arch = "resnet18".parse().unwrap();
    let model = ResNet::new(ResNetConfig { stem: Stem::Cifar, ..ResNetConfig::new(arch, 7) }, 3);
    let card = ModelCard {
        arch,
        stem: Stem::Cifar,
        classes: None,
        preprocess: Preprocess { size: 32, resize: 32, ..Preprocess::imagenet() },
    };
    let weights = dir.path().join("m.safetensors");
    resnet_rs::weights::save_model(&model, &weights, &card.to_metadata().unwrap()).unwrap();
    let w = weights.to_str().unwrap();
    // 3 images over 2 ranks: 2 and 1, the second rank's part padded for the gather.
    let images: Vec<String> = ["cat.png", "coffee.jpg", "camera_grey.png"]
        .iter()
        .map(|f| common::fixture(&format!("images/{f}")).to_str().unwrap().to_string())
        .collect();
    let images: Vec<&str> = images.iter().map(String::as_str).collect();
    let alone = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args([&["predict", "--json", "--weights", w][..], &images].concat())
        .output()
        .unwrap();
    let ranks = mpirun(2, &[&["predict", "--json", "--distributed", "--weights", w][..], &images].concat());
    assert!(ranks.status.success(), "{}", String::from_utf8_lossy(&ranks.stderr));
    // Rank 0 alone prints, every image in input order; the numbers agree to rounding (a batch of another size
    // may take another convolution algorithm).
    let lines = |o: &std::process::Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (want, got) = (lines(&alone), lines(&ranks));
    assert_eq!(got.len(), 3);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["file"], w["file"]);
        assert_eq!(g["top"][0]["class"], w["top"][0]["class"]);
        let p = |v: &serde_json::Value| v["top"][0]["probability"].as_f64().unwrap();
        assert!((p(g) - p(w)).abs() <= 1e-5 * p(w), "{g} vs {w}");
    }

    let (one, two) = (dir.path().join("one.npy"), dir.path().join("two.npy"));
    let (one_s, two_s) = (one.to_str().unwrap(), two.to_str().unwrap());
    let o = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args([&["features", "--weights", w, "--out", one_s][..], &images].concat())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = mpirun(2, &[&["features", "--distributed", "--weights", w, "--out", two_s][..], &images].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let floats = |p: &Path| -> Vec<f32> {
        let b = std::fs::read(p).unwrap();
        let header = u16::from_le_bytes([b[8], b[9]]) as usize;
        b[10 + header..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    };
    let (a, b) = (floats(&one), floats(&two));
    assert_eq!(a.len(), 3 * 512, "one file with every image's row");
    assert!(common::rel_err(&b, &a) <= 1e-5, "features differ by {}", common::rel_err(&b, &a));
    assert_eq!(
        std::fs::read(one.with_extension("files.json")).unwrap(),
        std::fs::read(two.with_extension("files.json")).unwrap()
    );
}

#[test]
fn a_rank_that_hangs_makes_the_others_stop_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = train_args(&out, "100000");
    let (child, pids) = running(&out, &args, &[("RESNET_DDP_TIMEOUT", "4")]);
    // Rank 1 stops answering (as a deadlocked or frozen process does).
    Command::new("kill").args(["-STOP", &pids[1]]).status().unwrap();
    let stopped = std::time::Instant::now();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(stopped.elapsed().as_secs() < 30, "the job ended {:?} after the rank froze", stopped.elapsed());
    assert!(err.contains("rank 0: a collective call got no answer from the other ranks within 4 s"), "{err}");
}

#[test]
fn a_rank_that_dies_ends_the_job_and_leaves_a_checkpoint_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = train_args(&out, "100000");
    let (child, pids) = running(&out, &args, &[]);
    Command::new("kill").args(["-KILL", &pids[1]]).status().unwrap();
    let killed = std::time::Instant::now();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(killed.elapsed().as_secs() < 30, "the job ended {:?} after the rank died", killed.elapsed());
    // Checkpoints are written by rename, so whatever rank 0 was doing, the last one is whole.
    let saved = checkpoint::load(&out.join("last.safetensors")).unwrap().position;
    let more = (saved.global_step + 1).to_string();
    let o = mpirun(2, &["train", "--distributed", "--resume", out.to_str().unwrap(), "--max-steps", &more]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
