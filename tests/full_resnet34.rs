//! Full-size check, run by hand: `python python/make_fixtures.py --full` writes a torchvision resnet34 with random
//! weights (87 MB, not committed) and PyTorch's logits on the committed images to fixtures-full/; then
//! `cargo test --release --test full_resnet34 -- --ignored --nocapture` compares ours and prints the error and the
//! time per image.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use resnet_rs::Cpu;
use resnet_rs::Mode;
use resnet_rs::Runner;
use resnet_rs::{DeviceSpec, Precision, Target};
use resnet_rs::{infer, weights};

#[test]
#[ignore = "needs fixtures-full/ from python/make_fixtures.py --full"]
fn full_torchvision_resnet34_gives_pytorch_logits() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures-full");
    let expected = weights::safetensors::load(&dir.join("expected.safetensors")).unwrap();
    let files: Vec<PathBuf> =
        expected.metadata["files"].split(',').map(|n| common::fixture(&format!("images/{n}"))).collect();
    let mut model = weights::load_model("resnet34".parse().unwrap(), &dir.join("resnet34.pth")).unwrap();
    let x = infer::load_batch(&files, &resnet_rs::infer::card::Preprocess::imagenet()).unwrap();
    let logits = model.forward(&Cpu::F32, &x, Mode::Eval);
    let e32 = common::rel_err(logits.data(), expected.tensors["logits"].data());
    let e64 = common::rel_err(logits.data(), expected.tensors["logits64"].data());
    let top1 = |t: &[f32]| -> Vec<usize> {
        t.chunks(1000).map(|r| r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0).collect()
    };
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        model.forward(&Cpu::F32, &x, Mode::Eval);
        times.push(t.elapsed().as_secs_f64() * 1000.0 / files.len() as f64);
    }
    times.sort_by(f64::total_cmp);
    println!("relative error vs PyTorch f32 logits: {e32:.2e}, vs float64 reference: {e64:.2e}");
    for (i, f) in files.iter().enumerate() {
        let row = |t: &[f32]| t[i * 1000..(i + 1) * 1000].to_vec();
        let e = common::rel_err(&row(logits.data()), &row(expected.tensors["logits64"].data()));
        println!("  {}: {e:.2e}", f.file_name().unwrap().to_string_lossy());
    }
    println!(
        "inference: {:.1} ms per image (median of 5, batch {}); PyTorch's in the same fixture run: {} ms",
        times[2],
        files.len(),
        expected.metadata.get("torch_ms_per_image").map(String::as_str).unwrap_or("?")
    );
    assert_eq!(top1(logits.data()), top1(expected.tensors["logits"].data()));
    assert!(e32 < 1e-3, "JPEG decoding differences included");

    // The inference runner (weights packed once) in f32, and in bf16 where the CPU has AVX512-BF16.
    let [n, _, h, w] = x.dims4();
    let mut runner =
        Runner::open(model, Target { device: DeviceSpec::Cpu, precision: Precision::F32 }, None, n, h, w).unwrap();
    let prepared = runner.forward(&x).unwrap();
    let e = common::rel_err(prepared.data(), expected.tensors["logits"].data());
    println!("runner f32: relative error vs PyTorch f32 logits {e:.2e}");
    assert!(e < 1e-3);
    let model = weights::load_model("resnet34".parse().unwrap(), &dir.join("resnet34.pth")).unwrap();
    if let Ok(mut bf16) =
        Runner::open(model, Target { device: DeviceSpec::Cpu, precision: Precision::Bf16 }, None, n, h, w)
    {
        let low = bf16.forward(&x).unwrap();
        let e = common::rel_err(low.data(), prepared.data());
        // PyTorch's bf16 autocast against its own f32, where the fixture has it (older fixtures do not)
        let theirs =
            expected.tensors.get("logits_bf16").map(|t| common::rel_err(t.data(), expected.tensors["logits"].data()));
        println!(
            "runner bf16: relative error vs f32 logits {e:.2e} (PyTorch bf16 autocast vs its f32: {}), top-1 {:?} (f32 {:?})",
            theirs.map(|t| format!("{t:.2e}")).unwrap_or_else(|| "not in this fixture".into()),
            top1(low.data()),
            top1(prepared.data())
        );
        assert_eq!(top1(low.data()), top1(prepared.data()), "bf16 changed a top-1 class");
    }
}
