"""Routes as data, the handler contract, and the one-way dependency rule."""
import ast
import os

import pytest

from conftest import ROOT, onebox, request
from handlers._core import HTTPError, Response


def handler_named(name):
    def handler(request):
        return {"route": name, "params": request.params}
    return handler


def make_router(*patterns, method="GET"):
    return onebox.Router([(method, pattern, handler_named(pattern), "test") for pattern in patterns])


def matched(router, path, method="GET"):
    route, params, allowed = router.match(method, onebox.decode_path(path)[1])
    return (route.pattern, params) if route else allowed


def test_literal_beats_wildcard_beats_rest():
    router = make_router("/notes/new", "/notes/{id}", "/notes/{rest...}", "/")
    assert matched(router, "/notes/new") == ("/notes/new", {})
    assert matched(router, "/notes/42") == ("/notes/{id}", {"id": "42"})
    assert matched(router, "/notes/42/edit") == ("/notes/{rest...}", {"rest": "42/edit"})
    assert matched(router, "/notes/") == ("/notes/{rest...}", {"rest": ""})
    assert matched(router, "/") == ("/", {})
    assert matched(router, "/other") is None


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
    with open(path, encoding="utf-8") as source:
        tree = ast.parse(source.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            if node.args and isinstance(node.args[0], ast.Constant):
                yield node.args[0].value


def test_handlers_never_import_server_and_areas_import_only_the_contract():
    handlers_dir = os.path.join(ROOT, "handlers")
    for filename in sorted(os.listdir(handlers_dir)):
        if not filename.endswith(".py"):
            continue
        for module in imported_modules(os.path.join(handlers_dir, filename)):
            top = module.split(".")[0]
            assert top != "server", "%s imports server" % filename
            if module.startswith("handlers") or module.startswith("."):
                last = module.rsplit(".", 1)[-1]
                assert module in ("handlers", ".") or last.startswith("_"), (
                    "handlers/%s imports %s: areas may import only handlers/_*.py"
                    % (filename, module))


def test_runtime_imports_only_the_standard_library():
    import sys
    stdlib = getattr(sys, "stdlib_module_names", None)
    if stdlib is None:
        pytest.skip("sys.stdlib_module_names needs Python 3.10")
    paths = [os.path.join(ROOT, "server.py")] + [
        os.path.join(ROOT, "handlers", f) for f in os.listdir(os.path.join(ROOT, "handlers"))
        if f.endswith(".py")]
    for path in paths:
        for module in imported_modules(path):
            top = module.split(".")[0]
            assert top in stdlib or top in ("handlers", ""), "%s imports %s" % (path, module)
