"""Cookies, sessions and logins as areas see them (docs/areas.md, "Sessions and logins").

``request.session`` is a small dict of JSON values kept server-side (``onebox/sessions.py``):
the cookie carries a random id and nothing else. ``session.login(name)`` and
``session.logout()`` replace the id (session fixation). ``@login_required`` sends an anonymous
GET to ``/login?next=...`` and refuses other methods with 403. Reading ``request.session`` in
an unsafe request (POST, PUT, PATCH, DELETE) refuses it with 403 when it is cross-site (Fetch
Metadata, else Origin, else the form's ``csrf_token`` field or ``X-CSRF-Token`` must match the
session's ``csrf_token``): touch the session before changing anything.
"""
import functools
import re
import secrets
import urllib.parse

from handlers import _context
from handlers._core import HTTPError, redirect

__all__ = ["Session", "SessionError", "login_required", "local_path", "set_cookie",
           "delete_cookie", "log_in"]

SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")            # RFC 9110 5.6.2 token
_COOKIE_VALUE_RE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")   # RFC 6265 4.1.1


class SessionError(ValueError):
    """A session the runtime cannot keep (over ``[sessions] max_session_bytes``): a 500."""


class Session:
    """``request.session``: ``get``, ``[]``, ``in``, ``pop``, ``keys``, ``items``, ``len``;
    ``user`` (the logged-in name, or None), ``login(name)``, ``logout()``, ``csrf_token``.
    The runtime's fields: ``id``, ``digest`` (its hash: the store's key), ``changed``,
    ``rotate``, ``ended``."""

    __slots__ = ("id", "digest", "created", "seen", "_user", "_csrf", "_data", "changed",
                 "rotate", "ended")

    def __init__(self, session_id, digest, value):
        value = value or {}
        self.id, self.digest = session_id, digest
        self.created, self.seen = value.get("created"), value.get("seen", 0)
        self._user, self._csrf = value.get("user"), value.get("csrf")
        self._data = dict(value.get("data") or {})
        self.changed = self.rotate = self.ended = False

    @property
    def user(self):
        return self._user

    def login(self, user):
        """``user`` is logged in from now on, under a new id (and a new CSRF token)."""
        self._user, self._csrf = user, None
        self.changed = self.rotate = True

    def logout(self):
        """End the session: its id is dead at once; what is set after this starts a new one."""
        self._user = self._csrf = None
        self._data.clear()
        self.ended = True

    @property
    def csrf_token(self):
        """The token forms carry (``<input type="hidden" name="csrf_token" ...>``)."""
        if self._csrf is None:
            self._csrf = secrets.token_urlsafe(32)
            self.changed = True
        return self._csrf

    def get(self, key, default=None):
        return self._data.get(key, default)

    def __getitem__(self, key):
        return self._data[key]

    def __setitem__(self, key, value):
        self._data[key] = value
        self.changed = True

    def __delitem__(self, key):
        del self._data[key]
        self.changed = True

    def pop(self, key, default=None):
        self.changed = self.changed or key in self._data
        return self._data.pop(key, default)

    def __contains__(self, key):
        return key in self._data

    def __len__(self):
        return len(self._data)

    def keys(self):
        return self._data.keys()

    def items(self):
        return self._data.items()

    def value(self, now):
        """What the store keeps (the runtime's)."""
        created = self.created if self.created is not None else now
        self.seen = now
        return {"created": created, "seen": now, "user": self._user, "csrf": self._csrf,
                "data": self._data}


def login_required(handler):
    """Only for a logged-in user: an anonymous GET or HEAD is redirected to the login form
    (``/login?next=<this path>``), anything else gets 403."""
    @functools.wraps(handler)
    def logged_in_only(request):
        if request.session.user is None:
            if request.method in ("GET", "HEAD"):
                target = request.path + ("?" + request.query_string if request.query_string
                                         else "")
                return redirect("/login?next=" + urllib.parse.quote(target, safe=""))
            raise HTTPError(403, "log in first")
        return handler(request)
    return logged_in_only


def local_path(target, default="/"):
    """``target`` if it is a path on this site (a login's ``next``), else ``default``: never
    another host (``//evil``, ``/\\evil``, ``https://...``), so no open redirect."""
    if (not isinstance(target, str) or not target.startswith("/") or target.startswith("//")
            or "\\" in target or any(ord(c) < 0x20 for c in target)):
        return default
    return target


def log_in(request, name, password):
    """Check ``name`` and ``password`` against the accounts and log the session in: True, or
    False for a wrong name or password (the same time either way). Failed tries are throttled
    per account and per client: 429 with Retry-After once either has failed too often."""
    return _context.require("logins", "log_in").log_in(request, name, password)


def cookie_header(name, value, max_age_s, secure, http_only=True, same_site="Lax"):
    """A Set-Cookie value (RFC 6265 4.1); ValueError for a name or value it does not allow."""
    if not _TOKEN_RE.fullmatch(name):
        raise ValueError("cookie name %r is not a token (RFC 6265 4.1.1)" % (name,))
    if not _COOKIE_VALUE_RE.fullmatch(value):
        raise ValueError("cookie value holds a character RFC 6265 4.1.1 does not allow")
    if same_site not in ("Strict", "Lax", "None"):
        raise ValueError("same_site must be Strict, Lax or None")
    parts = ["%s=%s" % (name, value), "Path=/"]
    if max_age_s is not None:
        parts.append("Max-Age=%d" % max_age_s)
    if secure or same_site == "None":   # browsers drop SameSite=None without Secure
        parts.append("Secure")
    if http_only:
        parts.append("HttpOnly")
    parts.append("SameSite=" + same_site)
    return "; ".join(parts)


def forget_cookie_header(name, secure):
    return cookie_header(name, "", 0, secure)


def set_cookie(response, request, name, value, max_age_s=None, http_only=True,
               same_site="Lax"):
    """Add a cookie to ``response``: ``HttpOnly``, ``SameSite=Lax`` and ``Path=/`` unless
    told otherwise; over HTTPS ``Secure`` and the ``__Host-`` prefix (read it back with
    ``request.cookies.get(cookie_name(request, name))``)."""
    response.headers.append(("Set-Cookie", cookie_header(
        cookie_name(request, name), value, max_age_s, request.secure, http_only, same_site)))
    return response


def delete_cookie(response, request, name):
    response.headers.append(("Set-Cookie", forget_cookie_header(cookie_name(request, name),
                                                                request.secure)))
    return response


def cookie_name(request, name):
    return "__Host-" + name if request.secure else name
