"""The shared state as handler areas see it: ``state``, the interface it forwards to, and the
errors a write raises. An interface only: the store itself (journal, group commit, snapshots,
recovery) is the runtime's, ``onebox/store/``, which the server opens at start-up and binds to
its worker threads (``handlers/_context.py``).

For areas (through ``handlers._core``)::

    from handlers._core import state

    state.put("notes/1", {"text": "hi"})   # returns once durable (in the default mode)
    state.get("notes/1")                    # a fresh copy, the caller may change it
    state.incr("visits/home")               # exact under any concurrency
    state.items("notes/", limit=10)         # sorted by key; costs what it returns
    with state.transaction() as tx:         # all or nothing: one journal record
        tx.put("a", 1)
        tx.delete("b")

Keys are non-empty strings of at most ``MAX_KEY_CHARS`` characters without NUL (else
``StateKeyError``: a 400); values are plain JSON (else ValueError: the handler's bug, a 500). A
write that cannot be made durable raises ``StateWriteError`` (a 503) and changes nothing.

Imports the standard library and ``handlers._context``; never ``onebox`` (see handlers/_core.py).
"""
from handlers import _context

__all__ = ["state", "StateProxy", "StateStore", "StateError", "StateWriteError", "StateKeyError",
           "MAX_KEY_CHARS"]

MAX_KEY_CHARS = 1024            # keys are paths like "notes/123"; a longer one is refused with
                                # StateKeyError: a 400 when it came from a request


# --- errors -----------------------------------------------------------------------------------

class StateError(Exception):
    """Base of the store's errors."""


class StateWriteError(StateError):
    """A write could not be made durable (disk full, I/O error). Memory is unchanged; reads keep
    working; later writes succeed once the disk does. The server answers 503."""

    http_status = 503  # the runtime's mapping for infrastructure errors (see handlers/_core.py)
    public_message = "storage is unavailable; try again later"


class StateKeyError(StateError, ValueError):
    """A str key the store cannot hold: empty, longer than ``MAX_KEY_CHARS``, or holding NUL.
    Keys are often built from request input (``"notes/" + request.params["name"]``), so the
    server answers 400, not 500; the message names the rule but never echoes the key. (A key that
    is not a str at all is a plain ValueError: that is the handler's bug, a 500.)"""

    http_status = 400
    public_message = "a name in the request is too long or invalid"


# --- the interface ----------------------------------------------------------------------------

class StateStore(object):
    """What ``state`` forwards to: the calls a store keeps for areas. The runtime's
    implementation is ``onebox.store.Store``; every call is safe from any thread. ``data_dir``
    names the store in error messages."""

    data_dir = ""

    def get(self, key, default=None):
        """The value at key (a fresh object the caller may change), or default."""
        raise NotImplementedError

    def items(self, prefix="", limit=None):
        """[(key, value)] for keys starting with prefix, sorted by key; the first ``limit``."""
        raise NotImplementedError

    def keys(self, prefix="", limit=None):
        """Sorted keys starting with prefix; the first ``limit``."""
        raise NotImplementedError

    def put(self, key, value):
        """Set key to value (JSON); returns once durable per the server's ``durability``."""
        raise NotImplementedError

    def delete(self, key):
        """Remove key; returns whether it existed."""
        raise NotImplementedError

    def incr(self, key, n=1):
        """Add n to the int at key (missing counts as 0); returns the new value."""
        raise NotImplementedError

    def transaction(self):
        """``with store.transaction() as tx:`` -- tx has get/put/delete/incr, seen only by this
        transaction until the block ends, then written as one all-or-nothing record. Other
        writers wait while the body runs: keep it short (no I/O, no waiting)."""
        raise NotImplementedError


# --- the running server's store, as handler areas see it ---------------------------------------

class StateProxy(object):
    """``handlers._core.state``: the store of the server whose worker thread is running, under
    a name areas can import before any server exists.

    Each use looks up the calling thread's ``ServerContext`` (``handlers._context``; one
    thread-local read) and forwards to its store, so two servers in one process never share
    one. A thread bound to no store -- the test or script that imported it, a thread a handler
    started without ``carry_context`` -- gets RuntimeError("state is not bound: ..."), never a
    silent no-op or another server's store.

    For scripts and tests outside any server: ``bind(store)`` binds the calling thread to
    ``store`` alone (RuntimeError if it is bound to another one), ``unbind(store)`` undoes it.
    """

    __slots__ = ()

    # __getattribute__, not __getattr__: __getattr__ runs only after the normal lookup has
    # failed, which costs an AttributeError per use. Resolving ``state.get`` takes ~350 ns this
    # way against ~850 ns for the old __getattr__ proxy (timeit, CPython 3.11; store.get: ~60).
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
