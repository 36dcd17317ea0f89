#!/usr/bin/env python3
"""Slow and abusive clients against onebox (and nginx): what a normal client sees meanwhile.

    python3 bench/slow_clients.py [--server PATH/server.py ...] [--nginx]
                                  [--scenario NAME ...] [--seconds 30] [--scale 1]
                                  [--costly-path /hello/echo] [--costly-bytes 1000000]
                                  [--costly-shape lists|note] [--healthz-bytes 58368]
                                  [--nginx-connections 768] [--nginx-only]

Black-box, over loopback only. For each scenario and each server (every ``--server`` given,
default this checkout's server.py, plus Debian's nginx with ``--nginx``) it starts a fresh
server on a free port serving the same small site (a small page and a 10 MiB file), starts the
attackers, then a normal client from 127.0.0.200 asks for the small page once a second for
``--seconds`` (a fresh connection each time; answered means a 200 within 2 s of starting to
connect). One table per scenario, one row per server: answered / asked, the answered probes'
latency (median, p99 by nearest rank, max), what the others got (``status 503 x59``,
``timeout``), the server's threads (/proc/PID/status Threads, summed over its processes) at the
start and the most seen, its RSS (VmRSS) before, at the peak and ``AFTER_S`` after the
attackers closed (memory a process frees need not go back to the OS: that column says how much
did), its open file descriptors (its own side of the connections), and what became of the
attackers (how many held a connection at the end, the closes the server made and the status
lines it sent, the answers a second where attackers read answers, and the peak RSS growth per
attacker connection held at once). Our attackers reopen a closed slot, as a real one would. A
slow reader sees the server's close only once it has read what the kernel still buffers for it,
which at 1 KiB per 10 s is never: for readers, trust the server's descriptors.

Scenarios (our attackers are one thread here with non-blocking raw sockets and epoll, each
from its own loopback addresses; or Debian's slowhttptest in a child process):

    slow-bodies-1    16 POSTs to /hello/echo, Content-Length: 100000, one body byte every 5 s,
                     from 127.0.0.2
    slow-readers-1   16 GETs of the 10 MiB file, SO_RCVBUF 4096 set before connect, reading
                     1 KiB every 10 s, from 127.0.0.3
    slow-bodies-8    128 slow bodies from 127.0.0.10-17
    slow-readers-4   64 slow readers from 127.0.0.20-23
    silent-18x256    18 addresses (127.0.0.30-47) each holding 256 connections that send nothing
    slowhttptest-B   slowhttptest -B (slow body; its defaults: 50 connections, 4096-byte
                     Content-Length, followup every 10 s) at /hello/echo
    slowhttptest-X   slowhttptest -X (slow read; defaults: window 1-512 bytes, 5 bytes a read,
                     every second) at the 10 MiB file
    slowhttptest-H   slowhttptest -H (slowloris headers; defaults) at the small page

and issue 19's, from a security audit:

    body-flood       127.0.1.1-130 x 32 connections, each a POST to /hello/echo with
                     Content-Length: 1048576 sending all but 64 bytes of the body at once, then
                     a byte every 10 s: what buffering bodies costs (watch RSS peak and after)
    rate-keeping-uploads
                     127.0.1.1-130 x 32 POSTs to /hello/echo, Content-Length: 1048576, no body
                     up front, then 300 bytes a second (above onebox's 240 B/s minimum rate):
                     4,160 connections nobody may cut off (the audit: 503 for 59 of 59 tries)
    costly-json      127.0.0.60-63 x 4 kept connections, each POSTing ``--costly-bytes`` of
                     JSON (``lists``: [[],[],...], the costliest shape per byte we found to
                     parse and encode again; ``note``: {"text": escaped emoji}, what
                     /api/notes stores) to ``--costly-path`` back to back, each answer read
                     whole; reports the statuses they got (200 / 400 / 413 / 429)
    healthz-flood    127.0.0.70-77, first run into a ban (onebox runs with
                     ``--limits-client-burst 2 --limits-ban-after-rejections 3``; each sends
                     GETs of /hello until its first 403, fewer than ban_close_after_hits, so
                     its connections are still accepted), then x 4 connections each sending
                     /healthz with 57 KiB of head (``--healthz-bytes``), reading the answer
                     and reconnecting at once; reports the flood's answers a second
    tls-half-handshakes
                     127.0.2.1-25 x 128 connections to the HTTPS listener, each sending the
                     first half of a real ClientHello (made by the ssl module) and then
                     nothing; the normal client asks over HTTPS; reports RSS and the growth
                     per held connection (the per-handshake bytes). The certificate is a
                     throwaway ECDSA P-256 one made with the openssl CLI (bench_tls.py's)

``--scale 0.1`` runs each scenario from a tenth of its addresses (at least one; each address
keeps its connections, so per-address caps meet the same load): for trials on a shared box.

slowhttptest binds no source address, so it comes from 127.0.0.1, which onebox trusts as a
local proxy by default (never capped per client): for those runs onebox starts with
``--limits-trusted-proxies "" --limits-allow-cidrs ""`` so that 127.0.0.1 is an ordinary client.
slowhttptest's own run length (-l) defaults to 240 s; it is given ``-l`` = the run's length.
Every onebox runs with ``--admin-port 0`` (never the fixed 8001).

nginx is Debian's package with Debian's default limits (worker_processes auto, 768
worker_connections, its default timeouts: client_header_timeout and client_body_timeout 60 s
between reads, send_timeout 60 s; client_body_buffer_size 16k on 64-bit, larger bodies go to a
temporary file; client_max_body_size 1m); POST /hello/echo is proxied to a second nginx server
block that answers 200, so nginx reads each body in full before passing it on (proxy request
buffering, its default) as it would for an application. For body-flood and
rate-keeping-uploads it also has ``limit_conn`` 32 per address (onebox's
max_waiting_per_client), for tls-half-handshakes an ssl listener with the same certificate.
Debian's 768 worker_connections (per worker; 1,536 on two cores) are fewer than these scenarios'
connections: ``--nginx-connections 8192`` shows nginx configured for them.
costly-json and healthz-flood have no nginx equivalent (no JSON route, no health checks or bans).

Writes the tables to bench/results/slow_clients.md. Installs nginx-light and slowhttptest with
apt-get when missing (root). Raises RLIMIT_NOFILE for itself and the servers it starts (4,160
attacker sockets here, as many in the server). Linux only (/proc, epoll). Every socket and
process it opens is closed at the end, whatever happens. Never imported by the runtime.
"""
import argparse
import datetime
import math
import os
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "slow_clients.md")
MIB = 1024 * 1024
SMALL_PAGE = "small.html"
BIG_FILE = "10m.bin"
NORMAL_SOURCE = "127.0.0.200"
NORMAL_TIMEOUT_S = 2.0
NOFILE_WANTED = 65536
TICK_S = 0.25
REOPEN_AFTER_S = 1.0        # an attacker slot closed by the server is reopened after this
MAX_OPENS_PER_TICK = 512    # bounds the connect burst of one tick

NGINX_CONF = """\
worker_processes auto;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {work}/tmp;
    proxy_temp_path {work}/tmp;
    fastcgi_temp_path {work}/tmp;
    uwsgi_temp_path {work}/tmp;
    scgi_temp_path {work}/tmp;
{http_extra}    server {{
        listen 127.0.0.1:{port};
{server_extra}        root {site};
        location = /hello/echo {{ proxy_pass http://127.0.0.1:{echo_port}/; }}
    }}
    server {{
        listen 127.0.0.1:{echo_port};
        location / {{ default_type application/json; return 200 '{{"ok":true}}\\n'; }}
    }}
}}
"""
NGINX_LIMIT_CONN = 32       # per address, as onebox's max_waiting_per_client
NGINX_LIMIT_CONN_CONF = ("    limit_conn_zone $binary_remote_addr zone=per_address:10m;\n"
                         "    limit_conn per_address %d;\n" % NGINX_LIMIT_CONN)
NGINX_TLS_CONF = ("        listen 127.0.0.1:{tls_port} ssl;\n"
                  "        ssl_certificate {cert};\n        ssl_certificate_key {key};\n")


# --- scenarios ---------------------------------------------------------------------------------

def addresses(first, count, net="127.0.0"):
    return ["%s.%d" % (net, first + i) for i in range(count)]


class Scenario(object):
    """One attack: ``kind`` (an Attack kind, or "slowhttptest" with ``spec`` its flag) and
    ``spec``, the [(source address, connections)] of our attackers. ``onebox_flags``: what
    onebox runs with for it; ``nginx``: False where nginx has no equivalent (no JSON route, no
    guard); ``limit_conn``: nginx gets ``limit_conn`` NGINX_LIMIT_CONN per address;
    ``tls``: the attack and the normal client go to the HTTPS listener."""

    def __init__(self, kind, spec, onebox_flags=(), nginx=True, limit_conn=False, tls=False):
        self.kind, self.spec, self.onebox_flags = kind, spec, list(onebox_flags)
        self.nginx, self.limit_conn, self.tls = nginx, limit_conn, tls

    def scaled(self, scale):
        """This scenario with round(addresses x scale) of its addresses (at least one), each
        with its connections: a per-address cap meets the same load at any scale."""
        if self.kind == "slowhttptest":
            return self
        keep = max(1, int(round(len(self.spec) * scale)))
        return Scenario(self.kind, self.spec[:keep], self.onebox_flags, self.nginx,
                        self.limit_conn, self.tls)

    def connections(self):
        return sum(count for _, count in self.spec) if self.kind != "slowhttptest" else 0


UNTRUST_LOOPBACK = ["--limits-trusted-proxies", "", "--limits-allow-cidrs", ""]
# healthz-flood: bans come quickly (after 3 429s: a burst of 2 then 20/s refills); a normal
# client asking once a second never meets either
QUICK_BANS = ["--limits-client-burst", "2", "--limits-ban-after-rejections", "3"]

SCENARIOS = {
    "slow-bodies-1": Scenario("body", [("127.0.0.2", 16)]),
    "slow-readers-1": Scenario("reader", [("127.0.0.3", 16)]),
    "slow-bodies-8": Scenario("body", [(a, 16) for a in addresses(10, 8)]),
    "slow-readers-4": Scenario("reader", [(a, 16) for a in addresses(20, 4)]),
    "silent-18x256": Scenario("silent", [(a, 256) for a in addresses(30, 18)]),
    "slowhttptest-B": Scenario("slowhttptest", "-B", UNTRUST_LOOPBACK),
    "slowhttptest-X": Scenario("slowhttptest", "-X", UNTRUST_LOOPBACK),
    "slowhttptest-H": Scenario("slowhttptest", "-H", UNTRUST_LOOPBACK),
    # issue 19's audit
    "body-flood": Scenario("flood", [(a, 32) for a in addresses(1, 130, "127.0.1")],
                           limit_conn=True),
    "rate-keeping-uploads": Scenario("trickle", [(a, 32) for a in addresses(1, 130, "127.0.1")],
                                     limit_conn=True),
    "costly-json": Scenario("costly", [(a, 4) for a in addresses(60, 4)], nginx=False),
    "healthz-flood": Scenario("healthz", [(a, 4) for a in addresses(70, 8)], QUICK_BANS,
                              nginx=False),
    "tls-half-handshakes": Scenario("tls", [(a, 128) for a in addresses(1, 25, "127.0.2")],
                                    tls=True),
}
BODY_INTERVAL_S, BODY_LENGTH = 5.0, 100000
READ_INTERVAL_S, READ_BYTES, READER_RCVBUF = 10.0, 1024, 4096
FLOOD_LENGTH, FLOOD_HELD_BACK, FLOOD_INTERVAL_S = MIB, 64, 10.0
TRICKLE_LENGTH, TRICKLE_BYTES, TRICKLE_INTERVAL_S = MIB, 300, 1.0
SEND_CHUNK = 256 * 1024
FILLER = memoryview(b"x" * MIB)    # every flood body is a view of this one buffer


def post_head(path, length, content_type="application/json"):
    return ("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            "\r\n" % (path, content_type, length)).encode("ascii")


def healthz_head(size):
    """GET /healthz with about ``size`` bytes of head: up to 90 X-Pad header lines (under
    max_header_count) share what the request line and Host leave."""
    first = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    room = size - len(first) - 2
    lines = max(0, min(90, room // 16))
    if not lines:
        return first + b"\r\n"
    pad = room // lines - len(b"X-Pad-00: \r\n")
    return first + b"".join(b"X-Pad-%02d: %s\r\n" % (n, b"a" * pad) for n in range(lines)) + b"\r\n"


def costly_body(shape, size):
    """``size`` bytes of JSON: "lists" is [[],[],...], the costliest shape per byte to parse
    and encode again that we found (an empty list is an object per 3 bytes); "note" is
    {"text": "..."} of escaped emoji (12 bytes of JSON each), what POST /api/notes stores."""
    if shape == "note":
        count = max(1, (size - len('{"text":""}')) // 12)
        return ('{"text":"%s"}' % ("\\ud83d\\ude00" * count)).encode("ascii")
    return ("[" + ",".join(["[]"] * max(1, (size - 1) // 3)) + "]").encode("ascii")


def half_client_hello():
    """The first half of a real TLS ClientHello (from the ssl module, no socket involved)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        hello.do_handshake()
    except ssl.SSLWantReadError:
        pass
    data = outgoing.read()
    return data[:len(data) // 2]


class Slot:
    """One attacker connection; reopened after the server closes it. ``out``: views still to
    send; ``head``/``need``: the answer being read (its head so far, the body bytes to come)."""
    __slots__ = ("source", "sock", "state", "next_at", "closed_at", "out", "head", "need")

    def __init__(self, source):
        self.source, self.sock, self.state = source, None, "idle"
        self.next_at, self.closed_at = 0.0, -REOPEN_AFTER_S
        self.out, self.head, self.need = [], bytearray(), None


class Attack(threading.Thread):
    """Our raw-socket attackers, all on this one thread (epoll, non-blocking sockets). Kinds:

        body     POST head, then a body byte every BODY_INTERVAL_S
        flood    POST head and all but FLOOD_HELD_BACK bytes of a 1 MiB body at once, then a
                 byte every FLOOD_INTERVAL_S
        trickle  POST head (Content-Length 1 MiB), then TRICKLE_BYTES every second
        reader   GET the 10 MiB file, then read 1 KiB every READ_INTERVAL_S
        silent   nothing
        costly   POST ``payload`` (head and body) on a kept connection, read the whole answer,
                 again at once
        healthz  ``payload`` (a 57 KiB /healthz head), read the answer, reconnect at once
        tls      ``payload`` (half a ClientHello) to the HTTPS port, then nothing

    Runs until ``stop()`` or ``deadline``; closes every socket on exit. ``statuses`` counts the
    status lines the server sent (answers, or what it said before closing)."""

    ANSWERED = ("costly", "healthz")   # kinds that read whole answers and go on

    def __init__(self, kind, sources, port, deadline, payload=b""):
        super().__init__(name="attack-" + kind, daemon=True)
        self.kind, self.port, self.deadline = kind, port, deadline
        self.payload = memoryview(payload)
        self.slots = [Slot(source) for source, count in sources for _ in range(count)]
        self.reopen_after_s = 0.0 if kind in self.ANSWERED else REOPEN_AFTER_S
        self.stopping = threading.Event()
        self.epoll = select.epoll()
        self.by_fd = {}
        self.opened = self.closed_by_server = self.refused = self.answers = 0
        self.open_now = self.most_open = 0
        self.started_at = self.ended_at = None
        self.statuses = {}       # status line the server sent -> count

    # -- what the attack thread does ------------------------------------------------------------
    def run(self):
        self.started_at = next_tick = time.monotonic()
        try:
            while not self.stopping.is_set() and time.monotonic() < self.deadline:
                now = time.monotonic()
                if now >= next_tick:
                    self.open_some(now)
                    self.act(now)
                    next_tick = now + TICK_S
                self.handle_events(max(0.0, next_tick - time.monotonic()))
        finally:
            self.ended_at = time.monotonic()
            for slot in self.slots:
                self.drop(slot)
            self.epoll.close()

    def open_some(self, now):
        opened = 0
        for slot in self.slots:
            if slot.state == "idle" and now - slot.closed_at >= self.reopen_after_s:
                self.connect(slot)
                opened += 1
                if opened >= MAX_OPENS_PER_TICK:
                    return

    def connect(self, slot):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if self.kind == "reader":   # before connect: the window is agreed in the handshake
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, READER_RCVBUF)
            sock.bind((slot.source, 0))
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            self.refused += 1
            slot.closed_at = time.monotonic()
            return
        slot.sock, slot.state = sock, "connecting"
        self.by_fd[sock.fileno()] = slot
        self.epoll.register(sock, select.EPOLLOUT | select.EPOLLIN | select.EPOLLRDHUP)

    def handle_events(self, timeout):
        for fd, events in self.epoll.poll(timeout):
            slot = self.by_fd.get(fd)
            if slot is None:
                continue
            if slot.state == "connecting":
                self.connected(slot)
                continue
            if events & select.EPOLLOUT and slot.out:
                self.send_out(slot)
            if slot.sock is None:
                continue
            if self.kind in self.ANSWERED and events & (select.EPOLLIN | select.EPOLLRDHUP):
                self.read_answers(slot)
            elif events & (select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP):
                self.server_closed(slot, self.peek_status(slot))
            elif events & select.EPOLLIN and self.kind != "reader":
                self.server_closed(slot, self.peek_status(slot))   # an answer (408, 503) or EOF

    def connected(self, slot):
        if slot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.refused += 1
            self.drop(slot)
            return
        self.opened += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        slot.state, slot.next_at = "open", time.monotonic()
        slot.out = self.first_bytes()
        self.send_out(slot)

    def first_bytes(self):
        """What a connection sends as soon as it is open: views, sent as the socket takes them."""
        if self.kind == "body":
            return [memoryview(post_head("/hello/echo", BODY_LENGTH))]
        if self.kind == "flood":
            return [memoryview(post_head("/hello/echo", FLOOD_LENGTH)),
                    FILLER[:FLOOD_LENGTH - FLOOD_HELD_BACK]]
        if self.kind == "trickle":
            return [memoryview(post_head("/hello/echo", TRICKLE_LENGTH))]
        if self.kind == "reader":
            return [memoryview(("GET /%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                                % BIG_FILE).encode("ascii"))]
        if self.kind in ("costly", "healthz", "tls"):
            return [self.payload]
        return []

    def send_out(self, slot):
        """Send what the socket takes of ``slot.out``; wait for EPOLLOUT while some is left."""
        try:
            while slot.out:
                sent = slot.sock.send(slot.out[0][:SEND_CHUNK])
                slot.out[0] = slot.out[0][sent:]
                if not len(slot.out[0]):
                    slot.out.pop(0)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.server_closed(slot, None)
            return
        mask = select.EPOLLIN | select.EPOLLRDHUP | (select.EPOLLOUT if slot.out else 0)
        self.epoll.modify(slot.sock, mask)

    def act(self, now):
        """The timed part of each kind: a body byte, a trickle, a slow read."""
        every = {"body": BODY_INTERVAL_S, "flood": FLOOD_INTERVAL_S,
                 "trickle": TRICKLE_INTERVAL_S, "reader": READ_INTERVAL_S}.get(self.kind)
        if every is None:
            return
        for slot in self.slots:
            if slot.state != "open" or now < slot.next_at or slot.out:
                continue
            slot.next_at = now + every
            if self.kind == "reader":
                try:
                    if not slot.sock.recv(READ_BYTES):
                        self.server_closed(slot, None)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self.server_closed(slot, None)
            else:
                slot.out = [FILLER[:TRICKLE_BYTES if self.kind == "trickle" else 1]]
                self.send_out(slot)

    def read_answers(self, slot):
        """Read what the server sent; count each whole answer (by its Content-Length) and send
        the next request (costly), or close and reconnect (healthz) once it is in."""
        try:
            data = slot.sock.recv(SEND_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        view = memoryview(data)
        while True:
            if slot.need is None:   # reading a head
                slot.head += view
                end = slot.head.find(b"\r\n\r\n")
                if end < 0:
                    break
                head, view = bytes(slot.head[:end]), memoryview(bytes(slot.head[end + 4:]))
                slot.head = bytearray()
                self.count_status(head.split(b"\r\n", 1)[0].decode("latin-1")[:40])
                match = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)
                slot.need = int(match.group(1)) if match else 0
            take = min(slot.need, len(view))
            slot.need, view = slot.need - take, view[take:]
            if slot.need:
                break
            slot.need = None
            self.answered(slot)
            if slot.sock is None or not len(view):
                break
        if not data and slot.sock is not None:
            self.server_closed(slot, None)

    def answered(self, slot):
        self.answers += 1
        if self.kind == "costly":
            slot.out = [self.payload]
            self.send_out(slot)
        else:   # healthz: the server closes after the answer; so do we, and go again at once
            self.drop(slot)
            if not self.stopping.is_set():
                self.connect(slot)

    def count_status(self, status):
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def peek_status(self, slot):
        try:
            data = slot.sock.recv(256)
        except OSError:
            return None
        return data.split(b"\r\n", 1)[0].decode("latin-1")[:40] if data else None

    def server_closed(self, slot, status):
        self.closed_by_server += 1
        if status:
            self.count_status(status)
        self.drop(slot)
        if self.kind == "healthz" and not self.stopping.is_set():
            self.connect(slot)   # as fast as it can: closed at accept, it comes right back

    def drop(self, slot):
        if slot.sock is not None:
            self.by_fd.pop(slot.sock.fileno(), None)
            try:
                self.epoll.unregister(slot.sock)
            except (KeyError, ValueError, OSError):
                pass
            slot.sock.close()
            if slot.state == "open":
                self.open_now -= 1
        slot.sock, slot.state, slot.closed_at = None, "idle", time.monotonic()
        slot.out, slot.head, slot.need = [], bytearray(), None

    # -- for the main thread ----------------------------------------------------------------------
    def stop(self):
        self.stopping.set()
        self.join(60)

    def held(self):
        return sum(1 for slot in self.slots if slot.state == "open")

    def summary(self, held):
        text = "%d/%d held, %d closes by server" % (held, len(self.slots), self.closed_by_server)
        if self.refused:
            text += ", %d connects failed" % self.refused
        if self.kind in self.ANSWERED and self.started_at is not None:
            seconds = max(0.001, (self.ended_at or time.monotonic()) - self.started_at)
            text += ", %d answers (%.1f/s)" % (self.answers, self.answers / seconds)
        if self.statuses:
            seen = sorted(self.statuses.items())
            text += " (" + ", ".join("%s x%d" % item for item in seen) + ")"
        return text


class SlowHTTPTest:
    """Debian's slowhttptest in a child process (its own session), output to a file."""

    def __init__(self, flag, url, seconds, work):
        self.log_path = os.path.join(work, "slowhttptest%s.log" % flag)
        argv = ["slowhttptest", flag, "-u", url, "-l", str(int(seconds))]
        if shutil.which("stdbuf"):    # its stdio is fully buffered into a file: lost at SIGTERM
            argv = ["stdbuf", "-oL"] + argv
        self.argv = argv
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self):
        stop_process(self.process)
        self.log.close()

    def held(self):
        return None

    def summary(self, _held):
        with open(self.log_path, errors="replace") as handle:
            text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", handle.read())
        counts = {}
        for name in ("connected", "closed", "error", "pending"):
            found = re.findall(r"\b%s:\s+(\d+)" % name, text)
            if found:
                counts[name] = found[-1]
        available = re.findall(r"service available:\s+(\S+)", text)
        parts = ["%s %s" % item for item in counts.items()]
        if available:
            parts.append("its probe: %s" % available[-1])
        ended = re.findall(r"Exit status:\s*(.+)", text)
        if ended:
            parts.append("ended: %s" % ended[-1].strip())
        return "slowhttptest: " + ", ".join(parts) if parts else "slowhttptest: no status"


# --- the normal client -------------------------------------------------------------------------

def probe(port, results, tls=False):
    """One GET of the small page from NORMAL_SOURCE on a fresh connection (over TLS with
    ``tls``): ("ok", seconds) if a whole 200 arrives within NORMAL_TIMEOUT_S of starting to
    connect, else (what happened, seconds)."""
    started = time.monotonic()
    deadline = started + NORMAL_TIMEOUT_S
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    outcome = "timeout"
    try:
        sock.bind((NORMAL_SOURCE, 0))
        sock.settimeout(NORMAL_TIMEOUT_S)
        sock.connect(("127.0.0.1", port))
        if tls:
            sock = UNVERIFIED.wrap_socket(sock, server_hostname="localhost")
        sock.sendall(("GET /%s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                      % SMALL_PAGE).encode("ascii"))
        data = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if complete_response(data):
                break
        status = data.split(b" ", 2)[1].decode("latin-1") if data.startswith(b"HTTP/") else "-"
        complete = complete_response(data)
        outcome = "ok" if status == "200" and complete else ("status " + status)
    except socket.timeout:
        outcome = "timeout"
    except OSError as error:   # ssl.SSLError included
        outcome = type(error).__name__
    finally:
        sock.close()
    results.append((outcome, time.monotonic() - started))


def unverified_context():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE   # our throwaway cert
    return context


UNVERIFIED = unverified_context()


def complete_response(data):
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return bool(match) and len(body) >= int(match.group(1))


def normal_client(port, seconds, tls=False):
    """Ask once a second (each probe on its own thread, so a hung one does not delay the next);
    returns the list of (outcome, elapsed)."""
    results, threads = [], []
    start = time.monotonic()
    for number in range(int(seconds)):
        delay = start + number - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=probe, args=(port, results, tls), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(NORMAL_TIMEOUT_S + 5)
    return results


def latency(results):
    """'median / p99 / max' in ms of the answered probes (p99 by nearest rank: with 30 probes,
    the slowest)."""
    times = sorted(elapsed for outcome, elapsed in results if outcome == "ok")
    if not times:
        return "-"
    p99 = times[min(len(times) - 1, int(math.ceil(0.99 * len(times))) - 1)]
    return "%.0f / %.0f / %.0f ms" % (statistics.median(times) * 1000, p99 * 1000,
                                      times[-1] * 1000)


# --- servers -----------------------------------------------------------------------------------

def make_site(work):
    site = os.path.join(work, "site")
    os.mkdir(site)
    with open(os.path.join(site, SMALL_PAGE), "w") as handle:
        handle.write("<!doctype html><title>small</title><p>a small page</p>\n")
    with open(os.path.join(site, BIG_FILE), "wb") as handle:
        handle.write(os.urandom(10 * MIB))
    for path in (work, site):   # nginx's workers run as nobody
        os.chmod(path, 0o755)
    for name in (SMALL_PAGE, BIG_FILE):
        os.chmod(os.path.join(site, name), 0o644)
    return site


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One server process (its own session, so its processes can be found and stopped).
    ``ports``: scheme ("http", "https") -> port; None: read from onebox's "listening on" lines,
    one per scheme in ``schemes``."""

    def __init__(self, name, argv, work, ports=None, schemes=("http",)):
        self.name = name
        self.out_path = os.path.join(work, "%s.out" % name)
        self.out = open(self.out_path, "w")
        self.process = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self.ports = ports if ports is not None else self.read_ports(schemes)
        self.port = self.ports["http"]
        self.wait_until_answering()

    def read_ports(self, schemes):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.process.poll() is None:
            with open(self.out_path, errors="replace") as handle:
                found = dict(re.findall(r"listening on (https?)://[^/]+:(\d+)/", handle.read()))
            if all(scheme in found for scheme in schemes):
                return {scheme: int(port) for scheme, port in found.items()}
            time.sleep(0.05)
        raise RuntimeError("%s did not print its address; see %s" % (self.name, self.out_path))

    def wait_until_answering(self):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            results = []
            probe(self.port, results)
            if results[0][0] == "ok":
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("%s does not answer; see %s" % (self.name, self.out_path))

    def stop(self):
        stop_process(self.process)
        self.out.close()


def stop_process(process):
    """SIGTERM the process's own session (it was started with start_new_session), then SIGKILL."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(10)


def session_usage(sid):
    """(threads, RSS bytes, open file descriptors) summed over every process in session
    ``sid``. The descriptors are the server's side of the truth about connections: a slow
    reader does not see its close until it has read what the kernel still holds for it."""
    threads = rss = fds = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                if int(handle.read().rpartition(")")[2].split()[3]) != sid:
                    continue
            with open("/proc/%s/status" % entry) as handle:
                for line in handle:
                    if line.startswith("Threads:"):
                        threads += int(line.split()[1])
                    elif line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
            fds += len(os.listdir("/proc/%s/fd" % entry))
        except (OSError, ValueError, IndexError):
            continue
    return threads, rss, fds


class Sampler(threading.Thread):
    """The most threads, RSS and descriptors seen in a session, every half second until
    stopped."""

    def __init__(self, sid, start):
        super().__init__(name="sampler", daemon=True)
        self.sid, self.stopping = sid, threading.Event()
        self.most = list(start)

    def run(self):
        while not self.stopping.is_set():
            self.most = [max(pair) for pair in zip(self.most, session_usage(self.sid))]
            self.stopping.wait(0.5)

    def stop(self):
        self.stopping.set()
        self.join(10)


def onebox_argv(server_py, site, data_dir, scenario, tls_files):
    argv = [sys.executable, server_py, "--port", "0", "--admin-port", "0", "--data-dir",
            data_dir, "--pages-dir", site] + scenario.onebox_flags
    if scenario.tls:
        argv += ["--tls-port", "0", "--tls-cert-file", tls_files[0],
                 "--tls-key-file", tls_files[1]]
    return argv


def start_server(label, target, site, work, scenario, tls_files, nginx_connections):
    run_dir = tempfile.mkdtemp(prefix="run-", dir=work)
    schemes = ("http", "https") if scenario.tls else ("http",)
    if target == "nginx":
        ports = {"http": free_port(), "https": free_port()}
        os.mkdir(os.path.join(run_dir, "tmp"))
        os.chmod(run_dir, 0o755)
        server_extra = ""
        if scenario.tls:
            server_extra = NGINX_TLS_CONF.format(tls_port=ports["https"], cert=tls_files[0],
                                                 key=tls_files[1])
        conf = os.path.join(run_dir, "nginx.conf")
        with open(conf, "w") as handle:
            handle.write(NGINX_CONF.format(
                work=run_dir, site=site, port=ports["http"], echo_port=free_port(),
                worker_connections=nginx_connections,
                http_extra=NGINX_LIMIT_CONN_CONF if scenario.limit_conn else "",
                server_extra=server_extra))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        return Server(label, [nginx, "-c", conf, "-e", os.path.join(run_dir, "nginx-error.log")],
                      run_dir, ports)
    argv = onebox_argv(target, site, os.path.join(run_dir, "data"), scenario, tls_files)
    return Server(label, argv, run_dir, schemes=schemes)


def ban_first(sources, port):
    """Run each source address into a ban (429s until a 403, QUICK_BANS' limits); returns how
    many got one. Stops at the first 403: the ban has been told once, fewer times than
    ban_close_after_hits, so the address's connections are still accepted."""
    banned = 0
    for source, _ in sources:
        for _ in range(50):
            if fetch_status(source, port, "/hello") == "403":
                banned += 1
                break
    return banned


def fetch_status(source, port, path):
    """The status code of one GET from ``source`` on a fresh connection, or "-"."""
    try:
        with socket.socket() as sock:
            sock.bind((source, 0))
            sock.settimeout(NORMAL_TIMEOUT_S)
            sock.connect(("127.0.0.1", port))
            sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                          % path).encode("ascii"))
            data = sock.recv(256)
    except OSError:
        return "-"
    return data.split(b" ", 2)[1].decode("latin-1") if data.startswith(b"HTTP/") else "-"


def payload_for(scenario, options):
    if scenario.kind == "costly":
        body = costly_body(options.costly_shape, options.costly_bytes)
        return post_head(options.costly_path, len(body)) + body
    if scenario.kind == "healthz":
        return healthz_head(options.healthz_bytes)
    if scenario.kind == "tls":
        return half_client_hello()
    return b""


# --- one run -----------------------------------------------------------------------------------

SETUP_S = 3.0        # attackers connect and start their work before the normal client asks
AFTER_S = 3.0        # after the attackers close, before the RSS "after" is read


def run_one(name, label, target, site, work, options, tls_files):
    """Start a fresh server, attack it, measure the normal client; return the table cells."""
    scenario = SCENARIOS[name].scaled(options.scale)
    server = start_server(label, target, site, work, scenario, tls_files,
                          options.nginx_connections)
    attack = sampler = None
    note = ""
    try:
        start = session_usage(server.process.pid)
        sampler = Sampler(server.process.pid, start)
        sampler.start()
        seconds = options.seconds
        port = server.ports["https" if scenario.tls else "http"]
        if scenario.kind == "slowhttptest":
            path = {"-B": "hello/echo", "-X": BIG_FILE, "-H": SMALL_PAGE}[scenario.spec]
            attack = SlowHTTPTest(scenario.spec, "http://127.0.0.1:%d/%s" % (server.port, path),
                                  seconds + SETUP_S + NORMAL_TIMEOUT_S,
                                  os.path.dirname(server.out_path))
        else:
            if scenario.kind == "healthz" and target != "nginx":
                note = "%d/%d banned first; " % (ban_first(scenario.spec, server.port),
                                                 len(scenario.spec))
            attack = Attack(scenario.kind, scenario.spec, port,
                            time.monotonic() + seconds + SETUP_S + NORMAL_TIMEOUT_S + 5,
                            payload_for(scenario, options))
            attack.start()
        time.sleep(SETUP_S)
        results = normal_client(port, seconds, tls=scenario.tls)
        held, fds_end = attack.held(), session_usage(server.process.pid)[2]
        attack.stop()
        time.sleep(AFTER_S)     # the server sees the closes and frees what it held
        after = session_usage(server.process.pid)
    finally:
        if attack is not None:
            attack.stop()   # again if it was stopped above: stopping twice is harmless
        if sampler is not None:
            sampler.stop()
        server.stop()
    return cells(results, start, sampler.most, after, fds_end, note + attack.summary(held),
                 per_connection(attack, start, sampler.most))


def per_connection(attack, start, most):
    """The peak RSS growth per attacker connection held at once (at most), or ""."""
    held = getattr(attack, "most_open", 0)
    if not held:
        return ""
    return "; RSS growth / most held at once (%d): %.1f KiB" % (
        held, (most[1] - start[1]) / held / 1024.0)


def cells(results, start, most, after, fds_end, attackers, extra):
    answered = sum(1 for outcome, _ in results if outcome == "ok")
    failures = {}
    for outcome, _ in results:
        if outcome != "ok":
            failures[outcome] = failures.get(outcome, 0) + 1
    return {
        "answered": "%d/%d" % (answered, len(results)),
        "latency": latency(results),
        "failures": ", ".join("%s x%d" % item for item in sorted(failures.items())) or "-",
        "threads": "%d -> %d" % (start[0], most[0]),
        "rss": "%.0f -> %.0f -> %.0f" % (start[1] / MIB, most[1] / MIB, after[1] / MIB),
        "fds": "%d -> %d, %d at the end, %d after" % (start[2], most[2], fds_end, after[2]),
        "attackers": attackers + extra,
    }


COLUMNS = ("server", "normal client: 200 within 2 s", "latency median / p99 / max",
           "other outcomes", "threads start -> max", "RSS MiB before -> peak -> after",
           "server fds start -> max", "attackers at the end")
HEADER = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def row(label, cells):
    return "| %s | %s | %s | %s | %s | %s | %s | %s |" % (
        label, cells["answered"], cells["latency"], cells["failures"], cells["threads"],
        cells["rss"], cells["fds"], cells["attackers"])


def title(name, options):
    scenario = SCENARIOS[name].scaled(options.scale)
    text = "### %s" % name
    if scenario.kind != "slowhttptest":
        count = len(scenario.spec)
        text += " (%d address%s, %d connections)" % (count, "" if count == 1 else "es",
                                                     scenario.connections())
    if scenario.kind == "costly":
        text += ": %s %s JSON of %d bytes to %s" % (
            options.costly_shape, "array" if options.costly_shape == "lists" else "object",
            options.costly_bytes, options.costly_path)
    return text


# --- setup and the whole run -------------------------------------------------------------------

def ensure_tools(need_nginx, need_slowhttptest):
    missing = []
    if need_nginx and not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        missing.append("nginx-light")
    if need_slowhttptest and not shutil.which("slowhttptest"):
        missing.append("slowhttptest")
    if missing:
        print("installing %s with apt-get ..." % " ".join(missing), file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq"] + missing, check=True,
                       stdout=subprocess.DEVNULL, env=env)


def raise_nofile():
    """silent-18x256 holds 4,608 sockets here and as many in the server (which inherits this)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, NOFILE_WANTED)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def describe(path):
    """'path (commit abc1234)' when the file is in a git checkout, else the path."""
    try:
        commit = subprocess.run(["git", "-C", os.path.dirname(path), "rev-parse", "--short",
                                 "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "-C", os.path.dirname(path), "status", "--porcelain",
                                    "--untracked-files=no"], capture_output=True, text=True,
                                   timeout=10).stdout.strip()
            return "%s (commit %s%s)" % (path, commit.stdout.strip(),
                                         " with uncommitted changes" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return path


def on_sigterm(signum, frame):
    raise SystemExit(128 + signum)   # run the finally blocks: sockets and children go


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", action="append", default=[],
                        help="a onebox server.py to run (repeat for several; default: this one)")
    parser.add_argument("--nginx", action="store_true", help="also run Debian's nginx")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="run only this scenario (repeatable; default: all)")
    parser.add_argument("--seconds", type=int, default=30,
                        help="how long the normal client asks, once a second (default 30)")
    parser.add_argument("--healthz-bytes", type=int, default=57 * 1024,
                        help="head size of healthz-flood's requests (default 58368: 57 KiB, "
                             "under max_head_bytes)")
    parser.add_argument("--nginx-only", action="store_true",
                        help="run nginx alone (no onebox), e.g. with --nginx-connections")
    parser.add_argument("--nginx-connections", type=int, default=768,
                        help="nginx's worker_connections (default 768, Debian's)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="run each scenario from this share of its addresses (at least "
                             "one; each keeps its connections): 0.1 for a small trial")
    parser.add_argument("--costly-path", default="/hello/echo",
                        help="where costly-json posts (default /hello/echo)")
    parser.add_argument("--costly-bytes", type=int, default=1000000,
                        help="size of costly-json's body (default 1000000)")
    parser.add_argument("--costly-shape", choices=("lists", "note"), default="lists",
                        help="costly-json's body: [[],[],...] or {\"text\": escaped emoji}")
    parser.add_argument("--output", default=RESULTS, help="markdown file written at the end")
    args = parser.parse_args()
    if args.seconds < 1:
        parser.error("--seconds must be at least 1")
    if not 0 < args.scale <= 1:
        parser.error("--scale must be more than 0 and at most 1")
    if args.nginx_connections < 16:
        parser.error("--nginx-connections must be at least 16")
    if args.costly_bytes < 2:
        parser.error("--costly-bytes must be at least 2")
    names = args.scenario or list(SCENARIOS)
    paths = [os.path.abspath(path) for path in args.server] or [os.path.join(ROOT, "server.py")]
    if args.nginx_only:
        paths, args.nginx = [], True
    targets = [("onebox-%d" % number if len(paths) > 1 else "onebox", path)
               for number, path in enumerate(paths)]
    if args.nginx:
        targets.append(("nginx", "nginx"))
    ensure_tools(args.nginx, any(SCENARIOS[name].kind == "slowhttptest" for name in names))
    nofile = raise_nofile()
    signal.signal(signal.SIGTERM, on_sigterm)
    legend = ["- %s = %s" % (label, describe(path) if path != "nginx" else
                              "Debian's nginx (worker_processes auto, %d worker_connections)"
                              % args.nginx_connections)
              for label, path in targets]
    print("\n".join(legend))
    print("RLIMIT_NOFILE %d; scale %g; normal client from %s asks for /%s once a second for %d s"
          % (nofile, args.scale, NORMAL_SOURCE, SMALL_PAGE, args.seconds), flush=True)
    tables = []
    work = tempfile.mkdtemp(prefix="onebox-slow-")
    try:
        site = make_site(work)
        tls_files = None
        if any(SCENARIOS[name].tls for name in names):
            from bench_tls import make_certificate   # the openssl CLI, as bench_tls.py runs it
            tls_files = make_certificate(work)
        for name in names:
            lines = [title(name, args), "", HEADER]
            print("\n" + "\n".join(lines), flush=True)
            for label, target in targets:
                if target == "nginx" and not SCENARIOS[name].nginx:
                    continue
                lines.append(row(label, run_one(name, label, target, site, work, args,
                                                tls_files)))
                print(lines[-1], flush=True)
            if args.nginx and not SCENARIOS[name].nginx:
                lines.append("\nnginx: no equivalent (%s)." % NO_NGINX[SCENARIOS[name].kind])
                print(lines[-1], flush=True)
            tables.append("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(args, legend, tables)


NO_NGINX = {"costly": "it has no JSON route to parse; its proxy would pass the cost on",
            "healthz": "it has no health checks or bans of its own"}


def write_results(args, legend, tables):
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        command = " ".join(["python3", "bench/slow_clients.py"] + sys.argv[1:])
        handle.write("# Slow clients\n\n`%s` on %s (UTC), %d CPUs.\n\n"
                     % (command, when, os.cpu_count()))
        handle.write("\n".join(legend) + "\n\n")
        handle.write("A normal client from %s asks for a small page once a second for %d s "
                     "(fresh connection, 2 s timeout; over HTTPS in tls-half-handshakes). "
                     "Scale %g. Scenarios and what onebox runs with for each: see the "
                     "docstring of bench/slow_clients.py. Threads and RSS are summed over the "
                     "server's processes.\n\n" % (NORMAL_SOURCE, args.seconds, args.scale))
        handle.write("\n\n".join(tables) + "\n")
    print("wrote %s" % args.output)


if __name__ == "__main__":
    main()
