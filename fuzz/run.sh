#!/usr/bin/env bash
# Fuzz every target for SECONDS each with the nightly-free fuzzer (fuzz/src/main.rs) and print a summary table.
#
#   fuzz/run.sh SECONDS [--seed N]
#
# Builds once (release, with debug assertions and overflow checks: see fuzz/Cargo.toml), then runs
# `fuzz TARGET SECONDS` for cifar, image, tiff, dicom, idx, safetensors, pth, recipe and weights-name. Findings are saved under fuzz/findings/;
# each target's full output goes to fuzz/target/fuzz-TARGET.log. Exit status 1 if anything was found.
set -uo pipefail

secs=${1:-}
if [[ -z "$secs" || "$secs" == -* ]]; then
    echo "usage: fuzz/run.sh SECONDS [--seed N]" >&2
    exit 2
fi
shift
cd "$(dirname "$0")" || exit 2

echo "building the fuzzer (release + debug assertions + overflow checks)..."
cargo build --release --quiet || exit 2
target_dir=${CARGO_TARGET_DIR:-target}
bin="$target_dir/release/fuzz"
mkdir -p "$target_dir"

targets=(cifar image tiff dicom idx safetensors pth recipe weights-name)
rows=()
status=0
for t in "${targets[@]}"; do
    log="$target_dir/fuzz-$t.log"
    echo
    echo "=== $t: $secs s ==="
    "$bin" "$t" "$secs" "$@" | tee "$log"
    rc=${PIPESTATUS[0]}
    if [[ $rc -ne 0 ]]; then status=1; fi
    # summary <TAB> target seconds executions exec/s findings inputs
    line=$(grep -P '^summary\t' "$log" | tail -n 1)
    if [[ -z "$line" ]]; then
        rows+=("$t|$secs|?|?|fuzzer failed (exit $rc)|?")
        status=1
    else
        IFS=$'\t' read -r _ name s execs rate findings inputs <<<"$line"
        rows+=("$name|$s|$execs|$rate|$findings|$inputs")
    fi
done

echo
printf '%-12s %8s %12s %9s %9s %8s\n' target seconds executions exec/s findings inputs
printf '%-12s %8s %12s %9s %9s %8s\n' ------ ------- ---------- ------ -------- ------
for r in "${rows[@]}"; do
    IFS='|' read -r name s execs rate findings inputs <<<"$r"
    printf '%-12s %8s %12s %9s %9s %8s\n' "$name" "$s" "$execs" "$rate" "$findings" "$inputs"
done
if [[ $status -ne 0 ]]; then
    echo
    echo "findings saved under $(pwd)/findings/ (findings = distinct problems, inputs = inputs that hit them)"
fi
exit $status
