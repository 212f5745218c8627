"""`jaxformer evaluate` as the papers score: both metrics, averaged checkpoints, every test line.

Uses the tiny copy model (conftest's `bundle`), whose "translation" of made-up lowercase words is the input.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import checkpoint, cli
from jaxformer.config import check_lengths, default_config
from jaxformer.evaluate import bleu_scores, run_evaluation
from jaxformer import load as load_translator
from jaxformer.translate import Translator
from helpers import SENTENCES, make_run, write_split


def first_kernel(params):
    return float(np.asarray(jax.tree.leaves(params)[0]).ravel()[0])


def test_bleu_scores_gives_the_cased_and_the_lowercased_score():
    refs = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee."]
    result = bleu_scores([r.lower() for r in refs], refs)
    assert result.score < 50 and result.lowercased.score == pytest.approx(100.0)
    assert "case:mixed" in result.signature and "tok:13a" in result.signature
    assert "case:lc" in result.lowercased.signature and "tok:13a" in result.lowercased.signature
    info = result.to_json()
    assert info["bleu"] == result.score and info["bleu_lowercase"] == result.lowercased.score
    assert info["signature_lowercase"] == result.lowercased.signature
    assert result.lines().splitlines() == [f"{result.description}: {result.text}", result.signature,
                                           f"{result.lowercased.description}: {result.lowercased.text}",
                                           result.lowercased.signature]
    assert info["description"].startswith("cased sacreBLEU") and info["description_lowercase"].startswith("lowercased")


def test_evaluate_a_run_averages_its_last_k_by_default(bundle, tmp_path, capsys):
    model, params, _ = bundle
    test = tmp_path / "test"
    # capitalized references: the copy model's lowercase output scores low cased, 100-ish lowercased
    write_split(test, [s.encode() for s in SENTENCES], [s.title().encode() for s in SENTENCES])
    run = make_run(bundle, tmp_path / "run", average_last=2, test_prefix=test)  # mean of steps 2, 3 = params

    assert cli.main(["evaluate", "--workdir", str(run), "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and "case:mixed" in printed[1] and "case:lc" in printed[3]
    info = json.loads((tmp_path / "eval" / "bleu.json").read_text())
    assert info["checkpoint_steps"] == [2, 3] and info["average_last"] == 2
    assert info["bleu_lowercase"] > 80 and info["bleu"] < 50
    assert "case:lc" in info["signature_lowercase"] and "case:mixed" in info["signature"]
    assert (tmp_path / "eval" / "bleu.txt").read_text().splitlines() == printed

    averaged = load_translator(run)
    assert averaged.checkpoint_steps == [2, 3]
    assert first_kernel(averaged.params) == pytest.approx(first_kernel(params), rel=1e-6)
    # an explicit --average-last or --step wins
    assert load_translator(run, average_last=1).checkpoint_steps == [3]
    assert load_translator(run, average_last=3).checkpoint_steps == [1, 2, 3]
    only = load_translator(run, step=2)
    assert only.checkpoint_steps == [2] and first_kernel(only.params) == 0.0
    assert cli.main(["export", "--workdir", str(run), "--out", str(tmp_path / "exported")]) == 0
    assert "checkpoint steps 2, 3, averaged" in capsys.readouterr().out


def test_best_and_average_best_choose_by_the_recorded_validation(bundle, tmp_path, capsys, caplog):
    model, params, _ = bundle
    test = tmp_path / "test"
    write_split(test, [s.encode() for s in SENTENCES], [s.encode() for s in SENTENCES])
    run = make_run(bundle, tmp_path / "run", average_last=1, test_prefix=test, scales=(5.0, 0.0, 2.0),
                   bleu=(10.0, 30.0, 20.0))
    assert cli.main(["evaluate", "--model", str(run), "--best", "--out", str(tmp_path / "best")]) == 0
    info = json.loads((tmp_path / "best" / "bleu.json").read_text())
    assert info["checkpoint_steps"] == [2] and info["average_best"] == 1
    assert cli.main(["export", "--model", str(run), "--average-best", "2", "--out", str(tmp_path / "exported")]) == 0
    assert "checkpoint steps 2, 3, averaged" in capsys.readouterr().out
    averaged = load_translator(tmp_path / "exported")
    assert first_kernel(averaged.params) == pytest.approx(first_kernel(params), rel=1e-6)  # (0 + 2) / 2 times
    assert cli.main(["evaluate", "--model", str(run), "--average-from-best", "2", "--out", str(tmp_path / "from")]) == 0
    info = json.loads((tmp_path / "from" / "bleu.json").read_text())  # the best (2) and the one after it (3)
    assert info["checkpoint_steps"] == [2, 3] and info["average_from_best"] == 2 and info["average_last"] is None
    assert info["bleu"] > 80  # the average is the copy model
    assert cli.main(["evaluate", "--model", str(run), "--average-best", "4"]) == 1
    assert "keeps 3 of the 4 best checkpoints by validation bleu" in capsys.readouterr().err
    # A sweep scores every combination on one split, prints the table and the best row.
    assert cli.main(["evaluate", "--model", str(run), "--split", "test", "--sweep", "average_last=1,2",
                     "length_penalty=0.6,1.0", "--out", str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["average_last", "length_penalty", "bleu"] and len(printed) == 6
    assert [line.split()[:2] for line in printed[1:5]] == [["1", "0.6"], ["1", "1.0"], ["2", "0.6"], ["2", "1.0"]]
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    best = max(saved["rows"], key=lambda r: r["bleu"])
    assert best["checkpoint_steps"] == [2, 3] and best["bleu"] > 80  # the average is the copy model
    assert printed[5].startswith(f"chosen: average_last=2 length_penalty={best['length_penalty']} (BLEU ")
    assert cli.main(["evaluate", "--model", str(run), "--split", "test", "--sweep", "average_from_best=1,2",
                     "--out", str(tmp_path / "sweep_from")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["average_from_best", "bleu"] and printed[-1].startswith("chosen: average_from_best=2")
    saved = json.loads((tmp_path / "sweep_from" / "sweep.json").read_text())
    assert [r["checkpoint_steps"] for r in saved["rows"]] == [[2], [2, 3]]
    assert cli.main(["evaluate", "--model", str(run), "--sweep", "average_last=1", "--best"]) == 1
    # Several ways to choose checkpoints in one sweep: each value of each is an alternative, each scored with
    # every decode combination; the table prints "-" for a row's other kinds, and the choice names its own.
    assert cli.main(["evaluate", "--model", str(run), "--split", "test", "--sweep", "average_last=1",
                     "length_penalty=0.6,1.0", "average_from_best=2,1", "--out", str(tmp_path / "kinds")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["average_last", "average_from_best", "length_penalty", "bleu"]
    assert len({len(line) for line in printed[:7]}) == 1  # columns as wide as their names: the table lines up
    assert [line.split()[:3] for line in printed[1:7]] == [["1", "-", "0.6"], ["1", "-", "1.0"], ["-", "2", "0.6"],
                                                          ["-", "2", "1.0"], ["-", "1", "0.6"], ["-", "1", "1.0"]]
    saved = json.loads((tmp_path / "kinds" / "sweep.json").read_text())
    assert [r["checkpoint_steps"] for r in saved["rows"]] == [[3], [3], [2, 3], [2, 3], [2], [2]]
    assert [sorted(r) for r in saved["rows"][::2]] == [
        ["average_last", "bleu", "checkpoint_steps", "length_penalty"],
        ["average_from_best", "bleu", "checkpoint_steps", "length_penalty"],
        ["average_from_best", "bleu", "checkpoint_steps", "length_penalty"]]
    best = max(saved["rows"], key=lambda r: r["bleu"])
    assert best["checkpoint_steps"] == [2, 3] and saved["chosen"] == best
    assert printed[7].startswith(f"chosen: average_from_best=2 length_penalty={best['length_penalty']} (BLEU ")
    # A window the run does not hold (3 kept: 2 from its best, 3 of 4 best) is a logged skip; the rest stay.
    with caplog.at_level(logging.WARNING, logger="jaxformer.evaluate"):
        assert cli.main(["evaluate", "--model", str(run), "--split", "test", "--sweep", "average_from_best=5,2",
                         "average_best=4", "--out", str(tmp_path / "unfit")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in printed[1:2]] == [["2", "-"]] and len(printed) == 5
    assert printed[2].startswith("skipped: average_from_best=5 (") and "fewer than the 5 asked for" in printed[2]
    assert printed[3].startswith("skipped: average_best=4 (") and "keeps 3 of the 4 best" in printed[3]
    assert printed[4].startswith("chosen: average_from_best=2 (BLEU ")
    assert "sweep {'average_from_best': 5}: skipped: " in caplog.text
    saved = json.loads((tmp_path / "unfit" / "sweep.json").read_text())
    assert [r["checkpoint_steps"] for r in saved["rows"]] == [[2, 3]]
    assert [sorted(r) for r in saved["skipped"]] == [["average_from_best", "reason"], ["average_best", "reason"]]
    assert cli.main(["evaluate", "--model", str(run), "--sweep", "average_best=4,5"]) == 1  # none fits: no table
    err = capsys.readouterr().err
    assert "--sweep: none of its 2 checkpoint choices could be loaded; the first, average_best=4: " in err
    assert cli.main(["evaluate", "--model", str(run), "--sweep", "length_penalty=x"]) == 1
    assert "--sweep length_penalty=x: expected float values" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", str(run), "--sweep", "average_best=3,0"]) == 1  # a bad value: no skip
    assert "--sweep average_best=3,0: each value is a number of checkpoints, >= 1" in capsys.readouterr().err


def test_a_run_with_fewer_checkpoints_than_average_last_averages_what_it_has(bundle, tmp_path, caplog):
    run = make_run(bundle, tmp_path / "run", average_last=5, test_prefix=tmp_path / "test")
    with caplog.at_level(logging.WARNING, logger="jaxformer.checkpoint"):
        translator = load_translator(run)
    assert translator.checkpoint_steps == [1, 2, 3]
    assert "only 3 readable checkpoint(s)" in caplog.text and "of the 5 to average" in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match="fewer than the 5 asked for"):
        load_translator(run, average_last=5)  # asked for explicitly: not silently fewer


def test_every_test_line_is_scored_and_the_bad_ones_counted(bundle, tmp_path, caplog):
    test = tmp_path / "test"
    sources = [s.encode() for s in SENTENCES[:3]] + [b"", SENTENCES[3].encode() + b" \xff", b"   "]
    references = [s.encode() for s in SENTENCES[:3]] + [b"abc", SENTENCES[3].encode(), b"def"]
    write_split(test, sources, references)
    run = make_run(bundle, tmp_path / "run", average_last=2, test_prefix=test)
    with caplog.at_level(logging.WARNING, logger="jaxformer.evaluate"):
        result = run_evaluation(run, tmp_path / "eval")
    assert result.num_sentences == len(sources) == len(result.hypotheses)
    info = json.loads((tmp_path / "eval" / "bleu.json").read_text())
    assert info["num_sentences"] == 6 and info["empty_lines"] == 2 and info["bad_utf8_lines"] == 1
    hyps = (tmp_path / "eval" / "test.hyp").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(hyps) == 6 and hyps[3] == "" and hyps[5] == "" and hyps[:3] == SENTENCES[:3]
    assert "2 of 6 lines have an empty side and 1 a U+FFFD" in caplog.text
    # the --src/--ref files are read the same way: nothing dropped
    assert cli.main(["evaluate", "--model", str(run), "--src", f"{test}.xx", "--ref", f"{test}.yy",
                     "--out", str(tmp_path / "eval2")]) == 0
    assert json.loads((tmp_path / "eval2" / "bleu.json").read_text())["num_sentences"] == 6


def test_a_position_table_shorter_than_a_training_batch_is_refused_naming_both_keys():
    config = default_config()
    config.model.max_len, config.data.max_len = 64, 100
    config.data.bucket_lengths, config.data.pack = (16, 32, 64, 128), False  # one pair per row
    with pytest.raises(ValueError, match=r"model.max_len=64 is shorter than the longest training batch, 128 "
                                         r"tokens \(data.bucket_lengths=.*data.max_len=100"):
        check_lengths(config)
    config.data.max_len = 64
    check_lengths(config)  # pairs of up to 64 tokens go into the 64 bucket
    config.data.pack = True  # packed rows (the default) always have the largest bucket's length
    with pytest.raises(ValueError, match="model.max_len=64.*data.bucket_lengths"):
        check_lengths(config)


def test_training_refuses_a_short_position_table_at_start(tmp_path):
    from jaxformer.train import run

    config = default_config()
    config.train.workdir = str(tmp_path / "run")
    config.model.max_len, config.data.max_len = 32, 64
    with pytest.raises(ValueError, match="model.max_len=32.*data.max_len=64"):
        run(config)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_output_limit_past_the_position_table_is_capped_with_a_warning(bundle, caplog):
    model, params, tokenizer = bundle  # max_len 64
    with caplog.at_level(logging.WARNING, logger="jaxformer.translate"):
        out = Translator(*bundle)(SENTENCES[:2], max_extra_len=50, batch_size=8)
    assert "model.max_len" not in caplog.text  # inputs of a few tokens + 50 fit in 64
    with caplog.at_level(logging.WARNING, logger="jaxformer.translate"):
        assert Translator(*bundle)(SENTENCES[:2], max_extra_len=70, batch_size=8) == out
    assert "2 of 2 sentences have input + decode.max_extra_len=70 longer than model.max_len=64" in caplog.text
