#!/usr/bin/python3
"""Helpers for bench/rollout.sh (only the standard library).

Subcommands:
  updates ...        while a load runs: `phoenix update` of one or more
                     services every INTERVAL s, each with a new env var;
                     JSON: every update's start, wall time, exit code
  wrk FILE           parse wrk's output (with --latency) into JSON
  report DIR         the markdown section from the results in DIR
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import benchlib


# ---------------------------------------------------------------- updates


def updates(args):
    """`phoenix update` every --interval s (start to start; at once after a
    slow one), from --first s on, none started after --last s; the specs
    take turns (one service per update). Every update must succeed."""
    specs = [json.loads(s) for s in args.spec]
    t0 = time.time()
    out, n = [], 0
    while True:
        due = t0 + args.first + n * args.interval
        now = time.time()
        if due - t0 > args.last:
            break
        if due > now:
            time.sleep(due - now)
        spec = dict(specs[n % len(specs)])
        spec["env"] = [e for e in spec.get("env", []) if not e.startswith("VERSION=")] + [
            f"VERSION={args.tag}-{n + 1}"
        ]
        path = os.path.join(args.work, f"update-{args.tag}-{n + 1}.json")
        with open(path, "w") as f:
            json.dump([spec], f)
        start = time.time()
        r = subprocess.run(
            [args.phoenix, "update", path, "--timeout-s", "120"], capture_output=True, text=True
        )
        took = time.time() - start
        out.append(
            {
                "service": spec["name"],
                "start": start,
                "ms": round(took * 1000, 1),
                "rc": r.returncode,
                "output": (r.stdout + r.stderr)[-2000:] if r.returncode else (r.stdout + r.stderr)[-300:],
            }
        )
        print(
            f"rollout.py: update {n + 1} of {spec['name']}: exit {r.returncode} in {took * 1000:.0f} ms",
            file=sys.stderr,
        )
        n += 1
        if r.returncode != 0 and args.stop_on_failure:
            break
    json.dump({"t0": t0, "updates": out}, sys.stdout)


# ---------------------------------------------------------------- wrk


def ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(text):
    r = {"requests": None, "secs": None, "rps": None, "non2xx": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0}
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", text)
    if m:
        r["requests"] = int(m.group(1))
        r["secs"] = ms(m.group(2), m.group(3)) / 1000
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r["rps"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        r["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r["connect"], r["read"], r["write"], r["timeout"] = map(int, m.groups())
    for p in ["50", "75", "90", "99"]:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        r[f"p{p}"] = ms(m.group(1), m.group(2)) if m else None
    r["socket"] = r["connect"] + r["read"] + r["write"] + r["timeout"]
    r["failed"] = r["non2xx"] + r["socket"]
    if r["requests"] is None:
        sys.exit(f"rollout.py: cannot parse wrk's output:\n{text}")
    return r


def wrk(args):
    with open(args.file) as f:
        json.dump(parse_wrk(f.read()), sys.stdout)


# ---------------------------------------------------------------- report


def med(v):
    return statistics.median(v) if v else float("nan")


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p * len(v)))] if v else float("nan")


def report(args):
    d = args.dir

    def load(name):
        with open(os.path.join(d, name)) as f:
            return json.load(f)

    meta = load("meta.json")
    runs = meta["runs"]  # [{"id", "label", "slow": bool, "updates": bool}]
    out = []
    p = out.append
    p(
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `{meta['command']}`: "
        f"{meta['secs']} s of load a run, an update every {meta['interval']} s; took {meta['took']} s"
    )
    p(f"- Machine: {benchlib.machine()}")
    p(
        f"- Phoenix: {meta['version']} (git {meta['git']}), release build; a master (proxy on port 80, plain HTTP, "
        f"`--drain-timeout-ms` {meta['drain']}) and minions m1, m2 in network namespaces on one bridge, a namespace "
        f"per service; wrk {meta['wrk']} in a fourth namespace"
    )
    p(
        f"- Load: `{meta['wrk_main']}`; with the slow endpoint also `{meta['wrk_slow']}` "
        f"(8 requests of 100 ms always in flight). A failure is a non-2xx response or a socket error "
        f"(connect, read, write, timeout: wrk's timeout is 2 s)."
    )
    p("")
    p(
        "| run | instances | updates done (failed) | update p50 / max (s) | requests | failed: non-2xx | "
        "failed: socket errors | requests/s | p50 (ms) | p99 (ms) | slow requests (failed) | slow p99 (ms) |"
    )
    p("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    tot = {"requests": 0, "failed": 0, "updates": 0, "bad": 0}
    all_ms = []
    for r in runs:
        w = load(f"wrk-{r['id']}.json")
        s = load(f"wrk-{r['id']}-slow.json") if r["slow"] else None
        u = load(f"updates-{r['id']}.json")["updates"] if r["updates"] else []
        done = [x for x in u if x["rc"] == 0]
        bad = [x for x in u if x["rc"] != 0]
        ums = [x["ms"] / 1000 for x in u]
        if r["updates"]:
            tot["requests"] += w["requests"] + (s["requests"] if s else 0)
            tot["failed"] += w["failed"] + (s["failed"] if s else 0)
            tot["updates"] += len(done)
            tot["bad"] += len(bad)
            all_ms += ums
        sock = w["socket"]
        sock_s = f"{sock}" + (
            f" (connect {w['connect']}, read {w['read']}, write {w['write']}, timeout {w['timeout']})" if sock else ""
        )
        p(
            f"| {r['label']} | {r['instances']} | "
            + (f"{len(done)} ({len(bad)})" if r["updates"] else "–")
            + " | "
            + (f"{med(ums):.2f} / {max(ums):.2f}" if ums else "–")
            + f" | {w['requests']:,} | {w['non2xx']} | {sock_s} | {w['rps']:,.0f} | {w['p50']:.2f} | {w['p99']:.2f} | "
            + (f"{s['requests']:,} ({s['failed']})" if s else "–")
            + " | "
            + (f"{s['p99']:.1f}" if s else "–")
            + " |"
        )
    p("")
    verdict = "met" if tot["failed"] == 0 and tot["requests"] >= 100_000 and tot["bad"] == 0 else "**not met**"
    p(
        f"**With updates, all runs together: {tot['failed']} failed of {tot['requests']:,} requests "
        f"during {tot['updates']} updates ({tot['bad']} updates failed); update wall time p50 "
        f"{med(all_ms):.2f} s, p90 {pct(all_ms, 0.9):.2f} s.** Target (0 failed of 100,000): {verdict}."
    )
    p("")
    for note in meta.get("notes", []):
        p(f"- {note}")
    for r in runs:
        if not r["updates"]:
            continue
        u = load(f"updates-{r['id']}.json")["updates"]
        p(
            f"- Update wall times, {r['label']} (s): "
            + " ".join(f"{x['ms'] / 1000:.2f}" + ("✗" if x["rc"] else "") for x in u)
        )
    print("\n".join(out))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("updates")
    u.add_argument("--phoenix", required=True)
    u.add_argument("--work", required=True)
    u.add_argument("--tag", required=True)
    u.add_argument("--spec", action="append", required=True, help="a service's spec (JSON); repeat to alternate")
    u.add_argument("--interval", type=float, default=3.0)
    u.add_argument("--first", type=float, default=2.0)
    u.add_argument("--last", type=float, required=True)
    u.add_argument("--stop-on-failure", action="store_true")
    u.set_defaults(fn=updates)
    w = sub.add_parser("wrk")
    w.add_argument("file")
    w.set_defaults(fn=wrk)
    r = sub.add_parser("report")
    r.add_argument("dir")
    r.set_defaults(fn=report)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
