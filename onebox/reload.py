"""Live reload (SIGHUP): read the configuration again and apply what can change while serving.

``Reloader.reload()`` runs in the reactor thread, between two turns, and returns a one-line
summary for the error log (and systemd's STATUS=). What happens, in order:

1. **Read.** The same file, with the same command-line overrides, as at start
   (``config.source``, kept by ``load_config``). A ConfigError (a bad value, an unknown key, an
   unreadable file) changes nothing: the server keeps serving on its previous settings and the
   summary names the file, the section and the key.
2. **Compare** every setting with the running one, and sort the changes by ``HOW`` below: most
   apply live; those marked ``RESTART`` keep their running value until the next start and are
   named in the summary as needing one.
3. **Build** the new site (``onebox/site.py``: settings, static pages, allowed hosts, the
   access log, HSTS and the redirect), and the certificate, before touching anything: a
   failure there also leaves the server as it was.
4. **Swap.** The reactor's [server] values first (the one step that can raise), then the
   guard's policy and the response cache's caps, then the site, in ONE assignment
   (``CurrentSite.site``). The static pages are always new (that drops their caches, so a
   file added or edited under pages_dir is seen at once). A request reads the site once, as
   its head is read, and keeps it to its end: it is served wholly by the old site or wholly by
   the new one. Connections under way keep their timed waits' deadlines; what starts after
   the reload uses the new values. No connection is closed.

Handler code and routes are not configuration: changing them needs a restart
(docs/operations.md says so). Imports the runtime modules it builds; never the engine or
``server``.
"""
import types

from onebox.logs import AccessLog
from onebox.settings import SETTINGS, ConfigError, load_config
from onebox.site import build_site
from onebox.static import StaticPages
from onebox.templates import TemplateError, load_area_templates
from onebox.tls import TLSConfigError, build_context, expiry_warning

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
#   accounts     read at each password hash (onebox/accounts.py): the next one uses them
#   events       the event hub's and the reactor's [events] values, for what comes next:
#                streams admitted, events published and kept, heartbeats, cut-offs
#   RESTART      kept as it is until the next start:
#                host, port, reuse_port: the listening socket is bound once (and may be
#                inherited);
#                data_dir, [state]: the state store is open and locked there, with these rules;
#                [cluster]: the link to Redis is made before the store is opened on it;
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
        host=RESTART, port=RESTART, data_dir=RESTART, worker_threads=RESTART, poller=RESTART,
        reuse_port=RESTART, allowed_hosts="hosts", pages_dir="static", access_log="access_log",
        log_flush_interval_s="access_log", log_buffer_bytes="access_log"),
    "state": {setting.name: RESTART for setting in SETTINGS["state"]},
    "static": {setting.name: "static" for setting in SETTINGS["static"]},
    "limits": {setting.name: "guard" for setting in SETTINGS["limits"]},
    "cache": {setting.name: "cache" for setting in SETTINGS["cache"]},
    # the admin listener is bound, and the health checks and metrics built, once at start
    "admin": {setting.name: RESTART for setting in SETTINGS["admin"]},
    "health": {setting.name: RESTART for setting in SETTINGS["health"]},
    "status": {setting.name: RESTART for setting in SETTINGS["status"]},
    # the session store and the login throttle are built once, at start
    "sessions": {setting.name: RESTART for setting in SETTINGS["sessions"]},
    # the accounts read their section at each hash (Accounts takes a function of the site)
    "accounts": {setting.name: "accounts" for setting in SETTINGS["accounts"]},
    "events": {setting.name: "events" for setting in SETTINGS["events"]},
    # the link to Redis is made once, before the store is opened on it
    "cluster": {setting.name: RESTART for setting in SETTINGS["cluster"]},
    "tls": dict({setting.name: "tls" for setting in SETTINGS["tls"]}, host=RESTART,
                port=RESTART),
}


class Reloader:
    """For the engine: ``reload()`` (reactor thread only). Built with what a reload reads and
    replaces: ``current`` (the site served now), the ``reactor`` (its [server] values and the
    SSLContext of new connections), the ``guard`` (its policy), the response cache
    (``responses``, its caps), ``life`` (the served certificate's expiry), the stream a newly
    turned-on access log writes to, the HTTPS listener's address (None: no HTTPS) and
    ``log_error``."""

    def __init__(self, current, reactor, guard, responses, life, access_stream, tls_address,
                 log_error):
        self.current = current
        self.reactor = reactor
        self.guard = guard
        self.responses = responses
        self.life = life
        self.access_stream = access_stream
        self.tls_address = tls_address
        self.log_error = log_error

    def reload(self):
        """Read the configuration again and apply it (see the module docstring); the one-line
        summary."""
        site = self.current.site
        path, overrides = site.config.source
        try:
            new = load_config(path, overrides)
        except ConfigError as error:
            return "reload failed: %s; still serving the previous settings" % error
        old = site.config
        live, restart = compare(old, new)
        config = _running_config(old, new)
        static = StaticPages(config.server.pages_dir, config.static)
        tls_context, tls_note = self._load_certificate(config)
        if tls_context is None and self.tls_address is not None:
            config.tls.cert_file, config.tls.key_file = old.tls.cert_file, old.tls.key_file
        access_log = site.access_log
        if config.server.access_log and access_log is None:
            access_log = AccessLog(self.access_stream, config.server.log_flush_interval_s,
                                   config.server.log_buffer_bytes, self.log_error)
        templates, templates_note = self._load_templates(site)
        new_site = build_site(config, site.router, static, access_log, self.tls_address,
                              templates)
        self._swap(site, new_site)
        if tls_context is not None:
            self.reactor.tls_context, self.life.tls_expires = tls_context
        warning = expiry_warning_of(config.tls, self.life.tls_expires)
        if warning:
            self.log_error(warning)
        summary = "reloaded: %s" % (", ".join(live) or "no setting changed")
        if tls_note:
            summary += "; " + tls_note
        if templates_note:
            summary += "; " + templates_note
        if restart:
            summary += "; needs a restart: %s" % ", ".join(restart)
        return summary

    def _load_templates(self, site):
        """(templates, note): handlers/templates/ compiled anew, or the running ones and why
        they are kept (a broken template must not take the site down: it stops a start)."""
        try:
            return load_area_templates(), None
        except TemplateError as error:
            return site.templates, "templates: kept the previous ones: %s" % error

    def _load_certificate(self, config):
        """((SSLContext, expiry), note) for the certificate and key now on disk, or (None, why
        the running one is kept). Built before anything is swapped."""
        if self.tls_address is None:
            if config.tls.cert_file:
                return None, "tls: HTTPS is off since the start; turning it on needs a restart"
            return None, None
        if not config.tls.cert_file:
            return None, ("tls: cert_file is empty; HTTPS stays on with the previous "
                          "certificate until a restart")
        try:
            return (build_context(config.tls),
                    "tls: certificate loaded from %s" % config.tls.cert_file)
        except TLSConfigError as error:
            return None, "tls: kept the previous certificate: %s" % error

    def _swap(self, old, new):
        """Put ``new`` in place of ``old``. The one step that can raise (the reactor's, on a
        value no socket option takes) is first, so that an error leaves the server as it was;
        the site itself is one assignment, last."""
        settings = new.settings
        self.reactor.use_settings(settings)
        self.reactor.use_events_settings(new.config.events)
        self.guard.replace_policy(new.config.guard)
        self.responses.resize(new.config.cache.max_entries, new.config.cache.max_bytes)
        log = new.access_log
        if log is not None:
            if log is not old.access_log:
                log.start()
            log.configure(settings.log_flush_interval_s, settings.log_buffer_bytes)
        self.current.site = new
        if old.access_log is not None and log is None:
            # after the swap: requests still under way on the old site hold the old log,
            # which writes their lines an interval after it retires (AccessLog.retire)
            old.access_log.retire()


def expiry_warning_of(tls, expires):
    """The warning of a certificate near its expiry ([tls] expiry_warning_days), or None."""
    if expires is None:
        return None
    return expiry_warning(tls.cert_file, expires, tls.expiry_warning_days)


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
