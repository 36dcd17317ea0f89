"""The response cache, as handler areas see it: ``@cached`` and ``invalidate``. The contract
only: the cache itself is the runtime's (``onebox/cache.py``), one per server, bound to its
worker threads at start-up.

For handler areas::

    from handlers._cache import cached, invalidate

    @cached(ttl_s=30)                          # vary=("Accept-Language",) adds headers to the key
    def list_notes(request):
        ...

    def create_note(request):
        ...
        invalidate("/api/notes")               # drops every cached key that starts with it

What is cached, and what never is
    The key is the request path and query string (as sent), plus the value of each ``vary``
    header. Only GET and HEAD requests without an Authorization header are looked up; other
    requests call the handler as usual. Only 200 responses with a bytes body are kept, and never
    one that sets a cookie or says ``Cache-Control: private`` or ``no-store``: those are per
    user. A handler whose answer depends on a cookie must name it in ``vary`` or mark the
    response private. Entries expire ``ttl_s`` after they were computed. N concurrent misses of
    one key cost one computation; ``invalidate(prefix)`` drops the matching entries, and a
    computation under way when it is called is not stored. ``[cache]`` in setup.cfg caps the
    cache's entries and bytes.

One cache per server
    ``cached``, ``invalidate`` and ``responses`` reach the cache of the server running the
    handler (handlers/_context.py), so one server's cached GET never answers another server's
    request, and an invalidation empties only its own. On a thread bound to no server they raise
    RuntimeError ("the response cache is not bound: ..."), naming the fix.

Imports the standard library and ``handlers._context``; never ``onebox`` (see handlers/_core.py).
"""
import functools

from handlers import _context

__all__ = ["cached", "invalidate", "responses"]


class _ResponsesProxy(object):
    """``responses``: the response cache (``onebox.cache.ResponseCache``) of the server whose
    worker thread is running (see handlers/_context.py); RuntimeError on a thread bound to none."""

    __slots__ = ()

    def __getattr__(self, name):
        return getattr(_here(), name)


def _here():
    """The calling thread's server's ResponseCache."""
    return _context.require("responses", "the response cache")


responses = _ResponsesProxy()


def cached(ttl_s, vary=(), cache=None):
    """Decorate a GET handler so that its responses are cached for ``ttl_s`` seconds (see the
    module docstring); ``vary`` names request headers whose values are part of the key."""
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
    """Drop cached responses whose key (path + "?" + query) starts with ``prefix``."""
    return _here().invalidate(prefix)
