"""/metrics on the admin listener (onebox/metrics.py): counters move by the right amounts, labels
stay bounded, and the scrape passes `promtool check metrics` once every family has data."""
import http.client
import json
import re
import shutil
import socket
import subprocess
import time

import pytest

from conftest import raw_exchange, read_until_close, request, status_of
from handlers._cache import cached
from test_admin import admin_request

_SAMPLE_RE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape_text(server):
    status, headers, body = admin_request(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    return body.decode("utf-8")


def scrape(server, quiet_s=0.03, limit_s=2.0):
    """{(name, sorted label pairs): value}, once the request counters stop moving: a worker
    counts a request just after sending its response (as it logs it: conftest.settled_text),
    so on a loaded machine the client can be ahead of the counters by a request or two."""
    deadline = time.monotonic() + limit_s
    samples = _scrape_once(server)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        latest = _scrape_once(server)
        if _requests_of(latest) == _requests_of(samples):
            return latest
        samples = latest
    return samples


def _requests_of(samples):
    return {key: value for key, value in samples.items() if key[0].startswith("onebox_http_")}


def _scrape_once(server):
    samples = {}
    for line in scrape_text(server).splitlines():
        if not line or line.startswith("#"):
            continue
        name, labels, value = _SAMPLE_RE.match(line).groups()
        pairs = tuple(sorted(_LABEL_RE.findall(labels or "")))
        samples[(name, pairs)] = float(value)
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before, after, name, **labels):
    return value(after, name, **labels) - value(before, name, **labels)


def from_client(server, method, path, source, body=b"", headers=""):
    raw = raw_exchange(server, ("%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s"
                                "Content-Length: %d\r\n\r\n" % (method, path, headers, len(body))
                                ).encode() + body, source=source)
    return status_of(raw)


def test_requests_are_counted_by_method_class_and_route_pattern(server):
    before = scrape(server)
    for _ in range(3):
        assert request(server, "GET", "/hello")[0] == 200
    for _ in range(2):
        assert request(server, "GET", "/")[0] == 200
        assert request(server, "GET", "/no/such/page")[0] == 404
    status, _, body = request(server, "POST", "/api/notes", json.dumps({"text": "hi"}),
                              {"Content-Type": "application/json"})
    assert status == 201
    note = json.loads(body)["id"]
    assert request(server, "GET", "/api/notes/" + note)[0] == 200
    assert request(server, "GET", "/api/notes/987654")[0] == 404
    assert request(server, "BREW", "/hello")[0] == 501
    after = scrape(server)

    def requests(method, code, route):
        return delta(before, after, "onebox_http_requests_total", method=method, code=code,
                     route=route)

    assert requests("GET", "2xx", "/hello") == 3
    assert requests("GET", "2xx", "static") == 2
    assert requests("GET", "4xx", "unrouted") == 2
    assert requests("POST", "2xx", "/api/notes") == 1
    assert requests("GET", "2xx", "/api/notes/{id}") == 1
    assert requests("GET", "4xx", "/api/notes/{id}") == 1   # a handler's 404 keeps its route
    assert requests("other", "5xx", "refused") == 1          # unknown methods fold into "other"
    routes = {dict(pairs)["route"] for name, pairs in after if "route" in dict(pairs)}
    assert routes <= {"/hello", "/api/notes", "/api/notes/{id}", "static", "unrouted",
                      "refused"}, routes   # patterns and the three labels: never a raw path
    assert delta(before, after, "onebox_http_response_body_bytes_total", method="GET",
                 code="2xx", route="/hello") == 3 * len(b"hello, world\n")
    assert delta(before, after, "onebox_http_request_duration_seconds_count",
                 route="/hello") == 3
    assert value(after, "onebox_http_request_duration_seconds_bucket", route="/hello",
                 le="+Inf") == value(after, "onebox_http_request_duration_seconds_count",
                                     route="/hello")
    assert delta(before, after, "onebox_http_request_duration_seconds_sum", route="/hello") > 0
    # the scrapes themselves are the admin listener's, not the site's
    assert value(after, "onebox_admin_requests_total", code="2xx") >= 1
    assert not any(dict(key[1]).get("route") == "/metrics" for key in after)


def test_a_response_the_reactor_finishes_is_counted_once_with_all_its_bytes(start_server):
    size = 16 * 1024 * 1024

    def big(request):
        return b"x" * size

    server = start_server(config={"worker_write_s": 0.001}, routes=[("GET", "/big", big)])
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    connection.request("GET", "/big")
    time.sleep(0.3)   # let the worker give up and hand the rest to the reactor
    response = connection.getresponse()
    assert len(response.read()) == size
    connection.close()
    deadline = time.monotonic() + 5
    while True:
        after = scrape(server)
        counted = value(after, "onebox_http_requests_total", method="GET", code="2xx",
                        route="/big")
        if counted or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert counted == 1
    assert value(after, "onebox_http_response_body_bytes_total", method="GET", code="2xx",
                 route="/big") == size


def test_connection_gauges_and_pool_figures(start_server):
    server = start_server(config={"worker_threads": 3})
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    try:
        time.sleep(0.2)
        samples = scrape(server)
        assert value(samples, "onebox_connections_open") == 3
        assert value(samples, "onebox_connections", state="reading") == 3
        assert value(samples, "onebox_workers", state="busy") \
            + value(samples, "onebox_workers", state="idle") == 3
        assert value(samples, "onebox_admin_connections_open") == 1
        assert value(samples, "onebox_healthy") == 1
        assert value(samples, "onebox_phase", phase="serving") == 1
    finally:
        for sock in held:
            sock.close()


@cached(ttl_s=60)
def cached_hello(request):
    return "cached"


def drive_every_family(server):
    """Requests, refusals (rate limit, connection cap), a ban, cache hits and misses, state
    writes: the traffic after which every family has samples."""
    for path in ("/hello", "/", "/nope", "/cached", "/cached"):
        request(server, "GET", path)
    request(server, "POST", "/api/notes", json.dumps({"text": "x"}),
            {"Content-Type": "application/json"})
    statuses = [from_client(server, "GET", "/hello", "127.0.0.2") for _ in range(8)]
    assert 429 in statuses and 403 in statuses, statuses   # limited, then banned
    held = [socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.3", 0))
            for _ in range(2)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", server.port),
                                         source_address=("127.0.0.3", 0))
        assert status_of(read_until_close(extra)) == 503
        extra.close()
    finally:
        for sock in held:
            sock.close()


GUARDED = {"limits.client_rate_per_s": 0.001, "limits.client_burst": 2,
           "limits.ban_after_rejections": 2, "max_connections_per_ip": 2}


def test_guard_cache_state_and_process_families(start_server):
    server = start_server(config=GUARDED, routes=[("GET", "/cached", cached_hello)])
    drive_every_family(server)
    samples = scrape(server)
    assert value(samples, "onebox_guard_decisions_total", rule="client_rate",
                 action="refused") >= 2
    assert value(samples, "onebox_guard_decisions_total", rule="banned", action="refused") >= 1
    assert value(samples, "onebox_guard_bans_active") == 1
    assert value(samples, "onebox_guard_events_total", event="bans") == 1
    assert value(samples, "onebox_connections_refused_total", cause="refused_client_cap") == 1
    assert value(samples, "onebox_table_entries", table="guard_bans") == 1
    assert value(samples, "onebox_table_capacity", table="guard_bans") == 20000
    assert value(samples, "onebox_response_cache_hits_total") == 1
    assert value(samples, "onebox_response_cache_misses_total") == 1
    assert value(samples, "onebox_cache_bytes", cache="response_cache") > 0
    assert value(samples, "onebox_cache_bytes", cache="static_files") > 0
    assert value(samples, "onebox_state_writes_total") >= 2   # the note and the ban
    assert value(samples, "onebox_state_fsyncs_total") >= 1
    assert value(samples, "onebox_state_keys") >= 4
    assert value(samples, "onebox_state_journal_bytes") > 0
    assert value(samples, "process_resident_memory_bytes") > 1e6
    assert value(samples, "process_open_fds") > 3
    assert value(samples, "process_threads") >= 3
    assert time.time() - 3600 < value(samples, "process_start_time_seconds") <= time.time()
    assert value(samples, "process_cpu_seconds_total") > 0


def test_promtool_accepts_the_scrape(start_server, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    server = start_server(config=GUARDED, routes=[("GET", "/cached", cached_hello)])
    drive_every_family(server)
    text = scrape_text(server)
    for family in ("onebox_http_requests_total", "onebox_http_request_duration_seconds_bucket",
                   "onebox_guard_decisions_total", "onebox_guard_bans_active",
                   "onebox_connections_refused_total", "onebox_response_cache_hits_total",
                   "onebox_state_writes_total", "process_resident_memory_bytes"):
        assert "\n" + family in text, family
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30)
    (tmp_path / "scrape.txt").write_text(text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", \
        result.stdout + result.stderr   # no lint warnings either


def test_metrics_off_counts_no_requests_but_still_reports_gauges(start_server):
    server = start_server(config={"admin.metrics": False})
    assert request(server, "GET", "/hello")[0] == 200
    samples = scrape(server)
    assert value(samples, "onebox_metrics_enabled") == 0
    # every cause is listed from the start, so a rate() over it has a zero to start from
    key = ("onebox_connections_refused_total", (("cause", "refused_bad_request"),))
    assert samples[key] == 0
    assert not any(key[0] == "onebox_http_requests_total" for key in samples)
    assert value(samples, "onebox_workers", state="idle") >= 1
    assert value(samples, "onebox_state_keys") >= 0


def test_request_body_bytes_received_are_counted(start_server):
    """onebox_http_request_body_bytes_total: what the books' Record carries (onebox/books.py)."""
    server = start_server()
    assert value(scrape(server), "onebox_http_request_body_bytes_total") == 0
    assert request(server, "POST", "/api/notes", body=b'{"text": "twelve bytes"}',
                   headers={"Content-Type": "application/json"})[0] == 201
    assert request(server, "GET", "/hello")[0] == 200   # no body: nothing added
    assert value(scrape(server), "onebox_http_request_body_bytes_total") == 24
