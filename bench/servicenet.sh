#!/usr/bin/env bash
# Service-networking benchmark, in one run, on four hosts (network namespaces
# on one bridge): a master, minions m1 and m2 with a network namespace per
# service (the default), and m3 with `--service-network host`; real
# `phoenix master` / `phoenix minion` daemons, the WireGuard overlay on,
# default ports. It measures
#   1. throughput (iperf3) and TCP round trip (a one-byte ping-pong) from m2
#      to m1 over the plain link (the bridge's 10.97.0.x), the bare overlay
#      (m2's host to m1's overlay address) and service to service: an
#      `iperf3 -s` service and a ping-pong service on m1, the clients inside
#      the namespace of a service on m2 that links them (nsenter --net);
#      and the same two services reached from a service on m1 itself;
#   2. deploy -> running (`phoenix deploy` wall time; it returns once the
#      service runs) of services deployed one by one, binaries and
#      containers, with a namespace each (m1) and without (m3), interleaved;
#      and the parts alone (crates/net/examples/netns_bench: create, destroy,
#      a firewall rebuild, kernel memory per namespace);
#   3. SERVICES daemons (`sleep infinity`) in one spec file on one minion,
#      with a namespace each (m1), then without (m3): time until all run, the
#      minion's RSS and descriptors, the host's memory, a deploy beside them,
#      deleting them.
# Prints a markdown section; --write also puts it into BENCHMARKS.md (between
# <!-- servicenet:begin --> and <!-- servicenet:end -->).
#
# Needs root, iperf3, nsenter (util-linux), nft (nftables), crun, busybox
# (static, for the container image), python3, iproute2, and a release build
# (cargo build --release --workspace); cargo to build the netns_bench example
# (its part is skipped without it).
# KEEP_LOGS=1 keeps the daemons' logs (kept anyway on failure).
# Usage: bench/servicenet.sh [--write] [SECONDS] [ROUNDS] [DEPLOYS] [SERVICES]
#   defaults: 5 s per iperf3 run, 3 rounds, 20 deploys of each kind, 1000 services
set -euo pipefail
write=no
if [ "${1:-}" = "--write" ]; then write=yes; shift; fi
secs=${1:-5}
rounds=${2:-3}
deploys=${3:-20}
services=${4:-1000}
args="$secs $rounds $deploys $services"
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

need_root "network namespaces, TUN devices, nftables"
need_tools "iperf3 util-linux nftables crun busybox-static python3 iproute2" iperf3 nsenter nft crun python3 ip
[ -x /usr/bin/python3 ] || die "missing /usr/bin/python3 (the ping-pong service's interpreter)"
busybox=$(command -v busybox) || die "missing busybox (apt-get install busybox-static)"
[ -e /dev/net/tun ] || die "needs /dev/net/tun"
need_bins "$root/target/release" "cargo build --release --workspace" phoenix testy

make_work servicenet
copy_bins "$root/target/release" phoenix testy
cp "$root/bench/servicenet.py" "$root/bench/benchlib.py" "$work/bin/"
py=$work/bin/servicenet.py
phoenix=$work/bin/phoenix
export PHOENIX_DATA_DIR=$work/master
helpers=() # servers on the hosts

# ------------------------------------------------------------------ clean-up
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP
    keep_results "$rc" "$work"/*.log "$work"/*.out
    kill_child
    for p in "${helpers[@]}"; do kill "$p" 2>/dev/null; done
    # Delete what is left while the minions run, so that they remove the
    # namespaces, cgroups and containers themselves (at most 2 minutes).
    if [ -S "$work/master/phoenix.sock" ]; then
        local until=$(($(date +%s) + 120))
        for s in $(timeout 10 "$phoenix" services --json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(s["name"] for s in json.load(sys.stdin)))' 2>/dev/null); do
            [ "$(date +%s)" -lt "$until" ] || break
            timeout 20 "$phoenix" del "$s" --timeout-s 15 >/dev/null 2>&1
        done
    fi
    stop_cluster "$work"/m*/run/*.json
    sleep 0.5
    # Cgroups of our services (all named sn-*) that a killed minion left.
    remove_cgroups '*/phoenix/sn-*@*'
    remove_hosts_and_work
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ------------------------------------------------------------------ hosts
cluster_hosts sn$$ 10.97.0 master m1 m2 m3

deploy() { # JSON (a spec or an array of them)
    local f
    f=$(mktemp "$work/spec-XXXXXX.json")
    echo "$1" >"$f"
    python3 "$py" deploy --phoenix "$phoenix" "$f" >"$work/deploy.out" 2>&1 || die "phoenix deploy $1: $(cat "$work/deploy.out")"
}
status_of() { "$phoenix" status "$1" --json | jq1 "d['$2']"; }

# ------------------------------------------------------------------ cluster
say "starting a master, minions m1 and m2 (netns) and m3 (host) in $work"
start_master "$work"
# --stop-timeout-ms: testy as a container's init ignores SIGTERM (the kernel
# gives PID 1 no default action), which only slows the clean-ups.
for pair in m1:netns m2:netns m3:host; do
    start_minion "$work" "${pair%%:*}" --service-network "${pair##*:}" --min-uptime-ms 0 --stop-timeout-ms 500
done
join_minions m1 m2 m3
ov1=$("$phoenix" nodes --json | jq1 "[n['overlay_ip'] for n in d if n['name'] == 'm1'][0]")
if [ -e /sys/module/wireguard ]; then
    wireguard="\`--wireguard auto\` with the kernel's wireguard module loaded"
else
    wireguard="in userspace (gotatun inside the phoenix process; this kernel has no wireguard module)"
fi

# Images: iperf3, the ping-pong, testy, sleep, and a small container image
# of testy and busybox (bench/containers.py builds it).
"$phoenix" push "$(command -v iperf3)" iperf3 >/dev/null
"$phoenix" push "$py" rtt >/dev/null
"$phoenix" push "$work/bin/testy" testy >/dev/null
"$phoenix" push "$(readlink -f "$(command -v sleep)")" sleep >/dev/null
python3 "$root/bench/containers.py" mkimage "$work/app.tar" --testy "$work/bin/testy" --busybox "$busybox" \
    --data-mib 0.01 --data-layers 1 >"$work/image.json"
"$phoenix" push "$work/app.tar" app.tar >/dev/null
image_desc=$(jq1 '"%.1f MB" % (d["file_bytes"] / 1e6)' <"$work/image.json")
# Every minion holds every image before anything is timed.
waitfor_cli 120 "every minion to hold every image" \
    "len(d) >= 5 and all(len(i['nodes']) >= 3 and all(n['state'] == 'synced' for n in i['nodes']) for i in d)" images --json

# ------------------------------------------------------------------ 1. throughput and round trip
say "1. throughput and round trip, m2 -> m1: plain link, bare overlay, service to service ($rounds rounds of $secs s)"
deploy '[
  {"machine": "m1", "name": "sn-iperf", "image": "iperf3", "type": "binary", "args": ["-s"]},
  {"machine": "m1", "name": "sn-rtt", "image": "rtt", "type": "binary", "args": ["rtt", "server", "::", "5300"]},
  {"machine": "m2", "name": "sn-client", "image": "sleep", "type": "binary", "args": ["infinity"], "link": ["sn-iperf", "sn-rtt"]},
  {"machine": "m1", "name": "sn-local", "image": "sleep", "type": "binary", "args": ["infinity"], "link": ["sn-iperf", "sn-rtt"]}
]'
ip_iperf=$(status_of sn-iperf ip)
ip_rtt=$(status_of sn-rtt ip)
client_pid=$(status_of sn-client pid)
local_pid=$(status_of sn-local pid)
in_client=(nsenter "--net=/proc/$client_pid/ns/net")
in_local=(nsenter "--net=/proc/$local_pid/ns/net")
on_m2=(ip netns exec "$(ns_of m2)")
[ "$(readlink "/proc/$client_pid/ns/net")" != "$("${on_m2[@]}" readlink /proc/self/ns/net)" ] ||
    die "sn-client runs in its host's namespace, not one of its own"

# Servers in m1's host namespace for the plain link and the bare overlay
# (iperf3 on 5202, the ping-pong on 5302; the services use 5201 and 5300 in
# their own namespaces).
ip netns exec "$(ns_of m1)" iperf3 -s -p 5202 >/dev/null 2>&1 &
helpers+=($!)
ip netns exec "$(ns_of m1)" "$py" rtt server :: 5302 >/dev/null 2>&1 &
helpers+=($!)
sleep 0.5

throughput() { # PORT HOST -- CLIENT-PREFIX... -> Gbit/s
    local port=$1 host=$2
    shift 3
    "$@" iperf3 -c "$host" -p "$port" -t "$secs" -J |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9, 3))'
}
latency() { # PORT HOST -- CLIENT-PREFIX... -> µs
    local port=$1 host=$2
    shift 3
    "$@" "$py" rtt client "$host" "$port"
}
# Each path once, untimed (one that does not work fails here, not in a table).
for check in "5201 $ip_iperf -- ${in_client[*]}" "5202 $ov1 -- ${on_m2[*]}" "5202 $(ip_of m1) -- ${on_m2[*]}"; do
    # shellcheck disable=SC2086
    (secs=1 throughput $check >/dev/null) || die "iperf3 failed: $check"
done
latency 5300 "$ip_rtt" -- "${in_client[@]}" >/dev/null || die "the ping-pong from sn-client to sn-rtt failed"
: >"$work/net.txt"
measure() { # LABEL PORT-TP PORT-RTT HOST-TP HOST-RTT -- PREFIX...
    local label=$1 ptp=$2 prtt=$3 htp=$4 hrtt=$5 tp lat
    shift 6
    tp=$(throughput "$ptp" "$htp" -- "$@")
    lat=$(latency "$prtt" "$hrtt" -- "$@")
    echo "$label tp $tp" >>"$work/net.txt"
    echo "$label rtt $lat" >>"$work/net.txt"
    printf ' %s %s Gbit/s %s µs;' "$label" "$tp" "$lat"
}
for r in $(seq "$rounds"); do
    line=$(measure plain 5202 5302 "$(ip_of m1)" "$(ip_of m1)" -- "${on_m2[@]}")
    line+=$(measure overlay 5202 5302 "$ov1" "$ov1" -- "${on_m2[@]}")
    line+=$(measure service 5201 5300 "$ip_iperf" "$ip_rtt" -- "${in_client[@]}")
    line+=$(measure local 5201 5300 "$ip_iperf" "$ip_rtt" -- "${in_local[@]}")
    say "  round $r:$line"
done
for p in "${helpers[@]}"; do kill "$p" 2>/dev/null || true; done
helpers=()
for s in sn-local sn-client sn-iperf sn-rtt; do "$phoenix" del "$s" >/dev/null; done

# ------------------------------------------------------------------ 2. deploy -> running
say "2. deploy -> running, one by one: $deploys of each kind (+1 warm-up), netns (m1) and host (m3), interleaved"
in_bg python3 "$py" deploys --phoenix "$phoenix" --work "$work" --n "$deploys" >"$work/deploys.json"
for s in $("$phoenix" services --json | jq1 '" ".join(s["name"] for s in d)'); do "$phoenix" del "$s" >/dev/null; done

# The parts alone, in a throwaway namespace.
netns_bench=""
bench_bin=$root/target/release/examples/netns_bench
if command -v cargo >/dev/null; then
    (cd "$root" && cargo build --release -q -p phoenix-net --example netns_bench) >"$work/netns_bench-build.log" 2>&1 ||
        notes+=("\`cargo build --release -p phoenix-net --example netns_bench\` failed ($(tail -1 "$work/netns_bench-build.log")); the parts alone come from the build already in target/release/examples, if any.")
fi
if [ -x "$bench_bin" ]; then
    say "2b. the parts alone: netns_bench 100 1000"
    cp "$bench_bin" "$work/bin/"
    if in_bg "$work/bin/netns_bench" 100 1000 >"$work/netns_bench.txt" 2>&1; then
        netns_bench=$(cat "$work/netns_bench.txt")
    else
        notes+=("netns_bench failed: $(tail -1 "$work/netns_bench.txt")")
    fi
else
    notes+=("No netns_bench build (cargo missing?): the parts alone were not measured.")
fi

# ------------------------------------------------------------------ 3. many services
say "3. $services services on one minion: with a namespace each (m1), then without (m3)"
for pair in m1:netns m3:host; do
    m=${pair%%:*}
    mode=${pair##*:}
    in_bg python3 "$py" many --phoenix "$phoenix" --work "$work" --machine "$m" --ns "$(ns_of "$m")" \
        --pid "${daemon[$m]}" --count "$services" >"$work/many-$mode.json"
    say "  $mode: $(jq1 '"all running in %.2f s; minion RSS %.1f -> %.1f MiB, %d descriptors; one more: %s ms; deleted in %.1f s" % (d["bringup_s"], d["rss_idle_kb"] / 1024, d["rss_kb"] / 1024, d["fds"], d["more_ms"], d["del_s"])' <"$work/many-$mode.json")"
done

# ------------------------------------------------------------------ report
note_log_problems 220 "" "$work"/m?.log "$work/master.log"
echo_ch=$(cat "$work"/m?.log | grep -c 'No child processes' || true)
[ "$echo_ch" = 0 ] || notes+=("$echo_ch of those say \`waiting for nft: No child processes\`: the minion's reaper (\`waitid(P_ALL)\`) collected an \`nft\` child that \`phoenix_net::apply_firewall\` then waited for itself, so that firewall rebuild counted as failed and was retried (a new namespace waiting for it fails its start, which is retried after backoff).")
for m in m1 m2 m3; do
    drops=$(grep -c "minion link dropped.*node=$m\$" "$work/master.log" || true)
    [ "$drops" = 0 ] || notes+=("The master dropped $m's link $drops time(s) during the run ($(grep "minion link dropped.*node=$m\$" "$work/master.log" | head -1 | sed 's/^.*dropped: //; s/ node=.*//')); $m reconnected by itself.")
done
git_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "?")
[ -z "$(git -C "$root" status --porcelain -- crates bench/servicenet.sh bench/servicenet.py bench/lib.sh bench/benchlib.py 2>/dev/null)" ] || git_rev="$git_rev + uncommitted changes"
ARGS=$args SECS=$secs ROUNDS=$rounds DEPLOYS=$deploys SERVICES=$services TOOK=$(($(date +%s) - started)) \
GIT="$git_rev" IMAGE="$image_desc" VERSION="$("$phoenix" --version)" WG="$wireguard" \
IPERF="$(iperf3 --version | head -1 | awk '{print $2}')" NFT="$(nft --version | awk '{print $2}')" \
NETNS_BENCH="$netns_bench" NOTES="$(printf '%s\n' "${notes[@]+"${notes[@]}"}")" \
python3 -c '
import json, os
e = os.environ
print(json.dumps({"args": e["ARGS"], "secs": int(e["SECS"]), "rounds": int(e["ROUNDS"]), "deploys": int(e["DEPLOYS"]),
    "services": int(e["SERVICES"]), "took": int(e["TOOK"]), "git": e["GIT"], "image": e["IMAGE"], "version": e["VERSION"],
    "wireguard": e["WG"], "iperf": e["IPERF"], "nft": e["NFT"], "netns_bench": e["NETNS_BENCH"],
    "notes": [l for l in e["NOTES"].splitlines() if l.strip()]}))' >"$work/meta.json"
python3 "$py" report "$work" >"$work/report.md"
emit_report servicenet "$work/report.md"
