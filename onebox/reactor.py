"""The reactor: the one thread that accepts connections and owns every one that waits.

A connection waits here, never in a worker, for whatever a client can be slow at (issue 12):

  waiting   what for                                    until
  "handshake" a TLS handshake to finish (HTTPS listener) header_timeout_s after accept
  "new"     the first byte of a request                 header_timeout_s after accept (or
                                                        after a TLS handshake)
  "head"    the rest of a request head                  header_timeout_s after its first byte
  "idle"    the next request on a kept connection       keepalive_timeout_s after the response
  "linger"  nothing: input is read and dropped          LINGER_S, after a refusal (RFC 9112 9.6)
  "body"    a request's body, buffered here             the body pace (min_body_rate_bytes_s)
  "send"    a slow reader to take a response's rest     the response pace
  "line"    its turn for a body or send wait            the client's earlier waits to end
  "ready"   a worker its client may take                the client's other requests to finish

The first five have one timeout each, so their tables (insertion-ordered dicts) are in deadline
order and expiring costs nothing per waiting connection. Body and send deadlines move with
progress; they live in a heap checked lazily (an entry whose connection has moved its
deadline is pushed again when it comes up).

Fairness, per client as the guard counts clients (an IPv4 address, an IPv6 /64; a trusted
proxy's connections are not counted at accept, but its requests' waits are, by the client
each names): at most ``max_workers_per_client`` of a client's requests are in workers at once,
and at most ``max_waiting_per_client`` of its bodies and responses wait here at once; the rest
wait in line behind them, so one client's slowness costs others nothing.

At ``max_connections``, room is made before anyone is refused: (1) a connection already
answered and lingering to close is closed, else (2) the longest-idle kept connection (one
parked here, else one a worker holds), else (3) the oldest connection still without a whole
request from the client that holds the most connections: one without a whole head, else one
whose body waits in line unread (past ``max_waiting_per_client``; it has no deadline of its
own, so a few addresses' slow bodies could otherwise fill the cap), unless the newcomer is that
client (or one as large): then the newcomer gets 503. Busy connections, and bodies and
responses on their way, are never shed for a newcomer: they are bounded by the paces instead.

The admin listener's connections (``Connection.admin``, onebox/admin.py) are accepted and wait
here like the site's, but skip the guard and the site's connection caps: ``admin_open`` counts
them against ``[admin] max_connections``. Health checks on the public port (onebox/health.py)
are answered here as soon as their head is in, so that a wedged worker pool is reported.

The HTTPS listener's connections (``Connection.tls``) are wrapped at accept, after the same
guard and caps as the plain listener's, and wait in "handshake" while the reactor drives the
handshake without blocking (ssl's SSLWantRead/WriteError arm the socket for reading or writing),
so half a ClientHello holds no worker; a handshake that fails (plain HTTP to the HTTPS port) is
closed at once. After it the connection is served as any other: its socket is an
``onebox.tls.TLSSocket``, which behaves as a plain one does for the code here and in the workers.

Every field here is the reactor thread's alone, and nothing in this module takes a lock.
Imports the standard library, the codec, transfer, tls and hand-off modules; never the engine or
``server``.
"""
import collections
import heapq
import socket
import ssl
import struct
import time
import traceback

from onebox.codec import error_response, head_problem, render_head
from onebox.handoff import ARMED, BODY, CLOSE, GONE, PROBE, SEND, Connection
from onebox.tls import TLSSocket
from onebox.transfer import ClientGone, Pace

# A report can reach the reactor between a worker's re-arm and its booking (Workers._hand_back);
# the worker does not wake the reactor for the booking, so the reactor polls this briefly until
# it comes (it used to sleep out its timer: up to a second for that request).
EARLY_BOOKING_POLL_S = 0.001
PROBE_INTERVAL_S = 1.0         # how often the reactor checks that a worker can take a job
LINGER_S = 2.0                 # after a close with unread input, read and drop it this long
REFUSALS_LOGGED_PER_S = 20     # refusals at accept or before a worker, logged a second; the
                               # rest are counted and summed up in one error-log line
_FIXED_KINDS = ("handshake", "new", "head", "idle", "linger")


def _send_at_once(sock, response):
    """A small error response, in one non-blocking send, with Connection: close. The reactor
    never waits on a client: what the socket buffer does not take is dropped."""
    try:
        sock.send(render_head(response.status, response.headers, len(response.body), False,
                              "HTTP/1.1") + response.body, socket.MSG_DONTWAIT)
    except OSError:
        pass


class Reactor:
    """For the server: ``step()`` (one turn: expire, poll, act); at shutdown ``drain(deadline)``
    and ``after_workers()``. Built by the server with what it needs."""

    def __init__(self, listener, settings, handoff, poller, guard, access_log, log_error,
                 admin_listener=None, admin_max_connections=64):
        self.listener = listener
        # The admin listener's connections (onebox/admin.py) skip the guard and the site's
        # connection caps, and are counted apart: admin_open of at most admin_max_connections.
        self.admin_listener = admin_listener
        self.admin_max_connections = admin_max_connections
        self.admin_open = 0
        # The HTTPS listener and the SSLContext new connections are wrapped with (the engine
        # sets them; a reload replaces the context: connections keep the one they began with).
        self.tls_listener = None
        self.tls_context = None
        self.health = None    # HealthChecks (onebox/health.py): answered here, never by a worker
        self.tally = None     # Tally (onebox/tally.py): responses finished here are counted
        self.handoff = handoff
        self.poller = poller
        self.guard = guard
        self.access_log = access_log
        self.log_error = log_error
        self.use_settings(settings)
        self.parked = {kind: collections.OrderedDict() for kind in _FIXED_KINDS}
        self.timed = []          # heap of (deadline, sequence, conn): body and send waits
        self._sequence = 0
        self.busy = set()        # in workers (queued, served or held)
        self.reported_early = 0  # connections reported between their re-arm and booking
        self.open = 0
        self.per_client = {}     # client key -> open connections (None: trusted proxies)
        self.in_workers = {}     # client key -> its connections in workers
        self.ready_line = {}     # client key -> deque of connections waiting for a worker
        self.waits = {}          # client key -> its active body and send waits
        self.wait_line = {}      # client key -> deque of connections waiting to start one
        self._refusals = [0, 0, 0]   # [second, logged in it, not logged]

    def use_settings(self, settings):
        """[server] settings for what starts from now on (at start, and on a reload, in this
        thread); waits already timed keep their deadlines. Raises before changing anything."""
        seconds = int(settings.worker_write_s)
        send_timeval = struct.pack(   # a struct timeval, for SO_SNDTIMEO at each accept
            "ll", seconds, int((settings.worker_write_s - seconds) * 1e6))
        self.body_pace = Pace.for_bodies(settings)
        self.send_pace = Pace.for_responses(settings)
        self.send_timeval = send_timeval
        self.settings = settings

    # -- one turn ---------------------------------------------------------------------------
    def step(self):
        handoff = self.handoff
        # (while stopping, held connections must come back to be closed: the flag stays up)
        if handoff.workers_wanted and handoff.work.qsize() < len(handoff.idle) \
                and not self.ready_line and not handoff.stopping:
            handoff.want_workers(False)
        now = handoff.turned_at = time.monotonic()
        if handoff.probe_taken_at >= handoff.probe_sent_at \
                and now - handoff.probe_sent_at >= PROBE_INTERVAL_S:
            self._probe_workers(now)
        handoff.wakes_at = wakes_at = self._expire(now)   # workers read it: see Workers
        # handed back before wakes_at was set: their deadlines are not counted, so no sleep;
        # a connection reported early is booked within moments (its worker does not wake us)
        if handoff.returned or (handoff.stopping and not self.open + self.admin_open):
            timeout = 0   # (a drain whose last connection just expired ends now, not in 1 s)
        elif self.reported_early:
            timeout = EARLY_BOOKING_POLL_S
        else:
            timeout = max(0.0, wakes_at - now)
        ready = self.poller.poll(timeout)
        if handoff.returned:
            self._book_returned()   # first: a connection a worker re-armed may be among ready
        for owner in ready:
            if owner == "listener":
                self._accept()
            elif owner == "admin-listener":
                self._accept(admin=True)
            elif owner == "tls-listener":
                self._accept(tls=True)
            elif owner == "wakeup":
                handoff.take_wakeups()
                self._book_returned()
            else:
                try:
                    self._on_ready(owner)
                except Exception:   # one connection's bug must not stop the reactor
                    self.log_error("reactor error", traceback.format_exc())
                    self._close(owner)

    def _probe_workers(self, now):
        """Prove that a worker can take a job: at once if one waits idle with nothing queued,
        else by a PROBE on the queue (held connections are let go, as for any job)."""
        handoff = self.handoff
        handoff.probe_sent_at = now
        if handoff.idle and not handoff.work.qsize():
            handoff.probe_taken_at = now
            return
        handoff.work.put(PROBE)
        if not handoff.workers_wanted:
            handoff.want_workers(True)

    def _on_ready(self, conn):
        kind = conn.waiting
        if kind is None:
            # re-armed by its worker, not booked yet: the booking will act on it
            conn.early_report = True
            self.reported_early += 1
            return
        if kind in ("line", "ready"):
            return   # not armed: a stale report
        if kind == "idle":
            # the next request on a kept connection: a worker reads it (see Workers), so the
            # reactor makes no recv and the head is checked once, not twice
            self._unpark(conn)
            self._queue_work(conn)
        elif kind == "send":
            self._send_more(conn)
        elif kind == "body":
            self._read_body(conn)
        elif kind == "handshake":
            self._handshake(conn)
        else:
            self._read_head(conn)
            if conn.waiting in _FIXED_KINDS:
                self.poller.arm(conn)  # still waiting: report it again (one-shot)

    # -- accepting --------------------------------------------------------------------------
    def _accept(self, admin=False, tls=False):
        settings = self.settings
        listener = self.admin_listener if admin else (self.tls_listener if tls else self.listener)
        for _ in range(64):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # EMFILE and friends: keep serving who we have
                self.log_error("accept failed: %s" % error)
                return
            # blocking (BSDs pass the listener's O_NONBLOCK on), each send bounded by
            # SO_SNDTIMEO = worker_write_s: see onebox/transfer.py
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self.send_timeval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if admin:
                self._accept_admin(sock, address[0])
                continue
            conn = Connection(sock, address[0], tls=tls)   # sock is wrapped once admitted
            # the guard's client key (an IPv6 /64 is one client; None: a trusted proxy, uncapped)
            conn.client, banned = self.guard.admit(conn.ip)
            if banned:  # banned, and told so ban_close_after_hits times: close without reading
                sock.close()
            elif self.open >= settings.max_connections and not self._make_room(conn.client):
                self._refuse(conn, "server is at its connection limit", "connection_cap")
            elif (conn.client is not None
                  and self.per_client.get(conn.client, 0) >= settings.max_connections_per_ip):
                self._refuse(conn, "too many connections from your address", "client_cap")
            elif tls:
                if not self._wrap(conn):
                    continue
                self.open += 1
                self.per_client[conn.client] = self.per_client.get(conn.client, 0) + 1
                self._park(conn, "handshake")   # the client speaks first: its ClientHello
            else:
                self.open += 1
                self.per_client[conn.client] = self.per_client.get(conn.client, 0) + 1
                self._park(conn, "new")

    def _wrap(self, conn):
        """Make ``conn`` a TLS connection whose handshake the reactor drives (see _handshake);
        False (closed) if it cannot be."""
        sock = conn.sock
        sock.setblocking(False)   # the SSLSocket never blocks: TLSSocket emulates blocking sends
        try:
            wrapped = self.tls_context.wrap_socket(sock, server_side=True,
                                                   do_handshake_on_connect=False)
        except (OSError, ValueError):
            sock.close()
            return False
        conn.sock = TLSSocket(wrapped, self.settings.worker_write_s)
        conn.tls = True
        return True

    def _handshake(self, conn):
        """One step of a TLS handshake, as far as the client's bytes go; then wait for them
        (or for room to send ours). Done: the connection waits for its first request, with a
        fresh header_timeout_s. Failed (not TLS at all, no common protocol or cipher): closed
        at once, with nothing sent: a plain-HTTP client sees the connection close."""
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.poller.arm(conn)
            return
        except ssl.SSLWantWriteError:
            self.poller.arm(conn, write=True)
            return
        except (ssl.SSLError, OSError, ValueError):
            self.guard.count("closed_tls_handshake")
            self._close(conn)
            return
        self._park(conn, "new")
        self.poller.arm(conn)

    def _accept_admin(self, sock, ip):
        """An admin connection: no guard, no site caps (a flood of the site must not lock the
        operator out), only its own cap. Its client key stays None: never counted per client."""
        if self.admin_open >= self.admin_max_connections:
            _send_at_once(sock, error_response(None, 503, "too many admin connections",
                                               [("Retry-After", "1")]))
            sock.close()
            self.log_error("admin connection from %s refused: [admin] max_connections (%d) are "
                           "open" % (ip, self.admin_max_connections), level="warning")
            return
        self.admin_open += 1
        self._park(Connection(sock, ip, admin=True), "new")

    def _make_room(self, newcomer):
        """At the global cap: close a connection that costs least to lose (the module
        docstring gives the order); False if the newcomer should be refused instead."""
        for kind in ("linger", "idle"):
            parked = self.parked[kind]
            if parked:
                self._close(next(iter(parked)))
                return True
        held = self.handoff.held
        for conn in sorted(list(held), key=lambda kept: kept.idle_since):
            if held.pop(conn, False):   # atomic: the worker or the reactor gets it
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)   # its worker's poll wakes
                except OSError:
                    pass
                return True
        counts = [(count, key) for key, count in self.per_client.items() if key is not None]
        if not counts:
            return False
        most, largest = max(counts)
        if newcomer is not None and self.per_client.get(newcomer, 0) + 1 >= most:
            return False   # the newcomer is (as large as) the largest: it is the one refused
        for kind in ("handshake", "new", "head"):
            for conn in self.parked[kind]:
                if conn.client == largest:
                    self._close(conn)
                    return True
        for conn, kind in self.wait_line.get(largest, ()):
            if kind == "body" and conn.client == largest:   # unread: nothing is lost
                self._close(conn)
                return True
        return False

    def _refuse(self, conn, message, reason):
        response = error_response(None, 503, message, [("Retry-After", "1")])
        if not conn.tls:   # a TLS client could not read a plain 503: it sees a close
            _send_at_once(conn.sock, response)
        conn.sock.close()
        self.guard.count("refused_" + reason)
        self._log_refusal(conn.ip, "", 503, len(response.body), "refused=" + reason)

    def _log_refusal(self, ip, request_line, status, size, note):
        """Refusals reach the access log, at most REFUSALS_LOGGED_PER_S a second: a flood of
        them must not become a flood of log lines."""
        if not self.access_log:
            return
        self._sum_up_refusals(time.monotonic())
        sample = self._refusals
        if sample[1] >= REFUSALS_LOGGED_PER_S:
            sample[2] += 1
            return
        sample[1] += 1
        self.access_log.log(ip, request_line, status, size, "", "", 0.0, note)

    def _sum_up_refusals(self, now):
        """A new second: say how many refusals went unlogged in the last."""
        sample = self._refusals
        if sample[0] != int(now):
            if sample[2]:
                self.log_error("%d more refusals not logged in the last second (the access log "
                               "takes %d a second)" % (sample[2], REFUSALS_LOGGED_PER_S),
                               level="warning")
            sample[:] = [int(now), 0, 0]

    # -- heads ------------------------------------------------------------------------------
    def _read_head(self, conn):
        data = conn.recv_ready()
        if data is None:
            return
        if not data:
            self._close(conn)
            return
        if conn.waiting == "linger":
            return
        if conn.waiting != "head":
            self._park(conn, "head")  # the head deadline starts with the head's first byte
        conn.buf += data
        self._check_head(conn)

    def _check_head(self, conn):
        """Dispatch the connection if its buffer holds a whole head; reject early what cannot
        become a valid one (the codec's ``head_problem``)."""
        buf = conn.buf
        if buf[:1] in (b"\r", b"\n"):
            # RFC 9112 section 2.2: ignore empty lines before a request-line
            del buf[:len(buf) - len(buf.lstrip(b"\r\n"))]
            if not buf:
                return
        problem = head_problem(buf, self.settings)
        if problem is not None:
            self._reject(conn, *problem)
        elif buf.find(b"\r\n\r\n") >= 0:
            if (self.health is not None and buf.startswith(self.health.prefixes)
                    and not conn.admin and self._answer_health(conn)):
                return
            self._unpark(conn)
            self._queue_work(conn)

    def _answer_health(self, conn):
        """A health check, answered here (see onebox/health.py); False if it is not one."""
        started = time.monotonic()
        buf = conn.buf
        answer = self.health.answer(bytes(buf[:buf.find(b"\r\n\r\n")]))
        if answer is None:
            return False
        response, line, path, head_only, version = answer
        body = b"" if head_only else response.body
        try:
            conn.sock.send(render_head(response.status, response.headers, len(response.body),
                                       False, version) + body, socket.MSG_DONTWAIT)
        except OSError:
            pass
        finished = time.monotonic()
        if self.tally is not None:   # the health path is its own route label
            self.tally.add(started, finished, response.status, line.partition(" ")[0], path,
                           conn.ip, path, len(body))
        if self.access_log and self.health.should_log(path, response.status):
            self.access_log.log(conn.ip, line, response.status, len(body), "", "",
                                finished - started, "health")
        self._linger(conn)
        return True

    def _reject(self, conn, status, message):
        """Answer a request that never reached a worker, then close."""
        response = error_response(None, status, message)
        _send_at_once(conn.sock, response)
        note = None
        if status != 408:   # bytes no parser could take are a strike; slowness is not
            note = self.guard.saw_bad_request(conn.ip, conn.client, status, in_reactor=True)
            # counted as well: a strike is not seen, and a trusted proxy's earn none
            self.guard.count("refused_bad_request")
        else:
            self.guard.count("refused_timeout")
        line = bytes(conn.buf[:conn.buf.find(b"\r\n")] if b"\r\n" in conn.buf else b"")
        self._log_refusal(conn.ip, line[:200].decode("latin-1"), status, len(response.body),
                          note)
        self._linger(conn)

    # -- bodies and slow readers --------------------------------------------------------------
    def _read_body(self, conn):
        data = conn.recv_ready()
        if data is None:
            self.poller.arm(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.buf += data
        conn.progress += len(data)
        conn.deadline = self.body_pace.deadline(conn.started_wait, conn.progress,
                                                time.monotonic())
        exchange = conn.pending
        if exchange.scan is None:
            done = len(conn.buf) >= exchange.head.content_length
        else:
            done = exchange.scan.feed(conn.buf)
        if done:
            self._end_wait(conn)
            self._queue_work(conn)
        else:
            self.poller.arm(conn)

    def _send_more(self, conn):
        outbox = conn.outbox
        sent_before = outbox.size()
        try:
            done = outbox.send_more(conn.sock)
        except ClientGone:
            self._finish_send(conn, ok=False)
            return
        conn.progress += sent_before - outbox.size()
        if done and outbox.stream is not None:
            # all a streamed body's generator produced is sent: a worker runs it on
            self._end_wait(conn)
            conn.sock.setblocking(True)   # the workers' mode (see onebox/transfer.py)
            self._queue_work(conn)
            return
        if done:
            self._finish_send(conn, ok=True)
            return
        conn.deadline = self.send_pace.deadline(conn.started_wait, conn.progress,
                                                time.monotonic())
        self.poller.arm(conn, write=True)

    def _finish_send(self, conn, ok):
        outbox, conn.outbox = conn.outbox, None
        outbox.close()
        finished = time.monotonic()
        if self.tally is not None and outbox.tally is not None:
            started, status, method, route, client, path = outbox.tally
            self.tally.add(started, finished, status, method, route, client, path,
                           outbox.body_sent)
        if self.access_log and outbox.log is not None:
            ip, line, status, referer, agent, started, note = outbox.log
            self.access_log.log(ip, line, status, outbox.body_sent, referer, agent,
                                finished - started, note if ok else
                                ((note + " " if note else "") + "send=cut"))
        self._end_wait(conn)
        if not ok:
            self._close(conn)
            return
        if not outbox.keep_alive:
            self._linger(conn)
            return
        conn.sock.setblocking(True)   # back to the workers' mode (see onebox/transfer.py)
        conn.idle_since = time.monotonic()
        self._park(conn, "head" if conn.buf else "idle")
        if conn.buf:
            self._check_head(conn)

    def _start_wait(self, conn, kind):
        """A body or send wait, if the client has a free place; else in line behind its own."""
        key = conn.wait_key
        if key is not None and self.waits.get(key, 0) >= self.settings.max_waiting_per_client:
            conn.waiting = "line"
            self.wait_line.setdefault(key, collections.deque()).append((conn, kind))
            return
        if key is not None:
            self.waits[key] = self.waits.get(key, 0) + 1
        conn.waiting = kind
        conn.started_wait = time.monotonic()
        conn.progress = 0
        pace = self.body_pace if kind == "body" else self.send_pace
        conn.deadline = pace.deadline(conn.started_wait, 0, conn.started_wait)
        self._sequence += 1
        heapq.heappush(self.timed, (conn.deadline, self._sequence, conn))
        if kind == "send":
            self._send_more(conn)
        else:
            self.poller.arm(conn)

    def _end_wait(self, conn):
        """The body or send wait of ``conn`` is over: its client's next in line may start."""
        kind, conn.waiting = conn.waiting, None
        key = conn.wait_key
        if kind == "line":
            queued = self.wait_line.get(key)
            if queued:
                for index, (waiting, _) in enumerate(queued):
                    if waiting is conn:
                        del queued[index]
                        break
                if not queued:
                    del self.wait_line[key]
            return
        if key is None:
            return
        count = self.waits.get(key, 1) - 1
        if count:
            self.waits[key] = count
        else:
            self.waits.pop(key, None)
        queued = self.wait_line.get(key)
        if queued:
            following, kind = queued.popleft()
            if not queued:
                del self.wait_line[key]
            self._start_wait(following, kind)

    # -- to and from the workers --------------------------------------------------------------
    def _queue_work(self, conn):
        """Give a connection with a whole request (or body) to a worker, unless its client has
        max_workers_per_client in workers already: then it waits its turn."""
        key = conn.client
        if key is not None and self.in_workers.get(key, 0) >= self.settings.max_workers_per_client:
            conn.waiting = "ready"
            self.ready_line.setdefault(key, collections.deque()).append(conn)
            self.handoff.clients_in_line = True
            self.handoff.want_workers(True)   # its held connections, if any, come back
            return
        if key is not None:
            self.in_workers[key] = self.in_workers.get(key, 0) + 1
        conn.waiting = None
        self.busy.add(conn)
        handoff = self.handoff
        handoff.work.put(conn)
        if not handoff.workers_wanted and handoff.work.qsize() > len(handoff.idle):
            handoff.want_workers(True)

    def _left_workers(self, conn):
        self.busy.discard(conn)
        key = conn.client
        if key not in self.in_workers:   # a trusted proxy (None) is never counted
            return
        count = self.in_workers[key] - 1
        if count:
            self.in_workers[key] = count
        else:
            del self.in_workers[key]
        queued = self.ready_line.get(key)
        if queued:
            following = queued.popleft()
            if not queued:
                del self.ready_line[key]
                self.handoff.clients_in_line = bool(self.ready_line)
            self._queue_work(following)

    def _book_returned(self):
        returned = self.handoff.returned
        while returned:
            conn, outcome = returned.popleft()
            reported_early, conn.early_report = conn.early_report, False
            self.reported_early -= reported_early
            self._left_workers(conn)
            # While stopping, too: a drain serves the connections that are open (see
            # OneboxServer._serve_out); its last step closes whatever still waits.
            if outcome is ARMED and reported_early:
                self._queue_work(conn)   # its next request came before this booking
            elif outcome is ARMED:
                # re-armed by its worker; its idle time began at its last response
                conn.waiting = "idle"
                self.parked["idle"][conn] = max(
                    conn.idle_since + self.settings.keepalive_timeout_s, time.monotonic())
            elif outcome is CLOSE:
                self._linger(conn)
            elif outcome is GONE:
                self._close(conn)
            elif outcome is BODY:
                self._start_wait(conn, "body")
            elif outcome is SEND:
                conn.sock.setblocking(False)   # finished here without a wait in the kernel
                self._start_wait(conn, "send")
            elif conn.buf:
                self._park(conn, "head")
                self._check_head(conn)
            else:   # kept: its idle time began at its last response, not now (see ARMED)
                self._park(conn, "idle", conn.idle_since + self.settings.keepalive_timeout_s)

    # -- parking, expiring, closing -------------------------------------------------------------
    def _timeout_for(self, kind):
        settings = self.settings
        if kind == "idle":
            return settings.keepalive_timeout_s
        if kind == "linger":
            return LINGER_S
        return settings.header_timeout_s

    def _park(self, conn, kind, deadline=None):
        """Wait for input with one of the fixed timeouts (deadline order = insertion order; a
        kept connection a worker held comes with an earlier ``deadline``, which keeps the order
        only roughly: it may outstay its idle time by as long as it was held)."""
        first = conn.waiting not in _FIXED_KINDS
        if not first:
            del self.parked[conn.waiting][conn]
        conn.waiting = kind
        now = time.monotonic()
        self.parked[kind][conn] = now + self._timeout_for(kind) if deadline is None \
            else max(deadline, now)
        if first:
            self.poller.arm(conn)

    def _unpark(self, conn):
        del self.parked[conn.waiting][conn]
        conn.waiting = None
        self.poller.disarm(conn)

    def _expire(self, now):
        """End the waits that are over; return when the next one is (within a second)."""
        soonest = now + 1.0
        if self._refusals[2]:
            self._sum_up_refusals(now)
        for kind, parked in self.parked.items():
            while parked:
                conn, deadline = next(iter(parked.items()))
                if deadline > now:
                    soonest = min(soonest, deadline)
                    break
                if kind == "head":
                    self._reject(conn, 408, "request head not received in time")
                else:
                    self._close(conn)
        timed = self.timed
        while timed:
            deadline, _, conn = timed[0]
            if conn.waiting not in ("body", "send"):
                heapq.heappop(timed)                 # ended: a stale entry
            elif conn.deadline > deadline:           # progress moved it: look again later
                self._sequence += 1
                heapq.heapreplace(timed, (conn.deadline, self._sequence, conn))
            elif deadline > now:
                soonest = min(soonest, deadline)
                break
            else:
                heapq.heappop(timed)
                self._too_slow(conn)
        return soonest

    def _too_slow(self, conn):
        if conn.waiting == "body":
            self.guard.count("refused_slow_body")
            self._end_wait(conn)
            self._reject(conn, 408, "request body not received in time")
        else:
            self.guard.count("closed_slow_reader")
            self._finish_send(conn, ok=False)

    def _linger(self, conn):
        """Close for writing, then read and drop input for a while before closing: closing a
        socket with unread input sends RST, which can destroy the response before the client
        reads it (RFC 9112 section 9.6)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.buf = bytearray()
        conn.sock.setblocking(True)   # a send wait's socket was non-blocking; reads pass DONTWAIT
        self._park(conn, "linger")

    def _close(self, conn):
        if conn.sock.fileno() < 0:
            return   # closed already (a connection handed back twice after a failure)
        kind = conn.waiting
        if conn.outbox is not None:
            conn.outbox.close()
            conn.outbox = None
        if kind in _FIXED_KINDS:
            self._unpark(conn)
        elif kind in ("body", "send", "line"):
            self._end_wait(conn)
        elif kind == "ready":
            queued = self.ready_line.get(conn.client)
            if queued and conn in queued:
                queued.remove(conn)
                if not queued:
                    del self.ready_line[conn.client]
                    self.handoff.clients_in_line = bool(self.ready_line)
        conn.waiting = None
        self.busy.discard(conn)
        self.poller.forget(conn.sock)
        conn.sock.close()
        if conn.admin:
            self.admin_open -= 1
            return
        self.open -= 1
        count = self.per_client[conn.client] - 1
        if count:
            self.per_client[conn.client] = count
        else:
            del self.per_client[conn.client]

    # -- shutdown ------------------------------------------------------------------------------
    def close_waiting(self):
        """Close every connection that waits here, answered or not (shutdown)."""
        for parked in self.parked.values():
            for conn in list(parked):
                self._close(conn)
        for queued in list(self.ready_line.values()) + list(self.wait_line.values()):
            for item in list(queued):
                self._close(item if isinstance(item, Connection) else item[0])
        for _, _, conn in list(self.timed):
            if conn.waiting in ("body", "send"):
                self._close(conn)
        self.timed = []

    def drain(self, deadline):
        """Shutdown: busy connections have until ``deadline`` to finish; then their sockets are
        shut down, which unblocks their workers."""
        self.handoff.want_workers(True)   # workers holding idle connections let go
        self.close_waiting()
        while self.busy and time.monotonic() < deadline:
            self.poller.poll(min(0.05, max(0.0, deadline - time.monotonic())))
            self.handoff.take_wakeups()
            self._book_returned()
            self.close_waiting()
        for conn in list(self.busy):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def after_workers(self):
        """Once the workers have stopped: close what they handed back (or never took)."""
        returned = self.handoff.returned
        while returned:
            conn, _ = returned.popleft()
            if conn in self.busy:
                self.busy.discard(conn)
                self._close_quietly(conn)

    def _close_quietly(self, conn):
        try:
            conn.sock.close()
        except OSError:
            pass
