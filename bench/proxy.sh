#!/usr/bin/env bash
# Proxy benchmark: Phoenix's reverse proxy (crates/proxy) against nginx,
# HAProxy and Caddy, all four over HTTPS with one certificate, in front of
# one backend, measured with wrk in one run:
#   - requests per second and p50/p99 latency, keep-alive connections and a
#     new connection (a resumed TLS 1.3 handshake) per request, for a
#     100-byte and a 1 MiB response, and each proxy's CPU time per request;
#   - each proxy's memory before and after the runs (VmRSS and VmHWM,
#     summed over its processes).
#
# Debian packages: wrk apache2-utils nginx haproxy caddy openssl curl python3 iproute2 procps
#   apt-get install -y wrk apache2-utils nginx haproxy caddy openssl curl python3 iproute2 procps
# If installing them started system instances, `systemctl stop nginx haproxy
# caddy` keeps them off the CPUs; this script needs none of their ports.
# Phoenix's side: cargo build --release -p phoenix-proxy --example serve
#
# Usage: bench/proxy.sh [--write] [SECONDS] [ROUNDS] [CONNECTIONS]
#   defaults: 10 s per wrk run, 3 rounds, 64 connections (wrk -t 2)
# PROXY_SCENARIOS="big-close ..." runs only those scenarios.
# PROXY_HOLD=1 starts everything, prints the ports and waits (profiling).
# PHOENIX_ALT=PATH [PHOENIX_ALT_LABEL=TEXT] adds a fifth peer: another build
# of the serve example (e.g. one at opt-level 3), measured the same way.
# Prints a markdown section; --write also puts it into BENCHMARKS.md
# (between <!-- proxy:begin --> and <!-- proxy:end -->).
#
# Everything runs on loopback, from a temp dir removed at the end. The
# script starts its own instances with its own config files on free ports;
# it never starts, stops or reconfigures a system service. Root is not
# needed (as root, nginx's workers run as root so they can read the temp dir).
set -euo pipefail
umask 077
write=no
if [ "${1:-}" = "--write" ]; then write=yes; shift; fi
secs=${1:-10}
rounds=${2:-3}
conns=${3:-64}
threads=2
. "$(dirname "$0")/lib.sh" # root, free_port, wait_port
serve=$root/target/release/examples/serve
[ -x "$serve" ] || { echo "build first: cargo build --release -p phoenix-proxy --example serve" >&2; exit 1; }
need_tools "wrk apache2-utils nginx haproxy caddy openssl curl python3 iproute2 procps" wrk ab nginx haproxy caddy openssl curl python3 ss ps

# The tree as the run starts (the binary was built from it, at best).
git_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$root" diff --quiet HEAD -- crates/proxy/src crates/proxy/examples crates/proxy/Cargo.toml Cargo.toml 2>/dev/null || git_rev="$git_rev + uncommitted changes in crates/proxy"

proxy_work proxy-bench 0.5

# --- TLS: one self-signed ECDSA P-256 certificate for "localhost" ---------
self_signed "$work"
cat "$work/cert.pem" "$work/key.pem" >"$work/combined.pem" # HAProxy's form
host=localhost
client_openssl_conf >"$work/client-openssl.cnf" # TLS 1.3, AES-128-GCM, X25519 only (lib.sh)
client() { OPENSSL_CONF=$work/client-openssl.cnf "$@"; }

# --- the backend: nginx, one worker, static files, keep-alive ------------
bport=$(free_port)
mkdir -p "$work/backend/www"
head -c 100 /dev/urandom | base64 -w0 | head -c 100 >"$work/backend/www/small"
head -c 1048576 /dev/urandom >"$work/backend/www/big"
nginx_backend_conf "$work/backend" "$bport" >"$work/backend/nginx.conf"
nginx -p "$work/backend" -c "$work/backend/nginx.conf" -g 'daemon off;' 2>>"$work/backend/error.log" &
backend_pid=$!
pids+=($backend_pid)

# --- the four proxies ------------------------------------------------------
names=(phoenix nginx haproxy caddy)
declare -A port pid label
label=([phoenix]=Phoenix [nginx]=nginx [haproxy]=HAProxy [caddy]=Caddy)

# Phoenix: the phoenix-proxy crate run standalone by its `serve` example
# (the same Shards the master embeds: 2 proxy threads, each a current-thread
# tokio runtime, both accepting from one listening socket, like nginx's 2
# workers).
port[phoenix]=$(free_port)
mkdir -p "$work/phoenix"
cat >"$work/phoenix/routes.json" <<EOF
{"routes":[{"host":"$host","instances":[{"id":"backend","addr":"127.0.0.1:$bport"}]}]}
EOF
PROXY_THREADS=$threads "$serve" "$work/phoenix/routes.json" "127.0.0.1:$(free_port)" "127.0.0.1:${port[phoenix]}" \
    $host "$work/cert.pem" "$work/key.pem" >"$work/phoenix/out.log" 2>&1 &
pid[phoenix]=$!
pids+=(${pid[phoenix]})
if [ -n "${PHOENIX_ALT:-}" ]; then
    [ -x "$PHOENIX_ALT" ] || { echo "PHOENIX_ALT=$PHOENIX_ALT: not an executable" >&2; exit 1; }
    names=(phoenix alt nginx haproxy caddy)
    label[alt]="Phoenix, ${PHOENIX_ALT_LABEL:-$PHOENIX_ALT}"
    port[alt]=$(free_port)
    mkdir -p "$work/alt"
    PROXY_THREADS=$threads "$PHOENIX_ALT" "$work/phoenix/routes.json" "127.0.0.1:$(free_port)" "127.0.0.1:${port[alt]}" \
        $host "$work/cert.pem" "$work/key.pem" >"$work/alt/out.log" 2>&1 &
    pid[alt]=$!
    pids+=(${pid[alt]})
fi

# nginx: 2 workers, upstream keep-alive, the usual forwarding headers.
port[nginx]=$(free_port)
mkdir -p "$work/nginx"
nginx_proxy_conf "$work/nginx" "${port[nginx]}" "$bport" "$host" "$work/cert.pem" "$work/key.pem" 2 >"$work/nginx/nginx.conf"
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' 2>>"$work/nginx/error.log" &
pid[nginx]=$!
pids+=(${pid[nginx]})

# HAProxy: one process, 2 threads, idle backend connections reused.
port[haproxy]=$(free_port)
mkdir -p "$work/haproxy"
cat >"$work/haproxy/haproxy.cfg" <<EOF
global
    nbthread 2
    maxconn 8000
    pidfile $work/haproxy/haproxy.pid
defaults
    mode http
    timeout connect 3s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s
    option forwardfor
    http-reuse always
frontend fe
    bind 127.0.0.1:${port[haproxy]} ssl crt $work/combined.pem alpn h2,http/1.1
    http-request set-header X-Forwarded-Proto https
    default_backend be
backend be
    server backend 127.0.0.1:$bport
EOF
haproxy -db -f "$work/haproxy/haproxy.cfg" >"$work/haproxy/out.log" 2>&1 &
pid[haproxy]=$!
pids+=(${pid[haproxy]})

# Caddy: defaults (GOMAXPROCS = all cores), the certificate given, no admin
# endpoint, no ACME, no HTTP/3, its data in the temp dir.
port[caddy]=$(free_port)
mkdir -p "$work/caddy"
cat >"$work/caddy/Caddyfile" <<EOF
{
    admin off
    auto_https off
    http_port $(free_port)
    https_port ${port[caddy]}
    storage file_system $work/caddy/data
    servers {
        protocols h1 h2
    }
}
https://$host:${port[caddy]} {
    tls $work/cert.pem $work/key.pem
    reverse_proxy 127.0.0.1:$bport
}
EOF
HOME=$work/caddy XDG_DATA_HOME=$work/caddy XDG_CONFIG_HOME=$work/caddy \
    caddy run --config "$work/caddy/Caddyfile" --adapter caddyfile >"$work/caddy/out.log" 2>&1 &
pid[caddy]=$!
pids+=(${pid[caddy]})

wait_port $bport
for n in "${names[@]}"; do
    wait_port "${port[$n]}" || { cat "$work/$n"/*.log >&2; exit 1; }
done

# Every proxy answers both files whole, over TLS 1.3 with the same cipher.
for n in "${names[@]}"; do
    for f in small big; do
        want=$(stat -c %s "$work/backend/www/$f")
        got=$(client curl -sk -o /dev/null -w '%{http_code} %{size_download}' "https://$host:${port[$n]}/$f")
        [ "$got" = "200 $want" ] || { echo "$n /$f: got '$got', want '200 $want'" >&2; exit 1; }
    done
done
# What each negotiates, and how often it resumes a TLS session: wrk's
# reconnections offer the session of the connection before, and a
# reconnection may land on another worker or thread than the connection
# that got the session, so one resumption proves little.
declare -A tlsinfo
request="GET /small HTTP/1.1\r\nHost: $host\r\nConnection: close\r\n\r\n"
reconnects=8
for n in "${names[@]}"; do
    rm -f "$work"/session*.pem
    first=$( (printf "$request"; sleep 0.3) | client openssl s_client -connect "127.0.0.1:${port[$n]}" \
        -servername $host -sess_out "$work/session0.pem" 2>/dev/null | awk '/^New, /{print $2, $NF; exit}' | tr -d ,)
    resumed=0
    for i in $(seq $reconnects); do
        again=$( (printf "$request"; sleep 0.3) | client openssl s_client -connect "127.0.0.1:${port[$n]}" \
            -servername $host -sess_in "$work/session$((i - 1)).pem" -sess_out "$work/session$i.pem" 2>/dev/null |
            awk '/^(New|Reused), /{print $1; exit}' | tr -d ,)
        [ "$again" = Reused ] && resumed=$((resumed + 1))
    done
    tlsinfo[$n]="$first, resumes $resumed of $reconnects reconnections"
done

if [ -n "${PROXY_HOLD:-}" ]; then
    # For profiling by hand: everything up, the ports and pids printed,
    # until interrupted.
    for n in "${names[@]}"; do echo "$n https://$host:${port[$n]}/ pid ${pid[$n]}"; done
    echo "backend http://127.0.0.1:$bport/ pid $backend_pid; client settings: OPENSSL_CONF=$work/client-openssl.cnf"
    while :; do sleep 3600; done
fi

# --- wrk -------------------------------------------------------------------
# A Lua hook prints one machine-readable line at the end of a run (the
# mean latency last, in µs).
cat >"$work/report.lua" <<'EOF'
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format("RESULT %.1f %d %d %d %d %d %d %d\n",
        summary.requests / (summary.duration / 1e6),
        latency:percentile(50), latency:percentile(99),
        summary.requests, e.connect + e.read + e.write + e.timeout, e.status,
        summary.bytes, latency.mean))
end
EOF
# PROXY_SCENARIOS="big-close ..." runs only those (a quicker look at one).
# The *-whole scenarios are the *-close ones timed by ab from the connect
# to the last byte (wrk's clock starts after the handshake).
read -r -a scenarios <<<"${PROXY_SCENARIOS:-small-ka big-ka small-close big-close small-whole big-whole}"
for s in "${scenarios[@]}"; do
    case $s in small-ka | big-ka | small-close | big-close | small-whole | big-whole) ;;
    *) echo "PROXY_SCENARIOS: unknown scenario $s (small-ka big-ka small-close big-close small-whole big-whole)" >&2; exit 1 ;;
    esac
done
run_wrk() { # name scenario duration -> "rps p50_us p99_us requests errors non2xx bytes mean_us cpu_ticks idle_ticks wrk_cpu_ms"
    local n=$1 s=$2 d=$3 path extra=()
    case $s in small-*) path=/small ;; *) path=/big ;; esac
    case $s in *-close) extra=(-H 'Connection: close') ;; esac
    local cpu0 cpu1 idle0 idle1
    cpu0=$(cpu_of "$n")
    idle0=$(idle_ticks)
    (
        client wrk -t $threads -c "$conns" -d "${d}s" --latency "${extra[@]}" -s "$work/report.lua" \
            "https://$host:${port[$n]}$path" >"$work/wrk.out" 2>&1 || true
        times >"$work/wrk.times" # the second line: wrk's user and system time
    )
    cpu1=$(cpu_of "$n")
    idle1=$(idle_ticks)
    awk -v cpu=$((cpu1 - cpu0)) -v idle=$((idle1 - idle0)) -v wrk="$(wrk_ms)" '/^RESULT /{print $2, $3, $4, $5, $6, $7, $8, $9, cpu, idle, wrk}' "$work/wrk.out" | grep . ||
        { echo "wrk failed against $n ($s):" >&2; cat "$work/wrk.out" >&2; exit 1; }
}

# ab times a request from its connect to its last byte (its `-g` file, one
# line a request, whole ms): two ab processes of half the connections each,
# as wrk runs two threads. ab makes a full TLS handshake every time (it
# keeps no session), with the same client settings as wrk.
run_ab() { # name scenario duration -> the fields of run_wrk, then the median connect + handshake in µs
    local n=$1 s=$2 d=$3 path k
    case $s in small-*) path=/small ;; *) path=/big ;; esac
    local cpu0 cpu1 idle0 idle1
    cpu0=$(cpu_of "$n")
    idle0=$(idle_ticks)
    (
        for k in 1 2; do
            client ab -q -t "$d" -n 200000 -c $((conns / 2)) -g "$work/ab$k.tsv" \
                "https://$host:${port[$n]}$path" >"$work/ab$k.out" 2>&1 &
        done
        wait
        times >"$work/wrk.times"
    )
    cpu1=$(cpu_of "$n")
    idle1=$(idle_ticks)
    python3 - "$work" "$d" $((cpu1 - cpu0)) $((idle1 - idle0)) "$(wrk_ms)" <<'PY' ||
import re, sys
work, d, cpu, idle, client = sys.argv[1], float(sys.argv[2]), *sys.argv[3:]
total, connect, errs, non2xx = [], [], 0, 0
for k in (1, 2):
    for line in open(f"{work}/ab{k}.tsv").read().splitlines()[1:]:
        f = line.split("\t")
        connect.append(int(f[2]) * 1000)
        total.append(int(f[4]) * 1000)
    out = open(f"{work}/ab{k}.out").read()
    errs += sum(int(x) for x in re.findall(r"^Failed requests:\s+(\d+)", out, re.M))
    non2xx += sum(int(x) for x in re.findall(r"^Non-2xx responses:\s+(\d+)", out, re.M))
if not total:
    sys.exit(1)
total.sort(); connect.sort()
at = lambda xs, p: xs[min(len(xs) - 1, int(p / 100 * len(xs)))]
print(f"{len(total) / d:.1f} {at(total, 50)} {at(total, 99)} {len(total)} {errs} {non2xx} 0 "
      f"{sum(total) // len(total)} {cpu} {idle} {client} {at(connect, 50)}")
PY
        { echo "ab failed against $n ($s):" >&2; cat "$work/ab1.out" >&2; exit 1; }
}

wrk_ms() { # -> wrk's user + system time in ms, from `times` in its subshell
    awk 'NR == 2 {
        t = 0
        for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60000 + a[2] * 1000 }
        printf "%d", t
    }' "$work/wrk.times"
}
idle_ticks() { # -> the machine's idle + iowait time, all CPUs, in clock ticks
    awk '/^cpu /{print $5 + $6; exit}' /proc/stat
}
cpu_of() { # name -> user + system CPU time of its processes, in clock ticks
    local total=0 p t
    for p in $(procs_of "${pid[$1]}"); do
        t=$(awk '{print $14 + $15}' /proc/$p/stat 2>/dev/null || echo 0)
        total=$((total + ${t:-0}))
    done
    echo $total
}
procs_of() { # pid -> the pid and its children (nginx's workers)
    echo "$1"
    ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' ' || true
}
mem_of() { # name -> "rss_kB hwm_kB" summed over its processes
    local total_rss=0 total_hwm=0 p rss hwm
    for p in $(procs_of "${pid[$1]}"); do
        rss=$(awk '/^VmRSS:/{print $2}' /proc/$p/status 2>/dev/null || echo 0)
        hwm=$(awk '/^VmHWM:/{print $2}' /proc/$p/status 2>/dev/null || echo 0)
        total_rss=$((total_rss + ${rss:-0})); total_hwm=$((total_hwm + ${hwm:-0}))
    done
    echo "$total_rss $total_hwm"
}
nprocs_of() { procs_of "${pid[$1]}" | grep -c .; }

results=$work/results.tsv
: >"$results"
declare -A idle_mem
for n in "${names[@]}"; do idle_mem[$n]=$(mem_of "$n"); done

# Warm-up: a short keep-alive and close run per proxy, not counted.
for n in "${names[@]}"; do
    run_wrk "$n" small-ka 2 >/dev/null
    run_wrk "$n" small-close 2 >/dev/null
done

# Rounds: each scenario runs against the four proxies back to back (the
# starting proxy rotates every round), so peers are compared minutes apart
# at most.
start=$(date +%s)
for r in $(seq "$rounds"); do
    for s in "${scenarios[@]}"; do
        for i in "${!names[@]}"; do
            n=${names[$(((i + r - 1) % ${#names[@]}))]}
            case $s in
            *-whole) line=$(run_ab "$n" "$s" "$secs") ;;
            *) line=$(run_wrk "$n" "$s" "$secs") ;;
            esac
            printf '%s\t%s\t%s\t%s\n' "$r" "$s" "$n" "$line" >>"$results"
            echo "round $r $s $n: $line" >&2
        done
    done
done
elapsed=$(($(date +%s) - start))
for n in "${names[@]}"; do
    printf 'peer\t%s\t%s\n' "$n" "${label[$n]}" >>"$results"
    printf 'mem\t%s\t%s\t%s\t%s\n' "$n" "${idle_mem[$n]}" "$(mem_of "$n")" "$(nprocs_of "$n")" >>"$results"
    printf 'tls\t%s\t%s\n' "$n" "${tlsinfo[$n]:-?}" >>"$results"
done

# --- the section -----------------------------------------------------------
cpu=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)
mem_total=$(awk '/^MemTotal:/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)
ver_nginx=$(nginx -v 2>&1 | sed 's/.*nginx\///')
ver_haproxy=$(haproxy -v | awk 'NR==1{print $3}')
ver_caddy=$(caddy version | awk '{print $1}')
ver_wrk=$({ wrk -v 2>&1 || true; } | awk 'NR==1{print $2}')
ver_openssl=$(openssl version | awk '{print $2}')
ver_ab=$(ab -V | awk 'NR==1{print $5}' | tr -d ',')

section=$(python3 - "$results" <<EOF
import statistics, sys
from collections import defaultdict

names, label = [], {}
hz = $(getconf CLK_TCK)
scen = [("small-ka", "100 B, keep-alive"), ("big-ka", "1 MiB, keep-alive"),
        ("small-close", "100 B, new connection per request"), ("big-close", "1 MiB, new connection per request"),
        ("small-whole", "100 B, new connection per request, timed from the connect (ab)"),
        ("big-whole", "1 MiB, new connection per request, timed from the connect (ab)")]
scen = [x for x in scen if x[0] in "${scenarios[*]}".split()]
runs = defaultdict(list)   # (scenario, name) -> [(rps, p50, p99, reqs, errs, non2xx, bytes, cpu µs a request, setup µs)]
mem, tls = {}, {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    if f[0] == "peer":
        names.append(f[1]); label[f[1]] = f[2]
    elif f[0] == "mem":
        idle, after = f[2].split(), f[3].split()
        mem[f[1]] = (int(idle[0]), int(after[0]), int(after[1]), int(f[4]))
    elif f[0] == "tls":
        tls[f[1]] = f[2]
    else:
        v = f[3].split()
        # setup: a connection's time outside wrk's clock, which starts when
        # the request is written: connections x seconds / requests (one
        # request's whole cycle) less the mean latency. With a new
        # connection each, that is the TCP connect and the TLS handshake,
        # waits included.
        # ab (the *-whole scenarios) reports its median connect +
        # handshake itself, inside its clock.
        rps = float(v[0])
        runs[(f[1], f[2])].append((rps, int(v[1]), int(v[2]), int(v[3]), int(v[4]), int(v[5]), int(v[6]),
                                   int(v[8]) * 1e6 / hz / max(int(v[3]), 1),
                                   int(v[11]) if f[1].endswith("whole") else $conns * 1e6 / max(rps, 1e-9) - int(v[7])))

med = lambda xs: statistics.median(xs)
def ms(us): return f"{us/1000:.2f}" if us < 10000 else f"{us/1000:.1f}"
def rate(x): return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"

out = []
out.append("- Date: $(date -u '+%Y-%m-%d %H:%M') UTC; \`bench/proxy.sh $secs $rounds $conns\`: $secs s per run, \`wrk -t $threads -c $conns\` (timed from the connect: two \`ab -c $((conns / 2))\`, ab $ver_ab), $rounds rounds ($elapsed s), medians")
out.append("- Machine: $(nproc) CPUs (nproc) · $cpu · kernel $(uname -sr) $(uname -m) · $mem_total RAM; wrk, the proxy and the backend share these CPUs")
out.append("- Phoenix: phoenix-proxy (git $git_rev) run by its \`serve\` example, release build, \`PROXY_THREADS=$threads\` (one current-thread tokio runtime a thread, all accepting from one listening socket); peers: nginx $ver_nginx (2 workers), HAProxy $ver_haproxy (\`nbthread 2\`), Caddy $ver_caddy (defaults); backend: nginx $ver_nginx (1 worker, static files); wrk $ver_wrk with OpenSSL $ver_openssl")
out.append("- TLS with each proxy (openssl s_client offering what wrk offers, each reconnection with the session of the one before): " + "; ".join(f"{label[n]} {tls.get(n, '?')}" for n in names))
out.append("")
for key, title in scen:
    whole = key.endswith("whole")
    close = key.endswith("close") or whole
    out.append(f"**{title}** (\`https://localhost/{'small' if key.startswith('small') else 'big'}\`" + (", \`Connection: close\`" if key.endswith("close") else "") + ")")
    out.append("")
    out.append("| proxy | requests/s | p50 (ms) | p99 (ms) | requests/s ÷ nginx | p99 ÷ nginx | proxy CPU per request (µs) | errors |"
               + (" of which connect + handshake, p50 (ms) |" if whole else " connect + handshake, outside wrk's clock (ms) |" if close else ""))
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if close else ""))
    ng = runs[(key, "nginx")]
    ng_rps, ng_p99 = med([x[0] for x in ng]), med([x[2] for x in ng])
    for n in names:
        xs = runs[(key, n)]
        rps, p50, p99 = med([x[0] for x in xs]), med([x[1] for x in xs]), med([x[2] for x in xs])
        errs = sum(x[4] for x in xs) + sum(x[5] for x in xs)
        cpu = med([x[7] for x in xs])
        setup = med([x[8] for x in xs])
        out.append(f"| {label[n]} | {rate(rps)} | {ms(p50)} | {ms(p99)} | {rps/ng_rps:.2f} | {p99/ng_p99:.2f} | {cpu:.0f} | {errs} |"
                   + (f" {ms(max(setup, 0))} |" if close else ""))
    out.append("")
out.append("Memory after the runs (VmRSS summed over the proxy's processes; VmHWM: the peak, summed the same way):")
out.append("")
out.append("| proxy | processes | RSS idle, before the runs | RSS after the runs | peak (VmHWM) |")
out.append("|---|---:|---:|---:|---:|")
for n in names:
    idle, after, hwm, procs = mem[n]
    out.append(f"| {label[n]} | {procs} | {idle/1024:.1f} MiB | {after/1024:.1f} MiB | {hwm/1024:.1f} MiB |")
out.append("")
parts = []
for key, title in scen:
    parts.append(f"{key}: " + "; ".join(f"{label[n]} [ " + " ".join(rate(x[0]) for x in runs[(key, n)]) + " ]" for n in names))
out.append("- All rounds, requests/s: " + " · ".join(parts))
parts = []
for key, title in scen:
    parts.append(f"{key}: " + "; ".join(f"{label[n]} [ " + " ".join(ms(x[2]) for x in runs[(key, n)]) + " ]" for n in names))
out.append("- All rounds, p99 (ms): " + " · ".join(parts))
print("\n".join(out))
EOF
)
printf '%s\n' "$section"
if [ $write = yes ]; then
    printf '%s\n' "$section" | python3 "$root/bench/splice-section.py" proxy "$root/BENCHMARKS.md"
    echo "BENCHMARKS.md: proxy section written" >&2
fi
