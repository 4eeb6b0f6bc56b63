//! IDX datasets (LeCun's format: MNIST, Fashion-MNIST, KMNIST, EMNIST): `*-images-idx3-ubyte` (u8 images
//! `[n, rows, cols]`) and `*-labels-idx1-ubyte` (u8 labels `[n]`), raw or `.gz`, big-endian sizes after a
//! magic of two zero bytes, the type (0x08, unsigned byte) and the rank. A folder holds one train pair
//! (`train-…`) and one test pair (`t10k-…` or `test-…`); images are 1-band grey, as stored (EMNIST's, which
//! are stored transposed, stay as torchvision leaves them).
//!
//! Class names: `classes.txt` in the folder (one per line) when there is one; Fashion-MNIST's own
//! (torchvision's `FashionMNIST.classes`) when the label files hold its labels (MD5 of the decompressed
//! files, which does not depend on how they were compressed); "0", "1", … otherwise (MNIST's digits).

use std::io::Read;
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};

use super::Dataset;
use crate::error::{Error, Result};
use crate::fetch::hex;
use crate::imaging::{Image, MAX_PIXELS, Samples};

/// Most samples a file may claim (EMNIST ByClass has 814,255): more is refused before allocating.
const MAX_SAMPLES: u64 = 1 << 24;

const FASHION: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
/// MD5 of the decompressed label files (train, test) and the names of their classes.
const KNOWN_LABELS: [([&str; 2], &[&str; 10]); 1] =
    [(["9018921c3c673c538a1fc5bad174d6f9", "15d484375f8d13e6eb1aabb0c3f46965"], &FASHION)];

pub struct Idx {
    rows: u32,
    cols: u32,
    pixels: Vec<u8>,
    labels: Vec<u8>,
    classes: Vec<String>,
    source: PathBuf,
}

impl Idx {
    /// The train and test splits in `dir`.
    pub fn open(dir: &Path) -> Result<(Idx, Idx)> {
        let files = find(dir)?;
        let (train_labels, test_labels) = (read_file(&files[1])?, read_file(&files[3])?);
        let mut train = Idx::parse(&read_file(&files[0])?, &train_labels, &files[0], &files[1])?;
        let mut test = Idx::parse(&read_file(&files[2])?, &test_labels, &files[2], &files[3])?;
        if (train.rows, train.cols) != (test.rows, test.cols) {
            return Err(Error::file(
                &files[2],
                format!("images are {}x{}, the training images {}x{}", test.cols, test.rows, train.cols, train.rows),
            ));
        }
        let count = 1 + usize::from(train.labels.iter().chain(&test.labels).copied().max().unwrap_or(0));
        let digests = [hex(&Md5::digest(&train_labels)), hex(&Md5::digest(&test_labels))];
        let classes: Vec<String> = match std::fs::read_to_string(dir.join("classes.txt")) {
            Ok(text) => text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect(),
            Err(_) => match KNOWN_LABELS.iter().find(|(md5, _)| *md5 == digests) {
                Some((_, names)) => names.iter().map(|s| s.to_string()).collect(),
                None => (0..count).map(|c| c.to_string()).collect(),
            },
        };
        if classes.len() < count {
            return Err(Error::file(
                dir.join("classes.txt"),
                format!("names {} classes but the labels go up to {}", classes.len(), count - 1),
            ));
        }
        train.classes = classes.clone();
        test.classes = classes;
        Ok((train, test))
    }

    /// One split from the bytes of its image and label files (decompressed).
    pub fn parse(images: &[u8], labels: &[u8], image_path: &Path, label_path: &Path) -> Result<Idx> {
        let image_dims = header(images, 3, image_path)?;
        let label_dims = header(labels, 1, label_path)?;
        let [n, rows, cols] = [image_dims[0], image_dims[1], image_dims[2]];
        if n != label_dims[0] {
            return Err(Error::file(label_path, format!("holds {} labels for {n} images", label_dims[0])));
        }
        if n > MAX_SAMPLES || rows == 0 || cols == 0 || rows * cols > MAX_PIXELS {
            return Err(Error::file(image_path, format!("claims {n} images of {cols}x{rows}: out of range")));
        }
        let pixels = &images[16..];
        let want = n * rows * cols;
        if pixels.len() as u64 != want {
            return Err(Error::file(image_path, format!("has {} pixel bytes, its header claims {want}", pixels.len())));
        }
        if labels.len() as u64 - 8 != n {
            return Err(Error::file(
                label_path,
                format!("has {} label bytes, its header claims {n}", labels.len() - 8),
            ));
        }
        Ok(Idx {
            rows: rows as u32,
            cols: cols as u32,
            pixels: pixels.to_vec(),
            labels: labels[8..].to_vec(),
            classes: Vec::new(),
            source: image_path.to_path_buf(),
        })
    }
}

/// The dimensions after an IDX magic of unsigned bytes and the given rank.
fn header(bytes: &[u8], rank: usize, path: &Path) -> Result<Vec<u64>> {
    let head = bytes.get(..4 + 4 * rank).ok_or_else(|| Error::file(path, "too short for an IDX header"))?;
    if head[..2] != [0, 0] || head[2] != 0x08 || usize::from(head[3]) != rank {
        return Err(Error::file(
            path,
            format!("not an IDX file of unsigned bytes with {rank} dimension{}", if rank == 1 { "" } else { "s" }),
        ));
    }
    Ok(head[4..].chunks_exact(4).map(|b| u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))).collect())
}

/// The file's bytes, gunzipped when it is gzip (at most 1 GiB inflated).
fn read_file(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .take(1 << 30)
        .read_to_end(&mut out)
        .map_err(|e| Error::file(path, format!("corrupt gzip: {e}")))?;
    Ok(out)
}

/// [train images, train labels, test images, test labels] in `dir`.
fn find(dir: &Path) -> Result<[PathBuf; 4]> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::file(dir, format!("cannot list folder: {e}")))?;
    let mut names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let pick = |split: &[&str], kind: &str| -> Result<PathBuf> {
        let found: Vec<&String> = names
            .iter()
            .filter(|n| {
                let base = n.strip_suffix(".gz").unwrap_or(n);
                base.ends_with(kind) && split.iter().any(|s| base.contains(s))
            })
            .collect();
        match found.as_slice() {
            [one] => Ok(dir.join(one)),
            [] => Err(Error::file(dir, format!("no {}*{kind}[.gz] file (an IDX dataset folder)", split[0]))),
            many => Err(Error::file(dir, format!("several {kind} files for one split: {many:?}"))),
        }
    };
    Ok([
        pick(&["train-"], "-images-idx3-ubyte")?,
        pick(&["train-"], "-labels-idx1-ubyte")?,
        pick(&["t10k-", "test-"], "-images-idx3-ubyte")?,
        pick(&["t10k-", "test-"], "-labels-idx1-ubyte")?,
    ])
}

/// Whether `dir` looks like an IDX dataset folder (a training image file in it).
pub fn is_idx_folder(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".gz").unwrap_or(&name).ends_with("-images-idx3-ubyte") && name.contains("train-")
        })
    })
}

impl Dataset for Idx {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }

    fn source(&self, i: usize) -> String {
        format!("{}#{i}", self.source.display())
    }

    fn get(&self, i: usize) -> Result<(Image, usize)> {
        let side = self.rows as usize * self.cols as usize;
        let (Some(px), Some(&label)) = (self.pixels.get(i * side..(i + 1) * side), self.labels.get(i)) else {
            return Err(Error::file(&self.source, format!("sample {i} is out of range ({} samples)", self.len())));
        };
        Ok((Image::new(self.cols, self.rows, 1, Samples::U8(px.to_vec()))?, usize::from(label)))
    }
}
