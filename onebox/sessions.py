"""Sessions: the runtime behind the contract's ``request.session`` (``handlers/_sessions.py``).

A session is kept in the shared store under ``sessions/`` with the SHA-256 of its id as the
key: the cookie holds the id (256 random bits from ``secrets``) and nothing else, and the
store never holds the id itself, so a copied data dir or backup logs nobody in. Its value is
``{"created", "seen", "user", "csrf", "data"}`` (times in epoch seconds).

What a request costs: nothing unless its handler reads ``request.session`` (one store read
then, from memory). A write happens only when the handler changed the session, logged in or
out, or when its ``seen`` time is older than a sixteenth of the idle timeout (so that the
idle timeout is kept without a durable write per page view).

Timeouts: idle (``[sessions] idle_timeout_s`` since ``seen``) and absolute
(``absolute_timeout_s`` since ``created``); the id is replaced at login and logout (session
fixation, OWASP). Budgets: at most ``max_sessions`` sessions and ``max_bytes`` of them; past
either, the oldest are evicted first. Expired sessions are purged from an in-memory index (one
scan of the store's ``sessions/`` keys at start), never by a scan of the store per request.

``SessionStore`` is safe from any thread: ``_lock`` guards ``_index`` and ``_bytes``; store
calls are made outside it (the store has its own locking and durability). Imports the standard
library and the contract.
"""
import collections
import hashlib
import hmac
import json
import secrets
import threading
import time

from handlers._core import HTTPError
from handlers._limits import Hit, Policy, rate_limit_headers
from handlers._sessions import (SAFE_METHODS, Session, SessionError, cookie_header, cookie_name,
                                forget_cookie_header)
from onebox.accounts import AccountsBusy, check_name
from onebox.limits import InProcessLimiter

PREFIX = "sessions/"
ID_BYTES = 32                 # 256 bits (OWASP: at least 64 bits of entropy)
# What holding a session costs beyond its JSON (its value's objects in the store, its key, the
# index entry): bench/bench_sessions.py measured 661 B allocated (tracemalloc) and ~730 B
# resident per small session of 151 JSON bytes. [sessions] max_bytes counts both parts.
HELD_BYTES = 600
_ID_CHARS = 43                # len(secrets.token_urlsafe(32))


def _hash(session_id):
    return hashlib.sha256(session_id.encode("ascii")).hexdigest()


class SessionStore:
    """One server's sessions (see the module docstring): ``load(request)`` for
    ``request.session`` and ``commit(request, response)`` after the handler; ``stats()``."""

    def __init__(self, store, settings, clock=time.time):
        self.store = store
        self.settings = settings          # the [sessions] section
        self._clock = clock
        self._lock = threading.Lock()
        # hash -> [created, seen, bytes], oldest created first: eviction order and the
        # absolute timeout's order (created + absolute_timeout_s grows along it)
        self._index = collections.OrderedDict()
        self._bytes = 0
        self._swept_at = clock()
        self.evicted = self.expired = 0
        if store is not None:
            self._load_index()

    def _load_index(self):
        rows = []
        for key, value in self.store.items(PREFIX):
            if isinstance(value, dict) and isinstance(value.get("created"), (int, float)):
                rows.append((value["created"], key[len(PREFIX):], value.get("seen", 0),
                             _size(value)))
        for created, digest, seen, size in sorted(rows):
            self._index[digest] = [created, seen, size]
            self._bytes += size

    # -- per request -------------------------------------------------------------------------
    def cookie_name(self, request):
        """The cookie's name: with the __Host- prefix over HTTPS (RFC 6265bis 4.1.3.2: only
        a Secure, host-only cookie with Path=/ may carry it, so a subdomain cannot plant one)."""
        return cookie_name(request, self.settings.cookie_name)

    def load(self, request):
        """``request.session``: the session its cookie names, if live; else a new, empty one
        (stored only if the handler puts something in it). An unsafe request from another
        site is refused here, before the handler can act on the session (403)."""
        unsafe = request.method not in SAFE_METHODS
        if unsafe and cross_site(request):
            raise HTTPError(403, "cross-site request refused")
        session_id = request.cookies.get(self.cookie_name(request), "")
        session = None
        if len(session_id) == _ID_CHARS:
            digest = _hash(session_id)
            value = self.store.get(PREFIX + digest)
            if value is not None and self._live(digest, value):
                session = Session(session_id, digest, value)
        if session is None:
            return Session(None, None, None)
        if unsafe and not _has_origin_signs(request) and not same_token(
                _token_of(request), session._csrf):
            # a browser that sends neither Sec-Fetch-Site nor Origin: the form's token decides
            raise HTTPError(403, "missing or wrong csrf_token")
        return session

    def _live(self, digest, value):
        now, settings = self._clock(), self.settings
        if (now - value.get("seen", 0) < settings.idle_timeout_s
                and now - value.get("created", 0) < settings.absolute_timeout_s):
            return True
        self._drop(digest)
        with self._lock:
            self.expired += 1
        return False

    def commit(self, request, response):
        """After the handler: store what changed, set or clear the cookie on ``response``
        (a copy if headers are added: handlers may return a shared Response)."""
        session = request._session
        now = self._clock()
        headers = []
        if session.ended and session.digest is not None:   # logged out: the old id is dead
            self._drop(session.digest)
            session.digest = None
            if not session.changed:
                headers.append(("Set-Cookie", forget_cookie_header(self.cookie_name(request),
                                                                   request.secure)))
        if session.changed or session.rotate:
            value = session.value(now)
            size = _size(value)
            if size - HELD_BYTES > self.settings.max_session_bytes:
                raise SessionError("session of %d bytes is over [sessions] max_session_bytes "
                                   "(%d)" % (size - HELD_BYTES,
                                             self.settings.max_session_bytes))
            if session.digest is not None and session.rotate:
                self._drop(session.digest)   # login: the old id must not stay logged in
                session.digest = None
            if session.digest is None:
                session.id = secrets.token_urlsafe(ID_BYTES)
                session.digest = _hash(session.id)
                headers.append(("Set-Cookie", cookie_header(
                    self.cookie_name(request), session.id, self.settings.absolute_timeout_s,
                    request.secure)))
            self._put(session.digest, value, size)
        elif session.digest is not None and \
                now - session.seen >= self.settings.idle_timeout_s / 16.0:
            value = session.value(now)
            self._put(session.digest, value, _size(value))
        if not headers:
            return response
        response = _copy(response)
        response.headers.extend(headers)
        if not any(name.lower() == "cache-control" for name, _ in response.headers):
            response.headers.append(("Cache-Control", "no-store"))  # a cookie is one client's
        return response

    # -- the index ---------------------------------------------------------------------------
    def _put(self, digest, value, size):
        self.store.put(PREFIX + digest, value)
        evict = []
        with self._lock:
            entry = self._index.get(digest)
            if entry is None:
                self._index[digest] = [value["created"], value["seen"], size]
            else:
                self._bytes -= entry[2]
                entry[1], entry[2] = value["seen"], size
            self._bytes += size
            evict = self._over_budget_locked()
            evict += self._sweep_locked(value["seen"])
        for old in evict:
            self.store.delete(PREFIX + old)

    def _over_budget_locked(self):
        settings, evict = self.settings, []
        while self._index and (len(self._index) > settings.max_sessions
                               or self._bytes > settings.max_bytes):
            digest, entry = self._index.popitem(last=False)
            self._bytes -= entry[2]
            self.evicted += 1
            evict.append(digest)
        return evict

    def _sweep_locked(self, now):
        """The sessions past either timeout, taken out of the index (one pass over it, in
        memory, at most once per sixteenth of the idle timeout); the caller deletes them."""
        settings = self.settings
        if now - self._swept_at < settings.idle_timeout_s / 16.0:
            return []
        self._swept_at = now
        gone = [digest for digest, (created, seen, _) in self._index.items()
                if now - seen >= settings.idle_timeout_s
                or now - created >= settings.absolute_timeout_s]
        for digest in gone:
            self._bytes -= self._index.pop(digest)[2]
        self.expired += len(gone)
        return gone

    def _drop(self, digest):
        with self._lock:
            entry = self._index.pop(digest, None)
            if entry is not None:
                self._bytes -= entry[2]
        self.store.delete(PREFIX + digest)

    def stats(self):
        with self._lock:
            return {"sessions": len(self._index), "bytes": self._bytes,
                    "evicted": self.evicted, "expired": self.expired}


def cross_site(request):
    """Whether an unsafe request comes from another site (the CSRF rule): its Sec-Fetch-Site
    says so (Fetch Metadata: anything but same-origin or none), or, from a browser that does
    not send it, its Origin is not this site; with neither, its CSRF token (form field or
    X-CSRF-Token) must match the session's, when it has one."""
    headers = request.headers
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is not None:
        host = headers.get("host", "")
        return origin not in ("http://" + host, "https://" + host)
    return False   # neither: the token rule (Session.check_token) decides


def _has_origin_signs(request):
    return "sec-fetch-site" in request.headers or "origin" in request.headers


def _token_of(request):
    token = request.headers.get("x-csrf-token")
    if token is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        token = request.form().get("csrf_token")
    return token


def _size(value):
    """What ``value`` costs against max_bytes: its JSON, plus HELD_BYTES."""
    return len(json.dumps(value, separators=(",", ":"))) + HELD_BYTES


def _copy(response):
    copy = type(response).__new__(type(response))
    for name in type(response).__slots__:
        setattr(copy, name, getattr(response, name))
    copy.headers = list(response.headers)
    return copy


def same_token(given, expected):
    return (isinstance(given, str) and isinstance(expected, str) and bool(expected)
            and hmac.compare_digest(given.encode(), expected.encode()))


class Logins:
    """``log_in(request, name, password)`` (the contract's): the accounts' verdict, with failed
    tries throttled per account and per client (``[sessions] login_failures_per_account``,
    ``login_failures_per_client``, refilled over ``login_window_s``), so that a password spray
    from many addresses and a brute force from one are both slowed and the owner can log in
    again once the window passes. An account that runs out is named in the error log once per
    window, with the addresses that failed on it (not a line per try)."""

    MAX_ADDRESSES = 20      # addresses remembered per throttled account, for its log line

    def __init__(self, accounts, settings, log_error, clock=time.monotonic):
        self.accounts = accounts
        window = settings.login_window_s
        self.per_account = InProcessLimiter(Policy(
            "login-account", settings.login_failures_per_account / window,
            settings.login_failures_per_account), 10000, clock)
        self.per_client = InProcessLimiter(Policy(
            "login-client", settings.login_failures_per_client / window,
            settings.login_failures_per_client), 10000, clock)
        self.window_s = window
        self.log_error = log_error
        self._clock = clock
        self._lock = threading.Lock()               # guards _failed_from and _told_at
        self._failed_from = collections.OrderedDict()   # account -> addresses, LRU first
        self._told_at = {}                          # account -> when it was last logged

    def log_in(self, request, name, password):
        account = name.lower()[:128] if isinstance(name, str) else ""   # as accounts keep it
        client = request.client_ip
        for limiter, key in ((self.per_account, account), (self.per_client, client)):
            wait = limiter.retry_after(key, 1)
            if wait > 0:
                headers = rate_limit_headers(Hit(False, 0, wait, limiter.policy))
                raise HTTPError(429, "too many failed logins; retry after %s s"
                                % headers[0][1], headers)
        try:
            verified = self.accounts is not None and self.accounts.verify(name, password)
        except AccountsBusy:   # max_parallel_hashes ran for all of hash_wait_s
            raise HTTPError(503, "too many logins at once; try again shortly",
                            [("Retry-After", "5")]) from None
        if verified:
            request.session.login(check_name(name))   # the name as kept (lower case)
            return True
        self.per_client.hit(client)
        if not self.per_account.hit(account).allowed or \
                self.per_account.peek(account) < 1:
            self._tell(account, client)
        else:
            self._remember(account, client)
        return False

    def _remember(self, account, client):
        with self._lock:
            addresses = self._failed_from.pop(account, None) or []
            if client not in addresses and len(addresses) < self.MAX_ADDRESSES:
                addresses.append(client)
            self._failed_from[account] = addresses
            while len(self._failed_from) > 10000:
                self._failed_from.popitem(last=False)

    def _tell(self, account, client):
        self._remember(account, client)
        now = self._clock()
        with self._lock:
            if now - self._told_at.get(account, -self.window_s) < self.window_s:
                return
            self._told_at[account] = now
            if len(self._told_at) > 10000:
                self._told_at.clear()
            addresses = self._failed_from.pop(account, [])
        self.log_error("login: account %r throttled for %d s after failed logins from %s"
                       % (account, self.window_s, ", ".join(addresses)), level="warning")
