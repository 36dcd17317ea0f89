"""A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``, stdlib only.

Chromium reads commands on its fd 3 and writes replies and events on its fd 4, each a JSON
message ended by a NUL byte (no websocket). ``Browser`` starts a headless Chromium with a
throw-away profile, opens one page (``Target.attachToTarget`` with ``flatten``: the page's
commands carry its ``sessionId``), and keeps every event it reports, for the test to inspect.
``new_tab()`` opens another page in the same browser (tests/test_notes_browser.py: two tabs).
Used by tests/test_status_browser.py; not part of the server.
"""
import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio",
         "--remote-debugging-pipe"]


def chromium_path():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _above_9(fd):
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class CDPError(Exception):
    pass


class Browser(object):
    """``send(method, **params)`` (to the page) -> result; ``events`` (every event seen, in
    order, as (method, params)); ``evaluate(js)``; ``wait_for(js, timeout)``; ``close()``."""

    def __init__(self, profile_dir, width=1280, height=800, timeout=20.0):
        self.timeout = timeout
        to_chrome_read, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_write = os.pipe()
        # Chromium's ends moved above fd 9, so that neither is already 3 or 4 (which the
        # shell's redirections below would overwrite before reading)
        to_chrome_read, from_chrome_write = [_above_9(fd) for fd in (to_chrome_read,
                                                                    from_chrome_write)]
        # bash puts the pipes on fds 3 and 4, where Chromium looks for them (dash, /bin/sh,
        # takes no fd above 9 in a redirection).
        script = 'exec "$0" "$@" 3<&%d 4>&%d' % (to_chrome_read, from_chrome_write)
        self.process = subprocess.Popen(
            ["bash", "-c", script, chromium_path()] + FLAGS
            + ["--user-data-dir=%s" % profile_dir, "--window-size=%d,%d" % (width, height),
               "about:blank"],
            pass_fds=(to_chrome_read, from_chrome_write), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_chrome_read)
        os.close(from_chrome_write)
        self._next_id = 0
        self._lock = threading.Lock()          # guards _next_id and _waiting
        self._waiting = {}                     # id -> Queue for its reply
        self.events = []                       # (method, params), appended by the reader
        self._stderr = []
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()
        self._stderr_reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_reader.start()
        self.session = None
        target = self._call(None, "Target.createTarget", url="about:blank")["targetId"]
        self.session = self._call(None, "Target.attachToTarget", targetId=target,
                                  flatten=True)["sessionId"]

    def _drain_stderr(self):
        for line in self.process.stderr:
            self._stderr.append(line.decode("utf-8", "replace"))

    def _read(self):
        pending = b""
        while True:
            try:
                chunk = os.read(self._from_chrome, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._lock:
                    for waiter in self._waiting.values():
                        waiter.put({"error": {"message": "chromium closed the pipe"}})
                return
            pending += chunk
            while b"\0" in pending:
                raw, pending = pending.split(b"\0", 1)
                message = json.loads(raw.decode("utf-8"))
                if "id" in message:
                    with self._lock:
                        waiter = self._waiting.pop(message["id"], None)
                    if waiter is not None:
                        waiter.put(message)
                else:
                    self.events.append((message.get("method"), message.get("params", {})))

    def _call(self, session, method, **params):
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            waiter = self._waiting[ident] = queue.Queue()
        message = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode("utf-8") + b"\0"
        while data:
            data = data[os.write(self._to_chrome, data):]
        try:
            reply = waiter.get(timeout=self.timeout)
        except queue.Empty:
            raise CDPError("%s: no reply within %ss; chromium said: %s"
                           % (method, self.timeout, "".join(self._stderr)[-2000:]))
        if "error" in reply:
            raise CDPError("%s: %s" % (method, reply["error"]))
        return reply.get("result", {})

    def send(self, method, **params):
        return self._call(self.session, method, **params)

    def evaluate(self, expression):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise CDPError("evaluate %r: %s" % (expression, result["exceptionDetails"]))
        return result["result"].get("value")

    def wait_for(self, expression, timeout=15.0, interval=0.1):
        """Poll ``expression`` until it is truthy; its value, or CDPError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except CDPError as error:
                # asked while the page navigates (a click's new page is coming): the old
                # page's context is gone, so this is "not yet", not a failure (run 7 of 10
                # under two busy loops)
                if "navigated or closed" not in str(error) and \
                        "context was destroyed" not in str(error).lower():
                    raise
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise CDPError("still false after %ss: %s" % (timeout, expression))
            time.sleep(interval)

    def screenshot(self, path, width, height, full_page=False):
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=width < 600)
        time.sleep(0.3)   # let the layout settle at the new size
        params = {"format": "png"}
        if full_page:
            tall = self.evaluate("document.documentElement.scrollHeight")
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": width, "height": tall, "scale": 1})
        data = self.send("Page.captureScreenshot", **params)["data"]
        with open(path, "wb") as image:
            image.write(base64.b64decode(data))

    def click(self, selector):
        """A real mouse press and release at the middle of the element ``selector`` names."""
        box = self.evaluate("(function(){var e=document.querySelector(%s);"
                            "e.scrollIntoView({block:'center'});var r=e.getBoundingClientRect();"
                            "return [r.left+r.width/2, r.top+r.height/2];})()"
                            % json.dumps(selector))
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1],
                      button="left", clickCount=1)

    def new_tab(self):
        """Another page of this browser (its cookies too): a ``Tab``, which drives it as this
        object drives the first one. Events of every page go to this object's ``events``."""
        target = self._call(None, "Target.createTarget", url="about:blank")["targetId"]
        return Tab(self, self._call(None, "Target.attachToTarget", targetId=target,
                                    flatten=True)["sessionId"])

    def close(self):
        try:
            self._call(None, "Browser.close")
        except CDPError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._stderr_reader.join(10)   # at the end of Chromium's stderr
        self.process.stderr.close()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass


class Tab(Browser):
    """A page opened by ``Browser.new_tab``: ``send``, ``evaluate``, ``wait_for``, ``click``
    and ``screenshot`` as on a Browser, over the browser's one pipe; closed with the browser."""

    def __init__(self, browser, session):     # (no Browser.__init__: no second Chromium)
        self.browser, self.session, self.timeout = browser, session, browser.timeout
        self.events = browser.events

    def _call(self, session, method, **params):
        return self.browser._call(session, method, **params)

    def close(self):
        self.browser._call(None, "Target.detachFromTarget", sessionId=self.session)
