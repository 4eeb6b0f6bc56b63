//! The whole network on the CPU: one conv+BN layer per unit of `Graph`, the stem's max-pool and the classifier;
//! forward walks the graph in order, backward in reverse (the records each layer keeps are in `layers`).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::family::ResNetConfig;
use super::graph::{Graph, Post, Src};
use super::layers::{ConvBn, Linear, MaxPool, Mode, ReplicaSum};
use super::store::{ParamId, Store};
use crate::engine::{Backend, Tensor};
use crate::error::{Error, Result};

/// Where a forward pass can stop to hand out features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tap {
    Layer1,
    Layer2,
    Layer3,
    Layer4,
    /// Globally pooled layer4 features, `[N, feature_dim]`.
    AvgPool,
    /// The logits.
    Fc,
}

impl Tap {
    /// The 0-based stage whose output this tap is, for layer1..layer4.
    pub fn stage(self) -> Option<usize> {
        [Tap::Layer1, Tap::Layer2, Tap::Layer3, Tap::Layer4].iter().position(|&t| t == self)
    }
}

impl std::str::FromStr for Tap {
    type Err = Error;
    fn from_str(s: &str) -> Result<Tap> {
        Ok(match s {
            "layer1" => Tap::Layer1,
            "layer2" => Tap::Layer2,
            "layer3" => Tap::Layer3,
            "layer4" => Tap::Layer4,
            "avgpool" => Tap::AvgPool,
            "fc" => Tap::Fc,
            _ => return Err(Error::invalid(format!("unknown layer '{s}' (expected layer1..layer4, avgpool or fc)"))),
        })
    }
}

pub struct ResNet {
    pub config: ResNetConfig,
    /// The wiring every forward, backward and executor walks.
    pub graph: Graph,
    pub store: Store,
    /// One conv+BN layer per graph unit, in the graph's order.
    units: Vec<ConvBn>,
    maxpool: Option<MaxPool>,
    fc: Linear,
    /// Record: each unit's output after its ReLU (the sign mask of the ReLU's gradient, shared with the records
    /// of the convolutions that read it); `None` for a projection, which has no ReLU.
    outputs: Vec<Option<Arc<Tensor>>>,
    /// Record: shape of the pooled feature map.
    pooled_from: Option<[usize; 4]>,
    /// The first layer (stem or block, in forward order) whose output held a NaN or an infinity during the last
    /// training-mode forward: what the training loop names when a step goes non-finite.
    first_nonfinite: Option<String>,
    /// Batch norm over every replica's batch (SyncBatchNorm) when set; each replica's own batch otherwise.
    sync_bn: Option<Arc<dyn ReplicaSum>>,
    /// Told during backward which parameters' gradients are complete.
    gradients_ready: Option<GradientsReady>,
}

/// Called during backward with parameters whose gradients are now complete (the classifier's first, then each
/// unit's as its backward finishes: reverse parameter order), while the rest of backward is still to run, so
/// that data parallelism can start averaging them (DDP's buckets) and overlap that with the remaining backward.
pub type GradientsReady = Box<dyn FnMut(&Store, &[ParamId]) + Send>;

/// Where the gradient of `src` accumulates.
fn gradient_of<'a>(
    src: Src,
    images: &'a mut Option<Tensor>,
    pool: &'a mut Option<Tensor>,
    units: &'a mut [Option<Tensor>],
) -> &'a mut Option<Tensor> {
    match src {
        Src::Images => images,
        Src::Pool => pool,
        Src::Unit(i) => &mut units[i],
    }
}

/// Accumulate a gradient into `slot` (the first contribution is moved in).
fn accumulate(be: &dyn Backend, slot: &mut Option<Tensor>, g: Tensor) {
    *slot = Some(match slot.take() {
        Some(acc) => be.add(acc, &g),
        None => g,
    });
}

impl ResNet {
    /// A network with torchvision's initialisation, drawn from `seed` in torchvision's module order.
    pub fn new(config: ResNetConfig, seed: u64) -> Self {
        let graph = Graph::of(&config);
        let mut store = Store::new(seed);
        let mut root = store.root();
        let mut units: Vec<Option<ConvBn>> = graph.units.iter().map(|_| None).collect();
        for u in graph.module_order() {
            let unit = &graph.units[u];
            let zero_bn = config.zero_init_residual && matches!(unit.post, Post::AddRelu(_));
            let (ci, co) = (unit.in_channels, unit.out_channels);
            units[u] = Some(ConvBn::new(&mut root, &unit.conv, &unit.bn, ci, co, unit.kernel, unit.stride, zero_bn));
        }
        let fc = Linear::new(&mut root, "fc", graph.features, graph.classes);
        let units = units.into_iter().map(|u| u.expect("module_order lists every unit")).collect();
        ResNet {
            config,
            maxpool: graph.pool.map(MaxPool::new),
            outputs: graph.units.iter().map(|_| None).collect(),
            graph,
            store,
            units,
            fc,
            pooled_from: None,
            first_nonfinite: None,
            sync_bn: None,
            gradients_ready: None,
        }
    }

    /// Training-mode batch norm from now on over the batches of every replica that `across` sums over
    /// (`train --sync-bn`), or (None) over each replica's own batch.
    pub fn sync_batch_norm(&mut self, across: Option<Arc<dyn ReplicaSum>>) {
        self.sync_bn = across;
    }

    /// `hook` is told, during every backward from now on, which parameters' gradients are complete (None: no one).
    pub fn on_gradients_ready(&mut self, hook: Option<GradientsReady>) {
        self.gradients_ready = hook;
    }

    /// Logits `[N, classes]` for images `[N, 3, H, W]`.
    pub fn forward(&mut self, be: &dyn Backend, x: &Tensor, mode: Mode) -> Tensor {
        self.forward_to(be, x, mode, Tap::Fc)
    }

    /// The unit after which `tap` (a stage output) is taken.
    fn tap_unit(&self, tap: Tap) -> Option<usize> {
        Some(self.graph.stage_output(tap.stage()?))
    }

    /// Run up to `tap` and return its output (a feature map for layer1..layer4, a matrix for avgpool and fc).
    pub fn forward_to(&mut self, be: &dyn Backend, x: &Tensor, mode: Mode, tap: Tap) -> Tensor {
        assert_eq!(x.shape().get(1), Some(&self.graph.in_channels), "input must be [N, in_channels, H, W]");
        let stop = self.tap_unit(tap);
        let pooled = match mode {
            Mode::Train => match self.forward_train(be, x, stop) {
                Ok(h) => {
                    self.pooled_from = Some(h.dims4());
                    be.global_avg_pool(&h)
                }
                Err(stage_output) => return Arc::unwrap_or_clone(stage_output),
            },
            Mode::Eval => match self.forward_eval(be, x, stop) {
                Ok(h) => be.global_avg_pool(&h),
                Err(stage_output) => return stage_output,
            },
        };
        if tap == Tap::AvgPool {
            return pooled;
        }
        let logits = self.fc.forward(be, &self.store, pooled, mode);
        if mode == Mode::Train && self.first_nonfinite.is_none() && !logits.all_finite() {
            self.first_nonfinite = Some("fc".into());
        }
        logits
    }

    /// The training-mode walk over the graph: every unit records what its backward needs. `Ok` holds the last
    /// feature map; `Err` the output of unit `stop` when the walk ends there.
    fn forward_train(
        &mut self,
        be: &dyn Backend,
        x: &Tensor,
        stop: Option<usize>,
    ) -> std::result::Result<Arc<Tensor>, Arc<Tensor>> {
        self.store.batches_tracked += 1;
        self.first_nonfinite = None;
        let ResNet { graph, store, units, maxpool, outputs, first_nonfinite, sync_bn, .. } = self;
        let across = sync_bn.as_deref();
        // The stem's record needs its own copy of the caller's input.
        let images = Arc::new(x.clone());
        let unit = |u: usize, input: &Arc<Tensor>, shortcut: Option<&Arc<Tensor>>| {
            let y = units[u].forward_train(be, store, input, across);
            let post = graph.units[u].post;
            let out = Arc::new(match (post, shortcut) {
                (Post::AddRelu(_), Some(s)) => be.add_relu(y, s),
                (Post::Relu, _) => be.relu(y),
                _ => y,
            });
            // The record of the ReLU's mask (a projection has none).
            outputs[u] = (post != Post::Linear).then(|| Arc::clone(&out));
            let named = if u == 0 { Some("conv1") } else { graph.block_ending_at(u).map(|b| b.name.as_str()) };
            if let Some(name) = named.filter(|_| first_nonfinite.is_none() && !out.all_finite()) {
                *first_nonfinite = Some(name.to_string());
            }
            out
        };
        let pool = |h: &Arc<Tensor>| Arc::new(maxpool.as_mut().expect("a graph with a pool").forward_train(be, h));
        graph.walk(&images, stop, unit, pool)
    }

    /// The inference walk: batch norm, the residual add and the ReLU fused into each convolution; nothing kept.
    fn forward_eval(&self, be: &dyn Backend, x: &Tensor, stop: Option<usize>) -> std::result::Result<Tensor, Tensor> {
        let unit = |u: usize, input: &Tensor, shortcut: Option<&Tensor>| {
            let relu = self.graph.units[u].post != Post::Linear;
            self.units[u].forward_eval(be, &self.store, input, shortcut, relu)
        };
        let pool = |h: &Tensor| self.maxpool.as_ref().expect("a graph with a pool").forward_eval(be, h);
        self.graph.walk(x, stop, unit, pool)
    }

    /// The first layer whose output went non-finite in the last training-mode forward (`conv1` for the stem,
    /// `layerI.B` for a block, `fc`), if any.
    pub fn first_nonfinite_output(&self) -> Option<&str> {
        self.first_nonfinite.as_deref()
    }

    /// Backpropagate the gradient of the loss with respect to the logits of the last training-mode forward,
    /// accumulating parameter gradients: the graph walked in reverse, each unit's output gradient complete when
    /// its turn comes (every reader of a value runs after it). Returns the input gradient when asked for;
    /// otherwise stops as soon as no trainable parameter is left below.
    pub fn backward(&mut self, be: &dyn Backend, dlogits: &Tensor, want_input_grad: bool) -> Option<Tensor> {
        let trainable_upto = self.trainable_upto();
        let s = &mut self.store;
        let g = self.fc.backward(be, s, dlogits, true).expect("dx was requested");
        let mut ready = |s: &Store, ids: &[ParamId]| {
            if let Some(hook) = self.gradients_ready.as_mut() {
                hook(s, ids)
            }
        };
        ready(s, &[self.fc.weight, self.fc.bias]);
        let shape = self.pooled_from.take().expect("backward called without a training-mode forward");
        let mut grads: Vec<Option<Tensor>> = self.graph.units.iter().map(|_| None).collect();
        let (mut d_pool, mut d_images) = (None, None);
        grads[self.graph.output()] = Some(be.global_avg_pool_backward(&g, shape));
        for (u, unit) in self.graph.units.iter().enumerate().rev() {
            if !want_input_grad && !trainable_upto[u] {
                return None;
            }
            if let (0, Some(pool)) = (u, &mut self.maxpool) {
                let dy = d_pool.take().expect("the units after the stem read the pool");
                grads[0] = Some(pool.backward(be, &dy));
            }
            let dy = grads[u].take().expect("every unit's output is read");
            let d = match unit.post {
                Post::Linear => dy,
                Post::Relu | Post::AddRelu(_) => {
                    be.relu_backward(dy, &self.outputs[u].take().expect("backward called without a forward"))
                }
            };
            let need_dx = u != 0 || want_input_grad;
            let dx = self.units[u].backward(be, s, &d, need_dx, self.sync_bn.as_deref());
            let conv_bn = &self.units[u];
            ready(s, &[conv_bn.conv.weight, conv_bn.bn.weight, conv_bn.bn.bias]);
            if let Post::AddRelu(shortcut) = unit.post {
                accumulate(be, gradient_of(shortcut, &mut d_images, &mut d_pool, &mut grads), d);
            }
            if let Some(dx) = dx {
                accumulate(be, gradient_of(unit.src, &mut d_images, &mut d_pool, &mut grads), dx);
            }
        }
        d_images
    }

    /// For each unit in graph order: does it or any unit before it hold a trainable parameter?
    fn trainable_upto(&self) -> Vec<bool> {
        let mut any = false;
        self.units
            .iter()
            .map(|u| {
                any |= [u.conv.weight, u.bn.weight, u.bn.bias].iter().any(|&p| self.store.trainable(p));
                any
            })
            .collect()
    }

    /// Number of learnable parameters.
    pub fn num_params(&self) -> usize {
        self.store.params.iter().map(|p| p.value.numel()).sum()
    }

    /// Parameters and buffers by torchvision key (without `num_batches_tracked`, which `batches_tracked` holds).
    pub fn state_dict(&self) -> BTreeMap<String, Tensor> {
        let params = self.store.params.iter().map(|p| (p.name.clone(), p.value.clone()));
        let buffers = self.store.buffers.iter().map(|b| (b.name.clone(), b.value.clone()));
        params.chain(buffers).collect()
    }

    /// Names of the BN layers, for writing one `num_batches_tracked` per layer as torchvision does.
    pub fn batch_norm_names(&self) -> Vec<String> {
        self.store.buffers.iter().filter_map(|b| b.name.strip_suffix(".running_mean").map(str::to_string)).collect()
    }

    /// Copy every tensor of `state` into the network. Strict: missing, unexpected and mis-shaped keys are all
    /// listed in one error. `*.num_batches_tracked` is accepted and sets the network's batch count.
    pub fn load_state_dict(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let mut missing = Vec::new();
        let mut misshaped = Vec::new();
        let store = &mut self.store;
        let slots = store
            .params
            .iter_mut()
            .map(|p| (&p.name, &mut p.value))
            .chain(store.buffers.iter_mut().map(|b| (&b.name, &mut b.value)));
        let mut known = std::collections::BTreeSet::new();
        for (name, value) in slots {
            known.insert(name.clone());
            match state.get(name) {
                None => missing.push(name.clone()),
                Some(t) if t.shape() != value.shape() => {
                    misshaped.push(format!("{name} is {:?} in the file, {:?} in the model", t.shape(), value.shape()))
                }
                Some(t) => *value = t.clone(),
            }
        }
        let unexpected: Vec<&String> =
            state.keys().filter(|k| !known.contains(*k) && !k.ends_with(".num_batches_tracked")).collect();
        if !missing.is_empty() || !unexpected.is_empty() || !misshaped.is_empty() {
            let mut parts = Vec::new();
            let list = |v: Vec<String>| {
                let n = v.len();
                let shown: Vec<_> = v.into_iter().take(8).collect();
                format!("{}{}", shown.join(", "), if n > 8 { format!(" and {} more", n - 8) } else { String::new() })
            };
            if !missing.is_empty() {
                parts.push(format!("missing keys: {}", list(missing)));
            }
            if !unexpected.is_empty() {
                parts.push(format!("unexpected keys: {}", list(unexpected.into_iter().cloned().collect())));
            }
            if !misshaped.is_empty() {
                parts.push(format!("wrong shapes: {}", list(misshaped)));
            }
            return Err(Error::invalid(format!("weights do not fit {}: {}", self.config.arch, parts.join("; "))));
        }
        if let Some(t) = state.iter().find(|(k, _)| k.ends_with(".num_batches_tracked")).map(|(_, t)| t) {
            self.store.batches_tracked = t.data().first().copied().unwrap_or(0.0) as i64;
        }
        Ok(())
    }

    /// Freeze (or unfreeze) every parameter whose name starts with one of `prefixes`.
    pub fn set_trainable(&mut self, prefixes: &[&str], trainable: bool) {
        for p in &mut self.store.params {
            if prefixes.iter().any(|pre| p.name.starts_with(pre)) {
                p.trainable = trainable;
            }
        }
    }
}
