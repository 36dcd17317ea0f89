"""Shared fixtures: a real onebox server on ephemeral ports, and real clients for it.

Two ways to start a server, and no other (a test never picks a port number itself):

* ``start_server(**kwargs)`` builds a server with ``server.make_server`` (kwargs pass through:
  ``config={...}``, ``pages_dir=...``), runs it in a thread, and stops it at the end of the
  test: for tests that need the server object. Its access and error logs are captured in
  ``server.access_text()`` and ``server.error_text()``.
* ``server_process(*flags, ...)`` runs the real ``python3 server.py --port 0 --data-dir ...``
  as a user does, waits for its ``listening on`` line and returns a ``ServerProcess`` (its
  ports, its stdout and stderr, signals). Port 0 means every listener (public, admin, https)
  takes a free port unless a flag names one. Whatever the test does, the process is killed
  and reaped at its end; a server that does not start fails the test with its stderr.

``Load`` is the one load generator: clients in threads sending until stopped.
"""
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import server as onebox  # noqa: E402  (the runtime under test)

SERVER = os.path.join(ROOT, "server.py")


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


# --- the real process: python3 server.py ------------------------------------------------------

class ServerProcess:
    """One ``python3 server.py`` started by the ``server_process`` fixture.

    Its stdout and stderr go to files in the test's tmp_path (a successor started by --restart
    inherits them; nothing has to drain a pipe), read as lines: ``out_lines()``,
    ``err_lines()``, ``out_text()``, ``err_text()``, and ``wait_for(pattern, "out"|"err",
    after=index)`` for a line still to come. ``port`` and ``url`` come from the first
    ``listening on`` line; ``admin_port``, ``admin_url``, ``tls_port`` and ``tls_url`` wait for
    their own lines when first asked. ``stop()`` (SIGTERM), ``kill()`` (SIGKILL), ``wait()``
    (for a process expected to exit by itself) each return the exit status."""

    PUBLIC = r"^listening on (http://(\S+):(\d+)/)$"
    TLS = r"^listening on (https://(\S+):(\d+)/)$"
    ADMIN = r"^admin on (http://(\S+):(\d+)/)$"

    def __init__(self, command, out_path, err_path, data_dir, stdout_pipe=False, **popen):
        self.out_path, self.err_path, self.data_dir = out_path, err_path, data_dir
        self.piped_lines = None   # stdout_pipe: the lines read before the pipe was left alone
        self.pipe_tail = b""      # and the start of a line not yet whole
        with open(str(err_path), "ab") as errors:
            if stdout_pipe:
                self.process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                                stderr=errors, **popen)
                self.piped_lines = []
            else:
                with open(str(out_path), "ab") as out:
                    self.process = subprocess.Popen(command, stdout=out, stderr=errors,
                                                    **popen)
        self.pid = self.process.pid
        self._url = None

    # -- output --

    def out_lines(self):
        if self.piped_lines is not None:
            return list(self.piped_lines)
        return _lines_of(self.out_path)

    def err_lines(self):
        return _lines_of(self.err_path)

    def out_text(self):
        return "\n".join(self.out_lines())

    def err_text(self):
        return "\n".join(self.err_lines())

    def wait_for(self, pattern, stream="out", after=0, timeout=20, until_exit=True):
        """The first line of ``stream`` (from line ``after`` on) that matches ``pattern``;
        fails, with the server's stderr, if none comes within ``timeout`` seconds or (with
        ``until_exit``) the process exits first. (A successor started by --restart writes to
        the same files after this process exits: ``until_exit=False`` waits for its lines.)"""
        lines = self.err_lines if stream == "err" else self._read_out
        deadline = time.monotonic() + timeout
        while True:
            exited = until_exit and self.process.poll() is not None
            for line in lines()[after:]:
                if re.search(pattern, line):
                    return line
            if exited or time.monotonic() > deadline:
                raise AssertionError(
                    "server.py: no %s line matching %r (%s); stdout:\n%s\nstderr:\n%s" % (
                        stream, pattern, "exit status %s" % self.process.poll() if exited
                        else "still running after %ss" % timeout, self.out_text()[-2000:],
                        self.err_text()[-4000:]))
            time.sleep(0.02)

    def _read_out(self):
        """stdout's lines; from a pipe, what has arrived (only while start-up lines are
        awaited: afterwards nobody reads the pipe, as a test of a stalled stdout wants)."""
        if self.piped_lines is None:
            return self.out_lines()
        pipe = self.process.stdout
        while select.select([pipe], [], [], 0)[0]:
            chunk = os.read(pipe.fileno(), 65536)
            if not chunk:
                break
            *whole, self.pipe_tail = (self.pipe_tail + chunk).split(b"\n")
            self.piped_lines += [line.decode("utf-8", "replace") for line in whole]
        return list(self.piped_lines)

    # -- addresses --

    def _address(self, pattern):
        return re.match(pattern, self.wait_for(pattern)).group(1, 3)

    @property
    def url(self):
        if self._url is None:
            self._url = self._address(self.PUBLIC)[0]
        return self._url

    @property
    def port(self):
        return int(self.url.rstrip("/").rsplit(":", 1)[1])

    @property
    def tls_url(self):
        return self._address(self.TLS)[0]

    @property
    def tls_port(self):
        return int(self._address(self.TLS)[1])

    @property
    def admin_url(self):
        return self._address(self.ADMIN)[0]

    @property
    def admin_port(self):
        return int(self._address(self.ADMIN)[1])

    # -- signals and the end --

    def poll(self):
        return self.process.poll()

    def send_signal(self, number):
        self.process.send_signal(number)

    def wait(self, timeout=30):
        """The exit status of a process that exits by itself (a refused start-up); killed,
        and the test failed, if it runs on past ``timeout``."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("server.py still running after %ss; stderr:\n%s"
                                 % (timeout, self.err_text()[-4000:]))

    def stop(self, timeout=15):
        """SIGTERM, then the exit status; None if it had to be killed after ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait()

    def close(self):
        """Killed if still running, reaped, its pipe closed (the fixture's end does this)."""
        self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()


def _lines_of(path):
    try:
        with open(str(path), "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        return []
    if not data.endswith(b"\n"):   # a line still being written is not a line yet
        data = data[:data.rfind(b"\n") + 1]
    return data.decode("utf-8", "replace").splitlines()


@pytest.fixture
def server_process(tmp_path):
    """start(*flags, port="0", data_dir=tmp_path/"data", config=None, env=None, prefix=(),
    wait=True, stdout_pipe=False, err_path=None, script=SERVER, **popen) runs
    ``PREFIX python3 SCRIPT [--config FILE] [--port PORT] --data-dir DIR FLAGS`` and, with
    ``wait``, returns once it prints ``listening on``. ``port=None`` leaves the flag out (a
    port from the config file, or a socket passed as systemd does); ``config`` is a file's path
    or ``{"section.key": value}`` (written to a file); ``env`` adds to the environment (None
    unsets a name); ``prefix`` is a launcher that execs the rest; ``popen`` goes to Popen
    (pass_fds, preexec_fn). stdout goes to a file, or a pipe with ``stdout_pipe`` (read only
    while start-up lines are awaited); stderr to a file (``err_path``, appended to, if given).
    Every process is killed and reaped at the end of the test."""
    started = []

    def start(*flags, port="0", data_dir=None, config=None, env=None, prefix=(), wait=True,
              stdout_pipe=False, err_path=None, script=SERVER, **popen):
        number = len(started)
        command = list(prefix) + [sys.executable, script]
        if isinstance(config, dict):
            config = write_config_file(tmp_path / ("onebox-%d.cfg" % number), config)
        if config is not None:
            command += ["--config", str(config)]
        if port is not None:
            command += ["--port", str(port)]
        data_dir = tmp_path / "data" if data_dir is None else data_dir
        command += ["--data-dir", str(data_dir)] + [str(flag) for flag in flags]
        environment = {key: value for key, value in dict(os.environ, **(env or {})).items()
                       if value is not None}
        process = ServerProcess(command, tmp_path / ("server-%d.out" % number),
                                err_path or tmp_path / ("server-%d.err" % number), data_dir,
                                stdout_pipe=stdout_pipe, env=environment, **popen)
        started.append(process)
        if wait:
            process.wait_for(ServerProcess.PUBLIC)   # or fails, with its stderr
        return process

    yield start
    for process in started:
        process.close()


def write_config_file(path, values):
    """``{"section.key": value}`` as an ini file at ``path``; returns the path."""
    sections = {}
    for dotted, value in values.items():
        section, _, key = dotted.rpartition(".")
        sections.setdefault(section, []).append("%s = %s" % (key, value))
    path.write_text("".join("[%s]\n%s\n" % (section, "\n".join(lines))
                            for section, lines in sections.items()))
    return path


def free_port():
    """A port free a moment ago, for a program that cannot be told port 0 and report its
    choice (nginx): its caller retries if another process took it meanwhile."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the load generator -------------------------------------------------------------------------

class Client:
    """One client of a ``Load``: ``path`` (or a function of the client's request number),
    from ``source`` (None: the kernel's choice on loopback), on one kept-alive connection or a
    connection per request, ``pause_s`` between requests. With ``notes``, every other request
    of the load (odd numbers) POSTs a note instead, recorded when acknowledged. With
    ``strict``, a GET must answer 200 and a POST 201; otherwise only an exception or a 5xx is
    a failure."""

    def __init__(self, name, path="/hello", source=None, keep_alive=True, pause_s=0.0,
                 notes=False, strict=False):
        self.name, self.path, self.source, self.keep_alive = name, path, source, keep_alive
        self.pause_s, self.notes, self.strict = pause_s, notes, strict
        self.stopping = threading.Event()


class Load:
    """Clients sending requests, each in a thread, until stopped (``with Load(...)``, or
    ``start()`` and ``stop()``; ``stop(name)`` stops one client), at most ``max_requests`` in
    all and ``max_s`` seconds (None: no bound). A kept-alive connection is replaced after an
    error or a response that closes it. Figures, under ``lock``: ``sent``, ``failures`` (what
    went wrong, and when), ``longest`` (seconds), ``statuses`` ({source: {status: count}}, None
    for an exception), ``notes`` (id -> text of each acknowledged note), ``closes`` (responses
    with Connection: close)."""

    def __init__(self, port, clients, max_requests=4000, max_s=20.0, timeout_s=10.0):
        self.port, self.clients, self.timeout_s = port, list(clients), timeout_s
        self.max_requests = max_requests
        self.began = time.monotonic()
        self.deadline = None if max_s is None else self.began + max_s
        self.lock = threading.Lock()
        self.sent, self.failures, self.longest, self.notes, self.closes = 0, [], 0.0, {}, 0
        self.statuses = {}
        self.threads = {client.name: threading.Thread(target=self._run, args=(client,))
                        for client in self.clients}

    @property
    def failed(self):
        return len(self.failures)

    def start(self):
        for thread in self.threads.values():
            thread.start()
        return self

    def stop(self, name=None):
        for client in self.clients:
            if name in (None, client.name):
                client.stopping.set()
                self.threads[client.name].join(60)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def figures(self):
        return ("requests sent %d, failed %d, longest wait %.3f s, notes acknowledged %d, "
                "Connection: close %d, statuses %s" % (self.sent, self.failed, self.longest,
                                                       len(self.notes), self.closes,
                                                       self.statuses))

    def _take(self, client):
        with self.lock:
            if client.stopping.is_set() or (self.max_requests is not None
                                            and self.sent >= self.max_requests) \
                    or (self.deadline is not None and time.monotonic() > self.deadline):
                return None
            self.sent += 1
            return self.sent

    def _run(self, client):
        connection, count = None, 0
        while True:
            number = self._take(client)
            if number is None:
                break
            count += 1
            reused = connection is not None
            if connection is None:
                connection = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=self.timeout_s,
                    source_address=(client.source, 0) if client.source else None)
            posting = client.notes and number % 2
            text = "%s-%d" % (client.name, number)
            started = time.monotonic()
            status, error, closing = None, None, False
            try:
                if posting:
                    connection.request("POST", "/api/notes", json.dumps({"text": text}),
                                       {"Content-Type": "application/json"})
                else:
                    path = client.path(count) if callable(client.path) else client.path
                    connection.request("GET", path)
                response = connection.getresponse()
                body = response.read()
                status = response.status
                closing = (response.getheader("Connection") or "").lower() == "close"
            except (OSError, http.client.HTTPException) as problem:
                error = "%s at %.3f s (%s connection): %r" % (
                    text, started - self.began, "reused" if reused else "new", problem)
            self._record(client, text, posting, status, error, closing,
                         time.monotonic() - started, None if error else body)
            if error or closing or not client.keep_alive or response.will_close:
                connection.close()
                connection = None
            if client.pause_s:
                time.sleep(client.pause_s)
        if connection is not None:
            connection.close()

    def _record(self, client, text, posting, status, error, closing, waited, body):
        with self.lock:
            counts = self.statuses.setdefault(client.source or "127.0.0.1", {})
            counts[status] = counts.get(status, 0) + 1
            if error:
                self.failures.append(error)
                return
            self.longest = max(self.longest, waited)
            self.closes += closing
            expected = 201 if posting else 200
            if status >= 500 or (client.strict and status != expected):
                self.failures.append("%s: %d %r" % (text, status, body[:80]))
            elif posting and status == 201:
                self.notes[json.loads(body)["id"]] = text


def cut_off(sock, wait_s=0.2):
    """Whether the server closed ``sock``, or answered 503 first (a request under way shed to
    make room or to keep to the memory budget); False if it is still open after ``wait_s``."""
    sock.settimeout(wait_s)
    try:
        data = sock.recv(200)
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 503 ")


def wait_until(condition, timeout=2.0):
    """Whether ``condition()`` came true within ``timeout`` seconds (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
