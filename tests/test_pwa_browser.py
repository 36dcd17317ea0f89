"""A PWA in headless Chromium (tests/cdp.py), on default settings but for the loopback allowance
(off: the browser is an ordinary visitor, limited as one from elsewhere would be): the example
app of pages/app/ with a 200-file precache (tests/test_pwa.py's make_app) opens at a deep link,
installs its service worker with every file cached, has no installability or manifest errors
and breaks no Content-Security-Policy; a changed sw.js is picked up by registration.update() at
once, with updateViaCache 'imports' (the default) and 'all'; then, the server stopped, the app
still opens, at another of its routes. Issue 25."""
import json

import pytest

from cdp import Browser, chromium_path
from test_pwa import ORDINARY, make_app, write_worker

pytestmark = pytest.mark.skipif(
    chromium_path() is None,
    reason="chromium is not installed (.ci/run installs the Debian package 'chromium')")

POLICY = "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'"
CACHE_KEYS = "caches.keys().then(function (names) { return names.join(' '); })"


def cached_count(browser, name):
    return browser.evaluate("caches.open(%s).then(function (cache) { return cache.keys(); })"
                            ".then(function (keys) { return keys.length; })" % json.dumps(name))


def update(browser, update_via_cache=None):
    """Re-register (setting updateViaCache) or just call update(); what the registration says
    its updateViaCache is."""
    if update_via_cache is None:
        start = "navigator.serviceWorker.getRegistration('/app/')"
    else:
        start = ("navigator.serviceWorker.register('/app/sw.js', {scope: '/app/', "
                 "updateViaCache: %s})" % json.dumps(update_via_cache))
    return browser.evaluate("%s.then(function (registration) { return registration.update()"
                            ".then(function () { return registration.updateViaCache; }); })"
                            % start)


def test_a_pwa_installs_with_a_200_file_precache_updates_at_once_and_works_offline(
        server_process, tmp_path):
    pages = tmp_path / "pages"
    urls = make_app(pages, 200)
    server = server_process("--pages-dir", pages, *ORDINARY, config={
        'static "/app/".fallback': "/app/index.html",
        'static "/app/".headers': "Content-Security-Policy: " + POLICY,
        'static "/app/sw.js".headers': "Service-Worker-Allowed: /app/"})
    base = "http://127.0.0.1:%d" % server.port
    browser = Browser(str(tmp_path / "chromium-profile"))
    try:
        for domain in ("Page", "Runtime", "Log"):
            browser.send(domain + ".enable")
        # 1. A deep link, before any service worker: the server's fallback is the app
        browser.send("Page.navigate", url=base + "/app/settings")
        browser.wait_for("document.body && document.body.dataset.view == 'settings'")
        # 2. The worker installs: its precache (6 files of the app, 200 more) all fetched
        assert browser.wait_for("document.body.dataset.sw", timeout=60) == "ready"
        assert cached_count(browser, "app-v1") == 206
        assert browser.send("Page.getInstallabilityErrors")["installabilityErrors"] == []
        manifest = browser.send("Page.getAppManifest")
        assert manifest["errors"] == [] and manifest["url"].endswith("/app/manifest.webmanifest")
        # 3. A new sw.js is found by update() at once: with the default updateViaCache...
        write_worker(pages, urls[:10], "v2")
        assert update(browser) == "imports"
        browser.wait_for(CACHE_KEYS + ".then(function (k) { return k == 'app-v2'; })")
        # ...and with 'all', where a max-age would have kept the cached copy for 10 minutes
        assert update(browser, "all") == "all"
        write_worker(pages, urls[:10], "v3")
        assert update(browser) == "all"
        browser.wait_for(CACHE_KEYS + ".then(function (k) { return k == 'app-v3'; })")
        assert browser.evaluate("fetch('/app/files/f008.txt').then(function (r) "
                                "{ return r.text(); })") == "/* file 8 */\n"
        # 4. Offline: the server stopped, the app still opens, at another route
        server.stop()
        browser.send("Page.navigate", url=base + "/app/about")
        browser.wait_for("document.body && document.body.dataset.view == 'about'")
        assert browser.evaluate("document.querySelector('#view h2').textContent") == "About"
        assert browser.evaluate("fetch('/app/files/f008.txt').then(function (r) "
                                "{ return r.text(); })") == "/* file 8 */\n"
    finally:
        browser.close()
    refused = [params["entry"].get("text", "") for method, params in browser.events
               if method == "Log.entryAdded" and "Content Security Policy"
               in params["entry"].get("text", "")]
    assert refused == [], refused
    log = "\n".join(server.out_lines())
    assert " 429 " not in log and "guard=" not in log     # the whole visit was served
