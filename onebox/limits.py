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
    a call holds it for a few dict operations. Two limiters may be made with one lock
    (``lock=``): the guard's site-wide and per-route buckets are, so that ``take_pair`` takes a
    request's token from both under one lock and one clock reading.
    For the runtime's guard, beyond the contract: ``take`` (``hit`` without the ``Hit``),
    ``take_pair``, and ``charge``/``debt`` for a cost known only once it is paid (a handler's
    CPU time): the bucket is charged after the fact and may go into debt, which refuses until
    refilled.

    Per request cost (issue 23): a request's tokens were two ``take`` calls, each a frame, a
    lock, a clock reading, a look-up, a store and an ``OrderedDict.move_to_end``. ``take_pair``
    is one of each but the look-ups and stores, and a key that is already the newest (a client's
    requests in a row) is not moved: ``_newest`` remembers it, and every call that adds or moves a
    key sets it (a key dropped from the front cannot be the newest unless it was the only one).

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
_NOBODY = object()          # no key: what ``_newest`` starts as


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

    def __init__(self, policy, max_keys=DEFAULT_MAX_KEYS, clock=time.monotonic, lock=None):
        self.policy = check_policy(policy)
        self.max_keys = check_max_keys(max_keys)
        self._clock = clock
        # _lock guards _full_at, _newest and the counters below them (and another limiter's
        # table too, when they were made with one lock: see take_pair).
        self._lock = lock if lock is not None else threading.Lock()
        self._full_at = collections.OrderedDict()  # key -> when its bucket is full; LRU first
        self._newest = _NOBODY                     # a key known to be last in _full_at
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
        else the seconds until they will be there. The whole token bucket is here (and, for
        two at once, in ``take_pair``)."""
        table = self._full_at
        lock = self._lock
        lock.acquire()        # not ``with``: see take_pair
        try:
            now = self._clock()
            full_at = table.get(key, 0.0)     # 0.0: absent (monotonic time is never 0.0)
            if full_at > now:
                owed = full_at - now           # seconds of refill the bucket is short of full
                if owed * rate_per_s > burst - cost + _EPSILON:
                    self._limited += 1
                    self._touch_locked(key)
                    return owed - (burst - cost) / rate_per_s
                table[key] = full_at + cost / rate_per_s
            else:
                table[key] = now + cost / rate_per_s
                if not full_at:
                    self._newest = key
                    self._trim_locked(now)     # a new key: the table grew
            if key != self._newest:
                self._touch_locked(key)        # now the most recently used
            return None
        finally:
            lock.release()

    def take_pair(self, key, rate_per_s, burst, other, other_key, other_rate_per_s,
                  other_burst):
        """One token from ``key``'s bucket here and then one from ``other_key``'s in ``other``,
        a limiter made with this one's lock, as ``take`` twice would but under one lock and
        one clock reading (the guard's site-wide and route buckets, per request). None if
        both had it; (0, wait) if this bucket refused (``other`` was not asked); (1, wait)
        if ``other``'s refused (this one's token stays taken, as with two ``take``).

        The lock is taken with acquire and release, not ``with``: measured under valgrind,
        ``with lock:`` costs ~1,950 instructions (looking up __enter__ and __exit__, binding
        them, calling __exit__ with three arguments), acquire/try/finally/release ~900."""
        lock = self._lock
        lock.acquire()
        try:
            now = self._clock()
            # the first bucket: take() with cost 1, written out (a call costs a frame)
            table = self._full_at
            full_at = table.get(key, 0.0)
            if full_at > now:
                owed = full_at - now
                if owed * rate_per_s > burst - 1 + _EPSILON:
                    self._limited += 1
                    self._touch_locked(key)
                    return 0, owed - (burst - 1) / rate_per_s
                table[key] = full_at + 1 / rate_per_s
            else:
                table[key] = now + 1 / rate_per_s
                if not full_at:
                    self._newest = key
                    self._trim_locked(now)
            if key != self._newest:
                self._touch_locked(key)
            # the second, the same
            table = other._full_at
            full_at = table.get(other_key, 0.0)
            if full_at > now:
                owed = full_at - now
                if owed * other_rate_per_s > other_burst - 1 + _EPSILON:
                    other._limited += 1
                    other._touch_locked(other_key)
                    return 1, owed - (other_burst - 1) / other_rate_per_s
                table[other_key] = full_at + 1 / other_rate_per_s
            else:
                table[other_key] = now + 1 / other_rate_per_s
                if not full_at:
                    other._newest = other_key
                    other._trim_locked(now)
            if other_key != other._newest:
                other._touch_locked(other_key)
            return None
        finally:
            lock.release()

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
                self._touch_locked(key)
            else:
                self._newest = key
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
            self._touch_locked(key)
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

    def _touch_locked(self, key):
        """``key`` (in the table) is now the most recently used."""
        self._full_at.move_to_end(key)
        self._newest = key

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
