"""Form bodies: the runtime's implementation behind the contract's ``request.form()``
(``handlers/_core.py``), bound to each server's worker threads as its ``ServerContext``'s
``read_form`` (``handlers/_context.py``). urlencoded and multipart/form-data (RFC 7578).

Written in-house because ``cgi`` (the stdlib's multipart parser) was removed in Python 3.13
(PEP 594). Every parser works on bytes already read under the server's body limit, so none of
them can be made to read more; malformed input raises ``FormError``, which ``read_form``
answers with a 400 naming the rule. The types a form is made of (``Form``, ``UploadedFile``),
and ``FormError`` are the contract's (``handlers/_forms.py``); the query string and cookie
parsers here serve ``request.query_items`` and ``request.cookies``.

Imports the standard library and the contract (``handlers._core``, ``handlers._forms``).
"""
import re

import urllib.parse

from handlers._core import HTTPError
from handlers._forms import Form, FormError, UploadedFile

__all__ = ["read_form", "read_query", "parse_cookies", "parse_urlencoded", "parse_form",
           "parse_multipart", "parse_options"]

MAX_FORM_FIELDS = 1000  # a form with more fields than any human fills in is an attack


def read_form(request):
    """``request.form()``: the body as a ``Form``, or HTTPError(400) saying what is wrong."""
    content_type = request.headers.get("content-type", "")
    try:
        return parse_form(content_type, request.body())
    except FormError as error:
        raise HTTPError(400, str(error)) from None


def read_query(query_string):
    """``request.query_items``: (name, value) pairs, or HTTPError(400) saying what is wrong."""
    try:
        return parse_urlencoded(query_string)
    except FormError as error:
        raise HTTPError(400, str(error)) from None


def parse_urlencoded(text):
    """'a=1&b=x+y' -> [("a", "1"), ("b", "x y")]; blank values kept, bad UTF-8 replaced."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if not text:
        return []
    pairs = []
    for part in text.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((urllib.parse.unquote_plus(name, errors="replace"),
                      urllib.parse.unquote_plus(value, errors="replace")))
        if len(pairs) > MAX_FORM_FIELDS:
            raise FormError("form has more than %d fields" % MAX_FORM_FIELDS)
    return pairs


def parse_cookies(header_values):
    """Cookie header lines -> {name: value}; the first occurrence of a name wins (RFC 6265 5.4)."""
    cookies = {}
    for line in header_values:
        for part in line.split(";"):
            name, sep, value = part.strip().partition("=")
            if not sep or not name:
                continue
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            cookies.setdefault(name.strip(), value)
    return cookies


def parse_options(header_value):
    """'multipart/form-data; boundary="x"' -> ("multipart/form-data", {"boundary": "x"})."""
    main, *params = header_value.split(";")
    options = {}
    for param in params:
        name, sep, value = param.strip().partition("=")
        if sep:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"')
            options[name.strip().lower()] = value
    return main.strip().lower(), options


def parse_form(content_type, body):
    kind, options = parse_options(content_type or "")
    if kind == "application/x-www-form-urlencoded":
        try:
            return Form(parse_urlencoded(body.decode("utf-8")))
        except UnicodeDecodeError:
            raise FormError("form must be UTF-8") from None
    if kind == "multipart/form-data":
        return parse_multipart(body, options.get("boundary", ""))
    raise FormError("expected a form (application/x-www-form-urlencoded or multipart/form-data)")


_BOUNDARY_RE = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{1,70}$")  # RFC 2046 section 5.1.1


def parse_multipart(body, boundary):
    """Parse multipart/form-data (RFC 7578) held in memory; text parts become fields."""
    if not _BOUNDARY_RE.match(boundary) or boundary.endswith(" "):
        raise FormError("multipart form needs a valid boundary parameter")
    delimiter = b"--" + boundary.encode("ascii")
    if not body.startswith(delimiter):
        body_start = body.find(b"\r\n" + delimiter)
        if body_start < 0:
            raise FormError("multipart form has no parts")
        body = body[body_start + 2:]
    fields, files = [], {}
    position = len(delimiter)
    while True:
        if body.startswith(b"--", position):
            return Form(fields, files)  # the close-delimiter: done
        if not body.startswith(b"\r\n", position):
            raise FormError("multipart form is malformed")
        end = body.find(b"\r\n" + delimiter, position)
        if end < 0:
            raise FormError("multipart form is truncated")
        _parse_part(body[position + 2:end], fields, files)
        if len(fields) + len(files) > MAX_FORM_FIELDS:
            raise FormError("form has more than %d fields" % MAX_FORM_FIELDS)
        position = end + 2 + len(delimiter)


def _parse_part(part, fields, files):
    head, sep, data = part.partition(b"\r\n\r\n")
    if not sep:
        raise FormError("multipart part has no header")
    headers = {}
    for line in head.decode("utf-8", "replace").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    disposition, options = parse_options(headers.get("content-disposition", ""))
    if disposition != "form-data" or "name" not in options:
        raise FormError("multipart part needs Content-Disposition: form-data with a name")
    name = options["name"]
    if "filename" in options:
        content_type = headers.get("content-type", "application/octet-stream")
        files[name] = UploadedFile(name, options["filename"], content_type, data)
        return
    try:
        fields.append((name, data.decode("utf-8")))
    except UnicodeDecodeError:
        raise FormError("form fields must be UTF-8 text") from None
