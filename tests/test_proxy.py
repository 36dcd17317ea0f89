"""onebox behind a real nginx on the same machine, with the shipped [limits] (issue 10, item 2).

nginx listens on a free port on 127.0.0.1 and proxies to onebox, setting X-Forwarded-For;
onebox trusts loopback by default, so each client nginx forwards is limited as itself. Clients
are distinct loopback source addresses (127.0.0.10 and up), which nginx names in the header.
CI installs nginx (Debian's nginx-light); without it the test is skipped, saying so.
"""
import collections
import http.client
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from conftest import free_port, onebox

# The shipped [limits] defaults (the fixture otherwise puts the limits out of reach).
DEFAULT_LIMITS = {"limits." + s.name: s.default for s in onebox.SETTINGS["limits"]}

POLITE = ["127.0.0.%d" % n for n in range(10, 42)]   # 32 visitors...
POLITE_RATE_PER_S = 2                                 # ...at 2 requests/s each...
POLITE_SECONDS = 6                                    # ...for this long
FAST = "127.0.0.50"                                   # one client as fast as it can go
FAST_REQUESTS = 400

NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream onebox {{
{servers}        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://onebox;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
{locations}
    }}
}}
"""


def nginx_binary():
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if found is None:
        pytest.skip("nginx is not installed (CI installs Debian's nginx-light: "
                    "apt-get install nginx-light)")
    return found


@pytest.fixture
def nginx(tmp_path):
    """start(upstream_port, locations="") runs nginx in front of it (or, given a list of ports,
    of them all, round-robin), with ``locations`` (more location blocks) after ``location /``;
    returns nginx's port. ``start.error_log()``.
    Stopped at the end of the test."""
    binary = nginx_binary()
    running = []
    directory = tmp_path / "nginx"

    def start(upstream_port, locations=""):
        directory.mkdir()
        ports = upstream_port if isinstance(upstream_port, list) else [upstream_port]
        servers = "".join("        server 127.0.0.1:%d;\n" % each for each in ports)
        # nginx cannot be told port 0 and say which it took: a port free a moment ago, and
        # another if some other process took it meanwhile
        for attempt in range(5):
            port = free_port()
            conf = directory / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=directory, port=port, servers=servers,
                                              locations=locations))
            log = directory / "error.log"
            if log.exists():
                log.unlink()   # this attempt's errors only
            process = subprocess.Popen([binary, "-p", str(directory), "-c", str(conf),
                                        "-e", str(log)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            running.append(process)
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return port
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
            if process.poll() is None:
                raise AssertionError("nginx is not listening after 10 s")
            logged = "%s %s" % (process.stderr.read().decode(errors="replace"),
                                log.read_text() if log.exists() else "")
            if "Address already in use" not in logged:
                raise AssertionError("nginx did not start: " + logged)
        raise AssertionError("nginx found no free port in 5 tries")

    def error_log():
        log = tmp_path / "nginx" / "error.log"
        return log.read_text() if log.exists() else ""

    start.error_log = error_log
    yield start
    for process in running:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()


def visit(port, source, path="/hello"):
    """One request through nginx from ``source`` on a fresh connection; its status (or the
    exception's name, so that a failure is counted, not raised in a thread)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                            source_address=(source, 0))
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException) as error:
        return type(error).__name__
    finally:
        connection.close()


def polite(port, source, results):
    started = time.monotonic()
    codes = []
    for n in range(POLITE_RATE_PER_S * POLITE_SECONDS):
        delay = started + n / POLITE_RATE_PER_S - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        codes.append(visit(port, source))
    results[source] = codes


def hammer(port, results):
    """FAST_REQUESTS back to back on one kept connection, as a load tool would."""
    codes = []
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                            source_address=(FAST, 0))
    try:
        for _ in range(FAST_REQUESTS):
            connection.request("GET", "/hello")
            response = connection.getresponse()
            response.read()
            codes.append(response.status)
    finally:
        connection.close()
    results[FAST] = codes


@pytest.mark.slow
def test_behind_nginx_with_shipped_limits_each_visitor_is_its_own_client(start_server, nginx):
    """32 visitors at 2 requests/s are all served while a fast client among them is limited
    and banned: as itself, not as nginx's 127.0.0.1 (which used to be one client for all)."""
    server = start_server(config=DEFAULT_LIMITS)
    port = nginx(server.port)
    results = {}
    threads = [threading.Thread(target=polite, args=(port, source, results))
               for source in POLITE]
    for thread in threads:
        thread.start()
    time.sleep(1.0)                                     # the visitors are under way
    fast_started = time.monotonic()
    hammer(port, results)
    fast_seconds = time.monotonic() - fast_started
    for thread in threads:
        thread.join(30)
    fast = collections.Counter(results.pop(FAST))
    assert sorted(results) == sorted(POLITE)
    for source, codes in results.items():
        assert codes == [200] * (POLITE_RATE_PER_S * POLITE_SECONDS), (
            source, codes, nginx.error_log(), server.error_text(),
            [line for line in server.access_text().splitlines() if line.startswith(source + " ")])
    print("\nbehind nginx: 32 visitors all 200; the fast client in %.2f s: %s"
          % (fast_seconds, dict(fast)))
    assert fast[429] > 0 and set(fast) <= {200, 429, 403}, fast
    assert fast[200] <= (DEFAULT_LIMITS["limits.route_burst"]            # its /hello bucket
                         + DEFAULT_LIMITS["limits.route_rate_per_s"] * fast_seconds + 1), fast
    assert [key for key, *_ in server.guard.bans()] == [FAST]   # nginx's address never
    access = server.access_text()
    for source in POLITE + [FAST]:
        assert "\n%s - - [" % source in "\n" + access, source   # onebox saw the real client
    assert "trusted proxy but sent no" not in server.error_text()
