#!/usr/bin/env python3
"""onebox against its peers in one run: the tuned stdlib, uvicorn+uvloop+httptools and nginx.

    python3 bench/bench_peers.py [--server PATH/server.py] [--repetitions 3] [--seconds 5]
                                 [--connections 50] [--many 1000]

The servers, all up at once, each pinned to CPU 0 (wrk, one thread, to CPU 1):
* onebox: every feature on as shipped (the abuse guard, /metrics' counting, the status page's
  recorder, the access log, written to a file). wrk is one client flooding from loopback, so,
  as bench/ab_static.py does: the guard checks every request as for a remote client (loopback's
  exemption emptied) with rate limits it cannot reach, and the per-client caps (connections
  per address, workers per client) are lifted; without that the guard's shipped limits would
  refuse wrk within a second, which measures the policy, not a request's cost.
* stdlib: bench/baseline_stdlib.py (ThreadingHTTPServer, tuned; no per-request log).
* uvicorn: `uvicorn --loop uvloop --http httptools --workers 1 --no-access-log` serving the raw
  ASGI app bench/peers/asgi_app.py (no framework), from the benchmark venv bench/.venv, which
  this script creates with pip when it is missing and which the runtime never uses.
* nginx: Debian's package, one worker, bench/peers/nginx.conf (/hello as `return 200`, files
  with sendfile, no access log).

Workloads, as issue 23's table has them: hello and JSON at --connections keep-alive; hello at
--many keep-alive connections (mid-run, the connections each server had accepted and still
held are counted from /proc/net/tcp); hello with `Connection: close`; the 1 KiB and the 10 MiB
file. uvicorn serves no files and nginx computes no JSON: those cells stay empty. In each of
--repetitions rounds every workload runs on every server that serves it, one after another
(the order rotating by one server a round), after a one-second warm-up; a round's runs are
seconds apart, so the ratios are taken within a round and the table shows their median and
range. Per run: req/s (MiB/s for 10 MiB), p50/p99 latency (wrk --latency), wrk's socket
errors and non-2xx answers, and the server's CPU per request (per MiB for 10 MiB): utime +
stime of its process and children from /proc/PID/stat, before and after the run.

The box is shared: read the ratios, not the absolute figures. CPU instructions per request,
which neighbours cannot move, are bench/ab_static.py's `--instructions`.

Prints the tables and writes them to bench/results/peers.md. Needs Linux (taskset, /proc),
wrk and nginx (Debian's packages). Never imported by the runtime.
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
import urllib.request

import bench_static as static

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, "peers")
VENV = os.path.join(HERE, ".venv")
RESULTS = os.path.join(HERE, "results", "peers.md")
MIB = 1024 * 1024
SERVERS = ("onebox", "stdlib", "uvicorn", "nginx")
PEER_PACKAGES = ("uvicorn", "uvloop", "httptools")

# (key, label, path, keep-alive?, servers that answer it); the connection count is
# --connections except for "many" (--many)
WORKLOADS = (
    ("hello", "hello, keep-alive, {c} connections", "/hello", True, SERVERS),
    ("json", "json, keep-alive, {c} connections", "/hello/bench", True,
     ("onebox", "stdlib", "uvicorn")),
    ("many", "hello, keep-alive, {m} connections", "/hello", True, SERVERS),
    ("close", "hello, `Connection: close`", "/hello", False, SERVERS),
    ("1k", "static 1 KiB", "/1k.bin", True, ("onebox", "stdlib", "nginx")),
    ("10m", "static 10 MiB (MiB/s; CPU per MiB)", "/10m.bin", True,
     ("onebox", "stdlib", "nginx")),
)
SIZES = {"1k": 1024, "10m": 10 * MIB}
EXPECTED = {"/hello": b"hello, world\n", "/hello/bench": b'{"greeting":"hello, bench"}'}


# --- the servers --------------------------------------------------------------------------------

def ensure_venv():
    """bench/.venv with uvicorn, uvloop and httptools (pip, from PyPI); its uvicorn path."""
    uvicorn = os.path.join(VENV, "bin", "uvicorn")
    if not os.path.exists(uvicorn):
        print("creating %s with %s ..." % (VENV, " ".join(PEER_PACKAGES)), file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "-q"] + list(PEER_PACKAGES),
                       check=True)
    return uvicorn


def peer_versions():
    script = ("import importlib.metadata as m; print(', '.join('%%s %%s' %% (n, m.version(n)) "
              "for n in %r))" % (PEER_PACKAGES,))
    return subprocess.run([os.path.join(VENV, "bin", "python"), "-c", script],
                          capture_output=True, text=True, check=True).stdout.strip()


def onebox_argv(server_py, site, work):
    return [sys.executable, server_py, "--port", "0", "--pages-dir", site,
            "--data-dir", os.path.join(work, "data"),
            "--limits-trusted-proxies", "", "--limits-allow-cidrs", "",
            "--limits-client-rate-per-s", "1e9", "--limits-client-burst", "1000000000",
            "--limits-route-rate-per-s", "1e9", "--limits-route-burst", "1000000000",
            "--max-connections-per-ip", "4096", "--max-workers-per-client", "1000000"]


def server_argvs(args, site, work):
    """{name: (argv, URL or None when the server prints "listening on URL")}."""
    uvicorn_port, nginx_port = static.free_port(), static.free_port()
    conf = os.path.join(work, "nginx.conf")
    with open(os.path.join(PEERS, "nginx.conf")) as template, open(conf, "w") as out:
        out.write(template.read().format(work=work, site=site, port=nginx_port))
    return {
        "onebox": (onebox_argv(os.path.abspath(args.server), site, work), None),
        "stdlib": ([sys.executable, os.path.join(HERE, "baseline_stdlib.py"), "--port", "0",
                    "--pages", site], None),
        "uvicorn": ([ensure_venv(), "--app-dir", PEERS, "asgi_app:app", "--host", "127.0.0.1",
                     "--port", str(uvicorn_port), "--loop", "uvloop", "--http", "httptools",
                     "--workers", "1", "--no-access-log"],
                    "http://127.0.0.1:%d" % uvicorn_port),
        "nginx": ([static.ensure_tools(), "-c", conf, "-e", os.path.join(work, "nginx-error.log")],
                  "http://127.0.0.1:%d" % nginx_port),
    }


def start(name, argv, url, work):
    """Start a server on the server CPU, its output (onebox's access log) to a file in
    ``work``; return (process, base URL without the trailing slash) once it answers."""
    out_path = os.path.join(work, name + ".out")
    with open(out_path, "wb") as out:
        process = subprocess.Popen(["taskset", "-c", static.SERVER_CPU] + argv, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 15
    while True:
        if url is None:
            with open(out_path, "rb") as text:
                match = re.search(rb"listening on (http://\S+?)/?\s", text.readline())
            url = match.group(1).decode() if match else None
        if url is not None:
            try:
                urllib.request.urlopen(url + "/hello", timeout=1).read()
                return process, url
            except OSError:
                pass
        if time.monotonic() > deadline or process.poll() is not None:
            stop(process)
            with open(out_path, errors="replace") as text:
                raise SystemExit("%s did not start: %s" % (name, text.read()[-2000:]))
        time.sleep(0.05)


def stop(process):
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()


def check(name, url):
    """Each workload a server is asked for answers 200 with the right body: a peer that
    answered something else (a 404 is fast) would flatter itself."""
    for key, _, path, _, servers in WORKLOADS:
        if name not in servers:
            continue
        with urllib.request.urlopen(url + path, timeout=10) as response:
            body = response.read()
        wrong_body = path in EXPECTED and body != EXPECTED[path]
        if wrong_body or (key in SIZES and len(body) != SIZES[key]):
            raise SystemExit("%s answered %s with %r..." % (name, path, body[:60]))


# --- one run ------------------------------------------------------------------------------------

def held(port):
    """Connections to ``port`` that a server has accepted and still holds: ESTABLISHED in
    /proc/net/tcp with an inode (one still in the accept queue has none yet)."""
    local = ":%04X" % port
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[1].endswith(local) and fields[3] == "01" and fields[9] != "0":
                count += 1
    return count


def wrk(url, seconds, connections, keep_alive, port=None):
    """One wrk run; its figures, and (given ``port``) the connections held at mid-run."""
    argv = ["taskset", "-c", static.CLIENT_CPU, "wrk", "-t1", "-c%d" % connections,
            "-d%ds" % seconds, "--latency", "--timeout", "5s"]
    if not keep_alive:
        argv += ["-H", "Connection: close"]
    client = subprocess.Popen(argv + [url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    holding = None
    if port is not None:
        time.sleep(seconds / 2)
        holding = held(port)
    output, errors = client.communicate()
    if client.returncode:
        raise SystemExit("wrk failed on %s: %s" % (url, errors))
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    elapsed, unit = re.search(r"requests in ([\d.]+)(ms|s|m)\b", output).groups()
    row = {"requests": requests,
           "elapsed": float(elapsed) * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit],
           "held": holding}
    for label, key in (("50%", "p50"), ("99%", "p99")):
        value, unit = re.search(r"%s\s+([\d.]+)(us|ms|s)\b" % label, output).groups()
        row[key] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                              r"timeout (\d+)", output)
    row["errors"] = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    row["non2xx"] = int(non2xx.group(1)) if non2xx else 0
    return row


def one_run(name, process, url, workload, args, round_number):
    """Warm up for a second, then one timed run; the row, with the server's CPU."""
    key, _, path, keep_alive, _ = workload
    connections = args.many if key == "many" else args.connections
    port = int(url.rpartition(":")[2]) if key == "many" else None
    wrk(url + path, 1, connections, keep_alive)
    before = static.cpu_seconds(process.pid)
    row = wrk(url + path, args.seconds, connections, keep_alive, port)
    cpu = static.cpu_seconds(process.pid) - before
    row["rps"] = row["requests"] / row["elapsed"]
    row["cpu_us"] = cpu * 1e6 / max(row["requests"], 1)
    if key == "10m":
        row["mibps"] = row["rps"] * SIZES[key] / MIB
        row["cpu_ms_per_mib"] = row["cpu_us"] / 1000 / (SIZES[key] / MIB)
    print("round %d %-6s %-7s %8.0f req/s  p50 %7.2f ms  p99 %7.2f ms  %7.1f us CPU/request%s%s"
          % (round_number, key, name, row["rps"], row["p50"], row["p99"], row["cpu_us"],
             "" if row["held"] is None else "  held %d" % row["held"],
             "  errors %d, non-2xx %d" % (row["errors"], row["non2xx"])
             if row["errors"] or row["non2xx"] else ""), flush=True)
    return row


def rounds(running, args):
    """{(server, workload key): [row per round]}, interleaved: each round, each workload on
    each server that serves it, the servers' order rotating by one a round."""
    rows = {}
    for round_number in range(1, args.repetitions + 1):
        shift = (round_number - 1) % len(running)
        order = running[shift:] + running[:shift]
        for workload in WORKLOADS:
            for name, process, url in order:
                if name in workload[4]:
                    rows.setdefault((name, workload[0]), []).append(
                        one_run(name, process, url, workload, args, round_number))
    return rows


# --- the report ---------------------------------------------------------------------------------

def ratio(rows, key, measure, mine, theirs):
    """Median and range of the per-round ratio of ``measure``, mine over theirs; None when
    either does not serve ``key``."""
    if (mine, key) not in rows or (theirs, key) not in rows:
        return None
    each = [a[measure] / b[measure] for a, b in zip(rows[(mine, key)], rows[(theirs, key)])]
    return statistics.median(each), min(each), max(each)


def cell(figures):
    return "" if figures is None else "%.2fx (%.2f-%.2f)" % figures


def spread(rows, name, key, measure, form="%.0f"):
    values = sorted(row[measure] for row in rows[(name, key)])
    return form % values[0] if values[0] == values[-1] else \
        (form + "-" + form) % (values[0], values[-1])


def label(workload, args):
    return workload[1].format(c=args.connections, m=args.many)


def ratio_table(rows, args):
    """Issue 23's table: onebox over each peer, per-round medians (and ranges)."""
    lines = ["| workload | onebox / uvicorn+uvloop | onebox / stdlib-tuned | onebox / nginx | "
             "server CPU per request, onebox / uvloop |", "|---|---:|---:|---:|---:|"]
    for workload in WORKLOADS:
        key = workload[0]
        measure = "mibps" if key == "10m" else "rps"
        uvloop, stdlib, nginx = (ratio(rows, key, measure, "onebox", peer)
                                 for peer in ("uvicorn", "stdlib", "nginx"))
        cpu = ratio(rows, key, "cpu_us", "onebox", "uvicorn")
        uvloop_cell, nginx_cell = cell(uvloop), cell(nginx)
        name = label(workload, args)
        if key == "many":
            uvloop_cell += " (p99 %s ms; uvloop %s ms)" % (
                spread(rows, "onebox", key, "p99"), spread(rows, "uvicorn", key, "p99"))
            short = ["%s %s" % (server, spread(rows, server, key, "held", "%d"))
                     for server in SERVERS if min(row["held"] for row in rows[(server, key)])
                     < args.many]
            name += " (held mid-run: %s)" % ("all, by every server" if not short else
                                             "all but " + ", ".join(short))
        if key == "10m":
            nginx_cell += "; CPU per MiB %s" % cell(ratio(rows, key, "cpu_ms_per_mib",
                                                          "onebox", "nginx"))
        lines.append("| %s | %s | %s | %s | %s |" % (name, uvloop_cell,
                                                     cell(stdlib), nginx_cell, cell(cpu)))
    return lines


def figure_table(rows, args):
    """Every server's own figures: medians over the rounds (ranges for p99 and CPU)."""
    lines = ["| workload | server | req/s | p50 ms | p99 ms | server CPU us/request | "
             "held mid-run | socket errors / non-2xx |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for workload in WORKLOADS:
        key = workload[0]
        for name in SERVERS:
            if (name, key) not in rows:
                continue
            mine = rows[(name, key)]
            rps = "%.0f" % statistics.median(row["rps"] for row in mine)
            cpu = spread(rows, name, key, "cpu_us", "%.1f")
            if key == "10m":
                rps += " (%.0f MiB/s)" % statistics.median(row["mibps"] for row in mine)
                cpu += " (%.3f ms/MiB)" % statistics.median(row["cpu_ms_per_mib"]
                                                            for row in mine)
            holding = "" if key != "many" else "%s of %d" % (
                spread(rows, name, key, "held", "%d"), args.many)
            lines.append("| %s | %s | %s | %.2f | %s | %s | %s | %d / %d |" % (
                label(workload, args), name, rps,
                statistics.median(row["p50"] for row in mine),
                spread(rows, name, key, "p99", "%.2f"), cpu, holding,
                sum(row["errors"] for row in mine), sum(row["non2xx"] for row in mine)))
    return lines


def report(rows, args, started, load_start):
    lines = ["# onebox and its peers, one run", "",
             "%s; %s; Python %s; %s; %s; wrk -t1, %d s runs after a 1 s warm-up, %d "
             "interleaved rounds; server on CPU %s, wrk on CPU %s; load average %.2f at start, "
             "%.2f at end." % (started, args.server, sys.version.split()[0], peer_versions(),
                               static.nginx_version(), args.seconds, args.repetitions,
                               static.SERVER_CPU, static.CLIENT_CPU, load_start,
                               os.getloadavg()[0]), "",
             "onebox with every feature on as shipped, its access log written to a file (guard "
             "checking every request, limits out of wrk's reach); stdlib, uvicorn and nginx "
             "with no access log.", "",
             "Ratios: the median over rounds of onebox's figure over the peer's in the same "
             "round (range in brackets); req/s, MiB/s for 10 MiB.", ""]
    lines += ratio_table(rows, args)
    lines += ["", "Each server's figures (medians over rounds; ranges for p99 and CPU):", ""]
    lines += figure_table(rows, args)
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default=os.path.join(ROOT, "server.py"),
                        help="the onebox server.py to run (default: this checkout's)")
    parser.add_argument("--repetitions", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seconds", type=int, default=5, help="length of each timed run")
    parser.add_argument("--connections", type=int, default=50, help="keep-alive connections")
    parser.add_argument("--many", type=int, default=1000,
                        help="keep-alive connections of the many-connections hello")
    return parser.parse_args()


def main():
    args = parse_args()
    started, load_start = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="onebox-peers-")
    running = []
    try:
        site = static.make_site(work)
        os.mkdir(os.path.join(work, "tmp"))
        for name, (argv, url) in server_argvs(args, site, work).items():
            process, url = start(name, argv, url, work)
            running.append((name, process, url))
            check(name, url)
        rows = rounds(running, args)
    finally:
        for _, process, _ in running:
            stop(process)
        shutil.rmtree(work, ignore_errors=True)
    text = report(rows, args, started, load_start)
    print("\n" + text)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as out:
        out.write(text + "\n")


if __name__ == "__main__":
    main()
