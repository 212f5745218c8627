"""The BLEU variants papers report (jaxformer.bleu) and `jaxformer evaluate`'s options for them.

The Moses recipe is checked against Multi30k's official tokenized test2016 references; the evaluate runs
use helpers.make_run's run of the tiny copy model, whose "translation" of made-up lowercase words is the input.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import sacrebleu

from jaxformer import cli
from jaxformer.bleu import (compound_split, compound_split_bleu, corpus_bleu, moses_lc, moses_lc_bleu,
                            moses_tokenize, tokenized_bleu)
from jaxformer.evaluate import read_lines, run_evaluation
from helpers import SENTENCES, make_run, write_split

# (line, what tensor2tensor's `perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'` makes of it)
COMPOUNDS = [
    ("rich-text format", "rich ##AT##-##AT## text format"),
    ("ein U-Bahn-Hof .", "ein U ##AT##-##AT## Bahn ##AT##-##AT## Hof ."),
    ("a-b-c-d", "a ##AT##-##AT## b-c ##AT##-##AT## d"),  # matches do not overlap: "b-c" keeps its hyphen
    ("3-4 kinder", "3 ##AT##-##AT## 4 kinder"),
    ("ein - mann", "ein - mann"),                         # a free-standing dash is no compound
    ("-x y-", "-x y-"),
    ("x--y", "x ##AT##-##AT## -y"),
    ("&quot;-&quot;", "&quot; ##AT##-##AT## &quot;"),
    ("", ""),
]


def test_tokenized_bleu_is_sacrebleu_with_tokenize_none(multi30k_dir):
    refs = read_lines(multi30k_dir / "tok" / "test2016.lc.norm.tok.de")[:200]
    hyps = [refs[i + 1] if i % 3 == 0 else refs[i] for i in range(len(refs) - 1)] + [refs[-1]]
    hyps[1] = hyps[1].replace(" .", ".")  # glued punctuation: a different token here, split again by 13a
    result = tokenized_bleu(hyps, refs)
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none")
    assert result.score == expected.score and 40 < result.score < 90
    assert "tok:none" in result.signature and "case:mixed" in result.signature
    assert result.name == "tokenized" and "multi-bleu" in result.description
    glued = ["ein mann fährt rad."], ["ein mann fährt rad ."]
    assert tokenized_bleu(*glued).score < corpus_bleu(*glued).score == pytest.approx(100.0)


def test_moses_retokenizing_the_raw_test2016_references_gives_the_official_tok_file(multi30k_dir):
    raw = read_lines(multi30k_dir / "test2016.de")
    official = read_lines(multi30k_dir / "tok" / "test2016.lc.norm.tok.de")
    assert len(raw) == len(official) == 1000
    ours = moses_lc(raw, "de")
    assert [i for i, (a, b) in enumerate(zip(ours, official)) if a != b] == []
    result = moses_lc_bleu(raw, official, "de")  # the raw references, scored as a model's raw output would be
    assert result.score == pytest.approx(100.0) and result.hypotheses == raw
    assert "tok:none" in result.signature and "hyp:lc+norm+moses-tok|lang:de|sacremoses:" in result.signature


def test_compound_splitting_follows_tensor2tensors_rule():
    assert [compound_split(c) for c, _ in COMPOUNDS] == [s for _, s in COMPOUNDS]
    if shutil.which("perl"):  # the rule itself, where Perl is installed
        perl = subprocess.run(["perl", "-ple", r"s{(\S)-(\S)}{$1 ##AT##-##AT## $2}g"], check=True, text=True,
                              input="".join(c + "\n" for c, _ in COMPOUNDS), capture_output=True).stdout
        assert perl.split("\n")[:-1] == [s for _, s in COMPOUNDS]


def test_compound_split_bleu_moses_tokenizes_then_splits_both_sides():
    hyps = ['Ein Mann fährt "U-Bahn".', "Zwei Kinder spielen im Schnee-Park."]
    refs = ['Ein Mann fährt "U-Bahn-Zug".', "Zwei Kinder spielen im Schnee-Park."]
    result = compound_split_bleu(hyps, refs, "de")
    assert moses_tokenize(hyps[:1], "de") == ["Ein Mann fährt &quot; U-Bahn &quot; ."]
    split = lambda lines: [compound_split(t) for t in moses_tokenize(lines, "de")]  # noqa: E731
    assert result.score == sacrebleu.corpus_bleu(split(hyps), [split(refs)], tokenize="none").score
    assert result.score > tokenized_bleu(moses_tokenize(hyps, "de"), moses_tokenize(refs, "de")).score  # U, Bahn match
    assert "hyp:moses-tok+atat|ref:moses-tok+atat|lang:de" in result.signature
    already = compound_split_bleu(moses_tokenize(hyps, "de"), moses_tokenize(refs, "de"), "de", tokenized=True)
    assert already.score == result.score and "hyp:atat|ref:atat" in already.signature


def test_evaluate_reports_the_moses_lc_and_compound_split_scores_of_raw_output(bundle, tmp_path, capsys):
    test = tmp_path / "test"
    # raw references capitalized with a full stop; their tokenized lowercased form is the copy model's output
    refs = [s.capitalize() + "." for s in SENTENCES]
    write_split(test, [s.encode() for s in SENTENCES], [r.encode() for r in refs])
    tok_refs = tmp_path / "test.tok.yy"
    tok_refs.write_text("".join(s + "\n" for s in SENTENCES))
    run = make_run(bundle, tmp_path / "run", average_last=2, test_prefix=test)

    assert cli.main(["evaluate", "--workdir", str(run), "--out", str(tmp_path / "eval"), "--tok-refs", str(tok_refs),
                     "--compound-split"]) == 0
    printed = capsys.readouterr().out.splitlines()
    info = json.loads((tmp_path / "eval" / "bleu.json").read_text())
    hyps = read_lines(tmp_path / "eval" / "test.hyp")
    assert info["bleu_moses_lc"] == moses_lc_bleu(hyps, SENTENCES, "yy").score > 80 > info["bleu"]
    assert info["signature_moses_lc"] == moses_lc_bleu(hyps, SENTENCES, "yy").signature
    assert info["description_moses_lc"].startswith("Moses-tokenized lowercased BLEU") and info["tok_refs"] == str(tok_refs)
    assert info["bleu_compound_split"] == compound_split_bleu(hyps, refs, "yy").score
    assert "hyp:moses-tok+atat" in info["signature_compound_split"]
    assert info["bleu_lowercase"] == corpus_bleu(hyps, refs, lowercase=True).score and "bleu_tokenized" not in info
    # each score: "description: BLEU = ..." then its signature, in bleu.txt too
    assert len(printed) == 8 and printed[0].startswith(info["description"] + ": BLEU = ")
    assert printed[5] == info["signature_moses_lc"] and printed[6].startswith(info["description_compound_split"])
    assert (tmp_path / "eval" / "bleu.txt").read_text().splitlines() == printed

    (tmp_path / "short.tok").write_text("".join(s + "\n" for s in SENTENCES[:5]))
    with pytest.raises(ValueError, match="has 5 lines but the test set"):
        run_evaluation(run, tmp_path / "eval3", tok_refs=str(tmp_path / "short.tok"))
    assert cli.main(["evaluate", "--workdir", str(run), "--out", str(tmp_path / "e4"), "--tokenized",
                     "--tok-refs", str(tok_refs)]) == 1
    assert "already tokenized" in capsys.readouterr().err


def test_evaluate_reports_tokenized_bleu_of_tokenized_output(bundle, tmp_path, capsys):
    test = tmp_path / "test"
    write_split(test, [s.encode() for s in SENTENCES], [s.encode() for s in SENTENCES])
    run = make_run(bundle, tmp_path / "run", average_last=2, test_prefix=test)
    assert cli.main(["evaluate", "--workdir", str(run), "--out", str(tmp_path / "eval"), "--tokenized",
                     "--compound-split"]) == 0
    printed = capsys.readouterr().out.splitlines()
    info = json.loads((tmp_path / "eval" / "bleu.json").read_text())
    hyps = read_lines(tmp_path / "eval" / "test.hyp")
    assert info["bleu_tokenized"] == sacrebleu.corpus_bleu(hyps, [SENTENCES], tokenize="none").score > 80
    assert "tok:none" in info["signature_tokenized"] and info["description_tokenized"].startswith("tokenized BLEU")
    assert "hyp:atat|ref:atat" in info["signature_compound_split"]  # already tokenized: only split
    assert len(printed) == 8 and printed[5] == info["signature_tokenized"]
