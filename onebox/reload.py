"""Live reload (SIGHUP): read the configuration again and apply what can change while serving.

``reload_server(server)`` runs in the reactor thread, between two turns, and returns a one-line
summary for the error log (and systemd's STATUS=). What happens, in order:

1. **Read.** The same file, with the same command-line overrides, as at start
   (``config.source``, kept by ``load_config``). A ConfigError (a bad value, an unknown key, an
   unreadable file) changes nothing: the server keeps serving on its previous settings and the
   summary names the file, the section and the key.
2. **Compare** every setting with the running one, and sort the changes by ``HOW`` below: most
   apply live; those marked ``RESTART`` keep their running value until the next start and are
   named in the summary as needing one.
3. **Build** what replaces the running pieces (static pages, an access log), before touching
   anything: a failure there also leaves the server as it was.
4. **Swap**, each piece in one attribute assignment: settings, the guard's policy, the static
   pages (always new: that drops their caches, so a file added or edited under pages_dir is seen
   at once), the response cache's caps, the access log. Nothing is changed in place, so a worker
   reading concurrently sees a whole old object or a whole new one. Connections and requests
   under way may finish on old values (a wait already timed keeps its deadline); what starts
   after the reload uses the new ones. No connection is closed.

Handler code and routes are not configuration: changing them needs a restart (docs/operations.md says
so). Imports the runtime modules it swaps; never ``server``.
"""
import types

from onebox.logs import AccessLog
from onebox.settings import SETTINGS, ConfigError, load_config
from onebox.static import StaticPages
from onebox.tls import TLSConfigError, build_context

RESTART = "restart"

# How each setting takes effect on a reload (a test checks that every setting is here):
#   connections  the reactor's and workers' [server] settings, for connections and requests
#                that start after the reload (timeouts, paces, caps, head and body limits)
#   hosts        allowed_hosts, per request
#   static       a new StaticPages (its policy and caches), for requests after the reload
#   access_log   the access log's switch, flush interval and buffer
#   guard        a new GuardPolicy in the running Guard (its buckets and bans are kept)
#   cache        the response cache's caps (entries past them are dropped, the rest kept)
#   tls          the certificate and key are read again at every reload, changed or not
#                (certbot renews them in place): a new SSLContext for new connections, while
#                open ones finish on the old; a pair that cannot be served keeps the old one
#                and the summary says why. HSTS, the redirect and the expiry warning: per
#                request from then on. [tls] host and port are RESTART (the listener is bound
#                once), as is turning HTTPS on or off.
#   RESTART      kept as it is until the next start:
#                host, port: the listening socket is bound once (and may be inherited);
#                data_dir, [state]: the state store is open and locked there, with these rules;
#                worker_threads: the pool is started once;
#                [admin], [health], [status]: the admin listener is bound, the checks and the
#                status page's recorder built, at start.
_CONNECTION_KEYS = (
    "max_connections max_connections_per_ip header_timeout_s keepalive_timeout_s body_timeout_s "
    "buffer_body_bytes min_body_rate_bytes_s body_rate_grace_s write_timeout_s "
    "min_response_rate_bytes_s response_rate_grace_s worker_write_s stall_timeout_s "
    "max_workers_per_client max_waiting_per_client max_buffered_bytes shutdown_timeout_s "
    "max_request_line_bytes max_head_bytes max_header_count max_body_bytes max_json_bytes "
    "max_drain_bytes drain_idle_s "
    "restart_wait_s").split()
HOW = {
    "server": dict(
        {key: "connections" for key in _CONNECTION_KEYS},
        host=RESTART, port=RESTART, data_dir=RESTART, worker_threads=RESTART,
        allowed_hosts="hosts", pages_dir="static", access_log="access_log",
        log_flush_interval_s="access_log", log_buffer_bytes="access_log"),
    "state": {setting.name: RESTART for setting in SETTINGS["state"]},
    "static": {setting.name: "static" for setting in SETTINGS["static"]},
    "limits": {setting.name: "guard" for setting in SETTINGS["limits"]},
    "cache": {setting.name: "cache" for setting in SETTINGS["cache"]},
    # the admin listener is bound, and the health checks and metrics built, once at start
    "admin": {setting.name: RESTART for setting in SETTINGS["admin"]},
    "health": {setting.name: RESTART for setting in SETTINGS["health"]},
    "status": {setting.name: RESTART for setting in SETTINGS["status"]},
    "tls": dict({setting.name: "tls" for setting in SETTINGS["tls"]}, host=RESTART,
                port=RESTART),
}


def reload_server(server):
    """Read the configuration again and apply it to ``server`` (see the module docstring);
    the one-line summary. Reactor thread only."""
    path, overrides = server.config.source
    try:
        new = load_config(path, overrides)
    except ConfigError as error:
        return "reload failed: %s; still serving the previous settings" % error
    old = server.config
    live, restart = compare(old, new)
    config = _running_config(old, new)
    static = StaticPages(config.server.pages_dir, config.static)
    tls_context, tls_note = _load_certificate(server, config)
    if tls_context is None and server.tls_socket is not None:
        config.tls.cert_file, config.tls.key_file = old.tls.cert_file, old.tls.key_file
    access_log = server.access_log
    if config.server.access_log and access_log is None:
        access_log = AccessLog(server.access_stream, config.server.log_flush_interval_s,
                               config.server.log_buffer_bytes, server.log_error)
    _swap(server, config, static, access_log)
    if tls_context is not None:
        server.use_tls_context(*tls_context)
    server.use_tls_settings(config.tls)   # HSTS, the redirect; warns of a near expiry
    summary = "reloaded: %s" % (", ".join(live) or "no setting changed")
    if tls_note:
        summary += "; " + tls_note
    if restart:
        summary += "; needs a restart: %s" % ", ".join(restart)
    return summary


def _load_certificate(server, config):
    """((SSLContext, expiry), note) for the certificate and key now on disk, or (None, why
    the running one is kept). Built before anything is swapped."""
    if server.tls_socket is None:
        if config.tls.cert_file:
            return None, "tls: HTTPS is off since the start; turning it on needs a restart"
        return None, None
    if not config.tls.cert_file:
        return None, ("tls: cert_file is empty; HTTPS stays on with the previous certificate "
                      "until a restart")
    try:
        return build_context(config.tls), "tls: certificate loaded from %s" % config.tls.cert_file
    except TLSConfigError as error:
        return None, "tls: kept the previous certificate: %s" % error


def compare(old, new):
    """(live changes, changes that need a restart), each a list of 'section.key' (with
    'old->new' for a number, a switch or a choice) in SETTINGS order; then the [limits "/path"]
    sections added, removed or changed."""
    live, restart = [], []
    for section, settings in SETTINGS.items():
        before, after = getattr(old, section), getattr(new, section)
        for setting in settings:
            was, now = getattr(before, setting.name), getattr(after, setting.name)
            if was == now:
                continue
            change = "%s.%s" % (section, setting.name)
            if setting.kind in ("int", "float", "bool") or setting.choices:
                change += " %s->%s" % (_shown(was), _shown(now))
            (restart if HOW[section][setting.name] == RESTART else live).append(change)
    routes_before = {path: vars(values) for path, values in old.route_limits}
    routes_after = {path: vars(values) for path, values in new.route_limits}
    for path in sorted(set(routes_before) | set(routes_after)):
        if routes_before.get(path) != routes_after.get(path):
            live.append('limits "%s"' % path)
    return live, restart


def _shown(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return "%g" % value
    return str(value)


def _running_config(old, new):
    """The configuration to serve by: ``new``, except that what needs a restart keeps its
    running value. Fresh namespaces: the running ones are never changed in place."""
    server = types.SimpleNamespace(**vars(old.server))
    for key, how in HOW["server"].items():
        if how != RESTART:
            setattr(server, key, getattr(new.server, key))
    config = types.SimpleNamespace(**vars(old))
    vars(config).update(vars(new))
    config.server = server
    for section, keys in HOW.items():   # sections wholly fixed at start keep their running values
        if section != "server" and all(how == RESTART for how in keys.values()):
            setattr(config, section, getattr(old, section))
        elif section != "server":   # mixed: what needs a restart keeps its running value
            values = types.SimpleNamespace(**vars(getattr(new, section)))
            for key, how in keys.items():
                if how == RESTART:
                    setattr(values, key, getattr(getattr(old, section), key))
            setattr(config, section, values)
    return config


def _swap(server, config, static, access_log):
    """Put the new pieces in place, each in one assignment (workers read them as they go).
    The one step that can raise (the reactor's, on a value no socket option takes) is first,
    so that an error leaves the server as it was."""
    settings = config.server
    server.reactor.use_settings(settings)
    server.workers.use_settings(settings)
    server.config, server.settings = config, settings
    server.guard.replace_policy(config.guard)
    server.static = static
    server.context.responses.resize(config.cache.max_entries, config.cache.max_bytes)
    if settings.access_log:
        if access_log is not server.access_log:
            access_log.start()
        access_log.configure(settings.log_flush_interval_s, settings.log_buffer_bytes)
    elif server.access_log is not None:
        server.access_log.retire()
        access_log = None
    server.access_log = server.reactor.access_log = access_log
