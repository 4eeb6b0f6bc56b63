//! The `resnet` binary end to end: info's counts, predict and features on the committed images with the
//! PyTorch-made checkpoint, and one-line errors with exit code 2 on bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Fixture, fixture};

fn resnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_resnet")).args(args).output().expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn info_prints_torchvision_counts() {
    let o = resnet(&["info", "--arch", "resnet34"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("parameters: 21,797,672"), "{out}");
    assert!(out.contains("MACs: 3.66 G at 224x224"), "{out}");
    assert!(out.contains("fp32 size: 83.2 MiB"), "{out}");
    let o = resnet(&["info", "--arch", "resnet18", "--stem", "cifar", "--classes", "10"]);
    assert!(stdout(&o).contains("layer4            2          512x4x4"), "{}", stdout(&o));
}

#[test]
fn predict_json_agrees_with_torchvision() {
    let f = Fixture::load("tiny/expected.safetensors");
    let names: Vec<&str> = f.metadata["files"].split(',').collect();
    let weights = fixture("tiny/resnet34_w4.pth");
    let labels = fixture("tiny/labels.txt");
    let images = fixture("images");
    let o = resnet(&[
        "predict",
        "--weights",
        path(&weights),
        "--labels",
        path(&labels),
        "--top-k",
        "3",
        "--json",
        path(&images),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), names.len());
    let logits = f.get("logits").data();
    for (i, (line, name)) in lines.iter().zip(&names).enumerate() {
        assert!(line["file"].as_str().unwrap().ends_with(name));
        let row = &logits[i * 10..(i + 1) * 10];
        let max = row.iter().cloned().fold(f32::MIN, f32::max);
        let z: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let top = line["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(top[0]["class"], best);
        for t in top {
            let c = t["class"].as_u64().unwrap() as usize;
            let want = ((row[c] - max) as f64).exp() / z;
            let got = t["probability"].as_f64().unwrap();
            assert!((got - want).abs() < 5e-3, "{name}: class {c} probability {got} vs torchvision {want}");
            assert_eq!(t["label"], ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][c]);
        }
    }
    let o = resnet(&["predict", "--weights", path(&weights), path(&fixture("images/cat.png"))]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with(path(&fixture("images/cat.png"))));
    assert_eq!(stdout(&o).lines().count(), 6, "file name plus top-5");
}

#[test]
fn features_file_holds_torchvision_features_and_names() {
    let f = Fixture::load("tiny/expected.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let weights = fixture("tiny/resnet34_w4.pth");
    for layer in ["avgpool", "layer2"] {
        let out = dir.path().join(format!("{layer}.safetensors"));
        let o = resnet(&[
            "features",
            "--weights",
            path(&weights),
            "--layer",
            layer,
            "--out",
            path(&out),
            path(&fixture("images")),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = resnet_rs::weights::safetensors::load(&out).unwrap();
        let files: Vec<std::path::PathBuf> = serde_json::from_str(&got.metadata["files"]).unwrap();
        let want: Vec<&str> = f.metadata["files"].split(',').collect();
        assert_eq!(files.len(), want.len());
        assert!(files.iter().zip(&want).all(|(a, b)| a.ends_with(b)));
        common::assert_rows_close(layer, &files, &got.tensors["features"], f.get(&format!("features.{layer}")));
    }
}

/// Runs the binary, expects exit code 2 and one stderr line that mentions `needle`.
#[track_caller]
fn fails_cleanly(args: &[&str], needle: &str) {
    let o = resnet(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "args {args:?}: stderr {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "'{needle}' not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_gives_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let weights = fixture("tiny/resnet34_w4.pth");
    let w = path(&weights);
    let cat = fixture("images/cat.png");
    let img = path(&cat);

    let missing = d.join("missing.png");
    fails_cleanly(&["predict", "--weights", w, path(&missing)], "missing.png");
    let text = d.join("notes.jpg");
    std::fs::write(&text, "not an image").unwrap();
    fails_cleanly(&["predict", "--weights", w, path(&text)], "notes.jpg");
    let truncated = d.join("truncated.png");
    std::fs::write(&truncated, &std::fs::read(&cat).unwrap()[..5000]).unwrap();
    fails_cleanly(&["predict", "--weights", w, path(&truncated)], "truncated.png");
    let palette = fixture("hostile/bad_palette.png");
    fails_cleanly(&["predict", "--weights", w, path(&palette)], "bad_palette.png: corrupt image");
    let empty_dir = d.join("empty");
    std::fs::create_dir(&empty_dir).unwrap();
    fails_cleanly(&["features", "--weights", w, "--out", path(&d.join("f.safetensors")), path(&empty_dir)], "empty");

    let bad_weights = d.join("weights.pth");
    std::fs::write(&bad_weights, &std::fs::read(&weights).unwrap()[..100_000]).unwrap();
    fails_cleanly(&["predict", "--weights", path(&bad_weights), img], "weights.pth");
    fails_cleanly(&["predict", "--weights", path(&missing), img], "missing.png");
    fails_cleanly(&["predict", "--weights", path(&text), img], "notes.jpg");
    fails_cleanly(&["predict", "--arch", "resnet50", "--weights", w, img], "resnet34_w4.pth");
    fails_cleanly(&["predict", "--arch", "resnet35", "--weights", w, img], "unknown arch 'resnet35'");
    fails_cleanly(&["predict", "--weights", w, "--labels", "imagenet", img], "1000 labels but the model has 10");
    let out = d.join("feats.safetensors");
    fails_cleanly(
        &["features", "--weights", w, "--layer", "layer7", "--out", path(&out), img],
        "unknown layer 'layer7'",
    );
    assert!(!out.exists(), "nothing is written on failure");
    fails_cleanly(&["info", "--stem", "tiny"], "unknown stem 'tiny'");
}

#[test]
fn train_json_then_eval_on_digits() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = resnet(&["train", "--arch", "resnet18", "--epochs", "1", "--json", "--out", path(&run)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "one JSON object per epoch, nothing else on stdout");
    for key in ["epoch", "train_loss", "val_loss", "val_top1", "val_top5", "images_per_s"] {
        assert!(lines[0][key].is_number(), "{key} in {}", lines[0]);
    }
    let top1 = lines[0]["val_top1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&top1));

    let o = resnet(&["eval", "--weights", path(&run.join("best.safetensors")), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!((report["top1"].as_f64().unwrap() - top1).abs() < 1e-9, "eval repeats the run's own validation");
    let confusion = report["confusion"].as_array().unwrap();
    assert_eq!(confusion.len(), 10);
    let total: u64 = confusion.iter().flat_map(|r| r.as_array().unwrap()).map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, 359, "the 20 % held-out digits");
    if cfg!(not(feature = "cuda")) {
        let auto = resnet(&["eval", "--weights", path(&run.join("best.safetensors")), "--json", "--device", "auto"]);
        assert_eq!(stdout(&auto), stdout(&o), "--device auto is the CPU in a build without the cuda feature");
    }
    let o = resnet(&["eval", "--weights", path(&run.join("best.safetensors"))]);
    assert!(stdout(&o).contains("confusion matrix"));

    fails_cleanly(&["train", "--out", path(&run)], "already holds a run");
    fails_cleanly(&["train", "--recipe", path(&dir.path().join("nope.toml"))], "nope.toml");
    fails_cleanly(&["train", "--resume", path(&dir.path().join("gone"))], "gone");
    fails_cleanly(
        &["train", "--arch", "resnet18", "--freeze-until", "layer9", "--out", path(&dir.path().join("r2"))],
        "layer9",
    );
    fails_cleanly(&["train", "--recipe", "cifar10", "--out", path(&dir.path().join("r3"))], "needs --data");
    fails_cleanly(
        &[
            "train",
            "--recipe",
            "cifar10",
            "--data",
            path(&dir.path().join("none")),
            "--out",
            path(&dir.path().join("r4")),
        ],
        "none",
    );
}

/// The three resource bombs of the hardening issue, end to end: each is refused before the claimed memory is
/// allocated (the test would take gigabytes or minutes otherwise), with one line and exit code 2.
#[test]
fn resource_bombs_are_refused_before_allocating() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cat = fixture("images/cat.png");
    let img = path(&cat);
    let tiny = fixture("tiny/resnet34_w4.pth");

    // A safetensors header claiming a 10^15-byte tensor, with 16 bytes of data behind it.
    let header = r#"{"fc.weight":{"dtype":"F32","shape":[250000000000000],"data_offsets":[0,1000000000000000]}}"#;
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(header.as_bytes());
    st.extend_from_slice(&[0u8; 16]);
    let huge = d.join("huge.safetensors");
    std::fs::write(&huge, st).unwrap();
    fails_cleanly(&["predict", "--weights", path(&huge), img], "huge.safetensors: not a valid safetensors file");

    // A PNG whose header claims 2^31-1 x 2^31-1 pixels (the largest PNG allows).
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        let mut h = crc32fast::Hasher::new();
        h.update(kind);
        h.update(data);
        c.extend_from_slice(&h.finalize().to_be_bytes());
        c
    };
    let side = (i32::MAX as u32).to_be_bytes();
    let ihdr = [&side[..], &side[..], &[8, 2, 0, 0, 0]].concat();
    let png = [&b"\x89PNG\r\n\x1a\n"[..], &chunk(b"IHDR", &ihdr), &chunk(b"IEND", &[])].concat();
    let giant = d.join("giant.png");
    std::fs::write(&giant, png).unwrap();
    fails_cleanly(
        &["predict", "--weights", path(&tiny), path(&giant)],
        "giant.png: not a readable JPEG/PNG image: Memory limit",
    );

    // The PyTorch checkpoint re-zipped with its storage replaced by 256 MiB of deflated zeros (~250 KiB).
    let mut src = zip::ZipArchive::new(std::fs::File::open(&tiny).unwrap()).unwrap();
    let bomb = d.join("bomb.pth");
    let mut out = zip::ZipWriter::new(std::fs::File::create(&bomb).unwrap());
    for i in 0..src.len() {
        let mut entry = src.by_index(i).unwrap();
        let name = entry.name().unwrap().to_string();
        if name.ends_with("/data/0") {
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .large_file(false);
            out.start_file(name, opts).unwrap();
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..256 {
                out.write_all(&zeros).unwrap();
            }
        } else {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            out.start_file(
                name,
                zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored),
            )
            .unwrap();
            out.write_all(&bytes).unwrap();
        }
    }
    out.finish().unwrap();
    assert!(std::fs::metadata(&bomb).unwrap().len() < 2 << 20);
    fails_cleanly(&["predict", "--weights", path(&bomb), img], "bomb.pth: resnet34_w4/data/0 claims 268435456 bytes");
}

#[test]
fn device_flag_is_parsed_and_a_missing_gpu_path_is_one_line() {
    let weights = fixture("tiny/resnet34_w4.pth");
    let cat = fixture("images/cat.png");
    let on_cpu = resnet(&["predict", "--weights", path(&weights), "--json", path(&cat)]);
    let auto = resnet(&["predict", "--weights", path(&weights), "--json", "--device", "auto", path(&cat)]);
    assert!(auto.status.success(), "{}", String::from_utf8_lossy(&auto.stderr));
    if cfg!(not(feature = "cuda")) {
        assert_eq!(stdout(&auto), stdout(&on_cpu), "auto without the cuda feature is the CPU");
        fails_cleanly(&["predict", "--weights", path(&weights), "--device", "cuda:1", path(&cat)], "--features cuda");
        fails_cleanly(&["bench", "--workload", "train", "--device", "cuda"], "--features cuda");
    }
    fails_cleanly(&["predict", "--weights", path(&weights), "--device", "tpu", path(&cat)], "unknown device 'tpu'");
    fails_cleanly(&["predict", "--weights", path(&weights), "--dtype", "tf32", path(&cat)], "--dtype tf32 needs a GPU");
    let bf16 = resnet(&["predict", "--weights", path(&weights), "--json", "--dtype", "bf16", path(&cat)]);
    if resnet_rs::engine::cpu::packed::bf16_supported() {
        // same top-1 class as f32 (the first field of the JSON line)
        assert!(bf16.status.success(), "{}", String::from_utf8_lossy(&bf16.stderr));
        let class = |s: &str| s.split("\"label\"").nth(1).map(|t| t.split(',').next().unwrap_or("").to_string());
        assert_eq!(class(&stdout(&bf16)), class(&stdout(&on_cpu)), "{} vs {}", stdout(&bf16), stdout(&on_cpu));
    } else {
        fails_cleanly(&["predict", "--weights", path(&weights), "--dtype", "bf16", path(&cat)], "AVX512-BF16");
    }
    fails_cleanly(&["predict", "--weights", path(&weights), "--dtype", "f16", path(&cat)], "unknown dtype 'f16'");
}

/// Every lower instruction-set level this CPU has, forced with `RESNET_CPU` (`engine::cpu::isa`: AVX2 runs `gemm`
/// and the AVX2 Winograd transforms instead of the packed AVX-512 kernels, portable plain Rust): the same
/// predictions as the default level, and bf16 (inference and training) refused in one line below AVX-512, with
/// no run folder left behind.
#[test]
fn every_cpu_level_predicts_the_same_and_refuses_bf16_below_avx512() {
    use resnet_rs::engine::cpu::isa::{self, Level};
    let weights = fixture("tiny/resnet34_w4.pth");
    let dir = fixture("images");
    let default = resnet(&["predict", "--weights", path(&weights), "--json", "--top-k", "3", path(&dir)]);
    let at = |level: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_resnet")).args(args).env("RESNET_CPU", level).output().unwrap()
    };
    for level in isa::available() {
        let forced = at(level.name(), &["predict", "--weights", path(&weights), "--json", "--top-k", "3", path(&dir)]);
        assert!(forced.status.success(), "{level:?}: {}", String::from_utf8_lossy(&forced.stderr));
        assert!(forced.stderr.is_empty(), "{level:?}: {}", String::from_utf8_lossy(&forced.stderr));
        assert_eq!(stdout(&forced), stdout(&default), "{level:?}");
        if level == Level::Avx512 {
            continue;
        }
        let bf16 = at(level.name(), &["predict", "--weights", path(&weights), "--dtype", "bf16", path(&dir)]);
        let err = String::from_utf8_lossy(&bf16.stderr);
        assert_eq!(bf16.status.code(), Some(2), "{level:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("AVX512-BF16"), "{err}");
        let run = tempfile::tempdir().unwrap().path().join("run");
        let train = at(level.name(), &["train", "--out", path(&run), "--dtype", "bf16", "--max-steps", "1"]);
        let err = String::from_utf8_lossy(&train.stderr);
        assert_eq!(train.status.code(), Some(2), "{level:?}: {err}");
        assert!(err.trim_end().lines().count() == 1 && err.contains("AVX512-BF16"), "{level:?}: {err}");
        assert!(!run.exists(), "{level:?}: a refused run writes nothing");
    }
    // A level the CPU lacks, or a misspelt one, is named on stderr and the detected level runs.
    let wrong = at("avx1024", &["predict", "--weights", path(&weights), "--json", "--top-k", "3", path(&dir)]);
    assert!(wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("RESNET_CPU=avx1024: expected avx512, avx2 or portable"));
    assert_eq!(stdout(&wrong), stdout(&default));
}

#[test]
fn train_device_and_dtype_are_refused_up_front_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = path(&run);
    if cfg!(not(feature = "cuda")) {
        fails_cleanly(&["train", "--out", out, "--device", "cuda"], "--features cuda");
        fails_cleanly(&["train", "--out", out, "--device", "cuda:1", "--dtype", "tf32"], "--features cuda");
        fails_cleanly(&["train", "--out", out, "--device", "cuda", "--dtype", "bf16"], "--features cuda");
        fails_cleanly(&["bench", "--workload", "train", "--device", "cuda", "--dtype", "bf16"], "--features cuda");
    }
    fails_cleanly(&["train", "--out", out, "--dtype", "tf32"], "--dtype tf32 needs a GPU");
    if !resnet_rs::engine::cpu::packed::bf16_supported() {
        fails_cleanly(&["train", "--out", out, "--dtype", "bf16"], "AVX512-BF16");
        fails_cleanly(&["bench", "--workload", "train", "--dtype", "bf16"], "AVX512-BF16");
    }
    fails_cleanly(&["train", "--out", out, "--device", "tpu"], "unknown device 'tpu'");
    assert!(!run.exists(), "a refused run writes nothing");
}

/// `--distributed` in a build without the `mpi` feature: one line naming the feature, exit 2.
#[cfg(not(feature = "mpi"))]
#[test]
fn distributed_without_the_mpi_build_is_one_line() {
    let o = resnet(&["train", "--distributed", "--max-steps", "1", "--out", "/nonexistent/never-created"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--features mpi"), "{err}");
}
