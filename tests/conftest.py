"""Shared fixtures: a real onebox server on an ephemeral port, and real clients for it.

``start_server(**kwargs)`` builds a server with ``server.make_server`` (kwargs pass through:
``config={...}``, ``pages_dir=...``), runs it in a thread, and stops it at the end of the test.
The server's access and error logs are captured in ``server.access_text()`` and
``server.error_text()``.
"""
import http.client
import os
import socket
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import server as onebox  # noqa: E402  (the runtime under test)


class LogCapture:
    """A thread-safe text stream standing in for stdout or stderr."""

    def __init__(self):
        self.lock = threading.Lock()
        self.parts = []

    def write(self, text):
        with self.lock:
            self.parts.append(text)

    def flush(self):
        pass

    def text(self):
        with self.lock:
            return "".join(self.parts)


# The abuse guard's default limits (20 requests/s per client) would refuse the load that tests
# of other features make from one address. They run with the guard on, so it checks every
# request, but with limits out of reach; a test's own "limits.*" settings win.
LIMITS_OUT_OF_REACH = {"limits.client_rate_per_s": 1e9, "limits.client_burst": 10 ** 9,
                       "limits.route_rate_per_s": 1e9, "limits.route_burst": 10 ** 9}


@pytest.fixture
def start_server(tmp_path):
    running = []

    def start(**kwargs):
        kwargs.setdefault("data_dir", tmp_path / ("data-%d" % len(running)))  # one owner each
        kwargs["config"] = dict(LIMITS_OUT_OF_REACH, **(kwargs.get("config") or {}))
        access, errors = LogCapture(), LogCapture()
        built = onebox.make_server(access_log=access, error_log=errors, **kwargs)
        built.access_text = lambda: settled_text(built, access)
        built.error_text = errors.text
        built.port = built.server_address[1]
        thread = threading.Thread(target=built.serve_forever, name="test-server")
        thread.start()
        running.append((built, thread))
        return built

    yield start
    for started, thread in running:
        started.shutdown()
        thread.join(30)
        started.server_close()
        assert not thread.is_alive(), "server thread did not stop"


def settled_text(server, capture, quiet_s=0.03, limit_s=2.0):
    """The access log once it stops growing: a worker logs a request just after sending its
    response, so the client can be ahead of the log by a request or two on a loaded machine."""
    deadline = time.monotonic() + limit_s
    text = None
    while True:
        if server.access_log:
            server.access_log.flush()
        latest = capture.text()
        if latest == text or time.monotonic() > deadline:
            return latest
        text = latest
        time.sleep(quiet_s)


@pytest.fixture
def server(start_server):
    return start_server()


class Wedge:
    """A server with one worker and a route, GET /wedge, that holds the worker until released:
    how a test makes the pool unable to take a job. ``with wedge:`` holds it; leaving frees it."""

    def __init__(self, start_server, config=None):
        self.release = threading.Event()

        def hold(request):
            self.release.wait(30)
            return "freed\n"

        self.server = start_server(
            config=dict({"worker_threads": 1, "stall_timeout_s": 2.0}, **(config or {})),
            routes=[("GET", "/wedge", hold)])
        self.thread = None

    def __enter__(self):
        self.release.clear()
        self.thread = threading.Thread(target=request, args=(self.server, "GET", "/wedge"),
                                       kwargs={"timeout": 40})
        self.thread.start()
        return self.server

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(40)


@pytest.fixture
def wedge(start_server):
    return Wedge(start_server)


def request(server, method, path, body=None, headers=None, timeout=10):
    """One request on a fresh connection: (status, headers as a dict of lower-case names, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        connection.close()


def raw_exchange(server, data, timeout=5, source=None):
    """Send raw bytes and read until the server closes (or ``timeout``); returns the bytes."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    try:
        if data:
            sock.sendall(data)
        return read_until_close(sock, timeout)
    finally:
        sock.close()


def read_until_close(sock, timeout=5):
    sock.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(raw):
    """The status code of the first response in ``raw`` bytes, or None."""
    if not raw.startswith(b"HTTP/1."):
        return None
    return int(raw.split(b" ", 2)[1])
