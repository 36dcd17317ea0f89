"""Sessions, cookies, the CSRF rule and the login throttle (issue 21), against a real server
built in-process (``start_server``) with a few routes that use ``request.session``; the
session store's timeouts and budgets with a fake clock on a real store."""
import hashlib
import http.client
import os
import time
import types
import urllib.parse

from conftest import request
from handlers._core import html_response, json_response, text_response
from handlers._sessions import local_path, log_in, login_required, set_cookie
from onebox.sessions import PREFIX, SessionStore
from onebox.store import Store

CHANGES = []   # what the POST handlers did: a cross-site request must leave it as it was


def _remember(request):
    request.session["note"] = request.query.get("v", "x")
    return text_response("kept")


def _show(request):
    return json_response({"note": request.session.get("note"), "user": request.session.user,
                          "token": request.session.csrf_token
                          if request.query.get("token") else None})


def _login(request):
    if log_in(request, request.query.get("name", ""), request.query.get("password", "")):
        return text_response("in")
    return text_response("wrong", 401)


def _force_login(request):
    request.session.login(request.query["name"])
    return text_response("in")


def _logout(request):
    request.session.logout()
    return text_response("out")


@login_required
def _edit(request):
    CHANGES.append(request.method)
    return text_response("edited")


def _plain(request):
    return set_cookie(text_response("plain"), request, "theme", "dark")


def _page(request):
    return html_response("<p>hi</p>", nonce=request.query.get("nonce"))


def _framed(request):
    return html_response("<p>hi</p>", headers=[("Content-Security-Policy", "frame-ancestors *")])


ROUTES = [("GET", "/s/page", _page), ("GET", "/s/framed", _framed),
          ("POST", "/s/remember", _remember), ("GET", "/s/show", _show),
          ("POST", "/s/login", _login), ("POST", "/s/force-login", _force_login),
          ("POST", "/s/logout", _logout), ("GET", "/s/edit", _edit), ("POST", "/s/edit", _edit),
          ("GET", "/s/plain", _plain)]

SAME = {"Sec-Fetch-Site": "same-origin"}


def _cookie(headers):
    return headers["set-cookie"].split(";")[0]


def _serve(start_server, **config):
    return start_server(routes=ROUTES, config=config)


def test_a_session_keeps_what_a_handler_puts_in_it_and_its_cookie_is_safe(start_server):
    server = _serve(start_server)
    status, headers, _ = request(server, "POST", "/s/remember?v=hello", headers=SAME)
    assert status == 200
    attributes = [part.strip() for part in headers["set-cookie"].split(";")]
    assert attributes[0].startswith("onebox_session=") and len(attributes[0]) == 15 + 43
    assert {"HttpOnly", "SameSite=Lax", "Path=/"} <= set(attributes)
    assert "Secure" not in attributes   # plain HTTP
    assert headers["cache-control"] == "no-store"
    status, headers, body = request(server, "GET", "/s/show", headers={"Cookie": _cookie(headers)})
    assert b'"note":"hello"' in body and "set-cookie" not in headers


def test_a_request_that_does_not_touch_its_session_writes_nothing(start_server):
    server = _serve(start_server)
    status, headers, _ = request(server, "GET", "/s/show")
    assert status == 200 and "set-cookie" not in headers   # read, empty, unchanged
    assert list(server.store.keys(PREFIX)) == []


def test_the_store_holds_a_hash_of_the_id_never_the_id(start_server, tmp_path):
    server = _serve(start_server, data_dir=str(tmp_path / "data"))
    _, headers, _ = request(server, "POST", "/s/remember?v=secret", headers=SAME)
    session_id = _cookie(headers).split("=", 1)[1]
    assert list(server.store.keys(PREFIX)) == [
        PREFIX + hashlib.sha256(session_id.encode()).hexdigest()]
    for folder, _, files in os.walk(str(tmp_path / "data")):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                assert session_id.encode() not in handle.read()


def test_login_replaces_the_id_and_logout_kills_it(start_server):
    server = _serve(start_server)
    _, headers, _ = request(server, "POST", "/s/remember?v=a", headers=SAME)
    before = _cookie(headers)
    _, headers, _ = request(server, "POST", "/s/force-login?name=ann",
                            headers=dict(SAME, Cookie=before))
    after = _cookie(headers)
    assert after != before
    _, _, body = request(server, "GET", "/s/show", headers={"Cookie": before})
    assert b'"user":null' in body and b'"note":null' in body   # the old id is dead
    _, _, body = request(server, "GET", "/s/show", headers={"Cookie": after})
    assert b'"user":"ann"' in body and b'"note":"a"' in body   # data kept across login
    _, headers, _ = request(server, "POST", "/s/logout", headers=dict(SAME, Cookie=after))
    assert "Max-Age=0" in headers["set-cookie"]
    _, _, body = request(server, "GET", "/s/show", headers={"Cookie": after})
    assert b'"user":null' in body


def test_over_https_the_cookie_is_secure_and_host_prefixed(start_server):
    server = _serve(start_server)   # loopback is a trusted proxy by default
    _, headers, _ = request(server, "POST", "/s/remember",
                            headers=dict(SAME, **{"X-Forwarded-Proto": "https"}))
    attributes = [part.strip() for part in headers["set-cookie"].split(";")]
    assert attributes[0].startswith("__Host-onebox_session=") and "Secure" in attributes
    _, headers, _ = request(server, "GET", "/s/plain",
                            headers={"X-Forwarded-Proto": "https"})
    assert headers["set-cookie"].startswith("__Host-theme=dark;") and "Secure" in \
        headers["set-cookie"]


def test_login_required_redirects_a_get_and_refuses_a_post(start_server):
    server = _serve(start_server)
    status, headers, _ = request(server, "GET", "/s/edit?x=1")
    assert status == 303 and headers["location"] == "/login?next=" + urllib.parse.quote(
        "/s/edit?x=1", safe="")
    status, _, _ = request(server, "POST", "/s/edit", headers=SAME)
    assert status == 403
    assert local_path("/wiki/a?b") == "/wiki/a?b"
    for bad in ("//evil.example", "/\\evil", "https://evil.example/", "evil", "/a\r\nb"):
        assert local_path(bad) == "/"


def test_a_cross_site_post_is_refused_and_changes_nothing(start_server):
    server = _serve(start_server)
    _, headers, _ = request(server, "POST", "/s/force-login?name=ann", headers=SAME)
    cookie = _cookie(headers)
    del CHANGES[:]
    for with_cookie in (True, False):
        for cross in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"},
                      {"Sec-Fetch-Site": "same-site"}):
            headers = dict(cross, Cookie=cookie) if with_cookie else dict(cross)
            status, _, body = request(server, "POST", "/s/edit", headers=headers)
            assert status == 403, (with_cookie, cross, body)
            status, _, _ = request(server, "POST", "/s/logout", headers=headers)
            assert status == 403
    assert CHANGES == []
    _, _, body = request(server, "GET", "/s/show", headers={"Cookie": cookie})
    assert b'"user":"ann"' in body   # logout refused: still logged in
    status, _, _ = request(server, "POST", "/s/edit", headers=dict(SAME, Cookie=cookie))
    assert status == 200 and CHANGES == ["POST"]
    host = "127.0.0.1:%d" % server.port
    status, _, _ = request(server, "POST", "/s/edit",
                           headers={"Cookie": cookie, "Origin": "http://" + host})
    assert status == 200


def test_without_fetch_metadata_or_origin_the_form_token_decides(start_server):
    server = _serve(start_server)
    _, headers, _ = request(server, "POST", "/s/force-login?name=ann", headers=SAME)
    cookie = _cookie(headers)
    _, headers, body = request(server, "GET", "/s/show?token=1", headers={"Cookie": cookie})
    cookie = _cookie(headers) if "set-cookie" in headers else cookie
    token = body.split(b'"token":"')[1].split(b'"')[0].decode()
    form = {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"}
    status, _, _ = request(server, "POST", "/s/edit", body="a=1", headers=form)
    assert status == 403
    status, _, _ = request(server, "POST", "/s/edit", body="a=1&csrf_token=wrong", headers=form)
    assert status == 403
    status, _, _ = request(server, "POST", "/s/edit", body="csrf_token=" + token, headers=form)
    assert status == 200
    status, _, _ = request(server, "POST", "/s/edit",
                           headers={"Cookie": cookie, "X-CSRF-Token": token})
    assert status == 200


def test_failed_logins_are_throttled_per_account_from_any_address(start_server):
    server = _serve(start_server, **{"sessions.login_failures_per_account": 10})
    statuses = []
    for number in range(20):
        status, headers, _ = request(server, "POST", "/s/login?name=ann&password=x%d" % number,
                                     headers=dict(SAME, **{"X-Forwarded-For": "10.0.0.%d"
                                                           % (number + 1)}))
        statuses.append(status)
    assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}
    status, headers, _ = request(server, "POST", "/s/login?name=bob&password=x",
                                 headers=dict(SAME, **{"X-Forwarded-For": "10.0.0.1"}))
    assert status == 401   # another account is not locked by ann's
    log = server.error_text()
    assert log.count("account 'ann' throttled") == 1
    assert "10.0.0.1" in log and "10.0.0.10" in log


def test_html_pages_get_a_strict_policy_that_an_area_can_change(start_server):
    server = _serve(start_server)
    _, headers, _ = request(server, "GET", "/s/page")
    policy = headers["content-security-policy"]
    assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy
    assert "object-src 'none'" in policy and headers["referrer-policy"] == "same-origin"
    _, headers, _ = request(server, "GET", "/s/page?nonce=abc123")
    assert "script-src 'self' 'nonce-abc123';" in headers["content-security-policy"]
    _, headers, _ = request(server, "GET", "/s/framed")
    assert headers["content-security-policy"] == "frame-ancestors *"
    _, headers, _ = request(server, "GET", "/s/show")
    assert "content-security-policy" not in headers   # JSON: not a page


# -- the store's timeouts and budgets, with a fake clock -----------------------------------------

def _settings(**changes):
    values = dict(cookie_name="s", idle_timeout_s=100.0, absolute_timeout_s=1000.0,
                  max_sessions=100, max_bytes=1 << 20, max_session_bytes=4096)
    values.update(changes)
    return types.SimpleNamespace(**values)


class _Request:
    def __init__(self, cookie=None, method="GET"):
        self.method, self.secure, self._session = method, False, None
        self.headers = {}
        self.cookies = {"s": cookie} if cookie else {}


class _Response:
    __slots__ = ("status", "headers", "body", "stream", "file", "file_range")

    def __init__(self):
        self.status, self.headers, self.body = 200, [], b""
        self.stream = self.file = self.file_range = None


def _new_session(sessions, clock, **data):
    req = _Request()
    req._session = sessions.load(req)
    for key, value in data.items():
        req._session[key] = value
    response = sessions.commit(req, _Response())
    return dict(response.headers)["Set-Cookie"].split(";")[0].split("=", 1)[1]


def test_idle_and_absolute_timeouts_end_a_session(tmp_path):
    now = [1000.0]
    store = Store(str(tmp_path))
    try:
        sessions = SessionStore(store, _settings(), clock=lambda: now[0])
        sid = _new_session(sessions, now, a=1)
        now[0] += 99
        assert sessions.load(_Request(sid)).get("a") == 1
        now[0] += 101
        assert sessions.load(_Request(sid)).get("a") is None   # idle too long
        assert list(store.keys(PREFIX)) == []
        sid = _new_session(sessions, now, a=2)
        for _ in range(12):   # used every 90 s: never idle, but 1,000 s old at the end
            now[0] += 90
            req = _Request(sid)
            req._session = sessions.load(req)
            sessions.commit(req, _Response())
        assert sessions.load(_Request(sid)).get("a") is None
    finally:
        store.close()


def test_the_oldest_sessions_are_evicted_past_the_budget_and_the_index_survives_a_restart(
        tmp_path):
    now = [1000.0]
    store = Store(str(tmp_path))
    try:
        sessions = SessionStore(store, _settings(max_sessions=3), clock=lambda: now[0])
        ids = []
        for number in range(5):
            now[0] += 1
            ids.append(_new_session(sessions, now, n=number))
        assert [sessions.load(_Request(sid)).get("n") for sid in ids] == [None, None, 2, 3, 4]
        assert sessions.stats()["sessions"] == 3 and sessions.evicted == 2
    finally:
        store.close()
    store = Store(str(tmp_path))
    try:
        again = SessionStore(store, _settings(max_sessions=3), clock=lambda: now[0])
        assert again.stats()["sessions"] == 3
        assert again.load(_Request(ids[4])).get("n") == 4
    finally:
        store.close()


def test_the_owner_logs_in_again_once_the_window_has_passed(start_server):
    server = _serve(start_server, **{"sessions.login_failures_per_account": 5,
                                     "sessions.login_window_s": 5.0, "accounts.scrypt_n": 16384})
    server.accounts.add("ann", "correct horse")
    for number in range(5):
        status, _, _ = request(server, "POST", "/s/login?name=ann&password=wrong",
                               headers=dict(SAME, **{"X-Forwarded-For": "10.0.1.%d" % number}))
        assert status == 401
    status, headers, _ = request(server, "POST", "/s/login?name=ann&password=correct+horse",
                                 headers=SAME)
    assert status == 429 and int(headers["retry-after"]) >= 1   # even the right password waits
    time.sleep(float(headers["retry-after"]))
    status, headers, _ = request(server, "POST", "/s/login?name=ANN&password=correct+horse",
                                 headers=SAME)
    assert status == 200 and headers["set-cookie"].startswith("onebox_session=")
    _, _, body = request(server, "GET", "/s/show", headers={"Cookie": _cookie(headers)})
    assert b'"user":"ann"' in body   # the name as the accounts keep it


def test_metrics_count_the_sessions_and_their_bytes(start_server):
    from test_metrics import scrape, value
    server = _serve(start_server, **{"sessions.max_sessions": 2})
    for number in range(3):
        request(server, "POST", "/s/remember?v=%d" % number, headers=SAME)
    samples = scrape(server)
    assert value(samples, "onebox_sessions") == 2
    assert value(samples, "onebox_sessions_evicted_total") == 1
    assert 2 * 600 < value(samples, "onebox_cache_bytes", cache="sessions") < 2 * 1000
    assert value(samples, "onebox_cache_capacity_bytes", cache="sessions") == 96 * 1024 * 1024
