"""What the reactor thread and the worker pool pass each other, and the fields they share.

A ``Connection`` is owned by exactly one thread at a time: the reactor while it waits (for a
head, a body, a slow reader, or the next request), a worker while a request is served (or while
it holds the connection for the next one). It moves between them through the ``Handoff``: the
work queue one way, the ``returned`` deque with an ``Outcome`` the other. Whoever owns it alone
writes its fields; the queues order the writes, so it needs no lock.

Imports only the standard library.
"""
import collections
import enum
import os
import queue
import socket


# Put on the work queue by the reactor now and then: a worker that takes it proves the pool can
# take a job (see Handoff.probe_sent_at and OneboxServer.health).
PROBE = object()


class Outcome(enum.Enum):
    """What a worker hands a connection back with, and what the reactor then does."""

    ARMED = "armed"   # kept, nothing buffered, re-armed by the worker itself: wait for the next
    KEEP = "keep"     # kept: park it (idle, or an unfinished head is in its buffer)
    BODY = "body"     # a request waits for its body (conn.pending): read it, then queue it again
    SEND = "send"     # a response waits for a slow reader (conn.outbox): finish sending it
    EVENTS = "events" # an event stream (conn.outbox: a Subscriber): the reactor holds it
    CLOSE = "close"   # answered and done: close gracefully (linger)
    GONE = "gone"     # the client left or stayed idle too long: close now


# The members as plain names, for the workers' and reactor's per-request paths: on Python 3.11
# each ``Outcome.KEEP`` goes through EnumType.__getattr__, ~1,200 instructions of a hello's
# ~133,000 (bench/ab_static.py --instructions --functions).
ARMED, KEEP, BODY, SEND, EVENTS, CLOSE, GONE = (
    Outcome.ARMED, Outcome.KEEP, Outcome.BODY, Outcome.SEND, Outcome.EVENTS, Outcome.CLOSE,
    Outcome.GONE)


class Wait:
    """What a connection waits for in the reactor: ``Connection.waiting`` is one of these, or
    None while a worker has it (or while it is being placed or closed). Only the reactor writes
    it, and only along ``WAIT_MOVES`` (Reactor._move checks each move, and counts the waits).

      Wait        what for                                   until
      HANDSHAKE   a TLS handshake to finish (HTTPS listener) header_timeout_s after accept
      NEW         the first byte of a request                header_timeout_s after accept (or
                                                             after a TLS handshake)
      HEAD        the rest of a request head                 header_timeout_s after its first byte
      IDLE        the next request on a kept connection      keepalive_timeout_s after the response
      LINGER      nothing: input is read and dropped         LINGER_S, after a refusal (RFC 9112
                                                             section 9.6)
      BODY        a request's body, buffered in the reactor  the body pace (min_body_rate_bytes_s)
      SEND        a slow reader to take a response's rest    the response pace
      LINE        its turn for a body or send wait           the client's earlier waits to end
      READY       a worker its client may take               the client's other requests to finish
      EVENTS      events to send (an event stream)           its client's close, a cut-off
                                                             (onebox/streams.py), or shutdown

    The first five are ``fixed``: one timeout each (onebox/timers.py keeps each one's table in
    deadline order). Sentinels rather than an ``enum.Enum``: on Python 3.11 an Enum's
    ``Wait.HEAD`` goes through EnumType.__getattr__, and hashing a member (each look-up in
    WAIT_MOVES) runs Enum.__hash__ in Python: ~60 and ~90 ns a time (timeit); here both are C."""

    __slots__ = ("name", "fixed")

    def __init__(self, name, fixed):
        self.name = name     # as metrics and the status page label it
        self.fixed = fixed

    def __repr__(self):
        return "Wait.%s" % self.name.upper()


Wait.HANDSHAKE, Wait.NEW, Wait.HEAD, Wait.IDLE, Wait.LINGER = (
    Wait(name, True) for name in ("handshake", "new", "head", "idle", "linger"))
Wait.BODY, Wait.SEND, Wait.LINE, Wait.READY, Wait.EVENTS = (
    Wait(name, False) for name in ("body", "send", "line", "ready", "events"))
WAITS = (Wait.HANDSHAKE, Wait.NEW, Wait.HEAD, Wait.IDLE, Wait.LINGER, Wait.BODY, Wait.SEND,
         Wait.LINE, Wait.READY, Wait.EVENTS)
FIXED_WAITS = frozenset(wait for wait in WAITS if wait.fixed)

# Every legal move of Connection.waiting, from (key) to (any of the set); anything else is a
# reactor bug (as in h11's _state.py). None: a worker has the connection, or it was just
# accepted, or it is being closed (every wait may end in a close: -> None).
WAIT_MOVES = {
    # accepted (HANDSHAKE on the HTTPS listener, else NEW); back from a worker: kept (IDLE, or
    # HEAD with the next head begun), answered (LINGER), a body to read (BODY), a slow reader
    # (SEND), either in line behind its client's (LINE); a request for a worker (READY); an
    # event stream (EVENTS)
    None: frozenset(WAITS),
    Wait.HANDSHAKE: frozenset({Wait.NEW, None}),
    Wait.NEW: frozenset({Wait.HEAD, None}),            # its first byte; or closed, timed out
    Wait.HEAD: frozenset({Wait.LINGER, None}),         # refused (LINGER); whole: to a worker
    Wait.IDLE: frozenset({None}),                      # its next request goes to a worker
    Wait.LINGER: frozenset({None}),
    Wait.BODY: frozenset({None}),                      # whole: to a worker; too slow: refused
    Wait.SEND: frozenset({None}),                      # sent; or a stream's worker goes on
    # its turn (LINE -> LINE, READY -> READY: back of the line, a reload lowered the cap)
    Wait.LINE: frozenset({Wait.BODY, Wait.SEND, Wait.LINE, None}),
    Wait.READY: frozenset({Wait.READY, None}),
    Wait.EVENTS: frozenset({None}),                    # closed, cut off, or ended at shutdown
}


class Connection:
    """One client connection; see the module docstring for who writes its fields."""

    __slots__ = ("sock", "ip", "client", "buf", "waiting", "idle_since", "pending", "outbox",
                 "wait_key", "deadline", "charged", "charge_key", "early_report", "admin", "tls",
                 "https")

    def __init__(self, sock, ip, admin=False, tls=False):
        self.sock = sock
        self.admin = admin    # accepted on the admin listener: admin routes only, no guard
        # accepted on the HTTPS listener: sock is an onebox.tls.TLSSocket, which behaves as the
        # plain socket does for recv_ready() and the transfer functions (files are sent in
        # chunks instead of with sendfile); chosen once here, never per call on the plain path
        self.tls = tls
        # whether its requests came over HTTPS: True (TLS), False, or None: from a trusted
        # proxy, whose X-Forwarded-Proto says so per request (set at accept; Request.secure)
        self.https = tls
        # The one field the reactor writes while a worker owns the connection (the worker never
        # touches it): a report that came after the worker re-armed the connection and before
        # its hand-back was booked (see Workers._hand_back, Reactor._book_returned).
        self.early_report = False
        self.ip = ip
        self.client = None    # the guard's client key (set at accept); None for a trusted proxy
        self.buf = bytearray()
        self.waiting = None   # what it waits for in the reactor (a Wait); None in a worker
        self.idle_since = 0.0     # when its last response was sent: idle deadlines count from it
        self.pending = None   # a request waiting for its body (workers' _Exchange)
        self.outbox = None    # the rest of a response a slow reader has not taken (Outbox), or
                          # an event stream's Subscriber (onebox/streams.py)
        self.wait_key = None  # the client it waits for, as the guard counts (also proxied ones)
        self.deadline = 0.0   # when a body or send wait ends, unless progress moves it
        # bytes of the reactor's memory budget (max_buffered_bytes) this connection holds: its
        # buffered body, or a TLS handshake's cost; and the client they are counted against
        self.charged = 0
        self.charge_key = None

    def recv_ready(self):
        """What the socket holds now: bytes; b"" if the client closed (or the connection
        broke); None if nothing yet (a report that was spurious)."""
        try:
            return self.sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""


class Handoff:
    """The channel between the reactor and the workers. Which thread writes each field:

    ``work``           the reactor puts connections in (the server puts None at shutdown);
                       workers take them out.
    ``returned``       workers append (connection, Outcome); the reactor pops them.
    ``idle``           each worker appends an item while it waits on ``work`` and pops it
                       when it has one (list appends and pops are atomic: a count, no lock).
    ``held``           a worker adds a kept connection it waits on; the worker or the reactor
                       pops it (dict.pop is atomic: exactly one of them gets it).
    ``workers_wanted`` the reactor (release flag, with the release pipe): raised while ready
                       connections wait for a worker, so that held ones are let go.
    ``wakes_at``       the reactor: when its current wait ends at the latest; workers read it.
    ``clients_in_line`` the reactor: whether requests wait for their client's share of the
                       workers; a worker that hands a connection back then wakes it at once.
    ``stopping``       the server (begin_shutdown); everyone reads it.
    ``turned_at``      the reactor, at each turn (time.monotonic()); health checks read it.
    ``probe_sent_at``  the reactor, when it puts a PROBE on ``work``;
    ``probe_taken_at`` the worker that takes it. A probe is out while sent > taken.
    ``before_booking`` a test seam: called by a worker between re-arming a kept connection
                       and booking it.
    """

    def __init__(self):
        self.work = queue.SimpleQueue()
        self.returned = collections.deque()
        self.idle = []
        self.held = {}
        self.workers_wanted = False
        self.wakes_at = 0.0
        self.clients_in_line = False
        self.stopping = False
        self.turned_at = self.probe_sent_at = self.probe_taken_at = 0.0
        self.before_booking = None
        self._wakeup_recv, self._wakeup_send = socket.socketpair()
        self._wakeup_recv.setblocking(False)
        self._wakeup_send.setblocking(False)
        self.release_recv, self._release_send = os.pipe()
        os.set_blocking(self.release_recv, False)
        os.set_blocking(self._release_send, False)

    @property
    def wakeup_socket(self):
        """What the reactor's poller watches to hear ``wake``."""
        return self._wakeup_recv

    def wake(self):
        """Make the reactor look at ``returned`` now; safe from any thread and signal handlers."""
        try:
            self._wakeup_send.send(b"\0")
        except OSError:
            pass  # full (a wake-up is pending already) or closed (shut down)

    def take_wakeups(self):
        try:
            while self._wakeup_recv.recv(4096):
                pass
        except OSError:
            pass

    def want_workers(self, wanted):
        """Reactor only: raise or lower the flag that sends held connections back."""
        self.workers_wanted = wanted
        try:
            if wanted:
                os.write(self._release_send, b"\0")
            else:
                while os.read(self.release_recv, 4096):
                    pass
        except OSError:
            pass   # full: readable already; or empty

    def probe(self, now, interval_s):
        """Reactor only: prove, every ``interval_s``, that a worker can take a job: at once if
        one waits idle with nothing queued, else by a PROBE on ``work`` (taken like any job, so
        held connections are let go). Health checks read the answer (onebox/health.py)."""
        if self.probe_taken_at < self.probe_sent_at or now - self.probe_sent_at < interval_s:
            return   # one is out, or the last was answered moments ago
        self.probe_sent_at = now
        if self.idle and not self.work.qsize():
            self.probe_taken_at = now
            return
        self.work.put(PROBE)
        if not self.workers_wanted:
            self.want_workers(True)

    def close(self):
        """Once; a second call does nothing (a closed descriptor's number may be reused)."""
        if self.release_recv < 0:
            return
        for sock in (self._wakeup_recv, self._wakeup_send):
            sock.close()
        for fd in (self.release_recv, self._release_send):
            os.close(fd)
        self.release_recv = self._release_send = -1
