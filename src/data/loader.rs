//! The training loader: batches of decoded, augmented and mixed samples, built on background threads.
//!
//! # Determinism
//!
//! Everything random derives from the seed, never from thread timing:
//! - the epoch's order is `split::permutation(len, key(seed, "order", epoch))` (or `0..len` without
//!   shuffling);
//! - sample `i` of the dataset is augmented with `Xoshiro256PlusPlus::seed_from_u64(key(seed, "sample",
//!   epoch, i))`, whatever batch or worker it lands in;
//! - batch `b` of the epoch is mixed with `Xoshiro256PlusPlus::seed_from_u64(key(seed, "mix", epoch, b))`.
//!
//! (`key` chains SplitMix64's mixer over its arguments.) So a pass gives the same batches for any number of
//! workers, and `skip_batches = k` gives exactly batches `k..` of the full pass (resuming mid-epoch).
//!
//! # Threads
//!
//! With `workers` = 0 every batch is built on the caller's thread when it is asked for. Otherwise `workers`
//! threads build whole batches (batch `b` by whichever worker takes it), at most `workers + 2` batches
//! ahead of the one the caller is waiting for, and the iterator hands them out in order. The first error
//! (a sample that fails to load, a bad label, images of different sizes in one batch, a panic in a worker)
//! is returned in its batch's place and ends the iteration; dropping the iterator stops and joins the
//! workers, which finish at most the sample each is working on.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;

use super::Dataset;
use super::split::{mix64, permutation};
use super::transforms::{BatchMix, Pipeline};
use crate::engine::{Tensor, one_hot};
use crate::error::{Error, Result};

/// How to batch a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Samples per batch (the last batch may be smaller unless `drop_last`).
    pub batch_size: usize,
    /// Shuffle the order each epoch (from `seed` and the epoch number).
    pub shuffle: bool,
    /// Leave out a last, incomplete batch.
    pub drop_last: bool,
    /// Background threads building batches; 0 builds them on the caller's thread.
    pub workers: usize,
    /// Seed of the order, the augmentation and the mixing.
    pub seed: u64,
    /// This process's part of each epoch (data-parallel training); `Shard::WHOLE` for all of it.
    pub shard: Shard,
}

/// Rank `rank` of `world`'s part of an epoch. As PyTorch's `DistributedSampler`: the epoch's order (the same
/// seeded shuffle on every rank) padded with its own first indices to a multiple of `world`, every rank the
/// same number of samples, each sample with the augmentation of its dataset index, so a run is reproducible
/// for any world size. Unlike it, the padded order is cut into steps of `world`·batch samples and rank r takes
/// the r-th run of `batch` of each (of the last, shorter step, the r-th `world`-th) rather than every
/// `world`-th sample: a step's batches, rank after rank, are then one process's batch of `world`·batch in its
/// order, whose gradient sums split where the ranks' do (`engine::cpu::batch_sum`), so 2 ranks of 32 train bit
/// for bit as one process of 64. Either way, k steps take the first k·batch·`world` samples of the order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };

    /// Samples of this shard in a pass over `len`.
    pub fn len(&self, len: usize) -> usize {
        if self.world <= 1 { len } else { len.div_ceil(self.world) }
    }

    /// This shard of a pass's `order`, cut in steps of `batch` samples per rank.
    pub fn of(&self, order: Vec<usize>, batch: usize) -> Vec<usize> {
        if self.world <= 1 || order.is_empty() {
            return order;
        }
        let total = order.len().div_ceil(self.world) * self.world;
        let padded: Vec<usize> = order.iter().cycle().take(total).copied().collect();
        padded
            .chunks(batch.max(1) * self.world)
            .flat_map(|step| {
                let per_rank = step.len() / self.world;
                step[self.rank * per_rank..(self.rank + 1) * per_rank].iter().copied()
            })
            .collect()
    }
}

/// One batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `[N, C, H, W]`, normalised (and mixed, when a `BatchMix` is given).
    pub images: Tensor,
    /// `[N, C]` target distributions (one-hot, smoothed or mixed); each row sums to 1.
    pub targets: Tensor,
    /// The samples' own labels (before mixing).
    pub labels: Vec<usize>,
}

/// Batches in a pass over `len` samples (this shard's part of them): `len / batch_size`, rounded up unless
/// `drop_last` (0 for a batch size of 0).
pub fn num_batches(len: usize, cfg: &LoaderConfig) -> usize {
    let len = cfg.shard.len(len);
    match cfg.batch_size {
        0 => 0,
        bs if cfg.drop_last => len / bs,
        bs => len.div_ceil(bs),
    }
}

/// Stream names of the seed derivation.
const ORDER: u64 = 1;
const SAMPLE: u64 = 2;
const MIX: u64 = 3;

/// A 64-bit key from the seed and a few numbers: SplitMix64's mixer chained over them.
fn key(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(mix64(seed ^ 0x6A09_E667_F3BC_C908), |h, &p| {
        mix64(h.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(mix64(p)))
    })
}

/// The augmentation RNG of dataset sample `index` in `epoch`.
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(key(seed, &[SAMPLE, epoch, index as u64]))
}

/// The mixing RNG of batch `batch` in `epoch`.
pub fn mix_rng(seed: u64, epoch: u64, batch: usize) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(key(seed, &[MIX, epoch, batch as u64]))
}

/// The dataset indices of a pass, in order (this shard's, for data-parallel training).
pub fn epoch_order(len: usize, cfg: &LoaderConfig, epoch: u64) -> Vec<usize> {
    let order = if cfg.shuffle { permutation(len, key(cfg.seed, &[ORDER, epoch])) } else { (0..len).collect() };
    cfg.shard.of(order, cfg.batch_size)
}

/// Iterate over the batches of one pass (`epoch`), starting at batch `skip_batches`. See the module docs.
pub fn batches(
    dataset: Arc<dyn Dataset>,
    pipeline: Arc<Pipeline>,
    mix: Option<BatchMix>,
    cfg: &LoaderConfig,
    epoch: u64,
    skip_batches: usize,
) -> impl Iterator<Item = Result<Batch>> + use<> {
    let total = num_batches(dataset.len(), cfg);
    let job = Arc::new(Job {
        order: epoch_order(dataset.len(), cfg, epoch),
        dataset,
        pipeline,
        mix,
        batch_size: cfg.batch_size,
        seed: cfg.seed,
        epoch,
    });
    let first_error = (cfg.batch_size == 0).then(|| Error::invalid("the loader's batch size must be at least 1"));
    let next = skip_batches.min(total);
    let shared = Arc::new(Shared {
        state: Mutex::new(State { next_to_take: next, next_to_yield: next, stop: false }),
        wake: Condvar::new(),
    });
    let (sender, receiver) = channel();
    let mut workers = Vec::new();
    if first_error.is_none() && next < total {
        for _ in 0..cfg.workers {
            let (job, shared, sender) = (job.clone(), shared.clone(), sender.clone());
            let window = cfg.workers + 2;
            workers.push(std::thread::spawn(move || work(&job, &shared, &sender, total, window)));
        }
    }
    Batches { job, shared, receiver, workers, pending: BTreeMap::new(), next, total, first_error }
}

/// What every worker needs to build any batch.
struct Job {
    dataset: Arc<dyn Dataset>,
    pipeline: Arc<Pipeline>,
    mix: Option<BatchMix>,
    order: Vec<usize>,
    batch_size: usize,
    seed: u64,
    epoch: u64,
}

impl Job {
    /// Build batch `b` (panics in the pipeline or the dataset become errors). A worker passes `shared` to
    /// give up between samples once the iteration is stopped.
    fn build(&self, b: usize, shared: Option<&Shared>) -> Result<Batch> {
        catch_unwind(AssertUnwindSafe(|| self.build_inner(b, shared))).unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(Error::invalid(format!("loader: building batch {b} panicked: {msg}")))
        })
    }

    fn build_inner(&self, b: usize, shared: Option<&Shared>) -> Result<Batch> {
        let start = b * self.batch_size;
        let end = (start + self.batch_size).min(self.order.len());
        let classes = self.dataset.num_classes();
        let mut data = Vec::new();
        let mut shape: Option<Vec<usize>> = None;
        let mut labels = Vec::with_capacity(end - start);
        for &index in &self.order[start..end] {
            if shared.is_some_and(|s| s.lock().stop) {
                return Err(Error::invalid("loader: stopped"));
            }
            let (img, label) = self.dataset.get(index)?;
            let img = self.pipeline.fit(img).map_err(|e| e.in_file(self.dataset.source(index)))?;
            if label >= classes {
                return Err(Error::invalid(format!(
                    "dataset sample {index} has label {label}, but the dataset has {classes} classes"
                )));
            }
            let mut rng = sample_rng(self.seed, self.epoch, index);
            let t = self.pipeline.apply(&img, &mut rng);
            match &shape {
                None => {
                    data.reserve(t.numel() * (end - start));
                    shape = Some(t.shape().to_vec());
                }
                Some(s) if s != t.shape() => {
                    return Err(Error::invalid(format!(
                        "dataset sample {index} becomes a {:?} tensor where the batch's first is {s:?}: \
                         give the pipeline a crop or resize to one size",
                        t.shape()
                    )));
                }
                Some(_) => {}
            }
            data.extend_from_slice(t.data());
            labels.push(label);
        }
        let mut dims = vec![labels.len()];
        dims.extend(shape.unwrap_or_else(|| vec![3, 0, 0]));
        let mut images = Tensor::new(&dims, data)?;
        let targets = match &self.mix {
            Some(mix) => mix.mix(&mut images, &labels, classes, &mut mix_rng(self.seed, self.epoch, b)),
            None => one_hot(&labels, classes, 0.0),
        };
        Ok(Batch { images, targets, labels })
    }
}

struct State {
    /// The next batch a worker will take.
    next_to_take: usize,
    /// The batch the iterator waits for.
    next_to_yield: usize,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    /// The state, even if a thread panicked while holding it (the state stays consistent: every update is a
    /// single assignment).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
    }
}

/// A worker: take the next batch within the window, build it, send it; until the pass ends or `stop`.
fn work(job: &Job, shared: &Shared, sender: &Sender<(usize, Result<Batch>)>, total: usize, window: usize) {
    loop {
        let b = {
            let mut state = shared.lock();
            while !state.stop && state.next_to_take < total && state.next_to_take >= state.next_to_yield + window {
                state = shared.wake.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if state.stop || state.next_to_take >= total {
                return;
            }
            state.next_to_take += 1;
            state.next_to_take - 1
        };
        let result = job.build(b, Some(shared));
        let failed = result.is_err();
        if sender.send((b, result)).is_err() || failed {
            // The iterator is gone, or this pass ends at batch b: no later batch will be wanted.
            return;
        }
    }
}

/// The iterator `batches` returns.
struct Batches {
    job: Arc<Job>,
    shared: Arc<Shared>,
    receiver: Receiver<(usize, Result<Batch>)>,
    workers: Vec<JoinHandle<()>>,
    /// Batches that arrived before their turn.
    pending: BTreeMap<usize, Result<Batch>>,
    next: usize,
    total: usize,
    /// An error to return before anything else (a bad configuration).
    first_error: Option<Error>,
}

impl Batches {
    fn finish(&mut self) {
        self.next = self.total;
        self.shared.stop();
        self.pending.clear();
    }
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if let Some(e) = self.first_error.take() {
            self.finish();
            return Some(Err(e));
        }
        if self.next >= self.total {
            return None;
        }
        let b = self.next;
        let result = if self.workers.is_empty() {
            self.job.build(b, None)
        } else {
            loop {
                if let Some(result) = self.pending.remove(&b) {
                    break result;
                }
                match self.receiver.recv() {
                    Ok((i, result)) => {
                        self.pending.insert(i, result);
                    }
                    // Every worker has ended without sending batch b: they cannot have (each sends
                    // what it takes, panics included), but never wait forever.
                    Err(_) => {
                        break Err(Error::invalid(format!("loader: the workers stopped before batch {b}")));
                    }
                }
            }
        };
        if result.is_err() {
            self.finish();
        } else {
            self.next += 1;
            self.shared.lock().next_to_yield = self.next;
            self.shared.wake.notify_all();
        }
        Some(result)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.total - self.next + usize::from(self.first_error.is_some());
        (0, Some(left))
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        self.shared.stop();
        for worker in self.workers.drain(..) {
            // A worker's panics are caught around each batch, so join only fails on a bug; nothing to do.
            let _ = worker.join();
        }
    }
}
