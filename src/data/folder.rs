//! torchvision's `ImageFolder`: `root/<class>/<image>.{jpg,jpeg,png}`.
//!
//! Classes are the sub-folders of `root` sorted by name (byte order, which for UTF-8 names is Python's
//! `sorted`), numbered from 0; the samples of a class are its image files sorted by name, classes in order.
//! Extensions are matched case-insensitively, as torchvision does. Two deliberate differences from
//! torchvision: only the files directly inside a class folder are read (no recursion), and entries whose
//! name starts with a dot (`.ipynb_checkpoints`, macOS `._x.jpg` forks, ...) are skipped, so that they
//! neither become a class nor fail to decode. Images are decoded when the loader asks for them, with
//! `crate::imaging::load_image`, whose errors name the file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Dataset;
use super::split::{stratified_split_indices, subsets};
use crate::error::{Error, Result};
use crate::imaging::{Decode, Image, image_header, load_image_with};

/// Extensions (lower case) of the files a class folder contributes.
pub use crate::imaging::IMAGE_EXTENSIONS;

/// The images under `root/<class>/`, listed when opened and decoded on `get`.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<(PathBuf, usize)>,
    /// How pixels become [0, 1] (`imaging::load_image_with`).
    decode: Decode,
}

impl ImageFolder {
    /// List the classes and files. Fails (naming the folder) when `root` is not a readable directory, has
    /// no class folders, or a class folder holds no image.
    pub fn open(root: &Path) -> Result<ImageFolder> {
        let class_dirs: Vec<(OsString, PathBuf)> =
            sorted_entries(root)?.into_iter().filter(|(_, path)| path.is_dir()).collect();
        if class_dirs.is_empty() {
            return Err(Error::file(root, "no class folders (expected root/<class>/<image>.jpg)"));
        }
        let mut classes = Vec::with_capacity(class_dirs.len());
        let mut samples = Vec::new();
        for (label, (name, dir)) in class_dirs.into_iter().enumerate() {
            let Some(name) = name.to_str() else {
                return Err(Error::file(&dir, "class folder name is not valid UTF-8"));
            };
            let before = samples.len();
            for (file_name, path) in sorted_entries(&dir)? {
                if is_image_name(&file_name) && path.is_file() {
                    samples.push((path, label));
                }
            }
            if samples.len() == before {
                return Err(Error::file(&dir, format!("class folder holds no {} file", IMAGE_EXTENSIONS.join("/"))));
            }
            classes.push(name.to_string());
        }
        Ok(ImageFolder { root: root.to_path_buf(), classes, samples, decode: Decode::default() })
    }

    /// Pixels decoded `how` (a pixel scale, a DICOM window) instead of the defaults.
    pub fn with_decode(mut self, how: Decode) -> ImageFolder {
        self.decode = how;
        self
    }

    /// `root/train` and `root/val` as two ImageFolders with the same classes, or `None` when `root` has
    /// neither sub-folder. Fails when only one exists, when either cannot be opened, when an image header is
    /// bad (`scan`), or when their classes differ.
    #[allow(clippy::type_complexity)]
    pub fn open_train_val(root: &Path, how: Decode) -> Result<Option<(Arc<dyn Dataset>, Arc<dyn Dataset>)>> {
        let (train_dir, val_dir) = (root.join("train"), root.join("val"));
        match (train_dir.is_dir(), val_dir.is_dir()) {
            (false, false) => return Ok(None),
            (true, false) => {
                return Err(Error::file(root, "has a train/ folder but no val/ folder"));
            }
            (false, true) => {
                return Err(Error::file(root, "has a val/ folder but no train/ folder"));
            }
            (true, true) => {}
        }
        let train = ImageFolder::open(&train_dir)?.with_decode(how);
        let val = ImageFolder::open(&val_dir)?.with_decode(how);
        train.scan()?;
        val.scan()?;
        if train.classes != val.classes {
            let only =
                |a: &[String], b: &[String]| -> Vec<String> { a.iter().filter(|c| !b.contains(c)).cloned().collect() };
            let (only_train, only_val) = (only(&train.classes, &val.classes), only(&val.classes, &train.classes));
            return Err(Error::file(
                &val_dir,
                format!("classes differ from train/ (only in train/: {only_train:?}; only in val/: {only_val:?})"),
            ));
        }
        Ok(Some((Arc::new(train), Arc::new(val))))
    }

    /// Seeded (train, val) split, stratified per class (`crate::data::split::stratified_split_indices`):
    /// `floor(n_c * val_fraction + 0.5)` samples of each class c go to val, at least one of a class with two.
    pub fn split(self, val_fraction: f32, seed: u64) -> (Arc<dyn Dataset>, Arc<dyn Dataset>) {
        let labels: Vec<usize> = self.samples.iter().map(|(_, l)| *l).collect();
        let indices = stratified_split_indices(&labels, val_fraction, seed);
        subsets(Arc::new(self), indices)
    }

    /// Read every image's header (in parallel): the first file that is not a readable image of an accepted
    /// size is named in the error, before any training starts. Returns each sample's (width, height).
    pub fn scan(&self) -> Result<Vec<(u32, u32)>> {
        use rayon::prelude::*;
        self.samples.par_iter().map(|(path, _)| image_header(path)).collect()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class names in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// (file, label) of every sample, in sample order.
    pub fn samples(&self) -> &[(PathBuf, usize)] {
        &self.samples
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }

    fn source(&self, i: usize) -> String {
        self.samples.get(i).map_or_else(|| format!("#{i}"), |(p, _)| p.display().to_string())
    }

    fn get(&self, i: usize) -> Result<(Image, usize)> {
        let (path, label) = self
            .samples
            .get(i)
            .ok_or_else(|| Error::file(&self.root, format!("sample {i} is out of range ({} samples)", self.len())))?;
        Ok((load_image_with(path, &self.decode)?, *label))
    }
}

/// The entries of `dir` not starting with a dot, sorted by name.
fn sorted_entries(dir: &Path) -> Result<Vec<(OsString, PathBuf)>> {
    let fail = |e: std::io::Error| Error::file(dir, format!("cannot list folder: {e}"));
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(fail)? {
        let entry = entry.map_err(fail)?;
        let name = entry.file_name();
        if name.as_encoded_bytes().first() == Some(&b'.') {
            continue;
        }
        entries.push((name, entry.path()));
    }
    entries.sort();
    Ok(entries)
}

fn is_image_name(name: &OsString) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}
