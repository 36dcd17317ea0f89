"""The status page, its JSON and the ban actions, served on the admin listener only.

``routes(sources)`` gives the rows the admin listener (``onebox/admin.py``) mounts; ``sources`` is
the parts they read (``onebox.metrics.Sources``), never the engine:

    GET  /              the page (``status_page.html`` beside this file: inline CSS and script,
                        no external file; it polls status.json every 3 s)
    GET  /status.json   everything the page shows (``status_document``)
    GET  /bans          the bans in force, as JSON (what ``server.py --bans`` prints)
    POST /bans/lift     {"client": "192.0.2.7"}: lift that ban (``Guard.lift_ban``); 404 if
                        it is not banned. The admin listener checks the token and the origin.
                        JSON only (``Content-Type: application/json``, else 415): a form
                        or text/plain is what another site's page can POST without asking,
                        while a JSON POST from another origin needs a CORS preflight
                        (Fetch standard, "CORS-safelisted request-header"), which the
                        admin listener never grants.

Everything here reads what other threads write: counters and table sizes are read without
their owners' locks where a single ``len()`` or attribute read is atomic in CPython, so the
figures are a moment's approximation, never a reason for a request to wait. The page's script
builds its DOM with textContent only (client addresses and paths are attacker input), and the
Content-Security-Policy sent with it allows only its own inline script and style (by hash) and
fetches to its own origin: a page that tried to load anything else would be stopped.

Imports the handler contract, the recorder's budget and the standard library.
"""
import base64
import hashlib
import os
import re
import threading
import time

from handlers._core import HTTPError, html_response, json_response
from onebox.activity import BUDGET_BYTES
from onebox.cluster import NODE_TTL_S

__all__ = ["routes", "status_document", "PAGE_PATH"]

PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "status_page.html")
MAX_LIFT_BODY_BYTES = 4096
NO_STORE = [("Cache-Control", "no-store")]


def _load_page():
    with open(PAGE_PATH, encoding="utf-8") as page:
        html = page.read()
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    # The script runs by its hash; style may be inline (the <style> block and the swatches'
    # style attributes); nothing may load from anywhere, and fetches only from this origin.
    policy = ("default-src 'none'; script-src 'sha256-%s'; style-src 'unsafe-inline'; "
              "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'" % digest)
    return html, policy


PAGE_HTML, PAGE_POLICY = _load_page()


def routes(sources):
    """The (method, pattern, handler) rows of the status page, for the admin listener."""
    def page(request):
        return html_response(PAGE_HTML, headers=NO_STORE + [
            ("Content-Security-Policy", PAGE_POLICY),
            ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer")])

    def document(request):
        return json_response(status_document(sources), headers=NO_STORE)

    def bans(request):
        return json_response({"bans": sources.guard.list_bans(), "now": time.time()},
                             headers=NO_STORE)

    def lift(request):
        client = _lift_target(request)
        who = "the admin listener (from %s)" % request.client_ip
        key = sources.guard.lift_ban(client, by=who)
        if key is None:
            raise HTTPError(404, "that client is not banned")
        return json_response({"lifted": key}, headers=NO_STORE)

    return [("GET", "/", page), ("GET", "/status.json", document), ("GET", "/bans", bans),
            ("POST", "/bans/lift", lift)]


def _lift_target(request):
    """The "client" of a lift request: JSON {"client": ...}, never a form (see the module
    docstring: a cross-site form could send one)."""
    kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise HTTPError(415, "'Content-Type' must be application/json: send {\"client\": ...}")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_LIFT_BODY_BYTES:
        raise HTTPError(413, "request body too large")
    body = request.json()
    client = body.get("client") if isinstance(body, dict) else None
    if not isinstance(client, str) or not client.strip() or len(client) > 100:
        raise HTTPError(400, "'client' must be an address or a banned key as listed")
    return client.strip()


# --- the document ---------------------------------------------------------------------------

def status_document(sources):
    """What the page shows, JSON-able: activity (onebox/activity.py), bans, recent decisions,
    gauges (connections, workers) and tables (each with its size and cap)."""
    activity = sources.activity
    snapshot = activity.snapshot()
    memory = {"rss_bytes": _rss_bytes(), "activity_bytes": activity.memory_bytes(),
              "activity_budget_bytes": BUDGET_BYTES, "threads": threading.active_count()}
    return {
        "server": sources.url,
        "uptime_s": time.time() - getattr(sources, "started_at", activity.started),
        "phase": getattr(sources, "phase", ""),
        "activity": snapshot,
        "bans": sources.guard.list_bans(),
        "decisions": activity.decisions(),
        "guard_counts": _counts(sources),
        "gauges": _gauges(sources),
        "tables": _tables(sources, memory),
        "memory": memory,
        "cluster": _cluster(sources.cluster),
    }


def _cluster(cluster):
    """The processes of the site ([cluster], onebox/cluster.py), or None for one process."""
    if cluster is None:
        return None
    return {"up": cluster.up, "nodes": cluster.nodes(), "node_ttl_s": NODE_TTL_S,
            "now": time.time()}


def _counts(sources):
    """The guard's event counters and the runtime's refusals that happened (onebox/books.py)."""
    counts = sources.guard.stats()["counts"]
    counts.update((cause, count) for cause, count in sources.refusals.stats().items() if count)
    return counts


def _gauges(sources):
    settings, handoff = sources.settings, sources.handoff
    stats = sources.reactor.stats()   # a snapshot: any thread
    threads = settings.worker_threads
    idle = len(handoff.idle)
    parked = stats["parked"]
    rows = [
        ("open", "open connections", stats["open"], settings.max_connections),
        ("in_workers", "connections in workers", stats["in_workers"], None),
        ("busy_workers", "busy workers", max(0, threads - idle), threads),
        ("held", "kept connections a worker waits on", len(handoff.held), None),
        ("queued", "hand-off queue (ready, waiting for a worker)", handoff.work.qsize(), None),
        ("timed", "body and slow-reader waits in the reactor", stats["timed"], None),
        ("buffered", "bytes of bodies and TLS handshakes held", stats["buffered"],
         settings.max_buffered_bytes),
    ]
    rows += [("parked_" + kind, "parked: %s" % kind, count, None)
             for kind, count in sorted(parked.items())]
    streams = sources.reactor.streams.stats()
    hub = sources.context.events.stats()
    rows += [
        ("event_subscribers", "event streams open", streams["subscribers"],
         sources.config.events.max_subscribers),
        ("events_published", "events published", hub["published"], None),
        ("events_sent", "events sent (one per subscriber reached)", streams["sent"], None),
        ("events_dropped", "events dropped (their subscriber was cut off)", streams["dropped"],
         None),
        ("event_subscribers_cut", "event streams cut off (slow, stalled, memory, room)",
         sum(streams["cut"].values()), None),
        ("event_subscribers_refused", "event streams refused (429, 503)",
         sum(streams["refused"].values()), None),
    ]
    return [{"key": key, "name": name, "value": value, "of": of}
            for key, name, value, of in rows]


def _tables(sources, memory):
    guard = sources.guard.stats()
    rows = [
        ("guard: client buckets", guard["clients"]["keys"], guard["clients"]["max_keys"], ""),
        ("guard: handler CPU buckets", guard["cpu"]["keys"], guard["cpu"]["max_keys"], ""),
        ("guard: route buckets", guard["routes"]["keys"], guard["routes"]["max_keys"], ""),
        ("guard: suspects", guard["suspects"]["keys"], guard["suspects"]["max_keys"], ""),
        ("guard: bans (and offenders remembered)", guard["bans"]["keys"],
         guard["bans"]["max_keys"], ""),
    ]
    responses = sources.context.responses
    if responses is not None:
        cache = responses.stats()
        rows += [("response cache: entries", cache["entries"], cache["max_entries"], ""),
                 ("response cache: bytes", cache["bytes"], cache["max_bytes"], "bytes")]
    hub = sources.context.events
    rows.append(("events: replay rings", hub.stats()["ring_bytes"], hub.settings.ring_bytes,
                 "bytes"))
    static = sources.static
    for name, table in (("static: file cache", getattr(static, "files", None)),
                        ("static: gzip cache", getattr(static, "gzipped", None))):
        if table is not None:
            rows.append((name, table.used, table.budget, "bytes"))
    store = sources.store
    if store is not None:
        try:
            state = store.stats()
        except Exception:   # closed during shutdown
            state = None
        if state is not None:
            rows += [("state store: keys", state["keys"], None, ""),
                     ("state store: bytes in memory", state["bytes"], None, "bytes"),
                     ("state store: journal", state["journal_bytes"],
                      sources.config.state.compact_journal_bytes, "bytes")]
    rows += [("status recorder", memory["activity_bytes"], BUDGET_BYTES, "bytes"),
             ("process: RSS", memory["rss_bytes"], None, "bytes"),
             ("process: threads", memory["threads"], None, "")]
    return [{"name": name, "size": size, "cap": cap, "unit": unit or "count"}
            for name, size, cap, unit in rows]


def _rss_bytes():
    """Resident memory now (Linux /proc), else the peak (getrusage), else None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return None
