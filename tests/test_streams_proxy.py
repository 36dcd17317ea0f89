"""Event streams (issue 22) where they meet the rest of a deployment: over TLS, behind nginx
with the location block docs/operations.md gives for them, under the abuse guard, and at a
drain.

Streams are read off raw sockets by ``Stream``, a small SSE parser (WHATWG HTML, "Server-sent
events", 9.2.5: lines, ``field: value``, a blank line dispatches, ``:`` a comment) that also
undoes the chunked framing nginx adds towards an HTTP/1.1 client (onebox sends none: its body
ends at the close). Events are published by POSTs to a test route, over the same transport.

nginx's location block is read from docs/operations.md, so the block the docs show is the one
tested; only its proxy_read_timeout is scaled down with heartbeat_s (60 s over 15 s there,
1 s over 0.3 s here), so that a stream quieter than the timeout shows the heartbeats keep it.
Without nginx installed those tests are skipped, as tests/test_proxy.py's are (.ci/run
installs it).
"""
import collections
import http.client
import os
import re
import socket
import threading
import time

from conftest import ROOT, wait_until
from handlers._events import event_stream, publish
from test_metrics import scrape, value
from test_proxy import nginx, visit  # noqa: F401  (nginx: the fixture)
from test_tls import client_context, pki, start_tls  # noqa: F401  (pki: the fixture)

OPERATIONS = os.path.join(ROOT, "docs", "operations.md")
HEARTBEAT_S = 0.3
READ_TIMEOUT = ("proxy_read_timeout 60s;", "proxy_read_timeout 1s;")   # docs -> test
VISITORS = ["127.0.0.%d" % n for n in (10, 11, 12)]   # distinct clients of nginx


# --- the routes: a stream of topics, and publishing to one --------------------------------------

def subscribe(request):
    return event_stream(request, *request.params["topics"].split(","))


def send(request):
    event = request.params["event"]
    return "%d" % publish(request.params["topic"], request.text(),
                          None if event == "-" else event)


ROUTES = [("GET", "/t/{topics}/events", subscribe),   # nginx: the events location
          ("GET", "/t/{topics}/feed", subscribe),     # nginx: the plain location /
          ("POST", "/t/{topic}/publish/{event}", send)]


def post_event(connection, topic, text, event="-"):
    """Publish ``text`` to ``topic`` over ``connection`` (kept alive); the event's id."""
    connection.request("POST", "/t/%s/publish/%s" % (topic, event), body=text.encode())
    response = connection.getresponse()
    body = response.read()
    assert response.status == 200, (response.status, body)
    return int(body)


# --- a stream's reader ---------------------------------------------------------------------------

class Stream:
    """One event stream on a socket (plain or TLS): ``status``, ``head`` (its text) and
    ``headers`` once ``read_head`` has run; then ``next()``, an item of the stream: ":" for a
    comment line, or the fields a blank line dispatched ({"id", "event", "data", "retry"}),
    or None when nothing came in time or the stream ended (``ended``)."""

    def __init__(self, sock):
        self.sock = sock
        self.raw = b""            # read, not yet taken out of its (chunked) framing
        self.body = b""           # the body, not yet cut into lines
        self.status, self.head, self.headers, self.chunked = None, "", {}, False
        self.fields = {}
        self.items = collections.deque()
        self.ended = False

    def _recv(self, deadline):
        """One read before ``deadline``; False if nothing came (or the stream ended)."""
        left = deadline - time.monotonic()
        if left <= 0 or self.ended:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except OSError:   # reset, or TLS cut without close_notify: ended all the same
            data = b""
        if not data:
            self.ended = True
            return False
        self.raw += data
        return True

    def read_head(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.raw:
            assert self._recv(deadline), "no response head: %r" % self.raw[:300]
        head, self.raw = self.raw.split(b"\r\n\r\n", 1)
        self.head = head.decode("latin-1")
        lines = self.head.split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        self._parse()
        return self

    def _parse(self):
        if not self.chunked:
            self.body, self.raw = self.body + self.raw, b""
        while self.chunked:   # RFC 9112 7.1: size CRLF data CRLF, a 0 size ends
            end = self.raw.find(b"\r\n")
            if end < 0:
                break
            size = int(self.raw[:end].split(b";")[0], 16)
            if len(self.raw) < end + 2 + size + 2:
                break
            self.body += self.raw[end + 2:end + 2 + size]
            self.raw = self.raw[end + 4 + size:]
            if size == 0:
                self.ended = True
                break
        *lines, self.body = self.body.split(b"\n")   # onebox ends lines with LF only
        for line in lines:
            text = line.decode("utf-8")
            if not text:
                if self.fields:
                    self.items.append(self.fields)
                self.fields = {}
            elif text.startswith(":"):
                self.items.append(":")
            else:
                name, _, value = text.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data" and "data" in self.fields:
                    value = self.fields["data"] + "\n" + value
                self.fields[name] = value

    def next(self, timeout=2.0):
        deadline = time.monotonic() + timeout
        while not self.items:
            if not self._recv(deadline):
                return None
            self._parse()
        return self.items.popleft()

    def next_event(self, timeout=2.0):
        """The next item that is not a comment (an event, or a lone retry:), or None."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.next(max(0.0, deadline - time.monotonic()))
            if item != ":":
                return item

    def rest(self, timeout=5.0):
        """Every item until the stream ends; fails if it has not ended within ``timeout``."""
        deadline = time.monotonic() + timeout
        items = []
        while True:
            item = self.next(max(0.0, deadline - time.monotonic()))
            if item is None:
                assert self.ended, "still open after %.1f s: %r" % (timeout, items[-3:])
                return items
            items.append(item)

    def close(self):
        self.sock.close()


class Follower(list):
    """The items of a stream read by a thread of its own as they come (``stop()`` ends it)."""

    def __init__(self, stream):
        super().__init__()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(stream,))
        self.thread.start()

    def _run(self, stream):
        while not self.stopping.is_set() and not stream.ended:
            item = stream.next(timeout=0.2)
            if item is not None:
                self.append(item)

    def stop(self):
        self.stopping.set()
        self.thread.join(10)


def open_stream(port, path, headers=None, source="127.0.0.1", context=None, rcvbuf=None,
                timeout=5.0):
    """GET ``path`` as a browser's EventSource does, from ``source``; the Stream, head read."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)   # before the handshake
    sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="localhost")
    lines = ["GET %s HTTP/1.1" % path, "Host: localhost", "Accept: text/event-stream",
             "Cache-Control: no-cache"]
    lines += ["%s: %s" % item for item in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    return Stream(sock).read_head(timeout)


def assert_stream_head(stream, retry_ms=2000):
    """The head and first item every admitted stream gets (the wire format, issue 22)."""
    assert stream.status == 200, (stream.head, stream.raw[:300])
    assert stream.head.startswith("HTTP/1.1 200 OK\r\n"), stream.head
    assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert stream.headers["connection"] == "close"
    assert "content-length" not in stream.headers and "transfer-encoding" not in stream.headers
    greeting = stream.next()   # retry:, and the stream's position as its id
    assert greeting["retry"] == str(retry_ms) and set(greeting) == {"retry", "id"}, greeting


def ids_of(items):
    return [int(item["id"]) for item in items if item != ":" and "id" in item]


# --- TLS -----------------------------------------------------------------------------------------

def test_a_stream_over_tls_gets_events_heartbeats_and_its_missed_events(start_server, pki):
    server = start_tls(start_server, pki, routes=ROUTES, **{"events.heartbeat_s": HEARTBEAT_S})
    context = client_context(pki)
    stream = open_stream(server.tls_port, "/t/news/events", context=context)
    publisher = https_connection(server, pki)
    try:
        assert stream.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert_stream_head(stream)
        first = post_event(publisher, "news", "one\ntwo", event="created")
        assert stream.next_event() == {"id": str(first), "event": "created", "data": "one\ntwo"}
        second = post_event(publisher, "news", "three")
        third = post_event(publisher, "news", "four")
        assert stream.next_event() == {"id": str(second), "data": "three"}   # no event: line
        assert stream.next_event()["id"] == str(third)
        assert stream.next(timeout=HEARTBEAT_S * 5) == ":"   # a heartbeat, over TLS too
        stream.close()
        # a browser reconnects with the id it saw last: it gets what came after, in order
        again = open_stream(server.tls_port, "/t/news/events", context=context,
                            headers={"Last-Event-ID": str(first)})
        assert_stream_head(again)
        assert [again.next_event(), again.next_event()] == [
            {"id": str(second), "data": "three"}, {"id": str(third), "data": "four"}]
        fifth = post_event(publisher, "news", "five")
        assert again.next_event() == {"id": str(fifth), "data": "five"}   # and goes on live
        again.close()
        # an id this process never gave (an earlier process's): reset, at the current position
        stale = open_stream(server.tls_port, "/t/news/events", context=context,
                            headers={"Last-Event-ID": "1000"})
        assert_stream_head(stale)
        assert stale.next_event() == {"id": str(fifth), "event": "reset", "data": "reset"}
        stale.close()
    finally:
        publisher.close()


def https_connection(server, pki):
    return http.client.HTTPSConnection("localhost", server.tls_port, timeout=10,
                                       context=client_context(pki))


def test_a_tls_subscriber_that_stops_reading_is_cut_off_and_the_others_go_on(start_server, pki):
    """A client that never reads (a 4 KiB receive buffer) is cut off once
    max_unsent_bytes wait for it; a reader of the same topic gets every event."""
    server = start_tls(start_server, pki, routes=ROUTES,
                       **{"events.max_unsent_bytes": 65536})
    context = client_context(pki)
    stalled = open_stream(server.tls_port, "/t/big/events", context=context, rcvbuf=4096)
    reader = open_stream(server.tls_port, "/t/big/events", context=context)
    assert_stream_head(stalled)
    assert_stream_head(reader)
    got = Follower(reader)
    publisher = https_connection(server, pki)
    published = []
    streams = server.reactor.streams
    try:
        data = "x" * 16 * 1024
        # the kernel's buffers take some MiB first (on loopback); then the server holds them
        while streams.cut["slow"] == 0 and len(published) < 1000:
            published.append(post_event(publisher, "big", data))
        assert streams.cut["slow"] == 1, streams.stats()
        for _ in range(5):
            published.append(post_event(publisher, "big", data))   # after the cut, too
        assert streams.count == 1 and streams.dropped > 0, streams.stats()
        # what reached the stalled client before the cut, then the end; never a gap
        stalled_ids = ids_of(stalled.rest(timeout=10))
        assert stalled_ids == published[:len(stalled_ids)] and len(stalled_ids) < len(published)
        assert wait_until(lambda: ids_of(list(got)) == published, 10), "the reader missed some"
        samples = scrape(server)   # what the operator sees
        assert value(samples, "onebox_event_subscribers_cut_total", reason="slow") == 1
        assert value(samples, "onebox_event_subscribers") == 1
        assert value(samples, "onebox_events_dropped_total") == streams.dropped > 0
        assert value(samples, "onebox_events_published_total") == len(published)
        print("\ncut off after %d events of 16 KiB; the reader got all %d"
              % (len(stalled_ids), len(published)))
    finally:
        publisher.close()
        got.stop()
        reader.close()
        stalled.close()


# --- nginx -------------------------------------------------------------------------------------

def events_location():
    """The nginx block docs/operations.md gives for event streams (its first ```nginx block
    in "Live events"), with proxy_read_timeout scaled as heartbeat_s is here."""
    with open(OPERATIONS, encoding="utf-8") as handle:
        section = handle.read().split("\n## Live events (server-sent events)\n", 1)[1]
    block = re.search(r"^```nginx\n(.*?)^```$", section.split("\n## ", 1)[0],
                      re.S | re.M).group(1)
    assert block.count(READ_TIMEOUT[0]) == 1, "the docs' block changed: update READ_TIMEOUT"
    return block.replace(*READ_TIMEOUT)


def assert_proxied_head(stream):
    """What a browser gets through nginx: onebox's head, less X-Accel-Buffering (nginx's
    own instruction, which it keeps), the body in chunks; then the retry: line."""
    assert stream.status == 200, (stream.head, stream.raw[:300])
    assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert stream.headers["cache-control"] == "no-cache"
    assert "x-accel-buffering" not in stream.headers and stream.chunked, stream.head
    greeting = stream.next()
    assert greeting["retry"] == "2000" and set(greeting) == {"retry", "id"}, greeting


def test_through_nginx_events_come_at_once_heartbeats_keep_the_stream_and_ids_pass(
        start_server, nginx):
    server = start_server(routes=ROUTES, config={"events.heartbeat_s": HEARTBEAT_S})
    port = nginx(server.port, events_location())
    publisher = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    stream = open_stream(port, "/t/news/events", source=VISITORS[0])
    try:
        assert_proxied_head(stream)
        ids, waits = [], []
        for n in range(3):   # each arrives at once: nginx holds nothing back
            publishing = time.monotonic()
            ids.append(post_event(publisher, "news", "event %d" % n))
            assert stream.next_event(timeout=1.0) == {"id": str(ids[-1]),
                                                      "data": "event %d" % n}
            waits.append(time.monotonic() - publishing)
        assert max(waits) < 1.0, waits
        print("\nthrough nginx, an event arrived %.1f ms after its POST was sent (at most)"
              % (max(waits) * 1000))
        # quiet for 2.5 proxy_read_timeouts: the heartbeats pass through and keep it open
        quiet_until = time.monotonic() + 2.5
        beats = []
        while time.monotonic() < quiet_until:
            item = stream.next(timeout=quiet_until - time.monotonic())
            if item is not None:
                beats.append(item)
        assert not stream.ended and set(beats) == {":"} and len(beats) >= 4, beats
        ids.append(post_event(publisher, "news", "still there"))
        assert stream.next_event(timeout=1.0)["id"] == str(ids[-1])
        stream.close()
        # a reconnect's Last-Event-ID reaches onebox, and the missed events come back
        again = open_stream(port, "/t/news/events", source=VISITORS[0],
                            headers={"Last-Event-ID": str(ids[0])})
        assert_proxied_head(again)
        assert ids_of([again.next_event() for _ in ids[1:]]) == ids[1:]
        again.close()
        # and through a location with nginx's default buffering: X-Accel-Buffering turns it off
        plain = open_stream(port, "/t/news/feed", source=VISITORS[1])
        assert_proxied_head(plain)
        last = post_event(publisher, "news", "unbuffered")
        published = time.monotonic()
        assert plain.next_event(timeout=1.0)["id"] == str(last)
        assert time.monotonic() - published < 1.0
        plain.close()
    finally:
        publisher.close()
        stream.close()
    assert "upstream timed out" not in nginx.error_log(), nginx.error_log()
    access = server.access_text()
    assert "\n%s - - [" % VISITORS[0] in "\n" + access   # onebox saw the visitor, not nginx


# onebox/workers.py computes a handed-back connection's wait_key after exchange.let_go() has
# dropped exchange.request, so for a trusted proxy's connection (conn.client None) the key is
# always None: every forwarded visitor's stream is uncounted, and the per-client cap never
# applies behind a proxy. (Computing it before let_go makes both tests pass.)
def test_through_nginx_the_stream_caps_count_visitors_not_the_proxy(start_server, nginx):
    """Every stream comes from nginx's 127.0.0.1; the per-client cap counts the visitor
    nginx names in X-Forwarded-For (429 for a third from one), the server's cap all (503)."""
    server = start_server(routes=ROUTES, config={"events.max_subscribers_per_client": 2,
                                                 "events.max_subscribers": 3})
    port = nginx(server.port, events_location())
    first, second, third = VISITORS
    held = [open_stream(port, "/t/news/events", source=first) for _ in range(2)]
    refused = []
    try:
        for stream in held:
            assert_proxied_head(stream)
        refused.append(open_stream(port, "/t/news/events", source=first))
        assert refused[-1].status == 429, refused[-1].head
        assert refused[-1].headers["retry-after"] == "10"
        held.append(open_stream(port, "/t/news/events", source=second))   # another visitor
        assert_proxied_head(held[-1])
        refused.append(open_stream(port, "/t/news/events", source=third))   # a fourth stream
        assert refused[-1].status == 503 and "retry-after" in refused[-1].headers, \
            refused[-1].head
        streams = server.reactor.streams
        assert streams.refused == {"client_cap": 1, "server_cap": 1}, streams.stats()
        samples = scrape(server)
        for reason in ("client_cap", "server_cap"):
            assert value(samples, "onebox_event_subscribers_refused_total", reason=reason) == 1
        held.pop(0).close()   # a visitor leaves: nginx closes its upstream connection
        assert wait_until(lambda: streams.count == 2, 5), streams.stats()
        held.append(open_stream(port, "/t/news/events", source=third))
        assert_proxied_head(held[-1])
    finally:
        for stream in held + refused:
            stream.close()
    refusals = [line for line in server.access_text().splitlines() if "events=refused" in line]
    assert [line.split()[0] for line in refusals] == [first, third], refusals


# --- the guard ------------------------------------------------------------------------------------

def test_a_client_the_guard_bans_is_refused_a_stream_like_any_request(start_server):
    """Event streams pass the guard as every request does: a client over its rate is refused
    (429), then banned (403), its streams too, and the stream it had open is cut at the next
    heartbeat; another client subscribes as before."""
    server = start_server(routes=ROUTES, config={
        "limits.client_rate_per_s": 0.1, "limits.client_burst": 2,
        "limits.ban_after_rejections": 1, "limits.ban_s": 60, "events.heartbeat_s": 0.1})
    first = open_stream(server.port, "/t/news/events", source="127.0.0.2")
    assert_stream_head(first)
    assert visit(server.port, "127.0.0.2", "/hello") == 200   # its burst, spent
    refused = open_stream(server.port, "/t/news/events", source="127.0.0.2")
    assert refused.status == 429 and "retry-after" in refused.headers, refused.head
    refused.close()
    assert visit(server.port, "127.0.0.2", "/hello") == 429   # a second strike: a ban
    banned = open_stream(server.port, "/t/news/events", source="127.0.0.2")
    assert banned.status == 403 and banned.headers["connection"] == "close", banned.head
    assert "event-stream" not in banned.headers.get("content-type", "") and banned.rest() == []
    banned.close()
    assert [key for key, *_ in server.guard.bans()] == ["127.0.0.2"]
    other = open_stream(server.port, "/t/news/events", source="127.0.0.3")
    assert_stream_head(other)
    assert wait_until(lambda: server.reactor.streams.cut["banned"] == 1)
    first.rest(timeout=2.0)   # read to its end: the server closed it
    assert server.reactor.streams.count == 1   # the other client's
    other.close()
    first.close()


def test_the_per_client_cap_counts_the_visitor_a_trusted_proxy_names(start_server):
    """The same without nginx: 127.0.0.1 is a trusted proxy by default, and names the
    visitor in X-Forwarded-For."""
    server = start_server(routes=ROUTES, config={"events.max_subscribers_per_client": 1})
    visitor = {"X-Forwarded-For": "198.51.100.7"}
    first = open_stream(server.port, "/t/news/events", headers=visitor)
    second = open_stream(server.port, "/t/news/events", headers=visitor)
    try:
        assert_stream_head(first)
        assert second.status == 429, (second.head, server.reactor.streams.by_key)
    finally:
        first.close()
        second.close()


# --- a new subscriber's start --------------------------------------------------------------------

# onebox/streams.py _start_stream: a new subscriber (no Last-Event-ID) starts at
# max(position, streams.through) with nothing missed, so an event published after its handler
# answered (after EventStream.position) that the reactor took before admitting the stream is
# never sent to it, though the contract says it "gets what comes after" position.
def test_a_new_subscriber_gets_what_was_published_after_its_handler_answered(start_server):
    servers = []

    def join(request):
        """Subscribe, then announce oneself: the event comes after the stream's position."""
        response = event_stream(request, "room")
        event_id = publish("room", "joined")
        taken = wait_until(lambda: servers[0].reactor.streams.through >= event_id, 5)
        assert taken   # the reactor took the event before it admits this stream
        return response

    servers.append(start_server(routes=[("GET", "/t/join", join)]))
    stream = open_stream(servers[0].port, "/t/join")
    try:
        assert_stream_head(stream)
        event = stream.next_event(timeout=1.0)
        assert event is not None and event["data"] == "joined", event
    finally:
        stream.close()


# --- the drain ------------------------------------------------------------------------------------

def test_a_drain_ends_open_streams_with_a_last_retry_and_stops_in_time(start_server, pki):
    """Shutdown (SIGTERM, a restart's drain): each stream, plain or TLS, gets a last retry:
    of 1 to 3 times retry_ms (spread, so that browsers do not all come back at once), then
    its end; the server stops well within shutdown_timeout_s."""
    server = start_tls(start_server, pki, routes=ROUTES, **{
        "events.retry_ms": 1000, "shutdown_timeout_s": 5})
    plain = open_stream(server.port, "/t/news/events")
    tls = open_stream(server.tls_port, "/t/news/events", context=client_context(pki))
    for stream in (plain, tls):
        assert_stream_head(stream, retry_ms=1000)
    stopper = threading.Thread(target=server.shutdown)
    started = time.monotonic()
    stopper.start()
    try:
        for stream in (plain, tls):
            items = stream.rest(timeout=5)
            assert len(items) == 1 and list(items[0]) == ["retry"], items
            assert 1000 <= int(items[0]["retry"]) <= 3000, items
            stream.close()   # as a browser does at the end (the server lingers for it)
        stopper.join(10)
        took = time.monotonic() - started
        assert not stopper.is_alive() and took < 5, took
        print("\nstreams ended and the server stopped in %.3f s" % took)
    finally:
        plain.close()
        tls.close()
