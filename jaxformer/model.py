"""The Transformer of Vaswani et al. (2017) as Flax linen modules.

Section numbers refer to the paper. Shapes in comments use
B batch, S source length, T target length, H heads, K key/query size per head
(d_k), V value size per head (d_v), D d_model, F d_ff.

`Transformer.encode` and `Transformer.decode` are usable alone (beam search
needs them). With `decode=True` the decoder runs one token at a time against the
key/value caches of `jaxformer.decode_cache` (the flax "cache" collection): pass
the encoder output on the first step and `encoded=None` afterwards.

Departures from the paper are named options of `TransformerConfig`, all off by
default: attention dropout, ReLU dropout, learned positions, pre-LN, untied
embeddings, biases on the attention projections, another FFN activation, an
output-logits bias, another LayerNorm epsilon, sinusoids in halves, bf16.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxformer import decode_cache
from jaxformer.attention import ATTENTION_IMPLS, attend, key_value_lengths
from jaxformer.layout import ACTIVATIONS
from jaxformer.ops import dropout, output_logits

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_CHOICES = {"positional": ("sinusoidal", "learned"), "norm": ("post", "pre"), "dtype": tuple(_DTYPES),
            "attention_impl": ATTENTION_IMPLS, "activation": tuple(ACTIVATIONS),
            "sinusoid_layout": ("interleaved", "halves")}


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
    sinusoid_layout: str = "interleaved"  # "halves": sin in the first D/2 features, cos in the rest (Marian)
    max_len: int = 512
    share_embeddings: bool = True
    tie_output: bool = True
    scale_embeddings: bool = True
    norm: str = "post"
    layer_norm_epsilon: float = 1e-6
    activation: str = "relu"  # the FFN's; "swish" and "gelu" (exact) for imported models
    attention_bias: bool = False  # biases on the query/key/value/output projections (not in the paper)
    logits_bias: bool = False  # a bias on the output logits (Marian's final_logits_bias)
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
        if not float(self.layer_norm_epsilon) > 0.0:
            bad("layer_norm_epsilon", f"must be > 0, got {self.layer_norm_epsilon!r}")
        if self.sinusoid_layout == "halves" and self.d_model % 2:
            bad("sinusoid_layout", f"'halves' needs an even d_model, got {self.d_model}")
        for key, allowed in _CHOICES.items():
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


def sinusoidal_positions(length: int, d_model: int, layout: str = "interleaved") -> np.ndarray:
    """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    layout="halves" puts the sines in the first d/2 features and the cosines in the rest (Marian, fairseq):
    the same table with its features permuted."""
    position = np.arange(length, dtype=np.float64)[:, None]
    two_i = np.arange(0, d_model, 2, dtype=np.float64)[None, :]
    angle = position / np.power(10000.0, two_i / d_model)
    sin, cos = np.sin(angle), np.cos(angle[:, : d_model // 2])
    if layout == "halves":
        return np.concatenate([sin, cos], axis=1).astype(np.float32)
    table = np.zeros((length, d_model), dtype=np.float32)
    table[:, 0::2], table[:, 1::2] = sin, cos
    return table


class Dropout(nn.Module):
    """Section 5.4's dropout, with `jaxformer.ops.dropout`'s cheaper random bits."""

    rate: float

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        if deterministic or self.rate == 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))


def _layer_norm(cfg: TransformerConfig, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                        name=name)


class MultiHeadAttention(nn.Module):
    """Section 3.2.2: h heads of d_k (queries, keys) and d_v (values), concatenated and projected to D.

    `kind` is "self" or "cross" (keys and values from `memory`, the encoder output)."""

    config: TransformerConfig
    kind: str = "self"
    record_weights: bool = False

    @nn.compact
    def __call__(self, x, memory=None, mask=None, *, deterministic=True, decode=False, is_causal=False,
                 key_lengths=None):
        """`mask` is the full boolean mask; `is_causal` / `key_lengths` [B] restate it for cuDNN (see
        `jaxformer.attention.attend`). Decode steps use the caches' own masks for self-attention."""
        cfg = self.config
        h, dk, dv = cfg.num_heads, cfg.head_dim_k, cfg.head_dim_v
        dense = lambda feats, name, axis=-1: nn.DenseGeneral(  # noqa: E731
            feats, axis=axis, use_bias=cfg.attention_bias, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
            kernel_init=nn.initializers.xavier_uniform(), name=name)
        keys_values = lambda source: (dense((h, dk), "key")(source), dense((h, dv), "value")(source))  # noqa: E731
        query = dense((h, dk), "query")(x)  # [B,T,H,K]
        if decode and self.kind == "cross":
            out = decode_cache.cross_attention_step(self, query, memory, keys_values, mask)
        elif decode:
            out = decode_cache.self_attention_step(self, query, *keys_values(x))
        else:
            key, value = keys_values(x if self.kind == "self" else memory)  # [B,S,H,K], [B,S,H,V]
            sow = (lambda w: self.sow("intermediates", "attention_weights", w)) if self.record_weights else None
            rng = None
            if not deterministic and cfg.attention_dropout_rate > 0.0:
                rng = self.make_rng("dropout")
            where = f"{'decoder' if self.kind == 'cross' or is_causal else 'encoder'} {self.kind}"
            out = attend(query, key, value, mask, impl=cfg.attention_impl, is_causal=is_causal,
                         key_lengths=key_lengths, dropout_rate=cfg.attention_dropout_rate, dropout_rng=rng,
                         sow=sow, where=where)  # [B,T,H,V]
        return dense(cfg.d_model, "out", axis=(-2, -1))(out)  # the heads concatenated, projected to D


class FeedForward(nn.Module):
    """Section 3.3: FFN(x) = max(0, x W1 + b1) W2 + b2 (ReLU; `activation` names another)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        cfg = self.config
        dense = lambda feats, name: nn.Dense(  # noqa: E731
            feats, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
            kernel_init=nn.initializers.xavier_uniform(), name=name)
        y = ACTIVATIONS[cfg.activation].function(dense(cfg.d_ff, "wi")(x))  # [B,T,F]
        y = Dropout(cfg.relu_dropout_rate)(y, deterministic=deterministic)
        return dense(cfg.d_model, "wo")(y)


class SubLayer(nn.Module):
    """Section 5.4 residual dropout around one sub-layer: LayerNorm(x + Dropout(f(x))) (post-LN, the paper's),
    or x + Dropout(f(LayerNorm(x))) with norm="pre"."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, fn: Callable, x, *, deterministic=True):
        cfg = self.config
        norm, drop = _layer_norm(cfg, "norm"), Dropout(cfg.dropout_rate)
        if cfg.norm == "pre":
            return x + drop(fn(norm(x)), deterministic=deterministic)
        return norm(x + drop(fn(x), deterministic=deterministic))


class EncoderLayer(nn.Module):
    """Section 3.1: self-attention, then the FFN, each a residual sub-layer."""

    config: TransformerConfig
    record_weights: bool = False

    @nn.compact
    def __call__(self, x, mask, *, deterministic=True, key_lengths=None):
        cfg = self.config
        attn = MultiHeadAttention(cfg, "self", self.record_weights, name="self_attention")
        ffn = FeedForward(cfg, name="ffn")
        x = SubLayer(cfg, name="attention_block")(
            lambda y: attn(y, mask=mask, deterministic=deterministic, key_lengths=key_lengths), x,
            deterministic=deterministic)
        return SubLayer(cfg, name="ffn_block")(lambda y: ffn(y, deterministic=deterministic), x,
                                               deterministic=deterministic)


class DecoderLayer(nn.Module):
    """Section 3.1: masked self-attention, attention over the encoder output, then the FFN."""

    config: TransformerConfig
    record_weights: bool = False

    @nn.compact
    def __call__(self, y, memory, self_mask, cross_mask, *, deterministic=True, decode=False, is_causal=False,
                 memory_lengths=None):
        cfg = self.config
        self_attn = MultiHeadAttention(cfg, "self", self.record_weights, name="self_attention")
        cross_attn = MultiHeadAttention(cfg, "cross", self.record_weights, name="cross_attention")
        ffn = FeedForward(cfg, name="ffn")
        y = SubLayer(cfg, name="self_attention_block")(
            lambda z: self_attn(z, mask=self_mask, deterministic=deterministic, decode=decode, is_causal=is_causal),
            y, deterministic=deterministic)
        y = SubLayer(cfg, name="cross_attention_block")(
            lambda z: cross_attn(z, memory, mask=cross_mask, deterministic=deterministic, decode=decode,
                                 key_lengths=memory_lengths),
            y, deterministic=deterministic)
        return SubLayer(cfg, name="ffn_block")(lambda z: ffn(z, deterministic=deterministic), y,
                                               deterministic=deterministic)


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
        if decode:  # one token per step: its position is the number of steps taken so far
            is_init = not self.has_variable("cache", "position")
            step = self.variable("cache", "position", lambda: jnp.array(0, dtype=jnp.int32))
            if not is_init:
                positions = jnp.broadcast_to(step.value, tokens.shape)
                step.value = step.value + 1
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if cfg.positional == "sinusoidal":
            table = jnp.asarray(sinusoidal_positions(cfg.max_len, cfg.d_model, cfg.sinusoid_layout))
        else:
            table = self.param("positions", nn.initializers.normal(stddev=0.02), (cfg.max_len, cfg.d_model),
                               jnp.float32)
        x = x + jnp.take(table, positions, axis=0).astype(cfg.compute_dtype)
        return Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class OutputProjection(nn.Module):
    """The untied pre-softmax projection (model.tie_output=False)."""

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
        self.target_embed = source_embed if cfg.share_embeddings else make_embed("target_embedding")
        self.encoder_embedder = Embedder(cfg, source_embed, name="encoder_embedder")
        self.decoder_embedder = Embedder(cfg, self.target_embed, name="decoder_embedder")
        self.encoder_layers = [EncoderLayer(cfg, self.record_weights, name=f"encoder_{i}")
                               for i in range(cfg.num_encoder_layers)]
        self.decoder_layers = [DecoderLayer(cfg, self.record_weights, name=f"decoder_{i}")
                               for i in range(cfg.num_decoder_layers)]
        if cfg.norm == "pre":  # pre-LN needs a final norm on each stack
            self.encoder_norm, self.decoder_norm = _layer_norm(cfg), _layer_norm(cfg)
        if not cfg.tie_output:
            self.output_projection = OutputProjection(cfg, name="output_projection")
        if cfg.logits_bias:
            self.final_logits_bias = self.param("final_logits_bias", nn.initializers.zeros, (cfg.vocab_size,))

    def encode(self, src, *, src_segments=None, src_positions=None, deterministic=True):
        """src [B,S] int tokens (PAD = config.pad_id) -> encoded [B,S,D]."""
        cfg = self.config
        src_valid = src != cfg.pad_id
        lengths = None  # right padding as lengths, for cuDNN; packed segments have only the dense mask
        if src_segments is not None:
            mask = nn.make_attention_mask(src_segments, src_segments, jnp.equal, dtype=bool)
        else:
            mask, lengths = src_valid[:, None, None, :], key_value_lengths(src_valid)
        x = self.encoder_embedder(src, src_positions, deterministic=deterministic)
        for layer in self.encoder_layers:
            x = layer(x, mask, deterministic=deterministic, key_lengths=lengths)
        return self.encoder_norm(x) if cfg.norm == "pre" else x

    def decode(self, encoded, src_mask, tgt_in, *, tgt_segments=None, src_segments=None, tgt_positions=None,
               deterministic=True, decode=False):
        """Logits [B,T,vocab] (float32) for decoder input tgt_in [B,T] given encoded [B,S,D].

        src_mask [B,S] is True on real source tokens. With decode=True, tgt_in is one token per row; pass
        the encoder output on the first step and encoded=None afterwards. Beam steps feed K rows per
        sentence while src_mask stays [B,S] (see `jaxformer.decode_cache`).
        """
        cfg = self.config
        # Padding comes after the real target tokens, so causal alone (is_causal, for cuDNN) matches the
        # dense self-attention mask on every real query; padded positions carry no loss.
        is_causal, memory_lengths = False, None
        if decode:
            self_mask, cross_mask = None, src_mask[:, None, None, :]  # the cache masks its own steps
        elif tgt_segments is not None:
            self_mask = nn.combine_masks(nn.make_attention_mask(tgt_segments, tgt_segments, jnp.equal, dtype=bool),
                                         nn.make_causal_mask(tgt_in, dtype=bool), dtype=bool)
            cross_mask = nn.make_attention_mask(tgt_segments, src_segments, jnp.equal, dtype=bool)
        else:
            self_mask = nn.combine_masks(nn.make_causal_mask(tgt_in, dtype=bool),
                                         (tgt_in != cfg.pad_id)[:, None, None, :], dtype=bool)
            cross_mask = src_mask[:, None, None, :]
            is_causal, memory_lengths = True, key_value_lengths(src_mask)
        y = self.decoder_embedder(tgt_in, tgt_positions, deterministic=deterministic, decode=decode)
        for layer in self.decoder_layers:
            y = layer(y, encoded, self_mask, cross_mask, deterministic=deterministic, decode=decode,
                      is_causal=is_causal, memory_lengths=memory_lengths)
        if cfg.norm == "pre":
            y = self.decoder_norm(y)
        if cfg.tie_output:  # the pre-softmax projection shares the embedding matrix (Section 3.4)
            logits = output_logits(y, self.target_embed.embedding.T, cfg.compute_dtype)
        else:
            logits = self.output_projection(y)
        return logits + self.final_logits_bias if cfg.logits_bias else logits

    def __call__(self, src, tgt_in, *, src_segments=None, tgt_segments=None, src_positions=None,
                 tgt_positions=None, deterministic=True):
        encoded = self.encode(src, src_segments=src_segments, src_positions=src_positions,
                              deterministic=deterministic)
        return self.decode(encoded, src != self.config.pad_id, tgt_in, tgt_segments=tgt_segments,
                           src_segments=src_segments, tgt_positions=tgt_positions, deterministic=deterministic)


def init_params(config: TransformerConfig, rng: jax.Array, src_len: int = 8, tgt_len: int = 8):
    """Freshly initialised float32 parameters ({"params": ...})."""
    src = jnp.ones((1, src_len), jnp.int32)
    tgt = jnp.ones((1, tgt_len), jnp.int32)
    return Transformer(config).init(rng, src, tgt)


def unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """The tree itself, from {"params": tree} (what init and checkpoints give) or the bare tree."""
    return params["params"] if "params" in params else params


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
