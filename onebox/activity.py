"""The activity recorder: what the status page shows, kept in memory under a fixed budget.

What it keeps
-------------
* **The last hour, second by second**: requests and their status classes (1xx..5xx) per
  second, in flat ``array('I')`` rings of 3,600 rows; and request durations as a small
  log-scale histogram (``LATENCY_BOUNDS_S``: 40 buckets, each sqrt(2) wider than the one
  before, 16 us to 12 s, plus one for slower) per ten seconds, 360 rows. A percentile is the
  upper bound of the bucket it falls in: at most ~41% high, never low; histograms add, so a
  wider window is the sum of its rows.
* **Top clients and top paths over the last ``TOP_MINUTES`` minutes**: per minute, a
  space-saving sketch (Metwally et al., 2005) of ``top_entries`` keys: a key that comes in when
  the sketch is full takes the place of the smallest, inheriting its count as its error, so
  a heavy hitter is never missed and memory never grows with the number of distinct clients
  or paths (both are attacker input). Paths are the raw path, cut to ``MAX_PATH_CHARS``.
* **Recent guard decisions**: the last ``recent_decisions`` refusals and bans (client, path,
  status, rule), a run of the same client and rule folded into one row with a count, so a
  flood of one client does not push everyone else's out.

Memory: the rings are 3,600 x 6 + 360 x 41 uint32 plus their uint32 row stamps (163 KB); the
sketches at most 2 x TOP_MINUTES x top_entries small entries; the decisions a few hundred
short rows. ``BUDGET_BYTES`` (400 KB) is what it may hold at the default settings:
tests/test_status.py feeds it 74,000 requests, each from a new client to a new 150-character
path, over more than an hour, plus 3,700 refusals from new clients, and measures with
``tracemalloc`` what it still holds: 353 KB (``memory_bytes()``, a ``sys.getsizeof`` walk
the page shows, said 343 KB). Nothing here grows with traffic.

Threads and locks
-----------------
``record`` runs in every worker, once per request, beside the access-log line. It takes no
lock that another worker takes: each worker thread has its own ``_Slot`` (found through a
``threading.local``) holding the current second's counts, guarded by the slot's own lock,
which only the status page's reader ever contends for (every few seconds). When a worker sees
a new second, or its slot's client or path table reaches ``SLOT_MAX_KEYS``, it folds the slot
into the shared rings and sketches under ``_lock`` (once a second per worker at most, in the
common case). The reader folds every slot the same way before it reads, so what it shows is
complete up to the moment it asked. Lock order: a slot's lock, then ``_lock``.
``decision`` runs on refusals only (worker or reactor thread) and takes ``_decisions_lock``.

Measured on this machine (2 cores shared with other work, Python 3.11): ``record`` costs
2.5-3.7 us a request, against ~0.15 us with the recorder off (tests/test_status.py's
``test_record_cost`` prints both; timeit agrees), of a hello request's ~150 us of server CPU;
``bench/bench_metrics.py --rounds 6`` (metrics and recorder on, against both off) gave a
median on/off req/s ratio of 1.03x, i.e. lost in the noise. The page's read with a full hour of data takes ~11 ms (the
JSON is ~16 KB), of which ``_lock`` is held for copies of the rings (~20 us) and the top-k merge.

Imports only the standard library.
"""
import array
import bisect
import collections
import sys
import threading
import time

__all__ = ["Activity", "LATENCY_BOUNDS_S", "HOUR_S", "STEP_S", "TOP_MINUTES", "BUDGET_BYTES"]

HOUR_S = 3600            # seconds of per-second history
STEP_S = 10              # seconds per latency histogram row (and per point of the hour charts)
TOP_MINUTES = 5          # minutes of top clients and top paths
MAX_PATH_CHARS = 80      # a longer path is cut (and ends in "...")
SLOT_MAX_KEYS = 256      # a worker's per-second client or path table folds when it reaches this
BUDGET_BYTES = 400 * 1024  # what the recorder may hold at the default settings (tested)
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Upper bounds of the latency buckets: 16 us * sqrt(2)**i; the last bucket is "slower".
LATENCY_BOUNDS_S = tuple(16e-6 * 2 ** (i / 2.0) for i in range(40))
_BUCKETS = len(LATENCY_BOUNDS_S) + 1
_COLUMNS = 1 + len(CLASSES)     # per second: requests, then one count per status class
_ROWS = HOUR_S // STEP_S


class _Slot(object):
    """One worker thread's counts for the second it is in; ``lock`` guards every field."""

    __slots__ = ("lock", "second", "counts", "hist", "clients", "paths")

    def __init__(self):
        self.lock = threading.Lock()
        self.second = 0
        self.counts = [0] * _COLUMNS
        self.hist = [0] * _BUCKETS
        self.clients = {}    # client -> [requests, bytes]
        self.paths = {}      # path -> requests


class SpaceSaving(object):
    """The ``capacity`` heaviest keys of a stream, approximately (space-saving): ``add(key,
    count, size)``; ``rows()`` gives (key, count, size, error), count never below the truth
    and at most ``error`` above it. Not thread-safe: the recorder's ``_lock`` guards it."""

    __slots__ = ("capacity", "table")

    def __init__(self, capacity):
        self.capacity = capacity
        self.table = {}      # key -> [count, size, error]

    def add(self, key, count, size=0):
        entry = self.table.get(key)
        if entry is not None:
            entry[0] += count
            entry[1] += size
            return
        if len(self.table) < self.capacity:
            self.table[key] = [count, size, 0]
            return
        smallest = min(self.table, key=lambda name: self.table[name][0])
        floor = self.table.pop(smallest)[0]
        self.table[key] = [floor + count, size, floor]

    def rows(self):
        return [(key, entry[0], entry[1], entry[2]) for key, entry in self.table.items()]


def cut_path(path):
    # "..." rather than an ellipsis: one non-ASCII character would double the string's size
    return path if len(path) <= MAX_PATH_CHARS else path[:MAX_PATH_CHARS - 3] + "..."


def percentile(hist, fraction):
    """The upper bound (seconds) of the bucket holding the ``fraction`` quantile of ``hist``;
    None for an empty one, and the last bound for the overflow bucket."""
    total = sum(hist)
    if not total:
        return None
    rank = fraction * total
    seen = 0
    for index, count in enumerate(hist):
        seen += count
        if seen >= rank and count:
            return LATENCY_BOUNDS_S[min(index, len(LATENCY_BOUNDS_S) - 1)]
    return LATENCY_BOUNDS_S[-1]


class Activity(object):
    """One server's recorder. For the runtime: ``record(...)`` (workers, per request),
    ``decision(...)`` (the guard, per refusal). For the status page: ``snapshot()``,
    ``decisions()``, ``memory_bytes()``. ``enabled`` False makes ``record`` and ``decision``
    return at once (the benchmark compares the two). ``wall`` and ``clock`` are seams for
    tests (epoch seconds and monotonic seconds)."""

    def __init__(self, enabled=True, top_entries=50, recent_decisions=200, wall=time.time,
                 clock=time.monotonic):
        self.enabled = enabled
        self.top_entries = top_entries
        self._wall, self._clock = wall, clock
        self._local = threading.local()
        # _lock guards everything below it, up to _decisions_lock.
        self._lock = threading.Lock()
        self._slots = []                          # every worker's _Slot
        self._seconds = array.array("I", bytes(4 * _COLUMNS * HOUR_S))
        # which second (step) a row holds: epoch seconds fit in uint32 until 2106
        self._second_of = array.array("I", bytes(4 * HOUR_S))
        self._hist = array.array("I", bytes(4 * _BUCKETS * _ROWS))
        self._step_of = array.array("I", bytes(4 * _ROWS))
        self._minutes = collections.OrderedDict()   # minute -> (clients, paths) SpaceSavings
        self._totals = [0] * _COLUMNS
        self.started = wall()
        # _decisions_lock guards _decisions: [time, client, path, status, rule, ban, count]
        self._decisions_lock = threading.Lock()
        self._decisions = collections.deque(maxlen=recent_decisions)

    # -- recording (worker threads) -------------------------------------------------------
    def record(self, conn, exchange, sent):
        """One request answered on ``conn`` (a ``handoff.Connection``: its peer ``ip``; one
        on the admin listener is not the site's traffic, and is skipped), from a worker's
        ``_Exchange`` (its ``request``, None if it could not be built, ``response`` and
        monotonic ``started``), with ``sent`` body bytes written (by the worker: a slow
        reader's rest, finished by the reactor, is not counted, nor its time)."""
        if not self.enabled or conn.admin:
            return
        ip = conn.ip
        request, status = exchange.request, exchange.response.status
        duration = self._clock() - exchange.started
        second = int(self._wall())
        if request is not None:
            ip, path = request.client_ip, request.path
        else:
            path = "(unparsed)"
        try:
            slot = self._local.slot
        except AttributeError:
            slot = self._local.slot = self._new_slot()
        with slot.lock:
            if second != slot.second:
                if slot.counts[0]:
                    self._fold_slot_locked(slot)
                slot.second = second
            counts = slot.counts
            counts[0] += 1
            if 100 <= status < 600:
                counts[status // 100] += 1
            slot.hist[bisect.bisect_left(LATENCY_BOUNDS_S, duration)] += 1
            client = slot.clients.get(ip)
            if client is None:
                slot.clients[ip] = [1, sent]
            else:
                client[0] += 1
                client[1] += sent
            slot.paths[path] = slot.paths.get(path, 0) + 1
            if len(slot.clients) >= SLOT_MAX_KEYS or len(slot.paths) >= SLOT_MAX_KEYS:
                self._fold_slot_locked(slot)

    def _new_slot(self):
        slot = _Slot()
        with self._lock:
            self._slots.append(slot)
        return slot

    def _fold_slot_locked(self, slot):
        """Move a slot's counts into the shared tables (the slot's lock held) and empty it."""
        second = slot.second
        with self._lock:
            self._add_second_locked(second, slot.counts, slot.hist)
            clients, paths = self._minute_locked(second // 60)
            if clients is not None:
                for ip, (count, size) in slot.clients.items():
                    clients.add(ip, count, size)
                for path, count in slot.paths.items():
                    paths.add(cut_path(path), count)
        slot.counts = [0] * _COLUMNS
        slot.hist = [0] * _BUCKETS
        slot.clients = {}
        slot.paths = {}

    def _add_second_locked(self, second, counts, hist):
        for index in range(_COLUMNS):
            self._totals[index] += counts[index]
        if second <= int(self._wall()) - HOUR_S:
            return                                   # older than the window: nothing to show
        _add_row(self._seconds, self._second_of, _COLUMNS, second, counts)
        _add_row(self._hist, self._step_of, _BUCKETS, second // STEP_S, hist)

    def _minute_locked(self, minute):
        """The sketches of ``minute`` (made if new, the oldest dropped past TOP_MINUTES), or
        (None, None) for a minute already dropped."""
        tables = self._minutes.get(minute)
        if tables is not None:
            return tables
        if self._minutes and minute < next(iter(self._minutes)):
            return None, None
        tables = self._minutes[minute] = (SpaceSaving(self.top_entries),
                                          SpaceSaving(self.top_entries))
        if len(self._minutes) > 1 and minute < next(reversed(self._minutes)):
            self._minutes = collections.OrderedDict(sorted(self._minutes.items()))
        while len(self._minutes) > TOP_MINUTES:
            self._minutes.popitem(last=False)
        return tables

    # -- guard decisions (worker or reactor threads; refusals only) ------------------------
    def decision(self, client, path, status, rule, ban="", dry_run=False):
        """One refusal or ban by the guard (or an operator's "lifted"). A repeat of the newest
        row's client, status and rule adds to its count instead of taking a row."""
        if not self.enabled:
            return
        now = self._wall()
        path = cut_path(path or "")
        rule = ("dry-run:" if dry_run else "") + rule
        with self._decisions_lock:
            last = self._decisions[-1] if self._decisions else None
            if (last is not None and last[1] == client and last[3] == status
                    and last[4] == rule and not ban and not last[5]):
                last[0] = now
                last[2] = path
                last[6] += 1
                return
            self._decisions.append([now, client, path, status, rule, ban, 1])

    def decisions(self):
        """The recent decisions, newest first, as dicts."""
        with self._decisions_lock:
            rows = [list(row) for row in self._decisions]
        rows.reverse()
        return [{"time": row[0], "client": row[1], "path": row[2], "status": row[3],
                 "rule": row[4], "ban": row[5], "count": row[6]} for row in rows]

    # -- reading (the status page's thread) ------------------------------------------------
    def fold(self):
        """Fold every worker's current counts into the shared tables."""
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            with slot.lock:
                if slot.counts[0]:
                    self._fold_slot_locked(slot)

    def snapshot(self, recent_s=120):
        """What the status page draws, as JSON-able values: the hour in STEP_S steps
        (requests, statuses, p50/p99), the last ``recent_s`` seconds one by one, the last
        minute's figures, top clients and paths over the last TOP_MINUTES minutes, totals."""
        self.fold()
        now = int(self._wall())
        with self._lock:   # copies (memcpy, ~20 us): the workers' folds need not wait for the rest
            rings = (self._seconds[:], self._second_of[:], self._hist[:], self._step_of[:])
            tops = self._tops_locked(now // 60)
            totals = list(self._totals)
        seconds = _window(rings[0], rings[1], _COLUMNS, now - HOUR_S + 1, now)
        hists = _window(rings[2], rings[3], _BUCKETS, (now - HOUR_S + 1) // STEP_S,
                        now // STEP_S)
        first = now - HOUR_S + 1
        hour = self._hour_series(seconds, hists, first, now)
        recent = [row[0] for row in seconds[-recent_s:]]
        recent_status = {name: [row[i + 1] for row in seconds[-recent_s:]]
                         for i, name in enumerate(CLASSES)}
        minute = seconds[-60:]
        minute_hist = [sum(column) for column in zip(*hists[-60 // STEP_S:])]
        return {
            "now": now, "started": self.started, "enabled": self.enabled,
            "hour": hour,
            "recent": {"step_s": 1, "start": now - recent_s + 1, "requests": recent,
                       "status": recent_status},
            "last_minute": {
                "requests": sum(row[0] for row in minute),
                "rate_per_s": sum(row[0] for row in minute) / 60.0,
                "status": {name: sum(row[i + 1] for row in minute)
                           for i, name in enumerate(CLASSES)},
                "p50_ms": _ms(percentile(minute_hist, 0.5)),
                "p99_ms": _ms(percentile(minute_hist, 0.99))},
            "totals": dict(zip(("requests",) + CLASSES, totals)),
            "top_clients": tops[0], "top_paths": tops[1], "top_window_s": TOP_MINUTES * 60,
        }

    @staticmethod
    def _hour_series(seconds, hists, first, now):
        """The hour as STEP_S points, aligned on multiples of STEP_S (the last one partial)."""
        start_step = first // STEP_S
        points = now // STEP_S - start_step + 1
        requests = [0] * points
        status = {name: [0] * points for name in CLASSES}
        for offset, row in enumerate(seconds):
            point = (first + offset) // STEP_S - start_step
            requests[point] += row[0]
            for i, name in enumerate(CLASSES):
                status[name][point] += row[i + 1]
        p50 = [_ms(percentile(hist, 0.5)) for hist in hists]
        p99 = [_ms(percentile(hist, 0.99)) for hist in hists]
        return {"step_s": STEP_S, "start": start_step * STEP_S, "requests": requests,
                "status": status, "p50_ms": p50, "p99_ms": p99}

    def _tops_locked(self, minute):
        clients, paths = collections.Counter(), collections.Counter()
        sizes = collections.Counter()
        for when, (client_table, path_table) in self._minutes.items():
            if when <= minute - TOP_MINUTES:
                continue
            for key, count, size, _ in client_table.rows():
                clients[key] += count
                sizes[key] += size
            for key, count, _, _ in path_table.rows():
                paths[key] += count
        limit = min(self.top_entries, 20)
        return ([{"client": key, "requests": count, "bytes": sizes[key]}
                 for key, count in clients.most_common(limit)],
                [{"path": key, "requests": count} for key, count in paths.most_common(limit)])

    def memory_bytes(self):
        """What the recorder holds, counted by walking it with sys.getsizeof (approximate:
        shared small ints and interned strings are counted once per use)."""
        size = sum(sys.getsizeof(part) for part in (self._seconds, self._second_of, self._hist,
                                                     self._step_of, self._minutes,
                                                     self._decisions))
        with self._lock:
            for clients, paths in self._minutes.values():
                for table in (clients, paths):
                    size += sys.getsizeof(table.table)
                    for key, entry in table.table.items():
                        size += sys.getsizeof(key) + sys.getsizeof(entry)
            for slot in self._slots:
                size += sys.getsizeof(slot.clients) + sys.getsizeof(slot.paths)
        with self._decisions_lock:
            for row in self._decisions:
                size += sys.getsizeof(row) + sys.getsizeof(row[1]) + sys.getsizeof(row[2])
        return size


def _add_row(ring, stamp_of, width, stamp, counts):
    """Add ``counts`` to the ring's row for ``stamp`` (a second or a step), emptying the row
    first if it holds an older one (the ring has ``len(stamp_of)`` rows of ``width``)."""
    row = stamp % len(stamp_of)
    base = row * width
    if stamp_of[row] != stamp:
        stamp_of[row] = stamp
        ring[base:base + width] = array.array("I", bytes(4 * width))
    for index, count in enumerate(counts):
        if count:
            ring[base + index] += count


def _window(ring, stamp_of, width, first, last):
    """Rows first..last of a ring of ``len(stamp_of)`` rows of ``width`` counts, where
    ``stamp_of[row]`` says which second (or step) the row holds now: zeros where it holds
    another."""
    rows = []
    length = len(stamp_of)
    for stamp in range(first, last + 1):
        row = stamp % length
        if stamp_of[row] == stamp:
            rows.append(ring[row * width:(row + 1) * width].tolist())
        else:
            rows.append([0] * width)
    return rows


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)
