"""What ``request.form()`` returns (``Form``, ``UploadedFile``) and raises (``FormError``: a
400), and the two small parsers ``Request`` runs itself: query strings and cookies (pure, so
they work on any thread). Form bodies (urlencoded, multipart) are parsed by the runtime
(``onebox/forms.py``), bound per server (``handlers/_context.py``).
"""
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
