"""Rate limiters' buckets: the runtime's implementation of the contract's ``Limiter``
(``handlers/_limits.py``), and each server's table of named limiters.

The in-process limiter (``InProcessLimiter``)
    Each key holds one float: the monotonic time at which its bucket is full again (the
    "theoretical arrival time" of GCRA, which is a token bucket kept as a single number). A bucket
    that is full is the same as a key that is absent, so idle keys can be dropped at any moment
    without changing an answer: whenever a key is added, the least recently used key or two are
    looked at and dropped if they are full again. That is the whole expiry: no sweep over the
    table, ever; a table nobody adds to does not need to shrink.
    Past ``max_keys`` the least recently used key is evicted (it starts again with a full
    bucket: the cap can make a limiter more lenient, never stricter). One lock guards the table;
    a call holds it for a few dict operations.
    For the runtime's guard, beyond the contract: ``take`` (``hit`` without the ``Hit``), and
    ``charge``/``debt`` for a cost known only once it is paid (a handler's CPU time): the
    bucket is charged after the fact and may go into debt, which refuses until refilled.

One table per server (``LimiterRegistry``)
    Each server owns one, in its ``ServerContext`` (``handlers/_context.py``); the contract's
    ``limiter(name, ...)`` objects find it through the calling worker thread and ask it for the
    limiter of their name, made on first use by the registry's ``make`` (the in-process buckets
    by default), so two servers in one process never share a bucket.

Imports the standard library and the contract (``handlers._limits``, ``handlers._context``).
"""
import collections
import threading
import time

from handlers import _context
from handlers._limits import DEFAULT_MAX_KEYS, Hit, check_max_keys, check_policy

__all__ = ["Limiter", "InProcessLimiter", "LimiterRegistry", "all_stats"]

_EXPIRE_PER_HIT = 2         # idle keys looked at (and dropped if full) per hit
_EPSILON = 1e-9             # float slack, so that exactly ``burst`` hits in a row all pass


class Limiter(object):
    """What every limiter backend keeps (``InProcessLimiter`` below; ``NamedLimiter`` in the
    contract forwards these calls), so that
    another one (shared by several processes) needs no change to a handler: ``hit(key, cost=1,
    policy=None)`` takes ``cost`` tokens if ``key``'s bucket holds them and returns a ``Hit``;
    ``peek(key, policy=None)`` the tokens it holds; ``retry_after(key, cost=1, policy=None)``
    the seconds until ``cost`` are there; ``forget(key)`` refills it; ``stats()`` a dict for
    metrics. A call's ``policy`` overrides the limiter's own. Keys are any hashable value."""

    def hit(self, key, cost=1, policy=None):
        raise NotImplementedError

    def peek(self, key, policy=None):
        raise NotImplementedError

    def retry_after(self, key, cost=1, policy=None):
        raise NotImplementedError

    def forget(self, key):
        raise NotImplementedError

    def stats(self):
        raise NotImplementedError


class InProcessLimiter(Limiter):
    """Token buckets in one capped, least-recently-used table; safe from any thread.

    ``clock`` is the time source (monotonic seconds); tests pass a fake one.
    """

    def __init__(self, policy, max_keys=DEFAULT_MAX_KEYS, clock=time.monotonic):
        self.policy = check_policy(policy)
        self.max_keys = check_max_keys(max_keys)
        self._clock = clock
        # _lock guards _full_at and the counters below it.
        self._lock = threading.Lock()
        self._full_at = collections.OrderedDict()  # key -> when its bucket is full; LRU first
        # The same table, for a hot path to test ``key in limiter.tracked`` without a call or the
        # lock (one dict read, atomic under the GIL); an absent key has a full bucket.
        self.tracked = self._full_at
        self._limited = 0
        self._evictions = 0
        self._expired = 0

    def hit(self, key, cost=1, policy=None):
        policy = policy or self.policy
        if cost > policy.burst:
            raise ValueError("cost %r exceeds the burst %r: it could never pass"
                             % (cost, policy.burst))
        wait = self.take(key, policy.rate_per_s, policy.burst, cost)
        if wait is None:
            return Hit(True, self.peek(key, policy), 0.0, policy)
        return Hit(False, max(0.0, cost - wait * policy.rate_per_s), wait, policy)

    def take(self, key, rate_per_s, burst, cost=1):
        """``hit`` without the Hit, for the guard's hot path: None if the tokens were taken,
        else the seconds until they will be there. The whole token bucket is here."""
        table = self._full_at
        with self._lock:
            now = self._clock()
            full_at = table.get(key, 0.0)     # 0.0: absent (monotonic time is never 0.0)
            if full_at > now:
                owed = full_at - now           # seconds of refill the bucket is short of full
                if owed * rate_per_s > burst - cost + _EPSILON:
                    self._limited += 1
                    table.move_to_end(key)
                    return owed - (burst - cost) / rate_per_s
                table[key] = full_at + cost / rate_per_s
                table.move_to_end(key)
                return None
            table[key] = now + cost / rate_per_s
            if full_at:
                table.move_to_end(key)         # it was there, idle: now the most recent
            else:
                self._trim_locked(now)         # a new key: the table grew
        return None

    # -- buckets charged after the fact (the guard's CPU budget) --------------------------
    # A cost known only once it is paid (a handler's CPU time) cannot be asked for up front:
    # ``charge`` takes it whatever the bucket holds, so the bucket may go into debt (its full
    # time further ahead than a whole burst), and ``debt`` refuses the next request until the
    # refill has paid the debt back.

    def charge(self, key, cost, rate_per_s):
        """Take ``cost`` tokens from ``key``'s bucket whether or not it holds them."""
        table = self._full_at
        with self._lock:
            now = self._clock()
            full_at = table.get(key, 0.0)
            table[key] = max(full_at, now) + cost / rate_per_s
            if full_at:
                table.move_to_end(key)
            else:
                self._trim_locked(now)         # a new key: the table grew

    def debt(self, key, rate_per_s, burst):
        """None while ``key``'s bucket holds tokens, else the seconds until it holds some
        again (counted as limited). Takes nothing and adds no key."""
        table = self._full_at
        with self._lock:
            full_at = table.get(key)
            if full_at is None:
                return None
            wait = full_at - self._clock() - burst / rate_per_s
            if wait < 0:
                return None
            self._limited += 1
            table.move_to_end(key)
        return wait

    def peek(self, key, policy=None):
        policy = policy or self.policy
        with self._lock:
            now = self._clock()
            full_at = self._full_at.get(key, now)
        return max(0.0, policy.burst - max(0.0, full_at - now) * policy.rate_per_s)

    def retry_after(self, key, cost=1, policy=None):
        policy = policy or self.policy
        with self._lock:
            now = self._clock()
            full_at = self._full_at.get(key, now)
        owed = max(0.0, full_at - now)
        return max(0.0, owed - (policy.burst - cost) / policy.rate_per_s)

    def forget(self, key):
        with self._lock:
            self._full_at.pop(key, None)

    def stats(self):
        with self._lock:
            return {"keys": len(self._full_at), "max_keys": self.max_keys,
                    "limited": self._limited, "evictions": self._evictions,
                    "expired": self._expired}

    def _trim_locked(self, now):
        """Drop the least recently used keys whose buckets are full again (the same as absent),
        then evict down to the cap. O(1); runs when a key is added, the only time the table
        grows."""
        table = self._full_at
        for _ in range(_EXPIRE_PER_HIT):
            oldest = next(iter(table.items()), None)
            if oldest is None or oldest[1] > now:
                break
            del table[oldest[0]]
            self._expired += 1
        while len(table) > self.max_keys:
            table.popitem(last=False)
            self._evictions += 1


# --- each server's named limiters -------------------------------------------------------------

class LimiterRegistry(object):
    """One server's named limiters: name -> a Limiter made on first use by ``make(policy,
    max_keys)`` (the in-process buckets; another backend is another ``make``, given by the
    runtime that builds the registry)."""

    def __init__(self, make=InProcessLimiter):
        self._make = make
        self._lock = threading.Lock()   # guards the making of limiters in _limiters
        self._limiters = {}             # name -> Limiter

    def get(self, name, policy, max_keys):
        """The limiter called ``name``, made with ``policy`` and ``max_keys`` if it is new."""
        found = self._limiters.get(name)   # one dict read, no lock: the common case
        if found is None:
            with self._lock:
                found = self._limiters.get(name)
                if found is None:
                    found = self._limiters[name] = self._make(policy, max_keys)
        return found

    def stats(self):
        """{name: stats()} for every limiter made so far (metrics)."""
        with self._lock:
            limiters = list(self._limiters.items())
        return {name: item.stats() for name, item in limiters}


def all_stats():
    """{name: stats()} for every named limiter of the calling thread's server (metrics)."""
    return _context.require("limiters", "limiters").stats()
