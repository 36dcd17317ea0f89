"""onebox/store/redis_store.py, the state kept in Redis (issue 24), against a real redis-server
(tests/redisd.py; never a mocked one): the contract's verbs as the local Store answers them,
transactions across two "processes" (two RedisStores), a lock left by a dead process, backup
and import, Redis stopped and killed under load, and servers (in-process and ``server.py``)
on it: 503s while Redis is down, a login shared between two servers, start-up refusals."""
import os
import random
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, SERVER, free_port, request, wait_until
from handlers._core import json_response, text_response
from handlers._state import (StateError, StateKeyError, StateUnavailableError,
                             StateWriteError)
from onebox.cluster import connect_cluster
from onebox.redis import Redis
from onebox.settings import load_config
from onebox.store import Store
from onebox.store.redis_store import RedisStore
from redisd import needs_redis, redis_server

pytestmark = needs_redis
ALWAYS = {"appendonly": True, "appendfsync": "always"}


@pytest.fixture
def redisd(tmp_path):
    with redis_server(_redis_dir(tmp_path)) as server:
        yield server


@pytest.fixture
def open_stores(tmp_path):
    """open(url, **settings) -> a RedisStore on its own Cluster link (a "process"); all are
    closed at the end."""
    opened = []

    def open_store(url, durability="off", **cluster):
        overrides = {"cluster.redis_url": url, "state.durability": durability,
                     "data_dir": str(tmp_path / "unused")}
        overrides.update(("cluster." + name, value) for name, value in cluster.items())
        store = RedisStore(connect_cluster(load_config(None, overrides)))
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def store(redisd, open_stores):
    return open_stores(redisd.url)


def _redis_dir(tmp_path):
    """Redis's own directory (its conf, log and append-only file), apart from the servers'."""
    path = tmp_path / "redis"
    path.mkdir(exist_ok=True)
    return path


# --- the contract's verbs -----------------------------------------------------------------------

def test_the_verbs_answer_as_the_local_store_does(store, tmp_path):
    """The same random operations on a local Store and on Redis give the same answers and
    leave the same state (keys with prefixes, non-ASCII, a lone surrogate; limits)."""
    local = Store(str(tmp_path / "local"), durability="off")
    alphabet = ["a", "a/", "a/b", "ab", "b", "é", "é/x", "😀", "z\U0010ffff", "\ud800", "n"]
    rng = random.Random(24)
    try:
        for _ in range(600):
            key = rng.choice(alphabet) + rng.choice(["", "1", "/2", "é"])
            verb = rng.choice(["put", "put", "delete", "incr", "get", "items", "keys"])
            prefix = rng.choice(["", "a", "a/", "é", "\ud800", "z\U0010ffff", "q"])
            limit = rng.choice([None, 0, 1, 3])
            value = rng.choice([1, "é😀", {"k": [1, None]}, [True], 2.5])
            results = []
            for target in (local, store):
                if verb == "put":
                    results.append(target.put(key, value))
                elif verb == "incr":
                    try:
                        results.append(target.incr(key, 7))
                    except ValueError as error:
                        results.append(str(error))
                elif verb in ("items", "keys"):
                    results.append(getattr(target, verb)(prefix, limit))
                else:
                    results.append(getattr(target, verb)(key))
            assert results[0] == results[1], (verb, key, prefix, limit)
        assert store.items() == local.items() and store.keys() == sorted(store.keys())
        assert store.stats()["keys"] == local.stats()["keys"]
    finally:
        local.close()


def test_a_value_is_a_fresh_copy_and_big_ints_are_exact(store):
    store.put("v", {"list": [1, 2]})
    value = store.get("v")
    value["list"].append(3)
    assert store.get("v") == {"list": [1, 2]}
    assert store.get("missing", "default") == "default"
    assert store.incr("big", 2 ** 63 - 1) == 2 ** 63 - 1   # INCRBY's range, at its edge
    assert store.incr("big") == 2 ** 63                   # past it: exact all the same
    assert store.incr("big", -(2 ** 64)) == -(2 ** 63)
    assert store.get("big") == -(2 ** 63)
    assert store.incr("huge", 10 ** 30) == 10 ** 30


@pytest.mark.parametrize("key, error", [
    ("", StateKeyError), ("k" * 1025, StateKeyError), ("a\x00b", StateKeyError),
    (7, ValueError), (None, ValueError)])
def test_bad_keys_are_refused_as_locally(store, key, error):
    for call in (lambda: store.get(key), lambda: store.put(key, 1), lambda: store.delete(key),
                 lambda: store.incr(key)):
        with pytest.raises(error):
            call()
    store.put("k" * 1024, 1)   # the limit itself passes
    assert store.keys() == ["k" * 1024]


@pytest.mark.parametrize("value", [float("nan"), (1, 2), {1: "x"}, {"s": {1}}, "\ud800"])
def test_bad_values_are_refused_and_write_nothing(store, value):
    with pytest.raises(ValueError):
        store.put("k", value)
    store.put("n", "text")
    with pytest.raises(ValueError, match="incr needs an int"):
        store.incr("n")
    with pytest.raises(ValueError):
        store.incr("n", 1.5)
    assert store.items() == [("n", "text")]
    assert store.stats()["writes"] == 1


def test_listings_are_one_prefix_run_in_code_point_order(store):
    keys = ["a", "a/1", "a/2", "a0", "ab", "a\x7f", "aé", "a😀", "a\U0010ffff", "a\U0010ffffx",
            "b", "\ud800x"]
    for number, key in enumerate(keys):
        store.put(key, number)
    assert store.keys() == sorted(keys)
    assert store.keys("a") == sorted(k for k in keys if k.startswith("a"))
    assert store.keys("a\U0010ffff") == ["a\U0010ffff", "a\U0010ffffx"]
    assert store.items("a/", 1) == [("a/1", 1)]
    assert store.keys("c") == [] and store.items("a", 0) == []
    with pytest.raises(ValueError):
        store.keys("a", -1)


# --- transactions --------------------------------------------------------------------------------

def test_a_transaction_is_all_or_nothing_and_sees_its_own_writes(store):
    store.put("keep", 1)
    with pytest.raises(KeyError):
        with store.transaction() as tx:
            tx.put("a", 1)
            tx.delete("keep")
            assert tx.get("a") == 1 and tx.get("keep") is None
            raise KeyError("the body failed")
    assert store.items() == [("keep", 1)]
    with store.transaction() as tx:
        assert tx.incr("n", 2) == 2 and tx.incr("n") == 3
        assert tx.delete("keep") is True and tx.delete("keep") is False
        tx.put("b", ["x"])
        with pytest.raises(RuntimeError, match="use the tx object"):
            store.put("c", 1)
    assert store.items() == [("b", ["x"]), ("n", 3)]
    assert not store._redis.call("EXISTS", store._lock_key)   # the commit dropped the lock
    with pytest.raises(StateError, match="ended"):
        tx.get("n")


def test_transactions_of_two_processes_count_exactly(redisd, open_stores):
    """8 threads on each of two RedisStores (two Cluster links, as two processes have), each
    incrementing in transactions, with plain incrs racing them: the exact total."""
    stores = [open_stores(redisd.url), open_stores(redisd.url)]
    rounds = 40

    def work(store, number):
        for _ in range(rounds):
            if number % 4 == 0:
                store.incr("count")
            else:
                with store.transaction() as tx:
                    tx.put("count", tx.get("count", 0) + 1)
                    tx.incr("transactions")

    threads = [threading.Thread(target=work, args=(store, number))
               for store in stores for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert stores[0].get("count") == 2 * 8 * rounds
    assert stores[1].get("transactions") == 2 * 6 * rounds


def test_a_plain_write_waits_for_a_transaction_and_is_not_lost(redisd, open_stores):
    one, other = open_stores(redisd.url), open_stores(redisd.url)
    done = []
    with one.transaction() as tx:
        tx.put("k", "from the transaction")
        writer = threading.Thread(target=lambda: done.append(other.put("k", "plain")))
        writer.start()
        time.sleep(0.1)
        assert not done   # it waits for the lock ...
        assert other.get("k") is None   # ... and readers see the state before the transaction
    writer.join(10)
    assert done == [None]
    assert other.get("k") == "plain"   # ... applied after the transaction, not lost under it


def test_a_lock_left_by_a_dead_process_delays_writes_at_most_its_ttl(redisd, open_stores):
    store = open_stores(redisd.url, timeout_s=0.2)   # a lock lives 3 x 0.2 s
    assert store.lock_ttl_s == pytest.approx(0.6)
    raw = Redis(redisd.url)
    try:   # what a process killed inside a transaction leaves behind
        raw.call("SET", store._lock_key, "dead-process-token", "PX", 600)
        started = time.monotonic()
        store.put("k", 1)
        waited = time.monotonic() - started
        assert 0.3 < waited < 0.6 + 0.3, waited
        raw.call("SET", store._lock_key, "dead-process-token", "PX", 600)
        with store.transaction() as tx:   # a transaction waits the same way
            tx.incr("k")
        assert store.get("k") == 2
        raw.call("SET", store._lock_key, "held-for-ever")   # no TTL: a writer gives up, 503
        started = time.monotonic()
        with pytest.raises(StateWriteError, match="held the lock"):
            store.put("k", 3)
        assert time.monotonic() - started < store.write_wait_s + 0.5
        assert store.get("k") == 2
    finally:
        raw.close()


def test_a_transaction_that_outlives_its_lock_writes_nothing(redisd, open_stores):
    store = open_stores(redisd.url, timeout_s=0.1)
    with pytest.raises(StateWriteError, match="outlived its lock"):
        with store.transaction() as tx:
            tx.put("k", "late")
            time.sleep(store.lock_ttl_s + 0.1)   # past its TTL: another may have written
    assert store.get("k") is None
    store.put("k", "next")   # and nothing is left held
    assert store.get("k") == "next"


# --- backup and import ---------------------------------------------------------------------------

def test_a_backup_opens_as_a_one_process_data_dir(store, tmp_path):
    store.SNAPSHOT_CHUNK_KEYS = 7   # several round trips and frames
    expected = [("k%03d" % n, {"n": n, "é": "😀"}) for n in range(50)] + [("\ud800", 1)]
    for key, value in expected:
        store.put(key, value)
    store.backup(str(tmp_path / "state.snapshot"))
    assert os.stat(tmp_path / "state.snapshot").st_mode & 0o777 == 0o600
    data_dir = tmp_path / "restored"
    data_dir.mkdir()
    shutil.copy(str(tmp_path / "state.snapshot"), str(data_dir / "snapshot"))
    with Store(str(data_dir)) as restored:
        assert restored.items() == sorted(expected)
    assert not store._redis.call("EXISTS", store._lock_key)


def test_load_from_fills_an_empty_prefix_and_refuses_a_full_one(redisd, open_stores):
    store = open_stores(redisd.url, key_prefix="site1:")
    store.LOAD_CHUNK_KEYS = 3
    pairs = [("k%d" % n, [n]) for n in range(10)] + [("é", "😀")]
    assert store.load_from(pairs) == 11
    assert store.items() == sorted(pairs)
    assert store.stats()["keys"] == 11 and store.stats()["bytes"] > 0
    with pytest.raises(StateError, match="already holds 11 keys under site1:"):
        store.load_from([("other", 1)])
    assert store.get("other") is None
    assert open_stores(redisd.url, key_prefix="site2:").keys() == []   # prefixes are apart


def _run_server_py(*flags, timeout=60):
    return subprocess.run([sys.executable, SERVER] + list(flags), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_cluster_import_copies_a_stopped_data_dir_then_backup_reads_it_back(redisd, tmp_path,
                                                                            open_stores):
    source = tmp_path / "one-process"
    with Store(str(source)) as local:
        for n in range(30):
            local.put("notes/%d" % n, {"text": "note %d é" % n})
        expected = local.items()
    url = ["--cluster-redis-url", redisd.url, "--state-durability", "off"]
    done = _run_server_py("--cluster-import", str(source), *url)
    assert done.returncode == 0, done.stderr
    assert "30 keys copied" in done.stdout
    assert open_stores(redisd.url).items() == expected
    again = _run_server_py("--cluster-import", str(source), *url)
    assert again.returncode == 1 and "already holds 30 keys" in again.stderr
    missing = _run_server_py("--cluster-import", str(tmp_path / "nowhere"), *url)
    assert missing.returncode == 1 and "no such directory" in missing.stderr
    backup = _run_server_py("--backup", str(tmp_path / "b.snapshot"), *url)
    assert backup.returncode == 0, backup.stderr
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(str(tmp_path / "b.snapshot"), str(restored / "snapshot"))
    with Store(str(restored)) as local:
        assert local.items() == expected
    repair = _run_server_py("--repair", *url)
    assert repair.returncode == 0 and "redis-check-aof --fix" in repair.stdout


# --- Redis down ------------------------------------------------------------------------------

def test_redis_stopped_reads_and_writes_fail_fast_then_recover(tmp_path, open_stores):
    with redis_server(_redis_dir(tmp_path), **ALWAYS) as redisd:
        store = open_stores(redisd.url, durability="always")
        store.put("k", "before")
        redisd.kill()
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(StateWriteError):
                store.put("k", "during")
            with pytest.raises(StateWriteError):
                with store.transaction() as tx:
                    tx.put("k", "during")
            with pytest.raises(StateUnavailableError):   # never the default: k exists
                store.get("k")
            with pytest.raises(StateUnavailableError):
                store.items()
        assert time.monotonic() - started < 3.0   # the client's backoff: no wait per call
        assert store.stats()["up"] is False
        redisd.restart()
        assert wait_until(lambda: store._redis.ping(), 5.0)
        assert store.get("k") == "before"
        store.put("k", "after")
        assert store.items() == [("k", "after")] and store.stats()["up"] is True


def test_kill_9_of_redis_under_write_load_loses_no_acknowledged_write(tmp_path, open_stores):
    """4 threads write (plain puts and transactions) while redis-server (appendonly yes,
    appendfsync always) is SIGKILLed; after a restart every acknowledged write is there."""
    with redis_server(_redis_dir(tmp_path), **ALWAYS) as redisd:
        store = open_stores(redisd.url, durability="always", timeout_s=0.5)
        acknowledged, failed, stop = [[] for _ in range(4)], [0], threading.Event()

        def write(number):
            sequence = 0
            while not stop.is_set():
                sequence += 1
                key = "w%d/%06d" % (number, sequence)
                try:
                    if number % 2:
                        store.put(key, sequence)
                    else:
                        with store.transaction() as tx:
                            tx.put(key, sequence)
                            tx.incr("w%d/count" % number)
                except (StateWriteError, StateUnavailableError):   # tx.incr reads
                    failed[0] += 1
                    time.sleep(0.01)
                    continue
                acknowledged[number].append((key, sequence))

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: all(len(done) > 20 for done in acknowledged), 5.0)
        redisd.kill()
        time.sleep(0.3)
        redisd.restart()
        time.sleep(0.3)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert failed[0] > 0   # writes did meet the dead Redis
        assert wait_until(lambda: store._redis.ping(), 5.0)
        stored = dict(store.items())
        for done in acknowledged:
            for key, sequence in done:
                assert stored.get(key) == sequence, key
        for number in (0, 2):   # a transaction's two writes are one: both or neither
            written = [key for key in stored if key.startswith("w%d/0" % number)]
            assert stored["w%d/count" % number] == len(written)


# --- servers on it ---------------------------------------------------------------------------

def _cluster_config(redisd, **more):
    return dict({"cluster.redis_url": redisd.url, "state.durability": "off",
                 "cluster.timeout_s": 0.5}, **more)


def test_a_server_answers_503_while_redis_is_down_then_recovers(tmp_path, start_server):
    with redis_server(_redis_dir(tmp_path), **ALWAYS) as redisd:
        server = start_server(config=_cluster_config(redisd, **{"state.durability": "always"}))
        headers = {"Content-Type": "application/json"}
        status, _, body = request(server, "POST", "/api/notes", b'{"text": "one"}', headers)
        assert status == 201, body
        redisd.kill()
        status, _, body = request(server, "POST", "/api/notes", b'{"text": "two"}', headers)
        assert status == 503 and b"storage is unavailable" in body and len(body) < 200
        status, _, body = request(server, "GET", "/api/notes/1")
        assert status == 503 and b"storage is unavailable" in body
        status, _, _ = request(server, "GET", "/api/notes")
        assert status == 503
        redisd.restart()

        def answers():
            return request(server, "GET", "/api/notes/1")[0] == 200
        assert wait_until(answers, 10)
        status, _, body = request(server, "POST", "/api/notes", b'{"text": "three"}', headers)
        assert status == 201, body
        errors = server.error_text()   # each 503 is logged, with why
        assert "state write failed" in errors and "state read failed" in errors


def _force_login(request):
    request.session.login(request.query["name"])
    return text_response("in")


def _show(request):
    return json_response({"user": request.session.user})


def _logout(request):
    request.session.logout()
    return text_response("out")


SESSION_ROUTES = [("POST", "/s/force-login", _force_login), ("GET", "/s/show", _show),
                  ("POST", "/s/logout", _logout)]
SAME = {"Sec-Fetch-Site": "same-origin"}


def test_a_login_made_through_one_server_is_valid_through_another(redisd, start_server):
    config = _cluster_config(redisd)
    one = start_server(routes=SESSION_ROUTES, config=config)
    other = start_server(routes=SESSION_ROUTES, config=config)
    assert one.store is not other.store
    _, headers, _ = request(one, "POST", "/s/force-login?name=ann", headers=SAME)
    cookie = headers["set-cookie"].split(";")[0]
    status, _, body = request(other, "GET", "/s/show", headers={"Cookie": cookie})
    assert status == 200 and b'"user":"ann"' in body
    status, _, _ = request(other, "POST", "/s/logout", headers=dict(SAME, Cookie=cookie))
    assert status == 200
    _, _, body = request(one, "GET", "/s/show", headers={"Cookie": cookie})
    assert b'"user":null' in body   # logged out through the other: gone for both


def test_start_up_refuses_a_redis_it_cannot_reach_or_trust(tmp_path, server_process):
    down = _run_server_py("--port", "0", "--data-dir", str(tmp_path / "d0"),
                          "--cluster-redis-url", "redis://127.0.0.1:%d/0" % free_port())
    assert down.returncode == 1
    assert "[cluster] redis_url" in down.stderr and "start redis-server" in down.stderr
    with redis_server(_redis_dir(tmp_path), appendonly=True, appendfsync="everysec") as redisd:
        weak = _run_server_py("--port", "0", "--data-dir", str(tmp_path / "d1"),
                              "--cluster-redis-url", redisd.url)   # durability "always"
        assert weak.returncode == 1 and "appendfsync everysec" in weak.stderr
        assert "[state] durability = always" in weak.stderr
        process = server_process("--cluster-redis-url", redisd.url, "--state-durability",
                                 "batch", data_dir=tmp_path / "d2")
        status, _, _ = request(process, "GET", "/readyz")
        assert status == 200
        assert process.stop() == 0

