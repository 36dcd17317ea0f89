#!/usr/bin/env python3
"""Live events at scale (issue 22): N subscribers on one server, what each costs, how fast one
event reaches them all, and what a normal client sees meanwhile.

    python3 bench/bench_events.py [--subscribers 1000 --subscribers 10000] [--rounds 5]
                                  [--per-address 16] [--server PATH/server.py]
                                  [--path /api/notes/events] [--wait-s 10]
                                  [--server-flag ARG ...]

Black-box, over loopback only. For each N two fresh servers run with the same flags, one after
the other, so that neither inherits memory the other freed (a Python process seldom gives freed
memory back to the OS, and a second set of connections would reuse it and look cheap):

1. the baseline server gets N idle kept-alive connections (each sends one ``GET /hello``, reads
   the answer and keeps the connection);
2. the measured server gets N subscribers (``GET --path``, read until the head and the
   ``retry:`` line arrived).

Both come from many loopback addresses (127.1.x.y, ``--per-address`` connections each, at most
``[events] max_subscribers_per_client``: the runtime refuses more with 429), never 127.0.0.1,
which onebox trusts as a local proxy. Per server: its threads and RSS (/proc/PID/status) before
and with the N held, so the RSS per connection of each kind and their difference. Then
``--rounds`` rounds on each server, each round two ``POST /api/notes`` (a note whose text is a
fresh marker, from 127.0.0.1):

- a quiet one: the server's CPU time (/proc/PID/stat utime + stime) from the POST to one second
  after it, or to the last arrival if later, next to the second before it (heartbeats, timers);
- one during which a normal client (a child process, so that it does not share this loop's
  GIL) sends ``GET /hello`` back to back on one kept connection from 1 s before the POST to 1 s
  after it: its latency (p50, p99 by nearest rank, max).

For each POST: when its answer came, and when each subscriber's socket got the ``event:
created`` frame holding the marker, from the POST's first byte sent, two ways: the kernel's
receive timestamp (SO_TIMESTAMPNS, CLOCK_REALTIME, what the server delivered, free of this
loop's own lag) and when this loop read it; how many of N got it within ``--wait-s``. On the
baseline server the same POSTs reach no one: they are the baseline for the POST's answer, the
CPU and the normal client. Each server also gets one 2 s window of the normal client with no
POST at all. The threads and RSS are sampled every 0.25 s throughout: the most seen is shown.

The client side is this one thread: non-blocking sockets and epoll, at most CONNECT_WINDOW
connections being set up at once (the server's listen backlog is 1024). RLIMIT_NOFILE is raised
for this process and the servers it starts (which inherit it) to N + NOFILE_SPARE; past the
hard limit that needs CAP_SYS_RESOURCE (a container's root may lack it: 100,000 then needs the
hard limit raised outside, e.g. ``prlimit`` or the container's nofile). On a shared 2-core
box the server, this loop and the normal client share two cores: the figures include that
contention.

Prints the tables and writes them to bench/results/events.md. Linux only (/proc, epoll,
SO_TIMESTAMPNS). Every socket and process it opens is closed at the end, whatever happens.
Never imported by the runtime.
"""
import argparse
import datetime
import errno
import http.client
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "events.md")
NORMAL_HOST = "127.0.0.1"
CONNECT_WINDOW = 256        # connections being set up at once: under the listen backlog (1024)
NOFILE_SPARE = 1024         # descriptors beyond the N connections: the probe, files, epoll
SETTLE_S = 0.5              # after the last connection is set up, before its RSS is read
SAMPLE_EVERY_S = 0.25
PROBE_WINDOW_S = 2.0        # the normal client runs from 1 s before the POST to 1 s after
CPU_WINDOW_S = 1.0
GAP_S = 0.5                 # between one POST's last arrival and the next step
# Linux's SO_TIMESTAMPNS (asm-generic/socket.h; x86 and arm use it; the cmsg type is the same
# number): the kernel stamps each received segment with CLOCK_REALTIME (socket(7)).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("@qq")
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)   # ip(7): the port is
                            # picked at connect, per destination: 100,000 sources need no bind
READ_BYTES = 65536
ANC_BYTES = socket.CMSG_SPACE(TIMESPEC.size)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the server ------------------------------------------------------------------------------

class Server:
    """One ``python3 server.py`` in its own session and data dir; ``port`` read from its
    "listening on" line. ``usage()``: (threads, RSS bytes, CPU seconds, open descriptors)."""

    def __init__(self, server_py, flags, work, name):
        self.data_dir = tempfile.mkdtemp(prefix=name + "-", dir=work)
        self.out_path = os.path.join(work, name + ".out")
        self.argv = [sys.executable, server_py, "--port", "0", "--admin-port", "0",
                     "--data-dir", self.data_dir] + flags
        self.out = open(self.out_path, "w")
        self.process = subprocess.Popen(self.argv, cwd=os.path.dirname(server_py),
                                        stdout=self.out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self.port = self.read_port()

    def read_port(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            with open(self.out_path, errors="replace") as handle:
                found = re.search(r"listening on http://[^/]+:(\d+)/", handle.read())
            if found:
                return int(found.group(1))
            time.sleep(0.05)
        raise RuntimeError("the server did not print its address; see %s" % self.out_path)

    def usage(self, descriptors=True):
        pid = self.process.pid
        threads = rss = 0
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith("Threads:"):
                    threads = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rpartition(")")[2].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK   # utime, stime (proc(5) 14, 15)
        # listing 10,000 descriptors takes milliseconds: not in the loop's samples
        return threads, rss, cpu, len(os.listdir("/proc/%d/fd" % pid)) if descriptors else 0

    def alive(self):
        return self.process.poll() is None

    def stop(self):
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
            except ProcessLookupError:
                pass
        self.out.close()

    def complaints(self):
        """The server's output lines that are not access lines: tracebacks, warnings, cuts."""
        with open(self.out_path, errors="replace") as handle:
            return [line.rstrip("\n") for line in handle
                    if not re.match(r"\S+ \S+ \S+ \[", line) and "listening on" not in line
                    and "admin on" not in line]


def server_supports(server_py, flag):
    """Whether ``server.py --help`` lists ``flag`` (the [events] flags come with the runtime)."""
    shown = subprocess.run([sys.executable, server_py, "--help"], capture_output=True,
                           text=True, timeout=60, cwd=os.path.dirname(server_py)).stdout
    return flag in shown


# --- the client loop: every connection on this one thread ------------------------------------

def source_address(number, per_address):
    """The loopback address of connection ``number``: ``per_address`` each, from 127.1.0.1 on
    (127.0.0.0/24 is left alone: 127.0.0.1 is trusted, the normal client uses it)."""
    n = number // per_address
    return "127.1.%d.%d" % (n // 250, n % 250 + 1)


class Conn:
    """One connection: ``kind`` "idle" (a kept-alive GET /hello), "sub" (a subscriber) or
    "post"; ``state`` "connecting", "head" (the answer's head being read), "open" (idle, or a
    subscriber streaming) or "closed"."""
    __slots__ = ("sock", "kind", "state", "buf", "status", "need", "answered_at")

    def __init__(self, sock, kind):
        self.sock, self.kind, self.state = sock, kind, "connecting"
        self.buf, self.status, self.need, self.answered_at = bytearray(), None, None, None


class Loop:
    """The epoll loop. ``open(kind, count)`` sets up connections CONNECT_WINDOW at a time;
    ``marker`` (bytes) is the note text the subscribers are waiting for, and ``arrivals`` the
    (kernel time, read time) each subscriber got it at, by descriptor."""

    def __init__(self, port, path, per_address, server):
        self.port, self.path, self.per_address, self.server = port, path, per_address, server
        self.epoll = select.epoll()
        self.conns = {}             # fd -> Conn
        self.setting_up = 0
        self.statuses = {}          # status line of a refusal (or errno name) -> count
        self.closed_by_server = 0
        self.marker, self.arrivals = None, {}
        self.most_threads = self.most_rss = 0
        self.next_sample = 0.0

    # -- what the loop does ----------------------------------------------------------------
    def run(self, until=None, seconds=None):
        """Serve events until ``until()`` is true or ``seconds`` have passed."""
        deadline = time.monotonic() + (seconds if seconds is not None else 3600)
        while True:
            now = time.monotonic()
            if now >= deadline or (until is not None and until()):
                return
            if now >= self.next_sample:
                self.sample()
                self.next_sample = now + SAMPLE_EVERY_S
            for fd, events in self.epoll.poll(min(0.05, deadline - now)):
                conn = self.conns.get(fd)
                if conn is not None:
                    self.ready(conn, events)

    def sample(self):
        if not self.server.alive():
            raise RuntimeError("the server exited (code %s); see %s"
                               % (self.server.process.returncode, self.server.out_path))
        threads, rss, _, _ = self.server.usage(descriptors=False)
        self.most_threads = max(self.most_threads, threads)
        self.most_rss = max(self.most_rss, rss)

    def open(self, kind, count):
        """Open ``count`` connections of ``kind``; returns (how many are open, seconds)."""
        started, queued = time.monotonic(), list(range(count))
        queued.reverse()
        while queued or self.setting_up:
            while queued and self.setting_up < CONNECT_WINDOW:
                self.connect(kind, source_address(queued.pop(), self.per_address))
            self.run(seconds=0.05)
        return self.count(kind), time.monotonic() - started

    def count(self, kind, state="open"):
        return sum(1 for conn in self.conns.values() if conn.kind == kind and conn.state == state)

    def connect(self, kind, source):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            sock.setblocking(False)
            if kind == "sub":
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            code = sock.connect_ex(("127.0.0.1", self.port))
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
        except OSError as error:
            sock.close()
            self.count_status(errno.errorcode.get(error.errno, str(error)))
            return
        self.conns[sock.fileno()] = Conn(sock, kind)
        self.setting_up += 1
        self.epoll.register(sock, select.EPOLLOUT)

    def post(self, text):
        """Send POST /api/notes now (from the normal client's address); returns its Conn."""
        body = json.dumps({"text": text}).encode("utf-8")
        sock = socket.create_connection((NORMAL_HOST, self.port), timeout=5)
        sock.setblocking(False)
        conn = Conn(sock, "post")
        conn.state = "head"
        self.conns[sock.fileno()] = conn
        self.epoll.register(sock, select.EPOLLIN | select.EPOLLRDHUP)
        sock.sendall(b"POST /api/notes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return conn

    # -- one connection's events -----------------------------------------------------------
    def ready(self, conn, events):
        if conn.state == "connecting":
            self.connected(conn)
        elif conn.kind == "sub" and conn.state == "open":
            self.read_events(conn)
        else:
            self.read_answer(conn)

    def connected(self, conn):
        code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.count_status(errno.errorcode.get(code, str(code)))
            self.close(conn)
            return
        path = self.path if conn.kind == "sub" else "/hello"
        conn.sock.send(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode("ascii"))
        conn.state = "head"
        self.epoll.modify(conn.sock, select.EPOLLIN | select.EPOLLRDHUP)

    def read_answer(self, conn):
        """The head of an answer; then its body (by Content-Length), or for a subscriber the
        ``retry:`` line: the connection is then set up."""
        data = self.recv(conn)
        if data is None:
            return
        conn.buf += data
        if conn.status is None:
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(conn.buf[:end]).decode("latin-1")
            conn.status = head.split("\r\n", 1)[0]
            length = re.search(r"(?im)^content-length:\s*(\d+)", head)
            conn.need = int(length.group(1)) if length else None
            del conn.buf[:end + 4]
            if " 200 " not in conn.status + " " and " 201 " not in conn.status + " ":
                if conn.kind != "post":
                    self.count_status(conn.status)
                self.close(conn, by_server=False)
                return
        if conn.kind == "sub":
            if b"\n\n" in conn.buf and b"retry:" in conn.buf:
                del conn.buf[:conn.buf.rfind(b"\n\n") + 2]
                self.set_up(conn)
        elif conn.need is not None and len(conn.buf) >= conn.need:
            conn.buf.clear()
            conn.answered_at = time.time()
            if conn.kind == "post":
                self.close(conn, by_server=False)
            else:
                self.set_up(conn)

    def set_up(self, conn):
        conn.state = "open"
        self.setting_up -= 1

    def read_events(self, conn):
        """Frames end with a blank line (WHATWG HTML, "Server-sent events", 9.2.6): the one
        holding the marker after ``event: created`` is this round's arrival."""
        data = self.recv(conn, stamp=True)
        if data is None:
            return
        data, kernel_at = data
        conn.buf += data
        end = conn.buf.rfind(b"\n\n")
        if end < 0:
            return
        frames = bytes(conn.buf[:end])
        del conn.buf[:end + 2]
        marker = self.marker
        if marker is not None and marker in frames and b"event: created" in frames:
            fd = conn.sock.fileno()
            if fd not in self.arrivals:
                self.arrivals[fd] = (kernel_at, time.time())

    def recv(self, conn, stamp=False):
        """What the socket holds (with the kernel's receive time when ``stamp``), or None once
        it is closed."""
        try:
            if stamp:
                data, ancillary, _, _ = conn.sock.recvmsg(READ_BYTES, ANC_BYTES)
            else:
                data = conn.sock.recv(READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if not data:
            self.close(conn, by_server=True)
            return None
        if not stamp:
            return data
        kernel_at = None
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = TIMESPEC.unpack(raw[:TIMESPEC.size])
                kernel_at = seconds + nanoseconds / 1e9
        return data, kernel_at

    def count_status(self, status):
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def close(self, conn, by_server=False):
        if conn.state in ("connecting", "head") and conn.kind != "post":
            self.setting_up -= 1
        if by_server and conn.kind != "post":
            self.closed_by_server += 1
            if conn.state != "open":
                self.count_status("closed before set up")
        conn.state = "closed"
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self.epoll.unregister(conn.sock)
        except (OSError, ValueError):
            pass
        conn.sock.close()

    def close_all(self):
        for conn in list(self.conns.values()):
            self.close(conn)
        self.epoll.close()


# --- the normal client: a child process ------------------------------------------------------

def probe_main(port):
    """The child: for each "run SECONDS" line on stdin, GET /hello back to back on one kept
    connection for that long, then one JSON line: {"ms": [latencies], "at": [when each was
    sent, time.monotonic(): CLOCK_MONOTONIC, the parent's clock too], "errors": N}."""
    conn = http.client.HTTPConnection(NORMAL_HOST, port, timeout=10)
    for line in sys.stdin:
        if not line.startswith("run "):
            break
        deadline = time.monotonic() + float(line.split()[1])
        latencies, sent, errors = [], [], 0
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                conn.request("GET", "/hello")
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors += 1
                    continue
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                conn = http.client.HTTPConnection(NORMAL_HOST, port, timeout=10)
                continue
            latencies.append((time.monotonic() - started) * 1000)
            sent.append(started)
        sys.stdout.write(json.dumps({"ms": latencies, "at": sent, "errors": errors}) + "\n")
        sys.stdout.flush()
    conn.close()


class Probe:
    """The normal client's process; ``start(seconds)`` begins a window, ``result(since,
    until)`` waits for it: (sorted latencies in ms, errors, sorted latencies of the requests
    under way at some time between the monotonic times ``since`` and ``until``)."""

    def __init__(self, port):
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                         "--probe-port", str(port)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def start(self, seconds):
        self.process.stdin.write("run %g\n" % seconds)
        self.process.stdin.flush()

    def result(self, since=None, until=None):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the normal client exited (code %s)" % self.process.poll())
        answer = json.loads(line)
        during = []
        if since is not None:
            during = sorted(ms for ms, at in zip(answer["ms"], answer["at"])
                            if at <= until and at + ms / 1000 >= since)
        return sorted(answer["ms"]), answer["errors"], during

    def stop(self):
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(10)
        self.process.stdout.close()


# --- one server's measurements ---------------------------------------------------------------

def nearest_rank(ordered, fraction):
    if not ordered:
        return float("nan")
    return ordered[max(0, min(len(ordered) - 1, int(-(-fraction * len(ordered) // 1)) - 1))]


def spread(ordered, scale=1.0):
    """'p50 / p99 / max' of sorted values, times ``scale``."""
    if not ordered:
        return "-"
    return "%.1f / %.1f / %.1f" % (nearest_rank(ordered, 0.5) * scale,
                                   nearest_rank(ordered, 0.99) * scale, ordered[-1] * scale)


def fan_out(loop, server, kind, number, wait_s, probe=None):
    """One POST /api/notes, with the normal client around it when ``probe`` is given. Returns
    a dict of what it measured."""
    marker = "bench-%s-%d-%d" % (kind, number, time.time_ns())
    loop.marker, loop.arrivals = marker.encode("ascii"), {}
    expected = loop.count("sub")
    if probe is not None:
        probe.start(PROBE_WINDOW_S)
        loop.run(seconds=PROBE_WINDOW_S / 2)
    else:
        before = server.usage(False)[2]
        loop.run(seconds=CPU_WINDOW_S)
    cpu_at_post = server.usage(False)[2]
    sent_at = time.time()
    post = loop.post(marker)
    post_started = time.monotonic()
    loop.run(lambda: post.state == "closed" and len(loop.arrivals) >= expected
             and time.monotonic() - post_started >= (PROBE_WINDOW_S / 2 if probe else
                                                     CPU_WINDOW_S), seconds=wait_s)
    window_s = time.monotonic() - post_started
    cpu_after = server.usage(False)[2]
    result = {"expected": expected, "got": len(loop.arrivals),
              "post_ms": (post.answered_at - sent_at) * 1000 if post.answered_at else None,
              "post_status": post.status,
              "kernel": sorted(k - sent_at for k, _ in loop.arrivals.values() if k is not None),
              "read": sorted(r - sent_at for _, r in loop.arrivals.values())}
    if probe is not None:
        # the requests under way while the event went out: a back-to-back client sends
        # one request through a stall, so over the whole window a stall is one sample in
        # thousands (coordinated omission); this is where it shows
        last = max(result["read"] + [(post.answered_at or sent_at) - sent_at])
        result["probe"] = probe.result(post_started, post_started + last)
    else:
        result["cpu_s"], result["window_s"] = cpu_after - cpu_at_post, window_s
        result["background_cpu_per_s"] = (cpu_at_post - before) / CPU_WINDOW_S
    loop.marker = None
    loop.run(seconds=GAP_S)
    return result


def measure(kind, args, count, work, flags):
    """One fresh server with ``count`` connections of ``kind`` ("idle" or "sub") held: its
    usage before and with them, a normal client window with no POST, and the rounds."""
    server = Server(args.server, flags, work, "%s-%d" % (kind, count))
    loop = probe = None
    try:
        time.sleep(SETTLE_S)
        before = server.usage()
        loop = Loop(server.port, args.path, args.per_address, server)
        loop.sample()
        opened, took_s = loop.open(kind, count)
        loop.run(seconds=SETTLE_S)
        held = server.usage()
        probe = Probe(server.port)
        probe.start(PROBE_WINDOW_S)
        loop.run(seconds=PROBE_WINDOW_S)
        quiet_probe = probe.result()
        rounds = []
        for number in range(args.rounds):
            rounds.append((fan_out(loop, server, kind, number, args.wait_s),
                           fan_out(loop, server, kind, number, args.wait_s, probe)))
        after = server.usage()
        return {"kind": kind, "count": count, "opened": opened, "took_s": took_s,
                "before": before, "held": held, "after": after, "still_open": loop.count(kind),
                "most_threads": loop.most_threads, "most_rss": loop.most_rss,
                "statuses": dict(loop.statuses), "closed_by_server": loop.closed_by_server,
                "quiet_probe": quiet_probe, "rounds": rounds, "argv": server.argv}
    finally:
        if probe is not None:
            probe.stop()
        if loop is not None:
            loop.close_all()
        server.stop()
        complaints = server.complaints()
        if complaints:
            print("%s-%d server said (%d lines):\n  %s" % (kind, count, len(complaints),
                                                          "\n  ".join(complaints[:20])))


def server_flags(args, count):
    flags = ["--max-connections", str(count + 256),
             "--keepalive-timeout-s", "3600"]   # the idle baseline outlives the default 30 s
    if args.per_address > 200:
        flags += ["--max-connections-per-ip", str(args.per_address + 56)]
    if args.events_flags:
        flags += ["--events-max-subscribers", str(count + 16),
                  "--events-max-subscribers-per-client", str(args.per_address)]
    return flags + args.server_flag


# --- the report ------------------------------------------------------------------------------

KIB = 1024.0
MIB = 1024.0 * 1024.0


def describe_held(m):
    threads0, rss0 = m["before"][0], m["before"][1]
    threads1, rss1 = m["held"][0], m["held"][1]
    per = (rss1 - rss0) / m["opened"] if m["opened"] else float("nan")
    refused = ", ".join("%s x%d" % pair for pair in sorted(m["statuses"].items())) or "none"
    return {"per": per, "lines": [
        "opened %d of %d in %.1f s (refused or failed: %s); still open at the end: %d, "
        "closed by the server: %d" % (m["opened"], m["count"], m["took_s"], refused,
                                      m["still_open"], m["closed_by_server"]),
        "threads %d before, %d with them held, %d at the end, %d at most"
        % (threads0, threads1, m["after"][0], m["most_threads"]),
        "RSS %.1f MiB before, %.1f MiB held (%.2f KiB per connection), %.1f MiB at the end, "
        "%.1f MiB at most; descriptors %d -> %d" % (rss0 / MIB, rss1 / MIB, per / KIB,
                                                     m["after"][1] / MIB, m["most_rss"] / MIB,
                                                     m["before"][3], m["held"][3]),
    ]}


def round_rows(m):
    rows = []
    for number, (quiet, busy) in enumerate(m["rounds"], 1):
        for label, r in (("quiet", quiet), ("with client", busy)):
            post = "%.1f" % r["post_ms"] if r["post_ms"] is not None else r["post_status"]
            cpu = ("%.0f ms in %.1f s (idle %.0f ms/s)" % (r["cpu_s"] * 1000, r["window_s"],
                                                           r["background_cpu_per_s"] * 1000)
                   if "cpu_s" in r else "")
            normal = during = ""
            if "probe" in r:
                normal = spread(r["probe"][0]) + " (%d, %d errors)" % (
                    len(r["probe"][0]), r["probe"][1])
                during = spread(r["probe"][2]) + " (%d)" % len(r["probe"][2])
            rows.append("| %d %s | %s | %d / %d | %s | %s | %s | %s | %s |" % (
                number, label, post, r["got"], r["expected"], spread(r["kernel"], 1000),
                spread(r["read"], 1000), cpu, normal, during))
    return rows


def collect(rounds, kind, key):
    values = []
    for quiet, busy in rounds:
        r = quiet if kind == "quiet" else busy
        values.extend(r[key] if isinstance(r[key], list) else [r[key]])
    return sorted(values)


def report(count, idle, subs):
    lines = ["", "## N = %d (%d per address)" % (count, subs["per_address"]), ""]
    held = {}
    for m, title in ((idle, "Baseline: %d idle kept-alive connections (GET /hello, kept)"),
                     (subs, "%d subscribers (GET " + subs["path"] + ")")):
        described = describe_held(m)
        held[m["kind"]] = described["per"]
        lines += ["**" + title % count + "**", ""] + ["- " + l for l in described["lines"]]
        lines += ["- normal client, 2 s with no POST: %s ms (%d requests, %d errors)"
                  % (spread(m["quiet_probe"][0]), len(m["quiet_probe"][0]), m["quiet_probe"][1]),
                  "", "| round | POST answered ms | got it | kernel arrival ms p50/p99/max "
                  "| read ms p50/p99/max | server CPU from the POST | normal client ms "
                  "p50/p99/max (requests), 1 s before to 1 s after | the same, only those "
                  "under way from the POST to the last arrival |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += round_rows(m) + [""]
    lines.append("RSS per subscriber minus per idle kept-alive connection: %.2f KiB"
                 % ((held["sub"] - held["idle"]) / KIB))
    return lines, held


def summary_row(count, idle, subs, held):
    def cpu(m):
        values = [q["cpu_s"] - q["background_cpu_per_s"] * q["window_s"] for q, _ in m["rounds"]]
        return "%.0f" % (sorted(values)[len(values) // 2] * 1000) if values else "-"

    def normal(m, which=0):
        ms = sorted(x for _, busy in m["rounds"] for x in busy["probe"][which])
        return "%.1f / %.1f / %.1f" % (nearest_rank(ms, 0.5), nearest_rank(ms, 0.99),
                                       ms[-1]) if ms else "-"

    kernel = [r for quiet, busy in subs["rounds"] for r in (quiet, busy)]
    worst = max((nearest_rank(r["kernel"], 0.99) for r in kernel if r["kernel"]), default=None)
    got = min((r["got"] for r in kernel), default=0)
    return ("| %d | %d -> %d | %d -> %d | %.2f | %.2f | %.2f | %s | %d / %d | %s | %s | %s "
            "| %s | %s |") % (
        count, idle["before"][0], idle["most_threads"], subs["before"][0], subs["most_threads"],
        held["idle"] / KIB, held["sub"] / KIB, (held["sub"] - held["idle"]) / KIB,
        "%.0f" % (worst * 1000) if worst is not None else "-", got, count,
        normal(idle), normal(subs), normal(subs, 2), cpu(idle), cpu(subs))


def bar(count, idle, subs, held):
    """Issue 22's bar, each part met or not, with the figure it rests on."""
    rounds = [r for pair in subs["rounds"] for r in pair]
    worst = max((nearest_rank(r["kernel"], 0.99) for r in rounds if r["kernel"]), default=None)
    during = sorted(x for _, busy in subs["rounds"] for x in busy["probe"][2])
    window = sorted(x for _, busy in subs["rounds"] for x in busy["probe"][0])
    grown = subs["most_threads"] - subs["before"][0]
    difference = held["sub"] - held["idle"]
    checks = [
        (grown <= 0, "threads do not grow: %d before, %d at most" % (subs["before"][0],
                                                                      subs["most_threads"])),
        (difference <= 5000, "RSS per subscriber over an idle kept-alive connection's: %.0f "
                             "bytes (at most ~5 KB)" % difference),
        (worst is not None and worst < 1.0 and all(r["got"] == count for r in rounds),
         "one event reaches all %d, p99 under 1 s: worst round's p99 %s, fewest reached %d"
         % (count, "%.0f ms" % (worst * 1000) if worst is not None else "-",
            min((r["got"] for r in rounds), default=0))),
        (bool(window) and nearest_rank(window, 0.99) < 100 and bool(during)
         and nearest_rank(during, 0.99) < 100,
         "a normal client within 100 ms p99 during the fan-out: %.1f ms over 1 s before to 1 s "
         "after, %.1f ms over the requests under way during it (%d)"
         % (nearest_rank(window, 0.99), nearest_rank(during, 0.99), len(during))),
    ]
    return ["- N = %d: %s: %s" % (count, "met" if ok else "NOT met", text) for ok, text in checks]


SUMMARY_HEAD = [
    "| N | threads idle: before -> most | threads subs: before -> most | RSS KiB per idle conn "
    "| RSS KiB per subscriber | difference KiB | fan-out p99 ms (worst round, kernel) "
    "| got it (worst round) | normal client p50 / p99 / max ms, POST, no subscribers "
    "| the same, POST with fan-out (1 s before to 1 s after) | the same, only requests under "
    "way during the fan-out | server CPU ms per POST, no subscribers "
    "| server CPU ms per fan-out (median, less idle) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


# --- the run ---------------------------------------------------------------------------------

def raise_nofile(wanted):
    """Soft limit to at least ``wanted`` (the hard one too, if needed and allowed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def on_sigterm(signum, frame):
    raise SystemExit(128 + signum)   # run the finally blocks: sockets and children go


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, action="append", default=[],
                        help="N; repeat for several (default 1000 and 10000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-address", type=int, default=16,
                        help="connections per source address (at most the per-client cap)")
    parser.add_argument("--server", default=os.path.join(ROOT, "server.py"))
    parser.add_argument("--server-flag", action="append", default=[],
                        help="one more argument for both servers (repeat)")
    parser.add_argument("--path", default="/api/notes/events")
    parser.add_argument("--wait-s", type=float, default=10.0,
                        help="how long a POST's event may take to reach all")
    parser.add_argument("--probe-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_port:
        return probe_main(args.probe_port)
    signal.signal(signal.SIGTERM, on_sigterm)
    args.server = os.path.abspath(args.server)
    counts = args.subscribers or [1000, 10000]
    nofile = raise_nofile(max(counts) + NOFILE_SPARE)
    if nofile < max(counts) + NOFILE_SPARE:
        print("RLIMIT_NOFILE is %d: %d connections need %d (raise the hard limit: "
              "CAP_SYS_RESOURCE)" % (nofile, max(counts), max(counts) + NOFILE_SPARE),
              file=sys.stderr)
        return 2
    args.events_flags = server_supports(args.server, "--events-max-subscribers")
    print("RLIMIT_NOFILE %d (this process and the servers); %s; %d per address; %d rounds"
          % (nofile, args.server, args.per_address, args.rounds), flush=True)
    if not args.events_flags:
        print("note: this server has no [events] flags (no runtime yet?)", flush=True)
    out = ["# bench_events.py, %s" % datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "", "`%s`" % " ".join([os.path.basename(sys.executable)] + sys.argv)]
    summary, bars = [], []
    work = tempfile.mkdtemp(prefix="bench-events-")
    try:
        for count in counts:
            flags = server_flags(args, count)
            idle = measure("idle", args, count, work, flags)
            subs = measure("sub", args, count, work, flags)
            subs["per_address"], subs["path"] = args.per_address, args.path
            lines, held = report(count, idle, subs)
            lines.insert(2, "servers: `%s`" % " ".join(idle["argv"][1:]))
            print("\n".join(lines), flush=True)
            out += lines
            summary.append(summary_row(count, idle, subs, held))
            bars += bar(count, idle, subs, held)
        table = (["", "## Summary", ""] + SUMMARY_HEAD + summary
                 + ["", "Issue 22's bar:", ""] + bars)
        print("\n".join(table))
        out += table
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w") as handle:
            handle.write("\n".join(out) + "\n")
        print("\nwritten to %s" % os.path.relpath(RESULTS, ROOT))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
