"""Wiki: pages anyone may read and logged-in users may edit; the model area for HTML forms,
logins and sessions (docs/areas.md, "A page with a form and a login").

    GET  /wiki/                      every page: name, last editor, time; newest first, or
                                     ?sort=name; MAX_LIST a screen (?start=N for the next)
    GET  /wiki/{page}                the page, its text rendered (the markup below); 404 with a
                                     link to create it (for a logged-in user) if it has none
    GET  /wiki/{page}/edit           login required: the form, with the text and its revision
    POST /wiki/{page}                login required; fields text, base_rev, csrf_token: a new
                                     revision, then 303 to the page. 409 (both texts shown, so
                                     nothing is lost) if base_rev is not the current revision
    GET  /wiki/{page}/history        its revisions kept: number, author, time
    GET  /wiki/{page}/history/{n}    one of them
    GET  /wiki/{page}/events         server-sent events (handlers/_events.py) of topic
                                     "wiki/<name>": "edited" {"page", "rev", "by"} once a
                                     revision is saved; the page view's script shows a notice
    GET  /login, POST /login         the form (``next`` carried through); 303 to next, 401 with
                                     the form again, or a 429 page once failures are throttled
    POST /logout                     303 to /wiki/ (a button on every wiki page when logged in)

Page names: 1 to MAX_NAME_CHARS ASCII letters, digits, spaces, "-" and ".", not starting with
".". An underscore is a space, and runs of spaces are one: "Main_page", "Main  page" and
"Main page" are one page (case matters: "main page" is another). Its URL has "_" for each
space (/wiki/Main_page); a GET of another spelling (/wiki/Main%20page) gets a 301 to that one.

The markup, line by line (the edit page shows it too; ``render_markup``):

    = Title, == Section, === Subsection      headings (trailing "=" are dropped)
    * item                                   a bullet list (consecutive lines)
    ```                                      a line of three backticks opens a code block,
                                             the next one closes it (or the end of the text)
    a blank line                             ends a paragraph
    `code`  [[Page name]]                    inline, in any other line: code, a link

Everything else is text, escaped wherever it is copied: the only HTML in a page is what this
module writes. The renderer makes one pass over the lines and one over each paragraph's
characters (str.find from a moving start, remembering each "[[", "]]" and "`" found ahead, so a
text of 40,000 "[[" is linear too; no regular expression).

State keys (every edit is one transaction, so a page and its revisions change together):
    wiki/page/<name>              {"rev", "oldest", "author", "time"}: the current revision
                                  number, the oldest kept, who saved the current one and when
    wiki/log/<name>               [[rev, author, time, bytes], ...] oldest first: the history
    wiki/rev/<name>/<rev, 8 digits>  {"text", "author", "time"}
    wiki/count, wiki/bytes        the pages, and the UTF-8 bytes of every revision kept

Budgets, as in handlers/notes.py: MAX_PAGE_BYTES a text (413 past it), MAX_REVISIONS kept a
page (the oldest dropped), MAX_PAGES pages and MAX_TOTAL_BYTES of texts in all (507 when
full). The handlers read these module constants at each request, so a test can lower one.
"""
import html
import time
import urllib.parse

from handlers._core import HTTPError, redirect, state
from handlers._events import EventsUnavailable, event_stream, publish
from handlers._pages import Markup, page
from handlers._sessions import local_path, log_in, login_required

MAX_NAME_CHARS = 100            # a title, not a sentence
MAX_PAGE_BYTES = 64 * 1024      # UTF-8 bytes of one text: a long article; what one view renders
MAX_REVISIONS = 100             # kept a page; older ones are dropped at the next edit
MAX_PAGES = 10000               # bounds the keys this area adds to the shared store
MAX_TOTAL_BYTES = 32 * 1024 * 1024  # UTF-8 bytes of every revision kept, of every page
MAX_FORM_BYTES = 3 * MAX_PAGE_BYTES + 4096   # an edit's body: every byte of the largest text
                                # percent-encoded ("%E2"), and room for the other fields
MAX_LOGIN_BYTES = 16 * 1024     # a login's body: a name, a password (1,024 characters by
                                # default, up to 12 bytes each percent-encoded), next, a token
MAX_LIST = 200                  # pages a listing shows at once
MAX_REV_DIGITS = 8              # revision numbers in keys, zero-padded

PAGE_PREFIX, LOG_PREFIX, REV_PREFIX = "wiki/page/", "wiki/log/", "wiki/rev/"
TOPIC_PREFIX = "wiki/"          # a page's events: "wiki/<name>", its name as page_name gives it
COUNT_KEY, BYTES_KEY = "wiki/count", "wiki/bytes"
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -.")
NAME_RULE = ("page names are 1 to %d letters, digits, spaces, '-', '_' (a space) and '.', "
             "not starting with '.'")


# --- names and numbers ------------------------------------------------------------------------

def page_name(text):
    """The page's name (spaces, not underscores; runs of spaces as one) of a URL segment or a
    [[link]], or None if it breaks the rule (NAME_RULE)."""
    if len(text) > 4 * MAX_NAME_CHARS:      # before any work on it
        return None
    name = " ".join(text.replace("_", " ").split())
    if not 1 <= len(name) <= MAX_NAME_CHARS or name[0] == "." or not NAME_CHARS.issuperset(name):
        return None
    return name


def url_of(name):
    """The page's path: its name with "_" for spaces (every other character of a name is one
    a URL takes as it is)."""
    return "/wiki/" + name.replace(" ", "_")


def _name_from(request):
    """The route's {page} as a name; 400 for a name that breaks the rule. A GET of another
    spelling than the page's own URL is answered by _canonical."""
    name = page_name(request.params["page"])
    if name is None:
        raise HTTPError(400, NAME_RULE % MAX_NAME_CHARS)
    return name


def _canonical(request, name, suffix=""):
    """A 301 to the page's own URL when the request spelt it another way, else None."""
    if request.params["page"] != name.replace(" ", "_"):
        return redirect(url_of(name) + suffix, 301)
    return None


def _whole_number(text, max_digits):
    """int(text) if text is 1..max_digits ASCII digits without a leading zero, else None
    (as in handlers/notes.py: one spelling per number)."""
    if not text.isascii() or not text.isdigit() or len(text) > max_digits:
        return None
    if text[0] == "0" and len(text) > 1:
        return None
    return int(text)


def _rev_key(name, number):
    return "%s%s/%0*d" % (REV_PREFIX, name, MAX_REV_DIGITS, number)


def _when(seconds):
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


# --- the markup -------------------------------------------------------------------------------

def render_markup(text, exists):
    """``text`` in the wiki's markup (the module docstring) as HTML; ``exists(name)`` says
    whether a linked page exists (a link to a missing one has class "missing")."""
    out, paragraph, items, code = [], [], [], None
    known = {}

    def page_exists(name):
        if name not in known:
            known[name] = exists(name)
        return known[name]

    def flush():
        if paragraph:
            out.append("<p>%s</p>" % _inline("\n".join(paragraph), page_exists))
            del paragraph[:]
        if items:
            out.append("<ul>%s</ul>" % "".join("<li>%s</li>" % _inline(item, page_exists)
                                               for item in items))
            del items[:]

    for line in text.split("\n"):
        if code is not None:                        # inside a code block: only ``` matters
            if line.strip() == "```":
                out.append("<pre><code>%s</code></pre>" % html.escape("\n".join(code)))
                code = None
            else:
                code.append(line)
        elif line.strip() == "```":
            flush()
            code = []
        elif not line.strip():
            flush()
        elif line.startswith("* "):
            if paragraph:
                flush()
            items.append(line[2:].strip())
        elif _heading(line):
            flush()
            level, title = _heading(line)
            out.append("<h%d>%s</h%d>" % (level + 1, _inline(title, page_exists), level + 1))
        else:
            if items:
                flush()
            paragraph.append(line)
    flush()
    if code is not None:                            # a block never closed runs to the end
        out.append("<pre><code>%s</code></pre>" % html.escape("\n".join(code)))
    return Markup("\n".join(out))


def _heading(line):
    """(level, title) of "= Title", "== Title ==" or "=== Title"; None for other lines
    ("==>", "====", "=" alone are text)."""
    if not line.startswith("="):
        return None
    level = len(line) - len(line.lstrip("="))
    title = line.strip("=").strip()
    if level > 3 or line[level:level + 1] != " " or not title:
        return None
    return level, title


class _Ahead:
    """Where ``marker`` next occurs in ``text`` at or after a position, remembered: asked
    for positions that only grow, it scans each character once (str.find from each "[["
    would make "[[[[[[..." quadratic)."""

    def __init__(self, text, marker):
        self.text, self.marker, self.found = text, marker, -2

    def at_or_after(self, position):
        if self.found != -1 and self.found < position:
            self.found = self.text.find(self.marker, position)
        return self.found


def _inline(text, exists):
    """One paragraph, item or heading: `code` and [[links]] as HTML, the rest escaped."""
    ticks, opens, closes = _Ahead(text, "`"), _Ahead(text, "[["), _Ahead(text, "]]")
    out, done, position = [], 0, 0     # text[done:position] is plain text not yet copied
    while True:
        tick, link = ticks.at_or_after(position), opens.at_or_after(position)
        if tick == -1 and link == -1:
            break
        if link == -1 or (tick != -1 and tick < link):
            end = ticks.at_or_after(tick + 1)
            if end == -1:
                break                                   # no closing backtick: the rest is text
            out.append(html.escape(text[done:tick]))
            out.append("<code>%s</code>" % html.escape(text[tick + 1:end]))
            done = position = end + 1
            continue
        end = closes.at_or_after(link + 2)
        if end == -1:
            break                                       # no "]]" ahead: the rest is text
        # the length first: a "[[" far from the next "]]" is no link, and costs no copy
        name = page_name(text[link + 2:end]) if end - link - 2 <= 4 * MAX_NAME_CHARS else None
        if name is None:
            position = link + 1                         # not a link: "[[" stays text
            continue
        out.append(html.escape(text[done:link]))
        out.append(_link(name, exists(name)))
        done = position = end + 2
    out.append(html.escape(text[done:]))
    return "".join(out)


def _link(name, exists):
    if exists:
        return '<a href="%s">%s</a>' % (url_of(name), html.escape(name))
    return '<a class="missing" href="%s" title="no such page yet">%s</a>' % (
        url_of(name), html.escape(name))


def _page_exists(name):
    return state.get(PAGE_PREFIX + name) is not None


# --- pages ------------------------------------------------------------------------------------

def _show(request, template, status=200, headers=None, **variables):
    """The page ``template`` with what every wiki page shows: the user and, for a session that
    exists, its CSRF token (the logout button; a form). Reading the token of a session that
    does not exist yet would make one for every anonymous visitor: a store write per view."""
    user, token = None, ""
    try:
        session = request.session
        user = session.user
        if session.id is not None:
            token = session.csrf_token
    except HTTPError:           # a cross-site POST, refused: the page shows nobody logged in
        pass
    if token:                   # the page holds a user's name and token: no shared cache
        headers = list(headers or ()) + [("Cache-Control", "private, no-store")]
    here = request.path + ("?" + request.query_string if request.query_string else "")
    login_url = "/login?next=" + urllib.parse.quote(here if request.method == "GET"
                                                    and request.path != "/login" else "/wiki/")
    return page(template, status=status, headers=headers, user=user or "", csrf_token=token,
                login_url=login_url, **variables)


def html_errors(handler):
    """A wiki handler whose expected failures (HTTPError) are shown as a page, with the
    same status and headers (a 429's Retry-After), rather than a line of text."""
    def shown_as_pages(request):
        try:
            return handler(request)
        except HTTPError as error:
            return _show(request, "wiki/error.html", error.status, error.headers,
                         message=error.message or "that did not work")
    shown_as_pages.__name__ = handler.__name__
    shown_as_pages.__doc__ = handler.__doc__
    return shown_as_pages


@html_errors
def list_pages(request):
    by_name = request.query.get("sort") == "name"
    start = _whole_number(request.query.get("start", "0"), 9)
    if start is None:
        raise HTTPError(400, "'start' must be a whole number")
    # Every page's summary (~100 bytes of JSON each), sorted; one screen of them is shown.
    # Measured at 10,000 pages (MAX_PAGES): 23-25 ms a listing, by time or by name.
    rows = [dict(summary, name=key[len(PAGE_PREFIX):])
            for key, summary in state.items(PAGE_PREFIX)]
    if by_name:
        rows.sort(key=lambda row: row["name"])
    else:
        rows.sort(key=lambda row: row["time"], reverse=True)
    shown = [{"name": row["name"], "url": url_of(row["name"]), "author": row["author"],
              "when": _when(row["time"]), "rev": row["rev"]}
             for row in rows[start:start + MAX_LIST]]
    more = start + MAX_LIST < len(rows)
    return _show(request, "wiki/list.html", pages=shown, count=len(rows), by_name=by_name,
                 next_url=("/wiki/?%sstart=%d" % ("sort=name&" if by_name else "",
                                                  start + MAX_LIST)) if more else "")


def go_to_list(request):
    return redirect("/wiki/", 301)


@html_errors
def show_page(request):
    name = _name_from(request)
    moved = _canonical(request, name)
    if moved:
        return moved
    summary = state.get(PAGE_PREFIX + name)
    revision = summary and state.get(_rev_key(name, summary["rev"]))
    if not revision:
        return _show(request, "wiki/missing.html", 404, name=name, url=url_of(name))
    return _show(request, "wiki/page.html", name=name, url=url_of(name), rev=summary["rev"],
                 author=revision["author"], when=_when(revision["time"]), old=False,
                 current=summary["rev"], body=_rendered(name, summary["rev"], revision["text"]),
                 text=revision["text"])


# A page's HTML, kept by (store, name, revision, pages made so far): a revision's text never
# changes, and whether its links' pages exist changes only when a page is made (none is ever
# deleted). Rendering is ~80% of a view (cProfile); a view of a kept page costs a store read
# instead (bench/bench_wiki.py: ~2.6x the views a second). The store is in the key because this
# module serves every server of the process. Brute force, as one process allows: at most
# MAX_RENDERED pages, all dropped when full.
MAX_RENDERED = 512
_rendered_pages = {}   # (data dir, name, rev, pages made) -> Markup; dict operations are atomic


def _rendered(name, rev, text):
    key = (state.data_dir, name, rev, state.get(COUNT_KEY, 0))
    html = _rendered_pages.get(key)
    if html is None:
        html = render_markup(text, _page_exists)
        if len(_rendered_pages) >= MAX_RENDERED:
            _rendered_pages.clear()
        _rendered_pages[key] = html
    return html


@html_errors
def show_history(request):
    name = _name_from(request)
    moved = _canonical(request, name, "/history")
    if moved:
        return moved
    log = state.get(LOG_PREFIX + name)
    if not log:
        return _show(request, "wiki/missing.html", 404, name=name, url=url_of(name))
    revisions = [{"rev": rev, "author": author, "when": _when(when), "bytes": size,
                  "url": "%s/history/%d" % (url_of(name), rev)}
                 for rev, author, when, size in reversed(log)]
    return _show(request, "wiki/history.html", name=name, url=url_of(name),
                 revisions=revisions)


@html_errors
def show_revision(request):
    name = _name_from(request)
    number = _whole_number(request.params["n"], MAX_REV_DIGITS)
    if number is None or number < 1:
        raise HTTPError(404, "no such revision: revisions are numbered from 1")
    moved = _canonical(request, name, "/history/%d" % number)
    if moved:
        return moved
    revision = state.get(_rev_key(name, number))
    if revision is None:
        raise HTTPError(404, "no such revision (only the last %d are kept)" % MAX_REVISIONS)
    summary = state.get(PAGE_PREFIX + name) or {"rev": number}
    return _show(request, "wiki/page.html", name=name, url=url_of(name), rev=number,
                 author=revision["author"], when=_when(revision["time"]),
                 old=number != summary["rev"], current=summary["rev"],
                 body=_rendered(name, number, revision["text"]), text=revision["text"])


@html_errors
@login_required
def edit_page(request):
    name = _name_from(request)
    moved = _canonical(request, name, "/edit")
    if moved:
        return moved
    summary = state.get(PAGE_PREFIX + name)
    if summary is None:
        return _edit_form(request, name, "", 0)     # a new page: its base is revision 0
    revision = state.get(_rev_key(name, summary["rev"]))
    return _edit_form(request, name, revision["text"], summary["rev"])


def _edit_form(request, name, text, base_rev, status=200, message="", theirs=None):
    """The edit form; on a conflict (``theirs``: the current revision) theirs is shown too."""
    return _show(request, "wiki/edit.html", status, name=name, url=url_of(name), text=text,
                 base_rev=base_rev, message=message, conflict=theirs is not None,
                 theirs=theirs or {"text": "", "author": "", "when": "", "rev": 0})


@html_errors
@login_required
def save_page(request):
    """The story of an edit: validate the form, then in one transaction check the revision it
    was based on, the budgets, and write the revision, the page and the counters together."""
    name = _name_from(request)
    request.body(max_bytes=MAX_FORM_BYTES)     # 413 past it, before the form is parsed
    form = request.form()
    text = form.get("text", "").replace("\r\n", "\n").replace("\r", "\n")
    base = _whole_number(form.get("base_rev", ""), MAX_REV_DIGITS)
    if base is None:
        raise HTTPError(400, "'base_rev' must be a revision number (0 for a new page)")
    size = len(text.encode("utf-8"))
    problem = _text_problem(text, size)
    if problem:
        return _edit_form(request, name, text, base, problem[0], problem[1])
    user, now = request.session.user, time.time()
    try:
        with state.transaction() as tx:
            summary = tx.get(PAGE_PREFIX + name)
            current = summary["rev"] if summary else 0
            if base == current:
                _save_locked(tx, name, summary, text, size, user, now)
    except HTTPError as full:           # 507: the form again, so the text is not lost
        return _edit_form(request, name, text, base, full.status, full.message)
    if base != current:
        theirs = state.get(_rev_key(name, current)) or {"text": "", "author": "", "time": now}
        return _edit_form(request, name, text, current, 409,
                          "someone saved this page since you began: revision %d by %s. Your "
                          "text is below; merge theirs into it and save again."
                          % (current, theirs["author"]),
                          theirs={"text": theirs["text"], "author": theirs["author"],
                                  "when": _when(theirs["time"]), "rev": current})
    # durable now: tell the page's readers (its event is ~100 bytes, never too large); with
    # the events unavailable (a cluster's Redis down) the save stands, and open pages are told
    # reset when Redis is back
    try:
        publish(TOPIC_PREFIX + name, {"page": name, "rev": current + 1, "by": user},
                event="edited")
    except EventsUnavailable:
        pass
    return redirect(url_of(name))


def _text_problem(text, size):
    """(status, message) of a text the wiki will not keep, or None."""
    if size > MAX_PAGE_BYTES:
        return 413, "'text' must be at most %d bytes of UTF-8" % MAX_PAGE_BYTES
    if not text.strip():
        return 400, "'text' must not be empty"
    if any(ord(char) < 0x20 and char not in "\n\t" for char in text):
        return 400, "'text' must not hold control characters"
    return None


def _save_locked(tx, name, summary, text, size, user, now):
    """Write revision summary.rev + 1 in ``tx``, dropping the oldest past MAX_REVISIONS; 507
    (and nothing written) past MAX_PAGES or MAX_TOTAL_BYTES."""
    log = tx.get(LOG_PREFIX + name, []) if summary else []
    total = tx.get(BYTES_KEY, 0) + size
    if summary is None and tx.get(COUNT_KEY, 0) >= MAX_PAGES:
        raise HTTPError(507, "the wiki is full: no new pages can be made")
    rev = (summary["rev"] if summary else 0) + 1
    log.append([rev, user, now, size])
    while len(log) > MAX_REVISIONS:
        dropped = log.pop(0)
        tx.delete(_rev_key(name, dropped[0]))
        total -= dropped[3]
    if total > MAX_TOTAL_BYTES:
        raise HTTPError(507, "the wiki's storage is full: no more text can be saved")
    tx.put(_rev_key(name, rev), {"text": text, "author": user, "time": now})
    tx.put(LOG_PREFIX + name, log)
    tx.put(PAGE_PREFIX + name, {"rev": rev, "oldest": log[0][0], "author": user, "time": now})
    tx.put(BYTES_KEY, total)
    if summary is None:
        tx.incr(COUNT_KEY)


def page_events(request):
    """The page's events, for its readers (pages/assets/wiki-live.js). Any spelling of the name
    follows the one page, and a page not written yet may be followed: no redirect, no 404."""
    return event_stream(request, TOPIC_PREFIX + _name_from(request))


# --- logging in and out -----------------------------------------------------------------------

@html_errors
def login_form(request):
    return _login_form(request, local_path(request.query.get("next"), "/wiki/"))


def _login_form(request, next_path, status=200, message="", name="", headers=None):
    return _show(request, "wiki/login.html", status, headers, next=next_path, message=message,
                 name=name)


@html_errors
def login(request):
    request.session                 # the CSRF rule first: a cross-site POST stops here (403)
    request.body(max_bytes=MAX_LOGIN_BYTES)
    form = request.form()
    name, target = form.get("name", ""), local_path(form.get("next"), "/wiki/")
    try:   # (log_in keeps the name as the accounts do: "Alice" edits as "alice")
        if log_in(request, name, form.get("password", "")):
            return redirect(target)
    except HTTPError as error:
        if error.status != 429:
            raise
        return _login_form(request, target, 429, "too many failed logins: try again later",
                           name, error.headers)
    return _login_form(request, target, 401, "wrong name or password", name)


@html_errors
def logout(request):
    request.session.logout()        # touching the session first: the CSRF rule
    return redirect("/wiki/")


ROUTES = [
    ("GET", "/wiki", go_to_list),
    ("GET", "/wiki/", list_pages),
    ("GET", "/wiki/{page}", show_page),
    ("POST", "/wiki/{page}", save_page),
    ("GET", "/wiki/{page}/edit", edit_page),
    ("GET", "/wiki/{page}/history", show_history),
    ("GET", "/wiki/{page}/history/{n}", show_revision),
    ("GET", "/wiki/{page}/events", page_events),
    ("GET", "/login", login_form),
    ("POST", "/login", login),
    ("POST", "/logout", logout),
]
