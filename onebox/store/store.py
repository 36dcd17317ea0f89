"""The Store: string keys, JSON values, held in memory, made durable by a journal.

The store's public verbs, its fields and locks, and the story of a write live here; the parts
that must be read with care but can be read alone are beside it, each a part of ``Store``:
``journal.py`` (appending and the group commit), ``snapshot.py`` (compaction, backups),
``recovery.py`` (opening, replay, repair). ``values.py``, ``frames.py``, ``index.py`` and
``disk.py`` are plain functions and one data structure, with no store state.

Invariants
    * Memory holds exactly the effect of records 1..applied_seq, applied in journal order.
    * A write costs O(size of its record). Only compaction and backup are O(size of state), and
      they hold the memory lock only for one ``dict`` copy.
    * Every record carries a sequence number and the snapshot names the last one it covers; replay
      skips covered records. So a crash at any instant -- mid-append, mid-compaction -- loses no
      acknowledged write and applies none twice. (Records are idempotent as well: ``incr`` is
      journalled as its result, so even a replayed covered record could not count twice.)
    * Readers never wait on disk or on writers: ``get`` takes ``_lock`` for one dict operation,
      ``items``/``keys`` for a few bisects of the sorted key index and one lookup per key they
      return; no fsync, write or user code ever runs under it.

Locks (acquire in this order; never the other way; each one's comment in __init__ says what it
guards)
    ``_compact_lock`` -> leader role (a flag under ``_commit_lock``) -> ``_jlock`` -> ``_lock`` /
    ``_commit_lock``. Methods ending in ``_locked`` need ``_jlock`` held (``_apply_locked``:
    ``_lock``). Only one fsync ever runs under ``_jlock``: the one that rotates the journal.

Test seams (keyword arguments starting with ``_``; never used by the server)
    ``_crash_at="step"``   ``os._exit(CRASH_EXIT_CODE)`` when compaction reaches that step, one of
                           ``COMPACTION_STEPS``; tests run it in a subprocess and reopen.
    ``_eio_at={"journal-fsync": n}``  the next n fsyncs of the journal raise ``OSError(EIO)``, the
                           one fault that cannot be provoked from user space (disk full can, with
                           ``RLIMIT_FSIZE``).

Imports the standard library, the contract (``handlers._state``: the interface ``StateStore``
that ``state`` forwards to, the errors) and the modules of this package.
"""
import os
import sys
import threading
from collections import deque

from handlers._state import StateError, StateStore, StateWriteError
from onebox.store.journal import DURABILITY_MODES, EIO_STEPS, JournalWriter
from onebox.store.recovery import Recovery
from onebox.store.snapshot import COMPACTION_STEPS, Compaction
from onebox.store.values import (check_int, check_key, check_listing, encode_value, int_value,
                                 loads)


def _log_stderr(message):
    sys.stderr.write("state: %s\n" % message)
    sys.stderr.flush()


class Store(JournalWriter, Compaction, Recovery, StateStore):
    """The shared store. One per data directory; every method is safe from any thread.

    For callers: ``get``, ``items``, ``keys`` (never wait on disk); ``put``, ``delete``, ``incr``,
    ``transaction`` (return when durable per the mode; raise ``StateWriteError`` if not);
    ``compact``, ``backup``, ``stats``, ``close``. ``with Store(...) as s:`` closes on exit.
    Nothing is meant for overriding. It keeps the contract's ``StateStore`` interface (what
    ``state`` forwards to); its other bases are its own parts, one module each (see above).
    """

    SNAPSHOT_CHUNK_KEYS = 1000      # keys per snapshot frame: bounds memory while writing/loading
    # Keys per block of the sorted key index (SortedKeys): a new key moves at most twice this
    # many pointers, and a listing bisects over (keys / this) block heads. At a million keys
    # both stay a few microseconds (bench/bench_state.py --listing).
    INDEX_BLOCK_KEYS = 1000
    COMPACT_RETRY_S = 30.0          # after a failed background compaction (disk full), wait this long

    cluster = None   # this store is the process's own (RedisStore's is its onebox/cluster.py link)

    def __init__(self, data_dir, durability="always", batch_interval_ms=50,
                 compact_journal_bytes=64 * 1024 * 1024, repair=False, log=None,
                 _crash_at=None, _eio_at=None):
        # Long: every field that threads share is made here, beside the lock that guards it.
        self._check_settings(durability, batch_interval_ms, compact_journal_bytes, _crash_at, _eio_at)
        self.data_dir = os.path.abspath(data_dir)
        self.durability = durability
        self.batch_interval_ms = batch_interval_ms
        self.compact_journal_bytes = compact_journal_bytes
        self._log = log if log is not None else _log_stderr
        self._repair = bool(repair)
        self._crash_at = _crash_at
        self._eio_at = dict(_eio_at or {})
        self._paths = {name: os.path.join(self.data_dir, name) for name in
                       ("lock", "snapshot", "snapshot.tmp", "journal", "journal.prev")}

        # _lock guards what readers see: _data (key -> JSON as UTF-8 bytes), _index (its keys in
        # order, for listings), _bytes, _applied_seq, _writes.
        self._lock = threading.Lock()
        # _jlock guards the write side: the journal fd and _jsize, _jbroken, _jfatal, _buffer,
        # _next_seq, _durable_seq/_durable_size, _unapplied, _overlay, _closed, _tx_owner. A transaction holds
        # it while its body runs, so transactions are serialisable; no fsync runs under it except
        # the one that rotates the journal during compaction.
        self._jlock = threading.Lock()
        # _commit_lock guards _leader (someone may fsync or swap the journal fd), _waiters, and
        # the result/lead/wake of every Ticket.
        self._commit_lock = threading.Lock()
        # _compact_lock: one compaction or close at a time; held across disk I/O, guards no memory.
        self._compact_lock = threading.Lock()
        # _bg_lock guards _compactor, _compact_retry_at, _closing.
        self._bg_lock = threading.Lock()

        self._data, self._bytes, self._applied_seq, self._writes = {}, 0, 0, 0
        self._index = None          # a SortedKeys of _data's keys; None until _open has loaded
        self._jfd, self._jsize, self._jbroken, self._closed, self._tx_owner = None, 0, False, False, None
        self._next_seq, self._durable_seq, self._durable_size = 1, 0, 0
        self._jfatal = None         # why writes are refused until restart, if they are
        self._unapplied = deque()   # (seq, ops, ticket) appended but not yet durable, in seq order
        self._buffer = []           # ``always``: their frames not yet written (the leader writes)
        self._overlay = {}          # key -> (seq, text or None) of those records: what writers see
        self._leader = False
        self._waiters = deque()     # _Tickets asleep on their wake lock, oldest first
        self._fsyncs, self._compactions = 0, 0
        self._compactor, self._compact_retry_at, self._closing = None, 0.0, False
        self._compact_forced = False
        self._stop = threading.Event()
        self._flusher = None

        self._make_private_dir()
        self._lock_fd = self._take_flock()
        try:
            self._open()
        except Exception:
            self._release_files()
            raise
        if durability == "batch":
            # Daemon: if the owner never calls close(), exit must not hang on this loop; what it
            # has not fsync'd yet is in the page cache and survives a process exit anyway.
            self._flusher = threading.Thread(target=self._flush_loop, name="state-flusher",
                                             daemon=True)
            self._flusher.start()

    @staticmethod
    def _check_settings(durability, batch_interval_ms, compact_journal_bytes, crash_at, eio_at):
        if durability not in DURABILITY_MODES:
            raise ValueError("'durability' must be one of %s" % ", ".join(DURABILITY_MODES))
        if not isinstance(batch_interval_ms, (int, float)) or not 1 <= batch_interval_ms <= 60000:
            raise ValueError("'batch_interval_ms' must be between 1 and 60000")
        check_int(compact_journal_bytes, "compact_journal_bytes")
        if compact_journal_bytes < 1:
            raise ValueError("'compact_journal_bytes' must be positive")
        if crash_at is not None and crash_at not in COMPACTION_STEPS:
            raise ValueError("'_crash_at' must be one of %s" % ", ".join(COMPACTION_STEPS))
        for step in eio_at or {}:
            if step not in EIO_STEPS:
                raise ValueError("'_eio_at' steps must be among %s" % ", ".join(EIO_STEPS))

    # --- reads: memory only, under _lock for one dict operation ------------------------------

    def get(self, key, default=None):
        """The value at key (a fresh object the caller may change), or default."""
        check_key(key)
        with self._lock:
            text = self._data.get(key)
        return default if text is None else loads(text)

    def items(self, prefix="", limit=None):
        """[(key, value)] for keys starting with prefix, sorted by key; the first ``limit`` pairs
        if it is given. Costs O(log keys + pairs returned), whatever else is stored (a sorted key
        index); decodes only the values it returns."""
        return [(k, loads(t)) for k, t in self._matching(prefix, limit)]

    def keys(self, prefix="", limit=None):
        """Sorted keys starting with prefix (the first ``limit`` of them), like items: O(log keys
        + keys returned)."""
        check_listing(prefix, limit)
        with self._lock:
            return self._index.starting_with(prefix, limit)

    def _matching(self, prefix, limit):
        check_listing(prefix, limit)
        with self._lock:  # bisects, slices and one lookup per key returned; decoding is after
            keys = self._index.starting_with(prefix, limit)
            texts = list(map(self._data.__getitem__, keys))
        return list(zip(keys, texts))

    def stats(self):
        """Counters for /metrics and the status page. Approximate: no lock is held across them."""
        with self._lock:
            out = {"keys": len(self._data), "bytes": self._bytes, "writes": self._writes,
                   "applied_seq": self._applied_seq}
        # Plain int reads are atomic in CPython; taking _jlock here could wait on a transaction body.
        out.update(journal_bytes=self._jsize, fsyncs=self._fsyncs, compactions=self._compactions,
                   durability=self.durability)
        try:
            snapshot = os.stat(self._paths["snapshot"])
            out["snapshot_bytes"], out["snapshot_time"] = snapshot.st_size, snapshot.st_mtime
        except OSError:
            out["snapshot_bytes"], out["snapshot_time"] = 0, 0.0   # never compacted yet
        return out

    # --- writes: the public verbs -------------------------------------------------------------

    def put(self, key, value):
        """Set key to value (JSON). Returns when durable per the mode."""
        check_key(key)
        text = encode_value(value)
        self._write(lambda current: ([(key, text)], None))

    def delete(self, key):
        """Remove key. Returns whether it existed (then only once the removal is durable)."""
        check_key(key)

        def build(current):
            if current(key) is not None:
                return [(key, None)], True
            # Absent. If an in-flight record removed it, journal the delete too, so that we
            # answer only once that removal is durable (it rides on the same fsync).
            return ([(key, None)] if key in self._overlay else []), False
        return self._write(build)

    def incr(self, key, n=1):
        """Add n to the int at key (missing counts as 0) and return the new value. Exact under
        any concurrency: the new value is computed under the journal lock and journalled as such."""
        check_key(key)
        check_int(n, "n")

        def build(current):
            total = int_value(current(key)) + n
            return [(key, b"%d" % total)], total
        return self._write(build)

    def transaction(self):
        """``with store.transaction() as tx:`` -- tx has get/put/delete/incr; one journal record,
        all or nothing. An exception in the body writes nothing. Other writers wait while the body
        runs (readers don't), so keep it short: no I/O, no waiting. tx.get sees in-flight writes
        of other threads; if one of those fails, this transaction fails with it."""
        self._check_not_in_tx()
        return _TransactionContext(self)

    # --- writes: one story ------------------------------------------------------------------

    def _write(self, build):
        """1. under _jlock: compute the ops from the latest value (build(current)) and append
        the record; 2. wait for the group fsync, whose leader applies it to memory; 3. maybe start
        a background compaction."""
        self._check_not_in_tx()
        with self._jlock:
            ops, result = build(self._current_locked)
            ticket = self._append_ops_locked(ops) if ops else None
        self._finish_write(ticket)
        return result

    def _finish_write(self, ticket):
        if ticket is not None:
            self._wait_durable(ticket)
        if self._jsize >= self.compact_journal_bytes:
            self._start_background_compaction()

    def _check_not_in_tx(self):
        if self._tx_owner == threading.get_ident():
            raise RuntimeError("inside store.transaction() use the tx object, not the store")

    def _current_locked(self, key):
        """Latest text of key including appended-but-not-yet-durable records; _jlock held."""
        if self._overlay:
            entry = self._overlay.get(key)
            if entry is not None:
                return entry[1]
        with self._lock:
            return self._data.get(key)

    def _apply_locked(self, ops, seq):
        """Apply one record to memory; _lock held. The index changes only when a key enters or
        leaves _data: an overwrite assigns in place, so the dict keeps the key object the index
        shares. (While _open replays the journal there is no index yet: it is built after.)"""
        data, index = self._data, self._index
        for key, text in ops:
            old = data.get(key)
            if old is not None:
                self._bytes -= len(key) + len(old)
            if text is not None:
                data[key] = text
                self._bytes += len(key) + len(text)
                if old is None and index is not None:
                    index.add(key)
            elif old is not None:
                del data[key]
                if index is not None:
                    index.remove(key)
        self._applied_seq = seq
        self._writes += 1

    # --- compaction, backup and close -------------------------------------------------------

    def compact(self):
        """Write a snapshot now and start a fresh journal. Readers wait only for one dict copy;
        writers wait for one fsync. Raises StateWriteError if the disk refuses (nothing lost)."""
        self._check_not_in_tx()
        with self._compact_lock:
            if self._closed:
                raise StateError("the store is closed")
            self._compact_now()

    def backup(self, path):
        """Write a consistent snapshot of the current state to the file path, while serving.
        To restore: stop the server, copy the file to data_dir/snapshot, delete data_dir/journal*."""
        self._check_not_in_tx()
        with self._lock:
            items = list(self._data.items())
            seq = self._applied_seq
        self._write_snapshot(os.path.abspath(path), items, seq)

    def close(self):
        """Flush, compact (so the next open is fast), release the directory. Idempotent.
        If compaction fails the journal still holds everything; only a failed final fsync in
        ``batch``/``off`` mode raises StateWriteError."""
        self._check_not_in_tx()
        with self._bg_lock:
            if self._closing:
                return
            self._closing = True
            compactor = self._compactor
        self._stop.set()
        for thread in (self._flusher, compactor):
            if thread is not None:
                thread.join()
        with self._compact_lock:
            with self._jlock:
                self._closed = True  # refuse new writes; in-flight ones are finished below
            try:
                sync_error = self._sync_appended()
                try:
                    self._compact_now()
                except (StateError, OSError) as exc:
                    self._log("compaction at close failed; the journal has the data: %s" % exc)
                    if sync_error is not None:
                        raise StateWriteError("close: journal fsync failed (%s); writes since the "
                                              "last fsync may be lost" % sync_error) from None
            finally:
                self._release_files()

    def _release_files(self):
        with self._jlock:
            if self._jfd is not None:
                os.close(self._jfd)
                self._jfd = None
            self._closed = True
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


# --- transactions -----------------------------------------------------------------------------

class Transaction(object):
    """The ``tx`` of ``with store.transaction() as tx``: get/put/delete/incr like the store, seen
    only by this transaction until the block ends, then written as one record."""

    def __init__(self, current):
        self._current = current    # Store._current_locked: latest text, _jlock held by our thread
        self._changes = {}         # key -> text, or None for deleted; insertion-ordered
        self._done = False

    def _text(self, key):
        self._check_open()
        check_key(key)
        if key in self._changes:
            return self._changes[key]
        return self._current(key)

    def get(self, key, default=None):
        text = self._text(key)
        return default if text is None else loads(text)

    def put(self, key, value):
        self._check_open()
        check_key(key)
        self._changes[key] = encode_value(value)

    def delete(self, key):
        existed = self._text(key) is not None
        if existed:
            self._changes[key] = None
        return existed

    def incr(self, key, n=1):
        check_int(n, "n")
        total = int_value(self._text(key)) + n
        self._changes[key] = b"%d" % total
        return total

    def _check_open(self):
        if self._done:
            raise StateError("the transaction has ended")


class _TransactionContext(object):
    """Holds the store's _jlock from __enter__ to __exit__ (same thread)."""

    def __init__(self, store):
        self._store = store
        self._tx = None

    def __enter__(self):
        store = self._store
        store._jlock.acquire()
        store._tx_owner = threading.get_ident()
        self._tx = Transaction(store._current_locked)
        return self._tx

    def __exit__(self, exc_type, exc, tb):
        store, tx = self._store, self._tx
        ticket = None
        try:
            tx._done = True
            if exc_type is None and tx._changes:
                ticket = store._append_ops_locked(list(tx._changes.items()))
        finally:
            store._tx_owner = None
            store._jlock.release()
        if exc_type is None:
            store._finish_write(ticket)
        return False
