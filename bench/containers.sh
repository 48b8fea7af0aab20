#!/usr/bin/env bash
# Container benchmark, in one run:
#   1. unpack a ~90 MB OCI image (5 gzip layers, ~4100 files) with Phoenix's
#      phoenix-image crate vs `umoci unpack`, cold (a fresh destination each run);
#   2. deploy -> running of a container whose image is already unpacked: from
#      the command to the container's first UDP datagram, for Phoenix
#      (`phoenix deploy`), bare crun (`crun run --detach` of a prepared bundle
#      with the same rootfs and Phoenix's own runtime config) and podman
#      (`podman run -d --network host` of the same image; with crun, and with
#      runc when installed), interleaved round by round.
# Prints a markdown section; with --write also puts it into BENCHMARKS.md
# (between <!-- containers:begin --> and <!-- containers:end -->).
#
# Needs root, crun, podman, umoci, busybox (static), python3, unshare, and a
# release build (cargo build --release --workspace).
# Usage: bench/containers.sh [--write] [SAMPLES] [UNPACK_RUNS]   (defaults: 20, 5)
set -euo pipefail
write=no
if [ "${1:-}" = "--write" ]; then write=yes; shift; fi
samples=${1:-20}
unpack_runs=${2:-5}
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
py=$root/bench/containers.py

need_root "crun, overlayfs, podman"
need_tools "crun podman umoci busybox-static python3" crun podman umoci unshare python3 tar
busybox=$(command -v busybox) || die "missing busybox (apt-get install busybox-static)"
if command -v file >/dev/null && ! file -L "$busybox" | grep "statically linked" >/dev/null; then
    say "note: $busybox is not static; its libraries are not in the image (apt-get install busybox-static)"
fi
need_bins "$root/target/release" "cargo build --release --workspace" phoenix testy phoenix-bench-unpack

make_work containers
copy_bins "$root/target/release" phoenix testy phoenix-bench-unpack
phoenix=$work/bin/phoenix
export PHOENIX_DATA_DIR=$work/phx/master

# ------------------------------------------------------------------ cgroups
# crun 1.8 refuses "hybrid" hosts (v1 controllers, cgroup2 at
# /sys/fs/cgroup/unified with a controller in it). As Phoenix does inside,
# such a host gets crun in a private mount namespace with a fresh cgroup2
# mount on /sys/fs/cgroup and --cgroup-manager=disabled: this wrapper, used
# for bare crun and given to podman as its runtime (it must be named crun
# for podman to accept --cgroups=disabled with it).
fstype() { stat -f -c %T "$1" 2>/dev/null || echo none; }
mkdir -p "$work/rt"
podman_cg=()
if [ "$(fstype /sys/fs/cgroup)" = cgroup2fs ]; then
    cgroups="cgroup v2: crun used as is"
    crun_cmd=(crun)
elif [ "$(fstype /sys/fs/cgroup/unified)" = cgroup2fs ]; then
    cgroups="hybrid (cgroup v1 controllers, cgroup2 at /sys/fs/cgroup/unified with controllers: $(tr '\n' ' ' </sys/fs/cgroup/unified/cgroup.controllers | sed 's/ *$//')); crun 1.8 refuses such a host, so bare crun and podman's crun run through a wrapper: \`unshare -m sh -c 'mount --make-rprivate / && mount -t cgroup2 none /sys/fs/cgroup && exec crun --cgroup-manager=disabled \"\$@\"'\` (what Phoenix does in-process), podman with \`--cgroups=disabled\`"
    cat >"$work/rt/crun" <<'EOF'
#!/bin/sh
# crun in a private mount namespace whose /sys/fs/cgroup is a fresh cgroup2 mount (hybrid hosts)
exec unshare -m sh -c 'mount --make-rprivate / && mount -t cgroup2 none /sys/fs/cgroup && exec crun --cgroup-manager=disabled "$@"' crun "$@"
EOF
    chmod 755 "$work/rt/crun"
    crun_cmd=("$work/rt/crun")
    podman_cg=(--cgroups=disabled)
else
    cgroups="cgroup v1: crun used as is"
    crun_cmd=(crun)
fi
crun_rt=$(command -v "${crun_cmd[0]}")

# podman keeps everything in our temp dir. No systemd here to manage cgroups.
podman=(podman --root "$work/pm/root" --runroot "$work/pm/run" --tmpdir "$work/pm/tmp" --events-backend=none)
[ -d /run/systemd/system ] || podman+=(--cgroup-manager=cgroupfs)
mkdir -p "$work/pm/tmp"
# podman's default rlimits (nofile 1048576) exceed this host's hard limits
# where root lacks CAP_SYS_RESOURCE (a container sandbox): crun's setrlimit
# fails with EPERM. Then give the host's nofile and podman's usual nproc.
podman_ulimits=()
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt 1048576 ]; then
    podman_ulimits=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=32768:32768)
fi

# ------------------------------------------------------------------ clean-up
# The long steps run in the background (in_bg); the clean-up ends them first.
cleanup() {
    set +e
    trap - EXIT INT TERM HUP
    kill_child
    if [ -S "$work/phx/master/phoenix.sock" ]; then
        for s in $("$phoenix" services --json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(s["name"] for s in json.load(sys.stdin)))' 2>/dev/null); do
            "$phoenix" del "$s" >/dev/null 2>&1
        done
        for _ in $(seq 60); do
            [ -z "$("${crun_cmd[@]}" --root "$work/phx/m1/crun" list -q 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
    stop_cluster # only our daemons here: no hosts, and the services were deleted above
    for st in "$work/phx/m1/crun" "$work/crun/state"; do
        [ -d "$st" ] || continue
        for id in $("${crun_cmd[@]}" --root "$st" list -q 2>/dev/null); do
            "${crun_cmd[@]}" --root "$st" delete -f "$id" >/dev/null 2>&1
        done
    done
    if [ -d "$work/pm/root" ]; then
        "${podman[@]}" rm -f -t 0 -a >/dev/null 2>&1
        "${podman[@]}" rmi -f -a >/dev/null 2>&1
    fi
    # Unmount whatever is left below the work dir, deepest first.
    awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null
    done
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
trap 'say "failed at line $LINENO: $BASH_COMMAND"' ERR

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ------------------------------------------------------------------ the image
say "building the image (testy + its libraries + busybox, 4 layers of data; gzip)"
python3 "$py" mkimage "$work/app.tar" --testy "$work/bin/testy" --busybox "$busybox" >"$work/image.json"
image_desc=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["description"])' "$work/image.json")
mkdir -p "$work/layout"
tar xf "$work/app.tar" -C "$work/layout"   # umoci reads an OCI layout directory

# ------------------------------------------------------------------ unpack
# On the disk the work dir is on (where a minion's data dir would be), and
# on a tmpfs (the unpackers' own cost, without the filesystem's).
unpack_cmds=(
    --label "Phoenix (phoenix-image)" --cmd "[\"$work/bin/phoenix-bench-unpack\", \"$work/app.tar\", \"{dest}\"]"
    --label "umoci unpack" --cmd "[\"umoci\", \"unpack\", \"--image\", \"$work/layout:latest\", \"{dest}\"]"
)
say "unpack on disk: phoenix-image vs umoci, $unpack_runs runs each, interleaved"
in_bg python3 "$py" runs --n "$unpack_runs" "${unpack_cmds[@]}" --dest-root "$work/u" --out "$work/unpack.json"
if diff -r "$work/u/0" "$work/u/1/rootfs" >/dev/null 2>&1; then
    notes+=("The root filesystems unpacked by Phoenix and by umoci are identical (\`diff -r\`).")
else
    notes+=("The root filesystems unpacked by Phoenix and by umoci DIFFER (\`diff -r\`).")
fi
rm -rf --one-file-system "$work/u"
mkdir -p "$work/tmpfs"
mount -t tmpfs -o size=2g,mode=755 phoenix-bench "$work/tmpfs"
say "unpack on tmpfs: phoenix-image vs umoci, $unpack_runs runs each, interleaved"
in_bg python3 "$py" runs --n "$unpack_runs" "${unpack_cmds[@]}" --dest-root "$work/tmpfs/u" --out "$work/unpack-tmpfs.json"
umount "$work/tmpfs"
disk_fs=$(awk -v d="$(df --output=target "$work" | tail -1)" '$2 == d {print $3 " (" $4 ")"; exit}' /proc/mounts)

# ------------------------------------------------------------------ Phoenix
say "starting a Phoenix master and minion m1 (--no-overlay, loopback)"
join=$(free_port); link=$(free_port)
mkdir -p "$work/phx"
"$phoenix" master 127.0.0.1 --foreground --data-dir "$work/phx/master" --join-port "$join" --link-port "$link" --no-overlay >"$work/phx/master.log" 2>&1 &
daemon[master]=$!
waitfor 10 "the master" "$phoenix" master-info --json
key=$("$phoenix" master-info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
# A short stop timeout: testy, as a container's PID 1, has no SIGTERM handler,
# so SIGTERM does nothing and every stop waits for the SIGKILL. Only the
# clean-up between samples waits on it. `--service-network host`: the
# containers share the host's network as the bare crun and podman runs do
# (the datagram goes to 127.0.0.1); a namespace a service costs is
# measured by bench/servicenet.sh.
"$phoenix" minion m1 127.0.0.1 "$key" 127.0.0.1 127.0.0.1 --foreground --data-dir "$work/phx/m1" \
    --master-join-port "$join" --master-link-port "$link" --no-overlay --stop-timeout-ms 1000 \
    --service-network host >"$work/phx/m1.log" 2>&1 &
daemon[m1]=$!
waitfor 10 "m1's join request" sh -c "\"$phoenix\" waiting --json | grep '\"m1\"' >/dev/null"
"$phoenix" accept m1 >/dev/null
waitfor 10 "m1 to connect" sh -c "\"$phoenix\" nodes --json | grep '\"reachable\"' >/dev/null"
"$phoenix" push "$work/app.tar" app.tar >/dev/null

ann=$(free_port)
mkdir -p "$work/specs"
spec() { # name proxyport
    printf '{"machine":"m1","name":"%s","image":"app","type":"docker","proxyport":%s,"args":["--announce","127.0.0.1:%s"]}\n' "$1" "$2" "$ann" >"$work/specs/$1.json"
}
# Removes a Phoenix service and waits until its container is gone: the
# process reaped, the rootfs unmounted, the service no longer listed.
cat >"$work/phoenix-gone.sh" <<EOF
#!/bin/sh
pid=\$("$phoenix" status "\$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin).get("pid") or "")')
"$phoenix" del "\$1" >/dev/null || exit 1
for _ in \$(seq 300); do
    if { [ -z "\$pid" ] || [ ! -e /proc/\$pid ]; } && ! grep -q " $work/phx/m1/work/\$1/bundle/rootfs " /proc/mounts \\
        && ! "$phoenix" services --json | grep "\"name\": *\"\$1\"" >/dev/null; then exit 0; fi
    sleep 0.05
done
echo "\$1: still there 15 s after phoenix del" >&2
exit 1
EOF
chmod 755 "$work/phoenix-gone.sh"

say "Phoenix: first deploy (fetches the image from the master and unpacks it)"
spec warm0 30000
cat >"$work/plan-cold.json" <<EOF
[{"label": "Phoenix (cold)", "prefix": "warm", "port_base": 30000,
  "cmd": ["$phoenix", "deploy", "$work/specs/warm{i}.json"]}]
EOF
in_bg python3 "$py" starts --plan "$work/plan-cold.json" --n 1 --warmup 0 --port "$ann" --log "$work/starts.log" --out "$work/cold.json"

# ------------------------------------------------------------------ bare crun
# The bundle: Phoenix's unpacked rootfs (copied: crun would add mount points
# to it) and the runtime config Phoenix wrote for warm0, with the rootfs
# path, announce address, name and $PORT changed.
lower=$(ls -d "$work"/phx/m1/images/rootfs/*/rootfs | head -1)
[ -d "$lower" ] || die "no unpacked rootfs in m1's image cache"
mkdir -p "$work/crun/state"
cp -a "$lower" "$work/crun/rootfs"
for i in $(seq 0 "$samples"); do
    python3 "$py" crun-config "$work/phx/m1/work/warm0/bundle/config.json" "$work/crun/b/k$i/config.json" \
        --rootfs "$work/crun/rootfs" --announce "127.0.0.1:$ann" --name "k$i" --port $((31000 + i))
    spec "p$i" $((32000 + i))
done
"$work/phoenix-gone.sh" warm0

# ------------------------------------------------------------------ podman
say "podman: loading the image"
t0=$(date +%s%N)
"${podman[@]}" load -i "$work/app.tar" >"$work/podman-load.log" 2>&1 || { cat "$work/podman-load.log" >&2; die "podman load failed"; }
load_ms=$((($(date +%s%N) - t0) / 1000000))
"${podman[@]}" tag "$("${podman[@]}" images -q | head -1)" localhost/app:latest
notes+=("\`podman load -i\` of the image took $load_ms ms (untimed in the figures above).")

# ------------------------------------------------------------------ starts
# The plan: per series, the timed command and the untimed clean-up after it
# ({i}: the sample, {port}: its $PORT). The series run interleaved.
jarr() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$@"; }
WORK=$work ANN=$ann PHOENIX=$phoenix CRUN="$(jarr "${crun_cmd[@]}")" CRUN_RT=$crun_rt \
PODMAN="$(jarr "${podman[@]}")" PODMAN_CG="$(jarr "${podman_cg[@]}")" PODMAN_ULIMITS="$(jarr "${podman_ulimits[@]}")" \
RUNC=$(command -v runc || true) python3 - >"$work/plan.json" <<'EOF'
import json, os
e = os.environ
w, ann = e["WORK"], e["ANN"]
crun, podman = json.loads(e["CRUN"]), json.loads(e["PODMAN"])
cg, ulimits = json.loads(e["PODMAN_CG"]), json.loads(e["PODMAN_ULIMITS"])

def podman_series(label, prefix, port_base, runtime, extra):
    run = podman + ["--runtime", runtime, "run", "-d", "--name", prefix + "{i}", "--network", "host"]
    run += extra + ulimits + ["-e", "PORT={port}", "localhost/app:latest", "--announce", f"127.0.0.1:{ann}"]
    rm = podman + ["--runtime", runtime, "rm", "-f", "-t", "0", prefix + "{i}"]
    return {"label": label, "prefix": prefix, "port_base": port_base, "cmd": run, "after": rm}

plan = [
    {"label": "bare crun", "prefix": "k", "port_base": 31000,
     "cmd": crun + ["--root", f"{w}/crun/state", "run", "--detach", "--bundle", w + "/crun/b/k{i}", "k{i}"],
     "after": crun + ["--root", f"{w}/crun/state", "delete", "-f", "k{i}"]},
    {"label": "Phoenix", "prefix": "p", "port_base": 32000,
     "cmd": [e["PHOENIX"], "deploy", w + "/specs/p{i}.json"],
     "after": [f"{w}/phoenix-gone.sh", "p{i}"]},
    podman_series("podman (crun)", "d", 33000, e["CRUN_RT"], cg),
]
if e.get("RUNC"):
    plan.append(podman_series("podman (runc)", "r", 34000, e["RUNC"], []))
print(json.dumps(plan, indent=1))
EOF
say "deploy -> first datagram: $samples samples each (+1 warm-up), interleaved"
in_bg python3 "$py" starts --plan "$work/plan.json" --n "$samples" --warmup 1 --port "$ann" --log "$work/starts.log" --out "$work/starts.json"

# What the hybrid-cgroups wrapper alone costs bare crun (Phoenix does the
# same unshare and mounts in-process, before exec'ing crun).
if [ "${crun_cmd[0]}" != crun ]; then
    wrap=$(python3 "$py" repeat --n 20 -- unshare -m sh -c 'mount --make-rprivate / && mount -t cgroup2 none /sys/fs/cgroup && exec true')
    wrap_ms=$(python3 -c 'import json,sys; print("%.1f" % json.loads(sys.argv[1])["p50"])' "$wrap")
    notes+=("The hybrid-cgroups wrapper alone (\`unshare -m sh -c 'mount --make-rprivate / && mount -t cgroup2 none /sys/fs/cgroup && exec true'\`) takes $wrap_ms ms (p50 of 20): part of every bare crun sample and of every crun call podman makes; Phoenix makes the same system calls in the forked child before exec'ing crun, without the extra programs.")
fi

# ------------------------------------------------------------------ checks
left=$("$phoenix" services --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$left" = 0 ] || notes+=("$left Phoenix services were still listed after the last clean-up.")
# WARN/ERROR lines, but the expected one about --no-overlay.
problems() { cat "$work/phx/m1.log" "$work/phx/master.log" | { grep -E ' (WARN|ERROR) ' || true; } | { grep -v 'WITHOUT the overlay' || true; }; }
n=$(problems | wc -l)
if [ "$n" -gt 0 ]; then
    ex=$(problems | head -2 | sed 's/^[^ ]* *//' | cut -c1-200 | paste -sd';' -)
    notes+=("The master and minion logs hold $n WARN/ERROR lines, e.g.: \`$ex\`")
fi
leftover=$(awk -v w="$work/" 'index($2, w) == 1 && $2 !~ /\/pm\/root\/overlay$/' /proc/mounts | wc -l)
[ "$leftover" = 0 ] || notes+=("$leftover mounts were left under the work dir after the last clean-up (before the final teardown).")

# ------------------------------------------------------------------ report
git_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "?")
[ -z "$(git -C "$root" status --porcelain 2>/dev/null)" ] || git_rev="$git_rev + uncommitted changes"
DATE=$(date -u '+%Y-%m-%d %H:%M UTC') \
MACHINE="$(nproc) CPUs (nproc) · $(sed -n 's/^model name[^:]*: *//p' /proc/cpuinfo | head -1) · kernel $(uname -srm) · $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM" \
PHX="release build of $("$phoenix" --version) (git $git_rev)" \
CRUNV="$(crun --version | head -1)" \
PODMANV="$(podman --version)$(command -v runc >/dev/null && echo "; $(runc --version | head -1)")" \
UMOCIV="$(umoci --version)" DISK="$disk_fs" CGROUPS=$cgroups IMAGE=$image_desc SAMPLES=$samples RUNS=$unpack_runs \
ELAPSED=$(($(date +%s) - started)) WORK=$work PODMAN_FLAGS="$(printf '%s ' "${podman[@]:1}" "${podman_cg[@]}" "${podman_ulimits[@]}")" \
python3 - "$work/meta.json" "${notes[@]}" <<'EOF'
import json, os, sys
e = os.environ
meta = {k.lower(): e[k] for k in ["DATE", "MACHINE", "PHX", "CRUNV", "PODMANV", "UMOCIV", "DISK", "CGROUPS", "IMAGE", "PODMAN_FLAGS"]}
meta["podman_flags"] = meta["podman_flags"].replace(e["WORK"], "$WORK").strip()
meta.update(samples=int(e["SAMPLES"]), unpack_runs=int(e["RUNS"]), elapsed_s=int(e["ELAPSED"]), notes=sys.argv[2:])
json.dump(meta, open(sys.argv[1], "w"))
EOF
python3 "$py" report --meta "$work/meta.json" --cold "$work/cold.json" --starts "$work/starts.json" \
    --unpack "$work/unpack.json" --unpack-tmpfs "$work/unpack-tmpfs.json" >"$work/report.md"
emit_report containers "$work/report.md"
