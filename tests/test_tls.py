"""HTTPS (issue 15): a real onebox with a certificate the tests make with the openssl CLI, talked
to with ssl-wrapped http.client, raw SSL sockets and curl --cacert."""
import hashlib
import http.client
import os
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

from conftest import ROOT, onebox

SERVER = os.path.join(ROOT, "server.py")
BIG_BYTES = 10 * 1024 * 1024


# --- certificates ---------------------------------------------------------------------------

def _openssl(folder, *args):
    subprocess.run(["openssl"] + list(args), cwd=str(folder), check=True,
                   capture_output=True, timeout=60)


def _leaf(folder, name, days=30, ext="leaf.ext"):
    """A key and a certificate for localhost and 127.0.0.1, signed by the test CA."""
    _openssl(folder, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=localhost")
    _openssl(folder, "x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", str(days), "-extfile", ext, "-out",
             name + ".pem")
    return str(folder / (name + ".pem")), str(folder / (name + ".key"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA; server certificates "a" and "b" (different keys), "soon" (expires in 5 days) and
    "expired" (2020), each with its key."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl(folder, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "30", "-subj",
             "/CN=onebox test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (folder / "leaf.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    certs = {name: _leaf(folder, name) for name in ("a", "b")}
    certs["soon"] = _leaf(folder, "soon", days=5)
    # for testssl.sh: what a public CA's certificate has (revocation URIs, months of validity),
    # so that its findings are about onebox's TLS, not about a test certificate
    (folder / "scan.ext").write_text(
        (folder / "leaf.ext").read_text() + "crlDistributionPoints=URI:http://localhost/ca.crl\n"
        "authorityInfoAccess=OCSP;URI:http://localhost/ocsp\n")
    certs["scan"] = _leaf(folder, "scan", days=200, ext="scan.ext")
    # an expired one: `openssl ca` is the CLI's way to set notBefore/notAfter in the past
    (folder / "index.txt").write_text("")
    (folder / "serial").write_text("1000\n")
    (folder / "ca.cnf").write_text(
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n"
        "default_md = sha256\npolicy = p\ncopy_extensions = copy\n[p]\ncommonName = supplied\n")
    _openssl(folder, "ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile",
             "ca.key", "-in", "a.csr", "-out", "expired.pem", "-notext", "-extfile", "leaf.ext",
             "-startdate", "20200101000000Z", "-enddate", "20200201000000Z")
    certs["expired"] = (str(folder / "expired.pem"), certs["a"][1])
    certs["ca"] = str(folder / "ca.pem")
    return certs


def client_context(pki):
    context = ssl.create_default_context(cafile=pki["ca"])
    context.set_alpn_protocols(["h2", "http/1.1"])   # as browsers offer: h2 must not be taken
    return context


def fingerprint(sock):
    return hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()


def pem_fingerprint(path):
    with open(path) as handle:
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(handle.read())).hexdigest()


def client_hello():
    """A real TLS ClientHello, as the ssl module's client sends it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --- servers ----------------------------------------------------------------------------------

def tls_config(pki, name="a", **extra):
    cert, key = pki[name]
    config = {"tls.cert_file": cert, "tls.key_file": key}
    config.update(extra)
    return config


def start_tls(start_server, pki, pages_dir=None, routes=(), **extra):
    server = start_server(config=tls_config(pki, **extra), pages_dir=pages_dir, routes=routes)
    server.tls_port = server.tls_socket.getsockname()[1]
    return server


def https(server, pki, timeout=10):
    return http.client.HTTPSConnection("localhost", server.tls_port, timeout=timeout,
                                       context=client_context(pki))


def raw_tls(port, pki, rcvbuf=None, source="127.0.0.1"):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return client_context(pki).wrap_socket(sock, server_hostname="localhost")


def read_response(sock, buffer):
    """(status, headers dict, body, rest of buffer) of one response with Content-Length."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        assert data, "closed before a response head"
        buffer += data
    head, buffer = buffer.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(buffer) < length:
        data = sock.recv(1 << 20)
        assert data, "closed mid-body"
        buffer += data
    return int(lines[0].split()[1]), headers, buffer[:length], buffer[length:]


@pytest.fixture
def big_pages(tmp_path):
    pages = tmp_path / "pages"
    pages.mkdir()
    data = os.urandom(BIG_BYTES)
    (pages / "big.bin").write_bytes(data)
    (pages / "index.html").write_text("<p>home</p>\n")
    acme = pages / ".well-known" / "acme-challenge"
    acme.mkdir(parents=True)
    (acme / "token123").write_text("token123.thumbprint\n")
    return pages, data


# --- the protocol ---------------------------------------------------------------------------

def test_keep_alive_alpn_and_protocol_versions(start_server, pki):
    server = start_tls(start_server, pki)
    connection = https(server, pki)
    first = None
    for _ in range(3):
        connection.request("GET", "/hello")
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"hello, world\n")
        first = first or connection.sock
        assert connection.sock is first   # one TLS connection, kept alive
    assert connection.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert connection.sock.selected_alpn_protocol() == "http/1.1"
    assert fingerprint(connection.sock) == pem_fingerprint(pki["a"][0])
    connection.close()
    # TLS 1.1 and 1.0 are refused by the server (the openssl CLI, at security level 0, still
    # offers them: the alert is the server's); TLS 1.2 is served, with an ECDHE + AEAD cipher
    for flag in ("-tls1_1", "-tls1"):
        result = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d"
                                 % server.tls_port, flag, "-cipher", "DEFAULT:@SECLEVEL=0"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode != 0
        assert "alert protocol version" in result.stdout + result.stderr
    context = client_context(pki)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", server.tls_port), 5) as plain:
        with context.wrap_socket(plain, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.2"
            name = tls.cipher()[0]
            assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name), name
    # and the plain listener still serves plain HTTP beside it
    plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    plain.request("GET", "/hello")
    assert plain.getresponse().read() == b"hello, world\n"
    plain.close()


def test_pipelined_requests_over_tls(start_server, pki):
    server = start_tls(start_server, pki)
    with raw_tls(server.tls_port, pki) as tls:
        tls.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n" * 5)
        buffer = b""
        for _ in range(5):
            status, _, body, buffer = read_response(tls, buffer)
            assert (status, body) == (200, b"hello, world\n")


def test_request_bodies_over_tls(start_server, pki):
    server = start_tls(start_server, pki)
    connection = https(server, pki)
    connection.request("POST", "/api/notes", body=b'{"text": "over tls"}',
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    created = response.read()
    assert response.status == 201, created
    note_id = re.search(rb'"id"\s*:\s*"?([^",}]+)', created).group(1).decode()
    # a large body (the reactor buffers it across many TLS records), then the same connection
    # goes on: its framing held
    text = "x" * 200000
    connection.request("POST", "/api/notes", body=('{"text": "%s"}' % text).encode(),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    assert response.status in (201, 413, 400)
    connection.request("GET", "/api/notes/" + note_id)
    response = connection.getresponse()
    assert response.status == 200 and b"over tls" in response.read()
    connection.close()


def test_static_files_ranges_and_304_over_tls(start_server, pki, big_pages):
    pages, data = big_pages
    server = start_tls(start_server, pki, pages_dir=pages)
    connection = https(server, pki, timeout=30)
    connection.request("GET", "/big.bin")
    response = connection.getresponse()
    body = response.read()
    assert response.status == 200 and len(body) == BIG_BYTES
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    etag = response.getheader("ETag")
    connection.request("GET", "/big.bin", headers={"Range": "bytes=5000000-5999999"})
    response = connection.getresponse()
    assert response.status == 206
    assert response.read() == data[5000000:6000000]
    connection.request("GET", "/big.bin", headers={"If-None-Match": etag})
    response = connection.getresponse()
    assert (response.status, response.read()) == (304, b"")
    connection.request("GET", "/")   # and the connection is still in step
    assert b"home" in connection.getresponse().read()
    connection.close()
    # curl, with the test CA: keep-alive across two URLs, and the big file byte-exact
    result = subprocess.run(
        ["curl", "-sS", "--cacert", pki["ca"], "-o", "/dev/null", "-o", "-",
         "-w", "%{num_connects} %{http_version}\\n",
         "https://localhost:%d/big.bin" % server.tls_port,
         "https://localhost:%d/big.bin" % server.tls_port], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # -w's line follows each transfer: the first body went to /dev/null
    assert result.stdout == b"1 1.1\n" + data + b"0 1.1\n"   # 0 new connects: kept alive


def test_slow_reader_over_tls_is_finished_by_the_reactor(start_server, pki, big_pages):
    """With one worker: a client that stops reading a 10 MiB file must not hold it (the
    reactor finishes the response); another client is served meanwhile; the slow one then
    gets every byte."""
    pages, data = big_pages
    server = start_tls(start_server, pki, pages_dir=pages, worker_threads=1,
                       worker_write_s=0.05)
    slow = raw_tls(server.tls_port, pki, rcvbuf=4096, source="127.0.0.2")
    slow.sendall(b"GET /big.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
    first = slow.recv(1000)
    assert first.startswith(b"HTTP/1.1 200")
    time.sleep(0.5)   # the worker's turn (50 ms) is long over: the rest is the reactor's
    started = time.monotonic()
    other = https(server, pki)
    other.request("GET", "/hello")
    assert other.getresponse().read() == b"hello, world\n"
    assert time.monotonic() - started < 2.0
    other.close()
    buffer = first
    _, headers, body, _ = read_response(slow, buffer)
    assert len(body) == BIG_BYTES and body == data
    slow.close()


@pytest.mark.parametrize("tls", [False, True])
def test_a_kept_connection_after_a_body_wait_stays_open(start_server, pki, tls):
    """A request whose body the reactor waited for, then a pause: the connection must wait
    keepalive_timeout_s for the next request (its idle time used to start at 0: closed at
    once, on plain HTTP too)."""
    server = start_tls(start_server, pki)
    for _ in range(5):
        if tls:
            connection = https(server, pki)
        else:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        # http.client sends the head and the body in two writes: the body is waited for
        connection.request("POST", "/api/notes", body=b'{"text": "a"}',
                           headers={"Content-Type": "application/json"})
        assert connection.getresponse().read()
        time.sleep(0.1)
        connection.request("GET", "/hello")
        assert connection.getresponse().read() == b"hello, world\n"
        connection.close()


def test_streamed_response_and_large_upload_over_tls_to_slow_peers(start_server, pki):
    """A streamed (chunked) response whose reader is slow, and a body larger than
    buffer_body_bytes that its handler reads as it comes: both wait on a TLS socket (the
    worker's paced waits, then the reactor's finishing of the rest)."""
    from handlers._core import Response
    piece = os.urandom(32 * 1024)

    def stream(request):
        response = Response(b"", 200, [("Content-Type", "application/octet-stream")])
        # 8 MiB: past what the socket holds, so the reactor sends some of it between turns
        response.stream = (piece for _ in range(256))
        return response

    def upload(request):
        return Response(hashlib.sha256(request.body()).hexdigest().encode(), 200)

    server = start_tls(start_server, pki, routes=[("GET", "/t/stream", stream),
                                                  ("POST", "/t/upload", upload)],
                       worker_write_s=0.05, buffer_body_bytes=65536, max_body_bytes=4194304)
    with raw_tls(server.tls_port, pki, rcvbuf=4096, source="127.0.0.2") as slow:
        slow.sendall(b"GET /t/stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
        time.sleep(0.5)
        received = b""
        while not received.endswith(b"\r\n0\r\n\r\n"):
            data = slow.recv(1 << 20)
            assert data, "closed mid-stream"
            received += data
        body, chunked = b"", received.split(b"\r\n\r\n", 1)[1]
        while True:
            size, _, chunked = chunked.partition(b"\r\n")
            size = int(size, 16)
            if not size:
                break
            body, chunked = body + chunked[:size], chunked[size + 2:]
        assert body == piece * 256
    data = os.urandom(3 * 1024 * 1024)
    with raw_tls(server.tls_port, pki, source="127.0.0.3") as uploader:
        uploader.sendall(b"POST /t/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d"
                         b"\r\n\r\n" % len(data))
        for start in range(0, len(data), 256 * 1024):
            uploader.sendall(data[start:start + 256 * 1024])
            time.sleep(0.01)
        status, _, answer, _ = read_response(uploader, b"")
        assert (status, answer) == (200, hashlib.sha256(data).hexdigest().encode())


# --- abuse and confusion --------------------------------------------------------------------

def test_half_handshake_flood_does_not_stop_a_normal_client(start_server, pki):
    server = start_tls(start_server, pki, worker_threads=2, header_timeout_s=1.5)
    hello = client_hello()
    flood = []
    try:
        for index in range(300):
            sock = socket.socket()
            sock.bind(("127.0.0.%d" % (2 + index % 3), 0))
            sock.settimeout(5)
            sock.connect(("127.0.0.1", server.tls_port))
            sock.sendall(hello[:len(hello) // 2])
            flood.append(sock)
        started = time.monotonic()
        for _ in range(3):
            connection = https(server, pki, timeout=5)
            connection.request("GET", "/hello")
            assert connection.getresponse().read() == b"hello, world\n"
            connection.close()
        assert time.monotonic() - started < 3.0
        # and the half handshakes are closed when header_timeout_s is up
        time.sleep(1.6)
        closed = 0
        for sock in flood:
            try:
                closed += sock.recv(100) == b""
            except (ConnectionResetError, socket.timeout):
                closed += 1
        assert closed == len(flood)
    finally:
        for sock in flood:
            sock.close()


def test_plain_http_to_the_tls_port_is_closed_at_once(start_server, pki):
    server = start_tls(start_server, pki, header_timeout_s=10.0)
    with socket.create_connection(("127.0.0.1", server.tls_port), 5) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            answer = sock.recv(1000)
        except ConnectionResetError:
            answer = b""
        assert time.monotonic() - started < 1.0
        assert not answer.startswith(b"HTTP/1.1 200")


def test_tls_to_the_plain_port_gets_400_at_once(start_server, pki):
    server = start_tls(start_server, pki, header_timeout_s=10.0)
    with socket.create_connection(("127.0.0.1", server.port), 5) as sock:
        started = time.monotonic()
        sock.sendall(client_hello())
        answer = sock.recv(1000)
        assert time.monotonic() - started < 1.0
        assert answer.startswith(b"HTTP/1.1 400 ")


# --- redirect and HSTS ------------------------------------------------------------------------

def test_plain_listener_redirects_except_acme_challenge(start_server, pki, big_pages):
    pages, _ = big_pages
    server = start_tls(start_server, pki, pages_dir=pages, **{"tls.redirect_http": "on"})
    plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    plain.request("GET", "/hello?x=1&y=%20", headers={"Host": "localhost:%d" % server.port})
    response = plain.getresponse()
    response.read()
    assert response.status == 301
    assert response.getheader("Location") == \
        "https://localhost:%d/hello?x=1&y=%%20" % server.tls_port
    assert response.getheader("Strict-Transport-Security") is None
    plain.request("GET", "/.well-known/acme-challenge/token123")
    response = plain.getresponse()
    assert (response.status, response.read()) == (200, b"token123.thumbprint\n")
    plain.close()
    connection = https(server, pki)
    connection.request("GET", "/hello")
    assert connection.getresponse().read() == b"hello, world\n"   # HTTPS is not redirected
    connection.close()


def test_redirect_port_and_a_bad_host_field(start_server, pki):
    server = start_tls(start_server, pki, **{"tls.redirect_http": "on", "tls.redirect_port": 443})
    plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    plain.request("GET", "/a/b", headers={"Host": "example.org:80"})
    response = plain.getresponse()
    response.read()
    assert response.getheader("Location") == "https://example.org/a/b"   # 443: no port
    plain.request("GET", "/", headers={"Host": "bad_host\"x"})
    response = plain.getresponse()
    response.read()
    location = response.getheader("Location") or ""
    assert response.status in (301, 400) and '"' not in location


def test_hsts_only_when_configured_and_only_over_tls(start_server, pki):
    server = start_tls(start_server, pki)
    connection = https(server, pki)
    connection.request("GET", "/hello")
    response = connection.getresponse()
    response.read()
    assert response.getheader("Strict-Transport-Security") is None
    connection.close()
    server = start_tls(start_server, pki, **{"tls.hsts_max_age_s": 300,
                                             "tls.hsts_include_subdomains": "on"})
    connection = https(server, pki)
    for _ in range(2):   # added once, however often the response is built
        connection.request("GET", "/hello")
        response = connection.getresponse()
        response.read()
        assert response.getheader("Strict-Transport-Security") == \
            "max-age=300; includeSubDomains"
        assert len([1 for name, _ in response.getheaders()
                    if name.lower() == "strict-transport-security"]) == 1
    connection.close()
    plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    plain.request("GET", "/hello")
    response = plain.getresponse()
    response.read()
    assert response.getheader("Strict-Transport-Security") is None
    plain.close()


def test_expiry_warning_at_start(start_server, pki):
    server = start_tls(start_server, pki, name="soon")
    assert "expires on" in server.error_text() and pki["soon"][0] in server.error_text()
    quiet = start_tls(start_server, pki, name="soon", **{"tls.expiry_warning_days": 2})
    assert "expires on" not in quiet.error_text()
    # and the expiry is a metric, for an alert that does not depend on reading logs
    import urllib.request
    from onebox.tls import not_after
    scrape = urllib.request.urlopen(server.admin_url + "metrics", timeout=10).read().decode()
    assert "onebox_tls_certificate_expiry_timestamp_seconds %d" % int(not_after(pki["soon"][0])) \
        in scrape
    assert 'onebox_connections{state="handshake"} 0' in scrape


# --- start-up refusals ------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "mismatched", "expired", "not_pem"])
def test_start_up_refuses_an_unservable_pair_naming_the_file(tmp_path, pki, case):
    cert, key = pki["a"]
    words = []
    if case == "missing":
        cert = str(tmp_path / "nowhere.pem")
        words = [cert, "cannot be read"]
    elif case == "mismatched":
        key = pki["b"][1]
        words = [key, "does not match"]
    elif case == "expired":
        cert = pki["expired"][0]
        words = [cert, "expired on 2020-02-01"]
    else:
        cert = str(tmp_path / "junk.pem")
        with open(cert, "w") as junk:
            junk.write("not a certificate\n")
        words = [cert, "no PEM certificate"]
    for extra in (["--check"], ["--port", "0", "--data-dir", str(tmp_path / "data")]):
        result = subprocess.run([sys.executable, SERVER, "--tls-cert-file", cert,
                                 "--tls-key-file", key] + extra,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 1, (extra, result.stdout, result.stderr)
        for word in words:
            assert word in result.stderr
        assert "Traceback" not in result.stderr
    with pytest.raises(Exception) as raised:   # and the server object refuses too
        onebox.make_server(config={"tls.cert_file": cert, "tls.key_file": key},
                           data_dir=tmp_path / "data2")
    assert type(raised.value).__name__ == "TLSConfigError"


# --- reload -------------------------------------------------------------------------------------

class Process:
    """python3 server.py with TLS on port 0 (through the server_process fixture): its ports,
    its error log (stderr) as it grows."""

    def __init__(self, server_process, tmp_path, cert, key, pages=None):
        self.cert, self.key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
        install(cert, key, self.cert, self.key)
        flags = ["--tls-cert-file", self.cert, "--tls-key-file", self.key,
                 "--worker-write-s", "0.05"]
        if pages is not None:
            flags += ["--pages-dir", str(pages)]
        self.process = server_process(*flags)
        self.process.wait_for(r"^listening on https://")
        lines = self.process.out_lines()[:2]
        self.port = int(re.match(r"listening on http://127\.0\.0\.1:(\d+)/$", lines[0]).group(1))
        self.tls_port = int(re.match(r"listening on https://127\.0\.0\.1:(\d+)/$",
                                     lines[1]).group(1))

    def error_text(self):
        return self.process.err_text()

    def wait_for_log(self, text, timeout=10):
        self.process.wait_for(re.escape(text), "err", timeout=timeout)

    def stop(self):
        self.returncode = self.process.stop(15)


def install(cert, key, cert_path, key_path):
    """Replace the files as certbot does: whole, never half-written."""
    for source, target in ((cert, cert_path), (key, key_path)):
        with open(source, "rb") as handle:
            data = handle.read()
        with open(target + ".tmp", "wb") as handle:
            handle.write(data)
        os.replace(target + ".tmp", target)


def test_sighup_loads_a_new_certificate_for_new_connections(tmp_path, server_process, pki,
                                                            big_pages):
    pages, data = big_pages
    server = Process(server_process, tmp_path, *pki["a"], pages=pages)
    try:
        # an old connection, in the middle of a 10 MiB download the reactor finishes
        old = raw_tls(server.tls_port, pki, rcvbuf=4096)
        assert fingerprint(old) == pem_fingerprint(pki["a"][0])
        old.sendall(b"GET /big.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = old.recv(1000)
        install(*pki["b"], server.cert, server.key)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log("tls: certificate loaded from")
        with raw_tls(server.tls_port, pki) as new:
            assert fingerprint(new) == pem_fingerprint(pki["b"][0])
        _, _, body, _ = read_response(old, first)
        assert body == data   # finished on the old certificate's connection
        old.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")   # and it goes on
        assert read_response(old, b"")[2] == b"hello, world\n"
        old.close()
        # a key that does not match: the running pair stays, and the log says why
        install(pki["a"][0], pki["b"][1], server.cert, server.key)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log("kept the previous certificate")
        assert "does not match" in server.error_text()
        with raw_tls(server.tls_port, pki) as new:
            assert fingerprint(new) == pem_fingerprint(pki["b"][0])
        assert server.process.poll() is None
    finally:
        server.stop()
    assert server.returncode == 0, server.error_text()


def test_reload_warns_of_a_certificate_near_expiry(tmp_path, server_process, pki):
    server = Process(server_process, tmp_path, *pki["a"])
    try:
        assert "expires on" not in server.error_text()
        install(*pki["soon"], server.cert, server.key)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log("expires on")
        with raw_tls(server.tls_port, pki) as new:
            assert fingerprint(new) == pem_fingerprint(pki["soon"][0])
    finally:
        server.stop()


def test_smoke_script_over_https_with_a_custom_ca(start_server, pki):
    server = start_tls(start_server, pki)
    url = "https://localhost:%d" % server.tls_port
    result = subprocess.run(["bash", os.path.join(ROOT, "tests", "smoke.sh"), "--cacert",
                             pki["ca"], url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all smoke checks passed" in result.stdout
    without = subprocess.run(["bash", os.path.join(ROOT, "tests", "smoke.sh"), url],
                             capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, CURL_CA_BUNDLE=""))
    assert without.returncode != 0   # curl refuses a certificate it cannot verify


# --- testssl.sh ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("testssl"),
                    reason="testssl.sh is not installed (.ci/run installs the Debian package)")
def test_testssl_finds_nothing_at_medium_or_above(start_server, pki, tmp_path):
    """testssl.sh's scan (--fast: about a minute): only TLS 1.2 and 1.3 offered, and no
    finding of severity MEDIUM, HIGH or CRITICAL. The test CA is added to its trust store."""
    # HSTS as a production site would send it (testssl.sh wants 180 days or more)
    server = start_tls(start_server, pki, name="scan", **{"tls.hsts_max_age_s": 31536000})
    report = tmp_path / "testssl.json"
    result = subprocess.run(
        ["testssl", "--quiet", "--color", "0", "--warnings", "off", "--fast", "--add-ca",
         pki["ca"], "--jsonfile", str(report), "localhost:%d" % server.tls_port],
        capture_output=True, text=True, timeout=600)
    findings = json.loads(report.read_text())
    by_id = {finding["id"]: finding for finding in findings}
    serious = ["%s %s: %s" % (finding["severity"], finding["id"], finding["finding"])
               for finding in findings
               if finding["severity"] in ("MEDIUM", "HIGH", "CRITICAL")]
    assert not serious, (serious, result.stdout[-3000:])
    for protocol in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert by_id[protocol]["finding"].startswith("not offered"), by_id[protocol]
    for protocol in ("TLS1_2", "TLS1_3"):
        assert by_id[protocol]["finding"].startswith("offered"), by_id[protocol]
    assert by_id["ALPN"]["finding"] == "http/1.1"


# --- socket activation ----------------------------------------------------------------------------

def test_socket_activation_passes_an_https_socket(server_process, pki):
    """systemd's LISTEN_FDNAMES=http:https: both passed sockets are served, the second with
    TLS (onebox.socket's FileDescriptorName=https)."""
    from test_systemd import activated
    held = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        held.append(sock)
    cert, key = pki["a"]
    code = None
    try:
        process = activated(server_process, held, names=["http", "https"],
                            flags=["--tls-cert-file", cert, "--tls-key-file", key,
                                   "--admin-port", "off"])
        process.wait_for(r"^listening on https://")
        lines = process.out_lines()[:2]
        assert lines == ["listening on http://127.0.0.1:%d/" % held[0].getsockname()[1],
                         "listening on https://127.0.0.1:%d/" % held[1].getsockname()[1]], \
            (lines, process.err_text())
        with raw_tls(held[1].getsockname()[1], pki) as tls:
            tls.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_response(tls, b"")[2] == b"hello, world\n"
        code = process.stop()
    finally:
        for sock in held:
            sock.close()
    assert code == 0


def test_a_session_cookie_over_tls_is_secure_and_host_prefixed(start_server, pki):
    def remember(request):
        request.session["seen"] = True
        return {"secure": request.secure}

    server = start_tls(start_server, pki, routes=[("POST", "/t/remember", remember)])
    connection = https(server, pki)
    connection.request("POST", "/t/remember", headers={"Sec-Fetch-Site": "same-origin"})
    response = connection.getresponse()
    assert response.read() == b'{"secure":true}'
    cookie = [part.strip() for part in response.getheader("set-cookie").split(";")]
    assert cookie[0].startswith("__Host-onebox_session=") and "Secure" in cookie
    assert {"HttpOnly", "SameSite=Lax", "Path=/"} <= set(cookie)
    connection.close()
    # the plain listener of the same server: no Secure, no prefix (X-Forwarded-Proto from a
    # client that is not a trusted proxy is not believed)
    plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10,
                                       source_address=("127.0.0.2", 0))
    plain.request("POST", "/t/remember", headers={"Sec-Fetch-Site": "same-origin",
                                                  "X-Forwarded-Proto": "https"})
    response = plain.getresponse()
    assert response.read() == b'{"secure":false}'
    assert response.getheader("set-cookie").startswith("onebox_session=")
    plain.close()
