//! Shared test helpers: fixture loading, relative-error checks, and the deterministic init that
//! `python/fixtures/common.py` uses for the parity networks (weights are recomputed, not committed).
#![allow(dead_code)]

pub mod http;

use std::collections::BTreeMap;
use std::path::PathBuf;

use resnet_rs::ResNet;
use resnet_rs::Tensor;

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

pub struct Fixture {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

impl Fixture {
    pub fn load(rel: &str) -> Fixture {
        let l = resnet_rs::weights::safetensors::load(&fixture(rel)).unwrap_or_else(|e| panic!("{e}"));
        Fixture { tensors: l.tensors, metadata: l.metadata }
    }
    pub fn get(&self, key: &str) -> &Tensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("fixture has no '{key}'"))
    }
    pub fn usizes(&self, key: &str) -> Vec<usize> {
        self.get(key).data().iter().map(|&v| v as usize).collect()
    }
}

/// ‖a − b‖ / ‖b‖, or infinity when either side holds a NaN or an infinity.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let e = rel_err(got.data(), want.data());
    assert!(e <= tol, "{what}: relative error {e:.3e} exceeds {tol:.0e}");
}

#[track_caller]
pub fn assert_close_slice(what: &str, got: &[f32], want: &Tensor, tol: f64) {
    let e = rel_err(got, want.data());
    assert!(e <= tol, "{what}: relative error {e:.3e} exceeds {tol:.0e}");
}

fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

fn splitmix_u(seed: u64, i: u64) -> f64 {
    let mut z = seed.wrapping_add(i.wrapping_mul(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^= z >> 31;
    (z >> 40) as f64 / (1u64 << 24) as f64
}

/// Arbitrary deterministic values in [-1, 1) (xorshift), for tests and benches that need data but no PyTorch
/// counterpart.
pub fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The value python/fixtures/common.py's `det_init` gives tensor `name` of `shape`.
pub fn det_values(name: &str, shape: &[usize]) -> Vec<f32> {
    let seed = fnv1a64(name);
    let n: usize = shape.iter().product();
    let value = |u: f64| -> f64 {
        if shape.len() == 4 {
            let scale = 3.0f64.sqrt() * (2.0 / (shape[0] * shape[2] * shape[3]) as f64).sqrt();
            (2.0 * u - 1.0) * scale
        } else if name.starts_with("fc.") {
            let fan_in = if name == "fc.bias" { None } else { Some(shape[1]) };
            let scale = 1.0 / (fan_in.expect("fc.bias uses fc.weight's fan-in; use det_init") as f64).sqrt();
            (2.0 * u - 1.0) * scale
        } else if name.ends_with("running_mean") || name.ends_with(".bias") {
            0.2 * (u - 0.5)
        } else if name.ends_with("running_var") {
            0.5 + u
        } else {
            0.8 + 0.4 * u
        }
    };
    (1..=n as u64).map(|i| value(splitmix_u(seed, i)) as f32).collect()
}

/// The network a parity fixture describes in its metadata (arch, widths, stem, classes), with det_init weights.
pub fn det_net(f: &Fixture) -> ResNet {
    use resnet_rs::{Arch, ResNetConfig};
    let m = &f.metadata;
    let arch: Arch = m["arch"].parse().unwrap();
    let widths: Vec<usize> = m["widths"].split(',').map(|w| w.parse().unwrap()).collect();
    let config = ResNetConfig {
        stem: m["stem"].parse().unwrap(),
        widths: [widths[0], widths[1], widths[2], widths[3]],
        ..ResNetConfig::new(arch, m["classes"].parse().unwrap())
    };
    let mut model = ResNet::new(config, 0);
    det_init(&mut model);
    model
}

/// Overwrite every parameter and buffer of `model` with the fixtures' deterministic values.
pub fn det_init(model: &mut ResNet) {
    let fc_in = model.config.feature_dim();
    let seed_fc_bias = fnv1a64("fc.bias");
    let mut state = model.state_dict();
    for (name, t) in state.iter_mut() {
        let data = if name == "fc.bias" {
            let scale = 1.0 / (fc_in as f64).sqrt();
            (1..=t.numel() as u64).map(|i| ((2.0 * splitmix_u(seed_fc_bias, i) - 1.0) * scale) as f32).collect()
        } else {
            det_values(name, t.shape())
        };
        *t = Tensor::new(t.shape(), data).unwrap();
    }
    model.load_state_dict(&state).unwrap();
}

/// Relative error allowed between our output for an image file and torchvision's: PNG decoding is exact, so only
/// arithmetic differs; JPEG decoders (the `image` crate's vs PIL's libjpeg-turbo) differ by about one level on
/// part of the pixels, which moves the reduced test network's outputs by up to 2e-3 (measured).
pub fn image_tolerance(file: &std::path::Path) -> f64 {
    match file.extension().and_then(|e| e.to_str()) {
        Some("png") => 1e-5,
        _ => 5e-3,
    }
}

/// Compare `[N, D]` rows, one per image file, each at its file's tolerance.
#[track_caller]
pub fn assert_rows_close(what: &str, files: &[PathBuf], got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let d = got.shape()[1];
    for (i, file) in files.iter().enumerate() {
        let e = rel_err(&got.data()[i * d..(i + 1) * d], &want.data()[i * d..(i + 1) * d]);
        let tol = image_tolerance(file);
        assert!(e <= tol, "{what} of {}: relative error {e:.3e} exceeds {tol:.0e}", file.display());
    }
}

/// A training run of `recipe` into `dir` with the loop's defaults (no resume, no step limit, quiet).
pub fn train_args(recipe: resnet_rs::Recipe, dir: &std::path::Path) -> resnet_rs::TrainArgs {
    resnet_rs::TrainArgs {
        recipe,
        run_dir: dir.to_path_buf(),
        resume: false,
        resume_epochs: None,
        announce: None,
        skip_nonfinite: false,
        max_steps: None,
        json: false,
        interrupt: None,
        comm: None,
    }
}

/// Every tensor of the run's `last.safetensors` (network, optimiser state, weight EMA).
pub fn last_checkpoint(dir: &std::path::Path) -> BTreeMap<String, Tensor> {
    resnet_rs::weights::safetensors::load(&dir.join("last.safetensors")).unwrap().tensors
}
