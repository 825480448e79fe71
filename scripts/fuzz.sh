#!/usr/bin/env bash
# Fuzzes the parsers of untrusted input (GGUF, safetensors + index, config.json, chat templates,
# JSONL datasets) with cargo-fuzz (libFuzzer, AddressSanitizer, debug assertions on), each target
# for RLX_FUZZ_SECONDS seconds (default 60), starting from the committed seeds in
# fuzz/corpus/<target>/. Fails if any target crashes (panic, sanitizer report, leak, timeout,
# out-of-memory); the crashing input is left in fuzz/artifacts/<target>/. Prints the executions
# run per target and writes a summary to fuzz/last-run.txt. See docs/RELIABILITY.md.
#
# Stable Rust: cargo-fuzz passes -Z flags to rustc, which RUSTC_BOOTSTRAP=1 allows on stable.
# RLX_FUZZ_TARGETS="gguf jsonl" runs only those targets.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${RLX_FUZZ_SECONDS:-60}
read -r -a targets <<<"${RLX_FUZZ_TARGETS:-gguf safetensors config_json chat_template jsonl}"
export RUSTC_BOOTSTRAP=1
# One rayon worker: the machine's cores go to the fuzzer, and runs are reproducible.
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1}

# Largest input per target (bytes): room for the biggest seed plus growth.
max_len() {
    case "$1" in
        gguf) echo 65536 ;;
        safetensors) echo 16384 ;;
        config_json) echo 8192 ;;
        chat_template) echo 4096 ;;
        jsonl) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cd fuzz
start=$(date +%s)
echo "== cargo fuzz build (release, debug assertions, AddressSanitizer)"
cargo fuzz build -O -a

mkdir -p target/logs
summary=$(mktemp)
failed=()
{
    echo "rlx fuzz run $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "seconds per target: $seconds"
} >"$summary"
for t in "${targets[@]}"; do
    echo "== fuzz $t (${seconds}s, max_len $(max_len "$t"))"
    # New inputs go to target/corpus/<t>; the committed seeds are only read.
    mkdir -p "target/corpus/$t"
    log="target/logs/$t.log"
    status=0
    cargo fuzz run -O -a "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len="$(max_len "$t")" \
        -timeout=30 -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
    if [ -z "$runs" ]; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    fi
    corpus=$(find "target/corpus/$t" -type f | wc -l)
    if [ "$status" -eq 0 ]; then
        line="$t: ${runs:-?} executions, 0 crashes, corpus $corpus inputs"
    else
        line="$t: CRASH after ${runs:-?} executions (exit $status); input in fuzz/artifacts/$t/, log fuzz/$log"
        failed+=("$t")
        tail -n 60 "$log"
    fi
    echo "$line"
    echo "$line" >>"$summary"
done
echo "total time: $(($(date +%s) - start))s (build included)" >>"$summary"
mv "$summary" last-run.txt
echo "== summary (fuzz/last-run.txt)"
cat last-run.txt
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]}" >&2
    exit 1
fi
