//! One error type for everything a user can hand us. Every variant renders as a single line that names the
//! offending file (when there is one) and the problem; the CLI maps all of them to exit code 2.

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
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: impl AsRef<Path>, msg: impl Display) -> Self {
        Error::File { path: path.as_ref().to_path_buf(), msg: one_line(&msg.to_string()) }
    }

    pub fn invalid(msg: impl Display) -> Self {
        Error::Invalid(one_line(&msg.to_string()))
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
