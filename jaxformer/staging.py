"""An output folder, the one rule for every format and command: it must be absent or empty (or, where a
writer says so, something it may replace), and a model directory is written all at once, into a temporary
sibling renamed into place when complete."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from typing import Callable


def check_output_dir(out: pathlib.Path, error: type[Exception] = ValueError,
                     replaceable: Callable[[pathlib.Path], bool] | None = None) -> None:
    """Raise `error` unless `out` is absent, an empty directory, or one that `replaceable` accepts (a jaxformer
    export may be written over another)."""
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise error(f"{out} exists and is not a directory; give a new (or empty) directory to write to")
    if out.is_dir() and any(out.iterdir()) and not (replaceable is not None and replaceable(out)):
        what = "is not empty" if replaceable is None else "is not empty and not an export directory"
        raise error(f"{out} exists and {what}; give a new (or empty) directory to write to")


@contextlib.contextmanager
def staged_directory(out: pathlib.Path, error: type[Exception] = ValueError,
                     replaceable: Callable[[pathlib.Path], bool] | None = None):
    """Yield an empty temporary sibling of `out` to write into, once `check_output_dir` allows `out`. When the
    block ends normally it becomes `out` (a directory already there is removed only after the swap); when it
    raises, it is removed and `out` is left as it was. Writers call `check_output_dir` first as well, to fail
    before their slow work."""
    out = pathlib.Path(out)
    check_output_dir(out, error, replaceable)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
