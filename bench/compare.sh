#!/usr/bin/env bash
# resnet-rs against PyTorch (eager, channels_last, torch.compile, bf16 autocast) and ONNX Runtime, on the CPU.
#
#   bash bench/compare.sh [--quick] [--rounds N] [--variants LIST]
#
# For each workload (infer b8 224, infer b1 224, train b64 32) it runs `resnet bench` (ours) and
# python/bench_torch.py (theirs, every variant in its own process) alternately: ours, theirs, ours, theirs...
# for N rounds (default 2), all with 2 threads (RAYON_NUM_THREADS=2, torch.set_num_threads(2), ORT
# intra_op_num_threads=2) and OMP_WAIT_POLICY=PASSIVE. Each contender's figure is the median over rounds of
# its per-round median; the table shows ours against the fastest other f32 variant (the same arithmetic as
# ours), bf16 on its own row (ours in bf16 where the CPU has AVX512-BF16, inference and the training step),
# int8 on its own (ours with --dtype int8 against ONNX Runtime's quantize_static, both calibrated on the timed
# batch; inference only), then every variant.
# The RSS ratio is ours against PyTorch's own (eager for f32, bf16 autocast for bf16), the issue's memory target.
#   --quick: 1 round, 3 timed runs, no torch.compile (a fast check that everything works)
#   --main-job: also the main job, `resnet train` on the bundled digits against python/train_digits_torch.py
#   (the same recipe in PyTorch; needs scikit-learn), whole-run wall time and held-out top-1, once each
#   --variants LIST: only these PyTorch/ORT variants (comma-separated: eager, channels_last, compile, bf16, ort,
#   ort_int8),
#   e.g. channels_last,ort for several before/after rounds where bf16 autocast without AVX512-BF16 takes minutes
# BASELINE=/path/to/an/older/resnet also runs that binary right after ours in every round (same workloads,
# same flags) and adds a table of ours against it: the before/after check of a refactor, in one run.
# PYTHON selects the interpreter (default python3); it must import torch and torchvision (onnxruntime and
# onnx for the ORT variant; without them that variant is skipped with a note). Builds
# $CARGO_TARGET_DIR/release/resnet (default target/) first when it is missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
ROUNDS=2
RUNS=5
WARMUP=1
VARIANTS="all"
QUICK=0
MAIN_JOB=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1; ROUNDS=1; RUNS=3; VARIANTS="eager,channels_last,bf16,ort,ort_int8" ;;
        --main-job) MAIN_JOB=1 ;;
        --rounds)
            [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: --rounds needs a positive integer" >&2; exit 2; }
            ROUNDS="$2"; shift ;;
        --variants)
            [[ $# -ge 2 && "$2" =~ ^[a-z_]+(,[a-z_]+)*$ ]] || { echo "compare.sh: --variants needs a list like eager,ort" >&2; exit 2; }
            VARIANTS_ASKED="$2"; shift ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare.sh: unknown argument '$1' (expected --quick, --rounds N or --variants LIST)" >&2; exit 2 ;;
    esac
    shift
done
VARIANTS="${VARIANTS_ASKED:-$VARIANTS}"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "compare.sh: Python interpreter '$PYTHON' not found; set PYTHON=/path/to/venv/bin/python" >&2
    exit 2
fi
if ! TORCH_VERSION="$("$PYTHON" -c 'import torch, torchvision; print(torch.__version__)' 2>/dev/null)"; then
    echo "compare.sh: '$PYTHON' cannot import torch and torchvision; install python/requirements.txt into a" \
         "venv and set PYTHON=/path/to/venv/bin/python" >&2
    exit 2
fi
ORT_VERSION="$("$PYTHON" -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null || echo "not installed")"

BIN="${CARGO_TARGET_DIR:-target}/release/resnet"
if [[ -n "${BASELINE:-}" && ! -x "$BASELINE" ]]; then
    echo "compare.sh: BASELINE=$BASELINE is not an executable" >&2
    exit 2
fi
if [[ ! -x "$BIN" ]]; then
    echo "compare.sh: $BIN missing; building it (cargo build --release)" >&2
    cargo build --release >&2
fi

export OMP_WAIT_POLICY=PASSIVE RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
THREADS=2

OUT="$(mktemp -d "${TMPDIR:-/tmp}/resnet-compare.XXXXXX")"
trap 'rm -rf "$OUT"' EXIT

CPU_MODEL="$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | sed 's/^[^:]*: *//' || true)"
echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC')  nproc $(nproc)  cpu '${CPU_MODEL:-unknown}'  torch $TORCH_VERSION" \
     " onnxruntime $ORT_VERSION  threads $THREADS  rounds $ROUNDS  runs $RUNS (+$WARMUP warm-up)$([[ $QUICK == 1 ]] && echo '  [quick: no compile]')"
echo "# cpu flags: $(grep -o -w 'avx2\|fma\|avx512[a-z_0-9]*\|avx_vnni\|amx[a-z_0-9]*' /proc/cpuinfo 2>/dev/null | sort -u | paste -sd' ' -)"

WORKLOADS=("infer 8 224" "infer 1 224" "train 64 32")
# Our bf16 (inference and training) needs AVX512-BF16; without it the bf16 rows compare nothing of ours.
OUR_BF16=0
"$BIN" bench --dtype bf16 --batch 1 --size 32 --runs 1 --warmup 0 >/dev/null 2>&1 && OUR_BF16=1
start=$SECONDS
for w in "${WORKLOADS[@]}"; do
    read -r workload batch size <<<"$w"
    tag="${workload}_b${batch}_s${size}"
    for ((r = 1; r <= ROUNDS; r++)); do
        echo "[$((SECONDS - start))s] $workload b$batch ${size}px round $r/$ROUNDS: ours" >&2
        if ! "$BIN" bench --workload "$workload" --batch "$batch" --size "$size" --runs "$RUNS" \
                --warmup "$WARMUP" --json >>"$OUT/$tag.ours.jsonl"; then
            echo "compare.sh: resnet bench failed ($workload b$batch ${size}px)" >&2
            exit 1
        fi
        if [[ -n "${BASELINE:-}" ]]; then
            echo "[$((SECONDS - start))s] $workload b$batch ${size}px round $r/$ROUNDS: baseline" >&2
            if ! "$BASELINE" bench --workload "$workload" --batch "$batch" --size "$size" --runs "$RUNS" \
                    --warmup "$WARMUP" --json >>"$OUT/$tag.base.jsonl"; then
                echo "compare.sh: the baseline's resnet bench failed ($workload b$batch ${size}px)" >&2
                exit 1
            fi
        fi
        if [[ $OUR_BF16 == 1 ]] && ! "$BIN" bench --workload "$workload" --batch "$batch" \
                --size "$size" --runs "$RUNS" --warmup "$WARMUP" --dtype bf16 --json >>"$OUT/$tag.ours.jsonl"; then
            echo "compare.sh: resnet bench --dtype bf16 failed ($workload b$batch ${size}px)" >&2
            exit 1
        fi
        if [[ $workload == infer ]] && ! "$BIN" bench --workload "$workload" --batch "$batch" --size "$size" \
                --runs "$RUNS" --warmup "$WARMUP" --dtype int8 --json >>"$OUT/$tag.ours.jsonl"; then
            echo "compare.sh: resnet bench --dtype int8 failed ($workload b$batch ${size}px)" >&2
            exit 1
        fi
        variants="$VARIANTS"
        # ORT is infer only ("all" leaves it out itself)
        [[ $workload == train ]] && variants=$(tr ',' '\n' <<<"$variants" | grep -vx 'ort\|ort_int8' | paste -sd, -)
        [[ -n $variants ]] || variants=eager
        echo "[$((SECONDS - start))s] $workload b$batch ${size}px round $r/$ROUNDS: pytorch/ort ($variants)" >&2
        if ! "$PYTHON" python/bench_torch.py --workload "$workload" --batch "$batch" --size "$size" \
                --runs "$RUNS" --warmup "$WARMUP" --threads "$THREADS" --variant "$variants" --json \
                >>"$OUT/$tag.theirs.jsonl"; then
            echo "compare.sh: python/bench_torch.py failed ($workload b$batch ${size}px)" >&2
            exit 1
        fi
    done
done
echo "[$((SECONDS - start))s] done" >&2
echo

"$PYTHON" - "$OUT" "${WORKLOADS[@]}" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])


def load(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip().startswith("{")] if path.exists() else []


def fmt(v, spec):
    return format(v, spec) if v is not None else "-"


rows, details, before_after = [], [], []
for w in sys.argv[2:]:
    workload, batch, size = w.split()
    tag = f"{workload}_b{batch}_s{size}"
    name = f"{workload} b{batch} {size}px"
    ours_runs = {}
    for r in load(out / f"{tag}.ours.jsonl"):
        ours_runs.setdefault(r.get("dtype", "f32"), []).append(r)
    ours = {
        d: (statistics.median(r["median_ms"] for r in rs),
            max((r["peak_rss_mib"] for r in rs if r.get("peak_rss_mib") is not None), default=None), len(rs))
        for d, rs in ours_runs.items()
    }
    theirs = {}
    notes = {}
    for r in load(out / f"{tag}.theirs.jsonl"):
        if r.get("skipped"):
            notes.setdefault(r["variant"], r.get("note", "skipped"))
        else:
            theirs.setdefault(r["variant"], []).append(r)
    agg = {
        v: (statistics.median(r["median_ms"] for r in rs), max(r["peak_rss_mib"] for r in rs), len(rs), rs[0].get("dtype", "f32"))
        for v, rs in theirs.items()
    }
    # One row per dtype: ours is compared only with variants doing the same arithmetic.
    for dtype in ["f32"] + sorted(({a[3] for a in agg.values()} | set(ours)) - {"f32"}):
        label = name if dtype == "f32" else f"{name} {dtype}"
        same = {v: a for v, a in agg.items() if a[3] == dtype}
        best = min(same, key=lambda v: same[v][0]) if same else None
        if dtype not in ours:
            b_ms, b_rss, _, _ = same[best]
            rows.append((label, "n/a", f"{b_ms:.1f} ({best})", "n/a", "n/a", "-", "n/a"))
            continue
        ours_ms, ours_rss, _ = ours[dtype]
        if best:
            b_ms = same[best][0]
            # The memory target is against PyTorch itself: eager in f32, its bf16 autocast in bf16.
            torch = "bf16" if dtype == "bf16" else "eager"
            t_rss = agg[torch][1] if torch in agg else None
            rss_ratio = ours_rss / t_rss if ours_rss is not None and t_rss else None
            rows.append((label, f"{ours_ms:.1f}", f"{b_ms:.1f} ({best})", f"{ours_ms / b_ms:.2f}", fmt(ours_rss, ".0f"),
                         fmt(t_rss, ".0f"), fmt(rss_ratio, ".2f")))
        else:
            rows.append((label, f"{ours_ms:.1f}", "- (none ran)", "-", fmt(ours_rss, ".0f"), "-", "-"))
    base = [r["median_ms"] for r in load(out / f"{tag}.base.jsonl")]
    if base and "f32" in ours:
        b = statistics.median(base)
        before_after.append((name, f"{ours['f32'][0]:.1f}", f"{b:.1f}", f"{ours['f32'][0] / b:.3f}", str(len(base))))
    for dtype, (ms, rss, n) in sorted(ours.items()):
        details.append((name, "ours" if dtype == "f32" else f"ours {dtype}", f"{ms:.1f}", "-", fmt(rss, ".0f"), str(n), ""))
    for v in ("eager", "channels_last", "compile", "bf16", "ort", "ort_int8"):
        if v in agg:
            ms, rss, n, dtype = agg[v]
            ratio = f"{ours[dtype][0] / ms:.2f}" if dtype in ours else "n/a"
            note = notes.get(v, "") or ("" if dtype in ours else f"{dtype}; ours has no {dtype} here")
            details.append((name, v, f"{ms:.1f}", ratio, f"{rss:.0f}", str(n), note))
        elif v in notes:
            details.append((name, v, "-", "-", "-", "0", notes[v]))


def table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    left = {0, 1} if header[-1] == "note" else {0}
    if header[-1] == "note":
        left.add(len(header) - 1)

    def line(r):
        return "  ".join(str(x).ljust(wd) if i in left else str(x).rjust(wd)
                         for i, (x, wd) in enumerate(zip(r, widths))).rstrip()

    print(line(header))
    print(line(["-" * wd for wd in widths]))
    for r in rows:
        print(line(r))


table(("workload", "ours ms", "best other ms (variant)", "ours/best", "ours RSS MiB", "PyTorch RSS MiB", "RSS ratio"),
      rows)
print()
table(("workload", "contender", "median ms", "ours/this", "peak RSS MiB", "rounds", "note"), details)
if before_after:
    print()
    table(("workload", "ours ms", "baseline ms", "ours/baseline", "rounds"), before_after)
EOF

if [[ $MAIN_JOB == 1 ]]; then
    echo "[$((SECONDS - start))s] main job: resnet train (digits)" >&2
    t0=$(date +%s.%N)
    "$BIN" train --out "$OUT/main-job" --json >"$OUT/main.ours.jsonl" 2>"$OUT/main.ours.err" \
        || { echo "compare.sh: resnet train failed: $(tail -1 "$OUT/main.ours.err")" >&2; exit 1; }
    t1=$(date +%s.%N)
    echo "[$((SECONDS - start))s] main job: python/train_digits_torch.py" >&2
    "$PYTHON" python/train_digits_torch.py --threads "$THREADS" >"$OUT/main.theirs.jsonl" \
        || { echo "compare.sh: python/train_digits_torch.py failed" >&2; exit 1; }
    t2=$(date +%s.%N)
    echo
    "$PYTHON" - "$OUT" "$t0" "$t1" "$t2" <<'EOF'
import json
import sys
from pathlib import Path

out, (t0, t1, t2) = Path(sys.argv[1]), map(float, sys.argv[2:5])
ours_s, their_wall = t1 - t0, t2 - t1
ours = [json.loads(l) for l in (out / "main.ours.jsonl").read_text().splitlines() if l.startswith("{")]
theirs = json.loads((out / "main.theirs.jsonl").read_text().strip().splitlines()[-1])
ours_top1 = ours[-1]["val_top1"]  # the last epoch, as the PyTorch script reports
# Both whole processes (ours writes a checkpoint every epoch, the script none); the script's own loop time too.
print("main job (digits, whole run)   ours s  PyTorch s (its loop)  ours/PyTorch  ours top-1  PyTorch top-1")
print(f"{'':30} {ours_s:6.1f}  {their_wall:9.1f} ({theirs['seconds']:6.1f})  {ours_s / their_wall:12.2f}  "
      f"{100 * ours_top1:9.2f} %  {100 * theirs['val_top1']:11.2f} %")
EOF
fi
