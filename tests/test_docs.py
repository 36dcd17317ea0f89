"""The documentation: docs/settings.md is generated from SETTINGS and must match it, every setting
is listed under its own section with the flag the server really takes, relative links land on a
file and a heading that exist, and the README stays a ten-minute read. No server is started."""
import difflib
import glob
import os
import re
import subprocess
import sys

from conftest import ROOT, onebox
from onebox.settings import (REGENERATE, ROUTE_LIMIT_SETTINGS, SETTINGS,
                             STATIC_PATH_SETTINGS, settings_markdown)

SETTINGS_PAGE = os.path.join(ROOT, "docs", "settings.md")
README_MAX_LINES = 250   # issue 20: what a newcomer reads in ten minutes; the rest is in docs/


def read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def stale_page_message(expected, found):
    """What to run, and the first lines that differ."""
    diff = difflib.unified_diff(found.splitlines(), expected.splitlines(), "docs/settings.md",
                                "SETTINGS", lineterm="", n=0)
    return "docs/settings.md is out of date: run `%s`\n%s" % (REGENERATE,
                                                               "\n".join(list(diff)[:12]))


def test_the_settings_page_is_the_table_as_generated():
    expected, found = settings_markdown(), read(SETTINGS_PAGE)
    assert found == expected, stale_page_message(expected, found)
    assert "update the table instead" in found.split("\n## ", 1)[0]
    assert REGENERATE in found.split("\n## ", 1)[0]


def test_the_command_the_page_names_prints_the_page():
    command = REGENERATE.split(" > ")[0].split()   # python3 -m onebox.settings --markdown
    result = subprocess.run([sys.executable] + command[1:], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout == read(SETTINGS_PAGE), stale_page_message(result.stdout,
                                                                     read(SETTINGS_PAGE))
    wrong = subprocess.run([sys.executable, "-m", "onebox.settings"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and REGENERATE in wrong.stderr


def page_sections():
    """{section heading's name: {key: its table row}} as docs/settings.md shows them."""
    sections = {}
    for chunk in read(SETTINGS_PAGE).split("\n## ")[1:]:
        name = re.match(r"`\[(.+?)\]`", chunk).group(1)
        rows = re.findall(r"^\| `(\w+)`(.*)$", chunk, re.M)
        assert len(rows) == len(dict(rows)), "[%s] lists a key twice" % name
        sections[name] = dict(rows)
    return sections


def test_each_setting_is_listed_under_its_own_section_with_its_default():
    sections = page_sections()
    assert list(sections) == list(SETTINGS) + ['limits "/path"', 'static "/path"']
    for section, settings in SETTINGS.items():
        assert set(sections[section]) == {s.name for s in settings}, section
        for setting in settings:
            default_cell = sections[section][setting.name].split(" | ")[1]
            if isinstance(setting.default, (int, float)) and not isinstance(setting.default, bool):
                number = "%d" % setting.default if setting.default == int(setting.default) \
                    else repr(setting.default)
                assert default_cell.startswith("`%s`" % number), (section, setting.name)
    # [server] port and [tls] port are told apart: each under its own heading, its own default
    assert sections["server"]["port"].split(" | ")[1] == "`8000`"
    assert sections["tls"]["port"].split(" | ")[1] == "`8443`"
    assert set(sections['limits "/path"']) == {s.name for s in ROUTE_LIMIT_SETTINGS}
    assert set(sections['static "/path"']) == {s.name for s in STATIC_PATH_SETTINGS}


def test_each_flag_on_the_settings_page_is_one_the_server_takes():
    for section, rows in page_sections().items():
        for key, row in rows.items():
            flags = re.findall(r"`(--[\w-]+)`", row.split(" | ")[0])
            if section.startswith(("limits ", "static ")):
                assert flags == [], "per-path settings have no flags"
                continue
            assert len(flags) == 1, (section, key)
            parsed = onebox.parse_args([flags[0], "7"])
            assert getattr(parsed, "set:%s.%s" % (section, key)) == "7", flags[0]


def heading_anchors(text):
    """The anchors GitHub gives a Markdown file's headings ("The store's guarantees" ->
    the-stores-guarantees; a repeated one gets -1, -2)."""
    anchors, seen = set(), {}
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6} (.+)$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else "%s-%d" % (slug, seen[slug]))
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def documents():
    return [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "bench", "RESULTS.md")] + \
        sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def test_each_relative_link_reaches_a_file_and_a_heading():
    checked = 0
    for path in documents():
        text = re.sub(r"```.*?```", "", read(path), flags=re.S)
        text = re.sub(r"`[^`\n]*`", "", text)   # a regex in a code span is not a link
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            name, _, anchor = target.partition("#")
            linked = os.path.normpath(os.path.join(os.path.dirname(path), name)) if name else path
            where = "%s links to %s" % (os.path.relpath(path, ROOT), target)
            assert os.path.exists(linked), where + ": no such file"
            if anchor:
                assert anchor in heading_anchors(read(linked)), where + ": no such heading"
            checked += 1
    assert checked >= 40   # the docs link to each other; a broken pattern would check nothing


def test_the_heading_anchors_are_githubs():
    assert heading_anchors("## The store's guarantees\n## `[limits \"/path\"]`\n"
                           "## Static files, and the request path's CPU\n# x\n# x\n") == {
        "the-stores-guarantees", "limits-path", "static-files-and-the-request-paths-cpu",
        "x", "x-1"}


def test_the_readme_is_short_and_leads_to_every_document():
    readme = read(os.path.join(ROOT, "README.md"))
    assert len(readme.splitlines()) <= README_MAX_LINES
    for path in documents()[1:]:
        assert "](%s)" % os.path.relpath(path, ROOT) in readme, path


def test_the_readmes_worked_example_is_the_code_as_it_is():
    """Each line of the README's excerpt of handlers/hello.py is a line of that file (a
    comment added for the reader aside), so the example cannot drift from the area."""
    readme = read(os.path.join(ROOT, "README.md"))
    excerpt = readme.split("## Adding a handler area", 1)[1].split("```python\n", 1)[1]
    source = read(os.path.join(ROOT, "handlers", "hello.py")).splitlines()
    lines = [re.sub(r"\s+# .*$", "", line) for line in excerpt.split("```")[0].splitlines()]
    assert lines[0].startswith('"""Hello: ') and source[0].startswith(lines[0][:-3])
    for line in lines[1:]:
        assert line in source, "README's hello.py excerpt: %r is not in handlers/hello.py" % line
