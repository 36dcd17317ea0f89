"""Benchmark of onebox's templates (onebox/templates.py) against Jinja2, side by side in one run.

    python3 -m venv bench/.venv && bench/.venv/bin/pip install jinja2 markupsafe   # once
    bench/.venv/bin/python bench/bench_templates.py [--rows 200] [--renders 200] [--rounds 7]

Both render the same page: a layout (title block, nav, content block) filled by a child
template whose content is a table of ``--rows`` rows, each with four escaped fields (one in an
attribute), a URL built from a field, and a condition. Jinja2 runs as a site would use it:
autoescape on, markupsafe's C speedups (the script refuses to run without them, as the
comparison would flatter onebox), trim_blocks and lstrip_blocks so both produce the same text;
the script checks they do, byte for byte, before timing. Rows are dicts, then objects (Jinja2
looks an attribute up first and a key second, onebox the other way round). Each round times
``--renders`` renders of each engine, interleaved; the best round of each is reported (the
least disturbed by the other work of a shared machine), with the ratio onebox / Jinja2 (below
1: faster), as a markdown table.
"""
import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from onebox.templates import load_templates  # noqa: E402  (after the path set-up)

try:
    import jinja2
except ImportError:
    sys.exit("bench_templates.py needs Jinja2, in a venv of its own (bench/.venv is git-ignored):\n"
             "    python3 -m venv bench/.venv && bench/.venv/bin/pip install jinja2 markupsafe\n"
             "    bench/.venv/bin/python bench/bench_templates.py")

LAYOUT = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{% block title %}onebox{% endblock %}</title>
<link rel="stylesheet" href="/assets/site.css">
</head>
<body>
<nav><a href="/">Home</a> <a href="/wiki/">Wiki</a></nav>
<main>
{% block content %}
{% endblock %}
</main>
</body>
</html>
"""

TABLE = """{% extends "layout.html" %}
{% block title %}{{ title }} · onebox{% endblock %}
{% block content %}
<h1>{{ title }}</h1>
<table>
<tr><th>#</th><th>Name</th><th>Email</th><th>Status</th></tr>
{% for row in rows %}
<tr class="{{ row.kind }}">
<td>{{ row.id }}</td>
<td><a href="/users/{{ row.id }}" title="{{ row.name }}">{{ row.name }}</a></td>
<td>{{ row.email }}</td>
{% if row.active %}
<td>active</td>
{% else %}
<td>since {{ row.since }}</td>
{% endif %}
</tr>
{% endfor %}
</table>
{% endblock %}
"""


class Row:
    """A row as an object: attribute lookups (Jinja2's fast path; onebox tries keys first)."""

    def __init__(self, fields):
        self.__dict__.update(fields)


def variables(rows, objects=False):
    make = Row if objects else dict
    return {"title": "Users & <friends>", "rows": [make({
        "id": number, "kind": "odd" if number % 2 else "even",
        "name": "User %d <\"quoted\">" % number if number % 10 == 0 else "User %d" % number,
        "email": "user%d@example.org" % number, "active": number % 3 != 0,
        "since": "2024-01-%02d" % (number % 28 + 1)}) for number in range(rows)]}


def onebox_renderer(folder):
    for name, text in (("layout.html", LAYOUT), ("table.html", TABLE)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as file:
            file.write(text)
    templates = load_templates(folder)
    return lambda values: templates.render("table.html", values)


def jinja_renderer():
    environment = jinja2.Environment(
        loader=jinja2.DictLoader({"layout.html": LAYOUT, "table.html": TABLE}),
        autoescape=True, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    template = environment.get_template("table.html")
    return template.render


def best_round(render, values, renders):
    started = time.perf_counter()
    for _ in range(renders):
        render(values)
    return (time.perf_counter() - started) / renders


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--renders", type=int, default=200, help="renders per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    try:
        from markupsafe import _speedups  # noqa: F401
    except ImportError:
        sys.exit("markupsafe has no C speedups here: the comparison would be unfair")
    print("%d-row table in a layout, best of %d rounds of %d renders (Python %s, Jinja2 %s, "
          "MarkupSafe %s with C speedups)" % (
              args.rows, args.rounds, args.renders, sys.version.split()[0],
              jinja2.__version__, _version("markupsafe")))
    print()
    print("| rows are | onebox ms/render | Jinja2 ms/render | onebox / Jinja2 |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        ours, theirs = onebox_renderer(folder), jinja_renderer()
        for objects in (False, True):
            values = variables(args.rows, objects)
            if ours(values) != theirs(values):
                sys.exit("the two engines render different text: fix the templates first")
            times = {"onebox": [], "jinja2": []}
            for _ in range(args.rounds):
                times["onebox"].append(best_round(ours, values, args.renders))
                times["jinja2"].append(best_round(theirs, values, args.renders))
            best = {engine: min(found) for engine, found in times.items()}
            print("| %s | %.3f | %.3f | %.2f |" % (
                "objects" if objects else "dicts", best["onebox"] * 1e3,
                best["jinja2"] * 1e3, best["onebox"] / best["jinja2"]))


def _version(distribution):
    try:
        from importlib.metadata import version
        return version(distribution)
    except Exception:   # an odd install: the figure still stands without it
        return "?"


if __name__ == "__main__":
    main()
