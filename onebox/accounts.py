"""Accounts: users and their passwords, kept in the shared store.

What it owns
------------
One record per user at ``accounts/<name>`` in the state store (``ACCOUNT_PREFIX``), a JSON
object holding the password's scrypt hash and what made it, never the password::

    {"scheme": "scrypt", "n": 131072, "r": 8, "p": 1, "dklen": 32,
     "salt": "<16 random bytes, base64>", "hash": "<dklen bytes, base64>",
     "created": 1718000000.0, "changed": 1718000000.0}

For callers (the admin listener's ``/accounts`` endpoints, ``server.py --add-user`` and its
siblings, and a login page): ``Accounts(store, settings)`` with ``add``, ``set_password``,
``delete``, ``names``, ``info``, ``exists`` and ``verify``. Every method is safe from any
thread. ``settings`` is the ``[accounts]`` section (onebox/settings.py), or a function that
returns the current one (the engine's: a reload then applies to the next hash).

Names and passwords
-------------------
* A name is 1 to 64 ASCII letters, digits, ``.``, ``_`` or ``-``, starting with a letter or a
  digit (a name is never mistaken for a flag, ``.`` or ``..``). Names are case-insensitive:
  ``Alice`` and ``alice`` are one account, kept and listed in lower case, so two look-alike
  accounts cannot be made.
* A password is text of ``min_password_chars`` to ``max_password_chars`` characters (spaces
  welcome: passphrases), without control characters, compared after Unicode NFKC
  normalization (NIST SP 800-63B 5.1.1.2: the same password typed on two keyboards may arrive
  composed or decomposed). The cap bounds what one attempt can make the server read and hash.
* Bad input raises ``ValueError`` with a message that names the field and the rule and never
  repeats the input (it may reach an HTTP error body); ``AccountExists`` and ``NoSuchAccount``
  are what their names say.

Why scrypt, and these parameters
--------------------------------
scrypt (RFC 7914) is memory-hard: each guess costs an attacker ``128 * n * r`` bytes of memory
as well as time, which is what makes GPUs and ASICs poor at it. OWASP's Password Storage Cheat
Sheet asks for at least n = 2**17, r = 8, p = 1: 128 MiB and ~0.3 s per hash here (measured:
docs/operations.md, "Accounts"). ``n`` is the setting ``[accounts] scrypt_n``; r, p and dklen
are fixed. Each record keeps the parameters it was hashed with, so raising ``scrypt_n`` breaks
no login: an old record is checked with its own, and ``verify`` re-hashes it with the current
ones after its next successful check. The salt is 16 bytes from ``os.urandom`` per hash, so two
users with one password have different hashes, and a table of precomputed hashes is useless.

What a login must not tell
--------------------------
``verify`` costs one scrypt hash whatever it is given: an unknown or invalid name, or a
password that could never match (too long, not text), is hashed against a dummy record with
the current parameters, so its answer comes as late as for a known name with a wrong password
(OWASP Authentication Cheat Sheet, "Authentication Responses"). Results are compared with
``hmac.compare_digest``. It returns True or False, and raises only ``AccountsBusy`` (and the
store's errors). One gap, until its next login: a record hashed before ``scrypt_n`` was raised
answers sooner than the dummy, which costs what the current parameters cost.

Memory and cores
----------------
``hashlib.scrypt`` releases the GIL (a hash does not stall other requests), but each one
holds 128 MiB and a core while it runs. So at most ``max_parallel_hashes`` run at once in one
``Accounts``; more wait in line, first come first served, up to ``hash_wait_s``, then
``AccountsBusy`` (a login page answers 503 with Retry-After). Nothing else is held while hashing: the store is read before and
written after. A server has one ``Accounts`` (the engine's), so the bound is the server's.

Imports the standard library only; used by the engine, the admin listener and ``server.py``.
"""
import base64
import collections
import hashlib
import hmac
import os
import re
import threading
import time
import unicodedata

__all__ = ["Accounts", "AccountError", "AccountExists", "NoSuchAccount", "AccountsBusy",
           "ACCOUNT_PREFIX", "check_name", "check_password", "check_scrypt_n"]

ACCOUNT_PREFIX = "accounts/"      # state store keys of the accounts
SCHEME = "scrypt"
SCRYPT_R = 8                      # block size: OWASP's minimum, and every library's default
SCRYPT_P = 1                      # parallelism: 1, as OWASP's minimum (n carries the cost)
DKLEN = 32                        # bytes of hash kept: 256 bits; more would add no strength
SALT_BYTES = 16                   # per hash, from os.urandom (NIST SP 800-63B: at least 32 bits)
MAX_NAME_CHARS = 64
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,%d}" % (MAX_NAME_CHARS - 1), re.ASCII)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
NAME_RULE = ("'name' must be 1 to %d letters, digits, '.', '_' or '-', starting with a letter "
             "or a digit" % MAX_NAME_CHARS)


class AccountError(Exception):
    """An account that is, or is not, there when it must not, or must, be."""


class AccountExists(AccountError):
    """``add`` of a name that is taken."""


class NoSuchAccount(AccountError):
    """``set_password``, ``delete`` or ``info`` of a name that has no account."""


class AccountsBusy(Exception):
    """``max_parallel_hashes`` hashes ran for all of ``hash_wait_s``: try again later (503)."""


# --- the rules -------------------------------------------------------------------------------

def check_name(name):
    """The account's name as kept (lower case), or ValueError."""
    if not isinstance(name, str):
        raise ValueError("'name' must be a string")
    # ASCII before lower(): the Kelvin sign's lower case is "k", so "\u212aate" would be "kate"
    if not name.isascii() or not _NAME_RE.fullmatch(name.lower()):
        raise ValueError(NAME_RULE)
    return name.lower()


def check_password(password, settings, minimum=True):
    """The password as hashed (NFKC, UTF-8 bytes), or ValueError. ``minimum=False`` (verify)
    skips the least length: one set before ``min_password_chars`` was raised still logs in."""
    if not isinstance(password, str):
        raise ValueError("'password' must be a string")
    if len(password) > settings.max_password_chars:   # before normalizing: bounds that work too
        raise ValueError("'password' must be at most %d characters" % settings.max_password_chars)
    text = unicodedata.normalize("NFKC", password)
    if minimum and len(text) < settings.min_password_chars:
        raise ValueError("'password' must be at least %d characters" % settings.min_password_chars)
    if len(text) > settings.max_password_chars:   # NFKC can lengthen: U+FDFA is 18 characters
        raise ValueError("'password' must be at most %d characters" % settings.max_password_chars)
    if _CONTROL_RE.search(text):
        raise ValueError("'password' must not contain control characters")
    return text.encode("utf-8")


def check_scrypt_n(n):
    """ValueError unless ``n`` is a power of two of at least 2**14 (RFC 7914 section 2: n is a
    power of two; OpenSSL refuses others)."""
    if n < 16384 or n & (n - 1):
        raise ValueError("scrypt_n must be a power of two, at least 16384 (131072 is OWASP's "
                         "minimum for r=8, p=1)")


def scrypt_memory_bytes(n, r):
    """What one hash allocates (OpenSSL's own reckoning: 128 * r * (n + 2 + p)), plus room."""
    return 128 * r * (n + 2 + SCRYPT_P) + (1 << 20)


def _b64(data):
    return base64.b64encode(data).decode("ascii")


# --- the accounts ----------------------------------------------------------------------------

class Accounts(object):
    """The accounts in ``store`` (a ``onebox.store.Store``), hashed per ``settings`` (the
    ``[accounts]`` section, or a function returning the current one). See the module
    docstring for the rules; nothing here is meant for overriding."""

    def __init__(self, store, settings):
        self.store = store
        self._settings = settings if callable(settings) else (lambda: settings)
        # Guards _hashing (the hashes running now) and _waiting (an Event per hash waiting for
        # its turn, first come first served: a turn passes to the oldest, never to whoever
        # grabs the lock first, so a flood cannot starve a waiting login).
        self._lock = threading.Lock()
        self._hashing = 0
        self._waiting = collections.deque()

    # -- changes -------------------------------------------------------------------------------
    def add(self, name, password):
        """Make an account and return its name as kept (lower case); ValueError for a bad
        name or password, AccountExists if it is taken."""
        name = check_name(name)
        key = ACCOUNT_PREFIX + name
        if self.store.get(key) is not None:   # before hashing: a taken name costs no 0.3 s
            raise AccountExists("user %s exists" % name)
        record = self._new_record(password)
        with self.store.transaction() as tx:   # hashed before: the writers' lock is held briefly
            if tx.get(key) is not None:   # made while we hashed
                raise AccountExists("user %s exists" % name)
            tx.put(key, record)
        return name

    def set_password(self, name, password):
        """Replace an account's password (and its salt); its name as kept; NoSuchAccount if
        there is none."""
        name = check_name(name)
        key = ACCOUNT_PREFIX + name
        if self.store.get(key) is None:   # before hashing: a typo costs no 0.3 s
            raise NoSuchAccount("no such user: %s" % name)
        record = self._new_record(password)
        with self.store.transaction() as tx:
            old = tx.get(key)
            if old is None:   # deleted while we hashed
                raise NoSuchAccount("no such user: %s" % name)
            if isinstance(old, dict) and "created" in old:
                record["created"] = old["created"]
            tx.put(key, record)
        return name

    def delete(self, name):
        """Remove an account; its name as kept; NoSuchAccount if there is none."""
        name = check_name(name)
        if not self.store.delete(ACCOUNT_PREFIX + name):
            raise NoSuchAccount("no such user: %s" % name)
        return name

    # -- reads ---------------------------------------------------------------------------------
    def names(self):
        """Every account's name, sorted (a key under the prefix that is no valid name, which
        only an area writing there could make, is not an account)."""
        names = (key[len(ACCOUNT_PREFIX):] for key in self.store.keys(ACCOUNT_PREFIX))
        return [name for name in names if _NAME_RE.fullmatch(name)]

    def exists(self, name):
        """Whether ``name`` has an account; False for a name that is not valid. Answers at
        once: never let a login form ask it (verify costs the same either way)."""
        try:
            key = ACCOUNT_PREFIX + check_name(name)
        except ValueError:
            return False
        return self.store.get(key) is not None

    def info(self, name):
        """{"name", "created", "changed", "n"} of an account (no hash, no salt; "changed" is
        when its password was last set: a session made before it is stale); NoSuchAccount."""
        folded = check_name(name)
        record = self.store.get(ACCOUNT_PREFIX + folded)
        if not isinstance(record, dict):
            raise NoSuchAccount("no such user: %s" % folded)
        return {"name": folded, "created": record.get("created"),
                "changed": record.get("changed", record.get("created")), "n": record.get("n")}

    def verify(self, name, password):
        """Whether ``password`` is ``name``'s. One scrypt hash whatever the input (see the
        module docstring); False for anything that is not a match, AccountsBusy past
        ``hash_wait_s``."""
        settings = self._settings()
        key, record = self._record_or_none(name)
        params = _params_of(record)
        if params is None:   # no usable record: the same work against a dummy one
            record = None
            params = (settings.scrypt_n, SCRYPT_R, SCRYPT_P, DKLEN)
            salt, expected = os.urandom(SALT_BYTES), os.urandom(DKLEN)
        else:
            salt, expected = params[4], params[5]
            params = params[:4]
        try:
            secret = check_password(password, settings, minimum=False)
        except ValueError:
            secret, record = b"\x00 not a password", None   # the same work, then False
        digest = self._hash(secret, salt, *params)
        matched = hmac.compare_digest(digest, expected) and record is not None
        if matched and params != (settings.scrypt_n, SCRYPT_R, SCRYPT_P, DKLEN):
            self._rehash(key, record, secret, settings)
        return matched

    # -- the parts -----------------------------------------------------------------------------
    def _record_or_none(self, name):
        try:
            key = ACCOUNT_PREFIX + check_name(name)
        except ValueError:
            return None, None
        return key, self.store.get(key)

    def _new_record(self, password):
        """A fresh record for ``password`` (ValueError if it breaks the rules)."""
        settings = self._settings()
        secret = check_password(password, settings)
        salt = os.urandom(SALT_BYTES)
        digest = self._hash(secret, salt, settings.scrypt_n, SCRYPT_R, SCRYPT_P, DKLEN)
        now = time.time()
        return {"scheme": SCHEME, "n": settings.scrypt_n, "r": SCRYPT_R, "p": SCRYPT_P,
                "dklen": DKLEN, "salt": _b64(salt), "hash": _b64(digest),
                "created": now, "changed": now}

    def _rehash(self, key, record, secret, settings):
        """After a match with old parameters: the same password under the current ones, unless
        the record changed meanwhile (a new password set while we hashed wins)."""
        salt = os.urandom(SALT_BYTES)
        digest = self._hash(secret, salt, settings.scrypt_n, SCRYPT_R, SCRYPT_P, DKLEN)
        with self.store.transaction() as tx:
            if tx.get(key) == record:
                tx.put(key, dict(record, n=settings.scrypt_n, r=SCRYPT_R, p=SCRYPT_P,
                                 dklen=DKLEN, salt=_b64(salt), hash=_b64(digest)))

    def _hash(self, secret, salt, n, r, p, dklen):
        """scrypt, at most ``max_parallel_hashes`` at once (each holds 128 * n * r bytes)."""
        self._take_turn(self._settings())
        try:
            return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=dklen,
                                  maxmem=scrypt_memory_bytes(n, r))
        finally:
            self._end_turn()

    def _take_turn(self, settings):
        """Return once this thread may hash; AccountsBusy after ``hash_wait_s`` in line."""
        with self._lock:
            if self._hashing < settings.max_parallel_hashes and not self._waiting:
                self._hashing += 1
                return
            turn = threading.Event()
            self._waiting.append(turn)
        if turn.wait(settings.hash_wait_s):
            return
        with self._lock:
            if turn.is_set():   # given just as we gave up: take it
                return
            self._waiting.remove(turn)
        raise AccountsBusy("too many password checks at once; try again shortly")

    def _end_turn(self):
        """Pass the turn on to the oldest waiting, as many as max_parallel_hashes allows now
        (a reload may have changed it)."""
        with self._lock:
            self._hashing -= 1
            limit = self._settings().max_parallel_hashes
            while self._waiting and self._hashing < limit:
                self._waiting.popleft().set()
                self._hashing += 1


def _params_of(record):
    """(n, r, p, dklen, salt, hash) of a usable record, else None (none, or damaged: a
    hand-edited record is treated as no account, never as a 500)."""
    if not isinstance(record, dict) or record.get("scheme") != SCHEME:
        return None
    try:
        n, r, p, dklen = (int(record[field]) for field in ("n", "r", "p", "dklen"))
        salt = base64.b64decode(record["salt"], validate=True)
        expected = base64.b64decode(record["hash"], validate=True)
        check_scrypt_n(n)
    except (KeyError, TypeError, ValueError):
        return None
    if not (1 <= r <= 64 and 1 <= p <= 16 and dklen == len(expected) and 16 <= dklen <= 64
            and scrypt_memory_bytes(n, r) < 2 ** 31):
        return None   # what hashlib would refuse, or a record that could cost a GiB
    return n, r, p, dklen, salt, expected
