//! The loader: determinism across worker counts and resumption, epochs, batch shapes and targets, and errors
//! (no hang, no panic).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};
use resnet_rs::data::loader::{Batch, LoaderConfig, Shard, batches, epoch_order, num_batches};
use resnet_rs::data::transforms::{BatchMix, Op, Pipeline, RandomErasing};
use resnet_rs::{Dataset, Digits, Image};
use resnet_rs::{Error, Result};

/// Sample i is a 2x2 image whose red is i % 256 and green i / 256, with label i % classes; `fail_at` makes
/// `get` fail (or panic) there; `calls` counts the `get`s.
struct Numbers {
    n: usize,
    classes: usize,
    fail_at: Option<usize>,
    panic_at: Option<usize>,
    odd_size_at: Option<usize>,
    calls: AtomicUsize,
}

impl Numbers {
    fn new(n: usize) -> Numbers {
        Numbers { n, classes: 10, fail_at: None, panic_at: None, odd_size_at: None, calls: AtomicUsize::new(0) }
    }
}

impl Dataset for Numbers {
    fn len(&self) -> usize {
        self.n
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn class_names(&self) -> Vec<String> {
        (0..self.classes).map(|c| c.to_string()).collect()
    }
    fn get(&self, i: usize) -> Result<(Image, usize)> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if Some(i) == self.fail_at {
            return Err(Error::file(format!("sample{i}.png"), "cannot decode image: broken"));
        }
        if Some(i) == self.panic_at {
            panic!("dataset bug at {i}");
        }
        // A slow sample now and then, so that workers finish out of order.
        if i % 7 == 3 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let side = if Some(i) == self.odd_size_at { 3 } else { 2 };
        Ok((Image::from_rgb(&RgbImage::from_pixel(side, side, Rgb([(i % 256) as u8, (i / 256) as u8, 0]))), i % 10))
    }
}

/// Identity-ish pipeline: values v / 255 * 255 = v (rounded back below).
fn identity() -> Arc<Pipeline> {
    Arc::new(Pipeline::normalize(&[0.0; 3], &[1.0 / 255.0; 3]))
}

/// The dataset index a Numbers image came from.
fn index_of(batch: &Batch, k: usize) -> usize {
    let plane = batch.images.shape()[2] * batch.images.shape()[3];
    let per = 3 * plane;
    let red = batch.images.data()[k * per].round() as usize;
    let green = batch.images.data()[k * per + plane].round() as usize;
    red + 256 * green
}

fn cfg(batch_size: usize, workers: usize) -> LoaderConfig {
    LoaderConfig { batch_size, shuffle: true, drop_last: false, workers, seed: 42, shard: Shard::WHOLE }
}

fn collect(
    ds: Arc<dyn Dataset>,
    pipeline: Arc<Pipeline>,
    mix: Option<BatchMix>,
    cfg: &LoaderConfig,
    epoch: u64,
    skip: usize,
) -> Vec<Batch> {
    batches(ds, pipeline, mix, cfg, epoch, skip).collect::<Result<Vec<_>>>().expect("a clean pass")
}

fn augmenting() -> Arc<Pipeline> {
    Arc::new(Pipeline {
        ops: vec![Op::RandomCrop { size: 8, padding: 1 }, Op::HorizontalFlip { p: 0.5 }],
        channels: 3,
        mean: vec![0.5; 3],
        std: vec![0.25; 3],
        erasing: Some(RandomErasing { p: 0.5, scale: (0.02, 0.2), ratio: (0.3, 3.3) }),
    })
}

fn mixing() -> Option<BatchMix> {
    Some(BatchMix { mixup_alpha: 0.2, cutmix_alpha: 1.0, label_smoothing: 0.1 })
}

#[test]
fn same_seed_same_batches_for_any_worker_count() {
    let digits: Arc<dyn Dataset> = Arc::new(Digits::load().expect("digits"));
    let one = collect(digits.clone(), augmenting(), mixing(), &cfg(100, 1), 3, 0);
    assert_eq!(one.len(), 18);
    assert_eq!(one.len(), num_batches(1797, &cfg(100, 1)));
    assert_eq!(one[17].labels.len(), 97);
    assert_eq!(one[0].images.shape(), &[100, 3, 8, 8]);
    assert_eq!(one[0].targets.shape(), &[100, 10]);
    for b in &one {
        for row in b.targets.data().chunks(10) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }
    let three = collect(digits.clone(), augmenting(), mixing(), &cfg(100, 3), 3, 0);
    assert!(one == three, "1 and 3 workers give the same batches");
    let inline = collect(digits, augmenting(), mixing(), &cfg(100, 0), 3, 0);
    assert!(one == inline, "0 workers (the caller's thread) gives the same batches");
}

#[test]
fn skip_batches_resumes_exactly() {
    let digits: Arc<dyn Dataset> = Arc::new(Digits::load().expect("digits"));
    let full = collect(digits.clone(), augmenting(), mixing(), &cfg(64, 2), 5, 0);
    for k in [1, 7, 28, 29, 40] {
        let rest = collect(digits.clone(), augmenting(), mixing(), &cfg(64, 2), 5, k);
        assert_eq!(rest.len(), full.len().saturating_sub(k), "skip {k}");
        assert!(rest[..] == full[k.min(full.len())..], "skip {k}");
    }
}

#[test]
fn every_sample_once_per_epoch_and_epochs_differ() {
    let ds: Arc<dyn Dataset> = Arc::new(Numbers::new(300));
    let order = |epoch, cfg: &LoaderConfig| -> Vec<usize> {
        let batches = collect(ds.clone(), identity(), None, cfg, epoch, 0);
        batches.iter().flat_map(|b| (0..b.labels.len()).map(move |k| index_of(b, k))).collect()
    };
    let e0 = order(0, &cfg(32, 2));
    let mut sorted = e0.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..300).collect::<Vec<_>>(), "each sample exactly once");
    assert_eq!(e0, epoch_order(300, &cfg(32, 2), 0));
    let e1 = order(1, &cfg(32, 2));
    assert_ne!(e0, e1, "another epoch, another order");
    assert_eq!(e1, order(1, &cfg(32, 3)));
    // Another seed, another order; no shuffling, the dataset's order.
    assert_ne!(e0, order(0, &LoaderConfig { seed: 43, ..cfg(32, 2) }));
    assert_eq!(order(0, &LoaderConfig { shuffle: false, ..cfg(32, 2) }), (0..300).collect::<Vec<_>>());
}

#[test]
fn a_steps_rank_batches_rank_after_rank_are_one_process_batch() {
    // 2 ranks x 8 and 1 process x 16 see each step's samples in one order (the one process's batch is the ranks'
    // batches concatenated), which lets their gradient sums split alike (engine::cpu::batch_sum). 301 samples:
    // padded to 302, the last step has 14, 7 per rank; every rank gets 151.
    let ds: Arc<dyn Dataset> = Arc::new(Numbers::new(301));
    let indices = |c: &LoaderConfig| -> Vec<Vec<usize>> {
        let b = collect(ds.clone(), identity(), None, c, 2, 0);
        b.iter().map(|b| (0..b.labels.len()).map(|k| index_of(b, k)).collect()).collect()
    };
    let one = indices(&cfg(16, 0));
    let ranks: Vec<_> =
        (0..2).map(|rank| indices(&LoaderConfig { shard: Shard { rank, world: 2 }, ..cfg(8, 0) })).collect();
    assert_eq!(ranks[0].iter().map(Vec::len).sum::<usize>(), 151);
    assert_eq!(ranks[0].last().map(Vec::len), Some(7));
    for (step, joint) in one.iter().enumerate() {
        let both = [ranks[0][step].clone(), ranks[1][step].clone()].concat();
        assert_eq!(&both[..joint.len()], &joint[..], "step {step}");
    }
    assert_eq!(ranks[1].last().unwrap().last(), one.first().unwrap().first(), "the pad is the order's first sample");
}

#[test]
fn a_resume_under_another_world_size_continues_after_the_same_samples() {
    // k steps of W ranks consume exactly the first k·batch·W samples of the epoch's order (rank r takes the r-th
    // batch of each step's W), so `Position::rescale` can continue an epoch on another number of ranks: 3 steps of 2 ranks
    // x 8 are 6 steps of 1 rank x 8, and what each world takes next is the same samples.
    use resnet_rs::train::checkpoint::Position;
    let ds: Arc<dyn Dataset> = Arc::new(Numbers::new(300));
    let taken = |world: usize, skip: usize, steps: usize| -> Vec<usize> {
        let mut seen: Vec<usize> = (0..world)
            .flat_map(|rank| {
                let c = LoaderConfig { shard: Shard { rank, world }, drop_last: true, ..cfg(8, 0) };
                let b = collect(ds.clone(), identity(), None, &c, 3, skip);
                b[..steps]
                    .iter()
                    .flat_map(|b| (0..b.labels.len()).map(|k| index_of(b, k)).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            })
            .collect();
        seen.sort_unstable();
        seen
    };
    assert_eq!(taken(2, 0, 3), taken(1, 0, 6), "the same prefix of the order");
    let spe = |world: usize| num_batches(300 / world, &LoaderConfig { drop_last: true, ..cfg(8, 0) }) as u64;
    let mut pos = Position { epoch: 3, batch: 3, global_step: 3 * spe(2) + 3, ranks: 2, ..Position::default() };
    let note = pos.rescale(1, 8, spe(1)).expect("another world size");
    assert_eq!((pos.batch, pos.global_step, pos.ranks), (6, 3 * spe(1) + 6, 1), "{note}");
    assert_eq!(taken(1, 6, 4), taken(2, 3, 2), "and the same samples next");
    // 5 steps of 1 rank are 2 steps of 2 ranks and half of one: those 8 samples are seen again.
    let mut pos = Position { batch: 5, global_step: 5, ranks: 1, ..Position::default() };
    let note = pos.rescale(2, 8, spe(2)).unwrap();
    assert_eq!(pos.batch, 2);
    assert!(note.contains("the 8 samples before it seen again"), "{note}");
    assert_eq!(Position { ranks: 2, ..pos }.rescale(2, 8, spe(2)), None, "the same world: nothing to do");
}

#[test]
fn batch_sizes_drop_last_and_plain_targets() {
    let ds: Arc<dyn Dataset> = Arc::new(Numbers::new(10));
    let keep = LoaderConfig { shuffle: false, ..cfg(4, 2) };
    let drop = LoaderConfig { drop_last: true, ..keep.clone() };
    assert_eq!((num_batches(10, &keep), num_batches(10, &drop)), (3, 2));
    assert_eq!(num_batches(0, &keep), 0);
    assert_eq!(num_batches(10, &LoaderConfig { batch_size: 0, ..keep.clone() }), 0);
    let sizes = |c: &LoaderConfig| -> Vec<usize> {
        collect(ds.clone(), identity(), None, c, 0, 0).iter().map(|b| b.labels.len()).collect()
    };
    assert_eq!(sizes(&keep), [4, 4, 2]);
    assert_eq!(sizes(&drop), [4, 4]);
    let b = &collect(ds.clone(), identity(), None, &keep, 0, 0)[2];
    assert_eq!(b.labels, [8, 9]);
    assert_eq!(b.images.shape(), &[2, 3, 2, 2]);
    let mut want = [0.0; 20];
    want[8] = 1.0;
    want[19] = 1.0;
    assert_eq!(b.targets.data(), &want[..], "one-hot targets without a BatchMix");
    // Skipping past the end, or an empty dataset: nothing.
    assert_eq!(batches(ds, identity(), None, &keep, 0, 99).count(), 0);
    assert_eq!(batches(Arc::new(Numbers::new(0)), identity(), None, &keep, 0, 0).count(), 0);
}

/// Run the iteration in a thread and fail instead of hanging.
fn within_seconds<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).expect("the loader hung")
}

#[test]
fn a_dataset_error_ends_the_iteration_with_that_error() {
    for workers in [0, 1, 3] {
        let results = within_seconds(20, move || {
            let ds = Arc::new(Numbers { fail_at: Some(45), ..Numbers::new(200) });
            let c = LoaderConfig { shuffle: false, ..cfg(10, workers) };
            batches(ds, identity(), None, &c, 0, 0).collect::<Vec<_>>()
        });
        // Batches 0..3 come out, then batch 4 (samples 40..50) is the error, then nothing.
        assert_eq!(results.len(), 5, "{workers} workers");
        assert!(results[..4].iter().all(|r| r.is_ok()));
        let err = results[4].as_ref().expect_err("an error").to_string();
        assert_eq!(err, "sample45.png: cannot decode image: broken");
    }
    // Shuffled, the error still surfaces (wherever sample 45 lands) and the pass stops there.
    let ds = Arc::new(Numbers { fail_at: Some(45), ..Numbers::new(200) });
    let results: Vec<_> = within_seconds(20, move || batches(ds, identity(), None, &cfg(10, 3), 0, 0).collect());
    assert!(results.last().expect("something").is_err());
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
}

#[test]
fn panics_bad_labels_and_mixed_sizes_become_errors() {
    let cases: Vec<(Numbers, &str)> = vec![
        (Numbers { panic_at: Some(12), ..Numbers::new(50) }, "panicked: dataset bug at 12"),
        (Numbers { classes: 5, ..Numbers::new(50) }, "label 5"),
        (Numbers { odd_size_at: Some(13), ..Numbers::new(50) }, "crop or resize"),
    ];
    for (ds, want) in cases {
        let ds = Arc::new(ds);
        let results: Vec<_> = within_seconds(20, move || {
            let c = LoaderConfig { shuffle: false, ..cfg(8, 2) };
            batches(ds, identity(), None, &c, 0, 0).collect()
        });
        let err = results.last().expect("something").as_ref().expect_err("an error").to_string();
        assert!(err.contains(want), "{err}");
        assert!(!err.contains('\n'));
    }
    let zero = LoaderConfig { batch_size: 0, ..cfg(8, 2) };
    let results: Vec<_> = batches(Arc::new(Numbers::new(5)), identity(), None, &zero, 0, 0).collect();
    assert_eq!(results.len(), 1);
    assert!(results[0].is_err());
}

#[test]
fn dropping_the_iterator_early_stops_the_workers() {
    let ds = Arc::new(Numbers::new(100_000));
    let counter = ds.clone();
    let start = Instant::now();
    within_seconds(20, move || {
        let mut it = batches(ds, identity(), None, &cfg(16, 3), 0, 0);
        assert!(it.next().expect("a batch").is_ok());
        // Dropped here: the workers stop and are joined.
    });
    let calls = counter.calls.load(Ordering::SeqCst);
    // At most a window of batches (workers + 2 ahead of the first) was built, not the whole epoch.
    assert!(calls <= 16 * 7, "{calls} samples loaded");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(counter.calls.load(Ordering::SeqCst), calls, "no worker is still loading");
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[test]
fn imagenet_style_pipeline_through_the_loader() {
    // Digits upscaled by RandomResizedCrop to 32x32 with ImageNet statistics: shapes and finiteness.
    let digits: Arc<dyn Dataset> = Arc::new(Digits::load().expect("digits"));
    let (train, _) = Digits::load().expect("digits").split(0.9, 1);
    let mut pipeline = Pipeline::imagenet_train(32);
    pipeline.ops.push(Op::ColorJitter { brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1 });
    let pipeline = Arc::new(pipeline);
    let b = collect(train, pipeline.clone(), mixing(), &cfg(50, 2), 0, 0);
    assert_eq!(b.len(), 4);
    assert_eq!(b[0].images.shape(), &[50, 3, 32, 32]);
    assert!(b.iter().all(|b| b.images.all_finite() && b.targets.all_finite()));
    let eval = Arc::new(Pipeline::imagenet_eval(36, 32));
    let e = collect(digits, eval, None, &LoaderConfig { shuffle: false, ..cfg(256, 2) }, 0, 0);
    assert_eq!(e[0].images.shape(), &[256, 3, 32, 32]);
}
