"""The status page in a real browser: headless Chromium, driven over the DevTools protocol
(tests/cdp.py: --remote-debugging-pipe, stdlib only), against the admin listener of a real
server while traffic and a flood of refused requests run.

Screenshots at 1280x800 and 390x844 go to tests/artifacts/ (not in git) for a person to look at.
"""
import http.client
import json
import os
import time
import urllib.parse

import pytest

from cdp import Browser, chromium_path
from conftest import Client, Load

ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")
FLOODER = "127.0.0.3"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    chromium_path() is None,
    reason="chromium is not installed (.ci/run installs the Debian package 'chromium')")]


def get(port, path, source=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5,
                                            source_address=(source, 0) if source else None)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def load(port):
    """Ordinary traffic from 127.0.0.1 (allowlisted: /hello and now and then a missing page)
    and a flood from FLOODER, each on a connection per request until stopped (the flood by
    ``stop("flood")``)."""
    return Load(port, [
        Client("traffic", lambda number: "/hello" if number % 4
               else "/no-such-page-%d" % (number % 3), keep_alive=False, pause_s=0.01),
        Client("flood", "/hello", FLOODER, keep_alive=False, pause_s=0.005)],
        max_requests=None, max_s=None, timeout_s=5)


def problems(events):
    """Console errors, uncaught exceptions and error log entries the page produced."""
    found = []
    for method, params in events:
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert",
                                                                           "warning"):
            found.append((method, params.get("type"), params.get("args")))
        elif method == "Runtime.exceptionThrown":
            found.append((method, params.get("exceptionDetails")))
        elif method == "Log.entryAdded" and params["entry"].get("level") in ("error",
                                                                             "warning"):
            found.append((method, params["entry"].get("text"), params["entry"].get("url")))
    return found


CHART_POINTS = """(function () {
  var path = document.querySelector('#%s path[d]');
  if (!path) { return 0; }
  var ys = {}, points = 0;
  path.getAttribute('d').replace(/[ML]([-\\d.]+) ([-\\d.]+)/g, function (_, x, y) {
    points++; ys[y] = true; return '';
  });
  return Object.keys(ys).length > 1 ? points : 0;   // points, if not a flat line
})()"""

TABLE_TEXT = "((document.querySelector('#%s tbody') || {}).textContent || '')"


def test_status_page_in_chromium(start_server, tmp_path):
    server = start_server(config={
        "limits.client_rate_per_s": 2, "limits.client_burst": 5,
        "limits.ban_after_rejections": 10, "limits.ban_window_s": 30,
        "state.durability": "off"})
    origin = server.admin_url.rstrip("/")
    os.makedirs(ARTIFACTS, exist_ok=True)
    traffic = load(server.port).start()
    browser = None
    try:
        browser = Browser(str(tmp_path / "chromium-profile"))
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(domain + ".enable")
        browser.send("Emulation.setDeviceMetricsOverride", width=1280, height=800,
                     deviceScaleFactor=1, mobile=False)
        browser.send("Page.navigate", url=server.admin_url)

        # the flooding client shows up banned, and among the top clients
        browser.wait_for("(%s).indexOf('%s') >= 0" % (TABLE_TEXT % "t-bans", FLOODER), 30)
        browser.wait_for("(%s).indexOf('%s') >= 0" % (TABLE_TEXT % "t-clients", FLOODER), 15)
        assert traffic.statuses[FLOODER].get(429), traffic.figures()
        # let the charts gather a few seconds of data, then they are drawn with it
        time.sleep(4)
        assert browser.wait_for(CHART_POINTS % "chart-rate", 15) >= 360
        assert browser.wait_for(CHART_POINTS % "chart-recent", 15) >= 100
        assert browser.wait_for(CHART_POINTS % "chart-status", 15) >= 360
        assert browser.evaluate("document.querySelectorAll('#chart-latency path').length") == 2
        assert browser.evaluate(
            "document.querySelector('#chart-latency path:last-of-type').getAttribute('d')"
        ).startswith("M")
        decisions = browser.evaluate(TABLE_TEXT % "t-decisions")
        assert FLOODER in decisions and "429" in decisions and "client_rate" in decisions
        paths = browser.evaluate(TABLE_TEXT % "t-paths")
        assert "/hello" in paths
        assert "/no-such-page-" in paths
        gauges = browser.evaluate(TABLE_TEXT % "t-gauges")
        assert "open connections" in gauges and "hand-off queue" in gauges
        tables = browser.evaluate(TABLE_TEXT % "t-tables")
        assert "guard: bans" in tables and "process: RSS" in tables

        browser.screenshot(os.path.join(ARTIFACTS, "status-1280x800.png"), 1280, 800)
        browser.screenshot(os.path.join(ARTIFACTS, "status-390x844.png"), 390, 844)
        browser.screenshot(os.path.join(ARTIFACTS, "status-390-full.png"), 390, 844, True)
        width = browser.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, "the page is wider than a phone's screen: %s px" % width
        browser.send("Emulation.setDeviceMetricsOverride", width=1280, height=800,
                     deviceScaleFactor=1, mobile=False)

        # Lift: the ban goes, from the page and the server, and the client is served again
        traffic.stop("flood")
        assert get(server.port, "/hello", FLOODER) in (403, None)
        browser.click('#t-bans button[data-client="%s"]' % FLOODER)
        browser.wait_for("(%s).indexOf('%s') < 0" % (TABLE_TEXT % "t-bans", FLOODER), 15)
        assert [ban["client"] for ban in server.guard.list_bans()] == []
        assert get(server.port, "/hello", FLOODER) == 200
        browser.wait_for("(%s).indexOf('ban lifted') >= 0" % (TABLE_TEXT % "t-decisions"), 15)
        assert "POST /bans/lift" in server.error_text()
    finally:
        traffic.stop()
        if browser is not None:
            browser.close()

    # Everything the page asked for came from the admin listener itself (a data: URL, the
    # empty favicon, is no request on the network).
    urls = [params["request"]["url"] for method, params in browser.events
            if method == "Network.requestWillBeSent"]
    assert urls and urls[0] == server.admin_url
    outside = [url for url in urls
               if not url.startswith(origin + "/") and not url.startswith("data:")]
    assert outside == [], outside
    assert any(url.endswith("/status.json") for url in urls)
    # the Lift is JSON (all that /bans/lift takes: a cross-site form cannot send it)
    lifts = [params["request"] for method, params in browser.events
             if method == "Network.requestWillBeSent"
             and params["request"]["url"].endswith("/bans/lift")]
    assert lifts and all(lift["method"] == "POST" for lift in lifts)
    assert {value for lift in lifts for name, value in lift["headers"].items()
            if name.lower() == "content-type"} == {"application/json"}
    assert json.loads(lifts[-1]["postData"]) == {"client": FLOODER}
    assert problems(browser.events) == [], json.dumps(problems(browser.events))[:2000]
    assert urllib.parse.urlsplit(origin).hostname == "127.0.0.1"
