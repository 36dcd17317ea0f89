"""Metrics: what the server counts per request, and /metrics in the Prometheus text format.

The hot path
------------
Each request is counted once, in the tally (``onebox/tally.py``), by the thread that finishes
it (``Books.finish``, onebox/books.py: a worker, or the reactor for a response it finished for
a slow reader, and for the health checks it answers): no lock, and a request like the one before it
costs one dictionary lookup. The tally folds each thread's entries into ``Metrics``' tables
under its lock; a scrape adds the entries not yet folded, so it is complete up to the moment
it asked.

Requests the reactor refuses before any worker sees them (a connection over a cap, a head
that is malformed or too slow) are not requests here: they are in
``onebox_connections_refused_total``, by cause, every cause from zero (the causes are declared
once, in ``onebox.books.Refusals.CAUSES``: nothing here lists them).

Cardinality is bounded by what the server knows, never by what clients send: ``route`` is a
route's pattern ("/api/notes/{id}"), or one of ``STATIC``, ``UNROUTED`` (no route and no page:
404, 405), ``REFUSED`` (answered before routing: the guard, a malformed request); ``method``
is one of ``onebox.routing.METHODS`` or "other"; the status is its class ("2xx").

The scrape
----------
``render(sources)`` reads the tables above and the parts' ``stats()`` (``Sources``: the reactor,
the worker pool, the guard, the refusal counters, the response cache and limiters, the static
caches, the state store; the process) and writes the text exposition format 0.0.4
(https://prometheus.io/docs/instrumenting/exposition_formats/). Each part's figures are read
without stopping it; the worst a race costs is a gauge a moment stale. Its size is bounded by
routes x methods x status classes (and the histogram's buckets per route).

Stdlib only; imports no runtime module but routing's METHODS and the tally's buckets (the
parts are passed in, as ``Sources``).
"""
import os
import platform
import resource
import sys
import threading

from onebox.cluster import NODE_TTL_S
from onebox.routing import METHODS
from onebox.tally import DURATION_BOUNDS_S, METRICS_BOUNDS_S, metrics_bucket

STATIC, UNROUTED, REFUSED = "static", "unrouted", "refused"
BUCKETS = METRICS_BOUNDS_S   # the request duration histogram's upper bounds (seconds)
# the tally's duration bucket -> the histogram's
_BUCKET_OF = tuple(metrics_bucket(bucket) for bucket in range(len(DURATION_BOUNDS_S) + 1))
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_KNOWN_METHODS = frozenset(METHODS)
VERSION = "0.1"   # onebox's version, for onebox_build_info


class Sources(object):
    """What the admin listener's pages read (the metrics, the status page), each part by
    name, given by the engine at start; never the engine itself. The site's values are read
    from the current site, and the server's phase and health from its ``life``
    (onebox/health.py). ``workers`` is given once the pool is built (the pool serves the
    admin pages that read it: the one cycle, broken here)."""

    __slots__ = ("metrics", "refusals", "guard", "reactor", "handoff", "workers", "context",
                 "store", "accounts", "activity", "current", "life", "url", "cluster")

    def __init__(self, **parts):
        for name in self.__slots__:
            setattr(self, name, parts.get(name))

    @property
    def settings(self):
        return self.current.site.settings

    @property
    def config(self):
        return self.current.site.config

    @property
    def static(self):
        return self.current.site.static

    @property
    def phase(self):
        return self.life.phase

    @property
    def started_at(self):
        return self.life.started_at

    @property
    def tls_expires(self):
        return self.life.tls_expires

    def health(self):
        return self.life.health()


class Metrics(object):
    """For the runtime: ``record_decision(verdict)`` and ``record_admin(status)`` from any
    thread; requests come through the tally (``onebox/tally.py``), which calls ``fold`` with
    each book's entries. ``totals()`` for a scrape. ``enabled`` False: nothing is counted
    (``[admin] metrics = off``).

    ``requests`` and ``durations`` are written by ``fold`` only, under the tally's lock, and
    copied under it (``totals``); ``decisions``, ``admin`` and ``received`` are guarded by
    ``_counts_lock`` (refusals, admin requests, requests with a body: rarer, from any
    thread)."""

    def __init__(self, tally, enabled=True):
        self.enabled = enabled
        self._tally = tally
        self.requests = {}    # (method, class, route) -> [count, body bytes sent]
        self.durations = {}   # route -> [bucket counts..., +Inf count, sum of seconds]
        self._counts_lock = threading.Lock()
        self.decisions = {}   # (rule, action) -> count
        self.admin = {}       # status class -> admin listener requests
        self.received = 0     # request body bytes received (requests with a body only)
        if enabled:
            tally.subscribe(self.fold)

    def fold(self, entries, offset=0.0, into=None):
        """The tally's entries, added to ``into`` (requests, durations), or to the tables."""
        requests, durations = into if into is not None else (self.requests, self.durations)
        for (_, status, method, route, _, _, bucket), (count, sent, took) in entries:
            if method not in _KNOWN_METHODS:   # a client's token never becomes a label
                method = "other"
            key = (method, status // 100, route)
            totals = requests.get(key)
            if totals is None:
                totals = requests[key] = [0, 0]
            totals[0] += count
            totals[1] += sent
            histogram = durations.get(route)
            if histogram is None:
                histogram = durations[route] = [0] * (len(BUCKETS) + 1) + [0.0]
            histogram[_BUCKET_OF[bucket]] += count
            histogram[-1] += took

    def record_decision(self, verdict):
        """A guard verdict that a request met (refused, or dry-run only)."""
        if not self.enabled:
            return
        key = (verdict.rule, "dry_run" if verdict.dry_run else "refused")
        with self._counts_lock:
            self.decisions[key] = self.decisions.get(key, 0) + 1

    def record_received(self, size):
        """``size`` request body bytes received (onebox/books.py: a request with a body)."""
        with self._counts_lock:
            self.received += size

    def received_bytes(self):
        with self._counts_lock:
            return self.received

    def record_admin(self, status):
        """A request on the admin listener: counted apart, never as the site's traffic."""
        if not self.enabled:
            return
        with self._counts_lock:
            self.admin[status // 100] = self.admin.get(status // 100, 0) + 1

    def totals(self):
        """Copies of (requests, durations, decisions, admin), the threads' books included."""
        if not self.enabled:
            return {}, {}, {}, {}

        def copy(entries):
            return ({key: list(value) for key, value in self.requests.items()},
                    {key: list(value) for key, value in self.durations.items()}, entries)
        requests, durations, entries = self._tally.read(copy)
        self.fold(entries, into=(requests, durations))
        with self._counts_lock:
            return requests, durations, dict(self.decisions), dict(self.admin)


# --- the exposition format ---------------------------------------------------------------------

def _escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value):
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(int(value))


class _Writer(object):
    """Families in the text format; each family's HELP and TYPE once, before its samples."""

    def __init__(self):
        self.lines = []

    def family(self, name, kind, help_text, samples):
        """``samples``: [(labels dict or (), value)] or [(suffix, labels, value)] for histograms."""
        self.lines.append("# HELP %s %s" % (name, help_text.replace("\\", "\\\\")
                                            .replace("\n", " ")))
        self.lines.append("# TYPE %s %s" % (name, kind))
        for sample in samples:
            suffix, labels, value = sample if len(sample) == 3 else ("",) + tuple(sample)
            label_text = ",".join('%s="%s"' % (key, _escape(val)) for key, val in
                                  (labels.items() if isinstance(labels, dict) else labels))
            self.lines.append("%s%s%s %s" % (name, suffix, "{%s}" % label_text if label_text
                                             else "", _number(value)))

    def one(self, name, kind, help_text, value):
        self.family(name, kind, help_text, [((), value)])

    def text(self):
        return "\n".join(self.lines) + "\n"


def render(sources):
    """The whole scrape, as text. ``sources``: the parts to read (``Sources``)."""
    out = _Writer()
    _requests(out, sources)
    _connections(out, sources)
    _events(out, sources)
    _refusals(out, sources.refusals)
    _guard(out, sources)
    _caches(out, sources)
    _state(out, sources)
    _cluster(out, sources.cluster)
    _process(out, sources)
    return out.text()


def _requests(out, sources):
    metrics = sources.metrics
    requests, durations, decisions, admin = metrics.totals()
    rows = sorted(requests.items())
    out.family("onebox_http_requests_total", "counter",
               "Requests answered on the public port, by method, status class and route "
               "pattern (static: every page; unrouted: no route or page; refused: answered "
               "before routing)",
               [({"method": m, "code": "%dxx" % c, "route": r}, v[0]) for (m, c, r), v in rows])
    out.family("onebox_http_response_body_bytes_total", "counter",
               "Response body bytes sent on the public port",
               [({"method": m, "code": "%dxx" % c, "route": r}, v[1]) for (m, c, r), v in rows])
    samples = []
    for route, histogram in sorted(durations.items()):
        running = 0
        for bound, count in zip(BUCKETS, histogram):
            running += count
            samples.append(("_bucket", {"route": route, "le": repr(bound)}, running))
        running += histogram[len(BUCKETS)]
        samples.append(("_bucket", {"route": route, "le": "+Inf"}, running))
        samples.append(("_sum", {"route": route}, histogram[-1]))
        samples.append(("_count", {"route": route}, running))
    out.one("onebox_http_request_body_bytes_total", "counter",
            "Request body bytes received on the public port (read by a handler, or drained)",
            metrics.received_bytes())
    out.family("onebox_http_request_duration_seconds", "histogram",
               "Time from a whole request head to the response's last byte handed to the kernel",
               samples)
    out.family("onebox_guard_decisions_total", "counter",
               "Requests the abuse guard refused (or would have: dry_run), by rule",
               [({"rule": rule, "action": action}, count)
                for (rule, action), count in sorted(decisions.items())])
    out.family("onebox_admin_requests_total", "counter",
               "Requests on the admin listener (not counted as the site's traffic)",
               [({"code": "%dxx" % cls}, count) for cls, count in sorted(admin.items())])
    out.one("onebox_metrics_enabled", "gauge",
            "1 if requests are counted ([admin] metrics); 0: the request families stay empty",
            1 if metrics.enabled else 0)


def _connections(out, sources):
    stats, handoff = sources.reactor.stats(), sources.handoff   # (a snapshot: any thread)
    waits = stats["waits"]
    states = [("handshake", waits["handshake"]),   # TLS handshakes under way
              ("reading", waits["new"] + waits["head"]),
              ("idle", waits["idle"]), ("held", len(handoff.held)),
              ("lingering", waits["linger"]), ("in_workers", stats["in_workers"]),
              ("body", waits["body"]), ("send", waits["send"]),
              ("in_line", waits["line"]), ("ready", waits["ready"]),
              ("events", waits["events"])]
    out.one("onebox_connections_open", "gauge", "Open connections on the public port",
            stats["open"])
    out.family("onebox_connections", "gauge",
               "Public connections by what they wait for (handshake: TLS; idle: kept, parked in "
               "the reactor; held: kept, a worker waits on it; body: its request body; send: a "
               "slow reader; in_line: behind its client's other waits; ready: for its client's "
               "share of the workers; events: an event stream)",
               [({"state": name}, value) for name, value in states])
    out.one("onebox_connections_max", "gauge", "max_connections", sources.settings.max_connections)
    out.one("onebox_buffered_bytes", "gauge", "Request bodies buffered and TLS handshakes under "
            "way, as charged against max_buffered_bytes", stats["buffered"])
    out.one("onebox_buffered_bytes_max", "gauge", "max_buffered_bytes",
            sources.settings.max_buffered_bytes)
    out.one("onebox_admin_connections_open", "gauge", "Open connections on the admin listener",
            stats["admin_open"])
    idle = len(handoff.idle)
    threads = len(sources.workers.threads)
    out.family("onebox_workers", "gauge", "Worker threads by state",
               [({"state": "busy"}, max(0, threads - idle)), ({"state": "idle"}, idle)])
    out.one("onebox_workers_queued", "gauge", "Jobs waiting on the work queue for a worker",
            handoff.work.qsize())
    out.one("onebox_healthy", "gauge", "1 while OneboxServer.health() finds nothing wrong",
            1 if sources.health() is None else 0)
    out.family("onebox_phase", "gauge", "1 for the server's current phase",
               [({"phase": phase}, 1 if sources.phase == phase else 0)
                for phase in ("starting", "serving", "reloading", "draining")])
    expires = getattr(sources, "tls_expires", None)
    if expires is not None:   # what an alert on certificate renewal watches (onebox/tls.py)
        out.one("onebox_tls_certificate_expiry_timestamp_seconds", "gauge",
                "When the HTTPS certificate served to new connections expires (Unix time)",
                int(expires))


def _events(out, sources):
    """Event streams (onebox/streams.py) and the hub's rings (onebox/events.py)."""
    streams = sources.reactor.streams.stats()
    hub = sources.context.events.stats()
    out.one("onebox_event_subscribers", "gauge", "Event streams open", streams["subscribers"])
    out.one("onebox_event_subscribers_started_total", "counter", "Event streams admitted",
            streams["started"])
    out.one("onebox_events_published_total", "counter", "Events published (publish())",
            hub["published"])
    out.one("onebox_events_sent_total", "counter",
            "Events written to a subscriber (one per subscriber an event reached)",
            streams["sent"])
    out.one("onebox_events_dropped_total", "counter",
            "Events a subscriber had not taken when it was cut off", streams["dropped"])
    out.family("onebox_event_subscribers_cut_total", "counter",
               "Event streams cut off (slow: past [events] max_unsent_bytes; stalled: nothing "
               "taken for write_timeout_s; memory: max_buffered_bytes; room: max_connections; "
               "banned: its client was banned)",
               [({"reason": name}, count) for name, count in sorted(streams["cut"].items())])
    out.family("onebox_event_subscribers_refused_total", "counter",
               "Event streams refused (client_cap: 429; server_cap: 503)",
               [({"reason": name}, count) for name, count in sorted(streams["refused"].items())])
    out.one("onebox_event_ring_events", "gauge", "Events kept for reconnecting clients",
            hub["ring_events"])


def _refusals(out, refusals):
    out.family("onebox_connections_refused_total", "counter",
               "Connections refused or cut by the runtime, by cause",
               [({"cause": name}, count) for name, count in sorted(refusals.stats().items())])


def _guard(out, sources):
    stats = sources.guard.stats()
    counts = stats["counts"]
    out.family("onebox_guard_events_total", "counter",
               "The abuse guard's own counters (bans earned, banned hits, scanners, ...)",
               [({"event": name}, value) for name, value in sorted(counts.items())])
    out.one("onebox_guard_bans_active", "gauge", "Bans in force", stats["bans"]["active"])
    out.one("onebox_guard_enabled", "gauge", "1 if [limits] enabled", 1 if stats["enabled"] else 0)
    tables = [("guard_clients", stats["clients"]), ("guard_cpu", stats["cpu"]),
              ("guard_routes", stats["routes"]),
              ("guard_suspects", stats["suspects"]), ("guard_bans", stats["bans"])]
    cache = sources.context.responses.stats()
    tables.append(("response_cache", {"keys": cache["entries"], "max_keys": cache["max_entries"],
                                      "evictions": cache["evictions"]}))
    for name, limiter_stats in sorted(sources.context.limiters.stats().items()):
        tables.append(("limiter:" + name, limiter_stats))
    out.family("onebox_table_entries", "gauge", "Entries in each capped in-memory table",
               [({"table": name}, table["keys"]) for name, table in tables])
    out.family("onebox_table_capacity", "gauge", "Each capped table's cap (entries)",
               [({"table": name}, table["max_keys"]) for name, table in tables])
    out.family("onebox_table_evictions_total", "counter",
               "Entries dropped from a full table (least recently used first)",
               [({"table": name}, table.get("evictions", 0)) for name, table in tables])


def _caches(out, sources):
    cache = sources.context.responses.stats()
    out.one("onebox_response_cache_hits_total", "counter", "@cached responses served from memory",
            cache["hits"])
    out.one("onebox_response_cache_misses_total", "counter",
            "@cached responses computed by their handler", cache["misses"])
    caches = [("response_cache", cache["bytes"], cache["max_bytes"])]
    sessions = sources.context.sessions
    if sessions is not None:
        held = sessions.stats()
        out.one("onebox_sessions", "gauge", "Sessions kept (request.session)", held["sessions"])
        out.one("onebox_sessions_evicted_total", "counter",
                "Sessions evicted to keep to [sessions] max_sessions and max_bytes",
                held["evicted"])
        caches.append(("sessions", held["bytes"], sessions.settings.max_bytes))
    rings = sources.context.events
    caches.append(("event_rings", rings.stats()["ring_bytes"], rings.settings.ring_bytes))
    static = sources.static
    for name, budget in (("static_files", static.files), ("static_gzip", static.gzipped)):
        caches.append((name, budget.used, budget.budget))
    out.family("onebox_cache_bytes", "gauge", "Bytes held by each in-memory cache",
               [({"cache": name}, used) for name, used, _ in caches])
    out.family("onebox_cache_capacity_bytes", "gauge", "Each cache's byte budget",
               [({"cache": name}, cap) for name, _, cap in caches])


def _state(out, sources):
    store = sources.store
    if store is None:
        return
    stats = store.stats()
    out.one("onebox_state_keys", "gauge", "Keys in the state store", stats["keys"])
    out.one("onebox_state_bytes", "gauge", "Bytes of values in the state store", stats["bytes"])
    out.one("onebox_state_journal_bytes", "gauge", "Size of the journal", stats["journal_bytes"])
    out.one("onebox_state_snapshot_bytes", "gauge", "Size of the snapshot", stats["snapshot_bytes"])
    out.one("onebox_state_writes_total", "counter", "Writes applied to the state store",
            stats["writes"])
    out.one("onebox_state_fsyncs_total", "counter", "fsyncs of the journal", stats["fsyncs"])
    out.one("onebox_state_compactions_total", "counter", "Journal compactions into a snapshot",
            stats["compactions"])
    out.one("onebox_state_last_snapshot_timestamp_seconds", "gauge",
            "When the snapshot was last written (Unix time; 0: never)",
            stats.get("snapshot_time", 0.0))



def _cluster(out, cluster):
    """Several processes as one site (onebox/cluster.py); nothing for one process."""
    if cluster is None:
        return
    stats = cluster.stats()
    out.one("onebox_cluster_up", "gauge",
            "1 while Redis answers and the subscription holds, else 0 (/readyz is 503)",
            1 if stats["up"] else 0)
    out.one("onebox_cluster_nodes", "gauge",
            "Processes of the site heard from within the last %g s" % NODE_TTL_S, stats["nodes"])
    out.family("onebox_cluster_messages_total", "counter",
               "Messages between the processes (bans, cache invalidations, events)",
               [({"direction": "sent"}, stats["sent"]),
                ({"direction": "received"}, stats["received"])])
    out.one("onebox_cluster_send_failures_total", "counter",
            "Messages Redis did not take (it was unavailable)", stats["send_failures"])


def _process(out, sources):
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.one("process_cpu_seconds_total", "counter", "User and system CPU time spent",
            float(usage.ru_utime + usage.ru_stime))
    out.one("process_resident_memory_bytes", "gauge", "Resident memory size", _rss_bytes(usage))
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = -1
    if fds >= 0:
        out.one("process_open_fds", "gauge", "Open file descriptors", fds)
    out.one("process_threads", "gauge", "Threads in the process", threading.active_count())
    out.one("process_start_time_seconds", "gauge", "Start time of the process (Unix time)",
            sources.started_at)
    out.family("onebox_build_info", "gauge", "onebox and Python versions (always 1)",
               [({"version": VERSION, "python": platform.python_version(),
                  "implementation": sys.implementation.name}, 1)])


def _rss_bytes(usage):
    """The current resident size from /proc (Linux), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
