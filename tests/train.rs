//! Training end to end on the bundled digits: the loss goes down, a run is reproducible from its seed, a resumed
//! run continues exactly, fine-tuning freezes what it is told to and replaces the head, and bad settings fail
//! with one line.

mod common;

use resnet_rs::Recipe;
use resnet_rs::train::trainer::{self, TrainArgs};
use resnet_rs::weights;

/// A small, quick variant of the digits recipe (ResNet-18, few steps), so the suite stays fast on 2 cores.
fn recipe() -> Recipe {
    Recipe {
        arch: "resnet18".parse().unwrap(),
        epochs: 3,
        warmup_epochs: 1,
        monitor_every: 5,
        workers: 2,
        ..Recipe::load("digits").unwrap()
    }
}

#[test]
fn digits_training_learns_and_repeats_exactly_from_its_seed() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = trainer::run(common::train_args(recipe(), a.path())).unwrap();
    assert_eq!(first.len(), 3);
    assert!(first[2].train_loss < first[0].train_loss * 0.5, "loss goes down: {first:?}");
    assert!(first[2].val_top1 > 0.6, "three epochs of ResNet-18 reach well above chance (10 %): {first:?}");
    let second = trainer::run(common::train_args(recipe(), b.path())).unwrap();
    for (x, y) in first.iter().zip(&second) {
        assert_eq!(
            (x.train_loss, x.val_loss, x.val_top1, x.val_top5),
            (y.train_loss, y.val_loss, y.val_top1, y.val_top5)
        );
    }
    assert_eq!(common::last_checkpoint(a.path()), common::last_checkpoint(b.path()));
    let metrics = std::fs::read_to_string(a.path().join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().filter(|l| l["type"] == "epoch").count(), 3);
    let grad = lines.iter().find(|l| l["type"] == "grad").expect("gradient statistics are logged");
    assert!(grad["global_grad_norm"].as_f64().unwrap() > 0.0);
    let layer = &grad["layers"][0];
    assert_eq!(layer["name"], "conv1.weight");
    assert!(layer["update_ratio"].as_f64().unwrap() > 0.0 && layer["weight_norm"].as_f64().unwrap() > 0.0);
    // best.safetensors loads as a plain torchvision-keyed model (the optimiser state is set aside).
    let model = weights::load_model("resnet18".parse().unwrap(), &a.path().join("best.safetensors")).unwrap();
    assert_eq!(model.config.num_classes, 10);
}

#[test]
fn resumed_run_matches_an_uninterrupted_one() {
    let (straight, split) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // 22 steps make an epoch; stop inside the first epoch, resume across the epoch boundary.
    let r = Recipe { epochs: 2, ..recipe() };
    trainer::run(TrainArgs { max_steps: Some(30), ..common::train_args(r.clone(), straight.path()) }).unwrap();
    trainer::run(TrainArgs { max_steps: Some(15), ..common::train_args(r.clone(), split.path()) }).unwrap();
    trainer::run(TrainArgs {
        max_steps: Some(30),
        resume: true,
        ..common::train_args(Recipe::default(), split.path())
    })
    .unwrap();
    let (a, b) = (common::last_checkpoint(straight.path()), common::last_checkpoint(split.path()));
    assert!(a.keys().any(|k| k.starts_with("optimizer.")), "optimizer state is checkpointed");
    assert_eq!(a, b, "15 steps + resume + 15 steps gives the same weights and optimizer state as 30 steps");
}

#[test]
fn fine_tuning_freezes_the_trunk_and_replaces_the_head() {
    let data = tempfile::tempdir().unwrap();
    for (class, files) in [("cats", ["cat.png", "astronaut.jpg"]), ("cups", ["coffee.jpg", "camera_grey.png"])] {
        std::fs::create_dir(data.path().join(class)).unwrap();
        for f in files {
            for copy in 0..3 {
                std::fs::copy(
                    common::fixture(&format!("images/{f}")),
                    data.path().join(class).join(format!("{copy}{f}")),
                )
                .unwrap();
            }
        }
    }
    let init = common::fixture("tiny/resnet34_w4.pth");
    let r = Recipe {
        arch: "resnet34".parse().unwrap(),
        stem: resnet_rs::model::Stem::ImageNet,
        dataset: resnet_rs::train::recipe::DatasetKind::Folder,
        data: Some(data.path().to_path_buf()),
        image_size: 64,
        val_fraction: 0.25,
        epochs: 1,
        batch_size: 4,
        ..recipe()
    };
    let run = tempfile::tempdir().unwrap();
    let r = Recipe {
        weights: Some(init.clone()),
        freeze_until: Some(resnet_rs::train::recipe::Stage::Layer3),
        head_lr_scale: 10.0,
        ..r
    };
    let a = common::train_args(r, run.path());
    trainer::run(a).unwrap();
    let before = weights::load_state_dict(&init).unwrap();
    let after = common::last_checkpoint(run.path());
    assert_eq!(after["fc.weight"].shape(), [2, 32], "a 2-class head replaced the 10-class one");
    for (k, v) in &before {
        let frozen = ["conv1.", "bn1.", "layer1.", "layer2.", "layer3."].iter().any(|p| k.starts_with(p));
        if frozen && !k.contains("running_") && !k.ends_with("num_batches_tracked") {
            assert_eq!(&after[k], v, "{k} is frozen");
        }
    }
    assert_ne!(after["layer4.1.conv2.weight"], before["layer4.1.conv2.weight"], "layer4 trains");
}

#[test]
fn divergence_stops_with_the_step_and_layer_named() {
    let dir = tempfile::tempdir().unwrap();
    let r = Recipe { lr: 1e30, warmup_epochs: 0, ..recipe() };
    let msg = trainer::run(common::train_args(r, dir.path())).err().unwrap().to_string();
    // An lr of 1e30 makes the first update blow up the second forward pass; the guard names where it showed
    // first (a block's output, or a running statistic that overflowed without a non-finite output).
    assert!(msg.starts_with("step 1: "), "{msg}");
    assert!(msg.contains("non-finite output, first in ") || msg.contains("overflowed"), "{msg}");
    assert!(!msg.contains('\n'));
}

#[test]
fn bundled_recipes_parse_and_bad_ones_are_named() {
    for (name, _) in resnet_rs::train::recipe::BUNDLED {
        Recipe::load(name).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mine.toml");
    std::fs::write(&path, "epochs = 3\nlearning_rate = 0.1\n").unwrap();
    let msg = Recipe::load(path.to_str().unwrap()).err().unwrap().to_string();
    assert!(msg.contains("mine.toml") && msg.contains("learning_rate"), "{msg}");
    std::fs::write(&path, "epochs = \"three\"\n").unwrap();
    assert!(Recipe::load(path.to_str().unwrap()).is_err());
}

/// `--device auto` in a build without the `cuda` feature is the CPU loop, bit for bit; `--device cuda` there is
/// refused before the run folder is touched.
#[test]
#[cfg(not(feature = "cuda"))]
fn device_auto_without_gpu_support_is_the_cpu_loop() {
    use resnet_rs::{DeviceSpec, Precision, Target};
    let (cpu, auto) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    trainer::run(TrainArgs { max_steps: Some(6), ..common::train_args(recipe(), cpu.path()) }).unwrap();
    let device = Target { device: DeviceSpec::Auto, precision: Precision::F32 };
    trainer::run_on(TrainArgs { max_steps: Some(6), ..common::train_args(recipe(), auto.path()) }, device).unwrap();
    assert_eq!(common::last_checkpoint(cpu.path()), common::last_checkpoint(auto.path()));
    let gpu = Target { device: DeviceSpec::Cuda(0), ..device };
    let run = auto.path().join("gpu");
    let err = trainer::run_on(common::train_args(recipe(), &run), gpu).unwrap_err().to_string();
    assert!(err.contains("--features cuda") && !err.contains('\n'), "{err}");
    assert!(!run.exists());
}
