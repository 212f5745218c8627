"""A jaxformer model as a Hugging Face Marian directory: `MarianMTModel`, `MarianTokenizer`, `pipeline`.

    out_dir/
      config.json              MarianConfig, every field written out (activation, scale_embedding, ids, ...)
      generation_config.json   beam size, length limit and penalty, pad never generated (bad_words_ids)
      model.safetensors        the weights under transformers' names (torch Linear layout: [out, in])
      source.spm, target.spm   sentencepiece models (a jaxformer vocabulary is both)
      vocab.json               Marian's ids: </s> 0, <unk> 1, pieces, <pad> last (the decoder start)
      tokenizer_config.json    MarianTokenizer's settings

The conversion is exact up to LayerNorm's epsilon: MarianMTModel's LayerNorms use torch's fixed 1e-5, and a
model trained here with model.layer_norm_epsilon=1e-6 (the default) keeps its weights as they are (its
logits move by ~1e-6 for unit-scale activations; tests/test_marian_export.py measures it). Ids go through
`jaxformer.data.marian_vocab.IdMap`; the d_model axis through `marian_layout.feature_order`.

What the searches share and where they differ (docs/marian.md): both mask pad/BOS and force EOS at the length
limit; transformers' beam search divides by len**length_penalty where jaxformer divides by ((5 + len) / 6)**
alpha, and its limit is one number (max_new_tokens = model.max_len) where jaxformer's is the source length +
decode.max_extra_len. `renormalize_logits` makes it renormalise after masking pad, as jaxformer does.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from jaxformer.data.marian_vocab import MarianVocab
from jaxformer.io import params as params_io
from jaxformer.io.marian_layout import (MarianFormatError, attention_bias_map, feature_order, marian_config,
                                        parameter_map, to_marian, unsupported, vocabulary_parameters)
from jaxformer.staging import check_output_dir, staged_directory

__all__ = ["write_marian", "write", "unsupported", "marian_state_dict", "MarianFormatError"]

log = logging.getLogger(__name__)


def marian_vocabulary(tokenizer) -> MarianVocab:
    """The tokenizer as a MarianVocab: itself, or the Marian form of a jaxformer sentencepiece vocabulary."""
    if getattr(tokenizer, "kind", None) == "marian":
        return tokenizer
    return MarianVocab.from_sentencepiece(tokenizer)


def marian_state_dict(config, params, vocab: MarianVocab) -> dict[str, np.ndarray]:
    """transformers' MarianMTModel state dict (float32 numpy arrays) of jaxformer `params`."""
    reason = unsupported(config)
    if reason:
        raise MarianFormatError(f"cannot export to Marian: {reason}")
    if vocab.vocab_size != config.vocab_size:
        raise MarianFormatError(f"the vocabulary has {vocab.vocab_size} ids but model.vocab_size is "
                                f"{config.vocab_size}: they do not belong together")
    flat = {k: np.asarray(v, np.float32) for k, v in params_io.flatten(params).items()}
    order = feature_order(config.d_model, config.sinusoid_layout)
    h = config.num_heads
    state: dict[str, np.ndarray] = {}
    used = set()
    for path, key, kind in parameter_map(config):
        state[key] = to_marian(kind, _take(flat, path, used), order, h)
    if not config.attention_bias:  # Marian always has projection biases: zeros are the same model
        for path, key, kind in attention_bias_map(config):
            size = config.d_model if kind == "features" else config.num_heads * config.head_dim_k
            state[key] = np.zeros(size, np.float32)
    ids = vocab.ids
    for path, key, kind in vocabulary_parameters(config):
        array = _take(flat, path, used)
        if kind == "output":  # [D, V]: vocabulary on the second axis
            state[key] = to_marian(kind, ids.rows_to_marian(array.T).T, order, h)
        else:
            state[key] = to_marian(kind, ids.rows_to_marian(array), order, h)
    if config.logits_bias:
        state["final_logits_bias"] = ids.rows_to_marian(_take(flat, "final_logits_bias", used))[None, :]
    else:
        state["final_logits_bias"] = np.zeros((1, ids.marian_size), np.float32)
    left = sorted(set(flat) - used)
    if left:
        raise MarianFormatError(f"parameters with no Marian counterpart: {', '.join(left[:5])}")
    return {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}


def _take(flat: Mapping[str, np.ndarray], path: str, used: set) -> np.ndarray:
    if path not in flat:
        raise MarianFormatError(f"the parameters have no {path}: they do not match the model config")
    used.add(path)
    return flat[path]


def generation_config(config, decode: Mapping[str, Any], ids) -> dict[str, Any]:
    """generation_config.json: jaxformer's decode settings in transformers' terms (see the module docstring)."""
    beam = int(decode.get("beam_size", 4))
    out = {"decoder_start_token_id": ids.pad, "pad_token_id": ids.pad, "eos_token_id": ids.eos,
           "forced_eos_token_id": ids.eos, "bad_words_ids": [[ids.pad]], "num_beams": beam,
           "max_new_tokens": int(config.max_len), "renormalize_logits": True, "do_sample": False}
    if beam > 1:
        out["length_penalty"] = float(decode.get("length_penalty", 0.6))
    return out


def tokenizer_config(vocab: MarianVocab, config, languages: tuple[str | None, str | None]) -> dict[str, Any]:
    return {"tokenizer_class": "MarianTokenizer", "eos_token": vocab.eos_token, "unk_token": vocab.unk_token,
            "pad_token": vocab.pad_token, "model_max_length": int(config.max_len), "separate_vocabs": False,
            "source_lang": languages[0], "target_lang": languages[1], "sp_model_kwargs": {},
            "clean_up_tokenization_spaces": False}


def write_marian(out_dir: str | os.PathLike, config, params, tokenizer, decode_settings: Mapping | None = None, *,
                 languages: tuple[str | None, str | None] = (None, None)) -> pathlib.Path:
    """Write `out_dir` (new, or an empty folder) for `MarianMTModel.from_pretrained` and `MarianTokenizer`.

    `config` is the TransformerConfig, `params` its {"params": ...} tree, `tokenizer` a jaxformer
    `Tokenizer` or a `MarianVocab` (an imported model's), `decode_settings` the model's decode settings,
    `languages` (source, target) codes for tokenizer_config.json. Refuses, naming the option, a model Marian
    cannot express (pre-LN, learned positions, d_k != d_model / num_heads). Written into a temporary folder
    and renamed, so `out_dir` never holds half an export.
    """
    from jaxformer.config import decode_settings as checked

    out = pathlib.Path(out_dir)
    check_output_dir(out, MarianFormatError)
    vocab = marian_vocabulary(tokenizer)
    ids = vocab.ids
    state = marian_state_dict(config, params, vocab)
    settings = checked(dict(decode_settings or {}))
    files = {
        "config.json": marian_config(config, marian_vocab_size=ids.marian_size, eos=ids.eos, pad=ids.pad),
        "generation_config.json": generation_config(config, settings, ids),
        "tokenizer_config.json": tokenizer_config(vocab, config, languages),
    }
    with staged_directory(out, MarianFormatError) as tmp:
        params_io.save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        vocab.write_files(tmp)
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if config.layer_norm_epsilon != 1e-5:
        log.info("MarianMTModel's LayerNorms use epsilon 1e-5; this model was trained with %g (weights unchanged)",
                 config.layer_norm_epsilon)
    log.info("wrote a Marian model (%d weights, vocabulary %d) to %s", len(state), ids.marian_size, out)
    return out


def write(translator, out_dir: str | os.PathLike) -> pathlib.Path:
    """`write_marian` of a loaded `jaxformer.translate.Translator` (what `jaxformer.io.export` dispatches to):
    its model, parameters, vocabulary, decode settings and, when it has a run config, its languages."""
    run = translator.config
    languages = (None, None)
    if run is not None:
        languages = (run.data.get("src_lang") or None, run.data.get("tgt_lang") or None)
    return write_marian(out_dir, translator.model.config, translator.params, translator.tokenizer, translator.decode,
                        languages=languages)
