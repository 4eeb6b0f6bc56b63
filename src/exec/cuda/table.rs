//! The model's tensors on the device, as the eval executor and the trainer both hold them: parameters then BN
//! buffers in the store's order (so a tensor's index is the same on the host and the device), uploaded once and
//! copied back for checkpoints; and the index a graph walker checks every tensor it names against.

use std::collections::HashMap;

use crate::engine::Tensor;
use crate::engine::cuda::device::{Buf, Device};
use crate::error::{Error, Result};
use crate::model::store::Store;

/// `(name, value)` of every parameter then every buffer of `store`, in order.
fn entries(store: &Store) -> impl Iterator<Item = (&str, &Tensor)> {
    let params = store.params.iter().map(|p| (p.name.as_str(), &p.value));
    params.chain(store.buffers.iter().map(|b| (b.name.as_str(), &b.value)))
}

/// Device copies of a store's tensors; `names[i]` and `shapes[i]` describe `tensors[i]`.
pub struct TensorTable {
    pub tensors: Vec<Buf<f32>>,
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
}

impl TensorTable {
    pub fn upload(dev: &Device, store: &Store) -> Result<TensorTable> {
        let (mut tensors, mut names, mut shapes) = (Vec::new(), Vec::new(), Vec::new());
        for (name, value) in entries(store) {
            tensors.push(dev.upload(value.data())?);
            names.push(name.to_string());
            shapes.push(value.shape().to_vec());
        }
        Ok(TensorTable { tensors, names, shapes })
    }

    /// Overwrite every tensor of `store` with its device copy, after checking that `store` holds the same names
    /// and shapes in the same order; `owner` ("executor", "trainer") names the table in the error.
    pub fn download(&self, dev: &Device, store: &mut Store, owner: &str) -> Result<()> {
        let params = store.params.iter_mut().map(|p| (&p.name, &mut p.value));
        let slots = params.chain(store.buffers.iter_mut().map(|b| (&b.name, &mut b.value)));
        for ((name, value), i) in slots.zip(0..) {
            if self.names.get(i) != Some(name) || self.shapes[i] != value.shape() {
                return Err(Error::invalid(format!("CUDA: model tensor {name} does not match the {owner}'s")));
            }
            *value = Tensor::new(&self.shapes[i], dev.read(&self.tensors[i], value.numel())?)?;
        }
        Ok(())
    }
}

/// A store's tensors by name, for a graph walker: each tensor it names must exist with the shape it expects,
/// and in the end every tensor must have been named, so the device graph and the CPU model cannot diverge.
pub struct TensorIndex<'a> {
    index: HashMap<&'a str, (usize, &'a [usize])>,
    used: Vec<bool>,
    /// "executor" or "trainer", for the errors.
    owner: &'static str,
}

impl<'a> TensorIndex<'a> {
    pub fn new(store: &'a Store, owner: &'static str) -> Self {
        let index: HashMap<_, _> = entries(store).enumerate().map(|(i, (name, t))| (name, (i, t.shape()))).collect();
        TensorIndex { used: vec![false; index.len()], index, owner }
    }

    /// The table index of tensor `name`, which must have `shape`; marks it used.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<usize> {
        let Some(&(i, s)) = self.index.get(name) else {
            return Err(Error::invalid(format!("CUDA: the model has no tensor {name}")));
        };
        if s != shape {
            return Err(Error::invalid(format!("CUDA: {name} is {s:?}, the {} expects {shape:?}", self.owner)));
        }
        self.used[i] = true;
        Ok(i)
    }

    /// An error naming every tensor `take` was never asked for, in name order.
    pub fn check_all_used(&self) -> Result<()> {
        let mut unused: Vec<&str> = self.index.iter().filter(|(_, (i, _))| !self.used[*i]).map(|(n, _)| *n).collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort_unstable();
        Err(Error::invalid(format!("CUDA: the {} does not know model tensors {unused:?}", self.owner)))
    }
}
