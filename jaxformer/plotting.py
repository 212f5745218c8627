"""Attention heat maps for one sentence, like Figures 3-5 of the paper.

`attention_maps` translates the sentence (or takes a given translation), runs the
model once more on it with `record_weights=True`, and returns every attention's
weights with the subword pieces that label them. `plot_attention` draws chosen
kinds, layers and heads as a grid of heat maps (rows: kind x layer, columns: heads)
and saves a PNG. Kinds:
  encoder  encoder self-attention, source pieces (with </s>) on both axes (the paper's figures)
  decoder  decoder self-attention, decoder input pieces (<s> + translation) on both axes
  cross    encoder-decoder attention, rows are the produced pieces (translation + </s>),
           columns the source pieces
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.data import BOS_ID, EOS_ID
from jaxformer.model import Transformer, unwrap

__all__ = ["AttentionMaps", "attention_maps", "plot_attention", "KINDS"]

KINDS = ("encoder", "decoder", "cross")


@dataclasses.dataclass
class AttentionMaps:
    source_pieces: list[str]   # source + </s>
    input_pieces: list[str]    # <s> + translation (decoder inputs)
    output_pieces: list[str]   # translation + </s> (what each decoder position produced)
    translation: str
    weights: dict[str, list[np.ndarray]]  # kind -> per layer [H, queries, keys]

    def labels(self, kind: str) -> tuple[list[str], list[str]]:
        """(row labels, column labels) of a kind's maps."""
        return {"encoder": (self.source_pieces, self.source_pieces),
                "decoder": (self.input_pieces, self.input_pieces),
                "cross": (self.output_pieces, self.source_pieces)}[kind]


def _piece(tokenizer, i: int) -> str:
    if i == EOS_ID:
        return "</s>"
    if i == BOS_ID:
        return "<s>"
    return tokenizer.id_to_piece(i)


def attention_maps(model: Transformer, params, tokenizer, sentence: str, *, translation: str | None = None,
                   beam_size: int = 4, alpha: float = 0.6) -> AttentionMaps:
    """All attention weights of the model on `sentence` and its translation (decoded if not given)."""
    from jaxformer import translate as translate_lib

    config = model.config
    src_ids = tokenizer.encode([sentence])[0][: config.max_len - 1]
    if translation is None:
        out_ids = translate_lib.translate_ids(model, params, [src_ids], beam_size=beam_size, length_penalty=alpha,
                                              batch_size=1)[0]
    else:
        out_ids = tokenizer.encode_target([translation])[0]
    out_ids = out_ids[: config.max_len - 1]
    src = jnp.asarray([src_ids + [EOS_ID]], jnp.int32)
    tgt_in = jnp.asarray([[BOS_ID] + out_ids], jnp.int32)
    _, state = Transformer(config, record_weights=True).apply(
        {"params": unwrap(params)}, src, tgt_in, mutable=["intermediates"])
    inter = state["intermediates"]
    get = lambda name, kind: np.asarray(jax.device_get(inter[name][kind]["attention_weights"][0][0]))  # noqa: E731
    weights = {
        "encoder": [get(f"encoder_{i}", "self_attention") for i in range(config.num_encoder_layers)],
        "decoder": [get(f"decoder_{i}", "self_attention") for i in range(config.num_decoder_layers)],
        "cross": [get(f"decoder_{i}", "cross_attention") for i in range(config.num_decoder_layers)],
    }
    return AttentionMaps(
        source_pieces=[_piece(tokenizer, i) for i in src_ids + [EOS_ID]],
        input_pieces=[_piece(tokenizer, i) for i in [BOS_ID] + out_ids],
        output_pieces=[_piece(tokenizer, i) for i in out_ids + [EOS_ID]],
        translation=tokenizer.decode([out_ids])[0], weights=weights)


def _select(requested: Sequence[int] | None, count: int, what: str, default: Sequence[int]) -> list[int]:
    if requested is None or len(requested) == 0:
        return list(default)
    out = []
    for i in requested:
        if not -count <= int(i) < count:
            raise ValueError(f"{what} {i} does not exist: the model has {count} ({what}s 0..{count - 1}, "
                             f"or -1 for the last)")
        out.append(int(i) % count)
    return out


def plot_attention(maps: AttentionMaps, out: str | os.PathLike, *, kinds: Sequence[str] = ("encoder",),
                   layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                   title: str | None = None) -> pathlib.Path:
    """Save heat maps of `kinds` x `layers` (default: the last) x `heads` (default: all) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown attention kind {kind!r}; choose from {', '.join(KINDS)}")
    panels = []  # (kind, layer, head)
    for kind in kinds:
        n_layers = len(maps.weights[kind])
        if n_layers == 0:
            raise ValueError(f"the model has no {kind} layers")
        for layer in _select(layers, n_layers, "layer", [n_layers - 1]):
            n_heads = maps.weights[kind][layer].shape[0]
            panels.append([(kind, layer, h) for h in _select(heads, n_heads, "head", range(n_heads))])
    rows, cols = len(panels), max(len(p) for p in panels)
    longest = max(len(maps.source_pieces), len(maps.input_pieces))
    cell = max(2.5, 0.22 * longest + 1.0)
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows), squeeze=False)
    fontsize = max(4, min(9, int(200 / max(longest, 1))))
    for r, row in enumerate(panels):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            kind, layer, head = row[c]
            ylabels, xlabels = maps.labels(kind)
            ax.imshow(maps.weights[kind][layer][head], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_xticks(range(len(xlabels)))
            ax.set_xticklabels(xlabels, rotation=90, fontsize=fontsize)
            ax.set_yticks(range(len(ylabels)))
            ax.set_yticklabels(ylabels, fontsize=fontsize)
            ax.set_title(f"{kind} layer {layer} head {head}", fontsize=fontsize + 1)
    if title is None:
        title = f"translation: {maps.translation}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
