"""The EVALB (COLLINS.prm) scorer: hand-computed values on small trees, and the sample scored against itself."""

from pathlib import Path

import pytest
from nltk import Tree

from jaxformer.parseval import CUTOFF_LEN, score_trees, sentence_result
from jaxformer.data.treebank import read_split

PTB_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ptb_sample"
T = Tree.fromstring


def test_a_perfect_match_scores_100():
    tree = T("(S (NP (DT The) (NN cat)) (VP (VBD sat)) (. .))")
    r = sentence_result(tree, tree.copy(deep=True))
    assert (r.status, r.length, r.gold_brackets, r.test_brackets, r.matched, r.words, r.correct_tags) == \
        ("ok", 4, 3, 3, 3, 3, 3)
    s = score_trees([tree], [tree])
    assert (s.all.precision, s.all.recall, s.all.f1, s.all.complete_match, s.all.tagging_accuracy) == (100,) * 5


def test_punctuation_is_deleted_by_its_gold_tag():
    gold = T("(S (NP (NNP John)) (VP (VBD left)) (. .))")
    # The period inside VP, mistagged NN, and a bracket over nothing but punctuation: none of it counts.
    test = T("(S (NP (NNP John)) (VP (VBD left) (X (NN .))))")
    r = sentence_result(gold, test)
    assert (r.gold_brackets, r.test_brackets, r.matched) == (3, 3, 3)   # S(0,2) NP(0,1) VP(1,2) on both sides
    assert (r.words, r.correct_tags, r.length) == (2, 2, 3)             # the length counts punctuation
    assert r.gold_brackets == r.test_brackets == r.matched


def test_every_collins_punctuation_tag_is_deleted_and_others_are_not():
    gold = T("(S (`` ``) (NP (NNP A)) (, ,) (: :) (VP (VBD b) (NP (-LRB- -LRB-) (NN c) (-RRB- -RRB-))) ('' '') (. .))")
    test = T("(S (`` ``) (NP (NNP A) (, ,) (: :)) (VP (VBD b) (NP (-LRB- -LRB-) (NN c) (-RRB- -RRB-)) ('' '') (. .)))")
    r = sentence_result(gold, test)
    # -LRB- and -RRB- stay: 5 words; S(0,5) NP(0,1) VP(1,5) NP(2,5) on both sides, wherever the punctuation hangs.
    assert (r.status, r.length, r.words, r.gold_brackets, r.test_brackets, r.matched) == ("ok", 10, 5, 4, 4, 4)


def test_advp_and_prt_are_one_label_but_np_and_vp_are_not():
    gold = T("(S (NP (PRP He)) (VP (VBD gave) (PRT (RP up))))")
    same = sentence_result(gold, T("(S (NP (PRP He)) (VP (VBD gave) (ADVP (RP up))))"))
    assert (same.gold_brackets, same.test_brackets, same.matched) == (4, 4, 4)
    clash = sentence_result(gold, T("(S (VP (PRP He)) (VP (VBD gave) (ADVP (RB up))))"))
    assert (clash.gold_brackets, clash.test_brackets, clash.matched) == (4, 4, 3)
    assert (clash.words, clash.correct_tags) == (3, 2)  # RP vs RB


def test_function_tags_traces_and_the_root_follow_collins():
    raw = T("( (S (NP-SBJ-1 (NNP John)) (VP (VBD left) (SBAR (-NONE- 0) (S (-NONE- *T*-1)))) (. .)) )")
    test = T("(TOP (S (NP (NNP John)) (VP (VBD left)) (. .)))")
    r = sentence_result(raw, test)
    # S, NP, VP counted; the outer brackets, TOP and the constituents over traces are not.
    assert (r.length, r.gold_brackets, r.test_brackets, r.matched) == (3, 3, 3, 3)


def test_tags_are_compared_word_by_word_apart_from_the_brackets():
    """EVALB's tagging accuracy: the test tree's tag of word i against the gold tag of word i (punctuation left
    out), whatever the brackets above them; linearized and delinearized, the tags stay on their words."""
    from jaxformer.data.treebank import delinearize, linearize

    gold = T("(S (NP (DT The) (JJ old) (NN cat)) (VP (VBD sat) (PP (IN on) (NP (DT the) (NN mat)))) (. .))")
    flat = T("(S (DT The) (JJ old) (NP (NN cat) (VBD sat)) (IN on) (X (DT the) (NN mat) (. .)))")
    words, symbols = linearize(flat)
    assert symbols[:3] == ["(S", "DT", "JJ"] and words == gold.leaves()
    r = sentence_result(gold, delinearize(symbols, words))
    assert (r.words, r.correct_tags) == (7, 7) and r.matched < r.gold_brackets  # the period is not scored
    s = score_trees([gold], [delinearize(symbols, words)])
    assert s.all.tagging_accuracy == 100.0 and s.all.f1 < 100.0 and s.all.complete_match == 0.0
    shifted = [symbols[0]] + [symbols[2], symbols[1]] + symbols[3:]  # The/JJ old/DT: two tags swapped
    assert sentence_result(gold, delinearize(shifted, words)).correct_tags == 5


def test_crossing_brackets_count_test_brackets_that_cross_a_gold_one():
    gold = T("(S (NP (DT a) (NN b)) (VP (VBD c) (NN d)))")
    r = sentence_result(gold, T("(S (DT a) (X (NN b) (VBD c)) (NN d))"))
    assert (r.crossing, r.matched, r.gold_brackets, r.test_brackets) == (1, 1, 3, 2)


def test_duplicate_brackets_match_as_a_multiset():
    gold = T("(S (NP (NP (NN a))) (VP (VBZ b)))")
    r = sentence_result(gold, T("(S (NP (NP (NP (NN a)))) (VP (VBZ b)))"))
    assert (r.gold_brackets, r.test_brackets, r.matched) == (4, 5, 4)


def test_a_corpus_with_a_long_sentence_a_skip_and_an_error():
    long_gold = T("(S (NP " + " ".join(f"(NN w{i})" for i in range(40)) + ") (. .))")  # 41 words with the period
    long_test = T("(S (NP " + " ".join(f"(NN w{i})" for i in range(20)) + ") (NP "
                  + " ".join(f"(NN w{i})" for i in range(20, 40)) + ") (. .))")
    gold = [T("(S (NP (DT The) (NN cat)) (VP (VBD sat) (NP (-NONE- *))) (. .))"),
            T("(S (NP (PRP He)) (VP (VBD gave) (PRT (RP up))))"),
            long_gold,
            T("(S (NP (NN x)) (VP (VBZ is)))"),
            T("(S (NP (NN dog)))")]
    test = [T("(S (NP (DT The) (NN cat)) (VP (VBD sat)) (. .))"),       # 3 of 3, complete
            T("(S (VP (PRP He)) (VP (VBD gave) (ADVP (RB up))))"),     # 3 of 4 gold, 4 test; tags 2/3
            long_test,                                                 # 1 of 2 gold, 3 test; tags 40/40
            None,                                                      # ill-formed: skipped
            T("(S (NP (NN cat)))")]                                    # other words: an error
    s = score_trees(gold, test)
    assert (s.all.sentences, s.all.scored, s.all.skipped, s.all.errors) == (5, 3, 1, 1)
    assert (s.all.gold_brackets, s.all.test_brackets, s.all.matched) == (9, 10, 7)
    assert s.all.precision == pytest.approx(70.0) and s.all.recall == pytest.approx(700 / 9)
    assert s.all.f1 == pytest.approx(1400 / 19)                 # 2 * 7 / (9 + 10)
    assert s.all.complete_match == pytest.approx(100 / 3)
    assert s.all.tagging_accuracy == pytest.approx(4500 / 46)   # 45 of 46 words
    assert CUTOFF_LEN == 40
    assert (s.short.sentences, s.short.scored, s.short.skipped, s.short.errors) == (4, 2, 1, 1)
    assert (s.short.gold_brackets, s.short.test_brackets, s.short.matched) == (7, 7, 6)
    assert s.short.f1 == pytest.approx(600 / 7)
    assert s.short.complete_match == 50.0
    assert s.short.tagging_accuracy == pytest.approx(500 / 6)
    assert s.as_dict()["len<=40"]["scored"] == 2


def test_a_sentence_of_40_words_and_a_trace_is_within_the_cutoff():
    gold = T("(S (NP " + " ".join(f"(NN w{i})" for i in range(39)) + ") (VP (-NONE- *)) (. .))")
    s = score_trees([gold], [gold])
    assert (s.all.sentences, s.short.sentences, s.short.f1) == (1, 1, 100.0)


def test_the_gold_and_test_counts_must_pair_up():
    with pytest.raises(ValueError, match="2 gold trees but 1 test trees"):
        score_trees([T("(S (NN a))")] * 2, [None])


def test_the_raw_sample_scores_100_against_its_normalized_trees():
    """EVALB's own deletions (traces, function tags) make the raw treebank equal to the normalized one."""
    raw = read_split(PTB_SAMPLE, "test", normalized=False)
    normalized = read_split(PTB_SAMPLE, "test")
    s = score_trees(raw, normalized)
    assert (s.all.sentences, s.all.scored, s.short.sentences) == (273, 273, 260)
    assert (s.all.f1, s.all.complete_match, s.all.tagging_accuracy) == (100.0, 100.0, 100.0)
    assert s.all.words == 6327 - 647 and s.all.gold_brackets == 4980  # 647 punctuation tokens (grep)
