//! Seeded splits and subsets, with an algorithm simple enough to be restated exactly in Python.
//!
//! # The split algorithm
//!
//! `split_indices(n, fraction, seed)` (used by `Digits::split`; `ImageFolder::split` stratifies it per class
//! with `stratified_split_indices`) is a plain, **not stratified**, shuffle split:
//!
//! 1. A SplitMix64 generator starts from `state = seed`. Each draw does, in wrapping 64-bit arithmetic:
//!    `state += 0x9E3779B97F4A7C15; z = state; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
//!    z = (z ^ (z >> 27)) * 0x94D049BB133111EB; return z ^ (z >> 31)`.
//! 2. Fisher-Yates from the end: `perm = [0, 1, ..., n-1]`; for `i` from `n-1` down to `1`:
//!    `j = draw() % (i + 1)`; swap `perm[i]` and `perm[j]`. (The modulo bias is below n/2^64.)
//! 3. The fraction is clamped to [0, 1] (NaN counts as 0) and rounded to f32 (the Rust argument type);
//!    the held-out count is `k = floor(n * f64(fraction) + 0.5)`, computed in f64.
//! 4. Held-out indices = `sorted(perm[..k])`, the rest = `sorted(perm[k..])`.
//!
//! `python/digits_split.py` implements exactly this; `tests/data_digits.rs` checks the Rust side against
//! indices computed there.

use std::sync::Arc;

use super::Dataset;
use crate::error::{Error, Result};
use crate::imaging::Image;

/// The SplitMix64 generator (Steele, Lea & Flood 2014), the one the split algorithm above draws from.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// Next 64-bit output.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }
}

/// SplitMix64's output function (a bijective 64-bit mixer).
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded permutation of `0..n`: Fisher-Yates from the end over SplitMix64 draws (see the module docs).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    for i in (1..n).rev() {
        // i + 1 <= n fits in u64, and the remainder is below i + 1, so both casts are exact.
        let j = (rng.next() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

/// How many of `n` samples a fraction holds out: `floor(n * f64(fraction) + 0.5)` with the fraction clamped
/// to [0, 1] and NaN taken as 0.
pub fn held_out_count(n: usize, fraction: f32) -> usize {
    let f = if fraction.is_nan() { 0.0 } else { fraction.clamp(0.0, 1.0) };
    ((n as f64 * f64::from(f) + 0.5).floor() as usize).min(n)
}

/// The (kept, held-out) indices of `0..n`, each sorted ascending; see the module docs for the algorithm.
pub fn split_indices(n: usize, fraction: f32, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let perm = permutation(n, seed);
    let k = held_out_count(n, fraction);
    let mut held_out = perm[..k].to_vec();
    let mut kept = perm[k..].to_vec();
    held_out.sort_unstable();
    kept.sort_unstable();
    (kept, held_out)
}

/// The stratified split of samples labelled `labels` (ImageFolder's): the same seeded permutation as
/// `split_indices`, walked in order, holds out the first `held_out_count(n_c, fraction)` samples of each class
/// c, and at least one of every class that has two or more samples when the fraction is above 0, so that
/// every class is measured. Returns (kept, held-out), each sorted ascending.
pub fn stratified_split_indices(labels: &[usize], fraction: f32, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let classes = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut count = vec![0usize; classes];
    for &l in labels {
        count[l] += 1;
    }
    let want: Vec<usize> = count
        .iter()
        .map(|&n| {
            let k = held_out_count(n, fraction);
            if k == 0 && n >= 2 && fraction > 0.0 { 1 } else { k }
        })
        .collect();
    let mut taken = vec![0usize; classes];
    let (mut kept, mut held_out) = (Vec::new(), Vec::new());
    for i in permutation(labels.len(), seed) {
        let c = labels[i];
        if taken[c] < want[c] {
            taken[c] += 1;
            held_out.push(i);
        } else {
            kept.push(i);
        }
    }
    held_out.sort_unstable();
    kept.sort_unstable();
    (kept, held_out)
}

/// Split a dataset into (kept, held-out) subsets at the given indices.
pub fn subsets(
    base: Arc<dyn Dataset>,
    (kept, held_out): (Vec<usize>, Vec<usize>),
) -> (Arc<dyn Dataset>, Arc<dyn Dataset>) {
    let subset = |indices| -> Arc<dyn Dataset> { Arc::new(Subset { base: base.clone(), indices }) };
    (subset(kept), subset(held_out))
}

/// Split a dataset into (kept, held-out) subsets with `split_indices`.
pub fn split_dataset(base: Arc<dyn Dataset>, fraction: f32, seed: u64) -> (Arc<dyn Dataset>, Arc<dyn Dataset>) {
    let indices = split_indices(base.len(), fraction, seed);
    subsets(base, indices)
}

/// The samples of `base` at `indices`, in that order (sample `i` of the subset is `base[indices[i]]`).
pub struct Subset {
    base: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    /// Fails when an index is out of range.
    pub fn new(base: Arc<dyn Dataset>, indices: Vec<usize>) -> Result<Subset> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= base.len()) {
            return Err(Error::invalid(format!(
                "subset index {bad} is out of range for a dataset of {} samples",
                base.len()
            )));
        }
        Ok(Subset { base, indices })
    }

    /// The indices into the underlying dataset.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    /// The underlying dataset.
    pub fn base(&self) -> &Arc<dyn Dataset> {
        &self.base
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn num_classes(&self) -> usize {
        self.base.num_classes()
    }

    fn class_names(&self) -> Vec<String> {
        self.base.class_names()
    }

    fn source(&self, i: usize) -> String {
        self.indices.get(i).map_or_else(|| format!("#{i}"), |&j| self.base.source(j))
    }

    fn get(&self, i: usize) -> Result<(Image, usize)> {
        let &j = self
            .indices
            .get(i)
            .ok_or_else(|| Error::invalid(format!("sample {i} is out of range for a subset of {}", self.len())))?;
        self.base.get(j)
    }
}
