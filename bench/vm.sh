#!/usr/bin/env bash
# MicroVM benchmark, in one run, on two hosts (network namespaces on one
# bridge): a master and a minion m1 (a network namespace per service, the
# WireGuard overlay on), real `phoenix master` / `phoenix minion` daemons.
# It measures
#   1. deploy -> health check passing (`phoenix deploy` wall time; it returns
#      once the health check passed) of the same tiny HTTP server (busybox
#      httpd serving /health) as a VM (type vm: Debian's cloud kernel, an
#      initrd loading the virtio modules, an ext4 root disk of busybox), a
#      container (an OCI image of busybox) and a binary (busybox), RUNS times
#      each, interleaved, after a warm-up of each;
#   2. QEMU's RSS per VM, and how much the minion's grew per VM;
#   3. a bare `qemu-system-x86_64 -M microvm` launch of the same kernel,
#      initrd and disk with the command line the minion gives it (in a
#      network namespace of its own, a tap to the guest), timed from the
#      launch to the guest's httpd answering, RUNS times: Phoenix's overhead
#      is the difference of the medians (target: <= 50 ms).
# Rounds: each deploys the three kinds, then launches the bare QEMU, so the
# machine's load drifts alike for both; round 0 is a warm-up.
# Prints a markdown section; --write also puts it into BENCHMARKS.md (between
# <!-- vm:begin --> and <!-- vm:end -->).
#
# Needs root, qemu-system-x86 (qemu-system-x86_64), linux-image-cloud-amd64,
# busybox-static, e2fsprogs (mkfs.ext4 -d), zstd, cpio, crun, python3,
# iproute2, and a release build (cargo build --release -p phoenix).
# Usage: bench/vm.sh [--write] [RUNS]     default: 5 runs
#   KEEP_LOGS=1 keeps the daemons' logs and the VMs' consoles.
set -euo pipefail
write=no
if [ "${1:-}" = "--write" ]; then write=yes; shift; fi
runs=${1:-5}
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

need_root "network namespaces, TUN and tap devices"
for t in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static mkfs.ext4:e2fsprogs zstd:zstd \
    cpio:cpio crun:crun python3:python3 ip:iproute2; do
    need_tools "${t##*:}" "${t%%:*}"
done
kver=$(ls /lib/modules | grep -- '-cloud-amd64$' | sort -V | tail -1) || true
[ -n "$kver" ] && [ -e "/boot/vmlinuz-$kver" ] || die "needs Debian's cloud kernel (apt-get install linux-image-cloud-amd64)"
need_bins "$root/target/release" "cargo build --release -p phoenix" phoenix
[ -e /dev/net/tun ] || die "needs /dev/net/tun"

make_work vm
copy_bins "$root/target/release" phoenix
cp "$root/bench/vm.py" "$root/bench/containers.py" "$work/bin/"
phoenix=$work/bin/phoenix
py=$work/bin/vm.py
export PHOENIX_DATA_DIR=$work/master

# ------------------------------------------------------------------ clean-up
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP
    keep_results "$rc" "$work"/*.log
    kill_child
    if [ -S "$work/master/phoenix.sock" ]; then
        for s in bench-vm bench-container bench-binary; do timeout 60 "$phoenix" del "$s" >/dev/null 2>&1; done
    fi
    stop_cluster "$work"/m1/run/*.json
    sleep 0.5
    remove_hosts_and_work
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ------------------------------------------------------------------ images
say "building the VM image (kernel $kver), the container image and the docroot in $work"
# The image the VM e2e tests build (tests/e2e/src/mkvm.sh: Debian's cloud
# kernel, an initrd loading the virtio modules, an ext4 root of busybox),
# its init ending in the web server; unpacked as well for the bare launch.
W=$work/vm
mkdir -p "$W/img"
cat >"$W/web.init" <<'INIT'
echo ok > /www/health
echo "vm: serving at $(cut -d' ' -f1 /proc/uptime) s of guest time"
exec httpd -f -p "[::]:$PORT" -h /www
INIT
sh "$root/tests/e2e/src/mkvm.sh" "$work/web.zst" "$W/web.init"
zstd -q -dc "$work/web.zst" | tar -x -C "$W/img"
busybox=$(command -v busybox)
python3 "$py" mkoci "$work/web.tar" --busybox "$busybox"
mkdir -p "$work/www"
echo ok >"$work/www/health"
chmod 755 "$work/www"

# ------------------------------------------------------------------ cluster
cluster_hosts vb$$ 10.96.0 master m1 bare
say "starting a master and minion m1"
start_master "$work"
start_minion "$work" m1 --stop-timeout-ms 5000
join_minions m1
"$phoenix" push "$work/web.zst" web.zst >/dev/null
"$phoenix" push "$work/web.tar" web.tar >/dev/null
"$phoenix" push "$busybox" busybox >/dev/null
waitfor_cli 120 "m1 to hold every image" \
    "len(d) >= 3 and all(n['state'] == 'synced' for i in d for n in i['nodes'])" images --json
accel=$(waitfor_cli 20 "m1's VM accelerator" "d[0]['stats'] and d[0]['stats'].get('vm_accel')" nodes --json &&
    "$phoenix" nodes --json | jq1 "d[0]['stats']['vm_accel']")
case $accel in
tcg) accel_why="no hardware virtualisation on this machine: QEMU's software emulation" ;;
kvm) accel_why="hardware virtualisation" ;;
*) die "m1 runs no VMs (vm_accel: $accel)" ;;
esac

# ------------------------------------------------------------------ 1-3, round by round
# Each round: the three kinds through Phoenix, then the bare launch, so
# that the machine's load drifts alike for both.
say "deploy -> healthy of a VM, a container and a binary, then a bare QEMU launch of the same kernel, initrd and disk: $runs rounds (+1 warm-up)"
for r in $(seq 0 "$runs"); do
    in_bg python3 "$py" deploys --phoenix "$phoenix" --work "$work" --round "$r" \
        --minion-pid "${daemon[m1]}" --www "$work/www" --out "$work/deploys.json"
    in_bg ip netns exec "$(ns_of bare)" python3 "$py" bare --work "$work" --round "$r" --accel "$accel" \
        --kernel "$W/img/bzImage" --initrd "$W/img/initrd" --rootfs "$W/img/rootfs.ext4" --out "$work/bare.json"
done

# ------------------------------------------------------------------ report
note_log_problems 200 "" "$work/m1.log" "$work/master.log"
git_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "?")
[ -z "$(git -C "$root" status --porcelain -- crates bench/vm.sh bench/vm.py bench/lib.sh 2>/dev/null)" ] || git_rev="$git_rev + uncommitted changes"
ARGS="$*" RUNS=$runs TOOK=$(($(date +%s) - started)) GIT="$git_rev" VERSION="$("$phoenix" --version)" \
QEMU="$(qemu-system-x86_64 --version | head -1)" ACCEL=$accel ACCEL_WHY=$accel_why KERNEL=$kver \
CPUS=$(nproc) LOAD_BEFORE=$load_before LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)" \
NOTES="$(printf '%s\n' "${notes[@]+"${notes[@]}"}")" python3 -c '
import json, os
e = os.environ
print(json.dumps({"args": e["ARGS"] or "(defaults)", "runs": int(e["RUNS"]), "took": int(e["TOOK"]), "git": e["GIT"],
    "version": e["VERSION"], "qemu": e["QEMU"], "accel": e["ACCEL"], "accel_why": e["ACCEL_WHY"], "kernel": e["KERNEL"],
    "cpus": int(e["CPUS"]), "load_before": e["LOAD_BEFORE"], "load_after": e["LOAD_AFTER"],
    "notes": [l for l in e["NOTES"].splitlines() if l.strip()]}))' >"$work/meta.json"
python3 "$py" report "$work" >"$work/report.md"
emit_report vm "$work/report.md"
