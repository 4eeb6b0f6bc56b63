//! Write the synthetic 3-class ImageFolder of `resnet_rs::data::shapes` (60 images a class) into DIR, to try
//! `resnet train --data DIR` on a fresh clone: `cargo run --release --example shapes -- shapes`.

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: shapes DIR");
        std::process::exit(2);
    };
    if let Err(e) = resnet_rs::data::shapes::write_folder(std::path::Path::new(&dir), 3, 60) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    eprintln!("wrote 3 classes x 60 images to {dir}");
}
