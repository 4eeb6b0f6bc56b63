//! The numeric guard: a NaN in a step's input or in one layer's weights stops the run naming the step and the
//! layer, `--skip-nonfinite` drops the step leaving everything as it was, and no NaN reaches a checkpoint.

use std::path::Path;
use std::sync::Arc;

use resnet_rs::Recipe;
use resnet_rs::ResNet;
use resnet_rs::data::loader::{self, Batch, LoaderConfig, Shard};
use resnet_rs::train::setup;
use resnet_rs::weights;
use resnet_rs::{StepOutcome, TrainArgs, Trainer};

fn recipe() -> Recipe {
    Recipe {
        arch: "resnet18".parse().unwrap(),
        batch_size: 16,
        workers: 1,
        monitor_every: 0,
        ..Recipe::load("digits").unwrap()
    }
}

fn args(dir: &Path, skip_nonfinite: bool) -> TrainArgs {
    TrainArgs {
        recipe: recipe(),
        run_dir: dir.to_path_buf(),
        resume: false,
        resume_epochs: None,
        announce: None,
        skip_nonfinite,
        max_steps: None,
        json: false,
        interrupt: None,
        comm: None,
    }
}

/// A trainer on the digits and its first few training batches.
fn trainer(skip_nonfinite: bool) -> (Trainer, Vec<Batch>) {
    let r = recipe();
    let (train, _) = setup::datasets(&r).unwrap();
    let (pipe, _) = setup::pipelines(&r);
    let cfg = LoaderConfig {
        batch_size: r.batch_size,
        shuffle: true,
        drop_last: true,
        workers: 1,
        seed: r.seed,
        shard: Shard::WHOLE,
    };
    let batches: Vec<Batch> =
        loader::batches(train.clone(), Arc::new(pipe), None, &cfg, 0, 0).take(3).map(|b| b.unwrap()).collect();
    let steps = loader::num_batches(train.len(), &cfg) as u64;
    let dir = tempfile::tempdir().unwrap();
    let t = Trainer::new(&args(dir.path(), skip_nonfinite), r, train.num_classes(), steps).unwrap();
    (t, batches)
}

fn set_weight(model: &mut ResNet, name: &str, index: usize, value: f32) {
    let p = model.store.params.iter_mut().find(|p| p.name == name).unwrap();
    p.value.data_mut()[index] = value;
}

#[test]
fn a_nan_in_the_input_stops_the_step_naming_the_input_and_the_first_layer() {
    let (mut t, mut batches) = trainer(false);
    t.step(&batches[0]).unwrap();
    batches[1].images.data_mut()[123] = f32::NAN;
    let msg = t.step(&batches[1]).err().expect("a NaN input must stop the run").to_string();
    assert!(msg.starts_with("step 1: the input batch holds NaN"), "{msg}");
    assert!(msg.contains("first non-finite output: conv1"), "{msg}");
    assert!(!msg.contains('\n'));
}

#[test]
fn a_nan_weight_stops_the_step_naming_its_layer() {
    let (mut t, batches) = trainer(false);
    set_weight(&mut t.model, "layer2.0.conv2.weight", 5, f32::NAN);
    let msg = t.step(&batches[0]).err().expect("a NaN weight must stop the run").to_string();
    assert!(msg.starts_with("step 0: weights of layer2.0.conv2 are not finite"), "{msg}");
    // An infinity the forward pass turns into NaNs further down is named where it sits, too.
    let (mut t, batches) = trainer(false);
    set_weight(&mut t.model, "layer3.1.bn1.weight", 0, f32::INFINITY);
    let msg = t.step(&batches[0]).err().unwrap().to_string();
    assert!(msg.contains("weights of layer3.1.bn1 are not finite"), "{msg}");
}

#[test]
fn skip_nonfinite_drops_the_step_and_keeps_every_weight_and_statistic() {
    let (mut t, mut batches) = trainer(true);
    t.step(&batches[0]).unwrap();
    let before = t.model.state_dict();
    let (opt_before, _) = t.opt.state(&t.model.store.params);
    let tracked = t.model.store.batches_tracked;
    batches[1].images.data_mut()[0] = f32::NAN;
    let (outcome, _) = t.step(&batches[1]).unwrap();
    assert_eq!(outcome, StepOutcome::Skipped);
    assert_eq!(t.pos.skipped, 1);
    assert_eq!(t.model.state_dict(), before, "weights and BN running statistics are untouched by a skipped step");
    assert_eq!(t.opt.state(&t.model.store.params).0, opt_before, "so is the optimiser state");
    assert_eq!(t.model.store.batches_tracked, tracked);
    let (outcome, _) = t.step(&batches[2]).unwrap();
    assert!(matches!(outcome, StepOutcome::Applied { loss, .. } if loss.is_finite()), "{outcome:?}");
    assert_eq!(t.pos.global_step, 3);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("last.safetensors");
    t.save(&path).unwrap();
    let saved = weights::safetensors::load(&path).unwrap();
    assert!(saved.checksum_verified);
    for (k, v) in &saved.tensors {
        assert!(v.all_finite(), "{k} in the checkpoint is not finite");
    }
}

#[test]
fn a_checkpoint_with_a_nan_is_never_written() {
    let (mut t, _) = trainer(false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("last.safetensors");
    set_weight(&mut t.model, "layer1.0.conv1.weight", 0, f32::NAN);
    let msg = t.save(&path).err().unwrap().to_string();
    assert!(msg.contains("last.safetensors") && msg.contains("layer1.0.conv1"), "{msg}");
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no temporary file is left behind either");
}

#[test]
fn fine_tuning_from_weights_holding_a_nan_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = ResNet::new(resnet_rs::model::ResNetConfig::new("resnet18".parse().unwrap(), 10), 0);
    set_weight(&mut model, "layer4.1.conv1.weight", 9, f32::NAN);
    let init = dir.path().join("init.safetensors");
    weights::save_model(&model, &init, &Default::default()).unwrap();
    let mut a = args(&dir.path().join("run"), false);
    a.recipe.weights = Some(init);
    a.recipe.stem = resnet_rs::model::Stem::ImageNet;
    let msg = resnet_rs::train::trainer::run(a).err().unwrap().to_string();
    assert!(msg.contains("init.safetensors") && msg.contains("weights of layer4.1.conv1 are not finite"), "{msg}");
}

#[test]
fn relu_lets_nan_through_as_pytorch_does() {
    use resnet_rs::Cpu;
    use resnet_rs::{Backend, Tensor};
    let x = Tensor::new(&[5], vec![-1.0, 0.0, 2.0, f32::NAN, f32::NEG_INFINITY]).unwrap();
    let y = Cpu::F32.relu(x.clone());
    assert_eq!(&y.data()[..3], &[0.0, 0.0, 2.0]);
    assert!(y.data()[3].is_nan(), "torch.relu(nan) is nan; a 0 here would hide a blow-up");
    assert_eq!(y.data()[4], 0.0);
    let z = Cpu::F32.add_relu(x, &Tensor::full(&[5], 1.0));
    assert!(z.data()[3].is_nan());
    assert_eq!(z.data()[0], 0.0);
}
