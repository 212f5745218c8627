"""A jaxformer model as a CTranslate2 model directory, for fast serving on CPU and GPU.

    out_dir/
      model.bin, config.json, shared_vocabulary.json   written by CTranslate2's own converter
      sentencepiece.model                               our vocabulary, to tokenize for it
      jaxformer.json                                    the model config, the decode settings and the
                                                        `Translator.translate_batch` options closest to them
      README.md                                         the few lines that translate with it

The model is described with CTranslate2's spec API (`TransformerSpec.from_config`) and saved by its
`Converter` base class, as its Marian, fairseq and OpenNMT-py converters do: CTranslate2's binary format is
never written here. The position table is passed explicitly (our interleaved sinusoids, the "halves" layout,
or a learned table), so nothing relies on CTranslate2's own sinusoids. How its search differs from ours
(length penalty, EOS at the length limit, maximum length) is in docs/serving.md; `translate_options` gives
the options that come closest.

Needs the `ctranslate2` package (`pip install -e '.[interop]'`); importing this module does not.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from jaxformer.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from jaxformer.io.staging import staged_directory
from jaxformer.model import TransformerConfig, sinusoidal_positions

__all__ = ["write_ctranslate2", "translate_options", "CTranslate2ExportError", "SPM_FILE", "META_FILE",
           "README_FILE", "FORMAT"]

log = logging.getLogger(__name__)

FORMAT = "jaxformer-ctranslate2"
VERSION = 1
SPM_FILE = "sentencepiece.model"
META_FILE = "jaxformer.json"
README_FILE = "README.md"

# Our activation names -> CTranslate2's `common_spec.Activation` members. Our gelu is the exact (erf) one,
# CTranslate2's GELU; swish is SiLU.
_ACTIVATIONS = {"relu": "RELU", "swish": "SWISH", "gelu": "GELU"}
_LAYOUTS = ("interleaved", "halves")


class CTranslate2ExportError(ValueError):
    """The model, its vocabulary, the options or the output directory cannot give a CTranslate2 model."""


def _ctranslate2():
    try:
        import ctranslate2
    except ImportError as e:
        raise CTranslate2ExportError("writing a CTranslate2 model needs the ctranslate2 package: "
                                     "pip install -e '.[interop]' (or pip install ctranslate2)") from e
    return ctranslate2


def unsupported(config: TransformerConfig) -> str | None:
    """Why CTranslate2's TransformerSpec cannot express this model, or None when it can."""
    heads = config.num_heads
    d_k, d_v = config.head_dim_k, config.head_dim_v
    if d_k != d_v or d_k * heads != config.d_model:
        return (f"model.d_k={d_k}, model.d_v={d_v} with num_heads={heads}, d_model={config.d_model}: CTranslate2's "
                f"Transformer needs d_k = d_v = d_model / num_heads")
    activation = config.activation
    if activation not in _ACTIVATIONS:
        return f"model.activation={activation!r}: CTranslate2 export supports {', '.join(_ACTIVATIONS)}"
    if config.norm not in ("post", "pre"):
        return f"model.norm={config.norm!r}: CTranslate2 export supports 'post' and 'pre'"
    if config.positional not in ("sinusoidal", "learned"):
        return f"model.positional={config.positional!r}: CTranslate2 export supports 'sinusoidal' and 'learned'"
    layout = config.sinusoid_layout
    if config.positional == "sinusoidal" and layout not in _LAYOUTS:
        return f"model.sinusoid_layout={layout!r}: CTranslate2 export supports {', '.join(_LAYOUTS)}"
    return None


def position_table(config: TransformerConfig) -> np.ndarray:
    """The model's sinusoid table [max_len, d_model], in its own feature order (`model.sinusoid_layout`)."""
    layout = config.sinusoid_layout
    names = [n for n in inspect.signature(sinusoidal_positions).parameters if "layout" in n]
    if names:  # the model's own function knows the layouts: ask it
        return np.asarray(sinusoidal_positions(config.max_len, config.d_model, **{names[0]: layout}), np.float32)
    table = sinusoidal_positions(config.max_len, config.d_model)
    if layout == "halves":  # sin of every frequency, then cos: the same values, features reordered
        table = np.concatenate([table[:, 0::2], table[:, 1::2]], axis=1)
    return np.asarray(table, np.float32)


def translate_options(decode_settings: Mapping | None, max_len: int, longest_source: int | None = None,
                      tokenizer=None) -> dict[str, Any]:
    """`ctranslate2.Translator.translate_batch` options closest to our search with these decode settings.

    `max_len` is the model's position table; `longest_source` (tokens, without EOS) the longest source of
    the batch: our output limit is each sentence's length with EOS + decode.max_extra_len, EOS included,
    capped at max_len, and CTranslate2 takes one limit per call, without the EOS (see docs/serving.md).
    """
    from jaxformer.config import decode_settings as checked

    settings = checked(dict(decode_settings or {}))
    limit = int(max_len)
    if longest_source is not None:
        limit = min(int(longest_source) + 1 + int(settings["max_extra_len"]), limit)
    pad = tokenizer.id_to_piece(PAD_ID) if tokenizer is not None else "<pad>"
    bos = tokenizer.id_to_piece(BOS_ID) if tokenizer is not None else "<s>"
    return {
        "beam_size": int(settings["beam_size"]),
        "length_penalty": float(settings["length_penalty"]),
        "max_input_length": int(max_len),          # source tokens with EOS, as we truncate them
        "max_decoding_length": max(1, limit - 1),  # tokens before the EOS we would force at the limit
        "min_decoding_length": 0,                  # an empty translation is allowed, as in our search
        "suppress_sequences": [[pad], [bos]],      # never generated by our search (renormalised without)
    }


def _float(x) -> np.ndarray:
    """A float32 copy: CTranslate2's quantization scales its arrays in place, and the caller's stay as they are."""
    return np.array(x, dtype=np.float32, order="C", copy=True)


class _Params:
    """Read access to the params tree, naming the missing parameter in its error."""

    def __init__(self, params):
        tree = params.get("params", params) if isinstance(params, Mapping) else None
        if not isinstance(tree, Mapping):
            raise CTranslate2ExportError(f"params must be the params tree {{'params': ...}}, got "
                                         f"{type(params).__name__}")
        self.tree = tree

    def has(self, path: str) -> bool:
        node = self.tree
        for name in path.split("/"):
            if not isinstance(node, Mapping) or name not in node:
                return False
            node = node[name]
        return True

    def __call__(self, path: str) -> np.ndarray:
        if not self.has(path):
            raise CTranslate2ExportError(f"the params tree has no {path}: it does not match the model config")
        node = self.tree
        for name in path.split("/"):
            node = node[name]
        return _float(node)


def _linear(spec, weight, bias=None):
    spec.weight = _float(weight)
    if bias is not None:
        spec.bias = _float(bias)


def _layer_norm(spec, p: _Params, scope: str):
    spec.gamma = p(f"{scope}/scale")
    spec.beta = p(f"{scope}/bias")


def _projection(p: _Params, scope: str, name: str, with_bias: bool, fused_axis_heads: bool):
    """(weight [out, in], bias or None) of one attention projection, heads flattened head-major."""
    kernel = p(f"{scope}/{name}/kernel")
    if fused_axis_heads:  # query/key/value: [D, H, K] -> [H*K, D]
        weight = kernel.reshape(kernel.shape[0], -1).T
    else:  # out: [H, K, D] -> [D, H*K]
        weight = kernel.reshape(-1, kernel.shape[-1]).T
    bias = p(f"{scope}/{name}/bias").reshape(-1) if with_bias else None
    return weight, bias


def _attention(spec, p: _Params, scope: str, *, self_attention: bool, with_bias: bool):
    from ctranslate2.converters import utils
    from ctranslate2.specs import common_spec

    parts = []
    for name in ("query", "key", "value"):
        part = common_spec.LinearSpec()
        _linear(part, *_projection(p, scope, name, with_bias, True))
        parts.append(part)
    if self_attention:  # one fused [3D, D] projection, as CTranslate2's Marian converter builds it
        utils.fuse_linear(spec.linear[0], parts)
    else:  # queries from the decoder; keys and values fused, from the encoder output
        spec.linear[0].weight, spec.linear[0].bias = parts[0].weight, parts[0].bias
        utils.fuse_linear(spec.linear[1], parts[1:])
    _linear(spec.linear[-1], *_projection(p, scope, "out", with_bias, False))


def _ffn(spec, p: _Params, scope: str):
    for linear, name in ((spec.linear_0, "wi"), (spec.linear_1, "wo")):
        bias = p(f"{scope}/{name}/bias") if p.has(f"{scope}/{name}/bias") else None
        _linear(linear, p(f"{scope}/{name}/kernel").T, bias)


def _build_spec(config: TransformerConfig, params, tokenizer):
    from ctranslate2.specs import common_spec, transformer_spec

    p = _Params(params)
    spec = transformer_spec.TransformerSpec.from_config(
        (config.num_encoder_layers, config.num_decoder_layers), config.num_heads,
        pre_norm=config.norm == "pre",
        activation=getattr(common_spec.Activation, _ACTIVATIONS[config.activation]))
    # Tokens: our sentencepiece pieces, id for id; the source gets EOS appended, the decoder starts at BOS.
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    cfg = spec.config
    cfg.unk_token, cfg.bos_token, cfg.eos_token = pieces[UNK_ID], pieces[BOS_ID], pieces[EOS_ID]
    cfg.decoder_start_token = pieces[BOS_ID]
    cfg.add_source_bos, cfg.add_source_eos = False, True
    cfg.layer_norm_epsilon = float(config.layer_norm_epsilon)  # its default is 1e-5

    attention_bias = bool(config.attention_bias)
    if config.share_embeddings:
        source_embedding = target_embedding = p("shared_embedding/embedding")
    else:
        source_embedding, target_embedding = p("source_embedding/embedding"), p("target_embedding/embedding")
    sides = ((spec.encoder, "encoder", source_embedding), (spec.decoder, "decoder", target_embedding))
    for side, name, embedding in sides:
        embeddings = side.embeddings[0] if isinstance(side.embeddings, list) else side.embeddings
        embeddings.weight = embedding  # the same array on both sides: CTranslate2 aliases equal variables
        side.scale_embeddings = bool(config.scale_embeddings)
        if config.positional == "learned":
            side.position_encodings.encodings = p(f"{name}_embedder/positions")
        else:
            side.position_encodings.encodings = position_table(config)
        if config.norm == "pre":
            _layer_norm(side.layer_norm, p, f"{name}_norm")
    for i, layer in enumerate(spec.encoder.layer):
        scope = f"encoder_{i}"
        _attention(layer.self_attention, p, f"{scope}/self_attention", self_attention=True, with_bias=attention_bias)
        _layer_norm(layer.self_attention.layer_norm, p, f"{scope}/attention_block/norm")
        _ffn(layer.ffn, p, f"{scope}/ffn")
        _layer_norm(layer.ffn.layer_norm, p, f"{scope}/ffn_block/norm")
    for i, layer in enumerate(spec.decoder.layer):
        scope = f"decoder_{i}"
        _attention(layer.self_attention, p, f"{scope}/self_attention", self_attention=True, with_bias=attention_bias)
        _layer_norm(layer.self_attention.layer_norm, p, f"{scope}/self_attention_block/norm")
        _attention(layer.attention, p, f"{scope}/cross_attention", self_attention=False, with_bias=attention_bias)
        _layer_norm(layer.attention.layer_norm, p, f"{scope}/cross_attention_block/norm")
        _ffn(layer.ffn, p, f"{scope}/ffn")
        _layer_norm(layer.ffn.layer_norm, p, f"{scope}/ffn_block/norm")
    output = target_embedding if config.tie_output else p("output_projection/kernel").T
    logits_bias = p("final_logits_bias") if config.logits_bias else None
    _linear(spec.decoder.projection, output, logits_bias)
    return spec


def _check_output_dir(out: pathlib.Path) -> None:
    if out.exists() and not out.is_dir():
        raise CTranslate2ExportError(f"{out} exists and is not a directory; give a new directory to write to")
    if out.is_dir() and any(out.iterdir()):
        raise CTranslate2ExportError(f"{out} exists and is not empty; give a new (or empty) directory to write to")


def write_ctranslate2(out_dir: str | os.PathLike, config: TransformerConfig, params, tokenizer,
                      decode_settings: Mapping | None = None, *, quantization: str = "float32") -> pathlib.Path:
    """Write the model as a CTranslate2 model directory `out_dir` (new, or an empty directory).

    `params` is the params tree ({"params": ...}), `tokenizer` our sentencepiece `Tokenizer`,
    `decode_settings` the decode section (beam size, length penalty, max_extra_len) whose closest CTranslate2
    options go into jaxformer.json and README.md. `quantization` is CTranslate2's weight type (float32, int8,
    int16, float16, bfloat16, int8_float16, ...; it can be changed again at load time with `compute_type`).
    Everything is written into a temporary sibling directory renamed into place at the end, so a failure
    leaves nothing behind; bad input raises CTranslate2ExportError with one line saying what to change.
    """
    from jaxformer.config import decode_settings as checked_decode_settings

    ctranslate2 = _ctranslate2()
    from ctranslate2.converters.converter import Converter
    from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES

    if quantization not in ACCEPTED_MODEL_TYPES:
        raise CTranslate2ExportError(f"unknown quantization {quantization!r}; choose one of "
                                     f"{', '.join(ACCEPTED_MODEL_TYPES)}")
    out = pathlib.Path(out_dir)
    _check_output_dir(out)
    if tokenizer is None or not hasattr(tokenizer, "id_to_piece"):
        raise CTranslate2ExportError("no vocabulary: a CTranslate2 model needs the model's sentencepiece tokenizer "
                                     "(the run's or export's vocab.model)")
    if tokenizer.vocab_size != config.vocab_size:
        raise CTranslate2ExportError(f"the vocabulary has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                                     f"{config.vocab_size}: they do not belong together")
    why = unsupported(config)
    if why is not None:
        raise CTranslate2ExportError(f"cannot export to CTranslate2: {why}")
    try:
        settings = checked_decode_settings(dict(decode_settings or {}))
    except (TypeError, ValueError) as e:
        raise CTranslate2ExportError(f"decode settings: {e}") from e
    spec = _build_spec(config, params, tokenizer)

    class _SpecConverter(Converter):
        """CTranslate2's converter base class around a spec built above: it validates, aliases equal
        variables (the shared embeddings), quantizes and saves."""

        def _load(self):
            return spec

    with staged_directory(out) as tmp:
        # CTranslate2's converter writes into a folder it creates itself
        tmp.rmdir()
        try:
            _SpecConverter().convert(str(tmp), quantization=quantization)
        except (ValueError, RuntimeError, NotImplementedError) as e:
            raise CTranslate2ExportError(f"CTranslate2 refused the model: {e}") from e
        tokenizer.save(str(tmp / SPM_FILE))
        options = translate_options(settings, config.max_len, tokenizer=tokenizer)
        meta = {"format": FORMAT, "version": VERSION, "quantization": quantization,
                "ctranslate2_version": ctranslate2.__version__, "model": config.to_dict(), "decode": settings,
                "translate_options": options, "files": {"vocab": SPM_FILE}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (tmp / README_FILE).write_text(_readme(out.name, quantization, settings, options))
    log.info("wrote CTranslate2 model %s (%s)", out, quantization)
    return out


def _readme(name: str, quantization: str, settings: Mapping, options: Mapping) -> str:
    option_lines = "".join(f"    {key}={value!r},\n" for key, value in options.items())
    return f"""# {name}: a jaxformer model for CTranslate2

Written by `jaxformer export --format ctranslate2` (weights: {quantization}). Translate with it:

```python
import ctranslate2
import sentencepiece as spm

sp = spm.SentencePieceProcessor(model_file="{name}/{SPM_FILE}")
translator = ctranslate2.Translator("{name}", device="cpu")  # or device="cuda"
sources = ["A man is riding a horse."]
results = translator.translate_batch(
    [sp.encode(s, out_type=str) for s in sources],
{option_lines})
print([sp.decode(r.hypotheses[0]) for r in results])
```

On an AMD CPU, set `CT2_USE_MKL=1` before importing ctranslate2 for int8 weights: its default int8 backend
there (oneDNN) translated wrongly on an AVX2 EPYC (jaxformer's docs/serving.md).

Those options are the ones closest to jaxformer's search with the model's decode settings
(beam {settings['beam_size']}, length penalty {settings['length_penalty']}, max_extra_len {settings['max_extra_len']}).
The two searches still differ: CTranslate2 divides a hypothesis' log-probability by length^alpha (ours by
((5 + length) / 6)^alpha; both count the EOS), stops once beam_size hypotheses have finished, cuts a
hypothesis at max_decoding_length (ours forces and scores an EOS there), and takes one length limit per
call (ours: each source's length with EOS + max_extra_len, capped at the position table). Greedy search
(beam_size=1) gives jaxformer's translations token for token when max_decoding_length is
min(source tokens + 1 + max_extra_len, max_input_length) - 1 for every sentence of the batch.
`jaxformer.json` holds the model config and decode settings this was written from.
"""
