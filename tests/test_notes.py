"""The notes area: a JSON API over the shared state, with validation and clear 4xx errors."""
import json
import threading

import pytest

from conftest import request

JSON = {"Content-Type": "application/json", "Accept": "application/json"}


def call(server, method, path, data=None):
    body = None if data is None else json.dumps(data).encode()
    status, headers, raw = request(server, method, path, body, JSON)
    return status, headers, (json.loads(raw) if raw else None)


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
    assert call(server, "GET", "/api/notes")[2] == {"notes": [], "count": 0}


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
    assert call(server, "GET", "/api/notes")[2]["count"] == 160


def test_notes_survive_a_restart(start_server, tmp_path):
    first = start_server(data_dir=tmp_path / "notes-data")
    note = call(first, "POST", "/api/notes", {"text": "durable"})[2]
    first.shutdown()
    first.server_close()
    second = start_server(data_dir=tmp_path / "notes-data")
    assert call(second, "GET", "/api/notes/" + note["id"])[2] == note


def test_notes_page_is_served(server):
    status, _, body = request(server, "GET", "/notes.html")
    assert status == 200 and b'fetch(path' in body
