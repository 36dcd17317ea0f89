"""The store's file formats: frames with a checksum, journal records and snapshots.

File formats
    Both files (``journal``, ``snapshot``) are a sequence of frames: ``b"OB"``, payload length
    (uint32 big-endian), CRC32 of the payload (uint32 big-endian, ``zlib.crc32``), then the
    payload: JSON in UTF-8. (Files written before values were UTF-8 hold ASCII JSON with
    ``\\uXXXX`` escapes: still UTF-8, so they load as they are.)

    journal record:   ``{"s": seq, "o": [["p", key, value], ["d", key], ...]}`` -- one record per
                      write or transaction, all-or-nothing; ``incr`` is written as the new value.
    snapshot:         ``{"onebox_snapshot": 1, "seq": S, "keys": N}``, then records
                      ``{"kv": [[key, value], ...]}`` (``Store.SNAPSHOT_CHUNK_KEYS`` each), then
                      ``{"end": N}``.

Invariants: pure functions of bytes, no I/O and no locks. Writing builds records from the values'
stored bytes (``values.json_bytes``), so a record costs O(its size), never a re-encode. Reading
(open time only) stops at the first frame that is not whole and checksummed, and says why;
telling a torn tail from damage is the caller's (``recovery.py``), with ``valid_frame_after``.

Imports the standard library and ``values``.
"""
import json
import struct
import zlib

from onebox.store.values import json_bytes

MAX_PAYLOAD_BYTES = 0xFFFFFFFF  # the frame's length field is a uint32
MAGIC = b"OB"
HEADER = struct.Struct(">2sII")  # magic, payload length, crc32(payload)
SNAPSHOT_VERSION = 1


# --- writing ----------------------------------------------------------------------------------

def encode_frame(payload):
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError("record too large: %d bytes" % len(payload))
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def record_payload(seq, ops):
    """One journal record; built from the stored bytes, so it costs O(record), not a re-encode."""
    parts = []
    for key, text in ops:
        if text is None:
            parts.append(b'["d",%s]' % json_bytes(key))
        else:
            parts.append(b'["p",%s,%s]' % (json_bytes(key), text))
    return b'{"s":%d,"o":[%s]}' % (seq, b",".join(parts))


def snapshot_frames(items, seq, chunk_keys):
    """Yield the frames of a snapshot of items (a list of (key, JSON bytes))."""
    yield encode_frame(json_bytes({"onebox_snapshot": SNAPSHOT_VERSION, "seq": seq,
                                   "keys": len(items)}))
    for start in range(0, len(items), chunk_keys):
        pairs = b",".join(b"[%s,%s]" % (json_bytes(k), t)
                          for k, t in items[start:start + chunk_keys])
        yield encode_frame(b'{"kv":[%s]}' % pairs)
    yield encode_frame(json_bytes({"end": len(items)}))


# --- reading (open time only) -----------------------------------------------------------------

def parse_frame(data, off):
    """Return (payload object, end offset) of the frame at off, or (None, reason)."""
    if len(data) - off < HEADER.size:
        return None, "incomplete header"
    magic, length, crc = HEADER.unpack_from(data, off)
    if magic != MAGIC:
        return None, "bad magic"
    end = off + HEADER.size + length
    if end > len(data):
        return None, "incomplete record"
    payload = data[off + HEADER.size:end]
    if zlib.crc32(payload) != crc:
        return None, "bad checksum"
    try:
        # UTF-8; files written before values were UTF-8 are ASCII, which is UTF-8 too
        return json.loads(payload.decode("utf-8")), end
    except ValueError:  # UnicodeDecodeError is a ValueError
        return None, "checksum ok but payload is not JSON"


def read_frames(data):
    """Return ([(offset, obj)], stop offset, reason or None): every good frame up to the first bad."""
    frames, off = [], 0
    while off < len(data):
        obj, end_or_reason = parse_frame(data, off)
        if obj is None:
            return frames, off, end_or_reason
        frames.append((off, obj))
        off = end_or_reason
    return frames, off, None


def valid_frame_after(data, off):
    """Offset of the first valid frame after off, or None: tells damage from a torn tail."""
    pos = data.find(MAGIC, off + 1)
    while pos != -1:
        if parse_frame(data, pos)[0] is not None:
            return pos
        pos = data.find(MAGIC, pos + 1)
    return None


def end_of_frame(data, off):
    return off + HEADER.size + HEADER.unpack_from(data, off)[1]


def record_fields(obj):
    """(seq, ops) of a journal record object, or (None, None) if it is not one."""
    if not isinstance(obj, dict) or not is_seq(obj.get("s")) or not isinstance(obj.get("o"), list):
        return None, None
    for op in obj["o"]:
        ok = isinstance(op, list) and len(op) >= 2 and isinstance(op[1], str) and (
            (op[0] == "p" and len(op) == 3) or (op[0] == "d" and len(op) == 2))
        if not ok:
            return None, None
    return obj["s"], obj["o"]


def snapshot_frame_problem(obj, first):
    """Why a checksummed snapshot frame is not what the format says, or None."""
    if not isinstance(obj, dict):
        return "record is not an object"
    if first:
        ok = obj.get("onebox_snapshot") == SNAPSHOT_VERSION and is_seq(obj.get("seq"))
        return None if ok else "not a version %d snapshot header" % SNAPSHOT_VERSION
    if "kv" in obj:
        pairs = obj["kv"]
        ok = isinstance(pairs, list) and all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in pairs)
        return None if ok else "bad key/value list"
    return None if is_seq(obj.get("end")) else "unknown record"


def is_seq(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
