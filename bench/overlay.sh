#!/usr/bin/env bash
# Overlay benchmark: throughput (iperf3) and TCP round-trip latency between
# two hosts (network namespaces on one bridge), over
#   1. the plain link,
#   2. Phoenix's WireGuard overlay (master on host 1, minion on host 2),
#   3. wireguard-go (Debian package) between the same hosts,
# all in one run; plus the minion's and master's RSS with the tunnel up.
#
# Needs root, iperf3, wireguard-go, wireguard-tools (wg), python3.
# Usage: bench/overlay.sh [--write] [SECONDS] [ROUNDS]   (defaults: 5 s, 3 rounds; medians reported)
# Prints a markdown section; --write also puts it into BENCHMARKS.md (between
# <!-- overlay:begin --> and <!-- overlay:end -->).
set -euo pipefail
umask 077
write=no
if [ "${1:-}" = "--write" ]; then write=yes; shift; fi
secs=${1:-5}
rounds=${2:-3}
args="$secs $rounds"
root=$(cd "$(dirname "$0")/.." && pwd)
phoenix=$root/target/release/phoenix
[ -x "$phoenix" ] || { echo "build first: cargo build --release -p phoenix" >&2; exit 1; }
for t in iperf3 wireguard-go wg python3; do
    command -v $t >/dev/null || { echo "missing $t (apt-get install iperf3 wireguard-go wireguard-tools python3)" >&2; exit 1; }
done

tag=pb$$
work=$(mktemp -d /tmp/phoenix-overlay-bench.XXXXXX)
sw=$tag-sw; h1=$tag-h1; h2=$tag-h2
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns pids $h1 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns pids $h2 2>/dev/null | xargs -r kill 2>/dev/null || true
    sleep 0.3
    for ns in $h1 $h2 $sw; do ip netns del $ns 2>/dev/null || true; done
    rm -f /var/run/wireguard/${tag}a.sock /var/run/wireguard/${tag}b.sock
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# shellcheck source=bench/netns.sh
. "$root/bench/netns.sh"
bridge_hosts $sw 10.96.0 $h1 $h2

# A TCP ping-pong: the median round trip of 2000 one-byte exchanges, in µs.
cat >"$work/rtt.py" <<'EOF'
import socket, statistics, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
if mode == "server":
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(1)
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (b := c.recv(1)):
        c.sendall(b)
else:
    c = socket.create_connection((host, port)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(2000):
        t = time.perf_counter_ns(); c.sendall(b"x"); c.recv(1); rtts.append(time.perf_counter_ns() - t)
    print(round(statistics.median(rtts) / 1000, 1))
EOF

throughput() { # server-ip -> Gbit/s
    ip netns exec $h1 iperf3 -s -1 -D >/dev/null
    sleep 0.3
    ip netns exec $h2 iperf3 -c "$1" -t "$secs" -J |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9, 3))'
}
latency() { # server-ip -> µs
    ip netns exec $h1 python3 "$work/rtt.py" server "$1" 5201 &
    sleep 0.4
    ip netns exec $h2 python3 "$work/rtt.py" client "$1" 5201
    wait
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Phoenix: master on h1, minion on h2, accepted. Its userspace WireGuard,
# the peer of wireguard-go (newer builds take the kernel's where there is one).
wg_mode=()
"$phoenix" master --help | grep -- --wireguard >/dev/null && wg_mode=(--wireguard userspace)
ip netns exec $h1 "$phoenix" master 10.96.0.1 --foreground --data-dir "$work/master" "${wg_mode[@]}" >"$work/master.log" 2>&1 &
master_pid=$!
pids+=($master_pid)
for _ in $(seq 50); do [ -S "$work/master/phoenix.sock" ] && break; sleep 0.1; done
export PHOENIX_DATA_DIR=$work/master
key=$("$phoenix" master-info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
ip netns exec $h2 "$phoenix" minion m1 10.96.0.1 "$key" 10.96.0.2 10.96.0.2 --foreground --data-dir "$work/m1" "${wg_mode[@]}" >"$work/m1.log" 2>&1 &
minion_pid=$!
pids+=($minion_pid)
for _ in $(seq 50); do "$phoenix" waiting --json | grep '"m1"' >/dev/null && break; sleep 0.1; done
"$phoenix" accept m1 >/dev/null
for _ in $(seq 50); do "$phoenix" nodes --json | grep '"reachable"' >/dev/null && break; sleep 0.1; done

# wireguard-go between the same hosts (its own port, its own addresses).
for side in a b; do
    wg genkey >"$work/$side.key"
    wg pubkey <"$work/$side.key" >"$work/$side.pub"
done
ip netns exec $h1 wireguard-go ${tag}a 2>/dev/null
ip netns exec $h2 wireguard-go ${tag}b 2>/dev/null
ip netns exec $h1 wg set ${tag}a private-key "$work/a.key" listen-port 51900 peer "$(cat "$work/b.pub")" endpoint 10.96.0.2:51900 allowed-ips 10.95.0.0/24
ip netns exec $h2 wg set ${tag}b private-key "$work/b.key" listen-port 51900 peer "$(cat "$work/a.pub")" endpoint 10.96.0.1:51900 allowed-ips 10.95.0.0/24
ip -n $h1 addr add 10.95.0.1/24 dev ${tag}a
ip -n $h2 addr add 10.95.0.2/24 dev ${tag}b
ip -n $h1 link set ${tag}a mtu 1420 up
ip -n $h2 link set ${tag}b mtu 1420 up

declare -A tp lat
for r in $(seq "$rounds"); do
    tp[plain]+=" $(throughput 10.96.0.1)"
    tp[phoenix]+=" $(throughput fd38:dde8:32dd::1)"
    tp[wggo]+=" $(throughput 10.95.0.1)"
    lat[plain]+=" $(latency 10.96.0.1)"
    lat[phoenix]+=" $(latency fd38:dde8:32dd::1)"
    lat[wggo]+=" $(latency 10.95.0.1)"
done
rss() { awk '/VmRSS/ {print $2}' /proc/"$1"/status; }
minion_rss=$(rss "$minion_pid")
master_rss=$(rss "$master_pid")

p=$(median ${tp[plain]}); f=$(median ${tp[phoenix]}); g=$(median ${tp[wggo]})
lp=$(median ${lat[plain]}); lf=$(median ${lat[phoenix]}); lg=$(median ${lat[wggo]})
git_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "?")
[ -z "$(git -C "$root" status --porcelain 2>/dev/null)" ] || git_rev="$git_rev + uncommitted changes"
{
echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); \`bench/overlay.sh $args\`: ${secs} s per iperf3 run, ${rounds} rounds, medians"
echo "- Machine: $(nproc) CPUs (nproc) · $(sed -n 's/^model name[^:]*: *//p' /proc/cpuinfo | head -1) · kernel $(uname -srm) · $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM"
echo "- Phoenix: release build of $("$phoenix" --version) (git $git_rev)${wg_mode:+, \`${wg_mode[*]}\`}; peer: wireguard-go $(dpkg-query -W -f '${Version}' wireguard-go 2>/dev/null || echo '?'), iperf3 $(iperf3 --version | head -1 | awk '{print $2}')"
echo
echo "| path | throughput (Gbit/s) | TCP round trip (µs) |"
echo "|---|---:|---:|"
echo "| plain link (veth + bridge) | $p | $lp |"
echo "| Phoenix overlay (userspace WireGuard in the phoenix process) | $f | $lf |"
echo "| wireguard-go | $g | $lg |"
echo
echo "- Phoenix ÷ wireguard-go: throughput $(python3 -c "print(round($f/$g, 2))")×, round trip $(python3 -c "print(round($lf/$lg, 2))")×"
echo "- RSS with the tunnel up: minion $((minion_rss / 1024)) MiB ($minion_rss kB), master $((master_rss / 1024)) MiB ($master_rss kB)"
echo "- All rounds (Gbit/s): plain [${tp[plain]} ], Phoenix [${tp[phoenix]} ], wireguard-go [${tp[wggo]} ]; round trips (µs): plain [${lat[plain]} ], Phoenix [${lat[phoenix]} ], wireguard-go [${lat[wggo]} ]"
} >"$work/report.md"
cat "$work/report.md"
if [ "$write" = yes ]; then
    python3 "$root/bench/splice-section.py" overlay "$root/BENCHMARKS.md" <"$work/report.md"
    echo "overlay.sh: wrote the overlay section of $root/BENCHMARKS.md" >&2
fi
