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

import json
import logging
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from jaxformer import layout
from jaxformer.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from jaxformer.io import params as params_io
from jaxformer.io.errors import ExportError
from jaxformer.model import TransformerConfig, sinusoidal_positions
from jaxformer.staging import check_output_dir, staged_directory

__all__ = ["write", "write_ctranslate2", "unsupported", "translate_options", "CTranslate2ExportError", "SPM_FILE",
           "META_FILE", "README_FILE", "FORMAT"]

log = logging.getLogger(__name__)

FORMAT = "jaxformer-ctranslate2"
VERSION = 1
SPM_FILE = "sentencepiece.model"
META_FILE = "jaxformer.json"
README_FILE = "README.md"
_LAYOUTS = ("interleaved", "halves")


class CTranslate2ExportError(ExportError):
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
    if activation not in layout.ACTIVATIONS:
        return f"model.activation={activation!r}: CTranslate2 export supports {', '.join(layout.ACTIVATIONS)}"
    if config.norm not in ("post", "pre"):
        return f"model.norm={config.norm!r}: CTranslate2 export supports 'post' and 'pre'"
    if config.positional not in ("sinusoidal", "learned"):
        return f"model.positional={config.positional!r}: CTranslate2 export supports 'sinusoidal' and 'learned'"
    layout_name = config.sinusoid_layout
    if config.positional == "sinusoidal" and layout_name not in _LAYOUTS:
        return f"model.sinusoid_layout={layout_name!r}: CTranslate2 export supports {', '.join(_LAYOUTS)}"
    return None


def position_table(config: TransformerConfig) -> np.ndarray:
    """The model's sinusoid table [max_len, d_model], in its own feature order (`model.sinusoid_layout`)."""
    return np.asarray(sinusoidal_positions(config.max_len, config.d_model, config.sinusoid_layout), np.float32)


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
    """The flat params, naming a missing parameter in its error."""

    def __init__(self, params):
        if not isinstance(params, Mapping) or not isinstance(params_io.unwrap(params), Mapping):
            raise CTranslate2ExportError(f"params must be the params tree {{'params': ...}}, got "
                                         f"{type(params).__name__}")
        self.flat = params_io.flatten(params)

    def __call__(self, path: str) -> np.ndarray:
        if path not in self.flat:
            raise CTranslate2ExportError(f"the params tree has no {path}: it does not match the model config")
        return _float(self.flat[path])

    def linear(self, param: layout.Param) -> np.ndarray:
        """The parameter in [out, in] Linear form (heads flattened head-major)."""
        return _float(layout.to_linear(param.kind, self(param.path)))


def _linear(spec, weight, bias=None):
    spec.weight = _float(weight)
    if bias is not None:
        spec.bias = _float(bias)


def _sublayer(layer, sub: layout.SubLayer, p: _Params):
    """One residual sub-layer of the table into its spec: the module's linears, then its LayerNorm."""
    from ctranslate2.converters import utils
    from ctranslate2.specs import common_spec

    spec = (layer.ffn if sub.kind == "ffn" else layer.self_attention if sub.kind == "self_attention"
            else layer.attention)
    weights: dict[tuple[str, str], np.ndarray] = {(q.module, q.field): p.linear(q) for q in sub.params}
    spec.layer_norm.gamma, spec.layer_norm.beta = weights["norm", "scale"], weights["norm", "bias"]
    if sub.kind == "ffn":
        _linear(spec.linear_0, weights["wi", "kernel"], weights.get(("wi", "bias")))
        _linear(spec.linear_1, weights["wo", "kernel"], weights.get(("wo", "bias")))
        return
    parts = []
    for name in ("query", "key", "value"):
        part = common_spec.LinearSpec()
        _linear(part, weights[name, "kernel"], weights.get((name, "bias")))
        parts.append(part)
    if sub.kind == "self_attention":  # one fused [3D, D] projection, as CTranslate2's Marian converter builds it
        utils.fuse_linear(spec.linear[0], parts)
    else:  # queries from the decoder; keys and values fused, from the encoder output
        spec.linear[0].weight, spec.linear[0].bias = parts[0].weight, parts[0].bias
        utils.fuse_linear(spec.linear[1], parts[1:])
    _linear(spec.linear[-1], weights["out", "kernel"], weights.get(("out", "bias")))


def _build_spec(config: TransformerConfig, params, tokenizer):
    from ctranslate2.specs import common_spec, transformer_spec

    p = _Params(params)
    spec = transformer_spec.TransformerSpec.from_config(
        (config.num_encoder_layers, config.num_decoder_layers), config.num_heads,
        pre_norm=config.norm == "pre",
        activation=getattr(common_spec.Activation, layout.ACTIVATIONS[config.activation].ctranslate2))
    # Tokens: our sentencepiece pieces, id for id; the source gets EOS appended, the decoder starts at BOS.
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    cfg = spec.config
    cfg.unk_token, cfg.bos_token, cfg.eos_token = pieces[UNK_ID], pieces[BOS_ID], pieces[EOS_ID]
    cfg.decoder_start_token = pieces[BOS_ID]
    cfg.add_source_bos, cfg.add_source_eos = False, True
    cfg.layer_norm_epsilon = float(config.layer_norm_epsilon)  # its default is 1e-5

    source, target = layout.embeddings(config)
    source_embedding = p(source)
    target_embedding = source_embedding if target == source else p(target)
    for side, stack, embedding in ((spec.encoder, "encoder", source_embedding),
                                   (spec.decoder, "decoder", target_embedding)):
        embeddings = side.embeddings[0] if isinstance(side.embeddings, list) else side.embeddings
        embeddings.weight = embedding  # the same array on both sides: CTranslate2 aliases equal variables
        side.scale_embeddings = bool(config.scale_embeddings)
        if config.positional == "learned":
            side.position_encodings.encodings = p(layout.positions(stack))
        else:
            side.position_encodings.encodings = position_table(config)
        if config.norm == "pre":
            norm = layout.final_norm(stack)
            side.layer_norm.gamma, side.layer_norm.beta = p(f"{norm}/scale"), p(f"{norm}/bias")
    for sub in layout.sublayers(config):
        _sublayer((spec.encoder if sub.stack == "encoder" else spec.decoder).layer[sub.index], sub, p)
    output = target_embedding if config.tie_output else p(layout.OUTPUT).T
    logits_bias = p(layout.LOGITS_BIAS) if config.logits_bias else None
    _linear(spec.decoder.projection, output, logits_bias)
    return spec


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
    check_output_dir(out, CTranslate2ExportError)
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

    with staged_directory(out, CTranslate2ExportError) as tmp:
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


def write(translator, out_dir: str | os.PathLike, *, quantization: str = "float32") -> pathlib.Path:
    """`write_ctranslate2` of a loaded `jaxformer.translate.Translator` (what `jaxformer.io.export` calls)."""
    return write_ctranslate2(out_dir, translator.model.config, translator.params, translator.tokenizer,
                             translator.decode, quantization=quantization)


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
