"""The handler contract: everything an area module needs, and nothing else.

A handler is a function of one ``Request`` that returns a ``Response`` (or a shortcut: a dict or
list is JSON, a str text/plain, bytes application/octet-stream, None a 204), and an area module
(``handlers/notes.py``) ends with its routes as data::

    ROUTES = [("GET", "/api/notes/{id}", get_note),      # GET also answers HEAD
              ("GET", "/files/{rest...}", get_file)]     # {name...} takes the rest of the path

``raise HTTPError(status, message)`` is an expected failure (never put client input in the
message); any other exception is a 500 with a bland body, the traceback in the error log.

Areas import only ``handlers._*`` modules and the standard library (never ``onebox``, ``server``
or another area; tests enforce it): this module's ``__all__``, ``handlers._state``,
``handlers._forms`` and ``handlers._cache``. ``state``, ``@cached``, ``limiter()`` and the body
parsers reach the server whose worker thread runs the handler (``handlers/_context.py``): a
thread a handler starts must run ``carry_context(work)``. Every name, with examples:
docs/areas.md.
"""
import json

from handlers import _context
from handlers._context import carry_context  # noqa: F401  (re-exported for areas)
from handlers._limits import Policy, limiter, rate_limit_headers  # noqa: F401
from handlers._state import StateWriteError, state  # noqa: F401  (re-exported for areas)

__all__ = [
    "HTTPError", "Request", "Headers", "Response", "state", "StateWriteError",
    "json_response", "text_response", "html_response", "redirect", "Policy", "limiter",
    "rate_limit", "carry_context",
]


class HTTPError(Exception):
    """An expected failure: ``status`` with a short, client-safe ``message`` (never client
    input: error bodies must not echo requests) and ``headers``, (name, value) pairs to add."""

    def __init__(self, status, message="", headers=None):
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.headers = list(headers or ())


class Headers:
    """Request header fields, case-insensitive, in arrival order: ``get(name)`` joins several
    lines of a field with ", " (RFC 9110 section 5.3), ``get_all(name)`` gives each line."""

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
        """Whether any of ``names`` (a set of lower-case names) is present."""
        return not self._fields.keys().isdisjoint(names)

    def items(self):
        return [(name, value) for name, values in self._fields.items() for value in values]

    def __repr__(self):
        return "Headers(%r)" % (self.items(),)


class Request:
    """One HTTP request as a handler sees it (docs/areas.md, "The request"): ``method``,
    ``path`` (decoded, normalised), ``params`` (the route's {wildcards}), ``query``,
    ``query_items``, ``headers``, ``client_ip``, ``version``, ``cookies``, ``secure``
    (HTTPS), ``session``; the body (at most
    ``max_body_bytes``, else 413) by ``body()``, ``text()``, ``json()``, ``form()``, ``read(n)``."""

    __slots__ = ("method", "path", "segments", "params", "query_string", "_query",
                 "headers", "client_ip", "version", "_cookies", "_reader", "_body",
                 "max_json_bytes", "_https", "_session")

    # max_json_bytes: the [server] setting of that name (its default here), passed by the runtime
    def __init__(self, method, path, segments, query_string, headers, client_ip,
                 version="HTTP/1.1", reader=None, max_json_bytes=65536, https=False):
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
        self._https = https               # True, False, or None: ask X-Forwarded-Proto
        self._session = None

    @property
    def query_items(self):
        if self._query is None:
            self._query = _context.parsers.read_query(self.query_string)   # onebox/forms.py
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
            self._cookies = _context.parsers.read_cookies(self.headers.get_all("cookie"))
        return self._cookies

    @property
    def secure(self):
        """Whether it came over HTTPS: this connection's TLS, or the word of the trusted proxy
        it came through (X-Forwarded-Proto, de facto standard)."""
        if self._https is None:
            first = self.headers.get("x-forwarded-proto", "").partition(",")[0]
            self._https = first.strip().lower() == "https"   # the first proxy's word
        return self._https

    @property
    def session(self):
        """This client's session (``handlers._sessions.Session``); 403 for a cross-site
        unsafe request (docs/areas.md, "Sessions and logins")."""
        if self._session is None:
            self._session = _context.require("sessions", "request.session").load(self)
        return self._session

    def read(self, size=-1):
        """Read up to ``size`` bytes of the body (all that is left when -1); b"" at the end."""
        if self._reader is None:
            return b""
        return self._reader.read(size)

    def body(self, max_bytes=None):
        """The whole body; with ``max_bytes``, 413 when it is longer (reading at most
        max_bytes + 1 of it, none if its Content-Length says so)."""
        if self._body is None:
            self._body = self.read(-1) if max_bytes is None else self._read_at_most(max_bytes)
        if self._body is _OVERSIZE or (max_bytes is not None and len(self._body) > max_bytes):
            raise HTTPError(413, "request body too large")
        return self._body

    def _read_at_most(self, max_bytes):
        """The body if it is at most ``max_bytes``, else _OVERSIZE (the runtime drains the
        rest, or closes the connection)."""
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
        """The body as JSON (RFC 8259), at most ``max_bytes`` (default ``max_json_bytes``;
        413 beyond); 415 unless it says JSON; 400 if bad (docs/areas.md, "JSON")."""
        read_json = _context.parsers.read_json   # the runtime's: onebox/jsonbody.py
        if read_json is None:
            raise RuntimeError("request.json() needs the runtime's parser: no server was built")
        return read_json(self, max_bytes)

    def form(self):
        """The submitted form (``_forms.Form``); 400 unless urlencoded or multipart."""
        read_form = _context.parsers.read_form   # the runtime's: onebox/forms.py
        if read_form is None:
            raise RuntimeError("request.form() needs the runtime's parser: no server was built")
        return read_form(self)


# What body() keeps of a body found longer than its caller's max_bytes: 413 at every call.
_OVERSIZE = object()


class Response:
    """What a handler returns: ``status``, ``headers`` ((name, value) pairs) and one of
    ``body`` (bytes), ``stream`` (an iterable of bytes, sent chunked) or ``file`` (an open
    binary file, ``file_range`` = (offset, length); the runtime closes it). The runtime adds
    Date, Server, Content-Length and Connection (docs/areas.md, "Responses")."""

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
def _compact_chunks(ensure_ascii):
    """``chunks(data, 0)`` -> the compact JSON text of ``data`` in pieces to join. Where
    CPython's C encoder is there (always, but for a build without _json), one made once:
    JSONEncoder.encode makes a new one per call, ~700 ns of a JSON response's ~25 us, and a
    function of ours around it cost a frame more (issue 23). Made once, it cannot keep the
    per-call table that finds circular structures: one is refused by RecursionError instead
    of ValueError (a handler's 500 either way)."""
    fallback = json.JSONEncoder(ensure_ascii=ensure_ascii, allow_nan=False,
                                separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    strings = (json.encoder.c_encode_basestring_ascii if ensure_ascii
               else json.encoder.c_encode_basestring)
    if make is None or strings is None:
        return lambda data, _: (fallback.encode(data),)
    # (markers, default, string encoder, indent, key and item separators, sort_keys,
    # skipkeys, allow_nan): JSONEncoder.iterencode's call, the same from 3.9 to 3.13
    return make(None, fallback.default, strings, None, ":", ",", False, False, False)


_chunks = _compact_chunks(ensure_ascii=False)
_chunks_ascii = _compact_chunks(ensure_ascii=True)
_join = "".join


def json_response(data, status=200, headers=None):
    """``data`` as a JSON response; ValueError (so a 500) if it holds NaN or Infinity."""
    try:
        body = _join(_chunks(data, 0)).encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate (stored before request.json() refused them): \u escapes are
        # still valid JSON, where UTF-8 cannot hold it
        body = _join(_chunks_ascii(data, 0)).encode("ascii")
    return Response(body, status, headers, "application/json")


def text_response(text, status=200, headers=None):
    return Response(text.encode("utf-8"), status, headers, "text/plain; charset=utf-8")


# A page's defaults (issue 21): no inline script (a stored XSS that slips past escaping cannot
# run; a page opts one in with a nonce), no framing (clickjacking: frame-ancestors, CSP 3), no
# referrer to other sites. A handler's own header of the same name wins.
PAGE_POLICY = ("default-src 'self'; script-src 'self'%s; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
               "frame-ancestors 'none'")


def html_response(html, status=200, headers=None, nonce=None):
    """``html`` as a text/html Response with the page defaults above; ``nonce`` lets the
    page's ``<script nonce="...">`` run (make one per response: ``secrets.token_urlsafe()``)."""
    headers = list(headers or ())
    named = {name.lower() for name, _ in headers}
    if "content-security-policy" not in named:
        headers.append(("Content-Security-Policy",
                        PAGE_POLICY % (" 'nonce-%s'" % nonce if nonce else "")))
    if "referrer-policy" not in named:
        headers.append(("Referrer-Policy", "same-origin"))
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
