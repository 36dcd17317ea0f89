#!/usr/bin/env python3
"""Several onebox processes as one site through Redis (issue 24, docs/cluster.md), in one run.

    python3 bench/bench_cluster.py [--server PATH/server.py] [--repetitions 3] [--seconds 5]
                                   [--connections 50]

Two tables:

1. One process, cluster mode against the default (``[cluster] redis_url`` empty), in
   interleaved rounds: hello (GET /hello) and notes writes (a wrk Lua script: POST
   /api/notes, then DELETE of a note it made, alternating, so that the area's 10,000-note cap
   is never reached). The onebox process is pinned to CPU 0; wrk and redis-server share CPU 1, so that
   the server's CPU per request (utime + stime from /proc/PID/stat, before and after the run)
   is onebox's own, and Redis's is counted apart (its own /proc/PID/stat). Cluster mode's hello
   minus the default's is what the guard's shared counting costs a request (wrk is one client
   checked as a remote one: loopback's exemption emptied, limits out of its reach, as
   bench/bench_peers.py runs onebox). Both keep [state] durability "always": the default's
   journal is fsynced per write (group commit), Redis runs ``appendonly yes`` and
   ``appendfsync always``.
2. hello through 1, 2 and 3 cluster-mode processes sharing one port with SO_REUSEPORT
   (``--reuse-port on``: the kernel spreads wrk's connections over them; no proxy in front),
   beside the default single process. Everything floats on both CPUs here (the box has two:
   the processes, redis-server and wrk all compete for them), which is the question: what more
   processes buy on this box.

Each round runs every row once, after a one-second warm-up (of hello); the tables show medians
over the rounds (ranges for req/s). Each write run starts from an empty store (a fresh data
dir; Redis's keys flushed); req/s counts 2xx answers only (a refused write is fast and would
flatter the figure), and the non-2xx column says whether there were any.

Needs Linux (taskset, /proc), wrk (Debian's; installed if missing) and redis-server (Debian's
redis-server package). Prints the tables and writes bench/results/cluster.md. Never imported by
the runtime.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import bench_http
import bench_peers
import bench_static as static

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "cluster.md")
BOTH_CPUS = "0,1"
NOTE_SCRIPT = """\
-- Each connection writes a note, then deletes one it wrote: every request is a write
-- transaction, and the area's count of notes stays near the connections' (its cap: 10,000).
local made = {}
wrk.headers["Content-Type"] = "application/json"
request = function()
  local id = table.remove(made)
  if id then
    return wrk.format("DELETE", "/api/notes/" .. id)
  end
  return wrk.format("POST", "/api/notes", nil, '{"text": "a note written by wrk"}')
end
response = function(status, headers, body)
  if status == 201 then
    local id = string.match(body, '"id":%s*"(%d+)"')
    if id then table.insert(made, id) end
  end
end
"""


# --- redis-server -----------------------------------------------------------------------------

class Redis:
    """A redis-server in ``work`` on a free port, pinned to ``cpus``, with the persistence that
    [state] durability "always" asks for."""

    def __init__(self, work, cpus):
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed: apt-get install redis-server")
        self.port = static.free_port()
        self.directory = os.path.join(work, "redis")
        os.makedirs(self.directory)
        conf = os.path.join(self.directory, "redis.conf")
        with open(conf, "w") as out:
            out.write("port %d\nbind 127.0.0.1\nprotected-mode no\ndir %s\nlogfile redis.log\n"
                      "save \"\"\nappendonly yes\nappendfsync always\n"
                      % (self.port, self.directory))
        self.process = subprocess.Popen(["taskset", "-c", cpus, binary, conf],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = "redis://127.0.0.1:%d/0" % self.port
        deadline = time.monotonic() + 10
        while self.cli("PING") != "PONG":
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit("redis-server did not start on port %d" % self.port)
            time.sleep(0.05)

    def cli(self, *args):
        result = subprocess.run(["redis-cli", "-p", str(self.port)] + list(args),
                                capture_output=True, text=True)
        return result.stdout.strip()

    def flush(self):
        self.cli("FLUSHALL")

    def cpu_seconds(self):
        return static.cpu_seconds(self.process.pid)

    def stop(self):
        self.process.terminate()
        self.process.wait(15)


# --- onebox -----------------------------------------------------------------------------------

def onebox_argv(args, site, data_dir, redis_url=None, port=None):
    """bench_peers' onebox (the guard checks wrk as a remote client, limits out of its reach),
    in its own ``data_dir``; in cluster mode with ``redis_url``; on ``port`` with SO_REUSEPORT
    when given (the others of a run bind it too)."""
    argv = bench_peers.onebox_argv(os.path.abspath(args.server), site, data_dir)
    argv[argv.index("--data-dir") + 1] = data_dir
    argv += ["--admin-port", "0"]   # [admin] port is 8001 unless --port is 0: one each
    if redis_url:
        argv += ["--cluster-redis-url", redis_url]
    if port is not None:
        argv[argv.index("--port") + 1] = str(port)
        argv += ["--reuse-port", "yes"]
    return argv


def start(argv, name, work, cpus):
    """One onebox on ``cpus``; (process, base URL). bench_peers.start runs it under
    ``taskset -c 0``: the inner taskset here sets the affinity the server keeps."""
    return bench_peers.start(name, ["taskset", "-c", cpus] + argv, None, work)


def run(url, path, seconds, connections, processes, redis, script=None):
    """A warm-up second of hello (a write's would spend the notes' cap), then one timed wrk
    run (wrk on CPU 1); its row, with the servers' and Redis's CPU per request. "rps" counts
    the 2xx answers only: a write refused at the cap is fast and would flatter the figure."""
    extra = ["-s", script] if script else []
    bench_http.wrk(url + "/hello", 1, connections)
    before = [static.cpu_seconds(process.pid) for process in processes]
    redis_before = redis.cpu_seconds() if redis else 0.0
    row = bench_http.wrk(url + path, seconds, connections, extra)
    requests = max(row["rps"] * seconds, 1.0)
    row["rps"] = max(0.0, row["rps"] - row["non2xx"] / seconds)
    spent = sum(static.cpu_seconds(process.pid) for process in processes) - sum(before)
    row["cpu_us"] = spent * 1e6 / requests
    row["redis_us"] = (redis.cpu_seconds() - redis_before) * 1e6 / requests if redis else None
    return row


def show(round_number, label, row):
    print("round %d  %-42s %8.0f req/s  p50 %6.2f ms  p99 %7.2f ms  onebox %6.1f us/req%s%s"
          % (round_number, label, row["rps"], row["p50"], row["p99"], row["cpu_us"],
             "" if row["redis_us"] is None else "  redis %5.1f us/req" % row["redis_us"],
             "  errors %d non-2xx %d" % (row["errors"], row["non2xx"])
             if row["errors"] or row["non2xx"] else ""), flush=True)


# --- the two tables -----------------------------------------------------------------------------

def one_process(args, site, work, redis, round_number, rows):
    """Table 1's rows, this round: default and cluster mode, hello then a write, each from a
    fresh data dir (and, in cluster mode, an empty Redis)."""
    script = os.path.join(work, "note.lua")
    for mode in ("default", "cluster"):
        redis.flush()
        data = os.path.join(work, "data-%s-%d" % (mode, round_number))
        process, url = start(onebox_argv(args, site, data, redis.url if mode == "cluster"
                                         else None), mode, work, static.SERVER_CPU)
        try:
            counted = redis if mode == "cluster" else None
            for kind, path, seconds, lua in (("hello", "/hello", args.seconds, None),
                                             ("write", "/api/notes", args.seconds,
                                              script)):
                row = run(url, path, seconds, args.connections, [process], counted, lua)
                rows.setdefault((mode, kind), []).append(row)
                show(round_number, "1 process, %s, %s" % (mode, kind), row)
        finally:
            bench_peers.stop(process)


def scaling(args, site, work, redis, round_number, rows):
    """Table 2's rows, this round: hello through 1, 2, 3 processes on one port."""
    data = os.path.join(work, "data-scale-default-%d" % round_number)
    process, url = start(onebox_argv(args, site, data), "scale-default", work, BOTH_CPUS)
    try:
        row = run(url, "/hello", args.seconds, args.connections, [process], None)
        rows.setdefault(("default", 1), []).append(row)
        show(round_number, "default, 1 process, CPUs 0-1", row)
    finally:
        bench_peers.stop(process)
    for count in (1, 2, 3):
        port = static.free_port()
        processes = []
        try:
            for n in range(count):
                data = os.path.join(work, "data-scale-%d-%d-%d" % (count, n, round_number))
                process, url = start(onebox_argv(args, site, data, redis.url, port),
                                     "scale-%d-%d" % (count, n), work, BOTH_CPUS)
                processes.append(process)
            row = run(url, "/hello", args.seconds, args.connections, processes, redis)
            rows.setdefault(("cluster", count), []).append(row)
            show(round_number, "cluster, %d process%s on one port, CPUs 0-1"
                 % (count, "es" if count > 1 else ""), row)
        finally:
            for process in processes:
                bench_peers.stop(process)


def median_of(rows, key, measure):
    values = [row[measure] for row in rows[key] if row[measure] is not None]
    return statistics.median(values) if values else None


def rps_cell(rows, key):
    values = sorted(row["rps"] for row in rows[key])
    return "%.0f (%.0f-%.0f)" % (statistics.median(values), values[0], values[-1])


def figures(rows, key):
    redis_us = median_of(rows, key, "redis_us")
    return "%s | %.2f | %.2f | %.1f | %s | %d / %d" % (
        rps_cell(rows, key), median_of(rows, key, "p50"), median_of(rows, key, "p99"),
        median_of(rows, key, "cpu_us"), "" if redis_us is None else "%.1f" % redis_us,
        sum(row["errors"] for row in rows[key]), sum(row["non2xx"] for row in rows[key]))


def report(rows, args, started, load_start):
    head = ("| mode | req/s (range) | p50 ms | p99 ms | onebox CPU us/request | redis-server "
            "CPU us/request | socket errors / non-2xx |")
    lines = ["# Several processes as one site (issue 24), one run", "",
             "%s; %s; Python %s; %s; wrk -t1 -c%d, %d s runs after a 1 s warm-up, %d "
             "interleaved rounds; load average %.2f at start, %.2f at end."
             % (started, args.server, sys.version.split()[0], redis_version(),
                args.connections, args.seconds, args.repetitions,
                load_start, os.getloadavg()[0]), "",
             "1. One process: onebox on CPU 0, wrk and redis-server on CPU 1.", ""]
    for kind, label in (("hello", "GET /hello"),
                        ("write", "notes writes, POST /api/notes and DELETE alternating")):
        lines += ["%s:" % label, "", head, "|---|---:|---:|---:|---:|---:|---:|"]
        for mode in ("default", "cluster"):
            lines.append("| %s | %s |" % (mode, figures(rows, (mode, kind))))
        ratio = median_of(rows, ("cluster", kind), "rps") / median_of(rows, ("default", kind),
                                                                      "rps")
        extra = median_of(rows, ("cluster", kind), "cpu_us") - median_of(
            rows, ("default", kind), "cpu_us")
        lines += ["", "cluster / default: %.2fx the req/s; %+.1f us of onebox CPU per request%s."
                  % (ratio, extra, " (the guard's shared counting and the cluster's "
                                   "bookkeeping)" if kind == "hello" else ""), ""]
    lines += ["2. GET /hello through N processes on one port (SO_REUSEPORT), everything on "
              "both CPUs; onebox CPU is the processes' sum.", "",
              head.replace("| mode |", "| processes |"), "|---|---:|---:|---:|---:|---:|---:|",
              "| default, 1 | %s |" % figures(rows, ("default", 1))]
    for count in (1, 2, 3):
        lines.append("| cluster, %d | %s |" % (count, figures(rows, ("cluster", count))))
    return "\n".join(lines)


def redis_version():
    output = subprocess.run(["redis-server", "--version"], capture_output=True,
                            text=True).stdout
    found = re.search(r"v=(\S+)", output)
    return "redis-server " + (found.group(1) if found else "(version unknown)")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default=os.path.join(ROOT, "server.py"),
                        help="the onebox server.py to run (default: this checkout's)")
    parser.add_argument("--repetitions", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seconds", type=int, default=5, help="length of each hello run")
    parser.add_argument("--connections", type=int, default=50, help="keep-alive connections")
    return parser.parse_args()


def main():
    args = parse_args()
    bench_http.ensure_wrk()
    started, load_start = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="onebox-cluster-")
    redis = None
    try:
        site = static.make_site(work)
        with open(os.path.join(work, "note.lua"), "w") as lua:
            lua.write(NOTE_SCRIPT)
        rows = {}
        redis = Redis(work, static.CLIENT_CPU)
        for round_number in range(1, args.repetitions + 1):
            one_process(args, site, work, redis, round_number, rows)
        redis.stop()
        redis = Redis(os.path.join(work, "both"), BOTH_CPUS)
        for round_number in range(1, args.repetitions + 1):
            scaling(args, site, work, redis, round_number, rows)
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = report(rows, args, started, load_start)
    print("\n" + text)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as out:
        out.write(text + "\n")


if __name__ == "__main__":
    main()
