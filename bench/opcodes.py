"""Python opcodes per request, by function: where a request's interpreter time goes.

    python3 bench/opcodes.py REPO N1 N2 [hello|json|1k] [CONNECTIONS]

Runs REPO/server.py under a tracer (sys.settrace with opcode events, every thread) twice, for
N1 and N2 keep-alive GETs of /hello (json: /hello/bench, a route with a wildcard answering
JSON; 1k: a 1 KiB page), and prints the difference per request
by function (file:function). With CONNECTIONS (default 1) that many clients share the requests,
each on its own kept connection, so that the reactor hands connections to the workers and back
(one connection: a worker holds it, and the reactor sleeps). Deterministic, unlike the clock, and a minute where valgrind
(bench/ab_static.py --instructions) takes several: issue 23 found its cuts with it (an opcode
costs ~25-35 CPU instructions on CPython 3.11; a call's frame several hundred more, which this
does not count). Flags as bench/ab_static.py's: guard on, its limits out of reach.
"""
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from _valgrind import _drive   # (bench/: the directory this runs from)

# Run in the server's process before server.py: counts each opcode against its function.
TRACER = r'''
import atexit, collections, json, os, runpy, sys, threading
counts = collections.Counter()
def tracer(frame, event, arg):
    frame.f_trace_opcodes = True
    code = frame.f_code
    key = "%s:%s" % (os.path.basename(code.co_filename), code.co_name)
    def local(frame, event, arg):
        if event == "opcode":
            counts[key] += 1
        return local
    return local
def dump():
    with open(os.environ["OPCODES_OUT"], "w") as out:
        json.dump(counts, out)
atexit.register(dump)
threading.settrace(tracer)
sys.settrace(tracer)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''
SERVER_FLAGS = ["--port", "0", "--admin-port", "0", "--access-log", "off",
                "--limits-client-rate-per-s", "1e9", "--limits-client-burst", "1000000000",
                "--limits-route-rate-per-s", "1e9", "--limits-route-burst", "1000000000",
                "--limits-trusted-proxies", "", "--limits-allow-cidrs", "",
                "--max-workers-per-client", "1000000"]


def counts_for(repo, requests, path, pages, connections=1):
    """{file:function: opcodes} of a server that answered ``requests`` GETs of ``path``."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "counts.json")
        command = [sys.executable, "-c", TRACER, os.path.join(repo, "server.py"),
                   "--data-dir", os.path.join(scratch, "data"), "--pages-dir", pages]
        server = subprocess.Popen(command + SERVER_FLAGS, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, env=dict(os.environ,
                                                                      OPCODES_OUT=out),
                                  text=True, cwd=repo)
        port = None
        for line in server.stdout:
            found = re.search(r"listening on https?://[^ ]*:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        clients = [threading.Thread(target=_drive,
                                    args=("127.0.0.1", port, path, requests // connections))
                   for _ in range(connections)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        time.sleep(0.5)
        server.terminate()
        server.wait(30)
        server.stdout.close()
        with open(out) as counted:
            return collections.Counter(json.load(counted))


def main():
    repo, first, second = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    target = sys.argv[4] if len(sys.argv) > 4 else "hello"
    connections = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    with tempfile.TemporaryDirectory() as pages:
        with open(os.path.join(pages, "page1k.html"), "w") as page:
            page.write("x" * 1024)
        path = {"hello": "/hello", "json": "/hello/bench", "1k": "/page1k.html"}[target]
        before = counts_for(repo, first, path, pages, connections)
        after = counts_for(repo, second, path, pages, connections)
    per_request = {name: (after[name] - before[name]) / (second - first)
                   for name in set(before) | set(after)}
    print("total opcodes per request: %.1f" % sum(per_request.values()))
    for name, count in sorted(per_request.items(), key=lambda item: -item[1]):
        if abs(count) >= 0.5:
            print("%8.1f  %s" % (count, name))


if __name__ == "__main__":
    main()
