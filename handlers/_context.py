"""Which server the calling thread works for: how the contract's names reach the runtime.

``state``, ``@cached`` and ``limiter()`` belong to one server, but areas import them before any
server exists. So each server builds a
``ServerContext`` of its own implementations, each of its worker threads binds it (``bind``),
and the contract looks it up here, in a thread-local, at each use. A thread serves one server:
binding one already bound to another context raises RuntimeError. Who is bound to what, and
why: docs/design.md, "The contract and the runtime". Imports the standard library only.
"""
import functools
import threading

__all__ = ["ServerContext", "bind", "unbind", "current", "require", "carry_context",
           "not_bound", "parsers", "use_parsers"]


class ServerContext(object):
    """One server's implementations of the contract, filled by the runtime; any may be None
    (then unusable on threads bound to it): ``store`` (a ``handlers._state.StateStore``),
    ``responses`` (``serve(key, ttl_s, compute)``, ``invalidate(prefix)``), ``limiters``
    (``get(name, policy, max_keys)``), ``templates`` (``render(name, variables)``: the
    compiled handlers/templates/, onebox/templates.py). ``owner`` names it in error messages."""

    __slots__ = ("store", "responses", "limiters", "templates", "owner")

    def __init__(self, store=None, responses=None, limiters=None, owner="", templates=None):
        self.store = store
        self.responses = responses
        self.limiters = limiters
        self.templates = templates
        if not owner:
            owner = "a server" if store is None else "the store in %s" % store.data_dir
        self.owner = owner

    def __repr__(self):
        return "<ServerContext of %s>" % self.owner


class _Parsers(object):
    """The request body parsers, ``read_json(request, max_bytes)`` and ``read_form(request)``
    (onebox/jsonbody.py, onebox/forms.py). They hold no state of a server's (a request brings
    its own limits), so one pair serves the process and any thread, bound or not (a thread a
    handler starts may parse its request); the runtime sets them (``use_parsers``)."""

    read_json = read_form = None


parsers = _Parsers()


def use_parsers(read_json, read_form):
    """The runtime's body parsers, for every request of the process (set before serving)."""
    parsers.read_json, parsers.read_form = read_json, read_form


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
    """The calling thread's context's ``part`` (a slot name), or the RuntimeError of
    ``not_bound(what)`` if it has none."""
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
        "%s is not bound: %s. A server's state, response cache and limiters are "
        "reached from the worker threads that run its handlers; a thread a handler starts must "
        "carry them: threading.Thread(target=carry_context(work)) (from handlers._core). A "
        "script or test binds its own: state.bind(store), or "
        "handlers._context.bind(ServerContext(...))."
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
