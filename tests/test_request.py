"""What a handler sees: query, headers, cookies, client_ip, and the body readers."""
import json

import pytest

from conftest import request


def inspect(request):
    return {"method": request.method, "path": request.path, "query": request.query,
            "items": request.query_items, "cookies": request.cookies,
            "client_ip": request.client_ip, "agent": request.headers.get("user-agent"),
            "multi": request.headers.get("x-multi"), "params": request.params}


def form_fields(request):
    form = request.form()
    return {"fields": form.fields, "all_b": form.get_all("b"),
            "files": {name: [f.filename, f.content_type, f.data.decode()]
                      for name, f in form.files.items()}}


@pytest.fixture
def app(start_server):
    return start_server(routes=[("GET", "/t/inspect/{rest...}", inspect),
                                ("POST", "/t/form", form_fields)])


def test_query_cookies_headers_and_client_ip(app):
    raw_headers = {"Cookie": 'a=1; b="two"; a=ignored', "User-Agent": "t/1", "X-Multi": "x"}
    status, _, body = request(app, "GET", "/t/inspect/p%20q/?x=1&y=a+b&x=2&empty=&%C3%A9=%E2%9C%93",
                              headers=raw_headers)
    seen = json.loads(body)
    assert status == 200
    assert seen["path"] == "/t/inspect/p q/"
    assert seen["params"] == {"rest": "p q/"}
    assert seen["query"] == {"x": "1", "y": "a b", "empty": "", "é": "✓"}
    assert seen["items"][:3] == [["x", "1"], ["y", "a b"], ["x", "2"]]
    assert seen["cookies"] == {"a": "1", "b": "two"}
    assert seen["client_ip"] == "127.0.0.1"
    assert seen["agent"] == "t/1"


def test_urlencoded_form(app):
    status, _, body = request(app, "POST", "/t/form", b"a=1&b=x+y&b=%21",
                              {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200
    assert json.loads(body)["fields"] == [["a", "1"], ["b", "x y"], ["b", "!"]]
    assert json.loads(body)["all_b"] == ["x y", "!"]


def test_multipart_form_with_a_file(app):
    boundary = "----onebox-test"
    body = (
        "--{b}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nHello\r\n"
        "--{b}\r\nContent-Disposition: form-data; name=\"upload\"; filename=\"a.txt\"\r\n"
        "Content-Type: text/plain\r\n\r\nline1\r\nline2\r\n"
        "--{b}--\r\n").format(b=boundary).encode()
    status, _, answer = request(app, "POST", "/t/form", body,
                                {"Content-Type": "multipart/form-data; boundary=" + boundary})
    assert status == 200, answer
    seen = json.loads(answer)
    assert seen["fields"] == [["title", "Hello"]]
    assert seen["files"] == {"upload": ["a.txt", "text/plain", "line1\r\nline2"]}


@pytest.mark.parametrize("content_type, body", [
    ("multipart/form-data", b"--x\r\n\r\n"),                                  # no boundary
    ("multipart/form-data; boundary=x", b"--x\r\nno-header-end"),             # truncated
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: attachment\r\n\r\nv\r\n--x--"),
    ("text/plain", b"a=1"),                                                    # not a form
    ("application/x-www-form-urlencoded", b"a=\xff\xfe"),                      # not UTF-8
])
def test_malformed_forms_get_400(app, content_type, body):
    status, _, answer = request(app, "POST", "/t/form", body, {"Content-Type": content_type})
    assert status == 400, answer


def test_too_many_query_fields_get_400(app):
    query = "&".join("k%d=v" % n for n in range(1001))
    assert request(app, "GET", "/t/inspect/x?" + query)[0] == 400


# --- JSON bodies: only declared JSON, only Unicode text --------------------------------------

def parsed(request):
    return {"got": request.json()}


def stored_surrogate(request):
    return {"text": "\ud800"}   # as a value stored before lone surrogates were refused


@pytest.fixture
def json_app(start_server):
    return start_server(routes=[("POST", "/t/json", parsed), ("GET", "/t/legacy", stored_surrogate)])


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/merge-patch+json"])
def test_json_accepts_json_media_types(json_app, content_type):
    status, _, body = request(json_app, "POST", "/t/json", b'{"a":"\xc3\xa9\\ud83d\\ude00"}',
                              {"Content-Type": content_type})
    assert (status, json.loads(body)) == (200, {"got": {"a": "\u00e9\U0001F600"}})


@pytest.mark.parametrize("headers", [{"Content-Type": "text/plain"},   # what a cross-site form sends
                                     {"Content-Type": "application/x-www-form-urlencoded"},
                                     {"Content-Type": "multipart/form-data; boundary=x"},
                                     {}])
def test_json_refuses_other_media_types_with_415(json_app, headers):
    status, _, body = request(json_app, "POST", "/t/json", b'{"a":1}', headers)
    assert status == 415 and b"Content-Type: application/json" in body


@pytest.mark.parametrize("raw", [b'{"text":"\\ud800"}', b'["ok","\\uDC00x"]', b'{"\\udbff":1}',
                                 b'"\xed\xa0\x80"'])           # CESU-8 bytes of U+D800
def test_json_refuses_lone_surrogates_with_400(json_app, raw):
    status, _, body = request(json_app, "POST", "/t/json", raw,
                              {"Content-Type": "application/json"})
    assert (status, body) == (400, b"request body holds a lone surrogate (not Unicode text)\n")


def test_json_response_escapes_a_lone_surrogate_instead_of_failing(json_app):
    status, _, body = request(json_app, "GET", "/t/legacy")
    assert (status, body) == (200, b'{"text":"\\ud800"}')
