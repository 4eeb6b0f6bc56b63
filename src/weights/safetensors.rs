//! Reading and writing `.safetensors` files (the format of our checkpoints and a common way to ship weights).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ::safetensors::tensor::{Dtype, SafeTensors, View};

use super::write_atomic;
use crate::engine::Tensor;
use crate::error::{Error, Result};

pub struct Loaded {
    /// Every tensor, converted to f32 (integer tensors such as `num_batches_tracked` included).
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

pub fn load(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    load_bytes(&bytes, path)
}

pub fn load_bytes(bytes: &[u8], name: &Path) -> Result<Loaded> {
    // `deserialize` checks the header length, the JSON, and that every tensor's byte range lies inside the
    // buffer and matches its shape and dtype, so nothing below allocates from unchecked sizes.
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::file(name, format!("not a valid safetensors file: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (key, view) in st.tensors() {
        let data = to_f32(view.dtype(), view.data())
            .ok_or_else(|| Error::file(name, format!("tensor '{key}' has unsupported dtype {:?}", view.dtype())))?;
        let t = Tensor::new(view.shape(), data).map_err(|e| Error::file(name, format!("tensor '{key}': {e}")))?;
        tensors.insert(key, t);
    }
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| Error::file(name, e))?;
    let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    Ok(Loaded { tensors, metadata })
}

fn to_f32(dtype: Dtype, b: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect(),
        Dtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect(),
        _ => return None,
    })
}

/// One tensor to write: f32 data, or an i64 scalar (torchvision's `num_batches_tracked`).
enum Entry<'a> {
    F32(&'a Tensor),
    I64([u8; 8]),
}

impl View for &Entry<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            Entry::F32(_) => Dtype::F32,
            Entry::I64(_) => Dtype::I64,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            Entry::F32(t) => t.shape(),
            Entry::I64(_) => &[],
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Entry::F32(t) => Cow::Owned(t.data().iter().flat_map(|v| v.to_le_bytes()).collect()),
            Entry::I64(b) => Cow::Borrowed(b),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            Entry::F32(t) => t.numel() * 4,
            Entry::I64(_) => 8,
        }
    }
}

/// Write f32 tensors and i64 scalars to `path` atomically (temporary file, then rename).
pub fn save(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    int_scalars: &BTreeMap<String, i64>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let entries: Vec<(String, Entry)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), Entry::F32(t)))
        .chain(int_scalars.iter().map(|(k, v)| (k.clone(), Entry::I64(v.to_le_bytes()))))
        .collect();
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    let bytes = ::safetensors::serialize(entries.iter().map(|(k, e)| (k.as_str(), e)), Some(meta))
        .map_err(|e| Error::file(path, format!("cannot serialise: {e}")))?;
    write_atomic(path, &bytes)
}
