"""Three onebox processes as one site (issue 24, docs/cluster.md), end to end: a real
``redis-server`` (tests/redisd.py, ``appendonly yes`` and ``appendfsync always``, so that
[state] durability "always" holds), three ``python3 server.py --cluster-redis-url ...``
processes, each with its own data dir and ports, and nginx in front of them with an
``upstream`` of the three (round-robin; tests/test_proxy.py's fixture).

onebox trusts loopback proxies, so nginx's X-Forwarded-For names the client: each test's
client is its own loopback source address (127.0.0.20 and up), as in test_proxy. A probe of
one process on its own port sends the header itself, as nginx would, so that it is the same
client to whichever process answers.

What is checked, each its own test: a client over its rate limit is admitted at the
configured rate through the three together (not three times it); a ban made through one
process (the guard's scanner count, the admin listener's Lift, ``server.py --unban``) applies
on all three within 1 s; a note written through one is read through the others at once, and
its live event reaches a subscriber on another; ``kill -9`` of one process under writes loses
no acknowledged note; ``kill -9`` of redis-server under writes, then its restart: writes got
503 while it was down, reads the note or 503 (never a 404 or another text), ``/readyz`` 503
then 200, and every acknowledged note is there. And Redis unreachable at start: exit 1, with
a message. Without redis-server or nginx the tests are skipped, saying which.
"""
import http.client
import json
import random
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import (LIMITS_OUT_OF_REACH, SERVER, Client, Load, free_port, wait_until,
                      write_config_file)
from redisd import REDIS_SERVER, RedisServer
from test_notes_events import EventReader
from test_proxy import nginx, nginx_binary, visit  # noqa: F401  (nginx: the fixture)

PROCESSES = 3
PROPAGATION_S = 1.0            # the bound for a ban or a lift to reach every process
JSON = {"Content-Type": "application/json"}


# --- the site: redis-server, three processes, nginx -------------------------------------------

class Site:
    """What the ``site`` fixture started: ``redis`` (a tests/redisd.py RedisServer),
    ``processes`` (ServerProcess each), ``port`` (nginx's), ``config`` (the settings file they
    all read), ``url`` (the redis URL)."""

    def __init__(self, redis, processes, port, config, url):
        self.redis, self.processes, self.port = redis, processes, port
        self.config, self.url = config, url

    def ports(self):
        return [process.port for process in self.processes]


@pytest.fixture
def site(tmp_path, server_process, nginx):
    """start(settings=None) -> Site: redis-server, PROCESSES onebox processes on it with
    ``settings`` ({"section.key": value} on top of LIMITS_OUT_OF_REACH), nginx in front.
    At the end the processes are killed before redis-server is stopped."""
    nginx_binary()   # each skips the test, saying why, before anything starts
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    started = []

    def start(settings=None):
        directory = tmp_path / "redis"
        directory.mkdir()
        redis = RedisServer(directory, appendonly=True, appendfsync="always")
        started.append(redis)
        redis.start()
        url = "redis://127.0.0.1:%d/0" % redis.port
        values = dict(LIMITS_OUT_OF_REACH, **{"cluster.redis_url": url})
        values.update(settings or {})
        config = write_config_file(tmp_path / "cluster.cfg", values)
        processes = [server_process(config=config, data_dir=tmp_path / ("data-%d" % n))
                     for n in range(PROCESSES)]
        started.extend(processes)
        port = nginx([process.port for process in processes])
        return Site(redis, processes, port, config, url)

    yield start
    for each in reversed(started):
        each.close()


def call(port, method, path, body=None, headers=None, source=None, timeout=10):
    """(status, body bytes) on a fresh connection; the exception's name as the status if the
    exchange failed (a thread records it rather than dies of it)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                            source_address=(source, 0) if source else None)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as error:
        return type(error).__name__, b""
    finally:
        connection.close()


def post_note(port, text):
    status, body = call(port, "POST", "/api/notes", json.dumps({"text": text}), JSON)
    return status, (json.loads(body) if status == 201 else body)


def get_note(port, note_id):
    status, body = call(port, "GET", "/api/notes/%s" % note_id)
    return status, (json.loads(body) if status == 200 else body)


def probe(port, client):
    """GET /hello from ``client`` as nginx forwards it (127.0.0.1 naming it in the header)."""
    return call(port, "GET", "/hello", headers={"X-Forwarded-For": client})[0]


def until_all(site, client, status, since, limit_s=5.0):
    """The seconds from ``since`` until each process answered ``client`` with ``status``
    (probed every 20 ms, each process on its own port); None for one that never did."""
    took = [None] * PROCESSES
    deadline = since + limit_s
    while None in took and time.monotonic() < deadline:
        for n, port in enumerate(site.ports()):
            if took[n] is None and probe(port, client) == status:
                took[n] = time.monotonic() - since
        time.sleep(0.02)
    return took


def readiness(site):
    return [call(port, "GET", "/readyz", timeout=5)[0] for port in site.ports()]


# --- start-up ---------------------------------------------------------------------------------

def test_redis_unreachable_at_start_is_a_message_and_exit_1(server_process):
    url = "redis://127.0.0.1:%d/0" % free_port()   # nothing listens there
    process = server_process("--cluster-redis-url", url, wait=False)
    assert process.wait(30) == 1
    errors = process.err_text()
    assert "[cluster] redis_url %s" % url in errors and "redis-server" in errors, errors
    assert "Traceback" not in errors and "listening on" not in process.out_text()


# --- the guard: one rate, one ban list --------------------------------------------------------

RATE_PER_S = 10.0
RATE_SECONDS = 8.0
SENT_PER_S = 4 * RATE_PER_S     # the client asks four times what it may have


def test_a_client_over_its_rate_is_admitted_at_the_configured_rate_not_three_times_it(site):
    """client_rate_per_s is per client across the site: nginx spreads the client's requests
    over three processes, and the three together admit RATE_PER_S (within 10%), where three
    separate buckets would admit three times it."""
    served = site({"limits.client_rate_per_s": RATE_PER_S, "limits.client_burst": 10,
                   "limits.ban_after_rejections": 0})
    client = "127.0.0.20"
    for _ in range(100):                              # spend the burst first
        if visit(served.port, client) == 429:
            break
    else:
        raise AssertionError("100 requests and never a 429: the client rate is not applied")
    statuses = []
    started = time.monotonic()
    while time.monotonic() - started < RATE_SECONDS:
        delay = started + len(statuses) / SENT_PER_S - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        statuses.append(visit(served.port, client))
    elapsed = time.monotonic() - started
    admitted = statuses.count(200)
    rate = admitted / elapsed
    print("\nthrough 3 processes at %.0f/s: %d of %d admitted in %.2f s = %.2f/s (configured "
          "%.1f/s)" % (SENT_PER_S, admitted, len(statuses), elapsed, rate, RATE_PER_S))
    assert set(statuses) <= {200, 429}, statuses
    assert abs(rate - RATE_PER_S) <= 0.1 * RATE_PER_S, (rate, statuses)


SCANNER_PATHS = 5      # more distinct 404 paths than this earn a ban


def scan(site, client, prefix):
    """SCANNER_PATHS + 1 distinct 404 paths through nginx (round-robin: no process sees more
    than two of them); returns when the last was answered."""
    for n in range(SCANNER_PATHS + 1):
        visit(site.port, client, "/%s-%d.php" % (prefix, n))
    return time.monotonic()


def test_a_ban_or_a_lift_through_one_process_applies_on_all_three_within_1_s(site):
    """The guard's own ban (a scanner's 404s, counted across the processes), the status page's
    Lift on one process's admin listener, and ``server.py --unban`` against the same redis."""
    served = site({"limits.scanner_404_paths": SCANNER_PATHS})
    client = "127.0.0.30"
    assert None not in until_all(served, client, 200, time.monotonic())   # served at first
    timings = {}

    # 1. the guard bans a scanner whose 404s nginx spread over the three
    took = until_all(served, client, 403, scan(served, client, "wp-admin"))
    timings["scanner's ban"] = took
    assert None not in took and max(took) <= PROPAGATION_S, took

    # 2. the status page's Lift, through the second process's admin listener
    admin = served.processes[1]
    since = time.monotonic()
    status, body = call(admin.admin_port, "POST", "/bans/lift",
                        json.dumps({"client": client}), JSON)
    assert (status, json.loads(body)) == (200, {"lifted": client}), body
    took = until_all(served, client, 200, since)
    timings["lift"] = took
    assert None not in took and max(took) <= PROPAGATION_S, took

    # 3. banned again, then lifted by server.py --unban with the same settings, from the box
    took = until_all(served, client, 403, scan(served, client, "phpmyadmin"))
    timings["second ban"] = took
    assert None not in took and max(took) <= PROPAGATION_S, took
    unban = subprocess.run([sys.executable, SERVER, "--config", str(served.config),
                            "--data-dir", str(served.processes[2].data_dir), "--unban", client],
                           capture_output=True, text=True, timeout=60)
    assert unban.returncode == 0, (unban.stdout, unban.stderr)
    assert "lifted the ban of %s" % client in unban.stdout, unban.stdout
    took = until_all(served, client, 200, time.monotonic())
    timings["--unban"] = took
    assert None not in took and max(took) <= PROPAGATION_S, took
    print("\nseconds until each process applied it: %s" % {
        what: [round(each, 3) for each in took] for what, took in timings.items()})


# --- several processes on one port -------------------------------------------------------------

def test_processes_with_reuse_port_share_one_port_and_without_it_the_second_is_refused(
        server_process, tmp_path):
    """[server] reuse_port (SO_REUSEPORT): two processes bind one port and the kernel spreads
    new connections over both; without it a second process on a taken port stops with a
    message (the default is unchanged)."""
    port = free_port()
    flags = ("--reuse-port", "on", "--admin-port", "off", "--log-flush-interval-s", "0.05")
    first = server_process(*flags, port=port, data_dir=tmp_path / "one")
    second = server_process(*flags, port=port, data_dir=tmp_path / "two")
    assert [call(port, "GET", "/hello")[0] for _ in range(60)] == [200] * 60
    def served():   # access lines, written in batches: all 60 once both have flushed
        return [process.out_text().count("GET /hello") for process in (first, second)]
    assert wait_until(lambda: sum(served()) == 60, 5), served()
    assert min(served()) > 0, served()   # each took some: 2^-59 otherwise
    refused = server_process("--admin-port", "off", port=port, data_dir=tmp_path / "three",
                             wait=False)
    assert refused.process.wait(timeout=30) == 1
    assert "cannot listen on 127.0.0.1 port %d" % port in refused.err_text()


# --- what each process shows ------------------------------------------------------------------

def metric(port, name):
    """The value of ``name`` (a sample without labels) in the process's /metrics, or None."""
    status, body = call(port, "GET", "/metrics")
    assert status == 200, status
    for line in body.decode("utf-8").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_metrics_and_the_status_page_show_the_processes_and_the_shared_bans(site):
    """/metrics (onebox_cluster_*; promtool accepts the scrape) and status.json of each
    process name the three processes and this one among them, and a ban made through one is
    in every process's list; with redis-server stopped, onebox_cluster_up is 0."""
    served = site({"limits.scanner_404_paths": SCANNER_PATHS})
    admins = [process.admin_port for process in served.processes]
    assert wait_until(lambda: [metric(port, "onebox_cluster_nodes") for port in admins]
                      == [PROCESSES] * PROCESSES, 5)
    assert [metric(port, "onebox_cluster_up") for port in admins] == [1.0] * PROCESSES
    promtool = shutil.which("promtool")
    if promtool is not None:   # CI installs it (Debian's prometheus); test_metrics says so
        checked = subprocess.run([promtool, "check", "metrics"],
                                 input=call(admins[0], "GET", "/metrics")[1].decode("utf-8"),
                                 capture_output=True, text=True, timeout=30)
        problems = [line for line in (checked.stdout + checked.stderr).splitlines()
                    if "onebox_cluster" in line]
        assert problems == [], problems
    client = "127.0.0.31"
    took = until_all(served, client, 403, scan(served, client, "cgi-bin"))
    assert None not in took, took
    for n, port in enumerate(admins):
        status, body = call(port, "GET", "/status.json")
        document = json.loads(body)
        nodes = document["cluster"]["nodes"]
        assert document["cluster"]["up"] is True
        assert len(nodes) == PROCESSES and sum(node["self"] for node in nodes) == 1
        assert [node["pid"] for node in nodes if node["self"]] == [served.processes[n].pid]
        assert client in [ban["client"] for ban in document["bans"]], document["bans"]
    served.redis.kill()
    assert wait_until(lambda: [metric(port, "onebox_cluster_up") for port in admins]
                      == [0.0] * PROCESSES, 5)
    assert json.loads(call(admins[0], "GET", "/status.json")[1])["cluster"]["up"] is False


# --- the state and live events ----------------------------------------------------------------

def test_a_note_written_through_one_is_read_through_the_others_at_once(site):
    served = site()
    ports = served.ports()
    notes = {}
    for n, writer in enumerate(ports):
        status, note = post_note(writer, "written through process %d" % n)
        assert status == 201, note
        for reader in ports:
            assert get_note(reader, note["id"]) == (200, note)
        notes[note["id"]] = note
    first = min(notes)
    status, body = call(ports[2], "PUT", "/api/notes/%s" % first,
                        json.dumps({"text": "changed through process 2"}), JSON)
    assert status == 200, body
    for reader in ports:
        assert get_note(reader, first)[1]["text"] == "changed through process 2"
    assert call(ports[1], "DELETE", "/api/notes/%s" % first)[0] == 204
    for reader in ports:
        assert get_note(reader, first)[0] == 404
    for reader in ports + [served.port]:
        status, body = call(reader, "GET", "/api/notes")
        assert status == 200
        assert sorted(note["id"] for note in json.loads(body)["notes"]) == sorted(notes)[1:]


def test_a_notes_event_published_on_one_process_reaches_a_subscriber_on_another(site):
    served = site()
    first, second, third = served.processes
    readers = [EventReader(first, "/api/notes/events"), EventReader(third, "/api/notes/events")]
    try:
        status, note = post_note(second.port, "announced everywhere")
        assert status == 201, note
        for reader in readers:
            got = reader.next_event()
            assert (got["event"], json.loads(got["data"])) == ("created", note), got
    finally:
        for reader in readers:
            reader.close()


# --- failures: a process dies, redis dies -----------------------------------------------------

def test_kill_9_of_one_process_under_writes_loses_no_acknowledged_note(site):
    """Four clients POST notes (and GET a listing) through nginx; one process is killed. nginx
    routes around it; a POST it had already sent there gets a 502, which is not an
    acknowledgement. Every note acknowledged (201) is there afterwards, through each survivor."""
    served = site()
    victim = served.processes[1]
    load = Load(served.port, [Client("writer-%d" % n, path="/api/notes?limit=1", notes=True)
                              for n in range(4)], max_requests=None, max_s=60)
    with load:
        assert wait_until(lambda: len(load.notes) >= 30, 20), load.figures()
        assert victim.kill() == -9
        with load.lock:
            at_kill = len(load.notes)
        assert wait_until(lambda: len(load.notes) >= at_kill + 60, 20), load.figures()
    print("\none process killed under writes: %s" % load.figures())
    # only a POST under way on the killed process may fail, and only as nginx's 502
    assert all(": 502 " in failure for failure in load.failures), load.failures
    assert len(load.failures) <= 8, load.failures
    survivors = [served.processes[0].port, served.processes[2].port]
    for note_id, text in sorted(load.notes.items()):
        for port in survivors:
            status, note = get_note(port, note_id)
            assert (status, note["text"] if status == 200 else note) == (200, text), note_id


class Traffic:
    """Writers POST notes through nginx, readers GET notes already acknowledged; every answer
    is kept as (kind, started, ended, status). ``acknowledged``: id -> text of each 201.
    ``wrong``: a read that answered 200 with another text, or anything but 200 and 503."""

    def __init__(self, port, writers=3, readers=2, pause_s=0.01):
        self.port, self.pause_s = port, pause_s
        self.lock = threading.Lock()   # guards the three below
        self.answers, self.acknowledged, self.wrong = [], {}, []
        self.stopping = threading.Event()
        self.threads = ([threading.Thread(target=self._write, args=(n,))
                         for n in range(writers)]
                        + [threading.Thread(target=self._read) for n in range(readers)])

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)

    def count(self):
        with self.lock:
            return len(self.acknowledged)

    def between(self, kind, start, end):
        """The statuses of ``kind``'s requests made wholly within [start, end]."""
        with self.lock:
            return [status for what, began, ended, status in self.answers
                    if what == kind and began >= start and ended <= end]

    def _write(self, number):
        sent = 0
        while not self.stopping.is_set():
            sent += 1
            text = "writer %d, note %d" % (number, sent)
            began = time.monotonic()
            status, note = post_note(self.port, text)
            with self.lock:
                self.answers.append(("write", began, time.monotonic(), status))
                if status == 201:
                    self.acknowledged[note["id"]] = text
            time.sleep(self.pause_s)

    def _read(self):
        while not self.stopping.is_set():
            with self.lock:
                known = list(self.acknowledged.items())
            if not known:
                time.sleep(self.pause_s)
                continue
            note_id, text = random.choice(known)
            began = time.monotonic()
            status, note = get_note(self.port, note_id)
            with self.lock:
                self.answers.append(("read", began, time.monotonic(), status))
                if status not in (200, 503) or (status == 200 and note["text"] != text):
                    self.wrong.append((note_id, status, note))
            time.sleep(self.pause_s)


GUARDED = "127.0.0.40"


def test_kill_9_of_redis_under_writes_then_its_restart_loses_no_acknowledged_note(site):
    """While redis-server is down, writes get 503 (nothing acknowledged that Redis did not
    take), reads the note or 503, /readyz 503 on each process, and the guard counts each client
    per process (and says so); after its restart (the same port and directory: its
    append-only file) they all recover by themselves, and every note ever acknowledged is
    there."""
    served = site({"cluster.timeout_s": 1.0})
    with Traffic(served.port) as traffic:
        assert wait_until(lambda: traffic.count() >= 30, 20), traffic.count()
        served.redis.kill()
        down_at = time.monotonic()
        assert wait_until(lambda: readiness(served) == [503] * PROCESSES, 5), readiness(served)
        # a client the guard checks (not loopback's 127.0.0.1) is counted per process, and
        # served: /hello needs no state
        assert [visit(served.port, GUARDED) for _ in range(2 * PROCESSES)] == \
            [200] * 2 * PROCESSES
        time.sleep(max(0.0, down_at + 2.0 - time.monotonic()))
        up_at = time.monotonic()
        served.redis.restart()
        assert wait_until(lambda: readiness(served) == [200] * PROCESSES, 10), readiness(served)
        recovered_at = time.monotonic()
        before = traffic.count()
        assert wait_until(lambda: traffic.count() >= before + 30, 10), traffic.count()
        assert [visit(served.port, GUARDED) for _ in range(2 * PROCESSES)] == \
            [200] * 2 * PROCESSES
    writes_down = traffic.between("write", down_at, up_at)
    reads_down = traffic.between("read", down_at, up_at)
    print("\nredis down %.2f s, every process ready again %.2f s after its restart; while "
          "down: writes %s, reads %s; %d notes acknowledged in all"
          % (up_at - down_at, recovered_at - up_at, summary(writes_down), summary(reads_down),
             len(traffic.acknowledged)))
    assert writes_down and set(writes_down) == {503}, summary(writes_down)
    assert reads_down and set(reads_down) <= {200, 503}, summary(reads_down)
    assert traffic.wrong == [], traffic.wrong[:10]
    assert {status for kind, _, _, status in traffic.answers if kind == "write"} <= {201, 503}
    for note_id, text in sorted(traffic.acknowledged.items()):
        status, note = get_note(served.port, note_id)
        assert (status, note["text"] if status == 200 else note) == (200, text), note_id
    for process in served.processes:   # the guard said when it counted alone, and when not
        errors = process.err_text()
        assert "count per process until it returns" in errors, errors[-3000:]
        assert "count across the cluster again" in errors, errors[-3000:]


def summary(statuses):
    counts = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return counts

