"""Settings: every limit in one table, read from setup.cfg and overridden by flags.

Owns ``SETTINGS`` (each setting with its unit in its name, its default and the reason for it),
``load_config`` (defaults, then a setup.cfg, then overrides) and the checks that stop start-up
with a message naming the file, the section and the key. Pure: no sockets, no threads. The
reference page docs/settings.md is generated from the tables here: ``settings_markdown``, run as
``python3 -m onebox.settings --markdown > docs/settings.md``.

Imports only the standard library, the policy compilers of ``onebox.static`` and
``onebox.guard`` (so that a bad rule fails here, at start-up) and ``onebox.accounts``' check of
``scrypt_n``; never the engine or ``server``.
"""
import collections
import configparser
import difflib
import math
import os
import re
import types

from onebox.accounts import check_scrypt_n
from onebox.guard import GuardPolicy
from onebox.redis import parse_url
from onebox.static import compile_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the directory copied
DEFAULT_CONFIG_FILE = os.path.join(ROOT, "setup.cfg")

# Every limit lives here, with its unit in its name and the reason for its default. setup.cfg
# sections override the defaults, command-line flags override setup.cfg. Unknown keys and bad
# values stop start-up with a message naming the file, the section and the key.

_COOKIE_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")   # RFC 9110 5.6.2 token


class ConfigError(Exception):
    """Bad configuration; the message names where and how to fix it."""


Setting = collections.namedtuple("Setting", "name kind default minimum why choices maximum",
                                 defaults=(None, None))

# The longest wait a [server] setting may ask for: waits reach poll() (whose timeout is a C int
# of milliseconds, ~24.8 days) and SO_SNDTIMEO, and a larger value made them raise at run time.
LONGEST_WAIT_S = 86400.0

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
        Setting("reuse_port", "bool", False, None,
                "several processes listen on this port (SO_REUSEPORT; the kernel spreads "
                "connections among them): with [cluster], one box's cores all serve one site"),
        Setting("max_connections_per_ip", "int", 256, 1,
                "open connections from one address; past it 503 (a browser uses ~6)"),
        Setting("header_timeout_s", "float", 10.0, 0.001,
                "deadline for a whole request head, from its first byte (slowloris)",
                maximum=LONGEST_WAIT_S),
        Setting("keepalive_timeout_s", "float", 30.0, 0.001,
                "an idle keep-alive connection is closed after this",
                maximum=LONGEST_WAIT_S),
        Setting("body_timeout_s", "float", 30.0, 0.001,
                "longest wait for more request-body bytes before 408",
                maximum=LONGEST_WAIT_S),
        Setting("buffer_body_bytes", "int", 1048576, 0,
                "a body up to this (and max_body_bytes) is read before a worker sees the "
                "request; a larger one is streamed by its handler"),
        Setting("min_body_rate_bytes_s", "float", 240.0, 1.0,
                "a body must arrive at least this fast on average (after the grace), or 408"),
        Setting("body_rate_grace_s", "float", 5.0, 0.0,
                "how long a body may arrive slower than min_body_rate_bytes_s",
                maximum=LONGEST_WAIT_S),
        Setting("write_timeout_s", "float", 30.0, 0.001,
                "longest wait for a client to accept more response bytes",
                maximum=LONGEST_WAIT_S),
        Setting("min_response_rate_bytes_s", "float", 240.0, 1.0,
                "a client must take a response at least this fast on average (after the "
                "grace), or it is cut off"),
        Setting("response_rate_grace_s", "float", 5.0, 0.0,
                "how long a client may take a response slower than min_response_rate_bytes_s",
                maximum=LONGEST_WAIT_S),
        Setting("worker_write_s", "float", 0.1, 0.001,
                "a worker writes a response this long at most; a slower client's rest is "
                "finished by the reactor",
                maximum=LONGEST_WAIT_S),
        Setting("stall_timeout_s", "float", 10.0, 2.0,
                "the reactor must turn, and a queued job reach a worker, within this, or the "
                "server is unhealthy (no systemd watchdog ping; /healthz 503)",
                maximum=LONGEST_WAIT_S),
        Setting("max_workers_per_client", "int", 4, 1,
                "workers one client may hold at once; its other ready requests wait their turn"),
        Setting("max_waiting_per_client", "int", 32, 1,
                "bodies and responses one client may have waiting at once; more wait in line"),
        Setting("poller", "str", "epoll", None,
                "how the reactor waits: epoll (Linux; falls back to select elsewhere) or select "
                "(the portable path, forced)", ("epoll", "select")),
        Setting("max_buffered_bytes", "int", 64 * 1024 * 1024, 65536,
                "request heads and bodies the reactor buffers, and TLS handshakes under way, in "
                "all; past it the clients holding the most are cut (503) until 7/8 is held"),
        Setting("shutdown_timeout_s", "float", 10.0, 0.0,
                "how long busy requests may run on after SIGTERM",
                maximum=LONGEST_WAIT_S),
        Setting("drain_idle_s", "float", 1.0, 0.0,
                "while draining, how long an idle kept-alive or silent new connection may wait "
                "for its request (answered with Connection: close) before it is closed",
                maximum=LONGEST_WAIT_S),
        Setting("restart_wait_s", "float", 60.0, 0.1,
                "a successor (--restart, SIGUSR2) waits this long for the data dir the old "
                "server releases once drained; past it, it gives up",
                maximum=3600.0),
        Setting("max_request_line_bytes", "int", 8192, 64, "longer request lines get 414"),
        Setting("max_head_bytes", "int", 65536, 256, "larger request heads get 431"),
        Setting("max_header_count", "int", 100, 1, "more header lines get 431"),
        Setting("max_body_bytes", "int", 1048576, 0, "larger request bodies get 413"),
        Setting("max_json_bytes", "int", 65536, 0,
                "request.json() answers 413 past this (a handler may ask for up to "
                "max_body_bytes): 64 KiB parse in at most ~4 ms, 1 MiB in up to ~80"),
        Setting("max_drain_bytes", "int", 65536, 0,
                "unread body left by a handler is read and dropped up to this; past it close"),
        Setting("access_log", "bool", True, None, "one combined-format line per request on stdout"),
        Setting("log_flush_interval_s", "float", 1.0, 0.01,
                "access lines are written in batches at least this often",
                maximum=LONGEST_WAIT_S),
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
    "static": [   # how pages_dir is served; see onebox/static.py
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
        # A service worker's script must be revalidated: with updateViaCache 'all' an
        # update() takes the browser's cached copy for max_age_s and finds no update, and
        # importScripts() files are always read through the cache (docs/operations.md,
        # "Serving a PWA"). Requests carrying Service-Worker: script get the rule too.
        Setting("service_worker_scripts", "str", "sw.js service-worker.js", None,
                "file names (or /exact/paths) of service worker scripts and what they import: "
                "served with service_worker_cache_control"),
        Setting("service_worker_cache_control", "str", "no-cache", None,
                "Cache-Control of service worker scripts (validators are always sent); empty: "
                "no rule of their own"),
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
                "how long a URL's file (symlinks, index.html) is trusted; edits show at once",
                maximum=LONGEST_WAIT_S),
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
    # The abuse guard (onebox/guard.py tells the whole story). Lists are separated by spaces
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
        # A first visit's burst of static files is not a scraper's: a service worker precaches
        # a few hundred at once, and once. A client past its client_burst fetches existing
        # static files (GET/HEAD, no route) from this allowance instead, so that the site-wide
        # bucket's refill stays for its dynamic requests (onebox/guard.py, step 6).
        Setting("static_rate_per_s", "float", 10.0, 0.001,
                "sustained static-file requests/s per client on top of client_rate_per_s"),
        Setting("static_burst", "int", 500, 1,
                "static files a client may fetch at once past client_burst: a PWA's precache"),
        # A budget of handler CPU time per client, on top of the request counts: one request
        # can cost 10,000 hellos (a 1 MB JSON body: ~0.25 s holding the GIL; issue 19). The
        # GIL makes the whole process one core for handlers, so a few clients' budgets must
        # add up to well under one: at 0.25, four clients each posting 200 KB of JSON at
        # 20/s were never refused, and held another client's median latency at ~50 ms.
        Setting("client_cpu_per_s", "float", 0.1, 0.001,
                "handler CPU seconds per second a client may use sustained; over it, 429"),
        Setting("client_cpu_burst_s", "float", 0.5, 0.001,
                "handler CPU seconds a client may use at once before client_cpu_per_s applies"),
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
                "deny_user_agents deny_paths client_cpu client_rate route_rate scanner ban"),
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
    "sessions": [   # request.session and log_in (onebox/sessions.py, handlers/_sessions.py)
        Setting("cookie_name", "str", "onebox_session", None,
                "the session cookie's name (__Host- is put before it over HTTPS)"),
        Setting("idle_timeout_s", "float", 86400.0, 60.0,
                "a session unused this long is over (OWASP: as short as the site allows)"),
        Setting("absolute_timeout_s", "float", 7 * 86400.0, 60.0,
                "a session this old is over however much it is used"),
        Setting("max_sessions", "int", 100000, 1,
                "sessions kept at once; past it the oldest is evicted"),
        Setting("max_bytes", "int", 96 * 1024 * 1024, 4096,
                "memory for sessions (each counts its JSON plus 600 bytes held); past it the "
                "oldest are evicted"),
        Setting("max_session_bytes", "int", 4096, 256,
                "one session's stored size; a handler that puts more gets a 500"),
        Setting("login_failures_per_account", "int", 10, 1,
                "failed logins on one account before it gets 429 for login_window_s"),
        Setting("login_failures_per_client", "int", 20, 1,
                "failed logins from one client before it gets 429 for login_window_s"),
        Setting("login_window_s", "float", 300.0, 1.0,
                "how long failed logins count: the throttle's buckets refill over it"),
    ],
    # Live events (handlers/_events.py): publish() from handlers, server-sent event streams
    # held by the reactor (onebox/events.py, onebox/streams.py). Read at each use: a reload
    # applies to what comes next.
    "events": [
        Setting("max_subscribers", "int", 2048, 1,
                "event streams open at once; past it a new one gets 503. Each is a connection: "
                "half of max_connections' default, so streams never take every connection"),
        Setting("max_subscribers_per_client", "int", 16, 1,
                "event streams from one client (the guard's: behind a trusted proxy, each "
                "visitor); past it 429. A tab holds one or two: 16 fits a person's tabs"),
        Setting("heartbeat_s", "float", 15.0, 0.05,
                "a comment line to a stream sent nothing for this long, so that proxies "
                "(nginx: proxy_read_timeout, 60 s) keep it open", maximum=LONGEST_WAIT_S),
        Setting("retry_ms", "int", 2000, 0,
                "how long a browser waits before it reconnects a dropped stream (sent as "
                "retry:); at shutdown each stream is told a spread of 1-3 times this",
                maximum=3600000),
        Setting("ring_events", "int", 256, 0,
                "events kept per topic for clients that reconnect (Last-Event-ID); an older "
                "id gets event: reset. 0: none kept"),
        Setting("ring_bytes", "int", 16 * 1024 * 1024, 0,
                "memory for every topic's kept events together; past it the oldest go first"),
        Setting("max_event_bytes", "int", 65536, 64,
                "one event's size (its data and lines); publish() of a larger one raises "
                "EventTooLarge"),
        Setting("max_unsent_bytes", "int", 262144, 1024,
                "events a stream's client has not taken; past it the stream is cut off (and "
                "all streams' unsent events count against [server] max_buffered_bytes)"),
    ],
    "status": [   # what the status page shows; see onebox/activity.py
        Setting("recorder", "bool", True, None,
                "keep the last hour of traffic, top clients and paths, and guard decisions in "
                "memory for the status page (at most 400 KB); off: the page shows tables and "
                "bans only"),
        Setting("top_entries", "int", 50, 1,
                "clients and paths tracked per minute for the top tables (space-saving sketch)"),
        Setting("recent_decisions", "int", 200, 1,
                "guard refusals and bans kept for the status page (a run of one client's is one)"),
    ],
    # The admin listener (onebox/admin.py): /metrics, the status page and admin actions, on a
    # socket of their own, never on the public port. Off the loopback it needs a token.
    "admin": [
        Setting("host", "str", "127.0.0.1", None,
                "address of the admin listener; off loopback a token is required "
                "(ONEBOX_ADMIN_TOKEN or $CREDENTIALS_DIRECTORY/admin_token)"),
        Setting("port", "int_or_off", 8001, 0,
                "admin listener's TCP port; 0 picks a free one (and is the default when [server] "
                "port is 0); off: no admin listener"),
        Setting("max_connections", "int", 64, 1,
                "open admin connections; they skip the site's connection caps, so have their own"),
        Setting("metrics", "bool", True, None,
                "count requests for /metrics (per-thread counters); off saves a few us a request"),
    ],
    # HTTPS (onebox/tls.py). Off while cert_file is empty. The certificate and key are read at
    # start and again at each reload (SIGHUP): a renewed certificate needs no restart.
    "tls": [
        Setting("cert_file", "str", "", None,
                "PEM certificate chain (certbot: fullchain.pem); empty: no HTTPS"),
        Setting("key_file", "str", "", None,
                "PEM private key (certbot: privkey.pem); empty: the key is in cert_file"),
        Setting("host", "str", "", None, "address of the HTTPS listener; empty: [server] host"),
        Setting("port", "int", 8443, 0,
                "HTTPS TCP port (443 in production); 0 picks a free one (printed at start)"),
        Setting("redirect_http", "bool", False, None,
                "the plain listener ([server] port) answers 301 to https:// for every path "
                "but /.well-known/acme-challenge/ (served from pages_dir, for certbot)"),
        Setting("redirect_port", "int", 0, 0,
                "the HTTPS port named in those redirects; 0: the HTTPS listener's own "
                "(set 443 when a firewall maps 443 to port)"),
        Setting("hsts_max_age_s", "int", 0, 0,
                "Strict-Transport-Security max-age sent over HTTPS; 0: no header (browsers "
                "remember it: start small)"),
        Setting("hsts_include_subdomains", "bool", False, None,
                "add includeSubDomains to Strict-Transport-Security (every subdomain must "
                "serve HTTPS)"),
        Setting("expiry_warning_days", "int", 14, 0,
                "warn in the error log, at start and at each reload, when the certificate "
                "expires within this many days; 0: never"),
    ],
    # Users and passwords (onebox/accounts.py), for a login page and server.py --add-user.
    # Read at each hash: a reload applies to the next one, and a record keeps what made it.
    "accounts": [
        Setting("scrypt_n", "int", 131072, 16384,
                "scrypt cost (a power of two): each hash takes 128 * scrypt_n * 8 bytes and "
                "~0.3 s at 131072 (OWASP's minimum); older hashes are redone at their next login",
                maximum=1048576),
        Setting("min_password_chars", "int", 8, 8,
                "shorter passwords are refused (NIST SP 800-63B: at least 8); applies to new "
                "ones, never to logging in"),
        Setting("max_password_chars", "int", 1024, 64,
                "longer passwords are refused, so one attempt costs little to read and hash "
                "(NIST SP 800-63B: allow at least 64)", maximum=65536),
        Setting("max_parallel_hashes", "int", 2, 1,
                "scrypt hashes run at once (each holds a core and 128 MiB at the default "
                "scrypt_n); more wait their turn"),
        Setting("hash_wait_s", "float", 5.0, 0.0,
                "how long a password check waits for its turn before it is refused (a login "
                "page answers 503)", maximum=60.0),
    ],
    # Several processes as one site (onebox/cluster.py, docs/cluster.md): off while redis_url
    # is empty. The password comes from ONEBOX_REDIS_PASSWORD or $CREDENTIALS_DIRECTORY/
    # redis_password, never from this file; what Redis must persist follows [state] durability.
    "cluster": [
        Setting("redis_url", "str", "", None,
                "redis://host:port/db, rediss://host:port/db (TLS) or unix:///path?db=N: the "
                "state, the guard's counters, bans, cache invalidations and live events are "
                "shared through it; empty: this process alone (the default)"),
        Setting("key_prefix", "str", "onebox:", None,
                "every Redis key and channel onebox uses starts with it: two sites may share "
                "one Redis with different prefixes"),
        Setting("timeout_s", "float", 2.0, 0.05,
                "how long a Redis call may take before the request that made it gets 503",
                maximum=60.0),
        Setting("connections", "int", 16, 1,
                "idle Redis connections kept for reuse (one per worker thread serves the "
                "default pool without a connect per request)"),
    ],
    # Health checks on the public port, answered by the reactor thread itself: cheap, never
    # rate-limited, and a wedged worker pool is reported instead of hanging the check.
    "health": [
        Setting("live_path", "str", "/healthz", None,
                "200 ok while the reactor turns and a worker takes jobs, else 503 and why"),
        Setting("ready_path", "str", "/readyz", None,
                "200 while serving; 503 while starting, reloading or draining"),
        Setting("log_every_s", "float", 60.0, 0.0,
                "a successful health check is access-logged at most this often; 0 logs each"),
        Setting("max_head_bytes", "int", 1024, 256,
                "a health check's request head must fit in this (a monitor sends a few "
                "headers); a larger one gets 431"),
    ],
}

# [limits "/path"] sections: limits for the requests whose path matches (a route pattern such as
# /api/notes/{id}, a prefix ending in /, a * glob, or an exact path; the longest match wins).
# Their bucket is shared by every path that matches. Unset keys take the [limits] route values.
ROUTE_LIMIT_SETTINGS = [
    Setting("rate_per_s", "float", None, 0.001,
            "sustained requests/s per client to these paths; unset: [limits] route_rate_per_s"),
    Setting("burst", "int", None, 1,
            "requests to these paths at once; unset: [limits] route_burst"),
    Setting("dry_run", "bool", None, None,
            "only log what this limit would do; unset: whether [limits] dry_run names route_rate"),
]
_ROUTE_LIMITS_RE = re.compile(r'limits\s+"(/[^"]*)"')

# [static "/path"] sections: how the files under a prefix (a name ending in /) or at one path are
# served (onebox/static.py). Each key comes from the longest matching section that sets it.
STATIC_PATH_SETTINGS = [
    Setting("headers", "str", None, None,
            "headers added to these files, one 'Name: value' a line (with [static] "
            "extra_headers; a name in both: this one)"),
    Setting("cache_control", "str", None, None,
            "Cache-Control of these files, before every other rule"),
    Setting("fallback", "str", None, None,
            "a file (/app/index.html) served for unknown paths under a prefix to GET/HEAD "
            "requests that accept HTML and whose last segment has no '.' (client-side routes)"),
]
_STATIC_PATHS_RE = re.compile(r'static\s+"(/[^"]*)"')


def _parse_value(setting, raw, where):
    """Turn a setup.cfg or command-line string into the setting's type, or say why not."""
    if not isinstance(raw, str):
        value = raw
        if value is None and setting.kind == "int_or_off":
            return None
    elif setting.kind == "int_or_off" and raw.strip().lower() == "off":
        return None
    elif setting.kind in ("int", "int_or_off"):
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError("%s: %r is not a whole number" % (where, raw)) from None
    elif setting.kind == "float":
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError("%s: %r is not a number" % (where, raw)) from None
        if not math.isfinite(value):   # inf and nan would reach poll() and struct.pack
            raise ConfigError("%s: %r is not a finite number" % (where, raw))
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
    if setting.maximum is not None and not value <= setting.maximum:
        raise ConfigError("%s: %r is above the maximum %s" % (where, raw, setting.maximum))
    if setting.name in ("port", "redirect_port") and value > 65535:
        raise ConfigError("%s: %r is not a TCP port (0-65535)" % (where, raw))
    return value


def load_config(path=None, overrides=None):
    """Defaults, then ``path`` (a setup.cfg; None reads no file), then ``overrides``.

    ``overrides`` maps "key" (a [server] key) or "section.key" to a value or a string.
    Returns a namespace of sections: ``config.server.port``; also ``allowed_hosts``, ``guard``
    (the compiled [limits]), ``route_limits`` (the [limits "/path"] sections as (path,
    namespace) pairs) and ``source`` (``(path, overrides)``: what a reload reads again).
    """
    values = {section: {s.name: s.default for s in settings}
              for section, settings in SETTINGS.items()}
    base_dir = ROOT
    explicit = set()   # (section, key) set by the file or an override, not defaulted
    if path is not None:
        base_dir = os.path.dirname(os.path.abspath(path))
        _read_file(path, values, explicit)
    for dotted, raw in (overrides or {}).items():
        section, _, key = dotted.rpartition(".")
        _set_value(values, section or "server", key, raw, "setting %r" % dotted)
        explicit.add((section or "server", key))
    if values["server"]["port"] == 0 and ("admin", "port") not in explicit:
        values["admin"]["port"] = 0   # a test's (or a second instance's) free port: a free one too
    if values["server"]["port"] == 0 and ("tls", "port") not in explicit:
        values["tls"]["port"] = 0
    for key in ("live_path", "ready_path"):
        check_health_path(values["health"][key], "%s [health] %s" % (path or "settings", key))
    for key in ("pages_dir", "data_dir"):
        values["server"][key] = os.path.join(base_dir, values["server"][key])
    for key in ("cert_file", "key_file"):   # relative to the settings file, as pages_dir is
        if values["tls"][key]:
            values["tls"][key] = os.path.join(base_dir, values["tls"][key])
    server = values["server"]
    if server["max_request_line_bytes"] > server["max_head_bytes"]:
        raise ConfigError("max_request_line_bytes must not exceed max_head_bytes")
    check_accounts_settings(values["accounts"], path or "settings")
    allowed_hosts = parse_allowed_hosts(server["allowed_hosts"], path or "settings")
    route_limits = [(_ROUTE_LIMITS_RE.fullmatch(name).group(1),
                     types.SimpleNamespace(**values.pop(name)))
                    for name in sorted(set(values) - set(SETTINGS)) if name.startswith("limits")]
    # the [static "/path"] sections travel with [static], so that a reload's new StaticPages
    # gets them as it gets the rest (onebox/reload.py builds one from config.static)
    values["static"]["paths"] = [(_STATIC_PATHS_RE.fullmatch(name).group(1),
                                  types.SimpleNamespace(**values.pop(name)))
                                 for name in sorted(set(values) - set(SETTINGS))]
    check_static_settings(values["static"], path or "settings")
    config = types.SimpleNamespace(**{name: types.SimpleNamespace(**section)
                                      for name, section in values.items()})
    config.allowed_hosts = allowed_hosts
    config.route_limits = route_limits
    # Where these values came from, so that a reload (SIGHUP) reads the same file with the same
    # command-line overrides: load_config(*config.source).
    config.source = (path, dict(overrides or {}))
    try:
        config.guard = GuardPolicy(config.limits, route_limits)
    except ValueError as error:
        raise ConfigError("%s: %s" % (path or "settings", error)) from None
    check_cluster_settings(values["cluster"], path or "settings")
    if not _COOKIE_NAME_RE.fullmatch(config.sessions.cookie_name):
        raise ConfigError("%s [sessions] cookie_name: %r is not a cookie name (1-64 letters, "
                          "digits and !#$%%&'*+.^_`|~-: RFC 6265 4.1.1)"
                          % (path or "settings", config.sessions.cookie_name))
    return config


def _read_file(path, values, explicit):
    """Set ``values`` from the settings file at ``path``: our sections, and the
    [limits "/path"] ones; note in ``explicit`` each (section, key) the file sets."""
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
                explicit.add((section, key))
    for section in parser.sections():
        if section.startswith(("limits", "static")) and section not in SETTINGS:
            # [limits "/path"], [static "/path"]
            for key, raw in parser.items(section):
                _set_value(values, section, key, raw, "%s [%s] %s" % (path, section, key))
        elif section not in SETTINGS:
            _check_foreign_section(section, path)


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


def _check_foreign_section(section, path):
    """setup.cfg is shared ([metadata], [tool:pytest], other tools' sections are not ours), so
    an unknown section is let be, unless it looks like a misspelling of one of ours: [sever]
    would otherwise leave every setting in it silently unapplied."""
    near = difflib.get_close_matches(section.lower(), list(SETTINGS), n=1, cutoff=0.75)
    if near:
        raise ConfigError("%s: unknown section [%s]; did you mean [%s]?" % (path, section, near[0]))


def _set_value(values, section, key, raw, where):
    settings = {s.name: s for s in SETTINGS.get(section, ())}
    if section.startswith("limits") and section != "limits":
        if not _ROUTE_LIMITS_RE.fullmatch(section):
            raise ConfigError('%s: write a per-route section as [limits "/path"]' % where)
        settings = {s.name: s for s in ROUTE_LIMIT_SETTINGS}
        values.setdefault(section, {s.name: s.default for s in ROUTE_LIMIT_SETTINGS})
    elif section.startswith("static") and section != "static":
        if not _STATIC_PATHS_RE.fullmatch(section):
            raise ConfigError('%s: write a per-path section as [static "/path/"]' % where)
        settings = {s.name: s for s in STATIC_PATH_SETTINGS}
        values.setdefault(section, {s.name: s.default for s in STATIC_PATH_SETTINGS})
    elif section not in SETTINGS:
        raise ConfigError("%s: unknown section [%s]" % (where, section))
    if key not in settings:
        raise ConfigError("%s: unknown key; [%s] knows: %s"
                          % (where, section, ", ".join(sorted(settings))))
    values[section][key] = _parse_value(settings[key], raw, where)


def check_health_path(text, where):
    if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", text):
        raise ConfigError("%s: %r must be a plain path starting with / (letters, digits, "
                          "'._~-/')" % (where, text))


def check_static_settings(values, where="settings"):
    """Parse [static] and the [static "/path"] sections at start-up (and for --check), so a
    bad rule stops the server early."""
    try:
        compile_policy(types.SimpleNamespace(**values))
    except ValueError as error:
        raise ConfigError("%s %s" % (where, error)) from None


def check_cluster_settings(values, where):
    """A redis_url that can be parsed (the connection itself is judged at start-up)."""
    if values["redis_url"]:
        try:
            parse_url(values["redis_url"])
        except ValueError as error:
            raise ConfigError("%s [cluster] redis_url: %s" % (where, error)) from None
    if not re.fullmatch(r"[A-Za-z0-9:._{}-]{1,64}", values["key_prefix"]):
        raise ConfigError("%s [cluster] key_prefix: %r must be 1-64 letters, digits and "
                          "':._{}-'" % (where, values["key_prefix"]))


def check_accounts_settings(values, where):
    """scrypt_n a power of two, and the password's least length below its greatest."""
    try:
        check_scrypt_n(values["scrypt_n"])
    except ValueError as error:
        raise ConfigError("%s [accounts] %s" % (where, error)) from None
    if values["min_password_chars"] > values["max_password_chars"]:
        raise ConfigError("%s [accounts] min_password_chars must not exceed max_password_chars"
                          % where)


# --- docs/settings.md, generated from the tables above ----------------------------------------
# The reference page is made from SETTINGS so that docs and code cannot drift (gunicorn's
# settings page does the same); tests/test_docs.py fails when the checked-in page differs.

REGENERATE = "python3 -m onebox.settings --markdown > docs/settings.md"

_SECTION_ABOUT = {   # a line under each section's heading; links are relative to docs/
    "server": "The listeners, the connections and the requests: timeouts, minimum data rates, "
              "the caps on connections, workers and buffered bytes, the access log "
              "([how a connection is served](design.md#how-a-connection-is-served)).",
    "state": "The shared state store in `data_dir` "
             "([what each durability mode promises](operations.md#the-state-store)).",
    "static": "How `pages_dir` is served (`onebox/static.py`). `cache_control` and "
              "`extra_headers` take one entry a line (indent continuation lines in setup.cfg), "
              "e.g. `cache_control = /downloads/ no-store`.",
    "limits": "The abuse guard (`onebox/guard.py`; [the operator's view]"
              "(operations.md#the-abuse-guard)). Lists are separated by spaces or commas.",
    "cache": "The response cache of `@cached` handlers ([response cache]"
             "(areas.md#response-cache)).",
    "status": "What the status page keeps in memory (`onebox/activity.py`; [status page]"
              "(operations.md#status-page-and-bans)).",
    "admin": "The admin listener: `/metrics`, the status page and admin actions, on a socket "
             "of its own ([health and metrics](operations.md#health-and-metrics)).",
    "tls": "HTTPS (`onebox/tls.py`), off while `cert_file` is empty "
           "([HTTPS](operations.md#https)).",
    "accounts": "Users and their passwords, hashed with scrypt (`onebox/accounts.py`; "
                "[accounts](operations.md#accounts)).",
    "health": "`/healthz` and `/readyz` on the public port, answered by the reactor itself "
              "([health and metrics](operations.md#health-and-metrics)).",
}
_KINDS = {"int": "whole number", "float": "number", "bool": "on/off", "str": "text",
          "path": "path", "int_or_off": "whole number or off"}
_BINARY_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def _cell(text):
    """Text that stays inside one cell of a Markdown table."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _number(value):
    """10.0 as 10, 0.001 as 0.001, 1048576 as 1048576 (never 1.04858e+06)."""
    return "%d" % value if value == int(value) else repr(value)


def _shown(setting):
    """The default as setup.cfg would spell it; a size in bytes also in KiB, MiB or GiB."""
    value = setting.default
    if value is None:
        return "(unset)"
    if value == "":
        return "(empty)"
    if setting.kind == "bool":
        return "`%s`" % ("on" if value else "off")
    if isinstance(value, str):
        return "`%s`" % _cell(value)
    if setting.name.endswith("_bytes"):
        for unit, size in _BINARY_UNITS:
            if value >= size and not value % size:
                return "`%d` (%d %s)" % (value, value // size, unit)
    return "`%s`" % _number(value)


def _rule(setting):
    """The values a setting takes: its type or its choices, its minimum and maximum."""
    rule = _KINDS[setting.kind]
    if setting.choices:
        rule = "one of " + ", ".join("`%s`" % choice for choice in setting.choices)
    if setting.minimum is not None and setting.maximum is not None:
        rule += ", %s to %s" % (_number(setting.minimum), _number(setting.maximum))
    elif setting.minimum is not None:
        rule += ", at least %s" % _number(setting.minimum)
    return rule


def _table(settings, flag_prefix):
    """A table of ``settings``; each key with its flag unless ``flag_prefix`` is None."""
    lines = ["| key | default | values | why |", "|---|---|---|---|"]
    for setting in settings:
        key = "`%s`" % setting.name
        if flag_prefix is not None:
            key += "<br>`--%s`" % (flag_prefix + setting.name).replace("_", "-")
        lines.append("| %s | %s | %s | %s |" % (key, _shown(setting), _rule(setting),
                                                _cell(setting.why)))
    return lines


def settings_markdown():
    """docs/settings.md: every section of SETTINGS and the [limits "/path"] keys, as tables."""
    lines = [
        "# Settings",
        "",
        "<!-- Generated from SETTINGS in onebox/settings.py: do not edit this file. -->",
        "",
        "This page is generated from the `SETTINGS` table in `onebox/settings.py`: do not edit "
        "it, update the table instead, then run `%s` (`tests/test_docs.py` fails until the "
        "page and the table agree)." % REGENERATE,
        "",
        "Settings come from `setup.cfg` (the one beside `server.py`, or `--config PATH`), then "
        "from flags: a `[server]` key is a flag of its own (`--max-body-bytes 4096`), the other "
        "sections' keys carry the section's name (`--state-durability batch`). An unknown key "
        "or a bad value stops start-up with a message naming the file, the section and the key; "
        "`python3 server.py --check` checks them without serving. Relative paths are relative "
        "to the directory of `setup.cfg`. Which settings a reload (SIGHUP) applies and which "
        "wait for a restart: [reloading the configuration]"
        "(operations.md#reloading-the-configuration); more on some of them: "
        "[notes on settings](operations.md#notes-on-settings).",
    ]
    for section, settings in SETTINGS.items():
        lines += ["", "## `[%s]`" % section, ""]
        if section in _SECTION_ABOUT:
            lines += [_SECTION_ABOUT[section], ""]
        # the flags as server.py spells them: --max-body-bytes, --state-durability
        lines += _table(settings, "" if section == "server" else section + "_")
    lines += [
        "", '## `[limits "/path"]`', "",
        "Per-route limits, a section each: the name is a route pattern (`/api/notes/{id}`), a "
        "prefix ending in `/`, a `*` glob or an exact path; the longest match wins, and its "
        "bucket is shared by every path it matches. They have no flags.", ""]
    lines += _table(ROUTE_LIMIT_SETTINGS, None)
    lines += [
        "", '## `[static "/path"]`', "",
        "How the files under a prefix (a name ending in `/`) or at one path are served, a "
        "section each; each key comes from the longest matching section that sets it, and "
        "unset keys leave `[static]`'s rules alone. They have no flags. For example "
        "(a PWA in `pages/app/`: [serving a PWA](operations.md#serving-a-pwa)):", "",
        "```ini",
        '[static "/app/"]',
        "fallback = /app/index.html",
        '[static "/app/sw.js"]',
        "headers = Service-Worker-Allowed: /app/",
        "```", ""]
    lines += _table(STATIC_PATH_SETTINGS, None)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: " + REGENERATE)
    sys.stdout.write(settings_markdown())
