"""Lines of input as the commands read them: a pipe or terminal line by line as it comes (each line answered
at once), a file in large chunks with a progress bar. Shared by `jaxformer translate` and `jaxformer parse`.
Input the commands answer line for line must be UTF-8: a line that is not stops them with one line naming the
file and the line (`text_lines`); `read_lines` is lenient (U+FFFD, counted by evaluate)."""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["input_batches", "stream_fd", "progress", "lines_as_they_come", "chunks", "count_lines", "read_lines",
           "text_lines", "read_text_lines"]


def input_batches(stack: contextlib.ExitStack, path: str, batch_size: int, quiet: bool = False):
    """(batches of lines, a progress bar to update) for `--input path` ("-": stdin), opened on `stack`: a
    terminal or pipe in batches of what has arrived, a file in chunks of 32 batches."""
    stream = stream_fd(sys.stdin) if path == "-" else None
    total = None if path == "-" else count_lines(path)
    if stream is not None:
        batches = lines_as_they_come(stream, 32 * batch_size)
    else:
        if path != "-":
            source = text_lines(stack.enter_context(open(path, "rb")), path)
        else:  # a file on stdin; a text stand-in without bytes (a test's) as it is
            source = text_lines(sys.stdin.buffer, "stdin") if hasattr(sys.stdin, "buffer") else sys.stdin
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


def lines_as_they_come(fd: int, size: int, wait: float = 0.01, name: str = "stdin"):
    """Lines of a pipe or terminal in batches of what has arrived: wait for a line, then take every line
    already there (up to `size`, and whatever comes within `wait` seconds), so that a person typing one line,
    or a program writing one and waiting for its answer, gets it at once."""
    import select

    pending, lines, number = b"", [], 0
    while True:
        if lines and (len(lines) >= size or not select.select([fd], [], [], wait)[0]):
            yield lines[:size]
            lines = lines[size:]
            continue
        data = os.read(fd, 1 << 16)
        if not data:
            break
        *complete, pending = (pending + data).split(b"\n")
        lines += text_lines(complete, name, number + 1)
        number += len(complete)
    if pending:
        lines += text_lines([pending], name, number + 1)
    while lines:
        yield lines[:size]
        lines = lines[size:]


def text_lines(raw_lines, name: str, first: int = 1):
    """Lines given as bytes, decoded, without their line ends; a ValueError naming `name` and the line (counted
    from `first`) for one that is not UTF-8."""
    for number, raw in enumerate(raw_lines, start=first):
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"{name} line {number} is not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); "
                             f"convert it first, e.g. iconv -f LATIN1 -t UTF-8") from None


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """A file's lines (`text_lines`: one line of error for one that is not UTF-8)."""
    with open(path, "rb") as f:
        return list(text_lines(f, str(path)))


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
