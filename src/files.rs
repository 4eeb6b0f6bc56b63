//! Files written so that a crash leaves the old file or the new one, never half of one: a temporary name in the
//! same folder, `fsync`, then `rename`. Checkpoints, features, downloads and their markers all go through here.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Write `bytes` to `path` so that a crash leaves either the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_for(path)?;
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::file(path, format!("cannot write: {e}"))
    })
}

/// Make `path` a second name of the file at `existing` (a hard link, made under a temporary name and renamed
/// into place like `write_atomic`'s files): the same bytes without writing them again. Files are only ever
/// replaced by rename, never rewritten in place, so the two names keep their contents when `existing` is
/// replaced later. Fails where the file system has no hard links; the caller then writes the file itself.
pub fn link_atomic(existing: &Path, path: &Path) -> Result<()> {
    let tmp = temporary_for(path)?;
    let _ = std::fs::remove_file(&tmp);
    let result = std::fs::hard_link(existing, &tmp).and_then(|()| std::fs::rename(&tmp, path));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::file(path, format!("cannot link to {}: {e}", existing.display()))
    })
}

/// The temporary `path` is written under before the rename: beside it, named for it and this process.
fn temporary_for(path: &Path) -> Result<PathBuf> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| Error::file(path, "not a file name"))?;
    Ok(dir.join(format!("{}{}", temporary_prefix(&name.to_string_lossy()), std::process::id())))
}

/// `write_atomic`'s temporary name for a file `name`, less the writer's process id.
fn temporary_prefix(name: &str) -> String {
    format!(".{name}.tmp-")
}

/// Remove the temporaries of `names` in `dir` that `write_atomic` left when its writer was killed before the
/// rename.
pub fn remove_stale_temporaries(dir: &Path, names: &[&str]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefixes: Vec<String> = names.iter().map(|n| temporary_prefix(n)).collect();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Removes a temporary file or folder when dropped, unless `keep` was called: every early return and every
/// panic between creating a temporary and renaming it into place cleans up.
pub struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl TempGuard {
    pub fn new(path: PathBuf) -> Self {
        TempGuard { path, armed: true }
    }

    /// The temporary was renamed into place: leave it.
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            if self.path.is_dir() {
                let _ = std::fs::remove_dir_all(&self.path);
            } else {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A linked name keeps the bytes it was linked to when the first name is written again (by rename), and
    /// linking over an existing file replaces it without leaving a temporary behind.
    #[test]
    fn a_linked_name_keeps_its_bytes_when_the_original_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let (last, best) = (dir.path().join("last"), dir.path().join("best"));
        write_atomic(&best, b"older").unwrap();
        write_atomic(&last, b"epoch 1").unwrap();
        link_atomic(&last, &best).unwrap();
        write_atomic(&last, b"epoch 2").unwrap();
        assert_eq!(std::fs::read(&best).unwrap(), b"epoch 1");
        assert_eq!(std::fs::read(&last).unwrap(), b"epoch 2");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no temporary left");
        let e = link_atomic(&dir.path().join("missing"), &best).unwrap_err().to_string();
        assert!(e.contains("cannot link"), "{e}");
        assert_eq!(std::fs::read(&best).unwrap(), b"epoch 1", "a failed link leaves the old file");
    }
}
