"""Lines of input as the commands read them: a pipe or terminal line by line as it comes (each line answered
at once), a file in large chunks with a progress bar. Shared by `jaxformer translate` and `jaxformer parse`."""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["input_batches", "stream_fd", "progress", "lines_as_they_come", "chunks", "count_lines", "read_lines"]


def input_batches(stack: contextlib.ExitStack, path: str, batch_size: int, quiet: bool = False):
    """(batches of lines, a progress bar to update) for `--input path` ("-": stdin), opened on `stack`: a
    terminal or pipe in batches of what has arrived, a file in chunks of 32 batches."""
    stream = stream_fd(sys.stdin) if path == "-" else None
    total = None if path == "-" else count_lines(path)
    if stream is not None:
        batches = lines_as_they_come(stream, 32 * batch_size)
    else:
        source = sys.stdin if path == "-" else stack.enter_context(open(path, encoding="utf-8"))
        batches = chunks(source, 32 * batch_size)
    return batches, stack.enter_context(progress(total, batch_size, quiet))


def stream_fd(stdin) -> int | None:
    """stdin's descriptor where it is a terminal or a pipe; None for a file (or a stand-in without one)."""
    import io
    import stat

    try:
        fd = stdin.fileno()
    except (AttributeError, io.UnsupportedOperation, ValueError):
        return None
    return None if stat.S_ISREG(os.fstat(fd).st_mode) else fd


def progress(total: int | None, batch_size: int, quiet: bool):
    """A tqdm bar on stderr for a file of more than a few batches (`--quiet`: none)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=" lines", file=sys.stderr, dynamic_ncols=True,
                disable=quiet or total is None or total <= 4 * batch_size)


def lines_as_they_come(fd: int, size: int, wait: float = 0.01):
    """Lines of a pipe or terminal in batches of what has arrived: wait for a line, then take every line
    already there (up to `size`, and whatever comes within `wait` seconds), so that a person typing one line,
    or a program writing one and waiting for its answer, gets it at once."""
    import select

    pending, lines = b"", []
    while True:
        if lines and (len(lines) >= size or not select.select([fd], [], [], wait)[0]):
            yield lines[:size]
            lines = lines[size:]
            continue
        data = os.read(fd, 1 << 16)
        if not data:
            break
        *complete, pending = (pending + data).split(b"\n")
        lines += [line.decode("utf-8").rstrip("\r") for line in complete]
    if pending:
        lines.append(pending.decode("utf-8").rstrip("\r"))
    while lines:
        yield lines[:size]
        lines = lines[size:]


def chunks(lines, size: int):
    chunk = []
    for line in lines:
        chunk.append(line.rstrip("\r\n"))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def read_lines(path: str | os.PathLike) -> list[str]:
    """One sentence per line (trailing newline stripped, nothing else); undecodable bytes read as U+FFFD."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\r\n") for line in f]
