"""The abuse guard of several processes on one Redis (issue 24): rate limits counted across
them, bans and lifts reaching all within a second, scanners counted together, and the
fall-back to per-process counting while Redis is down. Three in-process servers (each its own
data dir) on a real ``redis-server`` (tests/redisd.py); clients are loopback addresses other
than 127.0.0.1 (an ordinary client: see tests/test_guard.py), spread round-robin over the
servers as a load balancer would."""
import os
import subprocess
import sys
import time
import types

from conftest import ROOT, wait_until
from handlers._limits import Policy
from onebox import limits
from onebox.cluster import Cluster
from onebox.redis import Redis
from onebox.limits import InProcessLimiter, LimiterRegistry, SharedBuckets, SharedLimiter
from redisd import needs_redis, redis_server
from test_guard import get, static_site

pytestmark = needs_redis

BAN_REACH_S = 1.0   # the promise: a ban or a lift applies on every process within 1 s


def cluster_of(start_server, redis, count=3, **limits):
    """``count`` servers on ``redis`` with these ``[limits]`` (names without "limits.")."""
    config = {"cluster.redis_url": redis.url, "state.durability": "off",
              "limits.ban_after_rejections": 0}    # no bans unless a test asks for them
    config.update({"limits." + name: value for name, value in limits.items()})
    return [start_server(config=config) for _ in range(count)]


def round_robin(servers, paths, source):
    """One request per path, the n-th to server n mod len(servers): the statuses."""
    return [get(servers[n % len(servers)], path, source)[0] for n, path in enumerate(paths)]


def everywhere(servers, path, source, status):
    """Whether every server answers ``path`` from ``source`` with ``status`` within
    BAN_REACH_S (polled, each server until it does)."""
    return all(wait_until(lambda server=server: get(server, path, source)[0] == status,
                          BAN_REACH_S) for server in servers)


# --- rate limits -------------------------------------------------------------------------------

def test_a_client_spread_over_three_processes_gets_the_configured_rate_not_three_times_it(
        start_server, tmp_path):
    rate, burst = 5.0, 20
    with redis_server(tmp_path) as redis:
        servers = cluster_of(start_server, redis, client_rate_per_s=rate, client_burst=burst)
        started = time.monotonic()
        answers = []
        while time.monotonic() - started < 2.0:
            answers.append(get(servers[len(answers) % 3], "/hello", "127.0.0.2")[0])
        elapsed = time.monotonic() - started
        assert set(answers) == {200, 429}
        allowed = burst + rate * elapsed        # one process alone would let through as many
        assert 0.9 * allowed <= answers.count(200) <= 1.1 * allowed, (answers.count(200),
                                                                      allowed)
        assert get(servers[1], "/hello", "127.0.0.3")[0] == 200   # another client's own bucket


def test_a_client_far_from_its_limits_costs_a_round_trip_per_reservation_not_per_request(
        start_server, tmp_path):
    """Tokens reserved ahead (onebox/limits.py, RESERVE_MAX): 300 requests of a client whose
    buckets are nearly full make a handful of round trips, where each used to make one; and
    the client with little left in its bucket is still counted exactly (the tests above)."""
    with redis_server(tmp_path) as redis:
        servers = cluster_of(start_server, redis, client_rate_per_s=1.0, client_burst=10000,
                             route_rate_per_s=1.0, route_burst=10000)
        shared = [server.guard.stats()["cluster"] for server in servers]
        assert all(stats["asked"] == 0 for stats in shared)
        assert round_robin(servers, ["/hello"] * 300, "127.0.0.2") == [200] * 300
        asked = sum(server.guard.stats()["cluster"]["asked"] for server in servers)
        assert 3 <= asked <= 3 * (100 // limits.RESERVE_MAX + 2), asked
        # every request let through was counted in Redis (a token a second: the bucket is
        # full again ~300 s from now), and what is reserved ahead is little more
        client = Redis(redis.url)
        try:
            for name in ("site:127.0.0.2", "route:127.0.0.2 /hello"):
                owed_ms = client.call("PTTL", "onebox:limits:" + name)
                assert 295000 <= owed_ms <= (300 + 3 * limits.RESERVE_MAX) * 1000, (name, owed_ms)
        finally:
            client.close()


def test_a_first_visit_s_static_files_draw_on_one_shared_allowance(start_server, tmp_path):
    """Issue 25's static allowance, counted across the processes as the site-wide bucket is:
    3 + 5 files through the three together, then 429, not three allowances."""
    with redis_server(tmp_path) as redis:
        config = {"cluster.redis_url": redis.url, "state.durability": "off",
                  "limits.ban_after_rejections": 0, "limits.client_rate_per_s": 0.001,
                  "limits.client_burst": 3, "limits.static_rate_per_s": 0.001,
                  "limits.static_burst": 5}
        pages = static_site(tmp_path)
        servers = [start_server(pages_dir=pages, config=config) for _ in range(3)]
        paths = ["/files/f%02d.js" % number for number in range(12)]
        assert round_robin(servers, paths, "127.0.0.2") == [200] * 8 + [429] * 4


def test_a_route_limit_is_counted_across_the_processes(start_server, tmp_path):
    with redis_server(tmp_path) as redis:
        servers = cluster_of(start_server, redis, route_rate_per_s=0.2, route_burst=6)
        answers = round_robin(servers, ["/hello"] * 18, "127.0.0.2")
        assert answers[:6] == [200] * 6 and answers.count(200) <= 7, answers   # not 18
        assert round_robin(servers, ["/hello/there"] * 3, "127.0.0.2") == [200] * 3
        status, headers, _ = get(servers[2], "/hello", "127.0.0.2")
        assert status == 429 and headers["ratelimit-policy"] == '"route";q=6;w=30'
        assert "guard=429:route_rate" in "".join(server.access_text() for server in servers)


# --- bans --------------------------------------------------------------------------------------

def test_a_scan_spread_over_the_processes_is_banned_on_all_and_lifts_reach_all(
        start_server, tmp_path):
    """Six distinct 404s allowed: the seventh, whichever process sees it, earns the ban (each
    process saw two or three); the ban, and then its lift through one process (the status
    page's Lift), apply on the others within a second."""
    with redis_server(tmp_path) as redis:
        servers = cluster_of(start_server, redis, scanner_404_paths=6, scanner_window_s=30,
                             ban_s=60)
        paths = ["/wp-%d.php" % n for n in range(7)]
        assert round_robin(servers, paths[:6] + paths[:3], "127.0.0.2") == [404] * 9
        assert all(get(server, "/hello", "127.0.0.2")[0] == 200 for server in servers)
        assert get(servers[0], paths[6], "127.0.0.2")[0] == 404          # the seventh
        assert "guard=ban:scanner" in servers[0].access_text()
        assert everywhere(servers, "/hello", "127.0.0.2", 403)
        assert get(servers[2], "/hello", "127.0.0.3")[0] == 200          # only that client
        assert "told by the cluster" in servers[1].error_text()

        assert servers[1].guard.lift_ban("127.0.0.2", by="a test") == "127.0.0.2"
        assert everywhere(servers, "/hello", "127.0.0.2", 200)
        assert all(server.guard.list_bans() == [] for server in servers)
        # its 404s start afresh too: two more do not ban it again
        assert round_robin(servers, paths[:2], "127.0.0.2") == [404, 404]
        assert get(servers[2], "/hello", "127.0.0.2")[0] == 200


def test_hammering_spread_over_the_processes_earns_one_ban_on_all(start_server, tmp_path):
    """Strikes (429s) are counted in Redis: three allowed, wherever they happen."""
    with redis_server(tmp_path) as redis:
        servers = cluster_of(start_server, redis, client_rate_per_s=0.1, client_burst=1,
                             ban_after_rejections=3, ban_window_s=30, ban_s=60)
        assert round_robin(servers, ["/hello"] * 4, "127.0.0.2") == [200, 429, 429, 429]
        assert get(servers[1], "/hello", "127.0.0.2")[0] == 429         # the fourth strike
        assert everywhere(servers, "/hello", "127.0.0.2", 403)
        assert sum("guard: banned 127.0.0.2 for 60s (client_rate" in server.error_text()
                   for server in servers) == 1                       # one process earned it


def test_unban_from_the_command_line_lifts_the_ban_everywhere(start_server, tmp_path):
    with redis_server(tmp_path) as redis:
        servers = cluster_of(start_server, redis, scanner_404_paths=2, ban_s=60)
        assert round_robin(servers, ["/a", "/b", "/c"], "127.0.0.4") == [404] * 3
        assert everywhere(servers, "/hello", "127.0.0.4", 403)
        command = [sys.executable, os.path.join(ROOT, "server.py"), "--unban", "127.0.0.4",
                   "--cluster-redis-url", redis.url, "--state-durability", "off",
                   "--data-dir", str(tmp_path / "cli")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "lifted the ban of 127.0.0.4" in done.stdout
        assert everywhere(servers, "/hello", "127.0.0.4", 200)
        again = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert again.returncode == 1 and "127.0.0.4 is not banned" in again.stderr


# --- Redis down, and back ---------------------------------------------------------------------

def test_redis_down_limits_count_per_process_and_shared_counting_resumes(start_server,
                                                                         tmp_path):
    outage = "guard: redis unavailable; rate limits count per process until it returns"
    with redis_server(tmp_path) as redis:
        servers = cluster_of(start_server, redis, count=2, client_rate_per_s=0.01,
                             client_burst=3)
        assert round_robin(servers, ["/hello"] * 4, "127.0.0.2") == [200] * 3 + [429]
        redis.kill()
        # served (never a 5xx from the guard), each process counting alone: 3 each
        answers = round_robin(servers, ["/hello"] * 8, "127.0.0.3")
        assert answers == [200] * 6 + [429] * 2, answers
        assert all(server.error_text().count(outage) == 1 for server in servers)
        redis.restart()
        sources = ("127.0.1.%d" % n for n in range(1, 250))   # each asks Redis once

        def back(server):
            assert get(server, "/hello", next(sources))[0] == 200
            return "guard: redis is back" in server.error_text()
        assert all(wait_until(lambda server=server: back(server), 10) for server in servers)
        # counted across the processes again: a fresh client gets its burst, not twice it
        assert round_robin(servers, ["/hello"] * 6, "127.0.0.5") == [200] * 3 + [429] * 3
        assert all(server.error_text().count(outage) == 1 for server in servers)


def test_bans_told_while_a_process_was_cut_off_are_caught_up_from_the_store(start_server,
                                                                           tmp_path):
    """Pub/sub keeps nothing: a process that subscribes again reloads the bans from the store,
    taking the ones it missed and dropping the ones lifted meanwhile."""
    with redis_server(tmp_path, appendonly=True, appendfsync="always") as redis:
        servers = cluster_of(start_server, redis, count=2, scanner_404_paths=1, ban_s=60)
        assert round_robin(servers, ["/a", "/b"], "127.0.0.2") == [404, 404]
        assert everywhere(servers, "/hello", "127.0.0.2", 403)
        # behind the processes' backs (as if told while they were cut off): a ban written,
        # a ban lifted
        servers[0].store.put("guard/bans/127.0.0.3", {"until": time.time() + 60,
                                                     "offences": 1, "reason": "elsewhere"})
        servers[0].store.delete("guard/bans/127.0.0.2")
        assert get(servers[1], "/hello", "127.0.0.3")[0] == 200
        redis.kill()
        redis.restart()
        assert all(wait_until(lambda server=server: get(server, "/hello", "127.0.0.3")[0]
                              == 403, 10) for server in servers)
        assert all(wait_until(lambda server=server: get(server, "/hello", "127.0.0.2")[0]
                              == 200, 10) for server in servers)


# --- the areas' limiters, shared ----------------------------------------------------------------

def test_the_registry_hands_out_shared_limiters_in_a_cluster(tmp_path):
    with redis_server(tmp_path) as redis:
        settings = types.SimpleNamespace(redis_url=redis.url, key_prefix="onebox:",
                                         timeout_s=1.0, connections=4)
        clusters = [Cluster(settings, "off") for _ in range(2)]
        registries = []
        for cluster in clusters:
            registry = LimiterRegistry()
            registry.join_cluster(cluster, lambda message, level="error": None)
            registries.append(registry)
        policy = Policy("logins", 0.01, 4)
        limiters = [registry.get("logins", policy, 100) for registry in registries]
        assert all(isinstance(limiter, SharedLimiter) for limiter in limiters)
        hits = [limiters[n % 2].hit("ann") for n in range(6)]
        assert [hit.allowed for hit in hits] == [True] * 4 + [False] * 2
        assert 2.9 < limiters[0].peek("bob") <= 4 and limiters[1].peek("ann") < 0.1
        assert hits[-1].retry_after_s > 90              # 1 token at 0.01/s
        limiters[1].forget("ann")
        assert limiters[0].hit("ann").allowed        # forgotten in Redis too
        for cluster in clusters:
            cluster.close()


def test_shared_buckets_answer_at_once_while_redis_is_down(tmp_path):
    """No request waits on a connect attempt during an outage: the first call that fails
    starts it, and until the cluster's heartbeat sees Redis again the local bucket decides."""
    with redis_server(tmp_path) as redis:
        settings = types.SimpleNamespace(redis_url=redis.url, key_prefix="onebox:",
                                         timeout_s=1.0, connections=4)
        cluster = Cluster(settings, "off")
        lines = []
        buckets = SharedBuckets(cluster, lambda message, level="error": lines.append(message))
        limiter = SharedLimiter(buckets, "site", InProcessLimiter(Policy("site", 1, 2)))
        assert [limiter.take("k", 1, 2) is None for _ in range(3)] == [True, True, False]
        redis.kill()
        started = time.monotonic()
        answers = [limiter.take("x%d" % n, 1, 2) for n in range(2000)]
        assert time.monotonic() - started < 1.0 and answers == [None] * 2000
        assert len(lines) == 1 and "count per process until it returns" in lines[0]
        cluster.close()
