"""Pages: HTML made from the templates in handlers/templates/, escaped by default.

    from handlers._pages import Markup, page

    def show_page(request):
        ...
        return page("wiki/page.html", title=title, body=Markup(html_the_wiki_made))

``render(name, **variables)`` gives the text, ``page(name, status=200, headers=None,
**variables)`` an HTML Response (so ``status`` and ``headers`` are not template variables).
Every ``{{ }}`` is HTML-escaped unless its value is ``Markup``; a missing variable is an error
(a 500), never an empty string. The syntax and its rules: docs/areas.md, "Templates".

The templates are the server's, compiled at start-up (onebox/templates.py), reached through
the calling thread's ServerContext (handlers/_context.py) like ``state``. Imports the standard
library and the contract only.
"""
from handlers import _context
from handlers._core import html_response

__all__ = ["Markup", "render", "page"]


class Markup(str):
    """Text that is already safe HTML: ``{{ }}`` puts it in element content unchanged (in an
    attribute value it stands for the text it shows, so its quotes are escaped there). Make it
    only from HTML you built, escaping what you took from a client: ``Markup("<b>%s</b>" %
    html.escape(name))``. Any str operation on it gives a plain str, escaped when printed."""

    __slots__ = ()

    def __repr__(self):
        return "Markup(%s)" % str.__repr__(self)


def render(name, /, **variables):
    """The template ``name`` (a path under handlers/templates/) rendered with ``variables``."""
    return _context.require("templates", "templates").render(name, variables)


def page(name, /, status=200, headers=None, nonce=None, **variables):
    """``render(name, **variables)`` as a text/html Response, with the page headers of
    ``handlers._core.html_response`` (``nonce``: the CSP nonce of its scripts, also a variable)."""
    if nonce is not None:
        variables["nonce"] = nonce
    return html_response(render(name, **variables), status, headers, nonce)
