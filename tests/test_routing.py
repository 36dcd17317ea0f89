"""Routes as data, the handler contract, and the one-way dependency rule."""
import ast
import http.client
import os
import re
import sys

import pytest

from conftest import ROOT, onebox, request
from handlers._core import HTTPError, Response
from onebox import routing
from onebox.codec import decode_path


def handler_named(name):
    def handler(request):
        return {"route": name, "params": request.params}
    return handler


def make_router(*patterns, method="GET"):
    return onebox.Router([(method, pattern, handler_named(pattern), "test") for pattern in patterns])


def matched(router, path, method="GET"):
    route, params, allowed = router.match(method, decode_path(path)[1])
    return (route.pattern, params) if route else allowed


def test_literal_beats_wildcard_beats_rest():
    router = make_router("/notes/new", "/notes/{id}", "/notes/{rest...}", "/")
    assert matched(router, "/notes/new") == ("/notes/new", {})
    assert matched(router, "/notes/42") == ("/notes/{id}", {"id": "42"})
    assert matched(router, "/notes/42/edit") == ("/notes/{rest...}", {"rest": "42/edit"})
    assert matched(router, "/notes/") == ("/notes/{rest...}", {"rest": ""})
    assert matched(router, "/") == ("/", {})
    assert matched(router, "/other") is None


def test_wildcard_matches_found_again_are_the_same_and_fresh():
    """Router._found remembers wildcard matches: a second look-up gives the same route and
    values in a new dict (a handler may change its params), a route added later outranks a
    remembered match, and the table stays bounded, long paths never entering it."""
    router = make_router("/notes/{id}", "/notes/{rest...}")
    first = router.match("GET", ["notes", "42"])
    first[1]["id"] = "changed by a handler"
    again = router.match("GET", ["notes", "42"])
    assert (again[0].pattern, again[1]) == ("/notes/{id}", {"id": "42"})
    assert ("GET", ("notes", "42")) in router._found
    router.add("GET", "/notes/42", handler_named("/notes/42"))
    assert matched(router, "/notes/42") == ("/notes/42", {})
    assert router.match("HEAD", ["notes", "7"])[0].pattern == "/notes/{id}"
    assert router.match("POST", ["notes", "7"])[:2] == (None, None)
    for number in range(100, 110 + routing.FOUND_ENTRIES):
        assert router.match("GET", ["notes", str(number)])[1] == {"id": str(number)}
    assert 0 < len(router._found) <= routing.FOUND_ENTRIES
    long_id = "x" * routing.FOUND_PATH_CHARS
    assert router.match("GET", ["notes", long_id])[1] == {"id": long_id}
    assert ("GET", ("notes", long_id)) not in router._found
    many = ["notes"] + [""] * routing.FOUND_PATH_CHARS
    assert router.match("GET", many)[0].pattern == "/notes/{rest...}"
    assert ("GET", tuple(many)) not in router._found


def test_backtracks_from_a_literal_dead_end():
    router = make_router("/a/b/c", "/a/{x}/d")
    assert matched(router, "/a/b/d") == ("/a/{x}/d", {"x": "b"})


def test_wildcard_can_hold_an_encoded_slash():
    router = make_router("/files/{name}")
    assert matched(router, "/files/a%2Fb") == ("/files/{name}", {"name": "a/b"})


def test_wrong_method_reports_allowed_methods():
    router = onebox.Router([("GET", "/x", handler_named("g"), "t"),
                            ("POST", "/x", handler_named("p"), "t")])
    assert matched(router, "/x", "DELETE") == "GET, HEAD, POST, OPTIONS"
    assert matched(router, "/x", "HEAD")[0] == "/x"  # GET answers HEAD


@pytest.mark.parametrize("first, second", [("/notes/{id}", "/notes/{key}"),
                                           ("/a/{rest...}", "/a/{tail...}"),
                                           ("/same", "/same")])
def test_conflicting_routes_name_both(first, second):
    with pytest.raises(onebox.RouteError) as error:
        onebox.Router([("GET", first, handler_named(1), "handlers/one.py"),
                       ("GET", second, handler_named(2), "handlers/two.py")])
    message = str(error.value)
    assert first in message and second in message
    assert "handlers/one.py" in message and "handlers/two.py" in message


@pytest.mark.parametrize("pattern", ["no-slash", "/a/{rest...}/b", "/a/x{y}", "/{1bad}",
                                     "/{x}/{x}"])
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(onebox.RouteError):
        make_router(pattern)


ROUTES_FOR_ALLOW = [("GET", "/r"), ("POST", "/w"), ("DELETE", "/w"), ("PUT", "/all"),
                    ("PATCH", "/all"), ("GET", "/all"), ("OPTIONS", "/all"), ("HEAD", "/h")]


@pytest.mark.parametrize("method, path, expected", [
    ("GET", "/r", "/r"),
    ("HEAD", "/r", "/r"),                                  # GET answers HEAD
    ("POST", "/r", "GET, HEAD, OPTIONS"),                  # OPTIONS is always allowed
    ("OPTIONS", "/r", "GET, HEAD, OPTIONS"),               # unless a route takes it
    ("GET", "/w", "POST, DELETE, OPTIONS"),                # no GET: no HEAD either
    ("HEAD", "/w", "POST, DELETE, OPTIONS"),
    ("PATCH", "/w", "POST, DELETE, OPTIONS"),
    ("OPTIONS", "/all", "/all"),
    ("DELETE", "/all", "GET, HEAD, PUT, PATCH, OPTIONS"),  # in METHODS order
    ("HEAD", "/h", "/h"),
    ("GET", "/h", "HEAD, OPTIONS"),                        # HEAD does not answer GET
    ("GET", "/nowhere", None),                             # no route at all: not 405
], ids=lambda value: repr(value))
def test_methods_and_allow_lists(method, path, expected):
    router = onebox.Router([(m, p, handler_named(m + p), "t") for m, p in ROUTES_FOR_ALLOW])
    result = matched(router, path, method)          # (pattern, params), or the Allow list
    assert (result[0] if isinstance(result, tuple) else result) == expected


def test_an_explicit_head_route_beats_get():
    router = onebox.Router([("GET", "/x", handler_named("get"), "t"),
                            ("HEAD", "/x", handler_named("head"), "t")])
    route, _, _ = router.match("HEAD", decode_path("/x")[1])
    assert route.method == "HEAD"


@pytest.mark.parametrize("path, expected", [
    ("/a/b", ("/a/b", {})),                               # a literal first...
    ("/a/c", ("/a/{x}", {"x": "c"})),                     # ...then {x}...
    ("/a/c/d/e", ("/a/{rest...}", {"rest": "c/d/e"})),    # ...then {rest...}
    ("/a/b/d/e", ("/a/{rest...}", {"rest": "b/d/e"})),    # backtracking from the literal
    ("/a", None),                                         # {rest...} needs the slash
    ("/a/", ("/a/{rest...}", {"rest": ""})),              # {x} never matches an empty segment
    ("/u/1/n/2", ("/u/{user}/n/{note}", {"user": "1", "note": "2"})),
    ("/u/1/n/", None),
    ("/u/%20/n/caf%C3%A9", ("/u/{user}/n/{note}", {"user": " ", "note": "caf\xe9"})),
], ids=lambda value: repr(value))
def test_precedence_and_parameters(path, expected):
    router = make_router("/a/b", "/a/{x}", "/a/{rest...}", "/u/{user}/n/{note}")
    assert matched(router, path) == expected


def test_the_most_specific_node_gives_the_allow_list():
    router = onebox.Router([("POST", "/a/b", handler_named("p"), "t"),
                            ("GET", "/a/{x}", handler_named("g"), "t")])
    assert matched(router, "/a/b", "GET") == ("/a/{x}", {"x": "b"})   # GET falls to {x}
    assert matched(router, "/a/b", "DELETE") == "POST, OPTIONS"


def test_same_shape_with_other_methods_or_names_is_no_conflict():
    router = onebox.Router([("GET", "/n/{id}", handler_named("g"), "t"),
                            ("PUT", "/n/{key}", handler_named("p"), "t"),
                            ("GET", "/n/{id}/x", handler_named("x"), "t")])
    assert matched(router, "/n/7", "PUT") == ("/n/{key}", {"key": "7"})
    assert matched(router, "/n/7", "GET") == ("/n/{id}", {"id": "7"})


@pytest.mark.parametrize("pattern, message", [
    ("/a/{}", "/a/{}: {} is not a valid name"),
    ("/a/{x-y}", "{x-y} is not a valid name"),
    ("/{x}/{x...}", "wildcard {x} appears twice"),
    ("/{rest...}/x", "{rest...} must be the last segment"),
    ("/a{b}", "a wildcard must be a whole segment"),
    ("/a/{b", "a wildcard must be a whole segment"),
    ("a/b", "pattern 'a/b' must start with /"),
    ("", "pattern '' must start with /"),
    ("/{...}", "is not a valid name"),
    ("/{1bad...}", "is not a valid name"),
], ids=lambda value: repr(value))
def test_bad_pattern_messages_name_the_origin_and_the_rule(pattern, message):
    try:
        onebox.Router([("GET", pattern, handler_named(pattern), "handlers/area.py")])
    except onebox.RouteError as error:
        assert str(error).startswith("handlers/area.py: ") and message in str(error)
    else:
        raise AssertionError("%r was accepted" % pattern)


def test_an_unknown_method_names_the_origin():
    with pytest.raises(onebox.RouteError, match="^handlers/area.py: FETCH /x: method must be "
                                               "one of GET, HEAD, POST"):
        onebox.Router([("FETCH", "/x", handler_named("x"), "handlers/area.py")])


def test_unknown_method_in_routes_is_refused():
    with pytest.raises(onebox.RouteError):
        make_router("/x", method="FETCH")


def test_area_without_routes_table_is_refused(tmp_path):
    package = tmp_path / "areas"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "broken.py").write_text("X = 1\n")
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(onebox.RouteError, match="broken.py: no ROUTES table"):
            onebox.load_routes(str(package), "areas")
    finally:
        sys.path.remove(str(tmp_path))


# --- the handler contract over HTTP ---------------------------------------------------------

def crash(request):
    raise KeyError("secret-internal-detail")


def teapot(request):
    raise HTTPError(418, "short and stout", [("X-Pot", "1")])


def bad_header(request):
    return Response(b"x", 200, [("X-Bad", "a\r\nSet-Cookie: evil=1")])


def returns_none(request):
    return None


def returns_text(request):
    return "plain"


def streams(request):
    response = Response(status=200, content_type="text/plain")
    response.stream = (b"part%d;" % n for n in range(3))
    return response


def test_handler_contract(start_server):
    server = start_server(routes=[("GET", "/t/crash", crash), ("GET", "/t/teapot", teapot),
                                  ("GET", "/t/bad-header", bad_header),
                                  ("DELETE", "/t/none", returns_none),
                                  ("GET", "/t/text", returns_text), ("GET", "/t/stream", streams)])
    status, _, body = request(server, "GET", "/t/crash")
    assert (status, body) == (500, b"internal server error\n")
    assert "secret-internal-detail" in server.error_text()  # traceback in the log only
    assert "Traceback" in server.error_text()
    status, headers, body = request(server, "GET", "/t/teapot")
    assert (status, body, headers["x-pot"]) == (418, b"short and stout\n", "1")
    status, headers, _ = request(server, "GET", "/t/bad-header")
    assert status == 500 and "set-cookie" not in headers
    assert request(server, "DELETE", "/t/none")[:1] == (204,)
    assert request(server, "GET", "/t/text")[2] == b"plain"
    status, headers, body = request(server, "GET", "/t/stream")
    assert (status, headers.get("transfer-encoding"), body) == (200, "chunked", b"part0;part1;part2;")
    assert request(server, "GET", "/hello")[0] == 200  # the server is fine afterwards


def bad_status(request):
    return Response(b"x", "200 OK")


def str_body(request):
    return Response("not bytes", 200)


def bad_name(request):
    return Response(b"x", 200, [("X Bad", "1")])


@pytest.mark.parametrize("handler, problem", [
    (bad_header, "'X-Bad' has a bad name or value"), (bad_status, "status '200 OK'"),
    (str_body, "body is str"), (bad_name, "'X Bad' has a bad name or value")])
def test_a_bad_response_is_a_500_naming_the_handler(start_server, handler, problem):
    server = start_server(routes=[("GET", "/t/bad", handler)])
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.request("GET", "/t/bad")
    response = connection.getresponse()
    assert (response.status, response.read()) == (500, b"internal server error\n")
    connection.request("GET", "/hello")               # nothing half-sent: the connection goes on
    assert connection.getresponse().read() == b"hello, world\n"
    connection.close()
    log = server.error_text()
    assert "GET /t/bad: handler test_routing.%s raised" % handler.__name__ in log
    assert problem in log and "connection error" not in log


def list_value(request):
    return Response(b"x", 200, [("X-List", ["a"])])


def test_a_header_value_of_any_type_is_answered_not_dropped_at_the_write(start_server):
    """A value is rendered with str(), as an int is; an unhashable one (a list) once made the
    write raise, and the client got no response at all."""
    server = start_server(routes=[("GET", "/t/list", list_value)])
    status, headers, body = request(server, "GET", "/t/list")
    assert (status, headers["x-list"], body) == (200, "['a']", b"x")


def test_the_error_log_escapes_what_a_client_sent(start_server):
    server = start_server(routes=[("GET", "/t/crash/{rest...}", crash)])
    forged = "/t/crash/x%0A2026-01-01T00:00:00%20onebox:%20forged%0D%1B[31m"
    assert request(server, "GET", forged)[0] == 500
    log = server.error_text()
    assert "x\\x0A2026-01-01T00:00:00 onebox: forged\\x0D\\x1B[31m: handler" in log
    lines = log.splitlines()
    assert not any(line.startswith("2026-01-01T00:00:00") for line in lines)
    entries = [line for line in lines if not line.startswith("    ") and "/t/crash" in line]
    assert len(entries) == 1 and entries[0].endswith("raised")   # the traceback is indented


def test_infrastructure_errors_map_to_their_declared_status(start_server):
    class StorageFull(Exception):
        http_status = 503
        public_message = "storage unavailable"

    def write(request):
        raise StorageFull("disk /dev/sda1 is full")

    server = start_server(routes=[("POST", "/t/write", write)])
    status, _, body = request(server, "POST", "/t/write")
    assert (status, body) == (503, b"storage unavailable\n")
    assert "/dev/sda1" in server.error_text()


# --- dependency rule ------------------------------------------------------------------------

def imported_modules(path):
    """Every module a file imports; ``from a import b`` gives both "a" and "a.b" (b may be a
    module: ``from handlers import notes``)."""
    with open(path, encoding="utf-8") as source:
        tree = ast.parse(source.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            module = absolute(("." * node.level) + (node.module or ""), path)
            yield module
            for alias in node.names:
                yield module + "." + alias.name
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            if node.args and isinstance(node.args[0], ast.Constant):
                yield node.args[0].value


# The contract: what an area may import. Everything else in handlers/ is an area. The contract is an
# interface and obeys the same rule as the areas (the standard library and itself, never onebox):
# its implementations live in onebox/ and the runtime binds them at start-up (handlers/_context.py).
CONTRACT = {"handlers._core", "handlers._state", "handlers._limits", "handlers._cache",
            "handlers._forms", "handlers._context", "handlers._pages", "handlers._sessions",
            "handlers._events"}


def is_stdlib(name):
    """Whether a top-level module name is the standard library's (works on 3.9, which has no
    sys.stdlib_module_names): built in, frozen, or found under the stdlib directory."""
    import importlib.util
    import sysconfig
    if name in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin in (None, "frozen"):
        return spec is not None
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    origin = os.path.realpath(spec.origin)
    return origin.startswith(stdlib + os.sep) and "site-packages" not in origin


def python_files(folder):
    return sorted(os.path.join(ROOT, folder, f) for f in os.listdir(os.path.join(ROOT, folder))
                  if f.endswith(".py"))


def absolute(module, path):
    """'._x' in handlers/notes.py -> 'handlers._x' (relative imports, should anyone write one)."""
    if not module.startswith("."):
        return module
    package = os.path.basename(os.path.dirname(path))
    return package + "." + module.lstrip(".") if module.strip(".") else package


def forbidden_in_handlers(path):
    """What a file in handlers/ imports beyond the contract and the standard library."""
    bad = []
    for module in imported_modules(path):
        parts = module.split(".")
        if parts[0] not in ("handlers", "onebox", "server"):
            if not is_stdlib(parts[0]):
                bad.append(module)
        elif module != "handlers" and ".".join(parts[:2]) not in CONTRACT:
            bad.append(module)
    return bad


def forbidden_in_runtime(path):
    """What server.py or onebox/ imports beyond the stdlib, the contract, the areas (to route
    to them) and onebox; and any import of server."""
    return [module for module in imported_modules(path)
            if module.split(".")[0] == "server"
            or not (module.split(".")[0] in ("handlers", "onebox") or is_stdlib(module.split(".")[0]))]


def test_areas_and_the_contract_import_only_the_contract_and_the_standard_library():
    for path in python_files("handlers"):
        assert forbidden_in_handlers(path) == [], (
            "%s may import only the contract (%s) and the standard library"
            % (path, ", ".join(sorted(CONTRACT))))


def test_the_runtime_imports_the_standard_library_the_contract_and_itself_never_server():
    for path in [os.path.join(ROOT, "server.py")] + python_files("onebox"):
        assert forbidden_in_runtime(path) == [], path


def test_the_dependency_tests_catch_what_they_guard(tmp_path):
    """The checks above are only as good as imported_modules: each forbidden form is caught."""
    area = tmp_path / "handlers" / "area.py"
    area.parent.mkdir()
    area.write_text("import json\nimport server\nfrom handlers import notes\n"
                    "from handlers._core import state\nfrom onebox.guard import Guard\n"
                    "from . import hello\nimport pytest\nx = __import__('onebox')\n")
    assert forbidden_in_handlers(str(area)) == [
        "server", "handlers.notes", "onebox.guard", "onebox.guard.Guard", "handlers.hello",
        "pytest", "onebox"]
    runtime = tmp_path / "runtime.py"
    runtime.write_text("import server\nfrom handlers import notes\nimport pytest\n")
    assert forbidden_in_runtime(str(runtime)) == ["server", "pytest"]


def runtime_modules():
    return [os.path.basename(path) for path in python_files("onebox")
            if not path.endswith("__init__.py")]


def test_each_runtime_module_says_what_it_imports():
    for name in runtime_modules():
        with open(os.path.join(ROOT, "onebox", name), encoding="utf-8") as source:
            docstring = ast.get_docstring(ast.parse(source.read())) or ""
        assert "mports" in docstring, "onebox/%s: its docstring must say what it imports" % name


def test_the_readme_and_server_py_map_every_runtime_module():
    """The README's directory table and server.py's "Where things are" name each module of
    onebox/, and name no module that is not there."""
    table = readme().split("## What is in the directory", 1)[1].split("\n\n", 2)[1]
    in_table = set(re.findall(r"^\| `onebox/(\w+\.py)` \|", table, re.M))
    with open(os.path.join(ROOT, "server.py"), encoding="utf-8") as source:
        where = ast.get_docstring(ast.parse(source.read())).split("Where things are", 1)[1]
    in_server_py = set(re.findall(r"^``onebox/(\w+\.py)``", where.split("\n\n", 1)[0], re.M))
    assert in_table == set(runtime_modules())
    assert in_server_py == set(runtime_modules())


# --- what the README and docs/areas.md promise area authors ----------------------------------

def readme(name="README.md"):
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


def test_every_name_the_docs_document_for_areas_exists():
    import importlib
    table = readme("docs/areas.md").split("The whole contract", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `(handlers\.\w+)` \| (.+) \|$", table, re.M)
    # _limits and _context are reached through _core
    assert {module for module, _ in rows} == CONTRACT - {"handlers._limits", "handlers._context"}
    for module, names in rows:
        loaded = importlib.import_module(module)
        for name in re.findall(r"`(\w+)`", names):
            assert hasattr(loaded, name), "docs/areas.md documents %s.%s" % (module, name)


def test_the_docs_example_of_testing_an_area_runs(tmp_path):
    source = readme("docs/areas.md").split("To test an area", 1)[1].split("```python\n", 1)[1]
    namespace = {}
    exec(compile(source.split("```")[0], "docs/areas.md", "exec"), namespace)
    namespace["test_count_visit"](tmp_path)   # asserts visits 1 then 2: incr returns the value
