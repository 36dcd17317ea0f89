"""Zero-downtime restart (issue 13, item 4), both ways, under continuous load with notes written:

* without systemd: ``python3 server.py --restart`` (SIGUSR2 to the server named by the data
  dir's lock; onebox/restart.py): the running server starts its successor on its sockets,
  hands over once the successor's configuration is valid, drains, releases the data dir;
* systemd's way: the listening socket is held outside the server (here by the test, as
  onebox.socket holds it), the server is stopped with SIGTERM and a new one started on it.

Each proves: every request gets a response (a kept-alive connection is closed only after a
response that said ``Connection: close``), every acknowledged note is readable from the new
process, and the pid changed. The figures (requests sent, failed, longest wait) are printed
(``-s`` shows them). And a successor that cannot start leaves the old server serving.
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from conftest import ROOT, read_until_close, status_of
from test_systemd import activated, listener, listening_port, stop

SERVER = os.path.join(ROOT, "server.py")


class Load:
    """Clients that send until stopped (at most ``max_requests`` in all, ``seconds`` at most):
    ``fresh`` threads open a connection per request, ``kept`` threads keep theirs alive and
    reconnect only after a response with Connection: close. Every other request POSTs a note.
    Figures: ``sent``, ``failures`` (what went wrong), ``longest`` (seconds), ``notes``
    (id -> text of each acknowledged note), ``closes`` (Connection: close responses)."""

    def __init__(self, port, fresh=2, kept=2, seconds=30.0, max_requests=6000):
        self.port, self.max_requests = port, max_requests
        self.began = time.monotonic()
        self.deadline = self.began + seconds
        self.lock = threading.Lock()
        self.sent, self.failures, self.longest, self.notes, self.closes = 0, [], 0.0, {}, 0
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=("fresh%d" % n, False))
                        for n in range(fresh)]
        self.threads += [threading.Thread(target=self._run, args=("kept%d" % n, True))
                         for n in range(kept)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        for thread in self.threads:
            thread.join(60)

    def figures(self):
        return ("requests sent %d, failed %d, longest wait %.3f s, notes acknowledged %d, "
                "Connection: close %d" % (self.sent, len(self.failures), self.longest,
                                          len(self.notes), self.closes))

    def _take(self):
        with self.lock:
            if self._stop.is_set() or self.sent >= self.max_requests \
                    or time.monotonic() > self.deadline:
                return None
            self.sent += 1
            return self.sent

    def _run(self, name, keep):
        connection = None
        while True:
            number = self._take()
            if number is None:
                break
            reused = connection is not None
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            text = "%s-%d" % (name, number)
            started = time.monotonic()
            try:
                if number % 2:
                    connection.request("POST", "/api/notes", json.dumps({"text": text}),
                                       {"Content-Type": "application/json"})
                else:
                    connection.request("GET", "/hello")
                response = connection.getresponse()
                body = response.read()
                closing = (response.getheader("Connection") or "").lower() == "close"
            except (OSError, http.client.HTTPException) as error:
                with self.lock:
                    self.failures.append("%s at %.3f s (%s connection): %r" % (
                        text, started - self.began, "reused" if reused else "new", error))
                connection.close()
                connection = None
                continue
            waited = time.monotonic() - started
            with self.lock:
                self.longest = max(self.longest, waited)
                self.closes += closing
                expected = 201 if number % 2 else 200
                if response.status != expected:
                    self.failures.append("%s: %d %r" % (text, response.status, body[:80]))
                elif number % 2:
                    self.notes[json.loads(body)["id"]] = text
            if closing or not keep:
                connection.close()
                connection = None
        if connection is not None:
            connection.close()


def read_note(port, note_id):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/api/notes/%s" % note_id)
        response = connection.getresponse()
        body = response.read()
        return response.status, (json.loads(body) if response.status == 200 else body)
    finally:
        connection.close()


def assert_every_note_is_there(port, notes):
    missing = []
    for note_id, text in notes.items():
        status, note = read_note(port, note_id)
        if status != 200 or note["text"] != text:
            missing.append((note_id, text, status))
    assert missing == [], "%d of %d acknowledged notes lost: %r" % (
        len(missing), len(notes), missing[:5])


class Lines:
    """The lines of a stream, read by a thread (a successor writes to the same pipe)."""

    def __init__(self, stream):
        self.lines = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern, timeout=20, after=0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if re.search(pattern, line):
                    return line
            time.sleep(0.02)
        raise AssertionError("no line matching %r in %r" % (pattern, self.lines))

    def text(self):
        return "\n".join(self.lines)


def lock_pid(data):
    return int((data / "lock").read_text().strip())


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def end(pid, timeout=20):
    """SIGTERM to a server this test did not start as its child (a successor), and wait."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


class Served:
    """``python3 server.py FLAGS`` with its stdout and stderr read by threads."""

    def __init__(self, tmp_path, *flags, script=SERVER):
        self.data = tmp_path / "data"
        self.flags = ["--data-dir", str(self.data), "--admin-port", "0", "--access-log",
                      "off"] + list(flags)
        self.process = subprocess.Popen([sys.executable, script, "--port", "0"] + self.flags,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.out, self.err = Lines(self.process.stdout), Lines(self.process.stderr)
        line = self.out.wait_for(r"^listening on ")
        self.port = int(re.search(r":(\d+)/$", line).group(1))
        self.admin = self.out.wait_for(r"^admin on ").split()[-1]

    def restart(self, timeout=90):
        """``python3 server.py --restart`` with the server's flags: (exit status, output)."""
        result = subprocess.run([sys.executable, SERVER, "--restart", "--port", "0"]
                                + self.flags, capture_output=True, text=True, timeout=timeout)
        return result.returncode, result.stdout + result.stderr

    def close(self):
        if self.data.joinpath("lock").exists():
            pid = lock_pid(self.data)
            if pid != self.process.pid:
                end(pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for lines, stream in ((self.out, self.process.stdout), (self.err, self.process.stderr)):
            lines.thread.join(10)   # EOF once every server that shares the pipe has exited
            stream.close()


def get(port, path, timeout=10):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# --- without systemd: server.py --restart ---------------------------------------------------

def test_restart_under_load_fails_no_request_and_loses_no_note(tmp_path):
    server = Served(tmp_path)
    try:
        old = server.process.pid
        assert lock_pid(server.data) == old
        with Load(server.port) as load:
            time.sleep(1.0)
            began = time.monotonic()
            status, output = server.restart()
            took = time.monotonic() - began
            time.sleep(1.0)   # the new process under the same load
        print("\n--restart under load: %s; --restart took %.2f s" % (load.figures(), took))
        assert status == 0, output
        new = lock_pid(server.data)
        assert new != old and alive(new)
        assert "restarted: pid %d replaced pid %d, serving on http://127.0.0.1:%d/" % (
            new, old, server.port) in output
        assert server.process.wait(20) == 0   # the old one drained and exited by itself
        assert load.failures == [], (load.figures(), load.failures[:5])
        assert load.sent >= 200, load.figures()   # the load did run through the restart
        assert load.closes >= 1, load.figures()   # kept-alive ones were told, then reconnected
        assert_every_note_is_there(server.port, load.notes)
        assert get(server.port, "/hello") == (200, b"hello, world\n")
        # the admin listener went over too, on the same port
        assert server.out.wait_for(r"^admin on ", after=2).split()[-1] == server.admin
        assert get(int(server.admin.rsplit(":", 1)[1].strip("/")), "/metrics")[0] == 200
        errors = server.err.text()
        assert "successor (pid %d) has a valid configuration" % new in errors
        assert "Traceback" not in errors
        # and the successor can be replaced in turn
        status, output = server.restart()
        assert status == 0, output
        assert lock_pid(server.data) not in (old, new)
        assert_every_note_is_there(server.port, load.notes)
    finally:
        server.close()


def test_a_successor_that_cannot_start_leaves_the_old_server_serving(tmp_path):
    """An upgrade with a bug: the new code (copied over the running server's) cannot import a
    handler area. ``--restart`` (run from a good copy, with the same flags) signals the running
    server; its successor crashes before it takes over, so the old server serves on, and says
    why; --restart exits 1. Fixed, the restart goes through."""
    app = tmp_path / "app"
    app.mkdir()
    for name in ("server.py", "onebox", "handlers", "pages", "setup.cfg"):
        source = os.path.join(ROOT, name)
        (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, app / name)
    server = Served(tmp_path, script=str(app / "server.py"))
    try:
        old = server.process.pid
        good = (app / "handlers" / "hello.py").read_text()
        with Load(server.port, fresh=1, kept=1, seconds=20) as load:
            time.sleep(0.3)
            (app / "handlers" / "hello.py").write_text(good + "\ndef broken(:\n")
            status, output = server.restart()
            time.sleep(0.3)
        print("\nfailed --restart under load: %s" % load.figures())
        assert status == 1, output
        assert "(pid %d) is still serving; the restart failed" % old in output, output
        line = server.err.wait_for(r"restart failed:")
        assert "exited with status 1: onebox: crashed: SyntaxError" in line, line
        assert "still serving" in line
        assert "Traceback" in server.err.text()   # the successor's own, on the same stderr
        assert load.failures == [], load.failures[:5]
        assert lock_pid(server.data) == old and server.process.poll() is None
        assert get(server.port, "/hello") == (200, b"hello, world\n")
        assert_every_note_is_there(server.port, load.notes)
        (app / "handlers" / "hello.py").write_text(good)
        status, output = server.restart()
        assert status == 0, output
        assert lock_pid(server.data) != old
        assert_every_note_is_there(server.port, load.notes)
    finally:
        server.close()


def test_restart_refuses_a_configuration_that_does_not_load(tmp_path):
    """--restart reads the configuration first (as --check): a broken file is named, and the
    running server is not asked to restart at all."""
    config = tmp_path / "onebox.cfg"
    config.write_text("[server]\nmax_connections = 100\n")
    server = Served(tmp_path, "--config", str(config))
    try:
        config.write_text("[server]\nmax_connections = lots\n")
        status, output = server.restart()
        assert status == 1
        assert "max_connections" in output and "not restarted" in output, output
        time.sleep(0.3)
        assert "restart" not in server.err.text()
        assert lock_pid(server.data) == server.process.pid
        assert get(server.port, "/hello") == (200, b"hello, world\n")
    finally:
        server.close()


def test_restart_without_a_running_server_says_so(tmp_path):
    result = subprocess.run([sys.executable, SERVER, "--restart", "--data-dir",
                             str(tmp_path / "data")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "no running server owns" in result.stderr


# --- systemd's way: the socket outlives the server ------------------------------------------

def test_a_restart_on_a_held_socket_fails_no_request_and_loses_no_note(tmp_path):
    """systemctl restart with onebox.socket: systemd keeps the socket between the two
    processes. The old one drains on SIGTERM; connections made while neither runs wait in the
    backlog and are answered by the next one."""
    held = listener()
    port = held.getsockname()[1]
    first = activated(tmp_path, [held], names=["http"], flags=["--access-log", "off"])
    second = between = None
    try:
        listening_port(first)
        with Load(port) as load:
            time.sleep(1.0)
            began = time.monotonic()
            first.send_signal(signal.SIGTERM)
            assert first.wait(30) == 0
            stopped = time.monotonic() - began
            # no server runs: a connection now waits in the backlog
            between = socket.create_connection(("127.0.0.1", port), timeout=10)
            between.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            second = activated(tmp_path, [held], names=["http"], flags=["--access-log", "off"])
            assert listening_port(second) == port
            answer = read_until_close(between, timeout=10)
            time.sleep(1.0)
        print("\nrestart on a held socket under load: %s; the old one stopped in %.2f s"
              % (load.figures(), stopped))
        assert status_of(answer) == 200 and answer.endswith(b"hello, world\n"), answer
        assert load.failures == [], (load.figures(), load.failures[:5])
        assert load.sent >= 200, load.figures()
        assert_every_note_is_there(port, load.notes)
        assert stop(second) == 0
    finally:
        stop(first)
        if second is not None:
            stop(second)
        if between is not None:
            between.close()
        held.close()
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()


def test_under_systemd_sigusr2_refuses_and_says_to_use_systemctl(tmp_path):
    """Under systemd the unit's main process must stay the one systemd started (NotifyAccess=
    main); `systemctl restart onebox` with onebox.socket is the way there."""
    from test_systemd import notify_socket
    reader, address = notify_socket()
    process = subprocess.Popen(
        [sys.executable, SERVER, "--port", "0", "--admin-port", "off", "--data-dir",
         str(tmp_path / "data")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, NOTIFY_SOCKET=address))
    try:
        port = listening_port(process)
        process.send_signal(signal.SIGUSR2)
        time.sleep(0.5)
        assert get(port, "/hello")[0] == 200
        assert stop(process) == 0
        errors = process.stderr.read()
    finally:
        stop(process)
        process.stderr.close()
        reader.close()
    assert "restart refused: under systemd, run `systemctl restart onebox`" in errors, errors
    assert lock_pid(tmp_path / "data") == process.pid
