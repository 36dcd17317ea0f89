"""The server object: the listening socket, the reactor, the worker pool and the hand-off
between them, composed; and the server's life: start, signals' requests, drain, stop.

How a connection is served, and why: see ``server.py``'s docstring. The pieces:
``onebox/handoff.py`` (Connection, Outcome, the channel and who writes what),
``onebox/reactor.py`` (the thread that accepts and owns every wait), ``onebox/workers.py``
(the pool that serves ready requests), ``onebox/transfer.py`` (bodies and responses under a
pace), ``onebox/poller.py`` (readiness).

Imports the other runtime modules and the handler contract; never ``server``.
"""
import http.server
import os
import re
import socket
import socketserver
import sys
import threading
import time
import traceback
import urllib.parse

from handlers import _context
from handlers._core import Response
from handlers._state import StateError
from onebox.activity import Activity
from onebox.admin import AdminConfigError, AdminSite, check_listener, is_loopback, load_token
from onebox.cache import ResponseCache
from onebox.forms import read_form
from onebox.guard import Guard
from onebox.health import HealthChecks
from onebox.handoff import Handoff, Wait
from onebox.jsonbody import read_json
from onebox.limits import LimiterRegistry
from onebox.logs import AccessLog, error_entry, journal_stream
from onebox.metrics import Metrics
from onebox.poller import Poller
from onebox.reactor import Reactor
from onebox.reload import reload_server
from onebox.static import StaticPages
from onebox.tally import Tally
from onebox.tls import TLSConfigError, build_context, expiry_warning
from onebox.workers import Workers

WORKER_JOIN_S = 5.0       # after the drain, how long a stuck handler may delay exit
# A Host field's name that may go into a redirect's Location (RFC 3986 3.2.2's reg-name,
# without percent-encoding, or an IP literal); anything else is replaced by the listener's.
_REDIRECT_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]+\]")


def _url_of(scheme, address):
    """The URL served at a listening socket's address: http://[::1]:8000/."""
    host, port = address[:2]
    return "%s://%s:%d/" % (scheme, "[%s]" % host if ":" in host else host, port)


class OneboxServer(http.server.ThreadingHTTPServer):
    """The listening socket (from the stdlib class, for its life cycle only), and what serves it.

    For callers: ``serve_forever()`` (runs the reactor in the calling thread until shutdown),
    ``shutdown()`` (from another thread: stop and wait), ``begin_shutdown()`` (from a signal
    handler: stop without waiting), ``server_close()``, ``url``, ``request_backup()`` and
    ``note_sighup()`` (from signal handlers), ``log_error(message, detail)`` (any thread),
    ``reload()`` (the reactor thread, on SIGHUP).
    The site the workers serve: ``config``, ``settings``, ``router``, ``static``, ``guard``,
    ``context`` (store, response cache, limiters), ``access_log``. The operator's:
    ``tally``, ``metrics``, ``admin`` (the admin listener's site, or None: onebox/admin.py),
    ``admin_socket``, ``admin_url``, ``health()``, ``phase``, ``started_at``, ``activity``
    (what the status page shows: onebox/activity.py). HTTPS (onebox/tls.py): ``tls_socket``
    and ``tls_url`` (None while [tls] cert_file is empty), ``tls_context`` and ``tls_expires``
    (replaced by a reload: ``use_tls_context``), ``hsts_header``, ``redirect_to_https`` and
    ``https_redirect(request)`` (read by the workers).
    """

    request_queue_size = 1024   # listen backlog: bursts of connects queue instead of failing
    allow_reuse_address = True

    def __init__(self, config, router, access_stream=None, error_stream=None, store=None,
                 listeners=None):
        """``listeners``: sockets already listening, by name (socket activation and the
        zero-downtime restart hand them over): "http" is served instead of binding host:port;
        other names are for the listeners that use them (e.g. "admin")."""
        # Long: the server's own fields, each made here beside the comment that says who
        # writes it; the parts are built by _count_requests, _open_listeners and _compose.
        settings = config.server
        self.started_at = time.time()
        # before anything is bound: an unusable admin token stops start-up (AdminConfigError),
        # as does a certificate or key that cannot be served (TLSConfigError, onebox/tls.py);
        # a missing one is judged once the admin socket's address is known (_open_listeners)
        admin_token = load_token()
        self.tls_context = self.tls_expires = self.tls_socket = None
        if config.tls.cert_file:
            self.tls_context, self.tls_expires = build_context(config.tls)
        self.listeners = dict(listeners or {})
        self.config, self.settings, self.router = config, settings, router
        self.store = store   # the shared state; closed (and compacted) after the workers stop
        self.error_stream = error_stream or sys.stderr
        self.journal_priorities = journal_stream(self.error_stream)   # under systemd
        self.static = StaticPages(settings.pages_dir, config.static)
        self.guard = Guard(config.guard, store, self.log_error)   # bans persist in the store
        self._count_requests(config)
        # What handlers reach through state, @cached, limiter(), request.json() and .form():
        # this server's own, bound by each worker thread as it starts (handlers/_context.py).
        self.context = _context.ServerContext(
            store, ResponseCache(config.cache.max_entries, config.cache.max_bytes),
            LimiterRegistry())
        _context.use_parsers(read_json, read_form)   # stateless: the process's, any thread
        self.access_log = None
        self.access_stream = access_stream or sys.stdout   # kept for a reload turning it on
        if settings.access_log:
            self.access_log = AccessLog(self.access_stream, settings.log_flush_interval_s,
                                        settings.log_buffer_bytes, self.log_error)
        self._open_listeners(config, admin_token)
        self._compose(config)
        # What the server is doing, for readiness (/readyz, systemd): "starting" until the
        # reactor's first turn, then "serving"; "reloading" while the reactor applies a reload;
        # "draining" from begin_shutdown on. Written by the reactor (and begin_shutdown).
        self.phase = "starting"
        # Written by signal handlers or other threads, read by the reactor's loop:
        self._backup_requested = False
        self._sighup_received = False
        self._restart_requested = False
        # SIGUSR2's: starts a successor process on this one's sockets (onebox/restart.py);
        # set by server.py, None in tests that build a server
        self.restarter = None
        self._backup_thread = None   # the reactor's
        self._reactor_thread = None
        self._stopped = threading.Event()
        self.stuck_workers = 0
        # Told of a reload (its reloading() and reloaded(summary)): the process's systemd
        # Notifier (onebox/systemd.py), set by server.py; None in tests that build a server.
        self.notifier = None
        self.admin = None
        if self.admin_socket is not None:
            try:
                self.admin = AdminSite(self, admin_token)
            except Exception:
                self.server_close()
                raise

    def _count_requests(self, config):
        """Each answered request is counted once, in the tally (onebox/tally.py), for the
        metrics and for what the status page shows (onebox/activity.py), where the guard also
        records each refusal and ban."""
        self.tally = Tally()
        self.metrics = Metrics(self.tally, config.admin.metrics)
        status = config.status
        self.activity = Activity(self.tally, status.recorder, status.top_entries,
                                 status.recent_decisions)
        if status.recorder:
            self.guard.on_decision = self.activity.decision

    def _open_listeners(self, config, admin_token):
        """The public listener, the admin listener and the HTTPS one (each handed over, or
        bound); a port that cannot be had, or an admin socket beyond loopback without a token,
        closes what is open and stops start-up."""
        settings = config.server
        self._listen(settings, self.listeners.get("http"))
        self.admin_socket = None
        try:
            self.admin_socket = self._listen_admin(config.admin, self.listeners.get("admin"))
        except OSError as error:
            self.server_close()
            raise AdminConfigError(
                "cannot listen on %s port %s for the admin listener: %s; set [admin] port "
                "(--admin-port 0 picks a free one, off turns it off)"
                % (config.admin.host, config.admin.port, error.strerror or error)) from None
        if self.admin_socket is not None:
            # its real address decides (onebox/admin.py), not [admin] host: a socket systemd
            # or a restart passed listens where it was bound; nothing has been accepted yet
            try:
                check_listener(config.admin, admin_token, self.admin_socket)
            except AdminConfigError:
                self.server_close()
                raise
        try:
            self.tls_socket = self._listen_tls(config, self.listeners.get("https"))
        except OSError as error:
            self.server_close()
            raise TLSConfigError(
                "cannot listen on %s port %s for HTTPS: %s; set [tls] port (--tls-port 0 "
                "picks a free one)" % (config.tls.host or settings.host, config.tls.port,
                                       error.strerror or error)) from None
        self.use_tls_settings(config.tls)
        host = self.server_address[0]   # a socket systemd passed may not be settings.host
        if config.allowed_hosts is None and not is_loopback(host):
            self.log_error("listening on %s with any Host allowed: set allowed_hosts in [server] "
                           "(e.g. allowed_hosts = example.org) so that DNS rebinding cannot "
                           "reach this server from a browser" % host, level="warning")

    def _compose(self, config):
        """The engine: the hand-off between the reactor and the workers, the poller, the
        reactor (with the listeners, the health checks and the tally) and the worker pool."""
        self.handoff = Handoff()
        self._poller = Poller()
        self.reactor = Reactor(self.socket, config.server, self.handoff, self._poller,
                               self.guard, self.access_log, self.log_error, self.admin_socket,
                               config.admin.max_connections)
        self.reactor.tls_listener = self.tls_socket
        self.reactor.tls_context = self.tls_context
        self.health_checks = HealthChecks(self, config.health)
        self.reactor.health = self.health_checks
        self.reactor.tally = self.tally if self.tally.wanted else None
        self.workers = Workers(self, self.handoff, self._poller)

    def _listen_admin(self, admin_settings, inherited=None):
        """The admin listener (onebox/admin.py): the socket handed over, else one bound to
        [admin] host and port, else None (port = off)."""
        if inherited is not None:
            inherited.setblocking(False)
            return inherited
        if admin_settings.port is None:
            return None
        family = socket.AF_INET6 if ":" in admin_settings.host else socket.AF_INET
        sock = socket.create_server((admin_settings.host, admin_settings.port), family=family,
                                    backlog=64)
        sock.setblocking(False)
        return sock

    def _listen_tls(self, config, inherited=None):
        """The HTTPS listener: the socket handed over ("https"), else one bound to [tls] host
        (default [server] host) and port; None while [tls] cert_file is empty."""
        if self.tls_context is None:
            if inherited is not None:
                self.log_error("a socket named https was passed, but [tls] cert_file is empty: "
                               "it is not served; set cert_file and key_file")
                inherited.close()
            return None
        if inherited is not None:
            inherited.setblocking(False)
            return inherited
        host = config.tls.host or config.server.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, config.tls.port), family=family,
                                    backlog=self.request_queue_size)
        sock.setblocking(False)
        return sock

    def use_tls_settings(self, tls):
        """[tls] settings read per request (at start, and on a reload, in the reactor thread):
        the HSTS header, and whether the plain listener redirects to HTTPS. Also warns of a
        certificate near its expiry."""
        header = None
        if self.tls_socket is not None and tls.hsts_max_age_s:
            header = ("Strict-Transport-Security", "max-age=%d%s" % (
                tls.hsts_max_age_s, "; includeSubDomains" if tls.hsts_include_subdomains else ""))
        self.hsts_header = header
        self.redirect_to_https = self.tls_socket is not None and tls.redirect_http
        if self.tls_expires is not None:
            warning = expiry_warning(tls.cert_file, self.tls_expires, tls.expiry_warning_days)
            if warning:
                self.log_error(warning)

    def use_tls_context(self, context, expires):
        """A new certificate (a reload): new connections are wrapped with ``context``; those
        open keep the one they began with. Reactor thread."""
        self.tls_context = self.reactor.tls_context = context
        self.tls_expires = expires

    def https_redirect(self, request):
        """[tls] redirect_http's 301: the same host and target on HTTPS (RFC 9110 15.4.2)."""
        host = request.headers.get("host") or ""
        name = host.partition("]")[0] + "]" if host.startswith("[") else host.partition(":")[0]
        if not _REDIRECT_HOST_RE.fullmatch(name):
            name = self.tls_socket.getsockname()[0]
            name = "[%s]" % name if ":" in name else name
        port = self.config.tls.redirect_port or self.tls_socket.getsockname()[1]
        path = request.path if request.path.startswith("/") else "/"   # OPTIONS *
        target = urllib.parse.quote(path, safe="/:@!$&'()*+,;=~")
        if request.query_string:
            target += "?" + request.query_string
        location = "https://%s%s%s" % (name, "" if port == 443 else ":%d" % port, target)
        return Response(b"", 301, [("Location", location)])

    @property
    def tls_url(self):
        return self.tls_socket and _url_of("https", self.tls_socket.getsockname())

    @property
    def admin_url(self):
        return self.admin_socket and _url_of("http", self.admin_socket.getsockname())

    def _listen(self, settings, inherited=None):
        if inherited is not None:
            self.address_family = inherited.family
            super().__init__(inherited.getsockname(), http.server.BaseHTTPRequestHandler,
                             bind_and_activate=False)
            self.socket.close()
            self.socket = inherited
            self.server_address = inherited.getsockname()
            self.server_name, self.server_port = self.server_address[:2]
            self.socket.setblocking(False)
            return
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        super().__init__((settings.host, settings.port), http.server.BaseHTTPRequestHandler,
                         bind_and_activate=False)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise
        self.socket.setblocking(False)

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall for seconds on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self):
        return _url_of("http", self.server_address)   # (also once the socket is closed)

    def log_error(self, message, detail=None, level="error"):
        """One entry on the error log (stderr): ``message`` on one line, escaped; ``detail``
        (a traceback) indented below it; ``level`` "error", "warning" or "info" (a syslog
        prefix on each line when stderr is the journal's). Any thread may call it."""
        entry = error_entry(time.strftime("%Y-%m-%dT%H:%M:%S"), message, detail, level,
                            self.journal_priorities)
        try:
            self.error_stream.write(entry)
            self.error_stream.flush()
        except (OSError, ValueError):
            pass

    def health(self):
        """None while the server is healthy, else why not (one line): the reactor has turned,
        and a worker has taken the reactor's latest probe, within stall_timeout_s. What the
        systemd watchdog and /healthz go by. Any thread."""
        handoff, bound = self.handoff, self.settings.stall_timeout_s
        now = time.monotonic()
        if handoff.stopping:
            return "shutting down"
        if not handoff.turned_at:
            return "not serving yet"
        if now - handoff.turned_at > bound:
            return "the reactor has not turned for %.1f s" % (now - handoff.turned_at)
        if handoff.probe_sent_at > handoff.probe_taken_at and now - handoff.probe_sent_at > bound:
            return "no worker has taken a job for %.1f s" % (now - handoff.probe_sent_at)
        return None

    # -- running ---------------------------------------------------------------------------
    def serve_forever(self, poll_interval=None):
        self._reactor_thread = threading.current_thread()
        if self.access_log:
            self.access_log.start()
        self.workers.start()
        self._poller.watch(self.socket, "listener")
        if self.admin_socket is not None:
            self._poller.watch(self.admin_socket, "admin-listener")
        if self.tls_socket is not None:
            self._poller.watch(self.tls_socket, "tls-listener")
        self._poller.watch(self.handoff.wakeup_socket, "wakeup")
        try:
            while not self.handoff.stopping:
                if self.phase == "starting":   # before the first turn, which may sleep 1 s
                    self.phase = "serving"
                self.reactor.step()
                if self._backup_requested:
                    self._start_backup()
                if self._sighup_received:
                    self._sighup_received = False
                    self.reload()
                if self._restart_requested:
                    self._restart_requested = False
                    if self.restarter is not None:
                        self.restarter.begin(self)
            self._drain()
        finally:
            if self._backup_thread is not None:
                self._backup_thread.join()
            self._stop_workers()
            self._close_store()
            if self.access_log:
                self.access_log.close()
            self._stopped.set()

    def begin_shutdown(self):
        """Ask the reactor to stop; safe from signal handlers and any thread."""
        self.handoff.stopping = True
        self.phase = "draining"
        self.handoff.wake()   # the reactor's drain then sends held connections back

    def shutdown(self):
        if threading.current_thread() is self._reactor_thread:
            raise RuntimeError("shutdown() from the serving thread would deadlock; "
                               "use begin_shutdown()")
        self.begin_shutdown()
        if self._reactor_thread is not None:
            self._stopped.wait()

    def _close_other_listeners(self):
        for name in ("admin_socket", "tls_socket"):
            sock = getattr(self, name, None)
            if sock is not None and sock.fileno() >= 0:
                if getattr(self, "_poller", None) is not None:
                    self._poller.forget(sock)
                sock.close()

    def server_close(self):
        self._close_store()
        self._close_other_listeners()
        socketserver.TCPServer.server_close(self)
        if getattr(self, "handoff", None) is not None:
            self.handoff.close()
        if getattr(self, "_poller", None) is not None:
            self._poller.close()

    def listening_sockets(self):
        """The listening sockets by name, as socket activation names them ("http", "admin",
        "https"): what a successor inherits (onebox/restart.py)."""
        sockets = {"http": self.socket}
        if self.admin_socket is not None:
            sockets["admin"] = self.admin_socket
        if self.tls_socket is not None:
            sockets["https"] = self.tls_socket
        return sockets

    def _drain(self):
        """Shutdown: stop accepting (connections not accepted yet stay in the backlog of a
        socket that systemd or a successor also holds), serve the connections already open
        to their end, then close what is left; all within shutdown_timeout_s."""
        self._poller.forget(self.socket)
        self.socket.close()   # this process's descriptor; a copy elsewhere keeps listening
        self._close_other_listeners()
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        self._serve_out(deadline)
        self.reactor.drain(deadline)

    def _serve_out(self, deadline):
        """Turn the reactor, without a listener, until every connection has closed or the
        deadline. A request on an open connection, in flight or arriving now, is served and
        answered with Connection: close (workers see ``stopping``), so a restart fails no
        request a client had sent. Connections that wait for one (kept-alive and idle, or
        new and silent) get drain_idle_s: a client that sends just as one closes sees it
        closed unanswered, and may retry (RFC 9112 section 9.3.1)."""
        reactor, handoff = self.reactor, self.handoff
        idle_until = min(deadline, time.monotonic() + self.settings.drain_idle_s)
        while reactor.open + reactor.admin_open and time.monotonic() < deadline:
            if handoff.held and not handoff.workers_wanted:
                handoff.want_workers(True)   # workers holding kept connections hand them back
            reactor.timers.cap((Wait.IDLE, Wait.NEW), idle_until)
            reactor.step()

    def _stop_workers(self):
        for _ in self.workers.threads:
            self.handoff.work.put(None)
        self.workers.stop(WORKER_JOIN_S)
        self.stuck_workers = self.workers.stuck
        if self.stuck_workers:
            self.log_error("%d handler(s) still running after shutdown; exiting anyway"
                           % self.stuck_workers, level="warning")
        self.reactor.after_workers()

    def _close_store(self):
        store, self.store = getattr(self, "store", None), None
        if store is None:
            return
        try:
            store.close()
        except StateError as error:
            self.log_error("closing the state store: %s" % error)

    # -- what signals ask for ----------------------------------------------------------------
    def request_backup(self):
        """Ask for a snapshot in data_dir/backups/ (SIGUSR1); safe from signal handlers."""
        self._backup_requested = True
        self.handoff.wake()

    def request_restart(self):
        """SIGUSR2: ask the reactor to start the successor (``restarter``); safe from signal
        handlers."""
        self._restart_requested = True
        self.handoff.wake()

    def note_sighup(self):
        """SIGHUP: ask the reactor to ``reload()``; safe from signal handlers. (Its default
        action would kill the process without a drain.)"""
        self._sighup_received = True
        self.handoff.wake()

    def reload(self):
        """Read the configuration again (the same file and command-line overrides) and apply
        what can change live (onebox/reload.py); log and return a one-line summary of what
        changed and what needs a restart. An invalid file changes nothing. Reactor thread
        only, between turns: it swaps the reactor's settings."""
        self.phase = "reloading"
        if self.notifier is not None:   # systemd: RELOADING=1 now, READY=1 once applied
            self.notifier.reloading()
        detail = None
        try:
            summary = reload_server(self)
        except Exception as error:   # a bug in reloading must not stop the serving
            summary = ("reload failed: %s: %s; still serving the previous settings"
                       % (type(error).__name__, error))
            detail = traceback.format_exc()
        finally:
            if self.phase == "reloading":   # not if a SIGTERM began the drain meanwhile
                self.phase = "serving"
        self.log_error(summary, detail, level="error" if detail or summary.startswith(
            "reload failed") else "info")
        if self.notifier is not None:
            self.notifier.reloaded(summary)
        return summary

    def _start_backup(self):
        self._backup_requested = False
        if self.store is None or (self._backup_thread and self._backup_thread.is_alive()):
            return
        self._backup_thread = threading.Thread(target=self._write_backup, args=(self.store,),
                                               name="onebox-backup")
        self._backup_thread.start()

    def _write_backup(self, store):
        folder = os.path.join(self.settings.data_dir, "backups")
        path = os.path.join(folder, time.strftime("state-%Y%m%dT%H%M%SZ.snapshot", time.gmtime()))
        try:
            os.makedirs(folder, 0o700, exist_ok=True)
            os.chmod(folder, 0o700)   # makedirs' mode passes through the umask
            store.backup(path + ".tmp")
            os.replace(path + ".tmp", path)
            self.log_error("backup written: %s" % path, level="info")
        except (OSError, StateError) as error:
            self.log_error("backup failed: %s" % error)
