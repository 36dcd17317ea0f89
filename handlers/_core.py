"""The handler contract: everything an area module needs, and nothing else.

A handler is a plain function::

    def get_note(request):            # request: Request (below)
        ...
        return json_response(note)    # a Response, or a shortcut value

and an area module (``handlers/notes.py``) ends with its routes as data::

    ROUTES = [
        ("GET", "/api/notes/{id}", get_note),       # GET also answers HEAD
        ("GET", "/files/{rest...}", get_file),      # {name...} takes the rest of the path
    ]

Return values: a ``Response``; or a dict/list (sent as JSON), a str (text/plain), bytes
(application/octet-stream), or None (204 No Content).

Expected failures: ``raise HTTPError(404, "no such note")`` anywhere in a handler becomes that status
with the message as a short body. Any other exception becomes a 500 whose body says nothing about
the cause; the traceback goes to the error log. Infrastructure errors declare their own status
(``StateWriteError.http_status = 503``: the write was not made; the client may retry).

Shared state: ``state`` (from ``handlers._state``) is the durable store of the server running
the handler: ``state.get(key)``, ``state.put(key, value)``, ``state.delete(key)``,
``state.incr(key, n)``, ``state.items(prefix)``, and ``with state.transaction() as tx:`` for
all-or-nothing writes. A write returns once it is on disk (in the default durability mode).

JSON both ways (RFC 8259): ``request.json()`` takes a body of at most the server's
``max_json_bytes`` (64 KiB by default; 413 beyond it, before a byte is parsed), or of
``request.json(max_bytes=N)`` for a handler that needs more (or less): the body is still capped
by ``max_body_bytes``. With the checks below, a 64 KiB body of any shape parses in at most
~4 ms, 1 MiB in up to ~80 ms (a body of tiny objects, the worst shape: 3-4x json.loads alone;
CPython 3.11 on a busy 2-core machine). It answers 400 for what a browser's ``JSON.parse`` or
another parser would read otherwise: ``NaN``, ``Infinity``, a number too large for a float
(``1e999``), a duplicate key in an object, a lone surrogate, and a body that is not UTF-8
(UTF-16, UTF-32, a byte order mark).
``json_response`` never sends ``NaN`` or ``Infinity``: a handler that returns them gets a 500 (the
traceback in the error log), not a body ``JSON.parse`` rejects.

Rate limits for a handler's own keys (login attempts per account, say): ``limiter(name,
rate_per_s, burst)`` gives the limiter of that name (``handlers._limits``: hit, peek,
retry_after, stats), and ``rate_limit(limiter, key)`` raises a 429 with Retry-After when the key's
bucket is empty. Cached GET responses: ``handlers._cache`` (``@cached(ttl_s=...)``, ``invalidate``).

Each server owns its store, its response cache and its limiters' buckets: two servers in one
process (tests build several) share none of them. ``state``, ``@cached``/``invalidate`` and
``limiter()`` find them through the thread that runs the handler, which the server bound to itself
(``handlers._context``). So they work in handlers and in what handlers call, on the worker
thread; a thread that a handler starts is bound to nothing and gets RuntimeError("state is not
bound: ...") until it is started as ``threading.Thread(target=carry_context(work))``.

Area modules import only ``handlers._*`` modules, never ``server`` (a test enforces it): run as
``python3 server.py`` the runtime is ``__main__``, and importing ``server`` would load a second copy
with its own state and locks.

The contract is an interface; its implementations live in the runtime, which binds them at
start-up. ``handlers/_*.py`` import the standard library and each other, never ``onebox`` (nor
``server``), at import time or later: the store (``onebox/store/``), the response cache
(``onebox/cache.py``) and the limiters' buckets (``onebox/limits.py``) are built by the server
and bound to its worker threads in a ``ServerContext`` (``handlers/_context.py``), which
``state``, ``@cached`` and ``limiter()`` look up when they are used. So dependencies point one
way: ``server.py`` -> ``onebox`` -> the contract <- areas (tests/test_routing.py and
tests/test_isolation.py enforce it).

Request objects are built by the runtime, one per request, and used by one thread; Responses are
plain values. Neither holds a lock.
"""
import json
import math
import re

from handlers import _forms
from handlers._context import carry_context  # noqa: F401  (re-exported for areas)
from handlers._limits import Limiter, Policy, limiter, rate_limit_headers  # noqa: F401
from handlers._state import StateWriteError, state  # noqa: F401  (re-exported for areas)

__all__ = [
    "HTTPError", "Request", "Headers", "Response", "state", "StateWriteError",
    "json_response", "text_response", "html_response", "redirect", "to_response",
    "Limiter", "Policy", "limiter", "rate_limit", "carry_context",
]


class HTTPError(Exception):
    """An expected failure: ``status`` with a short, client-safe ``message``.

    ``headers`` is a list of (name, value) pairs added to the error response (e.g. Allow,
    Retry-After). Never put client input in the message: error bodies must not echo requests.
    """

    def __init__(self, status, message="", headers=None):
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.headers = list(headers or ())


class Headers:
    """Request header fields, case-insensitive, in arrival order.

    ``get(name)`` gives the field value, several lines of the same field joined with ", " as
    RFC 9110 section 5.3 allows; ``get_all(name)`` gives each line.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields):
        self._fields = fields  # dict: lower-case name -> list of values

    def get(self, name, default=None):
        values = self._fields.get(name.lower())
        if not values:
            return default
        return values[0] if len(values) == 1 else ", ".join(values)

    def get_all(self, name):
        return list(self._fields.get(name.lower(), ()))

    def __getitem__(self, name):
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name):
        return name.lower() in self._fields

    def any_of(self, names):
        """Whether any of ``names`` (a set of lower-case names) is present: one look for
        several fields that are nearly always absent."""
        return not self._fields.keys().isdisjoint(names)

    def items(self):
        return [(name, value) for name, values in self._fields.items() for value in values]

    def __repr__(self):
        return "Headers(%r)" % (self.items(),)


class Request:
    """One HTTP request as a handler sees it.

    Attributes: ``method`` ("GET"), ``path`` (percent-decoded, normalised, starts with "/"),
    ``params`` (dict of the route's {wildcards}), ``query`` (dict: name -> first value),
    ``query_items`` (every (name, value) pair in order), ``headers`` (Headers), ``client_ip``
    (str), ``version`` ("HTTP/1.1"), ``cookies`` (dict, parsed on first use).

    Body readers, limited to the server's ``max_body_bytes`` (413 beyond it): ``body()`` gives
    the bytes (``body(max_bytes=N)``: 413 past N), ``text()`` a str, ``json()`` the parsed JSON
    (413 past ``max_json_bytes``, 400 if it is not JSON), ``form()`` the fields of an urlencoded
    or multipart form (see ``handlers._forms``). ``read(n)`` streams.
    """

    __slots__ = ("method", "path", "segments", "params", "query_string", "_query",
                 "headers", "client_ip", "version", "_cookies", "_reader", "_body",
                 "max_json_bytes")

    # max_json_bytes: the [server] setting of that name (its default here), passed by the runtime
    def __init__(self, method, path, segments, query_string, headers, client_ip,
                 version="HTTP/1.1", reader=None, max_json_bytes=65536):
        self.method = method
        self.path = path
        self.segments = segments          # decoded path segments; a segment may hold "/" (%2F)
        self.params = {}
        self.query_string = query_string
        self._query = None
        self.headers = headers
        self.client_ip = client_ip
        self.version = version
        self._cookies = None
        self._reader = reader             # the runtime's body reader, or None for no body
        self._body = None
        self.max_json_bytes = max_json_bytes

    # -- query and cookies ------------------------------------------------------------------
    @property
    def query_items(self):
        if self._query is None:
            try:
                self._query = _forms.parse_urlencoded(self.query_string)
            except _forms.FormError as error:
                raise HTTPError(400, str(error)) from None
        return self._query

    @property
    def query(self):
        result = {}
        for name, value in self.query_items:
            result.setdefault(name, value)
        return result

    @property
    def cookies(self):
        if self._cookies is None:
            self._cookies = _forms.parse_cookies(self.headers.get_all("cookie"))
        return self._cookies

    # -- body --------------------------------------------------------------------------------
    def read(self, size=-1):
        """Read up to ``size`` bytes of the body (all that is left when -1); b"" at the end."""
        if self._reader is None:
            return b""
        return self._reader.read(size)

    def body(self, max_bytes=None):
        """The whole body. With ``max_bytes``, 413 when it is longer, without reading more than
        max_bytes + 1 of it (a declared Content-Length past it: without reading any)."""
        if self._body is None:
            self._body = self.read(-1) if max_bytes is None else self._read_at_most(max_bytes)
        if self._body is _OVERSIZE or (max_bytes is not None and len(self._body) > max_bytes):
            raise HTTPError(413, "request body too large")
        return self._body

    def _read_at_most(self, max_bytes):
        """The body if it is at most ``max_bytes``, else _OVERSIZE (the rest left unread: the
        runtime drains it, or closes the connection)."""
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            return _OVERSIZE
        parts, room = [], max_bytes + 1
        while room > 0:
            chunk = self.read(min(room, 65536))
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            room -= len(chunk)
        return _OVERSIZE

    def text(self):
        try:
            return self.body().decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "request body must be UTF-8 text") from None

    def json(self, max_bytes=None):
        """The body parsed as JSON (RFC 8259), at most ``max_bytes`` long (default: the
        server's ``max_json_bytes``; 413 beyond it, before parsing). 415 unless Content-Type
        says JSON: a cross-site HTML form can post text/plain to any address without the
        browser asking first (CORS "simple requests"), but not application/json. 400 for bad
        JSON and for what parsers disagree on (the contract's docstring lists them)."""
        media_type = self.headers.get("content-type", "").partition(";")[0].strip(" \t").lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise HTTPError(415, "request body must be JSON, sent as "
                                 "Content-Type: application/json")
        raw = self.body(self.max_json_bytes if max_bytes is None else max_bytes)
        if not raw:
            raise HTTPError(400, "request body must be JSON, got an empty body")
        return _parse_json(raw)

    def form(self):
        """The submitted form as a ``_forms.Form`` (fields and uploaded files)."""
        content_type = self.headers.get("content-type", "")
        try:
            return _forms.parse_form(content_type, self.body())
        except _forms.FormError as error:
            raise HTTPError(400, str(error)) from None


# What body() keeps of a body found longer than its caller's max_bytes: 413 at every call.
_OVERSIZE = object()


class _NotJSON(ValueError):
    """Raised from inside the JSON decoder's hooks; its message is the 400's."""


def _refuse_constant(name):
    # NaN, Infinity and -Infinity: Python's extension, not JSON (RFC 8259 section 6)
    raise _NotJSON("request body holds NaN or Infinity, which JSON does not allow")


def _finite_float(text, _isinf=math.isinf):
    value = float(text)
    if _isinf(value):   # 1e999: no JSON value, and a float cannot hold it (RFC 8259 section 6)
        raise _NotJSON("request body holds a number too large for a float")
    return value


def _unique_keys(pairs):
    # RFC 8259 section 4: with duplicate names, parsers disagree on which one counts (a proxy
    # may check the first while we use the last). The hook moves the C scanner's dict building
    # into Python, measured (timeit, CPython 3.11, idle): 4x on 64 KiB of nothing but {} (0.4
    # -> 1.6 ms), 1.8x on 64 KiB of records, 0.75 -> 0.97 us on a small note. Bounded by
    # max_json_bytes, a price worth paying
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _NotJSON("request body has a duplicate key in an object")
    return result


# Built once: json.loads with any hook builds a decoder per call. parse_float is called only for
# numbers with a fraction or exponent (2.3x on a body of nothing but floats), parse_constant
# only for NaN and Infinity.
_decode = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float,
                           object_pairs_hook=_unique_keys).decode


def _parse_json(raw):
    """Parsed JSON from a body of bytes, or HTTPError(400) saying what is wrong with it."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise HTTPError(400, "request body must not start with a byte order mark "
                             "(RFC 8259 section 8.1)")
    if b"\x00" in raw[:4]:
        # JSON text never holds a NUL; in its first four bytes it is UTF-16 or UTF-32 (the
        # detection of RFC 4627 section 3, which json.loads still does for bytes)
        raise HTTPError(400, "request body must be UTF-8, not UTF-16 or UTF-32 "
                             "(RFC 8259 section 8.1)")
    try:
        # "surrogatepass": CESU-8 surrogate bytes decode, to be refused below with the escapes
        text = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise HTTPError(400, "request body must be UTF-8 (RFC 8259 section 8.1)") from None
    try:
        value = _decode(text)
    except _NotJSON as error:
        raise HTTPError(400, str(error)) from None
    except (ValueError, RecursionError):
        raise HTTPError(400, "request body is not valid JSON") from None
    if _SURROGATE_HINT_RE.search(raw) and _has_lone_surrogate(value):
        raise HTTPError(400, "request body holds a lone surrogate (not Unicode text)")
    return value


# A lone surrogate reaches the decoder as an escape (\\ud800) or as CESU-8 bytes (ED A0 80,
# which _parse_json decodes with "surrogatepass"). Bodies without either skip the walk below.
_SURROGATE_HINT_RE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _has_lone_surrogate(value):
    """Whether any string (key or value) in parsed JSON holds an unpaired surrogate: whether
    its JSON (``_encode``, below) fails to encode to UTF-8. In C: 2-5x faster than a walk in
    Python over a body of small items (64 KiB of {}: 0.6 ms, where the walk took 2.6)."""
    try:
        _encode(value).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class Response:
    """What a handler returns: ``status``, ``headers`` (list of (name, value)) and one body.

    The body is one of: ``body`` (bytes), ``stream`` (an iterable of bytes, sent chunked),
    or ``file`` (an open binary file and ``file_range`` = (offset, length), sent with sendfile
    where it can be; the runtime closes it). The runtime adds Date, Server, Content-Length and
    Connection; handlers must not.

    A ``stream`` runs in worker threads, perhaps a different one each turn: a slow reader
    holds at most 256 KiB of its chunks and no thread, but a generator that waits (for data,
    or a timer) holds its worker while it waits. If the client leaves mid-stream the generator
    is closed by the thread that notices, perhaps the reactor: keep ``finally`` blocks short.
    """

    __slots__ = ("status", "headers", "body", "stream", "file", "file_range")

    def __init__(self, body=b"", status=200, headers=None, content_type=None):
        self.status = status
        self.headers = list(headers or ())
        if content_type is not None:
            self.headers.append(("Content-Type", content_type))
        self.body = body
        self.stream = None
        self.file = None
        self.file_range = None


# allow_nan=False: NaN and Infinity are not JSON (RFC 8259 section 6) and a browser's JSON.parse
# rejects the whole body; json_response raises ValueError instead, so the handler gets a 500.
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_encode_ascii = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def json_response(data, status=200, headers=None):
    """``data`` as a JSON response; ValueError (so a 500) if it holds NaN or Infinity."""
    try:
        body = _encode(data).encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate (stored before request.json() refused them): \u escapes are
        # still valid JSON, where UTF-8 cannot hold it
        body = _encode_ascii(data).encode("ascii")
    return Response(body, status, headers, "application/json")


def text_response(text, status=200, headers=None):
    return Response(text.encode("utf-8"), status, headers, "text/plain; charset=utf-8")


def html_response(html, status=200, headers=None):
    return Response(html.encode("utf-8"), status, headers, "text/html; charset=utf-8")


def redirect(location, status=303, headers=None):
    """Redirect to ``location``; 303 (See Other) suits a POST, 301/308 a moved page."""
    return Response(b"", status, [("Location", location)] + list(headers or ()))


def rate_limit(limiter, key, cost=1):
    """Take ``cost`` tokens from ``key``'s bucket in ``limiter``, or raise a 429 whose
    Retry-After says when they will be there (plus the RateLimit-Policy / RateLimit fields)."""
    hit = limiter.hit(key, cost)
    if not hit.allowed:
        headers = rate_limit_headers(hit)
        raise HTTPError(429, "too many requests; retry after %s s" % headers[0][1], headers)
    return hit


def to_response(result):
    """A handler's return value as a Response: the shortcuts in this module's docstring."""
    if isinstance(result, Response):
        return result
    if result is None:
        return Response(b"", 204)
    if isinstance(result, (dict, list)):
        return json_response(result)
    if isinstance(result, str):
        return Response(result.encode("utf-8"), 200, None, "text/plain; charset=utf-8")
    if isinstance(result, (bytes, bytearray)):
        return Response(bytes(result), 200, None, "application/octet-stream")
    raise TypeError("handler returned %s; expected a Response" % type(result).__name__)
