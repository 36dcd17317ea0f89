#!/usr/bin/env python3
"""Two (or more) versions of onebox against nginx, interleaved, in one run.

    python3 bench/ab_static.py OLD/server.py NEW/server.py [--rounds 6] [--seconds 3]
                               [--target 10m|1k|hello]

The target is the 10 MiB file (default), the 1 KiB page, or /hello, a handler (which nginx
does not have: its runs there are of a missing file, a 404, and its ratio means little).

For telling whether a change to the request path moved the server's CPU: each server.py given
(a copy of an older checkout, say) and nginx serve the same directory, pinned as
bench_static.py pins them, and take turns in each round. Per run it prints the server's CPU time
per request (utime + stime, children included) and its context switches per request (every
thread's voluntary and involuntary switches, from /proc); at the end, per server, the medians
and the median and range of the per-round CPU ratio to nginx. A round's ratio swings by 20% or
more on a shared VM, so compare medians, and run it more than once.

Uses bench_static.py's site, nginx config and helpers. Never imported by the runtime.
"""
import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import bench_static as static


def context_switches(pid):
    """Voluntary + involuntary switches of every thread of ``pid`` and its children."""
    pids = [pid]
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat_path) as handle:
                if handle.read().rpartition(")")[2].split()[1] == str(pid):
                    pids.append(int(stat_path.split("/")[2]))
        except OSError:
            continue
    total = 0
    for each in pids:
        for status_path in glob.glob("/proc/%d/task/*/status" % each):
            try:
                with open(status_path) as handle:
                    total += sum(int(line.split()[1]) for line in handle
                                 if "ctxt_switches" in line)
            except OSError:
                continue
    return total


def onebox_argv(server_py, site, data_dir):
    return [sys.executable, server_py, "--port", "0", "--pages-dir", site, "--access-log", "off",
            "--data-dir", data_dir, "--limits-client-rate-per-s", "1e9",
            "--limits-client-burst", "1000000000", "--limits-route-rate-per-s", "1e9",
            "--limits-route-burst", "1000000000",
            # the guard checks every request, as for a remote client (loopback is exempt by
            # default since issue 10; versions before it had no such default)
            "--limits-trusted-proxies", "", "--limits-allow-cidrs", ""] + _uncapped(server_py)


def _uncapped(server_py):
    """wrk is one client with many connections: lift the per-client worker cap (issue 12) of
    versions that have it, so that what is compared is the cost of a request, not the policy
    that keeps one client to its share of the workers."""
    help_text = subprocess.run([sys.executable, server_py, "--help"], capture_output=True,
                               text=True).stdout
    return ["--max-workers-per-client", "1000000"] if "--max-workers-per-client" in help_text \
        else []


TARGETS = {"10m": static.FILES[1][1], "1k": static.FILES[0][1], "hello": "hello"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("servers", nargs="+", help="server.py files to compare")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--target", choices=sorted(TARGETS), default="10m")
    args = parser.parse_args()
    nginx = static.ensure_tools()
    work = tempfile.mkdtemp(prefix="onebox-ab-")
    running = []
    try:
        site = static.make_site(work)
        os.mkdir(os.path.join(work, "tmp"))
        port = static.free_port()
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as handle:
            handle.write(static.NGINX_CONF.format(work=work, site=site, port=port))
        servers = [("v%d" % number, onebox_argv(os.path.abspath(path), site,
                                                 os.path.join(work, "data%d" % number)), None)
                   for number, path in enumerate(args.servers)]
        servers.append(("nginx", [nginx, "-c", conf, "-e", os.path.join(work, "error.log")],
                        "http://127.0.0.1:%d/" % port))
        for name, argv, url in servers:
            process, url = static.start(argv, url)
            running.append((name, process, url))
        for number, path in enumerate(args.servers):
            print("v%d = %s" % (number, path))
        rows = {name: [] for name, _, _ in running}
        url_path = TARGETS[args.target]
        for round_number in range(1, args.rounds + 1):
            for name, process, url in running:
                static.wrk(url + url_path, 1, args.connections)   # warm-up
                cpu, switches = static.cpu_seconds(process.pid), context_switches(process.pid)
                requests, elapsed, errors = static.wrk(url + url_path, args.seconds,
                                                       args.connections)
                cpu = (static.cpu_seconds(process.pid) - cpu) * 1e6 / requests
                switches = (context_switches(process.pid) - switches) / requests
                rows[name].append((cpu, switches))
                print("round %d %-6s %7.0f us CPU/request %5.1f switches/request %6.0f req/s %s"
                      % (round_number, name, cpu, switches, requests / elapsed, errors),
                      flush=True)
    finally:
        for _, process, _ in running:
            static.stop(process)
        shutil.rmtree(work, ignore_errors=True)
    for name, measured in rows.items():
        ratios = [mine[0] / theirs[0] for mine, theirs in zip(measured, rows["nginx"])]
        print("%-6s median %5.0f us CPU/request, %4.1f switches/request; CPU vs nginx %.2fx "
              "(rounds %.2fx-%.2fx)" % (name, statistics.median(row[0] for row in measured),
                                         statistics.median(row[1] for row in measured),
                                         statistics.median(ratios), min(ratios), max(ratios)))


if __name__ == "__main__":
    main()
