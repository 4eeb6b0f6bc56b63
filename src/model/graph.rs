//! The network as a value: the one description of the ResNet wiring that every walker iterates.
//!
//! `Graph::of(&ResNetConfig)` lists the conv+BN units in execution order, each with its torchvision module names,
//! its shape, where it reads its input and what follows its batch norm (a ReLU, the residual add and a ReLU, or
//! nothing); the residual blocks and the stages as groups of units; the stem's max-pool. This is the only place
//! that knows Basic vs Bottleneck, the stride rule (the first block of stages 2-4 halves the map) and the
//! downsample rule (a projection shortcut wherever the stride or the channel count changes), as torchvision's
//! `_make_layer` and its family table do. The parameter store, the CPU training and inference forward, the CUDA
//! executors, the summary and every exporter walk it, so a wiring change is made once and seen by all of them.

use std::ops::Range;

use super::family::{BlockKind, ResNetConfig, Stem};
use crate::engine::ConvGeom;

/// Where a unit reads its input (and a residual add its shortcut).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Src {
    /// The network's input images.
    Images,
    /// The stem's max-pool output (ImageNet stem only).
    Pool,
    /// The output of unit i, after what follows its batch norm.
    Unit(usize),
}

/// What follows a unit's batch norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Post {
    Relu,
    /// relu(bn + the shortcut read at `Src`): the output of a residual block.
    AddRelu(Src),
    /// Nothing: a shortcut projection.
    Linear,
}

/// One convolution (no bias) followed by batch norm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// torchvision module names: `conv1`/`bn1` for the stem, `layer2.0.conv1`/`layer2.0.bn1` in a block,
    /// `layer2.0.downsample.0`/`layer2.0.downsample.1` for a projection shortcut.
    pub conv: String,
    pub bn: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub src: Src,
    pub post: Post,
    /// The block the unit belongs to (`None` for the stem).
    pub block: Option<usize>,
}

impl Unit {
    pub fn geom(&self) -> ConvGeom {
        ConvGeom::square(self.stride, self.padding)
    }

    /// The inputs the unit reads: its convolution's, and the shortcut of a residual add.
    pub fn reads(&self) -> impl Iterator<Item = Src> {
        let shortcut = match self.post {
            Post::AddRelu(s) => Some(s),
            _ => None,
        };
        std::iter::once(self.src).chain(shortcut)
    }

    /// Parameters: the convolution's weight and the batch norm's scale and shift.
    pub fn num_params(&self) -> usize {
        self.out_channels * self.in_channels * self.kernel * self.kernel + 2 * self.out_channels
    }
}

/// A residual block: `main` is the chain of units (ReLU between them, the residual add and ReLU after the last),
/// `downsample` the projection shortcut if there is one (it runs first, as it reads the block's input).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// `layer2.0`.
    pub name: String,
    /// 0-based stage (`layer{stage + 1}`).
    pub stage: usize,
    pub main: Vec<usize>,
    pub downsample: Option<usize>,
}

impl Block {
    /// The unit whose output is the block's output.
    pub fn output(&self) -> usize {
        *self.main.last().expect("a block has at least two units")
    }
}

/// The ImageNet stem's 3x3/2 max-pool with padding 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Pool {
    pub fn output_hw(&self, h: usize, w: usize) -> (usize, usize) {
        ConvGeom::square(self.stride, self.padding).output_hw(h, w, self.kernel, self.kernel)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Graph {
    pub in_channels: usize,
    /// Execution order: the stem (unit 0), then per block its projection (if any) and its main chain.
    pub units: Vec<Unit>,
    /// After the stem, when it has one.
    pub pool: Option<Pool>,
    pub blocks: Vec<Block>,
    /// The blocks of each of the four stages.
    pub stages: [Range<usize>; 4],
    /// Channels into the classifier (global average pool of the last unit's output) and classes out of it.
    pub features: usize,
    pub classes: usize,
}

/// Output (channels, height, width) of every unit for one input size, and of the stem's pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shapes {
    pub units: Vec<[usize; 3]>,
    pub pool: Option<[usize; 3]>,
}

impl Graph {
    /// Values per image at `tap` (spatially averaged for a stage): the stage's channels, the pooled features, or
    /// the classes.
    pub fn width(&self, tap: super::Tap) -> usize {
        match tap.stage() {
            Some(s) => self.units[self.blocks[self.stages[s].end - 1].output()].out_channels,
            None if tap == super::Tap::Fc => self.classes,
            None => self.features,
        }
    }

    pub fn of(cfg: &ResNetConfig) -> Graph {
        let in_channels = cfg.in_channels;
        let c0 = cfg.widths[0];
        let (kernel, stride, pool) = match cfg.stem {
            Stem::ImageNet => (7, 2, Some(Pool { kernel: 3, stride: 2, padding: 1 })),
            Stem::Cifar => (3, 1, None),
        };
        let mut units = vec![Unit {
            conv: "conv1".into(),
            bn: "bn1".into(),
            in_channels,
            out_channels: c0,
            kernel,
            stride,
            padding: kernel / 2,
            src: Src::Images,
            post: Post::Relu,
            block: None,
        }];
        let mut input = if pool.is_some() { Src::Pool } else { Src::Unit(0) };
        let kind = cfg.arch.block;
        let mut cin = c0;
        let mut blocks = Vec::new();
        let mut stages: [Range<usize>; 4] = Default::default();
        for (stage, (&width, &depth)) in cfg.widths.iter().zip(&cfg.arch.layers).enumerate() {
            let first = blocks.len();
            for b in 0..depth {
                // torchvision's `_make_layer`: the first block of every stage after the first halves the map.
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let cout = width * kind.expansion();
                let name = format!("layer{}.{b}", stage + 1);
                let index = blocks.len();
                let unit = |conv: String, bn: String, (ci, co, k, s): (usize, usize, usize, usize), src, post| Unit {
                    conv,
                    bn,
                    in_channels: ci,
                    out_channels: co,
                    kernel: k,
                    stride: s,
                    padding: k / 2,
                    src,
                    post,
                    block: Some(index),
                };
                let downsample = (stride != 1 || cin != cout).then(|| {
                    let (conv, bn) = (format!("{name}.downsample.0"), format!("{name}.downsample.1"));
                    units.push(unit(conv, bn, (cin, cout, 1, stride), input, Post::Linear));
                    units.len() - 1
                });
                let shortcut = downsample.map_or(input, Src::Unit);
                let chain: Vec<(usize, usize, usize, usize)> = match kind {
                    BlockKind::Basic => vec![(cin, width, 3, stride), (width, width, 3, 1)],
                    BlockKind::Bottleneck => vec![(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)],
                };
                let mut main = Vec::with_capacity(chain.len());
                let mut src = input;
                for (i, &dims) in chain.iter().enumerate() {
                    let post = if i + 1 == chain.len() { Post::AddRelu(shortcut) } else { Post::Relu };
                    let (conv, bn) = (format!("{name}.conv{}", i + 1), format!("{name}.bn{}", i + 1));
                    units.push(unit(conv, bn, dims, src, post));
                    src = Src::Unit(units.len() - 1);
                    main.push(units.len() - 1);
                }
                blocks.push(Block { name, stage, main, downsample });
                input = src;
                cin = cout;
            }
            stages[stage] = first..blocks.len();
        }
        Graph { in_channels, units, pool, blocks, stages, features: cin, classes: cfg.num_classes }
    }

    /// The unit whose output is the network's last feature map.
    pub fn output(&self) -> usize {
        self.units.len() - 1
    }

    /// The unit whose output is stage `stage`'s (0-based) output.
    pub fn stage_output(&self, stage: usize) -> usize {
        self.blocks[self.stages[stage].end - 1].output()
    }

    /// The units in torchvision's module registration order (stem; per block its chain, then `downsample`):
    /// the order of `state_dict()` and of the parameters the store creates and initialises.
    pub fn module_order(&self) -> Vec<usize> {
        let mut order = vec![0];
        for b in &self.blocks {
            order.extend(&b.main);
            order.extend(b.downsample);
        }
        order
    }

    /// For every unit, the last unit that reads its output (`None` for the last unit, read by the classifier).
    pub fn last_readers(&self) -> Vec<Option<usize>> {
        let mut last = vec![None; self.units.len()];
        for (u, unit) in self.units.iter().enumerate() {
            for src in unit.reads() {
                if let Src::Unit(i) = src {
                    last[i] = Some(u);
                }
            }
        }
        last
    }

    /// The last unit that reads the stem's pool, if there is one.
    pub fn last_pool_reader(&self) -> Option<usize> {
        self.units.iter().rposition(|u| u.reads().any(|s| s == Src::Pool))
    }

    /// For every unit, the values (pool or unit outputs) it is the last to read: what a forward walk can free
    /// once the unit has run.
    pub fn released_after(&self) -> Vec<Vec<Src>> {
        let mut done = vec![Vec::new(); self.units.len()];
        for (i, last) in self.last_readers().into_iter().enumerate() {
            if let Some(u) = last {
                done[u].push(Src::Unit(i));
            }
        }
        if let Some(u) = self.last_pool_reader() {
            done[u].push(Src::Pool);
        }
        done
    }

    /// Walk the units in order over values of type `T` (a tensor, a shared tensor): `unit(u, input, shortcut)`
    /// computes unit u's output from its input and, before a residual add, the shortcut; `pool` the stem's pool.
    /// A value no later unit reads is dropped as soon as its last reader has run. Returns the last unit's output
    /// (the feature map), or `Err` with unit `stop`'s output when the walk ends there.
    pub fn walk<T>(
        &self,
        images: &T,
        stop: Option<usize>,
        mut unit: impl FnMut(usize, &T, Option<&T>) -> T,
        mut pool: impl FnMut(&T) -> T,
    ) -> std::result::Result<T, T> {
        const ORDER: &str = "the graph lists a unit after the units it reads";
        let done_after = self.released_after();
        let read_later = self.last_readers();
        let mut values: Vec<Option<T>> = self.units.iter().map(|_| None).collect();
        let mut pooled: Option<T> = None;
        for (u, spec) in self.units.iter().enumerate() {
            let out = {
                let read = |src: Src| match src {
                    Src::Images => images,
                    Src::Pool => pooled.as_ref().expect(ORDER),
                    Src::Unit(i) => values[i].as_ref().expect(ORDER),
                };
                let shortcut = match spec.post {
                    Post::AddRelu(s) => Some(read(s)),
                    Post::Relu | Post::Linear => None,
                };
                unit(u, read(spec.src), shortcut)
            };
            if stop == Some(u) {
                return Err(out);
            }
            if spec.src == Src::Images && self.pool.is_some() {
                pooled = Some(pool(&out));
            }
            // Kept only if a later unit reads it (the ImageNet stem's output is read by the pool alone) or it is
            // the feature map.
            if read_later[u].is_some() || u == self.output() {
                values[u] = Some(out);
            }
            for &src in &done_after[u] {
                match src {
                    Src::Images => {}
                    Src::Pool => pooled = None,
                    Src::Unit(i) => values[i] = None,
                }
            }
        }
        Ok(values.pop().flatten().expect("the last unit's output is the feature map"))
    }

    /// The block whose output unit `u` computes, if any.
    pub fn block_ending_at(&self, u: usize) -> Option<&Block> {
        let b = &self.blocks[self.units[u].block?];
        (b.output() == u).then_some(b)
    }

    /// Output shapes for `h` x `w` input images.
    pub fn shapes(&self, h: usize, w: usize) -> Shapes {
        let mut units: Vec<[usize; 3]> = Vec::with_capacity(self.units.len());
        let mut pool = None;
        for unit in &self.units {
            let [_, ih, iw] = match unit.src {
                Src::Images => [self.in_channels, h, w],
                Src::Pool => pool.expect("the pool runs right after the stem"),
                Src::Unit(i) => units[i],
            };
            let (oh, ow) = unit.geom().output_hw(ih, iw, unit.kernel, unit.kernel);
            units.push([unit.out_channels, oh, ow]);
            if let (Src::Images, Some(p)) = (unit.src, self.pool) {
                let (ph, pw) = p.output_hw(oh, ow);
                pool = Some([unit.out_channels, ph, pw]);
            }
        }
        Shapes { units, pool }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, ResNet};

    fn graph(arch: &str, stem: Stem) -> Graph {
        let arch: Arch = arch.parse().expect("a family member");
        Graph::of(&ResNetConfig { stem, ..ResNetConfig::new(arch, 1000) })
    }

    #[test]
    fn units_name_exactly_the_store_tensors_in_its_order() {
        for arch in ["resnet18", "resnet50"] {
            for stem in [Stem::ImageNet, Stem::Cifar] {
                let g = graph(arch, stem);
                let model = ResNet::new(ResNetConfig { stem, ..ResNetConfig::new(arch.parse().unwrap(), 1000) }, 0);
                let convs: Vec<String> = model
                    .store
                    .params
                    .iter()
                    .filter(|p| p.value.shape().len() == 4)
                    .map(|p| p.name.trim_end_matches(".weight").to_string())
                    .collect();
                let ours: Vec<String> = g.module_order().iter().map(|&u| g.units[u].conv.clone()).collect();
                assert_eq!(convs, ours, "{arch} {stem}");
            }
        }
    }

    #[test]
    fn torchvision_wiring() {
        let g = graph("resnet50", Stem::ImageNet);
        assert_eq!(g.units.len(), 53, "49 convolutions + 4 projections");
        assert_eq!(g.features, 2048);
        let b = &g.blocks[3]; // layer2.0: projection first, stride on the 3x3 (torchvision's ResNet v1.5)
        assert_eq!(b.name, "layer2.0");
        let ds = &g.units[b.downsample.unwrap()];
        assert_eq!((ds.conv.as_str(), ds.kernel, ds.stride, ds.src), ("layer2.0.downsample.0", 1, 2, Src::Unit(10)));
        let strides: Vec<usize> = b.main.iter().map(|&u| g.units[u].stride).collect();
        assert_eq!(strides, [1, 2, 1]);
        assert_eq!(g.units[b.output()].post, Post::AddRelu(Src::Unit(b.downsample.unwrap())));
        let s = g.shapes(224, 224);
        assert_eq!(s.pool, Some([64, 56, 56]));
        assert_eq!(
            (0..4).map(|i| s.units[g.stage_output(i)]).collect::<Vec<_>>(),
            [[256, 56, 56], [512, 28, 28], [1024, 14, 14], [2048, 7, 7]]
        );
        let r18 = graph("resnet18", Stem::Cifar);
        assert_eq!(r18.blocks[0].downsample, None, "layer1 of a Basic network keeps its width and size");
        assert_eq!(r18.units[2].post, Post::AddRelu(Src::Unit(0)), "the stem output is the first shortcut");
        assert_eq!(r18.shapes(32, 32).units[r18.output()], [512, 4, 4]);
    }
}
