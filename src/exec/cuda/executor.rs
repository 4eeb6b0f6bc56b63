//! `CudaResNet`: the whole network resident on one device, run as a fixed list of steps.

use std::collections::HashMap;

use super::table::{TensorIndex, TensorTable};
use crate::engine::Precision;
use crate::engine::cuda::conv::{AlgoCache, ConvPlan, ConvShape, Storage};
use crate::engine::cuda::device::{Buf, Device, guarded};
use crate::engine::cuda::kernels::Kernels;
use crate::engine::cuda::linear;
use crate::engine::cuda::norm::Norm;
use crate::engine::{ConvGeom, Tensor};
use crate::error::{Error, Result};
use crate::model::graph::{Post, Src};
use crate::model::layers::BN_EPS;
use crate::model::{ResNet, ResNetConfig, Tap};

/// Activation slots: the block input, the shortcut and one unit's output are live at once, so three suffice
/// (see `DeviceGraph::of`).
const SLOTS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Slot {
    Input,
    Act(usize),
}

/// One step of the network, independent of the batch size.
#[derive(Debug)]
enum Node {
    Conv {
        weight: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        src: Slot,
        dst: Slot,
    },
    /// BN of `dst` in place, plus the residual and the ReLU when asked.
    Norm {
        norm: usize,
        dst: Slot,
        residual: Option<Slot>,
        relu: bool,
    },
    MaxPool {
        src: Slot,
        dst: Slot,
    },
    /// Global average pool of `src` into the features buffer. `Tap::AvgPool` feeds the classifier and always
    /// runs; a stage tap (`Tap::Layer1..4`, after that stage's last block) runs only when `features` asks for it.
    AvgPool {
        src: Slot,
        tap: Tap,
    },
    Fc,
}

/// The steps bound to one batch size: a convolution plan per convolution node and each node's input dims.
struct Plan {
    convs: Vec<ConvPlan>,
    dims: Vec<[usize; 4]>,
    /// Largest activation written to an `Act` slot, in floats.
    activation: usize,
    /// Largest convolution workspace, in bytes.
    workspace: usize,
}

/// The bf16 copies `Precision::Bf16` runs on: conv weights (OHWI), the staged images and the activation slots
/// (NHWC), as bf16 bit patterns.
struct Half {
    weights: HashMap<usize, Buf<u16>>,
    input: Buf<u16>,
    acts: Vec<Buf<u16>>,
}

impl Half {
    fn slot(&self, s: Slot) -> &Buf<u16> {
        match s {
            Slot::Input => &self.input,
            Slot::Act(i) => &self.acts[i],
        }
    }
}

pub struct CudaResNet {
    config: ResNetConfig,
    /// Parameters then buffers, in the store's order, as device copies.
    table: TensorTable,
    norms: Vec<Norm>,
    nodes: Vec<Node>,
    fc: (usize, usize),
    plans: HashMap<usize, Plan>,
    algos: AlgoCache,
    input: Buf<f32>,
    acts: Vec<Buf<f32>>,
    half: Option<Half>,
    features: Buf<f32>,
    logits: Buf<f32>,
    workspace: Buf<u8>,
    batch: usize,
    hw: (usize, usize),
    kernels: Kernels,
    /// Last, so that every buffer and plan above is released while the device's handles still exist.
    dev: Device,
}

impl CudaResNet {
    /// Upload `model` to device `device` (TF32 off) for batches of up to `batch` images of `h`×`w`.
    pub fn new(model: &ResNet, device: usize, batch: usize, h: usize, w: usize) -> Result<CudaResNet> {
        Self::with_precision(model, device, batch, h, w, Precision::F32)
    }

    /// As `new`, in `precision`: F32 (IEEE fp32, TF32 off: every parity test's setting); Tf32 (cuDNN and cuBLAS
    /// may use TF32 tensor cores, about 1e-3 relative error); Bf16 (convolutions on bf16 NHWC activations and
    /// weights with fp32 accumulation, PyTorch's autocast on channels-last tensors; BN, residual and ReLU in
    /// fp32 rounded to bf16, pooling and the classifier in fp32, the fp32 weights the master copy).
    pub fn with_precision(
        model: &ResNet,
        device: usize,
        batch: usize,
        h: usize,
        w: usize,
        precision: Precision,
    ) -> Result<CudaResNet> {
        if batch == 0 || h == 0 || w == 0 {
            return Err(Error::invalid(format!("CUDA: empty input shape: batch {batch}, {h}x{w}")));
        }
        // The graph is checked against the model before the device is touched, so a model this executor does not
        // describe fails the same way on every machine.
        let DeviceGraph { nodes, norms: norm_specs, fc } = DeviceGraph::of(model)?;

        let dev = Device::open(device, precision == Precision::Tf32)?;
        guarded("uploading the network", || {
            let kernels = Kernels::load(&dev)?;
            let table = TensorTable::upload(&dev, &model.store)?;
            let norms = norm_specs.iter().map(|&(t, c)| Norm::new(&dev, t, c, BN_EPS)).collect::<Result<Vec<_>>>()?;
            for norm in &norms {
                norm.fold(&dev, &kernels, &table.tensors)?;
            }
            let half = if precision == Precision::Bf16 {
                let mut weights = HashMap::new();
                for node in &nodes {
                    if let Node::Conv { weight, .. } = *node {
                        let [o, i, kh, kw] = <[usize; 4]>::try_from(table.shapes[weight].as_slice())
                            .map_err(|_| Error::invalid("CUDA: a convolution weight is not 4-D"))?;
                        let bits = dev.zeros(o * i * kh * kw)?;
                        kernels.to_bf16_nhwc(&dev, &table.tensors[weight], &bits, o, i, kh * kw)?;
                        weights.insert(weight, bits);
                    }
                }
                Some(Half { weights, input: dev.zeros(batch * model.config.in_channels * h * w)?, acts: Vec::new() })
            } else {
                None
            };
            let classes = model.config.num_classes;
            // The widest pooled output: the classifier's input, or a wider stage for custom widths.
            let widest = model.config.widths.iter().map(|w| w * model.config.arch.block.expansion()).max();
            let features = dev.zeros(batch * widest.unwrap_or(0).max(model.config.feature_dim()))?;
            let logits = dev.zeros(batch * classes)?;
            let mut exec = CudaResNet {
                config: model.config,
                table,
                norms,
                nodes,
                fc,
                plans: HashMap::new(),
                algos: AlgoCache::default(),
                input: dev.zeros(batch * model.config.in_channels * h * w)?,
                acts: Vec::new(),
                half,
                features,
                logits,
                workspace: dev.zeros(0)?,
                batch,
                hw: (h, w),
                kernels,
                dev,
            };
            exec.ensure_plan(batch)?;
            Ok(exec)
        })
    }

    /// The device, for logs: "NVIDIA H100 80GB HBM3 (cuda:0, sm_90)".
    pub fn device_name(&self) -> String {
        self.dev.describe()
    }

    /// Eval-mode logits `[N, classes]` for images `[N, 3, H, W]` with N ≤ the batch given at construction.
    pub fn forward(&mut self, images: &Tensor) -> Result<Tensor> {
        self.features(images, Tap::Fc)
    }

    /// What `infer::features` computes on the CPU: `[N, D]` at `tap` (stage outputs averaged over space, the
    /// pooled features, or the logits), running the network only as far as the tap.
    pub fn features(&mut self, images: &Tensor, tap: Tap) -> Result<Tensor> {
        guarded("forward", || {
            let n = self.stage(images)?;
            let width = self.run(n, tap)?;
            let out = if tap == Tap::Fc { &self.logits } else { &self.features };
            Tensor::new(&[n, width], self.dev.read(out, n * width)?)
        })
    }

    /// Copy `images` to the device, where `run_staged` reads them; returns the batch size.
    pub fn stage(&mut self, images: &Tensor) -> Result<usize> {
        let n = match images.shape() {
            &[n, c, h, w] if c == self.config.in_channels && (h, w) == self.hw && (1..=self.batch).contains(&n) => n,
            s => {
                return Err(Error::invalid(format!(
                    "CUDA: input {s:?} does not fit this executor ([1..={}, {}, {}, {}])",
                    self.batch, self.config.in_channels, self.hw.0, self.hw.1
                )));
            }
        };
        self.ensure_plan(n)?;
        self.dev.write(&mut self.input, images.data())?;
        Ok(n)
    }

    /// The forward over the `n` images last staged, waiting for the device to finish: what a benchmark times,
    /// as PyTorch's GPU benchmarks time batches already on the device.
    pub fn run_staged(&mut self, n: usize) -> Result<()> {
        guarded("forward", || {
            self.run(n, Tap::Fc)?;
            self.dev.stream.synchronize().map_err(crate::engine::cuda::device::cuda_err("waiting for the device"))
        })
    }

    /// Enqueue the forward over the `n` staged images as far as `until`; returns the output's width. The logits
    /// land in `self.logits`, any other tap in `self.features`.
    fn run(&mut self, n: usize, until: Tap) -> Result<usize> {
        if !(1..=self.batch).contains(&n) {
            return Err(Error::invalid(format!("CUDA: batch {n} outside this executor's 1..={}", self.batch)));
        }
        self.ensure_plan(n)?;
        let plan = self.plans.get(&n).expect("ensure_plan built this batch size's plan");
        let slot = |s: Slot| match s {
            Slot::Input => &self.input,
            Slot::Act(i) => &self.acts[i],
        };
        let (dev, k) = (&self.dev, &self.kernels);
        if let Some(half) = &self.half {
            let [_, c, h, w] = plan.dims.first().copied().unwrap_or_default();
            k.to_bf16_nhwc(dev, &self.input, &half.input, n, c, h * w)?;
        }
        let mut convs = plan.convs.iter();
        for (node, &dims) in self.nodes.iter().zip(&plan.dims) {
            match *node {
                Node::Conv { weight, src, dst, .. } => {
                    let conv = convs.next().expect("the plan has one convolution per Conv node");
                    match &self.half {
                        None => {
                            conv.forward(dev, slot(src), &self.table.tensors[weight], slot(dst), &self.workspace)?
                        }
                        Some(half) => {
                            let w = half
                                .weights
                                .get(&weight)
                                .expect("every convolution has its bf16 copy (with_precision)");
                            conv.forward(dev, half.slot(src), w, half.slot(dst), &self.workspace)?
                        }
                    }
                }
                Node::Norm { norm, dst, residual, relu } => {
                    let bn = &self.norms[norm];
                    match &self.half {
                        None => bn.apply(dev, k, slot(dst), slot(dst), residual.map(slot), dims, relu)?,
                        Some(half) => {
                            let (y, res) = (half.slot(dst), residual.map(|r| half.slot(r)));
                            bn.apply_bf16(dev, k, y, y, res, dims, relu)?
                        }
                    }
                }
                Node::MaxPool { src, dst } => match &self.half {
                    None => k.max_pool(dev, slot(src), slot(dst), dims, pool_out(dims))?,
                    Some(half) => k.max_pool_bf16(dev, half.slot(src), half.slot(dst), dims, pool_out(dims))?,
                },
                Node::AvgPool { src, tap } => {
                    if tap != until && tap != Tap::AvgPool {
                        continue;
                    }
                    match &self.half {
                        None => k.avg_pool(dev, slot(src), &self.features, dims)?,
                        Some(half) => k.avg_pool_bf16(dev, half.slot(src), &self.features, dims)?,
                    }
                    if tap == until {
                        return Ok(dims[1]);
                    }
                }
                Node::Fc => {
                    let (fin, fout) = (self.config.feature_dim(), self.config.num_classes);
                    let (w, b) = (&self.table.tensors[self.fc.0], &self.table.tensors[self.fc.1]);
                    linear::forward(dev, k, &self.features, w, b, &self.logits, n, fin, fout)?;
                }
            }
        }
        Ok(self.config.num_classes)
    }

    /// Copy the device's parameters and BN buffers into `model` (for checkpoints), which must have this
    /// executor's configuration.
    pub fn download_into(&self, model: &mut ResNet) -> Result<()> {
        guarded("download", || self.download(model))
    }

    fn download(&self, model: &mut ResNet) -> Result<()> {
        if model.config != self.config {
            return Err(Error::invalid("CUDA: download_into needs a model of the executor's configuration"));
        }
        self.table.download(&self.dev, &mut model.store, "executor")
    }

    /// Build the plan for batch size `n` once, growing the shared activation and workspace buffers if it needs more.
    fn ensure_plan(&mut self, n: usize) -> Result<()> {
        if self.plans.contains_key(&n) {
            return Ok(());
        }
        let storage = if self.half.is_some() { Storage::Bf16Nhwc } else { Storage::F32Nchw };
        let plan = build_plan(
            &self.dev,
            &mut self.algos,
            &self.nodes,
            [n, self.config.in_channels, self.hw.0, self.hw.1],
            storage,
        )?;
        match &mut self.half {
            None if self.acts.first().is_none_or(|a| a.len < plan.activation) => {
                self.acts = (0..SLOTS).map(|_| self.dev.zeros(plan.activation)).collect::<Result<_>>()?;
            }
            Some(half) if half.acts.first().is_none_or(|a| a.len < plan.activation) => {
                half.acts = (0..SLOTS).map(|_| self.dev.zeros(plan.activation)).collect::<Result<_>>()?;
            }
            _ => {}
        }
        if self.workspace.len < plan.workspace {
            self.workspace = self.dev.zeros(plan.workspace)?;
        }
        self.plans.insert(n, plan);
        Ok(())
    }
}

/// Output size of the stem's 3x3/2 max-pool with padding 1.
fn pool_out(dims: [usize; 4]) -> (usize, usize) {
    ConvGeom::square(2, 1).output_hw(dims[2], dims[3], 3, 3)
}

/// A node's input dims and, for a node that writes a slot, that slot and its dims.
type NodeShape = ([usize; 4], Option<(Slot, [usize; 4])>);

/// Every node's shapes: a pure function of the graph and the input.
fn node_shapes(nodes: &[Node], input: [usize; 4]) -> Result<Vec<NodeShape>> {
    let mut slot_dims: HashMap<Slot, [usize; 4]> = HashMap::from([(Slot::Input, input)]);
    let get = |m: &HashMap<Slot, [usize; 4]>, s: Slot| {
        Ok(*m.get(&s).expect("DeviceGraph writes every slot before a node reads it"))
    };
    let mut out = Vec::with_capacity(nodes.len());
    for node in nodes {
        let shapes = match *node {
            Node::Conv { out_channels, kernel, stride, src, dst, .. } => {
                let x = get(&slot_dims, src)?;
                (x, Some((dst, conv_shape(x, out_channels, kernel, stride).y())))
            }
            Node::Norm { dst, .. } => (get(&slot_dims, dst)?, None),
            Node::MaxPool { src, dst } => {
                let x = get(&slot_dims, src)?;
                let (oh, ow) = pool_out(x);
                (x, Some((dst, [x[0], x[1], oh, ow])))
            }
            Node::AvgPool { src, .. } => (get(&slot_dims, src)?, None),
            Node::Fc => ([input[0], 0, 1, 1], None),
        };
        if let Some((dst, y)) = shapes.1 {
            slot_dims.insert(dst, y);
        }
        out.push(shapes);
    }
    Ok(out)
}

fn conv_shape(x: [usize; 4], out_channels: usize, kernel: usize, stride: usize) -> ConvShape {
    ConvShape { x, out_channels, kernel, stride, pad: kernel / 2 }
}

fn build_plan(
    dev: &Device,
    algos: &mut AlgoCache,
    nodes: &[Node],
    input: [usize; 4],
    storage: Storage,
) -> Result<Plan> {
    let mut plan = Plan { convs: Vec::new(), dims: Vec::new(), activation: 0, workspace: 0 };
    for (node, (dims, out)) in nodes.iter().zip(node_shapes(nodes, input)?) {
        if let Node::Conv { out_channels, kernel, stride, .. } = *node {
            let conv = ConvPlan::new(dev, algos, conv_shape(dims, out_channels, kernel, stride), storage)?;
            plan.workspace = plan.workspace.max(conv.workspace);
            plan.convs.push(conv);
        }
        if let Some((_, y)) = out {
            plan.activation = plan.activation.max(y.iter().product());
        }
        plan.dims.push(dims);
    }
    Ok(plan)
}

/// The device graph: `model.graph` as nodes over activation slots, with the BN layers' and the classifier's
/// tensors as indices into the tensor table, every tensor checked against the store by name and shape (and none
/// left over), so the device graph and the CPU model cannot silently diverge.
struct DeviceGraph {
    nodes: Vec<Node>,
    /// Per BN layer: tensor indices of weight, bias, running mean, running variance; channels.
    norms: Vec<([usize; 4], usize)>,
    fc: (usize, usize),
}

impl DeviceGraph {
    /// Each unit writes the lowest slot that holds no value it or a later node still reads; ResNet's widest point
    /// (a block's input or projection, one unit's input and its output) needs three.
    fn of(model: &ResNet) -> Result<DeviceGraph> {
        let g = &model.graph;
        let mut index = TensorIndex::new(&model.store, "executor");
        let last_readers = g.last_readers();
        let last_pool_reader = g.last_pool_reader();
        let (mut nodes, mut norms) = (Vec::new(), Vec::new());
        let mut unit_slots: Vec<usize> = Vec::with_capacity(g.units.len());
        let mut pool_slot = None;
        let taps = [Tap::Layer1, Tap::Layer2, Tap::Layer3, Tap::Layer4];
        let stage_taps: Vec<(usize, Tap)> = (0..4).map(|i| (g.stage_output(i), taps[i])).collect();
        for (u, unit) in g.units.iter().enumerate() {
            let slot = |s: Src| match s {
                Src::Images => Slot::Input,
                Src::Pool => Slot::Act(pool_slot.expect("the pool runs right after the stem")),
                Src::Unit(i) => Slot::Act(unit_slots[i]),
            };
            let mut busy: Vec<usize> = (0..u).filter(|&i| last_readers[i] >= Some(u)).map(|i| unit_slots[i]).collect();
            busy.extend(pool_slot.filter(|_| last_pool_reader >= Some(u)));
            let dst = free_slot(&busy)?;
            let (cin, cout, kernel) = (unit.in_channels, unit.out_channels, unit.kernel);
            let weight = index.take(&format!("{}.weight", unit.conv), &[cout, cin, kernel, kernel])?;
            nodes.push(Node::Conv {
                weight,
                out_channels: cout,
                kernel,
                stride: unit.stride,
                src: slot(unit.src),
                dst: Slot::Act(dst),
            });
            let mut t = [0; 4];
            for (i, leaf) in t.iter_mut().zip(["weight", "bias", "running_mean", "running_var"]) {
                *i = index.take(&format!("{}.{leaf}", unit.bn), &[cout])?;
            }
            norms.push((t, cout));
            let (residual, relu) = match unit.post {
                Post::Linear => (None, false),
                Post::Relu => (None, true),
                Post::AddRelu(s) => (Some(slot(s)), true),
            };
            nodes.push(Node::Norm { norm: norms.len() - 1, dst: Slot::Act(dst), residual, relu });
            unit_slots.push(dst);
            if let (Src::Images, Some(_)) = (unit.src, g.pool) {
                let p = free_slot(&[dst])?;
                nodes.push(Node::MaxPool { src: Slot::Act(dst), dst: Slot::Act(p) });
                pool_slot = Some(p);
            }
            if let Some(&(_, tap)) = stage_taps.iter().find(|(end, _)| *end == u) {
                nodes.push(Node::AvgPool { src: Slot::Act(dst), tap });
            }
        }
        nodes.push(Node::AvgPool { src: Slot::Act(unit_slots[g.output()]), tap: Tap::AvgPool });
        let fc = (index.take("fc.weight", &[g.classes, g.features])?, index.take("fc.bias", &[g.classes])?);
        nodes.push(Node::Fc);
        index.check_all_used()?;
        Ok(DeviceGraph { nodes, norms, fc })
    }
}

/// The lowest activation slot not in `busy`.
fn free_slot(busy: &[usize]) -> Result<usize> {
    (0..SLOTS).find(|s| !busy.contains(s)).ok_or_else(|| Error::invalid("CUDA: out of activation slots"))
}

#[cfg(test)]
mod tests {
    //! The device graph is a pure function of the model: its nodes and shapes for every family member on both
    //! stems are pinned in `tests/fixtures/cuda_graphs/executor.txt` (written once from the hand-written
    //! `Builder`, before the network was described once in `model::graph`), so a change to the wiring is seen
    //! without a GPU. `RESNET_WRITE_FIXTURES=1` rewrites the file.
    use super::*;
    use crate::model::{Arch, Stem};

    fn describe(arch: &str, stem: Stem) -> String {
        let arch: Arch = arch.parse().expect("a family member");
        let config = ResNetConfig { stem, widths: [4, 8, 16, 32], ..ResNetConfig::new(arch, 10) };
        let model = ResNet::new(config, 0);
        let b = DeviceGraph::of(&model).expect("the device graph describes the model");
        let input = if stem == Stem::Cifar { [2, 3, 32, 32] } else { [2, 3, 64, 64] };
        let shapes = node_shapes(&b.nodes, input).expect("shapes");
        let mut out = format!("## {arch} {stem} input {input:?} fc {:?} norms {:?}\n", b.fc, b.norms);
        for (node, (dims, y)) in b.nodes.iter().zip(shapes) {
            out += &format!("{node:?} in {dims:?} out {y:?}\n");
        }
        out
    }

    #[test]
    fn device_graph_is_pinned() {
        let mut text = String::new();
        for arch in ["resnet18", "resnet34", "resnet50", "resnet101"] {
            for stem in [Stem::ImageNet, Stem::Cifar] {
                text += &describe(arch, stem);
            }
        }
        crate::exec::cuda::pinned("executor.txt", &text);
    }
}
