#!/usr/bin/env bash
# `resnet serve` under load, against the same binary's offline `resnet bench` in the same run, on loopback.
#
#   bash bench/serve.sh [--requests N] [--soak MINUTES]
#
# Model: a ResNet-34 with the ImageNet stem at 224² (10 classes: a one-step fine-tune on the bundled digits,
# made once under target/bench-serve/). Requests: the raw bytes of a 512x512 JPEG photograph (decoded, resized
# and cropped by the server, as a client's upload would be). The load generator is `oha` (cargo install oha
# --locked; OHA=/path/to/oha), each run bounded in count (N requests per concurrency level, default 64 x level
# for 8 and 64, 40 for 1) and in time (3 minutes). Printed, per concurrency 1, 8 and 64: images/s and p50/p99
# latency, against the offline figures of `resnet bench --workload infer` at batch 1 and at the server's
# --max-batch (32), with the targets: images/s at concurrency 64 >= 0.9x offline batch throughput, p50 at
# concurrency 1 <= 1.2x the offline batch-1 latency.
#   --soak MINUTES: then MINUTES of good requests (oha, concurrency 8) alongside a loop of hostile clients
#   (truncated bodies, non-images, oversized bodies, slow-header clients, abrupt disconnects), sampling the
#   server's RSS every 10 s; fails unless every good request got 200 and RSS stayed flat (last sample within
#   10 % + 16 MiB of the first after warm-up).
# Threads: RAYON_NUM_THREADS (default 2), as bench/compare.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SOAK=0
REQUESTS=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --soak)
            [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "serve.sh: --soak needs whole minutes" >&2; exit 2; }
            SOAK="$2"; shift ;;
        --requests)
            [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "serve.sh: --requests needs a count" >&2; exit 2; }
            REQUESTS="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "serve.sh: unknown argument '$1' (expected --requests N or --soak MINUTES)" >&2; exit 2 ;;
    esac
    shift
done

OHA="${OHA:-$(command -v oha || true)}"
if [[ -z "$OHA" || ! -x "$OHA" ]]; then
    echo "serve.sh: the load generator oha is missing: cargo install oha --locked (or set OHA=/path/to/oha)" >&2
    exit 2
fi
BIN="${CARGO_TARGET_DIR:-target}/release/resnet"
[[ -x "$BIN" ]] || cargo build --release --locked >&2
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
WORK=target/bench-serve
mkdir -p "$WORK"
MODEL="$WORK/resnet34/last.safetensors"
if [[ ! -f "$MODEL" ]]; then
    rm -rf "$WORK/resnet34"
    "$BIN" train --arch resnet34 --stem imagenet --image-size 224 --eval-resize 256 --max-steps 1 --batch-size 2 \
        --out "$WORK/resnet34" >/dev/null 2>&1
fi
IMAGE=tests/fixtures/images/coffee.jpg
MAX_BATCH=32

cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
flags="$(grep -o -w 'avx2\|fma\|avx512f\|avx512_bf16\|avx512_vnni\|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "# $(date -u +%Y-%m-%d) · $cpu · $(nproc) cores · flags: $flags· RAYON_NUM_THREADS=$RAYON_NUM_THREADS"

offline() {  # batch -> "images_per_s median_ms"
    "$BIN" bench --workload infer --arch resnet34 --classes 10 --batch "$1" --runs 5 --warmup 1 --json |
        python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["images_per_s"], r["median_ms"])'
}
read -r OFF_B_IPS OFF_B_MS < <(offline "$MAX_BATCH")
read -r OFF_1_IPS OFF_1_MS < <(offline 1)

LOG="$WORK/server.log"
"$BIN" serve --weights "$MODEL" --addr 127.0.0.1:0 --max-batch "$MAX_BATCH" --max-delay-ms 5 \
    --header-timeout-s 2 --timeout-s 60 --max-body-mib 4 2>"$LOG" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    ADDR="$(grep -o 'http://[0-9.]*:[0-9]*' "$LOG" | head -1 || true)"
    [[ -n "$ADDR" ]] && curl -sf "$ADDR/v2/health/ready" >/dev/null 2>&1 && break
    kill -0 $SERVER 2>/dev/null || { echo "serve.sh: the server exited: $(cat "$LOG")" >&2; exit 1; }
    sleep 0.1
done
curl -sf "$ADDR/v2/health/ready" >/dev/null || { echo "serve.sh: server not ready: $(cat "$LOG")" >&2; exit 1; }

load() {  # concurrency requests -> "images_per_s p50_ms p99_ms success_rate"
    timeout 180 "$OHA" --no-tui --output-format json -c "$1" -n "$2" -m POST -D "$IMAGE" \
        -H 'Content-Type: application/octet-stream' "$ADDR/v1/predict" |
        python3 -c '
import json, sys
r = json.load(sys.stdin)
s, p = r["summary"], r["latencyPercentiles"]
codes = r.get("statusCodeDistribution", {})
ok = codes.get("200", 0) / max(sum(codes.values()), 1)
print(s["requestsPerSec"], 1000 * p["p50"], 1000 * p["p99"], ok)'
}

# Warm the connection pool and the decoder; not counted.
load 8 16 >/dev/null
echo
echo "| load | images/s | p50 ms | p99 ms | 200s | against offline \`resnet bench\` |"
echo "|---|---|---|---|---|---|"
for c in 1 8 64; do
    n="${REQUESTS:-$(( c == 1 ? 40 : 64 * c > 1024 ? 1024 : 64 * c ))}"
    read -r ips p50 p99 ok < <(load "$c" "$n")
    case $c in
        1) vs="$(python3 -c "print(f'p50 {$p50/$OFF_1_MS:.2f}x batch-1 latency {$OFF_1_MS:.1f} ms (target <= 1.2x)')")" ;;
        64) vs="$(python3 -c "print(f'{$ips/$OFF_B_IPS:.2f}x batch-$MAX_BATCH throughput {$OFF_B_IPS:.1f} img/s (target >= 0.9x)')")" ;;
        *) vs="$(python3 -c "print(f'{$ips/$OFF_B_IPS:.2f}x batch-$MAX_BATCH throughput')")" ;;
    esac
    printf '| concurrency %s, %s requests | %.1f | %.1f | %.1f | %.0f %% | %s |\n' "$c" "$n" "$ips" "$p50" "$p99" \
        "$(python3 -c "print(100*$ok)")" "$vs"
done
echo "offline: batch $MAX_BATCH $OFF_B_IPS img/s ($OFF_B_MS ms a batch), batch 1 $OFF_1_MS ms"
curl -s "$ADDR/metrics" | grep -E '^resnet_batch_size_(sum|count)' | tr '\n' ' '
echo

[[ "$SOAK" -gt 0 ]] || exit 0

rss() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$SERVER/status"; }
hostile() {  # one round of every kind of bad client, in the background of the good load
    local host="${ADDR#http://}"; host="${host%:*}"; local port="${ADDR##*:}"
    head -c 3000 "$IMAGE" | curl -s -o /dev/null --data-binary @- "$ADDR/v1/predict" || true
    curl -s -o /dev/null --data-binary 'not an image' "$ADDR/v1/predict" || true
    head -c $((5 << 20)) /dev/zero | curl -s -o /dev/null -H 'Expect:' --data-binary @- "$ADDR/v1/predict" || true
    { exec 3<>"/dev/tcp/$host/$port" && printf 'POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Le' >&3 &&
        sleep 3; exec 3>&-; } 2>/dev/null || true
    { exec 4<>"/dev/tcp/$host/$port" && printf 'POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 90000\r\n\r\n' >&4 &&
        head -c 20000 "$IMAGE" >&4; exec 4>&-; } 2>/dev/null || true
}
echo
echo "soak: $SOAK min of good requests (concurrency 8) with hostile clients alongside"
first_rss=""
deadline=$(( $(date +%s) + SOAK * 60 ))
timeout $(( SOAK * 60 + 60 )) "$OHA" --no-tui --output-format json -c 8 -z "${SOAK}m" -w -m POST -D "$IMAGE" \
    -H 'Content-Type: application/octet-stream' "$ADDR/v1/predict" > "$WORK/soak.json" &
GOOD=$!
( while [[ $(date +%s) -lt $deadline ]]; do hostile; done ) &
BAD=$!
samples=()
while kill -0 $GOOD 2>/dev/null; do
    sleep 10
    r="$(rss)"; samples+=("$r")
    [[ -z "$first_rss" && ${#samples[@]} -ge 2 ]] && first_rss="$r"
done
wait $GOOD || true
kill $BAD 2>/dev/null || true
last_rss="$(rss)"
echo "RSS MiB every 10 s: ${samples[*]}"
python3 - "$WORK/soak.json" "${first_rss:-$last_rss}" "$last_rss" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
first, last = int(sys.argv[2]), int(sys.argv[3])
codes = r.get("statusCodeDistribution", {})
good = codes.get("200", 0)
total = sum(codes.values())
errors = r.get("errorDistribution", {})
flat = last <= first * 1.10 + 16
print(f"good requests: {good}/{total} answered 200, client errors {errors or 'none'}; "
      f"{r['summary']['requestsPerSec']:.1f} img/s; RSS {first} -> {last} MiB ({'flat' if flat else 'GREW'})")
sys.exit(0 if good == total and not errors and flat else 1)
EOF
