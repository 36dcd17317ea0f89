"""The shared state through the real `python3 server.py`: crashes, a second owner, damage and
--repair, a full disk, and backups. Store internals are tested in test_state_store.py."""
import http.client
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from contextlib import closing

import pytest

from conftest import ROOT

SERVER = os.path.join(ROOT, "server.py")


class Process:
    """A `python3 server.py --port 0` subprocess (through the server_process fixture, which
    kills whatever is left at the end of the test) and a JSON client for it."""

    def __init__(self, server_process, data_dir, *flags, preexec_fn=None):
        self.proc = server_process(
            "--access-log", "off",
            "--limits-enabled", "off", *flags,   # these tests write flat out: no guard
            data_dir=data_dir, preexec_fn=preexec_fn)
        self.port = self.proc.port

    def call(self, method, path, data=None, connection=None):
        own = connection is None
        connection = connection or http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            body = None if data is None else json.dumps(data)
            connection.request(method, path, body, {"Content-Type": "application/json",
                                                  "Accept": "application/json"})
            response = connection.getresponse()
            raw = response.read()
            return response.status, (json.loads(raw) if raw else None)
        finally:
            if own:
                connection.close()

    def kill(self):
        self.proc.kill()

    def stop(self):
        assert self.proc.stop(30) == 0, self.proc.err_text()
        return self.proc.err_text()


def run(*args):
    return subprocess.run([sys.executable, SERVER] + list(args), capture_output=True, text=True,
                          timeout=60)


@pytest.mark.slow
def test_every_acknowledged_write_survives_sigkill(tmp_path, server_process):
    """Writers create notes, then keep rewriting them, recording each acknowledged write;
    SIGKILL at a random moment; restart; every acknowledged write is there with its
    acknowledged value, or with a value sent after it: a write the store made durable but
    could not answer before the kill, in this cycle or an earlier one. Ten cycles."""
    data_dir = tmp_path / "data"
    rng = random.Random(1234)
    acknowledged = {}   # note id -> last acknowledged text
    unanswered = {}     # note id -> texts sent since its last acknowledgement (none answered)
    own_notes = {worker: [] for worker in range(4)}
    for cycle in range(10):
        server = Process(server_process, data_dir)
        stop = threading.Event()

        def write(worker):
            with closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)) as c:
                write_with(worker, c)

        def write_with(worker, connection):
            notes, n = own_notes[worker], 0
            while not stop.is_set():
                text = "c%d-w%d-n%d" % (cycle, worker, n)
                n += 1
                if len(notes) < 40:  # create a few, then rewrite them: the store stays small
                    method, path = "POST", "/api/notes"
                else:
                    note_id = notes[n % len(notes)]
                    method, path = "PUT", "/api/notes/" + note_id
                    unanswered.setdefault(note_id, []).append(text)
                try:
                    status, note = server.call(method, path, {"text": text}, connection)
                except (OSError, ValueError, http.client.HTTPException):
                    return  # killed mid-request: not acknowledged
                assert status in (200, 201), status
                if method == "POST":
                    notes.append(note["id"])
                acknowledged[note["id"]] = text
                unanswered.pop(note["id"], None)

        threads = [threading.Thread(target=write, args=(w,)) for w in own_notes]
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.3, 1.2))
        server.kill()
        stop.set()
        for thread in threads:
            thread.join(10)
    server = Process(server_process, data_dir)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        stored = {}
        for note_id in acknowledged:
            status, note = server.call("GET", "/api/notes/" + note_id, connection=connection)
            stored[note_id] = note["text"] if status == 200 else None
    finally:
        connection.close()
        server.stop()
    assert len(acknowledged) == 160  # every writer created its notes
    lost = {k: (v, stored[k]) for k, v in acknowledged.items()
            if stored[k] != v and stored[k] not in unanswered.get(k, [])}
    assert not lost, "acknowledged writes lost (acked, stored): %r" % list(lost.items())[:5]


def test_a_second_server_on_the_same_data_dir_exits_2(tmp_path, server_process):
    server = Process(server_process, tmp_path / "data")
    try:
        result = run("--port", "0", "--data-dir", str(tmp_path / "data"))
    finally:
        server.stop()
    assert result.returncode == 2
    assert "in use by another process (pid %d" % server.proc.pid in result.stderr
    assert "Traceback" not in result.stderr


def test_damage_before_the_tail_refuses_to_start_and_repair_keeps_the_prefix(tmp_path,
                                                                           server_process):
    data_dir = tmp_path / "data"
    server = Process(server_process, data_dir)
    for n in range(20):
        assert server.call("POST", "/api/notes", {"text": "note %d" % n})[0] == 201
    server.kill()  # no clean-shutdown compaction: the notes are in the journal
    journal = data_dir / "journal"
    raw = bytearray(journal.read_bytes())
    middle = raw.find(b"note 10")
    raw[middle] ^= 0xFF
    journal.write_bytes(bytes(raw))

    refused = run("--port", "0", "--data-dir", str(data_dir))
    assert refused.returncode == 1
    assert "journal" in refused.stderr and "--repair" in refused.stderr
    assert re.search(r"offset \d+", refused.stderr), refused.stderr

    repaired = run("--repair", "--data-dir", str(data_dir))
    assert repaired.returncode == 0, repaired.stderr
    assert any(name.startswith("journal.damaged-") for name in os.listdir(data_dir))
    server = Process(server_process, data_dir)
    try:
        texts = [n["text"] for n in server.call("GET", "/api/notes")[1]["notes"]]
    finally:
        server.stop()
    assert texts == ["note %d" % n for n in range(10)]  # the good prefix, nothing after


def limit_file_size(limit_bytes):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))
    return apply


def test_disk_full_gives_503_keeps_reads_and_recovers(tmp_path, server_process):
    data_dir = tmp_path / "data"
    server = Process(server_process, data_dir, preexec_fn=limit_file_size(64 * 1024))
    acknowledged = []
    statuses = []
    for n in range(200):
        status, note = server.call("POST", "/api/notes", {"text": "%04d" % n + "x" * 1000})
        statuses.append(status)
        if status == 201:
            acknowledged.append(note["id"])
        elif len(statuses) - len(acknowledged) >= 3:
            break
    assert 503 in statuses and acknowledged, statuses
    status, listing = server.call("GET", "/api/notes?limit=1000")
    assert status == 200 and [n["id"] for n in listing["notes"]] == acknowledged
    # space returns: the same process writes again
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    status, note = server.call("POST", "/api/notes", {"text": "after"})
    assert status == 201
    acknowledged.append(note["id"])
    err = server.stop()
    assert "storage" in err or "journal" in err or "EFBIG" in err or "File too large" in err
    server = Process(server_process, data_dir)
    try:
        listing = server.call("GET", "/api/notes?limit=1000")[1]
    finally:
        server.stop()
    assert [n["id"] for n in listing["notes"]] == acknowledged


def test_backup_of_a_running_server_restores(tmp_path, server_process):
    data_dir = tmp_path / "data"
    server = Process(server_process, data_dir)
    try:
        for n in range(5):
            server.call("POST", "/api/notes", {"text": "kept %d" % n})
        backup = tmp_path / "backup.snapshot"
        result = run("--backup", str(backup), "--data-dir", str(data_dir))
        assert result.returncode == 0, result.stderr
        assert "running server (pid %d)" % server.proc.pid in result.stdout
        # the whole state: only its owner may read it, the copy and the server's own
        assert os.stat(str(backup)).st_mode & 0o777 == 0o600
        assert os.stat(str(data_dir / "backups")).st_mode & 0o777 == 0o700
        server.call("POST", "/api/notes", {"text": "after the backup"})
    finally:
        server.stop()
    restored = tmp_path / "restored"
    restored.mkdir()
    os.replace(str(backup), str(restored / "snapshot"))
    server = Process(server_process, restored)
    try:
        texts = [n["text"] for n in server.call("GET", "/api/notes")[1]["notes"]]
    finally:
        server.stop()
    assert texts == ["kept %d" % n for n in range(5)]


def test_backup_of_a_stopped_server(tmp_path, server_process):
    data_dir = tmp_path / "data"
    server = Process(server_process, data_dir)
    server.call("POST", "/api/notes", {"text": "offline"})
    server.stop()
    result = run("--backup", str(tmp_path / "b.snapshot"), "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "b.snapshot").stat().st_size > 0
