//! The residual block, H(x) = relu(F(x) + shortcut(x)), for both block kinds.
//!
//! F is a chain of conv+BN units with a ReLU between consecutive units: two 3x3 units for BasicBlock; 1x1, 3x3
//! (with the stride), 1x1 for Bottleneck. The shortcut is the identity, or a strided 1x1 conv + BN
//! (`downsample`) whenever the stride or the channel count changes.

use super::family::BlockKind;
use super::layers::{ConvBn, Mode, Relu};
use super::store::{Path, Store};
use crate::engine::{Backend, Tensor};

pub struct Block {
    units: Vec<ConvBn>,
    /// One ReLU after every unit but the last.
    relus: Vec<Relu>,
    downsample: Option<ConvBn>,
    /// Record: the block's output, whose sign masks the final ReLU's gradient.
    output: Option<Tensor>,
}

impl Block {
    /// A block reading `cin` channels into stage width `width`, with `stride` on its spatial convolution.
    pub fn new(
        p: &mut Path,
        kind: BlockKind,
        cin: usize,
        width: usize,
        stride: usize,
        zero_init_residual: bool,
    ) -> Self {
        let cout = width * kind.expansion();
        // (input channels, output channels, kernel, stride) per unit.
        let specs: Vec<(usize, usize, usize, usize)> = match kind {
            BlockKind::Basic => vec![(cin, width, 3, stride), (width, width, 3, 1)],
            BlockKind::Bottleneck => vec![(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)],
        };
        let last = specs.len() - 1;
        let units = specs
            .iter()
            .enumerate()
            .map(|(i, &(ci, co, k, s))| {
                let zero = zero_init_residual && i == last;
                ConvBn::new(p, &format!("conv{}", i + 1), &format!("bn{}", i + 1), ci, co, k, s, zero)
            })
            .collect();
        let downsample = (stride != 1 || cin != cout)
            .then(|| ConvBn::new(&mut p.pp("downsample"), "0", "1", cin, cout, 1, stride, false));
        Block { units, relus: (0..last).map(|_| Relu::default()).collect(), downsample, output: None }
    }

    pub fn forward(&mut self, be: &dyn Backend, s: &mut Store, x: &Tensor, mode: Mode) -> Tensor {
        let shortcut = match &mut self.downsample {
            Some(ds) => ds.forward(be, s, x, mode),
            None => x.clone(),
        };
        let mut h = self.units[0].forward(be, s, x, mode);
        for (unit, relu) in self.units[1..].iter_mut().zip(&mut self.relus) {
            h = relu.forward(be, h, mode);
            h = unit.forward(be, s, &h, mode);
        }
        let out = be.add_relu(h, &shortcut);
        if mode == Mode::Train {
            self.output = Some(out.clone());
        }
        out
    }

    /// Gradient with respect to the block input.
    pub fn backward(&mut self, be: &dyn Backend, s: &mut Store, dy: Tensor) -> Tensor {
        let out = self.output.take().expect("backward called without a training-mode forward");
        let d = be.relu_backward(dy, &out);
        let mut g = d.clone();
        for i in (0..self.units.len()).rev() {
            g = self.units[i].backward(be, s, &g, true).expect("dx was requested");
            if i > 0 {
                g = self.relus[i - 1].backward(be, g);
            }
        }
        let d_shortcut = match &mut self.downsample {
            Some(ds) => ds.backward(be, s, &d, true).expect("dx was requested"),
            None => d,
        };
        be.add(g, &d_shortcut)
    }
}
