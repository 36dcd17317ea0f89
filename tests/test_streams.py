"""Event streams held by the reactor (onebox/streams.py), on a real server with raw sockets:
the head, events as they are published, heartbeats, Last-Event-ID, the caps, cut-offs of
subscribers that do not read, and the end at shutdown."""
import json
import socket
import threading
import time

import pytest

from conftest import read_until_close, request, wait_until
from handlers._core import HTTPError
from handlers._events import EventTooLarge, event_stream, publish
from test_metrics import scrape, value


def subscribe_one(request):
    return event_stream(request, request.params["topic"])


def subscribe_two(request):
    return event_stream(request, "a", "b")


def publish_it(request):
    body = request.json()
    try:
        event_id = publish(request.params["topic"], body["data"], body.get("event"))
    except EventTooLarge:
        raise HTTPError(413, "event too large") from None
    return {"id": event_id}


def publish_unchecked(request):
    return {"id": publish("t", request.text())}


ROUTES = [("GET", "/events/{topic}", subscribe_one), ("GET", "/both", subscribe_two),
          ("POST", "/publish/{topic}", publish_it), ("POST", "/raw", publish_unchecked)]


def start(start_server, **config):
    return start_server(routes=ROUTES, config=config)


def send(server, topic, data, event=None):
    body = json.dumps({"data": data, "event": event})
    status, _, answer = request(server, "POST", "/publish/" + topic, body,
                                {"Content-Type": "application/json"})
    assert status == 200, answer
    return json.loads(answer)["id"]


class Stream:
    """A raw-socket subscriber: ``head`` (bytes), then ``next_event()`` / ``read_for(s)``."""

    def __init__(self, server, path="/events/t", headers="", source=None, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", server.port))
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: test\r\n%s\r\n" % (path, headers)).encode())
        self.buf = b""
        self.head = None
        self.closed = False

    def read_head(self):
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        self.head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return self.head

    def status(self):
        return int((self.head or self.read_head()).split(b" ", 2)[1])

    def _recv(self, timeout=5):
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            raise EOFError("the server closed the stream")
        self.buf += data

    def next_block(self, timeout=5):
        """The next block up to a blank line (an event, a retry:, or a heartbeat)."""
        if self.head is None:
            self.read_head()
        deadline = time.monotonic() + timeout
        while True:
            for separator in (b"\n\n", b":\n"):
                if self.buf.startswith(b":\n"):
                    self.buf = self.buf[2:]
                    return b":"
            end = self.buf.find(b"\n\n")
            if end >= 0:
                block, self.buf = self.buf[:end], self.buf[end + 2:]
                return block
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("no event within %s s" % timeout)
            self._recv(left)

    def next_event(self, timeout=5):
        """The next event as a dict of its fields (data lines joined by \\n), skipping
        retry: blocks and heartbeats."""
        while True:
            block = self.next_block(timeout)
            if block == b":" or block.startswith(b"retry:"):
                continue
            fields = {}
            for line in block.decode().split("\n"):
                name, _, text = line.partition(": ")
                fields[name] = fields[name] + "\n" + text if name in fields else text
            return fields

    def close(self):
        self.sock.close()


@pytest.fixture
def streams():
    opened = []

    def open_stream(*args, **kwargs):
        stream = Stream(*args, **kwargs)
        opened.append(stream)
        return stream
    yield open_stream
    for stream in opened:
        stream.close()


def test_a_stream_gets_its_head_retry_and_each_event_published(start_server, streams):
    server = start(start_server)
    stream = streams(server)
    head = stream.read_head().decode().lower()
    assert head.startswith("http/1.1 200 ok")
    assert "content-type: text/event-stream; charset=utf-8" in head
    assert "cache-control: no-cache" in head and "x-accel-buffering: no" in head
    assert "connection: close" in head
    assert "content-length" not in head and "transfer-encoding" not in head
    assert stream.next_block().startswith(b"retry: 2000\nid: ")
    first = send(server, "t", {"text": "two\nlines"}, "created")
    second = send(server, "t", "one\r\nmore")
    send(server, "other", "not for this stream")
    event = stream.next_event()
    assert event == {"id": str(first), "event": "created",
                     "data": '{"text":"two\\nlines"}'}
    assert stream.next_event() == {"id": str(second), "data": "one\nmore"}
    with pytest.raises(socket.timeout):
        stream.next_event(timeout=0.3)


def test_every_subscriber_gets_an_event_and_no_thread_is_added(start_server, streams):
    server = start(start_server)
    assert request(server, "GET", "/hello")[0] == 200   # the pool is up
    threads = threading.active_count()
    opened = [streams(server) for _ in range(200)]
    for stream in opened:
        assert stream.status() == 200
    assert threading.active_count() == threads
    assert server.reactor.streams.count == 200
    event_id = send(server, "t", "all")
    for stream in opened:
        assert stream.next_event()["id"] == str(event_id)
    for stream in opened:
        stream.close()
    assert wait_until(lambda: server.reactor.streams.count == 0)


def test_a_quiet_stream_gets_heartbeats(start_server, streams):
    server = start(start_server, **{"events.heartbeat_s": 0.1})
    stream = streams(server)
    stream.next_block()   # retry:
    assert stream.next_block(timeout=2) == b":"
    assert stream.next_block(timeout=2) == b":"   # and again: not every other beat
    send(server, "t", "x")
    assert stream.next_event()["data"] == "x"


def test_a_reconnect_gets_what_it_missed_in_order_once_then_live_events(start_server, streams):
    server = start(start_server)
    stream = streams(server)
    stream.read_head()   # subscribed (the head is sent once it is): what follows is its
    ids = [send(server, "t", str(number)) for number in range(3)]
    assert [stream.next_event()["id"] for _ in ids] == [str(i) for i in ids]
    stream.close()
    missed = [send(server, "t", "missed %d" % number) for number in range(3)]
    again = streams(server, headers="Last-Event-ID: %d\r\n" % ids[-1])
    assert [again.next_event() for _ in missed] == [
        {"id": str(event_id), "data": "missed %d" % number}
        for number, event_id in enumerate(missed)]
    live = send(server, "t", "live")
    assert again.next_event() == {"id": str(live), "data": "live"}   # nothing twice


def test_a_reconnect_past_the_ring_or_from_another_process_gets_reset(start_server, streams):
    server = start(start_server, **{"events.ring_events": 2})
    ids = [send(server, "t", str(number)) for number in range(4)]
    for last_seen in (ids[0], 12345, "garbage"):
        stream = streams(server, headers="Last-Event-ID: %s\r\n" % last_seen)
        assert stream.next_event() == {"id": str(ids[-1]), "event": "reset", "data": "reset"}
        stream.close()
    # within the ring: what it missed, no reset
    stream = streams(server, headers="Last-Event-ID: %d\r\n" % ids[1])
    assert [stream.next_event()["id"] for _ in range(2)] == [str(ids[2]), str(ids[3])]


def test_a_stream_of_two_topics_gets_both_in_order(start_server, streams):
    server = start(start_server)
    stream = streams(server, "/both")
    stream.read_head()
    ids = [send(server, topic, topic) for topic in ("a", "c", "b", "a")]
    assert [stream.next_event()["id"] for _ in range(3)] == [str(ids[0]), str(ids[2]),
                                                             str(ids[3])]


def test_a_client_past_its_cap_gets_429_and_the_server_past_its_cap_503(start_server,
                                                                       streams):
    # (127.0.0.1 is a trusted proxy by default: its own requests are no client's)
    server = start(start_server, **{"events.max_subscribers_per_client": 2,
                                    "events.max_subscribers": 3})
    first, second = streams(server, source="127.0.0.5"), streams(server, source="127.0.0.5")
    assert first.status() == second.status() == 200
    third = streams(server, source="127.0.0.5")
    assert third.status() == 429
    assert b"retry-after: 10" in third.head.lower()
    assert b"too many event streams from your address" in third.buf + read_until_close(
        third.sock)
    other = streams(server, source="127.0.0.6")   # another client: its own share
    assert other.status() == 200
    full = streams(server, source="127.0.0.7")
    assert full.status() == 503
    assert b"too many event streams on this server" in full.buf + read_until_close(full.sock)
    first.close()   # a place comes free
    assert wait_until(lambda: server.reactor.streams.count == 2)
    assert streams(server, source="127.0.0.5").status() == 200
    samples = scrape(server)
    assert value(samples, "onebox_event_subscribers_refused_total", reason="client_cap") == 1
    assert value(samples, "onebox_event_subscribers_refused_total", reason="server_cap") == 1
    assert value(samples, "onebox_event_subscribers") == 3
    log = server.access_text()
    assert '"GET /events/t HTTP/1.1" 429' in log and '"GET /events/t HTTP/1.1" 503' in log


def test_a_subscriber_that_does_not_read_is_cut_and_the_others_go_on(start_server, streams):
    server = start(start_server, **{"events.max_unsent_bytes": 16384})
    reader = streams(server)
    sleeper = streams(server, rcvbuf=4096)   # never reads past its head
    assert reader.status() == sleeper.status() == 200
    chunk = "x" * 60000   # the kernel's buffers take a few MiB first
    sent = []
    for _ in range(400):
        sent.append(send(server, "t", chunk))
        assert reader.next_event()["id"] == str(sent[-1])
        if server.reactor.streams.cut["slow"]:
            break
    assert server.reactor.streams.cut["slow"] == 1
    assert server.reactor.streams.count == 1
    samples = scrape(server)
    assert value(samples, "onebox_event_subscribers_cut_total", reason="slow") == 1
    assert value(samples, "onebox_events_dropped_total") >= 1
    late = send(server, "t", "after the cut")
    assert reader.next_event()["id"] == str(late)


def test_a_subscriber_that_takes_nothing_for_write_timeout_s_is_cut(start_server, streams):
    server = start(start_server, **{"events.heartbeat_s": 0.1, "write_timeout_s": 0.5,
                                    "events.max_unsent_bytes": 1 << 24})
    sleeper = streams(server, rcvbuf=4096)
    assert sleeper.status() == 200
    started = time.monotonic()
    while not server.reactor.streams.cut["stalled"] and time.monotonic() - started < 15:
        request(server, "POST", "/raw", "y" * 60000)   # until its buffers are full
        time.sleep(0.01)
    assert server.reactor.streams.cut["stalled"] == 1
    assert server.reactor.streams.count == 0


def test_an_event_over_the_cap_is_refused_at_publish(start_server, streams):
    server = start(start_server, **{"events.max_event_bytes": 1000})
    stream = streams(server)
    status, _, _ = request(server, "POST", "/publish/t", json.dumps({"data": "x" * 2000}),
                           {"Content-Type": "application/json"})
    assert status == 413
    status, _, _ = request(server, "POST", "/raw", "x" * 2000)   # a handler that lets it go
    assert status == 500
    assert "max_event_bytes (1000)" in server.error_text()
    assert send(server, "t", "small") and stream.next_event()["data"] == "small"


def test_a_head_request_gets_the_head_and_no_stream(start_server):
    server = start(start_server)
    status, headers, body = request(server, "HEAD", "/events/t")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body == b"" and server.reactor.streams.count == 0


def test_shutdown_ends_each_stream_with_a_spread_retry_and_a_clean_close(start_server,
                                                                        streams):
    server = start(start_server)
    opened = [streams(server) for _ in range(3)]
    for stream in opened:
        stream.next_block()   # its head and retry:
    started = time.monotonic()
    stopper = threading.Thread(target=server.shutdown)
    stopper.start()
    retries = []
    for stream in opened:
        block = stream.next_block()
        assert block.startswith(b"retry: ")
        retries.append(int(block[7:]))
        with pytest.raises(EOFError):
            stream.next_block()
    stopper.join(10)
    assert not stopper.is_alive() and time.monotonic() - started < 5
    assert all(2000 <= retry <= 6000 for retry in retries)


def test_a_client_that_closes_frees_its_place(start_server, streams):
    server = start(start_server)
    stream = streams(server)
    stream.read_head()
    assert server.reactor.streams.count == 1
    stream.close()
    assert wait_until(lambda: server.reactor.streams.count == 0)
    assert server.reactor.stats()["waits"]["events"] == 0


def test_the_portable_poller_holds_streams_as_well(start_server, streams):
    server = start(start_server, poller="select", **{"events.max_unsent_bytes": 16384})
    reader, sleeper = streams(server), streams(server, rcvbuf=4096)
    assert reader.status() == sleeper.status() == 200
    for _ in range(400):
        event_id = send(server, "t", "z" * 60000)
        assert reader.next_event()["id"] == str(event_id)
        if server.reactor.streams.cut["slow"]:
            break
    assert server.reactor.streams.cut["slow"] == 1
    reader.close()
    assert wait_until(lambda: server.reactor.streams.count == 0)


def test_the_greeting_gives_the_position_so_a_quiet_stream_resumes_exactly(start_server,
                                                                          streams):
    server = start(start_server)
    before = send(server, "t", "before")
    stream = streams(server)
    greeting = stream.next_block()
    assert greeting == b"retry: 2000\nid: %d" % before   # sets lastEventId, dispatches nothing
    stream.close()   # dropped before any event
    missed = send(server, "t", "while away")
    again = streams(server, headers="Last-Event-ID: %d\r\n" % before)
    assert again.next_event() == {"id": str(missed), "data": "while away"}
