"""systemd, without libsystemd: the sockets it passes (socket activation) and what the server
tells it (readiness, status, the watchdog), by their documented protocols.

* ``listen_sockets()``: sd_listen_fds(3). systemd opens the listening sockets (onebox.socket)
  and passes them to the service as descriptors 3, 4, ... with ``LISTEN_PID`` (whom they are
  for), ``LISTEN_FDS`` (how many) and ``LISTEN_FDNAMES`` (their ``FileDescriptorName=``).
  Because systemd holds the socket between two runs of the server, a restart refuses nobody:
  connections made while no server runs wait in the socket's backlog for the next one. And a
  privileged port (80, 443) is bound by systemd, so the server needs no capability at all.
* ``Notifier``: sd_notify(3). One datagram per message on the unix socket named by
  ``NOTIFY_SOCKET``, each a few ``KEY=value`` lines: ``READY=1`` once the server serves (for
  ``Type=notify``, so that ``systemctl start`` and units ordered after this one wait for it),
  ``STOPPING=1`` when a drain begins, ``RELOADING=1`` (with ``MONOTONIC_USEC=``) then ``READY=1``
  around a reload (the engine calls ``reloading()`` and ``reloaded(summary)`` from the reactor
  thread; the summary becomes ``STATUS=``), ``STATUS=`` for ``systemctl status``, and ``WATCHDOG=1``
  every half of ``WATCHDOG_USEC`` while ``OneboxServer.health()`` says the server is healthy.
  Pings stop when it is not (the reactor stopped turning, or no worker took a job within
  ``stall_timeout_s``), and systemd then kills and restarts the process (``WatchdogSec=``,
  ``Restart=``): a hung server is replaced instead of holding its port.

Outside systemd (no ``LISTEN_PID`` for this process, no ``NOTIFY_SOCKET``) both do nothing, so
``python3 server.py`` by hand behaves as before. The variables are removed from the environment
once read, as sd_listen_fds(3) and sd_notify(3) do when asked to, so that no child process
takes them for its own.

Threads: ``Notifier.watch`` starts one daemon thread ("onebox-systemd"); it only reads the
server's ``phase`` and ``health()``, and holds nothing that exit could cut in half. ``send``
may be called from any thread and from signal handlers: it takes no lock (a datagram is sent
whole or not at all). Imports only the standard library.
"""
import os
import socket
import threading
import time

LISTEN_FDS_START = 3            # SD_LISTEN_FDS_START: the first passed descriptor
SERVED_NAMES = ("http", "admin", "https")   # the FileDescriptorName= values a listener here serves
WAIT_FOR_SERVING_S = 0.01       # before READY=1: how often the server's phase is looked at
STATUS_EVERY_S = 1.0            # how often the status (and health) is looked at after that
DRAINING = "draining: finishing requests in flight"   # the STATUS= of a drain


class SystemdError(Exception):
    """What systemd passed cannot be served; the message names the variable and the fix."""


def listen_sockets(environ=None):
    """The listening sockets systemd passed to this process, by name ({"http": sock}); {} when
    none were passed to it. A single socket without a name we know (systemd names it after its
    unit when ``FileDescriptorName=`` is unset) is "http". Raises SystemdError for a socket
    that cannot be served: not a listening TCP socket, or a name that no listener here uses."""
    environ = os.environ if environ is None else environ
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    names = environ.get("LISTEN_FDNAMES", "")
    if pid != str(os.getpid()):
        return {}   # unset, or meant for another process (the one that exec'd us, say)
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(key, None)
    if not count.isdigit():
        raise SystemdError("LISTEN_FDS=%r is not a number of sockets; start onebox from "
                           "onebox.socket, or without LISTEN_PID set" % count)
    count = int(count)
    names = names.split(":") if names else []
    if len(names) != count:
        names = ["unknown"] * count
    if count == 1 and names[0] not in SERVED_NAMES:
        names = ["http"]
    sockets = {}
    for index, name in enumerate(names):
        fd = LISTEN_FDS_START + index
        try:
            os.set_inheritable(fd, False)   # systemd passes them inheritable; no child needs them
            sock = socket.socket(fileno=fd)
        except OSError as error:   # not open, or not a socket
            raise SystemdError("systemd passed descriptor %d (LISTEN_FDNAMES: %r), which is not "
                               "a socket (%s); start onebox from onebox.socket"
                               % (fd, name, error.strerror)) from None
        problem = _not_servable(sock, name, sockets)
        if problem:
            raise SystemdError("systemd passed descriptor %d (LISTEN_FDNAMES: %r), %s"
                               % (fd, name, problem))
        sockets[name] = sock
    return sockets


def _not_servable(sock, name, taken):
    if name not in SERVED_NAMES:
        return ("a name no listener here serves; give onebox.socket's ListenStream= "
                "FileDescriptorName=%s" % SERVED_NAMES[0])
    if name in taken:
        return ("a second socket of that name, and one is served; keep one ListenStream= in "
                "onebox.socket (a port alone listens on IPv4 and IPv6)")
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return "which is not a TCP socket; use ListenStream=PORT or ADDRESS:PORT in onebox.socket"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "which is not listening; use ListenStream= (and Accept=no) in onebox.socket"
    return None


class Notifier:
    """For the process: ``send(*fields)``, ``stopping()`` (from a signal handler) and
    ``watch(server)`` (after the server is built). ``enabled`` is False outside systemd, and then
    every call does nothing. ``watchdog_s`` is systemd's WatchdogSec= (None: no watchdog)."""

    def __init__(self, environ=None, log_error=None):
        environ = os.environ if environ is None else environ
        address = environ.pop("NOTIFY_SOCKET", "")
        usec, pid = environ.pop("WATCHDOG_USEC", ""), environ.pop("WATCHDOG_PID", "")
        if address.startswith("@"):
            address = "\0" + address[1:]   # Linux's abstract namespace (sd_notify(3))
        self.address = address if address[:1] in ("/", "\0") else None
        self.watchdog_s = None
        if usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self.enabled = self.address is not None
        self.log_error = log_error or (lambda message, detail=None, level="error": None)
        self._socket = None
        if self.enabled:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)   # never wait on systemd (it reads at once)
        self._failed = False
        self._reload_summary = None   # the last reload's, shown as STATUS= while serving
        self._closed = threading.Event()
        self._thread = None

    def send(self, *fields):
        """One message of ``KEY=value`` fields; True if it went. A failure is logged once: the
        server serves on whether or not systemd hears it."""
        if not self.enabled:
            return False
        try:
            self._socket.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
            return True
        except OSError as error:
            if not self._failed:
                self._failed = True
                self.log_error("cannot notify systemd at NOTIFY_SOCKET: %s" % error,
                               level="warning")
            return False

    def close(self):
        """Stop the watch thread (within a tick), which then closes the socket; for tests,
        which outlive their servers (the process exits without it)."""
        self._closed.set()
        if self._thread is None and self._socket is not None:
            self._socket.close()

    def stopping(self):
        """A drain begins (SIGTERM, SIGINT): systemd shows the unit as deactivating."""
        self.send("STOPPING=1", "STATUS=" + DRAINING)

    def reloading(self):
        """A reload (SIGHUP) begins, in the reactor thread: RELOADING=1 with the time it began
        on CLOCK_MONOTONIC (MONOTONIC_USEC=, which systemd >= 253 requires with it, so that it
        can tell this reload from an older one: sd_notify(3)). ``systemctl reload`` waits
        for the READY=1 that ``reloaded`` sends."""
        self.send("RELOADING=1", "MONOTONIC_USEC=%d" % monotonic_usec(),
                  "STATUS=reloading the configuration")

    def reloaded(self, summary):
        """The reload is over (applied, or refused with the old settings kept): READY=1, and
        its one-line summary (what changed, what needs a restart) as STATUS=, which stays
        until the status changes again."""
        self._reload_summary = summary.replace("\n", " ")
        self.send("READY=1", "STATUS=" + self._reload_summary)

    def watch(self, life, url):
        """Start the thread that sends READY=1 once the server serves (``life``: its phase and
        ``health()``, onebox/health.py; ``url``: where, for STATUS=), then STATUS= whenever
        what it reports changes, and WATCHDOG=1 while it is healthy. Nothing without systemd."""
        if not self.enabled:
            return None
        self._thread = threading.Thread(target=self._watch, args=(life, url),
                                        name="onebox-systemd", daemon=True)
        self._thread.start()
        return self._thread

    def _watch(self, life, url):
        try:
            self._report(life, url)
        finally:
            self._socket.close()

    def _report(self, life, url):
        while life.phase == "starting" and not self._closed.wait(WAIT_FOR_SERVING_S):
            pass
        if life.phase != "serving":
            return   # stopped before it served: STOPPING=1 said so
        self.send("READY=1", "STATUS=serving on %s" % url)
        shown, pinged = ("serving", None), None   # WatchdogSec= counts from READY=1
        ping_every = self.watchdog_s / 2 if self.watchdog_s else None
        tick = min(STATUS_EVERY_S, ping_every or STATUS_EVERY_S)
        while not self._closed.wait(tick):
            phase = life.phase
            if phase == "reloading":
                phase = "serving"   # reloading() and reloaded() tell systemd themselves
            # A drain has its own bounds (shutdown_timeout_s, TimeoutStopSec=): the watchdog
            # must not kill a server that is finishing its requests.
            problem = None if phase == "draining" else life.health()
            if (problem is None) != (shown[1] is None) and phase != "draining":
                self.log_error("healthy again" if problem is None else
                               "unhealthy: %s%s" % (problem, "; systemd's watchdog is no "
                                                    "longer pinged" if ping_every else ""),
                               level="info" if problem is None else "error")
            fields = []
            now = time.monotonic()
            if problem is None and ping_every and (pinged is None or now - pinged >= ping_every):
                fields.append("WATCHDOG=1")
                pinged = now
            if (phase, problem) != shown:
                fields.append("STATUS=" + _status(url, phase, problem, self._reload_summary))
                shown = (phase, problem)
            if fields:
                self.send(*fields)


def _status(url, phase, problem, reload_summary=None):
    """One line for ``systemctl status``."""
    if phase == "draining":
        return DRAINING
    if problem is not None:
        return "unhealthy: %s" % problem.replace("\n", " ")
    if reload_summary:
        return "%s on %s; last %s" % (phase, url, reload_summary)
    return "%s on %s" % (phase, url)


def monotonic_usec():
    """CLOCK_MONOTONIC in microseconds, the clock systemd's MONOTONIC_USEC= is read on
    (time.monotonic() is that clock on Linux, but only clock_gettime names it)."""
    clock = getattr(time, "CLOCK_MONOTONIC", None)
    if clock is not None:
        return time.clock_gettime_ns(clock) // 1000
    return time.monotonic_ns() // 1000
