"""Static pages over real sockets: validators, ranges, compression, caching policy, directories,
containment. Each test builds its own small site in tmp_path."""
import email.utils
import gzip
import hashlib
import http.client
import os
import re
import socket
import time

import pytest

from conftest import onebox, raw_exchange, request, status_of

CSS = (b"body { color: #222; margin: 0 auto; max-width: 40rem; }\n" * 40)   # 2320 bytes
HTML = b"<!doctype html><title>home</title><p>" + b"hello " * 300 + b"</p>\n"
DIGITS = b"0123456789" * 10   # 100 bytes, easy to slice


def write(root, rel, data, mtime=None):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "pages"
    old = time.time() - 3600
    write(root, "index.html", HTML, old)
    write(root, "404.html", b"<!doctype html><title>lost</title><p>no such page</p>\n", old)
    write(root, "style.css", CSS, old)
    write(root, "digits.txt", DIGITS, old)
    write(root, "tiny.css", b"p{}\n", old)
    write(root, "logo.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 4000, old)
    write(root, "empty.txt", b"", old)
    write(root, "docs/index.html", b"<!doctype html><title>docs</title>\n", old)
    write(root, "about.html", b"<!doctype html><title>about</title>\n", old)
    write(root, "app.3f9a1c.js", b"console.log('fingerprinted');\n" * 60, old)
    write(root, "app.js", b"console.log('plain');\n" * 60, old)
    write(root, ".env", b"SECRET=1\n", old)
    write(root, ".well-known/acme-challenge/token123", b"token123.key\n", old)
    return root


def get(server, path, headers=None, method="GET"):
    return request(server, method, path, headers=headers)


def serve(start_server, site, **config):
    return start_server(pages_dir=site, config={"static." + k: v for k, v in config.items()})


# --- validators ---------------------------------------------------------------------------------

def test_200_carries_strong_etag_last_modified_and_policy_headers(start_server, site):
    server = serve(start_server, site)
    status, headers, body = get(server, "/style.css")
    assert status == 200 and body == CSS
    assert re.fullmatch(r'"[0-9a-f]{16}"', headers["etag"])
    mtime = int(os.stat(site / "style.css").st_mtime)
    assert email.utils.parsedate_to_datetime(headers["last-modified"]).timestamp() == mtime
    assert headers["accept-ranges"] == "bytes"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-type"] == "text/css; charset=utf-8"
    assert headers["content-length"] == str(len(CSS))


def test_if_none_match_gives_304_with_validators_and_no_body(start_server, site):
    server = serve(start_server, site)
    etag = get(server, "/digits.txt")[1]["etag"]
    for field in (etag, "W/" + etag, '"other", ' + etag, "*"):
        status, headers, body = get(server, "/digits.txt", {"If-None-Match": field})
        assert (status, body) == (304, b""), field
        assert headers["etag"] == etag and "cache-control" in headers
        assert "content-length" not in headers
    assert get(server, "/digits.txt", {"If-None-Match": '"other"'})[0] == 200
    assert get(server, "/digits.txt", {"If-None-Match": "garbage"})[0] == 200


def test_if_modified_since(start_server, site):
    server = serve(start_server, site)
    last_modified = get(server, "/digits.txt")[1]["last-modified"]
    mtime = email.utils.parsedate_to_datetime(last_modified).timestamp()
    assert get(server, "/digits.txt", {"If-Modified-Since": last_modified})[0] == 304
    later = email.utils.formatdate(mtime + 60, usegmt=True)
    earlier = email.utils.formatdate(mtime - 60, usegmt=True)
    assert get(server, "/digits.txt", {"If-Modified-Since": later})[0] == 304
    assert get(server, "/digits.txt", {"If-Modified-Since": earlier})[0] == 200
    assert get(server, "/digits.txt", {"If-Modified-Since": "yesterday"})[0] == 200
    # the obsolete formats must be accepted too (RFC 9110 section 5.6.7)
    stamp = time.gmtime(mtime + 60)
    rfc850 = time.strftime("%A, %d-%b-%y %H:%M:%S GMT", stamp)
    asctime = time.strftime("%a %b %e %H:%M:%S %Y", stamp)
    assert get(server, "/digits.txt", {"If-Modified-Since": rfc850})[0] == 304
    assert get(server, "/digits.txt", {"If-Modified-Since": asctime})[0] == 304


def test_if_none_match_takes_precedence_over_if_modified_since(start_server, site):
    server = serve(start_server, site)
    future = email.utils.formatdate(time.time() + 3600, usegmt=True)
    status, _, _ = get(server, "/digits.txt", {"If-None-Match": '"nope"',
                                                "If-Modified-Since": future})
    assert status == 200


def test_if_match_and_if_unmodified_since_give_412(start_server, site):
    server = serve(start_server, site)
    _, headers, _ = get(server, "/digits.txt")
    etag, last_modified = headers["etag"], headers["last-modified"]
    mtime = email.utils.parsedate_to_datetime(last_modified).timestamp()
    assert get(server, "/digits.txt", {"If-Match": etag})[0] == 200
    assert get(server, "/digits.txt", {"If-Match": "*"})[0] == 200
    status, headers, body = get(server, "/digits.txt", {"If-Match": '"stale"'})
    assert status == 412 and headers["etag"] == etag and body != DIGITS
    assert "cache-control" not in headers
    assert get(server, "/digits.txt", {"If-Match": "W/" + etag})[0] == 412   # strong comparison
    earlier = email.utils.formatdate(mtime - 60, usegmt=True)
    assert get(server, "/digits.txt", {"If-Unmodified-Since": earlier})[0] == 412
    assert get(server, "/digits.txt", {"If-Unmodified-Since": last_modified})[0] == 200
    # If-Match present: If-Unmodified-Since is not evaluated (RFC 9110 section 13.2.2)
    assert get(server, "/digits.txt", {"If-Match": etag, "If-Unmodified-Since": earlier})[0] == 200
    # 412 is decided before 304
    assert get(server, "/digits.txt", {"If-Match": '"stale"', "If-None-Match": etag})[0] == 412


def test_plain_and_conditional_requests_interleaved(start_server, site):
    # A request without Range and If-* fields skips steps 3 and 4 (onebox/static.py); every
    # one of those fields must still send its request the long way, before and after a plain one
    server = serve(start_server, site)
    _, headers, _ = get(server, "/digits.txt")
    etag, last_modified = headers["etag"], headers["last-modified"]
    mtime = email.utils.parsedate_to_datetime(last_modified).timestamp()
    earlier = email.utils.formatdate(mtime - 60, usegmt=True)
    for _ in range(2):
        for fields, status, body in (
                ({}, 200, DIGITS),
                ({"If-None-Match": etag}, 304, b""),
                ({"If-Modified-Since": last_modified}, 304, b""),
                ({"If-Match": '"other"'}, 412, None),
                ({"If-Unmodified-Since": earlier}, 412, None),
                ({"Range": "bytes=0-3"}, 206, DIGITS[:4]),
                ({"Accept-Encoding": "gzip"}, 200, DIGITS)):
            got = get(server, "/digits.txt", fields)
            assert got[0] == status and body in (None, got[2]), fields


# memory_max_file_bytes 0: every file is served from disk, checked by fstat after the open
# instead of by a stat when the URL is looked up
@pytest.mark.parametrize("memory_max_file_bytes", [None, 0])
def test_edits_change_the_etag_and_the_body_at_once(start_server, site, memory_max_file_bytes):
    settings = {} if memory_max_file_bytes is None else {
        "memory_max_file_bytes": memory_max_file_bytes}
    server = serve(start_server, site, **settings)
    _, first, body = get(server, "/digits.txt")
    assert body == DIGITS
    assert get(server, "/digits.txt", {"If-None-Match": first["etag"]})[0] == 304
    write(site, "digits.txt", DIGITS[::-1])          # same size, new mtime
    status, second, body = get(server, "/digits.txt")
    assert body == DIGITS[::-1] and second["etag"] != first["etag"]
    assert get(server, "/digits.txt", {"If-None-Match": first["etag"]})[0] == 200
    write(site, "digits.txt", b"short")
    assert get(server, "/digits.txt", {"Range": "bytes=1-2"})[2] == b"ho"
    assert get(server, "/digits.txt")[2] == b"short"
    (site / "digits.txt").unlink()
    assert get(server, "/digits.txt")[0] == 404
    assert get(server, "/digits.txt", {"If-None-Match": second["etag"]})[0] == 404


def test_head_matches_get(start_server, site):
    server = serve(start_server, site)
    for path, headers in (("/style.css", {}), ("/style.css", {"Accept-Encoding": "gzip"}),
                          ("/", {}), ("/digits.txt", {"Range": "bytes=0-4"})):
        get_status, get_headers, _ = get(server, path, headers)
        head_status, head_headers, body = get(server, path, headers, "HEAD")
        get_headers.pop("date"), head_headers.pop("date")
        if "Range" in headers:
            # RFC 9110 section 14.2: Range is defined for GET only; HEAD shows the 200
            get_status, get_headers, _ = get(server, path)
            get_headers.pop("date")
        assert (head_status, head_headers, body) == (get_status, get_headers, b"")


# --- ranges ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, start, end", [
    ("bytes=0-9", 0, 9),
    ("bytes=90-", 90, 99),            # open-ended
    ("bytes=-7", 93, 99),             # suffix
    ("bytes=-500", 0, 99),            # suffix longer than the file: all of it
    ("bytes=95-1000", 95, 99),        # last position beyond EOF is clamped
    ("bytes=99-99", 99, 99),
    ("BYTES = 3-4", 3, 4),            # unit is case-insensitive, whitespace allowed
    ("bytes=0-4,5-9", 0, 9),          # adjacent ranges are coalesced
    ("bytes=0-5, 3-9", 0, 9),         # overlapping too
    ("bytes=200-300, 10-19", 10, 19),  # unsatisfiable parts are dropped
    ("bytes=0-99999999999999999999999999", 0, 99),
])
def test_single_range(start_server, site, spec, start, end):
    server = serve(start_server, site)
    status, headers, body = get(server, "/digits.txt", {"Range": spec})
    assert status == 206
    assert headers["content-range"] == "bytes %d-%d/100" % (start, end)
    assert body == DIGITS[start:end + 1]
    assert headers["content-length"] == str(end - start + 1)
    assert "etag" in headers and headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("spec", ["bytes=100-", "bytes=100-200", "bytes=-0", "bytes=500-,600-"])
def test_unsatisfiable_range_is_416(start_server, site, spec):
    server = serve(start_server, site)
    status, headers, _ = get(server, "/digits.txt", {"Range": spec})
    assert status == 416 and headers["content-range"] == "bytes */100"


def test_any_range_of_an_empty_file_is_416(start_server, site):
    server = serve(start_server, site)
    status, headers, _ = get(server, "/empty.txt", {"Range": "bytes=0-"})
    assert status == 416 and headers["content-range"] == "bytes */0"


@pytest.mark.parametrize("spec", ["bytes=abc", "bytes=5-1", "items=0-1", "bytes=", "bytes=--1",
                                  "bytes=1-2-3", "bytes 0-1", "bytes=0x1-2", "bytes=-"])
def test_malformed_range_is_ignored(start_server, site, spec):
    server = serve(start_server, site)
    status, headers, body = get(server, "/digits.txt", {"Range": spec})
    assert (status, body) == (200, DIGITS)
    assert "content-range" not in headers


def parse_multipart(headers, body):
    boundary = re.fullmatch(r"multipart/byteranges; boundary=(\S+)",
                            headers["content-type"]).group(1)
    assert body.endswith(b"--" + boundary.encode() + b"--\r\n")
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:-1]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        assert data.endswith(b"\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n"))
        parts.append((fields["Content-Range"], fields["Content-Type"], data[:-2]))
    return parts


def test_several_ranges_give_multipart_byteranges(start_server, site):
    server = serve(start_server, site)
    status, headers, body = get(server, "/digits.txt", {"Range": "bytes=50-59, 0-4, -3"})
    assert status == 206 and int(headers["content-length"]) == len(body)
    assert "content-range" not in headers
    parts = parse_multipart(headers, body)
    assert parts == [("bytes 50-59/100", "text/plain; charset=utf-8", DIGITS[50:60]),
                     ("bytes 0-4/100", "text/plain; charset=utf-8", DIGITS[0:5]),
                     ("bytes 97-99/100", "text/plain; charset=utf-8", DIGITS[97:])]


def test_overlapping_ranges_are_coalesced_in_ascending_order(start_server, site):
    server = serve(start_server, site)
    status, headers, body = get(server, "/digits.txt", {"Range": "bytes=50-59,0-4,55-70"})
    assert status == 206
    assert [part[0] for part in parse_multipart(headers, body)] == [
        "bytes 0-4/100", "bytes 50-70/100"]


def test_max_ranges_boundary(start_server, site):
    server = serve(start_server, site, max_ranges=3)
    three = "bytes=0-0,10-10,20-20"
    assert get(server, "/digits.txt", {"Range": three})[0] == 206
    status, _, body = get(server, "/digits.txt", {"Range": three + ",30-30"})
    assert (status, body) == (200, DIGITS)


def test_max_multipart_bytes_boundary(start_server, site):
    server = serve(start_server, site, max_multipart_bytes=20)
    assert get(server, "/digits.txt", {"Range": "bytes=0-9,20-29"})[0] == 206
    status, _, body = get(server, "/digits.txt", {"Range": "bytes=0-9,20-30"})
    assert (status, body) == (200, DIGITS)


def test_if_range(start_server, site):
    server = serve(start_server, site)
    _, headers, _ = get(server, "/digits.txt")
    etag, last_modified = headers["etag"], headers["last-modified"]
    ranged = {"Range": "bytes=0-4"}
    assert get(server, "/digits.txt", dict(ranged, **{"If-Range": etag}))[0] == 206
    assert get(server, "/digits.txt", dict(ranged, **{"If-Range": last_modified}))[0] == 206
    for stale in ('"old"', "W/" + etag, "Mon, 01 Jan 2001 00:00:00 GMT", "junk"):
        status, _, body = get(server, "/digits.txt", dict(ranged, **{"If-Range": stale}))
        assert (status, body) == (200, DIGITS), stale


def test_if_range_holds_one_validator_or_none(start_server, site):
    """RFC 9110 section 13.1.5: If-Range carries one entity-tag or one date. A list (even one
    naming the current tag), a weak tag, "*", or two If-Range lines: the whole file, 200."""
    server = serve(start_server, site)
    _, headers, _ = get(server, "/digits.txt")
    etag, last_modified = headers["etag"], headers["last-modified"]
    for field in ('%s, "other"' % etag, '"other", %s' % etag, "%s, %s" % (etag, etag),
                  "W/" + etag, "*", "%s, %s" % (last_modified, last_modified),
                  etag + " junk", etag[:-1]):
        status, _, body = get(server, "/digits.txt", {"Range": "bytes=0-4", "If-Range": field})
        assert (status, body) == (200, DIGITS), field
    raw = raw_exchange(server, b"GET /digits.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=0-4\r\n"
                               b"If-Range: %s\r\nIf-Range: %s\r\nConnection: close\r\n\r\n"
                               % (etag.encode(), etag.encode()))
    assert status_of(raw) == 200 and raw.endswith(DIGITS)
    padded = get(server, "/digits.txt", {"Range": "bytes=0-4", "If-Range": " %s\t" % etag})
    assert padded[:3:2] == (206, DIGITS[:5])   # optional whitespace around a field value is no list


def test_if_range_date_of_a_file_modified_this_second_is_weak(start_server, site):
    # stamped in the future, as a file copied from a skewed clock is: weak for as long as its
    # mtime is not a second past (a file written now would be strong if this test stalled 1 s)
    write(site, "fresh.txt", DIGITS, mtime=time.time() + 3600)
    server = serve(start_server, site)
    last_modified = get(server, "/fresh.txt")[1]["last-modified"]
    status, _, _ = get(server, "/fresh.txt", {"Range": "bytes=0-4", "If-Range": last_modified})
    assert status == 200


def test_range_of_a_compressible_file_is_identity(start_server, site):
    server = serve(start_server, site)
    status, headers, body = get(server, "/style.css",
                                {"Range": "bytes=0-99", "Accept-Encoding": "gzip"})
    assert status == 206 and body == CSS[:100]
    assert "content-encoding" not in headers and headers["vary"] == "Accept-Encoding"


def test_large_file_goes_out_whole_and_in_ranges(start_server, site):
    big = os.urandom(3 * 1024 * 1024 + 17)
    write(site, "big.bin", big)
    server = serve(start_server, site)
    status, headers, body = get(server, "/big.bin")
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(big).digest()
    assert headers["content-type"] == "application/octet-stream"
    status, headers, body = get(server, "/big.bin", {"Range": "bytes=1000000-2999999"})
    assert status == 206 and body == big[1000000:3000000]
    status, headers, body = get(server, "/big.bin", {"Range": "bytes=0-9,-10"})
    assert [part[2] for part in parse_multipart(headers, body)] == [big[:10], big[-10:]]
    status, headers, body = get(server, "/big.bin", {"Range": "bytes=0-"}, "HEAD")
    assert (status, headers["content-length"], body) == (200, str(len(big)), b"")


def test_large_file_keeps_the_connection_usable(start_server, site):
    big = os.urandom(2 * 1024 * 1024)
    write(site, "big.bin", big)
    server = serve(start_server, site)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for _ in range(3):
            connection.request("GET", "/big.bin")
            assert connection.getresponse().read() == big
            connection.request("GET", "/digits.txt")
            assert connection.getresponse().read() == DIGITS
    finally:
        connection.close()


# --- compression --------------------------------------------------------------------------------

def test_gzip_on_the_fly(start_server, site):
    server = serve(start_server, site)
    status, plain, body = get(server, "/style.css")
    assert (status, body) == (200, CSS) and plain["vary"] == "Accept-Encoding"
    status, headers, body = get(server, "/style.css", {"Accept-Encoding": "gzip, deflate"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == CSS and int(headers["content-length"]) == len(body) < len(CSS)
    assert headers["vary"] == "Accept-Encoding" and "accept-ranges" not in headers
    assert headers["etag"] != plain["etag"] and headers["etag"].endswith('-gz"')
    assert headers["cache-control"] == plain["cache-control"]
    assert get(server, "/style.css", {"Accept-Encoding": "gzip"})[2] == body   # cached, stable
    status, headers_304, _ = get(server, "/style.css", {"Accept-Encoding": "gzip",
                                                        "If-None-Match": headers["etag"]})
    assert status == 304 and headers_304["vary"] == "Accept-Encoding"
    # identity's ETag does not validate the gzip representation, nor the other way round
    assert get(server, "/style.css", {"Accept-Encoding": "gzip",
                                      "If-None-Match": plain["etag"]})[0] == 200
    assert get(server, "/style.css", {"If-None-Match": headers["etag"]})[0] == 200


@pytest.mark.parametrize("accept, coding", [
    ("gzip;q=0", None),
    ("gzip;q=0.0, deflate", None),
    ("GZIP", "gzip"),
    ("x-gzip", "gzip"),
    ("*", "gzip"),
    ("*;q=0", None),
    ("*;q=0, gzip;q=0.1", "gzip"),
    ("identity;q=0.9, gzip;q=0.5", None),
    ("identity;q=0.5, gzip;q=0.9", "gzip"),
    ("identity;q=0, gzip", "gzip"),
    ("identity;q=0", None),            # nothing acceptable: identity anyway (RFC 9110 12.5.3)
    ("", None),
    ("gzip;q=2", None),                # malformed q-values drop the element
    ("gzip;q=0.1234", None),
    ("br, zstd", None),
])
def test_accept_encoding_q_values_for_gzip(start_server, site, accept, coding):
    server = serve(start_server, site)
    status, headers, body = get(server, "/style.css", {"Accept-Encoding": accept})
    assert status == 200 and headers.get("content-encoding") == coding
    assert (gzip.decompress(body) if coding else body) == CSS


@pytest.fixture
def precompressed(site):
    source = b"var precompressed = true;\n" * 100
    for name, data in (("bundle.js", source), ("bundle.js.gz", gzip.compress(source)),
                       ("bundle.js.br", b"BROTLI" + source[:50]),
                       ("bundle.js.zst", b"ZSTD" + source[:50])):
        write(site, name, data, time.time() - 60)
    return source


@pytest.mark.parametrize("accept, coding", [
    ("gzip, deflate, br, zstd", "br"),      # ties go to the server's preference
    ("gzip, zstd", "zstd"),
    ("gzip", "gzip"),
    ("br;q=0.5, gzip;q=0.9", "gzip"),
    ("gzip;q=0.5, br", "br"),
    ("br;q=0, zstd;q=0, *", "gzip"),
    ("identity", None),
    (None, None),
])
def test_precompressed_sidecars(start_server, site, precompressed, accept, coding):
    server = serve(start_server, site)
    status, headers, body = get(server, "/bundle.js",
                                {"Accept-Encoding": accept} if accept is not None else {})
    assert status == 200 and headers.get("content-encoding") == coding
    assert headers["vary"] == "Accept-Encoding"
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    expected = {None: precompressed, "gzip": (site / "bundle.js.gz").read_bytes(),
                "br": (site / "bundle.js.br").read_bytes(),
                "zstd": (site / "bundle.js.zst").read_bytes()}[coding]
    assert body == expected
    if coding:
        status, _, _ = get(server, "/bundle.js", {"Accept-Encoding": accept,
                                                  "If-None-Match": headers["etag"]})
        assert status == 304


def test_the_chosen_coding_follows_the_field_and_the_file(start_server, site, precompressed):
    # The choice is memoised by Accept-Encoding and the file's codings: one field picks br for
    # a file with a .br sidecar and gzip for one without, and a changed field changes it
    server = serve(start_server, site)
    for _ in range(2):
        for path, accept, coding in (("/style.css", "br, gzip", "gzip"),
                                     ("/bundle.js", "br, gzip", "br"),
                                     ("/style.css", "br, gzip", "gzip"),
                                     ("/bundle.js", "gzip", "gzip"),
                                     ("/bundle.js", "gzip;q=0", None),
                                     ("/style.css", "gzip;q=0", None),
                                     ("/style.css", "identity", None),
                                     ("/style.css", "gzip", "gzip")):
            status, headers, body = get(server, path, {"Accept-Encoding": accept})
            assert (status, headers.get("content-encoding")) == (200, coding), (path, accept)


def test_many_distinct_accept_encoding_fields(start_server, site):
    # the remembered choices are bounded (MAX_CHOICES, 256): past it they are forgotten and
    # chosen again, never mixed up; a field longer than MAX_CHOICE_CHARS (200) is not kept
    server = serve(start_server, site)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for number in range(600):
            gzipped = number % 2 == 0
            accept = ("gzip;q=0.%03d" if gzipped else "gzip;q=0, x-%d") % (number + 1)
            if number % 3 == 0:   # 200 or 201 characters: kept, or not
                accept = (accept + ", x-long;q=0.5").ljust(200 + number % 2)
            connection.request("GET", "/style.css", headers={"Accept-Encoding": accept})
            response = connection.getresponse()
            response.read()
            assert response.getheader("Content-Encoding") == ("gzip" if gzipped else None)
    finally:
        connection.close()


def test_a_sidecar_older_than_its_source_is_not_used(start_server, site, precompressed):
    write(site, "bundle.js", precompressed + b"// edited\n")
    os.utime(site / "bundle.js.br", (time.time() - 3600,) * 2)
    server = serve(start_server, site)
    status, headers, body = get(server, "/bundle.js", {"Accept-Encoding": "br"})
    assert headers.get("content-encoding") is None and body.endswith(b"// edited\n")
    status, headers, body = get(server, "/bundle.js", {"Accept-Encoding": "gzip"})
    assert gzip.decompress(body).endswith(b"// edited\n")   # gzipped here, the .gz is stale


def test_sidecars_can_be_switched_off(start_server, site, precompressed):
    server = serve(start_server, site, precompressed=False, gzip=False)
    status, headers, body = get(server, "/bundle.js", {"Accept-Encoding": "br, gzip"})
    assert body == precompressed and "vary" not in headers


def test_no_compression_for_compressed_types_or_small_files(start_server, site):
    server = serve(start_server, site)
    for path in ("/logo.png", "/tiny.css"):
        status, headers, _ = get(server, path, {"Accept-Encoding": "gzip"})
        assert status == 200 and "content-encoding" not in headers and "vary" not in headers


def test_gzip_size_bounds(start_server, site):
    write(site, "at-min.txt", b"a" * 64)
    write(site, "below-min.txt", b"a" * 63)
    write(site, "at-max.txt", b"b" * 4096)
    write(site, "above-max.txt", b"b" * 4097)
    server = serve(start_server, site, gzip_min_bytes=64, gzip_max_file_bytes=4096)
    for name, coding in (("at-min", "gzip"), ("below-min", None), ("at-max", "gzip"),
                         ("above-max", None)):
        _, headers, _ = get(server, "/%s.txt" % name, {"Accept-Encoding": "gzip"})
        assert headers.get("content-encoding") == coding, name


def test_gzip_of_a_file_too_big_for_memory(start_server, site):
    text = b"".join(b"line %d of a big log\n" % n for n in range(40000))
    write(site, "big.txt", text)
    server = serve(start_server, site, memory_max_file_bytes=4096)
    status, headers, body = get(server, "/big.txt", {"Accept-Encoding": "gzip"})
    assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == text
    assert get(server, "/big.txt")[2] == text
    # the gzip is in memory, the file is not: an edit is still seen at once
    write(site, "big.txt", text.upper())
    status, headers, body = get(server, "/big.txt", {"Accept-Encoding": "gzip"})
    assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == text.upper()


def test_incompressible_text_is_sent_as_is(start_server, site):
    write(site, "noise.txt", os.urandom(5000))
    server = serve(start_server, site)
    status, headers, _ = get(server, "/noise.txt", {"Accept-Encoding": "gzip"})
    assert "content-encoding" not in headers and headers["vary"] == "Accept-Encoding"


# --- caching policy -----------------------------------------------------------------------------

def test_cache_control_defaults(start_server, site):
    server = serve(start_server, site)
    expected = {"/": "max-age=60, must-revalidate", "/docs/": "max-age=60, must-revalidate",
                "/style.css": "max-age=600", "/app.js": "max-age=600",
                "/app.3f9a1c.js": "max-age=31536000, immutable"}
    for path, value in expected.items():
        assert get(server, path)[1]["cache-control"] == value, path


def test_cache_control_from_config_with_prefix_overrides(start_server, site):
    write(site, "downloads/notes.txt", b"notes\n")
    write(site, "downloads/big/file.3f9a1c.bin", b"bin\n")
    server = serve(start_server, site, html_max_age_s=0, max_age_s=5,
                   cache_control="/downloads/ no-store\n/downloads/big/ private, max-age=9")
    assert get(server, "/")[1]["cache-control"] == "max-age=0, must-revalidate"
    assert get(server, "/style.css")[1]["cache-control"] == "max-age=5"
    assert get(server, "/downloads/notes.txt")[1]["cache-control"] == "no-store"
    assert get(server, "/downloads/big/file.3f9a1c.bin")[1]["cache-control"] == \
        "private, max-age=9"


def test_extra_headers_on_every_static_answer(start_server, site):
    server = serve(start_server, site, extra_headers="Strict-Transport-Security: max-age=300\n"
                                                     "X-Frame-Options: DENY")
    etag = get(server, "/digits.txt")[1]["etag"]
    answers = [get(server, "/digits.txt"), get(server, "/digits.txt", {"If-None-Match": etag}),
               get(server, "/digits.txt", {"Range": "bytes=500-"}),
               get(server, "/nope", {"Accept": "text/html"}), get(server, "/nope"),
               get(server, "/docs")]
    for status, headers, _ in answers:
        assert headers["strict-transport-security"] == "max-age=300", status
        assert headers["x-frame-options"] == "DENY", status


@pytest.mark.parametrize("key, value", [
    ("extra_headers", "no colon here"),
    ("extra_headers", "Bad Name: x"),
    ("extra_headers", "Content-Length: 5"),
    ("extra_headers", "Cache-Control: no-store"),
    ("cache_control", "downloads/ no-store"),
    ("cache_control", "/downloads/"),
    ("fingerprint_pattern", "([unclosed"),
])
def test_bad_static_settings_stop_start_up(key, value):
    with pytest.raises(onebox.ConfigError, match=r"\[static\] " + key):
        onebox.load_config(None, {"static." + key: value})


# --- directories --------------------------------------------------------------------------------

def test_directories_index_and_redirect(start_server, site):
    server = serve(start_server, site)
    assert get(server, "/")[2] == HTML
    assert get(server, "/docs/")[2].startswith(b"<!doctype html><title>docs")
    status, headers, _ = get(server, "/docs?x=1")
    assert status == 301 and headers["location"] == "/docs/?x=1"
    assert get(server, "/index.html/")[0] == 404


def test_no_listing_unless_enabled(start_server, site):
    write(site, "files/b.txt", b"b")
    write(site, "files/a <x>.txt", b"a")
    write(site, "files/sub/c.txt", b"c")
    write(site, "files/.hidden", b"h")
    server = serve(start_server, site)
    assert get(server, "/files/")[0] == 404
    listing = serve(start_server, site, directory_listing=True)
    status, headers, body = get(listing, "/files/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    text = body.decode()
    assert text.index('href="sub/"') < text.index('href="a%20%3Cx%3E.txt"') < \
        text.index('href="b.txt"')
    assert "a &lt;x&gt;.txt" in text and ".hidden" not in text and "<x>" not in text


def test_listing_max_entries_boundary(start_server, site):
    for n in range(3):
        write(site, "three/%d.txt" % n, b"x")
        write(site, "four/%d.txt" % n, b"x")
    write(site, "four/3.txt", b"x")
    server = serve(start_server, site, directory_listing=True, listing_max_entries=3)
    assert b"more entries" not in get(server, "/three/")[2]
    assert b"more entries" in get(server, "/four/")[2]


def test_clean_urls(start_server, site):
    plain = serve(start_server, site)
    assert get(plain, "/about")[0] == 404
    clean = serve(start_server, site, clean_urls=True)
    status, headers, body = get(clean, "/about")
    assert status == 200 and body.startswith(b"<!doctype html><title>about")
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert get(clean, "/about.html")[0] == 200


def test_custom_404_page(start_server, site):
    server = serve(start_server, site)
    status, headers, body = get(server, "/missing", {"Accept": "text/html,*/*;q=0.8"})
    assert status == 404 and b"no such page" in body
    assert headers["content-type"] == "text/html; charset=utf-8" and "etag" not in headers
    status, headers, body = get(server, "/missing", {"Accept": "text/html"}, "HEAD")
    assert (status, body) == (404, b"") and "content-length" in headers
    status, headers, body = get(server, "/missing")
    assert status == 404 and headers["content-type"].startswith("text/plain")


def test_methods_other_than_get_and_head(start_server, site):
    server = serve(start_server, site)
    status, headers, _ = get(server, "/style.css", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD, OPTIONS"
    status, headers, _ = get(server, "/style.css", method="OPTIONS")
    assert status == 204 and headers["allow"] == "GET, HEAD, OPTIONS"


# --- containment --------------------------------------------------------------------------------

def test_dotfiles_are_hidden_except_well_known(start_server, site):
    write(site, "docs/.git/config", b"[core]\n")
    write(site, "docs/.well-known/x", b"x")
    os.symlink(site / ".env", site / "env-link")
    server = serve(start_server, site)
    for path in ("/.env", "/docs/.git/config", "/docs/.well-known/x", "/env-link", "/.well-known/"):
        assert get(server, path)[0] == 404, path
    status, headers, body = get(server, "/.well-known/acme-challenge/token123")
    assert (status, body) == (200, b"token123.key\n")


def test_symlinks_out_of_the_root_are_refused_unless_allowed(start_server, site, tmp_path):
    outside = tmp_path / "outside"
    write(outside, "secret.txt", b"secret\n")
    os.symlink(outside / "secret.txt", site / "secret.txt")
    os.symlink(outside, site / "shared")
    os.symlink(site / "digits.txt", site / "inside-link.txt")
    server = serve(start_server, site)
    assert get(server, "/secret.txt")[0] == 404
    assert get(server, "/shared/secret.txt")[0] == 404
    assert get(server, "/shared/")[0] == 404
    assert get(server, "/inside-link.txt")[2] == DIGITS
    allowed = serve(start_server, site, follow_symlinks_outside=True)
    assert get(allowed, "/secret.txt")[2] == b"secret\n"
    assert get(allowed, "/shared/secret.txt")[2] == b"secret\n"


def test_a_symlink_retargeted_outside_is_refused_after_the_recheck(start_server, site, tmp_path):
    write(tmp_path / "outside", "page.txt", b"outside\n")
    write(site, "real.txt", b"inside\n")
    os.symlink(site / "real.txt", site / "page.txt")
    server = serve(start_server, site, path_recheck_s=0.0)
    assert get(server, "/page.txt")[2] == b"inside\n"
    os.unlink(site / "page.txt")
    os.symlink(tmp_path / "outside" / "page.txt", site / "page.txt")
    assert get(server, "/page.txt")[0] == 404


def test_traversal_attempts(start_server, site, tmp_path):
    write(tmp_path, "top-secret.txt", b"secret\n")
    server = serve(start_server, site)
    for target in (b"/../top-secret.txt", b"/%2e%2e/top-secret.txt", b"/docs/..%2ftop-secret.txt",
                   b"/docs%2f..%2f..%2ftop-secret.txt", b"/%2e%2e%5ctop-secret.txt"):
        raw = raw_exchange(server, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
                           b"Connection: close\r\n\r\n")
        assert status_of(raw) in (400, 404) and b"secret" not in raw, target


def test_special_files_are_not_served(start_server, site):
    os.mkfifo(site / "pipe.txt")
    server = serve(start_server, site)
    assert get(server, "/pipe.txt", {}, "GET")[0] == 404


def test_nosniff_and_types(start_server, site):
    write(site, "data.json", b"{}")
    write(site, "noext", b"x")
    server = serve(start_server, site)
    for path, content_type in (("/data.json", "application/json"), ("/logo.png", "image/png"),
                               ("/noext", "application/octet-stream")):
        headers = get(server, path)[1]
        assert headers["content-type"] == content_type
        assert headers["x-content-type-options"] == "nosniff"


def test_pipelined_static_requests_over_a_raw_socket(start_server, site):
    server = serve(start_server, site)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        sock.sendall(b"GET /digits.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n\r\n"
                     b"HEAD /digits.txt HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /digits.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    assert data.count(b"HTTP/1.1 ") == 3
    first, rest = data.split(b"\r\n\r\n", 1)
    assert b"206 Partial Content" in first and rest.startswith(b"01HTTP/1.1 200")
    assert data.endswith(b"\r\n\r\n" + DIGITS)


def test_a_client_that_stops_reading_a_large_file_is_cut_off(start_server, site):
    big = os.urandom(8 * 1024 * 1024)
    write(site, "big.bin", big)
    server = start_server(pages_dir=site, config={"write_timeout_s": 0.3, "worker_threads": 1})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(2.5)                      # read nothing: the server's write times out
        started, received = time.monotonic(), 0
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += len(chunk)
        assert received < len(big) and time.monotonic() - started < 4
    finally:
        sock.close()
    assert get(server, "/digits.txt")[2] == DIGITS   # the only worker is free again


# --- service workers, per-path sections, client-side routes (issue 25) ------------------------

def app_site(root):
    write(root, "app/index.html", b"<!doctype html><title>app</title>" + b"<p>app " * 300)
    write(root, "app/sw.js", b"self.addEventListener('fetch', function () {});\n")
    write(root, "app/app.js", b"console.log('app');\n")
    write(root, "app/worker.js", b"importScripts('/app/app.js');\n")
    write(root, "app/files/a.txt", b"a\n")
    write(root, "other/service-worker.js", b"// another\n")
    return root


def test_service_worker_scripts_are_revalidated_with_validators(start_server, site):
    server = serve(start_server, app_site(site))
    for path in ("/app/sw.js", "/other/service-worker.js"):
        status, headers, _ = get(server, path)
        assert status == 200 and headers["cache-control"] == "no-cache", path
        assert headers["etag"] and headers["last-modified"]
        status, headers, body = get(server, path, {"If-None-Match": headers["etag"]})
        assert (status, body, headers["cache-control"]) == (304, b"", "no-cache")
    assert get(server, "/app/app.js")[1]["cache-control"] == "max-age=600"


def test_a_script_fetched_as_a_service_worker_gets_the_rule_whatever_its_name(start_server,
                                                                              site):
    server = serve(start_server, app_site(site))
    worker = {"Service-Worker": "script"}
    status, headers, body = get(server, "/app/worker.js", worker)
    assert (status, headers["cache-control"]) == (200, "no-cache")
    assert body == b"importScripts('/app/app.js');\n"
    status, headers, _ = get(server, "/app/worker.js", dict(worker, **{
        "If-None-Match": headers["etag"]}))
    assert (status, headers["cache-control"]) == (304, "no-cache")
    # the same file fetched as a plain script keeps the ordinary rule
    assert get(server, "/app/worker.js")[1]["cache-control"] == "max-age=600"
    assert get(server, "/app/worker.js", {"Service-Worker": "other"})[1]["cache-control"] == \
        "max-age=600"


def test_the_service_worker_rule_is_a_setting(start_server, site):
    server = serve(start_server, app_site(site), service_worker_scripts="worker.js /app/app.js",
                   service_worker_cache_control="max-age=0, must-revalidate")
    assert get(server, "/app/worker.js")[1]["cache-control"] == "max-age=0, must-revalidate"
    assert get(server, "/app/app.js")[1]["cache-control"] == "max-age=0, must-revalidate"
    assert get(server, "/app/sw.js")[1]["cache-control"] == "max-age=600"   # not named now
    off = serve(start_server, site, service_worker_cache_control="")
    assert get(off, "/app/sw.js")[1]["cache-control"] == "max-age=600"
    assert get(off, "/app/sw.js", {"Service-Worker": "script"})[1]["cache-control"] == \
        "max-age=600"


def serve_sections(start_server, site, sections, **config):
    """A server with [static "NAME"] sections: {name: {key: value}}."""
    values = {"static." + key: value for key, value in config.items()}
    for name, keys in sections.items():
        values.update(('static "%s".%s' % (name, key), value) for key, value in keys.items())
    return start_server(pages_dir=site, config=values)


def test_per_path_headers_and_cache_control(start_server, site):
    server = serve_sections(start_server, app_site(site), {
        "/app/": {"headers": "Content-Security-Policy: default-src 'self'\nX-App: 1",
                  "cache_control": "no-cache"},
        "/app/sw.js": {"headers": "Service-Worker-Allowed: /app/"},
        "/app/files/": {"cache_control": "max-age=5"}},
        extra_headers="X-Site: 1\nX-App: site")
    status, headers, _ = get(server, "/app/app.js")
    assert headers["content-security-policy"] == "default-src 'self'"
    assert headers["x-app"] == "1" and headers["x-site"] == "1"    # the section's name wins
    assert headers["cache-control"] == "no-cache"
    etag = headers["etag"]
    headers = get(server, "/app/app.js", {"If-None-Match": etag})[1]
    assert headers["content-security-policy"] == "default-src 'self'" and headers["x-app"] == "1"
    # the longest section that sets a key: sw.js has headers of its own, /app/'s cache_control
    headers = get(server, "/app/sw.js")[1]
    assert headers["service-worker-allowed"] == "/app/" and headers["x-site"] == "1"
    assert "content-security-policy" not in headers and headers["x-app"] == "site"
    assert headers["cache-control"] == "no-cache"
    headers = get(server, "/app/files/a.txt")[1]
    assert headers["cache-control"] == "max-age=5" and headers["x-app"] == "1"
    headers = get(server, "/style.css")[1]   # outside every section
    assert headers["cache-control"] == "max-age=600" and headers["x-app"] == "site"
    assert "content-security-policy" not in headers


def test_a_fallback_serves_client_side_routes_and_missing_assets_stay_404(start_server, site):
    server = serve_sections(start_server, app_site(site),
                            {"/app/": {"fallback": "/app/index.html"}})
    html = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    index = get(server, "/app/index.html")
    for path in ("/app/settings", "/app/users/42/edit", "/app/settings?tab=2"):
        status, headers, body = get(server, path, html)
        assert (status, body) == (200, index[2]), path
        assert headers["content-type"] == "text/html; charset=utf-8"
        # index.html is gzipped on the fly for whoever accepts it: Vary names both
        assert headers["etag"] == index[1]["etag"]
        assert headers["vary"] == "Accept-Encoding, Accept"
    status, headers, body = get(server, "/app/settings", dict(html, **{
        "Accept-Encoding": "gzip"}))
    assert status == 200 and headers["vary"] == "Accept-Encoding, Accept"
    assert gzip.decompress(body) == index[2]
    status, headers, body = get(server, "/app/settings", dict(html, **{
        "If-None-Match": index[1]["etag"]}))
    assert (status, body, headers["vary"]) == (304, b"", "Accept-Encoding, Accept")
    status, headers, body = get(server, "/app/settings", html, method="HEAD")
    assert (status, body, headers["content-length"]) == (200, b"", str(len(index[2])))
    # assets, fetches that do not accept HTML, other prefixes, other methods: 404 as before
    assert get(server, "/app/missing.js", html)[0] == 404
    assert get(server, "/app/files/missing.txt", html)[0] == 404
    assert get(server, "/app/settings")[0] == 404
    assert get(server, "/app/settings", {"Accept": "application/json"})[0] == 404
    assert get(server, "/elsewhere", html)[0] == 404
    assert get(server, "/app/settings", html, method="POST")[0] == 404
    assert get(server, "/app/app.js", html)[2] == b"console.log('app');\n"   # files win


def test_a_fallback_that_names_no_file_is_a_404(start_server, site):
    server = serve_sections(start_server, app_site(site),
                            {"/app/": {"fallback": "/app/gone.html"}})
    assert get(server, "/app/settings", {"Accept": "text/html"})[0] == 404


@pytest.mark.parametrize("name, key, value, message", [
    ("/app/", "fallback", "app/index.html", "must be the URL path of a file"),
    ("/app/", "fallback", "/app/", "must be the URL path of a file"),
    ("/app/", "fallback", "/app/.env", "must be the URL path of a file"),
    ("/app/index.html", "fallback", "/app/index.html", "only a prefix"),
    ("/app/", "headers", "Content-Length: 4", "is set by the server"),
    ("/app/", "headers", "no colon", "must be 'Name: value'"),
    ("/app/", "cash_control", "no-cache", "unknown key"),
])
def test_bad_per_path_sections_stop_start_up(name, key, value, message):
    with pytest.raises(onebox.ConfigError, match=re.escape(message)):
        onebox.load_config(None, {'static "%s".%s' % (name, key): value})


def test_per_path_sections_parse_from_setup_cfg(tmp_path):
    path = tmp_path / "setup.cfg"
    path.write_text('[static "/app/"]\nfallback = /app/index.html\nheaders =\n'
                    '  X-One: 1\n  X-Two: 2\n[static "/app/sw.js"]\ncache_control = no-store\n')
    paths = dict(onebox.load_config(str(path)).static.paths)
    assert paths["/app/"].fallback == "/app/index.html"
    assert paths["/app/"].headers == "X-One: 1\nX-Two: 2"
    assert paths["/app/sw.js"].cache_control == "no-store"
    path.write_text('[static /app/]\nfallback = /app/index.html\n')
    with pytest.raises(onebox.ConfigError, match=r'\[static "/path/"\]'):
        onebox.load_config(str(path))
