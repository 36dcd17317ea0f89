"""One process's link to the others through Redis: ``[cluster] redis_url`` (off by default).

With it set, N onebox processes (on one box with ``[server] reuse_port``, or on several behind
a load balancer) act as one site. Nothing is replicated by onebox itself: Redis holds what the
processes share, and each part keeps its contract:

    the state           ``onebox/store/redis_store.py``: the Store's verbs on Redis
    the guard's buckets ``onebox/limits.py``' shared limiter, counted by a script in Redis
    bans, cache invalidations, live events
                        messages on this module's channels (``tell`` / ``on``): a ban made
                        through one process applies on all, an ``invalidate`` reaches every
                        cache, an event published anywhere reaches every subscriber
    who is in it        each process's heartbeat (``nodes``), for the status page and metrics

What Redis must promise is what ``[state] durability`` promises the areas: "always" needs
``appendonly yes`` and ``appendfsync always`` (acknowledged means durable), "batch" at least
``appendfsync everysec``, "off" nothing. ``connect`` checks it and refuses to start otherwise,
naming the setting: a weaker promise is the operator's explicit choice, never a default.

While Redis is down the process stays up: the store raises (writes and reads answer 503),
``/readyz`` says not ready, the guard counts in-process, and all of it recovers by itself (the
client retries with backoff; the subscription resubscribes and each part is told, through
``on_reconnect``, to catch up on what it may have missed).

Threads: ``connect`` and ``on``/``on_reconnect`` run on the main thread before ``start``; the
subscription's thread runs the channels' callbacks; the heartbeat thread writes ``_nodes`` and
``_seen_at``; ``tell`` and the readers run on any thread. The counters are plain ints written by
those threads (a lost increment under a race costs a metric's unit, never an answer).

Imports only the standard library and ``onebox.redis``.
"""
import json
import os
import socket
import sys
import threading
import time

from onebox.redis import Redis, RedisError, RedisUnavailable, password_from_environment

__all__ = ["Cluster", "ClusterError", "connect_cluster", "HEARTBEAT_S", "NODE_TTL_S"]

HEARTBEAT_S = 1.0     # how often a process says it is alive (and looks at the others)
NODE_TTL_S = 5.0      # a process not heard from for this long is out of the cluster

# [state] durability -> the appendfsync values that keep its promise
_FSYNC_KEEPS = {"always": ("always",), "batch": ("always", "everysec"), "off": None}


class ClusterError(Exception):
    """The cluster cannot be joined at start-up; the message names the setting and the fix."""


class Cluster(object):
    """The shared Redis client, the channels and the heartbeat of one process."""

    def __init__(self, settings, durability="always", log=None, redis=None):
        """``settings``: the [cluster] section; ``durability``: [state] durability;
        ``log(message)``: the server's error log (stderr until it exists)."""
        self.settings = settings
        self.durability = durability
        self.log = log or _log_stderr
        self.prefix = settings.key_prefix
        self.redis = redis or Redis(settings.redis_url, password=password_from_environment(),
                                    timeout=settings.timeout_s,
                                    connect_timeout=settings.timeout_s,
                                    pool_size=settings.connections)
        self.node = "%s:%d:%s" % (socket.gethostname(), os.getpid(),
                                  os.urandom(3).hex())   # unique even when pids repeat
        # What precedes every payload on a channel: who sent it (``tell``, and a Lua script
        # that publishes by itself, as the events' does, puts it first; ``_deliver`` reads it)
        self.envelope = self.node.encode("ascii") + b"\n"
        self.label = self.node        # what the status page shows; start() adds the address
        self.started_at = time.time()
        self._handlers = {}           # channel name -> callback(payload, from_self)
        self._reconnect = []          # callbacks run when the subscription is back
        self._subscription = None
        self._heartbeat = None
        self._stop = threading.Event()
        self._nodes = []              # the live processes, as the last heartbeat saw them
        self._ever_up = False
        self._subscribed = threading.Event()   # set at the first subscription (start waits)
        self.sent = self.received = self.send_failures = 0

    def key(self, name):
        """The Redis key of ``name``: every key onebox writes starts with ``[cluster]
        key_prefix``, so that two sites can share one Redis."""
        return self.prefix + name

    def channel(self, name):
        return self.prefix + "channel:" + name

    # -- start-up ----------------------------------------------------------------------------
    def connect(self):
        """Reach Redis and check that it keeps ``[state] durability``'s promise, else raise
        ClusterError. The main thread, at start-up."""
        url = self.settings.redis_url
        try:
            self.redis.call("PING")
        except RedisUnavailable as error:
            raise ClusterError("[cluster] redis_url %s: %s; start redis-server or fix the url"
                               % (url, error))
        except RedisError as error:
            raise ClusterError("[cluster] redis_url %s: redis refused: %s (a password goes in "
                               "ONEBOX_REDIS_PASSWORD or the credential redis_password)"
                               % (url, error))
        keeps = _FSYNC_KEEPS[self.durability]
        if keeps is None:
            return
        try:
            appendonly = _config_get(self.redis, "appendonly")
            appendfsync = _config_get(self.redis, "appendfsync")
        except (RedisError, RedisUnavailable) as error:
            raise ClusterError(
                "[cluster] redis_url %s: cannot read redis's persistence settings (%s); "
                "allow CONFIG GET, or set [state] durability = off to accept whatever redis "
                "keeps" % (url, error))
        if appendonly != "yes" or appendfsync not in keeps:
            raise ClusterError(
                "[cluster] redis_url %s: redis has appendonly %s, appendfsync %s, which does "
                "not keep [state] durability = %s (it needs appendonly yes and appendfsync %s); "
                "set them in redis.conf, or choose a weaker [state] durability explicitly"
                % (url, appendonly, appendfsync, self.durability, " or ".join(keeps)))

    def on(self, name, callback):
        """Call ``callback(payload_bytes, from_self)`` for each message told on channel
        ``name`` (by any process, this one included). Before ``start``."""
        if name in self._handlers:
            raise ValueError("channel %r has a handler already" % name)
        self._handlers[name] = callback

    def on_reconnect(self, callback):
        """Call ``callback()`` each time the subscription is back after a loss: messages told
        while it was down are lost, and the part catches up from Redis itself."""
        self._reconnect.append(callback)

    def start(self, label=None):
        """Subscribe to the channels and start the heartbeat. ``label``: how the status page
        names this process (its URL). Returns once Redis has confirmed the subscriptions (or
        after ``[cluster] timeout_s``, logged; /readyz says not ready until they hold): a
        message told before then would not reach this process, and a cache entry made
        meanwhile would miss its invalidation (tests/test_cluster_events.py saw 3 in 6)."""
        if label:
            self.label = label
        channels = [self.channel(name) for name in sorted(self._handlers)]
        self._subscription = self.redis.subscribe(channels or [self.channel("nodes")],
                                                  self._deliver, self._state_changed)
        self._heartbeat = threading.Thread(target=self._beat, name="onebox-cluster",
                                           daemon=True)
        self._heartbeat.start()
        if not self._subscribed.wait(self.settings.timeout_s):
            self.log("cluster: not subscribed to redis after %g s; serving on, not ready "
                     "until it is" % self.settings.timeout_s)

    def close(self):
        """Leave: stop the threads, drop this process from the list, close the client."""
        self._stop.set()
        if self._subscription is not None:
            self._subscription.close()
        if self._heartbeat is not None:
            self._heartbeat.join(2.0)
        try:
            self.redis.call("HDEL", self.key("nodes"), self.node)
        except (RedisError, RedisUnavailable):
            pass
        self.redis.close()

    # -- messages ----------------------------------------------------------------------------
    def tell(self, name, payload):
        """Publish ``payload`` (str or bytes) on channel ``name``; whether Redis took it.
        Every process's handler gets it, this one's too (from_self True)."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        try:
            self.redis.call("PUBLISH", self.channel(name), self.envelope + payload)
        except (RedisError, RedisUnavailable):
            self.send_failures += 1
            return False
        self.sent += 1
        return True

    def _deliver(self, channel, data):
        name = channel.decode("utf-8", "replace")[len(self.prefix) + len("channel:"):]
        handler = self._handlers.get(name)
        if handler is None:
            return
        sender, _, payload = data.partition(b"\n")
        self.received += 1
        handler(payload, sender + b"\n" == self.envelope)

    def _state_changed(self, up):
        if not up:
            self.log("cluster: lost the subscription to redis; retrying")
            return
        if self._ever_up:
            self.log("cluster: subscribed to redis again")
            for callback in self._reconnect:
                try:
                    callback()
                except Exception as error:   # one part's catch-up must not stop the others'
                    self.log("cluster: catching up after a reconnect failed: %r" % (error,))
        self._ever_up = True
        self._subscribed.set()

    # -- who is in it ------------------------------------------------------------------------
    def _beat(self):
        while not self._stop.is_set():
            self._beat_once()
            self._stop.wait(HEARTBEAT_S)

    def _beat_once(self):
        now = time.time()
        record = json.dumps({"label": self.label, "pid": os.getpid(),
                             "host": socket.gethostname(), "started": self.started_at,
                             "seen": now})
        key = self.key("nodes")
        try:
            replies = self.redis.pipeline([("HSET", key, self.node, record), ("HGETALL", key)])
        except RedisUnavailable:
            self._nodes = []
            return
        nodes, stale = [], []
        flat = replies[1] if isinstance(replies[1], list) else []
        for node, text in zip(flat[::2], flat[1::2]):
            try:
                seen = json.loads(text)
            except ValueError:
                stale.append(node)
                continue
            if now - seen.get("seen", 0) > NODE_TTL_S * 12:   # long gone: tidy the table
                stale.append(node)
            elif now - seen.get("seen", 0) <= NODE_TTL_S:
                seen["node"] = node.decode("utf-8", "replace")
                seen["self"] = seen["node"] == self.node
                nodes.append(seen)
        if stale:
            try:
                self.redis.call("HDEL", key, *stale)
            except (RedisError, RedisUnavailable):
                pass
        nodes.sort(key=lambda seen: seen["node"])
        self._nodes = nodes

    @property
    def node_count(self):
        """How many processes the last heartbeat heard from (no copy of the list)."""
        return len(self._nodes)

    def nodes(self):
        """The processes heard from within NODE_TTL_S, as of the last heartbeat: dicts with
        node, label, pid, host, started, seen and self."""
        return list(self._nodes)

    @property
    def up(self):
        """Whether Redis answers and the subscription holds (what /readyz goes by)."""
        subscription = self._subscription
        return self.redis.up and (subscription is None or subscription.up)

    def readiness(self):
        """None when ready, else why not (one line, for /readyz)."""
        return None if self.up else "redis unavailable"

    def stats(self):
        return {"up": self.up, "nodes": len(self._nodes), "sent": self.sent,
                "received": self.received, "send_failures": self.send_failures}


def connect_cluster(config, log=None):
    """The process's Cluster per [cluster] (None when redis_url is empty), connected and
    checked; raises ClusterError."""
    settings = config.cluster
    if not settings.redis_url:
        return None
    try:
        cluster = Cluster(settings, config.state.durability, log)
    except ValueError as error:   # the url
        raise ClusterError("[cluster] redis_url: %s" % error)
    try:
        cluster.connect()
    except ClusterError:
        cluster.redis.close()
        raise
    return cluster


def _config_get(redis, name):
    reply = redis.call("CONFIG", "GET", name)
    if not reply or len(reply) < 2:
        raise RedisError("ERR CONFIG GET %s answered nothing" % name)
    value = reply[1]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _log_stderr(message):
    sys.stderr.write("%s\n" % message)
    sys.stderr.flush()
