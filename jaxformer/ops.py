"""Standard operations in cheaper but equal forms: named here so that model.py and the searches read as
the paper. Their figures are in benchmarks/README.md ("Dropout's random bits", "The loss head", and the
search-speed rows).

* `dropout`: inverted dropout drawing two keep decisions per 32-bit random word (flax's `nn.Dropout`
  spends a word on each).
* `output_logits`: the pre-softmax projection with its backward pass written out, so that XLA transposes
  the small [tokens, D] activations rather than the [tokens, vocab] gradient.
* `first_argmax`, `block_top_k`: argmax and top-k over the vocabulary with `jnp.argmax`'s and
  `jax.lax.top_k`'s results, ties included, at a fraction of XLA CPU's cost.
"""

from __future__ import annotations

import functools
import math

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


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first index of the maximum, as int32) for finite x, as a max
    and a min: XLA's CPU argmax (a variadic reduce) took 3.7x as long on [64, 8000] logits on a
    2-core x86 machine."""
    best = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == best, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)


def block_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x, k)` over the last axis of x [B, N], the same values and indices (ties to the lowest
    index), through the maxima of blocks of about sqrt(N / k) entries: the k best blocks by (maximum, lowest
    block) hold the k best entries, since each of them has an entry that ranks above anything of a block left
    out. XLA's CPU TopK over the K*V beam candidates cost ~18x a max over them; this is a max, a small top-k
    and a top-k over k blocks. Small arrays go to `jax.lax.top_k` directly."""
    batch, n = x.shape
    block = 1 << max(4, math.isqrt(max(1, n // k)).bit_length() - 1)  # a power of two, at least 16
    blocks = -(-n // block)
    if blocks <= 2 * k:
        return jax.lax.top_k(x, k)
    padded = jnp.pad(x, [(0, 0), (0, blocks * block - n)], constant_values=-jnp.inf).reshape(batch, blocks, block)
    _, chosen = jax.lax.top_k(jnp.max(padded, axis=-1), k)  # [B, k]
    chosen = jnp.sort(chosen, axis=-1)  # in index order, so ties still go to the lowest index
    candidates = jnp.take_along_axis(padded, chosen[:, :, None], axis=1).reshape(batch, k * block)
    values, within = jax.lax.top_k(candidates, k)
    index = jnp.take_along_axis(chosen, within // block, axis=1) * block + within % block
    return values, index.astype(jnp.int32)
