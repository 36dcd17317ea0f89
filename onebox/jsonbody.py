"""JSON request bodies: the runtime's implementation behind the contract's ``request.json()``
(``handlers/_core.py``), bound to each server's worker threads as its ``ServerContext``'s
``read_json`` (``handlers/_context.py``).

``read_json`` takes a body of at most the server's ``max_json_bytes`` (64 KiB by default; 413
beyond it, before a byte is parsed), or of the handler's ``json(max_bytes=N)``: the body is
still capped by ``max_body_bytes``. It answers 400 for what a browser's ``JSON.parse`` or another
parser would read otherwise (RFC 8259): ``NaN``, ``Infinity``, a number too large for a float
(``1e999``), a duplicate key in an object, a lone surrogate, and a body that is not UTF-8
(UTF-16, UTF-32, a byte order mark). With these checks a 64 KiB body of any shape parses in at
most ~4 ms, 1 MiB in up to ~80 ms (a body of tiny objects, the worst shape: 3-4x json.loads
alone; CPython 3.11 on a busy 2-core machine).

Imports the standard library and the contract's ``HTTPError`` (``handlers._core``).
"""
import json
import math
import re

from handlers._core import HTTPError

__all__ = ["read_json", "parse_json"]


def read_json(request, max_bytes=None):
    """``request.json(max_bytes)``: the body parsed as JSON, or the HTTPError saying why not.
    415 unless Content-Type says JSON: a cross-site HTML form can post text/plain to any address
    without the browser asking first (CORS "simple requests"), but not application/json."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip(" \t").lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise HTTPError(415, "request body must be JSON, sent as "
                             "Content-Type: application/json")
    raw = request.body(request.max_json_bytes if max_bytes is None else max_bytes)
    if not raw:
        raise HTTPError(400, "request body must be JSON, got an empty body")
    return parse_json(raw)


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
# json_response's encoder (handlers/_core.py), for the lone surrogate check below
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def parse_json(raw):
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
# which parse_json decodes with "surrogatepass"). Bodies without either skip the walk below.
_SURROGATE_HINT_RE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _has_lone_surrogate(value):
    """Whether any string (key or value) in parsed JSON holds an unpaired surrogate: whether
    its JSON fails to encode to UTF-8. In C: 2-5x faster than a walk in Python over a body of
    small items (64 KiB of {}: 0.6 ms, where the walk took 2.6)."""
    try:
        _encode(value).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
