"""Validation and the sweep scored by Moses-tokenized lowercased BLEU (train.valid_tok_refs, --tok-refs)."""

from __future__ import annotations

import json

import pytest

import jaxformer.train  # (binds jaxformer too) the tests call jaxformer.train.run
import jaxformer.translate
from jaxformer import cli
from jaxformer.bleu import moses_lc, moses_lc_bleu
from jaxformer.choose import Choice, resolve_metric
from jaxformer.config import check_train_config, default_config
from jaxformer.data import read_pairs
from jaxformer.validation import evaluate_bleu, tok_references

from helpers import SENTENCES, make_run, records_of, tiny_config, write_split


def write_lines(path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def other_text(i: int) -> str:
    """A made-up target unlike the synthetic task's references (no number words)."""
    return f"Ganz anders, Satz {i}: \"hier\"."


# ------------------------------------------------------------------------------------------- the scores


def test_validation_reports_moses_lc_bleu_of_its_own_hypotheses(bundle):
    pairs = [(s, s.title() + ".") for s in SENTENCES]
    tok_refs = moses_lc(SENTENCES[:3] + ["x y z"] * 3, "de") + ["an extra line past the pairs"]
    scores, hypotheses = evaluate_bleu(*bundle, pairs, default_config().decode, tok_refs=tok_refs, lang="de")
    expected = moses_lc_bleu(hypotheses, tok_refs[:len(pairs)], "de").score
    assert scores["bleu_moses_lc"] == pytest.approx(expected) and 10 < expected < 90  # half the lines match
    assert scores["bleu"] < 50  # cased, against the capitalized raw references
    plain, _ = evaluate_bleu(*bundle, pairs, default_config().decode)
    assert "bleu_moses_lc" not in plain and plain["bleu"] == scores["bleu"]


def test_choosing_by_moses_lc_bleu_keeps_the_highest():
    choice = Choice(metric="bleu_moses_lc")
    assert [choice.update(step, v) for step, v in ((2, 30.0), (4, 35.5), (6, 35.5), (8, 31.0))] == \
        [True, True, False, False]
    assert (choice.best_step, choice.ranked([2, 4, 6, 8])) == (4, [4, 6, 8, 2])
    config = default_config().train
    config.update(best_metric="bleu_moses_lc", valid_tok_refs="refs.tok")
    assert resolve_metric(config) == "bleu_moses_lc"
    with pytest.raises(ValueError, match=r"a parser's validation scores its decoded sentences by f1, not "
                                         r"bleu_moses_lc$"):
        resolve_metric(config, parser=True)
    config.valid_tok_refs = ""
    with pytest.raises(ValueError, match=r"best_metric='bleu_moses_lc' needs train.valid_tok_refs"):
        resolve_metric(config)


# ------------------------------------------------------------------------------------ bad tok refs files


def test_bad_tok_refs_options_are_refused_in_one_line_at_config_check(tmp_path):
    config = default_config().train
    config.valid_tok_refs = str(tmp_path / "missing.tok.de")
    with pytest.raises(ValueError, match=r"train.valid_tok_refs='.*missing.tok.de': no such file") as info:
        check_train_config(config)
    assert "\n" not in str(info.value)
    config.update(valid_tok_refs="", best_metric="bleu_moses_lc")
    with pytest.raises(ValueError, match=r"train.best_metric='bleu_moses_lc': needs train.valid_tok_refs") as info:
        check_train_config(config)
    assert "\n" not in str(info.value)
    config.update(valid_tok_refs=write_lines(tmp_path / "refs.tok", ["a"]), eval_bleu_sentences=0)
    with pytest.raises(ValueError, match=r"needs validation BLEU"):
        check_train_config(config)
    config.eval_bleu_sentences = 5
    check_train_config(config)


def test_a_tok_refs_file_must_have_one_line_per_valid_pair(tmp_path, synthetic_setup):
    config = tiny_config(tmp_path / "run", synthetic_setup, eval_bleu_sentences=3)
    valid = read_pairs(config.data, "valid")
    config.train.valid_tok_refs = write_lines(tmp_path / "refs.tok", moses_lc([t for _, t in valid], "de"))
    assert tok_references(config, valid[:3]) == moses_lc([t for _, t in valid[:3]], "de")  # the first N
    config.train.eval_bleu_sentences = -1
    assert len(tok_references(config, valid)) == len(valid)
    config.train.valid_tok_refs = write_lines(tmp_path / "short.tok", ["a b"] * (len(valid) - 1))
    message = (rf"train.valid_tok_refs='.*short.tok' has {len(valid) - 1} lines but the valid split has "
               rf"{len(valid)} pairs")
    with pytest.raises(ValueError, match=message):
        tok_references(config, valid)
    config.train.update(eval_bleu_sentences=3, eval_every=2)  # the first 3, counted against the whole split
    with pytest.raises(ValueError, match=message) as info:
        jaxformer.train.run(config)  # refused before the first step
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or "train" not in (
        tmp_path / "run" / "metrics.jsonl").read_text()


# ------------------------------------------------------------------------------------------ a training run


def test_a_run_validates_and_chooses_by_moses_lc_bleu(tmp_path, synthetic_setup, monkeypatch):
    config = tiny_config(tmp_path, synthetic_setup, steps=4, eval_every=2, eval_bleu_sentences=3,
                         best_metric="bleu_moses_lc", keep_best=1)
    valid = read_pairs(config.data, "valid")
    others = [other_text(i) for i in range(len(valid))]
    config.train.valid_tok_refs = write_lines(tmp_path / "val.tok", moses_lc(others, "de"))
    # Made-up outputs: step 2 writes the raw references (all exact), step 4 the texts the tok refs were made of
    # (Moses-tokenized lowercased BLEU 100): step 4 is the best by bleu_moses_lc.
    outputs = [[t for _, t in valid[:3]], others[:3]]
    seen = []

    def translate_texts(model, params, tokenizer, sources, decode_cfg):
        seen.append(outputs[len(seen)])
        return seen[-1]

    monkeypatch.setattr(jaxformer.translate, "translate_texts", translate_texts)
    result = jaxformer.train.run(config)
    records = records_of(tmp_path, "valid")
    assert [r["step"] for r in records] == [2, 4] and len(seen) == 2
    for record, hypotheses in zip(records, seen):
        assert record["bleu_moses_lc"] == pytest.approx(moses_lc_bleu(hypotheses, moses_lc(others[:3], "de"),
                                                                      "de").score)
    assert (records[0]["exact_match"], records[1]["exact_match"]) == (1.0, 0.0)
    assert records[0]["bleu_moses_lc"] < 1.0 and records[1]["bleu_moses_lc"] == pytest.approx(100.0)
    assert records[1]["best_step"] == result["best_step"] == 4
    assert records[1]["best_bleu_moses_lc"] == pytest.approx(100.0)
    assert "bleu_moses_lc 100" in (tmp_path / "train.log").read_text()
    assert jaxformer.load(tmp_path, best=True).checkpoint_steps == [4]


# ---------------------------------------------------------------------------------------------- the sweep


def test_the_sweep_with_tok_refs_scores_and_chooses_by_moses_lc_bleu(bundle, tmp_path, capsys):
    test = tmp_path / "test"
    # raw references unlike the output (cased BLEU near 0), tok refs of the copy model's output
    write_split(test, [s.encode() for s in SENTENCES], [other_text(i).encode() for i in range(len(SENTENCES))])
    run = make_run(bundle, tmp_path / "run", average_last=1, test_prefix=test)  # step 3: 2x, mean of 2, 3: 1x
    refs = write_lines(tmp_path / "test.tok", moses_lc(SENTENCES, "yy"))
    assert cli.main(["evaluate", "--model", str(run), "--split", "test", "--sweep", "average_last=1,2",
                     "--tok-refs", refs, "--out", str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["average_last", "bleu_moses_lc"] and len(printed) == 4
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["score"] == "Moses-tokenized lowercased BLEU" and saved["tok_refs"] == refs
    assert all("bleu" not in row for row in saved["rows"])
    assert saved["chosen"]["average_last"] == 2 and saved["chosen"]["bleu_moses_lc"] > 80  # the copy model
    assert printed[3].startswith("chosen: average_last=2 (Moses-tokenized lowercased BLEU ")
    # Bad files are refused in one line before decoding; --tokenized output is not tokenized again.
    short = write_lines(tmp_path / "short.tok", ["a"])
    for extra, message in ((["--tok-refs", short], "has 1 lines but the test set"),
                           (["--tok-refs", str(tmp_path / "nowhere")], "no such file"),
                           (["--tok-refs", refs, "--tokenized"], "with --tokenized the output is already tokenized")):
        assert cli.main(["evaluate", "--model", str(run), "--split", "test", "--sweep", "average_last=1",
                         *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
