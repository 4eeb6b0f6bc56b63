//! Winograd and im2col against each other, against a direct f64 convolution and against the PyTorch fixtures,
//! forward and both gradients; and the per-shape choice `ConvAlgo::Auto` makes.

mod common;

use common::{Fixture, rel_err, values};
use resnet_rs::engine::cpu::packed::{bf16_supported, from_bf16, to_bf16};
use resnet_rs::engine::cpu::{ConvAlgo, Operands, conv_algo, conv2d_backward_with, conv2d_with};
use resnet_rs::{ConvGeom, Tensor};

/// Direct correlation in f64 with its gradients for `dy`: (y, dx, dw), for a k×k kernel, stride 1, padding p.
fn naive(x: &Tensor, w: &Tensor, dy: &[f32], p: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let [n, c, h, wi] = x.dims4();
    let [o, _, k, _] = w.dims4();
    let (oh, ow) = (h + 2 * p + 1 - k, wi + 2 * p + 1 - k);
    let (xd, wd) = (x.data(), w.data());
    let (mut y, mut dx, mut dw) = (vec![0.0f64; n * o * oh * ow], vec![0.0f64; xd.len()], vec![0.0f64; wd.len()]);
    for b in 0..n {
        for oc in 0..o {
            for i in 0..oh {
                for j in 0..ow {
                    let yi = ((b * o + oc) * oh + i) * ow + j;
                    for ic in 0..c {
                        for ki in 0..k {
                            for kj in 0..k {
                                let (r, q) = ((i + ki).wrapping_sub(p), (j + kj).wrapping_sub(p));
                                if r < h && q < wi {
                                    let xi = ((b * c + ic) * h + r) * wi + q;
                                    let wj = ((oc * c + ic) * k + ki) * k + kj;
                                    y[yi] += xd[xi] as f64 * wd[wj] as f64;
                                    dx[xi] += dy[yi] as f64 * wd[wj] as f64;
                                    dw[wj] += dy[yi] as f64 * xd[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (f(y), f(dx), f(dw))
}

/// y, dx, dw by one algorithm in f32.
fn run(x: &Tensor, w: &Tensor, dy: &Tensor, geom: ConvGeom, algo: ConvAlgo) -> [Vec<f32>; 3] {
    run_in(x, w, dy, geom, algo, Operands::F32)
}

/// y, dx, dw by one algorithm with the products' operands in `operands`.
fn run_in(x: &Tensor, w: &Tensor, dy: &Tensor, geom: ConvGeom, algo: ConvAlgo, operands: Operands) -> [Vec<f32>; 3] {
    let y = conv2d_with(x, w, geom, algo, operands);
    let (dx, dw) = conv2d_backward_with(x, w, dy, geom, (true, true), algo, operands);
    let (dx_only, none) = conv2d_backward_with(x, w, dy, geom, (true, false), algo, operands);
    assert!(none.is_none());
    let (dx, dx_only) = (dx.expect("asked for dx"), dx_only.expect("asked for dx"));
    assert_eq!(dx.data(), dx_only.data(), "dx must not depend on whether dw is computed");
    [y.into_data(), dx.into_data(), dw.expect("asked for dw").into_data()]
}

#[test]
fn winograd_matches_im2col_and_direct_f64_on_odd_shapes() {
    let geom = ConvGeom::square(1, 1);
    // (n, c, h, w, o): odd sizes, partial tiles, channel counts that are multiples of nothing
    let shapes = [
        (1, 1, 1, 1, 1),
        (1, 3, 2, 2, 5),
        (2, 5, 3, 3, 7),
        (1, 7, 5, 5, 3),
        (3, 6, 7, 7, 11),
        (2, 13, 13, 13, 9),
        (1, 17, 14, 14, 19),
        (2, 3, 5, 14, 4),
        (4, 9, 13, 2, 6),
        (1, 33, 14, 7, 31),
        (4, 8, 16, 16, 8),
        (4, 3, 32, 32, 4),
    ];
    for (seed, &(n, c, h, w, o)) in shapes.iter().enumerate() {
        let s = seed as u64 * 3;
        let x = Tensor::new(&[n, c, h, w], values(n * c * h * w, s + 1)).unwrap();
        let wt = Tensor::new(&[o, c, 3, 3], values(o * c * 9, s + 2)).unwrap();
        let dy = Tensor::new(&[n, o, h, w], values(n * o * h * w, s + 3)).unwrap();
        let want = naive(&x, &wt, dy.data(), 1);
        let wino = run(&x, &wt, &dy, geom, ConvAlgo::Winograd);
        let im2col = run(&x, &wt, &dy, geom, ConvAlgo::Im2col);
        for (i, name) in ["y", "dx", "dw"].iter().enumerate() {
            let want_i = [&want.0, &want.1, &want.2][i];
            let (ew, ei) = (rel_err(&wino[i], want_i), rel_err(&im2col[i], want_i));
            let between = rel_err(&wino[i], &im2col[i]);
            // measured: Winograd F(4,3) 7e-8..1.3e-6 on these, im2col up to 3.8e-7
            assert!(
                ew < 2e-6 && ei < 1e-6 && between < 2e-6,
                "{:?} {name}: winograd {ew:.2e}, im2col {ei:.2e}, apart {between:.2e}",
                (n, c, h, w, o)
            );
        }
    }
}

/// The fixture's convolution `i`: its geometry, input, weight and output gradient.
fn fixture_conv(f: &Fixture, i: usize) -> (ConvGeom, &Tensor, &Tensor, &Tensor) {
    let k = |s: &str| format!("conv{i}.{s}");
    let g = f.usizes(&k("geom"));
    let geom = ConvGeom { stride: (g[0], g[1]), padding: (g[2], g[3]) };
    (geom, f.get(&k("x")), f.get(&k("w")), f.get(&k("dy")))
}

#[test]
fn both_algorithms_match_the_pytorch_fixtures() {
    let f = Fixture::load("ops.safetensors");
    for i in 0..8 {
        let k = |s: &str| format!("conv{i}.{s}");
        let (geom, x, w, dy) = fixture_conv(&f, i);
        let want = [f.get(&k("y")), f.get(&k("dx")), f.get(&k("dw"))];
        for algo in [ConvAlgo::Im2col, ConvAlgo::Winograd] {
            let got = run(x, w, dy, geom, algo);
            let used = conv_algo(algo, x.dims4(), w.dims4(), geom);
            let errs: Vec<f64> = (0..3).map(|j| rel_err(&got[j], want[j].data())).collect();
            println!("conv{i} {algo:?} (ran {used:?}): y {:.2e} dx {:.2e} dw {:.2e}", errs[0], errs[1], errs[2]);
            assert!(errs.iter().all(|&e| e <= 1e-5), "conv{i} {algo:?}: {errs:?}");
        }
    }
}

/// `t` with every value rounded to bf16 (held in f32).
fn rounded(t: &Tensor) -> Tensor {
    Tensor::new(t.shape(), t.data().iter().map(|&v| from_bf16(to_bf16(v))).collect()).unwrap()
}

/// bf16 operands (training with `--dtype bf16`), on the PyTorch fixtures' shapes (strided, padded, 1x1, 7x7)
/// and on Winograd's. im2col rounds x, w and dy and sums exact products in f32, so it must equal the f32
/// convolution of the rounded tensors up to summation order; Winograd rounds its transformed operands instead,
/// so it is held to the f64 reference at bf16's precision. Measured on an AMD EPYC with AVX512-BF16: im2col
/// 1e-7..4e-7 from the rounded f32 convolution and 2e-3..4e-3 from f32; Winograd 2e-3..1.1e-2.
#[test]
fn bf16_operands_round_what_they_multiply_and_nothing_else() {
    if !bf16_supported() {
        eprintln!("skipped: this CPU lacks AVX512-BF16");
        return;
    }
    let f = Fixture::load("ops.safetensors");
    for i in 0..8 {
        let k = |s: &str| format!("conv{i}.{s}");
        let (geom, x, w, dy) = fixture_conv(&f, i);
        let got = run_in(x, w, dy, geom, ConvAlgo::Im2col, Operands::Bf16);
        let want_y = conv2d_with(&rounded(x), &rounded(w), geom, ConvAlgo::Im2col, Operands::F32);
        let (want_dx, _) =
            conv2d_backward_with(x, &rounded(w), &rounded(dy), geom, (true, false), ConvAlgo::Im2col, Operands::F32);
        let (_, want_dw) =
            conv2d_backward_with(&rounded(x), w, &rounded(dy), geom, (false, true), ConvAlgo::Im2col, Operands::F32);
        let want = [want_y.into_data(), want_dx.unwrap().into_data(), want_dw.unwrap().into_data()];
        let f32_ref = [f.get(&k("y")), f.get(&k("dx")), f.get(&k("dw"))];
        for (j, name) in ["y", "dx", "dw"].iter().enumerate() {
            let (e, from_f32) = (rel_err(&got[j], &want[j]), rel_err(&got[j], f32_ref[j].data()));
            println!("conv{i} bf16 im2col {name}: {e:.2e} from the rounded f32 convolution, {from_f32:.2e} from f32");
            assert!(e <= 2e-6 && from_f32 <= 1e-2, "conv{i} {name}: {e:.2e} / {from_f32:.2e}");
        }
    }
    let geom = ConvGeom::square(1, 1);
    for (seed, &(n, c, h, w, o)) in
        [(2, 5, 3, 3, 7), (3, 6, 7, 7, 11), (2, 64, 8, 8, 64), (4, 32, 16, 16, 48)].iter().enumerate()
    {
        let s = seed as u64 * 5 + 100;
        let x = Tensor::new(&[n, c, h, w], values(n * c * h * w, s + 1)).unwrap();
        let wt = Tensor::new(&[o, c, 3, 3], values(o * c * 9, s + 2)).unwrap();
        let dy = Tensor::new(&[n, o, h, w], values(n * o * h * w, s + 3)).unwrap();
        let want = naive(&x, &wt, dy.data(), 1);
        let got = run_in(&x, &wt, &dy, geom, ConvAlgo::Winograd, Operands::Bf16);
        for (j, name) in ["y", "dx", "dw"].iter().enumerate() {
            let e = rel_err(&got[j], [&want.0, &want.1, &want.2][j]);
            println!("{:?} bf16 winograd {name}: {e:.2e} from f64", (n, c, h, w, o));
            assert!(e <= 3e-2, "{:?} {name}: {e:.2e}", (n, c, h, w, o));
        }
    }
}

#[test]
fn auto_uses_winograd_only_where_it_applies_and_pays() {
    let s1 = ConvGeom::square(1, 1);
    let pick = |x: [usize; 4], w: [usize; 4], g: ConvGeom| conv_algo(ConvAlgo::Auto, x, w, g);
    // ResNet-34's 3x3 layers at batch 8, 224x224, and the CIFAR training step
    assert_eq!(pick([8, 64, 56, 56], [64, 64, 3, 3], s1), ConvAlgo::Winograd);
    assert_eq!(pick([8, 256, 14, 14], [256, 256, 3, 3], s1), ConvAlgo::Winograd);
    assert_eq!(pick([64, 512, 4, 4], [512, 512, 3, 3], s1), ConvAlgo::Winograd);
    // too few tiles to pay for streaming 512x512 transformed weights (36 floats per pair)
    assert_eq!(pick([1, 512, 7, 7], [512, 512, 3, 3], s1), ConvAlgo::Im2col);
    assert_eq!(pick([8, 512, 7, 7], [512, 512, 3, 3], s1), ConvAlgo::Im2col);
    assert_eq!(pick([1, 256, 14, 14], [256, 256, 3, 3], s1), ConvAlgo::Im2col);
    assert_eq!(pick([1, 128, 28, 28], [128, 128, 3, 3], s1), ConvAlgo::Im2col);
    assert_eq!(pick([1, 64, 56, 56], [64, 64, 3, 3], s1), ConvAlgo::Winograd);
    // too few channels: a CIFAR stem, and a narrow layer
    assert_eq!(pick([64, 3, 32, 32], [64, 3, 3, 3], s1), ConvAlgo::Im2col);
    assert_eq!(pick([64, 8, 32, 32], [8, 8, 3, 3], s1), ConvAlgo::Im2col);
    assert_eq!(pick([64, 64, 32, 32], [16, 64, 3, 3], s1), ConvAlgo::Winograd);
    // shapes Winograd does not compute, whatever is asked
    for algo in [ConvAlgo::Auto, ConvAlgo::Winograd] {
        assert_eq!(conv_algo(algo, [8, 64, 56, 56], [64, 64, 3, 3], ConvGeom::square(2, 1)), ConvAlgo::Im2col);
        assert_eq!(conv_algo(algo, [8, 64, 56, 56], [64, 64, 3, 3], ConvGeom::square(1, 0)), ConvAlgo::Im2col);
        assert_eq!(conv_algo(algo, [8, 64, 56, 56], [64, 64, 1, 1], ConvGeom::square(1, 0)), ConvAlgo::Im2col);
        assert_eq!(conv_algo(algo, [8, 3, 224, 224], [64, 3, 7, 7], ConvGeom::square(2, 3)), ConvAlgo::Im2col);
    }
    assert_eq!(conv_algo(ConvAlgo::Im2col, [8, 64, 56, 56], [64, 64, 3, 3], s1), ConvAlgo::Im2col);
}

/// The CPU inference plan keeps transformed weights per graph unit: on a network whose 3x3 layers it keeps
/// (16..128 channels, maps of 32 tiles and more), the logits and every tap match the plain CPU engine's at
/// Winograd's rounding, a second call reuses the kept weights and gives the same logits bit for bit, and a plan
/// of changed weights follows them (a plan holds its own copy of the weights, so nothing can be confused).
#[test]
fn inference_plan_keeps_weights_and_matches_the_engine() {
    use resnet_rs::CpuPlan;
    use resnet_rs::engine::cpu::{Cpu, keeps_u};
    use resnet_rs::{Mode, ResNet, ResNetConfig, Tap};
    let config = ResNetConfig { widths: [16, 32, 64, 128], ..ResNetConfig::new("resnet18".parse().unwrap(), 10) };
    let x = Tensor::new(&[2, 3, 128, 128], values(2 * 3 * 128 * 128, 5)).unwrap();
    assert!(keeps_u([2, 16, 32, 32], [16, 16, 3, 3], ConvGeom::square(1, 1)), "layer1 of this net is kept");
    assert!(!keeps_u([1, 512, 7, 7], [512, 512, 3, 3], ConvGeom::square(1, 1)), "a 37.7 MB U is not kept");
    for seed in [1, 2] {
        let mut model = ResNet::new(config, seed);
        let plan = CpuPlan::new(ResNet::new(config, seed), false).unwrap();
        for tap in [Tap::Layer1, Tap::Layer3, Tap::AvgPool, Tap::Fc] {
            let want = model.forward_to(&Cpu::F32, &x, Mode::Eval, tap);
            let e = rel_err(plan.forward_to(&x, tap).data(), want.data());
            assert!(e <= 1e-5, "seed {seed} {tap:?}: plan vs engine: relative error {e:.3e}");
        }
        let first = plan.forward(&x);
        assert_eq!(plan.forward(&x), first, "seed {seed}: the kept weights give the same logits");
        let w = &mut model.store.params.iter_mut().find(|p| p.name == "layer1.0.conv1.weight").unwrap().value;
        w.data_mut().iter_mut().for_each(|v| *v *= -1.0);
        let want = model.forward(&Cpu::F32, &x, Mode::Eval);
        let e = rel_err(CpuPlan::new(model, false).unwrap().forward(&x).data(), want.data());
        assert!(e <= 1e-5, "seed {seed}: after a weight change: relative error {e:.3e}");
    }
}
