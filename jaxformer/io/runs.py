"""A training run directory as a model: its config, its vocabulary and its (averaged) checkpoints."""

from __future__ import annotations

import logging
import os
import pathlib

from jaxformer import checkpoint
from jaxformer.model import Transformer, TransformerConfig
from jaxformer.translate import Translator

log = logging.getLogger(__name__)


def is_run_dir(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / checkpoint.CHECKPOINT_DIR).is_dir()


def read(workdir: str | os.PathLike, *, step: int | None = None, average_last: int | None = None) -> Translator:
    """The `Translator` of a trained run.

    `average_last=None` is the run's own default: the average of its last `train.average_last` checkpoints
    (fewer if fewer were kept), or with `step` that step's checkpoint alone. An explicit `average_last`
    must be met. The paper reports averaged models.
    """
    from jaxformer.data import get_tokenizer
    from jaxformer.data.marian_vocab import DIRNAME

    config = checkpoint.load_run_config(workdir)
    vocab = pathlib.Path(workdir) / checkpoint.VOCAB_FILE
    if not vocab.is_file() and not (pathlib.Path(workdir) / DIRNAME).is_dir():  # a fine-tuned Marian model
        raise checkpoint.CheckpointError(f"{vocab} not found: the run's vocabulary is missing")
    tokenizer = get_tokenizer(config, str(workdir))
    default = average_last is None
    if default:
        average_last = 1 if step is not None else max(1, int(config.train.average_last))
    params, steps = checkpoint.load_averaged(workdir, step=step, average_last=average_last, allow_fewer=default)
    if default and average_last > 1:
        log.info("%s: averaged checkpoint steps %s (the run's train.average_last=%d; --average-last overrides)",
                 workdir, steps, average_last)
    rows = _vocab_rows(params)
    if rows is not None and rows != tokenizer.vocab_size:
        raise checkpoint.CheckpointError(f"{vocab} has {tokenizer.vocab_size} pieces but the checkpoint's "
                                         f"embedding has {rows} rows: the vocabulary does not belong to this run")
    model = Transformer(TransformerConfig.from_dict(config.model.to_dict(), vocab_size=tokenizer.vocab_size))
    return Translator(model, params, tokenizer, config.decode.to_dict(), str(workdir), list(steps), config)


def _vocab_rows(params) -> int | None:
    inner = params.get("params", {}) if isinstance(params, dict) else {}
    for name in ("shared_embedding", "target_embedding"):
        if name in inner and "embedding" in inner[name]:
            return int(inner[name]["embedding"].shape[0])
    return None
