#!/usr/bin/env bash
# The proxy's user-space instructions per request, Phoenix against nginx,
# counted by valgrind's callgrind: the same figure on a quiet machine and a
# busy one (bench/proxy.sh's requests/s move by more than the differences
# it is after when other machines share the CPUs).
#
# Each proxy runs alone under callgrind as a TLS-terminating proxy (one
# thread or one worker, the certificate and the backend of bench/proxy.sh)
# in front of an nginx backend serving a 100-byte file; h2load sends 2,000
# requests to warm up, the counters are zeroed, then N requests over 16
# keep-alive HTTP/1.1 connections are counted. What is counted: every
# instruction the proxy process runs in user space (TLS, HTTP, the event
# loop, malloc), not the kernel's share, which `strace -c` compares
# (syscalls a request) and bench/proxy.sh measures in CPU time.
#
# Debian packages: valgrind nghttp2-client nginx openssl iproute2
# Phoenix's side: cargo build --release -p phoenix-proxy --example serve
# Usage: bench/proxy-instructions.sh [--write] [REQUESTS]   (default 20000)
#   --write also puts the section into BENCHMARKS.md (between
#   <!-- proxy-instructions:begin --> and <!-- proxy-instructions:end -->).
# PHOENIX_ALT=PATH [PHOENIX_ALT_LABEL=TEXT] also counts another build of
# the serve example (an A/B). PROXY_PROFILE_DIR=DIR keeps each callgrind
# profile there (LABEL.callgrind) for callgrind_annotate.
set -euo pipefail
umask 077
write=no
if [ "${1:-}" = "--write" ]; then write=yes; shift; fi
n=${1:-20000}
. "$(dirname "$0")/lib.sh" # root, free_port, wait_port
serve=${PHOENIX_SERVE:-$root/target/release/examples/serve}
[ -x "$serve" ] || { echo "build first: cargo build --release -p phoenix-proxy --example serve" >&2; exit 1; }
need_tools "valgrind nghttp2-client nginx openssl iproute2" valgrind callgrind_control callgrind_annotate h2load nginx openssl ss

proxy_work proxy-instr 1 # valgrind writes its last dump on TERM

self_signed "$work"

bport=$(free_port)
mkdir -p "$work/backend/www"
head -c 100 /dev/urandom | base64 -w0 | head -c 100 >"$work/backend/www/small"
nginx_backend_conf "$work/backend" "$bport" >"$work/backend/nginx.conf"
nginx -p "$work/backend" -c "$work/backend/nginx.conf" -g 'daemon off;' &
pids+=($!)
wait_port "$bport"

# count LABEL COMMAND... -> "instructions per request" (the command listens on $pport)
count() {
    local label=$1 dir=$work/$1
    shift
    mkdir -p "$dir"
    valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$@" >"$dir/out.log" 2>&1 &
    local vp=$!
    pids+=($vp)
    wait_port "$pport" 60 || { cat "$dir/out.log" >&2; exit 1; } # valgrind starts slowly
    h2load "${tls[@]}" --h1 -n 2000 -c 16 -t 1 "https://localhost:$pport/small" >"$dir/warm.out" 2>&1
    callgrind_control -z $vp >/dev/null
    local got
    got=$(h2load "${tls[@]}" --h1 -n "$n" -c 16 -t 1 "https://localhost:$pport/small" | awk '/^status codes:/{print $3}')
    [ "$got" = "$n" ] || { echo "$label: $got of $n requests answered 2xx" >&2; exit 1; }
    # What was negotiated, as h2load saw it (the section says).
    awk '/^TLS Protocol:/{p=$3} /^Cipher:/{c=$2} END{print p, c}' "$dir/warm.out" >"$dir/tls"
    callgrind_control -d $vp >/dev/null
    # The dump is part 1 (the zeroing writes nothing); what the process
    # writes at its exit, after the kill, is not counted.
    local f=$dir/cg.out.1 total
    for _ in $(seq 50); do [ -s "$f" ] && break; sleep 0.2; done
    sleep 1 # the dump finished writing
    kill $vp 2>/dev/null || true
    wait $vp 2>/dev/null || true
    [ -n "${PROXY_PROFILE_DIR:-}" ] && mkdir -p "$PROXY_PROFILE_DIR" && cp "$f" "$PROXY_PROFILE_DIR/$label.callgrind"
    total=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",", "", $1); print $1; exit}')
    echo $((total / n))
}

# h2load offers what bench/proxy.sh's clients offer: TLS 1.3, AES-128-GCM,
# X25519 (its own defaults would override an OpenSSL config).
tls=(--tls13-ciphers=TLS_AES_128_GCM_SHA256 --groups=X25519)
declare -A result
echo "{\"routes\":[{\"host\":\"localhost\",\"instances\":[{\"id\":\"b\",\"addr\":\"127.0.0.1:$bport\"}]}]}" >"$work/routes.json"
pport=$(free_port)
result[phoenix]=$(PROXY_THREADS=1 count phoenix "$serve" "$work/routes.json" "127.0.0.1:$(free_port)" \
    "127.0.0.1:$pport" localhost "$work/cert.pem" "$work/key.pem")
labels=(phoenix)
if [ -n "${PHOENIX_ALT:-}" ]; then
    pport=$(free_port)
    result[alt]=$(PROXY_THREADS=1 count alt "$PHOENIX_ALT" "$work/routes.json" "127.0.0.1:$(free_port)" \
        "127.0.0.1:$pport" localhost "$work/cert.pem" "$work/key.pem")
    labels+=(alt)
fi

pport=$(free_port)
mkdir -p "$work/nginx"
# One worker in the foreground, run by callgrind itself.
nginx_proxy_conf "$work/nginx" "$pport" "$bport" localhost "$work/cert.pem" "$work/key.pem" 1 \
    "master_process off; daemon off;" >"$work/nginx/nginx.conf"
result[nginx]=$(count nginx nginx -p "$work/nginx" -c "$work/nginx/nginx.conf")
labels+=(nginx)

git_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$root" diff --quiet HEAD -- crates/proxy 2>/dev/null || git_rev="$git_rev + uncommitted changes in crates/proxy"
declare -A name=([phoenix]="Phoenix (git $git_rev)" [alt]="Phoenix, ${PHOENIX_ALT_LABEL:-${PHOENIX_ALT:-}}" [nginx]="nginx $(nginx -v 2>&1 | sed 's/.*nginx\///')")
section=$(
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M') UTC; \`bench/proxy-instructions.sh $n\`: $n requests for 100 bytes over 16 keep-alive HTTPS connections (h2load --h1), after 2,000 not counted; valgrind $(valgrind --version | sed 's/valgrind-//')"
    echo ""
    echo "| proxy | TLS (as h2load saw it) | user-space instructions per request | ÷ nginx |"
    echo "|---|---|---:|---:|"
    for l in "${labels[@]}"; do
        ratio=$(awk -v a="${result[$l]}" -v b="${result[nginx]}" 'BEGIN{printf "%.2f", a / b}')
        printf '| %s | %s | %s | %s |\n' "${name[$l]}" "$(cat "$work/$l/tls")" "$(echo "${result[$l]}" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta')" "$ratio"
    done
)
printf '%s\n' "$section"
if [ $write = yes ]; then
    printf '%s\n' "$section" | python3 "$root/bench/splice-section.py" proxy-instructions "$root/BENCHMARKS.md"
    echo "BENCHMARKS.md: proxy-instructions section written" >&2
fi
