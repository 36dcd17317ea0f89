"""Zero-downtime restart without systemd: SIGUSR2 (or ``python3 server.py --restart``) replaces
the running server by a new process, new code included, with the same listening sockets.

The protocol, in order:

1. **Start the successor.** The running server (the *predecessor*) starts ``server.py`` again:
   the same interpreter, script path (so new code copied over the old is what runs), arguments,
   working directory and environment, with its listening sockets passed as systemd passes them
   (``LISTEN_FDS`` / ``LISTEN_PID`` / ``LISTEN_FDNAMES``, descriptors 3, 4, ...: sd_listen_fds(3),
   which ``onebox/systemd.py listen_sockets()`` reads). ``LISTEN_PID`` must be the pid of the
   process that reads it, which only exists after the fork; ``preexec_fn`` and ``os.fork()`` are
   unsafe in a process with threads. So a tiny launcher (``LAUNCH``: ``python3 -c``, started with
   ``Popen(pass_fds=...)``, which keeps descriptor numbers) moves the sockets to 3, 4, ..., sets
   ``LISTEN_PID`` to its own pid and ``os.execv``'s the server: exec keeps the pid. The
   successor's stdout and stderr are the predecessor's (the same log), and
   ``ONEBOX_PREDECESSOR`` names the predecessor's pid.
2. **The hand-shake.** The successor's ``NOTIFY_SOCKET`` is a datagram socket of the
   predecessor's (sd_notify(3), the protocol it already speaks to systemd). Once its
   configuration, its routes, its admin token and the passed sockets are valid, it sends
   ``X_ONEBOX_VALID=1`` (a custom field: sd_notify(3) reserves ``X_`` for them); a start-up
   failure sends ``STATUS=`` with the reason before it exits.
3. **Hand over.** On ``X_ONEBOX_VALID=1`` the predecessor stops accepting and drains (as on
   SIGTERM: its open connections are served out with ``Connection: close``; see
   ``OneboxServer._drain``). Connections made meanwhile wait in the socket's backlog, which the
   successor holds too. The predecessor then closes the state store, which releases the data
   directory's lock, and exits 0.
4. **Take over.** The successor waits for the lock (``onebox/store/`` raises
   StateLockedError while it is held) for up to ``restart_wait_s``, saying once in its log that
   it waits; then it loads the store, and serves the backlog.

If the successor exits, or says nothing within ``restart_wait_s``, before step 3, the predecessor
keeps serving and logs why (its exit status, its last ``STATUS=``; its own messages are on the
same stderr). Why step 3 waits for the configuration and not for READY=1: READY=1 needs the
store, which the predecessor holds until it has drained. A failure after the hand-over (a store
that does not load) leaves no server: the same as a failed ``systemctl restart``.

Under systemd this is refused: ``systemctl restart onebox`` with onebox.socket is the way (the
socket stays open in systemd, so nobody is refused), and systemd keeps tracking the main pid
(a successor would need ``MAINPID=`` and ``NotifyAccess=all`` to be the unit's). The launcher
and the hand-shake are in the standard library only; one daemon thread ("onebox-restart")
runs each restart, so the reactor never waits on the successor.

Imports the standard library and the store's ``StateLockedError`` (``onebox.store``); never
the engine (the server is passed in) or ``server``.
"""
import collections
import fcntl
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

VALID = "X_ONEBOX_VALID"            # the successor's configuration and sockets are valid
PREDECESSOR = "ONEBOX_PREDECESSOR"   # in the successor's environment: the predecessor's pid
SERVER_URL_FILE = "server.url"       # in data_dir: the public URL of the server that owns it
RESTART_FAILED_FILE = "restart.failed"   # in data_dir: why the last restart failed
LOCK_POLL_S = 0.05                   # how often a successor tries the data dir's lock
ORPHANED_S = 5.0   # --restart: the lock free and the old server gone this long: nobody came

# What the successor runs before the server (sd_listen_fds(3)): argv is
# [names, fd, fd, ..., "--", executable, args...]; the fds move to 3, 4, ... in order.
LAUNCH = """import fcntl, os, sys
split = sys.argv.index("--")
names, passed, command = sys.argv[1], [int(fd) for fd in sys.argv[2:split]], sys.argv[split + 1:]
# first out of the way of 3, 4, ...: copies numbered above them
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(passed)) for fd in passed]
for fd in passed:
    os.close(fd)
for index, fd in enumerate(moved):
    os.dup2(fd, 3 + index)   # dup2's copy is inheritable: exec keeps it
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(moved)), LISTEN_FDNAMES=names)
os.execv(command[0], command)
"""


# What a restart reads of the server and may do to it: its ``life`` (phase), the [server]
# ``settings`` (restart_wait_s, data_dir), the listening ``sockets`` by name, ``begin_shutdown``
# once the successor is valid, and ``log_error``. Never the server whole.
Subject = collections.namedtuple("Subject", "life settings sockets begin_shutdown log_error")


class Restarter:
    """The predecessor's side: ``begin(server)`` (reactor thread, on SIGUSR2) starts one restart
    at a time, in its own thread. ``command``: the server's command line (argv after the
    interpreter: the script, then its flags). ``under_systemd``: refuse, and say what to do."""

    def __init__(self, command, under_systemd=False):
        self.command = list(command)
        self.under_systemd = under_systemd
        self._thread = None
        self._child = None   # a successor not handed over to yet
        # set once a successor took over (this process drains and hands it the data dir): the
        # files in data_dir that say where the server is are the successor's to rewrite
        self.handed_over = False

    def begin(self, subject):
        """SIGUSR2, in the reactor thread: start a successor on ``subject.sockets`` (a
        ``Subject``: what a restart reads of the server, and ``begin_shutdown`` to stop it once
        the successor is valid)."""
        log = subject.log_error
        if self.under_systemd:
            log("restart refused: under systemd, run `systemctl restart onebox` (onebox.socket "
                "keeps the socket open, so no connection is refused)", level="warning")
            return
        self._result(subject, None)
        if self._thread is not None and self._thread.is_alive():
            log("restart: one is under way already; SIGUSR2 ignored", level="warning")
            return
        if subject.life.phase == "draining":
            return
        self._thread = threading.Thread(target=self._run, args=(subject,), name="onebox-restart",
                                        daemon=True)
        self._thread.start()

    def _run(self, subject):
        log = subject.log_error
        try:
            self._restart(subject)
        except Exception as error:   # a bug here must not stop the serving
            log("restart failed: %s: %s; still serving" % (type(error).__name__, error),
                level="error")

    def _restart(self, subject):
        log = subject.log_error
        reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        address = "\0onebox-restart-%d-%s" % (os.getpid(), os.urandom(6).hex())
        try:
            reader.bind(address)
            child = self._start(subject, "@" + address[1:])
        except OSError as error:
            reader.close()
            log("restart failed: cannot start the successor: %s; still serving" % error)
            self._result(subject, "cannot start the successor: %s" % error)
            return
        self._child = child
        log("restart: successor started (pid %d); serving until its configuration is valid"
            % child.pid, level="info")
        try:
            verdict, status = self._await_valid(child, reader,
                                                subject.settings.restart_wait_s + 30.0)
        finally:
            reader.close()
        if verdict == "valid":
            self._child = None
            self.handed_over = True
            log("restart: successor (pid %d) has a valid configuration and the listening "
                "sockets; this process (pid %d) stops accepting, drains, and hands it the "
                "data dir" % (child.pid, os.getpid()), level="info")
            subject.begin_shutdown()
            return
        if verdict == "silent":
            child.kill()
            child.wait()
            why = "said nothing within %gs (killed)" % (subject.settings.restart_wait_s + 30)
        else:
            why = "exited with status %s" % _exit_status(child.returncode)
        why = "the successor (pid %d) %s%s" % (child.pid, why, ": " + status if status else "")
        log("restart failed: %s; still serving (its messages are on stderr above)" % why)
        self._result(subject, why)

    def abandon(self):
        """The subject stops (SIGTERM) before its successor took over: the successor must not
        take the data dir and serve on against the operator's wish."""
        child, self._child = self._child, None
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()

    @staticmethod
    def _result(subject, why):
        """RESTART_FAILED_FILE in data_dir says why the last restart failed, for --restart;
        removed when one begins."""
        path = os.path.join(subject.settings.data_dir, RESTART_FAILED_FILE)
        try:
            if why is None:
                os.remove(path)
                return
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as note:
                os.fchmod(fd, 0o600)
                note.write(why + "\n")
        except OSError:
            pass

    def _start(self, subject, notify_address):
        sockets = subject.sockets
        names, fds = list(sockets), [sock.fileno() for sock in sockets.values()]
        environ = dict(os.environ)
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC",
                    "WATCHDOG_PID"):
            environ.pop(key, None)
        environ["NOTIFY_SOCKET"] = notify_address
        environ[PREDECESSOR] = str(os.getpid())
        launcher = [sys.executable, "-c", LAUNCH, ":".join(names)] + [str(fd) for fd in fds]
        return subprocess.Popen(launcher + ["--", sys.executable] + self.command,
                                pass_fds=fds, env=environ, stdin=subprocess.DEVNULL,
                                close_fds=True)

    @staticmethod
    def _await_valid(child, reader, bound_s):
        """("valid" | "exited" | "silent", the last STATUS= the successor sent)."""
        status = ""
        deadline = time.monotonic() + bound_s
        while time.monotonic() < deadline:
            reader.settimeout(0.1)
            try:
                fields = _fields(reader.recv(4096))
            except socket.timeout:
                fields = {}
            status = fields.get("STATUS", status)
            if fields.get(VALID) == "1":
                return "valid", status
            if child.poll() is not None:
                try:   # what it said just before it exited
                    reader.setblocking(False)
                    while True:
                        status = _fields(reader.recv(4096)).get("STATUS", status)
                except OSError:
                    pass
                return "exited", status
        return "silent", status


def _fields(data):
    fields = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


def _exit_status(code):
    if code is not None and code < 0:
        try:
            return "%d (killed by %s)" % (code, signal.Signals(-code).name)
        except ValueError:
            pass
    return str(code)


# --- the successor's side -------------------------------------------------------------------

def predecessor(environ=None):
    """The pid of the server this process replaces (SIGUSR2), or None; the variable is removed
    so that no later child takes it for its own."""
    value = (os.environ if environ is None else environ).pop(PREDECESSOR, "")
    return int(value) if value.isdigit() else None


def open_when_free(open_store, config, old_pid, log):
    """The successor's store: ``open_store(config)``, retried while the predecessor holds the
    data dir's lock (it releases it once drained), for up to restart_wait_s. Raises the last
    StateLockedError past that."""
    from onebox.store import StateLockedError
    deadline = time.monotonic() + config.server.restart_wait_s
    said = False
    while True:
        try:
            return open_store(config)
        except StateLockedError:
            if time.monotonic() >= deadline:
                raise
            if not said:
                log("waiting up to %gs for the data dir %s: the server being replaced (pid %d) "
                    "releases it once drained" % (config.server.restart_wait_s,
                                                   config.server.data_dir, old_pid))
                said = True
            time.sleep(LOCK_POLL_S)


# --- python3 server.py --restart ------------------------------------------------------------

def lock_owner(data_dir):
    """The pid that holds data_dir's lock, or None if nobody holds it (no server runs)."""
    path = os.path.join(data_dir, "lock")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:   # held: a server runs; the file names it
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def restart_running(data_dir, wait_s, out=print):
    """--restart: SIGUSR2 to the server that owns ``data_dir``, then wait until another pid
    owns it and answers /readyz on the URL it wrote; the exit status (0, or 1 with why)."""
    old = lock_owner(data_dir)
    if old is None:
        out("onebox: no running server owns %s; start one with python3 server.py" % data_dir,
            file=sys.stderr)
        return 1
    started = time.time() - 1.0   # a file's mtime may lag the clock a little
    try:
        os.kill(old, signal.SIGUSR2)
    except OSError as error:
        out("onebox: cannot signal the running server (pid %d): %s; run this as its user"
            % (old, error.strerror), file=sys.stderr)
        return 1
    failed = os.path.join(data_dir, RESTART_FAILED_FILE)
    deadline = time.monotonic() + wait_s
    orphaned_at = None   # when the lock was first seen free with the old server gone
    while time.monotonic() < deadline:
        time.sleep(0.05)
        new = lock_owner(data_dir)
        if new is not None and new != old:
            url = _answers(data_dir, deadline)
            if url:
                out("onebox: restarted: pid %d replaced pid %d, serving on %s" % (new, old, url))
                return 0
            break
        if new == old and os.path.exists(failed) and os.path.getmtime(failed) >= started:
            break
        if new is None and not _alive(old):   # nobody took over within a few polls of the lock
            orphaned_at = orphaned_at or time.monotonic()
            if time.monotonic() - orphaned_at > ORPHANED_S:
                break
    owner = lock_owner(data_dir)
    if owner == old:
        why = ""
        try:
            with open(failed) as note:
                why = ": " + note.read().strip()
        except OSError:
            pass
        out("onebox: the running server (pid %d) is still serving; the restart failed%s "
            "(see its error log)" % (old, why), file=sys.stderr)
    elif owner is None:
        out("onebox: the server (pid %d) stopped and no successor took over %s; see the error "
            "log, then start it with python3 server.py" % (old, data_dir), file=sys.stderr)
    else:
        out("onebox: pid %d owns %s but does not answer /readyz; see the error log"
            % (owner, data_dir), file=sys.stderr)
    return 1


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except OSError:
        return True


def _answers(data_dir, deadline):
    """The URL in data_dir/server.url once GET /readyz there says 200 (None at the deadline)."""
    while time.monotonic() < deadline:
        try:
            with open(os.path.join(data_dir, SERVER_URL_FILE)) as note:
                url = note.read().strip()
            parts = urllib.parse.urlsplit(url)
            host = "127.0.0.1" if parts.hostname in ("0.0.0.0", "") else parts.hostname
            host = "::1" if host == "::" else host
            connection = http.client.HTTPConnection(host, parts.port, timeout=2)
            try:
                connection.request("GET", "/readyz")
                if connection.getresponse().status == 200:
                    return url
            finally:
                connection.close()
        except (OSError, ValueError, http.client.HTTPException):
            pass
        time.sleep(0.05)
    return None
