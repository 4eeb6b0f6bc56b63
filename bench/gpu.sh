#!/usr/bin/env bash
# The GPU checks and benchmarks on a lent GPU machine, from binaries built elsewhere (no Rust there):
#
#   build machine:  bash bench/gpu.sh build     (cargo build --features cuda into target/cuda, then the stripped
#                                                resnet binary and the three CUDA test binaries into target/gpu)
#   GPU machine:    bash bench/gpu.sh [all|tests|bench|long]   (from a copy of the repository, carrying target/gpu)
#
# `tests` runs tests/cuda.rs, tests/cuda_train.rs and tests/cuda_loop.rs with their ignored GPU tests, except the
# whole-run digits accuracy tests; `long` runs only those (a 12-epoch digits run per device and seed: minutes);
# `bench` runs issue 5's workloads G1 (inference b256 224²), G2 (CIFAR-stem training b512 32²) and G3 (training
# b256 224²) in our binary and in PyTorch (python/bench_torch_gpu.py, with the python3 that has torch) and prints
# ours/PyTorch images/s per precision; `all` is tests then bench, about two minutes on an H200.
# No CUDA toolkit is needed: the binaries load libcuda from the driver and cuDNN, cuBLAS and NVRTC from NVIDIA's
# PyPI wheels (nvidia-cudnn-cu13, nvidia-cublas, nvidia-cuda-nvrtc), found through the Python environment that has
# them (PYTHON, else python3, else a search) and put on LD_LIBRARY_PATH. Logs go to $OUT when set.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WHAT="${1:-all}"
BIN=target/gpu
OUTDIR="${OUT:-$(mktemp -d)}"

if [[ "$WHAT" == build ]]; then
    set -e
    export CARGO_TARGET_DIR=target/cuda
    cargo build --release --features cuda --bin resnet --tests
    mkdir -p "$BIN"
    strip -o "$BIN/resnet" target/cuda/release/resnet
    for t in cuda cuda_train cuda_loop; do
        newest=$(ls -t target/cuda/release/deps/"$t"-* | grep -v '\.d$' | head -n 1)
        strip -o "$BIN/${t//_/-}-tests" "$newest"
    done
    ls -la "$BIN"
    exit 0
fi
nvidia_dir() {
    local py
    for py in "${PYTHON:-}" python3 python; do
        [[ -n "$py" ]] && command -v "$py" >/dev/null 2>&1 || continue
        "$py" -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null && return
    done
    find / -xdev -maxdepth 8 -type d -path '*-packages/nvidia' 2>/dev/null | head -n 1
}

NV="$(nvidia_dir)"
if [[ -n "$NV" ]]; then
    for lib in "$NV"/*/lib; do LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; done
    export LD_LIBRARY_PATH
    echo "libraries from $NV:"
    (cd "$NV" && ls -1 */lib/libcudnn.so.* */lib/libcublas.so.* */lib/libnvrtc.so.* 2>/dev/null | sed 's/^/  /')
else
    echo "gpu.sh: no site-packages/nvidia found; relying on the system's library path" >&2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

echo "cuDNN: $(ls "$NV"/cudnn/lib/libcudnn.so.* 2>/dev/null | head -n 1 | xargs -r basename)"
STATUS=0

if [[ "$WHAT" == tests || "$WHAT" == all ]]; then
    [[ -x "$BIN/cuda-tests" ]] || { echo "gpu.sh: no test binary at $BIN/cuda-tests (see the top of bench/gpu.sh)" >&2; exit 2; }
    LOG="$OUTDIR/cuda-tests.log"
    timeout 150 "$BIN/cuda-tests" --include-ignored --test-threads=1 --nocapture 2>&1 | tee "$LOG"
    STATUS=${PIPESTATUS[0]}
    if [[ -x "$BIN/cuda-train-tests" ]]; then
        timeout 150 "$BIN/cuda-train-tests" --include-ignored --test-threads=1 --nocapture 2>&1 | tee -a "$LOG"
        [[ ${PIPESTATUS[0]} -eq 0 ]] || STATUS=1
    fi
    if [[ -x "$BIN/cuda-loop-tests" ]]; then
        # `resnet train --device cuda` against the CPU loop, without the whole-run digits tests (`long`).
        RESNET_BIN="$BIN/resnet" timeout 240 "$BIN/cuda-loop-tests" --include-ignored --test-threads=1 --skip on_digits \
            2>&1 | tee -a "$LOG"
        [[ ${PIPESTATUS[0]} -eq 0 ]] || STATUS=1
    fi
    echo
    echo "== CUDA tests =="
    grep -E '^test .* (ok|FAILED|ignored)$' "$LOG" | sed 's/^test /  /'
    grep -E '^test result:' "$LOG" || echo "  the test binary did not finish (exit $STATUS)"
fi

if [[ "$WHAT" == long ]]; then
    LOG="$OUTDIR/cuda-long.log"
    # digits accuracy: the GPU loop against the CPU's, and bf16 against fp32 (several seeds per precision)
    RESNET_BIN="$BIN/resnet" timeout 560 "$BIN/cuda-loop-tests" --ignored --test-threads=1 --nocapture on_digits \
        2>&1 | tee "$LOG"
    STATUS=${PIPESTATUS[0]}
fi

if [[ "$WHAT" == bench || "$WHAT" == all ]]; then
    [[ -x "$BIN/resnet" ]] || { echo "gpu.sh: no resnet binary at $BIN/resnet (see the top of bench/gpu.sh)" >&2; exit 2; }
    RES="$OUTDIR/gpu-bench.jsonl"
    : >"$RES"
    ours() { # workload-id workload batch size dtype [more bench flags]
        local line
        line=$(timeout 90 "$BIN/resnet" bench --device cuda --workload "$2" --batch "$3" --size "$4" --dtype "$5" "${@:6}" \
            --runs 20 --warmup 3 --json 2>&1 | tail -n 1)
        echo "ours $1 $5: $line"
        [[ "$line" == "{"* ]] && echo "{\"side\": \"ours\", \"id\": \"$1\", \"precision\": \"$5\", \"r\": $line}" >>"$RES"
    }
    for dt in f32 tf32 bf16; do
        ours G1 infer 256 224 $dt
        ours G2 train 512 32 $dt
        ours G3 train 256 224 $dt --stem imagenet --classes 1000
    done
    PY="${PYTHON:-python3}"
    timeout 200 "$PY" python/bench_torch_gpu.py 2>&1 | while read -r line; do
        echo "torch: $line"
        [[ "$line" == "{"* ]] && echo "{\"side\": \"torch\", \"r\": $line}" >>"$RES"
    done
    "$PY" - "$RES" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ours = {(r["id"], {"f32": "fp32"}.get(r["precision"], r["precision"])): r["r"] for r in rows if r["side"] == "ours"}
torch = {(r["r"]["workload"], r["r"]["precision"]): r["r"] for r in rows if r["side"] == "torch"}
print("\n== GPU bench: images/s, ours / PyTorch (same card, same call) ==")
print(f"{'workload':10} {'precision':9} {'ours':>9} {'PyTorch':>9} {'ratio':>6} {'our setup s':>11} {'torch setup s':>13}")
for key in sorted(set(ours) | set(torch)):
    o, t = ours.get(key), torch.get(key)
    oi = o["images_per_s"] if o else None
    ti = t["images_per_s"] if t else None
    ratio = f"{oi / ti:.2f}" if oi and ti else "-"
    print(f"{key[0]:10} {key[1]:9} {oi or 0:9.0f} {ti or 0:9.0f} {ratio:>6} "
          f"{(o or {}).get('setup_ms', 0) / 1000:11.1f} {(t or {}).get('setup_s', 0):13.1f}")
PYEOF
fi
exit "$STATUS"
