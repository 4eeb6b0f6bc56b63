//! The residual block, H(x) = relu(F(x) + shortcut(x)), for both block kinds.
//!
//! F is a chain of conv+BN units with a ReLU between consecutive units: two 3x3 units for BasicBlock; 1x1, 3x3
//! (with the stride), 1x1 for Bottleneck. The shortcut is the identity, or a strided 1x1 conv + BN
//! (`downsample`) whenever the stride or the channel count changes.

use std::sync::Arc;

use super::family::BlockKind;
use super::layers::{ConvBn, Mode, Relu};
use super::store::{Path, Store};
use crate::engine::{Backend, Tensor};

pub struct Block {
    units: Vec<ConvBn>,
    /// One ReLU after every unit but the last.
    relus: Vec<Relu>,
    downsample: Option<ConvBn>,
    /// Record: the block's output, whose sign masks the final ReLU's gradient (shared with the next block's
    /// convolutions, which record it as their input).
    output: Option<Arc<Tensor>>,
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

    pub fn forward(&mut self, be: &dyn Backend, s: &mut Store, x: Arc<Tensor>, mode: Mode) -> Arc<Tensor> {
        match mode {
            Mode::Train => self.forward_train(be, s, &x),
            Mode::Eval => Arc::new(self.forward_eval(be, s, &x)),
        }
    }

    fn forward_train(&mut self, be: &dyn Backend, s: &mut Store, x: &Arc<Tensor>) -> Arc<Tensor> {
        let projected = self.downsample.as_mut().map(|ds| ds.forward_train(be, s, x));
        let mut h = self.units[0].forward_train(be, s, x);
        for (unit, relu) in self.units[1..].iter_mut().zip(&mut self.relus) {
            let a = relu.forward_train(be, h);
            h = unit.forward_train(be, s, &a);
        }
        let out = Arc::new(be.add_relu(h, projected.as_ref().unwrap_or(x)));
        self.output = Some(Arc::clone(&out));
        out
    }

    fn forward_eval(&self, be: &dyn Backend, s: &Store, x: &Tensor) -> Tensor {
        let projected = self.downsample.as_ref().map(|ds| ds.forward_eval(be, s, x, None, false));
        let shortcut = projected.as_ref().unwrap_or(x);
        let (last, inner) = self.units.split_last().expect("a block has at least two units");
        let mut h: Option<Tensor> = None;
        for unit in inner {
            h = Some(unit.forward_eval(be, s, h.as_ref().unwrap_or(x), None, true));
        }
        last.forward_eval(be, s, h.as_ref().unwrap_or(x), Some(shortcut), true)
    }

    /// Gradient with respect to the block input.
    pub fn backward(&mut self, be: &dyn Backend, s: &mut Store, dy: Tensor) -> Tensor {
        let out = self.output.take().expect("backward called without a training-mode forward");
        let d = be.relu_backward(dy, &out);
        // The next block's backward has run, so this was the output's last holder: free it before the units'
        // backward allocates.
        drop(out);
        let last = self.units.len() - 1;
        let mut g = self.units[last].backward(be, s, &d, true).expect("dx was requested");
        for i in (0..last).rev() {
            g = self.relus[i].backward(be, g);
            g = self.units[i].backward(be, s, &g, true).expect("dx was requested");
        }
        let d_shortcut = match &mut self.downsample {
            Some(ds) => ds.backward(be, s, &d, true).expect("dx was requested"),
            None => d,
        };
        be.add(g, &d_shortcut)
    }
}
