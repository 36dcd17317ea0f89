"""onebox/redis.py against a real redis-server (tests/redisd.py starts one per test): replies,
pipelines, transactions, scripts, AUTH, SELECT, unix sockets, TLS, timeouts, a server killed
and restarted, pub/sub, threads; and parse_url / password_from_environment, which need none."""
import os
import queue
import signal
import threading
import time

import pytest

from conftest import wait_until
from onebox.redis import (Redis, RedisError, RedisUnavailable, parse_url,
                          password_from_environment)
from redisd import needs_redis, redis_server


@pytest.fixture
def redisd(tmp_path):
    if needs_redis.args[0]:
        pytest.skip(needs_redis.kwargs["reason"])
    with redis_server(tmp_path) as server:
        yield server


@pytest.fixture
def client(redisd):
    redis = Redis(redisd.url)
    yield redis
    redis.close()


# --- configuration, no server needed ---------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("redis://127.0.0.1:6380/2", ("redis", "127.0.0.1", 6380, 2, None, False)),
    ("redis://localhost", ("redis", "localhost", 6379, 0, None, False)),
    ("redis://localhost/", ("redis", "localhost", 6379, 0, None, False)),
    ("rediss://cache.example.org:6390/0", ("rediss", "cache.example.org", 6390, 0, None, True)),
    ("redis://[::1]:7000/15", ("redis", "::1", 7000, 15, None, False)),
    ("unix:///run/redis/redis.sock", ("unix", None, None, 0, "/run/redis/redis.sock", False)),
    ("unix:///run/redis/redis.sock?db=3", ("unix", None, None, 3, "/run/redis/redis.sock", False)),
])
def test_parse_url_accepts(url, expected):
    assert tuple(parse_url(url)) == expected
    address = parse_url(url)
    assert (address.scheme, address.host, address.port, address.db, address.path,
            address.tls) == expected


@pytest.mark.parametrize("url, words", [
    ("http://localhost:6379/", "scheme"),
    ("redis://", "no host"),
    ("redis://localhost:99999/", "port"),
    ("redis://localhost:port/", "port"),
    ("redis://localhost/one", "db"),
    ("redis://localhost/-1", "db"),
    ("redis://localhost/1?timeout=3", "parameters"),
    ("redis://localhost/1#x", "fragment"),
    ("unix://relative/redis.sock", "unix:///absolute"),
    ("unix:///run/redis.sock?db=x", "db"),
    ("unix:///run/redis.sock?tls=1", "db=N"),
    ("localhost:6379", "scheme"),
])
def test_parse_url_refuses(url, words):
    with pytest.raises(ValueError, match=words):
        parse_url(url)


@pytest.mark.parametrize("url", ["redis://:sesame@localhost/", "redis://alice:sesame@localhost/",
                                 "rediss://alice@localhost:6380/1"])
def test_parse_url_refuses_credentials_without_echoing_them(url):
    with pytest.raises(ValueError) as refused:
        parse_url(url)
    assert str(refused.value) == ("put the password in ONEBOX_REDIS_PASSWORD or a systemd "
                                  "credential, not the url")
    with pytest.raises(ValueError):
        Redis(url)


def test_password_from_the_environment_then_the_credential(tmp_path):
    (tmp_path / "redis_password").write_text("from-credential\n")
    both = {"ONEBOX_REDIS_PASSWORD": "from-env", "CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert password_from_environment(environ=both) == "from-env"
    assert password_from_environment(environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}) == \
        "from-credential"
    assert password_from_environment("other", environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}) \
        is None
    assert password_from_environment(environ={}) is None
    assert password_from_environment(env="MY_PW", environ={"MY_PW": "x y"}) == "x y"


# --- replies ---------------------------------------------------------------------------------

def test_replies_of_each_type(client):
    assert client.call("PING") == "PONG"
    assert client.call("SET", "k", "v") == "OK"
    assert client.call("GET", "k") == b"v"
    assert client.call("GET", "missing") is None
    assert client.call("SET", "empty", b"") == "OK"
    assert client.call("GET", "empty") == b""
    assert client.call("INCRBY", "n", -5) == -5
    assert client.call("INCRBYFLOAT", "f", 1.5) == b"1.5"
    assert client.call("RPUSH", "list", "a", b"b", 3) == 3
    assert client.call("LRANGE", "list", 0, -1) == [b"a", b"b", b"3"]
    assert client.call("LRANGE", "nolist", 0, -1) == []
    assert client.call("BLPOP", "nolist", 0.01) is None   # a null array
    nested = client.call("EVAL", "return {1, {'a', {2, 'b'}}, {}}", 0)
    assert nested == [1, [b"a", [2, b"b"]], []]


def test_non_ascii_and_binary_values(client):
    client.call("SET", "clé", "日本語 ünïcode")
    assert client.call("GET", "clé").decode("utf-8") == "日本語 ünïcode"
    assert client.call("KEYS", "cl*") == ["clé".encode("utf-8")]
    binary = bytes(range(256)) * 4 + b"\r\n$3\r\n"
    client.call("SET", b"\x00\xff", binary)
    assert client.call("GET", b"\x00\xff") == binary


def test_a_large_value_split_across_reads(client):
    big = os.urandom(1024 * 1024)
    assert client.call("SET", "big", big) == "OK"
    assert client.call("GET", "big") == big
    assert client.call("STRLEN", "big") == len(big)
    assert client.pipeline([("GET", "big"), ("GET", "big"), ("PING",)]) == [big, big, "PONG"]


def test_an_error_reply_raises_redis_error_with_its_code(client):
    client.call("SET", "s", "text")
    with pytest.raises(RedisError) as wrong:
        client.call("LPUSH", "s", "x")
    assert wrong.value.code == "WRONGTYPE"
    assert str(wrong.value).startswith("WRONGTYPE Operation against a key")
    with pytest.raises(RedisError) as unknown:
        client.call("NOSUCHCOMMAND")
    assert unknown.value.code == "ERR"
    assert client.call("GET", "s") == b"text"   # the connection is still good
    assert client.up


@pytest.mark.parametrize("argument", [None, True, [1], {"a": 1}])
def test_arguments_of_other_types_are_refused_before_sending(client, argument):
    with pytest.raises(TypeError):
        client.call("SET", "k", argument)
    with pytest.raises(TypeError):
        client.pipeline([("PING",), ("SET", "k", argument)])
    assert client.call("EXISTS", "k") == 0


# --- pipelines, transactions, scripts --------------------------------------------------------

def test_a_pipeline_of_1000_commands(client):
    replies = client.pipeline([("INCR", "counter")] * 1000)
    assert replies == list(range(1, 1001))
    assert client.pipeline([]) == []


def test_a_pipeline_returns_error_replies_in_their_place(client):
    replies = client.pipeline([("SET", "s", "x"), ("LPUSH", "s", "y"), ("GET", "s")])
    assert replies[0] == "OK" and replies[2] == b"x"
    assert isinstance(replies[1], RedisError) and replies[1].code == "WRONGTYPE"


def test_a_transaction(client):
    assert client.transaction([("SET", "a", 1), ("INCR", "a"), ("GET", "a")]) == ["OK", 2, b"2"]
    mixed = client.transaction([("SET", "s", "x"), ("LPUSH", "s", "y"), ("GET", "s")])
    assert mixed[0] == "OK" and mixed[2] == b"x"
    assert isinstance(mixed[1], RedisError) and mixed[1].code == "WRONGTYPE"


def test_a_transaction_redis_refuses_raises_execabort(client):
    with pytest.raises(RedisError) as aborted:
        client.transaction([("SET", "a", 1), ("NOSUCHCOMMAND",)])
    assert aborted.value.code == "EXECABORT"
    assert client.call("EXISTS", "a") == 0
    assert client.call("PING") == "PONG"   # and the connection left MULTI


def eval_calls(client):
    stats = client.call("INFO", "commandstats").decode()
    line = [line for line in stats.splitlines() if line.startswith("cmdstat_eval:")]
    return int(line[0].split("calls=")[1].split(",")[0]) if line else 0


def test_a_script_by_sha_then_again_after_script_flush(client):
    script = client.script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert len(script.sha) == 40
    assert client.call("SCRIPT", "LOAD", script.source).decode() == script.sha
    assert script(keys=["n"], args=[5]) == 5
    assert eval_calls(client) == 0   # EVALSHA sufficed
    client.call("SCRIPT", "FLUSH")
    assert script(keys=["n"], args=[2]) == 7   # NOSCRIPT, then EVAL once
    assert eval_calls(client) == 1
    assert script(keys=["n"], args=[1]) == 8   # EVAL loaded it again
    assert eval_calls(client) == 1
    with pytest.raises(RedisError) as failed:
        client.script("return redis.error_reply('MINE went wrong')")()
    assert failed.value.code == "MINE"


# --- connecting: AUTH, SELECT, unix socket, TLS ----------------------------------------------

@needs_redis
def test_auth_right_wrong_and_missing(tmp_path):
    with redis_server(tmp_path, requirepass="sesame-0123") as server:
        right = Redis(server.url, password="sesame-0123")
        assert right.call("PING") == "PONG"
        wrong = Redis(server.url, password="nope")
        with pytest.raises(RedisUnavailable, match="WRONGPASS"):
            wrong.call("PING")
        assert not wrong.up and not wrong.ping()
        missing = Redis(server.url)
        with pytest.raises(RedisError) as refused:
            missing.call("GET", "k")
        assert refused.value.code == "NOAUTH"
        assert right.call("ACL", "SETUSER", "alice", "on", ">alice-pw", "~*", "+@all") == "OK"
        alice = Redis(server.url, username="alice", password="alice-pw")
        assert alice.call("ACL", "WHOAMI") == b"alice"
        for redis in (right, wrong, missing, alice):
            redis.close()


def test_select_db_from_the_url(redisd, client):
    on_three = Redis(redisd.url + "3")
    try:
        on_three.call("SET", "k", "three")
        assert on_three.pipeline([("GET", "k")] * 20) == [b"three"] * 20
        assert client.call("GET", "k") is None
        client.call("SELECT", 3)   # only this connection moves; the pool's others stay on 0
        assert client.call("GET", "k") == b"three"
    finally:
        on_three.close()


@needs_redis
def test_a_unix_socket(tmp_path):
    with redis_server(tmp_path, unix=True) as server:
        redis = Redis(server.unix_url + "?db=1")
        assert redis.call("SET", "k", "v") == "OK"
        assert server.unix_path.encode() in redis.call("CLIENT", "INFO")
        over_tcp = Redis(server.url + "1")
        assert over_tcp.call("GET", "k") == b"v"
        for client in (redis, over_tcp):
            client.close()


@needs_redis
def test_tls_with_a_self_signed_ca(tmp_path):
    with redis_server(tmp_path, tls=True) as server:
        assert server.url.startswith("rediss://")
        redis = Redis(server.url, ssl_context=server.ssl_context())
        assert redis.call("SET", "k", "über") == "OK"
        assert redis.call("GET", "k") == "über".encode()
        big = os.urandom(300 * 1024)
        assert redis.pipeline([("SET", "big", big), ("GET", "big")]) == ["OK", big]
        redis.close()
        untrusted = Redis(server.url)   # the default context: the system's CAs only
        with pytest.raises(RedisUnavailable, match="certificate verify failed"):
            untrusted.call("PING")
        plain = Redis(server.url.replace("rediss", "redis"), timeout=0.5)
        assert not plain.ping()


# --- failures --------------------------------------------------------------------------------

def test_a_timeout_discards_the_connection(redisd):
    redis = Redis(redisd.url, timeout=0.3, pool_size=1)
    first = redis.call("CLIENT", "ID")
    assert redis.call("CLIENT", "ID") == first   # one pooled connection, reused
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match="timed out"):
        redis.call("DEBUG", "SLEEP", 1)
    assert time.monotonic() - started < 0.9
    assert not redis.up
    assert wait_until(redis.ping, 5.0)   # the server woke up
    assert redis.up
    assert redis.call("CLIENT", "ID") not in (first, "OK")   # a new connection, not DEBUG's
    redis.close()


def test_a_killed_server_fails_fast_during_backoff_then_recovers(redisd):
    redis = Redis(redisd.url, connect_timeout=1.0)
    redis.call("SET", "k", "v")
    assert redis.up
    redisd.kill()
    with pytest.raises(RedisUnavailable, match="127.0.0.1:%d" % redisd.port):
        redis.call("GET", "k")
    assert not redis.up
    started = time.monotonic()
    for _ in range(100):   # within the backoff: no connect tried at all
        with pytest.raises(RedisUnavailable, match="next try in"):
            redis.call("GET", "k")
    assert time.monotonic() - started < 0.5
    assert redis.ping() is False
    redisd.restart()
    assert wait_until(redis.ping, 5.0)   # by itself, once the backoff passes
    assert redis.up
    assert redis.call("SET", "k", "again") == "OK"
    redis.close()


def test_a_restart_costs_no_caller_an_error(redisd, client):
    for _ in range(4):   # several pooled connections, all of them closed by the restart
        threads = [threading.Thread(target=client.call, args=("PING",)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    redisd.restart()
    assert client.pipeline([("PING",)] * 3) == ["PONG"] * 3
    assert client.call("DBSIZE") == 0


def test_a_server_that_never_answers_times_out(redisd):
    redis = Redis(redisd.url, timeout=0.3)
    assert redis.ping()
    redisd.kill(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="timed out"):
            redis.call("PING")
        assert time.monotonic() - started < 1.5
    finally:
        redisd.kill(signal.SIGCONT)
    assert wait_until(redis.ping, 5.0)
    redis.close()


def test_close(client):
    assert client.ping()
    client.close()
    with pytest.raises(RedisUnavailable, match="closed"):
        client.call("PING")
    assert client.ping() is False


# --- threads ---------------------------------------------------------------------------------

def test_threads_share_one_client(redisd):
    redis = Redis(redisd.url, pool_size=3)
    errors = []

    def add():
        try:
            for _ in range(500):
                redis.call("INCR", "shared")
        except Exception as error:   # reported below: a thread's exception is lost otherwise
            errors.append(error)
    threads = [threading.Thread(target=add) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert redis.call("GET", "shared") == b"4000"
    watcher = Redis(redisd.url, pool_size=1)   # extras beyond pool_size were closed
    assert wait_until(lambda: watcher.call("CLIENT", "LIST").count(b"\n") <= 3 + 1, 5.0)
    redis.close()
    watcher.close()


# --- pub/sub ---------------------------------------------------------------------------------

def test_pubsub_delivery_then_reconnect_after_a_restart(redisd, client):
    messages, states = queue.Queue(), queue.Queue()
    subscription = client.subscribe(["news", b"sport"], lambda channel, data:
                                    messages.put((channel, data)), states.put)
    assert states.get(timeout=5) is True and subscription.up
    assert client.call("PUBLISH", "news", "héllo") == 1
    client.call("PUBLISH", "sport", b"\x00goal")
    client.call("PUBLISH", "other", "unheard")
    assert messages.get(timeout=5) == (b"news", "héllo".encode())
    assert messages.get(timeout=5) == (b"sport", b"\x00goal")
    redisd.kill()
    assert states.get(timeout=5) is False and not subscription.up
    redisd.restart()
    assert states.get(timeout=5) is True   # subscribed again by itself
    assert client.call("PUBLISH", "news", "back") == 1
    assert messages.get(timeout=5) == (b"news", b"back")
    assert messages.empty()   # "unheard" never came
    started = time.monotonic()
    subscription.close()
    assert time.monotonic() - started < 1.0
    assert not subscription.up and client.call("PUBLISH", "news", "x") == 0
    assert states.empty()   # closing on purpose is not reported as a loss


def test_a_failing_callback_is_logged_once_and_the_thread_goes_on(client, capsys):
    received = queue.Queue()

    def on_message(channel, data):
        received.put(data)
        if data == b"bad":
            raise ValueError("callback bug")
    subscription = client.subscribe("c", on_message)
    assert wait_until(lambda: subscription.up, 5.0)
    for data in (b"bad", b"bad", b"good"):
        client.call("PUBLISH", "c", data)
    assert [received.get(timeout=5) for _ in range(3)] == [b"bad", b"bad", b"good"]
    assert subscription.up
    subscription.close()
    err = capsys.readouterr().err
    assert err.count("ValueError: callback bug") == 1
    assert "a subscription callback failed" in err


def test_closing_the_client_closes_its_subscriptions(client):
    subscription = client.subscribe(["c"], lambda channel, data: None)
    assert wait_until(lambda: subscription.up, 5.0)
    client.close()
    assert not subscription.up


# --- the helper itself, for the crash tests built on it ---------------------------------------

@needs_redis
def test_redisd_keeps_appendonly_data_across_a_crash(tmp_path):
    with redis_server(tmp_path, appendonly=True, appendfsync="always") as server:
        redis = Redis(server.url)
        assert redis.call("CONFIG", "GET", "appendfsync") == [b"appendfsync", b"always"]
        redis.call("SET", "kept", "yes")
        port = server.port
        server.kill()   # SIGKILL: no clean shutdown
        server.restart()
        assert server.port == port
        assert wait_until(redis.ping, 5.0)
        assert redis.call("GET", "kept") == b"yes"
        redis.close()
    (tmp_path / "other").mkdir()
    with redis_server(tmp_path / "other", config={"maxmemory": "10mb"}) as other:
        redis = Redis(other.url)
        assert redis.call("CONFIG", "GET", "maxmemory") == [b"maxmemory", b"10485760"]
        redis.close()
