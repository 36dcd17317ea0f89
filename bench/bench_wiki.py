"""What a wiki page costs against a note: req/s of ``GET /wiki/{page}`` and ``GET /api/notes/{id}``
side by side, on one server, in one run.

    python3 bench/bench_wiki.py [--seconds 3] [--rounds 3] [--connections 8]

One real ``python3 server.py`` (durability off, access log off) pinned to CPU 0; wrk (Debian's
package; installed if missing) on CPU 1, one thread, ``--connections`` keep-alive connections.
The same text (``TEXT``: ~2.5 KB of the wiki's markup, with headings, a list, eight links to
pages that exist and two to pages that do not, inline code and a code block) is saved as a wiki
page (through /login and the edit form, as a browser would) and as a note. A wiki view reads
the page's summary and revision from the store, renders the markup (looking each link up) and
the page's template; a note is one store read and a JSON encoding. Rounds alternate the two;
the median of each is reported with p50/p99 latency and the response's size, as markdown.
"""
import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_http import ensure_wrk, start, stop, wrk  # noqa: E402  (same directory)

PASSWORD = "bench password"
LINKED = ["Getting started", "Install", "Settings", "Areas", "Templates", "Sessions",
          "Accounts", "Operations"]
TEXT = "\n".join([
    "= The onebox wiki",
    "",
    "A web server in one Python process: this page is the wiki's home, and a benchmark's.",
    "It links to [[%s]], [[%s]] and [[%s]], and to a page nobody wrote: [[Not yet]]." % tuple(
        LINKED[:3]),
    "",
    "== What is where",
    "",
] + ["* [[%s]]: see `handlers/%s.py` for the code" % (name, name.lower().replace(" ", "_"))
     for name in LINKED] + [
    "* [[Also missing]] (a link to a page that does not exist)",
    "",
    "== An example",
    "",
    "```",
    "def show_page(request):",
    "    name = page_name(request.params['page'])",
    "    return page('wiki/page.html', name=name, body=render_markup(text, exists))",
    "```",
    "",
] + ["A paragraph of ordinary text <with> some & characters to escape, number %d, and "
     "`inline code` too. " % number * 2 for number in range(8)])


def call(url, method, path, body=None, headers=None):
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request(method, path, body, headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def prepare(url):
    """Log in, save TEXT as the page "Home" (and each linked page) and as a note; the two
    paths to measure, each checked to answer 200."""
    form = {"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin"}
    status, headers, _ = call(url, "POST", "/login", urllib.parse.urlencode(
        {"name": "bench", "password": PASSWORD}), form)
    assert status == 303, status
    form["Cookie"] = headers["Set-Cookie"].split(";")[0]
    for name, text in [("Home", TEXT)] + [(name, "= %s\n\nA page." % name) for name in LINKED]:
        status, _, body = call(url, "POST", "/wiki/" + name.replace(" ", "_"),
                               urllib.parse.urlencode({"text": text, "base_rev": "0"}), form)
        assert status == 303, (status, body[:200])
    status, _, body = call(url, "POST", "/api/notes", json.dumps({"text": TEXT}),
                           {"Content-Type": "application/json"})
    assert status == 201, status
    paths = {"GET /wiki/{page}": "/wiki/Home",
             "GET /api/notes/{id}": "/api/notes/" + json.loads(body)["id"]}
    sizes = {}
    for label, path in paths.items():
        status, _, body = call(url, "GET", path)
        assert status == 200, (path, status)
        sizes[label] = len(body)
    return paths, sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seconds", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args(argv)
    ensure_wrk()
    workdir = tempfile.mkdtemp(prefix="bench-wiki-")
    data = os.path.join(workdir, "data")
    common = ["--data-dir", data, "--state-durability", "off", "--accounts-scrypt-n", "16384"]
    added = subprocess.run([sys.executable, "server.py"] + common + ["--add-user", "bench"],
                           input=PASSWORD + "\n", capture_output=True, text=True, cwd=ROOT)
    if added.returncode != 0:
        raise SystemExit("server.py --add-user failed: " + added.stderr)
    process, url = start([sys.executable, "server.py", "--port", "0", "--access-log", "off"]
                         + common, workdir)
    results = {}
    try:
        paths, sizes = prepare(url)
        for path in paths.values():
            wrk(url + path, 1, args.connections)   # warm-up
        for round_number in range(args.rounds):
            order = list(paths.items())
            if round_number % 2:
                order.reverse()
            for label, path in order:
                result = wrk(url + path, args.seconds, args.connections)
                if result["errors"] or result["non2xx"]:
                    raise SystemExit("%s: %d socket errors, %d non-2xx" % (
                        label, result["errors"], result["non2xx"]))
                results.setdefault(label, []).append(result)
    finally:
        stop(process)
        shutil.rmtree(workdir, ignore_errors=True)
    print("wrk -t1 -c%d, keep-alive, %d rounds of %d s each, alternating; medians; server on "
          "CPU 0, wrk on CPU 1\n" % (args.connections, args.rounds, args.seconds))
    print("| route | req/s | p50 ms | p99 ms | response bytes |")
    print("|---|---:|---:|---:|---:|")
    for label in paths:
        rows = results[label]
        print("| `%s` | %.0f | %.2f | %.2f | %d |" % (
            label, statistics.median(r["rps"] for r in rows),
            statistics.median(r["p50"] for r in rows),
            statistics.median(r["p99"] for r in rows), sizes[label]))


if __name__ == "__main__":
    main()
