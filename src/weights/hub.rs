//! Pretrained weights by name: `torchvision:resnet34[:IMAGENET1K_V1]` or any `https://…/name-<sha256 prefix>.pth`
//! URL becomes a verified local file, downloaded once into a cache.
//!
//! torchvision's convention, kept exactly: a published file is named `name-<hex>.pth`, where `<hex>` is the
//! start of the file's SHA-256, and `load_state_dict_from_url(check_hash=True)` refuses a download whose digest
//! does not start with it. Here the check runs on every download and on every use of a cached file (SHA-256 of
//! ResNet-34's 83 MB takes about 0.1 s), so a file corrupted on disk is found before it is loaded; a URL whose
//! name carries no prefix must give one as `#sha256=<hex>`.
//!
//! Where files live: `$RESNET_CACHE`, else `$XDG_CACHE_HOME/resnet-rs`, else `~/.cache/resnet-rs`, under
//! `weights/`. A file PyTorch already downloaded (`$TORCH_HOME/hub/checkpoints`, default
//! `~/.cache/torch/hub/checkpoints`) is used where it lies once it verifies. `RESNET_WEIGHTS_MIRROR` replaces
//! torchvision's base URL (an air-gapped site's server; the tests' server on 127.0.0.1).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fetch::{self, Hash, digest_of_file};
use crate::model::{Arch, FAMILY};

pub const TORCHVISION_BASE: &str = "https://download.pytorch.org/models";
pub const MIRROR_ENV: &str = "RESNET_WEIGHTS_MIRROR";
pub const CACHE_ENV: &str = "RESNET_CACHE";
/// The shortest hash prefix accepted as a check (torchvision's names carry 8 hex digits, 32 bits).
const MIN_PREFIX: usize = 8;

/// One of torchvision's published ImageNet weights (`torchvision/models/resnet.py`, `ResNet*_Weights`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Published {
    pub arch: Arch,
    /// The `WeightsEnum` member: IMAGENET1K_V1 or IMAGENET1K_V2.
    pub tag: &'static str,
    /// torchvision's `DEFAULT` for the architecture.
    pub default: bool,
    /// File name under torchvision's base URL, with the SHA-256 prefix.
    pub file: &'static str,
    /// `resize_size` of the weights' `transforms()` (crop 224 for all of them).
    pub resize: u32,
    /// ImageNet-1K top-1 (%) and file size (MB) as torchvision's metadata gives them.
    pub top1: f32,
    pub megabytes: f32,
}

const fn published(
    arch: Arch,
    tag: &'static str,
    default: bool,
    file: &'static str,
    resize: u32,
    top1: f32,
    megabytes: f32,
) -> Published {
    Published { arch, tag, default, file, resize, top1, megabytes }
}

/// torchvision 0.29's table for the family (`python/make_fixtures.py` writes it from torchvision itself into
/// `tests/fixtures/torchvision_weights.json`, which a test compares with this).
pub const PUBLISHED: &[Published] = &[
    published(FAMILY[0], "IMAGENET1K_V1", true, "resnet18-f37072fd.pth", 256, 69.758, 44.661),
    published(FAMILY[1], "IMAGENET1K_V1", true, "resnet34-b627a593.pth", 256, 73.314, 83.275),
    published(FAMILY[2], "IMAGENET1K_V1", false, "resnet50-0676ba61.pth", 256, 76.130, 97.781),
    published(FAMILY[2], "IMAGENET1K_V2", true, "resnet50-11ad3fa6.pth", 232, 80.858, 97.79),
    published(FAMILY[3], "IMAGENET1K_V1", false, "resnet101-63fe2227.pth", 256, 77.374, 170.511),
    published(FAMILY[3], "IMAGENET1K_V2", true, "resnet101-cd907fc2.pth", 232, 81.886, 170.53),
    published(FAMILY[4], "IMAGENET1K_V1", false, "resnet152-394f9c45.pth", 256, 78.312, 230.434),
    published(FAMILY[4], "IMAGENET1K_V2", true, "resnet152-f82ba261.pth", 232, 82.284, 230.474),
];

impl Published {
    /// `torchvision:resnet50:IMAGENET1K_V2`.
    pub fn name(&self) -> String {
        format!("torchvision:{}:{}", self.arch, self.tag)
    }

    /// Where it is downloaded from: torchvision's server, or `RESNET_WEIGHTS_MIRROR` in its place.
    pub fn url(&self) -> String {
        let base = std::env::var(MIRROR_ENV).ok().filter(|m| !m.trim().is_empty());
        let base = base.as_deref().unwrap_or(TORCHVISION_BASE).trim().trim_end_matches('/');
        format!("{base}/{}", self.file)
    }

    /// The entry for a file of this name (a torchvision file downloaded by hand keeps its name).
    pub fn by_file_name(path: &Path) -> Option<&'static Published> {
        let name = path.file_name()?.to_str()?;
        PUBLISHED.iter().find(|p| p.file == name)
    }
}

/// A file to download: where from, its name in the cache, and the SHA-256 prefix it must have.
#[derive(Clone, Debug, PartialEq)]
pub struct Remote {
    pub url: String,
    pub file: String,
    pub sha256_prefix: String,
}

/// Whether `spec` names weights to fetch (a `torchvision:` name or an http(s) URL) rather than a local file.
pub fn is_remote(spec: &str) -> bool {
    spec.starts_with("torchvision:") || spec.starts_with("https://") || spec.starts_with("http://")
}

/// The published weights a `torchvision:ARCH[:TAG]` name means (`TAG` defaults to torchvision's DEFAULT).
pub fn lookup(name: &str) -> Result<&'static Published> {
    let rest = name.strip_prefix("torchvision:").unwrap_or(name);
    let (arch, tag) = match rest.split_once(':') {
        Some((a, t)) => (a, Some(t)),
        None => (rest, None),
    };
    let known = || PUBLISHED.iter().map(Published::name).collect::<Vec<_>>().join(", ");
    let arch: Arch = arch
        .parse()
        .map_err(|_| Error::invalid(format!("{name}: no such torchvision weights (published: {})", known())))?;
    let tag = tag.map(|t| t.trim().to_ascii_uppercase());
    PUBLISHED
        .iter()
        .find(|p| p.arch == arch && tag.as_deref().map_or(p.default, |t| t == p.tag || (t == "DEFAULT" && p.default)))
        .ok_or_else(|| Error::invalid(format!("{name}: no such torchvision weights (published: {})", known())))
}

/// What `spec` (a `torchvision:` name or a URL) downloads.
pub fn remote(spec: &str) -> Result<Remote> {
    if spec.starts_with("torchvision:") {
        let p = lookup(spec)?;
        return Ok(Remote {
            url: p.url(),
            file: p.file.to_string(),
            sha256_prefix: hash_prefix(p.file).unwrap_or_default(),
        });
    }
    let file = fetch::file_name_of(spec)?;
    let from_fragment = spec.split_once("#sha256=").map(|(_, h)| h.trim().to_ascii_lowercase());
    let prefix = match from_fragment {
        Some(h) if h.len() >= MIN_PREFIX && h.len() <= 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => h,
        Some(h) => {
            return Err(Error::invalid(format!(
                "{spec}: #sha256={h} is not a SHA-256 prefix of {MIN_PREFIX} to 64 hexadecimal digits"
            )));
        }
        None => hash_prefix(&file).ok_or_else(|| {
            Error::invalid(format!(
                "{spec}: the file name carries no SHA-256 prefix (name-<hex>.pth, as torchvision's); add #sha256=<hex> to the URL, or download it yourself and pass the path"
            ))
        })?,
    };
    let url = spec.split('#').next().unwrap_or(spec).to_string();
    Ok(Remote { url, file, sha256_prefix: prefix })
}

/// torchvision's `HASH_REGEX = r"-([a-f0-9]*)\."` applied to a file name: the hex digits between the first
/// `-` that is followed by hex digits and a `.`; only a prefix of at least 8 digits counts as a check.
pub fn hash_prefix(file: &str) -> Option<String> {
    for (at, _) in file.match_indices('-') {
        let rest = file.get(at + 1..)?;
        let hex: String = rest.chars().take_while(|c| matches!(c, '0'..='9' | 'a'..='f')).collect();
        if rest.get(hex.len()..)?.starts_with('.') {
            return (hex.len() >= MIN_PREFIX).then_some(hex);
        }
    }
    None
}

/// The folder downloaded weights are kept in.
pub fn cache_dir() -> Result<PathBuf> {
    let root = user_cache(CACHE_ENV, "resnet-rs")
        .ok_or_else(|| Error::invalid(format!("no cache folder for downloaded weights: set {CACHE_ENV}")))?;
    Ok(root.join("weights"))
}

/// PyTorch's own download folder (`torch.hub.get_dir()/checkpoints`).
fn torch_cache_dir() -> Option<PathBuf> {
    Some(user_cache("TORCH_HOME", "torch")?.join("hub").join("checkpoints"))
}

/// `$override`, else `$XDG_CACHE_HOME/name`, else `~/.cache/name` (empty variables count as unset).
fn user_cache(override_var: &str, name: &str) -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env(override_var)
        .or_else(|| env("XDG_CACHE_HOME").map(|x| x.join(name)))
        .or_else(|| env("HOME").map(|h| h.join(".cache").join(name)))
}

/// A local path as given; a `torchvision:` name or URL as its verified file, downloaded on first use.
pub fn locate(spec: &Path) -> Result<PathBuf> {
    match spec.to_str() {
        Some(s) if is_remote(s) => fetch_remote(&remote(s)?, s),
        _ => Ok(spec.to_path_buf()),
    }
}

/// The verified local copy of `remote`: the cache's, PyTorch's, or a fresh download into the cache.
pub fn fetch_remote(remote: &Remote, spec: &str) -> Result<PathBuf> {
    let dir = cache_dir()?;
    let cached = dir.join(&remote.file);
    let verified = |path: &Path| digest_of_file(path, Hash::Sha256).is_ok_and(|d| d.starts_with(&remote.sha256_prefix));
    if cached.is_file() {
        if verified(&cached) {
            return Ok(cached);
        }
        eprintln!(
            "{}: SHA-256 does not start with {}; downloading it again from {}",
            cached.display(),
            remote.sha256_prefix,
            remote.url
        );
    }
    if let Some(torch) = torch_cache_dir().map(|d| d.join(&remote.file))
        && torch.is_file()
        && verified(&torch)
    {
        return Ok(torch);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, format!("cannot create the weights cache: {e}")))?;
    let by_hand = format!(
        "to install it by hand, put the file (SHA-256 starting {}) at {}",
        remote.sha256_prefix,
        cached.display()
    );
    let fetched = fetch::download(&remote.url, &cached, Hash::Sha256, |got| {
        if got.starts_with(&remote.sha256_prefix) {
            Ok(())
        } else {
            let found = got.get(..remote.sha256_prefix.len()).unwrap_or(got);
            Err(Error::file(
                &remote.url,
                format!(
                    "SHA-256 mismatch: expected prefix {}, found {found}; nothing was cached; {by_hand}",
                    remote.sha256_prefix
                ),
            ))
        }
    });
    match fetched {
        Ok(()) => Ok(cached),
        Err(Error::File { path, msg }) if !msg.contains("SHA-256 mismatch") => {
            Err(Error::file(path, format!("{msg} (fetching {spec}); {by_hand}")))
        }
        Err(e) => Err(e),
    }
}
