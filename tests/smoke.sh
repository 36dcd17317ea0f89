#!/usr/bin/env bash
# Curl-only smoke test for any onebox deployment.
#   tests/smoke.sh https://example.org     check a running deployment
#   tests/smoke.sh                          start server.py on a free port, check it, stop it
#   tests/smoke.sh --cacert ca.pem https://localhost:8443
#                                           HTTPS with a certificate from your own (or a test)
#                                           CA; CURL_CA_BUNDLE=ca.pem does the same
# Exits non-zero on the first failed check.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ "${1:-}" = "--cacert" ]; then
    export CURL_CA_BUNDLE="${2:?--cacert needs a file}"   # curl reads it for every call
    shift 2
fi
base="${1:-}"
server_pid=""

cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" 2>/dev/null
    fi
    [ -n "${scratch:-}" ] && rm -rf "$scratch"
}
trap cleanup EXIT

if [ -z "$base" ]; then
    scratch="$(mktemp -d)"
    python3 "$here/server.py" --port 0 --data-dir "$scratch/data" >"$scratch/out" 2>"$scratch/err" &
    server_pid=$!
    for _ in $(seq 50); do
        base="$(sed -n 's|^listening on \(http://[^ ]*\)/$|\1|p' "$scratch/out" | head -n 1)"
        [ -n "$base" ] && break
        sleep 0.1
    done
    [ -n "$base" ] || { echo "FAIL: server did not start"; cat "$scratch/err"; exit 1; }
fi
base="${base%/}"
failures=0

check() {  # check NAME EXPECTED ACTUAL
    if [ "$2" = "$3" ]; then
        echo "ok   $1"
    else
        echo "FAIL $1: expected [$2], got [$3]"
        failures=$((failures + 1))
    fi
}
status() { curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$@"; }

check "GET / is 200"               200 "$(status "$base/")"
check "GET / is the index page"    1   "$(curl -s --max-time 10 "$base/" | grep -c '<title>onebox</title>')"
check "HEAD / has no body"         0   "$(curl -s -I --max-time 10 "$base/" -o /dev/null -w '%{size_download}')"
check "GET /hello"                 "hello, world" "$(curl -s --max-time 10 "$base/hello")"
check "GET /hello/smoke is JSON"   '{"greeting":"hello, smoke"}' "$(curl -s --max-time 10 "$base/hello/smoke")"
check "unknown page is 404"        404 "$(status "$base/no-such-page")"
check "wrong method is 405"        405 "$(status -X DELETE "$base/hello")"
check "405 names allowed methods"  1   "$(curl -s -i -X DELETE --max-time 10 "$base/hello" | grep -ci '^allow: GET, HEAD, OPTIONS')"
check "unknown method is 501"      501 "$(status -X BREW "$base/hello")"
check "dot-segments are 400"       400 "$(status --path-as-is "$base/../server.py")"
check "dotfiles are hidden"        404 "$(status "$base/.git/config")"
check "bad JSON is 400"            400 "$(status -X POST -H 'Content-Type: application/json' -d '{bad' "$base/hello/echo")"
check "JSON echo"                  '{"json":{"a":1}}' "$(curl -s --max-time 10 -X POST -H 'Content-Type: application/json' -d '{"a":1}' "$base/hello/echo")"
etag="$(curl -s -I --max-time 10 "$base/" | tr -d '\r' | sed -n 's/^[Ee][Tt][Aa][Gg]: //p')"
check "GET / has an ETag"          1   "$([ -n "$etag" ] && echo 1 || echo 0)"
check "If-None-Match gives 304"    304 "$(status -H "If-None-Match: $etag" "$base/")"
check "a byte range gives 206"     206 "$(status -H 'Range: bytes=0-9' "$base/")"
check "the range has 10 bytes"     10  "$(curl -s --max-time 10 -H 'Range: bytes=0-9' "$base/" | wc -c | tr -d ' ')"
note_id="$(curl -s --max-time 10 -X POST -H 'Content-Type: application/json' -d '{"text":"smoke"}' "$base/api/notes" | sed -n 's/.*"id":"\([0-9]*\)".*/\1/p')"
check "POST /api/notes gives an id" 1  "$([ -n "$note_id" ] && echo 1 || echo 0)"
check "GET the note back"          1   "$(curl -s --max-time 10 "$base/api/notes/$note_id" | grep -c '"text":"smoke"')"
check "empty note text is 400"     400 "$(status -X POST -H 'Content-Type: application/json' -d '{"text":""}' "$base/api/notes")"
check "DELETE the note"            204 "$(status -X DELETE "$base/api/notes/$note_id")"
check "GET /healthz is ok"         ok  "$(curl -s --max-time 10 "$base/healthz")"
check "GET /readyz is 200"         200 "$(status "$base/readyz")"
check "/metrics is not public"     404 "$(status "$base/metrics")"
check "keep-alive reuses the connection" 1 "$(curl -sv --max-time 10 "$base/hello" "$base/hello" 2>&1 | grep -c 'Re-using existing connection')"

if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid"
    wait "$server_pid"
    code=$?
    server_pid=""
    check "SIGTERM exits 0" 0 "$code"
    check "access log has a line per request" 1 "$(grep -c '"GET /hello/smoke HTTP/1.1" 200' "$scratch/out")"
fi

if [ "$failures" -ne 0 ]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "all smoke checks passed"
