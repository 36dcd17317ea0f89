"""Logs: the access log (one line per request, on stdout), error-log entries, and escaping.

Owns ``AccessLog``: buffered, written by its own flusher thread, bounded, and never a reason for
a request to wait. Imports only the standard library.
"""
import os
import re
import threading
import time

# One line per request in the combined log format plus the duration. Lines are buffered and
# written by a flusher thread at least every log_flush_interval_s, so a request costs no syscall.

_LOG_ESCAPE_RE = re.compile(r'[\x00-\x1f\x7f-\xff"\\]')


def _log_escape(text):
    """Escape control bytes, quotes and backslashes as nginx does (\\xHH), so no client can
    forge or break a log line."""
    if not text:
        return "-"
    return _LOG_ESCAPE_RE.sub(lambda m: "\\x%02X" % (ord(m.group()) & 0xFF), text)


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# syslog(3) priorities, as journald reads them at the start of each line of a stream
# (sd-daemon(3): "<3>" error, "<4>" warning, "<6>" info); ``journalctl -p warning`` filters on them.
PRIORITIES = {"error": 3, "warning": 4, "info": 6}


def error_entry(stamp, message, detail=None, level="error", priorities=False):
    """One error-log entry: ``message`` on one line, its control characters escaped as the
    access log escapes them (a "%0A" in a logged URL must not start a forged line), then any
    ``detail`` (a traceback), every line of it indented, so that none can pass for an entry.
    ``level``: "error", "warning" or "info". With ``priorities`` (stderr is the journal's:
    ``journal_stream``) every line starts with the level's syslog prefix, since journald makes
    a record of each line, a traceback's included."""
    lines = ["%s onebox: %s" % (stamp, _escape_controls(message.rstrip()))]
    if detail:
        lines += ["    %s" % _escape_controls(line) for line in detail.rstrip().split("\n")]
    prefix = "<%d>" % PRIORITIES[level] if priorities else ""
    return "".join("%s%s\n" % (prefix, line) for line in lines)


def journal_stream(stream, environ=None):
    """Whether ``stream`` is connected to systemd's journal: $JOURNAL_STREAM ("DEV:INODE",
    systemd.exec(5)) names the very file the stream's descriptor is, not merely one that a
    parent had (a redirected stderr keeps the variable but is another file)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return value == "%d:%d" % (status.st_dev, status.st_ino)


def _escape_controls(text):
    return _CONTROL_RE.sub(lambda match: "\\x%02X" % ord(match.group()), text)


class AccessLog:
    """Buffered access log. ``write`` may be called from any thread and never waits on the
    stream: lines queue in memory and one flusher thread writes them at least every
    ``flush_interval_s`` (sooner once FLUSH_BYTES wait), so a request costs no system call.

    A stream that stops taking lines (stdout piped to a reader that stalls) blocks only the
    flusher. The queue is bounded by ``buffer_bytes``: past it lines are dropped and counted,
    with a notice on the error log at most once a minute. The flusher is a daemon thread that
    writes with ``os.write`` on the stream's descriptor, holding no Python lock while it
    waits, so a stalled reader can neither stop serving nor stop the process from exiting
    (a daemon thread blocked inside ``sys.stdout``'s buffer would abort interpreter exit:
    "could not acquire lock for <_io.BufferedWriter name='<stdout>'>"). Streams without a
    descriptor (the tests' captures) are written with ``write``.

    Fields: ``pending``, ``pending_bytes``, ``dropped`` and ``_noticed_at`` are guarded by
    ``lock`` (written by any thread that logs, and by the flusher); ``_flush_lock`` keeps
    two flushes from interleaving their writes.
    """

    FLUSH_BYTES = 64 * 1024
    NOTICE_INTERVAL_S = 60.0
    CLOSE_WAIT_S = 1.0   # at exit, how long a stalled stream may delay it

    def __init__(self, stream, flush_interval_s, buffer_bytes=1 << 20, notice=None):
        self.stream = stream
        self.interval = flush_interval_s
        self.buffer_bytes = buffer_bytes
        self._notice = notice or (lambda message: None)
        self._fd = _descriptor_of(stream)
        self.lock = threading.Lock()
        self.pending = []
        self.pending_bytes = 0
        self.dropped = 0
        self._noticed_at = -self.NOTICE_INTERVAL_S
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._linger = False   # retired: flush once more, an interval after stopping
        self.thread = threading.Thread(target=self._run, name="onebox-log", daemon=True)
        self._time_cache = (0, "")

    def start(self):
        self.thread.start()

    def configure(self, flush_interval_s, buffer_bytes):
        """New flush interval and buffer bound (a reload; any thread). Both are plain values
        read afresh at each use; the flusher is woken so that a shorter interval starts now."""
        self.interval, self.buffer_bytes = flush_interval_s, buffer_bytes
        self._wake.set()

    def retire(self):
        """Stop without waiting (a reload turned the access log off, in the reactor thread,
        which must not wait on a stalled stream). The flusher writes what is queued, and once
        more an interval later for the lines of requests that were finishing at the switch
        (they hold this log), then ends."""
        self._linger = True
        self._stopping = True
        self._wake.set()

    def write(self, record, seconds):
        """The access line of ``record`` (onebox/books.py), ``seconds`` after it started; any
        thread."""
        now = int(time.time())
        if self._time_cache[0] != now:
            self._time_cache = (now, time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now)))
        # The access line: the combined log format (client, time, request line, status, body
        # bytes sent, referer, user agent), the duration, then ``record.note`` (the guard's
        # decision, 'guard=429:client_rate'; ``health``; ``admin``...). A field added to the
        # line is added here, from the record (onebox/books.py).
        note = record.note
        if record.received:   # request body bytes, for the requests that sent one (uploads)
            note = "in=%d %s" % (record.received, note) if note else "in=%d" % record.received
        line = '%s - - [%s] "%s" %d %s "%s" "%s" %.3fms%s\n' % (
            record.ip, self._time_cache[1], _log_escape(record.line), record.status,
            record.sent or "-", _log_escape(record.referer), _log_escape(record.agent),
            seconds * 1000, " " + note if note else "")
        with self.lock:
            if self.pending_bytes + len(line) > self.buffer_bytes:
                self.dropped += 1
                notice = self._notice_due_locked()
            else:
                self.pending.append(line)
                self.pending_bytes += len(line)
                notice = None
            full = self.pending_bytes >= self.FLUSH_BYTES
        if full:
            self._wake.set()
        if self._linger and not self.thread.is_alive():
            # retired by a reload, and its flusher gone: the line of a request that outlived
            # its site (onebox/site.py) is written now, by its own thread (rare)
            self.flush()
        if notice:
            self._notice(notice)

    def _notice_due_locked(self):
        now = time.monotonic()
        if now - self._noticed_at < self.NOTICE_INTERVAL_S:
            return None
        self._noticed_at = now
        return ("access log: %d lines dropped so far: the access log stream is not taking "
                "them (is stdout read?)" % self.dropped)

    def flush(self):
        with self._flush_lock:
            with self.lock:
                lines, self.pending, self.pending_bytes = self.pending, [], 0
            if lines:
                self._write("".join(lines))

    def _write(self, text):
        try:
            if self._fd is None:
                self.stream.write(text)
                self.stream.flush()
                return
            data = memoryview(text.encode("utf-8", "backslashreplace"))
            while data:
                data = data[os.write(self._fd, data):]
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): logging must never take the server down

    def _run(self):
        while not self._stopping:
            self._wake.wait(self.interval)
            self._wake.clear()
            self.flush()
        if self._linger:
            time.sleep(self.interval)
            self.flush()

    def close(self):
        """Write what is queued, waiting at most CLOSE_WAIT_S for a stalled stream."""
        self._stopping = True
        self._wake.set()
        if self.thread.is_alive():
            self.thread.join(self.CLOSE_WAIT_S)
        if self.thread.is_alive():
            with self.lock:
                lost = self.dropped + len(self.pending)
            self._notice("access log: the stream is not taking lines; %d lines lost at exit"
                         % lost)
        else:
            self.flush()


def _descriptor_of(stream):
    """The OS descriptor under a text stream (its buffer flushed first), or None."""
    try:
        stream.flush()
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
