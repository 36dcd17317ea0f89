"""What sessions cost: memory per session at 100,000 of them, and the time of a session's
load and of a durable write, side by side with a bare store's put in the same run; and what
a login's password check costs (scrypt with the shipped [accounts] settings).

    python3 bench/bench_sessions.py [--sessions 100000] [--dir DIR]

Memory is measured two ways: tracemalloc's net allocation while the sessions are made (every
Python object the store and the session index keep), and the process's resident set growth;
next to it the JSON bytes ``[sessions] max_bytes`` counts, so the budget can be read against
what the process really holds. Sessions are made through ``SessionStore.commit`` (a login's
write: an id, its hash, a CSRF token and a small dict) on a real store in a temp dir under
--dir (durability ``off`` for the memory part, so that it takes seconds; the durable write is
timed apart with ``always``: give --dir a real disk, not tmpfs, where fsync is free). Never
imported by the runtime.
"""
import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from onebox.sessions import SessionStore  # noqa: E402  (after the path set-up)
from onebox.store import Store  # noqa: E402


def settings(count):
    return types.SimpleNamespace(
        cookie_name="s", idle_timeout_s=86400.0, absolute_timeout_s=7 * 86400.0,
        max_sessions=count, max_bytes=1 << 40, max_session_bytes=4096)


class FakeRequest:
    def __init__(self, cookie=None, method="GET"):
        self.method, self.secure, self._session, self.headers = method, False, None, {}
        self.cookies = {"s": cookie} if cookie else {}


class FakeResponse:
    __slots__ = ("status", "headers", "body", "stream", "file", "file_range")

    def __init__(self):
        self.status, self.headers, self.body = 200, [], b""
        self.stream = self.file = self.file_range = None


def log_in(sessions, number):
    request = FakeRequest(method="POST")
    request.headers = {"sec-fetch-site": "same-origin"}
    request._session = sessions.load(request)
    request._session.login("user%d" % number)
    request._session["theme"] = "dark"
    request._session.csrf_token
    response = sessions.commit(request, FakeResponse())
    return dict(response.headers)["Set-Cookie"].split(";")[0].split("=", 1)[1]


def rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(count, base, traced=False):
    """The figures of one way of measuring (tracemalloc slows the making and grows the
    resident set itself: each way runs in a process of its own, see main)."""
    folder = tempfile.mkdtemp(dir=base)
    store = Store(folder, durability="off")
    try:
        sessions = SessionStore(store, settings(count))
        gc.collect()
        rss_before = rss_bytes()
        if traced:
            tracemalloc.start()
        started = time.perf_counter()
        ids = [log_in(sessions, number) for number in range(count)]
        took = time.perf_counter() - started
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] if traced else 0
        tracemalloc.stop()
        rss = rss_bytes() - rss_before
        ids_bytes = sum(sys.getsizeof(one) for one in ids) + sys.getsizeof(ids)
        stats = sessions.stats()
        started = time.perf_counter()
        for sid in ids[:20000]:
            sessions.load(FakeRequest(sid))
        load_us = (time.perf_counter() - started) / 20000 * 1e6
        return {"sessions": stats["sessions"], "json_bytes": stats["bytes"],
                "traced": traced - ids_bytes, "rss": rss, "make_us": took / count * 1e6,
                "load_us": load_us}
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)


def durable_write(base, rounds=200):
    folder = tempfile.mkdtemp(dir=base)
    store = Store(folder, durability="always")
    try:
        sessions = SessionStore(store, settings(10000))
        started = time.perf_counter()
        for number in range(rounds):
            log_in(sessions, number)
        session_ms = (time.perf_counter() - started) / rounds * 1e3
        started = time.perf_counter()
        for number in range(rounds):
            store.put("bare/%d" % number, {"n": number})
        put_ms = (time.perf_counter() - started) / rounds * 1e3
        return session_ms, put_ms
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)


def password_checks(base, rounds=5):
    """Median seconds of ``Accounts.verify`` (log_in's check) with the shipped [accounts]
    settings: right password, wrong password, unknown name."""
    from onebox.accounts import Accounts
    from onebox.settings import load_config
    folder = tempfile.mkdtemp(dir=base)
    store = Store(folder, durability="off")
    try:
        config = load_config(None, {})
        accounts = Accounts(store, config.accounts)
        accounts.add("ann", "correct horse battery")
        times = {}
        for label, name, password in (("right password", "ann", "correct horse battery"),
                                      ("wrong password", "ann", "wrong horse battery"),
                                      ("unknown name", "bob", "correct horse battery")):
            runs = []
            for _ in range(rounds):
                started = time.perf_counter()
                accounts.verify(name, password)
                runs.append(time.perf_counter() - started)
            times[label] = sorted(runs)[rounds // 2]
        return config.accounts, times
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=100000)
    parser.add_argument("--dir", default=".")
    parser.add_argument("--one", choices=("rss", "traced"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:   # one way of measuring, in this process alone
        print(json.dumps(memory(args.sessions, args.dir, traced=args.one == "traced")))
        return
    found = {}
    for way in ("rss", "traced"):
        output = subprocess.run([sys.executable, __file__, "--sessions", str(args.sessions),
                                 "--dir", args.dir, "--one", way], check=True,
                                stdout=subprocess.PIPE, universal_newlines=True).stdout
        measured = json.loads(output)
        found.update(measured if way == "rss" else {"traced": measured["traced"]})
    session_ms, put_ms = durable_write(args.dir)
    count = found["sessions"]
    print("| %d sessions | total | per session |" % count)
    print("|---|---:|---:|")
    print("| what [sessions] max_bytes counts (JSON + HELD_BYTES) | %.1f MiB | %d B |"
          % (found["json_bytes"] / 2.0 ** 20, found["json_bytes"] / count))
    print("| Python allocations (tracemalloc, store + index) | %.1f MiB | %d B |"
          % (found["traced"] / 2.0 ** 20, found["traced"] / count))
    print("| resident set growth | %.1f MiB | %d B |"
          % (found["rss"] / 2.0 ** 20, found["rss"] / count))
    print("\n| operation | time |")
    print("|---|---:|")
    print("| make a logged-in session (durability off) | %.1f us |" % found["make_us"])
    print("| load a session from its cookie | %.1f us |" % found["load_us"])
    print("| login write, durable (always) | %.2f ms |" % session_ms)
    print("| bare store put, durable (always), same run | %.2f ms |" % put_ms)
    settings, checks = password_checks(args.dir)
    print("\n| log_in's password check: scrypt n=%d, r=8, p=1, 16-byte salt (median of 5) | "
          "time |" % settings.scrypt_n)
    print("|---|---:|")
    for label, seconds in checks.items():
        print("| %s | %.0f ms |" % (label, seconds * 1e3))


if __name__ == "__main__":
    main()
