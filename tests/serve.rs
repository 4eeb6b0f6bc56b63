//! `resnet serve` from the outside, over real sockets: it answers what `predict --json` and `features` print,
//! batches concurrent requests, keeps serving good clients while hostile ones send non-images, oversized,
//! truncated, slow or abandoned requests, refuses a full queue with 503 + Retry-After, and on SIGTERM finishes
//! what is in flight and exits 0. The short CI versions of the soak in `bench/serve.sh`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{det_init, fixture, rel_err};
use resnet_rs::infer::card::{ModelCard, Preprocess};
use resnet_rs::{Arch, ResNet, ResNetConfig, Stem};

/// A CIFAR-stem resnet18 checkpoint with a model card (32² input, named classes).
fn checkpoint(dir: &Path) -> PathBuf {
    let arch: Arch = "resnet18".parse().unwrap();
    let mut model = ResNet::new(ResNetConfig { stem: Stem::Cifar, ..ResNetConfig::new(arch, 6) }, 0);
    det_init(&mut model);
    let card = ModelCard {
        arch,
        stem: Stem::Cifar,
        classes: Some(["ant", "bee", "cat", "dog", "eel", "fox"].map(String::from).to_vec()),
        preprocess: Preprocess { size: 32, resize: 36, ..Preprocess::imagenet() },
    };
    let path = dir.join("model.safetensors");
    resnet_rs::weights::save_model(&model, &path, &card.to_metadata().unwrap()).unwrap();
    path
}

struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(weights: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_resnet"))
            .args(["serve", "--weights", weights.to_str().unwrap(), "--addr", "127.0.0.1:0"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let first = lines.next().expect("the server prints its address").unwrap();
        let addr =
            first.split("http://").nth(1).and_then(|s| s.split(':').take(2).collect::<Vec<_>>().join(":").parse().ok());
        let addr: SocketAddr = addr.unwrap_or_else(|| panic!("no address in {first:?}"));
        let log = Arc::new(Mutex::new(first + "\n"));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(|l| l.ok()) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let server = Server { child, addr, log };
        let started = Instant::now();
        while get(server.addr, "/v2/health/ready").status != 200 {
            assert!(started.elapsed() < Duration::from_secs(60), "not ready: {}", server.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn terminate(&mut self) -> i32 {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(started.elapsed() < Duration::from_secs(30), "did not exit after SIGTERM: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), read to the end.
fn request(addr: SocketAddr, head: &str, body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!("{head}\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413, say) and close before taking the whole body.
    let _ = s.write_all(body);
    read_reply(&mut s)
}

fn read_reply(s: &mut TcpStream) -> Reply {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = headers.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Reply { status, headers: headers.to_string(), body: body.to_string() }
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    match TcpStream::connect(addr) {
        Ok(_) => request(addr, &format!("GET {path} HTTP/1.1"), b""),
        Err(_) => Reply { status: 0, headers: String::new(), body: String::new() },
    }
}

fn post(addr: SocketAddr, path: &str, body: &[u8]) -> Reply {
    request(addr, &format!("POST {path} HTTP/1.1\r\nContent-Type: application/octet-stream"), body)
}

fn multipart(addr: SocketAddr, path: &str, files: &[(&str, &[u8])]) -> Reply {
    let mut body = Vec::new();
    for (name, bytes) in files {
        let part = format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        );
        body.extend_from_slice(part.as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--XyZ--\r\n");
    request(addr, &format!("POST {path} HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=XyZ"), &body)
}

fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixture(&format!("images/{name}"))).unwrap()
}

/// `resnet predict --json` for the fixture image: its top-k, as JSON.
fn predicted(weights: &Path, name: &str) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args(["predict", "--json", "--weights", weights.to_str().unwrap()])
        .arg(fixture(&format!("images/{name}")))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The same classes in the same order, probabilities within 1e-5 (a batch of another size may take another
/// convolution algorithm: same arithmetic, other rounding).
fn assert_same_top(what: &str, got: &serde_json::Value, want: &serde_json::Value) {
    let top = |v: &serde_json::Value| -> (Vec<String>, Vec<f32>) {
        let entries = v["top"].as_array().unwrap_or_else(|| panic!("{what}: no top in {v}"));
        let labels = entries.iter().map(|e| e["label"].as_str().unwrap().to_string()).collect();
        let p = entries.iter().map(|e| e["probability"].as_f64().unwrap() as f32).collect();
        (labels, p)
    };
    let ((gl, gp), (wl, wp)) = (top(got), top(want));
    assert_eq!(gl, wl, "{what}: labels");
    let e = rel_err(&gp, &wp);
    assert!(e <= 1e-5, "{what}: probabilities differ by {e:.2e}");
}

#[test]
fn serve_answers_what_predict_and_features_print() {
    let dir = tempfile::tempdir().unwrap();
    let weights = checkpoint(dir.path());
    let server = Server::start(&weights, &["--max-batch", "4"]);
    let addr = server.addr;
    assert_eq!(get(addr, "/v2/health/live").json()["live"], true);

    for name in ["cat.png", "coffee.jpg", "camera_grey.png"] {
        let r = post(addr, "/v1/predict", &image(name));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_same_top(name, &r.json(), &predicted(&weights, name));
    }
    let (cat, coffee) = (image("cat.png"), image("coffee.jpg"));
    let r = multipart(addr, "/v1/predict", &[("cat.png", &cat), ("coffee.jpg", &coffee)]);
    assert_eq!(r.status, 200, "{}", r.body);
    let results = r.json();
    assert_eq!(results[0]["file"], "cat.png");
    assert_same_top("multipart cat", &results[0], &predicted(&weights, "cat.png"));
    assert_same_top("multipart coffee", &results[1], &predicted(&weights, "coffee.jpg"));

    // Embeddings: what `resnet features` writes for the same file.
    let out = dir.path().join("features.npy");
    let o = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args(["features", "--weights", weights.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .arg(fixture("images/cat.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let npy = std::fs::read(&out).unwrap();
    let offline: Vec<f32> =
        npy[npy.len() - 512 * 4..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let r = post(addr, "/v1/features", &cat);
    assert_eq!(r.status, 200, "{}", r.body);
    let served: Vec<f32> =
        r.json()["features"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let e = rel_err(&served, &offline);
    assert!(e <= 1e-5, "features differ by {e:.2e}");
    let r = post(addr, "/v1/features?layer=layer2", &cat);
    assert_eq!(r.json()["features"].as_array().unwrap().len(), 128);

    let metrics = get(addr, "/metrics");
    assert_eq!(metrics.status, 200);
    for needle in [
        "resnet_requests_total{endpoint=\"/v1/predict\",code=\"200\"} 4",
        "resnet_request_duration_seconds_bucket",
        "resnet_batch_size_bucket",
        "resnet_queue_depth 0",
        "resnet_images_total 7",
        "resnet_images_per_second",
    ] {
        assert!(metrics.body.contains(needle), "/metrics lacks {needle}:\n{}", metrics.body);
    }
}

#[test]
fn requests_that_arrive_while_others_are_on_their_way_run_as_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let weights = checkpoint(dir.path());
    let server = Server::start(&weights, &["--max-batch", "16", "--max-delay-ms", "5000"]);
    let addr = server.addr;
    let cat = Arc::new(image("cat.png"));
    // A client whose body is still on its way when the others are queued: the executor waits for it (up to
    // the max delay from the oldest queued image), and everything queued meanwhile joins the same batch.
    let slow = {
        let cat = cat.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let head = format!(
                "POST /v1/predict HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                cat.len()
            );
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(&cat[..100]).unwrap();
            std::thread::sleep(Duration::from_millis(800));
            s.write_all(&cat[100..]).unwrap();
            read_reply(&mut s).status
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let cat = cat.clone();
            std::thread::spawn(move || post(addr, "/v1/predict", &cat).status)
        })
        .collect();
    let mut codes: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    codes.push(slow.join().unwrap());
    assert!(codes.iter().all(|&c| c == 200), "{codes:?}");
    let metrics = get(addr, "/metrics").body;
    let count = |name: &str| -> f64 {
        let line = metrics.lines().find_map(|l| l.strip_prefix(name));
        line.and_then(|n| n.trim().parse().ok()).unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    // The warm-up passes are not counted: 13 images in one batch.
    assert_eq!((count("resnet_batch_size_count "), count("resnet_batch_size_sum ")), (1.0, 13.0), "{metrics}");
}

#[test]
fn hostile_clients_get_one_line_errors_and_good_ones_keep_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let weights = checkpoint(dir.path());
    let flags = ["--max-body-mib", "1", "--timeout-s", "2", "--header-timeout-s", "1", "--max-images", "3"];
    let server = Server::start(&weights, &flags);
    let addr = server.addr;
    let cat = image("cat.png");
    let good = || {
        let r = post(addr, "/v1/predict", &cat);
        assert_eq!(r.status, 200, "a good request after a hostile one: {}", r.body);
    };
    let error = |r: Reply, status: u16, needle: &str| {
        assert_eq!(r.status, status, "{needle}: {} {}", r.headers, r.body);
        let msg = r.json()["error"].as_str().unwrap_or_else(|| panic!("no error field: {}", r.body)).to_string();
        assert!(!msg.contains('\n') && msg.contains(needle), "{msg:?} should name {needle:?}");
        good();
    };
    error(post(addr, "/v1/predict", b"definitely not an image"), 400, "not a readable");
    let truncated = &image("coffee.jpg")[..4000];
    error(post(addr, "/v1/predict", truncated), 400, "truncated");
    error(post(addr, "/v1/predict", b""), 400, "empty");
    error(post(addr, "/v1/predict", &vec![7u8; 3 << 20]), 413, "length limit");
    error(multipart(addr, "/v1/predict", &[("cat.png", &cat), ("bad.png", b"nope")]), 400, "bad.png");
    error(multipart(addr, "/v1/predict", &[("a.png", &cat[..]); 4]), 413, "more than 3 images");
    error(post(addr, "/v1/features?layer=layer9", &cat), 400, "unknown layer");
    error(get(addr, "/v1/nothing"), 404, "no such endpoint");

    // A body slower than the request timeout: 408 after the timeout.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\nabc").unwrap();
    let started = Instant::now();
    let r = read_reply(&mut slow);
    assert_eq!(r.status, 408, "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(10));
    good();

    // Headers that never finish: the connection is closed after the header timeout, without an answer.
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stalled.write_all(b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Le").unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = stalled.read_to_end(&mut buf);
    assert!(started.elapsed() < Duration::from_secs(5), "slow-header client held for {:?}", started.elapsed());
    good();

    // Abandoned requests: a body cut short, a client gone before its answer.
    for cut in [10, cat.len() / 2] {
        let mut s = TcpStream::connect(addr).unwrap();
        let head = format!("POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n", cat.len());
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&cat[..cut]).unwrap();
        drop(s);
    }
    let mut s = TcpStream::connect(addr).unwrap();
    let head = format!("POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n", cat.len());
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&cat).unwrap();
    drop(s);
    good();

    let metrics = get(addr, "/metrics").body;
    for code in ["400", "404", "408", "413"] {
        assert!(metrics.contains(&format!("code=\"{code}\"")), "/metrics lacks code {code}:\n{metrics}");
    }
    assert!(server.log().lines().count() <= 3, "nothing logged per bad request:\n{}", server.log());
}

#[test]
fn a_full_queue_is_refused_and_sigterm_finishes_what_is_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let weights = checkpoint(dir.path());
    // 288² through a CIFAR stem is ~45 GFLOP an image, about a second here: long enough to fill a queue of 1.
    let flags = ["--image-size", "288", "--max-batch", "1", "--max-delay-ms", "0", "--queue", "1"];
    let mut server = Server::start(&weights, &flags);
    let addr = server.addr;
    let cat = Arc::new(image("cat.png"));
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let cat = cat.clone();
            std::thread::sleep(Duration::from_millis(if i == 0 { 0 } else { 20 }));
            std::thread::spawn(move || post(addr, "/v1/predict", &cat))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Shut down with requests running and queued: they are answered, then the process exits 0.
    let code = server.terminate();
    let replies: Vec<Reply> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let full: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(code, 0, "exit code after SIGTERM; log:\n{}", server.log());
    assert!(ok >= 1, "the request in flight was answered: {:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(full.iter().any(|r| r.body.contains("queue is full")), "a queue of 1 refused some of 6 requests");
    assert_eq!(ok + full.len(), replies.len(), "every request got 200 or 503");
    assert!(full.iter().all(|r| r.headers.to_ascii_lowercase().contains("retry-after: 1")));
    assert!(server.log().contains("stopping"), "{}", server.log());
}

#[test]
fn startup_failures_are_one_line_errors_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let weights = checkpoint(dir.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"garbage").unwrap();
    for (args, needle) in [
        (vec!["serve", "--weights", weights.to_str().unwrap(), "--addr", &port], "cannot listen"),
        (vec!["serve", "--weights", bad.to_str().unwrap()], "bad.safetensors"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_resnet")).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
}
