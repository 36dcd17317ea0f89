#!/usr/bin/env python3
"""What counting costs: hello req/s with metrics on (the shipped default) against metrics off.

    python3 bench/bench_metrics.py [--rounds 8] [--seconds 3] [--connections 16]
                                   [--off-flag=--FLAG=VALUE ...] [--instructions]

Two servers from this checkout run side by side, the same settings but for ``[admin] metrics``
(``--admin-metrics off``; the status page's recorder too, ``--status-recorder off``, when this
checkout has it; plus every ``--off-flag``); both pinned to CPU 0, wrk to CPU 1 (bench_http.py's
helpers). Each round measures both, in alternating order, after a one-second warm-up; the
report is the median of the rounds' req/s and of the server's CPU time per request, and the
median of the per-round on/off ratios (interleaving keeps a noisy neighbour from favouring one
side). The target is on/off >= 0.95.

On this shared 2-core machine a round's req/s moves by 10% and more with the neighbours' load,
so ``--instructions`` also counts what a request costs in CPU instructions, which does not
depend on the neighbours: each server runs under valgrind (callgrind), once for
200 requests and once for 1,200, on one keep-alive connection, and the difference over the
difference in requests is the cost of one request (start-up and shut-down cancel out; the
runner, shared with ab_static.py, is bench/_valgrind.py). It needs valgrind (Debian's package)
and takes about a minute.

Both servers run with the access log off unless ``--access-log on`` (the shipped default, here
written to a file): a smaller denominator makes the counters' share larger, so off gives the
stricter ratio. Both have the guard checking every request with its limits out of
reach (wrk's 127.0.0.1 taken out of the trusted and allowed lists, as bench_guard.py does), and
the per-client caps lifted (wrk is one client with many connections).

Never imported by the runtime.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import _valgrind  # noqa: E402
from bench_guard import LOOPBACK_NOT_TRUSTED, OUT_OF_REACH, cpu_seconds  # noqa: E402
from bench_http import ensure_wrk, start, stop, wrk  # noqa: E402

BASE = [sys.executable, "server.py", "--port", "0",
        "--max-connections-per-ip", "4096", "--max-workers-per-client", "1000000",
        "--admin-port", "0"] + OUT_OF_REACH + LOOPBACK_NOT_TRUSTED


def instructions_per_request(flags, work):
    """CPU instructions one hello costs a server started with ``flags`` (valgrind's count)."""
    def argv_for(run):
        return BASE + flags + ["--data-dir", os.path.join(run, "data")]
    return _valgrind.instructions_per_request(argv_for, "/hello", work, cwd=ROOT).per_request


def measure(url, seconds, connections, pid):
    wrk(url + "/hello", 1, connections)   # warm-up
    before = cpu_seconds(pid)
    result = wrk(url + "/hello", seconds, connections)
    result["cpu_us"] = (cpu_seconds(pid) - before) * 1e6 / max(1.0, result["rps"] * seconds)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--access-log", choices=("on", "off"), default="off",
                        help="both servers' access log (default off: the stricter ratio; on is "
                             "the shipped default, to a file)")
    parser.add_argument("--instructions", action="store_true",
                        help="also count CPU instructions per request under valgrind")
    parser.add_argument("--off-flag", action="append", default=[],
                        help="another flag for the 'off' server (FLAG=VALUE), e.g. the status "
                             "page's ring buffer")
    args = parser.parse_args()
    ensure_wrk()
    off_flags = ["--admin-metrics", "off"]
    help_text = subprocess.run([sys.executable, "server.py", "--help"], capture_output=True,
                               text=True, cwd=ROOT).stdout
    if "--status-recorder" in help_text:   # the status page's ring buffer (onebox/activity.py)
        off_flags += ["--status-recorder", "off"]
    for flag in args.off_flag:
        off_flags += flag.split("=", 1)
    both = ["--access-log", args.access_log]
    work = tempfile.mkdtemp(prefix="onebox-metrics-")
    servers = {}
    try:
        for name, extra in (("on", []), ("off", off_flags)):
            servers[name] = start(BASE + both + extra + ["--data-dir", os.path.join(work, name)],
                                  work)
        results = {"on": [], "off": []}
        for number in range(args.rounds):
            order = ("on", "off") if number % 2 == 0 else ("off", "on")
            for name in order:
                process, url = servers[name]
                results[name].append(measure(url, args.seconds, args.connections, process.pid))
            print("round %d: on %6.0f req/s %5.0f us CPU/req | off %6.0f req/s %5.0f us CPU/req"
                  % (number + 1, results["on"][-1]["rps"], results["on"][-1]["cpu_us"],
                     results["off"][-1]["rps"], results["off"][-1]["cpu_us"]), flush=True)
    finally:
        for process, _ in servers.values():
            stop(process)
        shutil.rmtree(work, ignore_errors=True)
    report(results, args, off_flags)
    if args.instructions:
        work = tempfile.mkdtemp(prefix="onebox-instructions-")
        try:
            on, off = (instructions_per_request(both + flags, work) for flags in ([], off_flags))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print("CPU instructions per hello (valgrind, one connection): on %.0f, off %.0f; "
              "counting costs %.0f (%.1f%%)" % (on, off, on - off, 100.0 * (on - off) / off))


def report(results, args, off_flags):
    ratios = [on["rps"] / off["rps"] for on, off in zip(results["on"], results["off"])]
    cpu_ratios = [on["cpu_us"] / off["cpu_us"] for on, off in zip(results["on"], results["off"])]
    print()
    print("hello, wrk -t1 -c%d, %d rounds of %d s, access log %s; off = %s"
          % (args.connections, args.rounds, args.seconds, args.access_log, " ".join(off_flags)))
    for name in ("on", "off"):
        print("metrics %-3s median %6.0f req/s, %5.0f us CPU/request, p99 %.2f ms"
              % (name, statistics.median(r["rps"] for r in results[name]),
                 statistics.median(r["cpu_us"] for r in results[name]),
                 statistics.median(r["p99"] for r in results[name])))
    print("on/off req/s: median %.3fx (rounds %.3fx-%.3fx); CPU/request on/off: median %.3fx"
          % (statistics.median(ratios), min(ratios), max(ratios), statistics.median(cpu_ratios)))
    print("target >= 0.95x: %s" % ("met" if statistics.median(ratios) >= 0.95 else "NOT met"))


if __name__ == "__main__":
    main()
