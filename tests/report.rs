//! The run report: a real training run writes `report.html` with every chart, `resnet report` rewrites the same
//! page, headless Chromium renders it with the curves in their colours, run strings are escaped, and a folder
//! that is not a run or a corrupted metrics file fails in one line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use resnet_rs::report::{self, Run, metrics};
use resnet_rs::train::checkpoint::Position;
use resnet_rs::train::evaluate::Recorded;

const BIN: &str = env!("CARGO_BIN_EXE_resnet");

fn resnet(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Chromium, as Debian installs it (`.ci/run` does); without it the browser check is skipped outside CI.
fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        let ok = Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success());
        ok.then(|| PathBuf::from(name))
    });
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI installs chromium: the report must be checked in a browser");
        eprintln!("chromium not found: the browser check is skipped (apt-get install chromium)");
    }
    found
}

/// How many pixels of `png` are within a few levels of `rgb`.
fn pixels_of(png: &image::RgbImage, rgb: [u8; 3]) -> usize {
    png.pixels().filter(|p| p.0.iter().zip(rgb).all(|(&a, b)| a.abs_diff(b) <= 8)).count()
}

fn screenshot(browser: &Path, html: &Path, out: &Path) -> image::RgbImage {
    let status = Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1000,3400"])
        .arg(format!("--screenshot={}", out.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .unwrap();
    assert!(out.exists(), "chromium wrote no screenshot: {}", String::from_utf8_lossy(&status.stderr));
    image::open(out).unwrap().to_rgb8()
}

#[test]
fn a_run_writes_its_report_and_chromium_shows_the_curves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let d = dir.to_str().unwrap();
    let args = ["train", "--arch", "resnet18", "--epochs", "2", "--monitor-every", "5", "--model-ema", "0.9"];
    let out = Command::new(BIN).args(args).args(["--out", d]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let html_path = dir.join("report.html");
    assert!(stderr.contains(&format!("report: {}", html_path.display())), "{stderr}");
    let html = std::fs::read_to_string(&html_path).unwrap();

    // Self-contained: inline SVG only, nothing fetched, nothing run.
    for chart in ["loss", "accuracy", "learning rate", "gradient norm per layer", "update ratio", "confusion matrix"] {
        assert!(html.contains(chart), "the report has the {chart} chart");
    }
    assert!(html.matches("<svg").count() >= 6);
    for forbidden in ["<script", "src=", "href=", "@import", "url("] {
        assert!(!html.contains(forbidden), "the page loads or runs nothing: found {forbidden}");
    }
    assert!(html.contains("weight EMA"), "the EMA's evaluation is drawn");
    assert!(html.contains("<td class=\"l\">9</td>"), "per-class accuracy lists the digits' classes");

    // `resnet report` gives the same page from the same folder.
    let again = resnet(&["report", d]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), html_path.display().to_string());
    assert_eq!(std::fs::read_to_string(&html_path).unwrap(), html, "the report is a function of the run folder");

    let Some(browser) = chromium() else { return };
    let shot = screenshot(&browser, &html_path, &tmp.path().join("shot.png"));
    let total = (shot.width() * shot.height()) as usize;
    let ink = shot.pixels().filter(|p| p.0.iter().any(|&c| c < 200)).count();
    assert!(ink * 50 > total, "the page is not blank: {ink} of {total} pixels drawn");
    // The curves in their colours: train (blue), val (red), weight EMA (green), and the confusion matrix's blue.
    for (what, rgb, at_least) in
        [("train", [31, 119, 180], 400), ("val", [214, 39, 40], 400), ("EMA", [44, 160, 44], 200)]
    {
        let n = pixels_of(&shot, rgb);
        assert!(n >= at_least, "{what} curves: {n} pixels of {rgb:?} in the screenshot");
    }
}

#[test]
fn strings_from_the_run_are_escaped() {
    let text = br#"{"type":"epoch","epoch":1,"train_loss":1.0,"train_top1":0.5,"val_loss":1.2,"val_top1":0.4,"val_top5":1.0,"images_per_s":10.0,"lr":0.1,"seconds":3.0}
{"type":"note","step":3,"message":"<img src=x onerror=alert(1)>"}
"#;
    let classes = vec!["<script>alert(1)</script>".to_string(), "cats & dogs".to_string()];
    let run = Run {
        dir: PathBuf::from("runs/<b>"),
        recipe: resnet_rs::Recipe::default(),
        position: Position { epoch: 1, global_step: 3, best_epoch: 1, best_top1: 0.4, ..Position::default() },
        metrics: metrics::parse(text).unwrap(),
        best: Some(Recorded {
            epoch: 1,
            classes,
            loss: 1.2,
            top1: 0.4,
            top5: 1.0,
            per_class: vec![0.5, 0.3],
            confusion: vec![vec![1, 1], vec![2, 1]],
        }),
    };
    let html = report::render(&run).unwrap();
    assert!(!html.contains("<script") && !html.contains("<img") && !html.contains("<b>"), "escaped: {html}");
    assert!(html.contains("&lt;script&gt;") && html.contains("cats &amp; dogs"));
}

#[test]
fn not_a_run_and_corrupt_metrics_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let check = |out: Output, wants: &[&str]| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        for w in wants {
            assert!(err.contains(w), "{w:?} in {err}");
        }
    };
    let missing = tmp.path().join("nothing");
    check(resnet(&["report", missing.to_str().unwrap()]), &["nothing", "no such folder"]);
    check(resnet(&["report", tmp.path().to_str().unwrap()]), &["not a training run folder"]);

    let bad = [
        (&b"{\"type\":\"epoch\",\"epoch\":1}\n"[..], "line 1"),
        (&b"\n{\"type\":\"note\",\"step\":1,\"message\":\"x\"}\n{oops\n"[..], "line 3"),
        (&b"{\"epoch\":1}\n"[..], "without a \"type\""),
        (&b"\xff\xfe"[..], "not UTF-8"),
    ];
    for (text, why) in bad {
        let err = metrics::parse(text).unwrap_err().to_string();
        assert!(err.contains(why), "{why:?} in {err}");
    }
}
