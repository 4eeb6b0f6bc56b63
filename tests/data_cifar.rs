//! CIFAR-10/100: the binary record parser, the dataset, and the download → checksum → unpack path, tested
//! against fake tarballs served by a tiny HTTP server on 127.0.0.1 that each test starts for itself.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;

use common::http::{Reply, Server};

use md5::{Digest, Md5};
use resnet_rs::Dataset;
use resnet_rs::data::cifar::{Cifar, CifarKind};
use resnet_rs::data::download::{cifar_url, download_and_unpack, ensure_cifar};

const PIXELS: usize = 3072;

// ---------------------------------------------------------------------------------------------------------
// Fake data

/// Pixel byte `j` (planar: R plane, G plane, B plane) of the record with id `id`: distinct per record, per
/// plane and per position, so any mix-up of planes, rows or records shows.
fn pixel(id: usize, j: usize) -> u8 {
    let plane = j / 1024;
    let pos = j % 1024;
    ((id * 37 + plane * 85 + pos * 7 + pos / 32) % 256) as u8
}

fn record(kind: CifarKind, id: usize, coarse: u8, fine: u8) -> Vec<u8> {
    let mut r = match kind {
        CifarKind::Cifar10 => vec![fine],
        CifarKind::Cifar100 => vec![coarse, fine],
    };
    r.extend((0..PIXELS).map(|j| pixel(id, j)));
    r
}

const CIFAR10_NAMES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// Label of training record `id` in the fake CIFAR-10 (two records per batch file).
fn train_label(id: usize) -> u8 {
    ((id * 3 + 1) % 10) as u8
}

/// (file name, contents) of a fake `cifar-10-batches-bin`: 2 records in each of the 5 training batches
/// (ids 0..10), 2 in the test batch (ids 100, 101 with labels 9, 0), and batches.meta.txt with blank lines at
/// its end as the official one has.
fn fake_cifar10_files() -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for b in 0..5 {
        let mut bytes = Vec::new();
        for r in 0..2 {
            let id = b * 2 + r;
            bytes.extend(record(CifarKind::Cifar10, id, 0, train_label(id)));
        }
        files.push((format!("data_batch_{}.bin", b + 1), bytes));
    }
    let mut test = record(CifarKind::Cifar10, 100, 0, 9);
    test.extend(record(CifarKind::Cifar10, 101, 0, 0));
    files.push(("test_batch.bin".into(), test));
    files.push(("batches.meta.txt".into(), format!("{}\n\n", CIFAR10_NAMES.join("\n")).into_bytes()));
    files.push(("readme.html".into(), b"<html></html>".to_vec()));
    files
}

fn tar_gz(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    let mut dirs_done = Vec::new();
    for (path, data) in entries {
        if let Some((dir, _)) = path.rsplit_once('/')
            && !dirs_done.contains(&dir.to_string())
        {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_cksum();
            builder.append_data(&mut h, format!("{dir}/"), std::io::empty()).unwrap();
            dirs_done.push(dir.to_string());
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        builder.append_data(&mut h, path, data.as_slice()).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

fn fake_cifar10_tarball() -> Vec<u8> {
    let entries: Vec<_> =
        fake_cifar10_files().into_iter().map(|(n, d)| (format!("cifar-10-batches-bin/{n}"), d)).collect();
    tar_gz(&entries)
}

/// A tarball with a hand-written header, so that names `tar::Builder` refuses to write (`../evil`) and
/// links can be put in.
fn raw_tar_gz(name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    // A harmless entry first: the refusal must come even after good entries were unpacked.
    let mut ok = tar::Header::new_gnu();
    ok.set_mode(0o644);
    ok.set_size(2);
    ok.set_cksum();
    builder.append_data(&mut ok, "good/ok.txt", &b"ok"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    builder.append(&h, data).unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn entries_of(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn err_text<T>(r: resnet_rs::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let s = e.to_string();
            assert!(!s.contains('\n'), "error spans several lines: {s:?}");
            s
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Download, unpack, open

fn check_image(ds: &Cifar, i: usize, id: usize, label: u8) {
    let (img, l) = ds.get(i).unwrap();
    let img = img.to_rgb().expect("CIFAR images are 8-bit RGB");
    assert_eq!(l, label as usize, "label of sample {i}");
    assert_eq!(img.dimensions(), (32, 32));
    // Pixel (x=0, y=0) takes R/G/B from offsets 0/1024/2048 of the record's pixels.
    assert_eq!(img.get_pixel(0, 0).0, [pixel(id, 0), pixel(id, 1024), pixel(id, 2048)]);
    for y in 0..32usize {
        for x in 0..32usize {
            let p = y * 32 + x;
            let want = [pixel(id, p), pixel(id, 1024 + p), pixel(id, 2048 + p)];
            assert_eq!(img.get_pixel(x as u32, y as u32).0, want, "sample {i} pixel ({x},{y})");
        }
    }
}

#[test]
fn download_unpack_open_and_reuse() {
    let tarball = fake_cifar10_tarball();
    let md5 = md5_hex(&tarball);
    let server = Server::start(Reply::Body(tarball));
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("data");
    let url = server.url("cifar-10-binary.tar.gz");

    let folder = download_and_unpack(&url, &md5, &dest).unwrap();
    assert_eq!(folder, dest.join("cifar-10-batches-bin"));
    assert_eq!(server.hits(), 1);
    // Only the verified archive, the folder and the marker: no temporaries.
    assert_eq!(
        entries_of(&dest),
        ["cifar-10-batches-bin", "cifar-10-binary.tar.gz", "cifar-10-binary.tar.gz.unpacked"]
    );

    // Opened from the parent (as a user passing --data-dir would) and from the folder itself.
    for dir in [&dest, &folder] {
        let train = Cifar::open(dir, CifarKind::Cifar10, true).unwrap();
        assert_eq!(train.len(), 10);
        assert_eq!(train.num_classes(), 10);
        assert_eq!(train.class_names(), CIFAR10_NAMES);
        let want: Vec<u8> = (0..10).map(train_label).collect();
        assert_eq!(train.labels(), want.as_slice());
        for id in 0..10 {
            check_image(&train, id, id, train_label(id));
        }
        assert!(train.get(10).is_err());

        let test = Cifar::open(dir, CifarKind::Cifar10, false).unwrap();
        assert_eq!(test.len(), 2);
        assert_eq!(test.labels(), [9, 0]);
        check_image(&test, 0, 100, 9);
        check_image(&test, 1, 101, 0);
    }

    // The second call reuses the folder without asking the server.
    let again = download_and_unpack(&url, &md5, &dest).unwrap();
    assert_eq!(again, folder);
    assert_eq!(server.hits(), 1);

    // Uppercase checksums are the same checksum.
    let again = download_and_unpack(&url, &md5.to_uppercase(), &dest).unwrap();
    assert_eq!(again, folder);
    assert_eq!(server.hits(), 1);
}

#[test]
fn tarball_already_in_dest_is_unpacked_without_network() {
    let tarball = fake_cifar10_tarball();
    let md5 = md5_hex(&tarball);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("cifar-10-binary.tar.gz"), &tarball).unwrap();
    // Nothing listens on this port.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/cifar-10-binary.tar.gz");
    let folder = download_and_unpack(&url, &md5, tmp.path()).unwrap();
    assert_eq!(Cifar::open(&folder, CifarKind::Cifar10, true).unwrap().len(), 10);
}

#[test]
fn corrupted_tarball_is_refused_and_leaves_nothing() {
    let tarball = fake_cifar10_tarball();
    let md5 = md5_hex(&tarball);
    let mut corrupted = tarball.clone();
    for i in (100..corrupted.len()).step_by(997) {
        corrupted[i] ^= 0xff;
    }
    let server = Server::start(Reply::Body(corrupted.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let err = err_text(download_and_unpack(&server.url("cifar-10-binary.tar.gz"), &md5, tmp.path()));
    assert!(err.contains(&format!("checksum mismatch: expected {md5}, got {}", md5_hex(&corrupted))), "{err}");
    assert!(entries_of(tmp.path()).is_empty(), "left behind: {:?}", entries_of(tmp.path()));
}

#[test]
fn wrong_md5_fails_cleanly() {
    let server = Server::start(Reply::Body(fake_cifar10_tarball()));
    let tmp = tempfile::tempdir().unwrap();
    let url = server.url("cifar-10-binary.tar.gz");
    let wrong = "0123456789abcdef0123456789abcdef";
    let err = err_text(download_and_unpack(&url, wrong, tmp.path()));
    assert!(err.contains("checksum mismatch: expected 0123456789abcdef0123456789abcdef, got "), "{err}");
    assert!(err.contains("cifar-10-binary.tar.gz"), "{err}");
    assert!(entries_of(tmp.path()).is_empty());

    // Not a checksum at all: refused before any request.
    let hits = server.hits();
    let err = err_text(download_and_unpack(&url, "not-an-md5", tmp.path()));
    assert!(err.contains("MD5"), "{err}");
    assert_eq!(server.hits(), hits);
}

#[test]
fn http_404_fails_cleanly() {
    let server = Server::start(Reply::Status(404));
    let tmp = tempfile::tempdir().unwrap();
    let err = err_text(download_and_unpack(&server.url("cifar-10-binary.tar.gz"), &"0".repeat(32), tmp.path()));
    assert!(err.contains("HTTP 404"), "{err}");
    assert!(entries_of(tmp.path()).is_empty());
}

#[test]
fn connection_closed_halfway_fails_cleanly() {
    let tarball = fake_cifar10_tarball();
    let md5 = md5_hex(&tarball);
    let half = tarball.len() / 2;
    let server = Server::start(Reply::CutAfter(tarball, half));
    let tmp = tempfile::tempdir().unwrap();
    let err = err_text(download_and_unpack(&server.url("cifar-10-binary.tar.gz"), &md5, tmp.path()));
    assert!(err.contains("download failed") || err.contains("truncated"), "{err}");
    assert!(entries_of(tmp.path()).is_empty(), "left behind: {:?}", entries_of(tmp.path()));
}

#[test]
fn connection_refused_fails_cleanly() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/cifar-10-binary.tar.gz");
    let err = err_text(download_and_unpack(&url, &"0".repeat(32), tmp.path()));
    assert!(err.contains("download failed"), "{err}");
    assert!(entries_of(tmp.path()).is_empty());
}

#[test]
fn unsupported_urls_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for url in ["ftp://example.org/x.tar.gz", "file:///etc/passwd", "http://127.0.0.1:1/", "http://127.0.0.1:1"] {
        let err = err_text(download_and_unpack(url, &"0".repeat(32), tmp.path()));
        assert!(err.contains(url), "{err}");
    }
    assert!(entries_of(tmp.path()).is_empty());
}

/// Serve `tarball` with its right checksum and expect the unpacking to fail with `needle`, leaving nothing
/// outside `dest` and no temporaries inside it.
fn expect_unpack_refused(tarball: Vec<u8>, needle: &str) {
    let md5 = md5_hex(&tarball);
    let server = Server::start(Reply::Body(tarball));
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("a").join("dest");
    let err = err_text(download_and_unpack(&server.url("evil.tar.gz"), &md5, &dest));
    assert!(err.contains(needle), "{err}");
    assert!(err.contains("evil.tar.gz"), "{err}");
    assert_eq!(entries_of(tmp.path()), ["a"]);
    assert_eq!(entries_of(&tmp.path().join("a")), ["dest"]);
    assert!(entries_of(&dest).is_empty(), "left behind: {:?}", entries_of(&dest));
}

#[test]
fn path_traversal_is_refused() {
    expect_unpack_refused(raw_tar_gz("../evil", tar::EntryType::Regular, None, b"pwned"), "outside");
    expect_unpack_refused(raw_tar_gz("good/../../evil", tar::EntryType::Regular, None, b"pwned"), "outside");
    expect_unpack_refused(raw_tar_gz("/tmp/evil-absolute", tar::EntryType::Regular, None, b"pwned"), "outside");
    assert!(!Path::new("/tmp/evil-absolute").exists());
}

#[test]
fn links_are_refused() {
    expect_unpack_refused(
        raw_tar_gz("good/link", tar::EntryType::Symlink, Some("/etc"), b""),
        "only files and folders",
    );
    expect_unpack_refused(
        raw_tar_gz("good/hard", tar::EntryType::Link, Some("/etc/passwd"), b""),
        "only files and folders",
    );
}

#[test]
fn corrupt_gzip_and_tar_fail_cleanly() {
    // Right checksum, wrong contents: not gzip at all.
    expect_unpack_refused(b"this is not a gzip stream at all".to_vec(), "corrupt gzip or tar");
    // Valid gzip of something that is not a tar archive.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&[0x55u8; 1500]).unwrap();
    expect_unpack_refused(gz.finish().unwrap(), "corrupt gzip or tar");
    // A gzip stream cut short.
    let good = fake_cifar10_tarball();
    expect_unpack_refused(good[..good.len() * 2 / 3].to_vec(), "corrupt gzip or tar");
}

#[test]
fn ensure_cifar_reuses_a_folder_unpacked_by_hand() {
    let tmp = tempfile::tempdir().unwrap();
    write_files(&tmp.path().join("cifar-10-batches-bin"), &fake_cifar10_files());
    let folder = ensure_cifar(CifarKind::Cifar10, tmp.path()).unwrap();
    assert_eq!(folder, tmp.path().join("cifar-10-batches-bin"));
    assert_eq!(Cifar::open(&folder, CifarKind::Cifar10, true).unwrap().len(), 10);
}

#[test]
fn official_urls() {
    let (url, md5) = cifar_url(CifarKind::Cifar10);
    assert_eq!(url, "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz");
    assert_eq!(md5, "c32a1d4ab5d03f1284b67883e8d87530");
    let (url, md5) = cifar_url(CifarKind::Cifar100);
    assert_eq!(url, "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz");
    assert_eq!(md5, "03b5dce01913d631647c71ecec9e9cb8");
}

// ---------------------------------------------------------------------------------------------------------
// Record parsing and opening folders

#[test]
fn parse_records_refuses_bad_batches() {
    let name = Path::new("some/dir/data_batch_3.bin");
    let two = [record(CifarKind::Cifar10, 0, 0, 1), record(CifarKind::Cifar10, 1, 0, 2)].concat();
    let (pixels, labels) = Cifar::parse_records(&two, CifarKind::Cifar10, name).unwrap();
    assert_eq!(labels, [1, 2]);
    assert_eq!(pixels.len(), 2 * PIXELS);
    assert_eq!(pixels[PIXELS], pixel(1, 0));

    let err = err_text(Cifar::parse_records(&two[..two.len() - 1], CifarKind::Cifar10, name));
    assert!(err.starts_with("some/dir/data_batch_3.bin: "), "{err}");
    assert!(err.contains("whole number"), "{err}");

    let err = err_text(Cifar::parse_records(&[], CifarKind::Cifar10, name));
    assert!(err.starts_with("some/dir/data_batch_3.bin: "), "{err}");
    assert!(err.contains("empty"), "{err}");

    let bad = [record(CifarKind::Cifar10, 0, 0, 1), record(CifarKind::Cifar10, 1, 0, 10)].concat();
    let err = err_text(Cifar::parse_records(&bad, CifarKind::Cifar10, name));
    assert!(err.starts_with("some/dir/data_batch_3.bin: "), "{err}");
    assert!(err.contains("record 1: label 10 out of range"), "{err}");
    let bad = record(CifarKind::Cifar10, 0, 0, 255);
    assert!(Cifar::parse_records(&bad, CifarKind::Cifar10, name).is_err());

    // A CIFAR-100 file is not a whole number of CIFAR-10 records (3,074 vs 3,073 bytes) and vice versa.
    let c100 = [record(CifarKind::Cifar100, 0, 3, 1), record(CifarKind::Cifar100, 1, 3, 2)].concat();
    assert!(Cifar::parse_records(&c100, CifarKind::Cifar10, name).is_err());
    assert!(Cifar::parse_records(&two, CifarKind::Cifar100, name).is_err());
}

#[test]
fn parse_records_cifar100_uses_fine_label() {
    let name = Path::new("cifar-100-binary/train.bin");
    let bytes = [
        record(CifarKind::Cifar100, 0, 4, 30),
        record(CifarKind::Cifar100, 1, 19, 99),
        record(CifarKind::Cifar100, 2, 0, 0),
    ]
    .concat();
    let (pixels, labels) = Cifar::parse_records(&bytes, CifarKind::Cifar100, name).unwrap();
    assert_eq!(labels, [30, 99, 0]);
    assert_eq!(pixels.len(), 3 * PIXELS);
    for id in 0..3 {
        assert_eq!(&pixels[id * PIXELS..(id + 1) * PIXELS], (0..PIXELS).map(|j| pixel(id, j)).collect::<Vec<_>>());
    }

    let err = err_text(Cifar::parse_records(&record(CifarKind::Cifar100, 0, 1, 100), CifarKind::Cifar100, name));
    assert!(err.contains("train.bin") && err.contains("label 100 out of range"), "{err}");
    let err = err_text(Cifar::parse_records(&record(CifarKind::Cifar100, 0, 20, 5), CifarKind::Cifar100, name));
    assert!(err.contains("train.bin") && err.contains("coarse label 20"), "{err}");
}

fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn cifar100_folder_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-100-binary");
    let names: Vec<String> = (0..100).map(|i| format!("class_{i}")).collect();
    let train = [record(CifarKind::Cifar100, 0, 7, 42), record(CifarKind::Cifar100, 1, 2, 99)].concat();
    let test = record(CifarKind::Cifar100, 2, 0, 3);
    write_files(
        &dir,
        &[
            ("train.bin".into(), train),
            ("test.bin".into(), test),
            ("fine_label_names.txt".into(), format!("{}\n\n", names.join("\n")).into_bytes()),
            ("coarse_label_names.txt".into(), b"x\n".to_vec()),
        ],
    );
    let ds = Cifar::open(tmp.path(), CifarKind::Cifar100, true).unwrap();
    assert_eq!((ds.len(), ds.num_classes()), (2, 100));
    assert_eq!(ds.class_names(), names);
    check_image(&ds, 0, 0, 42);
    check_image(&ds, 1, 1, 99);
    let ds = Cifar::open(&dir, CifarKind::Cifar100, false).unwrap();
    assert_eq!(ds.labels(), [3]);
    check_image(&ds, 0, 2, 3);
}

#[test]
fn bad_folders_fail_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    // Not a CIFAR folder at all.
    let err = err_text(Cifar::open(tmp.path(), CifarKind::Cifar10, true));
    assert!(err.contains(&tmp.path().display().to_string()) && err.contains("not a CIFAR-10 folder"), "{err}");

    // A batch file missing.
    let dir = tmp.path().join("cifar-10-batches-bin");
    let files: Vec<_> = fake_cifar10_files().into_iter().filter(|(n, _)| n != "data_batch_4.bin").collect();
    write_files(&dir, &files);
    let err = err_text(Cifar::open(tmp.path(), CifarKind::Cifar10, true));
    assert!(err.contains("data_batch_4.bin"), "{err}");
    // The test split does not need it.
    assert_eq!(Cifar::open(tmp.path(), CifarKind::Cifar10, false).unwrap().len(), 2);

    // A truncated batch file.
    let mut files = fake_cifar10_files();
    for (n, d) in &mut files {
        if n == "data_batch_2.bin" {
            d.truncate(5000);
        }
    }
    write_files(&dir, &files);
    let err = err_text(Cifar::open(tmp.path(), CifarKind::Cifar10, true));
    assert!(err.contains("data_batch_2.bin") && err.contains("whole number"), "{err}");

    // Class names that do not match the class count.
    write_files(&dir, &fake_cifar10_files());
    std::fs::write(dir.join("batches.meta.txt"), "cat\ndog\n").unwrap();
    let err = err_text(Cifar::open(tmp.path(), CifarKind::Cifar10, false));
    assert!(err.contains("batches.meta.txt") && err.contains("2 class names"), "{err}");
    std::fs::remove_file(dir.join("batches.meta.txt")).unwrap();
    let err = err_text(Cifar::open(tmp.path(), CifarKind::Cifar10, false));
    assert!(err.contains("batches.meta.txt"), "{err}");
}

#[test]
fn https_to_a_plain_http_server_fails_cleanly() {
    // TLS is compiled in (rustls): the handshake is attempted and fails, instead of "no TLS provider".
    let server = Server::start(Reply::Immediately(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec()));
    let tmp = tempfile::tempdir().unwrap();
    let url = server.url("cifar-10-binary.tar.gz").replacen("http://", "https://", 1);
    let err = err_text(download_and_unpack(&url, &"0".repeat(32), tmp.path()));
    assert!(err.contains("download failed"), "{err}");
    assert!(entries_of(tmp.path()).is_empty());
}
