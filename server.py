#!/usr/bin/env python3
"""onebox: a web server in one Python process, standard library only.

Run ``python3 server.py`` (settings from ``setup.cfg`` beside this file, flags override them;
``--help`` lists both). This file is the process: it reads the settings, loads the routes and the
state, builds the server, installs the signal handlers and serves until told to stop. The
runtime's internals live in ``onebox/``, one module per idea; the application lives in
``handlers/``, whose underscore modules are the contract that areas import.

Where things are
----------------
``onebox/settings.py``  every limit, with its unit and reason; setup.cfg and flags
``onebox/routing.py``   the areas' ROUTES tables, checked at start-up, matched per request
``onebox/codec.py``     HTTP/1.1's grammar: parse a head, check and render a response head
``onebox/transfer.py``  bodies in and responses out, under a minimum data rate
``onebox/static.py``    pages/: validators, ranges, compression, caches, containment
``onebox/guard.py``     the abuse guard: client identity, rate limits, bans, scanners, rules
``onebox/store/``       the shared store behind ``state``: journal, snapshots, recovery, index
``onebox/cache.py``     the response cache behind ``@cached``: single flight, invalidation, caps
``onebox/limits.py``    the rate limiters' token buckets, and each server's named limiters
``onebox/forms.py``     form bodies behind request.form(): urlencoded and multipart
``onebox/jsonbody.py``  JSON bodies behind request.json(): the cap, and what parsers disagree on
``onebox/sessions.py``  request.session in the store (hashed ids), CSRF rule, login throttle
``onebox/templates.py`` handlers/templates/ compiled to Python: escaping by context, checked at load
``onebox/events.py``    publish(): event ids, the frame, each topic's replay ring, the hand-over
``onebox/cluster.py``   several processes as one site through Redis: channels, heartbeat
``onebox/redis.py``     a Redis client: RESP2, a pool, pipelines, scripts, pub/sub, backoff
``onebox/logs.py``      the access log, which never makes a request wait
``onebox/poller.py``    which waiting sockets are ready (epoll, or a selector)
``onebox/handoff.py``   what the reactor and the workers pass each other, and who writes what
``onebox/reactor.py``   the thread that accepts, and owns every connection that waits
``onebox/gate.py``      the reactor's door: accepting, room at the caps, TLS handshakes, refusals
``onebox/timers.py``    the reactor's deadlines: fixed-timeout tables, a lazy heap for moving ones
``onebox/fairness.py``  per-client shares in the reactor: workers, waits, room, the memory budget
``onebox/streams.py``   event streams held by the reactor: admission, fan-out, heartbeat, cut-offs
``onebox/workers.py``   the pool that serves requests that are ready
``onebox/site.py``      the Site one configuration serves by, swapped whole by a reload
``onebox/books.py``     one Record per request, one finish: the tally and the access log
``onebox/engine.py``    the server object that composes them: start, drain, stop, health
``onebox/reload.py``    SIGHUP: setup.cfg read again and applied while serving
``onebox/admin.py``     the admin listener: /metrics, the status page, its token and origin check
``onebox/accounts.py``  users and their scrypt-hashed passwords, in the store (--add-user, ...)
``onebox/tally.py``     each answered request counted once, per thread, for metrics and status
``onebox/metrics.py``   the counters the tally feeds; /metrics in the Prometheus text format
``onebox/activity.py``  what the status page shows, in memory under a fixed budget
``onebox/status.py``    the status page, its JSON and the Lift action (on the admin listener)
``onebox/health.py``    /healthz and /readyz on the public port, answered by the reactor
``onebox/systemd.py``   systemd's passed sockets, and what it is told: ready, status, watchdog
``onebox/tls.py``       HTTPS: the TLS policy, the certificate's checks, the TLS connection's socket
``onebox/restart.py``   SIGUSR2 / --restart: a successor on the same sockets, then hand over

Dependencies point one way: ``server.py`` imports ``onebox``; ``onebox`` imports the contract
(``handlers/_*.py``) and the areas (to route to them); areas import only the contract; nothing
imports ``server.py`` but tests.

How a connection is served, and why
-----------------------------------
The stdlib's ``ThreadingHTTPServer`` gives every connection a thread for its whole life. That is
simple, but a client that opens a connection and says nothing, or sends its body a byte every
few seconds, or reads a large file a kilobyte at a time, holds a thread (and its stack) until a
timeout, and a few hundred such clients take the site down. onebox keeps the stdlib server
class for the listening socket's life cycle (bind, listen, close) and replaces its request loop
with two kinds of thread:

* the **reactor** (the thread that calls ``serve_forever``) owns the listening socket and every
  connection that *waits*: for a request head, for a body (buffered up to
  ``buffer_body_bytes``), for the next request on a kept connection, or for a slow reader to
  take the rest of a response. It never blocks on a client; bodies and responses must keep a
  minimum average rate. A waiting connection costs a registration and a buffer, never a thread;
* a fixed pool of **workers** (``worker_threads``) gets only requests that are ready: it parses
  them, runs the handler, and writes the response for at most ``worker_write_s``, handing what
  a slow reader has not taken to the reactor. While no other connection needs a worker, a
  worker keeps its kept-alive connection and waits for the next request itself; the reactor
  calls it back the moment one does. One client may hold ``max_workers_per_client`` workers.

A worker waits on a client only for a body too large to buffer that its handler streams, under
the minimum data rate. A streamed response's generator runs in workers a turn at a time; when
its reader falls behind, the reactor sends what it produced, then a worker runs it on.

The stdlib request handler is replaced too: it parses headers with ``email.parser`` (slow, and
lenient where RFC 9112 asks for strictness), writes headers and body in separate sends (with
Nagle on, ~40 ms stalls on keep-alive), never reads unread request bodies (so the next pipelined
request is parsed out of body bytes), and sends nothing at all when a handler raises.

Threads: the reactor; ``worker_threads`` workers; one access-log flusher. Shutdown (SIGTERM,
SIGINT, or ``shutdown()`` from another thread) closes the listener and idle connections, lets
busy ones finish within ``shutdown_timeout_s``, then joins every worker: they are not daemon
threads, so exit never cuts a handler off half-way through a write. (The access-log flusher is
one: it holds no state, and a stalled stdout must not keep the process alive.)

Under systemd (``deploy/``), the listening socket may be systemd's (socket activation: it
outlives a restart, so nobody is refused while the server is replaced), and one more daemon
thread tells systemd that the server is ready, how it is doing, and (while
``OneboxServer.health()`` finds the reactor turning and a worker taking jobs) that it is alive:
a server that stops pinging is killed and restarted. Outside systemd neither happens.
"""
import argparse
import getpass
import os
import signal
import sys
import time
import urllib.parse

from onebox.accounts import AccountError, Accounts, check_name, check_password
from onebox.admin import AdminConfigError, check_listener, load_token
from onebox.cluster import ClusterError, connect_cluster
from onebox.engine import OneboxServer
from onebox.logs import PRIORITIES, error_entry, journal_stream
from onebox.restart import (SERVER_URL_FILE, VALID, Restarter, open_when_free, predecessor,
                            restart_running)
from onebox.guard import BAN_PREFIX, client_key, lift_stored_ban, stored_bans
from onebox.routing import RouteError, Router, load_routes
from onebox.settings import DEFAULT_CONFIG_FILE, SETTINGS, ConfigError, load_config  # noqa: F401
from onebox.store import StateError, StateLockedError, Store
from onebox.store.redis_store import RedisStore
from onebox.systemd import Notifier, SystemdError, listen_sockets
from onebox.templates import TemplateError, load_area_templates
from onebox.tls import TLSConfigError, build_context


ADMIN_URL_FILE = "admin.url"   # in data_dir while the server runs: its admin listener's URL


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
    """The shared state store, per [state]; raises StateLockedError / StateCorruptError. With
    [cluster] redis_url, the store kept in Redis, shared by every process of the site (it holds
    the process's link to the others, onebox/cluster.py); raises ClusterError."""
    cluster = connect_cluster(config, log=_state_log)
    if cluster is not None:
        return RedisStore(cluster)
    return Store(config.server.data_dir, durability=config.state.durability,
                 batch_interval_ms=config.state.batch_interval_ms,
                 compact_journal_bytes=config.state.compact_journal_bytes, repair=repair,
                 log=_state_log)


def _state_log(message):
    """The store's notices (a repair, a failed fsync or compaction, a data dir made private),
    on stderr as before, as warnings for the journal when stderr is its (onebox/logs.py)."""
    prefix = "<%d>" % PRIORITIES["warning"] if journal_stream(sys.stderr) else ""
    sys.stderr.write("%sstate: %s\n" % (prefix, message))
    sys.stderr.flush()


# --- command line -----------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="server.py", description="onebox: a web server in one Python process.")
    parser.add_argument("--config", default=DEFAULT_CONFIG_FILE,
                        help="settings file (default: setup.cfg beside server.py)")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration, the routes and the templates, then "
                             "exit 0 or 1")
    parser.add_argument("--repair", action="store_true",
                        help="keep the good prefix of a damaged journal, move the damaged file "
                             "aside, then exit")
    parser.add_argument("--backup", metavar="PATH",
                        help="write a consistent snapshot of the state to PATH (asks the running "
                             "server for it if there is one; from redis with [cluster] "
                             "redis_url), then exit")
    parser.add_argument("--cluster-import", metavar="DATA_DIR",
                        help="copy the state of a stopped one-process server's DATA_DIR into "
                             "the redis of [cluster] redis_url (its key_prefix must hold no "
                             "state yet), then exit")
    parser.add_argument("--bans", action="store_true",
                        help="list the bans in force (client, reason, until), then exit; asks "
                             "the running server through its admin listener if there is one")
    parser.add_argument("--restart", action="store_true",
                        help="replace the running server of this data dir by a new process "
                             "(new code, same state, same sockets: nobody is refused), wait "
                             "until it serves, then exit 0 or 1; give the server's own flags")
    parser.add_argument("--unban", metavar="ADDR",
                        help="lift the ban on ADDR (an address, or a key as --bans lists it), "
                             "then exit; through the running server if there is one")
    users = parser.add_mutually_exclusive_group()
    users.add_argument("--users", action="store_true",
                       help="list the accounts (name, created, password changed), then exit; "
                            "through the running server if there is one")
    users.add_argument("--add-user", metavar="NAME",
                       help="make an account; its password is asked twice on a terminal, or "
                            "read as one line from standard input")
    users.add_argument("--passwd", metavar="NAME",
                       help="set an account's password (asked as for --add-user)")
    users.add_argument("--del-user", metavar="NAME", help="remove an account, then exit")
    for section, settings in SETTINGS.items():
        for setting in settings:
            flag = setting.name if section == "server" else section + "_" + setting.name
            parser.add_argument("--" + flag.replace("_", "-"), dest="set:%s.%s"
                                % (section, setting.name), metavar=setting.kind.upper(),
                                help="%s (default %s)" % (setting.why, setting.default))
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    old_pid = predecessor()   # set when this process is a restart's successor (SIGUSR2)
    # Who hears how start-up goes: systemd (Type=notify), or the server this one replaces,
    # which keeps serving unless this one says its configuration is valid (onebox/restart.py).
    notifier = Notifier()
    try:
        return _start(args, argv, old_pid, notifier)
    except Exception as error:   # a crash (a broken area's import, say): its reason goes there too
        notifier.send("STATUS=onebox: crashed: %s: %s" % (type(error).__name__, error))
        raise


def _start(args, argv, old_pid, notifier):
    def fail(message, status=1):
        print("onebox: %s" % message, file=sys.stderr)
        notifier.send("STATUS=onebox: %s" % message)   # systemctl status shows it too
        return status
    overrides = {dest[4:]: value for dest, value in vars(args).items()
                 if dest.startswith("set:") and value is not None}
    try:
        config = load_config(args.config, overrides)
        router = Router(load_routes())
        admin_token = load_token()   # one that is set must be usable
        if args.check or args.restart:
            # [admin] host is all they can know: the service's sockets are not passed to them
            check_listener(config.admin, admin_token)
        if config.tls.cert_file:   # missing, mismatched or expired: refused here (and --check)
            build_context(config.tls)
        if args.check or args.restart:   # (a start compiles them in the engine)
            load_area_templates()
    except (ConfigError, RouteError, AdminConfigError, TLSConfigError, TemplateError) as error:
        if args.restart:   # checked first, as `systemctl reload` runs --check first
            return fail("%s; not restarted: the running server serves on unchanged" % error)
        return fail(error)
    if args.check:
        print("onebox: configuration, routes and templates are valid (%s)" % args.config)
        return 0
    if args.backup:
        return backup_state(config, args.backup)
    if args.cluster_import:
        return cluster_import(config, args.cluster_import)
    if args.repair and config.cluster.redis_url:
        print("onebox: [cluster] redis_url is set: the state is in redis, and onebox keeps no "
              "files of it to repair; a damaged append-only file is redis's to repair "
              "(redis-check-aof --fix), then restart redis-server")
        return 0
    if args.bans or args.unban:
        return ban_control(config, args.unban)
    command, name = account_command(args)
    if command is not None:
        return account_control(config, command, name)
    if args.restart:
        settings = config.server
        return restart_running(settings.data_dir, settings.restart_wait_s
                               + settings.shutdown_timeout_s + 30.0)
    try:
        listeners = {} if args.repair else listen_sockets()
        if not args.repair:
            # before the state is opened and before a predecessor is told VALID: the admin
            # socket systemd or a restart passed is judged by its own address, else [admin]
            # host (the engine judges the socket it binds again)
            check_listener(config.admin, admin_token, listeners.get("admin"))
    except (SystemdError, AdminConfigError) as error:
        return fail(error)
    if old_pid is not None:
        notifier.send(VALID + "=1")   # the predecessor now drains and releases the data dir
        notifier = Notifier(environ={})   # its socket goes with it; nothing more to tell
    try:
        if old_pid is not None:
            store = open_when_free(open_store, config, old_pid, _note)
        else:
            store = open_store(config, repair=args.repair)
    except StateLockedError as error:
        return fail(error, 2)
    except ClusterError as error:
        return fail(error)
    except (StateError, OSError) as error:
        return fail("cannot open the state in %s: %s" % (config.server.data_dir, error))
    if args.repair:
        store.close()
        print("onebox: %s is consistent; start the server as usual" % config.server.data_dir)
        return 0
    # under systemd the successor would not be the unit's main process: `systemctl restart`
    restarter = Restarter([os.path.abspath(__file__)] + argv,
                          under_systemd=notifier.enabled and old_pid is None)
    return serve(config, router, store, notifier, listeners, restarter)


def _note(message):
    """A start-up notice before the server (and its error log) exists."""
    sys.stderr.write(error_entry(time.strftime("%Y-%m-%dT%H:%M:%S"), message, level="info",
                                 priorities=journal_stream(sys.stderr)))
    sys.stderr.flush()


def serve(config, router, store, notifier=None, listeners=None, restarter=None):
    """Listen (or take the sockets systemd or a predecessor passed), install the signal
    handlers, tell systemd how it goes (onebox/systemd.py), serve until SIGTERM or SIGINT (or a
    successor takes over: SIGUSR2, onebox/restart.py); the exit status."""
    raise_file_limit(config.server.max_connections + 64)
    notifier = notifier or Notifier()
    try:
        if listeners is None:
            listeners = listen_sockets()
        server = OneboxServer(config, router, store=store, listeners=listeners,
                              notifier=notifier, restarter=restarter)
    except (AdminConfigError, SystemdError, TLSConfigError, TemplateError) as error:
        store.close()
        print("onebox: %s" % error, file=sys.stderr)
        notifier.send("STATUS=onebox: %s" % error)
        return 1
    except OSError as error:
        store.close()
        message = "cannot listen on %s port %s: %s" % (config.server.host, config.server.port,
                                                       error.strerror)
        print("onebox: %s" % message, file=sys.stderr)
        notifier.send("STATUS=onebox: %s" % message)
        return 1
    notifier.log_error = server.log_error

    def stop(*_):
        notifier.stopping()
        server.begin_shutdown()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    signal.signal(signal.SIGUSR1, lambda *_: server.request_backup())
    signal.signal(signal.SIGHUP, lambda *_: server.note_sighup())
    signal.signal(signal.SIGUSR2, lambda *_: server.request_restart())
    print("listening on %s" % server.url, flush=True)
    if server.tls_url:
        print("listening on %s" % server.tls_url, flush=True)
    if server.admin_url:
        print("admin on %s" % server.admin_url, flush=True)
    write_admin_url(server)   # removed at a clean exit, unless a successor took over
    notifier.watch(server.life, server.url)   # READY=1 once it serves; STATUS=, WATCHDOG=1
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if restarter is not None:
            restarter.abandon()   # a successor that has not taken over yet is not wanted
        if restarter is None or not restarter.handed_over:
            remove_url_files(server.settings.data_dir)
    if server.stuck_workers:
        # a handler ignored shutdown; non-daemon threads would keep the process alive forever
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def backup_state(config, path, wait_s=60.0):
    """--backup: snapshot the state to ``path``. A stopped server's data dir is opened directly;
    a running server (it holds the lock) is sent SIGUSR1 and its new backup is copied. With
    [cluster] redis_url, the snapshot is read from redis, servers running or not."""
    data_dir = config.server.data_dir
    try:
        store = open_store(config)
    except StateLockedError:
        return _backup_from_running_server(data_dir, path, wait_s)
    except ClusterError as error:
        print("onebox: %s" % error, file=sys.stderr)
        return 1
    except (StateError, OSError) as error:
        print("onebox: cannot open the state in %s: %s" % (data_dir, error), file=sys.stderr)
        return 1
    try:
        store.backup(path)
    except StateError as error:
        print("onebox: backup of %s failed: %s" % (store.data_dir, error), file=sys.stderr)
        return 1
    finally:
        store.close()
    print("onebox: backup written to %s" % path)
    return 0


def cluster_import(config, source_dir):
    """--cluster-import: copy a stopped one-process server's state (``source_dir``) into the
    redis of [cluster] redis_url, whose key_prefix must hold no state yet. The source is only
    read (closing it compacts its journal into its snapshot, as any stop does)."""
    if not config.cluster.redis_url:
        print("onebox: --cluster-import needs [cluster] redis_url (the redis to copy into)",
              file=sys.stderr)
        return 1
    if not os.path.isdir(source_dir):   # Store() would make it, and import nothing
        print("onebox: --cluster-import %s: no such directory" % source_dir, file=sys.stderr)
        return 1
    try:
        source = Store(source_dir, durability="off", log=_state_log)
    except StateLockedError:
        print("onebox: %s is in use by a running server; stop it first" % source_dir,
              file=sys.stderr)
        return 1
    except (StateError, OSError) as error:
        print("onebox: cannot open the state in %s: %s" % (source_dir, error), file=sys.stderr)
        return 1
    try:
        target = open_store(config)
    except ClusterError as error:
        source.close()
        print("onebox: %s" % error, file=sys.stderr)
        return 1
    try:
        count = target.load_from(source.items())
    except StateError as error:
        print("onebox: import into %s failed: %s" % (target.data_dir, error), file=sys.stderr)
        return 1
    finally:
        target.close()
        source.close()
    print("onebox: %d keys copied from %s into %s" % (count, source_dir, target.data_dir))
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


# --- ban control: --bans / --unban ------------------------------------------------------------

def ban_control(config, unban=None):
    """--bans (``unban`` None) or --unban ADDR. A stopped server's data dir is opened directly
    (its lock is free); a running server's (it holds the lock) is asked through its admin
    listener, whose address it wrote to ADMIN_URL_FILE in the data dir at start. With
    [cluster] redis_url the bans are in redis, servers running or not: a lift is told to every
    running process of the cluster (onebox/guard.py's lift_stored_ban)."""
    clustered = bool(config.cluster.redis_url)
    if not clustered and not os.path.isdir(config.server.data_dir):   # do not make one
        print("onebox: no data directory at %s, so no bans" % config.server.data_dir,
              file=sys.stderr)
        return 0 if unban is None else 1
    try:
        store = open_store(config)
    except StateLockedError:
        return _ban_control_running(config, unban)
    except ClusterError as error:
        print("onebox: %s" % error, file=sys.stderr)
        return 1
    except (StateError, OSError) as error:
        print("onebox: cannot open the state in %s: %s" % (config.server.data_dir, error),
              file=sys.stderr)
        return 1
    try:
        if unban is None:
            _print_bans(stored_bans(store))
            return 0
        key = unban.strip()
        if store.get(BAN_PREFIX + key) is None:   # an address, not a key as listed
            key = client_key(key, config.guard.ipv4_prefix_bits, config.guard.ipv6_prefix_bits)
        live = {row["client"] for row in stored_bans(store)}
        if key not in live:
            print("onebox: %s is not banned" % unban, file=sys.stderr)
            return 1
        lift_stored_ban(store, key)
        if clustered:
            print("onebox: lifted the ban of %s (in redis; every process of the cluster was "
                  "told)" % key)
        else:
            print("onebox: lifted the ban of %s (the server is stopped: it starts without it)"
                  % key)
        return 0
    except StateError as error:
        print("onebox: cannot change the state in %s: %s" % (config.server.data_dir, error),
              file=sys.stderr)
        return 1
    finally:
        store.close()


def _running_server(data_dir):
    """(pid, admin URL) of the server that holds ``data_dir``, or None, having said why."""
    try:
        with open(os.path.join(data_dir, "lock")) as lock:
            pid = lock.read().strip()
        with open(os.path.join(data_dir, ADMIN_URL_FILE)) as note:
            return pid, note.read().strip()
    except OSError:
        print("onebox: the data dir %s is in use by a running server that has no admin "
              "listener ([admin] port = off?); stop it, or run it with one" % data_dir,
              file=sys.stderr)
        return None


def _ban_control_running(config, unban):
    running = _running_server(config.server.data_dir)
    if running is None:
        return 1
    pid, url = running
    if unban is None:
        status, reply = _admin_call(url, "GET", "bans")
    else:
        status, reply = _admin_call(url, "POST", "bans/lift",
                                    {"client": unban.strip()})
    if status is None:
        print("onebox: cannot reach the running server (pid %s) at %s: %s" % (pid, url, reply),
              file=sys.stderr)
        return 1
    if unban is None and status == 200:
        _print_bans(reply["bans"])
        return 0
    if status == 200:
        print("onebox: lifted the ban of %s (through the running server, pid %s)"
              % (reply["lifted"], pid))
        return 0
    if status == 404 and unban is not None:
        print("onebox: %s is not banned" % unban, file=sys.stderr)
        return 1
    print("onebox: the running server (pid %s) answered %s: %s" % (pid, status, reply),
          file=sys.stderr)
    return 1


def _admin_call(url, method, path, body=None):
    """(status, decoded JSON or text) from the admin listener at ``url``, or (None, why)."""
    import http.client
    import json
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    headers = {"Accept": "application/json"}
    token = _admin_token()
    if token:
        headers["Authorization"] = "Bearer " + token
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request(method, parts.path.rstrip("/") + "/" + path, data, headers)
        response = connection.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as error:
        return None, error
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw.decode("utf-8"))
    except ValueError:
        return response.status, raw.decode("utf-8", "replace").strip()


def _admin_token():
    """The admin token as the server reads it (environment or $CREDENTIALS_DIRECTORY); None
    without one (the server then says 401 if it needs one)."""
    try:
        return load_token()
    except AdminConfigError:
        return None


def _print_bans(bans):
    if not bans:
        print("no bans in force")
        return
    print("%-40s %-20s %10s %8s  %s" % ("client", "until (UTC)", "left", "offences", "reason"))
    for ban in bans:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ban["until"]))
        print("%-40s %-20s %9.0fs %8d  %s" % (ban["client"], until, ban["remaining_s"],
                                              ban["offences"], ban["reason"]))


# --- accounts: --users / --add-user / --passwd / --del-user -----------------------------------

_ACCOUNT_DONE = {"add": "added user %s", "passwd": "changed the password of %s",
                 "del": "deleted user %s"}


def account_command(args):
    """The account command asked for: ("users", None), ("add" | "passwd" | "del", NAME), or
    (None, None)."""
    for command, name in (("add", args.add_user), ("passwd", args.passwd),
                          ("del", args.del_user)):
        if name is not None:   # "" too: it is a bad name, not no command
            return command, name
    return ("users", None) if args.users else (None, None)


def account_control(config, command, name):
    """--users, --add-user, --passwd, --del-user. As for the bans: a stopped server's data dir
    is opened directly, a running one is asked through its admin listener. Exit status 0, or 1
    with one line saying why (a known failure: a bad name or password, a taken or unknown
    name, the passwords differ)."""
    data_dir = config.server.data_dir
    if name is not None:
        try:
            name = check_name(name)
        except ValueError as error:
            return _fail(error)
    if not os.path.isdir(data_dir) and command != "add":   # do not make one just to say so
        if command == "users":
            print("no users (no data directory at %s)" % data_dir)
            return 0
        return _fail("no such user: %s" % name)
    password = None
    if command in ("add", "passwd"):
        # before the store is opened: a stopped server's data dir is not held during a prompt
        password = _read_password(name, config.accounts)
        if password is None:
            return 1
    try:
        store = open_store(config)
    except StateLockedError:
        return _account_control_running(data_dir, command, name, password)
    except (StateError, OSError) as error:
        return _fail("cannot open the state in %s: %s" % (data_dir, error))
    try:
        accounts = Accounts(store, config.accounts)
        if command == "users":
            _print_users([accounts.info(each) for each in accounts.names()])
            return 0
        if command == "add":
            name = accounts.add(name, password)
        elif command == "passwd":
            name = accounts.set_password(name, password)
        else:
            name = accounts.delete(name)
        print("onebox: " + _ACCOUNT_DONE[command] % name)
        return 0
    except (ValueError, AccountError) as error:
        return _fail(error)
    except StateError as error:
        return _fail("cannot change the state in %s: %s" % (data_dir, error))
    finally:
        store.close()


def _account_control_running(data_dir, command, name, password):
    running = _running_server(data_dir)
    if running is None:
        return 1
    pid, url = running
    path = "accounts/" + urllib.parse.quote(name or "", safe="")
    if command == "users":
        status, reply = _admin_call(url, "GET", "accounts")
    elif command == "add":
        status, reply = _admin_call(url, "POST", "accounts", {"name": name, "password": password})
    elif command == "passwd":
        status, reply = _admin_call(url, "PUT", path + "/password", {"password": password})
    else:
        status, reply = _admin_call(url, "DELETE", path)
    if status is None:
        return _fail("cannot reach the running server (pid %s) at %s: %s" % (pid, url, reply))
    if status in (200, 201) and command == "users":
        _print_users(reply["accounts"])
        return 0
    if status in (200, 201):
        print("onebox: %s (through the running server, pid %s)"
              % (_ACCOUNT_DONE[command] % name, pid))
        return 0
    if status == 404 and command in ("passwd", "del"):
        return _fail("no such user: %s" % name)
    if status == 409 and command == "add":
        return _fail("user %s exists" % name)
    if status == 400 and isinstance(reply, dict):
        return _fail(reply.get("error", reply))
    return _fail("the running server (pid %s) answered %s: %s" % (pid, status, reply))


def _read_password(name, settings):
    """The new password: asked twice on a terminal (getpass: not echoed), else one line of
    standard input (a script's pipe: ``echo "$PW" | server.py --add-user x``);
    checked against the rules before anything is asked of the store. None, having said why."""
    try:
        if sys.stdin is not None and sys.stdin.isatty():
            password = getpass.getpass("password for %s: " % name)
            if getpass.getpass("the same again: ") != password:
                _fail("the passwords differ")
                return None
        else:
            # one line, and no more of it than a valid one and its CR LF (a huge stdin is not
            # read whole: past the cap, the rules' "at most" says so)
            line = sys.stdin.readline(settings.max_password_chars + 2) if sys.stdin else ""
            password = line[:-1] if line.endswith("\n") else line
            password = password[:-1] if password.endswith("\r") else password
            if not password:
                _fail("no password: give one as a line on standard input")
                return None
        check_password(password, settings)
    except UnicodeDecodeError:   # stdin's encoding is the locale's (UTF-8, as a rule)
        _fail("'password' must be text in the terminal's encoding")
        return None
    except ValueError as error:
        _fail(error)
        return None
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        _fail("cancelled: no password given")
        return None
    return password


def _print_users(rows):
    if not rows:
        print("no users")
        return
    width = max(len(row["name"]) for row in rows + [{"name": "name"}])
    print("%-*s  %-20s  %s" % (width, "name", "created (UTC)", "password changed (UTC)"))
    for row in rows:
        print("%-*s  %-20s  %s" % (width, row["name"], _utc(row["created"]),
                                   _utc(row["changed"])))


def _utc(when):
    if not isinstance(when, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))


def _fail(message):
    """One line on stderr, and the exit status of a known failure."""
    print("onebox: %s" % message, file=sys.stderr)
    return 1


def write_admin_url(server):
    """Tell --bans/--unban where this server's admin listener is (ADMIN_URL_FILE in the data
    dir), and --restart where it serves (SERVER_URL_FILE); the data dir's lock says whether
    they are current. Private (0600) whatever the umask, as the store's files are."""
    url = server.admin_url
    path = os.path.join(server.settings.data_dir, ADMIN_URL_FILE)
    try:
        # a cluster's store is in Redis: nothing else made the data dir
        os.makedirs(server.settings.data_dir, 0o700, exist_ok=True)
        _write_private(os.path.join(server.settings.data_dir, SERVER_URL_FILE), server.url)
        if url:
            _write_private(path, url)
        elif os.path.exists(path):
            os.remove(path)   # a previous run's: this one has no admin listener
    except OSError as error:
        server.log_error("cannot write %s (--bans/--unban will not find this server): %s"
                         % (path, error), level="warning")


def remove_url_files(data_dir):
    """At exit: the files that said where this server was are stale now (a later --bans or
    --restart would try a server that is gone)."""
    for name in (SERVER_URL_FILE, ADMIN_URL_FILE):
        try:
            os.remove(os.path.join(data_dir, name))
        except OSError:
            pass


def _write_private(path, line):
    """Replace ``path`` by one line, mode 0600 (fchmod: open's mode passes through the umask),
    atomically (a reader sees the old line or the new one)."""
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as note:
        os.fchmod(fd, 0o600)
        note.write(line + "\n")
    os.replace(path + ".tmp", path)


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
