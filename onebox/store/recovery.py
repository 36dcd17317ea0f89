"""Opening a data directory: its lock, the snapshot loaded, the journals replayed, damage found
and (with ``repair=True``) moved aside.

What a data directory holds (one process owns it: ``fcntl.flock`` on ``lock``)
    ``lock``            holds the owner's pid, for the message a second owner gets.
    ``snapshot``        the whole state as of journal record ``seq``; replaced atomically.
    ``journal``         the records written since; appended to, fsync'd per the durability mode.
    ``journal.prev``    exists only during a compaction (or after a crash in one): the journal
                        before the current one; replayed before ``journal``.
    ``snapshot.tmp``    a snapshot being written; a leftover one is deleted at open.
    ``*.damaged-<time>`` files moved aside by ``repair=True``; never read again.

Torn tails and damage
    An incomplete or bad last journal frame with nothing valid after it is a torn tail from a
    crash: it was never acknowledged, so it is cut and logged. A bad frame followed by valid data
    is damage: opening fails with ``StateCorruptError`` (never silently dropped data) unless
    ``repair=True``, which keeps the good prefix and moves the damaged file aside (a second name,
    never truncated, so a crash during repair just means repairing again).

Invariants: all of this runs in ``Store.__init__``, before any other thread can see the store;
once it returns, memory holds exactly the effect of records 1..applied_seq, in journal order, and
the index is built. An interrupted compaction is finished here.

``Recovery`` is a part of ``Store`` (``store.py``), cut out to be read alone: its fields are made
in ``Store.__init__``.

Imports the standard library, the contract's errors (``handlers._state``), and ``disk``,
``frames``, ``index`` and ``values``.
"""
import errno
import fcntl
import os
import time

from handlers._state import StateError, StateWriteError
from onebox.store.disk import (PRIVATE_DIR_MODE, fsync_dir, open_private, read_file,
                               unlink_quietly)
from onebox.store.frames import (end_of_frame, read_frames, record_fields, snapshot_frame_problem,
                                 valid_frame_after)
from onebox.store.index import SortedKeys
from onebox.store.values import json_bytes


class StateCorruptError(StateError):
    """Damaged data found at open. The message names the file, the byte offset and the fix."""


class StateLockedError(StateError):
    """Another process (or another Store in this one) owns the data directory."""


class Recovery(object):
    """Opening: lock, load, replay, repair; a part of ``Store`` (see the module docstring)."""

    def _make_private_dir(self):
        """Create the data dir 0700, or make an existing one so (the files in it are 0600, but
        their names, and a backups/ folder the server makes with the umask, would show)."""
        existed = os.path.isdir(self.data_dir)
        os.makedirs(self.data_dir, PRIVATE_DIR_MODE, exist_ok=True)
        mode = os.stat(self.data_dir).st_mode & 0o777
        if mode == PRIVATE_DIR_MODE:
            return
        try:
            os.chmod(self.data_dir, PRIVATE_DIR_MODE)  # the umask filtered makedirs' mode
        except OSError as exc:
            self._log("cannot make data dir %s private (mode %03o): %s"
                      % (self.data_dir, mode, exc))
            return
        if existed:
            self._log("data dir %s had mode %03o; made it %03o: the state is private"
                      % (self.data_dir, mode, PRIVATE_DIR_MODE))

    def _take_flock(self):
        path = self._paths["lock"]
        fd = open_private(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise StateLockedError("data dir %s is in use by another process (pid %s, see %s); "
                                   "one process owns a data dir: stop the other first"
                                   % (self.data_dir, holder or "unknown", path)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, ("%d\n" % os.getpid()).encode("ascii"), 0)
        return fd

    def _open(self):
        """Load snapshot, replay journal.prev and journal, open the journal, finish any
        interrupted compaction. Runs before any other thread can see the store."""
        unlink_quietly(self._paths["snapshot.tmp"])  # an unfinished snapshot; never renamed
        snap_seq, repaired_snapshot = self._load_snapshot()
        seen = 0
        for name in ("journal.prev", "journal"):
            seen = self._replay_journal(self._paths[name], snap_seq, seen)
        last = max(snap_seq, seen)
        self._next_seq, self._durable_seq, self._applied_seq, self._writes = last + 1, last, last, 0
        # One sort now, not an insert per loaded key: inserting a million keys one by one into
        # the index would cost more than sorting them once.
        with self._lock:
            self._index = SortedKeys(self._data, self.INDEX_BLOCK_KEYS)
        fd = open_private(self._paths["journal"], os.O_WRONLY | os.O_APPEND)
        self._jfd = fd
        self._jsize = self._durable_size = os.fstat(fd).st_size
        fsync_dir(self.data_dir)
        if repaired_snapshot or os.path.exists(self._paths["journal.prev"]):
            try:
                with self._compact_lock:
                    self._compact_now()
            except StateWriteError as exc:  # the journals still hold everything: serve anyway
                self._log("could not finish compaction at open: %s" % exc)

    def _load_snapshot(self):
        """Load data_dir/snapshot into memory; return (seq it covers, whether it was repaired)."""
        path = self._paths["snapshot"]
        data = read_file(path)
        if data is None:
            return 0, False
        frames, stop, reason = read_frames(data)
        seq, count = None, 0
        for off, obj in frames:
            problem = snapshot_frame_problem(obj, seq is None)
            if problem is None and seq is None:
                seq = obj["seq"]
                continue
            if problem is None and "kv" in obj:
                for key, value in obj["kv"]:
                    self._load_put(key, value)
                count += len(obj["kv"])
                continue
            if problem is None:  # the end record: it must account for every key and be last
                if obj["end"] != count:
                    problem = "end record says %d keys, found %d" % (obj["end"], count)
                elif end_of_frame(data, off) != len(data):
                    problem, off = "data after the end record", end_of_frame(data, off)
                else:
                    return seq, False
            reason, stop = problem, off
            break
        else:
            reason = reason or "no end record"
        return self._damaged_snapshot(path, stop, reason, seq), True

    def _damaged_snapshot(self, path, offset, reason, seq):
        if not self._repair:
            raise StateCorruptError(
                "%s: damaged at byte offset %d (%s); refusing to start rather than lose data. "
                "To load what precedes the damage and move the file aside, run: "
                "python3 server.py --repair" % (path, offset, reason))
        aside = self._move_aside(path)
        self._log("repair: %s damaged at byte offset %d (%s); loaded %d keys before it; the "
                  "damaged file is kept as %s" % (path, offset, reason, len(self._data), aside))
        return seq or 0

    def _load_put(self, key, value):
        """Set key while loading the snapshot; _open builds the index afterwards."""
        text = json_bytes(value)
        old = self._data.get(key)
        if old is not None:
            self._bytes -= len(key) + len(old)
        self._data[key] = text
        self._bytes += len(key) + len(text)

    def _replay_journal(self, path, snap_seq, seen):
        """Apply the records of one journal file that come after snap_seq; cut a torn tail.
        seen: the highest seq read so far (sequence numbers only ever increase); returns it."""
        data = read_file(path)
        if data is None:
            return seen
        frames, stop, reason = read_frames(data)
        damaged = False  # a frame with a good checksum but bad content is never a torn tail
        for off, obj in frames:
            seq, ops = record_fields(obj)
            if seq is None or seq <= seen:
                reason = ("checksum ok but not a journal record" if seq is None
                          else "sequence number %d after %d" % (seq, seen))
                stop, damaged = off, True
                break
            seen = seq
            if seq > snap_seq:  # else the snapshot has it already (a crash came mid-compaction)
                with self._lock:
                    self._apply_locked([(op[1], None if op[0] == "d" else json_bytes(op[2]))
                                        for op in ops], seq)
        if reason is not None:
            self._cut_journal(path, data, stop, reason, damaged)
        return seen

    def _cut_journal(self, path, data, stop, reason, damaged):
        """A bad frame at stop: a torn tail is cut; damage stops start-up unless repairing."""
        after = valid_frame_after(data, stop)
        if after is None and not damaged:
            self._log("%s: cut a torn tail of %d bytes at byte offset %d (%s): a write the "
                      "crash interrupted, never acknowledged" % (path, len(data) - stop, stop, reason))
        elif not self._repair:
            raise StateCorruptError(
                "%s: damaged record at byte offset %d (%s), followed by %d more bytes; refusing to "
                "start rather than drop data. To keep the %d bytes before the damage and move the "
                "file aside, run: python3 server.py --repair"
                % (path, stop, reason, len(data) - stop, stop))
        else:
            aside = self._move_aside(path)
            self._replace_with(path, data[:stop])  # a new inode: the one moved aside stays whole
            self._log("repair: %s damaged at byte offset %d (%s); kept the %d bytes before it; the "
                      "damaged file is kept as %s" % (path, stop, reason, stop, aside))
            return
        with open(path, "r+b") as f:
            f.truncate(stop)
            f.flush()
            os.fsync(f.fileno())

    def _replace_with(self, path, data):
        tmp = path + ".repaired"
        with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))

    def _move_aside(self, path):
        """Give a damaged file a second name, path.damaged-<time>; path itself stays until it is
        replaced (never truncated: that would cut the file aside too), so a crash during repair
        just means repairing again."""
        aside = "%s.damaged-%s" % (path, time.strftime("%Y%m%dT%H%M%S"))
        n = 1
        while os.path.exists(aside):
            n += 1
            aside = "%s.damaged-%s-%d" % (path, time.strftime("%Y%m%dT%H%M%S"), n)
        try:
            os.link(path, aside)
        except OSError:  # a filesystem without hard links: copy
            with open(path, "rb") as src, \
                    os.fdopen(open_private(aside, os.O_WRONLY | os.O_EXCL), "wb") as dst:
                dst.write(src.read())
                dst.flush()
                os.fsync(dst.fileno())
        fsync_dir(os.path.dirname(path))
        return aside
