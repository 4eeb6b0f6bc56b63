//! Parameters and buffers of a network, named by their module path so that the names are torchvision's
//! state_dict keys by construction (`layer2.0.downsample.0.weight`), as candle's `VarBuilder::pp` does.

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand_distr::{Distribution, Normal, Uniform};

use crate::engine::Tensor;

pub struct Param {
    pub name: String,
    pub value: Tensor,
    /// Accumulated gradient; `None` until a backward pass reaches this parameter.
    pub grad: Option<Tensor>,
    /// A frozen parameter (false) gets no gradient: its layer skips the weight-gradient computation.
    pub trainable: bool,
}

pub struct Buffer {
    pub name: String,
    pub value: Tensor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamId(usize);

impl ParamId {
    /// The parameter's place in `Store::params`.
    pub fn index(self) -> usize {
        self.0
    }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferId(usize);

/// How a new parameter is filled (torchvision's initialisation).
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// `kaiming_normal_(mode="fan_out", nonlinearity="relu")`: N(0, 2 / (out·kh·kw)).
    KaimingFanOut,
    /// U(−b, b), nn.Linear's default with b = 1/sqrt(in_features).
    Uniform(f32),
    Const(f32),
}

pub struct Store {
    pub params: Vec<Param>,
    pub buffers: Vec<Buffer>,
    /// BatchNorm's `num_batches_tracked`: one count for the whole network, since every BN layer sees every batch.
    pub batches_tracked: i64,
    rng: Xoshiro256PlusPlus,
}

impl Store {
    pub fn new(seed: u64) -> Self {
        Store {
            params: Vec::new(),
            buffers: Vec::new(),
            batches_tracked: 0,
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
        }
    }

    /// A builder that prefixes every name it creates with `prefix`.
    pub fn root(&mut self) -> Path<'_> {
        Path { store: self, prefix: String::new() }
    }

    pub fn value(&self, id: ParamId) -> &Tensor {
        &self.params[id.0].value
    }

    pub fn buffer(&self, id: BufferId) -> &Tensor {
        &self.buffers[id.0].value
    }

    pub fn buffer_mut(&mut self, id: BufferId) -> &mut Tensor {
        &mut self.buffers[id.0].value
    }

    pub fn trainable(&self, id: ParamId) -> bool {
        self.params[id.0].trainable
    }

    /// grad += g, as PyTorch accumulates `.grad` across backward passes.
    pub fn accumulate_grad(&mut self, id: ParamId, g: &[f32]) {
        let p = &mut self.params[id.0];
        match &mut p.grad {
            Some(acc) => acc.data_mut().iter_mut().zip(g).for_each(|(a, g)| *a += g),
            None => {
                p.grad = Some(Tensor::new(p.value.shape(), g.to_vec()).expect("gradient has its parameter's shape"))
            }
        }
    }

    /// `accumulate_grad` for a gradient held as a tensor: the first one is moved in, not copied.
    pub fn accumulate_grad_tensor(&mut self, id: ParamId, g: Tensor) {
        match &self.params[id.0].grad {
            Some(_) => self.accumulate_grad(id, g.data()),
            None => {
                assert_eq!(g.shape(), self.params[id.0].value.shape(), "gradient has its parameter's shape");
                self.params[id.0].grad = Some(g);
            }
        }
    }

    pub fn zero_grad(&mut self) {
        self.params.iter_mut().for_each(|p| p.grad = None);
    }

    fn fill(&mut self, shape: &[usize], init: Init) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match init {
            Init::Const(v) => vec![v; n],
            Init::KaimingFanOut => {
                let fan_out: usize = shape[0] * shape[2..].iter().product::<usize>();
                let normal = Normal::new(0.0f32, (2.0 / fan_out as f32).sqrt()).expect("finite positive std");
                (0..n).map(|_| normal.sample(&mut self.rng)).collect()
            }
            Init::Uniform(b) => {
                let uniform = Uniform::new_inclusive(-b, b).expect("finite bound");
                (0..n).map(|_| uniform.sample(&mut self.rng)).collect()
            }
        };
        Tensor::new(shape, data).expect("init fills the whole shape")
    }
}

/// A position in the module tree: `store.root().pp("layer1").pp("0").param("weight")` names `layer1.0.weight`.
pub struct Path<'a> {
    store: &'a mut Store,
    prefix: String,
}

impl Path<'_> {
    pub fn pp(&mut self, name: impl std::fmt::Display) -> Path<'_> {
        Path { prefix: self.name(&name.to_string()), store: self.store }
    }

    fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() { leaf.to_string() } else { format!("{}.{leaf}", self.prefix) }
    }

    pub fn param(&mut self, leaf: &str, shape: &[usize], init: Init) -> ParamId {
        let value = self.store.fill(shape, init);
        let name = self.name(leaf);
        self.store.params.push(Param { name, value, grad: None, trainable: true });
        ParamId(self.store.params.len() - 1)
    }

    pub fn buffer(&mut self, leaf: &str, shape: &[usize], value: f32) -> BufferId {
        let name = self.name(leaf);
        self.store.buffers.push(Buffer { name, value: Tensor::full(shape, value) });
        BufferId(self.store.buffers.len() - 1)
    }
}
