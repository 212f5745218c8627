"""Finished rows leave the batch (jaxformer.decode_rows): the searches give the same outputs, row for row, when
the last live rows finish in a batch a quarter the size, and a quarter of that again while it keeps MIN_ROWS
rows (scores to float rounding), with the row-steps that rule gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import RANDOM_CFG, sources
from jaxformer import decode, decode_rows
from jaxformer.data import PAD_ID
from jaxformer.decode_cache import search_segments

EXTRA = 25
ROWS = 32
SEGMENTS = (16, 35)


@pytest.fixture(scope="module")
def batch():
    """32 rows of 1 to 9 tokens: the random model never says EOS, so each row runs to its own limit (its
    length + 1 + EXTRA), and the last 8 live rows finish in the second cache segment (16, then 35)."""
    lengths = np.random.default_rng(3).integers(1, 10, ROWS)
    lengths[:3] = [9, 9, 1]
    src = sources(lengths, 10, RANDOM_CFG.vocab_size, seed=4)
    buffer_len = decode.decode_buffer_len(src.shape[1], RANDOM_CFG, max_extra_len=EXTRA)
    assert search_segments(buffer_len) == SEGMENTS
    prefix = np.full((ROWS, 3), PAD_ID, np.int32)
    for row in range(0, ROWS, 3):  # every third row starts with its own forced tokens
        prefix[row, : 1 + row % 3] = 5 + row % 7
    return jnp.asarray(src), buffer_len, jnp.asarray(prefix)


def both(compiled, *args):
    """The search's outputs with and without compaction."""
    return [jax.tree.map(np.asarray, compiled(compact)(*args)) for compact in (True, False)]


def expected_row_steps(done_at, segments):
    """The row-steps of the compaction rule, step by step from the rows' `done_at` (a row is live at step i
    while done_at > i): from the first segment's end on, the batch shrinks to a quarter whenever at most a
    quarter of it is live and that quarter keeps MIN_ROWS rows. Returns (row-steps, the smallest batch)."""
    rows = counted = len(done_at)
    step = 1
    while step < segments[-1] and (live := int(np.sum(done_at > step))):
        while step >= segments[0] and rows // 4 >= decode_rows.MIN_ROWS and live <= rows // 4:
            rows //= 4
        counted, step = counted + rows, step + 1
    return counted, rows


def assert_same(compacted, plain, segments):
    assert set(compacted) == set(plain)
    for name in plain:  # tokens and steps the same; scores to float rounding (a smaller batch's products)
        if name in ("scores", "log_probs"):
            np.testing.assert_allclose(compacted[name], plain[name], rtol=1e-6, err_msg=name)
        elif name != "row_steps":
            np.testing.assert_array_equal(compacted[name], plain[name], err_msg=name)
    steps, rows = int(plain["steps"]), plain["done_at"].shape[0]
    assert int(plain["row_steps"]) == steps * rows
    assert int(compacted["row_steps"]) < steps * rows  # the last rows ran in a smaller batch
    assert int(compacted["row_steps"]) == expected_row_steps(plain["done_at"], segments)[0]


def test_greedy_and_sampling_give_the_same_rows_with_fewer_row_steps(random_model, batch):
    model, params = random_model
    src, buffer_len, prefix = batch
    greedy = lambda compact: decode._compiled_greedy(RANDOM_CFG, buffer_len, EXTRA, compact=compact)  # noqa: E731
    assert_same(*both(greedy, {"params": params["params"]}, src, prefix, None, None), SEGMENTS)
    sampling = {"keys": jax.random.key_data(jax.random.split(jax.random.key(7), ROWS)),
                "temperature": jnp.float32(1.0), "top_p": jnp.float32(1.0)}
    sample = lambda compact: decode._compiled_greedy(RANDOM_CFG, buffer_len, EXTRA, "topk", 5,  # noqa: E731
                                                     compact=compact)
    compacted, plain = both(sample, {"params": params["params"]}, src, None, sampling, None)
    assert_same(compacted, plain, SEGMENTS)
    assert len({tuple(row) for row in plain["tokens"]}) == ROWS  # the rows' own keys: every sample differs


@pytest.mark.parametrize("stop,nbest", [("bound", 2), ("finished", 1)])
def test_beam_search_gives_the_same_hypotheses_with_fewer_row_steps(random_model, batch, stop, nbest):
    model, params = random_model
    src, buffer_len, prefix = batch
    beam = lambda compact: decode._compiled_beam(RANDOM_CFG, 4, buffer_len, EXTRA, stop, nbest,  # noqa: E731
                                                 compact=compact)
    compacted, plain = both(beam, {"params": params["params"]}, src, jnp.float32(0.6), prefix, None)
    assert_same(compacted, plain, SEGMENTS)
    np.testing.assert_array_equal(plain["tokens"][::3, 0, 0], 5 + np.arange(0, ROWS, 3) % 7)  # the prefixes held


def test_a_batch_of_64_goes_on_in_16_rows_then_in_4(random_model):
    """Greedy search on 64 rows whose limits spread over the second segment (48 rows of 1-5 tokens, 12 of
    6-7, 4 of 9): the last 16 live rows go on alone, then the last 4 of those; same tokens, and the
    row-steps of the rule."""
    model, params = random_model
    lengths = np.random.default_rng(8).permutation(np.repeat([1, 3, 5, 6, 7, 9], [16, 16, 16, 6, 6, 4]))
    src = jnp.asarray(sources(lengths, 10, RANDOM_CFG.vocab_size, seed=9))
    buffer_len = decode.decode_buffer_len(src.shape[1], RANDOM_CFG, max_extra_len=EXTRA)
    greedy = lambda compact: decode._compiled_greedy(RANDOM_CFG, buffer_len, EXTRA, compact=compact)  # noqa: E731
    compacted, plain = both(greedy, {"params": params["params"]}, src, None, None, None)
    assert_same(compacted, plain, search_segments(buffer_len))
    assert expected_row_steps(plain["done_at"], search_segments(buffer_len))[1] == 4


def test_small_batches_and_one_segment_searches_are_not_compacted(random_model):
    model, params = random_model
    src = jnp.asarray(sources([3, 1, 2, 2], 4, RANDOM_CFG.vocab_size))  # 4 rows: a quarter is below MIN_ROWS
    assert 4 // decode_rows.COMPACT_TO < decode_rows.MIN_ROWS
    out = decode._compiled_beam(RANDOM_CFG, 4, 29, EXTRA)({"params": params["params"]}, src, jnp.float32(0.6),
                                                          None, None)
    assert int(out["row_steps"]) == int(out["steps"]) * 4


def test_the_grammar_state_follows_the_rows_it_belongs_to():
    """A parser's beam search under the grammar mask (`jaxformer.grammar`: each row's tree state and word
    count) gives the same trees with its last rows compacted."""
    from jaxformer import grammar
    from jaxformer.data import EOS_ID
    from jaxformer.model import TransformerConfig, init_params

    cfg = TransformerConfig(vocab_size=30, d_model=32, d_ff=64, num_heads=4, num_encoder_layers=1,
                            num_decoder_layers=2, max_len=64, dropout_rate=0.0)
    kinds = grammar.kinds_table(cfg.vocab_size, {4: "(S", 5: "(NP", 6: "(VP"}, 8, {9: "NN", 10: "VB", 11: "DT"},
                                EOS_ID)
    words = np.random.default_rng(5).integers(1, 10, ROWS)
    src = jnp.asarray(sources(words, 10, cfg.vocab_size, seed=6))
    params = init_params(cfg, jax.random.key(3))
    rules = {"kinds": jnp.asarray(kinds, jnp.int32), "words": jnp.asarray(words, jnp.int32)}
    beam = lambda compact: decode._compiled_beam(cfg, 4, 34, 24, "bound", 1, compact=compact)  # noqa: E731
    compacted, plain = both(beam, {"params": params["params"]}, src, jnp.float32(0.6), None, rules)
    assert_same(compacted, plain, search_segments(34))



def staged_and_whole(search, traced, **kwargs):
    """A search's outputs with `staged=True` (through `Dispatched.later`) and as one program, whether the staged
    one went on past its first segment, and how often it traced `later_segments` (counted in `traced`)."""
    before = len(traced)
    dispatched = search(staged=True, **kwargs)
    later = dispatched.later()
    assert dispatched.later() is later  # dispatched once
    staged = jax.tree.map(np.asarray, dispatched.result())  # `out`, or the later segments' outputs
    traces = len(traced) - before
    return staged, jax.tree.map(np.asarray, search(**kwargs)), later is not None, traces


def assert_equal_outputs(staged, whole):
    if not isinstance(whole, dict):
        staged, whole = {"tokens": staged}, {"tokens": whole}
    assert set(staged) == set(whole)
    for name in whole:  # two programs against one: scores to float rounding
        if name in ("scores", "log_probs"):
            np.testing.assert_allclose(staged[name], whole[name], rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(staged[name], whole[name], err_msg=name)


def test_staged_searches_compile_the_later_segments_only_for_batches_that_reach_them(random_model, batch,
                                                                                      monkeypatch):
    """`staged=True` (what translate runs): the first segment, then the later ones only for a batch with live
    rows after it. A batch whose rows all stop within the first segment (limits <= 14 in a 30-position
    buffer) never traces `later_segments`; the batch fixture's rows run on into the second segment and
    compact. Both give the one-program search's outputs, for beam search, greedy search and sampling."""
    model, params = random_model
    traced = []
    real = decode_rows.later_segments
    monkeypatch.setattr(decode_rows, "later_segments", lambda *a, **k: traced.append(a[0]) or real(*a, **k))
    short = jnp.asarray(sources([1, 3, 2, 3] * 8, 20, RANDOM_CFG.vocab_size, seed=11))  # buffer 20 + 10
    assert search_segments(decode.decode_buffer_len(20, RANDOM_CFG, max_extra_len=10)) == (16, 30)
    keys = jax.random.split(jax.random.key(5), ROWS)
    searches = [lambda src, extra, **kw: decode.beam_search_nbest(model, params, src, 2, max_extra_len=extra, **kw),
                lambda src, extra, **kw: decode.greedy_search(model, params, src, max_extra_len=extra, **kw),
                lambda src, extra, **kw: decode.sample_search(model, params, src, keys, kind="topk", top_k=5,
                                                              max_extra_len=extra, **kw)]
    for search in searches:
        staged, whole, went_on, traces = staged_and_whole(search, traced, src=short, extra=10)
        assert not went_on and traces == 0
        assert_equal_outputs(staged, whole)
    src, buffer_len, prefix = batch
    for n, search in enumerate(searches):
        staged, whole, went_on, traces = staged_and_whole(search, traced, src=src, extra=EXTRA, prefix=prefix)
        assert went_on and traces == 1  # the "rest" program, once
        assert_equal_outputs(staged, whole)
        if n == 0:
            assert staged["row_steps"] < ROWS * staged["steps"]  # its last rows compacted
