#!/usr/bin/env python3
"""Helpers for bench/containers.sh: build the test image, time starts, report.

Subcommands:
  mkimage OUT ...        write an OCI image layout as a tar (an "oci-archive")
  crun-config IN OUT ... adapt Phoenix's runtime config for a bare crun bundle
  starts ...             time N container starts: command -> first UDP datagram
  runs ...               time N runs of a command (wall clock), cold: a fresh dest each
  repeat -- ARGV...       time a command N times (p50 etc. as JSON)
  report ...             the markdown section from the results

Only the standard library: it runs wherever python3 does.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import time

MTIME = 1_700_000_000


# ---------------------------------------------------------------- the image


def ldd_libs(binary):
    """The shared libraries `ldd` lists for a dynamic binary (host paths)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    libs = []
    for line in out.stdout.splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        path = line.split("=>")[-1].split()
        if path and path[0].startswith("/") and os.path.exists(path[0]):
            libs.append(path[0])
    return libs


class LayerTar:
    """One layer as an uncompressed tar in memory, with parent directories."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.dirs = set()

    def _info(self, name, kind, mode, size=0):
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.size = kind, mode, size
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = MTIME
        return ti

    def _parents(self, path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                self.tar.addfile(self._info(d, tarfile.DIRTYPE, 0o755))

    def dir(self, path, mode=0o755):
        path = path.strip("/")
        self._parents(path)
        if path not in self.dirs:
            self.dirs.add(path)
            self.tar.addfile(self._info(path, tarfile.DIRTYPE, mode))

    def file(self, path, data, mode=0o644):
        path = path.strip("/")
        self._parents(path)
        self.tar.addfile(self._info(path, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))

    def symlink(self, path, target):
        path = path.strip("/")
        self._parents(path)
        ti = self._info(path, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tar.addfile(ti)

    def bytes(self):
        self.tar.close()
        return self.buf.getvalue()


WORDS = (
    "the of and to in is for on that with as by this be are from at or an it not which have "
    "config server request error value default return string file path user service image layer "
    "container process network port address system module function error warning info debug trace"
).split()


def fill_layer(layer, rng, index, target_bytes, random_share):
    """Files with log-normal sizes (median 4 KiB, mean about 30 KiB, at most
    8 MiB: the shape of a distribution's root filesystem, many small files
    and most bytes in a few big ones), 50 to a directory, holding random
    bytes (incompressible, like binaries and compressed assets) or generated
    text (compressible, like code and docs), until `target_bytes`."""
    written, n = 0, 0
    while written < target_bytes:
        size = int(rng.lognormvariate(8.3178, 2.0))  # ln(4096) = 8.3178
        size = max(1, min(size, 8 << 20, target_bytes - written))
        d = f"opt/data{index}/d{n // 50:03d}"
        if rng.random() < random_share:
            data = rng.randbytes(size)
            name = f"{d}/blob{n:05d}.bin"
        else:
            text = " ".join(rng.choices(WORDS, k=size // 5 + 1)).encode()
            data = text[:size]
            name = f"{d}/text{n:05d}.txt"
        layer.file(name, data)
        written += size
        n += 1
    return n


def mkimage(args):
    rng = random.Random(args.seed)
    layers = []  # (uncompressed tar bytes, file count)
    base = LayerTar()
    for d in ["etc", "proc", "sys", "dev", "root"]:
        base.dir(d)
    for d in ["tmp", "var/tmp"]:
        base.dir(d, 0o1777)
    base.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    base.file("etc/group", b"root:x:0:\n")
    files = 2
    # The two programs, and the shared libraries they need (busybox-static
    # needs none) at their own paths.
    put = {"testy": args.testy, "bin/busybox": args.busybox}
    for lib in ldd_libs(args.testy) + ldd_libs(args.busybox):
        put[lib.lstrip("/")] = lib
    for at, host in put.items():
        with open(os.path.realpath(host), "rb") as f:
            base.file(at, f.read(), 0o755)
        files += 1
    for applet in ["sh", "ls", "cat", "echo", "sleep", "env", "ps", "wget"]:
        base.symlink(f"bin/{applet}", "busybox")
    files += 8
    layers.append((base.bytes(), files))
    per_layer = int(args.data_mib * (1 << 20) / args.data_layers)
    for i in range(args.data_layers):
        lt = LayerTar()
        n = fill_layer(lt, rng, i, per_layer, args.random_share)
        layers.append((lt.bytes(), n))

    blobs = {}

    def blob(data):
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return d, len(data)

    descs, diff_ids, total_files, raw = [], [], 0, 0
    for data, n in layers:
        diff_ids.append("sha256:" + hashlib.sha256(data).hexdigest())
        gz = gzip.compress(data, compresslevel=6, mtime=0)
        d, size = blob(gz)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": size})
        total_files += n
        raw += len(data)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/testy"], "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        },
        separators=(",", ":"),
    ).encode()
    cd, cs = blob(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": descs,
        },
        separators=(",", ":"),
    ).encode()
    md, ms = blob(manifest)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": md,
                    "size": ms,
                    "annotations": {"org.opencontainers.image.ref.name": args.tag},
                }
            ],
        },
        separators=(",", ":"),
    ).encode()
    with tarfile.open(args.out, "w", format=tarfile.PAX_FORMAT) as out:

        def add(name, data):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            out.addfile(ti, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for d, data in blobs.items():
            add("blobs/sha256/" + d.split(":", 1)[1], data)
    summary = {
        "file": args.out,
        "file_bytes": os.path.getsize(args.out),
        "uncompressed_bytes": raw,
        "layers": len(layers),
        "entries": total_files,
        "manifest": md,
    }
    summary["description"] = (
        f"OCI archive of {summary['file_bytes'] / 1e6:.1f} MB ({len(layers)} gzip layers, {raw / 1e6:.1f} MB "
        f"uncompressed, {total_files} files): testy (the entrypoint) with its shared libraries, busybox, and "
        f"{args.data_layers} layers of files with log-normal sizes (median 4 KiB, up to 8 MiB), "
        f"{args.random_share * 100:.0f} % random bytes and {100 - args.random_share * 100:.0f} % generated text; "
        f"built by `bench/containers.py mkimage` (deterministic, seed {args.seed})"
    )
    print(json.dumps(summary))


# ---------------------------------------------------------------- crun bundle config


def crun_config(args):
    """Phoenix's config.json for a container, made into a standalone bundle's:
    the rootfs path, the announce address and $PORT replaced."""
    with open(args.src) as f:
        c = json.load(f)
    c["root"]["path"] = args.rootfs
    c["hostname"] = args.name
    argv = c["process"]["args"]
    for i, a in enumerate(argv[:-1]):
        if a == "--announce":
            argv[i + 1] = args.announce
    env = [e for e in c["process"]["env"] if not e.startswith(("PORT=", "PHOENIX_NAME="))]
    env += [f"PORT={args.port}", f"PHOENIX_NAME={args.name}"]
    c["process"]["env"] = env
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(c, f, indent=2)


# ---------------------------------------------------------------- timing


def fill(template, **kw):
    return [a.format(**kw) for a in template]


def timed(argv, out, timeout):
    """Runs argv to its end: (exit code, milliseconds from spawn to exit).
    Waits with a blocking waitpid: subprocess's own timeout polls with
    sleeps of up to 50 ms, which would quantize the figures. A timer kills
    the command after `timeout` seconds instead."""
    import threading

    p0 = time.perf_counter_ns()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    try:
        code = p.wait()
    except BaseException:  # SIGTERM (see main) or Ctrl-C: end the command too
        p.kill()
        p.wait()
        raise
    finally:
        killer.cancel()
    return code, (time.perf_counter_ns() - p0) / 1e6


def run_quiet(argv, what, timeout=120):
    """Runs argv untimed; its output is shown only if it fails."""
    import tempfile

    with tempfile.TemporaryFile() as out:
        code, ms = timed(argv, out, timeout)
        if code != 0:
            out.seek(0)
            raise SystemExit(f"{what} failed ({code}): {' '.join(argv)}\n{out.read().decode(errors='replace')}")
    return ms


def become_subreaper():
    """Containers started with `crun run --detach` or by conmon lose their
    parent; as a subreaper this process gets them, and reaps them."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def starts(args):
    """Times container starts. The plan is a JSON list of series
    {label, prefix, port_base, cmd, after}; they run interleaved, round by
    round (A B C A B C ...), so that drift on a noisy machine hits all alike.
    Round 0 is a warm-up (reported apart). Per sample: the wall clock right
    before spawning `cmd` (t0); the time until `cmd` exits; the timestamp in
    the next `started <pid> <nanos>` datagram (t1); then `after`, untimed.
    `cmd` and `after` are argv lists; {i} {name} {port} are filled in.
    The commands' output goes to LOG (never a pipe: a detached container
    inherits it and would hold it open)."""
    with open(args.plan) as f:
        plan = json.load(f)
    become_subreaper()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", args.port))
    log = open(args.log, "ab")
    res = {s["label"]: {"warmup": [], "samples": []} for s in plan}
    for i in range(args.n + args.warmup):
        for s in plan:
            label = s["label"]
            kw = {"i": i, "name": f"{s['prefix']}{i}", "port": s["port_base"] + i}
            sock.setblocking(False)
            try:
                while True:
                    sock.recv(512)
            except BlockingIOError:
                pass
            sock.setblocking(True)
            time.sleep(args.gap)
            argv = fill(s["cmd"], **kw)
            log.write(f"--- {label} sample {i}: {' '.join(argv)}\n".encode())
            log.flush()
            t0 = time.time_ns()
            code, cli = timed(argv, log, 180)
            if code != 0:
                raise SystemExit(f"{label}: sample {i} failed ({code}): {' '.join(argv)} (see {args.log})")
            sock.settimeout(args.timeout)
            try:
                msg = sock.recv(512).decode()
            except socket.timeout:
                raise SystemExit(f"{label}: sample {i}: no datagram within {args.timeout} s")
            first = (int(msg.split()[2]) - t0) / 1e6
            sample = {"cli_ms": cli, "first_ms": first}
            res[label]["warmup" if i < args.warmup else "samples"].append(sample)
            print(f"  {label} #{i}{' (warm-up)' if i < args.warmup else ''}: first datagram {first:.1f} ms, command {cli:.1f} ms", file=sys.stderr)
            if s.get("after"):
                after = fill(s["after"], **kw)
                log.write(f"--- {label} after {i}: {' '.join(after)}\n".encode())
                log.flush()
                code, _ = timed(after, log, 120)
                if code != 0:
                    raise SystemExit(f"{label}: clean-up after sample {i} failed ({code}): {' '.join(after)} (see {args.log})")
            reap()
    with open(args.out, "w") as f:
        json.dump(res, f)
    for label, r in res.items():
        x = summary([s["first_ms"] for s in r["samples"]])
        print(f"  {label}: n={x['n']} first datagram p50 {x['p50']:.1f} ms p99 {x['p99']:.1f} ms", file=sys.stderr)


def runs(args):
    """Times commands that write into a destination ({dest}: DEST_ROOT/<k>
    for the k-th command), cold: before each run the old destination is
    removed and everything synced (untimed). The commands interleave round
    by round (A B A B ...), so that drift on a noisy machine hits all alike.
    The last round's destinations stay, to compare."""
    cmds = [json.loads(c) for c in args.cmd]
    res = {label: [] for label in args.label}
    for r in range(args.n):
        for k, (label, cmd) in enumerate(zip(args.label, cmds)):
            dest = os.path.join(args.dest_root, str(k))
            if os.path.lexists(dest):
                shutil.rmtree(dest)
            os.makedirs(args.dest_root, exist_ok=True)
            os.sync()
            ms = run_quiet(fill(cmd, i=r, dest=dest), f"{label}: run {r}", timeout=600)
            res[label].append(ms)
            print(f"  {label}: run {r}: {ms:.0f} ms", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(res, f)


def repeat(args):
    """Times a command N times (after one warm-up): prints the summary as JSON."""
    ms = []
    for i in range(args.n + 1):
        t = run_quiet(args.argv, f"run {i}")
        if i:
            ms.append(t)
    print(json.dumps(summary(ms)))


# ---------------------------------------------------------------- report


def summary(xs):
    """Nearest-rank percentiles (p50 is the median)."""
    xs = sorted(xs)
    if not xs:
        return {"n": 0}

    def pct(p):
        k = max(1, -(-p * len(xs) // 100))
        return xs[int(k) - 1]

    return {"n": len(xs), "min": xs[0], "p50": pct(50), "p99": pct(99), "max": xs[-1], "mean": sum(xs) / len(xs)}


def fms(x):
    return f"{x:.2f} ms" if x < 10 else f"{x:.1f} ms" if x < 100 else f"{x:.0f} ms"


def ratio(a, b):
    return f"{a / b:.1f}×" if a / b >= 1.95 or a / b < 0.95 else f"{a / b:.2f}×"


def report(args):
    with open(args.meta) as f:
        meta = json.load(f)
    with open(args.starts) as f:
        starts = json.load(f)
    with open(args.cold) as f:
        cold = json.load(f)
    with open(args.unpack) as f:
        unpack = json.load(f)
    with open(args.unpack_tmpfs) as f:
        unpack_t = json.load(f)
    labels = list(starts)  # bare crun, Phoenix, podman (crun)[, podman (runc)]
    C, P = "bare crun", "Phoenix"
    podmans = [k for k in labels if k.startswith("podman")]
    first = {k: summary([s["first_ms"] for s in v["samples"]]) for k, v in starts.items()}
    cli = {k: summary([s["cli_ms"] for s in v["samples"]]) for k, v in starts.items()}
    UP, UU = "Phoenix (phoenix-image)", "umoci unpack"
    up = {k: summary(v) for k, v in unpack.items()}
    upt = {k: summary(v) for k, v in unpack_t.items()}
    out = []
    w = out.append
    w(f"- Date: {meta['date']}")
    w(f"- Machine: {meta['machine']}")
    w(f"- Phoenix: {meta['phx']}; master and minion `--no-overlay` on loopback")
    w(f"- Peers: {meta['crunv']}; {meta['podmanv']}; {meta['umociv']}")
    w(f"- Disk (the temp dir's): {meta['disk']}")
    w(f"- Cgroups: {meta['cgroups']}")
    w(f"- podman flags: `{meta['podman_flags']}`")
    w(f"- Image: {meta['image']}")
    w(f"- This run took {meta['elapsed_s']} s.")
    w("")
    w("The machine is shared and noisy: read the medians and the ratios; single figures move between runs.")
    w("")
    n = first[P]["n"]
    w(f"| Deploy → first datagram, image unpacked (n={n} each) | p50 | p99 | p50 − bare crun | p50 ÷ Phoenix |")
    w("|---|---:|---:|---:|---:|")
    for k in labels:
        s = first[k]
        w(f"| {k} | {fms(s['p50'])} | {fms(s['p99'])} | {s['p50'] - first[C]['p50']:+.1f} ms | {ratio(s['p50'], first[P]['p50'])} |")
    w("")
    nu = up[UP]["n"]
    disk = meta["disk"].split()[0]
    w(f"| Unpack the image, cold (n={nu} each) | median | min | max | median ÷ Phoenix |")
    w("|---|---:|---:|---:|---:|")
    for where, u in [(f"on {disk}", up), ("on tmpfs", upt)]:
        for k in [UP, UU]:
            s = u[k]
            w(f"| {k}, {where} | {fms(s['p50'])} | {fms(s['min'])} | {fms(s['max'])} | {ratio(s['p50'], u[UP]['p50'])} |")
    w("")
    w("#### Targets")
    w("")
    gap = first[P]["p50"] - first[C]["p50"]
    w(
        f"- **Deploy → running within 20 ms of bare crun** — {'MET' if gap <= 20 else 'NOT MET'}: "
        f"p50 Phoenix {fms(first[P]['p50'])}, bare crun {fms(first[C]['p50'])}: {gap:+.1f} ms "
        f"(p99: {fms(first[P]['p99'])} vs {fms(first[C]['p99'])}, {first[P]['p99'] - first[C]['p99']:+.1f} ms)"
    )
    best = min(podmans, key=lambda k: first[k]["p50"])
    met = all(first[P]["p50"] < first[k]["p50"] for k in podmans)
    w(
        f"- **Deploy → running faster than podman** — {'MET' if met else 'NOT MET'}: "
        f"p50 Phoenix {fms(first[P]['p50'])}, "
        + ", ".join(f"{k} {fms(first[k]['p50'])} ({ratio(first[k]['p50'], first[P]['p50'])})" for k in podmans)
        + f"; p99 Phoenix {fms(first[P]['p99'])}, {best} {fms(first[best]['p99'])}"
    )
    met = up[UP]["p50"] <= up[UU]["p50"]
    w(
        f"- **Unpack no slower than umoci** — {'MET' if met else 'NOT MET'}: "
        f"median on {disk} {fms(up[UP]['p50'])} vs umoci {fms(up[UU]['p50'])} (umoci ÷ Phoenix {ratio(up[UU]['p50'], up[UP]['p50'])}); "
        f"on tmpfs {fms(upt[UP]['p50'])} vs {fms(upt[UU]['p50'])} ({ratio(upt[UU]['p50'], upt[UP]['p50'])})"
    )
    w("")
    w("#### All samples")
    w("")
    w("| Series | n | min | p50 | mean | p99 | max |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    rows = [(f"{k}: command → first datagram", first[k]) for k in labels]
    rows += [(f"{k}: command returned", cli[k]) for k in labels]
    rows += [(f"{k}, on {disk}: wall time", up[k]) for k in [UP, UU]]
    rows += [(f"{k}, on tmpfs: wall time", upt[k]) for k in [UP, UU]]
    for label, s in rows:
        w(f"| {label} | {s['n']} | {fms(s['min'])} | {fms(s['p50'])} | {fms(s['mean'])} | {fms(s['p99'])} | {fms(s['max'])} |")
    w("")
    c = cold["Phoenix (cold)"]["samples"][0]
    warm = {k: v["warmup"][0]["first_ms"] for k, v in starts.items() if v["warmup"]}
    w(
        f"- Phoenix's first deploy of the image, which fetches it from the master ({meta['image'].split(' (')[0].replace('OCI archive of ', '')}) "
        f"and unpacks it on the minion: {fms(c['first_ms'])} to the first datagram ({fms(c['cli_ms'])} until `phoenix deploy` returned)."
    )
    w("- The unmeasured warm-up round (first datagram): " + ", ".join(f"{k} {fms(v)}" for k, v in warm.items()) + ".")
    for where, u in [(disk, unpack), ("tmpfs", unpack_t)]:
        w(f"- Unpack runs on {where} in order (ms): " + "; ".join(f"{k}: " + ", ".join(f"{x:.0f}" for x in u[k]) for k in [UP, UU]) + ".")
    for note in meta.get("notes", []):
        w(f"- {note}")
    print("\n".join(out))


def main():
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("mkimage")
    m.add_argument("out")
    m.add_argument("--testy", required=True)
    m.add_argument("--busybox", required=True)
    m.add_argument("--data-mib", type=float, default=110)
    m.add_argument("--data-layers", type=int, default=4)
    m.add_argument("--random-share", type=float, default=0.7)
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--tag", default="latest")
    c = sub.add_parser("crun-config")
    c.add_argument("src")
    c.add_argument("out")
    for a in ["--rootfs", "--announce", "--name", "--port"]:
        c.add_argument(a, required=True)
    s = sub.add_parser("starts")
    s.add_argument("--plan", required=True, help="JSON: [{label, prefix, port_base, cmd, after}]")
    s.add_argument("--n", type=int, default=20)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--port", type=int, required=True, help="the UDP port the announcements come to")
    s.add_argument("--gap", type=float, default=0.2, help="seconds of quiet before each sample")
    s.add_argument("--timeout", type=float, default=60)
    s.add_argument("--log", required=True)
    s.add_argument("--out", required=True)
    r = sub.add_parser("runs")
    r.add_argument("--n", type=int, default=5)
    r.add_argument("--label", action="append", required=True)
    r.add_argument("--cmd", action="append", required=True, help="argv as JSON, with {i} {dest}")
    r.add_argument("--dest-root", required=True)
    r.add_argument("--out", required=True)
    rt = sub.add_parser("repeat")
    rt.add_argument("--n", type=int, default=20)
    rt.add_argument("argv", nargs="+")
    rp = sub.add_parser("report")
    rp.add_argument("--meta", required=True)
    rp.add_argument("--starts", required=True)
    rp.add_argument("--cold", required=True)
    rp.add_argument("--unpack", required=True)
    rp.add_argument("--unpack-tmpfs", required=True)
    a = p.parse_args()
    {"mkimage": mkimage, "crun-config": crun_config, "starts": starts, "runs": runs, "repeat": repeat, "report": report}[a.what](a)


if __name__ == "__main__":
    main()
