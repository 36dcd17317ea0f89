"""A PWA copied into pages/ on default settings (issue 25), over real sockets: the shipped
example app (pages/app/ and setup.cfg's [static "/app/"] sections), and the guard's answer to a
first visit's burst of static files against its answer to a flood of 404s or of a route. The
server runs as `python3 server.py` with the shipped setup.cfg, its loopback allowance off
(``ORDINARY``), so that these clients count as visitors from elsewhere. The browser's view is
tests/test_pwa_browser.py."""
import http.client
import os
import re
import shutil
import threading
import time

from conftest import ROOT

APP = os.path.join(ROOT, "pages", "app")
# the loopback allowance off: 127.0.0.x is an ordinary visitor, limited with the defaults
ORDINARY = ("--limits-allow-cidrs", "", "--limits-trusted-proxies", "")
_PRECACHE_RE = re.compile(r"var PRECACHE = \[.*?\];", re.S)


def make_app(pages, count, version="v1"):
    """pages/app/ copied to ``pages``/app/ with ``count`` more files (app/files/), every one
    in its sw.js's precache list; returns the generated files' URL paths."""
    target = os.path.join(str(pages), "app")
    shutil.copytree(APP, target)
    os.makedirs(os.path.join(target, "files"))
    urls = []
    for number in range(count):
        name = "f%03d.%s" % (number, ("js", "css", "txt")[number % 3])
        with open(os.path.join(target, "files", name), "w") as out:
            out.write("/* file %d */\n" % number)
        urls.append("/app/files/" + name)
    write_worker(pages, urls, version)
    return urls


def write_worker(pages, urls, version):
    """pages/app/sw.js with ``urls`` added to its precache list and its VERSION set."""
    with open(os.path.join(APP, "sw.js")) as source:
        text = source.read()
    listed = re.search(r"var PRECACHE = \[(.*?)\];", text, re.S).group(1).strip()
    text = _PRECACHE_RE.sub(lambda _: "var PRECACHE = [\n  %s,\n  %s\n];" % (
        listed, ",\n  ".join('"%s"' % url for url in urls)), text)
    text = text.replace('var VERSION = "v1";', 'var VERSION = "%s";' % version)
    path = os.path.join(str(pages), "app", "sw.js")
    with open(path, "w") as out:
        out.write(text)
    stamp = time.time() + {"v1": 0, "v2": 2, "v3": 4}.get(version, 0)   # a new mtime each time
    os.utime(path, (stamp, stamp))


def get(port, path, headers=None, source="127.0.0.1", method="GET"):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                            source_address=(source, 0))
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def fetch_in_turn(port, paths, source, connections=6, stop_at=None):
    """GET each of ``paths`` over ``connections`` keep-alive connections at once (a browser
    opens six to a host), in order; returns the statuses in the order of ``paths``. With
    ``stop_at`` (a status), each connection stops at its first such answer (None after it)."""
    statuses = [None] * len(paths)
    next_one = iter(range(len(paths)))
    lock = threading.Lock()     # guards next_one and stopped
    stopped = []

    def run():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20,
                                                source_address=(source, 0))
        try:
            while True:
                with lock:
                    number = next(next_one, None)
                    if number is None or stopped:
                        return
                connection.request("GET", paths[number])
                response = connection.getresponse()
                response.read()
                statuses[number] = response.status
                if response.status == stop_at:
                    with lock:
                        stopped.append(number)
                if response.will_close:
                    connection.close()
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return statuses


def served(statuses):
    """How many were served (six connections at once: the first 429 may come before the last
    request served, so they are counted, not found by position)."""
    return statuses.count(200)


def test_the_shipped_example_app_is_served_as_a_pwa_needs(server_process):
    server = server_process(*ORDINARY)     # setup.cfg's [static "/app/"] sections
    status, headers, _ = get(server.port, "/app/sw.js")
    assert status == 200 and headers["cache-control"] == "no-cache"
    assert headers["service-worker-allowed"] == "/app/" and headers["etag"]
    assert get(server.port, "/app/sw.js", {"If-None-Match": headers["etag"]})[0] == 304
    status, headers, _ = get(server.port, "/app/manifest.webmanifest")
    assert (status, headers["content-type"]) == (200, "application/manifest+json")
    assert get(server.port, "/app/app.js")[1]["content-type"] == "text/javascript; charset=utf-8"
    index = get(server.port, "/app/")[2]
    assert b'<script src="/app/app.js" defer></script>' in index
    assert b"<script>" not in index             # no inline script: a CSP of 'self' allows it
    navigation = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    status, headers, body = get(server.port, "/app/settings", navigation)
    assert (status, body) == (200, index) and "Accept" in headers["vary"]
    assert get(server.port, "/app/missing.js", navigation)[0] == 404
    assert get(server.port, "/app/settings")[0] == 404        # not a navigation: no page
    assert get(server.port, "/")[0] == 200                    # the rest of pages/ as before


def test_a_first_visit_may_fetch_600_static_files_at_once_and_a_flood_is_still_refused(
        server_process, tmp_path):
    """The figures of onebox/guard.py's static allowance, with the defaults: client_burst 100
    and static_burst 500 at once, then 20 + 10 a second. 404s and a route draw on the
    site-wide bucket alone: refused after 100, as before issue 25."""
    pages = tmp_path / "pages"
    urls = make_app(pages, 800)
    server = server_process("--pages-dir", pages, *ORDINARY)
    started = time.monotonic()
    first = fetch_in_turn(server.port, urls[:600], "127.0.0.2")
    assert first == [200] * 600
    more = fetch_in_turn(server.port, urls[600:], "127.0.0.2", stop_at=429)
    elapsed = time.monotonic() - started
    extra = served(more)
    assert 429 in more and extra <= 30 * elapsed + 6, (extra, elapsed)   # 6: in flight
    print("static files served at once: %d in %.2f s (then 429)" % (600 + extra, elapsed))

    # a scanner's missing paths: banned (403) past scanner_404_paths (30), as before
    missing = fetch_in_turn(server.port, ["/app/files/nope%d.js" % n for n in range(100)],
                            "127.0.0.3", connections=1, stop_at=403)
    assert missing[:31] == [404] * 31 and missing[31] == 403
    started = time.monotonic()
    routes = fetch_in_turn(server.port, ["/hello/%d" % n for n in range(300)], "127.0.0.4",
                           stop_at=429)
    elapsed = time.monotonic() - started
    served_routes = served(routes)
    assert 429 in routes and 100 <= served_routes <= 100 + 20 * elapsed + 1, (served_routes,
                                                                              elapsed)
    print("route requests before 429: %d in %.2f s" % (served_routes, elapsed))
