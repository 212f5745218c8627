"""How `jaxformer translate` reads its input: a pipe or terminal line by line as it comes, a file in large chunks
with a progress bar."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time

import pytest

from jaxformer import cli
from jaxformer.synthetic import english_words


def test_lines_as_they_come_batches_what_has_arrived_and_the_last_unfinished_line():
    read, write = os.pipe()
    batches = cli._lines_as_they_come(read, size=2)
    os.write(write, "eins\nzwei\ndrei\nvier".encode())
    assert next(batches) == ["eins", "zwei"]  # at most `size` a batch
    assert next(batches) == ["drei"]  # what had arrived; "vier" has no newline yet
    os.write(write, "\u00fc\r\n".encode()[:1])  # half of a two-byte character; the rest in a later read
    threading.Timer(0.3, os.write, (write, "\u00fc\r\n".encode()[1:])).start()
    assert next(batches) == ["vier\u00fc"]
    os.write(write, b"funf")
    os.close(write)
    assert list(batches) == [["funf"]]  # the end of input ends the last line
    os.close(read)


def read_line(stream, seconds: float) -> str:
    ready, _, _ = select.select([stream], [], [], seconds)
    assert ready, f"no output within {seconds} s"
    return stream.readline().decode("utf-8").rstrip("\n")


def test_a_piped_line_is_translated_before_the_next_one_is_sent(number_words):
    """A program that writes one line and waits for its translation gets it (the model's first batch also
    compiles the search), then the next."""
    process = subprocess.Popen([sys.executable, "-m", "jaxformer.cli", "translate", "--model",
                                str(number_words.source), "--beam-size", "1"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        expected = number_words.translate([english_words(305), english_words(12)], beam_size=1)
        process.stdin.write(f"{english_words(305)}\n".encode())
        process.stdin.flush()
        assert read_line(process.stdout, 240) == expected[0]
        started = time.monotonic()
        process.stdin.write(f"{english_words(12)}\n".encode())
        process.stdin.flush()
        assert read_line(process.stdout, 60) == expected[1]
        print(f"second line answered in {time.monotonic() - started:.2f} s")
        process.stdin.close()
        assert process.wait(timeout=60) == 0, process.stderr.read().decode()
    finally:
        process.kill()


def test_a_file_of_many_batches_gets_a_progress_bar_unless_quiet(number_words, tmp_path, capsys):
    src = tmp_path / "numbers.en"
    src.write_text("".join(english_words(n) + "\n" for n in range(9)), encoding="utf-8")
    args = ["translate", "--model", str(number_words.source), "--input", str(src), "--batch-size", "2",
            "--beam-size", "1", "--output", str(tmp_path / "out.de"), "--parallel", "split"]
    assert cli.main(args) == 0
    assert "9/9" in capsys.readouterr().err  # 9 lines, more than 4 batches of 2
    assert cli.main(args + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "out.de").read_text(encoding="utf-8").splitlines() == number_words.translate(
        [english_words(n) for n in range(9)], beam_size=1, parallel="split")


def test_input_that_is_not_utf8_stops_with_the_file_and_line(number_words, tmp_path, capsys):
    from jaxformer.lines import lines_as_they_come, read_text_lines, text_lines

    with pytest.raises(ValueError, match=r"^f.txt line 2 is not UTF-8 \(byte 0xff at byte 5\); convert it first"):
        list(text_lines([b"eins\r\n", b"zwei\xff\n"], "f.txt"))
    read, write = os.pipe()
    os.write(write, "drei\nvier\n".encode() + b"f\xfcnf\n")  # Latin-1, not UTF-8
    os.close(write)
    with pytest.raises(ValueError, match=r"^stdin line 3 is not UTF-8 \(byte 0xfc at byte 2\)"):
        list(lines_as_they_come(read, size=8))
    os.close(read)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("one two\r\n".encode() + "caf\u00e9\n".encode("latin-1"))
    good = tmp_path / "good.txt"
    good.write_text("eins zwei\ncafe\n", encoding="utf-8")
    assert read_text_lines(good) == ["eins zwei", "cafe"]
    model = str(number_words.source)
    for command in (["translate", "--model", model, "--input", str(bad)],
                    ["translate", "--model", model, "--input", str(good), "--prefix", str(bad)],
                    ["score", "--model", model, "--src", str(good), "--tgt", str(bad)]):
        assert cli.main(command) == 1
        err = capsys.readouterr().err.strip()
        assert err == f"error: {bad} line 2 is not UTF-8 (byte 0xe9 at byte 4); convert it first, e.g. iconv -f " \
                      f"LATIN1 -t UTF-8", command
