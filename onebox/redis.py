"""A Redis client in the standard library: RESP2 over TCP, a Unix socket or TLS, for the
``[cluster]`` features that let several onebox processes share state (issue 24).

Callers: ``Redis(url)`` once per process, then from any thread ``call(*args)``,
``pipeline(commands)``, ``transaction(commands)``, ``script(source)(keys, args)``,
``subscribe(channels, on_message, on_state)``, ``ping()``, the ``up`` attribute and ``close()``.
``parse_url`` and ``password_from_environment`` check the configuration at start-up.

Trade-offs, and why:

* **A pool, not one shared connection.** RESP answers in order on a connection, so a shared
  one would need a lock held for a whole round trip; a worker thread instead takes an idle
  connection (or makes one), uses it alone and gives it back. At most ``pool_size`` idle ones
  are kept; more may exist while many threads call at once.
* **A broken connection is never reused.** After a timeout or a protocol error the reply
  stream's position is unknown (a late reply would answer the next caller's command), so the
  connection is closed. An idle one the server closed (a Redis restart) is noticed before use
  by a zero-time poll and dropped, so a restart costs no caller an error.
* **No retries.** A broken connection raises ``RedisUnavailable``: a write may or may not
  have happened, and only the caller knows whether repeating it is safe.
* **Backoff on connect.** After a failed connect no other is tried until a delay passes
  (``BACKOFF_FIRST_S`` doubling to ``BACKOFF_MAX_S``, reset by a success); calls meanwhile fail
  at once, so a server that answers 503 while Redis is down does not hold every request for
  the connect timeout.
* **Secrets stay out of the URL**: a password goes in ``ONEBOX_REDIS_PASSWORD`` or the systemd
  credential ``redis_password`` (``LoadCredential=``), never in ``setup.cfg`` in clear.

Replies (RESP2, https://redis.io/docs/reference/protocol-spec/): simple string -> str,
bulk string -> bytes, integer -> int, array -> list, null -> None; an error reply raises
``RedisError`` from ``call`` and is returned in its place by ``pipeline``.
Imports only the standard library.
"""
import collections
import hashlib
import os
import select
import socket
import ssl
import sys
import threading
import time
import traceback
import urllib.parse

DEFAULT_PORT = 6379
BACKOFF_FIRST_S = 0.05          # the wait after a first failed connect ...
BACKOFF_MAX_S = 2.0             # ... doubling up to this
RECV_BYTES = 65536              # one recv's most
MAX_LINE_BYTES = 64 * 1024      # a reply's header line (+, -, :, $, *) longer than this is garbage
SUBSCRIBER_POLL_S = 0.1         # how often a subscription's thread looks at its stop flag
SUBSCRIBER_PING_S = 5.0         # a subscription silent this long sends PING: a dead peer shows

CLOSE_WAIT_S = 1.0              # Subscription.close() waits this long for its thread

Address = collections.namedtuple("Address", "scheme host port db path tls")


class RedisError(Exception):
    """An error reply (``-ERR ...``): the message is Redis's text, ``code`` its first word."""

    def __init__(self, message):
        super().__init__(message)
        self.code = message.split(" ", 1)[0]


class RedisUnavailable(Exception):
    """Redis could not be reached, timed out, or the connection broke mid-reply (so whether a
    write happened is unknown)."""


class _ProtocolError(Exception):
    """The bytes are not RESP: the connection must be dropped."""


# --- configuration ---------------------------------------------------------------------------

def parse_url(url):
    """An ``Address`` from ``redis://host:port/db``, ``rediss://host:port/db`` (TLS) or
    ``unix:///path/to/sock?db=N``; ValueError with the rule otherwise."""
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:   # checked first: no later message may echo a password
        raise ValueError("put the password in ONEBOX_REDIS_PASSWORD or a systemd credential, "
                         "not the url")
    if parts.fragment:
        raise ValueError("redis url %r: no #fragment allowed" % url)
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError("redis url %r: write unix:///absolute/path/to/socket" % url)
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        if set(query) - {"db"} or len(query.get("db", ())) > 1:
            raise ValueError("redis url %r: the only parameter allowed is one db=N" % url)
        db = _db_number(query.get("db", ["0"])[0], url)
        return Address("unix", None, None, db, parts.path, False)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("redis url %r: the scheme must be redis, rediss or unix" % url)
    if parts.query:
        raise ValueError("redis url %r: no ?parameters allowed (the db is the path: /N)" % url)
    if not parts.hostname:
        raise ValueError("redis url %r: no host" % url)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("redis url %r: the port must be a number from 1 to 65535" % url) from None
    db = _db_number(parts.path[1:], url) if parts.path not in ("", "/") else 0
    return Address(parts.scheme, parts.hostname, port, db, None, parts.scheme == "rediss")


def _db_number(text, url):
    if not (text.isascii() and text.isdigit()):
        raise ValueError("redis url %r: the db must be a number (0, 1, ...)" % url)
    return int(text)


def password_from_environment(name="redis_password", env="ONEBOX_REDIS_PASSWORD", environ=None):
    """The password from ``env``, else from the systemd credential ``$CREDENTIALS_DIRECTORY/name``
    (its final newline dropped), else None. OSError if the credential exists but cannot be read."""
    environ = os.environ if environ is None else environ
    if environ.get(env):
        return environ[env]
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    try:
        with open(os.path.join(directory, name), encoding="utf-8") as credential:
            return credential.read().rstrip("\r\n") or None
    except FileNotFoundError:
        return None


# --- the protocol ----------------------------------------------------------------------------

def _encode(args):
    """One command as a RESP array of bulk strings."""
    if not args:
        raise TypeError("a redis command needs at least its name")
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            data = repr(arg).encode("ascii")
        else:
            raise TypeError("redis arguments are str, bytes, int or float, not %s"
                            % type(arg).__name__)
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _why(error):
    if isinstance(error, socket.timeout):
        return "timed out"
    return (getattr(error, "strerror", None) or str(error) or type(error).__name__).lower()


class _Connection:
    """One socket and the bytes read from it but not yet parsed. Used by one thread at a time."""

    def __init__(self, sock, name, timeout):
        self.sock, self.name, self.timeout = sock, name, timeout
        self._buffer = bytearray()

    def send(self, payload):
        try:
            self.sock.sendall(payload)
        except OSError as error:
            raise RedisUnavailable("redis at %s: %s" % (self.name, _why(error))) from None

    def read_reply(self):
        """One reply; an error reply is returned as a RedisError, not raised."""
        try:
            return self._reply()
        except OSError as error:
            raise RedisUnavailable("redis at %s: %s" % (self.name, _why(error))) from None
        except (_ProtocolError, ValueError) as error:
            raise RedisUnavailable("redis at %s: protocol error: %s" % (self.name, error)) from None

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return RedisError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            data = self._exactly(length + 2)
            if data[-2:] != b"\r\n":
                raise _ProtocolError("a bulk string does not end in CRLF")
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise _ProtocolError("unknown reply type %r" % kind)

    def _line(self):
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 2]   # cheap: bytearray moves its start, not the bytes
                return line
            if len(self._buffer) > MAX_LINE_BYTES:
                raise _ProtocolError("a reply line longer than %d bytes" % MAX_LINE_BYTES)
            self._fill(RECV_BYTES)

    def _exactly(self, count):
        while len(self._buffer) < count:
            self._fill(max(RECV_BYTES, count - len(self._buffer)))
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def _fill(self, most):
        chunk = self.sock.recv(most)
        if not chunk:
            raise ConnectionError(0, "connection closed by redis")
        self._buffer += chunk

    def wait(self, seconds):
        """Whether bytes arrived within ``seconds`` (a timeout here consumes nothing)."""
        if self._buffer:
            return True
        self.sock.settimeout(seconds)
        try:
            self._fill(RECV_BYTES)
            return True
        except socket.timeout:
            return False
        except OSError as error:
            raise RedisUnavailable("redis at %s: %s" % (self.name, _why(error))) from None
        finally:
            self.sock.settimeout(self.timeout)

    def stale(self):
        """Whether an idle connection has something to read: the server closed it (EOF), or
        it holds bytes nobody asked for. Either way it must not be used."""
        if self._buffer or (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            return True
        poller = select.poll()   # not select(): a busy server's descriptors pass FD_SETSIZE
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --- the client ------------------------------------------------------------------------------

class Redis:
    """A client for one Redis server, safe from any thread (see the module's docstring)."""

    def __init__(self, url, password=None, username=None, timeout=2.0, connect_timeout=2.0,
                 pool_size=8, ssl_context=None):
        self.address = parse_url(url)
        self.name = self.address.path or "%s:%d" % (self.address.host, self.address.port)
        self.timeout, self.connect_timeout, self.pool_size = timeout, connect_timeout, pool_size
        self._handshake = []
        if password:   # None or "": no AUTH
            self._handshake.append(("AUTH", username, password) if username else ("AUTH", password))
        if self.address.db:
            self._handshake.append(("SELECT", self.address.db))
        if self.address.tls and ssl_context is None:
            ssl_context = ssl.create_default_context()   # verifies the certificate and name
        self._ssl_context = ssl_context
        self.up = False   # written by whichever thread last heard from Redis (or failed to)
        self._lock = threading.Lock()   # guards the fields below
        self._idle = []                 # connections free for the next caller, newest last
        self._closed = False
        self._retry_at = 0.0            # no connect before this (time.monotonic())
        self._backoff_s = BACKOFF_FIRST_S
        self._subscriptions = []

    # -- for callers --

    def call(self, *args):
        """One command's reply; an error reply raises RedisError."""
        reply = self._exchange(_encode(args), 1)[0]
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def pipeline(self, commands):
        """Every command's reply in order, sent in one write; error replies in their place."""
        if not commands:
            return []
        return self._exchange(b"".join(_encode(args) for args in commands), len(commands))

    def transaction(self, commands):
        """MULTI, the commands, EXEC in one pipeline: EXEC's list (None if a WATCH aborted
        it); RedisError if Redis refused the transaction (EXECABORT, or MULTI itself)."""
        replies = self.pipeline([("MULTI",)] + list(commands) + [("EXEC",)])
        for reply in (replies[0], replies[-1]):
            if isinstance(reply, RedisError):
                raise reply
        return replies[-1]

    def script(self, source):
        return Script(self, source)

    def subscribe(self, channels, on_message, on_state=None):
        subscription = Subscription(self, channels, on_message, on_state)
        with self._lock:
            self._subscriptions.append(subscription)
        subscription.start()
        return subscription

    def ping(self):
        """Whether Redis answers PING now; never raises."""
        try:
            return self.call("PING") == "PONG"
        except (RedisError, RedisUnavailable):
            return False

    def close(self):
        """Closes the idle connections and this client's subscriptions; later calls raise
        RedisUnavailable. A connection in use is closed when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            subscriptions, self._subscriptions = self._subscriptions, []
        for connection in idle:
            connection.close()
        for subscription in subscriptions:
            subscription.close()

    # -- the pool --

    def _exchange(self, payload, count):
        connection = self._checkout()
        ok = False
        try:
            connection.send(payload)
            replies = [connection.read_reply() for _ in range(count)]
            ok = True
        except RedisUnavailable:
            self.up = False
            raise
        finally:
            if ok:
                self._checkin(connection)
            else:
                connection.close()
        self.up = True
        return replies

    def _checkout(self):
        while True:
            with self._lock:
                if self._closed:
                    raise RedisUnavailable("redis at %s: closed" % self.name)
                connection = self._idle.pop() if self._idle else None
                wait = self._retry_at - time.monotonic()
            if connection is None:
                break
            if not connection.stale():
                return connection
            connection.close()
        if wait > 0:
            raise RedisUnavailable("redis at %s: unavailable, next try in %.2f s" % (self.name, wait))
        try:
            connection = self._connect()
        except RedisUnavailable:
            self.up = False
            with self._lock:
                self._retry_at = time.monotonic() + self._backoff_s
                self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)
            raise
        with self._lock:
            self._backoff_s = BACKOFF_FIRST_S
        return connection

    def _checkin(self, connection):
        with self._lock:
            if not self._closed and len(self._idle) < self.pool_size:
                self._idle.append(connection)
                return
        connection.close()

    def _connect(self):
        """A new connection, authenticated and on the URL's db; RedisUnavailable if not."""
        sock = None
        try:
            sock = self._open_socket()
            sock.settimeout(self.timeout)
        except OSError as error:
            if sock is not None:
                sock.close()
            raise RedisUnavailable("redis at %s: %s" % (self.name, _why(error))) from None
        connection = _Connection(sock, self.name, self.timeout)
        if not self._handshake:
            return connection
        try:
            connection.send(b"".join(_encode(args) for args in self._handshake))
            for reply in [connection.read_reply() for _ in self._handshake]:
                if isinstance(reply, RedisError):   # a wrong password is Redis unusable too
                    raise RedisUnavailable("redis at %s: %s" % (self.name, reply)) from reply
        except RedisUnavailable:
            connection.close()
            raise
        return connection

    def _open_socket(self):
        if self.address.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.connect_timeout)
                sock.connect(self.address.path)
            except OSError:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((self.address.host, self.address.port),
                                        timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # requests are small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self._ssl_context is None:
            return sock
        try:   # the handshake runs here, within the connect timeout
            return self._ssl_context.wrap_socket(sock, server_hostname=self.address.host)
        except OSError:
            sock.close()
            raise


class Script:
    """A Lua script run by its SHA1 (EVALSHA), sent again (EVAL) when Redis forgot it (a
    restart, SCRIPT FLUSH). Call it: ``script(keys=(...), args=(...))``."""

    def __init__(self, client, source):
        self.client, self.source = client, source
        self.sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()

    def __call__(self, keys=(), args=()):
        tail = (len(keys),) + tuple(keys) + tuple(args)
        try:
            return self.client.call("EVALSHA", self.sha, *tail)
        except RedisError as error:
            if error.code != "NOSCRIPT":
                raise
        return self.client.call("EVAL", self.source, *tail)


class Subscription:
    """SUBSCRIBE on a connection of its own, read by a daemon thread ("onebox-redis-sub").

    The thread calls ``on_message(channel, data)`` (both bytes) per message and
    ``on_state(True/False)`` when the subscription is (re)established or lost; after a loss
    it reconnects with backoff and subscribes again. Messages published while it was lost are
    gone (pub/sub keeps nothing): on_state(True) is the caller's cue to catch up. A callback
    that raises is logged to stderr the first time only; the thread carries on.
    ``close()`` stops it (from any thread, a callback included)."""

    def __init__(self, client, channels, on_message, on_state=None):
        if isinstance(channels, (str, bytes)):
            channels = [channels]
        self.channels = list(channels)
        if not self.channels:
            raise ValueError("subscribe needs at least one channel")
        self._client, self._on_message, self._on_state = client, on_message, on_state
        self._stop = threading.Event()
        self._logged = False   # this thread's only: whether a callback's error was logged
        self.up = False        # written by the subscription's thread only
        self._thread = threading.Thread(target=self._run, name="onebox-redis-sub", daemon=True)

    def start(self):
        self._thread.start()

    def close(self):
        self._stop.set()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout=CLOSE_WAIT_S)

    def _run(self):
        backoff = BACKOFF_FIRST_S
        while not self._stop.is_set():
            try:
                connection = self._client._connect()
                try:
                    self._listen(connection)
                finally:
                    connection.close()
            except RedisUnavailable:
                pass
            if self._stop.is_set():
                self.up = False   # closed on purpose: not a loss to report
                return
            if self.up:   # lost after a success: the first retry comes soon
                backoff = BACKOFF_FIRST_S
            self._set_state(False)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _listen(self, connection):
        """Subscribes, then reads messages until stopped; RedisUnavailable when the
        connection is lost or a PING goes unanswered."""
        connection.send(_encode(["SUBSCRIBE"] + self.channels))
        for _ in self.channels:
            reply = connection.read_reply()
            if isinstance(reply, RedisError):
                raise RedisUnavailable("redis at %s: subscribe: %s" % (connection.name, reply))
        self._set_state(True)
        heard, pinged = time.monotonic(), None
        while not self._stop.is_set():
            now = time.monotonic()
            if not connection.wait(SUBSCRIBER_POLL_S):
                if pinged is None and now - heard > SUBSCRIBER_PING_S:
                    connection.send(_encode(["PING"]))
                    pinged = now
                elif pinged is not None and now - pinged > self._client.timeout:
                    raise RedisUnavailable("redis at %s: no answer to ping" % connection.name)
                continue
            reply = connection.read_reply()
            heard, pinged = time.monotonic(), None
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                self._callback(self._on_message, reply[1], reply[2])

    def _set_state(self, up):
        if up != self.up:
            self.up = up
            if self._on_state is not None:
                self._callback(self._on_state, up)

    def _callback(self, function, *args):
        try:
            function(*args)
        except Exception:
            if not self._logged:
                self._logged = True
                sys.stderr.write("onebox.redis: a subscription callback failed (later failures "
                                 "are not logged):\n" + traceback.format_exc())
