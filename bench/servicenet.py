#!/usr/bin/python3
"""Helpers for bench/servicenet.sh (only the standard library).

Subcommands:
  rtt server HOST PORT    answer one-byte pings, one connection after another
                          (also pushed to the cluster and run as a service)
  rtt client HOST PORT    the median round trip of 2000 one-byte exchanges, in µs
  deploys ...             deploy -> running of services deployed one by one,
                          several series interleaved (JSON: ms per series)
  many ...                deploy COUNT daemons on one minion in one file; time,
                          the minion's RSS, kernel memory; then one by one more;
                          then delete them all (JSON)
  report DIR              the markdown section from the results in DIR
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time


# ---------------------------------------------------------------- ping-pong


def rtt(args):
    fam = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    if args.mode == "server":
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((args.host, args.port))
        s.listen(4)
        while True:
            c, _ = s.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while b := c.recv(1):
                c.sendall(b)
            c.close()
    c = socket.create_connection((args.host, args.port), timeout=10)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(100):  # warm-up: caches, the path MTU, the scheduler
        c.sendall(b"x")
        c.recv(1)
    rtts = []
    for _ in range(args.n):
        t = time.perf_counter_ns()
        c.sendall(b"x")
        c.recv(1)
        rtts.append(time.perf_counter_ns() - t)
    print(round(statistics.median(rtts) / 1000, 1))


# ---------------------------------------------------------------- deploys


def phoenix(args, *cli, timeout=None):
    return subprocess.run([args.phoenix, *cli], capture_output=True, text=True, timeout=timeout)


# Two ways a deploy can end before its services run, where they still do
# later: the minion's reaper collects an `nft` child before phoenix_net waits
# for it ("waiting for nft: No child processes"), which fails that start until
# a retry after backoff; or a minion busy bringing up many namespaces misses
# its heartbeats and the master calls it unreachable until it reconnects.
# Such a deploy is waited for until its services run, timed whole, and marked.
TRANSIENT = ["No child processes", "unreachable"]


def deploy_file(args, path, names, timeout=60):
    """Deploys a spec file; (ms until every service in `names` runs, retried?)."""
    t = time.perf_counter()
    r = phoenix(args, "deploy", path, "--timeout-s", str(timeout))
    if r.returncode == 0:
        return round((time.perf_counter() - t) * 1000, 2), False
    said = r.stdout + r.stderr
    if not any(t in said for t in TRANSIENT):
        sys.exit(f"deploy {path} failed: {said[-3000:]}")
    want = set(names)
    while time.perf_counter() - t < timeout:
        s = phoenix(args, "services", "--json")
        if s.returncode == 0:
            running = {v["name"] for v in json.loads(s.stdout) if v.get("state") == "running"}
            if want <= running:
                return round((time.perf_counter() - t) * 1000, 2), True
        time.sleep(0.005 if len(want) == 1 else 0.2)
    sys.exit(f"deploy {path}: not all running after {timeout} s (first failure: {said[-1000:]})")


def deploy_one(args, spec, name):
    path = os.path.join(args.work, f"spec-{name}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    return deploy_file(args, path, [name])


def service_spec(kind, machine, name):
    spec = {"machine": machine, "name": name, "args": ["--port", "0"]}
    if kind == "binary":
        spec.update(image="testy", type="binary")
    else:
        spec.update(image="app.tar", type="docker")
    return spec


def deploys(args):
    # (kind, mode, machine, short name)
    series = [
        ("binary", "netns", args.netns_machine, "bn"),
        ("binary", "host", args.host_machine, "bh"),
        ("container", "netns", args.netns_machine, "cn"),
        ("container", "host", args.host_machine, "ch"),
    ]
    times = {f"{k} {m}": [] for k, m, _, _ in series}
    retried = {k: [] for k in times}
    # Sample 0 is a warm-up: a container's first start unpacks its image.
    for i in range(args.n + 1):
        k = i % len(series)
        for kind, mode, machine, short in series[k:] + series[:k]:  # who goes first rotates
            time.sleep(args.gap)
            ms, again = deploy_one(args, service_spec(kind, machine, f"sn-{short}{i}"), f"sn-{short}{i}")
            if i > 0:
                times[f"{kind} {mode}"].append(ms)
                if again:
                    retried[f"{kind} {mode}"].append(ms)
    print(json.dumps({"times": times, "retried": retried}))


def deploy_cmd(args):
    with open(args.file) as f:
        specs = json.load(f)
    specs = specs if isinstance(specs, list) else [specs]
    ms, retried = deploy_file(args, args.file, [s["name"] for s in specs])
    print(ms, "retried" if retried else "")


# ---------------------------------------------------------------- many services

MEM_KEYS = ["MemAvailable", "SUnreclaim", "Percpu"]


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in MEM_KEYS:
                out[k] = int(v.split()[0])
    return out


def status_kb(pid, key="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def many(args):
    m, n = args.machine, args.count
    names = [f"sn-{m}-{i:04}" for i in range(n)]
    specs = [{"machine": m, "name": s, "image": "sleep", "type": "binary", "args": ["infinity"]} for s in names]
    path = os.path.join(args.work, f"spec-many-{m}.json")
    with open(path, "w") as f:
        json.dump(specs, f)
    res = {"count": n}
    time.sleep(3)
    res["rss_idle_kb"] = status_kb(args.pid)
    res["threads_idle"] = status_kb(args.pid, "Threads")
    res["mem_before"] = meminfo()
    # The minion's peak thread count and RSS while they come up.
    peak = {"threads": 0, "rss": 0}
    done = threading.Event()

    def sample():
        while not done.wait(0.1):
            try:
                peak["threads"] = max(peak["threads"], status_kb(args.pid, "Threads"))
                peak["rss"] = max(peak["rss"], status_kb(args.pid))
            except OSError:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ms, res["bringup_retried"] = deploy_file(args, path, names, timeout=900)
    done.set()
    sampler.join()
    res["bringup_s"] = round(ms / 1000, 3)
    res["threads_peak"], res["rss_peak_kb"] = peak["threads"], peak["rss"]
    time.sleep(3)
    res["rss_kb"] = status_kb(args.pid)
    res["fds"] = len(os.listdir(f"/proc/{args.pid}/fd"))
    res["mem_with"] = meminfo()
    veths = subprocess.run(["ip", "-n", args.ns, "-o", "link", "show", "type", "veth"], capture_output=True, text=True)
    res["veths"] = sum(1 for line in veths.stdout.splitlines() if " eth0@" not in line)
    # One more service at a time, beside them (what a deploy costs on a busy minion).
    more, again = [], []
    for i in range(args.more):
        time.sleep(0.2)
        ms, retried = deploy_one(args, service_spec("binary", m, f"sn-{m}-x{i}"), f"sn-{m}-x{i}")
        more.append(ms)
        if retried:
            again.append(ms)
        names.append(f"sn-{m}-x{i}")
    res["more_ms"], res["more_retried"] = more, again
    # Deleting them one by one, as an operator would.
    t = time.perf_counter()
    for s in names:
        r = phoenix(args, "del", s, "--timeout-s", "60")
        if r.returncode != 0:
            sys.exit(f"del {s} failed: {r.stdout}{r.stderr}")
    res["del_s"] = round(time.perf_counter() - t, 3)
    time.sleep(3)
    res["mem_after"] = meminfo()
    res["rss_after_kb"] = status_kb(args.pid)
    print(json.dumps(res))


# ---------------------------------------------------------------- report


def med(v):
    return statistics.median(v) if v else float("nan")


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p * len(v)))]


def report(args):
    # Imported here: this file is also pushed alone as the ping-pong service,
    # which runs without benchlib.py beside it.
    import benchlib

    d = args.dir

    def load(name):
        with open(os.path.join(d, name)) as f:
            return json.load(f)

    meta = load("meta.json")
    net = {}  # path -> {"tp": [...], "rtt": [...]}
    with open(os.path.join(d, "net.txt")) as f:
        for line in f:
            path, what, value = line.split()
            net.setdefault(path, {"tp": [], "rtt": []})[what].append(float(value))
    deps = load("deploys.json")
    dep, retried = deps["times"], deps["retried"]
    many = {mode: load(f"many-{mode}.json") for mode in ["netns", "host"]}
    out = []
    p = out.append
    p(
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `bench/servicenet.sh {meta['args']}`: "
        f"{meta['secs']} s per iperf3 run and {meta['rounds']} rounds (medians), {meta['deploys']} deploys of each kind, "
        f"{meta['services']} services; took {meta['took']} s"
    )
    p(f"- Machine: {benchlib.machine()}")
    p(
        f"- Phoenix: release build of {meta['version']} (git {meta['git']}); WireGuard {meta['wireguard']}; "
        f"minions with `--min-uptime-ms 0`; iperf3 {meta['iperf']}, nft {meta['nft']}"
    )
    p("")
    p("**Between two machines** (m2 → m1), medians of the rounds:")
    p("")
    p("| path | throughput (Gbit/s) | TCP round trip (µs) |")
    p("|---|---:|---:|")
    rows = [
        ("plain link (m2's host → m1's host: veth, bridge, veth)", "plain"),
        ("bare overlay (m2's host → m1's overlay address)", "overlay"),
        ("service → service (m2's namespace → overlay → m1's namespace)", "service"),
        ("service → service on one machine (both on m1: two veths, no overlay)", "local"),
    ]
    for label, k in rows:
        p(f"| {label} | {med(net[k]['tp']):.2f} | {med(net[k]['rtt']):.0f} |")
    p("")
    to, ts = med(net["overlay"]["tp"]), med(net["service"]["tp"])
    lo, ls = med(net["overlay"]["rtt"]), med(net["service"]["rtt"])
    p(
        f"- Service to service against the bare overlay: throughput {ts / to:.2f}×, round trip {ls / lo:.2f}× "
        f"({ls - lo:+.0f} µs). The bare overlay against the plain link: throughput {to / med(net['plain']['tp']):.2f}×, "
        f"round trip {lo / med(net['plain']['rtt']):.1f}×."
    )
    rounds = lambda what: ", ".join(f"{k} [{' '.join(f'{x:g}' for x in net[k][what])}]" for _, k in rows)
    p(f"- All rounds, Gbit/s: {rounds('tp')}; µs: {rounds('rtt')}")
    p("")
    p(
        f"**Deploy → running**, one service per `phoenix deploy` (testy; the container: a {meta['image']} OCI "
        f"image of testy and busybox), {meta['deploys']} of each, interleaved:"
    )
    p("")
    p("| kind | namespace per service, p50 | `--service-network host`, p50 | added by the namespace (p50 − p50) | p90, netns / host |")
    p("|---|---:|---:|---:|---:|")
    for kind in ["binary", "container"]:
        a, b = dep[f"{kind} netns"], dep[f"{kind} host"]
        p(
            f"| {kind} | {med(a):.1f} ms | {med(b):.1f} ms | {med(a) - med(b):+.1f} ms | "
            f"{pct(a, .9):.1f} / {pct(b, .9):.1f} ms |"
        )
    p("")
    hit = {k: v for k, v in retried.items() if v}
    if hit:
        first = {k: [x for x in v if x not in retried[k]] for k, v in dep.items()}
        p(
            "- Samples whose `phoenix deploy` ended before the service ran (its first start failed on the nft race, "
            "see the notes) and that ran after a retry, timed until then and counted above: "
            + "; ".join(f"{k}: {len(v)} of {len(dep[k])} (p50 {med(v):.0f} ms)" for k, v in hit.items())
            + ". Without them, p50: "
            + "; ".join(f"{k} {med(first[k]):.1f} ms" for k in dep if first[k])
            + "."
        )
        p("")
    nb = meta.get("netns_bench", "").strip()
    if nb:
        p(
            "The parts alone (`cargo run --release -p phoenix-net --example netns_bench 100 1000`, in a throwaway "
            "namespace; the firewall rebuilt with 5 links a service):"
        )
        p("")
        p("```text")
        p(nb)
        p("```")
        p("")
    n = meta["services"]
    p(f"**{n} services on one minion** (`sleep infinity` daemons in one spec file, then removed one by one):")
    p("")
    p("| | namespace per service | `--service-network host` |")
    p("|---|---:|---:|")

    def row(label, f):
        p(f"| {label} | {f(many['netns'])} | {f(many['host'])} |")

    def drop(r, key, a="mem_before", b="mem_with"):
        return r[a][key] - r[b][key]

    row("deploy → all running", lambda r: f"{r['bringup_s']:.2f} s" + (" ¹" if r.get("bringup_retried") else ""))
    row("minion RSS, idle → with them", lambda r: f"{r['rss_idle_kb'] / 1024:.1f} → {r['rss_kb'] / 1024:.1f} MiB")
    row("minion RSS per service", lambda r: f"{(r['rss_kb'] - r['rss_idle_kb']) / n:.0f} KiB")
    row("minion RSS and threads at their peak during the bring-up", lambda r: f"{r['rss_peak_kb'] / 1024:.1f} MiB, {r['threads_peak']} threads")
    row("minion's open descriptors", lambda r: f"{r['fds']}")
    row(
        "host MemAvailable drop (the services' processes, cgroups and namespaces)",
        lambda r: f"{drop(r, 'MemAvailable') / 1024:.0f} MiB ({drop(r, 'MemAvailable') / n:.0f} KiB each)",
    )
    row(
        "kernel unreclaimable slab + per-CPU growth",
        lambda r: f"{-(drop(r, 'SUnreclaim') + drop(r, 'Percpu')) / 1024:.0f} MiB "
        f"({-(drop(r, 'SUnreclaim') + drop(r, 'Percpu')) / n:.0f} KiB each)",
    )
    row("service veths on the minion's host", lambda r: f"{r['veths']}")
    row(
        f"one more service beside them, deploy → running (p50 of {len(many['netns']['more_ms'])})",
        lambda r: f"{med(r['more_ms']):.1f} ms",
    )
    row(f"deleting them one by one (`phoenix del` × {n})", lambda r: f"{r['del_s']:.1f} s")
    row(
        "kernel unreclaimable slab + per-CPU after deleting them, against before",
        lambda r: f"{-(drop(r, 'SUnreclaim', b='mem_after') + drop(r, 'Percpu', b='mem_after')) / 1024:+.0f} MiB",
    )
    p("")
    if any(r.get("bringup_retried") for r in many.values()):
        p(
            "¹ `phoenix deploy` gave up before they all ran (a start failed on the nft race, or the minion was "
            "unreachable for a while: see the notes), so this is the time until `phoenix services` listed them all "
            "running."
        )
        p("")
    p("- Raw deploy → running samples (ms): " + "; ".join(f"{k} [{' '.join(f'{x:g}' for x in v)}]" for k, v in dep.items()))
    p("- One more service beside them (ms): " + "; ".join(f"{k} [{' '.join(f'{x:g}' for x in many[k]['more_ms'])}]" for k in many)
      + "".join(f"; {k}: {len(many[k]['more_retried'])} after the nft race" for k in many if many[k].get("more_retried")))
    for line in meta.get("notes", []):
        p(f"- {line}")
    print("\n".join(out))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rtt")
    r.add_argument("mode", choices=["server", "client"])
    r.add_argument("host")
    r.add_argument("port", type=int)
    r.add_argument("--n", type=int, default=2000)
    d = sub.add_parser("deploys")
    d.add_argument("--phoenix", required=True)
    d.add_argument("--work", required=True)
    d.add_argument("--n", type=int, default=20)
    d.add_argument("--gap", type=float, default=0.2, help="seconds of quiet before each sample")
    d.add_argument("--netns-machine", default="m1")
    d.add_argument("--host-machine", default="m3")
    m = sub.add_parser("many")
    m.add_argument("--phoenix", required=True)
    m.add_argument("--work", required=True)
    m.add_argument("--machine", required=True)
    m.add_argument("--ns", required=True, help="the minion's host namespace (to count veths)")
    m.add_argument("--pid", type=int, required=True, help="the minion's pid")
    m.add_argument("--count", type=int, default=1000)
    m.add_argument("--more", type=int, default=5)
    f = sub.add_parser("deploy", help="deploy a spec file, waiting past the nft race; prints ms")
    f.add_argument("--phoenix", required=True)
    f.add_argument("file")
    rp = sub.add_parser("report")
    rp.add_argument("dir")
    a = ap.parse_args()
    {"rtt": rtt, "deploys": deploys, "many": many, "deploy": deploy_cmd, "report": report}[a.cmd](a)


if __name__ == "__main__":
    main()
