"""What ``request.form()`` returns (``Form``, ``UploadedFile``) and raises (``FormError``: a
400). The parsers of forms, query strings and cookies are the runtime's (``onebox/forms.py``).
"""


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
