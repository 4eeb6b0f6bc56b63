//! A training run killed at any moment (SIGKILL, seeded random times) leaves a checkpoint that loads and that
//! `--resume` continues from; Ctrl-C (SIGINT) or SIGTERM finishes the step, checkpoints, says how to resume and
//! exits 130; a corrupted checkpoint is refused by its checksum.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use resnet_rs::train::checkpoint;

const BIN: &str = env!("CARGO_BIN_EXE_resnet");

/// ResNet-18 on the digits, a checkpoint after every step so that kills often land inside a write.
fn write_recipe(dir: &Path) -> String {
    use resnet_rs::Recipe;
    let path = dir.join("crash.toml");
    let r = Recipe {
        arch: "resnet18".parse().unwrap(),
        batch_size: 16,
        epochs: 3,
        workers: 1,
        monitor_every: 1,
        checkpoint_every: 1,
        ..Recipe::load("digits").unwrap()
    };
    std::fs::write(&path, r.to_toml()).unwrap();
    path.to_string_lossy().into_owned()
}

fn start(recipe: &str, out: &Path, stderr: Stdio) -> Child {
    Command::new(BIN)
        .args(["train", "--recipe", recipe, "--out"])
        .arg(out)
        .env("RAYON_NUM_THREADS", "2")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Wait until the run has written its first checkpoint (it writes one before the first step).
fn wait_for_checkpoint(child: &mut Child, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dir.join("last.safetensors").exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before writing a checkpoint");
        assert!(Instant::now() < deadline, "no checkpoint after 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Resume for one more step and check that it continued from `step`; the folder is then clean: no temporary
/// files, every metrics line is JSON.
fn resume_one_step(dir: &Path, step: u64) {
    let out = Command::new(BIN)
        .args(["train", "--resume"])
        .arg(dir)
        .args(["--max-steps", &(step + 1).to_string()])
        .env("RAYON_NUM_THREADS", "2")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(
        out.status.success(),
        "resume from step {step} failed: {}: {} (folder: {names:?})",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    let after = checkpoint::load(&dir.join("last.safetensors")).unwrap();
    assert_eq!(after.position.global_step, step + 1, "the resumed run continued from the checkpoint");
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp-"), "stale temporary file {name}");
    }
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("metrics line {line:?}: {e}"));
    }
}

/// SplitMix64: a seeded source of kill delays, so a failure replays.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn sigkill_at_random_moments_always_leaves_a_resumable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write_recipe(tmp.path());
    let mut seed = 20261127u64;
    let (mut steps_seen, mut mid_write) = (Vec::new(), 0);
    for trial in 0..20 {
        let dir = tmp.path().join(format!("run{trial}"));
        let mut child = start(&recipe, &dir, Stdio::null());
        wait_for_checkpoint(&mut child, &dir);
        std::thread::sleep(Duration::from_millis(next(&mut seed) % 2500));
        child.kill().unwrap(); // SIGKILL: no handler runs, no buffer is flushed
        child.wait().unwrap();
        let names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        mid_write += names.iter().any(|n| n.contains(".tmp-")) as usize;
        let c = checkpoint::load(&dir.join("last.safetensors"))
            .unwrap_or_else(|e| panic!("trial {trial}: the last checkpoint does not load: {e}"));
        steps_seen.push(c.position.global_step);
        resume_one_step(&dir, c.position.global_step);
    }
    // The kills must have landed at different points of the run, not all before the first step.
    assert!(steps_seen.iter().any(|&s| s > 0), "kill points: {steps_seen:?}");
    eprintln!("killed after steps {steps_seen:?}; {mid_write} of 20 kills landed inside a checkpoint write");
}

#[cfg(unix)]
#[test]
fn sigint_and_sigterm_finish_the_step_checkpoint_and_exit_130() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write_recipe(tmp.path());
    for signal in ["INT", "TERM"] {
        let dir = tmp.path().join(signal);
        let mut child = start(&recipe, &dir, Stdio::piped());
        wait_for_checkpoint(&mut child, &dir);
        std::thread::sleep(Duration::from_millis(700));
        let sent = Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
        assert!(sent.success());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "SIG{signal}: {stderr}");
        let c = checkpoint::load(&dir.join("last.safetensors")).unwrap();
        let hint = format!(
            "interrupted after step {}; checkpoint saved, continue with: resnet train --resume {}",
            c.position.global_step,
            dir.display()
        );
        assert!(stderr.lines().any(|l| l == hint), "SIG{signal}: expected {hint:?} in {stderr}");
        assert!(c.position.global_step > 0, "SIG{signal} came after at least one step");
        let report = std::fs::read_to_string(dir.join("report.html")).expect("an interrupted run writes its report");
        assert!(report.contains(&format!(" {} steps (", c.position.global_step)), "the report shows where it stopped");
        resume_one_step(&dir, c.position.global_step);
    }
}

#[test]
fn a_corrupted_checkpoint_is_refused_by_its_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write_recipe(tmp.path());
    let dir = tmp.path().join("run");
    let status = Command::new(BIN)
        .args(["train", "--recipe", &recipe, "--max-steps", "1", "--out"])
        .arg(&dir)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let path = dir.join("last.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 1000] ^= 0x10; // one flipped bit in the tensor data: the file still parses
    std::fs::write(&path, &bytes).unwrap();
    let out = Command::new(BIN).args(["train", "--resume"]).arg(&dir).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("last.safetensors") && stderr.contains("checksum mismatch"), "{stderr}");
    let msg = resnet_rs::weights::load_state_dict(&path).err().unwrap().to_string();
    assert!(msg.contains("checksum mismatch"), "predict/eval/--weights refuse it too: {msg}");
}
