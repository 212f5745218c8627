"""The offline number-words task (jaxformer.synthetic): the words, the written splits, the source end to end."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from jaxformer import synthetic
from jaxformer.data import get_tokenizer, make_batches, read_pairs
from helpers import data_config as config

pytestmark = pytest.mark.usefixtures("token_cache_dir")  # conftest's: one token cache folder for the data tests


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
