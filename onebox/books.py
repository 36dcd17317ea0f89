"""The books: one ``Record`` per request, and one ``finish`` that accounts for it.

Every request the server answers, and every connection or request it refuses itself, is
accounted for once, by ``Books.finish(record, finished_at)``, called by whichever thread ends
the response: a worker (most requests), or the reactor (a response it finished for a slow
reader, a health check it answered, a refusal it made before any worker saw the request).
``finish`` feeds the tally (``onebox/tally.py``: the metrics and the status page) and the
access log (``onebox/logs.py``), with the two log-rate rules: health checks'
(``onebox/health.py``: a success once per ``log_every_s``) and refusals' (at most
``REFUSALS_LOGGED_PER_S`` a second, the rest summed up on the error log).

A ``Record`` is made when a request's head is read (``Books.open``), with the site it is
served under (``onebox/site.py``); the worker fills it in as it learns (method, path, route
label, status, bytes), and hands it with the response when the reactor is to finish sending
(``Outbox.record``). Adding a log field or a metric is one place: the value goes into the
record where it becomes known, and the access line (``AccessLog.write``) or the tally reads it
from there; nothing else carries it. (The request body bytes received,
``onebox_http_request_body_bytes_total``, were added so: ``Record.received``, set by the worker
where the body's reader is, counted here, and written by the metrics' render.)

Refusal counters (``Refusals``): the causes the runtime refuses or cuts a connection for are
declared here, once, in ``Refusals.CAUSES``; each is counted from zero at start, so /metrics
shows every cause at zero without listing them (a rate() needs the zero to start from), and
counting an undeclared cause is a KeyError that tests catch.

Threads: ``finish`` is called by any thread that ends a response; a record is touched by one
thread at a time (its connection's owner). The refusals' log-rate sample is the reactor's
alone (refusals are made there). ``Refusals`` has its own lock. Imports the tally's route
labels only through the caller; the standard library otherwise.
"""
import threading
import time

ADMIN = "admin"      # the route label of an admin listener request: counted apart, never tallied
_APART = frozenset((None, ADMIN))   # route labels finish() counts apart: refusals, admin
REFUSALS_LOGGED_PER_S = 20   # refusals at accept or before a worker, logged a second; the
                             # rest are counted and summed up in one error-log line


class Record:
    """What the books keep of one request (or refusal). ``route`` is the metrics' route label
    (None: a refusal the runtime made, not a request); ``ip`` the client's address as logged
    and tallied (a trusted proxy's forwarded client); ``sent`` response body bytes, ``received``
    request body bytes; ``note`` what the access line ends with (the guard's decision,
    ``health``, ``admin``, ``send=cut``...)."""

    __slots__ = ("started", "site", "ip", "line", "method", "route", "path", "status", "sent",
                 "received", "referer", "agent", "note")

    def __init__(self, started, site, ip, route=None):
        self.started = started   # monotonic: the head was whole
        self.site = site         # the Site it is served under, start to end
        self.ip = ip
        self.route = route
        self.line = ""
        self.method = "other"
        self.path = ""
        self.status = 0
        self.sent = self.received = 0
        self.referer = self.agent = ""
        self.note = None


class Refusals:
    """The runtime's own refusal counters, by cause (``CAUSES``). ``count(cause)`` from any
    thread; ``stats()`` a copy, every cause included. ``_lock`` guards ``_counts`` (taken on
    refusals only, never for a served request)."""

    CAUSES = (
        "refused_connection_cap",   # 503 at max_connections, no room could be made
        "refused_client_cap",       # 503 at max_connections_per_ip
        "refused_timeout",          # 408: a head not whole in time
        "refused_bad_request",      # 400/414/431 before any worker saw the request
        "refused_slow_body",        # 408: a body under the minimum rate
        "closed_slow_reader",       # a response not taken at the minimum rate
        "closed_at_accept",         # banned, and told so ban_close_after_hits times
        "closed_tls_handshake",     # a TLS handshake that failed
        "closed_for_room",          # taken to make room at max_connections
        "closed_memory_budget",     # shed to keep to max_buffered_bytes
    )

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.CAUSES, 0)

    def count(self, cause):
        with self._lock:
            self._counts[cause] += 1   # KeyError: declare the cause in CAUSES

    def stats(self):
        with self._lock:
            return dict(self._counts)


class Books:
    """For the runtime: ``open(started, ip)`` (a record under the current site),
    ``finish(record, finished_at)``, ``refused(...)`` (the reactor's refusals), ``refusals``
    (the counters) and ``record_decision(verdict)``. Built with what it feeds: the tally (None
    when nobody reads it), the metrics (None when off), the health checks (their paths and
    log rule), the current site (``onebox/site.py``: whose access log a refusal goes to), and
    the error log."""

    def __init__(self, tally, metrics, health_checks, current, log_error):
        self.tally = tally
        self.metrics = metrics
        self.health_paths = health_checks.paths
        self.should_log_health = health_checks.should_log
        self.current = current
        self.log_error = log_error
        self.refusals = Refusals()
        # the refusals' log sample, the reactor's: [second, refusals logged in it], and how
        # many went unlogged in it (read by the reactor at each turn: a plain attribute)
        self._refusals_logged = [0, 0]
        self.unlogged_refusals = 0

    def open(self, started, ip, route=None):
        """A record for a request (or refusal) that starts now, under the current site."""
        return Record(started, self.current.site, ip, route)

    def finish(self, record, finished):
        """The request is done (its last byte handed to the kernel at ``finished``, monotonic):
        count it and log it. Any thread that ends a response; once per record."""
        route = record.route
        if route in _APART:   # not the site's traffic: never tallied
            if route is None:
                self._log_refusal(record)
                return
            if self.metrics is not None:
                self.metrics.record_admin(record.status)
        elif self.tally is not None:
            self.tally.add(record.started, finished, record.status, record.method, route,
                           record.ip, record.path, record.sent)
            if record.received and self.metrics is not None:   # requests with a body only
                self.metrics.record_received(record.received)
        log = record.site.access_log
        if log and (route not in self.health_paths
                    or self.should_log_health(route, record.status)):
            log.write(record, finished - record.started)

    def refused(self, ip, line, status, size, note):
        """A refusal the reactor made (a 503 at a cap, a 400 or 408 before a worker saw the
        request, a banned client's health check): logged under the refusals' rate rule."""
        record = Record(0.0, self.current.site, ip)
        record.line, record.status, record.sent, record.note = line, status, size, note
        self.finish(record, 0.0)

    def record_decision(self, verdict):
        if self.metrics is not None:
            self.metrics.record_decision(verdict)

    def _log_refusal(self, record):
        """Refusals reach the access log, at most REFUSALS_LOGGED_PER_S a second: a flood of
        them must not become a flood of log lines. Reactor thread."""
        log = record.site.access_log
        if not log:
            return
        self.sum_up_refusals(time.monotonic())
        sample = self._refusals_logged
        if sample[1] >= REFUSALS_LOGGED_PER_S:
            self.unlogged_refusals += 1
            return
        sample[1] += 1
        log.write(record, 0.0)

    def sum_up_refusals(self, now):
        """A new second: say how many refusals went unlogged in the last (the reactor calls
        it at each turn while some did, so the sum is written without waiting for the next
        refusal)."""
        sample = self._refusals_logged
        if sample[0] != int(now):
            if self.unlogged_refusals:
                self.log_error("%d more refusals not logged in the last second (the access log "
                               "takes %d a second)" % (self.unlogged_refusals,
                                                       REFUSALS_LOGGED_PER_S), level="warning")
            sample[:] = [int(now), 0]
            self.unlogged_refusals = 0
