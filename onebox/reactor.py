"""The reactor: the one thread that accepts connections and owns every one that waits.

A connection waits here, never in a worker, for whatever a client can be slow at (issue 12): a
TLS handshake, a request head, a body, a slow reader, the next request on a kept connection,
its client's turn. ``Wait`` in onebox/handoff.py lists the waits with their timeouts, and the
table of the moves between them; ``_move`` is the one place a connection's wait changes, and it
checks each move against that table. The deadlines are onebox/timers.py's, and the per-client
rules (workers, waits, room at ``max_connections``, the ``max_buffered_bytes`` memory budget)
onebox/fairness.py's: they decide, this module does the I/O (accept, reads, sends, hand-off to
the workers, closing).

Who gets in, who is cut to make room or to keep to the memory budget, TLS handshakes, and what
is answered before any worker sees a request (refusals, health checks) are the reactor's door:
``Gate`` in onebox/gate.py, a base class of ``Reactor``. The admin listener's connections
(``Connection.admin``, onebox/admin.py) wait here like the site's. A TLS connection, once its
handshake is done, is served as any other: its socket is an ``onebox.tls.TLSSocket``, which
behaves as a plain one does for the code here and in the workers.

An event stream's connection waits here too (``Wait.EVENTS``) for as long as it is open: its
admission, fan-out, heartbeat and cut-offs are ``StreamWaits`` in onebox/streams.py, another
base class of ``Reactor``; what handlers publish reaches it through the hub
(``onebox/events.py``), which wakes the reactor as a worker's hand-back does.

Every field here is the reactor thread's alone, and nothing in this module takes a lock;
``stats()`` is the one method for other threads (metrics, the status page). Imports the standard
library, the codec, transfer, hand-off, timers, fairness, gate and streams modules; never the
engine or ``server``.
"""
import socket
import time
import traceback

from onebox.codec import head_problem
from onebox.fairness import Fairness, MemoryBudget
from onebox.gate import Gate
from onebox.handoff import (ARMED, BODY, CLOSE, EVENTS, FIXED_WAITS, GONE, SEND, WAIT_MOVES,
                            WAITS, Wait)
from onebox.streams import StreamWaits, Subscribers
from onebox.timers import Timers
from onebox.transfer import ClientGone, Pace, timeval

# A report can reach the reactor between a worker's re-arm and its booking (Workers._hand_back);
# the worker does not wake the reactor for the booking, so the reactor polls this briefly until
# it comes (it used to sleep out its timer: up to a second for that request).
EARLY_BOOKING_POLL_S = 0.001
PROBE_INTERVAL_S = 1.0         # how often the reactor checks that a worker can take a job
LINGER_S = 2.0                 # after a close with unread input, read and drop it this long


class IllegalMove(RuntimeError):
    """A move of Connection.waiting that WAIT_MOVES does not have: a bug in the reactor."""


class Reactor(Gate, StreamWaits):
    """For the server: ``step()`` (one turn: expire, poll, act); at shutdown ``drain(deadline)``
    and ``after_workers()``; ``stats()`` from any thread."""

    def __init__(self, listener, settings, handoff, poller, guard, books, health, log_error,
                 admin_listener=None, admin_max_connections=64, tls_listener=None,
                 tls_context=None, hub=None, events_settings=None):
        self.listener = listener
        # the admin listener's connections skip the guard and the site's caps (onebox/admin.py)
        self.admin_listener = admin_listener
        self.admin_max_connections = admin_max_connections
        self.admin_open = 0
        self.tls_listener = tls_listener
        self.tls_context = tls_context   # a reload replaces it; connections keep theirs
        self.health = health  # HealthChecks (onebox/health.py): answered here, never by a worker
        self.handoff = handoff
        self.poller = poller
        self.guard = guard
        self.books = books    # what ends here (slow readers, health checks, refusals) is booked
        self.refusals = books.refusals
        self.log_error = log_error
        self.timers = Timers()
        self.fair = Fairness(settings.max_workers_per_client, settings.max_waiting_per_client)
        self.memory = MemoryBudget(settings.max_buffered_bytes)
        self.use_settings(settings)
        # event streams (onebox/streams.py): the hub publishes, the reactor holds subscribers
        self.hub = hub
        self.events_settings = events_settings
        self.streams = Subscribers()
        if hub is not None:
            self.streams.through = hub.last_id
        self.counts = dict.fromkeys(WAITS + (None,), 0)   # connections by wait (see _move)
        self.busy = set()        # in workers (queued, served or held)
        self.reported_early = 0  # connections reported between their re-arm and booking
        self.open = 0

    def use_settings(self, settings):
        """[server] settings for what starts from now on (at start, and on a reload, in this
        thread); waits already timed keep their deadlines. Raises before changing anything."""
        send_timeval = timeval(settings.worker_write_s)   # for SO_SNDTIMEO at each accept
        self.body_pace = Pace.for_bodies(settings)
        self.send_pace = Pace.for_responses(settings)
        self.send_timeval = send_timeval
        self.fair.use_settings(settings)
        self.memory.limit_bytes = settings.max_buffered_bytes
        self.settings = settings

    def use_events_settings(self, events_settings):
        """[events] settings from now on (a reload); streams already held keep their place."""
        self.events_settings = events_settings
        self.hub.use_settings(events_settings)

    def stats(self):
        """For any thread: {"waits": {wait name: connections}, "parked" (the fixed waits'),
        "open", "admin_open", "in_workers", "buffered", "timed" (heap entries)}: a dict copy and
        len()s, atomic under the GIL; nothing iterates a table the reactor may be changing."""
        counts = self.counts.copy()
        return {"waits": {wait.name: counts[wait] for wait in WAITS},
                "parked": {wait.name: counts[wait] for wait in WAITS if wait.fixed},
                "open": self.open, "admin_open": self.admin_open, "in_workers": len(self.busy),
                "buffered": self.memory.held, "timed": len(self.timers.timed)}

    # -- one turn ---------------------------------------------------------------------------
    def step(self):
        handoff = self.handoff
        # (while stopping, held connections must come back to be closed: the flag stays up)
        if handoff.workers_wanted and handoff.work.qsize() < len(handoff.idle) \
                and not self.fair.ready_line and not handoff.stopping:
            handoff.want_workers(False)
        now = handoff.turned_at = time.monotonic()
        handoff.probe(now, PROBE_INTERVAL_S)
        wakes_at = self._expire(now)
        streams = self.streams
        if streams.count or streams.deliveries:   # heartbeats, and a fan-out's next slice
            wakes_at = min(wakes_at, self._stream_turn(now))
        handoff.wakes_at = wakes_at   # workers read it: see Workers
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
                if self.hub is not None and self.hub.pending:   # published: fan them out
                    self._take_events()
                    if streams.deliveries:
                        self._deliver_some()
            else:
                try:
                    self._on_ready(owner)
                except Exception:   # one connection's bug must not stop the reactor
                    self.log_error("reactor error", traceback.format_exc())
                    self._close(owner)

    def _on_ready(self, conn):
        wait = conn.waiting
        if wait is None:   # re-armed by its worker, not booked yet: the booking acts on it
            conn.early_report = True
            self.reported_early += 1
            return
        if wait is Wait.LINE or wait is Wait.READY:
            return   # not armed: a stale report
        if wait is Wait.IDLE:   # a kept connection's next request: a worker reads it, once
            self._unpark(conn)
            self._queue_work(conn)
        elif wait is Wait.SEND:
            self._send_more(conn)
        elif wait is Wait.EVENTS:
            self._stream_ready(conn)
        elif wait is Wait.BODY:
            self._read_body(conn)
        elif wait is Wait.HANDSHAKE:
            self._handshake(conn)
        else:
            self._read_head(conn)
            if conn.waiting in FIXED_WAITS:
                self.poller.arm(conn)  # still waiting: report it again (one-shot)

    # -- waits: the one place they change -------------------------------------------------------
    def _move(self, conn, wait):
        """``conn`` waits for ``wait`` now (None: for nothing here), along WAIT_MOVES only."""
        was = conn.waiting
        if wait not in WAIT_MOVES[was]:
            raise IllegalMove("a connection waiting for %r cannot move to %r" % (was, wait))
        counts = self.counts
        counts[was] -= 1
        counts[wait] += 1
        conn.waiting = wait

    def _park(self, conn, wait, deadline=None):
        """Wait for input with a fixed timeout (or a held connection's earlier ``deadline``)."""
        was = conn.waiting   # None, or a fixed wait (WAIT_MOVES)
        self._move(conn, wait)
        now = time.monotonic()
        if wait is Wait.IDLE:
            timeout = self.settings.keepalive_timeout_s
        elif wait is Wait.LINGER:
            timeout = LINGER_S
        else:
            timeout = self.settings.header_timeout_s
        self.timers.park(conn, wait, now + timeout if deadline is None else max(deadline, now),
                         was)
        if was is None:
            self.poller.arm(conn)

    def _unpark(self, conn):
        self.timers.unpark(conn, conn.waiting)
        self._move(conn, None)
        if not self.poller.can_rearm:   # epoll's one-shot report disarmed it already
            self.poller.disarm(conn)

    def _start_wait(self, conn, wait):
        """A body or send wait, if the client has a free place; else in line behind its own."""
        if not self.fair.may_wait(conn, wait):
            self._move(conn, Wait.LINE)
            return
        self._move(conn, wait)
        if wait is Wait.BODY:   # bytes that came with the head count as progress (issue 19)
            conn.deadline = self.body_pace.first(time.monotonic(), len(conn.buf))
        else:
            conn.deadline = self.send_pace.first(time.monotonic())
        self.timers.push(conn, wait)
        if wait is Wait.SEND:
            self._send_more(conn)
        else:
            self.poller.arm(conn)

    def _end_wait(self, conn):
        """``conn``'s body or send wait (or place in line) is over: its client's next may start."""
        wait = conn.waiting
        self._move(conn, None)
        if wait is Wait.LINE:
            self.fair.leave_wait_line(conn)
            return
        following = self.fair.wait_over(conn)
        if following is not None:
            self._start_wait(*following)

    def _expire(self, now):
        """End the waits that are over; return when the next one is (within a second)."""
        if self.books.unlogged_refusals:   # some went unlogged: sum them up once a second
            self.books.sum_up_refusals(now)
        over, soonest = self.timers.expire(now)
        while over:   # (ending one may start another: a body in line gets its turn)
            ended = 0
            for conn, wait in over:
                if conn.waiting is not wait:
                    continue   # ended by the ending of one before it
                ended += 1
                if wait is Wait.HEAD:
                    self._reject(conn, 408, "request head not received in time")
                elif wait is Wait.BODY:
                    self.refusals.count("refused_slow_body")
                    self._end_wait(conn)
                    self._reject(conn, 408, "request body not received in time")
                elif wait is Wait.SEND:
                    self.refusals.count("closed_slow_reader")
                    self._finish_send(conn, ok=False)
                else:
                    self._close(conn)
            if not ended:
                break
            over, soonest = self.timers.expire(now)
        return soonest

    # -- heads ------------------------------------------------------------------------------
    def _read_head(self, conn):
        data = conn.recv_ready()
        if data is None:
            return
        if not data:
            self._close(conn)
            return
        if conn.waiting is Wait.LINGER:
            return
        if conn.waiting is not Wait.HEAD:
            self._park(conn, Wait.HEAD)  # the head deadline starts with the head's first byte
        conn.buf += data
        # (a read may hold a body's first 64 KiB too); admin connections are never shed
        memory = self.memory
        if not conn.admin:
            memory.charge(conn, len(data), conn.client)
        if memory.held > memory.limit_bytes:
            self._keep_to_budget()
            if conn.waiting is not Wait.HEAD:
                return   # shed itself
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
        conn.deadline = self.body_pace.advance(conn.deadline, len(data), time.monotonic())
        memory = self.memory
        memory.charge(conn, len(data), conn.wait_key)
        if memory.held > memory.limit_bytes:
            self._keep_to_budget()
            if conn.waiting is not Wait.BODY:
                return   # shed itself
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
        sent = sent_before - outbox.size()
        if done and outbox.stream is not None:
            # all a streamed body's generator produced is sent: a worker runs it on
            self._end_wait(conn)
            conn.sock.setblocking(True)   # the workers' mode (see onebox/transfer.py)
            self._queue_work(conn)
            return
        if done:
            self._finish_send(conn, ok=True)
            return
        conn.deadline = self.send_pace.advance(conn.deadline, sent, time.monotonic())
        self.poller.arm(conn, write=True)

    def _finish_send(self, conn, ok):
        outbox, conn.outbox = conn.outbox, None
        outbox.close()
        record = outbox.record
        record.sent = outbox.body_sent
        if not ok:
            record.note = (record.note + " " if record.note else "") + "send=cut"
        self.books.finish(record, time.monotonic())
        self._end_wait(conn)
        if not ok:
            self._close(conn)
            return
        if not outbox.keep_alive:
            self._linger(conn)
            return
        conn.sock.setblocking(True)   # back to the workers' mode (see onebox/transfer.py)
        conn.idle_since = time.monotonic()
        self._park(conn, Wait.HEAD if conn.buf else Wait.IDLE)
        if conn.buf:
            self._check_head(conn)

    # -- to and from the workers --------------------------------------------------------------
    def _queue_work(self, conn):
        """Give a connection with a whole request (or body) to a worker, unless its client has
        max_workers_per_client in workers already: then it waits its turn."""
        handoff = self.handoff
        if not self.fair.may_work(conn):
            self._move(conn, Wait.READY)
            handoff.clients_in_line = True
            handoff.want_workers(True)   # its held connections, if any, come back
            return
        if conn.waiting is not None:   # its turn in its client's ready line
            self._move(conn, None)
        self.busy.add(conn)
        handoff.work.put(conn)
        if not handoff.workers_wanted and handoff.work.qsize() > len(handoff.idle):
            handoff.want_workers(True)

    def _left_workers(self, conn):
        self.busy.discard(conn)
        if conn.charged:
            self.memory.uncharge(conn)   # its body was read by the request's worker
        following = self.fair.left_worker(conn)
        if following is not None:
            self.handoff.clients_in_line = bool(self.fair.ready_line)
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
                self._move(conn, Wait.IDLE)
                self.timers.park(conn, Wait.IDLE, max(
                    conn.idle_since + self.settings.keepalive_timeout_s, time.monotonic()))
            elif outcome is CLOSE:
                self._linger(conn)
            elif outcome is GONE:
                self._close(conn)
            elif outcome is BODY:
                self.memory.charge(conn, len(conn.buf), conn.wait_key)
                self._start_wait(conn, Wait.BODY)
                if self.memory.held > self.memory.limit_bytes:
                    self._keep_to_budget()
            elif outcome is SEND:
                conn.sock.setblocking(False)   # finished here without a wait in the kernel
                self._start_wait(conn, Wait.SEND)
            elif outcome is EVENTS:
                self._start_stream(conn)
            elif conn.buf:
                self._park(conn, Wait.HEAD)
                self._check_head(conn)
            else:   # kept: its idle time began at its last response, not now (see ARMED)
                self._park(conn, Wait.IDLE, conn.idle_since + self.settings.keepalive_timeout_s)

    # -- lingering, closing -------------------------------------------------------------------
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
        if conn.charged:
            self.memory.uncharge(conn)
        conn.sock.setblocking(True)   # a send wait's socket was non-blocking; reads pass DONTWAIT
        self._park(conn, Wait.LINGER)

    def _close(self, conn):
        if conn.sock.fileno() < 0:
            return   # closed already (a connection handed back twice after a failure)
        wait = conn.waiting
        if wait is Wait.EVENTS:
            self._forget_stream(conn)
            wait = None
        if conn.outbox is not None:
            conn.outbox.close()
            conn.outbox = None
        if wait in FIXED_WAITS:
            self._unpark(conn)
        elif wait is Wait.READY:
            self.fair.leave_ready_line(conn)
            self.handoff.clients_in_line = bool(self.fair.ready_line)
            self._move(conn, None)
        elif wait is not None:   # body, send, line
            self._end_wait(conn)
        # its buffer goes now, not when the timers' heap lets it go (issue 19: ~0.5 GB held)
        conn.buf = bytearray()
        conn.pending = None
        if conn.charged:
            self.memory.uncharge(conn)
        self.busy.discard(conn)
        self.poller.forget(conn.sock)
        conn.sock.close()
        if conn.admin:
            self.admin_open -= 1
            return
        self.open -= 1
        self.fair.closed(conn)

    # -- shutdown ------------------------------------------------------------------------------
    def close_waiting(self):
        """Close every connection that waits here, answered or not (shutdown): parked ones,
        then those in line (so that none gets a turn), then body and send waits."""
        for conn in self.timers.parked_connections() + self.fair.lined_connections() \
                + self.timers.timed_connections():
            self._close(conn)
        self.timers.clear()

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
        for conn, _ in self.handoff.returned:
            if conn in self.busy:
                self.busy.discard(conn)
                try:
                    conn.sock.close()
                except OSError:
                    pass
        self.handoff.returned.clear()

