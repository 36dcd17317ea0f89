"""Benchmark of handlers/_state.py against sqlite3, printed as a markdown table.

    python3 bench/bench_state.py [--seconds 3] [--dir DIR]

Rows are the measurements (ROWS), columns are the systems measured (COLUMNS): each column is a
function ``measure(row_id, ctx) -> number or None`` (None prints as "-"). To add a column, say
the HTTP API of a running server, append ``("HTTP", measure_http)`` to COLUMNS before calling
main(); to add a row, append to ROWS and teach the column functions its id.

Rules of fairness: both sides write one small JSON value per durable transaction, on the same
disk (a temp dir under --dir, default the current directory: never tmpfs, where fsync is free),
with their strongest ordinary durability (Store ``always``; sqlite3 WAL + synchronous=FULL, one
connection per thread). Each measurement runs a fixed time, so the whole run takes about a minute.
"""
import argparse
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from handlers._state import Store  # noqa: E402  (after the path set-up above)

ROWS = [  # (row id, what is measured)
    ("writes-1", "durable writes/s, 1 writer thread"),
    ("writes-16", "durable writes/s, 16 writer threads"),
    ("writes-64", "durable writes/s, 64 writer threads"),
    ("reads", "get() reads/s, 1 reader while 4 threads write"),
    ("memory", "RSS MiB per 100,000 small keys"),
]
READ_KEYS = 10000  # keys preloaded for the read row


class Context(object):
    """What every measurement gets: the run time of one measurement and a fresh directory."""

    def __init__(self, seconds, base_dir):
        self.seconds = seconds
        self.base_dir = base_dir

    def fresh_dir(self, name):
        return tempfile.mkdtemp(prefix=name + "-", dir=self.base_dir)


# --- driving threads for a fixed time ---------------------------------------------------------

def run_threads(n, seconds, make_worker):
    """Run n threads for `seconds`, thread i calling make_worker(i)() in a loop (make_worker runs
    in the thread; an op with a .close is closed there). Return ([ops per thread], elapsed s)."""
    stop = threading.Event()
    counts = [0] * n
    ready = threading.Barrier(n + 1)

    def loop(i):
        op = make_worker(i)
        ready.wait()
        done = 0
        while not stop.is_set():
            op()
            done += 1
        counts[i] = done
        if hasattr(op, "close"):
            op.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.monotonic()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return counts, time.monotonic() - start


def ops_per_second(n, seconds, make_worker):
    counts, elapsed = run_threads(n, seconds, make_worker)
    return sum(counts) / elapsed


def reads_per_second(seconds, make_reader, make_writer, writers=4):
    """Thread 0 reads, the others write all along; only the reads are counted."""
    counts, elapsed = run_threads(writers + 1, seconds,
                                  lambda i: make_reader() if i == 0 else make_writer(i))
    return counts[0] / elapsed


def small_value(i):
    return {"n": i, "name": "item %d" % i}


# --- column: the Store's direct API -----------------------------------------------------------

def measure_store(row_id, ctx):
    if row_id.startswith("writes-"):
        return store_writes(int(row_id.split("-")[1]), ctx)
    if row_id == "reads":
        return store_reads(ctx)
    if row_id == "memory":
        return memory_in_child(ctx)
    return None


def store_writes(n, ctx):
    store = Store(ctx.fresh_dir("store"), durability="always", log=lambda m: None)
    try:
        def make_worker(t):
            counter = iter(range(10 ** 9))
            return lambda: store.put("w/%d/%d" % (t, next(counter) % 1000), small_value(t))
        rate = ops_per_second(n, ctx.seconds, make_worker)
        stats = store.stats()
        sys.stderr.write("  store %2d writers: %d writes, %d fsyncs (%.1f writes per fsync)\n"
                         % (n, stats["writes"], stats["fsyncs"],
                            stats["writes"] / max(1, stats["fsyncs"])))
        return rate
    finally:
        store.close()


def store_reads(ctx):
    store = Store(ctx.fresh_dir("store"), durability="always", log=lambda m: None)
    try:
        with store.transaction() as tx:
            for i in range(READ_KEYS):
                tx.put("r/%d" % i, small_value(i))

        def make_reader():
            rng = random.Random(1)
            return lambda: store.get("r/%d" % rng.randrange(READ_KEYS))
        return reads_per_second(ctx.seconds, make_reader,
                                lambda t: lambda: store.put("w/%d" % t, small_value(t)))
    finally:
        store.close()


# --- column: sqlite3 --------------------------------------------------------------------------

def measure_sqlite(row_id, ctx):
    if row_id.startswith("writes-"):
        return sqlite_writes(int(row_id.split("-")[1]), ctx)
    if row_id == "reads":
        return sqlite_reads(ctx)
    return None  # sqlite keeps its data on disk: an RSS figure would not compare


def sqlite_open(path):
    # autocommit (isolation_level=None): each statement is its own durable transaction
    conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def sqlite_db(ctx):
    path = os.path.join(ctx.fresh_dir("sqlite"), "bench.db")
    conn = sqlite_open(path)
    conn.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.close()
    return path


def sqlite_writer(path, t):
    conn = sqlite_open(path)
    counter = iter(range(10 ** 9))

    def op():
        conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)",
                     ("w/%d/%d" % (t, next(counter) % 1000), json.dumps(small_value(t))))
    op.close = conn.close
    return op


def sqlite_writes(n, ctx):
    path = sqlite_db(ctx)
    return ops_per_second(n, ctx.seconds, lambda t: sqlite_writer(path, t))


def sqlite_reads(ctx):
    path = sqlite_db(ctx)
    conn = sqlite_open(path)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO kv VALUES (?, ?)",
                     (("r/%d" % i, json.dumps(small_value(i))) for i in range(READ_KEYS)))
    conn.execute("COMMIT")
    conn.close()

    def make_reader():
        conn = sqlite_open(path)
        rng = random.Random(1)

        def op():
            row = conn.execute("SELECT value FROM kv WHERE key = ?",
                               ("r/%d" % rng.randrange(READ_KEYS),)).fetchone()
            json.loads(row[0])  # the Store's get() decodes too
        op.close = conn.close
        return op
    return reads_per_second(ctx.seconds, make_reader, lambda t: sqlite_writer(path, t))


# --- memory: measured in a child process, so the other rows don't blur it ---------------------

def vm_rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory_child(directory):
    store = Store(directory, durability="off", log=lambda m: None)
    before = vm_rss_kib()
    for i in range(100000):
        store.put("user/%06d" % i, small_value(i))
    after = vm_rss_kib()
    store.close()
    print((after - before) / 1024.0)


def memory_in_child(ctx):
    directory = ctx.fresh_dir("store-memory")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", directory],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


# --- column: the same writes through HTTP (server.py, notes area) -----------------------------

def measure_http(row_id, ctx):
    """Durable writes through the real server: each client thread PUTs its own note over one
    keep-alive connection (server defaults: 16 worker threads, durability always)."""
    if not row_id.startswith("writes-"):
        return None
    import http.client
    import re
    n = int(row_id.split("-")[1])
    server = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "server.py"), "--port", "0", "--access-log", "off",
         "--limits-enabled", "off",  # 64 writers from one address would be rate limited
         "--data-dir", ctx.fresh_dir("http")], stdout=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r":(\d+)/", server.stdout.readline()).group(1))

        def put(connection, path, text):
            connection.request("PUT" if path != "/api/notes" else "POST", path,
                               json.dumps({"text": text}), {"Content-Type": "application/json"})
            response = connection.getresponse()
            body = response.read()
            if response.status not in (200, 201):
                raise RuntimeError("HTTP %d: %r" % (response.status, body))
            return body

        def make_worker(t):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.connect()  # no Nagle: http.client sends head and body in two writes
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            note_id = json.loads(put(connection, "/api/notes", "start"))["id"]
            counter = iter(range(10 ** 9))

            def op():
                put(connection, "/api/notes/" + note_id, "value %d" % next(counter))
            op.close = connection.close
            return op
        return ops_per_second(n, ctx.seconds, make_worker)
    finally:
        server.terminate()
        server.wait(30)


# --- the table --------------------------------------------------------------------------------

COLUMNS = [  # (heading, measure(row_id, ctx)); the ratio compares the first two
    ("Store direct", measure_store),
    ("sqlite3 WAL FULL", measure_sqlite),
    ("Store via HTTP PUT", measure_http),
]


def fmt(value):
    if value is None:
        return "-"
    if value >= 100:
        return "{:,.0f}".format(value)
    return "%.1f" % value


def ratio(a, b):
    return "-" if a is None or not b else "%.1fx" % (a / b)


def render(results):
    """results: {row_id: {heading: value}} -> markdown table."""
    headings = [h for h, _ in COLUMNS]
    lines = ["| measurement | %s | ratio (%s / %s) |" % (" | ".join(headings), headings[0],
                                                         headings[1]),
             "|---|%s---|" % ("---:|" * len(headings))]
    for row_id, what in ROWS:
        cells = results.get(row_id, {})
        lines.append("| %s | %s | %s |" % (
            what, " | ".join(fmt(cells.get(h)) for h in headings),
            ratio(cells.get(headings[0]), cells.get(headings[1]))))
    return "\n".join(lines)


def filesystem_of(path):
    """(mount point, fs type) holding path, from /proc/mounts."""
    best = ("/", "?")
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, fstype = line.split()[:3]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[0]):
                best = (mount, fstype)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="run time of one measurement")
    parser.add_argument("--dir", default=os.getcwd(), help="where the temp data dirs go")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child)
    base = tempfile.mkdtemp(prefix=".bench-state-", dir=os.path.abspath(args.dir))
    mount, fstype = filesystem_of(base)
    if fstype == "tmpfs":
        sys.exit("refusing to benchmark on tmpfs (%s): fsync is free there; use --dir" % mount)
    ctx = Context(args.seconds, base)
    sys.stderr.write("data under %s (%s on %s), %.1f s per measurement\n"
                     % (base, fstype, mount, args.seconds))
    results = {}
    try:
        for row_id, what in ROWS:
            for heading, measure in COLUMNS:
                sys.stderr.write("%s: %s...\n" % (heading, what))
                results.setdefault(row_id, {})[heading] = measure(row_id, ctx)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("Python %s, %d CPUs, %s on %s\n" % (sys.version.split()[0], os.cpu_count(), fstype, mount))
    print(render(results))


if __name__ == "__main__":
    main()
