#!/usr/bin/env bash
# Configuration-as-files benchmark (issue 15): `phoenix apply` of a folder of
# SERVICES spec files (one service each, JSON, `sleep infinity` as a binary),
# half on minion m1 and half on m2, and `phoenix diff` of the same folder
# once it is applied. Real daemons on three hosts (network namespaces on one
# bridge: master, m1, m2), the WireGuard overlay on, default ports. The
# minions run with `--service-network host`: a namespace per service would
# measure namespace set-up (bench/servicenet.sh has that figure), not
# apply. Each of RUNS runs starts a fresh cluster and measures
#   stored     `phoenix apply DIR --detach`: the CLI reads the files, the
#              master parses and plans them and writes them in one
#              transaction (wall time of the command)
#   running    from the start of that apply until `phoenix services` shows
#              every service running
#   rss        the master's RSS (VmRSS) once all run, and before the apply
#   diff       `phoenix diff DIR` of the unchanged folder (DIFFS times)
#   noop       `phoenix apply DIR` of the unchanged folder again (DIFFS times;
#              it stores nothing and restarts nothing)
#   prune      `phoenix apply --prune` of a folder of one of the files: the
#              others deleted, waited for until their machines stopped them
# and the report gives the median over the runs (diff and noop: the median
# of each run's median) with the range. Prints a markdown section; --write
# also puts it into BENCHMARKS.md (between <!-- apply:begin --> and
# <!-- apply:end -->).
#
# Needs root, python3, iproute2, /dev/net/tun and a release build
# (cargo build --release -p phoenix); PHOENIX_BINS takes phoenix from
# another folder (PHOENIX_BINS_REV names its commit for the report).
# Usage: bench/apply.sh [--write] [SERVICES] [RUNS] [DIFFS]
#   defaults: 1000 services, 3 runs, 5 diffs (and no-op applies) a run
set -euo pipefail
write=no
if [ "${1:-}" = "--write" ]; then write=yes; shift; fi
services=${1:-1000}
runs=${2:-3}
diffs=${3:-5}
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
command_line=$(bench_command bench/apply.sh "$@")

need_root "network namespaces, TUN devices"
need_tools "python3 iproute2" python3 ip
[ -e /dev/net/tun ] || die "needs /dev/net/tun"
[ "$services" -ge 2 ] || die "SERVICES must be at least 2"
bins=${PHOENIX_BINS:-$root/target/release}
need_bins "$bins" "cargo build --release -p phoenix" phoenix
sleep_bin=$(command -v sleep)

make_work apply
copy_bins "$bins" phoenix
phoenix=$work/bin/phoenix
export PHOENIX_DATA_DIR=$work/master
loads=() # the 1-minute load average at each run's start

# ------------------------------------------------------------------ clean-up
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP
    keep_results "$rc" "$work"/*.json "$work"/run-*/*.log
    stop_cluster "$work"/run-*/m*/run/*.json
    sleep 0.5
    remove_cgroups
    remove_hosts_and_work
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ------------------------------------------------------------------ hosts
cluster_hosts ap$$ 10.98.0 master m1 m2

now() { date +%s.%N; }
ms_since() { python3 -c "import sys,time; print(round((time.time() - float(sys.argv[1])) * 1000))" "$1"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# ------------------------------------------------------------------ the tree
# One file per service, as a tree kept in git would have it.
tree=$work/tree
one=$work/one
mkdir -p "$tree" "$one"
python3 - "$tree" "$services" <<'EOF'
import json, os, sys
tree, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    spec = {"machine": "m1" if i % 2 == 0 else "m2", "name": f"svc-{i:04d}", "image": "sleep",
            "type": "binary", "args": ["infinity"], "env": [f"INDEX={i}"]}
    with open(os.path.join(tree, f"svc-{i:04d}.json"), "w") as f:
        json.dump(spec, f, indent=2)
EOF
cp "$tree/svc-0000.json" "$one/"
tree_bytes=$(du -sb "$tree" | cut -f1)

# ------------------------------------------------------------------ runs
results="[]"
record() { # RUN KEY VALUE
    results=$(R="$results" python3 -c 'import json,os,sys; r=json.loads(os.environ["R"]); r.append({"run": int(sys.argv[1]), "key": sys.argv[2], "value": float(sys.argv[3])}); print(json.dumps(r))' "$@")
}
for run in $(seq "$runs"); do
    dir=$work/run-$run
    mkdir -p "$dir"
    export PHOENIX_DATA_DIR=$dir/master
    loads+=("$(cut -d' ' -f1 /proc/loadavg)")
    say "run $run of $runs: a fresh master and minions m1, m2 (load average ${loads[-1]})"
    start_master "$dir" --no-proxy
    for m in m1 m2; do start_minion "$dir" "$m" --service-network host; done
    join_minions m1 m2
    "$phoenix" push "$sleep_bin" sleep >/dev/null
    waitfor_cli 60 "both minions to hold sleep" \
        "len(d) >= 1 and all(len(i['nodes']) >= 2 and all(n['state'] == 'synced' for n in i['nodes']) for i in d)" images --json
    rss_before=$(rss_kib "${daemon[master]}")

    say "  apply of $services files (--detach), then until all run"
    t0=$(now)
    "$phoenix" apply "$tree" --detach >"$dir/apply.out" 2>&1 || die "apply: $(tail -5 "$dir/apply.out")"
    stored=$(ms_since "$t0")
    grep -q "^+ svc-0000 (m1)" "$dir/apply.out" || die "apply did not create svc-0000: $(head -5 "$dir/apply.out")"
    waitfor_cli 600 "all $services services to run" \
        "len(d) == $services and all(s['state'] == 'running' for s in d)" services --json
    running=$(ms_since "$t0")
    sleep 2 # the master settles (status bursts) before its RSS is read
    rss_after=$(rss_kib "${daemon[master]}")
    say "  stored in $stored ms, all running after $running ms; master RSS $rss_before -> $rss_after KiB"
    record "$run" stored "$stored"
    record "$run" running "$running"
    record "$run" rss_before "$rss_before"
    record "$run" rss_after "$rss_after"
    # One pid of a service, to find our minions' cgroups at the end.
    remember_cgroup svc-0000

    for i in $(seq "$diffs"); do
        t0=$(now)
        "$phoenix" diff "$tree" >"$dir/diff.out" 2>&1 || die "diff: $(tail -5 "$dir/diff.out")"
        record "$run" diff "$(ms_since "$t0")"
        grep -q "^= $services unchanged" "$dir/diff.out" || die "diff of the unchanged tree: $(head -5 "$dir/diff.out")"
        t0=$(now)
        "$phoenix" apply "$tree" >"$dir/noop.out" 2>&1 || die "apply again: $(tail -5 "$dir/noop.out")"
        record "$run" noop "$(ms_since "$t0")"
        grep -q "nothing to change" "$dir/noop.out" || die "apply of the unchanged tree changed something: $(head -5 "$dir/noop.out")"
    done
    gens=$("$phoenix" services --json | jq1 'max(s["generation"] for s in d)')
    [ "$gens" = 1 ] || die "a service was restarted by the no-op applies (generation $gens)"
    say "  diff and no-op apply, $diffs each: done"

    say "  apply --prune of one file: $((services - 1)) deleted"
    t0=$(now)
    "$phoenix" apply "$one" --source "$(readlink -f "$tree")" --prune --timeout-s 600 >"$dir/prune.out" 2>&1 \
        || die "prune: $(tail -5 "$dir/prune.out")"
    record "$run" prune "$(ms_since "$t0")"
    left=$("$phoenix" services --json | jq1 'len(d)')
    [ "$left" = 1 ] || die "after the prune, $left services are left"
    stop_cluster "$dir"/m*/run/*.json
done

# ------------------------------------------------------------------ report
git_rev=$(bins_git_rev binary crates)
R="$results" CMD="$command_line" N=$services RUNS=$runs DIFFS=$diffs GIT="$git_rev" TOOK=$(($(date +%s) - started)) \
VERSION="$("$phoenix" --version)" LOADS="${loads[*]}" BYTES=$tree_bytes NPROC=$(nproc) \
python3 - >"$work/report.md" <<'EOF'
import json, os, statistics as st
e = os.environ
r = json.loads(e["R"])
runs = int(e["RUNS"])
def per_run(key, agg=st.median):
    return [agg([x["value"] for x in r if x["run"] == i and x["key"] == key]) for i in range(1, runs + 1)]
def fig(key, unit="ms", scale=1.0):
    v = [x / scale for x in per_run(key)]
    m = st.median(v)
    fmt = (lambda x: f"{x:,.0f}") if unit == "ms" else (lambda x: f"{x:,.1f}")
    return f"{fmt(m)} {unit}", f"{fmt(min(v))} to {fmt(max(v))}"
n = int(e["N"])
rows = [
    (f"`apply DIR --detach` of {n} new services (stored: read, parsed, planned, one transaction)", *fig("stored")),
    (f"from that apply until all {n} run (`phoenix services`)", *fig("running")),
    ("master RSS before the apply (2 minions, one image)", *fig("rss_before", "MiB", 1024)),
    (f"master RSS once the {n} run", *fig("rss_after", "MiB", 1024)),
    (f"`diff DIR` of the unchanged {n} (median of {e['DIFFS']} a run)", *fig("diff")),
    (f"`apply DIR` of the unchanged {n}: nothing stored, nothing restarted (median of {e['DIFFS']} a run)", *fig("noop")),
    (f"`apply --prune` of one of the files: {n - 1} deleted and stopped", *fig("prune")),
]
print(f"Measured by `{e['CMD']}` at {e['GIT']} ({e['VERSION']}): {n} spec files "
      f"({int(e['BYTES']) // 1024} KiB on disk, one service each, `sleep infinity` as a binary, half on each of "
      f"2 minions with `--service-network host`), {runs} runs on a fresh cluster each, the median of the runs "
      f"(and their range). {e['NPROC']} cores; 1-minute load average at each run's start: {e['LOADS']} "
      f"(other work shared the machine). The whole run took {e['TOOK']} s.")
print()
print("| what | median | range over the runs |")
print("|---|---:|---:|")
for what, m, rng in rows:
    print(f"| {what} | {m} | {rng} |")
EOF
emit_report apply "$work/report.md"
