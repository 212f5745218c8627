"""Scaled dot-product attention (Eq. 1) and the choice among its implementations.

`attend` is the one call `model.MultiHeadAttention` makes; `model.attention_impl` picks who computes it:
"cudnn" (cuDNN's fused flash attention, through `jax.nn.dot_product_attention`), "xla" (the same call,
XLA's kernel), "einsum" (the formula written out: needed when the weights themselves are, for attention
dropout or plots, or when d_k != d_v), or "auto" (cuDNN where it applies, else XLA; the choice is logged).
`attend_head_major` is Eq. 1 against the decode caches' [B,H,S,d] layout.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

from jaxformer.ops import dropout

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128  # cuDNN flash attention: head size a multiple of 8, <= 128 (256 on Hopper and later)
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row stays a number

log = logging.getLogger(__name__)


def accelerator_platform() -> str:
    """"cuda", "rocm", "tpu" or "cpu": the default backend, with GPUs told apart by their runtime."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    try:
        version = jax.devices()[0].client.platform_version.lower()
    except Exception:  # noqa: BLE001 - an unknown runtime is treated as not-CUDA (XLA attention)
        return "gpu"
    return "rocm" if "rocm" in version else "cuda"


def choose_attention_impl(requested: str, *, platform: str, dtype, head_dim_k: int, head_dim_v: int,
                          structured_mask: bool = True, needs_weights: bool = False) -> tuple[str, str]:
    """(implementation, why) for one attention: "cudnn", "xla" or "einsum".

    "auto" takes cuDNN's fused flash attention on a CUDA GPU when it applies: bf16/fp16 compute, d_k == d_v,
    a head size that is a multiple of 8 and at most 128, and a mask cuDNN can express without a dense
    tensor (`structured_mask`: causal and/or right padding given as sequence lengths; packed segments are
    not). Otherwise XLA's `dot_product_attention`.
    """
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl: unknown option {requested!r}; choose one of "
                         f"{', '.join(ATTENTION_IMPLS)}")
    if requested == "einsum":
        return "einsum", "requested"
    if needs_weights:
        return "einsum", "the attention weights are needed (attention dropout or recorded weights)"
    if head_dim_k != head_dim_v:
        return "einsum", f"d_k={head_dim_k} != d_v={head_dim_v}"
    if requested != "auto":
        return requested, "requested"
    if platform != "cuda":
        return "xla", f"no CUDA GPU (platform {platform})"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
        return "xla", f"cuDNN needs bfloat16/float16, the compute dtype is {jnp.dtype(dtype).name}"
    if head_dim_k % 8 or head_dim_k > _CUDNN_MAX_HEAD_DIM:
        return "xla", f"cuDNN needs a head size that is a multiple of 8 and <= {_CUDNN_MAX_HEAD_DIM}, got {head_dim_k}"
    if not structured_mask:
        return "xla", "the mask is not causal/padding (packed segments)"
    return "cudnn", "CUDA GPU, half precision, supported head size and mask"


def key_value_lengths(valid: jax.Array) -> jax.Array:
    """[B] int32: real keys per row of `valid` [B, S] (right padding), at least 1; cuDNN's padding mask.

    An all-PAD row (the filler rows of evaluation and decode batches) would get 0, and cuDNN's padding mask
    would then leave its queries no key at all: NaN outputs, which a zero loss weight does not cancel
    (NaN * 0 is NaN). Such a row's outputs are never used, so attending to its first (PAD) key is harmless."""
    return jnp.maximum(jnp.sum(valid, axis=-1, dtype=jnp.int32), 1)


_LOGGED_CHOICES: set = set()


def log_choice(where: str, impl: str, why: str) -> None:
    """Log once per (attention kind, implementation, reason): it runs at trace time, once per compile."""
    if (where, impl, why) not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add((where, impl, why))
        log.info("attention %s: %s implementation (%s)", where, impl, why)


def attend(query, key, value, mask=None, *, impl="auto", is_causal=False, key_lengths=None,
           dropout_rate=0.0, dropout_rng=None, sow=None, where="attention"):
    """softmax(Q Kᵀ / √d_k) V (Eq. 1): query [B,T,H,K], key [B,S,H,K], value [B,S,H,V] -> [B,T,H,V].

    `mask` [B|1,1|H,T,S] is always the full boolean mask. `is_causal` and `key_lengths` [B] (keys at
    positions >= length are padding) restate it for cuDNN, which then needs no dense mask; a mask they do
    not describe (packed segments) leaves both unset. `dropout_rng` turns on dropout of the weights;
    `sow(weights)` records them.
    """
    structured = mask is None or is_causal or key_lengths is not None
    chosen, why = choose_attention_impl(impl, platform=accelerator_platform(), dtype=query.dtype,
                                        head_dim_k=query.shape[-1], head_dim_v=value.shape[-1],
                                        structured_mask=structured,
                                        needs_weights=sow is not None or dropout_rng is not None)
    log_choice(where, chosen, why)
    if chosen == "cudnn" and structured:
        lengths = None if key_lengths is None else key_lengths.astype(jnp.int32)
        return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal,
                                            key_value_seq_lengths=lengths, implementation="cudnn")
    if chosen in ("cudnn", "xla"):
        return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=chosen)
    logits = jnp.einsum("bthk,bshk->bhts", query, key, preferred_element_type=jnp.float32)  # [B,H,T,S]
    logits = logits / jnp.sqrt(jnp.float32(query.shape[-1]))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(query.dtype)
    if sow is not None:
        sow(weights)
    if dropout_rng is not None:
        weights = dropout(weights, dropout_rate, dropout_rng)
    out = jnp.einsum("bhts,bshv->bthv", weights, value, preferred_element_type=jnp.float32)  # [B,T,H,V]
    return out.astype(query.dtype)


def attend_head_major(query, key, value, mask=None):
    """Eq. 1 against head-major keys [B,H,S,K] and values [B,H,S,V] (the decode caches' layout, which each
    step's products read in place): query [B,T,H,K], mask broadcastable to [B,H,T,S] -> [B,T,H,V].
    Scores and softmax in float32, as `jax.nn.dot_product_attention`'s XLA path computes them."""
    logits = jnp.einsum("bthk,bhsk->bhts", query, key, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / math.sqrt(query.shape[-1]))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.float32(_MASKED))
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bhts,bhsv->bhtv", probs, value, preferred_element_type=jnp.float32)
    return jnp.swapaxes(out, 1, 2).astype(query.dtype)  # a [B,T,H,V] product ran 1.8x slower on XLA CPU
