"""The shared state store: string keys, JSON values, held in memory, made durable by a journal.

This is the runtime's implementation of the contract's ``state`` (``handlers/_state.py``): the
server opens one ``Store`` per data directory at start-up and binds it to its worker threads
(``handlers/_context.py``); areas reach it only through ``state``. Modules, by idea:

``store.py``     ``Store``: its fields and locks, its public verbs, the story of a write;
                 transactions
``journal.py``   the journal's append side and the group commit; the durability modes
``snapshot.py``  snapshots and compaction (and backups, which are snapshots)
``recovery.py``  opening a data directory: its lock, load, replay, torn tails, repair
``frames.py``    the file formats: checksummed frames, journal records, snapshots
``values.py``    what keys and values may be, and the canonical JSON bytes they are kept as
``index.py``     the sorted key index, so a listing costs what it returns
``disk.py``      private files and directories, whole writes, fsync'd directories
``redis_store.py`` ``RedisStore``: the same verbs kept in Redis, for several processes
                 (``[cluster] redis_url``; ``server.open_store`` picks it)

The errors areas may see are the contract's (``StateError``, ``StateWriteError``,
``StateUnavailableError``, ``StateKeyError``); the two only the runtime sees
(``StateCorruptError``, ``StateLockedError``) are ``recovery.py``'s. This package names them
all, so the runtime imports one place.

Imports the standard library, the contract's ``handlers._state`` and its own modules.
"""
from handlers._state import (MAX_KEY_CHARS, StateError, StateKeyError, StateUnavailableError,
                             StateWriteError)
from onebox.store.disk import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE
from onebox.store.recovery import StateCorruptError, StateLockedError
from onebox.store.snapshot import COMPACTION_STEPS, CRASH_EXIT_CODE
from onebox.store.store import Store, Transaction

__all__ = [
    "Store", "Transaction", "StateError", "StateWriteError", "StateUnavailableError",
    "StateCorruptError", "StateLockedError", "StateKeyError", "MAX_KEY_CHARS", "COMPACTION_STEPS",
    "CRASH_EXIT_CODE", "PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE",
]
