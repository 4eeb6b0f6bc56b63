//! The whole network: stem, four stages of blocks, global average pool, fully connected head.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::block::Block;
use super::family::{ResNetConfig, Stem};
use super::layers::{ConvBn, Linear, MaxPool, Mode, Relu};
use super::store::Store;
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
    pub store: Store,
    stem: ConvBn,
    stem_relu: Relu,
    maxpool: Option<MaxPool>,
    stages: Vec<Vec<Block>>,
    fc: Linear,
    /// Record: shape of the pooled feature map.
    pooled_from: Option<[usize; 4]>,
    /// The first layer (stem or block, in forward order) whose output held a NaN or an infinity during the last
    /// training-mode forward: what the training loop names when a step goes non-finite.
    first_nonfinite: Option<String>,
}

impl ResNet {
    /// A network with torchvision's initialisation, drawn from `seed`.
    pub fn new(config: ResNetConfig, seed: u64) -> Self {
        let mut store = Store::new(seed);
        let mut root = store.root();
        let c0 = config.widths[0];
        let (stem, maxpool) = match config.stem {
            Stem::ImageNet => (ConvBn::new(&mut root, "conv1", "bn1", 3, c0, 7, 2, false), Some(MaxPool::default())),
            Stem::Cifar => (ConvBn::new(&mut root, "conv1", "bn1", 3, c0, 3, 1, false), None),
        };
        let kind = config.arch.block;
        let mut cin = c0;
        let mut stages = Vec::new();
        for (i, (&width, &depth)) in config.widths.iter().zip(&config.arch.layers).enumerate() {
            let mut stage_path = root.pp(format!("layer{}", i + 1));
            let blocks = (0..depth)
                .map(|b| {
                    let stride = if i > 0 && b == 0 { 2 } else { 1 };
                    let block = Block::new(&mut stage_path.pp(b), kind, cin, width, stride, config.zero_init_residual);
                    cin = width * kind.expansion();
                    block
                })
                .collect();
            stages.push(blocks);
        }
        let fc = Linear::new(&mut root, "fc", config.feature_dim(), config.num_classes);
        ResNet {
            config,
            store,
            stem,
            stem_relu: Relu::default(),
            maxpool,
            stages,
            fc,
            pooled_from: None,
            first_nonfinite: None,
        }
    }

    /// Logits `[N, classes]` for images `[N, 3, H, W]`.
    pub fn forward(&mut self, be: &dyn Backend, x: &Tensor, mode: Mode) -> Tensor {
        self.forward_to(be, x, mode, Tap::Fc)
    }

    /// Run up to `tap` and return its output (a feature map for layer1..layer4, a matrix for avgpool and fc).
    pub fn forward_to(&mut self, be: &dyn Backend, x: &Tensor, mode: Mode, tap: Tap) -> Tensor {
        assert_eq!(x.shape().get(1), Some(&3), "input must be [N, 3, H, W]");
        let train = mode == Mode::Train;
        if train {
            self.store.batches_tracked += 1;
        }
        let s = &mut self.store;
        let first_nonfinite = &mut self.first_nonfinite;
        *first_nonfinite = None;
        let mut watch = |name: &dyn Fn() -> String, h: &Tensor| {
            if train && first_nonfinite.is_none() && !h.all_finite() {
                *first_nonfinite = Some(name());
            }
        };
        let mut h = match mode {
            // The stem's record needs its own copy of the caller's input.
            Mode::Train => self.stem_relu.forward_train(be, self.stem.forward_train(be, s, &Arc::new(x.clone()))),
            Mode::Eval => Arc::new(self.stem.forward_eval(be, s, x, None, true)),
        };
        watch(&|| "conv1".into(), &h);
        if let Some(pool) = &mut self.maxpool {
            h = Arc::new(pool.forward(be, &h, mode));
        }
        let taps = [Tap::Layer1, Tap::Layer2, Tap::Layer3, Tap::Layer4];
        for (i, (stage, &stage_tap)) in self.stages.iter_mut().zip(&taps).enumerate() {
            for (b, block) in stage.iter_mut().enumerate() {
                h = block.forward(be, s, h, mode);
                watch(&|| format!("layer{}.{b}", i + 1), &h);
            }
            if tap == stage_tap {
                // A copy only in training mode, where the block's record shares the map.
                return Arc::unwrap_or_clone(h);
            }
        }
        if mode == Mode::Train {
            self.pooled_from = Some(h.dims4());
        }
        let pooled = be.global_avg_pool(&h);
        if tap == Tap::AvgPool {
            return pooled;
        }
        let logits = self.fc.forward(be, s, pooled, mode);
        watch(&|| "fc".into(), &logits);
        logits
    }

    /// The first layer whose output went non-finite in the last training-mode forward (`conv1` for the stem,
    /// `layerI.B` for a block, `fc`), if any.
    pub fn first_nonfinite_output(&self) -> Option<&str> {
        self.first_nonfinite.as_deref()
    }

    /// Backpropagate the gradient of the loss with respect to the logits of the last training-mode forward,
    /// accumulating parameter gradients. Returns the input gradient when asked for; otherwise stops as soon as no
    /// trainable parameter is left below.
    pub fn backward(&mut self, be: &dyn Backend, dlogits: &Tensor, want_input_grad: bool) -> Option<Tensor> {
        let trainable_below = self.trainable_prefix();
        let s = &mut self.store;
        let mut g = self.fc.backward(be, s, dlogits, true).expect("dx was requested");
        let shape = self.pooled_from.take().expect("backward called without a training-mode forward");
        g = be.global_avg_pool_backward(&g, shape);
        for (i, stage) in self.stages.iter_mut().enumerate().rev() {
            if !want_input_grad && !trainable_below[i + 1] {
                return None;
            }
            for block in stage.iter_mut().rev() {
                g = block.backward(be, s, g);
            }
        }
        if !want_input_grad && !trainable_below[0] {
            return None;
        }
        if let Some(pool) = &mut self.maxpool {
            g = pool.backward(be, &g);
        }
        g = self.stem_relu.backward(be, g);
        self.stem.backward(be, s, &g, want_input_grad)
    }

    /// For each of [stem, layer1, .., layer4]: does it or anything before it hold a trainable parameter?
    fn trainable_prefix(&self) -> [bool; 5] {
        let mut out = [false; 5];
        let mut any = false;
        for (i, prefix) in ["", "layer1.", "layer2.", "layer3.", "layer4."].iter().enumerate() {
            any |= self.store.params.iter().any(|p| {
                p.trainable
                    && if i == 0 {
                        p.name.starts_with("conv1.") || p.name.starts_with("bn1.")
                    } else {
                        p.name.starts_with(prefix)
                    }
            });
            out[i] = any;
        }
        out
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
