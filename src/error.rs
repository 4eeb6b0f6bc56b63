//! One error type for everything a user can hand us, and for the machine failing under us. Every variant renders
//! as a single line that names the offending file (when there is one) and the problem. The CLI's exit codes say
//! whose fault it is: 2 for bad input (a file, a flag, a request), 3 for the device (a missing or failing GPU,
//! driver or CUDA library, device memory exhausted), 130 for an interrupt. A broken internal invariant is a bug
//! and panics instead.

use std::fmt::Display;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file we were asked to read or write is missing, unreadable, malformed or does not fit the model.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// A bad argument or an inconsistent request (unknown arch, unknown layer, shape mismatch, ...).
    #[error("{0}")]
    Invalid(String),
    /// The GPU, its driver or a CUDA library is missing or failed (device memory exhausted included): nothing
    /// the input could change; the CLI exits with 3.
    #[error("{0}")]
    Device(String),
    /// Training stopped on request (Ctrl-C, SIGTERM) after writing a checkpoint; the CLI exits with 130.
    #[error("interrupted after step {step}; checkpoint saved, continue with: resnet train --resume {}", run_dir.display())]
    Interrupted { step: u64, run_dir: PathBuf },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: impl AsRef<Path>, msg: impl Display) -> Self {
        Error::File { path: path.as_ref().to_path_buf(), msg: one_line(&msg.to_string()) }
    }

    pub fn invalid(msg: impl Display) -> Self {
        Error::Invalid(one_line(&msg.to_string()))
    }

    pub fn device(msg: impl Display) -> Self {
        Error::Device(one_line(&msg.to_string()))
    }

    /// Attach a file name to an error that was raised without one (e.g. by a parser working on bytes).
    pub fn in_file(self, path: impl AsRef<Path>) -> Self {
        match self {
            Error::Invalid(msg) => Error::file(path, msg),
            other => other,
        }
    }
}

/// Error messages must stay on one line even when a library's message spans several.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

thread_local! {
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run third-party parsing code that may panic on hostile input instead of returning an error (the `png` crate
/// does on some malformed palettes), turning a panic into `None`. While `f` runs, this thread's panic message is
/// suppressed so that the user still sees only our one-line error; other threads report panics as usual.
pub fn catch_parser_panic<T>(f: impl FnOnce() -> T) -> Option<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(|q| q.get()) {
                previous(info)
            }
        }));
    });
    let was = QUIET_PANICS.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(was));
    result.ok()
}
