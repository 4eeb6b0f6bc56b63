//! Each engine operation against PyTorch (float64 reference stored as f32): outputs and every gradient.

mod common;

use common::{Fixture, assert_close, assert_close_slice};
use resnet_rs::Cpu;
use resnet_rs::engine::{Backend, ConvGeom, Tensor, batch_norm_affine};

const TOL: f64 = 1e-5;

fn ops() -> Fixture {
    Fixture::load("ops.safetensors")
}

#[test]
fn conv2d_forward_and_backward_match_pytorch() {
    let f = ops();
    let be = Cpu;
    for i in 0..8 {
        let k = |s: &str| format!("conv{i}.{s}");
        let g = f.usizes(&k("geom"));
        let geom = ConvGeom { stride: (g[0], g[1]), padding: (g[2], g[3]) };
        let (x, w, dy) = (f.get(&k("x")), f.get(&k("w")), f.get(&k("dy")));
        assert_close(&k("y"), &be.conv2d(x, w, geom), f.get(&k("y")), TOL);
        let (dx, dw) = be.conv2d_backward(x, w, dy, geom, true, true);
        assert_close(&k("dx"), &dx.unwrap(), f.get(&k("dx")), TOL);
        assert_close(&k("dw"), &dw.unwrap(), f.get(&k("dw")), TOL);
        let (dx_only, none) = be.conv2d_backward(x, w, dy, geom, true, false);
        assert!(none.is_none(), "a frozen weight must get no gradient");
        assert_close(&k("dx alone"), &dx_only.unwrap(), f.get(&k("dx")), TOL);
    }
}

#[test]
fn batch_norm_training_matches_pytorch_including_running_stats() {
    use resnet_rs::model::layers::{BN_EPS, BN_MOMENTUM};
    let f = ops();
    let be = Cpu;
    let k = |s: &str| format!("bn_train.{s}");
    let x = f.get(&k("x"));
    let out = be.batch_norm_train(x, f.get(&k("weight")).data(), f.get(&k("bias")).data(), BN_EPS);
    assert_close("bn y", &out.y, f.get(&k("y")), TOL);
    let [n, _, h, w] = x.dims4();
    let m = (n * h * w) as f32;
    let rm: Vec<f32> = f
        .get(&k("running_mean"))
        .data()
        .iter()
        .zip(&out.mean)
        .map(|(r, v)| (1.0 - BN_MOMENTUM) * r + BN_MOMENTUM * v)
        .collect();
    let rv: Vec<f32> = f
        .get(&k("running_var"))
        .data()
        .iter()
        .zip(&out.var)
        .map(|(r, v)| (1.0 - BN_MOMENTUM) * r + BN_MOMENTUM * v * m / (m - 1.0))
        .collect();
    assert_close_slice("running_mean", &rm, f.get(&k("running_mean_after")), TOL);
    assert_close_slice("running_var", &rv, f.get(&k("running_var_after")), TOL);
    let g = be.batch_norm_backward(f.get(&k("dy")), &out.x_hat, &out.invstd, f.get(&k("weight")).data());
    assert_close("bn dx", &g.dx, f.get(&k("dx")), TOL);
    assert_close_slice("bn dweight", &g.dgamma, f.get(&k("dweight")), TOL);
    assert_close_slice("bn dbias", &g.dbeta, f.get(&k("dbias")), TOL);
}

#[test]
fn batch_norm_eval_matches_pytorch() {
    let f = ops();
    let k = |s: &str| format!("bn_eval.{s}");
    let (scale, shift) = batch_norm_affine(
        f.get(&k("weight")).data(),
        f.get(&k("bias")).data(),
        f.get(&k("running_mean")).data(),
        f.get(&k("running_var")).data(),
        resnet_rs::model::layers::BN_EPS,
    );
    let y = Cpu.affine_act(f.get(&k("x")).clone(), &scale, &shift, None, false);
    assert_close("bn eval y", &y, f.get(&k("y")), TOL);
}

#[test]
fn max_pool_matches_pytorch() {
    let f = ops();
    for case in ["maxpool0", "maxpool1"] {
        let k = |s: &str| format!("{case}.{s}");
        let x = f.get(&k("x"));
        let (y, idx) = Cpu.max_pool2d(x, 3, 2, 1);
        assert_close(&k("y"), &y, f.get(&k("y")), 0.0);
        let dx = Cpu.max_pool2d_backward(f.get(&k("dy")), &idx, x.dims4());
        assert_close(&k("dx"), &dx, f.get(&k("dx")), TOL);
    }
}

#[test]
fn global_average_pool_matches_pytorch() {
    let f = ops();
    let x = f.get("avgpool.x");
    assert_close("avgpool y", &Cpu.global_avg_pool(x), f.get("avgpool.y"), TOL);
    assert_close("avgpool dx", &Cpu.global_avg_pool_backward(f.get("avgpool.dy"), x.dims4()), f.get("avgpool.dx"), TOL);
}

#[test]
fn linear_matches_pytorch() {
    let f = ops();
    let k = |s: &str| format!("linear.{s}");
    let (x, w) = (f.get(&k("x")), f.get(&k("weight")));
    assert_close("linear y", &Cpu.linear(x, w, f.get(&k("bias")).data()), f.get(&k("y")), TOL);
    let (dx, dwb) = Cpu.linear_backward(x, w, f.get(&k("dy")), true, true);
    let (dw, db) = dwb.unwrap();
    assert_close("linear dx", &dx.unwrap(), f.get(&k("dx")), TOL);
    assert_close("linear dweight", &dw, f.get(&k("dweight")), TOL);
    assert_close_slice("linear dbias", &db, f.get(&k("dbias")), TOL);
}

#[test]
fn cross_entropy_matches_pytorch_with_and_without_label_smoothing() {
    let f = ops();
    let (logits, target) = (f.get("ce.logits"), f.usizes("ce.target"));
    for (smoothing, suffix) in [(0.0, ""), (0.1, "_ls")] {
        let q = resnet_rs::engine::one_hot(&target, logits.shape()[1], smoothing);
        let (loss, grad) = Cpu.softmax_cross_entropy(logits, &q);
        assert_close_slice(&format!("loss{suffix}"), &[loss], f.get(&format!("ce.loss{suffix}")), TOL);
        assert_close(&format!("dlogits{suffix}"), &grad, f.get(&format!("ce.dlogits{suffix}")), TOL);
    }
}

#[test]
fn relu_and_residual_join_match_pytorch() {
    let f = ops();
    let y = Cpu.relu(f.get("relu.x").clone());
    assert_close("relu y", &y, f.get("relu.y"), 0.0);
    assert_close("relu dx", &Cpu.relu_backward(f.get("relu.dy").clone(), &y), f.get("relu.dx"), 0.0);
    let y = Cpu.add_relu(f.get("add_relu.a").clone(), f.get("add_relu.b"));
    assert_close("add_relu y", &y, f.get("add_relu.y"), TOL);
    assert_close("add_relu da", &Cpu.relu_backward(f.get("add_relu.dy").clone(), &y), f.get("add_relu.da"), 0.0);
}

#[test]
fn relative_error_check_fails_on_nan() {
    let a = Tensor::new(&[2], vec![1.0, f32::NAN]).unwrap();
    let b = Tensor::new(&[2], vec![1.0, 2.0]).unwrap();
    assert!(common::rel_err(a.data(), b.data()).is_infinite());
    assert!(common::rel_err(b.data(), a.data()).is_infinite());
}
