"""The shared state kept in Redis: the ``Store``'s verbs for several processes (``[cluster]``).

``RedisStore(cluster)`` keeps the contract's ``StateStore`` interface exactly as the local
``Store`` does (``get``, ``items``, ``keys``, ``put``, ``delete``, ``incr``, ``transaction``,
``stats``, ``compact``, ``backup``, ``close``, ``data_dir``), with the same key and value checks
(``values.py``) and errors, so an area cannot tell which one it runs on. ``server.open_store``
makes one when ``[cluster] redis_url`` is set; ``cluster`` is the process's link to the others
(``onebox/cluster.py``), closed with the store.

Layout (every key starts with ``[cluster] key_prefix``, "onebox:" below)
    ``onebox:state:v:<key>``  the value: its canonical JSON as UTF-8 (``values.encode_value``),
                              the very bytes the local store keeps
    ``onebox:state:keys``     a sorted set of every key, all scores 0, for listings: ZRANGEBYLEX
                              orders members by their bytes, and UTF-8's byte order is code point
                              order, which is how Python sorts str; a prefix's run is
                              ``[prefix`` to ``(prefix\\xff`` (0xFF never occurs in UTF-8). A key
                              holding a lone surrogate is encoded with "surrogatepass", which
                              keeps both properties.
    ``onebox:state:stats``    a hash: ``bytes`` (keys' and values' bytes) and ``writes``
    ``onebox:state:lock``     the transaction lock: a random token, with a TTL

Invariants
    * Each write is one Lua script (value, sorted set and counters together), so it is atomic,
      and a listing is one script too (ZRANGEBYLEX, then a GET per key it returns): one round
      trip, one consistent view, costing O(log keys + what it returns).
    * Transactions are serialised, not optimistic: the ``with`` body cannot be run again, so
      WATCH/EXEC, which retries, cannot serve. A transaction takes the lock key (SET NX PX with a
      random token; its TTL, ``LOCK_TTL_TIMEOUTS`` x ``[cluster] timeout_s``, frees it when the
      process that held it dies), reads Redis directly (its own writes first, as the local
      ``Transaction`` does: the same class serves), and commits its writes with one script that
      checks the token, applies them and drops the lock. A transaction whose lock expired meanwhile
      commits nothing (StateWriteError). Every plain write's script answers "locked" while
      another's token is in the key, and is retried after a short sleep, for at most the lock's
      TTL plus one timeout; then StateWriteError. In one process, transactions also queue on a
      local lock, so that only one of its threads polls Redis for the key.
    * Never a wrong answer: a read Redis cannot answer (unreachable, timed out, loading its
      file) raises ``StateUnavailableError`` (a 503); it never returns the default for a key
      that may exist. A write that fails raises ``StateWriteError`` (a 503): nothing is
      acknowledged that Redis did not take. Unlike the local store's, it does not always mean
      "nothing changed": when the connection broke after the script was sent, Redis may have
      run it. While Redis is down the client's connect backoff makes both fail at once, and both
      work again by themselves once it is back.

Durability: a write is acknowledged when Redis has answered its script. What that promises is
Redis's: with ``appendonly yes`` and ``appendfsync always`` Redis fsyncs its append-only file
before it answers, so an acknowledged write survives a crash of Redis or of the machine, as
``[state] durability = always`` promises; ``everysec`` may lose the last second ("batch").
``onebox/cluster.py`` checks this at start-up and refuses a Redis that keeps less than
``[state] durability`` asks. A onebox process that dies holds nothing: every acknowledged write
is in Redis already (and a lock it held expires).

Costs (measured on one box, Redis with appendfsync always, ~120-byte values): a get ~23 us, a put
~0.2 ms (Redis's fsync), a transaction ~0.8 ms (two fsyncs: taking the lock key is a write too;
a lock that survives a Redis crash in its file frees itself after its TTL, like a dead
process's). One Redis, not Redis Cluster: the listing script reads value keys it was not
handed, which a sharded Redis refuses.

Not here: ``compact`` does nothing (Redis rewrites its own append-only file), and there is
nothing to repair (``redis-check-aof --fix`` repairs Redis's file). What stays per process: the
callers' own memory (the sessions' index and budget, the login throttle), not the store's.

Threads: every method is safe from any thread (the Redis client is). ``_tx_lock`` queues this
process's transactions, backups and imports; ``_tx_owner`` is written only by the thread that
holds it. ``_last_stats`` is one reference, swapped whole.

Imports the standard library, the contract (``handlers._state``), ``onebox.redis`` and the
store's own modules.
"""
import os
import random
import threading
import time

from handlers._state import StateError, StateStore, StateUnavailableError, StateWriteError
from onebox.redis import RedisError, RedisUnavailable
from onebox.store.snapshot import Compaction
from onebox.store.store import Transaction
from onebox.store.values import (check_int, check_key, check_listing, check_plain,
                                 encode_value, int_value, json_bytes, loads)

LOCK_TTL_TIMEOUTS = 3           # the transaction lock's TTL, in [cluster] timeout_s
LOCKED_SLEEP_FIRST_S = 0.0005   # a write that found the lock taken sleeps this long ...
LOCKED_SLEEP_MAX_S = 0.01       # ... doubling up to this, jittered, until its deadline

# --- the scripts ------------------------------------------------------------------------------
# Every write script gets KEYS[1] the lock, KEYS[2] the sorted set, KEYS[3] the stats hash, then
# value keys; ARGV[1] the caller's lock token ("" for a plain write). They share these helpers.
_HELPERS = """
local function locked(token)
  local holder = redis.call('GET', KEYS[1])
  return holder and holder ~= token
end
local function set_value(vkey, member, text)
  local old = redis.call('STRLEN', vkey)   -- 0: absent (a stored value is never empty)
  redis.call('SET', vkey, text)
  local delta = #text - old
  if old == 0 then
    redis.call('ZADD', KEYS[2], 0, member)
    delta = delta + #member
  end
  redis.call('HINCRBY', KEYS[3], 'bytes', delta)
end
local function delete_value(vkey, member)
  local old = redis.call('STRLEN', vkey)
  if old == 0 then return 0 end
  redis.call('ZREM', KEYS[2], member)
  redis.call('DEL', vkey)
  redis.call('HINCRBY', KEYS[3], 'bytes', -(old + #member))
  return 1
end
local function wrote()
  redis.call('HINCRBY', KEYS[3], 'writes', 1)
end
"""

# put: KEYS[4] the value; ARGV token, member, text. -1: locked.
_PUT = _HELPERS + """
if locked(ARGV[1]) then return -1 end
set_value(KEYS[4], ARGV[2], ARGV[3])
wrote()
return 1
"""

# delete: KEYS[4] the value; ARGV token, member. Whether it existed; -1: locked.
_DELETE = _HELPERS + """
if locked(ARGV[1]) then return -1 end
local existed = delete_value(KEYS[4], ARGV[2])
if existed == 1 then wrote() end
return existed
"""

# incr: KEYS[4] the value; ARGV token, member, n. INCRBY on the JSON text itself: an int's
# canonical JSON is the decimal Redis keeps, and INCRBY is exact in 64 bits where Lua's numbers
# are doubles (so the new value goes back as the text GET reads, never as a Lua number).
# {1, new text}; {0, current text or nil} when INCRBY cannot (not an int, beyond 64 bits: the
# caller decides); -1: locked.
_INCR = _HELPERS + """
if locked(ARGV[1]) then return -1 end
local old = redis.call('STRLEN', KEYS[4])
local reply = redis.pcall('INCRBY', KEYS[4], ARGV[3])
if type(reply) == 'table' and reply.err then
  return {0, redis.call('GET', KEYS[4])}
end
local text = redis.call('GET', KEYS[4])
local delta = #text - old
if old == 0 then
  redis.call('ZADD', KEYS[2], 0, ARGV[2])
  delta = delta + #ARGV[2]
end
redis.call('HINCRBY', KEYS[3], 'bytes', delta)
wrote()
return {1, text}
"""

# swap: KEYS[4] the value; ARGV token, member, expected text ("": absent), new text. The
# compare-and-set behind an incr INCRBY cannot make. 1: done, 0: the value changed, -1: locked.
_SWAP = _HELPERS + """
if locked(ARGV[1]) then return -1 end
if (redis.call('GET', KEYS[4]) or '') ~= ARGV[3] then return 0 end
set_value(KEYS[4], ARGV[2], ARGV[4])
wrote()
return 1
"""

# commit: KEYS[4..] one value key per op; ARGV token, then (kind "p"/"d", member, text) per op.
# Applies them all only if the caller still holds the lock, then drops it. -1: it does not.
_COMMIT = _HELPERS + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
for i = 4, #KEYS do
  local at = 2 + (i - 4) * 3
  if ARGV[at] == 'p' then
    set_value(KEYS[i], ARGV[at + 1], ARGV[at + 2])
  else
    delete_value(KEYS[i], ARGV[at + 1])
  end
end
if #KEYS > 3 then wrote() end
redis.call('DEL', KEYS[1])
return 1
"""

# hold: KEYS[1] the lock; ARGV token, then a TTL in ms to extend it, or 0 to release it.
# Whether the caller held it.
_HOLD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# list: KEYS[1] the sorted set; ARGV min, max (ZRANGEBYLEX bounds), count (-1: all), the value
# keys' prefix, "1" for values too. Members, or member, value, member, value ... (a value is nil
# only if a script broke half-way, which Redis's atomic scripts make all but impossible).
_LIST = """
local members = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2], 'LIMIT', 0, ARGV[3])
if ARGV[5] ~= '1' then return members end
local out = {}
for i, member in ipairs(members) do
  out[2 * i - 1] = member
  out[2 * i] = redis.call('GET', ARGV[4] .. member)
end
return out
"""

# load: the lock's holder copies pairs in; ARGV token, then member, text per pair.
_LOAD = _HELPERS + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
for i = 4, #KEYS do
  set_value(KEYS[i], ARGV[2 * (i - 4) + 2], ARGV[2 * (i - 4) + 3])
end
wrote()
return 1
"""


def _member(key):
    """A key's bytes in Redis: UTF-8, lone surrogates passed through (see the module docstring)."""
    return key.encode("utf-8", "surrogatepass")


def _key_of(member):
    return member.decode("utf-8", "surrogatepass")


class RedisStore(StateStore):
    """The shared store in Redis; every method is safe from any thread.

    For callers: ``get``, ``items``, ``keys``; ``put``, ``delete``, ``incr``, ``transaction``
    (return once Redis has taken the write; raise ``StateWriteError`` if not); ``stats``,
    ``compact``, ``backup``, ``load_from``, ``close``; ``cluster``, ``data_dir``. Nothing is
    meant for overriding.
    """

    SNAPSHOT_CHUNK_KEYS = 1000      # keys per snapshot frame, and per round trip of a backup
    LOAD_CHUNK_KEYS = 500           # keys per script while importing (a script blocks Redis)

    def __init__(self, cluster):
        self.cluster = cluster
        self.durability = cluster.durability
        self._redis = redis = cluster.redis
        timeout_s = cluster.settings.timeout_s
        self.lock_ttl_s = LOCK_TTL_TIMEOUTS * timeout_s
        self.write_wait_s = self.lock_ttl_s + timeout_s   # a dead holder's lock frees within it
        self.data_dir = "redis %s, keys %sstate:*" % (cluster.settings.redis_url, cluster.prefix)
        prefix = cluster.key("state:").encode("utf-8")
        self._value_prefix = prefix + b"v:"
        self._index, self._stats_key, self._lock_key = (
            prefix + b"keys", prefix + b"stats", prefix + b"lock")
        self._put_script, self._delete_script, self._incr_script, self._swap_script, \
            self._commit_script, self._hold_script, self._list_script, self._load_script = [
                redis.script(source) for source in
                (_PUT, _DELETE, _INCR, _SWAP, _COMMIT, _HOLD, _LIST, _LOAD)]
        # _tx_lock: one transaction (or backup, or import) of this process at a time polls
        # Redis for the lock key; guards _tx_owner. Held across the transaction's body, as the
        # local store holds its _jlock.
        self._tx_lock = threading.Lock()
        self._tx_owner = None
        self._last_stats = None
        self._closed = False

    # --- reads: one round trip each ---------------------------------------------------------

    def get(self, key, default=None):
        """The value at key (a fresh object the caller may change), or default."""
        check_key(key)
        text = self._text(key)
        return default if text is None else loads(text)

    def items(self, prefix="", limit=None):
        """[(key, value)] for keys starting with prefix, sorted by key; the first ``limit`` pairs
        if it is given. One script: O(log keys + pairs returned)."""
        check_listing(prefix, limit)
        if limit == 0:
            return []
        flat = self._list(prefix, limit, True)
        return [(_key_of(member), loads(text))
                for member, text in zip(flat[::2], flat[1::2]) if text is not None]

    def keys(self, prefix="", limit=None):
        """Sorted keys starting with prefix (the first ``limit`` of them), like items."""
        check_listing(prefix, limit)
        if limit == 0:
            return []
        return [_key_of(member) for member in self._list(prefix, limit, False)]

    def _text(self, key):
        """The stored bytes of key, or None; StateUnavailableError if Redis cannot say."""
        return self._read(self._redis.call, "GET", self._value_prefix + _member(key))

    def _list(self, prefix, limit, values):
        if prefix:
            low = b"[" + _member(prefix)
            high = b"(" + _member(prefix) + b"\xff"   # past every key that starts with it
        else:
            low, high = b"-", b"+"
        return self._read(self._list_script, keys=(self._index,), args=(
            low, high, -1 if limit is None else limit, self._value_prefix, "1" if values else "0"))

    def _read(self, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (RedisUnavailable, RedisError) as error:   # RedisError: LOADING after a restart
            raise StateUnavailableError("state read failed: %s" % error) from None

    # --- writes: one script each --------------------------------------------------------------

    def put(self, key, value):
        """Set key to value (JSON). Returns once Redis has taken it."""
        check_key(key)
        text = encode_value(value)
        self._check_not_in_tx()
        member = _member(key)
        self._write(self._put_script, member, (member, text))

    def delete(self, key):
        """Remove key. Returns whether it existed."""
        check_key(key)
        self._check_not_in_tx()
        member = _member(key)
        return self._write(self._delete_script, member, (member,)) == 1

    def incr(self, key, n=1):
        """Add n to the int at key (missing counts as 0) and return the new value. Exact under
        any concurrency: INCRBY in the script, or, past 64 bits, a compare-and-set in Python's
        arbitrary precision."""
        check_key(key)
        check_int(n, "n")
        self._check_not_in_tx()
        member = _member(key)
        while True:
            done, text = self._write(self._incr_script, member, (member, n))
            if done:
                return int(text)
            total = int_value(text) + n   # ValueError if the key holds no int, as locally
            if self._write(self._swap_script, member, (member, text or b"", b"%d" % total)):
                return total

    def transaction(self):
        """``with store.transaction() as tx:`` -- tx has get/put/delete/incr; all or nothing. An
        exception in the body writes nothing. Every other writer of the site waits while the
        body runs (readers don't), so keep it short: each tx.get is a round trip to Redis."""
        self._check_not_in_tx()
        return _TransactionContext(self)

    def _write(self, script, member, args):
        """Run a write script for one key as a plain writer (token ""); while a transaction
        holds the lock, sleep and retry until write_wait_s has passed."""
        keys = (self._lock_key, self._index, self._stats_key, self._value_prefix + member)
        deadline, sleep_s = time.monotonic() + self.write_wait_s, LOCKED_SLEEP_FIRST_S
        while True:
            try:
                reply = script(keys=keys, args=("",) + args)
            except (RedisUnavailable, RedisError) as error:
                raise StateWriteError("state write failed: %s" % error) from None
            if reply != -1:
                return reply
            if time.monotonic() >= deadline:
                raise StateWriteError("state write failed: a transaction held the lock for "
                                      "over %.1f s" % self.write_wait_s)
            sleep_s = self._nap(sleep_s)

    @staticmethod
    def _nap(sleep_s):
        """Sleep about sleep_s (jittered, so waiters do not retry in step); the next one."""
        time.sleep(sleep_s * (0.5 + random.random()))
        return min(sleep_s * 2, LOCKED_SLEEP_MAX_S)

    def _check_not_in_tx(self):
        if self._tx_owner == threading.get_ident():
            raise RuntimeError("inside store.transaction() use the tx object, not the store")

    # --- the lock: transactions, backups, imports --------------------------------------------

    def _take_lock(self):
        """This process's turn, then the site's lock key; the token. StateWriteError if not
        had within write_wait_s."""
        deadline = time.monotonic() + self.write_wait_s
        if not self._tx_lock.acquire(timeout=self.write_wait_s):
            raise StateWriteError("state write failed: this process's transactions queued for "
                                  "over %.1f s" % self.write_wait_s)
        token = None
        try:
            token = self._take_lock_key(deadline)
        finally:
            if token is None:
                self._tx_lock.release()
        self._tx_owner = threading.get_ident()
        return token

    def _take_lock_key(self, deadline):
        """SET NX PX until it takes or the deadline passes; _tx_lock held."""
        token = os.urandom(16).hex()
        ttl_ms = int(self.lock_ttl_s * 1000)
        sleep_s = LOCKED_SLEEP_FIRST_S
        while True:
            try:
                if self._redis.call("SET", self._lock_key, token, "NX", "PX", ttl_ms):
                    return token
            except (RedisUnavailable, RedisError) as error:
                raise StateWriteError("state write failed: %s" % error) from None
            if time.monotonic() >= deadline:
                raise StateWriteError("state write failed: another process held the "
                                      "transaction lock for over %.1f s" % self.write_wait_s)
            sleep_s = self._nap(sleep_s)

    def _hold(self, token, ttl_ms):
        """Extend the lock (ttl_ms) or drop it (0); whether it was still ours."""
        return self._hold_script(keys=(self._lock_key,), args=(token, ttl_ms)) == 1

    def _drop_lock(self, token, key_too=True):
        """Release the lock key if it is still ours (best effort: its TTL frees it anyway; not
        after a commit, whose script dropped it), then this process's turn."""
        try:
            if key_too:
                self._hold(token, 0)
        except (RedisUnavailable, RedisError):
            pass
        finally:
            self._tx_owner = None
            self._tx_lock.release()

    def _commit(self, token, changes):
        """Apply a transaction's changes ({key: text or None}) and drop the lock, in one script."""
        keys, args = [self._lock_key, self._index, self._stats_key], [token]
        for key, text in changes.items():
            member = _member(key)
            keys.append(self._value_prefix + member)
            args += [b"d", member, b""] if text is None else [b"p", member, text]
        try:
            reply = self._commit_script(keys=keys, args=args)
        except (RedisUnavailable, RedisError) as error:
            raise StateWriteError("state write failed: %s" % error) from None
        if reply != 1:
            raise StateWriteError("state write failed: the transaction outlived its lock "
                                  "(%.1f s); nothing was written" % self.lock_ttl_s)

    # --- stats, compaction, backup, import, close ------------------------------------------

    def stats(self):
        """Counters for /metrics and the status page, the local store's names with what Redis
        can tell: ``journal_bytes`` is its append-only file, ``snapshot_bytes`` that file's
        base (its last rewrite), ``compactions`` its rewrites; Redis counts no fsyncs (0).
        While Redis is down: the last figures, with ``up`` False."""
        try:
            count, fields, info = self._redis.pipeline([
                ("ZCARD", self._index), ("HMGET", self._stats_key, "bytes", "writes"),
                ("INFO", "persistence")])
            if isinstance(count, RedisError) or isinstance(fields, RedisError):
                raise RedisUnavailable(str(count if isinstance(count, RedisError) else fields))
        except RedisUnavailable:
            last = self._last_stats or _empty_stats(self.durability)
            return dict(last, up=False)
        persistence = _info_fields(info)
        writes = int(fields[1] or 0)
        out = {"keys": count, "bytes": int(fields[0] or 0), "writes": writes,
               "applied_seq": writes, "journal_bytes": persistence.get("aof_current_size", 0),
               "fsyncs": 0, "compactions": persistence.get("aof_rewrites", 0),
               "snapshot_bytes": persistence.get("aof_base_size", 0), "snapshot_time": 0.0,
               "durability": self.durability, "backend": "redis", "up": True}
        self._last_stats = out
        return out

    def compact(self):
        """Nothing to do: Redis rewrites its own append-only file (auto-aof-rewrite-*)."""
        self._check_not_in_tx()

    def backup(self, path):
        """Write a snapshot of the state to the file path, in the local store's format, while
        serving. Consistent: it holds the transaction lock (writers of every process wait) while
        it reads, ``SNAPSHOT_CHUNK_KEYS`` keys per round trip, extending the lock's TTL after
        each; a state so large that this passes write_wait_s makes writes meanwhile get 503.
        To restore it as a one-process server: stop it, copy the file to data_dir/snapshot,
        delete data_dir/journal*; back into Redis: ``server.py --cluster-import DATA_DIR``."""
        self._check_not_in_tx()
        token = self._take_lock()
        try:
            items, after = [], None
            ttl_ms = int(self.lock_ttl_s * 1000)
            while True:
                low = b"-" if after is None else b"(" + after
                flat = self._read(self._list_script, keys=(self._index,), args=(
                    low, b"+", self.SNAPSHOT_CHUNK_KEYS, self._value_prefix, "1"))
                items += [(_key_of(member), text) for member, text in zip(flat[::2], flat[1::2])
                          if text is not None]
                if len(flat) < 2 * self.SNAPSHOT_CHUNK_KEYS:
                    break
                after = flat[-2]
                if not self._read(self._hold, token, ttl_ms):
                    raise StateError("backup: the lock expired while reading; try again")
            writes = int(self._read(self._redis.call, "HGET", self._stats_key, "writes") or 0)
        finally:
            self._drop_lock(token)
        # the local store's writer; it uses only SNAPSHOT_CHUNK_KEYS of its store
        Compaction._write_snapshot(self, os.path.abspath(path), items, writes)

    def load_from(self, pairs):
        """Copy (key, value) pairs (a local store's ``items()``) into Redis, whose prefix must
        hold no state yet (else StateError, changing nothing); the number copied. Holds the
        transaction lock throughout, ``LOAD_CHUNK_KEYS`` keys per script."""
        self._check_not_in_tx()
        token = self._take_lock()
        try:
            held = self._read(self._redis.call, "ZCARD", self._index)
            if held:
                raise StateError("redis already holds %d keys under %s; import only into an "
                                 "empty prefix (choose another [cluster] key_prefix, or delete "
                                 "those keys first)" % (held, self.cluster.prefix))
            count, chunk = 0, []
            for key, value in pairs:
                check_key(key)
                chunk.append((_member(key), _import_text(value)))
                if len(chunk) == self.LOAD_CHUNK_KEYS:
                    count += self._load_chunk(token, chunk)
                    chunk = []
            return count + self._load_chunk(token, chunk)
        finally:
            self._drop_lock(token)

    def _load_chunk(self, token, chunk):
        if not chunk:
            return 0
        keys = [self._lock_key, self._index, self._stats_key]
        args = [token]
        for member, text in chunk:
            keys.append(self._value_prefix + member)
            args += [member, text]
        try:
            if self._load_script(keys=keys, args=args) != 1:
                raise StateWriteError("import: the lock expired; the prefix is now partly "
                                      "filled: delete its keys before trying again")
            self._hold(token, int(self.lock_ttl_s * 1000))
        except (RedisUnavailable, RedisError) as error:
            raise StateWriteError("import failed: %s" % error) from None
        return len(chunk)

    def close(self):
        """Leave the cluster and close the Redis client. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.cluster.close()


class _TransactionContext(object):
    """Holds the lock from __enter__ to __exit__ (same thread); the tx is the local store's
    ``Transaction``, reading Redis through ``RedisStore._text``."""

    def __init__(self, store):
        self._store = store
        self._tx = self._token = None

    def __enter__(self):
        self._token = self._store._take_lock()
        self._tx = Transaction(self._store._text)
        return self._tx

    def __exit__(self, exc_type, exc, tb):
        store, tx = self._store, self._tx
        tx._done = True
        committed = False
        try:
            if exc_type is None and tx._changes:
                store._commit(self._token, tx._changes)   # drops the lock key with the writes
                committed = True
        finally:
            store._drop_lock(self._token, key_too=not committed)
        return False


def _import_text(value):
    """A value's stored bytes for an import: as ``encode_value``'s, except that a string holding
    a lone surrogate, which only a file from before values were UTF-8 can hold, keeps its
    escaped form (``json_bytes``), as the local store keeps it."""
    try:
        text = json_bytes(value)
    except (TypeError, ValueError, RecursionError) as error:
        raise ValueError("'value' must be JSON: %s" % error) from None
    check_plain(value)
    return text


def _info_fields(text):
    """INFO's "name:value" lines as {name: int} (only the numeric ones)."""
    out = {}
    if not isinstance(text, bytes):
        return out
    for line in text.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition(":")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def _empty_stats(durability):
    return {"keys": 0, "bytes": 0, "writes": 0, "applied_seq": 0, "journal_bytes": 0,
            "fsyncs": 0, "compactions": 0, "snapshot_bytes": 0, "snapshot_time": 0.0,
            "durability": durability, "backend": "redis"}
