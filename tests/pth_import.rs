//! Importing PyTorch `.pth` state_dicts: the files written by python/fixtures/pth_cases.py must come back exactly
//! as torch's `.float()` gives them, and hostile or damaged files must be refused with an error naming the file,
//! never a panic, never code execution, never a giant allocation.

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use resnet_rs::Tensor;
use resnet_rs::weights::pth::{load_pth, load_pth_bytes};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

const GOOD: [&str; 5] = ["tiny", "half", "dtypes", "wrapped", "views"];

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pth")).join(name)
}

fn expected(name: &str) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(fixture(&format!("{name}.expected.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}: {k}");
            let data = v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (k, (v.shape().to_vec(), data))
        })
        .collect()
}

/// Load `<name>.pth` and compare every tensor bit for bit (so -0.0 and the f16 edge cases count) with torch.
fn load_and_compare(name: &str) -> BTreeMap<String, Tensor> {
    let got = load_pth(&fixture(&format!("{name}.pth"))).unwrap();
    let want = expected(name);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{name}: keys");
    for (k, (shape, data)) in &want {
        let t = &got[k];
        assert_eq!(t.shape(), &shape[..], "{name}: shape of {k}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(t.data()), bits(data), "{name}: values of {k}");
    }
    got
}

#[test]
fn plain_state_dict_with_batchnorm() {
    let sd = load_and_compare("tiny");
    assert_eq!(sd.len(), 8);
    // int64 123456789 rounds to the nearest f32, as torch's .float() does; 0-dim stays 0-dim
    let nbt = &sd["1.num_batches_tracked"];
    assert_eq!(nbt.shape(), &[] as &[usize]);
    assert_eq!(nbt.data(), &[123456792.0]);
    assert_eq!(sd["0.weight"].shape(), &[4, 3, 3, 3]);
}

#[test]
fn float16_state_dict() {
    let sd = load_and_compare("half");
    let special = sd["special"].data();
    assert_eq!(special[4], 65504.0);
    assert_eq!(special[8], f32::INFINITY);
    assert!(special[1].is_sign_negative() && special[1] == 0.0);
}

#[test]
fn other_dtypes_protocol_4_and_parameters() {
    let sd = load_and_compare("dtypes");
    assert_eq!(sd["empty"].shape(), &[0, 3]);
    assert_eq!(sd["i32"].data(), &[-7.0, 0.0, 16777216.0]);
    assert!(!sd.contains_key("not_a_tensor"));
}

#[test]
fn checkpoint_wrapper_and_module_prefix() {
    let sd = load_and_compare("wrapped");
    assert!(sd.keys().all(|k| !k.starts_with("module.")));
    assert!(sd.contains_key("0.weight") && sd.contains_key("5.bias"));
}

#[test]
fn views_strides_and_shared_storage() {
    let sd = load_and_compare("views");
    // a transposed arange(12).reshape(3, 4): row-major read-out of the transpose
    assert_eq!(sd["transposed"].shape(), &[4, 3]);
    assert_eq!(&sd["transposed"].data()[..4], &[0.0, 4.0, 8.0, 1.0]);
    assert_eq!(sd["shared_a"].data(), &[1.0, 1.5, 2.0, 2.5, 3.0, 3.5]);
    assert_eq!(sd["shared_b"].data()[0], 5.0);
}

#[test]
fn deflated_archive_loads_the_same() {
    // torch stores entries uncompressed; a user re-zipping the file gets Deflated ones
    let bytes = std::fs::read(fixture("tiny.pth")).unwrap();
    let mut src = ZipArchive::new(Cursor::new(&bytes[..])).unwrap();
    let mut out = ZipWriter::new(Cursor::new(Vec::new()));
    for i in 0..src.len() {
        let mut f = src.by_index(i).unwrap();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
        out.start_file(f.name().unwrap().to_string(), opts).unwrap();
        out.write_all(&data).unwrap();
    }
    let zipped = out.finish().unwrap().into_inner();
    let got = load_pth_bytes(&zipped, Path::new("rezipped.pth")).unwrap();
    assert_eq!(got, load_pth(&fixture("tiny.pth")).unwrap());
}

#[test]
fn pickled_os_system_is_refused() {
    let path = fixture("evil.pth");
    let msg = load_pth(&path).unwrap_err().to_string();
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");
    assert!(msg.contains("refusing to load global posix.system"), "{msg}");
    assert!(!msg.contains('\n'));
}

#[test]
fn missing_file_names_the_file() {
    let msg = load_pth(Path::new("/nonexistent/weights.pth")).unwrap_err().to_string();
    assert!(msg.starts_with("/nonexistent/weights.pth: "), "{msg}");
}

/// Run the loader on damaged bytes, turning a panic into a test failure that says where.
fn try_load(bytes: &[u8], what: &str) -> Result<BTreeMap<String, Tensor>, String> {
    match catch_unwind(AssertUnwindSafe(|| load_pth_bytes(bytes, Path::new("damaged.pth")))) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => panic!("loader panicked on {what}"),
    }
}

#[test]
fn truncated_files_are_errors() {
    for name in GOOD.iter().chain(&["evil"]) {
        let bytes = std::fs::read(fixture(&format!("{name}.pth"))).unwrap();
        for cut in (0..bytes.len()).step_by(97).chain([bytes.len() - 1, bytes.len() - 22]) {
            let msg = try_load(&bytes[..cut], &format!("{name}.pth cut at {cut}"))
                .expect_err(&format!("{name}.pth cut at {cut} loaded"));
            assert!(msg.starts_with("damaged.pth: ") && !msg.contains('\n'), "{msg}");
        }
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    // Every byte of every file, flipped. A flip in a field nobody reads (a timestamp, alignment padding, the
    // serialization id) may load fine, and that is acceptable; a flip inside the pickle must be caught (CRC).
    for name in GOOD.iter().chain(&["evil"]) {
        let bytes = std::fs::read(fixture(&format!("{name}.pth"))).unwrap();
        let mut zip = ZipArchive::new(Cursor::new(&bytes[..])).unwrap();
        let pkl = zip.by_name(&format!("{name}/data.pkl")).unwrap();
        let start = pkl.data_start().unwrap() as usize;
        let pickle_bytes = start..start + pkl.size() as usize;
        drop(pkl);
        for i in 0..bytes.len() {
            for flip in [0xff, 0x01] {
                let mut damaged = bytes.clone();
                damaged[i] ^= flip;
                match try_load(&damaged, &format!("{name}.pth byte {i} ^ {flip:#x}")) {
                    Err(msg) => assert!(msg.starts_with("damaged.pth: ") && !msg.contains('\n'), "{msg}"),
                    Ok(_) => assert!(!pickle_bytes.contains(&i), "{name}.pth: pickle byte {i} ^ {flip:#x} unnoticed"),
                }
            }
        }
    }
}

// ---- hand-made hostile archives -------------------------------------------------------------------------------

/// A tiny pickle assembler (protocol 2 opcodes, as torch.save writes them).
#[derive(Default)]
struct Pkl(Vec<u8>);

impl Pkl {
    fn new() -> Self {
        Pkl(vec![0x80, 2])
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn str(self, s: &str) -> Self {
        self.raw(b"X").raw(&(s.len() as u32).to_le_bytes()).raw(s.as_bytes())
    }
    fn int(self, i: i64) -> Self {
        // LONG1 with 8 bytes covers every value, including ones past i32
        self.raw(&[0x8a, 8]).raw(&i.to_le_bytes())
    }
    fn global(self, module: &str, name: &str) -> Self {
        self.raw(b"c").raw(module.as_bytes()).raw(b"\n").raw(name.as_bytes()).raw(b"\n")
    }
    fn tuple(self, items: &[i64]) -> Self {
        items.iter().fold(self.raw(b"("), |p, &i| p.int(i)).raw(b"t")
    }
    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` on the stack.
    fn tensor(self, class: &str, key: &str, numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Self {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .raw(b"((")
            .str("storage")
            .global("torch", class)
            .str(key)
            .str("cpu")
            .int(numel)
            .raw(b"tQ")
            .int(offset)
            .tuple(size)
            .tuple(stride)
            .raw(&[0x89])
            .global("collections", "OrderedDict")
            .raw(b")R")
            .raw(b"tR")
    }
    /// `{"w": <tensor>}`, finished.
    fn dict_of(tensor: Pkl) -> Vec<u8> {
        Pkl::new().raw(b"}").str("w").raw(&tensor.0).raw(b"s.").0
    }
}

fn archive(pkl: &[u8], entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    out.start_file("archive/data.pkl", opts).unwrap();
    out.write_all(pkl).unwrap();
    for (name, data) in entries {
        out.start_file(format!("archive/{name}"), opts).unwrap();
        out.write_all(data).unwrap();
    }
    out.finish().unwrap().into_inner()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Load, expecting a one-line refusal that names the file; returns the message.
fn refused(bytes: &[u8]) -> String {
    let msg = try_load(bytes, "hand-made file").map(|_| ()).expect_err("hostile file loaded");
    assert!(msg.starts_with("damaged.pth: ") && !msg.contains('\n'), "{msg}");
    msg
}

fn tensor(numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Pkl {
    Pkl::default().tensor("FloatStorage", "0", numel, offset, size, stride)
}

#[test]
fn hand_made_archive_loads() {
    // sanity check of the assembler: offset 1, a strided view of a 6-element storage, 8-byte LONG1 ints
    let pkl = Pkl::dict_of(tensor(6, 1, &[2, 2], &[1, 2]));
    let got = try_load(&archive(&pkl, &[("data/0", &f32_bytes(&[0., 1., 2., 3., 4., 5.]))]), "ok").unwrap();
    assert_eq!(got["w"].data(), &[1.0, 3.0, 2.0, 4.0]);
    // the same under {"model": ...}, with "module." keys
    let pkl = Pkl::new().raw(b"}").str("model").raw(b"}").str("module.w").raw(&tensor(1, 0, &[], &[]).0).raw(b"ss.");
    let got = try_load(&archive(&pkl.0, &[("data/0", &f32_bytes(&[7.0]))]), "ok").unwrap();
    assert_eq!(got["w"].data(), &[7.0]);
}

#[test]
fn absurd_sizes_are_refused_before_allocating() {
    let storage = f32_bytes(&[1.0; 4]);
    let entries: &[(&str, &[u8])] = &[("data/0", &storage)];
    // 10^15 elements claimed over a 4-element storage
    let msg = refused(&archive(&Pkl::dict_of(tensor(4, 0, &[1_000_000_000_000_000], &[1])), entries));
    assert!(msg.contains("reaches past its storage"), "{msg}");
    // ... and the header also claiming the storage is that large
    let big = 1_000_000_000_000_000;
    let msg = refused(&archive(&Pkl::dict_of(tensor(big, 0, &[big], &[1])), entries));
    assert!(msg.contains("more elements than"), "{msg}");
    // stride 0: every index lands on element 0, but 10^15 outputs would still be allocated
    let msg = refused(&archive(&Pkl::dict_of(tensor(4, 0, &[100_000, 100_000, 100_000], &[0, 0, 0])), entries));
    assert!(msg.contains("more elements than"), "{msg}");
    // overflow of offset + (size - 1) * stride
    refused(&archive(&Pkl::dict_of(tensor(4, 1, &[2], &[i64::MAX])), entries));
    // negative numbers
    refused(&archive(&Pkl::dict_of(tensor(4, -1, &[2], &[1])), entries));
    refused(&archive(&Pkl::dict_of(tensor(4, 0, &[-2], &[1])), entries));
    // a view that ends one element past the storage
    refused(&archive(&Pkl::dict_of(tensor(4, 1, &[2, 2], &[2, 1])), entries));
    // a string length of 4 GiB in a 20-byte pickle
    refused(&archive(&Pkl::new().raw(b"X\xff\xff\xff\xff").0, entries));
    refused(&archive(&Pkl::new().raw(&[0x8d, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).0, entries));
    // a 200-byte integer
    refused(&archive(&Pkl::new().raw(&[0x8a, 200]).raw(&[1; 200]).raw(b".").0, entries));
}

#[test]
fn storage_problems_are_refused() {
    let pkl = Pkl::dict_of(tensor(4, 0, &[4], &[1]));
    let msg = refused(&archive(&pkl, &[]));
    assert!(msg.contains("data/0 is missing"), "{msg}");
    let msg = refused(&archive(&pkl, &[("data/0", &f32_bytes(&[1.0; 3]))]));
    assert!(msg.contains("holds 12 bytes"), "{msg}");
    let msg = refused(&archive(&pkl, &[("data/0", &f32_bytes(&[1.0; 4])), ("byteorder", b"big")]));
    assert!(msg.contains("big-endian"), "{msg}");
    // a storage type we do not know
    let pkl = Pkl::dict_of(Pkl::default().tensor("ComplexFloatStorage", "0", 4, 0, &[4], &[1]));
    let msg = refused(&archive(&pkl, &[("data/0", &f32_bytes(&[1.0; 8]))]));
    assert!(msg.contains("torch.ComplexFloatStorage"), "{msg}");
}

#[test]
fn dangerous_globals_are_refused() {
    for (module, name) in [("builtins", "eval"), ("os", "system"), ("__builtin__", "exec"), ("torch", "load")] {
        let pkl = Pkl::new().global(module, name).str("print(1)").raw(&[0x85]).raw(b"R.").0;
        let msg = refused(&archive(&pkl, &[]));
        assert!(msg.contains(&format!("refusing to load global {module}.{name}")), "{msg}");
        // the same through STACK_GLOBAL (protocol 4)
        let pkl = Pkl::new().str(module).str(name).raw(&[0x93]).raw(b")R.").0;
        let msg = refused(&archive(&pkl, &[]));
        assert!(msg.contains(&format!("{module}.{name}")), "{msg}");
    }
    // allowed callables with the wrong arguments, and calling a non-callable
    refused(&archive(&Pkl::new().global("collections", "OrderedDict").raw(b"N\x85R.").0, &[]));
    refused(&archive(&Pkl::new().global("torch", "FloatStorage").raw(b")R.").0, &[]));
    refused(&archive(&Pkl::new().str("x").raw(b")R.").0, &[]));
}

#[test]
fn malformed_pickles_are_refused() {
    let cases: &[(&[u8], &str)] = &[
        (b"\x80\x02t.", "no MARK"),        // TUPLE without MARK
        (b"\x80\x02(N0.", "opcode 0x30"),  // POP: not in our subset
        (b"\x80\x02R.", "underflow"),      // REDUCE on an empty stack
        (b"\x80\x02(u.", "underflow"),     // SETITEMS with nothing under the mark
        (b"\x80\x02}(K\x01u.", "odd"),     // SETITEMS with a key but no value
        (b"\x80\x02N(s.", "underflow"),    // SETITEM may not reach below a MARK
        (b"\x80\x02h\x05.", "memo key 5"), // BINGET of an unset memo slot
        (b"\x80\x02j\xff\xff\xff\xff.", "memo key"),
        (b"\x80\x02]}b.", "BUILD on"), // BUILD on a list
        (b"\x80\x02N.", "not a dict"), // top level is not a dict
        (b"\x80\x02}.", "no tensors"),
        (b"\x80\x02}", "truncated"), // no STOP
        (b"\x80\x09}.", "protocol 9"),
        (b"\x80\x02cos\nsys", "truncated"), // GLOBAL without its newline
        (b"\x80\x02Q.", "underflow"),
        (b"\x80\x02K\x01Q.", "expected a tuple"),
        (b"\x80\x02X\x02\x00\x00\x00\xff\xfe.", "UTF-8"),
        (b"", "truncated"),
    ];
    for (pkl, want) in cases {
        let msg = refused(&archive(pkl, &[]));
        assert!(msg.contains(want), "{pkl:?}: expected {want:?} in {msg}");
    }
}

#[test]
fn deep_and_cyclic_structures_do_not_recurse() {
    // a million nested lists (each appended into the one below): Python-style recursive code would blow the stack
    let n = 1_000_000;
    let mut pkl = Pkl::new().raw(b"}").str("w").0;
    pkl.extend(std::iter::repeat_n(b']', n));
    pkl.extend(std::iter::repeat_n(b'a', n - 1));
    pkl.extend_from_slice(b"s.");
    let msg = refused(&archive(&pkl, &[]));
    assert!(msg.contains("no tensors"), "{msg}");
    // deep nesting next to a real tensor is just an ignored entry
    let mut pkl = Pkl::new().raw(b"}").str("w").raw(&tensor(1, 0, &[], &[]).0).raw(b"s").str("junk").0;
    pkl.extend(std::iter::repeat_n(b']', n));
    pkl.extend(std::iter::repeat_n(b'a', n - 1));
    pkl.extend_from_slice(b"s.");
    let got = try_load(&archive(&pkl, &[("data/0", &f32_bytes(&[3.0]))]), "deep junk").unwrap();
    assert_eq!(got.len(), 1);
    // a million MARKs never closed
    let mut pkl = Pkl::new().0;
    pkl.extend(std::iter::repeat_n(b'(', n));
    refused(&archive(&pkl, &[]));
    // a dict that contains itself
    let pkl = Pkl::new().raw(b"}q\x00").str("self").raw(b"h\x00s.").0;
    refused(&archive(&pkl, &[]));
}

#[test]
fn not_a_torch_zip() {
    assert!(refused(b"").contains("not a torch.save zip archive"));
    assert!(refused(b"\x80\x02}q\x00.").contains("legacy"));
    let mut out = ZipWriter::new(Cursor::new(Vec::new()));
    out.start_file("archive/other.txt", SimpleFileOptions::default()).unwrap();
    out.write_all(b"hello").unwrap();
    let bytes = out.finish().unwrap().into_inner();
    assert!(refused(&bytes).contains("no data.pkl"));
}

/// A zip bomb (found by fuzz/): data.pkl deflated from 64 MiB of zeros. Refused from its declared size, before
/// anything is inflated, with peak memory nowhere near the claim.
#[test]
fn zip_bomb_is_refused_before_inflating() {
    use std::io::Write;
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut buf);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("archive/data.pkl", opts).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        zip.write_all(&zeros).unwrap();
    }
    zip.finish().unwrap();
    let bytes = buf.into_inner();
    assert!(bytes.len() < 1 << 20, "the bomb is small: {} bytes", bytes.len());
    let err = resnet_rs::weights::pth::load_pth_bytes(&bytes, std::path::Path::new("bomb.pth")).err().unwrap();
    let msg = err.to_string();
    assert!(msg.starts_with("bomb.pth: archive/data.pkl claims 67108864 bytes"), "{msg}");
}
