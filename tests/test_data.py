"""The data pipeline: sources, sharding, vocabulary, token-budget batches, resume, bad input."""

from __future__ import annotations

import collections
import json
import shutil
import time

import numpy as np
import pytest

from jaxformer import synthetic
from jaxformer.config import default_config
from jaxformer.data import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, DataError, Tokenizer, batch_size_for,
                            get_tokenizer, load_split, make_batches, read_pairs)

BUCKETS = (8, 16, 24, 32, 48, 64)


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory):
    """Every test's token caches go to one temporary folder (caches of equal inputs are shared, as in use)."""
    global CACHE_DIR
    CACHE_DIR = str(tmp_path_factory.mktemp("token_cache"))


def config(**data):
    c = default_config()
    c.data.bucket_lengths = BUCKETS
    c.data.max_len = 64
    c.data.tokens_per_batch = 1024
    c.data.pack = False  # one pair per row unless a test packs
    c.data.cache_dir = CACHE_DIR
    for k, v in data.items():
        c.data[k] = v
    return c


def m30k(multi30k_dir, split="val", **data):
    return config(source="files", train_files=str(multi30k_dir / "train"), valid_files=str(multi30k_dir / split),
                  **data)


def iterator(cfg, tok, split="valid", *, process_index=0, process_count=1, repeat=True, shuffle=True, num_devices=1):
    return make_batches(cfg, tok, split, repeat=repeat, shuffle=shuffle, num_devices=num_devices,
                        process_index=process_index, process_count=process_count)


def write_pair(tmp_path, src_lines, tgt_lines, name="corpus"):
    """Write <name>.en / <name>.de as raw bytes (lines may be bytes) and return the prefix."""
    for lang, lines in (("en", src_lines), ("de", tgt_lines)):
        raw = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
        (tmp_path / f"{name}.{lang}").write_bytes(raw)
    return str(tmp_path / name)


def rows_of(batch):
    """Non-pad rows as (src, tgt_in, tgt_out) lists with padding cut off."""
    out = []
    for s, ti, to in zip(batch["src"], batch["tgt_in"], batch["tgt_out"]):
        if not s.any():
            continue
        out.append((s[s != PAD_ID].tolist(), ti[ti != PAD_ID].tolist(), to[to != PAD_ID].tolist()))
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- synthetic task


@pytest.mark.parametrize("n,en,de", [
    (0, "zero", "null"),
    (1, "one", "eins"),
    (12, "twelve", "zwölf"),
    (16, "sixteen", "sechzehn"),
    (17, "seventeen", "siebzehn"),
    (21, "twenty-one", "einundzwanzig"),
    (30, "thirty", "dreißig"),
    (60, "sixty", "sechzig"),
    (77, "seventy-seven", "siebenundsiebzig"),
    (100, "one hundred", "einhundert"),
    (101, "one hundred one", "einhunderteins"),
    (111, "one hundred eleven", "einhundertelf"),
    (1000, "one thousand", "eintausend"),
    (1001, "one thousand one", "eintausendeins"),
    (21000, "twenty-one thousand", "einundzwanzigtausend"),
    (101001, "one hundred one thousand one", "einhunderteintausendeins"),
    (321405, "three hundred twenty-one thousand four hundred five", "dreihunderteinundzwanzigtausendvierhundertfünf"),
    (999999, "nine hundred ninety-nine thousand nine hundred ninety-nine",
     "neunhundertneunundneunzigtausendneunhundertneunundneunzig"),
])
def test_number_words(n, en, de):
    assert synthetic.english_words(n) == en
    assert synthetic.german_words(n) == de


def test_number_words_are_one_to_one_and_bounded():
    nums = sorted(set(np.random.default_rng(0).choice(1_000_000, 20_000, replace=False).tolist()) | set(range(1000)))
    assert len({synthetic.german_words(n) for n in nums}) == len(nums)
    assert len({synthetic.english_words(n) for n in nums}) == len(nums)
    assert all(" " not in synthetic.german_words(n) for n in nums)
    for bad in (-1, 1_000_000, 2.5):
        with pytest.raises(ValueError):
            synthetic.german_words(bad)


def test_write_synthetic_splits_are_aligned_disjoint_and_mixed_length(tmp_path):
    prefixes = synthetic.write_synthetic(str(tmp_path), 2000, 100, 100, seed=3)
    splits = {}
    for split, prefix in prefixes.items():
        en = open(f"{prefix}.en", encoding="utf-8").read().splitlines()
        de = open(f"{prefix}.de", encoding="utf-8").read().splitlines()
        assert len(en) == len(de) == (2000 if split == "train" else 100)
        splits[split] = set(en)
    assert not splits["train"] & splits["valid"] and not splits["train"] & splits["test"]
    assert not splits["valid"] & splits["test"]
    word_counts = [len(s.split()) for s in splits["train"]]
    assert min(word_counts) == 1 and max(word_counts) == 7  # both "seven" and "... thousand ... hundred ..."
    again = synthetic.write_synthetic(str(tmp_path / "again"), 2000, 100, 100, seed=3)
    with open(f"{again['test']}.de", encoding="utf-8") as a, open(f"{prefixes['test']}.de", encoding="utf-8") as b:
        assert a.read() == b.read()  # deterministic in the seed


def test_synthetic_source_end_to_end(tmp_path):
    cfg = config(source="synthetic", synthetic_size=400, synthetic_dir=str(tmp_path / "syn"), vocab_size=300,
                 vocab_sample_size=600)
    pairs = read_pairs(cfg.data, "train")
    assert len(pairs) == 400
    src, tgt = pairs[0]
    assert " " not in tgt and src.replace("-", " ").split()[0] in synthetic._EN_ONES + synthetic._EN_TENS
    assert len(read_pairs(cfg.data, "valid")) == 100 == len(read_pairs(cfg.data, "test"))
    tok = get_tokenizer(cfg, str(tmp_path / "run"))
    assert (tmp_path / "run" / "vocab.model").is_file()
    it = make_batches(cfg, tok, "train", repeat=False, shuffle=True, num_devices=2, process_index=0, process_count=1)
    decoded = collections.Counter(t for b in it for t in tok.decode(b["tgt_out"]) if t)
    assert decoded == collections.Counter(tok.decode(tok.encode([t for _, t in pairs])))


# ----------------------------------------------------------------------------- vocabulary


def test_tokenizer_special_ids_encode_decode_and_reload(multi30k_tokenizer, tmp_path):
    tok = multi30k_tokenizer
    assert tok.vocab_size == 1000
    assert [tok.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)] == ["<pad>", "<unk>", "<s>", "</s>"]
    ids = tok.encode(["Ein Mann fährt Fahrrad.", "A dog runs."])
    assert all(ids) and not {BOS_ID, EOS_ID, PAD_ID} & set(ids[0] + ids[1])
    assert tok.decode(ids) == ["Ein Mann fährt Fahrrad.", "A dog runs."]
    # decode stops at EOS and ignores BOS / PAD, for lists and numpy rows alike
    row = np.array([BOS_ID] + ids[0] + [EOS_ID] + ids[1] + [PAD_ID] * 3)
    assert tok.decode([row, [PAD_ID] + ids[1]]) == ["Ein Mann fährt Fahrrad.", "A dog runs."]
    assert tok.encode(["中"])[0][-1] == UNK_ID  # not in the vocabulary's alphabet
    again = Tokenizer.load(tok.path)
    assert again.serialized == tok.serialized and again.encode(["A dog."]) == tok.encode(["A dog."])
    with pytest.raises(DataError, match="missing sentencepiece model .*nope.model"):
        Tokenizer.load(str(tmp_path / "nope.model"))


def test_get_tokenizer_trains_saves_and_reloads_on_resume(tmp_path):
    prefix = write_pair(tmp_path, [f"the number {i} is here" for i in range(300)],
                        [f"die Zahl {i} ist hier" for i in range(300)])
    cfg = config(train_files=prefix, vocab_size=200, vocab_sample_size=100)
    workdir = tmp_path / "run"
    tok = get_tokenizer(cfg, str(workdir))
    saved = (workdir / "vocab.model").read_bytes()
    assert tok.serialized == saved and tok.vocab_size <= 200
    cfg.data.vocab_size = 150  # a resumed run keeps its vocabulary whatever the config now says
    assert get_tokenizer(cfg, str(workdir)).serialized == saved
    # an explicit model is used and copied beside a fresh run
    cfg.data.vocab_model = str(workdir / "vocab.model")
    assert get_tokenizer(cfg, str(tmp_path / "run2")).serialized == saved
    assert (tmp_path / "run2" / "vocab.model").read_bytes() == saved


# ----------------------------------------------------------------------------- sources


def test_aligned_files_stream_the_raw_lines(multi30k_dir):
    cfg = m30k(multi30k_dir)
    pairs = [(ex["src"], ex["tgt"]) for ex in load_split(cfg.data, "valid", process_index=0, process_count=1)]
    en = (multi30k_dir / "val.en").read_text(encoding="utf-8").split("\n")[:-1]
    de = (multi30k_dir / "val.de").read_text(encoding="utf-8").split("\n")[:-1]
    assert pairs == list(zip(en, de)) and len(pairs) == 1014
    assert read_pairs(cfg.data, "valid", limit=5) == [(e.strip(), d.strip()) for e, d in zip(en[:5], de[:5])]
    cfg.data.src_lang, cfg.data.tgt_lang = "de", "en"  # the other direction is the same files
    first = next(iter(load_split(cfg.data, "valid", process_index=0, process_count=1)))
    assert first == {"src": de[0], "tgt": en[0]}


def test_tsv_jsonl_parquet_give_the_same_pairs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [("a \"quoted\" cat", "eine Katze"), ("two, dogs", "zwei\tHunde"), ("NA", "null")]
    (tmp_path / "d.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    (tmp_path / "flat.jsonl").write_text("".join(json.dumps({"en": s, "de": t, "id": i}) + "\n"
                                                 for i, (s, t) in enumerate(pairs)), encoding="utf-8")
    (tmp_path / "wmt.jsonl").write_text("".join(json.dumps({"translation": {"de": t, "en": s}}) + "\n"
                                                for s, t in pairs), encoding="utf-8")
    pq.write_table(pa.table({"en": [s for s, _ in pairs], "de": [t for _, t in pairs]}), tmp_path / "d.parquet")
    for name in ("d.tsv", "flat.jsonl", "wmt.jsonl", "d.parquet"):
        cfg = config(train_files=str(tmp_path / name))
        got = [(ex["src"], ex["tgt"]) for ex in load_split(cfg.data, "train", process_index=0, process_count=1)]
        assert got == pairs, name


def test_hub_source_is_the_same_code_with_another_argument(tmp_path, monkeypatch):
    import datasets

    path = tmp_path / "wmt.jsonl"
    path.write_text("".join(json.dumps({"translation": {"de": f"Satz {i}", "en": f"sentence {i}"}}) + "\n"
                            for i in range(6)), encoding="utf-8")
    calls = []
    real = datasets.load_dataset

    def fake_hub(name, config=None, **kw):  # what the hub would stream, from a local file
        calls.append((name, config, kw))
        if name == "wmt14":
            return real("json", data_files={"train": str(path)}, split="train", streaming=True)
        return real(name, config, **kw)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    cfg = config(source="hub", hub_name="wmt14", hub_config="de-en")
    ds = load_split(cfg.data, "valid", process_index=1, process_count=2)
    assert calls[0] == ("wmt14", "de-en", {"split": "validation", "streaming": True})
    assert [ex["src"] for ex in ds] == ["sentence 1", "sentence 3", "sentence 5"]


def test_two_processes_get_disjoint_shards_covering_the_data(tmp_path, multi30k_dir):
    prefix = write_pair(tmp_path, [f"s{i}" for i in range(101)], [f"t{i}" for i in range(101)])
    cfg = config(train_files=prefix)
    shards = [[ex["src"] for ex in load_split(cfg.data, "train", process_index=r, process_count=2)] for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(f"s{i}" for i in range(101))
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    # on the real data: the two shards' pairs add up to the whole split, as multisets
    cfg = m30k(multi30k_dir)
    whole = collections.Counter((ex["src"], ex["tgt"]) for ex in load_split(cfg.data, "valid", process_index=0,
                                                                             process_count=1))
    parts = [collections.Counter((ex["src"], ex["tgt"]) for ex in load_split(cfg.data, "valid", process_index=r,
                                                                              process_count=2)) for r in (0, 1)]
    assert parts[0] + parts[1] == whole and sum(parts[0].values()) == 507


# ----------------------------------------------------------------------------- batches


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


# ----------------------------------------------------------------------------- resume


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


# ----------------------------------------------------------------------------- bad input


def test_empty_too_long_and_non_utf8_lines_are_skipped_and_counted(tmp_path, multi30k_tokenizer):
    good = [(f"a dog number {synthetic.english_words(i)}", f"ein Hund {synthetic.german_words(i)}") for i in range(20)]
    src = [s for s, _ in good] + ["", "a cat", "   ", b"bad \xff\xfe bytes", "ok", "long " * 200]
    tgt = [t for _, t in good] + ["eine Katze", "", "x", "schlecht", b"caf\xe9", "lang"]
    prefix = write_pair(tmp_path, src, tgt)
    cfg = config(train_files=prefix)
    it = iterator(cfg, multi30k_tokenizer, "train", repeat=False, shuffle=False)
    batches = list(it)
    assert it.stats == {"empty": 3, "bad_utf8": 2, "too_long": 1}
    got = sorted(multi30k_tokenizer.decode([s for b in batches for s in b["src"] if s.any()]))
    assert got == sorted(s for s, _ in good)
    assert read_pairs(cfg.data, "train") == good + [(("long " * 200).strip(), "lang")]  # no length limit there


@pytest.mark.parametrize("name,raw", [
    ("d.tsv", b"a dog\tein Hund\ncaf\xe9\tx\n\tleer\n"),
    ("d.jsonl", b'{"en": "a dog", "de": "ein Hund"}\n{"en": "caf\xe9", "de": "x"}\n{"en": "", "de": "leer"}\n'),
])
def test_non_utf8_and_empty_in_tsv_and_jsonl(tmp_path, multi30k_tokenizer, name, raw):
    (tmp_path / name).write_bytes(raw)
    it = iterator(config(train_files=str(tmp_path / name)), multi30k_tokenizer, "train", repeat=False)
    rows = [r for b in it for r in rows_of(b)]
    assert it.stats == {"empty": 1, "bad_utf8": 1, "too_long": 0}
    assert multi30k_tokenizer.decode([r[2] for r in rows]) == ["ein Hund"]


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


def test_parallel_files_of_different_lengths(tmp_path):
    prefix = write_pair(tmp_path, ["a", "b", "c"], ["x", "y"])
    with pytest.raises(DataError, match=r"corpus\.en has 3 lines.*corpus\.de has 2 lines"):
        load_split(config(train_files=prefix).data, "train", process_index=0, process_count=1)


def test_missing_files(tmp_path):
    prefix = write_pair(tmp_path, ["a"], ["x"])
    (tmp_path / "corpus.de").unlink()
    with pytest.raises(DataError, match=r"missing file .*corpus\.de"):
        load_split(config(train_files=prefix).data, "train", process_index=0, process_count=1)
    with pytest.raises(DataError, match=r"missing file.*nowhere\.tsv"):
        load_split(config(train_files=str(tmp_path / "nowhere.tsv")).data, "train", process_index=0, process_count=1)
    with pytest.raises(DataError, match="data.valid_files is empty"):
        load_split(config().data, "valid", process_index=0, process_count=1)


def test_dataset_without_the_expected_fields(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"english": "a", "german": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl.*'translation'.*fields \['english', 'german'\]"):
        load_split(config(train_files=str(tmp_path / "a.jsonl")).data, "train", process_index=0, process_count=1)
    (tmp_path / "b.jsonl").write_text('{"translation": {"fr": "a", "de": "b"}}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.jsonl.*'translation' has languages \['de', 'fr'\].*\['en'\]"):
        load_split(config(train_files=str(tmp_path / "b.jsonl")).data, "train", process_index=0, process_count=1)


# ----------------------------------------------------------------------------- token cache, order, packing


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


def cache_folders(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def key_of(directory):
    (name,) = [n for n in cache_folders(directory) if not n.startswith(".")]
    return name


def test_first_pass_fills_the_cache_later_passes_read_it_memory_mapped(tmp_path, multi30k_dir, multi30k_tokenizer):
    cfg = m30k(multi30k_dir, cache_dir=str(tmp_path / "cache"))
    first = list(iterator(cfg, multi30k_tokenizer, repeat=False))
    (folder,) = cache_folders(tmp_path / "cache")
    assert folder.startswith("valid-0of1-") and (tmp_path / "cache" / folder / "meta.json").is_file()

    class NoEncoding:  # a later pass must not tokenize again
        serialized, vocab_size = multi30k_tokenizer.serialized, multi30k_tokenizer.vocab_size

        def encode(self, texts):
            raise AssertionError("tokenized again")

    it = iterator(cfg, NoEncoding(), repeat=False)
    again = list(it)
    assert_same_batches(first, again)
    assert isinstance(it.cache.src_tokens, np.memmap) and isinstance(it.cache.tgt_tokens, np.memmap)
    assert it.stats == {"empty": 0, "bad_utf8": 0, "too_long": it.cache.stats["too_long"]}


def test_a_changed_source_or_vocabulary_never_reuses_a_stale_cache(tmp_path, multi30k_tokenizer):
    cache = tmp_path / "cache"
    lines = [(f"a dog number {synthetic.english_words(i)}", f"ein Hund {synthetic.german_words(i)}") for i in range(40)]
    prefix = write_pair(tmp_path, [s for s, _ in lines], [t for _, t in lines])
    cfg = config(train_files=prefix, cache_dir=str(cache))
    decode = lambda batches: sorted(multi30k_tokenizer.decode([r[0] for b in batches for r in rows_of(b)]))  # noqa
    assert decode(iterator(cfg, multi30k_tokenizer, "train", repeat=False)) == sorted(s for s, _ in lines)
    lines[3] = ("a cat instead", "eine Katze")  # the source changes on disk
    write_pair(tmp_path, [s for s, _ in lines], [t for _, t in lines])
    assert decode(iterator(cfg, multi30k_tokenizer, "train", repeat=False)) == sorted(s for s, _ in lines)
    assert len(cache_folders(cache)) == 2
    other = Tokenizer.train([s for pair in lines for s in pair] * 3, 120, str(tmp_path / "other.model"))
    got = sorted(other.decode([r[0] for b in iterator(cfg, other, "train", repeat=False) for r in rows_of(b)]))
    assert got == sorted(s for s, _ in lines) and len(cache_folders(cache)) == 3


def test_killed_first_pass_leaves_nothing_and_resume_is_exact_across_the_cache(tmp_path, multi30k_dir,
                                                                             multi30k_tokenizer):
    tok = multi30k_tokenizer
    cfg = m30k(multi30k_dir, pack=True, tokens_per_batch=2048, cache_dir=str(tmp_path / "reference"))
    ref = iterator(cfg, tok, num_devices=2)
    reference = [next(ref) for _ in range(60)]
    per_epoch = ref.epoch
    assert per_epoch >= 1

    class Killed(Exception):
        pass

    class DiesWhileTokenizing:
        serialized, vocab_size = tok.serialized, tok.vocab_size

        def encode(self, texts):
            raise Killed

    cfg.data.cache_dir = str(tmp_path / "run")
    with pytest.raises(Killed):
        next(iterator(cfg, DiesWhileTokenizing(), num_devices=2))
    assert cache_folders(tmp_path / "run") == []  # no partial cache that could pass for a complete one
    abandoned = tmp_path / "run" / f".{key_of(tmp_path / 'reference')}.tmp-99999999-dead"  # a killed process's
    abandoned.mkdir()
    for n in (5, 40):  # 5: saved during the first pass (epoch 0); 40: during a cached epoch
        it1 = iterator(cfg, tok, num_devices=2)
        head = [next(it1) for _ in range(n)]
        state = json.loads(json.dumps(it1.state_dict()))
        assert state["epoch"] == 0 if n == 5 else state["epoch"] >= 1
        assert not abandoned.exists()  # cleaned up by the first pass
        if n == 5:  # the killed run's cache is gone too: the next run builds it again, to the same batches
            shutil.rmtree(tmp_path / "run" / key_of(tmp_path / "reference"))
        it2 = iterator(cfg, tok, num_devices=2)
        it2.load_state_dict(state)
        assert_same_batches(head + [next(it2) for _ in range(60 - n)], reference)


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


def test_an_unwritable_cache_dir_is_a_one_line_error(tmp_path, multi30k_dir, multi30k_tokenizer):
    (tmp_path / "file").write_text("not a folder")
    cfg = m30k(multi30k_dir, cache_dir=str(tmp_path / "file" / "cache"))
    with pytest.raises(DataError, match=r"cannot write the token cache in .*file/cache: .*data\.cache_dir") as e:
        next(iterator(cfg, multi30k_tokenizer))
    assert "\n" not in str(e.value)


def test_vocabulary_sample_is_spread_over_the_whole_corpus(tmp_path):
    from jaxformer.data import sample_sentences

    prefix = write_pair(tmp_path, [f"first {i}" for i in range(500)] + [f"second {i}" for i in range(500)],
                        [f"erste {i}" for i in range(500)] + [f"zweite {i}" for i in range(500)])
    sample = sample_sentences(config(train_files=prefix).data, 200)
    assert len(sample) == 200 and len(set(sample)) == 200
    late = sum(s.startswith(("second", "zweite")) for s in sample)
    assert 60 <= late <= 140  # about half from the second half, not the first 200 sentences


def test_prefetch_reports_the_position_of_the_last_batch_taken(tmp_path, multi30k_dir, multi30k_tokenizer):
    from jaxformer.data import Prefetcher

    cfg = m30k(multi30k_dir, pack=True)
    plain = iterator(cfg, multi30k_tokenizer)
    ahead = Prefetcher(iterator(cfg, multi30k_tokenizer), depth=3)
    for _ in range(7):
        assert_same_batches([next(ahead)], [next(plain)])
    time.sleep(0.3)  # the thread is batches ahead by now
    assert ahead.state_dict() == plain.state_dict()
    resumed = Prefetcher(iterator(cfg, multi30k_tokenizer), depth=3)
    resumed.load_state_dict(json.loads(json.dumps(ahead.state_dict())))
    assert_same_batches([next(resumed) for _ in range(5)], [next(plain) for _ in range(5)])
    ahead.close()
    resumed.close()
    failing = Prefetcher(iterator(config(train_files=write_pair(tmp_path, [""], ["x"])), multi30k_tokenizer, "train"))
    with pytest.raises(DataError, match="no usable examples"):
        next(failing)
