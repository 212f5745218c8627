"""The grammar mask (issue 34): every search keeps its outputs well-formed trees with one tag per word."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxformer import grammar
from jaxformer.data import EOS_ID, PAD_ID
from jaxformer.data.treebank import CLOSE, IllFormedTree, delinearize
from jaxformer.decode import beam_search, beam_search_nbest, greedy_search, sample_search, score_sequences
from jaxformer.model import Transformer, TransformerConfig, init_params
from jaxformer.translate import search_ids

# A made-up vocabulary: the specials, four opening brackets, ')', five tags, then source words.
CFG = TransformerConfig(vocab_size=30, d_model=32, d_ff=64, num_heads=4, num_encoder_layers=1,
                        num_decoder_layers=2, max_len=64, dropout_rate=0.0)
OPENS = {4: "(S", 5: "(NP", 6: "(VP", 7: "(PP"}
CLOSE_ID = 8
TAGS = {9: "NN", 10: "VB", 11: "DT", 12: "IN", 13: "JJ"}
SYMBOLS = {**OPENS, CLOSE_ID: CLOSE, **TAGS}
KINDS = grammar.kinds_table(CFG.vocab_size, OPENS, CLOSE_ID, TAGS, EOS_ID)
LENGTHS = [1, 3, 6, 2, 9, 4, 0, 5]  # words per input; 0: an all-PAD filler row
EXTRA = 24  # room for the brackets: a tree over n words has up to ~3n symbols here


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG), init_params(CFG, jax.random.key(3))


@pytest.fixture(scope="module")
def src():
    rng = np.random.default_rng(0)
    src = np.full((len(LENGTHS), max(LENGTHS) + 1), PAD_ID, np.int32)
    for row, n in enumerate(LENGTHS):
        if n:
            src[row, :n] = rng.integers(14, CFG.vocab_size, n)
            src[row, n] = EOS_ID
    return src


def trees(tokens, words=LENGTHS):
    """Each row's tree, or the IllFormedTree it raised (rows with no words are skipped)."""
    found = []
    for row, n in zip(np.asarray(tokens), words):
        if not n:
            continue
        symbols = [SYMBOLS.get(int(t), f"<{int(t)}>") for t in row if t not in (PAD_ID, EOS_ID)]
        try:
            found.append(delinearize(symbols, [f"w{i}" for i in range(n)]))
        except IllFormedTree as e:
            found.append(e)
    return found


def assert_trees(tokens):
    bad = [t for t in trees(tokens) if isinstance(t, IllFormedTree)]
    assert not bad, bad
    for row, n in zip(np.asarray(tokens), LENGTHS):
        assert not n or EOS_ID in row.tolist(), "every output ends with EOS, not cut at the length limit"


def test_the_mask_walks_a_tree_and_blocks_what_would_break_it():
    sequence = [4, 5, 11, 9, CLOSE_ID, 6, 10, 7, 12, 5, 9, CLOSE_ID, CLOSE_ID, CLOSE_ID, CLOSE_ID, EOS_ID]
    state = grammar.initial_state(np.array([5]))
    for t, token in enumerate(sequence):
        allowed = np.asarray(grammar.allowed(state, KINDS))[0]
        assert allowed[token], f"step {t}: token {token} refused"
        if t == 0:  # only an opening bracket can start
            assert set(np.flatnonzero(allowed)) == set(OPENS)
        if t == 1:  # just opened: no ')' (an empty constituent), no EOS
            assert not allowed[CLOSE_ID] and not allowed[EOS_ID] and allowed[9]
        if t == 11:  # every word has its tag: no tag, no new bracket; ')' only
            assert set(np.flatnonzero(allowed)) == {CLOSE_ID}
        state = grammar.advance(state, np.array([token]), KINDS)
    # The root closed with words left is refused; EOS before the root closes is refused.
    state = grammar.initial_state(np.array([2]))
    for token in (4, 9):
        state = grammar.advance(state, np.array([token]), KINDS)
    allowed = np.asarray(grammar.allowed(state, KINDS))[0]
    assert not allowed[CLOSE_ID] and not allowed[EOS_ID] and allowed[10] and allowed[5]
    assert not np.any(allowed[14:]) and not allowed[PAD_ID]  # source words are never output
    assert np.asarray(grammar.allowed(state, KINDS, np.array([0])))[0, EOS_ID]  # at the limit: EOS
    # A bracket is opened only where the tree can still end in time: 1 word left, depth 1: a new bracket
    # needs its tag, 2 ')' and EOS after it.
    assert np.asarray(grammar.allowed(state, KINDS, np.array([4])))[0, 5]
    assert not np.asarray(grammar.allowed(state, KINDS, np.array([3])))[0, 5]


def test_every_search_gives_well_formed_trees_under_the_mask(model, src):
    net, params = model
    mask = {"kinds": KINDS, "words": np.array(LENGTHS)}
    unmasked = greedy_search(net, params, src, max_extra_len=EXTRA)
    assert any(isinstance(t, IllFormedTree) for t in trees(unmasked)), "the random model must need the mask"
    assert_trees(greedy_search(net, params, src, max_extra_len=EXTRA, grammar=mask))
    assert_trees(beam_search(net, params, src, beam_size=4, max_extra_len=EXTRA, grammar=mask)[0])
    nbest = beam_search_nbest(net, params, src, 3, beam_size=4, max_extra_len=EXTRA, grammar=mask)
    for n in range(3):
        assert_trees(nbest["tokens"][:, n])
    keys = jax.random.split(jax.random.key(5), len(LENGTHS))
    assert_trees(sample_search(net, params, src, keys, max_extra_len=EXTRA, grammar=mask))


def test_the_mask_only_removes_candidates_the_scores_stay_the_models(model, src):
    """A masked beam's scores are the model's own length-penalised log-probs of its outputs (no
    renormalisation over the allowed symbols), as a teacher-forced score of the same tokens says."""
    net, params = model
    mask = {"kinds": KINDS, "words": np.array(LENGTHS)}
    tokens, scores = beam_search(net, params, src, beam_size=4, max_extra_len=EXTRA, grammar=mask)
    real = np.array(LENGTHS) > 0
    expected = score_sequences(net, params, src, tokens, alpha=0.6)
    np.testing.assert_allclose(np.asarray(scores)[real], np.asarray(expected)[real], rtol=1e-4, atol=1e-4)


def test_search_ids_keeps_the_grammar_over_batches_and_sorting(model, src):
    """The text-level driver sorts, buckets and pads sentences: each output is still a tree over its own source."""
    net, params = model
    sources = [row[:n].tolist() for row, n in zip(src, LENGTHS)]
    for beam in (1, 4):
        found = search_ids(net, params, sources, {"beam_size": beam, "max_extra_len": EXTRA, "batch_size": 4},
                           grammar=KINDS)
        assert [bool(hyps) for hyps in found] == [n > 0 for n in LENGTHS]
        outputs = np.full((len(LENGTHS), 64), PAD_ID, np.int32)
        for row, hyps in enumerate(found):
            if hyps:
                outputs[row, :len(hyps[0]["tokens"]) + 1] = hyps[0]["tokens"] + [EOS_ID]
        assert_trees(outputs)
