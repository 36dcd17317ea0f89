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
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, Client, Load, read_until_close, status_of
from test_systemd import activated, listener

SERVER = os.path.join(ROOT, "server.py")


def load(port, fresh=2, kept=2, seconds=30.0):
    """Clients that send until stopped (at most 6000 requests in all, ``seconds`` at most):
    ``fresh`` ones open a connection per request, ``kept`` ones keep theirs alive and reconnect
    only after a response with Connection: close. Every other request POSTs a note; a GET must
    answer 200 and a POST 201."""
    clients = [Client("fresh%d" % n, keep_alive=False, notes=True, strict=True)
               for n in range(fresh)]
    clients += [Client("kept%d" % n, keep_alive=True, notes=True, strict=True)
                for n in range(kept)]
    return Load(port, clients, max_requests=6000, max_s=seconds, timeout_s=30)


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
    """``python3 server.py FLAGS`` (admin on a free port, no access log) through the
    server_process fixture, and ``--restart`` with the same flags."""

    def __init__(self, server_process, *flags, script=SERVER):
        flags = ["--admin-port", "0", "--access-log", "off"] + list(flags)
        self.process = server_process(*flags, script=script)
        self.data = self.process.data_dir
        self.flags = ["--data-dir", str(self.data)] + flags
        self.port = self.process.port
        self.admin = self.process.admin_url

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
        self.process.stop(20)


def get(port, path, timeout=10):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# --- without systemd: server.py --restart ---------------------------------------------------

@pytest.mark.slow
def test_restart_under_load_fails_no_request_and_loses_no_note(server_process):
    server = Served(server_process)
    try:
        old = server.process.pid
        assert lock_pid(server.data) == old
        with load(server.port) as run:
            time.sleep(1.0)
            began = time.monotonic()
            status, output = server.restart()
            took = time.monotonic() - began
            time.sleep(1.0)   # the new process under the same load
        print("\n--restart under load: %s; --restart took %.2f s" % (run.figures(), took))
        assert status == 0, output
        new = lock_pid(server.data)
        assert new != old and alive(new)
        assert "restarted: pid %d replaced pid %d, serving on http://127.0.0.1:%d/" % (
            new, old, server.port) in output
        assert server.process.wait(20) == 0   # the old one drained and exited by itself
        assert run.failures == [], (run.figures(), run.failures[:5])
        assert run.sent >= 200, run.figures()   # the load did run through the restart
        assert run.closes >= 1, run.figures()   # kept-alive ones were told, then reconnected
        assert_every_note_is_there(server.port, run.notes)
        assert get(server.port, "/hello") == (200, b"hello, world\n")
        # the admin listener went over too, on the same port
        assert server.process.wait_for(r"^admin on ", after=2, until_exit=False).split()[-1] \
            == server.admin
        assert get(int(server.admin.rsplit(":", 1)[1].strip("/")), "/metrics")[0] == 200
        errors = server.process.err_text()
        assert "successor (pid %d) has a valid configuration" % new in errors
        assert "Traceback" not in errors
        # and the successor can be replaced in turn
        status, output = server.restart()
        assert status == 0, output
        assert lock_pid(server.data) not in (old, new)
        assert_every_note_is_there(server.port, run.notes)
    finally:
        server.close()


@pytest.mark.slow
def test_a_successor_that_cannot_start_leaves_the_old_server_serving(tmp_path,
                                                                   server_process):
    """An upgrade with a bug: the new code (copied over the running server's) cannot import a
    handler area. ``--restart`` (run from a good copy, with the same flags) signals the running
    server; its successor crashes before it takes over, so the old server serves on, and says
    why; --restart exits 1. Fixed, the restart goes through."""
    app = tmp_path / "app"
    app.mkdir()
    for name in ("server.py", "onebox", "handlers", "pages", "setup.cfg"):
        source = os.path.join(ROOT, name)
        (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, app / name)
    server = Served(server_process, script=str(app / "server.py"))
    try:
        old = server.process.pid
        good = (app / "handlers" / "hello.py").read_text()
        with load(server.port, fresh=1, kept=1, seconds=20) as run:
            time.sleep(0.3)
            (app / "handlers" / "hello.py").write_text(good + "\ndef broken(:\n")
            status, output = server.restart()
            time.sleep(0.3)
        print("\nfailed --restart under load: %s" % run.figures())
        assert status == 1, output
        assert "(pid %d) is still serving; the restart failed" % old in output, output
        line = server.process.wait_for(r"restart failed:", "err")
        assert "exited with status 1: onebox: crashed: SyntaxError" in line, line
        assert "still serving" in line
        assert "Traceback" in server.process.err_text()   # the successor's own, same stderr
        assert run.failures == [], run.failures[:5]
        assert lock_pid(server.data) == old and server.process.poll() is None
        assert get(server.port, "/hello") == (200, b"hello, world\n")
        assert_every_note_is_there(server.port, run.notes)
        (app / "handlers" / "hello.py").write_text(good)
        status, output = server.restart()
        assert status == 0, output
        assert lock_pid(server.data) != old
        assert_every_note_is_there(server.port, run.notes)
    finally:
        server.close()


def test_restart_refuses_a_configuration_that_does_not_load(tmp_path, server_process):
    """--restart reads the configuration first (as --check): a broken file is named, and the
    running server is not asked to restart at all."""
    config = tmp_path / "onebox.cfg"
    config.write_text("[server]\nmax_connections = 100\n")
    server = Served(server_process, "--config", str(config))
    try:
        config.write_text("[server]\nmax_connections = lots\n")
        status, output = server.restart()
        assert status == 1
        assert "max_connections" in output and "not restarted" in output, output
        time.sleep(0.3)
        assert "restart" not in server.process.err_text()
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

@pytest.mark.slow
def test_a_restart_on_a_held_socket_fails_no_request_and_loses_no_note(server_process):
    """systemctl restart with onebox.socket: systemd keeps the socket between the two
    processes. The old one drains on SIGTERM; connections made while neither runs wait in the
    backlog and are answered by the next one."""
    held = listener()
    port = held.getsockname()[1]
    second = between = None
    try:
        first = activated(server_process, [held], names=["http"], flags=["--access-log", "off"])
        with load(port) as run:
            time.sleep(1.0)
            began = time.monotonic()
            first.send_signal(signal.SIGTERM)
            assert first.wait(30) == 0
            stopped = time.monotonic() - began
            # no server runs: a connection now waits in the backlog
            between = socket.create_connection(("127.0.0.1", port), timeout=10)
            between.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            second = activated(server_process, [held], names=["http"],
                               flags=["--access-log", "off"])
            assert second.port == port
            answer = read_until_close(between, timeout=10)
            time.sleep(1.0)
        print("\nrestart on a held socket under load: %s; the old one stopped in %.2f s"
              % (run.figures(), stopped))
        assert status_of(answer) == 200 and answer.endswith(b"hello, world\n"), answer
        assert run.failures == [], (run.figures(), run.failures[:5])
        assert run.sent >= 200, run.figures()
        assert_every_note_is_there(port, run.notes)
        assert second.stop() == 0
    finally:
        if between is not None:
            between.close()
        held.close()
    assert "Traceback" not in first.err_text() + second.err_text()


def test_under_systemd_sigusr2_refuses_and_says_to_use_systemctl(tmp_path, server_process):
    """Under systemd the unit's main process must stay the one systemd started (NotifyAccess=
    main); `systemctl restart onebox` with onebox.socket is the way there."""
    from test_systemd import notify_socket
    reader, address = notify_socket()
    try:
        process = server_process("--admin-port", "off", env={"NOTIFY_SOCKET": address})
        process.send_signal(signal.SIGUSR2)
        time.sleep(0.5)
        assert get(process.port, "/hello")[0] == 200
        assert process.stop() == 0
        errors = process.err_text()
    finally:
        reader.close()
    assert "restart refused: under systemd, run `systemctl restart onebox`" in errors, errors
    assert lock_pid(tmp_path / "data") == process.pid


def test_a_restart_ends_streams_and_browsers_resume_on_the_successor(server_process):
    """Issue 22: each open stream gets a last retry: and a clean close; reconnecting with its
    Last-Event-ID, the successor answers reset (the old process's ids are not its own), then
    the successor's events."""
    from test_streams import Stream
    server = Served(server_process)
    try:
        stream = Stream(server, "/api/notes/events")
        assert stream.status() == 200 and stream.next_block().startswith(b"retry: 2000\nid: ")
        status, body = post_note(server.port, "before the restart")
        assert status == 201
        seen = stream.next_event()
        assert seen["event"] == "created" and json.loads(seen["data"])["text"] == \
            "before the restart"
        status, output = server.restart()
        assert status == 0, output
        farewell = stream.next_block(timeout=20)
        assert farewell.startswith(b"retry: ") and 2000 <= int(farewell[7:]) <= 6000
        with pytest.raises(EOFError):
            stream.next_block(timeout=20)
        stream.close()
        again = Stream(server, "/api/notes/events", "Last-Event-ID: %s\r\n" % seen["id"])
        reset = again.next_event()
        assert reset["event"] == "reset" and int(reset["id"]) > int(seen["id"])
        assert post_note(server.port, "after the restart")[0] == 201
        created = again.next_event()
        assert created["event"] == "created" and int(created["id"]) > int(reset["id"])
        again.close()
    finally:
        server.close()


def post_note(port, text):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/api/notes", json.dumps({"text": text}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
