"""Two standard operations of the model in cheaper but equal forms: named here so that model.py reads as
the paper. Their figures are in benchmarks/README.md ("Dropout's random bits", "The loss head").

* `dropout`: inverted dropout drawing two keep decisions per 32-bit random word (flax's `nn.Dropout`
  spends a word on each).
* `output_logits`: the pre-softmax projection with its backward pass written out, so that XLA transposes
  the small [tokens, D] activations rather than the [tokens, vocab] gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def dropout_keep_mask(rng: jax.Array, rate: float, shape) -> tuple[jax.Array, float]:
    """Keep decisions, each Bernoulli(1 − rate), for a tensor of `shape`, and the exact keep probability.

    Each decision compares 16 random bits with round((1 − rate)·2¹⁶), so the keep probability is (1 − rate)
    to within 2⁻¹⁷; the exact one is returned, to scale the kept values by. The words are drawn over
    `shape` with a halved last axis, so a batch split over devices draws its own rows' words (threefry is
    partitionable) and every mesh gets the same masks.
    """
    threshold = int(round((1.0 - rate) * 65536))
    half = (shape[-1] + 1) // 2
    words = jax.random.bits(rng, tuple(shape[:-1]) + (half,), jnp.uint32)
    keep = jnp.concatenate([(words & 0xFFFF) < threshold, (words >> 16) < threshold], axis=-1)
    return keep[..., :shape[-1]], threshold / 65536


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Inverted dropout: zero each value with probability `rate`, scale the kept ones by 1 / keep."""
    keep, keep_prob = dropout_keep_mask(rng, rate, x.shape)
    if keep_prob == 0.0:  # rate within 2⁻¹⁷ of 1, or above
        return jnp.zeros_like(x)
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


def output_logits(y: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """y [B,T,D] @ kernel [D,vocab] -> float32 logits: compute-dtype inputs, float32 accumulation and output
    (bfloat16 logits would round the loss and the search scores)."""
    return _project(y, kernel, jnp.dtype(dtype))


def _product(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(y, kernel, dtype):
    return _product("btd,dv->btv", y, kernel, dtype)


def _project_forward(y, kernel, dtype):
    return _product("btd,dv->btv", y, kernel, dtype), (y, kernel)


def _project_backward(dtype, residuals, g):
    """dy = g Wᵀ and dW = yᵀ g, written as products that transpose y, not the [tokens, vocab] gradient."""
    y, kernel = residuals
    dy = _product("btv,dv->btd", g, kernel, dtype)
    dkernel = _product("btd,btv->dv", y, g, dtype)
    return dy.astype(y.dtype), dkernel.astype(kernel.dtype)


_project.defvjp(_project_forward, _project_backward)
