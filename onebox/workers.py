"""The worker pool: threads that serve requests that are ready.

A worker takes a connection from the hand-off's work queue when its request head is whole (and
its body too, up to ``buffer_body_bytes``: the reactor waited for it), parses it, asks the guard,
routes it, runs the handler, judges any body left unread, writes the response for at most
``worker_write_s`` and logs it; then it serves the next pipelined request, or waits for the next
one on the connection while no other connection needs a worker, or hands the connection back
with an ``Outcome``. A worker never waits on a slow client except for a body too large to buffer
that its handler streams, under a minimum data rate (``onebox/transfer.py``). A streamed
response's generator runs in workers, a turn at a time: between turns the reactor sends what it
produced.

A connection from the admin listener (``conn.admin``) skips the guard and goes to the admin
site's routes only (``onebox/admin.py``). Each request has one ``Record`` (onebox/books.py),
made when its head is read with the site it is served under (``onebox/site.py``: read once,
used to the end of the request, so a reload never gives it a mix of two), and finished once
by ``Books.finish`` (the tally and the access line): here, or by the reactor for a response it
finishes.

The pool's size is an invariant: nothing a request or a hand-back raises ends a worker.
Threads: ``worker_threads`` of them, each bound to its server's context (state, cache, limiters;
``handlers/_context.py``). Imports the contract and the runtime's codec, transfer, routing,
hand-off, settings (``host_allowed``), static (``STATIC_METHODS``), guard (``CPU_CHARGE_MIN_S``),
books (``Record``), metrics (its route labels) and streams (``Subscriber``: an event stream is
handed to the reactor) modules; never the reactor, the engine or ``server``.
"""
import select
import threading
import time
import traceback
from time import perf_counter, thread_time

from handlers import _context
from handlers._core import HTTPError, Headers, Request, Response
from onebox.books import ADMIN, Record
from onebox.codec import (check_response, decode_path, error_response, parse_head,
                          split_target)
from onebox.guard import CPU_CHARGE_MIN_S
from onebox.handoff import ARMED, BODY, CLOSE, EVENTS, GONE, KEEP, PROBE, SEND
from onebox.metrics import REFUSED, STATIC, UNROUTED
from onebox.routing import METHODS, NotRouted, to_response
from onebox.settings import host_allowed
from onebox.static import STATIC_METHODS
from onebox.streams import Subscriber
from onebox.transfer import (MSG_DONTWAIT, ChunkedBody, ChunkedScan, ClientGone, LengthBody,
                             StreamFailed, body_is_buffered, produce, write_response)

HTTPS_REDIRECT = "https-redirect"   # the metrics' route label of [tls] redirect_http's 301s
# Served from pages_dir over plain HTTP even when it redirects to HTTPS: ACME's http-01
# challenge (RFC 8555 8.3), so that certbot --webroot works before the first certificate.
ACME_CHALLENGE = "/.well-known/acme-challenge/"
MAX_REQUESTS_PER_TURN = 32  # pipelined requests a worker serves before giving others a turn
_EMPTY_LINE_STARTS = (b"\r", b"\n")   # RFC 9112 section 2.2: empty lines before a request


class _Exchange(Record):
    """One request and its answer while a worker serves it (that worker alone touches it, or
    the reactor while the request waits for its body, or sends the rest of its answer). It is
    the request's Record (onebox/books.py), made when the head is read, with the site it is
    served under: one object per request, whose record fields the books read at its finish.
    (A Record apart cost an object and a copy per request: ~1% of a hello's instructions.)"""

    __slots__ = ("head", "request", "reader", "verdict", "response", "unrouted", "keep_alive",
                 "raw_head", "scan")

    def __init__(self, started, site, ip, raw_head):
        # Record's fields, set here rather than by Record.__init__ (one call fewer per
        # request); status, sent, received, note, method and path are set at step 6 (_finish),
        # line, referer and agent by _describe, before the books read them
        self.started = started
        self.site = site
        self.ip = ip
        self.route = REFUSED   # the metrics' route label: the pattern, once routed
        # the worker's own
        self.head = self.request = self.reader = self.verdict = self.response = None
        self.unrouted = False
        self.keep_alive = False
        self.raw_head = raw_head
        self.scan = None   # a ChunkedScan while the reactor buffers a chunked body

    def let_go(self):
        """What only serving needed, dropped once the reactor finishes sending the answer
        (a slow reader may hold its connection for minutes; its head need not stay)."""
        self.head = self.request = self.reader = self.response = self.raw_head = None


def _name_of(handler):
    """'handlers.notes.get_note': where to look when a handler misbehaves."""
    return "%s.%s" % (getattr(handler, "__module__", "?"),
                      getattr(handler, "__qualname__", repr(handler)))


class Workers:
    """For the server: ``start()``, ``stop(join_s)`` (after the work queue got a None per
    worker), ``stuck``, ``stats()``. Built with what they use: ``current`` (the site served
    now: onebox/site.py), ``books`` (each request's record and finish), the ``guard``, the
    ``health_checks``, ``admin`` (the admin listener's site, or None), ``context`` (state,
    cache, limiters), ``handoff`` (the channel to the reactor), ``poller`` (lets a worker
    re-arm a kept connection itself) and ``log_error``."""

    def __init__(self, current, books, guard, health_checks, admin, context, handoff, poller,
                 log_error):
        self.current = current
        self.books = books
        self.guard = guard
        self.health_checks = health_checks
        self.health_paths = health_checks.paths   # built once ([health] is read at start)
        self.admin = admin
        self.context = context
        self.sessions = context.sessions   # request.session's store (onebox/sessions.py), or None
        self.handoff = handoff
        self.poller = poller
        self.log_error = log_error
        self.threads = []
        self.stuck = 0

    def stats(self):
        """The pool now, for the metrics and the status page (any thread): ``threads``,
        ``idle`` (waiting for a job), ``busy``, ``queued`` (jobs waiting for a worker)."""
        threads, idle = len(self.threads), len(self.handoff.idle)
        return {"threads": threads, "idle": idle, "busy": max(0, threads - idle),
                "queued": self.handoff.work.qsize()}

    def start(self):
        for number in range(self.current.site.settings.worker_threads):
            thread = threading.Thread(target=self._run, name="onebox-worker-%d" % number)
            thread.start()
            self.threads.append(thread)

    def stop(self, join_s):
        """Join the workers (each was sent a None); count those still in a handler."""
        give_up = time.monotonic() + join_s
        for thread in self.threads:
            thread.join(max(0.0, give_up - time.monotonic()))
        self.stuck = sum(thread.is_alive() for thread in self.threads)
        self.threads = []

    # -- the loop --------------------------------------------------------------------------
    def _run(self):
        _context.bind(self.context)   # state, @cached and limiter(): this server's own
        handoff = self.handoff
        while True:
            handoff.idle.append(None)
            conn = handoff.work.get()
            handoff.idle.pop()
            if conn is None:
                return
            if conn is PROBE:
                handoff.probe_taken_at = time.monotonic()
                continue
            outcome = CLOSE
            try:
                outcome = self._serve_connection(conn)
            except Exception:
                self.log_error("connection error", traceback.format_exc())
            try:
                self._hand_back(conn, outcome)
            except Exception:
                # never lose a worker, and never leave the reactor without the connection
                self.log_error("hand-back failed", traceback.format_exc())
                handoff.returned.append((conn, GONE))
                handoff.wake()

    def _hand_back(self, conn, outcome):
        """Give ``conn`` back to the reactor. A kept connection with nothing buffered, the
        common case, is re-armed here and booked whenever the reactor next wakes: waking it
        for each response costs a send, a wake-up and a recv (serving 10 MiB files, the
        reactor's CPU per request fell from ~105 to ~60 us without them). It is woken only if
        it would sleep past the connection's idle deadline, or if connections wait for a
        worker. (A lock around the re-arm and the booking, instead of this order, cost 9-20%
        of req/s under wrk -c50: the workers queued on it.)"""
        handoff = self.handoff
        if (outcome is KEEP and not conn.buf and not handoff.stopping
                and self.poller.can_rearm):
            # Re-armed first, booked second: until it is booked the reactor cannot close it
            # (so its descriptor is never re-armed after a close, and perhaps a reuse), and a
            # report that comes in between is kept for the booking (conn.early_report).
            self.poller.rearm(conn)
            if handoff.before_booking is not None:
                handoff.before_booking(conn)
            handoff.returned.append((conn, ARMED))
            # wake the reactor if it would sleep past the idle deadline, or if connections
            # wait for workers (this one's client may have more in line: see Reactor)
            if (handoff.clients_in_line
                    or conn.idle_since + self.current.site.settings.keepalive_timeout_s
                    < handoff.wakes_at):
                handoff.wake()
        else:
            handoff.returned.append((conn, outcome))
            handoff.wake()

    def _serve_connection(self, conn):
        """Serve the connection's requests; the Outcome to hand it back with."""
        if conn.outbox is not None:   # a stream whose reader took all it produced: more
            return self._produce_more(conn)
        if conn.pending is not None:   # its body has arrived: the request goes on
            exchange, conn.pending = conn.pending, None
            outcome = self._finish(conn, exchange)
            if outcome is not None:
                return outcome
            # its idle time starts now: left at 0.0 (a connection whose first request had a
            # body to wait for), the reactor parked it idle with a deadline already past and
            # closed it before the client's next request (1 in 10 on loopback, plain or TLS)
            conn.idle_since = time.monotonic()
        waiter = None   # what _hold polls: made at the first hold, kept for the connection's turn
        while True:
            if not conn.buf:   # an idle connection the reactor passed on, or a held one's
                try:
                    data = conn.sock.recv(65536, MSG_DONTWAIT)   # (Connection.recv_ready's,
                except (BlockingIOError, InterruptedError):     # without its frame)
                    return KEEP   # a spurious report: wait again
                except OSError:
                    data = b""
                if not data:
                    return GONE
                conn.buf += data
            outcome = self._serve_buffered(conn)
            if outcome is not KEEP or conn.buf:
                return outcome
            # (its idle time began when _finish sent the last response: conn.idle_since)
            handoff = self.handoff
            if handoff.workers_wanted or handoff.stopping:
                return KEEP   # (what _hold would say: no poll object made for nothing)
            if waiter is None:
                waiter = select.poll()
                waiter.register(conn.sock, select.POLLIN)
                waiter.register(self.handoff.release_recv, select.POLLIN)
            outcome = self._hold(conn, waiter)
            if outcome is not None:
                return outcome

    def _produce_more(self, conn):
        """A turn of a streamed body's generator; the reactor sends what the client has not
        taken, and the access line is logged once the stream ends (Reactor._finish_send)."""
        outbox = conn.outbox
        record = outbox.record
        try:
            produce(conn.sock, outbox, time.monotonic() + record.site.settings.worker_write_s)
        except StreamFailed as error:
            self.log_error("%s: streamed body failed" % record.line, str(error))
            outbox.cut = True
        except ClientGone:
            outbox.cut = True
        return SEND

    def _hold(self, conn, waiter):
        """Wait here for the next request on a kept connection while no other connection
        needs a worker: None when it comes, KEEP to hand the connection to the reactor
        (workers are wanted, or the server stops), GONE when its idle time is up.

        Waiting here spares the next request the reactor's wake-up, the queue and a thread
        switch. The reactor raises the release flag when connections queue for a worker and
        none is idle; the poll below wakes at once, and the connection goes back to wait in
        the reactor, whose idle deadline counts from ``conn.idle_since``.

        Measured with bench/ab_static.py (10 MiB file, wrk -c16): server CPU per request fell
        from ~1,180 to ~1,130 us, context switches from 5.9 to 4.3 per request. ``waiter``
        polls the connection and the release flag: one for all the requests of the
        connection's turn (a poll object and its two registrations a request cost ~1,000
        instructions of a hello's ~139,000: issue 23)."""
        handoff = self.handoff
        if handoff.workers_wanted or handoff.stopping:
            return KEEP
        handoff.held[conn] = True
        ready = waiter.poll(self.current.site.settings.keepalive_timeout_s * 1000)
        if not handoff.held.pop(conn, False) or not ready:
            return GONE   # evicted by the reactor (its _make_room), or idle too long
        if handoff.workers_wanted or handoff.stopping:
            return KEEP
        return None

    def _serve_buffered(self, conn):
        """The requests whose heads are in the buffer, a turn's worth: each one served under
        the site current when its head is taken (``site``: to its end, a reload or not). None
        from ``_finish``: the connection goes on; else the Outcome to hand it back with (BODY:
        the reactor buffers its body). (One request's steps are inline here, not a method of
        their own: a call is a frame, ~1% of a hello's instructions: issue 23.)"""
        for _ in range(MAX_REQUESTS_PER_TURN):
            buf = conn.buf
            if buf.startswith(_EMPTY_LINE_STARTS):
                del buf[:len(buf) - len(buf.lstrip(b"\r\n"))]
            end = buf.find(b"\r\n\r\n")
            site = self.current.site
            if end < 0 or end + 4 > site.settings.max_head_bytes:
                return KEEP
            exchange = _Exchange(time.monotonic(), site, conn.ip, bytes(buf[:end]))
            del buf[:end + 4]
            # 1. Parse and check the head, build the request, ask the guard.
            self._prepare(conn, exchange)
            # 2. A body not all here yet that fits the buffer is the reactor's to wait for.
            if exchange.response is None and exchange.reader is not None:
                buffered = body_is_buffered(buf, exchange.head, site.buffer_limit)
                if buffered is not True:
                    return self._wait_for_body(conn, exchange, buffered)
            outcome = self._finish(conn, exchange)
            if outcome is not None:
                return outcome
            if self.handoff.stopping:
                # its response said keep-alive (stopping came after): closing now would fail
                # the client's next request; the reactor's drain answers it with a close
                return KEEP
            if not conn.buf:
                return KEEP
        return KEEP

    # -- one request ---------------------------------------------------------------------------
    def _finish(self, conn, exchange):
        """Steps 3-6 of a request whose body (if any) is buffered or to be streamed."""
        # 3. Route it and run the handler (or a static page).
        if exchange.response is None:
            site = exchange.site
            if conn.admin or conn.tls or site.redirect_to_https:
                self._dispatch_into(conn, exchange)
            else:   # the plain site's request, nearly all: no frame for the cases above
                try:
                    exchange.response = self._dispatch(conn, exchange.request, exchange)
                except HTTPError as error:
                    self._refused_by(error, exchange, conn)
        if self.handoff.stopping:
            exchange.keep_alive = False   # say Connection: close while shutting down
        # 4. A body the handler left unread is judged before the answer goes out.
        if exchange.reader is not None:
            self._settle_body(conn, exchange)
        # 5. The guard counts strikes and scanning before the client can see the answer (a
        #    routed request the guard let through untouched, nearly all, has nothing to count)
        if exchange.verdict is None and not exchange.unrouted and exchange.request is not None:
            note = None
        else:
            note = self._count_for_guard(conn, exchange)
        # 6. Write it for a turn (the reactor finishes it for a slow reader; a client that
        #    broke the connection closes it); account for it: the exchange is the request's
        #    Record (onebox/books.py), filled in here.
        request, head = exchange.request, exchange.head
        try:
            sent, outbox = write_response(
                conn.sock, exchange.response, exchange.keep_alive,
                head.version if head is not None else "HTTP/1.1",
                request is not None and request.method == "HEAD",
                exchange.site.settings.worker_write_s)
        except ClientGone as error:
            sent, outbox = self._write_failed(exchange, error)
        exchange.status = exchange.response.status
        exchange.sent = sent
        if conn.admin:
            exchange.route, note = ADMIN, "admin"
        elif exchange.verdict is not None:
            self.books.record_decision(exchange.verdict)
        exchange.note = note
        if request is not None:
            exchange.ip, exchange.method, exchange.path = (request.client_ip, request.method,
                                                           request.path)
        else:
            exchange.path = "(unparsed)"
            exchange.method = head.method if head is not None else "other"
        reader = exchange.reader
        exchange.received = reader.received if reader is not None else 0
        if outbox is not None or exchange.site.access_log:
            self._describe(exchange)
        if outbox is not None:
            # the client it counts against first: let_go drops the request that names it
            conn.wait_key = self._wait_key(conn, exchange)
            exchange.let_go()
            outbox.record = exchange
            outbox.keep_alive = exchange.keep_alive
            conn.outbox = outbox
            # an event stream's record is finished by the reactor, which admits it or not
            return SEND if type(outbox) is not Subscriber else EVENTS
        conn.idle_since = finished = time.monotonic()   # kept: its idle time starts now
        self.books.finish(exchange, finished)
        return None if exchange.keep_alive else CLOSE

    def _describe(self, exchange):
        """The record's fields that only the access line (and an error message) read."""
        head = exchange.head
        if head is None:
            exchange.line = exchange.raw_head.split(b"\r\n", 1)[0][:200].decode("latin-1")
            exchange.referer = exchange.agent = ""
            return
        exchange.line = head.request_line
        fields = head.fields
        exchange.referer = (fields.get("referer") or ("",))[0]
        exchange.agent = (fields.get("user-agent") or ("",))[0]

    def _prepare(self, conn, exchange):
        """Parse, build the request, ask the guard; a failure becomes the response. Whatever
        else the client's bytes make the parser raise is a 400 too, logged in one line: a
        traceback per request would let anyone fill the error log."""
        site = exchange.site
        try:
            try:
                exchange.head = head = parse_head(exchange.raw_head, site.settings)
                if head.chunked or head.content_length:
                    exchange.reader = self._body_reader(conn, head, site.settings)
                exchange.request = request = self._build_request(conn, head, exchange.reader,
                                                                 site)
            except HTTPError:
                raise
            except Exception as error:
                self.log_error("unparsable request from %s: %s" % (conn.ip,
                                                                   type(error).__name__))
                raise HTTPError(400, "malformed request") from None
            if conn.admin or (request.path in self.health_paths
                              and self._is_health_check(conn, exchange)):
                # the operator's listener, or a monitor: never limited, banned or counted
                exchange.keep_alive = exchange.head.keep_alive and not self.handoff.stopping
                return
            exchange.verdict = verdict = self.guard.check(request, conn.client)
            if verdict is None:   # nearly every request
                exchange.keep_alive = head.keep_alive and not self.handoff.stopping
                return
            if not verdict.dry_run:
                raise HTTPError(verdict.status, verdict.message, verdict.headers)
        except HTTPError as error:
            exchange.response = self._error_for(site, exchange.request, error, conn.admin)
        request, verdict = exchange.request, exchange.verdict
        # a request that could not even be built leaves the framing in doubt: close (and a
        # banned client reconnects, to meet the ban at accept)
        exchange.keep_alive = (request is not None and exchange.head.keep_alive
                               and not self.handoff.stopping
                               and not (verdict is not None and verdict.close))

    def _is_health_check(self, conn, exchange):
        """A health check that reached a worker (most are answered by the reactor: see
        onebox/health.py) is answered here, before the guard's limits; a banned client's goes
        to the guard (403, and the connection closes)."""
        request, checks = exchange.request, self.health_checks
        if request.path not in checks.paths or request.method not in ("GET", "HEAD"):
            return False
        if len(exchange.raw_head) > checks.max_head_bytes:
            raise HTTPError(431, "a health check's head must be small")
        if self.guard.refuses_banned(conn.ip, conn.client, hit=False):
            return False   # the guard's check answers it (and counts the hit)
        exchange.response = checks.response_for(request.path)
        exchange.route = request.path
        return True

    def _wait_for_body(self, conn, exchange, buffered):
        """Hand the connection to the reactor until the body is in (issue 12: no worker waits
        for a slow upload). A client that said Expect: 100-continue is told to send it now."""
        reader = exchange.reader
        if reader.expect_continue and not reader.continue_sent:
            try:
                reader.send_continue()
            except HTTPError:
                return GONE
        exchange.scan = buffered if isinstance(buffered, ChunkedScan) else None
        conn.pending = exchange
        conn.wait_key = self._wait_key(conn, exchange)
        return BODY

    def _wait_key(self, conn, exchange):
        """The client a wait in the reactor counts against: the connection's, or for a trusted
        proxy the one its request names (None, uncounted, for the proxy's own requests)."""
        if conn.client is not None:
            return conn.client
        request = exchange.request
        if request is None or request.client_ip == conn.ip:
            return None
        return self.guard.key_of(request.client_ip)

    def _dispatch_into(self, conn, exchange):
        site = exchange.site
        try:
            if conn.admin:
                exchange.response = self.admin.serve(exchange.request, self._call)
            elif (site.redirect_to_https and not conn.tls
                  and not exchange.request.path.startswith(ACME_CHALLENGE)):
                exchange.response = site.https_redirect(exchange.request)
                exchange.route = HTTPS_REDIRECT
            else:
                exchange.response = self._dispatch(conn, exchange.request, exchange)
        except HTTPError as error:
            self._refused_by(error, exchange, conn)
        if conn.tls:
            hsts = site.hsts_header
            headers = exchange.response.headers
            # RFC 6797 7.2: only over a secure transport. (A handler may return one Response
            # object again and again: the header is added once.)
            if hsts is not None and hsts not in headers:
                headers.append(hsts)

    def _refused_by(self, error, exchange, conn):
        """The handler (or routing) raised ``error``: its response."""
        exchange.unrouted = isinstance(error, NotRouted)
        exchange.response = self._error_for(exchange.site, exchange.request, error, conn.admin)

    def _settle_body(self, conn, exchange):
        """Drain what the handler left unread of the request's body, if it is all here, judging
        its framing: a malformed or oversized body turns the answer into its 400 or 413. A body
        not all here (a refused request's upload), past max_drain_bytes, or with the client
        waiting for 100 Continue, or a request refused before it was built: the connection
        closes instead."""
        reader = exchange.reader
        if reader.done:
            return
        if reader.broken or (reader.expect_continue and not reader.continue_sent):
            exchange.keep_alive = False
        elif (exchange.request is None or not self._all_here(conn, exchange)
              or not reader.drain(exchange.site.settings.max_drain_bytes)):
            exchange.keep_alive = False
            if reader.failure is not None and reader.failure.status in (400, 413):
                exchange.response = error_response(exchange.request, reader.failure.status,
                                                   reader.failure.message)

    def _all_here(self, conn, exchange):
        reader = exchange.reader
        if isinstance(reader, LengthBody):
            return len(conn.buf) >= reader.remaining
        return reader.received == 0 and ChunkedScan(
            exchange.site.settings.max_drain_bytes).feed(conn.buf)

    def _count_for_guard(self, conn, exchange):
        """A request the parser refused is a strike; a 404 that no route or page answered
        counts toward scanner detection (a handler's "no such note" does not). Returns the
        access log's note."""
        guard = self.guard
        verdict, request = exchange.verdict, exchange.request
        note = verdict.note if verdict is not None else None
        if conn.admin:
            return None
        if request is None:
            note = guard.saw_bad_request(conn.ip, conn.client, exchange.response.status) or note
        elif exchange.unrouted:
            note = guard.saw_404(request, conn.client) or note
        return note

    def _write_failed(self, exchange, error):
        """The answer could not be sent (write_response raised): the client broke the
        connection, or a streamed body failed half-way (StreamFailed, a ClientGone: logged).
        The connection closes; (body bytes sent, no Outbox)."""
        if isinstance(error, StreamFailed):
            request = exchange.request
            self.log_error("%s %s: streamed body failed" % (request.method, request.path),
                           str(error))
        exchange.keep_alive = False
        return 0, None

    # -- building and routing --------------------------------------------------------------------
    def _body_reader(self, conn, head, settings):
        """The body's reader, made before anything can fail, so that even an error response
        knows how to skip the body (or that it must close instead)."""
        if head.chunked:
            return ChunkedBody(conn, head, settings)
        if head.content_length:
            return LengthBody(conn, head, settings)
        return None

    def _build_request(self, conn, head, reader, site):
        settings = site.settings
        if head.method not in METHODS:
            raise HTTPError(501, "method not implemented")
        if head.content_length > settings.max_body_bytes:
            raise HTTPError(413, "request body too large")  # before reading a byte of it
        raw_path, query = split_target(head)
        allowed = site.allowed_hosts
        if allowed is not None and not conn.admin and not host_allowed(allowed,
                                                    (head.fields.get("host") or ("",))[0]):
            # RFC 9110 section 15.5.20; a browser sent here by DNS rebinding names another host
            raise HTTPError(421, "this server does not serve that host")
        path, segments = decode_path(raw_path)
        return Request(head.method, path, segments, query, Headers(head.fields), conn.ip,
                       head.version, reader, settings.max_json_bytes, conn.https)

    def _dispatch(self, conn, request, exchange):
        """Handler routes first, then static pages; 404 and 405 (with Allow) otherwise.
        ``exchange.route`` gets the metrics' route label. A handler's run is charged to its
        client's CPU budget (onebox/guard.py says why this thread's CPU time, not wall time);
        static pages run no handler and cost nothing to measure."""
        method, site = request.method, exchange.site
        exchange.route = UNROUTED
        if request.path == "*":
            return Response(b"", 204, [("Allow", ", ".join(METHODS))])
        route, params, allowed = site.router.match(method, request.segments)
        if route is not None:
            request.params = params
            exchange.route = route.pattern
            cpu_started, started = thread_time(), perf_counter()
            try:
                return self._call(route.handler, request)
            finally:   # an error raised after costly work is charged too
                # A thread's CPU time never exceeds the wall time, so a run shorter than
                # CPU_CHARGE_MIN_S (nearly all) needs no second thread_time(): a system call
                # (~0.5 us), where perf_counter() is read in user space (~0.05 us). (The
                # request's own clock reads would span its parsing and writing too: under
                # valgrind, where bench/ab_static.py counts instructions, every hello would
                # pass the filter and be charged.)
                if perf_counter() - started >= CPU_CHARGE_MIN_S:
                    used = thread_time() - cpu_started
                    if used >= CPU_CHARGE_MIN_S:
                        self.guard.charge(request, conn.client, used)
        if allowed is not None:
            if method == "OPTIONS":
                return Response(b"", 204, [("Allow", allowed)])
            raise HTTPError(405, "method not allowed", [("Allow", allowed)])
        static = site.static
        if method in ("GET", "HEAD"):
            response = static.serve(request)
            if response is not None:
                exchange.route = STATIC
                return response
        elif static.resolve(request.segments) is not None:
            exchange.route = STATIC
            if method == "OPTIONS":
                return Response(b"", 204, [("Allow", STATIC_METHODS)])
            raise HTTPError(405, "method not allowed", [("Allow", STATIC_METHODS)])
        raise NotRouted(404, "not found")

    def _call(self, handler, request):
        """Run a handler. Its result is checked here, where the handler can be named: a bad
        status, header or body is a 500 with the handler's name in the error log."""
        try:
            response = handler(request)
            if type(response) is not Response:   # a shortcut value (or a subclass): converted
                response = to_response(response)
            check_response(response)
            if request._session is not None:   # the handler used its session
                response = self.sessions.commit(request, response)
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

    def _error_for(self, site, request, error, admin=False):
        if (error.status == 404 and request is not None and request.method in ("GET", "HEAD")
                and not admin):
            response = site.static.not_found(request)
            response.headers.extend(error.headers)
            return response
        return error_response(request, error.status, error.message, error.headers)
