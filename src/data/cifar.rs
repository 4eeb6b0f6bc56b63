//! CIFAR-10 and CIFAR-100 from their official binary versions (`cifar-10-binary.tar.gz`,
//! `cifar-100-binary.tar.gz`), held in memory: the whole training split is 50,000 × 3,072 bytes (150 MiB), small
//! enough that reading it once beats re-reading batch files from worker threads.
//!
//! A record is its label byte(s) followed by 3,072 pixel bytes: the 1,024 red values of the 32x32 image in
//! row-major order, then the 1,024 green, then the 1,024 blue. CIFAR-10 has one label byte; CIFAR-100 has two,
//! the coarse (20 superclasses) and then the fine (100 classes) label. We train on the fine label, as
//! torchvision's `CIFAR100` does.

use std::path::{Path, PathBuf};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::imaging::{Image, Samples};

/// Side of a CIFAR image.
pub const SIDE: u32 = 32;
/// Pixel bytes of one record: three 32x32 planes.
pub const PIXELS: usize = 3 * (SIDE as usize) * (SIDE as usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarKind {
    Cifar10,
    Cifar100,
}

impl CifarKind {
    pub fn num_classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100 => 100,
        }
    }

    /// Label bytes in front of each record's pixels (CIFAR-100 stores coarse then fine).
    pub fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            CifarKind::Cifar100 => 2,
        }
    }

    /// Bytes per record: 3,073 for CIFAR-10, 3,074 for CIFAR-100.
    pub fn record_size(self) -> usize {
        self.label_bytes() + PIXELS
    }

    /// The folder the official tarball unpacks to.
    pub fn folder_name(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "cifar-10-batches-bin",
            CifarKind::Cifar100 => "cifar-100-binary",
        }
    }

    /// The batch files of one split, in the order their records are numbered.
    pub fn split_files(self, train: bool) -> &'static [&'static str] {
        match (self, train) {
            (CifarKind::Cifar10, true) => {
                &["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"]
            }
            (CifarKind::Cifar10, false) => &["test_batch.bin"],
            (CifarKind::Cifar100, true) => &["train.bin"],
            (CifarKind::Cifar100, false) => &["test.bin"],
        }
    }

    /// The text file with one class name per line (label order).
    pub fn names_file(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "batches.meta.txt",
            CifarKind::Cifar100 => "fine_label_names.txt",
        }
    }
}

impl std::fmt::Display for CifarKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CifarKind::Cifar10 => "CIFAR-10",
            CifarKind::Cifar100 => "CIFAR-100",
        })
    }
}

/// One split of CIFAR-10 or CIFAR-100, decoded into memory.
pub struct Cifar {
    kind: CifarKind,
    dir: PathBuf,
    /// `PIXELS` bytes per record, planar (R plane, G plane, B plane) as in the files; interleaved on `get`.
    pixels: Vec<u8>,
    labels: Vec<u8>,
    class_names: Vec<String>,
}

impl Cifar {
    /// `dir` is the unpacked folder (`cifar-10-batches-bin` with data_batch_1..5.bin + test_batch.bin +
    /// batches.meta.txt; `cifar-100-binary` with train.bin, test.bin, fine_label_names.txt) or its parent, so
    /// both the folder a user unpacked by hand and the folder `download_and_unpack` unpacked into work.
    pub fn open(dir: &Path, kind: CifarKind, train: bool) -> Result<Cifar> {
        let dir = resolve_dir(dir, kind, train)?;
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for name in kind.split_files(train) {
            let path = dir.join(name);
            let bytes = read_batch_file(&path, kind)?;
            let (p, l) = Cifar::parse_records(&bytes, kind, &path)?;
            pixels.extend_from_slice(&p);
            labels.extend_from_slice(&l);
        }
        let class_names = read_class_names(&dir.join(kind.names_file()), kind)?;
        Ok(Cifar { kind, dir, pixels, labels, class_names })
    }

    /// Parse one binary batch file's bytes (records: 1 label byte + 3072 pixel bytes for CIFAR-10; coarse +
    /// fine label bytes + 3072 for CIFAR-100; pixels are 1024 R, then G, then B, row-major). Length must be a
    /// whole number of records; labels must be < 10 / < 100 (and CIFAR-100's coarse label < 20), since a
    /// label out of range would otherwise surface much later as an index error deep in the loss.
    /// `name` is only used to name the file in errors.
    pub fn parse_records(bytes: &[u8], kind: CifarKind, name: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
        let size = kind.record_size();
        if bytes.is_empty() {
            return Err(Error::file(name, format!("empty {kind} batch file: no records")));
        }
        if !bytes.len().is_multiple_of(size) {
            return Err(Error::file(
                name,
                format!(
                    "{} bytes is not a whole number of {size}-byte {kind} records (truncated or not a {kind} batch file?)",
                    bytes.len()
                ),
            ));
        }
        let n = bytes.len() / size;
        let mut pixels = Vec::with_capacity(n * PIXELS);
        let mut labels = Vec::with_capacity(n);
        for (i, record) in bytes.chunks_exact(size).enumerate() {
            let (head, body) = record.split_at(kind.label_bytes());
            let label = match (kind, head) {
                (CifarKind::Cifar10, [fine]) => *fine,
                (CifarKind::Cifar100, [coarse, fine]) => {
                    if *coarse >= 20 {
                        return Err(Error::file(
                            name,
                            format!("record {i}: coarse label {coarse} out of range (CIFAR-100 has 20 superclasses)"),
                        ));
                    }
                    *fine
                }
                _ => {
                    return Err(Error::file(name, format!("record {i}: malformed label bytes")));
                }
            };
            if usize::from(label) >= kind.num_classes() {
                return Err(Error::file(
                    name,
                    format!("record {i}: label {label} out of range ({kind} has {} classes)", kind.num_classes()),
                ));
            }
            labels.push(label);
            pixels.extend_from_slice(body);
        }
        Ok((pixels, labels))
    }

    pub fn kind(&self) -> CifarKind {
        self.kind
    }

    /// The folder the batch files were read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every record's label, in record order (batch files in order, records in file order).
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// Record `i`'s pixels as stored: the R, G and B planes, 1,024 bytes each, row-major.
    pub fn planar_pixels(&self, i: usize) -> Option<&[u8]> {
        self.pixels.get(i * PIXELS..(i + 1) * PIXELS)
    }
}

impl Dataset for Cifar {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.kind.num_classes()
    }

    fn class_names(&self) -> Vec<String> {
        self.class_names.clone()
    }

    fn get(&self, i: usize) -> Result<(Image, usize)> {
        let (Some(planes), Some(&label)) = (self.planar_pixels(i), self.labels.get(i)) else {
            return Err(Error::invalid(format!("{} sample {i} out of range (it has {})", self.kind, self.len())));
        };
        // The records are planar (R plane, G plane, B plane), as `Image` is.
        Ok((Image::new(SIDE, SIDE, 3, Samples::U8(planes.to_vec()))?, usize::from(label)))
    }
}

/// `dir` itself when it holds the split's first batch file, else its `cifar-10-batches-bin` /
/// `cifar-100-binary` subfolder.
fn resolve_dir(dir: &Path, kind: CifarKind, train: bool) -> Result<PathBuf> {
    let first = kind.split_files(train).first().copied().unwrap_or_default();
    if dir.join(first).is_file() {
        return Ok(dir.to_path_buf());
    }
    let sub = dir.join(kind.folder_name());
    if sub.is_dir() {
        return Ok(sub);
    }
    Err(Error::file(
        dir,
        format!("not a {kind} folder: neither it nor {}/ inside it holds {first}", kind.folder_name()),
    ))
}

/// Read a batch file after checking its size from the metadata, so a wrong or huge file is refused before
/// it is read into memory. The largest official file (CIFAR-100 train.bin) holds 50,000 records.
fn read_batch_file(path: &Path, kind: CifarKind) -> Result<Vec<u8>> {
    const MAX_RECORDS: u64 = 1_000_000;
    let meta = std::fs::metadata(path).map_err(|e| Error::file(path, format!("cannot read {kind} batch file: {e}")))?;
    let size = kind.record_size() as u64;
    if meta.len() > MAX_RECORDS * size {
        return Err(Error::file(
            path,
            format!("{} bytes is more than {MAX_RECORDS} {kind} records: not a {kind} batch file", meta.len()),
        ));
    }
    std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read {kind} batch file: {e}")))
}

/// One class name per non-blank line (the official files end with blank lines), exactly `num_classes` of them.
fn read_class_names(path: &Path, kind: CifarKind) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read {kind} class names: {e}")))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| Error::file(path, "class names are not UTF-8 text"))?;
    let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    if names.len() != kind.num_classes() {
        return Err(Error::file(path, format!("{} class names, {kind} has {}", names.len(), kind.num_classes())));
    }
    Ok(names)
}
