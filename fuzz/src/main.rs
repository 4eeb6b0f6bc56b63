//! `fuzz TARGET SECONDS [--seed N]`: nightly-free mutation fuzzing of resnet-rs's loaders.
//!
//! Targets: cifar, image, safetensors, pth, recipe, calibration (see `harness.rs`). The process you start is a supervisor;
//! the fuzzing happens in a worker child (this same binary, `--worker`) so that a crash that cannot be caught
//! in-process (an abort on a failed allocation, a stack overflow, a hang) is recorded and fuzzing goes on in a
//! fresh worker. Findings (inputs saved under `fuzz/findings/<target>-<hash>.bin`, with a `.txt` beside):
//!
//! - panic: any panic in a loader or a broken invariant on an accepted input, caught with `catch_unwind`
//!   (the profile has debug assertions and overflow checks on, so arithmetic overflow is a panic too);
//! - alloc: an allocation that would take the live heap above 2 GiB. The counting global allocator sees it
//!   before it happens: a large one is refused (null), so a fallible allocation (`try_reserve`) fails and the
//!   loader returns an error; zeroed (up to 4 GiB) and small ones are granted so that the worker lives on. Either
//!   way the harness's check after the input reports it;
//! - alloc-abort: a refused allocation that was infallible: the worker aborts and the supervisor reports it;
//! - hang: one input running longer than 10 s (a watchdog thread ends the worker);
//! - crash: the worker died any other way (e.g. stack overflow).
//!
//! Exit status 1 if anything was found, 0 if not, 2 on bad usage.

mod harness;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use harness::{Fuzzer, Outcome, Scratch, Target, fnv1a};

/// Live-heap ceiling: an allocation that would go above it is a finding.
const HEAP_LIMIT: usize = 2 << 30;
/// Past `HEAP_LIMIT`, zeroed allocations (`vec![0; n]`, typically a decode buffer, lazily committed by the OS)
/// are granted up to `HARD_LIMIT`, and small ones (under `SMALL`) up to `SLACK` more, so that the worker lives
/// on and finishes the input (refusing an infallible allocation aborts it); both are reported. Large
/// non-zeroed requests past `HEAP_LIMIT` (a buffer growing as it is written) are refused.
const HARD_LIMIT: usize = 4 << 30;
const SMALL: usize = 64 << 20;
const SLACK: usize = 256 << 20;
/// One input running longer than this is a hang.
const HANG_MS: u64 = 10_000;
/// Exit code of a worker that the watchdog stopped.
const HANG_EXIT: i32 = 86;
/// Inputs saved per distinct finding (per worker).
const SAVE_PER_SIGNATURE: usize = 3;

// -------------------------------------------------------------------------------------------------------------
// Counting allocator

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Largest request refused since the harness last looked (0: none).
static REFUSED: AtomicUsize = AtomicUsize::new(0);
/// Largest request granted above `HEAP_LIMIT` since the harness last looked (0: none).
static OVER: AtomicUsize = AtomicUsize::new(0);

struct CountingAlloc;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Account for `n` more bytes, or refuse them (and record the refusal) if that would cross the limit. Zeroed
/// and small requests may go a little further (see `HARD_LIMIT`), recorded as a finding all the same.
fn reserve(n: usize, zeroed: bool) -> bool {
    let live = LIVE.fetch_add(n, Relaxed) + n;
    let ceiling = if zeroed {
        HARD_LIMIT
    } else if n < SMALL {
        HEAP_LIMIT + SLACK
    } else {
        HEAP_LIMIT
    };
    if live > HEAP_LIMIT && live <= ceiling {
        OVER.fetch_max(n, Relaxed);
    } else if live > HEAP_LIMIT {
        LIVE.fetch_sub(n, Relaxed);
        REFUSED.fetch_max(n, Relaxed);
        // If the allocation was infallible the process aborts right after this: leave the reason where the
        // supervisor will look. (pwrite on an open file: no allocation here.)
        current::note(REASON_ALLOC, n as u64);
        return false;
    }
    PEAK.fetch_max(live, Relaxed);
    true
}

fn release(n: usize) {
    LIVE.fetch_sub(n, Relaxed);
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size(), false) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            release(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size(), true) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            release(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        release(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !reserve(new_size - old, false) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            if new_size > old {
                release(new_size - old);
            }
        } else if new_size < old {
            release(old - new_size);
        }
        p
    }
}

// -------------------------------------------------------------------------------------------------------------
// The current input, mirrored to a file so that the supervisor can recover it after the worker dies.
//
// Layout: execs u64 | reason u64 | reason argument u64 | input length u64 | input bytes (all little-endian).

const REASON_NONE: u64 = 0;
const REASON_ALLOC: u64 = 1;
const REASON_HANG: u64 = 2;

mod current {
    use super::*;

    static FILE: OnceLock<File> = OnceLock::new();

    pub fn open(path: &Path) {
        let f = File::create(path).unwrap_or_else(|e| die(&format!("cannot create {}: {e}", path.display())));
        let _ = FILE.set(f);
    }

    /// Called before each input runs.
    pub fn record(buf: &mut Vec<u8>, execs: u64, input: &[u8]) {
        let Some(f) = FILE.get() else { return };
        buf.clear();
        for v in [execs, REASON_NONE, 0, input.len() as u64] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        buf.extend_from_slice(input);
        let _ = f.write_all_at(buf, 0);
    }

    /// Why the worker is about to die. Must not allocate (the allocator calls it).
    pub fn note(reason: u64, arg: u64) {
        if let Some(f) = FILE.get() {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&reason.to_le_bytes());
            b[8..].copy_from_slice(&arg.to_le_bytes());
            let _ = f.write_all_at(&b, 8);
        }
    }

    /// (execs, reason, argument, input) as the dead worker left them.
    pub fn read(path: &Path) -> Option<(u64, u64, u64, Vec<u8>)> {
        let bytes = std::fs::read(path).ok()?;
        let word = |i: usize| Some(u64::from_le_bytes(bytes.get(i * 8..i * 8 + 8)?.try_into().ok()?));
        let (execs, reason, arg, len) = (word(0)?, word(1)?, word(2)?, word(3)? as usize);
        let input = bytes.get(32..32 + len)?.to_vec();
        Some((execs, reason, arg, input))
    }
}

// -------------------------------------------------------------------------------------------------------------
// Findings

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn repo_root() -> PathBuf {
    fuzz_dir().join("..")
}

fn hex_preview(data: &[u8]) -> String {
    let mut s = String::new();
    for (row, chunk) in data.chunks(16).take(4).enumerate() {
        s.push_str(&format!("    {:04x}:", row * 16));
        for b in chunk {
            s.push_str(&format!(" {b:02x}"));
        }
        s.push_str("  |");
        s.extend(chunk.iter().map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' }));
        s.push_str("|\n");
    }
    if data.len() > 64 {
        s.push_str(&format!("    ... ({} bytes in all)\n", data.len()));
    }
    s
}

/// Save a finding's input (and a note) under fuzz/findings and print it. Returns the saved path.
fn save_finding(target: Target, kind: &str, message: &str, input: &[u8]) -> PathBuf {
    let dir = fuzz_dir().join("findings");
    let _ = std::fs::create_dir_all(&dir);
    let stem = format!("{}-{:016x}", target.name(), fnv1a(input));
    let path = dir.join(format!("{stem}.bin"));
    if let Err(e) = std::fs::write(&path, input) {
        eprintln!("fuzz: cannot save {}: {e}", path.display());
    }
    let _ = std::fs::write(
        dir.join(format!("{stem}.txt")),
        format!("target: {}\nkind: {kind}\n{message}\n", target.name()),
    );
    println!(
        "FINDING [{}] {kind}: {message}\n  input: {} ({} bytes)\n{}",
        target.name(),
        path.display(),
        input.len(),
        hex_preview(input)
    );
    path
}

/// A finding's identity: what happened and where, without the numbers that vary between inputs.
fn signature(kind: &str, message: &str) -> String {
    let first = message.lines().next().unwrap_or("");
    let mut sig = format!("{kind}:");
    let mut last_digit = false;
    for c in first.chars().take(200) {
        if c.is_ascii_digit() {
            if !last_digit {
                sig.push('#');
            }
            last_digit = true;
        } else {
            sig.push(c);
            last_digit = false;
        }
    }
    // keep the panic location's line number: it tells two bugs apart
    if let Some(loc) = message.split(" at ").nth(1).and_then(|l| l.split_whitespace().next()) {
        sig.push_str(" @");
        sig.push_str(loc);
    }
    sig
}

// -------------------------------------------------------------------------------------------------------------
// Worker

static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);
/// Start of the current input in ms since the worker started (+1; 0: idle).
static EXEC_START_MS: AtomicU64 = AtomicU64::new(0);

fn worker(target: Target, millis: u64, seed: u64, cur: &Path, bombs: bool) -> ! {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_millis(millis);
    current::open(cur);
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(non-string panic payload)".into());
        let loc = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column())).unwrap_or_default();
        let mut slot = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
        // the first panic of an input is the interesting one (rayon re-raises it in the caller)
        if slot.is_none() {
            *slot = Some(format!("panicked at {loc}: {msg}"));
        }
    }));
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let start = EXEC_START_MS.load(Relaxed);
            let now = t0.elapsed().as_millis() as u64 + 1;
            if start != 0 && now.saturating_sub(start) > HANG_MS {
                current::note(REASON_HANG, now - start);
                eprintln!("fuzz: an input has run for more than {} s; stopping this worker", HANG_MS / 1000);
                std::process::exit(HANG_EXIT);
            }
        }
    });

    let scratch = Scratch::new();
    let mut seeds = harness::seeds(target, &repo_root());
    if let Some(dir) = std::env::var_os("RESNET_FUZZ_SEEDS") {
        seeds.extend(harness::seeds_from_dir(Path::new(&dir)));
    }
    let mut fuzzer = Fuzzer::with_seeds(target, seeds, seed);
    let mut buf = Vec::new();
    let mut execs = 0u64;
    let mut saved: HashMap<String, usize> = HashMap::new();
    let (mut slowest, mut slow) = (Duration::ZERO, 0u64);
    let mut last_progress = Instant::now();
    // Deflate bombs cost seconds each: try them until one is a finding, then leave them be.
    fuzzer.bombs = bombs && std::env::var_os("RESNET_FUZZ_NO_BOMBS").is_none();
    let time_feedback = std::env::var_os("RESNET_FUZZ_NO_SLOW").is_none();
    while Instant::now() < deadline {
        let input = fuzzer.next_input();
        current::record(&mut buf, execs, &input);
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = None;
        REFUSED.store(0, Relaxed);
        OVER.store(0, Relaxed);
        EXEC_START_MS.store(t0.elapsed().as_millis() as u64 + 1, Relaxed);
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| harness::run(target, &input, &scratch)));
        let took = started.elapsed();
        EXEC_START_MS.store(0, Relaxed);
        execs += 1;
        slowest = slowest.max(took);
        if took > Duration::from_secs(1) {
            slow += 1;
            if let Some(dir) = std::env::var_os("RESNET_FUZZ_SAVE_SLOW") {
                let name = format!("{}-{:016x}-{}ms.bin", target.name(), fnv1a(&input), took.as_millis());
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::write(Path::new(&dir).join(name), &input);
            }
        }
        let refused = REFUSED.swap(0, Relaxed);
        let over = OVER.swap(0, Relaxed);
        let finding = match result {
            Ok(outcome) if refused == 0 && over == 0 => {
                fuzzer.feedback(&input, &outcome, time_feedback.then_some(took));
                None
            }
            Ok(outcome) => {
                let what = match &outcome {
                    Outcome::Accepted(_) => "accepted".to_string(),
                    Outcome::Rejected(e) => format!("rejected: {e}"),
                };
                let message = if refused > 0 {
                    format!(
                        "an allocation of {refused} bytes would take the live heap above 2 GiB (refused; the loader then {what})"
                    )
                } else {
                    format!(
                        "a zeroed allocation of {over} bytes took the live heap above 2 GiB (granted; the loader then {what})"
                    )
                };
                Some(("alloc", message))
            }
            Err(_) => {
                let msg = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_else(|| "panic".into());
                Some(("panic", msg))
            }
        };
        if let Some((kind, message)) = finding {
            if kind == "alloc" {
                fuzzer.drop_bombs();
            }
            let sig = if kind == "alloc" {
                "alloc: an allocation would take the live heap above 2 GiB".to_string()
            } else {
                signature(kind, &message)
            };
            let n = saved.entry(sig.clone()).or_default();
            *n += 1;
            let path = if *n <= SAVE_PER_SIGNATURE {
                save_finding(target, kind, &message, &input).display().to_string()
            } else {
                "-".into()
            };
            println!("@@finding\t{sig}\t{path}");
        }
        // drop the input's memory before the next one's accounting starts
        drop(input);
        if last_progress.elapsed() > Duration::from_secs(2) {
            // so that the supervisor keeps these numbers if this worker dies later
            let (peak, corpus, added, ms) =
                (PEAK.load(Relaxed), fuzzer.corpus_len(), fuzzer.added, slowest.as_millis());
            println!("@@progress\t{execs}\t{peak}\t{corpus}\t{added}\t{ms}\t{slow}");
            last_progress = Instant::now();
        }
    }
    if std::env::var_os("RESNET_FUZZ_CLASSES").is_some() {
        for class in fuzzer.classes() {
            eprintln!("class: {class}");
        }
    }
    println!(
        "@@stats\t{execs}\t{}\t{}\t{}\t{}\t{slow}",
        PEAK.load(Relaxed),
        fuzzer.corpus_len(),
        fuzzer.added,
        slowest.as_millis()
    );
    let _ = std::io::stdout().flush();
    drop(scratch); // (exit runs no destructors)
    std::process::exit(0);
}

// -------------------------------------------------------------------------------------------------------------
// Supervisor

#[derive(Default)]
struct Tally {
    execs: u64,
    /// distinct findings, with how many inputs hit each
    signatures: BTreeMap<String, u64>,
    peak: usize,
    corpus: usize,
    added: usize,
    workers: u64,
    slowest_ms: u64,
    /// inputs that took more than a second
    slow: u64,
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(6)) => "SIGABRT (abort: failed allocation, stack overflow or a panic that could not unwind)".into(),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

fn supervise(target: Target, seconds: f64, seed: u64) -> i32 {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let exe = std::env::current_exe().unwrap_or_else(|e| die(&format!("cannot find own executable: {e}")));
    let cur = std::env::temp_dir().join(format!("resnet-rs-fuzz-{}-{}.cur", target.name(), std::process::id()));
    println!("fuzz: target {} for {seconds} s, seed {seed} (repeat with --seed {seed})", target.name());
    let mut tally = Tally::default();
    while deadline.saturating_duration_since(Instant::now()) > Duration::from_millis(50) {
        if tally.workers >= 200 {
            println!("fuzz: 200 workers died; stopping early");
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
        let worker_seed = seed.wrapping_add(tally.workers.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        tally.workers += 1;
        let mut child = Command::new(&exe)
            .arg("--worker")
            .arg(target.name())
            .arg(left.to_string())
            .arg(worker_seed.to_string())
            .arg(&cur)
            .arg(if tally.signatures.keys().any(|s| s.starts_with("alloc")) { "0" } else { "1" })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| die(&format!("cannot start a worker: {e}")));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut finished = false;
        let (mut seen_execs, mut worker_slow) = (0, 0);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let fields: Vec<&str> = line.split('\t').collect();
            match fields.as_slice() {
                ["@@finding", sig, _path] => *tally.signatures.entry(sig.to_string()).or_default() += 1,
                [kind @ ("@@stats" | "@@progress"), execs, peak, corpus, added, slowest, slow] => {
                    seen_execs = execs.parse().unwrap_or(0);
                    worker_slow = slow.parse::<u64>().unwrap_or(0);
                    tally.slowest_ms = tally.slowest_ms.max(slowest.parse().unwrap_or(0));
                    tally.peak = tally.peak.max(peak.parse().unwrap_or(0));
                    tally.corpus = tally.corpus.max(corpus.parse().unwrap_or(0));
                    tally.added = tally.added.max(added.parse().unwrap_or(0));
                    finished = *kind == "@@stats";
                }
                _ => println!("{line}"),
            }
        }
        // stdout closed: the worker is gone or going; it ends on its own (deadline, watchdog) or is killed here
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() > deadline + Duration::from_secs(30) => {
                    let _ = child.kill();
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => die(&format!("waiting for the worker: {e}")),
            }
        };
        tally.slow += worker_slow;
        // a worker that died left its scratch directory behind
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            let prefix = format!("resnet-rs-fuzz-{}-", child.id());
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        if finished && status.success() {
            tally.execs += seen_execs;
            continue;
        }
        // The worker died: its last input is the culprit.
        let Some((execs, reason, arg, input)) = current::read(&cur) else {
            println!("fuzz: worker died ({}) before running an input", describe(&status));
            tally.signatures.entry(format!("crash:worker startup {}", describe(&status))).or_default();
            break;
        };
        tally.execs += execs + 1;
        let (kind, message) = match reason {
            REASON_ALLOC => (
                "alloc-abort",
                format!(
                    "an infallible allocation of {arg} bytes would take the live heap above 2 GiB; the worker aborted ({})",
                    describe(&status)
                ),
            ),
            REASON_HANG => {
                ("hang", format!("the input ran for more than {} s (stopped after {arg} ms)", HANG_MS / 1000))
            }
            _ => ("crash", format!("the worker died: {}", describe(&status))),
        };
        save_finding(target, kind, &message, &input);
        let sig = match reason {
            REASON_ALLOC => "alloc-abort: an infallible request that would take the live heap above 2 GiB".to_string(),
            _ => signature(kind, &message),
        };
        *tally.signatures.entry(sig).or_default() += 1;
    }
    let _ = std::fs::remove_file(&cur);

    let secs = start.elapsed().as_secs_f64();
    let inputs: u64 = tally.signatures.values().sum();
    println!(
        "fuzz: {}: {} executions in {secs:.1} s ({:.0} exec/s), {} workers, corpus {} (+{} by outcome feedback), peak live heap {:.1} MiB",
        target.name(),
        tally.execs,
        tally.execs as f64 / secs.max(1e-9),
        tally.workers,
        tally.corpus,
        tally.added,
        tally.peak as f64 / (1 << 20) as f64
    );
    println!("fuzz: {}: slowest input {} ms, {} inputs over 1 s", target.name(), tally.slowest_ms, tally.slow);
    if tally.signatures.is_empty() {
        println!("fuzz: {}: no findings", target.name());
    } else {
        println!("fuzz: {}: {} distinct findings ({inputs} inputs):", target.name(), tally.signatures.len());
        for (sig, n) in &tally.signatures {
            println!("  {n:>6} x {sig}");
        }
    }
    println!(
        "summary\t{}\t{secs:.1}\t{}\t{:.0}\t{}\t{inputs}",
        target.name(),
        tally.execs,
        tally.execs as f64 / secs.max(1e-9),
        tally.signatures.len()
    );
    i32::from(!tally.signatures.is_empty())
}

/// `fuzz TARGET --replay FILE...`: run saved inputs once each (same checks, allocation cap included) and say
/// what happened and how long it took. Exit 1 if any of them is still a finding.
fn replay(target: Target, files: &[String]) -> i32 {
    std::panic::set_hook(Box::new(|info| {
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.to_string());
    }));
    let scratch = Scratch::new();
    let mut status = 0;
    for file in files {
        let input = std::fs::read(file).unwrap_or_else(|e| die(&format!("{file}: {e}")));
        REFUSED.store(0, Relaxed);
        OVER.store(0, Relaxed);
        let before = LIVE.load(Relaxed);
        PEAK.store(before, Relaxed);
        let t = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| harness::run(target, &input, &scratch)));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let peak = PEAK.load(Relaxed).saturating_sub(before) as f64 / (1 << 20) as f64;
        let refused = REFUSED.swap(0, Relaxed).max(OVER.swap(0, Relaxed));
        let what = match result {
            Ok(Outcome::Accepted(m)) => format!("accepted ({m})"),
            Ok(Outcome::Rejected(m)) => format!("rejected: {m}"),
            Err(_) => {
                status = 1;
                format!("PANIC: {}", LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default())
            }
        };
        if refused > 0 {
            status = 1;
            println!("{file}: ALLOCATION of {refused} bytes takes the live heap above 2 GiB");
        }
        if ms > HANG_MS as f64 {
            status = 1;
        }
        println!("{file}: {ms:.1} ms, peak heap +{peak:.1} MiB: {what}");
    }
    status
}

fn die(msg: &str) -> ! {
    eprintln!("fuzz: {msg}");
    std::process::exit(2)
}

const USAGE: &str = "usage: fuzz TARGET SECONDS [--seed N]\n       fuzz TARGET --replay FILE...\n  TARGET: cifar | image | tiff | dicom | idx | safetensors | pth | recipe | calibration | weights-name";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, target, millis, seed, cur, bombs] = args.as_slice()
        && flag == "--worker"
    {
        let target = Target::from_name(target).unwrap_or_else(|| die("bad worker target"));
        let millis = millis.parse().unwrap_or_else(|_| die("bad worker time"));
        let seed = seed.parse().unwrap_or_else(|_| die("bad worker seed"));
        worker(target, millis, seed, Path::new(cur), bombs == "1");
    }
    if let [target, flag, files @ ..] = args.as_slice()
        && flag == "--replay"
    {
        let target = Target::from_name(target).unwrap_or_else(|| die(&format!("unknown target {target:?}\n{USAGE}")));
        std::process::exit(replay(target, files));
    }
    let mut positional = Vec::new();
    let mut seed = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seed" => seed = Some(it.next().and_then(|s| s.parse::<u64>().ok()).unwrap_or_else(|| die(USAGE))),
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            _ => positional.push(a.clone()),
        }
    }
    let [target, seconds] = positional.as_slice() else { die(USAGE) };
    let Some(target) = Target::from_name(target) else { die(&format!("unknown target {target:?}\n{USAGE}")) };
    let seconds: f64 = seconds.parse().ok().filter(|s: &f64| s.is_finite() && *s > 0.0).unwrap_or_else(|| die(USAGE));
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    std::process::exit(supervise(target, seconds, seed));
}
