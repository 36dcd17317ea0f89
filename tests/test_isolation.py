"""Two servers in one process share nothing: each owns its store, its response cache and its
named limiters, and a thread reaches only the server it is bound to (handlers/_context.py).

Issue 11, item 4: the process-wide ``state`` proxy was bound to whichever server was built last,
so a note POSTed to server A was stored in server B's data directory, and once B stopped the same
POST to A answered 500.

The rule that makes this possible (issue 20; docs/design.md, "The contract and the runtime"): the
contract, ``handlers/_*.py``, is an interface. It imports the standard library and itself, never
``onebox``; the implementations (the store, the response cache, the limiters' buckets) live in the
runtime, which builds one set per server and binds it to that server's worker threads at start-up.
tests/test_routing.py checks every import statement; the last tests here check what loads.
"""
import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, request
from handlers._cache import cached, invalidate
from handlers import _context
from handlers._core import carry_context, limiter, rate_limit, state, text_response
from handlers._state import StateStore
from onebox.cache import ResponseCache
from onebox.forms import read_form
from onebox.jsonbody import read_json
from onebox.limits import LimiterRegistry
from onebox.store import Store
from test_routing import forbidden_in_handlers

JSON = {"Content-Type": "application/json"}


def post_note(server, text):
    return request(server, "POST", "/api/notes", json.dumps({"text": text}), JSON)


def listed_texts(server):
    status, _, body = request(server, "GET", "/api/notes")
    assert status == 200
    return [note["text"] for note in json.loads(body)["notes"]]


def bytes_on_disk(server):
    """Everything the server's store has written to its data directory."""
    folder, data = server.settings.data_dir, b""
    for name in sorted(os.listdir(folder)):
        if os.path.isfile(os.path.join(folder, name)):
            with open(os.path.join(folder, name), "rb") as written:
                data += written.read()
    return data


def test_a_note_posted_to_one_server_lives_in_its_data_and_survives_the_other_stopping(
        start_server):
    first, second = start_server(), start_server()
    assert post_note(first, "kept by the first server")[0] == 201
    assert listed_texts(first) == ["kept by the first server"]
    assert listed_texts(second) == []
    assert request(second, "GET", "/api/notes/1")[0] == 404
    assert [value["text"] for _, value in first.store.items("notes/item/")] == [
        "kept by the first server"]
    assert second.store.items("notes/item/") == []
    assert b"kept by the first server" in bytes_on_disk(first)
    assert b"kept by the first server" not in bytes_on_disk(second)

    second.shutdown()
    second.server_close()
    assert post_note(first, "after the second stopped")[0] == 201
    assert listed_texts(first) == ["kept by the first server", "after the second stopped"]
    assert b"after the second stopped" in bytes_on_disk(first)
    assert "Traceback" not in first.error_text()


class HostEcho:
    """One handler object for both servers, as an area module is one module: it answers with
    the Host the request was sent to, which names the server's port."""

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, request):
        with self.lock:
            self.calls += 1
        return text_response("computed for %s\n" % request.headers["host"])


def test_cached_responses_and_invalidations_stay_in_their_own_server(start_server):
    echo = HostEcho()
    wrapped = cached(ttl_s=60)(echo)

    def changed(request):
        invalidate("/t/who")
        return None

    routes = [("GET", "/t/who", wrapped), ("POST", "/t/who", changed)]
    first, second = start_server(routes=routes), start_server(routes=routes)
    for server in (first, second, first, second):
        body = request(server, "GET", "/t/who")[2]
        assert body == b"computed for 127.0.0.1:%d\n" % server.port
    assert echo.calls == 2                       # each server computed once, then hit its own
    assert first.context.responses.stats()["entries"] == 1
    assert second.context.responses.stats()["hits"] == 1

    assert request(first, "POST", "/t/who")[0] == 204   # drops the first server's entry only
    request(first, "GET", "/t/who")
    request(second, "GET", "/t/who")
    assert echo.calls == 3
    assert second.context.responses.stats()["invalidated"] == 0


# Made at import time, as an area module makes its limiters: one object, a bucket per server.
PER_ACCOUNT = limiter("isolation-per-account", rate_per_s=0.001, burst=2)


def login(request):
    rate_limit(PER_ACCOUNT, "alice")
    return "welcome\n"


def test_a_named_limiter_keeps_separate_buckets_in_each_server(start_server):
    routes = [("GET", "/t/login", login)]
    first, second = start_server(routes=routes), start_server(routes=routes)
    assert [request(first, "GET", "/t/login")[0] for _ in range(3)] == [200, 200, 429]
    assert [request(second, "GET", "/t/login")[0] for _ in range(3)] == [200, 200, 429]


def test_state_on_a_thread_bound_to_no_server_raises_a_clear_error(start_server):
    def who(request):
        outcome = {}

        def uncarried():
            try:
                outcome["uncarried"] = state.get("who")
            except RuntimeError as error:
                outcome["uncarried"] = str(error)

        def carried():
            outcome["carried"] = state.get("who")

        for target in (uncarried, carry_context(carried)):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join(10)
        return outcome

    first, second = start_server(routes=[("GET", "/t/who", who)]), \
        start_server(routes=[("GET", "/t/who", who)])
    first.store.put("who", "first")
    second.store.put("who", "second")
    for server, name in ((first, "first"), (second, "second")):
        status, _, body = request(server, "GET", "/t/who")
        assert status == 200
        outcome = json.loads(body)
        assert outcome["carried"] == name
        assert outcome["uncarried"].startswith("state is not bound: this thread (")
        assert "carry_context(work)" in outcome["uncarried"]

    # The test's own thread runs no server, though two are running in its process.
    with pytest.raises(RuntimeError, match=r"^state is not bound: .* state\.bind\(store\)"):
        state.get("who")


def test_the_body_parsers_are_the_runtimes_and_work_on_any_thread(start_server):
    """request.json() and request.form() run the runtime's parsers (onebox/jsonbody.py,
    onebox/forms.py). They hold no server's state, so a thread a handler starts parses its
    request whether it carries the binding or not."""
    def parse_elsewhere(request):
        outcome = {}

        def read(name, parse):
            try:
                outcome[name] = parse()
            except RuntimeError as error:
                outcome[name] = str(error)

        reader = request.json if "json" in request.path else lambda: request.form().fields
        for name, target in (("uncarried", lambda: read("uncarried", reader)),
                             ("carried", carry_context(lambda: read("carried", reader)))):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join(10)
        return outcome

    server = start_server(routes=[("POST", "/t/json", parse_elsewhere),
                                  ("POST", "/t/form", parse_elsewhere)])
    status, _, body = request(server, "POST", "/t/json", '{"a": 1}', JSON)
    outcome = json.loads(body)
    assert status == 200 and outcome["carried"] == outcome["uncarried"] == {"a": 1}
    status, _, body = request(server, "POST", "/t/form", "a=1",
                              {"Content-Type": "application/x-www-form-urlencoded"})
    outcome = json.loads(body)
    assert status == 200 and outcome["carried"] == outcome["uncarried"] == [["a", "1"]]
    assert (_context.parsers.read_json, _context.parsers.read_form) == (read_json, read_form)


def test_binding_a_bound_thread_to_a_second_store_raises(tmp_path, start_server):
    first_store = Store(str(tmp_path / "first"), durability="off", log=lambda message: None)
    second_store = Store(str(tmp_path / "second"), durability="off", log=lambda message: None)
    try:
        state.bind(first_store)
        try:
            state.bind(first_store)                     # the same store again: nothing changes
            with pytest.raises(RuntimeError, match="already bound to the store in .*first"):
                state.bind(second_store)
            state.put("k", 1)                           # still the first store's
            assert (first_store.get("k"), second_store.get("k")) == (1, None)
        finally:
            state.unbind(first_store)
        with pytest.raises(RuntimeError, match="state is not bound"):
            state.get("k")

        # A worker thread is bound to its server: a handler cannot move it to another store.
        def rebind(request):
            try:
                state.bind(second_store)
            except RuntimeError as error:
                return text_response(str(error), 409)
            return "rebound\n"

        server = start_server(routes=[("POST", "/t/rebind", rebind)])
        status, _, body = request(server, "POST", "/t/rebind")
        assert status == 409 and b"already bound to the store in " in body
        assert post_note(server, "still in the server's own store")[0] == 201
        assert second_store.items("notes/item/") == []
        assert [value["text"] for _, value in server.store.items("notes/item/")] == [
            "still in the server's own store"]
    finally:
        first_store.close()
        second_store.close()


# --- the contract is an interface; the runtime binds its implementations ------------------------

def test_importing_the_contract_and_the_areas_loads_no_runtime_module():
    code = ("import sys\n"
            "import handlers._core, handlers._state, handlers._cache, handlers._limits\n"
            "import handlers._context, handlers._forms, handlers.hello, handlers.notes\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onebox', 'server')))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "[]\n"


def test_a_contract_module_that_imports_the_runtime_is_refused(tmp_path):
    contract = tmp_path / "handlers" / "_state.py"
    contract.parent.mkdir()
    contract.write_text("import threading\nfrom handlers import _context\n"
                        "def open_store():\n    from onebox.store import Store\n")
    assert forbidden_in_handlers(str(contract)) == ["onebox.store", "onebox.store.Store"]


def test_each_server_binds_the_runtimes_implementations_of_the_contract(start_server):
    def implementation(request):
        store = state.get.__self__          # the bound method's object: what state forwards to
        return "%s.%s" % (type(store).__module__, type(store).__name__)

    server = start_server(routes=[("GET", "/t/implementation", implementation)])
    assert isinstance(server.context.store, StateStore) and server.context.store is server.store
    assert type(server.store) is Store
    assert isinstance(server.context.responses, ResponseCache)
    assert isinstance(server.context.limiters, LimiterRegistry)
    assert request(server, "GET", "/t/implementation")[2] == b"onebox.store.store.Store"
