"""Serving: one model, our search beside CTranslate2, greedy and beam 4: sentences/s, sacreBLEU, agreement.

    python benchmarks/serving.py runs/multi30k_tok --tokenize none   # a training workdir (its averaged model)
    python benchmarks/serving.py exports/multi30k --limit 50         # or an export directory; first 50 sentences
    python benchmarks/serving.py runs/default --source runs/synthetic_data/numbers-n20000-s0/test.en \
        --reference runs/synthetic_data/numbers-n20000-s0/test.de --tokenize char

Engines, all from the same parameters on the same machine, for greedy (beam 1) and beam 4:
  jaxformer                  `Translator.translate` with the model's decode settings (decode.parallel auto:
                             on a CPU each core a device searching its own batches)
  jaxformer stop=finished    beam only: `decode.stop=finished`, CTranslate2's stopping rule and len^alpha
  ctranslate2 float32 i2/t1  `write_ctranslate2`, `translate_batch` with `translate_options` (the options
  ctranslate2 float32 i1/t2  closest to ours, docs/serving.md), intra_threads / inter_threads as named
  ctranslate2 int8 i2/t1     the same, int8 weights (CT2_USE_MKL=1: docs/serving.md, "int8 on AMD CPUs")
  ctranslate2 int8 i1/t2
  transformers               with --marian: the Marian export, `MarianMTModel.generate`
Every engine translates the whole set once untimed (we compile a search per batch shape; the others load
and warm up), then --passes timed passes, engine after engine within a pass (interleaved, so a slow
moment of a shared machine hits every engine). Rows: the median sentences/s and the range over passes,
x_jaxformer (the engine's sentences/s over jaxformer's, from the medians), sacreBLEU, how many outputs are
identical to jaxformer's and (same_as_ct2) to ctranslate2 float32's, tokenization included. Timings mean
something only on idle cores: stop every other job first.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("CT2_USE_MKL", "1")  # before ctranslate2 loads: its oneDNN int8 is wrong on AMD (docs/serving.md)
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import report  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "multi30k"
COLUMNS = ["search", "engine", "sentences", "sentences_per_s", "range", "x_jaxformer", "bleu",
           "same_as_jaxformer", "same_as_ct2", "size_mb"]


def directory_mb(path: pathlib.Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def write_native(translator, out: pathlib.Path) -> pathlib.Path:
    """Our own export format (params.safetensors + vocabulary + config), to measure its size."""
    from jaxformer.io import native

    return native.write(translator, out)


def translate_jaxformer(translator, sentences, beam, args, **options):
    return lambda: translator.translate(sentences, beam_size=beam, batch_size=args.batch_size, **options)


def translate_ctranslate2(translator, sentences, beam, args, path: pathlib.Path, intra: int, inter: int):
    import ctranslate2
    import sentencepiece as spm

    from jaxformer.io.ctranslate2 import translate_options

    sp = spm.SentencePieceProcessor(model_file=str(path / "sentencepiece.model"))
    engine = ctranslate2.Translator(str(path), device="cpu", inter_threads=inter, intra_threads=intra)
    longest = max(len(ids) for ids in translator.tokenizer.encode(sentences))
    options = translate_options({**translator.decode, "beam_size": beam}, translator.model.config.max_len,
                                longest, translator.tokenizer)

    def go():
        batch = [sp.encode(s, out_type=str) for s in sentences]
        results = engine.translate_batch(batch, max_batch_size=args.batch_size, **options)
        return [sp.decode(r.hypotheses[0]) for r in results]
    return go, options


def translate_marian(translator, sentences, beam, args, out: pathlib.Path):
    """MarianMTModel.generate, or None when Marian cannot express the model."""
    import torch
    from transformers import MarianMTModel, MarianTokenizer

    from jaxformer.io.marian_export import write_marian

    if not (out / "config.json").exists():
        try:
            write_marian(out, translator.model.config, translator.params, translator.tokenizer, translator.decode)
        except Exception as e:  # noqa: BLE001 - a model Marian cannot express: the other rows still stand
            print(f"# transformers row skipped: the Marian export failed: {type(e).__name__}: {e}")
            return None
    torch.set_num_threads(os.cpu_count() or 1)
    model = MarianMTModel.from_pretrained(str(out)).eval()
    tokenizer = MarianTokenizer.from_pretrained(str(out))

    def go():
        texts = []
        for start in range(0, len(sentences), args.batch_size):
            batch = tokenizer(sentences[start:start + args.batch_size], return_tensors="pt", padding=True)
            with torch.inference_mode():
                generated = model.generate(**batch, num_beams=beam)
            texts += tokenizer.batch_decode(generated, skip_special_tokens=True)
        return texts
    return go


def interleaved(engines: dict, passes: int) -> tuple[dict, dict]:
    """Outputs of one untimed pass of each engine, then `passes` timed passes, engine after engine."""
    outputs = {name: go() for name, go in engines.items()}
    seconds = {name: [] for name in engines}
    for _ in range(passes):
        for name, go in engines.items():
            start = time.perf_counter()
            go()
            seconds[name].append(time.perf_counter() - start)
    return outputs, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a training workdir or an export directory")
    parser.add_argument("--source", default=str(DATA / "test2016.en"))
    parser.add_argument("--reference", default=str(DATA / "test2016.de"))
    parser.add_argument("--limit", type=int, default=None, help="first N sentences only")
    parser.add_argument("--beams", default="1,4", help="beam sizes, 1 = greedy (default 1,4)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch, every engine")
    parser.add_argument("--passes", type=int, default=3, help="timed passes after the warm-up (default 3)")
    parser.add_argument("--marian", action="store_true", help="also the transformers Marian row (slow)")
    parser.add_argument("--work-dir", default=None, help="where the exports go (default: a temporary directory)")
    parser.add_argument("--tokenize", default="13a", help="sacreBLEU's tokenizer (none: pre-tokenized text, e.g. "
                                                         "a model trained on Multi30k's tok/ files)")
    args = parser.parse_args(argv)
    from jaxformer import parallel
    parallel.use_every_cpu_core()

    import jaxformer
    from jaxformer.evaluate import bleu_scores, read_lines
    from jaxformer.io.ctranslate2 import write_ctranslate2

    sentences = read_lines(args.source)[: args.limit]
    references = read_lines(args.reference)[: args.limit]
    translator = jaxformer.load(args.model)
    cores = os.cpu_count() or 1
    print(f"# {len(sentences)} sentences of {args.source}; model {args.model}; decode settings {translator.decode}")
    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="jaxformer-serving-"))
    for name in ("jaxformer", "ct2-float32", "ct2-int8", "marian"):  # this script's own exports, rewritten
        shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    sizes = {"jaxformer": directory_mb(write_native(translator, work / "jaxformer"))}
    for quantization in ("float32", "int8"):
        path = write_ctranslate2(work / f"ct2-{quantization}", translator.model.config, translator.params,
                                 translator.tokenizer, translator.decode, quantization=quantization)
        sizes[quantization] = directory_mb(path)

    rows = []
    for beam in (int(b) for b in args.beams.split(",")):
        search = "greedy" if beam == 1 else f"beam{beam}"
        engines = {"jaxformer": translate_jaxformer(translator, sentences, beam, args)}
        if beam > 1:
            engines["jaxformer stop=finished"] = translate_jaxformer(translator, sentences, beam, args,
                                                                     stop="finished")
        for quantization in ("float32", "int8"):
            for intra, inter in ((cores, 1), (1, cores)):
                engines[f"ctranslate2 {quantization} i{intra}/t{inter}"], options = translate_ctranslate2(
                    translator, sentences, beam, args, work / f"ct2-{quantization}", intra, inter)
        if args.marian and (go := translate_marian(translator, sentences, beam, args, work / "marian")):
            engines["transformers"] = go
        print(f"# {search}: ctranslate2 options {options}")
        outputs, seconds = interleaved(engines, args.passes)
        ours, ct2 = outputs["jaxformer"], outputs[f"ctranslate2 float32 i{cores}/t1"]
        base = len(sentences) / statistics.median(seconds["jaxformer"])
        for engine, texts in outputs.items():
            speeds = sorted(len(sentences) / t for t in seconds[engine])
            bleu = bleu_scores(texts, references, tokenize=args.tokenize)
            size = sizes["jaxformer"] if engine.startswith("jaxformer") else \
                sizes.get(engine.split()[1]) if engine.startswith("ctranslate2") else directory_mb(work / "marian")
            rows.append({"search": search, "engine": engine, "sentences": len(texts),
                         "sentences_per_s": statistics.median(speeds), "range": f"{speeds[0]:.0f}-{speeds[-1]:.0f}",
                         "x_jaxformer": statistics.median(speeds) / base, "seconds": seconds[engine],
                         "bleu": bleu.score, "signature": bleu.signature,
                         "same_as_jaxformer": sum(a == b for a, b in zip(texts, ours)),
                         "same_as_ct2": sum(a == b for a, b in zip(texts, ct2)), "size_mb": size,
                         "beam_size": beam, "batch_size": args.batch_size, "cores": cores})
    print(f"# exports in {work}")
    report(rows, COLUMNS)


if __name__ == "__main__":
    main()
