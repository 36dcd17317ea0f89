#!/usr/bin/env bash
# Check onebox's static serving with REDbot (Mark Nottingham's HTTP resource linter).
#
#   bash tests/redbot_check.sh
#
# Dev-only: REDbot comes from PyPI into a throwaway venv (bench/.venv-redbot, git-ignored) and
# is never imported by the runtime. The script builds a small site in a temp directory, starts
# `python3 server.py` on a free port, and has REDbot check the home page, a CSS file (gzipped on
# the fly), a large binary (sent with sendfile) and a precompressed asset (.br / .gz sidecars,
# fingerprinted name). It prints REDbot's notes (GOOD / INFO / WARN / BAD) and a summary line per
# URL; it exits 1 if any note is BAD.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/bench/.venv-redbot"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/redbot" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check redbot
fi

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

site="$work/pages"
mkdir -p "$site/assets"
# brotli is a dependency of REDbot, so its venv can make the .br sidecar
"$venv/bin/python" - "$site" "$here/pages/index.html" <<'EOF'
import brotli, gzip, os, sys
site, index = sys.argv[1], sys.argv[2]
with open(index, "rb") as source, open(os.path.join(site, "index.html"), "wb") as copy:
    copy.write(source.read())
css = b"".join(b".rule-%d { color: #%06x; margin: %dpx; }\n" % (n, n * 4099, n % 17)
               for n in range(200))
with open(os.path.join(site, "assets", "site.css"), "wb") as handle:
    handle.write(css)
with open(os.path.join(site, "assets", "big.bin"), "wb") as handle:
    handle.write(os.urandom(4 * 1024 * 1024))
js = b"".join(b"export const value%d = %d;\n" % (n, n * n) for n in range(400))
name = os.path.join(site, "assets", "app.3f9a1c.js")
with open(name, "wb") as handle:
    handle.write(js)
with open(name + ".gz", "wb") as handle:
    handle.write(gzip.compress(js, mtime=0))
with open(name + ".br", "wb") as handle:
    handle.write(brotli.compress(js))
EOF
# the pages must look a few seconds old: a Last-Modified of "now" is a weak validator
touch -d '-1 minute' "$site"/index.html "$site"/assets/*

"$python" "$here/server.py" --port 0 --pages-dir "$site" --access-log off \
    >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
for _ in $(seq 50); do
    grep -q "listening on" "$work/server.out" 2>/dev/null && break
    sleep 0.1
done
base="$(grep -o 'http://[^ ]*' "$work/server.out" | head -1)"
[ -n "$base" ] || { cat "$work/server.err"; echo "onebox did not start" >&2; exit 1; }

status=0
for path in "" assets/site.css assets/big.bin assets/app.3f9a1c.js; do
    "$venv/bin/redbot" -o har "$base$path" >"$work/report.har"
    "$venv/bin/python" - "$base$path" "$work/report.har" <<'EOF' || status=1
import collections, json, sys
url, report = sys.argv[1], sys.argv[2]
with open(report) as handle:
    entries = json.load(handle)["log"]["entries"]
levels, notes = collections.Counter(), []
for entry in entries[:1]:   # the first entry is the checked response itself
    for note in entry.get("_red_messages", []):
        levels[note["level"]] += 1
        notes.append("    %-4s %s: %s" % (note["level"], note["note_id"], note["summary"]))
response = entries[0]["response"]
encoding = next((h["value"] for h in response["headers"]
                 if h["name"].lower() == "content-encoding"), "identity")
print("%-44s %d %s: %s" % (url, response["status"], encoding, ", ".join(
    "%d %s" % (levels[level], level) for level in ("GOOD", "INFO", "WARN", "BAD"))))
print("\n".join(notes))
sys.exit(1 if levels["BAD"] else 0)
EOF
done
exit $status
