"""The Transformer of Vaswani et al. (2017) as Flax linen modules.

Section numbers refer to the paper. Shapes in comments use
B batch, S source length, T target length, H heads, K key/query size per head
(d_k), V value size per head (d_v), D d_model, F d_ff.

`Transformer.encode` and `Transformer.decode` are usable alone (beam search
needs them). With `decode=True` the decoder runs one token at a time from a
key/value cache in the flax "cache" collection (head-major, [B,H,S,K]: see
`cached_attention`); the cross-attention keys and values are computed once per
sentence, on the first cached step, and read from the cache on every later one
(pass `encoded=None` then).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_POSITIONAL = ("sinusoidal", "learned")
_NORMS = ("post", "pre")
_ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128  # cuDNN flash attention: head size a multiple of 8, <= 128 (256 on Hopper and later)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of the model; the defaults are the paper's base model."""

    vocab_size: int
    d_model: int = 512
    d_ff: int = 2048
    num_heads: int = 8
    d_k: int | None = None  # per head; None means d_model // num_heads
    d_v: int | None = None
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    relu_dropout_rate: float = 0.0
    positional: str = "sinusoidal"
    max_len: int = 512
    share_embeddings: bool = True
    tie_output: bool = True
    scale_embeddings: bool = True
    norm: str = "post"
    dtype: str = "float32"
    attention_impl: str = "auto"
    pad_id: int = 0

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"TransformerConfig.{key}: {why}")

        for key in ("vocab_size", "d_model", "d_ff", "num_heads", "max_len"):
            if int(getattr(self, key)) <= 0:
                bad(key, f"must be a positive integer, got {getattr(self, key)!r}")
        for key in ("num_encoder_layers", "num_decoder_layers"):
            if int(getattr(self, key)) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)!r}")
        if (self.d_k is None or self.d_v is None) and self.d_model % self.num_heads:
            bad("num_heads", f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "choose another num_heads or set d_k and d_v explicitly")
        for key in ("d_k", "d_v"):
            value = getattr(self, key)
            if value is not None and int(value) <= 0:
                bad(key, f"must be a positive integer or None, got {value!r}")
        for key in ("dropout_rate", "attention_dropout_rate", "relu_dropout_rate"):
            if not 0.0 <= float(getattr(self, key)) < 1.0:
                bad(key, f"must be in [0, 1), got {getattr(self, key)!r}")
        for key, allowed in (("positional", _POSITIONAL), ("norm", _NORMS),
                             ("dtype", tuple(_DTYPES)), ("attention_impl", _ATTENTION_IMPLS)):
            if getattr(self, key) not in allowed:
                bad(key, f"unknown option {getattr(self, key)!r}; choose one of {', '.join(allowed)}")

    @property
    def head_dim_k(self) -> int:
        return self.d_k if self.d_k is not None else self.d_model // self.num_heads

    @property
    def head_dim_v(self) -> int:
        return self.d_v if self.d_v is not None else self.d_model // self.num_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @classmethod
    def base(cls, vocab_size: int, **overrides) -> "TransformerConfig":
        """The paper's base model (Table 3): N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1."""
        return cls(vocab_size=vocab_size, **overrides)

    @classmethod
    def big(cls, vocab_size: int, **overrides) -> "TransformerConfig":
        """The paper's big model (Table 3): N=6, d_model=1024, d_ff=4096, h=16, P_drop=0.3."""
        settings = dict(d_model=1024, d_ff=4096, num_heads=16, dropout_rate=0.3)
        settings.update(overrides)
        return cls(vocab_size=vocab_size, **settings)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], vocab_size: int | None = None) -> "TransformerConfig":
        """Build from a mapping (e.g. `config.model`), rejecting unknown keys by name."""
        values = dict(values)
        if vocab_size is not None:
            values["vocab_size"] = vocab_size
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sinusoidal_positions(length: int, d_model: int) -> np.ndarray:
    """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    position = np.arange(length, dtype=np.float64)[:, None]
    two_i = np.arange(0, d_model, 2, dtype=np.float64)[None, :]
    angle = position / np.power(10000.0, two_i / d_model)
    table = np.zeros((length, d_model), dtype=np.float32)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : d_model // 2])
    return table


def padding_mask(query_valid: jax.Array | None, key_valid: jax.Array) -> jax.Array:
    """[B, 1, Tq, Tk] boolean mask from per-token validity; padded keys are never attended."""
    mask = key_valid[:, None, None, :]
    if query_valid is not None:
        mask = jnp.logical_and(mask, query_valid[:, None, :, None])
    return mask


def key_value_lengths(valid: jax.Array) -> jax.Array:
    """[B] int32: real keys per row of `valid` [B, S] (right padding), at least 1; cuDNN's padding mask.

    An all-PAD row (the filler rows of evaluation and decode batches) would get 0, and cuDNN's padding mask
    would then leave its queries no key at all: NaN outputs, which a zero loss weight does not cancel
    (NaN * 0 is NaN). Such a row's outputs are never used, so attending to its first (PAD) key is harmless."""
    return jnp.maximum(jnp.sum(valid, axis=-1, dtype=jnp.int32), 1)


def segment_mask(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
    """[B, 1, Tq, Tk]: packed rows attend only within their own pair.

    Padding (segment 0) attends only to padding, so no row is fully masked (a fully masked softmax row can
    be NaN in fused kernels, and NaN times a zero loss weight is still NaN in the gradient)."""
    return (query_segments[:, :, None] == key_segments[:, None, :])[:, None]


def causal_mask(length: int) -> jax.Array:
    """[1, 1, T, T]: position i attends to positions <= i (Section 3.2.3)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def _combine(*masks):
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out


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
    not). Otherwise XLA's `dot_product_attention`. The explicit formula ("einsum") is needed when the
    attention weights themselves are (dropout on them, recording them for plots) or when d_k != d_v.
    """
    if requested not in _ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl: unknown option {requested!r}; choose one of "
                         f"{', '.join(_ATTENTION_IMPLS)}")
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
        return "xla", "the mask is not causal/padding (packed segments or a decode step)"
    return "cudnn", "CUDA GPU, half precision, supported head size and mask"


_LOGGED_CHOICES: set = set()


def _log_choice(where: str, impl: str, why: str) -> None:
    """Log once per (attention kind, implementation, reason): it runs at trace time, once per compile."""
    if (where, impl, why) not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add((where, impl, why))
        log.info("attention %s: %s implementation (%s)", where, impl, why)


def dropout_keep_mask(rng: jax.Array, rate: float, shape) -> tuple[jax.Array, float]:
    """Keep decisions, each Bernoulli(1 − rate), for a tensor of `shape`, and the exact keep probability.

    Two decisions per 32-bit threefry word, 16 bits each (keep when they are below round((1 − rate)·2¹⁶)):
    `jax.random.bernoulli` spends a whole word per decision, and on a CPU generating those words was a
    large part of the train step (benchmarks/README.md, "Dropout's random bits"). The keep probability is
    (1 − rate) to within 2⁻¹⁷, and the returned value is the exact one, to scale the kept values by.
    The words are drawn over `shape` with a halved last axis, so a batch split over devices draws its own
    rows' words (threefry is partitionable) and every mesh gets the same masks.
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


class Dropout(nn.Module):
    """Section 5.4's dropout (flax's `nn.Dropout` with `dropout_keep_mask`'s cheaper random bits)."""

    rate: float

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        if deterministic or self.rate == 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))


def scaled_dot_product_attention(query, key, value, mask=None, *, dropout_rng=None, dropout_rate=0.0,
                                 deterministic=True, impl="einsum", sow=None, is_causal=False,
                                 key_lengths=None, structured=None, where="attention"):
    """softmax(Q Kᵀ / √d_k) V (Eq. 1) for query [B,T,H,K], key [B,S,H,K], value [B,S,H,V], mask [B|1,1|H,T,S].

    `mask` is always the full boolean mask. `is_causal` and `key_lengths` [B] (keys at positions >= length
    are padding) describe the same mask structurally, for cuDNN, which then needs no dense mask;
    `structured` says whether they describe it exactly (default: when either is given, or there is no mask).
    `impl` is the config's attention_impl, resolved by `choose_attention_impl`.
    """
    if structured is None:
        structured = mask is None or is_causal or key_lengths is not None
    needs_weights = sow is not None or (not deterministic and dropout_rate > 0.0)
    chosen, why = choose_attention_impl(impl, platform=accelerator_platform(), dtype=query.dtype,
                                        head_dim_k=query.shape[-1], head_dim_v=value.shape[-1],
                                        structured_mask=structured, needs_weights=needs_weights)
    _log_choice(where, chosen, why)
    if chosen == "cudnn" and structured:
        lengths = None if key_lengths is None else key_lengths.astype(jnp.int32)
        return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal,
                                            key_value_seq_lengths=lengths, implementation="cudnn")
    if chosen in ("cudnn", "xla"):
        return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=chosen)
    depth = query.shape[-1]
    logits = jnp.einsum("bthk,bshk->bhts", query, key, preferred_element_type=jnp.float32)  # [B,H,T,S]
    logits = logits / jnp.sqrt(jnp.float32(depth))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(query.dtype)
    if sow is not None:
        sow(weights)
    if not deterministic and dropout_rate > 0.0:
        weights = dropout(weights, dropout_rate, dropout_rng)
    out = jnp.einsum("bhts,bshv->bthv", weights, value, preferred_element_type=jnp.float32)  # [B,T,H,V]
    return out.astype(query.dtype)


def cached_attention(query, key, value, mask=None):
    """Eq. 1 for decode steps, against head-major caches: query [B,T,H,K], key [B,H,S,K], value [B,H,S,V],
    mask broadcastable to [B,H,T,S] -> [B,T,H,V].

    The decode caches are stored head-major so that each step's two (batched matrix-vector) products read
    them in place; the [B,S,H,K] layout of `scaled_dot_product_attention` made XLA transpose every cached
    key and value on every step, which cost more than the step's matmuls. Scores and softmax in float32,
    as `jax.nn.dot_product_attention`'s XLA path computes them.
    """
    logits = jnp.einsum("bthk,bhsk->bhts", query, key, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / math.sqrt(query.shape[-1]))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max)))
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bhts,bhsv->bthv", probs, value, preferred_element_type=jnp.float32)
    return out.astype(query.dtype)


class MultiHeadAttention(nn.Module):
    """Section 3.2.2: h heads of d_k (queries, keys) and d_v (values), concatenated and projected to D.

    `kind` is "self" or "cross". In decode mode self-attention appends one step's key/value to a cache of
    length max_decode_len; cross-attention computes the encoder's keys/values once and caches them.
    """

    config: TransformerConfig
    kind: str = "self"
    record_weights: bool = False

    @nn.compact
    def __call__(self, x, memory=None, mask=None, *, deterministic=True, decode=False, is_causal=False,
                 key_lengths=None, beams=1):
        """`mask` is the full boolean mask; `is_causal` / `key_lengths` [B] restate it for cuDNN (see
        `scaled_dot_product_attention`); decode steps use the mask alone.

        `beams` (beam-search decode steps after the first): x holds `beams` consecutive rows per sentence
        ([B*beams, 1, D]). Cross-attention reads a [B, H, S, K] cache and a [B, ...] mask, so the encoder's
        keys and values are stored and read once per sentence, not once per beam; self-attention reads the
        slot cache of `beam_search_cache` (see `_beam_self_attention`)."""
        cfg = self.config
        h, dk, dv = cfg.num_heads, cfg.head_dim_k, cfg.head_dim_v
        dense = lambda feats, name: nn.DenseGeneral(  # noqa: E731
            feats, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
            kernel_init=nn.initializers.xavier_uniform(), name=name)
        project = lambda out: nn.DenseGeneral(  # noqa: E731  the heads' outputs, concatenated, to D
            cfg.d_model, axis=(-2, -1), dtype=cfg.compute_dtype, param_dtype=jnp.float32,
            kernel_init=nn.initializers.xavier_uniform(), name="out")(out)
        query = dense((h, dk), "query")(x)  # [B,T,H,K]

        head_major = False  # decode caches hold keys/values as [B,H,S,K] (see `cached_attention`)
        if self.kind == "cross" and decode:
            # Keys/values of the encoder output: computed when `memory` is given (first step), else cached.
            batch, = x.shape[:1]
            initializing = not self.has_variable("cache", "cross_key")
            src_len = memory.shape[1] if memory is not None else None
            cached_key = self.variable("cache", "cross_key", jnp.zeros, (batch, h, src_len, dk), cfg.compute_dtype)
            cached_value = self.variable("cache", "cross_value", jnp.zeros, (batch, h, src_len, dv),
                                         cfg.compute_dtype)
            if memory is not None:
                key = jnp.swapaxes(dense((h, dk), "key")(memory), 1, 2)
                value = jnp.swapaxes(dense((h, dv), "value")(memory), 1, 2)
                if not initializing:
                    cached_key.value, cached_value.value = key, value
            else:
                key, value = cached_key.value, cached_value.value
                if beams > 1:  # the beams of a sentence become extra query positions against its keys
                    query = query.reshape((key.shape[0], beams * query.shape[1]) + query.shape[2:])
            head_major = True
        else:
            source = x if self.kind == "self" else memory
            key = dense((h, dk), "key")(source)    # [B,S,H,K]
            value = dense((h, dv), "value")(source)  # [B,S,H,V]

        if self.kind == "self" and decode and (beams > 1 or self.has_variable("cache", "beam_slots")):
            if self.is_initializing() or not self.has_variable("cache", "beam_slots"):
                raise ValueError("beam decode steps (beams > 1) need a cache from `beam_search_cache`")
            return project(self._beam_self_attention(query, key, value, beams))

        if self.kind == "self" and decode:
            initializing = not self.has_variable("cache", "cached_key")
            head_major_shape = lambda a: (a.shape[0], a.shape[2], a.shape[1], a.shape[3])  # noqa: E731
            cached_key = self.variable("cache", "cached_key", jnp.zeros, head_major_shape(key), key.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, head_major_shape(value), value.dtype)
            cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
            if not initializing:
                max_len = cached_key.value.shape[2]
                if x.shape[1] != 1:
                    raise ValueError(f"decode mode takes one token per step, got a length of {x.shape[1]}")
                index = cache_index.value
                key = jax.lax.dynamic_update_slice(cached_key.value, jnp.swapaxes(key, 1, 2), (0, 0, index, 0))
                value = jax.lax.dynamic_update_slice(cached_value.value, jnp.swapaxes(value, 1, 2),
                                                     (0, 0, index, 0))
                cached_key.value, cached_value.value = key, value
                cache_index.value = index + 1
                head_major = True
                # The new query sees cached positions 0..index only.
                step_mask = (jnp.arange(max_len) <= index)[None, None, None, :]
                mask = _combine(mask, step_mask)

        sow = None
        if self.record_weights:
            sow = lambda w: self.sow("intermediates", "attention_weights", w)  # noqa: E731
        dropout_rng = None
        if not deterministic and cfg.attention_dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        needs_weights = sow is not None or dropout_rng is not None
        if head_major and not needs_weights:
            _log_choice(f"decoder step {self.kind}", "einsum", "one query against the head-major decode cache")
            out = cached_attention(query, key, value, mask)
            if out.shape[0] != x.shape[0]:  # back from [B, beams*T, ...] to one row per beam
                out = out.reshape(x.shape[:2] + out.shape[2:])
        else:
            if head_major:
                key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
            structured = None if not decode else False
            out = scaled_dot_product_attention(
                query, key, value, mask, dropout_rng=dropout_rng, dropout_rate=cfg.attention_dropout_rate,
                deterministic=deterministic, impl=cfg.attention_impl, sow=sow, is_causal=is_causal,
                key_lengths=key_lengths, structured=structured,
                where=f"{'decoder' if decode or self.kind == 'cross' or is_causal else 'encoder'} {self.kind}")
        return project(out)

    def _beam_self_attention(self, query, key, value, beams):
        """One beam-search step of decoder self-attention without reordering the cache.

        Every sentence has K cache slots per position: slot k of position t holds the key/value of the beam
        that sat in row k when it was fed at step t, and is never rewritten. `beam_slots` [B, K, L] says, for
        each live beam, which slot holds each of its earlier positions (its ancestors'); beam search permutes
        only these indices when it reorders beams (`decode._reorder_cache`), not the keys and values, which
        used to cost a copy of the whole cache per step. Each beam's query scores every slot of its sentence
        at once ([K, d] x [d, L*K] per sentence and head, the cache read in place) and keeps, per position,
        the slot of its own history; the value sum uses the same selection. Keys are stored [B, H, d, L*K]
        and values [B, H, L*K, d_v] (position-major, slot-minor), the layouts those two products read
        without a transpose. query/key/value [B*K, 1, H, d] -> [B*K, 1, H, d_v].
        """
        slots = self.variable("cache", "beam_slots", jnp.zeros, (), jnp.int32)
        cached_key = self.variable("cache", "cached_key", jnp.zeros, (), key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, (), value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        batch, k, length = slots.value.shape
        if query.shape[1] != 1 or k != beams:
            raise ValueError(f"beam decode steps take one token for each of {k} beams, got "
                             f"{query.shape[1]} tokens and beams={beams}")
        index = cache_index.value
        by_sentence = lambda a: jnp.swapaxes(a.reshape((batch, k) + a.shape[2:]), 1, 2)  # noqa: E731 [B,H,K,d]
        keys = jax.lax.dynamic_update_slice(cached_key.value, jnp.swapaxes(by_sentence(key), 2, 3),
                                            (0, 0, 0, index * k))
        values = jax.lax.dynamic_update_slice(cached_value.value, by_sentence(value), (0, 0, index * k, 0))
        history = jax.lax.dynamic_update_slice(
            slots.value, jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None, :, None], (batch, k, 1)),
            (0, 0, index))
        cached_key.value, cached_value.value, slots.value = keys, values, history
        cache_index.value = index + 1

        heads = keys.shape[1]
        scores = jnp.einsum("bhkd,bhdn->bhkn", by_sentence(query), keys, preferred_element_type=jnp.float32)
        scores = scores.reshape(batch, heads, k, length, k)  # [B,H,K,L,J]: beam k's query x slot j, per position
        mine = history[:, None, :, :, None] == jnp.arange(k, dtype=jnp.int32)  # [B,1,K,L,J]
        logits = jnp.sum(jnp.where(mine, scores, 0.0), axis=-1) * jnp.float32(1.0 / math.sqrt(query.shape[-1]))
        seen = jnp.arange(length) <= index  # the new query sees positions 0..index
        logits = jnp.where(seen, logits, jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max)))
        probs = jax.nn.softmax(logits, axis=-1)  # [B,H,K,L]
        weights = jnp.where(mine, probs[..., None], 0.0).reshape(batch, heads, k, length * k).astype(values.dtype)
        out = jnp.einsum("bhkn,bhnv->bhkv", weights, values, preferred_element_type=jnp.float32)
        return jnp.swapaxes(out, 1, 2).reshape(query.shape[:2] + out.shape[1:2] + out.shape[3:]).astype(
            query.dtype)


class FeedForward(nn.Module):
    """Section 3.3: FFN(x) = max(0, x W1 + b1) W2 + b2."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        cfg = self.config
        dense = lambda feats, name: nn.Dense(  # noqa: E731
            feats, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
            kernel_init=nn.initializers.xavier_uniform(), name=name)
        y = nn.relu(dense(cfg.d_ff, "wi")(x))  # [B,T,F]
        y = Dropout(cfg.relu_dropout_rate)(y, deterministic=deterministic)
        return dense(cfg.d_model, "wo")(y)


class SubLayer(nn.Module):
    """Section 5.4 residual dropout around one sub-layer: LayerNorm(x + Dropout(f(x))) (post-LN, the paper's),
    or x + Dropout(f(LayerNorm(x))) with norm="pre"."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, fn: Callable, x, *, deterministic=True):
        cfg = self.config
        norm = nn.LayerNorm(epsilon=1e-6, dtype=cfg.compute_dtype, param_dtype=jnp.float32, name="norm")
        drop = Dropout(cfg.dropout_rate)
        if cfg.norm == "pre":
            return x + drop(fn(norm(x)), deterministic=deterministic)
        return norm(x + drop(fn(x), deterministic=deterministic))


class EncoderLayer(nn.Module):
    config: TransformerConfig
    record_weights: bool = False

    @nn.compact
    def __call__(self, x, mask, *, deterministic=True, key_lengths=None):
        cfg = self.config
        attn = MultiHeadAttention(cfg, "self", self.record_weights, name="self_attention")
        x = SubLayer(cfg, name="attention_block")(
            lambda y: attn(y, mask=mask, deterministic=deterministic, key_lengths=key_lengths), x,
            deterministic=deterministic)
        ffn = FeedForward(cfg, name="ffn")
        return SubLayer(cfg, name="ffn_block")(
            lambda y: ffn(y, deterministic=deterministic), x, deterministic=deterministic)


class DecoderLayer(nn.Module):
    config: TransformerConfig
    record_weights: bool = False

    @nn.compact
    def __call__(self, y, memory, self_mask, cross_mask, *, deterministic=True, decode=False, is_causal=False,
                 memory_lengths=None, beams=1):
        cfg = self.config
        self_attn = MultiHeadAttention(cfg, "self", self.record_weights, name="self_attention")
        y = SubLayer(cfg, name="self_attention_block")(
            lambda z: self_attn(z, mask=self_mask, deterministic=deterministic, decode=decode,
                                is_causal=is_causal, beams=beams),
            y, deterministic=deterministic)
        cross_attn = MultiHeadAttention(cfg, "cross", self.record_weights, name="cross_attention")
        y = SubLayer(cfg, name="cross_attention_block")(
            lambda z: cross_attn(z, memory, mask=cross_mask, deterministic=deterministic, decode=decode,
                                 key_lengths=memory_lengths, beams=beams),
            y, deterministic=deterministic)
        ffn = FeedForward(cfg, name="ffn")
        return SubLayer(cfg, name="ffn_block")(
            lambda z: ffn(z, deterministic=deterministic), y, deterministic=deterministic)


class Embedder(nn.Module):
    """Section 3.4: token embedding × √d_model plus positions (Section 3.5), then dropout (Section 5.4)."""

    config: TransformerConfig
    embed: nn.Module

    @nn.compact
    def __call__(self, tokens, positions=None, *, deterministic=True, decode=False):
        cfg = self.config
        x = self.embed(tokens).astype(cfg.compute_dtype)  # [B,T,D]
        if cfg.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), cfg.compute_dtype)
        length = tokens.shape[1]
        if decode:
            # One token per step: its position is the number of steps taken so far.
            is_init = not self.has_variable("cache", "position")
            step = self.variable("cache", "position", lambda: jnp.array(0, dtype=jnp.int32))
            if not is_init:
                positions = jnp.broadcast_to(step.value, tokens.shape)
                step.value = step.value + 1
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
        if cfg.positional == "sinusoidal":
            table = jnp.asarray(sinusoidal_positions(cfg.max_len, cfg.d_model))
        else:
            table = self.param("positions", nn.initializers.normal(stddev=0.02), (cfg.max_len, cfg.d_model),
                               jnp.float32)
        x = x + jnp.take(table, positions, axis=0).astype(cfg.compute_dtype)
        return Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


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
    """The two products of the backward pass, written out: differentiated automatically, XLA CPU copied
    the [tokens, vocab] gradient into a transposed layout for the kernel's product (269 thread-ms of a
    small-shape step on a 2-core CPU, `benchmarks/profile_step.py --textbook-head`); written as
    [D, vocab] = yᵀ g, it transposes y [tokens, D] instead."""
    y, kernel = residuals
    dy = _product("btv,dv->btd", g, kernel, dtype)
    dkernel = _product("btd,btv->dv", y, g, dtype)
    return dy.astype(y.dtype), dkernel.astype(kernel.dtype)


_project.defvjp(_project_forward, _project_backward)


class OutputProjection(nn.Module):
    """The untied pre-softmax projection (model.tie_output=False); parameters as nn.Dense's (a "kernel")."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, y):
        cfg = self.config
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (cfg.d_model, cfg.vocab_size), jnp.float32)
        return output_logits(y, kernel, cfg.compute_dtype)


class Transformer(nn.Module):
    """Encoder–decoder Transformer (Figure 1). `__call__(src, tgt_in)` returns float32 logits [B,T,vocab]."""

    config: TransformerConfig
    record_weights: bool = False  # sow every attention's weights into "intermediates" (for plots)

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(stddev=cfg.d_model ** -0.5)  # unit variance after the √d_model scale
        make_embed = lambda name: nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init,  # noqa: E731
                                           dtype=cfg.compute_dtype, param_dtype=jnp.float32, name=name)
        source_embed = make_embed("shared_embedding" if cfg.share_embeddings else "source_embedding")
        target_embed = source_embed if cfg.share_embeddings else make_embed("target_embedding")
        self.target_embed = target_embed
        self.encoder_embedder = Embedder(cfg, source_embed, name="encoder_embedder")
        self.decoder_embedder = Embedder(cfg, target_embed, name="decoder_embedder")
        self.encoder_layers = [EncoderLayer(cfg, self.record_weights, name=f"encoder_{i}")
                               for i in range(cfg.num_encoder_layers)]
        self.decoder_layers = [DecoderLayer(cfg, self.record_weights, name=f"decoder_{i}")
                               for i in range(cfg.num_decoder_layers)]
        if cfg.norm == "pre":  # pre-LN needs a final norm on each stack
            self.encoder_norm = nn.LayerNorm(epsilon=1e-6, dtype=cfg.compute_dtype, param_dtype=jnp.float32)
            self.decoder_norm = nn.LayerNorm(epsilon=1e-6, dtype=cfg.compute_dtype, param_dtype=jnp.float32)
        if not cfg.tie_output:
            self.output_projection = OutputProjection(cfg, name="output_projection")

    def encode(self, src, *, src_segments=None, src_positions=None, deterministic=True):
        """src [B,S] int tokens (PAD = config.pad_id) -> encoded [B,S,D]."""
        cfg = self.config
        src_valid = src != cfg.pad_id
        lengths = None  # right padding as lengths, for cuDNN; packed segments have only the dense mask
        if src_segments is not None:
            mask = segment_mask(src_segments, src_segments)
        else:
            mask = padding_mask(None, src_valid)
            lengths = key_value_lengths(src_valid)
        x = self.encoder_embedder(src, src_positions, deterministic=deterministic)
        for layer in self.encoder_layers:
            x = layer(x, mask, deterministic=deterministic, key_lengths=lengths)
        if cfg.norm == "pre":
            x = self.encoder_norm(x)
        return x

    def decode(self, encoded, src_mask, tgt_in, *, tgt_segments=None, src_segments=None, tgt_positions=None,
               deterministic=True, decode=False, beams=1):
        """Logits [B,T,vocab] (float32) for decoder input tgt_in [B,T] given encoded [B,S,D].

        src_mask [B,S] is True on real source tokens. With decode=True, tgt_in is one token [B,1]; pass the
        encoder output on the first step and encoded=None afterwards (its keys/values are then cached).
        On those later steps, `beams` > 1 says tgt_in holds `beams` consecutive rows per sentence
        ([B*beams, 1]) while src_mask and the cross-attention cache hold one row per sentence ([B, ...]);
        the self-attention cache is then the slot cache of `beam_search_cache`.
        """
        cfg = self.config
        # Structured restatements of the masks, for cuDNN (right padding): causal alone matches the dense
        # self-attention mask on every real target position (padding comes after them, so a causal real
        # query never sees it); padded positions carry no loss.
        is_causal, memory_lengths = False, None
        if decode:
            self_mask = None  # the cache's own step mask applies
            cross_mask = src_mask[:, None, None, :]
        elif tgt_segments is not None:
            self_mask = _combine(segment_mask(tgt_segments, tgt_segments), causal_mask(tgt_in.shape[1]))
            cross_mask = segment_mask(tgt_segments, src_segments)
        else:
            self_mask = _combine(causal_mask(tgt_in.shape[1]), padding_mask(None, tgt_in != cfg.pad_id))
            cross_mask = src_mask[:, None, None, :]
            is_causal, memory_lengths = True, key_value_lengths(src_mask)
        y = self.decoder_embedder(tgt_in, tgt_positions, deterministic=deterministic, decode=decode)
        for layer in self.decoder_layers:
            y = layer(y, encoded, self_mask, cross_mask, deterministic=deterministic, decode=decode,
                      is_causal=is_causal, memory_lengths=memory_lengths, beams=beams)
        if cfg.norm == "pre":
            y = self.decoder_norm(y)
        if cfg.tie_output:  # the pre-softmax projection shares the embedding (3.4)
            return output_logits(y, self.target_embed.embedding.T, cfg.compute_dtype)
        return self.output_projection(y)

    def __call__(self, src, tgt_in, *, src_segments=None, tgt_segments=None, src_positions=None,
                 tgt_positions=None, deterministic=True):
        encoded = self.encode(src, src_segments=src_segments, src_positions=src_positions,
                              deterministic=deterministic)
        return self.decode(encoded, src != self.config.pad_id, tgt_in, tgt_segments=tgt_segments,
                           src_segments=src_segments, tgt_positions=tgt_positions, deterministic=deterministic)


def init_params(config: TransformerConfig, rng: jax.Array, src_len: int = 8, tgt_len: int = 8):
    """Freshly initialised float32 parameters ({"params": ...})."""
    model = Transformer(config)
    src = jnp.ones((1, src_len), jnp.int32)
    tgt = jnp.ones((1, tgt_len), jnp.int32)
    return model.init(rng, src, tgt)


def init_cache(config: TransformerConfig, batch_size: int, src_len: int, max_decode_len: int):
    """An empty decode cache for `batch_size` rows, `src_len` source positions, `max_decode_len` steps."""
    if max_decode_len > config.max_len:
        raise ValueError(f"max_decode_len={max_decode_len} exceeds the model's max_len={config.max_len}")
    model = Transformer(config)
    encoded = jnp.zeros((batch_size, src_len, config.d_model), config.compute_dtype)
    src_mask = jnp.ones((batch_size, src_len), bool)
    tgt = jnp.zeros((batch_size, max_decode_len), jnp.int32)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), encoded, src_mask, tgt, decode=True, method=Transformer.decode))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])


def beam_search_cache(cache, beams: int):
    """Turn the cache of a first decode step on B rows (one per sentence) into the cache of beam steps
    (`Transformer.decode(..., beams=K)` on B*K rows): every self-attention position gets K slots, each
    holding the first step's entry (keys [B, H, L, d] -> [B, H, d, L*K], values -> [B, H, L*K, d]), plus
    `beam_slots` [B, K, L] (see `MultiHeadAttention._beam_self_attention`); cross-attention keys/values stay
    one per sentence."""
    def convert(tree):
        if not isinstance(tree, Mapping):
            return tree
        tree = {name: convert(sub) for name, sub in tree.items()}
        if "cached_key" in tree:
            key, value = tree["cached_key"], tree["cached_value"]  # [B, H, L, d]
            b, h, length = key.shape[:3]
            key = jnp.swapaxes(key, 2, 3)  # [B, H, d, L]
            tree["cached_key"] = jnp.broadcast_to(key[..., None], key.shape + (beams,)).reshape(
                b, h, key.shape[2], length * beams)
            tree["cached_value"] = jnp.broadcast_to(value[:, :, :, None], (b, h, length, beams) + value.shape[3:]
                                                    ).reshape(b, h, length * beams, value.shape[3])
            tree["beam_slots"] = jnp.zeros((b, beams, length), jnp.int32)
        return tree
    return convert(cache)


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
