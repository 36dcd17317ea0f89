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

``live_path`` answers 200 "ok" while ``OneboxServer.health()`` is None (the reactor turns, and a
worker took the reactor's latest probe within ``stall_timeout_s``), else 503 with the reason.
``ready_path`` answers 200 "ready" while ``server.phase`` is "serving", else 503 with the phase
(starting, reloading, draining): a load balancer stops sending new clients during a drain.
Both close the connection after the answer (a kept connection's next request would go to a
worker, which is what a wedged pool cannot take). One that reaches a worker all the same (the
next request on a connection a worker holds, or a pipelined one) is answered there the same
way, before the guard, and the connection is kept. The Host header is not checked against
``allowed_hosts``: the answer holds nothing worth a DNS rebinding.

Imports the codec and the contract only; the server is passed in.
"""
import time

from handlers._core import HTTPError, Response
from onebox.codec import parse_head, split_target

FAILURES_LOGGED_PER_S = 10   # failing checks access-logged a second: a flood of them while the
                             # server is unhealthy must not become a flood of log lines


class HealthChecks(object):
    """For the reactor: ``prefixes`` (request-line starts worth a look) and ``answer(head)``."""

    def __init__(self, server, settings):
        self.server = server
        self.live_path, self.ready_path = settings.live_path, settings.ready_path
        self.paths = frozenset((self.live_path, self.ready_path))
        self.log_every_s = settings.log_every_s
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
        """(Response, request line, path, head-only) for a health check's head, else None (the
        request goes to a worker as usual, which also answers a malformed one)."""
        try:
            head = parse_head(head_bytes, self.server.settings)
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
            reason = self.server.health()
            return _plain(200, "ok") if reason is None else _plain(503, reason)
        phase = self.server.phase
        return _plain(200, "ready") if phase == "serving" else _plain(503, phase)

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
