"""Slow clients cannot hold a worker (issue 12): the reactor owns every wait on a client.

Bodies up to ``buffer_body_bytes`` are read by the reactor before a worker runs the handler; a
body a handler streams must keep ``min_body_rate_bytes_s`` after ``body_rate_grace_s`` (else
408); a client must take its response at ``min_response_rate_bytes_s`` after
``response_rate_grace_s`` (else it is disconnected); one client holds at most
``max_workers_per_client`` workers. Each test attacks from one ordinary loopback address
(127.0.0.2 or .3; 127.0.0.1 is a trusted proxy by default and never capped) while a normal
client from 127.0.0.5 must keep being served. The server runs in this process, so
``threading.active_count()`` counts its threads.

The bench counterpart, with the default settings and nginx beside onebox, is
bench/slow_clients.py.
"""
import http.client
import json
import re
import select
import socket
import threading
import time

import pytest

from conftest import status_of

ATTACKER, READER, NORMAL = "127.0.0.2", "127.0.0.3", "127.0.0.5"
FAST_S = 2.0    # what "served promptly" means for the normal client


def connect(server, source, rcvbuf=None, timeout=5):
    """A raw socket from ``source``; ``rcvbuf`` is set before connect (the window is agreed
    in the handshake)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", server.port))
    except OSError:
        sock.close()
        raise
    return sock


def timed_get(server, path="/hello", source=NORMAL, timeout=FAST_S):
    """GET on a fresh connection from ``source``: (status, body, seconds taken)."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout,
                                            source_address=(source, 0))
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        return response.status, body, time.monotonic() - started
    finally:
        connection.close()


def normal_try(server):
    """One GET /hello from NORMAL: (status, seconds taken); a timeout or error is (None, FAST_S)."""
    try:
        status, _, took = timed_get(server)
    except OSError:     # socket.timeout included
        return None, FAST_S
    return status, round(took, 2)


def normal_client_is_served(server, tries, every_s=0.3):
    """NORMAL asks for /hello ``tries`` times, ``every_s`` apart; the (status, seconds) of each.

    A count of tries, not a time window: on a loaded CI machine a window holds fewer tries,
    and the test would then measure the machine instead of the server."""
    results = []
    for _ in range(tries):
        results.append(normal_try(server))
        time.sleep(every_s)
    return results


def read_response(sock, timeout=10):
    """(status, headers dict, body) of one response with a Content-Length, read from ``sock``."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((name.strip().lower(), value.strip())
                   for name, _, value in (line.partition(":") for line in lines[1:]))
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def drain_until_closed(socks, timeout):
    """Reads every socket as fast as it can; per socket (bytes read, True if the server closed
    or reset it within ``timeout``). A bigger receive buffer first: what a server that gave up
    left in the kernel's buffers comes out through the tiny window too slowly otherwise."""
    got, closed = [0] * len(socks), [False] * len(socks)
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setblocking(False)
    pending = dict((sock, number) for number, sock in enumerate(socks))
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        ready, _, _ = select.select(list(pending), [], [], max(0.0, deadline - time.monotonic()))
        for sock in ready:
            number = pending[sock]
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            got[number] += len(chunk)
            if not chunk:
                closed[number] = True
                del pending[sock]
    return list(zip(got, closed))


# --- bodies ------------------------------------------------------------------------------------

def test_sixteen_slow_bodies_from_one_address_hold_no_worker(start_server):
    server = start_server(config={"worker_threads": 4, "body_rate_grace_s": 1})
    assert timed_get(server)[0] == 200      # the pool is up: this is its steady thread count
    threads_before = threading.active_count()
    attackers = []
    try:
        for _ in range(16):   # heads and one byte of a 100,000-byte body that never ends
            sock = connect(server, ATTACKER)
            attackers.append(sock)
            sock.sendall(b"POST /hello/echo HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n[")
        most_threads = threads_before
        results = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for sock in attackers:          # a trickle, far below 240 bytes/s
                try:
                    sock.send(b" ")
                except OSError:
                    pass                    # the server may give up on it: that is fine
            results.append(normal_try(server))
            most_threads = max(most_threads, threading.active_count())
            time.sleep(0.25)
    finally:
        for sock in attackers:
            sock.close()
    assert all(status == 200 and took < FAST_S for status, took in results), results
    assert most_threads <= threads_before


def test_small_body_sent_byte_by_byte_reaches_the_handler_whole(start_server):
    seen = []

    def echo_length(request):
        seen.append(time.monotonic())     # when a worker started on it
        body = request.body()
        return {"bytes": len(body), "json": json.loads(body)}

    server = start_server(routes=[("POST", "/t/length", echo_length)],
                          config={"worker_threads": 2})
    body = json.dumps({"text": "sent one byte at a time"}).encode()
    sock = connect(server, ATTACKER)
    try:
        sock.sendall(b"POST /t/length HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        for byte in body[:-1]:             # ~1.2 s in all: within the body and head timeouts
            sock.sendall(bytes([byte]))
            time.sleep(0.03)
        last_byte_sent = time.monotonic()
        sock.sendall(body[-1:])
        status, _, answer = read_response(sock)
    finally:
        sock.close()
    assert status == 200
    assert json.loads(answer) == {"bytes": len(body), "json": {"text": "sent one byte at a time"}}
    # the reactor buffered the body: no worker waited on the trickle
    assert len(seen) == 1 and seen[0] >= last_byte_sent - 0.01


def body_seen_only_when_complete(start_server, size, buffer_body_bytes):
    """Sends a ``size``-byte body but its last byte 0.5 s late; True if the handler started
    only after that byte (the reactor buffered the body), False if it started before."""
    entered = []

    def read_all(request):
        entered.append(time.monotonic())
        return {"bytes": len(request.body())}

    server = start_server(routes=[("POST", "/t/all", read_all)],
                          config={"buffer_body_bytes": buffer_body_bytes})
    sock = connect(server, ATTACKER)
    try:
        sock.sendall(b"POST /t/all HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
                     + b"b" * (size - 1))
        time.sleep(0.5)
        last_byte_sent = time.monotonic()
        sock.sendall(b"b")
        status, _, answer = read_response(sock)
    finally:
        sock.close()
    assert (status, json.loads(answer)) == (200, {"bytes": size})
    return entered[0] >= last_byte_sent - 0.01


def test_a_body_of_buffer_body_bytes_is_buffered_and_one_byte_more_is_streamed(start_server):
    assert body_seen_only_when_complete(start_server, 1024, buffer_body_bytes=1024)
    assert not body_seen_only_when_complete(start_server, 1025, buffer_body_bytes=1024)


@pytest.mark.parametrize("framing", [
    b"1\r\n[\r\n0\r\n" + (b"X-T: " + b"t" * 4000 + b"\r\n") * 256,      # trailer fields
    (b"1;" + b"e" * 4000 + b"\r\n \r\n") * 256])                          # chunk extensions
def test_a_chunked_body_buffers_no_more_than_buffer_body_bytes_of_framing(start_server, framing):
    """A chunked body's framing counts against buffer_body_bytes: a megabyte of trailer fields
    or chunk extensions around one data byte once made the reactor buffer all of it (and as
    much more as the client sent). Past the buffer, the handler's reader takes over, and its
    limits answer (431: a trailer section past max_head_bytes), or it reads on under the pace."""
    entered = []

    def read_all(request):
        entered.append(True)
        return {"bytes": len(request.body())}

    server = start_server(routes=[("POST", "/t/all", read_all)],
                          config={"buffer_body_bytes": 4096, "max_head_bytes": 16384})
    sock = connect(server, ATTACKER)
    try:
        sock.sendall(b"POST /t/all HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            sock.sendall(framing)       # about 1 MiB, as fast as the server takes it
        except OSError:
            pass                        # answered and closed before it was all sent
        deadline = time.monotonic() + 3
        while not entered and time.monotonic() < deadline:
            time.sleep(0.01)
        assert entered, "the reactor is still buffering the framing"
        if framing.startswith(b"1\r\n"):
            assert read_response(sock, timeout=3)[0] == 431
    finally:
        sock.close()


def test_streamed_body_slower_than_the_minimum_rate_gets_408_after_the_grace(start_server):
    handled = []

    def count_bytes(request):
        total = 0
        while True:
            chunk = request.read(4096)
            if not chunk:
                break
            total += len(chunk)
        handled.append(total)
        return {"bytes": total}

    server = start_server(routes=[("POST", "/t/stream", count_bytes)],
                          config={"buffer_body_bytes": 1024, "min_body_rate_bytes_s": 240,
                                  "body_rate_grace_s": 1, "body_timeout_s": 30})
    sock = connect(server, ATTACKER)
    try:
        sock.sendall(b"POST /t/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                     + b"x" * 100)
        started = time.monotonic()
        answered = None
        while time.monotonic() - started < 6:   # ~20 bytes/s: above no timeout, below the rate
            sock.settimeout(0.5)
            try:
                first = sock.recv(65536, socket.MSG_PEEK)
            except ConnectionResetError:
                raise AssertionError("reset without an answer: the 408 was lost") from None
            except socket.timeout:
                try:
                    sock.sendall(b"x" * 10)
                except OSError:
                    break
                continue
            answered = time.monotonic() - started
            break
        assert answered is not None, "no answer within 6 s"
        status = status_of(first)
    finally:
        sock.close()
    assert status == 408
    assert answered >= 0.9      # the grace is honoured: the rate is judged after it
    assert handled == []        # the handler never got a truncated body as a whole one


def test_streamed_body_at_a_good_rate_is_not_cut_off(start_server):
    def count_bytes(request):
        total = 0
        while True:
            chunk = request.read(4096)
            if not chunk:
                return {"bytes": total}
            total += len(chunk)

    server = start_server(routes=[("POST", "/t/stream", count_bytes)],
                          config={"buffer_body_bytes": 1024, "min_body_rate_bytes_s": 240,
                                  "body_rate_grace_s": 1})
    sock = connect(server, ATTACKER)
    try:
        sock.sendall(b"POST /t/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(10):                # 10,000 bytes each 0.2 s: 50,000 bytes/s
            sock.sendall(b"y" * 10000)
            time.sleep(0.2)
        status, _, answer = read_response(sock)
    finally:
        sock.close()
    assert status == 200
    assert json.loads(answer) == {"bytes": 100000}


# --- responses ---------------------------------------------------------------------------------

def streaming(pieces, piece_bytes=32 * 1024, fail=False, closed=None):
    """A route whose response streams ``pieces`` pieces of ``piece_bytes`` as fast as the
    worker asks; the generator raises after the last if ``fail``, and sets ``closed`` (an
    Event) when it is closed or ends."""
    from handlers._core import Response

    def chunks():
        try:
            for number in range(pieces):
                yield bytes([65 + number % 26]) * piece_bytes
            if fail:
                raise RuntimeError("the generator broke")
        finally:
            if closed is not None:
                closed.set()

    def handler(request):
        response = Response(b"", 200, [("Content-Type", "application/octet-stream")])
        response.stream = chunks()
        return response
    return handler


def read_chunked(sock, timeout=10):
    """(status, body, ended): a chunked response read off ``sock`` until its last chunk
    (ended True) or the connection's end (False)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    body, buffered = bytearray(), bytearray(rest)
    while True:
        line_end = buffered.find(b"\r\n")
        size = int(buffered[:line_end], 16) if line_end >= 0 else None
        if size is not None and len(buffered) >= line_end + 2 + size + 2:
            body += buffered[line_end + 2:line_end + 2 + size]
            del buffered[:line_end + 2 + size + 2]
            if size == 0:
                return int(head.split()[1]), bytes(body), True
            continue
        try:
            more = sock.recv(1 << 20)
        except ConnectionResetError:
            more = b""
        if not more:
            return int(head.split()[1]), bytes(body), False
        buffered += more


def test_a_slow_reader_of_a_stream_holds_no_worker_and_gets_it_whole(start_server):
    """One worker; a stream of 8 MiB to a reader that takes nothing for a while: the worker is
    free for others meanwhile, and the reader then gets every byte and keeps its connection."""
    server = start_server(routes=[("GET", "/t/stream", streaming(256))],
                          config={"worker_threads": 1})
    reader = connect(server, READER, rcvbuf=4096)
    try:
        reader.sendall(b"GET /t/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)           # produced past the buffer by now, the rest waits
        results = normal_client_is_served(server, 4, every_s=0.1)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        status, body, ended = read_chunked(reader)
        reader.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        again = read_response(reader)
    finally:
        reader.close()
    assert all(status == 200 and took < FAST_S for status, took in results), results
    expected = b"".join(bytes([65 + n % 26]) * 32768 for n in range(256))
    assert (status, ended, len(body)) == (200, True, len(expected))
    assert body == expected
    assert again[0] == 200 and again[2] == b"hello, world\n"
    logged = re.search(r'"GET /t/stream HTTP/1.1" 200 (\d+) ', server.access_text())
    assert int(logged.group(1)) > len(expected)   # its wire bytes: data and chunk framing


@pytest.mark.parametrize("path", ["/big.bin", "/t/stream"])
def test_sixteen_slow_readers_hold_no_worker_and_are_disconnected(start_server, tmp_path, path):
    """Of a file (its rest sent by the reactor with sendfile) or of a stream (its generator
    run on in workers between the reactor's sends): no thread waits on them, and each is cut
    off once it falls below the minimum rate after the grace."""
    site = tmp_path / "site"
    site.mkdir()
    size = 8 * 1024 * 1024    # more than a socket's send buffer can grow to (tcp_wmem 4 MiB)
    (site / "big.bin").write_bytes(b"z" * size)
    server = start_server(pages_dir=site, routes=[("GET", "/t/stream", streaming(256))], config={
        "worker_threads": 4, "min_response_rate_bytes_s": 100000, "response_rate_grace_s": 1})
    assert timed_get(server)[0] == 200      # the pool is up: this is its steady thread count
    threads_before = threading.active_count()
    readers = []
    try:
        for _ in range(16):   # ask for 8 MiB through a tiny window, then read nothing
            sock = connect(server, READER, rcvbuf=1024)
            readers.append(sock)
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        opened = time.monotonic()
        results = normal_client_is_served(server, 8)
        most_threads = threading.active_count()
        time.sleep(max(0.0, opened + 5 - time.monotonic()))   # grace 1 s, then far too slow
        outcomes = drain_until_closed(readers, 5)
    finally:
        for sock in readers:
            sock.close()
    assert all(status == 200 and took < FAST_S for status, took in results), results
    assert most_threads <= threads_before
    # each was cut off: the server closed before sending it all, and logged it so
    assert all(closed and got < size for got, closed in outcomes), outcomes
    assert server.access_text().count("send=cut") == 16


def test_a_stream_whose_reader_leaves_is_closed_and_logged_cut(start_server):
    closed = threading.Event()
    server = start_server(routes=[("GET", "/t/stream", streaming(256, closed=closed))])
    reader = connect(server, READER, rcvbuf=4096)
    reader.sendall(b"GET /t/stream HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    reader.close()            # unread data: a reset
    assert closed.wait(5), "the generator was never closed"
    deadline = time.monotonic() + 5
    while "send=cut" not in server.access_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert '"GET /t/stream HTTP/1.1" 200 ' in server.access_text()
    assert "send=cut" in server.access_text()
    assert timed_get(server)[0] == 200


def test_a_stream_that_fails_in_a_later_turn_is_cut_and_the_error_logged(start_server):
    server = start_server(routes=[("GET", "/t/stream", streaming(256, fail=True))])
    reader = connect(server, READER, rcvbuf=4096)
    try:
        reader.sendall(b"GET /t/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)       # past what the socket holds: the worker handed it over
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        status, body, ended = read_chunked(reader)
    finally:
        reader.close()
    assert (status, ended) == (200, False)     # no last chunk: the client can tell
    expected = b"".join(bytes([65 + n % 26]) * 32768 for n in range(256))
    assert len(body) >= 256 * 1024 and expected.startswith(body)
    assert "GET /t/stream HTTP/1.1: streamed body failed" in server.error_text()   # later turn
    assert "the generator broke" in server.error_text()
    assert timed_get(server)[0] == 200


# --- fairness ----------------------------------------------------------------------------------

def test_one_client_holds_at_most_its_share_of_workers(start_server):
    lock = threading.Lock()
    running = [0, 0]     # now, most at once; guarded by lock

    def sleepy(request):
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        try:
            time.sleep(0.8)
        finally:
            with lock:
                running[0] -= 1
        return "slept\n"

    server = start_server(routes=[("GET", "/t/sleep", sleepy)],
                          config={"worker_threads": 4, "max_workers_per_client": 1})
    hogs = []
    try:
        for _ in range(4):
            sock = connect(server, ATTACKER, timeout=10)
            hogs.append(sock)
            sock.sendall(b"GET /t/sleep HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)                    # the first of them is in its handler by now
        status, body, took = timed_get(server)
        hog_statuses = [read_response(sock)[0] for sock in hogs]
    finally:
        for sock in hogs:
            sock.close()
    assert (status, body) == (200, b"hello, world\n")
    assert took < 0.5                      # not behind the 0.8 s handlers
    assert hog_statuses == [200] * 4       # the client's own requests wait, and are all served
    assert running[1] == 1
