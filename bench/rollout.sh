#!/usr/bin/env bash
# Zero-downtime updates benchmark, in one run, on four hosts (network
# namespaces on one bridge): a master whose proxy serves plain HTTP on port
# 80 (--acme-directory points at a closed port: no certificate, plain HTTP),
# minions m1 and m2 with a network namespace per service (the default), and
# a client. One service `web` (testy, `"proxyname": "bench.example"`,
# `"healthcheck": "/health"`) on m1. wrk loads it through the master's proxy
# while a loop runs `phoenix update` of it with a new env var every INTERVAL
# seconds (each update starts the new version beside the old, switches the
# proxy to it once healthy, drains the old one, stops it and moves the
# stable address). Runs of SECONDS each:
#   base        wrk alone, no updates (the latency baseline)
#   upd         wrk + updates
#   base-slow   wrk + a second wrk on /sleep?ms=100 (8 slow requests always
#               in flight), no updates
#   upd-slow    the same + updates
#   two-slow    a second instance `web-b` on m2 under the same proxyname,
#               slow requests, updates of web and web-b in turn
# Failures are wrk's "Non-2xx or 3xx responses" and "Socket errors"; every
# update must exit 0. Prints a markdown section; --write also puts it into
# BENCHMARKS.md (between <!-- rollout:begin --> and <!-- rollout:end -->).
#
# Needs root, wrk, nft (nftables), python3, iproute2 and a release build
# (cargo build --release --workspace).
# KEEP_LOGS=1 keeps the daemons' logs and the results (kept anyway on failure).
# Usage: bench/rollout.sh [--write] [SECONDS] [INTERVAL]
#   defaults: 50 s of load a run (~2,500 requests/s on a 2-CPU VM: over
#   100,000 requests in each run with updates), an update every 3 s
set -euo pipefail
write=no
if [ "${1:-}" = "--write" ]; then write=yes; shift; fi
secs=${1:-50}
interval=${2:-3}
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
command_line=$(bench_command bench/rollout.sh "$@")
drain_ms=30000

need_root "network namespaces, TUN devices, nftables"
need_tools "wrk nftables python3 iproute2" wrk nft python3 ip
[ -e /dev/net/tun ] || die "needs /dev/net/tun"
# PHOENIX_BINS: take phoenix and testy from another build (e.g. of a clean
# `git archive` export while the workspace does not build); PHOENIX_BINS_REV
# names its commit and PHOENIX_BINS_NOTE says how it was built (both go
# into the report).
bins=${PHOENIX_BINS:-$root/target/release}
need_bins "$bins" "cargo build --release --workspace" phoenix testy

make_work rollout
copy_bins "$bins" phoenix testy
cp "$root/bench/rollout.py" "$root/bench/benchlib.py" "$work/bin/"
py=$work/bin/rollout.py
phoenix=$work/bin/phoenix
export PHOENIX_DATA_DIR=$work/master

# ------------------------------------------------------------------ clean-up
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP
    # A failed run keeps the daemons' logs and the results (the work dir goes).
    keep_results "$rc" "$work"/*.log "$work"/*.json "$work"/*.txt
    kill_child
    # Delete what is left while the minions run, so that they remove the
    # namespaces and cgroups themselves.
    if [ -S "$work/master/phoenix.sock" ]; then
        for s in web-b web; do timeout 40 "$phoenix" del "$s" --timeout-s 15 >/dev/null 2>&1; done
    fi
    stop_cluster "$work"/m*/run/*.json
    sleep 0.5
    remove_cgroups
    remove_hosts_and_work
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ------------------------------------------------------------------ cluster
cluster_hosts ro$$ 10.96.0 master m1 m2 client
on_client=(ip netns exec "$(ns_of client)")
say "starting a master and minions m1, m2 (netns) in $work"
start_master "$work" --acme-directory https://127.0.0.1:1/directory --drain-timeout-ms "$drain_ms"
start_minion "$work" m1
start_minion "$work" m2
join_minions m1 m2
"$phoenix" push "$work/bin/testy" testy >/dev/null
waitfor_cli 60 "both minions to hold testy" \
    "len(d) >= 1 and all(len(i['nodes']) >= 2 and all(n['state'] == 'synced' for n in i['nodes']) for i in d)" images --json

spec() { # MACHINE NAME VERSION
    printf '{"machine": "%s", "name": "%s", "image": "testy", "type": "binary", "proxyport": 8000, "healthcheck": "/health", "proxyname": "bench.example", "env": ["VERSION=%s"]}' "$1" "$2" "$3"
}
deploy() { # SPEC
    echo "[$1]" >"$work/deploy.json"
    "$phoenix" deploy "$work/deploy.json" --timeout-s 60 >"$work/deploy.out" 2>&1 || die "phoenix deploy $1: $(cat "$work/deploy.out")"
}
say "deploying web (testy) on m1 under proxyname bench.example"
deploy "$(spec m1 web 0)"
remember_cgroup web
get() { # PATH: "STATUS BODY" of a request through the proxy, from the client
    "${on_client[@]}" python3 -c '
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
c.request("GET", sys.argv[2], headers={"Host": "bench.example"})
r = c.getresponse()
print(r.status, r.read().decode().strip().replace("\n", " "))' "$(ip_of master)" "$1"
}
proxy_ok() { get / | grep -q '^200 '; }
waitfor 20 "the proxy to serve bench.example" proxy_ok
say "  the proxy answers: $(get /)"

wrk_main=(wrk -t2 -c32 -d"${secs}s" --latency -H 'Host: bench.example' "http://$(ip_of master)/")
wrk_slow=(wrk -t1 -c8 -d"${secs}s" --latency -H 'Host: bench.example' "http://$(ip_of master)/sleep?ms=100")
say "warm-up: wrk for 3 s"
"${on_client[@]}" wrk -t2 -c32 -d3s -H 'Host: bench.example' "http://$(ip_of master)/" >"$work/warmup.txt" 2>&1

# ------------------------------------------------------------------ runs
runs_json="[]"
run() { # ID LABEL INSTANCES SLOW(yes/no) UPDATE-SPECS...
    local id=$1 label=$2 instances=$3 slow=$4 upd=no pids=() ups=() s
    shift 4
    [ $# -gt 0 ] && upd=yes
    say "run $id: $label, ${secs} s$([ $upd = yes ] && echo ", updating $(for s in "$@"; do echo "$s" | jq1 'd["name"]'; done | paste -sd/ -) every ${interval} s")"
    local before
    before=$(grep -c 'update switched' "$work/master.log" || true)
    "${on_client[@]}" "${wrk_main[@]}" >"$work/wrk-$id.txt" 2>&1 &
    pids+=($!)
    if [ "$slow" = yes ]; then
        "${on_client[@]}" "${wrk_slow[@]}" >"$work/wrk-$id-slow.txt" 2>&1 &
        pids+=($!)
    fi
    if [ $upd = yes ]; then
        for s in "$@"; do ups+=(--spec "$s"); done
        # The last update starts 8 s before the load ends, so that its
        # drain, stop and address move happen under load too.
        python3 "$py" updates --phoenix "$phoenix" --work "$work" --tag "$id" "${ups[@]}" \
            --interval "$interval" --first 2 --last $((secs - 8)) >"$work/updates-$id.json" 2>"$work/updates-$id.log" &
        pids+=($!)
    fi
    for p in "${pids[@]}"; do child=$p; wait "$p" || die "run $id: a load or update process failed ($(tail -3 "$work/updates-$id.log" 2>/dev/null))"; done
    child=
    python3 "$py" wrk "$work/wrk-$id.txt" >"$work/wrk-$id.json"
    [ "$slow" = yes ] && python3 "$py" wrk "$work/wrk-$id-slow.txt" >"$work/wrk-$id-slow.json"
    local res
    res=$(jq1 '"%d requests, %d non-2xx, %d socket errors, %.0f/s, p50 %.2f ms, p99 %.2f ms" % (d["requests"], d["non2xx"], d["socket"], d["rps"], d["p50"], d["p99"])' <"$work/wrk-$id.json")
    [ "$slow" = yes ] && res+="; slow: $(jq1 '"%d requests, %d failed, p99 %.1f ms" % (d["requests"], d["failed"], d["p99"])' <"$work/wrk-$id-slow.json")"
    if [ $upd = yes ]; then
        res+="; updates: $(jq1 '"%d done, %d failed" % (sum(u["rc"] == 0 for u in d["updates"]), sum(u["rc"] != 0 for u in d["updates"]))' <"$work/updates-$id.json")"
        res+="; the master logged $(($(grep -c 'update switched' "$work/master.log" || true) - before)) switches"
    fi
    say "  $res"
    runs_json=$(RUNS="$runs_json" python3 -c 'import json,os,sys; r=json.loads(os.environ["RUNS"]); r.append({"id": sys.argv[1], "label": sys.argv[2], "instances": sys.argv[3], "slow": sys.argv[4] == "yes", "updates": sys.argv[5] == "yes"}); print(json.dumps(r))' "$id" "$label" "$instances" "$slow" "$upd")
}
run base "baseline, no updates" "web (m1)" no
run upd "updates" "web (m1)" no "$(spec m1 web 0)"
run base-slow "baseline, no updates, slow requests" "web (m1)" yes
run upd-slow "updates, slow requests" "web (m1)" yes "$(spec m1 web 0)"
say "deploying web-b on m2 under the same proxyname"
deploy "$(spec m2 web-b 0)"
remember_cgroup web-b
waitfor_cli 20 "two instances in the rotation" \
    "sum(i.get('up') is True for r in d['routes'] for i in r['instances']) == 2" routes --json
run two-slow "two instances, updates in turn, slow requests" "web (m1), web-b (m2)" yes "$(spec m1 web 0)" "$(spec m2 web-b 0)"

# ------------------------------------------------------------------ report
"$phoenix" routes --json >"$work/routes-end.json"
"$phoenix" services --json >"$work/services-end.json"
left=$(jq1 '" ".join(s["name"] for s in d)' <"$work/services-end.json")
[ "$left" = "web web-b" ] || [ "$left" = "web-b web" ] || notes+=("After the runs, \`phoenix services\` lists: $left (expected web and web-b only).")
# The ACME warnings are expected: --acme-directory points at a closed port.
acme=$(grep -c 'WARN phoenix_acme' "$work/master.log" || true)
[ "$acme" = 0 ] || notes+=("The master logged $acme expected \`certificate order failed\` warnings (the ACME directory is a closed port, on purpose).")
note_log_problems 220 'WARN phoenix_acme' "$work"/m?.log "$work/master.log"
for m in m1 m2; do
    drops=$(grep -c "minion link dropped.*node=$m\$" "$work/master.log" || true)
    [ "$drops" = 0 ] || notes+=("The master dropped $m's link $drops time(s) during the run.")
done
sw_n=$(grep -c 'update switched' "$work/master.log" || true)
sw_ms=$(sed -n 's/.*update switched.* took_ms=\([0-9]*\).*/\1/p' "$work/master.log" | sort -n | awk '{a[NR]=$1} END {if (NR) printf "%d ms (p50), %d ms (max)", a[int((NR+1)/2)], a[NR]}')
notes+=("The master logged $sw_n \`update switched\` lines in all (one per update), from the update stored through the new version up, the switch, the drain and the promotion: ${sw_ms:-none}.")
git_rev=$(bins_git_rev binaries crates testy)
CMD="$command_line" SECS=$secs INTERVAL=$interval TOOK=$(($(date +%s) - started)) GIT="$git_rev" DRAIN=$drain_ms \
VERSION="$("$phoenix" --version)" WRK="$( (wrk --version 2>&1 || true) | head -1 | awk '{print $2}')" RUNS="$runs_json" \
WRK_MAIN="wrk -t2 -c32 -d${secs}s --latency -H 'Host: bench.example' http://MASTER/" \
WRK_SLOW="wrk -t1 -c8 -d${secs}s --latency -H 'Host: bench.example' http://MASTER/sleep?ms=100" \
NOTES="$(printf '%s\n' "${notes[@]+"${notes[@]}"}")" \
python3 -c '
import json, os
e = os.environ
print(json.dumps({"command": e["CMD"], "secs": int(e["SECS"]), "interval": e["INTERVAL"], "took": int(e["TOOK"]),
    "git": e["GIT"], "drain": e["DRAIN"], "version": e["VERSION"], "wrk": e["WRK"], "runs": json.loads(e["RUNS"]),
    "wrk_main": e["WRK_MAIN"], "wrk_slow": e["WRK_SLOW"],
    "notes": [l for l in e["NOTES"].splitlines() if l.strip()]}))' >"$work/meta.json"
python3 "$py" report "$work" >"$work/report.md"
emit_report rollout "$work/report.md"
