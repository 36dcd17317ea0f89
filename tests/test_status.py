"""The status page's JSON, the activity recorder's budget, and ban control (admin POST and
``server.py --bans`` / ``--unban``), against real servers on the admin listener."""
import bisect
import gc
import http.client
import json
import os
import subprocess
import sys
import threading
import tracemalloc
import urllib.parse

from conftest import ROOT, request, wait_until
from onebox.activity import BUDGET_BYTES, LATENCY_BOUNDS_S, TOP_MINUTES, Activity, percentile
from onebox.tally import BOOK_KEYS, METRICS_BOUNDS_S, Tally
from onebox.metrics import Metrics
from onebox.guard import BAN_PREFIX

SERVER = os.path.join(ROOT, "server.py")
FLOOD_LIMITS = {"limits.client_rate_per_s": 1, "limits.client_burst": 3,
                "limits.ban_after_rejections": 4, "limits.ban_window_s": 30,
                "state.durability": "off"}


def admin(server, method, path, body=None, headers=None):
    """One request to the server's admin listener: (status, parsed JSON or raw bytes)."""
    parts = urllib.parse.urlsplit(server.admin_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    if response.getheader("content-type", "").startswith("application/json"):
        return response.status, json.loads(data)
    return response.status, data


def from_client(port, path, source, method="GET"):
    """One request from ``source`` (127.0.0.2 and up: not the trusted loopback); its status,
    or None if the server closed the connection without an answer (a ban at accept)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                            source_address=(source, 0))
    try:
        connection.request(method, path)
        response = connection.getresponse()
        response.read()
        return response.status
    except (ConnectionError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def flood_until_banned(port, source, limit=60):
    statuses = []
    for _ in range(limit):
        status = from_client(port, "/hello", source)
        statuses.append(status)
        if status == 403 or status is None:
            return statuses
    raise AssertionError("never banned: %s" % statuses)


# --- the JSON -------------------------------------------------------------------------------

def test_status_json_counts_what_was_sent(start_server):
    server = start_server(config={"state.durability": "off"})
    for _ in range(20):
        assert from_client(server.port, "/hello", "127.0.0.2") == 200
    for number in range(5):
        assert from_client(server.port, "/missing-%d" % number, "127.0.0.3") == 404
    for _ in range(3):   # the admin listener's own requests are not the site's traffic
        assert admin(server, "GET", "/status.json")[0] == 200
    # a worker counts a request just after sending its answer: under two busy loops a read
    # right after the last answer missed it (1 of 10 full runs), so read until all 25 are in
    answers = []
    assert wait_until(lambda: answers.append(admin(server, "GET", "/status.json")) or
                      answers[-1][1]["activity"]["totals"]["requests"] >= 25, 5), answers[-1]
    status, doc = answers[-1]
    assert status == 200
    activity = doc["activity"]
    assert activity["totals"] == {"requests": 25, "1xx": 0, "2xx": 20, "3xx": 0, "4xx": 5,
                                  "5xx": 0}
    hour = activity["hour"]
    assert hour["step_s"] == 10 and sum(hour["requests"]) == 25
    assert len(hour["requests"]) == len(hour["p50_ms"]) == len(hour["p99_ms"]) >= 360
    assert sum(hour["status"]["2xx"]) == 20 and sum(hour["status"]["4xx"]) == 5
    assert len(activity["recent"]["requests"]) == 120
    assert sum(activity["recent"]["requests"]) == 25
    minute = activity["last_minute"]
    assert minute["requests"] == 25 and minute["status"]["2xx"] == 20
    assert 0 < minute["p50_ms"] <= minute["p99_ms"] < 10000
    assert any(value is not None for value in hour["p99_ms"])
    clients = {row["client"]: row for row in activity["top_clients"]}
    assert clients["127.0.0.2"]["requests"] == 20 and clients["127.0.0.3"]["requests"] == 5
    assert clients["127.0.0.2"]["bytes"] > 0
    paths = {row["path"]: row["requests"] for row in activity["top_paths"]}
    assert paths["/hello"] == 20 and paths["/missing-0"] == 1
    assert "/status.json" not in paths
    assert doc["bans"] == [] and doc["decisions"] == []
    gauges = {row["key"]: row for row in doc["gauges"]}
    assert gauges["open"]["of"] == server.settings.max_connections
    assert gauges["busy_workers"]["of"] == server.settings.worker_threads
    assert "queued" in gauges and "parked_idle" in gauges
    tables = {row["name"]: row for row in doc["tables"]}
    assert tables["guard: client buckets"]["size"] >= 0
    assert tables["guard: client buckets"]["cap"] == server.config.limits.max_tracked_clients
    assert tables["response cache: bytes"]["cap"] == server.config.cache.max_bytes
    assert tables["static: file cache"]["cap"] == server.config.static.file_cache_bytes
    assert tables["status recorder"]["size"] < tables["status recorder"]["cap"] == BUDGET_BYTES
    assert doc["memory"]["rss_bytes"] > 1 << 20


def test_public_port_does_not_serve_the_status_page(start_server):
    server = start_server()
    for path in ("/status.json", "/bans"):
        assert request(server, "GET", path)[0] == 404
    assert request(server, "POST", "/bans/lift", b"{}",
                   {"Content-Type": "application/json"})[0] in (404, 405)


def test_page_is_self_contained(start_server):
    server = start_server()
    status, page = admin(server, "GET", "/")
    assert status == 200
    text = page.decode("utf-8")
    assert "<svg" in text and "status.json" in text and "bans/lift" in text
    for external in ("http://", "https://", "//cdn", "<link rel=\"stylesheet\"", "src="):
        assert external not in text.replace("http://www.w3.org/2000/svg", ""), external
    assert ".innerHTML" not in text and "insertAdjacentHTML" not in text


def test_recorder_off_records_nothing(start_server):
    server = start_server(config=dict(FLOOD_LIMITS, **{"status.recorder": "off"}))
    assert from_client(server.port, "/hello", "127.0.0.2") == 200
    flood_until_banned(server.port, "127.0.0.4")
    status, doc = admin(server, "GET", "/status.json")
    assert status == 200 and doc["activity"]["enabled"] is False
    assert doc["activity"]["totals"]["requests"] == 0 and doc["decisions"] == []
    assert [ban["client"] for ban in doc["bans"]] == ["127.0.0.4"]   # bans still shown


# --- guard decisions, bans and the Lift action ------------------------------------------------

def test_flood_shows_decisions_and_ban_and_lift_lets_the_client_in(start_server):
    server = start_server(config=FLOOD_LIMITS)
    statuses = flood_until_banned(server.port, "127.0.0.5")
    assert 429 in statuses
    status, doc = admin(server, "GET", "/status.json")
    bans = {ban["client"]: ban for ban in doc["bans"]}
    assert set(bans) == {"127.0.0.5"}
    assert bans["127.0.0.5"]["reason"].startswith("client_rate")
    assert 0 < bans["127.0.0.5"]["remaining_s"] <= server.config.limits.ban_s
    rules = [(row["client"], row["status"], row["rule"], row["ban"]) for row in doc["decisions"]]
    assert ("127.0.0.5", 429, "client_rate", "ban") in rules
    assert ("127.0.0.5", 429, "client_rate", "") in rules
    refused = sum(row["count"] for row in doc["decisions"] if row["status"] == 429)
    assert refused == statuses.count(429)
    assert server.store.get(BAN_PREFIX + "127.0.0.5") is not None
    # a banned client is answered 403, then (ban_close_after_hits on) closed at accept
    hits = server.config.limits.ban_close_after_hits
    assert [from_client(server.port, "/hello", "127.0.0.5") for _ in range(hits + 2)
            ][-1] is None
    decisions = admin(server, "GET", "/status.json")[1]["decisions"]
    assert (decisions[0]["client"], decisions[0]["rule"]) == ("127.0.0.5", "closed_at_accept")
    assert any(row["status"] == 403 and row["rule"] == "banned" for row in decisions)

    # a cross-site POST (a browser on another origin) is refused; the ban stays
    body = json.dumps({"client": "127.0.0.5"}).encode()
    origin = server.admin_url.rstrip("/")
    status, _ = admin(server, "POST", "/bans/lift", body,
                      {"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert status == 403
    assert admin(server, "GET", "/bans")[1]["bans"][0]["client"] == "127.0.0.5"

    # what a form on another site can send without asking (no CORS preflight): a form, or
    # text/plain; each is 415 even from the admin origin, and the ban stays
    for kind, data in (("application/x-www-form-urlencoded", b"client=127.0.0.5"),
                       ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: "
                        b"form-data; name=client\r\n\r\n127.0.0.5\r\n--x--\r\n"),
                       ("text/plain", body), (None, body)):
        status, reply = admin(server, "POST", "/bans/lift", data,
                              {"Content-Type": kind, "Origin": origin} if kind else {})
        assert (status, reply) == (415, b"'Content-Type' must be application/json: send "
                                   b"{\"client\": ...}\n"), kind
    assert admin(server, "GET", "/bans")[1]["bans"][0]["client"] == "127.0.0.5"
    # and a JSON POST from another origin is a preflight first, which is not granted
    preflight = http.client.HTTPConnection(urllib.parse.urlsplit(origin).hostname,
                                           urllib.parse.urlsplit(origin).port, timeout=10)
    preflight.request("OPTIONS", "/bans/lift", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    answer = preflight.getresponse()
    answer.read()
    preflight.close()
    assert answer.getheader("access-control-allow-origin") is None
    assert answer.getheader("access-control-allow-headers") is None

    status, reply = admin(server, "POST", "/bans/lift", body,
                          {"Content-Type": "application/json; charset=utf-8", "Origin": origin})
    assert (status, reply) == (200, {"lifted": "127.0.0.5"})
    assert admin(server, "GET", "/bans")[1]["bans"] == []
    assert server.store.get(BAN_PREFIX + "127.0.0.5") is None      # persisted: gone
    assert from_client(server.port, "/hello", "127.0.0.5") == 200  # served again
    decisions = admin(server, "GET", "/status.json")[1]["decisions"]
    assert decisions[0]["rule"] == "lifted" and decisions[0]["client"] == "127.0.0.5"

    status, _ = admin(server, "POST", "/bans/lift", body,
                      {"Content-Type": "application/json", "Origin": origin})
    assert status == 404                                            # not banned now
    for bad in (b"{}", b'{"client": 7}', b"[1]", b"not json"):
        assert admin(server, "POST", "/bans/lift", bad,
                     {"Content-Type": "application/json"})[0] == 400
    assert "lifted by the admin listener" in server.error_text()


# --- the recorder itself --------------------------------------------------------------------

class FakeClock(object):
    def __init__(self, start):
        self.now = start

    def __call__(self):
        return self.now


def recorder(start_wall, start_mono, **options):
    """(tally, activity, wall clock, monotonic clock) with clocks the test moves."""
    wall, mono = FakeClock(start_wall), FakeClock(start_mono)
    tally = Tally()
    return tally, Activity(tally, wall=wall, clock=mono, **options), wall, mono


def answered(tally, mono, client, path, status, took=0.001, sent=10):
    """Count a request that finished now (on ``mono``), as a worker does."""
    tally.add(mono.now - took, mono.now, status, "GET", "/route", client, path, sent)


def test_percentiles_come_from_the_log_scale_buckets():
    tally, activity, wall, mono = recorder(1_000_000.0, 50.0)
    for took in [0.001] * 98 + [0.2, 0.2]:   # 98 fast, 2 slow
        answered(tally, mono, "192.0.2.1", "/", 200, took)
    wall.now += 1
    mono.now += 1
    minute = activity.snapshot()["last_minute"]
    assert minute["requests"] == 100 and minute["status"]["2xx"] == 100
    assert 1.0 <= minute["p50_ms"] <= 1.0 * 2 ** 0.5 + 0.001   # at most one bucket high
    assert 200 <= minute["p99_ms"] <= 200 * 2 ** 0.5 + 0.01
    assert percentile([0] * (len(LATENCY_BOUNDS_S) + 1), 0.5) is None


def test_each_request_lands_in_its_own_duration_bucket_whatever_came_before():
    """A thread's book remembers its last request's bucket (a shortcut past the bisection);
    durations on both sides of a bound, repeated and alternating, still each land in the
    bucket bisect gives them."""
    tally = Tally()
    metrics = Metrics(tally)
    durations = [0.0011, 0.0011, 0.001, 0.0010001, 0.001, 0.0005, 0.2, 0.0009, 0.0011, 30.0,
                 30.0, 0.0, 0.0001]
    for took in durations:
        tally.add(100.0 - took, 100.0, 200, "GET", "/x", "192.0.2.1", "/x", 1)
    histogram = metrics.totals()[1]["/x"]
    expected = [0] * (len(METRICS_BOUNDS_S) + 1)
    for took in durations:
        expected[bisect.bisect_left(METRICS_BOUNDS_S, 100.0 - (100.0 - took))] += 1
    assert histogram[:-1] == expected
    assert len([count for count in expected if count]) >= 5   # spread over the buckets


def test_every_threads_requests_are_counted_once_at_each_read():
    """Requests from 8 threads, enough distinct keys that each thread's book is folded several
    times and ends part full: every request is in the snapshot and in the metrics' totals,
    once, and a second read finds the same."""
    tally, activity, wall, mono = recorder(1_500_000.0, 70.0)
    metrics = Metrics(tally)
    per_thread = [BOOK_KEYS * 5 + number for number in range(8)]

    def add(count, number):
        for index in range(count):
            answered(tally, mono, "198.51.100.%d" % number, "/t/%d" % (index % 40), 404,
                     sent=7)
    threads = [threading.Thread(target=add, args=(count, number))
               for number, count in enumerate(per_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 0 < tally.read(len) <= 8 * BOOK_KEYS   # entries still in the books
    for _ in range(2):
        snapshot = activity.snapshot()
        assert snapshot["totals"]["requests"] == snapshot["totals"]["4xx"] == sum(per_thread)
        assert snapshot["recent"]["requests"][-1] == sum(per_thread)
        assert sorted(row["requests"] for row in snapshot["top_clients"]) == sorted(per_thread)
        assert all(row["bytes"] == 7 * row["requests"] for row in snapshot["top_clients"])
        requests, durations = metrics.totals()[:2]
        assert requests == {("GET", 4, "/route"): [sum(per_thread), 7 * sum(per_thread)]}
        assert sum(durations["/route"][:-1]) == sum(per_thread)
        assert abs(durations["/route"][-1] - 0.001 * sum(per_thread)) < 1e-6


def test_metrics_never_take_a_clients_method_as_a_label():
    tally = Tally()
    metrics = Metrics(tally)
    for number in range(100):
        tally.add(0.0, 0.001, 501, "M%d" % number, "refused", "192.0.2.1", "/", 0)
    tally.add(0.0, 0.001, 200, "GET", "/x", "192.0.2.1", "/x", 5)
    assert metrics.totals()[0] == {("other", 5, "refused"): [100, 0], ("GET", 2, "/x"): [1, 5]}


def test_recorder_stays_within_its_budget_under_many_distinct_clients_and_paths():
    """An hour and more of traffic in which every request is a new client and a new (long)
    path, and every refusal a new client, then full books of such requests in each of 17
    threads (16 workers and the reactor): what the recorder holds, measured by tracemalloc
    (every allocation it made and still holds), stays under BUDGET_BYTES."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tally, activity, wall, mono = recorder(2_000_000.0, 10.0)
        number = 0

        def new_client_and_path():
            return ("10.%d.%d.%d" % (number >> 16 & 255, number >> 8 & 255, number & 255),
                    "/scan/%d/%s" % (number, "x" * 150))
        for second in range(3700):            # the rings wrap: every row is written
            wall.now, mono.now = 2_000_000.0 + second, 10.0 + second
            for _ in range(20):
                number += 1
                answered(tally, mono, *new_client_and_path(), 404, sent=100)
            activity.decision("2001:db8:%x::/64" % number, "/p/%d" % number, 429, "client_rate")
        activity.snapshot()

        def fill_a_book():
            global_number = number
            for offset in range(BOOK_KEYS):
                client = "10.200.%d.%d" % (global_number >> 8 & 255, offset)
                answered(tally, mono, client, "/wait/%d/%s" % (offset, "y" * 150), 404)
        threads = [threading.Thread(target=fill_a_book) for _ in range(17)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    waiting = tally.read(len)
    print("recorder holds %d bytes after %d requests from distinct clients, %d keys in books "
          "(budget %d); memory_bytes() says %d"
          % (held, number, waiting, BUDGET_BYTES, activity.memory_bytes()))
    assert waiting >= 17 * BOOK_KEYS   # and the test thread's own book
    assert held < BUDGET_BYTES
    assert activity.memory_bytes() < BUDGET_BYTES
    assert len(activity._tables.minutes) <= TOP_MINUTES
    for clients, paths in activity._tables.minutes.values():
        assert len(clients.table) <= activity.top_entries >= len(paths.table)
    assert all(len(row["path"]) <= 80 for row in activity.snapshot()["top_paths"])


def test_space_saving_keeps_the_heavy_hitter_among_many():
    tally, activity, wall, mono = recorder(3_000_000.0, 0.0, top_entries=10)
    for number in range(5000):
        answered(tally, mono, "198.51.100.%d" % (number % 250), "/x", 200, sent=1)
        if number % 5 == 0:
            answered(tally, mono, "203.0.113.66", "/x", 200, sent=1)
        if number % 300 == 0:
            wall.now += 1
            mono.now += 1
    tops = activity.snapshot()["top_clients"]
    assert tops[0]["client"] == "203.0.113.66" and tops[0]["requests"] >= 1000


def test_a_recorder_turned_off_records_nothing():
    tally = Tally()
    activity = Activity(tally, enabled=False)
    assert not tally.wanted
    activity.decision("192.0.2.1", "/", 429, "client_rate")
    snapshot = activity.snapshot()
    assert snapshot["totals"]["requests"] == 0 and activity.decisions() == []


# --- --bans / --unban --------------------------------------------------------------------------

def run_cli(data_dir, *args, env=None):
    result = subprocess.run([sys.executable, SERVER, "--data-dir", str(data_dir),
                             "--state-durability", "off"] + list(args),
                            capture_output=True, text=True, timeout=60, env=env)
    return result.returncode, result.stdout + result.stderr


def start_process(server_process, data_dir, env=None):
    process = server_process(
        "--state-durability", "off", "--limits-client-rate-per-s", "1",
        "--limits-client-burst", "3", "--limits-ban-after-rejections", "4",
        "--limits-ban-window-s", "30", data_dir=data_dir, env=env)
    assert process.admin_url.startswith("http://127.0.0.1:"), process.admin_url
    return process, process.port


def stop_process(process):
    assert process.stop(20) == 0, process.err_text()


def test_bans_and_unban_on_a_running_and_a_stopped_server(tmp_path, server_process):
    data_dir = tmp_path / "data"
    process, port = start_process(server_process, data_dir)
    try:
        flood_until_banned(port, "127.0.0.2")
        code, out = run_cli(data_dir, "--bans")
        assert code == 0 and "127.0.0.2" in out and "client_rate" in out, out
        code, out = run_cli(data_dir, "--unban", "127.0.0.9")
        assert code == 1 and "not banned" in out, out
        code, out = run_cli(data_dir, "--unban", "127.0.0.2")
        assert code == 0 and "through the running server" in out, out
        assert from_client(port, "/hello", "127.0.0.2") == 200          # served again
        code, out = run_cli(data_dir, "--bans")
        assert code == 0 and "no bans in force" in out, out
        flood_until_banned(port, "127.0.0.2")                        # banned again
        flood_until_banned(port, "127.0.0.3")
    finally:
        stop_process(process)
    # stopped: the CLI opens the store itself (the lock is free)
    code, out = run_cli(data_dir, "--bans")
    assert code == 0 and "127.0.0.2" in out and "127.0.0.3" in out, out
    code, out = run_cli(data_dir, "--unban", "127.0.0.2")
    assert code == 0 and "server is stopped" in out, out
    code, out = run_cli(data_dir, "--bans")
    assert "127.0.0.2" not in out and "127.0.0.3" in out, out
    process, port = start_process(server_process, data_dir)
    try:
        assert from_client(port, "/hello", "127.0.0.2") == 200          # the lift persisted
        assert from_client(port, "/hello", "127.0.0.3") in (403, None)  # the other did not
    finally:
        stop_process(process)


def test_bans_cli_sends_the_admin_token(tmp_path, server_process):
    """With an admin token configured, the running server's admin listener wants it; the CLI
    reads it where the server does (ONEBOX_ADMIN_TOKEN) and sends it."""
    data_dir = tmp_path / "data"
    env = dict(os.environ, ONEBOX_ADMIN_TOKEN="a-token-of-twenty-chars")
    process, port = start_process(server_process, data_dir, env)
    try:
        flood_until_banned(port, "127.0.0.2")
        without = dict(os.environ)
        without.pop("ONEBOX_ADMIN_TOKEN", None)
        code, out = run_cli(data_dir, "--bans", env=without)
        assert code == 1 and "401" in out, out
        code, out = run_cli(data_dir, "--bans", env=env)
        assert code == 0 and "127.0.0.2" in out, out
        code, out = run_cli(data_dir, "--unban", "127.0.0.2", env=env)
        assert code == 0 and "through the running server" in out, out
    finally:
        stop_process(process)
