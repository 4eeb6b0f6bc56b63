//! Per-shape timings of both convolution algorithms (ResNet-34's 3x3 layers at the bench workloads, and a few
//! narrow ones): what `ConvAlgo::Auto`'s thresholds in src/engine/cpu/conv.rs were tuned on.
//!
//!   cargo bench --bench conv_algos            (CONV_SHAPE=i times only shapes[i], e.g. under `perf record`)
//!
//! Medians of 7 runs each, in ms, on the threads rayon is given (RAYON_NUM_THREADS). CONV_OPERANDS=bf16 times the
//! products with bf16 operands (training with `--dtype bf16`; needs AVX512-BF16).

use std::time::Instant;

#[path = "../tests/common/mod.rs"]
mod common;

use common::values;
use resnet_rs::engine::cpu::{ConvAlgo, Operands, conv2d_backward_with, conv2d_with, keeps_u, winograd};
use resnet_rs::{ConvGeom, Tensor};

fn main() {
    let geom = ConvGeom::square(1, 1);
    let shapes = [
        (8, 64, 56),
        (8, 128, 28),
        (8, 256, 14),
        (8, 512, 7),
        (1, 64, 56),
        (1, 128, 28),
        (1, 256, 14),
        (1, 512, 7),
        (2, 512, 7),
        (4, 512, 7),
        (64, 64, 32),
        (64, 128, 16),
        (64, 256, 8),
        (64, 512, 4),
        (64, 3, 32),
        (64, 8, 32),
        (64, 16, 32),
        (8, 16, 56),
        (4, 4, 32),
    ];
    let median = |f: &mut dyn FnMut()| {
        let mut t: Vec<f64> = (0..7)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[3]
    };
    // CONV_SHAPE=i times only shapes[i] (for perf record)
    let only: Option<usize> = std::env::var("CONV_SHAPE").ok().and_then(|v| v.parse().ok());
    let operands = match std::env::var("CONV_OPERANDS").as_deref() {
        Ok("bf16") if resnet_rs::engine::cpu::packed::bf16_supported() => Operands::Bf16,
        Ok("bf16") => panic!("CONV_OPERANDS=bf16 needs AVX512-BF16, which this CPU lacks"),
        _ => Operands::F32,
    };
    for (i, &(n, c, h)) in shapes.iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let x = Tensor::new(&[n, c, h, h], values(n * c * h * h, 1)).expect("shape matches data");
        // a 3-channel input is a stem: 3 → 64
        let o = if c == 3 { 64 } else { c };
        let w = Tensor::new(&[o, c, 3, 3], values(o * c * 9, 2)).expect("shape matches data");
        let dy = Tensor::new(&[n, o, h, h], values(n * o * h * h, 3)).expect("shape matches data");
        let mut line = format!("n{n:<3} c{c:<4} o{o:<4} {h:>2}x{h:<3}");
        for algo in [ConvAlgo::Im2col, ConvAlgo::Winograd] {
            let fw = median(&mut || drop(conv2d_with(&x, &w, geom, algo, operands)));
            let dx = median(&mut || drop(conv2d_backward_with(&x, &w, &dy, geom, (true, false), algo, operands)));
            let both = median(&mut || drop(conv2d_backward_with(&x, &w, &dy, geom, (true, true), algo, operands)));
            line += &format!(" | {algo:?}: fwd {fw:7.2} dx {dx:7.2} dw {:7.2} ms", both - dx);
        }
        // Inference with the transformed weight kept across calls (engine::cpu::kept, as exec::cpu_plan::CpuPlan keeps it).
        let u = winograd::transform_forward_weights(w.data(), o, c);
        let kept = median(&mut || drop(winograd::forward_with(x.data(), &u, (n, c, h, h, o), None)));
        line += &format!(
            " | kept U: fwd {kept:7.2} ms{}",
            if keeps_u(x.dims4(), w.dims4(), geom) { " (used)" } else { "" }
        );
        println!("{line}");
    }
}
