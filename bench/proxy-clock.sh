#!/usr/bin/env bash
# What wrk's latency measures when every request opens a new connection.
#
# wrk starts a request's clock when it writes the request, after the TCP
# connect and the TLS handshake. With `Connection: close`, a proxy that
# makes connections wait before their handshake keeps that wait outside
# the clock. With a fixed number of connections, fewer of them are then
# inside it at once, the ones that are share the client with fewer
# others, and wrk's latency falls, while every request, counted from its
# connect as a user waits, takes longer.
#
# This script measures that with one proxy: Phoenix's `serve` example as
# built (target/release), and the same source with a patch
# (bench/proxy-clock.patch, never part of the proxy) that sleeps a fixed
# time before each TLS handshake, 20 and 40 ms; nginx, as bench/proxy.sh
# runs it, beside them. Each is loaded with wrk (1 MiB, `Connection:
# close`, 64 connections, as bench/proxy.sh's big-close) and with two ab
# (32 connections each, timed from the connect), rounds interleaved,
# medians.
#
# Debian packages: wrk apache2-utils nginx openssl python3 iproute2
# Phoenix: cargo build --release -p phoenix-proxy --example serve; the
# patched build is made here (a copy of the committed tree, its own
# target dir, target/proxy-clock, about 2 minutes the first time).
# Usage: bench/proxy-clock.sh [--write] [SECONDS] [ROUNDS]   (default 8 5)
#   --write puts the section into BENCHMARKS.md (between
#   <!-- proxy-clock:begin --> and <!-- proxy-clock:end -->).
set -euo pipefail
umask 077
write=no
if [ "${1:-}" = "--write" ]; then write=yes; shift; fi
secs=${1:-8}
rounds=${2:-5}
conns=64
bench_name=proxy-clock
. "$(dirname "$0")/lib.sh" # root, free_port, wait_port, say, nginx_*, client_openssl_conf
started=$(date +%s)
serve=$root/target/release/examples/serve
[ -x "$serve" ] || die "build first: cargo build --release -p phoenix-proxy --example serve"
need_tools "wrk apache2-utils nginx openssl python3 iproute2" wrk ab nginx openssl python3 ss cargo git

git_rev=$(git -C "$root" rev-parse --short HEAD)
git -C "$root" diff --quiet HEAD -- crates Cargo.toml Cargo.lock ||
    die "crates/ differs from HEAD: the patched build is made from HEAD, so commit first (or stash)"

proxy_work proxy-clock 0.5

# --- the patched build: HEAD with bench/proxy-clock.patch ----------------
say "building the patched serve example (target/proxy-clock)"
mkdir -p "$work/src"
git -C "$root" archive HEAD | tar -x -C "$work/src"
(cd "$work/src" && git apply "$root/bench/proxy-clock.patch") ||
    die "bench/proxy-clock.patch no longer applies to crates/proxy/src/server.rs: renew it"
(cd "$work/src" && CARGO_TARGET_DIR=$root/target/proxy-clock cargo build -q --release -p phoenix-proxy --example serve) ||
    die "the patched build failed"
delayed=$root/target/proxy-clock/release/examples/serve

# --- TLS, backend, proxies (as bench/proxy.sh) -----------------------------
self_signed "$work"
client_openssl_conf >"$work/client-openssl.cnf"
client() { OPENSSL_CONF=$work/client-openssl.cnf "$@"; }

bport=$(free_port)
mkdir -p "$work/backend/www"
head -c 1048576 /dev/urandom >"$work/backend/www/big"
nginx_backend_conf "$work/backend" "$bport" >"$work/backend/nginx.conf"
nginx -p "$work/backend" -c "$work/backend/nginx.conf" -g 'daemon off;' 2>>"$work/backend/error.log" &
pids+=($!)
wait_port "$bport"

echo "{\"routes\":[{\"host\":\"localhost\",\"instances\":[{\"id\":\"b\",\"addr\":\"127.0.0.1:$bport\"}]}]}" >"$work/routes.json"
names=(asis d20 d40 nginx)
declare -A port label
label=([asis]="Phoenix (git $git_rev)" [d20]="the same, 20 ms before each handshake" [d40]="the same, 40 ms before each handshake" [nginx]="nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') (2 workers)")
start_phoenix() { # NAME BINARY DELAY_MS
    port[$1]=$(free_port)
    PROXY_CLOCK_DELAY_MS=$3 PROXY_THREADS=2 "$2" "$work/routes.json" "127.0.0.1:$(free_port)" "127.0.0.1:${port[$1]}" \
        localhost "$work/cert.pem" "$work/key.pem" >"$work/$1.log" 2>&1 &
    pids+=($!)
}
start_phoenix asis "$serve" 0
start_phoenix d20 "$delayed" 20
start_phoenix d40 "$delayed" 40
port[nginx]=$(free_port)
mkdir -p "$work/nginx"
nginx_proxy_conf "$work/nginx" "${port[nginx]}" "$bport" localhost "$work/cert.pem" "$work/key.pem" 2 >"$work/nginx/nginx.conf"
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' 2>>"$work/nginx/error.log" &
pids+=($!)
for n in "${names[@]}"; do
    wait_port "${port[$n]}" || die "$n did not start"
    client curl -sf --cacert "$work/cert.pem" -o /dev/null "https://localhost:${port[$n]}/big" || die "$n does not answer /big"
done

cat >"$work/report.lua" <<'EOF'
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format("wrk %.1f %d %d %d %d\n", summary.requests / (summary.duration / 1e6),
        latency:percentile(50), latency:percentile(99), latency.mean,
        e.connect + e.read + e.write + e.timeout + e.status))
end
EOF
run() { # NAME DURATION -> one "wrk ..." line and one "ab ..." line
    local url="https://localhost:${port[$1]}/big" k ab=()
    client wrk -t 2 -c $conns -d "${2}s" -H 'Connection: close' -s "$work/report.lua" "$url" | grep '^wrk '
    for k in 1 2; do
        client ab -q -t "$2" -n 200000 -c $((conns / 2)) -g "$work/ab$k.tsv" "$url" >"$work/ab$k.out" 2>&1 &
        ab+=($!)
    done
    wait "${ab[@]}"
    python3 - "$work" "$2" <<'PY'
import re, sys
work, d = sys.argv[1], float(sys.argv[2])
total, errs = [], 0
for k in (1, 2):
    for line in open(f"{work}/ab{k}.tsv").read().splitlines()[1:]:
        total.append(int(line.split("\t")[4]) * 1000)
    errs += sum(int(x) for x in re.findall(r"^(?:Failed requests|Non-2xx responses):\s+(\d+)", open(f"{work}/ab{k}.out").read(), re.M))
total.sort()
at = lambda p: total[min(len(total) - 1, int(p / 100 * len(total)))]
print(f"ab {len(total) / d:.1f} {at(50)} {at(99)} {sum(total) // len(total)} {errs}")
PY
}

for n in "${names[@]}"; do run "$n" 2 >/dev/null; done # warm-up, not counted
: >"$work/runs"
for r in $(seq "$rounds"); do
    for i in "${!names[@]}"; do
        n=${names[$(((i + r) % ${#names[@]}))]}
        run "$n" "$secs" | sed "s/^/$n /" | tee -a "$work/runs" | sed "s/^/round $r: /" >&2
    done
done

section=$(python3 - "$work/runs" "$conns" <<EOF
import statistics, sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    n, kind, *v = line.split()
    runs[(n, kind)].append([float(x) for x in v])
conns = int(sys.argv[2])
names = "${names[*]}".split()
label = {$(for n in "${names[@]}"; do printf '"%s": "%s", ' "$n" "${label[$n]}"; done)}
med = lambda xs: statistics.median(xs)
out = ["- Date: $(date -u '+%Y-%m-%d %H:%M') UTC; \`bench/proxy-clock.sh $secs $rounds\`: 1 MiB over HTTPS, a new connection a request, 64 connections; wrk: \`wrk -t 2 -c 64 -d ${secs}s -H 'Connection: close'\`; ab: two \`ab -c 32 -t $secs\`; rounds: $rounds, interleaved, medians; $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')",
       "",
       "| proxy | requests/s (wrk) | wrk p50 (ms) | wrk p99 (ms) | outside wrk's clock (ms) | requests/s (ab) | from the connect: p50 (ms) | p99 (ms) | mean (ms) | errors |",
       "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for n in names:
    w, a = runs[(n, "wrk")], runs[(n, "ab")]
    rps = med([x[0] for x in w])
    # a connection's whole cycle (conns / requests/s) less wrk's mean
    outside = med([conns / x[0] * 1e6 - x[3] for x in w])
    errs = int(sum(x[4] for x in w) + sum(x[4] for x in a))
    out.append(f"| {label[n]} | {rps:,.0f} | {med([x[1] for x in w])/1000:.1f} | {med([x[2] for x in w])/1000:.1f} | {outside/1000:.1f} | "
               f"{med([x[0] for x in a]):,.0f} | {med([x[1] for x in a])/1000:.0f} | {med([x[2] for x in a])/1000:.0f} | {med([x[3] for x in a])/1000:.0f} | {errs} |")
out.append("")
out.append("- All rounds, wrk p99 (ms): " + "; ".join(f"{label[n]} [ " + " ".join(f"{x[2]/1000:.0f}" for x in runs[(n, 'wrk')]) + " ]" for n in names))
out.append("- All rounds, ab mean from the connect (ms): " + "; ".join(f"{label[n]} [ " + " ".join(f"{x[3]/1000:.0f}" for x in runs[(n, 'ab')]) + " ]" for n in names))
print("\n".join(out))
EOF
)
printf '%s\n' "$section" >"$work/section"
emit_report proxy-clock "$work/section"
