"""The response cache: TTL, single flight, invalidation, caps, what is never cached."""
import threading
import time

import pytest

from conftest import request
from handlers._cache import cached, invalidate
from handlers._core import Response, json_response
from onebox.cache import ResponseCache


class Counted:
    """A handler that counts its calls and can be slowed down."""

    def __init__(self, delay=0.0, make=None):
        self.calls = 0
        self.lock = threading.Lock()
        self.delay = delay
        self.make = make or (lambda request, n: "computed %d for %s?%s\n"
                             % (n, request.path, request.query_string))

    def __call__(self, request):
        with self.lock:
            self.calls += 1
            n = self.calls
        time.sleep(self.delay)
        return self.make(request, n)


def test_ttl_expiry(start_server):
    handler = Counted()
    server = start_server(routes=[("GET", "/t/c", cached(ttl_s=0.3)(handler))])
    first = request(server, "GET", "/t/c")
    assert request(server, "GET", "/t/c")[2] == first[2] == b"computed 1 for /t/c?\n"
    assert request(server, "HEAD", "/t/c")[0] == 200
    assert handler.calls == 1
    time.sleep(0.35)
    assert request(server, "GET", "/t/c")[2] == b"computed 2 for /t/c?\n"
    stats = server.context.responses.stats()
    assert (stats["hits"], stats["misses"], stats["expired"]) == (2, 2, 1)


def test_the_query_is_part_of_the_key_and_so_are_vary_headers(start_server):
    plain, varied = Counted(), Counted()
    server = start_server(routes=[("GET", "/t/q", cached(ttl_s=60)(plain)),
                                  ("GET", "/t/v", cached(ttl_s=60, vary=("Accept-Language",))(
                                      varied))])
    assert request(server, "GET", "/t/q?a=1")[2] != request(server, "GET", "/t/q?a=2")[2]
    request(server, "GET", "/t/q?a=1")
    assert plain.calls == 2
    request(server, "GET", "/t/v", headers={"Accept-Language": "fr"})
    request(server, "GET", "/t/v", headers={"Accept-Language": "de"})
    request(server, "GET", "/t/v", headers={"Accept-Language": "fr"})
    assert varied.calls == 2


def test_concurrent_misses_compute_once(start_server):
    handler = Counted(delay=0.3)
    server = start_server(routes=[("GET", "/t/slow", cached(ttl_s=60)(handler))])
    bodies = []

    def client():
        bodies.append(request(server, "GET", "/t/slow")[2])

    threads = [threading.Thread(target=client) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert handler.calls == 1
    assert bodies == [b"computed 1 for /t/slow?\n"] * 10
    assert server.context.responses.stats()["coalesced"] == 9


def test_invalidation_by_prefix(start_server):
    notes, other = Counted(), Counted()
    wrapped = cached(ttl_s=60)(notes)

    def create(request):
        invalidate("/t/notes")
        return Response(b"", 201)

    server = start_server(routes=[("GET", "/t/notes", wrapped), ("GET", "/t/notes/{id}", wrapped),
                                  ("POST", "/t/notes", create),
                                  ("GET", "/t/other", cached(ttl_s=60)(other))])
    for path in ("/t/notes", "/t/notes/1", "/t/notes/2", "/t/other"):
        request(server, "GET", path)
        request(server, "GET", path)
    assert (notes.calls, other.calls) == (3, 1)
    assert request(server, "POST", "/t/notes")[0] == 201
    for path in ("/t/notes", "/t/notes/1", "/t/other"):
        request(server, "GET", path)
    assert (notes.calls, other.calls) == (5, 1)
    assert server.context.responses.stats()["invalidated"] == 3


def test_an_invalidation_during_a_computation_keeps_its_result_out():
    cache = ResponseCache()
    started, release = threading.Event(), threading.Event()

    def stale():
        started.set()
        release.wait(5)
        return "old data"

    worker = threading.Thread(target=cache.serve, args=("/k?", 60, stale))
    worker.start()
    assert started.wait(5)
    cache.invalidate("/k")           # the data changed while it was being read
    release.set()
    worker.join()
    assert cache.serve("/k?", 60, lambda: "new data").body == b"new data"


def test_entry_and_byte_caps_evict_the_least_recently_used():
    clock = [0.0]
    cache = ResponseCache(max_entries=3, max_bytes=1 << 20, clock=lambda: clock[0])
    for key in ("a", "b", "c"):
        cache.serve(key, 60, lambda: "x")
    cache.serve("a", 60, lambda: "unused")          # a hit: a is now the most recent
    cache.serve("d", 60, lambda: "x")               # evicts b
    assert cache.stats()["entries"] == 3 and cache.stats()["evictions"] == 1
    assert cache.serve("b", 60, lambda: "again").body == b"again"        # b was gone
    assert cache.serve("a", 60, lambda: "unused").body == b"x"           # a stayed

    small = ResponseCache(max_entries=100, max_bytes=8000)
    for n in range(10):
        small.serve("k%d" % n, 60, lambda: "y" * 900)   # each ~950 bytes with its headers
    stats = small.stats()
    assert stats["bytes"] <= 8000 and stats["entries"] == 8 and stats["evictions"] == 2
    small.serve("big", 60, lambda: "z" * 1001)          # over an eighth of max_bytes: not kept
    assert small.stats()["uncacheable"] == 1 and small.stats()["entries"] == 8


def test_never_caches_cookies_private_errors_or_other_methods(start_server):
    cookie = Counted(make=lambda request, n: Response(b"hi", 200, [("Set-Cookie", "s=%d" % n)]))
    private = Counted(make=lambda request, n: Response(b"me", 200,
                                                       [("Cache-Control", "Private")]))
    missing = Counted(make=lambda request, n: json_response({"error": n}, 404))
    posted = Counted()
    server = start_server(routes=[("GET", "/t/cookie", cached(ttl_s=60)(cookie)),
                                  ("GET", "/t/private", cached(ttl_s=60)(private)),
                                  ("GET", "/t/missing", cached(ttl_s=60)(missing)),
                                  ("POST", "/t/post", cached(ttl_s=60)(posted))])
    for path in ("/t/cookie", "/t/private", "/t/missing"):
        request(server, "GET", path)
        request(server, "GET", path)
    request(server, "POST", "/t/post")
    request(server, "POST", "/t/post")
    assert (cookie.calls, private.calls, missing.calls, posted.calls) == (2, 2, 2, 2)
    assert request(server, "GET", "/t/cookie")[1]["set-cookie"] == "s=3"
    auth = Counted()
    wrapped = cached(ttl_s=60)(auth)
    req = type("R", (), {"method": "GET", "headers": {"authorization": "x"}, "path": "/",
                         "query_string": ""})()
    wrapped(req)
    wrapped(req)
    assert auth.calls == 2                                   # requests with credentials bypass


def test_a_failing_computation_is_not_cached_and_waiters_compute_their_own():
    cache = ResponseCache()
    calls = []

    def boom():
        calls.append(1)
        raise RuntimeError("handler bug")

    with pytest.raises(RuntimeError):
        cache.serve("k", 60, boom)
    assert cache.serve("k", 60, lambda: "fine").body == b"fine"
    assert cache.stats()["errors"] == 1


def test_stats_and_bad_arguments():
    with pytest.raises(ValueError):
        cached(ttl_s=0)
    with pytest.raises(ValueError):
        ResponseCache(max_entries=0)
    cache = ResponseCache()
    cache.serve("a", 60, lambda: "x")
    cache.serve("a", 60, lambda: "x")
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["stored"], stats["entries"]) == (1, 1, 1, 1)
    assert stats["bytes"] > 0
