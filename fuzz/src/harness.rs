//! The part of the fuzzer that does not depend on the process it runs in: the targets (each one feeds bytes to a
//! loader and checks what comes back), the seed corpus, and the mutation engine.
//!
//! Shared by the `fuzz` binary (`fuzz/src/main.rs`, which adds the process-level machinery: crash supervisor,
//! allocation cap, hang watchdog) and by `tests/fuzz_regressions.rs`, which includes this file with
//! `#[path = "../fuzz/src/harness.rs"]` so that CI replays the same hostile inputs. It may therefore only use
//! crates the root package depends on (resnet_rs, image, zip, flate2) and std.
//!
//! Everything is deterministic for a seed: the same (target, seed) gives the same inputs in the same order.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use resnet_rs::data::cifar::{Cifar, CifarKind, PIXELS};
use resnet_rs::infer::preprocess::{
    Decode, eval_transform, load_image, load_image_with, load_rgb, resize_bilinear_pil,
};
use resnet_rs::train::recipe::Recipe;
use resnet_rs::weights::hub;
use resnet_rs::weights::{pth, safetensors};
use resnet_rs::{Image, Samples};

/// Inputs never grow past this (mutations that would are undone), so a long run cannot snowball.
pub const MAX_INPUT: usize = 4 << 20;
/// How many inputs the error-message feedback may add to a target's corpus.
pub const MAX_ADDED: usize = 512;
/// Outcome classes with the same coarse class (see `coarse_class`) add at most `PER_PREFIX` inputs.
const COARSE_WORDS: usize = 4;
const PER_PREFIX: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Cifar,
    Image,
    Tiff,
    Safetensors,
    Pth,
    Recipe,
    Calibration,
    WeightsName,
    Idx,
    Dicom,
    Report,
}

pub const TARGETS: [Target; 11] = [
    Target::Cifar,
    Target::Image,
    Target::Tiff,
    Target::Dicom,
    Target::Idx,
    Target::Safetensors,
    Target::Pth,
    Target::Recipe,
    Target::Calibration,
    Target::WeightsName,
    Target::Report,
];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Cifar => "cifar",
            Target::Image => "image",
            Target::Tiff => "tiff",
            Target::WeightsName => "weights-name",
            Target::Idx => "idx",
            Target::Dicom => "dicom",
            Target::Safetensors => "safetensors",
            Target::Pth => "pth",
            Target::Recipe => "recipe",
            Target::Calibration => "calibration",
            Target::Report => "report",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        TARGETS.into_iter().find(|t| t.name() == name)
    }
}

/// What a loader did with an input that did not panic. Either is fine; the message feeds the corpus feedback.
#[derive(Debug)]
pub enum Outcome {
    Accepted(String),
    Rejected(String),
}

impl Outcome {
    /// A coarse class of the outcome: the message with numbers, quoted text and bracketed parts blanked, so
    /// "byte 17: memo key 3" and "byte 99: memo key 12" are one class while a different check is another.
    pub fn class(&self) -> String {
        let (tag, msg) = match self {
            Outcome::Accepted(m) => ("ok", m),
            Outcome::Rejected(m) => ("err", m),
        };
        // first pass: drop quoted text and bracketed lists
        let mut kept = String::new();
        let mut quote = false;
        let mut depth = 0usize;
        for c in msg.chars() {
            match c {
                '"' | '\'' | '`' => quote = !quote,
                _ if quote => {}
                '[' | '(' | '{' => depth += 1,
                ']' | ')' | '}' => depth = depth.saturating_sub(1),
                _ if depth > 0 => {}
                c => kept.push(c),
            }
        }
        // second pass: a word with a digit in it (a number, an offset, a hex CRC, a file name) becomes '#'
        let mut out = format!("{tag}:");
        let mut word = String::new();
        let flush = |word: &mut String, out: &mut String| {
            if word.chars().any(|c| c.is_ascii_digit()) {
                out.push('#');
            } else {
                out.push_str(word);
            }
            word.clear();
        };
        for c in kept.chars() {
            if c.is_alphanumeric() {
                word.push(c);
            } else {
                flush(&mut word, &mut out);
                out.push(c);
            }
            if out.len() > 160 {
                break;
            }
        }
        flush(&mut word, &mut out);
        out
    }
}

/// Per-process scratch space (the image target hands the loader a path).
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub fn new() -> Scratch {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("resnet-rs-fuzz-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cannot create the fuzzer's scratch directory");
        Scratch { dir }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Run one input through a target. Loader errors are `Rejected`; a broken invariant on an accepted input panics
/// (as does the loader itself when it has a bug): the caller runs this under `catch_unwind`.
pub fn run(target: Target, data: &[u8], scratch: &Scratch) -> Outcome {
    match target {
        Target::Cifar => run_cifar(data),
        Target::Image => run_image(data, scratch),
        Target::Tiff => run_tiff(data, scratch),
        Target::WeightsName => run_weights_name(data),
        Target::Idx => run_idx(data),
        Target::Dicom => run_dicom(data, scratch),
        Target::Safetensors => run_safetensors(data),
        Target::Pth => run_pth(data),
        Target::Recipe => run_recipe(data),
        Target::Calibration => run_calibration(data),
        Target::Report => run_report(data),
    }
}

fn run_cifar(data: &[u8]) -> Outcome {
    let mut summary = Vec::new();
    for kind in [CifarKind::Cifar10, CifarKind::Cifar100] {
        match Cifar::parse_records(data, kind, Path::new("fuzz.bin")) {
            Ok((pixels, labels)) => {
                assert_eq!(labels.len() * kind.record_size(), data.len(), "{kind}: record count");
                assert_eq!(pixels.len(), labels.len() * PIXELS, "{kind}: pixel bytes");
                assert!(labels.iter().all(|&l| usize::from(l) < kind.num_classes()), "{kind}: label out of range");
                summary.push(format!("{kind} ok"));
            }
            Err(e) => summary.push(format!("{kind}: {e}")),
        }
    }
    let msg = summary.join("; ");
    if msg.contains(" ok") { Outcome::Accepted(msg) } else { Outcome::Rejected(msg) }
}

fn run_image(data: &[u8], scratch: &Scratch) -> Outcome {
    // The extension is only the loader's fallback when the content is not recognised; vary it with the input.
    let h = fnv1a(data);
    let ext = ["png", "jpg", "jpeg", "bin"][(h % 4) as usize];
    let path = scratch.dir.join(format!("input.{ext}"));
    std::fs::write(&path, data).expect("cannot write the fuzz input to the scratch directory");
    let img = match load_rgb(&path) {
        Ok(img) => img,
        Err(e) => return Outcome::Rejected(e.to_string().replace(&*path.to_string_lossy(), "IMAGE")),
    };
    let (w, h32) = (img.width(), img.height());
    assert!(w > 0 && h32 > 0, "decoded an empty image");
    // The same file with its own bands (16-bit kept at 16 bits, grey as one band); a second decode only of
    // images small enough that it cannot be what makes an input slow (a 652-byte JPEG may claim 2^28 pixels).
    if u64::from(w) * u64::from(h32) <= 1 << 20
        && let Ok(own) = load_image(&path)
    {
        let _ = check_bands(&own, h);
    }
    assert_eq!(img.as_raw().len(), w as usize * h32 as usize * 3, "RGB buffer length");
    let resize = 1 + ((h >> 8) % 48) as u32;
    let crop = 1 + ((h >> 16) % 48) as u32;
    for (resize, crop) in [(36, 32), (resize, crop)] {
        let t = eval_transform(&img, resize, crop);
        assert_eq!(t.shape(), &[3, crop as usize, crop as usize], "eval_transform({resize}, {crop}) shape");
        assert!(t.data().iter().all(|v| v.is_finite()), "eval_transform produced a non-finite value");
    }
    if u64::from(w) * u64::from(h32) <= 1 << 20 {
        let (rw, rh) = (1 + ((h >> 24) % 40) as u32, 1 + ((h >> 32) % 40) as u32);
        let small = resize_bilinear_pil(&img, rw, rh);
        assert_eq!((small.width(), small.height()), (rw, rh), "resize_bilinear_pil size");
    }
    let bucket = |n: u32| match n {
        1 => "one",
        2..16 => "small",
        16..1024 => "medium",
        _ => "large",
    };
    Outcome::Accepted(format!("{} by {}", bucket(w), bucket(h32)))
}

/// A decoded image of any bands through the geometric ops and the tensor conversion: sizes and finiteness.
fn check_bands(img: &Image, h: u64) -> String {
    let (w, h32) = img.dimensions();
    assert!(w > 0 && h32 > 0 && img.bands() > 0, "decoded an empty image");
    let len = match img.samples() {
        Samples::U8(v) => v.len(),
        Samples::F32(v) => v.len(),
    };
    assert_eq!(len, w as usize * h32 as usize * img.bands(), "sample count");
    let crop = 1 + ((h >> 16) % 24) as u32;
    let t = img.resize_center_crop(1 + ((h >> 8) % 32) as u32, crop).to_tensor(&[0.5], &[0.25]);
    assert_eq!(t.shape(), &[img.bands(), crop as usize, crop as usize], "resize_center_crop shape");
    // Floats are taken as stored, so a NaN in the file may pass through; integers never give one.
    if matches!(img.samples(), Samples::U8(_)) {
        assert!(t.data().iter().all(|v| v.is_finite()), "8-bit image gave a non-finite value");
    }
    format!("{} bands {}", img.bands(), if matches!(img.samples(), Samples::U8(_)) { "u8" } else { "f32" })
}

fn run_tiff(data: &[u8], scratch: &Scratch) -> Outcome {
    let path = scratch.dir.join("input.tif");
    std::fs::write(&path, data).expect("cannot write the fuzz input to the scratch directory");
    let scale = fnv1a(data).is_multiple_of(3).then_some(10000.0);
    match load_image_with(&path, &Decode { pixel_scale: scale, window: None }) {
        Ok(img) => Outcome::Accepted(check_bands(&img, fnv1a(data))),
        Err(e) => Outcome::Rejected(e.to_string().replace(&*path.to_string_lossy(), "IMAGE")),
    }
}

fn run_dicom(data: &[u8], scratch: &Scratch) -> Outcome {
    let path = scratch.dir.join("input.dcm");
    std::fs::write(&path, data).expect("cannot write the fuzz input to the scratch directory");
    let window = fnv1a(data).is_multiple_of(3).then_some((40.0, 400.0));
    match load_image_with(&path, &Decode { pixel_scale: None, window }) {
        Ok(img) => {
            if let Samples::F32(v) = img.samples() {
                assert!(v.iter().all(|x| (0.0..=1.0).contains(x)), "a windowed DICOM value outside [0, 1]");
            }
            Outcome::Accepted(check_bands(&img, fnv1a(data)))
        }
        Err(e) => Outcome::Rejected(e.to_string().replace(&*path.to_string_lossy(), "IMAGE")),
    }
}

/// The input as an IDX image file (with labels made to match its claimed count) and as a label file (with
/// one-pixel images made to match).
fn run_idx(data: &[u8]) -> Outcome {
    let (p, l) = (Path::new("fuzz-images-idx3-ubyte"), Path::new("fuzz-labels-idx1-ubyte"));
    let claimed = data.get(4..8).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let n = claimed.min(1 << 16);
    let mut labels = vec![0, 0, 8, 1];
    labels.extend(n.to_be_bytes());
    labels.extend((0..n).map(|i| (i % 10) as u8));
    let mut outcomes = Vec::new();
    for (images, labels) in [(data.to_vec(), labels), (one_pixel_images(n), data.to_vec())] {
        match resnet_rs::data::idx::Idx::parse(&images, &labels, p, l) {
            Ok(ds) => {
                use resnet_rs::Dataset;
                for i in [0, ds.len().saturating_sub(1)] {
                    if i < ds.len() {
                        let (img, label) = ds.get(i).expect("an in-range sample of a parsed file");
                        assert!(img.width() > 0 && img.height() > 0 && label < 256, "sample {i}");
                    }
                }
                outcomes.push(format!("{} samples", ds.len().min(2)));
            }
            Err(e) => outcomes.push(e.to_string()),
        }
    }
    let msg = outcomes.join("; ");
    if msg.contains("samples") { Outcome::Accepted(msg) } else { Outcome::Rejected(msg) }
}

fn one_pixel_images(n: u32) -> Vec<u8> {
    let mut out = vec![0, 0, 8, 3];
    for d in [n, 1, 1] {
        out.extend(d.to_be_bytes());
    }
    out.extend((0..n).map(|i| i as u8));
    out
}

/// What `--weights` resolves without touching the network: a name, a URL and its hash prefix.
fn run_weights_name(data: &[u8]) -> Outcome {
    let spec = String::from_utf8_lossy(data);
    let _ = hub::hash_prefix(&spec);
    if !hub::is_remote(&spec) {
        return Outcome::Rejected("a local path".into());
    }
    match hub::remote(&spec) {
        Ok(r) => {
            assert!(r.sha256_prefix.len() >= 8 && r.sha256_prefix.bytes().all(|b| b.is_ascii_hexdigit()), "prefix");
            assert!(!r.file.is_empty() && !r.file.contains('/') && !r.file.starts_with('.'), "file {:?}", r.file);
            assert!(r.url.starts_with("http://") || r.url.starts_with("https://"), "url {:?}", r.url);
            Outcome::Accepted(if spec.starts_with("torchvision:") { "name".into() } else { "url".into() })
        }
        Err(e) => Outcome::Rejected(e.to_string()),
    }
}

fn run_safetensors(data: &[u8]) -> Outcome {
    match safetensors::load_bytes(data, Path::new("fuzz.safetensors")) {
        Ok(loaded) => {
            for (k, t) in &loaded.tensors {
                let numel: usize = t.shape().iter().product();
                assert_eq!(t.data().len(), numel, "tensor {k}: data length vs shape");
            }
            // The model card and the arch a checkpoint's metadata and keys describe (`open_model`'s reading).
            let _ = resnet_rs::infer::card::ModelCard::from_metadata(&loaded.metadata);
            let _ = resnet_rs::model::Arch::infer_from(&loaded.tensors);
            let mut ranks: Vec<char> =
                loaded.tensors.values().map(|t| char::from(b'a' + t.shape().len().min(25) as u8)).collect();
            ranks.sort();
            ranks.dedup();
            Outcome::Accepted(format!(
                "ranks {} metadata {}",
                ranks.into_iter().collect::<String>(),
                !loaded.metadata.is_empty()
            ))
        }
        Err(e) => Outcome::Rejected(e.to_string()),
    }
}

fn run_pth(data: &[u8]) -> Outcome {
    match pth::load_pth_bytes(data, Path::new("fuzz.pth")) {
        Ok(tensors) => {
            assert!(!tensors.is_empty(), "load_pth_bytes returned an empty state_dict");
            for (k, t) in &tensors {
                let numel: usize = t.shape().iter().product();
                assert_eq!(t.data().len(), numel, "tensor {k}: data length vs shape");
            }
            // (letters, not digits: digits are blanked out of outcome classes)
            let mut ranks: Vec<char> =
                tensors.values().map(|t| char::from(b'a' + t.shape().len().min(25) as u8)).collect();
            ranks.sort();
            ranks.dedup();
            let empty = tensors.values().any(|t| t.data().is_empty());
            Outcome::Accepted(format!("ranks {} empty {empty}", ranks.into_iter().collect::<String>()))
        }
        Err(e) => Outcome::Rejected(e.to_string()),
    }
}

/// A run folder's `metrics.jsonl` or `evaluation.json` (the same bytes are tried as both) drawn into the report:
/// whatever the files say, the page renders, escapes what it quotes and runs nothing.
fn run_report(data: &[u8]) -> Outcome {
    use resnet_rs::report::{Run, metrics};
    use resnet_rs::train::evaluate::Recorded;
    let (m, best) = (metrics::parse(data), Recorded::parse(data));
    let outcome = match (&m, &best) {
        (Ok(m), _) => Outcome::Accepted(format!("metrics {} {} {}", m.epochs.len(), m.grads.len(), m.notes.len())),
        (_, Ok(b)) => Outcome::Accepted(format!("evaluation of {} classes", b.classes.len())),
        (Err(e), Err(_)) => return Outcome::Rejected(e.to_string()),
    };
    let run = Run {
        dir: PathBuf::from("fuzz"),
        recipe: Recipe::default(),
        position: Default::default(),
        metrics: m.unwrap_or_default(),
        best: best.ok(),
    };
    match resnet_rs::report::render(&run) {
        Ok(html) => assert!(!html.contains("<script"), "the report quoted markup unescaped"),
        Err(e) => return Outcome::Rejected(e.to_string()),
    }
    outcome
}

/// A `resnet quantize` file's `quantization` metadata: accepted ones round-trip, and every input they name
/// gives usable parameters or none.
fn run_calibration(data: &[u8]) -> Outcome {
    use resnet_rs::infer::quantize::{Calibration, METADATA_KEY};
    let meta =
        std::collections::BTreeMap::from([(METADATA_KEY.to_string(), String::from_utf8_lossy(data).into_owned())]);
    match Calibration::from_metadata(&meta, Path::new("fuzz.safetensors")) {
        Ok(Some(c)) => {
            for name in c.inputs.keys() {
                if let Some(p) = c.input(name) {
                    assert!(p.scale > 0.0 && p.scale.is_finite(), "{name}: unusable scale {p:?} accepted");
                }
            }
            let again = std::collections::BTreeMap::from([(METADATA_KEY.to_string(), c.to_metadata())]);
            let back = Calibration::from_metadata(&again, Path::new("fuzz.safetensors"));
            assert_eq!(back.ok().flatten().as_ref(), Some(&c), "calibration does not round-trip");
            Outcome::Accepted(String::new())
        }
        Ok(None) => Outcome::Accepted("none".into()),
        Err(e) => Outcome::Rejected(e.to_string()),
    }
}

fn run_recipe(data: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(data);
    match Recipe::parse(&text) {
        Ok(recipe) => {
            // Checkpoints store `to_toml()` and `--resume` parses it back: it must round-trip.
            let toml = recipe.to_toml();
            assert!(!toml.is_empty(), "to_toml() gave an empty string for an accepted recipe: {recipe:?}");
            let again =
                Recipe::parse(&toml).unwrap_or_else(|e| panic!("to_toml() output does not parse back: {e}\n{toml}"));
            assert_eq!(again.to_toml(), toml, "recipe does not round-trip through to_toml()");
            // A recipe that validates becomes a start-up line and a model card that validates too.
            if recipe.validate().is_ok() {
                let _ = recipe.summary();
                let card = resnet_rs::train::setup::card(&recipe, None);
                card.preprocess.validate().unwrap_or_else(|e| panic!("a valid recipe gave an invalid card: {e}"));
            }
            Outcome::Accepted(String::new())
        }
        Err(e) => Outcome::Rejected(e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Randomness and hashing

/// SplitMix64: tiny, fast, and good enough to drive mutations.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True with probability num/den.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den < num
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A small count with a long tail: 1 most of the time, occasionally up to `max`.
    pub fn small(&mut self, max: usize) -> usize {
        let mut n = 1;
        while n < max && self.chance(1, 2) {
            n += 1;
        }
        n
    }
}

/// FNV-1a, 64 bits: names findings after their input.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

// ---------------------------------------------------------------------------------------------------------------
// Small file-format helpers (seed generation and structure-aware mutations)

/// CRC-32 (zip's and PNG's) of the concatenated parts.
pub fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = flate2::Crc::new();
    for part in parts {
        crc.update(part);
    }
    crc.sum()
}

/// A zlib stream of stored (uncompressed) deflate blocks: lets us hand-build PNGs with any IDAT content.
pub fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let mut chunks = data.chunks(65535).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let n = chunk.len() as u16;
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(!n).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
}

/// A PNG built by hand: any IHDR values, optional PLTE/tRNS, IDAT = zlib(stored(raw)).
#[allow(clippy::too_many_arguments)]
pub fn make_png(
    w: u32,
    h: u32,
    depth: u8,
    color: u8,
    interlace: u8,
    plte: Option<&[u8]>,
    trns: Option<&[u8]>,
    raw: &[u8],
) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[depth, color, 0, 0, interlace]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    if let Some(p) = plte {
        png_chunk(&mut out, b"PLTE", p);
    }
    if let Some(t) = trns {
        png_chunk(&mut out, b"tRNS", t);
    }
    png_chunk(&mut out, b"IDAT", &zlib_stored(raw));
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// Bytes per row (without the filter byte) of a non-interlaced PNG.
fn png_row_bytes(w: u32, depth: u8, color: u8) -> usize {
    let channels = match color {
        0 | 3 => 1,
        4 => 2,
        2 => 3,
        6 => 4,
        _ => 3,
    };
    (w as usize * channels * depth as usize).div_ceil(8)
}

/// A PNG's chunks as (type, data); None if the signature or a length is off.
pub fn png_chunks(png: &[u8]) -> Option<Vec<([u8; 4], Vec<u8>)>> {
    let mut rest = png.strip_prefix(b"\x89PNG\r\n\x1a\n")?;
    let mut chunks = Vec::new();
    while rest.len() >= 12 {
        let n = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
        let kind: [u8; 4] = rest[4..8].try_into().ok()?;
        let data = rest.get(8..8 + n)?.to_vec();
        chunks.push((kind, data));
        rest = rest.get(12 + n..)?;
    }
    Some(chunks)
}

fn png_from_chunks(chunks: &[([u8; 4], Vec<u8>)]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in chunks {
        png_chunk(&mut out, kind, data);
    }
    out
}

/// One archive entry: stored bytes, or (`deflated`) a raw deflate stream with the declared size and CRC.
#[derive(Clone, Debug)]
pub struct Part {
    pub name: String,
    pub data: Vec<u8>,
    pub deflated: Option<(u32, u32)>,
}

impl Part {
    pub fn stored(name: &str, data: Vec<u8>) -> Part {
        Part { name: name.to_string(), data, deflated: None }
    }
}

/// The entries of a zip archive, in order, decompressed (None if it does not open).
pub fn zip_entries(bytes: &[u8]) -> Option<Vec<Part>> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).ok()?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).ok()?;
        let name = f.name().ok()?.to_string();
        let mut data = Vec::new();
        f.read_to_end(&mut data).ok()?;
        out.push(Part::stored(&name, data));
    }
    Some(out)
}

/// A zip archive of `parts` (local headers, central directory, end record), written by hand so that entries can
/// carry any deflate stream and any declared size, and names may repeat.
pub fn zip_pack(parts: &[Part]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    let u16le = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
    let u32le = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    for p in parts {
        let offset = out.len() as u32;
        let (method, crc, size) = match p.deflated {
            Some((size, crc)) => (8u16, crc, size),
            None => (0, crc32(&[&p.data]), p.data.len() as u32),
        };
        let name = p.name.as_bytes();
        // local file header
        u32le(&mut out, 0x0403_4b50);
        u16le(&mut out, 20);
        u16le(&mut out, 0x0800); // UTF-8 names
        u16le(&mut out, method);
        u16le(&mut out, 0);
        u16le(&mut out, 0x21);
        u32le(&mut out, crc);
        u32le(&mut out, p.data.len() as u32);
        u32le(&mut out, size);
        u16le(&mut out, name.len() as u16);
        u16le(&mut out, 0);
        out.extend_from_slice(name);
        out.extend_from_slice(&p.data);
        // central directory record
        u32le(&mut central, 0x0201_4b50);
        u16le(&mut central, 0x031e);
        u16le(&mut central, 20);
        u16le(&mut central, 0x0800);
        u16le(&mut central, method);
        u16le(&mut central, 0);
        u16le(&mut central, 0x21);
        u32le(&mut central, crc);
        u32le(&mut central, p.data.len() as u32);
        u32le(&mut central, size);
        u16le(&mut central, name.len() as u16);
        for _ in 0..4 {
            u16le(&mut central, 0); // extra, comment, disk, internal attributes
        }
        u32le(&mut central, 0);
        u32le(&mut central, offset);
        central.extend_from_slice(name);
    }
    let (cd_offset, cd_size) = (out.len() as u32, central.len() as u32);
    out.extend_from_slice(&central);
    u32le(&mut out, 0x0605_4b50);
    u16le(&mut out, 0);
    u16le(&mut out, 0);
    u16le(&mut out, parts.len() as u16);
    u16le(&mut out, parts.len() as u16);
    u32le(&mut out, cd_size);
    u32le(&mut out, cd_offset);
    u16le(&mut out, 0);
    out
}

/// Raw deflate blocks that inflate to `n` zero bytes and end byte-aligned and non-final (a sync flush), so that
/// copies can be concatenated: any number of copies inflates to that many times `n` zeros.
pub fn deflate_zeros_chunk(n: usize) -> Vec<u8> {
    let mut c = flate2::Compress::new(flate2::Compression::best(), false);
    let zeros = vec![0u8; n];
    let mut out = Vec::with_capacity(n / 64 + 4096);
    while (c.total_in() as usize) < n || out.is_empty() {
        let at = c.total_in() as usize;
        out.reserve(4096);
        if c.compress_vec(&zeros[at..], &mut out, flate2::FlushCompress::Sync).is_err() {
            break;
        }
    }
    out
}

/// CRC-32 of `n` zero bytes.
pub fn zeros_crc(n: usize) -> u32 {
    let zeros = [0u8; 1 << 16];
    let mut crc = flate2::Crc::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(zeros.len());
        crc.update(&zeros[..k]);
        left -= k;
    }
    crc.sum()
}

/// A deflate "bomb": `copies` chunks then an empty final block.
pub fn deflate_bomb(chunk: &[u8], copies: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunk.len() * copies + 2);
    for _ in 0..copies {
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&[0x03, 0x00]);
    out
}

// ---------------------------------------------------------------------------------------------------------------
// Seeds

fn read_dir_sorted(dir: &Path, exts: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.contains(&e)))
        .filter_map(|p| Some((p.strip_prefix(dir).ok()?.display().to_string(), std::fs::read(&p).ok()?)))
        .map(|(n, b)| (format!("{}/{n}", dir.file_name().unwrap_or_default().to_string_lossy()), b))
        .collect()
}

/// Pickle protocol-2 helpers for hand-built state_dicts.
fn pkl_str(out: &mut Vec<u8>, s: &str) {
    out.push(0x8c);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn pkl_int(out: &mut Vec<u8>, v: i64) {
    match v {
        0..=255 => out.extend_from_slice(&[b'K', v as u8]),
        256..=65535 => {
            out.push(b'M');
            out.extend_from_slice(&(v as u16).to_le_bytes());
        }
        _ => {
            out.extend_from_slice(&[0x8a, 8]);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn pkl_tuple(out: &mut Vec<u8>, items: &[i64]) {
    out.push(b'(');
    for &v in items {
        pkl_int(out, v);
    }
    out.push(b't');
}

/// (name, storage class, storage key, numel, offset, size, stride)
type TensorSpec<'a> = (&'a str, &'a str, &'a str, i64, i64, &'a [i64], &'a [i64]);

/// A torch.save-style archive holding `tensors` = (name, storage class, storage key, numel, offset, size,
/// stride), with storage bytes `data[key]`.
fn make_pth(tensors: &[TensorSpec], data: &[(&str, Vec<u8>)], wrap: bool) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    if wrap {
        p.push(b'}');
        pkl_str(&mut p, "state_dict");
    }
    p.extend_from_slice(b"ccollections\nOrderedDict\n)R");
    for &(name, class, key, numel, offset, size, stride) in tensors {
        pkl_str(&mut p, name);
        pkl_tensor(&mut p, class, key, numel, offset, size, stride);
        p.push(b's');
    }
    if wrap {
        p.push(b's');
    }
    p.push(b'.');
    pth_archive(p, data)
}

/// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`, pushed on the stack.
fn pkl_tensor(p: &mut Vec<u8>, class: &str, key: &str, numel: i64, offset: i64, size: &[i64], stride: &[i64]) {
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    p.push(b'(');
    pkl_str(p, "storage");
    p.extend_from_slice(format!("ctorch\n{class}\n").as_bytes());
    pkl_str(p, key);
    pkl_str(p, "cpu");
    pkl_int(p, numel);
    p.extend_from_slice(b"tQ");
    pkl_int(p, offset);
    pkl_tuple(p, size);
    pkl_tuple(p, stride);
    p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR");
}

/// The archive around a pickle: `archive/data.pkl`, byteorder, the storages, version.
fn pth_archive(p: Vec<u8>, data: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut entries = vec![Part::stored("archive/data.pkl", p), Part::stored("archive/byteorder", b"little".to_vec())];
    for (key, bytes) in data {
        entries.push(Part::stored(&format!("archive/data/{key}"), bytes.clone()));
    }
    entries.push(Part::stored("archive/version", b"3\n".to_vec()));
    zip_pack(&entries)
}

fn synthetic_pth() -> Vec<(String, Vec<u8>)> {
    let f32s = |n: usize| (0..n).flat_map(|i| (i as f32 * 0.5 - 1.0).to_le_bytes()).collect::<Vec<u8>>();
    vec![
        (
            "gen/pth-plain".into(),
            make_pth(&[("w", "FloatStorage", "0", 6, 0, &[2, 3], &[3, 1])], &[("0", f32s(6))], false),
        ),
        (
            "gen/pth-views".into(),
            make_pth(
                &[
                    ("a", "FloatStorage", "0", 12, 2, &[3, 2], &[1, 3]),
                    ("b", "FloatStorage", "0", 12, 0, &[4], &[0]),
                    ("c", "HalfStorage", "1", 4, 0, &[], &[]),
                    ("d", "LongStorage", "2", 1, 0, &[1], &[1]),
                    ("e", "FloatStorage", "0", 12, 0, &[0, 5], &[5, 1]),
                ],
                &[("0", f32s(12)), ("1", vec![0, 0x3c, 0, 0x7c, 0, 0xfc, 1, 0x7e]), ("2", 7i64.to_le_bytes().to_vec())],
                false,
            ),
        ),
        (
            "gen/pth-wrapped".into(),
            make_pth(&[("module.x", "ByteStorage", "k", 3, 0, &[3], &[1])], &[("k", vec![1, 2, 3])], true),
        ),
        ("gen/pth-memo-keys".into(), pth_archive(memo_keys_pickle("k", 3), &[("0", f32s(6))])),
    ]
}

/// A state_dict whose one key is memoized and set again `rebinds` times through BINGET (to None, and finally
/// back to the tensor): Python's last-value-wins on repeated keys, and the shape of pickle that makes key
/// handling cost (number of SETITEMs) x (key length) when the key is long.
pub fn memo_keys_pickle(key: &str, rebinds: usize) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend_from_slice(b"ccollections\nOrderedDict\n)R");
    if key.len() < 256 {
        pkl_str(&mut p, key);
    } else {
        p.push(b'X');
        p.extend_from_slice(&(key.len() as u32).to_le_bytes());
        p.extend_from_slice(key.as_bytes());
    }
    p.extend_from_slice(b"q\x00");
    pkl_tensor(&mut p, "FloatStorage", "0", 6, 0, &[2, 3], &[3, 1]);
    p.extend_from_slice(b"q\x01s");
    for _ in 0..rebinds {
        p.extend_from_slice(b"h\x00Ns");
    }
    p.extend_from_slice(b"h\x00h\x01s.");
    p
}

/// A torch.save archive of `n` one-element tensors, each with its own storage, stored as a deflate stream
/// inflating to `per_storage` zero bytes (a multiple of 1 MiB), with the right CRC: `n` x `per_storage` bytes
/// from an archive of about `n` x `per_storage` / 1000.
pub fn pth_storage_bombs(n: usize, per_storage: usize) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend_from_slice(b"ccollections\nOrderedDict\n)R");
    for i in 0..n {
        pkl_str(&mut p, &format!("t{i}"));
        pkl_tensor(&mut p, "FloatStorage", &i.to_string(), (per_storage / 4) as i64, 0, &[1], &[1]);
        p.push(b's');
    }
    p.push(b'.');
    let chunk = deflate_zeros_chunk(BOMB_CHUNK);
    let copies = per_storage / BOMB_CHUNK;
    let bomb = deflate_bomb(&chunk, copies);
    let crc = zeros_crc(copies * BOMB_CHUNK);
    let mut parts = vec![Part::stored("archive/data.pkl", p)];
    for i in 0..n {
        parts.push(Part {
            name: format!("archive/data/{i}"),
            data: bomb.clone(),
            deflated: Some(((copies * BOMB_CHUNK) as u32, crc)),
        });
    }
    parts.push(Part::stored("archive/version", b"3\n".to_vec()));
    zip_pack(&parts)
}

/// A torch.save archive with `pickle` as data.pkl and storage `0` holding six f32.
pub fn pth_with_pickle(pickle: Vec<u8>) -> Vec<u8> {
    let f32s: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    pth_archive(pickle, &[("0", f32s)])
}

fn synthetic_safetensors() -> Vec<(String, Vec<u8>)> {
    let build = |header: &str, data: &[u8]| {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    };
    vec![
        (
            "gen/st-dtypes".into(),
            build(
                r#"{"__metadata__":{"format":"pt","files":"[\"a.png\"]"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[2],"data_offsets":[16,20]},"c":{"dtype":"BF16","shape":[],"data_offsets":[20,22]},"d":{"dtype":"I64","shape":[1],"data_offsets":[22,30]},"e":{"dtype":"F64","shape":[1],"data_offsets":[30,38]},"f":{"dtype":"I32","shape":[0,3],"data_offsets":[38,38]}}"#,
                &[7u8; 38],
            ),
        ),
        ("gen/st-empty".into(), build("{}", &[])),
        ("gen/st-u8".into(), build(r#"{"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#, &[1, 2, 3])),
        ("gen/st-checksummed".into(), checksummed_safetensors()),
    ]
}

/// A file as our own writer makes it, with the CRC-32 in its metadata, so that mutations reach the checksum
/// verification (files from PyTorch carry none).
fn checksummed_safetensors() -> Vec<u8> {
    use resnet_rs::engine::Tensor;
    let path = std::env::temp_dir().join(format!("resnet-fuzz-seed-{}.safetensors", std::process::id()));
    let tensors = std::collections::BTreeMap::from([
        ("conv.weight".to_string(), Tensor::new(&[2, 1, 1, 2], vec![0.5, -1.0, 2.0, 3.5]).expect("4 values")),
        ("fc.bias".to_string(), Tensor::new(&[3], vec![1.0, 2.0, 3.0]).expect("3 values")),
    ]);
    let counts = std::collections::BTreeMap::from([("bn.num_batches_tracked".to_string(), 7i64)]);
    let meta = std::collections::BTreeMap::from([("format".to_string(), "resnet-rs-train/1".to_string())]);
    safetensors::save(&path, &tensors, &counts, &meta).expect("temp dir is writable");
    let bytes = std::fs::read(&path).expect("just written");
    let _ = std::fs::remove_file(&path);
    bytes
}

fn synthetic_images() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    // Hand-built PNGs: every colour type, several bit depths, palette with transparency, interlaced.
    let raw = |rows: usize, row_bytes: usize| -> Vec<u8> {
        (0..rows)
            .flat_map(|r| std::iter::once((r % 5) as u8).chain((0..row_bytes).map(move |i| (i * 37 + r * 11) as u8)))
            .collect()
    };
    for &(w, h, depth, color) in &[
        (3u32, 2u32, 8u8, 2u8),
        (4, 4, 8, 6),
        (5, 3, 8, 0),
        (5, 3, 1, 0),
        (7, 2, 4, 0),
        (2, 2, 16, 0),
        (2, 3, 16, 2),
        (2, 2, 16, 6),
        (3, 1, 8, 4),
        (2, 2, 16, 4),
    ] {
        let data = raw(h as usize, png_row_bytes(w, depth, color));
        out.push((format!("gen/png-{w}x{h}-d{depth}-c{color}"), make_png(w, h, depth, color, 0, None, None, &data)));
    }
    let plte: Vec<u8> = (0..12).map(|i| (i * 21) as u8).collect();
    out.push(("gen/png-palette".into(), make_png(4, 2, 2, 3, 0, Some(&plte), Some(&[0, 128]), &raw(2, 1))));
    out.push((
        "gen/png-palette8".into(),
        make_png(3, 3, 8, 3, 0, Some(&plte), None, &raw(3, 3).iter().map(|b| b % 4).collect::<Vec<_>>()),
    ));
    out.push(("gen/png-trns-rgb".into(), make_png(2, 2, 8, 2, 0, None, Some(&[0, 1, 0, 2, 0, 3]), &raw(2, 6))));
    // Adam7 interlaced 8x8 grey: passes of 1,1,2,4,... pixels; a generous filler is enough for a seed.
    out.push(("gen/png-interlaced".into(), make_png(8, 8, 8, 0, 1, None, None, &[0u8; 8 * 9 + 15])));
    // JPEGs from the image crate's encoder.
    for &(w, h, grey, q) in &[(8u32, 8u32, false, 90u8), (17, 9, false, 50), (1, 1, true, 75), (16, 24, true, 20)] {
        let mut buf = Vec::new();
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, q);
        let ok = if grey {
            let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([(x * 31 + y * 7) as u8]));
            enc.encode_image(&img).is_ok()
        } else {
            let img =
                image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 31) as u8, (y * 17) as u8, (x * y) as u8]));
            enc.encode_image(&img).is_ok()
        };
        if ok {
            out.push((format!("gen/jpeg-{w}x{h}-{}", if grey { "grey" } else { "rgb" }), buf));
        }
    }
    out
}

fn synthetic_cifar() -> Vec<(String, Vec<u8>)> {
    let record = |labels: &[u8], salt: u8| -> Vec<u8> {
        let mut r = labels.to_vec();
        r.extend((0..PIXELS).map(|i| (i as u8).wrapping_mul(7).wrapping_add(salt)));
        r
    };
    vec![
        ("gen/cifar10-1".into(), record(&[3], 0)),
        ("gen/cifar10-2".into(), [record(&[9], 1), record(&[0], 2)].concat()),
        ("gen/cifar100-1".into(), record(&[5, 42], 3)),
        ("gen/cifar100-2".into(), [record(&[19, 99], 4), record(&[0, 0], 5)].concat()),
        // 3073 * 3074 bytes is a whole number of records of both kinds.
        ("gen/cifar-both".into(), (0..3073 * 3074).map(|i| ((i % 3073) % 10) as u8).collect()),
    ]
}

fn synthetic_recipes() -> Vec<(String, Vec<u8>)> {
    [
        "",
        "arch = \"resnet18\"\nepochs = 3\nmilestones = [1, 2]\nadam_betas = [0.9, 0.99]\nmean = [0.5, 0.5, 0.5]\n",
        "lr = nan\nmomentum = inf\nweight_decay = -0.0\nmin_lr = 1e-45\ngamma = 3.4028235e38\n",
        "data = \"/tmp/x\"\nseed = 18446744073709551615\nworkers = 0\nbatch_size = 9223372036854775807\n",
        "stem = 'cifar'\ndataset = \"\"\"folder\"\"\"\noptimizer = '''adamw'''\nschedule = \"\\u00e9\\t\"\n",
        "milestones = [ 1,\n 2, # comment\n 3, ]\nstd = [1,2,3]\n",
    ]
    .iter()
    .enumerate()
    .map(|(i, s)| (format!("gen/recipe-{i}"), s.as_bytes().to_vec()))
    .collect()
}

/// The seed corpus of a target, read from the committed fixtures under `root` (the repository) plus small
/// inputs generated here. Sorted and deterministic.
pub fn seeds(target: Target, root: &Path) -> Vec<(String, Vec<u8>)> {
    let fx = root.join("tests/fixtures");
    let mut out = match target {
        Target::Cifar => synthetic_cifar(),
        Target::Image => [
            read_dir_sorted(&fx.join("images"), &["png", "jpg", "jpeg"]),
            read_dir_sorted(&fx.join("hostile"), &["png", "jpg", "jpeg"]),
            synthetic_images(),
        ]
        .concat(),
        Target::Safetensors => [
            read_dir_sorted(&fx, &["safetensors"]),
            read_dir_sorted(&fx.join("pth"), &["safetensors"]),
            read_dir_sorted(&fx.join("tiny"), &["safetensors"]),
            synthetic_safetensors(),
        ]
        .concat(),
        Target::Pth => {
            [read_dir_sorted(&fx.join("pth"), &["pth"]), read_dir_sorted(&fx.join("tiny"), &["pth"]), synthetic_pth()]
                .concat()
        }
        Target::Recipe => [read_dir_sorted(&root.join("recipes"), &["toml"]), synthetic_recipes()].concat(),
        Target::Calibration => vec![
            (
                "gen/calibration-0".into(),
                br#"{"method":"minmax","images":256,"inputs":{"conv1":[0.0186,113],"layer1.0.conv1":[0.05,0]}}"#
                    .to_vec(),
            ),
            ("gen/calibration-1".into(), br#"{"method":"percentile","images":1,"inputs":{}}"#.to_vec()),
        ],
        Target::Tiff => read_dir_sorted(&fx.join("tiff"), &["tif", "tiff"]),
        Target::Idx => synthetic_idx(),
        Target::Report => synthetic_report(),
        Target::Dicom => read_dir_sorted(&fx.join("dicom"), &["dcm"]),
        Target::WeightsName => [
            "torchvision:resnet34",
            "torchvision:resnet50:IMAGENET1K_V1",
            "torchvision:resnet152:default",
            "https://download.pytorch.org/models/resnet18-f37072fd.pth",
            "http://127.0.0.1:8080/m/model.safetensors#sha256=0123456789abcdef",
            "https://host/a/b/my-model-0123abcd.v2.pth?x=1",
        ]
        .iter()
        .map(|s| (s.to_string(), s.as_bytes().to_vec()))
        .collect(),
    };
    out.retain(|(_, b)| b.len() <= MAX_INPUT);
    out
}

/// A short run's metrics lines (epochs, a gradient record, a note, a record of another kind) and an evaluation
/// record, including markup in the strings.
fn synthetic_report() -> Vec<(String, Vec<u8>)> {
    let metrics = concat!(
        r#"{"type":"epoch","epoch":1,"train_loss":2.1,"train_top1":0.3,"val_loss":1.9,"val_top1":0.4,"val_top5":0.9,"images_per_s":150.0,"lr":0.02,"skipped_steps":0,"seconds":9.5,"ema_val_loss":2.0,"ema_val_top1":0.35}"#,
        "\n",
        r#"{"type":"grad","step":5,"lr":0.01,"global_grad_norm":3.5,"layers":[{"name":"conv1.weight","grad_norm":1.5,"weight_norm":4.0,"update_ratio":0.001},{"name":"layer1.0.conv1.weight","grad_norm":0.5,"weight_norm":2.0,"update_ratio":0.002},{"name":"fc.weight","grad_norm":0.0,"weight_norm":1.0,"update_ratio":0.0}]}"#,
        "\n",
        r#"{"type":"note","step":7,"message":"epochs changed <b>"}"#,
        "\n",
        r#"{"type":"other","x":1}"#,
        "\n",
    );
    let evaluation = r#"{"epoch":2,"classes":["a","<b>"],"loss":0.5,"top1":0.75,"top5":1.0,"per_class":[1.0,0.5],"confusion":[[2,0],[1,1]]}"#;
    vec![
        ("metrics.jsonl".into(), metrics.as_bytes().to_vec()),
        ("evaluation.json".into(), evaluation.as_bytes().to_vec()),
    ]
}

/// Small IDX image and label files (one image of 2x2, three of 4x3, three labels, an empty set).
fn synthetic_idx() -> Vec<(String, Vec<u8>)> {
    let idx = |dims: &[u32], body: Vec<u8>| {
        let mut out = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            out.extend(d.to_be_bytes());
        }
        out.extend(body);
        out
    };
    vec![
        ("idx-one-2x2".into(), idx(&[1, 2, 2], vec![1, 2, 3, 4])),
        ("idx-three-4x3".into(), idx(&[3, 4, 3], (0..36).collect())),
        ("idx-labels".into(), idx(&[3], vec![0, 1, 9])),
        ("idx-empty".into(), idx(&[0, 28, 28], Vec::new())),
    ]
}

/// Every file directly in `dir`, sorted (extra seeds given to the `fuzz` binary).
pub fn seeds_from_dir(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .filter(|p| p.is_file())
        .filter_map(|p| Some((p.display().to_string(), std::fs::read(&p).ok()?)))
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Dictionaries: tokens worth inserting or overwriting with, per target

fn dictionary(target: Target) -> Vec<Vec<u8>> {
    let words: &[&[u8]] = match target {
        Target::Cifar => &[&[0], &[9], &[10], &[19], &[20], &[99], &[100], &[255]],
        Target::Image => &[
            b"\x89PNG\r\n\x1a\n",
            b"IHDR",
            b"IDAT",
            b"IEND",
            b"PLTE",
            b"tRNS",
            b"gAMA",
            b"iCCP",
            b"acTL",
            b"fcTL",
            b"\xff\xd8",
            b"\xff\xd9",
            b"\xff\xda",
            b"\xff\xc0",
            b"\xff\xc2",
            b"\xff\xc4",
            b"\xff\xdb",
            b"\xff\xdd",
            b"\xff\xe0",
            b"\xff\xe1",
            b"\xff\xee",
            b"\xff\xd0",
            b"\xff\x00",
            b"\xff\xff",
            b"Adobe",
            b"Exif\0\0",
            b"JFIF\0",
        ],
        Target::Safetensors => &[
            b"\"__metadata__\":{\"k\":\"v\"},",
            b"\"dtype\":\"F32\"",
            b"\"dtype\":\"F16\"",
            b"\"dtype\":\"BF16\"",
            b"\"dtype\":\"F64\"",
            b"\"dtype\":\"I64\"",
            b"\"dtype\":\"I32\"",
            b"\"dtype\":\"U8\"",
            b"\"dtype\":\"BOOL\"",
            b"\"dtype\":\"F8_E4M3\"",
            b"\"dtype\":\"F4\"",
            b"\"dtype\":\"C64\"",
            b"\"shape\":[]",
            b"\"shape\":[0]",
            b"\"shape\":[18446744073709551615,2]",
            b"\"shape\":[4294967296,4294967296]",
            b"\"data_offsets\":[0,0]",
            b"\"data_offsets\":[8,4]",
            b"\"data_offsets\":[0,18446744073709551615]",
            b"\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},",
            b"\\u0000",
            b"\\ud800",
            b"1e400",
            b"-1",
            b"[[[[[[[[[[",
            b"{}",
            b"null",
        ],
        Target::Pth => &[
            b"(",
            b")",
            b"}",
            b"]",
            b"t",
            b"R",
            b"s",
            b"u",
            b"e",
            b"a",
            b"b",
            b"N",
            b".",
            b"Q",
            b"\x85",
            b"\x86",
            b"\x87",
            b"\x88",
            b"\x89",
            b"\x94",
            b"K\x00",
            b"K\xff",
            b"M\xff\xff",
            b"J\xff\xff\xff\xff",
            b"J\xff\xff\xff\x7f",
            b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f",
            b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80",
            b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01",
            b"\x8a\x00",
            b"h\x00",
            b"h\x01",
            b"q\x00",
            b"q\x01",
            b"j\xff\xff\xff\xff",
            b"r\xff\xff\xff\xff",
            b"X\xff\xff\xff\xff",
            b"X\x00\x00\x00\x00",
            b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x8c\x07storage",
            b"\x8c\x03cpu",
            b"\x8c\x010",
            b"ctorch\nFloatStorage\n",
            b"ctorch\nHalfStorage\n",
            b"ctorch\nLongStorage\n",
            b"ctorch\nBoolStorage\n",
            b"ctorch._utils\n_rebuild_tensor_v2\n",
            b"ctorch._utils\n_rebuild_parameter\n",
            b"ccollections\nOrderedDict\n",
            b"cbuiltins\neval\n",
            b"\x8c\x05torch\x8c\x0cFloatStorage\x93",
            b"G\x7f\xf0\x00\x00\x00\x00\x00\x00",
            b"\x95\x10\x00\x00\x00\x00\x00\x00\x00",
            b"\x80\x02",
            b"\x80\x05",
            b"\x80\x06",
        ],
        Target::Tiff => &[
            b"II*\0",
            b"MM\0*",
            b"II+\0\x08\0\0\0",
            b"\x00\x01\x03\x00\x01\x00\x00\x00",
            b"\x01\x01\x04\x00\x01\x00\x00\x00",
            b"\x02\x01\x03\x00\x0d\x00\x00\x00",
            b"\x03\x01\x03\x00\x01\x00\x00\x00\x05\x00",
            b"\x03\x01\x03\x00\x01\x00\x00\x00\x08\x00",
            b"\x06\x01\x03\x00\x01\x00\x00\x00\x01\x00",
            b"\x15\x01\x03\x00\x01\x00\x00\x00\x0d\x00",
            b"\x1c\x01\x03\x00\x01\x00\x00\x00\x02\x00",
            b"\x16\x01\x04\x00\x01\x00\x00\x00",
            b"\x42\x01\x03\x00\x01\x00\x00\x00\x10\x00",
            b"\x53\x01\x03\x00\x01\x00\x00\x00\x03\x00",
            b"\xff\xff\xff\xff",
            b"\x00\x00\x00\x80",
        ],
        Target::Dicom => &[
            b"DICM",
            b"\x28\x00\x10\x00US\x02\x00",
            b"\x28\x00\x11\x00US\x02\x00",
            b"\x28\x00\x02\x00US\x02\x00",
            b"\x28\x00\x08\x00IS",
            b"\x28\x00\x50\x10DS",
            b"\x28\x00\x51\x10DS",
            b"\x28\x00\x52\x10DS",
            b"\x28\x00\x53\x10DS",
            b"\xe0\x7f\x10\x00OW\x00\x00",
            b"\xfe\xff\x00\xe0",
            b"\xff\xff\xff\xff",
            b"1.2.840.10008.1.2.5",
            b"1.2.840.10008.1.2.4.50",
            b"MONOCHROME1",
            b"YBR_FULL_422",
        ],
        Target::Report => &[
            b"{\"type\":\"epoch\",",
            b"{\"type\":\"grad\",",
            b"\"layers\":[",
            b"\"confusion\":[[",
            b"\"classes\":[",
            b"1e308",
            b"-1",
            b"NaN",
            b"null",
            b"<script>",
            b"\\u003c",
            b"\n",
        ],
        Target::Idx => {
            &[b"\0\0\x08\x03", b"\0\0\x08\x01", b"\0\0\x09\x03", b"\0\0\0\x1c", b"\xff\xff\xff\xff", b"\0\0\0\0"]
        }
        Target::WeightsName => &[
            b"torchvision:",
            b"resnet34",
            b":IMAGENET1K_V2",
            b"https://",
            b"http://",
            b"#sha256=",
            b"-b627a593.pth",
            b"?",
            b"/",
            b"..",
            b"%2e",
            b"\\",
            b"\0",
        ],
        Target::Calibration => &[
            b"\"method\"",
            b"\"minmax\"",
            b"\"percentile\"",
            b"\"images\"",
            b"\"inputs\"",
            b"\"conv1\":[",
            b"1e39",
            b"-0.0",
            b"NaN",
            b"255",
            b"256",
            b"-1",
            b"null",
        ],
        Target::Recipe => &[
            b"arch",
            b"stem",
            b"epochs",
            b"batch_size",
            b"lr",
            b"milestones",
            b"adam_betas",
            b"mean",
            b"std",
            b"data",
            b"seed",
            b"workers",
            b"image_size",
            b" = ",
            b"\n",
            b"[",
            b"]",
            b"{",
            b"}",
            b",",
            b"\"",
            b"'",
            b"\"\"\"",
            b"'''",
            b"\\u",
            b"\\U0010FFFF",
            b"\\",
            b"#",
            b"[table]",
            b"[[array]]",
            b"a.b.c = 1",
            b"nan",
            b"-inf",
            b"+inf",
            b"1e999",
            b"-0",
            b"0x7fffffffffffffff",
            b"0o777",
            b"0b1",
            b"1_000",
            b"9223372036854775808",
            b"-9223372036854775808",
            b"18446744073709551616",
            b"3.4028236e38",
            b"1979-05-27T07:32:00Z",
            b"07:32:00",
            b"true",
            b"false",
            b"{ a = 1 }",
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            b"{a={a={a={a={a={a={a={a={a={a={a={a=",
            b"\r\n",
            b"\t",
            b"\x00",
            b"\xef\xbb\xbf",
        ],
    };
    words.iter().map(|w| w.to_vec()).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Mutation

/// Interesting integers: zero, ones, signed and unsigned extremes, powers of two around common limits.
const INTERESTING: [u64; 24] = [
    0,
    1,
    2,
    3,
    7,
    8,
    0x10,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x3fff,
    0x4000,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x1000_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

#[derive(Clone)]
struct Entry {
    bytes: Vec<u8>,
    /// Archive entries, for zip-based inputs (the pth target): mutated and re-packed with valid CRCs.
    parts: Option<Vec<Part>>,
}

/// The coverage-free engine: picks a corpus entry, applies a stack of mutations. Inputs whose outcome class
/// (see `Outcome::class`) has not been seen before join the corpus, a cheap stand-in for coverage feedback.
pub struct Fuzzer {
    pub target: Target,
    corpus: Vec<Entry>,
    dict: Vec<Vec<u8>>,
    rng: Rng,
    seen: HashSet<String>,
    coarse: HashMap<String, usize>,
    pub seeds: usize,
    pub added: usize,
    /// The parts of the input last returned by `next_input`, if it was built from zip parts.
    last_parts: Option<Vec<Part>>,
    /// Whether to try resource-exhaustion inputs that need the `fuzz` binary's allocation cap (deflate bombs).
    pub bombs: bool,
    bomb_chunk: Option<Vec<u8>>,
    max_admit: usize,
    mean_ns: f64,
    slow_bar: Duration,
    /// Inputs that took more than `SLOW` to run, picked only while they have used under a quarter of the time.
    slow: Vec<Entry>,
    from_slow: bool,
    slow_ns: u64,
    total_ns: u64,
    pub slow_added: usize,
}

/// An input that runs longer than this goes to the slow pool.
const SLOW: Duration = Duration::from_millis(20);
/// The outcome feedback adds no input larger than this or than 5/4 of the largest seed, whichever is larger:
/// new outcomes are found on small inputs as well, and inputs grown large (amplified) are slow to mutate.
const MAX_ADMIT: usize = 256 << 10;
/// Slow inputs the time feedback may add.
const MAX_SLOW: usize = 32;

/// Zeros per deflate-bomb chunk (about 1 KiB compressed).
const BOMB_CHUNK: usize = 1 << 20;

impl Fuzzer {
    pub fn new(target: Target, root: &Path, seed: u64) -> Fuzzer {
        Fuzzer::with_seeds(target, seeds(target, root), seed)
    }

    /// A fuzzer over the given seed inputs.
    pub fn with_seeds(target: Target, seeds: Vec<(String, Vec<u8>)>, seed: u64) -> Fuzzer {
        let corpus: Vec<Entry> = seeds
            .into_iter()
            .map(|(_, bytes)| {
                let parts = if target == Target::Pth { zip_entries(&bytes) } else { None };
                Entry { bytes, parts }
            })
            .collect();
        assert!(!corpus.is_empty(), "no seeds for {} (are tests/fixtures there?)", target.name());
        let seeds = corpus.len();
        let max_admit = corpus.iter().map(|e| e.bytes.len() / 4 * 5).max().unwrap_or(0).max(MAX_ADMIT);
        Fuzzer {
            target,
            corpus,
            dict: dictionary(target),
            rng: Rng::new(seed),
            seen: HashSet::new(),
            coarse: HashMap::new(),
            seeds,
            added: 0,
            last_parts: None,
            bombs: false,
            bomb_chunk: None,
            max_admit,
            mean_ns: 0.0,
            slow_bar: Duration::ZERO,
            slow_added: 0,
            slow: Vec::new(),
            from_slow: false,
            slow_ns: 0,
            total_ns: 0,
        }
    }

    /// The outcome classes seen so far, sorted.
    pub fn classes(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.seen.iter().map(String::as_str).collect();
        v.sort();
        v
    }

    pub fn corpus_len(&self) -> usize {
        self.corpus.len() + self.slow.len()
    }

    /// Whether the input last returned by `next_input` holds a deflate bomb.
    pub fn last_was_bomb(&self) -> bool {
        self.last_parts.as_ref().is_some_and(|p| p.iter().any(|p| p.deflated.is_some()))
    }

    /// Stop making deflate bombs and forget corpus entries built from one (they are slow to run, and the
    /// finding they lead to is known once the worker has seen it).
    pub fn drop_bombs(&mut self) {
        self.bombs = false;
        let bomb = |e: &Entry| e.parts.as_ref().is_some_and(|p| p.iter().any(|p| p.deflated.is_some()));
        self.corpus.retain(|e| !bomb(e));
        self.slow.retain(|e| !bomb(e));
    }

    /// Tell the engine what the last input did; new outcome classes grow the corpus.
    ///
    /// With `elapsed` (the `fuzz` binary passes it; the deterministic regression sweep does not), inputs far
    /// slower than usual join the corpus too, each slower than the last, so that mutations can compound a
    /// resource problem (a longer key, then more repetitions of it) until the hang watchdog or the
    /// allocation cap sees it.
    pub fn feedback(&mut self, input: &[u8], outcome: &Outcome, elapsed: Option<Duration>) {
        if self.last_parts.as_ref().is_some_and(|p| p.iter().any(|p| p.deflated.is_some())) {
            return; // bombs are made fresh, never kept
        }
        if let Some(t) = elapsed {
            let ns = t.as_nanos() as f64;
            self.mean_ns = if self.mean_ns == 0.0 { ns } else { 0.999 * self.mean_ns + 0.001 * ns };
            self.total_ns = self.total_ns.saturating_add(t.as_nanos() as u64);
            if self.from_slow {
                self.slow_ns = self.slow_ns.saturating_add(t.as_nanos() as u64);
            }
            if self.slow_added < MAX_SLOW
                && ns > 20.0 * self.mean_ns
                && t > Duration::from_millis(2)
                && t > self.slow_bar
            {
                self.slow_bar = t.mul_f64(1.5);
                self.slow_added += 1;
                self.admit(input, elapsed);
                return;
            }
        }
        let class = outcome.class();
        // Messages that quote the input (an unknown global's name, a TOML key) would flood the corpus with
        // one check's variants: at most a few entries per coarse class.
        let coarse = coarse_class(&class);
        if self.added < MAX_ADDED
            && input.len() <= self.max_admit
            && self.coarse.get(&coarse).copied().unwrap_or(0) < PER_PREFIX
            && self.seen.insert(class)
        {
            *self.coarse.entry(coarse).or_default() += 1;
            self.admit(input, elapsed);
            self.added += 1;
        }
    }

    /// The next input: a corpus entry with 1..8 stacked mutations (sometimes a seed as is).
    pub fn next_input(&mut self) -> Vec<u8> {
        self.last_parts = None;
        // The slow pool gets at most a quarter of the time.
        self.from_slow = !self.slow.is_empty() && self.slow_ns < self.total_ns / 4 && self.rng.chance(1, 4);
        let entry = if self.from_slow {
            self.slow[self.rng.below(self.slow.len())].clone()
        } else if self.rng.chance(1, 4) {
            // the seeds themselves, a quarter of the time, however much the feedback has added
            self.corpus[self.rng.below(self.seeds)].clone()
        } else {
            self.corpus[self.rng.below(self.corpus.len())].clone()
        };
        if self.rng.chance(1, 200) {
            return entry.bytes;
        }
        let structured = self.rng.chance(1, 2);
        match self.target {
            Target::Pth if structured && entry.parts.is_some() => self.mutate_zip(entry),
            Target::Safetensors if structured => self.mutate_safetensors(entry),
            Target::Image if structured => self.mutate_image(entry),
            _ => {
                let mut data = entry.bytes;
                self.mutate_bytes(&mut data, false);
                data
            }
        }
    }

    /// Add an input to the corpus, or to the slow pool if it took long to run.
    fn admit(&mut self, input: &[u8], elapsed: Option<Duration>) {
        let entry = Entry { bytes: input.to_vec(), parts: self.last_parts.take() };
        if elapsed.is_some_and(|t| t > SLOW) {
            self.slow.push(entry);
        } else {
            self.corpus.push(entry);
        }
    }

    /// Generic byte-level mutations, stacked. `text` favours mutations of ASCII numbers and tokens.
    fn mutate_bytes(&mut self, data: &mut Vec<u8>, text: bool) {
        let rounds = self.rng.small(8);
        for _ in 0..rounds {
            let choice = self.rng.below(if text { 16 } else { 14 });
            match choice {
                0 => self.flip_bit(data),
                1 => self.set_byte(data),
                2 => self.insert_bytes(data),
                3 => self.delete_range(data),
                4 => self.truncate(data),
                5 => self.splice(data),
                6 | 7 => self.overwrite_int(data),
                8 => self.duplicate_block(data),
                9 | 10 => self.insert_token(data),
                11 => self.overwrite_token(data),
                12 => self.swap_blocks(data),
                13 => self.arith(data),
                _ => self.ascii_number(data),
            }
            if data.len() > MAX_INPUT {
                data.truncate(MAX_INPUT);
            }
        }
    }

    /// A position, biased to the first and last KiB where headers, directories and lengths live.
    fn pos(&mut self, len: usize) -> usize {
        if len == 0 {
            return 0;
        }
        match self.rng.below(10) {
            0..=3 => self.rng.below(len),
            4..=6 => self.rng.below(len.min(1024)),
            _ => len - 1 - self.rng.below(len.min(1024)),
        }
    }

    fn flip_bit(&mut self, d: &mut [u8]) {
        if !d.is_empty() {
            let p = self.pos(d.len());
            d[p] ^= 1 << self.rng.below(8);
        }
    }

    fn set_byte(&mut self, d: &mut [u8]) {
        if !d.is_empty() {
            let p = self.pos(d.len());
            let random = self.rng.next_u64() as u8;
            d[p] = *self.rng.pick(&[0, 0xff, 0x7f, 0x80, 1, random]);
        }
    }

    fn insert_bytes(&mut self, d: &mut Vec<u8>) {
        let p = self.pos(d.len() + 1).min(d.len());
        let n = if self.rng.chance(1, 8) { self.rng.below(4096) + 1 } else { self.rng.below(16) + 1 };
        let fill: Vec<u8> = if self.rng.chance(1, 2) {
            vec![self.rng.next_u64() as u8; n]
        } else {
            (0..n).map(|_| self.rng.next_u64() as u8).collect()
        };
        d.splice(p..p, fill);
    }

    fn delete_range(&mut self, d: &mut Vec<u8>) {
        if d.is_empty() {
            return;
        }
        let p = self.pos(d.len());
        let n = if self.rng.chance(1, 8) {
            self.rng.below(d.len() - p) + 1
        } else {
            (self.rng.below(16) + 1).min(d.len() - p)
        };
        d.drain(p..p + n);
    }

    fn truncate(&mut self, d: &mut Vec<u8>) {
        let len = d.len();
        let to = match self.rng.below(4) {
            0 => self.rng.below(len + 1),
            1 => len.saturating_sub(self.rng.below(16) + 1),
            2 => self.rng.below(len.min(64) + 1),
            _ => len / 2,
        };
        d.truncate(to);
    }

    /// Prefix of this input + suffix of another corpus entry, or a chunk of the other inserted here.
    fn splice(&mut self, d: &mut Vec<u8>) {
        let j = self.rng.below(self.corpus.len());
        let other = &self.corpus[j].bytes;
        if other.is_empty() {
            return;
        }
        let from = self.rng.below(other.len());
        let chunk: Vec<u8> = if self.rng.chance(1, 2) {
            other[from..].to_vec()
        } else {
            let n = (self.rng.below(256) + 1).min(other.len() - from);
            other[from..from + n].to_vec()
        };
        let at = self.pos(d.len() + 1).min(d.len());
        if self.rng.chance(1, 2) {
            d.truncate(at);
            d.extend_from_slice(&chunk);
        } else {
            d.splice(at..at, chunk);
        }
    }

    /// Overwrite 1, 2, 4 or 8 bytes with an interesting integer (or one near the input's length), in either
    /// byte order.
    fn overwrite_int(&mut self, d: &mut [u8]) {
        let width = *self.rng.pick(&[1usize, 2, 4, 8]);
        if d.len() < width {
            return;
        }
        let len = d.len() as u64;
        let v = match self.rng.below(4) {
            0 => len.wrapping_add(self.rng.below(9) as u64).wrapping_sub(4),
            1 => (*self.rng.pick(&INTERESTING)).wrapping_add(self.rng.below(3) as u64).wrapping_sub(1),
            2 => *self.rng.pick(&[3072, 3073, 3074, 16384, 16385, 1 << 28, 1 << 31]),
            _ => *self.rng.pick(&INTERESTING),
        };
        let p = self.pos(d.len() - width + 1).min(d.len() - width);
        let le = v.to_le_bytes();
        let be = v.to_be_bytes();
        if self.rng.chance(1, 2) {
            d[p..p + width].copy_from_slice(&le[..width]);
        } else {
            d[p..p + width].copy_from_slice(&be[8 - width..]);
        }
    }

    fn arith(&mut self, d: &mut [u8]) {
        if d.is_empty() {
            return;
        }
        let p = self.pos(d.len());
        let delta = self.rng.below(35) as u8;
        d[p] = if self.rng.chance(1, 2) { d[p].wrapping_add(delta) } else { d[p].wrapping_sub(delta) };
    }

    fn duplicate_block(&mut self, d: &mut Vec<u8>) {
        if d.is_empty() {
            return;
        }
        let p = self.pos(d.len());
        let n = (self.rng.below(64) + 1).min(d.len() - p);
        let block = d[p..p + n].to_vec();
        let times = self.rng.small(16);
        let at = self.pos(d.len() + 1).min(d.len());
        for _ in 0..times {
            d.splice(at..at, block.iter().copied());
        }
    }

    fn swap_blocks(&mut self, d: &mut [u8]) {
        if d.len() < 4 {
            return;
        }
        let n = (self.rng.below(32) + 1).min(d.len() / 2);
        let a = self.rng.below(d.len() - n + 1);
        let b = self.rng.below(d.len() - n + 1);
        if a + n <= b || b + n <= a {
            for k in 0..n {
                d.swap(a + k, b + k);
            }
        }
    }

    fn insert_token(&mut self, d: &mut Vec<u8>) {
        let w = self.rng.pick(&self.dict).clone();
        let p = self.pos(d.len() + 1).min(d.len());
        d.splice(p..p, w);
    }

    fn overwrite_token(&mut self, d: &mut [u8]) {
        let w = self.rng.pick(&self.dict).clone();
        if d.len() >= w.len() {
            let p = self.pos(d.len() - w.len() + 1).min(d.len() - w.len());
            d[p..p + w.len()].copy_from_slice(&w);
        }
    }

    /// Replace a run of ASCII digits with a boundary number (as text).
    fn ascii_number(&mut self, d: &mut Vec<u8>) {
        let starts: Vec<usize> =
            (0..d.len()).filter(|&i| d[i].is_ascii_digit() && (i == 0 || !d[i - 1].is_ascii_digit())).collect();
        if starts.is_empty() {
            return self.insert_token(d);
        }
        let s = *self.rng.pick(&starts);
        let e = (s..d.len()).find(|&i| !d[i].is_ascii_digit()).unwrap_or(d.len());
        let len = d.len() as u64;
        let n = match self.rng.below(5) {
            0 => len.wrapping_add(self.rng.below(9) as u64).wrapping_sub(4).to_string(),
            1 => (*self.rng.pick(&INTERESTING)).to_string(),
            2 => format!("-{}", self.rng.pick(&INTERESTING)),
            3 => "18446744073709551616".to_string(),
            _ => {
                let old: u64 = std::str::from_utf8(&d[s..e]).ok().and_then(|t| t.parse().ok()).unwrap_or(0);
                old.wrapping_add(self.rng.below(5) as u64).wrapping_sub(2).to_string()
            }
        };
        d.splice(s..e, n.into_bytes());
    }

    /// Pth: mutate one archive entry (mostly data.pkl, with pickle-aware edits), maybe rename, drop or add
    /// entries, or swap one for a deflate bomb, then re-pack with correct CRCs so the mutation reaches the
    /// unpickler and the tensor builder.
    fn mutate_zip(&mut self, src: Entry) -> Vec<u8> {
        let mut parts = src.parts.unwrap_or_default();
        if parts.is_empty() {
            return src.bytes;
        }
        if self.bombs && self.rng.chance(1, 64) {
            let k = self.rng.below(parts.len());
            self.bomb(&mut parts, k);
            let bytes = zip_pack(&parts);
            self.last_parts = Some(parts);
            return bytes;
        }
        let rounds = self.rng.small(4);
        for _ in 0..rounds {
            let pkl = parts.iter().position(|p| p.name.ends_with("data.pkl"));
            let k = match pkl {
                Some(p) if self.rng.chance(3, 4) => p,
                _ => self.rng.below(parts.len()),
            };
            match self.rng.below(13) {
                0 => {
                    // rename: drop or change the prefix, or point at another storage key
                    let name = &parts[k].name;
                    let new = match self.rng.below(4) {
                        0 => name.rsplit('/').next().unwrap_or("").to_string(),
                        1 => format!("x/{name}"),
                        2 => name.replace("data/", "data/1"),
                        _ => format!("{name}{}", self.rng.below(3)),
                    };
                    parts[k].name = new;
                }
                1 if parts.len() > 1 => {
                    parts.remove(k);
                }
                2 => {
                    let copy = parts[k].clone();
                    parts.push(copy);
                }
                3 => {
                    let v = self.rng.pick(&[&b"big"[..], b"little\n", b"", b"\xff"]).to_vec();
                    match parts.iter().position(|p| p.name.ends_with("byteorder")) {
                        Some(b) => parts[b].data = v,
                        None => parts.push(Part::stored("archive/byteorder", v)),
                    }
                }
                4..=7 if pkl == Some(k) => self.mutate_pickle(&mut parts[k].data),
                _ => {
                    let mut data = std::mem::take(&mut parts[k].data);
                    self.mutate_bytes(&mut data, false);
                    parts[k].data = data;
                }
            }
        }
        let bytes = zip_pack(&parts);
        self.last_parts = Some(parts);
        bytes
    }

    /// Deflate bombs: a few MB that inflate to 2-4 GiB in all (torch never compresses, but a re-zipped
    /// checkpoint is Deflated and must load, so the loader inflates what it is given). One entry, or many
    /// storages each inflating to a share: a per-entry limit relative to the archive's size does not stop the
    /// second kind.
    fn bomb(&mut self, parts: &mut [Part], k: usize) {
        let chunk = self.bomb_chunk.get_or_insert_with(|| deflate_zeros_chunk(BOMB_CHUNK)).clone();
        let storages: Vec<usize> = (0..parts.len()).filter(|&j| parts[j].name.contains("/data/")).collect();
        let victims = if storages.len() > 1 && self.rng.chance(3, 4) {
            let n = match self.rng.below(3) {
                0 => storages.len(),
                1 => storages.len() / 2 + 1,
                _ => 1 + self.rng.below(storages.len()),
            };
            storages[storages.len() - n..].to_vec()
        } else {
            vec![k]
        };
        let total = (2usize << 30) + self.rng.below(1500) * BOMB_CHUNK;
        let copies = (total / victims.len() / BOMB_CHUNK).max(1);
        let size = (copies * BOMB_CHUNK).min(u32::MAX as usize) as u32;
        let declared = if self.rng.chance(1, 8) { u32::MAX } else { size };
        // the right CRC, so that the reader does not stop at the first entry's end
        let crc = if self.rng.chance(7, 8) { zeros_crc(copies * BOMB_CHUNK) } else { 0 };
        let bomb = deflate_bomb(&chunk, copies);
        if bomb.len() * victims.len() < MAX_INPUT {
            for &j in &victims {
                parts[j].data = bomb.clone();
                parts[j].deflated = Some((declared, crc));
            }
        }
    }

    /// Pickle-aware edits: change integer arguments, drop, repeat or swap whole opcodes, insert opcodes from
    /// the dictionary at opcode boundaries.
    fn mutate_pickle(&mut self, p: &mut Vec<u8>) {
        let ops = pickle_ops(p);
        if ops.is_empty() {
            return self.mutate_bytes(p, false);
        }
        let &(at, end, op) = self.rng.pick(&ops);
        match self.rng.below(8) {
            6 => {
                // amplification: repeat a run of opcodes many times
                let k = ops.iter().position(|o| o.0 == at).unwrap_or(0);
                let last = (k + self.rng.below(4)).min(ops.len() - 1);
                let run = p[at..ops[last].1].to_vec();
                let times = *self.rng.pick(&[10usize, 100, 1000, 10_000, 100_000, 1 << 22]);
                let times = times.min((MAX_INPUT / 2) / run.len().max(1));
                let tail = p.split_off(ops[last].1);
                for _ in 0..times {
                    p.extend_from_slice(&run);
                }
                p.extend_from_slice(&tail);
            }
            7 => {
                // a long string in place of a short one
                let strings: Vec<_> = ops.iter().filter(|o| matches!(o.2, 0x8c | b'X')).collect();
                if let Some(&&(s, e, _)) = (!strings.is_empty()).then(|| self.rng.pick(&strings)) {
                    let n = *self.rng.pick(&[255usize, 4096, 65536, 1 << 20]);
                    let mut enc = vec![b'X'];
                    enc.extend_from_slice(&(n as u32).to_le_bytes());
                    enc.extend(std::iter::repeat_n(b'k', n));
                    p.splice(s..e, enc);
                }
            }
            0 | 1 => {
                // an integer opcode (or any opcode) becomes an interesting integer
                let target = ops.iter().filter(|o| matches!(o.2, b'K' | b'M' | b'J' | 0x8a)).collect::<Vec<_>>();
                let &(s, e, _) =
                    if target.is_empty() { &ops[self.rng.below(ops.len())] } else { *self.rng.pick(&target) };
                let v = match self.rng.below(3) {
                    0 => *self.rng.pick(&INTERESTING) as i64,
                    1 => (self.rng.below(20) as i64) - 2,
                    _ => -(*self.rng.pick(&INTERESTING) as i64),
                };
                let mut enc = Vec::new();
                if self.rng.chance(1, 3) {
                    enc.push(b'J');
                    enc.extend_from_slice(&(v as i32).to_le_bytes());
                } else {
                    pkl_int(&mut enc, v);
                }
                p.splice(s..e, enc);
            }
            2 => {
                p.drain(at..end);
            }
            3 => {
                let copy = p[at..end].to_vec();
                let n = self.rng.small(1000);
                for _ in 0..n {
                    p.splice(end..end, copy.iter().copied());
                }
            }
            4 => {
                let w = self.rng.pick(&self.dict).clone();
                let pos = if self.rng.chance(1, 2) { at } else { end };
                p.splice(pos..pos, w);
            }
            _ => {
                let &(a2, e2, _) = self.rng.pick(&ops);
                if e2 <= at {
                    let second = p[at..end].to_vec();
                    let first = p[a2..e2].to_vec();
                    p.splice(at..end, first);
                    p.splice(a2..e2, second);
                }
            }
        }
        let _ = op;
    }

    /// Safetensors: mutate the JSON header as text and (mostly) fix the length prefix to match, or the data.
    fn mutate_safetensors(&mut self, entry: Entry) -> Vec<u8> {
        let src = &entry.bytes;
        let n = src.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize);
        if src.len() < 8 || n > src.len() - 8 {
            let mut d = src.clone();
            self.mutate_bytes(&mut d, true);
            return d;
        }
        let mut header = src[8..8 + n].to_vec();
        let mut data = src[8 + n..].to_vec();
        if self.rng.chance(4, 5) {
            self.mutate_bytes(&mut header, true);
        } else {
            self.mutate_bytes(&mut data, false);
        }
        let len = if self.rng.chance(9, 10) { header.len() as u64 } else { n as u64 };
        let mut out = len.to_le_bytes().to_vec();
        out.extend_from_slice(&header);
        out.extend_from_slice(&data);
        out
    }

    /// Images: PNG chunk edits with recomputed CRCs (IHDR fields above all), freshly synthesised PNGs with any
    /// header, or JPEG frame-header edits; else plain byte mutations.
    fn mutate_image(&mut self, entry: Entry) -> Vec<u8> {
        let src = entry.bytes;
        if self.rng.chance(1, 6) {
            return self.synth_png();
        }
        if let Some(mut chunks) = png_chunks(&src) {
            let rounds = self.rng.small(3);
            for _ in 0..rounds {
                if chunks.is_empty() {
                    break;
                }
                let k = if self.rng.chance(1, 2) { 0 } else { self.rng.below(chunks.len()) };
                match self.rng.below(5) {
                    0 => {
                        chunks.remove(k);
                    }
                    1 => {
                        let c = chunks[k].clone();
                        chunks.insert(self.rng.below(chunks.len() + 1), c);
                    }
                    2 if &chunks[k].0 == b"IHDR" && chunks[k].1.len() >= 13 => {
                        let d = &mut chunks[k].1;
                        match self.rng.below(5) {
                            0 => d[8] = *self.rng.pick(&[1, 2, 4, 8, 16, 0, 3, 32]),
                            1 => d[9] = *self.rng.pick(&[0, 2, 3, 4, 6, 1, 5, 7]),
                            2 => d[12] = self.rng.below(3) as u8,
                            _ => {
                                let v = *self.rng.pick(&[
                                    0u32,
                                    1,
                                    2,
                                    3,
                                    7,
                                    8,
                                    9,
                                    255,
                                    256,
                                    16384,
                                    16385,
                                    65535,
                                    1 << 24,
                                    1 << 31,
                                    u32::MAX,
                                ]);
                                let off = if self.rng.chance(1, 2) { 0 } else { 4 };
                                d[off..off + 4].copy_from_slice(&v.to_be_bytes());
                            }
                        }
                    }
                    _ => {
                        let mut d = std::mem::take(&mut chunks[k].1);
                        self.mutate_bytes(&mut d, false);
                        chunks[k].1 = d;
                    }
                }
            }
            return png_from_chunks(&chunks);
        }
        let mut d = src;
        // JPEG: rewrite a frame header (SOFn: FF Cx len P H W Nf ...)
        let sofs: Vec<usize> = (0..d.len().saturating_sub(9))
            .filter(|&k| d[k] == 0xff && matches!(d[k + 1], 0xc0..=0xc3 | 0xc5..=0xc7 | 0xc9..=0xcb | 0xcd..=0xcf))
            .collect();
        if !sofs.is_empty() && self.rng.chance(1, 2) {
            let k = *self.rng.pick(&sofs);
            let dims = [0u16, 1, 2, 7, 8, 9, 15, 16, 17, 255, 256, 4096, 16383, 16384, 16385, 65535];
            match self.rng.below(4) {
                0 => d[k + 4] = *self.rng.pick(&[8, 12, 16, 0, 1]),
                1 => d[k + 5..k + 7].copy_from_slice(&self.rng.pick(&dims).to_be_bytes()),
                2 => d[k + 7..k + 9].copy_from_slice(&self.rng.pick(&dims).to_be_bytes()),
                _ => d[k + 9] = *self.rng.pick(&[0, 1, 2, 3, 4, 5, 255]),
            }
            if self.rng.chance(1, 2) {
                return d;
            }
        }
        self.mutate_bytes(&mut d, false);
        d
    }

    /// A PNG with random header fields and plausible-length scanline data.
    fn synth_png(&mut self) -> Vec<u8> {
        let dims = [1u32, 2, 3, 5, 8, 13, 31, 64, 257];
        let (w, h) = (*self.rng.pick(&dims), *self.rng.pick(&dims));
        let color = *self.rng.pick(&[0u8, 2, 3, 4, 6]);
        let depth = match color {
            0 => *self.rng.pick(&[1u8, 2, 4, 8, 16]),
            3 => *self.rng.pick(&[1u8, 2, 4, 8]),
            _ => *self.rng.pick(&[8u8, 16]),
        };
        let interlace = u8::from(self.rng.chance(1, 4));
        let mut len = (png_row_bytes(w, depth, color) + 1) * h as usize;
        if interlace == 1 {
            len += 7 * h as usize;
        }
        match self.rng.below(4) {
            0 => len = len.saturating_sub(self.rng.below(8) + 1),
            1 => len += self.rng.below(8) + 1,
            _ => {}
        }
        let raw: Vec<u8> = (0..len).map(|_| self.rng.next_u64() as u8).collect();
        let mut raw = raw;
        if interlace == 0 {
            let row = png_row_bytes(w, depth, color) + 1;
            for r in (0..raw.len()).step_by(row) {
                raw[r] %= 5; // valid filter types most of the time
            }
        }
        let entries = 1 + self.rng.below(if depth <= 8 { 1 << depth.min(8) } else { 256 });
        let plte: Vec<u8> = (0..entries * 3).map(|_| self.rng.next_u64() as u8).collect();
        let plte = (color == 3 || self.rng.chance(1, 8)).then_some(&plte[..]);
        let trns_len = self.rng.below(8);
        let trns: Vec<u8> = (0..trns_len).map(|_| self.rng.next_u64() as u8).collect();
        let trns = self.rng.chance(1, 4).then_some(&trns[..]);
        make_png(w, h, depth, color, interlace, plte, trns, &raw)
    }
}

/// The gist of an outcome class: its tag and the first words of its last `: `-separated part among the first
/// 100 characters, which skips the constant context ("fuzz.safetensors: not a valid safetensors file: invalid JSON
/// in header: ") and the quoted input ("refusing to load global XYZ: ").
fn coarse_class(class: &str) -> String {
    let head: String = class.chars().take(100).collect();
    let tag = head.split(':').next().unwrap_or("");
    let tail = head.rsplit(": ").next().unwrap_or(&head);
    let words: Vec<&str> = tail.split_whitespace().take(COARSE_WORDS).collect();
    format!("{tag}:{}", words.join(" "))
}

/// Opcode boundaries of a pickle: (start, end, opcode) for each opcode whose length is known, stopping at the
/// first unknown one.
fn pickle_ops(p: &[u8]) -> Vec<(usize, usize, u8)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        let op = p[i];
        let arg = match op {
            b'K' | b'h' | b'q' | 0x80 => Some(1),
            b'M' => Some(2),
            b'J' | b'j' | b'r' => Some(4),
            b'G' | 0x95 => Some(8),
            0x8a => p.get(i + 1).map(|&n| 1 + n as usize),
            0x8c => p.get(i + 1).map(|&n| 1 + n as usize),
            b'X' => p.get(i + 1..i + 5).map(|b| 4 + u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize),
            b'c' => {
                let nl1 = p[i + 1..].iter().position(|&b| b == b'\n');
                nl1.and_then(|a| p[i + 2 + a..].iter().position(|&b| b == b'\n').map(|b| a + b + 2))
            }
            b'(' | b')' | b'}' | b']' | b't' | b'R' | b's' | b'u' | b'e' | b'a' | b'b' | b'N' | b'.' | b'Q' | 0x85
            | 0x86 | 0x87 | 0x88 | 0x89 | 0x93 | 0x94 => Some(0),
            _ => None,
        };
        let Some(arg) = arg else { break };
        let end = i + 1 + arg;
        if end > p.len() {
            break;
        }
        out.push((i, end, op));
        i = end;
    }
    out
}

/// What a deterministic sweep did.
pub struct Sweep {
    /// Inputs that panicked, with the panic message.
    pub failures: Vec<(Vec<u8>, String)>,
    /// Inputs not run because `skip` named them (known, not yet fixed bugs).
    pub skipped: usize,
    pub accepted: usize,
    pub rejected: usize,
}

/// Run `count` deterministic mutations of `target` through the harness, catching panics. Inputs for which
/// `skip` returns true are generated but not run. Used by the regression test; the `fuzz` binary has its own
/// loop (with allocation cap, watchdog and time feedback).
pub fn sweep(target: Target, root: &Path, seed: u64, count: usize, skip: &dyn Fn(&[u8]) -> bool) -> Sweep {
    let scratch = Scratch::new();
    let mut fuzzer = Fuzzer::new(target, root, seed);
    let mut out = Sweep { failures: Vec::new(), skipped: 0, accepted: 0, rejected: 0 };
    for _ in 0..count {
        let input = fuzzer.next_input();
        if skip(&input) {
            out.skipped += 1;
            continue;
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(target, &input, &scratch))) {
            Ok(outcome) => {
                match outcome {
                    Outcome::Accepted(_) => out.accepted += 1,
                    Outcome::Rejected(_) => out.rejected += 1,
                }
                fuzzer.feedback(&input, &outcome, None);
            }
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "non-string panic".into());
                out.failures.push((input, msg));
            }
        }
    }
    out
}
