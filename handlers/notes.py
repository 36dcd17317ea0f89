"""Notes: a small JSON API over the shared, durable state; a starting point for real areas.

    GET    /api/notes            list (oldest first; ?limit=N, at most MAX_LIST)
    POST   /api/notes            {"text": "..."} -> 201 with the note and a Location header
    GET    /api/notes/{id}       one note
    PUT    /api/notes/{id}       {"text": "..."} -> the updated note
    DELETE /api/notes/{id}       204

State keys: "notes/next_id" (a counter) and "notes/item/<id, zero-padded>" (the note), so that
listing by key prefix is listing in creation order. Every write returns only once it is durable.
"""
import time

from handlers._core import HTTPError, json_response, state

MAX_TEXT_CHARS = 10000   # a note, not a document
MAX_NOTES = 10000        # bounds the memory this area can take from the shared store
MAX_LIST = 1000
ITEM_PREFIX = "notes/item/"


def _key(note_id):
    if not note_id.isdigit() or len(note_id) > 12:
        raise HTTPError(404, "no such note")
    return ITEM_PREFIX + note_id.zfill(12)


def _text_from(request):
    data = request.json()
    if not isinstance(data, dict):
        raise HTTPError(400, "body must be a JSON object like {\"text\": \"...\"}")
    unknown = sorted(set(data) - {"text"})
    if unknown:
        raise HTTPError(400, "unknown field(s); only 'text' is accepted")
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise HTTPError(400, "'text' must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise HTTPError(400, "'text' must be at most %d characters" % MAX_TEXT_CHARS)
    return text


def list_notes(request):
    raw_limit = request.query.get("limit", str(MAX_LIST))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIST:
        raise HTTPError(400, "'limit' must be a whole number from 1 to %d" % MAX_LIST)
    notes = [value for _, value in state.items(ITEM_PREFIX)[:int(raw_limit)]]
    return json_response({"notes": notes, "count": len(notes)})


def create_note(request):
    text = _text_from(request)
    now = time.time()
    with state.transaction() as tx:
        if tx.get("notes/count", 0) >= MAX_NOTES:
            raise HTTPError(507, "note limit reached; delete some notes first")
        note_id = str(tx.incr("notes/next_id"))
        tx.incr("notes/count")
        note = {"id": note_id, "text": text, "created": now, "updated": now}
        tx.put(_key(note_id), note)
    return json_response(note, 201, [("Location", "/api/notes/" + note_id)])


def get_note(request):
    note = state.get(_key(request.params["id"]))
    if note is None:
        raise HTTPError(404, "no such note")
    return json_response(note)


def update_note(request):
    key = _key(request.params["id"])
    text = _text_from(request)
    with state.transaction() as tx:
        note = tx.get(key)
        if note is None:
            raise HTTPError(404, "no such note")
        note = dict(note, text=text, updated=time.time())
        tx.put(key, note)
    return json_response(note)


def delete_note(request):
    key = _key(request.params["id"])
    with state.transaction() as tx:
        if tx.get(key) is None:
            raise HTTPError(404, "no such note")
        tx.delete(key)
        tx.incr("notes/count", -1)
    return None


ROUTES = [
    ("GET", "/api/notes", list_notes),
    ("POST", "/api/notes", create_note),
    ("GET", "/api/notes/{id}", get_note),
    ("PUT", "/api/notes/{id}", update_note),
    ("DELETE", "/api/notes/{id}", delete_note),
]
