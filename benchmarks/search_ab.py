"""The quick search benchmark: our search before and after a change, beside CTranslate2, on the shared models.

    python benchmarks/search_ab.py --compare bb9de84        # the search of commit bb9de84 beside today's
    python benchmarks/search_ab.py --devices 2              # every engine with 2 cores (ours: 2 JAX devices)
    python benchmarks/search_ab.py --models base --int8 --batch-size 1 --limit 8      # issue 39's matrix:
    python benchmarks/search_ab.py --models base --int8 --batch-size 8 --limit 32     # the random base model,
    python benchmarks/search_ab.py --models base --int8 --batch-size 64 --limit 64    # CTranslate2 int8 too

For each model of ../shared/models (multi30k_tok on the 1,000 tokenized test2016 sentences, number_words on
1,000 number phrases of `jaxformer.synthetic.english_words`) or `base`, for greedy and beam 4, in one process:
  jaxformer                  `jaxformer.load(model).translate` (the model's decode settings, --batch-size)
  jaxformer stop=finished    beam only: `decode.stop=finished`, CTranslate2's stopping rule
  jaxformer parallel=split   with --devices N > 1: each batch split over the devices (our default on CPU
                             devices, `decode.parallel=auto`, gives each device its own batches)
  jaxformer@REV              with --compare: the same call on commit REV's package (`at_commit.package_at`)
  jaxformer nbest=K / sampling=...   with --features: n-best lists beside beam K, sampling beside greedy
  ctranslate2 float32 iN/tM  the `jaxformer export --format ctranslate2` model, intra_threads N / inter_threads M
                             (both splits of --threads, every core by default; the best is x_ct2_best's 1.0)
  ctranslate2 int8 iN/tM     with --int8: the same with int8 weights (an int8 export; CT2_USE_MKL=1). x_ct2_best
                             stays float32's best; x_ct2_int8 is each engine over int8's best split, and
                             x_jaxformer of an int8 row is int8's speed over ours
Each engine translates the set once untimed, then --passes timed passes, engine after engine within a pass.
Rows: median sentences/s, x_jaxformer (over our median), identical outputs, for our search the row-steps
computed (steps x rows of every loop of every batch) against the row-steps needed (each row's step of being
done), and the seconds of our first call (compilation included).
Only on idle cores. --devices sets the JAX CPU device count before JAX starts (1: our search on one device,
as `jaxformer.load(...).translate` runs unless `parallel.use_every_cpu_core()` ran first).

`base`: the paper's base shape (`TransformerConfig.base`: 6+6 layers, d_model 512, 8 heads, d_ff 2048) with
random weights (`init_params`, key 0) and a made-up 32,000-word vocabulary (a sentencepiece word model, one
piece per word, that the CTranslate2 export writes), in a `Translator` with the default decode settings; its
sentences are --limit (default 64) random sources of 20 words (seed 0). Random weights never choose EOS on
purpose, so every search, ours and CTranslate2's, runs to its limit (source + EOS + decode.max_extra_len:
71 tokens): the rows measure the step's speed, not a stopping rule. --compare skips it.
"""

from __future__ import annotations

import argparse
import atexit
import os
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COLUMNS = ["model", "search", "engine", "sentences_per_s", "range", "x_jaxformer", "x_ct2_best", "x_ct2_int8",
           "same_as_jaxformer", "row_steps", "row_steps_needed", "first_pass_s"]
BASE_VOCAB, BASE_SOURCE_WORDS = 32000, 20


def number_phrases(count: int, seed: int = 0) -> list[str]:
    import numpy as np

    from jaxformer.synthetic import LIMIT, english_words

    rng = np.random.default_rng(seed)
    return [english_words(int(n)) for n in rng.integers(0, LIMIT, count)]


def word_tokenizer(size: int):
    """A sentencepiece word model of `size` pieces: the specials, then the made-up words w4 ... w{size - 1}."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from jaxformer.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

    proto = pb.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type, trainer.vocab_size = pb.TrainerSpec.WORD, size
    trainer.pad_id, trainer.unk_id, trainer.bos_id, trainer.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = proto.normalizer_spec.remove_extra_whitespaces = True
    kind = pb.ModelProto.SentencePiece.Type
    specials = {PAD_ID: ("<pad>", kind.CONTROL), UNK_ID: ("<unk>", kind.UNKNOWN), BOS_ID: ("<s>", kind.CONTROL),
                EOS_ID: ("</s>", kind.CONTROL)}
    for i in range(size):
        piece, type_ = specials.get(i, (f"\u2581w{i}", kind.NORMAL))
        proto.pieces.add(piece=piece, score=0.0, type=type_)
    return Tokenizer(proto.SerializeToString())


def base_model():
    """The paper's base shape with random weights over `word_tokenizer(BASE_VOCAB)`, as a `Translator`."""
    import jax

    from jaxformer.model import Transformer, TransformerConfig, init_params
    from jaxformer.translate import Translator

    config = TransformerConfig.base(BASE_VOCAB, dropout_rate=0.0)
    return Translator(Transformer(config), init_params(config, jax.random.key(0)), word_tokenizer(BASE_VOCAB))


def random_sentences(count: int, seed: int = 0) -> list[str]:
    import numpy as np

    words = np.random.default_rng(seed).integers(4, BASE_VOCAB, (count, BASE_SOURCE_WORDS))
    return [" ".join(f"w{i}" for i in row) for row in words]


def model_sets(limit: int | None) -> dict[str, list[str]]:
    from jaxformer.evaluate import read_lines

    return {"multi30k_tok": read_lines(SHARED / "data" / "multi30k" / "tok" / "test2016.lc.norm.tok.en")[:limit],
            "number_words": number_phrases(limit or 1000), "base": random_sentences(limit or 64)}


class RowSteps:
    """Counts the row-steps our compiled searches run and need (their `steps` and `done_at` outputs)."""

    def __init__(self, decode):
        self.decode, self.computed, self.needed = decode, 0, 0
        self.originals = {name: getattr(decode, name) for name in ("_compiled_beam", "_compiled_greedy")}

    def __enter__(self):
        for name, compiled in self.originals.items():
            setattr(self.decode, name, lambda *a, _c=compiled, **k: self._counting(_c(*a, **k), k.get("stage")))
        return self

    def __exit__(self, *exc):
        for name, compiled in self.originals.items():
            setattr(self.decode, name, compiled)

    def _counting(self, fn, stage):
        """`fn` counting its outputs; a staged search's first program (stage "start": state, whether done,
        outputs) counts only when the batch ended there, else its "rest" program counts the whole search."""
        def run(*args, **kwargs):
            out = result = fn(*args, **kwargs)
            if stage == "start":
                _, done, result = out
                if not bool(done):
                    return out
            rows = int(result["done_at"].shape[0])  # row_steps: fewer when finished rows left the batch
            self.computed += int(result["row_steps"]) if "row_steps" in result else int(result["steps"]) * rows
            self.needed += int(result["done_at"].sum())
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
    parser.add_argument("--int8", action="store_true", help="also CTranslate2 with int8 weights")
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
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the exports (base: 300 MB)
    sets = model_sets(args.limit)
    rows = []
    for name in args.models.split(","):
        path, sentences = SHARED / "models" / name, sets[name]
        translator = base_model() if name == "base" else jaxformer.load(path)
        ct2_paths = {}
        for quantization in () if args.no_ct2 else ("float32", "int8") if args.int8 else ("float32",):
            from jaxformer.io.ctranslate2 import write_ctranslate2
            ct2_paths[quantization] = write_ctranslate2(work / f"{name}-{quantization}", translator.model.config,
                                                        translator.params, translator.tokenizer, translator.decode,
                                                        quantization=quantization)
        old_translator = old.load(path) if old is not None and name != "base" else None
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
            for quantization, ct2_path in ct2_paths.items():
                for intra, inter in splits:
                    engines[f"ctranslate2 {quantization} i{intra}/t{inter}"], _ = translate_ctranslate2(
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
            ct2_best, int8_best = (max((v for e, v in speed.items() if e.startswith(f"ctranslate2 {q}")), default=None)
                                   for q in ("float32", "int8"))
            for engine, texts in outputs.items():
                if texts and isinstance(texts[0], list):  # n-best: the best of each list
                    texts = [hyps[0]["text"] if hyps else "" for hyps in texts]
                runs = sorted(len(sentences) / t for t in seconds[engine])
                computed, needed = steps.get(engine, (None, None))
                rows.append({"model": name, "search": search, "engine": engine, "sentences": len(sentences),
                             "sentences_per_s": speed[engine], "range": f"{runs[0]:.0f}-{runs[-1]:.0f}",
                             "seconds": seconds[engine], "x_jaxformer": speed[engine] / speed["jaxformer"],
                             "x_ct2_best": speed[engine] / ct2_best if ct2_best else None,
                             "x_ct2_int8": speed[engine] / int8_best if int8_best else None,
                             "same_as_jaxformer": sum(a == b for a, b in zip(texts, outputs["jaxformer"])),
                             "row_steps": computed, "row_steps_needed": needed, "first_pass_s": first_pass.get(engine),
                             "devices": jax.device_count(),
                             "batch_size": args.batch_size})
    report(rows, [c for c in COLUMNS if c != "x_ct2_int8" or args.int8])


if __name__ == "__main__":
    main()
