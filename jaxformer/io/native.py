"""The jaxformer export directory: a trained model, self-contained.

    out_dir/
      config.json                  {"format": "jaxformer-export", "version": 1, "model": TransformerConfig,
                                    "decode": decode settings, "data": languages etc. (optional), "files": ...}
      params.safetensors           float parameters, keys are the '/'-joined paths of the params tree
      vocab.model                  the sentencepiece vocabulary, or
      marian_vocab/                an imported Marian model's (config.json "vocab_kind": "marian", version 2;
                                   see jaxformer/data/marian_vocab.py)
      translate.jax_export         optional: serialized `jax.export` of the search of the decode settings
                                   (greedy if beam_size is 1, else beam search with their beam size and
                                   alpha), for any batch size and a fixed source length S:
                                   f({"params": ...}, src int32 [B, S]) -> tokens int32 [B, L]

`write(translator, out_dir)` writes one (to a temporary directory, renamed at the end); `read(out_dir)`
gives the `Translator` back (through `jaxformer.load`). A config.json saved before a model option existed
reads with the value that option had then (`jaxformer.config.LEGACY_MODEL_VALUES`).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import layout
from jaxformer.config import decode_settings, saved_model_values
from jaxformer.data import VOCAB_FILENAME as VOCAB_FILE
from jaxformer.io import params as params_io
from jaxformer.io.errors import ExportError
from jaxformer.model import Transformer, TransformerConfig
from jaxformer.staging import check_output_dir, staged_directory
from jaxformer.translate import Translator

log = logging.getLogger(__name__)

FORMAT = "jaxformer-export"
VERSION = 2  # 2: the vocabulary may be of another kind ("vocab_kind"); sentencepiece exports are still written as 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
JAX_EXPORT_FILE = "translate.jax_export"


def unsupported(config: TransformerConfig) -> None:
    """None: the jaxformer format holds every model jaxformer can build."""
    return None


def _plain(value):
    """ConfigDict / tuples / numpy scalars -> JSON-able values."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write(translator: Translator, out_dir: str | os.PathLike, *, jax_export: bool = False,
          jax_export_src_len: int = 64, jax_export_platforms: Sequence[str] | None = None) -> pathlib.Path:
    """Write `translator` as an export directory `out_dir`, replacing an export already there.

    Its decode settings become the directory's defaults, and the data section and BLEU tokenizer of its
    config are kept for `jaxformer evaluate`. With `jax_export=True` a `jax.export` artifact of the decode
    settings' search is written too, for sources padded to `jax_export_src_len` (any batch size), lowered
    for `jax_export_platforms` (default: the current backend; e.g. ("cpu", "cuda") for both).
    """
    config, params, tokenizer = translator.model.config, translator.params, translator.tokenizer
    if tokenizer.vocab_size != config.vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                          f"{config.vocab_size}: they do not belong together")
    if jax_export and not has_jax_export_support():
        raise ExportError("jax_export=True needs the 'flatbuffers' package (jax.export serializes with it): "
                          "pip install flatbuffers")
    out = pathlib.Path(out_dir)
    check_output_dir(out, ExportError, replaceable=is_export_dir)
    vocab_kind, vocab_name = _vocabulary_kind(tokenizer)
    version = 1 if vocab_kind == "sentencepiece" else VERSION  # older readers refuse a vocabulary they lack by it
    tree = params_io.unwrap(params)
    arrays = {key: np.ascontiguousarray(value) for key, value in params_io.flatten(tree).items()}
    settings = decode_settings(translator.decode)
    meta: dict[str, Any] = {
        "format": FORMAT, "version": version, "model": config.to_dict(), "decode": settings,
        "files": {"params": PARAMS_FILE, "vocab": vocab_name},
    }
    if vocab_kind != "sentencepiece":
        meta["vocab_kind"] = vocab_kind
    if translator.config is not None:
        meta["data"] = _plain(translator.config.data)
        if translator.config.train.get("bleu_tokenize"):
            meta["bleu_tokenize"] = str(translator.config.train.bleu_tokenize)
    with staged_directory(out, ExportError, replaceable=is_export_dir) as tmp:
        params_io.save_safetensors(arrays, tmp / PARAMS_FILE, metadata={"format": FORMAT, "version": str(version)})
        tokenizer.save(str(tmp / vocab_name))
        if jax_export:
            meta["jax_export"] = _write_jax_export(tmp, config, {"params": tree}, settings,
                                                   int(jax_export_src_len), jax_export_platforms)
            meta["files"]["jax_export"] = JAX_EXPORT_FILE
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log.info("exported %s (%d parameter arrays)", out, len(arrays))
    return out


def _vocabulary_kind(tokenizer) -> tuple[str, str]:
    """(kind, file or folder name) of a tokenizer: "sentencepiece" (vocab.model) or "marian" (marian_vocab/)."""
    from jaxformer.data import vocabulary_filename

    kind = getattr(tokenizer, "kind", "sentencepiece")
    return kind, vocabulary_filename(kind)


def has_jax_export_support() -> bool:
    """Whether `jax.export` artifacts can be (de)serialized here (they need the flatbuffers package)."""
    try:
        import flatbuffers  # noqa: F401
    except ImportError:
        return False
    return True


def _write_jax_export(out: pathlib.Path, config: TransformerConfig, variables, decode_settings, src_len: int,
                      platforms):
    from jaxformer import decode as decode_lib

    if not 1 <= src_len <= config.max_len:
        raise ExportError(f"jax_export_src_len={src_len} must be between 1 and the model's max_len={config.max_len}")
    model = Transformer(config)
    max_extra_len = int(decode_settings["max_extra_len"])
    beam_size, alpha = int(decode_settings["beam_size"]), float(decode_settings["length_penalty"])
    buffer_len = decode_lib.decode_buffer_len(src_len, config, max_extra_len=max_extra_len)
    if beam_size == 1:
        search = {"function": "greedy_search"}
        fn = jax.jit(lambda v, src: decode_lib.greedy_search(model, v, src, max_extra_len=max_extra_len))
    else:
        search = {"function": "beam_search", "beam_size": beam_size, "alpha": alpha}
        fn = jax.jit(lambda v, src: decode_lib.beam_search(model, v, src, beam_size=beam_size, alpha=alpha,
                                                           max_extra_len=max_extra_len)[0])  # tokens, not scores
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype), variables)
    batch, = jax.export.symbolic_shape("batch")
    kwargs = {"platforms": tuple(platforms)} if platforms else {}
    limit = jax.config.jax_traceback_in_locations_limit
    jax.config.update("jax_traceback_in_locations_limit", 0)  # no caller's file:line in it: the same bytes twice
    try:
        exported = jax.export.export(fn, **kwargs)(specs, jax.ShapeDtypeStruct((batch, src_len), jnp.int32))
    finally:
        jax.config.update("jax_traceback_in_locations_limit", limit)
    (out / JAX_EXPORT_FILE).write_bytes(exported.serialize())
    return {**search, "src_shape": ["batch", src_len], "output_shape": ["batch", buffer_len],
            "max_extra_len": max_extra_len, "platforms": list(exported.platforms),
            "call": "jaxformer.io.native.load_jax_export(dir)({'params': params}, src) -> tokens"}


def is_export_dir(path: str | os.PathLike) -> bool:
    path = pathlib.Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_FILE).is_file()


def load_export_config(path: str | os.PathLike) -> dict:
    """The parsed config.json of an export directory (checked to be one)."""
    path = pathlib.Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ExportError(f"{path} is not an exported model: {CONFIG_FILE} is missing "
                          f"(write one with `jaxformer export --workdir RUN --out {path}`)")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{config_file} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT or "model" not in meta:
        raise ExportError(f"{config_file} is not a jaxformer export (format {meta.get('format')!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise ExportError(f"{config_file} has export version {meta['version']}; this jaxformer reads up to {VERSION}")
    return meta


def read(path: str | os.PathLike) -> Translator:
    """The `Translator` of an export directory; its params are {"params": ...} of float arrays."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from jaxformer.config import default_config
    from jaxformer.data import load_vocabulary

    path = pathlib.Path(path)
    meta = load_export_config(path)
    files = meta.get("files", {})
    params_file, vocab_file = path / files.get("params", PARAMS_FILE), path / files.get("vocab", VOCAB_FILE)
    for f in (params_file, vocab_file):
        if not f.exists():
            raise ExportError(f"{f} is missing: the export directory {path} is incomplete")
    config = TransformerConfig.from_dict(saved_model_values(meta["model"]))
    tokenizer = load_vocabulary(str(vocab_file), meta.get("vocab_kind", "sentencepiece"))
    if tokenizer.vocab_size != config.vocab_size:
        raise ExportError(f"{vocab_file} has {tokenizer.vocab_size} pieces but the model expects "
                          f"{config.vocab_size}")
    try:
        flat = load_file(str(params_file))
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{params_file} is unreadable ({e}); export the model again") from None
    why = params_io.mismatch(layout.shapes(config), {k: tuple(v.shape) for k, v in flat.items()})
    if why:
        raise ExportError(f"{params_file} does not match the model in its config.json: {why}")
    tree = params_io.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    run_config = default_config()  # what the export kept of its run: data files and languages, BLEU tokenizer
    for key, value in (meta.get("data") or {}).items():
        if key in run_config.data:
            run_config.data[key] = tuple(value) if isinstance(run_config.data[key], tuple) else value
    if meta.get("bleu_tokenize"):
        run_config.train.bleu_tokenize = meta["bleu_tokenize"]
    return Translator(Transformer(config), {"params": tree}, tokenizer, meta.get("decode", {}), str(path),
                      config=run_config)


def load_jax_export(path: str | os.PathLike):
    """The serialized search function of an export directory: f({"params": ...}, src [B, S]) -> tokens [B, L].

    S is fixed at export time (see config.json's "jax_export"); pad sources (tokens + EOS) with PAD to it."""
    path = pathlib.Path(path)
    artifact = path / JAX_EXPORT_FILE
    if not artifact.is_file():
        raise ExportError(f"{artifact} is missing: export with jax_export=True (`jaxformer export --jax-export`)")
    exported = jax.export.deserialize(bytearray(artifact.read_bytes()))
    return exported.call
