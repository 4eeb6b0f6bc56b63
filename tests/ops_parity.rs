//! Each engine operation against PyTorch (float64 reference stored as f32): outputs and every gradient.

mod common;

use common::{Fixture, assert_close, assert_close_slice};
use resnet_rs::Cpu;
use std::sync::{Barrier, Mutex};

use resnet_rs::engine::{Backend, ConvGeom, Tensor, batch_norm_affine};
use resnet_rs::model::layers::{BatchNorm2d, ReplicaSum};
use resnet_rs::model::store::Store;

const TOL: f64 = 1e-5;

fn ops() -> Fixture {
    Fixture::load("ops.safetensors")
}

#[test]
fn conv2d_forward_and_backward_match_pytorch() {
    let f = ops();
    let be = Cpu::F32;
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

/// The fixture's BN layer (weight, bias and running statistics from PyTorch) in a store of its own.
fn bn_layer(f: &Fixture) -> (BatchNorm2d, Store) {
    let k = |s: &str| format!("bn_train.{s}");
    let mut store = Store::new(0);
    let bn = BatchNorm2d::new(&mut store.root(), "bn", f.get(&k("weight")).numel(), false);
    store.params[0].value = f.get(&k("weight")).clone();
    store.params[1].value = f.get(&k("bias")).clone();
    store.buffers[0].value = f.get(&k("running_mean")).clone();
    store.buffers[1].value = f.get(&k("running_var")).clone();
    (bn, store)
}

/// Output, running statistics after the step, input gradient and parameter gradients against PyTorch's.
fn assert_bn_step(what: &str, f: &Fixture, y: &Tensor, dx: &Tensor, store: &Store) {
    let k = |s: &str| format!("bn_train.{s}");
    assert_close(&format!("{what} y"), y, f.get(&k("y")), TOL);
    assert_close(&format!("{what} running_mean"), &store.buffers[0].value, f.get(&k("running_mean_after")), TOL);
    assert_close(&format!("{what} running_var"), &store.buffers[1].value, f.get(&k("running_var_after")), TOL);
    assert_close(&format!("{what} dx"), dx, f.get(&k("dx")), TOL);
    assert_close(&format!("{what} dweight"), store.params[0].grad.as_ref().unwrap(), f.get(&k("dweight")), TOL);
    assert_close(&format!("{what} dbias"), store.params[1].grad.as_ref().unwrap(), f.get(&k("dbias")), TOL);
}

#[test]
fn batch_norm_training_matches_pytorch_including_running_stats() {
    let f = ops();
    let (mut bn, mut store) = bn_layer(&f);
    let y = bn.forward_train(&Cpu::F32, &mut store, f.get("bn_train.x").clone(), None);
    let dx = bn.backward(&Cpu::F32, &mut store, f.get("bn_train.dy"), None);
    assert_bn_step("bn", &f, &y, &dx, &store);
}

/// A sum over two replicas running on two threads: each adds its values, waits for the other, reads the total.
struct TwoThreads {
    total: Mutex<Vec<f64>>,
    barrier: Barrier,
}

impl ReplicaSum for TwoThreads {
    fn sum(&self, values: &mut [f64]) {
        {
            let mut total = self.total.lock().unwrap();
            total.resize(values.len(), 0.0);
            total.iter_mut().zip(values.iter()).for_each(|(t, v)| *t += v);
        }
        self.barrier.wait();
        values.copy_from_slice(&self.total.lock().unwrap());
        if self.barrier.wait().is_leader() {
            self.total.lock().unwrap().clear();
        }
        self.barrier.wait();
    }
    fn replicas(&self) -> usize {
        2
    }
}

/// The first or second half of a tensor along N.
fn half(t: &Tensor, second: bool) -> Tensor {
    let [n, c, h, w] = t.dims4();
    let len = n / 2 * c * h * w;
    let at = if second { len } else { 0 };
    Tensor::new(&[n / 2, c, h, w], t.data()[at..at + len].to_vec()).unwrap()
}

#[test]
fn sync_batch_norm_over_two_replicas_is_batch_norm_over_their_joint_batch() {
    // SyncBatchNorm: each replica holds half the batch; with the statistics and the backward sums added over
    // both, the output, the running statistics and the input gradient are those of the whole batch, and the
    // replicas' weight gradients are one value, half the whole batch's (data parallelism then averages them).
    let f = ops();
    let sum = TwoThreads { total: Mutex::new(Vec::new()), barrier: Barrier::new(2) };
    let replica = |second: bool| {
        let (mut bn, mut store) = bn_layer(&f);
        let y = bn.forward_train(&Cpu::F32, &mut store, half(f.get("bn_train.x"), second), Some(&sum));
        let dx = bn.backward(&Cpu::F32, &mut store, &half(f.get("bn_train.dy"), second), Some(&sum));
        (y, dx, store)
    };
    let ((y0, dx0, s0), (y1, dx1, s1)) = std::thread::scope(|t| {
        let second = t.spawn(|| replica(true));
        (replica(false), second.join().unwrap())
    });
    let joined = |a: &Tensor, b: &Tensor| {
        let [n, c, h, w] = a.dims4();
        Tensor::new(&[2 * n, c, h, w], [a.data(), b.data()].concat()).unwrap()
    };
    let mut store = s0;
    assert_eq!(store.buffers[0].value.data(), s1.buffers[0].value.data(), "both replicas' running means agree");
    for (p, q) in store.params.iter_mut().zip(&s1.params) {
        let (g, h) = (p.grad.as_mut().unwrap(), q.grad.as_ref().unwrap());
        assert_eq!(g.data(), h.data(), "both replicas hold one dγ and dβ");
        g.data_mut().iter_mut().zip(h.data()).for_each(|(a, b)| *a += b);
    }
    assert_bn_step("sync bn", &f, &joined(&y0, &y1), &joined(&dx0, &dx1), &store);
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
    let y = Cpu::F32.affine_act(f.get(&k("x")).clone(), &scale, &shift, None, false);
    assert_close("bn eval y", &y, f.get(&k("y")), TOL);
}

#[test]
fn max_pool_matches_pytorch() {
    let f = ops();
    for case in ["maxpool0", "maxpool1"] {
        let k = |s: &str| format!("{case}.{s}");
        let x = f.get(&k("x"));
        let (y, idx) = Cpu::F32.max_pool2d(x, 3, 2, 1);
        assert_close(&k("y"), &y, f.get(&k("y")), 0.0);
        let dx = Cpu::F32.max_pool2d_backward(f.get(&k("dy")), &idx, x.dims4());
        assert_close(&k("dx"), &dx, f.get(&k("dx")), TOL);
    }
}

#[test]
fn global_average_pool_matches_pytorch() {
    let f = ops();
    let x = f.get("avgpool.x");
    assert_close("avgpool y", &Cpu::F32.global_avg_pool(x), f.get("avgpool.y"), TOL);
    assert_close(
        "avgpool dx",
        &Cpu::F32.global_avg_pool_backward(f.get("avgpool.dy"), x.dims4()),
        f.get("avgpool.dx"),
        TOL,
    );
}

#[test]
fn linear_matches_pytorch() {
    let f = ops();
    let k = |s: &str| format!("linear.{s}");
    let (x, w) = (f.get(&k("x")), f.get(&k("weight")));
    assert_close("linear y", &Cpu::F32.linear(x, w, f.get(&k("bias")).data()), f.get(&k("y")), TOL);
    let (dx, dwb) = Cpu::F32.linear_backward(x, w, f.get(&k("dy")), true, true);
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
        let (loss, grad) = Cpu::F32.softmax_cross_entropy(logits, &q);
        assert_close_slice(&format!("loss{suffix}"), &[loss], f.get(&format!("ce.loss{suffix}")), TOL);
        assert_close(&format!("dlogits{suffix}"), &grad, f.get(&format!("ce.dlogits{suffix}")), TOL);
    }
}

#[test]
fn relu_and_residual_join_match_pytorch() {
    let f = ops();
    let y = Cpu::F32.relu(f.get("relu.x").clone());
    assert_close("relu y", &y, f.get("relu.y"), 0.0);
    assert_close("relu dx", &Cpu::F32.relu_backward(f.get("relu.dy").clone(), &y), f.get("relu.dx"), 0.0);
    let y = Cpu::F32.add_relu(f.get("add_relu.a").clone(), f.get("add_relu.b"));
    assert_close("add_relu y", &y, f.get("add_relu.y"), TOL);
    assert_close("add_relu da", &Cpu::F32.relu_backward(f.get("add_relu.dy").clone(), &y), f.get("add_relu.da"), 0.0);
}

#[test]
fn relative_error_check_fails_on_nan() {
    let a = Tensor::new(&[2], vec![1.0, f32::NAN]).unwrap();
    let b = Tensor::new(&[2], vec![1.0, 2.0]).unwrap();
    assert!(common::rel_err(a.data(), b.data()).is_infinite());
    assert!(common::rel_err(b.data(), a.data()).is_infinite());
}
