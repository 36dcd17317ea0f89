"""The response cache as areas see it: ``@cached(ttl_s, vary=())`` and ``invalidate(prefix)``.
The cache itself is the runtime's (``onebox/cache.py``), one per server, bound to its worker
threads (``handlers/_context.py``). What is cached and what never is: docs/areas.md, "Response
cache". On a thread bound to no server these raise RuntimeError ("the response cache is not
bound: ..."). In a cluster (``[cluster] redis_url``) each process has its own cache, and an
``invalidate`` through any of them reaches them all (onebox/cache.py, "In a cluster").
"""
import functools

from handlers import _context

__all__ = ["cached", "invalidate", "responses"]


class _ResponsesProxy(object):
    """``responses``: the calling worker thread's server's ``onebox.cache.ResponseCache``."""

    __slots__ = ()

    def __getattr__(self, name):
        return getattr(_here(), name)


def _here():
    return _context.require("responses", "the response cache")


responses = _ResponsesProxy()


def cached(ttl_s, vary=(), cache=None):
    """Cache a GET handler's responses for ``ttl_s`` seconds, keyed by path and query string
    plus the values of the ``vary`` request headers."""
    if not ttl_s > 0:
        raise ValueError("'ttl_s' must be positive")
    vary = tuple(name.lower() for name in vary)

    def decorate(handler):
        @functools.wraps(handler)
        def serve_cached(request):
            if request.method not in ("GET", "HEAD") or "authorization" in request.headers:
                return handler(request)
            key = request.path + "?" + request.query_string
            for name in vary:
                key += "\n%s: %s" % (name, request.headers.get(name, ""))
            return (cache or _here()).serve(key, ttl_s, lambda: handler(request))
        return serve_cached
    return decorate


def invalidate(prefix=""):
    """Drop cached responses whose key (path + "?" + query) starts with ``prefix``; returns how
    many this process dropped (in a cluster the others drop theirs when told, within moments)."""
    return _here().invalidate(prefix)
