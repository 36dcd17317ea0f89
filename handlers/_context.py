"""Which server the calling thread works for: how the contract's names reach the runtime.

``state``, ``@cached`` and ``limiter()`` belong to one server, but areas import them before any
server exists: each server builds a ``ServerContext`` of its implementations, its worker threads
``bind`` it, and the contract looks it up in a thread-local at each use. A thread serves one
server (docs/design.md, "The contract and the runtime"). Imports the standard library only.
"""
import functools
import threading

__all__ = ["ServerContext", "bind", "unbind", "current", "require", "carry_context",
           "not_bound", "parsers", "use_parsers"]


class ServerContext(object):
    """One server's implementations, any of them None (unusable there): ``store`` (a
    ``handlers._state.StateStore``), ``responses`` (``onebox.cache.ResponseCache``),
    ``limiters`` (``onebox.limits.LimiterRegistry``), ``templates``
    (``onebox.templates.Templates``), ``sessions`` (``onebox.sessions.SessionStore``),
    ``logins`` (``onebox.sessions.Logins``), ``events`` (``onebox.events.EventHub``);
    ``owner`` names it in errors."""

    __slots__ = ("store", "responses", "limiters", "templates", "sessions", "logins", "events",
                 "owner")

    def __init__(self, store=None, responses=None, limiters=None, owner="", templates=None,
                 sessions=None, logins=None, events=None):
        self.store = store
        self.responses = responses
        self.limiters = limiters
        self.templates = templates
        self.sessions = sessions
        self.logins = logins
        self.events = events
        if not owner:
            owner = "a server" if store is None else "the store in %s" % store.data_dir
        self.owner = owner

    def __repr__(self):
        return "<ServerContext of %s>" % self.owner


class _Parsers(object):
    """The request parsers, ``read_json(request, max_bytes)``, ``read_form(request)``,
    ``read_query(text)`` and ``read_cookies(lines)`` (onebox/jsonbody.py, onebox/forms.py):
    stateless (a request brings its limits), so they serve every thread, bound or not."""

    read_json = read_form = read_query = read_cookies = None


parsers = _Parsers()


def use_parsers(read_json, read_form, read_query, read_cookies):
    """The runtime's request parsers, for every request of the process (set before serving)."""
    parsers.read_json, parsers.read_form = read_json, read_form
    parsers.read_query, parsers.read_cookies = read_query, read_cookies


class _Bound(threading.local):
    context = None   # the class attribute is every thread's default: unbound


# The binding; read directly only by the contract's hot path (StateProxy).
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
    """The calling thread's context's ``part`` (a slot name), or ``not_bound(what)``."""
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
    """``function`` wrapped to run bound to the caller's context (for a thread it starts)."""
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
