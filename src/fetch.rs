//! HTTP(S) downloads into a file that appears only once its checksum passed: the body streams into
//! `DIR/.NAME.part-PID`, hashed on the way, and is renamed to `DIR/NAME` only after the caller's check of the
//! digest; every failure (network, truncation, wrong bytes, a panic) removes the temporary. Datasets (MD5, as
//! their publishers give it) and pretrained weights (SHA-256, as torchvision names its files) both go through
//! here.
//!
//! Timeouts: 30 s to connect, and `RESNET_DOWNLOAD_TIMEOUT` seconds (default 60) for the response and for each
//! read after it, so that a stalled server fails the download instead of hanging it. A byte-count progress bar
//! is drawn on stderr when stderr is a terminal.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use md5::Digest;

use crate::error::{Error, Result};
use crate::files::TempGuard;

/// Seconds a response or a single read may take before the download is abandoned.
pub const TIMEOUT_ENV: &str = "RESNET_DOWNLOAD_TIMEOUT";

/// The checksum a download is verified with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hash {
    Md5,
    Sha256,
}

impl Hash {
    fn hasher(self) -> Box<dyn Hasher> {
        match self {
            Hash::Md5 => Box::new(md5::Md5::new()),
            Hash::Sha256 => Box::new(sha2::Sha256::new()),
        }
    }
}

/// What `Hash` needs of a digest, object-safe.
trait Hasher {
    fn feed(&mut self, bytes: &[u8]);
    fn hex(self: Box<Self>) -> String;
}

impl<D: Digest> Hasher for D {
    fn feed(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
    fn hex(self: Box<Self>) -> String {
        hex(&self.finalize())
    }
}

/// Download `url` (http or https) to `dest`. `check` sees the body's digest in lowercase hex and accepts it
/// (Ok) or names the mismatch (Err); only an accepted body is renamed into place.
pub fn download(url: &str, dest: &Path, hash: Hash, check: impl FnOnce(&str) -> Result<()>) -> Result<()> {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = dest.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let timeout = Duration::from_secs(
        std::env::var(TIMEOUT_ENV).ok().and_then(|v| v.trim().parse().ok()).filter(|&s| s > 0).unwrap_or(60),
    );
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(timeout))
        .timeout_per_read(Some(timeout))
        .build()
        .new_agent();
    let response = agent.get(url).call().map_err(|e| Error::file(url, format!("download failed: {e}")))?;
    let status = response.status();
    if !status.is_success() {
        let reason = status.canonical_reason().unwrap_or("");
        return Err(Error::file(url, format!("download failed: HTTP {} {reason}", status.as_u16())));
    }
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut body = response.into_body().into_reader();

    let tmp = dir.join(format!(".{name}.part-{}", std::process::id()));
    let guard = TempGuard::new(tmp.clone());
    let file = File::create(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
    let mut out = BufWriter::new(file);
    let progress = progress_bar(total, &name);
    let mut hasher = hash.hasher();
    let mut received: u64 = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                progress.abandon();
                let of = total.map(|t| format!(" of {t}")).unwrap_or_default();
                return Err(Error::file(url, format!("download failed after {received}{of} bytes: {e}")));
            }
        };
        let chunk = buf.get(..n).unwrap_or_default();
        hasher.feed(chunk);
        out.write_all(chunk).map_err(|e| Error::file(&tmp, format!("cannot write: {e}")))?;
        received += n as u64;
        progress.set_position(received);
    }
    progress.finish_and_clear();
    if let Some(total) = total
        && received != total
    {
        return Err(Error::file(url, format!("truncated download: got {received} of {total} bytes")));
    }
    let file = out.into_inner().map_err(|e| Error::file(&tmp, format!("cannot write: {}", e.error())))?;
    file.sync_all().map_err(|e| Error::file(&tmp, format!("cannot write: {e}")))?;
    drop(file);

    check(&hasher.hex())?;
    std::fs::rename(&tmp, dest).map_err(|e| Error::file(dest, format!("cannot write: {e}")))?;
    guard.keep();
    Ok(())
}

/// The digest of a file on disk in lowercase hex.
pub fn digest_of_file(path: &Path, hash: Hash) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = hash.hasher();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.feed(buf.get(..n).unwrap_or_default());
    }
    Ok(hasher.hex())
}

/// The last segment of an http(s) URL's path (the file it names), without query or fragment.
pub fn file_name_of(url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| Error::invalid(format!("{url}: only http:// and https:// URLs can be downloaded")))?;
    let path = rest.split(['?', '#']).next().unwrap_or_default();
    let last = path.split_once('/').map(|(_, p)| p).unwrap_or_default().rsplit('/').next().unwrap_or_default();
    if last.is_empty() || last.starts_with('.') || last.contains('\\') || last.contains('%') {
        return Err(Error::invalid(format!("{url}: the URL does not end in a file name")));
    }
    Ok(last.to_string())
}

/// A byte-count bar on stderr when stderr is a terminal; hidden otherwise (logs, CI, tests).
fn progress_bar(total: Option<u64>, name: &str) -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    let template = if total.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("downloading {name}"));
    bar
}

/// Bytes in lowercase hexadecimal, as checksums are written.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
