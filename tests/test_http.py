"""HTTP/1.1 over real sockets: framing, keep-alive, pipelining, methods, and malformed input.

Every malformed-input test also checks that the next connection is served normally.
"""
import http.client
import socket
import time

import pytest

from conftest import onebox, raw_exchange, read_until_close, request, status_of


def get_ok(server):
    status, _, body = request(server, "GET", "/hello")
    assert (status, body) == (200, b"hello, world\n")


def split_responses(raw):
    """Split concatenated responses that all carry Content-Length."""
    responses = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        responses.append((head, rest[:length]))
        raw = rest[length:]
    return responses


# --- well-formed requests -----------------------------------------------------------------

def test_get_has_date_length_and_body(server):
    status, headers, body = request(server, "GET", "/hello")
    assert status == 200
    assert headers["content-length"] == str(len(body))
    assert headers["date"].endswith(" GMT")
    assert headers["content-type"] == "text/plain; charset=utf-8"


def test_head_has_get_headers_and_no_body(server):
    _, get_headers, get_body = request(server, "GET", "/hello/ann")
    status, head_headers, head_body = request(server, "HEAD", "/hello/ann")
    assert status == 200 and head_body == b""
    assert head_headers["content-length"] == get_headers["content-length"] == str(len(get_body))
    assert head_headers["content-type"] == get_headers["content-type"]


def test_keep_alive_serves_many_requests_on_one_connection(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    for name in ("a", "b", "c"):
        connection.request("GET", "/hello/" + name)
        response = connection.getresponse()
        assert response.read() == b'{"greeting":"hello, %s"}' % name.encode()
    sock_before = connection.sock
    connection.request("GET", "/hello")
    connection.getresponse().read()
    assert connection.sock is sock_before  # still the same TCP connection
    connection.close()


def test_pipelined_requests_are_answered_in_order(server):
    pipeline = b"".join(b"GET /hello/%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in range(5))
    pipeline += b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    responses = split_responses(raw_exchange(server, pipeline))
    bodies = [body for _, body in responses]
    assert bodies == [b'{"greeting":"hello, %d"}' % n for n in range(5)] + [b"hello, world\n"]
    assert b"Connection: close" in responses[-1][0]


def test_pipelined_post_bodies_never_become_requests(server):
    """The stdlib handler desyncs here: an unread body is parsed as the next request."""
    smuggled = b"GET /hello/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    pipeline = (b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
                + smuggled + b"GET /hello/next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    responses = split_responses(raw_exchange(server, pipeline))
    assert [status_of(head) for head, _ in responses] == [405, 200]
    assert responses[1][1] == b'{"greeting":"hello, next"}'


def test_unread_large_body_closes_the_connection(start_server):
    server = start_server(config={"max_drain_bytes": 10})
    data = (b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
            + b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = raw_exchange(server, data)
    assert status_of(raw) == 405
    assert b"Connection: close" in raw and raw.count(b"HTTP/1.1 ") == 1


def test_http10_closes_by_default_and_keeps_alive_on_request(server):
    raw = raw_exchange(server, b"GET /hello HTTP/1.0\r\n\r\n")
    assert status_of(raw) == 200 and raw.endswith(b"hello, world\n")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    first = sock.recv(4096)
    assert b"Connection: keep-alive" in first
    sock.sendall(b"GET /hello HTTP/1.0\r\n\r\n")
    assert status_of(read_until_close(sock)) == 200
    sock.close()


def test_unknown_method_gets_501_and_connection_survives(server):
    raw = raw_exchange(server, b"BREW /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(raw) == 501
    get_ok(server)


@pytest.mark.parametrize("path, allow", [("/hello", "GET, HEAD, OPTIONS"),
                                         ("/hello/echo", "POST, OPTIONS"),
                                         ("/index.html", "GET, HEAD, OPTIONS")])
def test_wrong_method_gets_405_with_allow(server, path, allow):
    status, headers, _ = request(server, "DELETE", path)
    assert status == 405 and headers["allow"] == allow


def test_options(server):
    status, headers, body = request(server, "OPTIONS", "/hello/echo")
    assert (status, headers["allow"], body) == (204, "POST, OPTIONS", b"")
    raw = raw_exchange(server, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(raw) == 204 and b"Allow: GET, HEAD, POST" in raw
    assert request(server, "OPTIONS", "/no/such/thing")[0] == 404


def test_404_is_text_for_clients_and_html_for_browsers(server):
    status, headers, body = request(server, "GET", "/missing")
    assert (status, body) == (404, b"not found\n")
    status, headers, body = request(server, "GET", "/missing", headers={"Accept": "text/html"})
    assert status == 404 and b"<title>Not found" in body
    status, headers, body = request(server, "GET", "/missing",
                                    headers={"Accept": "application/json"})
    assert status == 404 and headers["content-type"] == "application/json"


def test_absolute_form_target_uses_its_path(server):
    raw = raw_exchange(server, b"GET http://example.com/hello/abs HTTP/1.1\r\nHost: x\r\n"
                               b"Connection: close\r\n\r\n")
    assert status_of(raw) == 200 and raw.endswith(b'"hello, abs"}')


def test_leading_empty_lines_are_ignored(server):
    raw = raw_exchange(server, b"\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(raw) == 200


def test_percent_decoding_and_slash_collapse(server):
    assert request(server, "GET", "/hello/J%C3%BCrgen")[2] == '{"greeting":"hello, Jürgen"}'.encode()
    assert request(server, "GET", "//hello")[0] == 200


@pytest.mark.parametrize("path", ["/hello/../hello", "/%2e%2e/etc/passwd", "/./hello",
                                  "/hello/%2E", "/a%00b", "/%ff"])
def test_dot_segments_nul_and_bad_utf8_are_refused(server, path):
    raw = raw_exchange(server, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                       % path.encode())
    assert status_of(raw) == 400
    get_ok(server)


# --- malformed input: a 4xx/5xx or a clean close, never a hang ------------------------------

MALFORMED = [
    (b"GET /hello\r\nHost: x\r\n\r\n", 400),                         # no version
    (b"GET  /hello HTTP/1.1\r\nHost: x\r\n\r\n", 400),               # double space
    (b"GET /hello HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /hello HTTP/1.1\r\n\r\n", 400),                           # no Host
    (b"GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),     # two Hosts
    (b"GET /hello HTTP/1.1\r\nHost: a b\r\n\r\n", 400),              # invalid Host
    (b"GET /hello HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nHost : x\r\n\r\n", 400),               # space before colon
    (b"GET /hello HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n", 400),  # obs-fold
    (b"GET /hello HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400),          # bare LF
    (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
     400),
    (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabcd", 400),
    (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST /hello/echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Type: application/json\r\n\r\nzz\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nHost: x\r\nExpect: tea\r\n\r\n", 417),
    (b"GET hello HTTP/1.1\r\nHost: x\r\n\r\n", 400),                 # not origin-form
    (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400),                     # * is for OPTIONS
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),  # TLS ClientHello
    (b"\x00\x01\x02garbage\r\n\r\n", 400),
    (b"HELLO THERE\r\n\r\n", 400),
    # only SP and HTAB are whitespace (RFC 9110 section 5.6.3): NBSP and NEL are not
    (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\xa0\r\n\r\n{}", 400),
    (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nContent-Length: \x852\r\n\r\n{}", 400),
    (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\xa0\r\n\r\n"
     b"0\r\n\r\n", 400),
    (b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x85chunked\r\n\r\n"
     b"0\r\n\r\n", 400),
    # absolute-form with a bracketed host that is not an address: urlsplit raises
    (b"GET http://[zz]/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    # a static GET whose unread chunked body is malformed: judged before the answer goes out
    (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabcX\r\n0\r\n\r\n", 400),
]


@pytest.mark.parametrize("data", [
    b"GET /hello HTTP/1.1\nHost: x\n\n",                 # bare LF throughout
    b"GET /hello HTTP/1.1\r\nHost: x\n\n",              # bare LF after the request line
    b"GET /hello HTTP/1.1\r\nHost: x\r\nX: y\n",       # ...in a head still unfinished
])
def test_bare_lf_heads_are_refused_at_once(start_server, data):
    server = start_server(config={"header_timeout_s": 10})
    started = time.monotonic()
    raw = raw_exchange(server, data, timeout=5)
    assert status_of(raw) == 400 and b"line ends must be CRLF" in raw
    assert time.monotonic() - started < 2   # not the 10 s head deadline
    get_ok(server)


def test_nel_and_nbsp_are_not_whitespace_in_connection(server):
    # "close\x85" is not the token "close": the connection stays open for the next request
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\x85\r\n\r\n"
                 b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = read_until_close(sock)
    sock.close()
    assert raw.count(b"HTTP/1.1 200 OK") == 2


@pytest.mark.parametrize("data", [
    b"GET http://[zz]/ HTTP/1.1\r\nHost: x\r\n\r\n",   # refused by a worker's parser
    b"HELLO THERE\r\n\r\n",                              # refused by the reactor at once
])
def test_parse_errors_count_as_strikes_and_log_no_traceback(start_server, data):
    server = start_server(config={"limits.ban_after_rejections": 3, "limits.ban_window_s": 60})
    for _ in range(4):
        assert status_of(raw_exchange(server, data, source="127.0.0.3")) == 400
    status = status_of(raw_exchange(server, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n",
                                    source="127.0.0.3"))
    assert status == 403 or status is None   # banned (403, or closed at accept)
    assert "banned 127.0.0.3" in server.error_text()
    assert "Traceback" not in server.error_text()
    assert "guard=400:bad_request+ban" in server.access_text()
    get_ok(server)                           # 127.0.0.1 is someone else
    assert server.store.get("guard/bans/127.0.0.3")["offences"] == 1   # persisted by a worker


def test_every_response_says_nosniff(server):
    for method, path in (("GET", "/hello"), ("GET", "/hello/x"), ("GET", "/nope"),
                         ("DELETE", "/hello"), ("GET", "/")):
        assert request(server, method, path)[1]["x-content-type-options"] == "nosniff", path
    raw = raw_exchange(server, b"HELLO THERE\r\n\r\n")      # an early reject, too
    assert b"X-Content-Type-Options: nosniff\r\n" in raw


def test_allowed_hosts_answers_other_hosts_421(start_server):
    server = start_server(config={"allowed_hosts": "example.org .example.net [::1] 127.0.0.1"})
    for host in ("example.org", "EXAMPLE.ORG:8000", "example.net", "a.b.example.net:1",
                 "127.0.0.1:80", "[::1]:8000"):
        assert request(server, "GET", "/hello", headers={"Host": host})[0] == 200, host
    for host in ("evil.example", "example.org.evil", "xexample.net", "10.0.0.1"):
        status, _, body = request(server, "GET", "/hello", headers={"Host": host})
        assert (status, body) == (421, b"this server does not serve that host\n"), host
    raw = raw_exchange(server, b"GET http://evil.example/hello HTTP/1.1\r\nHost: example.org"
                               b"\r\n\r\n")
    assert status_of(raw) == 421   # absolute-form: its authority is the host (RFC 9112 3.2.2)
    assert "any Host allowed" not in server.error_text()


def test_listening_beyond_loopback_without_allowed_hosts_warns(start_server):
    server = start_server(host="0.0.0.0")
    assert "with any Host allowed: set allowed_hosts" in server.error_text()
    quiet = start_server()
    assert "allowed_hosts" not in quiet.error_text()


@pytest.mark.parametrize("value", ["http://example.org", "example.org:80", "exa mple/x", "a..b"])
def test_allowed_hosts_refuses_what_is_not_a_host_name(value):
    with pytest.raises(onebox.ConfigError, match="allowed_hosts"):
        onebox.load_config(None, {"allowed_hosts": value})


@pytest.mark.parametrize("data, expected", MALFORMED)
def test_malformed_requests_get_an_error_and_a_close(server, data, expected):
    started = time.monotonic()
    raw = raw_exchange(server, data, timeout=5)
    assert status_of(raw) == expected, raw
    assert time.monotonic() - started < 2, "the server must answer at once, not at a timeout"
    get_ok(server)


def test_errors_never_echo_the_request(server):
    # Connection: close, so that the server ends the exchange instead of the 5 s read timeout
    raw = raw_exchange(server, b"GET /<script>alert(1)</script> HTTP/1.1\r\nHost: x\r\n"
                               b"Connection: close\r\n\r\n")
    assert status_of(raw) == 404 and b"script" not in raw


def test_oversized_request_line_gets_414(start_server):
    server = start_server(config={"max_request_line_bytes": 100})
    ok_path = b"/hello/" + b"a" * (100 - len(b"GET /hello/ HTTP/1.1"))
    raw = raw_exchange(server, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % ok_path)
    assert status_of(raw) == 200  # exactly at the limit
    raw = raw_exchange(server, b"GET %sa HTTP/1.1\r\nHost: x\r\n\r\n" % ok_path)
    assert status_of(raw) == 414
    raw = raw_exchange(server, b"GET /" + b"a" * 5000)  # no line end at all
    assert status_of(raw) == 414
    get_ok(server)


def test_oversized_head_gets_431(start_server):
    server = start_server(config={"max_head_bytes": 1024, "max_request_line_bytes": 512,
                                  "max_header_count": 5})
    raw = raw_exchange(server, b"GET /hello HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 2000 + b"\r\n\r\n")
    assert status_of(raw) == 431
    fields = b"".join(b"X-%d: y\r\n" % n for n in range(5))
    raw = raw_exchange(server, b"GET /hello HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert status_of(raw) == 431
    three = b"".join(b"X-%d: y\r\n" % n for n in range(3))
    raw = raw_exchange(server, b"GET /hello HTTP/1.1\r\nHost: x\r\n" + three
                       + b"Connection: close\r\n\r\n")  # 5 fields: at the limit
    assert status_of(raw) == 200
    get_ok(server)


def test_body_over_limit_gets_413_before_it_is_read(start_server):
    server = start_server(config={"max_body_bytes": 10})
    headers = {"Content-Type": "application/json"}
    assert request(server, "POST", "/hello/echo", b'"123456"', headers)[0] == 200  # 8 bytes
    assert request(server, "POST", "/hello/echo", b'"12345678"', headers)[0] == 200  # 10: limit
    # 11 bytes: refused at once; the client has sent only the head
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    raw = read_until_close(sock)
    sock.close()
    assert status_of(raw) == 413 and b"Connection: close" in raw
    get_ok(server)


def test_chunked_body_over_limit_gets_413(start_server):
    server = start_server(config={"max_body_bytes": 10})
    raw = raw_exchange(server, b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                               b"\r\nContent-Type: application/json\r\n\r\n6\r\n\"12345\r\n"
                               b"6\r\n67890\"\r\n0\r\n\r\n")
    assert status_of(raw) == 413
    get_ok(server)


def test_chunked_request_body_is_read(server):
    raw = raw_exchange(server, b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                               b"\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
                               b"4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nTrailer: x\r\n\r\n")
    assert status_of(raw) == 200 and raw.endswith(b'{"json":{"a":1}}')


def test_expect_100_continue(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 7\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
    assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.sendall(b'{"a":2}')
    raw = read_until_close(sock)
    sock.close()
    assert status_of(raw) == 200 and raw.endswith(b'{"json":{"a":2}}')


def test_body_sent_too_slowly_gets_408(start_server):
    server = start_server(config={"body_timeout_s": 0.3})
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"POST /hello/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 10\r\n\r\n{")
    raw = read_until_close(sock)
    sock.close()
    assert status_of(raw) == 408
    get_ok(server)


def test_bad_json_gets_400(server):
    status, _, body = request(server, "POST", "/hello/echo", b"{nope",
                              {"Content-Type": "application/json"})
    assert (status, body) == (400, b"request body is not valid JSON\n")


def test_the_access_line_says_how_many_body_bytes_came(start_server):
    server = start_server()
    body = b'{"text": "eleven ch"}'
    status, _, _ = request(server, "POST", "/api/notes", body=body,
                           headers={"Content-Type": "application/json"})
    assert status == 201
    request(server, "GET", "/hello")
    lines = server.access_text().splitlines()
    posted = [line for line in lines if '"POST /api/notes HTTP/1.1" 201' in line]
    assert len(posted) == 1 and posted[0].endswith("ms in=%d" % len(body)), lines
    assert [line for line in lines if "/hello" in line][0].endswith("ms")   # no body: no field
