"""The notes area: a JSON API over the shared state, with validation and clear 4xx errors."""
import json
import threading

import pytest

import handlers.notes as notes
from conftest import request

JSON = {"Content-Type": "application/json", "Accept": "application/json"}


def call(server, method, path, data=None):
    body = None if data is None else json.dumps(data).encode()
    status, headers, raw = request(server, method, path, body, JSON)
    return status, headers, (json.loads(raw) if raw else None)


def list_all(server, limit=None):
    """Every note, page by page as a client follows "next"; and the pages' sizes."""
    notes, sizes, after = [], [], None
    while True:
        query = "&".join(part for part in ("limit=%d" % limit if limit else "",
                                           "after=" + after if after else "") if part)
        status, _, page = call(server, "GET", "/api/notes" + ("?" + query if query else ""))
        assert status == 200 and page["count"] == len(page["notes"])
        notes += page["notes"]
        sizes.append(page["count"])
        after = page["next"]
        if after is None:
            return notes, sizes
        assert after == notes[-1]["id"]


def test_create_read_update_delete(server):
    status, headers, note = call(server, "POST", "/api/notes", {"text": "first"})
    assert status == 201 and note["text"] == "first"
    assert headers["location"] == "/api/notes/" + note["id"]
    assert call(server, "GET", "/api/notes/" + note["id"])[2] == note
    status, _, updated = call(server, "PUT", "/api/notes/" + note["id"], {"text": "changed"})
    assert status == 200 and updated["text"] == "changed" and updated["created"] == note["created"]
    assert call(server, "GET", "/api/notes")[2]["notes"] == [updated]
    assert call(server, "DELETE", "/api/notes/" + note["id"])[0] == 204
    assert call(server, "GET", "/api/notes/" + note["id"])[0] == 404
    assert call(server, "DELETE", "/api/notes/" + note["id"])[0] == 404
    assert call(server, "GET", "/api/notes")[2] == {"notes": [], "count": 0, "next": None}


def test_list_is_in_creation_order_and_limited(server):
    ids = [call(server, "POST", "/api/notes", {"text": "n%d" % n})[2]["id"] for n in range(12)]
    listed = call(server, "GET", "/api/notes")[2]["notes"]
    assert [note["id"] for note in listed] == ids  # "10" after "9": keys are zero-padded
    assert [n["id"] for n in call(server, "GET", "/api/notes?limit=3")[2]["notes"]] == ids[:3]
    assert call(server, "GET", "/api/notes?limit=0")[0] == 400
    assert call(server, "GET", "/api/notes?limit=x")[0] == 400


@pytest.mark.parametrize("body, message", [
    (b"", "request body must be JSON, got an empty body"),
    (b"{", "request body is not valid JSON"),
    (b"[]", "body must be a JSON object"),
    (b'{"text": ""}', "'text' must be a non-empty string"),
    (b'{"text": 5}', "'text' must be a non-empty string"),
    (b'{"text": "a", "extra": 1}', "unknown field(s); only 'text' is accepted"),
    (json.dumps({"text": "x" * 10001}).encode(), "'text' must be at most 10000 characters"),
])
def test_bad_input_gets_400_with_a_clear_message(server, body, message):
    status, headers, raw = request(server, "POST", "/api/notes", body, JSON)
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(raw)["error"].startswith(message)


EMOJI = "\U0001F600"  # 1 character, 4 bytes of UTF-8


def test_a_note_may_hold_max_note_bytes_and_not_one_more(server):
    assert notes.MAX_NOTE_BYTES == 4 * notes.MAX_TEXT_CHARS  # so the text below is at both limits
    status, _, note = call(server, "POST", "/api/notes", {"text": EMOJI * 10000})
    assert status == 201 and note["text"] == EMOJI * 10000
    status, _, error = call(server, "POST", "/api/notes", {"text": EMOJI * 10000 + "a"})
    assert status == 413 and error["error"] == "'text' must be at most 40000 bytes of UTF-8"
    assert call(server, "PUT", "/api/notes/" + note["id"], {"text": "a" + EMOJI * 10000})[0] == 413
    assert call(server, "GET", "/api/notes/" + note["id"])[2] == note


def test_all_notes_together_stay_within_max_total_bytes(start_server, monkeypatch):
    # server.py owns the settings; the area's limits are module constants, read per request
    monkeypatch.setattr(notes, "MAX_TOTAL_BYTES", 100)
    server = start_server()
    first = call(server, "POST", "/api/notes", {"text": "a" * 60})[2]
    second = call(server, "POST", "/api/notes", {"text": EMOJI * 10})[2]  # 100 bytes: the budget
    status, _, error = call(server, "POST", "/api/notes", {"text": "b"})
    assert status == 507 and error["error"] == "notes storage is full; delete some notes first"
    assert call(server, "PUT", "/api/notes/" + second["id"], {"text": EMOJI * 10 + "c"})[0] == 507
    assert call(server, "PUT", "/api/notes/" + second["id"], {"text": "\u00e9" * 20})[0] == 200
    assert call(server, "DELETE", "/api/notes/" + first["id"])[0] == 204
    assert call(server, "POST", "/api/notes", {"text": "d" * 60})[0] == 201  # 40 + 60 again
    assert call(server, "POST", "/api/notes", {"text": "e"})[0] == 507
    assert call(server, "GET", "/api/notes")[2]["count"] == 2


def test_a_lone_surrogate_in_a_note_is_400(server):
    status, _, raw = request(server, "POST", "/api/notes", b'{"text": "a\\ud800"}', JSON)
    assert status == 400
    assert call(server, "GET", "/api/notes")[2]["count"] == 0


@pytest.mark.parametrize("number", ["%C2%B2", "%D9%A3", "%EF%BC%91", "9" * 5000, "-1", "1.0"],
                         ids=["superscript-2", "arabic-indic-3", "fullwidth-1", "5000-digits",
                              "negative", "decimal"])
def test_only_ascii_digits_are_numbers(server, number):
    # str.isdigit() accepts superscript two and Arabic-Indic or fullwidth digits; int() fails on
    # the first and reads the others, and a 5,000-digit int() raises: all were once a 500
    call(server, "POST", "/api/notes", {"text": "one"})
    assert call(server, "GET", "/api/notes?limit=" + number)[0] == 400
    for method, body in (("GET", None), ("PUT", {"text": "x"}), ("DELETE", None)):
        assert call(server, method, "/api/notes/" + number, body)[0] == 404


def test_a_listing_is_at_most_max_list_notes_and_pages_on(start_server, monkeypatch):
    monkeypatch.setattr(notes, "MAX_LIST", 4)
    server = start_server()
    ids = [call(server, "POST", "/api/notes", {"text": "n%d" % n})[2]["id"] for n in range(10)]
    assert call(server, "DELETE", "/api/notes/" + ids.pop(5))[0] == 204
    listed, sizes = list_all(server)
    assert ([note["id"] for note in listed], sizes) == (ids, [4, 4, 1])
    first = call(server, "GET", "/api/notes?limit=1000")[2]   # more than the most: the most
    assert (first["count"], first["next"]) == (4, ids[3])
    assert [n["id"] for n in list_all(server, limit=3)[0]] == ids
    assert call(server, "GET", "/api/notes?after=5")[2]["notes"][0]["id"] == "7"   # 6 is gone
    assert call(server, "GET", "/api/notes?after=" + ids[-1])[2] == {"notes": [], "count": 0,
                                                                     "next": None}


def test_max_list_bounds_the_answer(start_server):
    server = start_server(config={"state.durability": "off"})
    # the docstring's arithmetic: the worst text there is takes 6 bytes of JSON ("\u0001") per
    # character, and a note's other fields (a 12-digit id, two times) up to 120
    worst_note = 6 * notes.MAX_TEXT_CHARS + 120
    assert notes.MAX_LIST * worst_note + 60 < 6.1e6
    body = json.dumps({"text": "\x01" * notes.MAX_TEXT_CHARS}).encode()
    for _ in range(notes.MAX_LIST + 1):
        assert request(server, "POST", "/api/notes", body, JSON)[0] == 201
    status, _, raw = request(server, "GET", "/api/notes?limit=1000", headers=JSON)
    assert status == 200 and json.loads(raw)["count"] == notes.MAX_LIST
    assert len(raw) <= notes.MAX_LIST * worst_note + 60


@pytest.mark.parametrize("query", ["after=x", "after=01", "after=-1", "after=", "limit=05",
                                   "after=" + "9" * 13])
def test_bad_listing_arguments_get_400(server, query):
    assert call(server, "GET", "/api/notes?" + query)[0] == 400


@pytest.mark.parametrize("spelling", ["01", "00000000001", "000000000001", "0001", "+1", " 1"])
def test_a_note_has_one_id(server, spelling):
    note = call(server, "POST", "/api/notes", {"text": "one"})[2]
    assert note["id"] == "1" and call(server, "GET", "/api/notes/1")[2] == note
    for method, body in (("GET", None), ("PUT", {"text": "x"}), ("DELETE", None)):
        assert call(server, method, "/api/notes/" + spelling.replace(" ", "%20"), body)[0] == 404
    assert call(server, "GET", "/api/notes/1")[2] == note


def test_a_note_body_may_be_max_body_bytes_and_not_one_more(server):
    # the longest a valid note can be written: every emoji as an escaped surrogate pair
    escaped = json.dumps({"text": EMOJI * notes.MAX_TEXT_CHARS}).encode()
    assert len(escaped) <= notes.MAX_BODY_BYTES
    assert request(server, "POST", "/api/notes", escaped, JSON)[0] == 201
    body = b'{"text": "a"}'
    body = body[:-1] + b" " * (notes.MAX_BODY_BYTES - len(body)) + b"}"
    assert request(server, "POST", "/api/notes", body, JSON)[0] == 201
    assert request(server, "POST", "/api/notes", body[:-1] + b" }", JSON)[0] == 413


def test_unknown_ids_are_404(server):
    for path in ("/api/notes/999", "/api/notes/abc", "/api/notes/" + "9" * 30):
        assert call(server, "GET", path)[0] == 404
        assert call(server, "PUT", path, {"text": "x"})[0] == 404


def test_concurrent_creates_get_distinct_ids(server):
    created = []

    def create():
        for n in range(20):
            created.append(call(server, "POST", "/api/notes", {"text": "c%d" % n})[2]["id"])

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(created)) == 160
    assert sorted(note["id"] for note in list_all(server)[0]) == sorted(created)


def test_notes_survive_a_restart(start_server, tmp_path):
    first = start_server(data_dir=tmp_path / "notes-data")
    note = call(first, "POST", "/api/notes", {"text": "durable"})[2]
    first.shutdown()
    first.server_close()
    second = start_server(data_dir=tmp_path / "notes-data")
    assert call(second, "GET", "/api/notes/" + note["id"])[2] == note


def test_notes_page_is_served(server):
    status, _, body = request(server, "GET", "/notes.html")
    assert status == 200 and (b'<script src="/assets/live.js"></script>\n'
                              b'<script src="/assets/notes.js"></script>') in body
    status, headers, body = request(server, "GET", "/assets/notes.js")
    assert status == 200 and b"fetch(path" in body and b'live("/api/notes/events"' in body
    assert headers["content-type"].startswith("text/javascript")
    status, headers, body = request(server, "GET", "/assets/live.js")
    assert status == 200 and b"new EventSource(url)" in body
