#!/usr/bin/env python3
"""Helper of bench/fanout.sh: API latency of the master while minions sync.

  fanout.py measure SOCKET NAME SIZE NODES...   prints one JSON line
  fanout.py report < LINES                      the markdown rows
"""
import json
import socket
import statistics
import struct
import sys
import threading
import time


def call(sock_path, req):
    """One API request over the master's Unix socket; returns the final body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        body = json.dumps(req).encode()
        s.sendall(struct.pack(">I", len(body)) + body)
        f = s.makefile("rb")
        while True:
            head = f.read(4)
            if len(head) < 4:
                raise RuntimeError(f"connection closed on {req}")
            (n,) = struct.unpack(">I", head)
            msg = json.loads(f.read(n))
            if msg.get("reply") == "ok":
                return msg["body"]
            if msg.get("reply") == "error":
                raise RuntimeError(msg["message"])


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def latencies(sock_path, stop, out):
    """`services` calls back to back (10 ms apart) until `stop` is set."""
    while not stop.is_set():
        t = time.perf_counter()
        call(sock_path, {"req": "services"})
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(0.01)


def measure(sock_path, name, size, nodes):
    # Idle: the same calls with nothing to sync.
    idle = []
    stop = threading.Event()
    th = threading.Thread(target=latencies, args=(sock_path, stop, idle))
    th.start()
    time.sleep(3)
    stop.set()
    th.join()
    # Loaded: from now until every node holds the new image (it is renamed
    # into the registry by the caller right after this line is read).
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    busy = []
    stop = threading.Event()
    th = threading.Thread(target=latencies, args=(sock_path, stop, busy))
    th.start()
    unreachable = set()
    done = {}
    deadline = t0 + 300
    while len(done) < len(nodes) and time.perf_counter() < deadline:
        for img in call(sock_path, {"req": "images"}):
            if img["name"] != name or img["size"] != size:
                continue
            for n in img["nodes"]:
                if n["state"] == "synced" and n["node"] not in done:
                    done[n["node"]] = (time.perf_counter() - t0) * 1000
        for n in call(sock_path, {"req": "nodes"}):
            if n["state"] != "reachable":
                unreachable.add(n["name"])
        time.sleep(0.05)
    stop.set()
    th.join()
    if len(done) < len(nodes):
        raise SystemExit(f"fanout.py: only {sorted(done)} synced within 300 s")
    print(json.dumps({
        "idle_p50": statistics.median(idle), "idle_p99": pct(idle, 99), "idle_n": len(idle),
        "busy_p50": statistics.median(busy), "busy_p99": pct(busy, 99), "busy_max": max(busy),
        "busy_n": len(busy), "synced_ms": done, "unreachable": sorted(unreachable),
    }), flush=True)


def report(lines):
    rs = [json.loads(line) for line in lines if line.strip()]

    def med(k):
        return statistics.median(r[k] for r in rs)

    def last(r):
        return max(r["synced_ms"].values()) / 1000

    n = len(rs[0]["synced_ms"])
    secs = statistics.median(last(r) for r in rs)
    bad = sorted({u for r in rs for u in r["unreachable"]})
    rounds = "; ".join(
        f"p50 {r['busy_p50']:.2f} / p99 {r['busy_p99']:.2f} ms over {r['busy_n']} calls, "
        f"synced in {last(r):.1f} s" for r in rs)
    print(f"| master API (`services`), idle | {med('idle_p50'):.2f} | {med('idle_p99'):.2f} | |")
    print(f"| the same, while {n} minions sync 256 MiB each | {med('busy_p50'):.2f} | "
          f"{med('busy_p99'):.2f} | {med('busy_max'):.1f} |")
    print()
    print(f"- p50 while syncing ÷ idle: {med('busy_p50') / med('idle_p50'):.2f}×; "
          f"p99: {med('busy_p99') / med('idle_p99'):.2f}×")
    print(f"- last minion synced after {secs:.1f} s (median): {n} × 256 MiB = "
          f"{n * 256 / secs:.0f} MiB/s out of the master, through the overlay")
    print(f"- nodes unreachable during a sync: {', '.join(bad) if bad else 'none'}")
    print(f"- all rounds: {rounds}")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "report":
        report(sys.stdin)
    elif len(sys.argv) >= 6 and sys.argv[1] == "measure":
        measure(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
    else:
        raise SystemExit(__doc__)
