"""Which server the current thread works for: the binding behind ``state``, ``@cached`` and
``limiter()``.

Areas import process-wide names (``from handlers._core import state``), but what those names
reach belongs to one server: its store (its data directory), its response cache and its named
limiters. Two servers in one process (tests build several) must not share any of them: a note
POSTed to one would land in the other's data directory. So each server owns a ``ServerContext``
and each of its worker threads binds it (``bind``) before serving anything; the contract's names
look it up here, in a thread-local, when they are used (one attribute read).

What is bound where
    * A server's worker threads: bound to that server for their whole life.
    * The reactor thread, the log and backup threads: bound to nothing. None of them runs a
      handler; the guard and the backup use the store they were handed directly.
    * A thread that a handler starts itself: bound to nothing, so using ``state`` there raises a
      RuntimeError saying so (never a silent write to some other server's store). Hand it the
      handler's binding: ``threading.Thread(target=carry_context(work))``.
    * A script or test outside any server: ``state.bind(store)`` binds the calling thread to that
      store alone (``@cached`` and limiters stay unbound there); ``state.unbind(store)`` undoes
      it.

A thread serves one server: binding a thread that is bound to another context (another store)
raises RuntimeError instead of silently moving it. Binding the same one again does nothing.

This is how the contract reaches its implementations without importing them: the runtime builds
each server's ``ServerContext`` from ``onebox/`` objects and binds it here at start-up. Imports
the standard library only.
"""
import functools
import threading

__all__ = ["ServerContext", "bind", "unbind", "current", "require", "carry_context",
           "not_bound"]


class ServerContext(object):
    """What one server owns and its handlers reach through the contract: ``store`` (a
    ``handlers._state.StateStore``), ``responses`` (for ``@cached``: ``serve(key, ttl_s,
    compute)``, ``invalidate(prefix)``) and ``limiters`` (for ``limiter()``: ``get(name, policy,
    max_keys)``); any may be None (not available on threads bound to this context). The runtime
    fills them with its implementations (``onebox.store.Store``, ``onebox.cache.ResponseCache``,
    ``onebox.limits.LimiterRegistry``). ``owner`` names it in error messages."""

    __slots__ = ("store", "responses", "limiters", "owner")

    def __init__(self, store=None, responses=None, limiters=None, owner=""):
        self.store = store
        self.responses = responses
        self.limiters = limiters
        if not owner:
            owner = "a server" if store is None else "the store in %s" % store.data_dir
        self.owner = owner

    def __repr__(self):
        return "<ServerContext of %s>" % self.owner


class _Bound(threading.local):
    context = None   # the class attribute is every thread's default: unbound


# The binding. Read directly (``_bound.context``) only by the contract's hot paths (StateProxy);
# everything else goes through the functions below.
_bound = _Bound()


def bind(context):
    """Bind the calling thread to ``context``; RuntimeError if it is bound to another one."""
    if not isinstance(context, ServerContext):
        raise TypeError("'context' must be a ServerContext")
    bound = _bound.context
    if bound is not None and bound is not context:
        raise RuntimeError(
            "this thread (%s) is already bound to %s and refuses to be bound to %s as well: a "
            "thread works for one server; unbind it first, or use another thread"
            % (threading.current_thread().name, bound.owner, context.owner))
    _bound.context = context


def unbind(context):
    """Unbind the calling thread if it is bound to ``context``; otherwise do nothing."""
    if _bound.context is context:
        _bound.context = None


def current():
    """The calling thread's ServerContext, or None."""
    return _bound.context


def require(part, what):
    """The calling thread's context's ``part`` ("store", "responses" or "limiters"), or the
    RuntimeError of ``not_bound(what)`` if it has none."""
    found = getattr(_bound.context, part, None)   # None too when the thread is unbound
    if found is None:
        raise not_bound(what)
    return found


def not_bound(what):
    """The RuntimeError for using ``what`` (e.g. "state") on a thread without it."""
    context = _bound.context
    if context is None:
        where = "this thread (%s) works for no server" % threading.current_thread().name
    else:
        where = "this thread is bound to %s, which has none" % context.owner
    return RuntimeError(
        "%s is not bound: %s. A server's state, response cache and limiters are reached from "
        "the worker threads that run its handlers; a thread a handler starts must carry them: "
        "threading.Thread(target=carry_context(work)) (from handlers._core). A script or test "
        "binds its own: state.bind(store), or handlers._context.bind(ServerContext(...))."
        % (what, where))


def carry_context(function):
    """``function`` wrapped to run bound to the caller's context (for a thread it starts);
    RuntimeError now if the caller is bound to nothing."""
    context = _bound.context
    if context is None:
        raise not_bound("carry_context")

    @functools.wraps(function)
    def run_bound(*args, **kwargs):
        bind(context)
        try:
            return function(*args, **kwargs)
        finally:
            unbind(context)
    return run_bound
