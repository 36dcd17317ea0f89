"""Accounts (onebox/accounts.py): scrypt hashing and verify, the rules for names and passwords,
the admin listener's /accounts, and ``server.py --add-user`` / ``--passwd`` / ``--del-user`` /
``--users`` against a stopped and a running server. scrypt_n is 16384 here, through the
setting, so a hash takes ~30 ms instead of ~0.3 s."""
import base64
import http.client
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.parse

import pytest

from conftest import ROOT
from onebox.accounts import (ACCOUNT_PREFIX, AccountExists, Accounts, AccountsBusy,
                             NoSuchAccount)
from onebox.settings import ConfigError, load_config
from onebox.store import Store

SERVER = os.path.join(ROOT, "server.py")
FAST = {"accounts.scrypt_n": 16384}
PASSWORD = "correct horse battery"
NAME_RULE = "'name' must be 1 to 64 letters, digits"


def settings(**values):
    """The [accounts] section as load_config makes it, with ``values`` set (scrypt_n 16384
    unless given)."""
    overrides = dict(FAST)
    overrides.update(("accounts." + key, value) for key, value in values.items())
    return load_config(None, overrides).accounts


@pytest.fixture
def store(tmp_path):
    opened = Store(str(tmp_path / "data"), durability="off")
    yield opened
    opened.close()


def everything_in(directory):
    """The bytes of every file under ``directory``."""
    data = b""
    for folder, _, files in os.walk(str(directory)):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                data += handle.read()
    return data


# --- hashing and verify ----------------------------------------------------------------------

def test_a_password_verifies_and_nothing_else_does(store):
    accounts = Accounts(store, settings())
    assert accounts.add("Alice", PASSWORD) == "alice"       # names are case-insensitive
    assert accounts.verify("alice", PASSWORD) is True
    assert accounts.verify("ALICE", PASSWORD) is True
    assert accounts.verify("alice", PASSWORD + " ") is False
    assert accounts.verify("alice", PASSWORD.upper()) is False   # passwords are not
    assert accounts.verify("bob", PASSWORD) is False         # unknown
    assert accounts.verify("no/such name", PASSWORD) is False   # not a valid name: no raise
    assert accounts.verify(None, PASSWORD) is False
    assert accounts.verify("alice", None) is False
    assert accounts.verify("alice", "x" * 5000) is False    # longer than any password can be
    assert accounts.names() == ["alice"]
    assert accounts.exists("ALICE") and not accounts.exists("bob")
    assert not accounts.exists("../alice")


def test_the_store_holds_a_hash_with_its_parameters_and_a_salt_per_user(store):
    accounts = Accounts(store, settings())
    accounts.add("alice", PASSWORD)
    accounts.add("bob", PASSWORD)
    alice, bob = store.get(ACCOUNT_PREFIX + "alice"), store.get(ACCOUNT_PREFIX + "bob")
    assert set(alice) == {"scheme", "n", "r", "p", "dklen", "salt", "hash", "created",
                          "changed"}
    assert (alice["scheme"], alice["n"], alice["r"], alice["p"], alice["dklen"]) == (
        "scrypt", 16384, 8, 1, 32)
    assert len(base64.b64decode(alice["salt"])) == 16
    assert len(base64.b64decode(alice["hash"])) == 32
    assert alice["salt"] != bob["salt"] and alice["hash"] != bob["hash"]
    text = json.dumps([alice, bob])
    assert PASSWORD not in text and base64.b64encode(PASSWORD.encode()).decode() not in text


def median_s(call, times=7):
    """The median CPU time of ``call`` on this thread (scrypt runs on the calling thread): wall
    time swung 2x between equal calls with two busy loops beside the suite (1 run in 10)."""
    spent = []
    for _ in range(times):
        started = time.thread_time()
        call()
        spent.append(time.thread_time() - started)
    return statistics.median(spent)


def test_an_unknown_name_takes_as_long_as_a_wrong_password(store):
    """A login must not tell which names exist: a name without an account (or not a name at
    all, or a password that could never match) costs the same scrypt hash."""
    accounts = Accounts(store, settings())
    accounts.add("alice", PASSWORD)
    wrong = median_s(lambda: accounts.verify("alice", "wrong password"))
    no_hash = median_s(lambda: accounts.exists("nobody"))
    assert wrong > 20 * no_hash   # what a hash costs, against what a look-up costs
    for name, password in (("nobody", "wrong password"), ("not a name!", "wrong password"),
                           ("alice", "x" * 5000), ("alice", b"bytes")):
        other = median_s(lambda: accounts.verify(name, password))
        assert 0.5 < other / wrong < 2.0, (name, other, wrong)


def test_hashes_wait_for_their_turn_then_are_refused(store):
    """max_parallel_hashes bound the memory (128 MiB a hash at the default); past hash_wait_s
    a check is refused (AccountsBusy), never run anyway; and turns go first come, first
    served: a thread that hashes back to back does not starve one that waits (with a plain
    lock it did, for all of hash_wait_s)."""
    current = {"section": settings(max_parallel_hashes=1, hash_wait_s=0.0)}
    busy = Accounts(store, lambda: current["section"])
    busy.add("alice", PASSWORD)
    stop = threading.Event()

    def keep_hashing():
        while not stop.is_set():
            try:
                busy.verify("alice", PASSWORD)
            except AccountsBusy:   # the main thread's turn
                pass
    worker = threading.Thread(target=keep_hashing)
    worker.start()
    try:
        deadline, refused = time.monotonic() + 10, False
        while not refused and time.monotonic() < deadline:
            try:
                busy.verify("alice", PASSWORD)
            except AccountsBusy:
                refused = True
        assert refused
        current["section"] = settings(max_parallel_hashes=1, hash_wait_s=30.0)   # a reload
        for _ in range(5):
            assert busy.verify("alice", PASSWORD) is True   # each waits its turn
    finally:
        stop.set()
        worker.join(10)


def test_raising_scrypt_n_rehashes_at_the_next_login(store):
    current = {"section": settings()}
    accounts = Accounts(store, lambda: current["section"])
    accounts.add("alice", PASSWORD)
    old = store.get(ACCOUNT_PREFIX + "alice")
    current["section"] = settings(scrypt_n=32768)          # a reload
    assert accounts.verify("alice", "wrong password") is False
    assert store.get(ACCOUNT_PREFIX + "alice") == old       # a failed login changes nothing
    assert accounts.verify("alice", PASSWORD) is True       # checked with its own n=16384
    new = store.get(ACCOUNT_PREFIX + "alice")
    assert new["n"] == 32768 and new["salt"] != old["salt"]
    assert new["created"] == old["created"] and new["changed"] == old["changed"]
    assert accounts.verify("alice", PASSWORD) is True


def test_set_password_and_delete(store):
    accounts = Accounts(store, settings())
    accounts.add("alice", PASSWORD)
    created = accounts.info("alice")["created"]
    with pytest.raises(AccountExists, match="user alice exists"):
        accounts.add("ALICE", "another password")
    assert accounts.set_password("Alice", "a new password") == "alice"
    assert accounts.verify("alice", "a new password") and not accounts.verify("alice", PASSWORD)
    info = accounts.info("alice")
    assert info["created"] == created and info["changed"] >= created
    with pytest.raises(NoSuchAccount, match="no such user: bob"):
        accounts.set_password("bob", "a new password")
    assert accounts.delete("alice") == "alice"
    assert accounts.names() == [] and not accounts.verify("alice", "a new password")
    with pytest.raises(NoSuchAccount, match="no such user: alice"):
        accounts.delete("alice")


@pytest.mark.parametrize("name, good", [
    ("a", True), ("A.b_c-9", True), ("9lives", True), ("x" * 64, True),
    ("x" * 65, False), ("", False), (".hidden", False), ("-flag", False), ("_x", False),
    ("a b", False), ("a/b", False), ("caf\u00e9", False), ("a\x00", False), ("\u212aelvin", False),
])
def test_the_name_rule(store, name, good):
    accounts = Accounts(store, settings())
    if good:
        assert accounts.add(name, PASSWORD) == name.lower()
    else:
        with pytest.raises(ValueError, match=NAME_RULE):
            accounts.add(name, PASSWORD)


def test_the_password_rules_at_their_limits(store):
    accounts = Accounts(store, settings(min_password_chars=10, max_password_chars=100))
    for password, rule in (("p" * 9, "'password' must be at least 10 characters"),
                           ("p" * 101, "'password' must be at most 100 characters"),
                           ("tab\there!!", "'password' must not contain control characters"),
                           (b"bytes password", "'password' must be a string")):
        with pytest.raises(ValueError) as refused:
            accounts.add("alice", password)
        assert str(refused.value) == rule
        assert "p" * 9 not in str(refused.value)   # a message never repeats the input
    accounts.add("alice", "p" * 10)
    accounts.add("bob", "p" * 100)
    assert accounts.verify("alice", "p" * 10) and accounts.verify("bob", "p" * 100)
    # a password set before min_password_chars was raised still logs in
    stricter = Accounts(accounts.store, settings(min_password_chars=12))
    assert stricter.verify("alice", "p" * 10)


def test_passwords_are_compared_after_nfkc(store):
    """The same password typed on two keyboards: composed or decomposed (NIST 800-63B)."""
    accounts = Accounts(store, settings())
    accounts.add("alice", "caf\u00e9 au lait")                        # é, one code point
    assert accounts.verify("alice", unicodedata.normalize("NFD", "caf\u00e9 au lait"))
    assert not accounts.verify("alice", "cafe au lait")


def test_a_damaged_record_is_no_account_and_no_error(store):
    accounts = Accounts(store, settings())
    for record in ({"scheme": "md5", "hash": "x"}, {"scheme": "scrypt", "n": 3}, "text",
                   {"scheme": "scrypt", "n": 1 << 24, "r": 8, "p": 1, "dklen": 32,
                    "salt": "AAAA", "hash": base64.b64encode(b"x" * 32).decode()}):
        store.put(ACCOUNT_PREFIX + "mallory", record)
        assert accounts.verify("mallory", PASSWORD) is False


@pytest.mark.parametrize("values, message", [
    ({"accounts.scrypt_n": 100000}, "scrypt_n must be a power of two"),
    ({"accounts.scrypt_n": 8192}, "below the minimum 16384"),
    ({"accounts.scrypt_n": 2097152}, "above the maximum 1048576"),
    ({"accounts.min_password_chars": 7}, "below the minimum 8"),
    ({"accounts.min_password_chars": 100, "accounts.max_password_chars": 99},
     "min_password_chars must not exceed max_password_chars"),
])
def test_bad_settings_stop_start_up(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, values)
    load_config(None, {"accounts.scrypt_n": 16384, "accounts.min_password_chars": 8})


# --- the admin listener's /accounts ---------------------------------------------------------

def admin(server, method, path, body=None, headers=None):
    """(status, parsed JSON) of one request to the admin listener."""
    parts = urllib.parse.urlsplit(server.admin_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    headers = dict({"Accept": "application/json"}, **(headers or {}))
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
        headers.setdefault("Content-Type", "application/json")
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    return response.status, json.loads(data) if data.startswith(b"{") else data


def test_the_admin_endpoints(start_server):
    server = start_server(config=dict(FAST, **{"state.durability": "off"}))
    assert admin(server, "GET", "/accounts") == (200, {"accounts": []})
    new = {"name": "Alice", "password": PASSWORD}
    assert admin(server, "POST", "/accounts", new) == (201, {"added": "alice"})
    assert admin(server, "POST", "/accounts", new)[0] == 409
    status, body = admin(server, "POST", "/accounts", {"name": "bob", "password": "short"})
    assert (status, body["error"]) == (400, "'password' must be at least 8 characters")
    status, body = admin(server, "POST", "/accounts", {"name": "no way", "password": PASSWORD})
    assert status == 400 and body["error"].startswith(NAME_RULE)
    assert admin(server, "POST", "/accounts", {"name": "bob"})[0] == 400
    assert admin(server, "POST", "/accounts", [1, 2])[0] == 400
    status, listed = admin(server, "GET", "/accounts")
    assert [row["name"] for row in listed["accounts"]] == ["alice"]
    assert PASSWORD not in json.dumps(listed) and "hash" not in listed["accounts"][0]
    assert server.accounts.verify("alice", PASSWORD)
    changed = {"password": "a new password"}
    assert admin(server, "PUT", "/accounts/ALICE/password", changed) == (200,
                                                                          {"changed": "alice"})
    assert server.accounts.verify("alice", "a new password")
    assert admin(server, "PUT", "/accounts/bob/password", changed)[0] == 404
    assert admin(server, "DELETE", "/accounts/alice") == (200, {"deleted": "alice"})
    status, body = admin(server, "DELETE", "/accounts/alice")
    assert status == 404 and "alice" not in body["error"]   # error bodies never echo input
    assert PASSWORD not in server.error_text() and PASSWORD not in server.access_text()


def test_admin_account_changes_are_json_from_the_admin_origin_only(start_server):
    server = start_server(config=dict(FAST, **{"state.durability": "off"}))
    form = "name=alice&password=correct+horse+battery"
    status, _ = admin(server, "POST", "/accounts", form,
                      {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415                       # what another site's page could post
    status, _ = admin(server, "POST", "/accounts", {"name": "alice", "password": PASSWORD},
                      {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert status == 403
    assert server.accounts.names() == []


# --- the command line ------------------------------------------------------------------------

def run_cli(data_dir, *args, password=None, env=None):
    """(exit status, stdout + stderr) of server.py with ``args``; ``password`` is stdin."""
    result = subprocess.run(
        [sys.executable, SERVER, "--data-dir", str(data_dir), "--state-durability", "off",
         "--accounts-scrypt-n", "16384"] + list(args),
        input="" if password is None else password, capture_output=True, text=True,
        timeout=60, env=env)
    return result.returncode, result.stdout + result.stderr


def verify_stopped(data_dir, name, password):
    with Store(str(data_dir), durability="off") as opened:
        return Accounts(opened, settings()).verify(name, password)


def test_the_commands_on_a_stopped_server(tmp_path):
    data_dir = tmp_path / "data"
    assert run_cli(data_dir, "--users") == (0, "no users (no data directory at %s)\n"
                                            % data_dir)
    assert not data_dir.exists()
    code, out = run_cli(data_dir, "--add-user", "Alice", password=PASSWORD + "\n")
    assert (code, out) == (0, "onebox: added user alice\n")
    code, out = run_cli(data_dir, "--add-user", "bob", password="windows line\r\n")
    assert code == 0, out
    code, out = run_cli(data_dir, "--users")
    assert code == 0 and out.split("\n")[0].split() == ["name", "created", "(UTC)",
                                                        "password", "changed", "(UTC)"]
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["alice", "bob"]
    assert verify_stopped(data_dir, "alice", PASSWORD)
    assert verify_stopped(data_dir, "bob", "windows line")
    copy = tmp_path / "copy"
    shutil.copytree(str(data_dir), str(copy))
    stored = everything_in(copy)
    assert b"alice" in stored                               # the files are what was read
    assert PASSWORD.encode() not in stored and b"windows line" not in stored
    code, out = run_cli(data_dir, "--passwd", "alice", password="a new password\n")
    assert (code, out) == (0, "onebox: changed the password of alice\n")
    assert verify_stopped(data_dir, "alice", "a new password")
    assert run_cli(data_dir, "--del-user", "bob") == (0, "onebox: deleted user bob\n")
    code, out = run_cli(data_dir, "--users")
    assert "bob" not in out and "alice" in out


@pytest.mark.parametrize("args, password, message", [
    (("--add-user", "alice"), PASSWORD, "onebox: user alice exists"),
    (("--add-user", "carol"), "short\n", "onebox: 'password' must be at least 8 characters"),
    (("--add-user", "carol"), "", "onebox: no password: give one as a line on standard input"),
    (("--add-user", "carol"), "\n", "onebox: no password: give one as a line on standard input"),
    (("--add-user", "carol"), "x" * 1025, "onebox: 'password' must be at most 1024 characters"),
    (("--add-user=-carol",), PASSWORD, "onebox: " + NAME_RULE),
    (("--add-user", "a b"), PASSWORD, "onebox: " + NAME_RULE),
    (("--add-user", ""), PASSWORD, "onebox: " + NAME_RULE),
    (("--del-user", ""), None, "onebox: " + NAME_RULE),
    (("--passwd", "nobody"), PASSWORD, "onebox: no such user: nobody"),
    (("--del-user", "nobody"), None, "onebox: no such user: nobody"),
])
def test_known_failures_exit_1_with_one_line(tmp_path, args, password, message):
    data_dir = tmp_path / "data"
    assert run_cli(data_dir, "--add-user", "alice", password=PASSWORD)[0] == 0
    code, out = run_cli(data_dir, *args, password=password)
    assert code == 1 and out.startswith(message) and out.count("\n") == 1, out
    assert "Traceback" not in out


def environment_without_token():
    return {key: value for key, value in os.environ.items()
            if key not in ("ONEBOX_ADMIN_TOKEN", "CREDENTIALS_DIRECTORY")}


def test_the_commands_on_a_running_server(tmp_path, server_process):
    data_dir = tmp_path / "data"
    env = environment_without_token()
    process = server_process("--state-durability", "off", "--accounts-scrypt-n", "16384",
                             data_dir=data_dir,
                             env={"ONEBOX_ADMIN_TOKEN": None, "CREDENTIALS_DIRECTORY": None})
    assert process.admin_url.startswith("http://127.0.0.1:")
    try:
        code, out = run_cli(data_dir, "--add-user", "Alice", password=PASSWORD + "\n", env=env)
        assert code == 0 and out.startswith("onebox: added user alice (through the running "
                                            "server, pid %d)" % process.pid), out
        code, out = run_cli(data_dir, "--add-user", "alice", password=PASSWORD, env=env)
        assert (code, out) == (1, "onebox: user alice exists\n")
        code, out = run_cli(data_dir, "--add-user", "bob", password=PASSWORD, env=env)
        assert code == 0, out
        code, out = run_cli(data_dir, "--users", env=env)
        assert code == 0 and [line.split()[0] for line in out.splitlines()] == [
            "name", "alice", "bob"], out
        code, out = run_cli(data_dir, "--passwd", "alice", password="a new password", env=env)
        assert code == 0 and "changed the password of alice (through the running" in out
        assert run_cli(data_dir, "--passwd", "nobody", password=PASSWORD, env=env) == (
            1, "onebox: no such user: nobody\n")
        code, out = run_cli(data_dir, "--del-user", "bob", env=env)
        assert code == 0 and "deleted user bob (through the running server" in out
        assert run_cli(data_dir, "--del-user", "bob", env=env) == (
            1, "onebox: no such user: bob\n")
        code, out = run_cli(data_dir, "--add-user", "carol", password="short", env=env)
        assert (code, out) == (1, "onebox: 'password' must be at least 8 characters\n")
    finally:
        assert process.stop(20) == 0, process.err_text()
    assert PASSWORD not in process.out_text() + process.err_text()
    assert PASSWORD.encode() not in everything_in(data_dir)
    assert verify_stopped(data_dir, "alice", "a new password")
    assert not verify_stopped(data_dir, "bob", PASSWORD)


def test_without_its_admin_listener_a_running_server_cannot_be_asked(tmp_path,
                                                                     server_process):
    data_dir = tmp_path / "data"
    process = server_process("--state-durability", "off", "--admin-port", "off",
                             data_dir=data_dir)
    try:
        code, out = run_cli(data_dir, "--users")
        assert code == 1 and "has no admin listener" in out and out.count("\n") == 1, out
    finally:
        assert process.stop(20) == 0, process.err_text()


# --- on a terminal: getpass, asked twice -----------------------------------------------------

# Runs server.py on the pty whose name is argv[1] as its controlling terminal (a session
# leader that opens a tty without O_NOCTTY gets it), as a person at a terminal would.
ON_A_TERMINAL = """
import os, sys
os.setsid()
fd = os.open(sys.argv[1], os.O_RDWR)
for target in (0, 1, 2):
    os.dup2(fd, target)
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def run_on_a_terminal(data_dir, args, answers):
    """(exit status, what the terminal showed) of server.py ``args`` typed at a terminal:
    each of ``answers`` is typed once its prompt (a line ending in ': ') is shown."""
    import pty   # POSIX only, as the server is
    master, slave = pty.openpty()
    command = [sys.executable, "-c", ON_A_TERMINAL, os.ttyname(slave), SERVER, "--data-dir",
               str(data_dir), "--state-durability", "off", "--accounts-scrypt-n", "16384"]
    process = subprocess.Popen(command + list(args), stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # the slave stays open here until the end: the child opens it by name, and a pty whose
    # slave no one holds answers EIO
    shown, answers = b"", list(answers)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            exited = process.poll() is not None
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                shown += os.read(master, 4096)
                if answers and shown.rstrip(b" ").endswith(b":"):
                    # getpass flushes what was typed before its prompt: type after it
                    os.write(master, answers.pop(0).encode() + b"\n")
            elif exited:
                break
        return process.wait(10), shown.decode("utf-8", "replace")
    finally:
        os.close(master)
        os.close(slave)
        if process.poll() is None:
            process.kill()
            process.wait()


def test_on_a_terminal_the_password_is_asked_twice_and_not_shown(tmp_path):
    data_dir = tmp_path / "data"
    code, shown = run_on_a_terminal(data_dir, ["--add-user", "alice"],
                                    [PASSWORD, PASSWORD + "!"])
    assert code == 1 and "onebox: the passwords differ" in shown, shown
    assert not data_dir.exists() or not os.listdir(str(data_dir)), "nothing was written"
    code, shown = run_on_a_terminal(data_dir, ["--add-user", "alice"], [PASSWORD, PASSWORD])
    assert code == 0 and "password for alice: " in shown and "the same again: " in shown
    assert "onebox: added user alice" in shown and PASSWORD not in shown   # never echoed
    assert verify_stopped(data_dir, "alice", PASSWORD)
