"""Prefix-constrained search (issue 30): the start of each output is given, the search goes on from there."""

from __future__ import annotations

import numpy as np
import pytest

from jaxformer import cli
from jaxformer.data import EOS_ID, PAD_ID
from jaxformer.decode import beam_search, greedy_search
from jaxformer.synthetic import english_words
from helpers import RANDOM_CFG, lengths_of, sources

SOURCES = [english_words(n) for n in (7, 21, 400, 1234, 99999, 310412)]


def test_a_prefix_of_the_greedy_output_gives_the_greedy_output(random_model):
    model, params = random_model
    src = sources([3, 8, 1, 5], 9, RANDOM_CFG.vocab_size)
    greedy = np.asarray(greedy_search(model, params, src, max_extra_len=6))
    for t in (1, 3):
        prefix = greedy[:, :t]
        np.testing.assert_array_equal(greedy_search(model, params, src, max_extra_len=6, prefix=prefix), greedy)


def test_outputs_start_with_their_prefix_and_a_long_prefix_is_cut_at_the_limit(random_model):
    model, params = random_model
    src = sources([3, 8, 1, 5], 9, RANDOM_CFG.vocab_size)
    prefix = np.full((4, 12), PAD_ID, np.int32)
    prefix[0, :2] = [7, 9]
    prefix[1, :1] = [30]
    prefix[3, :12] = np.arange(20, 32)  # longer than row 3's limit of 5 + 2 + 1: cut, EOS at the limit
    for tokens in (greedy_search(model, params, src, max_extra_len=2, prefix=prefix),
                   beam_search(model, params, src, beam_size=4, max_extra_len=2, prefix=prefix)[0]):
        tokens = np.asarray(tokens)
        assert list(tokens[0, :2]) == [7, 9] and tokens[1, 0] == 30
        limit = 6 + 2  # 5 tokens + EOS, + max_extra_len
        np.testing.assert_array_equal(tokens[3, :limit], list(range(20, 20 + limit - 1)) + [EOS_ID])
        assert lengths_of(tokens)[3] == limit
    with pytest.raises(ValueError, match="prefix must be"):
        greedy_search(model, params, src, prefix=np.zeros((4, 0), np.int32))


def test_translate_with_prefixes_and_the_cli_prefix_file(number_words, tmp_path, capsys):
    split = {"parallel": "split"}  # one compiled search for the 4 test devices, not one per device
    greedy = number_words.translate(SOURCES, beam_size=1, **split)
    starts = [" ".join(text.split()[:1]) for text in greedy[:3]] + ["", "neun", "drei"]
    forced = number_words.translate(SOURCES, beam_size=1, prefix=starts, **split)
    assert forced[:4] == greedy[:4]  # its own first word, or no prefix: the same translation
    assert forced[4].startswith("neun") and forced[5].startswith("drei")
    assert number_words.translate(SOURCES[4], prefix="neun", beam_size=1, **split).startswith("neun")  # one string
    src, prefix_file = tmp_path / "src.en", tmp_path / "prefix.de"
    src.write_text("".join(s + "\n" for s in SOURCES), encoding="utf-8")
    prefix_file.write_text("".join(p + "\n" for p in starts), encoding="utf-8")
    assert cli.main(["translate", "--model", str(number_words.source), "--input", str(src), "--prefix",
                     str(prefix_file), "--beam-size", "1", "--parallel", "split"]) == 0
    assert capsys.readouterr().out.splitlines() == forced
    prefix_file.write_text("".join(p + "\n" for p in starts[:-1]), encoding="utf-8")
    kept = tmp_path / "kept.de"
    kept.write_text("an earlier output\n", encoding="utf-8")
    assert cli.main(["translate", "--model", str(number_words.source), "--input", str(src), "--prefix",
                     str(prefix_file), "--output", str(kept)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --prefix") and "has 5 lines but" in err and "\n" not in err
    assert kept.read_text(encoding="utf-8") == "an earlier output\n"  # refused before the output is opened
