"""n-best lists with scores (`Translator.translate(nbest=N, with_scores=True)`, `jaxformer translate --nbest N
--format text|jsonl`) on the shared offline-default model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxformer import cli
from jaxformer.synthetic import english_words
from jaxformer.translate import score_ids, search_ids

SOURCES = [english_words(n) for n in (7, 21, 400, 1234, 99999, 310412, 5, 68)]


def test_nbest_hypotheses_are_sorted_distinct_and_scored_as_score_scores_them(number_words):
    translator = number_words
    src_ids = translator.tokenizer.encode(SOURCES)
    # parallel="split": one compiled search for the 4 test devices, not one per device (the default's
    # batches per device are tested in test_export.py)
    found = search_ids(translator.model, translator.params, src_ids, translator.decode, nbest=4, parallel="split")
    assert [hyps[0]["tokens"] for hyps in found] == translator.tokenizer.encode(
        translator.translate(SOURCES, parallel="split"))
    for hyps in found:
        assert len(hyps) == 4
        assert [h["score"] for h in hyps] == sorted((h["score"] for h in hyps), reverse=True)
        assert len({tuple(h["tokens"]) for h in hyps}) == 4
    hypotheses = [h for hyps in found for h in hyps]  # every hypothesis rescored in one call
    rescored = score_ids(translator.model, translator.params, [ids for ids in src_ids for _ in range(4)],
                         [h["tokens"] for h in hypotheses], translator.decode)
    np.testing.assert_allclose([r["log_prob"] for r in rescored], [h["log_prob"] for h in hypotheses], atol=1e-4)
    np.testing.assert_allclose([r["score"] for r in rescored], [h["score"] for h in hypotheses], atol=1e-4)


def test_translate_with_scores_names_texts_and_pieces_and_scores_greedy_output(number_words):
    translator = number_words
    split = {"parallel": "split"}  # one compiled search for the 4 test devices
    found = translator.translate(SOURCES[:3] + ["  "], nbest=2, **split)
    assert [len(hyps) for hyps in found] == [2, 2, 2, 0]  # a blank line has no hypotheses
    assert [hyps[0]["text"] for hyps in found[:3]] == translator.translate(SOURCES[:3], **split)
    assert set(found[0][0]) == {"text", "score", "log_prob", "tokens"} and found[0][0]["tokens"][0].startswith("\u2581")
    greedy = translator.translate(SOURCES[:3], beam_size=1, with_scores=True, **split)
    assert [hyps[0]["text"] for hyps in greedy] == translator.translate(SOURCES[:3], beam_size=1, **split)
    scored = translator.score(SOURCES[:3], [hyps[0]["text"] for hyps in greedy])
    np.testing.assert_allclose([h[0]["log_prob"] for h in greedy], [s["log_prob"] for s in scored], atol=1e-4)
    with pytest.raises(ValueError, match="nbest=5 must be between 1 and the beam size"):
        translator.translate(SOURCES[:1], nbest=5)


def test_cli_nbest_text_and_jsonl(number_words, tmp_path, capsys):
    src = tmp_path / "src.en"
    src.write_text("".join(s + "\n" for s in SOURCES[:3]), encoding="utf-8")
    expected = number_words.translate(SOURCES[:3], nbest=2, parallel="split")
    assert cli.main(["translate", "--model", str(number_words.source), "--input", str(src), "--nbest", "2",
                     "--parallel", "split"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ||| ")[0] for line in lines] == ["0", "0", "1", "1", "2", "2"]
    assert [line.split(" ||| ")[1] for line in lines] == [h["text"] for hyps in expected for h in hyps]
    assert [float(line.split(" ||| ")[2]) for line in lines] == pytest.approx(
        [h["score"] for hyps in expected for h in hyps], abs=1e-5)
    assert cli.main(["translate", "--model", str(number_words.source), "--input", str(src), "--format", "jsonl",
                     "--parallel", "split"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["source"] for r in records] == SOURCES[:3]
    assert [[h["text"] for h in r["hypotheses"]] for r in records] == [[hyps[0]["text"]] for hyps in expected]
    assert cli.main(["translate", "--model", str(number_words.source), "--input", str(src), "--nbest", "5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --nbest 5 is larger than the beam size 4: use --beam-size 5 or more"
