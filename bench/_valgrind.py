"""CPU instructions per request under valgrind (callgrind): shared by bench_metrics.py and
ab_static.py. Never imported by the runtime.

On a shared machine a request's wall-clock cost moves with the neighbours' load; the count of
instructions it executes does not. A server runs under callgrind twice, once answering
``counts[0]`` requests and once ``counts[1]``, all on one keep-alive connection; the difference
of the two totals over the difference of the counts is the cost of one request (start-up,
warm-up and shut-down cancel out). Only user space is counted: what the kernel does for a
syscall (sendfile's copying, say) is not.

The server's argv must name the real interpreter (``sys.executable``), not a wrapper such as
pyenv's shim: valgrind would count the shell script and not follow it into Python.
PYTHONHASHSEED is fixed so that two runs hash (and so probe dicts and sets) alike.

Two runs of one version agree within ~0.1% (~1% with the status recorder on, whose work
follows the clock). Two versions' counts can differ by ~500 a request for nothing either does:
where strings land in memory decides whether CPython's type-attribute cache collides on the
request's path (seen as find_name_in_mro and dict lookups in per_function's breakdown).

Needs valgrind (Debian's package).
"""
import glob
import http.client
import os
import re
import subprocess
import tempfile
import time

from bench_http import stop

REQUESTS = (200, 1200)


class Count:
    """One server's count: ``per_request`` instructions, and the two callgrind dumps (the
    smaller run's, the larger's) for a per-function breakdown."""

    def __init__(self, per_request, dumps, counts):
        self.per_request = per_request
        self.dumps = dumps
        self.counts = counts


def instructions_per_request(argv_for, path, work, counts=REQUESTS, cwd=None):
    """Count the instructions one ``GET path`` costs the server that ``argv_for(run_dir)``
    starts (a fresh run directory each time, for its data directory). Returns a Count."""
    dumps, totals = [], []
    for count in counts:
        run = tempfile.mkdtemp(dir=work)
        process, host, port = _start(argv_for(run), run, cwd)
        try:
            _drive(host, port, path, count)
        finally:
            stop(process, 300)   # Python exits slowly under valgrind too
        dump, total = _largest_dump(run)
        dumps.append(dump)
        totals.append(total)
    return Count((totals[1] - totals[0]) / float(counts[1] - counts[0]), dumps, counts)


def _start(argv, run, cwd):
    """Start ``argv`` under callgrind; wait (up to two minutes: Python starts ~50 times slower
    under valgrind) for its "listening on" line; return (process, host, port)."""
    out_path = os.path.join(run, "out")
    with open(out_path, "w") as out:
        process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=%s/callgrind.%%p" % run]
            + argv, cwd=cwd, stdout=out, stderr=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONHASHSEED="0"))
    for _ in range(1200):
        with open(out_path) as text:
            match = re.search(r"listening on http://([\d.]+):(\d+)", text.read())
        if match:
            return process, match.group(1), int(match.group(2))
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise SystemExit("server under valgrind did not start: %s" % " ".join(argv))


def _drive(host, port, path, count):
    """``count`` GETs of ``path`` on one keep-alive connection, each body read whole."""
    connection = http.client.HTTPConnection(host, port, timeout=120)
    try:
        for _ in range(count):
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit("GET %s under valgrind: %d" % (path, response.status))
    finally:
        connection.close()


def _largest_dump(run):
    """(path, total) of the run's callgrind dump with the most instructions: one per process,
    and the server is the one that did the work."""
    best = (None, 0)
    for name in glob.glob(os.path.join(run, "callgrind.*")):
        with open(name) as dump:
            for line in dump:
                if line.startswith(("summary:", "totals:")):
                    total = int(line.split()[1])
                    if total > best[1]:
                        best = (name, total)
    return best


def per_function(count):
    """Self instructions per request of each function (callgrind_annotate on both dumps,
    larger minus smaller, over the difference in requests): where a request's cost goes."""
    small, large = (_annotate(dump) for dump in count.dumps)
    requests = float(count.counts[1] - count.counts[0])
    return {name: (large.get(name, 0) - small.get(name, 0)) / requests
            for name in set(small) | set(large)}


# "1,234,567  file.c:function [/path/to/object]" (the object is left out when it is the binary)
ANNOTATED = re.compile(r"^\s*([\d,]+)\s+(\S.*?)\s*$")


def _annotate(dump):
    """{function: self instructions} of a callgrind dump, every function (threshold 100%)."""
    output = subprocess.run(["callgrind_annotate", "--threshold=100", "--show-percs=no",
                             "--auto=no", "--inclusive=no", dump],
                            capture_output=True, text=True, check=True).stdout
    costs, started = {}, False
    for line in output.splitlines():
        if not started:   # the table follows the "file:function" header's dashes
            started = line.startswith("Ir") and "file:function" in line
            continue
        match = ANNOTATED.match(line)
        if match:
            name = _short(match.group(2))
            costs[name] = costs.get(name, 0) + int(match.group(1).replace(",", ""))
    return costs


def _short(name):
    """A function's name without its path or object: ".../Objects/dictobject.c:_Py_dict_lookup'2
    [/.../libpython3.11.so.1.0]" becomes "dictobject.c:_Py_dict_lookup". callgrind's 'N marks a
    recursion depth, which would split one function's cost over several names."""
    name, _, obj = name.partition(" [")
    where, _, function = name.rpartition(":")
    if where in ("", "???"):   # no debug information: the library says more than "???"
        where = obj.rstrip("]") or "???"
    return "%s:%s" % (os.path.basename(where), re.sub(r"'\d+$", "", function))
