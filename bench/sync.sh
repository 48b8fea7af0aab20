#!/usr/bin/env bash
# Image sync benchmark: host 2 has v1 of a file, host 1 has v2; how many
# bytes cross host 2's link and how long until host 2 has v2, with
#   1. a full copy (curl over HTTP),
#   2. rsync in daemon mode (rsync://), with v1 at the destination as basis,
#      also with -z (zstd),
#   3. casync: v2's chunk store and index served over HTTP, v1 as seed,
#   4. Phoenix: v2 renamed into the master's registry (host 1) until the
#      minion (host 2) reports it synced, through Phoenix's WireGuard overlay,
#   5. rsync and the full copy through Phoenix's overlay (the tunnel's share),
# for two data sets (bench/sync.py mkdata): (a) a 50 MiB binary-like file with
# five small edits and 4 KiB inserted, (b) an OCI image tar with one of five
# gzip layers rebuilt. Hosts are network namespaces on one bridge (as in
# bench/overlay.sh). Every round uses fresh data (seed = round number), so
# nothing is cached from an earlier round on either side.
#
# Needs root, rsync, casync, curl, zstd, python3, nsenter (util-linux).
# Usage: bench/sync.sh [--write] [ROUNDS]   (default 3 rounds; medians reported)
# TOOLS="copy rsync ..." runs a subset (copy rsync rsync-z casync phoenix rsync-ov copy-ov);
# KEEP=1 keeps the temp dir (data, logs, results.jsonl).
# Prints a markdown section; --write also puts it into BENCHMARKS.md (between
# <!-- sync:begin --> and <!-- sync:end -->).
set -euo pipefail
umask 077
write=no
if [ "${1:-}" = "--write" ]; then write=yes; shift; fi
rounds=${1:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
phoenix=$root/target/release/phoenix
helper=$root/bench/sync.py
tools=(${TOOLS:-copy rsync rsync-z casync phoenix rsync-ov copy-ov})
die() { echo "sync.sh: $*" >&2; exit 1; }
has() { [[ " ${tools[*]} " == *" $1 "* ]]; }
need_phoenix=no
for t in phoenix rsync-ov copy-ov; do has $t && need_phoenix=yes; done
for t in rsync casync curl zstd python3 nsenter cmp; do
    command -v $t >/dev/null || die "missing $t (apt-get install rsync casync curl zstd python3 util-linux)"
done
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
if [ $need_phoenix = yes ]; then
    [ -x "$phoenix" ] || die "build first: cargo build --release -p phoenix"
    "$phoenix" images --help >/dev/null 2>&1 || die "$phoenix has no \`images\` command (rebuild it)"
fi

tag=ps$$
work=$(mktemp -d /tmp/phoenix-sync-bench.XXXXXX)
sw=$tag-sw; h1=$tag-h1; h2=$tag-h2
pids=()
cleanup() {
    local rc=$? p
    if [ $rc != 0 ]; then
        for f in master.log m1.log rsyncd.log; do
            [ -s "$work/$f" ] && { echo "--- $f (last 15 lines)"; tail -15 "$work/$f"; } >&2
        done
    fi
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns pids $h1 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns pids $h2 2>/dev/null | xargs -r kill 2>/dev/null || true
    for _ in $(seq 30); do
        p=$( (ip netns pids $h1; ip netns pids $h2) 2>/dev/null)
        [ -z "$p" ] && break
        sleep 0.1
    done
    [ -n "$p" ] && echo "$p" | xargs -r kill -9 2>/dev/null
    wait 2>/dev/null || true
    for ns in $h1 $h2 $sw; do ip netns del $ns 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then echo "sync.sh: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
started=$(date +%s)

# shellcheck source=bench/netns.sh
. "$root/bench/netns.sh"
bridge_hosts $sw 10.96.0 $h1 $h2
port_open() { ip netns exec "$1" bash -c "exec 3<>/dev/tcp/$2/$3"; }

echo "sync.sh: generating $rounds rounds of data in $work" >&2
for r in $(seq "$rounds"); do
    python3 "$helper" mkdata "$work/h1/r$r" "$r" >"$work/data-r$r.json"
done
mkdir -p "$work/h1/cas" "$work/stage"
declare -A make_ms
if has casync; then
    for r in $(seq "$rounds"); do
        for s in bin oci; do
            ext=; [ $s = oci ] && ext=.tar
            casync make --store="$work/h1/cas/$s-r$r.castr" "$work/h1/cas/$s-r$r-v1.caibx" "$work/h1/r$r/$s-v1$ext" >/dev/null
            t0=$(date +%s%N)
            casync make --store="$work/h1/cas/$s-r$r.castr" "$work/h1/cas/$s-r$r-v2.caibx" "$work/h1/r$r/$s-v2$ext" >/dev/null
            make_ms[$s]+=" $((($(date +%s%N) - t0) / 1000000))"
        done
    done
fi

# Servers on host 1: HTTP (keep-alive) for curl and casync, an rsync daemon.
ip netns exec $h1 python3 "$helper" serve "$work/h1" 8080 &
pids+=($!)
cat >"$work/rsyncd.conf" <<EOF
uid = root
gid = root
use chroot = no
port = 873
log file = $work/rsyncd.log
[bench]
path = $work/h1
read only = yes
EOF
ip netns exec $h1 rsync --daemon --no-detach --config="$work/rsyncd.conf" &
pids+=($!)
waitfor 10 "the HTTP server on host 1" port_open $h2 10.96.0.1 8080
waitfor 10 "the rsync daemon on host 1" port_open $h2 10.96.0.1 873

# Phoenix: master on h1, minion on h2, accepted (as bench/overlay.sh does).
ov1=fd38:dde8:32dd::1
wg_mode=()
if [ $need_phoenix = yes ]; then
    "$phoenix" master --help | grep -- --wireguard >/dev/null && wg_mode=(--wireguard userspace)
    ip netns exec $h1 "$phoenix" master 10.96.0.1 --foreground --data-dir "$work/master" "${wg_mode[@]}" >"$work/master.log" 2>&1 &
    pids+=($!)
    waitfor 10 "the master's API socket" test -S "$work/master/phoenix.sock"
    export PHOENIX_DATA_DIR=$work/master
    key=$("$phoenix" master-info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
    ip netns exec $h2 "$phoenix" minion m1 10.96.0.1 "$key" 10.96.0.2 10.96.0.2 --foreground --data-dir "$work/m1" "${wg_mode[@]}" >"$work/m1.log" 2>&1 &
    pids+=($!)
    waitfor 10 "minion m1's join request" sh -c '"$0" waiting --json | grep -q "\"m1\""' "$phoenix"
    "$phoenix" accept m1 >/dev/null
    waitfor 15 "minion m1 to be reachable" sh -c '"$0" nodes --json | grep -q "\"reachable\""' "$phoenix"
    waitfor 15 "the overlay (host 2 to [$ov1]:8080)" port_open $h2 $ov1 8080
    mkdir -p "$work/master/registry"
fi

declare -A prev_hash
run_tool() { # SET ROUND TOOL
    local s=$1 r=$2 t=$3 name=app.bin ext= host=10.96.0.1
    [ $s = oci ] && name=app.tar ext=.tar
    [[ $t == *-ov ]] && host="[$ov1]"
    local src=$work/h1/r$r/$s-v2$ext v1=$work/h1/r$r/$s-v1$ext dir=$work/h2/$t
    local m=(python3 "$helper" measure --results "$work/results.jsonl" --tag "$s,$t,$r" --h2 $h2 --ns $h1 $h2 --v2 "$src")
    local in2=(nsenter --net=/run/netns/$h2)
    rm -rf "$dir"; mkdir -p "$dir"
    case $t in
    copy | copy-ov)
        "${m[@]}" --output "$dir/$name" -- "${in2[@]}" curl -sSfg -o "$dir/$name" "http://$host:8080/r$r/$s-v2$ext" ;;
    rsync | rsync-z | rsync-ov)
        local z=(); [ $t = rsync-z ] && z=(-z --compress-choice=zstd)
        cp "$v1" "$dir/$name"
        "${m[@]}" --output "$dir/$name" -- "${in2[@]}" rsync -I --stats "${z[@]}" "rsync://$host/bench/r$r/$s-v2$ext" "$dir/$name" ;;
    casync)
        cp "$v1" "$dir/seed"
        "${m[@]}" --output "$dir/$name" -- "${in2[@]}" casync extract -v --store="http://$host:8080/cas/$s-r$r.castr" \
            --seed="$dir/seed" "http://$host:8080/cas/$s-r$r-v2.caibx" "$dir/$name" ;;
    phoenix)
        local p=(--phoenix "$phoenix" --data-dir "$work/master" --minion-dir "$work/m1" --node m1 --timeout 180
            --master-log "$work/master.log" --minion-log "$work/m1.log")
        cp "$v1" "$work/stage/$name"
        old=$(python3 "$helper" measure --results "$work/results.jsonl" --tag "$s,phoenix-v1,$r" --h2 $h2 --ns $h1 $h2 --v2 "$v1" \
            "${p[@]}" --old-hash "${prev_hash[$s]:--}" --rename "$work/stage/$name" "$work/master/registry/$name")
        sleep 0.3
        cp "$src" "$work/stage/$name"
        prev_hash[$s]=$("${m[@]}" "${p[@]}" --old-hash "$old" --rename "$work/stage/$name" "$work/master/registry/$name") ;;
    *) die "unknown tool $t" ;;
    esac
    rm -rf "$dir"
}

n=${#tools[@]}
for r in $(seq "$rounds"); do
    for s in bin oci; do
        for i in $(seq 0 $((n - 1))); do # the order rotates round by round
            t=${tools[$(((i + r - 1) % n))]}
            echo "sync.sh: round $r/$rounds, $s, $t" >&2
            run_tool $s $r $t
        done
    done
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
git_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "?")
[ -z "$(git -C "$root" status --porcelain 2>/dev/null)" ] || git_rev="$git_rev + uncommitted changes"
d() { python3 -c "import json,sys; print(json.load(open('$work/data-r1.json'))$1)"; }
{
echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); \`bench/sync.sh $rounds\`: $rounds rounds, fresh data each round, medians; this run took $(($(date +%s) - started)) s"
echo "- Machine: $(nproc) CPUs (nproc) · $(sed -n 's/^model name[^:]*: *//p' /proc/cpuinfo | head -1) · kernel $(uname -srm) · $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM · temp dir on $(df --output=fstype "$work" | tail -1)"
[ $need_phoenix = yes ] && echo "- Phoenix: release build of $("$phoenix" --version) (git $git_rev)${wg_mode:+, \`${wg_mode[*]}\`}; overlay MTU $(ip -n $h2 -j link show | python3 -c 'import json,sys; print(*[l["mtu"] for l in json.load(sys.stdin) if l["ifname"].startswith("phoenix")])') (host 2's TUN device), veth MTU 1500"
echo "- Peers: rsync $(rsync --version | head -1 | awk '{print $3}'), $(casync --version | head -1), curl $(curl --version | head -1 | awk '{print $2}')"
echo "- (a): 50 MiB (52 428 800 B) of binary-like data (zstd -3 ratio $(d '["bin_ratio"]'):1); v2 has five 4–8-byte edits (at 10, 30, 45, 70, 90 %) and 4 KiB inserted in the middle"
echo "- (b): OCI archive (as \`docker image save\` writes it), 5 gzip layers of files of random bytes and text (round 1: $(d '["oci_layers_mb"]') MB, $(d '["oci_files"]') files); v2 rebuilds the third layer (round 1: $(d '["oci_changed_mb"][0]') → $(d '["oci_changed_mb"][1]') MB), hence a new config, manifest and index"
has casync && echo "- casync's \`make\` of v2's chunk store and index on host 1, before the sync and not in its time: median $(median ${make_ms[bin]}) ms (a), $(median ${make_ms[oci]}) ms (b)"
python3 "$helper" report "$work/results.jsonl"
grep -hE ' (WARN|ERROR) ' "$work"/master.log "$work"/m1.log 2>/dev/null | head -3 | sed 's/^/- Log: `/; s/$/`/' || true
} >"$work/report.md"
cat "$work/report.md"
if [ "$write" = yes ]; then
    python3 "$root/bench/splice-section.py" sync "$root/BENCHMARKS.md" <"$work/report.md"
    echo "sync.sh: wrote the sync section of $root/BENCHMARKS.md" >&2
fi
