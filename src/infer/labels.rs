//! Class names for predictions: ImageNet's (bundled, torchvision's order) or a user's file, one name per line.

use std::path::Path;

use crate::error::{Error, Result};

const IMAGENET: &str = include_str!("imagenet_classes.txt");

/// `spec` is "imagenet" or a path to a text file; `None` gives "class N" names.
pub fn load(spec: Option<&str>, classes: usize) -> Result<Vec<String>> {
    let names: Vec<String> = match spec {
        None => return Ok((0..classes).map(|c| format!("class {c}")).collect()),
        Some("imagenet") => IMAGENET.lines().map(str::to_string).collect(),
        Some(file) => {
            let path = Path::new(file);
            let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
            text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
        }
    };
    if names.len() != classes {
        let what = spec.unwrap_or_default();
        return Err(Error::file(what, format!("has {} labels but the model has {classes} classes", names.len())));
    }
    Ok(names)
}

/// The names a model's predictions use: `spec` when given, else the checkpoint's own (`card`), else ImageNet's
/// for a 1000-class model (torchvision's files name none), else "class N".
pub fn for_model(spec: Option<&str>, card: Option<Vec<String>>, classes: usize) -> Result<Vec<String>> {
    match (spec, card) {
        (None, Some(names)) => Ok(names),
        (None, None) if classes == 1000 => load(Some("imagenet"), 1000),
        (spec, _) => load(spec, classes),
    }
}
