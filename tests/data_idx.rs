//! IDX datasets (MNIST layout): the parser on synthetic files (raw and gzip, class names, hostile headers), and
//! the real Fashion-MNIST from Debian's `dataset-fashion-mnist` (which `.ci/run` installs) through the
//! `fashion-mnist` recipe's loader.

use std::io::Write;
use std::path::Path;

use resnet_rs::Dataset;
use resnet_rs::data::idx::Idx;

fn images_file(n: u32, rows: u32, cols: u32, pixel: impl Fn(u32, u32) -> u8) -> Vec<u8> {
    let mut out = vec![0, 0, 8, 3];
    for d in [n, rows, cols] {
        out.extend(d.to_be_bytes());
    }
    for i in 0..n {
        out.extend((0..rows * cols).map(|p| pixel(i, p)));
    }
    out
}

fn labels_file(labels: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, 1];
    out.extend((labels.len() as u32).to_be_bytes());
    out.extend(labels);
    out
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn write_set(dir: &Path, prefix: &str, n: u32, compress: bool) {
    let images = images_file(n, 4, 3, |i, p| (i * 16 + p) as u8);
    let labels = labels_file(&(0..n).map(|i| (i % 3) as u8).collect::<Vec<_>>());
    let (img_name, lab_name) = (format!("{prefix}-images-idx3-ubyte"), format!("{prefix}-labels-idx1-ubyte"));
    if compress {
        std::fs::write(dir.join(img_name + ".gz"), gz(&images)).unwrap();
        std::fs::write(dir.join(lab_name + ".gz"), gz(&labels)).unwrap();
    } else {
        std::fs::write(dir.join(img_name), images).unwrap();
        std::fs::write(dir.join(lab_name), labels).unwrap();
    }
}

#[test]
fn train_and_test_pairs_load_raw_or_gzipped() {
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path(), "train", 5, true);
    write_set(dir.path(), "t10k", 2, false);
    let (train, test) = Idx::open(dir.path()).unwrap();
    assert_eq!((train.len(), test.len()), (5, 2));
    assert_eq!(train.class_names(), ["0", "1", "2"]);
    let (img, label) = train.get(4).unwrap();
    assert_eq!((img.dimensions(), img.bands(), label), ((3, 4), 1, 1));
    let resnet_rs::Samples::U8(px) = img.samples() else { panic!("8-bit") };
    assert_eq!(px, &(64..76).collect::<Vec<u8>>(), "image 4 as stored, row-major");
    assert!(train.get(5).is_err());
    // A classes.txt names them.
    std::fs::write(dir.path().join("classes.txt"), "ant\nbee\ncat\n").unwrap();
    assert_eq!(Idx::open(dir.path()).unwrap().0.class_names(), ["ant", "bee", "cat"]);
    std::fs::write(dir.path().join("classes.txt"), "ant\n").unwrap();
    let err = Idx::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("classes.txt") && err.contains("names 1 classes"), "{err}");
}

#[test]
fn hostile_idx_files_fail_in_one_line_before_allocating() {
    let p = Path::new("x-images-idx3-ubyte");
    let l = Path::new("x-labels-idx1-ubyte");
    let labels = labels_file(&[0, 1]);
    let good = images_file(2, 2, 2, |_, _| 7);
    assert!(Idx::parse(&good, &labels, p, l).is_ok());
    let mut huge = good.clone();
    huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes()); // 4 billion images claimed by 8 bytes
    let mut wide = good.clone();
    wide[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut signed = good.clone();
    signed[2] = 0x09;
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![
        ("short", good[..10].to_vec(), labels.clone(), "too short"),
        ("truncated", good[..good.len() - 1].to_vec(), labels.clone(), "pixel bytes"),
        ("huge count", huge, labels.clone(), "holds 2 labels for 4294967295 images"),
        ("huge side", wide, labels.clone(), "out of range"),
        ("not bytes", signed, labels.clone(), "not an IDX file"),
        ("label count", good.clone(), labels_file(&[0]), "holds 1 labels for 2 images"),
        ("labels as images", labels.clone(), labels.clone(), "too short for an IDX header"),
        ("images as labels", good.clone(), good.clone(), "not an IDX file of unsigned bytes with 1 dimension"),
    ];
    for (what, images, labels, says) in cases {
        let err = Idx::parse(&images, &labels, p, l).err().unwrap_or_else(|| panic!("{what}: accepted")).to_string();
        assert!(err.contains(says) && !err.contains('\n'), "{what}: {err}");
    }
}

#[test]
fn debian_fashion_mnist_loads_with_its_class_names() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    if !dir.is_dir() {
        assert!(std::env::var_os("CI").is_none(), "CI installs dataset-fashion-mnist: {} is missing", dir.display());
        eprintln!("skipped: {} is not installed (apt-get install dataset-fashion-mnist)", dir.display());
        return;
    }
    let (train, test) = Idx::open(dir).unwrap();
    assert_eq!((train.len(), test.len()), (60000, 10000));
    assert_eq!(train.class_names()[9], "Ankle boot");
    assert_eq!(train.class_names()[0], "T-shirt/top");
    // The dataset's first training image is an ankle boot, its first test image too.
    assert_eq!(train.get(0).unwrap().1, 9);
    assert_eq!(test.get(0).unwrap().1, 9);
    let (img, _) = train.get(0).unwrap();
    assert_eq!((img.dimensions(), img.bands()), ((28, 28), 1));
    // 6,000 of each class in training, 1,000 in test.
    let mut counts = [0usize; 10];
    for i in 0..test.len() {
        counts[test.get(i).unwrap().1] += 1;
    }
    assert_eq!(counts, [1000; 10]);
}
