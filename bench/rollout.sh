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
command_line="bench/rollout.sh"
[ -n "${PHOENIX_BINS:-}" ] && command_line="PHOENIX_BINS=$PHOENIX_BINS $command_line"
[ "$write" = yes ] && command_line+=" --write"
[ $# -gt 0 ] && command_line+=" $*"
root=$(cd "$(dirname "$0")/.." && pwd)
started=$(date +%s)
drain_ms=30000

die() { echo "rollout.sh: $*" >&2; exit 1; }
say() { echo "rollout.sh [$(($(date +%s) - started)) s]: $*" >&2; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces, TUN devices, nftables)"
for t in wrk nft python3 ip; do
    command -v $t >/dev/null || die "missing $t (apt-get install wrk nftables python3 iproute2)"
done
[ -e /dev/net/tun ] || die "needs /dev/net/tun"
# PHOENIX_BINS: take phoenix and testy from another build (e.g. of a clean
# `git archive` export while the workspace does not build); PHOENIX_BINS_REV
# names its commit and PHOENIX_BINS_NOTE says how it was built (both go
# into the report).
bins=${PHOENIX_BINS:-$root/target/release}
for b in phoenix testy; do
    [ -x "$bins/$b" ] || die "no $bins/$b: cargo build --release --workspace"
done

tag=ro$$
work=$(mktemp -d /tmp/phoenix-rollout-bench.XXXXXX)
chmod 755 "$work"
# Our own copies: a rebuild in the workspace during the run changes nothing.
mkdir -p "$work/bin"
for b in phoenix testy; do cp "$bins/$b" "$work/bin/"; done
cp "$root/bench/rollout.py" "$work/bin/rollout.py"
py=$work/bin/rollout.py
phoenix=$work/bin/phoenix
export PHOENIX_DATA_DIR=$work/master
sw=$tag-sw
hosts=("$tag-master" "$tag-m1" "$tag-m2" "$tag-client")
declare -A daemon # name -> pid
cgroup_ids=()     # the @SUFFIX of our minions' service cgroups
notes=()

# ------------------------------------------------------------------ clean-up
# Long steps run in the background and are waited for, so that a signal is
# handled at once (bash runs traps only between commands).
child=
in_bg() { "$@" & child=$!; wait "$child"; child=; }
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP
    # A failed run keeps the daemons' logs and the results (the work dir goes).
    if [ "$rc" != 0 ] || [ -n "${KEEP_LOGS:-}" ]; then
        local keep
        keep=$(mktemp -d /tmp/phoenix-rollout-logs.XXXXXX)
        cp "$work"/*.log "$work"/*.json "$work"/*.txt "$keep/" 2>/dev/null
        echo "rollout.sh: exit $rc; the daemons' logs and the results are in $keep" >&2
    fi
    if [ -n "$child" ]; then kill "$child" 2>/dev/null; wait "$child" 2>/dev/null; fi
    # Delete what is left while the minions run, so that they remove the
    # namespaces and cgroups themselves.
    if [ -S "$work/master/phoenix.sock" ]; then
        for s in web-b web; do timeout 40 "$phoenix" del "$s" --timeout-s 15 >/dev/null 2>&1; done
    fi
    for p in "${daemon[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${daemon[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
    done
    # Services outlive their minion by design: end every one still recorded.
    for rec in "$work"/m*/run/*.json; do
        [ -e "$rec" ] || continue
        case $rec in *.done.json) continue ;; esac
        pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("pid") or "")' "$rec" 2>/dev/null)
        [ -n "$pid" ] && [ "$pid" -gt 1 ] && { kill -9 -- "-$pid" 2>/dev/null; kill -9 "$pid" 2>/dev/null; }
    done
    for h in "${hosts[@]}"; do ip netns pids "$h" 2>/dev/null | xargs -r kill -9 2>/dev/null; done
    sleep 0.5
    # Cgroups our minions left (named NAME@<minion id>: only ours), deepest first.
    for id in "${cgroup_ids[@]}"; do
        find /sys/fs/cgroup -mindepth 2 -maxdepth 4 -type d -path "*/phoenix/*@$id" 2>/dev/null | sort -r | xargs -r rmdir 2>/dev/null
    done
    # nftables tables live in the hosts' namespaces and go with them.
    for h in "${hosts[@]}" "$sw"; do ip netns del "$h" 2>/dev/null; done
    awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ------------------------------------------------------------------ hosts
# shellcheck source=bench/netns.sh
. "$root/bench/netns.sh"
bridge_hosts "$sw" 10.96.0 "${hosts[@]}"
ip_of() { case $1 in master) echo 10.96.0.1 ;; m1) echo 10.96.0.2 ;; m2) echo 10.96.0.3 ;; client) echo 10.96.0.4 ;; esac; }
ns_of() { echo "$tag-$1"; }
on_client=(ip netns exec "$(ns_of client)")

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

# ------------------------------------------------------------------ cluster
say "starting a master and minions m1, m2 (netns) in $work"
ip netns exec "$(ns_of master)" "$phoenix" master "$(ip_of master)" --foreground --data-dir "$work/master" \
    --acme-directory https://127.0.0.1:1/directory --drain-timeout-ms "$drain_ms" >"$work/master.log" 2>&1 &
daemon[master]=$!
waitfor 15 "the master's socket" test -S "$work/master/phoenix.sock"
key=$("$phoenix" master-info --json | jq1 'd["key"]')
start_minion() { # NAME
    local name=$1 ip
    ip=$(ip_of "$name")
    ip netns exec "$(ns_of "$name")" "$phoenix" minion "$name" "$(ip_of master)" "$key" "$ip" "$ip" \
        --foreground --data-dir "$work/$name" --keep-free-mb 16 >"$work/$name.log" 2>&1 &
    daemon[$name]=$!
}
start_minion m1
start_minion m2
for m in m1 m2; do
    waitfor_cli 20 "$m to ask to join" "any(n['name'] == '$m' for n in d)" waiting --json
    "$phoenix" accept "$m" >/dev/null
done
for m in m1 m2; do
    waitfor_cli 20 "$m to be reachable" "any(n['name'] == '$m' and n['state'] == 'reachable' for n in d)" nodes --json
done
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
remember_cgroup() { # SERVICE: our minion's id, from the service's cgroup
    local pid cg
    pid=$("$phoenix" status "$1" --json | jq1 'd["pid"]')
    cg=$(sed -n 's/^0:://p' "/proc/$pid/cgroup")
    case $cg in */phoenix/*@*) cgroup_ids+=("${cg##*@}") ;; esac
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
problems() { cat "$work"/m?.log "$work/master.log" | { grep -E ' (WARN|ERROR) ' || true; } | { grep -v 'WARN phoenix_acme' || true; }; }
n=$(problems | wc -l)
if [ "$n" -gt 0 ]; then
    ex=$(problems | sed 's/^[^ ]* *//' | cut -c1-220 | sort | uniq -c | sort -rn | head -3 | sed 's/^ *//' | paste -sd';' -)
    notes+=("The daemons' logs hold $n WARN/ERROR lines; the most frequent (count, line): \`$ex\`")
fi
for m in m1 m2; do
    drops=$(grep -c "minion link dropped.*node=$m\$" "$work/master.log" || true)
    [ "$drops" = 0 ] || notes+=("The master dropped $m's link $drops time(s) during the run.")
done
sw_n=$(grep -c 'update switched' "$work/master.log" || true)
sw_ms=$(sed -n 's/.*update switched.* took_ms=\([0-9]*\).*/\1/p' "$work/master.log" | sort -n | awk '{a[NR]=$1} END {if (NR) printf "%d ms (p50), %d ms (max)", a[int((NR+1)/2)], a[NR]}')
notes+=("The master logged $sw_n \`update switched\` lines in all (one per update), from the update stored through the new version up, the switch, the drain and the promotion: ${sw_ms:-none}.")
git_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "?")
if [ -n "${PHOENIX_BINS:-}" ]; then
    # The workspace's HEAD says nothing about those binaries: PHOENIX_BINS_REV names their commit.
    git_rev="${PHOENIX_BINS_REV:-unknown commit}, ${PHOENIX_BINS_NOTE:-binaries from PHOENIX_BINS=$PHOENIX_BINS}"
elif [ -n "$(git -C "$root" status --porcelain -- crates testy 2>/dev/null)" ]; then
    git_rev="$git_rev + uncommitted changes in $(git -C "$root" status --porcelain -- crates testy | awk '{print $2}' | cut -d/ -f1-2 | sort -u | paste -sd, -)"
fi
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
cat "$work/report.md"
if [ "$write" = yes ]; then
    python3 "$root/bench/splice-section.py" rollout "$root/BENCHMARKS.md" <"$work/report.md"
    say "wrote the rollout section of $root/BENCHMARKS.md"
fi
