#!/usr/bin/env python3
"""Slow clients against onebox (and nginx): what a normal client sees while they hold on.

    python3 bench/slow_clients.py [--server PATH/server.py ...] [--nginx]
                                  [--scenario NAME ...] [--seconds 30]

Black-box, over loopback only. For each scenario and each server (every ``--server`` given,
default this checkout's server.py, plus Debian's nginx with ``--nginx``) it starts a fresh
server on a free port serving the same small site (a small page and a 10 MiB file), starts the
attackers, then a normal client from 127.0.0.200 asks for the small page once a second for
``--seconds`` (a fresh connection each time; answered means a 200 within 2 s of starting to
connect). Per run: answered / asked, the server's threads (/proc/PID/status Threads, summed
over its processes) at the start and the most seen during, its RSS (VmRSS) before and the most
during, its open file descriptors (its own side of the connections) at the start, the most and
at the end, and what became of the attackers (how many held a connection at the end, how many
closes the server made; our attackers reopen a closed slot, as a real one would). A slow reader
sees the server's close only once it has read what the kernel still buffers for it, which at
1 KiB per 10 s is never: for readers, trust the server's descriptors.

Scenarios (the attackers are one thread here with non-blocking raw sockets, or Debian's
slowhttptest in a child process):

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

slowhttptest binds no source address, so it comes from 127.0.0.1, which onebox trusts as a
local proxy by default (never capped per client): for those runs onebox starts with
``--limits-trusted-proxies "" --limits-allow-cidrs ""`` so that 127.0.0.1 is an ordinary client.
slowhttptest's own run length (-l) defaults to 240 s; it is given ``-l`` = the run's length.

nginx is Debian's package with Debian's default limits (worker_processes auto, 768
worker_connections, its default timeouts: client_header_timeout and client_body_timeout 60 s
between reads, send_timeout 60 s); POST /hello/echo is proxied to a second nginx server block
that answers 200, so nginx reads (buffers) each body in full as it would for an application.

Prints one markdown row per (scenario, server), and writes bench/results/slow_clients.md.
Installs nginx-light and slowhttptest with apt-get when missing (root). Raises RLIMIT_NOFILE for
itself and the servers it starts. Linux only (/proc, POLLRDHUP). Every socket and process it
opens is closed at the end, whatever happens. Never imported by the runtime.
"""
import argparse
import datetime
import os
import re
import resource
import select
import shutil
import signal
import socket
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
events {{ worker_connections 768; }}
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
    server {{
        listen 127.0.0.1:{port};
        root {site};
        location = /hello/echo {{ proxy_pass http://127.0.0.1:{echo_port}/; }}
    }}
    server {{
        listen 127.0.0.1:{echo_port};
        location / {{ default_type application/json; return 200 '{{"ok":true}}\\n'; }}
    }}
}}
"""


# --- scenarios ---------------------------------------------------------------------------------

def addresses(first, count):
    return ["127.0.0.%d" % (first + i) for i in range(count)]


# name -> (kind, [(source address, connections)]) for our attackers, or ("slowhttptest", flag)
SCENARIOS = {
    "slow-bodies-1": ("body", [("127.0.0.2", 16)]),
    "slow-readers-1": ("reader", [("127.0.0.3", 16)]),
    "slow-bodies-8": ("body", [(a, 16) for a in addresses(10, 8)]),
    "slow-readers-4": ("reader", [(a, 16) for a in addresses(20, 4)]),
    "silent-18x256": ("silent", [(a, 256) for a in addresses(30, 18)]),
    "slowhttptest-B": ("slowhttptest", "-B"),
    "slowhttptest-X": ("slowhttptest", "-X"),
    "slowhttptest-H": ("slowhttptest", "-H"),
}
BODY_INTERVAL_S, BODY_LENGTH = 5.0, 100000
READ_INTERVAL_S, READ_BYTES, READER_RCVBUF = 10.0, 1024, 4096


class Slot:
    """One attacker connection; reopened after the server closes it."""
    __slots__ = ("source", "sock", "state", "next_at", "closed_at")

    def __init__(self, source):
        self.source, self.sock, self.state = source, None, "idle"
        self.next_at, self.closed_at = 0.0, -REOPEN_AFTER_S


class Attack(threading.Thread):
    """Our raw-socket attackers, all on this one thread: non-blocking connects, then a byte of
    body every BODY_INTERVAL_S ("body"), 1 KiB read every READ_INTERVAL_S ("reader"), or
    nothing ("silent"). Runs until ``stop()`` or ``deadline``; closes every socket on exit."""

    def __init__(self, kind, sources, port, deadline):
        super().__init__(name="attack-" + kind, daemon=True)
        self.kind, self.port, self.deadline = kind, port, deadline
        self.slots = [Slot(source) for source, count in sources for _ in range(count)]
        self.stopping = threading.Event()
        self.poller = select.poll()
        self.by_fd = {}
        self.opened = self.closed_by_server = self.refused = 0
        self.statuses = {}       # first status line the server sent before closing -> count

    # -- what the attack thread does ------------------------------------------------------------
    def run(self):
        try:
            while not self.stopping.is_set() and time.monotonic() < self.deadline:
                now = time.monotonic()
                self.open_some(now)
                self.poll_events()
                self.act(now)
                self.stopping.wait(TICK_S)
        finally:
            for slot in self.slots:
                self.drop(slot)

    def open_some(self, now):
        opened = 0
        for slot in self.slots:
            if slot.state == "idle" and now - slot.closed_at >= REOPEN_AFTER_S:
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
        self.poller.register(sock, select.POLLOUT | select.POLLIN | select.POLLRDHUP)

    def poll_events(self):
        for fd, events in self.poller.poll(0):
            slot = self.by_fd.get(fd)
            if slot is None:
                continue
            if slot.state == "connecting":
                self.connected(slot)
            elif events & (select.POLLHUP | select.POLLERR | select.POLLRDHUP):
                self.server_closed(slot, self.peek_status(slot))
            elif events & select.POLLIN and self.kind != "reader":
                self.server_closed(slot, self.peek_status(slot))   # an answer (408, 503) or EOF

    def connected(self, slot):
        if slot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.refused += 1
            self.drop(slot)
            return
        self.opened += 1
        slot.state, slot.next_at = "open", time.monotonic()
        self.poller.modify(slot.sock, select.POLLIN | select.POLLRDHUP)
        try:
            if self.kind == "body":
                slot.sock.send(("POST /hello/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                                % BODY_LENGTH).encode("ascii"))
            elif self.kind == "reader":
                slot.sock.send(("GET /%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                                % BIG_FILE).encode("ascii"))
        except OSError:
            self.server_closed(slot, None)

    def act(self, now):
        interval = BODY_INTERVAL_S if self.kind == "body" else READ_INTERVAL_S
        for slot in self.slots:
            if slot.state != "open" or self.kind == "silent" or now < slot.next_at:
                continue
            slot.next_at = now + interval
            try:
                if self.kind == "body":
                    slot.sock.send(b" ")
                elif not slot.sock.recv(READ_BYTES):
                    self.server_closed(slot, None)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.server_closed(slot, None)

    def peek_status(self, slot):
        try:
            data = slot.sock.recv(256)
        except OSError:
            return None
        return data.split(b"\r\n", 1)[0].decode("latin-1")[:40] if data else None

    def server_closed(self, slot, status):
        self.closed_by_server += 1
        if status:
            self.statuses[status] = self.statuses.get(status, 0) + 1
        self.drop(slot)

    def drop(self, slot):
        if slot.sock is not None:
            self.by_fd.pop(slot.sock.fileno(), None)
            try:
                self.poller.unregister(slot.sock)
            except (KeyError, ValueError):
                pass
            slot.sock.close()
        slot.sock, slot.state, slot.closed_at = None, "idle", time.monotonic()

    # -- for the main thread ----------------------------------------------------------------------
    def stop(self):
        self.stopping.set()
        self.join(30)

    def held(self):
        return sum(1 for slot in self.slots if slot.state == "open")

    def summary(self, held):
        text = "%d/%d held, %d closes by server" % (held, len(self.slots), self.closed_by_server)
        if self.refused:
            text += ", %d connects failed" % self.refused
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

def probe(port, results):
    """One GET of the small page from NORMAL_SOURCE on a fresh connection: True if a whole 200
    arrives within NORMAL_TIMEOUT_S of starting to connect."""
    started = time.monotonic()
    deadline = started + NORMAL_TIMEOUT_S
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    outcome = "timeout"
    try:
        sock.bind((NORMAL_SOURCE, 0))
        sock.settimeout(NORMAL_TIMEOUT_S)
        sock.connect(("127.0.0.1", port))
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
        status = data.split(b" ", 2)[1].decode("latin-1") if data.startswith(b"HTTP/") else "-"
        complete = complete_response(data)
        outcome = "ok" if status == "200" and complete else ("status " + status)
    except socket.timeout:
        outcome = "timeout"
    except OSError as error:
        outcome = type(error).__name__
    finally:
        sock.close()
    results.append((outcome, time.monotonic() - started))


def complete_response(data):
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return bool(match) and len(body) >= int(match.group(1))


def normal_client(port, seconds):
    """Ask once a second (each probe on its own thread, so a hung one does not delay the next);
    returns the list of (outcome, elapsed)."""
    results, threads = [], []
    start = time.monotonic()
    for number in range(int(seconds)):
        delay = start + number - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=probe, args=(port, results), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(NORMAL_TIMEOUT_S + 5)
    return results


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
    """One server process (its own session, so its processes can be found and stopped)."""

    def __init__(self, name, argv, work, port=None):
        self.name = name
        self.out_path = os.path.join(work, "%s.out" % name)
        self.out = open(self.out_path, "w")
        self.process = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self.port = port if port is not None else self.read_port()
        self.wait_until_answering()

    def read_port(self):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.process.poll() is None:
            with open(self.out_path, errors="replace") as handle:
                match = re.search(r"listening on http://[^:/]+:(\d+)/", handle.readline())
            if match:
                return int(match.group(1))
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


def onebox_argv(server_py, site, data_dir, untrust_loopback):
    argv = [sys.executable, server_py, "--port", "0", "--data-dir", data_dir,
            "--pages-dir", site]
    if untrust_loopback:   # slowhttptest comes from 127.0.0.1: make it an ordinary client
        argv += ["--limits-trusted-proxies", "", "--limits-allow-cidrs", ""]
    return argv


def start_server(label, target, site, work, scenario):
    run_dir = tempfile.mkdtemp(prefix="run-", dir=work)
    if target == "nginx":
        port, echo_port = free_port(), free_port()
        os.mkdir(os.path.join(run_dir, "tmp"))
        os.chmod(run_dir, 0o755)
        conf = os.path.join(run_dir, "nginx.conf")
        with open(conf, "w") as handle:
            handle.write(NGINX_CONF.format(work=run_dir, site=site, port=port,
                                           echo_port=echo_port))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        return Server(label, [nginx, "-c", conf, "-e", os.path.join(run_dir, "nginx-error.log")],
                      run_dir, port)
    untrust = SCENARIOS[scenario][0] == "slowhttptest"
    return Server(label, onebox_argv(target, site, os.path.join(run_dir, "data"), untrust),
                  run_dir)


# --- one run -----------------------------------------------------------------------------------

def run_one(scenario, label, target, site, work, seconds):
    """Start a fresh server, attack it, measure the normal client; return the table cells."""
    server = start_server(label, target, site, work, scenario)
    attack = sampler = None
    try:
        start = session_usage(server.process.pid)
        sampler = Sampler(server.process.pid, start)
        sampler.start()
        kind, spec = SCENARIOS[scenario]
        setup_s = 3.0
        if kind == "slowhttptest":
            path = {"-B": "hello/echo", "-X": BIG_FILE, "-H": SMALL_PAGE}[spec]
            attack = SlowHTTPTest(spec, "http://127.0.0.1:%d/%s" % (server.port, path),
                                  seconds + setup_s + NORMAL_TIMEOUT_S,
                                  os.path.dirname(server.out_path))
        else:
            attack = Attack(kind, spec, server.port,
                            time.monotonic() + seconds + setup_s + NORMAL_TIMEOUT_S + 5)
            attack.start()
        time.sleep(setup_s)     # let every attacker connect and start its slow work
        results = normal_client(server.port, seconds)
        held, fds_end = attack.held(), session_usage(server.process.pid)[2]
    finally:
        if attack is not None:
            attack.stop()
        if sampler is not None:
            sampler.stop()
        server.stop()
    answered = sum(1 for outcome, _ in results if outcome == "ok")
    failures = {}
    for outcome, _ in results:
        if outcome != "ok":
            failures[outcome] = failures.get(outcome, 0) + 1
    slowest = max((elapsed for outcome, elapsed in results if outcome == "ok"), default=None)
    return {
        "answered": "%d/%d (%.0f%%)" % (answered, len(results),
                                        100.0 * answered / max(1, len(results))),
        "slowest": "%.2f s" % slowest if slowest is not None else "-",
        "failures": ", ".join("%s x%d" % item for item in sorted(failures.items())) or "-",
        "threads": "%d -> %d" % (start[0], sampler.most[0]),
        "rss": "%.0f -> %.0f" % (start[1] / MIB, sampler.most[1] / MIB),
        "fds": "%d -> %d, %d at the end" % (start[2], sampler.most[2], fds_end),
        "attackers": attack.summary(held),
    }


HEADER = ("| scenario | server | normal client: 200 within 2 s | slowest 200 | other outcomes "
          "| threads start -> max | RSS MiB before -> max | server fds start -> max "
          "| attackers at the end |\n|---|---|---|---|---|---|---|---|---|")


def row(scenario, label, cells):
    return "| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
        scenario, label, cells["answered"], cells["slowest"], cells["failures"],
        cells["threads"], cells["rss"], cells["fds"], cells["attackers"])


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
    parser.add_argument("--output", default=RESULTS, help="markdown file written at the end")
    args = parser.parse_args()
    if args.seconds < 1:
        parser.error("--seconds must be at least 1")
    scenarios = args.scenario or list(SCENARIOS)
    paths = [os.path.abspath(path) for path in args.server] or [os.path.join(ROOT, "server.py")]
    targets = [("onebox-%d" % number if len(paths) > 1 else "onebox", path)
               for number, path in enumerate(paths)]
    if args.nginx:
        targets.append(("nginx", "nginx"))
    ensure_tools(args.nginx, any(SCENARIOS[s][0] == "slowhttptest" for s in scenarios))
    nofile = raise_nofile()
    signal.signal(signal.SIGTERM, on_sigterm)
    legend = ["- %s = %s" % (label, describe(path) if path != "nginx" else
                              "Debian's nginx (worker_processes auto, 768 worker_connections)")
              for label, path in targets]
    print("\n".join(legend))
    print("RLIMIT_NOFILE %d; normal client from %s asks for /%s once a second for %d s"
          % (nofile, NORMAL_SOURCE, SMALL_PAGE, args.seconds))
    print(HEADER, flush=True)
    rows = []
    work = tempfile.mkdtemp(prefix="onebox-slow-")
    try:
        site = make_site(work)
        for scenario in scenarios:
            for label, target in targets:
                line = row(scenario, label, run_one(scenario, label, target, site, work,
                                                    args.seconds))
                rows.append(line)
                print(line, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(args, legend, rows)


def write_results(args, legend, rows):
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        command = " ".join(["python3", "bench/slow_clients.py"] + sys.argv[1:])
        handle.write("# Slow clients\n\n`%s` on %s (UTC), %d CPUs.\n\n"
                     % (command, when, os.cpu_count()))
        handle.write("\n".join(legend) + "\n\n")
        handle.write("A normal client from %s asks for a small page once a second for %d s "
                     "(fresh connection, 2 s timeout). For the slowhttptest rows onebox runs "
                     "with `--limits-trusted-proxies \"\" --limits-allow-cidrs \"\"`, so that "
                     "127.0.0.1 (where slowhttptest comes from) is an ordinary, capped client. "
                     "Threads and RSS are summed over the server's processes.\n\n"
                     % (NORMAL_SOURCE, args.seconds))
        handle.write(HEADER + "\n" + "\n".join(rows) + "\n")
    print("wrote %s" % args.output)


if __name__ == "__main__":
    main()
