//! `resnet export`: what leaves the tool is the network it trained. ONNX: ONNX Runtime gives our logits within
//! 1e-5 relative for resnet18/34/50, both stems, 1-, 3- and 13-channel stems, BN folded and kept, and the
//! embedding output (`python/check_onnx.py`, run on the onnx and onnxruntime packages CI installs from PyPI; no
//! torch). pth: our own reader gets back every tensor bit for bit, `num_batches_tracked` included, from the
//! torch.save layout (`python/check_export.py` confirms torch.load and torchvision's strict load). safetensors:
//! the network alone, none of a checkpoint's optimiser or EMA keys. Bad input: one line, exit 2.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{assert_close, det_init, fixture};
use prost::Message;
use resnet_rs::export::onnx::{self, OnnxOptions, proto};
use resnet_rs::infer::card::{ModelCard, Preprocess};
use resnet_rs::{Arch, ResNet, ResNetConfig, Runner, Stem, Tap, Target, Tensor};

fn resnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_resnet")).args(args).output().expect("the binary runs")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A torchvision-width network with the parity fixtures' deterministic weights and non-trivial BN statistics.
fn net(arch: &str, stem: Stem, channels: usize, classes: usize) -> ResNet {
    let arch: Arch = arch.parse().unwrap();
    let config = ResNetConfig { stem, in_channels: channels, ..ResNetConfig::new(arch, classes) };
    let mut model = ResNet::new(config, 0);
    det_init(&mut model);
    model
}

fn card(model: &ResNet, size: u32) -> ModelCard {
    let preprocess = Preprocess { size, resize: size, ..Preprocess::imagenet() }.for_channels(model.config.in_channels);
    ModelCard {
        arch: model.config.arch,
        stem: model.config.stem,
        classes: Some((0..model.config.num_classes).map(|i| format!("class {i}")).collect()),
        preprocess,
    }
}

/// The fixture photographs at `size`², as `channels` channels: RGB as is, grey as the channel mean, and for
/// other counts channel c is RGB channel c mod 3 scaled by 1 + c/10 (a multi-band stand-in).
fn images(size: u32, channels: usize) -> Tensor {
    let files: Vec<PathBuf> =
        ["astronaut.jpg", "cat.png", "coffee.jpg"].iter().map(|f| fixture(&format!("images/{f}"))).collect();
    let pre = Preprocess { size, resize: size, ..Preprocess::imagenet() };
    let rgb = resnet_rs::infer::load_batch(&files, &pre).unwrap();
    let [n, _, h, w] = rgb.dims4();
    let plane = h * w;
    let mut out = vec![0f32; n * channels * plane];
    for i in 0..n {
        let src = |c: usize| &rgb.data()[(i * 3 + c) * plane..(i * 3 + c + 1) * plane];
        for c in 0..channels {
            let dst = &mut out[(i * channels + c) * plane..(i * channels + c + 1) * plane];
            for (p, d) in dst.iter_mut().enumerate() {
                *d = if channels == 1 {
                    (src(0)[p] + src(1)[p] + src(2)[p]) / 3.0
                } else {
                    src(c % 3)[p] * (1.0 + c as f32 / 10.0)
                };
            }
        }
    }
    Tensor::new(&[n, channels, h, w], out).unwrap()
}

/// Our output for `x`, through the inference plan `predict` and `features` use.
fn ours(model: &ResNet, x: &Tensor, tap: Tap) -> Tensor {
    let [n, _, h, w] = x.dims4();
    let mut copy = ResNet::new(model.config, 0);
    copy.load_state_dict(&model.state_dict()).unwrap();
    let mut runner = Runner::open(copy, Target::CPU, None, n, h, w).unwrap();
    if tap == Tap::Fc { runner.forward(x).unwrap() } else { runner.features(x, tap).unwrap() }
}

/// The Python that has onnx and onnxruntime: `RESNET_PYTHON` (CI's venv), else `python3` if it has both. In CI
/// a missing one fails the test; elsewhere the check is skipped with a note.
fn onnx_python() -> Option<PathBuf> {
    let candidate = std::env::var_os("RESNET_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from);
    let has = Command::new(&candidate)
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has {
        return Some(candidate);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must provide onnx and onnxruntime ({} has them not; .ci/run installs python/requirements-ci.txt)",
        candidate.display()
    );
    eprintln!("skipping the ONNX Runtime check: no python with onnx and onnxruntime (set RESNET_PYTHON)");
    None
}

#[test]
fn onnx_runtime_gives_our_outputs_for_every_family_stem_and_channel_count() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, Stem, usize, u32, bool, Tap)] = &[
        ("resnet18_imagenet", "resnet18", Stem::ImageNet, 3, 112, false, Tap::Fc),
        ("resnet34_imagenet", "resnet34", Stem::ImageNet, 3, 112, false, Tap::Fc),
        ("resnet50_imagenet", "resnet50", Stem::ImageNet, 3, 112, false, Tap::Fc),
        ("resnet18_cifar", "resnet18", Stem::Cifar, 3, 32, false, Tap::Fc),
        ("resnet34_cifar_keep_bn", "resnet34", Stem::Cifar, 3, 32, true, Tap::Fc),
        ("resnet50_cifar", "resnet50", Stem::Cifar, 3, 32, false, Tap::Fc),
        ("resnet18_grey", "resnet18", Stem::ImageNet, 1, 64, false, Tap::Fc),
        ("resnet18_13band", "resnet18", Stem::ImageNet, 13, 64, false, Tap::Fc),
        ("resnet34_avgpool", "resnet34", Stem::ImageNet, 3, 64, false, Tap::AvgPool),
        ("resnet18_layer3_keep_bn", "resnet18", Stem::Cifar, 3, 32, true, Tap::Layer3),
    ];
    for &(name, arch, stem, channels, size, keep_bn, tap) in cases {
        let model = net(arch, stem, channels, 10);
        let bytes = onnx::encode(&model, &card(&model, size), OnnxOptions { tap, keep_bn }).unwrap();
        let x = images(size, channels);
        let want = ours(&model, &x, tap);
        std::fs::write(dir.path().join(format!("{name}.onnx")), bytes).unwrap();
        std::fs::write(dir.path().join(format!("{name}.input.npy")), resnet_rs::infer::npy_f32(&x)).unwrap();
        std::fs::write(dir.path().join(format!("{name}.expected.npy")), resnet_rs::infer::npy_f32(&want)).unwrap();
    }
    let Some(python) = onnx_python() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/check_onnx.py");
    let out = Command::new(python).arg(script).arg(dir.path()).args(["--tol", "1e-5"]).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ONNX Runtime disagrees with us:\n{report}");
    assert_eq!(report.matches(" ok").count(), cases.len(), "every case reported ok:\n{report}");
}

#[test]
fn onnx_graph_has_a_dynamic_batch_folded_bn_and_the_model_card() {
    let model = net("resnet18", Stem::Cifar, 3, 4);
    let card = card(&model, 32);
    let decode = |keep_bn| {
        let bytes = onnx::encode(&model, &card, OnnxOptions { tap: Tap::Fc, keep_bn }).unwrap();
        proto::ModelProto::decode(bytes.as_slice()).unwrap()
    };
    let folded = decode(false);
    assert_eq!(folded.opset_import[0].version, Some(onnx::OPSET));
    let graph = folded.graph.as_ref().unwrap();
    let count = |g: &proto::GraphProto, op: &str| g.node.iter().filter(|n| n.op_type.as_deref() == Some(op)).count();
    let units = model.graph.units.len();
    assert_eq!(count(graph, "Conv"), units);
    assert_eq!(count(graph, "BatchNormalization"), 0);
    assert_eq!(count(graph, "Add"), model.graph.blocks.len());
    assert_eq!(count(graph, "MaxPool"), 0, "the CIFAR stem has no pool");
    let dims = |v: &proto::ValueInfoProto| -> Vec<String> {
        let Some(proto::type_proto::Value::TensorType(t)) = &v.r#type.as_ref().unwrap().value else { panic!() };
        let dim = |d: &proto::tensor_shape_proto::Dimension| match d.value.as_ref().unwrap() {
            proto::tensor_shape_proto::dimension::Value::DimValue(n) => n.to_string(),
            proto::tensor_shape_proto::dimension::Value::DimParam(p) => p.clone(),
        };
        t.shape.as_ref().unwrap().dim.iter().map(dim).collect()
    };
    assert_eq!(dims(&graph.input[0]), ["batch", "3", "32", "32"]);
    assert_eq!(dims(&graph.output[0]), ["batch", "4"]);
    let meta: BTreeMap<_, _> =
        folded.metadata_props.iter().map(|p| (p.key.clone().unwrap(), p.value.clone().unwrap())).collect();
    assert_eq!(ModelCard::from_metadata(&meta).unwrap().as_ref(), Some(&card));
    // Every conv carries its folded bias; every weight keeps its torchvision name.
    let names: Vec<&str> = graph.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    assert!(names.contains(&"layer2.0.downsample.0.weight") && names.contains(&"layer2.0.downsample.0.bias"));
    let kept = decode(true);
    let graph = kept.graph.as_ref().unwrap();
    assert_eq!(count(graph, "BatchNormalization"), units);
    assert!(graph.initializer.iter().any(|t| t.name.as_deref() == Some("layer4.1.bn2.running_var")));
}

/// A training checkpoint: the network under torchvision's keys plus optimiser state and a weight EMA.
fn checkpoint(dir: &Path, model: &ResNet, ema: &ResNet) -> PathBuf {
    let mut tensors = model.state_dict();
    tensors.insert("optimizer.momentum.conv1.weight".into(), Tensor::zeros(&[4]));
    for (k, v) in ema.state_dict() {
        tensors.insert(format!("model_ema.{k}"), v);
    }
    let meta = card(model, 32).to_metadata().unwrap();
    let path = dir.join("checkpoint.safetensors");
    let mut counts = resnet_rs::weights::batch_counts(model);
    counts.extend(resnet_rs::weights::batch_counts(ema).into_iter().map(|(k, n)| (format!("model_ema.{k}"), n)));
    resnet_rs::weights::safetensors::save(&path, &tensors, &counts, &meta).unwrap();
    path
}

#[test]
fn pth_and_safetensors_exports_hold_the_network_alone_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = net("resnet18", Stem::Cifar, 3, 5);
    model.store.batches_tracked = 1234;
    let mut ema = net("resnet18", Stem::Cifar, 3, 5);
    ema.store.batches_tracked = 1234;
    let mut shifted = ema.state_dict();
    shifted.values_mut().for_each(|t| t.data_mut().iter_mut().for_each(|v| *v += 0.25));
    ema.load_state_dict(&shifted).unwrap();
    let ckpt = checkpoint(dir.path(), &model, &ema);

    let want = model.state_dict();
    for (file, extra) in [("model.pth", &[][..]), ("model.safetensors", &[][..]), ("ema.pth", &["--ema"][..])] {
        let out = dir.path().join(file);
        let args = [&["export", path(&ckpt), "--out", path(&out)][..], extra].concat();
        let o = resnet(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = if file.ends_with(".pth") {
            resnet_rs::weights::pth::load_pth(&out).unwrap()
        } else {
            resnet_rs::weights::safetensors::load(&out).unwrap().tensors
        };
        let reference = if extra.is_empty() { &want } else { &shifted };
        let counts: Vec<&String> = got.keys().filter(|k| k.ends_with("num_batches_tracked")).collect();
        assert_eq!(counts.len(), model.batch_norm_names().len(), "{file}: one num_batches_tracked per BN");
        assert_eq!(got["bn1.num_batches_tracked"].data(), [1234.0], "{file}");
        let network: BTreeMap<String, Tensor> =
            got.into_iter().filter(|(k, _)| !k.ends_with("num_batches_tracked")).collect();
        assert_eq!(network.keys().collect::<Vec<_>>(), reference.keys().collect::<Vec<_>>(), "{file}: keys");
        for (k, t) in reference {
            assert_close(&format!("{file} {k}"), &network[k], t, 0.0);
        }
    }
}

#[test]
fn exported_pth_reads_back_as_the_same_network() {
    let dir = tempfile::tempdir().unwrap();
    let model = net("resnet34", Stem::ImageNet, 3, 6);
    let out = dir.path().join("resnet34.pth");
    resnet_rs::weights::pth::save(&out, &model.state_dict(), &resnet_rs::weights::batch_counts(&model)).unwrap();
    let back = resnet_rs::weights::load_model(model.config.arch, &out).unwrap();
    assert_eq!(back.config, model.config);
    let x = images(64, 3);
    assert_close("logits", &ours(&back, &x, Tap::Fc), &ours(&model, &x, Tap::Fc), 0.0);
}

#[test]
fn bad_export_requests_are_one_line_errors_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let model = net("resnet18", Stem::Cifar, 3, 5);
    let good = dir.path().join("good.safetensors");
    resnet_rs::weights::save_model(&model, &good, &card(&model, 32).to_metadata().unwrap()).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &std::fs::read(&good).unwrap()[..5000]).unwrap();
    let target = dir.path().join("out.onnx");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["export", path(&truncated), "--out", path(&target)], "truncated.safetensors"),
        (vec!["export", path(&good), "--out", "model.bin"], "--format"),
        (vec!["export", path(&good), "--out", path(&target), "--format", "tflite"], "unknown format"),
        (vec!["export", path(&good), "--out", "x.pth", "--layer", "avgpool"], "--format onnx only"),
        (vec!["export", path(&good), "--out", path(&target), "--layer", "layer9"], "unknown layer"),
        (vec!["export", path(&good), "--out", path(&target), "--ema"], "no weight EMA"),
        (vec!["export", path(&good), "--out", "/nonexistent-dir/x.onnx"], "x.onnx"),
    ];
    for (args, needle) in cases {
        let o = resnet(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line, got {err}");
        assert!(err.contains(needle), "{args:?}: {err} should name {needle}");
    }
    assert!(!target.exists(), "nothing half-written");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 2, "no temporary files left: {leftovers:?}");
}
