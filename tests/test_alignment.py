"""Word alignments from cross-attention (`jaxformer translate --alignments`, `Translator.align`)."""

from __future__ import annotations

import json

import pytest

from jaxformer import cli
from jaxformer.synthetic import english_words, german_words

NUMBERS = [7, 21, 400, 1234, 99999, 310412]
SOURCES = [english_words(n) for n in NUMBERS]
TARGETS = [german_words(n) for n in NUMBERS]


def test_each_target_piece_is_aligned_to_one_source_piece_in_range(number_words):
    alignments = number_words.align(SOURCES + [""], TARGETS + ["eins"])
    src_ids, tgt_ids = number_words.tokenizer.encode(SOURCES), number_words.tokenizer.encode(TARGETS)
    for pairs, src, tgt in zip(alignments, src_ids, tgt_ids):
        assert [j for _, j in pairs] == list(range(len(tgt)))
        assert all(0 <= i < len(src) for i, _ in pairs)
    assert alignments[-1] == []  # nothing to align to
    assert number_words.align(SOURCES, TARGETS) == alignments[:-1]  # the same on every call
    assert number_words.align(SOURCES, TARGETS, layer=0) != alignments[:-1]  # another layer, other weights
    with pytest.raises(ValueError, match="alignment layer 2 is out of range"):
        number_words.align(SOURCES, TARGETS, layer=2)


def test_cli_alignments_in_text_nbest_and_jsonl(number_words, tmp_path, capsys):
    src = tmp_path / "src.en"
    src.write_text("".join(s + "\n" for s in SOURCES[:2]), encoding="utf-8")
    model = str(number_words.source)
    outputs = number_words.translate(SOURCES[:2], parallel="split")
    expected = [" ".join(f"{i}-{j}" for i, j in a) for a in number_words.align(SOURCES[:2], outputs)]
    assert cli.main(["translate", "--model", model, "--input", str(src), "--alignments", "--parallel", "split"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{o} ||| {a}" for o, a in zip(outputs, expected)]
    assert cli.main(["translate", "--model", model, "--input", str(src), "--alignments", "--nbest", "2",
                     "--parallel", "split"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ||| ")[3] for line in lines[::2]] == expected
    assert cli.main(["translate", "--model", model, "--input", str(src), "--alignments", "--format", "jsonl",
                     "--parallel", "split"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [" ".join(f"{i}-{j}" for i, j in r["hypotheses"][0]["alignment"]) for r in records] == expected
    assert cli.main(["translate", "--model", model, "--input", str(src), "--alignments",
                     "--alignment-layer", "5"]) == 1
    assert "alignment layer 5 is out of range" in capsys.readouterr().err
