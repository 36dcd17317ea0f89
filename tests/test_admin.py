"""The admin listener (onebox/admin.py) and the health checks on the public port
(onebox/health.py): where each path answers, who may ask, and what a wedged pool looks like."""
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, onebox, raw_exchange, read_until_close, request, status_of
from onebox.admin import AdminConfigError, is_loopback

SERVER = os.path.join(ROOT, "server.py")
TOKEN = "s3cret-admin-token-for-tests"


def admin_request(server, method, path, body=None, headers=None, source=None, timeout=10):
    """One request to the admin listener: (status, headers, body)."""
    host, port = server.admin_socket.getsockname()[:2]
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=timeout,
        source_address=(source, 0) if source else None)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        connection.close()


def environment_without_token(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("ONEBOX_ADMIN_TOKEN", "CREDENTIALS_DIRECTORY")}
    env.update(extra)
    return env


def without_token(**extra):
    """server_process's ``env``: no admin token in the environment (None unsets), ``extra``."""
    return dict({"ONEBOX_ADMIN_TOKEN": None, "CREDENTIALS_DIRECTORY": None}, **extra)


# --- the listener --------------------------------------------------------------------------

def test_the_process_prints_the_admin_line_and_metrics_are_only_there(server_process):
    process = server_process(env=without_token())
    process.wait_for(r"^admin on ")
    first, second = process.out_lines()[:2]
    public = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+/)", first)
    admin = re.fullmatch(r"admin on (http://127\.0\.0\.1:(\d+)/)", second)
    assert public and admin, (first, second)
    fetch = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}"]
    for path in ("metrics", "accounts", "status.json"):
        result = subprocess.run(fetch + [public.group(1) + path], capture_output=True,
                                text=True, timeout=10)
        assert result.stdout == "404", path
    result = subprocess.run(["curl", "-sS", admin.group(1) + "metrics"], capture_output=True,
                            text=True, timeout=10)
    assert "# TYPE onebox_http_requests_total counter" in result.stdout
    assert 'onebox_http_requests_total{method="GET",code="4xx",route="unrouted"} 3' \
        in result.stdout   # the three public 404s; the admin request is not the site's


def test_admin_port_off_means_no_admin_listener(server_process):
    process = server_process("--admin-port", "off", env=without_token())
    assert process.out_lines()[0].startswith("listening on ")
    code = process.stop(15)
    out, err = process.out_text(), process.err_text()
    assert "admin on" not in out and code == 0, (out, err)


def test_off_loopback_without_a_token_refuses_to_start(server_process):
    process = server_process("--admin-host", "0.0.0.0", env=without_token(), wait=False)
    code = process.wait(30)
    out, err = process.out_text(), process.err_text()
    assert code == 1
    assert "[admin] host = 0.0.0.0" in err and "ONEBOX_ADMIN_TOKEN" in err, err
    assert "Traceback" not in err and "listening on" not in out
    for host in ("0.0.0.0", "::"):   # --check judges [admin] host: it is not given sockets
        check = subprocess.run([sys.executable, SERVER, "--check", "--admin-host", host],
                               capture_output=True, text=True, timeout=30,
                               env=environment_without_token())
        assert check.returncode == 1 and "ONEBOX_ADMIN_TOKEN" in check.stderr, check.stderr
    check = subprocess.run([sys.executable, SERVER, "--check", "--admin-host", "127.0.0.2"],
                           capture_output=True, text=True, timeout=30,
                           env=environment_without_token())
    assert check.returncode == 0, check.stderr


def test_a_short_token_is_refused_at_start(tmp_path):
    check = subprocess.run([sys.executable, SERVER, "--check"], capture_output=True, text=True,
                           timeout=30, env=environment_without_token(ONEBOX_ADMIN_TOKEN="short"))
    assert check.returncode == 1 and "at least 16" in check.stderr


def test_off_loopback_with_a_credential_file_starts_and_wants_the_token(tmp_path,
                                                                        server_process):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "admin_token").write_text(TOKEN + "\n")
    process = server_process("--admin-host", "0.0.0.0",
                             env=without_token(CREDENTIALS_DIRECTORY=str(credentials)))
    line = "admin on " + process.admin_url
    admin = re.fullmatch(r"admin on http://0\.0\.0\.0:(\d+)/", line)
    assert admin
    url = "http://127.0.0.1:%s/metrics" % admin.group(1)
    code = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url]
    assert subprocess.run(code, capture_output=True, text=True, timeout=10).stdout == "401"
    authorized = subprocess.run(code + ["-H", "Authorization: Bearer " + TOKEN],
                                capture_output=True, text=True, timeout=10)
    assert authorized.stdout == "200"


def test_a_restart_judges_the_admin_socket_it_hands_over(tmp_path, server_process):
    """The successor (onebox/restart.py) gets the predecessor's admin socket on 0.0.0.0; its
    token is gone (the credential file removed), so it refuses before the hand-over, with the
    reason, and the old server serves on."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "admin_token").write_text(TOKEN)
    process = server_process("--admin-host", "0.0.0.0",
                             env=without_token(CREDENTIALS_DIRECTORY=str(credentials)))
    try:
        port = re.fullmatch(r"admin on http://0\.0\.0\.0:(\d+)/",
                            "admin on " + process.admin_url).group(1)
        (credentials / "admin_token").unlink()
        process.send_signal(signal.SIGUSR2)
        failed = tmp_path / "data" / "restart.failed"   # why the last restart failed
        deadline = time.monotonic() + 30
        while not failed.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        why = failed.read_text()
        assert "exited with status 1" in why, why
        assert "listens on 0.0.0.0 port %s" % port in why and "ONEBOX_ADMIN_TOKEN" in why, why
        connection = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
        connection.request("GET", "/metrics", headers={"Authorization": "Bearer " + TOKEN})
        assert connection.getresponse().status == 200   # the old server, token and all
        connection.close()
    finally:
        code = process.stop(15)
    err = process.err_text()
    assert code == 0 and "Traceback" not in err, err


@pytest.fixture
def token_server(start_server, monkeypatch):
    monkeypatch.setenv("ONEBOX_ADMIN_TOKEN", TOKEN)
    return start_server(config={"admin.host": "0.0.0.0"})


def test_with_a_token_requests_without_it_get_401(token_server):
    status, headers, body = admin_request(token_server, "GET", "/metrics")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert b"onebox_" not in body
    wrong = admin_request(token_server, "GET", "/metrics",
                          headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"})
    assert wrong[0] == 401
    right = admin_request(token_server, "GET", "/metrics",
                          headers={"Authorization": "Bearer " + TOKEN})
    assert right[0] == 200 and b"onebox_build_info" in right[2]
    assert right[1]["content-type"].startswith("text/plain; version=0.0.4")


def test_a_browser_signs_in_with_a_form_and_gets_a_strict_cookie(token_server):
    status, _, page = admin_request(token_server, "GET", "/metrics",
                                    headers={"Accept": "text/html"})
    assert status == 401 and b'<form method=post action=/login>' in page
    port = token_server.admin_socket.getsockname()[1]
    origin = {"Origin": "http://127.0.0.1:%d" % port, "Host": "127.0.0.1:%d" % port,
              "Content-Type": "application/x-www-form-urlencoded"}
    bad = admin_request(token_server, "POST", "/login", body="token=nope", headers=origin)
    assert bad[0] == 401
    status, headers, _ = admin_request(token_server, "POST", "/login",
                                       body="token=" + TOKEN, headers=origin)
    assert status == 303
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    with_cookie = admin_request(token_server, "GET", "/metrics",
                                headers={"Cookie": cookie.split(";")[0]})
    assert with_cookie[0] == 200
    assert "admin: failed login from 127.0.0.1" in token_server.error_text()


def test_actions_need_the_admin_origin(server):
    port = server.admin_socket.getsockname()[1]
    own = "http://127.0.0.1:%d" % port
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site",
                                                        "Origin": own}):
        status, _, _ = admin_request(server, "POST", "/logout", headers=headers)
        assert status == 403, headers
    assert admin_request(server, "POST", "/logout",
                         headers={"Origin": own, "Sec-Fetch-Site": "same-origin"})[0] == 303
    assert admin_request(server, "POST", "/logout")[0] == 303   # curl: not a browser
    errors = server.error_text()
    assert "admin: POST /logout from 127.0.0.1 refused: not from the admin origin" in errors
    assert "admin: POST /logout by 127.0.0.1" in errors
    log = server.access_text()
    assert '"POST /logout HTTP/1.1" 403' in log and log.count(" admin") >= 6


def test_without_a_token_only_loopback_host_names_are_answered(server):
    """DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 sends Host:
    evil.example; it must not read the status. Nor may a name that only starts like a
    loopback address (127.example.org is anyone's to register)."""
    answered = ["localhost", "localhost:1", "LOCALHOST:8001", "127.0.0.1", "127.0.0.1:8001",
                "127.200.3.4:1", "[::1]", "[::1]:8001", "[::ffff:127.0.0.1]:8001"]
    refused = ["evil.example", "127.example.org", "127.example.org:8001", "127.0.0.1.nip.io",
               "localhost.evil.example", "127.999.0.1", "127.1", "[127.0.0.1]", "localhost:",
               "0.0.0.0", "[::]:8001", "10.0.0.1"]
    malformed = ["::1", "localhost:8001:1"]   # not a Host field at all: the parser's 400
    statuses = {host: admin_request(server, "GET", "/metrics", headers={"Host": host})[0]
                for host in answered + refused + malformed}
    expected = dict({host: 200 for host in answered}, **{host: 421 for host in refused})
    assert statuses == dict(expected, **{host: 400 for host in malformed}), statuses


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.255.0.9", True), ("::1", True), ("[::1]", True),
    ("::ffff:127.0.0.1", True), ("localhost", True),             # a dual-stack socket's v4 form
    ("0.0.0.0", False), ("::", False), ("::ffff:10.0.0.1", False), ("192.0.2.7", False),
    ("127.example.org", False), ("127.0.0.1.nip.io", False), ("localhost.example", False),
    ("127.1", False), ("", False)])
def test_loopback_is_parsed_never_a_prefix(host, loopback):
    assert is_loopback(host) is loopback


def handed_over(tmp_path, admin_socket, **config):
    """A server built on a handed-over admin socket (systemd's or a restart's), not bound."""
    settings = dict({"port": 0, "data_dir": str(tmp_path / "data"), "access_log": False},
                    **config)
    loaded = onebox.load_config(None, settings)
    return onebox.OneboxServer(loaded, onebox.Router(onebox.load_routes()),
                               store=onebox.open_store(loaded),
                               listeners={"admin": admin_socket})


def test_a_handed_over_admin_socket_beyond_loopback_needs_a_token(tmp_path, monkeypatch):
    """The socket's own address decides, not [admin] host (127.0.0.1 by default here)."""
    monkeypatch.delenv("ONEBOX_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    handed = socket.create_server(("0.0.0.0", 0))
    port = handed.getsockname()[1]
    with pytest.raises(AdminConfigError) as refused:
        handed_over(tmp_path, handed)
    message = str(refused.value)
    for words in ("0.0.0.0 port %d" % port, "ONEBOX_ADMIN_TOKEN", "admin_token",
                  "127.0.0.1"):
        assert words in message, message
    assert handed.fileno() == -1   # closed with the rest: nothing listens on 0.0.0.0 now
    monkeypatch.setenv("ONEBOX_ADMIN_TOKEN", TOKEN)
    handed = socket.create_server(("0.0.0.0", 0))
    built = handed_over(tmp_path, handed)
    thread = threading.Thread(target=built.serve_forever)
    thread.start()
    try:
        assert admin_request(built, "GET", "/metrics")[0] == 401
        assert admin_request(built, "GET", "/metrics",
                             headers={"Authorization": "Bearer " + TOKEN})[0] == 200
    finally:
        built.shutdown()
        thread.join(30)
        built.server_close()


def test_a_handed_over_loopback_admin_socket_needs_none_whatever_admin_host_says(
        tmp_path, monkeypatch):
    monkeypatch.delenv("ONEBOX_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    built = handed_over(tmp_path, socket.create_server(("127.0.0.1", 0)),
                        **{"admin.host": "0.0.0.0"})
    thread = threading.Thread(target=built.serve_forever)
    thread.start()
    try:
        assert admin_request(built, "GET", "/metrics")[0] == 200
    finally:
        built.shutdown()
        thread.join(30)
        built.server_close()


def test_the_guard_never_limits_or_counts_admin_requests(start_server):
    server = start_server(config={"limits.client_rate_per_s": 0.001, "limits.client_burst": 2})
    for _ in range(6):
        assert admin_request(server, "GET", "/metrics", source="127.0.0.2")[0] == 200
    public = [request_from(server, "/hello", "127.0.0.2") for _ in range(3)]
    assert public == [200, 200, 429]
    assert server.guard.stats()["clients"]["keys"] == 1   # the public requests' client only


def test_unknown_admin_paths_are_plain_404s_not_the_sites_page(server):
    status, _, body = admin_request(server, "GET", "/index.html")
    assert status == 404 and b"<html" not in body.lower()
    assert admin_request(server, "DELETE", "/metrics")[0] == 405


def request_from(server, path, source):
    raw = raw_exchange(server, ("GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                % path).encode(), source=source)
    return status_of(raw)


# --- health ---------------------------------------------------------------------------------

def test_healthz_and_readyz_answer_ok_and_skip_the_guard(start_server):
    server = start_server(config={"limits.client_rate_per_s": 0.001, "limits.client_burst": 2})
    for _ in range(5):
        assert request_from(server, "/healthz", "127.0.0.2") == 200
        assert request_from(server, "/readyz?probe=1", "127.0.0.2") == 200
    assert request(server, "GET", "/healthz")[2] == b"ok\n"
    status, headers, body = request(server, "HEAD", "/readyz")
    assert (status, body, headers["cache-control"]) == (200, b"", "no-store")
    # not one token of the client's burst was spent on them
    assert [request_from(server, "/hello", "127.0.0.2") for _ in range(3)] == [200, 200, 429]
    log = server.access_text()
    assert log.count("GET /healthz") == 1 and log.count("GET /readyz") == 1   # sampled


def test_every_health_check_is_logged_when_asked(start_server):
    server = start_server(config={"health.log_every_s": 0})
    for _ in range(3):
        request(server, "GET", "/healthz")
    assert server.access_text().count('"GET /healthz HTTP/1.1" 200') == 3


def test_health_paths_are_settings(start_server):
    server = start_server(config={"health.live_path": "/live", "health.ready_path": "/ready"})
    assert request(server, "GET", "/live")[0] == 200
    assert request(server, "GET", "/ready")[0] == 200
    assert request(server, "GET", "/healthz")[0] == 404


def test_readyz_is_503_while_not_serving(server):
    assert request(server, "GET", "/readyz")[0] == 200
    server.phase = "reloading"   # what the reload sets while it applies one
    try:
        status, _, body = request(server, "GET", "/readyz")
        assert (status, body) == (503, b"reloading\n")
        assert request(server, "GET", "/healthz")[0] == 200   # alive all the same
    finally:
        server.phase = "serving"
    assert "GET /readyz HTTP/1.1\" 503" in server.access_text()   # failures always logged


def test_healthz_is_503_while_the_worker_pool_is_wedged(wedge):
    server = wedge.server
    assert request(server, "GET", "/healthz")[0] == 200
    with wedge:
        deadline = time.monotonic() + 8
        status, body = None, b""
        while time.monotonic() < deadline:
            status, _, body = request(server, "GET", "/healthz", timeout=5)
            if status == 503:
                break
            time.sleep(0.1)
        assert status == 503 and b"no worker has taken a job" in body
    deadline = time.monotonic() + 4
    while request(server, "GET", "/healthz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert request(server, "GET", "/healthz")[0] == 200
    assert '"GET /healthz HTTP/1.1" 503' in server.access_text()


def test_admin_connections_have_their_own_cap(start_server):
    server = start_server(config={"admin.max_connections": 2})
    port = server.admin_socket.getsockname()[1]
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert status_of(read_until_close(extra)) == 503
        extra.close()
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert admin_request(server, "GET", "/metrics")[0] == 200


def test_a_handed_over_admin_socket_is_served_instead_of_binding(tmp_path):
    """Socket activation names the admin listener "admin" (LISTEN_FDNAMES): it is used as is."""
    handed = socket.create_server(("127.0.0.1", 0))
    config = onebox.load_config(None, {"port": 0, "data_dir": str(tmp_path / "data"),
                                       "admin.port": "off",   # off: only the handed socket
                                       "access_log": False})
    store = onebox.open_store(config)
    built = onebox.OneboxServer(config, onebox.Router(onebox.load_routes()), store=store,
                                listeners={"admin": handed})
    thread = threading.Thread(target=built.serve_forever)
    thread.start()
    try:
        assert built.admin_socket is handed
        assert built.admin_url == "http://127.0.0.1:%d/" % handed.getsockname()[1]
        assert admin_request(built, "GET", "/metrics")[0] == 200
    finally:
        built.shutdown()
        thread.join(30)
        built.server_close()


def test_a_health_check_on_a_kept_connection_is_answered_too(start_server):
    """After another request on the same connection, a worker (not the reactor) sees it."""
    server = start_server(config={"limits.client_rate_per_s": 0.001, "limits.client_burst": 1})
    sock = socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.2", 0))
    try:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = read_until_close(sock)
    finally:
        sock.close()
    assert raw.count(b"HTTP/1.1 200 OK") == 3, raw   # the burst of 1 went on /hello
    assert raw.endswith(b"ready\n") and b"\r\n\r\nok\n" in raw
    assert server.access_text().count("GET /healthz") == 1


def test_an_admin_port_in_use_is_a_clear_error(server_process):
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        process = server_process("--admin-port", str(port), env=without_token(), wait=False)
        code = process.wait(30)
    finally:
        holder.close()
    err = process.err_text()
    assert code == 1 and "Traceback" not in err
    assert "cannot listen on 127.0.0.1 port %d for the admin listener" % port in err, err
    assert "--admin-port 0" in err
