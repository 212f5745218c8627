"""Choosing a model by validation: the best step so far, the K best checkpoints, and early stopping.

`Choice` is the bookkeeping a run keeps across validations. It is plain JSON (`state_dict`), written into
every checkpoint's meta item, so a resumed run continues with the best-so-far state of the step it resumes
from, and readers (`--best`, `--average-best`) rank the kept checkpoints with the values it recorded.
An improvement is strictly better than the best so far (ties keep the earlier step), as fairseq's patience.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from jaxformer.config import BEST_METRICS as HIGHER_IS_BETTER, DECODED_METRICS

log = logging.getLogger(__name__)


def resolve_metric(train_cfg, parser: bool = False) -> str:
    """train.best_metric, with "auto" as the score of decoded validation sentences when the run decodes them
    (BLEU; a parser's parseval F1), else the NLL. A decoded-sentence metric the model does not produce (BLEU
    of a parser, F1 of a translator), or bleu_moses_lc without train.valid_tok_refs, is a ValueError."""
    metric = str(train_cfg.get("best_metric", "auto"))
    decoded = "f1" if parser else "bleu"
    if metric == "auto":
        return decoded if int(train_cfg.get("eval_bleu_sentences", 0)) != 0 else "nll"  # -1: all, N: first N
    if metric in DECODED_METRICS and (metric == "f1") != parser:
        raise ValueError(f"train.best_metric={metric!r}: a {'parser' if parser else 'translation model'}'s "
                         f"validation scores its decoded sentences by {decoded}, not {metric}")
    if metric == "bleu_moses_lc" and not train_cfg.get("valid_tok_refs"):
        raise ValueError("train.best_metric='bleu_moses_lc' needs train.valid_tok_refs (the valid split's "
                         "lowercased Moses-tokenized references)")
    return metric


def _better(metric: str, value: float, than: float | None) -> bool:
    if not math.isfinite(value):
        return False
    if than is None:
        return True
    return value > than if HIGHER_IS_BETTER[metric] else value < than


@dataclasses.dataclass
class Choice:
    """The validations seen so far and what they decide."""

    metric: str
    patience: int = 0  # validations without improvement before stopping; 0: never stop early
    best_step: int | None = None
    best_value: float | None = None
    since_best: int = 0  # validations since the best one
    values: dict = dataclasses.field(default_factory=dict)  # step -> the metric at its validation
    stopped_at: int | None = None  # the step early stopping ended the run at

    def update(self, step: int, value: float) -> bool:
        """Record the validation of `step`; whether it improved on the best so far."""
        value = float(value)
        self.values[int(step)] = value
        improved = _better(self.metric, value, self.best_value)
        if improved:
            self.best_step, self.best_value, self.since_best = int(step), value, 0
        else:
            self.since_best += 1
        if self.patience and self.since_best >= self.patience:
            self.stopped_at = int(step)
        return improved

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None

    def ranked(self, steps) -> list[int]:
        """Those of `steps` that were validated, best first (ties: the earlier step first)."""
        sign = -1.0 if HIGHER_IS_BETTER[self.metric] else 1.0
        scored = [s for s in steps if s in self.values and math.isfinite(self.values[s])]
        return sorted(scored, key=lambda s: (sign * self.values[s], s))

    def describe(self) -> str:
        if self.best_step is None:
            return f"no finite validation {self.metric} yet"
        return f"best step {self.best_step} with {self.metric} {self.best_value:.4g}"

    def record(self) -> dict:
        """What metrics.jsonl says of the best step at a validation."""
        return {"best_step": self.best_step, f"best_{self.metric}": self.best_value,
                "validations_since_best": self.since_best}

    def end(self, step: int, steps: int, minutes: float | None = None) -> tuple[dict, str]:
        """Why the run stopped at `step` (train.steps = `steps`; `minutes`: the time budget it spent, when that
        stopped it): a metrics.jsonl record and a log line."""
        if self.should_stop:
            kind, reason = "early_stopping", (f"early stopping at step {self.stopped_at}: {self.since_best} "
                                              f"validation(s) without improvement "
                                              f"(train.early_stopping_patience={self.patience})")
        elif minutes is not None:
            kind, reason = "time", f"train.stop_after_minutes={minutes:g} spent at step {step} of {steps}"
        else:
            kind, reason = "steps", f"step {step} of train.steps={steps} reached"
        return {"reason": kind, **self.record()}, f"stopped: {reason}; {self.describe()}"

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best_step": self.best_step, "best_value": self.best_value,
                "since_best": self.since_best, "stopped_at": self.stopped_at,
                "values": [[s, v] for s, v in sorted(self.values.items())]}

    @classmethod
    def from_state_dict(cls, state: dict, *, patience: int = 0) -> Choice:
        """The saved bookkeeping; `patience` is the current run's (a resumed run may change it)."""
        choice = cls(metric=state["metric"], patience=int(patience), best_step=state.get("best_step"),
                     best_value=state.get("best_value"), since_best=int(state.get("since_best", 0)),
                     values={int(s): float(v) for s, v in state.get("values", [])})
        if patience and choice.since_best >= patience:
            choice.stopped_at = state.get("stopped_at") or max(choice.values, default=None)
        return choice


def best_first(choice: Choice | None, kept, count: int, run) -> list[int]:
    """The run's `count` best steps by `choice`, best first; a one-line error unless all are `kept`."""
    wanted = choice.ranked(choice.values)[:count] if choice else []
    if not choice or choice.best_step not in kept:
        where = f" (its best, step {choice.best_step}, was not kept)" if choice and choice.best_step else ""
        raise ValueError(f"{run} recorded no best checkpoint{where}: train it with train.keep_best >= 1, or "
                         f"choose by --average-last / --step")
    have = [s for s in wanted if s in kept]
    if len(have) < count:
        raise ValueError(f"{run} keeps {len(have)} of the {count} best checkpoints by validation {choice.metric} "
                         f"asked for ({len(choice.values)} validations); lower --average-best or train with "
                         f"train.keep_best >= {count}")
    log.info("%s: the best checkpoints by validation %s: %s", run, choice.metric,
             ", ".join(f"step {s} ({choice.values[s]:.4g})" for s in wanted))
    return wanted


def resumed(train_cfg, saved: dict | None, parser: bool = False) -> Choice:
    """The bookkeeping a run starts with: the checkpoint's (`saved`), or a fresh one; fresh too when the run
    now chooses by another metric (values of two metrics do not compare)."""
    metric, patience = resolve_metric(train_cfg, parser), int(train_cfg.get("early_stopping_patience", 0))
    if saved:
        choice = Choice.from_state_dict(saved, patience=patience)
        if choice.metric == metric:
            return choice
        log.warning("train.best_metric is %s but the run chose by %s until now: its best is forgotten", metric,
                    choice.metric)
    return Choice(metric=metric, patience=patience)
