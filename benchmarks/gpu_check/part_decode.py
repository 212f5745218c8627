"""Part `decode`: beam-4 sentences/s on test2016 for the Multi30k model that `correctness` trained."""

from __future__ import annotations

import dataclasses
import time

from .context import Context, guarded
from .multi30k_run import trained_model


def run(ctx: Context):
    """Beam-4 sentences/s over test2016 through `jaxformer.translate.translate_texts` (tokenization and
    detokenization included), once to compile its shapes, then timed; BLEU as a sanity check."""
    yield from guarded("beam-4 decode", _decode_speed, ctx)


def _decode_speed(ctx: Context):
    from jaxformer.evaluate import corpus_bleu
    from jaxformer.model import Transformer
    from jaxformer.translate import translate_texts

    translator, what = trained_model(ctx)
    with open(ctx.data_file("test", "en")) as f_src, open(ctx.data_file("test", "de")) as f_ref:
        sources, references = [line.strip() for line in f_src], [line.strip() for line in f_ref]
    if ctx.dry:
        sources, references = sources[:24], references[:24]
    runs = [("float32", 64), ("float32", 256), ("bfloat16", 256)] if not ctx.dry else [("float32", 32)]
    for dtype, batch_size in runs:
        if ctx.left() < 10:
            yield {"what": "beam-4 decode", "dtype": dtype, "batch_size": batch_size,
                   "note": "skipped: the part's time is spent"}
            continue
        model = Transformer(dataclasses.replace(translator.model.config, dtype=dtype))
        settings = dict(translator.decode, beam_size=4, batch_size=batch_size)
        start = time.perf_counter()
        translate_texts(model, translator.params, translator.tokenizer, sources, settings)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        hypotheses = translate_texts(model, translator.params, translator.tokenizer, sources, settings)
        seconds = time.perf_counter() - start
        yield {"what": "beam-4 decode", "dtype": dtype, "batch_size": batch_size, "sentences": len(sources),
               "seconds": seconds, "sentences_per_s": len(sources) / seconds, "compile_s": compile_s - seconds,
               "bleu": corpus_bleu(hypotheses, references).score, "params": what,
               "length_penalty": settings["length_penalty"]}
