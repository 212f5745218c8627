"""Parsing (§6.3): treebank data into training, a tiny parser trained, its trees parsed with the grammar mask."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxformer.config import default_config
from jaxformer.data import DataError, get_tokenizer, make_batches, read_pairs
from jaxformer.data.sources import ensure_treebank
from jaxformer.data.treebank import linearize, read_trees

PTB_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ptb_sample"
FILES = {"train": (1, 2, 3, 4), "valid": (140,), "test": (160,)}  # a handful of the sample's files per split


@pytest.fixture(scope="module")
def small_treebank(tmp_path_factory) -> Path:
    """A few of the sample's files, keeping their numbers, so the sample's split ranges apply."""
    if not (PTB_SAMPLE / "wsj_0001.mrg").exists():
        pytest.fail(f"the Penn Treebank sample is not at {PTB_SAMPLE}; the tests expect ../shared beside the checkout")
    directory = tmp_path_factory.mktemp("treebank")
    for numbers in FILES.values():
        for n in numbers:
            shutil.copy(PTB_SAMPLE / f"wsj_{n:04d}.mrg", directory)
    return directory


def treebank_config(treebank_dir, work: Path, **data):
    c = default_config()
    c.data.update(source="treebank", treebank_dir=str(treebank_dir), treebank_data_dir=str(work / "tb"),
                  src_lang="en", tgt_lang="tree", vocab_kind="words", min_count=1, cache_dir=str(work / "cache"))
    c.data.update(data)
    return c


def test_the_treebank_source_gives_words_and_symbols_per_split(small_treebank, tmp_path):
    config = treebank_config(small_treebank, tmp_path)
    for split, numbers in FILES.items():
        trees = read_trees([small_treebank / f"wsj_{n:04d}.mrg" for n in numbers])
        expected = [(" ".join(w), " ".join(s)) for w, s in map(linearize, trees)]
        assert read_pairs(config.data, split) == expected
    folder = ensure_treebank(config.data)
    assert ensure_treebank(config.data) == folder  # written once; an edited treebank is linearized anew
    os.utime(small_treebank / "wsj_0160.mrg", ns=(1, 1))
    assert ensure_treebank(config.data) != folder


def test_sentences_over_max_len_are_counted_skips(small_treebank, tmp_path):
    config = treebank_config(small_treebank, tmp_path, max_len=40, bucket_lengths=(40,), tokens_per_batch=400)
    vocab = get_tokenizer(config, str(tmp_path / "run"))
    targets = [len(t.split()) + 1 for _, t in read_pairs(config.data, "train")]
    batches = make_batches(config, vocab, "train", repeat=False, shuffle=False)
    list(batches)
    assert batches.stats["too_long"] == sum(n > 40 for n in targets) > 0
    assert batches.cache.stats["read"] == len(targets)


def test_treebank_config_errors_name_the_key(small_treebank, tmp_path):
    with pytest.raises(DataError, match="data.treebank_dir is empty"):
        ensure_treebank(treebank_config("", tmp_path).data)
    with pytest.raises(DataError, match="data.treebank_splits='ptb'"):
        ensure_treebank(treebank_config(small_treebank, tmp_path, treebank_splits="ptb").data)
    with pytest.raises(DataError, match="no wsj_NNNN.mrg file numbered 0200-2199"):
        ensure_treebank(treebank_config(small_treebank, tmp_path, treebank_splits="wsj").data)


def load_recipe(name: str):
    import importlib.util

    from jaxformer.config import check_lengths, check_train_config
    from jaxformer.model import TransformerConfig

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    check_train_config(config.train)
    check_lengths(config)
    TransformerConfig.from_dict(config.model.to_dict(), vocab_size=100)
    return config


def test_parse_recipes_hold_the_papers_search_and_layers():
    sample, wsj = load_recipe("ptb_parse"), load_recipe("wsj_parse")
    for c in (sample, wsj):
        assert (c.model.num_encoder_layers, c.model.num_decoder_layers) == (4, 4)
        assert (c.decode.beam_size, c.decode.length_penalty, c.decode.max_extra_len) == (21, 0.3, 300)
        assert (c.data.source, c.data.vocab_kind) == ("treebank", "words")
        assert c.model.max_len >= c.data.max_len + c.decode.max_extra_len  # room for input + 300
    assert wsj.model.d_model == 1024 and wsj.data.treebank_splits == "wsj" and wsj.data.tokens_per_batch >= 25_000
    assert sample.data.treebank_splits == "sample"
    repo = Path(__file__).resolve().parents[1]
    assert (repo / sample.data.treebank_dir / "wsj_0001.mrg").is_file()  # from the checkout, as train.py runs
