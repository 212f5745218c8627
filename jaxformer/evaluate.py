"""Translate a test set and score it as the papers do (the metrics themselves are in `jaxformer.bleu`).

Every score comes with its signature (e.g. `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0`),
which says how the number was computed and belongs next to it: the cased detokenized sacreBLEU headline and
the lowercased one always, and on request tokenized BLEU of tokenized output, Moses-tokenized lowercased
BLEU of raw output against tokenized references, and the compound-split BLEU of the Transformer paper; all
go into bleu.json. `evaluate_texts` translates and scores; `run_evaluation` is the `jaxformer evaluate`
command: a run's averaged checkpoints (its `train.average_last` by default), one checkpoint, or an export
directory; a test split of the run's data (hub or local files, read by `jaxformer.data.load_split`) or
explicit --src/--ref files; an output directory for the hypotheses and the scores. `run_sweep` is
`jaxformer evaluate --sweep`: the settings a recipe reports (checkpoints averaged, length penalty, ...)
chosen by a command on the validation split, not by hand.

A parser (a run whose vocabulary is "words", trained on a treebank) is scored instead as parsing papers
do: its trees, searched with the grammar mask, against the gold ones by `jaxformer.parseval` (EVALB's
COLLINS.prm), on all sentences and on those of at most 40 words; the gold and predicted trees
(`<name>.gold`, `<name>.parsed`, one `(TOP ...)` per line, as EVALB reads) are written beside the scores.

Every line of the test set is scored, as sacreBLEU and the papers do: unlike training,
which skips pairs with an empty side or a U+FFFD (undecodable bytes), evaluation keeps
them; an empty source gets an empty translation, and the counts are logged and saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any, Mapping, Sequence

from jaxformer.bleu import BleuResult, bleu_scores, compound_split_bleu, corpus_bleu, moses_lc_bleu, tokenized_bleu
from jaxformer.lines import read_lines  # evaluate.read_lines too (its __all__)

# (the first three live in jaxformer.bleu; kept here for existing callers)
__all__ = ["corpus_bleu", "bleu_scores", "BleuResult", "evaluate_texts", "run_evaluation", "read_lines",
           "read_test_lines", "parse_sweep", "run_sweep", "ParsevalResult"]

log = logging.getLogger(__name__)


def evaluate_texts(translator, sources: Sequence[str], references: Sequence[str], *, tokenize: str | None = None,
                   **decode_overrides) -> BleuResult:
    """Translate `sources` with a `Translator` and score them (cased, with the lowercased score beside it)."""
    if len(sources) != len(references):
        raise ValueError(f"{len(sources)} sources but {len(references)} references")
    hypotheses = translator.translate(list(sources), **decode_overrides)
    return bleu_scores(hypotheses, references, tokenize=tokenize)


def read_test_lines(data_cfg, split: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    """Every (stripped) source and reference line of a split, read as training reads it
    (`jaxformer.data.load_split`) but with nothing dropped: scoring must cover the whole test set."""
    from jaxformer.data import load_split

    sources, references = [], []
    for ex in load_split(data_cfg, split, process_index=0, process_count=1):
        if limit is not None and len(sources) >= limit:
            break
        sources.append((ex["src"] or "").strip())
        references.append((ex["tgt"] or "").strip())
    return sources, references


def count_bad_lines(sources: Sequence[str], references: Sequence[str]) -> dict[str, int]:
    """Lines training would skip: a blank side ("empty"), or a U+FFFD, i.e. undecodable bytes ("bad_utf8")."""
    empty = sum(not s.strip() or not r.strip() for s, r in zip(sources, references))
    bad = sum("\ufffd" in s or "\ufffd" in r for s, r in zip(sources, references))
    return {"empty": empty, "bad_utf8": bad}


def _test_set(config, split: str, src_file: str | None, ref_file: str | None,
              data_overrides: Mapping[str, Any] | None, limit: int | None) -> tuple[list[str], list[str], str, str]:
    """(sources, references, where they come from, a name for the output files): --src/--ref, or a split."""
    if (src_file is None) != (ref_file is None):
        raise ValueError("give both --src and --ref, or neither (then the run's data.* config is used)")
    if src_file is not None:
        sources, references = read_lines(src_file), read_lines(ref_file)
        if len(sources) != len(references):
            raise ValueError(f"{src_file} has {len(sources)} lines but {ref_file} has {len(references)}")
        origin, name = f"{src_file} / {ref_file}", pathlib.Path(src_file).stem or split
    else:
        for key, value in (data_overrides or {}).items():
            config.data[key] = value
        sources, references = read_test_lines(config.data, split, limit)
        origin, name = f"split {split!r} of data.source={config.data.source}", split
    if limit is not None:
        sources, references = sources[:limit], references[:limit]
    if not sources:
        raise ValueError(f"no sentences to evaluate in {origin}")
    return sources, references, origin, name


def run_evaluation(model_path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, split: str = "test",
                   src_file: str | None = None, ref_file: str | None = None, average_last: int | None = None,
                   step: int | None = None, best: bool = False, average_best: int | None = None,
                   average_from_best: int | None = None, data_overrides: Mapping[str, Any] | None = None,
                   decode_overrides: Mapping[str, Any] | None = None, limit: int | None = None,
                   tokenize: str | None = None, tokenized: bool = False, tok_refs: str | None = None,
                   compound_split: bool = False, lang: str | None = None, grammar: bool = True):
    """Translate a test set and write `out_dir/{split}.hyp` (one line per source), `bleu.json` and `bleu.txt`.

    A workdir is evaluated as the average of its last `train.average_last` checkpoints unless `average_last`
    or `step` says otherwise, or `best` (its best checkpoint by validation) / `average_best` (its K best) /
    `average_from_best` (its best and the K - 1 kept after it).
    Every line is scored (see the module docstring). Without `tokenize`, sacreBLEU's tokenizer is the run's
    `train.bleu_tokenize` (default 13a). Beside the cased and lowercased scores: `tokenized` (the model
    writes tokenized text, e.g. trained on Multi30k's tok/ files) adds tokenized BLEU against the references
    as they are; `tok_refs` (a file of lowercased Moses-tokenized references aligned
    with the test set) adds the Moses-tokenized lowercased BLEU of raw output; `compound_split` adds the
    Transformer paper's compound-split BLEU. `lang` (Moses' language) defaults to the run's data.tgt_lang.
    Without `out_dir`, the files go to `model_path/evaluation/<split or source file name>`. A parser is
    scored by parseval instead (`ParsevalResult`; `grammar=False` searches without the mask)."""
    from jaxformer.config import default_config
    from jaxformer.data import is_parser
    from jaxformer.io import load

    tokenized_references = _read_tok_refs(tok_refs, tokenized)  # a bad path fails before decoding
    model_path = pathlib.Path(model_path)
    translator = load(model_path, step=step, average_last=average_last, best=best, average_best=average_best,
                      average_from_best=average_from_best)
    config = translator.config if translator.config is not None else default_config()
    if is_parser(translator.tokenizer):
        test_set = _test_set(config, split, src_file, ref_file, data_overrides, limit)
        out = pathlib.Path(out_dir) if out_dir is not None else model_path / "evaluation" / test_set[3]
        return evaluate_parser(translator, *test_set, out, grammar=grammar,
                               decode_overrides=decode_overrides, model_path=str(model_path))
    lang = lang or config.data.tgt_lang
    if tokenize is None:
        tokenize = config.train.get("bleu_tokenize") or None
    sources, references, origin, name = _test_set(config, split, src_file, ref_file, data_overrides, limit)
    tokenized_references = _fit_tok_refs(tokenized_references, tok_refs, len(sources), origin, limit)
    bad = count_bad_lines(sources, references)
    if any(bad.values()):
        log.warning("%s: %d of %d lines have an empty side and %d a U+FFFD (undecodable bytes); all are scored "
                    "(an empty source gets an empty translation)", origin, bad["empty"], len(sources),
                    bad["bad_utf8"])
    start = time.time()
    hypotheses = translator.translate(sources, **dict(decode_overrides or {}))
    seconds = time.time() - start
    result = bleu_scores(hypotheses, references, tokenize=tokenize)
    if tokenized:
        result.others.append(tokenized_bleu(hypotheses, references))
    if tokenized_references is not None:
        result.others.append(moses_lc_bleu(hypotheses, tokenized_references, lang))
    if compound_split:
        result.others.append(compound_split_bleu(hypotheses, references, lang, tokenized=tokenized))
    out = pathlib.Path(out_dir) if out_dir is not None else model_path / "evaluation" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.hyp").write_text("".join(h.replace("\n", " ") + "\n" for h in hypotheses), encoding="utf-8")
    settings = dict(translator.decode)
    settings.update({k: v for k, v in (decode_overrides or {}).items() if v is not None})
    steps = translator.checkpoint_steps
    count = 1 if best else average_best  # the checkpoints chosen by validation, if any
    info = {**result.to_json(), "model": str(model_path), "checkpoint_steps": steps,
            "average_last": len(steps) if steps and not (count or average_from_best) else None,
            "average_best": count or None, "average_from_best": average_from_best,
            "step": step, "test_set": origin,
            **({"tok_refs": str(tok_refs)} if tok_refs is not None else {}),
            "empty_lines": bad["empty"], "bad_utf8_lines": bad["bad_utf8"], "decode": settings,
            "seconds": round(seconds, 2), "sentences_per_second": round(len(sources) / max(seconds, 1e-9), 2)}
    (out / "bleu.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "bleu.txt").write_text(result.lines())
    log.info("%s (lowercased: %.2f) on %d sentences of %s%s; files in %s", result.text, result.lowercased.score,
             len(sources), origin, f", checkpoint steps {steps}" if steps else "", out)
    return result


def _read_tok_refs(tok_refs: str | None, tokenized: bool) -> list[str] | None:
    """The lines of --tok-refs (None without it); one-line errors for a missing file and for --tokenized."""
    if tok_refs is None:
        return None
    if tokenized:
        raise ValueError("--tok-refs scores raw-text output, which it tokenizes; with --tokenized the output is "
                         "already tokenized: its tokenized BLEU is the comparable number, so drop --tok-refs")
    if not os.path.isfile(tok_refs):
        raise ValueError(f"--tok-refs {tok_refs}: no such file (give the lowercased Moses-tokenized references, "
                         "e.g. ../shared/data/multi30k/tok/test2016.lc.norm.tok.de)")
    return read_lines(tok_refs)


def _fit_tok_refs(lines: list[str] | None, tok_refs: str | None, count: int, origin: str,
                  limit: int | None) -> list[str] | None:
    """`lines` (the first `limit`), refused in one line unless there is one per sentence of the test set."""
    if lines is None:
        return None
    lines = lines[:limit] if limit is not None else lines
    if len(lines) != count:
        raise ValueError(f"--tok-refs {tok_refs} has {len(lines)} lines but the test set ({origin}) has "
                         f"{count}{' (with --limit)' if limit is not None else ''}; "
                         "give the tokenized references of the same test set")
    return lines


@dataclasses.dataclass
class ParsevalResult:
    """A parser's scores (`jaxformer.parseval.Score`: all sentences and those of <= 40 words) and how many
    of its outputs were not well-formed trees (repaired by `jaxformer.parsing.repair` before scoring)."""

    score: Any
    ill_formed: int
    sentences: int

    def to_json(self) -> dict:
        return {"parseval": self.score.as_dict(), "ill_formed": self.ill_formed, "sentences": self.sentences}

    def lines(self) -> str:
        """EVALB's summary figures, one line per length range."""
        rows = [f"{'':>8} {'P':>6} {'R':>6} {'F1':>6} {'exact':>6} {'tags':>6} {'scored':>7} {'ill-formed':>10}"]
        for name, counts in (("all", self.score.all), ("<=40", self.score.short)):
            rows.append(f"{name:>8} {counts.precision:6.2f} {counts.recall:6.2f} {counts.f1:6.2f} "
                        f"{counts.complete_match:6.2f} {counts.tagging_accuracy:6.2f} {counts.scored:7d} "
                        f"{self.ill_formed if name == 'all' else '':>10}")
        return "\n".join(rows) + "\n"


def evaluate_parser(translator, sources: Sequence[str], references: Sequence[str], origin: str, name: str,
                    out: pathlib.Path, *, grammar: bool = True, decode_overrides: Mapping[str, Any] | None = None,
                    model_path: str = "") -> ParsevalResult:
    """Parse `sources` (words, one sentence per line) and score the trees against `references` (the gold
    trees linearized, as the treebank source writes them); writes `<name>.gold`, `<name>.parsed`,
    parseval.json and parseval.txt into `out`."""
    from jaxformer.data.treebank import to_bracket
    from jaxformer.parseval import score_trees
    from jaxformer.parsing import gold_trees, parse_words

    words, gold = gold_trees(sources, references, origin)
    start = time.time()
    parses = parse_words(translator, words, grammar=grammar, **dict(decode_overrides or {}))
    seconds = time.time() - start
    result = ParsevalResult(score_trees(gold, [p.tree for p in parses]), sum(p.repaired for p in parses),
                            len(parses))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.gold").write_text("".join(to_bracket(t) + "\n" for t in gold), encoding="utf-8")
    (out / f"{name}.parsed").write_text("".join(to_bracket(p.tree) + "\n" for p in parses), encoding="utf-8")
    settings = dict(translator.decode)
    settings.update({k: v for k, v in (decode_overrides or {}).items() if v is not None})
    info = {**result.to_json(), "model": model_path, "checkpoint_steps": translator.checkpoint_steps,
            "test_set": origin, "grammar": grammar, "decode": settings, "seconds": round(seconds, 2),
            "sentences_per_second": round(len(parses) / max(seconds, 1e-9), 2)}
    (out / "parseval.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "parseval.txt").write_text(result.lines())
    log.info("parseval F1 %.2f (<= 40 words: %.2f), %d ill-formed, on %d sentences of %s; files in %s",
             result.score.all.f1, result.score.short.f1, result.ill_formed, len(parses), origin, out)
    return result


def _parser_f1(translator, sources: Sequence[str], references: Sequence[str], origin: str, **decode) -> float:
    """A parser's parseval F1 (all sentences) on a test set: what a sweep over its settings compares."""
    from jaxformer.parseval import score_trees
    from jaxformer.parsing import gold_trees, parse_words

    words, gold = gold_trees(sources, references, origin)
    return score_trees(gold, [p.tree for p in parse_words(translator, words, **decode)]).all.f1


# A sweep's checkpoint choices: each value of each is one alternative (average_last=5,10 average_best=3 is
# three); every other key is a decode option, and every alternative is scored with every combination of them.
SWEEP_CHECKPOINTS = ("average_last", "average_best", "average_from_best")
_NOT_SWEPT = ("batch_size", "parallel")  # decode options that change the speed, not the output


def parse_sweep(items: Sequence[str]) -> dict[str, list]:
    """`KEY=V1,V2,...` items -> {key: [values, typed like the key's default]}; one-line errors."""
    from jaxformer.config import default_config

    decode = {k: v for k, v in default_config().decode.to_dict().items() if k not in _NOT_SWEPT}
    grid = {}
    for item in items:
        key, eq, text = item.partition("=")
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not eq or not values:
            raise ValueError(f"--sweep {item!r}: write KEY=V1,V2,..., e.g. length_penalty=0.6,0.8,1.0")
        if key not in SWEEP_CHECKPOINTS and key not in decode:
            raise ValueError(f"--sweep {key}: not a sweepable key; choose among "
                             f"{', '.join(SWEEP_CHECKPOINTS + tuple(decode))}")
        kind = int if key in SWEEP_CHECKPOINTS else type(decode[key])
        try:
            grid[key] = [kind(v) for v in values]
        except ValueError:
            raise ValueError(f"--sweep {key}={text}: expected {kind.__name__} values") from None
        if key in SWEEP_CHECKPOINTS and min(grid[key]) < 1:
            raise ValueError(f"--sweep {key}={text}: each value is a number of checkpoints, >= 1")
    return grid


def _named(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    """A sweep row's settings as `key=value` words: those of `keys` that it has."""
    return " ".join(f"{k}={row[k]}" for k in keys if k in row)


def run_sweep(model_path: str | os.PathLike, grid: Mapping[str, list], out_dir: str | os.PathLike | None = None, *,
              split: str = "valid", src_file: str | None = None, ref_file: str | None = None,
              data_overrides: Mapping[str, Any] | None = None, limit: int | None = None,
              tokenize: str | None = None, tokenized: bool = False, tok_refs: str | None = None,
              decode_overrides: Mapping[str, Any] | None = None, **choice) -> tuple[list[dict], str]:
    """Score `grid` (`parse_sweep`) on one split (choose on valid, score test once):
    each checkpoint choice in it (the values of average_last, average_best and average_from_best, one after
    another) with every combination of its decode options. Returns the rows, in grid order, each with its
    `bleu`, and a table that ends with the best row (a choice's other kinds print as "-"), also written
    to `out_dir/sweep.json`. The score is cased sacreBLEU, with `tokenized` tokenized BLEU, with `tok_refs`
    Moses-tokenized lowercased BLEU against that file (`moses_lc_bleu`, in `bleu_moses_lc`); a parser's is
    parseval F1, in `f1`. `choice` (step, average_last, best, average_best, average_from_best) picks the
    checkpoints when the grid does not. A swept checkpoint choice the run does not hold (more checkpoints
    than it kept) is a logged skip, listed in the table and in sweep.json's `skipped`, with its reason; the
    rows scored stay. A one-line error when none loads."""
    import itertools

    from jaxformer.bleu import tokenized_bleu
    from jaxformer.checkpoint import CheckpointError
    from jaxformer.config import default_config
    from jaxformer.data import is_parser
    from jaxformer.io import load

    swept = [k for k in grid if k in SWEEP_CHECKPOINTS]
    if swept and any(v not in (None, False) for v in choice.values()):
        raise ValueError(f"--sweep {swept[0]}=... chooses the checkpoints: drop --step/--average-last/--best/"
                         f"--average-best/--average-from-best")
    decode_keys = [k for k in grid if k not in SWEEP_CHECKPOINTS]
    tokenized_references = _read_tok_refs(tok_refs, tokenized)  # a bad path fails before decoding
    rows, skipped, test_set = [], [], None
    for chosen in [{k: v} for k in swept for v in grid[k]] or [None]:
        try:
            translator = load(model_path, **(chosen or choice))
        except (ValueError, CheckpointError) as e:  # a swept window the run does not hold: skip that one
            if chosen is None:
                raise
            log.warning("sweep %s: skipped: %s", chosen, e)
            skipped.append({**chosen, "reason": str(e)})
            continue
        if test_set is None:
            config = translator.config if translator.config is not None else default_config()
            test_set = _test_set(config, split, src_file, ref_file, data_overrides, limit)
            if tokenize is None:
                tokenize = config.train.get("bleu_tokenize") or None
            if tokenized_references is not None and is_parser(translator.tokenizer):
                raise ValueError("--tok-refs scores translations; a parser's sweep scores parseval F1: drop it")
            tokenized_references = _fit_tok_refs(tokenized_references, tok_refs, len(test_set[0]), test_set[2],
                                                 limit)
        sources, references, origin, name = test_set
        for settings in itertools.product(*(grid[k] for k in decode_keys)):
            decode = dict(zip(decode_keys, settings))
            row = {**(chosen or {}), **decode}
            settings = {**dict(decode_overrides or {}), **decode}
            if is_parser(translator.tokenizer):  # a parser: parseval F1
                metric, score = "f1", _parser_f1(translator, sources, references, origin, **settings)
            else:
                hypotheses = translator.translate(sources, **settings)
                if tokenized_references is not None:
                    metric, score = "bleu_moses_lc", moses_lc_bleu(hypotheses, tokenized_references,
                                                                   config.data.tgt_lang).score
                else:
                    metric, score = "bleu", (tokenized_bleu(hypotheses, references) if tokenized
                                             else bleu_scores(hypotheses, references, tokenize=tokenize)).score
            rows.append({**row, metric: score, "checkpoint_steps": translator.checkpoint_steps})
            log.info("sweep %s: %s %.2f", row, metric, score)
    if not rows:
        raise ValueError(f"--sweep: none of its {len(skipped)} checkpoint choices could be loaded; the first, "
                         f"{_named(skipped[0], swept)}: {skipped[0]['reason']}")
    best = max(rows, key=lambda r: r[metric])  # ties: the first in grid order
    keys = [*swept, *decode_keys]
    width = {k: max(14, len(k)) for k in [*keys, metric]}  # a column as wide as its name
    lines = ["  ".join(f"{k:>{width[k]}}" for k in [*keys, metric])]
    lines += ["  ".join([*(f"{r.get(k, '-')!s:>{width[k]}}" for k in keys), f"{r[metric]:>{width[metric]}.2f}"])
              for r in rows]
    what = ("parseval F1" if metric == "f1" else "Moses-tokenized lowercased BLEU" if metric == "bleu_moses_lc"
            else "tokenized BLEU" if tokenized else "BLEU")
    lines += [f"skipped: {_named(r, swept)} ({r['reason']})" for r in skipped]
    lines.append(f"chosen: {_named(best, keys)} ({what} {best[metric]:.2f} on {origin})")
    out = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(model_path) / "evaluation" / f"sweep-{name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"test_set": origin, "score": what, "rows": rows, "chosen": best,
                                                "skipped": skipped,
                                                **({"tok_refs": str(tok_refs)} if tok_refs else {})},
                                               indent=2) + "\n")
    return rows, "\n".join(lines) + "\n"
