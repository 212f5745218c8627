"""Forced decoding (`jaxformer score`, `Translator.score`, `translate.score_ids`) on the shared offline-default
model (../shared/models/number_words: English number words to German)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from jaxformer import cli, decode
from jaxformer.data import BOS_ID, EOS_ID, PAD_ID
from jaxformer.synthetic import english_words, german_words
from jaxformer.translate import score_ids

MODEL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / "number_words"  # conftest's number_words
NUMBERS = [7, 21, 400, 1234, 99999, 310412, 5, 68, 700001, 12]
SOURCES = [english_words(n) for n in NUMBERS]
TARGETS = [german_words(n) for n in NUMBERS]


@pytest.fixture(scope="module")
def translator(number_words):
    return number_words


def teacher_forced(translator, src_ids, tgt_ids):
    """Each target token's log-prob (EOS last) from one uncached forward pass over all pairs (unbucketed),
    PAD and BOS taken out of the softmax as the search does, normalised in float64."""
    src = np.full((len(src_ids), max(map(len, src_ids)) + 1), PAD_ID, np.int32)
    tgt_in = np.full((len(tgt_ids), max(map(len, tgt_ids)) + 1), PAD_ID, np.int32)
    for row, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        src[row, :len(s) + 1] = s + [EOS_ID]
        tgt_in[row, :len(t) + 1] = [BOS_ID] + t
    logits = np.asarray(translator.model.apply(translator.params, src, tgt_in), np.float64)
    logits[..., [PAD_ID, BOS_ID]] = -np.inf
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
    return [log_probs[row, np.arange(len(t) + 1), t + [EOS_ID]] for row, t in enumerate(tgt_ids)]


def test_scores_are_the_teacher_forced_log_probs_in_input_order(translator):
    src_ids = translator.tokenizer.encode(SOURCES)
    tgt_ids = translator.tokenizer.encode(TARGETS)
    tgt_ids[3] = []  # an empty target: EOS alone
    results = score_ids(translator.model, translator.params, src_ids, tgt_ids, translator.decode, batch_size=4)
    for result, expected, tgt in zip(results, teacher_forced(translator, src_ids, tgt_ids), tgt_ids):
        assert len(result["token_log_probs"]) == len(tgt) + 1
        np.testing.assert_allclose(result["token_log_probs"], expected, atol=1e-4)
        assert result["log_prob"] == pytest.approx(float(np.sum(expected)), abs=1e-3)
        penalty = ((5.0 + len(tgt) + 1) / 6.0) ** translator.decode["length_penalty"]
        assert result["score"] == pytest.approx(result["log_prob"] / penalty, rel=1e-6)
    # A correct translation is likelier than a wrong one of the same source.
    wrong = score_ids(translator.model, translator.params, src_ids[:1], [tgt_ids[1]], translator.decode)[0]
    assert results[0]["log_prob"] > wrong["log_prob"]


def test_the_score_of_the_search_output_is_the_search_score(translator):
    """Beam search's own score of its best hypothesis equals what scoring that hypothesis gives."""
    src_ids = translator.tokenizer.encode(SOURCES)
    src = np.full((len(src_ids), max(map(len, src_ids)) + 1), PAD_ID, np.int32)
    for row, ids in enumerate(src_ids):
        src[row, :len(ids) + 1] = ids + [EOS_ID]
    tokens, scores = decode.beam_search(translator.model, translator.params, src, beam_size=4, alpha=0.6)
    hypotheses = [row[:row.index(EOS_ID)] for row in np.asarray(tokens).tolist()]
    results = score_ids(translator.model, translator.params, src_ids, hypotheses, translator.decode)
    np.testing.assert_allclose([r["score"] for r in results], np.asarray(scores), atol=1e-4)


def test_translator_score_names_the_pieces_and_skips_targets_that_do_not_fit(translator, caplog):
    results = translator.score(SOURCES[:2] + [SOURCES[0]], TARGETS[:2] + [" ".join(["tausend"] * 200)])
    assert results[0]["tokens"][-1] == "</s>"
    assert "".join(results[0]["tokens"][:-1]).replace("\u2581", " ").strip() == TARGETS[0]
    assert len(results[1]["tokens"]) == len(results[1]["token_log_probs"])
    assert results[2] is None
    assert "skipped 1 of 3 pairs" in caplog.text
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        score_ids(translator.model, translator.params, [[5], [6]], [[7]])


def test_cli_score_writes_text_and_jsonl_and_rejects_files_of_different_lengths(translator, tmp_path, capsys):
    src, tgt = tmp_path / "src.en", tmp_path / "tgt.de"
    src.write_text("".join(s + "\n" for s in SOURCES), encoding="utf-8")
    tgt.write_text("".join(t + "\n" for t in TARGETS), encoding="utf-8")
    expected = translator.score(SOURCES, TARGETS)
    assert cli.main(["score", "--model", str(MODEL), "--src", str(src), "--tgt", str(tgt), "--per-token"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(SOURCES)
    for line, result in zip(lines, expected):
        score, log_prob, per_token = line.split("\t")
        assert float(score) == pytest.approx(result["score"], abs=1e-5)
        assert float(log_prob) == pytest.approx(result["log_prob"], abs=1e-5)
        np.testing.assert_allclose([float(v) for v in per_token.split()], result["token_log_probs"], atol=1e-5)
    out = tmp_path / "scores.jsonl"
    assert cli.main(["score", "--model", str(MODEL), "--src", str(src), "--tgt", str(tgt), "--format", "jsonl",
                     "--output", str(out), "--full-softmax"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["source"] for r in records] == SOURCES and [r["target"] for r in records] == TARGETS
    full = translator.score(SOURCES, TARGETS, full_softmax=True)
    assert [r["log_prob"] for r in records] == pytest.approx([r["log_prob"] for r in full], abs=1e-5)
    assert "tokens" not in records[0]
    tgt.write_text("".join(t + "\n" for t in TARGETS[:-1]), encoding="utf-8")
    assert cli.main(["score", "--model", str(MODEL), "--src", str(src), "--tgt", str(tgt)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "10 lines" in err and "9" in err and "\n" not in err


@pytest.mark.skipif(not __import__("importlib").util.find_spec("ctranslate2"), reason="needs the [interop] extra")
def test_scores_equal_ctranslate2_score_batch_on_the_export(translator, tmp_path):
    """With full_softmax, the log-probs of CTranslate2's score_batch; without it, they differ by the mass the
    model gives PAD and BOS at each step (label smoothing taught it some)."""
    import ctranslate2

    from jaxformer.io.ctranslate2 import write_ctranslate2

    out = write_ctranslate2(tmp_path / "ct2", translator.model.config, translator.params, translator.tokenizer,
                            translator.decode)
    engine = ctranslate2.Translator(str(out), device="cpu")
    src_ids, tgt_ids = translator.tokenizer.encode(SOURCES), translator.tokenizer.encode(TARGETS)
    pieces = lambda ids: [translator.tokenizer.id_to_piece(t) for t in ids]  # noqa: E731
    theirs = engine.score_batch([pieces(s) for s in src_ids], [pieces(t) for t in tgt_ids])
    full, ours = translator.score(SOURCES, TARGETS, full_softmax=True), translator.score(SOURCES, TARGETS)
    for whole, mine, result in zip(full, ours, theirs):
        np.testing.assert_allclose(whole["token_log_probs"], result.log_probs, atol=1e-4)
        shift = np.asarray(mine["token_log_probs"]) - np.asarray(result.log_probs)
        assert (shift > 0).all() and (shift < 0.01).all()


def test_token_log_probs_are_zero_at_padding(translator):
    src = np.array([[5, 6, EOS_ID, PAD_ID]], np.int32)
    tokens = np.array([[7, EOS_ID, PAD_ID, PAD_ID]], np.int32)
    values = np.asarray(decode.token_log_probs(translator.model, translator.params, src, tokens))
    assert values.shape == (1, 4) and (values[0, 2:] == 0).all() and (values[0, :2] < 0).all()
