//! Fetch a dataset tarball over HTTP(S), check its MD5 and unpack it, without ever leaving a half-written
//! file or folder where a later run would mistake it for a good one:
//!
//! - the body streams into `dest_dir/.NAME.part-PID`, hashed on the way, and is renamed to `dest_dir/NAME`
//!   only once the MD5 matches (`crate::fetch`);
//! - the archive unpacks into `dest_dir/.NAME.unpack-PID` and its top-level entries are renamed into
//!   `dest_dir` only once every entry unpacked;
//! - `dest_dir/NAME.unpacked` (the unpacked folder's name and the MD5) is written last, atomically, and is what
//!   lets the next call reuse the folder without touching the network.
//!
//! A tarball already in `dest_dir` under its URL's file name with the right MD5 (say, copied there by hand on
//! a machine without network) is unpacked without downloading.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use crate::data::cifar::CifarKind;
use crate::error::{Error, Result};
use crate::fetch::{self, Hash, digest_of_file};
use crate::files::{TempGuard, write_atomic};

/// The official tarballs: <https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz>
/// (md5 c32a1d4ab5d03f1284b67883e8d87530) and cifar-100-binary.tar.gz (md5 03b5dce01913d631647c71ecec9e9cb8),
/// the binary versions, because they need no unpickler.
pub fn cifar_url(kind: CifarKind) -> (&'static str, &'static str) {
    match kind {
        CifarKind::Cifar10 => {
            ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530")
        }
        CifarKind::Cifar100 => {
            ("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8")
        }
    }
}

/// The CIFAR folder under `root`: reused when it is already there (however it got there), otherwise the
/// official tarball is downloaded and unpacked into `root`. Returns the path `Cifar::open` takes.
pub fn ensure_cifar(kind: CifarKind, root: &Path) -> Result<PathBuf> {
    let folder = root.join(kind.folder_name());
    if kind.split_files(true).iter().chain(kind.split_files(false)).all(|f| folder.join(f).is_file()) {
        return Ok(folder);
    }
    let (url, md5) = cifar_url(kind);
    download_and_unpack(url, md5, root)
}

/// Fetch `url` (http or https) into `dest_dir`, verify its MD5 against `md5_hex`, and unpack the .tar.gz there;
/// returns the unpacked folder (the archive's single top-level folder, or `dest_dir` when it has several
/// top-level entries). Download to a temporary file and rename only after the checksum passes; an existing,
/// already-unpacked folder is reused without downloading. Tar entries that would land outside `dest_dir`
/// (absolute paths, `..`) and links of any kind are refused.
pub fn download_and_unpack(url: &str, md5_hex: &str, dest_dir: &Path) -> Result<PathBuf> {
    let expected = md5_hex.trim().to_ascii_lowercase();
    if expected.len() != 32 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(format!("{md5_hex:?} is not an MD5 checksum (32 hexadecimal digits)")));
    }
    let name = crate::fetch::file_name_of(url)?;
    std::fs::create_dir_all(dest_dir).map_err(|e| Error::file(dest_dir, format!("cannot create folder: {e}")))?;

    let marker = dest_dir.join(format!("{name}.unpacked"));
    if let Some(folder) = reusable_folder(&marker, &expected, dest_dir) {
        return Ok(folder);
    }

    let archive = dest_dir.join(&name);
    let downloaded_now = if archive.is_file() && digest_of_file(&archive, Hash::Md5).is_ok_and(|got| got == expected) {
        false
    } else {
        fetch::download(url, &archive, Hash::Md5, |got| {
            if got == expected {
                Ok(())
            } else {
                Err(Error::file(url, format!("checksum mismatch: expected {expected}, got {got}")))
            }
        })?;
        true
    };

    let top = match unpack(&archive, dest_dir, &name) {
        Ok(top) => top,
        Err(e) => {
            // A verified archive that does not unpack is of no use to the next run either.
            if downloaded_now {
                let _ = std::fs::remove_file(&archive);
            }
            return Err(e);
        }
    };
    write_atomic(&marker, format!("{top}\n{expected}\n").as_bytes())?;
    Ok(if top == "." { dest_dir.to_path_buf() } else { dest_dir.join(top) })
}

/// The folder a previous call unpacked, if its marker names a folder that still exists and the same MD5.
fn reusable_folder(marker: &Path, expected: &str, dest_dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(marker).ok()?;
    let mut lines = text.lines();
    let top = lines.next()?.trim();
    let md5 = lines.next()?.trim();
    if md5 != expected {
        return None;
    }
    if top == "." {
        return Some(dest_dir.to_path_buf());
    }
    let mut components = Path::new(top).components();
    if !matches!((components.next(), components.next()), (Some(Component::Normal(_)), None)) {
        return None;
    }
    let folder = dest_dir.join(top);
    folder.is_dir().then_some(folder)
}

/// A library's message cut to a readable length (tar quotes whole garbage headers back).
fn clip(msg: &str) -> String {
    const MAX: usize = 160;
    match msg.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", msg.get(..cut).unwrap_or(msg)),
        None => msg.to_string(),
    }
}

/// Unpack `archive` (.tar.gz) into a staging folder inside `dest_dir`, then move its top-level entries into
/// `dest_dir`. Returns the single top-level folder's name, or "." when there are several top-level entries.
fn unpack(archive: &Path, dest_dir: &Path, name: &str) -> Result<String> {
    let staging = dest_dir.join(format!(".{name}.unpack-{}", std::process::id()));
    if staging.exists() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    std::fs::create_dir(&staging).map_err(|e| Error::file(&staging, format!("cannot create folder: {e}")))?;
    let guard = TempGuard::new(staging.clone());

    let file = File::open(archive).map_err(|e| Error::file(archive, format!("cannot read: {e}")))?;
    let corrupt =
        |e: std::io::Error| Error::file(archive, format!("corrupt gzip or tar archive: {}", clip(&e.to_string())));
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    tar.set_preserve_permissions(false);
    tar.set_unpack_xattrs(false);
    let mut top_level: Vec<String> = Vec::new();
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let path = entry.path().map_err(corrupt)?.into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        let Some(rel) = safe_relative(&path) else {
            return Err(Error::file(
                archive,
                format!("tar entry {} would land outside {}; refusing to unpack", path.display(), dest_dir.display()),
            ));
        };
        if !(kind.is_file() || kind.is_dir() || kind.is_gnu_sparse()) {
            return Err(Error::file(
                archive,
                format!("tar entry {} is a {kind:?}; only files and folders are unpacked", path.display()),
            ));
        }
        // "./" itself, as `tar -C dir .` writes it.
        let Some(Component::Normal(first)) = rel.components().next() else {
            continue;
        };
        let first = first.to_string_lossy().into_owned();
        if !top_level.contains(&first) {
            top_level.push(first);
        }
        let target = staging.join(&rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::file(&target, format!("cannot create folder: {e}")))?;
        }
        entry.unpack(&target).map_err(corrupt)?;
    }
    // Read the gzip stream to its end so its CRC and length trailer are checked too.
    let mut rest = tar.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(corrupt)?;
    if top_level.is_empty() {
        return Err(Error::file(archive, "the archive holds no files"));
    }

    for entry in &top_level {
        let from = staging.join(entry);
        let to = dest_dir.join(entry);
        // Whatever stands under the same name (an older or partial unpacking) is replaced by the verified copy.
        if to.is_dir() {
            std::fs::remove_dir_all(&to).map_err(|e| Error::file(&to, format!("cannot replace: {e}")))?;
        } else if to.exists() {
            std::fs::remove_file(&to).map_err(|e| Error::file(&to, format!("cannot replace: {e}")))?;
        }
        std::fs::rename(&from, &to).map_err(|e| Error::file(&to, format!("cannot move into place: {e}")))?;
    }
    drop(guard);
    Ok(match top_level.as_slice() {
        [one] if dest_dir.join(one).is_dir() => one.clone(),
        _ => ".".to_string(),
    })
}

/// The entry's path as plain folder names (empty for "."), or None when it is absolute or climbs out with `..`.
fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut rel = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(rel)
}
