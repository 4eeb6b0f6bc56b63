//! The fused eval-mode op `affine_act` against the unfused ops it replaces (and batch norm computed in f64), on
//! random data of shapes that exercise its per-task plane grouping.

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand_distr::{Distribution, Normal, Uniform};
use resnet_rs::Cpu;
use resnet_rs::engine::{Backend, Tensor, batch_norm_affine};

const SHAPES: [[usize; 4]; 5] = [[2, 3, 5, 7], [1, 512, 7, 7], [4, 5, 1, 1], [2, 64, 56, 56], [1, 1, 1, 1]];

fn random(rng: &mut Xoshiro256PlusPlus, shape: &[usize]) -> Tensor {
    let normal = Normal::new(0.0f32, 1.0).expect("finite std");
    let n = shape.iter().product();
    Tensor::new(shape, (0..n).map(|_| normal.sample(rng)).collect()).expect("n values")
}

/// Largest |got − want| / max(|want|, 1) (relative where values are large, absolute near 0, where ReLU and
/// cancellation put many of them); NaN anywhere makes it NaN, which fails every `<=` below.
fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let errs = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs() / w.abs().max(1.0));
    errs.fold(0.0, |m, e| if e.is_nan() || m.is_nan() { f64::NAN } else { m.max(e) })
}

#[test]
fn affine_act_matches_unfused_ops_and_f64_batch_norm() {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
    let positive = Uniform::new(0.1f32, 3.0).expect("valid range");
    for shape in SHAPES {
        let c = shape[1];
        let x = random(&mut rng, &shape);
        let residual = random(&mut rng, &shape);
        let (gamma, beta, mean) = (random(&mut rng, &[c]), random(&mut rng, &[c]), random(&mut rng, &[c]));
        let var: Vec<f32> = (0..c).map(|_| positive.sample(&mut rng)).collect();
        let eps = 1e-5;
        let (scale, shift) = batch_norm_affine(gamma.data(), beta.data(), mean.data(), &var, eps);

        let bn = Cpu::F32.affine_act(x.clone(), &scale, &shift, None, false);
        let hw = shape[2] * shape[3];
        let want: Vec<f64> = x
            .data()
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let ch = i / hw % c;
                (v as f64 - mean.data()[ch] as f64) / (var[ch] as f64 + eps as f64).sqrt() * gamma.data()[ch] as f64
                    + beta.data()[ch] as f64
            })
            .collect();
        let err = max_rel_err(bn.data(), &want);
        assert!(err <= 1e-5, "{shape:?}: batch norm off by {err:e}");

        let as_f64 = |t: &Tensor| t.data().iter().map(|&v| v as f64).collect::<Vec<_>>();
        let cases = [
            (Cpu::F32.affine_act(x.clone(), &scale, &shift, None, true), Cpu::F32.relu(bn.clone()), "bn + relu"),
            (
                Cpu::F32.affine_act(x.clone(), &scale, &shift, Some(&residual), false),
                Cpu::F32.add(bn.clone(), &residual),
                "bn + add",
            ),
            (
                Cpu::F32.affine_act(x.clone(), &scale, &shift, Some(&residual), true),
                Cpu::F32.add_relu(bn.clone(), &residual),
                "bn + add + relu",
            ),
        ];
        for (fused, unfused, what) in cases {
            assert_eq!(fused.shape(), &shape[..]);
            let err = max_rel_err(fused.data(), &as_f64(&unfused));
            assert!(err <= 1e-6, "{shape:?}: fused {what} differs from the unfused ops by {err:e}");
        }
    }
}
