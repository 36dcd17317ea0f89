"""A real ``redis-server`` for the tests (issue 24: never a mocked Redis), like tests/asker.py
a helper that test files import: ``from redisd import needs_redis, redis_server``.

    @needs_redis
    def test_x(tmp_path):
        with redis_server(tmp_path, appendonly=True) as redis:
            client = Redis(redis.url)
            ...
            redis.kill()       # SIGKILL: a crash; .kill(signal.SIGSTOP) freezes it instead
            redis.restart()    # the same port, directory and configuration (so the same data)

``redis_server`` starts Debian's ``redis-server`` (``.ci/run`` installs it; ``needs_redis``
skips a test on a machine without it) with a ``redis.conf`` written into ``tmp_path``, on a free
127.0.0.1 port, waits until it answers PING, and stops it at the end. Options: ``appendonly``,
``appendfsync``, ``requirepass``, ``unix`` (also listen on a unix socket: ``.unix_url``),
``tls`` (TLS only, with a CA and a certificate for localhost and 127.0.0.1 made by ``openssl``:
``.ssl_context()`` trusts that CA; ``tls_supported()`` says whether this build has TLS),
``config`` (more ``redis.conf`` lines as a dict). DEBUG is enabled (``DEBUG SLEEP`` for
timeouts). Its log is ``.log_text()``.
"""
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time

import pytest

from conftest import free_port

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None,
                                 reason="redis-server is not installed (.ci/run installs it)")
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_tls_supported = []


def tls_supported():
    """Whether this redis-server was built with TLS: a build without it rejects ``tls-port``
    as a bad directive, a build with it rejects only the option after it."""
    if not _tls_supported:
        probe = subprocess.run([REDIS_SERVER, "--port", "0", "--tls-port", "0",
                                "--onebox-no-such-option", "x"],
                               capture_output=True, text=True, timeout=30)
        _tls_supported.append("tls-port" not in probe.stdout + probe.stderr)
    return _tls_supported[0]


@contextlib.contextmanager
def redis_server(directory, **options):
    """A started ``RedisServer`` in ``directory``, stopped (and its socket dir removed) after."""
    server = RedisServer(directory, **options)
    try:
        server.start()
        yield server
    finally:
        server.close()


class RedisServer:
    """One redis-server process, restartable on the same port and directory."""

    def __init__(self, directory, appendonly=False, appendfsync="everysec", requirepass=None,
                 unix=False, tls=False, config=None):
        self.directory = str(directory)
        self.appendonly, self.appendfsync, self.requirepass = appendonly, appendfsync, requirepass
        self.tls, self.config = tls, dict(config or {})
        self.port = None
        self.process = None
        # a unix socket's path has a limit of 108 bytes, which pytest's tmp_path can pass
        self._socket_dir = tempfile.mkdtemp(prefix="redisd-") if unix else None
        self.unix_path = os.path.join(self._socket_dir, "redis.sock") if unix else None
        if tls:
            if not tls_supported():
                pytest.skip("this redis-server was built without TLS")
            self._make_certificates()

    @property
    def url(self):
        return "%s://127.0.0.1:%d/" % ("rediss" if self.tls else "redis", self.port)

    @property
    def unix_url(self):
        return "unix://" + self.unix_path

    def ssl_context(self):
        """A client context that trusts this server's CA (and checks the name, as by default)."""
        return ssl.create_default_context(cafile=os.path.join(self.directory, "ca.crt"))

    def log_text(self):
        try:
            with open(os.path.join(self.directory, "redis.log"), encoding="utf-8") as log:
                return log.read()
        except FileNotFoundError:
            return ""

    # -- the process --

    def start(self):
        """Starts on a free port (another if a race took it), or on the same one again."""
        for attempt in range(5):
            chosen = self.port is None
            if chosen:
                self.port = free_port()
            self._write_config()
            self.process = subprocess.Popen([REDIS_SERVER, self._config_path()],
                                            cwd=self.directory, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
            if self._wait_ready():
                return self
            if not chosen or "already in use" not in self.log_text():
                break
            self.port = None
        raise RuntimeError("redis-server did not start; its log:\n" + self.log_text()[-2000:])

    def stop(self):
        """SIGTERM (Redis's clean shutdown: it flushes the AOF), then waits for the exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)

    def kill(self, sig=signal.SIGKILL):
        """Sends ``sig``; waits for the exit unless it is one that does not end the process."""
        self.process.send_signal(sig)
        if sig not in (signal.SIGSTOP, signal.SIGCONT):
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def restart(self):
        if self.process is not None and self.process.poll() is None:
            self.stop()
        return self.start()

    def close(self):
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGCONT)   # a frozen server cannot take SIGTERM's clean shutdown
            self.stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- the details --

    def _config_path(self):
        return os.path.join(self.directory, "redis.conf")

    def _write_config(self):
        lines = {
            "bind": "127.0.0.1", "protected-mode": "no", "daemonize": "no",
            "dir": self.directory, "logfile": "redis.log", "save": '""',
            "appendonly": "yes" if self.appendonly else "no", "appendfsync": self.appendfsync,
            "enable-debug-command": "yes",
        }
        if self.tls:
            lines.update({"port": "0", "tls-port": str(self.port), "tls-auth-clients": "no",
                          "tls-cert-file": "server.crt", "tls-key-file": "server.key",
                          "tls-ca-cert-file": "ca.crt"})
        else:
            lines["port"] = str(self.port)
        if self.unix_path:
            lines.update({"unixsocket": self.unix_path, "unixsocketperm": "700"})
        if self.requirepass is not None:
            lines["requirepass"] = self.requirepass
        lines.update(self.config)
        with open(self._config_path(), "w", encoding="utf-8") as config:
            config.write("".join("%s %s\n" % item for item in lines.items()))

    def _wait_ready(self):
        """Whether the server answered PING (or NOAUTH, with a password) before a deadline."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with self._open() as sock:
                    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                    if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _open(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        if self.tls:
            return self.ssl_context().wrap_socket(sock, server_hostname="localhost")
        return sock

    def _make_certificates(self):
        """A CA and a certificate it signs for localhost and 127.0.0.1, with the extensions
        that Python 3.13's strict verification (VERIFY_X509_STRICT) requires."""
        def openssl(*args):
            subprocess.run(["openssl"] + list(args), cwd=self.directory, check=True,
                           capture_output=True, timeout=60)
        curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
                "-subj", "/CN=onebox test CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        openssl("req", *curve, "-keyout", "server.key", "-out", "server.csr",
                "-subj", "/CN=localhost")
        with open(os.path.join(self.directory, "server.ext"), "w", encoding="utf-8") as ext:
            ext.write("basicConstraints=critical,CA:FALSE\n"
                      "keyUsage=critical,digitalSignature,keyEncipherment\n"
                      "extendedKeyUsage=serverAuth\n"
                      "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                      "subjectKeyIdentifier=hash\n"
                      "authorityKeyIdentifier=keyid,issuer\n")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext")
