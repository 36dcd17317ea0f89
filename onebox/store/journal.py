"""The journal and the group commit: how a write becomes durable, and when it becomes visible.

Durability modes (``Store(durability=...)``)
    ``always``  a write returns only after its record is written and fsync'd, and only then is it
                visible; concurrent writers share one write() and one fsync (group commit).
    ``batch``   a write returns, visible, once its record is in the OS page cache; a background
                thread fsyncs every ``batch_interval_ms``, so an OS crash or power cut loses at most
                that window (a crash of the process alone loses nothing).
    ``off``     as ``batch`` but the journal is fsync'd only by compaction and close: an OS crash
                may lose everything since; for tests and caches.

    A write that cannot be made durable raises ``StateWriteError`` (the server's 503) and leaves
    memory and the journal as they were; later writes succeed once the disk does.

Invariants
    * In mode ``always`` a record is applied to memory only after it is durable, so a write that
      failed is never visible, and a write that returned is visible to every later read.
    * Records are appended in sequence order under ``_jlock`` and applied to memory in that order.
    * Only the leader (a role, not a thread: a flag under ``_commit_lock``) writes, fsyncs or swaps
      the journal fd; no fsync runs under ``_jlock`` but the one that rotates the journal.

``JournalWriter`` is a part of ``Store`` (``store.py``), cut out to be read alone: its fields are
made, beside the locks that guard them, in ``Store.__init__``; it needs from the rest of the
store ``_apply_locked`` (memory) and ``_start_background_compaction`` (``snapshot.py``).

Imports the standard library, the contract's errors (``handlers._state``), ``disk`` and
``frames``.
"""
import errno
import os
import threading

from handlers._state import StateError, StateWriteError
from onebox.store.disk import write_all
from onebox.store.frames import encode_frame, record_payload

DURABILITY_MODES = ("always", "batch", "off")
EIO_STEPS = ("journal-fsync",)   # where the ``_eio_at`` test seam can inject an EIO


class Ticket(object):
    """A place in the group-commit line: an appended record (seq) waiting for its fsync, or
    (seq None) a compaction or flusher waiting for the leader role. A waiter sleeps on ``wake``, a
    lock born locked, which is released by whoever resolves it (sets ``result``: True once durable
    and applied, else the failure message) or hands it the leader role (sets ``lead``)."""
    __slots__ = ("seq", "result", "lead", "wake")

    def __init__(self, seq):
        self.seq = seq
        self.result = None
        self.lead = False
        self.wake = None


class JournalWriter(object):
    """The journal's append side, the group commit and the batch-mode flusher; a part of
    ``Store`` (see the module docstring). Methods ending in ``_locked`` need ``_jlock`` held."""

    # --- appending records -------------------------------------------------------------------

    def _append_ops_locked(self, ops):
        """Append one record for ops; _jlock held. Returns a Ticket to wait on (``always``), or
        None after applying ops to memory (``batch``/``off``: visible now, in journal order)."""
        self._check_writable_locked()
        seq = self._next_seq
        self._append_locked(encode_frame(record_payload(seq, ops)))
        self._next_seq = seq + 1
        if self.durability != "always":
            with self._lock:
                self._apply_locked(ops, seq)
            return None
        ticket = Ticket(seq)
        self._unapplied.append((seq, ops, ticket))
        for key, text in ops:
            self._overlay[key] = (seq, text)
        return ticket

    def _check_writable_locked(self):
        if self._closed:
            raise StateError("the store is closed")
        if self._jfatal:
            raise StateWriteError(self._jfatal)
        if self._jbroken:  # an earlier failure could not cut the journal back: try again first
            self._truncate_journal_locked(self._jsize)
            if self._jbroken:
                raise StateWriteError("journal %s is not writable since an earlier I/O error"
                                      % self._paths["journal"])

    def _append_locked(self, frame):
        """Add frame at the end of the journal (``_jsize`` counts it), or leave the journal as it
        was and raise. In ``always`` mode the frame only joins _buffer: nobody hears of it before
        the group fsync, so the leader writes the whole group with one syscall."""
        start = self._jsize
        if self.durability == "always":
            self._buffer.append(frame)
            self._jsize = start + len(frame)
            return
        try:
            write_all(self._jfd, frame)
        except OSError as exc:
            self._truncate_journal_locked(start)
            raise StateWriteError("journal write failed (%s): %s; nothing was written"
                                  % (exc.strerror or exc, self._paths["journal"])) from None
        self._jsize = start + len(frame)

    def _take_buffer_locked(self):
        data = b"".join(self._buffer)
        self._buffer = []
        return data

    def _truncate_journal_locked(self, size):
        """Cut the journal back to size (O_APPEND: the next write lands there)."""
        self._jsize = size
        try:
            os.ftruncate(self._jfd, size)
            self._jbroken = False
        except OSError as exc:
            self._jbroken = True
            self._log("cannot cut journal %s back to %d bytes (%s); writes refused until it can"
                      % (self._paths["journal"], size, exc))

    # --- group commit (mode always) ---------------------------------------------------------
    #
    # Writers add their frame to _buffer under _jlock, then wait here. Whoever finds no leader
    # becomes it: it writes the whole buffer with one write() and one fsync, applies those records
    # to memory in journal order, wakes exactly their writers, and hands the role to the oldest
    # writer still waiting (its record came later: it leads the next group). Writers arriving
    # during an fsync form the next group. If the write or fsync fails, every record not yet
    # durable fails with it -- later ones may have been computed from earlier ones -- and the
    # journal is cut back to the last durable byte.

    def _wait_durable(self, ticket):
        if self._take_leader_or_queue(ticket):
            try:
                while ticket.result is None:  # only the leader sets it: no lock needed to read
                    self._lead_group_commit()  # covers our record: it was appended before we came
            finally:
                self._release_leader()
        if ticket.result is not True:
            raise StateWriteError(ticket.result)  # a new instance per writer: tracebacks differ

    def _take_leader_or_queue(self, ticket):
        """Return True holding the leader role, or False once ticket is resolved. Sleeping
        waiters are woken one by one, never all at once: a herd of 64 threads fighting for the
        GIL after each fsync would cost more than the fsync."""
        with self._commit_lock:
            if ticket.result is not None:
                return False
            if not self._leader:
                self._leader = True
                return True
            ticket.wake = threading.Lock()
            ticket.wake.acquire()
            self._waiters.append(ticket)
        ticket.wake.acquire()  # released by _resolve, or by _release_leader handing us the role
        return ticket.lead

    def _acquire_leader(self):
        self._take_leader_or_queue(Ticket(None))  # never resolved: returns only with the role

    def _release_leader(self):
        """Hand the role to the oldest waiter still unresolved (it has records to fsync, or is a
        compaction), else drop it."""
        with self._commit_lock:
            while self._waiters and self._waiters[0].result is not None:
                self._waiters.popleft()
            if self._waiters:
                heir = self._waiters.popleft()
                heir.lead = True
                heir.wake.release()
            else:
                self._leader = False

    def _lead_group_commit(self):
        """Write and fsync all appended records, then publish them; leader role held."""
        with self._jlock:
            target, size, fd = self._next_seq - 1, self._jsize, self._jfd
            if target <= self._durable_seq:
                return
            data = self._take_buffer_locked()
        try:  # the slow steps, outside every lock
            self._write_and_fsync(fd, data)
        except OSError as exc:
            with self._jlock:
                self._fail_unsynced_locked(exc)
            return
        with self._jlock:
            self._publish_locked(target, size)

    def _write_and_fsync(self, fd, data):
        try:
            write_all(fd, data)
        except OSError as exc:
            exc.journal_step = "write"  # for the message: disk full shows here, EIO at fsync
            raise
        self._fsync_journal(fd)

    def _fsync_journal(self, fd):
        """fsync the journal; leader role held (it guards _fsyncs and the _eio_at seam)."""
        if self._eio_at.get("journal-fsync", 0) > 0:
            self._eio_at["journal-fsync"] -= 1
            raise OSError(errno.EIO, "injected by _eio_at")
        os.fsync(fd)
        self._fsyncs += 1

    def _publish_locked(self, target, size):
        """Records up to target are durable: apply them to memory in order, drop them from the
        overlay, wake their writers. _jlock held (so the overlay never lags memory)."""
        batch = []
        while self._unapplied and self._unapplied[0][0] <= target:
            batch.append(self._unapplied.popleft())
        with self._lock:
            for seq, ops, _ in batch:
                self._apply_locked(ops, seq)
        for seq, ops, _ in batch:
            for key, _ in ops:
                entry = self._overlay.get(key)
                if entry is not None and entry[0] <= target:
                    del self._overlay[key]
        self._durable_seq, self._durable_size = target, size
        self._resolve([t for _, _, t in batch], True)

    def _fail_unsynced_locked(self, exc):
        """The journal fsync failed. ``always``: every record after the last durable one fails
        (later ones may have been computed from earlier ones), the journal is cut back, memory
        never saw them. ``batch``/``off``: those writes were already acknowledged; say so loudly."""
        if self.durability != "always":
            self._log("journal fsync failed (%s): %s; writes since the last fsync may be lost on an "
                      "OS crash; compaction will rewrite the state" % (exc, self._paths["journal"]))
            return
        failed = [t for _, _, t in self._unapplied]
        self._unapplied.clear()
        self._overlay.clear()
        self._buffer = []
        self._next_seq = self._durable_seq + 1
        self._truncate_journal_locked(self._durable_size)
        message = ("journal %s failed (%s): %s; %d write(s) rolled back"
                   % (getattr(exc, "journal_step", "fsync"), exc.strerror or exc,
                      self._paths["journal"], len(failed)))
        self._log(message)
        self._resolve(failed, message)

    def _resolve(self, tickets, result):
        with self._commit_lock:
            for ticket in tickets:
                ticket.result = result
                if ticket.wake is not None:
                    ticket.wake.release()

    # --- batch mode: the flusher thread -----------------------------------------------------

    def _flush_loop(self):
        while not self._stop.wait(self.batch_interval_ms / 1000.0):
            if self._sync_appended() is not None:
                # Acknowledged writes may not be on disk: a snapshot makes memory durable again.
                self._start_background_compaction(force=True)

    def _sync_appended(self):
        """Make everything appended so far durable (flusher thread, close). Returns the OSError
        of a failed fsync in ``batch``/``off`` mode, else None (``always`` fails the writers)."""
        self._acquire_leader()
        try:
            if self.durability == "always":
                self._lead_group_commit()
                return None
            with self._jlock:
                target, size, fd = self._next_seq - 1, self._jsize, self._jfd
                if target <= self._durable_seq or fd is None:
                    return None
            try:
                self._fsync_journal(fd)
            except OSError as exc:
                with self._jlock:
                    self._fail_unsynced_locked(exc)
                return exc
            with self._jlock:
                self._durable_seq, self._durable_size = target, size
            return None
        finally:
            self._release_leader()
