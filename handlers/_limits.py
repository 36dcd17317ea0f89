"""Rate limits as areas see them: ``limiter()``, ``Policy``, ``Hit`` and the 429's header
fields (``rate_limit`` is in ``handlers._core``; docs/areas.md, "Rate limits of your own"). The
buckets are the runtime's (``onebox/limits.py``: ``Limiter`` is what a backend keeps), one table
per server, bound to its worker threads (``handlers/_context.py``).
"""
import collections
import math
import threading

from handlers import _context

__all__ = ["Policy", "Hit", "NamedLimiter", "limiter", "rate_limit_headers", "check_policy",
           "check_max_keys", "DEFAULT_MAX_KEYS"]

DEFAULT_MAX_KEYS = 10000    # a handler's limiter: keys tracked before the least recent is evicted
_EPSILON = 1e-9             # float slack: a wait of exactly n seconds is not rounded up to n + 1

Policy = collections.namedtuple("Policy", "name rate_per_s burst")
Policy.__doc__ = """``burst`` tokens at most, refilled at ``rate_per_s``; ``name`` is what the
RateLimit headers call it (an identifier: letters, digits, "-", "_")."""

Hit = collections.namedtuple("Hit", "allowed remaining retry_after_s policy")
Hit.__doc__ = """The answer to ``hit``: whether it was allowed, the tokens left after it, and
(when refused) the seconds until it would be allowed."""


def check_policy(policy):
    """``policy``, or ValueError: here so that ``limiter()`` refuses it at import (start-up)."""
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
    """``max_keys``, or ValueError unless it is a whole number >= 1."""
    if not isinstance(max_keys, int) or max_keys < 1:
        raise ValueError("'max_keys' must be a whole number >= 1")
    return max_keys


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


# ``limiter(name, ...)`` runs when an area is imported, before any server exists, and one module
# serves every server in the process: so it returns a name and a policy, and each call goes to
# the limiter of that name in the calling thread's server (``ServerContext.limiters``).
_names_lock = threading.Lock()   # guards _names
_names = {}                      # name -> NamedLimiter


class NamedLimiter(object):
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
    """The limiter called ``name``: later calls get the same one with this policy, so counters
    survive a module being imported again (a reload). Its buckets are per server."""
    policy = check_policy(Policy(name, rate_per_s, burst))
    check_max_keys(max_keys)   # now: the limiter itself is made later, by each server
    with _names_lock:
        existing = _names.get(name)
        if existing is None:
            existing = _names[name] = NamedLimiter(policy, max_keys)
        else:
            existing.policy = policy
        return existing
