"""Snapshots and compaction: the whole state written to one file, and the journal started anew.

A snapshot is the whole state as of journal record ``seq`` (``frames.py`` has the format). A
compaction rotates the journal (``journal`` -> ``journal.prev``, a new empty ``journal``), copies
memory, writes the snapshot beside the old one and renames it over it, then removes
``journal.prev``. It runs in the background once the journal passes ``compact_journal_bytes``,
after a failed fsync in ``batch``/``off`` mode (memory is then the only whole copy), at close,
and on ``compact()``; a backup is a snapshot written elsewhere, with no rotation.

Invariants
    * Each step leaves a loadable directory (``COMPACTION_STEPS``): replay skips the records a
      snapshot covers, so a crash at any instant loses no acknowledged write and applies none
      twice.
    * Compaction and backup are the only O(size of state) work; they hold the memory lock only
      for one ``dict`` copy, and writers wait for one fsync (the rotation's).
    * One compaction at a time (``_compact_lock``, held across disk I/O); a failed background one
      is retried after ``COMPACT_RETRY_S``, never in a loop.

``Compaction`` is a part of ``Store`` (``store.py``), cut out to be read alone: its fields are
made in ``Store.__init__``; it needs the journal's leader role and fsync (``journal.py``).

Imports the standard library, the contract's errors (``handlers._state``), ``disk`` and
``frames``.
"""
import os
import threading
import time

from handlers._state import StateError, StateWriteError
from onebox.store.disk import fsync_dir, open_private, unlink_quietly
from onebox.store.frames import snapshot_frames

# Steps at which ``_crash_at`` kills the process, in the order compaction reaches them.
COMPACTION_STEPS = (
    "rotate-renamed",     # journal renamed to journal.prev; no new journal yet
    "rotate-opened",      # new empty journal created and the directory fsync'd
    "snapshot-partial",   # snapshot.tmp half written
    "snapshot-written",   # snapshot.tmp complete and fsync'd, not yet renamed
    "snapshot-replaced",  # snapshot.tmp renamed over snapshot; directory not yet fsync'd
    "snapshot-synced",    # directory fsync'd; journal.prev still there
    "prev-removed",       # journal.prev unlinked; directory not yet fsync'd
)
CRASH_EXIT_CODE = 86


class Compaction(object):
    """Snapshots and compaction; a part of ``Store`` (see the module docstring). ``_compact_now``
    needs ``_compact_lock`` held; methods ending in ``_locked`` need ``_jlock``."""

    def _compact_now(self):
        """_compact_lock held. Each step leaves a loadable state (see COMPACTION_STEPS):
        1. rotate: fsync and publish the journal, rename it to journal.prev, start a new one
           (skipped if journal.prev is left from an interrupted compaction: it must go first);
        2. copy memory (covers every record in journal.prev, and maybe some of the new journal);
        3. write the snapshot: temp file, fsync, rename, fsync the directory;
        4. remove journal.prev. Replay skips records the snapshot covers, so none applies twice."""
        if not os.path.exists(self._paths["journal.prev"]):
            self._rotate_journal()
        with self._lock:
            items = list(self._data.items())
            seq = self._applied_seq
        self._write_snapshot(self._paths["snapshot"], items, seq, crash_points=True)
        self._remove_prev_journal()
        self._compactions += 1

    def _rotate_journal(self):
        self._acquire_leader()  # no group fsync may run on the fd we are about to swap
        try:
            with self._jlock:   # writers wait for one fsync; readers don't
                target, size = self._next_seq - 1, self._jsize
                try:
                    if target > self._durable_seq:  # in every mode: the last fsync'd record
                        self._write_and_fsync(self._jfd, self._take_buffer_locked())
                except OSError as exc:
                    self._fail_unsynced_locked(exc)
                    raise StateWriteError("compaction: journal fsync failed (%s)" % exc) from None
                self._publish_locked(target, size)
                self._start_new_journal_locked()
        finally:
            self._release_leader()

    def _start_new_journal_locked(self):
        journal, prev = self._paths["journal"], self._paths["journal.prev"]
        os.rename(journal, prev)
        self._crash_point("rotate-renamed")
        try:
            fd = open_private(journal, os.O_WRONLY | os.O_EXCL | os.O_APPEND)
        except OSError as exc:
            self._undo_rotation_locked(None, exc)
        try:
            fsync_dir(self.data_dir)
        except OSError as exc:
            self._undo_rotation_locked(fd, exc)
        self._crash_point("rotate-opened")
        os.close(self._jfd)
        self._jfd, self._jsize, self._durable_size = fd, 0, 0

    def _undo_rotation_locked(self, new_fd, exc):
        """Go back to appending to the old journal under its old name, then raise."""
        try:
            if new_fd is not None:
                os.close(new_fd)
                os.unlink(self._paths["journal"])
            os.rename(self._paths["journal.prev"], self._paths["journal"])
        except OSError as undo_exc:
            # The old fd now writes to journal.prev, which the next compaction would delete.
            self._jfatal = ("cannot undo a journal rotation (%s); writes refused until restart"
                            % undo_exc)
            self._log(self._jfatal)
        raise StateWriteError("compaction: cannot start a new journal (%s)" % exc) from None

    def _remove_prev_journal(self):
        try:
            os.unlink(self._paths["journal.prev"])
        except FileNotFoundError:
            return
        self._crash_point("prev-removed")
        fsync_dir(self.data_dir)

    def _write_snapshot(self, path, items, seq, crash_points=False):
        """Write a snapshot of items atomically to path: temp file, fsync, rename, fsync dir."""
        tmp = path + ".tmp"
        try:
            with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
                for i, frame in enumerate(snapshot_frames(items, seq, self.SNAPSHOT_CHUNK_KEYS)):
                    f.write(frame)
                    if i == 1 and crash_points:
                        f.flush()
                        self._crash_point("snapshot-partial")
                f.flush()
                os.fsync(f.fileno())
            if crash_points:
                self._crash_point("snapshot-written")
            os.replace(tmp, path)
            if crash_points:
                self._crash_point("snapshot-replaced")
            fsync_dir(os.path.dirname(path))
            if crash_points:
                self._crash_point("snapshot-synced")
        except OSError as exc:
            unlink_quietly(tmp)
            raise StateWriteError("cannot write snapshot %s (%s)" % (path, exc)) from None

    def _crash_point(self, step):
        if step == self._crash_at:
            os._exit(CRASH_EXIT_CODE)  # test seam: die like a power cut would, no cleanup

    def _start_background_compaction(self, force=False):
        with self._bg_lock:
            self._compact_forced = self._compact_forced or force
            if (self._closing or time.monotonic() < self._compact_retry_at
                    or (self._compactor is not None and self._compactor.is_alive())):
                return
            # Not a daemon: exit waits for it rather than killing it mid-step (it would recover,
            # but a finished compaction is cheaper than a replayed journal).
            self._compactor = threading.Thread(target=self._compact_in_background,
                                               name="state-compactor")
            self._compactor.start()

    def _compact_in_background(self):
        with self._bg_lock:
            forced, self._compact_forced = self._compact_forced, False
        try:
            with self._compact_lock:
                if not self._closed and (forced or self._jsize >= self.compact_journal_bytes):
                    self._compact_now()
        except (StateError, OSError) as exc:
            with self._bg_lock:
                self._compact_retry_at = time.monotonic() + self.COMPACT_RETRY_S
            self._log("background compaction failed, retry in %ds: %s" % (self.COMPACT_RETRY_S, exc))
