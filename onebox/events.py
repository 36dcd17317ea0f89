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

* **In a cluster** (``join_cluster``: ``[cluster] redis_url``, onebox/cluster.py), the ids
  are the site's, not the process's: ``publish`` runs one Lua script that takes the next id
  from a counter in Redis shared by every process (made at the current time in microseconds
  when absent, as a process's own ids start, so that ids from before a Redis wipe are below
  it) and PUBLISHes the event on the cluster's "events" channel in the same step. No hub keeps
  what it published itself: every hub, the publisher's too, takes events only as they come
  from the subscription, where Redis delivers them in the order the script ran, that is in id
  order; so every process holds the same events in the same order, and a ``Last-Event-ID``
  given by one process is resumed exactly by another that has the events after it. One it
  has not had yet (a browser that reconnected faster than the event came) is answered
  ``reset``, as any id this process cannot place is: the page re-reads, never misses.
* **Gaps.** Pub/sub keeps nothing for a subscriber that is away. The ids say what was
  missed: an event whose id is not the last one plus one means the ones between are lost
  (events published between the join and the subscription, a Redis wiped and its counter
  made anew), and a subscription that comes back after a loss (``on_reconnect``) may have
  missed any. Either is a *gap*: the rings are emptied, ids before it are answered ``reset``
  (``first_id`` moves to it), and every live subscriber is sent ``event: reset`` (a marker in
  ``pending``: ``(None, position, frame)``; onebox/streams.py), so its page re-reads the state.
* **Redis down.** ``publish`` raises EventsUnavailable (a 503), rather than publishing to this
  process's subscribers alone: an event only some pages see, under an id the others never
  had, would be a quiet wrong answer, and a site whose Redis is down answers its writes 503
  anyway (the store is there too). The event may or may not have been sent (a timeout does not
  say); the pages learn what happened from the reset that every process sends when its
  subscription comes back.

Threads: ``publish`` runs in workers (any thread bound to the server), ``since`` and ``take``
in the reactor, ``stats`` anywhere; in a cluster, the subscription's thread runs ``_arrived``
and ``_resubscribed``. Every field below ``lock`` is written under it. Imports the standard
library, the contract's EventTooLarge and EventsUnavailable, and onebox/redis.py's errors.
"""
import collections
import json
import re
import threading
import time

from handlers._events import EventTooLarge, EventsUnavailable
from onebox.redis import RedisError, RedisUnavailable

# What an event costs the rings beyond its frame's bytes (its tuple, its slots in two deques),
# and what a topic costs (its ring and its dict entry): counted against ring_bytes, so that a
# flood of tiny events on many topics is bounded by it as well (sys.getsizeof, CPython 3.11).
EVENT_OVERHEAD_BYTES = 150
TOPIC_OVERHEAD_BYTES = 800
MAX_EVENT_NAME_CHARS = 100
_LINE_BREAK = re.compile("\r\n|\r|\n")   # the SSE parser's line ends (WHATWG HTML 9.2.5)
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_encode_ascii = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode

# A cluster's publish, in one step so that ids and messages are in the same order: the next id
# (the counter made, when absent, at the later of the publisher's clock and the last id it saw,
# so that ids never go back after a wipe), then the message: the cluster's envelope (who sent
# it: Cluster.envelope), the id, the topic (printable: no newline) and the frame after its
# "id:" line. %d: Lua 5.1 writes numbers past 1e14 as 1.7e+15.
# KEYS: the counter; ARGV: now (us), the last id seen, the channel, the envelope, topic, body.
PUBLISH_SCRIPT = """
local id
if redis.call('EXISTS', KEYS[1]) == 1 then
  id = redis.call('INCR', KEYS[1])
else
  id = math.max(tonumber(ARGV[1]), tonumber(ARGV[2])) + 1
  redis.call('SET', KEYS[1], string.format('%d', id))
end
redis.call('PUBLISH', ARGV[3],
           ARGV[4] .. string.format('%d', id) .. '\\n' .. ARGV[5] .. '\\n' .. ARGV[6])
return id
"""


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
    at start and on a reload ([events]: ring sizes and the event cap apply from then on);
    ``join_cluster`` at start, before the cluster starts, to share events through Redis."""

    def __init__(self, settings, wake=None, clock=time.time):
        self.clock = clock
        self.first_id = int(clock() * 1e6)   # never an event's id; ids after it are this process's
        self.wake = wake   # the reactor's wake-up (Handoff.wake); any thread may call it
        self.lock = threading.Lock()
        self.last_id = self.first_id   # the id of the last event published (taken, in a cluster)
        self.topics = {}               # topic -> _Ring
        self.order = collections.deque()   # (id, topic): every ring's events, oldest first
        self.live = 0                  # events in the rings (order may hold evicted ones too)
        self.ring_bytes = 0            # what the rings cost, as counted against ring_bytes
        self.forgotten_through = self.first_id   # the newest id of a topic forgotten whole
        self.pending = []              # (topic, id, frame) the reactor has not taken yet;
                                       # (None, position, reset frame) marks a gap
        self.published = 0
        self.received = 0              # in a cluster: events taken from the subscription
        self.gaps = 0                  # in a cluster: gaps marked (module docstring)
        self.cluster = None            # the cluster joined (onebox/cluster.py), or None
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
        if self.cluster is not None:
            return self._publish_shared(topic, body)
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

    # -- in a cluster (module docstring: "In a cluster", "Gaps") ---------------------------------
    def join_cluster(self, cluster):
        """Share events with the cluster's other processes from now on. The main thread, at
        start, before ``cluster.start()``: the counter is read (made if absent) so that ids
        after it are resumed, and the reactor, made with the process's own ids, is told the
        new position by a gap marker (it has no subscriber yet)."""
        self.cluster = cluster
        self._counter = cluster.key("events:last_id")
        self._channel = cluster.channel("events")
        self._script = cluster.redis.script(PUBLISH_SCRIPT)
        try:   # (connect_cluster has just reached Redis; if it is gone already, the clock)
            now = int(self.clock() * 1e6)
            _, current = cluster.redis.pipeline([("SET", self._counter, now, "NX"),
                                                 ("GET", self._counter)])
            position = int(current)
        except (RedisError, RedisUnavailable, TypeError, ValueError):
            position = int(self.clock() * 1e6)
        with self.lock:
            self._gap_locked(position)
            self.gaps = 0   # (joining is not a loss)
        if self.wake is not None:
            self.wake()
        cluster.on("events", self._arrived)
        cluster.on_reconnect(self._resubscribed)

    def _publish_shared(self, topic, body):
        """Publish through Redis (a worker); the event comes back through ``_arrived``."""
        cluster = self.cluster
        try:
            event_id = self._script(keys=(self._counter,), args=(
                int(self.clock() * 1e6), self.last_id, self._channel, cluster.envelope,
                topic, body))
        except (RedisError, RedisUnavailable) as error:
            raise EventsUnavailable("publish to %r: redis: %s" % (topic, error)) from None
        with self.lock:
            self.published += 1
        return int(event_id)

    def _arrived(self, payload, from_self):
        """An event from the cluster (the subscription's thread): keep it and hand it to the
        reactor, as a local publish does; a gap before it first (module docstring)."""
        head, _, rest = payload.partition(b"\n")
        topic, _, body = rest.partition(b"\n")
        try:
            event_id, topic = int(head), topic.decode("utf-8")
        except ValueError:
            return   # not one of ours (a stranger on the channel): nothing to deliver
        frame = b"id: %d\n%s" % (event_id, body)
        with self.lock:
            if event_id <= self.last_id:
                return   # before a gap marked already: the reset covered it
            woken = not self.pending
            if event_id != self.last_id + 1:
                self._gap_locked(event_id - 1)
            self.last_id = event_id
            self._keep(topic, event_id, frame)
            self.pending.append((topic, event_id, frame))
            self.received += 1
        if woken and self.wake is not None:
            self.wake()

    def _resubscribed(self):
        """The subscription is back after a loss (the subscription's thread): what was told
        meanwhile is lost, so a gap at the last id seen, and a reset to every live page."""
        with self.lock:
            woken = not self.pending
            self._gap_locked(self.last_id)
        if woken and self.wake is not None:
            self.wake()

    def _gap_locked(self, position):
        """Events up to ``position`` can no longer be resumed: empty the rings, move
        ``first_id`` there and queue a reset for the live subscribers."""
        self.topics.clear()
        self.order.clear()
        self.live = self.ring_bytes = 0
        self.first_id = self.last_id = self.forgotten_through = position
        self.pending.append((None, position, self.reset_frame(position)))
        self.gaps += 1

    # -- the rings ------------------------------------------------------------------------------
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
                "last_id": self.last_id, "received": self.received, "gaps": self.gaps}
