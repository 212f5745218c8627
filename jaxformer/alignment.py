"""Word alignments from cross-attention, as fairseq's --print-alignment gives them: each target piece is
aligned to the source piece that one decoder layer's cross-attention, averaged over its heads, weighs most
when that target piece is predicted (source EOS excluded). Indices count sentencepiece pieces from 0."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.data import BOS_ID, EOS_ID, PAD_ID
from jaxformer.model import Transformer, TransformerConfig, unwrap

__all__ = ["hard_alignments"]


@functools.lru_cache(maxsize=16)
def _compiled_cross_attention(config: TransformerConfig, layer: int):
    model = Transformer(config, record_weights=True)

    def cross_attention(variables, src, tgt_in):
        _, state = model.apply(variables, src, tgt_in, mutable=["intermediates"])
        weights = state["intermediates"][f"decoder_{layer}"]["cross_attention"]["attention_weights"][0]  # [B,H,T,S]
        return jnp.mean(weights.astype(jnp.float32), axis=1)

    return jax.jit(cross_attention)


def hard_alignments(model: Transformer, params, src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]],
                    *, layer: int = -1, batch_size: int = 64) -> list[list[tuple[int, int]]]:
    """Per pair of source and target ids (without EOS): [(i, j)] for each target piece j, in order, with i the
    source piece it is aligned to; [] for an empty source or target. `layer` is a decoder layer (negative
    counts from the last, fairseq's default)."""
    config = model.config
    layers = config.num_decoder_layers
    if not -layers <= layer < layers:
        raise ValueError(f"alignment layer {layer} is out of range: the model has {layers} decoder layers")
    if len(src_ids) != len(tgt_ids):
        raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets to align")
    fn = _compiled_cross_attention(config, layer % layers)
    variables = {"params": unwrap(params)}
    limit = config.max_len - 1
    out: list[list[tuple[int, int]]] = [[] for _ in src_ids]
    todo = sorted((n for n in range(len(src_ids)) if src_ids[n] and tgt_ids[n]),
                  key=lambda n: -max(len(src_ids[n]), len(tgt_ids[n])))
    width = lambda n: min(-(-(n + 1) // 8) * 8, config.max_len)  # noqa: E731 - a few shapes
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        sources = [list(src_ids[n])[:limit] for n in chunk]
        targets = [list(tgt_ids[n])[:limit] for n in chunk]
        src = np.full((len(chunk), width(max(map(len, sources)))), PAD_ID, np.int32)
        tgt_in = np.full((len(chunk), width(max(map(len, targets)))), PAD_ID, np.int32)
        for row, (s, t) in enumerate(zip(sources, targets)):
            src[row, :len(s) + 1] = s + [EOS_ID]
            tgt_in[row, :len(t) + 1] = [BOS_ID] + t
        weights = np.asarray(fn(variables, src, tgt_in))  # [B,T,S]: target position j predicts target piece j
        for row, n in enumerate(chunk):
            best = weights[row, :len(targets[row]), :len(sources[row])].argmax(axis=-1)
            out[n] = [(int(i), j) for j, i in enumerate(best)]
    return out
