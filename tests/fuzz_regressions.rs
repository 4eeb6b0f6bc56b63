//! What fuzzing the loaders found, kept as tests (the fuzzer itself is `fuzz/`, see fuzz/README.md).
//!
//! - `hostile_*`: each target gets 2,000 deterministic (seeded) mutations of its seed corpus through the same
//!   harness the `fuzz` binary uses (`fuzz/src/harness.rs`, included below), so that CI runs the CIFAR, image,
//!   safetensors, pth and recipe loaders on hostile input every time: each input must come back `Ok` or
//!   `Err`, never as a panic or a broken invariant (shape vs data length, recipe round trip, ...).
//! - `saved_inputs_do_not_panic`: every input under `fuzz/regressions/` except the known bugs below.
//! - one test per bug the fuzzer found, `#[ignore]`d with the bug's description while it is still there:
//!   run them with `cargo test --release --test fuzz_regressions -- --ignored`.

#[path = "../fuzz/src/harness.rs"]
mod harness;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::{Outcome, Part, Scratch, Target};
use resnet_rs::infer::preprocess::load_rgb;
use resnet_rs::weights::pth::load_pth_bytes;

/// Fixed, so that CI runs the same inputs every time (the fuzz binary picks a fresh seed per run).
const SEED: u64 = 0x5eed_2024;
const MUTATIONS: usize = 2000;

// -------------------------------------------------------------------------------------------------------------
// A per-thread allocation probe: while a closure runs, records the largest single allocation it asks for and the
// peak of the bytes it holds (allocated minus freed on this thread), and refuses any request that would take
// that above a limit, so that a fallible allocation (`read_to_end`'s `try_reserve`) fails cleanly instead of
// taking gigabytes while a bug is present. Other threads (the other tests) are not affected.

mod probe {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Probe;

    #[global_allocator]
    static PROBE: Probe = Probe;

    thread_local! {
        static ARMED: Cell<bool> = const { Cell::new(false) };
        static LIMIT: Cell<usize> = const { Cell::new(usize::MAX) };
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    fn armed() -> bool {
        ARMED.try_with(Cell::get).unwrap_or(false)
    }

    /// Whether `grow` more bytes (in a request of `size`) may be held; records them if so.
    fn admit(size: usize, grow: usize) -> bool {
        if !armed() {
            return true;
        }
        let live = LIVE.with(Cell::get);
        let limit = LIMIT.with(Cell::get);
        LARGEST.with(|l| l.set(l.get().max(size)));
        if size > limit || (live.max(0) as usize).saturating_add(grow) > limit {
            return false;
        }
        LIVE.with(|l| l.set(live + grow as isize));
        PEAK.with(|p| p.set(p.get().max(live + grow as isize)));
        true
    }

    fn freed(n: usize) {
        if armed() {
            LIVE.with(|l| l.set(l.get() - n as isize));
        }
    }

    unsafe impl GlobalAlloc for Probe {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if admit(layout.size(), layout.size()) { unsafe { System.alloc(layout) } } else { std::ptr::null_mut() }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            if admit(layout.size(), layout.size()) {
                unsafe { System.alloc_zeroed(layout) }
            } else {
                std::ptr::null_mut()
            }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) };
            freed(layout.size());
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let old = layout.size();
            if !admit(new_size, new_size.saturating_sub(old)) {
                return std::ptr::null_mut();
            }
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if p.is_null() {
                freed(new_size.saturating_sub(old));
            } else {
                freed(old.saturating_sub(new_size));
            }
            p
        }
    }

    #[derive(Debug)]
    pub struct Usage {
        /// Largest single allocation or reallocation asked for.
        pub largest: usize,
        /// Most bytes held at once.
        pub peak: usize,
    }

    struct Disarm;

    impl Drop for Disarm {
        fn drop(&mut self) {
            ARMED.with(|a| a.set(false));
        }
    }

    /// Run `f` under the probe with `limit` bytes (only set a limit where the allocations that would pass it
    /// are fallible: refusing an infallible one aborts the test process).
    pub fn measure<T>(limit: usize, f: impl FnOnce() -> T) -> (T, Usage) {
        LIMIT.with(|l| l.set(limit));
        LIVE.with(|l| l.set(0));
        PEAK.with(|p| p.set(0));
        LARGEST.with(|l| l.set(0));
        ARMED.with(|a| a.set(true));
        let guard = Disarm;
        let out = f();
        drop(guard);
        (out, Usage { largest: LARGEST.with(Cell::get), peak: PEAK.with(Cell::get).max(0) as usize })
    }
}

const MIB: usize = 1 << 20;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".into())
}

// -------------------------------------------------------------------------------------------------------------
// Known bugs: inputs that trip them are left out of the sweeps (and of `saved_inputs_do_not_panic`) until
// they are fixed; each has its own ignored test below. Remove an entry when its bug is fixed.

/// None is open: every bug found so far is fixed and has its test below.
fn known_bug(_target: Target, _input: &[u8]) -> bool {
    false
}

// -------------------------------------------------------------------------------------------------------------
// Hostile-input sweeps

fn sweep(target: Target) {
    let t = Instant::now();
    let result = harness::sweep(target, root(), SEED, MUTATIONS, &|input| known_bug(target, input));
    eprintln!(
        "{}: {MUTATIONS} mutations in {:.1} s: {} accepted, {} rejected, {} skipped (known bugs), {} panicked",
        target.name(),
        t.elapsed().as_secs_f64(),
        result.accepted,
        result.rejected,
        result.skipped,
        result.failures.len()
    );
    if result.failures.is_empty() {
        return;
    }
    let dir = std::env::temp_dir().join("resnet-rs-fuzz-regressions");
    let _ = std::fs::create_dir_all(&dir);
    let mut report = String::new();
    for (input, msg) in &result.failures {
        let path = dir.join(format!("{}-{:016x}.bin", target.name(), harness::fnv1a(input)));
        let _ = std::fs::write(&path, input);
        report.push_str(&format!("  {} ({} bytes): {msg}\n", path.display(), input.len()));
    }
    panic!(
        "{} of {MUTATIONS} mutated {} inputs panicked (replay one with `fuzz/target/release/fuzz {} --replay FILE`):\n{report}",
        result.failures.len(),
        target.name(),
        target.name()
    );
}

#[test]
fn hostile_cifar() {
    sweep(Target::Cifar);
}

#[test]
fn hostile_image() {
    sweep(Target::Image);
}

#[test]
fn hostile_tiff() {
    sweep(Target::Tiff);
}

#[test]
fn hostile_dicom() {
    sweep(Target::Dicom);
}

#[test]
fn hostile_idx() {
    sweep(Target::Idx);
}

#[test]
fn hostile_weights_name() {
    sweep(Target::WeightsName);
}

#[test]
fn hostile_safetensors() {
    sweep(Target::Safetensors);
}

#[test]
fn hostile_pth() {
    sweep(Target::Pth);
}

#[test]
fn hostile_recipe() {
    sweep(Target::Recipe);
}

/// The sweeps must not be vacuous: every target accepts some of its mutated inputs and refuses others.
#[test]
fn sweeps_reach_both_outcomes() {
    // Every target but `image`, which this check has always left out.
    for target in harness::TARGETS.into_iter().filter(|&t| t != Target::Image) {
        let r = harness::sweep(target, root(), SEED ^ 1, 300, &|_| false);
        assert!(
            r.accepted > 0 && r.rejected > 0,
            "{}: {} accepted, {} rejected",
            target.name(),
            r.accepted,
            r.rejected
        );
    }
}

// -------------------------------------------------------------------------------------------------------------
// Saved inputs

fn regression_dir() -> PathBuf {
    root().join("fuzz/regressions")
}

/// `fuzz/regressions/<target>-<name>.bin`: the target is the part of the name before the first '-'.
fn regression(name: &str) -> (Target, Vec<u8>) {
    let target = name.split('-').next().and_then(Target::from_name).unwrap_or_else(|| panic!("{name}: no target"));
    let bytes = std::fs::read(regression_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    (target, bytes)
}

/// Run one input through its target's harness; `Err(panic message)` if it panicked.
fn replay(target: Target, input: &[u8]) -> Result<Outcome, String> {
    let scratch = Scratch::new();
    catch_unwind(AssertUnwindSafe(|| harness::run(target, input, &scratch))).map_err(panic_message)
}

#[test]
fn saved_inputs_do_not_panic() {
    let mut names: Vec<String> = std::fs::read_dir(regression_dir())
        .expect("fuzz/regressions")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".bin"))
        .collect();
    names.sort();
    assert!(!names.is_empty());
    let mut failures = Vec::new();
    for name in &names {
        let (target, bytes) = regression(name);
        if known_bug(target, &bytes) {
            continue;
        }
        if let Err(msg) = replay(target, &bytes) {
            failures.push(format!("{name}: {msg}"));
        }
    }
    assert!(failures.is_empty(), "saved fuzz inputs panic:\n{}", failures.join("\n"));
}

// -------------------------------------------------------------------------------------------------------------
// Bugs found by fuzzing. Each test asserts the fixed behaviour; it is ignored while the bug is present.

/// Found by `fuzz image` (fuzz/regressions/image-png-plte-fuzzer.bin is the input it saved, -plte-4-bytes the
/// minimal form): png 0.18.1 panics (transform/palette.rs:74, "range end index 3 out of range for slice of
/// length 1") on a PLTE chunk that is not a whole number of RGB triples (upstream image-rs/image-png#694).
/// Fixed in ac78397: `load_rgb` runs the decoder under `catch_parser_panic`.
#[test]
fn png_palette_length_not_multiple_of_3_is_an_error() {
    let dir = std::env::temp_dir().join(format!("resnet-rs-plte-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let minimal = harness::make_png(1, 1, 8, 3, 0, Some(&[10, 20, 30, 40]), None, &[0, 0]);
    let cases = [
        ("minimal", minimal),
        ("fuzzer", regression("image-png-plte-fuzzer.bin").1),
        ("saved", regression("image-png-plte-4-bytes.bin").1),
    ];
    for (what, bytes) in cases {
        let path = dir.join(format!("{what}.png"));
        std::fs::write(&path, &bytes).unwrap();
        let result = match catch_unwind(|| load_rgb(&path)) {
            Ok(result) => result,
            Err(payload) => panic!("{what}: load_rgb panicked: {}", panic_message(payload)),
        };
        let err = result.expect_err(what).to_string();
        assert!(err.starts_with(&path.display().to_string()), "{what}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Found by `fuzz pth` (deflate-bomb mutation): torch.save never compresses, but a re-zipped checkpoint has
/// Deflated entries and loads, and `read_entry` (src/weights/pth.rs) used to inflate an entry bounded only by
/// the size it declares: a 2.6 MB file took 2.5 GB. Fixed in 9298a7b (an entry may not inflate past 32 times
/// the archive).
#[test]
fn pth_single_entry_deflate_bomb_is_refused() {
    let chunk = harness::deflate_zeros_chunk(MIB);
    let copies = 2500; // 2.5 GiB of zeros from about 2.6 MB
    let bytes = harness::zip_pack(&[
        Part::stored("archive/data.pkl", harness::memo_keys_pickle("w", 0)),
        Part {
            name: "archive/data/0".into(),
            data: harness::deflate_bomb(&chunk, copies),
            deflated: Some(((copies * MIB) as u32, harness::zeros_crc(copies * MIB))),
        },
        Part::stored("archive/version", b"3\n".to_vec()),
    ]);
    assert!(bytes.len() < 3 * MIB);
    let (result, usage) = probe::measure(256 * MIB, || load_pth_bytes(&bytes, Path::new("bomb.pth")));
    let msg = result.expect_err("a deflate bomb must be refused").to_string();
    assert!(usage.peak <= 128 * MIB, "a {} byte file took {usage:?} ({msg})", bytes.len());
}

/// Found by `fuzz pth` after 9298a7b (its 2.5 MB input is built here rather than committed): the limit is
/// per entry, 32 times the archive, but every storage is inflated and kept in memory at once, so N storages
/// may hold 32 x N times the archive. Here 40 storages of 64 MiB each (2.7 MB of file) need 2.5 GiB;
/// `resnet predict --weights` on it peaks at 2.9 GB RSS. Fix: one budget for the whole archive (e.g.
/// `read_entry` takes `&mut remaining`, starting at 32 x the archive, reads through `file.take(remaining)`,
/// subtracts what it read, and fails with "entries inflate to more than 32 times the archive" when it runs
/// out).
#[test]
fn pth_many_storage_deflate_bombs_are_refused() {
    for (what, bytes) in [
        ("40 x 64 MiB", harness::pth_storage_bombs(40, 64 * MIB)),
        ("200 x 12 MiB", harness::pth_storage_bombs(200, 12 * MIB)),
    ] {
        assert!(bytes.len() < 3 * MIB, "{what}");
        // 512 MiB held at once is refused (try_reserve in read_to_end fails: out of memory), so that this test
        // fails rather than takes gigabytes while the bug is there.
        let (result, usage) = probe::measure(512 * MIB, || load_pth_bytes(&bytes, Path::new("bombs.pth")));
        let msg = match result {
            Ok(sd) => format!("loaded {} tensors", sd.len()),
            Err(e) => e.to_string(),
        };
        assert!(usage.peak <= 256 * MIB, "{what}: a {} byte file took {usage:?} ({msg})", bytes.len());
        assert!(!msg.contains("out of memory"), "{what}: {msg}");
    }
}

/// Found by review of the unpickler and confirmed with `fuzz pth --replay` (over the fuzzer's 10 s hang
/// limit): a state_dict key memoized once and set again through BINGET N times makes `state_dict`
/// (src/weights/pth.rs) compare the whole key on every insert into its `BTreeMap<&str, _>`: O(N x key
/// length). A 3.8 MB file (1 MiB key, 700,000 SETITEMs) takes 10.5 s. Fix: collapse repeats of the same
/// `Rc<str>` by pointer before comparing contents (keep, per `Rc::as_ptr`, the index of its last SETITEM;
/// then insert only those into the BTreeMap, the highest index winning), or refuse keys longer than a few KiB.
#[test]
fn pth_memoized_long_key_is_linear() {
    let key = "k".repeat(MIB);
    let bytes = harness::pth_with_pickle(harness::memo_keys_pickle(&key, 700_000));
    assert!(bytes.len() < 4 * MIB);
    let t = Instant::now();
    let sd = load_pth_bytes(&bytes, Path::new("keys.pth")).expect("a valid (if odd) state_dict");
    let took = t.elapsed();
    // last value wins: the key ends bound to the tensor
    assert_eq!(sd.len(), 1);
    assert_eq!(sd[&key].shape(), &[2, 3]);
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

/// Found by the allocation cap (a live heap above 2 GiB is a finding): `load_rgb` (src/infer/preprocess.rs)
/// checked the pixel count (at most 2^28) but `DynamicImage::from_decoder` allocates `decoder.total_bytes()` up
/// front without consulting `limits.max_alloc` (image 0.25.10), so a 74-byte PNG header claiming 16384x16384
/// 16-bit RGBA got a 2 GiB buffer before any pixel was read. Fixed: decode buffers over 1 GiB are refused
/// right after the pixel-count check (8-bit RGB stays allowed up to 16384^2, 768 MiB).
#[test]
fn png_header_cannot_ask_for_2_gib() {
    let (_, bytes) = regression("image-png-16bit-rgba-16384.bin");
    assert!(bytes.len() < 100);
    let path = std::env::temp_dir().join(format!("resnet-rs-big16-{}.png", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    // Record only: the allocation is infallible, refusing it would abort the test process.
    let (result, usage) = probe::measure(usize::MAX, || load_rgb(&path));
    let _ = std::fs::remove_file(&path);
    assert!(result.is_err());
    assert!(usage.largest < 2 << 30, "a {} byte file asked for {usage:?}", bytes.len());
}
