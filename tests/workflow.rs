//! The main workflow from a user's folder to predictions, through the binary: `train --data FOLDER` with flags
//! only, then `eval` and `predict` with no `--arch`, which must agree image for image and name the folder's
//! classes; and every refusal of data or flags that cannot train, as one line with exit code 2.

use std::path::Path;
use std::process::{Command, Output};

use resnet_rs::data::shapes;

fn resnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_resnet")).args(args).output().expect("the binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `root/<name>/<i>.png`: the synthetic shapes of `resnet_rs::data::shapes` under the given class names.
fn folder(root: &Path, classes: &[&str], per_class: usize) {
    for (c, name) in classes.iter().enumerate() {
        std::fs::create_dir_all(root.join(name)).expect("mkdir");
        for i in 0..per_class {
            shapes::sample(c, i).save(root.join(name).join(format!("{i:03}.png"))).expect("png");
        }
    }
}

/// Runs the binary, expects exit code 2 and one stderr line that mentions every needle.
#[track_caller]
fn refused(args: &[&str], needles: &[&str]) -> String {
    let o = resnet(args);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "args {args:?}: stderr {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for needle in needles {
        assert!(err.contains(needle), "'{needle}' not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn train_small(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--data", s(data), "--out", s(out), "--arch", "resnet18", "--batch-size", "16"];
    args.extend_from_slice(extra);
    resnet(&args)
}

#[test]
fn a_model_trained_on_a_folder_predicts_what_eval_measured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("shapes");
    folder(&data, &["blob", "horizontal", "vertical"], 20);
    let run = dir.path().join("run");
    let o = train_small(&data, &run, &["--epochs", "2", "--workers", "1"]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    // The start-up line says what the folder defaults chose; the end names the best epoch and its file.
    assert!(err.contains("resnet18 (cifar stem) on folder"), "{err}");
    assert!(err.contains("input 28x28"), "{err}");
    assert!(err.contains("lr 0.0125 = 0.05 x 16/64"), "linear scaling: {err}");
    assert!(err.contains("best held-out top-1") && err.contains("best.safetensors"), "{err}");
    assert!(!err.contains("top5"), "no top-5 for 3 classes: {err}");

    let best = run.join("best.safetensors");
    let o = resnet(&["eval", "--weights", s(&best), "--per-image", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let report: serde_json::Value = serde_json::from_str(&text(&o.stdout)).expect("json");
    assert_eq!(report["classes"], serde_json::json!(["blob", "horizontal", "vertical"]));
    assert!(report.get("top5").is_none());
    let images = report["images"].as_array().expect("images");
    // A stratified 20 % of 20 per class: 4 of each.
    assert_eq!(images.len(), 12);
    for class in ["blob", "horizontal", "vertical"] {
        assert_eq!(images.iter().filter(|i| i["label"] == class).count(), 4, "{class}");
    }
    let files: Vec<&str> = images.iter().map(|i| i["file"].as_str().expect("file")).collect();
    let mut args = vec!["predict", "--weights", s(&best), "--json", "--top-k", "1"];
    args.extend(&files);
    let o = resnet(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let lines: Vec<serde_json::Value> =
        text(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), images.len());
    let mut right = 0;
    for (line, img) in lines.iter().zip(images) {
        assert_eq!(line["file"], img["file"]);
        assert_eq!(line["top"][0]["label"], img["predicted"], "{}", img["file"]);
        right += (img["predicted"] == img["label"]) as usize;
    }
    let top1 = report["top1"].as_f64().expect("top1");
    assert!((top1 - right as f64 / 12.0).abs() < 1e-9, "eval's top-1 {top1} is its per-image count {right}/12");

    // The text output names the class too, and features write NumPy's format by extension.
    let o = resnet(&["predict", "--weights", s(&best), "--top-k", "1", files[0]]);
    assert!(text(&o.stdout).contains(img_label(&lines[0])), "{}", text(&o.stdout));
    let npy = dir.path().join("f.npy");
    let o = resnet(&["features", "--weights", s(&best), "--out", s(&npy), files[0], files[1]]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let bytes = std::fs::read(&npy).expect("npy");
    assert!(bytes.starts_with(b"\x93NUMPY\x01\x00"));
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = text(&bytes[10..10 + header_len]);
    assert!(header.contains("'descr': '<f4'") && header.contains("'shape': (2, 512)"), "{header}");
    assert_eq!((10 + header_len) % 64, 0);
    assert_eq!(bytes.len(), 10 + header_len + 2 * 512 * 4);
    let names: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("f.files.json")).expect("names")).expect("json");
    assert_eq!(names, [files[0], files[1]]);
    refused(&["features", "--weights", s(&best), "--out", s(&dir.path().join("f.txt")), files[0]], &["f.txt", ".npy"]);

    // --arch is never needed, and a wrong one names what the file holds.
    refused(&["predict", "--weights", s(&best), "--arch", "resnet50", files[0]], &["holds a resnet18, not a resnet50"]);
}

fn img_label(line: &serde_json::Value) -> &str {
    line["top"][0]["label"].as_str().expect("label")
}

#[test]
fn resume_extends_a_finished_run_and_refuses_other_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("shapes");
    folder(&data, &["a", "b"], 8);
    let run = dir.path().join("run");
    let o = train_small(&data, &run, &["--epochs", "1", "--image-size", "16"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // Finished: says so and how to extend it.
    let o = resnet(&["train", "--resume", s(&run)]);
    assert!(o.status.success());
    assert!(text(&o.stderr).contains("the run is finished (1 of 1 epochs") && text(&o.stderr).contains("--epochs N"));
    refused(&["train", "--resume", s(&run), "--lr", "0.5"], &["--lr", "cannot apply"]);
    let o = resnet(&["train", "--resume", s(&run), "--epochs", "2", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let epochs: Vec<serde_json::Value> =
        text(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(epochs.len(), 1);
    assert_eq!(epochs[0]["epoch"], 2);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    assert!(metrics.contains("\"type\":\"note\"") && metrics.contains("epochs changed from 1 to 2"), "{metrics}");
}

#[test]
fn data_that_cannot_train_is_refused_before_the_run_folder_exists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let run = d.join("run");
    let one = d.join("one");
    folder(&one, &["only"], 5);
    refused(&["train", "--data", s(&one), "--out", s(&run)], &["at least two classes", "only"]);
    let two = d.join("two");
    folder(&two, &["a", "b"], 1);
    refused(&["train", "--data", s(&two), "--out", s(&run)], &["validation split is empty"]);
    let bad = d.join("bad");
    folder(&bad, &["a", "b"], 5);
    std::fs::write(bad.join("b/003.png"), b"not a png").expect("write");
    refused(&["train", "--data", s(&bad), "--out", s(&run), "--image-size", "16"], &["003.png"]);
    refused(&["train", "--data", s(&one), "--out", s(&run), "--freeze-until", "layer2"], &["needs --weights"]);
    assert!(!run.exists(), "no run folder is left behind");
    refused(&["train", "--epoch", "3"], &["a similar argument exists: '--epochs'"]);
    refused(&["predict"], &["--weights"]);
    refused(&["train", "--optimizer", "rmsprop"], &["sgd, adam, adamw"]);
    refused(&["train", "--data", s(&d.join("nowhere"))], &["nowhere", "no such folder"]);
}

#[test]
fn a_folder_smaller_than_one_batch_trains_with_a_partial_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("small");
    folder(&data, &["a", "b", "c"], 5);
    let run = dir.path().join("run");
    let o = resnet(&["train", "--data", s(&data), "--out", s(&run), "--epochs", "1", "--image-size", "16", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).lines().count(), 1);
}

#[test]
fn every_recipe_field_is_a_flag_with_help() {
    let help = text(&resnet(&["train", "--help"]).stdout);
    let lines: Vec<&str> = help.lines().map(str::trim_start).collect();
    for field in resnet_rs::train::recipe::FIELDS {
        let flag = format!("--{} ", field.replace('_', "-"));
        let at = lines
            .iter()
            .position(|l| l.starts_with(&flag))
            .unwrap_or_else(|| panic!("{flag} missing from train --help"));
        // The next line holds the help text, not the next flag.
        let next = lines.get(at + 1).copied().unwrap_or_default();
        assert!(!next.is_empty() && !next.starts_with("--"), "{flag} has no help text");
    }
}
