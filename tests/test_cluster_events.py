"""Live events and the response cache across processes (issue 24), on a real redis-server
(tests/redisd.py), never a mocked one.

First the parts alone: EventHubs and ResponseCaches joined to Cluster objects of their own
(as each process has one) on one Redis: one id sequence, resumption across hubs, gaps, a
Redis restart, invalidations that reach every cache. Then whole servers: two in-process
onebox servers on one Redis, an SSE client on one and notes written through the other.
"""
import json
import threading
import time

import pytest

from handlers._events import EventsUnavailable
from conftest import wait_until
from onebox.cache import ResponseCache
from onebox.cluster import Cluster
from onebox.events import EventHub
from onebox.settings import load_config
from redisd import needs_redis, redis_server
from test_notes_events import EventReader, call, expect

pytestmark = needs_redis


@pytest.fixture
def redisd(tmp_path):
    with redis_server(tmp_path) as server:
        yield server


class Node:
    """One process's parts as the engine wires them: its Cluster, and an EventHub and a
    ResponseCache joined to it before it starts. ``woken`` counts the hub's wake-ups; ``taken``
    is what the reactor would have taken, in order."""

    def __init__(self, url, name):
        config = load_config(overrides={"cluster.redis_url": url, "cluster.timeout_s": 0.5})
        self.cluster = Cluster(config.cluster, durability="off", log=lambda message: None)
        self.cluster.connect()
        self.woken = threading.Semaphore(0)
        self.hub = EventHub(config.events, wake=self.woken.release)
        self.cache = ResponseCache()
        self.cache.join_cluster(self.cluster)
        self.hub.join_cluster(self.cluster)
        self.cluster.start(name)
        assert wait_until(lambda: self.cluster.up, 5.0), "%s did not subscribe" % name
        self.hub.take()   # the join's own marker (the reactor's position)
        self.taken = []

    def take(self):
        self.taken.extend(self.hub.take())
        return self.taken

    def events(self, count, seconds=5.0):
        """The first ``count`` events taken (markers included: topic None)."""
        assert wait_until(lambda: len(self.take()) >= count, seconds), self.taken
        return self.taken[:count]

    def close(self):
        self.cluster.close()


@pytest.fixture
def nodes(redisd):
    made = []

    def make(name="node"):
        node = Node(redisd.url, name)
        made.append(node)
        return node
    yield make
    for node in made:
        node.close()


def ids_of(taken):
    return [event_id for topic, event_id, _ in taken if topic is not None]


# --- the hubs -----------------------------------------------------------------------------------

def test_an_event_published_through_one_hub_reaches_every_hub_in_one_id_sequence(nodes):
    a, b = nodes("a"), nodes("b")
    published = []
    for number in range(6):   # alternately through each: one counter for both
        published.append((a if number % 2 else b).hub.publish("notes", {"n": number},
                                                              "created"))
    assert published == sorted(published) and len(set(published)) == 6
    assert published == list(range(published[0], published[0] + 6))
    for node in (a, b):   # the publisher's own hub takes its events from the subscription too
        taken = node.events(6)
        assert ids_of(taken) == published, (node.cluster.label, taken)
        assert [topic for topic, _, _ in taken] == ["notes"] * 6
        assert taken[3][2] == b'id: %d\nevent: created\ndata: {"n":3}\n\n' % published[3]
        assert node.hub.last_id == published[-1]
    assert a.hub.stats()["published"] == 3 and a.hub.stats()["received"] == 6
    assert a.hub.stats()["gaps"] == b.hub.stats()["gaps"] == 0


def test_ids_start_at_the_clock_like_one_process_s_and_carry_on_from_the_counter(nodes):
    before = int(time.time() * 1e6)
    a = nodes("a")
    first = a.hub.publish("t", "x")
    assert before < first <= int(time.time() * 1e6) + 1
    b = nodes("b")   # joins later: carries on from the shared counter, not from its clock
    assert b.hub.first_id == first
    assert b.hub.publish("t", "y") == first + 1


def test_a_last_event_id_from_another_hub_is_resumed_exactly(nodes):
    a, b = nodes("a"), nodes("b")
    ids = [a.hub.publish("notes", "note %d" % number) for number in range(5)]
    b.events(5)
    # a page that saw the second event through a, reconnecting to b
    after = b.hub.parse_id(str(ids[1]))
    assert after == ids[1]
    missed = b.hub.since(["notes"], after, b.hub.last_id)
    assert [int(line[4:]) for line in missed.decode().splitlines()
            if line.startswith("id: ")] == ids[2:]   # each once, in order, none lost
    assert b.hub.since(["notes"], ids[-1], b.hub.last_id) == b""


def test_an_id_from_before_a_hub_joined_is_answered_reset(nodes):
    a = nodes("a")
    early = [a.hub.publish("notes", "old %d" % number) for number in range(3)]
    a.events(3)
    b = nodes("b")
    assert b.hub.parse_id(str(early[0])) is None   # b never had what came after it: reset
    assert b.hub.parse_id(str(early[-1])) == early[-1]   # nothing after it was missed
    late = a.hub.publish("notes", "new")
    b.events(1)
    assert b.hub.since(["notes"], early[-1], b.hub.last_id) == \
        b"id: %d\ndata: new\n\n" % late


def test_ids_missing_from_the_sequence_are_a_gap_that_resets(nodes, redisd):
    a, b = nodes("a"), nodes("b")
    first = a.hub.publish("notes", "one")
    b.events(1)
    # an event b never hears of (told on a channel nobody listens to): the counter moves on
    from onebox.redis import Redis
    client = Redis(redisd.url)
    try:
        client.call("INCR", a.cluster.key("events:last_id"))
    finally:
        client.close()
    third = a.hub.publish("notes", "three")
    taken = b.events(3)
    assert taken[1] == (None, third - 1, b"id: %d\nevent: reset\ndata: reset\n\n" % (third - 1))
    assert taken[2][1] == third
    assert b.hub.parse_id(str(first)) is None          # before the gap: reset
    assert b.hub.parse_id(str(third - 1)) == third - 1   # the reset's own id: resumed
    assert b.hub.stats()["gaps"] == 1


def test_a_redis_restart_marks_a_gap_and_events_flow_again(nodes, redisd):
    a, b = nodes("a"), nodes("b")
    before = a.hub.publish("notes", "before")
    b.events(1)
    redisd.restart()   # (no AOF: the counter is gone with the rest)
    for node in (a, b):
        taken = node.events(2, seconds=10)
        assert taken[1][0] is None, taken   # a reset for the live pages on the way back
        assert node.hub.parse_id(str(before - 1)) is None
    after = None
    deadline = time.monotonic() + 10
    while after is None:   # the client's pool reconnects after its backoff
        try:
            after = b.hub.publish("notes", "after")
        except EventsUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert after > before   # the counter is made anew at the clock: ids never go back
    for node in (a, b):
        assert wait_until(lambda: after in ids_of(node.take()), 5), node.taken
        assert ids_of(node.taken) == [before, after]


def test_publish_while_redis_is_down_raises_a_503_error(nodes, redisd):
    a = nodes("a")
    redisd.kill()
    with pytest.raises(EventsUnavailable, match="redis") as raised:
        a.hub.publish("notes", "lost")
    assert raised.type.http_status == 503


# --- the caches ---------------------------------------------------------------------------------

def page(text):
    return lambda: text


def test_an_invalidation_through_one_cache_reaches_the_others(nodes):
    a, b = nodes("a"), nodes("b")
    assert b.cache.serve("/api/list?", 60, page(b"old")).body == b"old"
    assert b.cache.serve("/other?", 60, page(b"kept")).body == b"kept"
    assert a.cache.serve("/api/list?", 60, page(b"old")).body == b"old"
    a.cache.invalidate("/api/")
    assert a.cache.serve("/api/list?", 60, page(b"new")).body == b"new"   # at once here
    assert wait_until(lambda: b.cache.stats()["entries"] == 1, 5.0)   # and promptly there
    assert b.cache.serve("/api/list?", 60, page(b"new")).body == b"new"
    assert b.cache.serve("/other?", 60, page(b"changed")).body == b"kept"   # not its prefix
    # a's own message is not applied twice: its fresh entry stays
    assert a.cache.serve("/api/list?", 60, page(b"newer")).body == b"new"
    assert a.cache.stats()["untold"] == 0


def test_clear_empties_every_cache(nodes):
    a, b = nodes("a"), nodes("b")
    b.cache.serve("/x?", 60, page(b"x"))
    a.cache.clear()
    assert wait_until(lambda: b.cache.stats()["entries"] == 0, 5.0)


def test_a_cache_whose_subscription_comes_back_drops_everything(nodes, redisd):
    a, b = nodes("a"), nodes("b")
    b.cache.serve("/x?", 60, page(b"x"))
    redisd.restart()   # an invalidation told meanwhile would have been lost
    assert wait_until(lambda: b.cache.stats()["entries"] == 0, 10)
    assert wait_until(lambda: b.cluster.up, 10)
    b.cache.serve("/x?", 60, page(b"y"))
    a.cache.invalidate("/x")   # and invalidations are heard again
    assert wait_until(lambda: b.cache.stats()["entries"] == 0, 5.0)


def test_an_invalidation_redis_did_not_take_is_counted(nodes, redisd):
    a = nodes("a")
    a.cache.serve("/x?", 60, page(b"x"))
    redisd.kill()
    assert a.cache.invalidate("/x") == 1   # this process's copy goes all the same
    assert a.cache.stats()["untold"] == 1


# --- whole servers ------------------------------------------------------------------------------

@pytest.fixture
def site(start_server, redisd):
    """``start()`` starts one more onebox server (its own data_dir) on the one Redis."""
    readers = []

    def start():
        return start_server(config={"cluster.redis_url": redisd.url,
                                    "state.durability": "off", "events.retry_ms": 100})

    def subscribe(server, last_event_id=None):
        reader = EventReader(server, "/api/notes/events", last_event_id)
        readers.append(reader)
        return reader
    start.subscribe = subscribe
    yield start
    for reader in readers:
        reader.close()


def write(server, text, seconds=0.0):
    """POST a note through ``server``; with ``seconds``, retried while it answers 503."""
    deadline = time.monotonic() + seconds
    while True:
        status, note = call(server, "POST", "/api/notes", {"text": text})
        if status != 503 or time.monotonic() > deadline:
            assert status == 201, (status, note)
            return note
        time.sleep(0.05)


def seen_by(server, event_id):
    """Wait until ``server``'s hub has taken the event ``event_id`` from Redis."""
    assert wait_until(lambda: server.context.events.last_id >= event_id, 5.0), \
        (server.context.events.last_id, event_id)


def test_a_subscriber_on_one_server_gets_a_note_written_through_another(site):
    a, b = site(), site()
    on_a, on_b = site.subscribe(a), site.subscribe(b)
    notes_written = [write(b, "through b"), write(a, "through a"), write(b, "b again")]
    for reader in (on_a, on_b):   # every subscriber, wherever it is, gets every note
        ids = [expect(reader, "created", note) for note in notes_written]
        assert ids == list(range(ids[0], ids[0] + 3))   # one sequence across the servers
        assert reader.quiet()


def test_a_client_that_reconnects_to_another_server_gets_exactly_what_it_missed(site):
    a, b = site(), site()
    on_a = site.subscribe(a)
    seen = expect(on_a, "created", write(a, "seen on a"))
    on_a.close()
    missed = [write(a, "missed 1"), write(b, "missed 2"), write(a, "missed 3")]
    back = site.subscribe(b, last_event_id=str(seen))
    ids = [expect(back, "created", note) for note in missed]
    assert ids == [seen + 1, seen + 2, seen + 3]   # none lost, in order
    assert back.quiet()                           # none twice
    later = write(a, "live again")
    assert expect(back, "created", later) == seen + 4


def test_an_id_from_before_a_server_joined_is_a_reset(site):
    a = site()
    on_a = site.subscribe(a)
    old = expect(on_a, "created", write(a, "before b"))
    expect(on_a, "created", write(a, "before b too"))
    b = site()
    reader = site.subscribe(b, last_event_id=str(old))   # b cannot know what followed it
    got = reader.next_event()
    assert (got["event"], got["data"]) == ("reset", "reset")
    assert reader.quiet()
    note = write(a, "after the reset")
    assert expect(reader, "created", note) > int(got["id"])


def test_after_a_redis_restart_open_streams_get_a_reset_and_then_new_events(site, redisd):
    a, b = site(), site()
    on_a, on_b = site.subscribe(a), site.subscribe(b)
    first = write(a, "before the restart")
    for reader in (on_a, on_b):
        expect(reader, "created", first)
    redisd.restart()   # what was published meanwhile is lost to pub/sub: the pages re-read
    for reader in (on_a, on_b):
        got = reader.next_event()
        assert (got["event"], got["data"]) == ("reset", "reset"), got
    note = write(b, "after the restart", seconds=10)
    for reader in (on_a, on_b):
        got = reader.next_event()
        while got["event"] == "reset":   # (the counter made anew is one more gap)
            got = reader.next_event()
        assert (got["event"], json.loads(got["data"])) == ("created", note), got


def test_a_response_invalidated_through_one_server_is_not_served_stale_by_another(site):
    a, b = site(), site()
    for server in (a, b):
        assert server.context.responses.serve("/api/notes?", 60, lambda: b"old").body == b"old"
    a.context.responses.invalidate("/api/notes")
    assert wait_until(lambda: b.context.responses.stats()["entries"] == 0, 5.0)
    assert b.context.responses.serve("/api/notes?", 60, lambda: b"new").body == b"new"
