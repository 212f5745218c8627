"""The offline default task: English number words -> German number words.

A genuine, if small, translation task that needs no download: the German side
reorders units before tens ("twenty-one" -> "einundzwanzig") and writes the whole
number as one compound word, so the model has to learn reordering and
subword composition, and BLEU on it means something.

Conventions (0 <= n < 1,000,000):
  English: lower case, "twenty-one" with a hyphen, no "and", words separated by
    spaces: 105 -> "one hundred five", 321405 -> "three hundred twenty-one thousand
    four hundred five", 0 -> "zero".
  German: one word, lower case, with an explicit "ein" before hundert and tausend: 100 -> "einhundert",
    101 -> "einhunderteins", 1000 -> "eintausend", 21000 -> "einundzwanzigtausend",
    0 -> "null". A final 1 is "eins" (101 -> "einhunderteins"), otherwise "ein"
    (einundzwanzig, einhundert, eintausend); ß in "dreißig".
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["english_words", "german_words", "write_synthetic", "synthetic_files"]

_EN_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
            "seventeen", "eighteen", "nineteen"]
_EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

# German units as used before "und"/"hundert"/"tausend" (so 1 is "ein"); final 1 is "eins".
_DE_ONES = ["", "ein", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun",
            "zehn", "elf", "zwölf", "dreizehn", "vierzehn", "fünfzehn", "sechzehn",
            "siebzehn", "achtzehn", "neunzehn"]
_DE_TENS = ["", "", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig",
            "achtzig", "neunzig"]

LIMIT = 1_000_000


def _check(n: int) -> None:
    if not (isinstance(n, (int, np.integer)) and 0 <= n < LIMIT):
        raise ValueError(f"number words are defined for integers 0 <= n < {LIMIT:,}, got {n!r}")


def _en_below_1000(n: int) -> list[str]:
    words = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_EN_ONES[hundreds], "hundred"]
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        words.append(_EN_TENS[tens] + (f"-{_EN_ONES[ones]}" if ones else ""))
    elif rest:
        words.append(_EN_ONES[rest])
    return words


def english_words(n: int) -> str:
    """`n` in English words: 321405 -> 'three hundred twenty-one thousand four hundred five'."""
    _check(n)
    if n == 0:
        return "zero"
    thousands, rest = divmod(int(n), 1000)
    words = []
    if thousands:
        words += _en_below_1000(thousands) + ["thousand"]
    words += _en_below_1000(rest)
    return " ".join(words)


def _de_below_1000(n: int, final: bool) -> str:
    """German for 1 <= n < 1000; `final`: the number ends here (a trailing 1 is 'eins')."""
    hundreds, rest = divmod(n, 100)
    out = (_DE_ONES[hundreds] + "hundert") if hundreds else ""
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        out += (_DE_ONES[ones] + "und" if ones else "") + _DE_TENS[tens]
    elif rest:
        out += "eins" if (rest == 1 and final) else _DE_ONES[rest]
    return out


def german_words(n: int) -> str:
    """`n` as one German word: 321405 -> 'dreihunderteinundzwanzigtausendvierhundertfünf'."""
    _check(n)
    if n == 0:
        return "null"
    thousands, rest = divmod(int(n), 1000)
    out = (_de_below_1000(thousands, final=False) + "tausend") if thousands else ""
    if rest:
        out += _de_below_1000(rest, final=True)
    return out


def _sample_numbers(count: int, rng: np.random.Generator) -> list[int]:
    """`count` distinct numbers, log-uniform-ish: the digit count is uniform over 1..6,
    then the value is uniform within it, so 7 and 734,512 are both common."""
    if count > LIMIT // 2:
        raise ValueError(f"at most {LIMIT // 2:,} distinct numbers can be sampled, asked for {count:,}")
    seen: set[int] = set()
    out: list[int] = []
    while len(out) < count:
        digits = int(rng.integers(1, 7))
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        n = int(rng.integers(lo, 10 ** digits))
        if n not in seen:  # small ranges run out; later draws then land in longer ones
            seen.add(n)
            out.append(n)
    return out


def synthetic_files(directory: str) -> dict[str, str]:
    """The file prefixes (`<prefix>.en`, `<prefix>.de`) that `write_synthetic` writes."""
    return {split: os.path.join(directory, split) for split in ("train", "valid", "test")}


def write_synthetic(directory: str, n_train: int, n_valid: int, n_test: int, seed: int = 0) -> dict[str, str]:
    """Write `{train,valid,test}.{en,de}` under `directory` with disjoint numbers; returns the prefixes.

    Deterministic in (sizes, seed); each file is written to a temporary name and renamed, so
    concurrent writers (several processes on one filesystem) cannot leave a torn file.
    """
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    numbers = _sample_numbers(n_train + n_valid + n_test, rng)
    parts = {"train": numbers[:n_train], "valid": numbers[n_train:n_train + n_valid],
             "test": numbers[n_train + n_valid:]}
    prefixes = synthetic_files(directory)
    for split, nums in parts.items():
        for lang, fn in (("en", english_words), ("de", german_words)):
            path = f"{prefixes[split]}.{lang}"
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(fn(n) + "\n" for n in nums)
            os.replace(tmp, path)
    return prefixes
