"""A training run directory as a model: its config, its vocabulary and its (averaged) checkpoints."""

from __future__ import annotations

import logging
import os
import pathlib

from jaxformer import checkpoint
from jaxformer.model import Transformer, TransformerConfig
from jaxformer.run_config import load_run_config
from jaxformer.translate import Translator

log = logging.getLogger(__name__)


def is_run_dir(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / checkpoint.CHECKPOINT_DIR).is_dir()


def validation_choice(path: str | os.PathLike, *, step: int | None = None, average_last: int | None = None,
                      best: bool = False, average_best: int | None = None,
                      average_from_best: int | None = None) -> dict[str, int]:
    """The checkpoints a load asks for by validation, as `read`'s keywords: {"best": K} for `best` (K=1) or
    `average_best` = K (the K best), {"from_best": K} for `average_from_best` = K (the best and the K - 1 kept
    after it), {} for none; a one-line error for choices that conflict or a path that is not a training
    workdir."""
    given = [name for name, value in (("--best", best), ("--average-best", average_best),
                                      ("--average-from-best", average_from_best)) if value not in (None, False)]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} each choose the checkpoints by validation: give one of them")
    for name, value in (("--average-best", average_best), ("--average-from-best", average_from_best)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not given:
        return {}
    if step is not None or average_last is not None:
        raise ValueError(f"{given[0]} chooses checkpoints by validation, --average-last / --step by recency: give "
                         f"one of them")
    if not is_run_dir(path):
        raise ValueError(f"{path} is not a training workdir (no checkpoints/): {given[0]} chooses among a run's "
                         f"checkpoints")
    return {"from_best": int(average_from_best)} if average_from_best else {"best": 1 if best else int(average_best)}


def read(workdir: str | os.PathLike, *, step: int | None = None, average_last: int | None = None,
         best: int = 0, from_best: int = 0) -> Translator:
    """The `Translator` of a trained run.

    `average_last=None` is the run's own default: the average of its last `train.average_last` checkpoints
    (fewer if fewer were kept), or with `step` that step's checkpoint alone. An explicit `average_last`
    must be met. The paper reports averaged models. `best` = K: the average of the K best checkpoints by
    the run's validation metric (K=1: the best one); `from_best` = K: the best and the K - 1 kept after it
    (see `validation_choice`).
    """
    from jaxformer.data import get_tokenizer
    from jaxformer.data.vocabulary import RUN_VOCABULARIES

    config = load_run_config(workdir)
    vocab = pathlib.Path(workdir) / checkpoint.VOCAB_FILE
    if not any((pathlib.Path(workdir) / name).exists() for name in RUN_VOCABULARIES):
        raise checkpoint.CheckpointError(f"{vocab} not found (nor {', '.join(RUN_VOCABULARIES[1:])}): the run's "
                                         f"vocabulary is missing")
    tokenizer = get_tokenizer(config, str(workdir))
    default = average_last is None and not best and not from_best
    if best or from_best:
        params, steps = checkpoint.load_averaged(workdir, step=step, average_last=average_last or 1, best=best,
                                                 from_best=from_best)
        log.info("%s: %s by validation: steps %s", workdir, f"the {best} best checkpoint(s)" if best else
                 f"the best checkpoint and the {from_best - 1} after it", steps)
    else:
        if default:
            average_last = 1 if step is not None else max(1, int(config.train.average_last))
        params, steps = checkpoint.load_averaged(workdir, step=step, average_last=average_last, allow_fewer=default)
    if default and average_last > 1:
        log.info("%s: averaged checkpoint steps %s (the run's train.average_last=%d; --average-last overrides)",
                 workdir, steps, average_last)
    rows = _vocab_rows(params)
    if rows is not None and rows != tokenizer.vocab_size:
        raise checkpoint.CheckpointError(f"{tokenizer.path or vocab} has {tokenizer.vocab_size} pieces but the "
                                         f"checkpoint's embedding has {rows} rows: the vocabulary does not belong "
                                         f"to this run")
    model = Transformer(TransformerConfig.from_dict(config.model.to_dict(), vocab_size=tokenizer.vocab_size))
    return Translator(model, params, tokenizer, config.decode.to_dict(), str(workdir), list(steps), config)


def _vocab_rows(params) -> int | None:
    inner = params.get("params", {}) if isinstance(params, dict) else {}
    for name in ("shared_embedding", "target_embedding"):
        if name in inner and "embedding" in inner[name]:
            return int(inner[name]["embedding"].shape[0])
    return None
