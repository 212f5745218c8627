"""The token cache: a split's tokenized pairs on disk as flat arrays, read memory-mapped.

The first pass over a split streams its text in Arrow batches, cleans it, encodes each batch in one
sentencepiece call (threads in C++, no per-token Python) and appends the kept pairs to four flat files:

    src.tokens, tgt.tokens    every pair's ids end to end (uint16 when the vocabulary fits, else int32),
                              without EOS / BOS, which batching adds
    src.lengths, tgt.lengths  int32, one per kept pair
    meta.json                 the key, the description it was made from, counts and skip counters

Memory stays bounded by one Arrow batch however large the corpus; later epochs and later runs open
the files with `np.memmap`, so even WMT14 (4.5M pairs) costs no Python object per pair. A cache is
written into a temporary folder and renamed into place, so a killed first pass leaves nothing that
could be read as complete. Its folder name is a hash of everything its content depends on (the
source's description with file sizes and modification times, the vocabulary's bytes, the length
limit, the shard): a changed source or vocabulary gets a new folder, never a stale one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable

import numpy as np

from jaxformer.data.common import SKIP_REASONS, DataError, clean

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_FILES = ("src.tokens", "tgt.tokens", "src.lengths", "tgt.lengths")


def cache_key(description: dict, vocabulary: bytes, max_len: int, process_index: int, process_count: int) -> str:
    """Folder name of a split's cache: readable prefix + a hash of everything the content depends on."""
    parts = {"version": CACHE_VERSION, "source": description, "max_len": int(max_len),
             "vocabulary": hashlib.sha256(vocabulary).hexdigest(), "shard": [process_index, process_count]}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return f"{description.get('split', 'split')}-{process_index}of{process_count}-{digest}"


class TokenCache:
    """Tokenized pairs as flat arrays (memory-mapped when opened from disk) with per-pair offsets."""

    def __init__(self, src_tokens, src_lengths, tgt_tokens, tgt_lengths, stats: dict | None = None,
                 path: str | None = None):
        self.src_tokens, self.tgt_tokens = src_tokens, tgt_tokens
        self.src_lengths = np.asarray(src_lengths, np.int32)
        self.tgt_lengths = np.asarray(tgt_lengths, np.int32)
        self.src_offsets = np.concatenate([[0], np.cumsum(self.src_lengths, dtype=np.int64)])
        self.tgt_offsets = np.concatenate([[0], np.cumsum(self.tgt_lengths, dtype=np.int64)])
        self.stats = dict(stats or {"read": len(self.src_lengths), **{r: 0 for r in SKIP_REASONS}})
        self.path = path

    def __len__(self) -> int:
        return len(self.src_lengths)

    @classmethod
    def from_pairs(cls, sources: list, targets: list, stats: dict | None = None) -> "TokenCache":
        """An in-memory cache of token id sequences (tests, benchmarks of length distributions)."""
        flat = lambda seqs: np.fromiter(itertools.chain.from_iterable(seqs), np.int32)  # noqa: E731
        return cls(flat(sources), [len(s) for s in sources], flat(targets), [len(t) for t in targets], stats)

    @classmethod
    def open(cls, path: str) -> "TokenCache":
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("version") != CACHE_VERSION:
            raise ValueError(f"cache version {meta.get('version')}, expected {CACHE_VERSION}")

        def array(name, dtype, count):
            if count == 0:
                return np.zeros(0, dtype)
            return np.memmap(os.path.join(path, name), dtype=dtype, mode="r", shape=(count,))

        n, dtype = meta["pairs"], np.dtype(meta["dtype"])
        return cls(array("src.tokens", dtype, meta["src_tokens"]), array("src.lengths", np.int32, n),
                   array("tgt.tokens", dtype, meta["tgt_tokens"]), array("tgt.lengths", np.int32, n),
                   meta["stats"], path)


def _cache_error(directory: str, error: OSError) -> DataError:
    return DataError(f"cannot write the token cache in {directory}: {error.strerror or error}; set data.cache_dir "
                     f"to a writable folder with free space")


def open_or_build(directory: str, key: str, batches: Callable[[], Iterable[tuple[list[str], list[str]]]], tokenizer,
                  max_len: int, description: dict) -> TokenCache:
    """The cache `<directory>/<key>`: opened if complete, else built from `batches()` (the first pass)."""
    path = os.path.join(directory, key)
    if os.path.isfile(os.path.join(path, "meta.json")):
        try:
            return TokenCache.open(path)
        except (OSError, ValueError, KeyError) as e:
            log.warning("token cache %s is unreadable (%s); rebuilding it", path, e)
            shutil.rmtree(path, ignore_errors=True)
    try:
        os.makedirs(directory, exist_ok=True)
        _remove_abandoned(directory, key)
        tmp = os.path.join(directory, f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
    except OSError as e:
        raise _cache_error(directory, e) from e
    try:
        _write(tmp, batches(), tokenizer, max_len, description, key)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "meta.json")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same cache first
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cache_error(directory, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenCache.open(path)


def _remove_abandoned(directory: str, key: str) -> None:
    """Temporary folders of this key left by a killed first pass (their process is gone)."""
    for name in os.listdir(directory):
        if not name.startswith(f".{key}.tmp-"):
            continue
        try:
            os.kill(int(name.rsplit("-", 2)[1]), 0)
        except (ProcessLookupError, ValueError):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        except PermissionError:
            pass


def _write(tmp: str, batches, tokenizer, max_len: int, description: dict, key: str) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    stats = {"read": 0, **{r: 0 for r in SKIP_REASONS}}
    counts = {"pairs": 0, "src_tokens": 0, "tgt_tokens": 0}
    files = {name: open(os.path.join(tmp, name), "wb") for name in _FILES}
    try:
        for sources, targets in batches:
            stats["read"] += len(sources)
            kept_src, kept_tgt = [], []
            for s, t in zip(sources, targets):
                s, t, reason = clean(s, t)
                if reason is None:
                    kept_src.append(s)
                    kept_tgt.append(t)
                else:
                    stats[reason] += 1
            if not kept_src:
                continue
            src_ids, tgt_ids = tokenizer.encode(kept_src), tokenizer.encode_target(kept_tgt)
            ns = np.fromiter(map(len, src_ids), np.int32, len(src_ids))
            nt = np.fromiter(map(len, tgt_ids), np.int32, len(tgt_ids))
            empty = (ns == 0) | (nt == 0)
            too_long = ~empty & (np.maximum(ns, nt) + 1 > max_len)  # +1: the EOS every sequence gets
            stats["empty"] += int(empty.sum())
            stats["too_long"] += int(too_long.sum())
            keep = ~(empty | too_long)
            for side, seqs, lengths in (("src", src_ids, ns), ("tgt", tgt_ids, nt)):
                kept = list(itertools.compress(seqs, keep.tolist()))
                total = int(lengths[keep].sum())
                np.fromiter(itertools.chain.from_iterable(kept), dtype, total).tofile(files[f"{side}.tokens"])
                lengths[keep].tofile(files[f"{side}.lengths"])
                counts[f"{side}_tokens"] += total
            counts["pairs"] += int(keep.sum())
    finally:
        for f in files.values():
            f.close()
    meta = {"version": CACHE_VERSION, "key": key, "source": description, "max_len": int(max_len),
            "dtype": np.dtype(dtype).name, "stats": stats, **counts}
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    log.info("token cache %s: %d pairs kept of %d read, skipped %s", key, counts["pairs"], stats["read"],
             {r: stats[r] for r in SKIP_REASONS})
