"""The connection engine: the reactor thread, the worker pool and the server object.

How a connection is served, and why: see ``server.py``'s docstring. This module holds the
machinery: ``Connection`` (one client socket and its buffer), ``_Reactor`` (accepting and every
connection that waits, through ``onebox/poller.py``), ``_Workers`` (serving a request) and
``OneboxServer``, which composes them with the stdlib ``ThreadingHTTPServer`` for the listening
socket's life cycle. The next issue rebuilds this module; it moved here as it was.

Imports the other runtime modules and the handler contract; never ``server``.
"""
import collections
import http.server
import os
import queue
import select
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback

from handlers import _context
from handlers._cache import ResponseCache
from handlers._core import HTTPError, Headers, Request, Response, to_response
from handlers._limits import LimiterRegistry
from handlers._state import StateError
from onebox.codec import (MSG_DONTWAIT, ChunkedBody, ClientGone, LengthBody, StreamFailed,
                          check_response, decode_path, error_response, head_problem,
                          parse_head, render_head, split_target, write_response)
from onebox.guard import Guard
from onebox.logs import AccessLog, error_entry
from onebox.poller import Poller
from onebox.routing import METHODS, NotRouted
from onebox.settings import host_allowed
from onebox.static import STATIC_METHODS, StaticPages


def _is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


# --- connections ------------------------------------------------------------------------------
# A Connection is owned by exactly one thread at a time: the reactor while it waits (parked in
# the selector), a worker while a request is served (or while it holds the connection for the
# next one, see _Workers._hold). Hand-over goes through queues, so the connection itself needs
# no lock.
#
# Its socket is in blocking mode with SO_SNDTIMEO = write_timeout_s: a send (or sendfile) waits
# in the kernel for buffer room, and fails with EAGAIN if the client takes nothing for that
# long. Every read passes MSG_DONTWAIT (and waits in poll, under its own deadline), so no
# thread ever blocks on a client's silence, and no request pays for switching modes.

WORKER_JOIN_S = 5.0       # after the drain, how long a stuck handler may delay exit
LINGER_S = 2.0            # after a close with unread input, read and drop it this long
MAX_REQUESTS_PER_TURN = 32  # pipelined requests a worker serves before giving others a turn


class Connection:
    """One client connection. Owned by one thread at a time (see above), which alone writes
    its fields; hand-over through the work queue and ``_returned`` orders the writes."""

    __slots__ = ("sock", "ip", "buf", "waiting", "client", "idle_since")

    def __init__(self, sock, ip):
        self.sock = sock
        self.ip = ip
        self.client = None    # the guard's client key (set at accept); None for a trusted proxy
        self.buf = bytearray()
        self.waiting = None   # "new", "head", "idle" or "linger" while parked; None when busy
        self.idle_since = 0.0     # when its last response was sent: idle deadlines count from it

    def recv_ready(self):
        """What the socket holds now: bytes; b"" if the client closed (or the connection
        broke); None if nothing yet (a report that was spurious)."""
        try:
            return self.sock.recv(65536, MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""


# --- reactor: accepting, and connections that wait --------------------------------------------
# Runs in the thread that called serve_forever. It owns the listening socket and every waiting
# connection (parked in the selector), and the tables below; nothing else touches them, so none
# of them has a lock. Workers hand connections back through ``_returned``, and wake the reactor
# through a socket when it must act at once (see _Workers._hand_back).

def _send_at_once(sock, response):
    """A small error response, in one non-blocking send, with Connection: close. The reactor
    never waits on a client: what the socket buffer does not take is dropped."""
    try:
        sock.send(render_head(response.status, response.headers, len(response.body), False,
                              "HTTP/1.1") + response.body, MSG_DONTWAIT)
    except OSError:
        pass


class _Reactor:
    """The reactor half of OneboxServer (a mixin: its state is made in OneboxServer.__init__)."""

    def _reactor_step(self):
        if self._workers_wanted and self._work.qsize() < len(self._idle_workers):
            self._want_workers(False)
        now = time.monotonic()
        self._wakes_at = wakes_at = self._expire(now)   # workers read it: see _hand_back
        # handed back before _wakes_at was set: their deadlines are not counted, so no sleep
        timeout = 0 if self._returned else wakes_at - now
        ready = self._poller.poll(timeout)
        if self._returned:
            self._book_returned()   # first: a connection a worker re-armed may be among ready
        for owner in ready:
            if owner == "listener":
                self._accept()
            elif owner == "wakeup":
                self._take_returned()
            else:
                self._on_readable(owner)

    def _timeout_for(self, kind):
        settings = self.settings
        if kind == "idle":
            return settings.keepalive_timeout_s
        if kind == "linger":
            return LINGER_S
        return settings.header_timeout_s

    def _park(self, conn, kind):
        """Wait for input; each kind's deadlines are in insertion order, so the oldest is
        always first and expiring costs nothing per idle connection."""
        first = conn.waiting is None
        if not first:
            del self._parked[conn.waiting][conn]
        conn.waiting = kind
        self._parked[kind][conn] = time.monotonic() + self._timeout_for(kind)
        if first:
            self._poller.arm(conn)

    def _unpark(self, conn):
        del self._parked[conn.waiting][conn]
        conn.waiting = None
        self._poller.disarm(conn)

    def _expire(self, now):
        """End the waits that are over; return when the next one is (within a second)."""
        soonest = now + 1.0
        for kind, parked in self._parked.items():
            while parked:
                conn, deadline = next(iter(parked.items()))
                if deadline > now:
                    if deadline < soonest:
                        soonest = deadline
                    break
                if kind == "head":
                    self._reject(conn, 408, "request head not received in time")
                else:
                    self._close(conn)
        return soonest

    def _accept(self):
        settings = self.settings
        for _ in range(64):
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # EMFILE and friends: keep serving who we have
                self.log_error("accept failed: %s" % error)
                return
            # blocking (BSDs pass the listener's O_NONBLOCK on), each send bounded by
            # SO_SNDTIMEO: see the connections section
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._send_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, address[0])
            # the guard's client key (an IPv6 /64 is one client; None: a trusted proxy, uncapped)
            conn.client, banned = self.guard.admit(conn.ip)
            if banned:  # banned, and told so ban_close_after_hits times: close without reading
                sock.close()
            elif self._open >= settings.max_connections and not self._evict_idle():
                self._refuse(conn, "server is at its connection limit")
            elif (conn.client is not None
                  and self._per_ip.get(conn.client, 0) >= settings.max_connections_per_ip):
                self._refuse(conn, "too many connections from your address")
            else:
                self._open += 1
                self._per_ip[conn.client] = self._per_ip.get(conn.client, 0) + 1
                self._park(conn, "new")

    def _evict_idle(self):
        """Make room by closing the longest-idle keep-alive connection, as nginx does: one
        parked here, else one a worker holds (see _Workers._hold). A held one is claimed from
        ``_held`` (dict.pop is atomic: the worker or the reactor gets it, never both) and shut
        down; its worker hands it back closed, so the count exceeds the cap until then."""
        idle = self._parked["idle"]
        if idle:
            self._close(next(iter(idle)))
            return True
        for conn in sorted(list(self._held), key=lambda held: held.idle_since):
            if self._held.pop(conn, False):
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)   # its worker's poll wakes
                except OSError:
                    pass
                return True
        return False

    def _refuse(self, conn, message):
        _send_at_once(conn.sock, error_response(None, 503, message, [("Retry-After", "1")]))
        conn.sock.close()

    def _on_readable(self, conn):
        if conn.waiting is None:
            return  # a stale report for a connection already handed on
        if conn.waiting == "idle":
            # the next request on a kept connection: a worker reads it (see _serve_connection),
            # so the reactor makes no recv and the head is checked once, not twice
            self._unpark(conn)
            self._queue_work(conn)
            return
        self._read_waiting(conn)
        if conn.waiting is not None:
            self._poller.arm(conn)  # still waiting: report it again (EPOLLONESHOT disarmed it)

    def _read_waiting(self, conn):
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
            self._unpark(conn)
            self._queue_work(conn)

    def _queue_work(self, conn):
        self._busy.add(conn)
        self._work.put(conn)
        if not self._workers_wanted and self._work.qsize() > len(self._idle_workers):
            self._want_workers(True)

    def _want_workers(self, wanted):
        """Raise or lower the flag that sends workers holding idle connections back (see
        _Workers._hold): raised while connections wait in the queue for a worker, lowered once
        a worker waits for them instead."""
        self._workers_wanted = wanted
        if wanted:
            try:
                os.write(self._release_send, b"\0")
            except BlockingIOError:
                pass   # full: it is readable already
        else:
            try:
                while os.read(self._release_recv, 4096):
                    pass
            except BlockingIOError:
                pass

    def _reject(self, conn, status, message):
        """Answer a request that never reached a worker, then close."""
        response = error_response(None, status, message)
        _send_at_once(conn.sock, response)
        note = None
        if status != 408:   # bytes no parser could take are a strike; slowness is not
            note = self.guard.saw_bad_request(conn.ip, conn.client, status, in_reactor=True)
        if self.access_log:
            line = bytes(conn.buf[:conn.buf.find(b"\r\n")] if b"\r\n" in conn.buf else b"")
            self.access_log.log(conn.ip, line[:200].decode("latin-1"), status,
                                len(response.body), "", "", 0.0, note)
        self._linger(conn)

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
        self._park(conn, "linger")

    def _close(self, conn):
        if conn.waiting is not None:
            self._unpark(conn)
        self._busy.discard(conn)
        self._poller.forget(conn.sock)
        conn.sock.close()
        self._open -= 1
        count = self._per_ip[conn.client] - 1
        if count:
            self._per_ip[conn.client] = count
        else:
            del self._per_ip[conn.client]

    def _take_returned(self):
        try:
            while self._wakeup_recv.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self._book_returned()

    def _book_returned(self):
        while self._returned:
            conn, keep = self._returned.popleft()
            self._busy.discard(conn)
            if keep == "close":
                self._linger(conn)
            elif keep == "gone" or self._stopping:
                self._close(conn)
            elif keep == "armed":   # the worker re-armed it; its idle time began then
                conn.waiting = "idle"
                self._parked["idle"][conn] = conn.idle_since + self.settings.keepalive_timeout_s
            else:
                self._park(conn, "head" if conn.buf else "idle")
                if conn.buf:
                    self._check_head(conn)


# --- workers: serving a request ---------------------------------------------------------------
# Run in the worker pool. A worker owns a connection from the moment the reactor queues it until
# it appends it to ``_returned``: parse, guard, route, handler, body framing, response, log.

class _Workers:
    """The worker half of OneboxServer (a mixin: its state is made in OneboxServer.__init__)."""

    def _work_loop(self):
        _context.bind(self.context)   # state, @cached and limiter() reach this server's own
        idle = self._idle_workers
        while True:
            idle.append(None)   # list appends and pops are atomic: a count without a lock
            conn = self._work.get()
            idle.pop()
            if conn is None:
                return
            keep = "close"
            try:
                keep = self._serve_connection(conn)
            except Exception:
                self.log_error("connection error", traceback.format_exc())
            self._hand_back(conn, keep)

    def _hand_back(self, conn, keep):
        """Give ``conn`` back to the reactor. A kept connection with nothing buffered, the
        common case, is re-armed here and booked whenever the reactor next wakes: waking it for
        each response costs a send, a wake-up and a recv (serving 10 MiB files, the reactor's
        CPU per request fell from ~105 to ~60 us without them). It is woken only if it would
        sleep past the connection's idle deadline."""
        if keep == "keep" and not conn.buf and not self._stopping and self._poller.can_rearm:
            self._returned.append((conn, "armed"))   # before rearm: its report may come at once
            self._poller.rearm(conn)
            if conn.idle_since + self.settings.keepalive_timeout_s < self._wakes_at:
                self._wake()
        else:
            self._returned.append((conn, keep))
            self._wake()

    def _serve_connection(self, conn):
        """Serve the connection's requests. Returns "keep" to park the connection (an
        unfinished head goes back to the reactor, which waits for the rest), "close" to close
        it after the response, or "gone" if the client has closed it (or stayed idle)."""
        while True:
            if not conn.buf:   # an idle connection the reactor passed on unread
                data = conn.recv_ready()
                if data is None:
                    return "keep"   # a spurious report: wait again
                if not data:
                    return "gone"
                conn.buf += data
            keep = self._serve_buffered(conn)
            if keep != "keep" or conn.buf:
                return keep
            conn.idle_since = time.monotonic()
            keep = self._hold(conn)
            if keep != "ready":
                return keep

    def _hold(self, conn):
        """Wait here for the next request on a kept connection while no other connection
        needs a worker: "ready" when it comes, "keep" to hand the connection to the reactor
        (workers are wanted, or the server stops), "gone" when its idle time is up.

        Waiting here spares the next request the reactor's wake-up, the queue and a thread
        switch. The reactor raises the release flag when connections queue for a worker and
        none is idle; the poll below wakes at once, and the connection goes back to wait in
        the reactor, whose idle deadline counts from ``conn.idle_since``. (The reactor's idle
        table is in deadline order only roughly then: such a connection may outstay
        keepalive_timeout_s by as long as it was held.)

        Measured with bench/ab_static.py (10 MiB file, wrk -c16): server CPU per request fell
        from ~1,180 to ~1,130 us, context switches from 5.9 to 4.3 per request."""
        if self._workers_wanted or self._stopping:
            return "keep"
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        poller.register(self._release_recv, select.POLLIN)
        self._held[conn] = True
        ready = poller.poll(self.settings.keepalive_timeout_s * 1000)
        if not self._held.pop(conn, False) or not ready:
            return "gone"   # evicted by the reactor (see _evict_idle), or idle too long
        if self._workers_wanted or self._stopping:
            return "keep"
        return "ready"

    def _serve_buffered(self, conn):
        """The requests whose heads are in the buffer, a turn's worth."""
        for _ in range(MAX_REQUESTS_PER_TURN):
            buf = conn.buf
            if buf[:1] in (b"\r", b"\n"):
                del buf[:len(buf) - len(buf.lstrip(b"\r\n"))]
            end = buf.find(b"\r\n\r\n")
            if end < 0 or end + 4 > self.settings.max_head_bytes:
                return "keep"
            if not self._serve_one(conn, end) or self._stopping:
                return "close"
            if not conn.buf:
                return "keep"
        return "keep"

    def _serve_one(self, conn, end):
        """The request whose head ends at ``end`` in the buffer, in six steps. Returns whether
        the connection may be kept open."""
        started = time.monotonic()
        raw_head = bytes(conn.buf[:end])
        del conn.buf[:end + 4]
        exchange = _Exchange()
        # 1. Parse and check the head, build the request; 2. the guard, the route and the
        # handler (or a static page). Every failure becomes the answer.
        self._answer(conn, raw_head, exchange)
        # 3. A body the handler left unread is judged before the answer goes out.
        self._settle_body(exchange)
        # 4. The guard counts strikes and scanning before the client can see the answer, so
        # that its next request meets the ban.
        note = self._count_for_guard(conn, exchange)
        # 5. Write it; 6. log it, with the guard's decision.
        sent = self._write(conn, exchange)
        if self.access_log:
            self._log_access(conn, raw_head, exchange, sent, note, started)
        return exchange.keep_alive

    def _answer(self, conn, raw_head, exchange):
        """Steps 1 and 2: fill ``exchange`` with the head, request, reader, verdict and the
        response. Whatever else the client's bytes make the parser raise is a 400 too, logged
        in one line: a traceback per request would let anyone fill the error log."""
        try:
            try:
                exchange.head = head = parse_head(raw_head, self.settings)
                exchange.reader = self._body_reader(conn, head)
                exchange.request = self._build_request(conn, head, exchange.reader)
            except HTTPError:
                raise
            except Exception as error:
                self.log_error("unparsable request from %s: %s" % (conn.ip, type(error).__name__))
                raise HTTPError(400, "malformed request") from None
            exchange.verdict = verdict = self.guard.check(exchange.request, conn.client)
            if verdict is not None and not verdict.dry_run:
                raise HTTPError(verdict.status, verdict.message, verdict.headers)
            exchange.response = self._dispatch(exchange.request)
        except HTTPError as error:
            exchange.unrouted = isinstance(error, NotRouted)
            exchange.response = self._error_for(exchange.request, error)
        request, verdict = exchange.request, exchange.verdict
        # a request that could not even be built leaves the framing in doubt: close
        exchange.keep_alive = (request is not None and exchange.head.keep_alive
                               and not self._stopping
                               and not (verdict is not None and verdict.close))
        # (a banned client reconnects, and meets the ban at accept)

    def _settle_body(self, exchange):
        """Step 3: drain what the handler left unread, judging its framing: a malformed or
        oversized body turns the answer into its 400 or 413. Past max_drain_bytes, with the
        client waiting for 100 Continue, or when the request was refused before it was built,
        the connection closes instead."""
        reader = exchange.reader
        if reader is None or reader.done:
            return
        if reader.broken or (reader.expect_continue and not reader.continue_sent):
            exchange.keep_alive = False
        elif exchange.request is None or not reader.drain(self.settings.max_drain_bytes):
            exchange.keep_alive = False
            if reader.failure is not None and reader.failure.status in (400, 413):
                exchange.response = error_response(exchange.request, reader.failure.status,
                                                   reader.failure.message)

    def _count_for_guard(self, conn, exchange):
        """Step 4: a request the parser refused is a strike; a 404 that no route or page
        answered counts toward scanner detection (a handler's "no such note" does not).
        Returns the access log's note."""
        verdict, request = exchange.verdict, exchange.request
        note = verdict.note if verdict is not None else None
        if request is None:
            note = self.guard.saw_bad_request(conn.ip, conn.client,
                                              exchange.response.status) or note
        elif exchange.unrouted:
            note = self.guard.saw_404(request, conn.client) or note
        return note

    def _write(self, conn, exchange):
        """Step 5: send the answer; the body bytes sent. A client that stops reading, or a
        streamed body that fails half-way, closes the connection."""
        request, head = exchange.request, exchange.head
        version = head.version if head is not None else "HTTP/1.1"
        head_only = request is not None and request.method == "HEAD"
        try:
            return write_response(conn.sock, exchange.response, exchange.keep_alive, version,
                                  head_only)
        except StreamFailed as error:
            self.log_error("%s %s: streamed body failed" % (request.method, request.path),
                           str(error))
        except ClientGone:
            pass
        exchange.keep_alive = False
        return 0

    def _log_access(self, conn, raw_head, exchange, sent, note, started):
        head, request = exchange.head, exchange.request
        if head is not None:
            request_line, fields = head.request_line, head.fields
        else:
            request_line, fields = raw_head.split(b"\r\n", 1)[0][:200].decode("latin-1"), {}
        self.access_log.log(
            request.client_ip if request else conn.ip, request_line, exchange.response.status,
            sent, (fields.get("referer") or ("",))[0], (fields.get("user-agent") or ("",))[0],
            time.monotonic() - started, note)

    def _body_reader(self, conn, head):
        """The body's reader, made before anything can fail, so that even an error response
        knows how to skip the body (or that it must close instead)."""
        if head.chunked:
            return ChunkedBody(conn, head, self.settings)
        if head.content_length:
            return LengthBody(conn, head, self.settings)
        return None

    def _build_request(self, conn, head, reader):
        if head.method not in METHODS:
            raise HTTPError(501, "method not implemented")
        if head.content_length > self.settings.max_body_bytes:
            raise HTTPError(413, "request body too large")  # before reading a byte of it
        raw_path, query = split_target(head)
        allowed = self.config.allowed_hosts
        if allowed is not None and not host_allowed(allowed, (head.fields.get("host") or ("",))[0]):
            # RFC 9110 section 15.5.20; a browser sent here by DNS rebinding names another host
            raise HTTPError(421, "this server does not serve that host")
        path, segments = decode_path(raw_path)
        return Request(head.method, path, segments, query,
                       Headers(head.fields), conn.ip, head.version, reader)

    def _dispatch(self, request):
        """Handler routes first, then static pages; 404 and 405 (with Allow) otherwise."""
        method = request.method
        if request.path == "*":
            return Response(b"", 204, [("Allow", ", ".join(METHODS))])
        route, params, allowed = self.router.match(method, request.segments)
        if route is not None:
            request.params = params
            return self._call(route.handler, request)
        if allowed is not None:
            if method == "OPTIONS":
                return Response(b"", 204, [("Allow", allowed)])
            raise HTTPError(405, "method not allowed", [("Allow", allowed)])
        if method in ("GET", "HEAD"):
            response = self.static.serve(request)
            if response is not None:
                return response
        elif self.static.resolve(request.segments) is not None:
            if method == "OPTIONS":
                return Response(b"", 204, [("Allow", STATIC_METHODS)])
            raise HTTPError(405, "method not allowed", [("Allow", STATIC_METHODS)])
        raise NotRouted(404, "not found")

    def _call(self, handler, request):
        """Run a handler. Its result is checked here, where the handler can be named: a bad
        status, header or body is a 500 with the handler's name in the error log."""
        try:
            response = to_response(handler(request))
            check_response(response)
            return response
        except HTTPError:
            raise
        except Exception as error:
            status = getattr(type(error), "http_status", None)
            if status is not None:
                # an infrastructure error that declares its status (e.g. storage full: 503)
                self.log_error("%s %s: %s" % (request.method, request.path, error))
                raise HTTPError(status, getattr(type(error), "public_message", "")) from None
            self.log_error("%s %s: handler %s raised" % (request.method, request.path,
                                                       _name_of(handler)),
                           traceback.format_exc())
            raise HTTPError(500, "internal server error") from None

    def _error_for(self, request, error):
        if error.status == 404 and request is not None and request.method in ("GET", "HEAD"):
            response = self.static.not_found(request)
            response.headers.extend(error.headers)
            return response
        return error_response(request, error.status, error.message, error.headers)


def _name_of(handler):
    """'handlers.notes.get_note': where to look when a handler misbehaves."""
    return "%s.%s" % (getattr(handler, "__module__", "?"),
                      getattr(handler, "__qualname__", repr(handler)))


class _Exchange:
    """One request and its answer while a worker serves it (that worker alone touches it)."""

    __slots__ = ("head", "request", "reader", "verdict", "response", "unrouted", "keep_alive")

    def __init__(self):
        self.head = self.request = self.reader = self.verdict = self.response = None
        self.unrouted = False
        self.keep_alive = False


# --- server -----------------------------------------------------------------------------------

class OneboxServer(_Reactor, _Workers, http.server.ThreadingHTTPServer):
    """The listening socket (from the stdlib class), the reactor and the worker pool.

    For callers: ``serve_forever()`` (runs the reactor in the calling thread until shutdown),
    ``shutdown()`` (from another thread: stop and wait), ``begin_shutdown()`` (from a signal
    handler: stop without waiting), ``server_close()``, ``url``.
    """

    request_queue_size = 1024   # listen backlog: bursts of connects queue instead of failing
    allow_reuse_address = True

    def __init__(self, config, router, access_stream=None, error_stream=None, store=None):
        # Long: it makes the state of both mixins, each field commented where it is not plain.
        # The next issue (the engine rebuilt as composed objects) splits it with them.
        settings = config.server
        self.config = config
        self.settings = settings
        self.router = router
        self.store = store   # the shared state; closed (and compacted) after the workers stop
        self.static = StaticPages(settings.pages_dir, config.static)
        self.error_stream = error_stream or sys.stderr
        # The abuse guard (onebox/guard.py): bans persist in the store.
        self.guard = Guard(config.guard, store, self.log_error)
        # What handlers reach through state, @cached and limiter(): this server's own, bound by
        # each worker thread as it starts (handlers/_context.py); never the process's.
        self.context = _context.ServerContext(
            store, ResponseCache(config.cache.max_entries, config.cache.max_bytes),
            LimiterRegistry())
        self.access_log = None
        if settings.access_log:
            self.access_log = AccessLog(access_stream or sys.stdout, settings.log_flush_interval_s,
                                        settings.log_buffer_bytes, self.log_error)
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
        if config.allowed_hosts is None and not _is_loopback(settings.host):
            self.log_error("listening on %s with any Host allowed: set allowed_hosts in [server] "
                           "(e.g. allowed_hosts = example.org) so that DNS rebinding cannot "
                           "reach this server from a browser" % settings.host)
        seconds = int(settings.write_timeout_s)
        self._send_timeout = struct.pack(   # a struct timeval, for SO_SNDTIMEO at each accept
            "ll", seconds, int((settings.write_timeout_s - seconds) * 1e6))
        self._stopping = False
        self._stopped = threading.Event()
        self._reactor_thread = None
        self._poller = Poller()
        self._wakeup_recv, self._wakeup_send = socket.socketpair()
        self._wakeup_recv.setblocking(False)
        self._wakeup_send.setblocking(False)
        self._returned = collections.deque()   # (conn, keep) handed back by workers
        self._wakes_at = 0.0   # when the reactor's current wait ends at the latest
        self._work = queue.SimpleQueue()
        self._workers = []
        self._idle_workers = []   # one item per worker waiting on _work
        self._held = {}   # kept connections that workers wait on: see _Workers._hold
        self._workers_wanted = False   # raised by the reactor: see _Workers._hold
        self._release_recv, self._release_send = os.pipe()
        os.set_blocking(self._release_recv, False)
        os.set_blocking(self._release_send, False)
        # Reactor-only tables (no lock: only the reactor thread touches them):
        self._parked = {kind: collections.OrderedDict() for kind in ("new", "head", "idle",
                                                                     "linger")}
        self._busy = set()
        self._backup_requested = False
        self._backup_thread = None
        self._sighup_received = False
        self.stuck_workers = 0
        self._open = 0
        self._per_ip = {}

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall for seconds on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self):
        host, port = self.server_address[:2]
        host = "[%s]" % host if ":" in host else host
        return "http://%s:%d/" % (host, port)

    def log_error(self, message, detail=None):
        """One entry on the error log (stderr): ``message`` on one line, escaped; ``detail``
        (a traceback) indented below it. Any thread may call it."""
        entry = error_entry(time.strftime("%Y-%m-%dT%H:%M:%S"), message, detail)
        try:
            self.error_stream.write(entry)
            self.error_stream.flush()
        except (OSError, ValueError):
            pass

    def serve_forever(self, poll_interval=None):
        self._reactor_thread = threading.current_thread()
        if self.access_log:
            self.access_log.start()
        for number in range(self.settings.worker_threads):
            worker = threading.Thread(target=self._work_loop, name="onebox-worker-%d" % number)
            worker.start()
            self._workers.append(worker)
        self._poller.watch(self.socket, "listener")
        self._poller.watch(self._wakeup_recv, "wakeup")
        try:
            while not self._stopping:
                self._reactor_step()
                if self._backup_requested:
                    self._start_backup()
                if self._sighup_received:
                    self._sighup_received = False
                    self.log_error("SIGHUP received and ignored: onebox cannot reload yet; "
                                   "restart it to apply changes")
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
        self._stopping = True
        self._wake()   # the reactor's drain then sends held connections back (_want_workers)

    def shutdown(self):
        if threading.current_thread() is self._reactor_thread:
            raise RuntimeError("shutdown() from the serving thread would deadlock; "
                               "use begin_shutdown()")
        self.begin_shutdown()
        if self._reactor_thread is not None:
            self._stopped.wait()

    def server_close(self):
        self._close_store()
        socketserver.TCPServer.server_close(self)
        for sock in (getattr(self, "_wakeup_recv", None), getattr(self, "_wakeup_send", None)):
            if sock is not None:
                sock.close()
        for name in ("_release_recv", "_release_send"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)   # server_close may be called twice
        if getattr(self, "_poller", None) is not None:
            self._poller.close()

    def _close_store(self):
        store, self.store = getattr(self, "store", None), None
        if store is None:
            return
        try:
            store.close()
        except StateError as error:
            self.log_error("closing the state store: %s" % error)

    def request_backup(self):
        """Ask for a snapshot in data_dir/backups/ (SIGUSR1); safe from signal handlers."""
        self._backup_requested = True
        self._wake()

    def note_sighup(self):
        """SIGHUP: logged (by the reactor) and ignored; safe from signal handlers. Its default
        action would kill the process without a drain."""
        self._sighup_received = True
        self._wake()

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
            self.log_error("backup written: %s" % path)
        except (OSError, StateError) as error:
            self.log_error("backup failed: %s" % error)

    def _wake(self):
        try:
            self._wakeup_send.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending already) or closed (shut down)

    def _drain(self):
        """Shutdown: close the listener and waiting connections, give busy ones
        shutdown_timeout_s to finish, then cut what is left."""
        self._poller.forget(self.socket)
        self.socket.close()
        self._want_workers(True)   # workers holding idle connections let go (see _hold)
        for parked in self._parked.values():
            for conn in list(parked):
                self._close(conn)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        while self._busy and time.monotonic() < deadline:
            self._poller.poll(min(0.05, max(0.0, deadline - time.monotonic())))
            self._take_returned()
            for parked in self._parked.values():
                for conn in list(parked):
                    self._close(conn)
        for conn in list(self._busy):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # unblocks its worker's send or recv
            except OSError:
                pass

    def _stop_workers(self):
        for _ in self._workers:
            self._work.put(None)
        give_up = time.monotonic() + WORKER_JOIN_S
        for worker in self._workers:
            worker.join(max(0.0, give_up - time.monotonic()))
        self.stuck_workers = sum(worker.is_alive() for worker in self._workers)
        if self.stuck_workers:
            self.log_error("%d handler(s) still running after shutdown; exiting anyway"
                           % self.stuck_workers)
        self._workers = []
        while self._returned:
            conn, _ = self._returned.popleft()
            if conn in self._busy:
                self._close(conn)
