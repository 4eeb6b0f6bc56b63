//! int8 inference, checked as users rely on it: an int8 convolution computes the f32 convolution of its
//! dequantized operands (so the quad-plane im2col and the weights' reordered depth line up, for every geometry
//! ResNet has, and the stem's zero point survives padding, on every CPU level), lands near the f32 convolution of the originals, and a quantized digits
//! model classifies the held-out split as its f32 self does.

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand_distr::{Distribution, Normal};
use resnet_rs::Cpu;
use resnet_rs::engine::cpu::conv2d_int8;
use resnet_rs::engine::cpu::int8::{Int8Weight, QuantParams};
use resnet_rs::engine::{Backend, ConvGeom, Tensor};

fn random(rng: &mut Xoshiro256PlusPlus, shape: &[usize], relu: bool) -> Tensor {
    let normal = Normal::new(0.0f32, 1.0).expect("finite std");
    let n = shape.iter().product();
    let v = (0..n).map(|_| normal.sample(rng)).map(|v| if relu { v.max(0.0) } else { v }).collect();
    Tensor::new(shape, v).expect("n values")
}

/// ‖a − b‖ / ‖b‖, NaN when either holds a NaN.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    if a.iter().chain(b).any(|v| v.is_nan()) { f64::NAN } else { (num / den.max(1e-30)).sqrt() }
}

/// w quantized and dequantized per output channel as `Int8Weight` does it (symmetric, max|w|/127).
fn fake_quant_weight(w: &Tensor) -> Tensor {
    let per = w.numel() / w.shape()[0];
    let data = w
        .data()
        .chunks(per)
        .flat_map(|row| {
            let scale = row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            row.iter().map(move |v| (v / scale).round_ties_even().clamp(-127.0, 127.0) * scale).collect::<Vec<_>>()
        })
        .collect();
    Tensor::new(w.shape(), data).unwrap()
}

fn fake_quant_input(x: &Tensor, p: QuantParams) -> Tensor {
    let q = |v: f32| ((v / p.scale).round_ties_even() + p.zero_point as f32).clamp(0.0, 255.0);
    let data = x.data().iter().map(|&v| (q(v) - p.zero_point as f32) * p.scale).collect();
    Tensor::new(x.shape(), data).unwrap()
}

#[test]
fn int8_convolutions_are_the_f32_convolutions_of_their_dequantized_operands() {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
    // (input [N, C, H, W], weight [O, C, k, k], stride, padding): ResNet's 3x3 s1/s2, 1x1 s2 shortcut and
    // bottleneck 1x1 s1, with maps that fill no whole vector and groups of several images.
    let cases = [
        ([2, 64, 14, 14], [64, 64, 3], 1, 1),
        ([1, 64, 15, 15], [128, 64, 3], 2, 1),
        ([3, 128, 7, 7], [256, 128, 1], 2, 0),
        ([8, 256, 7, 7], [64, 256, 1], 1, 0),
        ([2, 8, 3, 3], [8, 8, 3], 1, 1),
    ];
    for (xs, [o, c, k], stride, pad) in cases {
        let x = random(&mut rng, &xs, true);
        let w = random(&mut rng, &[o, c, k, k], false);
        let max = x.data().iter().fold(0.0f32, |m, &v| m.max(v));
        let input = QuantParams::covering(0.0, max);
        let geom = ConvGeom { stride: (stride, stride), padding: (pad, pad) };
        let weight = Int8Weight::conv(w.data(), [o, c, k, k]).expect("channels in fours");
        let got = conv2d_int8(&x, &weight, input, [o, c, k, k], geom, None);
        let dequantized = Cpu::F32.conv2d(&fake_quant_input(&x, input), &fake_quant_weight(&w), geom);
        let e = rel_err(got.data(), dequantized.data());
        assert!(e <= 1e-5, "{xs:?} * {:?}: {e:e} from the dequantized operands' convolution", [o, c, k, k]);
        let f32_conv = Cpu::F32.conv2d(&x, &w, geom);
        let e = rel_err(got.data(), f32_conv.data());
        assert!(e <= 2e-2, "{xs:?}: {e:e} from the f32 convolution (quantization error)");
    }
}

#[test]
fn the_stems_int8_convolution_handles_negative_inputs_and_odd_channel_counts() {
    // The stem's input is a normalised image (negative values: a zero point above 0) with 3 or 1 channels; its
    // f32 columns are quantized as they are multiplied, and padding must still read as real 0.
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
    for (xs, [o, c, k], stride, pad) in [([2, 3, 29, 29], [64, 3, 7], 2, 3), ([4, 1, 8, 8], [16, 1, 3], 1, 1)] {
        let x = random(&mut rng, &xs, false);
        let w = random(&mut rng, &[o, c, k, k], false);
        let (lo, hi) = x.data().iter().fold((0.0f32, 0.0f32), |(l, h), &v| (l.min(v), h.max(v)));
        let input = QuantParams::covering(lo, hi);
        assert!(input.zero_point > 0, "a range below 0 has a zero point above 0");
        let geom = ConvGeom { stride: (stride, stride), padding: (pad, pad) };
        let weight = Int8Weight::new(w.data(), o, c * k * k);
        assert!(!weight.takes_quad_planes(), "a weight in its own order takes f32 columns");
        let got = conv2d_int8(&x, &weight, input, [o, c, k, k], geom, None);
        let dequantized = Cpu::F32.conv2d(&fake_quant_input(&x, input), &fake_quant_weight(&w), geom);
        let e = rel_err(got.data(), dequantized.data());
        assert!(e <= 1e-5, "{xs:?}: {e:e} from the dequantized operands' convolution");
        let e = rel_err(got.data(), Cpu::F32.conv2d(&x, &w, geom).data());
        assert!(e <= 2e-2, "{xs:?}: {e:e} from the f32 convolution");
    }
}

fn resnet(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_resnet")).args(args).output().expect("the binary runs")
}

fn eval_json(weights: &str, dtype: &str) -> serde_json::Value {
    let o = resnet(&["eval", "--weights", weights, "--dtype", dtype, "--per-image", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("json")
}

#[test]
fn a_quantized_digits_model_classifies_as_its_f32_self() {
    // The issue's accuracy target on real data: a fine-tuned digits model loses at most 0.5 points of held-out
    // top-1 in int8, and agrees with its f32 predictions on at least 99 % of the images.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let o = resnet(&["train", "--arch", "resnet18", "--epochs", "4", "--out", &s(&run)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (best, q) = (s(&run.join("best.safetensors")), s(&dir.path().join("q.safetensors")));
    let o = resnet(&["quantize", "--weights", &best, "--calibrate", "train", "--images", "128", "--out", &q]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("on 128 image(s)"), "{err}");

    let (f, i) = (eval_json(&q, "f32"), eval_json(&q, "int8"));
    assert_eq!(f["top1"], eval_json(&best, "f32")["top1"], "the quantized file still runs in f32 as before");
    let (tf, ti) = (f["top1"].as_f64().unwrap(), i["top1"].as_f64().unwrap());
    assert!(tf > 0.8, "the f32 model learned the digits: {tf}");
    assert!(tf - ti <= 0.005, "int8 top-1 {ti} against f32 {tf}");
    let (a, b) = (f["images"].as_array().unwrap(), i["images"].as_array().unwrap());
    let same = a.iter().zip(b).filter(|(x, y)| x["predicted"] == y["predicted"]).count();
    assert!(same * 100 >= 99 * a.len(), "int8 agrees with f32 on {same} of {} images", a.len());

    // Refusals: one line, exit code 2.
    let refused = |args: &[&str], needle: &str| {
        let o = resnet(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(needle) && err.trim().lines().count() == 1, "'{needle}' not in: {err}");
    };
    refused(&["eval", "--weights", &best, "--dtype", "int8"], "needs weights written by `resnet quantize`");
    refused(&["eval", "--weights", &q, "--dtype", "int8", "--device", "cuda"], "");
    refused(&["train", "--dtype", "int8", "--out", &s(&dir.path().join("x"))], "--dtype int8 is for inference");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    refused(&["quantize", "--weights", &best, "--calibrate", &s(&empty), "--out", &q], "");
    // A file whose calibration was tampered with is named in the error.
    // (In the header the calibration is a JSON string inside JSON: its quotes are escaped.)
    let mut bytes = std::fs::read(&q).unwrap();
    let (from, to) = (br#"\"method\":"#, br#"\"methdo\":"#);
    let at = bytes.windows(from.len()).position(|w| w == from).expect("the calibration's method in the header");
    bytes[at..at + to.len()].copy_from_slice(to);
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, &bytes).unwrap();
    refused(&["eval", "--weights", &s(&bad), "--dtype", "int8"], "bad.safetensors: bad `quantization` metadata");
}
