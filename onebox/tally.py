"""The tally: every answered request, counted once for both the metrics and the status page.

Why one tally
-------------
Two readers want every request: the Prometheus metrics (``onebox/metrics.py``) and the status
page's recorder (``onebox/activity.py``). When each counted in place, a hello request paid for
two sets of dictionary updates, two thread-local lookups, a clock read and a lock: 17,800 CPU
instructions beside the 136,000 of the request itself (valgrind's count), and hello's req/s
fell to 0.89x. Now the thread that answers a request makes one key of everything both readers
group by and adds to that key's sums in a dictionary of its own, and each reader's ``fold``
works once per distinct key, not per request: 7,700 instructions in all, most of them the
key's making (``bench/bench_metrics.py --instructions`` measures it). A batch of rows folded
with C-level tools (``zip``, ``map``, ``Counter``) was tried first and cost more: it still
made several objects per request, and kept them for longer.

A key is ``(second, status, method, route, client, path, bucket)``: the monotonic second (a
float) the response's last byte was handed to the kernel, the status code, the method (as
sent: the metrics map one they don't know to "other"), the route label
(``onebox.metrics.STATIC`` etc.), the client (as the guard counts it), the path cut to
``PATH_CHARS`` characters, and the request's duration as a bucket of ``DURATION_BOUNDS_S``.
Its value is ``[requests, body bytes sent, seconds taken]``.

Threads and locks
-----------------
A book (the dictionary) belongs to the thread that answers requests (a worker, or the reactor
for a response it finished for a slow reader and for the health checks it answers), which adds
to it from ``Books.finish`` (onebox/books.py, the one place a finished request is accounted
for, from its ``Record``): only that
thread writes to it, without a lock, and only that thread folds it, under ``_lock``, into the
readers' tables, when it holds ``BOOK_KEYS`` keys. ``_lock`` guards ``_books`` and every
reader's tables. A reader (``read``) copies its tables and every book's entries under the lock
and adds the books' entries to its copy, without taking them: so what it shows is complete up
to the moment it asked, and a book is never folded twice. A copy taken while its owner adds
may be one request behind; the next read has it.

Memory: at most ``BOOK_KEYS`` keys per thread that answers requests (the workers and the
reactor): about 17 x 8 x 560 bytes at the default settings when every request is a new client
and a long path (the recorder's budget counts them: ``Activity.memory_bytes``, and
tests/test_status.py measures them).

Imports only the standard library.
"""
import sys
import threading
from bisect import bisect_left

__all__ = ["Tally", "BOOK_KEYS", "PATH_CHARS", "DURATION_BOUNDS_S", "METRICS_BOUNDS_S"]

BOOK_KEYS = 8      # keys a thread's book holds before it is folded (memory against fold cost)
PATH_CHARS = 81    # a key keeps this much of a path: the recorder cuts longer ones to 80
# Request duration buckets (seconds), by upper bound. The metrics': Prometheus client libraries'
# defaults, which cover a cached hello (~0.1 ms) to a slow upload.
METRICS_BOUNDS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0)
# The tally's, which the status page reads percentiles off: 16 us * sqrt(2)**i, 16 us to 12 s
# (so a percentile is at most ~41% high, never low), and the metrics' bounds among them, so
# that one bucket index says which metrics bucket a request is in too (``metrics_bucket``).
DURATION_BOUNDS_S = tuple(sorted(set(16e-6 * 2 ** (i / 2.0) for i in range(40))
                                 | set(METRICS_BOUNDS_S)))
# bucket i holds the durations d with _LOWER[i] < d <= _UPPER[i] (bisect_left's answer)
_LOWER = (float("-inf"),) + DURATION_BOUNDS_S
_UPPER = DURATION_BOUNDS_S + (float("inf"),)


def metrics_bucket(bucket):
    """The METRICS_BOUNDS_S bucket holding every duration of DURATION_BOUNDS_S ``bucket``."""
    if bucket >= len(DURATION_BOUNDS_S):
        return len(METRICS_BOUNDS_S)
    return bisect_left(METRICS_BOUNDS_S, DURATION_BOUNDS_S[bucket])


class Tally(object):
    """For the runtime: ``add(...)`` from any thread that answers requests, ``wanted``
    (False: no reader, add nothing). For the readers: ``subscribe(fold)`` at start-up, where
    ``fold(entries, offset)`` takes a list of (key, value) and the seconds to add to a
    key's monotonic second for an epoch one; ``read(copy)``."""

    def __init__(self, book_keys=BOOK_KEYS):
        self.book_keys = book_keys
        self._folds = ()               # each reader's fold; set at start-up
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _books and every reader's tables
        self._books = []               # every adding thread's book

    @property
    def wanted(self):
        return bool(self._folds)

    def subscribe(self, fold):
        self._folds += (fold,)

    def add(self, started, finished, status, method, route, client, path, sent):
        """One answered request: its head was whole at ``started`` and its response's last
        byte handed over at ``finished`` (monotonic seconds); ``sent`` body bytes."""
        try:
            book = self._local.book
        except AttributeError:
            book = self._open_book()
        took = finished - started
        if book.lower < took <= book.upper:
            bucket = book.bucket     # the bucket of the thread's request before (see _Book)
        else:
            bucket = book.bucket = bisect_left(DURATION_BOUNDS_S, took)
            book.lower, book.upper = _LOWER[bucket], _UPPER[bucket]
        key = (finished // 1.0, status, method, route, client, path[:PATH_CHARS], bucket)
        keys = book.keys
        value = keys.get(key)
        if value is not None:
            value[0] += 1
            value[1] += sent
            value[2] += took
            return
        if len(keys) >= self.book_keys:
            with self._lock:
                self._fold_locked(keys)
        keys[key] = [1, sent, took]

    def _open_book(self):
        book = self._local.book = _Book()
        with self._lock:
            self._books.append(book.keys)
        return book

    def _fold_locked(self, keys):
        entries = list(keys.items())
        keys.clear()
        for fold in self._folds:
            fold(entries)

    def read(self, copy):
        """``copy(entries)``, called under the lock with every book's entries (copied, not
        taken): a reader copies its tables there, and adds the entries to its copy once it
        has let go of the lock."""
        with self._lock:
            entries = []
            for book in self._books:
                entries += _entries_of(book)
            return copy(entries)

    def memory_bytes(self):
        """What the books hold, by a sys.getsizeof walk (strings shared with other keys or
        connections are counted once per use)."""
        with self._lock:
            books = [(sys.getsizeof(book), _entries_of(book)) for book in self._books]
        size = 0
        for book_size, entries in books:
            size += book_size
            for key, value in entries:
                size += sum(map(sys.getsizeof, key)) + sys.getsizeof(key)
                size += sum(map(sys.getsizeof, value)) + sys.getsizeof(value)
        return size


class _Book(object):
    """One thread's book: ``keys`` (key -> [requests, body bytes, seconds]), and the duration
    bucket of the thread's last request, with its bounds. A request that took about as long as
    the one before it (most do, the buckets being sqrt(2) wide) is in the same bucket, and two
    float comparisons say so: measured under valgrind, bisecting the 54 bounds costs ~1,100 CPU
    instructions, the comparisons ~300 (issue 23)."""

    __slots__ = ("keys", "bucket", "lower", "upper")

    def __init__(self):
        self.keys = {}
        self.bucket = 0
        self.lower, self.upper = _LOWER[0], _UPPER[0]


def _entries_of(book):
    """Copies of a book's entries, read while its owner may add a key (then read again)."""
    for _ in range(100):
        try:
            return [(key, list(value)) for key, value in list(book.items())]
        except RuntimeError:   # "dictionary changed size during iteration"
            continue
    return []
