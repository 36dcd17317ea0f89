"""The activity recorder: what the status page shows, kept in memory under a fixed budget.

What it keeps
-------------
* **The last hour, ten seconds at a time**: per ``STEP_S`` step, requests, their status classes
  (1xx..5xx) and their durations as a small log-scale histogram (``LATENCY_BOUNDS_S``, the
  tally's 54 bounds: each about sqrt(2) above the one before, 16 us to 12 s, plus one bucket
  for slower), in one flat ``array('I')`` ring of 360 rows. A percentile is the upper bound of
  the bucket it falls in: at most ~41% high, never low; histograms add, so a wider window is
  the sum of its rows.
* **The last ``RECENT_S`` seconds, second by second**: requests and status classes, a ring of
  120 rows (the page's live chart and its last-minute figures).
* **Top clients and top paths over the last ``TOP_MINUTES`` minutes**: per minute, a
  space-saving sketch (Metwally et al., 2005) of ``top_entries`` keys: a key that comes in when
  the sketch is full takes the place of the smallest, inheriting its count as its error, so
  a heavy hitter is never missed and memory never grows with the number of distinct clients
  or paths (both are attacker input). Paths are the raw path, cut to ``MAX_PATH_CHARS``.
* **Recent guard decisions**: the last ``recent_decisions`` refusals and bans (client, path,
  status, rule), a run of the same client and rule folded into one row with a count, so a
  flood of one client does not push everyone else's out.

Memory: the rings are 360 x 61 + 120 x 6 uint32 plus their uint32 row stamps (93 KB); the
sketches at most 2 x TOP_MINUTES x top_entries small entries; the decisions a few hundred
short rows; the tally's books (``onebox/tally.py``: at most ``BOOK_KEYS`` keys per thread).
``BUDGET_BYTES`` (400 KB) is what it may hold at the default settings: tests/test_status.py
feeds it 74,000 requests, each from a new client to a new 150-character path, over more than
an hour, plus 3,700 refusals from new clients, then fills the books of 17 more threads (16
workers and the reactor) with such requests, and measures with ``tracemalloc`` what it still
holds: 387 KB (``memory_bytes()``, the ``sys.getsizeof`` walk the page shows, said 368 KB).
Nothing here grows with traffic.

Threads and locks
-----------------
Requests come from the tally, which each thread that answers requests counts them in, in a
book of its own; ``fold`` adds a book's entries to the rings and sketches, under the tally's
lock, which also guards every table here but the decisions. The status page reads through
``Tally.read``: it copies the tables and the books' entries under that lock (the rings are a
memcpy; ~0.2 ms with full sketches), then adds the entries to its copy outside it.
``decision`` runs on refusals only (worker or reactor thread) and takes ``_decisions_lock``.

What counting costs a request: ``bench/bench_metrics.py --instructions`` (valgrind's count of
CPU instructions, which does not depend on what else the machine runs).

Imports only the standard library and the tally.
"""
import array
import collections
import sys
import threading
import time

from onebox.tally import DURATION_BOUNDS_S, PATH_CHARS

__all__ = ["Activity", "LATENCY_BOUNDS_S", "HOUR_S", "STEP_S", "RECENT_S", "TOP_MINUTES",
           "BUDGET_BYTES"]

HOUR_S = 3600            # seconds of history
STEP_S = 10              # seconds per row of the hour (and per point of the hour charts)
RECENT_S = 120           # seconds kept one by one
TOP_MINUTES = 5          # minutes of top clients and top paths
MAX_PATH_CHARS = PATH_CHARS - 1   # a longer path is cut (and ends in "...")
BUDGET_BYTES = 400 * 1024  # what the recorder may hold at the default settings (tested)
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
LATENCY_BOUNDS_S = DURATION_BOUNDS_S   # the latency buckets' upper bounds; the last is "slower"
_BUCKETS = len(LATENCY_BOUNDS_S) + 1
_COLUMNS = 1 + len(CLASSES)     # requests, then one count per status class
_ROWS = HOUR_S // STEP_S
_STEP_WIDTH = _COLUMNS + _BUCKETS   # a row of the hour: the columns, then the histogram


class SpaceSaving(object):
    """The ``capacity`` heaviest keys of a stream, approximately (space-saving): ``add(key,
    count, size)``; ``rows()`` gives (key, count, size, error), count never below the truth
    and at most ``error`` above it. Not thread-safe: the tally's lock guards it."""

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

    def copy(self):
        twin = SpaceSaving(self.capacity)
        twin.table = {key: list(entry) for key, entry in self.table.items()}
        return twin


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


class _Tables(object):
    """The recorder's sums: written by ``Activity.fold`` under the tally's lock, or a reader's
    copy of them (``copy``), which that reader alone touches."""

    __slots__ = ("steps", "step_of", "recent", "second_of", "minutes", "totals")

    def __init__(self):
        self.steps = array.array("I", bytes(4 * _STEP_WIDTH * _ROWS))
        # which step (second) a row holds: epoch seconds fit in uint32 until 2106
        self.step_of = array.array("I", bytes(4 * _ROWS))
        self.recent = array.array("I", bytes(4 * _COLUMNS * RECENT_S))
        self.second_of = array.array("I", bytes(4 * RECENT_S))
        self.minutes = collections.OrderedDict()   # minute -> (clients, paths) SpaceSavings
        self.totals = [0] * _COLUMNS

    def copy(self):
        twin = _Tables.__new__(_Tables)
        for name in ("steps", "step_of", "recent", "second_of", "totals"):
            setattr(twin, name, getattr(self, name)[:])
        twin.minutes = collections.OrderedDict(
            (minute, (clients.copy(), paths.copy()))
            for minute, (clients, paths) in self.minutes.items())
        return twin

    def memory_bytes(self):
        size = sum(sys.getsizeof(getattr(self, name)) for name in self.__slots__)
        for tables in self.minutes.values():
            for table in tables:
                size += sys.getsizeof(table.table)
                for key, entry in table.table.items():
                    size += sys.getsizeof(key) + sys.getsizeof(entry)
        return size


class Activity(object):
    """One server's recorder. For the runtime: ``fold(entries)`` (through the tally, which it
    subscribes to when ``enabled``), ``decision(...)`` (the guard, per refusal). For the status
    page: ``snapshot()``, ``decisions()``, ``memory_bytes()``. ``enabled`` False records
    nothing (the benchmark compares the two). ``wall`` and ``clock`` are seams for tests
    (epoch seconds and monotonic seconds: a tally key's second is monotonic)."""

    def __init__(self, tally, enabled=True, top_entries=50, recent_decisions=200,
                 wall=time.time, clock=time.monotonic):
        self.enabled = enabled
        self.top_entries = top_entries
        self._tally = tally
        self._wall, self._clock = wall, clock
        self._tables = _Tables()   # guarded by the tally's lock
        self.started = wall()
        # _decisions_lock guards _decisions: [time, client, path, status, rule, ban, count]
        self._decisions_lock = threading.Lock()
        self._decisions = collections.deque(maxlen=recent_decisions)
        if enabled:
            tally.subscribe(self.fold)

    # -- recording (under the tally's lock, or on a reader's copy) ----------------------------
    def fold(self, entries, tables=None):
        """The tally's entries (``onebox/tally.py``), added to ``tables`` (by default the
        recorder's own): one Python step per distinct key, not per request."""
        tables = tables or self._tables
        offset = self._wall() - self._clock()   # a key's monotonic second to an epoch one
        now = int(self._wall())
        oldest_step = (now - HOUR_S) // STEP_S
        totals, recent, steps = tables.totals, tables.recent, tables.steps
        for (second, status, _, _, client, path, bucket), (count, sent, _) in entries:
            second = int(second + offset)
            status_class = status // 100
            known = 1 <= status_class <= 5
            totals[0] += count
            if known:
                totals[status_class] += count
            if second > now - RECENT_S:
                base = _row(recent, tables.second_of, _COLUMNS, second)
                recent[base] += count
                if known:
                    recent[base + status_class] += count
            if second // STEP_S > oldest_step:
                base = _row(steps, tables.step_of, _STEP_WIDTH, second // STEP_S)
                steps[base] += count
                steps[base + _COLUMNS + bucket] += count
                if known:
                    steps[base + status_class] += count
            sketches = self._minute_tables(tables, second // 60)
            if sketches is not None:
                sketches[0].add(client, count, sent)
                sketches[1].add(cut_path(path), count)

    def _minute_tables(self, tables, minute):
        """The sketches of ``minute`` (made if new, the oldest dropped past TOP_MINUTES), or
        None for a minute already dropped."""
        sketches = tables.minutes.get(minute)
        if sketches is not None:
            return sketches
        if tables.minutes and minute < next(iter(tables.minutes)):
            return None
        tables.minutes[minute] = (SpaceSaving(self.top_entries), SpaceSaving(self.top_entries))
        if len(tables.minutes) > 1 and minute < next(reversed(tables.minutes)):
            tables.minutes = collections.OrderedDict(sorted(tables.minutes.items()))
        while len(tables.minutes) > TOP_MINUTES:
            tables.minutes.popitem(last=False)
        return tables.minutes.get(minute)

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
    def snapshot(self, recent_s=RECENT_S):
        """What the status page draws, as JSON-able values: the hour in STEP_S steps
        (requests, statuses, p50/p99), the last ``recent_s`` (at most RECENT_S) seconds one by
        one, the last minute's figures, top clients and paths over the last TOP_MINUTES
        minutes, totals."""
        recent_s = min(recent_s, RECENT_S)
        tables, entries = self._tally.read(lambda entries: (self._tables.copy(), entries))
        if self.enabled:
            self.fold(entries, tables)   # what the threads' books hold, on the copy
        now = int(self._wall())
        tops = self._tops(tables, now // 60)
        rows = _window(tables.steps, tables.step_of, _STEP_WIDTH, (now - HOUR_S + 1) // STEP_S,
                       now // STEP_S)
        seconds = _window(tables.recent, tables.second_of, _COLUMNS, now - recent_s + 1, now)
        minute = seconds[-60:]
        minute_hist = [sum(column) for column in zip(*(row[_COLUMNS:]
                                                       for row in rows[-60 // STEP_S:]))]
        return {
            "now": now, "started": self.started, "enabled": self.enabled,
            "hour": self._hour_series(rows, (now - HOUR_S + 1) // STEP_S),
            "recent": {"step_s": 1, "start": now - recent_s + 1,
                       "requests": [row[0] for row in seconds],
                       "status": {name: [row[i + 1] for row in seconds]
                                  for i, name in enumerate(CLASSES)}},
            "last_minute": {
                "requests": sum(row[0] for row in minute),
                "rate_per_s": sum(row[0] for row in minute) / 60.0,
                "status": {name: sum(row[i + 1] for row in minute)
                           for i, name in enumerate(CLASSES)},
                "p50_ms": _ms(percentile(minute_hist, 0.5)),
                "p99_ms": _ms(percentile(minute_hist, 0.99))},
            "totals": dict(zip(("requests",) + CLASSES, tables.totals)),
            "top_clients": tops[0], "top_paths": tops[1], "top_window_s": TOP_MINUTES * 60,
        }

    @staticmethod
    def _hour_series(rows, start_step):
        """The hour as STEP_S points, aligned on multiples of STEP_S (the last one partial)."""
        hists = [row[_COLUMNS:] for row in rows]
        return {"step_s": STEP_S, "start": start_step * STEP_S,
                "requests": [row[0] for row in rows],
                "status": {name: [row[i + 1] for row in rows] for i, name in enumerate(CLASSES)},
                "p50_ms": [_ms(percentile(hist, 0.5)) for hist in hists],
                "p99_ms": [_ms(percentile(hist, 0.99)) for hist in hists]}

    def _tops(self, tables, minute):
        clients, paths = collections.Counter(), collections.Counter()
        sizes = collections.Counter()
        for when, (client_table, path_table) in tables.minutes.items():
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
        """What the recorder holds, the tally's books included, counted by walking it with
        sys.getsizeof (approximate: shared small ints and strings are counted once per use)."""
        size = self._tally.read(lambda entries: self._tables.memory_bytes())
        size += self._tally.memory_bytes() + sys.getsizeof(self._decisions)
        with self._decisions_lock:
            for row in self._decisions:
                size += sys.getsizeof(row) + sys.getsizeof(row[1]) + sys.getsizeof(row[2])
        return size


def _row(ring, stamp_of, width, stamp):
    """Where the ring's row for ``stamp`` (a step or a second) starts, emptied first if it
    held an older one (the ring has ``len(stamp_of)`` rows of ``width``). Callers never pass
    a stamp older than the ring's span."""
    row = stamp % len(stamp_of)
    base = row * width
    if stamp_of[row] != stamp:
        stamp_of[row] = stamp
        ring[base:base + width] = array.array("I", bytes(4 * width))
    return base


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
