"""The HTTP/1.1 codec: parse a request head and its framing, check and render a response head.

Pure functions and small classes (reading bodies and writing responses, which wait on
sockets, are ``onebox/transfer.py``'s), and the one grammar of the protocol that everyone uses
(tokens, field values, request lines: RFC 9110 section 5.6, RFC 9112 sections 2-7). No threads
live here: the engine calls these from its reactor and workers. What a lenient parser accepts is
what request smuggling exploits, so every rule is strict, and every rule's failure is an
``HTTPError`` with a short message that never echoes the request.

Imports only the standard library and the handler contract (``handlers._core``); never the
engine, the guard or ``server``.
"""
import email.utils
import http
import re
import time
import urllib.parse
from time import time as _time

from handlers._core import HTTPError, Response, json_response

# --- the grammar ------------------------------------------------------------------------------
# Written once, used by the reactor, the workers, the response renderer and the settings that
# carry header fields ([static] extra_headers).

# RFC 9110 section 5.6.2: token = 1*tchar (a method, a field name, a coding)
TCHARS = "!#$%&'*+.^_`|~0-9A-Za-z-"
TOKEN_RE = re.compile("[%s]+" % TCHARS)
TCHAR_BYTES = frozenset(re.sub("[^%s]" % TCHARS, "", "".join(map(chr, range(128)))).encode())
# RFC 9110 section 5.5: a field value holds no control character but HTAB (never CR, LF, NUL)
_VALUE_CHAR = r"[^\x00-\x08\x0a-\x1f\x7f]"
BAD_VALUE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 section 3: method SP request-target SP HTTP-version, matched as bytes. [0-9], not \d,
# should this ever become a str pattern: there \d matches every Unicode digit.
REQUEST_LINE_RE = re.compile(rb"([%s]+) ([^\x00-\x20\x7f]+) HTTP/([0-9])\.([0-9])"
                             % TCHARS.encode())
# What a request line starts with, while the rest has not arrived: a method and a space
METHOD_PREFIX_RE = re.compile(rb"[%s]{1,32}(?: |$)" % TCHARS.encode())
# All field lines in one match: each a token, a colon and a value. No match: obs-fold (a line
# starting with whitespace), whitespace before the colon (RFC 9112 section 5.1 requires 400), a
# bare CR or LF, or no colon at all.
_FIELD = "[%s]+:%s*" % (TCHARS, _VALUE_CHAR)
_FIELD_LINES_RE = re.compile(r"(?:%s(?:\r\n%s)*)?" % (_FIELD, _FIELD))
_HOST_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
# Optional whitespace is SP and HTAB only (RFC 9110 section 5.6.3). str.strip() with no argument
# would also strip NBSP (0xA0) and NEL (0x85) of a latin-1 decoded head: a smuggling lever, since
# a proxy in front reads "chunked\xa0" as an unknown coding.
_OWS = " \t"


def chunk_size(line):
    """The size a chunked body's size line gives (RFC 9112 section 7.1: 1*HEXDIG, at most 16
    digits here, then any chunk-ext, which is ignored), or None if the line is malformed."""
    size = line.split(b";", 1)[0].strip(b" \t")
    if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
        return None
    return int(size, 16)


def head_problem(buf, settings):
    """What is wrong with an unfinished or finished request head in ``buf`` that no more bytes
    can fix: (status, message), or None. For the reactor, which rejects garbage (a TLS hello,
    a port scan) at its first bytes instead of waiting for a head that will never come."""
    if buf[0] not in TCHAR_BYTES or not METHOD_PREFIX_RE.match(buf):
        return 400, "not an HTTP request"
    end = buf.find(b"\r\n\r\n")
    line_end = buf.find(b"\r\n")
    if end < 0 and _has_bare_lf(buf):
        # RFC 9112 section 2.2 lets a server take a lone LF as a line end; onebox refuses it
        # at once instead (a head with LF ends never completes, so it would otherwise wait out
        # header_timeout_s): every real client sends CRLF, and reading line ends differently
        # from a proxy in front is how requests are smuggled.
        return 400, "line ends must be CRLF"
    if line_end < 0:
        if len(buf) > settings.max_request_line_bytes:
            return 414, "request line too long"
        return None
    if line_end > settings.max_request_line_bytes:
        return 414, "request line too long"
    if not REQUEST_LINE_RE.fullmatch(buf, 0, line_end):
        return 400, "malformed request line"
    if (end if end >= 0 else len(buf)) + 4 > settings.max_head_bytes:
        return 431, "request head too large"
    return None


def _has_bare_lf(buf):
    """Whether an unfinished head holds an LF that is not part of a CRLF (rare: checked only
    while a head is incomplete)."""
    return b"\n" in buf and buf.count(b"\n") != buf.count(b"\r\n")


# --- request parsing --------------------------------------------------------------------------
# RFC 9112 sections 2-3 and 5-6, strictly: what a lenient parser accepts is what request
# smuggling exploits. Runs in worker threads on a complete head (the reactor found its end).

class Head:
    """A parsed request head: what the worker needs to frame and route the request."""

    __slots__ = ("method", "target", "version", "fields", "keep_alive", "content_length",
                 "chunked", "expect_continue", "request_line")


# The common case, checked without a regex (~1,500 instructions of sre per request line):
# a method from this set, a target of printable characters, and HTTP/1.1 or 1.0. Anything else
# takes REQUEST_LINE_RE, so what is accepted, and how it is split, is exactly what it says.
_COMMON_METHODS = frozenset(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
_VERSIONS = frozenset(["HTTP/1.1", "HTTP/1.0"])

# Field names that browsers and common clients send, lower-case: a name that lowers to one of
# them is a token (no latin-1 character but A-Z lowers to ASCII), so its line needs no regex.
_COMMON_FIELD_NAMES = frozenset("""
    accept accept-charset accept-encoding accept-language authorization cache-control
    connection content-length content-type cookie dnt expect forwarded host if-match
    if-modified-since if-none-match if-range if-unmodified-since origin pragma priority range
    referer sec-ch-ua sec-ch-ua-mobile sec-ch-ua-platform sec-fetch-dest sec-fetch-mode
    sec-fetch-site sec-fetch-user sec-gpc te transfer-encoding upgrade
    upgrade-insecure-requests user-agent via x-forwarded-for x-forwarded-host
    x-forwarded-proto x-real-ip x-requested-with""".split())

# A client sends the same field lines with every request (only the request line changes), and
# so does every copy of the same browser, so a field block seen twice and found valid is
# remembered with what was read from it: its fields, how many lines it has, and its framing for
# that version (Connection, Content-Length, Transfer-Encoding, Expect). A repeated block then
# costs a dictionary look-up where reading it costs ~150 opcodes for two lines (~2,000 per
# browser block of ten). A block is remembered the second time it is seen (the first time
# leaves a 0): one-off blocks (a new cookie) cost a mark, not a copy of their fields, and do not
# push out the blocks that come back. Only blocks that passed every check are remembered (a
# refused one is refused again, in full, each time); the field count is compared with the
# settings at every request, as they may change. Bounded: blocks of at most
# _KNOWN_BLOCK_MAX_CHARS, at most _KNOWN_BLOCKS_MAX of them per version (1 MiB of blocks, and
# their fields), all forgotten when that is reached. Workers share it: each step is one dict
# operation under the GIL, and a race costs at worst a block read once more.
_KNOWN_BLOCKS = {"HTTP/1.1": {}, "HTTP/1.0": {}}   # version -> block -> (fields, count, ...)
_KNOWN_BLOCKS_MAX = 256
_KNOWN_BLOCK_MAX_CHARS = 4096


def parse_head(head_bytes, settings):
    """Parse a request head (without its final CRLFCRLF); raise HTTPError on anything bad.
    The head's ``fields`` is its own dict; its value lists may be shared with other heads of
    the same field block (_KNOWN_BLOCKS), so they are read, never changed."""
    text = head_bytes.decode("latin-1")
    request_line, _, block = text.partition("\r\n")
    head = Head()
    head.request_line = request_line
    if len(request_line) > settings.max_request_line_bytes:
        raise HTTPError(414, "request line too long")
    try:
        method, target, version = request_line.split(" ")
    except ValueError:   # not two spaces: the regex says what is wrong
        method = None
    if method not in _COMMON_METHODS or version not in _VERSIONS or not target \
            or not target.isprintable():   # isprintable: no control, DEL, space or NBSP
        method, target, version = _read_request_line(head_bytes, len(request_line))
    head.method = method
    head.target = target
    head.version = version
    blocks = _KNOWN_BLOCKS[version]
    known = blocks.get(block)
    if known:
        fields, count, head.keep_alive, head.content_length, head.chunked, \
            head.expect_continue = known
        if count > settings.max_header_count:
            raise HTTPError(431, "too many header fields")
        head.fields = fields.copy()   # split_target may set "host" in it: this head's own
        return head
    count = _read_fields(head, text, settings)
    if block and len(block) <= _KNOWN_BLOCK_MAX_CHARS:
        if len(blocks) >= _KNOWN_BLOCKS_MAX:
            blocks.clear()   # many distinct blocks (cookies, ids): start again
        blocks[block] = 0 if known is None else (
            head.fields.copy(), count, head.keep_alive, head.content_length, head.chunked,
            head.expect_continue)
    return head


def _read_request_line(head_bytes, length):
    """(method, target, version) of a request line that is not of the common kind, by
    REQUEST_LINE_RE (RFC 9112 section 3)."""
    match = REQUEST_LINE_RE.fullmatch(head_bytes, 0, length)
    if match is None:
        raise HTTPError(400, "malformed request line")
    method, target, major, minor = match.groups()
    if major != b"1":
        raise HTTPError(505, "only HTTP/1.x is supported")
    return (method.decode("ascii"), target.decode("latin-1"),
            "HTTP/1.0" if minor == b"0" else "HTTP/1.1")


def _read_fields(head, text, settings):
    """Check and read the field lines of a head whose request line is read (``fields`` and the
    framing); return how many there are."""
    lines = text.split("\r\n")
    count = len(lines) - 1
    if count > settings.max_header_count:
        raise HTTPError(431, "too many header fields")
    fields = {}
    plain = True
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        lower = name.lower()
        if not colon or lower not in _COMMON_FIELD_NAMES or not value.isprintable():
            plain = False   # an uncommon name, HTAB, obs-text, or a malformed line
        fields.setdefault(lower, []).append(value.strip(_OWS))
    # A line of a common name and printable value is what _FIELD_LINES_RE matches; any other
    # block is matched by it whole (~35 instructions of sre a byte), which decides.
    if not plain and not _FIELD_LINES_RE.fullmatch(text, len(lines[0]) + 2):
        raise HTTPError(400, "malformed header field")
    head.fields = fields
    _read_framing(head)
    return count


def _read_framing(head):
    """Host, Connection, Content-Length / Transfer-Encoding and Expect (RFC 9112 sections
    3.2, 6.1-6.3, 9.3; RFC 9110 section 10.1.1)."""
    fields = head.fields
    hosts = fields.get("host", ())
    if len(hosts) > 1:
        raise HTTPError(400, "more than one Host header")
    if not hosts and head.version == "HTTP/1.1":
        raise HTTPError(400, "missing Host header")
    if hosts and not _HOST_RE.fullmatch(hosts[0]):
        raise HTTPError(400, "invalid Host header")
    connection = fields.get("connection")
    tokens = {t.strip(_OWS).lower() for v in connection for t in v.split(",")} if connection else ()
    # RFC 9112 section 9.3: "close" wins; HTTP/1.0 persists only when asked to
    head.keep_alive = "close" not in tokens and (head.version == "HTTP/1.1"
                                                 or "keep-alive" in tokens)
    head.chunked = False
    head.content_length = 0
    head.expect_continue = False
    if "transfer-encoding" not in fields and "content-length" not in fields \
            and "expect" not in fields:
        return   # a request without a body, nearly every GET
    codings = [t.strip(_OWS).lower() for v in fields.get("transfer-encoding", ())
               for t in v.split(",")]
    lengths = {v.strip(_OWS) for line in fields.get("content-length", ()) for v in line.split(",")}
    if codings:
        if head.version == "HTTP/1.0":
            raise HTTPError(400, "Transfer-Encoding is not allowed in HTTP/1.0")
        if lengths:  # section 6.3: both present is a smuggling attempt; reject and close
            raise HTTPError(400, "both Transfer-Encoding and Content-Length")
        if codings[-1] != "chunked":
            raise HTTPError(400, "request body must be chunked last")
        if len(codings) > 1:
            raise HTTPError(501, "transfer coding not supported")
        head.chunked = True
    elif lengths:
        if len(lengths) > 1:
            raise HTTPError(400, "conflicting Content-Length values")
        length = lengths.pop()
        if not length.isdigit() or not length.isascii() or len(length) > 18:
            raise HTTPError(400, "invalid Content-Length")
        head.content_length = int(length)
    expect = fields.get("expect")
    if expect:
        if len(expect) != 1 or expect[0].lower() != "100-continue":
            raise HTTPError(417, "only Expect: 100-continue is supported")
        head.expect_continue = head.version == "HTTP/1.1"


def split_target(head):
    """Return (raw path, query string) for the request target's form (RFC 9112 section 3.2)."""
    target = head.target
    if target.startswith("/"):
        if "?" not in target:
            return target, ""   # origin-form without a query: most requests
        path, _, query = target.partition("?")
        return path, query
    if target == "*":
        if head.method != "OPTIONS":
            raise HTTPError(400, "asterisk-form is only for OPTIONS")
        return "*", ""
    scheme = target[:8].lower()
    if scheme.startswith("http://") or scheme.startswith("https://"):
        # absolute-form: the authority replaces Host (section 3.2.2)
        try:
            parts = urllib.parse.urlsplit(target)
        except ValueError:   # "http://[zz]/": urlsplit checks bracketed hosts and raises
            raise HTTPError(400, "invalid request target") from None
        host = parts.netloc
        if not host or host[0] == ":" or not _HOST_RE.fullmatch(host) or "@" in host:
            # an http(s) URI with an empty host is invalid (RFC 9110 section 4.2.1)
            raise HTTPError(400, "invalid request target")
        head.fields["host"] = [parts.netloc]
        return parts.path or "/", parts.query
    raise HTTPError(400, "invalid request target")


def decode_path(raw_path):
    """'/a//b%20c/' -> ('/a/b c/', ['a', 'b c', '']); dot-segments and NUL are refused."""
    if raw_path.startswith("/") and "%" not in raw_path and "//" not in raw_path \
            and "/." not in raw_path and "\x00" not in raw_path and raw_path.isascii():
        # nothing to decode or collapse, and no dot-segment (each would follow a "/"): the
        # common case. "/.well-known" takes the long way, to the same result.
        return raw_path, raw_path[1:].split("/")
    if raw_path == "*":
        return "*", []
    raw_segments = raw_path.split("/")[1:]
    last = len(raw_segments) - 1
    segments = []
    for position, raw in enumerate(raw_segments):
        try:
            if "%" in raw:
                # as bytes: unquote_to_bytes would UTF-8-encode a str's raw (latin-1) bytes
                segment = urllib.parse.unquote_to_bytes(raw.encode("latin-1")).decode("utf-8")
            elif not raw.isascii():
                segment = raw.encode("latin-1").decode("utf-8")
            else:
                segment = raw
        except UnicodeDecodeError:
            raise HTTPError(400, "request path is not UTF-8") from None
        if segment in (".", ".."):
            raise HTTPError(400, "request path must not contain dot-segments")
        if "\x00" in segment:
            raise HTTPError(400, "request path must not contain NUL")
        if segment or position == last:
            segments.append(segment)  # empty segments collapse, but a trailing "/" stays
    if not segments:
        segments = [""]
    return "/" + "/".join(segments), segments


# --- responses --------------------------------------------------------------------------------
# Head and (small) body go out in one send: with two sends and Nagle, a keep-alive client waits
# ~40 ms for the delayed ACK (TCP_NODELAY is set as well). No header value may hold CR or LF.

REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_NO_BODY_STATUSES = frozenset([204, 304])
_SMALL_BODY_BYTES = 256 * 1024
_date_cache = [0, ""]
# On every response: a browser must not guess a type other than the one sent (a JSON body
# holding "<script>" would otherwise run as HTML). Handlers must not set it themselves.
_NOSNIFF = "X-Content-Type-Options: nosniff\r\n"


def http_date(now=None):
    """The Date header value (RFC 9110 section 5.6.7), formatted once a second."""
    second = int(time.time() if now is None else now)
    if _date_cache[0] != second:
        _date_cache[1] = email.utils.formatdate(second, usegmt=True)
        _date_cache[0] = second
    return _date_cache[1]


def error_response(request, status, message="", headers=()):
    """A short error body: JSON for clients that accept it, plain text otherwise."""
    message = message or REASONS.get(status, "error").lower()
    accept = request.headers.get("accept", "") if request is not None else ""
    if "application/json" in accept:
        response = json_response({"error": message, "status": status}, status)
    else:
        response = Response((message + "\n").encode("utf-8"), status, None,
                            "text/plain; charset=utf-8")
    response.headers.extend(headers)
    return response


_rendered_fields = {}        # (name, value) -> "Name: value\r\n", checked once; see below
_RENDERED_FIELDS_MAX = 4096


def _render_field(field):
    """Check one response header field and render it. Most fields repeat (Content-Type, a
    file's ETag), so the checked line is remembered: checking costs ~1 us a field, a look-up
    ~0.05. A CR or LF in a value would let a handler split the response (the stdlib's
    send_header does not check); a bad field raises ValueError before anything is sent."""
    name, value = field
    text = str(value)
    if not TOKEN_RE.fullmatch(name) or BAD_VALUE_RE.search(text):
        raise ValueError("response header %r has a bad name or value" % name)
    line = "%s: %s\r\n" % (name, text)
    # Only str values are remembered: 1, 1.0 and True are equal keys of different text
    if type(value) is str and type(name) is str:
        if len(_rendered_fields) >= _RENDERED_FIELDS_MAX:
            _rendered_fields.clear()  # many distinct values (per-request ids): start again
        _rendered_fields[(name, value)] = line
    return line


_VALID_STATUSES = frozenset(range(100, 600))


def check_response(response):
    """Raise ValueError or TypeError for what a handler can get wrong in a Response: a status
    outside 100-599, a header field that is not (token, value without controls), a body that
    is not bytes. Checked fields are remembered (see _render_field), so a response of familiar
    headers costs a look-up per field."""
    status = response.status
    if type(status) is not int or status not in _VALID_STATUSES:
        raise ValueError("status %r is not a whole number from 100 to 599" % (status,))
    remembered = _rendered_fields
    for field in response.headers:
        try:
            if type(field) is tuple and field in remembered:
                continue   # remembered: a (str, str) pair, checked before
        except TypeError:
            pass   # an unhashable value: checked below, just not remembered
        if type(field) is not tuple or len(field) != 2:
            raise ValueError("header %r is not a (name, value) pair" % (field,))
        _render_field(field)
    if (type(response.body) is not bytes and response.stream is None and response.file is None
            and not isinstance(response.body, (bytes, bytearray, memoryview))):
        raise TypeError("body is %s; a Response body must be bytes"
                        % type(response.body).__name__)


# Most responses repeat within a second: every hello, every request for the same file (the
# static module hands the same header pairs each time). So a rendered head is remembered for
# the second its Date names, by everything it is made of; a repeated one costs a tuple, its
# hash and a look-up (~30 opcodes, where rendering is ~110 and a call to http_date). Only heads
# whose fields are all remembered by _rendered_fields are remembered: so each was checked, and
# is a str pair (1 == 1.0 == True, but their texts differ). A bad field is refused at every
# call. Bounded like _rendered_fields; a new second starts afresh.
_rendered_heads = {}         # (second, status, length, keep_alive, version, *headers) -> bytes
_rendered_heads_second = [0]
_RENDERED_HEADS_MAX = 512


def render_head(status, headers, length, keep_alive, version):
    """The response head as bytes; ``length`` None means chunked (or close-delimited)."""
    second = int(_time())
    rendered = _rendered_fields
    try:
        key = (second, status, length, keep_alive, version, *headers)
        head = _rendered_heads.get(key)
        if head is not None:
            return head
        lines = [rendered.get(field) or _render_field(field) for field in headers]
    except TypeError:   # an unhashable value (a list, say): rendered, just not looked up
        key = None
        lines = [_render_field(field) for field in headers]
    lines.insert(0, "HTTP/1.1 %d %s\r\nDate: %s\r\nServer: onebox\r\n%s"
                 % (status, REASONS.get(status, "Unknown"), http_date(second), _NOSNIFF))
    if status not in _NO_BODY_STATUSES and status >= 200:
        if length is not None:
            lines.append("Content-Length: %d\r\n" % length)
        elif version == "HTTP/1.1":
            lines.append("Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    head = "".join(lines).encode("latin-1")
    if key is not None and all(map(rendered.__contains__, headers)):
        if second != _rendered_heads_second[0] or len(_rendered_heads) >= _RENDERED_HEADS_MAX:
            _rendered_heads.clear()   # the last second's heads will not be asked for again
            _rendered_heads_second[0] = second
        _rendered_heads[key] = head
    return head
