"""The notes' live events (handlers/notes.py, GET /api/notes/events) read off a raw socket as a
browser's EventSource reads them (WHATWG HTML, "Server-sent events": events are blocks ended by
a blank line, of "field: value" lines; a line starting with ":" is a comment): every successful
create, update and delete is one event with the note's JSON, a failed request none, and a
client that reconnects with Last-Event-ID gets what it missed, in order, once. ``EventReader``
serves tests/test_wiki.py too."""
import json
import socket
import time

import pytest

import handlers.notes as notes
from conftest import request

JSON = {"Content-Type": "application/json", "Accept": "application/json"}


class EventReader:
    """One subscriber on a raw socket. The constructor sends the GET and reads the head and the
    stream's first block (its ``retry:``): the client is subscribed once it returns.
    ``next_event()`` is the next event as {"id", "event", "data"}, heartbeat comments skipped."""

    def __init__(self, server, path, last_event_id=None, timeout=5.0):
        self.timeout = timeout
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1", "Accept: text/event-stream"]
        if last_event_id is not None:
            lines.append("Last-Event-ID: %s" % last_event_id)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        self.pending = b""
        head = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        self.status = int(head[0].split(" ")[1])
        self.headers = {name.lower(): value.strip() for name, _, value
                        in (line.partition(":") for line in head[1:])}
        if self.status == 200:
            first = self._block()
            assert first.startswith("retry: "), first

    def _until(self, marker):
        deadline = time.monotonic() + self.timeout
        while marker not in self.pending:
            if time.monotonic() > deadline:
                raise AssertionError("no %r within %ss; got %r" % (marker, self.timeout,
                                                                  self.pending[-300:]))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the stream closed; pending %r" % self.pending[-300:])
            self.pending += chunk
        found, _, self.pending = self.pending.partition(marker)
        return found

    def _block(self):
        return self._until(b"\n\n").decode("utf-8")

    def next_event(self):
        while True:
            fields = {}
            for line in self._block().split("\n"):
                if line.startswith(":"):
                    continue                            # a comment: the heartbeat
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data" and "data" in fields:
                    fields["data"] += "\n" + value
                else:
                    fields[name] = value
            if "data" in fields:
                fields.setdefault("event", "message")
                return fields

    def quiet(self, seconds=0.3):
        """True if no event comes within ``seconds``."""
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return b"data:" not in self.pending
        finally:
            self.sock.settimeout(self.timeout)
        assert chunk, "the stream closed"
        self.pending += chunk
        return b"data:" not in self.pending

    def close(self):
        self.sock.close()


def call(server, method, path, data=None):
    body = None if data is None else json.dumps(data).encode()
    status, _, raw = request(server, method, path, body, JSON)
    return status, (json.loads(raw) if raw else None)


def expect(reader, event, data):
    """The reader's next event: of type ``event``, with ``data`` as its JSON; returns its id."""
    got = reader.next_event()
    assert (got["event"], json.loads(got["data"])) == (event, data), got
    return int(got["id"])


@pytest.fixture
def served(start_server):
    server = start_server(config={"state.durability": "off"})
    readers = []

    def subscribe(last_event_id=None, path="/api/notes/events"):
        reader = EventReader(server, path, last_event_id)
        readers.append(reader)
        return reader
    yield server, subscribe
    for reader in readers:
        reader.close()


def test_the_stream_is_an_event_stream_not_a_note(served):
    server, subscribe = served
    reader = subscribe()
    assert reader.status == 200
    assert reader.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert reader.headers["cache-control"] == "no-cache"
    # "events" is a literal segment: it beats {id}, and is no note's id for the other methods
    assert call(server, "PUT", "/api/notes/events", {"text": "x"})[0] == 404
    assert call(server, "DELETE", "/api/notes/events")[0] == 404


def test_create_update_delete_each_publish_one_event_in_order(served):
    server, subscribe = served
    first, second = subscribe(), subscribe()
    status, note = call(server, "POST", "/api/notes", {"text": "hello"})
    assert status == 201
    status, changed = call(server, "PUT", "/api/notes/" + note["id"], {"text": "hello again"})
    assert status == 200
    assert call(server, "DELETE", "/api/notes/" + note["id"])[0] == 204
    for reader in (first, second):          # every subscriber gets every event
        ids = [expect(reader, "created", note), expect(reader, "updated", changed),
               expect(reader, "deleted", {"id": note["id"]})]
        assert ids == sorted(set(ids)), ids
        assert reader.quiet()


def test_a_failed_request_publishes_nothing(served):
    server, subscribe = served
    reader = subscribe()
    assert call(server, "POST", "/api/notes", {"text": ""})[0] == 400
    assert call(server, "POST", "/api/notes", {"text": "x", "extra": 1})[0] == 400
    assert call(server, "PUT", "/api/notes/99", {"text": "x"})[0] == 404
    assert call(server, "DELETE", "/api/notes/99")[0] == 404
    status, note = call(server, "POST", "/api/notes", {"text": "kept"})
    assert status == 201
    assert call(server, "PUT", "/api/notes/" + note["id"], {"text": ""})[0] == 400
    # the next event is the one write that succeeded, and nothing follows it
    expect(reader, "created", note)
    assert reader.quiet()


def test_a_full_store_publishes_nothing(start_server, monkeypatch):
    monkeypatch.setattr(notes, "MAX_NOTES", 1)
    server = start_server(config={"state.durability": "off"})
    reader = EventReader(server, "/api/notes/events")
    try:
        status, note = call(server, "POST", "/api/notes", {"text": "the one"})
        assert call(server, "POST", "/api/notes", {"text": "one too many"})[0] == 507
        expect(reader, "created", note)
        assert reader.quiet()
    finally:
        reader.close()


def test_last_event_id_replays_what_was_missed_in_order_once(served):
    server, subscribe = served
    early = subscribe()
    status, kept = call(server, "POST", "/api/notes", {"text": "seen"})
    seen = expect(early, "created", kept)
    early.close()
    # missed while away: a note made, changed; the first deleted
    _, made = call(server, "POST", "/api/notes", {"text": "missed"})
    _, changed = call(server, "PUT", "/api/notes/" + made["id"], {"text": "missed, changed"})
    call(server, "DELETE", "/api/notes/" + kept["id"])

    back = subscribe(last_event_id=str(seen))
    ids = [expect(back, "created", made), expect(back, "updated", changed),
           expect(back, "deleted", {"id": kept["id"]})]
    assert seen < ids[0] < ids[1] < ids[2]
    assert back.quiet()                     # once: nothing replayed twice
    _, later = call(server, "POST", "/api/notes", {"text": "live again"})
    assert expect(back, "created", later) > ids[2]


def test_an_unknown_last_event_id_is_one_reset(served):
    server, subscribe = served
    reader = subscribe(last_event_id="12345")     # another process's, say
    got = reader.next_event()
    assert (got["event"], got["data"]) == ("reset", "reset")
    assert reader.quiet()
    _, note = call(server, "POST", "/api/notes", {"text": "after the reset"})
    assert expect(reader, "created", note) > int(got["id"])


def test_a_note_too_large_for_an_event_is_announced_by_its_id(start_server):
    server = start_server(config={"state.durability": "off", "events.max_event_bytes": 1024})
    reader = EventReader(server, "/api/notes/events")
    try:
        status, small = call(server, "POST", "/api/notes", {"text": "small"})
        status, large = call(server, "POST", "/api/notes", {"text": "\u0001" * 500})
        assert status == 201                    # the write stands: the event is smaller
        status, changed = call(server, "PUT", "/api/notes/" + small["id"], {"text": "é" * 600})
        assert status == 200
        expect(reader, "created", small)
        expect(reader, "created", {"id": large["id"]})      # 500 x "\u0001": 3,000+ bytes
        expect(reader, "updated", {"id": small["id"]})
        assert call(server, "GET", "/api/notes/" + large["id"]) == (200, large)
    finally:
        reader.close()
