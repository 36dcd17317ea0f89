"""A client that asks one thing again and again until a deadline, for the flood tests' child
processes (tests/test_guard.py, tests/test_cost.py run it in a process of its own, so that its
load is not the test's): one kept connection from ``source``, reopened whenever the server
closes it, every answer counted by status ("closed" for a connection that broke)."""
import http.client
import time


def keep_asking(port, source, counts, seconds, method="GET", path="/hello", body=None,
                headers=None, pause_s=0.0):
    """Ask for ``seconds``; ``pause_s`` after a broken connection (a refusal's close)."""
    deadline = time.monotonic() + seconds
    connection = None
    while time.monotonic() < deadline:
        try:
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                                        source_address=(source, 0))
            connection.request(method, path, body, headers or {})
            response = connection.getresponse()
            response.read()
            counts[response.status] += 1
            if response.will_close:
                connection.close()
                connection = None
        except (OSError, http.client.HTTPException):
            counts["closed"] += 1
            if connection is not None:
                connection.close()
            connection = None
            if pause_s:
                time.sleep(pause_s)
    if connection is not None:
        connection.close()
