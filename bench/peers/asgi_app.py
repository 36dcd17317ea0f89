"""The uvicorn peer of bench/bench_peers.py: a raw ASGI app (no framework) answering as onebox's
hello area does (handlers/hello.py), so that the two servers do the same work per request.

    GET /hello          200 "hello, world\n", text/plain; charset=utf-8
    GET /hello/NAME     200 {"greeting":"hello, NAME"}, application/json (compact, as onebox's
                        json_response encodes it); 400 past 100 characters, as onebox
    anything else       404

Run it as the benchmark does, from the benchmark venv (bench/.venv, never used by the runtime):

    bench/.venv/bin/uvicorn --app-dir bench/peers asgi_app:app --loop uvloop --http httptools \
        --workers 1 --no-access-log --port PORT
"""
import json

MAX_NAME_CHARS = 100            # handlers/hello.py's limit
HELLO = b"hello, world\n"
TEXT = [(b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(HELLO)).encode())]
# the encoder onebox's json_response uses (handlers/_core.py): CPython's C encoder, made once
# (JSONEncoder.encode makes one per call, ~0.7 us a response that onebox does not spend)
_encoder = json.encoder.c_make_encoder(
    None, json.JSONEncoder().default, json.encoder.c_encode_basestring, None, ":", ",", False,
    False, False)


def _encode(data):
    return "".join(_encoder(data, 0))


async def app(scope, receive, send):
    if scope["type"] == "http":
        await _http(scope, send)
    elif scope["type"] == "lifespan":
        await _lifespan(receive, send)


async def _http(scope, send):
    path = scope["path"]
    if scope["method"] != "GET":
        status, headers, body = 405, [(b"allow", b"GET"), (b"content-length", b"0")], b""
    elif path == "/hello":
        status, headers, body = 200, TEXT, HELLO
    elif path.startswith("/hello/") and "/" not in path[7:] and len(path) > 7:
        name = path[7:]
        if len(name) > MAX_NAME_CHARS:
            status, body = 400, _encode({"error": "'name' must be at most %d characters"
                                                  % MAX_NAME_CHARS}).encode("utf-8")
        else:
            status, body = 200, _encode({"greeting": "hello, %s" % name}).encode("utf-8")
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
    else:
        status, headers, body = 404, [(b"content-type", b"text/plain"),
                                      (b"content-length", b"10")], b"not found\n"
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive, send):
    """Nothing to set up; answering the protocol keeps uvicorn from logging that it is missing."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
