"""The bare stdlib baseline the benchmarks compare onebox with.

ThreadingHTTPServer + BaseHTTPRequestHandler, tuned as well as the stdlib allows:
protocol_version = "HTTP/1.1" (keep-alive), disable_nagle_algorithm = True,
request_queue_size = 1024. Per-request logging is switched off (it would cost the baseline a
stderr write per request), so the baseline is, if anything, flattered.

Serves the same three things as the benchmark asks of onebox:
  GET /hello          text
  GET /hello/NAME     JSON
  GET /FILE           a file from --pages (SimpleHTTPRequestHandler)

Usage: python3 bench/baseline_stdlib.py --port 0 --pages DIR   (prints "listening on URL")
"""
import argparse
import functools
import http.server
import json


class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):
        if self.path == "/hello":
            self._send(b"hello, world\n", "text/plain; charset=utf-8")
        elif self.path.startswith("/hello/"):
            body = json.dumps({"greeting": "hello, " + self.path[7:]}, separators=(",", ":"))
            self._send(body.encode(), "application/json")
        else:
            super().do_GET()

    def _send(self, body, content_type):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pages", default=".")
    args = parser.parse_args()
    server = Server(("127.0.0.1", args.port), functools.partial(Handler, directory=args.pages))
    print("listening on http://127.0.0.1:%d/" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.server_close()


if __name__ == "__main__":
    main()
