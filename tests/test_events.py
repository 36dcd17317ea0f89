"""The event hub (onebox/events.py): ids, frames, the replay rings, the hand-over. No sockets:
the reactor's side is tests/test_streams.py."""
import types

import pytest

from handlers._events import EventTooLarge, check_topic
from onebox.events import EVENT_OVERHEAD_BYTES, TOPIC_OVERHEAD_BYTES, EventHub, event_body

START_S = 1_800_000_000.0   # the hub's clock at its start: ids begin at START_S * 1e6


def settings(**changes):
    values = dict(ring_events=256, ring_bytes=16 * 1024 * 1024, max_event_bytes=65536)
    values.update(changes)
    return types.SimpleNamespace(**values)


def hub(**changes):
    return EventHub(settings(**changes), clock=lambda: START_S)


def ids_in(frames):
    return [int(line[4:]) for line in frames.decode().splitlines() if line.startswith("id: ")]


# --- the frame -----------------------------------------------------------------------------

def test_data_is_split_where_the_browser_splits_lines_and_nowhere_else():
    # CRLF, LF and CR end a line (WHATWG HTML 9.2.5); U+2028 and \x0b do not
    assert event_body("one\r\ntwo\nthree\rfour\u2028five\x0bsix") == (
        "data: one\ndata: two\ndata: three\ndata: four\u2028five\x0bsix\n\n").encode()
    assert event_body("") == b"data: \n\n"
    assert event_body("trailing\n") == b"data: trailing\ndata: \n\n"


def test_json_data_is_compact_and_named_events_say_so():
    assert event_body({"id": "7", "text": "é\n"}, "created") == (
        'event: created\ndata: {"id":"7","text":"é\\n"}\n\n').encode()
    assert event_body([1, 2]) == b"data: [1,2]\n\n"
    # a lone surrogate: JSON escapes it (text could not hold it)
    assert event_body({"t": "\ud800"}) == b'data: {"t":"\\ud800"}\n\n'


@pytest.mark.parametrize("name", ["", "a\nb", "a\rb", "x" * 101, 7])
def test_a_bad_event_name_is_refused(name):
    with pytest.raises(ValueError):
        event_body("data", name)


def test_data_that_is_not_text_or_json_is_refused():
    with pytest.raises(TypeError, match="str or a JSON value"):
        event_body(object())
    with pytest.raises(ValueError, match="lone surrogates"):
        event_body("\ud800")
    with pytest.raises(ValueError):
        event_body({"x": float("nan")})


@pytest.mark.parametrize("topic", ["", "a\nb", "t\x00", "x" * 201, None, b"notes"])
def test_a_bad_topic_is_refused(topic):
    with pytest.raises(ValueError):
        check_topic(topic)


# --- publishing ----------------------------------------------------------------------------

def test_ids_start_at_the_clock_in_microseconds_and_grow_across_topics():
    events = hub()
    first = events.publish("a", "1")
    second = events.publish("b", "2")
    assert events.first_id == int(START_S * 1e6) < first < second == first + 1
    assert events.take() == [("a", first, b"id: %d\ndata: 1\n\n" % first),
                             ("b", second, b"id: %d\ndata: 2\n\n" % second)]
    assert events.take() == []


def test_an_event_over_the_cap_is_refused_and_nothing_is_published():
    events = hub(max_event_bytes=100)
    events.publish("t", "x" * 90)
    with pytest.raises(EventTooLarge, match=r"max_event_bytes \(100\)"):
        events.publish("t", "x" * 100)
    assert events.stats()["published"] == 1 and len(events.take()) == 1


def test_a_burst_of_publishes_wakes_the_reactor_once_until_it_takes_them():
    woken = []
    events = hub()
    events.wake = lambda: woken.append(1)
    for number in range(5):
        events.publish("t", str(number))
    assert len(woken) == 1
    assert len(events.take()) == 5
    events.publish("t", "after")
    assert len(woken) == 2


# --- replay --------------------------------------------------------------------------------

def test_since_gives_what_came_after_an_id_in_order_once():
    events = hub()
    ids = [events.publish("t", str(number)) for number in range(5)]
    assert ids_in(events.since(["t"], ids[1], ids[-1])) == ids[2:]
    assert events.since(["t"], ids[-1], ids[-1]) == b""
    # only up to what the reactor has taken: the rest comes with the next fan-out
    assert ids_in(events.since(["t"], ids[0], ids[2])) == ids[1:3]


def test_several_topics_are_merged_by_id():
    events = hub()
    ids = [events.publish(topic, topic) for topic in ("a", "b", "c", "a", "b")]
    assert ids_in(events.since(["b", "a"], ids[0], ids[-1])) == [ids[1], ids[3], ids[4]]


def test_an_id_older_than_the_ring_is_told_reset():
    events = hub(ring_events=3)
    ids = [events.publish("t", str(number)) for number in range(6)]
    assert ids_in(events.since(["t"], ids[2], ids[-1])) == ids[3:]   # the ring holds 3..5
    assert events.since(["t"], ids[1], ids[-1]) is None              # 2 is gone
    assert events.reset_frame(ids[-1]) == b"id: %d\nevent: reset\ndata: reset\n\n" % ids[-1]


def test_ring_bytes_bounds_all_topics_and_a_forgotten_topic_is_told_reset():
    frame_cost = len(b"id: 1800000000000001\ndata: xxxxxxxxxx\n\n") + EVENT_OVERHEAD_BYTES
    events = hub(ring_bytes=2 * TOPIC_OVERHEAD_BYTES + 3 * frame_cost)
    first = events.publish("old", "x" * 10)
    later = [events.publish("new", "x" * 10) for _ in range(3)]
    stats = events.stats()
    assert stats["ring_bytes"] <= 2 * TOPIC_OVERHEAD_BYTES + 3 * frame_cost
    assert stats["topics"] == 1 and stats["ring_events"] == 3   # "old" went whole
    assert events.since(["old"], first - 1, later[-1]) is None
    assert events.since(["old"], first, later[-1]) == b""   # it had seen all of "old"
    assert ids_in(events.since(["new"], first, later[-1])) == later


def test_no_ring_means_every_reconnect_after_an_event_is_told_reset():
    events = hub(ring_events=0)
    before = events.last_id
    assert events.since(["t"], before, before) == b""
    last = events.publish("t", "x")
    assert events.since(["t"], before, last) is None
    assert events.since(["t"], last, last) == b""
    assert events.stats()["ring_bytes"] == 0


def test_evictions_by_count_leave_the_eviction_order_bounded():
    events = hub(ring_events=4)
    for number in range(10000):
        events.publish("t%d" % (number % 3), "x")
    assert events.stats()["ring_events"] == 12
    assert len(events.order) <= 2 * 12 + 64
    events.take()


@pytest.mark.parametrize("text", [None, "", "abc", "-1", "1e3", "١٢", "9" * 30])
def test_a_last_event_id_that_is_no_position_here_is_none(text):
    assert hub().parse_id(text) is None


def test_ids_of_another_process_or_the_future_are_none():
    events = hub()
    last = events.publish("t", "x")
    assert events.parse_id(str(last)) == last
    assert events.parse_id(" %d " % events.first_id) == events.first_id
    assert events.parse_id(str(events.first_id - 1)) is None   # an earlier process's
    assert events.parse_id(str(last + 1)) is None              # not given yet
