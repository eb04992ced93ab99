#!/usr/bin/env bash
# Fuzzes job decoding (fuzz/fuzz_targets/decode_job.rs) for a bounded time:
#
#   scripts/fuzz.sh [SECONDS] [LIBFUZZER_FLAGS...]      # SECONDS defaults to 60
#
# which installs cargo-fuzz when missing and then runs, from the repository root:
#
#   RUSTC_BOOTSTRAP=1 cargo fuzz run decode_job fuzz/corpus/decode_job fuzz/seeds/decode_job \
#       -- -max_total_time=SECONDS -dict=fuzz/decode_job.dict
#
# cargo-fuzz passes nightly-only compiler flags (-Zsanitizer=address); RUSTC_BOOTSTRAP=1 lets
# the stable toolchain accept them. The instrumented build lives in fuzz/target, apart from the
# project's target/. New inputs are kept in fuzz/corpus/decode_job for the next run; a failing
# input is saved under fuzz/artifacts/decode_job/ and is replayed with
#
#   RUSTC_BOOTSTRAP=1 cargo fuzz run decode_job fuzz/artifacts/decode_job/<file>
#
# The exit status is non-zero when the run found a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
if [ $# -gt 0 ]; then shift; fi
case "$seconds" in
  '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS] [LIBFUZZER_FLAGS...]" >&2; exit 2 ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "[fuzz] installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

root=$(pwd)
# libFuzzer refuses corpus directories that do not exist yet.
mkdir -p "$root/fuzz/corpus/decode_job"
RUSTC_BOOTSTRAP=1 exec cargo fuzz run decode_job "$root/fuzz/corpus/decode_job" "$root/fuzz/seeds/decode_job" \
  -- -max_total_time="$seconds" -dict="$root/fuzz/decode_job.dict" "$@"
