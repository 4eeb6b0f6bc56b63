//! `CudaTrainer`: whole SGD steps resident on one device, with the CPU engine's semantics (train-mode batch norm,
//! softmax cross-entropy averaged over the batch, torch.optim's SGD).
//!
//! The graph is the CPU model's, walked from its configuration with every tensor name and shape checked against
//! the store. Each conv+BN unit keeps its convolution output (batch norm's input, for BN backward) and its
//! BN/ReLU output (the next unit's input and the ReLU's mask) in buffers of its own, allocated for the largest
//! batch at construction; gradients flow through three scratch buffers. Per step: forward (cuDNN convolution,
//! cuDNN BN training, one ReLU or residual+ReLU kernel), the loss kernel (which also yields the fc bias
//! gradient), backward in reverse (cuDNN BN backward, convolution backward filter and data, the ReLU masks, a
//! block's residual gradient accumulated by the first convolution's backward data with beta 1), then one SGD
//! launch per parameter. Nothing is allocated per step and the host waits once, for the loss.
//!
//! With `Precision::Bf16` the same graph runs on bf16 NHWC activations and gradients with fp32 master weights,
//! optimiser state and BN statistics (`half.rs`); every activation buffer is then an `Act::Bf16`.

mod loop_ops;

use std::collections::HashMap;

pub use self::loop_ops::StepCheck;
use super::table::{TensorIndex, TensorTable};
use crate::engine::Precision;
use crate::engine::cuda::conv::{ConvShape, Storage};
use crate::engine::cuda::device::{Buf, Device, guarded};
use crate::engine::cuda::kernels::Kernels;
use crate::engine::cuda::train::conv::{TrainAlgos, TrainConv};
use crate::engine::cuda::train::half::{Act, ActRef, BnConsts, HalfKernels, MAX_SPLITS, mixed};
use crate::engine::cuda::train::kernels::{SgdArgs, TrainKernels};
use crate::engine::cuda::train::linear;
use crate::engine::cuda::train::norm::{BnScratch, TrainNorm};
use crate::engine::cuda::train::reduce::{LoopKernels, LoopState};
use crate::engine::widen;
use crate::engine::{ConvGeom, Tensor};
use crate::error::{Error, Result};
use crate::exec::optim::{OptimizerKind, ParamGroup};
use crate::model::graph::{Post, Src};
use crate::model::layers::{BN_EPS, BN_MOMENTUM};
use crate::model::{ResNet, ResNetConfig};

/// The optimiser a `CudaTrainer` applies, as `train::optim::Optimizer` takes it: the kind and one group per
/// parameter in the store's order (`Optimizer::groups_for`). Only SGD runs on the device so far.
#[derive(Clone, Debug)]
pub struct TrainOptimizer {
    pub kind: OptimizerKind,
    pub groups: Vec<ParamGroup>,
}

/// One conv+BN unit, independent of the batch size.
#[derive(Debug)]
struct UnitSpec {
    weight: usize,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    src: Src,
    post: Post,
    /// BN weight, bias, running mean, running variance (indices in the tensor table) and channels.
    bn: [usize; 4],
}

/// A unit's device state: its BN layer and its two activations (conv output, BN/ReLU output).
struct UnitBufs {
    norm: TrainNorm,
    c: Act,
    a: Act,
}

/// A residual block: its units in order and its shortcut projection, as indices into the unit list.
#[derive(Debug)]
struct BlockSpec {
    /// `layer2.0`, as the CPU model names it.
    name: String,
    units: Vec<usize>,
    downsample: Option<usize>,
}

/// The convolutions bound to one batch size.
struct Plan {
    convs: Vec<TrainConv>,
}

/// The stem's max-pool output and the winners' indices.
struct PoolBufs {
    y: Act,
    arg: Buf<i32>,
}

/// The bf16 side of a bf16 trainer (`half.rs`).
struct Half {
    kernels: HalfKernels,
    /// The staged images as bf16 NHWC.
    input: Buf<u16>,
    /// Per convolution weight (by tensor index): its bf16 OHWI copy, converted from the fp32 master after every
    /// update.
    weights: HashMap<usize, Buf<u16>>,
    /// A weight gradient as cuDNN writes it (bf16 OHWI), before it is widened into the fp32 gradient.
    dw: Buf<u16>,
    /// BN's per-slice partial sums, and the folded scale and shift of the forward.
    partials: Buf<f64>,
    scale: Buf<f32>,
    shift: Buf<f32>,
}

impl Half {
    fn new(dev: &Device, kernels: &Kernels, specs: &[UnitSpec], tensors: &[Buf<f32>], images: usize) -> Result<Half> {
        let widest = specs.iter().map(|s| s.out_channels).max().unwrap_or(0);
        let largest = specs.iter().map(|s| tensors[s.weight].len).max().unwrap_or(0);
        let half = Half {
            kernels: HalfKernels::load(dev)?,
            input: dev.zeros(images)?,
            weights: specs.iter().map(|s| Ok((s.weight, dev.zeros(tensors[s.weight].len)?))).collect::<Result<_>>()?,
            dw: dev.zeros(largest)?,
            partials: dev.zeros(MAX_SPLITS * 2 * widest)?,
            scale: dev.zeros(widest)?,
            shift: dev.zeros(widest)?,
        };
        for s in specs {
            half.refresh(dev, kernels, s, &tensors[s.weight])?;
        }
        Ok(half)
    }

    /// The bf16 OHWI copy of unit `s`'s weight from its fp32 OIHW master `w`.
    fn refresh(&self, dev: &Device, kernels: &Kernels, s: &UnitSpec, w: &Buf<f32>) -> Result<()> {
        let copy =
            self.weights.get(&s.weight).expect("every convolution has its bf16 copy in a bf16 trainer (Half::new)");
        let cin = w.len / (s.out_channels * s.kernel * s.kernel).max(1);
        kernels.to_bf16_nhwc(dev, w, copy, s.out_channels, cin, s.kernel * s.kernel)
    }

    fn bn_scratch(&self) -> BnScratch<'_> {
        BnScratch { kernels: &self.kernels, partials: &self.partials, scale_shift: [&self.scale, &self.shift] }
    }
}

pub struct CudaTrainer {
    config: ResNetConfig,
    /// Parameters then buffers, in the store's order, as device copies.
    table: TensorTable,
    /// Per parameter: trainable, its gradient, its momentum buffer.
    trainable: Vec<bool>,
    grads: Vec<Buf<f32>>,
    moments: Vec<Buf<f32>>,
    optimizer: TrainOptimizer,
    /// Per parameter: its momentum buffer holds a value (torch creates it lazily, on the parameter's first
    /// update with momentum, as buf = grad).
    has_momentum: Vec<bool>,
    momentum_override: Option<f32>,
    batches_tracked: i64,
    specs: Vec<UnitSpec>,
    blocks: Vec<BlockSpec>,
    fc: (usize, usize),
    units: Vec<UnitBufs>,
    pool: Option<PoolBufs>,
    plans: HashMap<usize, Plan>,
    algos: TrainAlgos,
    input: Buf<f32>,
    targets: Buf<f32>,
    features: Buf<f32>,
    logits: Buf<f32>,
    dlogits: Buf<f32>,
    dfeatures: Buf<f32>,
    loss: Buf<f32>,
    scratch: [Act; 3],
    /// bf16 storage (`Precision::Bf16`): the bf16 buffers and kernels; None in fp32.
    half: Option<Half>,
    workspace: Buf<u8>,
    batch: usize,
    hw: (usize, usize),
    kernels: Kernels,
    train_kernels: TrainKernels,
    /// The training loop's device side: labels, reductions, snapshots (`stats.rs`).
    loop_kernels: LoopKernels,
    looping: LoopState,
    /// Last, so that every buffer and plan above is released while the device's handles still exist.
    dev: Device,
}

/// Output size of the stem's 3x3/2 max-pool with padding 1.
fn pool_out(dims: [usize; 4]) -> (usize, usize) {
    ConvGeom::square(2, 1).output_hw(dims[2], dims[3], 3, 3)
}

pub(super) fn numel(dims: [usize; 4]) -> usize {
    dims.iter().product()
}

/// The convolution shapes of every unit for `n` images of `hw`, and the max-pool's input dims if there is one.
fn unit_shapes(specs: &[UnitSpec], n: usize, (h, w): (usize, usize)) -> (Vec<ConvShape>, Option<[usize; 4]>) {
    let mut shapes: Vec<ConvShape> = Vec::with_capacity(specs.len());
    let mut pooled = None;
    for s in specs {
        let x = match s.src {
            Src::Images => [n, s.in_channels, h, w],
            Src::Unit(u) => shapes[u].y(),
            Src::Pool => {
                let stem = shapes[0].y();
                pooled = Some(stem);
                let (oh, ow) = pool_out(stem);
                [stem[0], stem[1], oh, ow]
            }
        };
        shapes.push(ConvShape {
            x,
            out_channels: s.out_channels,
            kernel: s.kernel,
            stride: s.stride,
            pad: s.kernel / 2,
        });
    }
    (shapes, pooled)
}

impl CudaTrainer {
    /// Upload `model` to device `device` for training steps on batches of up to `batch` images of `h`×`w`.
    pub fn new(
        model: &ResNet,
        device: usize,
        batch: usize,
        h: usize,
        w: usize,
        precision: Precision,
        optimizer: TrainOptimizer,
    ) -> Result<CudaTrainer> {
        if batch == 0 || h == 0 || w == 0 {
            return Err(Error::invalid(format!("CUDA: empty input shape: batch {batch}, {h}x{w}")));
        }
        if !matches!(optimizer.kind, OptimizerKind::Sgd { .. }) {
            return Err(Error::invalid(format!(
                "CUDA: the device trainer runs SGD only so far, not {:?} (use --device cpu)",
                optimizer.kind
            )));
        }
        let params = &model.store.params;
        if optimizer.groups.len() != params.len() {
            return Err(Error::invalid(format!(
                "CUDA: the optimizer has {} parameter groups, the model {} parameters",
                optimizer.groups.len(),
                params.len()
            )));
        }
        // The graph is checked against the model before the device is touched, so a model the trainer does not
        // describe fails the same way on every machine.
        let TrainGraph { specs, blocks, fc } = TrainGraph::of(model)?;
        let (shapes, pooled) = unit_shapes(&specs, batch, (h, w));
        let storage = if precision == Precision::Bf16 { Storage::Bf16Nhwc } else { Storage::F32Nchw };
        let dev = Device::open(device, precision == Precision::Tf32)?;
        guarded("uploading the network for training", || {
            let kernels = Kernels::load(&dev)?;
            let train_kernels = TrainKernels::load(&dev)?;
            let table = TensorTable::upload(&dev, &model.store)?;
            let grads = params.iter().map(|p| dev.zeros(p.value.numel())).collect::<Result<Vec<_>>>()?;
            let moments = params.iter().map(|p| dev.zeros(p.value.numel())).collect::<Result<Vec<_>>>()?;
            let mut units = Vec::with_capacity(specs.len());
            for (spec, shape) in specs.iter().zip(&shapes) {
                let len = numel(shape.y());
                units.push(UnitBufs {
                    norm: TrainNorm::new(
                        &dev,
                        spec.bn,
                        spec.out_channels,
                        BnConsts { eps: BN_EPS, momentum: BN_MOMENTUM },
                    )?,
                    c: Act::zeros(&dev, storage, len)?,
                    a: Act::zeros(&dev, storage, len)?,
                });
            }
            let pool = match pooled {
                Some(dims) => {
                    let (oh, ow) = pool_out(dims);
                    let len = dims[0] * dims[1] * oh * ow;
                    Some(PoolBufs { y: Act::zeros(&dev, storage, len)?, arg: dev.zeros(len)? })
                }
                None => None,
            };
            let largest = shapes.iter().map(|s| numel(s.y())).max().unwrap_or(0);
            let (classes, fin) = (model.config.num_classes, model.config.feature_dim());
            let trainable: Vec<bool> = params.iter().map(|p| p.trainable).collect();
            let looping = LoopState::new(&dev, batch, &table.tensors, &grads, &trainable)?;
            let half = match storage {
                Storage::Bf16Nhwc => {
                    Some(Half::new(&dev, &kernels, &specs, &table.tensors, batch * model.config.in_channels * h * w)?)
                }
                Storage::F32Nchw => None,
            };
            let act = |len| Act::zeros(&dev, storage, len);
            let mut trainer = CudaTrainer {
                config: model.config,
                trainable,
                grads,
                moments,
                optimizer,
                has_momentum: vec![false; params.len()],
                momentum_override: None,
                batches_tracked: model.store.batches_tracked,
                specs,
                blocks,
                fc,
                units,
                pool,
                plans: HashMap::new(),
                algos: TrainAlgos::default(),
                input: dev.zeros(batch * model.config.in_channels * h * w)?,
                targets: dev.zeros(batch * classes)?,
                features: dev.zeros(batch * fin)?,
                logits: dev.zeros(batch * classes)?,
                dlogits: dev.zeros(batch * classes)?,
                dfeatures: dev.zeros(batch * fin)?,
                loss: dev.zeros(1)?,
                scratch: [act(largest)?, act(largest)?, act(largest)?],
                half,
                workspace: dev.zeros(0)?,
                batch,
                hw: (h, w),
                table,
                looping,
                loop_kernels: LoopKernels::load(&dev)?,
                kernels,
                train_kernels,
                dev,
            };
            trainer.ensure_plan(batch)?;
            Ok(trainer)
        })
    }

    /// The device, for logs: "NVIDIA H100 80GB HBM3 (cuda:0, sm_90)".
    pub fn device_name(&self) -> String {
        self.dev.describe()
    }

    /// SGD momentum for the following steps in place of the optimizer's (one-cycle schedules cycle it), or None
    /// for the optimizer's own, as `Optimizer::step`'s `momentum` argument.
    pub fn set_momentum(&mut self, momentum: Option<f32>) {
        self.momentum_override = momentum;
    }

    /// One SGD step on images `[N, 3, H, W]` (N ≤ the construction batch) against target distributions
    /// `[N, classes]` with learning rate `lr`; returns the mean loss of the forward.
    pub fn step(&mut self, images: &Tensor, targets: &Tensor, lr: f32) -> Result<f32> {
        let n = self.stage(images, targets)?;
        self.step_staged(n, lr)
    }

    /// Copy a batch to the device, where `step_staged` reads it; returns the batch size.
    pub fn stage(&mut self, images: &Tensor, targets: &Tensor) -> Result<usize> {
        let n = match images.shape() {
            &[n, c, h, w] if c == self.config.in_channels && (h, w) == self.hw && (1..=self.batch).contains(&n) => n,
            s => {
                return Err(Error::invalid(format!(
                    "CUDA: input {s:?} does not fit this trainer ([1..={}, {}, {}, {}])",
                    self.batch, self.config.in_channels, self.hw.0, self.hw.1
                )));
            }
        };
        let classes = self.config.num_classes;
        if targets.shape() != [n, classes] {
            return Err(Error::invalid(format!(
                "CUDA: targets {:?} do not fit {n} images of {classes} classes",
                targets.shape()
            )));
        }
        guarded("staging a batch", || {
            self.ensure_plan(n)?;
            self.dev.write(&mut self.input, images.data())?;
            self.dev.write(&mut self.targets, targets.data())?;
            Ok(n)
        })
    }

    /// One step over the `n` images last staged, waiting for the device to finish; returns the loss.
    pub fn step_staged(&mut self, n: usize, lr: f32) -> Result<f32> {
        if !(1..=self.batch).contains(&n) {
            return Err(Error::invalid(format!("CUDA: batch {n} outside this trainer's 1..={}", self.batch)));
        }
        guarded("training step", || {
            self.enqueue_forward_backward(n)?;
            self.update(lr)?;
            let loss = self.dev.read(&self.loss, 1)?;
            Ok(loss[0])
        })
    }

    /// The first half of a step over the `n` images last staged: forward (moving the BN running statistics) and
    /// backward into the gradient buffers, without the update and without waiting. The training loop checks the
    /// step (`check_step`), may scale the gradients, then calls `apply_update`, or drops the step.
    pub fn forward_backward(&mut self, n: usize) -> Result<()> {
        if !(1..=self.batch).contains(&n) {
            return Err(Error::invalid(format!("CUDA: batch {n} outside this trainer's 1..={}", self.batch)));
        }
        guarded("training step", || self.enqueue_forward_backward(n))
    }

    fn enqueue_forward_backward(&mut self, n: usize) -> Result<()> {
        self.ensure_plan(n)?;
        let plan = self.plans.get(&n).expect("ensure_plan built this batch size's plan");
        self.forward(plan, n)?;
        self.backward(plan, n)?;
        self.batches_tracked += 1;
        self.looping.last_batch = n;
        Ok(())
    }

    /// The second half of a step: the SGD update of every trainable parameter from its gradient.
    pub fn apply_update(&mut self, lr: f32) -> Result<()> {
        guarded("SGD update", || self.update(lr))
    }

    fn src(&self, s: Src) -> Result<ActRef<'_>> {
        match s {
            Src::Images => Ok(match &self.half {
                None => ActRef::F32(&self.input),
                Some(half) => ActRef::Bf16(&half.input),
            }),
            Src::Pool => Ok(self.pool.as_ref().expect("a graph that reads the pool has one").y.r()),
            Src::Unit(u) => Ok(self.units[u].a.r()),
        }
    }

    /// The bf16 side, for operations only a bf16 trainer runs.
    fn half(&self) -> Result<&Half> {
        self.half.as_ref().ok_or_else(|| mixed("an fp32 trainer"))
    }

    /// The weight a convolution reads: the fp32 master, or its bf16 copy.
    fn conv_weight(&self, w: usize) -> Result<ActRef<'_>> {
        match &self.half {
            None => Ok(ActRef::F32(&self.table.tensors[w])),
            Some(half) => Ok(ActRef::Bf16(
                half.weights.get(&w).expect("every convolution has its bf16 copy in a bf16 trainer (Half::new)"),
            )),
        }
    }

    fn forward(&self, plan: &Plan, n: usize) -> Result<()> {
        let (dev, k) = (&self.dev, &self.train_kernels);
        if let Some(half) = &self.half {
            self.kernels.to_bf16_nhwc(dev, &self.input, &half.input, n, 3, self.hw.0 * self.hw.1)?;
        }
        for (i, ((spec, unit), conv)) in self.specs.iter().zip(&self.units).zip(&plan.convs).enumerate() {
            conv.forward(dev, self.src(spec.src)?, self.conv_weight(spec.weight)?, unit.c.r(), &self.workspace)?;
            let y = conv.shape().y();
            let len = numel(y);
            match (&unit.c, &unit.a) {
                (Act::F32(c), Act::F32(a)) => {
                    unit.norm.forward(dev, conv.y_desc(), c, a, len, &self.table.tensors)?;
                    match spec.post {
                        Post::Relu => k.relu(dev, a, None, len)?,
                        Post::AddRelu(res) => k.relu(dev, a, Some(self.src(res)?.f32("the residual join")?), len)?,
                        Post::Linear => {}
                    }
                }
                (Act::Bf16(c), Act::Bf16(a)) => {
                    // Statistics, then one pass: normalise, add the residual, ReLU, round to bf16.
                    let half = self.half()?;
                    unit.norm.forward_bf16(dev, c, y[0] * y[2] * y[3], &self.table.tensors, &half.bn_scratch())?;
                    let res = match spec.post {
                        Post::AddRelu(r) => Some(self.src(r)?.bf16("the residual join")?),
                        Post::Relu | Post::Linear => None,
                    };
                    let relu = !matches!(spec.post, Post::Linear);
                    self.kernels.scale_shift_act_bf16(dev, a, c, res, &half.scale, &half.shift, y, relu)?;
                }
                _ => return Err(mixed("batch norm")),
            }
            if let (0, Some(pool)) = (i, &self.pool) {
                match (&unit.a, &pool.y) {
                    (Act::F32(a), Act::F32(py)) => k.max_pool(dev, a, py, &pool.arg, y, pool_out(y))?,
                    (Act::Bf16(a), Act::Bf16(py)) => {
                        self.half()?.kernels.max_pool(dev, a, py, &pool.arg, y, pool_out(y))?
                    }
                    _ => return Err(mixed("the max-pool")),
                }
            }
        }
        let last = self.last_unit(plan)?;
        match &self.units[last.0].a {
            Act::F32(a) => self.kernels.avg_pool(dev, a, &self.features, last.1)?,
            Act::Bf16(a) => self.kernels.avg_pool_bf16(dev, a, &self.features, last.1)?,
        }
        let (fin, classes) = (self.config.feature_dim(), self.config.num_classes);
        let (w, b) = (&self.table.tensors[self.fc.0], &self.table.tensors[self.fc.1]);
        crate::engine::cuda::linear::forward(dev, &self.kernels, &self.features, w, b, &self.logits, n, fin, classes)?;
        k.softmax_xent(dev, &self.logits, &self.targets, &self.dlogits, &self.grads[self.fc.1], &self.loss, n, classes)
    }

    /// The network's last unit (the last block's output) and its output dims.
    fn last_unit(&self, plan: &Plan) -> Result<(usize, [usize; 4])> {
        let u = self.blocks.last().and_then(|b| b.units.last().copied()).expect("a ResNet has blocks");
        Ok((u, plan.convs[u].shape().y()))
    }

    /// Unit u's BN backward (dy → dc, with its γ and β gradients) and its weight gradient from dc (in bf16, cuDNN's
    /// bf16 OHWI gradient widened into the fp32 OIHW one).
    fn unit_backward(&self, plan: &Plan, u: usize, dy: ActRef, dc: ActRef) -> Result<()> {
        let (spec, unit, conv) = (&self.specs[u], &self.units[u], &plan.convs[u]);
        let y = conv.shape().y();
        let [g, b, _, _] = spec.bn;
        let grads = [&self.grads[g], &self.grads[b]];
        let (dev, ws, dw) = (&self.dev, &self.workspace, &self.grads[spec.weight]);
        match (&unit.c, dy, dc) {
            (Act::F32(c), ActRef::F32(dy), ActRef::F32(dc)) => {
                unit.norm.backward(dev, conv.y_desc(), c, dy, dc, numel(y), &self.table.tensors, grads)?;
                conv.backward_filter(dev, self.src(spec.src)?, ActRef::F32(dc), ActRef::F32(dw), ws)
            }
            (Act::Bf16(c), ActRef::Bf16(dy), ActRef::Bf16(dc)) => {
                let half = self.half()?;
                unit.norm.backward_bf16(
                    dev,
                    (c, dy, dc),
                    y[0] * y[2] * y[3],
                    &self.table.tensors,
                    grads,
                    &half.bn_scratch(),
                )?;
                conv.backward_filter(dev, self.src(spec.src)?, ActRef::Bf16(dc), ActRef::Bf16(&half.dw), ws)?;
                let s = conv.shape();
                half.kernels.to_f32_nchw(dev, &half.dw, dw, s.out_channels, s.x[1], s.kernel * s.kernel)
            }
            _ => Err(mixed("batch norm backward")),
        }
    }

    fn backward_data(&self, plan: &Plan, u: usize, dc: ActRef, dx: ActRef, accumulate: bool) -> Result<()> {
        plan.convs[u].backward_data(
            &self.dev,
            self.conv_weight(self.specs[u].weight)?,
            dc,
            dx,
            accumulate,
            &self.workspace,
        )
    }

    /// g = g masked by the ReLU output y, in place, over `n` values.
    fn mask(&self, g: ActRef, y: ActRef, n: usize) -> Result<()> {
        match (g, y) {
            (ActRef::F32(g), ActRef::F32(y)) => self.train_kernels.mask(&self.dev, g, y, n),
            (ActRef::Bf16(g), ActRef::Bf16(y)) => self.half()?.kernels.mask(&self.dev, g, y, n),
            _ => Err(mixed("a ReLU mask")),
        }
    }

    fn backward(&self, plan: &Plan, n: usize) -> Result<()> {
        let (dev, k) = (&self.dev, &self.train_kernels);
        let [g0, g1, g2] = self.scratch.each_ref().map(Act::r);
        let (fin, classes) = (self.config.feature_dim(), self.config.num_classes);
        let (w, dw) = (&self.table.tensors[self.fc.0], &self.grads[self.fc.0]);
        linear::backward(dev, &self.features, w, &self.dlogits, dw, &self.dfeatures, n, fin, classes)?;
        let (last, dims) = self.last_unit(plan)?;
        match (self.units[last].a.r(), g0) {
            (ActRef::F32(a), ActRef::F32(g)) => k.avg_pool_backward(dev, &self.dfeatures, a, g, dims)?,
            (ActRef::Bf16(a), ActRef::Bf16(g)) => {
                self.half()?.kernels.avg_pool_backward(dev, &self.dfeatures, a, g, dims)?
            }
            _ => return Err(mixed("the average pool's backward")),
        }
        // Each block takes the gradient of its output in g0 and leaves that of its input there.
        for (i, block) in self.blocks.iter().enumerate().rev() {
            let units = &block.units;
            let top = units.len() - 1;
            if i + 1 != self.blocks.len() {
                let out = units[top];
                self.mask(g0, self.units[out].a.r(), numel(plan.convs[out].shape().y()))?;
            }
            // g0 now holds the gradient of relu's input: of the last unit's BN output and of the shortcut.
            self.unit_backward(plan, units[top], g0, g1)?;
            for u in (1..=top).rev() {
                let below = units[u - 1];
                self.backward_data(plan, units[u], g1, g2, false)?;
                self.mask(g2, self.units[below].a.r(), numel(plan.convs[below].shape().y()))?;
                self.unit_backward(plan, below, g2, g1)?;
            }
            // g1: the gradient of the first unit's convolution output.
            if let Some(ds) = block.downsample {
                self.unit_backward(plan, ds, g0, g2)?;
                self.backward_data(plan, ds, g2, g0, false)?;
            }
            // The identity shortcut's gradient (g0 itself) or the projection's, plus the first unit's.
            self.backward_data(plan, units[0], g1, g0, true)?;
        }
        let stem = &self.units[0];
        let stem_y = plan.convs[0].shape().y();
        match &self.pool {
            Some(pool) => {
                let (arg, out) = (&pool.arg, pool_out(stem_y));
                match (g0, stem.a.r(), g1) {
                    (ActRef::F32(dy), ActRef::F32(a), ActRef::F32(dx)) => {
                        k.max_pool_backward(dev, dy, arg, a, dx, stem_y, out)?
                    }
                    (ActRef::Bf16(dy), ActRef::Bf16(a), ActRef::Bf16(dx)) => {
                        self.half()?.kernels.max_pool_backward(dev, dy, arg, a, dx, stem_y, out)?
                    }
                    _ => return Err(mixed("the max-pool's backward")),
                }
                self.unit_backward(plan, 0, g1, g2)
            }
            None => {
                self.mask(g0, stem.a.r(), numel(stem_y))?;
                self.unit_backward(plan, 0, g0, g1)
            }
        }
    }

    fn update(&mut self, lr: f32) -> Result<()> {
        let OptimizerKind::Sgd { momentum, nesterov } = self.optimizer.kind else {
            return Err(Error::invalid("CUDA: the device trainer runs SGD only"));
        };
        let m = self.momentum_override.unwrap_or(momentum);
        let lr = widen(lr);
        for (i, group) in self.optimizer.groups.iter().enumerate() {
            if !self.trainable[i] {
                continue;
            }
            let args = SgdArgs {
                neg_lr: (-(lr * widen(group.lr_scale))) as f32,
                weight_decay: group.weight_decay,
                momentum: m,
                nesterov,
                first: !self.has_momentum[i],
            };
            let len = self.grads[i].len;
            self.train_kernels.sgd(&self.dev, &self.table.tensors[i], &self.grads[i], &self.moments[i], len, args)?;
        }
        // The convolutions read bf16 copies: convert every updated master again (in stream order, after its update).
        if let Some(half) = &self.half {
            for s in self.specs.iter().filter(|s| self.trainable[s.weight]) {
                half.refresh(&self.dev, &self.kernels, s, &self.table.tensors[s.weight])?;
            }
        }
        if m != 0.0 {
            for (has, &trainable) in self.has_momentum.iter_mut().zip(&self.trainable) {
                *has |= trainable;
            }
        }
        Ok(())
    }

    /// The gradient of every trainable parameter from the last step, by name, in the store's order.
    pub fn gradients(&self) -> Result<Vec<(String, Tensor)>> {
        guarded("reading gradients", || {
            let mut out = Vec::new();
            for (i, g) in self.grads.iter().enumerate() {
                if self.trainable[i] {
                    out.push((
                        self.table.names[i].clone(),
                        Tensor::new(&self.table.shapes[i], self.dev.read(g, g.len)?)?,
                    ));
                }
            }
            Ok(out)
        })
    }

    /// The convolution weights as the convolutions read them, by name, OIHW fp32: the fp32 masters, or with bf16
    /// storage their bf16 copies widened back (which must equal the masters rounded to bf16 after every update).
    pub fn conv_weights(&self) -> Result<Vec<(String, Tensor)>> {
        guarded("reading convolution weights", || {
            let mut out = Vec::new();
            for s in &self.specs {
                let (shape, master) = (&self.table.shapes[s.weight], &self.table.tensors[s.weight]);
                let values = match &self.half {
                    None => self.dev.read(master, master.len)?,
                    Some(half) => {
                        let wide = self.dev.zeros(master.len)?;
                        let copy = half
                            .weights
                            .get(&s.weight)
                            .expect("every convolution has its bf16 copy in a bf16 trainer (Half::new)");
                        let cin = master.len / (s.out_channels * s.kernel * s.kernel).max(1);
                        half.kernels.to_f32_nchw(&self.dev, copy, &wide, s.out_channels, cin, s.kernel * s.kernel)?;
                        self.dev.read(&wide, master.len)?
                    }
                };
                out.push((self.table.names[s.weight].clone(), Tensor::new(shape, values)?));
            }
            Ok(out)
        })
    }

    /// Copy the device's parameters, BN running statistics and batch count into `model` (for checkpoints and
    /// evaluation), which must have this trainer's configuration.
    pub fn download_into(&self, model: &mut ResNet) -> Result<()> {
        guarded("download", || {
            if model.config != self.config {
                return Err(Error::invalid("CUDA: download_into needs a model of the trainer's configuration"));
            }
            self.table.download(&self.dev, &mut model.store, "trainer")?;
            model.store.batches_tracked = self.batches_tracked;
            Ok(())
        })
    }

    /// Build the plan for batch size `n` once (algorithm searches included), growing the workspace if needed.
    fn ensure_plan(&mut self, n: usize) -> Result<()> {
        if self.plans.contains_key(&n) {
            return Ok(());
        }
        let (shapes, _) = unit_shapes(&self.specs, n, self.hw);
        // Training-mode BN needs two values per channel for its unbiased variance (PyTorch refuses one too).
        if let Some(s) = shapes.iter().find(|s| s.y()[0] * s.y()[2] * s.y()[3] < 2) {
            return Err(Error::invalid(format!(
                "CUDA: batch norm in training needs more than one value per channel; batch {n} at {}x{} leaves {:?}",
                self.hw.0,
                self.hw.1,
                s.y()
            )));
        }
        let storage = if self.half.is_some() { Storage::Bf16Nhwc } else { Storage::F32Nchw };
        let mut convs = Vec::with_capacity(shapes.len());
        for (i, &shape) in shapes.iter().enumerate() {
            // The stem's input is the images, whose gradient nobody needs.
            convs.push(TrainConv::new(&self.dev, &mut self.algos, shape, i != 0, storage)?);
        }
        let workspace = convs.iter().map(|c| c.workspace).max().unwrap_or(0);
        if self.workspace.len < workspace {
            self.workspace = self.dev.zeros(workspace)?;
        }
        self.plans.insert(n, Plan { convs });
        Ok(())
    }
}

/// The training graph: `model.graph`'s units, blocks and classifier as indices into the tensor table, every
/// tensor checked against the store by name and shape (and none left over), so the device graph and the CPU
/// model cannot silently diverge.
struct TrainGraph {
    specs: Vec<UnitSpec>,
    blocks: Vec<BlockSpec>,
    fc: (usize, usize),
}

impl TrainGraph {
    fn of(model: &ResNet) -> Result<TrainGraph> {
        let g = &model.graph;
        let mut index = TensorIndex::new(&model.store, "trainer");
        let mut specs = Vec::with_capacity(g.units.len());
        for unit in &g.units {
            let (cin, cout, kernel) = (unit.in_channels, unit.out_channels, unit.kernel);
            let weight = index.take(&format!("{}.weight", unit.conv), &[cout, cin, kernel, kernel])?;
            let mut bn = [0; 4];
            for (slot, leaf) in bn.iter_mut().zip(["weight", "bias", "running_mean", "running_var"]) {
                *slot = index.take(&format!("{}.{leaf}", unit.bn), &[cout])?;
            }
            specs.push(UnitSpec {
                weight,
                in_channels: cin,
                out_channels: cout,
                kernel,
                stride: unit.stride,
                src: unit.src,
                post: unit.post,
                bn,
            });
        }
        let blocks = g
            .blocks
            .iter()
            .map(|b| BlockSpec { name: b.name.clone(), units: b.main.clone(), downsample: b.downsample })
            .collect();
        let fc = (index.take("fc.weight", &[g.classes, g.features])?, index.take("fc.bias", &[g.classes])?);
        index.check_all_used()?;
        Ok(TrainGraph { specs, blocks, fc })
    }
}

#[cfg(test)]
mod tests {
    //! The training graph is a pure function of the model: its units, blocks and convolution shapes for every
    //! family member on both stems are pinned in `tests/fixtures/cuda_graphs/trainer.txt` (written once from the
    //! hand-written `Walker`, before the network was described once in `model::graph`; `Act(i)` is now `Unit(i)`).
    use super::*;
    use crate::model::{Arch, Stem};

    fn describe(arch: &str, stem: Stem) -> String {
        let arch: Arch = arch.parse().expect("a family member");
        let config = ResNetConfig { stem, widths: [4, 8, 16, 32], ..ResNetConfig::new(arch, 10) };
        let model = ResNet::new(config, 0);
        let b = TrainGraph::of(&model).expect("the training graph describes the model");
        let hw = if stem == Stem::Cifar { (32, 32) } else { (64, 64) };
        let (shapes, pooled) = unit_shapes(&b.specs, 2, hw);
        let mut out = format!("## {arch} {stem} input {hw:?} fc {:?} pooled {pooled:?}\n", b.fc);
        for (spec, shape) in b.specs.iter().zip(&shapes) {
            out += &format!("{spec:?} x {:?} y {:?}\n", shape.x, shape.y());
        }
        for block in &b.blocks {
            out += &format!("{block:?}\n");
        }
        out
    }

    #[test]
    fn training_graph_is_pinned() {
        let mut text = String::new();
        for arch in ["resnet18", "resnet34", "resnet50", "resnet101"] {
            for stem in [Stem::ImageNet, Stem::Cifar] {
                text += &describe(arch, stem);
            }
        }
        crate::exec::cuda::pinned("trainer.txt", &text);
    }
}
