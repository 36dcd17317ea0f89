"""HTTP benchmark: onebox against the bare stdlib baseline, side by side in one run.

    python3 bench/bench_http.py [--seconds 5] [--connections 50]

The server under test runs pinned to CPU 0, wrk (Debian's package; installed if missing) to
CPU 1. For each scenario (hello text, JSON, 1 KiB static page) it measures requests/s and
p50/p99 latency at keep-alive, then a `Connection: close` run counting socket errors, then
2,000 idle keep-alive connections: a normal client's latency beside them, and each server's
thread count and RSS. onebox runs with routing and access logging on (to a file).

Writes a markdown table to stdout and to bench/results/http.md. bench/bench_peers.py runs onebox
beside the stdlib, uvicorn+uvloop and nginx in one run (issue 23's table).
"""
import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCENARIOS = [("hello", "/hello"), ("json", "/hello/bench"), ("static 1 KiB", "/page-1k.html")]


def ensure_wrk():
    if shutil.which("wrk"):
        return
    print("installing wrk (apt-get)...", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)


def start(command, workdir):
    """Start a server pinned to CPU 0; return (process, base URL)."""
    out_path = os.path.join(workdir, "server-%d.out" % time.monotonic_ns())
    out = open(out_path, "w")
    process = subprocess.Popen(["taskset", "-c", "0"] + command, stdout=out,
                               stderr=subprocess.DEVNULL, cwd=ROOT)
    out.close()
    for _ in range(100):
        with open(out_path) as text:
            match = re.search(r"listening on (http://\S+?)/?$", text.readline().strip())
        if match:
            return process, match.group(1)
        time.sleep(0.05)
    process.kill()
    raise SystemExit("server did not start: %s" % " ".join(command))


def stop(process, wait_s=15):
    """SIGTERM, then SIGKILL if it has not exited within ``wait_s``."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wrk(url, seconds, connections, extra=()):
    command = ["taskset", "-c", "1", "wrk", "-t1", "-c%d" % connections, "-d%ds" % seconds,
               "--latency", "--timeout", "5s"] + list(extra) + [url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))}
    for label, key in (("50%", "p50"), ("99%", "p99")):
        match = re.search(r"%s\s+([\d.]+)(us|ms|s)\b" % label, output)
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
        result[key] = float(match.group(1)) * scale
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       output)
    result["errors"] = sum(int(n) for n in errors.groups()) if errors else 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non2xx"] = int(non2xx.group(1)) if non2xx else 0
    return result


def proc_status(pid):
    with open("/proc/%d/status" % pid) as status:
        text = status.read()
    threads = int(re.search(r"Threads:\s+(\d+)", text).group(1))
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", text).group(1))
    return threads, rss_kb / 1024


def idle_connections(url, pid, count):
    """Open ``count`` keep-alive connections that each finish one request, then time a normal
    client; return (p50 ms, p99 ms, threads, RSS MB) with the idle ones still open."""
    host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()
    idle = []
    try:
        for index in range(count):
            sock = socket.create_connection((host, int(port)), timeout=30,
                                            source_address=("127.0.%d.%d" % (1 + index // 200,
                                                                             2 + index % 200), 0))
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            idle.append(sock)
        for sock in idle:
            data = b""
            while not data.endswith(b"hello, world\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise RuntimeError("an idle connection was closed")
                data += chunk
        time.sleep(0.5)
        threads, rss = proc_status(pid)
        latencies = []
        for _ in range(500):
            started = time.perf_counter()
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while sock.recv(4096):
                    pass
            latencies.append((time.perf_counter() - started) * 1000)
        latencies.sort()
        return latencies[249], latencies[494], threads, rss
    finally:
        for sock in idle:
            sock.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--idle", type=int, default=2000)
    args = parser.parse_args()
    ensure_wrk()
    workdir = tempfile.mkdtemp(prefix="onebox-bench-")
    pages = os.path.join(workdir, "pages")
    os.makedirs(pages)
    with open(os.path.join(pages, "page-1k.html"), "w") as page:
        page.write("<!doctype html><title>1k</title>" + "x" * (1024 - 33))
    servers = {
        "onebox": [sys.executable, "server.py", "--port", "0", "--pages-dir", pages,
                   "--data-dir", os.path.join(workdir, "data"), "--max-connections-per-ip",
                   "4096",
                   # wrk is one client flooding: the guard checks every request but with limits
                   # it cannot reach (bench/bench_guard.py measures what that check costs)
                   "--limits-client-rate-per-s", "1e9", "--limits-client-burst", "1000000000",
                   "--limits-route-rate-per-s", "1e9", "--limits-route-burst", "1000000000"],
        "stdlib": [sys.executable, os.path.join(HERE, "baseline_stdlib.py"), "--port", "0",
                   "--pages", pages],
    }
    results = {}
    try:
        for name, command in servers.items():
            process, url = start(command, workdir)
            try:
                for label, path in SCENARIOS:
                    wrk(url + path, 1, args.connections)  # warm-up
                    results[(name, label)] = wrk(url + path, args.seconds, args.connections)
                results[(name, "close")] = wrk(url + "/hello", args.seconds, args.connections,
                                               ["-H", "Connection: close"])
                results[(name, "idle")] = idle_connections(url, process.pid, args.idle)
            finally:
                stop(process)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = render(results, args)
    print(report)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "http.md"), "w") as out:
        out.write(report + "\n")


def render(results, args):
    lines = ["wrk -t1 -c%d -d%ds, server on CPU 0, wrk on CPU 1; Python %s"
             % (args.connections, args.seconds, sys.version.split()[0]), "",
             "| scenario | onebox req/s | p50 ms | p99 ms | stdlib req/s | p50 ms | p99 ms | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, _ in SCENARIOS + [("close", None)]:
        one, base = results[("onebox", label)], results[("stdlib", label)]
        name = "hello, Connection: close" if label == "close" else label
        lines.append("| %s | %.0f | %.2f | %.2f | %.0f | %.2f | %.2f | %.2fx |" % (
            name, one["rps"], one["p50"], one["p99"], base["rps"], base["p50"], base["p99"],
            one["rps"] / base["rps"]))
    lines += ["", "| socket errors / non-2xx | onebox | stdlib |", "|---|---:|---:|"]
    for label, _ in SCENARIOS + [("close", None)]:
        one, base = results[("onebox", label)], results[("stdlib", label)]
        lines.append("| %s | %d / %d | %d / %d |" % (label, one["errors"], one["non2xx"],
                                                   base["errors"], base["non2xx"]))
    lines += ["", "%d idle keep-alive connections open; a normal client on fresh connections:"
              % args.idle, "",
              "| server | p50 ms | p99 ms | threads | RSS MB |", "|---|---:|---:|---:|---:|"]
    for name in ("onebox", "stdlib"):
        p50, p99, threads, rss = results[(name, "idle")]
        lines.append("| %s | %.2f | %.2f | %d | %.1f |" % (name, p50, p99, threads, rss))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
