"""Templates: the HTML files in handlers/templates/, compiled once into Python, escaping by default.

``load_templates(directory)`` reads every ``*.html`` under a directory, parses it, checks it and
compiles each into one Python function (source generated here, then ``compile()``: the way
Jinja2 does it, and for the same reason, speed: a render is then plain bytecode appending
strings to a list). ``Templates.render(name, variables)`` runs one. Loading is a pure function
of the directory, so a reload is calling it again and swapping the result; the ``Templates`` it
returns is never changed, so every worker renders with it without a lock.

The language is small on purpose (docs/areas.md, "Templates"): ``{{ expr }}``, ``{% if %}``
/ ``elif`` / ``else``, ``{% for a in b %}`` (with ``else`` and ``loop.index``, ``index0``,
``first``, ``last``, ``length``), ``{% include "x.html" %}``, one level of ``{% extends %}``
with ``{% block %}``, and ``{# comments #}``. An expression is a path (``page.title``,
``rows.0``: a key, then an attribute; never a name starting with "_"), a string, an integer,
``true``/``false``, and ``not``, ``and``, ``or``, ``==``, ``!=`` and parentheses. There are no
calls and no filters: what a page needs computed, its handler computes. Template text is never
given to ``eval``: expressions are parsed here and turned into code from a fixed repertoire.

Escaping is decided at load time, from the literal text around each ``{{ }}``: the compiler
follows the HTML as a browser's tokenizer would (HTML Living Standard, section 13.2.5, cut
down to what tells the contexts apart) and picks the escaper for the place, or refuses the
template. Text and quoted attribute values are escaped (``& < > " '``); a URL attribute's
value that could start with a scheme is checked against http, https and mailto at render time;
an unquoted attribute value, a tag or attribute name, an event handler, a ``style`` or
``srcdoc`` attribute, and ``<script>`` and ``<style>`` are refused, because HTML escaping does
not make a value safe there (see ``_REFUSED``).

Errors: anything wrong in a template is a ``TemplateError`` at load time naming the file and
line, so start-up stops with it; a variable that is missing (or None) when a page is rendered
is a ``RenderError`` (a TemplateError) naming the template and line: the handler's request
answers 500 and the detail goes to the error log (onebox/workers.py does that for any
exception).

Imports the standard library and the contract (``handlers._pages``: Markup); never server.
"""
import collections.abc
import html
import os
import re

from handlers._pages import Markup
from onebox.routing import ROOT

__all__ = ["Templates", "TemplateError", "RenderError", "load_templates", "load_area_templates",
           "AREA_TEMPLATES"]

AREA_TEMPLATES = os.path.join(ROOT, "handlers", "templates")   # the areas' templates


class TemplateError(Exception):
    """A template that cannot be loaded, or rendered; the message names the file and line."""


class RenderError(TemplateError):
    """A render that met a variable that is missing (or None, or a method): names the line."""


def load_area_templates():
    """The areas' templates (handlers/templates/, named so in errors), or None if the folder
    does not exist; TemplateError if one of them is broken."""
    if not os.path.isdir(AREA_TEMPLATES):
        return None
    return load_templates(AREA_TEMPLATES, "handlers/templates")


def load_templates(directory, shown=None):
    """Every ``*.html`` under ``directory`` (names are paths under it, with "/"), parsed,
    checked and compiled; ``shown`` is how errors name the directory (default: as given)."""
    shown = directory if shown is None else shown
    if not os.path.isdir(directory):
        raise TemplateError("%s: not a directory" % shown)
    parsed = {}
    for name in _template_names(directory):
        label = "%s/%s" % (shown, name)
        try:
            with open(os.path.join(directory, *name.split("/")), encoding="utf-8") as source:
                text = source.read()
        except (OSError, UnicodeDecodeError) as error:
            raise TemplateError("%s: cannot read it: %s" % (label, error)) from None
        parsed[name] = _too_deep_is_an_error(label, _Parser(text, label).parse)
    _link(parsed)
    return Templates(shown, parsed)


# CPython compiles at most 20 nested loops (its static block limit) and 100 levels of
# indentation, and parsing nests Python calls: past any of them, the template is refused with
# its name, never a traceback at start-up.
MAX_NESTED_LOOPS = 16


def _too_deep_is_an_error(label, work, *args):
    try:
        return work(*args)
    except (RecursionError, SyntaxError):
        raise TemplateError("%s: nested too deeply to compile (at most %d loops inside each "
                            "other, and expressions of a sane depth)"
                            % (label, MAX_NESTED_LOOPS)) from None


def _template_names(directory):
    names = []
    for folder, subfolders, files in os.walk(directory):
        subfolders.sort()
        relative = os.path.relpath(folder, directory)
        for filename in sorted(files):
            if filename.endswith(".html"):
                path = filename if relative == "." else os.path.join(relative, filename)
                names.append(path.replace(os.sep, "/"))
    return names


class Templates:
    """One directory's templates, compiled; never changed after loading, so shared by every
    worker without a lock. For callers: ``render(name, variables)``, ``names``, ``shown``."""

    def __init__(self, shown, parsed):
        self.shown = shown
        self.names = sorted(parsed)
        ident = {name: "t%d" % number for number, name in enumerate(self.names)}
        namespace = dict(_HELPERS)
        self._linemaps = {}    # a compiled function's file name -> its line map
        for name in self.names:
            compiler = _Compiler(parsed, ident)
            source, linemap = _too_deep_is_an_error(parsed[name].shown, compiler.compile, name)
            filename = "<template %s>" % parsed[name].shown
            exec(_too_deep_is_an_error(parsed[name].shown, compile, source, filename, "exec"),
                 namespace)
            self._linemaps[filename] = linemap
            for variable in compiler.names:
                namespace.setdefault("m_" + variable, _Missing(variable))
        self._functions = {name: namespace[ident[name]] for name in self.names}

    def __contains__(self, name):
        return name in self._functions

    def render(self, name, variables):
        """The template ``name`` rendered with ``variables`` (a dict); RenderError (naming the
        template and line) for a variable that is missing, None, or a method."""
        function = self._functions.get(name)
        if function is None:
            raise TemplateError("%s/%s: no such template" % (self.shown, name))
        out = []
        try:
            function(variables, out)
        except _Undefined as error:
            raise self._located(error, error.message) from None
        except TypeError as error:   # e.g. {% for x in 5 %}; deeper ones are not ours
            if _innermost_filename(error) not in self._linemaps:
                raise
            raise self._located(error, "TypeError: %s" % error) from None
        return "".join(out)

    def _located(self, error, message):
        """RenderError for ``error``, at the template line of the deepest template frame (the
        traceback walks through includes): one line of generated code is one template line."""
        where, tb = None, error.__traceback__
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename
            if filename in self._linemaps:
                where = self._linemaps[filename].get(tb.tb_lineno)
            tb = tb.tb_next
        shown, line, what = where or ("a template", 0, "")
        if message is None:    # the escaper's: None or a method, shown as the expression
            message = "'%s' is %s" % (what, error.what)
        return RenderError("%s line %d: %s" % (shown, line, message))


def _innermost_filename(error):
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename


# --- the runtime helpers: what compiled templates call ------------------------------------------

class _Undefined(Exception):
    """Raised inside a render; ``Templates.render`` turns it into a located RenderError."""

    def __init__(self, message, what=""):
        super().__init__(message)
        self.message = message
        self.what = what


class _Missing:
    """What a variable the caller did not give stands for: any use of it raises (printing,
    testing, comparing, looping, a path through it). Costs nothing while names are given."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def _refuse(self, *args):
        raise _Undefined("'%s' is not defined" % self.name)

    __bool__ = __iter__ = __len__ = __eq__ = __ne__ = __str__ = __contains__ = _refuse
    __hash__ = None

    def __repr__(self):
        return "<missing %s>" % self.name


def _escape_text(text):
    # the five characters that can end or start something in HTML text and quoted attribute
    # values; str.replace returns the same object when there is nothing to replace
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&#34;").replace("'", "&#39;"))


def _e(value):
    """{{ }} in element content: escaped, unless Markup."""
    if type(value) is str:      # the common case, first and without a call
        return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                .replace('"', "&#34;").replace("'", "&#39;"))
    if isinstance(value, Markup):
        return value
    return _escape_text(_text_of(value))


def _ea(value):
    """{{ }} in a quoted attribute value: escaped; Markup stands for the text it shows, so it
    is unescaped and escaped again (its entities kept, its quotes and tags made harmless)."""
    if type(value) is str:
        return _escape_text(value)
    if isinstance(value, Markup):
        return _escape_text(html.unescape(value))
    return _escape_text(_text_of(value))


def _text_of(value):
    """str(value) for what is neither str nor Markup; None, a missing variable and a method
    raise: printing them is always a bug (an empty title, a "None" in a page, a repr)."""
    if type(value) in (int, float, bool):
        return str(value)
    if value is None:
        raise _Undefined(None, "None (leave it out with {% if %})")
    if isinstance(value, _Missing):
        value._refuse()
    if callable(value):
        raise _Undefined(None, "a method or function: templates call nothing")
    return str(value)


# The harmless URL put in place of one whose scheme is refused (as Go's html/template does).
REFUSED_URL = "about:invalid#refused"
_SAFE_SCHEMES = ("http", "https", "mailto")
_URL_IGNORED = re.compile(r"[\t\n\r]")                       # removed anywhere by URL parsers
_URL_LEADING = "".join(chr(code) for code in range(0x21))    # C0 controls and space: stripped


def _url_is_safe(url):
    """Whether a browser would take ``url`` (as its attribute value reads, entities decoded)
    as relative or http, https, mailto (WHATWG URL standard, "basic URL parser": tab and
    newlines removed anywhere, leading C0 controls and spaces stripped, then the scheme runs
    to the first ':'). Anything with a ':' before its first '/', '?' or '#' must name one of
    the safe schemes: an allowlist, so case, lookalikes and new schemes cannot slip by."""
    url = _URL_IGNORED.sub("", url).lstrip(_URL_LEADING)
    for position, char in enumerate(url):
        if char == ":":
            return url[:position].lower() in _SAFE_SCHEMES
        if char in "/?#":
            return True
    return True


def _eu(value, prefix):
    """{{ }} where a URL attribute's scheme is decided (``prefix``: the literal text before it
    in the value): escaped as in any attribute, and replaced by REFUSED_URL unless what the
    browser will read, and the value with its entities decoded, are relative or safe."""
    if isinstance(value, Markup):
        value = html.unescape(value)
    elif type(value) is not str:
        value = _text_of(value)
    escaped = _escape_text(value)
    if (_url_is_safe(html.unescape(prefix + escaped))
            and _url_is_safe(html.unescape(prefix + value))):
        return escaped
    return REFUSED_URL


_NOT_THERE = object()
_MAPPINGS = {}   # type -> whether it is a Mapping: an ABC's isinstance is slow, so it is cached


def _dot(value, key, path):
    """``value.key``: a mapping's item, a sequence's index, else an attribute."""
    kind = type(value)
    if kind is dict:
        found = value.get(key, _NOT_THERE)
        if found is _NOT_THERE:
            raise _Undefined("'%s' is not defined" % path)
        return found
    if kind is _Missing:
        value._refuse()
    mapping = _MAPPINGS.get(kind)
    if mapping is None:
        mapping = _MAPPINGS[kind] = isinstance(value, collections.abc.Mapping)
    if mapping or type(key) is int:
        try:
            return value[key]
        except (LookupError, TypeError):
            raise _Undefined("'%s' is not defined" % path) from None
    found = getattr(value, key, _NOT_THERE)
    if found is _NOT_THERE:
        raise _Undefined("'%s' is not defined" % path)
    return found


_HELPERS = {"_e": _e, "_ea": _ea, "_eu": _eu, "_dot": _dot, "__builtins__": {
    "list": list, "len": len, "enumerate": enumerate}}


# --- the HTML around each {{ }} ---------------------------------------------------------------

URL_ATTRIBUTES = frozenset((
    "href", "src", "action", "formaction", "poster", "cite", "data", "background", "longdesc",
    "usemap", "manifest", "icon", "codebase", "xlink:href"))

# Where escaping for HTML does not make a value safe, so {{ }} is refused at load time:
_REFUSED = {
    # the browser parses JavaScript (or CSS) here, whose quotes and escapes are not HTML's: an
    # escaped value can still end a string or call a function (and </script> ends the element)
    "raw": "{{ }} inside <%(tag)s> is refused: HTML escaping does not make a value safe in "
           "JavaScript or CSS; put it in a data- attribute and read that from the script",
    # the attribute's decoded value is run as JavaScript
    "event": "{{ }} inside the event handler attribute %(attr)s is refused: its value is "
             "JavaScript, which HTML escaping does not make safe",
    # CSS: url(), expression() and friends; escaping cannot tell them apart from colours
    "style": "{{ }} inside a style attribute is refused: its value is CSS, which HTML escaping "
             "does not make safe; choose among classes instead",
    # the decoded value is parsed again as a whole HTML document: escaping is undone
    "srcdoc": "{{ }} inside srcdoc is refused: its value is parsed again as HTML",
    # escaped text would still pick the tag or attribute: <{{ x }}>, <a {{ x }}>
    "name": "{{ }} cannot make a tag or attribute name; put it in a quoted attribute value "
            "(name=\"{{ x }}\") or between tags",
    # a space in the value would start a new attribute (onmouseover=...)
    "unquoted": "the value of attribute %(attr)s must be quoted: %(attr)s=\"{{ ... }}\"",
    "declaration": "{{ }} cannot go inside <! > or <? >",
    "unknown": "{{ }} here cannot be checked: the branches before it leave different "
               "attributes open",
}

_SPACE = " \t\n\r\f"
_IN_TAG = ("tag", "attr_name", "after_name")
_URL_DONE = (False, False, "")   # a URL value whose scheme is settled


class _HtmlError(Exception):
    def __init__(self, message, index=0):
        super().__init__(message)
        self.index = index


class _Html:
    """Where the literal text so far has left the HTML: ``kind`` is the tokenizer's state
    (text, lt, end_lt, bang, bang_dash, comment, bogus, tag_name, tag, attr_name, after_name,
    before_value, value_dq, value_sq, value_unq, raw, raw_end); ``tag`` and ``attr`` are the
    current tag and attribute names (attr None: unknown after branches); ``url`` is, inside a
    URL attribute's value, (scheme still open, a {{ }} is in it, the literal text so far)."""

    __slots__ = ("kind", "tag", "closing", "attr", "url", "raw", "dashes")

    def __init__(self):
        self.kind, self.tag, self.closing, self.attr = "text", "", False, ""
        self.url, self.raw, self.dashes = None, "", 0

    def copy(self):
        other = _Html.__new__(_Html)
        for field in _Html.__slots__:
            setattr(other, field, getattr(self, field))
        return other

    def key(self):
        """What decides how the HTML goes on from here (stale fields left out): equal keys,
        same place."""
        kind = self.kind
        if kind in ("text", "lt", "end_lt", "bang", "bang_dash", "bogus"):
            return (kind,)
        if kind == "comment":
            return (kind, min(self.dashes, 2))
        if kind in ("raw", "raw_end"):
            return (kind, self.tag, self.raw)
        if kind in ("tag", "tag_name"):
            return (kind, self.tag, self.closing)
        return (kind, self.tag, self.closing, self.attr, self.url)

    def describe(self):
        if self.kind == "text":
            return "outside any tag"
        if self.kind == "comment":
            return "inside a comment"
        if self.kind in ("lt", "end_lt", "bang", "bang_dash", "bogus"):
            return "inside a '<' not yet closed"
        if self.kind in ("raw", "raw_end"):
            return "inside <%s>" % self.tag
        if self.kind.startswith("value"):
            return "inside the value of %s in <%s>" % (self.attr, self.tag)
        return "inside <%s%s>" % ("/" if self.closing else "", self.tag)

    def feed(self, text):
        for index, char in enumerate(text):
            try:
                self._step(char)
            except _HtmlError as error:
                error.index = index
                raise

    def _step(self, char):   # noqa: C901  (one branch per tokenizer state, as the spec reads)
        kind = self.kind
        if kind == "text":
            if char == "<":
                self.kind = "lt"
        elif kind == "lt":
            if char.isascii() and char.isalpha():
                self.kind, self.tag, self.closing = "tag_name", char.lower(), False
            elif char in "/!?":
                self.kind = {"/": "end_lt", "!": "bang", "?": "bogus"}[char]
            else:
                self.kind = "text"
                self._step(char)
        elif kind == "end_lt":
            if char.isascii() and char.isalpha():
                self.kind, self.tag, self.closing = "tag_name", char.lower(), True
            else:
                self.kind = "text" if char == ">" else "bogus"
        elif kind in ("bang", "bang_dash"):
            if char == "-":
                # "<!--" starts a comment; counting its dashes as two closes "<!-->" at once,
                # as browsers do (an abrupt closing of an empty comment)
                self.kind, self.dashes = ("bang_dash", 0) if kind == "bang" else ("comment", 2)
            else:
                self.kind = "text" if char == ">" else "bogus"
        elif kind == "comment":
            if char == ">" and self.dashes >= 2:
                self.kind = "text"
            self.dashes = self.dashes + 1 if char == "-" else 0
        elif kind == "bogus":
            if char == ">":
                self.kind = "text"
        elif kind == "tag_name":
            if char in _SPACE or char == "/":
                self.kind = "tag"
            elif char == ">":
                self._end_of_tag()
            else:
                self.tag += char.lower()
        elif kind in _IN_TAG:
            self._step_in_tag(kind, char)
        elif kind == "before_value":
            if char == ">":
                self._end_of_tag()
            elif char not in _SPACE:
                self.kind = {'"': "value_dq", "'": "value_sq"}.get(char, "value_unq")
                url = self.attr in URL_ATTRIBUTES
                self.url = (True, False, "") if url else None
                if self.kind == "value_unq":
                    self._step_value(char)
        elif kind in ("value_dq", "value_sq"):
            if char == ('"' if kind == "value_dq" else "'"):
                self.kind, self.url = "tag", None
            else:
                self._step_value(char)
        elif kind == "value_unq":
            if char in _SPACE:
                self.kind, self.url = "tag", None
            elif char == ">":
                self.url = None
                self._end_of_tag()
            else:
                self._step_value(char)
        else:   # raw and raw_end: the text of <script> or <style>, until its end tag
            self._step_raw(kind, char)

    def _step_in_tag(self, kind, char):
        if char == ">":
            self._end_of_tag()
        elif char == "=" and kind != "tag":
            self.kind = "before_value"
        elif char in _SPACE:
            if kind == "attr_name":
                self.kind = "after_name"
        elif char == "/":
            self.kind = "tag"
        elif kind == "attr_name":
            self.attr += char.lower()
        else:
            self.kind, self.attr = "attr_name", char.lower()

    def _step_value(self, char):
        """A literal character of an attribute value: in a URL attribute, it may settle the
        scheme (':' does, and so do '/', '?', '#', which come after any scheme)."""
        if self.url is None or not self.url[0]:
            return
        if char in "/?#":
            self.url = _URL_DONE
        elif char == ":":
            if self.url[1]:
                raise _HtmlError(
                    "a ':' after {{ }} at the start of %s would let the value choose the "
                    "URL's scheme (javascript:); start the value with the scheme, '/' or '?'"
                    % self.attr)
            self.url = _URL_DONE    # the template's own scheme: its author chose it
        else:
            self.url = (True, self.url[1], self.url[2] + char)

    def _end_of_tag(self):
        if not self.closing and self.tag in ("script", "style"):
            self.kind, self.raw = "raw", ""
        else:
            self.kind = "text"

    def _step_raw(self, kind, char):
        end = "</" + self.tag
        if kind == "raw_end":    # after "</script": its end tag if a space, / or > follows
            if char in _SPACE or char in "/>":
                self.closing = True
                if char == ">":
                    self.kind = "text"
                else:
                    self.kind = "tag"
                return
            self.kind, self.raw = "raw", ""
        if char.lower() == end[len(self.raw)]:
            self.raw += char.lower()
            if self.raw == end:
                self.kind = "raw_end"
        else:
            self.raw = "<" if char == "<" else ""

    def escaper_for_output(self):
        """The escaper's name for a {{ }} here (and the URL's literal prefix), or _HtmlError."""
        kind, attr = self.kind, self.attr
        if kind in ("text", "comment"):
            return "_e", None
        if kind in ("raw", "raw_end"):
            raise _HtmlError(_REFUSED["raw"] % {"tag": self.tag})
        if kind in ("before_value", "value_unq"):
            raise _HtmlError(_REFUSED["unquoted"] % {"attr": attr})
        if kind in ("bang", "bang_dash", "bogus"):
            raise _HtmlError(_REFUSED["declaration"])
        if kind not in ("value_dq", "value_sq"):
            raise _HtmlError(_REFUSED["name"])
        if attr is None:
            raise _HtmlError(_REFUSED["unknown"])
        if attr.startswith("on"):
            raise _HtmlError(_REFUSED["event"] % {"attr": attr})
        if attr in ("style", "srcdoc"):
            raise _HtmlError(_REFUSED[attr])
        if self.url is None or not self.url[0]:
            return "_ea", None
        if self.url[1]:
            raise _HtmlError("only one {{ }} can start the value of %s: put a '/' or '?' "
                             "between them" % attr)
        prefix = self.url[2]
        self.url = (True, True, prefix)
        return "_eu", prefix


def _merge(states, what):
    """The HTML state after branches that ended in ``states``: they must agree, up to which
    attribute a tag is at (``<input{% if x %} checked{% endif %}>``); _HtmlError if not."""
    first = states[0]
    if all(state.key() == first.key() for state in states):
        return first.copy()
    merged = first.copy()
    if (all(state.kind in _IN_TAG or state.kind == "tag_name" for state in states)
            and all((state.tag, state.closing) == (first.tag, first.closing) for state in states)):
        merged.kind = "after_name"
        merged.attr = first.attr if all(s.attr == first.attr for s in states) else None
        return merged
    if first.kind.startswith("value") and all(
            state.key()[:4] == first.key()[:4] for state in states):
        # one branch settled the URL's scheme and another did not: a {{ }} next could still
        # choose it, and we cannot know the literal text before it
        merged.url = (True, True, "")
        return merged
    raise _HtmlError("%s ends in different places of the HTML (%s); close what each branch "
                     "opens" % (what, ", ".join(sorted({s.describe() for s in states}))))


# --- parsing: text -> tokens -> a tree of nodes --------------------------------------------------

_CLOSERS = {"{{": "}}", "{%": "%}", "{#": "#}"}
_OPENER = re.compile(r"\{\{|\{%|\{#")
_NAME = r"[A-Za-z][A-Za-z0-9_]*"
_EXPR_TOKEN = re.compile(r"""\s*(?:
      (?P<op>==|!=|\(|\))
    | "(?P<dq>[^"\\]*)" | '(?P<sq>[^'\\]*)'
    | (?P<int>[0-9]+)
    | (?P<path>[A-Za-z_][A-Za-z0-9_]*(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+))*)
    | (?P<bad>\S))""", re.X)
_FOR = re.compile(r"for\s+(%s(?:\s*,\s*%s)*)\s+in\s+(.+)$" % (_NAME, _NAME), re.S)
_QUOTED = re.compile(r"""("[^"]+"|'[^']+')$""")
_LOOP_FIELDS = ("index", "index0", "first", "last", "length")


class _Node:
    """One piece of a template: ``kind`` is text, out, if, for, include or block."""

    __slots__ = ("kind", "shown", "line", "text", "expr", "branches", "targets", "body",
                 "orelse", "name", "end_line")

    def __init__(self, kind, shown, line, **fields):
        self.kind, self.shown, self.line = kind, shown, line
        self.text = self.expr = self.targets = self.body = self.orelse = self.name = None
        self.branches = None
        self.end_line = line
        for field, value in fields.items():
            setattr(self, field, value)


class _Parsed:
    """A template parsed: its nodes, its blocks by name, what it extends (name, line)."""

    def __init__(self, shown, nodes, blocks, extends, last_line):
        self.shown, self.nodes, self.blocks = shown, nodes, blocks
        self.extends, self.last_line = extends, last_line


class _Parser:
    def __init__(self, source, shown):
        self.source, self.shown = source, shown

    def error(self, line, message):
        return TemplateError("%s line %d: %s" % (self.shown, line, message))

    def tokens(self):
        """(kind, text, line) for text, out ({{ }}), tag ({% %}) and comment ({# #}); a tag or
        comment alone on its line takes the line with it (no blank lines in the output)."""
        source, tokens, position, line = self.source, [], 0, 1
        while True:
            found = _OPENER.search(source, position)
            end = found.start() if found else len(source)
            if end > position:
                tokens.append(["text", source[position:end], line])
                line += source.count("\n", position, end)
            if not found:
                break
            opener = found.group()
            close = source.find(_CLOSERS[opener], found.end())
            inner = source[found.end():close] if close >= 0 else ""
            if close < 0 or (opener != "{#" and _OPENER.search(inner)):
                raise self.error(line, "unclosed %s (no %s after it)" % (opener, _CLOSERS[opener]))
            kind = {"{{": "out", "{%": "tag", "{#": "comment"}[opener]
            tokens.append([kind, inner.strip(), line])
            line += inner.count("\n")
            position = close + 2
        self._trim_lines(tokens)
        return [token for token in tokens
                if token[0] != "comment" and (token[0] != "text" or token[1])], line

    @staticmethod
    def _trim_lines(tokens):
        for index, token in enumerate(tokens):
            if token[0] not in ("tag", "comment"):
                continue
            before = tokens[index - 1] if index else None
            after = tokens[index + 1] if index + 1 < len(tokens) else None
            if before is not None and (before[0] != "text" or not re.search(
                    r"(^|\n)[ \t]*$", before[1])):
                continue
            if after is not None and (after[0] != "text" or not re.match(
                    r"[ \t]*(\r?\n|$)", after[1])):
                continue
            if before is not None:
                before[1] = re.sub(r"[ \t]*$", "", before[1])
            if after is not None:
                cut = re.match(r"[ \t]*(\r?\n)?", after[1])
                after[1] = after[1][cut.end():]
                after[2] += 1 if cut.group(1) else 0

    def parse(self):
        tokens, last_line = self.tokens()
        root, blocks, extends = [], {}, None
        stack = [("root", None, root)]     # (tag, node, the list nodes go into)
        for kind, text, line in tokens:
            body = stack[-1][2]
            if kind == "text":
                body.append(_Node("text", self.shown, line, text=text))
            elif kind == "out":
                if not text:
                    raise self.error(line, "empty {{ }}")
                body.append(_Node("out", self.shown, line, text=text,
                                  expr=_Expression(text, self.error, line).parse()))
            elif not text:
                raise self.error(line, "empty {% %}")
            else:
                word = text.split(None, 1)[0]
                rest = text[len(word):].strip()
                if word == "extends":
                    if extends or len(stack) > 1 or any(
                            node.kind != "text" or node.text.strip() for node in root):
                        raise self.error(line, "{% extends %} must come first, and once")
                    extends = (self._quoted(rest, line, word), line)
                else:
                    self._tag(word, rest, line, stack, blocks)
        if len(stack) > 1:
            tag, node, _ = stack[-1]
            raise self.error(node.line, "unclosed {%% %s %%}" % tag)
        if extends:
            for node in root:
                if node.kind != "block" and (node.kind != "text" or node.text.strip()):
                    raise self.error(node.line, "a template that extends another has nothing "
                                                "outside its {% block %}s")
        return _Parsed(self.shown, root, blocks, extends, last_line)

    def _tag(self, word, rest, line, stack, blocks):   # noqa: C901  (one branch per tag)
        top, node, _ = stack[-1]
        if word == "if":
            node = _Node("if", self.shown, line, branches=[(self._expr(rest, line), line, [])],
                         orelse=None)
            stack[-1][2].append(node)
            stack.append(("if", node, node.branches[0][2]))
        elif word == "elif":
            if top != "if" or node.orelse is not None:
                raise self.error(line, "{% elif %} outside {% if %}, or after its {% else %}")
            node.branches.append((self._expr(rest, line), line, []))
            stack[-1] = ("if", node, node.branches[-1][2])
        elif word == "else":
            self._nothing_after(word, rest, line)
            if top not in ("if", "for") or node.orelse is not None:
                raise self.error(line, "{% else %} outside {% if %} or {% for %}, or twice")
            node.orelse = []
            stack[-1] = (top, node, node.orelse)
        elif word == "for":
            found = _FOR.match("for " + rest)
            if not found:
                raise self.error(line, "expected {% for name in expression %}")
            targets = [name.strip() for name in found.group(1).split(",")]
            if "loop" in targets:
                raise self.error(line, "'loop' is the loop's own name; choose another")
            node = _Node("for", self.shown, line, targets=targets,
                         expr=self._expr(found.group(2), line), body=[], orelse=None)
            stack[-1][2].append(node)
            stack.append(("for", node, node.body))
        elif word == "block":
            name = rest
            if not re.match(_NAME + "$", name):
                raise self.error(line, "expected {% block name %}")
            if name in blocks:
                raise self.error(line, "block %r is defined twice" % name)
            if any(tag == "block" for tag, _, _ in stack):
                raise self.error(line, "a {% block %} cannot be inside another")
            node = _Node("block", self.shown, line, name=name, body=[])
            blocks[name] = node
            stack[-1][2].append(node)
            stack.append(("block", node, node.body))
        elif word == "include":
            stack[-1][2].append(_Node("include", self.shown, line,
                                      name=self._quoted(rest, line, word)))
        elif word in ("endif", "endfor", "endblock"):
            if word == "endblock" and rest and node is not None and rest == node.name:
                rest = ""
            self._nothing_after(word, rest, line)
            if top != word[3:]:
                opened = " (the {%% %s %%} of line %d is open)" % (top, node.line) if node else ""
                raise self.error(line, "{%% %s %%} closes nothing%s" % (word, opened))
            node.end_line = line
            stack.pop()
        else:
            raise self.error(line, "unknown tag {%% %s %%}" % word)

    def _expr(self, text, line):
        if not text:
            raise self.error(line, "missing expression")
        return _Expression(text, self.error, line).parse()

    def _quoted(self, rest, line, word):
        found = _QUOTED.match(rest)
        if not found:
            raise self.error(line, 'expected {%% %s "name.html" %%}' % word)
        return found.group(1)[1:-1]

    def _nothing_after(self, word, rest, line):
        if rest:
            raise self.error(line, "unexpected %r after %s" % (rest, word))


class _Expression:
    """The expression language, parsed into tuples: ("const", value), ("path", names, text),
    ("not", a), ("and", a, b), ("or", a, b), ("==", a, b), ("!=", a, b)."""

    def __init__(self, text, error, line):
        self.text, self.error, self.line = text, error, line
        self.tokens = []
        for found in _EXPR_TOKEN.finditer(text):
            if found.group("bad"):
                raise self.fail("unexpected %r" % found.group("bad"))
            kind = found.lastgroup
            value = found.group(kind)
            if kind == "path" and value in ("and", "or", "not"):
                kind = "op"
            self.tokens.append((kind, value))
        self.position = 0

    def fail(self, message):
        return self.error(self.line, "%s in %r" % (message, self.text))

    def parse(self):
        expr = self._or()
        if self.position != len(self.tokens):
            raise self.fail("unexpected %r" % self.tokens[self.position][1])
        return expr

    def _peek(self):
        return self.tokens[self.position] if self.position < len(self.tokens) else (None, None)

    def _take_op(self, *ops):
        kind, value = self._peek()
        if kind == "op" and value in ops:
            self.position += 1
            return value
        return None

    def _or(self):
        expr = self._and()
        while self._take_op("or"):
            expr = ("or", expr, self._and())
        return expr

    def _and(self):
        expr = self._not()
        while self._take_op("and"):
            expr = ("and", expr, self._not())
        return expr

    def _not(self):
        if self._take_op("not"):
            return ("not", self._not())
        left = self._atom()
        op = self._take_op("==", "!=")
        return (op, left, self._atom()) if op else left

    def _atom(self):
        kind, value = self._peek()
        self.position += 1
        if kind == "op" and value == "(":
            expr = self._or()
            if not self._take_op(")"):
                raise self.fail("missing ')'")
            return expr
        if kind in ("dq", "sq"):
            return ("const", value)
        if kind == "int":
            return ("const", int(value))
        if kind == "path":
            if value in ("true", "false"):
                return ("const", value == "true")
            names = value.split(".")
            if any(name.startswith("_") for name in names):
                raise self.fail("names starting with '_' are not reachable from templates")
            return ("path", names, value)
        raise self.fail("expected a name or a value, found %r" % value if value else
                        "expected a name or a value")


# --- linking: extends and includes resolved, cycles refused -------------------------------------

def _link(parsed):
    """Check every extends (the parent exists, extends nothing itself, has each block the
    child fills) and every include (it exists; no template includes itself, however far)."""
    for name, template in parsed.items():
        if template.extends:
            parent_name, line = template.extends
            parent = parsed.get(parent_name)
            if parent is None:
                raise TemplateError("%s line %d: extends %r, which does not exist"
                                    % (template.shown, line, parent_name))
            if parent.extends:
                raise TemplateError("%s line %d: extends %r, which extends another: one level "
                                    "of layout only" % (template.shown, line, parent_name))
            for block in template.blocks.values():
                if block.name not in parent.blocks:
                    raise TemplateError("%s line %d: block %r is not in %s"
                                        % (template.shown, block.line, block.name, parent_name))
    checked = set()
    for name in parsed:
        _check_includes(parsed, name, [], checked)


def _composed(parsed, name):
    """The nodes a template renders: its own, or its parent's with its blocks filled in."""
    template = parsed[name]
    if template.extends:
        return parsed[template.extends[0]].nodes, template.blocks
    return template.nodes, {}


def _walk_includes(nodes, blocks):
    for node in nodes:
        if node.kind == "include":
            yield node
        elif node.kind == "block":
            yield from _walk_includes(blocks.get(node.name, node).body, blocks)
        elif node.kind == "if":
            for _, _, body in node.branches:
                yield from _walk_includes(body, blocks)
            yield from _walk_includes(node.orelse or (), blocks)
        elif node.kind == "for":
            yield from _walk_includes(node.body, blocks)
            yield from _walk_includes(node.orelse or (), blocks)


def _check_includes(parsed, name, chain, checked):
    """Depth first from ``name`` (reached through ``chain``); ``checked``: templates from
    which no cycle can be reached."""
    if name in checked:
        return
    chain = chain + [name]
    for node in _walk_includes(*_composed(parsed, name)):
        if node.name not in parsed:
            raise TemplateError("%s line %d: includes %r, which does not exist"
                                % (node.shown, node.line, node.name))
        if node.name in chain:
            cycle = chain[chain.index(node.name):] + [node.name]
            raise TemplateError("%s line %d: include cycle: %s"
                                % (node.shown, node.line, " -> ".join(cycle)))
        _check_includes(parsed, node.name, chain, checked)
    checked.add(name)


# --- code generation ------------------------------------------------------------------------------

class _Compiler:
    """One template's Python source: ``def tN(_v, _o)`` appending its text to the list _o.
    Each line of generated code that can fail maps to one template line (``linemap``:
    generated line -> (file, line, expression)), which is how RenderError names the line.

    Names: a variable the caller gives is ``n_<name>``, read once at the top (``m_<name>``,
    a _Missing, when it is not given); a loop's names are ``v<depth>_<name>``, its index and
    length ``_i<depth>``/``_n<depth>``; so an inner name shadows an outer one as the template
    reads, and nothing leaks out of a loop."""

    HEADER_LINES = 3

    def __init__(self, parsed, ident):
        self.parsed, self.ident = parsed, ident
        self.lines, self.linemap = [], {}
        self.names = set()
        self.loops = []       # per enclosing for: {"depth", "targets", "uses_loop"}
        self.pending = []     # output not yet written: [python expression, mapping or None]
        self.indent = 1
        self.counter = 0

    def compile(self, name):
        template = self.parsed[name]
        nodes, blocks = _composed(self.parsed, name)
        try:
            state = self._nodes(nodes, _Html(), blocks)
        except _Located as error:
            raise TemplateError("%s line %d: %s" % (error.shown, error.line, error)) from None
        self._flush()
        if state.kind != "text":
            raise TemplateError("%s line %d: the template ends %s" % (
                template.shown, template.last_line, state.describe()))
        names = sorted(self.names)
        head = ["def %s(_v, _o):" % self.ident[name],
                "    _a = _o.append; _x = _o.extend",
                "    " + ("%s = %s" % (", ".join("n_" + n for n in names), ", ".join(
                    "_v.get(%r, m_%s)" % (n, n) for n in names)) if names else "pass")]
        body = self.lines or ["    pass"]
        linemap = {number + self.HEADER_LINES + 1: where
                   for number, where in self.linemap.items()}
        return "\n".join(head + body) + "\n", linemap

    # -- emitting ---------------------------------------------------------------------------
    def _emit(self, code, where=None):
        if where is not None:
            self.linemap[len(self.lines)] = where
        self.lines.append("    " * self.indent + code)

    def _write(self, code, where=None):
        """Output to come: literal text is merged with its neighbours."""
        if where is None and self.pending and self.pending[-1][1] is None:
            self.pending[-1][0] += code
        else:
            self.pending.append([code, where])

    def _flush(self):
        parts, self.pending = self.pending, []
        parts = [(repr(code) if where is None else code, where) for code, where in parts]
        if len(parts) == 1:
            self._emit("_a(%s)" % parts[0][0], parts[0][1])
        elif parts:
            self._emit("_x((")
            for code, where in parts:
                self._emit("    %s," % code, where)
            self._emit("))")

    # -- nodes ------------------------------------------------------------------------------
    def _nodes(self, nodes, state, blocks):
        for node in nodes:
            state = getattr(self, "_" + node.kind)(node, state, blocks)
        return state

    def _text(self, node, state, blocks):
        if not node.text:
            return state
        try:
            state.feed(node.text)
        except _HtmlError as error:
            raise _Located(node, error, node.line + node.text.count("\n", 0, error.index))
        self._write(node.text)
        return state

    def _out(self, node, state, blocks):
        try:
            escaper, prefix = state.escaper_for_output()
        except _HtmlError as error:
            raise _Located(node, error)
        expr = node.expr
        if expr[0] == "const" and escaper != "_eu":     # known now: escaped now
            text = expr[1] if isinstance(expr[1], str) else str(expr[1])
            self._write(_escape_text(text))
            return state
        code = self._expr(expr, node)
        if escaper == "_eu":
            code = "%s, %r" % (code, prefix)
        self._write("%s(%s)" % (escaper, code), (node.shown, node.line, node.text))
        return state

    def _if(self, node, state, blocks):
        self._flush()
        ends = []
        for number, (expr, line, body) in enumerate(node.branches):
            self._emit("%s %s:" % ("if" if number == 0 else "elif", self._expr(expr, node, line)),
                       (node.shown, line, ""))
            ends.append(self._indented(body, state.copy(), blocks))
        if node.orelse is not None:
            self._emit("else:")
            ends.append(self._indented(node.orelse, state.copy(), blocks))
        else:
            ends.append(state)
        return self._merged(ends, node, "{% if %}")

    def _for(self, node, state, blocks):
        self._flush()
        depth = len(self.loops) + 1
        if depth > MAX_NESTED_LOOPS:
            raise _Located(node, _HtmlError("more than %d loops inside each other"
                                            % MAX_NESTED_LOOPS))
        frame = {"depth": depth, "targets": node.targets, "uses_loop": False}
        header_at = len(self.lines)     # the header is known once the body is: loop.* used?
        self.loops.append(frame)
        self.indent += 1
        if node.orelse is not None:
            self._emit("_f%d = False" % depth)
        end = self._nodes(node.body, state.copy(), blocks)
        self._flush()
        if len(self.lines) == header_at:
            self._emit("pass")
        self.indent -= 1
        self.loops.pop()
        after = self._merged([state, end], node, "the body of {% for %}")
        targets = ", ".join("v%d_%s" % (depth, name) for name in node.targets)
        iterable = self._expr(node.expr, node)
        if frame["uses_loop"]:
            header = ["_s%d = list(%s)" % (depth, iterable), "_n%d = len(_s%d)" % (depth, depth),
                      "for _i%d, %s in enumerate(_s%d):" % (depth, targets, depth)]
        else:
            header = ["for %s in %s:" % (targets, iterable)]
        if node.orelse is not None:
            header.insert(0, "_f%d = True" % depth)
        self._insert(header_at, header, (node.shown, node.line, ""))
        if node.orelse is not None:
            self._emit("if _f%d:" % depth)
            else_end = self._indented(node.orelse, state.copy(), blocks)
            after = self._merged([after, else_end], node, "{% for %}...{% else %}")
        return after

    def _include(self, node, state, blocks):
        if state.kind != "text":
            raise _Located(node, _HtmlError("{%% include %%} must be outside tags, not %s"
                                            % state.describe()))
        self._flush()
        scope = {}
        for frame in self.loops:      # the loop's names go along, as the includer sees them
            for name in frame["targets"]:
                scope[name] = "v%d_%s" % (frame["depth"], name)
        variables = "_v" if not scope else "{**_v, %s}" % ", ".join(
            "%r: %s" % (name, code) for name, code in sorted(scope.items()))
        self._emit("%s(%s, _o)" % (self.ident[node.name], variables), (node.shown, node.line, ""))
        return state

    def _block(self, node, state, blocks):
        return self._nodes(blocks.get(node.name, node).body, state, blocks)

    # -- helpers ----------------------------------------------------------------------------
    def _indented(self, nodes, state, blocks):
        self.indent += 1
        start = len(self.lines)
        end = self._nodes(nodes, state, blocks)
        self._flush()
        if len(self.lines) == start:
            self._emit("pass")
        self.indent -= 1
        return end

    def _insert(self, at, lines, where):
        """Lines put before ``at`` (a loop's header, known once its body is compiled): the
        line map moves with them."""
        shift = len(lines)
        self.linemap = {(number + shift if number >= at else number): value
                        for number, value in self.linemap.items()}
        for offset, code in enumerate(lines):
            self.linemap[at + offset] = where
        indent = "    " * self.indent
        self.lines[at:at] = [indent + code for code in lines]

    def _merged(self, states, node, what):
        try:
            return _merge(states, what)
        except _HtmlError as error:
            raise _Located(node, error, node.end_line)

    def _expr(self, expr, node, line=None):
        kind = expr[0]
        if kind == "const":
            return repr(expr[1])
        if kind == "not":
            return "(not %s)" % self._expr(expr[1], node, line)
        if kind in ("and", "or", "==", "!="):
            return "(%s %s %s)" % (self._expr(expr[1], node, line), kind,
                                   self._expr(expr[2], node, line))
        return self._path(expr[1], expr[2], node, line)

    def _path(self, names, text, node, line):
        first = names[0]
        if first == "loop":
            return self._loop_field(names, text, node, line)
        code = None
        for frame in reversed(self.loops):
            if first in frame["targets"]:
                code = "v%d_%s" % (frame["depth"], first)
                break
        if code is None:
            self.names.add(first)
            code = "n_" + first
        for number, key in enumerate(names[1:], 2):
            key = int(key) if key.isdigit() else key
            code = "_dot(%s, %r, %r)" % (code, key, ".".join(names[:number]))
        return code

    def _loop_field(self, names, text, node, line):
        if not self.loops:
            raise _Located(node, _HtmlError("'loop' is only known inside {% for %}"), line)
        if len(names) != 2 or names[1] not in _LOOP_FIELDS:
            raise _Located(node, _HtmlError("%r: loop has only %s" % (
                text, ", ".join(_LOOP_FIELDS))), line)
        frame = self.loops[-1]
        frame["uses_loop"] = True
        depth = frame["depth"]
        return {"index": "(_i%d + 1)", "index0": "_i%d", "first": "(_i%d == 0)",
                "last": "(_i%d == _n%d - 1)", "length": "_n%d"}[names[1]].replace(
                    "%d", str(depth))


class _Located(Exception):
    """A compile error with its place; compile() turns it into the TemplateError."""

    def __init__(self, node, error, line=None):
        super().__init__(str(error))
        self.shown, self.line = node.shown, node.line if line is None else line
