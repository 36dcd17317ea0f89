"""The sorted key index: the store's keys in order, so that a listing costs what it returns.

Invariants: holds exactly the keys of ``Store._data`` (the very key objects, no copies), changed
only where a key enters or leaves it (``Store._apply_locked``) and built once after loading;
guarded by ``Store._lock``, like the dict it mirrors. Every block holds at least one key.

Imports the standard library only.
"""
from bisect import bisect_left, bisect_right, insort
from itertools import islice


class SortedKeys(object):
    """The store's keys in order, so that a listing costs O(log n + what it returns) rather than
    a copy and a sort of every key (issue 10: ``items("n/", limit=1)`` took 27 ms at 100k keys).

    A list of sorted blocks plus the first key of each, for bisect. Adding or removing a key costs
    two bisects and one insert or delete in one block, a memmove of at most ``2 * block_keys``
    pointers, where one flat sorted list would move up to every key (~0.2 ms per new key at a
    million). A block that grows past ``2 * block_keys`` is split in two; an emptied one is
    dropped. Blocks are never merged: every block holds at least one key, so there are never more
    blocks than keys, and a listing visits at most two blocks more than the keys it returns.

    It holds the very key objects of ``Store._data`` (no copies; ~9 bytes per key, see docs/design.md).
    Guarded by ``Store._lock``, like the dict it mirrors; the store changes it exactly where a
    key enters or leaves ``_data`` (``_apply_locked``), and builds it once after loading.
    """

    def __init__(self, keys, block_keys):
        ordered = sorted(keys)
        self._block_keys = block_keys
        self._blocks = [ordered[i:i + block_keys] for i in range(0, len(ordered), block_keys)]
        self._firsts = [block[0] for block in self._blocks]

    def add(self, key):
        """Insert key, which must not be in the index."""
        if not self._blocks:
            self._blocks.append([key])
            self._firsts.append(key)
            return
        i = max(bisect_right(self._firsts, key) - 1, 0)  # below every key: the first block
        block = self._blocks[i]
        insort(block, key)
        self._firsts[i] = block[0]
        if len(block) > 2 * self._block_keys:
            half = len(block) // 2
            self._blocks.insert(i + 1, block[half:])
            self._firsts.insert(i + 1, block[half])
            del block[half:]

    def remove(self, key):
        """Remove key, which must be in the index."""
        i = bisect_right(self._firsts, key) - 1
        block = self._blocks[i]
        del block[bisect_left(block, key)]
        if block:
            self._firsts[i] = block[0]
        else:
            del self._blocks[i], self._firsts[i]

    def starting_with(self, prefix, limit):
        """The keys starting with prefix, in order: the first ``limit`` of them, or all if None.
        In sorted order they are one run, from prefix up to after_prefix(prefix): the walk
        bisects to its start, then copies slices of blocks until the run or the limit ends."""
        if not self._blocks:
            return []
        end = after_prefix(prefix)
        i = max(bisect_right(self._firsts, prefix) - 1, 0)
        start = bisect_left(self._blocks[i], prefix)
        out = []
        for block in islice(self._blocks, i, None):
            stop = len(block) if end is None or block[-1] < end else bisect_left(block, end)
            if limit is not None:
                stop = min(stop, start + limit - len(out))
            out += block[start:stop]
            if stop < len(block) or len(out) == limit:
                break
            start = 0
        return out


def after_prefix(prefix):
    """The string that ends the run of keys starting with prefix: those keys are exactly the ones
    in [prefix, after_prefix(prefix)). None if nothing sorts after them all (prefix is empty or
    all U+10FFFF, the largest character). "ab" -> "ac"; "a" + U+10FFFF -> "b": a key from
    "a" + U+10FFFF up to "b" starts with "a" and has U+10FFFF second, so it starts with prefix."""
    head = prefix.rstrip("\U0010ffff")
    if not head:
        return None
    return head[:-1] + chr(ord(head[-1]) + 1)
