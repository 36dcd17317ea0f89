#!/usr/bin/env python3
"""Two (or more) versions of onebox against nginx, interleaved, in one run.

    python3 bench/ab_static.py OLD/server.py NEW/server.py [--rounds 6] [--seconds 3]
                               [--target 10m|1k|hello|json ...] [--features-off]
                               [--instructions [--functions N] [--keep-dumps DIR]]

A target is the 10 MiB file (default), the 1 KiB page, /hello, a handler, or /hello/bench, a
route with a wildcard answering JSON (nginx has neither: its runs there are of a missing file,
a 404, and their ratio means little);
``--target`` may be given more than once.

For telling whether a change to the request path moved the server's CPU: each server.py given
(a copy of an older checkout, say) and nginx serve the same directory, pinned as
bench_static.py pins them, and take turns in each round (the order rotating from round to
round, so that none always follows the same neighbour). Per run it prints the server's CPU time
per request (utime + stime, children included; per MiB too for the 10 MiB file) and its share
in user space (utime: what valgrind counts, below), its context switches per request (every
thread's voluntary and involuntary switches, from /proc) and its req/s; at the end, per
server, the medians, the median and range of the per-round CPU ratio to nginx, and of the
per-round req/s and CPU ratios to the first server given. A round's ratio
swings by 20% or more on a shared VM, so compare medians, and run it more than once.

``--features-off`` adds, for each version that has them, a run of it with the request counting
of /metrics and the status page's recorder off (``--admin-metrics off --status-recorder off``,
on by default since issue 14): named vN-off, it separates what a later version's engine costs
from what its counting costs.

``--instructions`` also counts what a request costs in CPU instructions under valgrind
(bench/_valgrind.py, shared with bench_metrics.py), which a noisy neighbour cannot move, for
every version and target (all three unless ``--target`` names some), and prints them side by
side with the ratio to the first version. An instruction ratio r moves the CPU per request by
about (r - 1) times the user share of the wall-clock rounds. The 10 MiB count is per MiB and of
user space only: sendfile's copying happens in the kernel, which valgrind does not see, so the
wall-clock rounds (10 MiB unless ``--target`` says otherwise; ``--rounds 0`` skips them) stay
the measure there.
``--functions N`` lists, per target, the N functions (callgrind_annotate, self cost) whose
instructions per request differ most from the first version's; ``--keep-dumps DIR`` keeps the
callgrind dumps for callgrind_annotate by hand.

Versions before a flag existed run without it: the per-client worker cap (issue 12) is lifted
only where it exists, and the counting is turned off only where it exists.

Uses bench_static.py's site, nginx config and helpers. Never imported by the runtime.
"""
import argparse
import functools
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import _valgrind
import bench_static as static

TARGETS = {"10m": static.FILES[1][1], "1k": static.FILES[0][1], "hello": "hello",
           "json": "hello/bench"}
SIZES = {"10m": static.FILES[1][2], "1k": static.FILES[0][2], "hello": None, "json": None}
# Requests per valgrind run (see _valgrind.py): fewer of the 10 MiB file, whose every request
# moves 10 MiB through the client; the difference still spans 100 requests.
INSTRUCTION_REQUESTS = {"hello": (200, 1200), "json": (200, 1200), "1k": (200, 1200),
                        "10m": (20, 120)}
# What a feature-neutral run turns off, where the version has it: /metrics' request counting
# and the status page's recorder (issue 14; both on by default).
FEATURES = (("--admin-metrics", "off"), ("--status-recorder", "off"))


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


@functools.lru_cache(maxsize=None)
def _help(server_py):
    """The version's --help text: which flags it has."""
    return subprocess.run([sys.executable, server_py, "--help"], capture_output=True,
                          text=True).stdout


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
    return ["--max-workers-per-client", "1000000"] \
        if "--max-workers-per-client" in _help(server_py) else []


def features_off(server_py):
    """The FEATURES flags this version has, set off (empty for versions before them)."""
    flags = []
    for flag, value in FEATURES:
        if flag in _help(server_py):
            flags += [flag, value]
    return flags


def versions(paths, with_features_off):
    """[(name, server.py, extra flags)]: v0, v1, ... as given, and vN-off after each version
    that has features to turn off, when asked."""
    chosen = []
    for number, path in enumerate(paths):
        path = os.path.abspath(path)
        chosen.append(("v%d" % number, path, []))
        if with_features_off and features_off(path):
            chosen.append(("v%d-off" % number, path, features_off(path)))
    return chosen


# --- wall clock: CPU time and req/s, interleaved rounds ---------------------------------------

def start_servers(chosen, site, work):
    """Start every version and nginx on ``site``; [(name, process, base URL)]."""
    port = static.free_port()
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as handle:
        handle.write(static.NGINX_CONF.format(work=work, site=site, port=port))
    argvs = [(name, onebox_argv(path, site, os.path.join(work, "data-" + name)) + extra, None)
             for name, path, extra in chosen]
    argvs.append(("nginx", [static.ensure_tools(), "-c", conf, "-e",
                            os.path.join(work, "error.log")], "http://127.0.0.1:%d/" % port))
    running = []
    try:
        for name, argv, url in argvs:
            process, url = static.start(argv, url)
            running.append((name, process, url))
    except BaseException:
        stop_servers(running)
        raise
    return running


def stop_servers(running):
    for _, process, _ in running:
        static.stop(process)


def one_run(name, process, url, target, args, round_number):
    """One timed wrk run (after a one-second warm-up): the server's CPU per request,
    context switches per request and req/s."""
    url += TARGETS[target]
    static.wrk(url, 1, args.connections)   # warm-up
    cpu, user = static.cpu_seconds(process.pid), static.cpu_seconds(process.pid, system=False)
    switches = context_switches(process.pid)
    requests, elapsed, errors = static.wrk(url, args.seconds, args.connections)
    cpu = static.cpu_seconds(process.pid) - cpu
    row = {"cpu_us": cpu * 1e6 / requests,
           "user": (static.cpu_seconds(process.pid, system=False) - user) / max(cpu, 1e-9),
           "switches": (context_switches(process.pid) - switches) / requests,
           "rps": requests / elapsed}
    per_mib = ("%7.3f ms CPU/MiB " % (row["cpu_us"] / 1000 / (SIZES[target] / static.MIB))
               if target == "10m" else "")
    print("round %d %-5s %-7s %7.0f us CPU/request (%3.0f%% user) %s%5.1f switches/request "
          "%6.0f req/s %s" % (round_number, target, name, row["cpu_us"], 100 * row["user"],
                              per_mib, row["switches"], row["rps"], errors), flush=True)
    return row


def wall_rounds(running, targets, args):
    """{(name, target): [row per round]}; in each round every target, and for each every
    server, in an order that rotates by one server a round."""
    rows = {(name, target): [] for name, _, _ in running for target in targets}
    for round_number in range(1, args.rounds + 1):
        shift = (round_number - 1) % len(running)
        order = running[shift:] + running[:shift]
        for target in targets:
            for name, process, url in order:
                rows[(name, target)].append(one_run(name, process, url, target, args,
                                                    round_number))
    return rows


def ratios(mine, theirs, key):
    """Per-round ratios of ``key``, mine over theirs: (median, lowest, highest)."""
    each = [a[key] / b[key] for a, b in zip(mine, theirs)]
    return statistics.median(each), min(each), max(each)


def wall_report(rows, names, targets, args):
    print("\nwall clock: wrk -t1 -c%d, %d rounds of %d s; medians, and per-round ratios "
          "(median, range)" % (args.connections, args.rounds, args.seconds))
    for target in targets:
        base = rows[(names[0], target)]
        for name in names:
            mine = rows[(name, target)]
            cpu, user, switches, rps = (statistics.median(row[key] for row in mine)
                                        for key in ("cpu_us", "user", "switches", "rps"))
            line = ("%-5s %-7s %7.0f us CPU/request (%2.0f%% user), %4.1f switches/request, "
                    "%6.0f req/s" % (target, name, cpu, 100 * user, switches, rps))
            if target == "10m":
                line += ", %.3f ms CPU/MiB" % (cpu / 1000 / (SIZES[target] / static.MIB))
            if name != "nginx":
                line += "; CPU vs nginx %.2fx (%.2fx-%.2fx)" % ratios(
                    mine, rows[("nginx", target)], "cpu_us")
            if name not in (names[0], "nginx"):
                line += "; vs %s: req/s %.3fx (%.2fx-%.2fx)" % (
                    (names[0],) + ratios(mine, base, "rps"))
                line += ", CPU %.3fx (%.2fx-%.2fx)" % ratios(mine, base, "cpu_us")
            print(line)


# --- CPU instructions under valgrind ----------------------------------------------------------

def count_instructions(chosen, site, work, targets):
    """{(name, target): _valgrind.Count} for every version and target."""
    counts = {}
    for target in targets:
        for name, path, extra in chosen:
            def argv_for(run, path=path, extra=extra):
                return onebox_argv(path, site, os.path.join(run, "data")) + extra
            counts[(name, target)] = count = _valgrind.instructions_per_request(
                argv_for, "/" + TARGETS[target], work, INSTRUCTION_REQUESTS[target])
            print("instructions %-5s %-7s %10.0f per request" % (target, name,
                                                                 count.per_request),
                  flush=True)
    return counts


def instruction_report(counts, names, targets):
    """The counts side by side, per request (per MiB for the 10 MiB file), and each version's
    ratio to the first."""
    print("\nCPU instructions (valgrind callgrind, one keep-alive connection; 10 MiB: per MiB, "
          "user space only, sendfile's kernel work not counted)")
    header = "%-14s" % "target" + "".join("%12s" % name for name in names)
    header += "".join("%12s" % ("%s/%s" % (name, names[0])) for name in names[1:])
    print(header)
    for target in targets:
        scale = SIZES[target] / static.MIB if target == "10m" else 1
        figures = [counts[(name, target)].per_request / scale for name in names]
        label = "10 MiB per MiB" if target == "10m" else target
        print("%-14s" % label + "".join("%12.0f" % figure for figure in figures)
              + "".join("%11.3fx" % (figure / figures[0]) for figure in figures[1:]))


def function_report(counts, names, targets, top):
    """Per target and later version, the ``top`` functions whose self instructions per
    request differ most from the first version's (callgrind_annotate of both runs)."""
    for target in targets:
        reference = _valgrind.per_function(counts[(names[0], target)])
        for name in names[1:]:
            mine = _valgrind.per_function(counts[(name, target)])
            differences = sorted(((mine.get(f, 0) - reference.get(f, 0), f)
                                  for f in set(mine) | set(reference)),
                                 key=lambda pair: -abs(pair[0]))[:top]
            print("\n%s: %s against %s, self instructions per request (%s, %s, difference)"
                  % (target, name, names[0], names[0], name))
            for difference, function in differences:
                print("  %10.0f %10.0f %+10.0f  %s" % (reference.get(function, 0),
                                                       mine.get(function, 0), difference,
                                                       function))


def keep_dumps(counts, directory):
    os.makedirs(directory, exist_ok=True)
    for (name, target), count in counts.items():
        for requests, dump in zip(count.counts, count.dumps):
            shutil.copy(dump, os.path.join(directory, "%s-%s-%d.callgrind"
                                           % (name, target, requests)))


# --- main -------------------------------------------------------------------------------------

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("servers", nargs="+", help="server.py files to compare")
    parser.add_argument("--rounds", type=int, default=6, help="0: no wall-clock rounds")
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--target", choices=sorted(TARGETS), action="append",
                        help="10m (default), 1k or hello; may be repeated")
    parser.add_argument("--features-off", action="store_true",
                        help="also run each version with %s" % " ".join(sum(FEATURES, ())))
    parser.add_argument("--instructions", action="store_true",
                        help="also count CPU instructions per request under valgrind")
    parser.add_argument("--functions", type=int, default=0, metavar="N",
                        help="with --instructions: the N functions that differ most")
    parser.add_argument("--keep-dumps", metavar="DIR",
                        help="with --instructions: copy the callgrind dumps here")
    return parser.parse_args()


def main():
    args = parse_args()
    wall_targets = args.target or ["10m"]
    counted_targets = args.target or ["hello", "1k", "10m"]
    chosen = versions(args.servers, args.features_off)
    for name, path, extra in chosen:
        print("%-6s = %s %s" % (name, path, " ".join(extra)))
    print("load average at start: %.2f %.2f %.2f" % os.getloadavg(), flush=True)
    work = tempfile.mkdtemp(prefix="onebox-ab-")
    try:
        site = static.make_site(work)
        os.mkdir(os.path.join(work, "tmp"))
        if args.rounds > 0:
            running = start_servers(chosen, site, work)
            try:
                rows = wall_rounds(running, wall_targets, args)
            finally:
                stop_servers(running)
            wall_report(rows, [name for name, _, _ in running], wall_targets, args)
        if args.instructions:
            counts = count_instructions(chosen, site, work, counted_targets)
            names = [name for name, _, _ in chosen]
            instruction_report(counts, names, counted_targets)
            if args.functions:
                function_report(counts, names, counted_targets, args.functions)
            if args.keep_dumps:
                keep_dumps(counts, args.keep_dumps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("load average at end: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
