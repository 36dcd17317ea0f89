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

Shared by the processes of a cluster (``SharedLimiter``, issue 24)
    With ``[cluster] redis_url`` set, a bucket is counted in Redis, so that N processes
    behind one address refuse a client at the configured rate, not N times it. The GCRA step
    (for one bucket or two, the guard's site-wide and route buckets together) is one Lua
    script, ``_RESERVE``: atomic, one round trip, and timed by Redis's own ``TIME``, so the
    boxes' clocks do not matter. A key is the bucket's full-again time in microseconds and
    expires (PX) when the bucket is full again, so Redis holds only buckets in use.
    Each shared limiter keeps an in-process one in front of it: a request its local bucket
    refuses is refused without asking Redis (the local count is at most the global one plus
    one token), which keeps an abuser's flood off the network.
    A round trip per request cost ~70 us of the process's CPU and ~30 of Redis's
    (bench/bench_cluster.py: hello fell to a third of the one-process rate), so a process
    reserves tokens ahead: when it asks, it takes from each bucket the token it needs and, while
    the bucket has plenty, up to ``1 / (RESERVE_SPREAD x live processes)`` of what it holds (at
    most ``RESERVE_MAX``), and spends the extra ones on the bucket's next requests without
    asking, for at most ``RESERVE_S`` (hello: 0.74x the one-process rate, +7 us). Reserved
    tokens are counted in Redis when they are taken, so the processes together never let more
    through than the bucket holds; a reservation left unspent only makes the bucket stricter
    for a moment, and near empty a bucket's reservations are one token: the exact count, a
    round trip each, for the clients near their limit. (``_TAKE`` is the same step without
    reserving, for a cost of several tokens: an area limiter's ``hit``.)
    When Redis cannot be reached (``SharedBuckets``) the local buckets decide alone (the limits count per process), the outage is logged once
    each way, and no request waits for a connect until the cluster's heartbeat has seen
    Redis again.

One table per server (``LimiterRegistry``)
    Each server owns one, in its ``ServerContext`` (``handlers/_context.py``); the contract's
    ``limiter(name, ...)`` objects find it through the calling worker thread and ask it for the
    limiter of their name, made on first use by the registry's ``make`` (the in-process buckets
    by default; in a cluster, ``join_cluster``: SharedLimiters), so two servers in one process
    never share a bucket.

Imports the standard library, the contract (``handlers._limits``, ``handlers._context``) and
the Redis client (``onebox.redis``, used only in a cluster).
"""
import collections
import threading
import time

from handlers import _context
from handlers._limits import DEFAULT_MAX_KEYS, Hit, check_max_keys, check_policy
from onebox.redis import RedisError, RedisUnavailable

__all__ = ["Limiter", "InProcessLimiter", "SharedBuckets", "SharedLimiter", "LimiterRegistry",
           "all_stats", "UNAVAILABLE"]

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
        """``take`` (a backend's: None if the tokens were taken, else the seconds to wait)
        and ``peek``, as a Hit."""
        policy = policy or self.policy
        if cost > policy.burst:
            raise ValueError("cost %r exceeds the burst %r: it could never pass"
                             % (cost, policy.burst))
        wait = self.take(key, policy.rate_per_s, policy.burst, cost)
        if wait is None:
            return Hit(True, self.peek(key, policy), 0.0, policy)
        return Hit(False, max(0.0, cost - wait * policy.rate_per_s), wait, policy)

    def take(self, key, rate_per_s, burst, cost=1):
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


# --- buckets shared by the processes of a cluster (issue 24) -----------------------------------

UNAVAILABLE = object()      # SharedBuckets.run's answer while Redis cannot be asked

# GCRA over one or more buckets, in order, as InProcessLimiter.take_pair does: each bucket's key
# holds the Redis time (microseconds) at which it is full again. ARGV: the cost, then per key
# its emission interval (microseconds a token takes to refill) and its burst. Returns
# {-1, owed} when every bucket had the tokens (owed: microseconds the last is short of full),
# or {i, wait} when bucket i (from 0) refused: the buckets before it keep their tokens, the
# ones after it are not asked. Redis 5 and later replicate a script's effects, so TIME before
# a write is allowed; integers only (a double holds microseconds since 1970 exactly).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local owed = 0
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local full_at = tonumber(redis.call('GET', key) or 0)
  if full_at < now then full_at = now end
  local allowed = math.floor((burst - cost) * interval)
  if full_at - now > allowed then
    return {i - 1, full_at - now - allowed}
  end
  full_at = full_at + math.ceil(cost * interval)
  owed = full_at - now
  redis.call('SET', key, string.format('%d', full_at), 'PX', math.ceil(owed / 1000))
end
return {-1, owed}
"""

# _TAKE that reserves: takes from each bucket (KEYS) the token the request needs and up to
# available / ARGV[1] more (at most ARGV[2] in all); ARGV[3 ...]: each bucket's interval and
# burst. {-1, taken, ...} (the tokens taken per bucket), or {index, microseconds to wait} for
# the first bucket without a token (the buckets before it keep what they took, as in _TAKE).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local spread = tonumber(ARGV[1])
local most = tonumber(ARGV[2])
local taken = {-1}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i + 1])
  local burst = tonumber(ARGV[2 * i + 2])
  local full_at = tonumber(redis.call('GET', key) or 0)
  if full_at < now then full_at = now end
  local room = burst * interval - (full_at - now)
  if room < interval then
    return {i - 1, interval - room}
  end
  local take = math.floor(math.floor(room / interval) / spread)
  if take < 1 then take = 1 end
  if take > most then take = most end
  full_at = full_at + take * interval
  redis.call('SET', key, string.format('%d', full_at), 'PX', math.ceil((full_at - now) / 1000))
  taken[i + 1] = take
end
return taken
"""
RESERVE_MAX = 64        # tokens a process takes ahead from one bucket at once
RESERVE_SPREAD = 4      # ... and at most 1 / (this x live processes) of what the bucket holds
RESERVE_S = 1.0         # an unspent reservation lapses after this long (stricter, never laxer)
RESERVE_KEYS = 65536    # buckets with a reservation held; past it all are dropped (stricter)

# The microseconds a bucket is short of full (0: full or absent), by Redis's clock.
_OWED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local full_at = tonumber(redis.call('GET', KEYS[1]) or 0)
if full_at < now then return 0 end
return full_at - now
"""


def _interval_us(rate_per_s):
    """A token's refill time in whole microseconds (at least 1), as the scripts take it."""
    return max(1, int(round(1e6 / rate_per_s)))


class SharedBuckets(object):
    """One process's use of Redis for counting (the guard's buckets and strikes, the areas'
    limiters): runs a script, or answers UNAVAILABLE while Redis cannot be asked, so that the
    caller decides alone. Never raises for Redis's sake: a rate limit must not turn an outage
    into 5xx.

    An outage starts at the first call that fails (logged once: ``"<who>: redis unavailable;
    <what> count per process until it returns"``). Until the cluster's heartbeat has reached
    Redis again (``cluster.up``), no call is tried: a request never waits on a connect attempt
    (the client's own backoff would let one through every few seconds, each up to
    ``[cluster] timeout_s`` when a host is gone). The first call that works ends it (logged
    once). Any thread."""

    def __init__(self, cluster, log, who="guard", what="rate limits"):
        self.cluster = cluster
        self.redis = cluster.redis
        self._log = log
        self._who, self._what = who, what
        self._take = self.redis.script(_TAKE)
        self._reserve = self.redis.script(_RESERVE)
        self._owed = self.redis.script(_OWED)
        # Tokens taken ahead in Redis and not yet spent: Redis key -> [tokens, lapses at]
        # (monotonic). _reserved_lock guards it; any worker thread.
        self._reserved_lock = threading.Lock()
        self._reserved = {}
        self.asked = 0         # round trips made for tokens (the reservations' saving shows)
        # _lock guards _down's changes, so that each outage is logged once each way; the
        # request path reads _down without it (one attribute read)
        self._lock = threading.Lock()
        self._down = False
        self.outages = 0
        self.unanswered = 0    # calls answered UNAVAILABLE (a lost increment costs a metric)

    def key(self, name):
        return self.cluster.key(name)

    def script(self, source):
        return self.redis.script(source)

    def run(self, script, keys, args):
        """``script``'s reply, or UNAVAILABLE (Redis is down, or refused the script)."""
        if self._down and not self.cluster.up:
            self.unanswered += 1
            return UNAVAILABLE
        try:
            reply = script(keys, args)
        except (RedisUnavailable, RedisError) as error:
            self.unanswered += 1
            self._lost(error)
            return UNAVAILABLE
        if self._down:
            self._back()
        return reply

    def take(self, keys, cost, buckets):
        """GCRA in Redis over ``keys`` (``buckets``: a (rate_per_s, burst) for each): None if
        each had ``cost`` tokens, (index, seconds to wait) for the first that had not, or
        UNAVAILABLE."""
        args = [cost]
        for rate_per_s, burst in buckets:
            args += [_interval_us(rate_per_s), burst]
        reply = self.run(self._take, keys, args)
        if reply is UNAVAILABLE:
            return reply
        which, micros = reply
        return None if which < 0 else (which, micros / 1e6)

    def spend(self, key):
        """Whether a token reserved earlier for ``key`` was there, and is now spent."""
        with self._reserved_lock:
            held = self._reserved.get(key)
            if held is None:
                return False
            if held[1] < time.monotonic():
                del self._reserved[key]
                return False
            held[0] -= 1
            if held[0] <= 0:
                del self._reserved[key]
            return True

    def reserve(self, keys, buckets):
        """A token from each of ``keys`` (``buckets``: each one's (rate_per_s, burst)), and
        more ahead while they have plenty (see the module docstring): None, (index, seconds to
        wait) for the first that had none, or UNAVAILABLE."""
        spread = RESERVE_SPREAD * max(1, self.cluster.node_count)
        args = [spread, RESERVE_MAX]
        for rate_per_s, burst in buckets:
            args += [_interval_us(rate_per_s), burst]
        self.asked += 1
        reply = self.run(self._reserve, keys, args)
        if reply is UNAVAILABLE:
            return reply
        if reply[0] >= 0:
            return reply[0], reply[1] / 1e6
        lapses = time.monotonic() + RESERVE_S
        with self._reserved_lock:
            reserved = self._reserved
            if len(reserved) >= RESERVE_KEYS:
                reserved.clear()
            for key, taken in zip(keys, reply[1:]):
                if taken > 1:
                    reserved[key] = [taken - 1, lapses]
        return None

    def drop_reserved(self, key):
        with self._reserved_lock:
            self._reserved.pop(key, None)

    def owed(self, key):
        """The seconds ``key``'s bucket is short of full, or UNAVAILABLE."""
        reply = self.run(self._owed, (key,), ())
        return reply if reply is UNAVAILABLE else reply / 1e6

    def delete(self, *keys):
        """Drop buckets (a ban lifted); whether Redis took it."""
        return self.run(_Delete(self.redis), keys, ()) is not UNAVAILABLE

    @property
    def down(self):
        return self._down

    def _lost(self, error):
        with self._lock:
            if self._down:
                return
            self._down = True
            self.outages += 1
        self._log("%s: redis unavailable; %s count per process until it returns (%s)"
                  % (self._who, self._what, error), level="warning")

    def _back(self):
        with self._lock:
            if not self._down:
                return
            self._down = False
        self._log("%s: redis is back; %s count across the cluster again"
                  % (self._who, self._what), level="info")

    def stats(self):
        return {"down": self._down, "outages": self.outages, "unanswered": self.unanswered,
                "asked": self.asked, "reserved": len(self._reserved)}


class _Delete(object):
    """DEL as a script-like callable, for ``SharedBuckets.run``."""

    def __init__(self, redis):
        self.redis = redis

    def __call__(self, keys=(), args=()):
        return self.redis.call("DEL", *keys)


def _text(key):
    """A limiter key as Redis key text: strings as they are, anything else by its repr (the
    same on every process, unlike hash())."""
    return key if isinstance(key, str) else repr(key)


class SharedLimiter(Limiter):
    """Token buckets counted in Redis by every process of a cluster, each with an in-process
    bucket in front (``local``, an InProcessLimiter): see the module's docstring. Keys are
    strings (or values whose repr is the same in every process). ``buckets`` is the process's
    SharedBuckets; ``name`` names the Redis keys (``<key_prefix>limits:<name>:<key>``).
    ``take`` and ``take_pair`` answer as InProcessLimiter's do; ``policy`` and ``max_keys`` are
    the local limiter's."""

    def __init__(self, buckets, name, local):
        self.buckets = buckets
        self.local = local
        self.prefix = buckets.key("limits:%s:" % name)

    @property
    def policy(self):
        return self.local.policy

    @policy.setter
    def policy(self, policy):
        self.local.policy = policy

    @property
    def max_keys(self):
        return self.local.max_keys

    @max_keys.setter
    def max_keys(self, max_keys):
        self.local.max_keys = max_keys

    def redis_key(self, key):
        return self.prefix + _text(key)

    def take(self, key, rate_per_s, burst, cost=1):
        wait = self.local.take(key, rate_per_s, burst, cost)
        if wait is not None:
            return wait                   # this process alone is over: no need to ask
        refused = self.buckets.take((self.prefix + _text(key),), cost, ((rate_per_s, burst),))
        if refused is None or refused is UNAVAILABLE:
            return None
        return refused[1]

    def take_pair(self, key, rate_per_s, burst, other, other_key, other_rate_per_s,
                  other_burst):
        """As InProcessLimiter.take_pair, ``other`` a SharedLimiter made with a local limiter
        that shares this one's lock: the local pair first, then both in one script."""
        refused = self.local.take_pair(key, rate_per_s, burst, other.local, other_key,
                                       other_rate_per_s, other_burst)
        if refused is not None:
            return refused
        buckets = self.buckets
        mine, theirs = self.prefix + _text(key), other.prefix + _text(other_key)
        if buckets.spend(mine):         # a token reserved ahead: no round trip for it
            if buckets.spend(theirs):
                return None
            refused = buckets.reserve((theirs,), ((other_rate_per_s, other_burst),))
            if refused is None or refused is UNAVAILABLE:
                return None
            return 1, refused[1]
        refused = buckets.reserve((mine, theirs), ((rate_per_s, burst),
                                                   (other_rate_per_s, other_burst)))
        return None if refused is UNAVAILABLE else refused

    def peek(self, key, policy=None):
        policy = policy or self.policy
        owed = self.buckets.owed(self.prefix + _text(key))
        if owed is UNAVAILABLE:          # the local bucket is what counts meanwhile
            return self.local.peek(key, policy)
        return max(0.0, policy.burst - owed * policy.rate_per_s)

    def retry_after(self, key, cost=1, policy=None):
        policy = policy or self.policy
        owed = self.buckets.owed(self.prefix + _text(key))
        if owed is UNAVAILABLE:
            return self.local.retry_after(key, cost, policy)
        return max(0.0, owed - (policy.burst - cost) / policy.rate_per_s)

    def forget(self, key):
        self.local.forget(key)
        self.buckets.drop_reserved(self.prefix + _text(key))
        self.buckets.delete(self.prefix + _text(key))

    def stats(self):
        stats = self.local.stats()
        stats["shared"] = self.buckets.stats()
        return stats


# --- each server's named limiters -------------------------------------------------------------

class LimiterRegistry(object):
    """One server's named limiters: name -> a Limiter made on first use by ``make(policy,
    max_keys)`` (the in-process buckets; another backend is another ``make``, given by the
    runtime that builds the registry)."""

    def __init__(self, make=InProcessLimiter):
        self._make = make
        self._lock = threading.Lock()   # guards the making of limiters in _limiters
        self._limiters = {}             # name -> Limiter

    def join_cluster(self, cluster, log):
        """From now on, hand out limiters counted in Redis (SharedLimiter, each with one made
        by the current ``make`` in front). At start-up, before any worker runs; ``log`` is the
        error log (``log(message, level=...)``)."""
        buckets = SharedBuckets(cluster, log, "limits", "areas' rate limits")
        local = self._make

        def make(policy, max_keys):
            return SharedLimiter(buckets, "area:" + policy.name, local(policy, max_keys))
        with self._lock:
            self._make = make

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
