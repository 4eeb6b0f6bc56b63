#!/usr/bin/env bash
# The CUDA checks (tests/cuda.rs, ignored ones included) on a GPU machine, from a test binary built elsewhere:
#
#   build machine:  cargo test --release --features cuda --test cuda --no-run
#                   (prints "Executable tests/cuda.rs (TARGET/release/deps/cuda-HASH)")
#                   mkdir -p target/gpu && strip -o target/gpu/cuda-tests TARGET/release/deps/cuda-HASH
#                   (stripped: about 2 MB instead of 60 with line tables)
#   GPU machine:    bash bench/gpu.sh [target/gpu/cuda-tests]      (from a copy of the repository, carrying target/gpu)
#
# No CUDA toolkit is needed: the binary loads libcuda from the driver and cuDNN, cuBLAS and NVRTC from NVIDIA's
# PyPI wheels (nvidia-cudnn-cu13, nvidia-cublas, nvidia-cuda-nvrtc), found through the Python environment that has
# them (PYTHON, else python3, else a search) and put on LD_LIBRARY_PATH. Prints a summary; exits non-zero when a
# test fails.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN="${1:-target/gpu/cuda-tests}"
[[ -x "$BIN" ]] || { echo "gpu.sh: no test binary at $BIN (see the top of bench/gpu.sh)" >&2; exit 2; }

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

LOG="$(mktemp)"
"$BIN" --include-ignored --test-threads=1 2>&1 | tee "$LOG"
STATUS=${PIPESTATUS[0]}

echo
echo "== CUDA summary =="
grep -E '^test .* (ok|FAILED|ignored)$' "$LOG" | sed 's/^test /  /'
grep -E '^test result:' "$LOG" || echo "  the test binary did not finish (exit $STATUS)"
rm -f "$LOG"
exit "$STATUS"
