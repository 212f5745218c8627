"""Models in and out of jaxformer, in one place.

    translator = jaxformer.load("runs/multi30k")      # a run directory: its averaged checkpoints
    translator = jaxformer.load("exports/multi30k")   # an export directory (jaxformer's own format)
    jaxformer.io.export(translator, "exports/ct2", format="ctranslate2")

`load` recognises what a path holds by its files; each format is one module here: `runs` (training run
directories), `native` (jaxformer's export directory), `ctranslate2` (a CTranslate2 model for serving),
`marian_export` / `marian_import` (Hugging Face Marian directories, out and in; `marian_layout` is the
parameter map of both), `init_from` (an export as the start of a fine-tuning run). Each writer module has
`write(translator, out, **options)` and `unsupported(config)`; they share `jaxformer.staging` (the output folder:
absent or empty, written whole), `params` (the flat params) and `errors` (`ExportError`, the base of their errors).
Data flows one way: these modules read and write files and build a `jaxformer.translate.Translator`;
nothing below them imports them.
"""

from __future__ import annotations

import os
import pathlib

from jaxformer.io import ctranslate2, marian_export, native, runs
from jaxformer.io.errors import ExportError
from jaxformer.translate import Translator

__all__ = ["load", "export", "import_marian", "FORMATS", "WRITERS", "ExportError"]

# format -> its module: each has write(translator, out, **options) and unsupported(config) (None, or why not)
WRITERS = {"jaxformer": native, "ctranslate2": ctranslate2, "marian": marian_export}
FORMATS = tuple(WRITERS)


def load(path: str | os.PathLike, *, step: int | None = None, average_last: int | None = None, best: bool = False,
         average_best: int | None = None, average_from_best: int | None = None) -> Translator:
    """The `Translator` of a run directory (by default the average of its last `train.average_last`
    checkpoints; `step` / `average_last` choose others; `best` its best checkpoint by validation,
    `average_best` = K the average of its K best, `average_from_best` = K of its best and the K - 1 kept
    after it) or of an export directory."""
    path = pathlib.Path(path)
    chosen = runs.validation_choice(path, step=step, average_last=average_last, best=best,
                                    average_best=average_best, average_from_best=average_from_best)
    if chosen:
        return runs.read(path, **chosen)
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
    return WRITERS[format].write(translator, out_dir, **options)


def import_marian(source: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """A Marian / opus-mt model (a local transformers directory or a Hub id) as a jaxformer export directory."""
    from jaxformer.io.marian_import import import_marian as run_import

    return run_import(source, out_dir)
