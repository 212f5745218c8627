"""Models in and out of jaxformer, in one place.

    translator = jaxformer.load("runs/multi30k")      # a run directory: its averaged checkpoints
    translator = jaxformer.load("exports/multi30k")   # an export directory (jaxformer's own format)
    jaxformer.io.export(translator, "exports/ct2", format="ctranslate2")

`load` recognises what a path holds by its files; each format is one module here (`runs`, `native`, ...).
Data flows one way: these modules read and write files and build a `jaxformer.translate.Translator`;
nothing below them imports them.
"""

from __future__ import annotations

import os
import pathlib

from jaxformer.io import native, runs
from jaxformer.translate import Translator

__all__ = ["load", "export", "FORMATS"]

FORMATS = ("jaxformer",)


def load(path: str | os.PathLike, *, step: int | None = None, average_last: int | None = None) -> Translator:
    """The `Translator` of a run directory (by default the average of its last `train.average_last`
    checkpoints; `step` / `average_last` choose others) or of an export directory."""
    path = pathlib.Path(path)
    if native.is_export_dir(path):
        if step is not None or average_last not in (None, 1):
            raise ValueError(f"{path} is an exported model (one set of parameters): --step/--average-last apply "
                             f"only to a training workdir")
        return native.read(path)
    if runs.is_run_dir(path):
        return runs.read(path, step=step, average_last=average_last)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give an export directory or a training workdir")
    raise FileNotFoundError(f"{path} is neither an exported model (config.json + params.safetensors) nor a "
                            f"training workdir (checkpoints/)")


def export(translator: Translator, out_dir: str | os.PathLike, *, format: str = "jaxformer",
           **options) -> pathlib.Path:
    """Write `translator` to `out_dir` in `format` (one of FORMATS); `options` go to that format's writer."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    return native.write(translator, out_dir, **options)
