"""The quick search benchmark: our search before and after a change, beside CTranslate2, on the shared models.

    python benchmarks/search_ab.py --compare bb9de84        # the search of commit bb9de84 beside today's
    python benchmarks/search_ab.py --devices 2              # every engine with 2 cores (ours: 2 JAX devices)

For each model of ../shared/models (multi30k_tok on the 1,000 tokenized test2016 sentences, number_words on
1,000 number phrases of `jaxformer.synthetic.english_words`), for greedy and beam 4, in one process:
  jaxformer                  `jaxformer.load(model).translate` (the model's decode settings, --batch-size)
  jaxformer stop=finished    beam only: `decode.stop=finished`, CTranslate2's stopping rule
  jaxformer parallel=split   with --devices N > 1: each batch split over the devices (our default on CPU
                             devices, `decode.parallel=auto`, gives each device its own batches)
  jaxformer@REV              with --compare: the same call on commit REV's package (`at_commit.package_at`)
  jaxformer nbest=K / sampling=...   with --features: n-best lists beside beam K, sampling beside greedy
  ctranslate2 float32 iN/tM  the `jaxformer export --format ctranslate2` model, intra_threads N / inter_threads M
                             (both splits of --threads, every core by default; the best is x_ct2_best's 1.0)
Each engine translates the set once untimed, then --passes timed passes, engine after engine within a pass.
Rows: median sentences/s, x_jaxformer (over our median), identical outputs, for our search the row-steps
computed (steps x rows of every loop of every batch) against the row-steps needed (each row's step of being
done), and the seconds of our first call (compilation included).
Only on idle cores. --devices sets the JAX CPU device count before JAX starts (1: our search on one device,
as `jaxformer.load(...).translate` runs unless `parallel.use_every_cpu_core()` ran first).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COLUMNS = ["model", "search", "engine", "sentences_per_s", "range", "x_jaxformer", "x_ct2_best", "same_as_jaxformer",
           "row_steps", "row_steps_needed", "first_pass_s"]


def number_phrases(count: int, seed: int = 0) -> list[str]:
    import numpy as np

    from jaxformer.synthetic import LIMIT, english_words

    rng = np.random.default_rng(seed)
    return [english_words(int(n)) for n in rng.integers(0, LIMIT, count)]


def model_sets(limit: int | None) -> dict[str, list[str]]:
    from jaxformer.evaluate import read_lines

    return {"multi30k_tok": read_lines(SHARED / "data" / "multi30k" / "tok" / "test2016.lc.norm.tok.en")[:limit],
            "number_words": number_phrases(limit or 1000)}


class RowSteps:
    """Counts the row-steps our compiled searches run and need (their `steps` and `done_at` outputs)."""

    def __init__(self, decode):
        self.decode, self.computed, self.needed = decode, 0, 0
        self.originals = {name: getattr(decode, name) for name in ("_compiled_beam", "_compiled_greedy")}

    def __enter__(self):
        for name, compiled in self.originals.items():
            setattr(self.decode, name, lambda *a, _c=compiled: self._counting(_c(*a)))
        return self

    def __exit__(self, *exc):
        for name, compiled in self.originals.items():
            setattr(self.decode, name, compiled)

    def _counting(self, fn):
        def run(*args):
            out = fn(*args)
            rows = int(out["done_at"].shape[0])  # row_steps: fewer when finished rows left the batch
            self.computed += int(out["row_steps"]) if "row_steps" in out else int(out["steps"]) * rows
            self.needed += int(out["done_at"].sum())
            return out
        return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", default=None, metavar="REV", help="also time the search of commit REV")
    parser.add_argument("--models", default="multi30k_tok,number_words")
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="first N sentences only")
    parser.add_argument("--devices", type=int, default=1, help="JAX CPU devices (default 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CTranslate2's threads, split both ways (default: every core)")
    parser.add_argument("--no-ct2", action="store_true", help="skip CTranslate2")
    parser.add_argument("--features", action="store_true",
                        help="also n-best (nbest=4 with scores) beside beam, and sampling beside greedy")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("CT2_USE_MKL", "1")  # docs/serving.md, "int8 on AMD CPUs"

    import statistics

    import jax

    import jaxformer
    from jaxformer import decode
    from common import device_summary, report
    from serving import interleaved, translate_ctranslate2

    old = None
    if args.compare:
        from at_commit import package_at
        old = package_at(args.compare)
    print(f"# {device_summary()}; batch {args.batch_size}; {args.passes} timed passes")
    work = pathlib.Path(tempfile.mkdtemp(prefix="jaxformer-search-ab-"))
    sets = model_sets(args.limit)
    rows = []
    for name in args.models.split(","):
        path, sentences = SHARED / "models" / name, sets[name]
        translator = jaxformer.load(path)
        ct2_path = None
        if not args.no_ct2:
            from jaxformer.io.ctranslate2 import write_ctranslate2
            ct2_path = write_ctranslate2(work / name, translator.model.config, translator.params,
                                         translator.tokenizer, translator.decode, quantization="float32")
        old_translator = old.load(path) if old is not None else None
        for beam in (int(b) for b in args.beams.split(",")):
            search = "greedy" if beam == 1 else f"beam{beam}"
            go = lambda t=translator, **kw: lambda: t.translate(sentences, beam_size=beam,  # noqa: E731
                                                                batch_size=args.batch_size, **kw)
            engines = {"jaxformer": go()}
            if beam > 1:
                engines["jaxformer stop=finished"] = go(stop="finished")
            if args.features and beam > 1:  # the same search keeping beam-size hypotheses, with their scores
                engines[f"jaxformer nbest={beam}"] = go(nbest=beam, with_scores=True)
            if args.features and beam == 1:  # sampling is greedy's loop with a draw
                engines["jaxformer sampling=full"] = go(sampling="full", seed=1)
                engines["jaxformer sampling=topk:10"] = go(sampling="topk:10", seed=1)
                if old_translator is not None:  # the sampling of commit REV, beside ours
                    engines[f"jaxformer@{args.compare} sampling=topk:10"] = go(old_translator, sampling="topk:10",
                                                                               seed=1)
            if args.devices > 1:  # our default on CPU devices is a batch per device; beside it, each batch split
                engines["jaxformer parallel=split"] = go(parallel="split")
            if old_translator is not None:
                engines[f"jaxformer@{args.compare}"] = go(old_translator)
            splits = sorted({(args.threads, 1), (1, args.threads)})
            for intra, inter in splits if ct2_path else ():
                engines[f"ctranslate2 float32 i{intra}/t{inter}"], _ = translate_ctranslate2(
                    translator, sentences, beam, args, ct2_path, intra, inter)
            steps, first_pass = {}, {}  # the first call of our searches compiles them: its seconds, apart
            for engine in [e for e in engines if e.startswith("jaxformer")]:
                start = time.perf_counter()
                if "@" in engine:
                    engines[engine]()
                else:
                    with RowSteps(decode) as counter:
                        engines[engine]()
                    steps[engine] = (counter.computed, counter.needed)
                first_pass[engine] = time.perf_counter() - start
            outputs, seconds = interleaved(engines, args.passes)
            speed = {e: len(sentences) / statistics.median(s) for e, s in seconds.items()}
            ct2_best = max((v for e, v in speed.items() if e.startswith("ctranslate2")), default=None)
            for engine, texts in outputs.items():
                if texts and isinstance(texts[0], list):  # n-best: the best of each list
                    texts = [hyps[0]["text"] if hyps else "" for hyps in texts]
                runs = sorted(len(sentences) / t for t in seconds[engine])
                computed, needed = steps.get(engine, (None, None))
                rows.append({"model": name, "search": search, "engine": engine, "sentences": len(sentences),
                             "sentences_per_s": speed[engine], "range": f"{runs[0]:.0f}-{runs[-1]:.0f}",
                             "seconds": seconds[engine], "x_jaxformer": speed[engine] / speed["jaxformer"],
                             "x_ct2_best": speed[engine] / ct2_best if ct2_best else None,
                             "same_as_jaxformer": sum(a == b for a, b in zip(texts, outputs["jaxformer"])),
                             "row_steps": computed, "row_steps_needed": needed, "first_pass_s": first_pass.get(engine),
                             "devices": jax.device_count(),
                             "batch_size": args.batch_size})
    report(rows, COLUMNS)


if __name__ == "__main__":
    main()
