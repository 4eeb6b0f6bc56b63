//! ImageFolder on a temporary tree: class and file order, what is skipped, splits, train/val roots, and
//! one-line errors naming the folder or file.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use image::{Rgb, RgbImage};
use resnet_rs::data::loader::{LoaderConfig, Shard, batches};
use resnet_rs::data::transforms::Pipeline;
use resnet_rs::{Dataset, ImageFolder};

fn write_png(path: &Path, shade: u8) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    RgbImage::from_pixel(5, 4, Rgb([shade, 0, 0])).save(path).expect("write png");
}

/// root/{cat,ant}/ with images, a hidden folder and junk that must be skipped.
fn tree(root: &Path) {
    write_png(&root.join("cat/b.png"), 30);
    write_png(&root.join("cat/a.PNG"), 20);
    // A JPEG under an upper-case .JPEG extension.
    let jpeg = root.join("cat/c.JPEG");
    RgbImage::from_pixel(6, 6, Rgb([200, 200, 200])).save_with_format(&jpeg, image::ImageFormat::Jpeg).expect("jpeg");
    write_png(&root.join("ant/z.png"), 10);
    write_png(&root.join("ant/nested/deeper.png"), 99); // not read: no recursion
    write_png(&root.join(".ipynb_checkpoints/x.png"), 1); // hidden folder: not a class
    fs::write(root.join("ant/._z.png"), b"macOS fork").expect("fork"); // hidden file: skipped
    fs::write(root.join("ant/notes.txt"), b"hello").expect("txt");
    fs::write(root.join("README"), b"top-level file").expect("readme");
}

#[test]
fn classes_and_files_in_sorted_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    tree(dir.path());
    let folder = ImageFolder::open(dir.path()).expect("open");
    assert_eq!(folder.classes(), ["ant", "cat"]);
    assert_eq!(folder.class_names(), ["ant", "cat"]);
    assert_eq!(folder.num_classes(), 2);
    let names: Vec<(String, usize)> = folder
        .samples()
        .iter()
        .map(|(p, l)| (p.strip_prefix(dir.path()).expect("under root").display().to_string(), *l))
        .collect();
    let want = [("ant/z.png", 0), ("cat/a.PNG", 1), ("cat/b.png", 1), ("cat/c.JPEG", 1)];
    assert_eq!(names, want.map(|(p, l)| (p.to_string(), l)));
    let (img, label) = folder.get(1).expect("decode");
    assert_eq!((img.dimensions(), img.to_rgb().unwrap().get_pixel(0, 0).0, label), ((5, 4), [20, 0, 0], 1));
    assert_eq!(folder.get(3).expect("jpeg").0.dimensions(), (6, 6));
    assert!(folder.get(4).is_err());
}

#[test]
fn split_is_seeded_disjoint_and_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    for c in 0..3 {
        for i in 0..10 {
            write_png(&dir.path().join(format!("class{c}/{i:02}.png")), (c * 10 + i) as u8);
        }
    }
    let shades = |ds: &Arc<dyn Dataset>| -> Vec<u8> {
        (0..ds.len()).map(|i| ds.get(i).expect("sample").0.to_rgb().unwrap().get_pixel(0, 0).0[0]).collect()
    };
    let (train, val) = ImageFolder::open(dir.path()).expect("open").split(0.2, 7);
    assert_eq!((train.len(), val.len(), train.num_classes()), (24, 6, 3));
    let mut all = [shades(&train), shades(&val)].concat();
    all.sort_unstable();
    assert_eq!(all, (0..30).collect::<Vec<u8>>());
    let (_, val2) = ImageFolder::open(dir.path()).expect("open").split(0.2, 7);
    assert_eq!(shades(&val), shades(&val2));
    // Stratified: 2 of each class's 10, at the indices python/digits_split.py's stratified_split_indices gives.
    assert_eq!(shades(&val), [1, 4, 11, 18, 20, 25]);
    let labels: Vec<usize> = (0..30).map(|i| i / 10).collect();
    let (_, held) = resnet_rs::data::split::stratified_split_indices(&labels, 0.2, 7);
    assert_eq!(held, [1, 4, 11, 18, 20, 25]);
    // A class of one stays in training; a class of two or more always gives one to validation.
    let uneven = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3];
    assert_eq!(
        resnet_rs::data::split::stratified_split_indices(&uneven, 0.1, 3),
        (vec![0, 1, 4, 5, 6, 7, 8, 9, 11, 12], vec![2, 3, 10])
    );
}

#[test]
fn train_val_roots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    assert!(ImageFolder::open_train_val(root, Default::default()).expect("neither").is_none());
    write_png(&root.join("train/a/1.png"), 1);
    write_png(&root.join("train/b/1.png"), 2);
    let err = ImageFolder::open_train_val(root, Default::default()).err().expect("train only").to_string();
    assert!(err.contains("no val/"), "{err}");
    write_png(&root.join("val/a/1.png"), 3);
    let err = ImageFolder::open_train_val(root, Default::default()).err().expect("classes differ").to_string();
    assert!(err.starts_with(&root.join("val").display().to_string()), "{err}");
    assert!(err.contains("only in train/: [\"b\"]"), "{err}");
    write_png(&root.join("val/b/2.png"), 4);
    let (train, val) = ImageFolder::open_train_val(root, Default::default()).expect("ok").expect("train/val");
    assert_eq!((train.len(), val.len()), (2, 2));
    assert_eq!(val.get(1).expect("val b").1, 1);
}

#[test]
fn errors_name_the_folder_or_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope");
    let err = ImageFolder::open(&missing).expect_err("missing").to_string();
    assert!(err.starts_with(&missing.display().to_string()) && err.contains("cannot list folder"), "{err}");
    fs::create_dir_all(dir.path().join("empty_root")).expect("mkdir");
    let err = ImageFolder::open(&dir.path().join("empty_root")).expect_err("no classes").to_string();
    assert!(err.contains("no class folders"), "{err}");
    fs::create_dir_all(dir.path().join("r/a")).expect("mkdir");
    fs::write(dir.path().join("r/a/readme.txt"), b"x").expect("txt");
    let err = ImageFolder::open(&dir.path().join("r")).expect_err("empty class").to_string();
    assert!(err.starts_with(&dir.path().join("r/a").display().to_string()) && err.contains("no jpg"), "{err}");

    // A corrupt image fails on get, and through the loader, naming the file, on one line.
    let bad = dir.path().join("s/a/broken.jpg");
    write_png(&dir.path().join("s/a/good.png"), 5);
    fs::write(&bad, b"\xFF\xD8\xFF\xE0 not really a jpeg").expect("broken");
    let folder = ImageFolder::open(&dir.path().join("s")).expect("open");
    let err = folder.get(0).expect_err("broken").to_string();
    assert!(err.starts_with(&bad.display().to_string()) && !err.contains('\n'), "{err}");
    let cfg =
        LoaderConfig { batch_size: 1, shuffle: false, drop_last: false, workers: 2, seed: 0, shard: Shard::WHOLE };
    let pipeline = Arc::new(Pipeline::imagenet_eval(8, 8));
    let results: Vec<_> = batches(Arc::new(folder), pipeline, None, &cfg, 0, 0).collect();
    assert_eq!(results.len(), 1, "the error is the first batch and ends the pass");
    assert!(results[0].as_ref().expect_err("error").to_string().contains("broken.jpg"));
}
