//! The network's layers. Each keeps, in training mode, exactly what its backward needs (its "record"), and gives
//! it up when backward runs, so a second backward without a forward is a bug that shows. An activation that
//! several records need (a ReLU's output is also the next convolution's input) is one `Arc<Tensor>` they share.
//!
//! Inference has no records and no separate ReLU: `ConvBn::forward_eval` hands batch norm, the residual add
//! and the ReLU to the backend with the convolution (`Backend::conv2d_affine_act`), which applies them in one
//! pass over the convolution's output, or as it writes it.

use std::sync::Arc;

use super::graph::Pool;
use super::store::{BufferId, Init, ParamId, Path, Store};
use crate::engine::{Backend, BatchStats, ConvGeom, EvalAffine, Tensor, batch_norm_affine};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics, running-stat updates, records kept for backward.
    Train,
    /// Running statistics, nothing kept.
    Eval,
}

const MISSING_RECORD: &str = "backward called without a training-mode forward";

/// Convolution without bias (every ResNet convolution is followed by batch norm).
pub struct Conv2d {
    pub weight: ParamId,
    pub geom: ConvGeom,
    /// Record: the input, for the weight gradient.
    input: Option<Arc<Tensor>>,
}

impl Conv2d {
    pub fn new(p: &mut Path, name: &str, cin: usize, cout: usize, k: usize, stride: usize, pad: usize) -> Self {
        let weight = p.pp(name).param("weight", &[cout, cin, k, k], Init::KaimingFanOut);
        Conv2d { weight, geom: ConvGeom::square(stride, pad), input: None }
    }

    pub fn forward_train(&mut self, be: &dyn Backend, s: &Store, x: &Arc<Tensor>) -> Tensor {
        self.input = Some(Arc::clone(x));
        be.conv2d(x, s.value(self.weight), self.geom)
    }

    pub fn backward(&mut self, be: &dyn Backend, s: &mut Store, dy: &Tensor, need_dx: bool) -> Option<Tensor> {
        let x = self.input.take().expect(MISSING_RECORD);
        let need_dw = s.trainable(self.weight);
        let (dx, dw) = be.conv2d_backward(&x, s.value(self.weight), dy, self.geom, need_dx, need_dw);
        if let Some(dw) = dw {
            s.accumulate_grad_tensor(self.weight, dw);
        }
        dx
    }
}

pub const BN_EPS: f32 = 1e-5;
pub const BN_MOMENTUM: f32 = 0.1;

/// Sums over the replicas of a data-parallel step, for batch norm over the global batch (PyTorch's
/// SyncBatchNorm, `train --sync-bn`). Every replica calls it for every BN layer, in the same order, with
/// buffers of one length.
pub trait ReplicaSum: Send + Sync {
    fn sum(&self, values: &mut [f64]);
    /// How many replicas add into `sum`.
    fn replicas(&self) -> usize;
}

pub struct BatchNorm2d {
    pub weight: ParamId,
    pub bias: ParamId,
    pub running_mean: BufferId,
    pub running_var: BufferId,
    /// Record: normalised input, 1/σ per channel, and how many values (over every replica) the statistics
    /// came from.
    record: Option<(Tensor, Vec<f32>, f64)>,
}

impl BatchNorm2d {
    pub fn new(p: &mut Path, name: &str, channels: usize, zero_weight: bool) -> Self {
        let mut p = p.pp(name);
        let gamma = if zero_weight { 0.0 } else { 1.0 };
        BatchNorm2d {
            weight: p.param("weight", &[channels], Init::Const(gamma)),
            bias: p.param("bias", &[channels], Init::Const(0.0)),
            running_mean: p.buffer("running_mean", &[channels], 0.0),
            running_var: p.buffer("running_var", &[channels], 1.0),
            record: None,
        }
    }

    /// Normalises with the batch's statistics, or with `across` those of every replica's batch together (one
    /// sum of 2C + 1 values), and moves the running statistics toward them.
    pub fn forward_train(
        &mut self,
        be: &dyn Backend,
        s: &mut Store,
        x: Tensor,
        across: Option<&dyn ReplicaSum>,
    ) -> Tensor {
        let mut stats = be.batch_norm_stats(&x);
        if let Some(replicas) = across {
            let mut sums = stats.to_sums();
            replicas.sum(&mut sums);
            stats = BatchStats::from_sums(&sums);
        }
        let var = stats.var();
        let mean: Vec<f32> = stats.mean.iter().map(|&m| m as f32).collect();
        let invstd: Vec<f32> = var.iter().map(|&v| (1.0 / (v + BN_EPS as f64).sqrt()) as f32).collect();
        let (gamma, beta) = (s.value(self.weight).data(), s.value(self.bias).data());
        let (y, x_hat) = be.batch_norm_normalize(&x, &mean, &invstd, gamma, beta);
        // PyTorch updates the running variance with the unbiased estimate (divide by M − 1).
        let m = stats.count;
        let unbias = if m > 1.0 { m / (m - 1.0) } else { 1.0 };
        let k = BN_MOMENTUM;
        let rm = s.buffer_mut(self.running_mean).data_mut();
        rm.iter_mut().zip(&mean).for_each(|(r, &v)| *r = (1.0 - k) * *r + k * v);
        let rv = s.buffer_mut(self.running_var).data_mut();
        rv.iter_mut().zip(&var).for_each(|(r, &v)| *r = (1.0 - k) * *r + k * (v as f32) * unbias as f32);
        self.record = Some((x_hat, invstd, m));
        y
    }

    /// Inference's batch norm as a per-channel affine map (scale, shift), from the running statistics.
    pub fn eval_affine(&self, s: &Store) -> (Vec<f32>, Vec<f32>) {
        let (gamma, beta) = (s.value(self.weight).data(), s.value(self.bias).data());
        let (mean, var) = (s.buffer(self.running_mean).data(), s.buffer(self.running_var).data());
        batch_norm_affine(gamma, beta, mean, var, BN_EPS)
    }

    /// dγ and dβ (data parallelism averages them as it does every gradient) and the input gradient, with
    /// `across` from the sums over every replica (SyncBatchNorm's backward).
    pub fn backward(
        &mut self,
        be: &dyn Backend,
        s: &mut Store,
        dy: &Tensor,
        across: Option<&dyn ReplicaSum>,
    ) -> Tensor {
        let (x_hat, invstd, count) = self.record.take().expect(MISSING_RECORD);
        let mut sums = be.batch_norm_grad_sums(dy, &x_hat);
        // With `across`, dγ and dβ are the replicas' mean of the summed sums rather than this replica's own:
        // the same value once data parallelism averages them, but rounded once, as one process on the joint
        // batch rounds it (`engine::cpu::batch_sum`), instead of once per replica before the average.
        let mut share = 1.0;
        if let Some(replicas) = across {
            let c = sums.dy.len();
            let mut both: Vec<f64> = sums.dy.iter().chain(&sums.dy_xhat).copied().collect();
            replicas.sum(&mut both);
            sums.dy_xhat = both.split_off(c);
            sums.dy = both;
            share = 1.0 / replicas.replicas().max(1) as f64;
        }
        if s.trainable(self.weight) {
            s.accumulate_grad(self.weight, &sums.dy_xhat.iter().map(|&v| (v * share) as f32).collect::<Vec<_>>());
        }
        if s.trainable(self.bias) {
            s.accumulate_grad(self.bias, &sums.dy.iter().map(|&v| (v * share) as f32).collect::<Vec<_>>());
        }
        be.batch_norm_grad_input(dy, &x_hat, &invstd, s.value(self.weight).data(), &sums, count)
    }
}

/// A convolution followed by batch norm: the unit every ResNet block and shortcut is made of.
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm2d,
}

impl ConvBn {
    /// `conv_name`/`bn_name` are the torchvision module names (`conv1`/`bn1`, or `0`/`1` inside `downsample`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &mut Path,
        conv_name: &str,
        bn_name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        zero_bn: bool,
    ) -> Self {
        ConvBn {
            conv: Conv2d::new(p, conv_name, cin, cout, k, stride, k / 2),
            bn: BatchNorm2d::new(p, bn_name, cout, zero_bn),
        }
    }

    pub fn forward_train(
        &mut self,
        be: &dyn Backend,
        s: &mut Store,
        x: &Arc<Tensor>,
        across: Option<&dyn ReplicaSum>,
    ) -> Tensor {
        let y = self.conv.forward_train(be, s, x);
        self.bn.forward_train(be, s, y, across)
    }

    /// relu?(bn(conv(x)) + residual?): the activation and the residual join of inference, fused into batch norm.
    pub fn forward_eval(
        &self,
        be: &dyn Backend,
        s: &Store,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Tensor {
        let (scale, shift) = self.bn.eval_affine(s);
        let affine = EvalAffine { scale: &scale, shift: &shift, residual, relu };
        be.conv2d_affine_act(x, s.value(self.conv.weight), self.conv.geom, affine)
    }

    pub fn backward(
        &mut self,
        be: &dyn Backend,
        s: &mut Store,
        dy: &Tensor,
        need_dx: bool,
        across: Option<&dyn ReplicaSum>,
    ) -> Option<Tensor> {
        let d = self.bn.backward(be, s, dy, across);
        self.conv.backward(be, s, &d, need_dx)
    }
}

/// Training's ReLU, whose record is its own output (the gradient passes where the output is positive), shared
/// with the layer that reads it.
#[derive(Default)]
pub struct Relu {
    output: Option<Arc<Tensor>>,
}

impl Relu {
    pub fn forward_train(&mut self, be: &dyn Backend, x: Tensor) -> Arc<Tensor> {
        let y = Arc::new(be.relu(x));
        self.output = Some(Arc::clone(&y));
        y
    }

    pub fn backward(&mut self, be: &dyn Backend, dy: Tensor) -> Tensor {
        be.relu_backward(dy, &self.output.take().expect(MISSING_RECORD))
    }
}

/// The ImageNet stem's max-pool (3x3/2, padding 1: `graph::Pool`).
pub struct MaxPool {
    spec: Pool,
    record: Option<(Vec<u32>, [usize; 4])>,
}

impl MaxPool {
    pub fn new(spec: Pool) -> Self {
        MaxPool { spec, record: None }
    }

    pub fn forward_train(&mut self, be: &dyn Backend, x: &Tensor) -> Tensor {
        let Pool { kernel, stride, padding } = self.spec;
        let (y, argmax) = be.max_pool2d(x, kernel, stride, padding);
        self.record = Some((argmax, x.dims4()));
        y
    }

    pub fn forward_eval(&self, be: &dyn Backend, x: &Tensor) -> Tensor {
        let Pool { kernel, stride, padding } = self.spec;
        be.max_pool2d_values(x, kernel, stride, padding)
    }

    pub fn backward(&mut self, be: &dyn Backend, dy: &Tensor) -> Tensor {
        let (argmax, shape) = self.record.take().expect(MISSING_RECORD);
        be.max_pool2d_backward(dy, &argmax, shape)
    }
}

pub struct Linear {
    pub weight: ParamId,
    pub bias: ParamId,
    input: Option<Tensor>,
}

impl Linear {
    pub fn new(p: &mut Path, name: &str, fin: usize, fout: usize) -> Self {
        let mut p = p.pp(name);
        let bound = 1.0 / (fin as f32).sqrt();
        Linear {
            weight: p.param("weight", &[fout, fin], Init::Uniform(bound)),
            bias: p.param("bias", &[fout], Init::Uniform(bound)),
            input: None,
        }
    }

    pub fn forward(&mut self, be: &dyn Backend, s: &Store, x: Tensor, mode: Mode) -> Tensor {
        let y = be.linear(&x, s.value(self.weight), s.value(self.bias).data());
        if mode == Mode::Train {
            self.input = Some(x);
        }
        y
    }

    pub fn backward(&mut self, be: &dyn Backend, s: &mut Store, dy: &Tensor, need_dx: bool) -> Option<Tensor> {
        let x = self.input.take().expect(MISSING_RECORD);
        let need_dw = s.trainable(self.weight) || s.trainable(self.bias);
        let (dx, dwb) = be.linear_backward(&x, s.value(self.weight), dy, need_dx, need_dw);
        if let Some((dw, db)) = dwb {
            if s.trainable(self.weight) {
                s.accumulate_grad(self.weight, dw.data());
            }
            if s.trainable(self.bias) {
                s.accumulate_grad(self.bias, &db);
            }
        }
        dx
    }
}
