"""Live events as areas see them (docs/areas.md, "Live events"): server-sent events.

``publish(topic, data, event=None)`` from any handler (or a thread it started with
``carry_context``) tells every browser subscribed to ``topic`` at once; it returns the event's
id without waiting for any subscriber. ``data`` is text, or anything JSON can write (sent as
compact JSON). A handler subscribes a client by returning ``event_stream(request, topic, ...)``:
the connection then waits in the reactor, with no worker and no thread, and gets each event
published to its topics (``text/event-stream``, W3C/WHATWG HTML "Server-sent events"), a
comment line every ``[events] heartbeat_s``, and on reconnecting with ``Last-Event-ID`` what it
missed (or ``event: reset`` when that is gone: reload the page's state then). In a cluster
(``[cluster] redis_url``) an event published through any process reaches the subscribers of
every process, with one sequence of ids across them::

    def note_events(request):
        return event_stream(request, "notes")

    def create_note(request):
        ...
        publish("notes", note, event="created")

The runtime refuses a subscriber past ``[events] max_subscribers_per_client`` (429) or
``max_subscribers`` (503), and cuts one that does not read. The implementation is
onebox/events.py (the hub: ids, rings, limits) and onebox/streams.py (the reactor's side).
"""
from handlers import _context
from handlers._core import Response

__all__ = ["publish", "event_stream", "EventStream", "EventTooLarge", "EventsUnavailable"]

MAX_TOPICS_PER_STREAM = 32   # one stream's topics: a page follows a few things, not a catalogue
MAX_TOPIC_CHARS = 200


class EventTooLarge(ValueError):
    """``publish`` of an event over ``[events] max_event_bytes``: nothing was published (a
    handler that lets it propagate answers 500; catch it to answer otherwise)."""


class EventsUnavailable(Exception):
    """``publish`` in a cluster (``[cluster] redis_url``) while Redis cannot be reached: the
    event may not have been sent (a handler that lets it propagate answers 503; the pages of
    every process are told ``reset`` when Redis is back, and re-read the state)."""

    http_status = 503   # the runtime's mapping for infrastructure errors (onebox/workers.py)
    public_message = "live events are unavailable; try again later"


def check_topic(topic):
    """``topic``, if it is a usable topic name; else ValueError (a bug in the area)."""
    if not isinstance(topic, str) or not topic or len(topic) > MAX_TOPIC_CHARS:
        raise ValueError("an event topic must be a non-empty str of at most %d characters"
                         % MAX_TOPIC_CHARS)
    if not topic.isprintable():
        raise ValueError("an event topic must not hold control characters")
    return topic


def publish(topic, data, event=None):
    """Send ``data`` (str, or a JSON value) as an event of type ``event`` (default "message")
    to ``topic``'s subscribers; returns its id (an int). Never blocks on a subscriber.
    EventTooLarge past ``[events] max_event_bytes``; ValueError for a bad topic or event name
    (a line break, or an empty one); TypeError for data JSON cannot write; in a cluster,
    EventsUnavailable (a 503) while Redis is down."""
    return _context.require("events", "publish").publish(check_topic(topic), data, event)


class EventStream:
    """What ``event_stream`` puts in its Response's ``stream``: the topics, the id the client
    saw last (its ``Last-Event-ID``: a str, or None) and ``position``, the id of the last event
    published when the handler answered (a new subscriber gets what comes after it). The
    runtime holds the connection."""

    __slots__ = ("topics", "last_event_id", "position")

    def __init__(self, topics, last_event_id=None, position=0):
        self.topics = topics
        self.last_event_id = last_event_id
        self.position = position


def event_stream(request, *topics, headers=None):
    """A Response that subscribes the client to ``topics`` (a GET handler's answer). Extra
    ``headers`` are (name, value) pairs; the runtime writes Content-Type, Cache-Control and
    X-Accel-Buffering (nginx: do not buffer this response)."""
    if not topics or len(topics) > MAX_TOPICS_PER_STREAM:
        raise ValueError("event_stream takes 1 to %d topics" % MAX_TOPICS_PER_STREAM)
    unique = tuple(dict.fromkeys(check_topic(topic) for topic in topics))
    response = Response(b"", 200, [("Content-Type", "text/event-stream; charset=utf-8"),
                                   ("Cache-Control", "no-cache"),
                                   ("X-Accel-Buffering", "no")] + list(headers or ()))
    hub = _context.require("events", "event_stream")
    response.stream = EventStream(unique, request.headers.get("last-event-id"), hub.last_id)
    return response
