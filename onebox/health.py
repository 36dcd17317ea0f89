"""Health checks on the public port: ``GET /healthz`` (live) and ``GET /readyz`` (ready).

They are answered by the reactor thread itself, the moment their head is in, never by a worker:

* a health check must say when the worker pool is wedged, and a check that waited for a worker
  would only time out (no reason given; a monitor cannot tell a wedge from a network fault);
* they cost a prefix test on each complete head (``bytes.startswith`` with a tuple), and for a
  match one parse of the head: no guard, no routing, no Request object;
* the abuse guard's rate limits never see them: a monitor is never limited or counted as a
  scanner. A banned client is not a monitor: its check gets 403 and counts toward
  ``ban_close_after_hits``, after which its connections are closed at accept (issue 19: a
  banned client made 1,000 checks with 57 KB heads, all answered 200, none logged);
* a check's head must fit in ``[health] max_head_bytes`` (a monitor sends a few headers), else
  431, which is a strike like any malformed request;
* a successful check is access-logged at most once per ``[health] log_every_s`` (a monitor
  polling every few seconds would otherwise be most of the log); failures at most
  ``FAILURES_LOGGED_PER_S`` a second (each is counted in the metrics all the same).

``live_path`` answers 200 "ok" while ``Life.health()`` is None (the reactor turns, and a
worker took the reactor's latest probe within ``stall_timeout_s``), else 503 with the reason.
``ready_path`` answers 200 "ready" while ``Life.phase`` is "serving", else 503 with the phase
(starting, reloading, draining): a load balancer stops sending new clients during a drain.
Both close the connection after the answer (a kept connection's next request would go to a
worker, which is what a wedged pool cannot take). One that reaches a worker all the same (the
next request on a connection a worker holds, or a pipelined one) is answered there the same
way, before the guard, and the connection is kept. The Host header is not checked against
``allowed_hosts``: the answer holds nothing worth a DNS rebinding.

``Life`` is the server's life as these checks, the metrics, the status page and systemd see it:
its phase, when it started, and ``health()``.

Imports the codec and the contract only; the parts are passed in.
"""
import time

from handlers._core import HTTPError, Response
from onebox.codec import parse_head, split_target

FAILURES_LOGGED_PER_S = 10   # failing checks access-logged a second: a flood of them while the
                             # server is unhealthy must not become a flood of log lines


class Life(object):
    """The server's life. ``phase``: "starting" until the reactor's first turn, then
    "serving"; "reloading" while the reactor applies a reload; "draining" from the shutdown
    on (written by the reactor thread, and by begin_shutdown from any thread). ``started_at``
    (epoch seconds); ``tls_expires`` (the served certificate's expiry, epoch seconds, or None;
    replaced by a reload). ``health()`` from any thread. Built with the hand-off (its turn and
    probe times) and the current site (its stall_timeout_s)."""

    def __init__(self, handoff, current):
        self.handoff = handoff
        self.current = current
        self.phase = "starting"
        self.started_at = time.time()
        self.tls_expires = None

    def health(self):
        """None while the server is healthy, else why not (one line): the reactor has turned,
        and a worker has taken the reactor's latest probe, within stall_timeout_s. What the
        systemd watchdog and /healthz go by. Any thread."""
        handoff, bound = self.handoff, self.current.site.settings.stall_timeout_s
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


class HealthChecks(object):
    """For the reactor: ``prefixes`` (request-line starts worth a look) and ``answer(head)``;
    for the workers ``response_for(path)``; for the books ``paths`` and ``should_log``. Built
    with [health] ``settings``, the server's ``life`` and the ``current`` site (its head
    limits)."""

    def __init__(self, settings, life, current):
        self.life = life
        self.current = current
        self.live_path, self.ready_path = settings.live_path, settings.ready_path
        self.paths = frozenset((self.live_path, self.ready_path))
        self.log_every_s = settings.log_every_s
        # what else /readyz waits for: None when ready, else why not (the cluster's Redis:
        # onebox/cluster.py); set by the engine once, before serving
        self.readiness = None
        self.max_head_bytes = settings.max_head_bytes
        prefixes = []
        for method in (b"GET ", b"HEAD "):
            for path in (self.live_path, self.ready_path):
                for end in (b" ", b"?"):
                    prefixes.append(method + path.encode("ascii") + end)
        self.prefixes = tuple(prefixes)
        self._logged_at = {}   # path -> when a 200 was last logged (the reactor's alone)
        self._failures_logged = [0, 0]   # [second, failures logged in it]

    def answer(self, head_bytes):
        """(Response, request line, path, head-only, HTTP version) for a health check's head,
        else None (the request goes to a worker as usual, which also answers a malformed
        one)."""
        try:
            head = parse_head(head_bytes, self.current.site.settings)
            path, _ = split_target(head)
        except HTTPError:
            return None
        if path not in self.paths:
            return None
        return (self.response_for(path), head.request_line, path, head.method == "HEAD",
                head.version)

    def response_for(self, path):
        """The answer for one of ``paths`` (any thread)."""
        if path == self.live_path:
            reason = self.life.health()
            return _plain(200, "ok") if reason is None else _plain(503, reason)
        phase = self.life.phase
        if phase != "serving":
            return _plain(503, phase)
        reason = self.readiness() if self.readiness is not None else None
        return _plain(200, "ready") if reason is None else _plain(503, reason)

    def should_log(self, path, status):
        """Failures up to FAILURES_LOGGED_PER_S a second; a success once per log_every_s per
        path. (Workers call it too: two threads may both log in a race, which costs a line.)"""
        now = time.monotonic()
        if status != 200:
            second = int(now)
            logged = self._failures_logged
            if logged[0] != second:
                self._failures_logged = logged = [second, 0]
            logged[1] += 1
            return logged[1] <= FAILURES_LOGGED_PER_S
        if now - self._logged_at.get(path, -1e9) >= self.log_every_s:
            self._logged_at[path] = now
            return True
        return False


def _plain(status, text):
    return Response((text + "\n").encode("utf-8"), status,
                    [("Cache-Control", "no-store"),
                     ("Content-Type", "text/plain; charset=utf-8")])
