//! The PyTorch-made tiny checkpoint (reduced ResNet-34, float16 .pth) on the committed images: the library's
//! preprocessing + forward gives torchvision's logits and features, and our checkpoints round-trip.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{Fixture, fixture};
use resnet_rs::Cpu;
use resnet_rs::infer;
use resnet_rs::weights;
use resnet_rs::{Mode, Tap};

fn images(f: &Fixture) -> Vec<PathBuf> {
    f.metadata["files"].split(',').map(|n| fixture(&format!("images/{n}"))).collect()
}

/// Per image: PNG within 1e-5 of torchvision, JPEG within `common::image_tolerance` (decoder differences).
#[test]
fn tiny_checkpoint_gives_torchvision_logits_and_features() {
    let f = Fixture::load("tiny/expected.safetensors");
    let files = images(&f);
    let mut model = weights::load_model("resnet34".parse().unwrap(), &fixture("tiny/resnet34_w4.pth")).unwrap();
    assert_eq!(model.config.num_classes, 10);
    assert_eq!(model.config.widths, [4, 8, 16, 32]);
    assert_eq!(model.store.batches_tracked, 7);
    let x = infer::load_batch(&files, &resnet_rs::infer::card::Preprocess::imagenet()).unwrap();
    let logits = model.forward(&Cpu::F32, &x, Mode::Eval);
    common::assert_rows_close("logits", &files, &logits, f.get("logits"));
    for (layer, tap) in [
        ("layer1", Tap::Layer1),
        ("layer2", Tap::Layer2),
        ("layer3", Tap::Layer3),
        ("layer4", Tap::Layer4),
        ("avgpool", Tap::AvgPool),
    ] {
        let feats = infer::features(&mut model, &Cpu::F32, &x, tap);
        common::assert_rows_close(layer, &files, &feats, f.get(&format!("features.{layer}")));
    }
    assert!(files.iter().any(|p| p.extension().unwrap() == "png"), "the tight tolerance is exercised");
}

#[test]
fn saved_checkpoint_loads_back_with_identical_outputs() {
    let mut model = weights::load_model("resnet34".parse().unwrap(), &fixture("tiny/resnet34_w4.pth")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    weights::save_model(&model, &path, &BTreeMap::from([("arch".into(), "resnet34".into())])).unwrap();
    let loaded = weights::safetensors::load(&path).unwrap();
    assert_eq!(loaded.metadata["arch"], "resnet34");
    assert_eq!(loaded.tensors["layer3.1.bn2.num_batches_tracked"].data(), &[7.0]);
    assert_eq!(loaded.tensors.len(), 218);
    let mut back = weights::load_model("resnet34".parse().unwrap(), &path).unwrap();
    let x = infer::load_batch(&[fixture("images/cat.png")], &resnet_rs::infer::card::Preprocess::imagenet()).unwrap();
    assert_eq!(model.forward(&Cpu::F32, &x, Mode::Eval), back.forward(&Cpu::F32, &x, Mode::Eval));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no temporary file is left behind: {leftovers:?}");
}

#[test]
fn strict_loading_lists_every_problem_in_one_error() {
    let mut state = weights::load_state_dict(&fixture("tiny/resnet34_w4.pth")).unwrap();
    state.remove("layer1.0.bn1.running_var");
    state.insert("layer9.0.conv1.weight".into(), resnet_rs::engine::Tensor::zeros(&[1]));
    state.insert("layer2.0.conv2.weight".into(), resnet_rs::engine::Tensor::zeros(&[8, 8, 1, 1]));
    let config = resnet_rs::model::ResNetConfig::infer_from("resnet34".parse().unwrap(), &state).unwrap();
    let mut model = resnet_rs::model::ResNet::new(config, 0);
    let msg = model.load_state_dict(&state).unwrap_err().to_string();
    for part in [
        "missing keys: layer1.0.bn1.running_var",
        "unexpected keys: layer9.0.conv1.weight",
        "wrong shapes: layer2.0.conv2.weight",
    ] {
        assert!(msg.contains(part), "{msg}");
    }
    assert!(!msg.contains('\n'));
    // A ResNet-18 checkpoint is not a ResNet-34.
    let msg =
        weights::load_model("resnet18".parse().unwrap(), &fixture("tiny/resnet34_w4.pth")).err().unwrap().to_string();
    assert!(msg.contains("resnet34_w4.pth") && msg.contains("unexpected keys: layer1.2"), "{msg}");
}

#[test]
fn batch_of_one_matches_batched_forward() {
    // A single image takes the GEMM-parallel path, a batch the image-parallel path; both must agree.
    let f = Fixture::load("tiny/expected.safetensors");
    let files = images(&f);
    let mut model = weights::load_model("resnet34".parse().unwrap(), &fixture("tiny/resnet34_w4.pth")).unwrap();
    let x = infer::load_batch(&files, &resnet_rs::infer::card::Preprocess::imagenet()).unwrap();
    let all = model.forward(&Cpu::F32, &x, Mode::Eval);
    let one_by_one = infer::batched(&x, 1, |b| Ok(model.forward(&Cpu::F32, b, Mode::Eval))).unwrap();
    assert!(common::rel_err(one_by_one.data(), all.data()) < 1e-6);
}

#[test]
fn hostile_shapes_are_refused_before_building_the_network() {
    use resnet_rs::Tensor;
    let dir = tempfile::tempdir().unwrap();
    let mut state = weights::load_state_dict(&fixture("tiny/resnet34_w4.pth")).unwrap();
    // An empty tensor claiming a 100000-wide stage: building it would need 10^11 parameters.
    state.insert("layer3.0.conv1.weight".into(), Tensor::new(&[100_000, 0, 3, 3], vec![]).unwrap());
    let path = dir.path().join("huge.safetensors");
    weights::safetensors::save(&path, &state, &BTreeMap::new(), &BTreeMap::new()).unwrap();
    let msg = weights::load_model("resnet34".parse().unwrap(), &path).err().unwrap().to_string();
    assert!(msg.contains("huge.safetensors") && msg.contains("needs"), "{msg}");

    state.insert("layer3.0.conv1.weight".into(), Tensor::new(&[0, 8, 3, 3], vec![]).unwrap());
    weights::safetensors::save(&path, &state, &BTreeMap::new(), &BTreeMap::new()).unwrap();
    let msg = weights::load_model("resnet34".parse().unwrap(), &path).err().unwrap().to_string();
    assert!(msg.contains("zero-sized layer"), "{msg}");
}

fn top1(logits: &[f32], classes: usize) -> Vec<usize> {
    logits.chunks(classes).map(|r| r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0).collect()
}

/// The inference runner on the CPU (`exec::cpu_plan::CpuPlan`: weights packed once per unit): f32 gives torchvision's logits and
/// features at the same tolerance as the engine; bf16 (AVX512-BF16) keeps every image's top-1 class, within a bf16-sized error,
/// and a CPU without AVX512-BF16 refuses bf16 in one line.
#[test]
fn cpu_runner_matches_torchvision_in_f32_and_keeps_top1_in_bf16() {
    use resnet_rs::Runner;
    use resnet_rs::engine::cpu::packed;
    use resnet_rs::{DeviceSpec, Precision, Target};
    let f = Fixture::load("tiny/expected.safetensors");
    let files = images(&f);
    let load = || weights::load_model("resnet34".parse().unwrap(), &fixture("tiny/resnet34_w4.pth")).unwrap();
    let x = infer::load_batch(&files, &resnet_rs::infer::card::Preprocess::imagenet()).unwrap();
    let [n, _, h, w] = x.dims4();
    let mut f32_runner =
        Runner::open(load(), Target { device: DeviceSpec::Cpu, precision: Precision::F32 }, None, n, h, w).unwrap();
    let logits = f32_runner.forward(&x).unwrap();
    common::assert_rows_close("logits (runner, f32)", &files, &logits, f.get("logits"));
    for (layer, tap) in [("layer2", Tap::Layer2), ("avgpool", Tap::AvgPool)] {
        let feats = f32_runner.features(&x, tap).unwrap();
        common::assert_rows_close(layer, &files, &feats, f.get(&format!("features.{layer}")));
    }
    match Runner::open(load(), Target { device: DeviceSpec::Cpu, precision: Precision::Bf16 }, None, n, h, w) {
        Ok(mut bf16_runner) => {
            assert!(packed::bf16_supported());
            let low = bf16_runner.forward(&x).unwrap();
            assert!(low.data().iter().all(|v| v.is_finite()), "bf16 logits must be finite");
            let e = common::rel_err(low.data(), logits.data());
            println!("bf16 vs f32 logits: relative error {e:.2e}");
            assert!(e < 2e-2, "bf16 logits {e:.2e} from f32's");
            assert_eq!(top1(low.data(), 10), top1(logits.data(), 10), "bf16 changed a top-1 class");
        }
        Err(e) => {
            assert!(!packed::bf16_supported());
            assert!(e.to_string().contains("AVX512-BF16"), "{e}");
        }
    }
}
