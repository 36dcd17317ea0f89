"""The real `python3 server.py` as a user runs it: config, --check, start-up line, logs, signals."""
import http.client
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, onebox

SERVER = os.path.join(ROOT, "server.py")


def run_check(*args, config_text=None, tmp_path=None):
    command = [sys.executable, SERVER, "--check"] + list(args)
    if config_text is not None:
        path = tmp_path / "setup.cfg"
        path.write_text(config_text)
        command += ["--config", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def test_check_accepts_the_shipped_setup_cfg():
    result = run_check()
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


@pytest.mark.parametrize("text, words", [
    ("[server]\nprot = 80\n", ["setup.cfg", "[server] prot", "unknown key", "port"]),
    ("[server]\nport = eighty\n", ["[server] port", "not a whole number"]),
    ("[server]\nport = 70000\n", ["[server] port", "0-65535"]),
    ("[server]\nmax_body_bytes = -1\n", ["max_body_bytes", "minimum"]),
    ("[server]\naccess_log = perhaps\n", ["access_log", "on/off"]),
    ("[server\n", ["cannot be read"]),
])
def test_check_refuses_bad_config_naming_the_key(tmp_path, text, words):
    result = run_check(config_text=text, tmp_path=tmp_path)
    assert result.returncode == 1
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.stderr


def test_flags_override_setup_cfg(tmp_path):
    path = tmp_path / "setup.cfg"
    path.write_text("[server]\nmax_body_bytes = 10\nport = 9000\n")
    config = onebox.load_config(str(path), {"max_body_bytes": "20"})
    assert (config.server.max_body_bytes, config.server.port) == (20, 9000)
    assert config.server.pages_dir == os.path.join(str(tmp_path), "pages")  # relative to file
    result = run_check("--max-body-bytes", "oops")
    assert result.returncode == 1 and "max_body_bytes" in result.stderr


def test_server_process_serves_logs_and_stops_on_sigterm(server_process):
    process = server_process()
    process.wait_for(r"^admin on ")
    line, admin = process.out_lines()[:2]
    match = re.match(r"listening on (http://127\.0\.0\.1:(\d+)/)$", line.strip())
    assert match, line
    assert admin.startswith("admin on http://127.0.0.1:")
    url = match.group(1)
    curl = subprocess.run(["curl", "-sS", "-A", 'evil"\\ agent\xe9', url + "hello"],
                          capture_output=True, timeout=10)
    assert curl.stdout == b"hello, world\n"
    time.sleep(1.3)  # the access log is flushed at least once a second
    assert process.stop(15) == 0, process.err_text()
    log = process.out_lines()[2:]
    assert len(log) == 1, process.out_text()
    assert re.match(r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                    r'"GET /hello HTTP/1\.1" 200 13 "-" "evil\\x22\\x5C agent\\xC3\\xA9" \d+\.\d{3}ms$',
                    log[0]), log[0]


def test_port_in_use_is_a_clear_error(tmp_path):
    import socket
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = subprocess.run([sys.executable, SERVER, "--port", str(port)],
                                capture_output=True, text=True, timeout=30)
    finally:
        holder.close()
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1 port %d" % port in result.stderr
    assert "Traceback" not in result.stderr


def test_readme_gives_the_two_commands():
    # every setting is documented in docs/settings.md, generated from SETTINGS (tests/test_docs.py)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        text = readme.read()
    commands = re.search(r"## The two commands\n\n```sh\n(.*?)```", text, re.S).group(1)
    assert [line.split("#")[0].strip() for line in commands.splitlines()] == [
        "python3 server.py", "tests/run"]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as ci:
        assert 'PYTHON="$python" tests/run\n' in ci.read()  # exactly the README's test command


def test_a_stalled_stdout_neither_stops_serving_nor_exit(server_process):
    # stdout is a pipe that nobody reads after the first line: it fills at 64 KiB (~500 lines)
    process = server_process("--log-buffer-bytes", "16384", "--shutdown-timeout-s", "2",
                             stdout_pipe=True)
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=5)
    for number in range(1500):
        connection.request("GET", "/hello")
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"hello, world\n"), number
    connection.close()
    started = time.monotonic()
    status = process.stop(timeout=10)
    assert status == 0
    assert time.monotonic() - started < 2 + 1 + 2   # shutdown_timeout_s, the log's wait, slack
    errors = process.err_text()
    assert re.search(r"access log: \d+ lines dropped so far", errors), errors
    assert errors.count("lines dropped so far") == 1          # at most one notice a minute
    assert "Traceback" not in errors


def test_sighup_reloads_and_keeps_serving(server_process):
    process = server_process()
    process.send_signal(signal.SIGHUP)
    process.wait_for("reloaded", "err", timeout=5)
    assert subprocess.run(["curl", "-sS", "http://127.0.0.1:%d/hello" % process.port],
                          capture_output=True, timeout=10).stdout == b"hello, world\n"
    assert process.stop(15) == 0
    assert "reloaded: no setting changed" in process.err_text()
    assert '"GET /hello HTTP/1.1" 200' in process.out_text()   # the drain flushed the log
