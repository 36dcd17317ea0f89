"""The response cache: what GET handlers computed, kept in memory for a while; the runtime's
implementation behind the contract's ``@cached`` and ``invalidate`` (``handlers/_cache.py``, which
says what is cached and what never is).

Single flight
    When several requests miss the same key at once, the first computes and the others wait for
    its response: N concurrent misses cost one computation. If that one raises, or its response
    may not be cached, each waiter computes its own.

Invalidation
    ``invalidate(prefix)`` drops the matching entries, and any computation already under way when
    it was called is not stored (it may have read the data before the change).

Memory
    ``max_entries`` and ``max_bytes`` (``[cache]`` in setup.cfg) cap the table; past either the
    least recently used entries go. A response larger than an eighth of ``max_bytes`` is not
    cached (one response must not flush the rest). ``stats()`` gives the counters.

One cache per server
    Each server owns a ``ResponseCache``, sized by its own ``[cache]``, in its ``ServerContext``
    (handlers/_context.py); its worker threads are bound to it.

In a cluster
    Each process keeps its own cache (``join_cluster``, ``[cluster] redis_url``), and an
    ``invalidate`` (or ``clear``) reaches all of them: it drops this process's entries, then
    tells the others on the cluster's "cache" channel, and each drops its own when told (its
    subscription's thread), computations under way included. Pub/sub keeps nothing for a
    process that is away, so one whose subscription comes back after a loss drops everything:
    any invalidation may have been missed. An invalidation Redis did not take (it was down:
    the write it follows failed too, most likely) is counted (``untold``); the others' copies
    then live out their ``ttl_s``, the bound on staleness the cache always had.

One lock (``ResponseCache._lock``) guards the table, the in-flight computations and the counters;
handlers run outside it, and so does telling the cluster.

Imports the standard library, the contract's ``Response`` and ``onebox.routing.to_response``.
"""
import collections
import threading
import time

from handlers._core import Response
from onebox.routing import to_response

__all__ = ["ResponseCache"]

_NOT_CACHEABLE_CONTROLS = ("private", "no-store")


class _Entry(object):
    __slots__ = ("expires", "status", "headers", "body", "size")

    def __init__(self, expires, status, headers, body, size):
        self.expires = expires
        self.status = status
        self.headers = headers    # a tuple: entries are shared by every thread that reads them
        self.body = body
        self.size = size

    def response(self):
        return Response(self.body, self.status, list(self.headers))


class _Flight(object):
    """A computation under way; waiters block on ``done``."""

    __slots__ = ("done", "generation", "entry")

    def __init__(self, generation):
        self.done = threading.Event()
        self.generation = generation
        self.entry = None


class ResponseCache(object):
    """A capped, least-recently-used map from key to response; safe from any thread.

    For callers: ``serve(key, ttl_s, compute)``, ``invalidate(prefix)``, ``clear()``,
    ``configure(max_entries, max_bytes)`` (and empty), ``resize(max_entries, max_bytes)`` (and
    keep what fits), ``stats()``; ``join_cluster(cluster)`` at start, before the cluster starts.
    """

    WAIT_S = 30.0   # a waiter gives up on a stuck computation after this and computes its own

    def __init__(self, max_entries=10000, max_bytes=32 * 1024 * 1024, clock=time.monotonic):
        self._clock = clock
        # _lock guards _entries, _bytes, _flights, _generation, the caps and the counters.
        self._lock = threading.Lock()
        self._entries = collections.OrderedDict()   # key -> _Entry, least recently used first
        self._bytes = 0
        self._flights = {}                          # key -> _Flight
        self._generation = 0                        # bumped by every invalidation
        self._counts = collections.Counter()
        self._cluster = None   # the cluster told of invalidations (set once, at start)
        self.configure(max_entries, max_bytes)

    def join_cluster(self, cluster):
        """Tell the cluster's other processes of every invalidation, and hear theirs."""
        cluster.on("cache", self._told)
        cluster.on_reconnect(self._resubscribed)
        self._cluster = cluster

    def configure(self, max_entries, max_bytes):
        """Set the caps and empty the cache."""
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("'max_entries' and 'max_bytes' must be at least 1")
        with self._lock:
            self.max_entries, self.max_bytes = max_entries, max_bytes
            self._clear_locked()

    def resize(self, max_entries, max_bytes):
        """Set the caps, keeping what fits (a reload of [cache]): past the new caps the least
        recently used entries go."""
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("'max_entries' and 'max_bytes' must be at least 1")
        with self._lock:
            self.max_entries, self.max_bytes = max_entries, max_bytes
            self._evict_locked()

    def serve(self, key, ttl_s, compute):
        """The cached response for ``key``, or ``compute()``'s (a handler's return value), kept
        for ``ttl_s`` if it may be."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if entry.expires > self._clock():
                    self._entries.move_to_end(key)
                    self._counts["hits"] += 1
                    return entry.response()
                self._drop_locked(key)
                self._counts["expired"] += 1
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight(self._generation)
                self._counts["misses"] += 1
            else:
                self._counts["coalesced"] += 1
        if leader:
            return self._compute(key, ttl_s, compute, flight)
        if flight.done.wait(self.WAIT_S) and flight.entry is not None:
            return flight.entry.response()
        return to_response(compute())

    def _compute(self, key, ttl_s, compute, flight):
        entry, failed = None, True
        try:
            response = to_response(compute())
            failed = False
            entry = self._entry_for(response, self._clock() + ttl_s)
            return response
        finally:
            with self._lock:
                del self._flights[key]
                if entry is not None and flight.generation == self._generation:
                    self._store_locked(key, entry)
                elif entry is None:
                    self._counts["errors" if failed else "uncacheable"] += 1
            flight.entry = entry
            flight.done.set()

    def _entry_for(self, response, expires):
        """An entry for ``response``, or None if it must not be cached."""
        if (response.status != 200 or response.stream is not None or response.file is not None
                or not isinstance(response.body, bytes)):
            return None
        size = len(response.body)
        for name, value in response.headers:
            lower = name.lower()
            if lower == "set-cookie":
                return None
            if lower == "cache-control" and any(word in value.lower()
                                                for word in _NOT_CACHEABLE_CONTROLS):
                return None
            size += len(name) + len(str(value))
        if size > self.max_bytes // 8:
            return None
        return _Entry(expires, response.status, tuple(response.headers), response.body, size)

    def _store_locked(self, key, entry):
        if key in self._entries:
            self._drop_locked(key)
        entry.size += len(key)
        self._entries[key] = entry
        self._bytes += entry.size
        self._counts["stored"] += 1
        self._evict_locked()

    def _evict_locked(self):
        while self._entries and (len(self._entries) > self.max_entries
                                 or self._bytes > self.max_bytes):
            _, oldest = self._entries.popitem(last=False)
            self._bytes -= oldest.size
            self._counts["evictions"] += 1

    def _drop_locked(self, key):
        self._bytes -= self._entries.pop(key).size

    def invalidate(self, prefix=""):
        """Drop every entry whose key starts with ``prefix`` ("" drops all); returns how many
        (here). Computations under way are not stored. In a cluster, every process's cache
        drops them too (module docstring)."""
        dropped = self._invalidate_here(prefix)
        self._tell(prefix)
        return dropped

    def _tell(self, prefix):
        cluster = self._cluster
        if cluster is not None and not cluster.tell(
                "cache", prefix.encode("utf-8", "surrogatepass")):   # (a path may hold any)
            with self._lock:
                self._counts["untold"] += 1

    def _told(self, payload, from_self):
        """Another process's invalidation (the subscription's thread)."""
        if not from_self:
            self._invalidate_here(payload.decode("utf-8", "surrogatepass"))

    def _resubscribed(self):
        """Back after a loss: invalidations may have been missed, so drop everything."""
        self._invalidate_here("")

    def _invalidate_here(self, prefix):
        """``invalidate`` in this process only. The key scan runs outside the lock."""
        with self._lock:
            self._generation += 1
            keys = list(self._entries)
        doomed = [key for key in keys if key.startswith(prefix)]
        dropped = 0
        with self._lock:
            for key in doomed:
                if key in self._entries:
                    self._drop_locked(key)
                    dropped += 1
            self._counts["invalidated"] += dropped
        return dropped

    def clear(self):
        """Empty the cache and its counters; in a cluster, every process's cache is emptied."""
        with self._lock:
            self._clear_locked()
        self._tell("")

    def _clear_locked(self):
        self._entries.clear()
        self._bytes = 0
        self._generation += 1
        self._counts.clear()

    def stats(self):
        with self._lock:
            out = {"entries": len(self._entries), "bytes": self._bytes,
                   "max_entries": self.max_entries, "max_bytes": self.max_bytes,
                   "in_flight": len(self._flights)}
            for name in ("hits", "misses", "coalesced", "stored", "evictions", "expired",
                         "invalidated", "uncacheable", "errors", "untold"):
                out[name] = self._counts[name]
        return out
