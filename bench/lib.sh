# shellcheck shell=bash disable=SC2034,SC2154
# (SC2034: what this file sets is used by the scripts that source it;
# SC2154: they set phoenix, the path of their copy of the binary, and work.)
#
# Shared by the benchmark scripts; sourced, not run:
#   . "$(dirname "$0")/lib.sh"
# It sets root (the workspace) and started, and defines die and say (named
# after the script), the checks of what a run needs, a work dir with our own
# copies of the binaries, and for the scripts that run a Phoenix cluster on
# network-namespace hosts: the hosts, starting a master and minions, joining
# them, waiting on the CLI's JSON, and the pieces of a clean-up trap. What a
# script measures and reports stays in the script.

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
started=$(date +%s)
bench_name=${0##*/}

die() { echo "$bench_name: $*" >&2; exit 1; }
say() { echo "$bench_name [$(($(date +%s) - started)) s]: $*" >&2; }
need_root() { [ "$(id -u)" = 0 ] || die "needs root ($1)"; }
need_tools() { # APT-HINT TOOL...: dies naming the first tool not on PATH
    local hint=$1 t
    shift
    for t in "$@"; do command -v "$t" >/dev/null || die "missing $t (apt-get install $hint)"; done
}
need_bins() { # DIR HOW-TO-BUILD NAME...
    local dir=$1 how=$2 b
    shift 2
    for b in "$@"; do [ -x "$dir/$b" ] || die "no $dir/$b: $how"; done
}

# For the scripts that run servers on loopback (proxy.sh,
# proxy-instructions.sh): a port, waiting for a listener on it, and
# stopping what they started (the pids in their array pids).
kill_pids() { # SECONDS: TERM to every pid in pids, then KILL after SECONDS
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep "$1"
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
free_port() { # a random TCP port that no socket uses now
    local p
    while :; do
        p=$((20000 + RANDOM % 12000))
        [ -z "$(ss -Htan "sport = :$p")" ] && { echo $p; return; }
    done
}
wait_port() { # PORT [SECONDS]: waits until something listens on PORT (10 s)
    local i
    for ((i = 0; i < ${2:-10} * 10; i++)); do
        [ -n "$(ss -Htln "sport = :$1")" ] && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}

# The command line a report names: bench/NAME.sh [--write] ARGS, with
# PHOENIX_BINS in front when the binaries came from another build.
# Usage (after the --write flag was shifted off): bench_command bench/x.sh "$@"
bench_command() {
    local c=$1
    shift
    [ -n "${PHOENIX_BINS:-}" ] && c="PHOENIX_BINS=$PHOENIX_BINS $c"
    [ "${write:-no}" = yes ] && c+=" --write"
    [ $# -gt 0 ] && c+=" $*"
    echo "$c"
}

# make_work NAME: work=/tmp/phoenix-NAME-bench.XXXXXX, readable by the
# services' users, with an empty bin/.
make_work() {
    work=$(mktemp -d "/tmp/phoenix-$1-bench.XXXXXX")
    chmod 755 "$work"
    mkdir -p "$work/bin"
}
# copy_bins DIR NAME...: our own copies in $work/bin, so that a rebuild in
# the workspace during the run changes nothing.
copy_bins() {
    local dir=$1 b
    shift
    for b in "$@"; do cp "$dir/$b" "$work/bin/"; done
}

# Long steps run in the background and are waited for, so that a signal is
# handled at once (bash runs traps only between commands); the clean-up ends
# the one running (kill_child).
child=
in_bg() { "$@" & child=$!; wait "$child"; child=; }
kill_child() { if [ -n "$child" ]; then kill "$child" 2>/dev/null; wait "$child" 2>/dev/null; fi; }

# The report: printed, and with --write spliced into BENCHMARKS.md between
# <!-- SECTION:begin --> and <!-- SECTION:end -->.
emit_report() { # SECTION FILE
    cat "$2"
    if [ "${write:-no}" = yes ]; then
        python3 "$root/bench/splice-section.py" "$1" "$root/BENCHMARKS.md" <"$2"
        say "wrote the $1 section of $root/BENCHMARKS.md"
    fi
}

# ------------------------------------------------------------------ a cluster
# shellcheck source=bench/netns.sh
. "$root/bench/netns.sh"

declare -A daemon=() # name -> pid of our phoenix master and minions
hosts=()             # the hosts' namespaces
host_names=()        # their names (master, m1, ...), in the order of their addresses
sw=
tag=
subnet=
cgroup_ids=()        # the @SUFFIX of our minions' service cgroups
notes=()             # lines for the report

# cluster_hosts TAG SUBNET NAME...: a bridge in namespace TAG-sw and a host
# TAG-NAME per NAME, the Nth with the address SUBNET.N.
cluster_hosts() {
    local n
    tag=$1 subnet=$2
    shift 2
    sw=$tag-sw
    host_names=("$@")
    hosts=()
    for n in "$@"; do hosts+=("$tag-$n"); done
    bridge_hosts "$sw" "$subnet" "${hosts[@]}"
}
ip_of() {
    local i=1 n
    for n in "${host_names[@]}"; do
        [ "$n" = "$1" ] && { echo "$subnet.$i"; return; }
        i=$((i + 1))
    done
    die "no host $1"
}
ns_of() { echo "$tag-$1"; }

jq1() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
waitfor_cli() { # SECONDS WHAT PYTHON-EXPR-ON-d CLI-ARGS...
    local secs=$1 what=$2 expr=$3
    shift 3
    for _ in $(seq $((secs * 10))); do
        "$phoenix" "$@" 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); sys.exit(0 if ($expr) else 1)" 2>/dev/null && return 0
        sleep 0.1
    done
    die "timed out after ${secs} s waiting for $what"
}

# start_master DIR ARGS...: `phoenix master` on host master, data in
# DIR/master, log DIR/master.log; waits for its socket and sets key (the
# minions' join key). PHOENIX_DATA_DIR must be DIR/master for the CLI.
start_master() {
    local dir=$1
    shift
    ip netns exec "$(ns_of master)" "$phoenix" master "$(ip_of master)" --foreground --data-dir "$dir/master" \
        "$@" >"$dir/master.log" 2>&1 &
    daemon[master]=$!
    waitfor 15 "the master's socket" test -S "$dir/master/phoenix.sock"
    key=$("$phoenix" master-info --json | jq1 'd["key"]')
}
# start_minion DIR NAME ARGS...: `phoenix minion NAME` on host NAME, data in
# DIR/NAME, log DIR/NAME.log. --keep-free-mb 16: a minion pre-caches the
# pushed images only while that much of its disk stays free (default: a
# tenth of the disk), and the runs wait until every minion holds them.
start_minion() {
    local dir=$1 name=$2 ip
    shift 2
    ip=$(ip_of "$name")
    ip netns exec "$(ns_of "$name")" "$phoenix" minion "$name" "$(ip_of master)" "$key" "$ip" "$ip" \
        --foreground --data-dir "$dir/$name" --keep-free-mb 16 "$@" >"$dir/$name.log" 2>&1 &
    daemon[$name]=$!
}
# join_minions NAME...: accepts each once it asks to join, then waits until
# all are reachable.
join_minions() {
    local m
    for m in "$@"; do
        waitfor_cli 20 "$m to ask to join" "any(n['name'] == '$m' for n in d)" waiting --json
        "$phoenix" accept "$m" >/dev/null
    done
    for m in "$@"; do
        waitfor_cli 20 "$m to be reachable" "any(n['name'] == '$m' and n['state'] == 'reachable' for n in d)" nodes --json
    done
}
# remember_cgroup SERVICE: our minion's id, from the service's cgroup (named
# NAME@<minion id>), for remove_cgroups.
remember_cgroup() {
    local pid cg
    pid=$("$phoenix" status "$1" --json | jq1 'd["pid"]')
    cg=$(sed -n 's/^0:://p' "/proc/$pid/cgroup" 2>/dev/null || true)
    case $cg in */phoenix/*@*) cgroup_ids+=("${cg##*@}") ;; esac
}

# ------------------------------------------------------------------ clean-up
# keep_results RC FILE...: a failed run (RC not 0), or any with KEEP_LOGS
# set, keeps those of the FILEs (below the work dir) that exist, in a new
# /tmp/phoenix-NAME-logs.XXXXXX: the work dir goes at the end.
keep_results() {
    local rc=$1 f rel keep=
    shift
    [ "$rc" != 0 ] || [ -n "${KEEP_LOGS:-}" ] || return 0
    for f in "$@"; do
        [ -f "$f" ] || continue
        [ -n "$keep" ] || keep=$(mktemp -d "/tmp/phoenix-${bench_name%.sh}-logs.XXXXXX")
        rel=${f#"$work"/}
        mkdir -p "$keep/$(dirname "$rel")"
        cp "$f" "$keep/$rel"
    done
    [ -z "$keep" ] || echo "$bench_name: exit $rc; the daemons' logs and the results are in $keep" >&2
}
# stop_cluster RECORD...: SIGTERM to our daemons (SIGKILL after 5 s), then
# the services recorded in the minions' RECORD files (run/*.json), then
# whatever still runs in our hosts. Safe under set -e; keeps its setting.
stop_cluster() {
    local was_e=no p rec pid h
    case $- in *e*) was_e=yes ;; esac
    set +e
    for p in "${daemon[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${daemon[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
    done
    daemon=()
    # Services outlive their minion by design: end every one still recorded
    # (a binary leads its process group; a container's init is alone).
    for rec in "$@"; do
        [ -e "$rec" ] || continue
        case $rec in *.done.json) continue ;; esac
        pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("pid") or "")' "$rec" 2>/dev/null)
        [ -n "$pid" ] && [ "$pid" -gt 1 ] && { kill -9 -- "-$pid" 2>/dev/null; kill -9 "$pid" 2>/dev/null; }
    done
    for h in "${hosts[@]}"; do ip netns pids "$h" 2>/dev/null | xargs -r kill -9 2>/dev/null; done
    [ $was_e = no ] || set -e
}
# remove_cgroups [GLOB...]: the cgroups a killed minion left, deepest first:
# those of remember_cgroup's ids and those matching GLOB (find -path).
remove_cgroups() {
    local g id
    for id in "${cgroup_ids[@]+"${cgroup_ids[@]}"}"; do set -- "$@" "*/phoenix/*@$id"; done
    for g in "$@"; do
        find /sys/fs/cgroup -mindepth 2 -maxdepth 4 -type d -path "$g" 2>/dev/null | sort -r | xargs -r rmdir 2>/dev/null
    done
}
# remove_hosts_and_work: the hosts' namespaces (their nftables tables go
# with them), the mounts below the work dir (deepest first), the work dir.
remove_hosts_and_work() {
    local h
    for h in "${hosts[@]}"; do ip netns del "$h" 2>/dev/null; done
    [ -z "$sw" ] || ip netns del "$sw" 2>/dev/null
    if [ -n "${work:-}" ]; then
        awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
        rm -rf "$work"
    fi
}

# ------------------------------------------------------------------ report
# log_problems IGNORE LOG...: the WARN/ERROR lines of the logs, less those
# matching IGNORE (a grep pattern; none if empty).
log_problems() {
    local ignore=$1
    shift
    cat "$@" | { grep -E ' (WARN|ERROR) ' || true; } |
        if [ -n "$ignore" ]; then { grep -v -- "$ignore" || true; }; else cat; fi
}
# note_log_problems WIDTH IGNORE LOG...: a note with their count and the
# three most frequent (cut to WIDTH, without the timestamp), if any.
note_log_problems() {
    local width=$1 n ex
    shift
    n=$(log_problems "$@" | wc -l)
    if [ "$n" -gt 0 ]; then
        ex=$(log_problems "$@" | sed 's/^[^ ]* *//' | cut -c1-"$width" | sort | uniq -c | sort -rn | head -3 | sed 's/^ *//' | paste -sd';' -)
        notes+=("The daemons' logs hold $n WARN/ERROR lines; the most frequent (count, line): \`$ex\`")
    fi
}
# bins_git_rev WHAT PATH...: the commit a report names: with PHOENIX_BINS,
# PHOENIX_BINS_REV (the workspace's HEAD says nothing about those binaries)
# and PHOENIX_BINS_NOTE or "WHAT from PHOENIX_BINS=..."; else HEAD, and the
# folders below PATH... with uncommitted changes.
bins_git_rev() {
    local what=$1 rev
    shift
    rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "?")
    if [ -n "${PHOENIX_BINS:-}" ]; then
        rev="${PHOENIX_BINS_REV:-unknown commit}, ${PHOENIX_BINS_NOTE:-$what from PHOENIX_BINS=$PHOENIX_BINS}"
    elif [ -n "$(git -C "$root" status --porcelain -- "$@" 2>/dev/null)" ]; then
        rev="$rev + uncommitted changes in $(git -C "$root" status --porcelain -- "$@" | awk '{print $2}' | cut -d/ -f1-2 | sort -u | paste -sd, -)"
    fi
    echo "$rev"
}

# --- nginx, as the proxy benchmarks run it (bench/proxy.sh and
# bench/proxy-instructions.sh: the same backend and the same nginx proxy) --
nginx_main() { # DIR: the main-context lines (as root, workers run as root to read the temp dir)
    [ "$(id -u)" = 0 ] && echo "user root;"
    echo "pid $1/nginx.pid;"
    echo "error_log $1/error.log warn;"
}
nginx_temp_paths() { # DIR: every temp file in DIR, none in system paths
    echo "    client_body_temp_path $1/client_body; proxy_temp_path $1/proxy;"
    echo "    fastcgi_temp_path $1/fastcgi; uwsgi_temp_path $1/uwsgi; scgi_temp_path $1/scgi;"
}
# The backend: one worker serving DIR/www (the caller fills it), sendfile,
# keep-alive without a request limit.
nginx_backend_conf() { # DIR PORT
    cat <<CONF
$(nginx_main "$1")
worker_processes 1;
events { worker_connections 8192; }
http {
$(nginx_temp_paths "$1")
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 10000000;
    open_file_cache max=16;
    server {
        listen 127.0.0.1:$2;
        root $1/www;
    }
}
CONF
}
# nginx as the TLS proxy in front of the backend: HTTP/1.1 and keep-alive
# to it, Host and X-Forwarded-For/-Proto set, TLS 1.3 on (Debian's 1.22
# stops at 1.2 by default), no access log. EXTRA goes in the main context.
nginx_proxy_conf() { # DIR PORT BACKEND_PORT HOST CERT KEY WORKERS [EXTRA]
    cat <<CONF
$(nginx_main "$1")
${8:-}
worker_processes $7;
events { worker_connections 8192; }
http {
$(nginx_temp_paths "$1")
    access_log off;
    keepalive_timeout 120s;
    keepalive_requests 10000000;
    upstream backend {
        server 127.0.0.1:$3;
        keepalive 64;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:$2 ssl;
        server_name $4;
        ssl_certificate $5;
        ssl_certificate_key $6;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }
}
CONF
}
# proxy_work NAME GRACE: a private work=/tmp/phoenix-NAME.XXXXXX and
# pids=(); on exit every pid is stopped (TERM, then KILL after GRACE s)
# and the dir removed.
proxy_work() {
    work=$(mktemp -d "/tmp/phoenix-$1.XXXXXX")
    pids=()
    proxy_grace=$2
    trap 'kill_pids "$proxy_grace"; rm -rf "$work"' EXIT
    trap 'exit 130' INT TERM HUP
}
# self_signed DIR: DIR/cert.pem and DIR/key.pem, one ECDSA P-256
# certificate for "localhost", valid two days.
self_signed() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$1/key.pem" -out "$1/cert.pem" -days 2 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost 2>/dev/null
}
# The client side of the proxy benchmarks (wrk, ab, h2load, curl,
# s_client) offers only TLS 1.3 with AES-128-GCM and X25519, so that every
# proxy negotiates the same: Caddy (Go) cannot be told its TLS 1.3 suites,
# and the others would pick AES-256. Use: OPENSSL_CONF=FILE.
client_openssl_conf() {
    cat <<'CONF'
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1.3
Ciphersuites = TLS_AES_128_GCM_SHA256
Groups = X25519
CONF
}
