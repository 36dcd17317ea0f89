"""The wiki in a real browser: headless Chromium (tests/cdp.py, as test_status_browser.py drives
it) logs in through the form, writes a page whose text is hostile HTML, and shows that no
script of it ran and that it reads as written; edits it, reads its history, logs out, and is
sent to the login form when it opens the edit page again; and, in two tabs, a page open in one
says so when the other saves a new revision of it (pages/assets/wiki-live.js). Screenshots go
to tests/artifacts/ (not in git)."""
import json
import os

import pytest

from cdp import Browser, chromium_path

ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")
PASSWORD = "correct horse battery"
SCRIPT = "<script>window.pwned=1</script>"
BREAKOUT = '"><img src=x onerror="window.pwned=2">'
HOSTILE = "= Danger\n\n%s\n\n%s\n\n* [[Home]] and `%s`" % (SCRIPT, BREAKOUT, SCRIPT)

pytestmark = pytest.mark.skipif(
    chromium_path() is None,
    reason="chromium is not installed (.ci/run installs the Debian package 'chromium')")


def at(path):
    """JS: whether the page at ``path`` (pathname and search) has loaded."""
    return ("location.pathname + location.search == %s && document.readyState == 'complete'"
            % json.dumps(path))


def fill(browser, selector, value):
    browser.evaluate("document.querySelector(%s).value = %s"
                     % (json.dumps(selector), json.dumps(value)))


def text_of(browser, selector="main"):
    return browser.evaluate("document.querySelector(%s).innerText" % json.dumps(selector))


def wiki_and_browser(start_server, tmp_path):
    """A server with alice's account, its base URL, and a headless Chromium to drive it."""
    server = start_server(config={"accounts.scrypt_n": 16384, "state.durability": "off"})
    server.accounts.add("alice", PASSWORD)
    os.makedirs(ARTIFACTS, exist_ok=True)
    return (server, "http://127.0.0.1:%d" % server.port,
            Browser(str(tmp_path / "chromium-profile")))


def test_log_in_write_a_hostile_page_edit_it_and_log_out(start_server, tmp_path):
    server, base, browser = wiki_and_browser(start_server, tmp_path)
    try:
        for domain in ("Page", "Runtime", "Log"):
            browser.send(domain + ".enable")
        # Anonymous, the edit page sends the browser to the login form, which comes back to it
        browser.send("Page.navigate", url=base + "/wiki/Danger/edit")
        browser.wait_for(at("/login?next=%2Fwiki%2FDanger%2Fedit"))
        fill(browser, "#name", "alice")
        fill(browser, "#password", "not the password")
        browser.click("main form button")
        browser.wait_for("document.querySelector('.message') !== null")
        assert "wrong name or password" in text_of(browser, ".message")
        fill(browser, "#password", PASSWORD)
        browser.click("main form button")
        browser.wait_for(at("/wiki/Danger/edit"))
        assert browser.evaluate("document.querySelector('textarea').value") == ""

        fill(browser, "textarea", HOSTILE)
        browser.click("main form button")
        browser.wait_for(at("/wiki/Danger"))
        browser.screenshot(os.path.join(ARTIFACTS, "wiki-page.png"), 1280, 800)
        assert browser.evaluate("typeof window.pwned") == "undefined"
        shown = text_of(browser, "article")
        assert SCRIPT in shown and BREAKOUT in shown
        assert browser.evaluate("document.querySelectorAll('main script, main img').length") == 0
        assert browser.evaluate("document.querySelector('article h2').innerText") == "Danger"
        assert browser.evaluate("document.querySelector('article a.missing').innerText") == \
            "Home"
        assert browser.evaluate("document.querySelector('nav .user').innerText") == "alice"

        # Edit it: the form holds the text as it was written
        browser.click('a[href="/wiki/Danger/edit"]')
        browser.wait_for(at("/wiki/Danger/edit"))
        assert browser.evaluate("document.querySelector('textarea').value") == HOSTILE
        fill(browser, "textarea", HOSTILE + "\n\nA second revision.")
        browser.click("main form button")
        browser.wait_for(at("/wiki/Danger"))
        assert "A second revision." in text_of(browser, "article")
        assert "Revision 2 by alice" in text_of(browser)

        # The history, and the first revision from it
        browser.click('a[href="/wiki/Danger/history"]')
        browser.wait_for(at("/wiki/Danger/history"))
        assert browser.evaluate("document.querySelectorAll('tbody tr').length") == 2
        browser.screenshot(os.path.join(ARTIFACTS, "wiki-history.png"), 1280, 800)
        browser.click('a[href="/wiki/Danger/history/1"]')
        browser.wait_for(at("/wiki/Danger/history/1"))
        assert SCRIPT in text_of(browser, "article") and "A second" not in text_of(browser)
        assert browser.evaluate("typeof window.pwned") == "undefined"

        # Log out (a form button), then the edit page is the login form's again
        browser.click("nav form button")
        browser.wait_for(at("/wiki/"))
        assert browser.evaluate("document.querySelector('nav .user').innerText") == "Log in"
        browser.send("Page.navigate", url=base + "/wiki/Danger/edit")
        browser.wait_for(at("/login?next=%2Fwiki%2FDanger%2Fedit"))
        assert browser.evaluate("document.querySelector('#password') !== null")
        assert browser.evaluate("typeof window.pwned") == "undefined"
    finally:
        browser.close()
    refused = [params for method, params in browser.events
               if method == "Log.entryAdded" and "Content Security Policy"
               in params["entry"].get("text", "")]
    assert refused == [], refused     # nothing was even tried: escaping alone kept it text


def test_a_page_open_in_one_tab_says_so_when_another_tab_edits_it(start_server, tmp_path):
    server, base, browser = wiki_and_browser(start_server, tmp_path)
    try:
        reader, editor = browser, browser.new_tab()
        for tab in (reader, editor):
            for domain in ("Page", "Runtime", "Log"):
                tab.send(domain + ".enable")
        # The editor logs in and writes revision 1
        editor.send("Page.navigate", url=base + "/wiki/Live/edit")
        editor.wait_for(at("/login?next=%2Fwiki%2FLive%2Fedit"))
        fill(editor, "#name", "alice")
        fill(editor, "#password", PASSWORD)
        editor.click("main form button")
        editor.wait_for(at("/wiki/Live/edit"))
        fill(editor, "textarea", "first words")
        editor.click("main form button")
        editor.wait_for(at("/wiki/Live"))

        # The reader opens it and follows its events; the notice is there, hidden
        reader.send("Page.navigate", url=base + "/wiki/Live")
        reader.wait_for(at("/wiki/Live") + " && document.getElementById('edited')"
                        "?.dataset.following === 'yes'")
        assert reader.evaluate("document.getElementById('edited').hidden") is True

        # The editor saves revision 2: the reader's page says so, and is not reloaded
        editor.click('a[href="/wiki/Live/edit"]')
        editor.wait_for(at("/wiki/Live/edit"))
        fill(editor, "textarea", "second words")
        editor.click("main form button")
        editor.wait_for(at("/wiki/Live"))
        reader.wait_for("!document.getElementById('edited').hidden", timeout=2)
        assert text_of(reader, "#edited") == "This page was edited (revision 2). Reload"
        assert text_of(reader, "article") == "first words"
        reader.screenshot(os.path.join(ARTIFACTS, "wiki-edited.png"), 1280, 800)
        assert editor.evaluate("document.getElementById('edited').hidden") is True

        # Its link reloads the page: revision 2, the notice hidden again
        reader.click("#edited a")
        reader.wait_for("document.querySelector('article')?.innerText == 'second words'")
        assert reader.evaluate("document.getElementById('edited').hidden") is True
        assert "Revision 2 by alice" in text_of(reader)
    finally:
        browser.close()
    failed = [params for method, params in browser.events
              if method == "Runtime.exceptionThrown" or (
                  method == "Log.entryAdded" and params["entry"].get("level") == "error"
                  and not params["entry"].get("url", "").endswith("/favicon.ico"))]
    assert failed == [], failed
