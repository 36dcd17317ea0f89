"""Event streams in the reactor: subscribers held as one more kind of wait, with no thread each.

A handler's ``event_stream(...)`` (handlers/_events.py) is answered by its worker with a
``Subscriber`` (the response head, the topics, the request's record) and the connection is
handed to the reactor (``Outcome`` EVENTS), which from then on alone owns it, waiting as
``Wait.EVENTS``:

* **Admission** (``_start_stream``): past ``[events] max_subscribers`` a 503, past
  ``max_subscribers_per_client`` (the guard's client: behind a trusted proxy, the visitor it
  names) a 429, each with Retry-After; while the server drains, the head and a ``retry:`` and
  a close, so that the browser reconnects to the successor. Else the head, ``retry:``, and,
  for a client that sent ``Last-Event-ID``, what it missed (or ``reset``: onebox/events.py).
  The request's record is finished here (access line, metrics): a stream's line is written
  when it starts, not when it ends hours later.
* **Fan-out** (``_take_events``, ``_deliver_some``): the events published since the last
  turn are taken whole and joined per topic, so a subscriber gets one send per turn however
  many events came, and subscribers of the same topic share one bytes object. Deliveries are
  made ``FANOUT_SLICE`` at a time, one slice per reactor turn, so that 100,000 subscribers do
  not stop the reactor from accepting and handing out requests meanwhile. In a cluster the
  hub may mark a gap among the events (what pub/sub lost: onebox/events.py): each subscriber
  is then sent ``event: reset`` in its place, so that its page re-reads the state.
* **Slow readers.** Each send is non-blocking; what the socket does not take waits in the
  subscriber's ``out`` (charged to ``[server] max_buffered_bytes``, so the memory budget sheds
  the largest holders first), and the socket is watched for room. A subscriber whose unsent
  bytes pass ``max_unsent_bytes`` when more is queued behind them (so one delivery, a
  reconnect's catch-up say, always fits however large), or that takes nothing for
  ``[server] write_timeout_s``, is cut off and counted (its events, dropped).
* **Heartbeat** (``_beat``): every ``heartbeat_s``, a comment line to each subscriber that was
  sent nothing since the last beat, so that proxies (nginx's proxy_read_timeout: 60 s) and
  NAT tables keep the connection, and a peer that vanished is found by its failed sends: no
  stream goes more than 2 x heartbeat_s without a byte. The streams of
  clients the guard has banned since they subscribed are cut at the beat.
* **The end**: the client closes (a read of nothing), sends anything (a subscriber has
  nothing to say), or the server drains (``end_streams``: a last ``retry:`` with a spread, so
  that 10,000 browsers do not reconnect in the same millisecond, then a graceful close).

``StreamWaits`` is a base class of ``Reactor`` (as ``Gate`` is), with its state in
``Subscribers``; reactor thread only, like the rest of it. Imports the standard library,
the codec, gate (its one-send answer) and hand-off modules.
"""
import random
import socket
import time

from onebox.codec import error_response
from onebox.gate import send_at_once
from onebox.handoff import Wait

FANOUT_SLICE = 2000          # deliveries per reactor turn: ~16 ms of sends on this box
                             # (bench/bench_events.py: ~8 us of server CPU a subscriber)
HEARTBEAT = b":\n"           # a comment line (WHATWG HTML 9.2.6): the parser ignores it
REFUSED_RETRY_S = 10         # a refused subscriber's Retry-After (page code retries; see docs)
_MSG_DONTWAIT = socket.MSG_DONTWAIT


def _noted(note, more):
    """The access log's note with ``more`` added (a guard's dry-run note stays)."""
    return note + " " + more if note else more


class Subscriber:
    """One event stream's connection. Made by its worker (``head``, ``stream``: the handler's
    EventStream; the worker sets ``record``, the request's, and ``keep_alive``); then the
    reactor's alone: ``conn``, ``key`` (its client), ``after`` (the newest id it was given),
    ``out`` (bytes the socket has not taken, or None), ``queued`` (events in ``out``),
    ``stalled_at`` (when ``out`` last made no progress), ``spoke`` (sent anything since the
    last heartbeat). It sits in its connection's ``outbox`` while the reactor holds it."""

    __slots__ = ("head", "stream", "record", "keep_alive", "conn", "key", "after", "out",
                 "queued", "stalled_at", "spoke")

    def __init__(self, head, stream):
        self.head = head
        self.stream = stream
        self.record = None
        self.keep_alive = False
        self.conn = None
        self.key = None
        self.after = 0
        self.out = None
        self.queued = 0
        self.stalled_at = 0.0
        self.spoke = False

    def close(self):
        """What Outbox.close does for a response; a subscriber holds no file or generator."""


class Subscribers:
    """The reactor's table of subscribers and what it counts. ``stats()`` for any thread."""

    def __init__(self):
        self.by_topic = {}      # topic -> {Subscriber: None}, in subscription order
        self.by_key = {}        # client key -> its subscribers
        self.count = 0
        self.deliveries = []    # [(subscriber, payload, events)] not made yet
        self.delivered = 0      # how many of ``deliveries`` are made
        self.through = 0        # the newest event id taken from the hub (set at start)
        self.next_beat = 0.0
        self.sent = 0           # events written to (or queued for) a subscriber
        self.dropped = 0        # events queued for a subscriber that was then cut off
        self.cut = {"slow": 0, "stalled": 0, "memory": 0, "room": 0, "banned": 0}
        self.refused = {"client_cap": 0, "server_cap": 0}
        self.started = 0

    def stats(self):
        return {"subscribers": self.count, "sent": self.sent, "dropped": self.dropped,
                "cut": dict(self.cut), "refused": dict(self.refused), "started": self.started}


class StreamWaits:
    """The reactor's event streams (module docstring); uses the reactor's ``hub``,
    ``streams`` (Subscribers), ``events_settings``, ``memory``, ``poller``, ``books``, ``guard``,
    ``handoff``, ``settings``, and its ``_move``, ``_close`` and ``_linger``."""

    # -- admission ------------------------------------------------------------------------------
    def _start_stream(self, conn):
        """A subscriber's connection, back from its worker: admit it, or refuse it."""
        sub, conn.outbox = conn.outbox, None
        record, streams = sub.record, self.streams
        refusal = self._refusal(conn.wait_key)
        if refusal is not None:
            response = error_response(None, refusal[0], refusal[1],
                                      [("Retry-After", "%d" % REFUSED_RETRY_S)])
            record.status, record.sent = response.status, len(response.body)
            record.note = _noted(record.note, "events=refused")
            self.books.finish(record, time.monotonic())
            send_at_once(conn.sock, response)
            self._linger(conn)
            return
        record.note = _noted(record.note, "events")
        self.books.finish(record, time.monotonic())
        retry = b"retry: %d\n" % self._retry_ms()
        if self.handoff.stopping:   # reconnect, to the successor
            self._send_now(conn, sub.head + retry + b"\n")
            self._linger(conn)
            return
        missed, after = self._missed(sub.stream)
        # "id:" with no data sets the browser's last event id and dispatches nothing (WHATWG
        # HTML 9.2.6, "dispatch the event", steps 1-2): a stream that drops before its first
        # event reconnects with its position, and is answered exactly (not with a reset)
        greeting = sub.head + retry + b"id: %d\n\n" % after
        sub.conn, sub.key, sub.after = conn, conn.wait_key, max(after, streams.through)
        self._move(conn, Wait.EVENTS)
        conn.outbox = sub
        for topic in sub.stream.topics:
            streams.by_topic.setdefault(topic, {})[sub] = None
        streams.by_key.setdefault(sub.key, set()).add(sub)
        if not streams.count:
            streams.next_beat = time.monotonic() + self.events_settings.heartbeat_s
        streams.count += 1
        streams.started += 1
        self.poller.arm(conn)   # its input: the client's close
        self._deliver(sub, greeting + missed, 0)

    def _refusal(self, key):
        """(status, message) if a stream of client ``key`` is over a cap, else None."""
        settings, streams = self.events_settings, self.streams
        if streams.count >= settings.max_subscribers:
            streams.refused["server_cap"] += 1
            return 503, "too many event streams on this server"
        if key is not None and len(streams.by_key.get(key, ())) >= \
                settings.max_subscribers_per_client:
            streams.refused["client_cap"] += 1
            return 429, "too many event streams from your address"
        return None

    def _missed(self, stream):
        """What a new stream is sent first, and the id it starts at: the events after its
        Last-Event-ID, or, without one, after the last one published when its handler ran (a
        fan-out may have gone by since); ``reset`` when they are gone, or the id is not one
        of this process's."""
        hub, through = self.hub, self.streams.through
        if stream.last_event_id is None:
            after = max(stream.position, hub.first_id)
        else:
            after = hub.parse_id(stream.last_event_id)
        missed = None if after is None else hub.since(stream.topics, after, through)
        if missed is None:   # the page reloads its state
            return hub.reset_frame(through), through
        return missed, after

    def _retry_ms(self, spread=False):
        retry = self.events_settings.retry_ms
        return retry + random.randrange(retry * 2 + 1) if spread else retry

    @staticmethod
    def _send_now(conn, data):
        try:
            conn.sock.send(data, _MSG_DONTWAIT)
        except OSError:
            pass   # a refusal or a farewell is never waited for

    # -- the end of a stream ---------------------------------------------------------------------
    def _forget_stream(self, conn):
        """Take ``conn``'s subscriber out of the tables (the connection is closing)."""
        sub, conn.outbox = conn.outbox, None
        streams = self.streams
        for topic in sub.stream.topics:
            subs = streams.by_topic.get(topic)
            if subs is not None:
                subs.pop(sub, None)
                if not subs:
                    del streams.by_topic[topic]
        held = streams.by_key.get(sub.key)
        if held is not None:
            held.discard(sub)
            if not held:
                del streams.by_key[sub.key]
        streams.count -= 1
        sub.conn = None   # deliveries still listed for it are skipped
        self._move(conn, None)

    def _cut_stream(self, conn, why):
        """Cut off a subscriber that does not keep up (``why``: a key of Subscribers.cut)."""
        streams = self.streams
        streams.cut[why] += 1
        streams.dropped += conn.outbox.queued
        self._close(conn)

    def end_streams(self):
        """Shutdown: each stream gets a last ``retry:`` (spread, so that browsers do not all
        reconnect at once) and a graceful close; browsers resume on the successor."""
        for sub in [sub for held in self.streams.by_key.values() for sub in held]:
            conn = sub.conn
            if sub.out is None:
                self._send_now(conn, b"retry: %d\n\n" % self._retry_ms(spread=True))
            if conn.charged:
                self.memory.uncharge(conn)
            self._forget_stream(conn)
            self._linger(conn)
        self.streams.deliveries, self.streams.delivered = [], 0

    # -- fan-out ---------------------------------------------------------------------------------
    def _take_events(self):
        """The hub's new events, as a delivery per subscriber of their topics; in a cluster,
        a gap (a marker of topic None: onebox/events.py) is a reset to every subscriber, after
        the events before it and before those after it."""
        taken = self.hub.take()
        if not taken:
            return
        streams = self.streams
        streams.through = taken[-1][1]
        if not streams.count:
            return
        if self.hub.cluster is None:   # (one process: no gaps)
            self._fan_out(taken)
            return
        start = 0
        for index, (topic, position, frame) in enumerate(taken):
            if topic is None:
                self._fan_out(taken[start:index])
                self._reset_all(position, frame)
                start = index + 1
        self._fan_out(taken[start:])

    def _reset_all(self, position, frame):
        """``event: reset`` to every subscriber: the events before ``position`` they may not
        have had are gone; from there on they are given what comes."""
        deliveries = self.streams.deliveries
        for held in self.streams.by_key.values():
            for sub in held:
                deliveries.append((sub, frame, 1))
                sub.after = position

    def _fan_out(self, taken):
        """Deliveries of ``taken``, events in id order, to the subscribers of their topics."""
        if not taken:
            return
        streams = self.streams
        first = taken[0][1]
        by_topic = {}
        for topic, event_id, frame in taken:
            if topic in streams.by_topic:
                by_topic.setdefault(topic, []).append((event_id, frame))
        several = {}   # subscribers of more than one topic here: merged by id, once each
        deliveries = streams.deliveries
        for topic, events in by_topic.items():
            payload = b"".join(frame for _, frame in events)
            last = events[-1][0]
            for sub in streams.by_topic[topic]:
                if len(sub.stream.topics) > 1:
                    several.setdefault(sub, []).extend(events)
                elif sub.after < first:
                    deliveries.append((sub, payload, len(events)))
                    sub.after = last
                else:   # given some of these at its start (a reconnect's catch-up)
                    mine = [frame for event_id, frame in events if event_id > sub.after]
                    if mine:
                        deliveries.append((sub, b"".join(mine), len(mine)))
                        sub.after = last
        for sub, events in several.items():
            mine = sorted(event for event in events if event[0] > sub.after)
            if mine:
                deliveries.append((sub, b"".join(frame for _, frame in mine), len(mine)))
                sub.after = mine[-1][0]

    def _deliver_some(self):
        """Make up to FANOUT_SLICE of the listed deliveries; True if some are left."""
        streams = self.streams
        deliveries, start = streams.deliveries, streams.delivered
        end = min(len(deliveries), start + FANOUT_SLICE)
        for index in range(start, end):
            sub, payload, events = deliveries[index]
            if sub.conn is not None:
                self._deliver(sub, payload, events)
        if end < len(deliveries):
            streams.delivered = end
            return True
        streams.deliveries, streams.delivered = [], 0
        return False

    def _deliver(self, sub, payload, events):
        """Send ``payload`` (``events`` events) to ``sub`` now, or queue it behind what waits."""
        conn = sub.conn
        if events:   # (a heartbeat is not speaking: the next beat must come all the same)
            self.streams.sent += events
            sub.spoke = True
        if sub.out is not None:
            sub.out += payload
            sub.queued += events
            self.memory.charge(conn, len(payload), sub.key)
            if len(sub.out) > self.events_settings.max_unsent_bytes:
                self._cut_stream(conn, "slow")
            elif self.memory.held > self.memory.limit_bytes:
                self._keep_to_budget()
            return
        try:
            sent = conn.sock.send(payload, _MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent == len(payload):
            return   # nearly always: the socket took it (it stays armed for reading)
        sub.out = bytearray(memoryview(payload)[sent:])
        sub.queued = events
        sub.stalled_at = time.monotonic()
        self.memory.charge(conn, len(sub.out), sub.key)
        self.poller.arm(conn, write=True)
        if self.memory.held > self.memory.limit_bytes:
            self._keep_to_budget()

    def _stream_ready(self, conn):
        """A subscriber's socket has room (its ``out`` waits), or input: the client closed,
        or sent what a subscriber never should."""
        sub = conn.outbox
        if sub.out is None:
            data = conn.recv_ready()
            if data is None:
                self.poller.arm(conn)
            else:
                self._close(conn)   # closed (b""), or talking: either way the stream ends
            return
        try:
            sent = conn.sock.send(sub.out, _MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent:
            sub.stalled_at = time.monotonic()
            del sub.out[:sent]
            self.memory.uncharge(conn)
            if not sub.out:
                sub.out, sub.queued = None, 0
                self.poller.arm(conn)
                return
            self.memory.charge(conn, len(sub.out), sub.key)
        self.poller.arm(conn, write=True)

    # -- the reactor's turn ----------------------------------------------------------------------
    def _stream_turn(self, now):
        """Heartbeats and stalls when due, a slice of deliveries; when to turn again."""
        streams = self.streams
        if now >= streams.next_beat and streams.count:
            self._beat(now)
        if streams.deliveries and self._deliver_some():
            return now   # more to deliver: turn again at once
        return streams.next_beat if streams.count else now + 3600.0

    def _beat(self, now):
        """A heartbeat to each subscriber sent nothing since the last; cut the stalled, and
        the streams of clients banned since they subscribed (their requests meet the ban,
        and their streams must not outlive it)."""
        streams, settings = self.streams, self.events_settings
        streams.next_beat = now + settings.heartbeat_s
        stall_s = self.settings.write_timeout_s
        deliveries = streams.deliveries
        banned = self.guard.banned_keys()
        cuts = [(sub.conn, "banned") for key in banned.intersection(streams.by_key)
                for sub in streams.by_key[key]]
        for sub in [sub for held in streams.by_key.values() for sub in held]:
            if sub.out is not None:
                if now - sub.stalled_at > stall_s and sub.key not in banned:
                    cuts.append((sub.conn, "stalled"))
            elif not sub.spoke:
                deliveries.append((sub, HEARTBEAT, 0))
            sub.spoke = False
        for conn, why in cuts:
            self._cut_stream(conn, why)
