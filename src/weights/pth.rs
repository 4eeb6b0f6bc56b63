//! Import PyTorch `.pth` state_dicts (the zip format `torch.save` has written since torch 1.6) without Python and
//! without running anything the file says: the pickle is read by our own restricted unpickler (`pickle.rs`).
//! `save.rs` writes them.
//!
//! Archive layout: `<prefix>/data.pkl` (the pickled object), `<prefix>/data/<key>` (raw little-endian storage
//! bytes, one entry per storage), `<prefix>/byteorder` (optional), `<prefix>/version`. The prefix is whatever
//! archive name the writer chose, so data.pkl is found by its suffix.

mod pickle;
mod save;

pub use save::{encode, save};

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::Path;

use zip::ZipArchive;

use crate::engine::Tensor;
use crate::engine::tensor::checked_numel;
use crate::error::{Error, Result};
use pickle::{DType, Pickle, TensorRef, Value};

/// Read a state_dict saved by `torch.save` (zip format) and return every tensor as f32, keyed by name.
pub fn load_pth(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    load_pth_bytes(&bytes, path)
}

/// Same from bytes already in memory; `name` is used only in error messages.
pub fn load_pth_bytes(bytes: &[u8], name: &Path) -> Result<BTreeMap<String, Tensor>> {
    load(bytes).map_err(|e| e.in_file(name))
}

type Archive<'a> = ZipArchive<Cursor<&'a [u8]>>;

fn load(bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let mut zip = ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        // pickle protocol 2 starts with 0x80 0x02: torch.save's pre-1.6 format, which has no zip container
        if bytes.starts_with(&[0x80, 0x02]) {
            Error::invalid("legacy (pre-1.6) torch.save format; re-save it with torch >= 1.6")
        } else {
            Error::invalid(format!("not a torch.save zip archive: {e}"))
        }
    })?;
    let prefix = find_prefix(&zip)?;
    let entry = |name: &str| [prefix.as_slice(), name.as_bytes()].concat();

    // One inflation budget for the whole archive: each entry read spends from it.
    let mut budget = (bytes.len() as u64).saturating_mul(MAX_EXPANSION).max(1 << 20);
    if let Some(order) = read_entry(&mut zip, &entry("byteorder"), &mut budget)?
        && order.trim_ascii() != b"little"
    {
        return Err(Error::invalid("big-endian storages are not supported (byteorder is not \"little\")"));
    }
    let pkl = read_entry(&mut zip, &entry("data.pkl"), &mut budget)?
        .ok_or_else(|| Error::invalid("data.pkl is unreadable"))?;
    let pickle = pickle::parse(&pkl)?;
    let tensors = state_dict(&pickle)?;

    // Read each storage once (views share them), then check that the tensors' total size stays in proportion
    // to the bytes actually read before allocating any output.
    let mut storages: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for t in tensors.values() {
        let key = &*t.storage.key;
        if !storages.contains_key(key) {
            let name = entry(&format!("data/{key}"));
            let data = read_entry(&mut zip, &name, &mut budget)?
                .ok_or_else(|| Error::invalid(format!("storage data/{key} is missing from the archive")))?;
            storages.insert(key, data);
        }
    }
    let total_elements = tensors.values().try_fold(0usize, |acc, t| acc.checked_add(checked_numel(&t.size).ok()?));
    let storage_bytes: usize = storages.values().map(Vec::len).sum();
    // Real files need at most one element per storage byte, twice over for tied weights; the slack admits small
    // broadcast (stride-0) tensors. This stops a few pickle bytes from asking for terabytes through aliased or
    // stride-0 views of one small storage.
    let allowed = storage_bytes.saturating_mul(2).saturating_add(1 << 16);
    if total_elements.is_none_or(|n| n > allowed) {
        return Err(Error::invalid(format!(
            "tensor views add up to more elements than the {storage_bytes} storage bytes can hold"
        )));
    }

    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        let data = storages.get(&*t.storage.key).map_or(&[][..], Vec::as_slice);
        let tensor = materialize(t, data).map_err(|e| Error::invalid(format!("tensor {name:?}: {e}")))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

/// The `<prefix>/` before `data.pkl`: torch writes exactly one top-level directory, named after the file.
fn find_prefix(zip: &Archive) -> Result<Vec<u8>> {
    let mut found = zip.file_names_raw().filter(|n| {
        n.strip_suffix(b"data.pkl")
            .is_some_and(|dir| dir.is_empty() || dir.iter().position(|&b| b == b'/') == Some(dir.len() - 1))
    });
    match (found.next(), found.next()) {
        (Some(name), None) => Ok(name[..name.len() - b"data.pkl".len()].to_vec()),
        (None, _) => Err(Error::invalid("no data.pkl in the archive; not a file written by torch.save")),
        (Some(_), Some(_)) => Err(Error::invalid("several data.pkl in the archive")),
    }
}

/// How much larger than the whole archive one entry may be once decompressed. torch.save stores entries
/// uncompressed, and float data barely deflates, so real files stay far below this; a zip bomb does not.
const MAX_EXPANSION: u64 = 32;

/// An entry's bytes, `None` if absent. The declared uncompressed size is checked against the archive's size
/// before anything is read, the zip reader stops at that size and checks the CRC, and the buffer grows with the
/// data actually read.
fn read_entry(zip: &mut Archive, name: &[u8], budget: &mut u64) -> Result<Option<Vec<u8>>> {
    let shown = String::from_utf8_lossy(name);
    // (not `by_name_raw`: that one returns the entry's compressed bytes)
    let Some(index) = zip.index_for_name_raw(name) else { return Ok(None) };
    let file = zip.by_index(index).map_err(|e| Error::invalid(format!("{shown}: {e}")))?;
    let too_big = |size: u64| {
        Error::invalid(format!(
            "{shown} claims {size} bytes uncompressed, more than {MAX_EXPANSION} times the archive with the entries \
             read before it; refusing it (zip bomb?)"
        ))
    };
    if file.size() > *budget {
        return Err(too_big(file.size()));
    }
    let mut data = Vec::new();
    // (the zip reader already stops at the declared size; the budget is the second line)
    file.take(*budget).read_to_end(&mut data).map_err(|e| Error::invalid(format!("{shown}: {e}")))?;
    *budget -= data.len() as u64;
    Ok(Some(data))
}

/// The tensors of the state_dict, keyed by their final names. The top-level object is the state_dict itself or a
/// checkpoint dict holding it under "state_dict" or "model"; other entries (epoch, optimizer, ...) are ignored,
/// as are non-tensor values inside the state_dict. DataParallel's "module." prefix is stripped.
fn state_dict(p: &Pickle) -> Result<BTreeMap<String, &TensorRef>> {
    let top = p.dict(&p.root).ok_or_else(|| Error::invalid("the pickled object is not a dict (not a state_dict)"))?;
    let wrapped = |key: &str| {
        let (_, v) = top.iter().rev().find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))?;
        p.dict(v)
    };
    let sd = wrapped("state_dict").or_else(|| wrapped("model")).unwrap_or(top);

    // Python semantics first: a repeated key keeps its last value, which may not be a tensor. A key fetched from
    // the memo N times is one Rc: collapse those by pointer (O(1) each) before comparing contents, so that string
    // comparisons only run over distinct key objects, whose total length the pickle's size bounds.
    let mut last_by_rc: std::collections::HashMap<*const u8, (usize, &str, Option<&TensorRef>)> =
        std::collections::HashMap::new();
    for (i, (k, v)) in sd.iter().enumerate() {
        if let Value::Str(k) = k {
            last_by_rc.insert(k.as_ptr(), (i, k, p.tensor(v)));
        }
    }
    let mut latest: BTreeMap<&str, (usize, Option<&TensorRef>)> = BTreeMap::new();
    for (i, k, t) in last_by_rc.into_values() {
        let slot = latest.entry(k).or_insert((i, t));
        if slot.0 < i {
            *slot = (i, t);
        }
    }
    let mut out = BTreeMap::new();
    for (key, (_, t)) in latest {
        let Some(t) = t else { continue };
        let name = key.strip_prefix("module.").unwrap_or(key);
        if out.insert(name.to_string(), t).is_some() {
            return Err(Error::invalid(format!("key {name:?} appears both with and without \"module.\"")));
        }
    }
    if out.is_empty() {
        return Err(Error::invalid("no tensors found (expected a state_dict)"));
    }
    Ok(out)
}

/// Copy a (possibly strided) view out of its storage bytes as dense row-major f32.
fn materialize(t: &TensorRef, data: &[u8]) -> Result<Tensor> {
    let dtype = t.storage.dtype;
    let es = dtype.size();
    // The pickle checked the view against the declared storage size; check that against the actual bytes.
    let declared = t.storage.numel.checked_mul(es);
    if declared.is_none_or(|n| n > data.len()) {
        return Err(Error::invalid(format!(
            "storage data/{} holds {} bytes, its header declares {} elements of {es} bytes",
            t.storage.key,
            data.len(),
            t.storage.numel
        )));
    }
    let numel = checked_numel(&t.size)?;
    let mut values = Vec::with_capacity(numel);
    if numel > 0 {
        // Walk the index like an odometer, keeping `pos` = offset + sum(index_i * stride_i). It only ever moves
        // between positions inside the view, which were bounds-checked, so it cannot overflow.
        let mut index = vec![0usize; t.size.len()];
        let mut pos = t.offset;
        'elements: loop {
            let bytes = pos.checked_mul(es).and_then(|b| data.get(b..b.checked_add(es)?));
            values.push(decode(dtype, bytes.ok_or_else(|| Error::invalid("tensor view reaches past its storage"))?));
            let mut d = t.size.len();
            loop {
                if d == 0 {
                    break 'elements;
                }
                d -= 1;
                if index[d] + 1 < t.size[d] {
                    index[d] += 1;
                    pos += t.stride[d];
                    break;
                }
                pos -= t.stride[d] * index[d];
                index[d] = 0;
            }
        }
    }
    Tensor::new(&t.size, values)
}

/// One little-endian element as f32 (`bytes` has exactly the dtype's size), rounding like torch's `.float()`.
fn decode(dtype: DType, b: &[u8]) -> f32 {
    let arr = |n: usize| -> [u8; 8] {
        let mut a = [0; 8];
        a[..n].copy_from_slice(&b[..n]);
        a
    };
    match dtype {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::F16 => f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        DType::BF16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
        DType::F64 => f64::from_le_bytes(arr(8)) as f32,
        DType::I64 => i64::from_le_bytes(arr(8)) as f32,
        DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
        DType::I16 => i16::from_le_bytes([b[0], b[1]]) as f32,
        DType::I8 => b[0] as i8 as f32,
        DType::U8 => b[0] as f32,
        DType::Bool => (b[0] != 0) as u8 as f32,
    }
}

/// IEEE half to single; exact for every input (f32 has more range and precision).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let magnitude = match exp {
        // zero and subnormals: man * 2^-24, exact in f32
        0 => (man as f32 * (1.0 / 16_777_216.0)).to_bits(),
        // infinities and NaNs, payload kept
        0x1f => 0x7f80_0000 | (man << 13),
        // normal: rebias the exponent from 15 to 127
        _ => ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(sign | magnitude)
}
