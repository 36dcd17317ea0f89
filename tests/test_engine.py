"""The engine's own promises (issue 12): the worker pool keeps its size whatever races happen,
refusals the reactor makes itself are logged and counted, and at the global connection cap
the client holding the most connections makes room for a newcomer."""
import re
import socket
import threading
import time

import pytest

from conftest import cut_off, raw_exchange, read_until_close, request, status_of


def still_open(sock):
    sock.settimeout(0.1)
    try:
        return sock.recv(1) != b""
    except socket.timeout:
        return True


def workers_alive():
    return sum(thread.name.startswith("onebox-worker") and thread.is_alive()
               for thread in threading.enumerate())


def test_a_request_that_comes_while_its_connection_is_handed_back_is_served(start_server):
    """A worker re-arms a kept connection, then books it with the reactor. A request that
    arrives between the two must not be lost, and the reactor must not close the connection
    before the worker has re-armed it (once, closing a connection a worker still re-armed
    killed that worker with EBADF and shrank the pool)."""
    server = start_server(config={"worker_threads": 2})
    if not server.workers.poller.can_rearm:
        pytest.skip("only epoll lets a worker re-arm a connection ([server] poller = select)")
    kept = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    staged = []

    def between(conn):   # runs in the worker, between re-arming and booking
        if not staged and conn.sock.getpeername()[1] == kept.getsockname()[1]:
            staged.append(conn)
            kept.sendall(b"GET /hello/again HTTP/1.1\r\nHost: x\r\n\r\n")
            server.handoff.wake()
            time.sleep(0.3)   # the report comes, and the reactor turns, before the booking

    try:
        kept.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(4096).endswith(b"hello, world\n")   # a worker now holds it...
        server.handoff.before_booking = between
        results = []

        def fetch(start):
            start.wait(10)
            results.append(request(server, "GET", "/hello")[0])

        # ...until these need the workers: it hands it back. Eight at once (a barrier: on a
        # loaded machine threads started one by one were served one by one by the other
        # worker, and the held connection was never wanted), again if need be.
        for _ in range(5):
            start = threading.Barrier(8)
            threads = [threading.Thread(target=fetch, args=(start,)) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            if staged:
                break
        assert staged, "the race was not staged: the kept connection was not handed back"
        answer = b""
        while not answer.endswith(b'"hello, again"}'):
            data = kept.recv(4096)
            assert data, "the request sent during the hand-back was lost"
            answer += data
        assert results == [200] * len(results) and len(results) % 8 == 0
        assert workers_alive() == 2
    finally:
        kept.close()
    assert "hand-back failed" not in server.error_text()
    assert "connection error" not in server.error_text()


def test_a_request_seen_before_its_connection_is_booked_is_served_at_once(start_server):
    """The reactor may see a kept connection's next request after its worker re-armed it and
    before the worker books it. With nothing else going on, the reactor must turn again for
    the booking instead of sleeping out its timer (it used to: up to a second a request)."""
    server = start_server(config={"worker_threads": 1})
    if not server.workers.poller.can_rearm:
        pytest.skip("only epoll lets a worker re-arm a connection ([server] poller = select)")
    kept = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    other = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    staged = []

    def between(conn):   # in the worker: the next request comes, and the reactor sees it
        if not staged and conn.sock.getpeername()[1] == kept.getsockname()[1]:
            kept.sendall(b"GET /hello/again HTTP/1.1\r\nHost: x\r\n\r\n")
            deadline = time.monotonic() + 2
            while not conn.early_report and time.monotonic() < deadline:
                time.sleep(0.001)
            staged.append((conn.early_report, time.monotonic()))

    try:
        kept.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(4096).endswith(b"hello, world\n")   # its worker now holds it...
        server.handoff.before_booking = between
        other.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")   # ...and lets it go
        assert other.recv(4096).endswith(b"hello, world\n")
        answer = b""
        while not answer.endswith(b'"hello, again"}'):
            data = kept.recv(4096)
            assert data, "the request sent during the hand-back was lost"
            answer += data
        answered = time.monotonic()
        assert staged and staged[0][0], "the race was not staged"
        waited = answered - staged[0][1]
        assert waited < 0.5, "the request waited %.2f s for the reactor's next turn" % waited
    finally:
        kept.close()
        other.close()


def test_a_wedged_worker_pool_makes_the_server_unhealthy_until_it_frees(wedge):
    """health() is what the systemd watchdog and /healthz go by: the reactor turns, and a
    worker takes a job, within stall_timeout_s."""
    server = wedge.server
    deadline = time.monotonic() + 5
    while server.health() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health() is None
    with wedge:
        deadline = time.monotonic() + 6
        while server.health() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.health() is not None and "no worker has taken a job" in server.health()
    deadline = time.monotonic() + 3
    while server.health() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health() is None
    assert request(server, "GET", "/hello")[0] == 200


def test_refusals_reach_the_access_log_and_the_guard_counters(start_server):
    server = start_server(config={"max_connections_per_ip": 2})
    held = [socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.3", 0))
            for _ in range(2)]
    try:
        time.sleep(0.2)   # accepted
        raw = raw_exchange(server, b"", source="127.0.0.3")
        assert status_of(raw) == 503 and b"too many connections from your address" in raw
    finally:
        for sock in held:
            sock.close()
    assert status_of(raw_exchange(server, b"\x16\x03\x01 not http\r\n\r\n")) == 400
    log = server.access_text()
    assert '127.0.0.3 - - [' in log and '"-" 503 ' in log and "refused=client_cap" in log
    assert '"\\x16\\x03\\x01 not http" 400 ' in log
    assert server.refusals.stats()["refused_client_cap"] == 1


@pytest.mark.parametrize("source", ["127.0.0.3", "127.0.0.1"])   # a client; a trusted proxy
def test_heads_the_reactor_refuses_are_counted_by_the_guard(start_server, source):
    """400, 414 and 431 sent by the reactor before any worker sees the request are counted in
    guard.stats()["counts"] (and so in /metrics), whoever sent them: a strike alone is not
    seen, and a trusted proxy's connections earn none."""
    server = start_server()
    heads = [b"\x16\x03\x01 not http\r\n\r\n",
             b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
             b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n"]
    assert [status_of(raw_exchange(server, head, source=source)) for head in heads] == [
        400, 414, 431]
    assert server.refusals.stats().get("refused_bad_request") == 3
    assert server.access_text().count('" 4') >= 3

def test_a_flood_of_refusals_is_sampled_in_the_access_log(start_server):
    server = start_server(config={"max_connections_per_ip": 1})
    holder = socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.4", 0))
    try:
        time.sleep(0.2)
        started = time.monotonic()
        for _ in range(60):
            raw_exchange(server, b"", source="127.0.0.4", timeout=2)
        elapsed = time.monotonic() - started
    finally:
        holder.close()
    time.sleep(1.1)
    request(server, "GET", "/hello")   # a new second: the sum of the unlogged is written
    lines = server.access_text().count("refused=client_cap")
    unlogged = sum(int(n) for n in re.findall(r"(\d+) more refusals not logged",
                                              server.error_text()))
    assert server.refusals.stats()["refused_client_cap"] == 60
    assert lines + unlogged == 60 and unlogged > 0           # every one logged or summed up
    assert lines <= 20 * (int(elapsed) + 2)                  # at most 20 lines in any second


def test_at_the_global_cap_the_largest_client_makes_room(start_server):
    """18 addresses x 256 silent connections once filled the 4,096 cap and refused everyone
    else. Now a newcomer gets in: the oldest silent connection of the client holding the most
    goes; that client's own next connection is refused instead."""
    server = start_server(config={"max_connections": 12, "max_connections_per_ip": 100,
                                  "header_timeout_s": 30})
    silent = []
    try:
        for source in ("127.0.0.6", "127.0.0.7"):
            for _ in range(7 if source == "127.0.0.6" else 5):
                silent.append(socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                                       source_address=(source, 0)))
        time.sleep(0.3)   # all twelve accepted: the cap is reached
        newcomer = socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                            source_address=("127.0.0.8", 0))
        newcomer.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(read_until_close(newcomer)) == 200
        newcomer.close()
        oldest = silent[0]                      # 127.0.0.6's first: closed to make room
        oldest.settimeout(2)
        assert oldest.recv(100) == b""
        silent.append(socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                               source_address=("127.0.0.9", 0)))
        time.sleep(0.2)   # the cap again: 6 + 5 + 1, all silent
        greedy = socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                          source_address=("127.0.0.6", 0))
        silent.append(greedy)
        assert status_of(read_until_close(greedy, 2)) == 503   # the largest is refused itself
        assert all(still_open(sock) for sock in silent[1:-1])   # nobody else was closed
    finally:
        for sock in silent:
            sock.close()


def test_a_clients_bodies_past_max_waiting_per_client_wait_in_line(start_server):
    server = start_server(config={"max_waiting_per_client": 1, "body_rate_grace_s": 30})
    head = (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 8\r\nConnection: close\r\n\r\n")
    first, second = (socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                              source_address=("127.0.0.11", 0))
                     for _ in range(2))
    other = socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                     source_address=("127.0.0.12", 0))
    try:
        first.sendall(head + b'{"a"')
        time.sleep(0.2)
        second.sendall(head + b'{"b"')           # in line behind the first: not read
        other.sendall(head + b'{"c"')             # another client's wait starts at once
        time.sleep(0.2)
        second.sendall(b':2}\n')                  # all of it now; but its turn has not come
        other.sendall(b':3}\n')
        assert status_of(read_until_close(other, 5)) == 200
        second.settimeout(0.5)
        try:
            early = second.recv(100)
        except socket.timeout:
            early = b""
        assert early == b"", "the second body was taken before the first wait ended"
        first.sendall(b':1}\n')
        assert read_until_close(first, 5).endswith(b'{"json":{"a":1}}')
        assert read_until_close(second, 5).endswith(b'{"json":{"b":2}}')
    finally:
        for sock in (first, second, other):
            sock.close()


def test_at_the_global_cap_bodies_waiting_in_line_make_room(start_server):
    """A client's bodies past max_waiting_per_client wait in line unread, with no deadline of
    their own. Slow bodies from a few addresses, most of them in line, once filled the cap for
    everyone: a newcomer got 503. Now the oldest body in line of the largest client goes."""
    server = start_server(config={"max_connections": 12, "max_connections_per_ip": 100,
                                  "max_waiting_per_client": 1, "body_rate_grace_s": 60,
                                  "header_timeout_s": 30})
    head = (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n[")
    slow = []
    try:
        for source in ("127.0.0.13", "127.0.0.14"):
            for _ in range(7 if source == "127.0.0.13" else 5):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                                source_address=(source, 0))
                slow.append(sock)
                sock.sendall(head)   # one body being read per client, the others in line
                time.sleep(0.05)
        time.sleep(0.3)   # all twelve have whole heads: none is head-less, none idle
        newcomer = socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                            source_address=("127.0.0.15", 0))
        newcomer.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(read_until_close(newcomer)) == 200
        newcomer.close()
        closed = [number for number, sock in enumerate(slow) if cut_off(sock)]
        assert len(closed) == 1 and closed[0] in range(1, 7), closed   # 127.0.0.13's, in line
    finally:
        for sock in slow:
            sock.close()
