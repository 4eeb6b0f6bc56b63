//! Pretrained weights by name (`weights::hub`), end to end through the CLI against a mirror on 127.0.0.1:
//! `--weights torchvision:resnet34` downloads torchvision's file name once, verifies its SHA-256 prefix, caches
//! it and predicts with ImageNet's labels; wrong bytes under the right name, a truncated, missing, stalled or
//! unreachable download each fail in one line (exit 2) that names the URL and the fix, and leave the cache empty.
//!
//! The mirror cannot serve torchvision's real file (no network here), and the name's 8 hex digits are a real
//! check, so the served resnet34 is one whose SHA-256 does start with `b627a593`: deterministic weights (the
//! parity fixtures' `det_values`) written as safetensors, whose last four weights are a nonce found by brute
//! force (about 2^32 SHA-256 tails from a shared midstate: `cargo test --release --test weights_hub --
//! --ignored find_resnet34_nonce --nocapture`, 36 s on 2 AMD EPYC cores with SHA-NI; the expected time is about twice that). Our loaders tell formats apart by
//! content, so a safetensors body under a `.pth` name loads as torchvision's would.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::http::{Reply, Server};
use resnet_rs::weights::hub::{self, PUBLISHED};
use resnet_rs::{Arch, ResNet, ResNetConfig, Stem};
use sha2::{Digest, Sha256};

/// The nonce that gives `resnet34_bytes` a SHA-256 starting with torchvision's `b627a593`.
const RESNET34_NONCE: u64 = 0x1a19ef0b;

const BIN: &str = env!("CARGO_BIN_EXE_resnet");

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Names, shapes and deterministic values of `arch`'s state_dict with 1000 classes (buffers included, no
/// `num_batches_tracked`, which the loader does not need).
fn det_state(arch: Arch) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut model = ResNet::new(ResNetConfig::new(arch, 1000), 0);
    common::det_init(&mut model);
    model.state_dict().into_iter().map(|(k, t)| (k, (t.shape().to_vec(), t.data().to_vec()))).collect()
}

/// A safetensors file written by hand (header JSON in key order, data in the same order), so that its bytes
/// depend on nothing but the values.
fn safetensors_bytes(state: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Vec<u8> {
    let mut header = String::from("{");
    let mut offset = 0usize;
    for (i, (name, (shape, values))) in state.iter().enumerate() {
        let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
        let end = offset + values.len() * 4;
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            dims.join(",")
        ));
        offset = end;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for (_, values) in state.values() {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Four small finite weights (in [2^-7, 2^-6)) carrying 64 bits of nonce.
fn nonce_bytes(nonce: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_mut(4).enumerate() {
        let bits = 0x3c00_0000u32 | (((nonce >> (16 * i)) & 0xffff) as u32) << 7;
        chunk.copy_from_slice(&f32::from_bits(bits).to_le_bytes());
    }
    out
}

/// The served resnet34: det weights whose last four (the end of `layer4.2.conv2.weight`, last in key order)
/// are the nonce.
fn resnet34_bytes(nonce: u64) -> Vec<u8> {
    let state = det_state(resnet_rs::model::FAMILY[1]);
    assert_eq!(state.keys().last().map(String::as_str), Some("layer4.2.conv2.weight"));
    let mut bytes = safetensors_bytes(&state);
    let n = bytes.len();
    bytes[n - 16..].copy_from_slice(&nonce_bytes(nonce));
    bytes
}

#[test]
#[ignore = "a brute-force search of minutes: run it when resnet34_bytes changes"]
fn find_resnet34_nonce() {
    use rayon::prelude::*;
    let bytes = resnet34_bytes(0);
    let mut midstate = Sha256::new();
    midstate.update(&bytes[..bytes.len() - 16]);
    let want = [0xb6u8, 0x27, 0xa5, 0x93];
    let found = (0..u64::MAX).into_par_iter().find_any(|&nonce| {
        let mut h = midstate.clone();
        h.update(nonce_bytes(nonce));
        h.finalize()[..4] == want
    });
    let nonce = found.expect("a nonce exists in 2^64");
    assert!(sha256_hex(&resnet34_bytes(nonce)).starts_with("b627a593"));
    println!("RESNET34_NONCE = {nonce:#x}");
}

struct Env {
    _tmp: tempfile::TempDir,
    cache: PathBuf,
    torch: PathBuf,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let torch = tmp.path().join("torch");
        Env { cache, torch, _tmp: tmp }
    }

    /// `resnet ARGS` with the cache, PyTorch's cache and the mirror pointed at this test's folders and server.
    fn run(&self, mirror: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("RESNET_CACHE", &self.cache)
            .env("TORCH_HOME", &self.torch)
            .env("RESNET_DOWNLOAD_TIMEOUT", "2")
            .env_remove("XDG_CACHE_HOME");
        match mirror {
            Some(m) => cmd.env("RESNET_WEIGHTS_MIRROR", m),
            None => cmd.env_remove("RESNET_WEIGHTS_MIRROR"),
        };
        cmd.output().expect("the binary runs")
    }

    /// Every file left in the cache (temporaries included).
    fn cached(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.cache.join("weights"))
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The one-line error of a run that had to fail with exit code 2.
#[track_caller]
fn failure(o: &Output) -> String {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "expected exit 2, got {:?}: {err}", o.status);
    assert_eq!(err.trim_end().lines().count(), 1, "error is not one line: {err:?}");
    err.trim_end().to_string()
}

/// A loopback URL with no listener (a port bound and released): connections are refused at once.
fn unreachable_base() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("http://127.0.0.1:{port}")
}

fn image(name: &str) -> String {
    common::fixture(&format!("images/{name}")).to_str().unwrap().to_string()
}

#[test]
fn torchvision_name_downloads_once_verifies_and_predicts_with_imagenet_labels() {
    let bytes = resnet34_bytes(RESNET34_NONCE);
    assert!(
        sha256_hex(&bytes).starts_with("b627a593"),
        "the served resnet34 no longer hashes to b627a593 (its weights changed): rerun find_resnet34_nonce"
    );
    let server = Server::start(Reply::Body(bytes));
    let env = Env::new();
    let mirror = format!("{}/models/", server.base());
    let photo = image("coffee.jpg");
    let args = ["predict", "--weights", "torchvision:resnet34", "--json", "--top-k", "3", &photo];
    let first = env.run(Some(&mirror), &args);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert_eq!(server.hits(), 1);
    assert_eq!(env.cached(), ["resnet34-b627a593.pth"], "exactly the verified file is cached");

    // ImageNet's names, as torchvision's weights.meta["categories"], without --labels.
    let imagenet: Vec<&str> = include_str!("../src/infer/imagenet_classes.txt").lines().collect();
    let line: serde_json::Value = serde_json::from_str(text(&first.stdout).trim()).unwrap();
    let top = line["top"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    for t in top {
        let (class, label) = (t["class"].as_u64().unwrap() as usize, t["label"].as_str().unwrap());
        assert_eq!(label, imagenet[class], "label of class {class}");
    }

    // The second run uses the cache (no request), and the cached file predicts the same as the name.
    let again = env.run(Some(&mirror), &args);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(server.hits(), 1, "the cached file was used");
    assert_eq!(text(&again.stdout), text(&first.stdout));
    let local = env.cache.join("weights/resnet34-b627a593.pth");
    let direct = env.run(None, &["predict", "--weights", local.to_str().unwrap(), "--json", "--top-k", "3", &photo]);
    assert_eq!(text(&direct.stdout), text(&first.stdout));

    // A cached file corrupted on disk is found before use and fetched again.
    let mut bad = std::fs::read(&local).unwrap();
    bad[100] ^= 1;
    std::fs::write(&local, bad).unwrap();
    let repaired = env.run(Some(&mirror), &args);
    assert!(repaired.status.success(), "{}", text(&repaired.stderr));
    assert!(text(&repaired.stderr).contains("downloading it again"), "{}", text(&repaired.stderr));
    assert_eq!(server.hits(), 2);
    assert_eq!(text(&repaired.stdout), text(&first.stdout));
    assert!(sha256_hex(&std::fs::read(&local).unwrap()).starts_with("b627a593"));
}

#[test]
fn a_file_pytorch_already_downloaded_is_used_in_place() {
    let env = Env::new();
    let checkpoints = env.torch.join("hub/checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();
    std::fs::write(checkpoints.join("resnet34-b627a593.pth"), resnet34_bytes(RESNET34_NONCE)).unwrap();
    // A mirror nobody answers at: only PyTorch's cache can.
    let o = env.run(Some(&unreachable_base()), &["weights", "fetch", "torchvision:resnet34"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), checkpoints.join("resnet34-b627a593.pth").to_str().unwrap());
    assert!(env.cached().is_empty());
}

#[test]
fn wrong_bytes_under_the_right_name_are_refused_and_not_cached() {
    let server = Server::start(Reply::Body(b"not the weights torchvision published".to_vec()));
    let env = Env::new();
    let mirror = server.base().to_string();
    let o = env.run(Some(&mirror), &["predict", "--weights", "torchvision:resnet18", &image("cat.png")]);
    let err = failure(&o);
    let found = &sha256_hex(b"not the weights torchvision published")[..8];
    for part in [
        format!("{mirror}/resnet18-f37072fd.pth"),
        "expected prefix f37072fd".to_string(),
        format!("found {found}"),
        "nothing was cached".to_string(),
        env.cache.join("weights/resnet18-f37072fd.pth").display().to_string(),
    ] {
        assert!(err.contains(&part), "{part:?} missing from: {err}");
    }
    assert!(env.cached().is_empty(), "left in the cache: {:?}", env.cached());
}

#[test]
fn truncated_missing_stalled_and_unreachable_downloads_fail_in_one_line() {
    let body = resnet34_bytes(RESNET34_NONCE);
    let cases: Vec<(&str, Option<Server>, &str)> = vec![
        ("truncated", Some(Server::start(Reply::CutAfter(body.clone(), 1000))), "download failed after 1000 of"),
        ("404", Some(Server::start(Reply::Status(404))), "HTTP 404"),
        ("stalled", Some(Server::start(Reply::Stall(body, 1000))), "after 1000 of 87275112 bytes: timeout"),
        ("unreachable", None, "download failed"),
    ];
    for (what, server, says) in cases {
        let env = Env::new();
        let mirror = server.as_ref().map_or_else(unreachable_base, |s| s.base().to_string());
        let started = std::time::Instant::now();
        let o = env.run(Some(&mirror), &["weights", "fetch", "torchvision:resnet34"]);
        let err = failure(&o);
        assert!(started.elapsed().as_secs() < 20, "{what}: took {:?}", started.elapsed());
        assert!(err.contains(says), "{what}: {says:?} missing from: {err}");
        assert!(err.contains(&format!("{mirror}/resnet34-b627a593.pth")), "{what}: URL missing from: {err}");
        assert!(err.contains("put the file (SHA-256 starting b627a593) at"), "{what}: no by-hand hint: {err}");
        assert!(env.cached().is_empty(), "{what}: left in the cache: {:?}", env.cached());
    }
}

#[test]
fn any_url_with_a_hash_prefix_or_fragment_works_the_same_way() {
    let tmp = tempfile::tempdir().unwrap();
    let arch: Arch = "resnet18".parse().unwrap();
    let model = ResNet::new(ResNetConfig { stem: Stem::Cifar, ..ResNetConfig::new(arch, 3) }, 7);
    let file = tmp.path().join("m.safetensors");
    resnet_rs::save_model(&model, &file, &BTreeMap::new()).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let digest = sha256_hex(&bytes);
    let server = Server::start(Reply::Body(bytes));
    let env = Env::new();

    let by_name = server.url(&format!("tiny-{}.safetensors", &digest[..10]));
    let o = env.run(None, &["weights", "fetch", &by_name]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(env.cached(), [format!("tiny-{}.safetensors", &digest[..10])]);

    let by_fragment = format!("{}#sha256={}", server.url("model.safetensors"), &digest);
    let o = env.run(None, &["weights", "fetch", &by_fragment]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = env.run(None, &["predict", "--weights", &by_fragment, &image("cat.png")]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(server.hits(), 2, "predict used the cached copy");

    // No prefix anywhere: refused before any request, with the way out.
    let err = failure(&env.run(None, &["weights", "fetch", &server.url("model.pth")]));
    assert!(err.contains("#sha256=<hex>"), "{err}");
    let err = failure(&env.run(None, &["weights", "fetch", "torchvision:resnet35"]));
    assert!(err.contains("torchvision:resnet34:IMAGENET1K_V1"), "{err}");
    assert_eq!(server.hits(), 2);
}

#[test]
fn names_resolve_as_torchvision_tabulates_them() {
    // tests/fixtures/torchvision_weights.json: written by python/make_fixtures.py from torchvision's enums.
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("torchvision_weights.json")).unwrap()).unwrap();
    let entries = table.as_array().unwrap();
    assert_eq!(entries.len(), PUBLISHED.len());
    for e in entries {
        let name = format!("torchvision:{}:{}", e["arch"].as_str().unwrap(), e["tag"].as_str().unwrap());
        let p = hub::lookup(&name).unwrap();
        let url = e["url"].as_str().unwrap();
        assert_eq!(format!("{}/{}", hub::TORCHVISION_BASE, p.file), url, "{name}");
        assert_eq!(p.resize as u64, e["resize"].as_u64().unwrap(), "{name}");
        assert_eq!(p.default, e["default"].as_bool().unwrap(), "{name}");
        assert!((p.top1 as f64 - e["top1"].as_f64().unwrap()).abs() < 1e-3, "{name}");
        assert_eq!(hub::hash_prefix(p.file).unwrap().len(), 8);
        if p.default {
            assert_eq!(hub::lookup(&format!("torchvision:{}", e["arch"].as_str().unwrap())).unwrap(), p);
        }
    }
    assert_eq!(hub::hash_prefix("resnet34-b627a593.pth").as_deref(), Some("b627a593"));
    assert_eq!(hub::hash_prefix("model.safetensors"), None);
    assert_eq!(hub::hash_prefix("my-model-0123abcd.pth").as_deref(), Some("0123abcd"));
    assert_eq!(hub::hash_prefix("r-abc.pth"), None, "3 digits are no check");
}

#[test]
fn a_v2_file_gets_its_published_resize() {
    // torchvision's IMAGENET1K_V2 transforms resize to 232, not 256; a file under that name keeps them.
    let tmp = tempfile::tempdir().unwrap();
    let arch: Arch = "resnet50".parse().unwrap();
    let model = ResNet::new(ResNetConfig::new(arch, 1000), 0);
    for (file, resize) in [("resnet50-11ad3fa6.pth", 232), ("resnet50-0676ba61.pth", 256), ("mine.pth", 256)] {
        let path = tmp.path().join(file);
        resnet_rs::save_model(&model, &path, &BTreeMap::new()).unwrap();
        let opened = resnet_rs::open_model(&path, None, resnet_rs::Variant::Live).unwrap();
        assert_eq!(opened.card.preprocess.resize, resize, "{file}");
        assert_eq!(opened.card.preprocess.size, 224, "{file}");
        std::fs::remove_file(&path).unwrap();
    }
}
