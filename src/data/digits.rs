//! scikit-learn's 8x8 handwritten digits (`sklearn.datasets.load_digits()`), bundled in the binary.
//!
//! 1,797 images of 10 classes. The asset `assets/digits/digits.csv.gz` is scikit-learn's own file, byte for
//! byte (see `assets/digits/LICENSE.txt` for its origin and licence): one row per image, the 64 pixel values
//! 0..16 in row-major order, then the label. Sample `i` is row `i`, so `Digits::load().get(i)` is
//! `load_digits().images[i]` / `load_digits().target[i]`.
//!
//! Images are 8x8 RGB with the grey value `round(v * 255 / 16)` (computed as `(v * 255 + 8) / 16` in
//! integers; no value 0..16 lands on a tie other than 8, which gives 128 with either rounding rule) in all
//! three channels.

use std::io::Read;
use std::sync::Arc;

use super::Dataset;
use super::split::split_dataset;
use crate::error::{Error, Result};
use crate::imaging::{Image, Samples};

/// Where the bundled file comes from, for error messages.
const ASSET_PATH: &str = "assets/digits/digits.csv.gz";
const ASSET: &[u8] = include_bytes!("../../assets/digits/digits.csv.gz");

/// Images in the bundled file.
pub const DIGITS_LEN: usize = 1797;
/// Side of the square images.
pub const DIGITS_SIDE: u32 = 8;

/// The digits dataset (cheap to clone: the samples are shared).
#[derive(Clone, Debug)]
pub struct Digits {
    /// 64 pixel values 0..16 per sample, row-major.
    pixels: Arc<Vec<[u8; 64]>>,
    labels: Arc<Vec<u8>>,
}

impl Digits {
    /// Decode the bundled copy.
    pub fn load() -> Result<Digits> {
        Self::parse_gzip(ASSET).map_err(|e| e.in_file(ASSET_PATH))
    }

    /// Parse a gzip-compressed CSV in scikit-learn's digits layout (65 integers per row: 64 pixels in 0..16,
    /// then a label in 0..9). Errors are `Error::Invalid`; attach the file with `Error::in_file`.
    pub fn parse_gzip(bytes: &[u8]) -> Result<Digits> {
        // 1 MiB is four times what the real file inflates to; a bigger one is not this dataset.
        const LIMIT: u64 = 1 << 20;
        let mut text = String::new();
        flate2::read::GzDecoder::new(bytes)
            .take(LIMIT + 1)
            .read_to_string(&mut text)
            .map_err(|e| Error::invalid(format!("cannot decompress the digits CSV: {e}")))?;
        if text.len() as u64 > LIMIT {
            return Err(Error::invalid(format!("the digits CSV inflates to more than {LIMIT} bytes")));
        }
        Self::parse_csv(&text)
    }

    /// Parse the uncompressed CSV text (see `parse_gzip`).
    pub fn parse_csv(text: &str) -> Result<Digits> {
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        for (row, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let bad = |what: String| Error::invalid(format!("digits CSV line {}: {what}", row + 1));
            let mut values = [0u8; 65];
            let mut count = 0;
            for field in line.split(',') {
                let field = field.trim();
                // numpy.loadtxt reads floats; accept "3" and "3.0" alike, but only whole numbers.
                let v: f64 = field.parse().map_err(|_| bad(format!("{field:?} is not a number")))?;
                let limit = if count == 64 { 9.0 } else { 16.0 };
                if !(v.fract() == 0.0 && (0.0..=limit).contains(&v)) {
                    return Err(bad(format!("value {field} is not an integer in 0..={limit} (column {})", count + 1)));
                }
                if count < 65 {
                    values[count] = v as u8;
                }
                count += 1;
            }
            if count != 65 {
                return Err(bad(format!("{count} values, expected 65 (64 pixels and a label)")));
            }
            let mut px = [0u8; 64];
            px.copy_from_slice(&values[..64]);
            pixels.push(px);
            labels.push(values[64]);
        }
        if pixels.is_empty() {
            return Err(Error::invalid("the digits CSV has no rows"));
        }
        Ok(Digits { pixels: Arc::new(pixels), labels: Arc::new(labels) })
    }

    /// The raw pixel values 0..16 of sample `i`, row-major (`load_digits().data[i]`), or None past the end.
    pub fn raw(&self, i: usize) -> Option<&[u8; 64]> {
        self.pixels.get(i)
    }

    /// All labels, in sample order (`load_digits().target`).
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// Seeded (train, test) split, **not stratified**: `python/digits_split.py` computes the same indices.
    ///
    /// The algorithm (a SplitMix64-driven Fisher-Yates permutation; the first
    /// `floor(len * test_fraction + 0.5)` permuted indices, sorted, are the test set and the rest, sorted, the
    /// training set) is documented in `crate::data::split`. Sample `k` of each part is the `k`-th smallest
    /// original index in it.
    pub fn split(&self, test_fraction: f32, seed: u64) -> (Arc<dyn Dataset>, Arc<dyn Dataset>) {
        split_dataset(Arc::new(self.clone()), test_fraction, seed)
    }
}

/// Grey level of a digits value 0..16: round(v * 255 / 16).
pub fn grey_level(v: u8) -> u8 {
    ((u16::from(v.min(16)) * 255 + 8) / 16) as u8
}

impl Dataset for Digits {
    fn len(&self) -> usize {
        self.pixels.len()
    }

    fn num_classes(&self) -> usize {
        10
    }

    fn class_names(&self) -> Vec<String> {
        (0..10).map(|d| d.to_string()).collect()
    }

    fn get(&self, i: usize) -> Result<(Image, usize)> {
        let (Some(px), Some(&label)) = (self.pixels.get(i), self.labels.get(i)) else {
            return Err(Error::invalid(format!("digits sample {i} is out of range ({} samples)", self.len())));
        };
        let grey = Samples::U8(px.iter().map(|&v| grey_level(v)).collect());
        Ok((Image::new(DIGITS_SIDE, DIGITS_SIDE, 1, grey)?, usize::from(label)))
    }
}
