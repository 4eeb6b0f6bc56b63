//! Weight EMA (`--model-ema`): the update is PyTorch's bit for bit (torchvision's `ExponentialMovingAverage`
//! made the fixture), and in a digits run the EMA restarts during warm-up, is evaluated every epoch, is saved
//! and resumed exactly, and `resnet eval --ema` on the checkpoint measures what the epoch line reported.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::Fixture;
use resnet_rs::engine::Tensor;
use resnet_rs::train::ema::ModelEma;
use resnet_rs::train::trainer::{self, TrainArgs};
use resnet_rs::{Recipe, ResNet, ResNetConfig};

const BIN: &str = env!("CARGO_BIN_EXE_resnet");

/// The fixture's tensors under `prefix`, without it.
fn under(f: &Fixture, prefix: &str) -> BTreeMap<String, Tensor> {
    f.tensors.iter().filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone()))).collect()
}

fn network(state: &BTreeMap<String, Tensor>) -> ResNet {
    let mut net = ResNet::new(ResNetConfig::infer_from(resnet_rs::model::FAMILY[0], state).unwrap(), 0);
    net.load_state_dict(state).unwrap();
    net
}

#[test]
fn ema_update_matches_pytorch_bit_for_bit() {
    let f = Fixture::load("ema_update.safetensors");
    let decays: Vec<f64> = f.metadata["decays"].split(',').map(|d| d.parse().unwrap()).collect();
    assert_eq!(decays.len(), 2);
    let states: Vec<ResNet> = (0..4).map(|k| network(&under(&f, &format!("s{k}.")))).collect();
    for (i, &decay) in decays.iter().enumerate() {
        let mut ema = ModelEma::new(&states[0], decay);
        for s in &states {
            ema.update(s);
        }
        assert_eq!(ema.n_averaged, 4);
        let want = under(&f, &format!("d{i}.ema."));
        let got = ema.model.state_dict();
        assert_eq!(got.len(), want.len(), "every parameter and BN statistic is averaged");
        for (k, w) in &want {
            assert!(w.all_finite(), "{k}");
            assert_eq!(got[k].data(), w.data(), "decay {decay}: {k} differs from PyTorch's");
        }
        assert_ne!(got, states[3].state_dict(), "the average is not the last state");
    }
}

fn args(recipe: Recipe, dir: &Path, max_steps: Option<u64>, resume: bool) -> TrainArgs {
    TrainArgs { max_steps, resume, ..common::train_args(recipe, dir) }
}

fn eval_top1(weights: &Path, ema: bool) -> f64 {
    let mut cmd = Command::new(BIN);
    cmd.args(["eval", "--json", "--weights"]).arg(weights);
    if ema {
        cmd.arg("--ema");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["top1"].as_f64().unwrap()
}

#[test]
fn ema_restarts_in_warmup_is_evaluated_and_resumes_exactly() {
    // ResNet-18 on digits: 22 steps an epoch, the first one warm-up; the EMA moves every step.
    let recipe = Recipe {
        arch: "resnet18".parse().unwrap(),
        epochs: 2,
        warmup_epochs: 1,
        monitor_every: 0,
        model_ema: 0.9,
        model_ema_steps: 1,
        ..Recipe::load("digits").unwrap()
    };
    let (straight, split) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let reports = trainer::run(args(recipe.clone(), straight.path(), None, false)).unwrap();

    trainer::run(args(recipe.clone(), split.path(), Some(15), false)).unwrap();
    let warm = common::last_checkpoint(split.path());
    for (k, v) in warm.iter().filter(|(k, _)| !k.starts_with("optimizer.") && !k.starts_with("model_ema.")) {
        assert_eq!(&warm[&format!("model_ema.{k}")], v, "in warm-up the EMA restarts from the network: {k}");
    }
    let resumed = trainer::run(args(Recipe::default(), split.path(), None, true)).unwrap();
    assert_eq!(
        common::last_checkpoint(straight.path()),
        common::last_checkpoint(split.path()),
        "the EMA resumes exactly, with the rest"
    );

    let last = reports.last().unwrap();
    let ema_top1 = last.ema_val_top1.expect("the EMA is evaluated every epoch");
    assert_eq!(resumed.last().unwrap().ema_val_top1, Some(ema_top1));
    let done = common::last_checkpoint(straight.path());
    assert_ne!(done["conv1.weight"], done["model_ema.conv1.weight"], "after warm-up the EMA averages");
    let metrics = std::fs::read_to_string(straight.path().join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"ema_val_top1\""), "metrics.jsonl records the EMA's evaluation");

    let file = straight.path().join("last.safetensors");
    assert!((eval_top1(&file, true) - ema_top1).abs() < 1e-9, "eval --ema measures what the epoch line reported");
    assert!((eval_top1(&file, false) - last.val_top1).abs() < 1e-9, "eval without it measures the live weights");
}

#[test]
fn ema_flag_on_a_file_without_one_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain.safetensors");
    let net = ResNet::new(ResNetConfig::new(resnet_rs::model::FAMILY[0], 10), 0);
    resnet_rs::save_model(&net, &file, &BTreeMap::new()).unwrap();
    let out = Command::new(BIN).args(["eval", "--ema", "--weights"]).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("plain.safetensors") && err.contains("no weight EMA"), "{err}");
}
