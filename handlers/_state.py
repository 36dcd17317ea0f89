"""The shared state as areas see it: ``state``, the interface it forwards to, and the errors a
write raises. The store itself is the runtime's (``onebox/store/``), bound per server
(``handlers/_context.py``). What the calls do: docs/areas.md, "Shared state".

Keys are non-empty strings of at most ``MAX_KEY_CHARS`` characters without NUL (else
``StateKeyError``: a 400); values are plain JSON (else ValueError: the handler's bug, a 500). A
write that cannot be made durable raises ``StateWriteError`` (a 503) and changes nothing. A read
the store cannot answer (its Redis is unreachable, with ``[cluster]``) raises
``StateUnavailableError`` (a 503), never a wrong answer.
"""
from handlers import _context

__all__ = ["state", "StateProxy", "StateStore", "StateError", "StateWriteError",
           "StateUnavailableError", "StateKeyError", "MAX_KEY_CHARS"]

MAX_KEY_CHARS = 1024            # keys are paths like "notes/123"


class StateError(Exception):
    """Base of the store's errors."""


class StateWriteError(StateError):
    """A write could not be made durable (disk full, I/O error): nothing changed; reads work;
    writes succeed again once the disk does. The server answers 503. (With ``[cluster]``, a
    connection to Redis lost mid-write leaves it unknown whether Redis made it.)"""

    http_status = 503  # the runtime's mapping for infrastructure errors (see handlers/_core.py)
    public_message = "storage is unavailable; try again later"


class StateUnavailableError(StateError):
    """A read could not be answered: the store is kept in Redis (``[cluster]``) and Redis is
    unreachable, timed out or still loading. Raised rather than a default that may be wrong;
    reads work again once Redis does. The server answers 503."""

    http_status = 503
    public_message = "storage is unavailable; try again later"


class StateKeyError(StateError, ValueError):
    """A str key the store cannot hold (empty, too long, NUL): keys are often built from
    request input, so a 400 that never echoes it (a key that is no str is a 500)."""

    http_status = 400
    public_message = "a name in the request is too long or invalid"


class StateStore(object):
    """What ``state`` forwards to; the runtime's is ``onebox.store.Store``, safe from any
    thread: ``get(key, default=None)`` (a fresh copy), ``items(prefix="", limit=None)`` and
    ``keys(prefix="", limit=None)`` (sorted by key), ``put(key, value)`` (returns once durable),
    ``delete(key)`` (whether it existed), ``incr(key, n=1)`` (the new value) and
    ``transaction()`` (``with``: the same calls on ``tx``, all or nothing; keep it short).
    ``data_dir`` names it in error messages."""

    data_dir = ""

    def __enter__(self):   # ``with Store(...) as store:`` closes it at the end
        return self

    def __exit__(self, *exc_info):
        self.close()


class StateProxy(object):
    """``state``: the store of the server whose worker thread is running (one thread-local read
    per use); RuntimeError("state is not bound: ...") on a thread bound to none. For scripts and
    tests: ``bind(store)`` binds the calling thread to ``store`` alone, ``unbind(store)`` undoes
    it."""

    __slots__ = ()

    # __getattribute__: __getattr__ would run only after a failed lookup, an AttributeError
    # per use (~850 ns per state.get against ~350: docs/design.md, "The contract and ...")
    def __getattribute__(self, name):
        if name in _PROXY_OWN or name[:2] == "__":
            return object.__getattribute__(self, name)
        context = _context._bound.context
        if context is None or context.store is None:
            raise _context.not_bound("state")
        return getattr(context.store, name)

    def bind(self, store):
        if not isinstance(store, StateStore):
            raise TypeError("'store' must be a Store")
        bound = _context.current()
        if bound is None or bound.store is not store:
            _context.bind(_context.ServerContext(store))

    def unbind(self, store):
        bound = _context.current()
        if bound is not None and bound.store is store:
            _context.unbind(bound)


_PROXY_OWN = frozenset(("bind", "unbind"))
state = StateProxy()
