#!/usr/bin/env bash
# Logs benchmark: a service writing 100 MB/s (a perl writer paced in 1 MiB
# writes of 100-byte lines) and one writing as fast as it can, each for
# SECONDS (default 20) with --log-max-bytes 1048576. Reports the writer's
# rate (from /proc/PID/io), the most disk its log files took (sampled every
# 20 ms, the larger of size and allocated blocks) and the minion's CPU
# (utime + stime from /proc/PID/stat, all threads, over the run).
#
# The measurement is the ignored test `log_figures` in tests/e2e/tests/logs.rs,
# on the e2e harness, built in release mode. With BEFORE=<commit>, the same
# test also runs against that commit, built in a temporary git worktree with
# its own target dir (removed afterwards).
#
# Needs root (the overlay's TUN devices). Usage:
#   [BEFORE=<commit>] bench/logs.sh [--write] [SECONDS]
# --write puts the table into BENCHMARKS.md (between <!-- logs:begin -->
# and <!-- logs:end -->).
set -euo pipefail
write=no
if [ "${1:-}" = "--write" ]; then write=yes; shift; fi
seconds=${1:-20}
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$root"
need_root "the overlay"
out=$(mktemp)
before_tree=""
cleanup() {
    rm -f "$out" "$out.md"
    if [ -n "$before_tree" ]; then git worktree remove --force "$before_tree"; fi
}
trap cleanup EXIT

figures() { # DIR LABEL
    (
        cd "$1"
        cargo build --release -q -p phoenix -p testy
        PHOENIX_LOGS_SECONDS=$seconds PHOENIX_LOGS_LABEL=$2 cargo test --release -q -p phoenix-e2e --test logs -- \
            --ignored --exact log_figures --nocapture --test-threads 1 | grep -E '^\|' >>"$out"
    )
}

if [ -n "${BEFORE:-}" ]; then
    before_tree=$(mktemp -d /tmp/logs-before.XXXXXX)
    rmdir "$before_tree"
    git worktree add --detach "$before_tree" "$BEFORE" >/dev/null
    # The older tree lacks the test: bring this one's.
    cp tests/e2e/tests/logs.rs "$before_tree/tests/e2e/tests/logs.rs"
    CARGO_TARGET_DIR=${BEFORE_TARGET_DIR:-$before_tree/target} figures "$before_tree" "$(git rev-parse --short "$BEFORE")"
fi
figures "$root" "$(git rev-parse --short HEAD)+"
{
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores ($(uname -r)), ${seconds} s a writer, --log-max-bytes 1048576, with \`${BEFORE:+BEFORE=$BEFORE }bench/logs.sh $seconds\`:"
    echo
    echo "| build | writer | rate written | most disk taken | minion CPU |"
    echo "|---|---|---|---|---|"
    cat "$out"
} >"$out.md"
emit_report logs "$out.md" >&2 # on stderr, where these scripts have always printed it
