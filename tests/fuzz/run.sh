#!/usr/bin/env bash
# Runs each fuzz target for SECONDS_PER_TARGET seconds (default 600) with
# cargo-fuzz (libFuzzer). Needs `cargo install cargo-fuzz`; on a stable toolchain
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its sanitizer flags.
#
#   tests/fuzz/run.sh                    # all targets, 10 minutes each
#   tests/fuzz/run.sh keys_edit          # one target
#   SECONDS_PER_TARGET=60 tests/fuzz/run.sh
set -euo pipefail
cd "$(dirname "$0")"
secs=${SECONDS_PER_TARGET:-600}
targets=${*:-canonical_path route_match config_parse keys_edit audit_verify}
root=../..
seed() { mkdir -p "corpus/$1"; cp "${@:2}" "corpus/$1/" 2>/dev/null || true; }
seed config_parse "$root/config/keygate.example.yaml" "$root/deploy/systemd/keygate.service"
seed keys_edit "$root/config/keys.example.yaml"
mkdir -p corpus/canonical_path corpus/route_match corpus/audit_verify
printf '/wiki/api/v2/pages/%%31%%30/x' > corpus/canonical_path/seed
printf '/wiki/api/v2/pages/{id}/**\n/wiki/api/v2/pages/1/labels' > corpus/route_match/seed
cp seeds/audit.jsonl corpus/audit_verify/
for t in $targets; do
  echo "== $t for ${secs}s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir . -O "$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 2>&1 \
    | grep -E '^(#[0-9]+ +(DONE|pulse)|stat::|==|SUMMARY|.*panicked)' | tail -8
done
