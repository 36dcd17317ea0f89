"""The wiki area (handlers/wiki.py) over HTTP against a real server: pages, edits, history,
its markup, names, budgets, conflicts, logins and the CSRF rule; and, through the real
``python3 server.py``, that a page and an account outlive a restart and a SIGKILL.
scrypt_n is 16384 here, through the setting, so a login takes ~30 ms."""
import glob
import html
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse

import pytest

import handlers.wiki as wiki
from conftest import ROOT, SERVER, request
from test_notes_events import EventReader

FAST = {"accounts.scrypt_n": 16384, "state.durability": "off"}
PASSWORD = "correct horse battery"
SAME = {"Sec-Fetch-Site": "same-origin"}
FORM = "application/x-www-form-urlencoded"
SCRIPT = "<script>window.pwned=1</script>"
BREAKOUT = '"><img src=x onerror=alert(1)>'


def serve(start_server, **config):
    """A server with the accounts alice and bob."""
    server = start_server(config=dict(FAST, **config))
    server.accounts.add("alice", PASSWORD)
    server.accounts.add("bob", PASSWORD)
    return server


def cookie_of(headers):
    return headers["set-cookie"].split(";")[0]


def post(server, path, fields, cookie=None, headers=SAME):
    """A form POST, as a page of this site sends it (Sec-Fetch-Site: same-origin)."""
    sent = dict(headers, **{"Content-Type": FORM})
    if cookie:
        sent["Cookie"] = cookie
    return request(server, "POST", path, urllib.parse.urlencode(fields), sent)


def get(server, path, cookie=None):
    status, headers, body = request(server, "GET", path,
                                    headers={"Cookie": cookie} if cookie else {})
    return status, headers, body.decode("utf-8")


def log_in(server, name="alice", password=PASSWORD, cookie=None):
    status, headers, _ = post(server, "/login", {"name": name, "password": password,
                                                 "next": "/wiki/"}, cookie)
    assert status == 303, status
    return cookie_of(headers)


def save(server, cookie, name, text, base_rev):
    return post(server, "/wiki/" + name, {"text": text, "base_rev": str(base_rev)}, cookie)


def user_of(server, cookie):
    """Who the wiki's nav says is logged in with ``cookie`` (None: nobody)."""
    body = get(server, "/wiki/", cookie)[2]
    if '<span class="user">' not in body:
        return None
    return body.split('<span class="user">')[1].split("<")[0]


# --- reading and editing ---------------------------------------------------------------------

def test_list_show_edit_and_history(start_server):
    server = serve(start_server)
    assert get(server, "/wiki/")[0] == 200 and "No pages yet" in get(server, "/wiki/")[2]
    assert request(server, "GET", "/wiki")[1]["location"] == "/wiki/"
    alice, bob = log_in(server), log_in(server, "Bob")     # names are case-insensitive
    status, headers, _ = save(server, alice, "Main_page", "first words", 0)
    assert (status, headers["location"]) == (303, "/wiki/Main_page")

    status, _, body = get(server, "/wiki/Main_page/edit", bob)
    assert status == 200
    assert '<textarea id="text" name="text" rows="20">\nfirst words</textarea>' in body
    assert '<input type="hidden" name="base_rev" value="1">' in body
    assert save(server, bob, "Main_page", "second words", 1)[0] == 303
    assert save(server, alice, "Other", "another page", 0)[0] == 303

    status, headers, body = get(server, "/wiki/Main_page")        # anonymous: may read
    assert status == 200 and "<p>second words</p>" in body
    assert "cache-control" not in headers
    assert get(server, "/wiki/Main_page", bob)[1]["cache-control"] == "private, no-store"
    assert "Revision 2 by bob" in body and "/wiki/Main_page/edit" not in body
    listed = get(server, "/wiki/")[2]
    assert listed.index(">Other</a>") < listed.index(">Main page</a>")   # newest first
    assert "<td>bob</td>" in listed and "<td>alice</td>" in listed
    by_name = get(server, "/wiki/?sort=name")[2]
    assert by_name.index(">Main page</a>") < by_name.index(">Other</a>")

    status, _, body = get(server, "/wiki/Main_page/history")
    assert status == 200
    rows = body.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]
    assert ['/history/2">2</a> (current)' in rows[0], "bob" in rows[0]] == [True, True]
    assert '/history/1">1</a>' in rows[1] and "alice" in rows[1] and len(rows) == 2
    status, _, body = get(server, "/wiki/Main_page/history/1")
    assert status == 200 and "<p>first words</p>" in body and "An old revision: 1 of 2" in body
    for missing in ("/wiki/Main_page/history/3", "/wiki/Main_page/history/0",
                    "/wiki/Main_page/history/01", "/wiki/Main_page/history/x",
                    "/wiki/Nothing/history"):
        assert get(server, missing)[0] == 404, missing


def test_a_missing_page_is_a_404_that_offers_to_create_it(start_server):
    server = serve(start_server)
    status, _, body = get(server, "/wiki/New_page")
    assert status == 404 and "no page of that name" in body
    assert 'href="/wiki/New_page/edit"' not in body and "/login?next=/wiki/New_page" in body
    status, _, body = get(server, "/wiki/New_page", log_in(server))
    assert status == 404 and 'href="/wiki/New_page/edit">Create it</a>' in body


MARKUP = """= Title
== Section ==
=== Sub

first line
second line with `some code` and [[Main page]] and [[No such page]]

* one
* two `x`
```
= not a heading
[[not a link]]
```
==== too deep
[[bad/name]] [[.hidden]] [[ unclosed `tick"""


def test_each_construct_of_the_markup(start_server):
    server = serve(start_server)
    alice = log_in(server)
    assert save(server, alice, "Main_page", "home", 0)[0] == 303
    assert save(server, alice, "Markup", MARKUP, 0)[0] == 303
    body = get(server, "/wiki/Markup")[2]
    article = body.split("<article>\n")[1].split("\n</article>")[0]
    assert article == "\n".join([
        "<h2>Title</h2>",
        "<h3>Section</h3>",
        "<h4>Sub</h4>",
        '<p>first line\nsecond line with <code>some code</code> and '
        '<a href="/wiki/Main_page">Main page</a> and '
        '<a class="missing" href="/wiki/No_such_page" title="no such page yet">'
        'No such page</a></p>',
        "<ul><li>one</li><li>two <code>x</code></li></ul>",
        "<pre><code>= not a heading",
        "[[not a link]]</code></pre>",
        '<p>==== too deep',
        '[[bad/name]] [[.hidden]] [[ unclosed `tick</p>'])


def test_a_kept_rendering_follows_the_pages_its_links_name(start_server):
    server = serve(start_server)
    alice = log_in(server)
    assert save(server, alice, "Links", "see [[Later]]", 0)[0] == 303
    assert 'class="missing" href="/wiki/Later"' in get(server, "/wiki/Links")[2]
    assert 'class="missing" href="/wiki/Later"' in get(server, "/wiki/Links")[2]   # kept
    assert save(server, alice, "Later", "here now", 0)[0] == 303
    assert '<a href="/wiki/Later">Later</a>' in get(server, "/wiki/Links")[2]


def test_the_renderer_escapes_and_keeps_to_its_rules():
    def render(text):
        return wiki.render_markup(text, lambda name: name == "Yes")
    assert render("a <b> & 'c' \"d\"") == "<p>a &lt;b&gt; &amp; &#x27;c&#x27; &quot;d&quot;</p>"
    assert render("`<i>`") == "<p><code>&lt;i&gt;</code></p>"
    assert render("[[Yes]] [[yes_]]") == ('<p><a href="/wiki/Yes">Yes</a> <a class="missing" '
                                          'href="/wiki/yes" title="no such page yet">yes</a></p>')
    assert render("[[[[Yes]]") == '<p>[[<a href="/wiki/Yes">Yes</a></p>'
    assert render("```\n<x>") == "<pre><code>&lt;x&gt;</code></pre>"   # unclosed: to the end
    assert render("=no space") == "<p>=no space</p>"
    assert render("* <a>\ntext") == "<ul><li>&lt;a&gt;</li></ul>\n<p>text</p>"
    assert render("") == "" and render("\n\n") == ""
    assert isinstance(render("x"), wiki.Markup)


@pytest.mark.parametrize("text", [
    "[[" * 20000, "`" * 40000, "[[a" * 13000, "[[" + "a" * 39000 + "]]", "]]" * 20000,
    "= " * 20000, "=" * 40000, "* " * 20000, "* \n" * 13000, "```\n" * 10000,
    "[[`" * 13000, "a\n" * 20000, ("[[" + "_" * 300 + "]]") * 130,
    "[[" * 19999 + "]]", "[[a]]" * 8000, ("[[" + "a" * 399 + "]]") * 99,
])
def test_a_40_kb_pathological_text_renders_in_well_under_a_second(text):
    started = time.perf_counter()
    wiki.render_markup(text, lambda name: False)
    assert time.perf_counter() - started < 0.25


def test_a_pathological_page_over_http(start_server):
    server = serve(start_server)
    alice = log_in(server)
    text = "[[" * 16000 + "`" * 16000 + "[[a]]" * 1000
    assert save(server, alice, "Heavy", text, 0)[0] == 303
    started = time.perf_counter()
    status, _, body = get(server, "/wiki/Heavy")
    assert status == 200 and body.count('class="missing"') == 1000
    assert time.perf_counter() - started < 1.0


def test_hostile_text_comes_out_escaped_everywhere(start_server):
    server = serve(start_server)
    alice = log_in(server)
    hostile = "%s\n\n%s\n\n* %s\n\n`%s`\n\n```\n%s\n```" % (SCRIPT, BREAKOUT, SCRIPT,
                                                            BREAKOUT, SCRIPT)
    assert save(server, alice, "Danger", hostile, 0)[0] == 303
    assert save(server, alice, "Danger", "calm " + BREAKOUT, 1)[0] == 303
    pages = {path: get(server, path, alice)[2] for path in (
        "/wiki/Danger/history/1", "/wiki/Danger", "/wiki/Danger/edit")}
    pages["409"] = save(server, alice, "Danger", SCRIPT + BREAKOUT, 1)[2].decode()
    for path, body in pages.items():
        assert "<script>window" not in body and "<img" not in body, path
        assert BREAKOUT in html.unescape(body), path    # shown as it was written
    assert html.unescape(pages["/wiki/Danger/history/1"]).count(SCRIPT) == 6  # body and source
    assert SCRIPT + BREAKOUT in html.unescape(pages["409"])
    # the edit form holds the text as the textarea's content, escaped
    assert ("\ncalm &#34;&gt;&lt;img src=x onerror=alert(1)&gt;</textarea>"
            in pages["/wiki/Danger/edit"])
    status, headers, _ = request(server, "GET", "/wiki/Danger")
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"].split("script-src")[1] \
        .split(";")[0]


# --- names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, status", [
    ("/wiki/.hidden", 400), ("/wiki/a%2Fb", 400), ("/wiki/%3Cscript%3E", 400),
    ("/wiki/" + "a" * 101, 400), ("/wiki/caf%C3%A9", 400), ("/wiki/a%09b", 301),
    ("/wiki/_", 400), ("/wiki/" + "a" * 100, 404), ("/wiki/a.b-c_9", 404),
    ("/wiki/.hidden/edit", 400), ("/wiki/.hidden/history", 400),
    ("/wiki/.hidden/history/1", 400),
])
def test_bad_names_get_a_clear_page_never_a_500(start_server, path, status):
    server = serve(start_server)
    got, headers, body = get(server, path, log_in(server))
    assert got == status, (path, got, body[-300:])
    assert headers.get("content-type", "text/html").startswith("text/html")
    if status == 400:
        assert "page names are 1 to 100 letters" in body and "<script" not in body
        assert post(server, path.split("/edit")[0], {"text": "x", "base_rev": "0"},
                    log_in(server))[0] in (400, 405)


def test_each_page_has_one_url(start_server):
    server = serve(start_server)
    alice = log_in(server)
    assert save(server, alice, "Main%20page", "home", 0)[1]["location"] == "/wiki/Main_page"
    for spelling, suffix in (("Main%20page", ""), ("Main__page", "/history"),
                             ("_Main_page_", "/edit"), ("Main%20%20page", "/history/1")):
        status, headers, _ = request(server, "GET", "/wiki/%s%s" % (spelling, suffix),
                                     headers={"Cookie": alice})
        assert (status, headers["location"]) == (301, "/wiki/Main_page" + suffix), spelling
    assert get(server, "/wiki/main_page")[0] == 404         # case matters


# --- budgets ---------------------------------------------------------------------------------

def test_a_text_is_at_most_max_page_bytes(start_server, monkeypatch):
    monkeypatch.setattr(wiki, "MAX_PAGE_BYTES", 100)
    server = serve(start_server)
    alice = log_in(server)
    assert save(server, alice, "Big", "\u00e9" * 50, 0)[0] == 303     # 100 bytes: fits
    status, _, body = save(server, alice, "Big", "\u00e9" * 50 + "x", 1)
    assert status == 413 and "at most 100 bytes" in body.decode()
    assert "\u00e9" * 50 + "x</textarea>" in body.decode()           # the text is not lost
    monkeypatch.setattr(wiki, "MAX_FORM_BYTES", 1000)
    status, _, body = save(server, alice, "Big", "y" * 1000, 1)
    assert status == 413 and b"request body too large" in body
    assert "<p>" + "\u00e9" * 50 + "</p>" in get(server, "/wiki/Big")[2]
    assert save(server, alice, "Big", " \n ", 1)[0] == 400           # nothing to keep
    assert save(server, alice, "Big", "a\x00b", 1)[0] == 400
    assert save(server, alice, "Big", "x", "01")[0] == 400
    assert save(server, alice, "Big", "x", "")[0] == 400


def test_only_max_revisions_are_kept(start_server, monkeypatch):
    monkeypatch.setattr(wiki, "MAX_REVISIONS", 3)
    server = serve(start_server)
    alice = log_in(server)
    for number in range(5):
        assert save(server, alice, "Page", "text %d" % (number + 1), number)[0] == 303
    body = get(server, "/wiki/Page/history")[2]
    assert [n in body for n in ('/history/5"', '/history/4"', '/history/3"', '/history/2"')] \
        == [True, True, True, False]
    assert get(server, "/wiki/Page/history/2")[0] == 404
    assert "<p>text 3</p>" in get(server, "/wiki/Page/history/3")[2]
    assert server.store.get("wiki/bytes") == 3 * len("text 3")
    assert server.store.keys("wiki/rev/Page/") == ["wiki/rev/Page/%08d" % n for n in (3, 4, 5)]


def test_507_when_the_wiki_is_full_and_nothing_is_written(start_server, monkeypatch):
    monkeypatch.setattr(wiki, "MAX_PAGES", 2)
    monkeypatch.setattr(wiki, "MAX_TOTAL_BYTES", 30)
    server = serve(start_server)
    alice = log_in(server)
    assert save(server, alice, "One", "a" * 10, 0)[0] == 303
    assert save(server, alice, "Two", "b" * 10, 0)[0] == 303
    status, _, body = save(server, alice, "Three", "c", 0)
    assert status == 507 and "the wiki is full" in body.decode()
    assert "\nc</textarea>" in body.decode()
    status, _, body = save(server, alice, "Two", "b" * 11, 1)
    assert status == 507 and "storage is full" in body.decode()
    assert server.store.get("wiki/bytes") == 20 and server.store.get("wiki/count") == 2
    assert get(server, "/wiki/Three")[0] == 404 and "<p>bbbbbbbbbb</p>" in get(
        server, "/wiki/Two")[2]
    assert save(server, alice, "Two", "b" * 10, 1)[0] == 303      # at the limit: fits


# --- live: a page's readers hear of its edits ------------------------------------------------

def next_edit(reader):
    got = reader.next_event()
    assert got["event"] == "edited", got
    return int(got["id"]), json.loads(got["data"])


def test_a_save_tells_the_pages_readers_and_nothing_else_does(start_server):
    server = serve(start_server)
    alice, bob = log_in(server), log_in(server, "bob")
    page = EventReader(server, "/wiki/Live_page/events")     # a page not written yet
    spelt = EventReader(server, "/wiki/Live%20page/events")  # any spelling: the one page
    other = EventReader(server, "/wiki/Other/events")
    try:
        assert (page.status, page.headers["content-type"]) == (200, "text/event-stream; "
                                                                    "charset=utf-8")
        assert save(server, alice, "Live_page", "first", 0)[0] == 303
        assert save(server, alice, "Live_page", "stale", 0)[0] == 409       # no event
        assert save(server, bob, "Live_page", "", 1)[0] == 400              # no event
        assert post(server, "/wiki/Live_page", {"text": "forged", "base_rev": "1"}, bob,
                    {"Sec-Fetch-Site": "cross-site"})[0] == 403          # no event
        assert save(server, bob, "Live_page", "second", 1)[0] == 303
        for reader in (page, spelt):
            first_id, first = next_edit(reader)
            second_id, second = next_edit(reader)
            assert first == {"page": "Live page", "rev": 1, "by": "alice"}
            assert second == {"page": "Live page", "rev": 2, "by": "bob"}
            assert first_id < second_id and reader.quiet()
        assert other.quiet()
    finally:
        for reader in (page, spelt, other):
            reader.close()
    assert request(server, "GET", "/wiki/.bad/events")[0] == 400


def test_the_current_revision_follows_its_events_and_an_old_one_does_not(start_server):
    server = serve(start_server)
    alice = log_in(server)
    for rev in (0, 1):
        assert save(server, alice, "Watched", "text %d" % rev, rev)[0] == 303
    status, headers, body = get(server, "/wiki/Watched")
    assert ('data-events="/wiki/Watched/events" data-rev="2"' in body
            and '<script src="/assets/live.js" defer></script>'
                '<script src="/assets/wiki-live.js" defer></script>' in body)
    assert "'nonce-" not in headers["content-security-policy"]      # a file from 'self'
    old = get(server, "/wiki/Watched/history/1")[2]
    assert "An old revision" in old and "wiki-live.js" not in old and "data-events" not in old
    status, headers, script = request(server, "GET", "/assets/wiki-live.js")
    assert status == 200 and b"live(notice.dataset.events" in script


# --- conflicts ---------------------------------------------------------------------------------

def test_a_stale_base_rev_is_a_409_showing_both_texts(start_server):
    server = serve(start_server)
    alice, bob = log_in(server), log_in(server, "bob")
    assert save(server, alice, "Shared", "the original", 0)[0] == 303
    assert save(server, bob, "Shared", "bob's change", 1)[0] == 303
    status, _, body = save(server, alice, "Shared", "alice's change", 1)
    body = body.decode()
    assert status == 409
    assert "revision 2 by bob" in body
    assert "<pre>bob&#39;s change</pre>" in body                        # theirs
    assert "\nalice&#39;s change</textarea>" in body                    # yours, in the form
    assert '<input type="hidden" name="base_rev" value="2">' in body    # to save over theirs
    assert "<p>bob&#x27;s change</p>" in get(server, "/wiki/Shared")[2]
    assert save(server, alice, "Shared", "a new page?", 0)[0] == 409
    assert save(server, alice, "Unmade", "x", 3)[0] == 409
    assert save(server, alice, "Shared", "merged", 2)[0] == 303


# --- logins, logouts and the CSRF rule -------------------------------------------------------

def test_editing_needs_a_login(start_server):
    server = serve(start_server)
    status, headers, _ = get(server, "/wiki/Some_page/edit?x=1")
    assert status == 303
    assert headers["location"] == "/login?next=%2Fwiki%2FSome_page%2Fedit%3Fx%3D1"
    status, _, body = get(server, headers["location"])
    assert status == 200 and 'name="next" value="/wiki/Some_page/edit?x=1"' in body
    status, _, body = post(server, "/wiki/Some_page", {"text": "x", "base_rev": "0"})
    assert status == 403 and "log in first" in body.decode()
    assert get(server, "/wiki/Some_page")[0] == 404


def test_log_in_and_out(start_server):
    server = serve(start_server)
    status, _, body = post(server, "/login", {"name": "alice", "password": "wrong password",
                                              "next": "/wiki/X"})
    assert status == 401 and b"wrong name or password" in body
    assert b'name="next" value="/wiki/X"' in body and b'value="alice"' in body
    assert "set-cookie" not in request(server, "GET", "/login")[1]   # no session for a form
    status, headers, _ = post(server, "/login", {"name": "alice", "password": PASSWORD,
                                                 "next": "/wiki/X/edit"})
    assert (status, headers["location"]) == (303, "/wiki/X/edit")
    first = cookie_of(headers)
    assert user_of(server, first) == "alice"
    # logging in again replaces the id: the old cookie is nobody's from then on
    status, headers, _ = post(server, "/login", {"name": "bob", "password": PASSWORD,
                                                 "next": "//evil.example/"}, first)
    assert (status, headers["location"]) == (303, "/wiki/")           # local paths only
    second = cookie_of(headers)
    assert second != first
    assert user_of(server, first) is None and user_of(server, second) == "bob"
    status, headers, _ = post(server, "/logout", {}, second)
    assert (status, headers["location"]) == (303, "/wiki/")
    assert user_of(server, second) is None
    assert get(server, "/wiki/X/edit", second)[1]["location"].startswith("/login?next=")


def test_failed_logins_are_throttled_and_shown_as_a_page(start_server):
    server = serve(start_server, **{"sessions.login_failures_per_account": 3})
    statuses = [post(server, "/login", {"name": "alice", "password": "nope %d" % n})[0]
                for n in range(4)]
    status, headers, body = post(server, "/login", {"name": "alice", "password": PASSWORD})
    assert statuses == [401, 401, 401, 429] and status == 429
    assert headers["content-type"].startswith("text/html") and "retry-after" in headers
    assert b"too many failed logins" in body and b"<form" in body


CROSS_SITE = [{"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"},
              {"Origin": "null"}, {"Sec-Fetch-Site": "same-site"}]


def test_a_cross_site_form_post_is_refused_and_changes_nothing(start_server):
    server = serve(start_server)
    alice = log_in(server)
    assert save(server, alice, "Target", "as it was", 0)[0] == 303
    for cookie in (alice, None):
        for cross in CROSS_SITE:
            status, _, _ = post(server, "/wiki/Target", {"text": "defaced", "base_rev": "1"},
                                cookie, cross)
            assert status == 403, (cookie, cross)
            status, _, _ = post(server, "/wiki/New", {"text": "spam", "base_rev": "0"},
                                cookie, cross)
            assert status == 403
            status, headers, _ = post(server, "/logout", {}, cookie, cross)
            assert status == 403 and "set-cookie" not in headers
            status, _, _ = post(server, "/login", {"name": "bob", "password": PASSWORD},
                                cookie, cross)
            assert status == 403
    assert user_of(server, alice) == "alice"                    # not logged out
    assert "<p>as it was</p>" in get(server, "/wiki/Target")[2]
    assert get(server, "/wiki/New")[0] == 404
    assert server.store.get("wiki/page/Target")["rev"] == 1


def test_without_origin_or_fetch_metadata_the_form_token_decides(start_server):
    server = serve(start_server)
    alice = log_in(server)
    body = get(server, "/wiki/Page/edit", alice)[2]
    token = body.split('name="csrf_token" value="')[1].split('"')[0]
    assert body.count('name="csrf_token" value="%s"' % token) == 2   # logout and the form
    for fields in ({"text": "x", "base_rev": "0"},
                   {"text": "x", "base_rev": "0", "csrf_token": "wrong"}):
        assert post(server, "/wiki/Page", fields, alice, {})[0] == 403
    assert post(server, "/logout", {}, alice, {})[0] == 403
    assert get(server, "/wiki/Page")[0] == 404 and user_of(server, alice) == "alice"
    fields = {"text": "x", "base_rev": "0", "csrf_token": token}
    assert post(server, "/wiki/Page", fields, alice, {})[0] == 303
    assert post(server, "/logout", {"csrf_token": token}, alice, {})[0] == 303
    assert user_of(server, alice) is None


def test_the_home_page_links_to_the_wiki(start_server):
    server = serve(start_server)
    assert 'href="/wiki/"' in get(server, "/")[2]


def test_the_guide_shows_the_wikis_own_code():
    """docs/areas.md, "A page with a form and a login": each line of its code blocks is a line
    of handlers/wiki.py or of a wiki template (or the layout), so the guide cannot drift."""
    def lines_of(*paths):
        found = set()
        for path in paths:
            with open(path, encoding="utf-8") as source:
                found.update(line.strip() for line in source)
        return found
    with open(os.path.join(ROOT, "docs", "areas.md"), encoding="utf-8") as guide:
        section = guide.read().split("\n## A page with a form and a login\n")[1].split("\n## ")[0]
    sources = {"python": lines_of(os.path.join(ROOT, "handlers", "wiki.py")),
               "html": lines_of(*glob.glob(os.path.join(ROOT, "handlers", "templates", "wiki",
                                                        "*.html")))}
    shown = 0
    for language, block in re.findall(r"```(python|html)\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if line.strip() and not line.strip().startswith("..."):
                assert line.strip() in sources[language], line
                shown += 1
    assert shown > 60


# --- a real process: restarts and SIGKILL ----------------------------------------------------

def test_a_page_and_an_account_outlive_a_restart_and_a_sigkill(tmp_path, server_process):
    data_dir = tmp_path / "data"
    flags = ("--accounts-scrypt-n", "16384", "--access-log", "off")
    added = subprocess.run([sys.executable, SERVER, "--data-dir", str(data_dir), *flags,
                            "--add-user", "carol"], input=PASSWORD + "\n",
                           capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr

    running = server_process(*flags, data_dir=data_dir)
    carol = log_in(running, "carol")
    assert save(running, carol, "Kept", "written before a restart", 0)[0] == 303
    assert running.stop() == 0

    running = server_process(*flags, data_dir=data_dir)
    assert "<p>written before a restart</p>" in get(running, "/wiki/Kept")[2]
    assert user_of(running, carol) == "carol"                  # the session survived too
    carol = log_in(running, "carol")                             # and the account
    assert save(running, carol, "Kept", "written before a kill", 1)[0] == 303
    running.kill()                                               # SIGKILL: no clean stop

    running = server_process(*flags, data_dir=data_dir)
    body = get(running, "/wiki/Kept")[2]
    assert "<p>written before a kill</p>" in body and "Revision 2 by carol" in body
    assert "/history/1" in get(running, "/wiki/Kept/history")[2]
    assert user_of(running, carol) == "carol"                  # the login, acknowledged: kept
