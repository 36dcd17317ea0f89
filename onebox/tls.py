"""HTTPS: the TLS policy, the certificate's checks, and the socket a TLS connection is served by.

What this module owns:

* ``build_context(tls_settings)``: an ``ssl.SSLContext`` for the server side, to Mozilla's
  "intermediate" profile (https://wiki.mozilla.org/Security/Server_Side_TLS, version 5.7):
  TLS 1.2 and 1.3 only; for TLS 1.2 only ECDHE key exchange with AEAD ciphers (AES-GCM,
  ChaCha20-Poly1305), so every session is forward-secret; the server's cipher order (it only
  matters for 1.2, and every cipher offered is strong); no compression (CRIME, RFC 7457 2.6);
  no renegotiation (a client could make the server redo the costly half of a handshake at
  will); ALPN "http/1.1" only (h2 is never advertised: onebox speaks HTTP/1.1).
  The certificate and key are loaded and checked here, so that a missing or unreadable file,
  a key that does not match the certificate, or an expired certificate stops start-up (and
  ``--check``) with the file named and the fix (``TLSConfigError``).
* **Session tickets are off** (OP_NO_TICKET, and ``num_tickets = 0`` for TLS 1.3). The ssl
  module cannot rotate ticket keys (OpenSSL's ticket-key callback is not exposed), so a key
  would live as long as the process, and anyone who read it from memory could decrypt every
  TLS 1.2 session resumed under it: that undoes forward secrecy (Mozilla's nginx template
  sets ``ssl_session_tickets off`` for this reason). So a new connection makes a full
  handshake (testssl.sh reports no resumption, by ticket or by session ID, from the ssl
  module's server), which keep-alive makes rare. No tickets also spares each TLS 1.3
  handshake the two tickets OpenSSL would encrypt and send after it.
* ``not_after(cert_file)``: the certificate's expiry, read from the PEM file's first
  certificate with ``ssl.PEM_cert_to_DER_cert`` and a few lines of DER (RFC 5280 4.1): public
  stdlib only (``ssl._ssl._test_decode_cert`` would do it, but it is private and may go).
* ``TLSSocket``: what a TLS connection's ``Connection.sock`` is. The runtime's code for plain
  sockets reads with ``recv(n, MSG_DONTWAIT)``, writes with a blocking ``send`` bounded by
  SO_SNDTIMEO (``worker_write_s``), or non-blocking in the reactor, and hands a socket to
  ``poll``/``epoll`` by its descriptor. An ``ssl.SSLSocket`` refuses flags, raises
  SSLWantRead/WriteError instead of BlockingIOError, and, blocking, retries a write that the
  client does not take forever (SO_SNDTIMEO's EAGAIN is retried by the ssl module). So the
  SSLSocket is kept non-blocking always, and ``TLSSocket`` gives the plain socket's
  behaviour on top of it: the plain path pays nothing (the choice is made once, at accept,
  by which listener took the connection), and only the TLS path pays one Python call per
  recv or send.

Threads: none of its own; a TLSSocket is used by the thread that owns its connection.
Imports only the standard library.
"""
import re
import select
import socket
import ssl
import time

# Mozilla intermediate, TLS 1.2 part, without the DHE suites (no DH parameters are loaded,
# and ECDHE is what every client of the last decade uses). TLS 1.3's suites are all AEAD:
# OpenSSL's defaults are kept.
CIPHERS_TLS12 = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305"))
ALPN = ["http/1.1"]
# A file over TLS is read and encrypted this much at a time (sendfile cannot encrypt): large
# enough that the Python calls per MiB are few (16 records a call), small enough that a
# thousand slow readers cost 256 MiB at most, one chunk each.
FILE_CHUNK_BYTES = 256 * 1024

_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_FIX = ("set [tls] cert_file and key_file (--tls-cert-file, --tls-key-file) to a PEM "
        "certificate chain and its private key, readable by the server's user")


class TLSConfigError(Exception):
    """The certificate or key cannot be served; the message names the file and the fix."""


def build_context(tls_settings, now=None):
    """A server-side SSLContext for [tls] (see the module docstring), and the certificate's
    expiry (seconds since the epoch). Raises TLSConfigError."""
    cert_file = tls_settings.cert_file
    key_file = tls_settings.key_file or cert_file
    for what, path in (("cert_file", cert_file), ("key_file", key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            raise TLSConfigError("[tls] %s %s cannot be read: %s; %s"
                                 % (what, path, error.strerror or error, _FIX)) from None
    expires = not_after(cert_file)
    if now is None:
        now = time.time()
    if expires <= now:
        raise TLSConfigError(
            "[tls] cert_file %s expired on %s; renew it (certbot renew) or point cert_file at "
            "the renewed one" % (cert_file, _utc(expires)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(CIPHERS_TLS12)
    context.options |= (ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
                        | ssl.OP_NO_TICKET | getattr(ssl, "OP_NO_RENEGOTIATION", 0))
    if hasattr(context, "num_tickets"):
        context.num_tickets = 0   # TLS 1.3: no tickets (see the module docstring)
    context.set_alpn_protocols(ALPN)
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as error:
        reason = (error.reason or str(error)).upper()
        if "MISMATCH" in reason:
            raise TLSConfigError(
                "[tls] key_file %s does not match the certificate in cert_file %s; give the "
                "key the certificate was issued for (certbot: privkey.pem beside "
                "fullchain.pem)" % (key_file, cert_file)) from None
        raise TLSConfigError("[tls] cert_file %s / key_file %s cannot be loaded (%s); %s"
                             % (cert_file, key_file, error.reason or error, _FIX)) from None
    except OSError as error:
        raise TLSConfigError("[tls] cert_file %s / key_file %s cannot be loaded: %s; %s"
                             % (cert_file, key_file, error, _FIX)) from None
    return context, expires


def expiry_warning(cert_file, expires, warn_days, now=None):
    """A log line if the certificate expires within ``warn_days`` (0: never warn); else None."""
    left = expires - (time.time() if now is None else now)
    if warn_days and left < warn_days * 86400:
        return ("[tls] cert_file %s expires on %s, in %.1f days: renew it (certbot renew), "
                "then reload (systemctl reload onebox)" % (cert_file, _utc(expires),
                                                           left / 86400))
    return None


def _utc(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


# --- the certificate's expiry, from DER (RFC 5280 section 4.1) ----------------------------

def not_after(cert_file):
    """The notAfter of the first certificate in the PEM file ``cert_file``, in seconds since
    the epoch. Raises TLSConfigError if there is none or it cannot be read."""
    try:
        with open(cert_file, "rb") as handle:
            text = handle.read()
    except OSError as error:
        raise TLSConfigError("[tls] cert_file %s cannot be read: %s; %s"
                             % (cert_file, error.strerror or error, _FIX)) from None
    match = _PEM_CERT_RE.search(text)
    if match is None:
        raise TLSConfigError("[tls] cert_file %s holds no PEM certificate (-----BEGIN "
                             "CERTIFICATE-----); %s" % (cert_file, _FIX))
    try:
        der = ssl.PEM_cert_to_DER_cert(match.group(0).decode("ascii"))
        return _validity_end(der)
    except (ValueError, IndexError, UnicodeDecodeError) as error:
        raise TLSConfigError("[tls] cert_file %s: its certificate cannot be decoded (%s); %s"
                             % (cert_file, error, _FIX)) from None


def _der_item(data, pos):
    """(tag, start of contents, end of contents) of the DER item at ``pos``."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _validity_end(der):
    """Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    serialNumber, signature AlgorithmIdentifier, issuer Name, validity SEQUENCE { notBefore,
    notAfter }, ... } ... }"""
    _, pos, _ = _der_item(der, 0)             # Certificate
    _, pos, _ = _der_item(der, pos)           # tbsCertificate
    tag, _, end = _der_item(der, pos)
    if tag == 0xA0:                           # [0] EXPLICIT version
        pos = end
    for _ in range(3):                        # serialNumber, signature, issuer
        _, _, pos = _der_item(der, pos)
    tag, pos, _ = _der_item(der, pos)         # validity
    if tag != 0x30:
        raise ValueError("no validity")
    _, _, pos = _der_item(der, pos)           # notBefore
    tag, start, end = _der_item(der, pos)     # notAfter: UTCTime (23) or GeneralizedTime (24)
    text = der[start:end].decode("ascii")
    if tag == 0x17:   # YYMMDDHHMMSSZ; RFC 5280 4.1.2.5.1: YY >= 50 is 19YY
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text
    elif tag != 0x18:
        raise ValueError("notAfter is not a time")
    if not text.endswith("Z") or len(text) != 15:
        raise ValueError("notAfter %r is not YYYYMMDDHHMMSSZ" % text)
    import calendar
    return float(calendar.timegm(time.strptime(text[:14], "%Y%m%d%H%M%S")))


# --- the connection's socket --------------------------------------------------------------

class TLSSocket:
    """A handshaken-or-handshaking ``ssl.SSLSocket`` (always non-blocking underneath) with the
    behaviour the runtime's plain-socket code expects (see the module docstring):

    ``recv(n, flags)``  bytes, b"" at the client's close or a broken connection's, or
                        BlockingIOError when nothing is there yet (any flags).
    ``send(data, flags)`` in "blocking" mode (``setblocking(True)``, the workers') waits up to
                        ``send_timeout`` for room, then BlockingIOError, as SO_SNDTIMEO does;
                        with MSG_DONTWAIT or in non-blocking mode (the reactor's), one try.
                        A write that raised is retried by the caller with the same bytes, as
                        OpenSSL requires (the ssl module sets ACCEPT_MOVING_WRITE_BUFFER, so
                        the same bytes in another buffer are fine).
    ``tls = True``      for the few places that choose by it: files are read and sent in
                        FILE_CHUNK_BYTES pieces, never with sendfile.
    """

    __slots__ = ("ssl", "blocking", "send_timeout")
    tls = True

    def __init__(self, ssl_socket, send_timeout):
        self.ssl = ssl_socket
        self.blocking = True
        self.send_timeout = send_timeout

    def fileno(self):
        return self.ssl.fileno()

    def do_handshake(self):
        self.ssl.do_handshake()

    def recv(self, size, flags=0):
        sock = self.ssl
        try:
            data = sock.recv(size)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError("no TLS record yet") from None
        except ssl.SSLZeroReturnError:   # the client's close_notify
            return b""
        except ssl.SSLError:
            return b""   # a bad record (or a cut one): the connection is done
        if data and sock.pending():   # decrypted bytes epoll cannot see: take them now
            data += sock.recv(sock.pending())
        return data

    def send(self, data, flags=0):
        """All of ``data`` (OpenSSL writes whole buffers, not parts), or BlockingIOError. A
        blocking send gives up after ``send_timeout`` in all: a plain socket's blocking send
        returns what it sent when SO_SNDTIMEO passes, and an OpenSSL write can only report
        all or nothing, so the caller keeps the whole buffer for the retry."""
        sock = self.ssl
        deadline = None
        while True:
            try:
                return sock.send(data)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                if not self.blocking or flags & socket.MSG_DONTWAIT:
                    raise BlockingIOError("the client takes nothing now") from None
            except ssl.SSLError as error:
                raise ConnectionResetError(str(error)) from None
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.send_timeout
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if now >= deadline or not poller.poll((deadline - now) * 1000):
                raise BlockingIOError("the client took too little within worker_write_s")

    def setblocking(self, flag):
        self.blocking = flag   # the SSLSocket itself stays non-blocking

    def setsockopt(self, *args):
        self.ssl.setsockopt(*args)

    def getsockopt(self, *args):
        return self.ssl.getsockopt(*args)

    def getpeercert(self, binary_form=False):
        return self.ssl.getpeercert(binary_form)

    def shutdown(self, how):
        """SHUT_WR, the reactor's graceful close of a connection it owns: TLS's close_notify
        (RFC 8446 6.1) if the socket takes it now, then the TCP shutdown. SHUT_RDWR, what the
        reactor does to a connection a worker may be using (to wake or cut it): the TCP
        shutdown only, since an SSL object must never be used by two threads at once."""
        sock = self.ssl
        if how == socket.SHUT_WR:
            try:
                sock.unwrap()   # sends close_notify; waiting for the client's is not needed
            except (OSError, ValueError):
                pass
        socket.socket.shutdown(sock, how)

    def close(self):
        self.ssl.close()
