"""The `jaxformer` command: translate, parse, score, evaluate, export, import-marian, plot-attention, average.

    jaxformer translate --model RUN_OR_EXPORT [--average-last K] [--input FILE|-] [--output FILE] [--beam-size 4]
    jaxformer parse --model PARSER [--input FILE|-] [--format bracket|jsonl] [--draw] [--pretokenized]
                    [--no-grammar]                            (constituency parsing: jaxformer/parsing.py)
    jaxformer score --model RUN_OR_EXPORT --src test.en --tgt test.de [--format text|jsonl] [--per-token]
    jaxformer evaluate --workdir RUN [--average-last K] [--split test] [--config.data.KEY=VALUE ...] [--out DIR]
    jaxformer evaluate --model EXPORT --src test.en --ref test.de --out DIR
                       [--tokenized] [--tok-refs TOKENIZED_REFS] [--compound-split]   (docs/bleu.md)
    jaxformer evaluate --model RUN --split valid --sweep average_last=1,5,10 length_penalty=0.6,0.8,1.0 [--tok-refs F]
    jaxformer export --model RUN_OR_EXPORT [--average-last K] --out DIR [--format jaxformer|ctranslate2|marian]
                     [--quantization int8] [--jax-export]
    jaxformer plot-attention --model RUN_OR_EXPORT --sentence "..." [--kind encoder|decoder|cross|all]
                             [--layers -1] [--heads 0,1] --out attention.png
    jaxformer import-marian SOURCE --out DIR                 (an opus-mt model, local or a Hub id; docs/marian.md)
    jaxformer average --workdir RUN --last K --out DIR       (orbax params; see jaxformer.checkpoint)

`--model` takes an export directory or a training workdir (detected by its contents, through
`jaxformer.load`). A workdir gives the average of its last `train.average_last` checkpoints unless
--average-last or --step says otherwise; --best / --average-best K choose by validation (train.keep_best).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jaxformer.cli_args import (add_decode_args, add_model_args, decode_overrides, int_list, load_model,
                                parse_overrides)
from jaxformer.lines import count_lines as _count_lines, input_batches, read_text_lines
from jaxformer.lines import lines_as_they_come as _lines_as_they_come  # noqa: F401 - tests read it here

__all__ = ["main"]

log = logging.getLogger("jaxformer")


def _cmd_translate(args) -> int:
    import contextlib

    translator = load_model(args)
    overrides = decode_overrides(args)
    batch_size = int(args.batch_size or translator.decode["batch_size"])
    if args.sampling is not None:
        from jaxformer.translate import parse_sampling
        parse_sampling(args.sampling)  # a bad spec: one line before any work
        overrides.update(sampling=args.sampling, temperature=args.temperature, seed=args.seed)
    elif args.nbest is not None and args.nbest > int(args.beam_size or translator.decode["beam_size"]):
        raise ValueError(f"--nbest {args.nbest} is larger than the beam size "
                         f"{args.beam_size or translator.decode['beam_size']}: use --beam-size {args.nbest} or more")
    total = None if args.input == "-" else _count_lines(args.input)
    prefixes = None
    if args.prefix is not None:
        prefixes = read_text_lines(args.prefix)
        if total is not None and total != len(prefixes):
            raise ValueError(f"--prefix {args.prefix} has {len(prefixes)} lines but {args.input} has {total}: "
                             f"give one prefix per input line (an empty line for none)")
    count = 0
    with contextlib.ExitStack() as stack:
        to_stdout = args.output in (None, "-")
        sink = sys.stdout if to_stdout else stack.enter_context(open(args.output, "w", encoding="utf-8"))
        batches, progress = input_batches(stack, args.input, batch_size, args.quiet)
        for lines in batches:  # translations appear batch by batch, in input order
            if args.sampling is not None:
                overrides["first_index"] = count  # samples as in one call, whatever the chunks
            if prefixes is not None:
                if count + len(lines) > len(prefixes):
                    raise ValueError(f"--prefix {args.prefix} has {len(prefixes)} lines, fewer than the input")
                overrides["prefix"] = prefixes[count:count + len(lines)]
            sink.write(_translated_lines(translator, lines, args, overrides, count))
            sink.flush()
            count += len(lines)
            progress.update(len(lines))
    if prefixes is not None and count != len(prefixes):
        raise ValueError(f"--prefix {args.prefix} has {len(prefixes)} lines but the input had {count}")
    if not to_stdout:
        log.info("wrote %d translations to %s", count, args.output)
    return 0


def _cmd_parse(args) -> int:
    from jaxformer.parsing import parse_lines

    parse_lines(load_model(args), args.input, args.output, fmt=args.format, draw=args.draw, pretokenized=args.pretokenized,
                grammar=not args.no_grammar, quiet=args.quiet, **decode_overrides(args))
    return 0


def _translated_lines(translator, lines: list[str], args, overrides: dict, first: int) -> str:
    """The output of `jaxformer translate` for these input lines (the first has index `first`): one
    translation per line, or n-best / jsonl hypotheses, with alignments if asked."""
    if args.nbest is None and args.format == "text":
        outputs = [o.replace("\n", " ") for o in translator.translate(lines, **overrides)]
        if args.alignments:
            outputs = [f"{o} ||| {_pairs(a)}" for o, a in
                       zip(outputs, translator.align(lines, outputs, layer=args.alignment_layer))]
        return "".join(o + "\n" for o in outputs)
    found = translator.translate(lines, nbest=args.nbest, with_scores=True, **overrides)
    if args.alignments:
        pairs = [(line, hyp) for line, hyps in zip(lines, found) for hyp in hyps]
        aligned = translator.align([line for line, _ in pairs], [hyp["text"] for _, hyp in pairs],
                                   layer=args.alignment_layer)
        for (_, hyp), alignment in zip(pairs, aligned):
            hyp["alignment"] = alignment
    return _hypotheses_lines(lines, found, first, args.format)


def _read_pairs(src: str, tgt: str) -> tuple[list[str], list[str]]:
    """The lines of two parallel files; one line of error if either is missing or their lengths differ."""
    texts = [read_text_lines(src), read_text_lines(tgt)]
    if len(texts[0]) != len(texts[1]):
        raise ValueError(f"{src} has {len(texts[0])} lines but {tgt} has {len(texts[1])}: score needs one target "
                         f"line per source line")
    return texts[0], texts[1]


def _cmd_score(args) -> int:
    import contextlib
    import json

    sources, targets = _read_pairs(args.src, args.tgt)
    translator = load_model(args)
    results = translator.score(sources, targets, length_penalty=args.length_penalty, batch_size=args.batch_size,
                               full_softmax=args.full_softmax)
    with contextlib.ExitStack() as stack:
        sink = sys.stdout if args.output in (None, "-") else stack.enter_context(
            open(args.output, "w", encoding="utf-8"))  # noqa: SIM115 - closed by the stack
        for source, target, result in zip(sources, targets, results):
            if args.format == "jsonl":
                record = {"source": source, "target": target, "log_prob": None, "score": None}
                if result is not None:  # per token: the target's pieces, then EOS
                    record.update(log_prob=result["log_prob"], score=result["score"])
                    if args.per_token:
                        record.update(tokens=result["tokens"], token_log_probs=result["token_log_probs"])
                else:
                    record["skipped"] = "target longer than the model's max_len - 1"
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            elif result is None:
                sink.write("nan\tnan" + ("\t" if args.per_token else "") + "\n")
            else:
                fields = [f"{result['score']:.6f}", f"{result['log_prob']:.6f}"]
                if args.per_token:
                    fields.append(" ".join(f"{v:.6f}" for v in result["token_log_probs"]))
                sink.write("\t".join(fields) + "\n")
    return 0


def _hypotheses_lines(lines: list[str], found: list[list[dict]], first: int, fmt: str) -> str:
    """n-best output: text, fairseq's and Moses's `i ||| hypothesis ||| score` lines (i counts input lines
    from 0), or jsonl, one object per input line."""
    import json

    if fmt == "jsonl":
        return "".join(json.dumps({"source": line, "hypotheses": hyps}, ensure_ascii=False) + "\n"
                       for line, hyps in zip(lines, found))
    return "".join(f"{first + n} ||| {hyp['text'].replace(chr(10), ' ')} ||| {hyp['score']:.6f}"
                   + (f" ||| {_pairs(hyp['alignment'])}" if "alignment" in hyp else "") + "\n"
                   for n, hyps in enumerate(found) for hyp in hyps)


def _pairs(alignment) -> str:
    """Hard alignment pairs as Moses and fairseq write them: `i-j` (source piece i, target piece j)."""
    return " ".join(f"{i}-{j}" for i, j in alignment)


def _cmd_evaluate(args, extra: list[str]) -> int:
    from jaxformer.config import default_config
    from jaxformer.evaluate import run_evaluation

    data_overrides = parse_overrides(extra, "data", default_config().data.to_dict())
    if args.sweep is not None:
        from jaxformer.evaluate import parse_sweep, run_sweep

        if args.compound_split:
            raise ValueError("--sweep scores cased BLEU (tokenized BLEU with --tokenized, Moses-tokenized "
                             "lowercased BLEU with --tok-refs): drop --compound-split, and score the chosen "
                             "settings with it once")
        _, table = run_sweep(args.model, parse_sweep(args.sweep), args.out, split=args.split, src_file=args.src,
                             ref_file=args.ref, data_overrides=data_overrides, limit=args.limit,
                             tokenize=args.tokenize, tokenized=args.tokenized, tok_refs=args.tok_refs,
                             decode_overrides=decode_overrides(args), step=args.step,
                             average_last=args.average_last, best=args.best,
                             average_best=args.average_best, average_from_best=args.average_from_best)
        print(table, end="")
        return 0
    result = run_evaluation(args.model, args.out, split=args.split, src_file=args.src, ref_file=args.ref,
                            average_last=args.average_last, step=args.step, best=args.best,
                            average_best=args.average_best, average_from_best=args.average_from_best,
                            data_overrides=data_overrides,
                            decode_overrides=decode_overrides(args), limit=args.limit, tokenize=args.tokenize,
                            tokenized=args.tokenized, tok_refs=args.tok_refs, compound_split=args.compound_split,
                            grammar=not args.no_grammar)
    print(result.lines(), end="")
    return 0


def _cmd_export(args) -> int:
    from jaxformer import io

    translator = load_model(args)
    options = {}
    if args.jax_export:
        options = dict(jax_export=True, jax_export_src_len=args.jax_export_src_len,
                       jax_export_platforms=args.jax_export_platforms)
    if args.quantization is not None:
        if args.format != "ctranslate2":
            raise ValueError(f"--quantization applies to --format ctranslate2, not {args.format}")
        options["quantization"] = args.quantization
    out = io.export(translator, args.out, format=args.format, **options)
    steps = translator.checkpoint_steps
    origin = (f"parameters of checkpoint step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}"
              f"{', averaged' if len(steps) > 1 else ''}") if steps else f"from {translator.source}"
    print(f"exported {out} ({args.format}; {origin})")
    return 0


def _cmd_plot(args) -> int:
    from jaxformer.plotting import attention_maps, plot_attention

    translator = load_model(args)
    maps = attention_maps(translator.model, translator.params, translator.tokenizer, args.sentence,
                          translation=args.translation, beam_size=args.beam_size or translator.decode["beam_size"],
                          alpha=translator.decode["length_penalty"])
    kinds = ("encoder", "decoder", "cross") if args.kind == "all" else tuple(args.kind.split(","))
    out = plot_attention(maps, args.out, kinds=kinds, layers=args.layers, heads=args.heads)
    print(f"translation: {maps.translation}")
    print(f"wrote {out}")
    return 0


def _cmd_import_marian(args) -> int:
    from jaxformer import io

    out = io.import_marian(args.source, args.out)
    print(f"imported {args.source} as {out}: use it with --model {out}, or fine-tune with "
          f"--config.train.init_from={out}")
    return 0


def _cmd_average(args) -> int:
    from jaxformer import checkpoint

    argv = ["average", "--workdir", args.workdir, "--last", str(args.last), "--out", args.out]
    if args.step is not None:
        argv += ["--step", str(args.step)]
    return checkpoint.main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxformer", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("translate", help="translate lines of text (stdin or a file)")
    add_model_args(p)
    p.add_argument("--input", "-i", default="-", help="a text file, one sentence per line, or - for stdin")
    p.add_argument("--output", "-o", default=None, help="where to write one translation per line (default stdout)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar for file input")
    p.add_argument("--sampling", default=None, metavar="SPEC",
                   help="draw translations instead of searching: full, topk:K or topp:P (with --nbest N: N "
                        "independent samples per line), e.g. for back-translation")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed, the same samples")
    p.add_argument("--alignments", action="store_true",
                   help="append ' ||| i-j ...' (source piece i, target piece j) to each output, from one decoder "
                        "layer's cross-attention averaged over heads (jsonl: an 'alignment' list)")
    p.add_argument("--alignment-layer", type=int, default=-1, metavar="L",
                   help="the decoder layer whose cross-attention aligns (default -1, the last, as fairseq)")
    p.add_argument("--prefix", default=None, metavar="FILE",
                   help="one target prefix per input line (empty for none): each translation starts with it")
    p.add_argument("--nbest", type=int, default=None, metavar="N",
                   help="the N best hypotheses of the beam (N <= beam size) with their scores, as "
                        "'i ||| hypothesis ||| score' lines (text) or a list per line (jsonl)")
    p.add_argument("--format", choices=("text", "jsonl"), default="text",
                   help="jsonl: one object per line, {source, hypotheses: [{text, score, log_prob, tokens}]}")
    add_decode_args(p)

    p = sub.add_parser("parse", help="parse sentences into constituency trees (a model trained on a treebank)")
    add_model_args(p)
    p.add_argument("--input", "-i", default="-", help="a text file, one sentence per line, or - for stdin")
    p.add_argument("--output", "-o", default=None, help="where to write one tree per line (default stdout)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar for file input")
    p.add_argument("--format", choices=("bracket", "jsonl"), default="bracket",
                   help="bracket: one (TOP ...) tree per line, as EVALB reads; jsonl: {sentence, words, tree, "
                        "symbols, repaired} per line")
    p.add_argument("--draw", action="store_true", help="also print each tree as nltk's text drawing")
    p.add_argument("--pretokenized", action="store_true",
                   help="the input is already tokenized as the treebank is (words separated by spaces); default: "
                        "raw text, tokenized by nltk's TreebankWordTokenizer")
    p.add_argument("--no-grammar", action="store_true",
                   help="search without the grammar mask (for comparison): ill-formed outputs are repaired by a "
                        "fixed rule (jaxformer.parsing.repair) and counted on stderr")
    add_decode_args(p)

    p = sub.add_parser("score", help="forced decoding: the log-prob of given translations, line by line",
                       description="Per line: the search's score (log-prob over the length penalty), the log-prob "
                                   "of the target with its EOS, and with --per-token each token's log-prob "
                                   "(tab-separated; jsonl: one object per line). PAD and BOS are excluded from "
                                   "the softmax, as in the search, unless --full-softmax.")
    add_model_args(p)
    p.add_argument("--src", required=True, help="source sentences, one per line")
    p.add_argument("--tgt", required=True, help="their translations, one per line")
    p.add_argument("--output", "-o", default=None, help="where to write (default stdout)")
    p.add_argument("--format", choices=("text", "jsonl"), default="text")
    p.add_argument("--per-token", action="store_true", help="also each target token's log-prob (EOS last)")
    p.add_argument("--full-softmax", action="store_true",
                   help="log-probs over the whole vocabulary, as CTranslate2's score_batch and fairseq give them "
                        "(default: the search's distribution, without PAD and BOS)")
    p.add_argument("--length-penalty", type=float, default=None, help="alpha of the score (default: the model's)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per batch")

    p = sub.add_parser("evaluate", help="translate a test set and score it with sacreBLEU (a parser: parseval)",
                       epilog="Data overrides: --config.data.KEY=VALUE (or --data.KEY=VALUE) for any data.* config "
                              "key, e.g. --config.data.source=files "
                              "--config.data.test_files=../shared/data/multi30k/test2016")
    add_model_args(p)
    p.add_argument("--split", default="test", help="which split of the run's data (train/valid/test)")
    p.add_argument("--src", default=None, help="a source file (one sentence per line) instead of the run's split")
    p.add_argument("--ref", default=None, help="the reference file aligned with --src")
    p.add_argument("--out", default=None, help="directory for the hypotheses, bleu.json and bleu.txt "
                                               "(default: MODEL/evaluation/SPLIT or MODEL/evaluation/SRC-NAME)")
    p.add_argument("--limit", type=int, default=None, help="only the first N sentences")
    p.add_argument("--tokenize", default=None, help="sacreBLEU tokenizer, e.g. 13a, intl, char (default: the run's train.bleu_tokenize, else 13a)")
    p.add_argument("--tokenized", action="store_true", help="the model writes tokenized text (trained on "
                   "tokenized files): also score tokenized BLEU, output and references as they are (multi-bleu)")
    p.add_argument("--tok-refs", default=None, metavar="FILE", help="lowercased Moses-tokenized references of the "
                   "test set: also score the raw output lowercased, normalised and Moses-tokenized against them "
                   "(with --sweep: score and choose by that)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="KEY=V1,V2",
                   help="score each checkpoint choice with every combination of decode options, e.g. --split "
                        "valid --sweep average_last=5,10 average_best=1,3 average_from_best=5 "
                        "length_penalty=0.6,1.0 (any decode option), print the table and the best; writes "
                        "sweep.json")
    p.add_argument("--no-grammar", action="store_true", help="a parser (scored by parseval): search without the "
                   "grammar mask; ill-formed trees are repaired (jaxformer.parsing.repair) and counted")
    p.add_argument("--compound-split", action="store_true", help="also score the Transformer paper's WMT14 BLEU: "
                   "Moses-tokenized, hyphens split as tensor2tensor's get_ende_bleu.sh")
    add_decode_args(p)

    p = sub.add_parser("export", help="write the model in another format: jaxformer's own (safetensors + config "
                                      "+ vocab)")
    add_model_args(p)
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--format", default="jaxformer", help="jaxformer (default), ctranslate2 (for serving) or marian "
                                                         "(for transformers); the last two need "
                                                         "pip install -e '.[interop]'")
    p.add_argument("--quantization", default=None, help="ctranslate2: float32 (default), int8, int16, float16, "
                                                        "int8_float16, ...")
    p.add_argument("--jax-export", action="store_true",
                   help="also serialize the search (greedy or beam, per the decode settings) with jax.export")
    p.add_argument("--jax-export-src-len", type=int, default=64, metavar="S",
                   help="source length (tokens + EOS, PAD-padded) of the jax.export artifact; any batch size")
    p.add_argument("--jax-export-platforms", type=lambda t: [x for x in t.split(",") if x], default=None,
                   metavar="P,...", help="platforms to lower for, e.g. cpu,cuda (default: this machine's)")

    p = sub.add_parser("plot-attention", help="heat maps of attention weights for one sentence (PNG)")
    add_model_args(p)
    p.add_argument("--sentence", required=True, help="the source sentence")
    p.add_argument("--translation", default=None, help="a target sentence to force (default: the model's)")
    p.add_argument("--kind", default="encoder",
                   help="encoder (self), decoder (self), cross, comma-separated, or all")
    p.add_argument("--layers", type=int_list, default=None, help="layer indices, e.g. 4,5 (-1: last; default)")
    p.add_argument("--heads", type=int_list, default=None, help="head indices (default: all)")
    p.add_argument("--beam-size", type=int, default=None, help="search for the translation (default: the model's)")
    p.add_argument("--out", required=True, help="the PNG file to write")

    p = sub.add_parser("import-marian", help="a Marian / opus-mt model (transformers layout) as a jaxformer export")
    p.add_argument("source", help="a local directory (config.json, model.safetensors or pytorch_model.bin, "
                                  "source.spm, target.spm, vocab.json) or a Hub id, e.g. Helsinki-NLP/opus-mt-en-de")
    p.add_argument("--out", required=True, help="the export directory to write (new or empty)")

    p = sub.add_parser("average", help="average the last K checkpoints of a run into an orbax directory")
    p.add_argument("--workdir", required=True)
    p.add_argument("--last", type=int, required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--out", required=True, help="a new (or empty) directory for the averaged parameters")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "evaluate":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command in ("translate", "parse", "evaluate"):  # their searches split each batch over the cores
        from jaxformer import parallel
        parallel.use_every_cpu_core()
    try:
        if args.command == "translate":
            return _cmd_translate(args)
        if args.command == "parse":
            return _cmd_parse(args)
        if args.command == "evaluate":
            return _cmd_evaluate(args, extra)
        if args.command == "score":
            return _cmd_score(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "plot-attention":
            return _cmd_plot(args)
        if args.command == "import-marian":
            return _cmd_import_marian(args)
        if args.command == "average":
            return _cmd_average(args)
    except Exception as e:  # noqa: BLE001 - our loaders' errors speak for themselves; others keep their traceback
        if isinstance(e, (ValueError, OSError)) or type(e).__module__.startswith("jaxformer"):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
