"""The abuse guard: who the client is, and whether it is served.

Why it lives in one process
---------------------------
Every request passes through the same tables, so one look answers "is this address hitting
this URL too often", "how much is it asking of the whole site", "is it walking a list of paths
that do not exist". The price is the memory of that tracking, so every table here has a hard
cap, evicts its least recently used entry past it, and reports its size in ``stats()``.

A request meets, in order (``Guard.check``, in a worker, before routing):

1. **Identity.** The client is the socket peer, unless the peer is one of ``trusted_proxies``:
   then it is the rightmost address in the proxy's forwarded header that is not itself a trusted
   proxy (every hop to the left of it could be forged by the client). Clients are grouped into
   keys: an IPv4 address each (``ipv4_prefix_bits``), an IPv6 /64 (``ipv6_prefix_bits``: one
   subscriber usually holds a whole /64, and would otherwise have 2**64 identities).
   A request that names no client beyond the trusted proxies (no forwarded header: a proxy's
   own health check, or a proxy that does not set the header) is the proxy's own, and skips
   everything below: limiting or banning a proxy would refuse every client behind it. A proxy
   that sends no header is reported once on the error log, since that is usually a mistake.
2. **Allowlisted addresses** (``allow_cidrs``) skip everything below.
3. **Bans**: 403, and the connection is closed; after ``ban_close_after_hits`` of those, the
   reactor closes the client's new connections at accept without reading a byte (``admit``).
4. **Deny rules** (``deny_cidrs``, ``deny_user_agents``, ``deny_paths``): 403.
5. **Exemptions** (``allow_paths``, by default /.well-known/, /robots.txt, /favicon.ico, and
   ``allow_user_agents``) skip the rate limits.
6. **Rate limits**: the client's CPU budget (below: refused while in debt), then a token bucket
   per client site-wide (``client_rate_per_s``/``client_burst``), then one per client per route
   (``route_rate_per_s``/``route_burst``, or the ``[limits "/path"]`` section that matches). A
   refusal is a 429 with Retry-After computed from the bucket that fired, and RateLimit-Policy /
   RateLimit fields. A static file has an allowance of its own (below).

A first visit is a burst of static files: a page's assets, then a service worker precaching
every file of its app at once (151 in the PWA of issue 25, which the site-wide burst of 100
refused: the worker's ``addAll`` failed, and nothing was cached). Those requests are the
cheapest the server answers (a file from memory: ~95,000 instructions, a tenth of a
millisecond), and a browser makes them once; what marks a scraper is volume over time, 404s
(``scanner_404_paths``) and dynamic routes. So each client also has a static allowance
(``static_rate_per_s``/``static_burst``, 10/s and 500), and a GET or HEAD of an existing static
file (no route takes it; the runtime's ``static_hit`` answers) draws on it once the site-wide
bucket has run dry, instead of being refused. From then on, while the allowance is not full
again (the client is in its table), the client's static hits draw on the allowance first and
on the site-wide bucket only when it is empty: the site-wide bucket's refill stays for its
dynamic requests, which a burst of files would otherwise take every token of as it comes.
The per-route bucket still counts each path (reloading one file is refused as before); 404s,
dynamic routes and a directory's fallback page draw on the site-wide bucket alone. With the
defaults a client may fetch 600 static files at once and 30 a second sustained (a PWA's
precache of a few hundred, twice in a second, passes; ``tests/test_pwa.py`` measures it); a
flood of 404s or of a route is refused after 100, as before. Nothing of this is on the path of a
request the site-wide bucket lets through: whether a request names a file is asked only of a
client past its burst (a route match and a file look-up, which serving the file then finds
cached), so a plain static hit costs what it did (one more dict look-up in ``check``).

Requests are not all alike: parsing and re-encoding a 1 MB JSON body holds the GIL for ~0.25 s,
so four addresses at 20 requests/s each (under the request limits) held a core and pushed other
clients' median latency to 391 ms (issue 19). So each client also has a budget of handler CPU
time, a token bucket of CPU seconds (``client_cpu_per_s``/``client_cpu_burst_s``): the worker
measures the handler's run and charges it afterwards (``charge``), which may put the bucket
into debt; while it is in debt, ``check`` refuses the client's requests (429, rule
``client_cpu``), until the refill has paid the debt back. A client can overdraw by what its
requests in flight cost (at most ``max_workers_per_client`` of them), never more.
What is charged is the thread's CPU time (``time.thread_time``), not the wall-clock time the
handler took. Wall time includes waiting for the GIL, and the GIL is busiest exactly when
someone is abusing it: a handler longer than the switch interval (5 ms) gives the GIL up every
5 ms and waits for it behind the others (a C call such as ``json.loads`` keeps it for its whole
run). Measured while four clients posted 200 KB JSON arrays, a handler that burns 20 ms of CPU
took 114 ms of wall time (median; 202 ms at p90): wall time would charge the innocent 5-10
times over for the abuser's cost. Thread time counts what the request made the machine do (C
code that released the GIL included), and no time spent waiting (for the GIL, a lock, the
disk: a worker blocked on a slow client is ``max_workers_per_client``'s business). Runs under
``CPU_CHARGE_MIN_S`` are not charged at all: see there.

Each 403 from a rule and each 429 is a strike; more than ``ban_after_rejections`` strikes within
``ban_window_s`` earn a ban of ``ban_s``, doubled for each repeat offence up to ``ban_max_s``.
After a 404 (``saw_404``), more than ``scanner_404_paths`` distinct 404 paths within
``scanner_window_s`` earn a ban too. Bans are written to the state store (``guard/bans/<key>``),
so a restart does not free an abuser; expired ones are dropped when noticed and at start-up.

Dry run: every rule and limit named in ``dry_run`` (or a route section's ``dry_run``) decides as
usual, but the request is served; the access log line carries what would have happened. A ban
earned by dry-run refusals is itself only logged.

Loopback by default: ``trusted_proxies`` and ``allow_cidrs`` both default to 127.0.0.1 and ::1
(gunicorn's and uvicorn's ``forwarded_allow_ips`` convention). A benchmark or health check on the
same machine is never limited, banned or capped per address, and a reverse proxy on the same
machine works without configuration, each client it forwards limited as itself. Without that,
a first ``wrk`` run banned 127.0.0.1 (persisted, so a restart did not lift it), and every visitor
behind a local nginx was one client, limited and then banned together (issue 10). Other
loopback addresses (127.0.0.2 and up) are ordinary clients.

Threads and locks: ``admit`` and ``saw_bad_request(..., in_reactor=True)`` run in the reactor
thread (whose bans are written to the store by the next worker's ``check``: the reactor never
waits on the disk), the rest in workers. Each table has one lock (the CPU limiter's own, one
that the site-wide and route limiters share, since a request takes from both at once,
``_suspects_lock``, ``_bans_lock``), held for a few dict operations; the state store is
written only by workers and never under a lock. Idle entries cost nothing to expire: each use
looks at the least recently used entry or two and drops them if stale; nothing sweeps a whole
table on the request path.

Several processes, one site (``[cluster] redis_url``, issue 24; ``join_cluster``)
--------------------------------------------------------------------------------------
Each process still decides alone, per request, but counts in Redis what must be counted
across all of them, so that a client spread over N processes (round-robin behind a balancer)
meets the limits one process would set:

* the site-wide, route and static buckets are ``SharedLimiter``s (onebox/limits.py: one Lua
  script for a pair, tokens reserved ahead while a bucket has plenty, each with the in-process
  bucket in front, which refuses a client over it without asking Redis);
* strikes (refusals, bad requests) and scanners' distinct 404 paths are counted in Redis, one
  key per client that expires with its window (``_STRIKE``, ``_SCAN``); a bad request the
  reactor saw is counted by the next worker (the reactor never waits on the network);
* bans live in the state store, which is Redis here; a ban or a lift is also told on the
  cluster's "bans" channel, and every process applies it to its table at once. Told messages
  are lost while a process is cut off, so when it subscribes again it reloads the bans from
  the store (``_reload_bans``), and writes the bans it made meanwhile.

The CPU budget stays per process: it is charged after the handler ran and read before the
next request, which in Redis would be a round trip per request for every client, not just the
ones it refuses; a client spread over N processes gets N budgets (each still bounded).
While Redis cannot be reached, everything above falls back to the in-process tables (logged
once each way, see ``SharedBuckets``): never a 5xx from the guard, and no request waits on a
connect attempt.

Imports the standard library, the contract's rate limit types (``handlers._limits``) and their
buckets (``onebox.limits``); never the engine, another runtime module or ``server``: the runtime
passes in what it needs (the cluster link included).
"""
import array
import collections
import hashlib
import ipaddress
import json
import re
import socket
import threading
import time

from handlers._limits import Hit, Policy, check_policy, rate_limit_headers
from onebox.limits import UNAVAILABLE, InProcessLimiter, SharedBuckets, SharedLimiter

__all__ = ["GuardPolicy", "Guard", "Verdict", "RULES", "BAN_PREFIX"]

RULES = ("deny_cidrs", "deny_user_agents", "deny_paths", "client_cpu", "client_rate",
         "route_rate", "scanner", "ban")
BAN_PREFIX = "guard/bans/"       # state store keys of the persisted bans
# Trusted proxy addresses remembered as already warned about for sending no forwarded header;
# past it no more such warnings are written (a proxy range can hold many addresses).
MAX_WARNED_PROXIES = 256
# Handler runs shorter than this (thread CPU seconds) are not charged to the client's CPU budget.
# Charging one is a call, a lock and a table entry per client; skipping it leaves each client at
# most client_rate_per_s * CPU_CHARGE_MIN_S uncharged (20 ms/s by default, under a tenth of the
# default budget), and whoever sends many cheap requests meets the request buckets instead. A
# hello's handler takes ~30 us; what the budget is for takes milliseconds to seconds.
CPU_CHARGE_MIN_S = 0.001
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
# Bad requests the reactor saw in a cluster, kept for a worker to count in Redis; past this many
# waiting, the oldest are dropped (counted per process instead: see saw_bad_request).
MAX_UNCOUNTED_STRIKES = 1024

# In a cluster: one strike for KEYS[1] (a client's); ARGV: the window (ms), the threshold.
# The window starts at the first strike, as a _Suspect's does. 1 when this strike is past the
# threshold (the count starts again), else 0.
_STRIKE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n > tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
# In a cluster: a 404 path (ARGV[1], a digest) in KEYS[1], a client's set of distinct ones;
# ARGV[2] the window (ms), ARGV[3] the most allowed. 1 when it is one too many, else 0.
_SCAN = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
local n = redis.call('SCARD', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n > tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


# --- addresses --------------------------------------------------------------------------------

def _packed(ip):
    """(family, packed bytes) of an address string, IPv4-mapped IPv6 as IPv4; None if it is not
    an address."""
    try:
        if ":" not in ip:
            return socket.AF_INET, socket.inet_pton(socket.AF_INET, ip)
        packed = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])  # drop a zone (%eth0)
    except (OSError, ValueError, TypeError):
        return None
    if packed[:12] == _V4_MAPPED:
        return socket.AF_INET, packed[12:]
    return socket.AF_INET6, packed


def _masked(packed, bits):
    size = len(packed) * 8
    value = int.from_bytes(packed, "big") >> (size - bits) << (size - bits)
    return value.to_bytes(len(packed), "big")


def client_key(ip, ipv4_bits=32, ipv6_bits=64):
    """The key a client address is tracked under: '192.0.2.7', '192.0.2.0/24',
    '2001:db8:1:2::/64'. Something that is not an address is its own key."""
    if ipv4_bits == 32 and "." in ip and ":" not in ip:
        return ip                                   # the common case, with no parsing
    found = _packed(ip)
    if found is None:
        return ip
    family, packed = found
    bits = ipv4_bits if family == socket.AF_INET else ipv6_bits
    if bits == len(packed) * 8:
        return socket.inet_ntop(family, packed)
    return "%s/%d" % (socket.inet_ntop(family, _masked(packed, bits)), bits)


def normal_address(item):
    """A forwarded-header item ('192.0.2.7', '192.0.2.7:80', '[2001:db8::1]:80', '"[::1]"')
    as a plain address string, or None if it is not one ('unknown', '_hidden', garbage)."""
    item = item.strip().strip('"')
    if item.startswith("["):
        item = item[1:].partition("]")[0]
    elif item.count(":") == 1:
        item = item.partition(":")[0]               # IPv4 with a port
    found = _packed(item)
    return None if found is None else socket.inet_ntop(*found)


class CidrSet(object):
    """Address ranges from a setting ("10.0.0.0/8 2001:db8::/32 192.0.2.7"); ``ip in cidrs``.

    Whole addresses (the shipped loopback defaults) are also kept as canonical text, so that
    the common look-up, a canonical peer address against a list of plain addresses, is one set
    test instead of packing and masking (~2.5 us a request); other forms take the full path."""

    __slots__ = ("networks", "addresses", "only_addresses")

    def __init__(self, text, setting):
        self.networks = []   # (family, network bits, prefix length)
        addresses = set()
        for item in _items(text):
            try:
                network = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError("[limits] %s: %r is not an address or CIDR range "
                                 "(e.g. 192.0.2.0/24)" % (setting, item)) from None
            family = socket.AF_INET if network.version == 4 else socket.AF_INET6
            self.networks.append((family, network.network_address.packed, network.prefixlen))
            if network.prefixlen == network.max_prefixlen:
                addresses.add(str(network.network_address))
        self.addresses = frozenset(addresses)
        self.only_addresses = len(addresses) == len(self.networks)

    def __bool__(self):
        return bool(self.networks)

    def __contains__(self, ip):
        if ip in self.addresses:
            return True
        if not self.networks or (self.only_addresses and "%" not in ip
                                 and not ip.startswith("::ffff:")):
            return False   # canonical text (inet_ntop's) of a plain address: the set decided
        found = _packed(ip)
        if found is None:
            return False
        family, packed = found
        return any(family == net_family and _masked(packed, bits) == net
                   for net_family, net, bits in self.networks)


def _items(text):
    return [item for item in re.split(r"[\s,]+", text or "") if item]


# --- settings, compiled -----------------------------------------------------------------------

def _path_regex(pattern, setting):
    """One path pattern as a regex: '/x/' is a prefix, '*' matches anything (even '/'),
    '{name}' one segment and '{name...}' the rest (route pattern syntax); else exact."""
    if not pattern.startswith(("/", "*")):
        raise ValueError("%s: path pattern %r must start with / (or a * glob)"
                         % (setting, pattern))
    parts = []
    for segment in re.split(r"(\{[^{}/]*\})", pattern):
        if segment.startswith("{") and segment.endswith("}"):
            parts.append(".*" if segment.endswith("...}") else "[^/]+")
        else:
            parts.append(".*".join(re.escape(piece) for piece in segment.split("*")))
    regex = "".join(parts)
    return regex + ".*" if pattern.endswith("/") else regex


class PathSet(object):
    """Path patterns from a setting ("/.well-known/ /robots.txt *.php"): exact paths and
    prefixes are a set and a tuple (the default exemptions cost one lookup each); globs and
    {wildcards} one regex."""

    __slots__ = ("exact", "prefixes", "regex")

    def __init__(self, text, setting):
        items = _items(text)
        regexes = {item: _path_regex(item, "[limits] %s" % setting) for item in items}
        wild = [item for item in items if "*" in item or "{" in item]
        self.exact = frozenset(item for item in items
                               if item not in wild and not item.endswith("/"))
        self.prefixes = tuple(item for item in items if item not in wild and item.endswith("/"))
        self.regex = re.compile("(?:%s)" % "|".join(regexes[item] for item in wild),
                                re.S) if wild else None

    def __bool__(self):
        return bool(self.exact or self.prefixes or self.regex)

    def matches(self, path):
        return (path in self.exact or path.startswith(self.prefixes)
                or (self.regex is not None and self.regex.fullmatch(path) is not None))


def _agents_regex(text, setting):
    if not text.strip():
        return None
    try:
        return re.compile(text.strip(), re.IGNORECASE)
    except re.error as error:
        raise ValueError("[limits] %s: not a valid regular expression: %s" % (setting, error))


class GuardPolicy(object):
    """The ``[limits]`` settings (and the ``[limits "/path"]`` sections), checked and compiled
    once at start-up. Raises ValueError with a message naming the setting."""

    def __init__(self, limits, route_sections=()):
        self.enabled = limits.enabled
        for name in ("ipv4_prefix_bits", "ipv6_prefix_bits", "ban_after_rejections",
                     "ban_window_s", "ban_s", "ban_max_s", "ban_close_after_hits",
                     "scanner_404_paths", "scanner_window_s", "max_tracked_clients",
                     "max_tracked_routes", "max_tracked_suspects", "max_bans"):
            setattr(self, name, getattr(limits, name))
        if self.ipv4_prefix_bits > 32:
            raise ValueError("[limits] ipv4_prefix_bits: %d is more than 32"
                             % self.ipv4_prefix_bits)
        if self.ipv6_prefix_bits > 128:
            raise ValueError("[limits] ipv6_prefix_bits: %d is more than 128"
                             % self.ipv6_prefix_bits)
        if self.ban_max_s < self.ban_s:
            raise ValueError("[limits] ban_max_s must not be less than ban_s")
        self.forwarded_header = limits.forwarded_header
        self.trusted_proxies = CidrSet(limits.trusted_proxies, "trusted_proxies")
        # the shipped default (loopback), which nobody chose: its proxy-less requests are most
        # likely a newcomer's own curl, not a proxy that forgot the header (see Guard.check)
        self.default_proxies = sorted(_items(limits.trusted_proxies)) == ["127.0.0.1", "::1"]
        # the fields of a request that came through a proxy (see Guard.check)
        self.proxy_signs = _PROXY_SIGNS | {self.forwarded_header}
        self.allow_cidrs = CidrSet(limits.allow_cidrs, "allow_cidrs")
        self.deny_cidrs = CidrSet(limits.deny_cidrs, "deny_cidrs")
        self.allow_agents = _agents_regex(limits.allow_user_agents, "allow_user_agents")
        self.deny_agents = _agents_regex(limits.deny_user_agents, "deny_user_agents")
        self.allow_paths = PathSet(limits.allow_paths, "allow_paths")
        self.deny_paths = PathSet(limits.deny_paths, "deny_paths")
        self.dry = self._dry_set(limits.dry_run)
        self.route_dry = "route_rate" in self.dry
        # booleans the per-request path tests first, so that unset rules cost nothing
        self.has_allow_cidrs = bool(self.allow_cidrs)
        self.has_deny_rules = bool(self.deny_cidrs or self.deny_agents or self.deny_paths)
        # Guard.check decides in its own frame when no deny rule is set (see there); exemptions
        # by exact path or prefix are tested there, the rest (globs, user agents) by _exempt
        self.quick = self.enabled and not self.has_deny_rules
        self.exempt_exact, self.exempt_prefixes = self.allow_paths.exact, self.allow_paths.prefixes
        self.exempt_by_rule = self.allow_paths.regex is not None or self.allow_agents is not None
        try:
            # in milliseconds of CPU, the unit the RateLimit fields count it in (q=1000;w=4:
            # a second of CPU, refilled from empty in 4 s), since they show whole numbers
            self.cpu_policy = check_policy(Policy("cpu", limits.client_cpu_per_s * 1000.0,
                                                  limits.client_cpu_burst_s * 1000.0))
            self.client_policy = check_policy(Policy("site", limits.client_rate_per_s,
                                                     limits.client_burst))
            self.route_policy = check_policy(Policy("route", limits.route_rate_per_s,
                                                    limits.route_burst))
            self.static_policy = check_policy(Policy("static", limits.static_rate_per_s,
                                                     limits.static_burst))
        except ValueError as error:
            raise ValueError("[limits] %s" % error) from None
        self.routes = self._route_overrides(route_sections)
        # the buckets' figures as plain attributes for Guard.check (a namedtuple's field is a
        # descriptor, which Python 3.11's attribute cache does not specialize)
        self.site_rate_per_s, self.site_burst = (self.client_policy.rate_per_s,
                                                 self.client_policy.burst)
        self.route_rate_per_s, self.route_burst = (self.route_policy.rate_per_s,
                                                   self.route_policy.burst)

    @staticmethod
    def _dry_set(text):
        names = set(_items(text))
        if "all" in names:
            return frozenset(RULES)
        unknown = names - set(RULES)
        if unknown:
            raise ValueError("[limits] dry_run: unknown %s; use all, or names among %s"
                             % (", ".join(sorted(unknown)), ", ".join(RULES)))
        return frozenset(names)

    def _route_overrides(self, sections):
        """[(regex, route key, Policy, dry)], most specific (longest pattern) first."""
        rows = []
        for path, section in sections:
            where = '[limits "%s"]' % path
            rate = section.rate_per_s if section.rate_per_s is not None \
                else self.route_policy.rate_per_s
            burst = section.burst if section.burst is not None else self.route_policy.burst
            try:
                policy = check_policy(Policy("route", rate, burst))
            except ValueError as error:
                raise ValueError("%s %s" % (where, error)) from None
            dry = section.dry_run if section.dry_run is not None else "route_rate" in self.dry
            rows.append((len(path), re.compile(_path_regex(path, where), re.S), path, policy, dry))
        rows.sort(key=lambda row: -row[0])
        return [row[1:] for row in rows]

    def route_for(self, path):
        """(route key, Policy, dry run) for the per-route bucket of ``path``."""
        for regex, key, policy, dry in self.routes:
            if regex.fullmatch(path):
                return key, policy, dry
        return path, self.route_policy, self.route_dry


# --- decisions --------------------------------------------------------------------------------

class Verdict(object):
    """The guard's decision on one request: ``status`` (429 or 403), a short client-safe
    ``message``, response ``headers``, the ``rule`` that fired, ``dry_run`` (log it, serve the
    request anyway), ``close`` (close the connection after answering) and ``ban`` ("" or what
    this request's ban was: "ban", "dry-run-ban")."""

    __slots__ = ("status", "message", "headers", "rule", "dry_run", "close", "ban")

    def __init__(self, status, message, headers, rule, dry_run=False, close=False):
        self.status = status
        self.message = message
        self.headers = headers
        self.rule = rule
        self.dry_run = dry_run
        self.close = close
        self.ban = ""

    @property
    def note(self):
        """What the access log line says: 'guard=429:client_rate', 'guard=dry-run:403:deny_paths',
        'guard=429:route_rate+ban'."""
        return "guard=%s%d:%s%s" % ("dry-run:" if self.dry_run else "", self.status, self.rule,
                                    "+" + self.ban if self.ban else "")


class _Suspect(object):
    """A client with recent refusals or 404s: its strike window and its distinct 404 paths."""

    __slots__ = ("strikes_since", "strikes", "paths_since", "paths")

    def __init__(self, now):
        self.strikes_since = self.paths_since = now
        self.strikes = 0
        self.paths = None    # array('q') of hash(path), made at the first 404


class _Ban(object):
    """A ban (wall-clock ``until``, persisted), or, once expired, the memory of one: offences
    double the next ban until it is forgotten ``ban_max_s`` after it ended."""

    __slots__ = ("until", "offences", "hits", "reason", "stored")

    def __init__(self, until, offences, reason, stored=False):
        self.until = until
        self.offences = offences
        self.hits = 0
        self.reason = reason
        self.stored = stored   # a record is in the state store (to delete once expired)


class Guard(object):
    """One server's abuse guard.

    For the runtime: ``admit(peer_ip)`` (reactor thread, at accept), ``check(request, key)``
    (worker, before routing), ``charge(request, key, seconds)`` (worker, after a handler that
    took ``CPU_CHARGE_MIN_S`` or more), ``saw_404(request, key)`` (worker, after a 404),
    ``stats()``, ``bans()``; for the operator (status page, ``--bans``/``--unban``):
    ``list_bans()``, ``lift_ban(address)``. ``key_of(ip)`` is the client grouping. Nothing is
    meant for overriding.
    ``store`` is the state store bans persist in (None: they live in memory only); ``log``
    takes one line for the error log; ``clock`` (monotonic) and ``wall`` (epoch) are seams.
    ``join_cluster(cluster)`` (the runtime, once, at start-up) makes it count with the others.
    """

    # In a cluster (join_cluster): the link, and the counting in Redis; None in one process.
    cluster = None
    _shared = None

    def __init__(self, policy, store=None, log=None, clock=time.monotonic, wall=time.time):
        self.policy = policy
        self.store = store
        self._log = log or (lambda message, detail=None, level="error": None)
        self._clock = clock
        self._wall = wall
        # The site-wide and per-route buckets share a lock: a request takes from both at once
        # (InProcessLimiter.take_pair).
        rates_lock = threading.Lock()
        self.clients = InProcessLimiter(policy.client_policy, policy.max_tracked_clients, clock,
                                        rates_lock)
        # CPU budgets (milliseconds), charged after the fact; only clients that ran handlers
        # for CPU_CHARGE_MIN_S or more are in it, and only until their bucket refills.
        self.cpu = InProcessLimiter(policy.cpu_policy, policy.max_tracked_clients, clock)
        self._cpu_tracked = self.cpu.tracked   # a client absent from it is not in debt
        self.routes = InProcessLimiter(policy.route_policy, policy.max_tracked_routes, clock,
                                       rates_lock)
        # Static allowances (see the module docstring), with the same lock: a static hit takes
        # its token and its route's in one take_pair. A client is in the table from its first
        # static hit past the site-wide burst until its allowance is full again and trimmed.
        self.statics = InProcessLimiter(policy.static_policy, policy.max_tracked_clients, clock,
                                        rates_lock)
        self._static_tracked = self.statics.tracked
        # Whether a request is a GET or HEAD of an existing static file that no route takes:
        # set by the runtime to a callable (request) -> bool (onebox.static.static_hit on the
        # current site). None: no static allowance, every request draws on the site-wide bucket.
        self.static_hit = None
        # _suspects_lock guards _suspects and every _Suspect in it.
        self._suspects_lock = threading.Lock()
        self._suspects = collections.OrderedDict()   # client key -> _Suspect, LRU first
        self._suspect_evictions = 0
        # _bans_lock guards _bans and every _Ban in it. The reactor takes it at accept only
        # when the table is not empty.
        self._bans_lock = threading.Lock()
        self._bans = collections.OrderedDict()       # client key -> _Ban, LRU first
        self._ban_evictions = 0
        # _counts_lock guards _counts (taken on refusals only, never for a served request).
        self._counts_lock = threading.Lock()
        # Bans the reactor made, for a worker to write (deque appends and pops are atomic).
        self._unsaved_bans = collections.deque()
        self._counts = collections.Counter()
        # _warned_lock guards _warned: the trusted proxies warned about for sending no forwarded
        # header (once each per process; at most MAX_WARNED_PROXIES of them).
        self._warned_lock = threading.Lock()
        self._warned = set()
        # Told of each refusal and ban, for the status page: set by the runtime to a callable
        # (client key, path, status, rule, ban, dry_run), e.g. onebox.activity.Activity.decision.
        self.on_decision = None
        if store is not None:
            self._load_bans()

    def replace_policy(self, policy):
        """Serve from now on under ``policy`` (a reload; reactor thread). What the guard has
        learnt is kept: buckets, suspects and bans (a reload must not free an abuser). A policy is
        never changed in place: swapping it is one assignment, and the checks read it into a
        local first, so a request decides under the old policy or the new one (a request in
        flight at the swap may see both). The limiters take rate and burst per call, and trim
        to their new caps as keys are added; the other tables trim as entries are added."""
        self.clients.policy, self.clients.max_keys = policy.client_policy, \
            policy.max_tracked_clients
        self.cpu.policy, self.cpu.max_keys = policy.cpu_policy, policy.max_tracked_clients
        self.routes.policy, self.routes.max_keys = policy.route_policy, policy.max_tracked_routes
        self.statics.policy, self.statics.max_keys = policy.static_policy, \
            policy.max_tracked_clients
        self.policy = policy

    # -- several processes, one site (see the module's docstring) ------------------------------
    def join_cluster(self, cluster):
        """Count across the processes of ``cluster`` (onebox/cluster.py) from now on: the
        runtime calls it once, after the bans were loaded and before ``cluster.start`` and any
        request. ``check`` is replaced by ``_check_in_cluster`` on this instance: the one-process
        ``check`` keys the route bucket by ``hash()``, which differs from process to process,
        and keeping it untouched keeps the one-process hot path as it was."""
        self.cluster = cluster
        self._shared = shared = SharedBuckets(cluster, self._log)
        self._strike_script = shared.script(_STRIKE)
        self._scan_script = shared.script(_SCAN)
        self.clients = SharedLimiter(shared, "site", self.clients)
        self.routes = SharedLimiter(shared, "route", self.routes)
        # a static file's allowance is shared too (its take_pair pairs it with the route's
        # bucket, which must be a SharedLimiter's partner); _static_tracked stays the local
        # table's, which the shared one keeps in front
        self.statics = SharedLimiter(shared, "static", self.statics)
        # bad requests seen by the reactor, for a worker to count (appends and pops are atomic)
        self._uncounted_strikes = collections.deque(maxlen=MAX_UNCOUNTED_STRIKES)
        # bans this process could not write while Redis was down: written when it is back
        # (_lost_bans_lock guards it)
        self._lost_bans_lock = threading.Lock()
        self._lost_bans = {}
        self.check = self._check_in_cluster
        cluster.on("bans", self._heard_bans)
        cluster.on_reconnect(self._reload_bans)

    def _check_in_cluster(self, request, key):
        """``check`` in a cluster: every request goes the long way (``_check``), whose route
        buckets are keyed by text every process agrees on; strikes the reactor saw are counted
        here first."""
        if self._unsaved_bans:
            self._save_deferred_bans()
        while self._uncounted_strikes:
            try:
                struck, verdict = self._uncounted_strikes.popleft()
            except IndexError:
                break                    # another worker took the last one
            self._strike(struck, verdict)
            if verdict.ban:
                self._tell(struck, "", verdict.status, "bad_request", verdict.ban)
        if key is None:
            return self._check_forwarded(request)
        return self._check(request, key)

    def _heard_bans(self, payload, from_self):
        """A ban or a lift told by a process of the cluster (the subscription's thread). Its
        sender wrote the store already; this process only updates its table."""
        if from_self:
            return
        try:
            message = json.loads(payload.decode("utf-8"))
            if "lift" in message:
                self._lifted_elsewhere(str(message["lift"]), str(message.get("by", "")))
                return
            key = str(message["ban"])
            until, offences = float(message["until"]), int(message["offences"])
            reason = str(message.get("reason", ""))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            self._log("guard: a ban told on the cluster could not be read: %s" % error)
            return
        with self._bans_lock:
            ban = self._bans.get(key)
            if ban is not None and ban.until >= until:
                return                   # told twice, or ours already
            self._bans[key] = _Ban(until, offences, reason, stored=True)
            self._bans.move_to_end(key)
            self._trim_bans_locked(self._wall())
        self._log("guard: banned %s for %gs (told by the cluster: %s; offence %d)"
                  % (key, until - self._wall(), reason, offences), level="info")

    def _lifted_elsewhere(self, key, by):
        with self._bans_lock:
            ban = self._bans.pop(key, None)
        with self._suspects_lock:
            self._suspects.pop(key, None)
        self.clients.local.forget(key)   # the lifter dropped the Redis keys
        self.cpu.forget(key)
        if ban is not None:
            self._log("guard: ban of %s lifted by %s (told by the cluster)" % (key, by or "?"),
                      level="info")

    def _reload_bans(self):
        """Back on the cluster after a loss (the subscription's thread): bans told meanwhile
        were lost, so the table is brought in line with the store. Bans this process made but
        could not write go in first; then bans in the store are taken, and bans in force here
        that the store no longer has (lifted meanwhile) are dropped, unless still waiting to
        be written by a worker."""
        with self._lost_bans_lock:
            lost, self._lost_bans = self._lost_bans, {}
        for key, record in lost.items():
            self._persist(key, record)
        stored = {}
        for store_key, record in self.store.items(BAN_PREFIX):
            try:
                stored[store_key[len(BAN_PREFIX):]] = (float(record["until"]),
                                                       int(record["offences"]),
                                                       str(record.get("reason", "")))
            except (TypeError, KeyError, ValueError):
                continue
        waiting = {key for key, _ in list(self._unsaved_bans)}
        with self._lost_bans_lock:
            waiting.update(self._lost_bans)
        now = self._wall()
        with self._bans_lock:
            for key, ban in list(self._bans.items()):
                if ban.until > now and key not in stored and key not in waiting:
                    del self._bans[key]
            for key, (until, offences, reason) in stored.items():
                ban = self._bans.get(key)
                if until > now and (ban is None or ban.until < until):
                    self._bans[key] = _Ban(until, offences, reason, stored=True)
                    self._trim_bans_locked(now)

    # -- identity --------------------------------------------------------------------------
    def key_of(self, ip):
        return client_key(ip, self.policy.ipv4_prefix_bits, self.policy.ipv6_prefix_bits)

    def _forwarded(self, peer_ip, headers):
        """(client, own): the client a trusted proxy forwarded (the rightmost address in its
        header that is not a trusted proxy; an item that is not an address, 'unknown', stops
        the walk at the last trusted hop; no header leaves the peer itself), and whether that
        client is itself a trusted proxy (the header named nobody else: the proxy's own)."""
        policy = self.policy
        client = peer_ip
        for item in reversed(_forwarded_items(headers.get_all(policy.forwarded_header),
                                              policy.forwarded_header)):
            address = normal_address(item)
            if address is None:
                break
            client = address
            if address not in policy.trusted_proxies:
                return client, False
        return client, True

    def _warn_unforwarded_once(self, proxy):
        """One error-log line per proxy address (per process) that sends no forwarded header:
        its requests pass unchecked, which is right for its health checks and wrong if it
        forwards clients without naming them."""
        if proxy in self._warned:                    # the common case: no lock
            return
        with self._warned_lock:
            if proxy in self._warned or len(self._warned) >= MAX_WARNED_PROXIES:
                return
            self._warned.add(proxy)
        header = "-".join(word.capitalize() for word in self.policy.forwarded_header.split("-"))
        self._log("guard: %s is a trusted proxy but sent no %s; its requests are treated as its "
                  "own and not limited (set trusted_proxies/allow_cidrs in [limits] to change "
                  "this)" % (proxy, header), level="warning")

    # -- at accept (reactor thread) ---------------------------------------------------------
    def admit(self, peer_ip):
        """(client key, close now). The key is None for a trusted proxy (its connections carry
        many clients: the per-client connection cap and accept-time bans do not apply; a
        forwarded client's ban is answered per request, 403 on a connection kept open). Close
        now: the client is banned and has been told ``ban_close_after_hits`` times already."""
        policy = self.policy
        if policy.trusted_proxies and peer_ip in policy.trusted_proxies:
            return None, False
        key = self.key_of(peer_ip)
        if not policy.enabled or not self._bans or peer_ip in policy.allow_cidrs:
            return key, False
        now = self._wall()
        with self._bans_lock:
            ban = self._bans.get(key)
            close = (ban is not None and ban.until > now
                     and ban.hits >= policy.ban_close_after_hits)
        if close:   # counted by the reactor, which closes it (onebox/books.py's Refusals)
            self._tell(key, "", 0, "closed_at_accept")
        return key, close

    def refuses_banned(self, peer_ip, key, hit=True):
        """Whether ``key`` is banned now, for a request answered without ``check`` (a health
        check: issue 19, a banned client's /healthz flood). A ``hit`` counts toward
        ``ban_close_after_hits``, so its next connections are closed at accept. Any thread;
        never touches the store (the reactor calls it)."""
        policy = self.policy
        if key is None or not self._bans or not policy.enabled or peer_ip in policy.allow_cidrs:
            return False
        now = self._wall()
        with self._bans_lock:
            ban = self._bans.get(key)
            if ban is None or ban.until <= now:
                return False
            if not hit:
                return True
            ban.hits += 1
        self._count("banned_hits")
        self._tell(key, "", 403, "banned")
        return True

    # -- per request (worker threads) ---------------------------------------------------------
    def check(self, request, key):
        """The verdict on ``request`` before routing, or None to serve it untouched. ``key`` is
        the connection's client key from ``admit``; None (a trusted proxy) makes the guard read
        the forwarded header and set ``request.client_ip`` to the client it names.

        The common case is decided in this one frame, the same steps as ``_check`` without its
        calls: a client with no ban table to look in, no deny rule and no CPU debt, on a path
        not exempt, takes its two tokens in one ``take_pair``; anything else goes the long way.
        Issue 23, measured under valgrind (a served request, no allowlist): 17,600 CPU
        instructions in seven frames and two locks before, 9,800 in two frames and one lock."""
        if self._unsaved_bans:
            self._save_deferred_bans()
        if key is None:
            return self._check_forwarded(request)
        policy = self.policy
        if (not policy.quick or self._bans or key in self._cpu_tracked
                or key in self._static_tracked):
            return self._check(request, key)
        if policy.has_allow_cidrs and request.client_ip in policy.allow_cidrs:
            return None
        path = request.path
        if (path in policy.exempt_exact or path.startswith(policy.exempt_prefixes)
                or (policy.exempt_by_rule and self._exempt(request))):
            return None
        if policy.routes:
            return self._decided(request, key, self._limited(request, key))
        refused = self.clients.take_pair(key, policy.site_rate_per_s, policy.site_burst,
                                         self.routes, hash((key, path)), policy.route_rate_per_s,
                                         policy.route_burst)
        if refused is None:
            return None
        return self._decided(request, key, self._past_burst(
            request, refused, key, path, policy.route_policy, policy.route_dry, None))

    def _check_forwarded(self, request):
        """``check`` of a request a trusted proxy forwarded (``key`` None)."""
        proxy, headers = request.client_ip, request.headers
        if not headers.any_of(self.policy.proxy_signs):
            # no forwarded header, nothing that says proxied (a monitor's probe, a local
            # curl): the proxy's own request, told off only where the proxies were named
            if not self.policy.default_proxies:
                self._warn_unforwarded_once(proxy)
            return None
        request.client_ip, own = self._forwarded(proxy, headers)
        if own:                       # the proxy's own request: never limited or banned
            if not headers.get(self.policy.forwarded_header):
                self._warn_unforwarded_once(proxy)   # it says proxied, names nobody
            return None
        verdict = self._check(request, self.key_of(request.client_ip))
        if verdict is not None:
            verdict.close = False    # the proxy's connection carries other clients too
        return verdict

    def _check(self, request, key):
        """``check``'s every step, in order (the module docstring's list)."""
        policy = self.policy
        if not policy.enabled or (policy.has_allow_cidrs
                                  and request.client_ip in policy.allow_cidrs):
            return None
        if self._bans:
            verdict = self._banned(key)
            if verdict is not None:
                self._tell(key, request.path, verdict.status, verdict.rule)
                return verdict
        verdict = self._denied(request) if policy.has_deny_rules else None
        if (verdict is None or verdict.dry_run) and not self._exempt(request):
            limited = self._limited(request, key)
            if limited is not None and (verdict is None or not limited.dry_run):
                verdict = limited
        return self._decided(request, key, verdict)

    def _decided(self, request, key, verdict):
        """A refusal (or a dry-run one) is a strike, and the status page is told; None
        passes."""
        if verdict is None:
            return None
        self._strike(key, verdict)
        self._tell(key, request.path, verdict.status, verdict.rule, verdict.ban, verdict.dry_run)
        return verdict

    def _tell(self, key, path, status, rule, ban="", dry_run=False):
        if self.on_decision is not None:
            self.on_decision(key, path, status, rule, ban, dry_run)

    def charge(self, request, key, seconds):
        """Charge ``seconds`` of handler CPU to the client of ``request`` (worker, after the
        handler ran; ``key`` as given to ``check``). A trusted proxy's own request, an
        allowlisted client and an exempt request are never charged, as they are never limited."""
        policy = self.policy
        if not policy.enabled:
            return
        key = self._limited_key(request, key)
        if key is not None:
            self.cpu.charge(key, seconds * 1000.0, policy.cpu_policy.rate_per_s)

    def _limited_key(self, request, key):
        """The client key a request is counted against after the fact (a 404, its CPU), or
        None if it is never limited: a trusted proxy's own request (see ``check``), an
        allowlisted client, an exempt request. ``key`` as given to ``check``."""
        policy = self.policy
        if key is None:                              # behind a trusted proxy
            if request.client_ip in policy.trusted_proxies:
                return None                          # the proxy's own request
            key = self.key_of(request.client_ip)
        if request.client_ip in policy.allow_cidrs or self._exempt(request):
            return None
        return key

    def saw_404(self, request, key):
        """Count a 404 toward scanner detection; returns an access-log note if it earned a ban."""
        policy = self.policy
        if not policy.enabled or not policy.scanner_404_paths:
            return None
        key = self._limited_key(request, key)
        if key is None:
            return None
        earned = UNAVAILABLE
        if self._shared is not None:     # a cluster: the distinct paths are a set in Redis
            digest = hashlib.blake2b(request.path.encode("utf-8", "surrogateescape"),
                                     digest_size=8).digest()
            earned = self._shared.run(self._scan_script, (self.cluster.key("guard:404s:"
                                                                           + key),),
                                      (digest, int(policy.scanner_window_s * 1000) or 1,
                                       policy.scanner_404_paths))
        if earned is not UNAVAILABLE:
            if not earned:
                return None
        else:
            now = self._clock()
            path_hash = hash(request.path)
            with self._suspects_lock:
                suspect = self._suspect_locked(key, now)
                if suspect.paths is None or now - suspect.paths_since > policy.scanner_window_s:
                    suspect.paths, suspect.paths_since = array.array("q"), now
                if path_hash in suspect.paths:
                    return None
                suspect.paths.append(path_hash)
                if len(suspect.paths) <= policy.scanner_404_paths:
                    return None
                suspect.paths = None
        dry = "scanner" in policy.dry or "ban" in policy.dry
        self._count("dry_run_scanners" if dry else "scanners")
        outcome = self._ban(key, "scanner: more than %d distinct 404s in %gs"
                            % (policy.scanner_404_paths, policy.scanner_window_s), dry)
        self._tell(key, request.path, 404, "scanner", outcome, dry)
        return "guard=%s:scanner" % outcome if outcome else None

    def saw_bad_request(self, client_ip, key, status, in_reactor=False):
        """Count a request refused before routing (one the parser could not accept: 400, 413,
        431...) as a strike, as a 429 is; returns an access-log note if it earned a ban.
        ``key`` None (a trusted proxy's connection whose request named no client) is skipped:
        the proxy speaks for many clients. ``in_reactor``: called by the reactor, which must
        not wait for the store, so a ban it earns is written by the next ``check``."""
        policy = self.policy
        if key is None or not policy.enabled or client_ip in policy.allow_cidrs:
            return None
        verdict = Verdict(status, "", [], "bad_request")
        if in_reactor and self._shared is not None and not self._shared.down:
            # a cluster: counted in Redis by the next worker's check (the reactor never waits
            # on the network); the ban it may earn is not on this request's log line
            self._uncounted_strikes.append((key, verdict))
            return None
        self._strike(key, verdict, in_reactor)
        if verdict.ban:
            self._tell(key, "", status, "bad_request", verdict.ban)
        return verdict.note if verdict.ban else None

    def _banned(self, key):
        now = self._wall()
        expired_record = False
        with self._bans_lock:
            ban = self._bans.get(key)
            if ban is None:
                return None
            if ban.until <= now:
                expired_record, ban.stored = ban.stored, False
                if now >= ban.until + self.policy.ban_max_s:
                    del self._bans[key]              # forgotten: the next ban is a first one
                active = False
            else:
                ban.hits += 1
                self._bans.move_to_end(key)
                active = True
        if expired_record:
            self._unpersist(key)
        if not active:
            return None
        self._count("banned_hits")
        return Verdict(403, "forbidden", [], "banned", close=True)

    def _denied(self, request):
        policy = self.policy
        rule = None
        if policy.deny_cidrs and request.client_ip in policy.deny_cidrs:
            rule = "deny_cidrs"
        elif policy.deny_agents is not None and policy.deny_agents.search(
                request.headers.get("user-agent", "")):
            rule = "deny_user_agents"
        elif policy.deny_paths.matches(request.path):
            rule = "deny_paths"
        if rule is None:
            return None
        self._count("dry_run" if rule in policy.dry else "denied")
        return Verdict(403, "forbidden", [], rule, rule in policy.dry)

    def _exempt(self, request):
        policy = self.policy
        return (policy.allow_paths.matches(request.path)
                or (policy.allow_agents is not None
                    and policy.allow_agents.search(request.headers.get("user-agent", ""))))

    def _limited(self, request, key):
        """The CPU budget, the site-wide bucket, then the route's; a 429 verdict (maybe dry-run)
        or None. A refused request takes no token from the buckets after the one that fired."""
        policy = self.policy
        flagged = None
        if key in self._cpu_tracked:     # charged lately (rarely): is it in debt?
            cpu = policy.cpu_policy
            wait = self.cpu.debt(key, cpu.rate_per_s, cpu.burst)
            if wait is not None:
                flagged = self._too_many(cpu, wait, "client_cpu", "client_cpu" in policy.dry, 0)
                if not flagged.dry_run:
                    return flagged
        if policy.routes:
            route_key, route, route_dry = policy.route_for(request.path)
        else:
            route_key, route, route_dry = request.path, policy.route_policy, policy.route_dry
        static = None   # whether it is a static hit, once asked
        if key in self._static_tracked and self.static_hit is not None:
            # past its burst lately: a static hit draws on the allowance first
            static = self.static_hit(request)
            if static:
                refused = self._take_static(key, route_key, route)
                if refused is None:
                    return flagged
                if refused[0] == 1:    # the route's bucket
                    return self._rate_refusal(refused, key, route_key, route, route_dry, flagged)
        site = policy.client_policy
        refused = self.clients.take_pair(key, site.rate_per_s, site.burst, self.routes,
                                         self._route_bucket(key, route_key), route.rate_per_s,
                                         route.burst)
        if refused is None:
            return flagged
        if static is None:
            return self._past_burst(request, refused, key, route_key, route, route_dry, flagged)
        return self._rate_refusal(refused, key, route_key, route, route_dry, flagged)

    def _past_burst(self, request, refused, key, route_key, route, route_dry, flagged):
        """After ``take_pair`` refused: a static hit that the site-wide bucket refused draws
        on the client's static allowance (the module docstring says why); anything else, or
        an empty allowance, is ``_rate_refusal``'s."""
        if refused[0] == 0 and self.static_hit is not None and self.static_hit(request):
            again = self._take_static(key, route_key, route)
            if again is None:
                return flagged
            if again[0] == 1:          # the route's bucket refused it
                refused = again
        return self._rate_refusal(refused, key, route_key, route, route_dry, flagged)

    def _take_static(self, key, route_key, route):
        """A static hit's tokens: one from the allowance, one from the route's bucket
        (``take_pair``'s answer)."""
        static = self.policy.static_policy
        return self.statics.take_pair(key, static.rate_per_s, static.burst, self.routes,
                                      self._route_bucket(key, route_key), route.rate_per_s,
                                      route.burst)

    def _route_bucket(self, key, route_key):
        """The route bucket's key: a hash in one process; in a cluster, text that every
        process agrees on (hash() of a str differs between processes)."""
        return hash((key, route_key)) if self._shared is None else key + " " + route_key

    def _rate_refusal(self, refused, key, route_key, route, route_dry, flagged):
        """The verdict after ``take_pair`` refused: (0, wait) the site-wide bucket (in a dry run
        the route's token is still taken, and may be refused too), (1, wait) the route's.
        ``flagged``: a dry-run verdict already met (the CPU budget's), or None."""
        which, wait = refused
        if which == 0:
            policy = self.policy
            verdict = self._too_many(policy.client_policy, wait, "client_rate",
                                     "client_rate" in policy.dry)
            if not verdict.dry_run:
                return verdict
            flagged = flagged or verdict
            wait = self.routes.take(self._route_bucket(key, route_key), route.rate_per_s,
                                    route.burst)
            if wait is None:
                return flagged
        verdict = self._too_many(route, wait, "route_rate", route_dry)
        if not verdict.dry_run or flagged is None:
            return verdict
        return flagged

    def _too_many(self, bucket, wait, rule, dry, cost=1):
        self._count("dry_run" if dry else "limited")
        hit = Hit(False, max(0.0, cost - wait * bucket.rate_per_s), wait, bucket)
        headers = rate_limit_headers(hit) + [("Cache-Control", "no-store")]
        wait = headers[0][1]
        return Verdict(429, "too many requests; retry after %s s" % wait, headers, rule, dry)

    # -- escalation ---------------------------------------------------------------------------
    def _strike(self, key, verdict, defer_store=False):
        """One refusal (real or dry-run); past the threshold it earns a ban."""
        policy = self.policy
        if not policy.ban_after_rejections:
            return
        earned = UNAVAILABLE
        if self._shared is not None and not defer_store:   # a cluster, not the reactor
            earned = self._shared.run(self._strike_script, (self.cluster.key("guard:strikes:"
                                                                             + key),),
                                      (int(policy.ban_window_s * 1000) or 1,
                                       policy.ban_after_rejections))
        if earned is not UNAVAILABLE:
            if not earned:
                return
        else:
            now = self._clock()
            with self._suspects_lock:
                suspect = self._suspect_locked(key, now)
                if now - suspect.strikes_since > policy.ban_window_s:
                    suspect.strikes, suspect.strikes_since = 0, now
                suspect.strikes += 1
                if suspect.strikes <= policy.ban_after_rejections:
                    return
                suspect.strikes, suspect.strikes_since = 0, now
        dry = verdict.dry_run or "ban" in policy.dry
        reason = "%s: more than %d refusals in %gs" % (verdict.rule, policy.ban_after_rejections,
                                                      policy.ban_window_s)
        verdict.ban = self._ban(key, reason, dry, defer_store)
        if verdict.ban == "ban":
            verdict.close = True

    def _suspect_locked(self, key, now):
        table = self._suspects
        suspect = table.get(key)
        if suspect is None:
            suspect = table[key] = _Suspect(now)
            oldest_key, oldest = next(iter(table.items()))
            horizon = max(self.policy.ban_window_s, self.policy.scanner_window_s)
            if oldest is not suspect and now - max(oldest.strikes_since,
                                                   oldest.paths_since) > horizon:
                del table[oldest_key]                # idle: forgetting it changes nothing
            while len(table) > self.policy.max_tracked_suspects:
                table.popitem(last=False)
                self._suspect_evictions += 1
        else:
            table.move_to_end(key)
        return suspect

    def _ban(self, key, reason, dry, defer_store=False):
        """Ban ``key`` (doubling for a repeat offender); returns "ban", "dry-run-ban", or ""
        if it is banned already. The state store is written after the lock is released, or,
        with ``defer_store``, by the next ``check`` (in a worker)."""
        policy = self.policy
        now = self._wall()
        with self._bans_lock:
            ban = self._bans.get(key)
            if ban is not None and ban.until > now:
                return ""
            offences = ban.offences + 1 if ban is not None else 1
            seconds = min(policy.ban_s * 2 ** min(offences - 1, 64), policy.ban_max_s)
            if dry:
                record = None
            else:
                ban = _Ban(now + seconds, offences, reason, stored=self.store is not None)
                self._bans[key] = ban
                self._bans.move_to_end(key)
                self._trim_bans_locked(now)
                record = {"until": ban.until, "offences": offences, "reason": reason}
        if dry:
            self._count("dry_run_bans")
            self._log("guard (dry run): would ban %s for %gs (%s; offence %d)"
                      % (key, seconds, reason, offences), level="info")
            return "dry-run-ban"
        self._count("bans")
        self._log("guard: banned %s for %gs (%s; offence %d)" % (key, seconds, reason, offences),
                  level="warning")
        if record is not None and self.store is not None:
            if defer_store:
                self._unsaved_bans.append((key, record))
            else:
                self._persist(key, record)
        return "ban"

    def _trim_bans_locked(self, now):
        table = self._bans
        oldest_key, oldest = next(iter(table.items()))
        if now >= oldest.until + self.policy.ban_max_s:
            del table[oldest_key]     # forgotten; a stored record of it goes at the next start
        while len(table) > self.policy.max_bans:
            table.popitem(last=False)
            self._ban_evictions += 1

    # -- persistence (worker threads, no lock held) --------------------------------------------
    def _save_deferred_bans(self):
        while self._unsaved_bans:
            try:
                key, record = self._unsaved_bans.popleft()
            except IndexError:
                return                   # another worker took the last one
            self._persist(key, record)

    def _persist(self, key, record):
        try:
            self.store.put(BAN_PREFIX + key, record)
        except Exception as error:   # a full disk must not turn a refusal into a 500
            self._log("guard: could not persist the ban of %s: %s" % (key, error))
            if self.cluster is not None:   # written when Redis is back (_reload_bans)
                with self._lost_bans_lock:
                    self._lost_bans[key] = record
            return
        if self.cluster is not None:   # the others apply it now (it is in the store already)
            self.cluster.tell("bans", json.dumps(dict(record, ban=key)))

    def _unpersist(self, key):
        if self.store is None:
            return
        try:
            self.store.delete(BAN_PREFIX + key)
        except Exception as error:
            self._log("guard: could not drop the expired ban of %s: %s" % (key, error))

    def _load_bans(self):
        """At start-up: bans still running come back (the latest-ending ``max_bans`` of them);
        expired ones are deleted from the store in one transaction."""
        now = self._wall()
        live, expired = [], []
        for store_key, record in self.store.items(BAN_PREFIX):
            try:
                until, offences = float(record["until"]), int(record["offences"])
                reason = str(record.get("reason", ""))
            except (TypeError, KeyError, ValueError):
                expired.append(store_key)            # not ours to understand: drop it
                continue
            if until > now:
                live.append((until, store_key, offences, reason))
            else:
                expired.append(store_key)
        live.sort()
        for until, store_key, offences, reason in live[-self.policy.max_bans:]:
            self._bans[store_key[len(BAN_PREFIX):]] = _Ban(until, offences, reason, stored=True)
        if expired:
            try:
                with self.store.transaction() as tx:
                    for store_key in expired:
                        tx.delete(store_key)
            except Exception as error:
                self._log("guard: could not drop %d expired bans: %s" % (len(expired), error))
        if live:
            self._log("guard: %d bans restored from the state store" % len(self._bans),
                      level="info")

    # -- metrics ------------------------------------------------------------------------------
    def _count(self, name):
        """One of the guard's own events (``stats()["counts"]``). The runtime's refusals (at
        accept, slow clients cut off) are counted apart: onebox/books.py's Refusals."""
        with self._counts_lock:
            self._counts[name] += 1

    def bans(self):
        """[(client key, seconds left, offences, reason)] of the bans in force."""
        now = self._wall()
        with self._bans_lock:
            rows = [(key, ban.until - now, ban.offences, ban.reason)
                    for key, ban in self._bans.items()]
        return [row for row in rows if row[1] > 0]

    def list_bans(self):
        """The bans in force, longest-running first, as dicts: ``client`` (the key),
        ``reason``, ``until`` (epoch seconds), ``remaining_s``, ``offences``, ``hits``."""
        now = self._wall()
        with self._bans_lock:
            rows = [{"client": key, "reason": ban.reason, "until": ban.until,
                     "remaining_s": ban.until - now, "offences": ban.offences, "hits": ban.hits}
                    for key, ban in self._bans.items() if ban.until > now]
        rows.sort(key=lambda row: -row["until"])
        return rows

    def banned_keys(self):
        """The keys banned now, as a set (the reactor ends their event streams); any thread."""
        if not self._bans or not self.policy.enabled:
            return frozenset()
        now = self._wall()
        with self._bans_lock:
            return {key for key, ban in self._bans.items() if ban.until > now}

    def ban_key(self, address):
        """The ban table's key for what an operator typed: a key as listed ('2001:db8::/64'),
        or an address, grouped as requests are ('2001:db8::7' -> its /64)."""
        address = address.strip()
        with self._bans_lock:
            if address in self._bans:
                return address
        return self.key_of(address)

    def lift_ban(self, address, by="operator"):
        """Lift the ban on ``address`` (see ``ban_key``): it is forgotten (a later ban is a
        first offence again), its site-wide bucket, CPU budget and strikes start afresh, and its
        record leaves the state store (before this returns, so a restart does not bring it back).
        Returns the key lifted, or None if it was not banned. Any thread but the reactor (the
        store write waits for the disk)."""
        key = self.ban_key(address)
        with self._bans_lock:
            ban = self._bans.get(key)
            banned = ban is not None and ban.until > self._wall()
        if not banned and (self.cluster is None or not _banned_in(self.store, key,
                                                                  self._wall())):
            return None      # (in a cluster, the store is asked too: a told ban may be lost)
        if self.store is not None:   # first: a failed write (StateWriteError) changes nothing
            self.store.delete(BAN_PREFIX + key)
        with self._bans_lock:
            self._bans.pop(key, None)
        with self._suspects_lock:
            self._suspects.pop(key, None)
        self.clients.forget(key)
        self.statics.forget(key)
        self.cpu.forget(key)   # a debt left would refuse it again at once, and strike
        if self.cluster is not None:
            _tell_lift(self.cluster, key, by)
        self._count("lifted")
        self._log("guard: ban of %s lifted by %s" % (key, by), level="info")
        self._tell(key, "", 0, "lifted")
        return key

    def stats(self):
        """Table sizes and caps (every table is capped), and the guard's event counters."""
        with self._suspects_lock:
            suspects = {"keys": len(self._suspects), "max_keys": self.policy.max_tracked_suspects,
                        "evictions": self._suspect_evictions}
        with self._bans_lock:
            bans = {"keys": len(self._bans), "max_keys": self.policy.max_bans,
                    "evictions": self._ban_evictions}
        bans["active"] = len(self.bans())
        with self._counts_lock:
            counts = dict(self._counts)
        stats = {"enabled": self.policy.enabled, "clients": self.clients.stats(),
                 "cpu": self.cpu.stats(), "routes": self.routes.stats(),
                 "statics": self.statics.stats(), "suspects": suspects,
                 "bans": bans, "counts": counts}
        if self._shared is not None:
            stats["cluster"] = self._shared.stats()
        return stats


# Fields that say a request came through a proxy (see Guard.check).
_PROXY_SIGNS = frozenset(("via", "forwarded", "x-real-ip", "x-forwarded-for", "x-forwarded-proto",
                "x-forwarded-host"))


def _forwarded_items(values, header):
    """The addresses a forwarded header lists, client first, nearest proxy last."""
    if header == "x-forwarded-for":
        return [item for value in values for item in value.split(",")]
    items = []                      # RFC 7239 section 4: Forwarded: for=a;proto=https, for=b
    for value in values:
        for element in value.split(","):
            found = ""
            for pair in element.split(";"):
                name, _, param = pair.strip().partition("=")
                if name.lower() == "for":
                    found = param
            items.append(found)
    return items


# --- the bans of a stopped server (``server.py --bans`` / ``--unban`` on a free data dir) ---------

def stored_bans(store, wall=time.time):
    """The bans in force in a state store that no server has open, as ``Guard.list_bans``
    gives them (hits unknown: 0)."""
    now = wall()
    rows = []
    for store_key, record in store.items(BAN_PREFIX):
        try:
            until, offences = float(record["until"]), int(record["offences"])
        except (TypeError, KeyError, ValueError):
            continue
        if until > now:
            rows.append({"client": store_key[len(BAN_PREFIX):], "reason": str(record.get(
                "reason", "")), "until": until, "remaining_s": until - now,
                "offences": offences, "hits": 0})
    rows.sort(key=lambda row: -row["until"])
    return rows


def lift_stored_ban(store, key, by="operator (--unban)"):
    """Delete a ban's record from a state store no server has open; whether there was one.
    A cluster's store (``store.cluster`` set) is open in every process of it: they are told
    to drop the ban too, and the client's counts in Redis start afresh."""
    if store.get(BAN_PREFIX + key) is None:
        return False
    store.delete(BAN_PREFIX + key)
    cluster = getattr(store, "cluster", None)
    if cluster is not None:
        _tell_lift(cluster, key, by)
    return True


# --- a cluster's bans (see Guard.join_cluster) ---------------------------------------------------

def _counting_keys(cluster, key):
    """The Redis keys that count against client ``key``: its site-wide bucket (SharedLimiter
    "site"), its strikes and its 404 paths."""
    return [cluster.key("limits:site:" + key), cluster.key("guard:strikes:" + key),
            cluster.key("guard:404s:" + key)]


def _tell_lift(cluster, key, by):
    """Drop ``key``'s counts in Redis and tell every process that its ban is lifted (its
    record is out of the store already). Best effort: Redis down, the others catch up when
    they subscribe again (Guard._reload_bans)."""
    try:
        cluster.redis.call("DEL", *_counting_keys(cluster, key))
    except Exception as error:   # the lift itself is done; the counts expire on their own
        cluster.log("guard: could not reset the counts of %s in redis: %s" % (key, error))
    cluster.tell("bans", json.dumps({"lift": key, "by": by}))


def _banned_in(store, key, now):
    """Whether the store holds a ban of ``key`` in force."""
    record = store.get(BAN_PREFIX + key)
    try:
        return record is not None and float(record["until"]) > now
    except (TypeError, KeyError, ValueError):
        return False
