"""Where every parameter of `jaxformer.model.Transformer` lives, for the code that moves weights in and out.

`parameters(config)` lists each one as a `Param`: its '/'-joined path in the params tree, its shape, and its
`kind`, which says what its axes are and how it becomes a torch `nn.Linear`-style [out, in] array (the
layout Marian and CTranslate2 share; `to_linear` / `from_linear`). `sublayers(config)` groups the layers'
parameters by residual sub-layer, in the model's order, so that a converter names each group once.
The activation names and their spellings in transformers and CTranslate2 are here too.

model.py defines these names (its `name=` arguments); tests/test_structure.py checks that this table lists
exactly the parameters `init_params` makes, with their shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np
from flax import linen as nn


@dataclasses.dataclass(frozen=True)
class Activation:
    """An FFN activation: the function, and its name in transformers' ACT2FN and CTranslate2's Activation."""

    function: Callable
    transformers: str
    ctranslate2: str


# model.activation -> the activation; gelu is the exact (erf) one, CTranslate2's GELU; swish is SiLU.
ACTIVATIONS = {
    "relu": Activation(nn.relu, "relu", "RELU"),
    "swish": Activation(nn.swish, "swish", "SWISH"),
    "gelu": Activation(functools.partial(nn.gelu, approximate=False), "gelu", "GELU"),
}


@dataclasses.dataclass(frozen=True)
class Kind:
    """How a parameter's axes read: its d_model axis (None: it has none) and its [out, in] Linear form."""

    feature_axis: int | None
    to_linear: Callable[[np.ndarray], np.ndarray]
    from_linear: Callable[[np.ndarray, int], np.ndarray]  # (linear array, number of heads) -> ours


_same = Kind(None, lambda x: x, lambda w, h: w)
KINDS = {
    "proj_in": Kind(0, lambda x: x.reshape(x.shape[0], -1).T,                # [D, H, K] -> [H*K, D]
                    lambda w, h: w.T.reshape(w.shape[1], h, -1)),
    "head_bias": Kind(None, lambda x: x.reshape(-1), lambda w, h: w.reshape(h, -1)),   # [H, K] -> [H*K]
    "proj_out": Kind(-1, lambda x: x.reshape(-1, x.shape[-1]).T,             # [H, K, D] -> [D, H*K]
                     lambda w, h: w.T.reshape(h, -1, w.shape[0])),
    "features": Kind(0, _same.to_linear, _same.from_linear),                 # [D]
    "fc1": Kind(0, lambda x: x.T, lambda w, h: w.T),                         # [D, F] -> [F, D]
    "plain": _same,                                                          # [F]
    "fc2": Kind(-1, lambda x: x.T, lambda w, h: w.T),                        # [F, D] -> [D, F]
    "embedding": Kind(-1, _same.to_linear, _same.from_linear),               # [V, D]
    "positions": Kind(-1, _same.to_linear, _same.from_linear),               # [L, D]
    "output": Kind(0, lambda x: x.T, lambda w, h: w.T),                      # [D, V] -> [V, D]
    "vocabulary": _same,                                                     # [V]
}


def to_linear(kind: str, array) -> np.ndarray:
    return KINDS[kind].to_linear(np.asarray(array))


def from_linear(kind: str, array, num_heads: int) -> np.ndarray:
    return KINDS[kind].from_linear(np.asarray(array), num_heads)


@dataclasses.dataclass(frozen=True)
class Param:
    path: str           # '/'-joined, in the params tree
    shape: tuple[int, ...]
    kind: str           # a key of KINDS
    module: str = ""    # within a sub-layer: query, key, value, out, wi, wo or norm
    field: str = ""     # kernel, bias or scale


@dataclasses.dataclass(frozen=True)
class SubLayer:
    """One residual sub-layer: its module and its LayerNorm."""

    stack: str          # "encoder" or "decoder"
    index: int          # the layer's
    kind: str           # "self_attention", "cross_attention" or "ffn"
    params: tuple[Param, ...]  # the module's, then its norm's


_BLOCKS = {"encoder": (("self_attention", "attention_block"), ("ffn", "ffn_block")),
           "decoder": (("self_attention", "self_attention_block"), ("cross_attention", "cross_attention_block"),
                       ("ffn", "ffn_block"))}


def _norm(scope: str, d: int) -> list[Param]:
    return [Param(f"{scope}/scale", (d,), "features", "norm", "scale"),
            Param(f"{scope}/bias", (d,), "features", "norm", "bias")]


def _attention(config, scope: str) -> list[Param]:
    d, h, bias = config.d_model, config.num_heads, bool(config.attention_bias)
    out = []
    for name, size in (("query", config.head_dim_k), ("key", config.head_dim_k), ("value", config.head_dim_v)):
        out.append(Param(f"{scope}/{name}/kernel", (d, h, size), "proj_in", name, "kernel"))
        if bias:
            out.append(Param(f"{scope}/{name}/bias", (h, size), "head_bias", name, "bias"))
    out.append(Param(f"{scope}/out/kernel", (h, config.head_dim_v, d), "proj_out", "out", "kernel"))
    if bias:
        out.append(Param(f"{scope}/out/bias", (d,), "features", "out", "bias"))
    return out


def _ffn(config, scope: str) -> list[Param]:
    d, f = config.d_model, config.d_ff
    return [Param(f"{scope}/wi/kernel", (d, f), "fc1", "wi", "kernel"),
            Param(f"{scope}/wi/bias", (f,), "plain", "wi", "bias"),
            Param(f"{scope}/wo/kernel", (f, d), "fc2", "wo", "kernel"),
            Param(f"{scope}/wo/bias", (d,), "features", "wo", "bias")]


def sublayers(config) -> list[SubLayer]:
    """Every residual sub-layer of the encoder's, then the decoder's layers, in order."""
    out = []
    for stack, count in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
        for i in range(count):
            for kind, block in _BLOCKS[stack]:
                scope = f"{stack}_{i}/{kind}"
                module = _ffn(config, scope) if kind == "ffn" else _attention(config, scope)
                norm = _norm(f"{stack}_{i}/{block}/norm", config.d_model)
                out.append(SubLayer(stack, i, kind, tuple(module + norm)))
    return out


def embeddings(config) -> tuple[str, str]:
    """The paths of the source and the target embedding (one path when they are shared)."""
    if config.share_embeddings:
        return "shared_embedding/embedding", "shared_embedding/embedding"
    return "source_embedding/embedding", "target_embedding/embedding"


OUTPUT = "output_projection/kernel"  # the untied pre-softmax projection [D, V]
LOGITS_BIAS = "final_logits_bias"    # [V]


def positions(stack: str) -> str:
    """The learned position table of "encoder" or "decoder" (model.positional="learned")."""
    return f"{stack}_embedder/positions"


def final_norm(stack: str) -> str:
    """The LayerNorm after the last layer of "encoder" or "decoder" (model.norm="pre")."""
    return f"{stack}_norm"


def parameters(config) -> list[Param]:
    """Every parameter of the model `config` describes: embeddings, positions, layers, final norms, output."""
    v, d = config.vocab_size, config.d_model
    out = [Param(path, (v, d), "embedding") for path in dict.fromkeys(embeddings(config))]
    if config.positional == "learned":
        out += [Param(positions(stack), (config.max_len, d), "positions") for stack in ("encoder", "decoder")]
    for sub in sublayers(config):
        out += sub.params
    if config.norm == "pre":
        for stack in ("encoder", "decoder"):
            out += _norm(final_norm(stack), d)
    if not config.tie_output:
        out.append(Param(OUTPUT, (d, v), "output"))
    if config.logits_bias:
        out.append(Param(LOGITS_BIAS, (v,), "vocabulary"))
    return out


def shapes(config) -> dict[str, tuple[int, ...]]:
    """path -> shape of every parameter (what `init_params(config, ...)["params"]` flattens to)."""
    return {p.path: p.shape for p in parameters(config)}
