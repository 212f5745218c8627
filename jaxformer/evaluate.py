"""Translate a test set and score it as the papers do (the metrics themselves are in `jaxformer.bleu`).

Every score comes with its signature (e.g. `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0`),
which says how the number was computed and belongs next to it: the cased detokenized sacreBLEU headline and
the lowercased one always, and on request tokenized BLEU of tokenized output, Moses-tokenized lowercased
BLEU of raw output against tokenized references, and the compound-split BLEU of the Transformer paper; all
go into bleu.json. `evaluate_texts` translates and scores; `run_evaluation` is the `jaxformer evaluate`
command: a run's averaged checkpoints (its `train.average_last` by default), one checkpoint, or an export
directory; a test split of the run's data (hub or local files, read by `jaxformer.data.load_split`) or
explicit --src/--ref files; an output directory for the hypotheses and the scores.

Every line of the test set is scored, as sacreBLEU and the papers do: unlike training,
which skips pairs with an empty side or a U+FFFD (undecodable bytes), evaluation keeps
them; an empty source gets an empty translation, and the counts are logged and saved.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any, Mapping, Sequence

from jaxformer.bleu import BleuResult, bleu_scores, compound_split_bleu, corpus_bleu, moses_lc_bleu, tokenized_bleu

__all__ = ["corpus_bleu", "bleu_scores", "BleuResult", "evaluate_texts", "run_evaluation", "read_lines",
           "read_test_lines"]  # (the first three live in jaxformer.bleu; kept here for existing callers)

log = logging.getLogger(__name__)


def evaluate_texts(translator, sources: Sequence[str], references: Sequence[str], *, tokenize: str | None = None,
                   **decode_overrides) -> BleuResult:
    """Translate `sources` with a `Translator` and score them (cased, with the lowercased score beside it)."""
    if len(sources) != len(references):
        raise ValueError(f"{len(sources)} sources but {len(references)} references")
    hypotheses = translator.translate(list(sources), **decode_overrides)
    return bleu_scores(hypotheses, references, tokenize=tokenize)


def read_lines(path: str | os.PathLike) -> list[str]:
    """One sentence per line (trailing newline stripped, nothing else); undecodable bytes read as U+FFFD."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\r\n") for line in f]


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


def run_evaluation(model_path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, split: str = "test",
                   src_file: str | None = None, ref_file: str | None = None, average_last: int | None = None,
                   step: int | None = None, data_overrides: Mapping[str, Any] | None = None,
                   decode_overrides: Mapping[str, Any] | None = None, limit: int | None = None,
                   tokenize: str | None = None, tokenized: bool = False, tok_refs: str | None = None,
                   compound_split: bool = False, lang: str | None = None) -> BleuResult:
    """Translate a test set and write `out_dir/{split}.hyp` (one line per source), `bleu.json` and `bleu.txt`.

    A workdir is evaluated as the average of its last `train.average_last` checkpoints unless `average_last`
    or `step` says otherwise. Every line is scored (see the module docstring). Without `tokenize`, sacreBLEU's
    tokenizer is the run's `train.bleu_tokenize` (default 13a). Beside the cased and lowercased scores:
    `tokenized` (the model writes tokenized text, e.g. trained on Multi30k's tok/ files) adds tokenized BLEU
    against the references as they are; `tok_refs` (a file of lowercased Moses-tokenized references aligned
    with the test set) adds the Moses-tokenized lowercased BLEU of raw output; `compound_split` adds the
    Transformer paper's compound-split BLEU. `lang` (Moses' language) defaults to the run's data.tgt_lang.
    Without `out_dir`, the files go to `model_path/evaluation/<split or source file name>`."""
    from jaxformer.config import default_config
    from jaxformer.io import load

    if tokenized and tok_refs is not None:
        raise ValueError("--tok-refs scores raw-text output, which it tokenizes; with --tokenized the output is "
                         "already tokenized: its tokenized BLEU is the comparable number, so drop --tok-refs")
    tokenized_references = None
    if tok_refs is not None:  # a bad path fails before decoding
        if not os.path.isfile(tok_refs):
            raise ValueError(f"--tok-refs {tok_refs}: no such file (give the lowercased Moses-tokenized references, "
                             "e.g. ../shared/data/multi30k/tok/test2016.lc.norm.tok.de)")
        tokenized_references = read_lines(tok_refs)
    model_path = pathlib.Path(model_path)
    translator = load(model_path, step=step, average_last=average_last)
    config = translator.config if translator.config is not None else default_config()
    lang = lang or config.data.tgt_lang
    if tokenize is None:
        tokenize = config.train.get("bleu_tokenize") or None
    if (src_file is None) != (ref_file is None):
        raise ValueError("give both --src and --ref, or neither (then the run's data.* config is used)")
    if src_file is not None:
        sources, references = read_lines(src_file), read_lines(ref_file)
        if len(sources) != len(references):
            raise ValueError(f"{src_file} has {len(sources)} lines but {ref_file} has {len(references)}")
        origin = f"{src_file} / {ref_file}"
        name = pathlib.Path(src_file).stem or split
    else:
        for key, value in (data_overrides or {}).items():
            config.data[key] = value
        sources, references = read_test_lines(config.data, split, limit)
        origin = f"split {split!r} of data.source={config.data.source}"
        name = split
    if limit is not None:
        sources, references = sources[:limit], references[:limit]
    if not sources:
        raise ValueError(f"no sentences to evaluate in {origin}")
    if tokenized_references is not None:
        if limit is not None:
            tokenized_references = tokenized_references[:limit]
        if len(tokenized_references) != len(sources):
            raise ValueError(f"--tok-refs {tok_refs} has {len(tokenized_references)} lines but the test set "
                             f"({origin}) has {len(sources)}{' (with --limit)' if limit is not None else ''}; "
                             "give the tokenized references of the same test set")
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
    info = {**result.to_json(), "model": str(model_path), "checkpoint_steps": steps,
            "average_last": len(steps) if steps else None, "step": step, "test_set": origin,
            **({"tok_refs": str(tok_refs)} if tok_refs is not None else {}),
            "empty_lines": bad["empty"], "bad_utf8_lines": bad["bad_utf8"], "decode": settings,
            "seconds": round(seconds, 2), "sentences_per_second": round(len(sources) / max(seconds, 1e-9), 2)}
    (out / "bleu.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "bleu.txt").write_text(result.lines())
    log.info("%s (lowercased: %.2f) on %d sentences of %s%s; files in %s", result.text, result.lowercased.score,
             len(sources), origin, f", checkpoint steps {steps}" if steps else "", out)
    return result
