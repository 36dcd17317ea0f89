"""Notes: a small JSON API over the shared, durable state; a starting point for real areas.

    GET    /api/notes            {"notes": [...], "count": N, "next": ID or null}, oldest
                                 first. ?limit=N: at most MAX_LIST, the default (a larger N
                                 gets MAX_LIST); ?after=ID: the notes created after that one.
                                 "next" is the ?after= of the next page, null on the last
    POST   /api/notes            {"text": "..."} -> 201 with the note and a Location header
    GET    /api/notes/{id}       one note
    PUT    /api/notes/{id}       {"text": "..."} -> the updated note
    DELETE /api/notes/{id}       204
    GET    /api/notes/events     server-sent events of topic "notes" (handlers/_events.py):
                                 "created" and "updated" (data: the note, as above),
                                 "deleted" (data: {"id": ID}); each sent once the write is
                                 durable, never for a request that failed

State keys: "notes/next_id" (a counter), "notes/count" (how many notes), "notes/bytes" (the
UTF-8 bytes of all their texts) and "notes/item/<id, zero-padded>" (the note), so that listing by
key prefix is listing in creation order. The counters change in the same transaction as the notes,
so they stay exact (but "notes/bytes" counts only notes written since it was introduced). Every
write returns only once it is durable.

What this area may take from the shared store is bounded three ways: MAX_NOTES notes,
MAX_NOTE_BYTES each, MAX_TOTAL_BYTES together. The handlers read these module constants at each
request (never copy them at import), so a test can lower one for itself.

What one request may cost is bounded too. A request body is at most MAX_BODY_BYTES (the longest
a valid note can be written in JSON). A listing holds at most MAX_LIST notes, and a note's JSON
is at most 6 bytes per character ("\\u0001") of MAX_TEXT_CHARS plus 120 of other fields: ~60 KB,
so one listing answer is at most ~6 MB. Measured on loopback (CPython 3.11), a listing of 100
notes of 10,000 control characters: 6.0 MB in 17 ms; of 10,000 emoji: 4.0 MB in 13 ms. Before
the cap (1,000 notes a listing), ?limit=1000 over 16 MiB of notes took 0.15 s (issue 19).

Note ids have one spelling: "00000000001" is not note 1 but no note (404).

Events are published after the transaction, so two writes racing to one note may publish in the
other order than they committed: a page keeps the note with the later "updated" time, and
forgets a note once it is deleted (ids are never reused), as pages/assets/notes.js does. A note
whose event would pass [events] max_event_bytes is announced as {"id": ID} alone (the page then
GETs it): never at the default, 65,536 (the largest note's event is ~60 KB: 10,000 control
characters, each a 6-byte JSON escape), but an operator may set it lower.
"""
import bisect
import time

from handlers._core import HTTPError, json_response, state
from handlers._events import EventsUnavailable, EventTooLarge, event_stream, publish

MAX_TEXT_CHARS = 10000          # a note, not a document: the rule users see
MAX_NOTE_BYTES = 40000          # UTF-8 bytes of one note's text: 10,000 emoji fit. What bounds
                                # memory: a character may be 4 bytes (this cap decides first)
MAX_TOTAL_BYTES = 16 * 1024 * 1024  # UTF-8 bytes of all texts: 419 notes of 10,000 emoji, which
                                # grow the server by 27 MiB of RSS (bench/bench_state.py --notes)
MAX_NOTES = 10000               # bounds the count of keys this area adds to the shared store
MAX_LIST = 100                  # notes per GET /api/notes: bounds its answer (docstring)
MAX_BODY_BYTES = 12 * MAX_TEXT_CHARS + 1024   # a POST or PUT body: every character written as
                                # an escaped surrogate pair ("\ud83d\ude00", 12 bytes), and room
                                # for the field name and whitespace. More than max_json_bytes
MAX_ID_DIGITS = 12              # ids are zero-padded to this many digits in their keys; no
                                # number in a request (id, limit, after) may be longer
ITEM_PREFIX = "notes/item/"
COUNT_KEY, BYTES_KEY, NEXT_ID_KEY = "notes/count", "notes/bytes", "notes/next_id"
TOPIC = "notes"                 # the events of every note, to every open notes page


def _whole_number(text, max_digits):
    """int(text) if text is 1..max_digits ASCII digits in canonical form, else None. str.isdigit
    alone is not enough: it accepts "\u00b2" and Arabic-Indic digits, on which int() fails or
    which are not how anyone writes an id; max_digits also keeps int() clear of its 4,300-digit
    limit. Canonical: no leading zero ("007" is not 7), so that a note has one URL (a cache or a
    rate limit keyed by path sees one note as one)."""
    if not text.isascii() or not text.isdigit() or len(text) > max_digits:
        return None
    if text[0] == "0" and len(text) > 1:
        return None
    return int(text)


def _key(note_id):
    if _whole_number(note_id, MAX_ID_DIGITS) is None:
        raise HTTPError(404, "no such note")
    return ITEM_PREFIX + note_id.zfill(MAX_ID_DIGITS)


def _text_from(request):
    """The validated text of the request's {"text": ...} and its size in UTF-8 bytes."""
    data = request.json(max_bytes=MAX_BODY_BYTES)
    if not isinstance(data, dict):
        raise HTTPError(400, "body must be a JSON object like {\"text\": \"...\"}")
    unknown = sorted(set(data) - {"text"})
    if unknown:
        raise HTTPError(400, "unknown field(s); only 'text' is accepted")
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise HTTPError(400, "'text' must be a non-empty string")
    size = _input_size(text)
    if size > MAX_NOTE_BYTES:
        raise HTTPError(413, "'text' must be at most %d bytes of UTF-8" % MAX_NOTE_BYTES)
    if len(text) > MAX_TEXT_CHARS:
        raise HTTPError(400, "'text' must be at most %d characters" % MAX_TEXT_CHARS)
    return text, size


def _input_size(text):
    """UTF-8 bytes of text from a request; 400 if it is not text."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): JSON, but not text
        raise HTTPError(400, "'text' must be Unicode text (no lone surrogates)") from None


def _set_total(tx, new_total):
    """Record the notes' new total of text bytes in tx, or raise 507 if it is past
    MAX_TOTAL_BYTES (then the transaction writes nothing)."""
    if new_total > MAX_TOTAL_BYTES:
        raise HTTPError(507, "notes storage is full; delete some notes first")
    tx.put(BYTES_KEY, new_total)


def list_notes(request):
    query = request.query
    limit = _whole_number(query.get("limit", str(MAX_LIST)), MAX_ID_DIGITS)
    if limit is None or limit < 1:
        raise HTTPError(400, "'limit' must be a whole number, at least 1 (at most %d are sent)"
                        % MAX_LIST)
    limit = min(limit, MAX_LIST)
    after = query.get("after")
    if after is not None and _whole_number(after, MAX_ID_DIGITS) is None:
        raise HTTPError(400, "'after' must be a note id")
    # The store lists by prefix only: the keys alone (at most MAX_NOTES short strings, ~0.1 ms),
    # then the values of one page (get() decodes only what it returns)
    keys = state.keys(ITEM_PREFIX)
    start = 0 if after is None else bisect.bisect_right(keys, _key(after))
    page = keys[start:start + limit]
    notes = [note for note in map(state.get, page) if note is not None]   # None: just deleted
    more = start + limit < len(keys)
    return json_response({"notes": notes, "count": len(notes),
                          "next": str(int(page[-1][len(ITEM_PREFIX):])) if more else None})


def create_note(request):
    text, size = _text_from(request)
    now = time.time()
    with state.transaction() as tx:
        if tx.get(COUNT_KEY, 0) >= MAX_NOTES:
            raise HTTPError(507, "note limit reached; delete some notes first")
        _set_total(tx, tx.get(BYTES_KEY, 0) + size)
        note_id = str(tx.incr(NEXT_ID_KEY))
        tx.incr(COUNT_KEY)
        note = {"id": note_id, "text": text, "created": now, "updated": now}
        tx.put(_key(note_id), note)
    _announce("created", note)
    return json_response(note, 201, [("Location", "/api/notes/" + note_id)])


def get_note(request):
    note = state.get(_key(request.params["id"]))
    if note is None:
        raise HTTPError(404, "no such note")
    return json_response(note)


def update_note(request):
    key = _key(request.params["id"])
    text, size = _text_from(request)
    with state.transaction() as tx:
        note = tx.get(key)
        if note is None:
            raise HTTPError(404, "no such note")
        _set_total(tx, _total_without(tx, note) + size)
        note = dict(note, text=text, updated=time.time())
        tx.put(key, note)
    _announce("updated", note)
    return json_response(note)


def delete_note(request):
    key = _key(request.params["id"])
    with state.transaction() as tx:
        note = tx.get(key)
        if note is None:
            raise HTTPError(404, "no such note")
        tx.put(BYTES_KEY, _total_without(tx, note))
        tx.delete(key)
        tx.incr(COUNT_KEY, -1)
    _announce("deleted", {"id": request.params["id"]})
    return None


def note_events(request):
    return event_stream(request, TOPIC)


def _announce(event, note):
    """Publish a note just written (the transaction is over: it is durable), so the request
    must not fail now. Too large for an event, it goes as its id alone; with the events
    unavailable (a cluster whose Redis is down), it goes unannounced: every page is told
    ``reset`` when Redis is back, and reads the list again."""
    try:
        try:
            publish(TOPIC, note, event=event)
        except EventTooLarge:
            publish(TOPIC, {"id": note["id"]}, event=event)
    except EventsUnavailable:
        pass


def _total_without(tx, note):
    """The notes' total bytes less this note's. Never below 0: a data dir from before the total
    was kept holds notes it never counted. ("surrogatepass": such an old note may hold a lone
    surrogate, which the store kept as the escape it was written with.)"""
    size = len(note["text"].encode("utf-8", "surrogatepass"))
    return max(0, tx.get(BYTES_KEY, 0) - size)


ROUTES = [
    ("GET", "/api/notes", list_notes),
    ("POST", "/api/notes", create_note),
    ("GET", "/api/notes/events", note_events),      # a literal segment: {id} never shadows it
    ("GET", "/api/notes/{id}", get_note),
    ("PUT", "/api/notes/{id}", update_note),
    ("DELETE", "/api/notes/{id}", delete_note),
]
