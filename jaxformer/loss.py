"""The label-smoothed cross entropy of Section 5.4, per token (`token_statistics`); the train step sums it
over non-pad tokens.

A fused loss head: the [tokens, vocab] logits are the largest tensor of a step, so the forward pass reads
them only for three per-row reductions (max, Σ exp, Σ) and one gather, without materialising
log-probabilities or one-hot targets, and the backward pass writes the gradient softmax − q in one
elementwise pass (a `jax.custom_vjp`); differentiating the textbook form made XLA CPU materialise and
transpose [tokens, vocab] arrays. Its figures (with `ops.output_logits`): benchmarks/README.md, "The loss
head" (`benchmarks/step_ab.py --baselines textbook-head`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp



def _targets_distribution(vocab: int, smoothing: float) -> tuple[float, float]:
    """(q on the true token, q on each other token): 1 − ε and ε / (V − 1)."""
    return 1.0 - smoothing, smoothing / (vocab - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def token_statistics(logits: jax.Array, targets: jax.Array, smoothing: float):
    """Per-token (label-smoothed loss, negative log-likelihood, correct) for logits [..., V], targets [...].

    Smoothing as in the paper's Tensor2Tensor and in fairseq: the target distribution q puts 1 − ε on the
    true token and ε / (V − 1) on each of the other V − 1 (PAD included). The smoothed loss is the cross
    entropy H(q, p) minus q's own entropy H(q), i.e. KL(q ‖ p): 0 when the model predicts q exactly (as
    T2T and flax's WMT example report it; fairseq does not subtract H(q)). The constant changes the
    reported value, not the gradient.

    `correct` (bool) is true where the target's logit is the row's maximum: the argmax, except that a
    tie for the maximum counts as correct whichever tied token the target is.
    """
    return _statistics(logits, targets, smoothing)[0]


def _statistics(logits, targets, smoothing):
    given = logits  # kept in its own dtype; the gradient returns in it
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    row_max = jnp.max(logits, axis=-1)
    log_z = row_max + jnp.log(jnp.sum(jnp.exp(logits - row_max[..., None]), axis=-1))
    true_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    true_log_prob = true_logit - log_z
    nll = -true_log_prob
    if smoothing == 0.0:
        smoothed = nll
    else:
        confidence, low = _targets_distribution(vocab, smoothing)
        sum_log_probs = jnp.sum(logits, axis=-1) - vocab * log_z
        cross_entropy = -(confidence * true_log_prob + low * (sum_log_probs - true_log_prob))
        entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low))
        smoothed = cross_entropy - entropy
    return (smoothed, nll, true_logit >= row_max), (given, targets, log_z)


def _statistics_backward(smoothing, residuals, cotangents):
    """d/dlogits = (g_s + g_nll) · softmax − g_s · q − g_nll · onehot, in one pass over [..., V]."""
    given, targets, log_z = residuals
    logits = given.astype(jnp.float32)
    g_smoothed, g_nll, _ = cotangents
    confidence, low = _targets_distribution(logits.shape[-1], smoothing)
    is_target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
    probs = jnp.exp(logits - log_z[..., None])
    g_smoothed, g_nll = g_smoothed[..., None], g_nll[..., None]
    target_part = jnp.where(is_target, g_smoothed * confidence + g_nll, g_smoothed * low)
    return ((g_smoothed + g_nll) * probs - target_part).astype(given.dtype), None


token_statistics.defvjp(_statistics, _statistics_backward)
