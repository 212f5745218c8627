"""Token-budget batches (jaxformer.data.batching): shapes, padding, packing, exact resume, epochs, efficiency."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from jaxformer import synthetic
from jaxformer.config import default_config
from jaxformer.data import BOS_ID, EOS_ID, PAD_ID, DataError, batch_size_for, read_pairs
from helpers import BUCKETS, assert_same_batches, data_config as config, iterator, m30k, rows_of, write_pair

pytestmark = pytest.mark.usefixtures("token_cache_dir")  # conftest's: one token cache folder for the data tests


def batch_pairs(batches):
    """Multiset of (source ids, target ids) in batches, packed or not."""
    out = collections.Counter()
    for b in batches:
        for s, to in zip(b["src"].tolist(), b["tgt_out"].tolist()):
            out.update(zip(_split_eos(s), _split_eos(to)))
    return out


def _split_eos(row):
    parts, cur = [], []
    for t in row:
        if t == PAD_ID:
            continue
        if t == EOS_ID:
            parts.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return parts


@pytest.mark.parametrize("num_devices,process_count", [(1, 1), (4, 1), (2, 2)])
def test_batch_shapes_and_token_budget(multi30k_dir, multi30k_tokenizer, num_devices, process_count):
    cfg = m30k(multi30k_dir, split="val")
    it = iterator(cfg, multi30k_tokenizer, num_devices=num_devices, process_count=process_count, repeat=True)
    batches = [next(it) for _ in range(40)]
    shapes = {b["src"].shape for b in batches}
    assert shapes <= set(it.shapes) and len(it.shapes) == len(BUCKETS)
    for b in batches:
        assert set(b) == {"src", "tgt_in", "tgt_out"}
        B, L = b["src"].shape
        assert all(b[k].shape == (B, L) and b[k].dtype == np.int32 for k in b)
        assert L in BUCKETS
        assert B == max(num_devices, 1024 // process_count // L // num_devices * num_devices)
        assert B % num_devices == 0
        assert B * L <= max(1024 // process_count, num_devices * L)  # about the per-process budget, not over
        assert B * L > 1024 // process_count - L * (num_devices + 1)  # ... and not far under
        rows = rows_of(b)
        assert len(rows) == B  # with repeat=True every batch is full
        prev = max([0] + [n for n in BUCKETS if n < L])
        for s, ti, to in rows:  # the smallest bucket that fits: longer than the previous one
            assert prev < max(len(s), len(to)) <= L
    assert len(shapes) >= 3  # real data spreads over several buckets


def test_padding_and_bos_eos_placement(multi30k_dir, multi30k_tokenizer):
    tok = multi30k_tokenizer
    cfg = m30k(multi30k_dir)
    batch = next(iterator(cfg, tok, shuffle=False))
    for s, ti, to in zip(batch["src"], batch["tgt_in"], batch["tgt_out"]):
        n_s, n_t = int((s != PAD_ID).sum()), int((to != PAD_ID).sum())
        assert (s[:n_s] != PAD_ID).all() and (s[n_s:] == PAD_ID).all()  # padding only at the end
        assert s[n_s - 1] == EOS_ID and EOS_ID not in s[:n_s - 1].tolist() and BOS_ID not in s.tolist()
        assert ti[0] == BOS_ID and BOS_ID not in ti[1:].tolist() and EOS_ID not in ti.tolist()
        assert to[n_t - 1] == EOS_ID and EOS_ID not in to[:n_t - 1].tolist()
        np.testing.assert_array_equal(ti[1:n_t], to[:n_t - 1])  # decoder input = labels shifted right
        assert (ti[n_t:] == PAD_ID).all() and (to[n_t:] == PAD_ID).all()
    # the content is the tokenized text: without shuffling, rows of a bucket keep stream order
    val = read_pairs(cfg.data, "valid")
    decoded_src = tok.decode(batch["src"])
    assert set(decoded_src) <= set(tok.decode(tok.encode([s for s, _ in val])))


def test_single_pass_sees_every_example_once_padded_to_full_batches(multi30k_dir, multi30k_tokenizer):
    tok = multi30k_tokenizer
    cfg = m30k(multi30k_dir)
    it = iterator(cfg, tok, repeat=False, shuffle=True, num_devices=2)
    batches = list(it)
    pairs = read_pairs(cfg.data, "valid")
    kept = [(s, t) for s, t in zip(tok.encode([s for s, _ in pairs]), tok.encode([t for _, t in pairs]))
            if max(len(s), len(t)) + 1 <= 64]
    assert it.stats == {"empty": 0, "bad_utf8": 0, "too_long": len(pairs) - len(kept)}
    seen = collections.Counter()
    partial = 0
    for b in batches:
        B, L = b["src"].shape
        assert B == batch_size_for(L, 1024, 2)
        rows = rows_of(b)
        partial += len(rows) < B
        for r in range(len(rows), B):  # pad rows (only at the end of a flushed batch) are all PAD
            assert not b["src"][r].any() and not b["tgt_in"][r].any() and not b["tgt_out"][r].any()
        seen.update((tuple(s[:-1]), tuple(to[:-1])) for s, _, to in rows)
    assert seen == collections.Counter((tuple(s), tuple(t)) for s, t in kept)
    assert 1 <= partial <= len(BUCKETS)
    with pytest.raises(StopIteration):
        next(it)


def test_packing_segments_and_positions(multi30k_dir, multi30k_tokenizer):
    cfg = m30k(multi30k_dir, pack=True)
    it = iterator(cfg, multi30k_tokenizer, repeat=False, shuffle=True, num_devices=2)
    batches = list(it)
    n_pairs = 0
    for b in batches:
        assert set(b) == {"src", "tgt_in", "tgt_out", "src_segments", "tgt_segments", "src_positions", "tgt_positions"}
        assert b["src"].shape == (batch_size_for(64, 1024, 2), 64)  # one shape: the largest bucket
        for r in range(b["src"].shape[0]):
            for side, tok_key in (("src", "src"), ("tgt", "tgt_out")):
                seg, pos, toks = b[f"{side}_segments"][r], b[f"{side}_positions"][r], b[tok_key][r]
                assert ((seg == 0) == (toks == PAD_ID)).all()
                n = int((seg > 0).sum())
                assert (seg[n:] == 0).all() and (np.diff(seg[:n]) >= 0).all()
                ids = np.unique(seg[:n])
                np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
                for k in ids:
                    where = np.flatnonzero(seg == k)
                    np.testing.assert_array_equal(pos[where], np.arange(len(where)))
                    assert toks[where[-1]] == EOS_ID  # every packed pair ends in EOS ...
                    if side == "tgt":  # ... and its decoder input starts with BOS
                        assert b["tgt_in"][r][where[0]] == BOS_ID
            n_pairs += int(b["src_segments"][r].max())
    real_tokens = sum(int((b["src"] != PAD_ID).sum()) for b in batches)
    assert n_pairs == 1014 - it.stats["too_long"]
    assert real_tokens / sum(b["src"].size for b in batches) > 0.6  # packing fills rows


@pytest.mark.parametrize("pack,process_count,repeat", [(False, 1, True), (True, 1, True), (False, 2, True),
                                                         (False, 1, False)])
def test_restore_after_n_batches_yields_exactly_the_uninterrupted_batches(multi30k_dir, multi30k_tokenizer, pack,
                                                                           process_count, repeat):
    tok = multi30k_tokenizer
    cfg = m30k(multi30k_dir, pack=pack, tokens_per_batch=2048)
    ref_it = iterator(cfg, tok, process_count=process_count, repeat=repeat, num_devices=2)
    reference = list(ref_it) if not repeat else [next(ref_it) for _ in range(80)]
    total = len(reference)
    assert repeat or total > 10
    if repeat:
        assert ref_it.epoch >= 1  # the checkpoints below cross an epoch boundary
    for n in (0, 1, 7, total // 2, total - 3):
        it1 = iterator(cfg, tok, process_count=process_count, repeat=repeat, num_devices=2)
        head = [next(it1) for _ in range(n)]
        state = json.loads(json.dumps(it1.state_dict()))  # as the trainer stores it
        it2 = iterator(cfg, tok, process_count=process_count, repeat=repeat, num_devices=2)
        it2.load_state_dict(state)
        tail = [next(it2) for _ in range(total - n)]
        assert_same_batches(head + tail, reference)
        assert it2.stats == ref_it.stats
    if not repeat:
        with pytest.raises(StopIteration):
            next(it2)


def test_restore_with_another_device_count_keeps_every_example(multi30k_dir, multi30k_tokenizer):
    tok = multi30k_tokenizer
    cfg = m30k(multi30k_dir)
    it1 = iterator(cfg, tok, repeat=False, num_devices=1)
    head = [next(it1) for _ in range(10)]
    it2 = iterator(cfg, tok, repeat=False, num_devices=4)  # e.g. resumed on a bigger machine
    it2.load_state_dict(json.loads(json.dumps(it1.state_dict())))
    tail = list(it2)
    assert {b["src"].shape for b in tail} <= set(it2.shapes) and all(b["src"].shape[0] % 4 == 0 for b in tail)
    seen = collections.Counter(tuple(r[0]) for b in head + tail for r in rows_of(b))
    whole = collections.Counter(tuple(r[0]) for b in iterator(cfg, tok, repeat=False) for r in rows_of(b))
    assert seen == whole and sum(whole.values()) == 1014 - it2.stats["too_long"]


def test_restore_with_another_layout_is_refused(multi30k_dir, multi30k_tokenizer):
    cfg = m30k(multi30k_dir)
    it = iterator(cfg, multi30k_tokenizer)
    next(it)
    state = it.state_dict()
    cfg.data.bucket_lengths = (16, 64)
    with pytest.raises(DataError, match="bucket_lengths"):
        iterator(cfg, multi30k_tokenizer).load_state_dict(state)


def test_length_limit_counts_eos_and_picks_the_smallest_bucket(tmp_path, multi30k_tokenizer):
    tok = multi30k_tokenizer
    word = "dog"
    assert len(tok.encode([" ".join([word] * 5)])[0]) == 5  # one piece per word
    lengths = [3, 4, 7, 8]  # tokens without EOS
    prefix = write_pair(tmp_path, [" ".join([word] * n) for n in lengths], ["Hund"] * len(lengths))
    cfg = config(train_files=prefix, bucket_lengths=(4, 8), max_len=8, tokens_per_batch=16)
    it = iterator(cfg, tok, "train", repeat=False, shuffle=False)
    got = sorted((int((row != PAD_ID).sum()), b["src"].shape) for b in it for row in b["src"] if row.any())
    assert got == [(4, (4, 4)), (5, (2, 8)), (8, (2, 8))]  # 3+EOS fits 4; 4+EOS needs 8; 8+EOS is too long
    assert it.stats["too_long"] == 1


def test_repeat_over_data_with_no_usable_pair_is_an_error_not_a_hang(tmp_path, multi30k_tokenizer):
    prefix = write_pair(tmp_path, ["", "x " * 300], ["y", "z"])
    it = iterator(config(train_files=prefix), multi30k_tokenizer, "train", repeat=True)
    with pytest.raises(DataError, match="no usable examples"):
        next(it)


def test_each_epoch_reads_the_whole_split_in_a_new_order_reproducible_from_the_seed(tmp_path, multi30k_tokenizer):
    # one domain after another, as the WMT14 hub split is: a buffer-sized shuffle would keep them apart
    src = [f"a dog number {synthetic.english_words(i)}" for i in range(300)] + \
          [f"the cat sat {synthetic.english_words(i)}" for i in range(300)]
    prefix = write_pair(tmp_path, src, [f"x {i}" for i in range(600)])
    cfg = config(train_files=prefix, tokens_per_batch=256, bucket_lengths=(16,), max_len=16)

    def first_epochs(seed, epochs=2):
        cfg.data.seed = seed
        it = iterator(cfg, multi30k_tokenizer, "train")
        out = {}
        while it.epoch < epochs:
            epoch = it.epoch
            out.setdefault(epoch, []).append(next(it))
        return out

    run = first_epochs(0)
    first_batch = multi30k_tokenizer.decode(run[0][0]["src"])
    assert any(s.startswith("a dog") for s in first_batch) and any(s.startswith("the cat") for s in first_batch)
    assert not np.array_equal(run[0][0]["src"], run[1][0]["src"])  # a new order each epoch
    again = first_epochs(0)
    for e in (0, 1):
        assert_same_batches(run[e], again[e])  # ... reproducible from the seed
    assert not np.array_equal(first_epochs(1)[0][0]["src"], run[0][0]["src"])


def wmt_like_cache(n=60_000, seed=0):
    """Token lengths shaped like WMT14 En-De with a 37k BPE: median ~22, a long tail, targets ~5% longer."""
    from jaxformer.data import TokenCache

    rng = np.random.default_rng(seed)
    src = np.clip(np.round(rng.lognormal(np.log(22), 0.65, n)), 1, 400).astype(np.int32)
    tgt = np.clip(np.round(src * rng.lognormal(0.05, 0.2, n)), 1, 400).astype(np.int32)
    keep = np.maximum(src, tgt) + 1 <= 256
    src, tgt = src[keep], tgt[keep]
    return TokenCache(np.full(src.sum(), 7, np.int32), src, np.full(tgt.sum(), 9, np.int32), tgt)


def test_padding_efficiency_and_shape_count_bounds(multi30k_dir, multi30k_tokenizer):
    from jaxformer.data import BatchIterator, padding_efficiency

    cfg = m30k(multi30k_dir, pack=True, tokens_per_batch=4096)
    it = iterator(cfg, multi30k_tokenizer, num_devices=2)
    batches = [next(it) for _ in range(12)]  # over two epochs of the validation split
    assert padding_efficiency(batches) >= 0.90 and len({b["src"].shape for b in batches}) == 1
    one_pass = list(iterator(cfg, multi30k_tokenizer, repeat=False, num_devices=2))
    assert sum(batch_pairs(one_pass).values()) == 1014 - it.stats["too_long"]  # every pair, once
    c = default_config()
    c.data.tokens_per_batch = 25_000
    for pack, efficiency in ((True, 0.90), (False, 0.70)):
        c.data.pack = pack
        it = BatchIterator(wmt_like_cache(), c.data, repeat=True, num_devices=8)
        batches = [next(it) for _ in range(60)]
        assert padding_efficiency(batches) >= efficiency
        shapes = {b["src"].shape for b in batches}
        assert shapes <= set(it.shapes) and len(it.shapes) <= 16
        assert all(b["src"].shape[0] * b["src"].shape[1] <= 25_000 for b in batches)


def test_two_processes_batch_disjoint_shards_covering_the_data(multi30k_dir, multi30k_tokenizer):
    cfg = m30k(multi30k_dir, pack=True)
    whole = batch_pairs(iterator(cfg, multi30k_tokenizer, repeat=False))
    parts = [batch_pairs(iterator(cfg, multi30k_tokenizer, repeat=False, process_index=r, process_count=2))
             for r in (0, 1)]
    assert parts[0] + parts[1] == whole and abs(sum(parts[0].values()) - sum(parts[1].values())) <= 20
    assert not set(parts[0]) & set(parts[1]) - {k for k, v in whole.items() if v > 1}
