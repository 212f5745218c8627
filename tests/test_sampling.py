"""Sampling (issue 30): full, top-k and top-p draws at a temperature, reproducible by seed whatever the batching."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from jaxformer import cli, decode
from jaxformer.data import BOS_ID, EOS_ID
from jaxformer.synthetic import english_words
from helpers import RANDOM_CFG, bigram_model, sources

SOURCES = [english_words(n) for n in (7, 21, 400, 1234, 99999, 310412, 5, 68, 700001)]


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def test_full_sampling_draws_first_tokens_with_the_model_probabilities():
    # After BOS: 4, 5, 6 or EOS with these probabilities; a one-step toy model (after them, EOS).
    probs = {4: 0.5, 5: 0.3, 6: 0.15, EOS_ID: 0.05}
    model, params, log_probs = bigram_model({BOS_ID: {t: math.log(p) for t, p in probs.items()}})
    n = 4000
    src = np.repeat(sources([2], 3, 16), n, axis=0)
    tokens = np.asarray(decode.sample_search(model, params, src, keys(n), max_extra_len=2))
    counts = np.array([np.sum(tokens[:, 0] == t) for t in probs])
    expected = n * np.exp(log_probs[BOS_ID, list(probs)])
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 16.3, (counts, expected)  # 3 degrees of freedom: p = 0.001


def test_low_temperature_is_greedy_and_top_k_stays_in_the_k_best(random_model):
    model, params = random_model
    src = sources([3, 8, 1, 5], 9, RANDOM_CFG.vocab_size)
    greedy = np.asarray(decode.greedy_search(model, params, src, max_extra_len=6))
    cold = decode.sample_search(model, params, src, keys(4), temperature=1e-4, max_extra_len=6)
    np.testing.assert_array_equal(cold, greedy)
    n = 512
    many = np.repeat(src[:1], n, axis=0)
    first = np.asarray(decode.sample_search(model, params, many, keys(n), kind="topk", top_k=3,
                                            max_extra_len=6))[:, 0]
    logits = np.array(model.apply(params, src[:1], np.array([[BOS_ID]], np.int32)))[0, 0]
    logits[[0, BOS_ID]] = -np.inf
    best = set(np.argsort(-logits)[:3].tolist())
    assert set(first.tolist()) == best  # all three drawn, nothing else
    nucleus = np.asarray(decode.sample_search(model, params, many, keys(n), kind="topp", top_p=1e-6,
                                              max_extra_len=6))[:, 0]
    assert set(nucleus.tolist()) == {int(np.argmax(logits))}  # the smallest nucleus: the most likely token
    with pytest.raises(ValueError, match="unknown sampling"):
        decode.sample_search(model, params, src, keys(4), kind="beam")


def test_samples_repeat_by_seed_whatever_the_batch_size_and_the_cli(number_words, tmp_path, capsys):
    split = {"parallel": "split"}  # one compiled program for the 4 test devices
    draw = dict(sampling="topk:5", temperature=1.5, seed=3, **split)
    a = number_words.translate(SOURCES, batch_size=8, **draw)
    b = number_words.translate(SOURCES, batch_size=2, **draw)
    assert a == b
    assert number_words.translate(SOURCES[4:], batch_size=8, first_index=4, **draw) == a[4:]
    c = number_words.translate(SOURCES, batch_size=8, **{**draw, "seed": 4})
    assert c != a  # another seed, other samples (9 sentences at temperature 1.5)
    found = number_words.translate(SOURCES[:2], nbest=3, **draw)
    assert [len(h) for h in found] == [3, 3] and [h[0]["text"] for h in found] == a[:2]
    assert all(h["log_prob"] is not None for hyps in found for h in hyps)
    src = tmp_path / "src.en"
    src.write_text("".join(s + "\n" for s in SOURCES), encoding="utf-8")
    assert cli.main(["translate", "--model", str(number_words.source), "--input", str(src), "--sampling", "topk:5",
                     "--temperature", "1.5", "--seed", "3", "--batch-size", "2", "--parallel", "split"]) == 0
    assert capsys.readouterr().out.splitlines() == a
    assert cli.main(["translate", "--model", str(number_words.source), "--input", str(src), "--sampling",
                     "top:3"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: unknown sampling 'top:3'")
