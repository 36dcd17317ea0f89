#!/usr/bin/env python3
"""A streamed response to a fast reader, two versions of onebox side by side, interleaved.

    python3 bench/bench_stream.py OLD_DIR NEW_DIR [--rounds 7] [--mib 100]

Each round starts each version in a child process of this script (its make_server, with one
route whose generator yields 64 KiB pieces as fast as it is asked), fetches the stream with
curl to /dev/null, and prints per version the median wall time and the server process's CPU
time (every thread's; curl's own is not counted) per 100 MiB. It checks that a change to how
streams are sent (issue 12: the reactor sends what a slow reader has not taken, between the
generator's turns in workers) costs a fast reader nothing. Never imported by the runtime.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PIECE = b"x" * 65536


def child(directory, mib, fetches):
    """Run in a child: serve the stream from ``directory``'s onebox; JSON of per-fetch times."""
    sys.path.insert(0, directory)
    import server as onebox
    from handlers._core import Response

    def stream(request):
        response = Response(b"", 200, [("Content-Type", "application/octet-stream")])
        response.stream = (PIECE for _ in range(mib * 16))
        return response

    built = onebox.make_server(routes=[("GET", "/t/stream", stream)], access_log=None,
                               data_dir=tempfile.mkdtemp(prefix="bench-stream-"))
    thread = threading.Thread(target=built.serve_forever)
    thread.start()
    url = "http://127.0.0.1:%d/t/stream" % built.server_address[1]
    times = []
    try:
        for _ in range(fetches):
            cpu, wall = time.process_time(), time.monotonic()
            subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True)
            times.append((time.monotonic() - wall, time.process_time() - cpu))
    finally:
        built.shutdown()
        thread.join()
        built.server_close()
    print(json.dumps(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+", help="checkout directories (with server.py)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.versions[0], args.mib, args.rounds)
        return
    results = dict((version, []) for version in args.versions)
    for _ in range(args.rounds):
        for version in args.versions:
            out = subprocess.run([sys.executable, __file__, "--child", "--rounds", "3",
                                  "--mib", str(args.mib), version], check=True,
                                 capture_output=True, text=True).stdout
            results[version].extend(json.loads(out.splitlines()[-1]))   # after its banner
    scale = 100.0 / args.mib
    print("%-40s %22s %22s" % ("version", "wall s / 100 MiB", "server CPU s / 100 MiB"))
    for version, times in results.items():
        print("%-40s %22.3f %22.3f" % (version, statistics.median(w for w, _ in times) * scale,
                                       statistics.median(c for _, c in times) * scale))


if __name__ == "__main__":
    main()
