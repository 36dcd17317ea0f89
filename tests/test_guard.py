"""The abuse guard over real sockets. Each client is a distinct loopback source address
(127.0.0.2, 127.0.0.3, ...); 127.0.0.1 is a trusted proxy and an allowed client by default, so
it plays a proxy or a local benchmark, never an abuser. Rates are tiny and windows short so
that the tests are fast."""
import http.client
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, raw_exchange, onebox, status_of
from handlers._core import Headers, Request
from onebox.guard import (MAX_WARNED_PROXIES, CidrSet, Guard, PathSet, client_key,
                          normal_address)

# The shipped [limits] defaults (the fixture otherwise puts the limits out of reach).
DEFAULT_LIMITS = {"limits." + s.name: s.default for s in onebox.SETTINGS["limits"]}


def get(server, path, source="127.0.0.2", headers=None, method="GET"):
    """One request on a fresh connection from ``source``: (status, headers, body); status is
    None if the server closed the connection without an answer."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10,
                                            source_address=(source, 0))
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    except (ConnectionError, http.client.RemoteDisconnected):
        return None, {}, b""
    finally:
        connection.close()


def statuses(server, path, count, source="127.0.0.2", headers=None):
    return [get(server, path, source, headers)[0] for _ in range(count)]


def echo_ip(request):
    return request.client_ip + "\n"


ECHO = [("GET", "/t/ip", echo_ip)]


# --- rate limits --------------------------------------------------------------------------------

def test_client_over_its_rate_gets_429_with_a_correct_retry_after(start_server):
    server = start_server(config={"limits.client_rate_per_s": 1, "limits.client_burst": 3})
    assert statuses(server, "/hello", 3, "127.0.0.2") == [200, 200, 200]
    status, headers, body = get(server, "/hello", "127.0.0.2")
    assert status == 429 and body == b"too many requests; retry after 1 s\n"
    assert headers["retry-after"] == "1"
    assert headers["ratelimit-policy"] == '"site";q=3;w=3'
    assert headers["ratelimit"] == '"site";r=0;t=1'
    assert get(server, "/hello", "127.0.0.3")[0] == 200     # another client is unaffected
    time.sleep(int(headers["retry-after"]))
    assert get(server, "/hello", "127.0.0.2")[0] == 200     # after Retry-After it gets through
    assert "guard=429:client_rate" in server.access_text()


def test_429_body_is_json_for_json_clients(start_server):
    server = start_server(config={"limits.client_rate_per_s": 0.1, "limits.client_burst": 1})
    get(server, "/hello", "127.0.0.2")
    status, headers, body = get(server, "/hello", "127.0.0.2", {"Accept": "application/json"})
    assert status == 429 and headers["retry-after"] == "10"
    assert json.loads(body) == {"error": "too many requests; retry after 10 s", "status": 429}


def test_per_path_limit_spares_other_paths(start_server):
    server = start_server(config={"limits.route_rate_per_s": 0.5, "limits.route_burst": 2})
    assert statuses(server, "/hello", 3, "127.0.0.2") == [200, 200, 429]
    status, headers, _ = get(server, "/hello", "127.0.0.2")
    assert headers["ratelimit-policy"] == '"route";q=2;w=4' and headers["retry-after"] == "2"
    assert get(server, "/hello/there", "127.0.0.2")[0] == 200
    assert get(server, "/hello", "127.0.0.3")[0] == 200
    assert "guard=429:route_rate" in server.access_text()


def test_per_route_overrides_by_pattern_and_prefix(start_server):
    server = start_server(config={'limits "/hello/{name}".rate_per_s': 0.1,
                                  'limits "/hello/{name}".burst': 2,
                                  'limits "/api/".rate_per_s': 0.1,
                                  'limits "/api/".burst': 1,
                                  'limits "/api/".dry_run': True})
    # one bucket for every /hello/{name}: the pattern is the route
    assert [get(server, "/hello/%s" % name, "127.0.0.2")[0] for name in "abc"] == [200, 200, 429]
    assert get(server, "/hello", "127.0.0.2")[0] == 200      # not matched: default limits
    # a dry-run override logs and serves
    assert [get(server, "/api/notes", "127.0.0.2")[0] for _ in range(3)] == [200, 200, 200]
    assert "guard=dry-run:429:route_rate" in server.access_text()


# --- identity ---------------------------------------------------------------------------------

def test_forwarded_headers_from_an_untrusted_peer_are_ignored(start_server):
    server = start_server(routes=ECHO, config={"limits.trusted_proxies": "10.0.0.0/8"})
    status, _, body = get(server, "/t/ip", "127.0.0.2", {"X-Forwarded-For": "203.0.113.9"})
    assert body == b"127.0.0.2\n"


def test_a_trusted_proxy_names_the_client(start_server):
    server = start_server(routes=ECHO, config={
        "limits.trusted_proxies": "127.0.0.1/32 192.0.2.0/24",
        "limits.client_rate_per_s": 0.1, "limits.client_burst": 1})

    def ip(xff):
        return get(server, "/t/ip", "127.0.0.1", {"X-Forwarded-For": xff})[2]

    # the rightmost address that is not a trusted proxy; forged hops to its left do not count
    assert ip("6.6.6.6, 198.51.100.1, 192.0.2.5") == b"198.51.100.1\n"
    assert ip("[2001:db8::7]:4711") == b"2001:db8::7\n"
    assert ip("203.0.113.1:5678") == b"203.0.113.1\n"
    assert get(server, "/t/ip", "127.0.0.1")[2] == b"127.0.0.1\n"     # no header: the proxy
    # each forwarded client has its own bucket; the proxy's connections are not one client
    assert get(server, "/t/ip", "127.0.0.1", {"X-Forwarded-For": "198.51.100.1"})[0] == 429
    assert get(server, "/t/ip", "127.0.0.1", {"X-Forwarded-For": "198.51.100.2"})[0] == 200
    # "unknown" stops the walk at the last trusted hop
    assert get(server, "/t/ip", "127.0.0.1",
               {"X-Forwarded-For": "198.51.100.3, unknown, 192.0.2.9"})[2] == b"192.0.2.9\n"
    assert "198.51.100.1 - - [" in server.access_text()


def test_forwarded_header_mode_reads_rfc_7239_and_ignores_x_forwarded_for(start_server):
    server = start_server(routes=ECHO, config={"limits.trusted_proxies": "127.0.0.1",
                                               "limits.forwarded_header": "forwarded"})
    headers = {"Forwarded": 'for=198.51.100.1;proto=https, for="[2001:db8:cafe::17]:4711"',
               "X-Forwarded-For": "6.6.6.6"}
    assert get(server, "/t/ip", "127.0.0.1", headers)[2] == b"2001:db8:cafe::17\n"
    assert get(server, "/t/ip", "127.0.0.1", {"X-Forwarded-For": "6.6.6.6"})[2] == b"127.0.0.1\n"


def test_ipv6_clients_are_grouped_by_64_and_ipv4_optionally_by_24(start_server):
    server = start_server(routes=ECHO, config={
        "limits.trusted_proxies": "127.0.0.1", "limits.client_rate_per_s": 0.1,
        "limits.client_burst": 1, "limits.ipv4_prefix_bits": 24})

    def via(address):
        return get(server, "/t/ip", "127.0.0.1", {"X-Forwarded-For": address})[0]

    assert via("2001:db8:1:2::1") == 200
    assert via("2001:db8:1:2:ffff::9") == 429                # the same /64
    assert via("2001:db8:1:3::1") == 200                     # the next /64
    assert via("198.51.100.1") == 200
    assert via("198.51.100.200") == 429                      # the same /24
    assert get(server, "/t/ip", "127.0.0.2")[0] == 200       # a direct peer (127.0.0.0/24)
    assert get(server, "/t/ip", "127.0.0.3")[0] == 429


def test_client_key_and_address_parsing():
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("192.0.2.7", ipv4_bits=24) == "192.0.2.0/24"
    assert client_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:3:4:5:6", ipv6_bits=128) == "2001:db8:1:2:3:4:5:6"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"     # IPv4-mapped: one client, not two
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("not-an-ip") == "not-an-ip"
    assert normal_address(' "[2001:DB8::1]:80" ') == "2001:db8::1"
    assert normal_address("unknown") is None and normal_address("_hidden") is None
    cidrs = CidrSet("10.0.0.0/8, 2001:db8::/32 192.0.2.7", "test")
    assert "10.1.2.3" in cidrs and "::ffff:10.1.2.3" in cidrs and "2001:db8:ff::1" in cidrs
    assert "192.0.2.7" in cidrs and "192.0.2.8" not in cidrs and "junk" not in cidrs


def test_path_patterns():
    paths = PathSet("/.well-known/ /robots.txt *.php /files/*.zip /api/{id}/x", "test")
    for path in ("/.well-known/acme/t", "/robots.txt", "/a/b.php", "/files/a/b.zip",
                 "/api/7/x"):
        assert paths.matches(path), path
    for path in ("/.well-known", "/robots.txt/x", "/a.phpx", "/files/a.tar", "/api/7/8/x"):
        assert not paths.matches(path), path
    assert not PathSet("", "test") and not PathSet("", "test").matches("/")


def test_a_ban_behind_a_local_proxy_is_the_clients_own_and_keeps_the_connection_open(
        start_server):
    """No trusted_proxies setting: a proxy on 127.0.0.1 is trusted by default."""
    server = start_server(config={"limits.client_rate_per_s": 0.1, "limits.client_burst": 1,
                                  "limits.ban_after_rejections": 1, "limits.ban_s": 60})
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)

    def via_proxy(xff=None):
        connection.request("GET", "/hello", headers={"X-Forwarded-For": xff} if xff else {})
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("connection")

    try:
        seen = [via_proxy("198.51.100.1") for _ in range(5)]
        other = via_proxy("198.51.100.2")
        own = [via_proxy(), via_proxy("127.0.0.1"), via_proxy()]   # the proxy's own requests
    finally:
        connection.close()
    assert seen == [(200, None), (429, None), (429, None), (403, None), (403, None)]
    assert other == (200, None)                                # the same connection, served
    assert own == [(200, None)] * 3                            # never limited or banned
    assert [key for key, *_ in server.guard.bans()] == ["198.51.100.1"]


def test_connection_cap_counts_per_client_key(start_server):
    server = start_server(config={"max_connections_per_ip": 2, "limits.ipv4_prefix_bits": 24})
    held = []
    try:
        for source in ("127.0.0.2", "127.0.0.3"):              # one /24: one client
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                            source_address=(source, 0))
            held.append(sock)
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        raw = raw_exchange(server, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.4")
        assert status_of(raw) == 503
    finally:
        for sock in held:
            sock.close()


# --- loopback, by default a trusted proxy and an allowed client (issue 10) ------------------

def test_loopback_is_a_trusted_proxy_and_an_allowed_client_by_default():
    shipped = os.path.join(ROOT, "setup.cfg")
    for config in (onebox.load_config(), onebox.load_config(shipped)):
        policy = config.guard
        for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
            assert address in policy.trusted_proxies and address in policy.allow_cidrs, address
        for address in ("127.0.0.2", "::2", "10.0.0.1"):
            assert address not in policy.trusted_proxies, address
            assert address not in policy.allow_cidrs, address


def test_a_local_benchmark_is_never_limited_banned_or_shut_out(start_server, tmp_path):
    """The shipped [limits] with tight rates: 127.0.0.1 passes everything, even a ban that an
    earlier version (which limited loopback) left in the store; 127.0.0.2 is limited, banned
    and closed at accept by the same settings."""
    tight = dict(DEFAULT_LIMITS, **{"limits.client_rate_per_s": 0.1, "limits.client_burst": 1,
                                    "limits.ban_after_rejections": 1, "limits.ban_s": 60,
                                    "limits.ban_close_after_hits": 0,
                                    "limits.scanner_404_paths": 1})
    first = start_server(data_dir=tmp_path / "d", config=tight)
    first.store.put("guard/bans/127.0.0.1", {"until": time.time() + 600, "offences": 1,
                                             "reason": "client_rate: an old ban"})
    first.shutdown()
    first.server_close()
    server = start_server(data_dir=tmp_path / "d", config=tight)
    assert "1 bans restored" in server.error_text()
    assert statuses(server, "/hello", 20, "127.0.0.1") == [200] * 20
    assert [get(server, "/nope/%d" % n, "127.0.0.1")[0] for n in range(5)] == [404] * 5
    assert get(server, "/hello", "127.0.0.1")[0] == 200
    assert server.guard.stats()["counts"] == {}             # nothing refused, closed or banned
    assert not any(server.refusals.stats().values())
    assert statuses(server, "/hello", 4, "127.0.0.2") == [200, 429, 429, None]
    assert server.refusals.stats()["closed_at_accept"] == 1


def test_ipv6_loopback_is_never_limited_by_default(start_server):
    probe = socket.socket(socket.AF_INET6)
    try:
        probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    finally:
        probe.close()
    server = start_server(host="::1", config=dict(
        DEFAULT_LIMITS, **{"limits.client_rate_per_s": 0.1, "limits.client_burst": 1}))
    codes = []
    for _ in range(5):
        connection = http.client.HTTPConnection("::1", server.port, timeout=10)
        try:
            connection.request("GET", "/hello")
            codes.append(connection.getresponse().status)
        finally:
            connection.close()
    assert codes == [200] * 5


def test_a_trusted_proxy_is_never_limited_and_a_missing_header_is_reported_once(start_server):
    """A proxy that is not allowlisted: its own requests pass, the clients it names are
    limited; the first request it sends without X-Forwarded-For is reported on stderr."""
    server = start_server(config={"limits.trusted_proxies": "127.0.0.5", "limits.allow_cidrs": "",
                                  "limits.client_rate_per_s": 0.1, "limits.client_burst": 1,
                                  "limits.ban_after_rejections": 1, "limits.ban_s": 60})
    assert statuses(server, "/hello", 5, "127.0.0.5") == [200] * 5
    assert get(server, "/hello", "127.0.0.5", {"X-Forwarded-For": "127.0.0.5"})[0] == 200
    forwarded = {"X-Forwarded-For": "198.51.100.1"}
    assert statuses(server, "/hello", 4, "127.0.0.5", forwarded) == [200, 429, 429, 403]
    assert statuses(server, "/hello", 3, "127.0.0.5") == [200] * 3
    assert [key for key, *_ in server.guard.bans()] == ["198.51.100.1"]
    assert statuses(server, "/hello", 2, "127.0.0.1") == [200, 429]   # loopback: now ordinary
    errors = server.error_text()
    assert errors.count("guard: 127.0.0.5 is a trusted proxy but sent no X-Forwarded-For; its "
                        "requests are treated as its own and not limited (set trusted_proxies/"
                        "allow_cidrs in [limits] to change this)") == 1
    assert "127.0.0.1 is a trusted proxy" not in errors


def test_missing_header_reports_are_bounded(start_server):
    server = start_server(config={"limits.trusted_proxies": "127.0.3.0/24 127.0.4.0/24"})
    sources = ["127.0.3.%d" % n for n in range(1, 201)] + ["127.0.4.%d" % n for n in range(1, 101)]
    assert [get(server, "/hello", source)[0] for source in sources] == [200] * len(sources)
    assert get(server, "/hello", "127.0.4.150")[0] == 200
    assert server.error_text().count("is a trusted proxy but sent no") == MAX_WARNED_PROXIES


def test_empty_lists_make_loopback_an_ordinary_client(start_server):
    """How to turn the loopback default off (README "Abuse guard")."""
    server = start_server(routes=ECHO, config={
        "limits.trusted_proxies": "", "limits.allow_cidrs": "",
        "limits.client_rate_per_s": 0.1, "limits.client_burst": 1})
    status, _, body = get(server, "/t/ip", "127.0.0.1", {"X-Forwarded-For": "203.0.113.9"})
    assert (status, body) == (200, b"127.0.0.1\n")          # its forwarded header is ignored
    assert get(server, "/t/ip", "127.0.0.1")[0] == 429


# --- escalation and bans ----------------------------------------------------------------------

def test_hammering_while_limited_escalates_to_a_ban(start_server):
    """Over real sockets: the refusal that earns a ban, the 403 while it lasts, the logs. How a
    ban expires and doubles is timed with a fake clock below, not with sleeps."""
    server = start_server(config={
        "limits.client_rate_per_s": 0.5, "limits.client_burst": 1,
        "limits.ban_after_rejections": 2, "limits.ban_window_s": 5, "limits.ban_s": 60,
        "limits.ban_max_s": 600, "limits.ban_close_after_hits": 100})
    assert statuses(server, "/hello", 4, "127.0.0.2") == [200, 429, 429, 429]  # third 429: ban
    status, _, body = get(server, "/hello", "127.0.0.2")
    assert (status, body) == (403, b"forbidden\n")
    assert get(server, "/hello", "127.0.0.3")[0] == 200
    (key, left, offences, reason), = server.guard.bans()
    assert key == "127.0.0.2" and offences == 1 and 0 < left <= 60
    assert "client_rate" in reason
    assert "banned 127.0.0.2 for 60s" in server.error_text()
    log = server.access_text()
    assert "guard=429:client_rate+ban" in log and "guard=403:banned" in log


class FakeTime:
    """The guard's two seams in one: ``clock`` (monotonic: buckets, strike windows) and ``wall``
    (epoch: bans, which persist), moved together by ``advance``."""

    def __init__(self):
        self.now = 1000.0

    def clock(self):
        return self.now

    def wall(self):
        return 1.7e9 + self.now

    def advance(self, seconds):
        self.now += seconds


def guard_with_fake_time(**limits):
    config = onebox.load_config(None, {"limits." + name: value for name, value in limits.items()})
    time_ = FakeTime()
    lines = []
    guard = Guard(config.guard, log=lambda message, level="error": lines.append(message),
                  clock=time_.clock, wall=time_.wall)
    return guard, time_, lines


def verdicts(guard, count, ip="127.0.0.2"):
    """The guard's answers to ``count`` requests from ``ip``: None (served) or "status rule"."""
    answers = []
    for _ in range(count):
        request = Request("GET", "/hello", ["hello"], "", Headers({}), ip)
        verdict = guard.check(request, guard.admit(ip)[0])
        answers.append(verdict and "%d %s%s" % (verdict.status, verdict.rule,
                                                 "+" + verdict.ban if verdict.ban else ""))
    return answers


def test_the_quick_check_and_the_long_one_agree_on_rate_refusals():
    """Guard.check decides most requests in one frame, with one take_pair; a deny rule (here
    one that matches nothing) sends every request the long way. Both give the same answers:
    the route's burst refuses first, then the site-wide bucket's, and in a dry run of the
    site-wide limit the route's token is still taken and its refusal reported."""
    for deny in ("", "/never/"):
        guard, time_, _ = guard_with_fake_time(
            allow_cidrs="", trusted_proxies="", deny_paths=deny, client_rate_per_s="1",
            client_burst="3", route_rate_per_s="1", route_burst="2", ban_after_rejections="100")
        assert verdicts(guard, 3) == [None, None, "429 route_rate"]
        request = Request("GET", "/other", ["other"], "", Headers({}), "127.0.0.2")
        assert guard.check(request, "127.0.0.2").rule == "client_rate"   # 3 site tokens gone
        time_.advance(10.0)
        guard, time_, _ = guard_with_fake_time(
            allow_cidrs="", trusted_proxies="", deny_paths=deny, client_rate_per_s="1",
            client_burst="1", route_rate_per_s="1", route_burst="2", dry_run="client_rate",
            ban_after_rejections="100")
        answers = []
        for _ in range(3):
            verdict = guard.check(Request("GET", "/hello", ["hello"], "", Headers({}),
                                          "127.0.0.2"), "127.0.0.2")
            answers.append(verdict and (verdict.rule, verdict.dry_run))
        assert answers == [None, ("client_rate", True), ("route_rate", False)], deny


def test_a_ban_expires_and_a_repeat_offence_doubles_it():
    guard, time_, log = guard_with_fake_time(
        client_rate_per_s=0.5, client_burst=1, ban_after_rejections=2, ban_window_s=5,
        ban_s=0.5, ban_max_s=10, ban_close_after_hits=100)
    assert verdicts(guard, 5) == [None, "429 client_rate", "429 client_rate",
                                  "429 client_rate+ban", "403 banned"]
    assert verdicts(guard, 1, "127.0.0.3") == [None]                  # another client
    assert [(key, left, offences) for key, left, offences, _ in guard.bans()] \
        == [("127.0.0.2", 0.5, 1)]
    time_.advance(0.49)
    assert verdicts(guard, 1) == ["403 banned"]                       # still banned
    time_.advance(0.02)                                               # the ban is over...
    assert guard.bans() == []
    assert verdicts(guard, 3) == ["429 client_rate", "429 client_rate",  # ...the habit is not
                                  "429 client_rate+ban"]
    assert [(left, offences) for _, left, offences, _ in guard.bans()] == [(1.0, 2)]  # doubled
    time_.advance(0.99)
    assert verdicts(guard, 1) == ["403 banned"]
    time_.advance(0.6)          # the ban is over; 2.1 s after the last token (0.5/s), one more
    assert verdicts(guard, 2) == [None, "429 client_rate"]
    assert log == ["guard: banned 127.0.0.2 for 0.5s (client_rate: more than 2 refusals in 5s; "
                   "offence 1)",
                   "guard: banned 127.0.0.2 for 1s (client_rate: more than 2 refusals in 5s; "
                   "offence 2)"]


def test_an_offender_is_forgotten_ban_max_s_after_its_ban():
    guard, time_, log = guard_with_fake_time(
        client_rate_per_s=0.5, client_burst=1, ban_after_rejections=1, ban_window_s=5,
        ban_s=1, ban_max_s=4, ban_close_after_hits=100)
    assert verdicts(guard, 3)[-1] == "429 client_rate+ban"
    time_.advance(1 + 4)                          # the ban (1 s) and ban_max_s after it
    assert verdicts(guard, 1) == [None]           # forgotten, and the bucket is full again
    assert verdicts(guard, 2)[-1] == "429 client_rate+ban"
    assert [(left, offences) for _, left, offences, _ in guard.bans()] == [(1.0, 1)]  # a first


def test_a_banned_client_that_keeps_coming_is_closed_at_accept(start_server):
    server = start_server(config={
        "limits.client_rate_per_s": 0.1, "limits.client_burst": 1,
        "limits.ban_after_rejections": 1, "limits.ban_s": 60, "limits.ban_close_after_hits": 2})
    assert statuses(server, "/hello", 3, "127.0.0.2") == [200, 429, 429]   # banned
    status, headers, _ = get(server, "/hello", "127.0.0.2")
    assert status == 403 and headers["connection"] == "close"
    assert get(server, "/hello", "127.0.0.2")[0] == 403
    raw = raw_exchange(server, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.2")
    assert raw == b""                                          # closed, nothing read or written
    assert server.refusals.stats()["closed_at_accept"] == 1
    assert get(server, "/hello", "127.0.0.3")[0] == 200


def test_bans_survive_a_restart_and_expired_ones_are_dropped(start_server, tmp_path):
    config = {"limits.client_rate_per_s": 0.1, "limits.client_burst": 1,
              "limits.ban_after_rejections": 1, "limits.ban_s": 60}
    first = start_server(data_dir=tmp_path / "d", config=config)
    statuses(first, "/hello", 3, "127.0.0.2")
    assert [key for key, *_ in first.guard.bans()] == ["127.0.0.2"]
    assert first.store.get("guard/bans/127.0.0.2")["offences"] == 1
    first.store.put("guard/bans/127.0.0.3", {"until": time.time() - 1, "offences": 3,
                                             "reason": "an old one"})
    first.shutdown()
    first.server_close()
    second = start_server(data_dir=tmp_path / "d", config=config)
    assert get(second, "/hello", "127.0.0.2")[0] == 403        # still banned after a restart
    assert get(second, "/hello", "127.0.0.3")[0] == 200
    assert [key for key, *_ in second.guard.bans()] == ["127.0.0.2"]
    assert second.store.keys("guard/bans/") == ["guard/bans/127.0.0.2"]   # expired: dropped
    assert "1 bans restored" in second.error_text()


def test_scanner_is_banned_after_too_many_distinct_404s(start_server):
    server = start_server(config={"limits.scanner_404_paths": 5, "limits.scanner_window_s": 10,
                                  "limits.ban_s": 60})
    for n in range(10):
        assert get(server, "/missing", "127.0.0.3")[0] == 404  # the same path: not a scan
    for n in range(10):
        assert get(server, "/favicon.ico", "127.0.0.3")[0] == 404   # exempt
        assert get(server, "/.well-known/%d" % n, "127.0.0.3")[0] == 404
    for n in range(6):
        assert get(server, "/wp-%d.php" % n, "127.0.0.2")[0] == 404
    assert get(server, "/hello", "127.0.0.2")[0] == 403
    assert get(server, "/hello", "127.0.0.3")[0] == 200
    assert "guard=ban:scanner" in server.access_text()
    assert [key for key, *_ in server.guard.bans()] == ["127.0.0.2"]


def test_only_404s_that_no_route_matched_count_as_scanning(start_server):
    """A handler's own 404 (a note id that does not exist) is an answer, not a probe: an app
    that looks notes up by id must not ban its users. Unknown paths are what scanners walk."""
    server = start_server(config={"limits.scanner_404_paths": 3, "limits.ban_s": 60})
    for n in range(101, 106):
        assert get(server, "/api/notes/%d" % n, "127.0.0.2")[0] == 404
    assert get(server, "/hello", "127.0.0.2")[0] == 200
    assert [get(server, "/nope/%d" % n, "127.0.0.3")[0] for n in range(1, 6)] == [404] * 4 + [403]
    assert get(server, "/hello", "127.0.0.3")[0] == 403
    assert [key for key, *_ in server.guard.bans()] == ["127.0.0.3"]


# --- rules ------------------------------------------------------------------------------------

def test_deny_rules_by_address_agent_and_path(start_server):
    server = start_server(config={"limits.deny_cidrs": "127.0.0.9",
                                  "limits.deny_user_agents": "sqlmap|nikto",
                                  "limits.deny_paths": "/.env /wp-admin/ *.php",
                                  "limits.ban_after_rejections": 0})
    assert get(server, "/hello", "127.0.0.9")[0] == 403
    assert get(server, "/hello", "127.0.0.2", {"User-Agent": "sqlmap/1.7"})[0] == 403
    assert get(server, "/hello", "127.0.0.2", {"User-Agent": "Mozilla/5.0"})[0] == 200
    for path in ("/.env", "/wp-admin/setup", "/x/y.php"):
        assert get(server, path, "127.0.0.2")[0] == 403
    assert get(server, "/hello", "127.0.0.2")[0] == 200
    log = server.access_text()
    for rule in ("deny_cidrs", "deny_user_agents", "deny_paths"):
        assert "guard=403:%s" % rule in log


def test_dry_run_logs_what_it_would_do_and_blocks_nothing(start_server):
    server = start_server(config={"limits.client_rate_per_s": 0.1, "limits.client_burst": 1,
                                  "limits.ban_after_rejections": 3, "limits.dry_run": "all",
                                  "limits.deny_paths": "/hello/x", "limits.scanner_404_paths": 2})
    assert statuses(server, "/hello", 6, "127.0.0.2") == [200] * 6
    assert get(server, "/hello/x", "127.0.0.2")[0] == 200
    for n in range(4):
        assert get(server, "/nothing-%d" % n, "127.0.0.2")[0] == 404
    assert server.guard.bans() == []
    log = server.access_text()
    assert log.count("guard=dry-run:429:client_rate") >= 5
    assert "guard=dry-run:429:client_rate+dry-run-ban" in log
    assert "guard=dry-run:403:deny_paths" in log
    assert "guard=dry-run-ban:scanner" in log
    assert "would ban 127.0.0.2" in server.error_text()


def test_dry_run_of_one_rule_leaves_the_others_enforcing(start_server):
    server = start_server(config={"limits.client_rate_per_s": 0.1, "limits.client_burst": 1,
                                  "limits.deny_paths": "/hello/x",
                                  "limits.dry_run": "deny_paths"})
    assert get(server, "/hello/x", "127.0.0.2")[0] == 200      # deny is dry...
    assert get(server, "/hello/x", "127.0.0.2")[0] == 429      # ...the rate limit is real


def test_allowlisted_clients_skip_limits_and_bans(start_server):
    server = start_server(config={"limits.allow_cidrs": "127.0.0.8/32",
                                  "limits.client_rate_per_s": 0.1, "limits.client_burst": 1,
                                  "limits.ban_after_rejections": 1,
                                  "limits.scanner_404_paths": 1})
    assert statuses(server, "/hello", 10, "127.0.0.8") == [200] * 10
    assert statuses(server, "/nope-1", 1, "127.0.0.8") + statuses(server, "/nope-2", 1,
                                                                  "127.0.0.8") == [404, 404]
    assert statuses(server, "/hello", 2, "127.0.0.7") == [200, 429]
    assert server.guard.bans() == []


def test_default_exemptions_skip_the_rate_limits(start_server):
    server = start_server(config={"limits.client_rate_per_s": 0.1, "limits.client_burst": 1})
    assert statuses(server, "/robots.txt", 5, "127.0.0.2") == [200] * 5
    assert statuses(server, "/favicon.ico", 3, "127.0.0.2") == [404] * 3
    assert get(server, "/.well-known/acme-challenge/t", "127.0.0.2")[0] == 404
    assert statuses(server, "/hello", 2, "127.0.0.2") == [200, 429]
    assert statuses(server, "/robots.txt", 2, "127.0.0.2") == [200, 200]


def test_allowed_user_agents_skip_the_rate_limits(start_server):
    server = start_server(config={"limits.allow_user_agents": "^uptime-monitor/",
                                  "limits.client_rate_per_s": 0.1, "limits.client_burst": 1})
    agent = {"User-Agent": "uptime-monitor/2.0"}
    assert statuses(server, "/hello", 4, "127.0.0.2", agent) == [200] * 4
    assert statuses(server, "/hello", 2, "127.0.0.2") == [200, 429]


def test_guard_off_serves_everything(start_server):
    server = start_server(config={"limits.enabled": False, "limits.client_rate_per_s": 0.1,
                                  "limits.client_burst": 1, "limits.deny_paths": "/hello"})
    assert statuses(server, "/hello", 5, "127.0.0.2") == [200] * 5


# --- memory -----------------------------------------------------------------------------------

def test_tracking_tables_are_capped_and_their_sizes_are_visible(start_server):
    server = start_server(config={"limits.client_rate_per_s": 0.01, "limits.client_burst": 10,
                                  "limits.route_rate_per_s": 0.01, "limits.route_burst": 10,
                                  "limits.max_tracked_clients": 5,
                                  "limits.max_tracked_routes": 7,
                                  "limits.max_tracked_suspects": 3,
                                  "limits.scanner_404_paths": 100})
    for n in range(20):
        get(server, "/hello", "127.0.1.%d" % (n + 1))
        get(server, "/missing", "127.0.1.%d" % (n + 1))
    stats = server.guard.stats()
    assert stats["clients"]["keys"] == 5 and stats["clients"]["max_keys"] == 5
    assert stats["clients"]["evictions"] == 15
    assert stats["routes"]["keys"] == 7 and stats["routes"]["evictions"] == 33
    assert stats["suspects"] == {"keys": 3, "max_keys": 3, "evictions": 17}
    assert stats["bans"]["keys"] == 0 and stats["bans"]["max_keys"] == 20000


# --- the flood ----------------------------------------------------------------------------------

ABUSERS = r"""
import collections, json, sys, threading
sys.path.insert(0, sys.argv[5])
from asker import keep_asking
port, first, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
seconds = float(sys.argv[4])
results = {}

def abuse(source):
    counts = collections.Counter()
    keep_asking(port, source, counts, seconds)
    results[source] = counts

threads = [threading.Thread(target=abuse, args=("127.0.2.%d" % (first + n),))
           for n in range(count)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(results))
"""


@pytest.mark.slow
def test_flood_of_abusers_leaves_a_normal_client_fully_served(start_server):
    """50 clients at full speed and one at 5 requests/s for 10 s, with the shipped limits: the
    normal client gets only 2xx because the abusers are cut off early (429, ban, then closed at
    accept), not by luck. Its p99 is printed (pytest -s)."""
    seconds, abusers = 10.0, 50
    server = start_server(config=dict(DEFAULT_LIMITS, worker_threads=16))
    flood = subprocess.Popen([sys.executable, "-c", ABUSERS, str(server.port), "1",
                              str(abusers), str(seconds), os.path.join(ROOT, "tests")],
                             stdout=subprocess.PIPE, text=True)
    try:
        latencies, codes = [], []
        started = time.monotonic()
        for n in range(int(seconds * 5)):
            delay = started + n * 0.2 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            begun = time.monotonic()
            codes.append(get(server, "/hello", "127.0.0.2")[0])
            latencies.append(time.monotonic() - begun)
        out, _ = flood.communicate(timeout=60)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.communicate()
    results = json.loads(out)
    latencies.sort()
    p99 = latencies[-(-len(latencies) * 99 // 100) - 1]          # nearest rank
    stats = server.guard.stats()
    print("\nflood: normal client %d requests, all %s; p50 %.1f ms, p99 %.1f ms; abusers: %s; "
          "guard counts %s" % (len(codes), sorted(set(codes)), latencies[len(latencies) // 2] * 1e3,
                               p99 * 1e3, _abuser_totals(results), stats["counts"]))
    assert codes == [200] * 50
    assert len(results) == abusers
    for source, counts in results.items():
        assert counts.get("429", 0) > 0, (source, counts)     # limited...
        assert counts.get("closed", 0) > 0, (source, counts)  # ...then banned and shut out
        assert counts.get("200", 0) <= 100, (source, counts)  # the burst, and no more
    assert len(server.guard.bans()) == abusers
    assert server.refusals.stats()["closed_at_accept"] > abusers
    assert p99 < 1.0


def _abuser_totals(results):
    totals = {}
    for counts in results.values():
        for status, number in counts.items():
            totals[status] = totals.get(status, 0) + number
    return totals


def test_a_newcomers_local_requests_draw_no_proxy_warning(start_server):
    """Loopback is a trusted proxy by default: a newcomer's `curl localhost` is not a proxy
    that forgot X-Forwarded-For. With the default proxies only a request that says it came
    through a proxy (Via, X-Real-IP, ...) without the header is reported."""
    server = start_server(config={"limits.trusted_proxies": "127.0.0.1 ::1"})
    assert get(server, "/hello", "127.0.0.1")[0] == 200
    assert "is a trusted proxy but sent no" not in server.error_text()
    assert get(server, "/hello", "127.0.0.1", {"X-Real-IP": "198.51.100.7"})[0] == 200
    assert server.error_text().count("guard: 127.0.0.1 is a trusted proxy but sent no") == 1


# --- a first visit's burst of static files (issue 25) -------------------------------------------

def static_site(tmp_path, count=20):
    root = tmp_path / "pages"
    (root / "files").mkdir(parents=True)
    for number in range(count):
        (root / "files" / ("f%02d.js" % number)).write_text("// %d\n" % number)
    return root


def test_past_its_burst_a_client_fetches_static_files_from_its_allowance(start_server, tmp_path):
    server = start_server(pages_dir=static_site(tmp_path), config={
        "limits.client_rate_per_s": 0.001, "limits.client_burst": 3,
        "limits.static_rate_per_s": 0.001, "limits.static_burst": 5})
    answers = [get(server, "/files/f%02d.js" % number) for number in range(10)]
    assert [status for status, _, _ in answers] == [200] * 8 + [429] * 2   # 3 + 5
    assert answers[8][1]["retry-after"] and '"site"' in answers[8][1]["ratelimit-policy"]
    assert "guard=429:client_rate" in server.access_text()
    # another client has both buckets of its own
    assert get(server, "/files/f00.js", "127.0.0.3")[0] == 200


def test_404s_and_routes_never_draw_on_the_static_allowance(start_server, tmp_path):
    server = start_server(pages_dir=static_site(tmp_path), config={
        "limits.client_rate_per_s": 0.001, "limits.client_burst": 3,
        "limits.static_rate_per_s": 0.001, "limits.static_burst": 50})
    assert [get(server, "/nope/%d" % n)[0] for n in range(5)] == [404] * 3 + [429] * 2
    assert [get(server, "/hello/%d" % n, "127.0.0.3")[0] for n in range(5)] == \
        [200] * 3 + [429] * 2
    # a client in the middle of a burst of files: its routes still meet the empty bucket
    assert [get(server, "/files/f%02d.js" % n, "127.0.0.4")[0] for n in range(6)] == [200] * 6
    assert get(server, "/hello", "127.0.0.4")[0] == 429
    assert get(server, "/nope/x", "127.0.0.4")[0] == 429
    assert get(server, "/files/f10.js", "127.0.0.4")[0] == 200


def test_a_burst_of_files_leaves_the_site_wide_refill_to_dynamic_requests(start_server,
                                                                          tmp_path):
    server = start_server(pages_dir=static_site(tmp_path), config={
        "limits.client_rate_per_s": 2, "limits.client_burst": 2,
        "limits.static_rate_per_s": 0.001, "limits.static_burst": 50})
    site_policy = server.guard.policy.client_policy
    assert [get(server, "/files/f%02d.js" % n)[0] for n in range(3)] == [200] * 3
    time.sleep(0.6)     # a site-wide token comes back
    assert [get(server, "/files/f%02d.js" % n)[0] for n in range(3, 12)] == [200] * 9
    # the files came from the allowance: the token is still there for the route
    assert server.guard.clients.peek("127.0.0.2", site_policy) >= 1
    assert get(server, "/hello")[0] == 200


def test_each_static_path_keeps_its_own_bucket(start_server, tmp_path):
    server = start_server(pages_dir=static_site(tmp_path), config={
        "limits.client_rate_per_s": 0.001, "limits.client_burst": 1,
        "limits.route_rate_per_s": 0.001, "limits.route_burst": 3,
        "limits.static_rate_per_s": 0.001, "limits.static_burst": 50})
    assert [get(server, "/files/f00.js")[0] for _ in range(5)] == [200] * 3 + [429] * 2
    assert "guard=429:route_rate" in server.access_text()
    assert get(server, "/files/f01.js")[0] == 200


def test_without_the_runtime_s_answer_static_hits_are_priced_as_any_request():
    """A Guard built alone (no ``static_hit``) has no static allowance: the site-wide bucket
    decides, as before issue 25."""
    config = onebox.load_config(None, dict(DEFAULT_LIMITS, **{
        "limits.client_rate_per_s": 0.001, "limits.client_burst": 2, "limits.allow_cidrs": ""}))
    guard = Guard(config.guard)
    request = lambda: Request("GET", "/app.js", ["app.js"], "", Headers({}), "192.0.2.7")
    assert [guard.check(request(), "192.0.2.7") for _ in range(2)] == [None, None]
    assert guard.check(request(), "192.0.2.7").rule == "client_rate"
    guard.static_hit = lambda request: request.path.endswith(".js")
    assert guard.check(request(), "192.0.2.7") is None            # now from the allowance
    assert guard.check(request(), "192.0.2.7") is None            # in its table: allowance first
    assert guard.stats()["statics"]["keys"] == 1
    assert guard.check(Request("GET", "/api", ["api"], "", Headers({}), "192.0.2.7"),
                       "192.0.2.7").rule == "client_rate"
