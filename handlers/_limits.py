"""Rate limits: token buckets by key, in a table with a hard cap. The contract and its default.

The contract (``Limiter``) is four calls, so that another backend (a shared one, for several
processes) could be written later without touching a handler:

    hit(key, cost=1, policy=None)   take ``cost`` tokens from ``key``'s bucket if it holds them;
                                    returns a ``Hit``: allowed, remaining tokens, retry_after_s
    peek(key, policy=None)          the tokens ``key`` holds now (nothing is taken)
    retry_after(key, cost=1, policy=None)
                                    seconds until ``cost`` tokens are there (0.0: now)
    stats()                         a dict for metrics: keys tracked, the cap, evictions, ...

plus ``forget(key)`` (a full bucket again: e.g. after a successful login). A ``Policy`` is a
name, a rate (tokens per second) and a burst (the bucket's size); a limiter has a default one,
and a call may pass another (the guard's per-route overrides share one table).

For handler areas (through ``handlers._core``)::

    from handlers._core import limiter, rate_limit

    LOGINS = limiter("login-per-account", rate_per_s=1 / 60, burst=5)  # 5 tries, then 1 a minute

    def login(request):
        rate_limit(LOGINS, request.json().get("account", ""))  # 429 + Retry-After when spent
        ...

``limiter(name, ...)`` returns the limiter of that name (the same object on every call, so a
module that is imported again -- a reload -- keeps its counters). Its buckets belong to the server
whose worker thread calls it: each server keeps its own, made on first use (``LimiterRegistry``,
through ``handlers._context``), so two servers in one process never share a bucket. Used from a
thread bound to no server it raises RuntimeError ("limiter 'login-per-account' is not bound").

The in-process implementation (``InProcessLimiter``)
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
"""
import collections
import math
import threading
import time

from handlers import _context

__all__ = ["Policy", "Hit", "Limiter", "InProcessLimiter", "LimiterRegistry", "NamedLimiter",
           "limiter", "set_backend", "all_stats", "rate_limit_headers", "DEFAULT_MAX_KEYS"]

DEFAULT_MAX_KEYS = 10000    # a handler's limiter: keys tracked before the least recent is evicted
_EXPIRE_PER_HIT = 2         # idle keys looked at (and dropped if full) per hit
_EPSILON = 1e-9             # float slack, so that exactly ``burst`` hits in a row all pass

Policy = collections.namedtuple("Policy", "name rate_per_s burst")
Policy.__doc__ = """``burst`` tokens at most, refilled at ``rate_per_s``; ``name`` is what the
RateLimit headers call it (an identifier: letters, digits, "-", "_")."""

Hit = collections.namedtuple("Hit", "allowed remaining retry_after_s policy")
Hit.__doc__ = """The answer to ``hit``: whether it was allowed, the tokens left after it, and
(when refused) the seconds until it would be allowed."""


def check_policy(policy):
    """Raise ValueError unless ``policy`` is usable; returns it."""
    if not isinstance(policy, Policy):
        raise ValueError("'policy' must be a Policy(name, rate_per_s, burst)")
    if not (isinstance(policy.rate_per_s, (int, float)) and policy.rate_per_s > 0
            and math.isfinite(policy.rate_per_s)):
        raise ValueError("'rate_per_s' must be a positive number")
    if not (isinstance(policy.burst, (int, float)) and policy.burst >= 1
            and math.isfinite(policy.burst)):
        raise ValueError("'burst' must be a number >= 1")
    if not policy.name or not all(c.isalnum() or c in "-_" for c in policy.name):
        raise ValueError("policy name %r must be letters, digits, '-' or '_'" % policy.name)
    return policy


def check_max_keys(max_keys):
    """Raise ValueError unless ``max_keys`` is a whole number >= 1; returns it."""
    if not isinstance(max_keys, int) or max_keys < 1:
        raise ValueError("'max_keys' must be a whole number >= 1")
    return max_keys


class Limiter(object):
    """The contract every limiter backend keeps (see the module docstring). Keys are any
    hashable value; a backend that is not in-process would need them to be strings."""

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


def rate_limit_headers(hit):
    """Retry-After (RFC 9110 section 10.2.3; whole seconds, rounded up so that a client that
    waits that long does get through) and the IETF httpapi RateLimit-Policy / RateLimit fields
    (draft-ietf-httpapi-ratelimit-headers: quota ``q`` over window ``w`` seconds; ``r`` units
    remaining, ``t`` seconds until there are some). A token bucket's window is the time it takes
    to refill from empty."""
    policy = hit.policy
    wait = max(1, int(math.ceil(hit.retry_after_s - _EPSILON))) if not hit.allowed else 0
    window = max(1, int(math.ceil(policy.burst / policy.rate_per_s)))
    headers = [("RateLimit-Policy", '"%s";q=%d;w=%d' % (policy.name, policy.burst, window)),
               ("RateLimit", '"%s";r=%d;t=%d' % (policy.name, int(hit.remaining), wait))]
    if not hit.allowed:
        headers.insert(0, ("Retry-After", str(wait)))
    return headers


# --- named limiters, for handler areas: one table per server ----------------------------------
# ``limiter(name, ...)`` runs at import time, before any server exists, and one imported module
# serves every server in the process; so it returns a ``NamedLimiter``: a name and a policy,
# whose buckets live in the ``LimiterRegistry`` of the server whose worker thread calls it
# (handlers/_context.py). Two servers never share a bucket.

_backend = InProcessLimiter
_names_lock = threading.Lock()   # guards _names and _backend
_names = {}                      # name -> NamedLimiter


class LimiterRegistry(object):
    """One server's named limiters: name -> the backend's Limiter, made on first use."""

    def __init__(self):
        self._lock = threading.Lock()   # guards the making of limiters in _limiters
        self._limiters = {}             # name -> Limiter

    def get(self, name, policy, max_keys):
        """The limiter called ``name``, made with ``policy`` and ``max_keys`` if it is new."""
        found = self._limiters.get(name)   # one dict read, no lock: the common case
        if found is None:
            with self._lock:
                found = self._limiters.get(name)
                if found is None:
                    found = self._limiters[name] = _backend(policy, max_keys)
        return found

    def stats(self):
        """{name: stats()} for every limiter made so far (metrics)."""
        with self._lock:
            limiters = list(self._limiters.items())
        return {name: item.stats() for name, item in limiters}


class NamedLimiter(Limiter):
    """What ``limiter(name, ...)`` returns: each call goes to the limiter of that name in the
    calling thread's server, with this ``policy`` (a call's own ``policy`` wins)."""

    def __init__(self, policy, max_keys):
        self.policy = policy
        self.max_keys = max_keys
        self._what = "limiter %r" % policy.name   # for the error on an unbound thread

    def _here(self):
        registry = _context.require("limiters", self._what)
        return registry.get(self.policy.name, self.policy, self.max_keys)

    def hit(self, key, cost=1, policy=None):
        return self._here().hit(key, cost, policy or self.policy)

    def peek(self, key, policy=None):
        return self._here().peek(key, policy or self.policy)

    def retry_after(self, key, cost=1, policy=None):
        return self._here().retry_after(key, cost, policy or self.policy)

    def forget(self, key):
        self._here().forget(key)

    def stats(self):
        return self._here().stats()

    def __repr__(self):
        return "<NamedLimiter %r>" % (self.policy,)


def limiter(name, rate_per_s, burst, max_keys=DEFAULT_MAX_KEYS):
    """The limiter called ``name`` (see above): later calls get the same one with this policy,
    so counters survive a module being imported again. Its buckets are per server."""
    policy = check_policy(Policy(name, rate_per_s, burst))
    check_max_keys(max_keys)   # now: the limiter itself is made later, by each server
    with _names_lock:
        existing = _names.get(name)
        if existing is None:
            existing = _names[name] = NamedLimiter(policy, max_keys)
        else:
            existing.policy = policy
        return existing


def set_backend(factory):
    """Make limiters that servers make from now on use ``factory(policy, max_keys)`` (another
    backend); call it before the handler areas are imported."""
    global _backend
    with _names_lock:
        _backend = factory


def all_stats():
    """{name: stats()} for every named limiter of the calling thread's server (metrics)."""
    return _context.require("limiters", "limiters").stats()
