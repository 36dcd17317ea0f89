"""Tests of the store's sorted key index (onebox/store/index.py, ``SortedKeys``): listings stay what
they were -- sorted, filtered by prefix, cut at the limit -- through every way the key set changes,
and cost what they return rather than what is stored (issue 10).

Most tests open a real Store in tmp_path with ``Store.INDEX_BLOCK_KEYS`` lowered to 4, so that a
few hundred keys split blocks many times over; ``check_index`` then looks inside the index (its
blocks are the one thing a listing could get right by luck while being wrong underneath).
"""
import json
import os
import random
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from onebox.store import Store  # noqa: E402  (after the path set-up above)
from onebox.store.index import SortedKeys  # noqa: E402

# Pieces of keys: joined 1 to 4 at a time they give keys that are prefixes of one another
# ("a", "ab", "a/b"), non-ASCII ones, and U+10FFFF, the largest character, where the end of a
# prefix's run of keys has to be found differently (after_prefix).
PIECES = ["a", "ab", "a/", "b", "/", "z", "\u00e9", "\U0001F600", "\U0010ffff"]
PAST_EVERY_KEY = "\U0010ffff" * 5   # longer than any key made of 4 pieces


def random_key(rng):
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 4)))


def open_store(path, **kw):
    kw.setdefault("log", lambda message: None)
    return Store(path, **kw)


def expected(model, prefix, limit):
    keys = sorted(k for k in model if k.startswith(prefix))
    return keys if limit is None else keys[:limit]


def check_listings(store, model, rng):
    """keys() and items() against the model for prefixes of every kind and limits 0, 1, n, None."""
    prefixes = ["", PAST_EVERY_KEY, "\U0010ffff", "zzzzz"] + PIECES
    prefixes += rng.sample(sorted(model), min(5, len(model)))          # keys that are prefixes
    prefixes += [k[:-1] for k in rng.sample(sorted(model), min(5, len(model))) if len(k) > 1]
    for prefix in prefixes:
        for limit in (0, 1, 2, 7, len(model), None):
            want = expected(model, prefix, limit)
            assert store.keys(prefix, limit=limit) == want, (prefix, limit)
        assert store.items(prefix) == [(k, model[k]) for k in expected(model, prefix, None)]
    check_index(store, model)


def check_index(store, model):
    """The index's blocks: non-empty, at most 2 * INDEX_BLOCK_KEYS keys, heads right, and together
    exactly the stored keys in order (no key twice: an overwrite must not insert again)."""
    index = store._index
    limit = 2 * store.INDEX_BLOCK_KEYS
    assert all(0 < len(block) <= limit for block in index._blocks)
    assert index._firsts == [block[0] for block in index._blocks]
    assert [k for block in index._blocks for k in block] == sorted(model)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(Store, "INDEX_BLOCK_KEYS", 4)


# --- listings match a model -------------------------------------------------------------------

@pytest.mark.parametrize("durability, rounds", [("off", 12), ("always", 2)])
def test_listings_match_a_model_through_every_kind_of_write(tmp_path, small_blocks,
                                                            durability, rounds):
    """Random puts of new keys, overwrites, deletes (of present and absent keys), incr and
    transactions, with a compaction and a close + reopen (the load path builds the index) each
    round; every round the listings must equal the model's."""
    rng = random.Random(10)
    d, model = str(tmp_path / "data"), {}
    store = open_store(d, durability=durability)
    try:
        for round_ in range(rounds):
            for i in range(150):
                apply_random_write(store, model, rng, "%d.%d" % (round_, i))
            if round_ == 0:  # from an empty store: every block but the first came from a split
                split_blocks = len(store._index._blocks)
            check_listings(store, model, rng)
            if round_ % 3 == 1:
                store.compact()
                check_listings(store, model, rng)
            store.close()
            store = open_store(d, durability=durability)
            check_listings(store, model, rng)
    finally:
        store.close()
    assert len(model) > 100 and split_blocks > 10, (len(model), split_blocks)


def apply_random_write(store, model, rng, tag):
    """One random write through the store's public API, mirrored in the model."""
    key, roll = random_key(rng), rng.random()
    if roll < 0.45:
        store.put(key, {"v": tag})              # a new key, or an overwrite
        model[key] = {"v": tag}
    elif roll < 0.65:
        assert store.delete(key) is (key in model)  # absent keys too: a no-op
        model.pop(key, None)
    elif roll < 0.75 and isinstance(model.get(key, 0), int):
        model[key] = store.incr(key, 2)
    else:
        with store.transaction() as tx:          # several keys, one record
            for _ in range(rng.randint(1, 5)):
                key = random_key(rng)
                if rng.random() < 0.6:
                    tx.put(key, [tag])
                    model[key] = [tag]
                else:
                    tx.delete(key)
                    model.pop(key, None)


def test_a_transaction_that_puts_then_deletes_a_key_leaves_no_trace(tmp_path, small_blocks):
    with open_store(str(tmp_path / "data"), durability="off") as s:
        s.put("kept", 1)
        with s.transaction() as tx:
            tx.put("brief", 1)
            tx.delete("brief")
            tx.put("kept", 2)                    # an overwrite: the index must not change
        assert s.keys() == ["kept"] and s.items() == [("kept", 2)]
        check_index(s, {"kept": 2})


def test_a_record_deleting_an_absent_key_leaves_the_index_alone(tmp_path, small_blocks):
    """Such a record is journalled when a delete finds its key already removed by a write still
    in flight (Store.delete); applying it must not touch the index. Applied directly: the
    timing that produces it cannot be arranged from outside."""
    with open_store(str(tmp_path / "data"), durability="off") as s:
        for i in range(20):
            s.put("k/%02d" % i, i)
        seq = s.stats()["applied_seq"] + 1
        with s._lock:
            s._apply_locked([("k/absent", None), ("k/05", None), ("k/05", None)], seq)
        model = {"k/%02d" % i: i for i in range(20) if i != 5}
        assert s.keys("k/") == sorted(model)
        check_index(s, model)


# --- the load path: one sort, not an insert per key -------------------------------------------

CHILD = """
import json, os, random, sys
sys.path.insert(0, %r)
from onebox.store import Store
s = Store(sys.argv[1], durability="off", log=lambda m: None)
rng, model = random.Random(5), {}
for phase in ("snapshot", "journal"):
    for i in range(400):
        key = "k/%%d" %% rng.randrange(600)
        if rng.random() < 0.7:
            s.put(key, i)
            model[key] = i
        else:
            s.delete(key)
            model.pop(key, None)
    if phase == "snapshot":
        s.compact()
print(json.dumps(model))
sys.stdout.flush()
os._exit(0)   # no close: the reopen loads the snapshot, then replays the journal
""" % REPO


def test_open_builds_the_index_with_one_sort_after_snapshot_and_journal(tmp_path, monkeypatch,
                                                                        small_blocks):
    d = str(tmp_path / "data")
    r = subprocess.run([sys.executable, "-c", CHILD, d], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    model = json.loads(r.stdout)
    calls = {"build": 0, "add": 0}
    real_init, real_add = SortedKeys.__init__, SortedKeys.add

    def counting_init(self, keys, block_keys):
        calls["build"] += 1
        real_init(self, keys, block_keys)

    def counting_add(self, key):
        calls["add"] += 1
        real_add(self, key)
    monkeypatch.setattr(SortedKeys, "__init__", counting_init)
    monkeypatch.setattr(SortedKeys, "add", counting_add)
    with open_store(d, durability="off") as s:
        assert calls == {"build": 1, "add": 0}   # the replayed puts did not insert one by one
        check_listings(s, model, random.Random(1))
        s.put("k/new", 1)                        # and the built index is live
        model["k/new"] = 1
        assert calls["add"] == 1
        check_listings(s, model, random.Random(2))


# --- cost: what a listing returns, not what is stored -----------------------------------------

class CountingDict(dict):
    """Stands in for Store._data: counts whole-dict reads and single lookups."""

    def __init__(self, *args):
        super().__init__(*args)
        self.whole, self.lookups = 0, 0

    def items(self):
        self.whole += 1
        return super().items()

    def keys(self):
        self.whole += 1
        return super().keys()

    def values(self):
        self.whole += 1
        return super().values()

    def __iter__(self):
        self.whole += 1
        return super().__iter__()

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)


class CountingKey(str):
    """A key that counts the order comparisons made with it: a sort or a scan of every key
    makes one or more per key; a bisect makes a handful."""
    compared = 0

    def __lt__(self, other):
        CountingKey.compared += 1
        return str.__lt__(self, other)

    def __gt__(self, other):
        CountingKey.compared += 1
        return str.__gt__(self, other)


def test_a_listing_with_a_limit_touches_only_what_it_returns(tmp_path):
    """items(prefix, limit=10) in a 50,000-key store: no copy or scan of the dict, 10 lookups,
    and a few dozen key comparisons (the listing it replaced copied every pair and sorted the
    25,000 matches: 24,999 comparisons at best, keys put in order). Counted, not timed, so a slow
    machine cannot fail it."""
    with open_store(str(tmp_path / "data"), durability="off") as s:
        with s.transaction() as tx:
            for i in range(50000):
                tx.put(CountingKey("%s/%05d" % ("ab"[i % 2], i)), i)
        s._data = data = CountingDict(s._data)
        for prefix, first in (("a/", 0), ("b/", 1), ("", 0), ("b/0123", 1231)):
            data.whole, data.lookups, CountingKey.compared = 0, 0, 0
            got = s.items(prefix, limit=10)
            assert [k for k, _ in got][:1] == ["%s/%05d" % (prefix[:1] or "a", first)]
            assert len(got) == 10 or prefix == "b/0123"
            assert data.whole == 0 and data.lookups == len(got)
            assert CountingKey.compared < 50, (prefix, CountingKey.compared)
