"""SIGHUP reloads setup.cfg without dropping a connection (onebox/reload.py).

Most tests run the real `python3 server.py --config <a copy of setup.cfg>` and send it a real
SIGHUP; a few use the start_server fixture and ``server.note_sighup()``, the very call the
SIGHUP handler makes (the reload itself then runs in the reactor thread, as it does for a
signal). Clients other than the loopback proxy come from 127.0.0.2 and up (127.0.0.1 is trusted
and never limited).
"""
import configparser
import http.client
import os
import re
import shutil
import signal
import socket
import threading
import time

from conftest import ROOT, Client, Load, raw_exchange, request, status_of

from handlers._core import HTTPError, Response
from onebox.cache import ResponseCache
from onebox.reload import HOW, RESTART
from onebox.settings import SETTINGS

# --- helpers ----------------------------------------------------------------------------------

def write_config(path, values):
    """Set ``{"section.key": value}`` in the setup.cfg at ``path`` (sections made as needed)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(str(path), encoding="utf-8")
    for dotted, value in values.items():
        section, _, key = dotted.rpartition(".")
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key, str(value))
    with open(str(path), "w", encoding="utf-8") as config_file:
        parser.write(config_file)


def config_copy(tmp_path, values=None):
    """A copy of the shipped setup.cfg in tmp_path (pages_dir is then tmp_path/pages), with
    ``values`` set, durability off (speed) and bans off (a client refused on purpose by a
    test is not to be banned, which would close its connections)."""
    path = tmp_path / "setup.cfg"
    shutil.copy(os.path.join(ROOT, "setup.cfg"), str(path))
    (tmp_path / "pages").mkdir(exist_ok=True)
    write_config(path, dict({"state.durability": "off", "limits.ban_after_rejections": 0,
                             "limits.scanner_404_paths": 0}, **(values or {})))
    return path


def started(server_process, config, *flags, port="0"):
    """`python3 server.py --config CONFIG FLAGS`, with ``reload()``: SIGHUP, then the error-log
    line that reports the reload."""
    server = server_process(*flags, config=config, port=port)

    def reload(pattern=r"reload"):
        mark = len(server.err_lines())
        server.send_signal(signal.SIGHUP)
        return server.wait_for(pattern, "err", after=mark, timeout=10)
    server.reload = reload
    return server


def get(port, path, source="127.0.0.2", headers=None, timeout=10):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                            source_address=(source, 0))
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def load(port):
    """GET /hello from 127.0.0.3 (an ordinary client, which the guard limits) on a keep-alive
    connection and on a connection per request, and GET / (a static page) from 127.0.0.1 (a
    trusted proxy's own requests, never limited) on a keep-alive connection, continuously:
    any exception (refused, reset, timeout) or 5xx is a failure."""
    return Load(port, [Client("kept", "/hello", "127.0.0.3", keep_alive=True, pause_s=0.002),
                       Client("fresh", "/hello", "127.0.0.3", keep_alive=False, pause_s=0.002),
                       Client("proxy", "/", "127.0.0.1", keep_alive=True, pause_s=0.002)],
                max_requests=4000, max_s=20.0)


def burst_statuses(port, count, path="/hello", source="127.0.0.2"):
    return [get(port, path, source)[0] for _ in range(count)]


# --- the real process, a real SIGHUP ----------------------------------------------------------

def test_a_reload_under_load_fails_no_request_and_applies_the_new_limit(tmp_path,
                                                                       server_process):
    config = config_copy(tmp_path, {"limits.route_burst": 1000, "limits.route_rate_per_s": 1000})
    (tmp_path / "pages" / "index.html").write_text("<p>home</p>")
    server = started(server_process, config, "--access-log", "off")
    try:
        assert burst_statuses(server.port, 6) == [200] * 6          # far below the limit
        with load(server.port) as load_run:
            time.sleep(0.5)
            write_config(config, {"limits.route_burst": 3, "limits.route_rate_per_s": 0.5,
                                  "static.extra_headers": "X-Reloaded: 1"})
            line = server.reload()
            time.sleep(0.5)
            # a second reload, with nothing changed, under the same load
            assert "no setting changed" in server.reload()
            time.sleep(0.3)
        print("\nreload under load: " + load_run.figures())
        assert "reloaded: static.extra_headers, limits.route_rate_per_s 1000->0.5, " \
               "limits.route_burst 1000->3" in line, line
        assert load_run.failed == 0, (load_run.figures(), load_run.failures[:5])
        assert load_run.sent >= 100, load_run.figures()    # the load did run through the reloads
        assert load_run.statuses["127.0.0.3"].get(429), load_run.figures()   # the new limit met it
        assert list(load_run.statuses["127.0.0.1"]) == [200], load_run.figures()   # never limited
        assert get(server.port, "/", "127.0.0.1")[1]["x-reloaded"] == "1"
        # a client with a full bucket now has 3 requests, then 429 (it had 1000 before)
        statuses = burst_statuses(server.port, 5, path="/hello/x")
        assert statuses[:3] == [200] * 3 and statuses[3:] == [429] * 2, statuses
        write_config(config, {"limits.route_burst": 1000})
        assert "limits.route_burst 3->1000" in server.reload()
        assert burst_statuses(server.port, 5, path="/hello/y") == [200] * 5
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.err_text(), server.err_text()


def test_an_invalid_file_keeps_the_old_settings_and_names_the_key(tmp_path, server_process):
    config = config_copy(tmp_path, {"limits.route_burst": 4, "limits.route_rate_per_s": 0.5})
    server = started(server_process, config)
    try:
        write_config(config, {"limits.route_burst": "many", "static.html_max_age_s": 7})
        line = server.reload()
        assert re.search(r"reload failed: .*setup\.cfg \[limits\] route_burst: 'many' is not a "
                         r"whole number; still serving the previous settings", line), line
        # the old limit (4) still applies, and nothing of the file was taken (html_max_age_s)
        assert burst_statuses(server.port, 6) == [200] * 4 + [429] * 2
        (tmp_path / "pages" / "index.html").write_text("<p>hi</p>")
        assert get(server.port, "/")[1]["cache-control"] == "max-age=60, must-revalidate"
        # a whole section misspelt, and a rule that does not compile: named too
        write_config(config, {"limits.route_burst": 4, "static.extra_headers": "Content-Length: 1"})
        assert "[static] extra_headers: Content-Length is set by the server" in server.reload()
        write_config(config, {"static.extra_headers": ""})
        assert "static.html_max_age_s 60->7" in server.reload()
        assert get(server.port, "/")[1]["cache-control"] == "max-age=7, must-revalidate"
    finally:
        assert server.stop() == 0


def test_what_needs_a_restart_is_named_and_keeps_its_value(tmp_path, server_process):
    # port 0 from the file, not a flag, for every listener: each takes a free port (named, the
    # admin and https ports stay 0 when [server] port changes, rather than follow it)
    config = config_copy(tmp_path, {"server.port": 0, "admin.port": 0, "tls.port": 0,
                                    "server.worker_threads": 4})
    server = started(server_process, config, port=None)
    # a port that stays unused: bound, never listening (a connection to it is refused)
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    try:
        port, other = server.port, unused.getsockname()[1]
        assert port != 8000 and server.admin_port not in (0, 8001)
        write_config(config, {"server.port": other, "server.worker_threads": 2,
                              "server.data_dir": str(tmp_path / "elsewhere"),
                              "state.durability": "batch", "server.max_body_bytes": 10})
        line = server.reload()
        # (data_dir changed in the file, but the --data-dir flag wins, as it did at start)
        assert line.endswith("reloaded: server.max_body_bytes 1048576->10; needs a restart: "
                              "server.port 0->%d, server.worker_threads 4->2, "
                              "state.durability off->batch" % other), line
        assert get(port, "/hello")[0] == 200                         # still on the old port
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", other)) != 0       # and not on the new one
        # the live part applied: a body over 10 bytes is refused now
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("POST", "/hello/echo", body=b'{"a": "0123456789"}',
                           headers={"Content-Type": "application/json"})
        assert connection.getresponse().status == 413
        connection.close()
        # a second reload still says what waits for a restart
        assert "needs a restart: server.port" in server.reload()
    finally:
        unused.close()
        assert server.stop() == 0


def test_pages_are_scanned_again(tmp_path, server_process):
    # path_recheck_s trusts how a URL maps to a file for an hour: only the reload's fresh static
    # pages (empty caches) can see that /about is now a file of its own, not about.html
    config = config_copy(tmp_path, {"static.clean_urls": "on", "static.path_recheck_s": 3600})
    pages = tmp_path / "pages"
    (pages / "about.html").write_text("clean url")
    server = started(server_process, config)
    try:
        assert get(server.port, "/about")[2] == b"clean url"
        assert get(server.port, "/new.txt")[0] == 404
        (pages / "about").write_text("a file of its own")
        (pages / "new.txt").write_text("added after start")
        assert get(server.port, "/about")[2] == b"clean url"      # the cache hides it
        assert "reloaded: no setting changed" in server.reload()
        assert get(server.port, "/about")[2] == b"a file of its own"
        assert get(server.port, "/new.txt")[2] == b"added after start"
    finally:
        assert server.stop() == 0


def test_keep_alive_connections_open_across_a_reload_keep_working(tmp_path, server_process):
    config = config_copy(tmp_path)
    server = started(server_process, config)
    try:
        connections = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10,
                                                  source_address=("127.0.0.%d" % (4 + n), 0))
                       for n in range(3)]
        sockets = []
        for connection in connections:
            connection.request("GET", "/hello")
            assert connection.getresponse().read() == b"hello, world\n"
            sockets.append(connection.sock)
        # one more connection, idle between its request line and the rest of its head
        partial = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                           source_address=("127.0.0.8", 0))
        partial.sendall(b"GET /hello HTTP/1.1\r\n")
        write_config(config, {"server.keepalive_timeout_s": 5, "server.header_timeout_s": 5,
                              "limits.client_burst": 50})
        assert "server.keepalive_timeout_s 30->5" in server.reload()
        for connection, sock in zip(connections, sockets):
            connection.request("GET", "/hello")
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, b"hello, world\n")
            assert connection.sock is sock                  # the same connection, not a new one
            connection.close()
        partial.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
        assert status_of(raw_exchange_on(partial)) == 200
    finally:
        assert server.stop() == 0


def raw_exchange_on(sock, timeout=10):
    sock.settimeout(timeout)
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


# --- in a thread: note_sighup(), the call the SIGHUP handler makes ----------------------------

def reload_in(server, mark=None):
    """note_sighup() (what the signal handler does), then the reload's line on the error log."""
    before = server.error_text()
    server.note_sighup()
    deadline = time.monotonic() + 10
    while True:
        new = server.error_text()[len(before):]
        if "reload" in new:
            return new.strip()
        assert time.monotonic() < deadline, server.error_text()
        time.sleep(0.02)


def test_every_setting_says_how_a_reload_applies_it():
    for section, settings in SETTINGS.items():
        assert set(HOW[section]) == {setting.name for setting in settings}, section
    assert set(HOW) == set(SETTINGS)
    restart = sorted("%s.%s" % (section, key) for section, keys in HOW.items()
                     for key, how in keys.items() if how == RESTART)
    assert [key for key in restart
            if not key.startswith(("admin.", "health.", "status.", "sessions.", "cluster."))] == [
        "server.data_dir", "server.host", "server.poller", "server.port", "server.reuse_port",
        "server.worker_threads",
        "state.batch_interval_ms", "state.compact_journal_bytes", "state.durability",
        "tls.host", "tls.port"]   # the HTTPS listener is bound once; its certificate reloads


def test_new_timeouts_apply_to_new_connections(start_server, tmp_path):
    config = config_copy(tmp_path)
    server = start_server(config_file=str(config), pages_dir=tmp_path / "pages")
    write_config(config, {"server.header_timeout_s": 0.3})
    assert "server.header_timeout_s 10->0.3" in reload_in(server)
    assert server.phase == "serving"
    started = time.monotonic()
    answer = raw_exchange(server, b"GET /hello HTTP/1.1\r\n", timeout=5, source="127.0.0.2")
    assert status_of(answer) == 408
    assert time.monotonic() - started < 3          # not the old 10 s


def test_pages_dir_and_allowed_hosts_apply_live(start_server, tmp_path):
    config = config_copy(tmp_path)
    (tmp_path / "pages" / "where.txt").write_text("first")
    (tmp_path / "site2").mkdir()
    (tmp_path / "site2" / "where.txt").write_text("second")
    server = start_server(config_file=str(config))    # pages_dir from the file: tmp_path/pages
    assert request(server, "GET", "/where.txt")[2] == b"first"
    write_config(config, {"server.pages_dir": "site2", "server.allowed_hosts": "example.org"})
    assert reload_in(server).endswith("reloaded: server.allowed_hosts, server.pages_dir")
    assert request(server, "GET", "/where.txt", headers={"Host": "example.org"})[2] == b"second"
    assert request(server, "GET", "/where.txt", headers={"Host": "other.org"})[0] == 421


def test_the_access_log_can_be_turned_off_and_on(start_server, tmp_path):
    config = config_copy(tmp_path, {"server.log_flush_interval_s": 0.05})
    server = start_server(config_file=str(config), pages_dir=tmp_path / "pages")
    assert request(server, "GET", "/hello?first")[0] == 200
    write_config(config, {"server.access_log": "off"})
    assert "server.access_log on->off" in reload_in(server)
    assert server.access_log is None and server.site.access_log is None
    assert request(server, "GET", "/hello?second")[0] == 200
    write_config(config, {"server.access_log": "on", "server.log_flush_interval_s": 0.1})
    assert "server.access_log off->on, server.log_flush_interval_s 0.05->0.1" \
        in reload_in(server)
    assert request(server, "GET", "/hello?third")[0] == 200
    log = server.access_text()
    assert "/hello?first" in log and "/hello?third" in log
    assert "/hello?second" not in log


def test_a_request_under_way_is_served_by_the_site_it_started_on(start_server, tmp_path):
    """A request whose head was read before a reload ends on the site it started with
    (onebox/site.py): its 404 page comes from the old pages_dir, and its access line is
    written although the reload turned the access log off; a request after the reload sees
    the new site whole (the new 404 page, no line)."""
    config = config_copy(tmp_path, {"server.log_flush_interval_s": 0.05})
    (tmp_path / "pages" / "404.html").write_text("<p>old site</p>")
    (tmp_path / "site2").mkdir()
    (tmp_path / "site2" / "404.html").write_text("<p>new site</p>")
    started, release, answers = threading.Event(), threading.Event(), []

    def slow_missing(request):
        started.set()
        release.wait(10)
        raise HTTPError(404, "not found")

    server = start_server(config_file=str(config), routes=[("GET", "/t/slow", slow_missing)])
    html = {"Accept": "text/html"}
    client = threading.Thread(target=lambda: answers.append(
        request(server, "GET", "/t/slow?before-the-reload", headers=html)))
    client.start()
    try:
        assert started.wait(10)
        write_config(config, {"server.pages_dir": "site2", "server.access_log": "off"})
        assert reload_in(server).endswith(
            "reloaded: server.pages_dir, server.access_log on->off")
        assert request(server, "GET", "/t/none?after", headers=html)[2] == b"<p>new site</p>"
    finally:
        release.set()
        client.join(10)
    assert answers[0][0] == 404 and answers[0][2] == b"<p>old site</p>"
    deadline = time.monotonic() + 5
    while "before-the-reload" not in server.access_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.access_text()
    assert '"GET /t/slow?before-the-reload HTTP/1.1" 404 ' in log, log
    assert "/t/none?after" not in log


def test_a_reload_without_a_file_changes_nothing(start_server, tmp_path):
    server = start_server()                        # defaults and overrides: no file
    settings, guard_policy = server.settings, server.guard.policy
    assert reload_in(server).endswith("reloaded: no setting changed")
    assert server.settings is not settings         # fresh objects, never changed in place
    assert vars(server.settings) == vars(settings)
    assert server.guard.policy is not guard_policy
    assert request(server, "GET", "/hello")[0] == 200


def test_a_value_that_fails_while_applying_changes_nothing(start_server, tmp_path):
    # settings take any finite worker_write_s, but SO_SNDTIMEO's struct timeval cannot hold
    # 1e30 s: the reload fails while applying, and must leave everything as it was
    config = config_copy(tmp_path)
    server = start_server(config_file=str(config))
    settings, policy = server.settings, server.guard.policy
    write_config(config, {"server.worker_write_s": 1e30, "limits.client_burst": 5})
    line = reload_in(server)
    assert "reload failed" in line and "still serving the previous settings" in line, line
    assert server.settings is settings and server.reactor.settings is settings
    assert server.site.settings is settings and server.guard.policy is policy
    assert server.phase == "serving"
    assert request(server, "GET", "/hello")[0] == 200


def test_response_cache_resize_keeps_what_fits():
    cache = ResponseCache(max_entries=10, max_bytes=1 << 20)
    for number in range(5):
        cache.serve("/k%d" % number, 60, lambda: b"x")
    cache.serve("/k0", 60, lambda: b"y")           # /k0 is now the most recently used
    cache.resize(3, 1 << 20)
    assert cache.stats()["entries"] == 3
    not_stored = Response(b"miss", 200, [("Cache-Control", "no-store")])
    kept = [key for key in ("/k0", "/k1", "/k2", "/k3", "/k4")
            if cache.serve(key, 60, lambda: not_stored).body == b"x"]
    assert kept == ["/k0", "/k3", "/k4"]


def test_event_settings_apply_to_what_comes_next(start_server, tmp_path):
    """[events] (issue 22): a lower per-client cap refuses the next stream, and an event over
    a lowered max_event_bytes is refused at publish; the stream already open stays."""
    from test_streams import ROUTES, Stream, send
    config = config_copy(tmp_path)
    server = start_server(config_file=str(config), routes=ROUTES)
    first = Stream(server, source="127.0.0.9")
    try:
        assert first.status() == 200
        write_config(config, {"events.max_subscribers_per_client": 1,
                              "events.max_event_bytes": 100})
        assert "events.max_subscribers_per_client 16->1" in reload_in(server)
        second = Stream(server, source="127.0.0.9")
        assert second.status() == 429
        second.close()
        status, _, _ = request(server, "POST", "/publish/t", '{"data": "%s"}' % ("x" * 200),
                               {"Content-Type": "application/json"})
        assert status == 413
        event_id = send(server, "t", "small")
        assert first.next_event()["id"] == str(event_id)
    finally:
        first.close()
