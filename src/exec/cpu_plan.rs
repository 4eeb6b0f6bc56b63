//! `CpuPlan`: CPU inference as a plan, the way the CUDA executor runs: built once from the model's `Graph`, its
//! weights and a precision, holding per graph unit the convolution weight, the batch norm folded into a
//! per-channel scale and shift, and the weight's kept inference forms (`engine::cpu::kept`), in a vector indexed
//! by unit. Nothing is keyed by tensor identity and nothing grows: a unit keeps at most one form per kept
//! algorithm (three), built the first time a batch needs it (the algorithm depends on the batch's tile count), so
//! a plan's memory is bounded by its weights. It runs eval-mode forwards only; it cannot train.
//!
//! In int8 (`CpuPlan::int8`, from a `resnet quantize` calibration) every unit keeps its weight with the batch
//! norm's scale folded in, quantized per output channel (`engine::cpu::int8`), and its input's calibrated
//! uint8 parameters; the fc head (0.01 % of the multiply-adds) stays f32.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::engine::cpu::algo::{self, KeptAlgo};
use crate::engine::cpu::int8::{Int8Weight, QuantParams};
use crate::engine::cpu::kept::KeptConv;
use crate::engine::cpu::{Affine, Cpu, conv2d_int8, packed};
use crate::engine::{Backend, ConvGeom, EvalAffine, Tensor, batch_norm_affine};
use crate::error::{Error, Result};
use crate::model::graph::{Graph, Post};
use crate::model::layers::BN_EPS;
use crate::model::{ResNet, ResNetConfig, Tap};

/// One conv+BN unit of the plan.
struct PlanUnit {
    /// The convolution weight's `[O, C, kh, kw]`.
    shape: [usize; 4],
    geom: ConvGeom,
    /// Eval-mode batch norm as y = x·scale + shift, from the running statistics.
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
    weight: UnitWeight,
}

/// What a unit multiplies with.
enum UnitWeight {
    /// The f32 weight, and the form kept for each `KeptAlgo` (indexed by `kept_slot`), built on first use.
    Float { weight: Tensor, kept: Box<[OnceLock<KeptConv>; 3]> },
    /// In an int8 plan: the weight times the BN scale, quantized, and the input's parameters. The f32 weight is
    /// dropped as each unit is quantized: a serving process no longer holds ResNet-34's 87 MB of f32 weights
    /// beside the 22 MB it runs on (peak RSS is the loader's: the file's bytes and the tensors made from them).
    Int8(Int8Weight, QuantParams),
}

fn kept_slot(a: KeptAlgo) -> usize {
    match a {
        KeptAlgo::Winograd4 => 0,
        KeptAlgo::Winograd2 => 1,
        KeptAlgo::Im2col => 2,
    }
}

pub struct CpuPlan {
    pub config: ResNetConfig,
    graph: Graph,
    bf16: bool,
    int8: bool,
    units: Vec<PlanUnit>,
    fc_weight: Tensor,
    fc_bias: Vec<f32>,
}

impl CpuPlan {
    /// The plan of `model` (whose tensors it takes over, so the weights are held once) in f32, or with bf16
    /// convolution operands and f32 accumulation (what PyTorch's bf16 autocast does on a CPU); None for bf16 on
    /// a CPU without AVX512-BF16.
    pub fn new(model: ResNet, bf16: bool) -> Option<CpuPlan> {
        if bf16 && !packed::bf16_supported() {
            return None;
        }
        let ResNet { config, graph, store, .. } = model;
        let mut state: HashMap<String, Tensor> = store.params.into_iter().map(|p| (p.name, p.value)).collect();
        state.extend(store.buffers.into_iter().map(|b| (b.name, b.value)));
        let mut take =
            |name: &str| state.remove(name).unwrap_or_else(|| panic!("the store holds {name}, which the graph names"));
        let mut units = Vec::with_capacity(graph.units.len());
        for u in &graph.units {
            let mut bn = |leaf: &str| take(&format!("{}.{leaf}", u.bn));
            let (gamma, beta, mean, var) = (bn("weight"), bn("bias"), bn("running_mean"), bn("running_var"));
            let (scale, shift) = batch_norm_affine(gamma.data(), beta.data(), mean.data(), var.data(), BN_EPS);
            let weight = take(&format!("{}.weight", u.conv));
            let (shape, relu) = (weight.dims4(), u.post != Post::Linear);
            let weight = UnitWeight::Float { weight, kept: Default::default() };
            units.push(PlanUnit { shape, geom: u.geom(), scale, shift, relu, weight });
        }
        let (fc_weight, fc_bias) = (take("fc.weight"), take("fc.bias").into_data());
        Some(CpuPlan { config, graph, bf16, int8: false, units, fc_weight, fc_bias })
    }

    /// The plan of `model` with int8 convolutions, each input quantized with `input_of(conv name)` (a `resnet
    /// quantize` calibration's, which must name every one).
    pub fn int8(model: ResNet, input_of: impl Fn(&str) -> Option<QuantParams>) -> Result<CpuPlan> {
        let names: Vec<String> = model.graph.units.iter().map(|u| u.conv.clone()).collect();
        let mut plan = CpuPlan::new(model, false).expect("an f32 plan runs on every CPU");
        for (u, name) in names.iter().enumerate() {
            let input = input_of(name).ok_or_else(|| {
                Error::invalid(format!("the calibration names no input scale for {name} (run `resnet quantize` again)"))
            })?;
            let p = &mut plan.units[u];
            let UnitWeight::Float { weight, .. } = &p.weight else { unreachable!("a fresh f32 plan") };
            let shape = p.shape;
            let depth = shape[1] * shape[2] * shape[3];
            let folded: Vec<f32> = weight
                .data()
                .chunks(depth)
                .zip(&p.scale)
                .flat_map(|(row, &s)| row.iter().map(move |w| w * s))
                .collect();
            // Quad planes where the input is ≥ 0 in channels of four (every unit after the stem: a ReLU's output,
            // widths in 64s); the stem's normalised image takes the column path.
            let weight = Int8Weight::conv(&folded, shape)
                .filter(|_| input.zero_point == 0)
                .unwrap_or_else(|| Int8Weight::new(&folded, shape[0], depth));
            p.weight = UnitWeight::Int8(weight, input);
            p.scale = vec![1.0; shape[0]];
        }
        plan.int8 = true;
        Ok(plan)
    }

    pub fn is_bf16(&self) -> bool {
        self.bf16
    }

    pub fn is_int8(&self) -> bool {
        self.int8
    }

    /// Runs the network on `x` (a calibration batch) and hands `f` every unit's input before the unit runs, with
    /// the unit's index in the graph's order (for `resnet quantize`).
    pub fn visit_inputs(&self, x: &Tensor, f: &(dyn Fn(usize, &Tensor) + Sync)) {
        let visit = |u: usize, input: &Tensor, shortcut: Option<&Tensor>| {
            f(u, input);
            self.unit(u, input, shortcut)
        };
        let pool = |h: &Tensor| self.pool(h);
        let _ = self.graph.walk(x, None, visit, pool);
    }

    /// The stem's max-pool of `h`.
    fn pool(&self, h: &Tensor) -> Tensor {
        let p = self.graph.pool.expect("a graph that pools has a pool");
        Cpu::F32.max_pool2d_values(h, p.kernel, p.stride, p.padding)
    }

    /// relu?(bn(conv(x)) + shortcut?) of unit `u`, on its kept weight where one applies.
    fn unit(&self, u: usize, x: &Tensor, shortcut: Option<&Tensor>) -> Tensor {
        let p = &self.units[u];
        let affine = EvalAffine { scale: &p.scale, shift: &p.shift, residual: shortcut, relu: p.relu };
        let [n, _, h, w] = x.dims4();
        let [o, _, kh, kw] = p.shape;
        let (oh, ow) = p.geom.output_hw(h, w, kh, kw);
        let (weight, kept) = match &p.weight {
            UnitWeight::Int8(weight, input) => {
                return conv2d_int8(x, weight, *input, p.shape, p.geom, Some(&Affine::new(affine, [n, o, oh, ow])));
            }
            UnitWeight::Float { weight, kept } => (weight, kept),
        };
        let bytes = if self.bf16 { 2 } else { 4 };
        let Some(algo) = algo::for_inference(x.dims4(), p.shape, p.geom, bytes) else {
            return Cpu::F32.conv2d_affine_act(x, weight, p.geom, affine);
        };
        let kept = kept[kept_slot(algo)].get_or_init(|| KeptConv::new(x.dims4(), weight, p.geom, algo, self.bf16));
        kept.forward(x, Some(&Affine::new(affine, [n, o, oh, ow])))
    }

    /// Run up to `tap` on images `[N, 3, H, W]`: a stage's feature map for layer1..layer4, the pooled features
    /// for avgpool, the logits for fc.
    pub fn forward_to(&self, x: &Tensor, tap: Tap) -> Tensor {
        assert_eq!(x.shape().get(1), Some(&self.graph.in_channels), "input must be [N, in_channels, H, W]");
        let stop = tap.stage().map(|s| self.graph.stage_output(s));
        let pool = |h: &Tensor| self.pool(h);
        let h = match self.graph.walk(x, stop, |u, input, shortcut| self.unit(u, input, shortcut), pool) {
            Ok(h) => h,
            Err(stage_output) => return stage_output,
        };
        let pooled = Cpu::F32.global_avg_pool(&h);
        if tap == Tap::AvgPool {
            return pooled;
        }
        Cpu::F32.linear(&pooled, &self.fc_weight, &self.fc_bias)
    }

    /// Logits `[N, classes]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_to(x, Tap::Fc)
    }

    /// `[N, D]` features at `tap`, as `infer::features` computes them: stage maps averaged over space.
    pub fn features(&self, x: &Tensor, tap: Tap) -> Tensor {
        let out = self.forward_to(x, tap);
        if out.shape().len() == 4 { Cpu::F32.global_avg_pool(&out) } else { out }
    }
}
