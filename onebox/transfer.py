"""Moving bytes on a connection: request bodies in, responses out, each under a pace.

What this module owns, and why it is apart from the codec: the codec (``onebox/codec.py``)
says what the bytes mean; this module decides how long anyone waits for them. No client may
make a thread wait on it for long (issue 12), so:

* a request body is read by the reactor before a worker sees the request, whenever it fits in
  ``buffer_body_bytes`` (``body_is_buffered`` and ``ChunkedScan`` tell when it is all there);
  a larger one is streamed by the handler through a ``BodyReader``, which waits only while the
  client keeps a minimum average rate (``Pace``: Kestrel's MinRequestBodyDataRate idea);
* a response is written by its worker for at most ``worker_write_s`` (``write_response``);
  what the client has not taken by then is an ``Outbox`` that the reactor finishes, without
  blocking, while the client keeps a minimum rate (MinResponseDataRate). A streamed response's
  generator runs in a worker; once more than ``STREAM_BUFFER_BYTES`` of its chunks wait for
  the client, the reactor sends them and then hands the connection to a worker for more
  (``produce``).

Connection sockets are blocking with SO_SNDTIMEO = ``worker_write_s``, reads pass
MSG_DONTWAIT, and a socket handed to the reactor to finish a response is non-blocking until it
is done. Threads: none of its own; every function runs in the thread that calls it.
Imports the standard library, the handler contract, the codec, onebox.streams (an event
stream's answer is a ``Subscriber`` for the reactor) and onebox.tls (a constant).
"""
import os
import select
import socket
import struct
import time
import traceback

from handlers._core import HTTPError
from handlers._events import EventStream
from onebox.codec import _NO_BODY_STATUSES, chunk_size, render_head
from onebox.streams import Subscriber
from onebox.tls import FILE_CHUNK_BYTES

STREAM_BUFFER_BYTES = 256 * 1024   # a stream's unsent chunks past which the reactor sends them
_SMALL_BODY_BYTES = 256 * 1024     # a body up to this leaves in one send with its head
_MSG_MORE = getattr(socket, "MSG_MORE", 0)   # Linux; elsewhere the head goes out alone
MSG_DONTWAIT = socket.MSG_DONTWAIT   # a read that must not wait, on a blocking socket


class ClientGone(Exception):
    """The client stopped reading or writing in time; the connection is closed silently."""


class StreamFailed(ClientGone):
    """A streamed body raised after its head was sent: all we can do is cut the connection."""


class Pace:
    """A minimum data rate, kept as a deadline for the next byte: a transfer starts with
    ``grace`` seconds (and 1/rate seconds for each byte that came with its start), each byte
    moved pushes the deadline back by 1/rate seconds, and the deadline is never more than
    ``patience`` seconds ahead of the last progress.

    A leaky bucket of time, not an average over the whole transfer: with the average
    (``start + grace + bytes / rate``, or ``last byte + patience``), a body sent fast to 64
    bytes short of its end banked over an hour of credit, then stayed legal at one byte every
    10 s (issue 19). Here credit is capped at ``patience``, so after a burst a client must keep
    the rate again within that long."""

    __slots__ = ("rate", "grace", "patience")

    def __init__(self, min_rate_bytes_s, grace_s, longest_wait_s):
        self.rate = min_rate_bytes_s
        self.grace = grace_s
        self.patience = longest_wait_s

    @classmethod
    def for_bodies(cls, settings):
        return cls(settings.min_body_rate_bytes_s, settings.body_rate_grace_s,
                   settings.body_timeout_s)

    @classmethod
    def for_responses(cls, settings):
        return cls(settings.min_response_rate_bytes_s, settings.response_rate_grace_s,
                   settings.write_timeout_s)

    def first(self, now, done=0):
        """The deadline of a transfer starting ``now`` with ``done`` bytes already moved (a
        body's bytes that came in the same read as its head count: issue 19)."""
        return min(now + self.grace + done / self.rate, now + self.patience)

    def advance(self, deadline, moved, now):
        """The deadline after ``moved`` more bytes at ``now``."""
        return min(deadline + moved / self.rate, now + self.patience)


def timeval(seconds):
    """``seconds`` as a struct timeval (SO_SNDTIMEO, SO_RCVTIMEO)."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


def wait_for(sock, events, deadline):
    """Block until ``sock`` is ready for ``events`` (select.POLLIN/POLLOUT) or ``deadline``.

    poll, not select: select cannot watch descriptors above 1023, and onebox holds thousands.
    """
    timeout = deadline - time.monotonic()
    poller = select.poll()
    poller.register(sock, events)
    if timeout <= 0 or not poller.poll(timeout * 1000):
        raise ClientGone("too slow")


# --- request bodies ---------------------------------------------------------------------------

def body_is_buffered(buf, head, limit):
    """Whether a request's whole body is in ``buf`` (which starts where the body does): True,
    False, or a ChunkedScan to go on with. A body longer than ``limit`` counts as buffered:
    it is not waited for; the handler streams it."""
    if head.chunked:
        scan = ChunkedScan(limit, limit + ChunkedScan.MAX_LINE_BYTES)
        return True if scan.feed(buf) else scan
    return head.content_length > limit or len(buf) >= head.content_length


class ChunkedScan:
    """Where a chunked body (RFC 9112 section 7.1) ends, in a buffer that grows as the reactor
    reads it. ``feed(buf)`` goes on from where it stopped (a trickled body is scanned once) and
    returns True once the body and its trailer section are in ``buf``, once it is malformed (the
    worker's reader then says how), once its data passes ``limit``, or once ``buf`` holds more
    than ``wire_limit`` bytes, framing included (the handler streams the rest: chunk extensions
    and trailer fields around a few data bytes must not make the reactor buffer without end);
    False while more is needed."""

    __slots__ = ("limit", "wire_limit", "pos", "left", "state", "data")

    MAX_LINE_BYTES = 4096

    def __init__(self, limit, wire_limit=None):
        self.limit = limit
        self.wire_limit = wire_limit   # None: the caller bounds the buffer itself
        self.pos = 0          # next byte of the buffer to look at
        self.left = 0         # data bytes left in the current chunk
        self.state = "size"   # "size", "data", "crlf" or "trailer"
        self.data = 0         # data bytes seen

    def feed(self, buf):
        if self.wire_limit is not None and len(buf) > self.wire_limit:
            return True
        while True:
            if self.state in ("size", "trailer"):
                end = buf.find(b"\r\n", self.pos)
                if end < 0:
                    return len(buf) - self.pos > self.MAX_LINE_BYTES   # malformed: let it fail
                line, self.pos = bytes(buf[self.pos:end]), end + 2
                if self.state == "trailer":
                    if not line:
                        return True
                    continue
                size = chunk_size(line)
                if size is None:
                    return True
                self.left = size
                self.data += self.left
                if self.data > self.limit:
                    return True
                self.state = "data" if self.left else "trailer"
            elif self.state == "data":
                taken = min(self.left, len(buf) - self.pos)
                self.pos += taken
                self.left -= taken
                if self.left:
                    return False
                self.state = "crlf"
            else:
                if len(buf) - self.pos < 2:
                    return False
                if buf[self.pos:self.pos + 2] != b"\r\n":
                    return True
                self.pos += 2
                self.state = "size"


class BodyReader:
    """Reads one request body from the connection's buffer and socket, within the limits. Waits
    for the socket only for a body the reactor did not buffer (larger than buffer_body_bytes),
    and only while the client keeps the body pace (min_body_rate_bytes_s after
    body_rate_grace_s, and never longer than body_timeout_s between bytes); else 408."""

    def __init__(self, conn, head, settings):
        self.conn = conn
        self.limit = settings.max_body_bytes
        self.pace = Pace.for_bodies(settings)
        self.deadline = self.pace.first(time.monotonic(), len(conn.buf))
        self.expect_continue = head.expect_continue
        self.continue_sent = False
        self.done = False
        self.broken = False   # framing lost: the connection must close after the response
        self.failure = None   # the HTTPError that ended a drain (see drain)
        self.received = 0

    def read(self, size=-1):
        if self.done:
            return b""
        if self.expect_continue and not self.continue_sent:
            self.send_continue()
        if size is None or size < 0:
            parts = []
            while not self.done:
                parts.append(self._read_some(1 << 20))
            return b"".join(parts)
        return self._read_some(size) if size else b""

    def send_continue(self):
        """RFC 9110 section 10.1.1: the client waits for this before it sends the body."""
        self.continue_sent = True
        self._guard(_send_all_now, self.conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")

    def drain(self, limit):
        """Read and drop the rest of the body; False if more than ``limit`` bytes remain or it
        cannot be read. A body that is malformed or too large leaves its error in ``failure``."""
        try:
            while not self.done:
                if self._remaining_hint() > limit:
                    return False
                limit -= len(self._read_some(65536))
                if limit < 0:
                    return False
        except HTTPError as error:
            self.failure = error
            return False
        return True

    def _take(self, size):
        """Up to ``size`` bytes from the buffer, receiving more if it is empty."""
        conn = self.conn
        if not conn.buf:
            self._guard(self._receive)
        chunk = bytes(conn.buf[:size])
        del conn.buf[:size]
        return chunk

    def _receive(self):
        conn = self.conn
        while True:
            try:
                data = conn.sock.recv(65536, MSG_DONTWAIT)
            except BlockingIOError:
                wait_for(conn.sock, select.POLLIN, self.deadline)
                continue
            if not data:
                raise ClientGone("closed mid-body")
            self.deadline = self.pace.advance(self.deadline, len(data), time.monotonic())
            conn.buf += data
            return

    def _guard(self, function, *args):
        try:
            return function(*args)
        except ClientGone:
            self.broken = True
            raise HTTPError(408, "request body not received in time") from None
        except OSError:
            self.broken = True
            raise HTTPError(400, "request body incomplete") from None

    def _count(self, size):
        self.received += size
        if self.received > self.limit:
            self.broken = True
            raise HTTPError(413, "request body too large")


class LengthBody(BodyReader):
    def __init__(self, conn, head, settings):
        super().__init__(conn, head, settings)
        self.remaining = head.content_length
        self.done = self.remaining == 0

    def _remaining_hint(self):
        return self.remaining

    def _read_some(self, size):
        chunk = self._take(min(size, self.remaining))
        self.remaining -= len(chunk)
        self._count(len(chunk))
        self.done = self.remaining == 0
        return chunk


class ChunkedBody(BodyReader):
    """RFC 9112 section 7.1: hex size [;ext] CRLF data CRLF ... 0 CRLF [trailers] CRLF."""

    MAX_LINE_BYTES = ChunkedScan.MAX_LINE_BYTES

    def __init__(self, conn, head, settings):
        super().__init__(conn, head, settings)
        self.chunk_left = 0
        self.max_trailer_bytes = settings.max_head_bytes

    def _remaining_hint(self):
        return self.chunk_left

    def _read_some(self, size):
        if self.chunk_left == 0:
            self._start_chunk()
            if self.done:
                return b""
        chunk = self._take(min(size, self.chunk_left))
        self.chunk_left -= len(chunk)
        self._count(len(chunk))
        if self.chunk_left == 0 and self._line() != b"":
            self.broken = True
            raise HTTPError(400, "malformed chunked body")
        return chunk

    def _start_chunk(self):
        size = chunk_size(self._line())
        if size is None:
            self.broken = True
            raise HTTPError(400, "malformed chunk size")
        self.chunk_left = size
        if self.chunk_left == 0:
            trailer_bytes = 0
            while True:  # trailer fields are read and ignored (section 7.1.2)
                trailer = self._line()
                trailer_bytes += len(trailer) + 2
                if trailer == b"":
                    break
                if trailer_bytes > self.max_trailer_bytes:
                    self.broken = True
                    raise HTTPError(431, "chunked trailer too large")
            self.done = True
        elif self.received + self.chunk_left > self.limit:
            self.broken = True
            raise HTTPError(413, "request body too large")

    def _line(self):
        conn = self.conn
        while True:
            end = conn.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(conn.buf[:end])
                del conn.buf[:end + 2]
                return line
            if len(conn.buf) > self.MAX_LINE_BYTES:
                self.broken = True
                raise HTTPError(400, "malformed chunked body")
            self._guard(self._receive)


# --- responses --------------------------------------------------------------------------------
# Head and (small) body go out in one send: with two sends and Nagle, a keep-alive client waits
# ~40 ms for the delayed ACK (TCP_NODELAY is set as well).

class Outbox:
    """The rest of a response that its worker could not send in its turn: ``data`` first (a
    memoryview), then ``remaining`` bytes of ``file`` from ``offset``, then, for a streamed
    body, what its generator ``stream`` has still to produce (in a worker: see ``produce``).
    ``body_sent`` counts the body bytes that have left (for the access log); ``head_left``,
    the head bytes still in ``data``; ``record``, the request's Record (onebox/books.py),
    finished when it is done. Sent by the reactor with ``send_more``; owned by one thread at a
    time, as its connection is."""

    __slots__ = ("data", "head_left", "file", "offset", "remaining", "body_sent", "record",
                 "keep_alive", "stream", "chunked", "cut")

    def __init__(self, data=b"", head_left=0, file=None, offset=0, remaining=0, body_sent=0):
        self.record = None   # the request's Record: finished (counted, logged) once done
        self.keep_alive = False   # whether the connection stays open after it
        self.data = memoryview(data)
        self.head_left = head_left
        self.file = file
        self.offset = offset
        self.remaining = remaining
        self.body_sent = body_sent
        self.stream = None     # a streamed body's iterator, until it ends
        self.chunked = False   # its pieces are framed as chunks (HTTP/1.1)
        self.cut = False       # it broke off in a worker (client gone, generator raised)

    def send_more(self, sock):
        """Send what the (non-blocking) socket takes now; True once ``data`` and the file are
        sent (a stream may have more to produce). Raises ClientGone if the connection broke.
        Over TLS the file is read into ``data`` a FILE_CHUNK_BYTES piece at a time (sendfile
        cannot encrypt), and a piece the socket did not take stays in ``data``: OpenSSL wants
        the same bytes again."""
        if self.cut:
            raise ClientGone("the response broke off")
        tls = getattr(sock, "tls", False)
        try:
            while self.data:
                count = sock.send(self.data)
                self._count_data(count)
            while self.remaining and tls:
                piece = os.pread(self.file.fileno(), min(self.remaining, FILE_CHUNK_BYTES),
                                 self.offset)
                if not piece:
                    raise ClientGone("file shrank while being sent")
                self.offset += len(piece)
                self.remaining -= len(piece)
                self.data = memoryview(piece)
                while self.data:
                    self._count_data(sock.send(self.data))
            while self.remaining:
                count = os.sendfile(sock.fileno(), self.file.fileno(), self.offset,
                                    self.remaining)
                if count == 0:
                    raise ClientGone("file shrank while being sent")
                self.offset += count
                self.remaining -= count
                self.body_sent += count
        except BlockingIOError:
            return False
        except OSError as error:
            raise ClientGone(str(error)) from None
        self._close_file()
        return True

    def _count_data(self, count):
        self.data = self.data[count:]
        self.count_sent(count)

    def count_sent(self, count):
        """``count`` more bytes have left: head first, then body."""
        head = min(count, self.head_left)
        self.head_left -= head
        self.body_sent += count - head

    def size(self):
        return len(self.data) + self.remaining

    def close(self):
        """Let go of the file and the generator. Closing a generator runs its ``finally``
        blocks in this thread (the reactor's, if the client left mid-stream): the Response
        docs ask handlers to keep them short."""
        self._close_file()
        stream, self.stream = self.stream, None
        close = getattr(stream, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                pass   # a handler's cleanup that fails must not end the reactor's turn

    def _close_file(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def write_response(sock, response, keep_alive, version, head_only, turn_s):
    """Send ``response`` for at most ``turn_s`` (the worker's turn). Returns (body bytes sent,
    None) when it has all left, or (body bytes sent, Outbox) for the reactor to finish (a
    stream's generator may go on in a later worker: see ``produce``). Raises ClientGone."""
    status = response.status
    no_body = head_only or status in _NO_BODY_STATUSES or status < 200
    body = response.body
    if response.file is None and response.stream is None and body and not no_body \
            and len(body) <= _SMALL_BODY_BYTES:
        # nearly every response: head and body in one send, which takes it all (the turn's
        # deadline is read only if it does not: issue 23, a clock read and a call a request)
        data = render_head(status, response.headers, len(body), keep_alive, version) + body
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0   # SO_SNDTIMEO (worker_write_s) passed with nothing taken
        except OSError as error:
            raise ClientGone(str(error)) from None
        if sent == len(data):
            return len(body), None
        head_bytes = len(data) - len(body)
        sent += _send_some(sock, memoryview(data)[sent:], time.monotonic() + turn_s)
        if sent == len(data):
            return len(body), None
        return max(0, sent - head_bytes), _rest(data, head_bytes, sent)
    deadline = time.monotonic() + turn_s
    if response.file is not None:
        return _write_file(sock, response, keep_alive, version, no_body, deadline)
    if response.stream is not None:
        return _write_stream(sock, response, keep_alive, version, no_body, deadline)
    head = render_head(status, response.headers, len(body), keep_alive, version)
    if no_body or not body:
        return 0, _rest(head, len(head), _send_some(sock, head, deadline))
    sent = _send_some(sock, head, deadline)
    if sent < len(head):
        return 0, Outbox(memoryview(head)[sent:].tobytes() + body, len(head) - sent)
    sent = _send_some(sock, body, deadline)
    return sent, _rest(body, 0, sent, sent)


def _rest(data, head_bytes, sent, body_sent=None):
    """None if ``sent`` covers ``data``; else an Outbox of the rest."""
    if sent >= len(data):
        return None
    if body_sent is None:
        body_sent = max(0, sent - head_bytes)
    return Outbox(memoryview(data)[sent:], max(0, head_bytes - sent), body_sent=body_sent)


def _write_file(sock, response, keep_alive, version, no_body, deadline):
    offset, length = response.file_range
    handle = response.file
    head = render_head(response.status, response.headers, length, keep_alive, version)
    if no_body or not length:
        handle.close()
        return 0, _rest(head, len(head), _send_some(sock, head, deadline))
    # MSG_MORE: the head waits to leave in the file's first segment instead of a packet of its
    # own, one transmit (and on loopback one receive) fewer per response
    sent = _send_some(sock, head, deadline, _MSG_MORE)
    if sent < len(head):
        return 0, Outbox(memoryview(head)[sent:], len(head) - sent, handle, offset, length)
    try:
        sent = _send_file_some(sock, handle, offset, length, deadline)
    except BaseException:
        handle.close()
        raise
    if sent == length:
        handle.close()
        return sent, None
    return sent, Outbox(b"", 0, handle, offset + sent, length - sent, sent)


def _send_some(sock, data, deadline, flags=0):
    """Send ``data`` until it has all left, the client stops taking it for SO_SNDTIMEO, or
    ``deadline`` passes; the bytes sent. Nearly always one call: a head, a small body."""
    view = data
    sent = 0
    while True:
        try:
            count = sock.send(view, flags)
        except BlockingIOError:
            return sent   # SO_SNDTIMEO (worker_write_s) passed with nothing taken
        except OSError as error:
            raise ClientGone(str(error)) from None
        sent += count
        if count == len(view) or time.monotonic() > deadline:
            return sent
        view = memoryview(view)[count:]


def _send_file_some(sock, handle, offset, length, deadline):
    """Zero-copy with os.sendfile, in as few calls as the client's pace allows: the socket
    blocks, so the kernel waits for buffer room itself instead of this thread polling and
    re-entering Python every few hundred KiB (SO_SNDTIMEO bounds each wait). Stops at
    ``deadline``; the bytes sent. Where sendfile is missing, or over TLS (whose bytes must go
    through the SSL object), read and send FILE_CHUNK_BYTES at a time: a piece the socket did
    not take is read again, whole, by the Outbox (OpenSSL wants the same bytes again)."""
    sent = 0
    zero_copy = hasattr(os, "sendfile") and type(sock) is socket.socket
    while sent < length:
        try:
            if zero_copy:
                count = os.sendfile(sock.fileno(), handle.fileno(), offset + sent, length - sent)
            else:
                piece = os.pread(handle.fileno(), min(length - sent, FILE_CHUNK_BYTES),
                                 offset + sent)
                count = sock.send(piece) if piece else 0
        except BlockingIOError:
            return sent   # SO_SNDTIMEO passed, nothing sent
        except OSError as error:
            raise ClientGone(str(error)) from None
        if count == 0:
            raise ClientGone("file shrank while being sent")
        sent += count
        if time.monotonic() > deadline:
            return sent
    return sent


def _write_stream(sock, response, keep_alive, version, no_body, deadline):
    """A streamed body's first turn: the head, then what the generator produces (see
    ``produce``); (body bytes sent, None) if it has all left, else the Outbox of the rest.
    An event stream's head is not sent here: it goes to the reactor in a Subscriber, which
    sends it if the stream is admitted (onebox/streams.py)."""
    if type(response.stream) is EventStream and not no_body:
        # its body ends when the connection does (RFC 9112 section 6.3, rule 8): no chunked
        # framing to write per event; "HTTP/1.0" only tells render_head not to chunk it
        return 0, Subscriber(render_head(response.status, response.headers, None, False,
                                         "HTTP/1.0"), response.stream)
    head = render_head(response.status, response.headers, None, keep_alive, version)
    outbox = Outbox(head, len(head))
    outbox.chunked = version == "HTTP/1.1" and not no_body
    outbox.stream = iter(() if no_body else response.stream)
    try:
        produce(sock, outbox, deadline)
    except BaseException:
        outbox.close()
        raise
    if outbox.data or outbox.stream is not None:
        return outbox.body_sent, outbox
    return outbox.body_sent, None


def produce(sock, outbox, deadline):
    """Run a streamed body's generator on, in a worker (handler code never runs in the
    reactor), sending what the client takes as it goes: until the generator ends, or more than
    STREAM_BUFFER_BYTES of its chunks wait unsent at ``deadline`` (the worker's turn). Then
    ``outbox.data`` holds the unsent rest and ``outbox.stream`` the generator, or None if it
    ended: the reactor sends the rest, and gives the connection back to a worker for more
    (Reactor._send_more). A slow reader holds a buffer, never a worker; a slow generator holds
    its worker, the handler's choice. Raises StreamFailed, or ClientGone."""
    pending = bytearray(outbox.data)
    outbox.data = memoryview(b"")
    stream = outbox.stream
    while stream is not None:
        try:
            piece = next(stream, None)
        except Exception as error:
            outbox.stream = None
            raise StreamFailed(traceback.format_exc()) from error
        if piece is None:
            stream = outbox.stream = None
            if outbox.chunked:
                pending += b"0\r\n\r\n"
        elif piece:
            pending += b"%x\r\n%s\r\n" % (len(piece), piece) if outbox.chunked else piece
        if stream is None or len(pending) > STREAM_BUFFER_BYTES:
            sent = _send_some(sock, pending, deadline)   # the socket blocks, for the turn at most
        else:
            sent = _send_some(sock, pending, 0.0, socket.MSG_DONTWAIT)
        if sent:
            outbox.count_sent(sent)
            del pending[:sent]
        if len(pending) > STREAM_BUFFER_BYTES:
            break
    outbox.data = memoryview(pending)   # never resized again: a new bytearray next turn


def _send_all_now(sock, data):
    """A few bytes (100 Continue) that an empty socket buffer always takes; ClientGone if not."""
    if _send_some(sock, data, 0.0) < len(data):
        raise ClientGone("the client takes nothing")
