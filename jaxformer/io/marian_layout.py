"""What jaxformer's Transformer and Hugging Face's `MarianMTModel` have in common, stated once for both ways.

`parameter_map(config)` names the layers' parameters of `jaxformer.layout`'s table as (jaxformer path, Marian
state-dict key, kind); `to_marian` and `from_marian` convert one array of a kind (the table's [out, in] form),
given a feature order: Marian's sinusoids put sin in the first
half of the d_model features and cos in the second, where jaxformer's default layout interleaves them, so
a model with `sinusoid_layout="interleaved"` is exported with the d_model axis of every tensor permuted
(`feature_order`): an exact equivalence, since LayerNorm and the residual sums treat every feature alike.
Vocabulary rows (embeddings, the logits bias) are permuted by `jaxformer.data.marian_vocab.IdMap`.

`marian_config(config, ...)` and `transformer_config(marian, ...)` translate the model settings; what one
side cannot express is refused with one line naming the option (`MarianFormatError`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from jaxformer import layout
from jaxformer.io.errors import ExportError

__all__ = ["MarianFormatError", "feature_order", "parameter_map", "to_marian", "from_marian", "marian_shape",
           "marian_config", "transformer_config", "unsupported", "embedding_sources", "vocabulary_parameters",
           "POSITION_KEYS"]

# transformers' ACT2FN name -> jaxformer activation ("swish" and "silu" are the same function there)
_FROM_MARIAN_ACTIVATION = {**{a.transformers: name for name, a in layout.ACTIVATIONS.items()}, "silu": "swish"}
POSITION_KEYS = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")
LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default, which MarianMTModel uses (not configurable)


class MarianFormatError(ExportError):
    """A model or file that the Marian format (or this converter) cannot express; one line, naming it."""


def feature_order(d_model: int, sinusoid_layout: str) -> np.ndarray:
    """Marian feature j is jaxformer feature order[j]."""
    if sinusoid_layout == "halves":
        return np.arange(d_model)
    if d_model % 2:
        raise MarianFormatError(f"model.d_model={d_model} is odd: the interleaved sinusoids cannot be reordered into "
                                f"Marian's halves")
    return np.concatenate([np.arange(0, d_model, 2), np.arange(1, d_model, 2)])


def _permute(kind: str, x: np.ndarray, order: np.ndarray) -> np.ndarray:
    """`x` with its d_model axis (the kind's, if any) reordered by `order`."""
    axis = layout.KINDS[kind].feature_axis
    return x if axis is None else np.take(x, order, axis=axis)


def marian_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Marian shape of a jaxformer array of `shape` (vocabulary kinds: one row fewer, PAD's)."""
    linear = layout.to_linear(kind, np.broadcast_to(np.float32(0), shape)).shape
    if kind in ("embedding", "output"):
        return (linear[0] - 1, *linear[1:])
    return tuple(linear)


def to_marian(kind: str, array: np.ndarray, order: np.ndarray, num_heads: int) -> np.ndarray:
    return np.ascontiguousarray(layout.to_linear(kind, _permute(kind, np.asarray(array), order)))


def from_marian(kind: str, array: np.ndarray, order: np.ndarray, num_heads: int) -> np.ndarray:
    ours = layout.from_linear(kind, np.asarray(array), num_heads)
    return np.ascontiguousarray(_permute(kind, ours, np.argsort(order)))


# sub-layer kind -> (Marian module, its LayerNorm); a module of a sub-layer -> its Marian name
_SUBLAYERS = {"self_attention": ("self_attn.", "self_attn_layer_norm"),
              "cross_attention": ("encoder_attn.", "encoder_attn_layer_norm"), "ffn": ("", "final_layer_norm")}
_MODULES = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj", "wi": "fc1", "wo": "fc2"}


def parameter_map(config) -> list[tuple[str, str, str]]:
    """(jaxformer '/'-joined path, Marian key, kind) of every weight of the layers (`jaxformer.layout`), the
    vocabulary-indexed ones aside (embeddings, output projection, logits bias: see `vocabulary_parameters`).
    Attention biases are listed only when `config.attention_bias` (Marian always has them; the exporter
    writes zeros otherwise)."""
    out: list[tuple[str, str, str]] = []
    for sub in layout.sublayers(config):
        module, norm = _SUBLAYERS[sub.kind]
        prefix = f"model.{sub.stack}.layers.{sub.index}."
        for param in sub.params:
            field = "weight" if param.field in ("kernel", "scale") else "bias"
            name = norm if param.module == "norm" else module + _MODULES[param.module]
            out.append((param.path, f"{prefix}{name}.{field}", param.kind))
    return out


def attention_bias_map(config) -> list[tuple[str, str, str]]:
    """The attention-bias entries (for a model without them: the Marian keys the exporter fills with zeros)."""
    return [entry for entry in parameter_map(dataclasses.replace(config, attention_bias=True))
            if entry[0].endswith("/bias") and ("attention/" in entry[0])]


SHARED, ENCODER_EMBED, DECODER_EMBED, LM_HEAD = ("model.shared.weight", "model.encoder.embed_tokens.weight",
                                                 "model.decoder.embed_tokens.weight", "lm_head.weight")


def vocabulary_parameters(config) -> list[tuple[str, str, str]]:
    """(jaxformer path, Marian key, kind) of the embeddings and the output layer, as the exporter writes them.

    transformers ties the encoder's and decoder's embeddings to `model.shared` only while
    tie_word_embeddings is true (version 5; version 4 always did): a shared embedding with an untied output
    layer is therefore written under all three names."""
    source, target = layout.embeddings(config)
    if config.share_embeddings and config.tie_output:
        out = [(source, SHARED, "embedding")]
    elif config.share_embeddings:
        out = [(source, key, "embedding") for key in (SHARED, ENCODER_EMBED, DECODER_EMBED)]
    else:
        out = [(source, ENCODER_EMBED, "embedding"), (target, DECODER_EMBED, "embedding")]
    if not config.tie_output:
        out.append((layout.OUTPUT, LM_HEAD, "output"))
    return out


def embedding_sources(marian: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> tuple[str, str, str | None]:
    """The state-dict keys transformers' MarianMTModel takes its (encoder embedding, decoder embedding,
    output layer) from, given config.json and the keys present (None: the output layer is tied)."""
    def first(*keys):
        return next((k for k in keys if k in weights), keys[0])

    tie = marian.get("tie_word_embeddings", True)
    if marian.get("share_encoder_decoder_embeddings", True) and tie:
        shared = first(SHARED, ENCODER_EMBED, DECODER_EMBED)
        return shared, shared, None
    if tie:  # separate embeddings, the output layer tied to the decoder's
        return first(ENCODER_EMBED, SHARED), first(DECODER_EMBED, SHARED), None
    return first(ENCODER_EMBED, SHARED), first(DECODER_EMBED, SHARED), LM_HEAD


# ------------------------------------------------------------------------------------------------- config

def unsupported(config) -> str | None:
    """The first option of a jaxformer model that MarianMTModel cannot express, as a one-line reason."""
    if config.norm != "post":
        return f"model.norm={config.norm!r}: MarianMTModel is post-LN only"
    if config.positional != "sinusoidal":
        return f"model.positional={config.positional!r}: MarianMTModel has static sinusoidal positions only"
    if config.d_model % config.num_heads:
        return f"model.d_model={config.d_model} is not divisible by model.num_heads={config.num_heads}"
    head = config.d_model // config.num_heads
    if config.head_dim_k != head or config.head_dim_v != head:
        return (f"model.d_k={config.d_k} / model.d_v={config.d_v}: MarianMTModel's heads have d_model / num_heads = "
                f"{head} features")
    if config.activation not in layout.ACTIVATIONS:
        return f"model.activation={config.activation!r} has no transformers equivalent"
    if config.sinusoid_layout not in ("interleaved", "halves"):
        return f"model.sinusoid_layout={config.sinusoid_layout!r} is unknown"
    return None


def marian_config(config, *, marian_vocab_size: int, eos: int, pad: int) -> dict[str, Any]:
    """config.json of the MarianMTModel equal to `config` (every field written out, none left to defaults)."""
    reason = unsupported(config)
    if reason:
        raise MarianFormatError(f"cannot export to Marian: {reason}")
    return {
        "architectures": ["MarianMTModel"], "model_type": "marian",
        "vocab_size": marian_vocab_size, "decoder_vocab_size": marian_vocab_size,
        "d_model": config.d_model,
        "encoder_layers": config.num_encoder_layers, "decoder_layers": config.num_decoder_layers,
        "encoder_attention_heads": config.num_heads, "decoder_attention_heads": config.num_heads,
        "encoder_ffn_dim": config.d_ff, "decoder_ffn_dim": config.d_ff,
        "max_position_embeddings": config.max_len,
        "activation_function": layout.ACTIVATIONS[config.activation].transformers,
        "scale_embedding": bool(config.scale_embeddings),
        "static_position_embeddings": True,
        "share_encoder_decoder_embeddings": bool(config.share_embeddings),
        "tie_word_embeddings": bool(config.tie_output),
        "dropout": config.dropout_rate, "attention_dropout": config.attention_dropout_rate,
        "activation_dropout": config.relu_dropout_rate,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "init_std": 0.02,
        "normalize_before": False, "add_final_layer_norm": False, "normalize_embedding": False,
        "is_encoder_decoder": True, "is_decoder": False, "use_cache": True,
        "pad_token_id": pad, "decoder_start_token_id": pad, "eos_token_id": eos, "forced_eos_token_id": eos,
        "bos_token_id": None, "dtype": "float32",
    }


def _get(marian: Mapping[str, Any], key: str, default: Any, where: str) -> Any:
    value = marian.get(key, default)
    if value is None and default is not None:
        raise MarianFormatError(f"{where}: {key} is null")
    return value


def transformer_config(marian: Mapping[str, Any], *, vocab_size: int, where: str, share_embeddings: bool,
                       tie_output: bool) -> dict[str, Any]:
    """TransformerConfig fields (a dict) of the model a Marian config.json describes; `vocab_size` is
    jaxformer's (Marian's + 1); whether the embeddings are one matrix and the output layer tied to it
    comes from the weights (`embedding_sources`). Defaults are `MarianConfig`'s, so a config.json that leaves a
    key out means what transformers reads from it (its activation default is gelu, not opus-mt's swish)."""
    def need(ok: bool, what: str):
        if not ok:
            raise MarianFormatError(f"{where}: {what}")

    need(marian.get("model_type", "marian") == "marian",
         f"model_type is {marian.get('model_type')!r}; only Marian (MarianMTModel) models are imported")
    activation = str(_get(marian, "activation_function", "gelu", where))
    need(activation in _FROM_MARIAN_ACTIVATION,
         f"activation_function {activation!r} is not supported (jaxformer has relu, swish/silu and exact gelu)")
    heads = int(_get(marian, "encoder_attention_heads", 16, where))
    need(int(_get(marian, "decoder_attention_heads", 16, where)) == heads,
         "encoder_attention_heads and decoder_attention_heads differ; jaxformer has one model.num_heads")
    d_ff = int(_get(marian, "encoder_ffn_dim", 4096, where))
    need(int(_get(marian, "decoder_ffn_dim", 4096, where)) == d_ff,
         "encoder_ffn_dim and decoder_ffn_dim differ; jaxformer has one model.d_ff")
    d_model = int(_get(marian, "d_model", 1024, where))
    need(d_model % heads == 0, f"d_model={d_model} is not divisible by the {heads} attention heads")
    need(marian.get("static_position_embeddings", True) is not False,
         "static_position_embeddings is false: learned positions are not Marian's and are not supported")
    for key in ("normalize_before", "add_final_layer_norm", "normalize_embedding", "add_bias_logits"):
        need(not marian.get(key, False), f"{key} is true: that variant is not Marian's and is not supported")
    share = marian.get("share_encoder_decoder_embeddings", True)
    decoder_vocab = marian.get("decoder_vocab_size") or marian.get("vocab_size")
    need(share or decoder_vocab == marian.get("vocab_size"),
         "separate source and target vocabularies (decoder_vocab_size != vocab_size) are not supported")
    return {
        "vocab_size": vocab_size, "d_model": d_model, "d_ff": d_ff, "num_heads": heads,
        "num_encoder_layers": int(_get(marian, "encoder_layers", 12, where)),
        "num_decoder_layers": int(_get(marian, "decoder_layers", 12, where)),
        "dropout_rate": float(_get(marian, "dropout", 0.1, where)),
        "attention_dropout_rate": float(_get(marian, "attention_dropout", 0.0, where)),
        "relu_dropout_rate": float(_get(marian, "activation_dropout", 0.0, where)),
        "positional": "sinusoidal", "max_len": int(_get(marian, "max_position_embeddings", 1024, where)),
        "share_embeddings": bool(share_embeddings), "tie_output": bool(tie_output),
        "scale_embeddings": bool(marian.get("scale_embedding", False)), "norm": "post",
        "activation": _FROM_MARIAN_ACTIVATION[activation], "attention_bias": True, "logits_bias": True,
        "layer_norm_epsilon": LAYER_NORM_EPSILON, "sinusoid_layout": "halves",
    }
