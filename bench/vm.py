#!/usr/bin/env python3
"""Helpers of bench/vm.sh (see there): building the container image, timing
deploys through Phoenix, timing a bare QEMU launch, and the report.

  vm.py mkoci OUT --busybox PATH
  vm.py deploys --phoenix P --work W --runs N --minion-pid PID --www DIR
  vm.py bare --work W --runs N --kernel K --initrd I --rootfs R
  vm.py report WORK
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PORT = 8080


def mkoci(args):
    """An OCI archive: busybox, /www/health, httpd as the entrypoint."""
    import containers  # bench/containers.py: LayerTar and the archive layout

    layer = containers.LayerTar()
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "www"]:
        layer.dir(d)
    with open(os.path.realpath(args.busybox), "rb") as f:
        layer.file("bin/busybox", f.read(), 0o755)
    layer.file("www/health", b"ok\n")
    layer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    data = layer.bytes()
    import gzip
    import hashlib
    import io
    import tarfile

    blobs = {}

    def blob(b):
        d = "sha256:" + hashlib.sha256(b).hexdigest()
        blobs[d] = b
        return {"digest": d, "size": len(b)}

    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    lay = blob(gzip.compress(data, mtime=0))
    config = blob(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "Entrypoint": ["/bin/busybox", "httpd", "-f", "-p", f"[::]:{PORT}", "-h", "/www"],
                    "Env": ["PATH=/bin"],
                },
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            }
        ).encode()
    )
    manifest = blob(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **lay}],
            }
        ).encode()
    )
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    **manifest,
                    "annotations": {"org.opencontainers.image.ref.name": "latest"},
                }
            ],
        }
    ).encode()
    with tarfile.open(args.out, "w", format=tarfile.PAX_FORMAT) as out:

        def add(name, b):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(b), 0o644
            out.addfile(ti, io.BytesIO(b))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for d, b in blobs.items():
            add("blobs/sha256/" + d.split(":", 1)[1], b)


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def uptime_s():
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def started_s(pid):
    """When process `pid` started, in seconds since boot."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def rounds(args):
    """The rounds to run: `--round R` alone, else 0 (the warm-up) to RUNS."""
    return [args.round] if args.round is not None else range(args.runs + 1)


def save(args, out):
    """Prints `out`, or merges it into `--out FILE` (lists are extended)."""
    if not args.out:
        json.dump(out, sys.stdout)
        return
    old = json.load(open(args.out)) if os.path.exists(args.out) else {}
    for k, v in out.items():
        old[k] = old.get(k, []) + v if isinstance(v, list) else v
    with open(args.out, "w") as f:
        json.dump(old, f)


def phoenix(p, *args, check=True):
    r = subprocess.run([p, *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.exit(f"phoenix {' '.join(args)} failed: {r.stdout}{r.stderr}")
    return r.stdout


def spec_of(kind, name, www):
    s = {"machine": "m1", "name": name, "proxyport": PORT, "healthcheck": "/health"}
    if kind == "vm":
        s.update({"type": "vm", "image": "web.zst"})
    elif kind == "container":
        s.update({"type": "docker", "image": "web.tar"})
    else:
        s.update(
            {"type": "binary", "image": "busybox", "args": ["httpd", "-f", "-p", f"[::]:{PORT}", "-h", www]}
        )
    return s


def deploys(args):
    """Deploy -> health check passing (`phoenix deploy` returns then), per
    kind, interleaved; a warm-up of each first (unpacks the images)."""
    out = {"vm": [], "container": [], "binary": [], "qemu_rss_kib": [], "minion_rss_delta_kib": []}
    for r in rounds(args):
        for kind in ["vm", "container", "binary"]:
            name = f"bench-{kind}"
            path = os.path.join(args.work, f"{name}.json")
            with open(path, "w") as f:
                json.dump(spec_of(kind, name, args.www), f)
            before = rss_kib(args.minion_pid)
            up0 = uptime_s()
            t0 = time.monotonic()
            phoenix(args.phoenix, "deploy", path, "--timeout", "300")
            ms = (time.monotonic() - t0) * 1000
            st = json.loads(phoenix(args.phoenix, "status", name, "--json"))
            if st.get("health") != "healthy":
                sys.exit(f"{name} deployed but not healthy: {st}")
            if kind == "vm":
                spawn_ms = (started_s(st["pid"]) - up0) * 1000
                print(f"vm.py: run {r} vm: QEMU started {spawn_ms:.0f} ms after the deploy began", file=sys.stderr)
                if r > 0:
                    out.setdefault("qemu_started_ms", []).append(spawn_ms)
                q = rss_kib(st["pid"])
                after = rss_kib(args.minion_pid)
                if r > 0 and q is not None:
                    out["qemu_rss_kib"].append(q)
                    out["minion_rss_delta_kib"].append((after or 0) - (before or 0))
            if r > 0:
                out[kind].append(ms)
            print(f"vm.py: run {r} {kind}: {ms:.0f} ms", file=sys.stderr)
            log = os.path.join(args.work, "m1", "logs", f"{name}.log")
            if kind == "vm" and os.path.exists(log):
                shutil.copyfile(log, os.path.join(args.work, f"console-{r}.log"))
            phoenix(args.phoenix, "del", name, "--timeout", "120")
    out["minion_rss_kib"] = rss_kib(args.minion_pid)
    save(args, out)


# The bare launch's best case: its neighbour discovery of the guest retries
# every 10 ms instead of every second, so the first answer after the guest
# configures its address is not held back by a solicitation sent before.
IFUP = """#!/bin/sh
ip link set "$1" up
echo 10 > /proc/sys/net/ipv6/neigh/"$1"/retrans_time_ms
ip -6 addr add fe80::1/64 dev "$1" nodad
ip -6 addr add fd00::1/128 dev "$1" nodad
ip -6 route add fd00::2/128 dev "$1"
"""


def answers(addr, timeout=0.05):
    """One GET /health; True on a 200."""
    try:
        with socket.create_connection((addr, PORT), timeout=timeout) as s:
            s.settimeout(0.5)
            s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            first = s.recv(64).split(b"\r\n", 1)[0]
            return first.startswith(b"HTTP/") and b" 200" in first
    except OSError:
        return False


def bare(args):
    """QEMU launched by hand, in this (fresh) network namespace, with the
    command line the minion gives it; the time from the launch to the
    guest's HTTP server answering (polled every 5 ms), and QEMU's RSS."""
    with open(os.path.join(args.work, "ifup"), "w") as f:
        f.write(IFUP)
    os.chmod(os.path.join(args.work, "ifup"), 0o755)
    mhz = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                mhz = int(float(line.split(":")[1]) * 1000)
                break
    cmdline = "console=ttyS0 root=/dev/vda rw panic=-1 quiet"
    if args.accel == "tcg":
        cmdline += (f" tsc_early_khz={mhz}" if mhz else "") + " no_timer_check"
    cmdline += f" PHOENIX_NAME=bare PHOENIX_IP=fd00::2 PORT={PORT}"
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    times, rss = [], []
    for r in rounds(args):
        disk = os.path.join(args.work, "bare-disk.ext4")
        shutil.copyfile(args.rootfs, disk)
        qmp = os.path.join(args.work, "bare-qmp.sock")
        if os.path.exists(qmp):
            os.unlink(qmp)
        accel = ["-accel", "tcg,tb-size=32", "-cpu", "max"] if args.accel == "tcg" else ["-accel", "kvm", "-cpu", "host"]
        argv = (
            ["qemu-system-x86_64", "-name", "bare", "-M", "microvm"]
            + accel
            + ["-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
            + ["-chardev", "file,id=con,path=/proc/self/fd/1", "-serial", "chardev:con"]
            + ["-kernel", args.kernel, "-initrd", args.initrd, "-append", cmdline]
            + ["-drive", f"id=root,file={disk},format=raw,if=none", "-device", "virtio-blk-device,drive=root"]
            + ["-netdev", f"tap,id=n0,ifname=vm0,script={args.work}/ifup,downscript=no"]
            + ["-device", "virtio-net-device,netdev=n0"]
            + ["-qmp", f"unix:{qmp},server=on,wait=off"]
        )
        console = open(os.path.join(args.work, f"bare-{r}.log"), "w")
        t0 = time.monotonic()
        q = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=console, stderr=subprocess.STDOUT)
        try:
            while not answers("fd00::2"):
                if q.poll() is not None:
                    sys.exit(f"bare QEMU exited ({q.returncode}); console in {console.name}")
                if time.monotonic() - t0 > 300:
                    sys.exit("bare QEMU: no answer within 300 s")
                time.sleep(0.005)
            ms = (time.monotonic() - t0) * 1000
            if r > 0:
                times.append(ms)
                rss.append(rss_kib(q.pid))
            print(f"vm.py: bare run {r}: {ms:.0f} ms", file=sys.stderr)
        finally:
            q.send_signal(signal.SIGKILL)
            q.wait()
            console.close()
    save(args, {"bare": times, "bare_rss_kib": rss})


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def report(args):
    w = args.work
    d = json.load(open(os.path.join(w, "deploys.json")))
    b = json.load(open(os.path.join(w, "bare.json")))
    m = json.load(open(os.path.join(w, "meta.json")))
    vm, bare_ms = med(d["vm"]), med(b["bare"])
    over = vm - bare_ms
    fmt = lambda xs: ", ".join(f"{x:.0f}" for x in xs)
    lines = [
        f"`bench/vm.sh {m['args']}` at {m['git']}, {m['version']}; {m['qemu']}; accelerator **{m['accel']}**"
        f" ({m['accel_why']}); {m['cpus']} CPUs, load average {m['load_before']} before and {m['load_after']} after the run; "
        f"took {m['took']} s. Medians of {len(d['vm'])} runs (after one warm-up each), all on one minion in a network namespace "
        "(the master in another), the overlay on. Each round deploys the three kinds through Phoenix, then "
        "launches the bare QEMU, so the machine's load drifts alike for both.",
        "",
        "The same tiny HTTP server three ways: busybox `httpd` serving `/health`, as a VM (Debian's cloud kernel "
        f"{m['kernel']} with an initrd loading the virtio modules, an ext4 root disk of busybox; 256 MiB, 1 vCPU), "
        "as a container (an OCI image of busybox, crun) and as a binary. Deploy → healthy is `phoenix deploy` "
        "wall time: it returns when the service's health check has passed. The bare launch is "
        "`qemu-system-x86_64 -M microvm` with the same kernel, initrd, disk, memory and command line (and a tap "
        "in a network namespace), timed from its launch to the guest's `httpd` answering `GET /health`, polled "
        "every 5 ms.",
        "",
        "| | deploy → healthy (median) | runs (ms) |",
        "|---|---:|---|",
        f"| VM (QEMU microvm, {m['accel']}) | **{vm:.0f} ms** | {fmt(d['vm'])} |",
        f"| bare QEMU, same kernel and disk | {bare_ms:.0f} ms | {fmt(b['bare'])} |",
        f"| container (crun) | {med(d['container']):.0f} ms | {fmt(d['container'])} |",
        f"| binary | {med(d['binary']):.0f} ms | {fmt(d['binary'])} |",
        "",
        f"**Phoenix's overhead over the bare VMM: {over:+.0f} ms** (median VM deploy → healthy minus median bare "
        f"launch → answer; target ≤ 50 ms: {'met' if over <= 50 else 'not met'}). "
        "It holds the CLI and master round trips, the minion's network namespace, the copy of the root disk, "
        "QEMU's `ifup` script, and the health probe's cadence (10 ms doubling to 100 ms between probes until "
        "the first pass) against the bare loop's 5 ms. The part before QEMU runs is measured alone: QEMU "
        f"started a median **{med(d.get('qemu_started_ms', [])):.0f} ms** after `phoenix deploy` began "
        f"(runs: {fmt(d.get('qemu_started_ms', []))} ms; from QEMU's start time in `/proc`). "
        "Under TCG a boot varies by seconds from run to run with the machine's load, so the difference of the "
        "medians carries that noise; the launch delay does not.",
        "",
        f"Memory per VM: QEMU's RSS {med(d['qemu_rss_kib']) / 1024:.0f} MiB (bare: "
        f"{med([x for x in b['bare_rss_kib'] if x]) / 1024:.0f} MiB; most of it the guest's touched memory and "
        f"TCG's 32 MiB translation cache); the minion's RSS grew by a median {med(d['minion_rss_delta_kib']):.0f} KiB "
        f"per VM deployed, and is {d['minion_rss_kib'] / 1024:.1f} MiB after the runs.",
        "",
        "For comparison, Firecracker's own specification (SPECIFICATION.md in its repository) promises, on an "
        "i3.metal host with KVM, ≤ 125 ms from the `InstanceStart` API call to the guest's `/sbin/init` (2 vCPUs, "
        "256 MiB, its tuned guest kernel), a VMM that starts in 8 CPU ms and ≤ 5 MiB of VMM memory overhead. "
        "Figures with KVM can only come from a machine with hardware virtualisation; this one has none "
        "(its `/dev/kvm` is PVM, which boots no stock kernel), so every guest here runs under QEMU's software "
        "emulation, which dominates the boot times above.",
    ]
    for n in m.get("notes", []):
        lines += ["", n]
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("mkoci")
    a.add_argument("out")
    a.add_argument("--busybox", required=True)
    a = sub.add_parser("deploys")
    a.add_argument("--phoenix", required=True)
    a.add_argument("--work", required=True)
    a.add_argument("--runs", type=int, default=5)
    a.add_argument("--minion-pid", type=int, required=True)
    a.add_argument("--www", required=True)
    a.add_argument("--round", type=int)
    a.add_argument("--out")
    a = sub.add_parser("bare")
    a.add_argument("--work", required=True)
    a.add_argument("--runs", type=int, default=5)
    a.add_argument("--kernel", required=True)
    a.add_argument("--initrd", required=True)
    a.add_argument("--rootfs", required=True)
    a.add_argument("--accel", default="tcg")
    a.add_argument("--round", type=int)
    a.add_argument("--out")
    a = sub.add_parser("report")
    a.add_argument("work")
    args = ap.parse_args()
    {"mkoci": mkoci, "deploys": deploys, "bare": bare, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
