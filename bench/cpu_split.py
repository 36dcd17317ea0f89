#!/usr/bin/env python3
"""Where a running server's CPU goes per request: inside sendfile, or everything else.

    python3 bench/cpu_split.py --pid PID --url URL [--seconds 3] [--connections 16]

Samples PID's threads with ``perf record -e cpu-clock -g`` (a software clock: it works where a
VM hides the hardware counters) while wrk, pinned to CPU 1, requests URL over keep-alive. Then
it prints, in microseconds of CPU per request: the total, the part spent under the sendfile
system call (the kernel moving the file: the same work for any server), the rest (what the
server itself adds: its own code, its other system calls, its thread hand-offs), and the part
of the total spent on the process's first thread (onebox's reactor). Run it against onebox and
nginx's worker in turn (pin both servers to CPU 0 as bench_static.py does) to compare the rest.

Needs Linux, perf (Debian's linux-perf) and wrk. Never imported by the runtime.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

SAMPLE_HZ = 2000


def record(pid, url, seconds, connections, data):
    perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", str(SAMPLE_HZ), "-g",
                             "-p", str(pid), "-o", data, "--", "sleep", str(seconds)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        output = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c%d" % connections,
                                 "-d%ds" % seconds, url], check=True, capture_output=True,
                                text=True).stdout
    finally:
        perf.wait()
    return int(re.search(r"(\d+) requests in", output).group(1))


def split(data):
    """(samples, under sendfile, on the first thread) from perf's call chains."""
    script = subprocess.run(["perf", "script", "-i", data, "-F", "tid,ip,sym"], check=True,
                            capture_output=True, text=True).stdout
    total = in_sendfile = 0
    threads = []
    counted = True
    for line in script.splitlines():
        if not line.strip():
            continue
        if not line.startswith("\t"):          # a sample's first line: its thread id
            total += 1
            threads.append(int(line.split()[0]))
            counted = False
        elif not counted and "sys_sendfile64" in line:
            in_sendfile += 1
            counted = True
    first = min(threads) if threads else 0
    return total, in_sendfile, threads.count(first)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pid", type=int, required=True, help="the server process")
    parser.add_argument("--url", required=True, help="what wrk requests")
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "perf.data")
        subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c%d" % args.connections, "-d1s",
                        args.url], check=True, capture_output=True)   # warm-up
        requests = record(args.pid, args.url, args.seconds, args.connections, data)
        total, in_sendfile, first = split(data)
    if not requests or not total:
        sys.exit("no requests or no samples: is the server at --pid the one at --url?")
    per_request = 1e6 / SAMPLE_HZ / requests
    print("%d requests; CPU us per request: total %.0f, in sendfile %.0f, the rest %.0f, "
          "first thread %.0f" % (requests, total * per_request, in_sendfile * per_request,
                                 (total - in_sendfile) * per_request, first * per_request))


if __name__ == "__main__":
    main()
