"""Parsers for what browsers send: query strings, urlencoded and multipart forms, cookies.

Written in-house because ``cgi`` (the stdlib's multipart parser) was removed in Python 3.13
(PEP 594). Every parser works on bytes already read under the server's body limit, so none of
them can be made to read more; malformed input raises ``HTTPError(400)`` via ``FormError``.
"""
import re
import urllib.parse

MAX_FORM_FIELDS = 1000  # a form with more fields than any human fills in is an attack


class FormError(ValueError):
    """Malformed form data; the runtime answers 400 with the message."""


class UploadedFile:
    """One file part of a multipart form: ``filename``, ``content_type``, ``data`` (bytes)."""

    __slots__ = ("name", "filename", "content_type", "data")

    def __init__(self, name, filename, content_type, data):
        self.name = name
        self.filename = filename
        self.content_type = content_type
        self.data = data

    def __repr__(self):
        return "UploadedFile(%r, %r, %d bytes)" % (self.name, self.filename, len(self.data))


class Form:
    """Form fields: ``form["name"]``/``form.get(name)`` give the first value,
    ``form.get_all(name)`` every value, ``form.files`` maps names to UploadedFile."""

    def __init__(self, fields=(), files=None):
        self.fields = list(fields)
        self.files = files or {}

    def get(self, name, default=None):
        for key, value in self.fields:
            if key == name:
                return value
        return default

    def get_all(self, name):
        return [value for key, value in self.fields if key == name]

    def __getitem__(self, name):
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name):
        return self.get(name) is not None or name in self.files


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
