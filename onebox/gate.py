"""The reactor's door: who gets in, who is cut to make room, and what is answered before any
worker sees a request. A part of ``Reactor`` (onebox/reactor.py), kept apart because it is a
second idea: the reactor's turn moves connections between waits; the gate decides at accept
and at the budgets.

* **Accepting** (``_accept``): the guard's ``admit`` (a banned client is closed unread), then
  the connection caps: at ``max_connections`` room is made first (``_make_room``: the rule and
  its order are onebox/fairness.py's, ``Fairness.room``), else 503; past
  ``max_connections_per_ip``, 503. The admin listener's connections skip the guard and the
  site's caps (``admin_open`` of ``[admin] max_connections``).
* **TLS handshakes** (``_wrap``, ``_handshake``) are driven without blocking (ssl's
  SSLWantRead/WriteError arm the socket for reading or writing), so half a ClientHello holds
  no worker; one that fails (plain HTTP to the HTTPS port) is closed at once. While under
  way, a handshake is charged ``TLS_HANDSHAKE_BYTES`` against the memory budget.
* **The memory budget** (``_keep_to_budget``): past ``max_buffered_bytes`` the waits of the
  clients charged the most are shed (503 and a close; a handshake is closed), one at a time
  from whoever holds the most then, until 7/8 is held (onebox/fairness.py, ``MemoryBudget``).
* **Answered at the door**: refusals (503 at a cap, 400/408/431 before a worker), sheds, and
  health checks (onebox/health.py: answered as soon as their head is in, so that a wedged
  worker pool is reported; a banned client's get 403 first, each one a hit toward
  ``ban_close_after_hits``; a head over ``[health] max_head_bytes`` gets 431). Each is sent
  in one non-blocking send, never waited for, and accounted for by the books
  (onebox/books.py) under the refusals' log-rate rule.

Uses the reactor's fields and its ``_park``, ``_close``, ``_end_wait``, ``_linger``,
``_finish_send`` and ``_unpark``; reactor thread only, like the rest of it. Imports the
standard library, the codec, hand-off and tls modules.
"""
import socket
import ssl
import time

from onebox.codec import error_response, render_head
from onebox.handoff import Connection, Wait
from onebox.tls import TLSSocket

# What a TLS handshake under way costs, as charged against max_buffered_bytes: OpenSSL's
# buffers and the handshake's state (measured: bench/slow_clients.py --scenario
# tls-half-handshakes, and docs/operations.md's "HTTPS").
TLS_HANDSHAKE_BYTES = 64 * 1024


def send_at_once(sock, response):
    """A small error response, in one non-blocking send, with Connection: close. The reactor
    never waits on a client: what the socket buffer does not take is dropped."""
    try:
        sock.send(render_head(response.status, response.headers, len(response.body), False,
                              "HTTP/1.1") + response.body, socket.MSG_DONTWAIT)
    except OSError:
        pass


class Gate:
    """The reactor's accepting, room-making, budget-keeping and door answers (the module
    docstring); a base class of ``Reactor``, with no fields of its own."""

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
            if conn.client is None and not tls:
                conn.https = None   # a trusted proxy's: its X-Forwarded-Proto tells
            if banned:  # banned, and told so ban_close_after_hits times: close without reading
                self.refusals.count("closed_at_accept")   # first: the client sees the close
                sock.close()
            elif self.open >= settings.max_connections and not self._make_room(conn.client):
                self._refuse(conn, "server is at its connection limit", "connection_cap")
            elif (conn.client is not None
                  and self.fair.holds(conn.client) >= settings.max_connections_per_ip):
                self._refuse(conn, "too many connections from your address", "client_cap")
            elif tls:
                if not self._wrap(conn):
                    continue
                self._opened(conn)
                self._park(conn, Wait.HANDSHAKE)   # the client speaks first: its ClientHello
                self.memory.charge(conn, TLS_HANDSHAKE_BYTES, conn.client)
                if self.memory.held > self.memory.limit_bytes:
                    self._keep_to_budget()
            else:
                self._opened(conn)
                self._park(conn, Wait.NEW)

    def _opened(self, conn):
        self.open += 1
        self.fair.opened(conn)

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
            self.refusals.count("closed_tls_handshake")
            self._close(conn)
            return
        self.memory.uncharge(conn)
        self._park(conn, Wait.NEW)
        self.poller.arm(conn)

    def _accept_admin(self, sock, ip):
        """An admin connection: no guard, no site caps (a flood of the site must not lock the
        operator out), only its own cap. Its client key stays None: never counted per client."""
        if self.admin_open >= self.admin_max_connections:
            send_at_once(sock, error_response(None, 503, "too many admin connections",
                                               [("Retry-After", "1")]))
            sock.close()
            self.log_error("admin connection from %s refused: [admin] max_connections (%d) are "
                           "open" % (ip, self.admin_max_connections), level="warning")
            return
        self.admin_open += 1
        self._park(Connection(sock, ip, admin=True), Wait.NEW)

    # -- making room, and keeping to the memory budget (onebox/fairness.py decides) ----------
    def _make_room(self, newcomer):
        """At the global cap: close a connection that costs least to lose, from the client that
        holds the most; False if the newcomer should be refused instead."""
        timers = self.timers
        for conn, counted in self.fair.room(newcomer, timers.first(Wait.LINGER),
                                            timers.first(Wait.IDLE), self.handoff.held):
            if self._evict(conn, counted):
                return True
        return False

    def _evict(self, conn, counted):
        """Close ``conn`` to make room (a request under way is told 503); False if it could not
        be (a worker took its held connection back first)."""
        wait = conn.waiting
        if wait is None:   # kept and held by a worker
            if not self.handoff.held.pop(conn, False):   # atomic: the worker or the reactor
                return False
            self.refusals.count("closed_for_room")
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)   # its worker's poll wakes and closes it
            except OSError:
                pass
            return True
        if counted:
            self.refusals.count("closed_for_room")
        if wait is Wait.SEND:
            self._finish_send(conn, ok=False)
        elif wait is Wait.EVENTS:
            self._cut_stream(conn, "room")
        elif wait in (Wait.HEAD, Wait.LINE, Wait.BODY, Wait.READY):
            self._shed(conn, "server is at its connection limit", "room")
        else:
            self._close(conn)
        return True

    def _keep_to_budget(self):
        """Past max_buffered_bytes: shed the waits MemoryBudget.victims() names (a 503 and a
        close; a TLS handshake is closed)."""
        for victim in self.memory.victims():
            self.refusals.count("closed_memory_budget")
            if victim.waiting is Wait.EVENTS:   # mid-stream: no 503 to send, just the cut
                self._cut_stream(victim, "memory")
            elif victim.waiting is Wait.HANDSHAKE:
                self._close(victim)
            else:
                self._shed(victim, "server is busy: too many uploads at once", "memory")

    def _shed(self, conn, message, why):
        """Answer a request under way 503 (in one send, never waited for) and close now: its
        place or its memory is needed (a refusal, not the client's fault: no strike)."""
        response = error_response(None, 503, message, [("Retry-After", "1")])
        send_at_once(conn.sock, response)
        self._log_refusal(conn.ip, "", 503, len(response.body), "shed=" + why)
        self._close(conn)

    def _refuse(self, conn, message, reason):
        response = error_response(None, 503, message, [("Retry-After", "1")])
        if not conn.tls:   # a TLS client could not read a plain 503: it sees a close
            send_at_once(conn.sock, response)
        conn.sock.close()
        self.refusals.count("refused_" + reason)
        self._log_refusal(conn.ip, "", 503, len(response.body), "refused=" + reason)

    def _log_refusal(self, ip, request_line, status, size, note):
        """Refusals reach the access log under their own rate rule (onebox/books.py)."""
        self.books.refused(ip, request_line, status, size, note)

    # -- answered at the door -----------------------------------------------------------------
    def _answer_health(self, conn):
        """A health check, answered here (see onebox/health.py); False if it is not one."""
        started = time.monotonic()
        buf = conn.buf
        end = buf.find(b"\r\n\r\n")
        if self.guard.refuses_banned(conn.ip, conn.client):   # first: each one is a hit
            response = error_response(None, 403, "forbidden")
            send_at_once(conn.sock, response)
            line = bytes(buf[:min(buf.find(b"\r\n"), 200)]).decode("latin-1")
            self._log_refusal(conn.ip, line, 403, len(response.body), "guard=banned")
            self._linger(conn)
            return True
        if end > self.health.max_head_bytes:   # a monitor sends a few headers (issue 19)
            self._reject(conn, 431, "a health check's head must be small")
            return True
        answer = self.health.answer(bytes(buf[:end]))
        if answer is None:
            return False
        response, line, path, head_only, version = answer
        body = b"" if head_only else response.body
        try:
            conn.sock.send(render_head(response.status, response.headers, len(response.body),
                                       False, version) + body, socket.MSG_DONTWAIT)
        except OSError:
            pass
        record = self.books.open(started, conn.ip, path)   # the path is its own route label
        record.line, record.method, record.path = line, line.partition(" ")[0], path
        record.status, record.sent, record.note = response.status, len(body), "health"
        self.books.finish(record, time.monotonic())
        self._linger(conn)
        return True

    def _reject(self, conn, status, message):
        """Answer a request that never reached a worker, then close."""
        response = error_response(None, status, message)
        send_at_once(conn.sock, response)
        note = None
        if status != 408:   # bytes no parser could take are a strike; slowness is not
            note = self.guard.saw_bad_request(conn.ip, conn.client, status, in_reactor=True)
            # counted as well: a strike is not seen, and a trusted proxy's earn none
            self.refusals.count("refused_bad_request")
        else:
            self.refusals.count("refused_timeout")
        line = bytes(conn.buf[:conn.buf.find(b"\r\n")] if b"\r\n" in conn.buf else b"")
        self._log_refusal(conn.ip, line[:200].decode("latin-1"), status, len(response.body),
                          note)
        self._linger(conn)
