"""The model: paper numbers, masks, cached decoding, dropout and config errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import attention, ops
from jaxformer.attention import choose_attention_impl
from jaxformer.decode import init_cache
from jaxformer.model import Transformer, TransformerConfig, count_params, init_params, sinusoidal_positions

TINY = TransformerConfig(vocab_size=40, d_model=32, d_ff=64, num_heads=4, num_encoder_layers=2,
                         num_decoder_layers=2, max_len=32)


def n_params(cfg):
    return count_params(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))["params"])


@pytest.fixture(scope="module")
def tiny():
    return Transformer(TINY), init_params(TINY, jax.random.key(0))


def test_parameter_counts_match_the_paper():
    # The paper's Table 3 rounds these to 65M (base) and 213M (big) at a 37k shared vocabulary.
    base, big = n_params(TransformerConfig.base(37000)), n_params(TransformerConfig.big(37000))
    assert base == 63_045_632 and round(base / 1e6, 1) == 63.0
    assert big == 214_171_648 and round(big / 1e6, 1) == 214.2
    # model.attention_bias (not the paper's; what runs saved before the option have): 4 bias vectors of
    # d_model per attention, 3 attentions per layer pair (encoder self, decoder self and cross)
    assert n_params(TransformerConfig.base(37000, attention_bias=True)) == base + 4 * 512 * 3 * 6


def test_untying_embeddings_adds_one_vocab_matrix_each():
    cfg = TransformerConfig.base(37000)
    shared = n_params(cfg)
    emb = 37000 * 512
    assert n_params(dataclasses.replace(cfg, tie_output=False)) == shared + emb
    assert n_params(dataclasses.replace(cfg, share_embeddings=False)) == shared + emb
    assert n_params(dataclasses.replace(cfg, share_embeddings=False, tie_output=False)) == shared + 2 * emb


def test_table3_variants_change_the_counts_as_expected():
    cfg = TransformerConfig.base(1000)
    # Row E: learned positions add a max_len x d_model table to each stack.
    assert n_params(dataclasses.replace(cfg, positional="learned")) == n_params(cfg) + 2 * cfg.max_len * 512
    # Row B: d_k=16 shrinks the query and key projections of the 18 attention blocks.
    smaller = n_params(dataclasses.replace(cfg, d_k=16))
    assert n_params(cfg) - smaller == 18 * 2 * 512 * 8 * (64 - 16)


def test_sinusoidal_positions_follow_the_formula():
    table = sinusoidal_positions(50, 16)
    pos, i = 7, 3
    np.testing.assert_allclose(table[pos, 2 * i], np.sin(pos / 10000 ** (2 * i / 16)), rtol=1e-6)
    np.testing.assert_allclose(table[pos, 2 * i + 1], np.cos(pos / 10000 ** (2 * i / 16)), rtol=1e-6)
    np.testing.assert_array_equal(table[0, 0::2], 0.0)
    np.testing.assert_array_equal(table[0, 1::2], 1.0)
    halves = sinusoidal_positions(50, 16, "halves")  # Marian's layout: the same table, sines first
    np.testing.assert_array_equal(halves, np.concatenate([table[:, 0::2], table[:, 1::2]], axis=1))


@pytest.mark.parametrize("activation, reference", [
    ("relu", lambda x: np.maximum(x, 0.0)),
    ("swish", lambda x: x / (1.0 + np.exp(-x))),
    ("gelu", lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))),
])
def test_ffn_activation_is_the_named_function(activation, reference):
    from jaxformer.model import FeedForward

    cfg = dataclasses.replace(TINY, activation=activation)
    x = jax.random.normal(jax.random.key(0), (2, 3, cfg.d_model))
    ffn = FeedForward(cfg)
    p = ffn.init(jax.random.key(1), x)["params"]
    hidden = np.asarray(x) @ np.asarray(p["wi"]["kernel"]) + np.asarray(p["wi"]["bias"])
    expected = reference(hidden) @ np.asarray(p["wo"]["kernel"]) + np.asarray(p["wo"]["bias"])
    np.testing.assert_allclose(ffn.apply({"params": p}, x), expected, rtol=1e-4, atol=1e-5)


def test_marian_options_add_their_parameters_and_change_the_output():
    cfg = dataclasses.replace(TINY, attention_bias=True, logits_bias=True, layer_norm_epsilon=1e-5)
    params = init_params(cfg, jax.random.key(0))["params"]
    assert params["final_logits_bias"].shape == (cfg.vocab_size,)
    assert params["decoder_0"]["cross_attention"]["out"]["bias"].shape == (cfg.d_model,)
    assert "bias" not in init_params(TINY, jax.random.key(0))["params"]["encoder_0"]["self_attention"]["query"]
    src, tgt = jnp.array([[5, 6, 7, 3]]), jnp.array([[2, 9, 10, 11]])
    bias = jnp.arange(cfg.vocab_size, dtype=jnp.float32)
    plain = Transformer(cfg).apply({"params": params}, src, tgt)
    shifted = Transformer(cfg).apply({"params": {**params, "final_logits_bias": bias}}, src, tgt)
    np.testing.assert_allclose(shifted - plain, jnp.broadcast_to(bias, plain.shape), rtol=1e-5, atol=1e-4)


def test_source_padding_does_not_change_outputs(tiny):
    model, params = tiny
    src = jnp.array([[5, 6, 7, 3]])
    padded = jnp.array([[5, 6, 7, 3, 0, 0, 0]])
    tgt = jnp.array([[2, 9, 10, 11]])
    np.testing.assert_allclose(model.apply(params, src, tgt), model.apply(params, padded, tgt), atol=1e-5)
    # Target padding at the end leaves the real target positions unchanged too.
    tgt_padded = jnp.array([[2, 9, 10, 11, 0, 0]])
    np.testing.assert_allclose(model.apply(params, src, tgt), model.apply(params, src, tgt_padded)[:, :4],
                               atol=1e-5)


def test_future_target_tokens_do_not_change_earlier_outputs(tiny):
    model, params = tiny
    src = jnp.array([[5, 6, 7, 3]])
    a = model.apply(params, src, jnp.array([[2, 9, 10, 11, 12]]))
    b = model.apply(params, src, jnp.array([[2, 9, 10, 30, 31]]))
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-5)
    assert np.abs(a[:, 3:] - b[:, 3:]).max() > 1e-3


def test_cached_decoding_matches_the_full_decoder(tiny):
    model, params = tiny
    src = jnp.array([[5, 6, 7, 8, 3, 0], [9, 10, 3, 0, 0, 0]])
    tgt = jnp.array([[2, 12, 13, 14, 15], [2, 17, 18, 19, 20]])
    full = model.apply(params, src, tgt)
    encoded = model.apply(params, src, method=Transformer.encode)
    cache = init_cache(TINY, batch_size=2, src_len=src.shape[1], max_decode_len=8)
    steps = []
    for i in range(tgt.shape[1]):
        logits, mutated = model.apply({**params, "cache": cache}, encoded if i == 0 else None, src != 0,
                                      tgt[:, i:i + 1], decode=True, method=Transformer.decode,
                                      mutable=["cache"])
        if i == 1:
            cross_after_first = jax.tree.map(np.asarray, cache["decoder_0"]["cross_attention"])
        cache = mutated["cache"]
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
    # The cross-attention keys/values were computed on the first step and only read afterwards.
    for name, value in cache["decoder_0"]["cross_attention"].items():
        np.testing.assert_array_equal(value, cross_after_first[name])


def test_dropout_is_reproducible_and_off_when_deterministic(tiny):
    model, params = tiny
    src, tgt = jnp.array([[5, 6, 7, 3]]), jnp.array([[2, 9, 10, 11]])
    run = lambda seed, det: model.apply(params, src, tgt, deterministic=det,  # noqa: E731
                                        rngs={"dropout": jax.random.key(seed)})
    np.testing.assert_array_equal(run(1, False), run(1, False))
    assert np.abs(run(1, False) - run(2, False)).max() > 1e-3
    np.testing.assert_array_equal(run(1, True), run(2, True))
    np.testing.assert_allclose(run(1, True), model.apply(params, src, tgt), atol=1e-6)


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_dropout_masks_keep_each_value_independently_with_probability_one_minus_rate(rate):
    keep, keep_prob = ops.dropout_keep_mask(jax.random.key(0), rate, (256, 64, 63))  # odd last axis
    keep = np.asarray(keep)
    assert keep.shape == (256, 64, 63) and abs(keep_prob - (1 - rate)) <= 2.0 ** -17
    assert abs(keep.mean() - keep_prob) < 0.003
    # the two 16-bit halves of a word land 32 positions apart: their decisions are independent
    both_dropped = (~keep[..., :31] & ~keep[..., 32:]).mean()
    assert abs(both_dropped - rate ** 2) < 0.003
    # rows differ, and kept values are scaled so that the mean is kept
    assert (keep[0] != keep[1]).any()
    out = ops.dropout(jnp.ones((256, 64, 64)), rate, jax.random.key(1))
    assert set(np.unique(np.asarray(out))) <= {0.0, np.float32(1 / keep_prob)}
    assert abs(float(out.mean()) - 1.0) < 0.01


def test_dropout_of_everything_gives_zeros_and_zero_gradients():
    drop_all = lambda x: ops.dropout(x, 1.0, jax.random.key(0)).sum()  # noqa: E731
    x = jnp.ones((3, 5))
    assert float(drop_all(x)) == 0.0
    np.testing.assert_array_equal(jax.grad(drop_all)(x), np.zeros((3, 5)))


def test_packed_rows_equal_separate_rows(tiny):
    model, params = tiny
    (s1, t1), (s2, t2) = ([5, 6, 3], [2, 9, 10]), ([7, 8, 11, 3], [2, 12])
    separate = [model.apply(params, jnp.array([s]), jnp.array([t])) for s, t in ((s1, t1), (s2, t2))]
    src = jnp.array([s1 + s2 + [0]])
    tgt = jnp.array([t1 + t2 + [0]])
    packed = model.apply(
        params, src, tgt,
        src_segments=jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]]), tgt_segments=jnp.array([[1, 1, 1, 2, 2, 0]]),
        src_positions=jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]]), tgt_positions=jnp.array([[0, 1, 2, 0, 1, 0]]))
    np.testing.assert_allclose(packed[:, :3], separate[0], atol=1e-5)
    np.testing.assert_allclose(packed[:, 3:5], separate[1], atol=1e-5)


@pytest.mark.parametrize("changes", [dict(norm="pre"), dict(positional="learned"), dict(d_k=4, d_v=12),
                                     dict(share_embeddings=False, tie_output=False),
                                     dict(attention_impl="einsum"), dict(attention_impl="xla")])
def test_variants_run_and_keep_the_masks(changes):
    cfg = dataclasses.replace(TINY, **changes)
    model, params = Transformer(cfg), init_params(cfg, jax.random.key(1))
    src = jnp.array([[5, 6, 7, 3, 0]])
    a = model.apply(params, src, jnp.array([[2, 9, 10, 11]]))
    b = model.apply(params, src[:, :4], jnp.array([[2, 9, 10, 30]]))
    assert a.shape == (1, 4, 40) and a.dtype == jnp.float32
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters():
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    src, tgt = jnp.array([[5, 6, 7, 3]]), jnp.array([[2, 9, 10, 11]])
    low = Transformer(cfg).apply(params, src, tgt)
    high = Transformer(TINY).apply(params, src, tgt)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, high, atol=0.15)


def test_bfloat16_logits_are_not_rounded_to_bfloat16():
    # The output projection accumulates and returns float32: its values are not all bfloat16 numbers.
    for changes in (dict(), dict(share_embeddings=False, tie_output=False)):
        cfg = dataclasses.replace(TINY, dtype="bfloat16", **changes)
        logits = np.asarray(Transformer(cfg).apply(init_params(cfg, jax.random.key(0)),
                                                   jnp.array([[5, 6, 7, 3]]), jnp.array([[2, 9, 10, 11]])))
        assert logits.dtype == np.float32
        assert np.mean(logits != logits.astype(jnp.bfloat16).astype(np.float32)) > 0.5



@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_projection_gradients_equal_the_plain_product(dtype):
    # output_logits writes its backward pass by hand (for the weight gradient's layout); it must be the
    # gradient of the einsum it computes, for both y and the kernel, to the compute dtype's precision (in
    # bfloat16 it multiplies the float32 gradient rounded to bfloat16, autodiff may round afterwards).
    y = jax.random.normal(jax.random.key(0), (2, 3, 8)).astype(dtype)
    kernel = jax.random.normal(jax.random.key(1), (8, 13))
    cotangent = jax.random.normal(jax.random.key(2), (2, 3, 13))

    def plain(y, kernel):
        return jnp.einsum("btd,dv->btv", y.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)

    def projected(y, kernel):
        return ops.output_logits(y, kernel, dtype)

    for fn in (plain, projected):
        assert fn(y, kernel).dtype == jnp.float32
    got = jax.grad(lambda *a: jnp.sum(projected(*a) * cotangent), argnums=(0, 1))(y, kernel)
    want = jax.grad(lambda *a: jnp.sum(plain(*a) * cotangent), argnums=(0, 1))(y, kernel)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=1e-5, atol=1e-5 if dtype == "float32" else 0.06)


@pytest.mark.parametrize("platform, dtype, head, extra, expected", [
    ("cuda", jnp.bfloat16, 64, {}, "cudnn"),
    ("cuda", jnp.float16, 128, {}, "cudnn"),
    ("cuda", jnp.float32, 64, {}, "xla"),             # cuDNN flash attention is half precision only
    ("cpu", jnp.bfloat16, 64, {}, "xla"),
    ("rocm", jnp.bfloat16, 64, {}, "xla"),
    ("cuda", jnp.bfloat16, 60, {}, "xla"),            # head size not a multiple of 8
    ("cuda", jnp.bfloat16, 256, {}, "xla"),           # head size above 128
    ("cuda", jnp.bfloat16, 64, dict(structured_mask=False), "xla"),   # packed segments: dense mask only
    ("cuda", jnp.bfloat16, 64, dict(needs_weights=True), "einsum"),   # attention dropout / recorded weights
    ("cuda", jnp.bfloat16, 64, dict(head_dim_v=32), "einsum"),        # d_k != d_v
])
def test_auto_attention_takes_cudnn_exactly_when_it_applies(platform, dtype, head, extra, expected):
    kw = dict(platform=platform, dtype=dtype, head_dim_k=head, head_dim_v=head)
    kw.update(extra)
    impl, why = choose_attention_impl("auto", **kw)
    assert impl == expected and why
    assert choose_attention_impl("xla", **kw)[0] == ("einsum" if expected == "einsum" else "xla")
    assert choose_attention_impl("einsum", **kw)[0] == "einsum"


def test_cudnn_sequence_lengths_restate_the_padding_masks(monkeypatch, caplog):
    # Pretend to be on a CUDA GPU and run "cudnn" calls through XLA with the same structured arguments
    # (causal + key lengths, no dense mask): the logits at real target positions equal the dense-mask ones.
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(2))
    src = jnp.array([[5, 6, 7, 3, 0, 0], [8, 9, 3, 0, 0, 0]])
    tgt = jnp.array([[2, 9, 10, 11, 0], [2, 12, 0, 0, 0]])
    dense = Transformer(dataclasses.replace(cfg, attention_impl="xla")).apply(params, src, tgt)
    calls = []
    real_attention = jax.nn.dot_product_attention

    def fake_cudnn(*args, implementation=None, **kw):
        calls.append((implementation, kw.get("mask") is None, kw.get("is_causal", False)))
        return real_attention(*args, implementation="xla" if implementation == "cudnn" else implementation, **kw)

    monkeypatch.setattr(attention, "accelerator_platform", lambda: "cuda")
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
    with caplog.at_level("INFO", logger="jaxformer.attention"):
        structured = Transformer(cfg).apply(params, src, tgt)
    assert calls and all(impl == "cudnn" and no_mask for impl, no_mask, _ in calls)
    assert sum(causal for *_, causal in calls) == cfg.num_decoder_layers
    assert "cudnn implementation" in caplog.text
    real = np.asarray(tgt != 0)
    np.testing.assert_allclose(np.asarray(structured)[real], np.asarray(dense)[real], atol=2e-2)


@pytest.mark.parametrize("changes, message", [
    (dict(d_model=30, num_heads=4), "not divisible by num_heads"),
    (dict(positional="rotary"), "unknown option 'rotary'"),
    (dict(norm="sandwich"), "unknown option 'sandwich'"),
    (dict(dropout_rate=1.5), "dropout_rate"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_bad_config_is_a_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **changes)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="unknown model option.*num_layerz"):
        TransformerConfig.from_dict({"d_model": 32, "num_layerz": 2}, vocab_size=10)


def test_decode_cache_longer_than_positions_is_refused():
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        init_cache(TINY, 1, 4, TINY.max_len + 1)
