"""The Limiter contract and its in-process implementation; the [limits] settings; a handler
limiting its own keys through the handler contract."""
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, onebox, request
from handlers import _context, _limits
from handlers._core import HTTPError, limiter, rate_limit
from handlers._limits import Policy
from onebox.limits import InProcessLimiter, LimiterRegistry, all_stats


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(rate=2.0, burst=3, max_keys=100):
    clock = FakeClock()
    return InProcessLimiter(Policy("test", rate, burst), max_keys, clock), clock


def test_burst_passes_and_burst_plus_one_is_refused_with_the_exact_wait():
    limits, clock = make(rate=2.0, burst=3)
    assert [limits.hit("a").allowed for _ in range(3)] == [True, True, True]
    refused = limits.hit("a")
    assert not refused.allowed and refused.remaining < 1
    assert refused.retry_after_s == pytest.approx(0.5)      # one token at 2/s
    assert limits.retry_after("a") == pytest.approx(0.5)
    clock.now += 0.49
    assert not limits.hit("a").allowed
    clock.now += 0.01
    assert limits.hit("a").allowed                          # waiting retry_after is enough


def test_refused_hits_take_no_tokens_and_the_bucket_refills_to_burst_only():
    limits, clock = make(rate=1.0, burst=2)
    limits.hit("a")
    limits.hit("a")
    for _ in range(10):
        assert not limits.hit("a").allowed                  # hammering does not dig deeper
    clock.now += 1.0
    assert limits.hit("a").allowed
    clock.now += 100.0
    assert limits.peek("a") == pytest.approx(2.0)           # capped at burst
    assert [limits.hit("a").allowed for _ in range(3)] == [True, True, False]


def test_keys_are_independent_and_forget_refills():
    limits, _ = make(rate=1.0, burst=1)
    assert limits.hit("a").allowed and not limits.hit("a").allowed
    assert limits.hit("b").allowed
    limits.forget("a")
    assert limits.hit("a").allowed


def test_cost_and_per_call_policy():
    limits, _ = make(rate=1.0, burst=5)
    assert limits.hit("a", cost=5).allowed
    assert not limits.hit("a").allowed
    wide = Policy("wide", 1.0, 10)
    assert limits.hit("a", 1, wide).allowed                 # the same bucket, a bigger size
    with pytest.raises(ValueError):
        limits.hit("b", cost=6)                             # could never pass


def test_table_is_capped_with_least_recently_used_eviction():
    limits, _ = make(rate=1.0, burst=1, max_keys=3)
    for key in "abc":
        limits.hit(key)
    limits.hit("a")            # refused, but touched: now the most recent
    limits.hit("d")            # evicts b, the least recently used
    stats = limits.stats()
    assert stats["keys"] == 3 and stats["evictions"] == 1 and stats["max_keys"] == 3
    assert not limits.hit("a").allowed                      # a is still tracked (still empty)
    assert limits.hit("b").allowed                          # b was forgotten: a full bucket


def test_idle_keys_expire_as_a_side_effect_of_use_without_a_sweep():
    limits, clock = make(rate=10.0, burst=1, max_keys=1000)
    for n in range(100):
        limits.hit("idle-%d" % n)
    clock.now += 1.0                                        # every bucket is full again
    for n in range(60):
        limits.hit("new-%d" % n)                            # each hit drops up to two idle keys
    stats = limits.stats()
    assert stats["expired"] >= 100 and stats["keys"] <= 60 + 2
    assert stats["evictions"] == 0


def test_a_pair_of_buckets_takes_as_two_takes_would():
    """take_pair (the guard's site-wide and route buckets, one lock): both tokens, or the first
    bucket's refusal with the second untouched, or the second's with the first's token taken."""
    clock = FakeClock()
    lock = threading.Lock()
    first = InProcessLimiter(Policy("site", 1.0, 3), 100, clock, lock)
    second = InProcessLimiter(Policy("route", 1.0, 2), 100, clock, lock)
    assert [first.take_pair("c", 1.0, 3, second, "r", 1.0, 2) for _ in range(2)] == [None, None]
    which, wait = first.take_pair("c", 1.0, 3, second, "r", 1.0, 2)
    assert which == 1 and wait == pytest.approx(1.0)   # the route's burst of 2 is spent
    assert first.peek("c") == pytest.approx(0.0)       # ...and the site's third token taken
    which, wait = first.take_pair("c", 1.0, 3, second, "r", 1.0, 2)
    assert which == 0 and wait == pytest.approx(1.0)   # now the site refuses first
    assert second.retry_after("r") == pytest.approx(1.0)   # the route was not asked
    assert first.stats()["limited"] == 1 and second.stats()["limited"] == 1
    clock.now += 1.0
    assert first.take_pair("c", 1.0, 3, second, "r", 1.0, 2) is None


def test_least_recently_used_order_is_exact_when_the_newest_key_is_not_moved():
    """A key that is already the newest is not moved to the end again; every other use still
    moves it, so eviction takes the least recently used key, whichever call used it last."""
    limits, clock = make(rate=1000.0, burst=1000, max_keys=3)
    other = InProcessLimiter(Policy("route", 1000.0, 1000), 100, clock, limits._lock)
    for key in "abc":
        limits.take(key, 1000.0, 1000)
    limits.take("c", 1000.0, 1000)                  # the newest again: stays last
    limits.take_pair("a", 1000.0, 1000, other, "x", 1000.0, 1000)   # a: now the newest
    limits.take_pair("a", 1000.0, 1000, other, "x", 1000.0, 1000)
    limits.take("d", 1000.0, 1000)                  # evicts b, the least recently used
    assert list(limits.tracked) == ["c", "a", "d"]
    limits.forget("d")
    limits.take("c", 1000.0, 1000)                  # d (the newest) gone: c moves last
    assert list(limits.tracked) == ["a", "c"]
    limits.charge("a", 1.0, 1000.0)
    limits.take("c", 1000.0, 1000)
    assert list(limits.tracked) == ["a", "c"]


def test_policy_validation():
    for bad in [Policy("x", 0, 1), Policy("x", 1, 0), Policy("x y", 1, 1),
                Policy("x", float("inf"), 1)]:
        with pytest.raises(ValueError):
            InProcessLimiter(bad)
    with pytest.raises(ValueError):
        InProcessLimiter(Policy("x", 1, 1), max_keys=0)


def test_rate_limit_headers_follow_the_draft():
    limits, _ = make(rate=0.5, burst=4)
    for _ in range(4):
        limits.hit("a")
    headers = dict(_limits.rate_limit_headers(limits.hit("a")))
    assert headers["Retry-After"] == "2"
    assert headers["RateLimit-Policy"] == '"test";q=4;w=8'
    assert headers["RateLimit"] == '"test";r=0;t=2'


def test_named_limiters_survive_a_second_import_and_report_stats():
    first = limiter("test-accounts", rate_per_s=1, burst=2)
    second = limiter("test-accounts", rate_per_s=1, burst=3)
    assert first is second and second.policy.burst == 3
    context = _context.ServerContext(limiters=LimiterRegistry())
    _context.bind(context)   # what a server's worker threads do
    try:
        first.hit("alice")
        assert all_stats()["test-accounts"]["keys"] == 1
        assert all_stats()["test-accounts"]["max_keys"] == _limits.DEFAULT_MAX_KEYS
    finally:
        _context.unbind(context)


def test_rate_limit_raises_a_429_with_retry_after():
    limits, _ = make(rate=1.0, burst=1)
    rate_limit(limits, "a")
    with pytest.raises(HTTPError) as caught:
        rate_limit(limits, "a")
    assert caught.value.status == 429
    assert ("Retry-After", "1") in caught.value.headers


def test_a_handler_limits_its_own_keys(start_server):
    accounts = InProcessLimiter(Policy("login", 0.5, 2), 100)

    def login(request):
        rate_limit(accounts, request.query.get("account", ""))
        return "welcome\n"

    server = start_server(routes=[("GET", "/t/login", login)])
    assert [request(server, "GET", "/t/login?account=alice")[0] for _ in range(3)] == \
        [200, 200, 429]
    status, headers, body = request(server, "GET", "/t/login?account=alice",
                                    headers={"Accept": "application/json"})
    assert status == 429 and headers["retry-after"] == "2"
    assert headers["ratelimit-policy"] == '"login";q=2;w=4'
    assert b'"status":429' in body
    assert request(server, "GET", "/t/login?account=bob")[0] == 200   # another account


# --- settings ---------------------------------------------------------------------------------

def test_defaults_are_the_documented_ones():
    config = onebox.load_config()
    limits = config.limits
    assert (limits.client_rate_per_s, limits.client_burst) == (20.0, 100)
    assert (limits.route_rate_per_s, limits.route_burst) == (5.0, 30)
    assert limits.allow_paths == "/.well-known/ /robots.txt /favicon.ico"
    assert config.guard.routes == [] and config.guard.dry == frozenset()


def test_route_sections_parse_from_setup_cfg(tmp_path):
    path = tmp_path / "setup.cfg"
    path.write_text('[limits]\nroute_rate_per_s = 4\n\n[limits "/api/login"]\nrate_per_s = 0.1\n'
                    'burst = 5\n\n[limits "/api/notes/{id}"]\ndry_run = on\n\n'
                    '[tool:pytest]\nwhatever = 1\n')
    guard = onebox.load_config(str(path)).guard
    assert guard.route_for("/api/login") == ("/api/login", Policy("route", 0.1, 5), False)
    key, policy, dry = guard.route_for("/api/notes/42")
    assert key == "/api/notes/{id}" and policy.rate_per_s == 4 and dry is True
    assert guard.route_for("/api/notes/42/x")[0] == "/api/notes/42/x"   # {id} is one segment
    assert guard.route_for("/other")[0] == "/other"


def test_route_sections_prefix_glob_and_longest_match():
    config = onebox.load_config(None, {'limits "/api/".rate_per_s': 1,
                                       'limits "/api/login".rate_per_s': 2,
                                       'limits "/files/*.zip".rate_per_s': 3})
    guard = config.guard
    assert guard.route_for("/api/anything/deep")[0] == "/api/"
    assert guard.route_for("/api/login")[0] == "/api/login"
    assert guard.route_for("/files/a/b.zip")[0] == "/files/*.zip"
    assert guard.route_for("/files/a/b.tar")[0] == "/files/a/b.tar"


@pytest.mark.parametrize("text, words", [
    ("[limits]\nclient_rate = 3\n", ["[limits] client_rate", "unknown key", "client_rate_per_s"]),
    ("[limits]\nclient_burst = 0\n", ["client_burst", "minimum"]),
    ("[limits]\ntrusted_proxies = 10.0.0.0/8 nonsense\n", ["trusted_proxies", "nonsense", "CIDR"]),
    ("[limits]\ndeny_user_agents = (unclosed\n", ["deny_user_agents", "regular expression"]),
    ("[limits]\ndry_run = client_rate typo\n", ["dry_run", "typo", "route_rate"]),
    ("[limits]\nforwarded_header = x-real-ip\n", ["forwarded_header", "x-forwarded-for"]),
    ("[limits]\nipv4_prefix_bits = 33\n", ["ipv4_prefix_bits", "more than 32"]),
    ("[limits]\nban_s = 100\nban_max_s = 10\n", ["ban_max_s", "ban_s"]),
    ("[limits]\ndeny_paths = wp-login.php\n", ["deny_paths", "must start with /"]),
    ('[limits "/x"]\nrate = 1\n', ['[limits "/x"] rate', "unknown key", "rate_per_s"]),
    ('[limits "/x"]\nburst = 0\n', ["burst", "minimum"]),
    ('[limits /x]\nburst = 1\n', ['[limits "/path"]']),
    ("[cache]\nmax_entries = 0\n", ["[cache] max_entries", "minimum"]),
])
def test_check_refuses_bad_limits_naming_the_key(tmp_path, text, words):
    path = tmp_path / "setup.cfg"
    path.write_text(text)
    result = subprocess.run([sys.executable, ROOT + "/server.py", "--check", "--config",
                             str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stdout
    for word in words:
        assert word in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_limits_flags_override_setup_cfg():
    config = onebox.load_config(None, {"limits.client_rate_per_s": "7.5",
                                       "limits.enabled": "off"})
    assert config.limits.client_rate_per_s == 7.5 and config.guard.enabled is False
    args = onebox.parse_args(["--limits-client-burst", "9", "--cache-max-entries", "5"])
    assert vars(args)["set:limits.client_burst"] == "9"
    assert vars(args)["set:cache.max_entries"] == "5"
