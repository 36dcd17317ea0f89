"""Keys and values: what the store accepts, and the bytes it keeps them as.

Values in memory
    Each value is kept as its canonical JSON encoded in UTF-8, as ``bytes``: callers can never
    mutate a stored value (``get`` returns a fresh ``json.loads``), the journal and snapshots need
    those bytes anyway, and ``json.loads`` of a small dict costs ~4 us against ~9 us for
    ``copy.deepcopy`` (measured on CPython 3.11), with less memory than live objects. Bytes, not
    ``str``: one emoji makes CPython store a whole ``str`` at 4 bytes per character, while UTF-8
    costs 1 byte per ASCII character and 4 per emoji. Measured (``bench/bench_state.py --memory``,
    CPython 3.11): 1 byte of memory per stored byte plus ~120 bytes per key, of which ~9 are the
    sorted key index (``index.SortedKeys``) that lets a listing cost what it returns.

    A lone surrogate, ``"\\ud800"``, is JSON but not text, and UTF-8 cannot carry it: a key
    holding one, or a value read from a file written before values were UTF-8, is kept in the
    escaped ASCII form (``json_bytes``); ``encode_value`` refuses a new value holding one.

Invariants: no locks, no I/O; everything here runs before the store takes a lock, so a bad key or
value is refused before anything changes. Keys that break the contract's rules raise the
contract's ``StateKeyError`` (a 400); a key that is not a str, or a value that is not plain JSON,
raises ValueError (the handler's bug, a 500).

Imports the standard library and the contract's key rules (``handlers._state``).
"""
import json

from handlers._state import MAX_KEY_CHARS, StateKeyError


def check_key(key):
    if not isinstance(key, str):
        raise ValueError("'key' must be a string, not %s" % type(key).__name__)
    if not key:
        raise StateKeyError("'key' must be a non-empty string")
    if len(key) > MAX_KEY_CHARS:
        raise StateKeyError("'key' must be at most %d characters" % MAX_KEY_CHARS)
    if "\x00" in key:
        raise StateKeyError("'key' must not contain NUL")


# One encoder for every call: json.dumps(value, **options) builds a new one each time, which
# doubles the cost of a small write (5.9 us against 2.8 us). Encoders keep no state between calls,
# so sharing one across threads is safe. ensure_ascii=False: an emoji is 4 bytes of UTF-8 in
# memory and on disk, not the 12 of "\ud83d\ude00".
_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
# The old format's encoder, for what UTF-8 cannot carry (see json_bytes).
_dumps_ascii = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def encode_value(value):
    """Return the canonical JSON of value as UTF-8 bytes, or raise ValueError if it is not plain
    JSON text."""
    try:
        text = _dumps(value)  # rejects NaN/Infinity, cycles and foreign types at C speed
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError("'value' must be JSON: %s" % exc) from None
    check_plain(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # "\ud800" alone parses as JSON (RFC 8259 section 8.2 allows it) but is not Unicode
        # text; the runtime's request.json() refuses it, so here it is a caller's bug.
        raise ValueError("'value' must be JSON text: a string holds a lone surrogate "
                         "(U+D800..U+DFFF), which UTF-8 cannot encode") from None


def loads(data):
    """A stored value (UTF-8 JSON bytes) as a fresh object. Decoding first skips json.loads's
    sniffing for UTF-16/32, which costs more than the decode (a small dict: 5.0 us, not 4.3)."""
    return json.loads(data.decode("utf-8"))


def json_bytes(value):
    """Canonical JSON of a key, or of a value read from disk, as bytes: UTF-8, or, if it holds a
    lone surrogate, the escaped ASCII form. Files written before values were UTF-8 may hold
    "\\ud800" escapes; such a value keeps its escaped text, so it stays readable and compacts."""
    try:
        return _dumps(value).encode("utf-8")
    except UnicodeEncodeError:
        return _dumps_ascii(value).encode("ascii")


def check_plain(value):
    """Reject what json.dumps accepts but would not round-trip: non-str dict keys, tuples."""
    stack = [value]  # no cycles here: json.dumps has already refused them
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if not isinstance(k, str):
                    raise ValueError("'value' must be JSON: dict keys must be strings")
                if isinstance(v, (dict, list, tuple)):
                    stack.append(v)
        elif isinstance(item, tuple):
            raise ValueError("'value' must be JSON: use a list, not a tuple")
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, (dict, list, tuple)))


def check_int(n, name):
    if not isinstance(n, int) or isinstance(n, bool):
        raise ValueError("'%s' must be an int" % name)


def int_value(text):
    if text is None:
        return 0
    value = loads(text)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("incr needs an int value, the key holds %s" % type(value).__name__)
    return value


def check_listing(prefix, limit):
    if not isinstance(prefix, str):
        raise ValueError("'prefix' must be a string")
    if limit is not None:
        check_int(limit, "limit")
        if limit < 0:
            raise ValueError("'limit' must be at least 0")
