"""The treebank reader: the sample's splits, normalization, the linearized round trip and the bad inputs."""

import re
import shutil
from pathlib import Path

import nltk
import pytest
from nltk import Tree
from nltk.corpus.reader import BracketParseCorpusReader
from nltk.corpus.util import LazyCorpusLoader

from jaxformer.data import DataError
from jaxformer.data.treebank import (CLOSE, SAMPLE_SPLITS, WSJ_SPLITS, IllFormedTree, tree_lines, delinearize,
                                     linearize, normalize, read_nltk_treebank, read_split, read_trees, split_files,
                                     strip_label, to_bracket)

PTB_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ptb_sample"
T = Tree.fromstring


@pytest.fixture(scope="module")
def sample() -> dict[str, list[Tree]]:
    """The sample's three splits, normalized."""
    if not (PTB_SAMPLE / "wsj_0001.mrg").exists():
        pytest.fail(f"the Penn Treebank sample is not at {PTB_SAMPLE}; the tests expect ../shared beside the checkout")
    return {split: read_split(PTB_SAMPLE, split) for split in SAMPLE_SPLITS}


def test_the_splits_hold_the_readme_counts(sample):
    """sentences, words (without -NONE-) and the longest sentence, per split, as the sample's README gives them."""
    counts = {split: (len(trees), sum(len(t.leaves()) for t in trees), max(len(t.leaves()) for t in trees))
              for split, trees in sample.items()}
    assert counts == {"train": (3068, 73842, 249), "dev": (328, 7951, 75), "test": (273, 6327, 58)}
    assert [p.name for p in split_files(PTB_SAMPLE, "dev")][::19] == ["wsj_0140.mrg", "wsj_0159.mrg"]


def test_every_tree_survives_the_round_trip(sample):
    trees = [t for split in sample.values() for t in split]
    assert len(trees) == 3669
    for tree in trees:
        words, symbols = linearize(tree)
        assert delinearize(symbols, words) == tree


def test_normalized_trees_have_no_traces_function_tags_or_outer_bracket(sample):
    assert to_bracket(sample["train"][0], root="") == (
        "(S (NP (NP (NNP Pierre) (NNP Vinken)) (, ,) (ADJP (NP (CD 61) (NNS years)) (JJ old)) (, ,)) "
        "(VP (MD will) (VP (VB join) (NP (DT the) (NN board)) (PP (IN as) (NP (DT a) (JJ nonexecutive) "
        "(NN director))) (NP (NNP Nov.) (CD 29)))) (. .))")
    phrases, tags = set(), set()
    for tree in (t for split in sample.values() for t in split):
        phrases |= {s.label() for s in tree.subtrees(lambda s: not isinstance(s[0], str))}
        tags |= {tag for _, tag in tree.pos()}
    assert phrases == {"ADJP", "ADVP", "CONJP", "FRAG", "INTJ", "LST", "NAC", "NP", "NX", "PP", "PRN", "PRT", "QP",
                       "RRC", "S", "SBAR", "SBARQ", "SINV", "SQ", "UCP", "VP", "WHADJP", "WHADVP", "WHNP", "WHPP", "X"}
    assert "-NONE-" not in tags and {"-LRB-", "-RRB-", "PRP$", "WP$", "``", "''", "$", "#"} <= tags


@pytest.mark.parametrize("label,stripped", [
    ("NP-SBJ-1", "NP"), ("NP=2", "NP"), ("WHNP-1", "WHNP"), ("PP-LOC=2", "PP"), ("NP-SBJ=1-3", "NP"),
    ("ADVP|PRT", "ADVP"), ("-LRB-", "-LRB-"), ("-RRB-", "-RRB-"), ("-NONE-", "-NONE-"), ("PRP$", "PRP$"), ("S", "S")])
def test_strip_label(label, stripped):
    assert strip_label(label) == stripped


def test_normalize_drops_empty_elements_and_what_they_leave_empty():
    raw = T("( (S (NP-SBJ-1 (-NONE- *)) (VP (VBD left) (SBAR (-NONE- 0) (S (-NONE- *T*-1)))) (. .)) )")
    assert normalize(raw) == T("(S (VP (VBD left)) (. .))")
    assert normalize(T("( (NP (NN a)) (. .) )")) == T("(TOP (NP (NN a)) (. .))")  # several under the outer bracket


def test_linearize_gives_words_and_one_symbol_per_bracket_and_tag():
    words, symbols = linearize(T("(S (NP (PRP He)) (VP (VBD left) (PRT (RP off))) (. .))"))
    assert words == ["He", "left", "off", "."]
    assert symbols == ["(S", "(NP", "PRP", CLOSE, "(VP", "VBD", "(PRT", "RP", CLOSE, CLOSE, ".", CLOSE]


@pytest.mark.parametrize("symbols,words,message", [
    (["(S", "(NP", "NN", ")"], ["a"], "1 bracket"),
    (["(S", "NN", ")", ")"], ["a"], "symbol 3 .* comes after"),
    ([")"], [], "symbol 0 .* closes no bracket"),
    (["(S", "(NP", ")", "NN", ")"], ["a"], "empty constituent .'NP'"),
    (["(S", "NN", "NN", ")"], ["a"], "no word left"),
    (["(S", "NN", ")"], ["a", "b"], "1 of 2 words have no tag"),
    (["NN"], ["a"], "outside every constituent"),
    ([], [], "no tree"),
])
def test_delinearize_refuses_ill_formed_sequences(symbols, words, message):
    with pytest.raises(IllFormedTree, match=message):
        delinearize(symbols, words)


def test_the_wsj_section_layout_is_read_by_section(tmp_path):
    """The LDC layout, wsj/SS/wsj_SSNN.mrg: sections 02-21 train, 22 dev, 23 test; others (00) belong to none."""
    sources = {"00": 1, "02": 2, "21": 3, "22": 140, "23": 160}
    for section, number in sources.items():
        (tmp_path / "wsj" / section).mkdir(parents=True)
        shutil.copy(PTB_SAMPLE / f"wsj_{number:04d}.mrg", tmp_path / "wsj" / section / f"wsj_{section}01.mrg")
    assert [p.name for p in split_files(tmp_path, "train", WSJ_SPLITS)] == ["wsj_0201.mrg", "wsj_2101.mrg"]
    for split, section in [("train", "02"), ("dev", "22"), ("test", "23")]:
        first = read_split(tmp_path, split, WSJ_SPLITS)[0]
        assert first == read_trees([PTB_SAMPLE / f"wsj_{sources[section]:04d}.mrg"])[0]


def test_nltk_corpus_treebank_is_read_by_split(tmp_path, monkeypatch):
    combined = tmp_path / "corpora" / "treebank" / "combined"
    combined.mkdir(parents=True)
    for number in (1, 2, 140, 160, 179):
        shutil.copy(PTB_SAMPLE / f"wsj_{number:04d}.mrg", combined)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    # A fresh loader as nltk.corpus defines it: the module's own one would keep this temporary root once loaded.
    monkeypatch.setattr(nltk.corpus, "treebank", LazyCorpusLoader(
        "treebank/combined", BracketParseCorpusReader, r"wsj_.*\.mrg", tagset="wsj", encoding="ascii"))
    train = read_nltk_treebank("train")
    assert train == read_trees([PTB_SAMPLE / "wsj_0001.mrg", PTB_SAMPLE / "wsj_0002.mrg"]) and len(train) == 3
    assert len(read_nltk_treebank("test")) == len(read_trees([PTB_SAMPLE / f"wsj_{n}.mrg" for n in ("0160", "0179")]))
    with pytest.raises(DataError, match="numbered 2300-2399 for split 'test'"):
        read_nltk_treebank("test", WSJ_SPLITS)


def test_an_unclosed_tree_names_its_file_and_line(tmp_path):
    path = tmp_path / "wsj_0001.mrg"
    path.write_text("( (S (NP (NN a)) (VP (VBZ is))) )\n( (S (NP (NN b))\n    (VP (VBZ is)) )\n")
    message = rf"^{re.escape(str(path))}:2: the tree that starts here is never closed \(1 '\(' left open\)"
    with pytest.raises(DataError, match=message):
        read_split(tmp_path, "train")


def test_an_extra_bracket_or_an_empty_tree_names_its_file_and_line(tmp_path):
    path = tmp_path / "wsj_0001.mrg"
    path.write_text("( (S (NP (NN a)) (VP (VBZ is))) )\n\n( (S (NP (NN b)) (VP (VBZ is))) ))\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: a '\)' closes no bracket"):
        tree_lines(path)
    path.write_text("( (S (NP (NN a)) (VP (VBZ is))) )\n\n( (S (NP (NN b))\n (VP (VBZ is))) )\n( (X (-NONE- *)) )\n")
    assert tree_lines(path) == [1, 3, 5]
    message = rf"^{re.escape(str(path))}:5: the tree holds only -NONE- empty elements; remove the tree"
    with pytest.raises(DataError, match=message):
        read_trees([path])


def test_a_file_without_trees_is_named(tmp_path):
    (tmp_path / "wsj_0001.mrg").write_text("( (S (NP (NN a)) (VP (VBZ is))) )\n")
    (tmp_path / "wsj_0002.mrg").write_text("\n   \n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'wsj_0002.mrg'))}:1: no trees in this file"):
        read_split(tmp_path, "train")


def test_an_empty_split_range_is_named():
    with pytest.raises(DataError, match=r"no wsj_NNNN\.mrg file numbered 0200-2199 for split 'train'"):
        read_split(PTB_SAMPLE, "train", WSJ_SPLITS)
    with pytest.raises(DataError, match=r"unknown split 'valid'"):
        split_files(PTB_SAMPLE, "valid")


def test_to_bracket_writes_one_line_under_top():
    assert to_bracket(T("(S (NP (PRP He)) (VP (VBD left)))")) == "(TOP (S (NP (PRP He)) (VP (VBD left))))"
