"""Part `data`: the shared vocabulary every other part loads, trained on the brought Multi30k pairs (on the
CPU) once; a rerun with the same --work reuses it."""

from __future__ import annotations

import os
import time

from .context import Context, guarded


def run(ctx: Context):
    yield from guarded("vocabulary", _vocabulary, ctx)


def _vocabulary(ctx: Context):
    from jaxformer.data import Tokenizer, get_tokenizer

    c = ctx.multi30k_config(vocab=False)
    with open(ctx.data_file("train", "en")) as f:
        pairs = sum(1 for _ in f)
    try:
        import datasets

        have = f"datasets {datasets.__version__}"
    except Exception as e:  # noqa: BLE001
        have = f"not importable: {type(e).__name__}: {e}"
    start = time.monotonic()
    if have.startswith("datasets") or os.path.isfile(ctx.vocab_path):
        tokenizer = get_tokenizer(c, ctx.work)  # the library's path: a sample over the whole train split
    else:
        lines = []
        for lang in ("en", "de"):
            with open(ctx.data_file("train", lang)) as f:
                lines += [line.strip() for line in f]
        tokenizer = Tokenizer.train(lines, int(c.data.vocab_size), ctx.vocab_path)
    yield {"what": "vocabulary", "pieces": tokenizer.vocab_size, "pairs": pairs, "datasets": have,
           "seconds": round(time.monotonic() - start, 1), "note": f"{ctx.data}, configs/multi30k.py's data.vocab_size"}
