"""The server object: the listening sockets, and the parts that serve them, composed; and the
server's life: start, signals' requests, drain, stop.

How a connection is served, and why: see ``server.py``'s docstring. The parts, each built here
with exactly what it uses (none is given the server): ``onebox/site.py`` (the ``Site`` a
configuration makes, swapped whole by a reload), ``onebox/handoff.py`` (Connection, Outcome,
the channel and who writes what), ``onebox/reactor.py`` (the thread that accepts and owns
every wait), ``onebox/workers.py`` (the pool that serves ready requests), ``onebox/books.py``
(one Record per request, one finish: the tally and the access log), ``onebox/health.py`` (the
server's ``Life`` and the health checks), ``onebox/reload.py`` (the ``Reloader``),
``onebox/admin.py`` (the admin listener's site, which reads the parts through
``onebox.metrics.Sources``), ``onebox/transfer.py`` (bodies and responses under a pace),
``onebox/poller.py`` (readiness).

The listener is a plain socket (``socket.create_server``), not the stdlib's
``ThreadingHTTPServer``: that class's request handling (a thread per connection, its handler
class, its ``serve_forever`` loop) is what onebox replaces with the reactor and the pool, and
what was left of it (binding with SO_REUSEADDR and a backlog, ``server_close``) is two lines of
``socket``; keeping it as the base made every attribute of the engine a neighbour of
socketserver's own (``server_name``, a getfqdn() stall on DNS to override). The callers' contract
is kept: ``serve_forever()``, ``shutdown()``, ``server_close()``, ``server_address``, ``socket``.

Imports the other runtime modules and the handler contract; never ``server``.
"""
import functools
import os
import socket
import sys
import threading
import time
import traceback

from handlers import _context
from handlers._state import StateError
from onebox.accounts import Accounts
from onebox.activity import Activity
from onebox.admin import AdminConfigError, AdminSite, check_listener, is_loopback, load_token
from onebox.books import Books
from onebox.cache import ResponseCache
from onebox.events import EventHub
from onebox.forms import parse_cookies, read_form, read_query
from onebox.guard import Guard
from onebox.health import HealthChecks, Life
from onebox.handoff import Handoff, Wait
from onebox.jsonbody import read_json
from onebox.limits import LimiterRegistry
from onebox.logs import AccessLog, error_entry, journal_stream
from onebox.metrics import Metrics, Sources
from onebox.poller import Poller
from onebox.reactor import Reactor
from onebox.reload import Reloader, expiry_warning_of
from onebox.restart import Subject
from onebox.sessions import Logins, SessionStore
from onebox.site import CurrentSite, SiteTemplates, build_site
from onebox.static import StaticPages, static_hit
from onebox.tally import Tally
from onebox.templates import load_area_templates
from onebox.tls import TLSConfigError, build_context
from onebox.workers import Workers

WORKER_JOIN_S = 5.0       # after the drain, how long a stuck handler may delay exit
LISTEN_BACKLOG = 1024     # listen backlog: bursts of connects queue instead of failing


def _url_of(scheme, address):
    """The URL served at a listening socket's address: http://[::1]:8000/."""
    host, port = address[:2]
    return "%s://%s:%d/" % (scheme, "[%s]" % host if ":" in host else host, port)


def _listen(host, port, backlog, reuse_port=False):
    """A non-blocking listening socket on host:port (SO_REUSEADDR: a restart rebinds at once;
    SO_REUSEPORT with ``reuse_port``: several processes share the port, and the kernel spreads
    new connections among them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog,
                                reuse_port=reuse_port)
    sock.setblocking(False)
    return sock


class OneboxServer:
    """The listening sockets, and what serves them.

    For callers: ``serve_forever()`` (runs the reactor in the calling thread until shutdown),
    ``shutdown()`` (from another thread: stop and wait), ``begin_shutdown()`` (from a signal
    handler: stop without waiting), ``server_close()``, ``url``, ``server_address``,
    ``request_backup()``, ``request_restart()`` and ``note_sighup()`` (from signal handlers),
    ``log_error(message, detail)`` (any thread), ``reload()`` (the reactor thread, on SIGHUP).
    The site served now: ``site`` (onebox/site.py; ``config``, ``settings``, ``router``,
    ``static`` and ``access_log`` are its). The parts: ``guard``, ``context`` (store, response
    cache, limiters), ``store``, ``reactor``, ``workers``, ``handoff``, ``books`` (and its
    ``refusals``), ``tally``, ``metrics``, ``activity`` (what the status page shows:
    onebox/activity.py), ``life`` (``phase``, ``started_at``, ``health()``), ``admin`` (the
    admin listener's site, or None: onebox/admin.py). Listeners: ``socket``,
    ``admin_socket``/``admin_url``, ``tls_socket``/``tls_url`` (None while [tls] cert_file is
    empty).
    """

    def __init__(self, config, router, access_stream=None, error_stream=None, store=None,
                 listeners=None, notifier=None, restarter=None):
        """``listeners``: sockets already listening, by name (socket activation and the
        zero-downtime restart hand them over): "http" is served instead of binding host:port;
        other names are for the listeners that use them (e.g. "admin"). ``notifier``: told of
        a reload (its reloading() and reloaded(summary)): the process's systemd Notifier
        (onebox/systemd.py); ``restarter``: SIGUSR2's, starts a successor process on this
        one's sockets (onebox/restart.py); None in tests that build a server."""
        settings = config.server
        self.notifier, self.restarter = notifier, restarter
        self.socket = self.admin_socket = self.tls_socket = None
        self.handoff = self._poller = None
        # before anything is bound: an unusable admin token stops start-up (AdminConfigError),
        # as does a certificate or key that cannot be served (TLSConfigError, onebox/tls.py);
        # a missing one is judged once the admin socket's address is known (_open_listeners)
        admin_token = load_token()
        # the areas' templates (handlers/templates/), compiled: a broken one stops start-up
        # here with its file and line (TemplateError), as a bad ROUTES table does
        templates = load_area_templates()
        tls_context = tls_expires = None
        if config.tls.cert_file:
            tls_context, tls_expires = build_context(config.tls)
        self.store = store   # the shared state; closed (and compacted) after the workers stop
        # several processes as one site ([cluster], onebox/cluster.py): the link to the others
        # belongs to the store that is kept in Redis (it closes it); None for one process
        self.cluster = store.cluster if store is not None else None
        self.error_stream = error_stream or sys.stderr
        self.journal_priorities = journal_stream(self.error_stream)   # under systemd
        self.guard = Guard(config.guard, store, self.log_error)   # bans persist in the store
        # What handlers reach through state, @cached and limiter(): this server's own, bound by
        # each worker thread as it starts (handlers/_context.py); never the process's.
        self.context = _context.ServerContext(
            store, ResponseCache(config.cache.max_entries, config.cache.max_bytes),
            LimiterRegistry(),
            sessions=SessionStore(store, config.sessions),
            logins=Logins(None, config.sessions, self.log_error),   # accounts: _compose
            events=EventHub(config.events))   # its wake-up, the reactor's: _compose
        # stateless: the process's, any thread
        _context.use_parsers(read_json, read_form, read_query, parse_cookies)
        self.access_stream = access_stream or sys.stdout   # kept for a reload turning it on
        self._open_listeners(config, admin_token, dict(listeners or {}), tls_context)
        tls_address = self.tls_socket.getsockname()[:2] if self.tls_socket else None
        access_log = None
        if settings.access_log:
            access_log = AccessLog(self.access_stream, settings.log_flush_interval_s,
                                   settings.log_buffer_bytes, self.log_error)
        self.current = CurrentSite(build_site(
            config, router, StaticPages(settings.pages_dir, config.static), access_log,
            tls_address, templates))
        self.context.templates = SiteTemplates(self.current)   # render(): the current site's
        try:
            self._compose(config, admin_token, tls_context, tls_address)
        except Exception:
            self.server_close()
            raise
        self.life.tls_expires = tls_expires
        warning = expiry_warning_of(config.tls, tls_expires)
        if warning:
            self.log_error(warning)
        # Written by signal handlers or other threads, read by the reactor's loop:
        self._backup_requested = False
        self._sighup_received = False
        self._restart_requested = False
        self._backup_thread = None   # the reactor's
        self._reactor_thread = None
        self._stopped = threading.Event()
        self.stuck_workers = 0

    def _compose(self, config, admin_token, tls_context, tls_address):
        """The parts, each given what it uses. Each answered request is counted once, in the
        tally (onebox/tally.py), for the metrics and for what the status page shows
        (onebox/activity.py), where the guard also records each refusal and ban; the books
        (onebox/books.py) feed it and the access log."""
        current, log_error = self.current, self.log_error
        self.handoff = handoff = Handoff()
        self.context.events.wake = handoff.wake   # a publish wakes the reactor to fan out
        self._poller = poller = Poller(config.server.poller)   # (a restart's choice)
        self.life = Life(handoff, current)
        self.tally = tally = Tally()
        self.metrics = metrics = Metrics(tally, config.admin.metrics)
        status = config.status
        self.activity = Activity(tally, status.recorder, status.top_entries,
                                 status.recent_decisions)
        if status.recorder:
            self.guard.on_decision = self.activity.decision
        # what the guard asks of a client past its burst: is this an existing static file?
        self.guard.static_hit = functools.partial(static_hit, current)
        self.health_checks = HealthChecks(config.health, self.life, current)
        self.books = Books(tally if tally.wanted else None, metrics if metrics.enabled else None,
                           self.health_checks, current, log_error)
        self.reactor = Reactor(self.socket, config.server, handoff, poller, self.guard,
                               self.books, self.health_checks, log_error, self.admin_socket,
                               config.admin.max_connections, self.tls_socket, tls_context,
                               self.context.events, config.events)
        # users and passwords (onebox/accounts.py): one per server, so that its
        # max_parallel_hashes bounds the server's hashing (the admin's /accounts, a login page)
        self.accounts = None if self.store is None else Accounts(
            self.store, lambda: current.site.config.accounts)
        self.context.logins.accounts = self.accounts   # log_in's (onebox/sessions.py)
        self._sources = sources = Sources(
            metrics=metrics, refusals=self.books.refusals, guard=self.guard,
            reactor=self.reactor, handoff=handoff, context=self.context, store=self.store,
            accounts=self.accounts, activity=self.activity, current=current, life=self.life,
            url=self.url, cluster=self.cluster)
        self.admin = None
        if self.admin_socket is not None:
            self.admin = AdminSite(sources, admin_token, log_error)
        self.workers = Workers(current, self.books, self.guard, self.health_checks, self.admin,
                               self.context, handoff, poller, log_error)
        sources.workers = self.workers   # the admin pages read the pool that serves them
        cluster = self.cluster
        if cluster is not None:   # each part subscribes to what the others tell it
            self.health_checks.readiness = cluster.readiness
            self.guard.join_cluster(cluster)
            self.context.limiters.join_cluster(cluster, self.log_error)   # areas' limiter()s
            self.context.responses.join_cluster(cluster)
            self.context.events.join_cluster(cluster)
            cluster.start(self.url)
        self.reloader = Reloader(current, self.reactor, self.guard, self.context.responses,
                                 self.life, self.access_stream, tls_address, log_error)

    # -- the site, and what callers read of it -------------------------------------------------
    @property
    def site(self):
        return self.current.site

    @property
    def config(self):
        return self.current.site.config

    @property
    def settings(self):
        return self.current.site.settings

    @property
    def router(self):
        return self.current.site.router

    @property
    def static(self):
        return self.current.site.static

    @property
    def access_log(self):
        return self.current.site.access_log

    @property
    def refusals(self):
        return self.books.refusals

    @property
    def phase(self):
        return self.life.phase

    @phase.setter
    def phase(self, phase):
        self.life.phase = phase

    @property
    def started_at(self):
        return self.life.started_at

    def health(self):
        """None while the server is healthy, else why not (onebox/health.py: Life.health)."""
        return self.life.health()

    # -- listening ------------------------------------------------------------------------------
    def _open_listeners(self, config, admin_token, listeners, tls_context):
        """The public listener, the admin listener and the HTTPS one (each handed over, or
        bound); a port that cannot be had, or an admin socket beyond loopback without a token,
        closes what is open and stops start-up."""
        settings = config.server
        inherited = listeners.get("http")
        if inherited is not None:
            inherited.setblocking(False)
            self.socket = inherited
        else:
            self.socket = _listen(settings.host, settings.port, LISTEN_BACKLOG,
                                  settings.reuse_port)
        self.server_address = self.socket.getsockname()
        try:
            self.admin_socket = self._listen_admin(config.admin, listeners.get("admin"))
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
            self.tls_socket = self._listen_tls(config, listeners.get("https"), tls_context)
        except OSError as error:
            self.server_close()
            raise TLSConfigError(
                "cannot listen on %s port %s for HTTPS: %s; set [tls] port (--tls-port 0 "
                "picks a free one)" % (config.tls.host or settings.host, config.tls.port,
                                       error.strerror or error)) from None
        host = self.server_address[0]   # a socket systemd passed may not be settings.host
        if config.allowed_hosts is None and not is_loopback(host):
            self.log_error("listening on %s with any Host allowed: set allowed_hosts in [server] "
                           "(e.g. allowed_hosts = example.org) so that DNS rebinding cannot "
                           "reach this server from a browser" % host, level="warning")

    def _listen_admin(self, admin_settings, inherited=None):
        """The admin listener (onebox/admin.py): the socket handed over, else one bound to
        [admin] host and port, else None (port = off)."""
        if inherited is not None:
            inherited.setblocking(False)
            return inherited
        if admin_settings.port is None:
            return None
        return _listen(admin_settings.host, admin_settings.port, 64)

    def _listen_tls(self, config, inherited, tls_context):
        """The HTTPS listener: the socket handed over ("https"), else one bound to [tls] host
        (default [server] host) and port; None while [tls] cert_file is empty."""
        if tls_context is None:
            if inherited is not None:
                self.log_error("a socket named https was passed, but [tls] cert_file is empty: "
                               "it is not served; set cert_file and key_file")
                inherited.close()
            return None
        if inherited is not None:
            inherited.setblocking(False)
            return inherited
        return _listen(config.tls.host or config.server.host, config.tls.port, LISTEN_BACKLOG,
                       config.server.reuse_port)

    @property
    def tls_url(self):
        return self.tls_socket and _url_of("https", self.tls_socket.getsockname())

    @property
    def admin_url(self):
        return self.admin_socket and _url_of("http", self.admin_socket.getsockname())

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

    # -- running ---------------------------------------------------------------------------
    def serve_forever(self):
        self._reactor_thread = threading.current_thread()
        access_log = self.current.site.access_log
        if access_log:
            access_log.start()
        self.workers.start()
        self._poller.watch(self.socket, "listener")
        if self.admin_socket is not None:
            self._poller.watch(self.admin_socket, "admin-listener")
        if self.tls_socket is not None:
            self._poller.watch(self.tls_socket, "tls-listener")
        self._poller.watch(self.handoff.wakeup_socket, "wakeup")
        life = self.life
        try:
            while not self.handoff.stopping:
                if life.phase == "starting":   # before the first turn, which may sleep 1 s
                    life.phase = "serving"
                self.reactor.step()
                if self._backup_requested:
                    self._start_backup()
                if self._sighup_received:
                    self._sighup_received = False
                    self.reload()
                if self._restart_requested:
                    self._restart_requested = False
                    if self.restarter is not None:
                        self.restarter.begin(Subject(
                            self.life, self.settings, self.listening_sockets(),
                            self.begin_shutdown, self.log_error))
            self._drain()
        finally:
            if self._backup_thread is not None:
                self._backup_thread.join()
            self._stop_workers()
            self._close_store()
            access_log = self.current.site.access_log
            if access_log:
                access_log.close()
            self._stopped.set()

    def begin_shutdown(self):
        """Ask the reactor to stop; safe from signal handlers and any thread."""
        self.handoff.stopping = True
        self.life.phase = "draining"
        self.handoff.wake()   # the reactor's drain then sends held connections back

    def shutdown(self):
        if threading.current_thread() is self._reactor_thread:
            raise RuntimeError("shutdown() from the serving thread would deadlock; "
                               "use begin_shutdown()")
        self.begin_shutdown()
        if self._reactor_thread is not None:
            self._stopped.wait()

    def _close_other_listeners(self):
        for sock in (self.admin_socket, self.tls_socket):
            if sock is not None and sock.fileno() >= 0:
                if self._poller is not None:
                    self._poller.forget(sock)
                sock.close()

    def server_close(self):
        self._close_store()
        self._close_other_listeners()
        if self.socket is not None:
            self.socket.close()
        if self.handoff is not None:
            self.handoff.close()
        if self._poller is not None:
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
        self.reactor.end_streams()   # browsers reconnect to the successor, and resume
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
        store, self.store = self.store, None
        if getattr(self, "_sources", None) is not None:
            self._sources.store = None   # the admin pages stop reading it
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
        only, between turns: it swaps the site and the reactor's settings."""
        life = self.life
        life.phase = "reloading"
        if self.notifier is not None:   # systemd: RELOADING=1 now, READY=1 once applied
            self.notifier.reloading()
        detail = None
        try:
            summary = self.reloader.reload()
        except Exception as error:   # a bug in reloading must not stop the serving
            summary = ("reload failed: %s: %s; still serving the previous settings"
                       % (type(error).__name__, error))
            detail = traceback.format_exc()
        finally:
            if life.phase == "reloading":   # not if a SIGTERM began the drain meanwhile
                life.phase = "serving"
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
