"""The admin listener: the operator's own socket, for /metrics, the status page and actions.

Why a second socket
-------------------
Like Caddy's admin endpoint on localhost:2019, what shows the whole site (every client's
address, every ban) and what changes it (lift a ban) is never served on the public port: a
reverse-proxy rule or a forwarded header cannot expose it there, because it is not there. The
public port answers 404 for these paths like any unknown path. ``[admin] host`` (127.0.0.1)
and ``port`` (8001; 0 picks a free one; ``off`` disables it) say where it listens; socket
activation may hand it over as the listener named "admin" (``OneboxServer(listeners=...)``).

Connections accepted on it (``Connection.admin``) are served by the same reactor and workers
as the site's, but: they are routed to the rows below only (never the areas or pages/); the
abuse guard neither limits, bans nor counts them, and they skip the site's connection caps
(``[admin] max_connections`` caps them instead); they are counted apart in the metrics
(``onebox_admin_requests_total``), never as the site's traffic; and each is access-logged
with the note ``admin`` (every one: admin actions must leave a trace), each action (a POST)
on the error log too.

Who may ask
-----------
* Bound to loopback with no token configured: anyone on this machine. The Host header must
  then name the loopback, else 421: exactly ``localhost``, or a loopback IP literal
  (``127.0.0.1``, any 127/8 address, ``[::1]``), with or without a port. A web page cannot
  read the status through DNS rebinding (a name of its own that resolves to 127.0.0.1), nor
  through a name that merely starts like one (``127.example.org``).
* With a token (``ONEBOX_ADMIN_TOKEN`` in the environment, or the file
  ``$CREDENTIALS_DIRECTORY/admin_token``: systemd's LoadCredential=), every request needs it,
  compared in constant time (``hmac.compare_digest``): ``Authorization: Bearer <token>``
  (scripts, Prometheus' ``authorization`` config), or the session cookie that ``POST /login``
  sets from a form (a browser: HttpOnly, SameSite=Strict, derived from the token, so changing
  the token ends every session). Without it: 401, with a login form for a browser.
* Bound to anything but loopback without a token, the server refuses to start. "Bound" is
  the socket's own address (``getsockname()``, ``check_listener``), not the ``[admin] host``
  text: a socket that systemd passes (``FileDescriptorName=admin`` in onebox.socket) or a
  restart hands over listens where it was bound, whatever the setting says. Loopback is
  judged by ``ipaddress`` (127/8, ``::1``, either IPv4-mapped), never by a text prefix.
* Actions (any method but GET, HEAD and OPTIONS) must come from the admin listener's own
  origin: a ``Sec-Fetch-Site`` other than same-origin, or an ``Origin`` other than
  ``http://<Host>`` (or https://, behind a TLS proxy), gets 403 (no cross-site request
  forgery through a browser). A client that sends neither (curl, ``server.py --unban``) is not
  a browser and passes.

Adding admin pages (the contract for other modules)
---------------------------------------------------
The status page (``onebox/status.py``) defines ``routes(server)`` returning ``[(method,
pattern, handler), ...]``; the rows join this module's own in one ``onebox.routing.Router``
(duplicates stop start-up, as for areas). Another admin page would be another such module,
imported here beside it.
Handlers take the ``handlers._core.Request`` and return what area handlers return (a
Response, a dict for JSON, ``HTTPError`` for an expected failure); they run in a worker
thread, so they may read ``server`` (``onebox.metrics.Sources``: the guard, the metrics, the
store, each part's ``stats()``; never the engine) but must not block.
Authentication and the same-origin check are done before the handler is called: a handler
never checks them itself. This module's own rows: ``GET /metrics``, ``GET /login``,
``POST /login``, ``POST /logout``, ``GET /`` (a list of links) unless the status page
serves "/", and the accounts' rows below.

Accounts (``server.py --users``, ``--add-user``, ``--passwd``, ``--del-user`` on a running
server; onebox/accounts.py)
---------------------------------------------------------------------------------------------
    GET    /accounts                  {"accounts": [{"name", "created", "changed"}, ...]}
    POST   /accounts                  {"name": ..., "password": ...}: 201 {"added": name};
                                      409 if taken, 400 for a bad name or password
    PUT    /accounts/{name}/password  {"password": ...}: 200 {"changed": name}; 404 if none
    DELETE /accounts/{name}           200 {"deleted": name}; 404 if none
Bodies are JSON only (415 otherwise), for the reason ``POST /bans/lift`` gives
(onebox/status.py): another site's page can send a form or text/plain without asking. A
password is never logged, echoed or stored; adding or changing one costs a scrypt hash (~0.3 s,
in the worker), and 503 with Retry-After when ``[accounts] max_parallel_hashes`` are busy past
``hash_wait_s``. Error bodies name the rule, never the input.

Imports the contract, the routing, metrics, status and accounts modules; never
the engine, the workers or ``server``.
"""
import contextlib
import hashlib
import hmac
import html
import ipaddress
import os
import re
import socket

from handlers._core import HTTPError, Response, html_response, json_response, redirect
from onebox import status
from onebox.accounts import AccountExists, AccountsBusy, NoSuchAccount
from onebox.metrics import render
from onebox.routing import Router

TOKEN_ENV = "ONEBOX_ADMIN_TOKEN"
TOKEN_CREDENTIAL = "admin_token"  # the file's name in $CREDENTIALS_DIRECTORY
MIN_TOKEN_CHARS = 16
COOKIE = "onebox_admin"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_STORE = [("Cache-Control", "no-store")]
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# A Host field (RFC 9110 7.2: uri-host [ ":" port ]): an IP-literal in brackets, or a name
# or IPv4 address without colons; the port, if any, 1 to 5 digits.
_HOST_FIELD_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]%]+)(?::\d{1,5})?")


class AdminConfigError(Exception):
    """The admin listener cannot start as configured; the message names the setting and fix."""


def is_loopback(host):
    """Whether ``host`` (an address as getsockname() or a setting gives it, brackets allowed)
    is reachable from this machine only: a loopback IP (127/8, ::1, either IPv4-mapped, as a
    dual-stack socket reports ::ffff:127.0.0.1), or exactly the name ``localhost``. Never a
    text prefix: ``127.example.org`` is a name anyone can register."""
    if host.lower() == "localhost":
        return True
    if host[:1] == "[" and host[-1:] == "]":
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)   # before 3.13 is_loopback ignores it
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def is_loopback_host_field(value):
    """Whether a Host header names this machine's loopback: ``localhost`` or a loopback IP
    literal (``127.0.0.2``, ``[::1]``), each with an optional port. A name is never resolved:
    DNS rebinding is a name that resolves to 127.0.0.1."""
    match = _HOST_FIELD_RE.fullmatch(value)
    if match is None:
        return False
    name = match.group(1)
    if name.startswith("[") and "." in name and ":" not in name:
        return False   # brackets hold IPv6 only (RFC 3986 3.2.2): not [127.0.0.1]
    return is_loopback(name)


def load_token(environ=None):
    """The admin token, or None; AdminConfigError if one is set and unusable. Read once, at
    start-up. Whether one is needed is the admin socket's address's to say (check_listener)."""
    environ = os.environ if environ is None else environ
    token, where = environ.get(TOKEN_ENV), TOKEN_ENV
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not token and directory:
        where = os.path.join(directory, TOKEN_CREDENTIAL)
        try:
            with open(where, encoding="utf-8") as credential:
                token = credential.read()
        except FileNotFoundError:
            token = None
        except (OSError, UnicodeDecodeError) as error:
            raise AdminConfigError("cannot read the admin token %s: %s" % (where, error)) from None
    token = (token or "").strip() or None
    if token is not None and (len(token) < MIN_TOKEN_CHARS or not token.isprintable()):
        raise AdminConfigError("the admin token in %s must be at least %d printable characters "
                               "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe())')"
                               % (where, MIN_TOKEN_CHARS))
    return token


def check_listener(admin_settings, token, sock=None):
    """AdminConfigError if the admin listener would answer beyond this machine without a token.

    ``sock``: the admin socket, bound or passed (systemd's, or a restart's); its own address
    decides, since that is what clients reach, whatever ``[admin] host`` says. Without one
    (``--check``, or before binding) ``[admin] host`` decides, as binding it would resolve it;
    a name that does not resolve is left to the bind, which fails and says so."""
    if token is not None:
        return
    fix = ("set %s (or the systemd credential %s)" % (TOKEN_ENV, TOKEN_CREDENTIAL))
    if sock is not None:
        address = sock.getsockname()
        if not is_loopback(address[0]):
            raise AdminConfigError(
                "the admin socket listens on %s port %d, beyond this machine, and no admin token "
                "is set: %s, or bind the admin socket to 127.0.0.1 ([admin] host, or "
                "ListenStream=127.0.0.1:%d with FileDescriptorName=admin in the .socket unit)"
                % (address[0], address[1], fix, address[1]))
        return
    if admin_settings.port is None:
        return
    address = _setting_address(admin_settings.host)
    if address is not None and not is_loopback(address):
        raise AdminConfigError(
            "[admin] host = %s serves the admin listener beyond this machine, and no admin token "
            "is set: %s, or set [admin] host = 127.0.0.1, or [admin] port = off"
            % (admin_settings.host, fix))


def _setting_address(host):
    """The address that binding ``[admin] host`` would listen on (as the engine binds it:
    IPv6 if it holds a colon), or None when a name does not resolve."""
    if is_loopback(host):
        return host
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError, UnicodeError):
        return None


def session_value(token):
    """The login cookie's value: derived from the token (a new token ends old sessions), and
    not the token itself (a leaked cookie does not give the Bearer token away)."""
    return hmac.new(token.encode("utf-8"), b"onebox admin session", hashlib.sha256).hexdigest()


class AdminSite(object):
    """What the admin listener serves. For the workers: ``serve(request, call)`` (``call``
    runs a handler with the workers' error handling) -> Response. Built with ``sources``
    (what its pages read: onebox.metrics.Sources), the ``token`` (or None) and
    ``log_error`` (where actions are logged)."""

    def __init__(self, sources, token, log_error):
        self.sources = sources
        self.log_error = log_error
        self.token = token
        self._session = session_value(token) if token else None
        self.router = Router(admin_routes(sources, self))

    # -- one request, in a worker ------------------------------------------------------------
    def serve(self, request, call):
        """1. Host (no token: a loopback name), 2. the token, 3. same origin for actions,
        4. route, 5. call the handler; actions are logged."""
        method = request.method
        if self.token is None and not is_loopback_host_field(request.headers.get("host", "")):
            raise HTTPError(421, "the admin listener answers to localhost and 127.0.0.1 only")
        login = request.path == "/login"
        if self.token is not None and not login and not self._authorized(request):
            return self._unauthorized(request)
        if method not in SAFE_METHODS and not self._same_origin(request):
            self.log_error("admin: %s %s from %s refused: not from the admin origin"
                           % (method, request.path, request.client_ip), level="warning")
            raise HTTPError(403, "admin actions must come from the admin page itself")
        route, params, allowed = self.router.match(method, request.segments)
        if route is None:
            if allowed is not None:
                if method == "OPTIONS":
                    return Response(b"", 204, [("Allow", allowed)])
                raise HTTPError(405, "method not allowed", [("Allow", allowed)])
            raise HTTPError(404, "not found")
        request.params = params
        if method not in SAFE_METHODS and not login:
            self.log_error("admin: %s %s by %s" % (method, request.path, request.client_ip),
                           level="info")
        return call(route.handler, request)

    def _authorized(self, request):
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credential:
            return hmac.compare_digest(credential.strip().encode("utf-8"),
                                       self.token.encode("utf-8"))
        cookie = request.cookies.get(COOKIE)
        return bool(cookie) and hmac.compare_digest(cookie.encode("utf-8"),
                                                    self._session.encode("utf-8"))

    def _unauthorized(self, request):
        headers = [("WWW-Authenticate", 'Bearer realm="onebox admin"'),
                   ("Cache-Control", "no-store")]
        if "text/html" in request.headers.get("accept", "") and request.method == "GET":
            return html_response(_login_page(""), 401, headers)
        return Response(b"admin token required: Authorization: Bearer <token>\n", 401, headers,
                        "text/plain; charset=utf-8")

    @staticmethod
    def _same_origin(request):
        """Sec-Fetch-Site (Fetch Metadata) when the browser sends it, and Origin (RFC 6454
        section 7) when present, must both say the request comes from this listener's page."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site != "same-origin":
            return False
        origin = request.headers.get("origin")
        if origin is not None:
            # either scheme: behind a TLS proxy the page's origin is https://, and no other
            # site can make a browser send this host in Origin
            scheme, _, authority = origin.partition("://")
            return scheme in ("http", "https") and authority == request.headers.get("host")
        return True

    # -- its own pages ------------------------------------------------------------------------
    def login(self, request):
        if self.token is None:
            return redirect("/")
        token = request.form().get("token") or ""
        if not hmac.compare_digest(token.strip().encode("utf-8"), self.token.encode("utf-8")):
            self.log_error("admin: failed login from %s" % request.client_ip, level="warning")
            return html_response(_login_page("wrong token"), 401, [("Cache-Control", "no-store")])
        self.log_error("admin: login by %s" % request.client_ip, level="info")
        return redirect("/", headers=[("Set-Cookie", "%s=%s; Path=/; HttpOnly; SameSite=Strict"
                                       % (COOKIE, self._session))])

    def login_page(self, request):
        return html_response(_login_page(""), 200, [("Cache-Control", "no-store")])

    def logout(self, request):
        return redirect("/login", headers=[("Set-Cookie", "%s=; Path=/; Max-Age=0; HttpOnly; "
                                            "SameSite=Strict" % COOKIE)])

    def metrics(self, request):
        return Response(render(self.sources).encode("utf-8"), 200,
                        [("Cache-Control", "no-store")], METRICS_TYPE)


def admin_routes(sources, site):
    """Every admin row, (method, pattern, handler, origin): the status page's (see the module
    docstring), then this module's (``site``'s)."""
    rows = [tuple(row) + ("onebox/status.py",) for row in status.routes(sources)]
    own = [("GET", "/metrics", site.metrics), ("GET", "/login", site.login_page),
           ("POST", "/login", site.login), ("POST", "/logout", site.logout)]
    if not any(row[0] == "GET" and row[1] == "/" for row in rows):
        own.append(("GET", "/", _index))
    if sources.accounts is not None:
        own += account_routes(sources.accounts)
    return rows + [row + ("onebox/admin.py",) for row in own]


# --- accounts: what server.py --users / --add-user / --passwd / --del-user ask a running server

def account_routes(accounts):
    """The (method, pattern, handler) rows of the accounts (see the module docstring)."""
    def list_accounts(request):
        rows = []
        for name in accounts.names():
            try:
                info = accounts.info(name)
            except NoSuchAccount:   # deleted since names() was read
                continue
            rows.append({"name": name, "created": info["created"], "changed": info["changed"]})
        return json_response({"accounts": rows}, headers=NO_STORE)

    def add_account(request):
        body = _account_body(request, ("name", "password"))
        with _account_errors():
            name = accounts.add(body["name"], body["password"])
        return json_response({"added": name}, 201, NO_STORE)

    def change_password(request):
        body = _account_body(request, ("password",))
        with _account_errors():
            name = accounts.set_password(request.params["name"], body["password"])
        return json_response({"changed": name}, headers=NO_STORE)

    def delete_account(request):
        with _account_errors():
            name = accounts.delete(request.params["name"])
        return json_response({"deleted": name}, headers=NO_STORE)

    return [("GET", "/accounts", list_accounts), ("POST", "/accounts", add_account),
            ("PUT", "/accounts/{name}/password", change_password),
            ("DELETE", "/accounts/{name}", delete_account)]


def _account_body(request, fields):
    """The JSON object of an accounts request (request.json: 415 unless it is JSON, 413 past
    max_json_bytes), with each of ``fields`` a string, else 400."""
    body = request.json()
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object")
    for field in fields:
        if not isinstance(body.get(field), str):
            raise HTTPError(400, "'%s' must be a string" % field)
    return body


@contextlib.contextmanager
def _account_errors():
    """What Accounts raises, as the HTTP answer: 400, 404, 409, 503. ValueError's messages
    name the rule and are passed on; the others name the account, so they are not."""
    try:
        yield
    except ValueError as error:
        raise HTTPError(400, str(error)) from None
    except NoSuchAccount:
        raise HTTPError(404, "no such user") from None
    except AccountExists:
        raise HTTPError(409, "that user exists") from None
    except AccountsBusy:
        raise HTTPError(503, "too many password hashes at once; try again shortly",
                        [("Retry-After", "5")]) from None


def _index(request):
    return html_response("<!doctype html><title>onebox admin</title>"
                         "<h1>onebox admin</h1><ul><li><a href=/metrics>/metrics</a></li></ul>")


_LOGIN = """<!doctype html>
<html lang=en><meta charset=utf-8><meta name=viewport content="width=device-width">
<title>onebox admin: sign in</title>
<style>body{font:16px system-ui,sans-serif;max-width:24em;margin:4em auto;padding:0 1em}
input,button{font:inherit;padding:.4em;width:100%%;box-sizing:border-box;margin:.3em 0}
p.error{color:#b00}</style>
<h1>onebox admin</h1>%s
<form method=post action=/login><label>Admin token
<input name=token type=password autocomplete=current-password required autofocus></label>
<button>Sign in</button></form>
<p>The token is ONEBOX_ADMIN_TOKEN, or the admin_token systemd credential.</p>
"""


def _login_page(error):
    return _LOGIN % ('<p class=error>%s</p>' % html.escape(error) if error else "")
