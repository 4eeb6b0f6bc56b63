//! Inference: preprocessing, class predictions and feature extraction over batches of image files.

pub mod card;
pub mod labels;
pub mod quantize;
/// The image decoding and PIL-exact resampling inference shares with the training data (`crate::imaging`).
pub use crate::imaging as preprocess;
pub mod runner;

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::engine::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::model::{Mode, ResNet, Tap};

/// torchvision's ImageNet eval sizes: resize the shorter side to 256, centre-crop 224.
pub const RESIZE: u32 = 256;
pub const CROP: u32 = 224;

use crate::imaging::IMAGE_EXTENSIONS;

/// Expand the command line's inputs: files stay as given, directories contribute their JPEG/PNG files
/// (recursively, sorted by path, so the output order is reproducible).
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found = Vec::new();
            walk(input, &mut found)?;
            if found.is_empty() {
                return Err(Error::file(input, format!("directory holds no .{} files", IMAGE_EXTENSIONS.join("/."))));
            }
            found.sort();
            out.extend(found);
        } else {
            out.push(input.clone());
        }
    }
    if out.is_empty() {
        return Err(Error::invalid("no input images given"));
    }
    Ok(out)
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::file(dir, e))? {
        let path = entry.map_err(|e| Error::file(dir, e))?.path();
        if path.is_dir() {
            walk(&path, found)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            found.push(path);
        }
    }
    Ok(())
}

/// One image file's bytes (an HTTP request's body) decoded and preprocessed as `load_batch` does a file:
/// `[C, size, size]`, or the one-line error naming `name`.
pub fn preprocess_bytes(bytes: &[u8], name: &Path, pre: &card::Preprocess) -> Result<Tensor> {
    let pipe = pre.pipeline();
    let img = preprocess::decode_image(bytes, name, &pre.decode())?;
    let t = pipe.evaluate(&pipe.fit(img).map_err(|e| e.in_file(name))?);
    let side = pre.size as usize;
    t.reshape(&[pre.channels, side, side])
}

/// Decode and preprocess `paths` on all cores into one `[N, C, size, size]` batch, with the network's own
/// evaluation preprocessing. The first bad file stops it.
pub fn load_batch(paths: &[PathBuf], pre: &card::Preprocess) -> Result<Tensor> {
    let pipe = pre.pipeline();
    let images: Vec<Tensor> = paths
        .par_iter()
        .map(|p| {
            let img = preprocess::load_image_with(p, &pre.decode())?;
            Ok(pipe.evaluate(&pipe.fit(img).map_err(|e| e.in_file(p))?))
        })
        .collect::<Result<_>>()?;
    let side = pre.size as usize;
    let mut data = Vec::with_capacity(images.len() * pre.channels * side * side);
    for img in &images {
        data.extend_from_slice(img.data());
    }
    Tensor::new(&[images.len(), pre.channels, side, side], data)
}

/// The `k` most probable classes of each row of `logits`, as (class, softmax probability), best first.
pub fn top_k(logits: &Tensor, k: usize) -> Vec<Vec<(usize, f32)>> {
    let [_, classes] = logits.dims2();
    logits
        .data()
        .chunks(classes.max(1))
        .map(|row| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let exp: Vec<f64> = row.iter().map(|&v| ((v - max) as f64).exp()).collect();
            let sum: f64 = exp.iter().sum();
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            order.into_iter().take(k).map(|c| (c, (exp[c] / sum) as f32)).collect()
        })
        .collect()
}

/// Features at `tap` as an `[N, D]` matrix: stage outputs are averaged over their spatial positions.
pub fn features(model: &mut ResNet, be: &dyn Backend, x: &Tensor, tap: Tap) -> Tensor {
    let out = model.forward_to(be, x, Mode::Eval, tap);
    if out.shape().len() == 4 { be.global_avg_pool(&out) } else { out }
}

/// Run `f` over `x` in batches of `batch` images and concatenate the resulting `[n, D]` rows.
pub fn batched(x: &Tensor, batch: usize, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let [n, c, h, w] = x.dims4();
    let per = c * h * w;
    let mut rows = Vec::new();
    let mut dim = 0;
    for start in (0..n).step_by(batch.max(1)) {
        let end = (start + batch.max(1)).min(n);
        let chunk = Tensor::new(&[end - start, c, h, w], x.data()[start * per..end * per].to_vec())
            .expect("a slice of whole images");
        let out = f(&chunk)?;
        dim = out.shape()[1];
        rows.extend_from_slice(out.data());
    }
    Ok(Tensor::new(&[n, dim], rows).expect("rows of equal width"))
}

/// A little-endian f32 array in NumPy's `.npy` format, version 1.0: the magic, a header dict padded with spaces
/// to a multiple of 64 bytes and ending in a newline, then the values in C order (features' `.npy` output, and
/// the arrays the ONNX check reads).
pub fn npy_f32(t: &Tensor) -> Vec<u8> {
    let dims: Vec<String> = t.shape().iter().map(usize::to_string).collect();
    // Python's tuple syntax: (n,) for one dimension, (a, b) for more.
    let shape = if dims.len() == 1 { format!("{},", dims[0]) } else { dims.join(", ") };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({shape}), }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + t.data().len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    // The padded header is well below 64 KiB (a few dozen dimensions), so its length fits the 2-byte field.
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in t.data() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// One image's top-k as `predict --json` prints it and `POST /v1/predict` answers:
/// `{"file": …, "top": [{"class": i, "label": …, "probability": p}, …]}`.
pub fn top_json(file: &str, top: &[(usize, f32)], labels: &[String]) -> serde_json::Value {
    let top: Vec<_> = top
        .iter()
        .map(|&(c, p)| {
            let label = labels.get(c).map_or_else(|| format!("class {c}"), String::clone);
            serde_json::json!({"class": c, "label": label, "probability": p})
        })
        .collect();
    serde_json::json!({"file": file, "top": top})
}
