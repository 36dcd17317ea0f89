"""Templates (issue 21, part 1): handlers/templates/ compiled to Python, escaping by default.

Unit tests of the compiler (onebox/templates.py) on templates written to tmp_path: escaping,
Markup, the HTML contexts (quoted attributes only; URL schemes; script, style and event
handlers refused), the language (if, for, include, extends), every load-time error naming file
and line, and render-time errors for missing variables. Then the contract (handlers/_pages.py)
on a bound context, a server built in-process, and the real ``python3 server.py`` run on a copy
of the application with an area of its own: its page escapes a payload, and a broken template
stops start-up with its file and line.
"""
import http.client
import os
import shutil
import signal
import urllib.parse

import pytest

from conftest import ROOT, request
from handlers import _context
from handlers._pages import Markup, page, render
from onebox.templates import (REFUSED_URL, RenderError, TemplateError, load_area_templates,
                              load_templates)


def load(folder, **files):
    """Templates from ``files`` (name -> text; "__" in a name stands for "/")."""
    for name, text in files.items():
        path = folder / (name.replace("__", "/") + ".html")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return load_templates(str(folder), "tpl")


def one(folder, text, **variables):
    """``text`` as the template t.html, rendered with ``variables``."""
    return load(folder, t=text).render("t.html", variables)


def load_error(folder, **files):
    with pytest.raises(TemplateError) as caught:
        load(folder, **files)
    return str(caught.value)


def render_error(folder, name="t.html", variables=None, **files):
    templates = load(folder, **files)
    with pytest.raises(RenderError) as caught:
        templates.render(name, variables or {})
    return str(caught.value)


# --- escaping -------------------------------------------------------------------------------------

@pytest.mark.parametrize("char, escaped", [
    ("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&#34;"), ("'", "&#39;")])
def test_each_special_character_is_escaped_in_text_and_in_attributes(tmp_path, char, escaped):
    out = one(tmp_path, '<p title="{{ v }}">{{ v }}</p>', v="a%sb" % char)
    assert out == '<p title="a%sb">a%sb</p>' % (escaped, escaped)


def test_a_payload_cannot_open_a_tag_or_leave_an_attribute(tmp_path):
    payload = '"><script>alert(1)</script>'
    out = one(tmp_path, "<a title='{{ v }}'>{{ v }}</a>", v=payload)
    assert "<script>" not in out and '"' not in out.split("'")[1]
    assert out == ("<a title='&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;'>"
                   "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;</a>")


def test_markup_passes_unchanged_in_text_and_stands_for_its_text_in_attributes(tmp_path):
    html = Markup('<b>bold</b> &amp; "q"')
    out = one(tmp_path, '<p title="{{ m }}">{{ m }}</p>', m=html)
    assert out == '<p title="&lt;b&gt;bold&lt;/b&gt; &amp; &#34;q&#34;"><b>bold</b> &amp; "q"</p>'
    # an operation on Markup gives a plain str again: escaped
    assert one(tmp_path, "{{ m }}", m=html + "<i>") == "&lt;b&gt;bold&lt;/b&gt; &amp;amp; " \
                                                       "&#34;q&#34;&lt;i&gt;"


def test_numbers_and_booleans_print_as_text(tmp_path):
    assert one(tmp_path, "{{ a }} {{ b }} {{ c }} {{ 7 }} {{ 'x<' }}", a=3, b=2.5, c=True) == \
        "3 2.5 True 7 x&lt;"


def test_none_and_methods_are_errors_naming_the_line(tmp_path):
    message = render_error(tmp_path, variables={"page": {"author": None}},
                           t="<h1>\n{{ page.author }}</h1>")
    assert message.startswith("tpl/t.html line 2: 'page.author' is None")
    message = render_error(tmp_path, variables={"s": "text"}, t="{{ s.upper }}")
    assert message.startswith("tpl/t.html line 1: 's.upper' is a method")
    assert one(tmp_path, "{% if v %}{{ v }}{% else %}-{% endif %}", v=None) == "-"


# --- where a {{ }} may go -------------------------------------------------------------------------

@pytest.mark.parametrize("text, fragment", [
    ("<a href={{ u }}>x</a>", "the value of attribute href must be quoted"),
    ("<input value={{ v }}>", "the value of attribute value must be quoted"),
    ('<input value=x{{ v }}>', "must be quoted"),
    ("<div {{ attrs }}>x</div>", "cannot make a tag or attribute name"),
    ("<{{ tag }}>x", "cannot make a tag or attribute name"),
    ("</{{ tag }}>", "cannot make a tag or attribute name"),
    ("<script>var x = '{{ v }}';</script>", "inside <script> is refused"),
    ("<SCRIPT type=module>{{ v }}</SCRIPT>", "inside <script> is refused"),
    ("<style>p { color: {{ c }} }</style>", "inside <style> is refused"),
    ('<a onclick="go({{ v }})">x</a>', "event handler attribute onclick"),
    ('<body onLoad="{{ v }}">', "event handler attribute onload"),
    ('<p style="color: {{ c }}">x</p>', "style attribute is refused"),
    ('<iframe srcdoc="{{ v }}"></iframe>', "srcdoc is refused"),
    ("<!doctype {{ v }}>", "inside <! > or <? >"),
])
def test_a_place_where_escaping_is_not_enough_is_refused_at_load_time(tmp_path, text, fragment):
    message = load_error(tmp_path, t="<p>\n" + text)
    assert message.startswith("tpl/t.html line 2: "), message
    assert fragment in message


def test_what_is_not_a_tag_or_is_after_one_is_text(tmp_path):
    out = one(tmp_path, "a < b {{ v }} <!-- {{ v }} --> <script>1 < 2</script> {{ v }}"
                        "<style>p{}</style><br/>{{ v }}", v="<x>")
    assert out == ("a < b &lt;x&gt; <!-- &lt;x&gt; --> <script>1 < 2</script> &lt;x&gt;"
                   "<style>p{}</style><br/>&lt;x&gt;")
    assert one(tmp_path, "<!--><a href=\"{{ u }}\">", u="javascript:x") == \
        '<!--><a href="%s">' % REFUSED_URL    # "<!-->" is a whole comment


@pytest.mark.parametrize("url", [
    "javascript:alert(1)", "JaVaScRiPt:alert(1)", " javascript:alert(1)",
    "\x01\x02javascript:alert(1)", "java\tscript:alert(1)", "java\nscript:alert(1)",
    "&#106;avascript:alert(1)", "&#x6A;avascript:alert(1)", "javascript&colon;alert(1)",
    "vbscript:msgbox(1)", "data:text/html,<script>alert(1)</script>", ":alert(1)",
])
def test_a_url_attribute_refuses_other_schemes_however_written(tmp_path, url):
    templates = load(tmp_path, t='<a href="{{ u }}">x</a><img src="{{ u }}">'
                                 '<form action=\'{{ u }}\'><button formaction="{{ u }}">')
    expected = ('<a href="%s">x</a><img src="%s"><form action=\'%s\'><button formaction="%s">'
                % ((REFUSED_URL,) * 4))
    assert templates.render("t.html", {"u": url}) == expected
    assert templates.render("t.html", {"u": Markup(url)}) == expected


@pytest.mark.parametrize("url, shown", [
    ("https://example.org/a?b=1&c=2", "https://example.org/a?b=1&amp;c=2"),
    ("HTTP://example.org/", "HTTP://example.org/"), ("mailto:a@example.org", None),
    ("/wiki/Main_Page", None), ("page?at=10:30", None), ("#top", None),
    ("//example.org/x", None), ("", None), ("notes/a:b", None),
])
def test_a_url_attribute_keeps_relative_and_http_https_mailto_urls(tmp_path, url, shown):
    assert one(tmp_path, '<a href="{{ u }}">', u=url) == '<a href="%s">' % (shown or url)


def test_a_url_after_a_literal_prefix_is_checked_with_it(tmp_path):
    templates = load(tmp_path, t='<a href="java{{ u }}">', s='<a href="/wiki/{{ u }}">',
                     q='<a href="?q={{ u }}">', k='<a href="https://{{ u }}">')
    assert templates.render("t.html", {"u": "script:alert(1)"}) == \
        '<a href="java%s">' % REFUSED_URL
    assert templates.render("t.html", {"u": "/x"}) == '<a href="java/x">'
    for name, prefix in (("s", "/wiki/"), ("q", "?q="), ("k", "https://")):
        assert templates.render(name + ".html", {"u": "javascript:alert(1)"}) == \
            '<a href="%sjavascript:alert(1)">' % prefix


@pytest.mark.parametrize("text, fragment", [
    ('<a href="{{ a }}:{{ b }}">', "a ':' after {{ }} at the start of href"),
    ('<a href="{{ a }}{{ b }}">', "only one {{ }} can start the value of href"),
    ('<a href="{% if x %}/{% endif %}{{ b }}">', "only one {{ }} can start"),
])
def test_a_url_whose_scheme_a_value_could_choose_is_refused_at_load_time(
        tmp_path, text, fragment):
    message = load_error(tmp_path, t=text)
    assert message.startswith("tpl/t.html line 1: ") and fragment in message, message


def test_conditions_inside_tags_and_attributes(tmp_path):
    templates = load(tmp_path, t='<option value="{{ v }}"{% if on %} selected{% endif %}>'
                                 '<li class="a{% if on %} b{% endif %}" title="{{ v }}">')
    assert templates.render("t.html", {"v": "1", "on": True}) == \
        '<option value="1" selected><li class="a b" title="1">'
    assert templates.render("t.html", {"v": "<", "on": False}) == \
        '<option value="&lt;"><li class="a" title="&lt;">'


# --- the language -----------------------------------------------------------------------------

def test_paths_reach_keys_attributes_and_indexes(tmp_path):
    class Page:
        title = "From an attribute"
    out = one(tmp_path, "{{ a.b.c }}|{{ rows.1 }}|{{ page.title }}|{{ pairs.0.1 }}",
              a={"b": {"c": "deep"}}, rows=["x", "y"], page=Page(), pairs=[("k", "v")])
    assert out == "deep|y|From an attribute|v"


def test_conditions(tmp_path):
    templates = load(tmp_path, t=(
        "{% if n == 1 %}one{% elif n == 2 and not quiet %}two{% elif n != 3 or quiet %}other"
        "{% else %}three{% endif %}|{% if (a or b) and kind == 'x' %}yes{% endif %}"))

    def run(n, quiet=False, a=False, b=False, kind="x"):
        return templates.render("t.html", dict(n=n, quiet=quiet, a=a, b=b, kind=kind))
    assert run(1) == "one|"
    assert run(2) == "two|"
    assert run(2, quiet=True) == "other|"
    assert run(3) == "three|"
    assert run(3, quiet=True, b=True) == "other|yes"
    assert run(1, a=True, kind="y") == "one|"


def test_loops_with_else_loop_fields_nesting_and_unpacking(tmp_path):
    templates = load(tmp_path, t=(
        "{% for row in rows %}{{ loop.index }}/{{ loop.length }}{% if loop.first %}F{% endif %}"
        "{% if loop.last %}L{% endif %}:{% for row in row.items %}{{ loop.index0 }}{{ row }}"
        "{% endfor %}({{ row.name }}) {% else %}none{% endfor %}[{{ row }}]"
        "{% for k, v in pairs %}{{ k }}={{ v }};{% endfor %}"))
    rows = [{"name": "a", "items": "xy"}, {"name": "b", "items": []}]
    out = templates.render("t.html", {"rows": rows, "row": "outer",
                                      "pairs": [("p", 1), ("q", 2)]})
    assert out == "1/2F:0x1y(a) 2/2L:(b) [outer]p=1;q=2;"
    assert templates.render("t.html", {"rows": [], "row": "outer", "pairs": []}) == "none[outer]"


def test_tag_lines_leave_no_blank_lines(tmp_path):
    out = one(tmp_path, "<ul>\n  {% for x in xs %}\n  <li>{{ x }}</li>\n  {% endfor %}\n"
                        "{# a comment #}\n</ul>\n", xs=[1, 2])
    assert out == "<ul>\n  <li>1</li>\n  <li>2</li>\n</ul>\n"


def test_include_sees_the_variables_and_the_loops_names(tmp_path):
    templates = load(tmp_path, t="<ul>{% for page in pages %}{% include 'parts/row.html' %}"
                                 "{% endfor %}</ul>{% include \"parts/row.html\" %}",
                     parts__row="<li>{{ page.name }} by {{ who }}</li>")
    assert templates.names == ["parts/row.html", "t.html"]
    out = templates.render("t.html", {"pages": [{"name": "A"}, {"name": "<B>"}], "who": "me",
                                      "page": {"name": "top"}})
    assert out == "<ul><li>A by me</li><li>&lt;B&gt; by me</li></ul><li>top by me</li>"


def test_extends_fills_the_layouts_blocks_and_keeps_the_others(tmp_path):
    templates = load(tmp_path,
                     base="<title>{% block title %}site{% endblock %}</title>\n"
                          "<nav>{% block nav %}<a href=\"/\">home</a>{% endblock %}</nav>\n"
                          "{% for x in xs %}{% block item %}[{{ x }}]{% endblock %}{% endfor %}",
                     page="{% extends 'base.html' %}\n{# only blocks here #}\n"
                          "{% block title %}{{ title }} - site{% endblock %}\n"
                          "{% block item %}<b>{{ x }}</b>{% include 'sub.html' %}"
                          "{% endblock item %}",
                     sub="({{ title }})")
    out = templates.render("page.html", {"title": "A&B", "xs": [1, 2]})
    assert out == ('<title>A&amp;B - site</title>\n<nav><a href="/">home</a></nav>\n'
                   "<b>1</b>(A&amp;B)<b>2</b>(A&amp;B)")
    assert templates.render("base.html", {"xs": [1]}) == \
        '<title>site</title>\n<nav><a href="/">home</a></nav>\n[1]'


def test_loading_again_sees_the_changed_files(tmp_path):
    assert one(tmp_path, "first") == "first"
    (tmp_path / "t.html").write_text("second {{ v }}")
    assert load_templates(str(tmp_path)).render("t.html", {"v": 2}) == "second 2"


def test_the_areas_layout_loads_and_renders_without_variables():
    templates = load_area_templates()
    assert "base.html" in templates.names
    out = templates.render("base.html", {})
    assert "<title>onebox</title>" in out and "<nav>" in out and "<main>" in out


# --- errors at load time: every one names the file and the line -------------------------------

@pytest.mark.parametrize("files, expected", [
    ({"t": "a\n{% for x in xs %}\nb"}, "tpl/t.html line 2: unclosed {% for %}"),
    ({"t": "{% if a %}\n{% for x in xs %}{% endfor %}"}, "tpl/t.html line 1: unclosed {% if %}"),
    ({"t": "\n\n{% block b %}"}, "tpl/t.html line 3: unclosed {% block %}"),
    ({"t": "{% if a %}\n{% endfor %}"},
     "tpl/t.html line 2: {% endfor %} closes nothing (the {% if %} of line 1 is open)"),
    ({"t": "{% endif %}"}, "tpl/t.html line 1: {% endif %} closes nothing"),
    ({"t": "x\n{% while a %}"}, "tpl/t.html line 2: unknown tag {% while %}"),
    ({"t": "{% else %}"}, "tpl/t.html line 1: {% else %} outside {% if %} or {% for %}"),
    ({"t": "x\n\n{{ a "}, "tpl/t.html line 3: unclosed {{ (no }} after it)"),
    ({"t": "{% if a }}"}, "tpl/t.html line 1: unclosed {% (no %} after it)"),
    ({"t": "{# note"}, "tpl/t.html line 1: unclosed {# (no #} after it)"),
    ({"t": "{{ }}"}, "tpl/t.html line 1: empty {{ }}"),
    ({"t": "{% %}"}, "tpl/t.html line 1: empty {% %}"),
    ({"t": "\n{{ a + b }}"}, "tpl/t.html line 2: unexpected '+' in 'a + b'"),
    ({"t": "{{ f(x) }}"}, "tpl/t.html line 1: unexpected '('"),
    ({"t": "{{ __import__('os') }}"}, "tpl/t.html line 1: names starting with '_'"),
    ({"t": "{{ a.__class__ }}"}, "tpl/t.html line 1: names starting with '_'"),
    ({"t": "{% if %}{% endif %}"}, "tpl/t.html line 1: missing expression"),
    ({"t": "{% for x of xs %}{% endfor %}"},
     "tpl/t.html line 1: expected {% for name in expression %}"),
    ({"t": "{{ loop.index }}"}, "tpl/t.html line 1: 'loop' is only known inside {% for %}"),
    ({"t": "{% for x in xs %}{{ loop.size }}{% endfor %}"}, "tpl/t.html line 1: 'loop.size'"),
    ({"t": "{% extends 'nope.html' %}"},
     "tpl/t.html line 1: extends 'nope.html', which does not exist"),
    ({"t": "\n{% include 'nope.html' %}"},
     "tpl/t.html line 2: includes 'nope.html', which does not exist"),
    ({"a": "{% include 'b.html' %}", "b": "x\n{% include 'a.html' %}"},
     "tpl/b.html line 2: include cycle: a.html -> b.html -> a.html"),
    ({"t": "{% include 't.html' %}"}, "tpl/t.html line 1: include cycle: t.html -> t.html"),
    ({"base": "{% block b %}{% endblock %}", "t": "x\n{% extends 'base.html' %}"},
     "tpl/t.html line 2: {% extends %} must come first"),
    ({"base": "{% block b %}{% endblock %}",
      "t": "{% extends 'base.html' %}\n{% block b %}{% endblock %}\nloose text"},
     "tpl/t.html line 2: a template that extends another has nothing outside its"),
    ({"base": "{% block b %}{% endblock %}",
      "t": "{% extends 'base.html' %}\n{% block c %}{% endblock %}"},
     "tpl/t.html line 2: block 'c' is not in base.html"),
    ({"base": "x", "mid": "{% extends 'base.html' %}", "t": "{% extends 'mid.html' %}"},
     "tpl/t.html line 1: extends 'mid.html', which extends another"),
    ({"t": "{% block a %}\n{% block a %}{% endblock %}{% endblock %}"},
     "tpl/t.html line 2: block 'a' is defined twice"),
    ({"t": "<p>{% if a %}<a href=\"x\"{% endif %}>"}, "tpl/t.html line 1: {% if %} ends "
     "in different places of the HTML (inside <a>, outside any tag)"),
    ({"t": "<ul>\n{% for x in xs %}\n<li class=\"{{ x }}\n{% endfor %}\"></ul>"},
     "tpl/t.html line 4: the body of {% for %} ends in different places of the HTML"),
    ({"t": "<p>\n<a title=\"x\n"}, "tpl/t.html line 3: the template ends inside the value of "
     "title in <a>"),
    ({"t": "<a title=\"{% include 'x.html' %}\">", "x": ""},
     "tpl/t.html line 1: {% include %} must be outside tags"),
])
def test_each_load_error_names_the_file_and_the_line(tmp_path, files, expected):
    message = load_error(tmp_path, **files)
    assert message.startswith(expected), message


def test_nesting_too_deep_to_compile_is_a_load_error(tmp_path):
    loops = "".join("{%% for x%d in xs %%}" % n for n in range(17)) + "{% endfor %}" * 17
    assert load_error(tmp_path, t=loops) == \
        "tpl/t.html line 1: more than 16 loops inside each other"
    assert load_error(tmp_path, t="{{ %sa%s }}" % ("(" * 5000, ")" * 5000)).startswith(
        "tpl/t.html: nested too deeply to compile")
    ifs = "{% if a %}" * 50 + "ok" + "{% endif %}" * 50
    assert one(tmp_path, ifs, a=True) == "ok"
    ifs = "{% if a %}" * 300 + "{% endif %}" * 300     # Python's own limit: 100 indents
    assert load_error(tmp_path, t=ifs).startswith("tpl/t.html: nested too deeply to compile")


def test_an_unreadable_template_names_its_file(tmp_path):
    (tmp_path / "bad.html").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(TemplateError, match=r"^tpl/bad.html: cannot read it"):
        load_templates(str(tmp_path), "tpl")


# --- errors at render time ----------------------------------------------------------------------

def test_a_missing_variable_names_the_template_and_the_line(tmp_path):
    files = {"t": "<p>{{ a }}</p>\n<p>{{ b }}\n{{ title }}</p>"}
    assert render_error(tmp_path, variables={"a": 1, "b": 2}, **files) == \
        "tpl/t.html line 3: 'title' is not defined"
    assert render_error(tmp_path, variables={"page": {"title": "x"}},
                        t="\n{{ page.title }} {{ page.author.name }}") == \
        "tpl/t.html line 2: 'page.author' is not defined"
    assert render_error(tmp_path, variables={"rows": [1]}, t="{{ rows.3 }}") == \
        "tpl/t.html line 1: 'rows.3' is not defined"


@pytest.mark.parametrize("text, line", [
    ("\n{% if user %}x{% endif %}", 2), ("{% for x in\n\n items %}{% endfor %}", 1),
    ("{% if 1 == 2 %}{% elif\n other == 'x' %}{% endif %}", 1),
    ("{% if a %}{% else %}\n{{ missing }}{% endif %}", 2)])
def test_a_missing_variable_in_a_condition_or_a_loop_is_an_error_too(tmp_path, text, line):
    message = render_error(tmp_path, variables={"a": False}, t=text)
    assert message.startswith("tpl/t.html line %d: '" % line) and "is not defined" in message


def test_a_missing_variable_in_an_included_template_names_that_template(tmp_path):
    message = render_error(tmp_path, name="page.html", variables={"title": "x"},
                           page="{{ title }}\n{% include 'foot.html' %}",
                           foot="<footer>\n{{ owner.email }}</footer>")
    assert message == "tpl/foot.html line 2: 'owner' is not defined"


def test_a_branch_not_taken_needs_no_variables(tmp_path):
    assert one(tmp_path, "{% if user %}{{ user.name }}{% else %}{{ login }}{% endif %}",
               user=None, login="sign in") == "sign in"


def test_rendering_an_unknown_template_is_an_error(tmp_path):
    with pytest.raises(TemplateError, match="tpl/nope.html: no such template"):
        load(tmp_path, t="x").render("nope.html", {})


# --- the contract: handlers/_pages.py ------------------------------------------------------------

def test_render_and_page_use_the_bound_servers_templates(tmp_path):
    templates = load(tmp_path, t="<h1>{{ name }}</h1>{{ status }}", p="<h1>{{ name }}</h1>")
    context = _context.ServerContext(templates=templates, owner="a test")
    _context.bind(context)
    try:
        assert render("t.html", name="<x>", status="ok") == "<h1>&lt;x&gt;</h1>ok"
        response = page("p.html", status=404, headers=[("X-A", "1")], name="n")
        with pytest.raises(RenderError, match="'status' is not defined"):
            page("t.html", status=200, name="n")   # page()'s own, not a template variable
    finally:
        _context.unbind(context)
    assert response.status == 404 and ("X-A", "1") in response.headers
    assert response.body == b"<h1>n</h1>"
    assert ("Content-Type", "text/html; charset=utf-8") in response.headers


def test_render_on_a_thread_without_templates_says_so():
    with pytest.raises(RuntimeError, match="templates is not bound"):
        render("base.html")


def test_a_handler_of_a_built_server_returns_a_page(start_server):
    def show(request):
        return page("base.html")

    server = start_server(routes=[("GET", "/t/page", show)])
    assert server.context.templates is not None
    status, headers, body = request(server, "GET", "/t/page")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b"<title>onebox</title>" in body


# --- the real process, on a copy of the application ---------------------------------------------

AREA = '''"""A test area: a page made from a template."""
from handlers._core import HTTPError
from handlers._pages import page


def greet(request):
    return page("greet.html", name=request.params["name"], next=request.query.get("next", "/"))


def broken(request):
    return page("greet.html", next="/")      # no name: a 500


ROUTES = [("GET", "/greet/{name}", greet), ("GET", "/broken", broken)]
'''

GREETING = '''{% extends "base.html" %}
{% block title %}Hello {{ name }}{% endblock %}
{% block content %}
<h1>Hello, {{ name }}!</h1>
<a href="{{ next }}">go on</a>
{% endblock %}
'''


def copy_of_the_application(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("server.py", "onebox", "handlers", "pages", "setup.cfg"):
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, str(app / name), ignore=ignore)
        else:
            shutil.copy(source, str(app / name))
    return app


def get(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("content-type"), response.read().decode()
    finally:
        connection.close()


def test_a_page_from_an_area_escapes_what_the_client_sent(tmp_path, server_process):
    app = copy_of_the_application(tmp_path)
    (app / "handlers" / "greet.py").write_text(AREA)
    (app / "handlers" / "templates" / "greet.html").write_text(GREETING)
    process = server_process(script=str(app / "server.py"))
    payload = "<script>alert(1)</script>"
    status, content_type, body = get(process.port, "/greet/" + urllib.parse.quote(payload, ""))
    assert status == 200 and content_type == "text/html; charset=utf-8"
    assert "<h1>Hello, &lt;script&gt;alert(1)&lt;/script&gt;!</h1>" in body
    assert "<title>Hello &lt;script&gt;alert(1)&lt;/script&gt;</title>" in body
    assert "<script>" not in body
    status, _, body = get(process.port, "/greet/x?next=" + urllib.parse.quote(
        " JavaScript:alert(1)"))
    assert '<a href="%s">go on</a>' % REFUSED_URL in body
    status, _, body = get(process.port, "/broken")
    assert status == 500 and "name" not in body and "greet" not in body
    line = process.wait_for(r"'name' is not defined", "err")
    assert "handlers/templates/greet.html line 2: 'name' is not defined" in line


def test_a_broken_template_stops_start_up_naming_its_file_and_line(tmp_path, server_process):
    app = copy_of_the_application(tmp_path)
    (app / "handlers" / "templates" / "broken.html").write_text(
        "<ul>\n{% for page in pages %}\n<li>{{ page.name }}</li>\n</ul>\n")
    expected = "onebox: handlers/templates/broken.html line 2: unclosed {% for %}"
    process = server_process(script=str(app / "server.py"), wait=False)
    assert process.wait() == 1
    assert expected in process.err_lines(), process.err_text()
    assert "Traceback" not in process.err_text()
    check = server_process("--check", script=str(app / "server.py"), wait=False)
    assert check.wait() == 1
    assert expected in check.err_lines(), check.err_text()


def test_sighup_compiles_the_templates_again_and_keeps_the_old_ones_if_broken(
        tmp_path, server_process):
    app = copy_of_the_application(tmp_path)
    (app / "handlers" / "greet.py").write_text(AREA)
    template = app / "handlers" / "templates" / "greet.html"
    template.write_text(GREETING)
    process = server_process(script=str(app / "server.py"))

    def reload():
        mark = len(process.err_lines())
        process.send_signal(signal.SIGHUP)
        return process.wait_for(r"reload", "err", after=mark, timeout=10)

    template.write_text("{% for x in xs %}\n")
    line = reload()
    assert "templates: kept the previous ones: handlers/templates/greet.html line 1: " \
        "unclosed {% for %}" in line, line
    assert "<h1>Hello, ann!</h1>" in get(process.port, "/greet/ann")[2]   # still served
    template.write_text(GREETING.replace("Hello, {{ name }}!", "Welcome, {{ name }}."))
    assert "templates" not in reload()
    assert "<h1>Welcome, ann.</h1>" in get(process.port, "/greet/ann")[2]
