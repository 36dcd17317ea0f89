"""Static pages: the files under pages_dir, served as nginx serves them.

Part of the runtime, not an area: the engine builds one ``StaticPages`` and calls
``serve(request)`` from its worker threads for unrouted GET and HEAD requests, and
``not_found(request)`` for a 404. Imports the standard library, the handler contract and the
codec's ``error_response``; never the engine or ``server``. Everything here is safe to call
from many workers at once. About 900 lines, as one module: the five steps below read and fill
the same cache entries, and their invariants (at the end) hold only if read together.

What a request goes through (``StaticPages.serve``):

1. **Find the file** for the URL path (``_lookup``): a cached entry is reused while its file
   has the same size, mtime_ns and inode (shown by a ``stat()`` for bytes held in memory, by an
   ``fstat()`` after the open for a file served from disk); how the URL maps to a file
   (symlinks, index.html, clean URLs) is trusted for ``path_recheck_s``, then resolved again.
2. **Pick the representation** (``_respond``): a GET with a valid ``Range`` gets the identity
   bytes; otherwise ``Accept-Encoding`` (q-values honoured) chooses among identity, precompressed
   sidecars (``file.br``, ``file.zst``, ``file.gz``) and gzip made on the fly. A request
   without Range and If-* fields (most of them) skips steps 3 and 4.
3. **Preconditions**, in the order of RFC 9110 section 13.2.2: If-Match / If-Unmodified-Since
   (412), then If-None-Match / If-Modified-Since (304).
4. **Ranges** (RFC 9110 section 14), if If-Range allows: one range -> 206, several ->
   multipart/byteranges, none satisfiable -> 416.
5. **The whole representation**: small files from memory with precomputed headers, large ones
   as an open file that the runtime sends with sendfile.

Invariants:

* A file is served only if its real path (symlinks resolved) lies inside pages_dir, unless
  ``follow_symlinks_outside`` is on. No path segment, as requested or as resolved, may start
  with "." except a first segment ".well-known" (RFC 8615; certbot's ``--webroot``).
* Each representation has its own strong ETag; identity's is a hash of inode, size and mtime_ns.
  A precompressed sidecar is used only if it is at least as new as the file it compresses.
* The file and gzip caches are bounded in bytes and evict the least recently used entry
  first; the remembered choices of coding (``_choose``) are bounded in number and length and
  start afresh when full.
"""
import calendar
import collections
import datetime
import email.utils
import functools
import hashlib
import html
import os
import re
import stat
import threading
import time
import urllib.parse
import zlib

from handlers._core import HTTPError, Response
from onebox.codec import BAD_VALUE_RE, TOKEN_RE, error_response

__all__ = ["StaticPages", "compile_policy", "static_hit", "MIME_TYPES", "STATIC_METHODS"]

STATIC_METHODS = "GET, HEAD, OPTIONS"

MIME_TYPES = {
    ".html": "text/html; charset=utf-8", ".htm": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".json": "application/json",
    ".map": "application/json", ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8", ".csv": "text/csv; charset=utf-8",
    ".xml": "application/xml", ".rss": "application/rss+xml", ".atom": "application/atom+xml",
    ".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".gif": "image/gif", ".webp": "image/webp", ".avif": "image/avif",
    ".ico": "image/vnd.microsoft.icon", ".pdf": "application/pdf", ".woff": "font/woff",
    ".woff2": "font/woff2", ".ttf": "font/ttf", ".otf": "font/otf", ".wasm": "application/wasm",
    ".mp4": "video/mp4", ".webm": "video/webm", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
    ".zip": "application/zip", ".gz": "application/gzip", ".br": "application/octet-stream",
    ".zst": "application/zstd", ".webmanifest": "application/manifest+json",
}
DEFAULT_TYPE = "application/octet-stream"

# Worth compressing: text, and binary formats that are not compressed already.
_COMPRESSIBLE_PREFIXES = ("text/",)
_COMPRESSIBLE_TYPES = frozenset([
    "application/json", "application/xml", "application/rss+xml", "application/atom+xml",
    "application/manifest+json", "application/wasm", "image/svg+xml",
    "image/vnd.microsoft.icon", "font/ttf", "font/otf",
])
# (content coding, sidecar suffix), in the order the server prefers them when q-values tie.
# brotli and zstd cannot be produced with the stdlib (before 3.14); their sidecars are sent as-is.
SIDECARS = (("br", ".br"), ("zstd", ".zst"), ("gzip", ".gz"))
GZIP_LEVEL = 6                 # zlib's default: within a few % of 9 at a third of the CPU
GZIP_MIN_SAVING = 0.9          # keep on-the-fly gzip only if it is below 90% of the original
ENTRY_OVERHEAD_BYTES = 1024    # what one cached entry costs besides its bodies (headers, names)
MAX_CHOICES = 256              # Accept-Encoding fields remembered per tuple of codings...
MAX_CHOICE_CHARS = 200         # ...if this short (browsers send ~30): at most 8 x 50 KiB
_GET_HEAD = ("GET", "HEAD")
_TWICE = (1, 2)                # serve's tries: a file changed under us is resolved once more
_BIG = 10 ** 18                # stands in for byte positions too long to be real


class _Stale(Exception):
    """The file changed between the stat that validated an entry and the read that uses it."""


# --- settings that need parsing -------------------------------------------------------------

# Set by the server: framing and the headers this module derives from the file.
_RESERVED_HEADERS = frozenset([
    "content-length", "transfer-encoding", "connection", "keep-alive", "date", "server",
    "content-type", "content-encoding", "content-range", "etag", "last-modified",
    "accept-ranges", "vary", "cache-control",
])


class StaticPolicy:
    """The parsed [static] settings and [static "/path"] sections: the Cache-Control rules,
    the headers added to files, the fallback files of client-side routes.

    Everything here is decided per URL path when a file's entry is built (``cache_control``,
    ``headers_for``) or for a path no file answers (``fallback_for``): never per request."""

    def __init__(self, settings):
        self.html = "max-age=%d, must-revalidate" % settings.html_max_age_s
        self.default = "max-age=%d" % settings.max_age_s
        self.immutable = "max-age=%d, immutable" % settings.immutable_max_age_s
        self.fingerprint = None
        if settings.fingerprint_pattern:
            try:
                self.fingerprint = re.compile(settings.fingerprint_pattern)
            except re.error as error:
                raise ValueError("[static] fingerprint_pattern: not a regular expression: %s"
                                 % error) from None
        self.overrides = sorted(_parse_overrides(settings.cache_control),
                                key=lambda rule: -len(rule[0]))
        self.extra_headers = _parse_extra_headers(settings.extra_headers,
                                                  "[static] extra_headers")
        self.worker_names, self.worker_paths = _parse_worker_scripts(
            settings.service_worker_scripts)
        self.worker_cache_control = _parse_value_setting(
            settings.service_worker_cache_control, "[static] service_worker_cache_control")
        # [static "/path"] sections, longest name first: (name, headers, cache_control,
        # fallback), None where a section leaves the key unset
        self.sections = sorted((_parse_section(name, section)
                                for name, section in getattr(settings, "paths", ())),
                               key=lambda row: -len(row[0]))
        self.fallbacks = any(row[3] is not None for row in self.sections)

    def _section_value(self, url_path, column):
        """The value in ``column`` of the longest section that matches and sets it."""
        for row in self.sections:
            if row[column] is not None and _path_matches(row[0], url_path):
                return row[column]
        return None

    def cache_control(self, url_path, content_type):
        """A [static "/path"] section's first; then service worker scripts (before the
        [static] prefix rules: a broad '/app/ max-age=3600' must not freeze the app's worker);
        the longest [static] cache_control prefix; fingerprinted names, HTML, the rest."""
        value = self._section_value(url_path, 2)
        if value is not None:
            return value
        if self.worker_cache_control is not None and self.is_worker_script(url_path):
            return self.worker_cache_control
        for prefix, value in self.overrides:
            if url_path.startswith(prefix):
                return value
        if self.fingerprint is not None and self.fingerprint.search(url_path.rpartition("/")[2]):
            return self.immutable
        if content_type.startswith("text/html"):
            return self.html
        return self.default

    def is_worker_script(self, url_path):
        return url_path in self.worker_paths or url_path.rpartition("/")[2] in self.worker_names

    def headers_for(self, url_path):
        """[static] extra_headers, with those of the longest section that sets headers (a
        name in both: the section's)."""
        section = self._section_value(url_path, 1)
        if not section:
            return self.extra_headers
        named = {name.lower() for name, _ in section}
        return [item for item in self.extra_headers if item[0].lower() not in named] + section

    def fallback_for(self, url_path):
        """The fallback file's URL path for an unknown ``url_path``, or None."""
        return self._section_value(url_path, 3) if self.fallbacks else None


def compile_policy(settings):
    """Parse the [static] settings; ValueError names the key and the fix."""
    return StaticPolicy(settings)


def _setting_lines(text):
    return [line.strip() for line in text.splitlines() if line.strip()]


def _parse_overrides(text):
    rules = []
    for line in _setting_lines(text):
        prefix, _, value = line.partition(" ")
        value = value.strip()
        if not prefix.startswith("/") or not value or BAD_VALUE_RE.search(value):
            raise ValueError("[static] cache_control: %r must be '/path/prefix VALUE', one rule "
                             "a line (e.g. '/downloads/ no-cache')" % line)
        rules.append((prefix, value))
    return rules


def _parse_extra_headers(text, where):
    headers = []
    for line in _setting_lines(text):
        name, colon, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not TOKEN_RE.fullmatch(name) or BAD_VALUE_RE.search(value):
            raise ValueError("%s: %r must be 'Name: value', one a line" % (where, line))
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError("%s: %s is set by the server; use cache_control for "
                             "Cache-Control" % (where, name))
        headers.append((name, value))
    return headers


def _parse_value_setting(text, where):
    """A header value from a setting (Cache-Control), or None if empty."""
    text = " ".join(_setting_lines(text))
    if BAD_VALUE_RE.search(text):
        raise ValueError("%s: %r is not a header value" % (where, text))
    return text or None


def _parse_worker_scripts(text):
    """[static] service_worker_scripts: (file names, exact /paths)."""
    items = [item for item in re.split(r"[\s,]+", text) if item]
    return (frozenset(item for item in items if not item.startswith("/")),
            frozenset(item for item in items if item.startswith("/")))


# a fallback's URL path: segments without spaces, none empty or starting with "."
_FALLBACK_RE = re.compile(r"(?:/[^/\s.][^/\s]*)+")


def _path_matches(name, url_path):
    """A [static "/path"] section's name: a prefix if it ends in '/', else one path."""
    return url_path.startswith(name) if name.endswith("/") else url_path == name


def _parse_section(name, section):
    """One [static "/path"] section as (name, headers, cache_control, fallback)."""
    where = '[static "%s"]' % name
    headers = cache_control = fallback = None
    if section.headers is not None:
        headers = _parse_extra_headers(section.headers, where + " headers")
    if section.cache_control is not None:
        cache_control = _parse_value_setting(section.cache_control, where + " cache_control")
    if section.fallback:
        fallback = section.fallback.strip()
        if not name.endswith("/"):
            raise ValueError("%s fallback: only a prefix (a name ending in /) has unknown "
                             "paths to fall back from" % where)
        if not _FALLBACK_RE.fullmatch(fallback):
            raise ValueError("%s fallback: %r must be the URL path of a file in pages_dir "
                             "(e.g. /app/index.html)" % (where, fallback))
    return (name, headers, cache_control, fallback)


# --- request header parsing -----------------------------------------------------------------

_QVALUE_RE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")


@functools.lru_cache(maxsize=256)
def parse_accept_encoding(value):
    """'gzip;q=0.8, br' -> {'gzip': 0.8, 'br': 1.0} (RFC 9110 section 12.5.3); None stays None.

    An element with a malformed q-value is dropped; x-gzip means gzip (section 8.4.1.3).
    Memoised: browsers send a handful of distinct values.
    """
    if value is None:
        return None
    prefs = {}
    for element in value.split(","):
        coding, _, params = element.partition(";")
        coding = coding.strip(" \t").lower()
        if not coding:
            continue
        q = 1.0
        for param in params.split(";") if params else ():
            name, _, raw = param.partition("=")
            if name.strip(" \t").lower() == "q":
                raw = raw.strip(" \t")
                q = float(raw) if _QVALUE_RE.fullmatch(raw) else None
        if q is None:
            continue
        prefs.setdefault("gzip" if coding == "x-gzip" else coding, q)
    return prefs


def choose_coding(prefs, available):
    """The content coding to send: the acceptable one with the highest q among ``available``
    (in server preference order, which breaks ties), or "identity".

    No Accept-Encoding means identity (every client accepts it). Identity not named in the
    header stands behind every acceptable coding; named (or via "*"), its q competes. When
    nothing is acceptable, identity is sent anyway (section 12.5.3: a SHOULD, not a 406).
    """
    if not prefs:
        return "identity"
    star = prefs.get("*")
    best, best_q = "identity", 0.0
    for coding in available:
        q = prefs.get(coding, star or 0.0)
        if q > best_q:
            best, best_q = coding, q
    identity_q = prefs.get("identity", star if star is not None else 0.0)
    return "identity" if identity_q > best_q else best


_RANGE_SPEC_RE = re.compile(r"([0-9]*)-([0-9]*)")


def parse_range(value):
    """'bytes=0-99, -500, 1000-' -> [(0, 99), (None, 500), (1000, None)], or None when the
    header must be ignored: another unit (RFC 9110 section 14.2), or bad syntax, including a
    last position before the first (section 14.1.1: the server MAY ignore it, and does)."""
    unit, equals, specs = value.partition("=")
    if not equals or unit.strip(" \t").lower() != "bytes":
        return None
    ranges = []
    for spec in specs.split(","):
        spec = spec.strip(" \t")
        if not spec:
            continue   # empty list elements are allowed and ignored (section 5.6.1)
        match = _RANGE_SPEC_RE.fullmatch(spec)
        if match is None or spec == "-":
            return None
        first, last = (_position(text) for text in match.groups())
        if first is not None and last is not None and last < first:
            return None
        ranges.append((first, last))
    return ranges or None


def _position(digits):
    if not digits:
        return None
    return _BIG if len(digits) > 18 else int(digits)   # int() of 5000 digits raises in 3.11+


def satisfiable_spans(ranges, size):
    """Turn parsed ranges into inclusive (start, end) spans of a ``size``-byte file; ranges
    that cannot be satisfied are dropped (section 14.1.1); [] means 416."""
    spans = []
    for first, last in ranges:
        if first is None:          # suffix: the last ``last`` bytes; -0 is unsatisfiable
            if last and size:
                spans.append((max(0, size - last), size - 1))
        elif first < size:
            spans.append((first, size - 1 if last is None else min(last, size - 1)))
    return spans


def coalesce(spans):
    """Merge overlapping or adjacent spans (sorted); if none touch, keep the client's order
    (RFC 9110 section 15.3.7.2)."""
    ordered = sorted(spans)
    merged = [list(ordered[0])]
    for start, end in ordered[1:]:
        if start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if len(merged) == len(spans):
        return spans
    return [tuple(span) for span in merged]


_ENTITY_TAG_RE = re.compile(r'[ \t]*(W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|$)')


def etag_matches(field, etag, strong):
    """Whether an If-Match / If-None-Match list holds ``etag`` (section 8.8.3.2: strong
    comparison for If-Match, weak for If-None-Match; If-Range holds no list). "*" matches any
    current representation. A malformed list matches nothing."""
    field = field.strip(" \t")
    if field == "*":
        return True
    position = 0
    while position < len(field):
        match = _ENTITY_TAG_RE.match(field, position)
        if match is None or match.end() == position:
            return False
        if match.group(2) == etag and not (strong and match.group(1)):
            return True
        position = match.end()
    return False


_MONTHS = {name: number for number, name in enumerate(
    "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
_MONTH = "(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = "([0-9]{2}):([0-9]{2}):([0-9]{2})"
_IMF_DATE_RE = re.compile(r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), ([0-9]{2}) %s ([0-9]{4}) %s GMT"
                          % (_MONTH, _TIME))
_RFC850_DATE_RE = re.compile(r"(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, ([0-9]{2})-%s-"
                             r"([0-9]{2}) %s GMT" % (_MONTH, _TIME))
_ASCTIME_DATE_RE = re.compile(r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) %s ([ 0-9][0-9]) %s ([0-9]{4})"
                              % (_MONTH, _TIME))


def parse_http_date(value):
    """Seconds since the epoch for the three formats of RFC 9110 section 5.6.7, else None."""
    value = value.strip(" \t")
    match = _IMF_DATE_RE.fullmatch(value)
    if match:
        day, month, year, hour, minute, second = match.groups()
    else:
        match = _RFC850_DATE_RE.fullmatch(value)
        if match:
            day, month, yy, hour, minute, second = match.groups()
            # a two-digit year more than 50 years ahead is in the past century
            this_year = time.gmtime().tm_year
            year = this_year // 100 * 100 + int(yy)
            if year > this_year + 50:
                year -= 100
        else:
            match = _ASCTIME_DATE_RE.fullmatch(value)
            if not match:
                return None
            month, day, hour, minute, second, year = match.groups()
    try:
        moment = datetime.datetime(int(year), _MONTHS[month], int(day), int(hour), int(minute),
                                   min(int(second), 59))
    except ValueError:
        return None
    return calendar.timegm(moment.timetuple())


_PRECONDITION_FIELDS = frozenset(("if-match", "if-none-match", "if-modified-since",
                                  "if-unmodified-since"))
# The fields that can make steps 3 and 4 answer anything but the whole representation (If-Range
# matters only with a Range), and Service-Worker (a worker's script: its own Cache-Control).
# Most requests carry none of them: one test spares a lookup each.
_CONDITIONAL_FIELDS = _PRECONDITION_FIELDS | {"range", "service-worker"}


def _single_date(headers, name):
    """A date precondition field, or None if absent, repeated or not a date (section 13.1.3
    and 13.1.4: such fields are ignored)."""
    lines = headers.get_all(name)
    return parse_http_date(lines[0]) if len(lines) == 1 else None


# --- caches ---------------------------------------------------------------------------------

class ByteBudgetCache:
    """A thread-safe LRU mapping whose values are charged a cost in bytes against a budget."""

    def __init__(self, budget_bytes):
        self.budget = budget_bytes
        self.lock = threading.Lock()     # guards items and used
        self.items = collections.OrderedDict()   # key -> (value, cost)
        self.used = 0

    def get(self, key):
        # acquire/release, not "with": once per static request, and under callgrind (Python
        # 3.11) the with statement's __enter__/__exit__ lookups cost ~1,000 instructions more
        self.lock.acquire()
        try:
            item = self.items.get(key)
            if item is None:
                return None
            self.items.move_to_end(key)
        finally:
            self.lock.release()
        return item[0]

    def put(self, key, value, cost):
        if cost > self.budget:
            return
        with self.lock:
            self._discard_locked(key)
            self.items[key] = (value, cost)
            self.used += cost
            while self.used > self.budget:
                self._discard_locked(next(iter(self.items)))

    def discard(self, key):
        with self.lock:
            self._discard_locked(key)

    def _discard_locked(self, key):
        item = self.items.pop(key, None)
        if item is not None:
            self.used -= item[1]


class Variant:
    """One representation of a file: identity, a sidecar, or gzip made here.

    ``body`` holds the bytes when they are in memory; otherwise ``path`` is opened per request
    and must still have ``sig`` (inode, size, mtime_ns).
    """

    __slots__ = ("coding", "etag", "headers", "headers_304", "body", "path", "sig", "size",
                 "restat")

    def __init__(self, coding, etag, body, path, sig, restat):
        self.coding, self.etag, self.body, self.path, self.sig = coding, etag, body, path, sig
        self.size = sig[1]
        self.restat = restat      # a sidecar in memory is stat'ed per request
        self.headers = self.headers_304 = ()


class FileEntry:
    """A URL path resolved to a regular file: its validators, headers and (small) bytes."""

    __slots__ = ("path", "sig", "recheck_at", "mtime_s", "strong_after", "content_type",
                 "cache_control", "extra_headers", "identity", "sidecars", "codings", "choices",
                 "gzip_on_the_fly", "vary", "cost")


def _sig(st):
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _hash_etag(sig, suffix=""):
    # a hash, not the numbers: an inode says something about the host (Apache's CVE-2003-1418)
    digest = hashlib.blake2b(b"%d-%d-%d" % sig, digest_size=8).hexdigest()
    return '"%s%s"' % (digest, suffix)


# O_NONBLOCK: opening a FIFO swapped in after the stat must not block (it is refused after
# the fstat); it does not affect reads of a regular file
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _open(path):
    return open(os.open(path, _OPEN_FLAGS), "rb", buffering=0)


def _read_checked(path, sig):
    """The whole file, if it still has ``sig``; _Stale otherwise."""
    try:
        with _open(path) as handle:
            st = os.fstat(handle.fileno())
            if _sig(st) != sig or not stat.S_ISREG(st.st_mode):
                raise _Stale(path)
            data = handle.read(sig[1] + 1)
    except OSError:
        raise _Stale(path) from None
    if len(data) != sig[1]:
        raise _Stale(path)
    return data


class OpenFile:
    """A file descriptor with what the runtime uses of ``Response.file``: one ``open`` and one
    ``fstat`` fewer than a Python file object, per request."""

    __slots__ = ("fd",)

    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_checked(variant):
    """``variant``'s file, opened, if it still has the variant's sig; _Stale otherwise."""
    try:
        fd = os.open(variant.path, _OPEN_FLAGS)
    except OSError:
        raise _Stale(variant.path) from None
    handle = OpenFile(fd)
    st = os.fstat(fd)
    if _sig(st) != variant.sig or not stat.S_ISREG(st.st_mode):
        handle.close()
        raise _Stale(variant.path)
    return handle


def _check(variant):
    """_Stale unless ``variant``'s file still has its sig (a stat, for bytes held in memory)."""
    try:
        if _sig(os.stat(variant.path)) == variant.sig:
            return
    except OSError:
        pass
    raise _Stale(variant.path)


def _file_response(handle, status, head, offset, length):
    """An open file for the runtime to send with sendfile (and close)."""
    response = Response(b"", status, head)
    response.file = handle
    response.file_range = (offset, length)
    return response


def _pread_all(handle, offset, length):
    parts = []
    while length > 0:
        piece = os.pread(handle.fileno(), length, offset)
        if not piece:
            raise _Stale("file shrank")
        parts.append(piece)
        offset += len(piece)
        length -= len(piece)
    return b"".join(parts)


def is_compressible(content_type):
    base = content_type.partition(";")[0]
    return base.startswith(_COMPRESSIBLE_PREFIXES) or base in _COMPRESSIBLE_TYPES


# --- the site -------------------------------------------------------------------------------

def static_hit(current, request):
    """Whether ``request`` is a GET or HEAD that the current site (``current.site``: its
    ``router`` and ``static``) answers with an existing static file: no route of its path, a
    file at it. The guard asks (onebox/guard.py, step 6) only of a client past its site-wide
    burst, so that a first visit's burst of files draws on its static allowance; the answer
    costs a route match and the file's look-up, which its serving then finds cached."""
    if request.method not in _GET_HEAD:
        return False
    site = current.site
    route, _, allowed = site.router.match(request.method, request.segments)
    return route is None and allowed is None and site.static.has_file(request)


class StaticPages:
    """Serves the files under ``root`` (see the module docstring).

    For callers: ``serve(request)`` (a Response, or None for "no such page"),
    ``resolve(segments)`` (truthy if the path names something servable: OPTIONS and 405 use
    it), ``not_found_page(request)`` (404.html as a 404 Response, or None).
    """

    def __init__(self, root, settings):
        self.root = os.path.realpath(root)
        self.root_prefix = self.root.rstrip(os.sep) + os.sep
        self.settings = settings
        self.policy = compile_policy(settings)
        self.extra_headers = self.policy.extra_headers
        self.files = ByteBudgetCache(settings.file_cache_bytes)     # URL path -> FileEntry
        self.gzipped = ByteBudgetCache(settings.gzip_cache_bytes)   # identity ETag -> Variant
        self.choices = {}   # entry.codings -> {Accept-Encoding field: coding} (see _choose)

    # -- 1. find the file ------------------------------------------------------------------
    def resolve(self, segments):
        return self._locate(segments)

    def _lookup(self, url_path, segments):
        """A FileEntry, ("redirect",), ("listing", real_dir) or None.

        A cached entry whose bytes are in memory is checked with a stat here; one served from
        its file is not: ``_respond`` checks it with fstat after opening it (one path walk
        fewer), or with a stat when it answers from memory after all (gzip, a sidecar)."""
        entry = self.files.get(url_path)
        if entry is not None and time.monotonic() < entry.recheck_at:
            if entry.identity.body is None:
                return entry
            try:
                st = os.stat(entry.path)
            except OSError:
                pass
            else:   # _sig(st) == entry.sig, without a call: this runs for every page in memory
                if (st.st_ino, st.st_size, st.st_mtime_ns) == entry.sig:
                    return entry
        found = self._locate(segments)
        if found is None or found[0] != "file":
            if entry is not None:
                self.files.discard(url_path)
            return found
        entry = self._build_entry(url_path, found[1], found[2])
        self.files.put(url_path, entry, entry.cost)
        return entry

    def _locate(self, segments):
        """("file", path, stat), ("redirect",), ("listing", real_dir), or None.

        ``path`` is the lexical path under root (what is stat'ed per request); containment and
        dotfiles are checked on the real path.
        """
        for position, segment in enumerate(segments):
            if "/" in segment or "\\" in segment or "\x00" in segment:
                return None
            if segment.startswith(".") and not (position == 0 and segment == ".well-known"):
                return None
        if segments[-1] == "":
            directory = os.path.join(self.root, *segments[:-1])
            real = self._contained(directory)
            if real is None or not os.path.isdir(real):
                return None
            found = self._regular_file(os.path.join(directory, "index.html"))
            if found is None and self.settings.directory_listing:
                return ("listing", real)
            return found
        path = os.path.join(self.root, *segments)
        found = self._regular_file(path)
        if found is None and self.settings.clean_urls:
            found = self._regular_file(path + ".html")
        if found is None:
            real = self._contained(path)
            if real is not None and os.path.isdir(real):
                return ("redirect",)
        return found

    def _regular_file(self, path):
        real = self._contained(path)
        if real is None:
            return None
        try:
            st = os.stat(real)
        except (OSError, ValueError):
            return None
        return ("file", path, st) if stat.S_ISREG(st.st_mode) else None

    def _contained(self, path):
        """The real path if it may be served, else None."""
        real = os.path.realpath(path)
        if real == self.root:
            return real
        if not real.startswith(self.root_prefix):
            return real if self.settings.follow_symlinks_outside else None
        for position, part in enumerate(real[len(self.root_prefix):].split(os.sep)):
            if part.startswith(".") and not (position == 0 and part == ".well-known"):
                return None   # a symlink to a dotfile is a dotfile
        return real

    def _build_entry(self, url_path, path, st):
        settings = self.settings
        entry = FileEntry()
        # bytes: the stat per request (_lookup) then skips encoding it (~270 instructions)
        entry.path, entry.sig = os.fsencode(path), _sig(st)
        entry.recheck_at = time.monotonic() + settings.path_recheck_s
        # Last-Modified must not be later than Date (RFC 9110 section 8.8.2.1)
        entry.mtime_s = min(int(st.st_mtime), int(time.time()))
        # ...and is a strong validator only from a second after the file's own mtime
        # (section 8.8.2.2): a file stamped in the future (clock skew) stays weak until then
        entry.strong_after = st.st_mtime + 1
        content_type = MIME_TYPES.get(os.path.splitext(path)[1].lower(), DEFAULT_TYPE)
        entry.content_type = content_type
        entry.cache_control = self.policy.cache_control(url_path, content_type)
        entry.extra_headers = self.policy.headers_for(url_path)
        body = None
        if st.st_size <= settings.memory_max_file_bytes:
            body = _read_checked(path, entry.sig)
        entry.identity = Variant("identity", _hash_etag(entry.sig), body, path, entry.sig, False)
        entry.sidecars = {}
        if settings.precompressed:
            for coding, suffix in SIDECARS:
                variant = self._sidecar(path + suffix, coding, suffix, st)
                if variant is not None:
                    entry.sidecars[coding] = variant
        entry.gzip_on_the_fly = (settings.gzip and "gzip" not in entry.sidecars
                                 and is_compressible(content_type)
                                 and settings.gzip_min_bytes <= st.st_size
                                 <= settings.gzip_max_file_bytes)
        entry.codings = tuple(coding for coding, _ in SIDECARS if coding in entry.sidecars
                              or (coding == "gzip" and entry.gzip_on_the_fly))
        entry.vary = bool(entry.codings)
        entry.choices = self.choices.setdefault(entry.codings, {})
        for variant in (entry.identity,) + tuple(entry.sidecars.values()):
            self._set_headers(variant, entry)
        entry.cost = ENTRY_OVERHEAD_BYTES + sum(
            len(variant.body or b"") for variant in (entry.identity,) +
            tuple(entry.sidecars.values()))
        return entry

    def _sidecar(self, path, coding, suffix, original):
        """A precompressed copy as a Variant, if it exists, is contained, and is not older
        than the original (a stale .gz after an edit would serve old content)."""
        found = self._regular_file(path)
        if found is None or found[2].st_mtime_ns < original.st_mtime_ns:
            return None
        sig = _sig(found[2])
        body = None
        if sig[1] <= self.settings.memory_max_file_bytes:
            body = _read_checked(path, sig)
        return Variant(coding, _hash_etag(sig, "-" + suffix[1:]), body, path, sig, True)

    def _set_headers(self, variant, entry):
        """Precompute the 200 and 304 heads (RFC 9110 section 15.4.5 lists what a 304 keeps)."""
        validators = [("Last-Modified", email.utils.formatdate(entry.mtime_s, usegmt=True)),
                      ("ETag", variant.etag), ("Cache-Control", entry.cache_control)]
        if entry.vary:
            validators.append(("Vary", "Accept-Encoding"))
        head = [("Content-Type", entry.content_type)]
        if variant.coding != "identity":
            head.append(("Content-Encoding", variant.coding))
        head += validators
        if variant.coding == "identity":
            head.append(("Accept-Ranges", "bytes"))  # ranges are of identity bytes only
        variant.headers = head + entry.extra_headers
        variant.headers_304 = validators + entry.extra_headers

    # -- 2.-5. answer ----------------------------------------------------------------------
    def serve(self, request):
        """The response for an unrouted request, or None if no page answers it."""
        if request.method not in _GET_HEAD:
            raise HTTPError(405, "method not allowed", [("Allow", STATIC_METHODS)])
        for _ in _TWICE:
            try:
                found = self._lookup(request.path, request.segments)
                if type(found) is FileEntry:
                    return self._respond(request, found)
                if found is None:
                    return self._fallback(request) if self.policy.fallbacks else None
                if found[0] == "redirect":
                    return self._redirect(request)
                return self._listing(request, found[1])
            except _Stale:
                self.files.discard(request.path)   # changed under us: resolve once more
        raise HTTPError(503, "file is being updated", [("Retry-After", "1")])

    def _respond(self, request, entry):
        headers = request.headers
        conditional = headers.any_of(_CONDITIONAL_FIELDS)   # else steps 3 and 4 pass it by
        # 2. The representation. A valid Range selects identity: compressed ranges are
        #    useless for resuming, and costly to produce.
        ranges = None
        if conditional and request.method == "GET":   # section 14.2: Range is for GET only
            range_field = headers.get("range")
            if range_field is not None:
                ranges = parse_range(range_field)
        variant = entry.identity
        if entry.codings and ranges is None:
            accept = headers.get("accept-encoding")
            coding = entry.choices.get(accept) or self._choose(entry, accept)
            if coding != "identity":
                variant = entry.sidecars.get(coding) or self._gzip_variant(entry)
        # Still the files that the entry describes? (see _lookup)
        handle = None
        if variant.body is None:   # served from its file: opened, and checked by fstat
            handle = _open_checked(variant)
        elif variant.restat:
            _check(variant)
        if entry.identity.body is None and variant is not entry.identity:
            _check(entry.identity)
        if not conditional and handle is None:
            return Response(variant.body, 200, variant.headers)   # step 5, from memory
        try:
            response = self._answer(request, entry, variant, ranges, handle)
        except BaseException:
            if handle is not None:
                handle.close()
            raise
        if handle is not None and response.file is not handle:
            handle.close()
        if conditional and self.policy.worker_cache_control is not None:
            self._as_worker_script(request, entry, response)
        return response

    def _as_worker_script(self, request, entry, response):
        """A browser fetching a service worker's script says so (Service-Worker: script,
        Service Workers section 4.2 "Update"): it gets [static] service_worker_cache_control
        whatever the file is named (a worker not named in service_worker_scripts)."""
        if (request.headers.get("service-worker") != "script"
                or entry.cache_control == self.policy.worker_cache_control):
            return
        value = self.policy.worker_cache_control
        response.headers = [(name, value if name == "Cache-Control" else field)
                            for name, field in response.headers]

    def _choose(self, entry, accept):
        """The coding for ``accept`` (an Accept-Encoding field, or None), remembered in the
        table of the entries with the same codings: clients send a handful of distinct fields,
        so a request nearly always finds its answer there, one dict lookup (under callgrind
        ~2,000 instructions fewer than choose_coding and parse_accept_encoding's cache). The
        table is a plain dict without a lock, as the re module's cache is: each get, set and
        clear is atomic, and a lost race only chooses again."""
        coding = choose_coding(parse_accept_encoding(accept), entry.codings)
        if accept is None or len(accept) <= MAX_CHOICE_CHARS:
            choices = entry.choices
            if len(choices) >= MAX_CHOICES:
                choices.clear()
            choices[accept] = coding
        return coding

    def _answer(self, request, entry, variant, ranges, handle):
        """Steps 3-5 for a checked representation; ``handle`` is its open file, if it is
        served from one."""
        headers = request.headers
        # 3. Preconditions (section 13.2.2): 412 before 304.
        status = self._preconditions(headers, variant.etag, entry.mtime_s)
        if status == 304:
            return Response(b"", 304, variant.headers_304)
        if status == 412:
            return self._plain(412, "precondition failed", [("ETag", variant.etag)])
        # 4. Ranges, if If-Range (section 13.1.5) says the client's copy is current.
        if ranges is not None and len(ranges) <= self.settings.max_ranges \
                and self._if_range_holds(headers.get("if-range"), entry):
            response = self._ranged(entry, ranges, handle)
            if response is not None:
                return response
        # 5. The whole representation.
        if variant.body is not None:
            return Response(variant.body, 200, variant.headers)
        return _file_response(handle, 200, variant.headers, 0, variant.size)

    def _preconditions(self, headers, etag, mtime_s):
        """304, 412 or None, evaluated as RFC 9110 section 13.2.2 orders them."""
        if not headers.any_of(_PRECONDITION_FIELDS):
            return None
        if_match = headers.get("if-match")
        if if_match is not None:
            if not etag_matches(if_match, etag, strong=True):
                return 412
        else:
            since = _single_date(headers, "if-unmodified-since")
            if since is not None and mtime_s > since:
                return 412
        if_none_match = headers.get("if-none-match")
        if if_none_match is not None:
            return 304 if etag_matches(if_none_match, etag, strong=False) else None
        since = _single_date(headers, "if-modified-since")
        if since is not None and mtime_s <= since:
            return 304
        return None

    def _if_range_holds(self, field, entry):
        """Section 13.1.5: If-Range holds exactly one validator. An entity tag must match
        strongly (so a weak one never does); a date must equal Last-Modified exactly, and
        Last-Modified must be a strong validator (section 8.8.2.2: at least a second older than
        now). Anything else (a list of tags, two If-Range lines, "*") means "send it all": the
        whole 200 is always a correct answer, a wrong 206 splices two versions."""
        if field is None:
            return True
        field = field.strip(" \t")
        if field.startswith('"') or field.startswith("W/"):
            return field == entry.identity.etag   # a strong tag of ours, alone in the field
        date = parse_http_date(field)
        return date is not None and date == entry.mtime_s and time.time() > entry.strong_after

    def _ranged(self, entry, ranges, handle):
        """206 or 416; None to send the whole file instead (RFC 9110 section 14.2 allows it).
        ``handle``: the open file when identity is not in memory."""
        identity, size = entry.identity, entry.identity.size
        spans = satisfiable_spans(ranges, size)
        if not spans:
            return self._plain(416, "range not satisfiable", [
                ("Content-Range", "bytes */%d" % size), ("Accept-Ranges", "bytes")])
        spans = coalesce(spans)
        if len(spans) == 1:
            start, end = spans[0]
            head = identity.headers + [("Content-Range", "bytes %d-%d/%d" % (start, end, size))]
            if identity.body is not None:
                return Response(identity.body[start:end + 1], 206, head)
            return _file_response(handle, 206, head, start, end - start + 1)
        if sum(end - start + 1 for start, end in spans) > self.settings.max_multipart_bytes:
            return None
        return self._multipart(entry, spans, handle)

    def _multipart(self, entry, spans, handle):
        """multipart/byteranges (RFC 9110 section 14.6), built in memory: it is bounded by
        max_multipart_bytes, so it can carry an exact Content-Length."""
        identity, size = entry.identity, entry.identity.size
        boundary = os.urandom(12).hex()
        parts = []
        for start, end in spans:
            parts.append(("--%s\r\nContent-Type: %s\r\nContent-Range: bytes %d-%d/%d\r\n\r\n"
                          % (boundary, entry.content_type, start, end, size)).encode())
            if handle is None:
                parts.append(identity.body[start:end + 1])
            else:
                parts.append(_pread_all(handle, start, end - start + 1))
            parts.append(b"\r\n")
        parts.append(("--%s--\r\n" % boundary).encode())
        head = [(name, value) for name, value in identity.headers if name != "Content-Type"]
        head.insert(0, ("Content-Type", "multipart/byteranges; boundary=" + boundary))
        return Response(b"".join(parts), 206, head)

    def _gzip_variant(self, entry):
        """gzip made here, cached by the identity ETag; identity when it does not pay."""
        key = entry.identity.etag
        variant = self.gzipped.get(key)
        if variant is None:
            identity = entry.identity
            data = identity.body
            if data is None:
                data = _read_checked(identity.path, identity.sig)
            # wbits 31: a gzip wrapper with mtime 0, so the same input always gives the same
            # bytes (the strong ETag promises that)
            compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
            packed = compressor.compress(data) + compressor.flush()
            if len(packed) > len(data) * GZIP_MIN_SAVING:
                variant, packed = identity, b""   # remembered, so it is not tried again
            else:
                variant = Variant("gzip", key[:-1] + '-gz"', packed, identity.path,
                                  identity.sig, False)
                self._set_headers(variant, entry)
            self.gzipped.put(key, variant, ENTRY_OVERHEAD_BYTES + len(packed))
        return variant

    # -- client-side routes ([static "/path"] fallback) ------------------------------------
    def _fallback(self, request):
        """The fallback file of the section over ``request.path``, as if asked for itself,
        if the request is a page navigation: it accepts HTML and its last segment has no "."
        (connect-history-api-fallback's rules: a missing /app/app.js stays a 404, and so does
        a script's or an image's fetch). Vary: Accept, since a request that does not accept
        HTML gets the 404 at the same URL."""
        target = self.policy.fallback_for(request.path)
        if (target is None or "." in request.segments[-1]
                or "text/html" not in request.headers.get("accept", "")):
            return None
        try:
            entry = self._lookup(target, target[1:].split("/"))
        except _Stale:
            self.files.discard(target)
            raise
        if type(entry) is not FileEntry:
            return None   # a fallback that names no file: the 404 that would have been
        response = self._respond(request, entry)
        vary = [field for name, field in response.headers if name == "Vary"]
        response.headers = [item for item in response.headers if item[0] != "Vary"] + [
            ("Vary", ", ".join(vary + ["Accept"]))]
        return response

    def has_file(self, request):
        """Whether ``serve(request)`` would answer with the file at its path (not a fallback,
        a redirect or a listing): the guard's question (``static_hit``)."""
        try:
            return type(self._lookup(request.path, request.segments)) is FileEntry
        except _Stale:
            return False

    # -- other answers ---------------------------------------------------------------------
    def _plain(self, status, message, headers):
        """A short error (412, 416) that carries no freshness: caches must not keep it."""
        head = [("Content-Type", "text/plain; charset=utf-8")] + headers + self.extra_headers
        return Response((message + "\n").encode(), status, head)

    def _redirect(self, request):
        """/dir -> /dir/, keeping the query (as nginx does)."""
        location = urllib.parse.quote(request.path + "/")
        if request.query_string:
            location += "?" + request.query_string
        return Response(b"", 301, [("Location", location)] + self.extra_headers)

    def _listing(self, request, real_dir):
        """An HTML index of a directory without index.html (directory_listing = on)."""
        limit = self.settings.listing_max_entries
        try:
            with os.scandir(real_dir) as scan:
                names = []
                for item in scan:
                    if item.name.startswith("."):
                        continue
                    names.append(item.name + "/" if item.is_dir() else item.name)
                    if len(names) > limit:
                        break
        except OSError:
            return None
        names.sort(key=lambda name: (not name.endswith("/"), name))
        title = html.escape(request.path)
        rows = ['<li><a href="%s">%s</a></li>' % (html.escape(urllib.parse.quote(name)),
                                                   html.escape(name)) for name in names[:limit]]
        if len(names) > limit:
            rows.append("<li>(more entries not shown)</li>")
        page = ('<!doctype html>\n<html lang="en"><meta charset="utf-8"><title>Index of %s'
                '</title>\n<h1>Index of %s</h1>\n<ul>\n%s\n</ul>\n</html>\n'
                % (title, title, "\n".join(rows)))
        head = [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-cache")
                ] + self.extra_headers
        return Response(page.encode("utf-8"), 200, head)

    def not_found(self, request):
        """404: 404.html for browsers, a short text or JSON error for everyone else."""
        response = self.not_found_page(request)
        if response is None:
            response = error_response(request, 404, "not found")
            response.headers.extend(self.extra_headers)
        return response

    def not_found_page(self, request):
        """404.html with status 404, for clients that accept HTML; None otherwise."""
        accept = request.headers.get("accept", "") if request is not None else ""
        if "text/html" not in accept:
            return None
        try:
            found = self._lookup("/404.html", ["404.html"])
            if not isinstance(found, FileEntry):
                return None
            identity = found.identity
            head = [("Content-Type", found.content_type)] + self.extra_headers
            if identity.body is not None:
                return Response(identity.body, 404, head)
            return _file_response(_open_checked(identity), 404, head, 0, identity.size)
        except _Stale:
            return None
