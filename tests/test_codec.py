"""The HTTP/1.1 codec's pure parts, table-driven and without a server: request heads
(parse_head), request targets (split_target), paths (decode_path), body framing (LengthBody,
ChunkedBody over a real socketpair) and response heads (check_response, render_head, http_date,
error_response). Only the public functions are used, so the codec's internals may change
freely; the over-the-wire behaviour is tested in test_http.py and test_request.py."""
import collections
import email.utils
import http
import json
import socket
import types

import pytest

from handlers._core import Headers, HTTPError, Response
from onebox.codec import (check_response, chunk_size, decode_path, error_response, http_date,
                          parse_head, render_head, split_target)
from onebox.transfer import ChunkedBody, ChunkedScan, LengthBody
from onebox.settings import load_config

SETTINGS = load_config(None).server   # the shipped defaults: 8192-byte line, 100 fields
SMALL = types.SimpleNamespace(max_request_line_bytes=32, max_header_count=3)


def short_id(value):
    """A test id: the row's value, shortened when long."""
    if isinstance(value, type):
        return value.__name__
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + "...(%d chars)" % len(text)


def head_of(text):
    """A head as the reactor hands it over: latin-1 bytes without the final CRLFCRLF."""
    return text.encode("latin-1")


def parsed(text, settings=SETTINGS):
    """The observable result of parse_head: a tuple of its framing, or the error status. The
    head is parsed three times, and must come out the same each time: parse_head remembers a
    valid field block the second time it sees it, and answers from memory the third."""
    results = [_parsed_once(text, settings) for _ in range(3)]
    assert results[0] == results[1] == results[2]
    result = results[0]
    return result if isinstance(result, int) else result[:-1]


def _parsed_once(text, settings):
    try:
        head = parse_head(head_of(text), settings)
    except HTTPError as error:
        return error.status
    return (head.method, head.target, head.version, head.keep_alive, head.content_length,
            head.chunked, head.expect_continue, (head.request_line, head.fields))


def framing(text):
    """(keep_alive, content_length, chunked, expect_continue), or the error status."""
    result = parsed(text)
    return result if isinstance(result, int) else result[3:]


# --- the request line ---------------------------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ("GET / HTTP/1.1", ("GET", "/", "HTTP/1.1")),
    ("POST /api/notes?x=1&y=%20 HTTP/1.1", ("POST", "/api/notes?x=1&y=%20", "HTTP/1.1")),
    ("OPTIONS * HTTP/1.1", ("OPTIONS", "*", "HTTP/1.1")),
    ("GET http://example.org/a HTTP/1.1", ("GET", "http://example.org/a", "HTTP/1.1")),
    ("M-SEARCH / HTTP/1.1", ("M-SEARCH", "/", "HTTP/1.1")),          # any token is a method
    ("get / HTTP/1.1", ("get", "/", "HTTP/1.1")),                    # methods are case-sensitive
    ("GET /caf\xc3\xa9 HTTP/1.1", ("GET", "/caf\xc3\xa9", "HTTP/1.1")),  # raw UTF-8 bytes
    ("GET / HTTP/1.0", ("GET", "/", "HTTP/1.0")),
    ("GET / HTTP/1.2", ("GET", "/", "HTTP/1.1")),    # a later 1.x is answered as 1.1
    ("GET / HTTP/1.9", ("GET", "/", "HTTP/1.1")),
    ("GET / HTTP/2.0", 505),
    ("GET / HTTP/0.9", 505),
    ("GET / HTTP/3.0", 505),
    ("GET / HTTP/1.10", 400),
    ("GET / HTTP/1", 400),
    ("GET / http/1.1", 400),                         # the protocol name is case-sensitive
    ("GET / HTTPS/1.1", 400),
    ("GET /", 400),                                  # HTTP/0.9 simple request
    ("GET  / HTTP/1.1", 400),                        # two spaces
    ("GET / HTTP/1.1 ", 400),                        # trailing space
    (" GET / HTTP/1.1", 400),
    ("GET\t/\tHTTP/1.1", 400),                       # HTAB is not a separator here
    ("GET /a b HTTP/1.1", 400),                      # a space in the target
    ("GET /a\x7fb HTTP/1.1", 400),                   # DEL in the target
    ("GET /a\x00 HTTP/1.1", 400),                    # NUL in the target
    ("GET /a\rb HTTP/1.1", 400),                     # bare CR in the target
    ("GE(T / HTTP/1.1", 400),                        # "(" is not a token character
    ("GET/ HTTP/1.1", 400),
    ("", 400),
    ("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),   # a TLS hello
    # past the common case (a known method, a printable target, HTTP/1.1 or 1.0), the regex
    ("PROPFIND /a HTTP/1.1", ("PROPFIND", "/a", "HTTP/1.1")),
    ("GET /a\xa0b HTTP/1.1", ("GET", "/a\xa0b", "HTTP/1.1")),     # NBSP: a byte like any
    ("GET /a\xadb HTTP/1.1", ("GET", "/a\xadb", "HTTP/1.1")),     # soft hyphen: not printable
    ("GET /a\x85b HTTP/1.1", ("GET", "/a\x85b", "HTTP/1.1")),     # NEL: a byte like any
    ("GET  HTTP/1.1", 400),                                       # no target
    ("GET / HTTP/1.1 x", 400),
    ("GET /a\tb HTTP/1.1", 400),                                  # HTAB in the target
    ("GET /a\x1bb HTTP/1.1", 400),
    ("GET /a\nb HTTP/1.1", 400),                                  # bare LF in the target
], ids=short_id)
def test_request_line(line, expected):
    result = parsed(line + ("\r\nHost: x" if line and "HTTP/1.0" not in line else ""))
    assert (result if isinstance(result, int) else result[:3]) == expected


@pytest.mark.parametrize("target_bytes, expected", [
    (32 - len("GET  HTTP/1.1"), "GET"),               # exactly max_request_line_bytes
    (32 - len("GET  HTTP/1.1") + 1, 414),            # one byte more
    (4000, 414),
], ids=["at-limit", "limit+1", "far-over"])
def test_request_line_length_limit(target_bytes, expected):
    line = "GET /%s HTTP/1.1" % ("a" * (target_bytes - 1))
    result = parsed(line + "\r\nHost: x", SMALL)
    assert (result if isinstance(result, int) else result[0]) == expected


def test_request_line_length_counts_bytes_not_characters():
    # "\xc3\xa9" is one character to a UTF-8 reader but two bytes on the wire
    line = "GET /%s HTTP/1.1" % ("\xc3\xa9" * 10)   # 14 + 20 = 34 bytes
    assert parsed(line + "\r\nHost: x", SMALL) == 414


# --- header fields ------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, expected", [
    ("Host: x", ("GET", "/", "HTTP/1.1", True, 0, False, False)),
    ("Host: x\r\nX-Tab: a\tb", ("GET", "/", "HTTP/1.1", True, 0, False, False)),  # HTAB ok
    ("Host: x\r\nX-Obs: caf\xe9 \xff", ("GET", "/", "HTTP/1.1", True, 0, False, False)),
    ("Host: x\r\nX-Empty:", ("GET", "/", "HTTP/1.1", True, 0, False, False)),
    ("Host: x\r\nX-A: 1\r\nx-a: 2", ("GET", "/", "HTTP/1.1", True, 0, False, False)),
    ("Host: x\r\nX: a\r\n b", 400),                  # obs-fold (RFC 9112 section 5.2)
    ("Host: x\r\nX: a\r\n\tb", 400),                 # obs-fold with HTAB
    ("Host: x\r\nX : a", 400),                       # whitespace before the colon (5.1)
    ("Host: x\r\nX\t: a", 400),
    ("Host : x", 400),
    ("Host: x\r\n: a", 400),                         # no field name
    ("Host: x\r\nX a", 400),                         # no colon
    ("Host: x\r\nX(: a", 400),                       # "(" in a field name
    ("Host: x\r\nX: a\x00b", 400),                   # NUL in a value
    ("Host: x\r\nX: a\rb", 400),                     # bare CR in a value
    ("Host: x\r\nX: a\nb", 400),                     # bare LF in a value
    ("Host: x\r\nX: a\x1bb", 400),                   # ESC in a value
    ("Host: x\r\nX: a\x7fb", 400),                   # DEL in a value
    ("Host: x\r\n", 400),                            # an empty field line
    # common names (checked without a regex) and the rest (checked by it) alike
    ("HOST: x\r\nACCEPT: */*", ("GET", "/", "HTTP/1.1", True, 0, False, False)),
    ("Host: x\r\nCookie: a=\xa0\xad\xff", ("GET", "/", "HTTP/1.1", True, 0, False, False)),
    ("Host: x\r\nAccept: a\tb", ("GET", "/", "HTTP/1.1", True, 0, False, False)),
    ("Host: x\r\nAccept: a\x00b", 400),
    ("Host: x\r\nAccept: a\x7fb", 400),
    ("Host: x\r\nAccept: a\rb", 400),
    ("Host: x\r\nCookie: a\nb", 400),
    ("Host: x\r\nAccept : a", 400),
    ("Host: x\r\n Accept: a", 400),
    ("Host: x\r\nAccept", 400),
    ("Host: x\r\nX-\xc0ccept: a", 400),             # a latin-1 letter is not a token character
], ids=short_id)
def test_field_lines(fields, expected):
    assert parsed("GET / HTTP/1.1\r\n" + fields) == expected


def test_a_remembered_block_is_counted_against_the_settings_of_now():
    text = "GET / HTTP/1.1\r\nHost: x\r\nX-1: a\r\nX-2: b\r\nX-3: c"   # four fields
    assert parsed(text)[0] == "GET"                  # remembered under the shipped settings
    assert parsed(text, SMALL) == 431                # at most three here


def test_a_remembered_block_is_framed_for_each_version_on_its_own():
    chunked = "Transfer-Encoding: chunked"
    assert framing("POST / HTTP/1.1\r\n" + chunked) == 400      # no Host: refused, not kept
    assert framing("POST / HTTP/1.1\r\nHost: x\r\n" + chunked) == (True, 0, True, False)
    assert framing("POST / HTTP/1.0\r\nHost: x\r\n" + chunked) == 400
    expect = "Host: x\r\nExpect: 100-continue\r\nContent-Length: 5"
    assert framing("POST / HTTP/1.1\r\n" + expect) == (True, 5, False, True)
    assert framing("POST / HTTP/1.0\r\n" + expect) == (False, 5, False, False)


def test_each_head_has_its_own_fields():
    text = "GET http://example.org/a HTTP/1.1\r\nHost: fallback\r\nAccept: */*"
    for _ in range(3):
        head = parse_head(head_of(text), SETTINGS)
        assert head.fields == {"host": ["fallback"], "accept": ["*/*"]}
        assert split_target(head) == ("/a", "")      # absolute-form: its authority is the Host
        assert head.fields["host"] == ["example.org"]
        head.fields["x-added"] = ["by a caller"]
    other = parse_head(head_of(text.replace("http://example.org/a", "/b")), SETTINGS)
    assert other.fields == {"host": ["fallback"], "accept": ["*/*"]}


def test_field_values_keep_their_inner_whitespace_and_lose_ows():
    head = parse_head(head_of("GET / HTTP/1.1\r\nHost: x\r\nX-A:  a \t b\t \r\nX-A: c"),
                      SETTINGS)
    assert head.fields["x-a"] == ["a \t b", "c"]
    assert head.fields["host"] == ["x"]


@pytest.mark.parametrize("count, expected", [(3, "GET"), (4, 431), (50, 431)],
                         ids=["at-limit", "limit+1", "far-over"])
def test_header_count_limit(count, expected):
    fields = "".join("\r\nX-%d: y" % n for n in range(count - 1))
    result = parsed("GET / HTTP/1.1\r\nHost: x" + fields, SMALL)
    assert (result if isinstance(result, int) else result[0]) == expected


@pytest.mark.parametrize("text, expected", [
    ("GET / HTTP/1.1", 400),                                   # HTTP/1.1 requires Host
    ("GET / HTTP/1.0", "GET"),                                 # HTTP/1.0 does not
    ("GET / HTTP/1.1\r\nHost: x\r\nHost: x", 400),             # two Host lines
    ("GET / HTTP/1.0\r\nHost: x\r\nHost: y", 400),
    ("GET / HTTP/1.1\r\nHost: x, y", 400),                     # a list is not a host
    ("GET / HTTP/1.1\r\nHost: ", "GET"),                       # empty: allowed (RFC 9112 3.2)
    ("GET / HTTP/1.1\r\nHost: example.org", "GET"),
    ("GET / HTTP/1.1\r\nHost: Example.ORG:8080", "GET"),
    ("GET / HTTP/1.1\r\nHost: 192.0.2.7:80", "GET"),
    ("GET / HTTP/1.1\r\nHost: [::1]", "GET"),
    ("GET / HTTP/1.1\r\nHost: [2001:db8::1]:8000", "GET"),
    ("GET / HTTP/1.1\r\nHost: a b", 400),
    ("GET / HTTP/1.1\r\nHost: user@example.org", 400),
    ("GET / HTTP/1.1\r\nHost: example.org/path", 400),
    ("GET / HTTP/1.1\r\nHost: example.org:http", 400),         # a port is digits
    ("GET / HTTP/1.1\r\nHost: [zz]", 400),
    ("GET / HTTP/1.1\r\nHost: [::1", 400),
    ("GET / HTTP/1.1\r\nHost: caf\xe9.org", 400),              # raw non-ASCII
], ids=short_id)
def test_host(text, expected):
    result = parsed(text)
    assert (result if isinstance(result, int) else result[0]) == expected


# --- keep-alive (RFC 9112 section 9.3) -----------------------------------------------------------

@pytest.mark.parametrize("version, connection, keep_alive", [
    ("1.1", None, True),
    ("1.1", "close", False),
    ("1.1", "Close", False),
    ("1.1", "CLOSE", False),
    ("1.1", "keep-alive", True),
    ("1.1", "keep-alive, close", False),
    ("1.1", "Upgrade,close", False),
    ("1.1", " upgrade ,\tclose\t", False),
    ("1.1", "closed", True),                      # a token, not a substring
    ("1.1", "x-close", True),
    ("1.0", None, False),
    ("1.0", "keep-alive", True),
    ("1.0", "Keep-Alive", True),
    ("1.0", "upgrade, keep-alive", True),
    ("1.0", "close", False),
    ("1.0", "keep-alives", False),
    ("1.0", "keep-alive, close", False),          # RFC 9112 9.3: close wins
], ids=short_id)
def test_keep_alive(version, connection, keep_alive):
    text = "GET / HTTP/%s\r\nHost: x" % version
    if connection is not None:
        text += "\r\nConnection: " + connection
    assert framing(text)[0] is keep_alive


def test_connection_tokens_from_several_lines_all_count():
    assert framing("GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nConnection: close")[0] \
        is False
    assert framing("GET / HTTP/1.0\r\nConnection: upgrade\r\nConnection: keep-alive")[0] is True


# --- body framing: Content-Length, Transfer-Encoding, Expect ------------------------------------

@pytest.mark.parametrize("fields, expected", [
    ("", (True, 0, False, False)),
    ("Content-Length: 0", (True, 0, False, False)),
    ("Content-Length: 5", (True, 5, False, False)),
    ("Content-Length:5", (True, 5, False, False)),
    ("Content-Length: \t5 \t", (True, 5, False, False)),        # OWS is SP and HTAB
    ("Content-Length: 007", (True, 7, False, False)),           # leading zeros are digits
    ("Content-Length: 3, 3", (True, 3, False, False)),          # a list of one value (9110 8.6)
    ("Content-Length: 3,3,3", (True, 3, False, False)),
    ("Content-Length: 3\r\nContent-Length: 3", (True, 3, False, False)),
    ("Content-Length: 999999999999999999", (True, 10 ** 18 - 1, False, False)),  # 18 digits
    ("Content-Length: 1000000000000000000", 400),                # 19 digits
    ("Content-Length: 3, 4", 400),
    ("Content-Length: 3\r\nContent-Length: 4", 400),
    ("Content-Length: 3,", 400),
    ("Content-Length: ", 400),
    ("Content-Length: -1", 400),
    ("Content-Length: +5", 400),
    ("Content-Length: 5.0", 400),
    ("Content-Length: 0x5", 400),
    ("Content-Length: 1e3", 400),
    ("Content-Length: 5 5", 400),
    ("Content-Length: \xb2", 400),                               # superscript two (latin-1)
    ("Content-Length: \xb9\xb3", 400),
    ("Content-Length: 5\xa0", 400),                              # NBSP is not OWS
    ("Content-Length: \xa05", 400),
    ("Content-Length: 5\x85", 400),                              # nor is NEL
    ("Content-Length: \x855", 400),
    ("Content-Length: 5\x0b", 400),                              # VT is a control
    ("Transfer-Encoding: chunked", (True, 0, True, False)),
    ("Transfer-Encoding: Chunked", (True, 0, True, False)),
    ("Transfer-Encoding: \tchunked ", (True, 0, True, False)),
    ("Transfer-Encoding: gzip", 400),                           # not chunked last (9112 6.3)
    ("Transfer-Encoding: chunked, gzip", 400),
    ("Transfer-Encoding: identity", 400),
    ("Transfer-Encoding: ", 400),
    ("Transfer-Encoding: gzip, chunked", 501),                  # unknown coding (9112 6.1)
    ("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked", 501),
    ("Transfer-Encoding: chunked\xa0", 400),                    # NBSP: another proxy's "chunked"?
    ("Transfer-Encoding: \xa0chunked", 400),
    ("Transfer-Encoding: chunked\x85", 400),
    ("Transfer-Encoding: \x85chunked", 400),
    ("Transfer-Encoding: chunked\r\nContent-Length: 5", 400),   # both: smuggling (9112 6.3)
    ("Content-Length: 5\r\nTransfer-Encoding: chunked", 400),
    ("Content-Length: 0\r\nTransfer-Encoding: chunked", 400),
    ("Expect: 100-continue", (True, 0, False, True)),
    ("Expect: 100-Continue", (True, 0, False, True)),
    ("Expect: 100-CONTINUE\r\nContent-Length: 5", (True, 5, False, True)),
    ("Expect: \t100-continue ", (True, 0, False, True)),
    ("Expect: 100-continue\r\nTransfer-Encoding: chunked", (True, 0, True, True)),
    ("Expect: 200-ok", 417),
    ("Expect: ", 417),
    ("Expect: 100-continue, x", 417),
    ("Expect: 100-continue\r\nExpect: 100-continue", 417),
    ("Expect: 100-continue\xa0", 417),
], ids=short_id)
def test_body_framing(fields, expected):
    assert framing("POST / HTTP/1.1\r\nHost: x" + ("\r\n" + fields if fields else "")) \
        == expected


@pytest.mark.parametrize("fields, expected", [
    ("Content-Length: 5", (False, 5, False, False)),
    ("Transfer-Encoding: chunked", 400),            # chunked is HTTP/1.1 (9112 6.1)
    ("Transfer-Encoding: chunked\r\nContent-Length: 5", 400),
    ("Expect: 100-continue\r\nContent-Length: 5", (False, 5, False, False)),  # 9110 10.1.1
    ("Expect: something", 417),
], ids=short_id)
def test_body_framing_in_http_1_0(fields, expected):
    assert framing("POST / HTTP/1.0\r\n" + fields) == expected


# --- the request target (RFC 9112 section 3.2) ----------------------------------------------------

def target_of(method, target, host="fallback"):
    head = parse_head(head_of("%s %s HTTP/1.1\r\nHost: %s" % (method, target, host)), SETTINGS)
    try:
        path, query = split_target(head)
    except HTTPError as error:
        return error.status
    return path, query, head.fields["host"][0]


@pytest.mark.parametrize("method, target, expected", [
    ("GET", "/", ("/", "", "fallback")),
    ("GET", "/a/b?x=1&y=2", ("/a/b", "x=1&y=2", "fallback")),
    ("GET", "/a?", ("/a", "", "fallback")),
    ("GET", "/a?b?c", ("/a", "b?c", "fallback")),
    ("GET", "/%3F?q", ("/%3F", "q", "fallback")),          # decoding is decode_path's job
    ("GET", "//a", ("//a", "", "fallback")),               # origin-form, not an authority
    ("OPTIONS", "*", ("*", "", "fallback")),
    ("GET", "*", 400),                                      # asterisk-form is for OPTIONS only
    ("POST", "*", 400),
    ("GET", "http://example.org/a?b=1", ("/a", "b=1", "example.org")),   # absolute-form
    ("GET", "http://example.org", ("/", "", "example.org")),
    ("GET", "http://example.org?q", ("/", "q", "example.org")),
    ("GET", "https://Example.org:8443/x", ("/x", "", "Example.org:8443")),
    ("GET", "HTTP://example.org/x", ("/x", "", "example.org")),            # scheme: any case
    ("GET", "http://[::1]:8080/x", ("/x", "", "[::1]:8080")),
    ("GET", "http://192.0.2.7/", ("/", "", "192.0.2.7")),
    ("GET", "http://user@example.org/", 400),                # userinfo is refused
    ("GET", "http://user:pw@example.org/", 400),
    ("GET", "http://[zz]/", 400),                            # not an exception
    ("GET", "http://[::1/", 400),
    ("GET", "http://example.org:port/", 400),
    ("GET", "http://exa%mple.org/", ("/", "", "exa%mple.org")),   # %: a reg-name character
    ("GET", "ftp://example.org/", 400),
    ("GET", "example.org:443", 400),                          # authority-form (CONNECT only)
    ("CONNECT", "example.org:443", 400),
    ("GET", "a/b", 400),
    ("GET", "?q", 400),
    ("GET", "http:/x", 400),
    ("GET", "http:///x", 400),                    # empty host: RFC 9110 4.2.1
    ("GET", "http://:80/x", 400),
], ids=short_id)
def test_split_target(method, target, expected):
    assert target_of(method, target) == expected


# --- path decoding ------------------------------------------------------------------------------

def decoded(raw):
    try:
        return decode_path(raw)
    except HTTPError as error:
        return error.status


@pytest.mark.parametrize("raw, expected", [
    ("/", ("/", [""])),
    ("/a", ("/a", ["a"])),
    ("/a/b/", ("/a/b/", ["a", "b", ""])),                     # the trailing slash is kept
    ("//", ("/", [""])),
    ("//a///b", ("/a/b", ["a", "b"])),                        # empty segments collapse
    ("/a//", ("/a/", ["a", ""])),
    ("/a%20b", ("/a b", ["a b"])),
    ("/a+b", ("/a+b", ["a+b"])),                              # + is not a space in a path
    ("/caf%C3%A9", ("/caf\xe9", ["caf\xe9"])),                 # percent-decoded as UTF-8
    ("/caf%c3%a9", ("/caf\xe9", ["caf\xe9"])),
    ("/caf\xc3\xa9", ("/caf\xe9", ["caf\xe9"])),              # raw bytes (latin-1 str) as UTF-8
    ("/%E2%82%AC/\xe2\x82\xac", ("/\u20ac/\u20ac", ["\u20ac", "\u20ac"])),
    ("/a%2Fb/c", ("/a/b/c", ["a/b", "c"])),                   # %2F stays inside its segment
    ("/a%2fb", ("/a/b", ["a/b"])),
    ("/%25", ("/%", ["%"])),
    ("/100%", ("/100%", ["100%"])),                           # a stray % stays as it is
    ("/%zz", ("/%zz", ["%zz"])),
    ("/..a/a..", ("/..a/a..", ["..a", "a.."])),               # not dot-segments
    ("/.well-known/x", ("/.well-known/x", [".well-known", "x"])),
    ("/%FF", 400),                                            # not UTF-8
    ("/%C3", 400),                                            # truncated UTF-8
    ("/%C0%AF", 400),                                         # overlong "/"
    ("/%ED%A0%80", 400),                                      # a surrogate
    ("/\xff", 400),                                           # raw, not UTF-8
    ("/\xc3", 400),
    ("/..", 400),
    ("/.", 400),
    ("/a/../b", 400),
    ("/a/./b", 400),
    ("/a/..", 400),
    ("/a/../", 400),
    ("/%2E%2E/etc/passwd", 400),                              # encoded dot-segments
    ("/%2e%2E", 400),
    ("/a/%2e", 400),
    ("/.%2E/x", 400),
    ("/a%00b", 400),                                          # NUL
    ("/%00", 400),
    ("/a\x00", 400),
    ("*", ("*", [])),
    ("/a/.", 400),
    ("/a/.b/c.", ("/a/.b/c.", ["a", ".b", "c."])),
    ("/a./b", ("/a./b", ["a.", "b"])),
    ("/.", 400),
    ("/...", ("/...", ["..."])),                              # not a dot-segment either
    ("/caf\xc3\xa9%20x", ("/caf\xe9 x", ["caf\xe9 x"])),   # raw UTF-8 and an escape
], ids=short_id)
def test_decode_path(raw, expected):
    assert decoded(raw) == expected


# --- body readers, over a real socketpair ---------------------------------------------------------

BODY_SETTINGS = types.SimpleNamespace(max_body_bytes=64, body_timeout_s=0.05,
                                      max_head_bytes=256, min_body_rate_bytes_s=240.0,
                                      body_rate_grace_s=5.0)


class Conn:
    """What a body reader uses of a connection: its buffer and its socket."""

    def __init__(self, data, sock):
        self.buf = bytearray(data)
        self.sock = sock


@pytest.fixture
def pair():
    """(server end, client end) of a real socketpair; the client end may be closed by a test."""
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def body_head(length=0, chunked=False, expect_continue=False):
    return types.SimpleNamespace(content_length=length, chunked=chunked,
                                 expect_continue=expect_continue)


def read_body(reader_class, data, pair, length=0, size=-1, peer_open=False, settings=None):
    """Read the whole body (in ``size`` pieces); the bytes, or (status, reader.broken)."""
    ours, theirs = pair
    if not peer_open:
        theirs.close()
    reader = reader_class(Conn(data, ours), body_head(length, reader_class is ChunkedBody),
                          settings or BODY_SETTINGS)
    parts = []
    try:
        if size < 0:
            parts.append(reader.read())
        else:
            while not reader.done:
                parts.append(reader.read(size))
    except HTTPError as error:
        return error.status, reader.broken
    assert reader.read() == b""                                # and nothing after the end
    return b"".join(parts)


# A client that closes mid-body: 400 (incomplete) or 408 (gone) are both right; either way
# framing is lost and the connection must close (reader.broken).
GONE = "400 or 408, broken"


def outcome(result, expected):
    """``result``, or GONE when it is one of the outcomes GONE allows."""
    return GONE if expected is GONE and result in ((400, True), (408, True)) else result



@pytest.mark.parametrize("line, expected", [
    (b"5", 5), (b"a", 10), (b"A", 10), (b"0005", 5), (b"0000000000000005", 5),
    (b"ffffffffffffffff", 2 ** 64 - 1), (b"5;name=value", 5), (b"5 ;ext", 5), (b"5\t;ext", 5),
    (b"", None), (b";ext", None), (b"zz", None), (b"0x5", None), (b"-5", None), (b"+5", None),
    (b"1 1", None), (b"5\xa0", None), (b"00000000000000005", None)], ids=short_id)
def test_chunk_size(line, expected):
    """One rule for a chunk's size line, read by the reactor's scan and the worker's reader."""
    assert chunk_size(line) == expected
    scan = ChunkedScan(limit=2 ** 65)
    assert scan.feed(bytearray(line + b"\r\n")) is (expected is None)   # malformed: done at once


@pytest.mark.parametrize("data, expected", [
    (b"0\r\n\r\n", b""),
    (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
    (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
    (b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),                 # hex, lower case
    (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),                 # and upper case
    (b"0005\r\nhello\r\n0\r\n\r\n", b"hello"),                        # leading zeros
    (b"0000000000000005\r\nhello\r\n0\r\n\r\n", b"hello"),            # 16 hex digits
    (b"5;name=value\r\nhello\r\n0\r\n\r\n", b"hello"),                 # a chunk extension
    (b"5;a;b=\"q;x\"\r\nhello\r\n0;last\r\n\r\n", b"hello"),
    (b"5 ;ext\r\nhello\r\n0\r\n\r\n", b"hello"),                       # BWS before ";"
    (b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n", b"hello"),   # trailers are dropped
    (b"5\r\nhe\r\nl\r\n0\r\n\r\n", b"he\r\nl"),                        # CRLF inside data
    (b"5\r\nhelloX\r\n0\r\n\r\n", (400, True)),                        # no CRLF after data
    (b"5\r\nhello0\r\n\r\n", (400, True)),
    (b"5\r\nhello\n0\r\n\r\n", (400, True)),                           # LF alone
    (b"3\r\nhello\r\n0\r\n\r\n", (400, True)),                         # data longer than size
    (b"zz\r\nhello\r\n0\r\n\r\n", (400, True)),                        # not hex
    (b"0x5\r\nhello\r\n0\r\n\r\n", (400, True)),
    (b"-5\r\nhello\r\n0\r\n\r\n", (400, True)),
    (b"+5\r\nhello\r\n0\r\n\r\n", (400, True)),
    (b"\r\nhello\r\n0\r\n\r\n", (400, True)),                          # no size
    (b";ext\r\nhello\r\n0\r\n\r\n", (400, True)),
    (b"00000000000000005\r\nhello\r\n0\r\n\r\n", (400, True)),         # 17 hex digits
    (b"5\xa0\r\nhello\r\n0\r\n\r\n", (400, True)),
    (b"40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n", b"x" * 64),             # max_body_bytes: passes
    (b"41\r\n" + b"x" * 65 + b"\r\n0\r\n\r\n", (413, True)),           # +1: refused at the size
    (b"20\r\n" + b"x" * 32 + b"\r\n21\r\n", (413, True)),             # in sum
    (b"ffffffffffffffff\r\n", (413, True)),
    (b"5\r\nhel", GONE),                                                  # the client went away
    (b"5\r\nhello\r\n", GONE),                                            # before the last chunk
    (b"5\r\nhello\r\n0\r\n", GONE),                                       # before the trailers end
    (b"5" * 5000, (400, True)),                                          # a size line without end
    (b"0\r\nX: " + b"y" * 300 + b"\r\n\r\n", (431, True)),             # trailers > max_head_bytes
], ids=short_id)
def test_chunked_body(data, expected, pair):
    assert outcome(read_body(ChunkedBody, data, pair), expected) == expected


@pytest.mark.parametrize("size", [1, 2, 3, 64], ids=lambda size: "read(%d)" % size)
def test_chunked_body_in_small_reads(size, pair):
    data = b"5\r\nhello\r\n1;x\r\n \r\n5\r\nworld\r\n0\r\nT: 1\r\n\r\nNEXT"
    ours, theirs = pair
    conn = Conn(data, ours)
    reader = ChunkedBody(conn, body_head(chunked=True), BODY_SETTINGS)
    parts = []
    while not reader.done:
        piece = reader.read(size)
        assert len(piece) <= size
        parts.append(piece)
    assert b"".join(parts) == b"hello world"
    assert bytes(conn.buf) == b"NEXT"                 # the next request is left in the buffer
    assert not reader.broken and reader.received == 11


@pytest.mark.parametrize("length, data, size, expected", [
    (0, b"", -1, b""),
    (0, b"NEXT", -1, b""),
    (5, b"hello", -1, b"hello"),
    (5, b"hello", 2, b"hello"),
    (5, b"hello", 1, b"hello"),
    (64, b"x" * 64, -1, b"x" * 64),                       # max_body_bytes: passes
    (65, b"x" * 65, -1, (413, True)),                     # +1
    (5, b"hel", -1, GONE),                                # the client went away
], ids=short_id)
def test_length_body(length, data, size, expected, pair):
    assert outcome(read_body(LengthBody, data, pair, length, size), expected) == expected


def test_length_body_leaves_the_next_request_in_the_buffer(pair):
    conn = Conn(b"helloGET / HTTP/1.1\r\n", pair[0])
    reader = LengthBody(conn, body_head(5), BODY_SETTINGS)
    assert reader.read() == b"hello" and reader.done
    assert bytes(conn.buf) == b"GET / HTTP/1.1\r\n"


def test_body_bytes_arrive_from_the_socket_after_the_buffer(pair):
    ours, theirs = pair
    theirs.sendall(b"lo\r\n0\r\n\r\n")
    reader = ChunkedBody(Conn(b"5\r\nhel", ours), body_head(chunked=True), BODY_SETTINGS)
    assert reader.read() == b"hello"


def test_a_silent_client_gets_408_at_body_timeout(pair):
    result = read_body(LengthBody, b"he", pair, length=5, peer_open=True)
    assert result == (408, True)


def test_expect_100_continue_is_sent_once_at_the_first_read(pair):
    ours, theirs = pair
    reader = LengthBody(Conn(b"hello", ours), body_head(5, expect_continue=True), BODY_SETTINGS)
    assert reader.read(2) == b"he"
    assert reader.read() == b"llo"
    theirs.settimeout(1)
    assert theirs.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(100)                                    # only once


@pytest.mark.parametrize("reader_class, length, data, limit, expected", [
    (LengthBody, 5, b"hello", 5, (True, None)),               # the rest fits the drain limit
    (LengthBody, 5, b"hello", 4, (False, None)),              # it does not: close instead
    (LengthBody, 0, b"", 0, (True, None)),
    (ChunkedBody, 0, b"5\r\nhello\r\n0\r\n\r\n", 5, (True, None)),
    (ChunkedBody, 0, b"5\r\nhello\r\n0\r\n\r\n", 4, (False, None)),
    (ChunkedBody, 0, b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n", 5, (False, None)),   # in sum
    (ChunkedBody, 0, b"zz\r\n", 100, (False, 400)),          # malformed: the error is kept
    (ChunkedBody, 0, b"41\r\n" + b"x" * 65, 1000, (False, 413)),
], ids=short_id)
def test_drain(reader_class, length, data, limit, expected, pair):
    ours, theirs = pair
    theirs.close()
    reader = reader_class(Conn(data, ours), body_head(length, reader_class is ChunkedBody),
                          BODY_SETTINGS)
    drained = reader.drain(limit)
    assert (drained, reader.failure and reader.failure.status) == expected
    assert reader.done is drained


# --- response heads -------------------------------------------------------------------------------

def rendered(status, headers=(), length=0, keep_alive=True, version="HTTP/1.1"):
    """The head's status line and its fields other than Date (checked on its own). Rendered
    twice, the same each time: the second may be the head render_head remembers."""
    results = [_rendered_once(status, headers, length, keep_alive, version) for _ in range(2)]
    assert results[0] == results[1]
    return results[0]


def _rendered_once(status, headers, length, keep_alive, version):
    text = render_head(status, list(headers), length, keep_alive, version).decode("latin-1")
    assert text.endswith("\r\n\r\n")
    lines = text[:-4].split("\r\n")
    assert sum(line.startswith("Date: ") for line in lines) == 1
    return [line for line in lines if not line.startswith("Date: ")]


FIXED = ["Server: onebox", "X-Content-Type-Options: nosniff"]


@pytest.mark.parametrize("args, expected", [
    ((200, [], 5), ["HTTP/1.1 200 OK"] + FIXED + ["Content-Length: 5"]),
    ((200, [], 0), ["HTTP/1.1 200 OK"] + FIXED + ["Content-Length: 0"]),
    ((404, [("Content-Type", "text/plain")], 3),
     ["HTTP/1.1 404 Not Found"] + FIXED + ["Content-Type: text/plain", "Content-Length: 3"]),
    ((200, [], None), ["HTTP/1.1 200 OK"] + FIXED + ["Transfer-Encoding: chunked"]),
    ((200, [], None, False, "HTTP/1.0"),                    # close-delimited
     ["HTTP/1.1 200 OK"] + FIXED + ["Connection: close"]),
    ((200, [], 5, True, "HTTP/1.0"),
     ["HTTP/1.1 200 OK"] + FIXED + ["Content-Length: 5", "Connection: keep-alive"]),
    ((200, [], 5, False, "HTTP/1.0"),
     ["HTTP/1.1 200 OK"] + FIXED + ["Content-Length: 5", "Connection: close"]),
    ((200, [], 5, False), ["HTTP/1.1 200 OK"] + FIXED + ["Content-Length: 5", "Connection: close"]),
    ((204, [], 0), ["HTTP/1.1 204 No Content"] + FIXED),   # no length (RFC 9110 8.6)
    ((204, [], None), ["HTTP/1.1 204 No Content"] + FIXED),
    ((304, [("ETag", '"x"')], 120), ["HTTP/1.1 304 Not Modified"] + FIXED + ['ETag: "x"']),
    ((100, [], None), ["HTTP/1.1 100 Continue"] + FIXED),
    ((599, [], 0), ["HTTP/1.1 599 Unknown"] + FIXED + ["Content-Length: 0"]),
    ((200, [("X-Tab", "a\tb"), ("X-Num", 7), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], 0),
     ["HTTP/1.1 200 OK"] + FIXED + ["X-Tab: a\tb", "X-Num: 7", "Set-Cookie: a=1",
                                   "Set-Cookie: b=2", "Content-Length: 0"]),
], ids=short_id)
def test_render_head(args, expected):
    assert rendered(*args) == expected


@pytest.mark.parametrize("field", [
    ("X-Bad", "a\r\nSet-Cookie: evil=1"),
    ("X-Bad", "a\nb"),
    ("X-Bad", "a\rb"),
    ("X-Bad", "a\x00b"),
    ("X-Bad", "a\x7fb"),
    ("Bad Name", "x"),
    ("Bad:Name", "x"),
    ("", "x"),
    ("X-Bad\r\nEvil", "x"),
], ids=short_id)
def test_render_head_refuses_a_bad_field(field):
    with pytest.raises(ValueError):
        render_head(200, [field], 0, True, "HTTP/1.1")
    with pytest.raises(ValueError):          # and again: a bad field is never remembered as good
        render_head(200, [field], 0, True, "HTTP/1.1")


def test_values_that_compare_equal_are_rendered_each_as_itself():
    """1 == True == 1.0, so a checked line remembered by (name, value) must not be one of
    theirs: "X-N: True" is not what ("X-N", 1) says."""
    for value, text in [(True, "True"), (1, "1"), (1.0, "1.0"), (True, "True")]:
        head = render_head(200, [("X-N", value)], 0, True, "HTTP/1.1").decode("latin-1")
        assert "\r\nX-N: %s\r\n" % text in head


def test_an_unhashable_value_is_rendered_not_a_crash_at_the_write():
    head = render_head(200, [("X-A", "1"), ("X-L", ["a"])], 0, True, "HTTP/1.1")
    assert b"\r\nX-A: 1\r\nX-L: ['a']\r\n" in head


def date_of(head):
    return next(line[6:] for line in head.decode("latin-1").split("\r\n")
                if line.startswith("Date: "))


def test_a_remembered_head_takes_the_date_of_its_second():
    import time
    headers = [("Content-Type", "text/plain"), ("ETag", '"dated"')]
    first = render_head(200, list(headers), 5, True, "HTTP/1.1")
    assert render_head(200, list(headers), 5, True, "HTTP/1.1").replace(
        date_of(first).encode(), b"") == first.replace(date_of(first).encode(), b"")
    time.sleep(1.05 - time.time() % 1)                       # into the next second
    before = int(time.time())
    later = render_head(200, list(headers), 5, True, "HTTP/1.1")
    assert date_of(later) in (http_date(before), http_date(int(time.time())))
    assert date_of(later) != date_of(first)


def test_date_header_is_an_rfc_9110_date_of_now():
    import time
    text = render_head(200, [], 0, True, "HTTP/1.1").decode("latin-1")
    date = next(line[6:] for line in text.split("\r\n") if line.startswith("Date: "))
    assert date.endswith(" GMT")
    assert abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()) < 5


@pytest.mark.parametrize("now, expected", [
    (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
    (784111777, "Sun, 06 Nov 1994 08:49:37 GMT"),           # RFC 9110's own example
    (784111777.9, "Sun, 06 Nov 1994 08:49:37 GMT"),
    (1700000000, "Tue, 14 Nov 2023 22:13:20 GMT"),
])
def test_http_date(now, expected):
    assert http_date(now) == expected


Pair = collections.namedtuple("Pair", "name value")


@pytest.mark.parametrize("status, headers, body, expected", [
    (200, [("Content-Type", "text/plain")], b"x", None),
    (100, [], b"", None),
    (599, [], b"", None),
    (99, [], b"", ValueError),
    (600, [], b"", ValueError),
    (200.0, [], b"", ValueError),                   # a whole number, and an int
    (True, [], b"", ValueError),
    (http.HTTPStatus.OK, [], b"", ValueError),
    ("200", [], b"", ValueError),
    (200, [["X-A", "1"]], b"", ValueError),         # a pair is a tuple
    (200, [("X-A", "1", "2")], b"", ValueError),
    (200, [Pair("X-A", "1")], b"", ValueError),     # not even a tuple's subclass
    (200, [("X-L", ["a"])], b"", None),             # unhashable, rendered as its str()
    (200, [("X-N", 7)], b"", None),
    (200, [("X A", "1")], b"", ValueError),
    (200, [("X-A", "1\r\nX-B: 2")], b"", ValueError),
    (200, [(7, "x")], b"", TypeError),
    (200, [], bytearray(b"x"), None),
    (200, [], memoryview(b"x"), None),
    (200, [], "x", TypeError),
    (200, [], None, TypeError),
], ids=short_id)
def test_check_response(status, headers, body, expected):
    for _ in range(2):       # the second time, its good fields are remembered
        try:
            check_response(Response(body, status, headers))
            result = None
        except (ValueError, TypeError) as error:
            result = type(error)
        assert result is expected


class _Request:
    def __init__(self, accept=None):
        self.headers = Headers({"accept": [accept]} if accept else {})


@pytest.mark.parametrize("request_, status, message, content_type, body", [
    (None, 404, "", "text/plain; charset=utf-8", b"not found\n"),
    (_Request(), 400, "malformed request line", "text/plain; charset=utf-8",
     b"malformed request line\n"),
    (_Request("text/html"), 503, "", "text/plain; charset=utf-8", b"service unavailable\n"),
    (_Request("application/json"), 413, "request body too large", "application/json",
     {"error": "request body too large", "status": 413}),
    (_Request("text/html, application/json;q=0.9"), 404, "", "application/json",
     {"error": "not found", "status": 404}),
], ids=["no-request", "text", "html-accept", "json", "json-in-a-list"])
def test_error_response(request_, status, message, content_type, body):
    response = error_response(request_, status, message, [("Allow", "GET")])
    assert response.status == status
    types_ = [value for name, value in response.headers if name.lower() == "content-type"]
    assert len(types_) == 1 and types_[0].startswith(content_type)
    assert ("Allow", "GET") in response.headers
    assert (json.loads(response.body) if isinstance(body, dict) else response.body) == body
