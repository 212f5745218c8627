"""Greedy and beam search: beam 1 = greedy, beam >= greedy, length penalty, length limits, EOS and padding,
cross-attention keys/values computed once per sentence.

Three tiny models: a random one (never says EOS), a "constant" one whose next-token distribution is fixed
by hand (so the right answer is known in closed form), and one trained for a few seconds to copy its input
(conftest's `bundle`, made by helpers.trained_copy_model and shared with test_export.py and others) so searches
produce real EOS decisions.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxformer import decode, decode_cache, ops
from jaxformer.data import BOS_ID, EOS_ID, PAD_ID
from jaxformer.decode import beam_search, greedy_search, length_penalty, score_sequences
from jaxformer.decode import init_cache
from jaxformer.decode_cache import beam_search_cache, reorder_beams
from jaxformer.model import (MultiHeadAttention, Transformer, TransformerConfig,
                             init_params)
from helpers import RANDOM_CFG, bigram_model, lengths_of, sources

EXTRA = 6  # max_extra_len used throughout: the tests share few shapes, so few compilations


# ----------------------------------------------------------------------------- models

def constant_model(logit_values: dict[int, float], default: float = -4.0):
    """A model whose next-token logits are the same at every step, whatever the input."""
    cfg = TransformerConfig(vocab_size=16, d_model=16, d_ff=32, num_heads=2, num_encoder_layers=1,
                            num_decoder_layers=1, max_len=40, dropout_rate=0.0, tie_output=False)
    params = jax.tree.map(np.array, init_params(cfg, jax.random.key(1)))
    norm = params["params"]["decoder_0"]["ffn_block"]["norm"]  # the last op before the output projection
    norm["scale"][:] = 0.0
    norm["bias"][:] = 0.0
    norm["bias"][0] = 1.0  # the decoder output is the constant e_0 ...
    kernel = params["params"]["output_projection"]["kernel"]
    kernel[0, :] = default  # ... so the logits are row 0 of the output projection
    for token, value in logit_values.items():
        kernel[0, token] = value
    log_probs = jax.nn.log_softmax(jnp.asarray(
        [v if i not in (PAD_ID, BOS_ID) else -1e9 for i, v in enumerate(kernel[0])]))
    return Transformer(cfg), params, np.asarray(log_probs)


@pytest.fixture(scope="module")
def random_src():
    src = sources([3, 5, 1, 8, 0, 6], 9, RANDOM_CFG.vocab_size)
    src[4] = PAD_ID  # an all-PAD filler row, as translate pads batches with
    return src


@pytest.fixture(scope="module")
def copy_model(bundle):
    return bundle  # conftest's: the copy model, trained once


@pytest.fixture(scope="module")
def copy_src(copy_model):
    model, _, _ = copy_model
    return sources([1, 4, 7, 12, 3, 9, 12, 5], 16, model.config.vocab_size, seed=1)


# ----------------------------------------------------------------------------- tests

def test_length_penalty_is_gnmt_formula():
    assert length_penalty(1, 0.6) == pytest.approx(1.0)
    assert length_penalty(7, 0.6) == pytest.approx(2.0 ** 0.6)
    assert length_penalty(20, 0.0) == 1.0
    np.testing.assert_allclose(length_penalty(np.array([1.0, 13.0]), 1.0), [1.0, 3.0])


def test_trained_model_copies_with_greedy_and_beam(copy_model, copy_src):
    model, params, _ = copy_model
    expected_len = lengths_of(copy_src)
    for tokens in (greedy_search(model, params, copy_src, max_extra_len=EXTRA),
                   beam_search(model, params, copy_src, max_extra_len=EXTRA)[0]):
        tokens = np.asarray(tokens)
        copied = [(tokens[row, :n] == copy_src[row, :n]).all() and (tokens[row, n:] == PAD_ID).all()
                  for row, n in enumerate(expected_len)]  # the copy, its EOS, then padding
        assert sum(copied) >= len(copied) - 1, tokens


@pytest.mark.parametrize("which", ["random", "copy"])
def test_beam_size_1_with_alpha_0_equals_greedy(which, random_model, random_src, copy_model, copy_src):
    if which == "random":
        (model, params), src = random_model, random_src
    else:
        (model, params, _), src = copy_model, copy_src
    greedy = np.asarray(greedy_search(model, params, src, max_extra_len=EXTRA))
    beam, scores = beam_search(model, params, src, beam_size=1, alpha=0.0, max_extra_len=EXTRA)
    np.testing.assert_array_equal(np.asarray(beam), greedy)
    np.testing.assert_allclose(scores, score_sequences(model, params, src, greedy, 0.0), rtol=1e-5, atol=1e-5)


def test_beam_size_1_never_scores_below_greedy_with_length_penalty(copy_model, copy_src):
    model, params, _ = copy_model
    greedy = greedy_search(model, params, copy_src, max_extra_len=EXTRA)
    beam, scores = beam_search(model, params, copy_src, beam_size=1, alpha=0.6, max_extra_len=EXTRA)
    greedy_scores = np.asarray(score_sequences(model, params, copy_src, greedy, 0.6))
    assert (np.asarray(scores) >= greedy_scores - 1e-5).all()
    # A single beam differs from greedy only by finding a strictly better (longer) hypothesis after greedy's EOS.
    differs = (np.asarray(beam) != np.asarray(greedy)).any(axis=1)
    assert (np.asarray(scores)[differs] > greedy_scores[differs]).all()
    assert differs.sum() <= 1  # and a confident model mostly makes the same choice


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_beam_best_score_is_not_below_greedy_and_matches_rescoring(alpha, copy_model, copy_src, random_model,
                                                                   random_src):
    for (model, params), src in ((copy_model[:2], copy_src), (random_model, random_src)):
        greedy = greedy_search(model, params, src, max_extra_len=EXTRA)
        tokens, scores = beam_search(model, params, src, beam_size=4, alpha=alpha, max_extra_len=EXTRA)
        greedy_scores = np.asarray(score_sequences(model, params, src, greedy, alpha))
        assert (np.asarray(scores) >= greedy_scores - 1e-5).all(), (scores, greedy_scores)
        # The reported score is the full decoder's length-penalised log-prob of the returned tokens.
        np.testing.assert_allclose(scores, score_sequences(model, params, src, tokens, alpha), rtol=1e-4, atol=1e-4)


def test_max_length_is_input_length_plus_extra_and_capped(random_model, random_src):
    model, params = random_model  # an untrained model never picks EOS here: every row runs to its limit
    src = random_src
    limits = np.array([4, 6, 2, 9, 1, 7]) + EXTRA  # tokens + EOS + max_extra_len
    limits[4] = 1  # the all-PAD filler row stops at once
    greedy = np.asarray(greedy_search(model, params, src, max_extra_len=EXTRA))
    beam, _ = beam_search(model, params, src, beam_size=4, max_extra_len=EXTRA)
    for tokens in (greedy, np.asarray(beam)):
        assert tokens.shape == (6, 9 + EXTRA)
        np.testing.assert_array_equal(lengths_of(tokens), limits)
        # EOS is forced at the limit (fairseq), and only there
        np.testing.assert_array_equal(tokens[np.arange(6), limits - 1], EOS_ID)
        assert (tokens == EOS_ID).sum() == 6
    # max_len caps below that; the model's own max_len (40) caps the buffer.
    np.testing.assert_array_equal(lengths_of(greedy_search(model, params, src, max_len=7, max_extra_len=EXTRA)),
                                  np.minimum(limits, 7))
    assert greedy_search(model, params, src, max_extra_len=100).shape == (6, RANDOM_CFG.max_len)


def test_a_beam_reaching_the_limit_without_eos_is_finished_there():
    model, params, log_probs = constant_model({5: 2.0, 6: 1.0, EOS_ID: -8.0})
    src = sources([2, 4], 8, 16)
    tokens, scores = beam_search(model, params, src, beam_size=4, alpha=0.6, max_extra_len=EXTRA)
    tokens = np.asarray(tokens)
    for row, limit in enumerate([3 + EXTRA, 5 + EXTRA]):
        assert (tokens[row, limit:] == PAD_ID).all()
        # EOS forced at the limit, its log-prob counted
        np.testing.assert_array_equal(tokens[row, :limit - 1], 5)
        assert tokens[row, limit - 1] == EOS_ID
        expected = ((limit - 1) * log_probs[5] + log_probs[EOS_ID]) / length_penalty(limit, 0.6)
        assert scores[row] == pytest.approx(expected, rel=1e-5)
    # the reported score is the rescored hypothesis, EOS included
    np.testing.assert_allclose(scores, score_sequences(model, params, src, tokens, 0.6), rtol=1e-5)


def test_finished_rule_stops_at_k_finished_hypotheses_where_the_bound_searches_on():
    # After BOS: 5 (p 0.9) or EOS (0.1); after 5: 5 again (0.95) or EOS (0.05). With K=2 the empty hypothesis
    # ends at step 0 and "5 EOS" at step 1: two finished, so "finished" (fairseq, CTranslate2) stops there and
    # returns the better of the two by log-prob / length ** alpha. "bound" sees that 5 5 5 ... can still win
    # under ((5 + len) / 6) ** alpha and searches on, to the length limit.
    model, params, log_probs = bigram_model({BOS_ID: {5: math.log(0.9), EOS_ID: math.log(0.1)},
                                             5: {5: math.log(0.95), EOS_ID: math.log(0.05)}})
    src = sources([3, 5], 8, 16)
    finished, finished_scores = beam_search(model, params, src, beam_size=2, alpha=1.0, max_extra_len=EXTRA,
                                            stop="finished")
    np.testing.assert_array_equal(np.asarray(finished)[:, :2], [[5, EOS_ID]] * 2)
    assert (np.asarray(finished)[:, 2:] == PAD_ID).all()
    np.testing.assert_allclose(finished_scores, (log_probs[BOS_ID, 5] + log_probs[5, EOS_ID]) / 2.0, rtol=1e-5)
    bound, _ = beam_search(model, params, src, beam_size=2, alpha=1.0, max_extra_len=EXTRA)
    np.testing.assert_array_equal(lengths_of(bound), np.array([4, 6]) + EXTRA)
    with pytest.raises(ValueError, match="decode.stop"):
        beam_search(model, params, src, stop="patience")


@pytest.mark.parametrize("n, k", [(40000, 8), (1600, 8), (1601, 8), (1000, 2), (30, 8)])
def test_block_top_k_equals_lax_top_k_with_its_ties(n, k):
    """The same values and indices as jax.lax.top_k, ties to the lowest index: values from a few levels (so
    many ties, within and across blocks), masked candidates at NEG_INF (a row of nothing but them too), a
    length that is not a multiple of the block."""
    rng = np.random.default_rng(n + k)
    x = rng.integers(0, 6, (6, n)).astype(np.float32) - 6.0
    x[rng.random((6, n)) < 0.5] = decode.NEG_INF
    x[1] = decode.NEG_INF  # nothing but masked candidates
    x[2, -3:] = 1.0  # the best entries in the last, partial block
    x[3, :5] = 1.0  # the best tie across one block and the next
    x[4] = 0.0  # every entry ties
    values, index = jax.jit(ops.block_top_k, static_argnums=1)(jnp.asarray(x), k)
    expected_values, expected_index = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(index, expected_index)


def test_search_segments_double_then_end_at_the_buffer():
    assert decode_cache.search_segments(10) == (10,)
    assert decode_cache.search_segments(39) == (16, 39)  # 32 would leave a last segment of 7: merged
    assert decode_cache.search_segments(50) == (16, 32, 50)
    assert decode_cache.search_segments(256) == (16, 32, 64, 128, 256)


def test_searches_through_several_cache_segments_equal_a_full_decoder(random_model):
    """Outputs of 20 to 39 tokens cross the cache growth at 16 (segments (16, 39)): greedy's tokens are the
    argmaxes of the full (uncached) decoder over its own prefix, and beam's scores its rescoring."""
    model, params = random_model  # never picks EOS: every row runs to its limit, through both segments
    src = sources([3, 8, 1, 5], 9, RANDOM_CFG.vocab_size)
    greedy = np.asarray(greedy_search(model, params, src, max_extra_len=30))
    assert greedy.shape == (4, 39)
    np.testing.assert_array_equal(lengths_of(greedy), np.minimum(np.array([4, 9, 2, 6]) + 30, 39))
    tgt_in = np.concatenate([np.full((4, 1), BOS_ID, np.int32), greedy[:, :-1]], axis=1)
    logits = np.asarray(model.apply(params, src, tgt_in)).copy()
    logits[..., [PAD_ID, BOS_ID]] = -np.inf
    for row, limit in enumerate(lengths_of(greedy)):
        np.testing.assert_array_equal(greedy[row, :limit - 1], logits[row, :limit - 1].argmax(-1))
    tokens, scores = beam_search(model, params, src, beam_size=4, alpha=0.6, max_extra_len=30)
    np.testing.assert_allclose(scores, score_sequences(model, params, src, tokens, 0.6), rtol=1e-4, atol=1e-4)


def test_a_looping_hypothesis_at_the_limit_pays_for_eos_and_loses_to_a_finished_one():
    # After BOS: 5 (p 0.55) or 6 (0.45). After 5: EOS (0.8) -- the proper short translation "5 EOS". After 6:
    # 6 again (p ~ 1), EOS almost never (1e-4): a loop that only the length limit stops.
    model, params, log_probs = bigram_model({
        BOS_ID: {5: math.log(0.55), 6: math.log(0.45)},
        5: {EOS_ID: math.log(0.8), 7: math.log(0.2)},
        6: {6: 0.0, EOS_ID: math.log(1e-4)},
    })
    src = sources([3, 5], 8, 16)
    limits = np.array([4, 6]) + EXTRA
    alpha = 0.6
    proper = (log_probs[BOS_ID, 5] + log_probs[5, EOS_ID]) / length_penalty(2, alpha)
    loop_uncharged = (log_probs[BOS_ID, 6] + (limits - 1) * log_probs[6, 6]) / length_penalty(limits, alpha)
    loop_charged = (log_probs[BOS_ID, 6] + (limits - 2) * log_probs[6, 6] + log_probs[6, EOS_ID]) \
        / length_penalty(limits, alpha)
    assert (loop_uncharged > proper).all() and (loop_charged < proper).all()  # the model does what it should

    tokens, scores = beam_search(model, params, src, beam_size=4, alpha=alpha, max_extra_len=EXTRA)
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(tokens[:, :2], [[5, EOS_ID]] * 2)
    assert (tokens[:, 2:] == PAD_ID).all()
    np.testing.assert_allclose(scores, proper, rtol=1e-5)
    np.testing.assert_allclose(scores, score_sequences(model, params, src, tokens, alpha), rtol=1e-5)


def test_eos_first_gives_an_empty_padded_hypothesis():
    model, params, log_probs = constant_model({EOS_ID: 6.0, 5: 1.0})
    src = sources([3, 6], 8, 16)
    greedy = np.asarray(greedy_search(model, params, src, max_extra_len=EXTRA))
    tokens, scores = beam_search(model, params, src, beam_size=4, alpha=0.6, max_extra_len=EXTRA)
    for out in (greedy, np.asarray(tokens)):
        np.testing.assert_array_equal(out[:, 0], EOS_ID)
        assert (out[:, 1:] == PAD_ID).all()
    np.testing.assert_allclose(scores, log_probs[EOS_ID], rtol=1e-6)  # length 1: penalty 1


def test_length_penalty_alpha_moves_the_chosen_length():
    # EOS is the second-best token at every step: with alpha=0 the shortest hypothesis wins, with a large
    # alpha the penalty outgrows the falling log-prob and the longest (the length limit) wins.
    model, params, log_probs = constant_model({5: 1.0, EOS_ID: 0.5})
    src = sources([3, 6], 8, 16)
    limits = np.array([4, 7]) + EXTRA
    short, short_scores = beam_search(model, params, src, alpha=0.0, max_extra_len=EXTRA)
    long, long_scores = beam_search(model, params, src, alpha=3.0, max_extra_len=EXTRA)
    np.testing.assert_array_equal(lengths_of(short), 1)
    np.testing.assert_allclose(short_scores, log_probs[EOS_ID], rtol=1e-6)
    np.testing.assert_array_equal(lengths_of(long), limits)
    # ... and in between, the chosen length is the argmax of the closed-form score over lengths.
    for alpha in (0.6, 1.0, 1.3):
        tokens, _ = beam_search(model, params, src, alpha=alpha, max_extra_len=EXTRA)
        for row, limit in enumerate(limits):
            by_length = [((n - 1) * log_probs[5] + log_probs[EOS_ID]) / length_penalty(n, alpha)
                         for n in range(1, limit + 1)]  # EOS is forced at the limit
            assert lengths_of(tokens)[row] == int(np.argmax(by_length)) + 1, alpha


def test_finished_hypotheses_have_one_eos_then_padding(copy_model):
    model, params, _ = copy_model
    src = sources([2, 11, 6, 1, 12, 4, 8, 10], 16, model.config.vocab_size, seed=3)
    for alpha in (0.0, 0.6, 2.0):
        tokens, _ = beam_search(model, params, src, beam_size=4, alpha=alpha, max_extra_len=EXTRA)
        tokens = np.asarray(tokens)
        for row in tokens:
            eos = np.flatnonzero(row == EOS_ID)
            assert len(eos) == 1
            assert (row[:eos[0]] != PAD_ID).all() and (row[eos[0] + 1:] == PAD_ID).all()


def test_padding_rows_and_columns_do_not_change_results(copy_model, copy_src):
    model, params, _ = copy_model
    alone = np.asarray(beam_search(model, params, copy_src, max_extra_len=EXTRA)[0])[[0, 3]]
    wide = np.zeros((4, 24), np.int32)
    wide[0, :16], wide[2, :16] = copy_src[0], copy_src[3]  # rows 1 and 3 are all-PAD fillers
    together = np.asarray(beam_search(model, params, wide, max_extra_len=EXTRA)[0])
    for single, row in zip(alone, (0, 2)):
        n = lengths_of(single[None])[0]
        np.testing.assert_array_equal(together[row, :n], single[:n])
        assert (together[row, n:] == PAD_ID).all()


def test_cross_attention_keys_and_values_are_computed_once_per_sentence(monkeypatch, random_model):
    model, params = random_model
    src = jnp.asarray(sources([3, 5], 7, RANDOM_CFG.vocab_size))
    projected = []  # input shapes of the cross-attention key/value projections, at trace time

    def spy(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name == "__call__" and module.name in ("key", "value")
                and isinstance(module.parent, MultiHeadAttention) and module.parent.kind == "cross"):
            projected.append(tuple(args[0].shape))
        return next_fun(*args, **kwargs)

    empty = {2: init_cache(RANDOM_CFG, 2, 7, 12)}
    monkeypatch.setattr(decode, "init_cache", lambda cfg, batch, s, L: empty[batch])  # keep init out of the count
    with nn.intercept_methods(spy):
        jax.make_jaxpr(lambda p, s: decode._greedy(model, 12, 5, p, s)["tokens"])(params, src)
    assert projected == [(2, 7, 32)] * 2 * RANDOM_CFG.num_decoder_layers  # key + value per layer, one step
    projected.clear()
    with nn.intercept_methods(spy):  # beam 4: still once per sentence (2 rows), not per beam (8 rows)
        jax.make_jaxpr(lambda p, s: decode._beam(model, 4, 12, 5, p, s, 0.6)["tokens"])(params, src)
    assert projected == [(2, 7, 32)] * 2 * RANDOM_CFG.num_decoder_layers


def test_cached_cross_attention_is_read_not_rewritten(random_model):
    model, params = random_model
    src = jnp.asarray(sources([3, 5], 7, RANDOM_CFG.vocab_size))
    encoded = model.apply(params, src, method=Transformer.encode)
    step = jax.jit(functools.partial(decode._decode_step, model))
    cache = init_cache(RANDOM_CFG, 2, 7, 6)
    _, cache = step(params, cache, encoded, src != PAD_ID, jnp.full((2,), BOS_ID))
    first = cache["decoder_0"]["cross_attention"]
    for token in (7, 8, 9):
        _, cache = step(params, cache, None, src != PAD_ID, jnp.full((2,), token))
    for name in ("cross_key", "cross_value"):
        np.testing.assert_array_equal(cache["decoder_0"]["cross_attention"][name], first[name])
        assert np.abs(first[name]).sum() > 0


def test_greedy_argmax_takes_the_first_of_tied_maxima_like_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 3, (50, 17)).astype(np.float32)  # many ties
    x[0] = 1.0  # every entry tied
    np.testing.assert_array_equal(np.asarray(ops.first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_beam_steps_share_cross_attention_and_reorder_only_slot_indices(random_model):
    """Beam steps (K rows per sentence, a `beam_search_cache`, `reorder_beams` moving only `beam_slots`) give the
    log-probs of plain decode steps on B*K rows whose whole cache (and src_mask) is repeated per beam and
    physically gathered by each step's beam origins, the way beam search used to reorder it."""
    model, params = random_model
    src = jnp.asarray(sources([3, 5], 7, RANDOM_CFG.vocab_size))
    encoded = model.apply(params, src, method=Transformer.encode)
    step = jax.jit(functools.partial(decode._decode_step, model))
    _, first = step(params, init_cache(RANDOM_CFG, 2, 7, 6), encoded, src != PAD_ID, jnp.full((2,), BOS_ID))
    k, rng = 3, np.random.default_rng(0)

    def gather_rows(cache, origin):  # the old reorder: every [B*K, ...] leaf gathered by origin [B,K]
        rows = (np.arange(2)[:, None] * k + origin).reshape(-1)
        return jax.tree.map(lambda x: x[rows] if x.ndim else x, cache)

    plain = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0) if x.ndim else x, first)
    shared = beam_search_cache(first, k)
    for _ in range(4):
        tokens = jnp.asarray(rng.integers(4, RANDOM_CFG.vocab_size, 2 * k))
        expected, plain = step(params, plain, None, jnp.repeat(src != PAD_ID, k, axis=0), tokens)
        got, shared = step(params, shared, None, src != PAD_ID, tokens)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        origin = rng.integers(0, k, (2, k))  # beams swap, die and fork
        plain, shared = gather_rows(plain, origin), reorder_beams(shared, jnp.asarray(origin))
    layer = shared["decoder_0"]
    assert layer["cross_attention"]["cross_key"].shape[0] == 2  # one per sentence, never repeated
    assert layer["self_attention"]["beam_slots"].shape == (2, k, 6)
    assert layer["self_attention"]["cached_value"].shape == (2, RANDOM_CFG.num_heads, 6 * k, RANDOM_CFG.head_dim_v)


def test_searches_are_traced_once_per_shape(monkeypatch, random_model, random_src):
    model, params = random_model
    traces = []
    for name in ("_beam", "_greedy"):
        original = getattr(decode, name)
        monkeypatch.setattr(decode, name, lambda *a, _f=original, _n=name, **kw: traces.append(_n) or _f(*a, **kw))
    decode._compiled_beam.cache_clear()
    decode._compiled_greedy.cache_clear()
    for alpha in (0.6, 0.9, 0.6):  # alpha is traced, and new source tokens of the same shape reuse the trace
        beam_search(model, params, random_src[::-1] if alpha > 0.6 else random_src, alpha=alpha, max_extra_len=EXTRA)
        greedy_search(model, params, random_src, max_extra_len=EXTRA)
    assert traces == ["_beam", "_greedy"]
    beam_search(model, params, random_src[:, :-1], max_extra_len=EXTRA)  # a new shape traces again
    assert traces == ["_beam", "_greedy", "_beam"]
    decode._compiled_beam.cache_clear()
    decode._compiled_greedy.cache_clear()


def test_bad_arguments_say_what_is_wrong(random_model):
    model, params = random_model
    src = sources([3], 5, RANDOM_CFG.vocab_size)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, params, src, beam_size=0)
    with pytest.raises(ValueError, match="room for EOS"):
        greedy_search(model, params, src, max_len=0)
    with pytest.raises(TypeError, match="Transformer"):
        greedy_search("not a model", params, src)


def test_score_sequences_counts_eos_and_ignores_padding(copy_model, copy_src):
    model, params, _ = copy_model
    tokens = np.asarray(greedy_search(model, params, copy_src, max_extra_len=EXTRA))
    raw = np.asarray(score_sequences(model, params, copy_src, tokens, 0.0))
    penalised = np.asarray(score_sequences(model, params, copy_src, tokens, 0.6))
    np.testing.assert_allclose(penalised, raw / length_penalty(lengths_of(tokens), 0.6), rtol=1e-5)
    assert (raw <= 0).all() and math.isfinite(raw.sum())


def test_nbest_lists_are_sorted_distinct_and_scored_as_the_decoder_scores_them(random_model, random_src):
    model, params = random_model
    best, best_scores = beam_search(model, params, random_src, beam_size=4, alpha=0.6, max_extra_len=EXTRA)
    found = decode.beam_search_nbest(model, params, random_src, 3, beam_size=4, alpha=0.6, max_extra_len=EXTRA)
    tokens, scores, log_probs = (np.asarray(found[key]) for key in ("tokens", "scores", "log_probs"))
    assert tokens.shape[:2] == (len(random_src), 3)
    np.testing.assert_array_equal(tokens[:, 0], best)  # the first is the 1-best search's hypothesis
    np.testing.assert_allclose(scores[:, 0], best_scores, rtol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()
    for row in range(len(random_src)):
        if (random_src[row] == PAD_ID).all():
            continue  # a filler row: one empty hypothesis
        assert len({tuple(t) for t in tokens[row]}) == 3
        rescored = score_sequences(model, params, np.repeat(random_src[row:row + 1], 3, axis=0), tokens[row], 0.6)
        np.testing.assert_allclose(rescored, scores[row], rtol=1e-4, atol=1e-4)
        penalties = length_penalty(lengths_of(tokens[row]).astype(np.float32), 0.6)
        np.testing.assert_allclose(log_probs[row] / penalties, scores[row], rtol=1e-5)
    with pytest.raises(ValueError, match="nbest"):
        decode.beam_search_nbest(model, params, random_src, 5, beam_size=4)


def test_nbest_equals_the_n_best_of_every_hypothesis_when_the_beam_holds_them_all():
    # Two likely tokens (4, 5) and EOS after BOS, 4 and 5; outputs of at most 2 tokens + EOS: 7 hypotheses,
    # which a beam of 8 never prunes (a source of 1 token + EOS and max_extra_len 1: a limit of 3 with EOS).
    # Its 4 best must be the 4 best of an exhaustive enumeration.
    rng = np.random.default_rng(3)
    table = {prev: dict(zip((4, 5, EOS_ID), np.log(rng.dirichlet([1.0, 1.0, 1.0])).tolist()))
             for prev in (BOS_ID, 4, 5)}
    model, params, log_probs = bigram_model(table)
    src = sources([1], 2, 16)
    found = decode.beam_search_nbest(model, params, src, 4, beam_size=8, alpha=0.6, max_extra_len=1)
    everything = []
    for length in range(3):
        for body in itertools.product(range(16), repeat=length):
            if any(t in (PAD_ID, BOS_ID, EOS_ID) for t in body):
                continue
            path = (BOS_ID,) + body + (EOS_ID,)
            total = sum(log_probs[a, b] for a, b in zip(path, path[1:]))
            everything.append((total / float(length_penalty(length + 1.0, 0.6)), list(body) + [EOS_ID]))
    everything.sort(key=lambda item: -item[0])
    tokens = np.asarray(found["tokens"])[0]
    assert [list(t[t != PAD_ID]) for t in tokens] == [seq for _, seq in everything[:4]]
    np.testing.assert_allclose(np.asarray(found["scores"])[0], [score for score, _ in everything[:4]], rtol=1e-5)
