#!/usr/bin/env python3
"""onebox: a web server in one Python process, standard library only.

Run ``python3 server.py`` (settings from ``setup.cfg`` beside this file, flags override them;
``--help`` lists both). ``grep -n '^# ---' server.py`` prints this file's table of contents.

How a connection is served, and why
-----------------------------------
The stdlib's ``ThreadingHTTPServer`` gives every connection a thread for its whole life. That is
simple, but a client that opens a connection and says nothing holds a thread (and its stack)
until a timeout, and a thousand such clients are a thousand threads. onebox keeps the stdlib
server class for the listening socket's life cycle (bind, listen, close) and replaces its request
loop with two kinds of thread:

* the **reactor** (the thread that calls ``serve_forever``) owns the listening socket and every
  connection that is *waiting*: it accepts, applies the connection caps, reads request heads
  without blocking, and enforces the head deadline and the idle keep-alive timeout. A waiting
  connection costs a selector registration and a small buffer, never a thread;
* a fixed pool of **workers** (``worker_threads``) takes connections whose request head is
  complete, parses it, runs the handler, reads or drains the body, writes the response, and
  hands the connection back to the reactor (or serves the next pipelined request first).
  While no other connection needs a worker, a worker keeps its kept-alive connection and
  waits for the next request itself; the reactor calls it back the moment one does.

A slow client can hold a worker only while a handler reads its body (``body_timeout_s`` per
read) or while the response is written (``write_timeout_s``); never while it dawdles over a head,
and an idle one only for as long as no other connection needs the worker.

The stdlib request handler is replaced too: it parses headers with ``email.parser`` (slow, and
lenient where RFC 9112 asks for strictness), writes headers and body in separate sends (with
Nagle on, ~40 ms stalls on keep-alive), never reads unread request bodies (so the next pipelined
request is parsed out of body bytes), and sends nothing at all when a handler raises.

Threads: the reactor; ``worker_threads`` workers; one access-log flusher. Shutdown (SIGTERM,
SIGINT, or ``shutdown()`` from another thread) closes the listener and idle connections, lets
busy ones finish within ``shutdown_timeout_s``, then joins every thread: no daemon threads, so
exit never cuts a handler off half-way through a write.
"""
import argparse
import collections
import configparser
import email.utils
import http
import http.server
import importlib
import os
import queue
import re
import select
import selectors
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import types
import urllib.parse

from handlers import _static
from handlers._cache import responses as response_cache
from handlers._core import HTTPError, Headers, Request, Response, json_response, to_response
from handlers._guard import Guard, GuardPolicy
from handlers._state import StateError, StateLockedError, Store, state

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG_FILE = os.path.join(HERE, "setup.cfg")


# --- settings ---------------------------------------------------------------------------------
# Every limit lives here, with its unit in its name and the reason for its default. setup.cfg
# sections override the defaults, command-line flags override setup.cfg. Unknown keys and bad
# values stop start-up with a message naming the file, the section and the key.

class ConfigError(Exception):
    """Bad configuration; the message names where and how to fix it."""


Setting = collections.namedtuple("Setting", "name kind default minimum why choices",
                                 defaults=(None,))

SETTINGS = {
    "server": [
        Setting("host", "str", "127.0.0.1", None,
                "address to listen on; 0.0.0.0 (or ::) serves the network"),
        Setting("allowed_hosts", "str", "", None,
                "Host names served (.example.org: it and its subdomains); others get 421. "
                "Empty: any (DNS rebinding can then reach a server on a private network)"),
        Setting("port", "int", 8000, 0, "TCP port; 0 picks a free one (printed at start)"),
        Setting("pages_dir", "path", "pages", None, "static site served for unrouted GETs"),
        Setting("data_dir", "path", "data", None, "where persisted state lives"),
        Setting("worker_threads", "int", 16, 1,
                "threads running handlers; waiting connections need none"),
        Setting("max_connections", "int", 4096, 1,
                "open connections in all; past it idle ones are closed, then 503"),
        Setting("max_connections_per_ip", "int", 256, 1,
                "open connections from one address; past it 503 (a browser uses ~6)"),
        Setting("header_timeout_s", "float", 10.0, 0.001,
                "deadline for a whole request head, from its first byte (slowloris)"),
        Setting("keepalive_timeout_s", "float", 30.0, 0.001,
                "an idle keep-alive connection is closed after this"),
        Setting("body_timeout_s", "float", 30.0, 0.001,
                "longest wait for more request-body bytes before 408"),
        Setting("write_timeout_s", "float", 30.0, 0.001,
                "longest wait for a client to accept more response bytes"),
        Setting("shutdown_timeout_s", "float", 10.0, 0.0,
                "how long busy requests may run on after SIGTERM"),
        Setting("max_request_line_bytes", "int", 8192, 64, "longer request lines get 414"),
        Setting("max_head_bytes", "int", 65536, 256, "larger request heads get 431"),
        Setting("max_header_count", "int", 100, 1, "more header lines get 431"),
        Setting("max_body_bytes", "int", 1048576, 0, "larger request bodies get 413"),
        Setting("max_drain_bytes", "int", 65536, 0,
                "unread body left by a handler is read and dropped up to this; past it close"),
        Setting("access_log", "bool", True, None, "one combined-format line per request on stdout"),
        Setting("log_flush_interval_s", "float", 1.0, 0.01,
                "access lines are written in batches at least this often"),
        Setting("log_buffer_bytes", "int", 1048576, 4096,
                "access lines waiting for a slow stdout; past it they are dropped and counted"),
    ],
    "state": [
        Setting("durability", "str", "always", None,
                "always: a write returns once fsync'd; batch: fsync every batch_interval_ms; "
                "off: never fsync (tests, caches)", ("always", "batch", "off")),
        Setting("batch_interval_ms", "int", 50, 1,
                "in batch mode, the most an OS crash or power cut can lose"),
        Setting("compact_journal_bytes", "int", 64 * 1024 * 1024, 4096,
                "a journal this large is folded into a fresh snapshot in the background"),
    ],
    "static": [   # how pages_dir is served; see handlers/_static.py
        Setting("html_max_age_s", "int", 60, 0,
                "HTML is fresh this long, then revalidated (Cache-Control: must-revalidate)"),
        Setting("max_age_s", "int", 600, 0,
                "other files are fresh this long; edits show up within it"),
        Setting("immutable_max_age_s", "int", 31536000, 0,
                "fingerprinted names (app.3f9a1c.js) never change: cached a year, immutable"),
        Setting("fingerprint_pattern", "str", r"[.-](?=[0-9a-f]*[0-9])[0-9a-f]{6,64}\.\w+$",
                None, "regex searched in the file name; a match means a fingerprinted asset"),
        Setting("cache_control", "str", "", None,
                "per-path-prefix overrides, one '/prefix/ VALUE' a line; the longest wins"),
        Setting("extra_headers", "str", "", None,
                "headers added to every static response, one 'Name: value' a line"),
        Setting("precompressed", "bool", True, None,
                "serve file.br / file.zst / file.gz sidecars to clients that accept them"),
        Setting("gzip", "bool", True, None, "gzip compressible files on the fly (cached)"),
        Setting("gzip_min_bytes", "int", 1024, 0,
                "smaller files are sent as they are: gzip saves too little to pay"),
        Setting("gzip_max_file_bytes", "int", 8388608, 0,
                "larger files are not gzipped on the fly (CPU, and the cache's memory)"),
        Setting("gzip_cache_bytes", "int", 16777216, 0,
                "memory for gzipped bodies, least recently used dropped first"),
        Setting("memory_max_file_bytes", "int", 262144, 0,
                "files up to this are kept in memory; larger ones go out with sendfile"),
        Setting("file_cache_bytes", "int", 33554432, 0,
                "memory for small files' bytes and every file's precomputed headers"),
        Setting("path_recheck_s", "float", 1.0, 0.0,
                "how long a URL's file (symlinks, index.html) is trusted; edits show at once"),
        Setting("max_ranges", "int", 16, 1,
                "a Range with more parts gets the whole file (RFC 9110 14.2: likely abuse)"),
        Setting("max_multipart_bytes", "int", 1048576, 0,
                "multi-range answers are built in memory; past this the whole file is sent"),
        Setting("clean_urls", "bool", False, None, "/about serves about.html"),
        Setting("directory_listing", "bool", False, None,
                "list directories that have no index.html (otherwise 404)"),
        Setting("listing_max_entries", "int", 1000, 1, "a directory listing shows at most this"),
        Setting("follow_symlinks_outside", "bool", False, None,
                "serve symlinks that resolve outside pages_dir (refused by default)"),
    ],
    # The abuse guard (handlers/_guard.py tells the whole story). Lists are separated by spaces
    # or commas. Per-route limits are sections of their own: [limits "/api/login"] (below).
    "limits": [
        Setting("enabled", "bool", True, None,
                "the abuse guard; off skips every rule and limit (client identity still applies)"),
        # Loopback is trusted and allowed by default (gunicorn's and uvicorn's
        # forwarded_allow_ips convention): a local benchmark or health check is never limited,
        # and behind a local reverse proxy each forwarded client is limited as itself (issue 10).
        Setting("trusted_proxies", "str", "127.0.0.1 ::1", None,
                "CIDRs of your reverse proxies; only their forwarded header names the client"),
        Setting("forwarded_header", "str", "x-forwarded-for", None,
                "the header your proxy sets; the other is ignored (a client could forge it)",
                ("x-forwarded-for", "forwarded")),
        Setting("ipv4_prefix_bits", "int", 32, 8,
                "IPv4 clients are tracked per address; 24 groups each /24"),
        Setting("ipv6_prefix_bits", "int", 64, 8,
                "IPv6 clients are tracked per /64: one subscriber usually holds a whole /64"),
        Setting("client_rate_per_s", "float", 20.0, 0.001,
                "sustained requests/s per client across the site; a person browsing averages <1"),
        Setting("client_burst", "int", 100, 1,
                "requests a client may make at once: a page and its assets, a few tabs"),
        Setting("route_rate_per_s", "float", 5.0, 0.001,
                "sustained requests/s per client to one path (or [limits \"...\"] route)"),
        Setting("route_burst", "int", 30, 1,
                "requests to one path at once; reloads and polling stay far below"),
        Setting("allow_cidrs", "str", "127.0.0.1 ::1", None,
                "clients never limited, banned or denied (this machine, your monitoring)"),
        Setting("allow_user_agents", "str", "", None,
                "regex (case-insensitive); matching requests skip the rate limits (spoofable)"),
        Setting("allow_paths", "str", "/.well-known/ /robots.txt /favicon.ico", None,
                "paths that skip the rate limits and scanner counting (/x/ is a prefix, * a glob)"),
        Setting("deny_cidrs", "str", "", None, "clients always refused with 403"),
        Setting("deny_user_agents", "str", "", None,
                "regex (case-insensitive); matching requests get 403"),
        Setting("deny_paths", "str", "", None,
                "paths that get 403 (/x/ is a prefix, * a glob): /wp-login.php /.env /.git/"),
        Setting("ban_after_rejections", "int", 50, 0,
                "more refusals (429, 403) than this within ban_window_s earn a ban; 0: never"),
        Setting("ban_window_s", "float", 10.0, 0.001,
                "the window ban_after_rejections counts in"),
        Setting("ban_s", "float", 600.0, 0.001,
                "a first ban; each repeat offence doubles it (a banned client gets 403)"),
        Setting("ban_max_s", "float", 86400.0, 0.001,
                "the longest ban; an offender is forgotten this long after its ban ends"),
        Setting("ban_close_after_hits", "int", 5, 0,
                "requests a banned client gets a 403 for; after that it is closed at accept"),
        Setting("scanner_404_paths", "int", 30, 0,
                "more distinct 404 paths than this within scanner_window_s earn a ban; 0: off"),
        Setting("scanner_window_s", "float", 60.0, 0.001,
                "the window scanner_404_paths counts in"),
        Setting("dry_run", "str", "", None,
                "rules that only log what they would do: all, or among deny_cidrs "
                "deny_user_agents deny_paths client_rate route_rate scanner ban"),
        Setting("max_tracked_clients", "int", 50000, 1,
                "site-wide buckets kept (~180 bytes each); past it the least recent is dropped"),
        Setting("max_tracked_routes", "int", 50000, 1,
                "per-client-per-path buckets kept; past it the least recent is dropped"),
        Setting("max_tracked_suspects", "int", 10000, 1,
                "clients with recent refusals or 404s whose counts are kept"),
        Setting("max_bans", "int", 20000, 1,
                "bans (and offenders remembered for doubling) kept; least recent dropped"),
    ],
    "cache": [
        Setting("max_entries", "int", 10000, 1,
                "responses the @cached handlers may keep; past it the least recent goes"),
        Setting("max_bytes", "int", 32 * 1024 * 1024, 1024,
                "bytes of cached responses; an entry over an eighth of this is not cached"),
    ],
}

# [limits "/path"] sections: limits for the requests whose path matches (a route pattern such as
# /api/notes/{id}, a prefix ending in /, a * glob, or an exact path; the longest match wins).
# Their bucket is shared by every path that matches. Unset keys take the [limits] route values.
ROUTE_LIMIT_SETTINGS = [
    Setting("rate_per_s", "float", None, 0.001, "sustained requests/s per client to these paths"),
    Setting("burst", "int", None, 1, "requests to these paths at once"),
    Setting("dry_run", "bool", None, None, "only log what this limit would do"),
]
_ROUTE_LIMITS_RE = re.compile(r'limits\s+"(/[^"]*)"')


def _parse_value(setting, raw, where):
    """Turn a setup.cfg or command-line string into the setting's type, or say why not."""
    if not isinstance(raw, str):
        value = raw
    elif setting.kind == "int":
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError("%s: %r is not a whole number" % (where, raw)) from None
    elif setting.kind == "float":
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError("%s: %r is not a number" % (where, raw)) from None
    elif setting.kind == "bool":
        lowered = raw.strip().lower()
        if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ConfigError("%s: %r is not on/off (true/false, yes/no, 1/0)" % (where, raw))
        value = lowered in ("1", "true", "yes", "on")
    else:
        value = raw.strip()
    if setting.choices is not None and value not in setting.choices:
        raise ConfigError("%s: %r is not one of %s" % (where, raw, ", ".join(setting.choices)))
    if setting.minimum is not None and not value >= setting.minimum:
        raise ConfigError("%s: %r is below the minimum %s" % (where, raw, setting.minimum))
    if setting.name == "port" and value > 65535:
        raise ConfigError("%s: %r is not a TCP port (0-65535)" % (where, raw))
    return value


def load_config(path=None, overrides=None):
    """Defaults, then ``path`` (a setup.cfg; None reads no file), then ``overrides``.

    ``overrides`` maps "key" (a [server] key) or "section.key" to a value or a string.
    Returns a namespace of sections: ``config.server.port``.
    """
    values = {section: {s.name: s.default for s in settings}
              for section, settings in SETTINGS.items()}
    base_dir = HERE
    if path is not None:
        base_dir = os.path.dirname(os.path.abspath(path))
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as config_file:
                parser.read_file(config_file)
        except (OSError, configparser.Error) as error:
            raise ConfigError("%s: cannot be read: %s" % (path, error)) from None
        for section in SETTINGS:
            if parser.has_section(section):
                for key, raw in parser.items(section):
                    _set_value(values, section, key, raw, "%s [%s] %s" % (path, section, key))
        for section in parser.sections():
            if section.startswith("limits") and section != "limits":  # [limits "/path"]
                for key, raw in parser.items(section):
                    _set_value(values, section, key, raw, "%s [%s] %s" % (path, section, key))
    for dotted, raw in (overrides or {}).items():
        section, _, key = dotted.rpartition(".")
        _set_value(values, section or "server", key, raw, "setting %r" % dotted)
    for key in ("pages_dir", "data_dir"):
        values["server"][key] = os.path.join(base_dir, values["server"][key])
    server = values["server"]
    if server["max_request_line_bytes"] > server["max_head_bytes"]:
        raise ConfigError("max_request_line_bytes must not exceed max_head_bytes")
    check_static_settings(values["static"])
    allowed_hosts = parse_allowed_hosts(server["allowed_hosts"], path or "settings")
    route_limits = [(_ROUTE_LIMITS_RE.fullmatch(name).group(1),
                     types.SimpleNamespace(**values.pop(name)))
                    for name in sorted(set(values) - set(SETTINGS))]
    config = types.SimpleNamespace(**{name: types.SimpleNamespace(**section)
                                      for name, section in values.items()})
    config.allowed_hosts = allowed_hosts
    try:
        config.guard = GuardPolicy(config.limits, route_limits)
    except ValueError as error:
        raise ConfigError("%s: %s" % (path or "settings", error)) from None
    return config


_HOST_NAME_RE = re.compile(r"\.?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
                           r"|\d{1,3}(\.\d{1,3}){3}|\[[0-9a-f:.]+\]", re.ASCII)


def parse_allowed_hosts(text, where):
    """[server] allowed_hosts as (exact names, suffixes), or None for "any Host". A name
    starting with "." allows it and every subdomain (".example.org")."""
    names = [item.lower() for item in re.split(r"[\s,]+", text.strip()) if item]
    if not names:
        return None
    for name in names:
        if not _HOST_NAME_RE.fullmatch(name):
            raise ConfigError("%s [server] allowed_hosts: %r is not a host name (no scheme, port "
                              "or path: example.org, .example.org, 192.0.2.7, [2001:db8::1])"
                              % (where, name))
    exact = frozenset(name.lstrip(".") for name in names)
    suffixes = tuple(name for name in names if name.startswith("."))
    return exact, suffixes


def host_allowed(allowed, host_field):
    """Whether a Host field value ("example.org:8000", "[::1]:80") names an allowed host."""
    if host_field.startswith("["):
        name = host_field.partition("]")[0] + "]"
    else:
        name = host_field.partition(":")[0]
    name = name.lower().rstrip(".")
    exact, suffixes = allowed
    return name in exact or (bool(suffixes) and name.endswith(suffixes))


def _set_value(values, section, key, raw, where):
    settings = {s.name: s for s in SETTINGS.get(section, ())}
    if section.startswith("limits") and section != "limits":
        if not _ROUTE_LIMITS_RE.fullmatch(section):
            raise ConfigError('%s: write a per-route section as [limits "/path"]' % where)
        settings = {s.name: s for s in ROUTE_LIMIT_SETTINGS}
        values.setdefault(section, {s.name: s.default for s in ROUTE_LIMIT_SETTINGS})
    elif section not in SETTINGS:
        raise ConfigError("%s: unknown section [%s]" % (where, section))
    if key not in settings:
        raise ConfigError("%s: unknown key; [%s] knows: %s"
                          % (where, section, ", ".join(sorted(settings))))
    values[section][key] = _parse_value(settings[key], raw, where)


# --- routing ----------------------------------------------------------------------------------
# Area modules in handlers/ end with ROUTES = [(method, pattern, handler), ...]. Patterns are
# "/literal/{name}/more" with an optional final "{rest...}". A literal segment beats {name},
# which beats {rest...}. Two routes with the same method and shape stop start-up.

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class RouteError(Exception):
    """A bad or conflicting ROUTES table; start-up stops with this message."""


class NotRouted(HTTPError):
    """The 404 of a request that no route and no page answered: the only kind of 404 that
    scanner detection counts (a handler's "no such note" is ordinary use)."""


Route = collections.namedtuple("Route", "method pattern handler names origin")


class _RouteNode:
    __slots__ = ("literals", "param", "rest", "routes")

    def __init__(self):
        self.literals = {}
        self.param = None   # child node for a {name} segment
        self.rest = None    # node holding routes whose pattern ends in {rest...}
        self.routes = {}    # method -> Route ending at this node


def load_routes(package_dir=os.path.join(HERE, "handlers"), package="handlers"):
    """Import every area module (handlers/*.py not starting with "_") and collect ROUTES."""
    rows = []
    for filename in sorted(os.listdir(package_dir)):
        if not filename.endswith(".py") or filename.startswith("_"):
            continue
        origin = "handlers/" + filename
        module = importlib.import_module("%s.%s" % (package, filename[:-3]))
        table = getattr(module, "ROUTES", None)
        if not isinstance(table, (list, tuple)):
            raise RouteError("%s: no ROUTES table; end the module with ROUTES = [(method, "
                             "pattern, handler), ...]" % origin)
        for row in table:
            if (not isinstance(row, tuple) or len(row) != 3 or not callable(row[2])
                    or not isinstance(row[1], str)):
                raise RouteError("%s: bad ROUTES row %r; expected (method, pattern, handler)"
                                 % (origin, row))
            rows.append(row + (origin,))
    return rows


class Router:
    """Matches (method, path segments) to a Route; built once, read by every worker."""

    def __init__(self, rows):
        self.root = _RouteNode()
        for method, pattern, handler, origin in rows:
            self.add(method, pattern, handler, origin)

    def add(self, method, pattern, handler, origin="?"):
        if method not in METHODS:
            raise RouteError("%s: %s %s: method must be one of %s"
                             % (origin, method, pattern, ", ".join(METHODS)))
        node, names = self.root, []
        for segment, kind in _pattern_segments(pattern, origin):
            if kind == "literal":
                node = node.literals.setdefault(segment, _RouteNode())
            elif kind == "param":
                node.param = node.param or _RouteNode()
                node = node.param
            else:
                node.rest = node.rest or _RouteNode()
                node = node.rest
            if kind != "literal":
                if segment in names:
                    raise RouteError("%s: %s: wildcard {%s} appears twice"
                                     % (origin, pattern, segment))
                names.append(segment)
        existing = node.routes.get(method)
        if existing is not None:
            raise RouteError("conflicting routes: %s %s (%s) and %s %s (%s) match the same "
                             "requests; remove or rename one"
                             % (existing.method, existing.pattern, existing.origin,
                                method, pattern, origin))
        node.routes[method] = Route(method, pattern, handler, tuple(names), origin)

    def match(self, method, segments):
        """Return (route, params, None), or (None, None, allowed methods), or (None, None, None)."""
        first_allowed = None
        for node, values in self._walk(self.root, segments, 0, ()):
            route = node.routes.get(method)
            if route is None and method == "HEAD":
                route = node.routes.get("GET")
            if route is not None:
                return route, dict(zip(route.names, values)), None
            if first_allowed is None:
                first_allowed = _allowed_methods(node.routes)
        return None, None, first_allowed

    def _walk(self, node, segments, index, values):
        if index == len(segments):
            if node.routes:
                yield node, values
            return
        segment = segments[index]
        child = node.literals.get(segment)
        if child is not None:
            yield from self._walk(child, segments, index + 1, values)
        if node.param is not None and segment:
            yield from self._walk(node.param, segments, index + 1, values + (segment,))
        if node.rest is not None and node.rest.routes:
            yield node.rest, values + ("/".join(segments[index:]),)


def _pattern_segments(pattern, origin):
    if not pattern.startswith("/"):
        raise RouteError("%s: pattern %r must start with /" % (origin, pattern))
    parts = pattern[1:].split("/")
    for position, part in enumerate(parts):
        if part.startswith("{") and part.endswith("}"):
            name = part[1:-1]
            if name.endswith("..."):
                if position != len(parts) - 1:
                    raise RouteError("%s: %s: {%s} must be the last segment"
                                     % (origin, pattern, name))
                yield name[:-3], "rest"
                continue
            if not name.isidentifier():
                raise RouteError("%s: %s: {%s} is not a valid name" % (origin, pattern, name))
            yield name, "param"
        elif "{" in part or "}" in part:
            raise RouteError("%s: %s: a wildcard must be a whole segment" % (origin, pattern))
        else:
            yield part, "literal"


def _allowed_methods(routes):
    methods = set(routes)
    if "GET" in methods:
        methods.add("HEAD")
    methods.add("OPTIONS")
    return ", ".join(m for m in METHODS if m in methods)


# --- request parsing --------------------------------------------------------------------------
# RFC 9112 sections 2-3 and 5-6, strictly: what a lenient parser accepts is what request
# smuggling exploits. Runs in worker threads on a complete head (the reactor found its end).

_TCHARS = "!#$%&'*+.^_`|~0-9A-Za-z-"
# [0-9], not \d: in a str pattern \d matches every Unicode digit (Arabic-Indic, Devanagari...)
_REQUEST_LINE_RE = re.compile(r"([%s]+) ([^\x00-\x20\x7f]+) HTTP/([0-9])\.([0-9])" % _TCHARS)
_REQUEST_LINE_BYTES_RE = re.compile(rb"[%s]+ [^\x00-\x20\x7f]+ HTTP/[0-9]\.[0-9]"
                                    % _TCHARS.encode())
_METHOD_PREFIX_RE = re.compile(rb"[%s]{1,32}(?: |$)" % _TCHARS.encode())
_BAD_VALUE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# All field lines in one match: each a token, a colon and a value without controls (HTAB
# aside). No match: obs-fold (a line starting with whitespace), whitespace before the colon
# (RFC 9112 section 5.1 requires 400), a bare CR or LF, or no colon at all.
_FIELD = r"[%s]+:[^\x00-\x08\x0a-\x1f\x7f]*" % _TCHARS
_FIELD_LINES_RE = re.compile(r"(?:%s(?:\r\n%s)*)?" % (_FIELD, _FIELD))
_HOST_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
# Optional whitespace is SP and HTAB only (RFC 9110 section 5.6.3). str.strip() with no argument
# would also strip NBSP (0xA0) and NEL (0x85) of a latin-1 decoded head: a smuggling lever, since
# a proxy in front reads "chunked\xa0" as an unknown coding.
_OWS = " \t"
_TCHAR_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                         b"abcdefghijklmnopqrstuvwxyz")


class Head:
    """A parsed request head: what the worker needs to frame and route the request."""

    __slots__ = ("method", "target", "version", "fields", "keep_alive", "content_length",
                 "chunked", "expect_continue", "request_line")


def parse_head(head_bytes, settings):
    """Parse a request head (without its final CRLFCRLF); raise HTTPError on anything bad."""
    text = head_bytes.decode("latin-1")
    lines = text.split("\r\n")
    head = Head()
    head.request_line = lines[0]
    if len(lines[0]) > settings.max_request_line_bytes:
        raise HTTPError(414, "request line too long")
    match = _REQUEST_LINE_RE.fullmatch(lines[0])
    if match is None:
        raise HTTPError(400, "malformed request line")
    head.method, head.target, major, minor = match.groups()
    if major != "1":
        raise HTTPError(505, "only HTTP/1.x is supported")
    head.version = "HTTP/1.0" if minor == "0" else "HTTP/1.1"
    if len(lines) - 1 > settings.max_header_count:
        raise HTTPError(431, "too many header fields")
    if not _FIELD_LINES_RE.fullmatch(text, len(lines[0]) + 2):
        raise HTTPError(400, "malformed header field")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields.setdefault(name.lower(), []).append(value.strip(_OWS))
    head.fields = fields
    _read_framing(head)
    return head


def _read_framing(head):
    """Host, Connection, Content-Length / Transfer-Encoding and Expect (RFC 9112 sections
    3.2, 6.1-6.3, 9.3; RFC 9110 section 10.1.1)."""
    fields = head.fields
    hosts = fields.get("host", ())
    if len(hosts) > 1:
        raise HTTPError(400, "more than one Host header")
    if not hosts and head.version == "HTTP/1.1":
        raise HTTPError(400, "missing Host header")
    if hosts and not _HOST_RE.fullmatch(hosts[0]):
        raise HTTPError(400, "invalid Host header")
    connection = fields.get("connection")
    tokens = {t.strip(_OWS).lower() for v in connection for t in v.split(",")} if connection else ()
    if head.version == "HTTP/1.1":
        head.keep_alive = "close" not in tokens
    else:
        head.keep_alive = "keep-alive" in tokens
    head.chunked = False
    head.content_length = 0
    head.expect_continue = False
    if "transfer-encoding" not in fields and "content-length" not in fields \
            and "expect" not in fields:
        return   # a request without a body, nearly every GET
    codings = [t.strip(_OWS).lower() for v in fields.get("transfer-encoding", ())
               for t in v.split(",")]
    lengths = {v.strip(_OWS) for line in fields.get("content-length", ()) for v in line.split(",")}
    if codings:
        if head.version == "HTTP/1.0":
            raise HTTPError(400, "Transfer-Encoding is not allowed in HTTP/1.0")
        if lengths:  # section 6.3: both present is a smuggling attempt; reject and close
            raise HTTPError(400, "both Transfer-Encoding and Content-Length")
        if codings[-1] != "chunked":
            raise HTTPError(400, "request body must be chunked last")
        if len(codings) > 1:
            raise HTTPError(501, "transfer coding not supported")
        head.chunked = True
    elif lengths:
        if len(lengths) > 1:
            raise HTTPError(400, "conflicting Content-Length values")
        length = lengths.pop()
        if not length.isdigit() or not length.isascii() or len(length) > 18:
            raise HTTPError(400, "invalid Content-Length")
        head.content_length = int(length)
    expect = fields.get("expect")
    if expect:
        if len(expect) != 1 or expect[0].lower() != "100-continue":
            raise HTTPError(417, "only Expect: 100-continue is supported")
        head.expect_continue = head.version == "HTTP/1.1"


def split_target(head):
    """Return (raw path, query string) for the request target's form (RFC 9112 section 3.2)."""
    target = head.target
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query
    if target == "*":
        if head.method != "OPTIONS":
            raise HTTPError(400, "asterisk-form is only for OPTIONS")
        return "*", ""
    scheme = target[:8].lower()
    if scheme.startswith("http://") or scheme.startswith("https://"):
        # absolute-form: the authority replaces Host (section 3.2.2)
        try:
            parts = urllib.parse.urlsplit(target)
        except ValueError:   # "http://[zz]/": urlsplit checks bracketed hosts and raises
            raise HTTPError(400, "invalid request target") from None
        if not _HOST_RE.fullmatch(parts.netloc) or "@" in parts.netloc:
            raise HTTPError(400, "invalid request target")
        head.fields["host"] = [parts.netloc]
        return parts.path or "/", parts.query
    raise HTTPError(400, "invalid request target")


def decode_path(raw_path):
    """'/a//b%20c/' -> ('/a/b c/', ['a', 'b c', '']); dot-segments and NUL are refused."""
    if raw_path == "*":
        return "*", []
    if "%" not in raw_path and "//" not in raw_path and "\x00" not in raw_path \
            and raw_path.isascii():
        segments = raw_path[1:].split("/")   # nothing to decode or collapse: the common case
        if "." not in segments and ".." not in segments:
            return raw_path, segments
    raw_segments = raw_path.split("/")[1:]
    last = len(raw_segments) - 1
    segments = []
    for position, raw in enumerate(raw_segments):
        try:
            if "%" in raw:
                segment = urllib.parse.unquote_to_bytes(raw).decode("utf-8")
            elif not raw.isascii():
                segment = raw.encode("latin-1").decode("utf-8")
            else:
                segment = raw
        except UnicodeDecodeError:
            raise HTTPError(400, "request path is not UTF-8") from None
        if segment in (".", ".."):
            raise HTTPError(400, "request path must not contain dot-segments")
        if "\x00" in segment:
            raise HTTPError(400, "request path must not contain NUL")
        if segment or position == last:
            segments.append(segment)  # empty segments collapse, but a trailing "/" stays
    if not segments:
        segments = [""]
    return "/" + "/".join(segments), segments


# --- body readers -----------------------------------------------------------------------------
# A handler reads the body through these; whatever it leaves unread is drained (bounded) or the
# connection is closed, so the next request on the connection is never parsed out of body bytes.

class ClientGone(Exception):
    """The client stopped reading or writing in time; the connection is closed silently."""


class StreamFailed(ClientGone):
    """A streamed body raised after its head was sent: all we can do is cut the connection."""


def wait_for(sock, events, timeout):
    """Block until ``sock`` is ready for ``events`` (select.POLLIN/POLLOUT).

    poll, not select: select cannot watch descriptors above 1023, and onebox holds thousands.
    """
    poller = select.poll()
    poller.register(sock, events)
    if not poller.poll(timeout * 1000):
        raise ClientGone("timed out")


_MSG_MORE = getattr(socket, "MSG_MORE", 0)   # Linux; elsewhere the head goes out alone
MSG_DONTWAIT = socket.MSG_DONTWAIT   # a read that must not wait, on a blocking socket


def send_all(sock, data, flags=0):
    """Send all of ``data`` on a connection socket. Its SO_SNDTIMEO (write_timeout_s, set at
    accept) bounds each wait for buffer room: when it expires, the send fails with EAGAIN."""
    view = data
    while True:
        try:
            sent = sock.send(view, flags)
        except BlockingIOError:
            raise ClientGone("timed out") from None
        except OSError as error:
            raise ClientGone(str(error)) from None
        if sent == len(view):
            return   # nearly always at the first call: a head, a small body
        view = memoryview(view)[sent:]


class BodyReader:
    """Reads one request body from the connection's buffer and socket, within the limits."""

    def __init__(self, conn, head, settings):
        self.conn = conn
        self.limit = settings.max_body_bytes
        self.timeout = settings.body_timeout_s
        self.expect_continue = head.expect_continue
        self.continue_sent = False
        self.done = False
        self.broken = False   # framing lost: the connection must close after the response
        self.failure = None   # the HTTPError that ended a drain (see drain)
        self.received = 0

    def read(self, size=-1):
        if self.done:
            return b""
        if self.expect_continue and not self.continue_sent:
            self.continue_sent = True  # RFC 9110 section 10.1.1: the client waits for this
            self._guard(send_all, self.conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
        if size is None or size < 0:
            parts = []
            while not self.done:
                parts.append(self._read_some(1 << 20))
            return b"".join(parts)
        return self._read_some(size) if size else b""

    def drain(self, limit):
        """Read and drop the rest of the body; False if more than ``limit`` bytes remain or it
        cannot be read. A body that is malformed or too large leaves its error in ``failure``."""
        try:
            while not self.done:
                if self._remaining_hint() > limit:
                    return False
                limit -= len(self._read_some(65536))
                if limit < 0:
                    return False
        except HTTPError as error:
            self.failure = error
            return False
        return True

    def _take(self, size):
        """Up to ``size`` bytes from the buffer, receiving more if it is empty."""
        conn = self.conn
        if not conn.buf:
            self._guard(self._receive)
        chunk = bytes(conn.buf[:size])
        del conn.buf[:size]
        return chunk

    def _receive(self):
        conn = self.conn
        while True:
            try:
                data = conn.sock.recv(65536, MSG_DONTWAIT)
            except BlockingIOError:
                wait_for(conn.sock, select.POLLIN, self.timeout)
                continue
            if not data:
                raise ClientGone("closed mid-body")
            conn.buf += data
            return

    def _guard(self, function, *args):
        try:
            return function(*args)
        except ClientGone:
            self.broken = True
            raise HTTPError(408, "request body not received in time") from None
        except OSError:
            self.broken = True
            raise HTTPError(400, "request body incomplete") from None

    def _count(self, size):
        self.received += size
        if self.received > self.limit:
            self.broken = True
            raise HTTPError(413, "request body too large")


class LengthBody(BodyReader):
    def __init__(self, conn, head, settings):
        super().__init__(conn, head, settings)
        self.remaining = head.content_length
        self.done = self.remaining == 0

    def _remaining_hint(self):
        return self.remaining

    def _read_some(self, size):
        chunk = self._take(min(size, self.remaining))
        self.remaining -= len(chunk)
        self._count(len(chunk))
        self.done = self.remaining == 0
        return chunk


class ChunkedBody(BodyReader):
    """RFC 9112 section 7.1: hex size [;ext] CRLF data CRLF ... 0 CRLF [trailers] CRLF."""

    MAX_LINE_BYTES = 4096

    def __init__(self, conn, head, settings):
        super().__init__(conn, head, settings)
        self.chunk_left = 0
        self.max_trailer_bytes = settings.max_head_bytes

    def _remaining_hint(self):
        return self.chunk_left

    def _read_some(self, size):
        if self.chunk_left == 0:
            self._start_chunk()
            if self.done:
                return b""
        chunk = self._take(min(size, self.chunk_left))
        self.chunk_left -= len(chunk)
        self._count(len(chunk))
        if self.chunk_left == 0 and self._line() != b"":
            self.broken = True
            raise HTTPError(400, "malformed chunked body")
        return chunk

    def _start_chunk(self):
        line = self._line()
        size_text = line.split(b";", 1)[0].strip(b" \t")
        if not size_text or len(size_text) > 16 or size_text.strip(b"0123456789abcdefABCDEF"):
            self.broken = True
            raise HTTPError(400, "malformed chunk size")
        self.chunk_left = int(size_text, 16)
        if self.chunk_left == 0:
            trailer_bytes = 0
            while True:  # trailer fields are read and ignored (section 7.1.2)
                trailer = self._line()
                trailer_bytes += len(trailer) + 2
                if trailer == b"":
                    break
                if trailer_bytes > self.max_trailer_bytes:
                    self.broken = True
                    raise HTTPError(431, "chunked trailer too large")
            self.done = True
        elif self.received + self.chunk_left > self.limit:
            self.broken = True
            raise HTTPError(413, "request body too large")

    def _line(self):
        conn = self.conn
        while True:
            end = conn.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(conn.buf[:end])
                del conn.buf[:end + 2]
                return line
            if len(conn.buf) > self.MAX_LINE_BYTES:
                self.broken = True
                raise HTTPError(400, "malformed chunked body")
            self._guard(self._receive)


# --- responses --------------------------------------------------------------------------------
# Head and (small) body go out in one send: with two sends and Nagle, a keep-alive client waits
# ~40 ms for the delayed ACK (TCP_NODELAY is set as well). No header value may hold CR or LF.

REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_NO_BODY_STATUSES = frozenset([204, 304])
_SMALL_BODY_BYTES = 256 * 1024
_HEADER_NAME_RE = re.compile(r"[%s]+" % _TCHARS)
_date_cache = [0, ""]
# On every response: a browser must not guess a type other than the one sent (a JSON body
# holding "<script>" would otherwise run as HTML). Handlers must not set it themselves.
_NOSNIFF = "X-Content-Type-Options: nosniff\r\n"


def http_date(now=None):
    """The Date header value (RFC 9110 section 5.6.7), formatted once a second."""
    second = int(time.time() if now is None else now)
    if _date_cache[0] != second:
        _date_cache[1] = email.utils.formatdate(second, usegmt=True)
        _date_cache[0] = second
    return _date_cache[1]


def error_response(request, status, message="", headers=()):
    """A short error body: JSON for clients that accept it, plain text otherwise."""
    message = message or REASONS.get(status, "error").lower()
    accept = request.headers.get("accept", "") if request is not None else ""
    if "application/json" in accept:
        response = json_response({"error": message, "status": status}, status)
    else:
        response = Response((message + "\n").encode("utf-8"), status, None,
                            "text/plain; charset=utf-8")
    response.headers.extend(headers)
    return response


_rendered_fields = {}        # (name, value) -> "Name: value\r\n", checked once; see below
_RENDERED_FIELDS_MAX = 4096


def _render_field(field):
    """Check one response header field and render it. Most fields repeat (Content-Type, a
    file's ETag), so the checked line is remembered: checking costs ~1 us a field, a look-up
    ~0.05. A CR or LF in a value would let a handler split the response (the stdlib's
    send_header does not check); a bad field raises ValueError before anything is sent."""
    name, value = field
    text = str(value)
    if not _HEADER_NAME_RE.fullmatch(name) or _BAD_VALUE_RE.search(text):
        raise ValueError("response header %r has a bad name or value" % name)
    line = "%s: %s\r\n" % (name, text)
    if len(_rendered_fields) >= _RENDERED_FIELDS_MAX:
        _rendered_fields.clear()  # many distinct values (per-request ids): start again
    try:
        _rendered_fields[(name, value)] = line
    except TypeError:
        pass  # an unhashable value: rendered, just not remembered
    return line


def render_head(status, headers, length, keep_alive, version):
    """The response head as bytes; ``length`` None means chunked (or close-delimited)."""
    rendered = _rendered_fields
    lines = ["HTTP/1.1 %d %s\r\nDate: %s\r\nServer: onebox\r\n%s"
             % (status, REASONS.get(status, "Unknown"), http_date(), _NOSNIFF)]
    lines += [rendered.get(field) or _render_field(field) for field in headers]
    if status not in _NO_BODY_STATUSES and status >= 200:
        if length is not None:
            lines.append("Content-Length: %d\r\n" % length)
        elif version == "HTTP/1.1":
            lines.append("Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def write_response(sock, response, keep_alive, version, head_only):
    """Send ``response``; return the body bytes sent. Raises ClientGone."""
    status = response.status
    no_body = head_only or status in _NO_BODY_STATUSES or status < 200
    if response.file is not None:
        offset, length = response.file_range
        head = render_head(status, response.headers, length, keep_alive, version)
        try:
            if no_body or not length:
                send_all(sock, head)
                return 0
            # MSG_MORE: the head waits to leave in the file's first segment instead of a packet
            # of its own, one transmit (and on loopback one receive) fewer per response
            send_all(sock, head, _MSG_MORE)
            return send_file(sock, response.file, offset, length)
        finally:
            response.file.close()
    if response.stream is not None:
        return _write_stream(sock, response, keep_alive, version, no_body)
    body = response.body
    head = render_head(status, response.headers, len(body), keep_alive, version)
    if no_body or not body:
        send_all(sock, head)
        return 0
    if len(body) <= _SMALL_BODY_BYTES:
        send_all(sock, head + body)
    else:
        send_all(sock, head)
        send_all(sock, body)
    return len(body)


def _write_stream(sock, response, keep_alive, version, no_body):
    chunked = version == "HTTP/1.1"
    send_all(sock, render_head(response.status, response.headers, None, keep_alive, version))
    if no_body:
        return 0
    sent = 0
    pieces = iter(response.stream)
    while True:
        try:
            piece = next(pieces, None)
        except Exception as error:
            raise StreamFailed(traceback.format_exc()) from error
        if piece is None:
            break
        if piece:
            send_all(sock, b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
    if chunked:
        send_all(sock, b"0\r\n\r\n")
    return sent


def send_file(sock, handle, offset, length):
    """Zero-copy with os.sendfile, in as few calls as the client's pace allows: the socket
    blocks, so the kernel waits for buffer room itself instead of this thread polling and
    re-entering Python every few hundred KiB. SO_SNDTIMEO bounds each wait. Where sendfile is
    missing (or the socket is TLS, whose bytes must go through the SSL object), read and send."""
    if not hasattr(os, "sendfile") or type(sock) is not socket.socket:
        sent = 0
        while sent < length:
            piece = os.pread(handle.fileno(), min(length - sent, 1 << 16), offset + sent)
            if not piece:
                raise ClientGone("file shrank while being sent")
            send_all(sock, piece)
            sent += len(piece)
        return sent
    sent = 0
    while sent < length:
        try:
            count = os.sendfile(sock.fileno(), handle.fileno(), offset + sent, length - sent)
        except BlockingIOError:
            raise ClientGone("timed out") from None   # SO_SNDTIMEO expired, nothing sent
        except OSError as error:
            raise ClientGone(str(error)) from None
        if count == 0:
            raise ClientGone("file shrank while being sent")
        sent += count
    return sent


# --- static pages -----------------------------------------------------------------------------
# Unrouted GET and HEAD requests are answered from pages_dir by handlers/_static.py (validators,
# ranges, compression, caches, containment: it outgrew a section). What stays here is the glue
# to this file: settings checks at start-up and the 404 fallback.


def check_static_settings(values):
    """Parse [static] at start-up (and for --check), so a bad rule stops the server early."""
    try:
        _static.compile_policy(types.SimpleNamespace(**values))
    except ValueError as error:
        raise ConfigError(str(error)) from None


class StaticPages(_static.StaticPages):
    """The site under pages_dir; see handlers/_static.py."""

    def not_found(self, request):
        """404: 404.html for browsers, a short text or JSON error for everyone else."""
        response = self.not_found_page(request)
        if response is None:
            response = error_response(request, 404, "not found")
            response.headers.extend(self.extra_headers)
        return response


# --- access log -------------------------------------------------------------------------------
# One line per request in the combined log format plus the duration. Lines are buffered and
# written by a flusher thread at least every log_flush_interval_s, so a request costs no syscall.

_LOG_ESCAPE_RE = re.compile(r'[\x00-\x1f\x7f-\xff"\\]')


def _log_escape(text):
    """Escape control bytes, quotes and backslashes as nginx does (\\xHH), so no client can
    forge or break a log line."""
    if not text:
        return "-"
    return _LOG_ESCAPE_RE.sub(lambda m: "\\x%02X" % (ord(m.group()) & 0xFF), text)


class AccessLog:
    """Buffered access log. ``log`` may be called from any thread and never waits on the
    stream: lines queue in memory and one flusher thread writes them at least every
    ``flush_interval_s`` (sooner once FLUSH_BYTES wait), so a request costs no system call.

    A stream that stops taking lines (stdout piped to a reader that stalls) blocks only the
    flusher. The queue is bounded by ``buffer_bytes``: past it lines are dropped and counted,
    with a notice on the error log at most once a minute. The flusher is a daemon thread that
    writes with ``os.write`` on the stream's descriptor, holding no Python lock while it
    waits, so a stalled reader can neither stop serving nor stop the process from exiting
    (a daemon thread blocked inside ``sys.stdout``'s buffer would abort interpreter exit:
    "could not acquire lock for <_io.BufferedWriter name='<stdout>'>"). Streams without a
    descriptor (the tests' captures) are written with ``write``.

    Fields: ``pending``, ``pending_bytes``, ``dropped`` and ``_noticed_at`` are guarded by
    ``lock`` (written by any thread that logs, and by the flusher); ``_flush_lock`` keeps
    two flushes from interleaving their writes.
    """

    FLUSH_BYTES = 64 * 1024
    NOTICE_INTERVAL_S = 60.0
    CLOSE_WAIT_S = 1.0   # at exit, how long a stalled stream may delay it

    def __init__(self, stream, flush_interval_s, buffer_bytes=1 << 20, notice=None):
        self.stream = stream
        self.interval = flush_interval_s
        self.buffer_bytes = buffer_bytes
        self._notice = notice or (lambda message: None)
        self._fd = _descriptor_of(stream)
        self.lock = threading.Lock()
        self.pending = []
        self.pending_bytes = 0
        self.dropped = 0
        self._noticed_at = -self.NOTICE_INTERVAL_S
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="onebox-log", daemon=True)
        self._time_cache = (0, "")

    def start(self):
        self.thread.start()

    def log(self, client_ip, request_line, status, size, referer, agent, seconds, note=None):
        """``note``: the abuse guard's decision ('guard=429:client_rate'), appended after the
        duration for a rejected or dry-run-flagged request."""
        now = int(time.time())
        if self._time_cache[0] != now:
            self._time_cache = (now, time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now)))
        line = '%s - - [%s] "%s" %d %s "%s" "%s" %.3fms%s\n' % (
            client_ip, self._time_cache[1], _log_escape(request_line), status, size or "-",
            _log_escape(referer), _log_escape(agent), seconds * 1000,
            " " + note if note else "")
        with self.lock:
            if self.pending_bytes + len(line) > self.buffer_bytes:
                self.dropped += 1
                notice = self._notice_due_locked()
            else:
                self.pending.append(line)
                self.pending_bytes += len(line)
                notice = None
            full = self.pending_bytes >= self.FLUSH_BYTES
        if full:
            self._wake.set()
        if notice:
            self._notice(notice)

    def _notice_due_locked(self):
        now = time.monotonic()
        if now - self._noticed_at < self.NOTICE_INTERVAL_S:
            return None
        self._noticed_at = now
        return ("access log: %d lines dropped so far: the access log stream is not taking "
                "them (is stdout read?)" % self.dropped)

    def flush(self):
        with self._flush_lock:
            with self.lock:
                lines, self.pending, self.pending_bytes = self.pending, [], 0
            if lines:
                self._write("".join(lines))

    def _write(self, text):
        try:
            if self._fd is None:
                self.stream.write(text)
                self.stream.flush()
                return
            data = memoryview(text.encode("utf-8", "backslashreplace"))
            while data:
                data = data[os.write(self._fd, data):]
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): logging must never take the server down

    def _run(self):
        while not self._stopping:
            self._wake.wait(self.interval)
            self._wake.clear()
            self.flush()

    def close(self):
        """Write what is queued, waiting at most CLOSE_WAIT_S for a stalled stream."""
        self._stopping = True
        self._wake.set()
        if self.thread.is_alive():
            self.thread.join(self.CLOSE_WAIT_S)
        if self.thread.is_alive():
            with self.lock:
                lost = self.dropped + len(self.pending)
            self._notice("access log: the stream is not taking lines; %d lines lost at exit"
                         % lost)
        else:
            self.flush()


def _descriptor_of(stream):
    """The OS descriptor under a text stream (its buffer flushed first), or None."""
    try:
        stream.flush()
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


# --- connections ------------------------------------------------------------------------------
# A Connection is owned by exactly one thread at a time: the reactor while it waits (parked in
# the selector), a worker while a request is served (or while it holds the connection for the
# next one, see _Workers._hold). Hand-over goes through queues, so the connection itself needs
# no lock.
#
# Its socket is in blocking mode with SO_SNDTIMEO = write_timeout_s: a send (or sendfile) waits
# in the kernel for buffer room, and fails with EAGAIN if the client takes nothing for that
# long. Every read passes MSG_DONTWAIT (and waits in poll, under its own deadline), so no
# thread ever blocks on a client's silence, and no request pays for switching modes.

WORKER_JOIN_S = 5.0       # after the drain, how long a stuck handler may delay exit
LINGER_S = 2.0            # after a close with unread input, read and drop it this long
MAX_REQUESTS_PER_TURN = 32  # pipelined requests a worker serves before giving others a turn


class Connection:
    __slots__ = ("sock", "ip", "buf", "waiting", "served", "started", "client", "idle_since")

    def __init__(self, sock, ip):
        self.sock = sock
        self.ip = ip
        self.buf = bytearray()
        self.waiting = None   # "new", "head", "idle" or "linger" while parked; None when busy
        self.served = 0
        self.idle_since = 0.0     # when its last response was sent: idle deadlines count from it

    def recv_ready(self):
        """What the socket holds now: bytes; b"" if the client closed (or the connection
        broke); None if nothing yet (a report that was spurious)."""
        try:
            return self.sock.recv(65536, MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""


# --- reactor: accepting, and connections that wait --------------------------------------------
# Runs in the thread that called serve_forever. It owns the listening socket and every waiting
# connection (parked in the selector), and the tables below; nothing else touches them, so none
# of them has a lock. Workers hand connections back through ``_returned``, and wake the reactor
# through a socket when it must act at once (see _Workers._hand_back).

class _Poller:
    """Which waiting sockets are readable. A connection is *armed* while the reactor waits on it
    and disarmed while a worker owns it.

    On Linux, epoll with EPOLLONESHOT: the kernel disarms a connection the moment it reports it,
    so handing it to a worker costs nothing and taking it back costs one epoll_ctl, which a
    worker may make itself (``rearm``). Elsewhere, a selectors.DefaultSelector with register /
    unregister, twice the system calls and more bookkeeping, used by the reactor thread only.
    ONEBOX_POLLER=select in the environment forces the portable path (the tests use it).
    """

    def __init__(self):
        use_epoll = hasattr(select, "epoll") and os.environ.get("ONEBOX_POLLER") != "select"
        self._epoll = select.epoll() if use_epoll else None
        self._selector = None if self._epoll else selectors.DefaultSelector()
        self.can_rearm = self._epoll is not None
        self._owners = {}   # fd -> owner: the Connection, or "listener" / "wakeup"

    def watch(self, sock, owner):
        """Watch ``sock`` for good (the listener, the wake-up socket): never disarmed."""
        if self._epoll:
            self._epoll.register(sock.fileno(), select.EPOLLIN)
        else:
            self._selector.register(sock, selectors.EVENT_READ, owner)
        self._owners[sock.fileno()] = owner

    def arm(self, conn):
        fd = conn.sock.fileno()
        if self._epoll is None:
            if fd not in self._owners:
                self._selector.register(conn.sock, selectors.EVENT_READ, conn)
                self._owners[fd] = conn
        elif fd in self._owners:
            self._epoll.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
        else:
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLONESHOT)
            self._owners[fd] = conn

    def rearm(self, conn):
        """From a worker: report ``conn`` again (it is registered already). Only where
        ``can_rearm``: epoll_ctl is safe from any thread, a selector is not."""
        self._epoll.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLONESHOT)

    def disarm(self, conn):
        """Stop reporting ``conn`` (it goes to a worker). With EPOLLONESHOT it already is."""
        if self._epoll is None:
            self._selector.unregister(conn.sock)
            del self._owners[conn.sock.fileno()]

    def forget(self, sock):
        """Before ``sock`` is closed (closing removes it from an epoll set by itself)."""
        owner = self._owners.pop(sock.fileno(), None)
        if owner is not None and self._selector is not None:
            self._selector.unregister(sock)
        elif owner is not None and not isinstance(owner, Connection):
            self._epoll.unregister(sock.fileno())

    def poll(self, timeout):
        if self._epoll is None:
            return [key.data for key, _ in self._selector.select(timeout)]
        owners = self._owners
        return [owners[fd] for fd, _ in self._epoll.poll(timeout) if fd in owners]

    def close(self):
        (self._epoll or self._selector).close()


def _send_at_once(sock, response):
    """A small error response, in one non-blocking send, with Connection: close. The reactor
    never waits on a client: what the socket buffer does not take is dropped."""
    try:
        sock.send(render_head(response.status, response.headers, len(response.body), False,
                              "HTTP/1.1") + response.body, MSG_DONTWAIT)
    except OSError:
        pass


def _has_bare_lf(buf):
    """Whether an unfinished head holds an LF that is not part of a CRLF (rare: checked only
    while a head is incomplete)."""
    return b"\n" in buf and buf.count(b"\n") != buf.count(b"\r\n")


class _Reactor:
    """The reactor half of OneboxServer (a mixin: its state is made in OneboxServer.__init__)."""

    def _reactor_step(self):
        if self._workers_wanted and self._work.qsize() < len(self._idle_workers):
            self._want_workers(False)
        now = time.monotonic()
        self._wakes_at = wakes_at = self._expire(now)   # workers read it: see _hand_back
        # handed back before _wakes_at was set: their deadlines are not counted, so no sleep
        timeout = 0 if self._returned else wakes_at - now
        ready = self._poller.poll(timeout)
        if self._returned:
            self._book_returned()   # first: a connection a worker re-armed may be among ready
        for owner in ready:
            if owner == "listener":
                self._accept()
            elif owner == "wakeup":
                self._take_returned()
            else:
                self._on_readable(owner)

    def _timeout_for(self, kind):
        settings = self.settings
        if kind == "idle":
            return settings.keepalive_timeout_s
        if kind == "linger":
            return LINGER_S
        return settings.header_timeout_s

    def _park(self, conn, kind):
        """Wait for input; each kind's deadlines are in insertion order, so the oldest is
        always first and expiring costs nothing per idle connection."""
        first = conn.waiting is None
        if not first:
            del self._parked[conn.waiting][conn]
        conn.waiting = kind
        self._parked[kind][conn] = time.monotonic() + self._timeout_for(kind)
        if first:
            self._poller.arm(conn)

    def _unpark(self, conn):
        del self._parked[conn.waiting][conn]
        conn.waiting = None
        self._poller.disarm(conn)

    def _expire(self, now):
        """End the waits that are over; return when the next one is (within a second)."""
        soonest = now + 1.0
        for kind, parked in self._parked.items():
            while parked:
                conn, deadline = next(iter(parked.items()))
                if deadline > now:
                    if deadline < soonest:
                        soonest = deadline
                    break
                if kind == "head":
                    self._reject(conn, 408, "request head not received in time")
                else:
                    self._close(conn)
        return soonest

    def _accept(self):
        settings = self.settings
        for _ in range(64):
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # EMFILE and friends: keep serving who we have
                self.log_error("accept failed: %s" % error)
                return
            # blocking (BSDs pass the listener's O_NONBLOCK on), each send bounded by
            # SO_SNDTIMEO: see the connections section
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._send_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, address[0])
            # the guard's client key (an IPv6 /64 is one client; None: a trusted proxy, uncapped)
            conn.client, banned = self.guard.admit(conn.ip)
            if banned:  # banned, and told so ban_close_after_hits times: close without reading
                sock.close()
            elif self._open >= settings.max_connections and not self._evict_idle():
                self._refuse(conn, "server is at its connection limit")
            elif (conn.client is not None
                  and self._per_ip.get(conn.client, 0) >= settings.max_connections_per_ip):
                self._refuse(conn, "too many connections from your address")
            else:
                self._open += 1
                self._per_ip[conn.client] = self._per_ip.get(conn.client, 0) + 1
                self._park(conn, "new")

    def _evict_idle(self):
        """Make room by closing the longest-idle keep-alive connection, as nginx does: one
        parked here, else one a worker holds (see _Workers._hold). A held one is claimed from
        ``_held`` (dict.pop is atomic: the worker or the reactor gets it, never both) and shut
        down; its worker hands it back closed, so the count exceeds the cap until then."""
        idle = self._parked["idle"]
        if idle:
            self._close(next(iter(idle)))
            return True
        for conn in sorted(list(self._held), key=lambda held: held.idle_since):
            if self._held.pop(conn, False):
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)   # its worker's poll wakes
                except OSError:
                    pass
                return True
        return False

    def _refuse(self, conn, message):
        self.stats["refused"] += 1
        _send_at_once(conn.sock, error_response(None, 503, message, [("Retry-After", "1")]))
        conn.sock.close()

    def _on_readable(self, conn):
        if conn.waiting is None:
            return  # a stale report for a connection already handed on
        if conn.waiting == "idle":
            # the next request on a kept connection: a worker reads it (see _serve_connection),
            # so the reactor makes no recv and the head is checked once, not twice
            self._unpark(conn)
            self._queue_work(conn)
            return
        self._read_waiting(conn)
        if conn.waiting is not None:
            self._poller.arm(conn)  # still waiting: report it again (EPOLLONESHOT disarmed it)

    def _read_waiting(self, conn):
        data = conn.recv_ready()
        if data is None:
            return
        if not data:
            self._close(conn)
            return
        if conn.waiting == "linger":
            return
        if conn.waiting != "head":
            self._park(conn, "head")  # the head deadline starts with the head's first byte
        conn.buf += data
        self._check_head(conn)

    def _check_head(self, conn):
        """Dispatch the connection if its buffer holds a whole head; reject early what cannot
        become a valid one (a TLS hello, garbage, an over-long line or head)."""
        settings, buf = self.settings, conn.buf
        if buf[:1] in (b"\r", b"\n"):
            # RFC 9112 section 2.2: ignore empty lines before a request-line
            del buf[:len(buf) - len(buf.lstrip(b"\r\n"))]
            if not buf:
                return
        if buf[0] not in _TCHAR_BYTES or not _METHOD_PREFIX_RE.match(buf):
            self._reject(conn, 400, "not an HTTP request")
            return
        end = buf.find(b"\r\n\r\n")
        line_end = buf.find(b"\r\n")
        if end < 0 and _has_bare_lf(buf):
            # RFC 9112 section 2.2 lets a server take a lone LF as a line end; onebox refuses
            # it at once instead (a head with LF ends never completes, so it would otherwise
            # wait out header_timeout_s): every real client sends CRLF, and reading line ends
            # differently from a proxy in front is how requests are smuggled.
            self._reject(conn, 400, "line ends must be CRLF")
            return
        if line_end < 0:
            if len(buf) > settings.max_request_line_bytes:
                self._reject(conn, 414, "request line too long")
            return
        if line_end > settings.max_request_line_bytes:
            self._reject(conn, 414, "request line too long")
        elif not _REQUEST_LINE_BYTES_RE.fullmatch(buf, 0, line_end):
            self._reject(conn, 400, "malformed request line")
        elif (end if end >= 0 else len(buf)) + 4 > settings.max_head_bytes:
            self._reject(conn, 431, "request head too large")
        elif end >= 0:
            self._unpark(conn)
            self._queue_work(conn)

    def _queue_work(self, conn):
        self._busy.add(conn)
        self._work.put(conn)
        if not self._workers_wanted and self._work.qsize() > len(self._idle_workers):
            self._want_workers(True)

    def _want_workers(self, wanted):
        """Raise or lower the flag that sends workers holding idle connections back (see
        _Workers._hold): raised while connections wait in the queue for a worker, lowered once
        a worker waits for them instead."""
        self._workers_wanted = wanted
        if wanted:
            try:
                os.write(self._release_send, b"\0")
            except BlockingIOError:
                pass   # full: it is readable already
        else:
            try:
                while os.read(self._release_recv, 4096):
                    pass
            except BlockingIOError:
                pass

    def _reject(self, conn, status, message):
        """Answer a request that never reached a worker, then close."""
        self.stats["rejected"] += 1
        response = error_response(None, status, message)
        _send_at_once(conn.sock, response)
        note = None
        if status != 408:   # bytes no parser could take are a strike; slowness is not
            note = self.guard.saw_bad_request(conn.ip, conn.client, status, in_reactor=True)
        if self.access_log:
            line = bytes(conn.buf[:conn.buf.find(b"\r\n")] if b"\r\n" in conn.buf else b"")
            self.access_log.log(conn.ip, line[:200].decode("latin-1"), status,
                                len(response.body), "", "", 0.0, note)
        self._linger(conn)

    def _linger(self, conn):
        """Close for writing, then read and drop input for a while before closing: closing a
        socket with unread input sends RST, which can destroy the response before the client
        reads it (RFC 9112 section 9.6)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.buf = bytearray()
        self._park(conn, "linger")

    def _close(self, conn):
        if conn.waiting is not None:
            self._unpark(conn)
        self._busy.discard(conn)
        self._poller.forget(conn.sock)
        conn.sock.close()
        self._open -= 1
        count = self._per_ip[conn.client] - 1
        if count:
            self._per_ip[conn.client] = count
        else:
            del self._per_ip[conn.client]

    def _take_returned(self):
        try:
            while self._wakeup_recv.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self._book_returned()

    def _book_returned(self):
        while self._returned:
            conn, keep = self._returned.popleft()
            self._busy.discard(conn)
            if keep == "close":
                self._linger(conn)
            elif keep == "gone" or self._stopping:
                self._close(conn)
            elif keep == "armed":   # the worker re-armed it; its idle time began then
                conn.waiting = "idle"
                self._parked["idle"][conn] = conn.idle_since + self.settings.keepalive_timeout_s
            else:
                self._park(conn, "head" if conn.buf else "idle")
                if conn.buf:
                    self._check_head(conn)


# --- workers: serving a request ---------------------------------------------------------------
# Run in the worker pool. A worker owns a connection from the moment the reactor queues it until
# it appends it to ``_returned``: parse, guard, route, handler, body framing, response, log.

class _Workers:
    """The worker half of OneboxServer (a mixin: its state is made in OneboxServer.__init__)."""

    def _work_loop(self):
        idle = self._idle_workers
        while True:
            idle.append(None)   # list appends and pops are atomic: a count without a lock
            conn = self._work.get()
            idle.pop()
            if conn is None:
                return
            keep = "close"
            try:
                keep = self._serve_connection(conn)
            except Exception:
                self.log_error("connection error:\n" + traceback.format_exc())
            self._hand_back(conn, keep)

    def _hand_back(self, conn, keep):
        """Give ``conn`` back to the reactor. A kept connection with nothing buffered, the
        common case, is re-armed here and booked whenever the reactor next wakes: waking it for
        each response costs a send, a wake-up and a recv (serving 10 MiB files, the reactor's
        CPU per request fell from ~105 to ~60 us without them). It is woken only if it would
        sleep past the connection's idle deadline."""
        if keep == "keep" and not conn.buf and not self._stopping and self._poller.can_rearm:
            self._returned.append((conn, "armed"))   # before rearm: its report may come at once
            self._poller.rearm(conn)
            if conn.idle_since + self.settings.keepalive_timeout_s < self._wakes_at:
                self._wake()
        else:
            self._returned.append((conn, keep))
            self._wake()

    def _serve_connection(self, conn):
        """Serve the connection's requests. Returns "keep" to park the connection (an
        unfinished head goes back to the reactor, which waits for the rest), "close" to close
        it after the response, or "gone" if the client has closed it (or stayed idle)."""
        while True:
            if not conn.buf:   # an idle connection the reactor passed on unread
                data = conn.recv_ready()
                if data is None:
                    return "keep"   # a spurious report: wait again
                if not data:
                    return "gone"
                conn.buf += data
            keep = self._serve_buffered(conn)
            if keep != "keep" or conn.buf:
                return keep
            conn.idle_since = time.monotonic()
            keep = self._hold(conn)
            if keep != "ready":
                return keep

    def _hold(self, conn):
        """Wait here for the next request on a kept connection while no other connection
        needs a worker: "ready" when it comes, "keep" to hand the connection to the reactor
        (workers are wanted, or the server stops), "gone" when its idle time is up.

        Waiting here spares the next request the reactor's wake-up, the queue and a thread
        switch. The reactor raises the release flag when connections queue for a worker and
        none is idle; the poll below wakes at once, and the connection goes back to wait in
        the reactor, whose idle deadline counts from ``conn.idle_since``. (The reactor's idle
        table is in deadline order only roughly then: such a connection may outstay
        keepalive_timeout_s by as long as it was held.)

        Measured with bench/ab_static.py (10 MiB file, wrk -c16): server CPU per request fell
        from ~1,180 to ~1,130 us, context switches from 5.9 to 4.3 per request."""
        if self._workers_wanted or self._stopping:
            return "keep"
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        poller.register(self._release_recv, select.POLLIN)
        self._held[conn] = True
        ready = poller.poll(self.settings.keepalive_timeout_s * 1000)
        if not self._held.pop(conn, False) or not ready:
            return "gone"   # evicted by the reactor (see _evict_idle), or idle too long
        if self._workers_wanted or self._stopping:
            return "keep"
        return "ready"

    def _serve_buffered(self, conn):
        """The requests whose heads are in the buffer, a turn's worth."""
        for _ in range(MAX_REQUESTS_PER_TURN):
            buf = conn.buf
            if buf[:1] in (b"\r", b"\n"):
                del buf[:len(buf) - len(buf.lstrip(b"\r\n"))]
            end = buf.find(b"\r\n\r\n")
            if end < 0 or end + 4 > self.settings.max_head_bytes:
                return "keep"
            if not self._serve_one(conn, end) or self._stopping:
                return "close"
            if not conn.buf:
                return "keep"
        return "keep"

    def _serve_one(self, conn, end):
        """The request whose head ends at ``end`` in the buffer, in six steps. Returns whether
        the connection may be kept open."""
        settings = self.settings
        started = time.monotonic()
        raw_head = bytes(conn.buf[:end])
        del conn.buf[:end + 4]
        head = request = reader = verdict = None
        unrouted = False
        try:
            # 1. Parse and check the head; build the request and its body reader. Whatever
            # else the client's bytes make the parser raise is a 400 too, logged in one line:
            # a traceback per request would let anyone fill the error log.
            try:
                head = parse_head(raw_head, settings)
                reader = self._body_reader(conn, head)
                request = self._build_request(conn, head, reader)
            except HTTPError:
                raise
            except Exception as error:
                self.log_error("unparsable request from %s: %s" % (conn.ip, type(error).__name__))
                raise HTTPError(400, "malformed request") from None
            # 2. The abuse guard (429, 403, or a dry-run note), then route and run the handler
            # (or a static page).
            verdict = self.guard.check(request, conn.client)
            if verdict is not None and not verdict.dry_run:
                raise HTTPError(verdict.status, verdict.message, verdict.headers)
            response = self._dispatch(request)
        except NotRouted as error:
            unrouted = True
            response = self._error_for(request, error)
        except HTTPError as error:
            response = self._error_for(request, error)
        # a request that could not even be built leaves the framing in doubt: close
        keep_alive = request is not None and head.keep_alive and not self._stopping
        if verdict is not None and verdict.close:
            keep_alive = False  # a banned client reconnects, and meets the ban at accept
        # 3. Whatever body the handler left unread is drained (judging its framing) before the
        # answer goes out: a malformed or oversized body turns the answer into its 400 or 413.
        # Past max_drain_bytes, with the client waiting for 100 Continue, or when the request
        # was refused before it was built, the connection closes instead.
        if reader is not None and not reader.done:
            if reader.broken or (reader.expect_continue and not reader.continue_sent):
                keep_alive = False
            elif request is None or not reader.drain(settings.max_drain_bytes):
                keep_alive = False
                if reader.failure is not None and reader.failure.status in (400, 413):
                    response = error_response(request, reader.failure.status,
                                              reader.failure.message)
        # 4. A request the parser refused is a strike, and a 404 that no route or page answered
        # counts toward scanner detection (a handler's own "no such note" does not), before the
        # client can see the answer, so that its next request meets the ban. Then write it.
        note = verdict.note if verdict is not None else None
        if request is None:
            note = self.guard.saw_bad_request(conn.ip, conn.client, response.status) or note
        elif unrouted:
            note = self.guard.saw_404(request, conn.client) or note
        version = head.version if head is not None else "HTTP/1.1"
        head_only = request is not None and request.method == "HEAD"
        try:
            sent = write_response(conn.sock, response, keep_alive, version, head_only)
        except StreamFailed as error:
            self.log_error("%s %s: streamed body failed:\n%s" % (request.method, request.path, error))
            keep_alive, sent = False, 0
        except ClientGone:
            keep_alive, sent = False, 0
        except (TypeError, ValueError):
            # a handler set a malformed header or body; nothing has been sent yet
            self.log_error("bad response:\n" + traceback.format_exc())
            response = error_response(request, 500, "internal server error")
            keep_alive = False
            sent = write_response(conn.sock, response, False, version, head_only)
        # 5. Log it, with the guard's decision.
        if self.access_log:
            request_line = head.request_line if head else raw_head.split(b"\r\n", 1)[0][:200]
            fields = head.fields if head else {}
            self.access_log.log(
                request.client_ip if request else conn.ip,
                request_line if isinstance(request_line, str) else request_line.decode("latin-1"),
                response.status, sent, (fields.get("referer") or ("",))[0],
                (fields.get("user-agent") or ("",))[0], time.monotonic() - started, note)
        conn.served += 1
        # 6. Keep the connection for the next request, or not.
        return keep_alive

    def _body_reader(self, conn, head):
        """The body's reader, made before anything can fail, so that even an error response
        knows how to skip the body (or that it must close instead)."""
        if head.chunked:
            return ChunkedBody(conn, head, self.settings)
        if head.content_length:
            return LengthBody(conn, head, self.settings)
        return None

    def _build_request(self, conn, head, reader):
        if head.method not in METHODS:
            raise HTTPError(501, "method not implemented")
        if head.content_length > self.settings.max_body_bytes:
            raise HTTPError(413, "request body too large")  # before reading a byte of it
        raw_path, query = split_target(head)
        allowed = self.config.allowed_hosts
        if allowed is not None and not host_allowed(allowed, (head.fields.get("host") or ("",))[0]):
            # RFC 9110 section 15.5.20; a browser sent here by DNS rebinding names another host
            raise HTTPError(421, "this server does not serve that host")
        path, segments = decode_path(raw_path)
        return Request(head.method, head.target, path, segments, query,
                       Headers(head.fields), conn.ip, head.version, reader)

    def _dispatch(self, request):
        """Handler routes first, then static pages; 404 and 405 (with Allow) otherwise."""
        method = request.method
        if request.path == "*":
            return Response(b"", 204, [("Allow", ", ".join(METHODS))])
        route, params, allowed = self.router.match(method, request.segments)
        if route is not None:
            request.params = params
            return self._call(route.handler, request)
        if allowed is not None:
            if method == "OPTIONS":
                return Response(b"", 204, [("Allow", allowed)])
            raise HTTPError(405, "method not allowed", [("Allow", allowed)])
        if method in ("GET", "HEAD"):
            response = self.static.serve(request)
            if response is not None:
                return response
        elif self.static.resolve(request.segments) is not None:
            if method == "OPTIONS":
                return Response(b"", 204, [("Allow", _static.STATIC_METHODS)])
            raise HTTPError(405, "method not allowed", [("Allow", _static.STATIC_METHODS)])
        raise NotRouted(404, "not found")

    def _call(self, handler, request):
        try:
            return to_response(handler(request))
        except HTTPError:
            raise
        except Exception as error:
            status = getattr(type(error), "http_status", None)
            if status is not None:
                # an infrastructure error that declares its status (e.g. storage full: 503)
                self.log_error("%s %s: %s" % (request.method, request.path, error))
                raise HTTPError(status, getattr(type(error), "public_message", "")) from None
            self.log_error("%s %s raised:\n%s" % (request.method, request.path,
                                                   traceback.format_exc()))
            raise HTTPError(500, "internal server error") from None

    def _error_for(self, request, error):
        if error.status == 404 and request is not None and request.method in ("GET", "HEAD"):
            response = self.static.not_found(request)
            response.headers.extend(error.headers)
            return response
        return error_response(request, error.status, error.message, error.headers)


# --- server -----------------------------------------------------------------------------------

class OneboxServer(_Reactor, _Workers, http.server.ThreadingHTTPServer):
    """The listening socket (from the stdlib class), the reactor and the worker pool.

    For callers: ``serve_forever()`` (runs the reactor in the calling thread until shutdown),
    ``shutdown()`` (from another thread: stop and wait), ``begin_shutdown()`` (from a signal
    handler: stop without waiting), ``server_close()``, ``url``.
    """

    request_queue_size = 1024   # listen backlog: bursts of connects queue instead of failing
    allow_reuse_address = True

    def __init__(self, config, router, access_stream=None, error_stream=None, store=None):
        settings = config.server
        self.config = config
        self.settings = settings
        self.router = router
        self.store = store   # the shared state; closed (and compacted) after the workers stop
        if store is not None:
            state.bind(store)
        self.static = StaticPages(settings.pages_dir, config.static)
        self.error_stream = error_stream or sys.stderr
        # The abuse guard (handlers/_guard.py): bans persist in the store; the response cache
        # is the process's, emptied and sized here.
        self.guard = Guard(config.guard, store, self.log_error)
        response_cache.configure(config.cache.max_entries, config.cache.max_bytes)
        self.access_log = None
        if settings.access_log:
            self.access_log = AccessLog(access_stream or sys.stdout, settings.log_flush_interval_s,
                                        settings.log_buffer_bytes, self.log_error)
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        super().__init__((settings.host, settings.port), http.server.BaseHTTPRequestHandler,
                         bind_and_activate=False)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise
        self.socket.setblocking(False)
        if config.allowed_hosts is None and not _is_loopback(settings.host):
            self.log_error("listening on %s with any Host allowed: set allowed_hosts in [server] "
                           "(e.g. allowed_hosts = example.org) so that DNS rebinding cannot "
                           "reach this server from a browser" % settings.host)
        seconds = int(settings.write_timeout_s)
        self._send_timeout = struct.pack(   # a struct timeval, for SO_SNDTIMEO at each accept
            "ll", seconds, int((settings.write_timeout_s - seconds) * 1e6))
        self._stopping = False
        self._stopped = threading.Event()
        self._reactor_thread = None
        self._poller = _Poller()
        self._wakeup_recv, self._wakeup_send = socket.socketpair()
        self._wakeup_recv.setblocking(False)
        self._wakeup_send.setblocking(False)
        self._returned = collections.deque()   # (conn, keep) handed back by workers
        self._wakes_at = 0.0   # when the reactor's current wait ends at the latest
        self._work = queue.SimpleQueue()
        self._workers = []
        self._idle_workers = []   # one item per worker waiting on _work
        self._held = {}   # kept connections that workers wait on: see _Workers._hold
        self._workers_wanted = False   # raised by the reactor: see _Workers._hold
        self._release_recv, self._release_send = os.pipe()
        os.set_blocking(self._release_recv, False)
        os.set_blocking(self._release_send, False)
        # Reactor-only tables (no lock: only the reactor thread touches them):
        self._parked = {kind: collections.OrderedDict() for kind in ("new", "head", "idle",
                                                                     "linger")}
        self._busy = set()
        self._backup_requested = False
        self._backup_thread = None
        self._sighup_received = False
        self.stuck_workers = 0
        self._open = 0
        self._per_ip = {}
        self.stats = collections.Counter()

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall for seconds on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self):
        host, port = self.server_address[:2]
        host = "[%s]" % host if ":" in host else host
        return "http://%s:%d/" % (host, port)

    def log_error(self, message):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            self.error_stream.write("%s onebox: %s\n" % (stamp, message.rstrip()))
            self.error_stream.flush()
        except (OSError, ValueError):
            pass

    def serve_forever(self, poll_interval=None):
        self._reactor_thread = threading.current_thread()
        if self.access_log:
            self.access_log.start()
        for number in range(self.settings.worker_threads):
            worker = threading.Thread(target=self._work_loop, name="onebox-worker-%d" % number)
            worker.start()
            self._workers.append(worker)
        self._poller.watch(self.socket, "listener")
        self._poller.watch(self._wakeup_recv, "wakeup")
        try:
            while not self._stopping:
                self._reactor_step()
                if self._backup_requested:
                    self._start_backup()
                if self._sighup_received:
                    self._sighup_received = False
                    self.log_error("SIGHUP received and ignored: onebox cannot reload yet; "
                                   "restart it to apply changes")
            self._drain()
        finally:
            if self._backup_thread is not None:
                self._backup_thread.join()
            self._stop_workers()
            self._close_store()
            if self.access_log:
                self.access_log.close()
            self._stopped.set()

    def begin_shutdown(self):
        """Ask the reactor to stop; safe from signal handlers and any thread."""
        self._stopping = True
        self._wake()   # the reactor's drain then sends held connections back (_want_workers)

    def shutdown(self):
        if threading.current_thread() is self._reactor_thread:
            raise RuntimeError("shutdown() from the serving thread would deadlock; "
                               "use begin_shutdown()")
        self.begin_shutdown()
        if self._reactor_thread is not None:
            self._stopped.wait()

    def server_close(self):
        self._close_store()
        socketserver.TCPServer.server_close(self)
        for sock in (getattr(self, "_wakeup_recv", None), getattr(self, "_wakeup_send", None)):
            if sock is not None:
                sock.close()
        for name in ("_release_recv", "_release_send"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)   # server_close may be called twice
        if getattr(self, "_poller", None) is not None:
            self._poller.close()

    def _close_store(self):
        store, self.store = getattr(self, "store", None), None
        if store is None:
            return
        state.unbind(store)
        try:
            store.close()
        except StateError as error:
            self.log_error("closing the state store: %s" % error)

    def request_backup(self):
        """Ask for a snapshot in data_dir/backups/ (SIGUSR1); safe from signal handlers."""
        self._backup_requested = True
        self._wake()

    def note_sighup(self):
        """SIGHUP: logged (by the reactor) and ignored; safe from signal handlers. Its default
        action would kill the process without a drain."""
        self._sighup_received = True
        self._wake()

    def _start_backup(self):
        self._backup_requested = False
        if self.store is None or (self._backup_thread and self._backup_thread.is_alive()):
            return
        self._backup_thread = threading.Thread(target=self._write_backup, args=(self.store,),
                                               name="onebox-backup")
        self._backup_thread.start()

    def _write_backup(self, store):
        folder = os.path.join(self.settings.data_dir, "backups")
        path = os.path.join(folder, time.strftime("state-%Y%m%dT%H%M%SZ.snapshot", time.gmtime()))
        try:
            os.makedirs(folder, 0o700, exist_ok=True)
            os.chmod(folder, 0o700)   # makedirs' mode passes through the umask
            store.backup(path + ".tmp")
            os.replace(path + ".tmp", path)
            self.log_error("backup written: %s" % path)
        except (OSError, StateError) as error:
            self.log_error("backup failed: %s" % error)

    def _wake(self):
        try:
            self._wakeup_send.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending already) or closed (shut down)

    def _drain(self):
        """Shutdown: close the listener and waiting connections, give busy ones
        shutdown_timeout_s to finish, then cut what is left."""
        self._poller.forget(self.socket)
        self.socket.close()
        self._want_workers(True)   # workers holding idle connections let go (see _hold)
        for parked in self._parked.values():
            for conn in list(parked):
                self._close(conn)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        while self._busy and time.monotonic() < deadline:
            self._poller.poll(min(0.05, max(0.0, deadline - time.monotonic())))
            self._take_returned()
            for parked in self._parked.values():
                for conn in list(parked):
                    self._close(conn)
        for conn in list(self._busy):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # unblocks its worker's send or recv
            except OSError:
                pass

    def _stop_workers(self):
        for _ in self._workers:
            self._work.put(None)
        give_up = time.monotonic() + WORKER_JOIN_S
        for worker in self._workers:
            worker.join(max(0.0, give_up - time.monotonic()))
        self.stuck_workers = sum(worker.is_alive() for worker in self._workers)
        if self.stuck_workers:
            self.log_error("%d handler(s) still running after shutdown; exiting anyway"
                           % self.stuck_workers)
        self._workers = []
        while self._returned:
            conn, _ = self._returned.popleft()
            if conn in self._busy:
                self._close(conn)


def _is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


def make_server(port=0, host="127.0.0.1", pages_dir=None, data_dir=None, config=None,
                config_file=None, access_log=None, error_log=None, routes=()):
    """Build a server from defaults (or ``config_file``), ``config`` overrides and the
    keyword arguments; the seam tests use. ``routes`` adds (method, pattern, handler) rows to
    the areas' routes. Call ``serve_forever()`` in a thread."""
    overrides = dict(config or {})
    overrides.update(port=port, host=host)
    if pages_dir is not None:
        overrides["pages_dir"] = str(pages_dir)
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    settings = load_config(config_file, overrides)
    rows = load_routes() + [tuple(row) + ("make_server(routes=...)",) for row in routes]
    router = Router(rows)
    store = open_store(settings)
    try:
        return OneboxServer(settings, router, access_log, error_log, store)
    except Exception:
        store.close()  # release the data dir, then let the error through
        raise


def open_store(config, repair=False):
    """The shared state store, per [state]; raises StateLockedError / StateCorruptError."""
    return Store(config.server.data_dir, durability=config.state.durability,
                 batch_interval_ms=config.state.batch_interval_ms,
                 compact_journal_bytes=config.state.compact_journal_bytes, repair=repair)


# --- command line -----------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="server.py", description="onebox: a web server in one Python process.")
    parser.add_argument("--config", default=DEFAULT_CONFIG_FILE,
                        help="settings file (default: setup.cfg beside server.py)")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and the routes, then exit 0 or 1")
    parser.add_argument("--repair", action="store_true",
                        help="keep the good prefix of a damaged journal, move the damaged file "
                             "aside, then exit")
    parser.add_argument("--backup", metavar="PATH",
                        help="write a consistent snapshot of the state to PATH (asks the running "
                             "server for it if there is one), then exit")
    for section, settings in SETTINGS.items():
        for setting in settings:
            flag = setting.name if section == "server" else section + "_" + setting.name
            parser.add_argument("--" + flag.replace("_", "-"), dest="set:%s.%s"
                                % (section, setting.name), metavar=setting.kind.upper(),
                                help="%s (default %s)" % (setting.why, setting.default))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {dest[4:]: value for dest, value in vars(args).items()
                 if dest.startswith("set:") and value is not None}
    try:
        config = load_config(args.config, overrides)
        router = Router(load_routes())
    except (ConfigError, RouteError) as error:
        print("onebox: %s" % error, file=sys.stderr)
        return 1
    if args.check:
        print("onebox: configuration and routes are valid (%s)" % args.config)
        return 0
    if args.backup:
        return backup_state(config, args.backup)
    try:
        store = open_store(config, repair=args.repair)
    except StateLockedError as error:
        print("onebox: %s" % error, file=sys.stderr)
        return 2
    except (StateError, OSError) as error:
        print("onebox: cannot open the state in %s: %s" % (config.server.data_dir, error),
              file=sys.stderr)
        return 1
    if args.repair:
        store.close()
        print("onebox: %s is consistent; start the server as usual" % config.server.data_dir)
        return 0
    raise_file_limit(config.server.max_connections + 64)
    try:
        server = OneboxServer(config, router, store=store)
    except OSError as error:
        store.close()
        print("onebox: cannot listen on %s port %s: %s"
              % (config.server.host, config.server.port, error.strerror), file=sys.stderr)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.begin_shutdown())
    signal.signal(signal.SIGUSR1, lambda *_: server.request_backup())
    signal.signal(signal.SIGHUP, lambda *_: server.note_sighup())
    print("listening on %s" % server.url, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    if server.stuck_workers:
        # a handler ignored shutdown; non-daemon threads would keep the process alive forever
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def backup_state(config, path, wait_s=60.0):
    """--backup: snapshot the state to ``path``. A stopped server's data dir is opened directly;
    a running server (it holds the lock) is sent SIGUSR1 and its new backup is copied."""
    data_dir = config.server.data_dir
    try:
        store = open_store(config)
    except StateLockedError:
        return _backup_from_running_server(data_dir, path, wait_s)
    except (StateError, OSError) as error:
        print("onebox: cannot open the state in %s: %s" % (data_dir, error), file=sys.stderr)
        return 1
    try:
        store.backup(path)
    finally:
        store.close()
    print("onebox: backup written to %s" % path)
    return 0


def _backup_from_running_server(data_dir, path, wait_s):
    try:
        with open(os.path.join(data_dir, "lock")) as lock:
            pid = int(lock.read().strip())
        folder = os.path.join(data_dir, "backups")
        before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        os.kill(pid, signal.SIGUSR1)
    except (OSError, ValueError) as error:
        print("onebox: the data dir is in use, and its server could not be asked for a backup "
              "(%s); run this as the server's user" % error, file=sys.stderr)
        return 1
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        new = sorted(name for name in present - before if name.endswith(".snapshot"))
        if new:
            _copy_private(os.path.join(folder, new[-1]), path)
            print("onebox: backup from the running server (pid %d) written to %s" % (pid, path))
            return 0
        time.sleep(0.1)
    print("onebox: the running server (pid %d) wrote no backup within %ds; see its error log"
          % (pid, wait_s), file=sys.stderr)
    return 1


def _copy_private(source, target):
    """Copy a backup to a file only its owner may read (0600 whatever the umask): it holds
    the whole state."""
    with open(source, "rb") as original:
        data = original.read()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as copy:
        os.fchmod(fd, 0o600)
        copy.write(data)


def raise_file_limit(wanted):
    """Each connection is a file descriptor; lift the soft limit toward the hard one."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


if __name__ == "__main__":
    sys.exit(main())
