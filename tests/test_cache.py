"""The token cache (jaxformer.data.cache): skipped lines counted, filled once, never stale, never half-written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from jaxformer import synthetic
from jaxformer.data import DataError, Tokenizer, read_pairs
from helpers import assert_same_batches, data_config as config, iterator, m30k, rows_of, write_pair

pytestmark = pytest.mark.usefixtures("token_cache_dir")  # conftest's: one token cache folder for the data tests


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


def test_an_unwritable_cache_dir_is_a_one_line_error(tmp_path, multi30k_dir, multi30k_tokenizer):
    (tmp_path / "file").write_text("not a folder")
    cfg = m30k(multi30k_dir, cache_dir=str(tmp_path / "file" / "cache"))
    with pytest.raises(DataError, match=r"cannot write the token cache in .*file/cache: .*data\.cache_dir") as e:
        next(iterator(cfg, multi30k_tokenizer))
    assert "\n" not in str(e.value)
