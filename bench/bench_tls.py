#!/usr/bin/env python3
"""HTTPS against plain HTTP, onebox against nginx, in one run (issue 15).

    python3 bench/bench_tls.py [--rounds 3] [--seconds 3] [--connections 16] [--idle 2000]

One onebox process serves both listeners (plain and TLS), one nginx both of its own, from the
same directory (bench_static.py's 1 KiB and 10 MiB files) with the same certificate (ECDSA
P-256, made here with the openssl CLI) and the same protocol settings (TLS 1.2 and 1.3,
onebox/tls.py's TLS 1.2 ciphers, server order, no session tickets). Servers are pinned to one
CPU and wrk (keep-alive, one thread) to the other, as in bench_static.py. Per round, for each
server and scheme: /hello (nginx: a `return 200` of the same body), the 1 KiB file and the
10 MiB file: req/s, and for the 10 MiB file the server's CPU seconds per MiB. At the end the
medians and the ratios: onebox HTTPS / onebox HTTP (the target: hello >= 0.8x) and onebox /
nginx per scheme.

Then the memory of idle connections: ``--idle`` kept-alive connections (one request served on
each, then left open) over HTTPS, then over HTTP, and onebox's RSS growth per connection.

Never imported by the runtime. Needs Linux (taskset, /proc), wrk and nginx (installed with
apt-get if missing, as bench_static.py does), and the openssl CLI.
"""
import argparse
import os
import re
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_static as static  # noqa: E402
from onebox.tls import CIPHERS_TLS12  # noqa: E402

MIB = 1024 * 1024
SERVER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "server.py")

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    default_type application/octet-stream;
    client_body_temp_path {work}/tmp;
    proxy_temp_path {work}/tmp;
    fastcgi_temp_path {work}/tmp;
    uwsgi_temp_path {work}/tmp;
    scgi_temp_path {work}/tmp;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {ciphers};
    ssl_prefer_server_ciphers on;
    ssl_session_tickets off;
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        root {site};
        location = /hello {{ default_type text/plain; return 200 "hello, world\\n"; }}
    }}
}}
"""

TARGETS = (("hello", "hello", 13), ("1 KiB", static.FILES[0][1], 1024),
           ("10 MiB", static.FILES[1][1], 10 * MIB))


def make_certificate(work):
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "30", "-keyout", key, "-out",
                    cert, "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True,
                   capture_output=True)
    os.chmod(key, 0o644)   # nginx's master reads it as root; a bench's throwaway key
    return cert, key


def start_onebox(site, work, cert, key):
    argv = ["taskset", "-c", static.SERVER_CPU, sys.executable, SERVER, "--port", "0",
            "--tls-port", "0", "--tls-cert-file", cert, "--tls-key-file", key,
            "--pages-dir", site, "--access-log", "off", "--data-dir",
            os.path.join(work, "data"), "--limits-client-rate-per-s", "1e9",
            "--limits-client-burst", "1000000000", "--limits-route-rate-per-s", "1e9",
            "--limits-route-burst", "1000000000", "--limits-trusted-proxies", "",
            "--limits-allow-cidrs", "", "--max-workers-per-client", "1000000",
            "--max-connections-per-ip", "100000", "--max-connections", "100000",
            "--keepalive-timeout-s", "120", "--admin-port", "off"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    urls = {}
    for _ in range(2):
        line = process.stdout.readline()
        match = re.search(r"listening on ((https?)://\S+)", line)
        if not match:
            process.kill()
            raise SystemExit("onebox did not start: %r %s" % (line, process.stderr.read()))
        urls[match.group(2)] = match.group(1)
    return process, urls


def wait_for(url, context):
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(url + "hello", timeout=1, context=context).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("nothing answers at %s" % url)
            time.sleep(0.05)


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def idle_connections(port, count, context):
    """``count`` kept-alive connections, one request served on each; the list of sockets."""
    opened = []
    request = b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n"
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="localhost")
        sock.sendall(request)
        answer = b""
        while b"hello, world\n" not in answer:
            data = sock.recv(4096)
            if not data:
                raise SystemExit("a connection was closed while opening %d" % count)
            answer += data
        opened.append(sock)
    return opened


def idle_cost(pid, port, count, context):
    """RSS growth per kept-alive connection, in bytes."""
    time.sleep(0.5)
    before = rss_kib(pid)
    opened = idle_connections(port, count, context)
    time.sleep(1.0)
    after = rss_kib(pid)
    for sock in opened:
        sock.close()
    time.sleep(1.0)
    return (after - before) * 1024 / count


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="0: idle connections only")
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--idle", type=int, default=2000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20000)), hard))
    nginx = static.ensure_tools()
    work = tempfile.mkdtemp(prefix="onebox-tls-")
    os.chmod(work, 0o755)
    running = []
    rows = []
    try:
        site = static.make_site(work)
        os.mkdir(os.path.join(work, "tmp"))
        cert, key = make_certificate(work)
        context = ssl.create_default_context(cafile=cert)
        onebox, urls = start_onebox(site, work, cert, key)
        running.append(onebox)
        port, tls_port = static.free_port(), static.free_port()
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as handle:
            handle.write(NGINX_CONF.format(work=work, site=site, port=port, tls_port=tls_port,
                                           cert=cert, key=key, ciphers=CIPHERS_TLS12))
        process = subprocess.Popen(["taskset", "-c", static.SERVER_CPU, nginx, "-c", conf,
                                    "-e", os.path.join(work, "error.log")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        running.append(process)
        servers = [("onebox", "http", onebox, urls["http"]),
                   ("onebox", "https", onebox, urls["https"].replace("127.0.0.1", "localhost")),
                   ("nginx", "http", process, "http://127.0.0.1:%d/" % port),
                   ("nginx", "https", process, "https://localhost:%d/" % tls_port)]
        for _, _, _, url in servers:
            wait_for(url, context)
        for round_number in range(1, args.rounds + 1):
            for label, path, size in TARGETS:
                for name, scheme, server, url in servers:
                    static.wrk(url + path, 1, args.connections)   # warm-up
                    before = static.cpu_seconds(server.pid)
                    requests, elapsed, errors = static.wrk(url + path, args.seconds,
                                                           args.connections)
                    cpu = static.cpu_seconds(server.pid) - before
                    mib = requests * size / MIB
                    row = dict(server=name, scheme=scheme, target=label, round=round_number,
                               rps=requests / elapsed, cpu_us=cpu * 1e6 / requests,
                               cpu_ms_per_mib=1000 * cpu / mib, errors=errors)
                    rows.append(row)
                    print("round %d %-6s %-5s %-6s %8.0f req/s %7.0f us CPU/req %7.2f ms "
                          "CPU/MiB %s" % (round_number, name, scheme, label, row["rps"],
                                          row["cpu_us"], row["cpu_ms_per_mib"], errors),
                          flush=True)
        idle = {}
        if args.idle:
            # plain first: memory the TLS connections freed would otherwise be reused, and
            # the plain figure come out near zero
            for scheme, idle_port, idle_context in (
                    ("http", int(urls["http"].rstrip("/").rsplit(":", 1)[1]), None),
                    ("https", int(urls["https"].rstrip("/").rsplit(":", 1)[1]), context)):
                idle[scheme] = idle_cost(onebox.pid, idle_port, args.idle, idle_context)
                print("idle %-5s %d connections: %.0f bytes/connection (onebox RSS growth)"
                      % (scheme, args.idle, idle[scheme]), flush=True)
    finally:
        for process in running:
            static.stop(process)
        shutil.rmtree(work, ignore_errors=True)
    summarize(rows, idle, args)


def summarize(rows, idle, args):
    def med(name, scheme, target, measure):
        return statistics.median(row[measure] for row in rows if (row["server"], row["scheme"],
                                 row["target"]) == (name, scheme, target))
    print()
    if not rows:   # --rounds 0: the idle connections only
        if idle:
            print("idle kept-alive connections (%d): https %.0f, http %.0f bytes/connection"
                  % (args.idle, idle["https"], idle["http"]))
        return
    print("medians of %d rounds, wrk -t1 -c%d, %d s each (server and wrk pinned apart)"
          % (args.rounds, args.connections, args.seconds))
    print("%-7s %-6s %10s %10s %12s" % ("target", "server", "http req/s", "https req/s",
                                        "https/http"))
    for label, _, _ in TARGETS:
        for name in ("onebox", "nginx"):
            plain, tls = med(name, "http", label, "rps"), med(name, "https", label, "rps")
            print("%-7s %-6s %10.0f %10.0f %11.2fx" % (label, name, plain, tls, tls / plain))
    print("10 MiB CPU ms/MiB: onebox http %.2f, https %.2f; nginx http %.2f, https %.2f"
          % tuple(med(name, scheme, "10 MiB", "cpu_ms_per_mib")
                  for name in ("onebox", "nginx") for scheme in ("http", "https")))
    for label, _, _ in TARGETS:
        print("%-7s onebox/nginx req/s: http %.2fx, https %.2fx" % (
            label, med("onebox", "http", label, "rps") / med("nginx", "http", label, "rps"),
            med("onebox", "https", label, "rps") / med("nginx", "https", label, "rps")))
    if idle:
        print("idle kept-alive connections (%d): https %.0f, http %.0f bytes/connection"
              % (args.idle, idle["https"], idle["http"]))


if __name__ == "__main__":
    main()
