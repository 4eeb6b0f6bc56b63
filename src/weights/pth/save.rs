//! Write a state_dict in `torch.save`'s zip format, so that `torch.load(path, weights_only=True)` opens it and
//! torchvision's `load_state_dict(strict=True)` takes it: the inverse of `pth::load_pth`.
//!
//! What torch.save (torch >= 1.6, `_use_new_zipfile_serialization`) writes and torch.load's reader needs: one
//! top-level folder (`archive/`), `data.pkl` first (the reader names the archive after the first entry), one
//! `data/<key>` entry of raw little-endian bytes per storage, `version` ("3") and `byteorder` ("little"), every
//! entry stored uncompressed at a 64-byte boundary (torch mmaps storages at that alignment). The pickle
//! (protocol 2) is an `OrderedDict` of `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
//! requires_grad, hooks)` calls whose storages are persistent ids `('storage', torch.FloatStorage, key, 'cpu',
//! numel)`: only the globals `weights_only=True` allows (`collections.OrderedDict`, `torch._utils.
//! _rebuild_tensor_v2`, `torch.FloatStorage`, `torch.LongStorage`).

use std::collections::BTreeMap;
use std::io::{Cursor, Write};
use std::path::Path;

use zip::ZipWriter;
use zip::write::SimpleFileOptions;

use super::pickle::{
    BININT, BINPERSID, BINUNICODE, EMPTY_TUPLE, GLOBAL, MARK, NEWFALSE, PROTO, REDUCE, SETITEMS, STOP, TUPLE,
};
use crate::engine::Tensor;
use crate::error::{Error, Result};

/// Save `tensors` (f32) and `counts` (i64 scalars: BN's `num_batches_tracked`) as a torch.save zip at `path`,
/// atomically.
pub fn save(path: &Path, tensors: &BTreeMap<String, Tensor>, counts: &BTreeMap<String, i64>) -> Result<()> {
    let bytes = encode(tensors, counts).map_err(|e| e.in_file(path))?;
    crate::files::write_atomic(path, &bytes)
}

/// One tensor's storage: f32 values or an i64 scalar.
enum Storage<'a> {
    F32(&'a Tensor),
    I64(i64),
}

/// The archive's bytes. Keys come out in sorted order, as BTreeMaps give them; torch's state_dicts are in module
/// order, which `load_state_dict` does not depend on.
pub fn encode(tensors: &BTreeMap<String, Tensor>, counts: &BTreeMap<String, i64>) -> Result<Vec<u8>> {
    let mut entries: Vec<(&str, Storage)> = tensors.iter().map(|(k, t)| (k.as_str(), Storage::F32(t))).collect();
    entries.extend(counts.iter().map(|(k, &n)| (k.as_str(), Storage::I64(n))));
    entries.sort_by(|a, b| a.0.cmp(b.0));

    let mut pickle = Pickler::default();
    pickle.header();
    for (key, (name, storage)) in entries.iter().enumerate() {
        pickle.tensor(name, &key.to_string(), storage)?;
    }
    pickle.footer();

    let zip_err = |e: zip::result::ZipError| Error::invalid(format!("cannot write the archive: {e}"));
    let io_err = |e: std::io::Error| Error::invalid(format!("cannot write the archive: {e}"));
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).with_alignment(64);
    let mut put = |name: String, data: &[u8]| -> Result<()> {
        // Entries over 4 GiB need zip64 (a ResNet-152 is 240 MB; the flag costs 20 bytes per entry).
        zip.start_file(name, options.large_file(data.len() as u64 >= u32::MAX as u64)).map_err(zip_err)?;
        zip.write_all(data).map_err(io_err)
    };
    put("archive/data.pkl".into(), &pickle.out)?;
    put("archive/byteorder".into(), b"little")?;
    for (key, (_, storage)) in entries.iter().enumerate() {
        let bytes: Vec<u8> = match storage {
            Storage::F32(t) => t.data().iter().flat_map(|v| v.to_le_bytes()).collect(),
            Storage::I64(n) => n.to_le_bytes().to_vec(),
        };
        put(format!("archive/data/{key}"), &bytes)?;
    }
    put("archive/version".into(), b"3\n")?;
    Ok(zip.finish().map_err(zip_err)?.into_inner())
}

/// The few pickle opcodes (protocol 2) a state_dict needs.
#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
}

impl Pickler {
    /// `OrderedDict()` and the MARK its items are set after.
    fn header(&mut self) {
        self.out.extend([PROTO, 2]);
        self.ordered_dict();
        self.out.push(MARK);
    }

    fn footer(&mut self) {
        self.out.extend([SETITEMS, STOP]);
    }

    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.extend([EMPTY_TUPLE, REDUCE]);
    }

    fn global(&mut self, module: &str, name: &str) {
        self.out.push(GLOBAL);
        self.out.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn string(&mut self, s: &str) {
        self.out.push(BINUNICODE);
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, n: usize) -> Result<()> {
        let n = i32::try_from(n).map_err(|_| Error::invalid(format!("{n} is too large for a pickled int32")))?;
        self.out.push(BININT);
        self.out.extend(n.to_le_bytes());
        Ok(())
    }

    fn ints(&mut self, values: &[usize]) -> Result<()> {
        self.out.push(MARK);
        for &v in values {
            self.int(v)?;
        }
        self.out.push(TUPLE);
        Ok(())
    }

    /// `name: _rebuild_tensor_v2(storage(key), 0, size, contiguous stride, False, OrderedDict())`.
    fn tensor(&mut self, name: &str, key: &str, storage: &Storage) -> Result<()> {
        let (class, size): (&str, &[usize]) = match storage {
            Storage::F32(t) => ("FloatStorage", t.shape()),
            Storage::I64(_) => ("LongStorage", &[]),
        };
        let numel: usize = size.iter().product();
        let mut stride = vec![1usize; size.len()];
        for d in (0..size.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * size[d + 1];
        }
        self.string(name);
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(MARK);
        // the persistent id of the storage
        self.out.push(MARK);
        self.string("storage");
        self.global("torch", class);
        self.string(key);
        self.string("cpu");
        self.int(numel)?;
        self.out.extend([TUPLE, BINPERSID]);
        self.int(0)?;
        self.ints(size)?;
        self.ints(&stride)?;
        self.out.push(NEWFALSE);
        self.ordered_dict();
        self.out.extend([TUPLE, REDUCE]);
        Ok(())
    }
}
