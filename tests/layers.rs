//! The dependency rule, held by a test: `cli → train/infer → exec → model, engine`, with `data`, `imaging`,
//! `weights`, `fetch` and `files` beside them importing neither `train`, `infer`, `exec` nor `cli`. The kernel layer
//! (`engine`) sees tensors, buffers and shapes only, so it imports nothing of the crate but itself and `error`.
//! A `crate::` path in a source file names the layer it reaches; one pointing up fails here with the file and line.

use std::path::{Path, PathBuf};

/// Top-level modules that each layer may name with `crate::`.
const RULES: &[(&str, &[&str])] = &[
    ("engine", &["engine", "error"]),
    ("model", &["model", "engine", "error"]),
    ("exec", &["exec", "model", "engine", "error"]),
    ("imaging", &["imaging", "engine", "error"]),
    ("files", &["files", "error"]),
    ("fetch", &["fetch", "files", "error"]),
    ("data", &["data", "imaging", "fetch", "files", "engine", "error"]),
    ("weights", &["weights", "model", "fetch", "files", "engine", "error"]),
    ("export", &["export", "weights", "infer", "model", "engine", "error"]),
];

fn sources(at: &Path, out: &mut Vec<PathBuf>) {
    if at.is_file() {
        out.push(at.to_path_buf());
        return;
    }
    let Ok(entries) = std::fs::read_dir(at) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() || p.extension().is_some_and(|x| x == "rs") {
            sources(&p, out);
        }
    }
}

/// Every `crate::NAME` in `text`, with its line number.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for (at, _) in code.match_indices("crate::") {
            let before = code[..at].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // `resnet_rs::…` style paths are not `crate::`
            }
            let name: String = code[at + 7..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            found.push((i + 1, name));
        }
    }
    found
}

#[test]
fn layers_import_only_downwards() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    let mut checked = 0;
    for (layer, allowed) in RULES {
        let mut files = Vec::new();
        sources(&src.join(layer), &mut files);
        sources(&src.join(format!("{layer}.rs")), &mut files);
        assert!(!files.is_empty(), "layer {layer} has no source files");
        for f in files {
            let text = std::fs::read_to_string(&f).expect("source readable");
            for (line, name) in crate_paths(&text) {
                checked += 1;
                if !allowed.contains(&name.as_str()) {
                    broken.push(format!("{}:{line}: {layer} imports crate::{name}", f.display()));
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} crate:: paths seen: the scan is broken");
    assert!(broken.is_empty(), "imports pointing up a layer:\n{}", broken.join("\n"));
}

#[test]
fn the_scan_sees_an_upward_import() {
    let text = "use crate::engine::Tensor;\nuse crate::train::optim::widen; // no\n// crate::cli in a comment\n";
    let names: Vec<String> = crate_paths(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["engine", "train"]);
}
