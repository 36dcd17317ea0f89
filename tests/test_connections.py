"""Connections: deadlines, idle timeouts, caps, thousands of idle clients, and shutdown."""
import http.client
import select
import socket
import threading
import time

from conftest import raw_exchange, read_until_close, request, status_of, wait_until


def open_idle(server, count, source="127.0.0.1", into=None):
    """``count`` keep-alive connections that have each completed one request, added to
    ``into`` as they open (so that a caller can close them even if one times out)."""
    socks = [] if into is None else into
    start = len(socks)
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                        source_address=(source, 0))
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        socks.append(sock)
    for sock in socks[start:]:
        data = b""
        while not data.endswith(b"hello, world\n"):
            data += sock.recv(4096)
    return socks


def is_closed(sock, timeout=5):
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_slow_head_gets_408_at_the_deadline_not_per_recv(start_server):
    server = start_server(config={"header_timeout_s": 0.5})
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    started = time.monotonic()
    sock.sendall(b"GET /hello HTTP/1.1\r\n")
    for _ in range(30):  # a byte every 0.1 s would defeat a per-recv timeout forever
        if select.select([sock], [], [], 0.1)[0]:
            break  # the server answered
        sock.sendall(b"X")
    answered = time.monotonic() - started
    raw = read_until_close(sock)
    sock.close()
    assert status_of(raw) == 408
    assert 0.4 < answered < 1.5


def test_silent_connection_is_closed_at_the_head_deadline(start_server):
    server = start_server(config={"header_timeout_s": 0.3})
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    started = time.monotonic()
    assert is_closed(sock)
    assert 0.2 < time.monotonic() - started < 1.5
    sock.close()


def test_idle_keepalive_connection_is_closed_after_timeout(start_server):
    server = start_server(config={"keepalive_timeout_s": 0.3})
    (sock,) = open_idle(server, 1)
    started = time.monotonic()
    assert is_closed(sock)
    # on time, though the worker re-armed it without waking the reactor (which, with nothing
    # else to wait for, sleeps up to 1 s): the worker must wake it for a deadline that near
    assert 0.2 < time.monotonic() - started < 0.8
    sock.close()


def test_next_request_on_a_kept_connection_may_come_in_pieces(start_server):
    """A worker reads a kept connection's next request itself; an unfinished head goes back to
    the reactor, which waits for the rest, answers 408 at the head deadline, or rejects
    garbage at once."""
    server = start_server(config={"header_timeout_s": 0.5})
    first, second = open_idle(server, 2)
    first.sendall(b"GET /hel")
    time.sleep(0.1)
    first.sendall(b"lo HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"hello, world\n"):
        data += first.recv(4096)
    assert status_of(data) == 200
    first.sendall(b"GET /hello HTTP/1.1\r\n")   # and then nothing more
    started = time.monotonic()
    raw = read_until_close(first)
    assert status_of(raw) == 408 and 0.3 < time.monotonic() - started < 1.5
    second.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")   # a TLS hello
    assert status_of(read_until_close(second)) == 400
    first.close()
    second.close()


def test_a_worker_holds_a_kept_connection_until_another_needs_it(start_server):
    """With one worker: A's kept connection waits in that worker for its next request (no
    reactor hop), and is handed back at once when B's request needs the worker."""
    server = start_server(config={"worker_threads": 1, "keepalive_timeout_s": 10})
    (first,) = open_idle(server, 1)
    assert wait_until(lambda: len(server.handoff.held) == 1)   # held by the only worker
    started = time.monotonic()
    assert request(server, "GET", "/hello")[0] == 200
    assert time.monotonic() - started < 1.0   # not after A's 10 s idle time
    first.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")   # A is still served
    data = b""
    while not data.endswith(b"hello, world\n"):
        data += first.recv(4096)
    assert status_of(data) == 200
    first.close()


def test_a_released_connection_keeps_its_idle_deadline(start_server):
    """A held connection handed back to the reactor is closed keepalive_timeout_s after its
    last response, not after the hand-back."""
    server = start_server(config={"worker_threads": 1, "keepalive_timeout_s": 1.0})
    (first,) = open_idle(server, 1)
    answered = time.monotonic()
    assert wait_until(lambda: len(server.handoff.held) == 1)
    time.sleep(0.6)
    assert request(server, "GET", "/hello")[0] == 200   # needs the worker: first goes back
    assert is_closed(first, timeout=3)
    # closed at 1.0 s; counted from the hand-back it would be 1.6 s: the window between the
    # two is wide, so a slow machine is not taken for the bug
    assert 0.85 < time.monotonic() - answered < 1.45
    first.close()


def test_per_ip_cap_answers_503_and_spares_other_addresses(start_server):
    # 127.0.0.3 plays the greedy client: 127.0.0.1 is a trusted proxy by default, never capped
    server = start_server(config={"max_connections_per_ip": 3})
    one_request = b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    held = open_idle(server, 3, source="127.0.0.3")
    raw = raw_exchange(server, one_request, source="127.0.0.3")
    assert status_of(raw) == 503 and b"Retry-After: 1" in raw
    assert status_of(raw_exchange(server, one_request, source="127.0.0.2")) == 200
    assert status_of(raw_exchange(server, one_request)) == 200         # from 127.0.0.1
    held[0].close()
    time.sleep(0.2)
    assert status_of(raw_exchange(server, one_request, source="127.0.0.3")) == 200  # a slot is free
    for sock in held:
        sock.close()


def test_loopback_is_not_capped_per_address_by_default(start_server):
    """127.0.0.1 is a trusted proxy by default ([limits] trusted_proxies): its connections carry
    many clients (or one benchmark), so the per-address cap does not count them."""
    server = start_server(config={"max_connections_per_ip": 3})
    held = open_idle(server, 10)
    try:
        assert request(server, "GET", "/hello")[0] == 200
    finally:
        for sock in held:
            sock.close()


def test_global_cap_evicts_the_longest_idle_connection(start_server):
    server = start_server(config={"max_connections": 3})
    held = open_idle(server, 3)
    try:
        assert request(server, "GET", "/hello")[0] == 200  # served: an idle one made room
        closed = [sock for sock in held if is_closed(sock, timeout=0.5)]
        assert len(closed) == 1  # exactly one (the longest idle) was closed
    finally:
        for sock in held:
            sock.close()


def test_global_cap_with_no_idle_connection_answers_503(start_server):
    server = start_server(config={"max_connections": 2, "header_timeout_s": 5})
    busy = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
    for sock in busy:
        sock.sendall(b"GET /hello HTTP/1.1\r\n")  # mid-head: not idle, not evictable
    time.sleep(0.2)
    raw = raw_exchange(server, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(raw) == 503
    for sock in busy:
        sock.close()


def test_two_thousand_idle_connections_do_not_block_a_normal_client(start_server):
    """Idle connections cost no thread: thread count stays at the pool size. The figures
    (p99, RSS) are measured by bench/bench_http.py; this only guards the behaviour."""
    threads_before = threading.active_count()
    server = start_server(config={"max_connections_per_ip": 5000, "worker_threads": 8})
    idle = []
    try:   # closed whatever happens: 2,000 leaked sockets would fail the next test's warnings
        for source_index in range(2, 12):  # ten client addresses, two hundred connections each
            open_idle(server, 200, source="127.0.0.%d" % source_index, into=idle)
        assert len(idle) == 2000
        server_threads = threading.active_count() - threads_before
        assert server_threads <= 8 + 3, server_threads  # workers + reactor + log flusher
        latencies = []
        for _ in range(100):
            started = time.monotonic()
            assert request(server, "GET", "/hello")[0] == 200
            latencies.append(time.monotonic() - started)
        latencies.sort()
        assert latencies[98] < 0.5, latencies[98]  # p99; generous: this runs beside other tests
    finally:
        for sock in idle:
            sock.close()


# --- shutdown -------------------------------------------------------------------------------

def test_shutdown_lets_in_flight_requests_finish_and_closes_idle_ones(start_server):
    entered = threading.Event()

    def slow(request):
        entered.set()
        time.sleep(0.5)
        return "finished"

    server = start_server(routes=[("GET", "/t/slow", slow)], config={"shutdown_timeout_s": 5})
    (idle,) = open_idle(server, 1)
    results = []

    def client():
        results.append(request(server, "GET", "/t/slow"))

    thread = threading.Thread(target=client)
    thread.start()
    assert entered.wait(5)
    started = time.monotonic()
    server.shutdown()
    thread.join(5)
    assert results and results[0][0] == 200 and results[0][2] == b"finished"
    assert results[0][1].get("connection") == "close"
    assert is_closed(idle, timeout=1)
    assert time.monotonic() - started < 3
    idle.close()
    try:
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        refused = False
    except OSError:
        refused = True
    assert refused, "the listener must be closed after shutdown"


def test_shutdown_cuts_requests_that_outlive_the_timeout(start_server):
    release = threading.Event()

    def stuck(request):
        release.wait(10)
        return "late"

    server = start_server(routes=[("GET", "/t/stuck", stuck)], config={"shutdown_timeout_s": 0.2})
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/t/stuck")
    time.sleep(0.2)
    stopper = threading.Thread(target=server.shutdown)
    started = time.monotonic()
    stopper.start()
    time.sleep(0.5)
    release.set()  # the handler returns; its response has nowhere to go
    stopper.join(10)
    assert not stopper.is_alive()
    assert time.monotonic() - started < 5
    connection.close()


def test_the_portable_poller_serves_the_same(start_server):
    """Off Linux there is no epoll: the selectors path must keep connections just as well."""
    server = start_server(config={"keepalive_timeout_s": 0.3, "poller": "select"})
    assert server._poller._epoll is None
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    for _ in range(3):
        connection.request("GET", "/hello")
        assert connection.getresponse().read() == b"hello, world\n"
    connection.close()
    pipeline = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + (
        b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw_exchange(server, pipeline).count(b"hello, world\n") == 3
    (idle,) = open_idle(server, 1)
    assert is_closed(idle)
    idle.close()
