"""Live events: the hub that ``publish`` writes to, with each topic's replay ring.

What this module owns (the reactor's side, holding and writing to subscribers, is
onebox/streams.py):

* **Ids.** One sequence for the process, across topics, so that a stream of several topics
  has one ``Last-Event-ID``. It starts at the process's start time in microseconds: an id from
  an earlier process (a browser that reconnects to a restarted server) is below ``first_id``,
  and is answered ``reset`` rather than taken for a position in this one's rings. (No process
  publishes a million events a second, so ids never overtake the clock.)
* **The frame.** An event is written once, as the bytes every subscriber gets (WHATWG HTML,
  "Server-sent events", 9.2.6): ``id:``, ``event:`` if named, one ``data:`` line per line of
  the data, split where the parser splits (CRLF, LF or CR: 9.2.5; str.splitlines would split
  at U+2028 too, and the browser would see two lines where there was one), and a blank line.
* **The rings.** Each topic keeps its last ``ring_events`` events, and all rings together at
  most ``ring_bytes`` (the oldest events of any topic go first; a topic left empty is
  forgotten). ``since`` answers a reconnect: the events after its id, or None (send ``reset``)
  when some are gone: evicted from the topic's ring (``dropped_through``), or from a topic
  forgotten whole (``forgotten_through``), or when the id is not one of this process's.
* **Hand-over to the reactor.** ``publish`` appends the frame to ``pending`` and wakes the
  reactor when the list was empty; the reactor ``take``s the list whole, so a burst of
  publishes costs one wake-up, and its fan-out coalesces them (one send per subscriber).

Threads: ``publish`` runs in workers (any thread bound to the server), ``since`` and ``take``
in the reactor, ``stats`` anywhere; every field below ``lock`` is written under it. Imports
the standard library and the contract's EventTooLarge.
"""
import collections
import json
import re
import threading
import time

from handlers._events import EventTooLarge

# What an event costs the rings beyond its frame's bytes (its tuple, its slots in two deques),
# and what a topic costs (its ring and its dict entry): counted against ring_bytes, so that a
# flood of tiny events on many topics is bounded by it as well (sys.getsizeof, CPython 3.11).
EVENT_OVERHEAD_BYTES = 150
TOPIC_OVERHEAD_BYTES = 800
MAX_EVENT_NAME_CHARS = 100
_LINE_BREAK = re.compile("\r\n|\r|\n")   # the SSE parser's line ends (WHATWG HTML 9.2.5)
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_encode_ascii = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def event_body(data, event=None):
    """The frame of an event after its ``id:`` line, as bytes: ``event:`` (if named), its
    ``data:`` lines and the blank line that ends it. ``data``: a str, or a JSON value."""
    if event is not None:
        if (not isinstance(event, str) or not event or len(event) > MAX_EVENT_NAME_CHARS
                or _LINE_BREAK.search(event)):
            raise ValueError("an event name must be a str of 1 to %d characters, without "
                             "line breaks" % MAX_EVENT_NAME_CHARS)
    if isinstance(data, str):
        text = data
    else:
        try:
            text = _encode(data)
        except TypeError:
            raise TypeError("event data must be a str or a JSON value, not %s"
                            % type(data).__name__) from None
    lines = "".join("data: %s\n" % line for line in _LINE_BREAK.split(text))
    head = "" if event is None else "event: %s\n" % event
    try:
        return (head + lines + "\n").encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate: JSON can escape it, text cannot hold it
        if isinstance(data, str):
            raise ValueError("event data must be Unicode text (no lone surrogates)") from None
        return event_body(_encode_ascii(data), event)


class _Ring:
    __slots__ = ("events", "dropped_through")

    def __init__(self):
        self.events = collections.deque()   # (id, frame, cost), oldest first
        self.dropped_through = 0            # the newest id evicted from this ring


class EventHub:
    """For handlers (through the contract): ``publish``; for the reactor: ``take``,
    ``since``, ``reset_frame``, ``parse_id``; ``stats()`` for any thread. ``use_settings``
    at start and on a reload ([events]: ring sizes and the event cap apply from then on)."""

    def __init__(self, settings, wake=None, clock=time.time):
        self.first_id = int(clock() * 1e6)   # never an event's id; ids after it are this process's
        self.wake = wake   # the reactor's wake-up (Handoff.wake); any thread may call it
        self.lock = threading.Lock()
        self.last_id = self.first_id   # the id of the last event published
        self.topics = {}               # topic -> _Ring
        self.order = collections.deque()   # (id, topic): every ring's events, oldest first
        self.live = 0                  # events in the rings (order may hold evicted ones too)
        self.ring_bytes = 0            # what the rings cost, as counted against ring_bytes
        self.forgotten_through = self.first_id   # the newest id of a topic forgotten whole
        self.pending = []              # (topic, id, frame) the reactor has not taken yet
        self.published = 0
        self.use_settings(settings)

    def use_settings(self, settings):
        self.settings = settings

    # -- publishing (workers) -------------------------------------------------------------------
    def publish(self, topic, data, event=None):
        body = event_body(data, event)
        limit = self.settings.max_event_bytes
        if len(body) > limit:
            raise EventTooLarge("an event of %d bytes is over [events] max_event_bytes (%d): "
                                "publish less (an id to fetch) or raise the setting"
                                % (len(body), limit))
        with self.lock:
            self.last_id += 1
            event_id = self.last_id
            frame = b"id: %d\n%s" % (event_id, body)
            self._keep(topic, event_id, frame)
            woken = not self.pending
            self.pending.append((topic, event_id, frame))
            self.published += 1
        if woken and self.wake is not None:
            self.wake()
        return event_id

    def _keep(self, topic, event_id, frame):
        """Put the event in its topic's ring; evict to keep to ring_events and ring_bytes."""
        settings = self.settings
        ring = self.topics.get(topic)
        if settings.ring_events == 0:
            self.forgotten_through = event_id   # nothing kept: a reconnect is told reset
            return
        if ring is None:
            ring = self.topics[topic] = _Ring()
            self.ring_bytes += TOPIC_OVERHEAD_BYTES
        cost = len(frame) + EVENT_OVERHEAD_BYTES
        ring.events.append((event_id, frame, cost))
        self.order.append((event_id, topic))
        self.live += 1
        self.ring_bytes += cost
        if len(ring.events) > settings.ring_events:
            self._evict_first(topic, ring)
        while self.ring_bytes > settings.ring_bytes and self.order:
            oldest_id, oldest_topic = self.order.popleft()
            oldest = self.topics.get(oldest_topic)
            if oldest is not None and oldest.events and oldest.events[0][0] == oldest_id:
                self._evict_first(oldest_topic, oldest)
        if len(self.order) > 2 * self.live + 64:
            # evictions by ring_events leave their entries in order: rebuild it now and then
            # (amortised: each rebuild halves it)
            self.order = collections.deque(sorted(
                (entry[0], name) for name, kept in self.topics.items() for entry in kept.events))

    def _evict_first(self, topic, ring):
        event_id, _, cost = ring.events.popleft()
        ring.dropped_through = event_id
        self.live -= 1
        self.ring_bytes -= cost
        if not ring.events:
            del self.topics[topic]
            self.ring_bytes -= TOPIC_OVERHEAD_BYTES
            self.forgotten_through = max(self.forgotten_through, event_id)

    # -- the reactor ----------------------------------------------------------------------------
    def take(self):
        """The events published since the last take, oldest first: [(topic, id, frame)]."""
        with self.lock:
            taken, self.pending = self.pending, []
        return taken

    def parse_id(self, text):
        """A Last-Event-ID as a position in this process's events, or None: absent, not a
        number, or not one of this process's (then the client is told ``reset``)."""
        if text is None:
            return None
        text = text.strip()
        if not text.isdigit() or not text.isascii() or len(text) > 20:
            return None
        position = int(text)
        if position < self.first_id or position > self.last_id:
            return None
        return position

    def since(self, topics, after, through):
        """The frames of ``topics`` with ids in (``after``, ``through``], oldest first, as
        one bytes; None if some of them are gone (the client must be told ``reset``)."""
        found = []
        with self.lock:
            for topic in topics:
                ring = self.topics.get(topic)
                if ring is None:
                    if after < self.forgotten_through:
                        return None
                    continue
                if ring.dropped_through > after:
                    return None
                for event_id, frame, _ in reversed(ring.events):
                    if event_id <= after:
                        break
                    if event_id <= through:
                        found.append((event_id, frame))
        found.sort()
        return b"".join(frame for _, frame in found)

    @staticmethod
    def reset_frame(position):
        """What a client whose missed events are gone gets: ``event: reset`` at ``position``."""
        return b"id: %d\nevent: reset\ndata: reset\n\n" % position

    def stats(self):
        """For any thread: counts read without the lock (ints, atomic under the GIL)."""
        return {"published": self.published, "ring_events": self.live,
                "ring_bytes": self.ring_bytes, "topics": len(self.topics),
                "last_id": self.last_id}
