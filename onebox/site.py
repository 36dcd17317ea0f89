"""The site: everything a request is served by that a configuration decides, in one object.

A ``Site`` is built by one function, ``build_site``, from a configuration (and the pieces made
from it: the static pages, the access log), and never changed after: its fields are slots, and
setting one raises. A reload (``onebox/reload.py``) builds a new one and puts it in place with
one assignment, ``CurrentSite.site = site``; a worker reads ``current.site`` once when a
request's head is read, and uses that object to the end of the request (its ``Record`` keeps
it: onebox/books.py), so a request is served by the old site or the new one, never a mix. (The
reactor's own [server] values, ``Reactor.use_settings``, and the guard's policy,
``Guard.replace_policy``, are swapped beside it, in the same reactor-thread step; they govern
connections and the guard's learnt state, which outlive any one site.)

What a site holds: ``config`` (every section, as loaded), ``settings`` (its [server]),
``router``, ``static`` (the StaticPages of pages_dir: new per site, so their caches start
afresh), ``templates`` (compiled anew by a reload), ``allowed_hosts``, ``access_log`` (an
AccessLog, or None: off), ``buffer_limit`` (the
body bytes the reactor buffers before a handler runs), ``hsts_header`` and
``redirect_to_https`` ([tls]), and ``https_redirect(request)``.

Imports the handler contract; nothing else of the runtime.
"""
import re
import urllib.parse

from handlers._core import Response

__all__ = ["Site", "CurrentSite", "SiteTemplates", "build_site"]

# A Host field's name that may go into a redirect's Location (RFC 3986 3.2.2's reg-name,
# without percent-encoding, or an IP literal); anything else is replaced by the listener's.
_REDIRECT_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]+\]")


class Site:
    """One configuration's site (see the module docstring). Immutable: build another."""

    __slots__ = ("config", "settings", "router", "static", "allowed_hosts", "access_log",
                 "buffer_limit", "hsts_header", "redirect_to_https", "templates", "_tls_address",
                 "_redirect_port")

    def __init__(self, **fields):
        for name in self.__slots__:
            object.__setattr__(self, name, fields[name])

    def __setattr__(self, name, value):
        raise AttributeError("a Site is never changed: build a new one (build_site)")

    def https_redirect(self, request):
        """[tls] redirect_http's 301: the same host and target on HTTPS (RFC 9110 15.4.2)."""
        host = request.headers.get("host") or ""
        name = host.partition("]")[0] + "]" if host.startswith("[") else host.partition(":")[0]
        if not _REDIRECT_HOST_RE.fullmatch(name):
            name = self._tls_address[0]
            name = "[%s]" % name if ":" in name else name
        port = self._redirect_port or self._tls_address[1]
        path = request.path if request.path.startswith("/") else "/"   # OPTIONS *
        target = urllib.parse.quote(path, safe="/:@!$&'()*+,;=~")
        if request.query_string:
            target += "?" + request.query_string
        location = "https://%s%s%s" % (name, "" if port == 443 else ":%d" % port, target)
        return Response(b"", 301, [("Location", location)])


class CurrentSite:
    """The site served now: ``site``, replaced whole by a reload (one assignment, reactor
    thread) and read by any thread (an attribute read is atomic)."""

    __slots__ = ("site",)

    def __init__(self, site):
        self.site = site


def build_site(config, router, static, access_log, tls_address=None, templates=None):
    """The Site of ``config``: ``static`` its StaticPages, ``access_log`` its AccessLog (or
    None), ``tls_address`` the HTTPS listener's (host, port), None without one, ``templates``
    the areas' compiled templates (onebox/templates.py), None without any."""
    settings, tls = config.server, config.tls
    hsts = None
    if tls_address is not None and tls.hsts_max_age_s:
        hsts = ("Strict-Transport-Security", "max-age=%d%s" % (
            tls.hsts_max_age_s, "; includeSubDomains" if tls.hsts_include_subdomains else ""))
    return Site(config=config, settings=settings, router=router, static=static,
                allowed_hosts=config.allowed_hosts,
                access_log=access_log if settings.access_log else None,
                buffer_limit=min(settings.buffer_body_bytes, settings.max_body_bytes),
                hsts_header=hsts, redirect_to_https=tls_address is not None and tls.redirect_http,
                templates=templates, _tls_address=tls_address, _redirect_port=tls.redirect_port)


class SiteTemplates:
    """What the contract's ``render`` reaches (``ServerContext.templates``): the current site's
    templates, so that a reload that compiles them anew swaps them with the site."""

    __slots__ = ("current",)

    def __init__(self, current):
        self.current = current

    def render(self, name, variables):
        templates = self.current.site.templates
        if templates is None:
            raise RuntimeError("render(%r): there is no handlers/templates/ folder" % (name,))
        return templates.render(name, variables)
