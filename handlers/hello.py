"""Hello: the smallest area, and the one the benchmark measures.

GET /hello                 plain text
GET /hello/{name}          JSON greeting
POST /hello/echo           echoes a JSON body, or the fields of a form, back as JSON; at most
                           MAX_ECHO_BYTES of body (413 past it): a demonstration needs no more,
                           and every byte echoed is parsed and encoded again
"""
from handlers._core import HTTPError, json_response, text_response

MAX_NAME_CHARS = 100
MAX_ECHO_BYTES = 4096           # the body /hello/echo takes, JSON or form


def get_hello(request):
    return text_response("hello, world\n")


def get_greeting(request):
    name = request.params["name"]
    if len(name) > MAX_NAME_CHARS:
        raise HTTPError(400, "'name' must be at most %d characters" % MAX_NAME_CHARS)
    return json_response({"greeting": "hello, %s" % name})


def echo(request):
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        return json_response({"json": request.json(max_bytes=MAX_ECHO_BYTES)})
    request.body(max_bytes=MAX_ECHO_BYTES)   # 413 past it; form() parses what this kept
    form = request.form()
    return json_response({"form": form.fields,
                          "files": {name: {"filename": f.filename, "bytes": len(f.data)}
                                    for name, f in form.files.items()}})


ROUTES = [
    ("GET", "/hello", get_hello),
    ("GET", "/hello/{name}", get_greeting),
    ("POST", "/hello/echo", echo),
]
