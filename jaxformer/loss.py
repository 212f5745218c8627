"""The label-smoothed cross entropy of Section 5.4, per token and summed over non-pad tokens."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp



def token_losses(logits: jax.Array, targets: jax.Array, smoothing: float) -> tuple[jax.Array, jax.Array]:
    """Per-token (label-smoothed loss, plain negative log-likelihood) for logits [..., V], targets [...].

    Smoothing as in the paper's Tensor2Tensor and in fairseq: the target distribution q puts 1 - ε on the
    true token and ε / (V - 1) on each of the other V - 1 (PAD included). The smoothed loss is the cross
    entropy H(q, p) minus q's own entropy H(q), i.e. KL(q ‖ p): 0 when the model predicts q exactly (as
    T2T and flax's WMT example report it; fairseq does not subtract H(q)). The constant changes the
    reported value, not the gradient.
    """
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    true_log_prob = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    nll = -true_log_prob
    if smoothing == 0.0:
        return nll, nll
    confidence = 1.0 - smoothing
    low = smoothing / (vocab - 1)
    cross_entropy = -(confidence * true_log_prob + low * (jnp.sum(log_probs, axis=-1) - true_log_prob))
    entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low))
    return cross_entropy - entropy, nll


def label_smoothed_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                                 smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """(Σ weights · smoothed loss, Σ weights) over tokens; their ratio is the mean over non-pad tokens.

    `weights` is typically `targets != PAD_ID`. See `token_losses` for the smoothing variant.
    """
    smoothed, _ = token_losses(logits, targets, smoothing)
    weights = weights.astype(jnp.float32)
    return jnp.sum(smoothed * weights), jnp.sum(weights)
