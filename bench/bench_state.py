"""Benchmark of the store (onebox/store/) against sqlite3, printed as a markdown table.

    python3 bench/bench_state.py [--seconds 3] [--dir DIR]
    python3 bench/bench_state.py --memory    # memory per stored byte; listing with a limit
    python3 bench/bench_state.py --listing   # listing and put cost at 10k, 100k, 1M keys (~2 min)
    python3 bench/bench_state.py --notes     # a real server's notes filled with emoji

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
import bisect
import gc
import http.client
import json
import os
import random
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from onebox.store import Store  # noqa: E402  (after the path set-up)
from onebox.store.index import SortedKeys  # noqa: E402
from onebox.store.values import loads  # noqa: E402

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

def vm_rss_kib(pid="self", field="VmRSS"):
    """A process's resident set (or VmHWM: its peak) in KiB, from /proc."""
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("no %s in /proc/%s/status" % (field, pid))


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


# --- memory per stored byte (--memory): UTF-8 bytes against str ---------------------------------
#
# Each cell runs in its own child: N values of one kind held one way, and the memory that stays
# (tracemalloc: exact Python allocations; RSS: what the OS sees), per byte of the values' UTF-8
# JSON (what the store holds). "dict of str" is the baseline: the same texts as plain Python str.

MEMORY_VALUES = 10000  # values per cell
EMOJI = "\U0001F600"


def ascii_text(i):
    return "%05d" % i + "x" * 1019  # 1 KiB


def emoji_text(i):
    return "".join(chr(0x1F600 + int(d)) for d in "%05d" % i) + EMOJI * 251  # 256 emoji, unique


def mixed_text(i):
    return ascii_text(i)[:1020] + EMOJI  # one emoji makes a str 4 bytes per character


MEMORY_KINDS = [("ascii", "1 KiB ASCII", ascii_text), ("emoji", "256 emoji", emoji_text),
                ("mixed", "1020 ASCII + 1 emoji", mixed_text)]
MEMORY_HOLDERS = [  # (id, heading)
    ("dict-str", "dict of str (baseline)"),
    ("dict-json-ascii", "dict of ASCII JSON str (the store before)"),
    ("store", "Store (UTF-8 JSON bytes)"),
]


def memory_per_byte_child(kind, holder, directory):
    """Print (tracemalloc bytes, RSS bytes, stored UTF-8 bytes) held after MEMORY_VALUES puts."""
    make = dict((k, f) for k, _, f in MEMORY_KINDS)[kind]
    ascii_json = json.JSONEncoder(separators=(",", ":")).encode
    store = Store(directory, durability="off", log=lambda m: None) if holder == "store" else None
    held = {}
    gc.collect()
    tracemalloc.start()
    rss_before, traced_before = vm_rss_kib(), tracemalloc.get_traced_memory()[0]
    stored = 0
    for i in range(MEMORY_VALUES):
        key, text = "v/%05d" % i, make(i)
        stored += len(json.dumps(text, ensure_ascii=False).encode("utf-8"))
        if holder == "store":
            store.put(key, text)
        else:
            held[key] = ascii_json(text) if holder == "dict-json-ascii" else text
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - traced_before
    rss = (vm_rss_kib() - rss_before) * 1024
    tracemalloc.stop()
    print(json.dumps([traced, rss, stored]))
    if store is not None:
        store.close()


def memory_per_byte(base_dir):
    """Markdown table of memory per stored byte and per key, each cell from a child process."""
    lines = ["| values (%s of each) | held as | memory / stored byte (tracemalloc) | "
             "(memory - stored) per key | RSS / stored byte |" % "{:,}".format(MEMORY_VALUES),
             "|---|---|---:|---:|---:|"]
    for kind, what, _ in MEMORY_KINDS:
        for holder, heading in MEMORY_HOLDERS:
            directory = tempfile.mkdtemp(prefix="memory-", dir=base_dir)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child",
                                  directory, "--memory-cell", kind + ":" + holder],
                                 capture_output=True, text=True, check=True)
            traced, rss, stored = json.loads(out.stdout)
            per_key = (traced - stored) / MEMORY_VALUES
            lines.append("| %s | %s | %.2f | %.0f | %.2f |" % (
                what, heading, traced / stored, per_key, rss / stored))
    return "\n".join(lines)


# --- the notes area filled with emoji (--notes): the server's memory under its byte budget -----

NOTES_TO_POST = 2000
NOTE_EMOJI = 10000  # characters per note: MAX_TEXT_CHARS of 4-byte characters


def notes_until_refused(base_dir):
    """POST notes of NOTE_EMOJI emoji to a real server until it refuses (or NOTES_TO_POST); print
    how many it took, its first refusal, its RSS growth, and what listing one note costs."""
    server, port = start_server_process(tempfile.mkdtemp(prefix="notes-", dir=base_dir))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        rss_before = vm_rss_kib(server.pid)
        body = json.dumps({"text": EMOJI * NOTE_EMOJI}, ensure_ascii=False).encode("utf-8")
        accepted, refusal, start = 0, None, time.monotonic()
        for _ in range(NOTES_TO_POST):
            connection.request("POST", "/api/notes", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = response.read()
            if response.status != 201:
                refusal = (response.status, answer.decode("utf-8", "replace"))
                break
            accepted += 1
        elapsed = time.monotonic() - start
        rss_after, hwm = vm_rss_kib(server.pid), vm_rss_kib(server.pid, "VmHWM")
        list_s = [timed_get(connection, "/api/notes?limit=%d" % n) for n in (1, 1000)]
    finally:
        connection.close()
        server.terminate()
        server.wait(30)
    print("notes of %s emoji (%s bytes of JSON each) posted: %d accepted in %.1f s; "
          "first refusal: %s"
          % ("{:,}".format(NOTE_EMOJI), "{:,}".format(len(body)), accepted, elapsed, refusal))
    print("server RSS: %.1f MiB before, %.1f MiB after: growth %.1f MiB (peak %.1f MiB)"
          % (rss_before / 1024.0, rss_after / 1024.0, (rss_after - rss_before) / 1024.0,
             hwm / 1024.0))
    print("GET /api/notes?limit=1: %.1f ms; ?limit=1000 (%d notes): %.1f ms"
          % (list_s[0] * 1000, min(accepted, 1000), list_s[1] * 1000))


def timed_get(connection, path):
    start = time.monotonic()
    connection.request("GET", path)
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError("GET %s: HTTP %d" % (path, response.status))
    return time.monotonic() - start


def listing_cost(base_dir, count=1000, chars=10000):
    """items(prefix)[:1] (every value decoded) against items(prefix, limit=1), direct."""
    store = Store(tempfile.mkdtemp(prefix="listing-", dir=base_dir), durability="off",
                  log=lambda m: None)
    try:
        for i in range(count):
            store.put("n/%05d" % i, {"text": EMOJI * chars})
        times = []
        for listing in (lambda: store.items("n/")[:1], lambda: store.items("n/", limit=1)):
            start = time.perf_counter()
            listing()
            times.append(time.perf_counter() - start)
    finally:
        store.close()
    print("%d values of %s emoji: items(prefix)[:1] %.1f ms, items(prefix, limit=1) %.3f ms"
          % (count, "{:,}".format(chars), times[0] * 1000, times[1] * 1000))


# --- listing and put cost against the number of keys (--listing) -------------------------------
#
# Issue 10: a listing should cost what it returns, not what is stored. Each size builds one store
# (durability off: no fsync, so the figures are CPU), keys spread over four prefixes and put in
# random order, then times the listing the store had before the sorted key index (kept here as
# old_items: copy every pair under the lock, filter, sort, slice) against store.items, on the
# same dict; then the put of a new key (the index inserts) against an overwrite (it does not),
# and, for scale, one flat sorted list's insort, the index the blocks replace.

LISTING_SIZES = (10000, 100000, 1000000)
LISTING_PREFIXES = "mnop"     # keys are "<one of these>/<7 digits>"; listings ask for "n/"
PUTS_TIMED = 5000             # new keys (and overwrites) timed per round
PUT_ROUNDS = 3                # the best round counts: the machine may be shared
FLAT_INSORTS = 1000           # inserts timed into the flat list (~0.3 ms each at 1M keys)


def old_items(store, prefix, limit):
    """Store.items as it was before the index: O(keys in the store) whatever the limit."""
    with store._lock:
        pairs = list(store._data.items())
    matching = sorted((kv for kv in pairs if kv[0].startswith(prefix)), key=lambda kv: kv[0])
    matching = matching if limit is None else matching[:limit]
    return [(k, loads(t)) for k, t in matching]


def best_seconds(call, repeat, number):
    """timeit's rule: the fastest of `repeat` runs of `number` calls, per call."""
    best = None
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            call()
        elapsed = (time.perf_counter() - start) / number
        best = elapsed if best is None else min(best, elapsed)
    return best


def listing_row(base_dir, count):
    rng = random.Random(count)
    keys = ["%s/%07d" % (LISTING_PREFIXES[i % 4], i) for i in range(count)]
    rng.shuffle(keys)
    store = Store(tempfile.mkdtemp(prefix="listing-", dir=base_dir), durability="off",
                  log=lambda m: None)
    try:
        with store.transaction() as tx:   # one record; applying it inserts key by key
            for i, key in enumerate(keys):
                tx.put(key, small_value(i))
        cells = [count]
        for limit in (1, 100):
            assert old_items(store, "n/", limit) == store.items("n/", limit=limit)
            slow_runs = 3 if count <= 100000 else 1
            cells.append(best_seconds(lambda: old_items(store, "n/", limit), 3, slow_runs) * 1e3)
            cells.append(best_seconds(lambda: store.items("n/", limit=limit), 5, 200) * 1e3)
        cells += put_costs(store, rng, count)
        cells += index_memory(store)
    finally:
        store.close()
    return cells


def put_costs(store, rng, count):
    """Per-op microseconds: put of a new key and put over an existing key (the best of
    PUT_ROUNDS rounds each; only the first inserts into the index), then an insert alone into an
    index of the store's keys, and into one flat sorted list, the alternative."""
    new_us, overwrite_us = [], []
    for round_ in range(PUT_ROUNDS):
        new = list(dict.fromkeys(  # each key new exactly once
            "n/%07d.%d" % (rng.randrange(count), round_) for _ in range(PUTS_TIMED)))
        old = ["n/%07d" % (4 * rng.randrange(count // 4) + 1) for _ in range(PUTS_TIMED)]
        for batch, out in ((new, new_us), (old, overwrite_us)):
            gc.collect()
            start = time.perf_counter()
            for key in batch:
                store.put(key, 1)
            out.append((time.perf_counter() - start) / len(batch) * 1e6)
    index = SortedKeys(store._data, store.INDEX_BLOCK_KEYS)
    gc.collect()
    start = time.perf_counter()
    for key in new:
        index.add(key + "x")
    index_us = (time.perf_counter() - start) / len(new) * 1e6
    flat = sorted(store._data)
    gc.collect()
    start = time.perf_counter()
    for key in new[:FLAT_INSORTS]:
        bisect.insort(flat, key + "x")
    flat_us = (time.perf_counter() - start) / FLAT_INSORTS * 1e6
    return [min(new_us), min(overwrite_us), index_us, flat_us]


def index_memory(store):
    """Bytes per key of the index: as grown by the inserts (its lists, exactly: the keys are the
    dict's own objects), and as built by one sort at load (tracemalloc), with that sort's time."""
    index = store._index
    grown = (sys.getsizeof(index._blocks) + sys.getsizeof(index._firsts)
             + sum(sys.getsizeof(block) for block in index._blocks))
    keys = len(store._data)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    built = SortedKeys(store._data, store.INDEX_BLOCK_KEYS)
    build_s = time.perf_counter() - start
    loaded = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del built
    return [grown / keys, loaded / keys, build_s * 1e3]


def listing_cost_by_size(base_dir):
    """Markdown table: one row per size in LISTING_SIZES."""
    lines = ["| keys | items(\"n/\", limit=1) before, ms | after, ms | limit=100 before, ms "
             "| after, ms | put new key, us | put overwrite, us | index insert alone, us "
             "| flat-list insort, us | index bytes/key (grown by puts) | (built at load) "
             "| build at load, ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for count in LISTING_SIZES:
        sys.stderr.write("listing: %s keys...\n" % "{:,}".format(count))
        cells = listing_row(base_dir, count)
        lines.append("| {:,} | ".format(cells[0]) + " | ".join(
            "%.3f" % c if c < 1 else "%.1f" % c for c in cells[1:]) + " |")
    return "\n".join(lines)


# --- column: the same writes through HTTP (server.py, notes area) -----------------------------

def measure_http(row_id, ctx):
    """Durable writes through the real server: each client thread PUTs its own note over one
    keep-alive connection (server defaults: 16 worker threads, durability always)."""
    if not row_id.startswith("writes-"):
        return None
    n = int(row_id.split("-")[1])
    server, port = start_server_process(ctx.fresh_dir("http"))
    try:
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


def start_server_process(data_dir):
    """python3 server.py on a free port in a subprocess: (Popen, port)."""
    server = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "server.py"), "--port", "0", "--access-log", "off",
         "--limits-enabled", "off",  # many writers from one address would be rate limited
         "--data-dir", data_dir], stdout=subprocess.PIPE, text=True)
    port = int(re.search(r":(\d+)/", server.stdout.readline()).group(1))
    return server, port


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
    parser.add_argument("--memory", action="store_true",
                        help="only: memory per stored byte, UTF-8 bytes against str (~20 s)")
    parser.add_argument("--notes", action="store_true",
                        help="only: fill a real server's notes with emoji until refused")
    parser.add_argument("--listing", action="store_true",
                        help="only: listing and put cost at 10k, 100k and 1M keys (~2 min)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-cell", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_cell:
        return memory_per_byte_child(*(args.memory_cell.split(":") + [args.memory_child]))
    if args.memory_child:
        return memory_child(args.memory_child)
    base = tempfile.mkdtemp(prefix=".bench-state-", dir=os.path.abspath(args.dir))
    mount, fstype = filesystem_of(base)
    if fstype == "tmpfs":
        sys.exit("refusing to benchmark on tmpfs (%s): fsync is free there; use --dir" % mount)
    if args.memory or args.notes or args.listing:
        try:
            print("Python %s, %d CPUs\n" % (sys.version.split()[0], os.cpu_count()))
            if args.memory:
                print(memory_per_byte(base) + "\n")
                listing_cost(base)
            if args.notes:
                notes_until_refused(base)
            if args.listing:
                print(listing_cost_by_size(base))
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return
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
