"""Abuse guard and response cache benchmark.

    python3 bench/bench_guard.py [--seconds 5] [--connections 50] [--rounds 3] [--keys 1000000]

1. hello req/s with the guard on against the guard off, in the same run: the server pinned to
   CPU 0, wrk (Debian's package; installed if missing) to CPU 1; on and off alternate for
   ``--rounds`` rounds and the median counts. wrk is one client at full speed, so "on" means the
   shipped limits with the rates raised out of reach: every request is checked against the
   site-wide and the per-path bucket (and the default exemptions), but none is ever refused.
   wrk connects from 127.0.0.1, which the shipped lists trust and allow (so the guard would wave
   it through): "on" lists 127.0.0.2 and ::1 instead, the same shape and lookup cost, leaving
   wrk an ordinary client.
2. Memory: ``--keys`` distinct client addresses pass through the guard's per-request check
   (site-wide and per-path buckets) with the shipped caps, in a fresh process; RSS growth is
   measured twice: with the real clock (idle buckets expire as a side effect of use) and with a
   frozen clock (no bucket ever refills, so both tables fill to their caps: the worst case).
3. A handler that renders a 200-row HTML table, with and without ``@cached``: req/s.

Writes a markdown report to stdout and to bench/results/guard.md.
"""
import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from bench_http import ensure_wrk, start, stop, wrk  # noqa: E402  (same directory)

OUT_OF_REACH = ["--limits-client-rate-per-s", "1e9", "--limits-client-burst", "1000000000",
                "--limits-route-rate-per-s", "1e9", "--limits-route-burst", "1000000000"]
# The shipped loopback lists with wrk's 127.0.0.1 swapped for a neighbour: checked, not waved on.
LOOPBACK_NOT_TRUSTED = ["--limits-trusted-proxies", "127.0.0.2 ::1",
                        "--limits-allow-cidrs", "127.0.0.2 ::1"]


# --- 1. guard on against off ------------------------------------------------------------------

def guard_on_off(args, workdir):
    base = [sys.executable, "server.py", "--port", "0", "--access-log", "off",
            "--max-connections-per-ip", "4096"]
    variants = {"on": base + OUT_OF_REACH + LOOPBACK_NOT_TRUSTED,
                "off": base + ["--limits-enabled", "off"]}
    results = {"on": [], "off": []}
    for round_number in range(args.rounds):
        for name in (("on", "off") if round_number % 2 == 0 else ("off", "on")):
            data = os.path.join(workdir, "data-%s-%d" % (name, round_number))
            process, url = start(variants[name] + ["--data-dir", data], workdir)
            try:
                wrk(url + "/hello", 1, args.connections)   # warm-up
                cpu_before = cpu_seconds(process.pid)
                result = wrk(url + "/hello", args.seconds, args.connections)
                # CPU per request: on a shared box throughput swings with the neighbours,
                # the server's own CPU time per request much less
                result["cpu_us"] = ((cpu_seconds(process.pid) - cpu_before) * 1e6
                                    / max(1.0, result["rps"] * args.seconds))
                results[name].append(result)
            finally:
                stop(process)
    return results


def cpu_seconds(pid):
    """User + system CPU time of a process and all its threads (/proc/PID/stat)."""
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- 2. memory of a million clients -------------------------------------------------------------

def memory_child(keys, frozen):
    """Runs in a fresh process: print RSS before and after ``keys`` clients are checked."""
    import server
    from handlers._core import Headers, Request
    from onebox.guard import Guard

    config = server.load_config(os.path.join(ROOT, "setup.cfg"))
    clock = (lambda: 1000.0) if frozen else time.monotonic
    guard = Guard(config.guard, None, None, clock=clock)
    headers = Headers({"host": ["x"], "user-agent": ["bench"]})
    before = vm_rss_mb()
    started = time.perf_counter()
    refused = 0
    for n in range(keys):
        ip = "10.%d.%d.%d" % (n >> 16 & 255, n >> 8 & 255, n & 255) if n < 1 << 24 else str(n)
        request = Request("GET", "/hello", "/hello", ["hello"], "", headers, ip)
        if guard.check(request, guard.key_of(ip)) is not None:
            refused += 1
    elapsed = time.perf_counter() - started
    stats = guard.stats()
    print("%.1f %.1f %.3f %d %d %d %d %d" % (
        before, vm_rss_mb(), elapsed * 1e6 / keys, stats["clients"]["keys"],
        stats["clients"]["max_keys"], stats["routes"]["keys"], stats["routes"]["max_keys"],
        refused))


def vm_rss_mb():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1)) / 1024


def memory(args):
    rows = {}
    for label, frozen in (("real clock", False), ("frozen clock (tables at their caps)", True)):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(args.keys)]
                             + (["--frozen"] if frozen else []), capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout.split()
        before, after, us, clients, client_cap, routes, route_cap, refused = out
        rows[label] = dict(before=float(before), after=float(after), us=float(us),
                           clients=int(clients), client_cap=int(client_cap), routes=int(routes),
                           route_cap=int(route_cap), refused=int(refused))
    return rows


# --- 3. cached against uncached ---------------------------------------------------------------

def render_rows(request):
    """A page of the kind a small site renders per request: a 200-row table from data."""
    rows = [{"id": n, "name": "item %d" % n, "price": n * 1.25, "tags": ["a", "b", str(n % 7)]}
            for n in range(200)]
    body = ["<!doctype html><title>items</title><table>"]
    for row in rows:
        body.append("<tr><td>%d</td><td>%s</td><td>%.2f</td><td>%s</td></tr>"
                    % (row["id"], row["name"], row["price"], ", ".join(row["tags"])))
    body.append("</table>")
    from handlers._core import html_response
    return html_response("".join(body))


def serve_cache_demo(data_dir):
    """Runs as the server for part 3: /render and /render-cached, limits out of reach."""
    import server
    from handlers._cache import cached

    config = {"limits.client_rate_per_s": 1e9, "limits.client_burst": 10 ** 9,
              "limits.route_rate_per_s": 1e9, "limits.route_burst": 10 ** 9,
              "access_log": False}
    instance = server.make_server(port=0, data_dir=data_dir, config=config, routes=[
        ("GET", "/render", render_rows),
        ("GET", "/render-cached", cached(ttl_s=60)(render_rows))])
    signal.signal(signal.SIGTERM, lambda *_: instance.begin_shutdown())
    print("listening on %s" % instance.url, flush=True)
    try:
        instance.serve_forever()
    finally:
        instance.server_close()


def cache_speed(args, workdir):
    process, url = start([sys.executable, __file__, "--serve-cache-demo",
                          os.path.join(workdir, "data-cache")], workdir)
    try:
        results = {}
        for path in ("/render", "/render-cached"):
            wrk(url + path, 1, args.connections)
            results[path] = wrk(url + path, args.seconds, args.connections)
        return results
    finally:
        stop(process)


# --- report -------------------------------------------------------------------------------------

def render(args, on_off, mem, cache):
    med = {name: statistics.median(r["rps"] for r in runs) for name, runs in on_off.items()}
    p99 = {name: statistics.median(r["p99"] for r in runs) for name, runs in on_off.items()}
    lines = ["wrk -t1 -c%d -d%ds, server on CPU 0, wrk on CPU 1; Python %s; median of %d "
             "interleaved rounds" % (args.connections, args.seconds, sys.version.split()[0],
                                     args.rounds), "",
             "## hello, guard on (shipped limits, rates out of reach: checked, never refused) "
             "against off", "",
             "| guard | req/s (each round) | median req/s | p99 ms | server CPU us/request "
             "(median) | non-2xx |",
             "|---|---|---:|---:|---:|---:|"]
    cpu = {name: statistics.median(r["cpu_us"] for r in runs) for name, runs in on_off.items()}
    for name in ("on", "off"):
        runs = on_off[name]
        lines.append("| %s | %s | %.0f | %.2f | %.1f | %d |" % (
            name, " / ".join("%.0f" % r["rps"] for r in runs), med[name], p99[name],
            cpu[name], sum(r["non2xx"] for r in runs)))
    lines += ["", "on/off by req/s: **%.3fx**; by server CPU per request (off/on): **%.3fx** "
              "(target >= 0.9x)" % (med["on"] / med["off"], cpu["off"] / cpu["on"]), "",
              "## memory: %s distinct client addresses through the guard's check, default caps"
              % format(args.keys, ","), "",
              "| clock | RSS before MB | RSS after MB | growth MB | site-wide keys / cap | "
              "per-path keys / cap | us per key (making the request too) | refused |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, row in mem.items():
        lines.append("| %s | %.1f | %.1f | %.1f | %d / %d | %d / %d | %.2f | %d |" % (
            label, row["before"], row["after"], row["after"] - row["before"], row["clients"],
            row["client_cap"], row["routes"], row["route_cap"], row["us"], row["refused"]))
    worst = mem["frozen clock (tables at their caps)"]
    per_key = (worst["after"] - worst["before"]) * 1024 * 1024 / max(
        1, worst["clients"] + worst["routes"])
    lines += ["", "worst case: ~%.0f bytes per tracked bucket" % per_key, "",
              "## a handler rendering a 200-row HTML table", "",
              "| handler | req/s | p50 ms | p99 ms | non-2xx |", "|---|---:|---:|---:|---:|"]
    for path, label in (("/render", "uncached"), ("/render-cached", "@cached(ttl_s=60)")):
        r = cache[path]
        lines.append("| %s | %.0f | %.2f | %.2f | %d |" % (label, r["rps"], r["p50"], r["p99"],
                                                           r["non2xx"]))
    lines += ["", "cached/uncached: **%.2fx**" % (cache["/render-cached"]["rps"]
                                                  / cache["/render"]["rps"])]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keys", type=int, default=1000000)
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--frozen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-cache-demo", metavar="DATA_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.frozen)
    if args.serve_cache_demo:
        return serve_cache_demo(args.serve_cache_demo)
    ensure_wrk()
    workdir = tempfile.mkdtemp(prefix="onebox-bench-guard-")
    try:
        on_off = guard_on_off(args, workdir)
        mem = memory(args)
        cache = cache_speed(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = render(args, on_off, mem, cache)
    print(report)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "guard.md"), "w") as out:
        out.write(report + "\n")


if __name__ == "__main__":
    main()
