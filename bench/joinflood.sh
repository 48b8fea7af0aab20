#!/usr/bin/env bash
# Join flood benchmark: how long a minion holding the join token takes to be
# accepted (master with --auto-accept), on a quiet join port and while a
# flooder sends anonymous join requests as fast as it can from 200 loopback
# /24 networks (127.N.M.1), holding up to 384 of them open, every fifth one
# squatting on the minion's name. Each round uses a fresh master; the flood
# starts 2 s before the minion and lasts 5 s. All traffic stays on loopback.
#
# The measurement is the ignored test `join_flood_figures` in
# tests/e2e/tests/join.rs, on the e2e harness, built in release mode.
#
# Needs root (the overlay's TUN devices). Usage:
#   bench/joinflood.sh [--write] [ROUNDS]     (default 5 rounds)
# --write puts the table into BENCHMARKS.md (between <!-- joinflood:begin -->
# and <!-- joinflood:end -->).
set -euo pipefail
write=no
if [ "${1:-}" = "--write" ]; then write=yes; shift; fi
rounds=${1:-5}
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$root"
need_root "the overlay"
cargo build --release -q -p phoenix -p testy
out=$(mktemp)
trap 'rm -f "$out" "$out.md"' EXIT
PHOENIX_JOINFLOOD_ROUNDS=$rounds cargo test --release -q -p phoenix-e2e --test join -- \
    --ignored --exact join_flood_figures --nocapture --test-threads 1 | grep -E '^(\||Of )' >"$out"
{
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores ($(uname -r)), $rounds rounds, with \`bench/joinflood.sh $rounds\`:"
    echo
    cat "$out"
} >"$out.md"
emit_report joinflood "$out.md" >&2 # on stderr, where these scripts have always printed it
