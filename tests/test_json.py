"""JSON both ways (issue 19): request.json() refuses what parsers disagree on and bodies past its
size limit; json_response never sends what JSON.parse rejects. And /hello/echo's own cap."""
import codecs
import json
import socket

import pytest

from conftest import raw_exchange, request, status_of
from handlers._core import json_response

JSON = {"Content-Type": "application/json"}


def parsed(request):
    return {"got": request.json()}


def parsed_up_to_200(request):
    return {"got": request.json(max_bytes=200)}


def body_then_json(request):
    try:
        request.json()
    except Exception:
        pass
    return {"body": len(request.body())}   # the oversize body stays refused: a 413 again


def returns_nan(request):
    return {"ratio": float("nan")}


def returns_infinity(request):
    return json_response([float("inf")])


ROUTES = [("POST", "/t/json", parsed), ("POST", "/t/json200", parsed_up_to_200),
          ("POST", "/t/again", body_then_json),
          ("GET", "/t/nan", returns_nan), ("GET", "/t/inf", returns_infinity)]


@pytest.fixture
def app(start_server):
    return start_server(routes=ROUTES, config={"max_json_bytes": 1000})


def post(server, path, body, headers=JSON):
    status, _, answer = request(server, "POST", path, body, headers)
    return status, answer


# --- what is refused, and why ---------------------------------------------------------------

@pytest.mark.parametrize("raw, message", [
    (b'{"a": NaN}', "request body holds NaN or Infinity, which JSON does not allow"),
    (b'[Infinity]', "request body holds NaN or Infinity, which JSON does not allow"),
    (b'{"a": -Infinity}', "request body holds NaN or Infinity, which JSON does not allow"),
    (b'{"a": 1e999}', "request body holds a number too large for a float"),
    (b'[-1.5E+400]', "request body holds a number too large for a float"),
    (b'[1' + b'0' * 400 + b'.0]', "request body holds a number too large for a float"),
    (b'{"a": 1, "a": 2}', "request body has a duplicate key in an object"),
    (b'[{"x": {"b": 1, "c": 2, "b": 3}}]', "request body has a duplicate key in an object"),
    (b'{"\\u0061": 1, "a": 2}', "request body has a duplicate key in an object"),
    ('{"a": 1}'.encode("utf-16-le"), "request body must be UTF-8, not UTF-16 or UTF-32"),
    ('{"a": 1}'.encode("utf-16-be"), "request body must be UTF-8, not UTF-16 or UTF-32"),
    ('{"a": 1}'.encode("utf-16"), "request body must be UTF-8, not UTF-16 or UTF-32"),  # BOM
    (b"\xfe\xff\x00[\x001\x00]", "request body must be UTF-8, not UTF-16 or UTF-32"),
    ('[1]'.encode("utf-32-le"), "request body must be UTF-8, not UTF-16 or UTF-32"),
    ('[1]'.encode("utf-32"), "request body must be UTF-8, not UTF-16 or UTF-32"),
    (codecs.BOM_UTF8 + b'{"a": 1}', "request body must not start with a byte order mark"),
    (b'{"a": "\xff"}', "request body must be UTF-8 (RFC 8259 section 8.1)"),
    (b'{"a": 1', "request body is not valid JSON"),
], ids=["nan", "infinity", "minus-infinity", "1e999", "-1.5E+400", "400-digit-float",
        "duplicate", "nested-duplicate", "escaped-duplicate", "utf-16-le", "utf-16-be",
        "utf-16-bom", "utf-16-be-bom", "utf-32-le", "utf-32-bom", "utf-8-bom", "bad-utf-8",
        "truncated"])
def test_refused_with_400_and_a_short_message(app, raw, message):
    status, answer = post(app, "/t/json", raw)
    assert (status, answer.decode().startswith(message)) == (400, True), answer


@pytest.mark.parametrize("raw, value", [
    (b'{"a": 1e308, "b": -1.7976931348623157e308, "c": 1e-999}', {"a": 1e308,
     "b": -1.7976931348623157e308, "c": 0.0}),
    (b'{"a": {"k": 1}, "b": {"k": 2}}', {"a": {"k": 1}, "b": {"k": 2}}),   # same key, two objects
    (b'{"A": 1, "a": 2}', {"A": 1, "a": 2}),
    (b'[{}, [], "NaN", 12345678901234567890]', [{}, [], "NaN", 12345678901234567890]),
    (' {"\u00e9": "\U0001F600"} '.encode("utf-8"), {"\u00e9": "\U0001F600"}),
])
def test_json_that_means_one_thing_is_accepted(app, raw, value):
    status, answer = post(app, "/t/json", raw)
    assert (status, json.loads(answer)) == (200, {"got": value})


# --- the size limit: max_json_bytes, and a handler's own max_bytes -------------------------------

def padded(size):
    """A JSON body of exactly ``size`` bytes."""
    body = b'{"p":"' + b"x" * (size - 8) + b'"}'
    assert len(body) == size
    return body


@pytest.mark.parametrize("path, limit", [("/t/json", 1000),     # max_json_bytes (configured)
                                         ("/t/json200", 200)])  # request.json(max_bytes=200)
def test_the_limit_passes_and_one_byte_more_is_413(app, path, limit):
    status, answer = post(app, path, padded(limit))
    assert status == 200 and json.loads(answer)["got"]["p"] == "x" * (limit - 8)
    status, answer = post(app, path, padded(limit + 1))
    assert (status, answer) == (413, b"request body too large\n")


def chunked(body, piece=97):
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece])
             for i in range(0, len(body), piece)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_a_chunked_body_is_held_to_the_limit_too(app):
    for size, expected in ((1000, 200), (1001, 413)):
        head = (b"POST /t/json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        assert status_of(raw_exchange(app, head + chunked(padded(size)))) == expected, size


def test_a_declared_length_past_the_limit_is_413_before_the_body_is_read(start_server):
    # buffer_body_bytes 0: the worker gets the request at once, before the reactor reads a body
    server = start_server(routes=ROUTES, config={"buffer_body_bytes": 0})
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:   # a head alone: the answer comes without a byte of the 65,537 announced
        sock.sendall(b"POST /t/json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 65537\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")
    finally:
        sock.close()


def test_a_body_refused_for_its_size_stays_refused(app):
    assert post(app, "/t/again", padded(1001))[0] == 413
    assert json.loads(post(app, "/t/again", padded(1000))[1]) == {"body": 1000}


def test_the_default_is_64_kib(start_server):
    # max_drain_bytes: the refused body is read and dropped, so the client hears the 413
    server = start_server(routes=ROUTES, config={"max_drain_bytes": 1048576})
    assert post(server, "/t/json", padded(65536))[0] == 200
    assert post(server, "/t/json", padded(65537))[0] == 413


def test_max_body_bytes_still_caps_a_larger_max_bytes(start_server):
    server = start_server(routes=ROUTES, config={"max_body_bytes": 150})
    assert post(server, "/t/json200", padded(150))[0] == 200
    assert post(server, "/t/json200", padded(151))[0] == 413


# --- responses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/t/nan", "/t/inf"])
def test_a_handler_returning_nan_or_infinity_gets_a_500_not_invalid_json(app, path):
    status, _, body = request(app, "GET", path)
    assert status == 500 and b"NaN" not in body and b"Infinity" not in body
    assert "Out of range float values are not JSON compliant" in app.error_text()


# --- /hello/echo: what a demonstration needs ------------------------------------------------

def test_echo_takes_4_kib_of_json_and_not_one_byte_more(server):
    status, _, answer = request(server, "POST", "/hello/echo", padded(4096), JSON)
    assert status == 200 and len(json.loads(answer)["json"]["p"]) == 4088
    status, _, answer = request(server, "POST", "/hello/echo", padded(4097), JSON)
    assert (status, answer) == (413, b"request body too large\n")


def test_echo_takes_4_kib_of_form_and_not_one_byte_more(server):
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, answer = request(server, "POST", "/hello/echo", b"a=" + b"x" * 4094, form)
    assert status == 200 and json.loads(answer)["form"] == [["a", "x" * 4094]]
    assert request(server, "POST", "/hello/echo", b"a=" + b"x" * 4095, form)[0] == 413


def test_echo_refuses_nan(server):
    assert request(server, "POST", "/hello/echo", b'{"a": NaN}', JSON)[0] == 400
