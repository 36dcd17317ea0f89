#!/usr/bin/env python3
"""Static files: onebox against the stdlib's SimpleHTTPRequestHandler and nginx, in one run.

    python3 bench/bench_static.py [--seconds 3] [--rounds 10] [--connections 16]

Serves one directory (a 1 KiB and a 10 MiB file) with each server in turn, pinned to CPU 0,
and drives it with wrk pinned to CPU 1 (keep-alive, one thread). Per server and file it reports
requests/s, payload MiB/s and the server's CPU time per MiB served (utime + stime from
/proc/PID/stat, children included, before and after the run). All three servers stay up; in
each of ``--rounds`` rounds they take turns on one file, then on the other, so the runs that
the targets compare are seconds apart. The table shows medians over the rounds, the targets
the median of the per-round ratios (a shared machine is noisy, and its load drifts).
Prints a markdown table and writes it to bench/results/static.md.

The peers, tuned as they would be in production:
* stdlib: ThreadingHTTPServer + SimpleHTTPRequestHandler with protocol_version "HTTP/1.1",
  disable_nagle_algorithm, request_queue_size 1024;
* nginx (Debian package): foreground, the config below, 127.0.0.1, one worker, access_log off,
  sendfile on.

Installs wrk and nginx with apt-get when they are missing (root). Needs Linux (taskset, /proc).
Never imported by the runtime.
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "static.md")
MIB = 1024 * 1024
FILES = (("1 KiB", "1k.bin", 1024), ("10 MiB", "10m.bin", 10 * MIB))
SERVER_CPU, CLIENT_CPU = "0", "1"
TARGET_SMALL_VS_STDLIB = 2.0     # 1 KiB req/s: onebox at least this times the stdlib's
TARGET_CPU_VS_NGINX = 1.2        # 10 MiB CPU per MiB: onebox at most this times nginx's

STDLIB_SERVER = r'''
import functools, http.server, sys

class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024

server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=sys.argv[1]))
print("listening on http://127.0.0.1:%d/" % server.server_address[1], flush=True)
server.serve_forever()
'''

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {work}/tmp;
    proxy_temp_path {work}/tmp;
    fastcgi_temp_path {work}/tmp;
    uwsgi_temp_path {work}/tmp;
    scgi_temp_path {work}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {site};
    }}
}}
"""


def ensure_tools():
    missing = [tool for tool, path in (("wrk", "wrk"), ("nginx", "nginx"))
               if shutil.which(path) is None and not os.path.exists("/usr/sbin/" + path)]
    if missing:
        print("installing %s with apt-get ..." % " ".join(missing), file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq"] + missing, check=True,
                       stdout=subprocess.DEVNULL, env=dict(os.environ,
                                                           DEBIAN_FRONTEND="noninteractive"))
    return shutil.which("nginx") or "/usr/sbin/nginx"


def make_site(work):
    site = os.path.join(work, "site")
    os.mkdir(site)
    for _, name, size in FILES:
        with open(os.path.join(site, name), "wb") as handle:
            handle.write(os.urandom(size))
    for path in (work, site):   # nginx's worker runs as nobody
        os.chmod(path, 0o755)
    for _, name, _ in FILES:
        os.chmod(os.path.join(site, name), 0o644)
    return site


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(argv, url=None):
    """Start a server pinned to the server CPU; return (process, base URL)."""
    process = subprocess.Popen(["taskset", "-c", SERVER_CPU] + argv, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    if url is None:
        line = process.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            process.kill()
            raise SystemExit("server did not start: %r %s" % (line, process.stderr.read()))
        url = match.group(1)
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(url + FILES[0][1], timeout=1).read()
            return process, url
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise SystemExit("server at %s does not answer: %s" % (url, process.stderr.read()))
            time.sleep(0.05)


def stop(process):
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def cpu_seconds(pid, system=True):
    """utime + stime of ``pid`` and its descendants (nginx's worker is a child); utime alone
    when not ``system``."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = (lambda fields: int(fields[11]) + int(fields[12])) if system else \
        (lambda fields: int(fields[11]))
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as handle:
                    fields = handle.read().rpartition(")")[2].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append((int(entry), fields))
    total, todo = 0, [pid]
    try:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rpartition(")")[2].split()
        total += used(fields)
    except OSError:
        pass
    while todo:
        for child, fields in children.get(todo.pop(), ()):
            total += used(fields)
            todo.append(child)
    return total / ticks


def wrk(url, seconds, connections):
    argv = ["taskset", "-c", CLIENT_CPU, "wrk", "-t1", "-c%d" % connections, "-d%ds" % seconds,
            "--timeout", "10s", url]
    output = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    elapsed = float(re.search(r"requests in ([\d.]+)(m?s)", output).group(1))
    if re.search(r"requests in [\d.]+ms", output):
        elapsed /= 1000
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", output)
    return requests, elapsed, errors.group(0) if errors else ""


def check(name, url):
    for _, filename, size in FILES:
        body = urllib.request.urlopen(url + filename, timeout=10).read()
        if len(body) != size:
            raise SystemExit("%s served %d bytes of %s" % (name, len(body), filename))


def measure(name, pid, url, label, size, seconds, connections, round_number):
    wrk(url, 1, connections)                        # warm-up: caches, connections
    before = cpu_seconds(pid)
    requests, elapsed, errors = wrk(url, seconds, connections)
    cpu = cpu_seconds(pid) - before
    mib = requests * size / MIB
    row = {"server": name, "file": label, "round": round_number, "rps": requests / elapsed,
           "mibps": mib / elapsed, "cpu_ms_per_mib": 1000 * cpu / mib if mib else 0,
           "cpu_pct": 100 * cpu / elapsed, "errors": errors}
    print("  round %d %-7s %-7s %9.0f req/s %9.1f MiB/s %8.3f ms CPU/MiB %s"
          % (round_number, name, label, row["rps"], row["mibps"], row["cpu_ms_per_mib"], errors),
          file=sys.stderr)
    return row


def median(rows):
    """Per (server, file): the median of each measure over the rounds (a shared machine is
    noisy; the median ignores one disturbed round either way)."""
    groups = {}
    for row in rows:
        groups.setdefault((row["server"], row["file"]), []).append(row)
    kept = []
    for (server, label), group in groups.items():
        row = {"server": server, "file": label,
               "errors": "; ".join(r["errors"] for r in group if r["errors"])}
        for measure in ("rps", "mibps", "cpu_ms_per_mib", "cpu_pct"):
            row[measure] = statistics.median(r[measure] for r in group)
        kept.append(row)
    return kept


def paired_ratios(rows, label, measure, server, baseline):
    """Per round, server's measure divided by baseline's in the same round, sorted."""
    by = {(row["round"], row["server"]): row[measure] for row in rows if row["file"] == label}
    rounds = sorted({row["round"] for row in rows})
    return sorted(by[(r, server)] / by[(r, baseline)] for r in rounds)


def spread(ratios):
    return "rounds ranged %.2fx-%.2fx" % (ratios[0], ratios[-1])


def table(rows, seconds, connections, rounds):
    lines = ["# Static files: onebox vs stdlib vs nginx", "",
             "%s; Python %s; wrk -t1 -c%d -d%ds (CPU %s), server on CPU %s; %s; median of %d "
             "rounds." % (time.strftime("%Y-%m-%d %H:%M"), sys.version.split()[0], connections,
                          seconds, CLIENT_CPU, SERVER_CPU, nginx_version(), rounds), "",
             "| server | file | req/s | MiB/s | server CPU ms per MiB | server CPU % | errors |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for row in median(rows):
        lines.append("| %s | %s | %.0f | %.1f | %.3f | %.0f | %s |"
                     % (row["server"], row["file"], row["rps"], row["mibps"],
                        row["cpu_ms_per_mib"], row["cpu_pct"], row["errors"] or "-"))
    small_ratios = paired_ratios(rows, "1 KiB", "rps", "onebox", "stdlib")
    cpu_ratios = paired_ratios(rows, "10 MiB", "cpu_ms_per_mib", "onebox", "nginx")
    small, cpu = statistics.median(small_ratios), statistics.median(cpu_ratios)
    lines += ["",
              "Targets, as the median over rounds of the ratio within each round (the runs "
              "compared are seconds apart):", "",
              "- 1 KiB req/s, onebox / stdlib: **%.2fx** (target >= %.1fx: %s; %s)"
              % (small, TARGET_SMALL_VS_STDLIB, "met" if small >= TARGET_SMALL_VS_STDLIB
                 else "MISSED", spread(small_ratios)),
              "- 10 MiB server CPU per MiB, onebox / nginx: **%.2fx** (target <= %.1fx: %s; %s)"
              % (cpu, TARGET_CPU_VS_NGINX, "met" if cpu <= TARGET_CPU_VS_NGINX else "MISSED",
                 spread(cpu_ratios)),
              ""]
    return "\n".join(lines)


def nginx_version():
    try:
        result = subprocess.run([shutil.which("nginx") or "/usr/sbin/nginx", "-v"],
                                capture_output=True, text=True)
        return result.stderr.strip().replace("nginx version: ", "")
    except OSError:
        return "nginx ?"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=3, help="length of each timed run")
    # one round's 10 MiB ratio swings +-15% on a shared VM; ten rounds steady the median
    parser.add_argument("--rounds", type=int, default=10, help="turns each server takes")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    args = parser.parse_args()
    nginx = ensure_tools()
    work = tempfile.mkdtemp(prefix="onebox-bench-")
    try:
        site = make_site(work)
        os.mkdir(os.path.join(work, "tmp"))
        port = free_port()
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as handle:
            handle.write(NGINX_CONF.format(work=work, site=site, port=port))
        servers = [
            ("stdlib", [sys.executable, "-c", STDLIB_SERVER, site], None),
            # wrk is one client flooding: the guard checks every request, with limits that
            # never fire (the shipped ones would ban wrk within a second)
            ("onebox", [sys.executable, os.path.join(ROOT, "server.py"), "--port", "0",
                        "--pages-dir", site, "--access-log", "off",
                        "--data-dir", os.path.join(work, "data"),
                        "--limits-client-rate-per-s", "1e9", "--limits-client-burst", "1000000000",
                        "--limits-route-rate-per-s", "1e9", "--limits-route-burst", "1000000000"],
             None),
            ("nginx", [nginx, "-c", conf, "-e", os.path.join(work, "error.log")],
             "http://127.0.0.1:%d/" % port),
        ]
        running = []
        try:
            for name, argv, url in servers:   # all up at once; an idle server costs nothing
                process, url = start(argv, url)
                running.append((name, process, url))
                check(name, url)
            rows = []
            for round_number in range(1, args.rounds + 1):
                for label, filename, size in FILES:
                    for name, process, url in running:
                        rows.append(measure(name, process.pid, url + filename, label, size,
                                            args.seconds, args.connections, round_number))
        finally:
            for _, process, _ in running:
                stop(process)
        report = table(rows, args.seconds, args.connections, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        handle.write(report)


if __name__ == "__main__":
    main()
