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
    /// The file carried our checksum and it matched (files from other tools carry none).
    pub checksum_verified: bool,
}

/// Metadata key of the CRC-32 that `save` writes and `load` verifies.
pub const CHECKSUM_KEY: &str = "resnet_rs.crc32";

/// CRC-32 over every tensor's name, dtype, shape and bytes, in name order. The parser already catches
/// truncation and inconsistent headers; this catches what stays well-formed: a flipped bit in the data, a
/// tensor overwritten by another of the same size.
fn checksum<'a>(entries: impl Iterator<Item = (&'a str, Dtype, &'a [usize], Data<'a>)>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (name, dtype, shape, data) in entries {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(dtype.to_string().as_bytes());
        h.update(&(shape.len() as u64).to_le_bytes());
        for &d in shape {
            h.update(&(d as u64).to_le_bytes());
        }
        match data {
            Data::Bytes(b) => h.update(b),
            Data::F32(values) => {
                // Little-endian bytes, a chunk at a time: no copy of a whole (possibly 100 MB) tensor.
                let mut buf = [0u8; 4096];
                for chunk in values.chunks(1024) {
                    for (dst, v) in buf.chunks_exact_mut(4).zip(chunk) {
                        dst.copy_from_slice(&v.to_le_bytes());
                    }
                    h.update(&buf[..chunk.len() * 4]);
                }
            }
        }
    }
    h.finalize()
}

/// A tensor's data as `checksum` reads it: the file's bytes, or f32 values about to be written.
enum Data<'a> {
    Bytes(&'a [u8]),
    F32(&'a [f32]),
}

pub fn load(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    load_bytes(&bytes, path)
}

pub fn load_bytes(bytes: &[u8], name: &Path) -> Result<Loaded> {
    // `deserialize` checks the header length, the JSON, and that every tensor's byte range lies inside the
    // buffer and matches its shape and dtype, so nothing below allocates from unchecked sizes.
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| Error::file(name, format!("not a valid safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| Error::file(name, e))?;
    let metadata: BTreeMap<String, String> = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    let mut views = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let checksum_verified = match metadata.get(CHECKSUM_KEY) {
        None => false,
        Some(stored) => {
            let computed =
                checksum(views.iter().map(|(k, v)| (k.as_str(), v.dtype(), v.shape(), Data::Bytes(v.data()))));
            if stored.parse::<u32>().ok() != Some(computed) {
                return Err(Error::file(
                    name,
                    format!("checksum mismatch (stored {stored}, computed {computed}): the file is corrupt"),
                ));
            }
            true
        }
    };
    let mut tensors = BTreeMap::new();
    for (key, view) in views {
        let data = to_f32(view.dtype(), view.data())
            .ok_or_else(|| Error::file(name, format!("tensor '{key}' has unsupported dtype {:?}", view.dtype())))?;
        let t = Tensor::new(view.shape(), data).map_err(|e| Error::file(name, format!("tensor '{key}': {e}")))?;
        tensors.insert(key, t);
    }
    Ok(Loaded { tensors, metadata, checksum_verified })
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

impl Entry<'_> {
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
    /// What `checksum` reads; `View::data` below is the same as bytes for the writer.
    fn payload(&self) -> Data<'_> {
        match self {
            Entry::F32(t) => Data::F32(t.data()),
            Entry::I64(b) => Data::Bytes(b),
        }
    }
}

impl View for &Entry<'_> {
    fn dtype(&self) -> Dtype {
        Entry::dtype(self)
    }
    fn shape(&self) -> &[usize] {
        Entry::shape(self)
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Entry::F32(t) => {
                let mut out = Vec::with_capacity(t.numel() * 4);
                for v in t.data() {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Cow::Owned(out)
            }
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

/// Write f32 tensors and i64 scalars to `path` atomically (temporary file, then rename), with a checksum
/// in the metadata (`CHECKSUM_KEY`) that `load` verifies.
pub fn save(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    int_scalars: &BTreeMap<String, i64>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut entries: Vec<(String, Entry)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), Entry::F32(t)))
        .chain(int_scalars.iter().map(|(k, v)| (k.clone(), Entry::I64(v.to_le_bytes()))))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let crc = checksum(entries.iter().map(|(k, e)| (k.as_str(), e.dtype(), e.shape(), e.payload())));
    let mut meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    meta.insert(CHECKSUM_KEY.to_string(), crc.to_string());
    let bytes = ::safetensors::serialize(entries.iter().map(|(k, e)| (k.as_str(), e)), Some(meta))
        .map_err(|e| Error::file(path, format!("cannot serialise: {e}")))?;
    write_atomic(path, &bytes)
}
