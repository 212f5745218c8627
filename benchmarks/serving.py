"""Serving: one model, four engines, beam 4 on test2016: sentences/s, sacreBLEU and size on disk.

    python benchmarks/serving.py runs/multi30k                 # a training workdir (its averaged model)
    python benchmarks/serving.py exports/multi30k --limit 50   # or an export directory; first 50 sentences

Rows, all from the same parameters on the same machine, one timed pass each:
  jaxformer           `Translator.translate` (our beam search, the model's decode settings, beam 4), the
                      batch split over the CPU's cores as `jaxformer translate` does
  ctranslate2 float32 `write_ctranslate2` then `ctranslate2.Translator.translate_batch` with the options
  ctranslate2 int8    closest to ours (`jaxformer.io.ctranslate2.translate_options`; docs/serving.md)
  transformers        the Marian export (`write_marian`), `MarianMTModel.generate(num_beams=4)` with its
                      generation_config.json (skipped with a note for a model Marian cannot express)
Each engine first translates the whole set once untimed (jaxformer compiles a search per batch shape;
the others load and warm up), then once timed, tokenization and detokenization included. Each row has
sentences/s and its ratio to jaxformer's, cased and lowercased sacreBLEU against the references, how many
translations are identical to jaxformer's, and the size on disk of the format (jaxformer: its own export).
CTranslate2 and torch use every core (`--threads`). Timings mean something only on a machine that
nothing else is using: CTranslate2's float32 path (OpenMP) slowed down ~10x with 2 threads on 2 cores
that other jobs were also using, where 1 thread did not.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import report  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "multi30k"
COLUMNS = ["engine", "sentences", "seconds", "sentences_per_s", "speed_vs_jaxformer", "bleu", "bleu_lc",
           "same_as_jaxformer", "size_mb"]


def directory_mb(path: pathlib.Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def write_native(translator, out: pathlib.Path) -> pathlib.Path:
    """Our own export format (params.safetensors + vocabulary + config), to measure its size."""
    from jaxformer.io import native

    return native.write(translator, out)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_jaxformer(translator, sentences, args):
    def go():
        return translator.translate(sentences, beam_size=args.beam_size, batch_size=args.batch_size)
    go()  # compiles each batch shape
    return timed(go)


def run_ctranslate2(translator, sentences, args, out: pathlib.Path, quantization: str):
    import ctranslate2
    import sentencepiece as spm

    from jaxformer.io.ctranslate2 import write_ctranslate2, translate_options

    config, tokenizer = translator.model.config, translator.tokenizer
    write_ctranslate2(out, config, translator.params, tokenizer, translator.decode, quantization=quantization)
    sp = spm.SentencePieceProcessor(model_file=str(out / "sentencepiece.model"))
    engine = ctranslate2.Translator(str(out), device="cpu", inter_threads=1, intra_threads=args.threads)
    longest = max(len(ids) for ids in tokenizer.encode(sentences))
    options = translate_options({**translator.decode, "beam_size": args.beam_size}, config.max_len, longest,
                                tokenizer)

    def go():
        batch = [sp.encode(s, out_type=str) for s in sentences]
        results = engine.translate_batch(batch, max_batch_size=args.batch_size, **options)
        return [sp.decode(r.hypotheses[0]) for r in results]
    go()
    return timed(go), options


def run_transformers(translator, sentences, args, out: pathlib.Path):
    """(texts, seconds) of MarianMTModel.generate with beam 4, or None when Marian cannot express the model."""
    import torch
    from transformers import MarianMTModel, MarianTokenizer

    from jaxformer.io.marian_export import write_marian

    try:
        write_marian(out, translator.model.config, translator.params, translator.tokenizer, translator.decode)
    except Exception as e:  # noqa: BLE001 - a model Marian cannot express: the other rows still stand
        print(f"# transformers row skipped: the Marian export failed: {type(e).__name__}: {e}")
        return None
    torch.set_num_threads(args.threads)
    model = MarianMTModel.from_pretrained(str(out)).eval()
    tokenizer = MarianTokenizer.from_pretrained(str(out))

    def go():
        texts = []
        for start in range(0, len(sentences), args.batch_size):
            batch = tokenizer(sentences[start:start + args.batch_size], return_tensors="pt", padding=True)
            with torch.inference_mode():
                generated = model.generate(**batch, num_beams=args.beam_size)
            texts += tokenizer.batch_decode(generated, skip_special_tokens=True)
        return texts
    go()
    return timed(go)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a training workdir or an export directory")
    parser.add_argument("--source", default=str(DATA / "test2016.en"))
    parser.add_argument("--reference", default=str(DATA / "test2016.de"))
    parser.add_argument("--limit", type=int, default=None, help="first N sentences only")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch, every engine")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CTranslate2 / torch threads (default: every core)")
    parser.add_argument("--work-dir", default=None, help="where the exports go (default: a temporary directory)")
    parser.add_argument("--one-device", action="store_true", help="jaxformer: do not split batches over the cores")
    parser.add_argument("--tokenize", default="13a", help="sacreBLEU's tokenizer (none: pre-tokenized text, e.g. "
                                                         "a model trained on Multi30k's tok/ files)")
    args = parser.parse_args(argv)
    if not args.one_device:
        from jaxformer import parallel
        parallel.use_every_cpu_core()

    import jaxformer
    from jaxformer.evaluate import bleu_scores, read_lines

    sentences = read_lines(args.source)[: args.limit]
    references = read_lines(args.reference)[: args.limit]
    translator = jaxformer.load(args.model)
    print(f"# {len(sentences)} sentences of {args.source}; model {args.model}; beam {args.beam_size}; "
          f"decode settings {translator.decode}")
    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="jaxformer-serving-"))
    for name in ("jaxformer", "ct2-float32", "ct2-int8", "marian"):  # this script's own exports, rewritten
        shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    outputs = {}
    texts, seconds = run_jaxformer(translator, sentences, args)
    outputs["jaxformer"] = (texts, seconds, directory_mb(write_native(translator, work / "jaxformer")))
    for quantization in ("float32", "int8"):
        (texts, seconds), options = run_ctranslate2(translator, sentences, args, work / f"ct2-{quantization}",
                                                    quantization)
        outputs[f"ctranslate2 {quantization}"] = (texts, seconds, directory_mb(work / f"ct2-{quantization}"))
    print(f"# ctranslate2 options: {options}")
    result = run_transformers(translator, sentences, args, work / "marian")
    if result is not None:
        outputs["transformers"] = (*result, directory_mb(work / "marian"))

    ours, base = outputs["jaxformer"][0], outputs["jaxformer"][1]
    rows = []
    for engine, (texts, seconds, size) in outputs.items():
        bleu = bleu_scores(texts, references, tokenize=args.tokenize)
        rows.append({"engine": engine, "sentences": len(texts), "seconds": seconds,
                     "sentences_per_s": len(texts) / seconds, "speed_vs_jaxformer": base / seconds,
                     "bleu": bleu.score, "bleu_lc": bleu.lowercased.score, "signature": bleu.signature,
                     "same_as_jaxformer": sum(a == b for a, b in zip(texts, ours)), "size_mb": size,
                     "beam_size": args.beam_size, "batch_size": args.batch_size, "threads": args.threads})
    print(f"# exports in {work}")
    report(rows, COLUMNS)


if __name__ == "__main__":
    main()
