//! Whole networks against torchvision: reduced-width ResNet-34 (both stems) and ResNet-50 with the fixtures'
//! deterministic weights. Eval logits within 1e-5, train-mode logits, loss, input gradient, every stored
//! parameter gradient and the updated running statistics within 1e-4 (relative error ‖a−b‖/‖b‖).

mod common;

use common::{Fixture, assert_close, assert_close_slice, det_net};
use resnet_rs::Backend;
use resnet_rs::Cpu;
use resnet_rs::{Mode, ResNet, ResNetConfig};

fn eval_logits_match(name: &str) {
    let f = Fixture::load(name);
    let mut model = det_net(&f);
    let logits = model.forward(&Cpu::F32, f.get("input"), Mode::Eval);
    assert_close("eval logits", &logits, f.get("eval.logits"), 1e-5);
}

fn training_step_matches(name: &str) {
    let f = Fixture::load(name);
    let mut model = det_net(&f);
    let logits = model.forward(&Cpu::F32, f.get("input"), Mode::Train);
    assert_close("train logits", &logits, f.get("train.logits"), 1e-4);
    let (loss, dlogits) =
        Cpu::F32.softmax_cross_entropy(&logits, &resnet_rs::engine::one_hot(&f.usizes("target"), 10, 0.0));
    assert_close_slice("loss", &[loss], f.get("train.loss"), 1e-4);
    let dx = model.backward(&Cpu::F32, &dlogits, true).expect("input gradient was requested");
    assert_close("input gradient", &dx, f.get("train.input_grad"), 1e-4);

    let mut checked = 0;
    for p in &model.store.params {
        let grad = p.grad.as_ref().unwrap_or_else(|| panic!("{} got no gradient", p.name));
        if let Some(want) = f.tensors.get(&format!("grad.{}", p.name)) {
            assert_close(&format!("grad {}", p.name), grad, want, 1e-4);
            checked += 1;
        }
    }
    let stored = f.tensors.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(checked, stored, "every stored gradient names a parameter of the model");
    assert!(checked > 0);
    for b in &model.store.buffers {
        assert_close(&format!("running {}", b.name), &b.value, f.get(&format!("running.{}", b.name)), 1e-4);
    }
    assert_eq!(model.store.batches_tracked, 1);
}

#[test]
fn resnet34_reduced_eval_logits_match_torchvision() {
    eval_logits_match("net_resnet34_w8.safetensors");
}

#[test]
fn resnet34_reduced_cifar_stem_eval_logits_match_torchvision() {
    eval_logits_match("net_resnet34_w8_cifar.safetensors");
}

#[test]
fn resnet50_reduced_cifar_stem_eval_logits_match_torchvision() {
    eval_logits_match("net_resnet50_w4_cifar.safetensors");
}

#[test]
fn resnet34_reduced_training_step_matches_torchvision() {
    training_step_matches("net_resnet34_w8.safetensors");
}

#[test]
fn resnet50_reduced_cifar_stem_training_step_matches_torchvision() {
    training_step_matches("net_resnet50_w4_cifar.safetensors");
}

#[test]
fn summary_counts_match_torchvision_and_the_built_network() {
    use resnet_rs::model::summary::summarize;
    let cfg = ResNetConfig::new("resnet34".parse().unwrap(), 1000);
    let s = summarize(&cfg, 224);
    assert_eq!(s.params, 21_797_672, "torchvision's resnet34 parameter count");
    assert_eq!((s.macs as f64 / 1e9 * 100.0).round() / 100.0, 3.66, "torchvision's 3.66 GMACs at 224²");
    for (arch, params) in
        [("resnet18", 11_689_512), ("resnet50", 25_557_032), ("resnet101", 44_549_160), ("resnet152", 60_192_808)]
    {
        assert_eq!(summarize(&ResNetConfig::new(arch.parse().unwrap(), 1000), 224).params, params, "{arch}");
    }
    let small = ResNetConfig { widths: [8, 16, 32, 64], ..ResNetConfig::new("resnet50".parse().unwrap(), 7) };
    assert_eq!(summarize(&small, 64).params, ResNet::new(small, 0).num_params());
}

#[test]
fn state_dict_keys_are_torchvisions() {
    let model = ResNet::new(ResNetConfig::new("resnet34".parse().unwrap(), 1000), 0);
    let sd = model.state_dict();
    // 218 torchvision entries less the 36 num_batches_tracked, which the checkpoint writer adds.
    assert_eq!(sd.len() + model.batch_norm_names().len(), 218);
    assert_eq!(model.batch_norm_names().len(), 36);
    for key in [
        "conv1.weight",
        "bn1.running_var",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.bias",
        "layer4.2.bn2.weight",
        "fc.bias",
    ] {
        assert!(sd.contains_key(key), "missing {key}");
    }
    assert!(!sd.contains_key("layer1.0.downsample.0.weight"), "layer1 keeps identity shortcuts in resnet34");
}

#[test]
fn frozen_layers_get_no_gradient_and_leave_the_others_unchanged() {
    let f = Fixture::load("net_resnet34_w8.safetensors");
    let mut model = det_net(&f);
    model.set_trainable(&["conv1.", "bn1.", "layer1.", "layer2."], false);
    let logits = model.forward(&Cpu::F32, f.get("input"), Mode::Train);
    let (_, dlogits) =
        Cpu::F32.softmax_cross_entropy(&logits, &resnet_rs::engine::one_hot(&f.usizes("target"), 10, 0.0));
    assert!(model.backward(&Cpu::F32, &dlogits, false).is_none());
    for p in &model.store.params {
        if p.trainable {
            let want = f.get(&format!("grad.{}", p.name));
            assert_close(&format!("grad {}", p.name), p.grad.as_ref().unwrap(), want, 1e-4);
        } else {
            assert!(p.grad.is_none(), "frozen {} got a gradient", p.name);
        }
    }
}
