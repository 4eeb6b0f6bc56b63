//! A small synthetic ImageFolder for trying the folder workflow on a fresh clone and for the workflow tests:
//! 28x28 grayscale PNGs of three classes that a ResNet tells apart within an epoch or two (horizontal
//! stripes, vertical stripes, a bright centre blob), each one shifted and noised so that no two are alike.
//! `cargo run --release --example shapes -- DIR` writes one.

use std::path::Path;

use image::{GrayImage, Luma};

use crate::error::{Error, Result};

/// The class names, in label order.
pub const CLASSES: [&str; 3] = ["blob", "horizontal", "vertical"];

/// Image `i` of class `class` (an index into `CLASSES`).
pub fn sample(class: usize, i: usize) -> GrayImage {
    let mut state = (class as u64 * 1000 + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 58) as i32
    };
    let shift = (i % 4) as u32;
    GrayImage::from_fn(28, 28, |x, y| {
        let on = match class {
            0 => (x as i32 - 14 - shift as i32).pow(2) + (y as i32 - 14).pow(2) < 60,
            1 => ((y + shift) / 3).is_multiple_of(2),
            _ => ((x + shift) / 3).is_multiple_of(2),
        };
        Luma([(if on { 200 } else { 40 } + noise() * 4).clamp(0, 255) as u8])
    })
}

/// Write `root/<class>/<i>.png` for the first `classes` classes (at most 3) with `per_class` images each.
pub fn write_folder(root: &Path, classes: usize, per_class: usize) -> Result<()> {
    for (c, name) in CLASSES.iter().take(classes).enumerate() {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e))?;
        for i in 0..per_class {
            let path = dir.join(format!("{i:03}.png"));
            sample(c, i).save(&path).map_err(|e| Error::file(&path, e))?;
        }
    }
    Ok(())
}
