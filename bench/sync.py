#!/usr/bin/env python3
"""Helpers for bench/sync.sh (image sync: rsync, casync, a full copy, Phoenix).

Subcommands:
  mkdata DIR SEED     the two data sets, v1 and v2 each (deterministic)
  serve DIR PORT      an HTTP/1.1 (keep-alive) file server on [::]:PORT
  measure ...         one sync: bytes on host 2's link, wall time, CPU of both hosts
  report RESULTS      the markdown tables from measure's JSON lines

Only the standard library (and bench/containers.py's layer builder).
"""

import argparse
import datetime
import gzip
import hashlib
import http.server
import io
import json
import os
import random
import re
import resource
import socket
import statistics
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from containers import MTIME, LayerTar, fill_layer  # noqa: E402

BIN_SIZE = 50 << 20
OCI_RAW_MIB = [7, 10, 13, 16, 20]  # uncompressed layer sizes; gzip makes them ~5-15 MB
OCI_CHANGED = 2  # v2 rebuilds the third of the five layers


# ---------------------------------------------------------------- data


def mkbin(rng, size):
    """Binary-like bytes: runs of 1-64 KiB, 25 % random (compressed assets),
    55 % skewed bytes (code-like: half 00, many FF, a few common values), 20 %
    copies of a run from the last MiB with a byte changed every ~512
    (repeated code). Compresses about as well as a real binary (2:1)."""
    common = [0x00] * 128 + [0xFF] * 32 + [0x48, 0x89, 0x8B, 0xE8, 0x0F, 0x24, 0x44, 0x85, 0x74, 0xC3] * 6
    table = bytes((common + [rng.randrange(256) for _ in range(256)])[:256])
    out = bytearray()
    while len(out) < size:
        n, kind = rng.randrange(1024, 65536), rng.random()
        if kind < 0.25 or len(out) < 65536:
            out += rng.randbytes(n)
        elif kind < 0.8:
            out += rng.randbytes(n).translate(table)
        else:
            at = rng.randrange(max(0, len(out) - (1 << 20)), len(out) - n)
            run = bytearray(out[at : at + n])
            for i in range(0, len(run), 512):
                run[rng.randrange(i, min(i + 512, len(run)))] = rng.randrange(256)
            out += run
    return bytes(out[:size])


def edit_bin(rng, v1):
    """Five scattered edits of 4-8 bytes, then 4 KiB inserted in the middle."""
    v2 = bytearray(v1)
    for frac in (0.1, 0.3, 0.45, 0.7, 0.9):
        at = int(len(v2) * frac) + rng.randrange(4096)
        n = rng.randrange(4, 9)
        v2[at : at + n] = rng.randbytes(n)
    mid = len(v2) // 2 + rng.randrange(4096)
    return bytes(v2[:mid] + rng.randbytes(4096) + v2[mid:])


def layer(seed, index, mib):
    lt = LayerTar()
    n = fill_layer(lt, random.Random(seed), index, mib << 20, 0.6)
    raw = lt.bytes()
    return raw, gzip.compress(raw, compresslevel=6, mtime=0), n


def oci_tar(path, layers, tag):
    """An OCI archive as `docker image save` (25+) writes it: every entry in
    name order, so the blobs come sorted by digest."""
    blobs = {}

    def blob(data):
        d = hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return {"digest": "sha256:" + d, "size": len(data)}

    ltype = "application/vnd.oci.image.layer.v1.tar+gzip"
    descs = [dict(mediaType=ltype, **blob(gz)) for _, gz, _ in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest() for raw, _, _ in layers]},
    }
    cfg = blob(json.dumps(config, separators=(",", ":")).encode())
    mtype = "application/vnd.oci.image.manifest.v1+json"
    manifest = {"schemaVersion": 2, "mediaType": mtype, "layers": descs}
    manifest["config"] = dict(mediaType="application/vnd.oci.image.config.v1+json", **cfg)
    man = blob(json.dumps(manifest, separators=(",", ":")).encode())
    ref = {"io.containerd.image.name": f"docker.io/library/app:{tag}", "org.opencontainers.image.ref.name": tag}
    index = {"schemaVersion": 2, "manifests": [dict(mediaType=mtype, annotations=ref, **man)]}
    files = {"blobs/sha256/" + d: data for d, data in blobs.items()}
    files["index.json"] = json.dumps(index).encode()
    files["manifest.json"] = json.dumps(
        [{"Config": "blobs/sha256/" + cfg["digest"][7:], "RepoTags": [f"app:{tag}"], "Layers": ["blobs/sha256/" + d["digest"][7:] for d in descs]}]
    ).encode()
    files["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as out:
        for name in ["blobs", "blobs/sha256"]:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            out.addfile(ti)
        for name in sorted(files):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(files[name]), 0o644, MTIME
            out.addfile(ti, io.BytesIO(files[name]))


def mkdata(args):
    os.makedirs(args.dir, exist_ok=True)
    rng = random.Random(f"bin-{args.seed}")
    v1 = mkbin(rng, BIN_SIZE)
    for name, data in (("bin-v1", v1), ("bin-v2", edit_bin(rng, v1))):
        with open(os.path.join(args.dir, name), "wb") as f:
            f.write(data)
    layers = [layer(f"oci-{args.seed}-{i}", i, mib) for i, mib in enumerate(OCI_RAW_MIB)]
    oci_tar(os.path.join(args.dir, "oci-v1.tar"), layers, "v1")
    old = layers[OCI_CHANGED]
    layers[OCI_CHANGED] = layer(f"oci-{args.seed}-{OCI_CHANGED}-v2", OCI_CHANGED, OCI_RAW_MIB[OCI_CHANGED])
    oci_tar(os.path.join(args.dir, "oci-v2.tar"), layers, "v2")
    zstd = subprocess.run(["zstd", "-3", "-c"], input=v1, capture_output=True, check=True).stdout
    print(json.dumps({
        "bin_ratio": round(len(v1) / len(zstd), 2),
        "oci_layers_mb": [round(len(gz) / 1e6, 1) for _, gz, _ in layers],
        "oci_changed_mb": [round(len(old[1]) / 1e6, 1), round(len(layers[OCI_CHANGED][1]) / 1e6, 1)],
        "oci_files": sum(n for _, _, n in layers),
    }))


# ---------------------------------------------------------------- serve


class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else keep-alive waits on delayed ACKs

    def log_message(self, *a):
        pass


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve(args):
    os.chdir(args.dir)
    Server(("::", args.port), Handler).serve_forever()


# ---------------------------------------------------------------- measure


def counters(h2, namespaces):
    """Bytes and packets (rx + tx) of host 2's eth0; TCP segments
    retransmitted and UDP datagrams dropped for a full receive buffer, in
    all namespaces (the WireGuard overlay's losses show in both)."""
    out = subprocess.run(["ip", "-n", h2, "-j", "-s", "link", "show", "dev", "eth0"], capture_output=True, text=True, check=True)
    s = json.loads(out.stdout)[0]["stats64"]
    retrans = drops = 0
    for ns in namespaces:
        snmp = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "cat", "/proc/net/snmp"], capture_output=True, text=True, check=True)
        lines = snmp.stdout.splitlines()
        head, vals = [line.split()[1:] for line in lines if line.startswith("Tcp:")]
        retrans += int(vals[head.index("RetransSegs")])
        head, vals = [line.split()[1:] for line in lines if line.startswith("Udp:")]
        drops += int(vals[head.index("RcvbufErrors")])
    return s["rx"]["bytes"] + s["tx"]["bytes"], s["rx"]["packets"] + s["tx"]["packets"], retrans, drops


def ns_cpu_ms(namespaces):
    """User + system time of every process in these namespaces, with the
    children they have reaped (an rsync daemon's per-connection forks)."""
    ticks = 0
    for ns in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ticks += sum(int(x) for x in fields[11:15])
            except (OSError, IndexError):
                pass
    return ticks * 1000 / os.sysconf("SC_CLK_TCK")


def child_cpu_ms():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * 1000


def images(args):
    env = dict(os.environ, PHOENIX_DATA_DIR=args.data_dir)
    out = subprocess.run([args.phoenix, "images", "--json"], capture_output=True, text=True, env=env, timeout=10)
    if out.returncode:
        sys.exit(f"sync.py: `phoenix images --json` failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def wait_phoenix(args, size, t0):
    """Polls `phoenix images --json` every 20 ms until the entry named NAME
    with this size and a hash other than --old-hash is synced on the node."""
    name, last = os.path.basename(args.rename[1]), None
    while time.perf_counter() - t0 < args.timeout:
        for img in images(args):
            if img["name"] != name or img["size"] != size or img["hash"] == args.old_hash:
                continue
            node = next((n for n in img["nodes"] if n["node"] == args.node), None)
            last = img
            if node and node["state"] == "synced":
                return img, node
            if node and node["state"] == "failed":
                sys.exit(f"sync.py: Phoenix: {name} failed on {args.node}: {node.get('error')}")
        time.sleep(0.02)
    sys.exit(f"sync.py: Phoenix: {name} ({size} bytes) not synced on {args.node} within {args.timeout} s; last entry: {json.dumps(last)}")


def phoenix_logs(args, wall, size):
    """From the daemons' logs: when the master pushed the new catalog (after
    the rename, having indexed the file) and what the minion says it moved."""
    out = {}
    stamp = lambda line: datetime.datetime.fromisoformat(line.split()[0]).timestamp()
    with open(args.master_log) as f:
        pushed = [stamp(x) for x in f if "registry changed" in x and stamp(x) >= wall]
    if pushed:
        out["master_ms"] = (pushed[0] - wall) * 1000
    with open(args.minion_log) as f:
        moved = [x for x in f if "image synced" in x and f" size={size} " in x]
    if moved and (m := re.search(r"moved=(\d+)", moved[-1])):
        out["moved"] = int(m.group(1))
        out["own"] = f"moved {out['moved']} B (zstd batches; the minion's log)"
    return out


def measure(args):
    rec = dict(zip(("set", "tool", "round"), args.tag.split(",")))
    rec["v2_size"] = os.path.getsize(args.v2)
    n0, c0, k0 = counters(args.h2, args.ns), ns_cpu_ms(args.ns), child_cpu_ms()
    t0 = time.perf_counter()
    if args.rename:
        wall = time.time()
        os.rename(*args.rename)
        img, node = wait_phoenix(args, rec["v2_size"], t0)
        rec["ms"] = (time.perf_counter() - t0) * 1000
        rec["hash"] = img["hash"]
        rec.update(phoenix_logs(args, wall, rec["v2_size"]))
        out = os.path.join(args.minion_dir, "images", img["hash"]) if args.minion_dir else None
    else:
        p = subprocess.run(args.argv, capture_output=True, text=True, timeout=args.timeout)
        rec["ms"] = (time.perf_counter() - t0) * 1000
        if p.returncode:
            sys.exit(f"sync.py: {' '.join(args.argv)} exited with {p.returncode}:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        rec["own"] = own_figures(p.stdout + p.stderr)
        out = args.output
    time.sleep(0.2)  # the last ACKs, and the reaping of server-side forks
    n1 = counters(args.h2, args.ns)
    rec["bytes"], rec["packets"], rec["retrans"], rec["drops"] = (a - b for a, b in zip(n1, n0))
    rec["cpu_ms"] = ns_cpu_ms(args.ns) - c0 + (0 if args.rename else child_cpu_ms() - k0)
    if out and os.path.exists(out):
        t = time.perf_counter()
        with open(out, "rb") as f:
            os.fsync(f.fileno())
        rec["fsync_ms"] = (time.perf_counter() - t) * 1000
        if subprocess.run(["cmp", "-s", out, args.v2]).returncode:
            sys.exit(f"sync.py: {rec['tool']}: {out} differs from {args.v2}")
        rec["verified"] = True
    with open(args.results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if args.rename:
        print(rec["hash"])


def own_figures(text):
    """rsync's --stats and casync's -v figures, as they print them."""
    num = lambda pat: (m := re.search(pat, text)) and m.group(1).replace(",", "")
    if lit := num(r"Literal data: ([\d,]+)"):
        rx, tx = num(r"Total bytes received: ([\d,]+)"), num(r"Total bytes sent: ([\d,]+)")
        return f"literal data {lit} B, received {rx} B, sent {tx} B"
    if rem := num(r"Bytes used from remote store: (\S+)"):
        seed = num(r"Bytes used from local seed: (\S+)")
        return f"from the remote store {rem}, from the seed {seed}"
    return ""


# ---------------------------------------------------------------- report

ROWS = [
    ("copy", "full copy (curl, HTTP)"),
    ("rsync", "rsync (daemon, `rsync://`)"),
    ("rsync-z", "rsync `-z` (zstd)"),
    ("casync", "casync (HTTP store, v1 as seed)"),
    ("phoenix", "**Phoenix** (through its overlay)"),
    ("rsync-ov", "rsync through Phoenix's overlay"),
    ("copy-ov", "full copy through Phoenix's overlay"),
]
SETS = {"bin": "(a) 50 MiB binary-like file, 5 small edits + 4 KiB inserted", "oci": "(b) OCI image tar, 1 of 5 gzip layers rebuilt"}


def report(args):
    recs = [json.loads(line) for line in open(args.results)]
    med = lambda xs: statistics.median(xs) if xs else None
    for s, title in SETS.items():
        rs = [r for r in recs if r["set"] == s]
        if not rs:
            continue
        v2 = med([r["v2_size"] for r in rs])
        base = med([r["ms"] for r in rs if r["tool"] == "rsync"])
        print(f"\n#### {title} (v2: {v2 / 1e6:.1f} MB)\n")
        print("| tool | bytes on the wire (median) | ÷ v2 size | time (median, ms) | ÷ rsync time | CPU, both hosts (median, ms) |")
        print("|---|---:|---:|---:|---:|---:|")
        notes = []
        for tool, label in ROWS:
            tr = [r for r in rs if r["tool"] == tool]
            if not tr:
                continue
            b, ms, cpu = med([r["bytes"] for r in tr]), med([r["ms"] for r in tr]), med([r["cpu_ms"] for r in tr])
            ratio = f"{ms / base:.2f}×" if base else "–"
            print(f"| {label} | {b / 1e6:.3f} MB | {b / v2 * 100:.2f} % | {ms:.0f} | {ratio} | {cpu:.0f} |")
            rounds = "; ".join(f"{r['bytes'] / 1e6:.3f} MB in {r['ms']:.0f} ms, {r['packets']} packets, {r['retrans']} retransmits, {r['drops']} UDP drops" for r in tr)
            own = f"; own figures (round 1): {tr[0]['own']}" if tr[0].get("own") else ""
            fs = [r["fsync_ms"] for r in tr if "fsync_ms" in r]
            fsync = f"; fsync of the output after it: {med(fs):.0f} ms" if fs and tool != "phoenix" else ""
            notes.append(f"- {label}, rounds: {rounds}{fsync}{own}")
            if tool == "phoenix" and (split := [r["master_ms"] for r in tr if "master_ms" in r]):
                notes.append(f"  - of Phoenix's time, from the rename until the master pushed the new catalog (10 ms settling, hashing and chunking v2): median {med(split):.0f} ms; the rest is the minion's fetch, assembly and check, and the 20 ms polling")
        if v1 := [r for r in rs if r["tool"] == "phoenix-v1"]:
            b, ms = med([r["bytes"] for r in v1]), med([r["ms"] for r in v1])
            mv = med([r.get("moved", 0) for r in v1])
            notes.append(f"- Phoenix's sync of v1 before that (none of it on the minion: all of it moves): {b / 1e6:.3f} MB on the wire for {mv / 1e6:.3f} MB moved, {ms:.0f} ms (medians)")
        print()
        print("\n".join(notes))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("mkdata")
    p.add_argument("dir")
    p.add_argument("seed", type=int)
    p = sub.add_parser("serve")
    p.add_argument("dir")
    p.add_argument("port", type=int)
    p = sub.add_parser("measure")
    p.add_argument("--results", required=True)
    p.add_argument("--tag", required=True, help="SET,TOOL,ROUND")
    p.add_argument("--h2", required=True, help="host 2's namespace (its eth0 is counted)")
    p.add_argument("--ns", nargs="+", required=True, help="namespaces whose processes' CPU is counted")
    p.add_argument("--v2", required=True, help="the file the sync must deliver")
    p.add_argument("--output", help="where the tool writes it (verified, fsync timed)")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--rename", nargs=2, metavar=("SRC", "DST"), help="Phoenix: rename SRC to DST, wait for the minion")
    p.add_argument("--phoenix")
    p.add_argument("--data-dir")
    p.add_argument("--minion-dir")
    p.add_argument("--master-log")
    p.add_argument("--minion-log")
    p.add_argument("--node", default="m1")
    p.add_argument("--old-hash", default="-")
    p.add_argument("argv", nargs="*")
    p = sub.add_parser("report")
    p.add_argument("results")
    args = ap.parse_args()
    {"mkdata": mkdata, "serve": serve, "measure": measure, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
