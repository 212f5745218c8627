"""A model directory written all at once: into a temporary sibling, renamed into place when complete."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil


@contextlib.contextmanager
def staged_directory(out: pathlib.Path):
    """Yield an empty temporary sibling of `out` to write into. When the block ends normally it becomes `out`
    (a directory already there is removed only after the swap); when it raises, it is removed and `out` is
    left as it was. Whether `out` may be replaced is the caller's check, made before."""
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
