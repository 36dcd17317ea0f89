"""Routing: the areas' ROUTES tables, checked at start-up and matched per request.

Owns ``load_routes`` (import every area module in handlers/ and collect its ROUTES), ``Router``
(a tree of path segments, built once and then only read, so workers share it without a lock)
and ``NotRouted``, the 404 of a request that no route matched. Pure apart from the imports of
the area modules; never imports the engine or ``server``.
"""
import collections
import importlib
import os

from handlers._core import HTTPError, Response, json_response

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Area modules in handlers/ end with ROUTES = [(method, pattern, handler), ...]. Patterns are
# "/literal/{name}/more" with an optional final "{rest...}". A literal segment beats {name},
# which beats {rest...}. Two routes with the same method and shape stop start-up.

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
FOUND_ENTRIES = 1024     # wildcard matches remembered (Router._found)
FOUND_PATH_CHARS = 256   # ... for paths this short (characters and slashes)


class RouteError(Exception):
    """A bad or conflicting ROUTES table; start-up stops with this message."""


class NotRouted(HTTPError):
    """The 404 of a request that no route and no page answered: the only kind of 404 that
    scanner detection counts (a handler's "no such note" is ordinary use)."""


Route = collections.namedtuple("Route", "method pattern handler names origin")


class _RouteNode:
    __slots__ = ("literals", "param", "rest", "routes")

    def __init__(self):
        self.literals = {}
        self.param = None   # child node for a {name} segment
        self.rest = None    # node holding routes whose pattern ends in {rest...}
        self.routes = {}    # method -> Route ending at this node


def load_routes(package_dir=os.path.join(ROOT, "handlers"), package="handlers"):
    """Import every area module (handlers/*.py not starting with "_") and collect ROUTES."""
    rows = []
    for filename in sorted(os.listdir(package_dir)):
        if not filename.endswith(".py") or filename.startswith("_"):
            continue
        origin = "handlers/" + filename
        module = importlib.import_module("%s.%s" % (package, filename[:-3]))
        table = getattr(module, "ROUTES", None)
        if not isinstance(table, (list, tuple)):
            raise RouteError("%s: no ROUTES table; end the module with ROUTES = [(method, "
                             "pattern, handler), ...]" % origin)
        for row in table:
            if (not isinstance(row, tuple) or len(row) != 3 or not callable(row[2])
                    or not isinstance(row[1], str)):
                raise RouteError("%s: bad ROUTES row %r; expected (method, pattern, handler)"
                                 % (origin, row))
            rows.append(row + (origin,))
    return rows


class Router:
    """Matches (method, path segments) to a Route; built once, read by every worker."""

    def __init__(self, rows):
        self.root = _RouteNode()
        # the routes of each wildcard-free pattern, by its segments: most requests match one
        # of these, found with one look-up instead of a walk (a generator) down the tree
        # (issue 23: ~90 opcodes and a generator a request, bench/ab_static.py --instructions)
        self.exact = {}
        # The wildcard routes found lately: (method, segments) -> (route, its params).
        # The walk below costs ~110 opcodes for /hello/{name} against ~15 for this look-up
        # (issue 23: bench/opcodes.py ... json), and APIs ask for the same few paths again
        # and again. Bounded: only short paths, and the table starts afresh when full, so a
        # scanner's random paths cost it a walk and a store each, and memory stays under
        # ~FOUND_ENTRIES * FOUND_PATH_CHARS bytes. Dict reads and writes need no lock.
        self._found = {}
        for method, pattern, handler, origin in rows:
            self.add(method, pattern, handler, origin)

    def add(self, method, pattern, handler, origin="?"):
        if method not in METHODS:
            raise RouteError("%s: %s %s: method must be one of %s"
                             % (origin, method, pattern, ", ".join(METHODS)))
        node, names = self.root, []
        for segment, kind in _pattern_segments(pattern, origin):
            if kind == "literal":
                node = node.literals.setdefault(segment, _RouteNode())
            elif kind == "param":
                node.param = node.param or _RouteNode()
                node = node.param
            else:
                node.rest = node.rest or _RouteNode()
                node = node.rest
            if kind != "literal":
                if segment in names:
                    raise RouteError("%s: %s: wildcard {%s} appears twice"
                                     % (origin, pattern, segment))
                names.append(segment)
        self._found.clear()   # a new route may outrank one found before
        existing = node.routes.get(method)
        if existing is not None:
            raise RouteError("conflicting routes: %s %s (%s) and %s %s (%s) match the same "
                             "requests; remove or rename one"
                             % (existing.method, existing.pattern, existing.origin,
                                method, pattern, origin))
        node.routes[method] = Route(method, pattern, handler, tuple(names), origin)
        if not names:
            self.exact[tuple(part for part, _ in _pattern_segments(pattern, origin))] = \
                node.routes

    def match(self, method, segments):
        """Return (route, params, None), or (None, None, allowed methods), or (None, None, None)."""
        shape = tuple(segments)
        routes = self.exact.get(shape)
        if routes is not None:   # the literal path: nothing outranks it, if it has the method
            route = routes.get(method)
            if route is None and method == "HEAD":
                route = routes.get("GET")
            if route is not None:
                return route, {}, None
        root = self.root
        if (segments and segments[0] not in root.literals and root.param is None
                and root.rest is None):
            return None, None, None   # no route starts so (a static page): no walk
        key = (method, shape)
        found = self._found.get(key)
        if found is not None:   # a copy: a handler may change its request's params
            return found[0], found[1].copy(), None
        found = self._find(root, segments, 0, method, ())
        if found is not None:
            route, values = found
            params = dict(zip(route.names, values))
            if sum(map(len, segments)) + len(segments) <= FOUND_PATH_CHARS:
                if len(self._found) >= FOUND_ENTRIES:
                    self._found.clear()
                self._found[key] = (route, params)
            return route, params.copy(), None
        for node, _ in self._walk(root, segments, 0, ()):   # none has the method: 405 with
            return None, None, _allowed_methods(node.routes)   # what the best match has
        return None, None, None

    def _find(self, node, segments, index, method, values):
        """The best route for ``method`` below ``node`` and the wildcards' values, or None:
        depth first, a literal segment before {name}, {name} before {rest...}. Plain
        recursion that stops at the first: the generator walk (``_walk``, still what a 405
        lists the methods from) cost a generator frame a level, ~1,500 instructions for
        /hello/{name} (issue 23)."""
        if index == len(segments):
            routes = node.routes
            route = routes.get(method)
            if route is None and method == "HEAD":
                route = routes.get("GET")
            return None if route is None else (route, values)
        segment = segments[index]
        child = node.literals.get(segment)
        if child is not None:
            found = self._find(child, segments, index + 1, method, values)
            if found is not None:
                return found
        if node.param is not None and segment:
            found = self._find(node.param, segments, index + 1, method, values + (segment,))
            if found is not None:
                return found
        rest = node.rest
        if rest is not None and rest.routes:
            return self._find(rest, (), 0, method, values + ("/".join(segments[index:]),))
        return None

    def _walk(self, node, segments, index, values):
        """Every node whose routes match ``segments``, best first (see ``_find``)."""
        if index == len(segments):
            if node.routes:
                yield node, values
            return
        segment = segments[index]
        child = node.literals.get(segment)
        if child is not None:
            yield from self._walk(child, segments, index + 1, values)
        if node.param is not None and segment:
            yield from self._walk(node.param, segments, index + 1, values + (segment,))
        if node.rest is not None and node.rest.routes:
            yield node.rest, values + ("/".join(segments[index:]),)


def _pattern_segments(pattern, origin):
    if not pattern.startswith("/"):
        raise RouteError("%s: pattern %r must start with /" % (origin, pattern))
    parts = pattern[1:].split("/")
    for position, part in enumerate(parts):
        if part.startswith("{") and part.endswith("}"):
            name = part[1:-1]
            if name.endswith("..."):
                if not name[:-3].isidentifier():
                    raise RouteError("%s: %s: {%s} is not a valid name" % (origin, pattern, name))
                if position != len(parts) - 1:
                    raise RouteError("%s: %s: {%s} must be the last segment"
                                     % (origin, pattern, name))
                yield name[:-3], "rest"
                continue
            if not name.isidentifier():
                raise RouteError("%s: %s: {%s} is not a valid name" % (origin, pattern, name))
            yield name, "param"
        elif "{" in part or "}" in part:
            raise RouteError("%s: %s: a wildcard must be a whole segment" % (origin, pattern))
        else:
            yield part, "literal"


def _allowed_methods(routes):
    methods = set(routes)
    if "GET" in methods:
        methods.add("HEAD")
    methods.add("OPTIONS")
    return ", ".join(m for m in METHODS if m in methods)


def to_response(result):
    """A handler's return value as a Response (the shortcuts of handlers/_core.py)."""
    if isinstance(result, Response):
        return result
    if result is None:
        return Response(b"", 204)
    if isinstance(result, (dict, list)):
        return json_response(result)
    if isinstance(result, str):
        return Response(result.encode("utf-8"), 200, None, "text/plain; charset=utf-8")
    if isinstance(result, (bytes, bytearray)):
        return Response(bytes(result), 200, None, "application/octet-stream")
    raise TypeError("handler returned %s; expected a Response" % type(result).__name__)
