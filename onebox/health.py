"""Health checks on the public port: ``GET /healthz`` (live) and ``GET /readyz`` (ready).

They are answered by the reactor thread itself, the moment their head is in, never by a worker:

* a health check must say when the worker pool is wedged, and a check that waited for a worker
  would only time out (no reason given; a monitor cannot tell a wedge from a network fault);
* they cost a prefix test on each complete head (``bytes.startswith`` with a tuple), and for a
  match one parse of the head: no guard, no routing, no Request object;
* the abuse guard never sees them: a monitor is never limited, banned or counted as a scanner
  (a banned address is still closed at accept, before any request);
* a successful check is access-logged at most once per ``[health] log_every_s`` (a monitor
  polling every few seconds would otherwise be most of the log); a failing one, always.

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


class HealthChecks(object):
    """For the reactor: ``prefixes`` (request-line starts worth a look) and ``answer(head)``."""

    def __init__(self, server, settings):
        self.server = server
        self.live_path, self.ready_path = settings.live_path, settings.ready_path
        self.paths = frozenset((self.live_path, self.ready_path))
        self.log_every_s = settings.log_every_s
        prefixes = []
        for method in (b"GET ", b"HEAD "):
            for path in (self.live_path, self.ready_path):
                for end in (b" ", b"?"):
                    prefixes.append(method + path.encode("ascii") + end)
        self.prefixes = tuple(prefixes)
        self._logged_at = {}   # path -> when a 200 was last logged (the reactor's alone)

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
        """Failures always; a success once per log_every_s per path. (Workers call it too: two
        threads may both log a success in a race, which costs a line.)"""
        if status != 200:
            return True
        now = time.monotonic()
        if now - self._logged_at.get(path, -1e9) >= self.log_every_s:
            self._logged_at[path] = now
            return True
        return False


def _plain(status, text):
    return Response((text + "\n").encode("utf-8"), status,
                    [("Cache-Control", "no-store"),
                     ("Content-Type", "text/plain; charset=utf-8")])
