"""Fine-tuning: training that starts from an exported model (`train.init_from`), e.g. an imported opus-mt one.

The run keeps that model's architecture and vocabulary: `resolve_config` copies the export's model options
into `config.model` (a key the config sets to something else than jaxformer's default and the model's
value is an error naming it), the run's vocabulary is the export's (saved into the workdir, so resuming,
`jaxformer translate --model RUN` and `export` find it), and the first state holds the export's parameters
with a fresh optimizer state; the learning-rate schedule, warmup included, starts again at step 0.
Dropout rates, the compute dtype and the attention implementation are training choices and come from the
config.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import pathlib

log = logging.getLogger(__name__)

__all__ = ["resolve_config", "run_tokenizer", "initial_params", "TRAINING_KEYS"]

# model.* keys that are how the model is trained, not what it is: the config's values are used.
TRAINING_KEYS = ("dropout_rate", "attention_dropout_rate", "relu_dropout_rate", "dtype", "attention_impl")


def _source(config) -> str:
    return str(config.train.get("init_from", "") or "")


def _export_meta(path: str) -> dict:
    from jaxformer.io import native

    if not pathlib.Path(path).exists():
        raise ValueError(f"train.init_from={path}: no such directory")
    if not native.is_export_dir(path):
        raise ValueError(f"train.init_from={path} is not a jaxformer export directory (config.json + "
                         f"params.safetensors); export a run with `jaxformer export`, or import a Marian model with "
                         f"`jaxformer import-marian`")
    return native.load_export_config(path)


def resolve_config(config):
    """`config` with `config.model` set to the architecture of `train.init_from` (a copy; the same config
    when the key is empty). Raises ValueError naming a `model.*` or `data.*` key that contradicts it."""
    path = _source(config)
    if not path:
        return config
    from jaxformer.config import default_config
    from jaxformer.model import TransformerConfig

    model = _export_meta(path)["model"]
    defaults = default_config().model
    field_defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    resolved = copy.deepcopy(config)
    for key, theirs in model.items():
        if key == "vocab_size" or key in TRAINING_KEYS:
            continue
        if key not in config.model:
            if theirs != field_defaults.get(key):
                raise ValueError(f"train.init_from={path}: its model has {key}={theirs!r}, which config.model "
                                 f"cannot express")
            continue
        mine = config.model[key]
        if mine != theirs and mine != defaults.get(key, mine):
            raise ValueError(f"model.{key}={mine!r} contradicts train.init_from={path}, whose model has "
                             f"{key}={theirs!r}: fine-tuning keeps the model's architecture, drop the override")
        resolved.model[key] = theirs
    if config.data.get("vocab_model"):
        raise ValueError(f"data.vocab_model={config.data.vocab_model} contradicts train.init_from={path}: the "
                         f"vocabulary is the model's; leave data.vocab_model empty")
    return resolved


def run_tokenizer(config, workdir: str | os.PathLike, *, is_chief: bool = True):
    """The vocabulary of `train.init_from`, kept in the workdir by the chief process (a workdir that already
    holds another vocabulary is an error: it belongs to another run)."""
    from jaxformer.data import load_vocabulary, run_vocabulary, vocabulary_filename
    from jaxformer.io import native

    path = _source(config)
    meta = _export_meta(path)
    kind = meta.get("vocab_kind", "sentencepiece")
    tokenizer = load_vocabulary(str(pathlib.Path(path) / meta.get("files", {}).get("vocab", native.VOCAB_FILE)),
                                kind)
    kept = run_vocabulary(str(workdir))
    if kept is not None:
        if kept.serialized != tokenizer.serialized:
            raise ValueError(f"{workdir} holds another vocabulary than train.init_from={path}: it belongs to another "
                             f"run; choose a new train.workdir")
        return kept
    if is_chief:
        tokenizer.save(os.path.join(str(workdir), vocabulary_filename(kind)))
    return tokenizer


def initial_params(config, model_config):
    """The export's {"params": ...}, checked to be the model `model_config` describes."""
    from jaxformer.io import native

    path = _source(config)
    translator = native.read(path)
    theirs = {k: v for k, v in translator.model.config.to_dict().items() if k not in TRAINING_KEYS}
    mine = {k: v for k, v in model_config.to_dict().items() if k not in TRAINING_KEYS}
    if theirs != mine:
        wrong = sorted(k for k in theirs if theirs[k] != mine.get(k))
        raise ValueError(f"train.init_from={path}: the run's model differs from it in {', '.join(wrong)}")
    log.info("fine-tuning from %s (its parameters; a fresh optimizer state and schedule)", path)
    return translator.params
