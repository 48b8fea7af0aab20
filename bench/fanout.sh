#!/usr/bin/env bash
# Fan-out benchmark: while N minions (default 3) fetch a new 256 MiB image
# from the master at once, how fast does the master still answer its API?
# Reports the latency of `services` requests (over the CLI socket, 10 ms
# apart) before and during the sync, whether any node went unreachable,
# and how long the sync took. Hosts are network namespaces on one bridge
# (as in bench/overlay.sh); all of them share this machine's CPUs.
#
# Needs root, python3. Usage: bench/fanout.sh [--write] [ROUNDS] [MINIONS]
# (defaults 3 rounds, 3 minions; medians). --write puts the section into
# BENCHMARKS.md (between <!-- fanout:begin --> and <!-- fanout:end -->).
set -euo pipefail
umask 077
write=no
if [ "${1:-}" = "--write" ]; then write=yes; shift; fi
rounds=${1:-3}
minions=${2:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
phoenix=$root/target/release/phoenix
helper=$root/bench/fanout.py
die() { echo "fanout.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
[ -x "$phoenix" ] || die "build first: cargo build --release -p phoenix"
command -v python3 >/dev/null || die "missing python3"

tag=pf$$
work=$(mktemp -d /tmp/phoenix-fanout-bench.XXXXXX)
sw=$tag-sw
hosts=($tag-h0)
for i in $(seq "$minions"); do hosts+=($tag-h$i); done
cleanup() {
    local rc=$?
    [ $rc != 0 ] && [ -s "$work/master.log" ] && tail -15 "$work/master.log" >&2
    for h in "${hosts[@]}"; do ip netns pids $h 2>/dev/null | xargs -r kill 2>/dev/null || true; done
    sleep 0.3
    for h in "${hosts[@]}"; do ip netns pids $h 2>/dev/null | xargs -r kill -9 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in "${hosts[@]}" $sw; do ip netns del $ns 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# shellcheck source=bench/netns.sh
. "$root/bench/netns.sh"
bridge_hosts $sw 10.97.0 "${hosts[@]}"

ip netns exec ${hosts[0]} "$phoenix" master 10.97.0.1 --foreground --data-dir "$work/master" \
    --wireguard userspace >"$work/master.log" 2>&1 &
waitfor 10 "the master's API socket" test -S "$work/master/phoenix.sock"
export PHOENIX_DATA_DIR=$work/master
key=$("$phoenix" master-info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
nodes=()
for i in $(seq "$minions"); do
    ip="10.97.0.$((i + 1))"
    ip netns exec ${hosts[$i]} "$phoenix" minion m$i 10.97.0.1 "$key" "$ip" "$ip" --foreground \
        --data-dir "$work/m$i" --wireguard userspace --keep-free-mb 64 >"$work/m$i.log" 2>&1 &
    nodes+=(m$i)
done
for n in "${nodes[@]}"; do
    waitfor 15 "$n's join request" sh -c '"$0" waiting --json | grep -q "\"$1\""' "$phoenix" "$n"
    "$phoenix" accept "$n" >/dev/null
done
waitfor 20 "every minion to be reachable" sh -c \
    '[ "$("$0" nodes --json | grep -o "\"reachable\"" | wc -l)" = "$1" ]' "$phoenix" "$minions"

size=$((256 << 20))
results=()
for r in $(seq "$rounds"); do
    head -c $size /dev/urandom >"$work/img-r$r"
    coproc M { python3 "$helper" measure "$work/master/phoenix.sock" "img-r$r" $size "${nodes[@]}"; }
    read -r line <&"${M[0]}"
    [ "$line" = ready ] || die "helper: $line"
    mv "$work/img-r$r" "$work/master/registry/img-r$r"
    echo >&"${M[1]}"
    read -r line <&"${M[0]}"
    wait $M_PID 2>/dev/null || true
    results+=("$line")
    echo "round $r: $line" >&2
    rm -f "$work/master/registry/img-r$r"
done

report=$(printf '%s\n' "${results[@]}" | python3 "$helper" report)
section=$(cat <<EOS
- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); \`bench/fanout.sh $rounds $minions\`: $rounds rounds (a fresh 256 MiB random image each), medians
- Machine: $(nproc) CPUs shared by the master, $minions minions and the measuring client; phoenix $(git -C "$root" describe --always --dirty 2>/dev/null || echo '?'), \`--wireguard userspace\`

| request | p50 (ms) | p99 (ms) | max (ms) |
|---|---:|---:|---:|
$report
EOS
)
echo "$section"
if [ $write = yes ]; then
    python3 "$root/bench/splice-section.py" fanout "$root/BENCHMARKS.md" <<<"$section"
    echo "fanout.sh: wrote the fanout section of $root/BENCHMARKS.md" >&2
fi
