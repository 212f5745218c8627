"""Batches of a few fixed shapes from a token cache: a seeded whole-corpus order per epoch, then buckets or packing.

Each epoch visits the cache's pairs in `np.random.default_rng([data.seed, epoch]).permutation` order
(the identity without shuffling): every epoch a new order over the whole split, reproducible from the
seed. Pairs then go into batches in one of two ways:

- `data.pack=True` (default): several pairs share a row of the largest bucket length L, kept apart by
  segment ids and positions that restart per pair. Each batch takes the next pairs in epoch order until
  they hold about the batch's capacity, sorts them longest first and places each in the first row with
  room on both sides (first-fit decreasing); what does not fit is carried, in order, into the next
  batch. One shape, and over 90% of the slots are real tokens on Multi30k and WMT-like lengths.
- `data.pack=False`: one pair per row, in the smallest bucket of data.bucket_lengths that holds it; a
  bucket becomes a batch when it holds B rows. A shape per bucket; padding is what separates a pair's
  length from its bucket's.

Batch format, all int32 [B, L], padded with PAD_ID:
    src      source tokens + EOS
    tgt_in   BOS + target tokens    (decoder input)
    tgt_out  target tokens + EOS    (labels)
  with data.pack=True also src_segments/tgt_segments (1, 2, ... per pair in a row, 0 on padding) and
  src_positions/tgt_positions (restarting at 0 for each pair).
B is `batch_size_for(L, data.tokens_per_batch, ...)`: data.tokens_per_batch counts batch slots (rows x
length, padding included) per side, over all processes together, rounded down to a multiple of the
local device count. `jit` compiles once per shape: at most len(data.bucket_lengths), one with packing.

With `repeat`, epochs follow each other forever and pairs waiting in a bucket (or in the packing carry)
at an epoch's end are batched in the next, so every batch is full; without, the split is read once and
what is left at the end is emitted in batches padded with all-PAD rows.

Resuming: `state_dict()` is a small JSON position (epoch, place in the epoch's order, the ids of the
pairs waiting in buckets or the carry, counters). Loading it into a fresh iterator over the same cache
yields exactly the batches the saved one would have yielded next; with another device count or token
budget (another B) it yields every remaining pair once.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable

import numpy as np

from jaxformer.data.cache import TokenCache
from jaxformer.data.common import BOS_ID, EOS_ID, PAD_ID, SKIP_REASONS, DataError

log = logging.getLogger(__name__)

_STATE_VERSION = 2
# Packing reads pairs worth this much more than a batch holds, so the smallest ones can fill the gaps the
# largest leave; what does not fit is carried into the next batch (never dropped).
_PACK_OVERFILL = 1.05


def batch_size_for(length: int, tokens_per_batch: int, num_devices: int = 1, process_count: int = 1) -> int:
    """Rows per process for bucket `length`: ~tokens_per_batch/process_count slots, a multiple of num_devices."""
    rows = max(1, int(tokens_per_batch) // int(process_count) // int(length))
    return max(num_devices, rows // num_devices * num_devices)


def padding_efficiency(batches) -> float:
    """Real (non-PAD) tokens / batch slots, source and target together: 1.0 is no padding."""
    real = slots = 0
    for b in batches:
        real += int(np.count_nonzero(b["src"])) + int(np.count_nonzero(b["tgt_out"]))
        slots += b["src"].size + b["tgt_out"].size
    return real / max(slots, 1)


def _ranges(starts, lengths) -> np.ndarray:
    """arange(start, start + length) for each (start, length), concatenated."""
    lengths = np.asarray(lengths, np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, np.int64) - before, lengths) + np.arange(int(lengths.sum()))


def _encode_ints(values) -> str:
    return base64.b64encode(np.asarray(values, np.int32).tobytes()).decode()


def _decode_ints(text: str) -> list[int]:
    return np.frombuffer(base64.b64decode(text), np.int32).tolist()


class BatchIterator:
    """Batches of `cache`'s pairs (see the module docstring); resumable with `state_dict`.

    `cache` is a `TokenCache` or a function returning one: then the first pass (tokenizing into the
    cache) runs when the first batch or a saved position is asked for.
    """

    def __init__(self, cache: TokenCache | Callable[[], TokenCache], data_cfg, *, num_devices: int = 1,
                 process_count: int = 1, repeat: bool = True, shuffle: bool = True, seed: int = 0):
        self._cache_fn = cache if callable(cache) else (lambda: cache)
        self._cache: TokenCache | None = None
        self.repeat, self.shuffle, self.seed = bool(repeat), bool(shuffle), int(seed)
        self.num_devices, self.process_count = int(num_devices), int(process_count)
        self.pack = bool(data_cfg.pack)
        self.lengths = sorted(int(x) for x in data_cfg.bucket_lengths)
        if not self.lengths or self.lengths[0] < 2:
            raise DataError(f"data.bucket_lengths={tuple(data_cfg.bucket_lengths)} must be lengths >= 2")
        self.max_len = min(int(data_cfg.max_len), self.lengths[-1])
        if int(data_cfg.max_len) > self.lengths[-1]:
            log.warning("data.max_len=%d exceeds the largest bucket %d; pairs longer than %d are skipped",
                        data_cfg.max_len, self.lengths[-1], self.lengths[-1])
        self.tokens_per_batch = int(data_cfg.tokens_per_batch)
        self.batch_sizes = [batch_size_for(n, self.tokens_per_batch, self.num_devices, self.process_count)
                            for n in self.lengths]
        # every [B, L] a batch can have: at most len(bucket_lengths) shapes, one with pack
        self.shapes = list(zip(self.batch_sizes, self.lengths))[-1 if self.pack else 0:]
        self._reset()

    # -- the cache and the epoch order

    @property
    def cache(self) -> TokenCache:
        if self._cache is None:
            cache = self._cache_fn()
            if len(cache) == 0:
                raise DataError(f"no usable examples in the data (read {cache.stats.get('read', 0)}, skipped "
                                f"{ {r: cache.stats.get(r, 0) for r in SKIP_REASONS} }); check the files and "
                                f"data.max_len")
            self._size = np.maximum(cache.src_lengths, cache.tgt_lengths) + 1  # with EOS / BOS
            if int(self._size.max()) > self.max_len:
                raise DataError(f"token cache {cache.path} holds pairs longer than {self.max_len} tokens; "
                                f"it was built for another data.max_len")
            self._bucket = np.searchsorted(np.asarray(self.lengths), self._size).astype(np.int32)
            self.stats = {r: int(cache.stats.get(r, 0)) for r in SKIP_REASONS}
            self._cache = cache
        return self._cache

    def _order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.cache)
            self._order_cache = (np.random.default_rng([self.seed, self.epoch]).permutation(n).astype(np.int32)
                                 if self.shuffle else np.arange(n, dtype=np.int32))
            self._order_epoch = self.epoch
        return self._order_cache

    # -- state

    def _reset(self) -> None:
        self.epoch = 0
        self.batches = 0              # emitted so far, over all epochs
        self._pos = 0                 # pairs of this epoch's order read so far
        self._pending: list[list[int]] = [[] for _ in self.lengths]  # per bucket; pack: the carry, last
        self._ready: list[tuple[int, list[int]]] = []  # (bucket, pairs) batches formed, not yet emitted
        self._exhausted = False       # without repeat: the split has been read
        self._order_epoch = -1
        self.stats = {reason: 0 for reason in SKIP_REASONS}

    def state_dict(self) -> dict:
        """JSON-serializable position: load it into a fresh iterator to continue exactly here."""
        return {
            "version": _STATE_VERSION,
            "pairs": len(self.cache),
            "bucket_lengths": self.lengths,
            "pack": self.pack,
            "process_count": self.process_count,
            "epoch": self.epoch,
            "position": self._pos,
            "batches": self.batches,
            "pending": [_encode_ints(p) for p in self._pending],
            "ready": [[b, _encode_ints(items)] for b, items in self._ready],
            "exhausted": self._exhausted,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"data iterator state has version {state.get('version')}, expected {_STATE_VERSION}; "
                            f"it was saved by another jaxformer version")
        for key, mine in (("bucket_lengths", self.lengths), ("pack", self.pack), ("process_count", self.process_count)):
            if state[key] != mine:
                name = key if key == "process_count" else f"data.{key}"
                raise DataError(f"cannot resume the data iterator: it was saved with {name}={state[key]}, now {mine}")
        if state["pairs"] != len(self.cache):
            raise DataError(f"cannot resume the data iterator: it was saved over {state['pairs']} pairs, the data "
                            f"now has {len(self.cache)} (the data, data.max_len or the vocabulary changed)")
        self._reset()
        self.stats = {r: int(self._cache.stats.get(r, 0)) for r in SKIP_REASONS}
        self.epoch, self._pos, self.batches = int(state["epoch"]), int(state["position"]), int(state["batches"])
        self._pending = [_decode_ints(p) for p in state["pending"]]
        self._ready = [(int(b), _decode_ints(items)) for b, items in state["ready"]]
        self._exhausted = bool(state["exhausted"])
        if not self.pack:  # another device count or budget changes B: re-split what waits
            waiting = [list(items) for _, items in self._ready]
            for (b, _), items in zip(self._ready, waiting):
                self._pending[b] = items + self._pending[b]
            self._ready = []
            for b, items in enumerate(self._pending):
                while len(items) >= self.batch_sizes[b]:
                    self._ready.append((b, items[:self.batch_sizes[b]]))
                    del items[:self.batch_sizes[b]]
            if self._exhausted:
                self._flush()

    # -- iteration

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._cache is None:
            self.cache  # noqa: B018  (opening it runs the first pass)
        batch = self._next_packed() if self.pack else self._next_bucketed()
        if batch is None:
            raise StopIteration
        self.batches += 1
        return batch

    def _end_epoch(self) -> None:
        self.log_stats()
        if self.repeat:
            self.epoch += 1
            self._pos = 0
        else:
            self._exhausted = True

    def _next_bucketed(self):
        bucket, sizes = self._bucket, self.batch_sizes
        while not self._ready and not self._exhausted:
            order = self._order()
            if self._pos >= len(order):
                self._end_epoch()
                if self._exhausted:
                    self._flush()
                continue
            chunk = order[self._pos:self._pos + 512]
            for i, b in zip(chunk.tolist(), bucket[chunk].tolist()):
                self._pos += 1
                rows = self._pending[b]
                rows.append(i)
                if len(rows) == sizes[b]:
                    self._ready.append((b, rows))
                    self._pending[b] = []
                    break
        if not self._ready:
            return None
        b, items = self._ready.pop(0)
        items = np.asarray(items, np.int64)
        zeros = np.zeros(len(items), np.int64)
        return self._make_batch(items, np.arange(len(items)), zeros, zeros, sizes[b], self.lengths[b])

    def _flush(self) -> None:
        """Without repeat, at the end: what waits in each bucket becomes a last (padded) batch."""
        for b, rows in enumerate(self._pending):
            if rows:
                self._ready.append((b, rows))
        self._pending = [[] for _ in self.lengths]

    def _next_packed(self):
        rows, length = self.batch_sizes[-1], self.lengths[-1]
        carry = self._pending[-1]
        want = _PACK_OVERFILL * rows * length
        have = float(self._size[carry].sum()) if carry else 0.0
        while have < want and not self._exhausted:
            order = self._order()
            if self._pos >= len(order):
                self._end_epoch()
                continue
            block = order[self._pos:self._pos + max(64, int((want - have) / 8))]
            total = have + np.cumsum(self._size[block])
            take = min(len(block), int(np.searchsorted(total, want)) + 1)
            carry += block[:take].tolist()
            have = float(total[take - 1])
            self._pos += take
        if not carry:
            return None
        items = np.asarray(carry, np.int64)
        ns = (self.cache.src_lengths[items] + 1).tolist()
        nt = (self.cache.tgt_lengths[items] + 1).tolist()
        fill_s, fill_t = [0] * rows, [0] * rows
        row, off_s, off_t = [-1] * len(carry), [0] * len(carry), [0] * len(carry)
        first_open = 0  # rows before it have no room for even the shortest pair
        for k in np.argsort(-self._size[items], kind="stable").tolist():  # first fit, longest first
            a, b = length - ns[k], length - nt[k]
            for r in range(first_open, rows):
                if fill_s[r] <= a and fill_t[r] <= b:
                    row[k], off_s[k], off_t[k] = r, fill_s[r], fill_t[r]
                    fill_s[r] += ns[k]
                    fill_t[r] += nt[k]
                    break
            while first_open < rows and (fill_s[first_open] >= length - 1 or fill_t[first_open] >= length - 1):
                first_open += 1
        row, off_s, off_t = np.asarray(row, np.int64), np.asarray(off_s, np.int64), np.asarray(off_t, np.int64)
        placed = row >= 0
        self._pending[-1] = items[~placed].tolist()
        return self._make_batch(items[placed], row[placed], off_s[placed], off_t[placed], rows, length)

    def _make_batch(self, items, rows, off_s, off_t, size: int, length: int) -> dict[str, np.ndarray]:
        """The [size, length] arrays of `items` placed at (row, offset) on each side, by flat gathers."""
        c = self.cache
        ns, nt = c.src_lengths[items].astype(np.int64), c.tgt_lengths[items].astype(np.int64)
        start_s, start_t = rows * length + off_s, rows * length + off_t
        src_tokens = c.src_tokens[_ranges(c.src_offsets[items], ns)]
        tgt_tokens = c.tgt_tokens[_ranges(c.tgt_offsets[items], nt)]
        out = {k: np.full(size * length, PAD_ID, np.int32) for k in ("src", "tgt_in", "tgt_out")}
        out["src"][_ranges(start_s, ns)] = src_tokens
        out["src"][start_s + ns] = EOS_ID
        out["tgt_in"][start_t] = BOS_ID
        out["tgt_in"][_ranges(start_t + 1, nt)] = tgt_tokens
        out["tgt_out"][_ranges(start_t, nt)] = tgt_tokens
        out["tgt_out"][start_t + nt] = EOS_ID
        if self.pack:
            by_place = np.lexsort((off_s, rows))  # within a row, pairs in the order they were placed
            first_of_row = np.searchsorted(rows[by_place], rows[by_place])
            segment = np.empty(len(items), np.int64)
            segment[by_place] = np.arange(len(items)) - first_of_row + 1
            for side, start, n in (("src", start_s, ns + 1), ("tgt", start_t, nt + 1)):
                where = _ranges(start, n)
                seg = np.zeros(size * length, np.int32)
                seg[where] = np.repeat(segment, n)
                pos = np.zeros(size * length, np.int32)
                pos[where] = _ranges(np.zeros_like(n), n)
                out[f"{side}_segments"], out[f"{side}_positions"] = seg, pos
        return {k: v.reshape(size, length) for k, v in out.items()}

    def log_stats(self) -> None:
        stats = self.cache.stats
        log.info("data epoch %d: read %d examples, kept %d, skipped %s", self.epoch, stats.get("read", 0),
                 len(self.cache), self.stats)
