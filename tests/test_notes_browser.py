"""The notes page live, in a real browser: headless Chromium (tests/cdp.py) opens /notes.html in
two tabs; a note posted through the form of the first shows in the second within a second of
the POST's answer, without a reload; a change made through the API shows in both; a note
deleted in the first goes from the second. A screenshot goes to tests/artifacts/ (not in git)."""
import json
import os

import pytest

from cdp import Browser, chromium_path
from conftest import request

ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")
JSON = {"Content-Type": "application/json", "Accept": "application/json"}
LIVE_WITHIN_MS = 1000

pytestmark = pytest.mark.skipif(
    chromium_path() is None,
    reason="chromium is not installed (.ci/run installs the Debian package 'chromium')")

# JS: the notes a tab shows, as text
TEXTS = "[...document.querySelectorAll('#notes li span')].map((e) => e.textContent)"

# JS: from now on, the epoch time (ms) at which a note of text TEXT is first shown
WATCH = """(function (text) {
  const seen = () => [...document.querySelectorAll('#notes li span')]
      .some((e) => e.textContent === text);
  new MutationObserver((changes, observer) => {
    if (seen()) { window.shownAt = performance.timeOrigin + performance.now();
                  observer.disconnect(); }
  }).observe(document.getElementById('notes'), {childList: true, subtree: true});
})(%s)"""

# JS: the epoch time (ms) at which the page's last POST to /api/notes had its whole answer
POSTED_AT = """(function () {
  const posts = performance.getEntriesByType('resource')
      .filter((e) => e.initiatorType === 'fetch' && e.name.endsWith('/api/notes'));
  return performance.timeOrigin + posts[posts.length - 1].responseEnd;
})()"""


def problems(events):
    found = []
    for method, params in events:
        if method == "Runtime.exceptionThrown":
            found.append(params.get("exceptionDetails"))
        elif (method == "Log.entryAdded" and params["entry"].get("level") == "error"
              and not params["entry"].get("url", "").endswith("/favicon.ico")):
            found.append(params["entry"].get("text"))
    return found


def open_notes(tab, base):
    for domain in ("Page", "Runtime", "Log"):
        tab.send(domain + ".enable")
    tab.send("Page.navigate", url=base + "/notes.html")
    # subscribed, and the list (read after subscribing) shown: the one note made before
    tab.wait_for("document.getElementById('notes')?.dataset.following === 'yes' && "
                 "document.querySelectorAll('#notes li').length === 1")


def test_a_note_posted_in_one_tab_shows_in_the_other_and_goes_when_deleted(start_server,
                                                                          tmp_path):
    server = start_server(config={"state.durability": "off"})
    base = "http://127.0.0.1:%d" % server.port
    status, _, _ = request(server, "POST", "/api/notes", json.dumps({"text": "before"}), JSON)
    assert status == 201
    os.makedirs(ARTIFACTS, exist_ok=True)
    browser = Browser(str(tmp_path / "chromium-profile"))
    try:
        first, second = browser, browser.new_tab()
        open_notes(first, base)
        open_notes(second, base)

        # Posted through the first tab's form; the second shows it without a reload
        second.evaluate(WATCH % json.dumps("live from tab one"))
        first.evaluate("document.getElementById('text').value = 'live from tab one'")
        first.click("#add button")
        first.wait_for("%s.includes('live from tab one')" % TEXTS, timeout=5)
        posted_at = first.evaluate(POSTED_AT)
        second.wait_for("window.shownAt", timeout=5)
        delay_ms = second.evaluate("window.shownAt") - posted_at
        assert delay_ms < LIVE_WITHIN_MS, delay_ms
        assert second.evaluate(TEXTS) == ["before", "live from tab one"]
        assert first.evaluate(TEXTS) == ["before", "live from tab one"]   # once, not twice
        assert first.evaluate("document.getElementById('text').value") == ""
        browser.screenshot(os.path.join(ARTIFACTS, "notes-live.png"), 1280, 800)

        # Changed by another client: both tabs show the new text
        note_id = json.loads(request(server, "GET", "/api/notes")[2])["notes"][1]["id"]
        status, _, _ = request(server, "PUT", "/api/notes/" + note_id,
                               json.dumps({"text": "changed elsewhere"}), JSON)
        assert status == 200
        for tab in (first, second):
            tab.wait_for("%s.includes('changed elsewhere')" % TEXTS, timeout=2)

        # Deleted in the first tab: gone from the second
        first.click("#notes li:last-child button:last-of-type")
        first.wait_for("%s.length === 1" % TEXTS, timeout=5)
        second.wait_for("%s.length === 1" % TEXTS, timeout=2)
        assert second.evaluate(TEXTS) == ["before"]
        assert second.evaluate("location.pathname") == "/notes.html"
        assert first.evaluate("document.getElementById('error').textContent") == ""
    finally:
        browser.close()
    assert problems(browser.events) == []


def test_a_refused_stream_is_tried_again_and_the_list_shows_meanwhile(start_server, tmp_path):
    """One stream per client here: the second tab is refused (429), which an EventSource never
    retries by itself; the page shows the list anyway, tries again 2 s later (its first
    backoff), and follows once the first tab has gone."""
    server = start_server(config={"state.durability": "off",
                                  "events.max_subscribers_per_client": 1,
                                  # this machine is a client like any other here (by default
                                  # it is a trusted proxy, never capped per address)
                                  "limits.trusted_proxies": "", "limits.allow_cidrs": ""})
    base = "http://127.0.0.1:%d" % server.port
    request(server, "POST", "/api/notes", json.dumps({"text": "before"}), JSON)
    browser = Browser(str(tmp_path / "chromium-profile"))
    try:
        first, second = browser, browser.new_tab()
        open_notes(first, base)
        second.send("Page.navigate", url=base + "/notes.html")
        second.wait_for("%s.length === 1" % TEXTS)
        assert second.evaluate("document.getElementById('notes').dataset.following") is None
        first.send("Page.navigate", url="about:blank")      # its stream ends
        second.wait_for("document.getElementById('notes').dataset.following === 'yes'",
                        timeout=10)
        request(server, "POST", "/api/notes", json.dumps({"text": "now live"}), JSON)
        second.wait_for("%s.includes('now live')" % TEXTS, timeout=2)
    finally:
        browser.close()


def test_after_a_restart_the_page_reloads_what_it_missed(start_server, tmp_path):
    """The server stops (its streams are told to come back soon, and closed); a note is made
    while the page cannot hear of it; a new server takes the same port. The page reconnects
    with the last event id it saw, which the new process does not know: "reset", and the page
    reads the list again."""
    data = tmp_path / "notes-data"
    fast = {"state.durability": "off", "events.retry_ms": 200}
    server = start_server(config=fast, data_dir=data)
    base = "http://127.0.0.1:%d" % server.port
    browser = Browser(str(tmp_path / "chromium-profile"))
    try:
        for domain in ("Page", "Runtime", "Log"):
            browser.send(domain + ".enable")
        browser.send("Page.navigate", url=base + "/notes.html")
        browser.wait_for("document.getElementById('notes')?.dataset.following === 'yes'")
        request(server, "POST", "/api/notes", json.dumps({"text": "heard"}), JSON)
        browser.wait_for("%s.includes('heard')" % TEXTS, timeout=2)   # an event, with an id

        server.shutdown()
        server.server_close()
        browser.wait_for("document.getElementById('notes').dataset.following === undefined")
        meanwhile = start_server(config=fast, data_dir=data)           # another port
        request(meanwhile, "POST", "/api/notes", json.dumps({"text": "missed"}), JSON)
        meanwhile.shutdown()
        meanwhile.server_close()
        start_server(config=fast, data_dir=data, port=server.port)
        browser.wait_for("%s.join() === 'heard,missed'" % TEXTS, timeout=10)
        assert browser.evaluate("document.getElementById('notes').dataset.following") == "yes"
    finally:
        browser.close()
    assert problems(browser.events) == []
