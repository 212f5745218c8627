"""What a run records: metrics.jsonl, TensorBoard events, curves.png, train.log, and the one-line summaries."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import time
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
DROPPED_METRICS_FILE = "metrics.dropped.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"
LOG_FILE = "train.log"


def _parsed_lines(path: pathlib.Path) -> list[tuple[str, Any]]:
    """(line, parsed record or None for a line torn by a kill mid-write) for each line of a metrics.jsonl."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            out.append((line, None))
    return out


def read_records(workdir: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl written so far, in order (lines torn by a kill left out)."""
    return [r for _, r in _parsed_lines(pathlib.Path(workdir) / METRICS_FILE) if isinstance(r, dict)]


class MetricsLog:
    """metrics.jsonl (one object per record), TensorBoard events and curves.png, written by process 0.

    On resume from step s, records after s (from the part of an interrupted run that is about to be
    redone) move from metrics.jsonl to metrics.dropped.jsonl, and TensorBoard purges them, so the curves
    show one history.
    """

    def __init__(self, workdir: pathlib.Path, start_step: int, enabled: bool = True):
        self.path = workdir / METRICS_FILE
        self.curves = workdir / CURVES_FILE
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self._truncate_after(start_step)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(workdir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)

    def _truncate_after(self, step: int) -> None:
        """Move records after `step` (and torn lines) to metrics.dropped.jsonl; keep the rest in place."""
        lines = _parsed_lines(self.path)
        kept = lambda record: isinstance(record, dict) and record.get("step", 0) <= step  # noqa: E731
        keep = [line for line, r in lines if kept(r)]
        dropped = [line for line, r in lines if not kept(r)]
        if not dropped:
            return
        with open(self.path.with_name(DROPPED_METRICS_FILE), "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in dropped))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)
        log.info("%s: moved %d record(s) after step %d, which is redone now, to %s",
                 self.path, len(dropped), step, DROPPED_METRICS_FILE)

    def write(self, split: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{split}/{key}", value, step)

    def records(self) -> list[dict]:
        return read_records(self.path.parent)

    def plot(self) -> None:
        """curves.png: training and validation loss, the learning rate, and validation BLEU by step."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        series = lambda split, key: [(r["step"], r[key]) for r in records  # noqa: E731
                                     if r.get("split") == split and isinstance(r.get(key), (int, float))]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for split, key, label in (("train", "loss", "train loss (smoothed)"), ("train", "nll", "train nll"),
                                  ("valid", "loss", "valid loss (smoothed)"), ("valid", "nll", "valid nll")):
            points = series(split, key)
            if points:
                axes[0].plot(*zip(*points), label=label, marker="o" if split == "valid" else None)
        axes[0].set(xlabel="step", ylabel="loss (nats / token)", title="loss")
        axes[0].legend()
        points = series("train", "lr")
        if points:
            axes[1].plot(*zip(*points))
        axes[1].set(xlabel="step", ylabel="learning rate", title="learning rate")
        for split, label in (("valid", "valid BLEU"), ("valid_avg", "valid BLEU, averaged checkpoints")):
            points = series(split, "bleu")
            if points:
                axes[2].plot(*zip(*points), marker="o", label=label)
        axes[2].set(xlabel="step", ylabel="BLEU", title="validation BLEU")
        if axes[2].lines:
            axes[2].legend()
        fig.tight_layout()
        tmp = self.curves.with_name(f"{self.curves.stem}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.curves)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()




def fmt(values: dict) -> str:
    parts = []
    for key in ("loss", "nll", "ppl", "accuracy", "bleu", "bleu_lowercase", "bleu_moses_lc", "exact_match", "lr",
                "grad_norm", "tokens_per_sec", "eval_sentences", "eval_seconds", "eval_share"):
        if key in values:
            value = values[key]
            if key == "eval_share":
                parts.append(f"{key} {value:.1%} of the run so far")
            else:
                parts.append(f"{key} {value:.3g}" if key in ("lr", "ppl") else f"{key} {value:.4g}")
    return ", ".join(parts)


@contextlib.contextmanager
def log_to_file(path: pathlib.Path):
    """Everything jaxformer logs during the run also goes to workdir/train.log."""
    logger = logging.getLogger("jaxformer")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        handler.close()
